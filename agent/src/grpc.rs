//! What the agent reads from gRPC calls (gRPC over HTTP/2): whether a request is
//! one, its `grpc-timeout`, and a response's `grpc-status`. A leaf: the policies and
//! the proxy both use it.

use std::time::Duration;

use http::{HeaderMap, HeaderName};

/// `grpc-status`, in responses and trailers.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`, beside `grpc-status`.
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`, the call's deadline.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The `grpc-status` in a header map, if any.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a request is gRPC (by content type).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Reads `grpc-timeout` (`<1-8 digits><H|M|S|m|u|n>`); `None` when absent or malformed.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?.trim();
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_str(timeout).unwrap());
        h
    }

    #[test]
    fn reads_grpc_timeouts() {
        assert_eq!(timeout(&headers("250m")), Some(Duration::from_millis(250)));
        assert_eq!(timeout(&headers("3S")), Some(Duration::from_secs(3)));
        assert_eq!(timeout(&headers("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(timeout(&headers("2M")), Some(Duration::from_secs(120)));
        assert_eq!(timeout(&headers("100u")), Some(Duration::from_micros(100)));
        assert_eq!(
            timeout(&headers("99999999n")),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(timeout(&headers("123456789S")), None, "at most 8 digits");
        assert_eq!(timeout(&headers("10")), None);
        assert_eq!(timeout(&headers("S")), None);
        assert_eq!(timeout(&headers("-1S")), None);
        assert_eq!(timeout(&headers("1x")), None);
        assert_eq!(timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn reads_grpc_status_and_content_type() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        assert_eq!(grpc_status(&h), None);
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        h.insert("grpc-status", HeaderValue::from_static(" 14 "));
        assert!(is_grpc(&h));
        assert_eq!(grpc_status(&h), Some(14));
    }
}
