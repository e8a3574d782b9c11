//! One token bucket as GCRA (the generic cell rate algorithm): the whole state is the
//! bucket's *theoretical arrival time* (TAT) in one atomic, so taking tokens is a
//! compare-and-swap, never a lock.
//!
//! A bucket of `burst` tokens refilling one token per `interval` is full when the TAT
//! is at or before now. Taking `n` tokens moves the TAT `n` intervals on from
//! `max(TAT, now)`; that is allowed while the TAT stays within `burst` intervals of
//! now. A charge after the fact ([`Bucket::charge`]) moves it on unconditionally, so
//! the bucket may go into debt that later requests wait out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A bucket's shape: one token per `interval`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Nanoseconds per token (at least 1).
    interval: u64,
    /// Tokens the bucket holds when full (at least 1).
    burst: u64,
}

impl Shape {
    /// `requests` tokens per `period`, up to `burst`.
    pub fn new(requests: u32, period: Duration, burst: u32) -> Self {
        let interval = (period.as_nanos() / u128::from(requests.max(1))).max(1);
        Self {
            interval: u64::try_from(interval).unwrap_or(u64::MAX),
            burst: u64::from(burst.max(1)),
        }
    }

    /// The time one token takes to come back.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// How far ahead of now the TAT may be for a request of `n` tokens to pass: a request
    /// that costs more than the bucket holds passes when the bucket is full.
    fn tolerance(&self, n: u64) -> u64 {
        self.burst.max(n).saturating_mul(self.interval)
    }
}

/// What a bucket holds after a request took its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Whole tokens left.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub until_full: Duration,
}

/// One bucket's state: its TAT in nanoseconds on the limiter's clock (0: full at start).
#[derive(Debug, Default)]
pub struct Bucket {
    tat: AtomicU64,
}

impl Bucket {
    /// Takes `n` tokens at `now` (nanoseconds), or says how long until they are there.
    pub fn take(&self, shape: &Shape, now: u64, n: u32) -> Result<Level, Duration> {
        let n = u64::from(n);
        let tolerance = shape.tolerance(n);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new_tat = tat
                .max(now)
                .saturating_add(n.saturating_mul(shape.interval));
            let ahead = new_tat - now;
            if ahead > tolerance {
                return Err(Duration::from_nanos(ahead - tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(level(shape, ahead)),
                Err(current) => tat = current,
            }
        }
    }

    /// Takes `n` more tokens whatever the bucket holds (after-the-fact cost): the bucket
    /// may go into debt.
    pub fn charge(&self, shape: &Shape, now: u64, n: u32) {
        let add = u64::from(n).saturating_mul(shape.interval);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(now).saturating_add(add))
            });
    }

    /// What the bucket holds at `now`.
    pub fn level(&self, shape: &Shape, now: u64) -> Level {
        let ahead = self.tat.load(Ordering::Acquire).saturating_sub(now);
        level(shape, ahead)
    }

    /// Whether the bucket is full at `now` (a full bucket is the same as none).
    pub fn is_full(&self, now: u64) -> bool {
        self.tat.load(Ordering::Acquire) <= now
    }
}

fn level(shape: &Shape, ahead: u64) -> Level {
    let free = shape.tolerance(0).saturating_sub(ahead);
    Level {
        remaining: free / shape.interval,
        until_full: Duration::from_nanos(ahead),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_one_token_per_interval() {
        let shape = Shape::new(10, Duration::from_secs(1), 5);
        let bucket = Bucket::default();
        for left in (0..5).rev() {
            assert_eq!(bucket.take(&shape, 0, 1).unwrap().remaining, left);
        }
        assert_eq!(bucket.take(&shape, 0, 1), Err(Duration::from_millis(100)));
        assert_eq!(
            bucket.take(&shape, 40 * MS, 1),
            Err(Duration::from_millis(60))
        );
        assert!(bucket.take(&shape, 100 * MS, 1).is_ok());
        assert!(bucket.take(&shape, 100 * MS, 1).is_err());
        assert!(bucket.is_full(600 * MS) && !bucket.is_full(599 * MS));
    }

    #[test]
    fn a_request_takes_its_cost_and_one_above_the_burst_needs_a_full_bucket() {
        let shape = Shape::new(10, Duration::from_secs(1), 5);
        let bucket = Bucket::default();
        assert_eq!(bucket.take(&shape, 0, 3).unwrap().remaining, 2);
        assert_eq!(bucket.take(&shape, 0, 3), Err(Duration::from_millis(100)));
        assert_eq!(bucket.take(&shape, 0, 2).unwrap().remaining, 0);
        // 8 tokens never fit in 5: they pass once the bucket is full, and leave a debt.
        assert!(bucket.take(&shape, 100 * MS, 8).is_err());
        let full = 500 * MS;
        assert!(bucket.take(&shape, full, 8).is_ok());
        assert_eq!(
            bucket.take(&shape, full, 1),
            Err(Duration::from_millis(400)),
            "3 tokens of debt and the one asked for"
        );
    }

    #[test]
    fn a_charge_after_the_fact_is_debt_later_requests_wait_out() {
        let shape = Shape::new(10, Duration::from_secs(1), 2);
        let bucket = Bucket::default();
        assert!(bucket.take(&shape, 0, 1).is_ok());
        bucket.charge(&shape, 0, 10);
        let level = bucket.level(&shape, 0);
        assert_eq!(level.remaining, 0);
        assert_eq!(level.until_full, Duration::from_millis(1_100));
        assert_eq!(bucket.take(&shape, 0, 1), Err(Duration::from_millis(1_000)));
        assert!(bucket.take(&shape, 1_000 * MS, 1).is_ok());
    }

    #[test]
    fn shapes_never_divide_by_zero() {
        let shape = Shape::new(0, Duration::ZERO, 0);
        assert_eq!(shape.interval(), Duration::from_nanos(1));
        assert!(Bucket::default().take(&shape, 0, 1).is_ok());
    }
}
