//! The retry loop of one request, as state: how many tries it may make, which
//! outcomes earn another, the endpoints already tried, and the backoff before the
//! next try, granted only if it fits before the deadline and the budget allows it.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};

use super::budget::RetryBudget;
use super::{Failure, RetryPolicy};
use crate::policy::timeout::Deadline;

/// The tries of one request.
#[derive(Debug)]
pub struct Retries<'a> {
    policy: Option<&'a RetryPolicy>,
    budget: Option<&'a RetryBudget>,
    attempts: u32,
    attempt: u32,
    tried: Vec<SocketAddr>,
    rng: fastrand::Rng,
}

/// Why no further try is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRetry {
    /// The policy allows no other try (none, spent, or the outcome is not retried).
    Policy,
    /// The backoff would end at or past the deadline.
    Deadline,
    /// The retry budget is spent.
    BudgetExhausted,
}

/// The wait before the next try, granted by [`Retries::next`].
#[derive(Debug)]
#[must_use = "the next try must wait out its backoff"]
pub struct Backoff {
    /// How long.
    pub delay: Duration,
}

impl Backoff {
    /// Waits out the backoff.
    pub async fn wait(self) {
        tokio::time::sleep(self.delay).await;
    }
}

impl<'a> Retries<'a> {
    /// The tries of a `method` request under `policy` (ignored when it allows a single
    /// try or does not retry the method); the request is counted in the `budget`.
    pub fn new(
        policy: Option<&'a RetryPolicy>,
        budget: Option<&'a RetryBudget>,
        method: &Method,
    ) -> Self {
        let policy = policy.filter(|r| r.attempts > 1 && r.allows_method(method));
        if let Some(budget) = budget {
            budget.deposit();
        }
        Self {
            policy,
            budget,
            attempts: policy.map_or(1, |p| p.attempts),
            attempt: 0,
            tried: Vec::new(),
            rng: fastrand::Rng::new(),
        }
    }

    /// How much of the request body to keep for replay; `None`: it is sent once.
    pub fn replay_limit(&self) -> Option<usize> {
        self.policy.map(|p| p.max_body_bytes)
    }

    /// The body could not be kept for replay: the request gets a single try.
    pub fn single_try(&mut self) {
        self.attempts = 1;
    }

    /// The per-try timeout, if the policy sets one.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.policy.and_then(|p| p.per_try_timeout)
    }

    /// The index of the current try (0: the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the current try is the last one allowed.
    pub fn is_last(&self) -> bool {
        self.attempt + 1 >= self.attempts
    }

    /// The endpoints earlier tries went to (the balancer avoids them).
    pub fn tried(&self) -> &[SocketAddr] {
        &self.tried
    }

    /// For a gRPC response without `grpc-status` in its headers, how much of it to read
    /// to reach the trailers, when the decision depends on them and a retry may follow.
    pub fn trailers_limit(&self) -> Option<usize> {
        self.policy
            .filter(|p| !self.is_last() && p.wants_grpc_trailers())
            .map(|p| p.max_body_bytes)
    }

    /// Whether a try that failed with `failure` earns another.
    pub fn retries_failure(&self, failure: Failure) -> bool {
        !self.is_last() && self.policy.is_some_and(|p| p.retries_failure(failure))
    }

    /// Whether a response with `status` (and `grpc_status`) earns another try.
    pub fn retries_response(&self, status: StatusCode, grpc_status: Option<u32>) -> bool {
        !self.is_last()
            && self
                .policy
                .is_some_and(|p| p.retries_response(status, grpc_status))
    }

    /// Moves on to the next try after the current one (sent to `endpoint`) earned a
    /// retry: the backoff to wait, if it fits before `deadline` and the budget
    /// allows one more retry.
    pub fn next(&mut self, endpoint: SocketAddr, deadline: &Deadline) -> Result<Backoff, NoRetry> {
        let policy = self.policy.ok_or(NoRetry::Policy)?;
        let delay = policy.backoff.delay(self.attempt, &mut self.rng);
        if !deadline.allows(delay) {
            return Err(NoRetry::Deadline);
        }
        if let Some(budget) = self.budget
            && !budget.withdraw()
        {
            return Err(NoRetry::BudgetExhausted);
        }
        self.tried.push(endpoint);
        self.attempt += 1;
        Ok(Backoff { delay })
    }
}

#[cfg(test)]
mod tests {
    use bulwark_proto::v1;
    use tokio::time::Instant;

    use super::*;
    use crate::policy::retry::budget::BudgetConfig;

    const MS: Duration = Duration::from_millis(1);

