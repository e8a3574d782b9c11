//! Rate limits: token buckets (`requests` per `period`, up to `burst` at once), one
//! bucket per key (everyone, the client address, the caller's identity, or a request
//! header's value), enforced inbound by the target's pods or outbound by the callers.
//!
//! Where the buckets live is the limit's scope: Pod and Service limits are local to the
//! agent (a Service limit arrives already split over the service's ready pods by the
//! control plane), a Shared limit draws from one bucket per key in the rate-limit store
//! ([`store`], through local leases: [`shared`]) and falls back to its mode while the
//! store is unavailable. Local buckets are GCRA cells ([`bucket`]) on tokio's clock, so
//! that they follow the paused clock in tests like every other policy.

pub mod bucket;
pub mod cost;
pub mod headers;
pub mod keyed;
pub mod shared;
pub mod store;

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bulwark_proto::v1;
use bulwark_proto::v1::rate_limit_key::Kind;
use http::{HeaderMap, HeaderName, Method};

use crate::policy::authorization::PeerId;
use crate::policy::duration::{InvalidDuration, duration};
use bucket::{Bucket, Shape};
use cost::{Cost, InvalidCost};
use headers::Quota;
use keyed::{Keyed, OwnedKey};
pub use keyed::{Keys, RateLimitKey};
use shared::{Decision, FAIL_CLOSED_RETRY_AFTER, Shared, SharedConfig, StoreMode};
use store::Store;

/// A rate limit that cannot be enforced. Messages name the field within the limit; the caller
/// names the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRateLimit {
    /// A port outside 1..=65535.
    #[error("ports: {0} is not a port number (1..=65535)")]
    Port(u32),
    /// `requests` is zero.
    #[error("rate.requests is 0; it must be at least 1")]
    ZeroRequests,
    /// `period` is absent.
    #[error("rate.per is missing; the control plane must send an exact value")]
    MissingPeriod,
    /// `period` is not a valid duration.
    #[error("rate.per: {0}")]
    Period(InvalidDuration),
    /// `period` is zero.
    #[error("rate.per is 0; it must be positive, e.g. 1s")]
    ZeroPeriod,
    /// One token per `period / requests` is below a nanosecond.
    #[error(
        "rate {requests} per {period:?} is more than one request per nanosecond; use a longer period"
    )]
    RateTooHigh {
        /// The configured requests.
        requests: u32,
        /// The configured period.
        period: Duration,
    },
    /// `burst` is zero.
    #[error("burst is 0; it must be at least 1 (the control plane defaults it to rate.requests)")]
    ZeroBurst,
    /// The key's header name is not a valid HTTP header name.
    #[error("key.header {0:?} is not a valid HTTP header name")]
    Header(String),
    /// The cost cannot be enforced.
    #[error("{0}")]
    Cost(#[from] InvalidCost),
    /// A Shared limit's whole rate or burst is zero, or its period invalid.
    #[error("shared: {0}")]
    Shared(&'static str),
}

/// A validated rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// `namespace/name` of the RateLimitPolicy (the metrics' `policy` label).
    pub source: String,
    /// The limit's name within the policy (the metrics' `limit` label).
    pub name: String,
    /// Local ports the limit applies to; empty means every port (always, outbound).
    pub ports: Vec<u16>,
    /// What the buckets are keyed by.
    pub key: RateLimitKey,
    /// Tokens added per `period`.
    pub requests: NonZeroU32,
    /// The refill period.
    pub period: Duration,
    /// Bucket size: requests allowed at once after a quiet period.
    pub burst: NonZeroU32,
    /// Where the buckets live.
    pub scope: Scope,
    /// For Service scope: the pods the limit was split over (0: not split).
    pub split: u32,
    /// For Shared scope: the whole limit in the store (`requests`, `period` and `burst`
    /// above are then the split share the mode falls back to).
    pub shared: Option<SharedConfig>,
    /// Tokens a request takes.
    pub cost: Cost,
    /// Whether responses carry `RateLimit-Policy` and `RateLimit` headers.
    pub response_headers: bool,
}

/// Where a limit's buckets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This pod enforces the whole limit.
    Pod,
    /// This pod enforces its share of a limit split over the service's pods.
    Service,
    /// One bucket per key in the store, shared by every agent.
    Shared,
}

impl Scope {
    /// The name used in the policy API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Pod => "Pod",
            Scope::Service => "Service",
            Scope::Shared => "Shared",
        }
    }
}

