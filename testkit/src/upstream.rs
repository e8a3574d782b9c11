//! The test upstream: a real HTTP/1.1 and HTTP/2 (prior knowledge) server whose
//! answers are set by [`Knobs`]: failure ratio, latency, hanging, resets, gRPC status.
//!
//! The e2e tests run it in-process; the demo runs it as the `bulwark-upstream`
//! binary and turns its knobs over HTTP:
//!
//! - `GET /_upstream/stats`: [`Stats`] as JSON;
//! - `GET /_upstream/knobs`: the current [`Knobs`] as JSON;
//! - `PUT /_upstream/knobs`: replace the knobs (JSON [`Knobs`], durations in ms).
//!
//! Control requests are never subject to the knobs and never counted. Every other
//! request is answered with `x-upstream: <name>` and a JSON [`Reply`].

mod knobs;
mod reply;
mod stats;

use std::convert::Infallible;
use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::{JoinHandle, JoinSet};

pub use knobs::{InvalidKnobs, Knobs};
pub use reply::{Reply, ReplyBody};
pub use stats::Stats;

use crate::grpc;
use stats::Counters;

/// The header every answer of a test upstream carries, with the upstream's name.
pub const UPSTREAM_HEADER: &str = "x-upstream";

/// The largest control request body accepted (`PUT /_upstream/knobs`).
const MAX_CONTROL_BODY: usize = 64 * 1024;

/// How long to pause accepting after an error such as "too many open files",
/// so that a full file table does not turn the accept loop into a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A running test upstream. Dropping it stops it too, without waiting.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// State shared by the accept loop, every connection and the [`Upstream`] handle.
#[derive(Debug)]
struct Shared {
    name: HeaderValue,
    name_text: String,
    // Knobs and the seeded draw sequence change together (setting knobs
    // restarts the sequence), so one short lock covers both; it is never held
    // across an await.
    knobs: Mutex<KnobState>,
    counters: Counters,
}

#[derive(Debug)]
struct KnobState {
    knobs: Knobs,
    rng: fastrand::Rng,
}

/// What one request gets, drawn under the knob lock and acted on without it.
struct Decision {
    reset: bool,
    hang: bool,
    latency: Duration,
    fail: bool,
    fail_status: u16,
    grpc_status: Option<u32>,
}

