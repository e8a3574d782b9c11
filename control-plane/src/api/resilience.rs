//! `ResiliencePolicy` (`bulwark.io/v1alpha1`): how callers treat a service. Defaults
//! are applied here, so that the model and the wire carry exact values.

use std::time::Duration as StdDuration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::grpc_code::GrpcCode;
use super::meta::ObjectMeta;
use super::{FieldError, field, item, target};
use crate::duration::Duration;
use crate::model::policy::{self as model, RetryOn};

// The defaults and limits shared with the agent live in `bulwark_proto::defaults`.
pub use bulwark_proto::defaults::{
    DEFAULT_ATTEMPTS, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_BUDGET_MIN_PER_SECOND,
    DEFAULT_BUDGET_RATIO, DEFAULT_BUDGET_WINDOW, DEFAULT_CONSECUTIVE_FAILURES,
    DEFAULT_HALF_OPEN_PROBES, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_OPEN_DURATION, DEFAULT_MAX_PENDING, DEFAULT_OPEN_DURATION,
    DEFAULT_QUEUE_TIMEOUT, DEFAULT_RATIO_MIN_REQUESTS, DEFAULT_RATIO_WINDOW, MAX_ATTEMPTS,
    MAX_BUDGET_RATIO,
};
/// Default `retry.retryOn`.
pub const DEFAULT_RETRY_ON: [RetryOn; 3] = [
    RetryOn::ConnectFailure,
    RetryOn::Reset,
    RetryOn::GatewayError,
];

/// A `ResiliencePolicy` document as the folder source reads it: metadata and an
/// optional spec, so that a missing spec is reported as `spec: required`.
#[derive(Clone, Debug, Deserialize)]
pub struct ResiliencePolicyDocument {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, required.
    pub spec: Option<ResiliencePolicySpec>,
}

/// How callers treat a service: timeouts, retries, a circuit breaker per endpoint, a
/// bulkhead and the load balancer. An absent section turns its mechanism off.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, kube::CustomResource)]
#[kube(
    group = "bulwark.io",
    version = "v1alpha1",
    kind = "ResiliencePolicy",
    plural = "resiliencepolicies",
    namespaced,
    doc = "A ResiliencePolicy: how callers treat the target Services (timeouts, retries, circuit breakers, bulkheads, load balancing).",
    status = "super::status::PolicyStatus",
    shortname = "rp",
    category = "bulwark",
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".spec.targetRefs[*].name","description":"the Services the policy attaches to"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].status","description":"whether the control plane applies the policy"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResiliencePolicySpec {
    /// The Services (or single ports of them, with `sectionName`) the policy applies to,
    /// in the policy's namespace. A port-level policy wins over a whole-service one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Option<Vec<target::TargetRef>>,
    /// Request and connect timeouts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<TimeoutSpec>,
    /// Retries of failed tries; absent: never retry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// A circuit breaker per endpoint; absent: no breaker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// A concurrency limit per destination service port; absent: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<BulkheadSpec>,
    /// How an endpoint is picked for each try.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
}

/// `spec.timeout`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutSpec {
    /// Budget for the whole request, every try and backoff included, until the response
    /// headers (a duration such as 2s or 1m30s; more than 0). The agent answers 504
    /// `timeout` when it runs out. Absent: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// TCP connect timeout to one endpoint (a duration, more than 0). Default 1s.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "1s"))]
    pub connect: Option<Duration>,
}

/// `spec.retry`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Tries in all, the first included (1: never retry). Default 3.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10), extend("default" = 3))]
    pub attempts: Option<u32>,
    /// Time limit of each try (a duration, more than 0); a try that runs out counts as
    /// a failure of its endpoint. Absent: only the request timeout applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// The wait before each retry (full jitter, exponential).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
    /// Failures that are retried: connect-failure (no connection), reset (connection
    /// closed before a response), gateway-error (502, 503, 504, connect failures and
    /// per-try timeouts), 5xx (any 5xx, resets, connect failures, per-try timeouts).
    /// Default [connect-failure, reset, gateway-error].
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub retry_on: Option<Vec<RetryOnSpec>>,
    /// More HTTP statuses (100..599) to retry. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(range(min = 100, max = 599)))]
    pub status_codes: Option<Vec<u32>>,
    /// gRPC statuses to retry, by name (unavailable, resource-exhausted, ...; kebab or
    /// snake case) or number 1..16, read from grpc-status. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub grpc_codes: Option<Vec<GrpcCode>>,
    /// Also retry POST, PATCH and other non-idempotent methods. Default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = false))]
    pub non_idempotent: Option<bool>,
    /// Caps retries relative to live traffic, so retries cannot multiply an outage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
    /// Request bodies up to this many bytes are buffered for replay; larger ones are
    /// sent once and never retried. Default 65536.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("default" = 65536))]
    pub max_body_bytes: Option<u32>,
}

/// A `retryOn` condition: connect-failure, reset, gateway-error or 5xx.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum RetryOnSpec {
    /// The connection to the endpoint failed.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The connection was reset.
    #[serde(rename = "reset")]
    Reset,
    /// Any 5xx.
    #[serde(rename = "5xx")]
    Status5xx,
    /// 502, 503, 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
}

