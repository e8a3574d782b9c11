//! Buffering bodies so a request can be replayed by a retry, and so a gRPC
//! response's trailers can be read before deciding on a retry.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, BodyStream, StreamBody};

use crate::transport::{BoxError, ProxyBody};

/// A body read up to a size limit.
pub enum Prefix<B> {
    /// The whole body, and its trailers if any, within the limit.
    Complete {
        /// The data.
        data: Bytes,
        /// The trailers, if the body had any.
        trailers: Option<HeaderMap>,
    },
    /// The body is larger than the limit (or failed): what was read, then the rest.
    Partial {
        /// Frames already read.
        frames: Vec<Frame<Bytes>>,
        /// The unread remainder.
        rest: B,
    },
}

/// Reads `body` until it ends or more than `limit` bytes have arrived.
pub async fn read_prefix<B>(mut body: B, limit: usize) -> Result<Prefix<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok(Prefix::Complete {
            data: Bytes::new(),
            trailers: None,
        });
    }
    if usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX) > limit {
        return Ok(Prefix::Partial {
            frames: Vec::new(),
            rest: body,
        });
    }
    let mut frames = Vec::new();
    let mut total = 0usize;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        if let Some(data) = frame.data_ref() {
            total += data.len();
        }
        if frame.is_trailers() {
            trailers = frame.into_trailers().ok();
            break;
        }
        frames.push(frame);
        if total > limit {
            return Ok(Prefix::Partial { frames, rest: body });
        }
    }
    let mut data = BytesMut::with_capacity(total);
    for frame in frames {
        if let Ok(chunk) = frame.into_data() {
            data.extend_from_slice(&chunk);
        }
    }
    Ok(Prefix::Complete {
        data: data.freeze(),
        trailers,
    })
}

impl<B> Prefix<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// The body again, as read plus the rest.
    pub fn into_body(self) -> ProxyBody {
        match self {
            Prefix::Complete { data, trailers } => replay(data, trailers),
            Prefix::Partial { frames, rest } => {
                let head = futures::stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
                let tail =
                    futures::StreamExt::map(BodyStream::new(rest), |f| f.map_err(Into::into));
                StreamBody::new(futures::StreamExt::chain(head, tail)).boxed_unsync()
            }
        }
    }
}

/// A body made of `data` and then `trailers`.
pub fn replay(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    match trailers {
        None => crate::transport::full(data),
        Some(t) => {
            let frames = [Ok::<_, BoxError>(Frame::data(data)), Ok(Frame::trailers(t))];
            StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn small_bodies_are_buffered_whole() {
        let body = Full::new(Bytes::from_static(b"hello"));
        match read_prefix(body, 16).await.unwrap() {
            Prefix::Complete { data, trailers } => {
                assert_eq!(&data[..], b"hello");
                assert!(trailers.is_none());
            }
            Prefix::Partial { .. } => panic!("a 5-byte body fits in 16"),
        }
    }

    #[tokio::test]
    async fn large_bodies_stream_on_intact() {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..4)
            .map(|i| Ok(Frame::data(Bytes::from(vec![b'a' + i; 10]))))
            .collect();
        let body = StreamBody::new(futures::stream::iter(chunks)).boxed_unsync();
        let prefix = read_prefix(body, 15).await.unwrap();
        assert!(matches!(prefix, Prefix::Partial { .. }));
        let all = prefix.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 40);
        assert_eq!(&all[..10], b"aaaaaaaaaa");
        assert_eq!(&all[30..], b"dddddddddd");
    }

    #[tokio::test]
    async fn trailers_are_kept() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("14"));
        let body = replay(Bytes::from_static(b"x"), Some(t));
        match read_prefix(body, 16).await.unwrap() {
            Prefix::Complete { trailers, .. } => {
                assert_eq!(trailers.unwrap()["grpc-status"], "14");
            }
            Prefix::Partial { .. } => panic!("fits"),
        }
    }
}