impl RateLimitConfig {
    /// The time one token takes to refill (`period / requests`).
    pub fn refill_interval(&self) -> Duration {
        self.period / self.requests.get()
    }
}

impl TryFrom<&v1::RateLimit> for RateLimitConfig {
    type Error = InvalidRateLimit;

    fn try_from(proto: &v1::RateLimit) -> Result<Self, Self::Error> {
        let ports = proto
            .ports
            .iter()
            .map(|&port| {
                u16::try_from(port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or(InvalidRateLimit::Port(port))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = match proto.key.as_ref().and_then(|k| k.kind.as_ref()) {
            None | Some(Kind::None(_)) => RateLimitKey::None,
            Some(Kind::ClientAddress(_)) => RateLimitKey::ClientAddress,
            Some(Kind::ClientIdentity(_)) => RateLimitKey::ClientIdentity,
            Some(Kind::Header(name)) => RateLimitKey::Header(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| InvalidRateLimit::Header(name.clone()))?,
            ),
        };
        let requests = NonZeroU32::new(proto.requests).ok_or(InvalidRateLimit::ZeroRequests)?;
        let period = proto
            .period
            .as_ref()
            .ok_or(InvalidRateLimit::MissingPeriod)?;
        let period = duration(period).map_err(InvalidRateLimit::Period)?;
        if period.is_zero() {
            return Err(InvalidRateLimit::ZeroPeriod);
        }
        if (period / requests.get()).is_zero() {
            return Err(InvalidRateLimit::RateTooHigh {
                requests: requests.get(),
                period,
            });
        }
        let burst = NonZeroU32::new(proto.burst).ok_or(InvalidRateLimit::ZeroBurst)?;
        let shared = match &proto.shared {
            None => None,
            Some(shared) => Some(shared_config(shared)?),
        };
        let scope = match (v1::RateLimitScope::try_from(proto.scope), shared.is_some()) {
            (_, true) => Scope::Shared,
            (Ok(v1::RateLimitScope::Service), false) => Scope::Service,
            _ => Scope::Pod,
        };
        Ok(Self {
            source: proto.source.clone(),
            name: proto.name.clone(),
            ports,
            key,
            requests,
            period,
            burst,
            scope,
            split: proto.split,
            shared,
            cost: Cost::try_from(proto.cost.as_ref())?,
            response_headers: proto.response_headers,
        })
    }
}

/// The whole limit of a Shared one.
fn shared_config(proto: &v1::SharedLimit) -> Result<SharedConfig, InvalidRateLimit> {
    if proto.requests == 0 {
        return Err(InvalidRateLimit::Shared("requests is 0"));
    }
    if proto.burst == 0 {
        return Err(InvalidRateLimit::Shared("burst is 0"));
    }
    let period = proto
        .period
        .as_ref()
        .ok_or(InvalidRateLimit::Shared("period is missing"))?;
    let period = duration(period).map_err(InvalidRateLimit::Period)?;
    if (period / proto.requests).is_zero() {
        return Err(InvalidRateLimit::Shared(
            "more than one request per nanosecond",
        ));
    }
    if proto.bucket.is_empty() {
        return Err(InvalidRateLimit::Shared("bucket is empty"));
    }
    let mode = match v1::StoreUnavailable::try_from(proto.on_store_unavailable) {
        Ok(v1::StoreUnavailable::FailOpen) => StoreMode::FailOpen,
        Ok(v1::StoreUnavailable::FailClosed) => StoreMode::FailClosed,
        Ok(v1::StoreUnavailable::FallbackToSplit | v1::StoreUnavailable::Unspecified) => {
            StoreMode::FallbackToSplit
        }
        Err(_) => return Err(InvalidRateLimit::Shared("onStoreUnavailable is unknown")),
    };
    Ok(SharedConfig {
        requests: proto.requests,
        period,
        burst: proto.burst,
        mode,
        bucket: proto.bucket.clone(),
    })
}

/// A request was refused by the limit named here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// Time until the bucket has a token again (for `Retry-After`).
    pub retry_after: Duration,
    /// `namespace/name` of the policy that refused.
    pub source: Arc<str>,
    /// The limit that refused.
    pub name: Arc<str>,
    /// The refusing limit's `RateLimit` headers, when its policy asks for them.
    pub quota: Option<Quota>,
}

// Written out because thiserror would take the `source` field for the error's cause.
impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limit {:?} of {:?} exceeded; a token is available in {:?}",
            self.name, self.source, self.retry_after
        )
    }
}

