//! Retry policy: which failed tries are retried, how many, with what backoff.
//!
//! This module holds the validated policy and the decision of whether one outcome
//! may be retried; [`Retries`] is the retry loop of one request as state (tries left,
//! endpoints tried, backoff, budget), which the proxy's outbound path drives.

pub mod backoff;
pub mod budget;
pub mod tries;

pub use tries::{Backoff, NoRetry, Retries};

use std::time::Duration;

use bulwark_proto::{defaults, v1};
use http::Method;
use serde::Serialize;

use crate::policy::retry::backoff::{BackoffConfig, InvalidBackoff};
use crate::policy::retry::budget::{BudgetConfig, InvalidBudget};

/// Most tries a policy may ask for.
pub const MAX_ATTEMPTS: u32 = defaults::MAX_ATTEMPTS;
/// Request bodies up to this size are buffered for replay when the policy says 0.
pub const DEFAULT_MAX_BODY_BYTES: usize = defaults::DEFAULT_MAX_BODY_BYTES as usize;

/// A snapshot's retry section that cannot be enforced.
#[derive(Debug, thiserror::Error)]
pub enum InvalidRetry {
    /// attempts out of range.
    #[error("retry.attempts must be 1..={MAX_ATTEMPTS}, got {0}")]
    Attempts(u32),
    /// An unknown retry-on condition.
    #[error(
        "retry.retry_on: unknown condition {0:?} (known: connect-failure, reset, 5xx, gateway-error)"
    )]
    Condition(String),
    /// A status code outside 100..=599.
    #[error("retry.status_codes: {0} is not an HTTP status code")]
    StatusCode(u32),
    /// A gRPC code outside 0..=16.
    #[error("retry.grpc_codes: {0} is not a gRPC status code (0..=16)")]
    GrpcCode(u32),
    /// A negative or overflowing per-try timeout.
    #[error("retry.per_try_timeout: {0}")]
    PerTryTimeout(#[source] crate::policy::duration::InvalidDuration),
    /// Bad backoff.
    #[error("retry.backoff: {0}")]
    Backoff(#[from] InvalidBackoff),
    /// Bad budget.
    #[error("retry.budget: {0}")]
    Budget(#[from] InvalidBudget),
}

/// What failed in one try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made.
    Connect,
    /// The connection closed or reset before a response.
    Reset,
    /// The try's time ran out.
    Timeout,
}

/// A validated retry policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// Limit for each try.
    #[serde(with = "crate::policy::duration::opt_duration_ms")]
    pub per_try_timeout: Option<Duration>,
    /// Backoff between tries.
    #[serde(skip)]
    pub backoff: BackoffConfig,
    /// Retry when no connection could be made.
    pub on_connect_failure: bool,
    /// Retry when the connection reset before a response.
    pub on_reset: bool,
    /// Retry any 5xx (and connect failures, resets and per-try timeouts).
    pub on_5xx: bool,
    /// Retry 502, 503, 504 (and connect failures and per-try timeouts).
    pub on_gateway_error: bool,
    /// Extra HTTP statuses retried.
    pub status_codes: Vec<u16>,
    /// gRPC status codes retried.
    pub grpc_codes: Vec<u32>,
    /// Retry methods that are not idempotent too.
    pub non_idempotent: bool,
    /// The retry budget, if any.
    #[serde(skip)]
    pub budget: Option<BudgetConfig>,
    /// Bodies up to this size are buffered for replay.
    pub max_body_bytes: usize,
}

impl TryFrom<&v1::Retry> for RetryPolicy {
    type Error = InvalidRetry;

    fn try_from(p: &v1::Retry) -> Result<Self, InvalidRetry> {
        if !(1..=MAX_ATTEMPTS).contains(&p.attempts) {
            return Err(InvalidRetry::Attempts(p.attempts));
        }
        let mut policy = Self {
            attempts: p.attempts,
            per_try_timeout: p
                .per_try_timeout
                .as_ref()
                .map(crate::policy::duration::duration)
                .transpose()
                .map_err(InvalidRetry::PerTryTimeout)?,
            backoff: match &p.backoff {
                Some(b) => BackoffConfig::try_from(b)?,
                None => BackoffConfig {
                    base: Duration::from_millis(25),
                    max: Duration::from_millis(250),
                },
            },
            on_connect_failure: false,
            on_reset: false,
            on_5xx: false,
            on_gateway_error: false,
            status_codes: Vec::with_capacity(p.status_codes.len()),
            grpc_codes: Vec::with_capacity(p.grpc_codes.len()),
            non_idempotent: p.non_idempotent,
            budget: p.budget.as_ref().map(BudgetConfig::try_from).transpose()?,
            max_body_bytes: match p.max_body_bytes {
                0 => DEFAULT_MAX_BODY_BYTES,
                n => usize::try_from(n).unwrap_or(usize::MAX),
            },
        };
        for cond in &p.retry_on {
            match cond.as_str() {
                "connect-failure" => policy.on_connect_failure = true,
                "reset" => policy.on_reset = true,
                "5xx" => policy.on_5xx = true,
                "gateway-error" => policy.on_gateway_error = true,
                other => return Err(InvalidRetry::Condition(other.to_owned())),
            }
        }
        for &code in &p.status_codes {
            let status = u16::try_from(code)
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or(InvalidRetry::StatusCode(code))?;
            policy.status_codes.push(status);
        }
        for &code in &p.grpc_codes {
            if code > 16 {
                return Err(InvalidRetry::GrpcCode(code));
            }
            policy.grpc_codes.push(code);
        }
        Ok(policy)
    }
}

