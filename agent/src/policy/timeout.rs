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

    /// Runs `work` until the deadline. A plain future struct rather than an `async fn`
    /// or an enum: `work` (often the largest part of a request's state, such as an
    /// upstream send) is moved once, into the struct, and the timer is armed from the
    /// deadline itself, without reading the clock.
    pub fn run<F: Future>(&self, work: F) -> Bounded<F> {
        Bounded {
            work,
            timer: self.0.map(tokio::time::sleep_until),
        }
    }
}

fn min(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub use bounded::Bounded;

/// [`Bounded`] and its pin projection (whose generated items carry no docs).
mod bounded {
    #![allow(missing_docs)]

    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use pin_project_lite::pin_project;
    use tokio::task::coop;
    use tokio::time::Sleep;

    use super::Elapsed;

    pin_project! {
        /// Work bounded by a [`Deadline`](super::Deadline) (see
        /// [`Deadline::run`](super::Deadline::run)): the work, then the timer if any.
        #[must_use = "futures do nothing unless awaited"]
        pub struct Bounded<F> {
            #[pin]
            pub(super) work: F,
            #[pin]
            pub(super) timer: Option<Sleep>,
        }
    }

    impl<F: Future> Future for Bounded<F> {
        type Output = Result<F::Output, Elapsed>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.project();
            // As tokio's `Timeout`: when the work used up the task's budget, the timer is
            // still polled (unconstrained), so that a busy task still times out.
            let had_budget = coop::has_budget_remaining();
            if let Poll::Ready(out) = this.work.poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let Some(timer) = this.timer.as_pin_mut() else {
                return Poll::Pending;
            };
            let fired = if had_budget && !coop::has_budget_remaining() {
                Pin::new(&mut coop::unconstrained(timer)).poll(cx)
            } else {
                timer.poll(cx)
            };
            fired.map(|()| Err(Elapsed))
        }
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
