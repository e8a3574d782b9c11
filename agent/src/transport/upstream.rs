//! HTTP clients to one destination's endpoints (HTTP/1.1 and HTTP/2), over the
//! endpoints' own connection [`Pool`]s.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::sync::Semaphore;
use tracing::debug;

use super::connector::{Connector, LimitedConn};
use super::http2;
use super::pool::{H2, Lease, Pool};
use super::tls::{Alpn, MeshPeers, MeshTls};
use super::{BoxError, ProxyBody};

/// Why a request got no response from an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, timed out, TLS failed, limit closed).
    #[error("connect to {target} failed: {source}")]
    Connect {
        /// The endpoint.
        target: Authority,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// The connection failed before or while the response came (its source may be
    /// the request body's own error: see `proxy::refuse::body_fault`).
    #[error("request to {target} failed: {source}")]
    Request {
        /// The endpoint.
        target: Authority,
        /// hyper's or h2's error.
        #[source]
        source: BoxError,
    },
    /// The request's URI names no authority to connect to.
    #[error("request URI {0} has no authority")]
    NoAuthority(Uri),
}

impl SendError {
    /// Whether no connection could be made (nothing reached the endpoint).
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. } | SendError::NoAuthority(_))
    }
}

/// HTTP clients sharing one connect timeout, connection limit and mutual TLS; the
/// connections themselves live in each endpoint's [`Pool`]. Cloned per config version
/// while those settings hold.
#[derive(Clone, Debug)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    h1: Connector,
    h2: Connector,
    connect_timeout: Duration,
    peers: Option<(Arc<MeshTls>, Arc<MeshPeers>)>,
    h1_builder: http1::Builder,
    h2_builder: h2::client::Builder,
}

impl Upstream {
    /// Plaintext clients that connect within `connect_timeout`, at most `limit`
    /// connections at once.
    pub fn new(connect_timeout: Duration, limit: Option<Arc<Semaphore>>) -> Self {
        let connector = Connector::new(connect_timeout, limit);
        Self::with_connectors(connector.clone(), connector, connect_timeout, None)
    }

    /// Like [`Upstream::new`], speaking mutual TLS with `tls` to the endpoints that
    /// [`Upstream::set_meshed`] names.
    pub fn meshed(
        connect_timeout: Duration,
        limit: Option<Arc<Semaphore>>,
        tls: Arc<MeshTls>,
    ) -> Self {
        let peers = Arc::new(MeshPeers::default());
        let connector = Connector::new(connect_timeout, limit);
        let h1 = connector
            .clone()
            .with_mesh(Arc::clone(&tls), Arc::clone(&peers), Alpn::Http1);
        let h2 = connector.with_mesh(Arc::clone(&tls), Arc::clone(&peers), Alpn::Http2);
        Self::with_connectors(h1, h2, connect_timeout, Some((tls, peers)))
    }

