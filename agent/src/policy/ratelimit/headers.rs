//! The `RateLimit-Policy` and `RateLimit` response headers of the IETF httpapi draft
//! ("RateLimit header fields for HTTP"), opt-in per policy: each limit that applies is
//! one list item, `"name";q=QUOTA;w=WINDOW` and `"name";r=REMAINING;t=RESET` (seconds).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// One limit's state as the headers report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// The limit's name.
    pub name: Arc<str>,
    /// Requests (tokens) per window.
    pub requests: u32,
    /// The window.
    pub window: Duration,
    /// Tokens left.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// Whole seconds, rounded up: a client that waits them finds what was promised.
fn seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Appends both headers for `quotas` (nothing when empty).
pub fn append(headers: &mut HeaderMap, quotas: &[Quota]) {
    if quotas.is_empty() {
        return;
    }
    let mut policy = String::new();
    let mut state = String::new();
    for (i, q) in quotas.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        // Limit names are DNS labels (the CRD's validation): no quote or backslash.
        let _ = write!(
            policy,
            "{sep}\"{}\";q={};w={}",
            q.name,
            q.requests,
            seconds(q.window).max(1)
        );
        let _ = write!(
            state,
            "{sep}\"{}\";r={};t={}",
            q.name,
            q.remaining,
            seconds(q.reset)
        );
    }
    if let (Ok(policy), Ok(state)) = (HeaderValue::try_from(policy), HeaderValue::try_from(state)) {
        headers.insert(RATELIMIT_POLICY, policy);
        headers.insert(RATELIMIT, state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_is_one_item_of_each_header() {
        let mut headers = HeaderMap::new();
        append(&mut headers, &[]);
        assert!(headers.is_empty());
        append(
            &mut headers,
            &[
                Quota {
                    name: "per-tenant".into(),
                    requests: 20,
                    window: Duration::from_secs(1),
                    remaining: 9,
                    reset: Duration::from_millis(50),
                },
                Quota {
                    name: "total".into(),
                    requests: 100,
                    window: Duration::from_secs(3),
                    remaining: 0,
                    reset: Duration::from_millis(2_500),
                },
            ],
        );
        assert_eq!(
            headers["ratelimit-policy"],
            "\"per-tenant\";q=20;w=1, \"total\";q=100;w=3"
        );
        assert_eq!(
            headers["ratelimit"],
            "\"per-tenant\";r=9;t=1, \"total\";r=0;t=3"
        );
    }
}
