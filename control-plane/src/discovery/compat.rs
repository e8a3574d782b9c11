//! Protocol levels: what an agent that speaks an older protocol cannot enforce is held
//! back from its snapshots, failing closed.
//!
//! An agent ignores fields it does not know (protobuf), so an agent older than a
//! feature would not refuse it but silently act without it: one that does not know
//! shard topologies would balance writes over replicas. The control plane reads the
//! agent's `Identity.protocol_version` and, for each feature newer than it, strips the
//! feature the way that is safe for that feature ([`GATES`]). Every agent of one
//! protocol level gets the same services, so the encoding stays shared per level.

use bulwark_proto::v1 as proto;
use std::sync::Arc;

use serde::Serialize;

/// A feature that needs a protocol level, and how to strip it from a port.
struct Gate {
    /// The first protocol version that enforces the feature.
    since: u32,
    /// The feature's name, as `/agents` and the logs show it.
    feature: &'static str,
    /// Removes the feature from `port` the safe way; true if the port had it.
    strip: fn(&mut proto::ServicePort) -> bool,
}

/// Every gated feature. A new one is one line here (and a `strip` function).
const GATES: &[Gate] = &[
    Gate {
        since: 2,
        feature: "shardTopology",
        strip: strip_shard_topology,
    },
    Gate {
        since: 2,
        feature: "routes",
        strip: strip_routes,
    },
    Gate {
        since: 2,
        feature: "loadBalancer.strategy",
        strip: strip_new_strategies,
    },
    Gate {
        since: RATE_LIMIT_STORE_SINCE,
        feature: "rateLimits",
        strip: strip_outbound_rate_limits,
    },
];

/// An agent below [`RATE_LIMIT_STORE_SINCE`] does not read a port's outbound limits: it
/// would send without them whatever it got. Nothing safer is in its reach (refusing the
/// port would be an outage for a limit), so they are left out and listed as held back,
/// for `/agents` to show which callers do not limit yet.
fn strip_outbound_rate_limits(port: &mut proto::ServicePort) -> bool {
    if port.rate_limits.is_empty() {
        return false;
    }
    port.rate_limits.clear();
    true
}

/// A sharded port without its topology would spread writes over replicas, so an agent
/// that cannot route by shard gets the port with no endpoints: its requests fail with
/// 503 `no-endpoints` instead of reaching the wrong copy.
fn strip_shard_topology(port: &mut proto::ServicePort) -> bool {
    if port.shard_topology.take().is_none() {
        return false;
    }
    port.endpoints.clear();
    true
}

/// An agent that cannot match routes sends every request to the parent Service's own
/// endpoints, which is what callers outside the mesh get too: the parent still serves
/// (it is the stable version of a canary, the legacy side of a migration), so the
/// endpoints stay and only the rules go, listed as held back.
fn strip_routes(port: &mut proto::ServicePort) -> bool {
    if port.routes.is_empty() {
        return false;
    }
    port.routes.clear();
    true
}

/// An agent that does not know a strategy NACKs the whole snapshot and keeps its last
/// config, so it would also miss every endpoint and policy change after it. Round robin
/// is what it can do: requests still spread over the same endpoints, only without
/// weights or stickiness, and everything else in the snapshot reaches it.
fn strip_new_strategies(port: &mut proto::ServicePort) -> bool {
    use proto::load_balancer::Strategy;
    let Some(balancer) = port
        .resilience
        .as_mut()
        .and_then(|policy| policy.load_balancer.as_mut())
    else {
        return false;
    };
    let known_at_1 = matches!(
        Strategy::try_from(balancer.strategy),
        Ok(Strategy::Unspecified | Strategy::RoundRobin | Strategy::LeastRequest)
    );
    if known_at_1 && balancer.hash_on.is_none() {
        return false;
    }
    balancer.strategy = Strategy::RoundRobin.into();
    balancer.hash_on = None;
    true
}

/// The protocol that brought `Inbound.authorization` (AuthorizationPolicy).
pub const AUTHORIZATION_SINCE: u32 = 3;

/// The protocol that brought `Inbound.peer_authentication` (PeerAuthentication).
pub const PEER_AUTHENTICATION_SINCE: u32 = 4;

/// The protocol that brought rate limits keyed by the caller's mesh identity.
pub const CLIENT_IDENTITY_KEY_SINCE: u32 = 4;

/// The protocol from which an agent enforces `Inbound.authorization` on opaque TCP.
pub const TCP_AUTHORIZATION_SINCE: u32 = 5;

