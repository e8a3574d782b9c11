//! Load balancing across a service port's endpoints, skipping those whose breaker refuses.
//!
//! Round robin walks an atomic cursor; least request draws two endpoints at random and takes
//! the one with fewer requests in flight (power of two choices); random takes any endpoint
//! uniformly; weighted round robin walks a schedule built once per config in which each
//! endpoint appears as often as its weight, spread out (smooth weighted round robin, as in
//! nginx); consistent hash walks a ring of endpoints from a request's key (sticky sessions)
//! to the first endpoint that admits it. All prefer endpoints a retry has not tried yet and
//! fall back to tried ones when no other admits the request.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulwark_proto::v1;
use bulwark_proto::v1::load_balancer::Strategy as ProtoStrategy;

use crate::policy::breaker::BreakerPermit;
use crate::policy::endpoint::{Endpoint, EndpointLoad};

/// A `loadBalancer` section that cannot be enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidStrategy {
    /// A strategy number this agent does not know.
    #[error(
        "strategy {0} is unknown to this agent (known: ROUND_ROBIN, LEAST_REQUEST, RANDOM, WEIGHTED_ROUND_ROBIN, CONSISTENT_HASH); is the control plane newer than the agent?"
    )]
    Unknown(i32),
    /// CONSISTENT_HASH without `hash_on`.
    #[error("CONSISTENT_HASH needs hash_on")]
    MissingHashOn,
}

/// Most entries of a weighted round-robin schedule; larger weight sums are scaled down.
pub(crate) const MAX_SCHEDULE: u64 = 10_000;
/// Points per endpoint on a consistent-hash ring.
const RING_POINTS: u32 = 100;

/// How endpoints are picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Each endpoint in turn.
    RoundRobin,
    /// The less loaded of two random endpoints (the default).
    #[default]
    LeastRequest,
    /// Any endpoint, uniformly at random.
    Random,
    /// Each endpoint in proportion to its weight.
    WeightedRoundRobin,
    /// The endpoint a request's key hashes to on a ring (sticky sessions).
    ConsistentHash,
}

impl Strategy {
    /// The strategy's name as in the policy API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::RoundRobin => "RoundRobin",
            Self::LeastRequest => "LeastRequest",
            Self::Random => "Random",
            Self::WeightedRoundRobin => "WeightedRoundRobin",
            Self::ConsistentHash => "ConsistentHash",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&v1::LoadBalancer> for Strategy {
    type Error = InvalidStrategy;

    /// `STRATEGY_UNSPECIFIED` reads as [`Strategy::LeastRequest`].
    fn try_from(proto: &v1::LoadBalancer) -> Result<Self, Self::Error> {
        match ProtoStrategy::try_from(proto.strategy) {
            Ok(ProtoStrategy::RoundRobin) => Ok(Self::RoundRobin),
            Ok(ProtoStrategy::LeastRequest | ProtoStrategy::Unspecified) => Ok(Self::LeastRequest),
            Ok(ProtoStrategy::Random) => Ok(Self::Random),
            Ok(ProtoStrategy::WeightedRoundRobin) => Ok(Self::WeightedRoundRobin),
            Ok(ProtoStrategy::ConsistentHash) if proto.hash_on.is_none() => {
                Err(InvalidStrategy::MissingHashOn)
            }
            Ok(ProtoStrategy::ConsistentHash) => Ok(Self::ConsistentHash),
            Err(_) => Err(InvalidStrategy::Unknown(proto.strategy)),
        }
    }
}

/// What identifies a session for consistent hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header's value.
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    ClientAddress,
}

impl TryFrom<&v1::HashOn> for HashOn {
    type Error = InvalidStrategy;

    fn try_from(proto: &v1::HashOn) -> Result<Self, InvalidStrategy> {
        use v1::hash_on::Kind;
        match &proto.kind {
            Some(Kind::Header(h)) => http::HeaderName::try_from(h.as_str())
                .map(HashOn::Header)
                .map_err(|_| InvalidStrategy::MissingHashOn),
            Some(Kind::Cookie(c)) if !c.is_empty() => Ok(HashOn::Cookie(c.clone())),
            Some(Kind::ClientAddress(_)) => Ok(HashOn::ClientAddress),
            _ => Err(InvalidStrategy::MissingHashOn),
        }
    }
}

