//! The inbound listener: mesh → app. Each request goes through a short sequence
//! of steps before the local app port:
//!
//! ```text
//! caller      the caller's mesh identity: mutual TLS terminated per connection
//!             ([`Inbound::front`]); a plaintext caller has none, and a Strict port
//!             (PeerAuthentication) closes its connection. The metric handles
//!             labelled with the caller are resolved here, once per connection
//! authorize   the pod's AuthorizationPolicies: 403 unless a rule allows it
//! rate limit  the pod's RateLimitPolicies: 429 with Retry-After
//! admit       the concurrency limit across the pod's ports: 503 bulkhead-full
//!             (adaptive admission control goes here)
//! deadline    (none inbound yet: a server-side deadline goes here)
//! app         forwarded to the app, the admission slot held until the body ends
//! ```
//!
//! Each step either lets the request on or refuses it ([`Refused`]), counting the
//! refusal where it knows why; a plain list of calls, as on the outbound path.
//!
//! An opaque TCP connection ([`Inbound::relay`]: an opaque or undetected port, or mutual
//! TLS with ALPN `bulwark-tcp`) takes the same steps once, for the whole connection:
//! authorization by the caller alone (a rule that needs a path, method or header cannot
//! allow it), the rate limits, the concurrency limit; a refused connection is closed
//! before the agent connects to the app, so not a byte reaches it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use super::{Plain, limited_response, local_response, refuse, send_plain};
use crate::config::Config;
use crate::metrics::{CallerLabel, DstMetrics, Metrics, Protocol};
use crate::policy::authorization::{Access, Decision, PeerId};
use crate::policy::ratelimit::{self, Admitted, RateLimited, RateLimits};
use crate::reason;
use crate::transport::ProxyBody;
use crate::transport::pool::Pool;
use crate::transport::server::Conn;
use crate::transport::tcp::{self, RelayEnd};
use crate::transport::tls::{Alpn, TLS_HANDSHAKE_RECORD};
use crate::transport::upstream::Upstream;

/// A caller's verified mesh identity and the metric handles labelled with it, resolved
/// once per connection and shared by its requests (a clone is a reference count). Where
/// an `Option<Caller>` is `None`, the caller has no mesh identity (plaintext).
#[derive(Clone, Debug)]
pub struct Caller(Arc<CallerState>);

#[derive(Debug)]
struct CallerState {
    id: Arc<PeerId>,
    label: CallerLabel,
    metrics: DstMetrics,
}

impl Caller {
    /// The caller's SPIFFE ID.
    pub fn as_str(&self) -> &str {
        self.0.id.as_str()
    }

    /// The caller's identity, split.
    pub fn id(&self) -> &Arc<PeerId> {
        &self.0.id
    }
}

/// How an inbound connection arrived, once its caller step ran.
pub enum Front<I> {
    /// Mutual TLS, terminated.
    Tls {
        /// The decrypted stream (boxed: a TLS session is large, and per connection).
        io: Box<tokio_rustls::server::TlsStream<I>>,
        /// The caller's identity (none if its certificate names no workload).
        caller: Option<Caller>,
        /// The application protocol the caller chose (ALPN).
        alpn: Option<Alpn>,
    },
    /// Plaintext, allowed on this port.
    Plain(I),
}

/// Connect timeout to the local app.
pub const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// `X-Forwarded-For`.
const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// Inbound behaviour shared by every app port of the agent.
#[derive(Clone, Debug, Default)]
pub struct InboundOptions {
    /// Requests (HTTP) and connections (opaque TCP) in the app at once, across
    /// every inbound port; more are answered 503 `bulkhead-full` (HTTP) or closed (TCP).
    pub max_concurrency: Option<Arc<Semaphore>>,
    /// Append the client's address to `X-Forwarded-For` on HTTP requests.
    pub forwarded_for: bool,
    /// How long an opaque connection may stay silent both ways.
    pub tcp_idle_timeout: Duration,
}