impl std::error::Error for RateLimited {}

/// What one limit took for a request that passed: kept until the response, for charges
/// after the fact and the response headers.
#[derive(Debug)]
struct Taken {
    limiter: Arc<RateLimiter>,
    key: OwnedKey,
    /// Whether the tokens came from the store (else a local bucket, or nowhere: FailOpen).
    from_store: bool,
    remaining: u64,
}

/// A request that passed every limit. Empty (no allocation) unless a limit charges
/// after the fact or reports headers.
#[derive(Debug, Default)]
#[must_use = "finish it with the response, for after-the-fact costs and headers"]
pub struct Admitted {
    taken: Vec<Taken>,
}

impl Admitted {
    /// Charges the costs the response's headers carry and adds the rate-limit headers
    /// the policies ask for.
    pub fn finish(self, response: &mut HeaderMap) {
        let mut quotas = Vec::new();
        for taken in &self.taken {
            let limiter = &taken.limiter;
            let after = limiter.config.cost.after(response);
            if after > 0 {
                limiter.charge(&taken.key, taken.from_store, after);
            }
            if limiter.config.response_headers {
                quotas.push(limiter.quota(taken.remaining, &taken.key, taken.from_store));
            }
        }
        headers::append(response, &quotas);
    }
}

/// One rate limit and its buckets, shared as `Arc`.
pub struct RateLimiter {
    config: RateLimitConfig,
    source: Arc<str>,
    name: Arc<str>,
    origin: tokio::time::Instant,
    shape: Shape,
    buckets: Keyed<Bucket>,
    shared: Option<Shared>,
}

impl RateLimiter {
    /// A local limiter with every bucket full (a Shared limit without a store applies its
    /// mode to every request).
    pub fn new(config: RateLimitConfig) -> Self {
        Self::with_store(config, None)
    }

    /// A limiter whose Shared limit (if it is one) draws from `store`.
    pub fn with_store(config: RateLimitConfig, store: Option<Arc<Store>>) -> Self {
        let shape = Shape::new(config.requests.get(), config.period, config.burst.get());
        let shared = config
            .shared
            .clone()
            .map(|shared| Shared::new(shared, &config.key, store));
        Self {
            source: config.source.as_str().into(),
            name: config.name.as_str().into(),
            buckets: Keyed::new(&config.key),
            origin: tokio::time::Instant::now(),
            shape,
            shared,
            config,
        }
    }

    /// Nanoseconds on the limiter's clock.
    fn now(&self) -> u64 {
        shared::nanos(self.origin.elapsed())
    }

    /// Whether the limit applies to requests on this local port (no ports = all).
    pub fn applies_to(&self, port: u16) -> bool {
        self.config.ports.is_empty() || self.config.ports.contains(&port)
    }

    /// Takes one token from the bucket of a plaintext caller's request, or says how long
    /// until one is available (local buckets: a Shared limit's split share).
    pub fn check(&self, client: IpAddr, headers: &HeaderMap) -> Result<(), RateLimited> {
        self.check_from(client, None, headers)
    }

    /// Takes one token from the local bucket of a request from `caller`, or says how
    /// long until one is available.
    pub fn check_from(
        &self,
        client: IpAddr,
        caller: Option<&Arc<PeerId>>,
        headers: &HeaderMap,
    ) -> Result<(), RateLimited> {
        let keys = Keys {
            client,
            caller,
            headers,
        };
        let key = self.buckets.key(&keys);
        self.take_local(&key, 1).map(drop)
    }

    /// Takes `n` tokens from the local bucket of `key`.
    fn take_local(&self, key: &OwnedKey, n: u32) -> Result<u64, RateLimited> {
        let now = self.now();
        self.buckets
            .with(key, |bucket| bucket.take(&self.shape, now, n))
            .map(|level| level.remaining)
            .map_err(|wait| self.refused(wait))
    }

    /// Takes `n` tokens for `key`: from the store for a Shared limit while it is
    /// available (else the mode decides), from the local bucket otherwise. Returns the
    /// tokens left and whether they came from the store.
    async fn take(&self, key: &OwnedKey, n: u32) -> Result<(u64, bool), RateLimited> {
        let Some(shared) = &self.shared else {
            return self.take_local(key, n).map(|left| (left, false));
        };
        match shared.take(key, self.now(), n).await {
            Decision::Passed(left) => Ok((left, true)),
            Decision::Refused(wait) => Err(self.refused(wait)),
            Decision::Unavailable => {
                shared.fallbacks.fetch_add(1, Ordering::Relaxed);
                match shared.config.mode {
                    StoreMode::FailOpen => Ok((u64::from(self.config.burst.get()), false)),
                    StoreMode::FailClosed => Err(self.refused(FAIL_CLOSED_RETRY_AFTER)),
                    StoreMode::FallbackToSplit => self.take_local(key, n).map(|l| (l, false)),
                }
            }
        }
    }

