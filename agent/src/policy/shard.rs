//! Shard- and replica-aware routing of one destination (a `ShardTopology`).
//!
//! A request's key (header, path segment or pattern, query parameter, gRPC metadata)
//! picks a shard; reads go to the shard's replicas, balanced, writes to its primary.
//! Reads go to the primary instead when the client asks for it
//! (`x-bulwark-consistency: strong`), when the client wrote to the shard within the
//! read-your-writes window, or when no replica admits the request (a fallback). A write
//! whose primary cannot take it fails fast: it is never sent to a replica.
//!
//! The primary and replica balancers share the destination's endpoints (and so their
//! breakers and load counters) and its load-balancing strategy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::request::Parts;
use regex::RegexSet;
use serde_json::{Value, json};

use bulwark_proto::v1;

use crate::metrics::{Metrics, RoleMetrics, ShardMetrics};
use crate::policy::balance::{Balancer, PickError, Picked, Strategy};
use crate::policy::endpoint::Endpoint;

pub mod key;
pub mod ryw;
pub mod strategy;

use key::KeySource;
use ryw::{ClientId, ReadYourWrites};
use strategy::Mapper;

/// The header a client sets to `strong` to read from the primary.
pub const CONSISTENCY_HEADER: &str = "x-bulwark-consistency";

/// A topology the agent cannot enforce.
#[derive(Debug, thiserror::Error)]
pub enum InvalidTopology {
    /// A section is absent.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A bad key source.
    #[error("key: {0}")]
    Key(String),
    /// A bad strategy.
    #[error("strategy: {0}")]
    Strategy(String),
    /// A shard name used but not listed.
    #[error("names shard {0:?}, which is not in the shard list")]
    UnknownShard(String),
    /// A shard listed twice, or the list is empty.
    #[error("shards: {0}")]
    Shards(String),
    /// A bad read path pattern.
    #[error("reads.paths: {0}")]
    ReadPaths(#[from] regex::Error),
    /// A bad read-your-writes section.
    #[error("readYourWrites: {0}")]
    ReadYourWrites(String),
}

/// Which copy of a shard served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The shard's primary (writes; strong and read-your-writes reads; fallbacks).
    Primary,
    /// One of the shard's replicas (reads).
    Replica,
}

impl Role {
    /// This role's metric handles within a shard's.
    fn metrics(self, shard: &ShardMetrics) -> &RoleMetrics {
        match self {
            Role::Primary => &shard.primary,
            Role::Replica => &shard.replica,
        }
    }

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// One shard's copies.
#[derive(Debug)]
pub struct ShardState {
    /// The shard's name.
    pub name: String,
    /// Balances over the primary's endpoints.
    pub primary: Balancer,
    /// Balances over the replicas' endpoints; `None`: the shard has no replicas.
    pub replicas: Option<Balancer>,
    primary_selector: BTreeMap<String, String>,
    replica_selector: Option<BTreeMap<String, String>>,
    metrics: ShardMetrics,
}

/// Which requests are reads.
#[derive(Debug)]
struct Reads {
    methods: Vec<http::Method>,
    paths: RegexSet,
    grpc_methods: Vec<String>,
}

impl Reads {
    fn matches(&self, parts: &Parts) -> bool {
        let path = parts.uri.path();
        if crate::grpc::is_grpc(&parts.headers) {
            return self.grpc_methods.iter().any(|m| m == path) || self.paths.is_match(path);
        }
        self.methods.contains(&parts.method) || self.paths.is_match(path)
    }
}

/// The shard router of one destination.
#[derive(Debug)]
pub struct ShardRouter {
    /// `namespace/name` of the ShardTopology.
    pub source: String,
    key: KeySource,
    default_shard: Option<usize>,
    mapper: Mapper,
    /// The shards, in the topology's order.
    pub shards: Vec<ShardState>,
    reads: Reads,
    ryw: Option<ReadYourWrites>,
}

/// A request the router cannot place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// No key (or a key no shard holds) and no default shard: 400 `shard-key-missing`.
    KeyMissing,
}

/// Where one request goes: a shard and whether a replica may serve it.
#[derive(Debug)]
pub struct Route<'a> {
    /// The shard.
    pub shard: &'a ShardState,
    /// Whether the request is a write (never served by a replica).
    pub write: bool,
    /// Whether a read must go to the primary (strong consistency or read-your-writes).
    pub primary_read: bool,
}

