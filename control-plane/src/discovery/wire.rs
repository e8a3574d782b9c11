//! Domain policies to wire (proto) messages. Values are exact: defaults were applied
//! when the policy was validated, so nothing here invents a value.

use std::time::Duration;

use bulwark_proto::v1 as proto;
use proto::load_balancer::Strategy as ProtoStrategy;
use proto::rate_limit_key::Kind as ProtoKeyKind;

use crate::model::peer_authentication::{MtlsMode, PeerAuthentication};
use crate::model::policy::{self, Direction, LimitKey, Scope, StoreUnavailable, Strategy};
use crate::model::shard;

/// A `google.protobuf.Duration`.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Always below 1e9, so it fits.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The wire form of a ResiliencePolicy.
pub fn resilience(p: &policy::ResiliencePolicy) -> proto::ResiliencePolicy {
    proto::ResiliencePolicy {
        source: p.name.to_string(),
        timeouts: p.timeout.map(|t| proto::Timeouts {
            request: t.request.map(duration),
            connect: t.connect.map(duration),
        }),
        retry: p.retry.as_ref().map(|r| proto::Retry {
            attempts: r.attempts,
            per_try_timeout: r.per_try_timeout.map(duration),
            backoff: Some(proto::Backoff {
                base: Some(duration(r.backoff.base)),
                max: Some(duration(r.backoff.max)),
            }),
            retry_on: r.retry_on.iter().map(|c| c.as_str().to_owned()).collect(),
            status_codes: r.status_codes.iter().copied().map(u32::from).collect(),
            grpc_codes: r.grpc_codes.clone(),
            non_idempotent: r.non_idempotent,
            budget: Some(proto::RetryBudget {
                ratio: r.budget.ratio,
                min_per_second: r.budget.min_per_second,
                window: Some(duration(r.budget.window)),
            }),
            max_body_bytes: r.max_body_bytes,
        }),
        circuit_breaker: p.circuit_breaker.map(|c| proto::CircuitBreaker {
            consecutive_failures: c.consecutive_failures,
            failure_ratio: c.failure_ratio.map(|f| proto::FailureRatio {
                threshold: f.threshold,
                min_requests: f.min_requests,
                window: Some(duration(f.window)),
            }),
            open_duration: Some(duration(c.open_duration)),
            max_open_duration: Some(duration(c.max_open_duration)),
            half_open_probes: c.half_open_probes,
        }),
        bulkhead: p.bulkhead.map(|b| proto::Bulkhead {
            max_concurrent_requests: b.max_concurrent_requests,
            max_pending: b.max_pending,
            queue_timeout: Some(duration(b.queue_timeout)),
            max_connections: b.max_connections,
        }),
        load_balancer: p.load_balancer.as_ref().map(|lb| proto::LoadBalancer {
            strategy: match lb.strategy {
                Strategy::LeastRequest => ProtoStrategy::LeastRequest,
                Strategy::RoundRobin => ProtoStrategy::RoundRobin,
                Strategy::Random => ProtoStrategy::Random,
                Strategy::WeightedRoundRobin => ProtoStrategy::WeightedRoundRobin,
                Strategy::ConsistentHash => ProtoStrategy::ConsistentHash,
            }
            .into(),
            hash_on: lb.hash_on.as_ref().map(|h| proto::HashOn {
                kind: Some(match h {
                    policy::HashOn::Header(name) => proto::hash_on::Kind::Header(name.clone()),
                    policy::HashOn::Cookie(name) => proto::hash_on::Kind::Cookie(name.clone()),
                    policy::HashOn::ClientAddress => {
                        proto::hash_on::Kind::ClientAddress(proto::Empty {})
                    }
                }),
            }),
        }),
    }
}

