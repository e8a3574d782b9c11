//! The accept loop every listener shares, and HTTP serving of one connection:
//! HTTP/1.1 and HTTP/2 (prior knowledge) on one port, graceful drain on shutdown, and
//! the [`Limits`] every listener holds its clients to (see [`super::guard`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::guard::{ConnState, ConnectionLimit, Guarded, Timeouts, Tracked};
use super::{ProxyBody, full};
use crate::limits::{HTTP2_MAX_LOCAL_ERROR_RESETS, Limits, ListenerCounters};
use crate::reason;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What one listener holds its connections to, and the counters that show it.
#[derive(Clone, Debug)]
pub struct ListenerOptions {
    /// The limits.
    pub limits: Limits,
    /// The listener's counters (its name is their `listener` label).
    pub counters: Arc<ListenerCounters>,
}

/// Serves HTTP on accepted connections; each connection it serves is drained on shutdown.
pub struct Conn {
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    timeouts: Timeouts,
    counters: Arc<ListenerCounters>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("listener", &self.counters.listener)
            .finish()
    }
}

/// hyper's server for one listener: HTTP/1.1 buffers no larger than a request head
/// may be, HTTP/2 streams and header lists bounded, resets before accept bounded
/// (rapid reset); a CONTINUATION flood is bounded by the header list size (h2 counts
/// CONTINUATION frames against it and answers GOAWAY `ENHANCE_YOUR_CALM`).
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(limits.http1_max_buffer())
        // The guard's header-read timeout replaces hyper's (see `guard`).
        .header_read_timeout(None);
    builder
        .http2()
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(limits.http2_max_header_list_size())
        .max_pending_accept_reset_streams(limits.http2_max_pending_resets)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS);
    builder
}

/// The answer to a request head carrying both `Content-Length` and
/// `Transfer-Encoding`: 400, and the connection closes after it.
fn smuggling_refused() -> Response<ProxyBody> {
    let mut rsp = Response::new(full(format!("{}\n", reason::BAD_REQUEST)));
    *rsp.status_mut() = StatusCode::BAD_REQUEST;
    let headers = rsp.headers_mut();
    headers.insert(
        reason::REASON_HEADER,
        HeaderValue::from_static(reason::BAD_REQUEST),
    );
    headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    rsp
}

/// The HTTP/2 error code of a connection hyper ended with a GOAWAY of its own (the
/// client broke a limit or the protocol), e.g. `enhance-your-calm`.
fn http2_goaway(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_library())
                .then(|| h2.reason())
                .flatten()
                .map(|r| format!("{r:?}").to_ascii_lowercase().replace('_', "-"));
        }
        source = e.source();
    }
    None
}

impl Conn {
    /// Serves HTTP/1.1 or HTTP/2 on `io` with `handler` until the connection ends.
    pub async fn serve_http<I, H, F>(self, io: I, peer: SocketAddr, handler: H)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let state = Arc::new(ConnState::default());
        let io = Guarded::new(
            io,
            Arc::clone(&state),
            self.timeouts,
            Arc::clone(&self.counters),
        );
        let counters = Arc::clone(&self.counters);
        let svc = service_fn(move |req: Request<Incoming>| {
            let in_flight = state.start(req.version());
            let connect = req.method() == Method::CONNECT;
            let rsp = if state.take_cl_te() {
                counters.cl_te.inc();
                debug!(listener = counters.listener, %peer, reason = crate::limits::refused::CL_TE, "request refused: both Content-Length and Transfer-Encoding");
                None
            } else {
                Some(handler(req, peer))
            };
            async move {
                let rsp = match rsp {
                    Some(rsp) => rsp.await,
                    None => smuggling_refused(),
                };
                if connect && rsp.status().is_success()
                    || rsp.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    in_flight.upgraded();
                }
                let (head, body) = rsp.into_parts();
                Ok::<_, Infallible>(Response::from_parts(head, Tracked::new(body, in_flight)))
            }
        });
        // Upgrades are on so that CONNECT tunnels work on the outbound listener.
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        if let Err(error) = self.watcher.watch(conn).await {
            if let Some(reason) = http2_goaway(error.as_ref()) {
                self.counters.http2_goaway(&reason);
                debug!(listener = self.counters.listener, %peer, %reason, "HTTP/2 connection closed with GOAWAY");
            } else {
                debug!(listener = self.counters.listener, %peer, %error, "connection ended with an error");
            }
        }
    }
}

/// Accepts connections on `listener` and hands each to `dispatch` (in its own
/// task) until `shutdown` turns true, then waits up to `drain` for the HTTP
/// connections to finish their requests. Beyond the listener's connection limit a
/// new connection is closed as soon as accepted (and counted): accepting it keeps the
/// kernel's backlog from filling with clients that would only time out.
pub async fn serve_connections<D, F>(
    listener: TcpListener,
    options: ListenerOptions,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    dispatch: D,
) where
    D: Fn(TcpStream, SocketAddr, Conn) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let name = options.counters.listener;
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder(&options.limits));
    let limit = ConnectionLimit::new(
        options.limits.max_connections,
        options.counters.open.clone(),
    );
    let timeouts = Timeouts {
        header: options.limits.header_read_timeout,
        idle: options.limits.idle_timeout,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d;
                    // policy (rate limit keys, X-Forwarded-For) wants a.b.c.d.
                    Ok((stream, peer)) => (stream, SocketAddr::new(peer.ip().to_canonical(), peer.port())),
                    Err(error) => {
                        warn!(listener = name, %error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                let Some(permit) = limit.try_acquire() else {
                    options.counters.refused.inc();
                    debug!(listener = name, %peer, limit = ?options.limits.max_connections, "connection refused: the listener is at its limit");
                    drop(stream);
                    continue;
                };
                if let Err(error) = stream.set_nodelay(true) {
                    debug!(listener = name, %error, "cannot set TCP_NODELAY");
                }
                let conn = Conn {
                    builder: Arc::clone(&builder),
                    watcher: graceful.watcher(),
                    timeouts,
                    counters: Arc::clone(&options.counters),
                };
                let served = dispatch(stream, peer, conn);
                tokio::spawn(async move {
                    served.await;
                    drop(permit);
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        info!(
            listener = name,
            ?drain,
            "drain timed out; closing remaining connections"
        );
    }
}

/// Serves HTTP with `handler` on every connection of `listener` (see [`serve_connections`]).
pub async fn serve<H, F>(
    listener: TcpListener,
    options: ListenerOptions,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    serve_connections(
        listener,
        options,
        shutdown,
        drain,
        move |stream, peer, conn| conn.serve_http(stream, peer, handler.clone()),
    )
    .await;
}
