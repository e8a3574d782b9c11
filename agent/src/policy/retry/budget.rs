//! Retry budget: retries may add at most `ratio` of the live requests over a sliding window,
//! plus a floor of `min_per_second`, so that retries never multiply an outage.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bulwark_proto::{defaults, v1};
use tokio::time::Instant;

use crate::policy::duration::{InvalidDuration, duration};
use crate::policy::window::SlidingCounter;

/// The largest accepted ratio (the policy API's limit).
pub const MAX_RATIO: f64 = defaults::MAX_BUDGET_RATIO;

/// Fixed-point scale of the budget arithmetic: one retry is a million micro-retries, so that
/// ratios like 0.29 never lose a retry to floating-point rounding.
const MICROS: u64 = 1_000_000;

/// A `retry.budget` section that cannot be enforced. Messages name the field within the
/// section; the caller prefixes the section.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidBudget {
    /// `ratio` is NaN, infinite, negative or above [`MAX_RATIO`].
    #[error("ratio {0} is outside 0..=1000; e.g. 0.2 lets retries add 20% load")]
    Ratio(f64),
    /// `window` is absent.
    #[error("window is missing; the control plane must send an exact value")]
    MissingWindow,
    /// `window` is not a valid duration.
    #[error("window: {0}")]
    Window(InvalidDuration),
    /// `window` is zero.
    #[error("window is 0; it must be positive, e.g. 10s")]
    ZeroWindow,
}

/// Validated retry budget: over `window`, retries <= `min_per_second * window_secs + ratio * requests`.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per original request in the window (0.2 = 20% extra load).
    pub ratio: f64,
    /// Retries allowed per second of window regardless of traffic (the floor).
    pub min_per_second: u32,
    /// Length of the sliding window.
    pub window: Duration,
}

impl Default for BudgetConfig {
    /// The policy API's defaults: ratio 0.2, 10 retries per second, a 10s window.
    fn default() -> Self {
        Self {
            ratio: defaults::DEFAULT_BUDGET_RATIO,
            min_per_second: defaults::DEFAULT_BUDGET_MIN_PER_SECOND,
            window: defaults::DEFAULT_BUDGET_WINDOW,
        }
    }
}

impl BudgetConfig {
    /// A validated config: ratio in `0..=1000`, window > 0.
    pub fn new(ratio: f64, min_per_second: u32, window: Duration) -> Result<Self, InvalidBudget> {
        if !(0.0..=MAX_RATIO).contains(&ratio) {
            return Err(InvalidBudget::Ratio(ratio));
        }
        if window.is_zero() {
            return Err(InvalidBudget::ZeroWindow);
        }
        Ok(Self {
            ratio,
            min_per_second,
            window,
        })
    }
}

impl TryFrom<&v1::RetryBudget> for BudgetConfig {
    type Error = InvalidBudget;

    fn try_from(proto: &v1::RetryBudget) -> Result<Self, Self::Error> {
        let window = proto.window.as_ref().ok_or(InvalidBudget::MissingWindow)?;
        Self::new(
            proto.ratio,
            proto.min_per_second,
            duration(window).map_err(InvalidBudget::Window)?,
        )
    }
}

/// A destination's retry budget, shared by all its requests.
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    /// Retries allowed by the floor alone over one window, in micro-retries.
    floor: u64,
    /// Micro-retries earned by one original request.
    per_request: u64,
    // A short mutex: a deposit and a withdrawal each touch one bucket, but withdrawing must
    // read the window's totals and add to them as one step, or concurrent retries would all
    // see the last free slot; with atomics that needs a CAS loop over a rotating ring.
    counts: Mutex<SlidingCounter>,
}

impl RetryBudget {
    /// A budget with nothing deposited yet (only the floor is available).
    pub fn new(config: BudgetConfig) -> Self {
        let window_micros = u64::try_from(config.window.as_micros()).unwrap_or(u64::MAX);
        let floor = u64::from(config.min_per_second).saturating_mul(window_micros);
        // Validated configs keep ratio within 0..=1000; a hand-built one saturates.
        let per_request = (config.ratio.max(0.0) * MICROS as f64).round() as u64;
        let counts = Mutex::new(SlidingCounter::new(config.window, Instant::now()));
        Self {
            config,
            floor,
            per_request,
            counts,
        }
    }

    /// Records that one original request was made.
    pub fn deposit(&self) {
        let now = Instant::now();
        self.lock().add(now, 1, 0);
    }

    /// May one retry be made? `false` = budget exhausted (and the retry is not counted).
    pub fn withdraw(&self) -> bool {
        let now = Instant::now();
        let mut counts = self.lock();
        let (requests, retries) = counts.totals(now);
        let allowed = self.allowed(requests);
        let wanted = retries.saturating_add(1).saturating_mul(MICROS);
        if wanted <= allowed {
            counts.add(now, 0, 1);
            return true;
        }
        drop(counts);
        tracing::debug!(
            requests,
            retries,
            reason = "retry-budget-exhausted",
            "retry refused by the retry budget"
        );
        false
    }

