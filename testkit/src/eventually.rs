//! Waiting for a condition without fixed sleeps: poll every 20 ms until it
//! holds or a deadline passes.

use std::future::Future;
use std::time::Duration;

/// How often a condition is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The deadline [`assert_eventually!`](crate::assert_eventually) uses unless given one.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// A condition that did not hold within its deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("condition not met within {deadline:?} ({attempts} checks): {what}")]
pub struct TimedOut {
    /// The condition, as described by the caller.
    pub what: String,
    /// The deadline that passed.
    pub deadline: Duration,
    /// How many times the condition was checked.
    pub attempts: u32,
}

/// Polls `check` every 20 ms until it returns `Some`, and returns that value;
/// after `deadline`, returns [`TimedOut`]. The check always runs at least once,
/// and once more at the deadline.
pub async fn poll_until<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut check: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        if let Some(value) = check().await {
            return Ok(value);
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            return Err(TimedOut {
                what: what.to_owned(),
                deadline,
                attempts,
            });
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - elapsed)).await;
    }
}

/// Polls `check` every 20 ms until it is true; panics if it is still false after `deadline`.
///
/// # Panics
///
/// When the deadline passes: that is the test failing.
pub async fn eventually<F, Fut>(deadline: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_named(deadline, "eventually(..)", check).await;
}

/// [`eventually`] with a description of the condition for the panic message.
///
/// # Panics
///
/// When the deadline passes.
pub async fn eventually_named<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let result = poll_until(deadline, what, || {
        let checked = check();
        async move { checked.await.then_some(()) }
    })
    .await;
    if let Err(timed_out) = result {
        panic!("{timed_out}");
    }
}

/// Polls an async condition every 20 ms and panics if it does not hold within
/// 10 s (or the `deadline = ...` given). Use inside an async test:
///
/// ```ignore
/// assert_eventually!(upstream.stats().total >= 5);
/// assert_eventually!(Metrics::scrape(admin).await.is_ok_and(|m| m.get("x", &[]) > 0.0), "agent counted x");
/// assert_eventually!(deadline = Duration::from_secs(30), agent_ready(admin).await);
/// ```
///
/// The condition is an expression that may `.await`; it is evaluated afresh on every poll.
#[macro_export]
macro_rules! assert_eventually {
    (deadline = $deadline:expr, $cond:expr $(,)?) => {
        $crate::eventually::eventually_named($deadline, stringify!($cond), || async { $cond }).await
    };
    (deadline = $deadline:expr, $cond:expr, $($message:tt)+) => {
        $crate::eventually::eventually_named($deadline, &format!($($message)+), || async { $cond }).await
    };
    ($cond:expr $(,)?) => {
        $crate::eventually::eventually_named(
            $crate::eventually::DEFAULT_DEADLINE,
            stringify!($cond),
            || async { $cond },
        )
        .await
    };
    ($cond:expr, $($message:tt)+) => {
        $crate::eventually::eventually_named(
            $crate::eventually::DEFAULT_DEADLINE,
            &format!($($message)+),
            || async { $cond },
        )
        .await
    };
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_once_the_condition_holds() {
        let polls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        eventually(Duration::from_secs(10), || async {
            polls.fetch_add(1, Ordering::SeqCst) + 1 >= 3
        })
        .await;
        assert_eq!(polls.load(Ordering::SeqCst), 3);
        assert_eq!(started.elapsed(), POLL_INTERVAL * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_with_the_description() {
        let err = poll_until(Duration::from_millis(100), "the sky falls", || async {
            None::<()>
        })
        .await
        .unwrap_err();
        assert_eq!(err.what, "the sky falls");
        assert_eq!(err.attempts, 6, "polls at 0, 20, 40, 60, 80 and 100 ms");
        assert!(err.to_string().contains("the sky falls"));
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "condition not met within 1s")]
    async fn macro_panics_with_the_condition_text() {
        let never = AtomicU32::new(0);
        assert_eventually!(
            deadline = Duration::from_secs(1),
            never.load(Ordering::SeqCst) > 0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn macro_accepts_awaits_in_the_condition() {
        let value = AtomicU32::new(0);
        let bump = || async { value.fetch_add(1, Ordering::SeqCst) + 1 };
        assert_eventually!(bump().await >= 4, "value reached {}", 4);
        assert_eq!(value.load(Ordering::SeqCst), 4);
    }
}
