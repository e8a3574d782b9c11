//! The Discovery service's gRPC routing and response body, written out instead of
//! generated: tonic's generated server wants an owned `proto::Snapshot` per message,
//! which costs a deep copy and a fresh encoding of the whole service list for every
//! agent, and its encoder copies each message into a buffer of the stream's own, which
//! keeps the size of the largest message the stream sent (the whole view, 45 KB at 1,000
//! services) for as long as the stream lives: 450 MB for 10,000 agents. Here the stream
//! yields [`PendingSnapshot`]s and [`SnapshotBody`] hands their parts to h2 as they are:
//! the shared encoding of the services (once per revision, see
//! [`crate::discovery::view::ViewCache`]) by reference, and only the few bytes that are
//! the agent's own as a new buffer. On the wire nothing changes, and agents keep the
//! generated client.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bulwark_proto::v1 as proto;
use bytes::Bytes;
use futures::Stream;
use http_body::Frame;
use prost::Message as _;
use tonic::codec::{DecodeBuf, Decoder};
use tonic::codegen::{BoxFuture, StdError};
use tonic::server::NamedService;
use tonic::{Request, Status, Streaming};

use super::{DiscoveryService, SnapshotStream};

/// The gRPC service name, as in `discovery.proto`.
pub const SERVICE_NAME: &str = "bulwark.mesh.v1.Discovery";
/// The path of the `Stream` method.
const STREAM_PATH: &str = "/bulwark.mesh.v1.Discovery/Stream";

/// Reads an `AgentMessage`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentMessageDecoder;

impl Decoder for AgentMessageDecoder {
    type Item = proto::AgentMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        proto::AgentMessage::decode(buf)
            .map(Some)
            .map_err(|error| Status::internal(format!("malformed AgentMessage: {error}")))
    }
}

/// The response body of one agent's stream: each snapshot as a gRPC message (the 5-byte
/// prefix, then the `Snapshot` in parts, see [`crate::discovery::view::PendingSnapshot::chunks`]),
/// then trailers with the status the stream ended with.
#[derive(Debug)]
pub struct SnapshotBody {
    snapshots: SnapshotStream,
    /// The parts of the message being sent that h2 has not taken yet.
    chunks: VecDeque<Bytes>,
    /// The trailers went out.
    done: bool,
}

impl SnapshotBody {
    fn new(snapshots: SnapshotStream) -> Self {
        SnapshotBody {
            snapshots,
            chunks: VecDeque::new(),
            done: false,
        }
    }

    /// The trailers that end the stream with `status`.
    fn trailers(status: &Status) -> Frame<Bytes> {
        let mut headers = http::HeaderMap::new();
        if status.add_header(&mut headers).is_err() {
            // Only a message that is not a valid header value gets here: say the code.
            headers.insert(
                Status::GRPC_STATUS,
                http::HeaderValue::from(status.code() as i32),
            );
        }
        Frame::trailers(headers)
    }
}

impl http_body::Body for SnapshotBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut self.snapshots).poll_next(cx)) {
            Some(Ok(snapshot)) => {
                self.chunks.extend(snapshot.chunks());
                match self.chunks.pop_front() {
                    Some(chunk) => Frame::data(chunk),
                    None => Frame::data(Bytes::new()),
                }
            }
            Some(Err(status)) => {
                self.done = true;
                Self::trailers(&status)
            }
            None => {
                self.done = true;
                Self::trailers(&Status::ok(""))
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.chunks.is_empty()
    }
}

/// Serves one `Stream` call: tonic decodes the agent's messages, [`SnapshotBody`]
/// writes the snapshots.
async fn stream<B>(
    service: Arc<DiscoveryService>,
    request: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let (parts, body) = request.into_parts();
    // No compression is offered, as tonic's server does without `accept_compressed`.
    let messages = Streaming::new_request(AgentMessageDecoder, body, None, None);
    let request = Request::from_http(http::Request::from_parts(parts, messages));
    match service.stream(request).await {
        Ok(response) => {
            let (metadata, snapshots, _) = response.into_parts();
            let mut response =
                http::Response::new(tonic::body::Body::new(SnapshotBody::new(snapshots)));
            *response.headers_mut() = metadata.into_headers();
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(status) => status.into_http(),
    }
}

/// The Discovery service as tonic's router takes it.
#[derive(Clone, Debug)]
pub struct DiscoveryServer {
    inner: Arc<DiscoveryService>,
}

impl DiscoveryServer {
    /// Serves `service`.
    pub fn new(service: DiscoveryService) -> Self {
        DiscoveryServer {
            inner: Arc::new(service),
        }
    }
}

impl NamedService for DiscoveryServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> tonic::codegen::Service<http::Request<B>> for DiscoveryServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == STREAM_PATH {
            let service = Arc::clone(&self.inner);
            Box::pin(async move { Ok(stream(service, req).await) })
        } else {
            Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) })
        }
    }
}
