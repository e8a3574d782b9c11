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

/// Token-bucket limits on inbound requests to the target's pods.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitPolicy {
    /// Namespace and name.
    pub name: ObjectName,
    /// `metadata.creationTimestamp`, when known.
    pub created: CreationTime,
    /// The services (or ports) whose pods enforce the limits; never empty.
    pub targets: Vec<TargetRef>,
    /// The limits; a request must pass all of them. Never empty, names unique.
    pub limits: Vec<Limit>,
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
