//! The load generator: open-loop at a fixed rate, free of coordinated omission (each
//! request's latency runs from the time it was due, not from when a connection was free
//! to send it), and closed-loop at saturation for the maximum throughput. HTTP/1.1 with
//! keep-alive connections, or HTTP/2 (h2c prior knowledge) with gRPC-like unary calls.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

use crate::upstream::BODY_SIZE;

/// Longest latency the histograms hold; anything slower is recorded as this.
const MAX_LATENCY: Duration = Duration::from_secs(60);
/// HTTP/1.1 connections an open-loop run may open at most (one request in flight each).
const MAX_H1_CONNECTIONS: usize = 512;
/// HTTP/1.1 connections opened before a run, so the first requests do not pay a connect.
const PREOPENED: usize = 4;
/// How long after the last due time a run waits for stragglers before counting them lost.
const DRAIN: Duration = Duration::from_secs(10);

/// The wire protocol of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 `GET /` (or the client's method) on keep-alive connections.
    Http1,
    /// HTTP/2 prior knowledge, a gRPC-like unary `POST` with a small framed body.
    Http2,
}

impl Protocol {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::Http2 => "HTTP/2 (gRPC-like)",
        }
    }
}

/// Where the requests go.
#[derive(Clone, Debug)]
pub struct Target {
    /// The address connected to (the upstream or a proxy).
    pub addr: SocketAddr,
    /// The Host / `:authority` of every request (the agent routes on it).
    pub authority: String,
    /// The protocol.
    pub protocol: Protocol,
}

/// What went wrong with one request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The TCP connect failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// HTTP failed (handshake, send or body).
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// A request could not be built (a bad authority).
    #[error("bad request: {0}")]
    Build(#[from] http::Error),
    /// The answer was not 200 with the 1 KiB body.
    #[error("unexpected answer: status {status}, {len} body bytes")]
    Unexpected {
        /// The status.
        status: u16,
        /// The body length.
        len: usize,
    },
}

/// A client for one target: pooled HTTP/1.1 connections, or a few shared HTTP/2 ones.
#[derive(Debug)]
pub struct Client {
    target: Target,
    method: Method,
    h1_idle: Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
    h1_slots: Semaphore,
    h2: Vec<http2::SendRequest<Full<Bytes>>>,
    next_h2: AtomicUsize,
    opened: AtomicUsize,
}

impl Client {
    /// Connects to `target`: `h2_connections` HTTP/2 connections, or a few HTTP/1.1 ones
    /// opened ahead (more are opened on demand).
    pub async fn connect(target: Target, h2_connections: usize) -> Result<Client, RequestError> {
        let mut client = Client {
            method: Method::GET,
            h1_idle: Mutex::new(Vec::new()),
            h1_slots: Semaphore::new(MAX_H1_CONNECTIONS),
            h2: Vec::new(),
            next_h2: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            target,
        };
        match client.target.protocol {
            Protocol::Http1 => {
                for _ in 0..PREOPENED {
                    let conn = client.open_h1().await?;
                    client.idle().push(conn);
                }
            }
            Protocol::Http2 => {
                for _ in 0..h2_connections.max(1) {
                    let stream = client.tcp().await?;
                    let (send, conn) =
                        http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
                    tokio::spawn(conn);
                    client.h2.push(send);
                }
            }
        }
        Ok(client)
    }

    /// The same client sending HTTP/1.1 requests with `method` (GET by default), e.g.
    /// POST for requests a proxy must not retry.
    pub fn with_method(mut self, method: Method) -> Client {
        self.method = method;
        self
    }