    fn with_connectors(
        h1: Connector,
        h2: Connector,
        connect_timeout: Duration,
        peers: Option<(Arc<MeshTls>, Arc<MeshPeers>)>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                h1,
                h2,
                connect_timeout,
                peers,
                h1_builder: http1::Builder::new(),
                h2_builder: http2::builder(),
            }),
        }
    }

    /// Whether `self` and `other` are the same clients (connections made by one are
    /// fit for the other).
    pub fn same(&self, other: &Upstream) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Names the meshed endpoints and the identity each must prove (no effect on
    /// plaintext clients). Pooled connections stay as they are.
    pub fn set_meshed(&self, peers: HashMap<std::net::SocketAddr, Arc<str>>) {
        if let Some((_, mesh)) = &self.inner.peers {
            mesh.set(peers);
        }
    }

    /// The identity expected at the meshed endpoint `addr` (none: plaintext).
    pub fn expected(&self, addr: std::net::SocketAddr) -> Option<Arc<str>> {
        self.inner.peers.as_ref()?.1.expected(addr)
    }

    /// The mutual TLS to use to `addr` and the identity it must prove, when `addr` is a
    /// meshed endpoint and the agent has identity on (for connections other than these
    /// clients', e.g. opaque TCP).
    pub fn mesh_to(&self, addr: std::net::SocketAddr) -> Option<(&Arc<MeshTls>, Arc<str>)> {
        let (tls, peers) = self.inner.peers.as_ref()?;
        tls.enabled().then_some(())?;
        Some((tls, peers.expected(addr)?))
    }

    /// Whether these clients can speak mutual TLS.
    pub fn is_meshed(&self) -> bool {
        self.inner.peers.is_some()
    }

    /// The connect timeout these clients use.
    pub fn connect_timeout(&self) -> Duration {
        self.inner.connect_timeout
    }

    /// Sends `req` (its URI absolute: the endpoint's authority) over one of `pool`'s
    /// connections, HTTP/2 (prior knowledge) when `http2`, else HTTP/1.1. An HTTP/1.1
    /// connection goes back to `pool` when the response body ends.
    pub async fn send(
        &self,
        pool: &Arc<Pool>,
        mut req: Request<ProxyBody>,
        http2: bool,
    ) -> Result<Response<Leased>, SendError> {
        if http2 {
            *req.version_mut() = Version::HTTP_2;
            return self.send_h2(pool, req).await;
        }
        *req.version_mut() = Version::HTTP_11;
        let uri = req.uri().clone();
        prepare_h1(&mut req);
        loop {
            let mut lease = self.h1(pool, &uri).await?;
            let reused = lease.reused();
            let Some(conn) = lease.conn() else {
                continue;
            };
            match conn.try_send_request(req).await {
                Ok(rsp) => {
                    return Ok(rsp.map(|body| Leased::new(Received::H1(body), Some(lease))));
                }
                Err(mut error) => match error.take_message() {
                    // The pooled connection closed before the request was written (the
                    // server's keep-alive timeout raced it): nothing was sent, so try
                    // another connection, as hyper's pool did.
                    Some(again) if reused => {
                        debug!(target = %target(&uri), error = %error.error(), "pooled connection closed; trying another");
                        req = again;
                    }
                    _ => {
                        return Err(SendError::Request {
                            target: target(&uri),
                            source: error.into_error().into(),
                        });
                    }
                },
            }
        }
    }

    /// Sends `req` over `pool`'s shared HTTP/2 connection. A pooled connection that
    /// turns out unable to take the stream (closed, or going away) is replaced once:
    /// nothing was sent on it.
    async fn send_h2(
        &self,
        pool: &Arc<Pool>,
        req: Request<ProxyBody>,
    ) -> Result<Response<Leased>, SendError> {
        let (conn, reused) = match pool.h2() {
            Some(conn) => (conn, true),
            // Boxed, as in `h1`.
            None => (Box::pin(self.dial_h2(pool, req.uri())).await?, false),
        };
        let error = match conn.ready().await {
            Ok(conn) => return self.send_on(conn, req).await,
            Err(error) => error,
        };
        if !reused {
            return Err(SendError::Request {
                target: target(req.uri()),
                source: error.into(),
            });
        }
        debug!(target = %target(req.uri()), %error, "pooled HTTP/2 connection closed; trying another");
        let conn = Box::pin(self.dial_h2(pool, req.uri())).await?;
        match conn.ready().await {
            Ok(conn) => self.send_on(conn, req).await,
            Err(error) => Err(SendError::Request {
                target: target(req.uri()),
                source: error.into(),
            }),
        }
    }

    /// Sends `req` on a connection ready for a new stream.
    async fn send_on(
        &self,
        conn: http2::Ready,
        req: Request<ProxyBody>,
    ) -> Result<Response<Leased>, SendError> {
        let target = target(req.uri());
        match conn.send(req).await {
            Ok(rsp) => Ok(rsp.map(|body| Leased::new(Received::H2(body), None))),
            Err(error) => Err(SendError::Request {
                target,
                source: error.into(),
            }),
        }
    }

    /// An HTTP/1.1 connection: an idle one from `pool`, or a new one.
    async fn h1(&self, pool: &Arc<Pool>, uri: &Uri) -> Result<Lease, SendError> {
        if let Some(lease) = pool.checkout() {
            return Ok(lease);
        }
        // Boxed: connecting and the handshake are large futures that would otherwise
        // make every request's future (moved into a box per request) that much larger.
        Box::pin(self.dial_h1(pool, uri)).await
    }

    /// A new HTTP/1.1 connection to `pool`'s endpoint, or an idle one returned while a
    /// connection limit kept the new one waiting (whichever comes first).
    async fn dial_h1(&self, pool: &Arc<Pool>, uri: &Uri) -> Result<Lease, SendError> {
        let (io, epoch) = loop {
            if !self.inner.h1.is_limited() {
                break (self.connect(&self.inner.h1, uri).await?, pool.epoch());
            }
            let returned = pool.returned();
            tokio::pin!(returned);
            returned.as_mut().enable();
            // Once more, now that a return would wake us.
            if let Some(lease) = pool.checkout() {
                return Ok(lease);
            }
            let epoch = pool.epoch();
            tokio::select! {
                io = self.connect(&self.inner.h1, uri) => break (io?, epoch),
                () = returned => {}
            }
        };
        let (conn, connection) = self
            .inner
            .h1_builder
            .handshake::<_, ProxyBody>(io)
            .await
            .map_err(request_failed(uri))?;
        drive(uri, connection.with_upgrades());
        Ok(pool.lease_new(conn, epoch))
    }

    /// A new HTTP/2 connection for `pool` (one for concurrent first requests).
    async fn dial_h2(&self, pool: &Arc<Pool>, uri: &Uri) -> Result<H2, SendError> {
        let _connecting = pool.h2_connecting.lock().await;
        if let Some(conn) = pool.h2() {
            return Ok(conn);
        }
        let epoch = pool.epoch();
        let io = self.connect(&self.inner.h2, uri).await?;
        let http2::Handshake { conn, driver } = http2::handshake(io, &self.inner.h2_builder)
            .await
            .map_err(|error| SendError::Request {
                target: target(uri),
                source: error.into(),
            })?;
        drive(uri, driver);
        pool.set_h2(conn.clone(), epoch);
        Ok(conn)
    }

    async fn connect(&self, connector: &Connector, uri: &Uri) -> Result<LimitedConn, SendError> {
        let mut connector = connector.clone();
        tower::Service::call(&mut connector, uri.clone())
            .await
            .map_err(|source| SendError::Connect {
                target: target(uri),
                source,
            })
    }
}

