//! Watches the agent's `/metrics` every 100 ms and turns breaker gauges into a
//! timeline of state changes per endpoint (and notes the bulkheads' peaks).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bulwark_testkit::Metrics;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::progress::Progress;

/// How often the agent's metrics are read.
pub const SCRAPE_INTERVAL: Duration = Duration::from_millis(100);

/// A breaker's state as the agent's gauge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// 0: requests flow.
    Closed,
    /// 1: the endpoint gets no traffic.
    Open,
    /// 2: probes are allowed through.
    HalfOpen,
}

impl BreakerState {
    fn from_gauge(value: f64) -> Option<Self> {
        match value as i64 {
            0 => Some(Self::Closed),
            1 => Some(Self::Open),
            2 => Some(Self::HalfOpen),
            _ => None,
        }
    }
}

/// One change of a breaker, as seen between two scrapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerEvent {
    /// Closed -> open.
    Opened,
    /// Open or half-open -> open again (a probe failed).
    Reopened,
    /// Open -> half-open (the open period ended).
    HalfOpen,
    /// Open or half-open -> closed (a probe succeeded).
    Closed,
}

/// A breaker of one endpoint of one destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BreakerKey {
    /// The destination (`reviews.demo:80`).
    pub dst: String,
    /// The endpoint (`127.0.0.23:8080`).
    pub endpoint: String,
}

/// What the watcher saw over the whole run.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    /// Breaker changes per endpoint, in order, with their time from the start of the traffic.
    pub breakers: BTreeMap<BreakerKey, Vec<(Duration, BreakerEvent)>>,
    /// The highest `bulwark_bulkhead_in_flight` seen per destination.
    pub max_in_flight: BTreeMap<String, f64>,
    /// The highest `bulwark_bulkhead_queued` seen per destination.
    pub max_queued: BTreeMap<String, f64>,
    /// Scrapes that worked.
    pub scrapes: u64,
    /// Scrapes that failed (the last error is kept).
    pub failed_scrapes: u64,
    /// Why the last failed scrape failed.
    pub last_error: Option<String>,
    /// Each breaker as of the last scrape.
    seen: BTreeMap<BreakerKey, Seen>,
}

/// What the watcher remembers of one breaker between scrapes.
#[derive(Debug, Clone, Copy)]
struct Seen {
    state: BreakerState,
    trips: f64,
}

impl Observations {
    /// Folds one scrape taken at `at` into the timeline; returns the new events.
    pub fn record(&mut self, at: Duration, metrics: &Metrics) -> Vec<(BreakerKey, BreakerEvent)> {
        self.scrapes += 1;
        let mut events = Vec::new();
        for sample in metrics.samples("bulwark_breaker_state") {
            let (Some(dst), Some(endpoint)) = (sample.label("dst"), sample.label("endpoint"))
            else {
                continue;
            };
            let Some(state) = BreakerState::from_gauge(sample.value) else {
                continue;
            };
            let key = BreakerKey {
                dst: dst.to_owned(),
                endpoint: endpoint.to_owned(),
            };
            let trips = metrics.get(
                "bulwark_breaker_trips_total",
                &[("dst", dst), ("endpoint", endpoint)],
            );
            let previous = self.seen.insert(key.clone(), Seen { state, trips });
            for event in changes(previous, Seen { state, trips }) {
                self.breakers
                    .entry(key.clone())
                    .or_default()
                    .push((at, event));
                events.push((key.clone(), event));
            }
        }
        for (gauge, peaks) in [
            ("bulwark_bulkhead_in_flight", &mut self.max_in_flight),
            ("bulwark_bulkhead_queued", &mut self.max_queued),
        ] {
            for sample in metrics.samples(gauge) {
                if let Some(dst) = sample.label("dst") {
                    let peak = peaks.entry(dst.to_owned()).or_insert(0.0);
                    *peak = peak.max(sample.value);
                }
            }
        }
        events
    }
}

