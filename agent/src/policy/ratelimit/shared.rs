//! A Shared limit's side of the store: local leases of tokens, and the mode that
//! applies while the store is unavailable.
//!
//! Batching, not pipelining: a round trip takes the tokens the request needs plus a
//! lease of [`lease_size`] more, which later requests on this agent spend with one
//! compare-and-swap each. Leases are taken only while the store's bucket had at least a
//! lease to spare at the last round trip: near the limit every agent asks for what it
//! needs, so that the tokens go to the agents in proportion to their traffic. A refusal from the store is remembered until the bucket
//! would have the tokens, so refused requests cost no round trip either. Unspent
//! leased tokens lapse after [`LEASE_TTL`]: a quiet agent holds no more than one lease
//! of the shared budget, and never for long.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use super::keyed::{Keyed, OwnedKey, RateLimitKey};
use super::store::Store;

/// How long leased tokens may wait to be spent.
pub const LEASE_TTL: Duration = Duration::from_millis(500);

/// How long a FailClosed refusal asks clients to wait.
pub const FAIL_CLOSED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Tokens leased per round trip: the whole limit's rate over 20 ms, from 1 to a tenth of
/// the burst (a lease that large could starve the other agents of the burst).
pub fn lease_size(requests: u32, period: Duration, burst: u32) -> u32 {
    let per_20ms = f64::from(requests) * 0.02 / period.as_secs_f64().max(1e-9);
    let cap = (burst / 10).max(1);
    (per_20ms as u32).clamp(1, cap)
}

/// What a Shared limit does while the store is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// Every request passes the limit.
    FailOpen,
    /// Every request is refused.
    FailClosed,
    /// The pod's split share is enforced locally.
    FallbackToSplit,
}

impl StoreMode {
    /// The name used in the policy API and the metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            StoreMode::FailOpen => "FailOpen",
            StoreMode::FailClosed => "FailClosed",
            StoreMode::FallbackToSplit => "FallbackToSplit",
        }
    }
}

/// The whole limit kept in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedConfig {
    /// Tokens per `period`, across every agent.
    pub requests: u32,
    /// The refill period.
    pub period: Duration,
    /// The bucket size.
    pub burst: u32,
    /// What applies while the store is unavailable.
    pub mode: StoreMode,
    /// The limit's name in the store (`in/namespace/policy/limit`).
    pub bucket: String,
}

/// One key's lease.
#[derive(Debug, Default)]
pub struct Lease {
    /// Leased tokens left; negative: debt charged after the fact, paid at the next round
    /// trip.
    tokens: AtomicI64,
    /// When the unspent tokens lapse (nanoseconds on the limiter's clock).
    expires: AtomicU64,
    /// Until when the store said the bucket is empty.
    denied_until: AtomicU64,
    /// Tokens the store's bucket held at the last round trip (for headers).
    store_remaining: AtomicU64,
}

impl Lease {
    /// Spends `n` leased tokens at `now`: the tokens left, or `None` when the lease
    /// does not cover them.
    fn spend(&self, now: u64, n: u32) -> Option<u64> {
        let n = i64::from(n);
        let mut tokens = self.tokens.load(Ordering::Acquire);
        loop {
            let lapsed = tokens > 0 && now >= self.expires.load(Ordering::Acquire);
            let next = if lapsed {
                0
            } else if tokens >= n {
                tokens - n
            } else {
                return None;
            };
            match self.tokens.compare_exchange_weak(
                tokens,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) if !lapsed => return Some(u64::try_from(next).unwrap_or(0)),
                Ok(_) => tokens = 0,
                Err(current) => tokens = current,
            }
        }
    }

    /// Whether the lease still holds anything worth keeping at `now`.
    fn is_live(&self, now: u64) -> bool {
        let tokens = self.tokens.load(Ordering::Acquire);
        tokens < 0
            || (tokens > 0 && now < self.expires.load(Ordering::Acquire))
            || now < self.denied_until.load(Ordering::Acquire)
    }
}

/// What the store side decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Passed; the bucket's tokens left (as last seen).
    Passed(u64),
    /// Refused; the tokens are there after this long.
    Refused(Duration),
    /// The store is unavailable: the mode decides.
    Unavailable,
}

/// A Shared limit's leases and store.
#[derive(Debug)]
pub struct Shared {
    /// The whole limit.
    pub config: SharedConfig,
    interval: Duration,
    lease: u32,
    leases: Keyed<Lease>,
    store: Option<Arc<Store>>,
    /// Decisions made by the mode while the store was unavailable.
    pub fallbacks: AtomicU64,
}

impl Shared {
    /// The store side of `config`, keyed like `key`; without a store every decision is
    /// the mode's.
    pub fn new(config: SharedConfig, key: &RateLimitKey, store: Option<Arc<Store>>) -> Self {
        let interval = config.period / config.requests.max(1);
        Self {
            interval: interval.max(Duration::from_micros(1)),
            lease: lease_size(config.requests, config.period, config.burst),
            leases: Keyed::new(key),
            store,
            config,
            fallbacks: AtomicU64::new(0),
        }
    }

