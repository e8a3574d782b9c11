//! The outbound listener: app → mesh. Finds the destination of each request
//! and forwards it under the destination's policy, or passes it through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument, Span, debug, info_span};

pub mod attempt;
pub mod forward;
pub mod opaque;

use super::refuse::{self, Targets};
use super::{Plain, limited_response, local_response, send_plain};
use crate::config::Config;
use crate::config::destination::Destination;
use crate::config::target::{self, Target};
use crate::metrics::{Direction, DstMetrics, Metrics};
use crate::policy::ratelimit::{self, Admitted};
use crate::reason;
use crate::telemetry::Propagation;
use crate::transport::ProxyBody;
use crate::transport::upstream::Passthrough;

/// Connect timeout for destinations outside the mesh.
pub const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// State shared by every outbound connection.
#[derive(Debug)]
pub struct Outbound {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    namespace: String,
    listen: SocketAddr,
    passthrough: Passthrough,
    passthrough_metrics: DstMetrics,
    propagation: Propagation,
    targets: Targets,
}

impl Outbound {
    /// Outbound state for an agent in `namespace` listening on `listen`.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        namespace: String,
        listen: SocketAddr,
        propagation: Propagation,
    ) -> Self {
        let passthrough_metrics = metrics.destination(Direction::Outbound, "passthrough");
        Self {
            config,
            metrics,
            namespace,
            listen,
            passthrough: Passthrough::new(PASSTHROUGH_CONNECT_TIMEOUT),
            passthrough_metrics,
            propagation,
            targets: Targets::new(Vec::new(), crate::limits::DEFAULT_PROXY_PASSTHROUGH),
        }
    }

    /// Where `CONNECT` and absolute-form requests may go: never to the agent's own
    /// listeners; outside the mesh only with passthrough.
    pub fn with_targets(mut self, targets: Targets) -> Self {
        self.targets = targets;
        self
    }

    /// A request refused for its target (`connect-denied`, `absolute-form-denied`): 403.
    fn deny(&self, why: &'static str, target: &dyn std::fmt::Display) -> Response<ProxyBody> {
        debug!(%target, reason = why, passthrough = self.targets.passthrough, "request refused: the agent does not proxy there");
        self.metrics.refused_request("outbound", why);
        local_response(StatusCode::FORBIDDEN, why, None)
    }

    /// Handles one request from the local app.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        req.extensions_mut().insert(forward::ClientAddr(peer));
        let grpc = crate::grpc::is_grpc(req.headers());
        let rsp = self.handle_explicit(req, peer).await;
        if grpc {
            super::grpc::local_to_grpc(rsp)
        } else {
            rsp
        }
    }

    async fn handle_explicit(
        self: Arc<Self>,
        req: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            return self.tunnel(req).await;
        }
        if req.uri().scheme() == Some(&Scheme::HTTPS) {
            // An https:// URI in proxy form would have us speak plaintext to a TLS
            // port; clients tunnel TLS with CONNECT instead.
            debug!(uri = %req.uri(), "https URI in proxy form refused");
            return local_response(StatusCode::BAD_REQUEST, reason::BAD_REQUEST, None);
        }
        let (dst, passthrough) = {
            let (host, port) = match target::authority(&req) {
                Ok(hp) => hp,
                Err(error) => {
                    debug!(%error, "outbound request without a usable destination");
                    return local_response(StatusCode::BAD_REQUEST, reason::BAD_REQUEST, None);
                }
            };
            let target = target::classify(host, port);
            if target.is_some_and(|t| self.is_self(t)) {
                return local_response(StatusCode::LOOP_DETECTED, reason::LOOP_DETECTED, None);
            }
            if target.is_some_and(|t| self.targets.names_own(t)) {
                return self.deny(reason::ABSOLUTE_FORM_DENIED, &format_args!("{host}:{port}"));
            }
            let config = self.config.load();
            match target.and_then(|t| config.lookup(t, &self.namespace)) {
                Some(dst) => (Some(Arc::clone(dst)), None),
                None if !self.targets.passthrough => {
                    return self.deny(reason::ABSOLUTE_FORM_DENIED, &format_args!("{host}:{port}"));
                }
                None => (None, Authority::try_from(format!("{host}:{port}")).ok()),
            }
        };
        if let Some(dst) = dst {
            return self.to_destination(dst, None, req).await;
        }
        match passthrough {
            Some(authority) => self.passthrough(req, authority).await,
            None => local_response(StatusCode::BAD_REQUEST, reason::BAD_REQUEST, None),
        }
    }

    /// Handles one request on a redirected connection: the destination is where
    /// the connection was going (`orig`), whatever the request's Host says, so
    /// that a redirected app reaches exactly the address it dialled.
    pub async fn handle_redirected(
        self: Arc<Self>,
        req: Request<Incoming>,
        orig: SocketAddr,
    ) -> Response<ProxyBody> {
        let grpc = crate::grpc::is_grpc(req.headers());
        let rsp = self.redirected(req, orig).await;
        if grpc {
            super::grpc::local_to_grpc(rsp)
        } else {
            rsp
        }
    }

    async fn redirected(
        self: Arc<Self>,
        req: Request<Incoming>,
        orig: SocketAddr,
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            return self.tunnel(req).await;
        }
        let found = self.config.load().lookup_original(orig);
        match found {
            Some((dst, pinned)) => self.to_destination(dst, pinned, req).await,
            None => {
                // A SocketAddr always renders as a valid authority.
                match Authority::try_from(orig.to_string()) {
                    Ok(authority) => self.passthrough(req, authority).await,
                    Err(_) => local_response(StatusCode::BAD_REQUEST, reason::BAD_REQUEST, None),
                }
            }
        }
    }

    async fn to_destination(
        &self,
        dst: Arc<Destination>,
        pinned: Option<SocketAddr>,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        // The destination's outbound limits, before anything else is spent on it.
        let admitted = match self.rate_limit(&dst, &req).await {
            Ok(admitted) => admitted,
            Err(rsp) => return rsp,
        };
        let mut rsp = self.route_and_forward(dst, pinned, req).await;
        admitted.finish(rsp.headers_mut());
        rsp
    }

    /// The outbound rate-limit step: the limits callers enforce on the destination the
    /// app called (before any HTTPRoute split). A refusal is the response: 429
    /// rate-limited, counted on the destination.
    async fn rate_limit(
        &self,
        dst: &Destination,
        req: &Request<Incoming>,
    ) -> Result<Admitted, Response<ProxyBody>> {
        if dst.rate_limits.is_empty() {
            return Ok(Admitted::default());
        }
        let client = req
            .extensions()
            .get::<forward::ClientAddr>()
            .map_or(self.listen.ip(), |c| c.0.ip());
        let request = ratelimit::Request {
            port: 0,
            method: req.method(),
            path: req.uri().path(),
            keys: ratelimit::Keys {
                client,
                caller: None,
                headers: req.headers(),
            },
        };
        dst.rate_limits.acquire(&request).await.map_err(|limited| {
            debug!(dst = %dst.name, policy = %limited.source, limit = %limited.name, reason = reason::RATE_LIMITED, "outbound request refused by rate limit");
            self.metrics.rate_limited(&limited.source, &limited.name);
            dst.metrics.local_response(reason::RATE_LIMITED);
            let rsp = limited_response(&limited);
            dst.metrics.response(rsp.status(), Duration::ZERO);
            rsp
        })
    }

    async fn route_and_forward(
        &self,
        dst: Arc<Destination>,
        pinned: Option<SocketAddr>,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        // HTTPRoutes split a Service's traffic; a connection pinned to one pod is not.
        let dst = if pinned.is_none() && !dst.routes.rules.is_empty() {
            match self.route(dst, &mut req) {
                Some(dst) => dst,
                None => {
                    return local_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        reason::BACKEND_NOT_FOUND,
                        None,
                    );
                }
            }
        } else {
            dst
        };
        // A span per request only when spans are exported: it is what
        // carries the trace to the upstream. Decision logs carry `dst` anyway.
        let span = if self.propagation.enabled() {
            let span = info_span!("outbound", dst = %dst.name);
            self.propagation.propagate(&span, req.headers_mut());
            span
        } else {
            Span::none()
        };
        forward::forward_to(dst, pinned, req).instrument(span).await
    }

    /// Where the port's HTTPRoute rules send `req`: the first rule that takes it picks a
    /// backend by weight; a request no rule takes stays with `dst`. The backend is not
    /// routed again. `None`: the picked backend does not exist, or the rule's weights
    /// are all 0 (the request gets 500 `backend-not-found`, counted on `dst`).
    fn route(
        &self,
        dst: Arc<Destination>,
        req: &mut Request<Incoming>,
    ) -> Option<Arc<Destination>> {
        let Some(rule) = dst
            .routes
            .select(req.method(), req.uri().path(), req.headers())
        else {
            return Some(dst);
        };
        rule.modify(req.headers_mut());
        let found = match rule.pick() {
            None => None,
            Some(backend) => {
                backend.count();
                if backend.is_parent {
                    return Some(Arc::clone(&dst));
                }
                let found = self.config.load().backend(&backend.key).cloned();
                if found.is_none() {
                    debug!(
                        dst = %dst.name,
                        route = %rule.source,
                        rule = rule.index,
                        backend = %backend.key,
                        reason = reason::BACKEND_NOT_FOUND,
                        "request refused: no such backend service port"
                    );
                }
                found
            }
        };
        if found.is_none() {
            dst.metrics.local_response(reason::BACKEND_NOT_FOUND);
        }
        found
    }

    /// The metrics of the outbound side (for opaque connections).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The config in force.
    pub fn config(&self) -> &Arc<ArcSwap<Config>> {
        &self.config
    }

    fn is_self(&self, target: Target<'_>) -> bool {
        match target {
            Target::Addr(addr) => {
                addr.port() == self.listen.port()
                    && (addr.ip() == self.listen.ip()
                        || (self.listen.ip().is_unspecified() || self.listen.ip().is_loopback())
                            && addr.ip().is_loopback())
            }
            Target::Name {
                name,
                namespace: None,
                port,
            } => name.eq_ignore_ascii_case("localhost") && port == self.listen.port(),
            Target::Name { .. } => false,
        }
    }

    /// Answers `CONNECT host:port` and relays bytes both ways (e.g. TLS to an
    /// external API through `HTTPS_PROXY`). Tunnels carry no HTTP policy: a mesh
    /// destination's tunnel goes to one of its endpoints under its connection policy
    /// (as opaque TCP would); another destination is passed through, if passthrough is
    /// on, unless it is (or its name resolves to) one of the agent's own listeners.
    async fn tunnel(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let Some(authority) = req.uri().authority().cloned() else {
            return local_response(StatusCode::BAD_REQUEST, reason::BAD_REQUEST, None);
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(443);
        let target = target::classify(host, port);
        if target.is_some_and(|t| self.is_self(t)) {
            return local_response(StatusCode::LOOP_DETECTED, reason::LOOP_DETECTED, None);
        }
        if target.is_some_and(|t| self.targets.names_own(t)) {
            return self.deny(reason::CONNECT_DENIED, &authority);
        }
        let found = target.and_then(|t| self.config.load().lookup(t, &self.namespace).cloned());
        if let Some(dst) = found {
            return match opaque::connect(&dst, None).await {
                Ok((upstream, slot)) => {
                    dst.metrics.tcp_connection();
                    relay_tunnel(req, upstream, authority, slot);
                    Response::new(crate::transport::full(bytes::Bytes::new()))
                }
                Err(refused) => {
                    dst.metrics.local_response(refused.0);
                    let status = if refused.0 == reason::BULKHEAD_FULL {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    local_response(status, refused.0, None)
                }
            };
        }
        if !self.targets.passthrough {
            return self.deny(reason::CONNECT_DENIED, &authority);
        }
        self.metrics.passthrough();
        let upstream = match tokio::time::timeout(
            PASSTHROUGH_CONNECT_TIMEOUT,
            self.connect_outside(host, port),
        )
        .await
        {
            Ok(Ok(Some(stream))) => stream,
            Ok(Ok(None)) => return self.deny(reason::CONNECT_DENIED, &authority),
            Ok(Err(error)) => {
                debug!(%authority, %error, "CONNECT target refused");
                self.passthrough_metrics
                    .local_response(reason::CONNECT_FAILED);
                return local_response(StatusCode::BAD_GATEWAY, reason::CONNECT_FAILED, None);
            }
            Err(_) => {
                self.passthrough_metrics.local_response(reason::TIMEOUT);
                return local_response(StatusCode::GATEWAY_TIMEOUT, reason::TIMEOUT, None);
            }
        };
        relay_tunnel(req, upstream, authority, None);
        Response::new(crate::transport::full(bytes::Bytes::new()))
    }

    /// Connects to a destination outside the mesh, unless its name resolves to one of
    /// the agent's own listeners (`None`).
    async fn connect_outside(&self, host: &str, port: u16) -> std::io::Result<Option<TcpStream>> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
        if addrs
            .iter()
            .any(|a| self.targets.is_own(*a) || self.is_self(Target::Addr(*a)))
        {
            return Ok(None);
        }
        TcpStream::connect(&addrs[..]).await.map(Some)
    }

    /// Forwards a request for a destination outside the mesh, untouched by policy.
    /// A body the client broke is the client's fault: 400, not counted as a failure.
    async fn passthrough(
        &self,
        req: Request<Incoming>,
        authority: Authority,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        self.metrics.passthrough();
        let rsp = match send_plain(Plain::Passthrough(&self.passthrough), req, authority).await {
            Ok(rsp) => rsp,
            Err(error) => match refuse::body_fault(&error) {
                Some(fault) => {
                    debug!(%error, "the client broke its request body");
                    if fault == refuse::BodyFault::Malformed {
                        self.passthrough_metrics
                            .refused_request(crate::limits::refused::BAD_CHUNKED);
                    }
                    self.passthrough_metrics.local_response(reason::BAD_REQUEST);
                    refuse::bad_body()
                }
                None => {
                    debug!(%error, "passthrough request failed");
                    self.passthrough_metrics
                        .local_response(reason::CONNECT_FAILED);
                    local_response(StatusCode::BAD_GATEWAY, reason::CONNECT_FAILED, None)
                }
            },
        };
        self.passthrough_metrics
            .response(rsp.status(), start.elapsed());
        rsp
    }
}

/// Relays a `CONNECT` tunnel once hyper hands over the client's connection; `slot`
/// (a mesh destination's connection slot) is held for the tunnel's life.
fn relay_tunnel(
    req: Request<Incoming>,
    mut upstream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    authority: Authority,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    tokio::spawn(async move {
        let _slot = slot;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                {
                    debug!(%authority, %error, "tunnel closed with an error");
                }
            }
            Err(error) => debug!(%authority, %error, "CONNECT upgrade failed"),
        }
    });
}
