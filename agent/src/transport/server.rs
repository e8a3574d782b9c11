//! The accept loop every listener shares, and HTTP serving of one connection:
//! HTTP/1.1 and HTTP/2 (prior knowledge) on one port, graceful drain on shutdown, and
//! the [`Limits`] every listener holds its clients to (see [`super::guard`]).
//!
//! An idle HTTP/1.1 connection costs only its socket. hyper keeps a connection's state
//! for as long as it serves it: an 8 KiB write buffer, a read buffer of 8-16 KiB, a box
//! the size of the request future and the parsed-header cache, about 30 KiB in all,
//! whether a request is in flight or the client went quiet for a minute. So once a
//! connection has been idle for [`IDLE_RELEASE`] with no byte of a next request, the
//! serving loop closes hyper's state without closing the socket (the socket's
//! [`Guarded`] skips the shutdown) and takes the socket back; the next request's first
//! bytes start a new hyper connection with them. A busy connection (its next request
//! within the delay) never pays for this; HTTP/2 connections keep their state.
//!
//! What an idle connection keeps is then its task, tokio's registration of the socket
//! and the guard's timer: about 1.1 KiB. A task is allocated once, at the size of the
//! largest state its future can be in, so once released an HTTP/1.1 connection moves
//! to a task of its own (`serve_idle`) holding only its socket, service and listener
//! share, and the accepting task, with every step before HTTP (the TLS handshake,
//! protocol detection), ends; those steps and opaque TCP are boxed by their callers all
//! the same (`make faults`, docs/benchmarks.md).

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::guard::{ConnState, ConnectionLimit, ConnectionPermit, Guarded, Timeouts, Tracked};
use super::{ProxyBody, full};
use crate::limits::{HTTP2_MAX_LOCAL_ERROR_RESETS, Limits, ListenerCounters};
use crate::reason;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long an idle HTTP/1.1 connection keeps hyper's state before only its socket is
/// kept (see the module doc): a client's next request on a busy connection comes
/// sooner, so the hot path never pays for a new hyper connection.
pub const IDLE_RELEASE: Duration = Duration::from_millis(250);
/// What the serving loop reads of a request before hyper takes over (on the stack of
/// one poll, never kept): most request heads fit.
const FIRST_READ: usize = 2048;
/// An HTTP/2 client's connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    servers: Arc<Servers>,
    /// Changes when the listener drains; held (and counted) until the connection ends.
    drain: watch::Receiver<()>,
    counters: Arc<ListenerCounters>,
    /// The connection's place under the listener's limit, shared with the task that
    /// accepted it: an idle HTTP/1.1 connection moves to a task of its own (see
    /// [`serve_idle`]) while an opaque one never leaves the first.
    _permit: Arc<ConnectionPermit>,
}

/// hyper's HTTP/1.1 and HTTP/2 servers of one listener, and its connections' timeouts
/// (here, shared, rather than in every [`Conn`]: an idle connection keeps its `Conn`).
struct Servers {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    timeouts: Timeouts,
    /// HTTP/1.1 connections of the listener that hold hyper's state now.
    holding: AtomicUsize,
}

/// Beyond this many HTTP/1.1 connections holding hyper's state at once (each ~20 KiB of
/// buffers), a connection releases its state as soon as it goes idle rather than after
/// [`IDLE_RELEASE`]: a flood of new connections (10,000 in 0.6 s in `make faults`)
/// otherwise held ~100 MiB for that quarter second, and the allocator's bookkeeping
/// for that peak stayed after they closed.
const HOLDING_BEFORE_EAGER_RELEASE: usize = 512;

/// Counts one connection holding hyper's state until dropped.
struct Holding<'a>(&'a AtomicUsize);

impl Holding<'_> {
    /// Counts a connection in; how long it may stay idle before its state is released.
    fn start(holding: &AtomicUsize) -> (Holding<'_>, Duration) {
        let now = holding.fetch_add(1, Ordering::Relaxed) + 1;
        let release = if now > HOLDING_BEFORE_EAGER_RELEASE {
            Duration::ZERO
        } else {
            IDLE_RELEASE
        };
        (Holding(holding), release)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("listener", &self.counters.listener)
            .finish()
    }
}

/// hyper's servers for one listener: HTTP/1.1 buffers no larger than a request head
/// may be, HTTP/2 streams and header lists bounded, resets before accept bounded
/// (rapid reset); a CONTINUATION flood is bounded by the header list size (h2 counts
/// CONTINUATION frames against it and answers GOAWAY `ENHANCE_YOUR_CALM`).
fn servers(limits: &Limits) -> Servers {
    let mut h1 = http1::Builder::new();
    h1.max_buf_size(limits.http1_max_buffer())
        // The guard's header-read timeout replaces hyper's (see `guard`).
        .header_read_timeout(None);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(limits.http2_max_header_list_size())
        .max_pending_accept_reset_streams(limits.http2_max_pending_resets)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS);
    Servers {
        http1: h1,
        http2: h2,
        timeouts: Timeouts {
            header: limits.header_read_timeout,
            idle: limits.idle_timeout,
        },
        holding: AtomicUsize::new(0),
    }
}