impl HashOn {
    /// The stable hash of a request's session key, if it has one.
    pub fn key(&self, headers: &http::HeaderMap, client: Option<std::net::IpAddr>) -> Option<u64> {
        let hash = |b: &[u8]| crate::policy::hash::stable_hash(b);
        match self {
            HashOn::Header(name) => headers.get(name).map(|v| hash(v.as_bytes())),
            HashOn::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == name).then(|| hash(v.as_bytes()))
                }),
            HashOn::ClientAddress => client.map(crate::policy::hash::stable_hash_ip),
        }
    }
}

/// No endpoint can take the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The service port has no ready endpoints.
    #[error("no endpoints: the service has no ready endpoints")]
    NoEndpoints,
    /// Every endpoint's circuit breaker refuses.
    #[error(
        "every endpoint's circuit breaker is open; the first may admit again in {retry_after:?}"
    )]
    AllOpen {
        /// The shortest time until some endpoint admits a request again.
        retry_after: Duration,
    },
}

/// The endpoint picked for one try, with its breaker permit; the endpoint counts the request
/// as in flight until this (or the load guard taken out of it) is dropped.
#[derive(Debug)]
pub struct Picked {
    /// The endpoint to send to.
    pub endpoint: Arc<Endpoint>,
    /// Report the try's outcome with this.
    pub permit: BreakerPermit,
    load: EndpointLoad,
}

impl Picked {
    /// Splits into the endpoint, the breaker permit and the load guard, so that each can live
    /// as long as it should (the load guard typically as long as the response body).
    pub fn into_parts(self) -> (Arc<Endpoint>, BreakerPermit, EndpointLoad) {
        (self.endpoint, self.permit, self.load)
    }
}

/// Picks endpoints of one service port.
pub struct Balancer {
    strategy: Strategy,
    endpoints: Vec<Arc<Endpoint>>,
    cursor: AtomicUsize,
    /// Weighted round robin: endpoint indices in turn order.
    schedule: Vec<usize>,
    /// Consistent hash: `(point, endpoint index)` sorted by point.
    ring: Vec<(u64, usize)>,
}

/// Which endpoints a pass considers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Endpoints the request has not tried.
    Fresh,
    /// Endpoints it has tried (the fallback).
    Tried,
}

impl Balancer {
    /// A balancer over `endpoints`.
    pub fn new(strategy: Strategy, endpoints: Vec<Arc<Endpoint>>) -> Self {
        let schedule = match strategy {
            Strategy::WeightedRoundRobin => {
                // Endpoint weight 0 reads as 1 (proto default).
                let weights: Vec<u32> = endpoints.iter().map(|e| e.weight.max(1)).collect();
                schedule(&weights)
            }
            _ => Vec::new(),
        };
        let ring = match strategy {
            Strategy::ConsistentHash => ring(&endpoints),
            _ => Vec::new(),
        };
        Self {
            strategy,
            endpoints,
            cursor: AtomicUsize::new(0),
            schedule,
            ring,
        }
    }

    /// Picks an endpoint whose breaker admits the request, preferring ones not in `avoid`
    /// (a retry's earlier endpoints); falls back to `avoid`ed ones when no other admits.
    pub fn pick(&self, avoid: &[SocketAddr]) -> Result<Picked, PickError> {
        self.pick_keyed(avoid, None)
    }

