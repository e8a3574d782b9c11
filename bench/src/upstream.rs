//! The fixed upstream: a minimal hyper server that answers every request with the same
//! 1 KiB body (HTTP/1.1 and h2c prior knowledge on one port), and a TCP sink that reads
//! and discards whatever it is sent (the far end of the pass-through row).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// The size of every response body.
pub const BODY_SIZE: usize = 1024;

/// A response body: 1 KiB, then trailers for gRPC-like requests.
type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serves the fixed 1 KiB answer on `listener`, `latency` after each request arrived,
/// until the task is dropped.
pub async fn serve_http(listener: TcpListener, latency: Duration) -> std::io::Result<()> {
    let body = Bytes::from(vec![b'x'; BODY_SIZE]);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, body.clone(), latency));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A connection that fails mid-way only ends that connection.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    body: Bytes,
    latency: Duration,
) -> Result<Response<UpstreamBody>, Infallible> {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Read the request body fully, as a real server would.
    let _ = req.into_body().collect().await;
    if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = futures::stream::iter([
            Ok::<_, Infallible>(Frame::data(body)),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut rsp = Response::new(StreamBody::new(frames).boxed());
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        Ok(rsp)
    } else {
        Ok(Response::new(Full::new(body).boxed()))
    }
}

/// Accepts TCP connections on `listener` and discards what they send.
pub async fn serve_sink(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

/// Binds the HTTP upstream and the sink and serves both until the process ends.
pub async fn run(http: SocketAddr, sink: SocketAddr, latency: Duration) -> anyhow::Result<()> {
    let http = TcpListener::bind(http).await?;
    let sink = TcpListener::bind(sink).await?;
    tokio::try_join!(serve_http(http, latency), serve_sink(sink))?;
    Ok(())
}
