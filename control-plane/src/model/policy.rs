//! Validated policies with every default applied: what the index attaches to services.

use std::time::Duration;

use super::{CreationTime, ObjectName};

/// A policy's reference to a Service in the policy's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetRef {
    /// The Service's name.
    pub service: String,
    /// Narrows the policy to the service port with this name.
    pub section: Option<String>,
}

/// How callers treat a service: timeouts, retries, circuit breaking, bulkhead, balancing.
#[derive(Clone, Debug, PartialEq)]
pub struct ResiliencePolicy {
    /// Namespace and name.
    pub name: ObjectName,
    /// `metadata.creationTimestamp`, when known.
    pub created: CreationTime,
    /// The services (or service ports) the policy attaches to; never empty.
    pub targets: Vec<TargetRef>,
    /// `spec.timeout`; `None` when the section is absent.
    pub timeout: Option<Timeouts>,
    /// `spec.retry`; `None` disables retries.
    pub retry: Option<Retry>,
    /// `spec.circuitBreaker`; `None` disables the breaker.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// `spec.bulkhead`; `None` disables the bulkhead.
    pub bulkhead: Option<Bulkhead>,
    /// `spec.loadBalancer`; `None` leaves the agent's default.
    pub load_balancer: Option<LoadBalancer>,
}

/// Request and connect timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, every try and backoff included; `None`: no limit.
    pub request: Option<Duration>,
    /// TCP connect to one endpoint; `None`: the agent's default (1s).
    pub connect: Option<Duration>,
}

/// A condition under which a failed try is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RetryOn {
    /// The TCP connection to the endpoint failed.
    ConnectFailure,
    /// The connection was reset before a response arrived.
    Reset,
    /// Any 5xx response.
    Status5xx,
    /// 502, 503 or 504.
    GatewayError,
}

impl RetryOn {
    /// The name used in the policy API and on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::Status5xx => "5xx",
            RetryOn::GatewayError => "gateway-error",
        }
    }
}

/// Retry behaviour.
#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// Total tries including the first, 1..=10.
    pub attempts: u32,
    /// Limit for each try; `None`: only the request timeout applies.
    pub per_try_timeout: Option<Duration>,
    /// Backoff between tries.
    pub backoff: Backoff,
    /// Retry conditions.
    pub retry_on: Vec<RetryOn>,
    /// HTTP statuses that are retried too.
    pub status_codes: Vec<u16>,
    /// gRPC status codes (numeric) that are retried.
    pub grpc_codes: Vec<u32>,
    /// Whether non-idempotent methods (POST, PATCH) are retried.
    pub non_idempotent: bool,
    /// Limits retries relative to live traffic.
    pub budget: RetryBudget,
    /// Bodies up to this size are buffered for replay.
    pub max_body_bytes: u32,
}

/// Exponential backoff with full jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait's upper bound.
    pub base: Duration,
    /// The cap on any wait.
    pub max: Duration,
}

/// Retries may be at most `ratio` of requests over `window`, plus `min_per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    /// Retries per request, 0..=1000.
    pub ratio: f64,
    /// Retries always allowed per second.
    pub min_per_second: u32,
    /// The window the ratio is measured over.
    pub window: Duration,
}

/// Per-endpoint circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CircuitBreaker {
    /// Trip after this many consecutive failures; 0 disables this trigger.
    pub consecutive_failures: u32,
    /// Trip on a failure ratio over a window.
    pub failure_ratio: Option<FailureRatio>,
    /// First open period.
    pub open_duration: Duration,
    /// Cap of the doubling open period.
    pub max_open_duration: Duration,
    /// Probes let through when the open period ends.
    pub half_open_probes: u32,
}

/// The failure-ratio trigger of a circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRatio {
    /// Trip at this ratio, in (0, 1].
    pub threshold: f64,
    /// Requests needed in the window before the ratio counts.
    pub min_requests: u32,
    /// The measuring window.
    pub window: Duration,
}

/// Per-destination concurrency limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bulkhead {
    /// Requests in flight at once; 0: unlimited.
    pub max_concurrent_requests: u32,
    /// Requests waiting for a slot; more are rejected.
    pub max_pending: u32,
    /// How long a request may wait for a slot.
    pub queue_timeout: Duration,
    /// Upstream connections at once; 0: unlimited.
    pub max_connections: u32,
}

/// Endpoint selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancer {
    /// The strategy.
    pub strategy: Strategy,
    /// For ConsistentHash: what identifies a session.
    pub hash_on: Option<HashOn>,
    /// For WeightedRoundRobin: a pod label whose value (a positive integer) is the
    /// endpoint's weight; pods without it weigh 1.
    pub weight_label: Option<String>,
    /// For WeightedRoundRobin: weights by pod labels, first match wins (before the
    /// pod's annotation and `weight_label`).
    pub weights: Vec<WeightRule>,
}

/// One `loadBalancer.weights` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightRule {
    /// Labels the endpoint's pod must all carry.
    pub match_labels: std::collections::BTreeMap<String, String>,
    /// The weight (1 to [`crate::model::MAX_WEIGHT`]).
    pub weight: u32,
}

/// A load-balancing strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Rotate through endpoints.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// In proportion to endpoint weights.
    WeightedRoundRobin,
    /// A ring keyed by a session key (sticky sessions).
    ConsistentHash,
}

