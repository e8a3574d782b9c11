//! Why the agent answered a request itself: the `x-bulwark-reason` header and its
//! values. A leaf, so that metrics, policies and the proxy can all name a reason.

/// The header that says why the agent answered a request itself (a name made once:
/// looked up by a string, it would be parsed on every request).
pub const REASON_HEADER: http::HeaderName = http::HeaderName::from_static("x-bulwark-reason");

/// A sharded service's request has no shard key and the topology has no default shard.
pub const SHARD_KEY_MISSING: &str = "shard-key-missing";
/// A write to a shard whose primary has no endpoint or an open breaker.
pub const SHARD_PRIMARY_UNAVAILABLE: &str = "shard-primary-unavailable";
/// Every endpoint's circuit breaker is open.
pub const CIRCUIT_OPEN: &str = "circuit-open";
/// The destination's bulkhead queue is full, or the wait timed out.
pub const BULKHEAD_FULL: &str = "bulkhead-full";
/// The service has no ready endpoints.
pub const NO_ENDPOINTS: &str = "no-endpoints";
/// An inbound rate limit refused the request.
pub const RATE_LIMITED: &str = "rate-limited";
/// The request or a try ran out of time.
pub const TIMEOUT: &str = "timeout";
/// No connection to the endpoint could be made.
pub const CONNECT_FAILED: &str = "connect-failed";
/// The endpoint closed or reset the connection before answering.
pub const UPSTREAM_RESET: &str = "upstream-reset";
/// The request cannot be proxied (no destination, malformed target).
pub const BAD_REQUEST: &str = "bad-request";
/// A `CONNECT` to one of the agent's own listeners or, with passthrough off, outside
/// the mesh (403).
pub const CONNECT_DENIED: &str = "connect-denied";
/// An absolute-form (or Host-named) request to one of the agent's own listeners or,
/// with passthrough off, outside the mesh (403).
pub const ABSOLUTE_FORM_DENIED: &str = "absolute-form-denied";
/// The request targets the agent's own listener.
pub const LOOP_DETECTED: &str = "loop-detected";
/// An HTTPRoute sent the request to a backend Service (or port) that does not exist,
/// or its rule gives every backend weight 0.
pub const BACKEND_NOT_FOUND: &str = "backend-not-found";
/// No rule of the pod's AuthorizationPolicies allows the caller to make the request.
pub const UNAUTHORIZED: &str = "unauthorized";