    /// Like [`Balancer::pick`], with the request's session key hash for consistent
    /// hashing (ignored by the other strategies; without one, consistent hash balances
    /// round robin).
    pub fn pick_keyed(&self, avoid: &[SocketAddr], key: Option<u64>) -> Result<Picked, PickError> {
        if self.endpoints.is_empty() {
            tracing::debug!(reason = "no-endpoints", "no endpoint to pick");
            return Err(PickError::NoEndpoints);
        }
        for pass in [Pass::Fresh, Pass::Tried] {
            if pass == Pass::Tried && avoid.is_empty() {
                break;
            }
            let picked = match (self.strategy, key) {
                (Strategy::RoundRobin, _) | (Strategy::ConsistentHash, None) => {
                    self.round_robin(avoid, pass)
                }
                (Strategy::LeastRequest, _) => self.least_request(avoid, pass),
                (Strategy::Random, _) => self.random(avoid, pass),
                (Strategy::WeightedRoundRobin, _) => self.weighted(avoid, pass),
                (Strategy::ConsistentHash, Some(key)) => self.consistent(key, avoid, pass),
            };
            if let Some(picked) = picked {
                tracing::debug!(
                    endpoint = %picked.endpoint.addr,
                    strategy = self.strategy.as_str(),
                    in_flight = picked.endpoint.in_flight(),
                    retried_endpoint = pass == Pass::Tried,
                    "picked endpoint"
                );
                return Ok(picked);
            }
        }
        let retry_after = self
            .endpoints
            .iter()
            .map(|ep| ep.breaker.retry_after().unwrap_or(Duration::ZERO))
            .min()
            .unwrap_or(Duration::ZERO);
        // The caller logs the decision, with the destination it concerns.
        Err(PickError::AllOpen { retry_after })
    }

    /// Picks the endpoint at `addr` (a connection to a pod's own address keeps
    /// going to that pod), if it is one of this balancer's and its breaker admits.
    pub fn pick_addr(&self, addr: SocketAddr) -> Result<Picked, PickError> {
        let endpoint = self
            .endpoints
            .iter()
            .find(|ep| ep.addr == addr)
            .ok_or(PickError::NoEndpoints)?;
        self.admit(endpoint).ok_or_else(|| PickError::AllOpen {
            retry_after: endpoint.breaker.retry_after().unwrap_or(Duration::ZERO),
        })
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The strategy in force.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    fn eligible(&self, endpoint: &Endpoint, avoid: &[SocketAddr], pass: Pass) -> bool {
        avoid.contains(&endpoint.addr) == (pass == Pass::Tried)
    }

    fn admit(&self, endpoint: &Arc<Endpoint>) -> Option<Picked> {
        let permit = endpoint.breaker.acquire().ok()?;
        Some(Picked {
            endpoint: Arc::clone(endpoint),
            permit,
            load: endpoint.track(),
        })
    }

    fn round_robin(&self, avoid: &[SocketAddr], pass: Pass) -> Option<Picked> {
        let n = self.endpoints.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for offset in 0..n {
            let endpoint = &self.endpoints[start.wrapping_add(offset) % n];
            if !self.eligible(endpoint, avoid, pass) {
                continue;
            }
            if let Some(picked) = self.admit(endpoint) {
                // Move the cursor past the skipped endpoints too, so the one after a refusing
                // endpoint does not get its turn as well as its own.
                if offset > 0 {
                    self.cursor.fetch_add(offset, Ordering::Relaxed);
                }
                return Some(picked);
            }
        }
        None
    }

    fn least_request(&self, avoid: &[SocketAddr], pass: Pass) -> Option<Picked> {
        let n = self.endpoints.len();
        let usable = |ep: &Endpoint| self.eligible(ep, avoid, pass) && ep.breaker.is_available();
        let (first, second) = if n >= 2 {
            // The common case: two distinct random endpoints that are both usable.
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            if usable(&self.endpoints[a]) && usable(&self.endpoints[b]) {
                (Some(a), Some(b))
            } else {
                self.sample_two(usable)
            }
        } else {
            self.sample_two(usable)
        };
        let chosen = match (first, second) {
            (Some(a), Some(b)) => {
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                if eb.in_flight() < ea.in_flight() {
                    [b, a]
                } else {
                    [a, b]
                }
            }
            (Some(a), None) => [a, a],
            _ => return None,
        };
        for index in chosen {
            if let Some(picked) = self.admit(&self.endpoints[index]) {
                return Some(picked);
            }
        }
        // Both lost a race (a half-open probe slot taken meanwhile): try every endpoint.
        self.endpoints
            .iter()
            .filter(|ep| self.eligible(ep, avoid, pass))
            .find_map(|ep| self.admit(ep))
    }

    fn random(&self, avoid: &[SocketAddr], pass: Pass) -> Option<Picked> {
        let n = self.endpoints.len();
        // Start anywhere, then walk: a refusing endpoint's share goes to the next one.
        let start = fastrand::usize(..n);
        (0..n)
            .map(|offset| &self.endpoints[(start + offset) % n])
            .filter(|ep| self.eligible(ep, avoid, pass))
            .find_map(|ep| self.admit(ep))
    }

    fn weighted(&self, avoid: &[SocketAddr], pass: Pass) -> Option<Picked> {
        let n = self.schedule.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for offset in 0..n {
            let endpoint = &self.endpoints[self.schedule[start.wrapping_add(offset) % n]];
            if self.eligible(endpoint, avoid, pass)
                && let Some(picked) = self.admit(endpoint)
            {
                return Some(picked);
            }
        }
        None
    }

    fn consistent(&self, key: u64, avoid: &[SocketAddr], pass: Pass) -> Option<Picked> {
        let n = self.ring.len();
        let start = self.ring.partition_point(|(p, _)| *p < key);
        // Walk the ring from the key's point: the session stays on its endpoint while it
        // admits, and moves to the next one on the ring (the same for every agent) if not.
        (0..n)
            .map(|offset| &self.endpoints[self.ring[(start + offset) % n].1])
            .filter(|ep| self.eligible(ep, avoid, pass))
            .find_map(|ep| self.admit(ep))
    }

    /// Two distinct usable endpoints chosen uniformly (reservoir sampling, no allocation).
    fn sample_two(&self, usable: impl Fn(&Endpoint) -> bool) -> (Option<usize>, Option<usize>) {
        let mut picks = (None, None);
        let mut seen = 0usize;
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            if !usable(endpoint) {
                continue;
            }
            seen += 1;
            match seen {
                1 => picks.0 = Some(index),
                2 => picks.1 = Some(index),
                _ => match fastrand::usize(..seen) {
                    0 => picks.0 = Some(index),
                    1 => picks.1 = Some(index),
                    _ => {}
                },
            }
        }
        picks
    }
}

