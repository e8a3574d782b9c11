//! The bits of gRPC's wire format the tests need: length-prefixed messages and
//! the status in trailers.

use bytes::{BufMut, Bytes, BytesMut};

/// The `content-type` of gRPC requests and responses.
pub const CONTENT_TYPE: &str = "application/grpc";

/// gRPC status code OK.
pub const OK: u32 = 0;

/// gRPC status code UNAVAILABLE, the usual "try again" failure.
pub const UNAVAILABLE: u32 = 14;

/// Wraps `message` in gRPC's framing: a zero compression flag, a 4-byte big-endian length, the bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    // A test message over 4 GiB is a bug in the test, not something to encode.
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(message);
    framed.freeze()
}

/// The messages in a gRPC body, or `None` if the framing is broken.
pub fn unframe(mut body: &[u8]) -> Option<Vec<Bytes>> {
    let mut messages = Vec::new();
    while !body.is_empty() {
        let header = body.get(..5)?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let message = body.get(5..5 + len)?;
        messages.push(Bytes::copy_from_slice(message));
        body = &body[5 + len..];
    }
    Some(messages)
}

/// Whether a `content-type` value names gRPC (`application/grpc`, `application/grpc+proto`, ...).
pub fn is_grpc(content_type: &str) -> bool {
    content_type
        .strip_prefix(CONTENT_TYPE)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips() {
        let body = [
            frame(b"one").as_ref(),
            frame(b"").as_ref(),
            frame(b"three").as_ref(),
        ]
        .concat();
        assert_eq!(body[..5], [0, 0, 0, 0, 3]);
        let messages = unframe(&body).unwrap();
        assert_eq!(
            messages,
            vec![Bytes::from("one"), Bytes::new(), Bytes::from("three")]
        );
    }

    #[test]
    fn unframe_rejects_truncated_bodies() {
        let framed = frame(b"hello");
        assert_eq!(unframe(&framed[..framed.len() - 1]), None);
        assert_eq!(unframe(&framed[..3]), None);
    }

    #[test]
    fn recognises_grpc_content_types() {
        assert!(is_grpc("application/grpc"));
        assert!(is_grpc("application/grpc+proto"));
        assert!(!is_grpc("application/grpc-web"));
        assert!(!is_grpc("application/json"));
    }
}
