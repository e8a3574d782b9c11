//! The config in force: every destination's runtime state and the inbound
//! limits, built from a control-plane snapshot and swapped in atomically.

pub mod destination;
pub mod subscription;
pub mod target;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bulwark_proto::v1;
use serde_json::{Value, json};

use crate::config::destination::{Destination, InvalidDestination};
use crate::config::target::Target;
use crate::metrics::{
    DestinationState, EndpointState, Metrics, PolicyState, SharedLimitState, StateSnapshot,
    StoreState,
};
use crate::policy::authorization::Authorization;
use crate::policy::breaker::BreakerState;
use crate::policy::peer_authentication::PeerAuthentication;
use crate::policy::ratelimit::store::Store;
use crate::policy::ratelimit::{RateLimitConfig, RateLimitKey, RateLimiter, RateLimits};
use crate::transport::tls::MeshTls;
use std::sync::atomic::Ordering;

/// A snapshot the agent cannot apply (it NACKs it and keeps the previous config).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A service port cannot be enforced.
    #[error("service {service}: {source}")]
    Destination {
        /// `name.namespace:port`.
        service: String,
        /// Why.
        #[source]
        source: InvalidDestination,
    },
    /// A service port number out of range.
    #[error("service {service}: port {port} is out of range")]
    Port {
        /// `name.namespace`.
        service: String,
        /// The bad port.
        port: u32,
    },
    /// A cluster IP that is not an IP address.
    #[error("service {service}: cluster IP {ip:?} is not an IP address")]
    ClusterIp {
        /// `name.namespace`.
        service: String,
        /// The bad value.
        ip: String,
    },
    /// A rate limit that cannot be enforced.
    #[error("{place} rate limit {name:?}: {source}")]
    RateLimit {
        /// `inbound`, or the outbound service port (`name.namespace:port`).
        place: String,
        /// The limit's name.
        name: String,
        /// Why.
        #[source]
        source: crate::policy::ratelimit::InvalidRateLimit,
    },
    /// An authorization policy cannot be enforced.
    #[error("inbound authorization: {0}")]
    Authorization(#[from] crate::policy::authorization::InvalidAuthorization),
    /// A delta made for another version than the one in force (a message was missed
    /// or refused); the control plane answers the NACK with the whole view.
    #[error("delta onto version {base} but version {held} is in force: waiting for the whole view")]
    DeltaBase {
        /// `Snapshot.base_version`.
        base: u64,
        /// The version in force.
        held: u64,
    },
}

/// Destinations by namespace, then name, then port. Nested maps let a lookup
/// borrow the request's host instead of allocating a key.
type ByName = Lookup<String, Lookup<String, Vec<(u16, Arc<Destination>)>>>;

/// A map looked up on every request: hashed with foldhash, not std's SipHash (two
/// lookups by name cost ~320 instructions a request with SipHash). Its keys come from
/// the control plane, never from a request, so SipHash's defence against chosen
/// colliding keys buys nothing here; foldhash is still seeded per process.
type Lookup<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A service's place in the config: (namespace, name).
type ServiceKey = (String, String);

/// One service of the config as it was built: what deltas replace or remove whole.
#[derive(Debug)]
struct AppliedService {
    /// `Service.version` (0 from a control plane that does not send it).
    version: u64,
    cluster_ips: Vec<IpAddr>,
    /// A destination per port, in the snapshot's port order.
    ports: Vec<(u16, Arc<Destination>)>,
}

/// The whole config in force.
#[derive(Debug, Default)]
pub struct Config {
    /// The snapshot version this config came from (0: none yet).
    pub version: u64,
    /// Every service, by namespace then name: the source the lookups below are built
    /// from, and what a delta changes.
    services: BTreeMap<ServiceKey, Arc<AppliedService>>,
    /// The inbound part the inbound policies were built from, kept for a delta that
    /// leaves it unchanged.
    inbound_source: Arc<v1::Inbound>,
    destinations: Vec<Arc<Destination>>,
    by_name: ByName,
    by_addr: Lookup<SocketAddr, Arc<Destination>>,
    by_endpoint: Lookup<SocketAddr, Arc<Destination>>,
    /// Inbound rate limits.
    pub inbound: RateLimits,
    /// Who may call this pod.
    pub authorization: Authorization,
    /// Which of the pod's ports refuse plaintext callers.
    pub peer_authentication: PeerAuthentication,
    /// Mutual TLS to meshed endpoints (carried from config to config).
    pub tls: Arc<MeshTls>,
    /// The rate-limit store of Shared limits, if the agent has one (carried from config
    /// to config).
    pub store: Option<Arc<Store>>,
    limiters: Vec<Arc<RateLimiter>>,
}

