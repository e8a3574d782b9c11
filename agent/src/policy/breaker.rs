//! Circuit breaker, one per endpoint.
//!
//! Closed: requests flow; the breaker trips on `consecutive_failures` failures in a row, or when
//! the failure ratio over a sliding window reaches the threshold with at least `min_requests`
//! in it. Open: every request is refused until the open period ends. Half-open: the first
//! `half_open_probes` requests go through as probes, the rest are refused; when all probes
//! succeed the breaker closes (counters and open period reset), when one fails it re-opens for
//! twice the previous period, capped at `max_open_duration`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bulwark_proto::{defaults, v1};
use tokio::time::Instant;

use crate::policy::duration::{InvalidDuration, duration};
use crate::policy::window::SlidingCounter;

/// The wait suggested to requests refused while the half-open probes are in flight: the probes'
/// outcome is usually known within one request's latency.
pub const PROBE_RETRY_AFTER: Duration = Duration::from_millis(100);

/// A `circuitBreaker` section that cannot be enforced. Messages name the field within the
/// section; the caller prefixes the section.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidBreaker {
    /// `open_duration` is absent.
    #[error("openDuration is missing; the control plane must send an exact value")]
    MissingOpenDuration,
    /// `max_open_duration` is absent.
    #[error("maxOpenDuration is missing; the control plane must send an exact value")]
    MissingMaxOpenDuration,
    /// `open_duration` is not a valid duration.
    #[error("openDuration: {0}")]
    OpenDuration(InvalidDuration),
    /// `max_open_duration` is not a valid duration.
    #[error("maxOpenDuration: {0}")]
    MaxOpenDuration(InvalidDuration),
    /// `open_duration` is zero.
    #[error("openDuration is 0; it must be positive, e.g. 5s")]
    ZeroOpenDuration,
    /// `open_duration` exceeds `max_open_duration`.
    #[error("openDuration ({open:?}) exceeds maxOpenDuration ({max:?})")]
    OpenExceedsMax {
        /// The configured open duration.
        open: Duration,
        /// The configured maximum.
        max: Duration,
    },
    /// `half_open_probes` is zero.
    #[error("halfOpenProbes is 0; at least one probe is needed to ever close again")]
    ZeroProbes,
    /// `failure_ratio.threshold` is outside `(0, 1]`.
    #[error("failureRatio.threshold {0} is outside (0, 1]; 0.5 trips at half failing")]
    Threshold(f64),
    /// `failure_ratio.min_requests` is zero.
    #[error("failureRatio.minRequests is 0; it must be at least 1, e.g. 20")]
    ZeroMinRequests,
    /// `failure_ratio.window` is absent.
    #[error("failureRatio.window is missing; the control plane must send an exact value")]
    MissingWindow,
    /// `failure_ratio.window` is not a valid duration.
    #[error("failureRatio.window: {0}")]
    Window(InvalidDuration),
    /// `failure_ratio.window` is zero.
    #[error("failureRatio.window is 0; it must be positive, e.g. 10s")]
    ZeroWindow,
}

/// Trip on a failure ratio over a sliding window.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRatio {
    /// Trip when failures / requests reaches this, in `(0, 1]`.
    pub threshold: f64,
    /// Requests the window must hold before the ratio counts.
    pub min_requests: u32,
    /// Length of the sliding window.
    pub window: Duration,
}

impl TryFrom<&v1::FailureRatio> for FailureRatio {
    type Error = InvalidBreaker;

    fn try_from(proto: &v1::FailureRatio) -> Result<Self, Self::Error> {
        // Written as a negated range test so that NaN is rejected too.
        if !(proto.threshold > 0.0 && proto.threshold <= 1.0) {
            return Err(InvalidBreaker::Threshold(proto.threshold));
        }
        if proto.min_requests == 0 {
            return Err(InvalidBreaker::ZeroMinRequests);
        }
        let window = proto.window.as_ref().ok_or(InvalidBreaker::MissingWindow)?;
        let window = duration(window).map_err(InvalidBreaker::Window)?;
        if window.is_zero() {
            return Err(InvalidBreaker::ZeroWindow);
        }
        Ok(Self {
            threshold: proto.threshold,
            min_requests: proto.min_requests,
            window,
        })
    }
}