/// State shared by the connections of one inbound app port.
#[derive(Debug)]
pub struct Inbound {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    /// The handles of callers without a mesh identity (`caller="unauthenticated"`).
    dst: DstMetrics,
    /// Their label.
    unauthenticated: CallerLabel,
    app: Authority,
    app_addr: SocketAddr,
    app_port: u16,
    upstream: Upstream,
    /// The connections kept open to the app.
    app_pool: Arc<Pool>,
    options: InboundOptions,
}

impl Inbound {
    /// Inbound state forwarding to the app at `app`.
    pub fn new(config: Arc<ArcSwap<Config>>, metrics: Arc<Metrics>, app: SocketAddr) -> Self {
        Self::with_options(config, metrics, app, InboundOptions::default())
    }

    /// Inbound state forwarding to the app at `app`, with `options`.
    pub fn with_options(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        app: SocketAddr,
        options: InboundOptions,
    ) -> Self {
        let label = format!("localhost:{}", app.port());
        let unauthenticated = metrics.caller_label(None);
        let dst = metrics.inbound(&label, &unauthenticated);
        Self {
            config,
            metrics,
            dst,
            unauthenticated,
            // A SocketAddr always renders as a valid authority.
            app: Authority::try_from(app.to_string())
                .unwrap_or_else(|_| Authority::from_static("127.0.0.1")),
            app_addr: app,
            app_port: app.port(),
            upstream: Upstream::new(APP_CONNECT_TIMEOUT, None),
            app_pool: Arc::default(),
            options,
        }
    }

    /// The admission step: a slot in the concurrency limit (`None` when unlimited).
    fn admit(&self, peer: SocketAddr) -> Result<Option<OwnedSemaphorePermit>, Refused> {
        let Some(limit) = &self.options.max_concurrency else {
            return Ok(None);
        };
        match Arc::clone(limit).try_acquire_owned() {
            Ok(slot) => Ok(Some(slot)),
            Err(_) => {
                debug!(app_port = self.app_port, reason = reason::BULKHEAD_FULL, client = %peer.ip(), "inbound concurrency limit reached");
                self.dst.local_response(reason::BULKHEAD_FULL);
                Err(Refused::Overloaded)
            }
        }
    }

    /// The rate-limit step: every limit of the pod that applies to the port takes what
    /// the request costs (a Shared limit may wait for the store, at most its timeout).
    async fn rate_limit(
        &self,
        limits: &RateLimits,
        peer: SocketAddr,
        caller: Option<&Arc<PeerId>>,
        req: (&http::Method, &str, &http::HeaderMap),
    ) -> Result<Admitted, Refused> {
        if limits.is_empty() {
            return Ok(Admitted::default());
        }
        let (method, path, headers) = req;
        let request = ratelimit::Request {
            port: self.app_port,
            method,
            path,
            keys: ratelimit::Keys {
                client: peer.ip(),
                caller,
                headers,
            },
        };
        limits.acquire(&request).await.map_err(|limited| {
            // The rate limiter logs the refusal with the policy and limit.
            debug!(client = %peer.ip(), policy = %limited.source, limit = %limited.name, reason = reason::RATE_LIMITED, "inbound request refused by rate limit");
            self.metrics.rate_limited(&limited.source, &limited.name);
            self.dst.local_response(reason::RATE_LIMITED);
            Refused::RateLimited(Box::new(limited))
        })
    }

    /// The authorization step of an HTTP request: a 403 when no rule of an enforcing
    /// policy allows it; a shadow denial is only counted.
    fn authorize(
        &self,
        config: &Config,
        caller: Option<&Caller>,
        req: &Request<Incoming>,
    ) -> Result<(), Refused> {
        if config.authorization.is_empty() {
            return Ok(());
        }
        let access = Access::Http {
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
        };
        self.judge(config, caller, access)
    }

    /// The authorization step of an opaque TCP connection: only rules that need nothing
    /// but the caller can allow it.
    fn authorize_tcp(&self, config: &Config, caller: Option<&Caller>) -> Result<(), Refused> {
        if config.authorization.is_empty() {
            return Ok(());
        }
        self.judge(config, caller, Access::Tcp)
    }