/// The protocol that brought Shared limits (the rate-limit store), request cost,
/// rate-limit response headers and outbound limits.
pub const RATE_LIMIT_STORE_SINCE: u32 = 7;

/// What of a limit an agent below [`RATE_LIMIT_STORE_SINCE`] would not enforce.
fn newer_rate_limit_features(limit: &proto::RateLimit) -> impl Iterator<Item = &'static str> {
    [
        limit.shared.is_some().then_some("rateLimit.scope.Shared"),
        limit.cost.is_some().then_some("rateLimit.cost"),
    ]
    .into_iter()
    .flatten()
}

fn keyed_by_identity(limit: &proto::RateLimit) -> bool {
    matches!(
        limit.key.as_ref().and_then(|k| k.kind.as_ref()),
        Some(proto::rate_limit_key::Kind::ClientIdentity(_))
    )
}

/// The pod's inbound part as an agent at `level` may have it, and what was held back;
/// `None` when it goes as it is.
///
/// - Below [`AUTHORIZATION_SINCE`] an agent ignores the pod's authorization policies
///   and allows every caller: the policies are left out and reported as held back, so
///   `/agents` and the metric show that the pod is not protected.
/// - Below [`PEER_AUTHENTICATION_SINCE`] an agent cannot refuse plaintext: it neither
///   reads the mode nor terminates mutual TLS. The PeerAuthentication is left out and a
///   Strict mode (of the pod, or of any port) is reported as held back; a Permissive
///   one is what the agent does anyway, so nothing is lost. Failing closed instead has
///   no safe form: such an agent can only refuse every caller, meshed ones included,
///   which would turn going Strict before the agents are upgraded into an outage of
///   every old pod. Left as it is, the pod keeps taking plaintext as it did before the
///   policy, and the report says which pods are not Strict yet.
/// - Below [`CLIENT_IDENTITY_KEY_SINCE`] an agent reads a rate limit keyed by client
///   identity as keyed by nothing: one bucket for every caller, a limit far stricter
///   than meant. It gets the limit keyed by client address instead (a meshed caller's
///   pod has one address, so the buckets are close to per workload instance), reported
///   as held back.
/// - Below [`RATE_LIMIT_STORE_SINCE`] an agent enforces a Shared limit's split share
///   (the numbers it reads are that share: Service scope, approximate under uneven
///   traffic) and charges every request one token. The limits go as they are, each
///   such feature reported as held back.
/// - From [`AUTHORIZATION_SINCE`] to below [`TCP_AUTHORIZATION_SINCE`] an agent
///   enforces the policies on HTTP but relays opaque TCP from any caller. The policies
///   go as they are (HTTP stays protected) and each is reported as held back for TCP,
///   so that `/agents` shows which pods still take TCP from anyone.
pub fn hold_back_inbound(
    inbound: &Arc<proto::Inbound>,
    level: u32,
) -> Option<(Arc<proto::Inbound>, Vec<HeldBack>)> {
    let authorization = level < AUTHORIZATION_SINCE && !inbound.authorization.is_empty();
    let peer_authentication =
        level < PEER_AUTHENTICATION_SINCE && inbound.peer_authentication.is_some();
    let identity_keys =
        level < CLIENT_IDENTITY_KEY_SINCE && inbound.rate_limits.iter().any(keyed_by_identity);
    let tcp_authorization = (AUTHORIZATION_SINCE..TCP_AUTHORIZATION_SINCE).contains(&level)
        && !inbound.authorization.is_empty();
    let store_features = level < RATE_LIMIT_STORE_SINCE
        && inbound
            .rate_limits
            .iter()
            .any(|l| newer_rate_limit_features(l).next().is_some());
    if !authorization
        && !peer_authentication
        && !identity_keys
        && !tcp_authorization
        && !store_features
    {
        return None;
    }
    let mut stripped = proto::Inbound::clone(inbound);
    let mut held_back: Vec<HeldBack> = Vec::new();
    if store_features {
        for limit in &stripped.rate_limits {
            held_back.extend(newer_rate_limit_features(limit).map(|feature| HeldBack {
                port: format!("inbound ({} limit {})", limit.source, limit.name),
                feature,
                needs_protocol: RATE_LIMIT_STORE_SINCE,
            }));
        }
    }
    if tcp_authorization {
        held_back.extend(stripped.authorization.iter().map(|p| HeldBack {
            port: format!("inbound ({})", p.source),
            feature: "authorization.tcp",
            needs_protocol: TCP_AUTHORIZATION_SINCE,
        }));
    }
    if identity_keys {
        for limit in stripped
            .rate_limits
            .iter_mut()
            .filter(|l| keyed_by_identity(l))
        {
            limit.key = Some(proto::RateLimitKey {
                kind: Some(proto::rate_limit_key::Kind::ClientAddress(proto::Empty {})),
            });
            held_back.push(HeldBack {
                port: format!("inbound ({} limit {})", limit.source, limit.name),
                feature: "rateLimit.key.ClientIdentity",
                needs_protocol: CLIENT_IDENTITY_KEY_SINCE,
            });
        }
    }
    if authorization {
        held_back.extend(stripped.authorization.drain(..).map(|p| HeldBack {
            port: format!("inbound ({})", p.source),
            feature: "authorization",
            needs_protocol: AUTHORIZATION_SINCE,
        }));
    }
    if peer_authentication && let Some(p) = stripped.peer_authentication.take() {
        held_back.extend(strict_places(&p).into_iter().map(|port| HeldBack {
            port,
            feature: "peerAuthentication.mode",
            needs_protocol: PEER_AUTHENTICATION_SINCE,
        }));
    }
    Some((Arc::new(stripped), held_back))
}

