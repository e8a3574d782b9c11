//! The HTTP/2 client to an endpoint, on the `h2` crate directly.
//!
//! Our own rather than hyper's HTTP/2 client because hyper spawns two tasks per
//! request (one waits for the response, one sends the request body) and hands every
//! request through a channel to the connection's task: callgrind counted that glue as
//! about a fifth of an HTTP/2 request's instructions (docs/benchmarks.md). Here the
//! request's own future opens the stream, sends the body and waits for the response;
//! a task is spawned only when the response comes before the request body has been
//! sent (a streaming call), to finish sending it.
//!
//! The connection itself runs in a task of its own ([`Handshake::driver`]) until every
//! handle is dropped and its streams end, or the peer closes it.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{BoxError, ProxyBody};

/// The connection's receive window: large, so that one slow reader does not stall a
/// busy connection (hyper's default, which the agent used before).
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// Each stream's receive window.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// The largest frame the agent accepts.
const MAX_FRAME_SIZE: u32 = 16 * 1024;
/// Bytes a stream may buffer for sending before it waits for window.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// The largest response header list the agent accepts.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams the agent opens before the peer's SETTINGS say how many it allows.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Connection-specific headers, which HTTP/2 forbids (RFC 9113 §8.2.2).
const CONNECTION_HEADERS: [HeaderName; 5] = [
    CONNECTION,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// The settings of every upstream HTTP/2 connection.
pub fn builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false);
    builder
}