impl Config {
    /// The config before the first snapshot: no destinations, and `tls` for the
    /// meshed endpoints of every later one.
    pub fn with_tls(tls: Arc<MeshTls>) -> Self {
        Config {
            tls,
            ..Config::default()
        }
    }

    /// The config before the first snapshot, with `tls` and the rate-limit `store` for
    /// every later one.
    pub fn with_tls_and_store(tls: Arc<MeshTls>, store: Option<Arc<Store>>) -> Self {
        Config {
            tls,
            store,
            ..Config::default()
        }
    }

    /// Builds the config of `snapshot`, reusing `previous`'s runtime state where
    /// unchanged. A whole snapshot replaces `previous`; a delta (protocol 6) changes it,
    /// and must have been made for `previous.version`. Either way the result is a new
    /// config to swap in whole, and on error `previous` stays as it is.
    pub fn build(
        snapshot: &v1::Snapshot,
        previous: &Config,
        metrics: &Metrics,
    ) -> Result<Self, ConfigError> {
        let delta = bulwark_proto::delta::is_delta(snapshot);
        if delta && snapshot.base_version != previous.version {
            return Err(ConfigError::DeltaBase {
                base: snapshot.base_version,
                held: previous.version,
            });
        }
        let mut services = if delta {
            // Unchanged services are shared with `previous`, destinations and all.
            previous.services.clone()
        } else {
            BTreeMap::new()
        };
        for gone in &snapshot.removed_services {
            services.remove(&(gone.namespace.clone(), gone.name.clone()));
        }
        for svc in &snapshot.services {
            let applied = AppliedService::build(svc, previous, metrics)?;
            services.insert((svc.namespace.clone(), svc.name.clone()), Arc::new(applied));
        }
        let inbound_source = match &snapshot.inbound {
            Some(inbound) => Arc::new(inbound.clone()),
            None if delta => Arc::clone(&previous.inbound_source),
            None => Arc::default(),
        };
        let mut config = Config {
            version: snapshot.version,
            tls: Arc::clone(&previous.tls),
            store: previous.store.clone(),
            services,
            inbound_source,
            ..Config::default()
        };
        config.index();
        config.build_inbound(previous)?;
        Ok(config)
    }

    /// Fills the lookups from `services`, in their order (namespace, then name).
    fn index(&mut self) {
        for ((namespace, name), svc) in &self.services {
            for (number, dst) in &svc.ports {
                for ip in &svc.cluster_ips {
                    self.by_addr
                        .insert(SocketAddr::new(*ip, *number), Arc::clone(dst));
                }
                // A pod address belongs to the first service port that lists it.
                for ep in dst.balancer.endpoints() {
                    self.by_endpoint
                        .entry(ep.addr)
                        .or_insert_with(|| Arc::clone(dst));
                }
                self.by_name
                    .entry(namespace.clone())
                    .or_default()
                    .entry(name.clone())
                    .or_default()
                    .push((*number, Arc::clone(dst)));
                self.destinations.push(Arc::clone(dst));
            }
        }
    }

    /// Builds the inbound policies from `inbound_source`.
    fn build_inbound(&mut self, previous: &Config) -> Result<(), ConfigError> {
        self.limiters = limiters(
            "inbound",
            &self.inbound_source.rate_limits,
            &previous.limiters,
            self.store.as_ref(),
        )?;
        self.inbound = RateLimits::new(self.limiters.clone());
        self.authorization = Authorization::try_from(self.inbound_source.authorization.as_slice())?;
        self.peer_authentication =
            PeerAuthentication::from_proto(self.inbound_source.peer_authentication.as_ref());
        Ok(())
    }

    /// Every destination.
    pub fn destinations(&self) -> &[Arc<Destination>] {
        &self.destinations
    }

    /// The inbound rate limiters (for housekeeping).
    pub fn limiters(&self) -> &[Arc<RateLimiter>] {
        &self.limiters
    }