impl Upstream {
    /// Binds `addr` (port 0 picks a free port) and starts serving as `name`.
    ///
    /// Fails if the address cannot be bound, or with `InvalidInput` if the knobs are invalid.
    pub async fn start(addr: SocketAddr, name: &str, knobs: Knobs) -> io::Result<Upstream> {
        knobs
            .validate()
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let name_header = HeaderValue::from_str(name).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("upstream name {name:?} must be usable as an HTTP header value"),
            )
        })?;
        let listener = TcpListener::bind(addr).await.map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("test upstream {name}: cannot listen on {addr}: {err} (is the address in use or not local?)"),
            )
        })?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name_header,
            name_text: name.to_owned(),
            knobs: Mutex::new(KnobState {
                rng: fastrand::Rng::with_seed(knobs.seed),
                knobs,
            }),
            counters: Counters::default(),
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped));
        tracing::debug!(upstream = %name, %addr, "test upstream listening");
        Ok(Upstream {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The address the upstream listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream's name, as sent in `x-upstream`.
    pub fn name(&self) -> &str {
        &self.shared.name_text
    }

    /// The knobs in force.
    pub fn knobs(&self) -> Knobs {
        self.shared.lock_knobs().knobs.clone()
    }

    /// Replaces the knobs; requests already past their decision are not affected.
    ///
    /// # Panics
    ///
    /// If the knobs are invalid ([`Knobs::validate`]): that is a bug in the test.
    pub fn set_knobs(&self, knobs: Knobs) {
        if let Err(err) = knobs.validate() {
            panic!("invalid knobs for test upstream {}: {err}", self.name());
        }
        self.shared.set_knobs(knobs);
    }

    /// A copy of the upstream's counters.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, closes every connection (requests in flight see a reset),
    /// and returns once the address is free again.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// === impl Shared ===

impl Shared {
    fn lock_knobs(&self) -> std::sync::MutexGuard<'_, KnobState> {
        // A panic while holding this lock cannot leave the knobs half-written.
        self.knobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_knobs(&self, knobs: Knobs) {
        tracing::info!(upstream = %self.name_text, ?knobs, "test upstream knobs changed");
        let mut state = self.lock_knobs();
        state.rng = fastrand::Rng::with_seed(knobs.seed);
        state.knobs = knobs;
    }

    fn decide(&self) -> Decision {
        let mut state = self.lock_knobs();
        // One draw per request whatever the knobs, so that the sequence of
        // failures depends only on the seed and the order of requests.
        let draw = state.rng.f64();
        let knobs = &state.knobs;
        Decision {
            reset: knobs.reset,
            hang: knobs.hang,
            latency: knobs.latency,
            fail: draw < knobs.fail_ratio,
            fail_status: knobs.fail_status,
            grpc_status: knobs.grpc_status,
        }
    }
}

// === serving ===

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, peer, Arc::clone(&shared)));
                }
                Err(err) => {
                    tracing::warn!(upstream = %shared.name_text, error = %err, "test upstream: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Lets a request ask for its connection to be reset.
#[derive(Debug, Default)]
struct ConnectionControl {
    reset: AtomicBool,
    reset_requested: Notify,
}

impl ConnectionControl {
    fn request_reset(&self) {
        self.reset.store(true, Ordering::Release);
        // notify_one keeps a permit if the connection task is not waiting yet.
        self.reset_requested.notify_one();
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let control = Arc::new(ConnectionControl::default());
    let io = TokioIo::new(ResettableStream {
        inner: stream,
        control: Arc::clone(&control),
    });
    let service = {
        let control = Arc::clone(&control);
        service_fn(move |request| handle(Arc::clone(&shared), Arc::clone(&control), request))
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(io, service);
    tokio::select! {
        result = connection => {
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "test upstream: connection ended with an error");
            }
        }
        // Dropping the connection drops the stream, which resets it.
        () = control.reset_requested.notified() => {}
    }
}

/// A TCP stream that is reset (`SO_LINGER` 0) rather than closed when dropped
/// after a request asked for a reset.
struct ResettableStream {
    inner: TcpStream,
    control: Arc<ConnectionControl>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.control.reset.load(Ordering::Acquire) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn handle(
    shared: Arc<Shared>,
    control: Arc<ConnectionControl>,
    request: Request<Incoming>,
) -> Result<Response<ReplyBody>, Infallible> {
    if request.uri().path().starts_with("/_upstream/") {
        let mut response = handle_control(&shared, request).await;
        response
            .headers_mut()
            .insert(UPSTREAM_HEADER, shared.name.clone());
        return Ok(response);
    }

    let _in_flight = shared.counters.begin(request.method());
    let (parts, body) = request.into_parts();
    // Read the whole body first: the reply reports its length, and a hanging
    // request must be one the client has finished sending.
    let body_len = match body.collect().await {
        Ok(collected) => collected.to_bytes().len() as u64,
        Err(err) => {
            tracing::debug!(upstream = %shared.name_text, error = %err, "test upstream: reading a request body failed");
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                "request body could not be read\n",
            ));
        }
    };

    let decision = shared.decide();
    if decision.reset {
        shared.counters.reset();
        control.request_reset();
        // The connection task drops this future when it resets the connection.
        return pending().await;
    }
    if decision.hang {
        // Hyper drops this future when the client goes away.
        return pending().await;
    }
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }

    let is_grpc = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(grpc::is_grpc);
    let grpc_status = match decision.grpc_status {
        Some(code) => code,
        None if decision.fail => grpc::UNAVAILABLE,
        None => grpc::OK,
    };
    let failed = if is_grpc {
        grpc_status != grpc::OK
    } else {
        decision.fail
    };
    if failed {
        shared.counters.failure();
    }

    let reply = Reply {
        name: shared.name_text.clone(),
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        tenant_id: header_text(&parts.headers, "x-tenant-id"),
        traceparent: header_text(&parts.headers, "traceparent"),
        forwarded_for: header_text(&parts.headers, "x-forwarded-for"),
        body_len,
        failed,
    };
    let json = serde_json::to_vec(&reply).unwrap_or_default();

    let mut response = if is_grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(grpc_status));
        if grpc_status != grpc::OK {
            trailers.insert(
                "grpc-message",
                HeaderValue::from_static("failure injected by bulwark-upstream"),
            );
        }
        let mut response = Response::new(ReplyBody::with_trailers(grpc::frame(&json), trailers));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(grpc::CONTENT_TYPE));
        response
    } else {
        let status = if decision.fail {
            // Validated when the knobs were set.
            StatusCode::from_u16(decision.fail_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
        } else {
            StatusCode::OK
        };
        let mut response = Response::new(ReplyBody::new(json));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    };
    response
        .headers_mut()
        .insert(UPSTREAM_HEADER, shared.name.clone());
    Ok(response)
}

async fn handle_control(shared: &Shared, request: Request<Incoming>) -> Response<ReplyBody> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/_upstream/stats") => json(StatusCode::OK, &shared.counters.snapshot()),
        (&Method::GET, "/_upstream/knobs") => json(StatusCode::OK, &shared.lock_knobs().knobs),
        (&Method::PUT, "/_upstream/knobs") => {
            let body = match Limited::new(request.into_body(), MAX_CONTROL_BODY)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(err) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "knobs: reading the body failed: {err} (at most {MAX_CONTROL_BODY} bytes)\n"
                        ),
                    );
                }
            };
            let knobs: Knobs = match serde_json::from_slice(&body) {
                Ok(knobs) => knobs,
                Err(err) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "knobs: invalid JSON: {err}; expected fields fail_ratio, fail_status, latency_ms, hang, reset, grpc_status, seed\n"
                        ),
                    );
                }
            };
            if let Err(err) = knobs.validate() {
                return plain(StatusCode::BAD_REQUEST, format!("knobs: {err}\n"));
            }
            shared.set_knobs(knobs.clone());
            json(StatusCode::OK, &knobs)
        }
        (_, "/_upstream/stats" | "/_upstream/knobs") => {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "unknown control path: use GET /_upstream/stats, GET or PUT /_upstream/knobs\n",
        ),
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<ReplyBody> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(ReplyBody::new(body));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(err) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding JSON failed: {err}\n"),
        ),
    }
}

fn plain(status: StatusCode, text: impl Into<Bytes>) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody::new(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests;