    /// The policies' decision on `access` from `caller`, counted and logged.
    fn judge(
        &self,
        config: &Config,
        caller: Option<&Caller>,
        access: Access<'_>,
    ) -> Result<(), Refused> {
        let decision =
            config
                .authorization
                .decide(self.app_port, caller.map(|c| c.id().as_ref()), access);
        let (protocol, path) = match access {
            Access::Http { path, .. } => (Protocol::Http, path),
            Access::Tcp => (Protocol::Tcp, ""),
        };
        let who = caller.map_or(crate::metrics::CALLER_UNAUTHENTICATED, Caller::as_str);
        let label = caller.map_or(&self.unauthenticated, |c| &c.0.label);
        match decision {
            Decision::Unprotected
            | Decision::Allowed {
                shadow_denied: None,
            } => Ok(()),
            Decision::Allowed {
                shadow_denied: Some(policy),
            } => {
                debug!(
                    policy,
                    caller = who,
                    protocol = protocol.as_str(),
                    path,
                    app_port = self.app_port,
                    "shadow authorization policy would deny"
                );
                self.metrics.unauthorized(policy, label, protocol, true);
                Ok(())
            }
            Decision::Denied { policy } => {
                debug!(
                    policy,
                    caller = who,
                    protocol = protocol.as_str(),
                    path,
                    app_port = self.app_port,
                    reason = reason::UNAUTHORIZED,
                    "inbound request or connection denied"
                );
                self.metrics.unauthorized(policy, label, protocol, false);
                self.dst.local_response(reason::UNAUTHORIZED);
                Err(Refused::Unauthorized)
            }
        }
    }

    /// The caller of a connection whose handshake proved `id`, with its metric handles
    /// (resolved here, once per connection).
    fn caller(&self, id: PeerId) -> Caller {
        let label = self
            .metrics
            .caller_label(Some((id.namespace(), id.service_account())));
        let metrics = self.metrics.from_caller(&self.dst, &label);
        Caller(Arc::new(CallerState {
            id: Arc::new(id),
            label,
            metrics,
        }))
    }

    /// The caller step of a connection to `port` (the app port): when the agent has an
    /// identity and the client's first byte starts a TLS handshake (waiting at most
    /// `wait` for it), mutual TLS is terminated and the caller's SPIFFE ID read from its
    /// verified certificate; otherwise the connection is plaintext, which a Strict port
    /// refuses. `None`: the connection was closed (refused, or a failed handshake,
    /// counted and logged by the TLS layer).
    pub async fn front(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        port: u16,
        wait: Duration,
    ) -> Option<Front<TcpStream>> {
        let (tls, strict) = {
            let config = self.config.load();
            (
                Arc::clone(&config.tls),
                config.peer_authentication.strict(port),
            )
        };
        let starts_tls =
            tls.enabled() && first_byte(&stream, wait).await == Some(TLS_HANDSHAKE_RECORD);
        if starts_tls {
            let (io, caller) = tls.accept(stream, peer).await.ok()?;
            let alpn = Alpn::negotiated(io.get_ref().1.alpn_protocol());
            let caller = caller
                .as_deref()
                .and_then(PeerId::parse)
                .map(|id| self.caller(id));
            return Some(Front::Tls {
                io: Box::new(io),
                caller,
                alpn,
            });
        }
        if strict {
            tls.counters().plaintext_refused.inc();
            debug!(%peer, app_port = port, "plaintext connection refused: the port is Strict (PeerAuthentication)");
            return None;
        }
        Some(Front::Plain(stream))
    }

    /// Serves one connection to the app port over HTTP: the caller step, then each
    /// request through [`Inbound::handle`].
    pub async fn serve_http(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        conn: Conn,
        wait: Duration,
    ) {
        // Boxed, like every step that ends before the connection does: the handshake's
        // state (rustls's connection, the detect timer) would otherwise stay in the
        // connection's task, idle or not, for as long as it lives.
        match Box::pin(self.front(stream, peer, self.app_port, wait)).await {
            None => {}
            Some(Front::Plain(io)) => {
                conn.serve_http(io, peer, move |req, peer| {
                    Arc::clone(&self).handle(req, peer, None)
                })
                .await;
            }
            Some(Front::Tls { io, caller, alpn }) => {
                if alpn == Some(Alpn::Opaque) {
                    // Boxed for the same reason: opaque TCP's state is not HTTP's.
                    return Box::pin(self.relay(io, peer, caller.as_ref())).await;
                }
                conn.serve_http(io, peer, move |req, peer| {
                    Arc::clone(&self).handle(req, peer, caller.clone())
                })
                .await;
            }
        }
    }