impl From<RetryOnSpec> for RetryOn {
    fn from(r: RetryOnSpec) -> Self {
        match r {
            RetryOnSpec::ConnectFailure => RetryOn::ConnectFailure,
            RetryOnSpec::Reset => RetryOn::Reset,
            RetryOnSpec::Status5xx => RetryOn::Status5xx,
            RetryOnSpec::GatewayError => RetryOn::GatewayError,
        }
    }
}

/// `spec.retry.backoff`: the wait before retry n is uniform in [0, min(max, base*2^n)].
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.base) || !has(self.max) || duration(self.base) <= duration(self.max)",
    "message": "base must not exceed max",
}]))]
pub struct BackoffSpec {
    /// The first wait's upper bound (a duration, more than 0). Default 25ms, or max if
    /// that is smaller. (No schema default: it must not contradict an explicit max.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<Duration>,
    /// The cap on any wait (a duration, at least base). Default 250ms, or base if larger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<Duration>,
}

/// `spec.retry.budget`: retries may be at most `ratio` of the requests in the window,
/// plus `minPerSecond`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    /// Retries allowed per request over the window, 0..1000. Default 0.2.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000), extend("default" = 0.2))]
    pub ratio: Option<f64>,
    /// Retries per second always allowed, so low traffic can still retry. Default 10.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = 10))]
    pub min_per_second: Option<u32>,
    /// The sliding window of the budget (a duration, more than 0). Default 10s.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "10s"))]
    pub window: Option<Duration>,
}

/// `spec.circuitBreaker`: one breaker per endpoint. Failures are connect failures,
/// resets, timeouts and 5xx responses.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.openDuration) || !has(self.maxOpenDuration) || duration(self.openDuration) <= duration(self.maxOpenDuration)",
        "message": "openDuration must not exceed maxOpenDuration",
    },
    {
        "rule": "!has(self.consecutiveFailures) || self.consecutiveFailures > 0 || has(self.failureRatio)",
        "message": "consecutiveFailures 0 disables the consecutive trigger; it needs a failureRatio",
    },
]))]
pub struct CircuitBreakerSpec {
    /// Open after this many failures in a row (0: off, only with a failureRatio).
    /// Default 5.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = 5))]
    pub consecutive_failures: Option<u32>,
    /// Open on a failure ratio over a sliding window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_ratio: Option<FailureRatioSpec>,
    /// How long an open breaker refuses (a duration, more than 0); doubles each time a
    /// probe fails and resets when the breaker closes. Default 5s, or maxOpenDuration if
    /// that is smaller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_duration: Option<Duration>,
    /// Cap of the doubling open period (a duration, at least openDuration). Default 60s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_open_duration: Option<Duration>,
    /// Requests let through when the open period ends; all succeeding closes the
    /// breaker, one failing reopens it. Default 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("default" = 1))]
    pub half_open_probes: Option<u32>,
}

/// `spec.circuitBreaker.failureRatio`: open when `threshold` of the requests in the
/// window failed and at least `minRequests` were seen.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.threshold)",
        "message": "threshold is required",
    },
    {
        "rule": "!has(self.threshold) || (self.threshold > 0.0 && self.threshold <= 1.0)",
        "message": "threshold must be more than 0 and at most 1",
    },
]))]
pub struct FailureRatioSpec {
    /// The failed share of requests that opens the breaker, in (0, 1]. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1))]
    pub threshold: Option<f64>,
    /// Requests needed in the window before the ratio counts (at least 1). Default 20.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("default" = 20))]
    pub min_requests: Option<u32>,
    /// The sliding window (a duration, more than 0). Default 10s.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "10s"))]
    pub window: Option<Duration>,
}

/// `spec.bulkhead`: a concurrency limit per destination service port.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkheadSpec {
    /// Requests in flight to the service port at once. Default 100.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = 100))]
    pub max_concurrent_requests: Option<u32>,
    /// Requests waiting for a slot; more are answered 503 bulkhead-full at once.
    /// Default 50.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = 50))]
    pub max_pending: Option<u32>,
    /// Longest wait for a slot (a duration; 0s: never wait). Default 250ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "250ms"))]
    pub queue_timeout: Option<Duration>,
    /// Upstream TCP connections to the service at once (0: unlimited). Default 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = 0))]
    pub max_connections: Option<u32>,
}

/// `spec.loadBalancer`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.strategy) && self.strategy == 'ConsistentHash' ? has(self.hashOn) : !has(self.hashOn)",
        "message": "hashOn is required for ConsistentHash, and only allowed then",
    },
    {
        "rule": "!has(self.weightLabel) || (has(self.strategy) && self.strategy == 'WeightedRoundRobin')",
        "message": "weightLabel is only allowed for WeightedRoundRobin",
    },
    {
        "rule": "!has(self.weights) || (has(self.strategy) && self.strategy == 'WeightedRoundRobin')",
        "message": "weights is only allowed for WeightedRoundRobin",
    },
]))]
pub struct LoadBalancerSpec {
    /// LeastRequest (power of two choices on requests in flight), RoundRobin, Random,
    /// WeightedRoundRobin (by the weightLabel of each endpoint's pod) or ConsistentHash
    /// (sticky sessions, keyed by hashOn). Default LeastRequest.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "LeastRequest"))]
    pub strategy: Option<StrategySpec>,
    /// For ConsistentHash: what identifies a session (exactly one of header, cookie,
    /// clientAddress).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOnSpec>,
    /// For WeightedRoundRobin: the pod label whose value (an integer from 1 to 10000)
    /// is the endpoint's weight. Pods without it weigh 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub weight_label: Option<String>,
    /// For WeightedRoundRobin: weights by pod labels. The first entry whose selector
    /// matches an endpoint's pod gives its weight; it takes precedence over the pod's
    /// bulwark.io/weight annotation, which takes precedence over weightLabel.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub weights: Option<Vec<WeightSpec>>,
}