/// Where a PeerAuthentication refuses plaintext: `inbound (ns/name)` for its mode, then
/// `inbound port N (ns/name)` for each Strict port override, in port order.
fn strict_places(p: &proto::PeerAuthentication) -> Vec<String> {
    let strict = |mode: i32| mode == i32::from(proto::MtlsMode::Strict);
    let mut places = Vec::new();
    if strict(p.mode) {
        places.push(format!("inbound ({})", p.source));
    }
    let mut ports: Vec<u32> = p
        .port_modes
        .iter()
        .filter(|(_, mode)| strict(**mode))
        .map(|(port, _)| *port)
        .collect();
    ports.sort_unstable();
    places.extend(
        ports
            .into_iter()
            .map(|port| format!("inbound port {port} ({})", p.source)),
    );
    places
}

/// One feature held back from one service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldBack {
    /// `name.namespace:port`, or `inbound (ns/policy)` for the pod's own inbound part.
    pub port: String,
    /// The feature (`shardTopology`, `routes`, `loadBalancer.strategy`,
    /// `authorization`, `authorization.tcp`, `peerAuthentication.mode`).
    pub feature: &'static str,
    /// The protocol version that would get it.
    pub needs_protocol: u32,
}

/// The level an agent that says `protocol_version` is served at: at most what this
/// build knows, and at least 1 (an agent that leaves the field unset is the oldest).
pub fn level(protocol_version: u32) -> u32 {
    protocol_version.clamp(1, bulwark_proto::PROTOCOL_VERSION)
}

