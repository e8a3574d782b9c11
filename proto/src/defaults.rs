//! The policy API's defaults and limits, in one place for both sides: the control
//! plane applies them when a policy leaves a field out (so that the views carry
//! exact values), and the agent applies them when a field is unset on the wire (a
//! control plane of an older revision) and checks the same limits.

use std::time::Duration;

/// Default `retry.attempts`: tries in all, the first included.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Largest `retry.attempts`.
pub const MAX_ATTEMPTS: u32 = 10;
/// Default `retry.backoff.base`.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Default `retry.backoff.max`.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Default `retry.budget.ratio`.
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Largest `retry.budget.ratio`.
pub const MAX_BUDGET_RATIO: f64 = 1000.0;
/// Default `retry.budget.minPerSecond`.
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
/// Default `retry.budget.window`.
pub const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Default `retry.maxBodyBytes`: request bodies up to this size are kept for replay.
pub const DEFAULT_MAX_BODY_BYTES: u32 = 64 * 1024;
/// Default `circuitBreaker.consecutiveFailures`.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default `circuitBreaker.failureRatio.minRequests`.
pub const DEFAULT_RATIO_MIN_REQUESTS: u32 = 20;
/// Default `circuitBreaker.failureRatio.window`.
pub const DEFAULT_RATIO_WINDOW: Duration = Duration::from_secs(10);
/// Default `circuitBreaker.openDuration`.
pub const DEFAULT_OPEN_DURATION: Duration = Duration::from_secs(5);
/// Default `circuitBreaker.maxOpenDuration`.
pub const DEFAULT_MAX_OPEN_DURATION: Duration = Duration::from_secs(60);
/// Default `circuitBreaker.halfOpenProbes`.
pub const DEFAULT_HALF_OPEN_PROBES: u32 = 1;
/// Default `bulkhead.maxConcurrentRequests`.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: u32 = 100;
/// Default `bulkhead.maxPending`.
pub const DEFAULT_MAX_PENDING: u32 = 50;
/// Default `bulkhead.queueTimeout`.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_millis(250);
/// Default `bulkhead.maxConnections` (0: unlimited).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 0;
/// Default `timeout.connect`: TCP connect to one endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default rate-limit `cost`: tokens a request takes when no rule says otherwise.
pub const DEFAULT_RATE_LIMIT_COST: u32 = 1;
/// Largest rate-limit cost (per request, a rule's or a response header's).
pub const MAX_RATE_LIMIT_COST: u32 = 1_000_000;
