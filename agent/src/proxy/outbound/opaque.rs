//! Opaque TCP to a mesh destination: a connection, not a request, goes through the
//! connection policy (connection limit → balancer → breaker → connect timeout →
//! mutual TLS to a meshed endpoint → connect-failure retries). The bytes are then
//! relayed by [`crate::transport::tcp`].

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;

use crate::config::destination::Destination;
use crate::policy::balance::PickError;
use crate::policy::retry::Failure;
use crate::reason;
use crate::transport::tls::{Alpn, MaybeTls};

/// Why an opaque connection to a mesh destination was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// Connects to an endpoint of `dst` under its connection policy: the
/// connection limit, the balancer (or `pinned`, for a connection to one pod's
/// address), each endpoint's breaker (connect failures count), the connect
/// timeout, and connect-failure retries to other endpoints when the retry
/// policy allows them. The returned permit holds a connection slot.
pub async fn connect(
    dst: &Destination,
    pinned: Option<SocketAddr>,
) -> Result<(MaybeTls, Option<tokio::sync::OwnedSemaphorePermit>), Refused> {
    let slot = match dst.bulkhead.connection_limit() {
        Some(limit) => match limit.try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                debug!(dst = %dst.name, reason = reason::BULKHEAD_FULL, "connection refused: maxConnections reached");
                return Err(Refused(reason::BULKHEAD_FULL));
            }
        },
        None => None,
    };
    let attempts = match (&dst.policy.retry, pinned) {
        (Some(r), None) if r.retries_failure(Failure::Connect) => r.attempts.max(1),
        _ => 1,
    };
    let mut avoid = Vec::new();
    let mut last = Refused(reason::CONNECT_FAILED);
    for attempt in 0..attempts {
        let picked = match pinned {
            Some(addr) => dst.balancer.pick_addr(addr),
            None => dst.balancer.pick(&avoid),
        };
        let picked = match picked {
            Ok(p) => p,
            Err(PickError::NoEndpoints) => return Err(Refused(reason::NO_ENDPOINTS)),
            Err(PickError::AllOpen { .. }) if attempt == 0 => {
                debug!(dst = %dst.name, reason = reason::CIRCUIT_OPEN, "connection refused: every endpoint's breaker is open");
                return Err(Refused(reason::CIRCUIT_OPEN));
            }
            Err(PickError::AllOpen { .. }) => return Err(last),
        };
        let (endpoint, permit, _load) = picked.into_parts();
        let addr = endpoint.addr;
        match tokio::time::timeout(dst.policy.timeouts.connect, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                if let Err(error) = stream.set_nodelay(true) {
                    debug!(%error, "cannot set TCP_NODELAY");
                }
                let Some((tls, expected)) = dst.upstream.mesh_to(addr) else {
                    permit.success();
                    return Ok((MaybeTls::Plain(stream), slot));
                };
                match tls.connect(stream, addr, &expected, Alpn::Opaque).await {
                    Ok(io) => {
                        permit.success();
                        return Ok((MaybeTls::Tls(Box::new(io)), slot));
                    }
                    // Counted and logged by the TLS layer.
                    Err(_) => {
                        permit.failure();
                        last = Refused(reason::CONNECT_FAILED);
                    }
                }
            }
            Ok(Err(error)) => {
                debug!(dst = %dst.name, endpoint = %addr, %error, attempt, "connect failed");
                permit.failure();
                last = Refused(reason::CONNECT_FAILED);
            }
            Err(_) => {
                debug!(dst = %dst.name, endpoint = %addr, attempt, "connect timed out");
                permit.failure();
                last = Refused(reason::TIMEOUT);
            }
        }
        avoid.push(addr);
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bulwark_proto::v1;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::policy::breaker::BreakerState;

    fn secs(s: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    }

    /// A destination over `endpoints` that trips after 2 connect failures, may
    /// retry a connect failure once, and holds at most `max_connections`.
    fn destination(endpoints: &[SocketAddr], max_connections: u32) -> Destination {
        let metrics = Metrics::new(Arc::new(arc_swap::ArcSwap::from_pointee(Config::default())));
        let port = v1::ServicePort {
            port: 7000,
            app_protocol: "tcp".into(),
            endpoints: endpoints
                .iter()
                .map(|a| v1::Endpoint {
                    address: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            resilience: Some(v1::ResiliencePolicy {
                retry: Some(v1::Retry {
                    attempts: 2,
                    retry_on: vec!["connect-failure".into()],
                    ..Default::default()
                }),
                circuit_breaker: Some(v1::CircuitBreaker {
                    consecutive_failures: 2,
                    open_duration: secs(60),
                    max_open_duration: secs(60),
                    half_open_probes: 1,
                    ..Default::default()
                }),
                bulkhead: Some(v1::Bulkhead {
                    max_connections,
                    ..Default::default()
                }),
                load_balancer: Some(v1::LoadBalancer {
                    strategy: 1,
                    hash_on: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Destination::build("db.test:7000", &port, None, &metrics).unwrap()
    }

    /// An address where nothing listens (connections are refused at once).
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn connect_failures_go_to_another_endpoint_and_trip_the_breaker() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed_port().await;
        let dst = destination(&[dead, live.local_addr().unwrap()], 0);
        // Round robin starts at the dead endpoint: each connect fails there and is
        // retried on the live one.
        for _ in 0..2 {
            let (stream, _) = connect(&dst, None).await.unwrap();
            assert_eq!(
                stream.tcp().peer_addr().unwrap(),
                live.local_addr().unwrap()
            );
        }
        let dead_ep = dst
            .balancer
            .endpoints()
            .iter()
            .find(|e| e.addr == dead)
            .unwrap();
        assert_eq!(
            dead_ep.breaker.state(),
            BreakerState::Open,
            "two connect failures trip it"
        );
        // With its breaker open the dead endpoint gets no more connection attempts.
        for _ in 0..3 {
            let (stream, _) = connect(&dst, None).await.unwrap();
            assert_eq!(
                stream.tcp().peer_addr().unwrap(),
                live.local_addr().unwrap()
            );
        }
    }

    #[tokio::test]
    async fn a_pinned_dead_endpoint_is_refused_then_circuit_open() {
        let dead = closed_port().await;
        let dst = destination(&[dead], 0);
        assert_eq!(
            connect(&dst, Some(dead)).await.unwrap_err(),
            Refused(reason::CONNECT_FAILED)
        );
        assert_eq!(
            connect(&dst, Some(dead)).await.unwrap_err(),
            Refused(reason::CONNECT_FAILED)
        );
        assert_eq!(
            connect(&dst, Some(dead)).await.unwrap_err(),
            Refused(reason::CIRCUIT_OPEN)
        );
        let empty = destination(&[], 0);
        assert_eq!(
            connect(&empty, None).await.unwrap_err(),
            Refused(reason::NO_ENDPOINTS)
        );
    }

    #[tokio::test]
    async fn max_connections_is_a_bulkhead_on_open_connections() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = destination(&[live.local_addr().unwrap()], 1);
        let first = connect(&dst, None).await.unwrap();
        assert_eq!(
            connect(&dst, None).await.unwrap_err(),
            Refused(reason::BULKHEAD_FULL)
        );
        drop(first);
        assert!(
            connect(&dst, None).await.is_ok(),
            "the slot is free once the connection closes"
        );
    }
}