/// No copy of the shard can take one try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPickError {
    /// A write whose primary has no endpoint or whose breaker is open.
    PrimaryUnavailable,
    /// A read that neither a replica nor the primary admits.
    Unavailable(PickError),
}

fn matches(labels: &BTreeMap<String, String>, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl ShardRouter {
    /// Builds the router of a destination `dst` over its `endpoints`, keeping
    /// read-your-writes state from `previous` when its settings are unchanged.
    pub fn build(
        proto: &v1::ShardTopology,
        dst: &str,
        strategy: Strategy,
        endpoints: &[Arc<Endpoint>],
        previous: Option<&ShardRouter>,
        metrics: &Metrics,
    ) -> Result<Self, InvalidTopology> {
        if proto.shards.is_empty() {
            return Err(InvalidTopology::Shards("the list is empty".into()));
        }
        let names: Vec<String> = proto.shards.iter().map(|s| s.name.clone()).collect();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(InvalidTopology::Shards(format!("{name:?} is listed twice")));
            }
        }
        let index = |name: &str| {
            names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| InvalidTopology::UnknownShard(name.to_owned()))
        };
        let key_kind = proto
            .key
            .as_ref()
            .and_then(|k| k.kind.as_ref())
            .ok_or(InvalidTopology::Missing("key"))?;
        let strategy_kind = proto
            .strategy
            .as_ref()
            .and_then(|s| s.kind.as_ref())
            .ok_or(InvalidTopology::Missing("strategy"))?;
        let default_shard = Some(proto.default_shard.as_str())
            .filter(|s| !s.is_empty())
            .map(index)
            .transpose()?;
        let mapper = Mapper::build(strategy_kind, &names, index)?;
        let mut shards = Vec::with_capacity(proto.shards.len());
        for s in &proto.shards {
            if s.primary.is_empty() {
                return Err(InvalidTopology::Shards(format!(
                    "shard {:?} has no primary selector",
                    s.name
                )));
            }
            let primary_selector: BTreeMap<_, _> = s
                .primary
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let replica_selector: Option<BTreeMap<_, _>> = s.replicas.as_ref().map(|r| {
                r.match_labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            });
            let select = |selector: &BTreeMap<String, String>| {
                endpoints
                    .iter()
                    .filter(|e| matches(&e.labels, selector))
                    .cloned()
                    .collect::<Vec<_>>()
            };
            shards.push(ShardState {
                name: s.name.clone(),
                primary: Balancer::new(strategy, select(&primary_selector)),
                replicas: replica_selector
                    .as_ref()
                    .map(|sel| Balancer::new(strategy, select(sel))),
                primary_selector,
                replica_selector,
                metrics: metrics.shard(dst, &s.name),
            });
        }
        let reads = proto.reads.clone().unwrap_or_default();
        let mut methods = Vec::with_capacity(reads.methods.len());
        for m in &reads.methods {
            methods.push(http::Method::from_bytes(m.as_bytes()).map_err(|_| {
                InvalidTopology::Shards(format!("reads.methods: {m:?} is not an HTTP method"))
            })?);
        }
        let ryw = match &proto.read_your_writes {
            None => None,
            Some(r) => {
                let window = r
                    .window
                    .as_ref()
                    .map(crate::policy::duration::duration)
                    .transpose()
                    .map_err(|e| InvalidTopology::ReadYourWrites(e.to_string()))?
                    .ok_or(InvalidTopology::ReadYourWrites("window is required".into()))?;
                let header = Some(r.client_header.as_str())
                    .filter(|h| !h.is_empty())
                    .map(http::HeaderName::try_from)
                    .transpose()
                    .map_err(|_| {
                        InvalidTopology::ReadYourWrites(format!(
                            "{:?} is not a header name",
                            r.client_header
                        ))
                    })?;
                let tracker = ReadYourWrites::new(window, header);
                if let Some(old) = previous.and_then(|p| p.ryw.as_ref())
                    && old.window == tracker.window
                    && old.client_header == tracker.client_header
                {
                    tracker.inherit(old);
                }
                Some(tracker)
            }
        };
        Ok(Self {
            source: proto.source.clone(),
            key: KeySource::try_from(key_kind)?,
            default_shard,
            mapper,
            shards,
            reads: Reads {
                methods,
                paths: RegexSet::new(&reads.paths)?,
                grpc_methods: reads.grpc_methods,
            },
            ryw,
        })
    }

    /// The client identity for read-your-writes: the client header, or the client's
    /// address when the header is not configured or absent (rather than one shared
    /// "no header" identity, which would send every header-less client to the primary
    /// after any one of them wrote).
    fn client(&self, ryw: &ReadYourWrites, parts: &Parts, addr: Option<IpAddr>) -> ClientId {
        if let Some(value) = ryw
            .client_header
            .as_ref()
            .and_then(|h| parts.headers.get(h))
        {
            return ClientId::of(value.as_bytes());
        }
        addr.map_or(ClientId::of(&[]), ClientId::at)
    }

    /// Places a request: its shard and which copy may serve it. Records a write for
    /// read-your-writes.
    pub fn route(
        &self,
        parts: &Parts,
        client: Option<SocketAddr>,
    ) -> Result<Route<'_>, RouteError> {
        let shard = self
            .key
            .extract(parts)
            .and_then(|k| self.mapper.shard(k))
            .or(self.default_shard)
            .ok_or(RouteError::KeyMissing)?;
        let state = self.shards.get(shard).ok_or(RouteError::KeyMissing)?;
        let write = !self.reads.matches(parts);
        let strong = parts
            .headers
            .get(CONSISTENCY_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"strong"));
        let mut primary_read = strong;
        if let Some(ryw) = &self.ryw {
            let id = self.client(ryw, parts, client.map(|a| a.ip()));
            if write {
                ryw.wrote(id, shard);
            } else if !primary_read {
                primary_read = ryw.recent(id, shard);
            }
        }
        Ok(Route {
            shard: state,
            write,
            primary_read,
        })
    }

    /// The topology and who holds which shard and role, for `/config`.
    pub fn to_json(&self) -> Value {
        let members = |b: &Balancer| {
            b.endpoints()
                .iter()
                .map(|e| e.addr.to_string())
                .collect::<Vec<_>>()
        };
        json!({
            "source": self.source,
            "key": self.key.to_json(),
            "strategy": match &self.mapper {
                Mapper::Hash { .. } => "Hash",
                Mapper::Ring(_) => "ConsistentHash",
                Mapper::Range(_) => "Range",
                Mapper::Directory { .. } => "Directory",
            },
            "defaultShard": self.default_shard.and_then(|i| self.shards.get(i)).map(|s| &s.name),
            "readMethods": self.reads.methods.iter().map(http::Method::as_str).collect::<Vec<_>>(),
            "readYourWritesMs": self.ryw.as_ref().map(|r| r.window.as_millis() as u64),
            "shards": self.shards.iter().map(|s| json!({
                "name": s.name,
                "primarySelector": s.primary_selector,
                "replicaSelector": s.replica_selector,
                "primary": members(&s.primary),
                "replicas": s.replicas.as_ref().map(members).unwrap_or_default(),
            })).collect::<Vec<_>>(),
        })
    }
}