/// Connections drained together on shutdown: each holds a receiver until it ends.
struct Drain(watch::Sender<()>);

impl Drain {
    fn new() -> Self {
        Self(watch::Sender::new(()))
    }

    fn watcher(&self) -> watch::Receiver<()> {
        self.0.subscribe()
    }

    /// Tells every connection to finish (idle ones close now, busy ones after their
    /// response) and waits until all have ended.
    async fn shutdown(self) {
        self.0.send_replace(());
        self.0.closed().await;
    }
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
    pub async fn serve_http<I, H, F>(mut self, io: I, peer: SocketAddr, handler: H)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let state = Arc::new(ConnState::default());
        let mut io = Guarded::new(
            io,
            Arc::clone(&state),
            self.servers.timeouts,
            Arc::clone(&self.counters),
        );
        let counters = Arc::clone(&self.counters);
        let svc_state = Arc::clone(&state);
        let svc = service_fn(move |req: Request<Incoming>| {
            let state = &svc_state;
            let in_flight = state.start(req.version());
            state.request_body(!http_body::Body::is_end_stream(req.body()));
            let connect = req.method() == Method::CONNECT;
            let rsp = if state.take_cl_te() {
                counters.cl_te.inc();
                debug!(listener = counters.listener, %peer, reason = crate::limits::refused::CL_TE, "request refused: both Content-Length and Transfer-Encoding");
                None
            } else {
                // Boxed once, here: hyper moves the future it gets into a box of its own
                // per request (a copy of its whole size, several KiB for a proxied
                // request's state), and keeps that box, the future's size, for as long
                // as the connection lives. A pointer is cheap to move and to keep.
                Some(Box::pin(handler(req, peer)))
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
        let Some(first) = preface(&mut io, &mut self.drain).await else {
            return;
        };
        if first.starts_with(H2_PREFACE) {
            io.replay(first);
            // Boxed, like HTTP/1.1's below: the task stays small while idle.
            let mut conn = Box::pin(self.servers.http2.serve_connection(TokioIo::new(io), svc));
            let ended = run(conn.as_mut(), &state, &mut self.drain, |c| {
                c.graceful_shutdown()
            })
            .await;
            return log_end(ended.map(|_| ()), &self.counters, peer);
        }
        let http1 = Http1 {
            conn: self,
            io,
            svc,
            state,
            peer,
        };
        // The first requests in this task; once the connection goes idle it moves to a
        // task of its own, and this one (with the steps before HTTP) ends.
        if let Some((idle, read)) = Box::pin(burst(http1, first)).await {
            tokio::spawn(serve_idle(idle, read));
        }
    }
}

/// An HTTP/1.1 connection between hyper connections: the socket (with its guard), the
/// request service and the listener's share, and nothing of hyper's.
struct Http1<I, S> {
    conn: Conn,
    io: Guarded<I>,
    svc: S,
    state: Arc<ConnState>,
    peer: SocketAddr,
}

/// Serves requests on `c` with a new hyper connection, `first` read first, until the
/// connection goes idle (`Some`: hyper's state released, the socket kept, with what
/// hyper had read of a next request) or ends (`None`).
async fn burst<I, S>(mut c: Http1<I, S>, first: Bytes) -> Option<(Http1<I, S>, Bytes)>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Tracked<ProxyBody>>,
{
    c.io.replay(first);
    let (holding, release) = Holding::start(&c.conn.servers.holding);
    c.io.release_after(Some(release));
    // Upgrades are on so that CONNECT tunnels work on the outbound listener.
    let conn = c
        .conn
        .servers
        .http1
        .serve_connection(TokioIo::new(c.io), c.svc)
        .with_upgrades();
    let mut conn = Box::pin(conn);
    match run(conn.as_mut(), &c.state, &mut c.conn.drain, |c| {
        c.graceful_shutdown()
    })
    .await
    {
        Ok(true) => {}
        ended => {
            log_end(ended.map(|_| ()), &c.conn.counters, c.peer);
            return None;
        }
    }
    // Idle: hyper's state goes, the socket stays (see the module doc).
    let parts = Pin::into_inner(conn).into_parts()?;
    drop(holding);
    c.io = parts.io.into_inner();
    c.svc = parts.service;
    c.state.released();
    Some((c, parts.read_buf))
}

/// Serves an idle HTTP/1.1 connection from its own task for as long as it lives: waits
/// for a next request holding only what [`Http1`] holds (no future of a step before
/// HTTP, no hyper state), then serves requests until it is idle again.
///
/// Not an `async fn`: one moves each argument into a local of its body, and the future
/// keeps both (the argument's slot for its whole life), doubling what an idle
/// connection costs. The block below uses the captured values in place.
#[allow(clippy::manual_async_fn)]
fn serve_idle<I, S>(mut c: Http1<I, S>, mut read: Bytes) -> impl Future<Output = ()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Tracked<ProxyBody>>,
{
    async move {
        loop {
            let first = if read.is_empty() {
                // Even empty, hyper's read buffer holds its allocation: let it go first.
                drop(std::mem::take(&mut read));
                match next_bytes(&mut c.io, &mut c.conn.drain).await {
                    Some(bytes) => bytes,
                    None => return,
                }
            } else {
                std::mem::take(&mut read)
            };
            // Boxed: the burst's frame (hyper's connection is boxed already) lives only
            // while requests come.
            match Box::pin(burst(c, first)).await {
                Some((idle, bytes)) => (c, read) = (idle, bytes),
                None => return,
            }
        }
    }
}

/// Reads a new connection's first bytes: enough to tell an HTTP/2 preface from an
/// HTTP/1.1 request. `None`: the connection ended (or the listener drains) first.
async fn preface<I: AsyncRead + Unpin>(
    io: &mut Guarded<I>,
    drain: &mut watch::Receiver<()>,
) -> Option<Bytes> {
    let mut first = next_bytes(io, drain).await?;
    while first.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&first) {
        let more = next_bytes(io, drain).await?;
        let mut joined = BytesMut::from(&first[..]);
        joined.extend_from_slice(&more);
        first = joined.freeze();
    }
    Some(first)
}

/// Waits for the next bytes from the client, holding nothing but the socket: they are
/// read into a buffer on the stack of the poll that finds them, and copied out.
/// `None`: the connection ended, failed or timed out, or the listener drains.
async fn next_bytes<I: AsyncRead + Unpin>(
    io: &mut Guarded<I>,
    drain: &mut watch::Receiver<()>,
) -> Option<Bytes> {
    let mut drained = pin!(drain.changed());
    poll_fn(|cx| {
        if drained.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut buf = ReadBuf::uninit(&mut stack);
        let read = ready!(Pin::new(&mut *io).poll_read(cx, &mut buf));
        Poll::Ready(match read {
            Ok(()) if !buf.filled().is_empty() => Some(Bytes::copy_from_slice(buf.filled())),
            _ => None,
        })
    })
    .await
}

/// Drives a hyper connection until it ends; `Ok(true)`: it ended because the socket
/// asked for its idle state to be released ([`ConnState::wants_release`]), and the
/// socket is to be taken back. On drain the connection is shut down gracefully.
async fn run<C>(
    mut conn: Pin<&mut C>,
    state: &ConnState,
    drain: &mut watch::Receiver<()>,
    shutdown: impl Fn(Pin<&mut C>),
) -> hyper::Result<bool>
where
    C: Future<Output = hyper::Result<()>>,
{
    let mut drained = pin!(drain.changed());
    let (mut draining, mut releasing) = (false, false);
    poll_fn(|cx| {
        if !draining && drained.as_mut().poll(cx).is_ready() {
            draining = true;
            shutdown(conn.as_mut());
        }
        loop {
            match conn.as_mut().poll(cx) {
                Poll::Ready(ended) => return Poll::Ready(ended.map(|()| releasing && !draining)),
                Poll::Pending
                    if !releasing
                        && !draining
                        && state.wants_release()
                        && state.in_flight() == 0 =>
                {
                    // Idle with nothing read: hyper closes its state at once, writing
                    // nothing, and (the socket skipping the shutdown) ends.
                    releasing = true;
                    shutdown(conn.as_mut());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Logs how a connection ended, counting an HTTP/2 GOAWAY of the agent's own.
fn log_end(ended: hyper::Result<()>, counters: &ListenerCounters, peer: SocketAddr) {
    let Err(error) = ended else {
        return;
    };
    if let Some(reason) = http2_goaway(&error) {
        counters.http2_goaway(&reason);
        debug!(listener = counters.listener, %peer, %reason, "HTTP/2 connection closed with GOAWAY");
    } else {
        debug!(listener = counters.listener, %peer, %error, "connection ended with an error");
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
    let graceful = Drain::new();
    let servers = Arc::new(servers(&options.limits));
    let limit = ConnectionLimit::new(
        options.limits.max_connections,
        options.counters.open.clone(),
    );
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
                let permit = Arc::new(permit);
                let conn = Conn {
                    servers: Arc::clone(&servers),
                    drain: graceful.watcher(),
                    counters: Arc::clone(&options.counters),
                    _permit: Arc::clone(&permit),
                };
                let served = dispatch(stream, peer, conn);
                // Not `async move { served.await; drop(permit) }`: an async block keeps a
                // captured future beside the copy it awaits (rustc lays the two out
                // apart), so the task would be twice the connection's state for as long
                // as the connection lives. `map` holds it once.
                tokio::spawn(served.map(move |()| drop(permit)));
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

#[cfg(test)]
mod tests {

    #[test]
    fn past_the_holding_limit_connections_release_hyper_s_state_at_once() {
        let holding = AtomicUsize::new(0);
        let mut held = Vec::new();
        for _ in 0..HOLDING_BEFORE_EAGER_RELEASE {
            let (h, release) = Holding::start(&holding);
            assert_eq!(release, IDLE_RELEASE);
            held.push(h);
        }
        let (over, release) = Holding::start(&holding);
        assert_eq!(
            release,
            Duration::ZERO,
            "one too many: released as soon as idle"
        );
        drop(over);
        held.pop();
        assert_eq!(
            holding.load(Ordering::Relaxed),
            HOLDING_BEFORE_EAGER_RELEASE - 1
        );
        let (_again, release) = Holding::start(&holding);
        assert_eq!(
            release, IDLE_RELEASE,
            "back under the limit: the usual delay"
        );
    }

    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn::{http1 as client1, http2 as client2};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;

    use super::*;

    /// A connection served by `serve_http` with a handler answering "ok", the client's
    /// end, and the listener's drain.
    fn served() -> (DuplexStream, JoinHandle<()>, Drain) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let drain = Drain::new();
        let conn = Conn {
            servers: Arc::new(servers(&Limits::default())),
            drain: drain.watcher(),
            counters: Arc::new(ListenerCounters::default()),
            _permit: Arc::new(
                ConnectionLimit::new(None, Default::default())
                    .try_acquire()
                    .expect("no limit"),
            ),
        };
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let task = tokio::spawn(conn.serve_http(server, peer, |_req, _peer| async {
            Response::new(full("ok"))
        }));
        (client, task, drain)
    }

    async fn response(client: &mut DuplexStream) -> String {
        let mut buf = vec![0u8; 1024];
        let n = client.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_connection_is_served_after_its_idle_state_is_released() {
        let (mut client, task, _drain) = served();
        for _ in 0..3 {
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .unwrap();
            let rsp = response(&mut client).await;
            assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
            assert!(rsp.ends_with("ok"), "{rsp}");
            assert!(!rsp.contains("close"), "kept alive: {rsp}");
            tokio::time::sleep(IDLE_RELEASE * 4).await;
        }
        // A head that arrives in pieces across a release is still read whole.
        client.write_all(b"GET / HT").await.unwrap();
        tokio::time::sleep(IDLE_RELEASE * 4).await;
        client
            .write_all(b"TP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert!(response(&mut client).await.starts_with("HTTP/1.1 200"));
        drop(client);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_in_its_own_task_keeps_its_place_under_the_limit() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let open = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        let limit = ConnectionLimit::new(Some(1), open.clone());
        let drain = Drain::new();
        let conn = Conn {
            servers: Arc::new(servers(&Limits::default())),
            drain: drain.watcher(),
            counters: Arc::new(ListenerCounters::default()),
            _permit: Arc::new(limit.try_acquire().expect("a free place")),
        };
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let task = tokio::spawn(conn.serve_http(server, peer, |_req, _peer| async {
            Response::new(full("ok"))
        }));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert!(response(&mut client).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(IDLE_RELEASE * 4).await;
        task.await.unwrap();
        assert_eq!(open.get(), 1, "the idle connection still holds its place");
        assert!(
            limit.try_acquire().is_none(),
            "and the limit still counts it"
        );
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert!(response(&mut client).await.starts_with("HTTP/1.1 200"));
        drop(client);
        drain.shutdown().await;
        assert_eq!(open.get(), 0, "the place frees when the connection ends");
    }

    #[tokio::test(start_paused = true)]
    async fn http2_prior_knowledge_is_served() {
        let (client, task, _drain) = served();
        let (mut send, conn) = client2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..2 {
            let req = Request::builder()
                .uri("http://a/")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let rsp = send.send_request(req).await.unwrap();
            assert_eq!(rsp.version(), http::Version::HTTP_2);
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            tokio::time::sleep(IDLE_RELEASE * 4).await;
        }
        drop(send);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_closes_a_released_connection_and_ends() {
        let (client, task, drain) = served();
        let (mut send, conn) = client1::handshake(TokioIo::new(client)).await.unwrap();
        let client_conn = tokio::spawn(conn);
        let req = Request::builder()
            .uri("/")
            .header("host", "a")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(send.send_request(req).await.unwrap().status(), 200);
        tokio::time::sleep(IDLE_RELEASE * 4).await;
        drain.shutdown().await;
        task.await.unwrap();
        client_conn.await.unwrap().unwrap();
    }
}