    /// Tokens leased per round trip.
    pub fn lease_size(&self) -> u32 {
        self.lease
    }

    /// Whether requests can use the store now.
    pub fn available(&self) -> bool {
        self.store.as_ref().is_some_and(|s| s.available())
    }

    /// Takes `n` tokens for `key` at `now`: from the lease when it covers them, else
    /// with one round trip.
    pub async fn take(&self, key: &OwnedKey, now: u64, n: u32) -> Decision {
        let Some(store) = self.store.as_ref().filter(|s| s.available()) else {
            return Decision::Unavailable;
        };
        let fast = self.leases.with(key, |lease| {
            if let Some(left) = lease.spend(now, n) {
                let hint = lease.store_remaining.load(Ordering::Relaxed);
                return Some(Decision::Passed(left + hint));
            }
            let denied_until = lease.denied_until.load(Ordering::Acquire);
            if now < denied_until {
                return Some(Decision::Refused(Duration::from_nanos(denied_until - now)));
            }
            None
        });
        if let Some(decided) = fast {
            return decided;
        }
        let (debt, plenty) = self.leases.with(key, |lease| {
            let debt = (-lease.tokens.load(Ordering::Acquire)).max(0);
            let left = lease.store_remaining.load(Ordering::Relaxed);
            (
                u32::try_from(debt).unwrap_or(u32::MAX),
                left >= u64::from(self.lease),
            )
        });
        let need = n.saturating_add(debt);
        // Lease only while the bucket has tokens to spare: near the limit a lease would
        // hand one agent what the others then wait for, and the pods that lose the race
        // would refuse most of their traffic while one pod passes most of its own.
        let want = if plenty {
            need.saturating_add(self.lease)
        } else {
            need
        };
        let grant = match store
            .take(
                &self.config.bucket,
                &key.to_bytes(),
                self.interval,
                self.config.burst,
                need,
                want,
            )
            .await
        {
            Ok(grant) => grant,
            Err(_) => return Decision::Unavailable,
        };
        self.leases.with(key, |lease| {
            lease
                .store_remaining
                .store(u64::from(grant.remaining), Ordering::Relaxed);
            if grant.granted >= need {
                // Pays the debt (the tokens were negative by it) and keeps the rest.
                lease
                    .tokens
                    .fetch_add(i64::from(grant.granted) - i64::from(n), Ordering::AcqRel);
                lease
                    .expires
                    .store(now + nanos(LEASE_TTL), Ordering::Release);
                let left = u64::from(grant.granted - need);
                Decision::Passed(left + u64::from(grant.remaining))
            } else {
                lease
                    .denied_until
                    .store(now + nanos(grant.wait), Ordering::Release);
                Decision::Refused(grant.wait)
            }
        })
    }

    /// Charges `n` more tokens to `key` after the fact: a debt paid at the next round
    /// trip.
    pub fn charge(&self, key: &OwnedKey, n: u32) {
        self.leases.with(key, |lease| {
            lease.tokens.fetch_sub(i64::from(n), Ordering::AcqRel);
        });
    }

    /// Drops leases with nothing left in them.
    pub fn evict_idle(&self, now: u64) {
        self.leases.retain(|lease| lease.is_live(now));
    }
}

/// A duration in nanoseconds, saturating.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_twenty_milliseconds_of_the_whole_rate() {
        let second = Duration::from_secs(1);
        assert_eq!(lease_size(200, second, 200), 4);
        assert_eq!(lease_size(100_000, second, 100_000), 2_000);
        assert_eq!(lease_size(10, second, 10), 1, "never below one");
        assert_eq!(
            lease_size(10_000, second, 50),
            5,
            "a tenth of the burst at most"
        );
        assert_eq!(lease_size(60, Duration::from_secs(60), 60), 1);
    }

    #[test]
    fn a_lease_is_spent_then_lapses() {
        let lease = Lease::default();
        assert_eq!(lease.spend(0, 1), None, "empty");
        lease.tokens.store(3, Ordering::Release);
        lease.expires.store(100, Ordering::Release);
        assert_eq!(lease.spend(10, 2), Some(1));
        assert_eq!(lease.spend(10, 2), None, "one left, two asked");
        assert_eq!(lease.spend(10, 1), Some(0));
        lease.tokens.store(5, Ordering::Release);
        assert_eq!(lease.spend(100, 1), None, "lapsed");
        assert_eq!(lease.tokens.load(Ordering::Acquire), 0);
        assert!(!lease.is_live(100));
        lease.tokens.store(-4, Ordering::Release);
        assert!(lease.is_live(1_000), "a debt is kept until paid");
    }

    #[tokio::test]
    async fn without_a_store_the_mode_decides() {
        let shared = Shared::new(
            SharedConfig {
                requests: 10,
                period: Duration::from_secs(1),
                burst: 10,
                mode: StoreMode::FailClosed,
                bucket: "in/test/p/l".into(),
            },
            &RateLimitKey::None,
            None,
        );
        assert!(!shared.available());
        assert_eq!(
            shared.take(&OwnedKey::None, 0, 1).await,
            Decision::Unavailable
        );
    }
}
