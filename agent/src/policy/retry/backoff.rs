//! Exponential backoff with full jitter, for retries and for reconnecting to the control plane.

use std::time::Duration;

use bulwark_proto::{defaults, v1};

use crate::policy::duration::{InvalidDuration, duration};

/// A `retry.backoff` section that cannot be enforced. Messages name the field within the
/// section; the caller prefixes the section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackoff {
    /// `base` is absent.
    #[error("base is missing; the control plane must send an exact value")]
    MissingBase,
    /// `max` is absent.
    #[error("max is missing; the control plane must send an exact value")]
    MissingMax,
    /// `base` is not a valid duration.
    #[error("base: {0}")]
    Base(InvalidDuration),
    /// `max` is not a valid duration.
    #[error("max: {0}")]
    Max(InvalidDuration),
    /// `base` is zero.
    #[error("base is 0; it must be positive, e.g. 25ms")]
    ZeroBase,
    /// `base` exceeds `max`.
    #[error("base ({base:?}) must not exceed max ({max:?})")]
    BaseExceedsMax {
        /// The configured base.
        base: Duration,
        /// The configured max.
        max: Duration,
    },
}

/// Validated exponential backoff: the wait before retry `n` is uniform in `[0, min(max, base * 2^n)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The ceiling of the first wait; each later ceiling doubles.
    pub base: Duration,
    /// The largest ceiling.
    pub max: Duration,
}

impl Default for BackoffConfig {
    /// The policy API's defaults: base 25ms, max 250ms.
    fn default() -> Self {
        Self {
            base: defaults::DEFAULT_BACKOFF_BASE,
            max: defaults::DEFAULT_BACKOFF_MAX,
        }
    }
}

impl BackoffConfig {
    /// A validated config: `0 < base <= max`.
    pub fn new(base: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff::ZeroBase);
        }
        if base > max {
            return Err(InvalidBackoff::BaseExceedsMax { base, max });
        }
        Ok(Self { base, max })
    }

    /// The upper bound of the wait before retry number `retry` (0 = first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        // Past 2^31 the product can only exceed any sensible max, so saturate to max
        // instead of overflowing.
        1u32.checked_shl(retry)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.max, |grown| grown.min(self.max))
    }

    /// Delay before retry number `retry` (0 = first retry): uniform in [0, min(max, base * 2^retry)].
    pub fn delay(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.u64(0..=ceiling))
    }
}

impl TryFrom<&v1::Backoff> for BackoffConfig {
    type Error = InvalidBackoff;

    fn try_from(proto: &v1::Backoff) -> Result<Self, Self::Error> {
        let base = proto.base.as_ref().ok_or(InvalidBackoff::MissingBase)?;
        let max = proto.max.as_ref().ok_or(InvalidBackoff::MissingMax)?;
        Self::new(
            duration(base).map_err(InvalidBackoff::Base)?,
            duration(max).map_err(InvalidBackoff::Max)?,
        )
    }
}

/// Reconnect backoff for long-lived clients (the agent's control-plane stream).
///
/// Each call to [`next_delay`](Self::next_delay) doubles the ceiling of a fully jittered wait,
/// up to the config's max; [`reset`](Self::reset) after a success starts again from the base.
#[derive(Debug, Clone)]
pub struct ExponentialBackoff {
    config: BackoffConfig,
    rng: fastrand::Rng,
    retry: u32,
}

impl ExponentialBackoff {
    /// Ceiling of the first reconnect delay.
    pub const INITIAL: Duration = Duration::from_millis(100);
    /// Largest reconnect delay.
    pub const MAX: Duration = Duration::from_secs(10);

    /// A backoff following `config`, jittered by `rng`.
    pub fn new(config: BackoffConfig, rng: fastrand::Rng) -> Self {
        Self {
            config,
            rng,
            retry: 0,
        }
    }

    /// The control-plane reconnect backoff: [`Self::INITIAL`] doubling up to [`Self::MAX`], randomly seeded.
    pub fn reconnect() -> Self {
        Self::new(
            BackoffConfig {
                base: Self::INITIAL,
                max: Self::MAX,
            },
            fastrand::Rng::new(),
        )
    }