    fn policy(attempts: u32, retry_on: &[&str]) -> RetryPolicy {
        RetryPolicy::try_from(&v1::Retry {
            attempts,
            retry_on: retry_on.iter().map(|s| s.to_string()).collect(),
            backoff: Some(v1::Backoff {
                base: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 100_000_000,
                }),
                max: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 100_000_000,
                }),
            }),
            ..Default::default()
        })
        .unwrap()
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_attempts_are_spent_avoiding_tried_endpoints() {
        let p = policy(3, &["connect-failure"]);
        let mut tries = Retries::new(Some(&p), None, &Method::GET);
        assert_eq!(tries.replay_limit(), Some(p.max_body_bytes));
        assert!(tries.retries_failure(Failure::Connect));
        assert!(!tries.retries_failure(Failure::Reset), "not in retryOn");
        let start = Instant::now();
        let backoff = tries.next(addr(1), &Deadline::default()).unwrap();
        assert!(backoff.delay <= 100 * MS, "jittered up to the cap");
        let delay = backoff.delay;
        backoff.wait().await;
        let waited = start.elapsed();
        assert!(
            waited >= delay && waited <= delay + MS,
            "the backoff ({delay:?}) is waited out on the clock (to its millisecond): {waited:?}"
        );
        assert_eq!((tries.attempt(), tries.tried()), (1, &[addr(1)][..]));
        tries
            .next(addr(2), &Deadline::default())
            .unwrap()
            .wait()
            .await;
        assert!(tries.is_last());
        assert!(
            !tries.retries_failure(Failure::Connect),
            "the last try earns no other"
        );
        assert_eq!(tries.tried(), &[addr(1), addr(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_try_policy_or_method_never_retries() {
        let p = policy(3, &["5xx"]);
        let post = Retries::new(Some(&p), None, &Method::POST);
        assert!(post.is_last(), "POST is not idempotent");
        assert_eq!(post.replay_limit(), None, "its body is sent once");
        assert!(!post.retries_response(StatusCode::SERVICE_UNAVAILABLE, None));
        let one = policy(1, &["5xx"]);
        assert!(Retries::new(Some(&one), None, &Method::GET).is_last());
        let mut none = Retries::new(None, None, &Method::GET);
        assert_eq!(
            none.next(addr(1), &Deadline::default()).unwrap_err(),
            NoRetry::Policy
        );
        let mut unreplayable = Retries::new(Some(&p), None, &Method::GET);
        unreplayable.single_try();
        assert!(unreplayable.is_last());
        assert!(!unreplayable.retries_response(StatusCode::BAD_GATEWAY, None));
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_whose_backoff_outlasts_the_deadline() {
        let p = policy(3, &["5xx"]);
        let mut tries = Retries::new(Some(&p), None, &Method::GET);
        let deadline = Deadline::new(Instant::now(), Some(100 * MS), None);
        tokio::time::advance(50 * MS).await;
        // The backoff is jittered in (0, 100ms]; at most 50ms remain. Retry until a draw
        // is too long: every granted one fits, and a refusal says why.
        for _ in 0..64 {
            match tries.next(addr(1), &deadline) {
                Ok(backoff) => {
                    assert!(backoff.delay < 50 * MS);
                    tries = Retries::new(Some(&p), None, &Method::GET);
                }
                Err(why) => {
                    assert_eq!(why, NoRetry::Deadline);
                    return;
                }
            }
        }
        panic!("64 jittered backoffs all fitted in half their cap");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_grants_retries_and_counts_requests() {
        let p = policy(10, &["5xx"]);
        let budget = RetryBudget::new(BudgetConfig::new(0.0, 1, Duration::from_secs(10)).unwrap());
        let mut tries = Retries::new(Some(&p), Some(&budget), &Method::GET);
        let mut granted = 0;
        while tries.next(addr(1), &Deadline::default()).is_ok() {
            granted += 1;
        }
        assert!(granted >= 1, "the floor allows some retries");
        assert_eq!(
            tries.next(addr(1), &Deadline::default()).unwrap_err(),
            NoRetry::BudgetExhausted
        );
    }

    #[test]
    fn trailers_are_read_only_when_a_retry_may_follow() {
        let mut p = policy(2, &["5xx"]);
        assert_eq!(
            Retries::new(Some(&p), None, &Method::GET).trailers_limit(),
            None
        );
        p.grpc_codes = vec![14];
        let tries = Retries::new(Some(&p), None, &Method::GET);
        assert_eq!(tries.trailers_limit(), Some(p.max_body_bytes));
        assert!(tries.retries_response(StatusCode::OK, Some(14)));
    }
}