/// The smooth weighted round-robin order (nginx's) of indices into `weights`, leaving
/// out zero weights: each turn every entry gains its weight, the one with the most goes
/// and loses the total. Shared by weighted endpoints and HTTPRoute backends. Weights are scaled down so that the schedule has at most
/// [`MAX_SCHEDULE`] entries (a non-zero weight keeps at least one).
pub(crate) fn schedule(weights: &[u32]) -> Vec<usize> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let scale = total.div_ceil(MAX_SCHEDULE).max(1);
    let scaled: Vec<i64> = weights
        .iter()
        .map(|&w| match w {
            0 => 0,
            w => i64::try_from((u64::from(w) / scale).max(1)).unwrap_or(1),
        })
        .collect();
    let sum: i64 = scaled.iter().sum();
    let mut current = vec![0i64; scaled.len()];
    let mut order = Vec::with_capacity(usize::try_from(sum).unwrap_or(0));
    for _ in 0..sum {
        for (c, w) in current.iter_mut().zip(&scaled) {
            *c += w;
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .filter(|(i, _)| scaled[*i] > 0)
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
        else {
            break;
        };
        current[best] -= sum;
        order.push(best);
    }
    order
}

/// The ring of consistent hashing: [`RING_POINTS`] points per endpoint, each the stable
/// hash of `"{address}#{i}"`, so every agent builds the same ring.
fn ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, usize)> {
    let mut points = Vec::with_capacity(endpoints.len() * RING_POINTS as usize);
    for (index, ep) in endpoints.iter().enumerate() {
        for i in 0..RING_POINTS {
            let point = crate::policy::hash::stable_hash(format!("{}#{i}", ep.addr).as_bytes());
            points.push((point, index));
        }
    }
    points.sort_unstable();
    points
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("strategy", &self.strategy)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::breaker::{BreakerConfig, CircuitBreaker};
    use std::collections::{BTreeMap, HashMap};
    use tokio::time::advance;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 8080))
    }

    fn endpoints(n: u8) -> Vec<Arc<Endpoint>> {
        let config = BreakerConfig {
            consecutive_failures: 1,
            failure_ratio: None,
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(60),
            half_open_probes: 1,
        };
        (1..=n)
            .map(|i| {
                let name: Arc<str> = format!("test {}", addr(i)).into();
                let breaker = Arc::new(CircuitBreaker::new(config.clone(), name));
                Arc::new(Endpoint::new(addr(i), BTreeMap::new(), 1, breaker))
            })
            .collect()
    }

    /// Opens an endpoint's breaker (one failure trips it in these tests).
    fn trip(endpoint: &Endpoint) {
        let breaker = Arc::clone(&endpoint.breaker);
        breaker.acquire().unwrap().failure();
    }

    fn pick_addr(b: &Balancer, avoid: &[SocketAddr]) -> SocketAddr {
        let picked = b.pick(avoid).expect("an endpoint is available");
        let addr = picked.endpoint.addr;
        picked.permit.success();
        addr
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_cycles_evenly() {
        let b = Balancer::new(Strategy::RoundRobin, endpoints(3));
        let picks: Vec<_> = (0..9).map(|_| pick_addr(&b, &[])).collect();
        let first = [picks[0], picks[1], picks[2]];
        assert_eq!(
            first.iter().collect::<std::collections::HashSet<_>>().len(),
            3
        );
        assert_eq!(&picks[3..6], &first);
        assert_eq!(&picks[6..9], &first);
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_skips_an_open_endpoint_and_returns_after_probe() {
        let eps = endpoints(3);
        let b = Balancer::new(Strategy::RoundRobin, eps.clone());
        trip(&eps[1]);
        let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
        for _ in 0..100 {
            *counts.entry(pick_addr(&b, &[])).or_default() += 1;
        }
        assert_eq!(counts.get(&addr(2)), None, "open endpoint gets nothing");
        // The others share evenly: the skip does not hand one of them a double turn.
        assert_eq!(counts[&addr(1)], 50);
        assert_eq!(counts[&addr(3)], 50);

        advance(Duration::from_secs(5)).await;
        // After the open period the endpoint gets a probe in its turn; success closes it.
        let picks: Vec<_> = (0..3).map(|_| pick_addr(&b, &[])).collect();
        assert!(picks.contains(&addr(2)));
        assert_eq!(
            eps[1].breaker.state(),
            crate::policy::breaker::BreakerState::Closed
        );
        let picks: Vec<_> = (0..6).map(|_| pick_addr(&b, &[])).collect();
        assert_eq!(picks.iter().filter(|a| **a == addr(2)).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn all_open_reports_the_smallest_retry_after() {
        for strategy in [Strategy::RoundRobin, Strategy::LeastRequest] {
            let eps = endpoints(3);
            let b = Balancer::new(strategy, eps.clone());
            trip(&eps[0]);
            advance(Duration::from_secs(2)).await;
            trip(&eps[1]);
            advance(Duration::from_secs(1)).await;
            trip(&eps[2]);
            // Opened at 0s, 2s and 3s for 5s each: the first admits again in 2s.
            assert_eq!(
                b.pick(&[]).unwrap_err(),
                PickError::AllOpen {
                    retry_after: Duration::from_secs(2)
                },
                "{strategy}"
            );
            advance(Duration::from_secs(2)).await;
            assert_eq!(pick_addr(&b, &[]), addr(1), "{strategy}: the probe");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_endpoints() {
        for strategy in [Strategy::RoundRobin, Strategy::LeastRequest] {
            let b = Balancer::new(strategy, Vec::new());
            assert_eq!(b.pick(&[]).unwrap_err(), PickError::NoEndpoints);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_prefers_the_less_loaded() {
        let eps = endpoints(2);
        let b = Balancer::new(Strategy::LeastRequest, eps.clone());
        // Hold three requests on the first endpoint: the next three go to the second.
        let held: Vec<_> = (0..3).map(|_| eps[0].track()).collect();
        let mut held_picks = Vec::new();
        for _ in 0..3 {
            let picked = b.pick(&[]).unwrap();
            assert_eq!(picked.endpoint.addr, addr(2));
            held_picks.push(picked);
        }
        assert_eq!(eps[1].in_flight(), 3);
        // The first endpoint's requests finish: now it is the less loaded one.
        drop(held);
        for _ in 0..3 {
            let picked = b.pick(&[]).unwrap();
            assert_eq!(picked.endpoint.addr, addr(1));
            held_picks.push(picked);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_spreads_load_across_many_endpoints() {
        fastrand::seed(11);
        let eps = endpoints(8);
        let b = Balancer::new(Strategy::LeastRequest, eps.clone());
        // Requests that never finish: two choices keep the loads close together.
        let held: Vec<_> = (0..80).map(|_| b.pick(&[]).unwrap()).collect();
        let loads: Vec<_> = eps.iter().map(|ep| ep.in_flight()).collect();
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(max - min <= 3, "loads {loads:?}");
        drop(held);
        assert!(eps.iter().all(|ep| ep.in_flight() == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_skips_open_endpoints() {
        fastrand::seed(5);
        let eps = endpoints(5);
        let b = Balancer::new(Strategy::LeastRequest, eps.clone());
        for ep in &eps[..4] {
            trip(ep);
        }
        for _ in 0..50 {
            assert_eq!(pick_addr(&b, &[]), addr(5));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn avoid_is_respected_and_falls_back() {
        for strategy in [Strategy::RoundRobin, Strategy::LeastRequest] {
            let eps = endpoints(3);
            let b = Balancer::new(strategy, eps.clone());
            for _ in 0..20 {
                assert_eq!(pick_addr(&b, &[addr(1), addr(2)]), addr(3), "{strategy}");
            }
            // The only untried endpoint is open: fall back to a tried one.
            trip(&eps[2]);
            for _ in 0..20 {
                let got = pick_addr(&b, &[addr(1), addr(2)]);
                assert!(got == addr(1) || got == addr(2), "{strategy}: {got}");
            }
            // Everything tried and open but one tried endpoint: that one.
            trip(&eps[0]);
            assert_eq!(pick_addr(&b, &[addr(1), addr(2), addr(3)]), addr(2));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn picked_counts_load_until_dropped() {
        let eps = endpoints(1);
        let b = Balancer::new(Strategy::RoundRobin, eps.clone());
        let picked = b.pick(&[]).unwrap();
        assert_eq!(eps[0].in_flight(), 1);
        let (_endpoint, permit, load) = picked.into_parts();
        permit.success();
        assert_eq!(eps[0].in_flight(), 1, "the load guard still holds");
        drop(load);
        assert_eq!(eps[0].in_flight(), 0);
    }

    #[test]
    fn strategy_from_proto() {
        let lb = |strategy: i32| v1::LoadBalancer {
            strategy,
            hash_on: None,
        };
        assert_eq!(Strategy::try_from(&lb(0)), Ok(Strategy::LeastRequest));
        assert_eq!(Strategy::try_from(&lb(1)), Ok(Strategy::RoundRobin));
        assert_eq!(Strategy::try_from(&lb(2)), Ok(Strategy::LeastRequest));
        assert_eq!(Strategy::try_from(&lb(9)), Err(InvalidStrategy::Unknown(9)));
        assert_eq!(Strategy::try_from(&lb(3)), Ok(Strategy::Random));
        assert_eq!(Strategy::try_from(&lb(4)), Ok(Strategy::WeightedRoundRobin));
        assert_eq!(
            Strategy::try_from(&lb(5)),
            Err(InvalidStrategy::MissingHashOn)
        );
    }

    fn weighted(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        endpoints(u8::try_from(weights.len()).unwrap())
            .into_iter()
            .zip(weights)
            .map(|(ep, w)| {
                Arc::new(Endpoint::new(
                    ep.addr,
                    BTreeMap::new(),
                    *w,
                    Arc::clone(&ep.breaker),
                ))
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn weighted_round_robin_matches_the_weights_and_spreads_turns() {
        let b = Balancer::new(Strategy::WeightedRoundRobin, weighted(&[5, 1, 1]));
        let picks: Vec<_> = (0..70).map(|_| pick_addr(&b, &[])).collect();
        let count = |a| picks.iter().filter(|p| **p == a).count();
        assert_eq!(
            (count(addr(1)), count(addr(2)), count(addr(3))),
            (50, 10, 10)
        );
        // Smooth: within a period (a a b a c a a) the light ones interleave.
        let longest = picks[..7]
            .chunk_by(|a, b| a == b)
            .map(<[SocketAddr]>::len)
            .max()
            .unwrap();
        assert!(longest <= 2, "{picks:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn weighted_round_robin_skips_an_open_endpoint_and_huge_weights_are_scaled() {
        let eps = weighted(&[3, 1]);
        let b = Balancer::new(Strategy::WeightedRoundRobin, eps.clone());
        trip(&eps[0]);
        for _ in 0..8 {
            assert_eq!(pick_addr(&b, &[]), addr(2));
        }
        let b = Balancer::new(
            Strategy::WeightedRoundRobin,
            weighted(&[u32::MAX, u32::MAX / 2]),
        );
        assert!(b.schedule.len() <= MAX_SCHEDULE as usize + 2);
        let picks: Vec<_> = (0..3000).map(|_| pick_addr(&b, &[])).collect();
        let first = picks.iter().filter(|p| **p == addr(1)).count();
        assert_eq!(first, 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn random_uses_every_endpoint_and_skips_open_ones() {
        fastrand::seed(7);
        let eps = endpoints(4);
        let b = Balancer::new(Strategy::Random, eps.clone());
        let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
        for _ in 0..4000 {
            *counts.entry(pick_addr(&b, &[])).or_default() += 1;
        }
        assert!(
            counts.values().all(|c| (800..1200).contains(c)),
            "{counts:?}"
        );
        trip(&eps[0]);
        for _ in 0..50 {
            assert_ne!(pick_addr(&b, &[]), addr(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consistent_hash_keeps_a_key_on_its_endpoint_and_moves_it_only_when_that_one_refuses() {
        let eps = endpoints(5);
        let b = Balancer::new(Strategy::ConsistentHash, eps.clone());
        let key = |k: &str| Some(crate::policy::hash::stable_hash(k.as_bytes()));
        let pick = |k: &str| {
            let p = b.pick_keyed(&[], key(k)).unwrap();
            p.permit.success();
            p.endpoint.addr
        };
        let mut homes = HashMap::new();
        for i in 0..200 {
            let k = format!("session-{i}");
            let home = pick(&k);
            for _ in 0..3 {
                assert_eq!(pick(&k), home, "{k}");
            }
            homes.insert(k, home);
        }
        let used: std::collections::HashSet<_> = homes.values().collect();
        assert_eq!(used.len(), 5, "sessions spread over every endpoint");
        // One endpoint's breaker opens: only its sessions move.
        trip(&eps[2]);
        for (k, home) in &homes {
            let now = pick(k);
            if *home == addr(3) {
                assert_ne!(now, addr(3));
            } else {
                assert_eq!(now, *home, "{k} stays");
            }
        }
        // A rebuilt balancer (another agent, or a config push) agrees.
        let again = Balancer::new(Strategy::ConsistentHash, endpoints(5));
        let p = again.pick_keyed(&[], key("session-1")).unwrap();
        assert_eq!(p.endpoint.addr, homes["session-1"]);
    }

    #[test]
    fn balancer_is_shareable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Balancer>();
        assert_send_sync::<Picked>();
    }
}
