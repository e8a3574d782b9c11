//! The `http1_head` target: arbitrary bytes as one client connection of the outbound
//! listener used as an HTTP proxy, through the agent's real serving: the listener's
//! [`Conn`] (hyper with the listener's limits, the [`Guarded`](crate::transport::guard)
//! socket with its head scan and timeouts, the CL + TE refusal) and the real
//! [`Outbound`] handler. The mesh has one service, `echo.fuzz:80`, whose endpoint is an
//! in-process server that reads the whole body and answers 200, so requests that name it
//! go through routing, retries (with body replay), the balancer and the pooled client;
//! every other destination is refused (no passthrough), so no input reaches the network.
//!
//! The client writes the input through a small in-memory pipe (so the agent reads it in
//! pieces), waits until the agent has done what it can, closes its side, and reads the
//! answer until the agent closes. Time is tokio's paused clock, so the agent's header-read and idle
//! timeouts end a connection left open at no real cost. The answer must be a close,
//! well-formed HTTP/1.x responses (each framed by its length, its chunks or the close),
//! or start with an HTTP/2 SETTINGS frame (for a preface); a first request head carrying
//! both `Content-Length` and `Transfer-Encoding` must be answered 400; and the
//! connection must end within [`HANG`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use bulwark_proto::v1;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};

use super::{PanicCount, duration};
use crate::config::Config;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::proxy::outbound::Outbound;
use crate::proxy::refuse::Targets;
use crate::telemetry::Propagation;
use crate::transport::protocol::H2_PREFACE;
use crate::transport::server::{Conn, ListenerOptions, serve_connections};

mod answer;

/// How long one input may take on the paused clock, from the first byte written to the
/// agent's close: longer than every timeout of the agent's (the idle timeout is 60 s).
const HANG: Duration = Duration::from_secs(120);
/// How long one input may take in real time (see [`within_hang`]).
const REAL_HANG: Duration = Duration::from_secs(2);
/// How long the client waits, on the paused clock, before closing its side.
const QUIET: Duration = Duration::from_millis(10);
/// Bytes of answer the agent may write before the client reads them.
const ANSWER_PIPE: usize = 64 * 1024;

/// The only service of the mesh.
const SERVICE: &str = "echo";
/// Its namespace, also the agent's own (so `Host: echo` names it).
const NAMESPACE: &str = "fuzz";
/// Its cluster IP (never dialled: the agent dials the endpoint).
const CLUSTER_IP: &str = "10.96.0.10";
/// Headers hyper accepts in a request head before answering 431 (its default).
const MAX_HEADERS: usize = 100;

/// The listener, the handler and the server behind them, for every input of a process.
struct Harness {
    runtime: Runtime,
    /// Connections the listener accepted, each handed over as its [`Conn`].
    conns: mpsc::UnboundedReceiver<(Conn, SocketAddr)>,
    listener: SocketAddr,
    outbound: Arc<Outbound>,
    /// Kept: the listener stops when its shutdown sender goes.
    _shutdown: watch::Sender<bool>,
}

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| Mutex::new(Harness::start()))
}

/// Serves `http1_head` on `data`; panics on a panic in the agent, a hang, or an answer
/// that is neither a close nor a well-formed response.
pub fn http1_head(data: &[u8]) {
    check_answer(data, &answer(data));
}

/// What the agent answers a client that sends `data` and closes.
fn answer(data: &[u8]) -> Vec<u8> {
    let mut harness = harness().lock().unwrap_or_else(PoisonError::into_inner);
    let panics = PanicCount::now();
    let harness = &mut *harness;
    let answer = harness.runtime.block_on(exchange(
        &mut harness.conns,
        harness.listener,
        &harness.outbound,
        data,
    ));
    panics.assert_none("the agent");
    answer
}