    fn lookup_name(&self, name: &str, namespace: &str, port: u16) -> Option<&Arc<Destination>> {
        self.by_name
            .get(namespace)?
            .get(name)?
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, d)| d)
    }

    /// The destination of an HTTPRoute backend, if the snapshot has that service port.
    pub fn backend(&self, key: &crate::policy::route::BackendKey) -> Option<&Arc<Destination>> {
        self.lookup_name(&key.name, &key.namespace, key.port)
    }

    /// The destination a target names, if it is in the mesh. `namespace` is the
    /// agent's own, for short names.
    pub fn lookup(&self, target: Target<'_>, namespace: &str) -> Option<&Arc<Destination>> {
        match target {
            Target::Name {
                name,
                namespace: ns,
                port,
            } => self.lookup_name(name, ns.unwrap_or(namespace), port),
            Target::Addr(addr) => self.by_addr.get(&addr),
        }
    }

    /// The destination of a redirected connection's original address: a
    /// Service's cluster IP and port, or one of its endpoints (a pod's address,
    /// returned as the endpoint to pin the connection to).
    pub fn lookup_original(
        &self,
        addr: SocketAddr,
    ) -> Option<(Arc<Destination>, Option<SocketAddr>)> {
        if let Some(dst) = self.by_addr.get(&addr) {
            return Some((Arc::clone(dst), None));
        }
        self.by_endpoint
            .get(&addr)
            .map(|dst| (Arc::clone(dst), Some(addr)))
    }

    /// The config as JSON for the admin `/config` page.
    pub fn to_json(&self) -> Value {
        let destinations: Vec<Value> = self
            .destinations
            .iter()
            .map(|d| {
                let p = &d.policy;
                json!({
                    "name": d.name.as_ref(),
                    "http2": d.http2,
                    "protocol": format!("{:?}", d.hint).to_lowercase(),
                    "policy": p.source,
                    "timeouts": p.timeouts,
                    "retry": p.retry.as_ref().map(|r| json!({
                        "attempts": r.attempts,
                        "perTryTimeout": r.per_try_timeout.map(ms),
                        "backoff": {
                            "base": ms(r.backoff.base),
                            "max": ms(r.backoff.max),
                        },
                        "onConnectFailure": r.on_connect_failure,
                        "onReset": r.on_reset,
                        "on5xx": r.on_5xx,
                        "onGatewayError": r.on_gateway_error,
                        "statusCodes": r.status_codes,
                        "grpcCodes": r.grpc_codes,
                        "nonIdempotent": r.non_idempotent,
                        "budget": r.budget.as_ref().map(|b| json!({
                            "ratio": b.ratio,
                            "minPerSecond": b.min_per_second,
                            "window": ms(b.window),
                        })),
                        "maxBodyBytes": r.max_body_bytes,
                    })),
                    "circuitBreaker": p.breaker.as_ref().map(|b| json!({
                        "consecutiveFailures": b.consecutive_failures,
                        "failureRatio": b.failure_ratio.as_ref().map(|r| json!({
                            "threshold": r.threshold,
                            "minRequests": r.min_requests,
                            "window": ms(r.window),
                        })),
                        "openDuration": ms(b.open_duration),
                        "maxOpenDuration": ms(b.max_open_duration),
                        "halfOpenProbes": b.half_open_probes,
                    })),
                    "bulkhead": p.bulkhead.as_ref().map(|b| json!({
                        "maxConcurrentRequests": b.max_concurrent_requests,
                        "maxPending": b.max_pending,
                        "queueTimeout": ms(b.queue_timeout),
                        "maxConnections": b.max_connections,
                    })),
                    "bulkheadState": {
                        "inFlight": d.bulkhead.in_flight(),
                        "queued": d.bulkhead.queued(),
                        "rejected": d.bulkhead.rejected(),
                    },
                    "loadBalancer": p.strategy.as_str(),
                    "shardTopology": d.shards.as_ref().map(crate::policy::shard::ShardRouter::to_json),
                    "routes": d.routes.to_json(|key| self.backend(key).is_some()),
                    "rateLimits": d.rate_limits.limiters().iter().map(|l| limit_json(l.config())).collect::<Vec<_>>(),
                    "endpoints": d.balancer.endpoints().iter().map(|e| json!({
                        "address": e.addr.to_string(),
                        "labels": e.labels,
                        "weight": e.weight,
                        "breaker": match e.breaker.state() {
                            BreakerState::Closed => "closed",
                            BreakerState::Open => "open",
                            BreakerState::HalfOpen => "half-open",
                        },
                        "trips": e.breaker.trips(),
                        "inFlight": e.in_flight(),
                        "identity": d.upstream.expected(e.addr).as_deref(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let limits: Vec<Value> = self
            .limiters
            .iter()
            .map(|l| limit_json(l.config()))
            .collect();
        json!({
            "version": self.version,
            // The version of each service in force (`Service.version`): what a delta
            // changed, and what the control plane's index says for comparison.
            "services": self.services.iter().map(|((namespace, name), svc)| json!({
                "namespace": namespace,
                "name": name,
                "version": svc.version,
            })).collect::<Vec<_>>(),
            "destinations": destinations,
            "rateLimitStore": self.store.as_ref().map(|s| json!({
                "address": s.address(),
                "available": s.available(),
                "unavailableReason": s.unavailable_reason(),
            })),
            "inbound": {
                "rateLimits": limits,
                "peerAuthentication": self.peer_authentication.to_json(),
            },
        })
    }
}

/// The limiters of `protos` (at `place`, for errors), keeping the buckets of an unchanged
/// limit from `previous`: a config push for some other reason must not hand every client
/// a fresh burst.
fn limiters(
    place: &str,
    protos: &[v1::RateLimit],
    previous: &[Arc<RateLimiter>],
    store: Option<&Arc<Store>>,
) -> Result<Vec<Arc<RateLimiter>>, ConfigError> {
    let mut limiters = Vec::with_capacity(protos.len());
    for limit in protos {
        let cfg = RateLimitConfig::try_from(limit).map_err(|source| ConfigError::RateLimit {
            place: place.to_owned(),
            name: limit.name.clone(),
            source,
        })?;
        let limiter = match previous.iter().find(|old| *old.config() == cfg) {
            Some(old) => Arc::clone(old),
            None => {
                if cfg.shared.is_some() && store.is_none() {
                    tracing::warn!(
                        policy = %cfg.source,
                        limit = %cfg.name,
                        "Shared rate limit but the agent has no rate-limit store (--rate-limit-store-url): its onStoreUnavailable mode applies to every request"
                    );
                }
                Arc::new(RateLimiter::with_store(cfg, store.cloned()))
            }
        };
        limiters.push(limiter);
    }
    Ok(limiters)
}

/// A limit as `/config` shows it.
fn limit_json(c: &RateLimitConfig) -> Value {
    json!({
        "policy": c.source,
        "name": c.name,
        "ports": c.ports,
        "key": match &c.key {
            RateLimitKey::None => json!({"type": "None"}),
            RateLimitKey::ClientAddress => json!({"type": "ClientAddress"}),
            RateLimitKey::ClientIdentity => json!({"type": "ClientIdentity"}),
            RateLimitKey::Header(h) => json!({"type": "Header", "header": h.as_str()}),
        },
        "requests": c.requests.get(),
        "periodMs": c.period.as_millis() as u64,
        "burst": c.burst.get(),
        "scope": c.scope.as_str(),
        "split": c.split,
        "shared": c.shared.as_ref().map(|s| json!({
            "requests": s.requests,
            "periodMs": s.period.as_millis() as u64,
            "burst": s.burst,
            "onStoreUnavailable": s.mode.as_str(),
            "bucket": s.bucket,
        })),
        "cost": {
            "default": c.cost.default,
            "rules": c.cost.rules.iter().map(|r| json!({
                "method": r.method.as_ref().map(http::Method::as_str),
                "pathPrefix": r.path_prefix,
                "cost": r.cost,
            })).collect::<Vec<_>>(),
            "responseHeader": c.cost.response_header.as_ref().map(http::HeaderName::as_str),
        },
        "responseHeaders": c.response_headers,
    })
}

// === impl AppliedService ===

impl AppliedService {
    /// Builds `svc`'s destinations, reusing the runtime state of `previous`'s.
    fn build(svc: &v1::Service, previous: &Config, metrics: &Metrics) -> Result<Self, ConfigError> {
        let qualified = format!("{}.{}", svc.name, svc.namespace);
        let mut cluster_ips = Vec::with_capacity(svc.cluster_ips.len());
        for ip in &svc.cluster_ips {
            let parsed: IpAddr = ip.parse().map_err(|_| ConfigError::ClusterIp {
                service: qualified.clone(),
                ip: ip.clone(),
            })?;
            cluster_ips.push(parsed);
        }
        let mut ports = Vec::with_capacity(svc.ports.len());
        for port in &svc.ports {
            let number = u16::try_from(port.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ConfigError::Port {
                    service: qualified.clone(),
                    port: port.port,
                })?;
            let name = format!("{qualified}:{number}");
            let prev = previous.lookup_name(&svc.name, &svc.namespace, number);
            let mut dst = Destination::build_with_tls(
                &name,
                port,
                prev.map(AsRef::as_ref),
                metrics,
                &previous.tls,
            )
            .map_err(|source| ConfigError::Destination {
                service: name.clone(),
                source,
            })?;
            if !port.rate_limits.is_empty() {
                let old = prev.map_or(&[][..], |p| p.rate_limits.limiters());
                dst.rate_limits = RateLimits::new(limiters(
                    &name,
                    &port.rate_limits,
                    old,
                    previous.store.as_ref(),
                )?);
            }
            ports.push((number, Arc::new(dst)));
        }
        Ok(AppliedService {
            version: svc.version,
            cluster_ips,
            ports,
        })
    }
}

impl PolicyState for ArcSwap<Config> {
    fn policy_state(&self) -> StateSnapshot {
        let config = self.load();
        let mut state = StateSnapshot::default();
        for dst in config.destinations() {
            for ep in dst.balancer.endpoints() {
                state.endpoints.push(EndpointState {
                    dst: Arc::clone(&dst.name),
                    endpoint: ep.addr,
                    breaker: ep.breaker.state().as_gauge(),
                    trips: ep.breaker.trips(),
                });
            }
            state.destinations.push(DestinationState {
                dst: Arc::clone(&dst.name),
                in_flight: dst.bulkhead.in_flight(),
                queued: dst.bulkhead.queued(),
            });
        }
        state.store = config.store.as_ref().map(|store| StoreState {
            up: store.available(),
            round_trips: store.counters().round_trips.load(Ordering::Relaxed),
            errors: store.counters().errors.load(Ordering::Relaxed),
        });
        let outbound = config
            .destinations()
            .iter()
            .flat_map(|d| d.rate_limits.limiters().iter());
        for limiter in config.limiters().iter().chain(outbound) {
            if let Some(shared) = limiter.shared_state() {
                state.shared_limits.push(SharedLimitState {
                    policy: limiter.config().source.clone(),
                    limit: limiter.config().name.clone(),
                    mode: shared.mode.as_str(),
                    active: !shared.available,
                    decisions: shared.fallbacks,
                });
            }
        }
        state
    }
}

/// A duration as `/config` shows it: `"250ms"`.
fn ms(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::target::classify;
    use crate::policy::breaker::BreakerState;

    fn dur(ms: i64) -> prost_types::Duration {
        prost_types::Duration {
            seconds: ms / 1000,
            nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap(),
        }
    }

    fn snapshot(version: u64, consecutive_failures: u32, address: &str) -> v1::Snapshot {
        v1::Snapshot {
            version,
            services: vec![v1::Service {
                name: "reviews".into(),
                namespace: "demo".into(),
                cluster_ips: vec!["10.96.0.10".into()],
                version,
                ports: vec![v1::ServicePort {
                    name: "http".into(),
                    port: 80,
                    endpoints: vec![v1::Endpoint {
                        address: address.into(),
                        ..Default::default()
                    }],
                    resilience: Some(v1::ResiliencePolicy {
                        source: "demo/reviews".into(),
                        circuit_breaker: Some(v1::CircuitBreaker {
                            consecutive_failures,
                            open_duration: Some(dur(5000)),
                            max_open_duration: Some(dur(60000)),
                            half_open_probes: 1,
                            ..Default::default()
                        }),
                        bulkhead: Some(v1::Bulkhead {
                            max_concurrent_requests: 2,
                            max_pending: 0,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            }],
            inbound: Some(v1::Inbound {
                authorization: Vec::new(),
                peer_authentication: None,
                rate_limits: vec![v1::RateLimit {
                    source: "demo/frontend".into(),
                    name: "total".into(),
                    key: Some(v1::RateLimitKey {
                        kind: Some(v1::rate_limit_key::Kind::None(v1::Empty {})),
                    }),
                    requests: 1,
                    period: Some(dur(600_000)),
                    burst: 1,
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }
    }

    fn metrics() -> Metrics {
        Metrics::new(Arc::new(arc_swap::ArcSwap::from_pointee(Config::default())))
    }

    #[test]
    fn a_push_keeps_connection_pools_unless_the_connection_settings_change() {
        let metrics = metrics();
        let with_connect = |version, ms| {
            let mut s = snapshot(version, 1, "10.0.0.1:8080");
            let policy = s.services[0].ports[0].resilience.as_mut().unwrap();
            policy.timeouts = Some(v1::Timeouts {
                connect: Some(dur(ms)),
                ..Default::default()
            });
            s
        };
        let pool = |config: &Config| {
            let dst = config
                .lookup(classify("reviews.demo", 80).unwrap(), "x")
                .unwrap();
            let endpoint = &dst.balancer.endpoints()[0];
            (Arc::clone(&endpoint.pool), endpoint.pool.resets())
        };
        let first = Config::build(&with_connect(1, 1000), &Config::default(), &metrics).unwrap();
        let (pool1, resets1) = pool(&first);
        // Same connection settings: the same pool, kept as it is.
        let second = Config::build(&with_connect(2, 1000), &first, &metrics).unwrap();
        let (pool2, resets2) = pool(&second);
        assert!(Arc::ptr_eq(&pool1, &pool2));
        assert_eq!(resets2, resets1);
        // Another connect timeout: new clients, and the pool's connections are closed.
        let third = Config::build(&with_connect(3, 2000), &second, &metrics).unwrap();
        let (pool3, resets3) = pool(&third);
        assert!(Arc::ptr_eq(&pool1, &pool3));
        assert_eq!(resets3, resets1 + 1);
    }

    #[tokio::test]
    async fn a_push_keeps_breakers_bulkheads_and_buckets_whose_config_is_unchanged() {
        let metrics = metrics();
        let first = Config::build(
            &snapshot(1, 1, "10.0.0.1:8080"),
            &Config::default(),
            &metrics,
        )
        .unwrap();
        let dst = first
            .lookup(classify("reviews.demo", 80).unwrap(), "x")
            .unwrap();
        dst.balancer.endpoints()[0]
            .breaker
            .acquire()
            .unwrap()
            .failure();
        assert_eq!(
            dst.balancer.endpoints()[0].breaker.state(),
            BreakerState::Open
        );
        let _slot = dst.bulkhead.acquire().await.unwrap();
        let ip = "10.0.0.9".parse().unwrap();
        let headers = http::HeaderMap::new();
        assert!(first.inbound.check(8080, ip, &headers).is_ok());

        let second = Config::build(&snapshot(2, 1, "10.0.0.1:8080"), &first, &metrics).unwrap();
        let dst2 = second
            .lookup(classify("reviews.demo.svc.cluster.local", 80).unwrap(), "x")
            .unwrap();
        assert_eq!(second.version, 2);
        assert_eq!(
            dst2.balancer.endpoints()[0].breaker.state(),
            BreakerState::Open,
            "the breaker stays open"
        );
        assert_eq!(
            dst2.bulkhead.in_flight(),
            1,
            "the bulkhead still counts the request in flight"
        );
        assert!(
            second.inbound.check(8080, ip, &headers).is_err(),
            "the bucket is still empty"
        );

        // A changed breaker config starts afresh; so does a new endpoint.
        let third = Config::build(&snapshot(3, 5, "10.0.0.1:8080"), &second, &metrics).unwrap();
        let dst3 = third
            .lookup(classify("10.96.0.10", 80).unwrap(), "x")
            .unwrap();
        assert_eq!(
            dst3.balancer.endpoints()[0].breaker.state(),
            BreakerState::Closed
        );
    }

    #[test]
    fn config_json_is_structured_not_debug_text() {
        let mut snap = snapshot(1, 3, "10.0.0.1:8080");
        let resilience = snap.services[0].ports[0].resilience.as_mut().unwrap();
        resilience.retry = Some(v1::Retry {
            attempts: 3,
            backoff: Some(v1::Backoff {
                base: Some(dur(25)),
                max: Some(dur(250)),
            }),
            budget: Some(v1::RetryBudget {
                ratio: 0.2,
                min_per_second: 10,
                window: Some(dur(10_000)),
            }),
            ..Default::default()
        });
        let config = Config::build(&snap, &Config::default(), &metrics()).unwrap();
        let json = config.to_json();
        let d = &json["destinations"][0];
        assert_eq!(
            d["retry"]["backoff"],
            json!({"base": "25ms", "max": "250ms"})
        );
        assert_eq!(
            d["retry"]["budget"],
            json!({"ratio": 0.2, "minPerSecond": 10, "window": "10000ms"})
        );
        assert_eq!(d["circuitBreaker"]["consecutiveFailures"], 3);
        assert_eq!(d["circuitBreaker"]["openDuration"], "5000ms");
        assert_eq!(d["bulkhead"]["maxConcurrentRequests"], 2);
        assert_eq!(d["loadBalancer"], "LeastRequest");
        assert_eq!(d["endpoints"][0]["breaker"], "closed");
        assert_eq!(
            json["inbound"]["rateLimits"][0]["key"],
            json!({"type": "None"})
        );
        let text = json.to_string();
        assert!(
            // Debug output of a struct reads `Name { field: .. }`; compact JSON has no " {".
            !text.contains(" {"),
            "no Rust debug text: {text}"
        );
    }

    #[test]
    fn a_snapshot_it_cannot_enforce_is_an_error_naming_the_service() {
        let metrics = metrics();
        let err = Config::build(
            &snapshot(1, 1, "not-an-address"),
            &Config::default(),
            &metrics,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("reviews.demo:80"), "{text}");
        assert!(text.contains("not-an-address"), "{text}");

        let mut bad_port = snapshot(1, 1, "10.0.0.1:8080");
        bad_port.services[0].ports[0].port = 70000;
        assert!(matches!(
            Config::build(&bad_port, &Config::default(), &metrics),
            Err(ConfigError::Port { port: 70000, .. })
        ));
    }

    #[test]
    fn short_names_resolve_in_the_agents_namespace() {
        let config = Config::build(
            &snapshot(1, 1, "10.0.0.1:8080"),
            &Config::default(),
            &metrics(),
        )
        .unwrap();
        assert!(
            config
                .lookup(classify("reviews", 80).unwrap(), "demo")
                .is_some()
        );
        assert!(
            config
                .lookup(classify("reviews", 80).unwrap(), "other")
                .is_none()
        );
        assert!(
            config
                .lookup(classify("reviews.demo", 81).unwrap(), "demo")
                .is_none()
        );
    }

    /// A random whole view: some of eight services, each with one or two ports, an
    /// endpoint or two and a cluster IP, some with a retry policy.
    fn random_view(rng: &mut fastrand::Rng, version: u64) -> v1::Snapshot {
        let mut services = Vec::new();
        for n in 0..8u8 {
            if rng.u8(..4) == 0 {
                continue;
            }
            let ports = (0..1 + rng.u32(..2))
                .map(|p| v1::ServicePort {
                    name: format!("p{p}"),
                    port: 80 + p,
                    endpoints: (0..1 + rng.u8(..2))
                        .map(|e| v1::Endpoint {
                            address: format!("10.0.{n}.{}:8080", e + rng.u8(..2)),
                            ..Default::default()
                        })
                        .collect(),
                    resilience: rng.bool().then(|| v1::ResiliencePolicy {
                        source: format!("demo/svc-{n}"),
                        retry: Some(v1::Retry {
                            attempts: 1 + rng.u32(..3),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect();
            services.push(v1::Service {
                name: format!("svc-{n}"),
                namespace: "demo".into(),
                ports,
                cluster_ips: vec![format!("10.96.0.{n}")],
                version,
            });
        }
        v1::Snapshot {
            version,
            services,
            inbound: Some(
                snapshot(version, 1, "10.0.0.1:8080")
                    .inbound
                    .unwrap_or_default(),
            )
            .filter(|_| rng.bool()),
            ..Default::default()
        }
    }

    /// The delta from `from` to `to`, as the control plane would send it (services
    /// compared by content here; the control plane compares their versions).
    fn delta_between(from: &v1::Snapshot, to: &v1::Snapshot) -> v1::Snapshot {
        let find = |view: &v1::Snapshot, name: &str| {
            view.services.iter().find(|s| s.name == name).cloned()
        };
        let mut updated: Vec<v1::Service> = to
            .services
            .iter()
            .filter(|s| {
                find(from, &s.name).is_none_or(|old| {
                    v1::Service {
                        version: s.version,
                        ..old
                    } != **s
                })
            })
            .cloned()
            .collect();
        for service in &mut updated {
            service.version = to.version;
        }
        v1::Snapshot {
            version: to.version,
            base_version: from.version,
            services: updated,
            inbound: (from.inbound != to.inbound).then(|| to.inbound.clone().unwrap_or_default()),
            removed_services: from
                .services
                .iter()
                .filter(|s| find(to, &s.name).is_none())
                .map(|s| v1::ServiceRef {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    version: to.version,
                })
                .collect(),
        }
    }

    /// What a config routes: its JSON, and where each cluster IP and pod address goes.
    fn routes(config: &Config) -> (Value, Vec<(SocketAddr, String)>) {
        let mut addrs: Vec<(SocketAddr, String)> = config
            .by_addr
            .iter()
            .chain(config.by_endpoint.iter())
            .map(|(addr, dst)| (*addr, dst.name.to_string()))
            .collect();
        addrs.sort();
        (config.to_json(), addrs)
    }

    /// For random sequences of views, deltas applied one after the other (each with
    /// its changes shuffled) build the config the last view builds whole. A
    /// deterministic randomized test (fixed seeds).
    #[test]
    fn deltas_in_any_order_build_the_config_of_the_whole_view() {
        let metrics = metrics();
        for seed in 0..64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut view = random_view(&mut rng, 1);
            let mut config = Config::build(&view, &Config::default(), &metrics).unwrap();
            for version in 2..16 {
                let mut next = random_view(&mut rng, version);
                // As the control plane stamps them: an unchanged service keeps its version.
                for service in &mut next.services {
                    if let Some(old) = view.services.iter().find(|o| o.name == service.name)
                        && (v1::Service {
                            version: old.version,
                            ..service.clone()
                        }) == *old
                    {
                        service.version = old.version;
                    }
                }
                let mut delta = delta_between(&view, &next);
                rng.shuffle(&mut delta.services);
                rng.shuffle(&mut delta.removed_services);
                config = Config::build(&delta, &config, &metrics).unwrap();
                view = next;
            }
            let mut whole = view.clone();
            whole.inbound = Some(whole.inbound.unwrap_or_default());
            let fresh = Config::build(&whole, &Config::default(), &metrics).unwrap();
            assert_eq!(routes(&config), routes(&fresh), "seed {seed}");
        }
    }

    #[test]
    fn a_delta_keeps_unchanged_destinations_as_they_are_and_refuses_another_base() {
        let metrics = metrics();
        let mut rng = fastrand::Rng::with_seed(7);
        let first = random_view(&mut rng, 1);
        let config = Config::build(&first, &Config::default(), &metrics).unwrap();
        let kept = first.services[0].clone();
        let mut changed = first.services[1].clone();
        changed.ports[0].endpoints[0].address = "10.9.9.9:8080".into();
        changed.version = 2;
        let delta = v1::Snapshot {
            version: 2,
            base_version: 1,
            services: vec![changed],
            ..Default::default()
        };
        let next = Config::build(&delta, &config, &metrics).unwrap();
        let dst = |c: &Config, name: &str| {
            Arc::clone(
                c.lookup(classify(&format!("{name}.demo"), 80).unwrap(), "x")
                    .unwrap(),
            )
        };
        assert!(
            Arc::ptr_eq(&dst(&config, &kept.name), &dst(&next, &kept.name)),
            "the same runtime state"
        );
        assert!(!Arc::ptr_eq(
            &dst(&config, &first.services[1].name),
            &dst(&next, &first.services[1].name)
        ));
        assert_eq!(
            next.to_json()["inbound"],
            config.to_json()["inbound"],
            "absent: unchanged"
        );
        let versions: Vec<_> = next.to_json()["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_owned(),
                    s["version"].as_u64().unwrap(),
                )
            })
            .collect();
        assert!(versions.contains(&(kept.name.clone(), 1)), "{versions:?}");
        assert!(
            versions.contains(&(first.services[1].name.clone(), 2)),
            "the delta set it: {versions:?}"
        );

        let stale = v1::Snapshot {
            version: 3,
            base_version: 1,
            ..Default::default()
        };
        let error = Config::build(&stale, &next, &metrics).unwrap_err();
        assert!(
            matches!(error, ConfigError::DeltaBase { base: 1, held: 2 }),
            "{error}"
        );
    }
}
