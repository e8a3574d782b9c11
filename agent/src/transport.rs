//! Bytes in and out of the agent: listeners and their connection handling,
//! original destinations, protocol detection, connectors and the pooled HTTP
//! clients, mutual TLS between agents, and opaque TCP relaying. Nothing here knows a policy.

pub mod connector;
pub mod guard;
pub mod http2;
pub mod orig_dst;
pub mod pool;
pub mod prefixed;
pub mod protocol;
pub mod server;
pub mod tcp;
pub mod tls;
pub mod upstream;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Any error a body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the proxy handles.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Wraps a fixed body.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