/// Runs a new upstream connection's I/O in a task of its own until it closes.
fn drive<F, E>(uri: &Uri, connection: F)
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let target = target(uri);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%target, %error, "upstream connection ended with an error");
        }
    });
}

/// Makes hyper's error on the connection to `uri` a [`SendError::Request`].
fn request_failed(uri: &Uri) -> impl FnOnce(hyper::Error) -> SendError + '_ {
    move |source| SendError::Request {
        target: target(uri),
        source: source.into(),
    }
}

/// The authority of `uri`, for errors and logs.
fn target(uri: &Uri) -> Authority {
    uri.authority()
        .cloned()
        .unwrap_or_else(|| Authority::from_static("unknown"))
}

/// An HTTP/1.1 request as it goes on the wire: `Host` from the URI unless the client
/// sent one, and the target in origin form (authority form for `CONNECT`).
fn prepare_h1(req: &mut Request<ProxyBody>) {
    if !req.headers().contains_key(HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(HOST, host);
    }
    let connect = req.method() == Method::CONNECT;
    let uri = req.uri_mut();
    *uri = match (connect, uri.authority(), uri.path_and_query()) {
        (true, Some(authority), _) => Uri::from(authority.clone()),
        (false, _, Some(path)) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::default(),
    };
}

/// An upstream response body that returns its HTTP/1.1 connection to the pool as soon
/// as it ends (dropped before its end, the connection is closed).
#[derive(Debug)]
pub struct Leased {
    body: Received,
    lease: Option<Lease>,
}

/// A response body as one of the clients received it.
#[derive(Debug)]
enum Received {
    /// Over HTTP/1.1 (hyper).
    H1(Incoming),
    /// Over HTTP/2 (h2).
    H2(http2::ResponseBody),
}

impl Leased {
    fn new(body: Received, lease: Option<Lease>) -> Self {
        let mut leased = Leased { body, lease };
        if leased.is_end_stream() {
            leased.release();
        }
        leased
    }