/// The events that explain going from `previous` to `now`. Scrapes are 100 ms
/// apart and a probe takes a millisecond, so the trip counter fills in the
/// changes the gauge alone would miss (e.g. open -> half-open -> open).
fn changes(previous: Option<Seen>, now: Seen) -> Vec<BreakerEvent> {
    use BreakerState::{Closed, HalfOpen, Open};
    let (before, new_trips) = match previous {
        Some(previous) => (previous.state, now.trips > previous.trips),
        // First sight: a breaker already open was opened before we looked.
        None => (Closed, false),
    };
    match (before, now.state) {
        (Closed, Closed) if new_trips => vec![BreakerEvent::Opened, BreakerEvent::Closed],
        (Closed, Closed) => vec![],
        (Closed, Open) => vec![BreakerEvent::Opened],
        (Closed, HalfOpen) => vec![BreakerEvent::Opened, BreakerEvent::HalfOpen],
        (Open | HalfOpen, Open) if new_trips => vec![BreakerEvent::Reopened],
        (Open, Open) | (HalfOpen, HalfOpen) => vec![],
        (HalfOpen, Open) => vec![BreakerEvent::Reopened],
        (Open, HalfOpen) if new_trips => vec![BreakerEvent::Reopened, BreakerEvent::HalfOpen],
        (Open, HalfOpen) => vec![BreakerEvent::HalfOpen],
        (Open | HalfOpen, Closed) if new_trips => {
            vec![BreakerEvent::Reopened, BreakerEvent::Closed]
        }
        (Open | HalfOpen, Closed) => vec![BreakerEvent::Closed],
    }
}

/// Scrapes `admin` every 100 ms until `stop` turns true, printing breaker
/// changes as they happen; returns the observations and the last good scrape.
pub async fn watch(
    admin: SocketAddr,
    start: Instant,
    progress: Progress,
    mut stop: watch::Receiver<bool>,
) -> (Observations, Option<Metrics>) {
    let mut observations = Observations::default();
    let mut last = None;
    let mut ticks = tokio::time::interval(SCRAPE_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
                continue;
            }
        }
        match Metrics::scrape(admin).await {
            Ok(metrics) => {
                let at = start.elapsed();
                for (key, event) in observations.record(at, &metrics) {
                    progress.say(at, &describe(&key, event));
                }
                last = Some(metrics);
            }
            Err(err) => {
                observations.failed_scrapes += 1;
                tracing::debug!(error = %err, "scraping the agent failed");
                observations.last_error = Some(err.to_string());
            }
        }
    }
    (observations, last)
}

fn describe(key: &BreakerKey, event: BreakerEvent) -> String {
    let what = match event {
        BreakerEvent::Opened => "breaker opened",
        BreakerEvent::Reopened => "breaker re-opened (probe failed)",
        BreakerEvent::HalfOpen => "breaker half-open (probing)",
        BreakerEvent::Closed => "breaker closed (probe succeeded)",
    };
    format!("{what}: {} of {}", key.endpoint, key.dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(state: u8, trips: u32) -> Metrics {
        Metrics::parse(&format!(
            "bulwark_breaker_state{{dst=\"reviews.demo:80\",endpoint=\"127.0.0.23:8080\"}} {state}\n\
             bulwark_breaker_trips_total{{dst=\"reviews.demo:80\",endpoint=\"127.0.0.23:8080\"}} {trips}\n\
             bulwark_bulkhead_in_flight{{dst=\"payments.demo:80\"}} {trips}\n"
        ))
        .unwrap()
    }

    fn timeline(pages: &[(u8, u32)]) -> Vec<(u64, BreakerEvent)> {
        let mut observations = Observations::default();
        for (i, &(state, trips)) in pages.iter().enumerate() {
            observations.record(Duration::from_secs(i as u64), &page(state, trips));
        }
        observations
            .breakers
            .values()
            .flatten()
            .map(|(at, event)| (at.as_secs(), *event))
            .collect()
    }

    #[test]
    fn open_reopen_close_is_told_in_order() {
        use BreakerEvent::*;
        assert_eq!(
            timeline(&[(0, 0), (1, 1), (1, 1), (2, 1), (1, 2), (1, 3), (0, 3)]),
            vec![
                (1, Opened),
                (3, HalfOpen),
                (4, Reopened),
                (5, Reopened),
                (6, Closed)
            ]
        );
    }

    #[test]
    fn changes_between_scrapes_are_recovered_from_the_trip_counter() {
        use BreakerEvent::*;
        // Opened and closed again between two scrapes.
        assert_eq!(timeline(&[(0, 0), (0, 1)]), vec![(1, Opened), (1, Closed)]);
        // Already open when first seen.
        assert_eq!(timeline(&[(1, 1)]), vec![(0, Opened)]);
        // A healthy endpoint says nothing.
        assert_eq!(timeline(&[(0, 0), (0, 0)]), vec![]);
    }

    #[test]
    fn bulkhead_peaks_are_kept() {
        let mut observations = Observations::default();
        for trips in [3, 8, 2] {
            observations.record(Duration::ZERO, &page(0, trips));
        }
        assert_eq!(
            observations.max_in_flight.get("payments.demo:80"),
            Some(&8.0)
        );
    }
}