    /// Charges `n` more tokens to `key` after the fact, where the request's tokens came
    /// from.
    fn charge(&self, key: &OwnedKey, from_store: bool, n: u32) {
        match &self.shared {
            Some(shared) if from_store => shared.charge(key, n),
            _ => {
                let now = self.now();
                self.buckets
                    .with(key, |bucket| bucket.charge(&self.shape, now, n));
            }
        }
    }

    /// The limit as the response headers report it.
    fn quota(&self, remaining: u64, key: &OwnedKey, from_store: bool) -> Quota {
        let (requests, window) = match (&self.shared, from_store) {
            (Some(shared), true) => (shared.config.requests, shared.config.period),
            _ => (self.config.requests.get(), self.config.period),
        };
        let reset = if from_store {
            Duration::ZERO
        } else {
            let now = self.now();
            self.buckets
                .with(key, |bucket| bucket.level(&self.shape, now))
                .until_full
        };
        Quota {
            name: Arc::clone(&self.name),
            requests,
            window,
            remaining,
            reset,
        }
    }

    fn refused(&self, retry_after: Duration) -> RateLimited {
        tracing::debug!(
            policy = %self.source,
            limit = %self.name,
            ?retry_after,
            reason = "rate-limited",
            "request refused by rate limit"
        );
        let quota = self.config.response_headers.then(|| {
            let (requests, window) = match &self.shared {
                Some(shared) => (shared.config.requests, shared.config.period),
                None => (self.config.requests.get(), self.config.period),
            };
            Quota {
                name: Arc::clone(&self.name),
                requests,
                window,
                remaining: 0,
                reset: retry_after,
            }
        });
        RateLimited {
            retry_after,
            source: Arc::clone(&self.source),
            name: Arc::clone(&self.name),
            quota,
        }
    }

    /// Drops the buckets of keys not seen recently (full again, so indistinguishable from
    /// new) and the leases with nothing in them.
    pub fn evict_idle(&self) {
        let before = self.tracked_keys();
        let now = self.now();
        self.buckets.retain(|bucket| !bucket.is_full(now));
        if let Some(shared) = &self.shared {
            shared.evict_idle(now);
        }
        if matches!(self.buckets, Keyed::Single(_)) {
            return;
        }
        tracing::debug!(
            policy = %self.source,
            limit = %self.name,
            evicted = before.saturating_sub(self.tracked_keys()),
            kept = self.tracked_keys(),
            "evicted idle rate-limit buckets"
        );
    }

    /// Keys with a bucket of their own (1 for an unkeyed limit).
    pub fn tracked_keys(&self) -> usize {
        self.buckets.len()
    }

    /// The config in force.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// A Shared limit's state: the mode, whether the store is available, the decisions
    /// the mode made, and the lease size.
    pub fn shared_state(&self) -> Option<SharedState> {
        self.shared.as_ref().map(|shared| SharedState {
            mode: shared.config.mode,
            available: shared.available(),
            fallbacks: shared.fallbacks.load(Ordering::Relaxed),
            lease: shared.lease_size(),
        })
    }
}

/// A Shared limit's state, for metrics and `/config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedState {
    /// What applies while the store is unavailable.
    pub mode: StoreMode,
    /// Whether the store is available now.
    pub available: bool,
    /// Requests the mode decided while the store was unavailable.
    pub fallbacks: u64,
    /// Tokens leased per round trip.
    pub lease: u32,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("tracked_keys", &self.tracked_keys())
            .finish()
    }
}

/// What a request is, as the limits see it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The local port (inbound; outbound limits apply to every port).
    pub port: u16,
    /// The request's method.
    pub method: &'a Method,
    /// The request's path.
    pub path: &'a str,
    /// Where the keys come from.
    pub keys: Keys<'a>,
}