/// Validated circuit-breaker config.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Trip after this many failures in a row; 0 disables this trigger.
    pub consecutive_failures: u32,
    /// Trip on a failure ratio; `None` disables this trigger.
    pub failure_ratio: Option<FailureRatio>,
    /// The first open period.
    pub open_duration: Duration,
    /// The cap of the open period, which doubles each time a probe fails.
    pub max_open_duration: Duration,
    /// Probes let through at once when the open period ends.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// The policy API's defaults: 5 consecutive failures, no ratio, open 5s up to 60s, 1 probe.
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::DEFAULT_CONSECUTIVE_FAILURES,
            failure_ratio: None,
            open_duration: defaults::DEFAULT_OPEN_DURATION,
            max_open_duration: defaults::DEFAULT_MAX_OPEN_DURATION,
            half_open_probes: defaults::DEFAULT_HALF_OPEN_PROBES,
        }
    }
}

impl BreakerConfig {
    /// A breaker that never trips: for endpoints whose service has no circuit-breaker policy.
    pub fn disabled() -> Self {
        Self {
            consecutive_failures: 0,
            failure_ratio: None,
            ..Self::default()
        }
    }

    /// Whether any trigger is configured (a breaker without one never trips).
    pub fn is_enabled(&self) -> bool {
        self.consecutive_failures > 0 || self.failure_ratio.is_some()
    }
}

impl TryFrom<&v1::CircuitBreaker> for BreakerConfig {
    type Error = InvalidBreaker;

    fn try_from(proto: &v1::CircuitBreaker) -> Result<Self, Self::Error> {
        let open = proto
            .open_duration
            .as_ref()
            .ok_or(InvalidBreaker::MissingOpenDuration)?;
        let open = duration(open).map_err(InvalidBreaker::OpenDuration)?;
        let max = proto
            .max_open_duration
            .as_ref()
            .ok_or(InvalidBreaker::MissingMaxOpenDuration)?;
        let max = duration(max).map_err(InvalidBreaker::MaxOpenDuration)?;
        if open.is_zero() {
            return Err(InvalidBreaker::ZeroOpenDuration);
        }
        if open > max {
            return Err(InvalidBreaker::OpenExceedsMax { open, max });
        }
        if proto.half_open_probes == 0 {
            return Err(InvalidBreaker::ZeroProbes);
        }
        Ok(Self {
            consecutive_failures: proto.consecutive_failures,
            failure_ratio: proto
                .failure_ratio
                .as_ref()
                .map(FailureRatio::try_from)
                .transpose()?,
            open_duration: open,
            max_open_duration: max,
            half_open_probes: proto.half_open_probes,
        })
    }
}

/// What a breaker does with requests right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Requests flow; outcomes are counted.
    Closed,
    /// Requests are refused until the open period ends.
    Open,
    /// Probes may go through; their outcome closes or re-opens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// The value of the `bulwark_breaker_state` gauge: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(&self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }

    /// The state's name in logs and the config dump.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The breaker refused a request; try again (or another endpoint) after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker is open; next attempt allowed in {retry_after:?}")]
pub struct Open {
    /// Time until the breaker may admit a request again.
    pub retry_after: Duration,
}

/// A circuit breaker for one endpoint, shared as `Arc` by everything that sends to it.
pub struct CircuitBreaker {
    config: BreakerConfig,
    name: Arc<str>,
    enabled: bool,
    /// `epoch << 2 | phase`: lets the closed hot path decide with one atomic load, no lock.
    /// Written only with `inner` locked.
    word: AtomicU64,
    trips: AtomicU64,
    // A short mutex: every transition reads and writes several fields at once (phase, epoch,
    // counters, window, open period); no await happens while it is held.
    inner: Mutex<Inner>,
}

const PHASE_CLOSED: u64 = 0;
const PHASE_OTHER: u64 = 1;

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Bumped on every transition, so outcomes of permits from an earlier phase are ignored.
    epoch: u64,
    consecutive: u32,
    /// (requests, failures) over the failure-ratio window.
    window: Option<SlidingCounter>,
    /// The next open period: doubles when a probe fails, resets when the breaker closes.
    open_period: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

