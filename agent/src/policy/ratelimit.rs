//! Inbound rate limits: token buckets (`requests` per `period`, up to `burst` at once), one
//! bucket per key (everyone, the client address, or a request header's value).
//!
//! Buckets are governor's GCRA limiters driven by tokio's clock, so that they follow the paused
//! clock in tests like every other policy.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bulwark_proto::v1;
use bulwark_proto::v1::rate_limit_key::Kind;
use governor::Quota;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::policy::authorization::PeerId;
use crate::policy::duration::{InvalidDuration, duration};

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
}

/// What a limit's buckets are keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateLimitKey {
    /// One bucket for everyone.
    None,
    /// One bucket per client IP address.
    ClientAddress,
    /// One bucket per caller's mesh identity (SPIFFE ID, proven by mutual TLS);
    /// plaintext callers share one bucket.
    ClientIdentity,
    /// One bucket per value of this header; requests without it share one bucket.
    Header(HeaderName),
}

/// A validated inbound rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// `namespace/name` of the RateLimitPolicy (the metrics' `policy` label).
    pub source: String,
    /// The limit's name within the policy (the metrics' `limit` label).
    pub name: String,
    /// Local ports the limit applies to; empty means every port.
    pub ports: Vec<u16>,
    /// What the buckets are keyed by.
    pub key: RateLimitKey,
    /// Tokens added per `period`.
    pub requests: NonZeroU32,
    /// The refill period.
    pub period: Duration,
    /// Bucket size: requests allowed at once after a quiet period.
    pub burst: NonZeroU32,
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
        Ok(Self {
            source: proto.source.clone(),
            name: proto.name.clone(),
            ports,
            key,
            requests,
            period,
            burst,
        })
    }
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

/// Governor's view of tokio's clock: time since the limiter was made.
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    origin: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

type Direct = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;
type Keyed<K> =
    governor::RateLimiter<K, DashMapStateStore<K>, TokioClock, NoOpMiddleware<Duration>>;

/// A header value as a bucket key; `None` is the shared bucket of requests without the header.
#[derive(Debug, PartialEq, Eq, Hash)]
struct HeaderKey(Option<HeaderValue>);

impl Clone for HeaderKey {
    /// Governor clones a key only to store it for a new bucket. Copy the bytes then: a value
    /// parsed by hyper shares the connection's read buffer, which a stored key would otherwise
    /// keep alive for as long as the bucket lives. Lookups borrow, so requests never copy.
    fn clone(&self) -> Self {
        Self(self.0.as_ref().map(|value| {
            let mut copy =
                HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            copy
        }))
    }
}

enum Buckets {
    Single(Direct),
    ByAddress(Keyed<IpAddr>),
    ByIdentity(Keyed<IdentityKey>),
    ByHeader(HeaderName, Keyed<HeaderKey>),
}

/// A caller's identity as a bucket key (`None`: every plaintext caller).
#[derive(Clone, PartialEq, Eq, Hash)]
struct IdentityKey(Option<Arc<PeerId>>);

/// One inbound rate limit and its buckets, shared as `Arc`.
pub struct RateLimiter {
    config: RateLimitConfig,
    source: Arc<str>,
    name: Arc<str>,
    clock: TokioClock,
    buckets: Buckets,
}

