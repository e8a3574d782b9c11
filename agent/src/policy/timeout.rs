//! Timeouts and deadlines: one deadline per request, the earliest of the policy's
//! request timeout and the client's own (`grpc-timeout`), and a narrower one per try
//! (`retry.perTryTimeout`, never past the request's). Every wait of the request —
//! a bulkhead queue, a try, a backoff — is bounded by it.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// When a request (or one try) must be done by; `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deadline(Option<Instant>);

/// The deadline passed before the awaited work finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("deadline exceeded")]
pub struct Elapsed;

impl Deadline {
    /// The deadline of a request that started at `start`: the earliest of the policy's
    /// `request` timeout and the client's own `client` timeout.
    pub fn new(start: Instant, request: Option<Duration>, client: Option<Duration>) -> Self {
        Self(min(request, client).map(|limit| start + limit))
    }

    /// A deadline `limit` from now.
    pub fn after(limit: Option<Duration>) -> Self {
        Self(limit.map(|limit| Instant::now() + limit))
    }

    /// Time left, zero once passed; `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.0.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether a wait of `delay` ends before the deadline (a backoff that would
    /// outlast it is not worth starting).
    pub fn allows(&self, delay: Duration) -> bool {
        self.remaining().is_none_or(|left| left > delay)
    }

    /// The deadline of one try: `per_try` from now, but never past this one.
    pub fn for_try(&self, per_try: Option<Duration>) -> Self {
        Self::after(min(per_try, self.remaining()))
    }

    /// Awaits `work` until the deadline.
    pub async fn run<F: Future>(&self, work: F) -> Result<F::Output, Elapsed> {
        match self.remaining() {
            Some(left) => tokio::time::timeout(left, work).await.map_err(|_| Elapsed),
            None => Ok(work.await),
        }
    }
}

fn min(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::{advance, sleep};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn the_earliest_timeout_wins() {
        let start = Instant::now();
        let policy = Deadline::new(start, Some(300 * MS), Some(500 * MS));
        assert_eq!(policy.remaining(), Some(300 * MS));
        let client = Deadline::new(start, Some(300 * MS), Some(100 * MS));
        assert_eq!(client.remaining(), Some(100 * MS));
        assert_eq!(Deadline::new(start, None, None).remaining(), None);
        advance(400 * MS).await;
        assert_eq!(
            policy.remaining(),
            Some(Duration::ZERO),
            "passed: nothing left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_gets_its_own_limit_but_never_past_the_request() {
        let request = Deadline::new(Instant::now(), Some(Duration::from_secs(1)), None);
        assert_eq!(request.for_try(Some(200 * MS)).remaining(), Some(200 * MS));
        advance(900 * MS).await;
        assert_eq!(request.for_try(Some(200 * MS)).remaining(), Some(100 * MS));
        assert_eq!(request.for_try(None).remaining(), Some(100 * MS));
        let unbounded = Deadline::default();
        assert_eq!(
            unbounded.for_try(Some(200 * MS)).remaining(),
            Some(200 * MS)
        );
        assert_eq!(unbounded.for_try(None), Deadline::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_must_end_before_the_deadline() {
        let deadline = Deadline::new(Instant::now(), Some(100 * MS), None);
        assert!(deadline.allows(99 * MS));
        assert!(!deadline.allows(100 * MS));
        assert!(Deadline::default().allows(Duration::from_secs(3600)));
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_work_at_the_deadline() {
        let start = Instant::now();
        let deadline = Deadline::new(start, Some(100 * MS), None);
        assert_eq!(deadline.run(async { 7 }).await, Ok(7));
        assert_eq!(
            deadline.run(sleep(Duration::from_secs(5))).await,
            Err(Elapsed)
        );
        assert_eq!(
            start.elapsed(),
            100 * MS,
            "gave up at the deadline, not later"
        );
        assert_eq!(
            Deadline::default().run(sleep(Duration::from_secs(5))).await,
            Ok(())
        );
    }
}