impl CircuitBreaker {
    /// A closed breaker; `name` identifies it in logs (e.g. "reviews.demo:80 127.0.0.21:8080").
    pub fn new(config: BreakerConfig, name: Arc<str>) -> Self {
        let now = Instant::now();
        let inner = Inner {
            phase: Phase::Closed,
            epoch: 0,
            consecutive: 0,
            window: config
                .failure_ratio
                .as_ref()
                .map(|ratio| SlidingCounter::new(ratio.window, now)),
            open_period: config.open_duration,
        };
        Self {
            enabled: config.is_enabled(),
            config,
            name,
            word: AtomicU64::new(PHASE_CLOSED),
            trips: AtomicU64::new(0),
            inner: Mutex::new(inner),
        }
    }

    /// Asks to send one request: a permit to report its outcome with, or [`Open`].
    pub fn acquire(self: &Arc<Self>) -> Result<BreakerPermit, Open> {
        let word = self.word.load(Ordering::Acquire);
        if word & 0b11 == PHASE_CLOSED {
            return Ok(self.permit(word >> 2, false));
        }
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.phase {
            Phase::Closed => Ok(self.permit(inner.epoch, false)),
            Phase::Open { until } if now >= until => {
                self.transition(
                    &mut inner,
                    Phase::HalfOpen {
                        admitted: 1,
                        succeeded: 0,
                    },
                );
                tracing::info!(
                    breaker = %self.name,
                    from = "open",
                    to = "half-open",
                    probes = self.config.half_open_probes,
                    "circuit breaker half-open"
                );
                Ok(self.permit(inner.epoch, true))
            }
            Phase::HalfOpen {
                admitted,
                succeeded,
            } if admitted < self.config.half_open_probes => {
                inner.phase = Phase::HalfOpen {
                    admitted: admitted + 1,
                    succeeded,
                };
                Ok(self.permit(inner.epoch, true))
            }
            phase => {
                let retry_after = retry_after(phase, now).unwrap_or(PROBE_RETRY_AFTER);
                drop(inner);
                tracing::debug!(
                    breaker = %self.name,
                    reason = "circuit-open",
                    ?retry_after,
                    "circuit breaker refused request"
                );
                Err(Open { retry_after })
            }
        }
    }

    /// Cheap: would [`acquire`](Self::acquire) succeed now? (No state change.)
    pub fn is_available(&self) -> bool {
        self.retry_after().is_none()
    }

    /// Time until a request would be admitted; `None` if one would be admitted now.
    pub fn retry_after(&self) -> Option<Duration> {
        if self.word.load(Ordering::Acquire) & 0b11 == PHASE_CLOSED {
            return None;
        }
        let now = Instant::now();
        match self.lock().phase {
            Phase::HalfOpen { admitted, .. } if admitted < self.config.half_open_probes => None,
            phase => retry_after(phase, now),
        }
    }

