//! HTTP through the agent: the outbound path (app → mesh) and the inbound path
//! (mesh → app), each a short sequence of steps from [`crate::policy`]; redirected
//! connections handed to one or the other; and the responses the agent makes itself.

pub mod body;
pub mod grpc;
pub mod inbound;
pub mod outbound;
pub mod refuse;
pub mod transparent;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;

use crate::reason::REASON_HEADER;
use crate::transport::pool::Pool;
use crate::transport::{ProxyBody, full, upstream};

/// A response the agent makes itself, saying why in `x-bulwark-reason`.
pub fn local_response(
    status: StatusCode,
    reason: &'static str,
    retry_after: Option<Duration>,
) -> Response<ProxyBody> {
    let mut rsp = Response::new(full(format!("{reason}\n")));
    *rsp.status_mut() = status;
    let headers = rsp.headers_mut();
    headers.insert(REASON_HEADER, HeaderValue::from_static(reason));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    if let Some(after) = retry_after {
        // Retry-After takes whole seconds; round up so a client that obeys it succeeds.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    rsp
}

/// A 429 for a request a rate limit refused: `Retry-After`, and the limit's
/// `RateLimit-Policy` and `RateLimit` headers when its policy asks for them.
pub fn limited_response(limited: &crate::policy::ratelimit::RateLimited) -> Response<ProxyBody> {
    let mut rsp = local_response(
        StatusCode::TOO_MANY_REQUESTS,
        crate::reason::RATE_LIMITED,
        Some(limited.retry_after),
    );
    if let Some(quota) = &limited.quota {
        crate::policy::ratelimit::headers::append(rsp.headers_mut(), std::slice::from_ref(quota));
    }
    rsp
}

/// Where [`send_plain`] sends: one pool's endpoint, or any authority outside the mesh.
pub enum Plain<'a> {
    /// The endpoint whose connections `pool` keeps (e.g. the local app).
    Pool(&'a upstream::Upstream, &'a Arc<Pool>),
    /// Whatever authority the request names.
    Passthrough(&'a upstream::Passthrough),
}

/// Sends `req` unchanged but for its target (`authority`) and hop-by-hop
/// headers: the path for traffic without policy (passthrough, inbound to the app).
/// A failure of the client's body is told by [`refuse::body_fault`] on the error.
pub async fn send_plain(
    to: Plain<'_>,
    req: http::Request<hyper::body::Incoming>,
    authority: http::uri::Authority,
) -> Result<Response<ProxyBody>, upstream::SendError> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
    let http2 = parts.version == http::Version::HTTP_2;
    let req = http::Request::from_parts(parts, refuse::client_body(body));
    let rsp = match to {
        Plain::Pool(upstream, pool) => upstream.send(pool, req, http2).await?,
        Plain::Passthrough(passthrough) => passthrough.send(req, http2).await?,
    };
    let (mut head, body) = rsp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    Ok(Response::from_parts(
        head,
        body.map_err(Into::into).boxed_unsync(),
    ))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that a proxy must not forward.
const HOP_BY_HOP: [http::HeaderName; 7] = [
    http::header::CONNECTION,
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::HeaderName::from_static("keep-alive"),
    http::header::HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers, including those named by `Connection`. `TE: trailers`
/// is kept because gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // One walk over the names, compared without hashing: most requests carry
    // none of these, and then nothing is looked up, removed or allocated.
    let (mut connection, mut te, mut other) = (false, false, false);
    for name in headers.keys() {
        if name == http::header::CONNECTION {
            connection = true;
        } else if name == http::header::TE {
            te = true;
        } else if HOP_BY_HOP.contains(name) {
            other = true;
        }
    }
    if connection {
        let named: Vec<http::HeaderName> = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    if connection || other {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
    }
    if te
        && headers
            .get(http::header::TE)
            .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(http::header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason;

    #[test]
    fn local_responses_say_why() {
        let rsp = local_response(
            StatusCode::TOO_MANY_REQUESTS,
            reason::RATE_LIMITED,
            Some(Duration::from_millis(1500)),
        );
        assert_eq!(rsp.status(), 429);
        assert_eq!(rsp.headers()[REASON_HEADER], "rate-limited");
        assert_eq!(rsp.headers()[http::header::RETRY_AFTER], "2");
    }

    #[test]
    fn strips_hop_by_hop_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn strips_hop_by_hop_headers_without_connection() {
        let mut h = http::HeaderMap::new();
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("proxy-connection").is_none());
        assert!(h.get("upgrade").is_none());
        assert!(
            h.get("te").is_none(),
            "TE other than trailers is hop-by-hop"
        );
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "1");

        let mut clean = http::HeaderMap::new();
        clean.insert("x-kept", HeaderValue::from_static("1"));
        clean.insert("te", HeaderValue::from_static("trailers"));
        let before = clean.clone();
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean, before);
    }
}