impl Harness {
    fn start() -> Harness {
        // The paused clock: the agent's timeouts fire as soon as every task waits, so an
        // input that leaves the connection open costs no real time.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap_or_else(|e| panic!("cannot start a runtime: {e}"));
        let (listener, outbound, conns, shutdown) = runtime.block_on(async {
            // A libFuzzer binary starts from C's main, which leaves SIGPIPE fatal (a Rust
            // main ignores it): hyper's vectored write to a socket its peer has reset then
            // kills the process without a word. tokio's handler, once installed, stays
            // for the life of the process.
            if let Err(e) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::pipe()) {
                panic!("cannot catch SIGPIPE: {e}");
            }
            let upstream = bind().await;
            let upstream_addr = local_addr(&upstream);
            tokio::spawn(serve_upstream(upstream));

            let config = Arc::new(ArcSwap::from_pointee(Config::default()));
            let metrics = Arc::new(Metrics::new(Arc::clone(&config)));
            let built = Config::build(&snapshot(upstream_addr), &Config::default(), &metrics)
                .unwrap_or_else(|e| panic!("the harness's own snapshot is invalid: {e}"));
            config.store(Arc::new(built));

            let listener = bind().await;
            let addr = local_addr(&listener);
            // An address of the agent's own that CONNECT must never reach (the admin
            // listener in a real agent); nothing listens there.
            let own = SocketAddr::from(([127, 0, 0, 1], 1));
            let outbound = Arc::new(
                Outbound::new(
                    config,
                    Arc::clone(&metrics),
                    NAMESPACE.to_owned(),
                    addr,
                    Propagation::default(),
                )
                .with_targets(Targets::new(vec![own], false)),
            );
            let (shutdown, shutdown_rx) = watch::channel(false);
            let (conns_tx, conns) = mpsc::unbounded_channel();
            let options = ListenerOptions {
                limits: Limits::default(),
                counters: Arc::new(metrics.listener("outbound")),
            };
            // The accept loop is the only maker of a `Conn`: each accepted socket is
            // dropped and its `Conn` serves the input's in-memory connection instead.
            tokio::spawn(serve_connections(
                listener,
                options,
                shutdown_rx,
                Duration::ZERO,
                move |stream, peer, conn| {
                    // Reset rather than closed: a socket this side closes first waits in
                    // TIME_WAIT, and a long run makes thousands of them a second.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                    let _ = conns_tx.send((conn, peer));
                    async {}
                },
            ));
            (addr, outbound, conns, shutdown)
        });
        Harness {
            runtime,
            conns,
            listener,
            outbound,
            _shutdown: shutdown,
        }
    }
}

/// One client connection carrying `data`: what the agent answered before it closed.
async fn exchange(
    conns: &mut mpsc::UnboundedReceiver<(Conn, SocketAddr)>,
    listener: SocketAddr,
    outbound: &Arc<Outbound>,
    data: &[u8],
) -> Vec<u8> {
    let socket = TcpStream::connect(listener)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the harness's listener: {e}"));
    let Some((conn, peer)) = conns.recv().await else {
        panic!("the harness's listener stopped");
    };
    drop(socket);
    // The client's bytes go through a small, input-dependent pipe, so that the agent
    // reads them in pieces split at varied places; the answer comes back through a wide
    // one, as through a socket's buffers (hyper gives up flushing its last response once
    // it has failed a connection, so a narrow one would cut it short).
    let (mut writer, requests) = tokio::io::duplex(1 + data.len() % 61);
    let (mut reader, answers) = tokio::io::duplex(ANSWER_PIPE);
    let outbound = Arc::clone(outbound);
    let server = tokio::io::join(requests, answers);
    let served = tokio::spawn(conn.serve_http(server, peer, move |req, peer| {
        Arc::clone(&outbound).handle(req, peer)
    }));
    let write = async {
        // The agent may close before reading everything: the write then fails.
        let _ = writer.write_all(data).await;
        // Once the agent has done all it can with the bytes (every task waits, so the
        // paused clock moves on), the client closes its side: whatever still waits for
        // more (a partial head or body, a tunnel) must end.
        tokio::time::sleep(QUIET).await;
        let _ = writer.shutdown().await;
    };
    let read = async {
        let mut answer = Vec::new();
        let _ = reader.read_to_end(&mut answer).await;
        answer
    };
    let talk = async { tokio::join!(write, read).1 };
    let answer = within_hang(talk, "the agent neither answered nor closed").await;
    match within_hang(
        served,
        "the connection was still served after the client closed",
    )
    .await
    {
        Ok(()) => answer,
        Err(join) => match join.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(join) => panic!("the connection's task failed: {join}"),
        },
    }
}

/// `future`'s output; panics with `what` when it takes longer than [`HANG`] of the
/// paused clock and [`REAL_HANG`] of real time. The paused clock alone would call a
/// loopback socket whose bytes the kernel has not delivered yet a hang, since it jumps
/// ahead whenever every task waits.
async fn within_hang<F: Future>(future: F, what: &str) -> F::Output {
    let started = std::time::Instant::now();
    let mut future = std::pin::pin!(future);
    loop {
        match tokio::time::timeout(HANG, &mut future).await {
            Ok(output) => return output,
            Err(_) if started.elapsed() < REAL_HANG => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => panic!("{what} within {HANG:?}"),
        }
    }
}