    /// The state now. Once the open period has elapsed the breaker reports
    /// [`BreakerState::HalfOpen`] even before a probe was sent, because the next request
    /// would be admitted as a probe.
    pub fn state(&self) -> BreakerState {
        if self.word.load(Ordering::Acquire) & 0b11 == PHASE_CLOSED {
            return BreakerState::Closed;
        }
        let now = Instant::now();
        match self.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if now < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Times it went from closed or half-open to open.
    pub fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// The config in force.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The name used in logs.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn permit(self: &Arc<Self>, epoch: u64, probe: bool) -> BreakerPermit {
        BreakerPermit {
            breaker: Arc::clone(self),
            epoch,
            probe,
            settled: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Critical sections do not panic; a poisoned lock still holds a consistent state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn transition(&self, inner: &mut Inner, phase: Phase) {
        inner.phase = phase;
        inner.epoch += 1;
        let bits = match phase {
            Phase::Closed => PHASE_CLOSED,
            Phase::Open { .. } | Phase::HalfOpen { .. } => PHASE_OTHER,
        };
        self.word.store(inner.epoch << 2 | bits, Ordering::Release);
    }

    fn record(&self, epoch: u64, failed: bool) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.epoch != epoch {
            // The request was admitted in an earlier phase (e.g. before the breaker opened):
            // its outcome says nothing about the endpoint's health now.
            return;
        }
        match inner.phase {
            Phase::Closed => self.record_closed(&mut inner, now, failed),
            Phase::HalfOpen {
                admitted,
                succeeded,
            } => {
                if failed {
                    let doubled = inner.open_period.saturating_mul(2);
                    inner.open_period = doubled.min(self.config.max_open_duration);
                    self.trip(&mut inner, now, "half-open", "probe-failed");
                } else if succeeded + 1 >= self.config.half_open_probes {
                    inner.open_period = self.config.open_duration;
                    inner.consecutive = 0;
                    if let Some(window) = inner.window.as_mut() {
                        window.clear();
                    }
                    self.transition(&mut inner, Phase::Closed);
                    tracing::info!(
                        breaker = %self.name,
                        from = "half-open",
                        to = "closed",
                        "circuit breaker closed"
                    );
                } else {
                    inner.phase = Phase::HalfOpen {
                        admitted,
                        succeeded: succeeded + 1,
                    };
                }
            }
            // Only probes are admitted while not closed, and their epoch is the half-open one.
            Phase::Open { .. } => {}
        }
    }

    fn record_closed(&self, inner: &mut Inner, now: Instant, failed: bool) {
        inner.consecutive = if failed {
            inner.consecutive.saturating_add(1)
        } else {
            0
        };
        let totals = inner.window.as_mut().map(|window| {
            window.add(now, 1, u64::from(failed));
            window.totals(now)
        });
        // A success never opens the breaker: the ratio is only checked when a failure raises it.
        if !failed {
            return;
        }
        let n = self.config.consecutive_failures;
        if n > 0 && inner.consecutive >= n {
            self.trip(inner, now, "closed", "consecutive-failures");
            return;
        }
        if let (Some(ratio), Some((requests, failures))) = (&self.config.failure_ratio, totals)
            && requests >= u64::from(ratio.min_requests)
            && failures as f64 / requests as f64 >= ratio.threshold
        {
            self.trip(inner, now, "closed", "failure-ratio");
        }
    }

    fn trip(&self, inner: &mut Inner, now: Instant, from: &'static str, reason: &'static str) {
        let open_for = inner.open_period;
        inner.consecutive = 0;
        if let Some(window) = inner.window.as_mut() {
            window.clear();
        }
        self.transition(
            inner,
            Phase::Open {
                until: now + open_for,
            },
        );
        self.trips.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            breaker = %self.name,
            from,
            to = "open",
            reason,
            ?open_for,
            "circuit breaker opened"
        );
    }

    fn cancel_probe(&self, epoch: u64) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        if let Phase::HalfOpen { admitted, .. } = &mut inner.phase {
            *admitted = admitted.saturating_sub(1);
            tracing::debug!(breaker = %self.name, "half-open probe cancelled; slot freed");
        }
    }
}

fn retry_after(phase: Phase, now: Instant) -> Option<Duration> {
    match phase {
        Phase::Closed => None,
        Phase::Open { until } if now >= until => None,
        Phase::Open { until } => Some(until - now),
        Phase::HalfOpen { .. } => Some(PROBE_RETRY_AFTER),
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("state", &self.state())
            .field("trips", &self.trips())
            .finish()
    }
}

/// Permission to send one request; report how it went with [`success`](Self::success) or
/// [`failure`](Self::failure). Dropping it unreported (the request was cancelled) records
/// nothing, but frees a half-open probe slot.
#[must_use = "report the request's outcome with success() or failure()"]
pub struct BreakerPermit {
    breaker: Arc<CircuitBreaker>,
    epoch: u64,
    probe: bool,
    settled: bool,
}

impl BreakerPermit {
    /// The request succeeded.
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.record(self.epoch, false);
    }

    /// The request failed (the caller decides what counts as a failure).
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.record(self.epoch, true);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            self.breaker.cancel_probe(self.epoch);
        }
    }
}