    fn release(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Body for Leased {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.body {
            Received::H1(body) => std::task::ready!(Pin::new(body).poll_frame(cx))
                .map(|frame| frame.map_err(BoxError::from)),
            Received::H2(body) => std::task::ready!(Pin::new(body).poll_frame(cx))
                .map(|frame| frame.map_err(BoxError::from)),
        };
        match &frame {
            Some(Ok(_)) if !this.is_end_stream() => {}
            // The end, or its last frame: the connection can take the next request.
            None | Some(Ok(_)) => this.release(),
            // A broken response: the connection goes with it.
            Some(Err(_)) => drop(this.lease.take()),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Received::H1(body) => body.is_end_stream(),
            Received::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Received::H1(body) => body.size_hint(),
            Received::H2(body) => body.size_hint(),
        }
    }
}

/// Clients to destinations outside the mesh (passthrough), one pool per authority
/// (looked up per request: traffic without policy, where the mesh knows no endpoints).
#[derive(Debug)]
pub struct Passthrough {
    upstream: Upstream,
    pools: Mutex<HashMap<Authority, Arc<Pool>>>,
}

/// Pools kept for passthrough authorities before unused ones are dropped.
const PASSTHROUGH_POOLS: usize = 256;

impl Passthrough {
    /// Plaintext clients that connect within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            upstream: Upstream::new(connect_timeout, None),
            pools: Mutex::default(),
        }
    }

    /// Sends `req` to the authority its URI names.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        http2: bool,
    ) -> Result<Response<Leased>, SendError> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(SendError::NoAuthority(req.uri().clone()));
        };
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            if pools.len() >= PASSTHROUGH_POOLS && !pools.contains_key(&authority) {
                // Forget the pools with nothing open and nobody using them.
                pools.retain(|_, p| Arc::strong_count(p) > 1 || p.idle_count() > 0);
            }
            Arc::clone(pools.entry(authority).or_default())
        };
        self.upstream.send(&pool, req, http2).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::full;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A loopback listener that hands each connection to `serve`; counts the
    /// connections it accepted.
    async fn listen<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (addr, accepted)
    }

    /// A loopback HTTP/1.1 and HTTP/2 server answering `ok` after `delay`; counts the
    /// connections it accepted.
    async fn server(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        listen(move |tcp| async move {
            let svc = service_fn(move |_req| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::convert::Infallible>(Response::new(full("ok")))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        })
        .await
    }

    /// A [`server`] answering after `delay`, plaintext clients to it and an empty pool.
    async fn setup(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>, Upstream, Arc<Pool>) {
        let (addr, accepted) = server(delay).await;
        let upstream = Upstream::new(Duration::from_secs(1), None);
        (addr, accepted, upstream, Arc::new(Pool::new()))
    }

    fn get(addr: SocketAddr) -> Request<ProxyBody> {
        Request::get(format!("http://{addr}/hello"))
            .body(full(""))
            .unwrap()
    }

    async fn send(upstream: &Upstream, pool: &Arc<Pool>, addr: SocketAddr, h2: bool) -> String {
        let rsp = upstream.send(pool, get(addr), h2).await.unwrap();
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Waits (briefly, on the real clock: sockets are involved) until `f` holds.
    async fn eventually(f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("condition never held");
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted, upstream, pool) = setup(Duration::ZERO).await;
        for _ in 0..5 {
            assert_eq!(send(&upstream, &pool, addr, false).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(pool.in_use(), 0);
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted, upstream, pool) = setup(Duration::ZERO).await;
        // The body is never read: the connection cannot be reused.
        let rsp = upstream.send(&pool, get(addr), false).await.unwrap();
        assert_eq!(pool.in_use(), 1);
        drop(rsp);
        assert_eq!((pool.in_use(), pool.idle_count()), (0, 0));
        assert_eq!(send(&upstream, &pool, addr, false).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let (addr, accepted, upstream, pool) = setup(Duration::from_millis(20)).await;
        let all = futures::future::join_all((0..8).map(|_| send(&upstream, &pool, addr, true)));
        assert!(all.await.iter().all(|b| b == "ok"));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_http2_connection_the_server_shut_down_is_replaced() {
        // A server that shuts each connection down gracefully (GOAWAY) after its first
        // request, as a rolling restart does.
        let (addr, accepted) = listen(|tcp| async move {
            let (served_tx, served) = tokio::sync::oneshot::channel::<()>();
            let served_tx = Mutex::new(Some(served_tx));
            let svc = service_fn(move |_req| {
                if let Some(tx) = served_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                async { Ok::<_, std::convert::Infallible>(Response::new(full("ok"))) }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = served => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        })
        .await;
        let upstream = Upstream::new(Duration::from_secs(1), None);
        let pool = Arc::new(Pool::new());
        assert_eq!(send(&upstream, &pool, addr, true).await, "ok");
        eventually(|| pool.h2().is_none()).await;
        assert_eq!(send(&upstream, &pool, addr, true).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_not_used() {
        // A server that answers one request per connection and then closes it, without
        // saying so in the response (as a keep-alive timeout does).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                drop(tcp);
            }
        });
        let upstream = Upstream::new(Duration::from_secs(1), None);
        let pool = Arc::new(Pool::new());
        assert_eq!(send(&upstream, &pool, addr, false).await, "ok");
        // Back in the pool until its connection task reads the close.
        eventually(|| pool.idle_count() == 0 || pool.checkout_would_skip()).await;
        assert_eq!(send(&upstream, &pool, addr, false).await, "ok");
    }

    #[tokio::test]
    async fn a_request_waiting_on_the_connection_limit_takes_a_returned_connection() {
        let (addr, accepted) = server(Duration::from_millis(50)).await;
        let limit = Arc::new(Semaphore::new(1));
        let upstream = Upstream::new(Duration::from_secs(1), Some(limit));
        let pool = Arc::new(Pool::new());
        let (a, b) = tokio::join!(
            send(&upstream, &pool, addr, false),
            send(&upstream, &pool, addr, false)
        );
        assert_eq!((a.as_str(), b.as_str()), ("ok", "ok"));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_reset_pool_closes_idle_connections_and_does_not_take_back_leased_ones() {
        let (addr, accepted, upstream, pool) = setup(Duration::ZERO).await;
        assert_eq!(send(&upstream, &pool, addr, false).await, "ok");
        let leased = upstream.send(&pool, get(addr), false).await.unwrap();
        pool.reset();
        assert_eq!(pool.idle_count(), 0);
        leased.into_body().collect().await.unwrap();
        assert_eq!(
            pool.idle_count(),
            0,
            "made before the reset: not taken back"
        );
        assert_eq!(send(&upstream, &pool, addr, false).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_burst_s_connections_are_closed_over_the_purge_intervals_after_it() {
        let (addr, accepted, upstream, pool) = setup(Duration::from_millis(50)).await;
        let burst = futures::future::join_all((0..8).map(|_| send(&upstream, &pool, addr, false)));
        assert!(burst.await.iter().all(|b| b == "ok"));
        assert_eq!(accepted.load(Ordering::SeqCst), 8);
        eventually(|| pool.idle_count() == 8).await;
        // The interval of the burst used all 8: they stay.
        pool.purge();
        assert_eq!(pool.idle_count(), 8);
        // Then, with nothing used, half of them per interval.
        let mut left = Vec::new();
        for _ in 0..4 {
            pool.purge();
            left.push(pool.idle_count());
        }
        assert_eq!(left, [4, 2, 1, 0]);
    }

    #[tokio::test]
    async fn steady_use_keeps_its_connection_and_disuse_closes_it() {
        let (addr, _, upstream, pool) = setup(Duration::ZERO).await;
        let intervals = (super::super::pool::IDLE_TIMEOUT.as_secs()
            / super::super::pool::PURGE_INTERVAL.as_secs()) as usize;
        for _ in 0..intervals * 2 {
            assert_eq!(send(&upstream, &pool, addr, false).await, "ok");
            pool.purge();
            assert_eq!(pool.idle_count(), 1, "one used per interval: kept");
        }
        // Unused, it is first kept (the last interval used it), then closed.
        pool.purge();
        pool.purge();
        assert_eq!(pool.idle_count(), 0);
    }
}
