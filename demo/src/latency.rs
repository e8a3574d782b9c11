//! Latency percentiles over what the demo measured itself.

use std::time::Duration;

/// Latencies of one group of requests, sorted.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    /// Collects and sorts `samples`.
    pub fn new(samples: impl IntoIterator<Item = Duration>) -> Self {
        let mut sorted: Vec<Duration> = samples.into_iter().collect();
        sorted.sort_unstable();
        Self { sorted }
    }

    /// The `q` quantile (0..=1) by nearest rank; `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.sorted.is_empty() {
            return None;
        }
        // Nearest rank: the smallest sample with at least q of all samples at or below it.
        let rank = (q.clamp(0.0, 1.0) * self.sorted.len() as f64).ceil() as usize;
        Some(self.sorted[rank.clamp(1, self.sorted.len()) - 1])
    }

    /// The mean; `None` without samples.
    pub fn mean(&self) -> Option<Duration> {
        let count = u32::try_from(self.sorted.len()).ok().filter(|&n| n > 0)?;
        Some(self.sorted.iter().sum::<Duration>() / count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let latencies = Latencies::new((1..=100).rev().map(ms));
        assert_eq!(latencies.quantile(0.5), Some(ms(50)));
        assert_eq!(latencies.quantile(0.99), Some(ms(99)));
        assert_eq!(latencies.quantile(1.0), Some(ms(100)));
        assert_eq!(latencies.quantile(0.0), Some(ms(1)));
        assert_eq!(latencies.mean(), Some(Duration::from_micros(50_500)));
    }

    #[test]
    fn one_slow_request_in_a_hundred_is_the_p99_of_101() {
        let latencies = Latencies::new(std::iter::repeat_n(ms(1), 100).chain([ms(900)]));
        assert_eq!(latencies.quantile(0.99), Some(ms(1)));
        assert_eq!(latencies.quantile(1.0), Some(ms(900)));
    }

    #[test]
    fn no_samples_no_quantiles() {
        assert_eq!(Latencies::default().quantile(0.5), None);
        assert_eq!(Latencies::default().mean(), None);
    }
}