impl fmt::Debug for BreakerPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerPermit")
            .field("breaker", &self.breaker.name)
            .field("probe", &self.probe)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn consecutive(n: u32) -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: n,
            failure_ratio: None,
            open_duration: secs(5),
            max_open_duration: secs(30),
            half_open_probes: 1,
        }
    }

    fn breaker(config: BreakerConfig) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new(config, "test 127.0.0.1:80".into()))
    }

    fn fail(b: &Arc<CircuitBreaker>, n: u32) {
        for _ in 0..n {
            b.acquire().expect("closed breaker admits").failure();
        }
    }

    fn succeed(b: &Arc<CircuitBreaker>, n: u32) {
        for _ in 0..n {
            b.acquire().expect("closed breaker admits").success();
        }
    }

    /// Opens the breaker and lets the open period pass.
    async fn open_and_wait(b: &Arc<CircuitBreaker>) {
        fail(b, b.config().consecutive_failures);
        assert_eq!(b.state(), BreakerState::Open);
        let period = b.lock().open_period;
        advance(period).await;
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_exactly_n_consecutive_failures() {
        let b = breaker(consecutive(3));
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.trips(), 1);
        assert!(b.acquire().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let b = breaker(consecutive(3));
        for _ in 0..10 {
            fail(&b, 2);
            succeed(&b, 1);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.trips(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_while_open_with_the_remaining_time() {
        let b = breaker(consecutive(1));
        fail(&b, 1);
        assert_eq!(b.acquire().unwrap_err().retry_after, secs(5));
        assert!(!b.is_available());
        advance(secs(2)).await;
        assert_eq!(b.acquire().unwrap_err().retry_after, secs(3));
        assert_eq!(b.retry_after(), Some(secs(3)));
        advance(Duration::from_millis(2_999)).await;
        assert_eq!(
            b.acquire().unwrap_err().retry_after,
            Duration::from_millis(1)
        );
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_one_probe_after_the_open_period() {
        let b = breaker(consecutive(1));
        open_and_wait(&b).await;
        // The period is over: reported half-open and available even before the probe.
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.is_available());

        let probe = b.acquire().expect("one probe is admitted");
        assert!(probe.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.is_available());
        let refused = b
            .acquire()
            .expect_err("a second concurrent request is refused");
        assert_eq!(refused.retry_after, PROBE_RETRY_AFTER);
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_success_closes_and_resets() {
        let b = breaker(consecutive(2));
        open_and_wait(&b).await;
        b.acquire().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
        // Counters were reset: it takes the full N failures again.
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        // ... and the open period is back to the configured one.
        assert_eq!(b.acquire().unwrap_err().retry_after, secs(5));
        assert_eq!(b.trips(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_with_a_doubled_capped_period() {
        let b = breaker(consecutive(1));
        fail(&b, 1);
        advance(secs(5)).await;
        for (trips, period) in [(2, 10), (3, 20), (4, 30), (5, 30)] {
            b.acquire().expect("probe after the open period").failure();
            assert_eq!(b.state(), BreakerState::Open);
            assert_eq!(b.acquire().unwrap_err().retry_after, secs(period));
            assert_eq!(b.trips(), trips);
            // Still open one millisecond before the longer period ends.
            advance(secs(period) - Duration::from_millis(1)).await;
            assert_eq!(b.state(), BreakerState::Open);
            advance(Duration::from_millis(1)).await;
            assert_eq!(b.state(), BreakerState::HalfOpen);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_frees_the_slot() {
        let b = breaker(consecutive(1));
        open_and_wait(&b).await;
        let probe = b.acquire().unwrap();
        assert!(b.acquire().is_err());
        drop(probe);
        // Nothing was recorded: still half-open, and the next request becomes the probe.
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.trips(), 1);
        let probe = b.acquire().expect("the freed slot is reused");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn several_probes_must_all_succeed() {
        let b = breaker(BreakerConfig {
            half_open_probes: 3,
            ..consecutive(1)
        });
        open_and_wait(&b).await;
        let probes: Vec<_> = (0..3).map(|_| b.acquire().unwrap()).collect();
        assert!(b.acquire().is_err(), "only three probes at once");
        let mut probes = probes.into_iter();
        probes.next().unwrap().success();
        probes.next().unwrap().success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probes.next().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn one_failed_probe_of_several_reopens() {
        let b = breaker(BreakerConfig {
            half_open_probes: 2,
            ..consecutive(1)
        });
        open_and_wait(&b).await;
        let first = b.acquire().unwrap();
        let second = b.acquire().unwrap();
        first.success();
        second.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.acquire().unwrap_err().retry_after, secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_from_before_the_trip_are_ignored() {
        let b = breaker(consecutive(2));
        let early = b.acquire().unwrap();
        let late_failure = b.acquire().unwrap();
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Open);
        advance(secs(5)).await;
        let probe = b.acquire().unwrap();
        // A success admitted before the trip does not count as the probe's.
        early.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        // A failure admitted long ago does not count against the fresh closed period.
        late_failure.failure();
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    fn ratio(threshold: f64, min_requests: u32) -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 0,
            failure_ratio: Some(FailureRatio {
                threshold,
                min_requests,
                window: secs(10),
            }),
            ..consecutive(0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_trigger_respects_min_requests() {
        let b = breaker(ratio(0.5, 10));
        // 100% failures but only 9 requests: not enough to judge.
        fail(&b, 9);
        assert_eq!(b.state(), BreakerState::Closed);
        // The 10th request, a failure, makes the ratio count.
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.trips(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_trigger_needs_the_threshold() {
        let b = breaker(ratio(0.5, 10));
        // Alternate: 4 failures in 9 requests, then the 10th fails: 5/10 = 0.5 reaches it.
        for _ in 0..4 {
            succeed(&b, 1);
            fail(&b, 1);
        }
        succeed(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);

        // Below the threshold it never trips, however long it runs.
        let b = breaker(ratio(0.5, 10));
        for _ in 0..100 {
            succeed(&b, 2);
            fail(&b, 1);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_window_forgets_old_failures() {
        let b = breaker(ratio(0.5, 10));
        fail(&b, 9);
        // The nine failures age out of the 10s window.
        advance(secs(11)).await;
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed);
        succeed(&b, 8);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed, "2 of 10 is below 0.5");
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_without_triggers_never_trips() {
        let b = breaker(BreakerConfig::disabled());
        fail(&b, 10_000);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.trips(), 0);
        assert!(b.is_available());
    }

    #[test]
    fn gauge_values() {
        assert_eq!(BreakerState::Closed.as_gauge(), 0);
        assert_eq!(BreakerState::Open.as_gauge(), 1);
        assert_eq!(BreakerState::HalfOpen.as_gauge(), 2);
        assert_eq!(BreakerState::HalfOpen.to_string(), "half-open");
    }

    fn proto_duration(seconds: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos: 0 })
    }

    #[test]
    fn validates_proto_breaker() {
        let proto = v1::CircuitBreaker {
            consecutive_failures: 5,
            failure_ratio: Some(v1::FailureRatio {
                threshold: 0.5,
                min_requests: 20,
                window: proto_duration(10),
            }),
            open_duration: proto_duration(3),
            max_open_duration: proto_duration(30),
            half_open_probes: 1,
        };
        let config = BreakerConfig::try_from(&proto).unwrap();
        assert_eq!(
            config,
            BreakerConfig {
                consecutive_failures: 5,
                failure_ratio: Some(FailureRatio {
                    threshold: 0.5,
                    min_requests: 20,
                    window: secs(10)
                }),
                open_duration: secs(3),
                max_open_duration: secs(30),
                half_open_probes: 1,
            }
        );

        let check = |edit: fn(&mut v1::CircuitBreaker), want: InvalidBreaker| {
            let mut bad = proto;
            edit(&mut bad);
            assert_eq!(BreakerConfig::try_from(&bad), Err(want));
        };
        check(
            |p| p.open_duration = None,
            InvalidBreaker::MissingOpenDuration,
        );
        check(
            |p| p.open_duration = proto_duration(0),
            InvalidBreaker::ZeroOpenDuration,
        );
        check(
            |p| p.open_duration = proto_duration(60),
            InvalidBreaker::OpenExceedsMax {
                open: secs(60),
                max: secs(30),
            },
        );
        check(|p| p.half_open_probes = 0, InvalidBreaker::ZeroProbes);
        check(
            |p| {
                if let Some(r) = p.failure_ratio.as_mut() {
                    r.threshold = 1.5;
                }
            },
            InvalidBreaker::Threshold(1.5),
        );
        check(
            |p| {
                if let Some(r) = p.failure_ratio.as_mut() {
                    r.min_requests = 0;
                }
            },
            InvalidBreaker::ZeroMinRequests,
        );
        check(
            |p| {
                if let Some(r) = p.failure_ratio.as_mut() {
                    r.window = None;
                }
            },
            InvalidBreaker::MissingWindow,
        );
        let mut nan = proto;
        if let Some(r) = nan.failure_ratio.as_mut() {
            r.threshold = f64::NAN;
        }
        assert!(matches!(
            BreakerConfig::try_from(&nan),
            Err(InvalidBreaker::Threshold(_))
        ));
    }

    #[test]
    fn breaker_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CircuitBreaker>();
        assert_send_sync::<BreakerPermit>();
    }
}
