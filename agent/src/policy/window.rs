//! A sliding window of two counters, shared by the retry budget (requests and
//! retries) and the circuit breaker's failure ratio (failures and calls).

use std::time::Duration;

use tokio::time::Instant;

/// Number of time buckets a sliding window is divided into: the window slides in steps of
/// a tenth of its length.
const BUCKETS: usize = 10;

/// Two counters over a sliding window, kept as a ring of [`BUCKETS`] time buckets.
///
/// Counts older than the window drop out a bucket at a time, so the totals cover between
/// 9/10 and all of the last window.
#[derive(Debug)]
pub(crate) struct SlidingCounter {
    origin: Instant,
    bucket_nanos: u64,
    /// Index (since `origin`) of the bucket now being filled.
    epoch: u64,
    buckets: [(u64, u64); BUCKETS],
    totals: (u64, u64),
}

impl SlidingCounter {
    /// An empty window of length `window`, starting at `origin`.
    pub(crate) fn new(window: Duration, origin: Instant) -> Self {
        let window_nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Self {
            origin,
            bucket_nanos: (window_nanos / BUCKETS as u64).max(1),
            epoch: 0,
            buckets: [(0, 0); BUCKETS],
            totals: (0, 0),
        }
    }

    /// Adds to both counters at `now`.
    pub(crate) fn add(&mut self, now: Instant, first: u64, second: u64) {
        self.rotate(now);
        let bucket = &mut self.buckets[self.slot()];
        bucket.0 = bucket.0.saturating_add(first);
        bucket.1 = bucket.1.saturating_add(second);
        self.totals.0 = self.totals.0.saturating_add(first);
        self.totals.1 = self.totals.1.saturating_add(second);
    }

    /// Both counters' totals over the window ending at `now`.
    pub(crate) fn totals(&mut self, now: Instant) -> (u64, u64) {
        self.rotate(now);
        self.totals
    }

    /// Forgets everything counted so far.
    pub(crate) fn clear(&mut self) {
        self.buckets = [(0, 0); BUCKETS];
        self.totals = (0, 0);
    }

    fn slot(&self) -> usize {
        (self.epoch % BUCKETS as u64) as usize
    }

    fn rotate(&mut self, now: Instant) {
        let elapsed = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        let epoch = elapsed / self.bucket_nanos;
        if epoch <= self.epoch {
            return;
        }
        if epoch - self.epoch >= BUCKETS as u64 {
            self.clear();
        } else {
            // Empty each bucket that is being reused for a newer slice of time.
            while self.epoch < epoch {
                self.epoch += 1;
                let slot = self.slot();
                let (first, second) = std::mem::take(&mut self.buckets[slot]);
                self.totals.0 = self.totals.0.saturating_sub(first);
                self.totals.1 = self.totals.1.saturating_sub(second);
            }
        }
        self.epoch = epoch;
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_drop_out_a_bucket_at_a_time() {
        let mut window = SlidingCounter::new(Duration::from_secs(10), Instant::now());
        window.add(Instant::now(), 3, 1);
        advance(Duration::from_secs(5)).await;
        window.add(Instant::now(), 2, 0);
        assert_eq!(window.totals(Instant::now()), (5, 1));
        // The first bucket leaves the window once a whole window has passed since it filled.
        advance(Duration::from_secs(5)).await;
        assert_eq!(window.totals(Instant::now()), (2, 0));
        advance(Duration::from_secs(5)).await;
        assert_eq!(window.totals(Instant::now()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_silence_empties_the_window_and_clear_forgets() {
        let mut window = SlidingCounter::new(Duration::from_secs(1), Instant::now());
        window.add(Instant::now(), 7, 7);
        advance(Duration::from_secs(60)).await;
        assert_eq!(window.totals(Instant::now()), (0, 0));
        window.add(Instant::now(), 1, 2);
        window.clear();
        assert_eq!(window.totals(Instant::now()), (0, 0));
    }
}