/// All limits for one inbound port or outbound destination: a request must pass every
/// one.
///
/// A bucket cannot be tested without taking its tokens, so a request refused by one limit
/// has already spent tokens in the limits checked before it. Keyed limits (client
/// address, header) are therefore checked before unkeyed ones: a client over its own
/// limit is refused without draining the bucket everyone shares, so a noisy tenant
/// cannot starve the others. What remains is a token spent in a client's own bucket when
/// the shared limit refuses it, which only makes that client's limit stricter while the
/// whole pod is over its limit.
#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    limiters: Arc<[Arc<RateLimiter>]>,
    /// Whether any limit needs the request after admission (after-the-fact cost or
    /// headers): otherwise admission keeps nothing.
    keeps: bool,
}

impl RateLimits {
    /// The limits, keyed ones first (otherwise in the given order).
    pub fn new<L: Into<Arc<RateLimiter>>>(limiters: impl IntoIterator<Item = L>) -> Self {
        let mut limiters: Vec<Arc<RateLimiter>> = limiters.into_iter().map(Into::into).collect();
        limiters.sort_by_key(|limiter| limiter.config.key == RateLimitKey::None);
        let keeps = limiters
            .iter()
            .any(|l| l.config.response_headers || l.config.cost.response_header.is_some());
        Self {
            limiters: limiters.into(),
            keeps,
        }
    }

    /// Checks a plaintext caller's one-token request on local `port` from `client`
    /// against the local buckets of every limit that applies.
    pub fn check(&self, port: u16, client: IpAddr, headers: &HeaderMap) -> Result<(), RateLimited> {
        self.check_from(port, client, None, headers)
    }

    /// Checks a one-token request on local `port` from `client`, whose mesh identity is
    /// `caller`, against the local buckets of every limit that applies.
    pub fn check_from(
        &self,
        port: u16,
        client: IpAddr,
        caller: Option<&Arc<PeerId>>,
        headers: &HeaderMap,
    ) -> Result<(), RateLimited> {
        for limiter in self.limiters.iter() {
            if limiter.applies_to(port) {
                limiter.check_from(client, caller, headers)?;
            }
        }
        Ok(())
    }

    /// Takes what `request` costs from every limit that applies, in order; the first
    /// that refuses decides. Shared limits may wait for the store (at most its timeout).
    pub async fn acquire(&self, request: &Request<'_>) -> Result<Admitted, RateLimited> {
        let mut admitted = Admitted::default();
        for limiter in self.limiters.iter() {
            if !limiter.applies_to(request.port) {
                continue;
            }
            let n = limiter.config.cost.of(request.method, request.path);
            let key = limiter.buckets.key(&request.keys);
            let (remaining, from_store) = limiter.take(&key, n).await?;
            if self.keeps {
                admitted.taken.push(Taken {
                    limiter: Arc::clone(limiter),
                    key,
                    from_store,
                    remaining,
                });
            }
        }
        Ok(admitted)
    }

