//! What a test upstream has seen: request counts by method, failures it made, requests in flight.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A copy of an upstream's counters (JSON at `GET /_upstream/stats`).
///
/// Control requests (`/_upstream/...`) are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests received since start.
    pub total: u64,
    /// Requests received, by method (`"GET"`, `"POST"`, ...).
    pub by_method: BTreeMap<String, u64>,
    /// Requests being handled now (hanging ones included).
    pub in_flight: u64,
    /// The most requests ever in flight at once.
    #[serde(default)]
    pub max_in_flight: u64,
    /// Requests answered with an injected failure (`fail_ratio` or `grpc_status`).
    pub failures: u64,
    /// Connections reset because of the `reset` knob.
    pub resets: u64,
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    total: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    failures: AtomicU64,
    resets: AtomicU64,
    // A map keyed by method is simplest; the lock is held for one insert and
    // never across an await.
    by_method: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Counts one request as received and in flight until the guard drops.
    pub(super) fn begin(&self, method: &http::Method) -> InFlight<'_> {
        self.total.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        let mut by_method = self
            .by_method
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match by_method.get_mut(method.as_str()) {
            Some(count) => *count += 1,
            None => {
                by_method.insert(method.as_str().to_owned(), 1);
            }
        }
        InFlight(self)
    }

    /// Counts one injected failure.
    pub(super) fn failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one connection reset.
    pub(super) fn reset(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the counters.
    pub(super) fn snapshot(&self) -> Stats {
        Stats {
            total: self.total.load(Ordering::Relaxed),
            by_method: self
                .by_method
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
        }
    }
}

/// Keeps one request counted as in flight; dropped when the request is answered
/// or abandoned (the client went away).
pub(super) struct InFlight<'a>(&'a Counters);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_follows_the_guards() {
        let counters = Counters::default();
        let first = counters.begin(&http::Method::GET);
        let second = counters.begin(&http::Method::POST);
        drop(counters.begin(&http::Method::GET));
        assert_eq!(counters.snapshot().in_flight, 2);
        drop(first);
        drop(second);
        let stats = counters.snapshot();
        assert_eq!(stats.in_flight, 0);
        assert_eq!(stats.total, 3);
        assert_eq!(stats.by_method.get("GET"), Some(&2));
        assert_eq!(stats.by_method.get("POST"), Some(&1));
    }
}
