//! The agent's own responses turned into gRPC statuses for gRPC clients (what the
//! agent reads from gRPC requests lives in [`crate::grpc`]).
//!
//! A gRPC client reads the outcome of a call from `grpc-status`, not from the
//! HTTP status, so an agent-made 503 would reach it as a confusing protocol
//! error. It gets a trailers-only response instead (HTTP 200, `grpc-status`,
//! `grpc-message`), keeping `x-bulwark-reason` and `Retry-After`.

use http::{HeaderValue, Response, StatusCode};

use crate::grpc::{GRPC_MESSAGE, GRPC_STATUS};
use crate::reason::{self, REASON_HEADER};
use crate::transport::{ProxyBody, full};

/// gRPC status codes the agent uses.
pub mod code {
    /// The request lacks something only the client can supply (a shard key):
    /// retrying it unchanged cannot help.
    pub const INVALID_ARGUMENT: u32 = 3;
    /// The deadline expired.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// The caller may not make this call.
    pub const PERMISSION_DENIED: u32 = 7;
    /// A quota or a capacity limit was hit.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// An internal error (a request the agent could not route).
    pub const INTERNAL: u32 = 13;
    /// The service is unavailable for now; clients may retry.
    pub const UNAVAILABLE: u32 = 14;
}

/// The gRPC status for an `x-bulwark-reason`.
pub fn status_for(why: &str) -> u32 {
    match why {
        reason::TIMEOUT => code::DEADLINE_EXCEEDED,
        reason::RATE_LIMITED | reason::BULKHEAD_FULL => code::RESOURCE_EXHAUSTED,
        reason::BAD_REQUEST | reason::LOOP_DETECTED | reason::BACKEND_NOT_FOUND => code::INTERNAL,
        reason::SHARD_KEY_MISSING => code::INVALID_ARGUMENT,
        reason::UNAUTHORIZED => code::PERMISSION_DENIED,
        // circuit-open, no-endpoints, connect-failed, upstream-reset,
        // shard-primary-unavailable.
        _ => code::UNAVAILABLE,
    }
}

/// Turns a response the agent made itself (it has `x-bulwark-reason`) into a
/// trailers-only gRPC response; any other response is returned unchanged.
pub fn local_to_grpc(rsp: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(why) = rsp
        .headers()
        .get(REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return rsp;
    };
    let (mut head, _) = rsp.into_parts();
    head.status = StatusCode::OK;
    head.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    head.headers
        .insert(GRPC_STATUS, HeaderValue::from(status_for(&why)));
    if let Ok(message) = HeaderValue::try_from(format!("bulwark: {why}")) {
        head.headers.insert(GRPC_MESSAGE, message);
    }
    head.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(head, full(bytes::Bytes::new()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy::local_response;

    #[test]
    fn agent_made_errors_become_grpc_statuses() {
        let rsp = local_to_grpc(local_response(
            StatusCode::TOO_MANY_REQUESTS,
            reason::RATE_LIMITED,
            Some(Duration::from_secs(2)),
        ));
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["grpc-status"], "8");
        assert_eq!(rsp.headers()["content-type"], "application/grpc");
        assert_eq!(rsp.headers()[REASON_HEADER], "rate-limited");
        assert_eq!(rsp.headers()[http::header::RETRY_AFTER], "2");
        let timeout = local_to_grpc(local_response(
            StatusCode::GATEWAY_TIMEOUT,
            reason::TIMEOUT,
            None,
        ));
        assert_eq!(timeout.headers()["grpc-status"], "4");
        let open = local_to_grpc(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            reason::CIRCUIT_OPEN,
            None,
        ));
        assert_eq!(open.headers()["grpc-status"], "14");
        let full = local_to_grpc(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            reason::BULKHEAD_FULL,
            None,
        ));
        assert_eq!(full.headers()["grpc-status"], "8");
        let keyless = local_to_grpc(local_response(
            StatusCode::BAD_REQUEST,
            reason::SHARD_KEY_MISSING,
            None,
        ));
        assert_eq!(keyless.status(), 200);
        assert_eq!(
            keyless.headers()["grpc-status"],
            "3",
            "INVALID_ARGUMENT: do not retry"
        );
        let primary = local_to_grpc(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            reason::SHARD_PRIMARY_UNAVAILABLE,
            None,
        ));
        assert_eq!(primary.headers()["grpc-status"], "14");
    }

    #[test]
    fn upstream_responses_are_left_alone() {
        let mut rsp = Response::new(full("x"));
        *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let rsp = local_to_grpc(rsp);
        assert_eq!(rsp.status(), 503);
        assert!(rsp.headers().get("grpc-status").is_none());
    }
}