    /// TCP connections opened so far.
    pub fn connections(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    async fn tcp(&self) -> Result<TcpStream, RequestError> {
        let addr = self.target.addr;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| RequestError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    async fn open_h1(&self) -> Result<http1::SendRequest<Full<Bytes>>, RequestError> {
        let stream = self.tcp().await?;
        let (send, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(send)
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<http1::SendRequest<Full<Bytes>>>> {
        self.h1_idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one request and reads the whole answer, which must be 200 with 1 KiB.
    pub async fn request(&self) -> Result<(), RequestError> {
        let rsp = match self.target.protocol {
            Protocol::Http1 => {
                // One request in flight per connection: wait for a slot, reuse an idle
                // connection or open one.
                let _slot = self.h1_slots.acquire().await;
                let idle = self.idle().pop();
                let mut send = match idle {
                    Some(send) if !send.is_closed() => send,
                    _ => self.open_h1().await?,
                };
                send.ready().await?;
                let req = Request::builder()
                    .method(self.method.clone())
                    .uri("/")
                    .header(http::header::HOST, &self.target.authority)
                    .body(Full::new(Bytes::new()))?;
                let rsp = send.send_request(req).await?;
                let (parts, body) = rsp.into_parts();
                let body = body.collect().await?.to_bytes();
                self.idle().push(send);
                (parts.status, body)
            }
            Protocol::Http2 => {
                let n = self.next_h2.fetch_add(1, Ordering::Relaxed) % self.h2.len();
                let mut send = self.h2[n].clone();
                send.ready().await?;
                // A gRPC frame: no compression, 16 bytes of message.
                let mut frame = vec![0u8, 0, 0, 0, 16];
                frame.extend_from_slice(&[7u8; 16]);
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(format!(
                        "http://{}/bench.Bench/Unary",
                        self.target.authority
                    ))
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers")
                    .body(Full::new(Bytes::from(frame)))?;
                let rsp = send.send_request(req).await?;
                let (parts, body) = rsp.into_parts();
                (parts.status, body.collect().await?.to_bytes())
            }
        };
        let (status, body) = rsp;
        if status != http::StatusCode::OK || body.len() != BODY_SIZE {
            return Err(RequestError::Unexpected {
                status: status.as_u16(),
                len: body.len(),
            });
        }
        Ok(())
    }
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct Run {
    /// Requests answered 200 with the full body.
    pub ok: u64,
    /// Requests that failed, or never finished before the drain deadline.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Latencies of the successful requests, in nanoseconds: from the due time in an
    /// open-loop run, from the send in a closed-loop run.
    pub latency: Histogram<u64>,
}

impl Run {
    /// Successful requests per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at `quantile` (0..1).
    pub fn quantile(&self, quantile: f64) -> Duration {
        Duration::from_nanos(self.latency.value_at_quantile(quantile))
    }

    /// Adds `other` (another round of the same workload) to this run: counts, wall time
    /// and latencies.
    pub fn absorb(&mut self, other: Run) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.elapsed += other.elapsed;
        let _ = self.latency.add(&other.latency);
    }
}

/// An empty latency histogram (nanoseconds, 1 µs to 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, MAX_LATENCY.as_nanos() as u64, 3)
        .expect("the histogram bounds are valid")
}

/// Records `latency` (below 1 µs counts as 1 µs; beyond the bounds as the longest).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    histogram.saturating_record((latency.as_nanos() as u64).max(1_000));
}

/// One finished request of an open-loop run (errors as text, whatever the work).
type Outcome = Result<Duration, String>;

/// Sends `rate` requests per second for `duration`, each due at its own time on a fixed
/// schedule whatever happened to the earlier ones. A dedicated thread keeps the schedule
/// (tokio's timer wheel ticks in milliseconds, too coarse at 5,000/s); each request runs
/// as its own task, and its latency is measured from its due time, so time spent waiting
/// for a connection or behind a slow request counts.
pub async fn open_loop(client: Arc<Client>, rate: u32, duration: Duration) -> Run {
    open_loop_with(rate, duration, move || request(Arc::clone(&client))).await
}

/// One request of `client`, its error as text (the unit of work of the HTTP runs).
async fn request(client: Arc<Client>) -> Result<(), String> {
    client.request().await.map_err(|e| e.to_string())
}

/// [`open_loop`] for any unit of work `work` (a request, a whole connection, ...): `rate`
/// calls per second for `duration`, each latency measured from its due time.
pub async fn open_loop_with<W, F>(rate: u32, duration: Duration, work: W) -> Run
where
    W: Fn() -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let total = (u128::from(rate) * duration.as_millis() / 1_000) as u64;
    let interval = Duration::from_secs(1) / rate.max(1);
    let handle = tokio::runtime::Handle::current();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let start = Instant::now() + Duration::from_millis(10);
    let dispatcher = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval * (i as u32);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let task = work();
            let tx = tx.clone();
            handle.spawn(async move {
                let outcome = task.await.map(|()| due.elapsed());
                let _ = tx.send(outcome);
            });
        }
    });
    let mut run = Run {
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latency: histogram(),
    };
    let deadline = start + duration + DRAIN;
    let mut received = 0;
    while received < total {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(outcome)) => {
                received += 1;
                match outcome {
                    Ok(latency) => {
                        run.ok += 1;
                        record(&mut run.latency, latency);
                    }
                    Err(error) => {
                        run.errors += 1;
                        run.first_error.get_or_insert(error);
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    run.errors += total - received;
    run.elapsed = start.elapsed().min(duration + DRAIN);
    let _ = tokio::task::spawn_blocking(move || dispatcher.join()).await;
    run
}

/// Keeps `concurrency` requests in flight for `duration` (closed loop): the most the
/// target can answer per second.
pub async fn saturate(client: Arc<Client>, concurrency: usize, duration: Duration) -> Run {
    saturate_with(concurrency, duration, move || request(Arc::clone(&client))).await
}

/// [`saturate`] for any unit of work `work`: `concurrency` calls in flight for `duration`.
pub async fn saturate_with<W, F>(concurrency: usize, duration: Duration, work: W) -> Run
where
    W: Fn() -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let work = Arc::new(work);
    let start = Instant::now();
    let end = start + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let work = Arc::clone(&work);
        workers.push(tokio::spawn(async move {
            let mut latency = histogram();
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < end {
                let sent = Instant::now();
                match work().await {
                    Ok(()) => record(&mut latency, sent.elapsed()),
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert(error);
                        // A broken path must not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (latency, errors, first_error)
        }));
    }
    let mut run = Run {
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latency: histogram(),
    };
    for worker in workers {
        if let Ok((latency, errors, first_error)) = worker.await {
            let _ = run.latency.add(&latency);
            run.errors += errors;
            if run.first_error.is_none() {
                run.first_error = first_error;
            }
        }
    }
    run.ok = run.latency.len();
    run.elapsed = start.elapsed();
    run
}