/// The wire form of one limit of a RateLimitPolicy, for the given local ports (empty for
/// an outbound limit), on one of `pods` pods: a Service-scope limit goes as this pod's
/// share, a Shared one as the whole limit beside the share it falls back to.
pub fn rate_limit(
    policy: &policy::RateLimitPolicy,
    limit: &policy::Limit,
    ports: Vec<u32>,
    pods: usize,
) -> proto::RateLimit {
    let key = match &limit.key {
        LimitKey::None => ProtoKeyKind::None(proto::Empty {}),
        LimitKey::ClientAddress => ProtoKeyKind::ClientAddress(proto::Empty {}),
        LimitKey::ClientIdentity => ProtoKeyKind::ClientIdentity(proto::Empty {}),
        LimitKey::Header(name) => ProtoKeyKind::Header(name.clone()),
    };
    let (requests, per, burst, split) = match limit.scope {
        Scope::Pod => (limit.requests, limit.per, limit.burst, 0),
        Scope::Service | Scope::Shared => {
            let (requests, per, burst) =
                policy::split(limit.requests, limit.per, limit.burst, pods);
            // Zero ready pods: each pod that starts enforces the whole limit.
            (
                requests,
                per,
                burst,
                u32::try_from(pods.max(1)).unwrap_or(u32::MAX),
            )
        }
    };
    let scope = match limit.scope {
        Scope::Pod => proto::RateLimitScope::Pod,
        Scope::Service => proto::RateLimitScope::Service,
        Scope::Shared => proto::RateLimitScope::Shared,
    };
    let direction = match policy.direction {
        Direction::Inbound => "in",
        Direction::Outbound => "out",
    };
    let shared = (limit.scope == Scope::Shared).then(|| proto::SharedLimit {
        requests: limit.requests,
        period: Some(duration(limit.per)),
        burst: limit.burst,
        on_store_unavailable: match limit.on_store_unavailable {
            StoreUnavailable::FailOpen => proto::StoreUnavailable::FailOpen,
            StoreUnavailable::FailClosed => proto::StoreUnavailable::FailClosed,
            StoreUnavailable::FallbackToSplit => proto::StoreUnavailable::FallbackToSplit,
        }
        .into(),
        bucket: format!("{direction}/{}/{}", policy.name, limit.name),
    });
    let cost = (limit.cost != policy::Cost::default()).then(|| proto::RateLimitCost {
        default_cost: limit.cost.default,
        rules: limit
            .cost
            .rules
            .iter()
            .map(|r| proto::CostRule {
                method: r.method.clone().unwrap_or_default(),
                path_prefix: r.path_prefix.clone().unwrap_or_default(),
                cost: r.cost,
            })
            .collect(),
        response_header: limit.cost.response_header.clone().unwrap_or_default(),
    });
    proto::RateLimit {
        source: policy.name.to_string(),
        name: limit.name.clone(),
        ports,
        key: Some(proto::RateLimitKey { kind: Some(key) }),
        requests,
        period: Some(duration(per)),
        burst,
        scope: scope.into(),
        split: if limit.scope == Scope::Pod { 0 } else { split },
        shared,
        cost,
        response_headers: policy.response_headers,
    }
}

/// The wire form of a PeerAuthentication. Every mode is written out (never
/// `MTLS_MODE_UNSPECIFIED`), so that what the agent reads is what the policy says.
pub fn peer_authentication(p: &PeerAuthentication) -> proto::PeerAuthentication {
    let mode = |m: MtlsMode| match m {
        MtlsMode::Permissive => proto::MtlsMode::Permissive,
        MtlsMode::Strict => proto::MtlsMode::Strict,
    };
    proto::PeerAuthentication {
        source: p.name.to_string(),
        mode: mode(p.mode).into(),
        port_modes: p
            .port_modes
            .iter()
            .map(|(port, m)| (u32::from(*port), mode(*m).into()))
            .collect(),
    }
}

/// The wire form of a ShardTopology.
pub fn shard_topology(t: &shard::ShardTopology) -> proto::ShardTopology {
    use proto::shard_key::Kind as Key;
    use proto::shard_strategy::Kind as Strat;
    let key = match &t.key {
        shard::ShardKey::Header(h) => Key::Header(h.clone()),
        shard::ShardKey::PathSegment(i) => Key::PathSegment(*i),
        shard::ShardKey::PathPattern(p) => Key::PathPattern(p.clone()),
        shard::ShardKey::Query(q) => Key::Query(q.clone()),
        shard::ShardKey::GrpcMetadata(m) => Key::GrpcMetadata(m.clone()),
    };
    let strategy = match &t.strategy {
        shard::ShardStrategy::Hash => Strat::Hash(proto::Empty {}),
        shard::ShardStrategy::ConsistentHash { virtual_nodes } => {
            Strat::ConsistentHashVirtualNodes(*virtual_nodes)
        }
        shard::ShardStrategy::Range(ranges) => Strat::Ranges(proto::KeyRanges {
            ranges: ranges
                .iter()
                .map(|r| proto::KeyRange {
                    start: r.start.clone(),
                    end: r.end.clone(),
                    shard: r.shard.clone(),
                })
                .collect(),
        }),
        shard::ShardStrategy::Directory { entries, default } => {
            Strat::Directory(proto::Directory {
                entries: entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                default_shard: default.clone().unwrap_or_default(),
            })
        }
    };
    let labels = |m: &std::collections::BTreeMap<String, String>| {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    proto::ShardTopology {
        source: t.name.to_string(),
        key: Some(proto::ShardKey { kind: Some(key) }),
        default_shard: match &t.missing_key {
            shard::MissingKey::Reject => String::new(),
            shard::MissingKey::DefaultShard(s) => s.clone(),
        },
        strategy: Some(proto::ShardStrategy {
            kind: Some(strategy),
        }),
        shards: t
            .shards
            .iter()
            .map(|s| proto::Shard {
                name: s.name.clone(),
                primary: labels(&s.primary),
                replicas: s.replicas.as_ref().map(|r| proto::LabelSelector {
                    match_labels: labels(r),
                }),
            })
            .collect(),
        reads: Some(proto::ReadMatch {
            methods: t.reads.methods.clone(),
            paths: t.reads.paths.clone(),
            grpc_methods: t.reads.grpc_methods.clone(),
        }),
        read_your_writes: t.read_your_writes.as_ref().map(|r| proto::ReadYourWrites {
            window: Some(duration(r.window)),
            client_header: r.client_header.clone().unwrap_or_default(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_keep_subsecond_precision() {
        let d = duration(Duration::from_millis(1_250));
        assert_eq!((d.seconds, d.nanos), (1, 250_000_000));
    }
}