/// The services as an agent at `level` may have them, and what was held back; `None`
/// when nothing needs holding back (send the services as they are, sharing them).
pub fn for_level(
    services: &[proto::Service],
    level: u32,
) -> Option<(Vec<proto::Service>, Vec<HeldBack>)> {
    let gates: Vec<&Gate> = GATES.iter().filter(|g| g.since > level).collect();
    if gates.is_empty() {
        return None;
    }
    let mut held_back = Vec::new();
    let mut services = services.to_vec();
    for service in &mut services {
        for port in &mut service.ports {
            for gate in &gates {
                if (gate.strip)(port) {
                    held_back.push(HeldBack {
                        port: format!("{}.{}:{}", service.name, service.namespace, port.port),
                        feature: gate.feature,
                        needs_protocol: gate.since,
                    });
                }
            }
        }
    }
    (!held_back.is_empty()).then_some((services, held_back))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(number: u32, sharded: bool) -> proto::ServicePort {
        proto::ServicePort {
            name: "http".into(),
            port: number,
            endpoints: vec![proto::Endpoint {
                address: "10.0.0.1:8080".into(),
                ..Default::default()
            }],
            shard_topology: sharded.then(proto::ShardTopology::default),
            ..Default::default()
        }
    }

    fn services() -> Vec<proto::Service> {
        vec![proto::Service {
            name: "orders".into(),
            namespace: "shop".into(),
            ports: vec![port(80, true), port(9090, false)],
            ..Default::default()
        }]
    }

    #[test]
    fn a_current_agent_gets_everything() {
        assert_eq!(level(bulwark_proto::PROTOCOL_VERSION), 7);
        assert!(for_level(&services(), 3).is_none());
        assert!(
            for_level(&services(), 2).is_none(),
            "3 adds nothing outbound"
        );
        assert_eq!(
            level(8),
            bulwark_proto::PROTOCOL_VERSION,
            "a newer agent is served what this build knows"
        );
        let mut plain = services();
        plain[0].ports[0].shard_topology = None;
        assert!(
            for_level(&plain, 1).is_none(),
            "nothing to hold back: shared as is"
        );
    }

    fn inbound(mode: proto::MtlsMode, ports: &[(u32, proto::MtlsMode)]) -> Arc<proto::Inbound> {
        Arc::new(proto::Inbound {
            peer_authentication: Some(proto::PeerAuthentication {
                source: "shop/mtls".into(),
                mode: mode.into(),
                port_modes: ports.iter().map(|(p, m)| (*p, i32::from(*m))).collect(),
            }),
            ..Default::default()
        })
    }

    #[test]
    fn a_peer_authentication_goes_as_it_is_from_protocol_4() {
        let strict = inbound(proto::MtlsMode::Strict, &[]);
        assert!(hold_back_inbound(&strict, 4).is_none());
        assert!(hold_back_inbound(&Arc::new(proto::Inbound::default()), 1).is_none());
    }

    #[test]
    fn below_protocol_4_each_strict_place_is_held_back_in_port_order() {
        use proto::MtlsMode::{Permissive, Strict};
        let mixed = inbound(
            Permissive,
            &[(9443, Strict), (8080, Permissive), (8443, Strict)],
        );
        let (stripped, held_back) = hold_back_inbound(&mixed, 3).unwrap();
        assert_eq!(stripped.peer_authentication, None);
        let places: Vec<_> = held_back.iter().map(|h| h.port.as_str()).collect();
        assert_eq!(
            places,
            [
                "inbound port 8443 (shop/mtls)",
                "inbound port 9443 (shop/mtls)"
            ]
        );
        assert!(
            held_back
                .iter()
                .all(|h| h.feature == "peerAuthentication.mode"
                    && h.needs_protocol == PEER_AUTHENTICATION_SINCE)
        );

        let (stripped, held_back) = hold_back_inbound(&inbound(Permissive, &[]), 3).unwrap();
        assert_eq!(stripped.peer_authentication, None);
        assert!(
            held_back.is_empty(),
            "Permissive is what an old agent does anyway"
        );
    }

    #[test]
    fn below_protocol_7_outbound_limits_are_held_back_and_shared_ones_reported() {
        let mut limited = services();
        limited[0].ports[1].rate_limits = vec![proto::RateLimit {
            source: "shop/api".into(),
            name: "calls".into(),
            ..Default::default()
        }];
        assert!(for_level(&limited, 7).is_none());
        let (stripped, held_back) = for_level(&limited, 6).unwrap();
        assert!(stripped[0].ports[1].rate_limits.is_empty());
        assert_eq!(
            held_back,
            [HeldBack {
                port: "orders.shop:9090".into(),
                feature: "rateLimits",
                needs_protocol: RATE_LIMIT_STORE_SINCE,
            }]
        );

        let shared = Arc::new(proto::Inbound {
            rate_limits: vec![proto::RateLimit {
                source: "shop/limits".into(),
                name: "total".into(),
                requests: 50,
                shared: Some(proto::SharedLimit {
                    requests: 200,
                    ..Default::default()
                }),
                cost: Some(proto::RateLimitCost::default()),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(hold_back_inbound(&shared, 7).is_none());
        let (kept, held_back) = hold_back_inbound(&shared, 6).unwrap();
        assert_eq!(
            kept.rate_limits, shared.rate_limits,
            "the split share goes as it is"
        );
        let features: Vec<_> = held_back.iter().map(|h| h.feature).collect();
        assert_eq!(features, ["rateLimit.scope.Shared", "rateLimit.cost"]);
    }

    #[test]
    fn below_protocol_4_an_identity_keyed_limit_goes_keyed_by_client_address() {
        use proto::rate_limit_key::Kind;
        let limit = |name: &str, kind: Kind| proto::RateLimit {
            source: "shop/limits".into(),
            name: name.into(),
            key: Some(proto::RateLimitKey { kind: Some(kind) }),
            ..Default::default()
        };
        let limits = Arc::new(proto::Inbound {
            rate_limits: vec![
                limit("per-caller", Kind::ClientIdentity(proto::Empty {})),
                limit("per-tenant", Kind::Header("x-tenant".into())),
            ],
            ..Default::default()
        });
        assert!(hold_back_inbound(&limits, 4).is_none());
        let (stripped, held_back) = hold_back_inbound(&limits, 3).unwrap();
        let kinds: Vec<_> = stripped
            .rate_limits
            .iter()
            .map(|l| l.key.as_ref().and_then(|k| k.kind.clone()))
            .collect();
        assert_eq!(
            kinds,
            [
                Some(Kind::ClientAddress(proto::Empty {})),
                Some(Kind::Header("x-tenant".into()))
            ]
        );
        assert_eq!(
            held_back,
            [HeldBack {
                port: "inbound (shop/limits limit per-caller)".into(),
                feature: "rateLimit.key.ClientIdentity",
                needs_protocol: 4,
            }]
        );
    }

    #[test]
    fn below_protocol_5_authorization_goes_for_http_and_is_reported_held_back_for_tcp() {
        let protected = Arc::new(proto::Inbound {
            authorization: vec![proto::AuthorizationPolicy {
                source: "shop/only-frontend".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(hold_back_inbound(&protected, 5).is_none());
        let (sent, held_back) = hold_back_inbound(&protected, 4).unwrap();
        assert_eq!(
            sent.authorization, protected.authorization,
            "HTTP stays protected"
        );
        assert_eq!(
            held_back,
            [HeldBack {
                port: "inbound (shop/only-frontend)".into(),
                feature: "authorization.tcp",
                needs_protocol: TCP_AUTHORIZATION_SINCE,
            }]
        );
        let (sent, held_back) = hold_back_inbound(&protected, 2).unwrap();
        assert!(sent.authorization.is_empty());
        assert_eq!(
            held_back.iter().map(|h| h.feature).collect::<Vec<_>>(),
            ["authorization"],
            "an agent without authorization at all is reported once, for all of it"
        );
    }

    #[test]
    fn an_old_agent_gets_a_sharded_port_without_endpoints() {
        assert_eq!(level(0), 1, "unset is the oldest");
        let (services, held_back) = for_level(&services(), 1).unwrap();
        let ports = &services[0].ports;
        assert!(ports[0].shard_topology.is_none());
        assert!(ports[0].endpoints.is_empty(), "fails closed");
        assert_eq!(ports[1].endpoints.len(), 1, "other ports are untouched");
        assert_eq!(
            held_back,
            [HeldBack {
                port: "orders.shop:80".into(),
                feature: "shardTopology",
                needs_protocol: 2,
            }]
        );
    }

    #[test]
    fn an_old_agent_gets_a_routed_port_without_its_routes_but_with_its_endpoints() {
        let mut routed = services();
        routed[0].ports[1].routes = vec![proto::HttpRouteRule::default()];
        let (services, held_back) = for_level(&routed, 1).unwrap();
        let port = &services[0].ports[1];
        assert!(port.routes.is_empty());
        assert_eq!(port.endpoints.len(), 1, "the parent still serves");
        assert_eq!(
            held_back[1],
            HeldBack {
                port: "orders.shop:9090".into(),
                feature: "routes",
                needs_protocol: 2,
            }
        );
    }

    #[test]
    fn an_old_agent_gets_round_robin_for_a_strategy_it_does_not_know() {
        use proto::load_balancer::Strategy;
        let balanced = |strategy: Strategy, hash_on: Option<proto::HashOn>| {
            let mut services = services();
            services[0].ports[0].shard_topology = None;
            services[0].ports[1].resilience = Some(proto::ResiliencePolicy {
                load_balancer: Some(proto::LoadBalancer {
                    strategy: strategy.into(),
                    hash_on,
                }),
                ..Default::default()
            });
            services
        };
        for known in [Strategy::RoundRobin, Strategy::LeastRequest] {
            assert!(
                for_level(&balanced(known, None), 1).is_none(),
                "{known:?} is protocol 1"
            );
        }
        let sticky = proto::HashOn {
            kind: Some(proto::hash_on::Kind::Header("x-user".into())),
        };
        for newer in [
            (Strategy::Random, None),
            (Strategy::WeightedRoundRobin, None),
            (Strategy::ConsistentHash, Some(sticky)),
        ] {
            let (services, held_back) = for_level(&balanced(newer.0, newer.1), 1).unwrap();
            let port = &services[0].ports[1];
            let balancer = port
                .resilience
                .as_ref()
                .and_then(|policy| policy.load_balancer.as_ref())
                .unwrap();
            assert_eq!(balancer.strategy, i32::from(Strategy::RoundRobin));
            assert!(balancer.hash_on.is_none());
            assert_eq!(port.endpoints.len(), 1, "the endpoints stay");
            assert_eq!(
                held_back,
                [HeldBack {
                    port: "orders.shop:9090".into(),
                    feature: "loadBalancer.strategy",
                    needs_protocol: 2,
                }]
            );
            assert!(
                for_level(&balanced(newer.0, None), 2).is_none(),
                "a current agent gets {:?} as is",
                newer.0
            );
        }
    }
}