impl RateLimiter {
    /// A limiter with every bucket full.
    pub fn new(config: RateLimitConfig) -> Self {
        // A validated config refills at least every nanosecond; clamp a hand-built one.
        let interval = config.refill_interval().max(Duration::from_nanos(1));
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(config.requests))
            .allow_burst(config.burst);
        let clock = TokioClock {
            origin: tokio::time::Instant::now(),
        };
        let buckets = match &config.key {
            RateLimitKey::None => {
                Buckets::Single(governor::RateLimiter::direct_with_clock(quota, clock))
            }
            RateLimitKey::ClientAddress => {
                Buckets::ByAddress(governor::RateLimiter::dashmap_with_clock(quota, clock))
            }
            RateLimitKey::ClientIdentity => {
                Buckets::ByIdentity(governor::RateLimiter::dashmap_with_clock(quota, clock))
            }
            RateLimitKey::Header(name) => Buckets::ByHeader(
                name.clone(),
                governor::RateLimiter::dashmap_with_clock(quota, clock),
            ),
        };
        Self {
            source: config.source.as_str().into(),
            name: config.name.as_str().into(),
            config,
            clock,
            buckets,
        }
    }

    /// Whether the limit applies to requests on this local port (no ports = all).
    pub fn applies_to(&self, port: u16) -> bool {
        self.config.ports.is_empty() || self.config.ports.contains(&port)
    }

    /// Takes a token from the bucket of a plaintext caller's request, or says how long
    /// until one is available.
    pub fn check(&self, client: IpAddr, headers: &HeaderMap) -> Result<(), RateLimited> {
        self.check_from(client, None, headers)
    }

    /// Takes a token from the bucket of a request from `caller` (its mesh identity, if
    /// it has one), or says how long until one is available.
    pub fn check_from(
        &self,
        client: IpAddr,
        caller: Option<&Arc<PeerId>>,
        headers: &HeaderMap,
    ) -> Result<(), RateLimited> {
        let result = match &self.buckets {
            Buckets::Single(limiter) => limiter.check(),
            // One bucket per host whether it connects over IPv4 or IPv4-mapped IPv6.
            Buckets::ByAddress(limiter) => limiter.check_key(&client.to_canonical()),
            // Cloning the caller is a reference-count increment.
            Buckets::ByIdentity(limiter) => limiter.check_key(&IdentityKey(caller.cloned())),
            // With several values the first one counts; cloning a parsed value is a
            // reference-count increment, not a copy.
            Buckets::ByHeader(name, limiter) => {
                limiter.check_key(&HeaderKey(headers.get(name).cloned()))
            }
        };
        result.map_err(|not_until| {
            let retry_after = not_until.wait_time_from(self.clock.now());
            tracing::debug!(
                policy = %self.source,
                limit = %self.name,
                %client,
                ?retry_after,
                reason = "rate-limited",
                "request refused by rate limit"
            );
            RateLimited {
                retry_after,
                source: Arc::clone(&self.source),
                name: Arc::clone(&self.name),
            }
        })
    }

    /// Drops the buckets of keys not seen recently (full again, so indistinguishable from new).
    pub fn evict_idle(&self) {
        let before = self.tracked_keys();
        match &self.buckets {
            Buckets::Single(_) => return,
            Buckets::ByAddress(limiter) => {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            Buckets::ByIdentity(limiter) => {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            Buckets::ByHeader(_, limiter) => {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
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
        match &self.buckets {
            Buckets::Single(_) => 1,
            Buckets::ByAddress(limiter) => limiter.len(),
            Buckets::ByIdentity(limiter) => limiter.len(),
            Buckets::ByHeader(_, limiter) => limiter.len(),
        }
    }

    /// The config in force.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("tracked_keys", &self.tracked_keys())
            .finish()
    }
}

/// All limits for one inbound port: a request must pass every one.
///
/// Governor cannot test a bucket without taking a token, so a request refused by one limit
/// has already spent a token in the limits checked before it. Keyed limits (client address,
/// header) are therefore checked before unkeyed ones: a client over its own limit is refused
/// without draining the bucket everyone shares, so a noisy tenant cannot starve the others.
/// What remains is a token spent in a client's own bucket when the shared limit refuses it,
/// which only makes that client's limit stricter while the whole pod is over its limit.
#[derive(Debug, Clone, Default)]
pub struct RateLimits(Vec<Arc<RateLimiter>>);

impl RateLimits {
    /// The limits, keyed ones first (otherwise in the given order).
    pub fn new<L: Into<Arc<RateLimiter>>>(limiters: impl IntoIterator<Item = L>) -> Self {
        let mut limiters: Vec<Arc<RateLimiter>> = limiters.into_iter().map(Into::into).collect();
        limiters.sort_by_key(|limiter| limiter.config.key == RateLimitKey::None);
        Self(limiters)
    }

    /// Checks a plaintext caller's request on local `port` from `client` against every
    /// limit that applies.
    pub fn check(&self, port: u16, client: IpAddr, headers: &HeaderMap) -> Result<(), RateLimited> {
        self.check_from(port, client, None, headers)
    }

    /// Checks a request on local `port` from `client`, whose mesh identity is `caller`,
    /// against every limit that applies.
    pub fn check_from(
        &self,
        port: u16,
        client: IpAddr,
        caller: Option<&Arc<PeerId>>,
        headers: &HeaderMap,
    ) -> Result<(), RateLimited> {
        for limiter in &self.0 {
            if limiter.applies_to(port) {
                limiter.check_from(client, caller, headers)?;
            }
        }
        Ok(())
    }

    /// Whether there are no limits at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The limits, in the order they are checked.
    pub fn limiters(&self) -> &[Arc<RateLimiter>] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn stored_header_keys_do_not_share_the_request_buffer() {
        let buffer = bytes::Bytes::from_static(b"acme-and-the-rest-of-a-request");
        let value = HeaderValue::from_maybe_shared(buffer.slice(0..4)).unwrap();
        let key = HeaderKey(Some(value));
        assert_eq!(
            key.0.as_ref().unwrap().as_bytes().as_ptr(),
            buffer.as_ptr(),
            "a parsed value shares the buffer"
        );
        let stored = key.clone();
        assert_eq!(stored, key);
        let stored_bytes = stored.0.as_ref().unwrap().as_bytes();
        assert_ne!(
            stored_bytes.as_ptr(),
            buffer.as_ptr(),
            "the stored key owns a copy"
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