    /// Handles one request from the mesh, from `caller` (none: no mesh identity).
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        caller: Option<Caller>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = crate::grpc::is_grpc(req.headers());
        let rsp = match self.steps(&req, peer, caller.as_ref()).await {
            Err(refused) => refused.response(),
            Ok((slot, admitted)) => {
                if self.options.forwarded_for {
                    append_forwarded_for(req.headers_mut(), peer.ip());
                }
                let mut rsp = self.to_app(req).await;
                admitted.finish(rsp.headers_mut());
                // The slot lasts as long as the response body.
                let (head, body) = rsp.into_parts();
                let body = http_body_util::BodyExt::boxed_unsync(
                    http_body_util::BodyExt::map_frame(body, move |f| {
                        let _ = &slot;
                        f
                    }),
                );
                Response::from_parts(head, body)
            }
        };
        self.metrics_of(caller.as_ref())
            .response(rsp.status(), start.elapsed());
        if grpc {
            super::grpc::local_to_grpc(rsp)
        } else {
            rsp
        }
    }

    /// The request-path metric handles of `caller`'s requests and connections.
    fn metrics_of<'a>(&'a self, caller: Option<&'a Caller>) -> &'a DstMetrics {
        caller.map_or(&self.dst, |c| &c.0.metrics)
    }

    /// The steps before the app, in order; the admission slot to hold if they all pass,
    /// and what the rate limits need from the response.
    async fn steps(
        &self,
        req: &Request<Incoming>,
        peer: SocketAddr,
        caller: Option<&Caller>,
    ) -> Result<(Option<OwnedSemaphorePermit>, Admitted), Refused> {
        let limits = {
            let config = self.config.load();
            // 1. The caller's mesh identity came with the connection (see `front`).
            // 2. Authorization.
            self.authorize(&config, caller, req)?;
            // A reference count, so that no config guard is held across the store's
            // round trip.
            config.inbound.clone()
        };
        // 3. Rate limit.
        let parts = (req.method(), req.uri().path(), req.headers());
        let admitted = self
            .rate_limit(&limits, peer, caller.map(Caller::id), parts)
            .await?;
        // 4. Admission.
        let slot = self.admit(peer)?;
        // 5. Deadline: none inbound yet.
        Ok((slot, admitted))
    }

    async fn to_app(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        match send_plain(
            Plain::Pool(&self.upstream, &self.app_pool),
            req,
            self.app.clone(),
        )
        .await
        {
            Ok(rsp) => rsp,
            Err(error) => match refuse::body_fault(&error) {
                // The client broke its body: its fault, not the app's.
                Some(fault) => {
                    debug!(app = %self.app, %error, "the client broke its request body");
                    if fault == refuse::BodyFault::Malformed {
                        self.dst
                            .refused_request(crate::limits::refused::BAD_CHUNKED);
                    }
                    self.dst.local_response(reason::BAD_REQUEST);
                    refuse::bad_body()
                }
                None => {
                    debug!(app = %self.app, %error, "local app did not answer");
                    self.dst.local_response(reason::CONNECT_FAILED);
                    local_response(StatusCode::BAD_GATEWAY, reason::CONNECT_FAILED, None)
                }
            },
        }
    }

    /// Relays an opaque TCP connection from `peer` (whose mesh identity is `caller`, if
    /// it has one) to the app. Authorization and rate limits apply once, to the whole
    /// connection: only rules that need nothing but the caller can allow it, and a
    /// header-keyed limit sees no headers (one shared bucket). The concurrency limit
    /// holds a slot for the connection's life. A refused connection is closed (dropped)
    /// before the app is dialled: not a byte of it reaches the app.
    pub async fn relay<C>(&self, client: C, peer: SocketAddr, caller: Option<&Caller>)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    {
        let headers = http::HeaderMap::new();
        let limits = {
            let config = self.config.load();
            match self.authorize_tcp(&config, caller) {
                Ok(()) => config.inbound.clone(),
                // The step logged and counted its refusal.
                Err(_) => return,
            }
        };
        let connection = (&http::Method::CONNECT, "", &headers);
        if self
            .rate_limit(&limits, peer, caller.map(Caller::id), connection)
            .await
            .is_err()
        {
            return;
        }
        let Ok(_slot) = self.admit(peer) else {
            return;
        };
        let app = match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(self.app_addr))
            .await
        {
            Ok(Ok(app)) => app,
            Ok(Err(error)) => {
                debug!(app = %self.app_addr, %error, "local app refused the connection");
                self.dst.local_response(reason::CONNECT_FAILED);
                return;
            }
            Err(_) => {
                self.dst.local_response(reason::TIMEOUT);
                return;
            }
        };
        self.metrics_of(caller).tcp_connection();
        match tcp::relay(client, app, self.options.tcp_idle_timeout).await {
            Ok(done) if done.end == RelayEnd::Idle => {
                debug!(app = %self.app_addr, client = %peer, "idle connection closed");
            }
            Ok(_) => {}
            Err(error) => {
                debug!(app = %self.app_addr, client = %peer, %error, "connection ended with an error")
            }
        }
    }
}