/// How a request over HTTP/2 failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection could not take a new stream (closed, or going away): nothing of
    /// the request was sent.
    #[error("HTTP/2 connection cannot take the request: {0}")]
    Unsent(#[source] h2::Error),
    /// The stream failed (reset, or the connection broke) before the response came.
    #[error("HTTP/2 stream failed: {0}")]
    Stream(#[source] h2::Error),
    /// The request body failed while it was being sent (the stream was reset).
    #[error("request body failed: {0}")]
    Body(#[source] BoxError),
}

/// A handle to one HTTP/2 connection, cloned per request. The connection closes once
/// the last handle is dropped and its streams have ended (h2 wakes the connection's
/// task for that).
#[derive(Clone, Debug)]
pub struct H2 {
    send: h2::client::SendRequest<Bytes>,
    /// Set when the connection ends or refuses a new stream.
    closed: Arc<AtomicBool>,
}

/// A new connection's handle and the future that drives its I/O.
pub struct Handshake<D> {
    /// The handle requests are sent on.
    pub conn: H2,
    /// Runs the connection until it closes; spawn it.
    pub driver: D,
}

/// Makes `io` an HTTP/2 connection (prior knowledge, or ALPN `h2`).
pub async fn handshake<T>(
    io: T,
    builder: &h2::client::Builder,
) -> Result<Handshake<impl Future<Output = Result<(), h2::Error>> + Send + 'static>, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = builder.handshake::<_, Bytes>(io).await?;
    let closed = Arc::new(AtomicBool::new(false));
    let state = Arc::clone(&closed);
    let driver = async move {
        let result = connection.await;
        state.store(true, Ordering::Release);
        result
    };
    Ok(Handshake {
        conn: H2 { send, closed },
        driver,
    })
}

impl H2 {
    /// Whether the connection has closed or can take no new streams.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the connection as unfit for new requests (it refused one).
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// This handle, once the connection can open a stream (it waits while the peer's
    /// limit of concurrent streams is reached). An error means nothing was sent: the
    /// connection is closed or going away, and is marked so.
    pub async fn ready(mut self) -> Result<Ready, h2::Error> {
        match poll_fn(|cx| self.send.poll_ready(cx)).await {
            Ok(()) => Ok(Ready(self)),
            Err(error) => {
                self.close();
                Err(error)
            }
        }
    }
}

/// A handle that can open a stream now.
#[derive(Debug)]
pub struct Ready(H2);

impl Ready {
    /// Sends `req` (its URI absolute) on a new stream and waits for the response head.
    /// The request body is sent meanwhile; if the response comes first (a streaming
    /// call), a task finishes sending it.
    pub async fn send(self, req: Request<ProxyBody>) -> Result<Response<ResponseBody>, Error> {
        let Ready(mut conn) = self;
        let (mut head, body) = req.into_parts();
        strip_connection_headers(&mut head.headers);
        let end = body.is_end_stream();
        let (mut response, stream) =
            match conn.send.send_request(Request::from_parts(head, ()), end) {
                Ok(sent) => sent,
                Err(error) => {
                    if error.is_go_away() || error.is_io() {
                        conn.close();
                    }
                    return Err(Error::Unsent(error));
                }
            };
        // The stream holds the connection from here on.
        drop(conn);
        let mut pipe = (!end).then(|| Pipe::new(body, stream));
        let response = poll_fn(|cx| {
            if let Some(sending) = pipe.as_mut() {
                match sending.poll(cx) {
                    Poll::Ready(Ok(())) => pipe = None,
                    Poll::Ready(Err(PipeError::Body(error))) => {
                        return Poll::Ready(Err(Error::Body(error)));
                    }
                    // The stream broke: the response future says how.
                    Poll::Ready(Err(PipeError::Stream(error))) => {
                        debug!(%error, "HTTP/2 request body not sent in full");
                        pipe = None;
                    }
                    Poll::Pending => {}
                }
            }
            Pin::new(&mut response).poll(cx).map_err(Error::Stream)
        })
        .await?;
        if let Some(pipe) = pipe {
            tokio::spawn(pipe.finish());
        }
        let (head, recv) = response.into_parts();
        let body = ResponseBody::new(recv, &head.headers);
        Ok(Response::from_parts(head, body))
    }
}

/// Removes the headers HTTP/2 forbids (h2 refuses a request that has them), and `TE`
/// unless it is `trailers`. One pass over the few headers a request has finds whether
/// there is anything to remove, cheaper than looking each name up.
fn strip_connection_headers(headers: &mut HeaderMap) {
    if !headers
        .keys()
        .any(|name| name == TE || CONNECTION_HEADERS.contains(name))
    {
        return;
    }
    for name in &CONNECTION_HEADERS {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// Why sending a request body stopped.
enum PipeError {
    /// The body failed.
    Body(BoxError),
    /// The stream failed (reset by the peer, or the connection broke).
    Stream(h2::Error),
}

/// Sends a request body on its stream, within the stream's flow-control window.
struct Pipe {
    body: ProxyBody,
    stream: h2::SendStream<Bytes>,
    /// A chunk waiting for window, and whether it is the body's last.
    waiting: Option<(Bytes, bool)>,
}

impl Pipe {
    fn new(body: ProxyBody, stream: h2::SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            waiting: None,
        }
    }

    /// Sends the rest of the body (in a task of its own), resetting the stream if the
    /// body fails.
    async fn finish(mut self) {
        match poll_fn(|cx| self.poll(cx)).await {
            Ok(()) => {}
            Err(PipeError::Body(error)) => debug!(%error, "request body failed; stream reset"),
            Err(PipeError::Stream(error)) => {
                debug!(%error, "HTTP/2 request body not sent in full");
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        loop {
            // Wake if the peer resets the stream while we wait for the body or window.
            if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                let error = match reason {
                    Ok(reason) => h2::Error::from(reason),
                    Err(error) => error,
                };
                return Poll::Ready(Err(PipeError::Stream(error)));
            }
            if let Some((chunk, last)) = self.waiting.take() {
                // An empty chunk (an explicit end of the body) needs no window.
                while !chunk.is_empty() && self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            self.waiting = Some((chunk, last));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(error))) => {
                            return Poll::Ready(Err(PipeError::Stream(error)));
                        }
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(PipeError::Stream(h2::Error::from(
                                h2::Reason::STREAM_CLOSED,
                            ))));
                        }
                    }
                }
                self.stream
                    .send_data(chunk, last)
                    .map_err(PipeError::Stream)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next frame before any window is claimed: claiming window for a body
            // that has nothing to send could starve the connection's other streams.
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        if !chunk.is_empty() {
                            // A claim of one byte: h2 raises it to what `send_data` buffers.
                            self.stream.reserve_capacity(1);
                        }
                        self.waiting = Some((chunk, self.body.is_end_stream()));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream
                                .send_trailers(trailers)
                                .map_err(PipeError::Stream)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(error)) => {
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Err(PipeError::Body(error)));
                }
                None => {
                    self.stream
                        .send_data(Bytes::new(), true)
                        .map_err(PipeError::Stream)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// A response body received over HTTP/2, giving back flow-control window as it is read.
#[derive(Debug)]
pub struct ResponseBody {
    recv: h2::RecvStream,
    /// Whether the data frames have ended (the trailers are next).
    data_done: bool,
    /// Bytes the `content-length` header says are still to come.
    remaining: Option<u64>,
}

impl ResponseBody {
    /// `recv`, with the length its response's `content-length` declares.
    fn new(recv: h2::RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Self {
            recv,
            data_done: false,
            remaining,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Giving back the window can only fail on a closed stream.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut this.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // A reset with NO_ERROR ends the body early without failing it
                // (RFC 9113 §8.1).
                Some(Err(error)) if error.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(None);
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) if error.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::full;
    use futures::StreamExt as _;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    /// An h2c server on loopback whose answer `answer` makes from each request; the
    /// receiver yields once per connection when that connection has ended.
    async fn server<F, Fut>(answer: F) -> (SocketAddr, mpsc::UnboundedReceiver<()>)
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ended_tx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let answer = answer.clone();
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let answer = answer.clone();
                        async move { Ok::<_, Infallible>(answer(req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                    let _ = ended_tx.send(());
                });
            }
        });
        (addr, ended)
    }

    async fn connect(addr: SocketAddr) -> H2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let Handshake { conn, driver } = handshake(tcp, &builder()).await.unwrap();
        tokio::spawn(driver);
        conn
    }

    /// Sends `req` on `conn` once it can take a stream.
    async fn send(conn: H2, req: Request<ProxyBody>) -> Result<Response<ResponseBody>, Error> {
        conn.ready().await.unwrap().send(req).await
    }

    fn post(addr: SocketAddr, body: ProxyBody) -> Request<ProxyBody> {
        Request::post(format!("http://{addr}/echo"))
            .body(body)
            .unwrap()
    }

    /// A request body fed from the returned sender, chunk by chunk.
    fn streamed() -> (
        mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>,
        ProxyBody,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, StreamBody::new(stream.boxed()).boxed_unsync())
    }

    fn echo(req: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> {
        let body = req.into_body().map_err(BoxError::from).boxed_unsync();
        std::future::ready(Response::new(body))
    }

    #[tokio::test]
    async fn a_streaming_request_body_is_sent_on_after_the_response_came() {
        let (addr, _) = server(echo).await;
        let conn = connect(addr).await;
        let (tx, body) = streamed();
        tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
            .unwrap();
        // The response head comes while the request body is still open.
        let rsp = send(conn, post(addr, body)).await.unwrap();
        assert_eq!(rsp.status(), 200);
        tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .unwrap();
        drop(tx);
        let echoed = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&echoed[..], b"first second");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("the client went away")]
    struct Gone;

    #[tokio::test]
    async fn a_failing_request_body_fails_the_send_with_its_own_error() {
        // The server reads the whole body before it answers.
        let (addr, _) = server(|req: Request<Incoming>| async move {
            let status = match req.into_body().collect().await {
                Ok(_) => 200,
                Err(_) => 499,
            };
            let mut rsp = Response::new(full(""));
            *rsp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            rsp
        })
        .await;
        let conn = connect(addr).await;
        let (tx, body) = streamed();
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .unwrap();
        tx.send(Err(Box::new(Gone))).unwrap();
        let error = send(conn, post(addr, body)).await.unwrap_err();
        match error {
            Error::Body(source) => assert!(source.downcast_ref::<Gone>().is_some()),
            other => panic!("expected the body's error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn trailers_and_data_come_through_and_the_window_is_given_back() {
        // More than the 64 KiB default window, in both directions, with trailers.
        let big = Bytes::from(vec![b'x'; 300 * 1024]);
        let (addr, _) = server(|req: Request<Incoming>| async move {
            let collected = req.into_body().collect().await.unwrap();
            let grpc = collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .cloned();
            let mut trailers = HeaderMap::new();
            trailers.insert(
                "grpc-status",
                grpc.unwrap_or(http::HeaderValue::from_static("x")),
            );
            let data = collected.to_bytes();
            let frames = futures::stream::iter([
                Ok::<_, BoxError>(Frame::data(data)),
                Ok(Frame::trailers(trailers)),
            ]);
            Response::new(StreamBody::new(frames).boxed_unsync())
        })
        .await;
        let conn = connect(addr).await;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = futures::stream::iter([
            Ok::<_, BoxError>(Frame::data(big.clone())),
            Ok(Frame::trailers(trailers)),
        ]);
        let body = StreamBody::new(frames).boxed_unsync();
        let rsp = send(conn, post(addr, body)).await.unwrap();
        let collected = rsp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), big);
    }

    #[tokio::test]
    async fn the_connection_closes_once_its_last_handle_is_dropped() {
        let (addr, mut ended) = server(echo).await;
        let conn = connect(addr).await;
        let rsp = send(conn.clone(), post(addr, full("hello"))).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert!(!conn.is_closed());
        drop(conn);
        // Waits for the event, not for time: the bound only keeps a failure from hanging.
        let closed = tokio::time::timeout(Duration::from_secs(10), ended.recv()).await;
        assert_eq!(closed, Ok(Some(())), "the server saw the connection end");
    }

    #[tokio::test]
    async fn connection_headers_are_removed_rather_than_refused() {
        let (addr, _) = server(|req: Request<Incoming>| async move {
            let seen = ["connection", "keep-alive", "upgrade", "te"]
                .iter()
                .filter(|h| req.headers().contains_key(**h))
                .count();
            Response::new(full(seen.to_string()))
        })
        .await;
        let conn = connect(addr).await;
        let mut req = post(addr, full(""));
        for (name, value) in [
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
        ] {
            req.headers_mut().insert(name, value.parse().unwrap());
        }
        let rsp = send(conn, req).await.unwrap();
        let seen = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&seen[..], b"0");
    }
}