impl Route<'_> {
    /// Picks the copy for one try, preferring endpoints not in `avoid`.
    /// `affinity` is the session key for consistent hashing, if any.
    pub fn pick(
        &self,
        avoid: &[SocketAddr],
        affinity: Option<u64>,
    ) -> Result<(Picked, Role), ShardPickError> {
        let shard = self.shard;
        if self.write {
            return match shard.primary.pick_keyed(avoid, affinity) {
                Ok(p) => Ok((p, Role::Primary)),
                Err(_) => {
                    Role::Primary.metrics(&shard.metrics).error();
                    Err(ShardPickError::PrimaryUnavailable)
                }
            };
        }
        if !self.primary_read
            && let Some(replicas) = &shard.replicas
        {
            match replicas.pick_keyed(avoid, affinity) {
                Ok(p) => return Ok((p, Role::Replica)),
                Err(error) => {
                    tracing::debug!(shard = %shard.name, %error, "no replica admits the read; falling back to the primary");
                    shard.metrics.fallback();
                }
            }
        }
        shard
            .primary
            .pick_keyed(avoid, affinity)
            .map(|p| (p, Role::Primary))
            .map_err(|e| {
                Role::Primary.metrics(&shard.metrics).error();
                ShardPickError::Unavailable(e)
            })
    }

    /// Counts one try sent to `role` of the shard, and whether it failed.
    pub fn record(&self, role: Role, failed: bool) {
        let metrics = role.metrics(&self.shard.metrics);
        metrics.request();
        if failed {
            metrics.error();
        }
    }
}