    /// Retries that [`withdraw`](Self::withdraw) would allow right now.
    pub fn available(&self) -> u64 {
        let (requests, retries) = self.lock().totals(Instant::now());
        (self.allowed(requests) / MICROS).saturating_sub(retries)
    }

    /// The config in force.
    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    fn allowed(&self, requests: u64) -> u64 {
        self.floor
            .saturating_add(self.per_request.saturating_mul(requests))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlidingCounter> {
        // The critical sections only do saturating arithmetic and cannot panic; a poisoned
        // lock still holds consistent counts.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn budget(ratio: f64, min_per_second: u32, window_secs: u64) -> RetryBudget {
        RetryBudget::new(
            BudgetConfig::new(ratio, min_per_second, Duration::from_secs(window_secs)).unwrap(),
        )
    }

    fn withdraw_all(budget: &RetryBudget) -> u32 {
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
            assert!(granted < 100_000, "budget never ran out");
        }
        granted
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_allows_a_fifth_of_requests_as_retries() {
        let budget = budget(0.2, 0, 10);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 20);
        for i in 0..20 {
            assert!(budget.withdraw(), "retry {i} refused");
        }
        assert!(!budget.withdraw(), "the 21st retry must be refused");
        // A refused retry is not counted: one more request earns a fraction, five earn one.
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(!budget.withdraw());
        budget.deposit();
        assert!(budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn floor_adds_to_the_ratio() {
        // 10/s over 10s = 100 retries, plus 20% of 100 requests.
        let budget = budget(0.2, 10, 10);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(withdraw_all(&budget), 120);
    }

    #[tokio::test(start_paused = true)]
    async fn floor_alone_allows_retries_without_requests() {
        let budget = budget(0.2, 3, 5);
        assert_eq!(withdraw_all(&budget), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_after_the_window_passes() {
        let budget = budget(0.2, 0, 10);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(withdraw_all(&budget), 20);
        // Still inside the window: the old requests and retries both count, so 10 new
        // requests only earn 2 more retries on top of the 20 already made.
        advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 2);
        // The first 100 requests and the 20 retries age out; the 10 recent requests remain.
        advance(Duration::from_secs(6)).await;
        assert_eq!(budget.available(), 2);
        assert_eq!(withdraw_all(&budget), 2);
        // Long idle: everything ages out.
        advance(Duration::from_secs(60)).await;
        assert_eq!(budget.available(), 0);
        for _ in 0..50 {
            budget.deposit();
        }
        assert_eq!(withdraw_all(&budget), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides_bucket_by_bucket() {
        // 10s window = 1s buckets. Requests spread over time age out in order.
        let budget = budget(1.0, 0, 10);
        for _ in 0..10 {
            budget.deposit();
            advance(Duration::from_secs(1)).await;
        }
        // At t=10s the request of t=0 has aged out, 9 remain.
        assert_eq!(budget.available(), 9);
        advance(Duration::from_secs(3)).await;
        assert_eq!(budget.available(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn ratios_do_not_lose_retries_to_rounding() {
        // 0.29 * 100 is 28.999999999999996 in floating point; the budget still allows 29.
        let budget = budget(0.29, 0, 10);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(withdraw_all(&budget), 29);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_budget_refuses_every_retry() {
        let budget = budget(0.0, 0, 10);
        for _ in 0..1_000 {
            budget.deposit();
        }
        assert!(!budget.withdraw());
    }

    #[test]
    fn validates_proto_budget() {
        let proto = v1::RetryBudget {
            ratio: 0.2,
            min_per_second: 10,
            window: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
        };
        assert_eq!(BudgetConfig::try_from(&proto), Ok(BudgetConfig::default()));
        for ratio in [-0.1, 1000.5, f64::NAN, f64::INFINITY] {
            let bad = v1::RetryBudget { ratio, ..proto };
            assert!(matches!(
                BudgetConfig::try_from(&bad),
                Err(InvalidBudget::Ratio(_))
            ));
        }
        let no_window = v1::RetryBudget {
            window: None,
            ..proto
        };
        assert_eq!(
            BudgetConfig::try_from(&no_window),
            Err(InvalidBudget::MissingWindow)
        );
        let zero = v1::RetryBudget {
            window: Some(prost_types::Duration::default()),
            ..proto
        };
        assert_eq!(
            BudgetConfig::try_from(&zero),
            Err(InvalidBudget::ZeroWindow)
        );
    }

    #[test]
    fn budget_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RetryBudget>();
    }
}