/// What identifies a session for consistent hashing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    /// A request header (lower case).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// The client's IP address.
    ClientAddress,
}

/// Token-bucket limits on requests to the target's pods (inbound) or from the mesh to the
/// target (outbound).
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitPolicy {
    /// Namespace and name.
    pub name: ObjectName,
    /// `metadata.creationTimestamp`, when known.
    pub created: CreationTime,
    /// The services (or ports) whose pods enforce the limits (inbound), or whose callers
    /// do (outbound); never empty.
    pub targets: Vec<TargetRef>,
    /// Which side enforces the limits.
    pub direction: Direction,
    /// Whether responses carry `RateLimit-Policy` and `RateLimit` headers.
    pub response_headers: bool,
    /// The limits; a request must pass all of them. Never empty, names unique.
    pub limits: Vec<Limit>,
}

/// Which requests a RateLimitPolicy limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Requests into the target's pods, enforced by their agents.
    Inbound,
    /// Requests to the target from the mesh, enforced by the callers' agents.
    Outbound,
}

/// One token bucket (per key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Unique within the policy; used in metrics.
    pub name: String,
    /// What gets its own bucket.
    pub key: LimitKey,
    /// Tokens added per `per`, at least 1.
    pub requests: u32,
    /// The refill period, more than zero.
    pub per: Duration,
    /// Bucket size, at least 1.
    pub burst: u32,
    /// Where the buckets live.
    pub scope: Scope,
    /// What a Shared limit does while the store is unreachable.
    pub on_store_unavailable: StoreUnavailable,
    /// Tokens a request takes.
    pub cost: Cost,
}

/// Where a limit's buckets live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every pod enforces the whole limit on its own (N pods accept N times the limit).
    Pod,
    /// The limit is split over the ready pods that enforce it, re-split as they come
    /// and go.
    Service,
    /// One bucket per key in the rate-limit store (Redis), shared by every agent.
    Shared,
}

/// What a Shared limit does while the store is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreUnavailable {
    /// Let every request through the limit.
    FailOpen,
    /// Refuse every request (429).
    FailClosed,
    /// Enforce the pod's split share locally, as Service scope does.
    FallbackToSplit,
}

/// Tokens a request takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cost {
    /// For a request no rule matches.
    pub default: u32,
    /// The first matching rule sets the cost.
    pub rules: Vec<CostRule>,
    /// A response header whose value is charged after the response.
    pub response_header: Option<String>,
}

impl Default for Cost {
    fn default() -> Self {
        Self {
            default: bulwark_proto::defaults::DEFAULT_RATE_LIMIT_COST,
            rules: Vec::new(),
            response_header: None,
        }
    }
}

/// A fixed cost for requests by method and path prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CostRule {
    /// Upper case; `None`: any method.
    pub method: Option<String>,
    /// `None`: any path.
    pub path_prefix: Option<String>,
    /// Tokens, at least 1.
    pub cost: u32,
}

/// What a rate limit keys its buckets on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitKey {
    /// One bucket for everyone.
    None,
    /// One bucket per client IP address.
    ClientAddress,
    /// One bucket per caller's mesh identity (plaintext callers share one).
    ClientIdentity,
    /// One bucket per value of this (lowercase) request header.
    Header(String),
}

/// A limit's share on one of `pods` pods: the rate divided exactly (`requests` per
/// `per × pods`, reduced by their common divisor) and the burst divided down, never
/// below one request. Zero pods count as one: a pod that starts enforces the whole limit
/// until the endpoints say it is ready, and then it is re-split.
pub fn split(requests: u32, per: Duration, burst: u32, pods: usize) -> (u32, Duration, u32) {
    let pods = u32::try_from(pods.max(1)).unwrap_or(u32::MAX);
    let common = gcd(requests, pods);
    let share_requests = requests / common;
    let share_per = per.saturating_mul(pods / common);
    let share_burst = (burst / pods).max(1);
    (share_requests, share_per, share_burst)
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_second(share: (u32, Duration, u32)) -> (f64, u32) {
        (f64::from(share.0) / share.1.as_secs_f64(), share.2)
    }

    #[test]
    fn the_split_divides_the_rate_exactly_as_pods_scale() {
        let second = Duration::from_secs(1);
        // No ready pod yet, and one: the whole limit.
        assert_eq!(split(100, second, 50, 0), (100, second, 50));
        assert_eq!(split(100, second, 50, 1), (100, second, 50));
        // Divisible: the same period.
        assert_eq!(split(200, second, 100, 4), (50, second, 25));
        // Not divisible: a longer period keeps the rate exact (100/3 per second).
        assert_eq!(split(100, second, 30, 3), (100, Duration::from_secs(3), 10));
        // Many pods: the burst never drops below one request.
        assert_eq!(split(10, second, 5, 20), (1, Duration::from_secs(2), 1));
        for pods in 1..=64 {
            let (rate, burst) = per_second(split(1_000, second, 200, pods));
            let total = rate * pods as f64;
            assert!(
                (total - 1_000.0).abs() < 1e-6,
                "{pods} pods: {total}/s in all"
            );
            assert!(burst as usize * pods <= 200, "{pods} pods: burst {burst}");
        }
    }
}