    /// Whether there are no limits at all.
    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }

    /// The limits, in the order they are checked.
    pub fn limiters(&self) -> &[Arc<RateLimiter>] {
        &self.limiters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::net::Ipv4Addr;
    use tokio::time::advance;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn limit(name: &str, key: RateLimitKey, requests: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            source: "demo/frontend".into(),
            name: name.into(),
            ports: Vec::new(),
            key,
            requests: nz(requests),
            period: Duration::from_secs(1),
            burst: nz(burst),
            scope: Scope::Pod,
            split: 0,
            shared: None,
            cost: Cost::default(),
            response_headers: false,
        }
    }

    fn tenant(id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant-id", HeaderValue::from_str(id).unwrap());
        headers
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn tenant_key() -> RateLimitKey {
        RateLimitKey::Header(HeaderName::from_static("x-tenant-id"))
    }

    /// Requests that pass, out of `n` sent back to back.
    fn passes(limiter: &RateLimiter, n: u32, client: IpAddr, headers: &HeaderMap) -> u32 {
        (0..n)
            .filter(|_| limiter.check(client, headers).is_ok())
            .count() as u32
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_one_token_per_interval() {
        let limiter = RateLimiter::new(limit("total", RateLimitKey::None, 10, 5));
        let none = HeaderMap::new();
        for i in 0..5 {
            assert!(
                limiter.check(ip(1), &none).is_ok(),
                "request {i} of the burst"
            );
        }
        let refused = limiter.check(ip(1), &none).unwrap_err();
        assert_eq!(refused.retry_after, ms(100));
        assert_eq!(&*refused.source, "demo/frontend");
        assert_eq!(&*refused.name, "total");

        advance(ms(40)).await;
        assert_eq!(limiter.check(ip(1), &none).unwrap_err().retry_after, ms(60));
        advance(ms(60)).await;
        assert!(limiter.check(ip(1), &none).is_ok(), "one token after 100ms");
        assert!(limiter.check(ip(1), &none).is_err(), "and only one");

        // A quiet period refills the bucket up to the burst, not beyond.
        advance(Duration::from_secs(10)).await;
        assert_eq!(passes(&limiter, 20, ip(1), &none), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_traffic_gets_the_rate_plus_the_burst() {
        let limiter = RateLimiter::new(limit("total", RateLimitKey::None, 20, 10));
        let none = HeaderMap::new();
        // 100 requests per second from t=0 to t=5s inclusive: the burst of 10, then 20 per
        // second (the bucket never overflows, as it drains faster than it refills).
        let mut passed = 0;
        for _ in 0..=500 {
            passed += passes(&limiter, 1, ip(1), &none);
            advance(ms(10)).await;
        }
        assert_eq!(passed, 10 + 5 * 20);
    }

    #[tokio::test(start_paused = true)]
    async fn header_values_have_separate_buckets() {
        let limiter = RateLimiter::new(limit("per-tenant", tenant_key(), 10, 2));
        assert_eq!(passes(&limiter, 5, ip(1), &tenant("acme")), 2);
        // Another tenant, even from the same address, has its own full bucket.
        assert_eq!(passes(&limiter, 5, ip(1), &tenant("globex")), 2);
        assert_eq!(limiter.tracked_keys(), 2);
        // Requests without the header share one bucket, whoever sends them.
        let none = HeaderMap::new();
        assert_eq!(passes(&limiter, 1, ip(1), &none), 1);
        assert_eq!(passes(&limiter, 1, ip(2), &none), 1);
        assert_eq!(passes(&limiter, 1, ip(3), &none), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn caller_identities_have_separate_buckets_and_plaintext_callers_share_one() {
        let limiter = RateLimiter::new(limit("per-caller", RateLimitKey::ClientIdentity, 10, 2));
        let none = HeaderMap::new();
        let id =
            |sa: &str| Arc::new(PeerId::parse(&format!("spiffe://td/ns/shop/sa/{sa}")).unwrap());
        let (orders, billing) = (id("orders"), id("billing"));
        let from = |caller: Option<&Arc<PeerId>>, addr: u8| {
            (0..5)
                .filter(|_| limiter.check_from(ip(addr), caller, &none).is_ok())
                .count()
        };
        // One workload's pods (any address) share its bucket.
        assert_eq!(from(Some(&orders), 1), 2);
        assert_eq!(from(Some(&orders), 2), 0);
        assert_eq!(from(Some(&billing), 1), 2);
        // Plaintext callers, whatever their address, share one bucket.
        assert_eq!(from(None, 3), 2);
        assert_eq!(from(None, 4), 0);
        assert_eq!(limiter.tracked_keys(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn client_addresses_have_separate_buckets() {
        let limiter = RateLimiter::new(limit("per-client", RateLimitKey::ClientAddress, 10, 3));
        let none = HeaderMap::new();
        assert_eq!(passes(&limiter, 5, ip(1), &none), 3);
        assert_eq!(passes(&limiter, 5, ip(2), &none), 3);
        // The same host over IPv4-mapped IPv6 shares its IPv4 bucket.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(passes(&limiter, 1, mapped, &none), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_buckets_are_evicted() {
        let limiter = RateLimiter::new(limit("per-tenant", tenant_key(), 10, 5));
        for id in ["a", "b", "c"] {
            assert!(limiter.check(ip(1), &tenant(id)).is_ok());
        }
        assert_eq!(limiter.tracked_keys(), 3);
        // Not yet refilled: evicting would hand them a fresh burst, so they stay.
        limiter.evict_idle();
        assert_eq!(limiter.tracked_keys(), 3);
        advance(Duration::from_secs(1)).await;
        assert!(limiter.check(ip(1), &tenant("c")).is_ok());
        limiter.evict_idle();
        assert_eq!(
            limiter.tracked_keys(),
            1,
            "only the recently seen tenant remains"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limits_apply_to_their_ports_only() {
        let limiter = RateLimiter::new(RateLimitConfig {
            ports: vec![8080],
            ..limit("total", RateLimitKey::None, 10, 1)
        });
        assert!(limiter.applies_to(8080));
        assert!(!limiter.applies_to(9090));
        let limits = RateLimits::new(vec![limiter]);
        let none = HeaderMap::new();
        assert!(limits.check(8080, ip(1), &none).is_ok());
        assert!(limits.check(8080, ip(1), &none).is_err());
        for _ in 0..10 {
            assert!(limits.check(9090, ip(1), &none).is_ok());
        }
        let everywhere = RateLimiter::new(limit("total", RateLimitKey::None, 10, 1));
        assert!(everywhere.applies_to(1) && everywhere.applies_to(65535));
    }

    #[tokio::test(start_paused = true)]
    async fn every_limit_must_pass() {
        // The example policy: 20/s burst 10 per tenant, 200/s burst 100 in total, here scaled
        // down so that the total is the tighter one for two tenants.
        let limits = RateLimits::new(vec![
            RateLimiter::new(limit("total", RateLimitKey::None, 10, 6)),
            RateLimiter::new(limit("per-tenant", tenant_key(), 10, 4)),
        ]);
        assert_eq!(
            limits.limiters()[0].config().name,
            "per-tenant",
            "keyed first"
        );
        let check = |id| limits.check(80, ip(1), &tenant(id));
        for _ in 0..4 {
            assert!(check("acme").is_ok());
        }
        assert_eq!(check("acme").unwrap_err().name.as_ref(), "per-tenant");
        // acme's refused requests did not drain the shared bucket: globex gets the other 2.
        for _ in 0..50 {
            assert!(check("acme").is_err());
        }
        assert!(check("globex").is_ok());
        assert!(check("globex").is_ok());
        let refused = check("globex").unwrap_err();
        assert_eq!(refused.name.as_ref(), "total");
        assert_eq!(refused.retry_after, ms(100));
        assert!(!limits.is_empty());
        assert!(RateLimits::default().is_empty());
        assert!(
            RateLimits::default()
                .check(80, ip(1), &HeaderMap::new())
                .is_ok()
        );
    }

    fn request<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> Request<'a> {
        Request {
            port: 80,
            method,
            path,
            keys: Keys {
                client: ip(1),
                caller: None,
                headers,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_take_what_they_cost() {
        let limits = RateLimits::new(vec![RateLimiter::new(RateLimitConfig {
            cost: Cost {
                default: 1,
                rules: vec![cost::CostRule {
                    method: Some(Method::POST),
                    path_prefix: "/search".into(),
                    cost: 4,
                }],
                response_header: None,
            },
            ..limit("total", RateLimitKey::None, 10, 10)
        })]);
        let none = HeaderMap::new();
        for _ in 0..2 {
            assert!(
                limits
                    .acquire(&request(&Method::POST, "/search", &none))
                    .await
                    .is_ok()
            );
        }
        // 8 of 10 tokens spent: two plain requests fit, a third search does not.
        let refused = limits
            .acquire(&request(&Method::POST, "/search", &none))
            .await
            .unwrap_err();
        assert_eq!(refused.retry_after, ms(200), "two more tokens, 100ms each");
        assert!(
            limits
                .acquire(&request(&Method::GET, "/", &none))
                .await
                .is_ok()
        );
        assert!(
            limits
                .acquire(&request(&Method::GET, "/", &none))
                .await
                .is_ok()
        );
        assert!(
            limits
                .acquire(&request(&Method::GET, "/", &none))
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_header_charges_after_the_fact_and_headers_report_the_bucket() {
        let limits = RateLimits::new(vec![RateLimiter::new(RateLimitConfig {
            cost: Cost {
                response_header: Some(HeaderName::from_static("x-cost")),
                ..Cost::default()
            },
            response_headers: true,
            ..limit("tokens", RateLimitKey::None, 10, 10)
        })]);
        let none = HeaderMap::new();
        let admitted = limits
            .acquire(&request(&Method::GET, "/", &none))
            .await
            .unwrap();
        let mut response = HeaderMap::new();
        response.insert("x-cost", HeaderValue::from_static("6"));
        admitted.finish(&mut response);
        assert_eq!(response["ratelimit-policy"], "\"tokens\";q=10;w=1");
        assert_eq!(
            response["ratelimit"], "\"tokens\";r=9;t=1",
            "the state when the request passed"
        );
        // 1 + 6 tokens spent: 3 left.
        let mut passed = 0;
        for _ in 0..10 {
            if let Ok(admitted) = limits.acquire(&request(&Method::GET, "/", &none)).await {
                admitted.finish(&mut HeaderMap::new());
                passed += 1;
            }
        }
        assert_eq!(passed, 3);
        let refused = limits
            .acquire(&request(&Method::GET, "/", &none))
            .await
            .unwrap_err();
        let quota = refused.quota.expect("asked for headers");
        assert_eq!((quota.remaining, quota.requests), (0, 10));
    }

    fn shared_limit(mode: StoreMode) -> RateLimitConfig {
        RateLimitConfig {
            scope: Scope::Shared,
            shared: Some(SharedConfig {
                requests: 40,
                period: Duration::from_secs(1),
                burst: 40,
                mode,
                bucket: "in/demo/frontend/total".into(),
            }),
            // The split share over 4 pods.
            ..limit("total", RateLimitKey::None, 10, 10)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_store_a_shared_limit_applies_its_mode() {
        let none = HeaderMap::new();
        async fn passes(limits: RateLimits) -> u32 {
            let (none, get) = (HeaderMap::new(), Method::GET);
            let mut passed = 0;
            for _ in 0..100 {
                passed += u32::from(limits.acquire(&request(&get, "/", &none)).await.is_ok());
            }
            passed
        }
        let open = RateLimiter::new(shared_limit(StoreMode::FailOpen));
        let open = RateLimits::new(vec![open]);
        assert_eq!(passes(open.clone()).await, 100, "FailOpen: no limit");
        let state = open.limiters()[0].shared_state().unwrap();
        assert_eq!((state.available, state.fallbacks), (false, 100));
        let closed = RateLimits::new(vec![RateLimiter::new(shared_limit(StoreMode::FailClosed))]);
        assert_eq!(passes(closed.clone()).await, 0, "FailClosed: nothing");
        let refused = closed
            .acquire(&request(&Method::GET, "/", &none))
            .await
            .unwrap_err();
        assert_eq!(refused.retry_after, FAIL_CLOSED_RETRY_AFTER);
        let split = RateLimits::new(vec![RateLimiter::new(shared_limit(
            StoreMode::FallbackToSplit,
        ))]);
        assert_eq!(
            passes(split).await,
            10,
            "FallbackToSplit: the share's burst"
        );
    }

    fn proto() -> v1::RateLimit {
        v1::RateLimit {
            source: "demo/frontend".into(),
            name: "per-tenant".into(),
            ports: vec![8080],
            key: Some(v1::RateLimitKey {
                kind: Some(Kind::Header("X-Tenant-Id".into())),
            }),
            requests: 20,
            period: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            burst: 10,
            ..Default::default()
        }
    }

    #[test]
    fn validates_proto_rate_limit() {
        let config = RateLimitConfig::try_from(&proto()).unwrap();
        assert_eq!(
            config,
            RateLimitConfig {
                ports: vec![8080],
                ..limit("per-tenant", tenant_key(), 20, 10)
            }
        );
        assert_eq!(config.refill_interval(), ms(50));

        let check = |edit: fn(&mut v1::RateLimit), want: InvalidRateLimit| {
            let mut bad = proto();
            edit(&mut bad);
            assert_eq!(RateLimitConfig::try_from(&bad), Err(want));
        };
        check(|p| p.ports = vec![70_000], InvalidRateLimit::Port(70_000));
        check(|p| p.ports = vec![0], InvalidRateLimit::Port(0));
        check(|p| p.requests = 0, InvalidRateLimit::ZeroRequests);
        check(|p| p.burst = 0, InvalidRateLimit::ZeroBurst);
        check(|p| p.period = None, InvalidRateLimit::MissingPeriod);
        check(
            |p| p.period = Some(prost_types::Duration::default()),
            InvalidRateLimit::ZeroPeriod,
        );
        check(
            |p| {
                p.period = Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 10,
                })
            },
            InvalidRateLimit::RateTooHigh {
                requests: 20,
                period: Duration::from_nanos(10),
            },
        );
        check(
            |p| {
                p.key = Some(v1::RateLimitKey {
                    kind: Some(Kind::Header("bad header".into())),
                })
            },
            InvalidRateLimit::Header("bad header".into()),
        );

        let mut unkeyed = proto();
        unkeyed.key = None;
        assert_eq!(
            RateLimitConfig::try_from(&unkeyed).unwrap().key,
            RateLimitKey::None
        );
        unkeyed.key = Some(v1::RateLimitKey {
            kind: Some(Kind::ClientAddress(v1::Empty {})),
        });
        assert_eq!(
            RateLimitConfig::try_from(&unkeyed).unwrap().key,
            RateLimitKey::ClientAddress
        );
    }

    #[test]
    fn rate_limiter_is_shareable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<RateLimiter>();
        assert_send_sync::<RateLimits>();
    }
}
