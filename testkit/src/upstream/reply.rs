//! What a test upstream answers: a small JSON body describing the request, and
//! the body type that can carry trailers (for gRPC).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use serde::{Deserialize, Serialize};

/// The JSON body of every answer from a test upstream (for gRPC requests, the
/// payload of the one response message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The upstream's name (also in the `x-upstream` header).
    pub name: String,
    /// The request's method.
    pub method: String,
    /// The request's path.
    pub path: String,
    /// The request's query string, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The request's `x-tenant-id` header, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The request's `traceparent` header, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The request's `x-forwarded-for` header, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<String>,
    /// The length of the request's body in bytes.
    pub body_len: u64,
    /// Whether this answer is an injected failure.
    pub failed: bool,
}

/// A response body of at most one data frame and optional trailers.
#[derive(Debug, Default)]
pub struct ReplyBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl ReplyBody {
    /// A body of `data` and nothing else.
    pub fn new(data: impl Into<Bytes>) -> Self {
        Self {
            data: Some(data.into()),
            trailers: None,
        }
    }

    /// A body of `data` followed by `trailers`.
    pub fn with_trailers(data: impl Into<Bytes>, trailers: HeaderMap) -> Self {
        Self {
            data: Some(data.into()),
            trailers: Some(trailers),
        }
    }
}

impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take()
            && !data.is_empty()
        {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(
            this.trailers
                .take()
                .map(|trailers| Ok(Frame::trailers(trailers))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(Bytes::is_empty) && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let len = self.data.as_ref().map_or(0, |data| data.len() as u64);
        SizeHint::with_exact(len)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn body_yields_data_then_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        let collected = ReplyBody::with_trailers("hello", trailers)
            .collect()
            .await
            .unwrap();
        assert_eq!(
            collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .unwrap(),
            "14"
        );
        assert_eq!(collected.to_bytes(), "hello");
    }

    #[test]
    fn empty_body_is_at_its_end() {
        assert!(http_body::Body::is_end_stream(
            &ReplyBody::new(Bytes::new())
        ));
        assert!(!http_body::Body::is_end_stream(&ReplyBody::new("x")));
    }
}
