//! One outbound destination (a service port): its policy and runtime state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulwark_proto::v1;
use serde::Serialize;

use crate::metrics::{Direction, DstMetrics, Metrics};
use crate::policy::balance::{Balancer, HashOn, Strategy};
use crate::policy::breaker::{BreakerConfig, CircuitBreaker};
use crate::policy::bulkhead::{Bulkhead, BulkheadConfig};
use crate::policy::endpoint::Endpoint;
use crate::policy::ratelimit::RateLimits;
use crate::policy::retry::RetryPolicy;
use crate::policy::retry::budget::RetryBudget;
use crate::policy::route::RouteTable;
use crate::policy::shard::ShardRouter;
use crate::transport::protocol::Hint;
use crate::transport::tls::MeshTls;
use crate::transport::upstream::Upstream;

/// Connect timeout when the policy sets none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = bulwark_proto::defaults::DEFAULT_CONNECT_TIMEOUT;

/// A snapshot's service port that cannot be enforced.
#[derive(Debug, thiserror::Error)]
pub enum InvalidDestination {
    /// An endpoint address that is not `ip:port`.
    #[error("endpoint address {0:?} is not ip:port")]
    Address(String),
    /// An endpoint identity that is not a SPIFFE ID.
    #[error("endpoint identity {0:?} is not a spiffe:// ID")]
    Identity(String),
    /// Port out of range.
    #[error("port {0} is out of range")]
    Port(u32),
    /// Bad timeouts.
    #[error("timeouts: {0}")]
    Timeout(#[source] crate::policy::duration::InvalidDuration),
    /// Bad retry section.
    #[error(transparent)]
    Retry(#[from] crate::policy::retry::InvalidRetry),
    /// Bad breaker section.
    #[error("circuit_breaker: {0}")]
    Breaker(#[from] crate::policy::breaker::InvalidBreaker),
    /// Bad bulkhead section.
    #[error("bulkhead: {0}")]
    Bulkhead(#[from] crate::policy::bulkhead::InvalidBulkhead),
    /// Bad load balancer section.
    #[error("load_balancer: {0}")]
    Balancer(#[from] crate::policy::balance::InvalidStrategy),
    /// An HTTPRoute rule that cannot be enforced.
    #[error(transparent)]
    Route(#[from] crate::policy::route::InvalidRoute),
    /// A shard topology that cannot be enforced.
    #[error("shard topology {source_name:?}: {error}")]
    Shard {
        /// `namespace/name` of the topology.
        source_name: String,
        /// Why.
        error: crate::policy::shard::InvalidTopology,
    },
}

/// Timeouts of a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// The whole request, every try and backoff included.
    #[serde(with = "crate::policy::duration::opt_duration_ms")]
    pub request: Option<Duration>,
    /// TCP connect to one endpoint.
    #[serde(with = "crate::policy::duration::duration_ms")]
    pub connect: Duration,
}

/// The validated policy of one service port.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// `namespace/name` of the ResiliencePolicy, if one applies.
    pub source: Option<String>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Retries, if enabled.
    pub retry: Option<RetryPolicy>,
    /// Per-endpoint circuit breaking, if enabled.
    pub breaker: Option<BreakerConfig>,
    /// The bulkhead, if enabled.
    pub bulkhead: Option<BulkheadConfig>,
    /// How endpoints are picked.
    pub strategy: Strategy,
    /// For consistent hashing: what identifies a session.
    pub hash_on: Option<HashOn>,
}

impl TryFrom<Option<&v1::ResiliencePolicy>> for Policy {
    type Error = InvalidDestination;

    fn try_from(p: Option<&v1::ResiliencePolicy>) -> Result<Self, InvalidDestination> {
        let Some(p) = p else {
            return Ok(Self {
                source: None,
                timeouts: Timeouts {
                    request: None,
                    connect: DEFAULT_CONNECT_TIMEOUT,
                },
                retry: None,
                breaker: None,
                bulkhead: None,
                strategy: Strategy::try_from(&v1::LoadBalancer::default())?,
                hash_on: None,
            });
        };
        let dur = |d: Option<&prost_types::Duration>| {
            d.map(crate::policy::duration::duration)
                .transpose()
                .map_err(InvalidDestination::Timeout)
        };
        let t = p.timeouts.unwrap_or_default();
        Ok(Self {
            source: Some(p.source.clone()).filter(|s| !s.is_empty()),
            timeouts: Timeouts {
                request: dur(t.request.as_ref())?,
                connect: dur(t.connect.as_ref())?.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            },
            retry: p.retry.as_ref().map(RetryPolicy::try_from).transpose()?,
            breaker: p
                .circuit_breaker
                .as_ref()
                .map(BreakerConfig::try_from)
                .transpose()?,
            bulkhead: p
                .bulkhead
                .as_ref()
                .map(BulkheadConfig::try_from)
                .transpose()?,
            strategy: Strategy::try_from(&p.load_balancer.clone().unwrap_or_default())?,
            hash_on: p
                .load_balancer
                .as_ref()
                .and_then(|lb| lb.hash_on.as_ref())
                .map(HashOn::try_from)
                .transpose()?,
        })
    }
}

/// A service port's policy and the state that enforces it.
#[derive(Debug)]
pub struct Destination {
    /// `name.namespace:port`, the metrics label.
    pub name: Arc<str>,
    /// Use HTTP/2 to the endpoints even for HTTP/1 clients (appProtocol h2c/grpc/http2).
    pub http2: bool,
    /// The protocol the port declares (`appProtocol`), for redirected connections.
    pub hint: Hint,
    /// The validated policy.
    pub policy: Policy,
    /// Picks endpoints; each endpoint carries its breaker.
    pub balancer: Balancer,
    /// Limits concurrency to this destination.
    pub bulkhead: Arc<Bulkhead>,
    /// Bounds retries, if a budget is set.
    pub budget: Option<Arc<RetryBudget>>,
    /// Pooled clients.
    pub upstream: Upstream,
    /// Request-path metrics.
    pub metrics: DstMetrics,
    /// Shard-aware routing, if the service is sharded.
    pub shards: Option<ShardRouter>,
    /// HTTPRoute rules attached to the port (traffic splitting); empty: none.
    pub routes: RouteTable,
    /// Outbound rate limits on requests to the port (set by the config, which owns the
    /// rate-limit store); empty: none.
    pub rate_limits: RateLimits,
}

impl Destination {
    /// Builds a destination from a snapshot's service port, reusing the state of
    /// `previous` (breakers, bulkhead, budget, connection pools) where its config
    /// is unchanged, so that a config push neither resets breakers nor drops pools.
    /// Plaintext to every endpoint (see [`Destination::build_with_tls`]).
    pub fn build(
        name: &str,
        port: &v1::ServicePort,
        previous: Option<&Destination>,
        metrics: &Metrics,
    ) -> Result<Self, InvalidDestination> {
        Self::build_with_tls(name, port, previous, metrics, &Arc::new(MeshTls::default()))
    }

    /// [`Destination::build`], speaking mutual TLS with `tls` to the endpoints that
    /// carry an identity.
    pub fn build_with_tls(
        name: &str,
        port: &v1::ServicePort,
        previous: Option<&Destination>,
        metrics: &Metrics,
        tls: &Arc<MeshTls>,
    ) -> Result<Self, InvalidDestination> {
        let policy = Policy::try_from(port.resilience.as_ref())?;
        // Endpoints without a breaker policy get one that never trips (and takes no
        // lock), so the balancer has a single code path.
        let breaker_config = policy
            .breaker
            .clone()
            .unwrap_or_else(BreakerConfig::disabled);
        let mut endpoints = Vec::with_capacity(port.endpoints.len());
        // Which of `endpoints` are the previous version's (their pools may need a reset).
        let mut kept = Vec::with_capacity(port.endpoints.len());
        let mut meshed = std::collections::HashMap::new();
        for ep in &port.endpoints {
            let addr: SocketAddr = ep
                .address
                .parse()
                .map_err(|_| InvalidDestination::Address(ep.address.clone()))?;
            if !ep.identity.is_empty() {
                if !ep.identity.starts_with("spiffe://") {
                    return Err(InvalidDestination::Identity(ep.identity.clone()));
                }
                meshed.insert(addr, Arc::<str>::from(ep.identity.as_str()));
            }
            let labels = ep
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let weight = ep.weight.max(1);
            let reused = previous.and_then(|prev| {
                prev.balancer.endpoints().iter().find(|old| {
                    old.addr == addr
                        && old.labels == labels
                        && old.weight == weight
                        && *old.breaker.config() == breaker_config
                })
            });
            kept.push(reused.is_some());
            endpoints.push(match reused {
                Some(old) => Arc::clone(old),
                None => {
                    let breaker_name: Arc<str> = format!("{name} {addr}").into();
                    Arc::new(Endpoint::new(
                        addr,
                        labels,
                        weight,
                        Arc::new(CircuitBreaker::new(breaker_config.clone(), breaker_name)),
                    ))
                }
            });
        }
        let bulkhead = match previous {
            Some(prev) if prev.policy.bulkhead == policy.bulkhead => Arc::clone(&prev.bulkhead),
            _ => Arc::new(match &policy.bulkhead {
                Some(cfg) => Bulkhead::new(cfg.clone()),
                None => Bulkhead::unlimited(),
            }),
        };
        let budget_config = policy.retry.as_ref().and_then(|r| r.budget.clone());
        let budget = match (previous, &budget_config) {
            (_, None) => None,
            (Some(prev), Some(cfg))
                if prev.policy.retry.as_ref().and_then(|r| r.budget.as_ref()) == Some(cfg) =>
            {
                prev.budget.clone()
            }
            (_, Some(cfg)) => Some(Arc::new(RetryBudget::new(cfg.clone()))),
        };
        let upstream = match previous {
            Some(prev)
                if Arc::ptr_eq(&prev.bulkhead, &bulkhead)
                    && prev.upstream.connect_timeout() == policy.timeouts.connect
                    && prev.upstream.is_meshed() == tls.enabled() =>
            {
                prev.upstream.clone()
            }
            _ if tls.enabled() => Upstream::meshed(
                policy.timeouts.connect,
                bulkhead.connection_limit(),
                Arc::clone(tls),
            ),
            _ => Upstream::new(policy.timeouts.connect, bulkhead.connection_limit()),
        };
        if let Some(prev) = previous {
            // Pooled connections made under other settings (TLS on or off, another
            // connection limit) or to a peer expected to prove another identity are
            // closed; requests in flight on them finish.
            let same = prev.upstream.same(&upstream);
            for (endpoint, _) in endpoints.iter().zip(&kept).filter(|(_, kept)| **kept) {
                let expected = upstream
                    .is_meshed()
                    .then(|| meshed.get(&endpoint.addr))
                    .flatten();
                if !same || prev.upstream.expected(endpoint.addr).as_ref() != expected {
                    endpoint.pool.reset();
                }
            }
        }
        upstream.set_meshed(meshed);
        let http2 = matches!(
            port.app_protocol.as_str(),
            "http2" | "grpc" | "h2c" | "kubernetes.io/h2c"
        );
        let shards = port
            .shard_topology
            .as_ref()
            .map(|t| {
                ShardRouter::build(
                    t,
                    name,
                    policy.strategy,
                    &endpoints,
                    previous.and_then(|p| p.shards.as_ref()),
                    metrics,
                )
                .map_err(|error| InvalidDestination::Shard {
                    source_name: t.source.clone(),
                    error,
                })
            })
            .transpose()?;
        let routes = RouteTable::build(&port.routes, name, previous.map(|p| &p.routes), metrics)?;
        Ok(Self {
            name: name.into(),
            shards,
            routes,
            rate_limits: RateLimits::default(),
            http2,
            hint: Hint::from_app_protocol(&port.app_protocol),
            balancer: Balancer::new(policy.strategy, endpoints),
            bulkhead,
            budget,
            upstream,
            // Handles made once per destination name: the series live on across pushes.
            metrics: match previous {
                Some(prev) if &*prev.name == name => prev.metrics.clone(),
                _ => metrics.destination(Direction::Outbound, name),
            },
            policy,
        })
    }
}