/// Panics unless `answer` is a close or well-formed responses to `data`.
fn check_answer(data: &[u8], answer: &[u8]) {
    if answer.is_empty() {
        return;
    }
    if data.starts_with(H2_PREFACE) {
        // The server's connection preface: a SETTINGS frame (type 4) on stream 0.
        assert!(
            answer.len() >= 9 && answer[3] == 4 && answer[5..9] == [0, 0, 0, 0],
            "an HTTP/2 client's answer does not start with SETTINGS: {:?}",
            &answer[..answer.len().min(32)]
        );
        return;
    }
    let statuses = answer::statuses(answer).unwrap_or_else(|e| {
        panic!("the answer is not a sequence of well-formed HTTP/1.x responses: {e}")
    });
    if has_cl_and_te(data) {
        assert_eq!(
            statuses.first(),
            Some(&400),
            "a request with both Content-Length and Transfer-Encoding was not refused"
        );
    }
}

/// Whether the first request head of `data`, as hyper parses it, carries both
/// `Content-Length` and `Transfer-Encoding`.
fn has_cl_and_te(data: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(data), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let has = |name: &str| {
        req.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    has("content-length") && has("transfer-encoding")
}

/// The mesh: `echo.fuzz:80` at `upstream`, with retries (so bodies are kept for replay)
/// and a request timeout, and an HTTPRoute rule that sends `/split` to itself with a
/// header added.
fn snapshot(upstream: SocketAddr) -> v1::Snapshot {
    v1::Snapshot {
        version: 1,
        services: vec![v1::Service {
            name: SERVICE.into(),
            namespace: NAMESPACE.into(),
            cluster_ips: vec![CLUSTER_IP.into()],
            version: 1,
            ports: vec![v1::ServicePort {
                name: "http".into(),
                port: 80,
                endpoints: vec![v1::Endpoint {
                    address: upstream.to_string(),
                    ..Default::default()
                }],
                resilience: Some(v1::ResiliencePolicy {
                    source: "fuzz/echo".into(),
                    timeouts: Some(v1::Timeouts {
                        request: Some(duration(2_000)),
                        connect: Some(duration(500)),
                    }),
                    retry: Some(v1::Retry {
                        attempts: 2,
                        retry_on: vec!["5xx".into(), "connect-failure".into()],
                        max_body_bytes: 4096,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                routes: vec![v1::HttpRouteRule {
                    source: "fuzz/split".into(),
                    matches: vec![v1::HttpRouteMatch {
                        path: Some(v1::HttpPathMatch {
                            r#type: v1::http_path_match::Type::Prefix.into(),
                            value: "/split".into(),
                        }),
                        ..Default::default()
                    }],
                    backends: vec![v1::HttpBackend {
                        namespace: NAMESPACE.into(),
                        name: SERVICE.into(),
                        port: 80,
                        weight: 1,
                    }],
                    request_header_modifier: Some(v1::HttpHeaderModifier {
                        add: vec![v1::HttpHeader {
                            name: "x-split".into(),
                            value: "1".into(),
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }],
        inbound: None,
        ..Default::default()
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("a bound listener has no address: {e}"))
}

/// The service's endpoint: reads each request's whole body and answers 200.
async fn serve_upstream(listener: TcpListener) {
    let service = service_fn(|req: Request<Incoming>| async move {
        let read = req.into_body().collect().await.map(|b| b.to_bytes().len());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{read:?}\n")))))
    });
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_line(data: &str) -> String {
        let answer = answer(data.as_bytes());
        let text = String::from_utf8_lossy(&answer);
        text.lines().next().unwrap_or_default().to_owned()
    }

    #[test]
    fn the_harness_reaches_the_mesh_service_and_refuses_the_rest() {
        let via_route = "GET http://echo.fuzz/split HTTP/1.1\r\nHost: echo.fuzz\r\n\r\n";
        assert_eq!(status_line(via_route), "HTTP/1.1 200 OK");
        let body = "POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhello";
        assert!(String::from_utf8_lossy(&answer(body.as_bytes())).ends_with("Ok(5)\n"));
        let own = "CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n";
        assert_eq!(status_line(own), "HTTP/1.1 403 Forbidden");
        let elsewhere = "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";
        assert_eq!(status_line(elsewhere), "HTTP/1.1 403 Forbidden");
        let cl_te = "POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(status_line(cl_te), "HTTP/1.1 400 Bad Request");
    }
}
