//! The Discovery service's gRPC routing and codec, written out instead of generated:
//! tonic's generated server wants an owned `proto::Snapshot` per message, which costs a
//! deep copy and a fresh encoding of the whole service list for every agent. Here the
//! stream yields [`PendingSnapshot`]s and the codec writes them from the outbound bytes
//! encoded once per revision (see [`crate::discovery::view::ViewCache`]); on the wire nothing
//! changes, and agents keep the generated client.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bulwark_proto::v1 as proto;
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use super::{DiscoveryService, SnapshotStream};
use crate::discovery::view::PendingSnapshot;

/// The gRPC service name, as in `discovery.proto`.
pub const SERVICE_NAME: &str = "bulwark.mesh.v1.Discovery";
/// The path of the `Stream` method.
const STREAM_PATH: &str = "/bulwark.mesh.v1.Discovery/Stream";

/// Encodes snapshots from their shared parts; decodes agent messages with prost.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotCodec;

impl Codec for SnapshotCodec {
    type Encode = PendingSnapshot;
    type Decode = proto::AgentMessage;
    type Encoder = SnapshotEncoder;
    type Decoder = AgentMessageDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        SnapshotEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        AgentMessageDecoder
    }
}

/// Writes a [`PendingSnapshot`] as a `Snapshot` message.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotEncoder;

impl Encoder for SnapshotEncoder {
    type Item = PendingSnapshot;
    type Error = Status;

    fn encode(&mut self, item: PendingSnapshot, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf);
        Ok(())
    }
}

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

/// The `Stream` method.
struct StreamMethod(Arc<DiscoveryService>);

impl StreamingService<proto::AgentMessage> for StreamMethod {
    type Response = PendingSnapshot;
    type ResponseStream = SnapshotStream;
    type Future = BoxFuture<Response<SnapshotStream>, Status>;

    fn call(&mut self, request: Request<Streaming<proto::AgentMessage>>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move { service.stream(request).await })
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
            let method = StreamMethod(Arc::clone(&self.inner));
            Box::pin(async move { Ok(Grpc::new(SnapshotCodec).streaming(method, req).await) })
        } else {
            Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) })
        }
    }
}