impl RetryPolicy {
    /// Whether requests with `method` may be retried at all.
    pub fn allows_method(&self, method: &Method) -> bool {
        self.non_idempotent
            || matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            )
    }

    /// Whether a try that failed with `failure` may be retried.
    pub fn retries_failure(&self, failure: Failure) -> bool {
        match failure {
            Failure::Connect => self.on_connect_failure || self.on_5xx || self.on_gateway_error,
            Failure::Reset => self.on_reset || self.on_5xx,
            Failure::Timeout => self.on_5xx || self.on_gateway_error,
        }
    }

    /// Whether a response with `status` (and `grpc_status`, for gRPC) may be retried.
    pub fn retries_response(&self, status: http::StatusCode, grpc_status: Option<u32>) -> bool {
        let code = status.as_u16();
        (self.on_5xx && status.is_server_error())
            || (self.on_gateway_error && matches!(code, 502..=504))
            || self.status_codes.contains(&code)
            || grpc_status.is_some_and(|g| self.grpc_codes.contains(&g))
    }

    /// Whether gRPC responses must be read to their trailers to decide.
    pub fn wants_grpc_trailers(&self) -> bool {
        !self.grpc_codes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(retry_on: &[&str]) -> v1::Retry {
        v1::Retry {
            attempts: 3,
            retry_on: retry_on.iter().map(|s| s.to_string()).collect(),
            status_codes: vec![409],
            grpc_codes: vec![14],
            ..Default::default()
        }
    }

    #[test]
    fn rejects_what_it_cannot_enforce() {
        let mut p = proto(&["connect-failure"]);
        p.attempts = 0;
        assert!(matches!(
            RetryPolicy::try_from(&p),
            Err(InvalidRetry::Attempts(0))
        ));
        let p = proto(&["sometimes"]);
        let err = RetryPolicy::try_from(&p).unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        let mut p = proto(&[]);
        p.status_codes = vec![700];
        assert!(matches!(
            RetryPolicy::try_from(&p),
            Err(InvalidRetry::StatusCode(700))
        ));
    }

    #[test]
    fn classifies_outcomes() {
        let gw = RetryPolicy::try_from(&proto(&["gateway-error"])).unwrap();
        assert!(gw.retries_response(http::StatusCode::SERVICE_UNAVAILABLE, None));
        assert!(!gw.retries_response(http::StatusCode::INTERNAL_SERVER_ERROR, None));
        assert!(gw.retries_response(http::StatusCode::CONFLICT, None));
        assert!(gw.retries_response(http::StatusCode::OK, Some(14)));
        assert!(!gw.retries_response(http::StatusCode::OK, Some(5)));
        assert!(gw.retries_failure(Failure::Connect));
        assert!(!gw.retries_failure(Failure::Reset));

        let cf = RetryPolicy::try_from(&proto(&["connect-failure"])).unwrap();
        assert!(!cf.retries_response(http::StatusCode::BAD_GATEWAY, None));
        assert!(cf.retries_failure(Failure::Connect));
        assert!(!cf.retries_failure(Failure::Timeout));

        let any = RetryPolicy::try_from(&proto(&["5xx"])).unwrap();
        assert!(any.retries_response(http::StatusCode::INTERNAL_SERVER_ERROR, None));
        assert!(any.retries_failure(Failure::Reset));
    }

    #[test]
    fn only_idempotent_methods_by_default() {
        let mut p = proto(&["5xx"]);
        let policy = RetryPolicy::try_from(&p).unwrap();
        assert!(policy.allows_method(&Method::GET));
        assert!(policy.allows_method(&Method::PUT));
        assert!(!policy.allows_method(&Method::POST));
        assert!(!policy.allows_method(&Method::PATCH));
        p.non_idempotent = true;
        assert!(
            RetryPolicy::try_from(&p)
                .unwrap()
                .allows_method(&Method::POST)
        );
    }
}
