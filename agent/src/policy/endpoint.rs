//! Endpoints (the pods behind a service port) with their circuit breaker and load.

use crate::policy::breaker::CircuitBreaker;
use crate::transport::pool::Pool;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An endpoint address from the control plane that cannot be connected to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEndpoint {
    /// Not `ip:port` (IPv6 in brackets).
    #[error("endpoint address {0:?} is not ip:port (IPv6 as [ip]:port)")]
    Address(String),
    /// Port 0.
    #[error("endpoint address {0:?} has port 0; check the EndpointSlice's ports")]
    ZeroPort(String),
}

/// Parses an endpoint's `address` (`ip:port`, IPv6 in brackets).
pub fn parse_address(address: &str) -> Result<SocketAddr, InvalidEndpoint> {
    let addr: SocketAddr = address
        .parse()
        .map_err(|_| InvalidEndpoint::Address(address.to_owned()))?;
    if addr.port() == 0 {
        return Err(InvalidEndpoint::ZeroPort(address.to_owned()));
    }
    Ok(addr)
}

/// One endpoint of a service port, shared as `Arc` by the balancer and in-flight requests.
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// Relative weight (at least 1) for weighted strategies.
    pub weight: u32,
    /// This endpoint's circuit breaker.
    pub breaker: Arc<CircuitBreaker>,
    /// `addr` as a URI authority, rendered once so that each request to this
    /// endpoint only clones it.
    pub authority: http::uri::Authority,
    /// The connections kept open to it.
    pub pool: Arc<Pool>,
    in_flight: AtomicUsize,
}

impl Endpoint {
    /// An endpoint with nothing in flight; a `weight` of 0 is read as 1, as the proto says.
    pub fn new(
        addr: SocketAddr,
        labels: BTreeMap<String, String>,
        weight: u32,
        breaker: Arc<CircuitBreaker>,
    ) -> Self {
        Self {
            addr,
            labels,
            weight: weight.max(1),
            breaker,
            authority: authority(addr),
            pool: Arc::default(),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Requests to this endpoint now in flight (counted by [`EndpointLoad`] guards).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request in flight to this endpoint until the guard is dropped.
    pub fn track(self: &Arc<Self>) -> EndpointLoad {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        EndpointLoad {
            endpoint: Arc::clone(self),
        }
    }
}

/// `addr` as a URI authority (`ip:port`, IPv6 in brackets).
fn authority(addr: SocketAddr) -> http::uri::Authority {
    // A SocketAddr always renders as a valid authority; the fallback is unreachable.
    http::uri::Authority::try_from(addr.to_string())
        .unwrap_or_else(|_| http::uri::Authority::from_static("0.0.0.0"))
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("labels", &self.labels)
            .field("weight", &self.weight)
            .field("breaker", &self.breaker.state())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// One request in flight to an endpoint; the endpoint's load drops when this is dropped.
#[must_use = "the request counts as in flight only while this guard lives"]
pub struct EndpointLoad {
    endpoint: Arc<Endpoint>,
}

impl EndpointLoad {
    /// The endpoint being loaded.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for EndpointLoad {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for EndpointLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EndpointLoad")
            .field(&self.endpoint.addr)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::breaker::BreakerConfig;

    fn endpoint(addr: &str, weight: u32) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            addr.parse().unwrap(),
            BTreeMap::new(),
            weight,
            Arc::new(CircuitBreaker::new(BreakerConfig::disabled(), addr.into())),
        ))
    }

    #[test]
    fn authority_is_the_address_with_ipv6_in_brackets() {
        assert_eq!(endpoint("10.0.0.7:8080", 1).authority, "10.0.0.7:8080");
        assert_eq!(endpoint("[fd00::7]:8080", 1).authority, "[fd00::7]:8080");
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(
            parse_address("127.0.0.21:8080"),
            Ok("127.0.0.21:8080".parse().unwrap())
        );
        assert_eq!(
            parse_address("[::1]:8080"),
            Ok("[::1]:8080".parse().unwrap())
        );
        assert!(matches!(
            parse_address("reviews:8080"),
            Err(InvalidEndpoint::Address(_))
        ));
        assert!(matches!(
            parse_address("::1:8080"),
            Err(InvalidEndpoint::Address(_))
        ));
        assert!(matches!(
            parse_address("10.0.0.1:0"),
            Err(InvalidEndpoint::ZeroPort(_))
        ));
    }

    #[test]
    fn zero_weight_reads_as_one() {
        assert_eq!(endpoint("127.0.0.1:1", 0).weight, 1);
        assert_eq!(endpoint("127.0.0.1:1", 7).weight, 7);
    }

    #[test]
    fn load_guards_count_requests_in_flight() {
        let ep = endpoint("127.0.0.1:1", 1);
        let first = ep.track();
        let second = ep.track();
        assert_eq!(ep.in_flight(), 2);
        drop(first);
        assert_eq!(ep.in_flight(), 1);
        assert_eq!(second.endpoint().addr, ep.addr);
        drop(second);
        assert_eq!(ep.in_flight(), 0);
    }

    #[test]
    fn endpoint_is_shareable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Endpoint>();
        assert_send_sync::<EndpointLoad>();
    }
}
