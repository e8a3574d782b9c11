//! Load balancing across a service port's endpoints, skipping those whose breaker refuses.
//!
//! Round robin walks an atomic cursor; least request draws two endpoints at random and takes
//! the one with fewer requests in flight (power of two choices). Both prefer endpoints a retry
//! has not tried yet and fall back to tried ones when no other admits the request. Weights
//! are not used by these two strategies.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulwark_proto::v1;
use bulwark_proto::v1::load_balancer::Strategy as ProtoStrategy;

use crate::breaker::BreakerPermit;
use crate::endpoint::{Endpoint, EndpointLoad};

/// A `loadBalancer` section that cannot be enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidStrategy {
    /// A strategy number this agent does not know.
    #[error(
        "strategy {0} is unknown to this agent (known: ROUND_ROBIN, LEAST_REQUEST); is the control plane newer than the agent?"
    )]
    Unknown(i32),
}

/// How endpoints are picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Each endpoint in turn.
    RoundRobin,
    /// The less loaded of two random endpoints (the default).
    #[default]
    LeastRequest,
}

impl Strategy {
    /// The strategy's name as in the policy API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::RoundRobin => "RoundRobin",
            Self::LeastRequest => "LeastRequest",
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
            Err(_) => Err(InvalidStrategy::Unknown(proto.strategy)),
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
        Self {
            strategy,
            endpoints,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint whose breaker admits the request, preferring ones not in `avoid`
    /// (a retry's earlier endpoints); falls back to `avoid`ed ones when no other admits.
    pub fn pick(&self, avoid: &[SocketAddr]) -> Result<Picked, PickError> {
        if self.endpoints.is_empty() {
            tracing::debug!(reason = "no-endpoints", "no endpoint to pick");
            return Err(PickError::NoEndpoints);
        }
        for pass in [Pass::Fresh, Pass::Tried] {
            if pass == Pass::Tried && avoid.is_empty() {
                break;
            }
            let picked = match self.strategy {
                Strategy::RoundRobin => self.round_robin(avoid, pass),
                Strategy::LeastRequest => self.least_request(avoid, pass),
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
    use crate::breaker::{BreakerConfig, CircuitBreaker};
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
        assert_eq!(eps[1].breaker.state(), crate::breaker::BreakerState::Closed);
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
        let lb = |strategy: i32| v1::LoadBalancer { strategy };
        assert_eq!(Strategy::try_from(&lb(0)), Ok(Strategy::LeastRequest));
        assert_eq!(Strategy::try_from(&lb(1)), Ok(Strategy::RoundRobin));
        assert_eq!(Strategy::try_from(&lb(2)), Ok(Strategy::LeastRequest));
        assert_eq!(Strategy::try_from(&lb(9)), Err(InvalidStrategy::Unknown(9)));
    }

    #[test]
    fn balancer_is_shareable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Balancer>();
        assert_send_sync::<Picked>();
    }
}