    /// The wait before the next attempt; each call doubles the ceiling, up to max.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.config.delay(self.retry, &mut self.rng);
        self.retry = self.retry.saturating_add(1);
        delay
    }

    /// Starts again from the base, after a success.
    pub fn reset(&mut self) {
        self.retry = 0;
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.retry
    }

    /// The config in force.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn proto(seconds: i64, nanos: i32) -> prost_types::Duration {
        prost_types::Duration { seconds, nanos }
    }

    #[test]
    fn validates_proto_backoff() {
        let ok = v1::Backoff {
            base: Some(proto(0, 25_000_000)),
            max: Some(proto(0, 250_000_000)),
        };
        assert_eq!(
            BackoffConfig::try_from(&ok),
            Ok(BackoffConfig {
                base: ms(25),
                max: ms(250)
            })
        );

        let missing = v1::Backoff { base: None, ..ok };
        assert_eq!(
            BackoffConfig::try_from(&missing),
            Err(InvalidBackoff::MissingBase)
        );
        let zero = v1::Backoff {
            base: Some(proto(0, 0)),
            ..ok
        };
        assert_eq!(
            BackoffConfig::try_from(&zero),
            Err(InvalidBackoff::ZeroBase)
        );
        let inverted = v1::Backoff {
            base: Some(proto(2, 0)),
            max: Some(proto(1, 0)),
        };
        let err = BackoffConfig::try_from(&inverted).unwrap_err();
        assert_eq!(
            err,
            InvalidBackoff::BaseExceedsMax {
                base: ms(2000),
                max: ms(1000)
            }
        );
        assert_eq!(err.to_string(), "base (2s) must not exceed max (1s)");
        let negative = v1::Backoff {
            max: Some(proto(-1, 0)),
            ..ok
        };
        assert!(matches!(
            BackoffConfig::try_from(&negative),
            Err(InvalidBackoff::Max(InvalidDuration::Negative { .. }))
        ));
    }

    #[test]
    fn delays_stay_within_the_doubling_ceiling() {
        let config = BackoffConfig::new(ms(25), ms(250)).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let ceilings = [25, 50, 100, 200, 250, 250];
        for (retry, ceiling) in ceilings.into_iter().enumerate() {
            assert_eq!(config.ceiling(retry as u32), ms(ceiling));
            let mut longest = Duration::ZERO;
            for _ in 0..2_000 {
                let d = config.delay(retry as u32, &mut rng);
                assert!(d <= ms(ceiling), "retry {retry}: {d:?} > {ceiling}ms");
                longest = longest.max(d);
            }
            // Full jitter spreads over the whole range: the longest of 2000 draws is near the top.
            assert!(longest > ms(ceiling) * 9 / 10, "retry {retry}: {longest:?}");
        }
    }

    #[test]
    fn delays_are_jittered_not_constant() {
        let config = BackoffConfig::new(ms(100), ms(100)).unwrap();
        let mut rng = fastrand::Rng::with_seed(1);
        let draws: Vec<Duration> = (0..1_000).map(|_| config.delay(0, &mut rng)).collect();
        let mean = draws.iter().sum::<Duration>() / 1_000;
        // Uniform over [0, 100ms] averages 50ms.
        assert!(mean > ms(45) && mean < ms(55), "mean {mean:?}");
        assert!(draws.iter().any(|d| *d < ms(10)));
    }

    #[test]
    fn large_retry_numbers_do_not_overflow() {
        let config = BackoffConfig::new(Duration::from_secs(1), Duration::from_secs(30)).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        for retry in [31, 32, 33, 63, 64, 1_000, u32::MAX] {
            assert_eq!(config.ceiling(retry), Duration::from_secs(30));
            assert!(config.delay(retry, &mut rng) <= Duration::from_secs(30));
        }
        let huge = BackoffConfig {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert!(huge.delay(5, &mut rng) <= Duration::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_backoff_grows_then_resets() {
        let mut backoff = ExponentialBackoff::new(
            BackoffConfig::new(ExponentialBackoff::INITIAL, ExponentialBackoff::MAX).unwrap(),
            fastrand::Rng::with_seed(42),
        );
        // A reconnect loop that keeps failing: every wait is bounded by the doubling ceiling,
        // and the paused clock shows the loop really waited that long.
        let start = tokio::time::Instant::now();
        let mut waited = Duration::ZERO;
        for attempt in 0..10u32 {
            let delay = backoff.next_delay();
            let ceiling =
                (ExponentialBackoff::INITIAL * 2u32.pow(attempt)).min(ExponentialBackoff::MAX);
            assert!(
                delay <= ceiling,
                "attempt {attempt}: {delay:?} > {ceiling:?}"
            );
            tokio::time::sleep(delay).await;
            waited += delay;
        }
        // Tokio's timer rounds each sleep up to the next millisecond.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= waited && elapsed <= waited + Duration::from_millis(10),
            "slept {elapsed:?} for {waited:?} of delays"
        );
        assert_eq!(backoff.attempts(), 10);
        // Late attempts wait seconds on average, not milliseconds.
        let late: Duration = (0..100).map(|_| backoff.next_delay()).sum::<Duration>() / 100;
        assert!(late > Duration::from_secs(3), "late mean {late:?}");

        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        for _ in 0..100 {
            backoff.reset();
            assert!(backoff.next_delay() <= ExponentialBackoff::INITIAL);
        }
    }

    #[test]
    fn reconnect_defaults_use_named_constants() {
        let backoff = ExponentialBackoff::reconnect();
        assert_eq!(backoff.config().base, ms(100));
        assert_eq!(backoff.config().max, Duration::from_secs(10));
    }
}