/// `spec.loadBalancer.weights[]`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightSpec {
    /// The pods this weight is for.
    pub selector: super::shard::SelectorSpec,
    /// Their endpoints' weight, from 1 to 10000.
    #[schemars(range(min = 1, max = 10000))]
    pub weight: u32,
}

/// `spec.loadBalancer.strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
// Bounded for the API server's CEL cost estimator, which counts enums as unbounded
// strings before 1.30.
#[schemars(extend("maxLength" = 32))]
pub enum StrategySpec {
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Rotate through endpoints.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// In proportion to endpoint weights.
    WeightedRoundRobin,
    /// A ring keyed by hashOn (sticky sessions).
    ConsistentHash,
}

/// `spec.loadBalancer.hashOn`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.header), has(self.cookie), has(self.clientAddress)].filter(x, x).size() == 1",
    "message": "exactly one of header, cookie and clientAddress",
}]))]
pub struct HashOnSpec {
    /// A request header (lower case).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub header: Option<String>,
    /// A cookie name.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub cookie: Option<String>,
    /// true: the client's IP address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_address: Option<bool>,
}

impl LoadBalancerSpec {
    fn validate(self, path: &str) -> Result<model::LoadBalancer, FieldError> {
        let strategy = match self.strategy {
            None | Some(StrategySpec::LeastRequest) => model::Strategy::LeastRequest,
            Some(StrategySpec::RoundRobin) => model::Strategy::RoundRobin,
            Some(StrategySpec::Random) => model::Strategy::Random,
            Some(StrategySpec::WeightedRoundRobin) => model::Strategy::WeightedRoundRobin,
            Some(StrategySpec::ConsistentHash) => model::Strategy::ConsistentHash,
        };
        let hash_on = match (strategy, self.hash_on) {
            (model::Strategy::ConsistentHash, Some(h)) => {
                let hash_path = field(path, "hashOn");
                Some(match (h.header, h.cookie, h.client_address) {
                    (Some(header), None, None | Some(false)) => {
                        if header.is_empty()
                            || header.bytes().any(|b| b.is_ascii_uppercase())
                            || http::HeaderName::try_from(header.as_str()).is_err()
                        {
                            return Err(FieldError::new(
                                field(&hash_path, "header"),
                                "must be a lower-case header name",
                            ));
                        }
                        model::HashOn::Header(header)
                    }
                    (None, Some(cookie), None | Some(false)) if !cookie.is_empty() => {
                        model::HashOn::Cookie(cookie)
                    }
                    (None, None, Some(true)) => model::HashOn::ClientAddress,
                    _ => {
                        return Err(FieldError::new(
                            hash_path,
                            "exactly one of header, cookie and clientAddress",
                        ));
                    }
                })
            }
            (model::Strategy::ConsistentHash, None) => {
                return Err(FieldError::new(
                    field(path, "hashOn"),
                    "is required for ConsistentHash",
                ));
            }
            (_, Some(_)) => {
                return Err(FieldError::new(
                    field(path, "hashOn"),
                    "is only allowed for ConsistentHash",
                ));
            }
            (_, None) => None,
        };
        if self.weight_label.is_some() && strategy != model::Strategy::WeightedRoundRobin {
            return Err(FieldError::new(
                field(path, "weightLabel"),
                "is only allowed for WeightedRoundRobin",
            ));
        }
        let weights_path = field(path, "weights");
        let weights = match self.weights {
            Some(_) if strategy != model::Strategy::WeightedRoundRobin => {
                return Err(FieldError::new(
                    weights_path,
                    "is only allowed for WeightedRoundRobin",
                ));
            }
            Some(weights) if weights.is_empty() || weights.len() > 64 => {
                return Err(FieldError::new(weights_path, "must hold 1 to 64 entries"));
            }
            Some(weights) => weights
                .into_iter()
                .enumerate()
                .map(|(i, w)| {
                    let at = item(&weights_path, i);
                    if w.selector.match_labels.is_empty() {
                        return Err(FieldError::new(
                            field(&field(&at, "selector"), "matchLabels"),
                            "needs at least one label",
                        ));
                    }
                    if !(1..=crate::model::MAX_WEIGHT).contains(&w.weight) {
                        return Err(FieldError::new(
                            field(&at, "weight"),
                            format!("{} is not between 1 and 10000", w.weight),
                        ));
                    }
                    Ok(model::WeightRule {
                        match_labels: w
                            .selector
                            .checked_labels(&field(&field(&at, "selector"), "matchLabels"))?,
                        weight: w.weight,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        Ok(model::LoadBalancer {
            strategy,
            hash_on,
            weight_label: self.weight_label.filter(|l| !l.is_empty()),
            weights,
        })
    }
}

impl TryFrom<ResiliencePolicyDocument> for model::ResiliencePolicy {
    type Error = FieldError;

    fn try_from(policy: ResiliencePolicyDocument) -> Result<Self, FieldError> {
        let name = policy.metadata.object_name()?;
        let spec = policy.spec.ok_or_else(|| FieldError::required("spec"))?;
        spec.validate(name, policy.metadata.creation_timestamp)
    }
}

impl ResiliencePolicySpec {
    /// Checks the spec (every rule, CEL ones included) and applies the defaults.
    pub fn validate(
        self,
        name: crate::model::ObjectName,
        created: Option<crate::timestamp::Timestamp>,
    ) -> Result<model::ResiliencePolicy, FieldError> {
        let spec = self;
        Ok(model::ResiliencePolicy {
            name,
            created,
            targets: target::validate(spec.target_refs, "spec.targetRefs")?,
            timeout: spec
                .timeout
                .map(|t| t.validate("spec.timeout"))
                .transpose()?,
            retry: spec.retry.map(|r| r.validate("spec.retry")).transpose()?,
            circuit_breaker: spec
                .circuit_breaker
                .map(|c| c.validate("spec.circuitBreaker"))
                .transpose()?,
            bulkhead: spec.bulkhead.map(|b| b.validate("spec.bulkhead")),
            load_balancer: spec
                .load_balancer
                .map(|lb| lb.validate("spec.loadBalancer"))
                .transpose()?,
        })
    }
}

/// A duration that must be more than zero, where present.
pub(crate) fn positive(
    value: Option<Duration>,
    path: &str,
    name: &str,
) -> Result<Option<StdDuration>, FieldError> {
    match value {
        Some(d) if d.is_zero() => Err(FieldError::new(field(path, name), "must be greater than 0")),
        other => Ok(other.map(Duration::as_std)),
    }
}

fn show(d: StdDuration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A lower bound and an upper bound with defaults: a default never contradicts an
/// explicit value (an explicit `base: 1s` lifts the default `max` to 1s), so only two
/// explicit, inconsistent values are an error.
fn ordered_pair(
    path: &str,
    (low_name, low, low_default): (&str, Option<StdDuration>, StdDuration),
    (high_name, high, high_default): (&str, Option<StdDuration>, StdDuration),
) -> Result<(StdDuration, StdDuration), FieldError> {
    match (low, high) {
        (Some(low), Some(high)) if low > high => Err(FieldError::new(
            path,
            format!(
                "{low_name} ({}) must not exceed {high_name} ({})",
                show(low),
                show(high)
            ),
        )),
        (Some(low), Some(high)) => Ok((low, high)),
        (Some(low), None) => Ok((low, high_default.max(low))),
        (None, Some(high)) => Ok((low_default.min(high), high)),
        (None, None) => Ok((low_default, high_default)),
    }
}

impl TimeoutSpec {
    fn validate(self, path: &str) -> Result<model::Timeouts, FieldError> {
        Ok(model::Timeouts {
            request: positive(self.request, path, "request")?,
            connect: positive(self.connect, path, "connect")?,
        })
    }
}

impl RetrySpec {
    fn validate(self, path: &str) -> Result<model::Retry, FieldError> {
        let attempts = self.attempts.unwrap_or(DEFAULT_ATTEMPTS);
        if !(1..=MAX_ATTEMPTS).contains(&attempts) {
            return Err(FieldError::new(
                field(path, "attempts"),
                format!(
                    "must be between 1 and {MAX_ATTEMPTS} (tries in all, the first included), \
                     got {attempts}"
                ),
            ));
        }
        let per_try_timeout = positive(self.per_try_timeout, path, "perTryTimeout")?;
        let backoff_path = field(path, "backoff");
        let (base, max) = match self.backoff {
            Some(b) => ordered_pair(
                &backoff_path,
                (
                    "base",
                    positive(b.base, &backoff_path, "base")?,
                    DEFAULT_BACKOFF_BASE,
                ),
                (
                    "max",
                    positive(b.max, &backoff_path, "max")?,
                    DEFAULT_BACKOFF_MAX,
                ),
            )?,
            None => (DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX),
        };

        let retry_on = match self.retry_on {
            None => DEFAULT_RETRY_ON.to_vec(),
            Some(list) => {
                let list: Vec<RetryOn> = list.into_iter().map(RetryOn::from).collect();
                unique(&list, &field(path, "retryOn"), |r| r.as_str().to_owned())?;
                list
            }
        };

        let status_path = field(path, "statusCodes");
        let mut status_codes = Vec::new();
        for (i, code) in self
            .status_codes
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            match u16::try_from(code) {
                Ok(code) if (100..=599).contains(&code) => status_codes.push(code),
                _ => {
                    return Err(FieldError::new(
                        item(&status_path, i),
                        format!("must be an HTTP status between 100 and 599, got {code}"),
                    ));
                }
            }
        }
        unique(&status_codes, &status_path, u16::to_string)?;

        let grpc_path = field(path, "grpcCodes");
        let grpc = self.grpc_codes.unwrap_or_default();
        if let Some(i) = grpc.iter().position(|c| c.code() == 0) {
            return Err(FieldError::new(
                item(&grpc_path, i),
                "ok (0) is success and cannot be retried",
            ));
        }
        unique(&grpc, &grpc_path, GrpcCode::to_string)?;

        let budget_path = field(path, "budget");
        let budget = match self.budget {
            None => model::RetryBudget {
                ratio: DEFAULT_BUDGET_RATIO,
                min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
                window: DEFAULT_BUDGET_WINDOW,
            },
            Some(b) => {
                let ratio = b.ratio.unwrap_or(DEFAULT_BUDGET_RATIO);
                if !(0.0..=MAX_BUDGET_RATIO).contains(&ratio) {
                    return Err(FieldError::new(
                        field(&budget_path, "ratio"),
                        format!(
                            "must be between 0 and {MAX_BUDGET_RATIO} (retries per request), \
                             got {ratio}"
                        ),
                    ));
                }
                model::RetryBudget {
                    ratio,
                    min_per_second: b.min_per_second.unwrap_or(DEFAULT_BUDGET_MIN_PER_SECOND),
                    window: positive(b.window, &budget_path, "window")?
                        .unwrap_or(DEFAULT_BUDGET_WINDOW),
                }
            }
        };

        let max_body_bytes = self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err(FieldError::new(
                field(path, "maxBodyBytes"),
                "must be at least 1 (requests with larger bodies are sent once, never retried)",
            ));
        }

        Ok(model::Retry {
            attempts,
            per_try_timeout,
            backoff: model::Backoff { base, max },
            retry_on,
            status_codes,
            grpc_codes: grpc.into_iter().map(GrpcCode::code).collect(),
            non_idempotent: self.non_idempotent.unwrap_or(false),
            budget,
            max_body_bytes,
        })
    }
}

/// Rejects a list with a repeated value, naming the repeat's index.
fn unique<T: PartialEq>(
    list: &[T],
    path: &str,
    show: impl Fn(&T) -> String,
) -> Result<(), FieldError> {
    for (i, value) in list.iter().enumerate() {
        if list[..i].contains(value) {
            return Err(FieldError::new(
                item(path, i),
                format!("duplicate value {}", show(value)),
            ));
        }
    }
    Ok(())
}

impl CircuitBreakerSpec {
    fn validate(self, path: &str) -> Result<model::CircuitBreaker, FieldError> {
        let failure_ratio = self
            .failure_ratio
            .map(|r| r.validate(&field(path, "failureRatio")))
            .transpose()?;
        let consecutive_failures = self
            .consecutive_failures
            .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES);
        if consecutive_failures == 0 && failure_ratio.is_none() {
            return Err(FieldError::new(
                field(path, "consecutiveFailures"),
                "0 disables the consecutive-failures trigger and there is no failureRatio, \
                 so the breaker could never open; remove the circuitBreaker section instead",
            ));
        }
        let (open_duration, max_open_duration) = ordered_pair(
            path,
            (
                "openDuration",
                positive(self.open_duration, path, "openDuration")?,
                DEFAULT_OPEN_DURATION,
            ),
            (
                "maxOpenDuration",
                positive(self.max_open_duration, path, "maxOpenDuration")?,
                DEFAULT_MAX_OPEN_DURATION,
            ),
        )?;
        let half_open_probes = self.half_open_probes.unwrap_or(DEFAULT_HALF_OPEN_PROBES);
        if half_open_probes == 0 {
            return Err(FieldError::new(
                field(path, "halfOpenProbes"),
                "must be at least 1, or the breaker would never close again",
            ));
        }
        Ok(model::CircuitBreaker {
            consecutive_failures,
            failure_ratio,
            open_duration,
            max_open_duration,
            half_open_probes,
        })
    }
}

impl FailureRatioSpec {
    fn validate(self, path: &str) -> Result<model::FailureRatio, FieldError> {
        let threshold = self
            .threshold
            .ok_or_else(|| FieldError::required(field(path, "threshold")))?;
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(FieldError::new(
                field(path, "threshold"),
                format!(
                    "must be more than 0 and at most 1 (a fraction of requests), got {threshold}"
                ),
            ));
        }
        let min_requests = self.min_requests.unwrap_or(DEFAULT_RATIO_MIN_REQUESTS);
        if min_requests == 0 {
            return Err(FieldError::new(
                field(path, "minRequests"),
                "must be at least 1",
            ));
        }
        Ok(model::FailureRatio {
            threshold,
            min_requests,
            window: positive(self.window, path, "window")?.unwrap_or(DEFAULT_RATIO_WINDOW),
        })
    }
}

impl BulkheadSpec {
    fn validate(self, _path: &str) -> model::Bulkhead {
        model::Bulkhead {
            max_concurrent_requests: self
                .max_concurrent_requests
                .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS),
            max_pending: self.max_pending.unwrap_or(DEFAULT_MAX_PENDING),
            // Zero is meaningful: never wait, reject as soon as every slot is taken.
            queue_timeout: self
                .queue_timeout
                .map_or(DEFAULT_QUEUE_TIMEOUT, Duration::as_std),
            max_connections: self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectName;

    const HEAD: &str = "metadata: {name: p, namespace: demo}\n";

    fn policy(spec: &str) -> Result<model::ResiliencePolicy, FieldError> {
        let yaml = format!("{HEAD}spec:\n  targetRefs: [{{kind: Service, name: reviews}}]\n{spec}");
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let typed: ResiliencePolicyDocument = serde_path_to_error::deserialize(value)
            .map_err(|e| FieldError::new(e.path().to_string(), e.into_inner().to_string()))?;
        typed.try_into()
    }

    fn error(spec: &str) -> String {
        policy(spec).unwrap_err().to_string()
    }

    fn ms(n: u64) -> StdDuration {
        StdDuration::from_millis(n)
    }

    #[test]
    fn absent_sections_stay_absent() {
        let p = policy("").unwrap();
        assert_eq!(p.name, ObjectName::new("demo", "p"));
        assert!(p.timeout.is_none() && p.retry.is_none() && p.circuit_breaker.is_none());
        assert!(p.bulkhead.is_none() && p.load_balancer.is_none());
    }

    #[test]
    fn empty_sections_get_every_default() {
        let p = policy(
            "  timeout: {}\n  retry: {}\n  circuitBreaker: {}\n  bulkhead: {}\n  loadBalancer: {}\n",
        )
        .unwrap();
        assert_eq!(
            p.timeout,
            Some(model::Timeouts {
                request: None,
                connect: None
            })
        );
        let retry = p.retry.unwrap();
        assert_eq!(retry.attempts, 3);
        assert_eq!(retry.per_try_timeout, None);
        assert_eq!(
            retry.backoff,
            model::Backoff {
                base: ms(25),
                max: ms(250)
            }
        );
        assert_eq!(
            retry.retry_on,
            vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::GatewayError
            ]
        );
        assert!(retry.status_codes.is_empty() && retry.grpc_codes.is_empty());
        assert!(!retry.non_idempotent);
        assert_eq!(
            retry.budget,
            model::RetryBudget {
                ratio: 0.2,
                min_per_second: 10,
                window: ms(10_000)
            }
        );
        assert_eq!(retry.max_body_bytes, 65_536);
        let cb = p.circuit_breaker.unwrap();
        assert_eq!(cb.consecutive_failures, 5);
        assert_eq!(cb.failure_ratio, None);
        assert_eq!(
            (cb.open_duration, cb.max_open_duration),
            (ms(5_000), ms(60_000))
        );
        assert_eq!(cb.half_open_probes, 1);
        assert_eq!(
            p.bulkhead,
            Some(model::Bulkhead {
                max_concurrent_requests: 100,
                max_pending: 50,
                queue_timeout: ms(250),
                max_connections: 0
            })
        );
        assert_eq!(
            p.load_balancer.clone().unwrap().strategy,
            model::Strategy::LeastRequest
        );
    }

    #[test]
    fn explicit_values_are_kept() {
        let p = policy(
            "  timeout: {request: 2s, connect: 250ms}\n\
             \x20 retry:\n    attempts: 2\n    perTryTimeout: 500ms\n    backoff: {base: 10ms, max: 1s}\n\
             \x20   retryOn: [5xx]\n    statusCodes: [500, 429]\n    grpcCodes: [unavailable, 8]\n\
             \x20   nonIdempotent: true\n    budget: {ratio: 0.5, minPerSecond: 0, window: 1m}\n\
             \x20   maxBodyBytes: 1024\n\
             \x20 circuitBreaker:\n    consecutiveFailures: 0\n    failureRatio: {threshold: 0.5}\n\
             \x20 loadBalancer: {strategy: RoundRobin}\n",
        )
        .unwrap();
        assert_eq!(p.timeout.unwrap().request, Some(ms(2_000)));
        let r = p.retry.unwrap();
        assert_eq!(r.attempts, 2);
        assert_eq!(r.per_try_timeout, Some(ms(500)));
        assert_eq!(
            r.backoff,
            model::Backoff {
                base: ms(10),
                max: ms(1_000)
            }
        );
        assert_eq!(r.retry_on, vec![RetryOn::Status5xx]);
        assert_eq!(r.status_codes, vec![500, 429]);
        assert_eq!(r.grpc_codes, vec![14, 8]);
        assert!(r.non_idempotent);
        assert_eq!(r.budget.min_per_second, 0);
        assert_eq!(r.budget.window, ms(60_000));
        assert_eq!(r.max_body_bytes, 1024);
        let cb = p.circuit_breaker.unwrap();
        assert_eq!(cb.consecutive_failures, 0);
        assert_eq!(
            cb.failure_ratio,
            Some(model::FailureRatio {
                threshold: 0.5,
                min_requests: 20,
                window: ms(10_000)
            })
        );
        assert_eq!(
            p.load_balancer.clone().unwrap().strategy,
            model::Strategy::RoundRobin
        );
    }

    #[test]
    fn defaults_never_contradict_explicit_bounds() {
        let r = policy("  retry: {backoff: {base: 1s}}\n")
            .unwrap()
            .retry
            .unwrap();
        assert_eq!(
            r.backoff,
            model::Backoff {
                base: ms(1_000),
                max: ms(1_000)
            }
        );
        let r = policy("  retry: {backoff: {max: 10ms}}\n")
            .unwrap()
            .retry
            .unwrap();
        assert_eq!(
            r.backoff,
            model::Backoff {
                base: ms(10),
                max: ms(10)
            }
        );
        let cb = policy("  circuitBreaker: {openDuration: 90s}\n")
            .unwrap()
            .circuit_breaker
            .unwrap();
        assert_eq!(
            (cb.open_duration, cb.max_open_duration),
            (ms(90_000), ms(90_000))
        );
    }

    #[test]
    fn each_validation_rule_names_its_path_and_reason() {
        let cases = [
            (
                "  retry: {attempts: 0}\n",
                "spec.retry.attempts: must be between 1 and 10",
            ),
            (
                "  retry: {attempts: 11}\n",
                "spec.retry.attempts: must be between 1 and 10",
            ),
            (
                "  retry: {attempts: -1}\n",
                "spec.retry.attempts: invalid value: integer `-1`",
            ),
            (
                "  retry: {backoff: {base: 2s, max: 1s}}\n",
                "spec.retry.backoff: base (2s) must not exceed max (1s)",
            ),
            (
                "  retry: {backoff: {base: 0s}}\n",
                "spec.retry.backoff.base: must be greater than 0",
            ),
            (
                "  retry: {perTryTimeout: 0ms}\n",
                "spec.retry.perTryTimeout: must be greater than 0",
            ),
            (
                "  retry: {retryOn: [reset, 5xxx]}\n",
                "spec.retry.retryOn[1]: unknown variant `5xxx`",
            ),
            (
                "  retry: {retryOn: [reset, reset]}\n",
                "spec.retry.retryOn[1]: duplicate value reset",
            ),
            (
                "  retry: {statusCodes: [500, 600]}\n",
                "spec.retry.statusCodes[1]: must be an HTTP status between 100 and 599, got 600",
            ),
            (
                "  retry: {statusCodes: [99]}\n",
                "spec.retry.statusCodes[0]: must be an HTTP status",
            ),
            (
                "  retry: {grpcCodes: [nope]}\n",
                "spec.retry.grpcCodes[0]: unknown gRPC status code",
            ),
            (
                "  retry: {grpcCodes: [ok]}\n",
                "spec.retry.grpcCodes[0]: ok (0) is success",
            ),
            (
                "  retry: {grpcCodes: [14, unavailable]}\n",
                "spec.retry.grpcCodes[1]: duplicate value unavailable (14)",
            ),
            (
                "  retry: {budget: {ratio: -0.1}}\n",
                "spec.retry.budget.ratio: must be between 0 and 1000",
            ),
            (
                "  retry: {budget: {ratio: 1001}}\n",
                "spec.retry.budget.ratio: must be between 0 and 1000",
            ),
            (
                "  retry: {budget: {ratio: .nan}}\n",
                "spec.retry.budget.ratio: must be between 0 and 1000",
            ),
            (
                "  retry: {budget: {window: 0s}}\n",
                "spec.retry.budget.window: must be greater than 0",
            ),
            (
                "  retry: {maxBodyBytes: 0}\n",
                "spec.retry.maxBodyBytes: must be at least 1",
            ),
            (
                "  retry: {tries: 3}\n",
                "spec.retry.tries: unknown field `tries`, expected one of `attempts`",
            ),
            (
                "  timeout: {request: 0s}\n",
                "spec.timeout.request: must be greater than 0",
            ),
            (
                "  timeout: {connect: 1.5s}\n",
                "spec.timeout.connect: invalid duration \"1.5s\"",
            ),
            (
                "  timeout: {request: 5}\n",
                "spec.timeout.request: invalid type: integer `5`",
            ),
            (
                "  circuitBreaker: {failureRatio: {minRequests: 5}}\n",
                "spec.circuitBreaker.failureRatio.threshold: required",
            ),
            (
                "  circuitBreaker: {failureRatio: {threshold: 0}}\n",
                "spec.circuitBreaker.failureRatio.threshold: must be more than 0 and at most 1",
            ),
            (
                "  circuitBreaker: {failureRatio: {threshold: 1.5}}\n",
                "spec.circuitBreaker.failureRatio.threshold: must be more than 0 and at most 1",
            ),
            (
                "  circuitBreaker: {failureRatio: {threshold: 0.5, minRequests: 0}}\n",
                "spec.circuitBreaker.failureRatio.minRequests: must be at least 1",
            ),
            (
                "  circuitBreaker: {failureRatio: {threshold: 0.5, window: 0s}}\n",
                "spec.circuitBreaker.failureRatio.window: must be greater than 0",
            ),
            (
                "  circuitBreaker: {openDuration: 2m, maxOpenDuration: 1m}\n",
                "spec.circuitBreaker: openDuration (2m) must not exceed maxOpenDuration (1m)",
            ),
            (
                "  circuitBreaker: {openDuration: 0s}\n",
                "spec.circuitBreaker.openDuration: must be greater than 0",
            ),
            (
                "  circuitBreaker: {halfOpenProbes: 0}\n",
                "spec.circuitBreaker.halfOpenProbes: must be at least 1",
            ),
            (
                "  circuitBreaker: {consecutiveFailures: 0}\n",
                "spec.circuitBreaker.consecutiveFailures: 0 disables",
            ),
            (
                "  bulkhead: {maxPending: -3}\n",
                "spec.bulkhead.maxPending: invalid value",
            ),
            (
                "  loadBalancer: {strategy: Fastest}\n",
                "spec.loadBalancer.strategy: unknown variant `Fastest`",
            ),
            ("  retries: {}\n", "spec.retries: unknown field `retries`"),
        ];
        for (spec, expected) in cases {
            let got = error(spec);
            assert!(
                got.starts_with(expected),
                "for {spec:?}\n  got:      {got}\n  expected: {expected}"
            );
        }
    }

    #[test]
    fn a_zero_queue_timeout_means_never_wait() {
        let b = policy("  bulkhead: {queueTimeout: 0s}\n")
            .unwrap()
            .bulkhead
            .unwrap();
        assert_eq!(b.queue_timeout, StdDuration::ZERO);
    }

    #[test]
    fn spec_and_name_are_required() {
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(HEAD).unwrap();
        let p: ResiliencePolicyDocument = serde_yaml_ng::from_value(value).unwrap();
        assert_eq!(
            model::ResiliencePolicy::try_from(p)
                .unwrap_err()
                .to_string(),
            "spec: required"
        );
        let p: ResiliencePolicyDocument =
            serde_yaml_ng::from_str("metadata: {namespace: demo}\nspec: {}\n").unwrap();
        assert_eq!(
            model::ResiliencePolicy::try_from(p)
                .unwrap_err()
                .to_string(),
            "metadata.name: required"
        );
    }

    #[test]
    fn load_balancer_strategies_validate_their_options() {
        let lb = |spec: &str| {
            policy(&format!("  loadBalancer: {spec}\n")).map(|p| p.load_balancer.unwrap())
        };
        let ch = lb("{strategy: ConsistentHash, hashOn: {header: x-user}}").unwrap();
        assert_eq!(ch.strategy, model::Strategy::ConsistentHash);
        assert_eq!(ch.hash_on, Some(model::HashOn::Header("x-user".into())));
        let ch = lb("{strategy: ConsistentHash, hashOn: {clientAddress: true}}").unwrap();
        assert_eq!(ch.hash_on, Some(model::HashOn::ClientAddress));
        let wrr = lb("{strategy: WeightedRoundRobin, weightLabel: bulwark.io/weight}").unwrap();
        assert_eq!(wrr.weight_label.as_deref(), Some("bulwark.io/weight"));
        let wrr = lb("{strategy: WeightedRoundRobin, weights: [{selector: {matchLabels: {tier: gold}}, weight: 5}]}").unwrap();
        assert_eq!(wrr.weights.len(), 1);
        assert_eq!(wrr.weights[0].weight, 5);
        assert_eq!(wrr.weights[0].match_labels["tier"], "gold");
        assert_eq!(
            error(
                "  loadBalancer: {strategy: RoundRobin, weights: [{selector: {matchLabels: {a: b}}, weight: 2}]}\n"
            ),
            "spec.loadBalancer.weights: is only allowed for WeightedRoundRobin"
        );
        assert_eq!(
            error(
                "  loadBalancer: {strategy: WeightedRoundRobin, weights: [{selector: {matchLabels: {a: b}}, weight: 0}]}\n"
            ),
            "spec.loadBalancer.weights[0].weight: 0 is not between 1 and 10000"
        );
        assert_eq!(
            error(
                "  loadBalancer: {strategy: WeightedRoundRobin, weights: [{selector: {matchLabels: {a: b}}, weight: 1}, {selector: {}, weight: 2}]}\n"
            ),
            "spec.loadBalancer.weights[1].selector.matchLabels: needs at least one label"
        );
        // The schema's bounds hold in the folder source too.
        let long = "v".repeat(64);
        assert_eq!(
            error(&format!(
                "  loadBalancer: {{strategy: WeightedRoundRobin, weights: [{{selector: {{matchLabels: {{tier: {long}}}}}, weight: 1}}]}}\n"
            )),
            "spec.loadBalancer.weights[0].selector.matchLabels.tier: is 64 characters long; at most 63"
        );
        let many: Vec<String> = (0..17).map(|i| format!("l{i}: x")).collect();
        assert_eq!(
            error(&format!(
                "  loadBalancer: {{strategy: WeightedRoundRobin, weights: [{{selector: {{matchLabels: {{{}}}}}, weight: 1}}]}}\n",
                many.join(", ")
            )),
            "spec.loadBalancer.weights[0].selector.matchLabels: names 17 labels; at most 16"
        );
        assert_eq!(
            error("  loadBalancer: {strategy: WeightedRoundRobin, weights: []}\n"),
            "spec.loadBalancer.weights: must hold 1 to 64 entries"
        );
        assert_eq!(
            lb("{strategy: Random}").unwrap().strategy,
            model::Strategy::Random
        );

        assert_eq!(
            error("  loadBalancer: {strategy: ConsistentHash}\n"),
            "spec.loadBalancer.hashOn: is required for ConsistentHash"
        );
        assert_eq!(
            error("  loadBalancer: {strategy: ConsistentHash, hashOn: {header: a, cookie: b}}\n"),
            "spec.loadBalancer.hashOn: exactly one of header, cookie and clientAddress"
        );
        assert_eq!(
            error("  loadBalancer: {strategy: ConsistentHash, hashOn: {header: X-User}}\n"),
            "spec.loadBalancer.hashOn.header: must be a lower-case header name"
        );
        assert_eq!(
            error("  loadBalancer: {strategy: RoundRobin, hashOn: {cookie: s}}\n"),
            "spec.loadBalancer.hashOn: is only allowed for ConsistentHash"
        );
        assert_eq!(
            error("  loadBalancer: {strategy: Random, weightLabel: w}\n"),
            "spec.loadBalancer.weightLabel: is only allowed for WeightedRoundRobin"
        );
    }
}