/// Why the agent answered an inbound request itself (each step counts its refusal).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Refused {
    /// No AuthorizationPolicy rule allows the request.
    Unauthorized,
    /// A rate limit refused it (boxed: rare, and larger than the other cases).
    RateLimited(Box<RateLimited>),
    /// The concurrency limit is reached.
    Overloaded,
}

impl Refused {
    fn response(self) -> Response<ProxyBody> {
        match self {
            Refused::Unauthorized => {
                local_response(StatusCode::FORBIDDEN, reason::UNAUTHORIZED, None)
            }
            Refused::RateLimited(limited) => limited_response(&limited),
            Refused::Overloaded => {
                local_response(StatusCode::SERVICE_UNAVAILABLE, reason::BULKHEAD_FULL, None)
            }
        }
    }
}

/// The first byte the client sends, waiting at most `wait` (none: it sent nothing in
/// time, or closed). Peeked, not read: the byte stays for whoever reads next.
async fn first_byte(stream: &TcpStream, wait: Duration) -> Option<u8> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut byte)).await {
        Ok(Ok(1)) => Some(byte[0]),
        _ => None,
    }
}

/// Appends `client` to `X-Forwarded-For` (RFC 7239's predecessor, as proxies write it).
fn append_forwarded_for(headers: &mut http::HeaderMap, client: IpAddr) {
    let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {client}"),
        _ => client.to_string(),
    };
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(max_concurrency: Option<usize>) -> Inbound {
        let config = Arc::new(ArcSwap::from_pointee(Config::default()));
        let metrics = Arc::new(Metrics::new(Arc::clone(&config)));
        let options = InboundOptions {
            max_concurrency: max_concurrency.map(|n| Arc::new(Semaphore::new(n))),
            ..InboundOptions::default()
        };
        Inbound::with_options(config, metrics, "127.0.0.1:8080".parse().unwrap(), options)
    }

    #[tokio::test(start_paused = true)]
    async fn admission_holds_a_slot_and_refuses_past_the_limit() {
        let peer = "10.0.0.1:5000".parse().unwrap();
        let inbound = inbound(Some(1));
        let slot = inbound.admit(peer).unwrap();
        assert!(slot.is_some());
        assert_eq!(inbound.admit(peer).unwrap_err(), Refused::Overloaded);
        drop(slot);
        assert!(inbound.admit(peer).is_ok(), "the slot is back");
        assert!(
            self::inbound(None).admit(peer).unwrap().is_none(),
            "unlimited"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_rate_limit_lets_everything_through() {
        let inbound = inbound(None);
        let limits = inbound.config.load().inbound.clone();
        let peer = "10.0.0.1:5000".parse().unwrap();
        let headers = http::HeaderMap::new();
        assert!(
            inbound
                .rate_limit(&limits, peer, None, (&http::Method::GET, "/", &headers))
                .await
                .is_ok()
        );
    }

    use bulwark_proto::v1;
    use bulwark_testkit::Metrics as Scraped;
    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::policy::authorization::Authorization;

    fn from(namespace: &str, service_account: &str) -> v1::SourceMatch {
        v1::SourceMatch {
            trust_domain: "*".into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// An inbound port in front of a real app listener, protected by one policy:
    /// `shop/orders` may connect (a rule of the caller alone), `shop/reviews` may only
    /// GET /status (a rule that needs HTTP, so it cannot allow a TCP connection).
    async fn protected(shadow: bool) -> (Arc<Inbound>, Arc<Metrics>, TcpListener) {
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let policy = v1::AuthorizationPolicy {
            source: "shop/payments".into(),
            ports: vec![],
            shadow,
            rules: vec![
                v1::AuthorizationRule {
                    from: vec![from("shop", "orders")],
                    to: vec![],
                    when: vec![],
                },
                v1::AuthorizationRule {
                    from: vec![from("shop", "reviews")],
                    to: vec![v1::OperationMatch {
                        methods: vec!["GET".into()],
                        paths: vec![v1::PathMatch {
                            kind: Some(v1::path_match::Kind::Exact("/status".into())),
                        }],
                    }],
                    when: vec![],
                },
            ],
        };
        let mut config = Config::default();
        config.authorization = Authorization::try_from(&[policy][..]).unwrap();
        let config = Arc::new(ArcSwap::from_pointee(config));
        let metrics = Arc::new(Metrics::new(Arc::clone(&config)));
        let options = InboundOptions {
            tcp_idle_timeout: Duration::from_secs(60),
            ..InboundOptions::default()
        };
        let inbound = Inbound::with_options(
            config,
            Arc::clone(&metrics),
            app.local_addr().unwrap(),
            options,
        );
        (Arc::new(inbound), metrics, app)
    }

    fn caller(inbound: &Inbound, namespace: &str, service_account: &str) -> Caller {
        let id = format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}");
        inbound.caller(PeerId::parse(&id).unwrap())
    }

    fn scrape(metrics: &Metrics) -> Scraped {
        Scraped::parse(&metrics.encode()).unwrap()
    }

    /// Relays one connection from `caller` and says whether it reached the app: bytes
    /// go both ways through it, or the client sees the connection closed with nothing
    /// and the app has no connection waiting.
    async fn connect(inbound: &Arc<Inbound>, app: &TcpListener, caller: Option<Caller>) -> bool {
        let peer = "10.0.0.7:40000".parse().unwrap();
        let (mut client, agent_side) = tokio::io::duplex(1024);
        let relaying = Arc::clone(inbound);
        let mut relay =
            tokio::spawn(async move { relaying.relay(agent_side, peer, caller.as_ref()).await });
        let accepted = tokio::select! {
            accepted = app.accept() => Some(accepted.unwrap().0),
            done = &mut relay => {
                done.unwrap();
                None
            }
        };
        let Some(mut app_side) = accepted else {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert!(got.is_empty(), "a refused client gets nothing back");
            assert!(
                app.accept().now_or_never().is_none(),
                "the app never saw a connection"
            );
            return false;
        };
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        app_side.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        app_side.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        drop((client, app_side));
        relay.await.unwrap();
        true
    }

    #[tokio::test]
    async fn a_tcp_connection_reaches_the_app_only_if_a_rule_allows_its_caller_alone() {
        let (inbound, metrics, app) = protected(false).await;
        let orders = caller(&inbound, "shop", "orders");
        assert!(connect(&inbound, &app, Some(orders)).await, "orders");
        let reviews = caller(&inbound, "shop", "reviews");
        assert!(
            !connect(&inbound, &app, Some(reviews)).await,
            "reviews' only rule needs a path and a method"
        );
        assert!(!connect(&inbound, &app, None).await, "no identity");
        let seen = scrape(&metrics);
        let denied = |caller: &str| {
            seen.get(
                "bulwark_unauthorized_total",
                &[
                    ("policy", "shop/payments"),
                    ("caller", caller),
                    ("protocol", "tcp"),
                ],
            )
        };
        assert_eq!(denied("shop/reviews"), 1.0);
        assert_eq!(denied("unauthenticated"), 1.0);
        assert_eq!(denied("shop/orders"), 0.0);
        let relayed = |caller: &str| {
            seen.get(
                "bulwark_tcp_connections_total",
                &[("direction", "inbound"), ("caller", caller)],
            )
        };
        assert_eq!(relayed("shop/orders"), 1.0);
        assert_eq!(relayed("shop/reviews") + relayed("unauthenticated"), 0.0);
        assert_eq!(
            seen.get(
                "bulwark_local_responses_total",
                &[("direction", "inbound"), ("reason", "unauthorized")]
            ),
            2.0
        );
    }

    #[tokio::test]
    async fn a_shadow_policy_counts_the_tcp_connection_it_would_deny_and_lets_it_through() {
        let (inbound, metrics, app) = protected(true).await;
        let reviews = caller(&inbound, "shop", "reviews");
        assert!(connect(&inbound, &app, Some(reviews)).await);
        assert!(connect(&inbound, &app, None).await);
        let seen = scrape(&metrics);
        let would_deny = |caller: &str| {
            seen.get(
                "bulwark_shadow_unauthorized_total",
                &[("caller", caller), ("protocol", "tcp")],
            )
        };
        assert_eq!(would_deny("shop/reviews"), 1.0);
        assert_eq!(would_deny("unauthenticated"), 1.0);
        assert_eq!(seen.get("bulwark_unauthorized_total", &[]), 0.0);
    }

    #[tokio::test]
    async fn a_pod_without_policy_relays_every_caller() {
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = Arc::new(ArcSwap::from_pointee(Config::default()));
        let metrics = Arc::new(Metrics::new(Arc::clone(&config)));
        let options = InboundOptions {
            tcp_idle_timeout: Duration::from_secs(60),
            ..InboundOptions::default()
        };
        let inbound = Arc::new(Inbound::with_options(
            config,
            metrics,
            app.local_addr().unwrap(),
            options,
        ));
        let stranger = caller(&inbound, "elsewhere", "stranger");
        assert!(connect(&inbound, &app, Some(stranger)).await);
        assert!(connect(&inbound, &app, None).await);
    }

    #[test]
    fn refusals_say_why() {
        let limited = RateLimited {
            retry_after: Duration::from_millis(1500),
            source: "shop/api".into(),
            name: "total".into(),
            quota: None,
        };
        let rsp = Refused::RateLimited(Box::new(limited.clone())).response();
        assert_eq!(rsp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(rsp.headers()[crate::reason::REASON_HEADER], "rate-limited");
        assert_eq!(rsp.headers()[http::header::RETRY_AFTER], "2");
        assert!(rsp.headers().get("ratelimit").is_none(), "not asked for");
        let rsp = limited_response(&RateLimited {
            quota: Some(ratelimit::headers::Quota {
                name: "total".into(),
                requests: 100,
                window: Duration::from_secs(1),
                remaining: 0,
                reset: Duration::from_millis(1500),
            }),
            ..limited
        });
        assert_eq!(rsp.headers()[http::header::RETRY_AFTER], "2");
        assert_eq!(rsp.headers()["ratelimit-policy"], "\"total\";q=100;w=1");
        assert_eq!(rsp.headers()["ratelimit"], "\"total\";r=0;t=2");
        let rsp = Refused::Unauthorized.response();
        assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
        assert_eq!(rsp.headers()[crate::reason::REASON_HEADER], "unauthorized");
        let rsp = Refused::Overloaded.response();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[crate::reason::REASON_HEADER], "bulkhead-full");
    }

    #[test]
    fn appends_the_client_to_forwarded_for() {
        let mut h = http::HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1");
        append_forwarded_for(&mut h, "fd00::2".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, fd00::2");
    }
}
