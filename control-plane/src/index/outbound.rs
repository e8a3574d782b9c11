//! The outbound part of every view: services with their ports, ready endpoints and the
//! ResiliencePolicy in force on each port.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

use bulwark_proto::v1 as proto;

use super::Topology;
use super::diagnostics::Diagnostic;
use crate::discovery::wire;
use crate::model::policy::{Direction, LoadBalancer, RateLimitPolicy, ResiliencePolicy};
use crate::model::shard::ShardTopology;
use crate::model::{
    Kind, MAX_WEIGHT, Model, ObjectName, Protocol, Service, ServicePort, TargetRef,
};

/// Every service of the model, in wire form, sorted by namespace and name.
pub(super) fn services(
    model: &Model,
    topology: &Topology<'_>,
    diagnostics: &mut BTreeSet<Diagnostic>,
) -> Vec<proto::Service> {
    let attached = attach(model, diagnostics);
    let sharded = shard_topologies(model);
    let routes = super::routes::Attached::new(model, diagnostics);
    let limited = outbound_limits(model, diagnostics);
    let callers = topology.meshed_pods();
    model
        .services
        .values()
        .map(|service| {
            let key = (service.name.namespace.as_str(), service.name.name.as_str());
            let policies = attached.get(&key).map_or(&[][..], Vec::as_slice);
            let topology_of = sharded.get(&key);
            proto::Service {
                name: service.name.name.clone(),
                namespace: service.name.namespace.clone(),
                ports: service
                    .ports
                    .iter()
                    .filter(|p| p.protocol == Protocol::Tcp)
                    .map(|port| {
                        let policy = effective(service, port, policies, diagnostics);
                        let load_balancer = policy.and_then(|p| p.load_balancer.as_ref());
                        proto::ServicePort {
                            name: port.name.clone(),
                            port: u32::from(port.port),
                            app_protocol: port.app_protocol.clone().unwrap_or_default(),
                            endpoints: endpoints(service, port, topology, load_balancer),
                            resilience: policy.map(wire::resilience),
                            shard_topology: topology_of
                                .filter(|(_, section)| section.is_none_or(|s| s == port.name))
                                .map(|(t, _)| wire::shard_topology(t)),
                            routes: routes.rules(service, port),
                            rate_limits: rate_limits(&limited, service, port, callers),
                        }
                    })
                    .collect(),
                cluster_ips: service
                    .cluster_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                // Stamped by the index, which knows the previous list.
                version: 0,
            }
        })
        .collect()
}

/// Outbound RateLimitPolicies by the service (namespace, name) they target, each with the
/// port it is narrowed to.
type Limited<'a> = HashMap<(&'a str, &'a str), Vec<(&'a RateLimitPolicy, Option<&'a str>)>>;

/// The outbound RateLimitPolicies by target; a missing service or port is diagnosed.
fn outbound_limits<'a>(model: &'a Model, diagnostics: &mut BTreeSet<Diagnostic>) -> Limited<'a> {
    let mut limited: Limited<'a> = HashMap::new();
    for policy in model
        .rate_limit_policies
        .values()
        .filter(|p| p.direction == Direction::Outbound)
    {
        let namespace = policy.name.namespace.as_str();
        for target in &policy.targets {
            diagnose_target(
                model,
                Kind::RateLimitPolicy,
                &policy.name,
                target,
                diagnostics,
            );
            limited
                .entry((namespace, target.service.as_str()))
                .or_default()
                .push((policy, target.section.as_deref()));
        }
    }
    limited
}

/// The outbound limits callers enforce on `port` of `service`, split over `callers`
/// (Service scope), merged and sorted like inbound ones.
fn rate_limits(
    limited: &Limited<'_>,
    service: &Service,
    port: &ServicePort,
    callers: usize,
) -> Vec<proto::RateLimit> {
    let key = (service.name.namespace.as_str(), service.name.name.as_str());
    let mut limits: Vec<proto::RateLimit> = limited
        .get(&key)
        .into_iter()
        .flatten()
        .filter(|(_, section)| section.is_none_or(|s| s == port.name))
        .flat_map(|(policy, _)| {
            policy
                .limits
                .iter()
                .map(|limit| wire::rate_limit(policy, limit, Vec::new(), callers))
        })
        .collect();
    super::merge_rate_limits(&mut limits);
    limits
}

/// Diagnoses a policy's target that names no Service, or no TCP port of it; the policy
/// still attaches, and takes effect when the Service (or port) appears.
fn diagnose_target(
    model: &Model,
    kind: Kind,
    policy: &ObjectName,
    target: &TargetRef,
    diagnostics: &mut BTreeSet<Diagnostic>,
) {
    let name = ObjectName::new(policy.namespace.as_str(), target.service.as_str());
    match model.services.get(&name) {
        None => {
            diagnostics.insert(Diagnostic::MissingService {
                kind,
                policy: policy.clone(),
                service: target.service.clone(),
            });
        }
        Some(service) => {
            if let Some(section) = &target.section
                && !has_tcp_port(service, section)
            {
                diagnostics.insert(Diagnostic::MissingSection {
                    kind,
                    policy: policy.clone(),
                    service: target.service.clone(),
                    section: section.clone(),
                });
            }
        }
    }
}

/// A policy attached to a service, narrowed to one port or not.
type Attachment<'a> = (&'a ResiliencePolicy, Option<&'a str>);

/// ResiliencePolicies by the service (namespace, name) they target.
fn attach<'a>(
    model: &'a Model,
    diagnostics: &mut BTreeSet<Diagnostic>,
) -> HashMap<(&'a str, &'a str), Vec<Attachment<'a>>> {
    let mut attached: HashMap<(&str, &str), Vec<Attachment<'_>>> = HashMap::new();
    for policy in model.resilience_policies.values() {
        let namespace = policy.name.namespace.as_str();
        for target in &policy.targets {
            diagnose_target(
                model,
                Kind::ResiliencePolicy,
                &policy.name,
                target,
                diagnostics,
            );
            attached
                .entry((namespace, target.service.as_str()))
                .or_default()
                .push((policy, target.section.as_deref()));
        }
    }
    attached
}

/// The ShardTopology in force on each service (namespace, name), with the port it is
/// narrowed to: the oldest (creation time, unknown counting as newest, then name) of
/// those naming the service, as the status writer reports (the others are Conflicted).
fn shard_topologies(model: &Model) -> HashMap<(&str, &str), (&ShardTopology, Option<&str>)> {
    let mut ranked: Vec<&ShardTopology> = model.shard_topologies.values().collect();
    ranked.sort_by_key(|t| (t.created.is_none(), t.created, &t.name));
    let mut out = HashMap::new();
    for topology in ranked {
        for target in &topology.targets {
            out.entry((topology.name.namespace.as_str(), target.service.as_str()))
                .or_insert((topology, target.section.as_deref()));
        }
    }
    out
}

pub(super) fn has_tcp_port(service: &Service, name: &str) -> bool {
    service
        .ports
        .iter()
        .any(|p| p.protocol == Protocol::Tcp && p.name == name)
}

/// The policy in force on a port, as in the Gateway API: a policy naming the port
/// (`sectionName`) beats one for the whole service; between equals the oldest
/// (`creationTimestamp`, unknown counting as newest), then `namespace/name`, wins.
fn effective<'a>(
    service: &Service,
    port: &ServicePort,
    policies: &[Attachment<'a>],
    diagnostics: &mut BTreeSet<Diagnostic>,
) -> Option<&'a ResiliencePolicy> {
    let mut candidates: Vec<_> = policies
        .iter()
        .filter(|(_, section)| section.is_none_or(|s| s == port.name))
        .map(|&(policy, section)| {
            let rank = (
                section.is_none(),
                policy.created.is_none(),
                policy.created,
                &policy.name,
            );
            (rank, policy)
        })
        .collect();
    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    let (_, winner) = *candidates.first()?;
    let mut seen = HashSet::from([&winner.name]);
    for (_, loser) in &candidates[1..] {
        if seen.insert(&loser.name) {
            diagnostics.insert(Diagnostic::Conflict {
                service: service.name.clone(),
                port: port.name.clone(),
                winner: winner.name.clone(),
                loser: loser.name.clone(),
            });
        }
    }
    Some(winner)
}

/// The ready endpoints of a service port: from every slice of the service, the slice
/// port with the service port's name. Duplicates across slices are listed once.
fn endpoints(
    service: &Service,
    port: &ServicePort,
    topology: &Topology<'_>,
    load_balancer: Option<&LoadBalancer>,
) -> Vec<proto::Endpoint> {
    let mut seen = HashSet::new();
    let mut endpoints = Vec::new();
    for slice in topology.slices(&service.name) {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == Protocol::Tcp)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().filter(|e| e.ready) {
            let address = SocketAddr::new(endpoint.address, slice_port.port);
            if !seen.insert(address) {
                continue;
            }
            let pod = topology.pod(&service.name.namespace, endpoint);
            let pod_name = endpoint
                .pod
                .as_ref()
                .or(pod.map(|p| &p.name))
                .map(ToString::to_string)
                .unwrap_or_default();
            endpoints.push(proto::Endpoint {
                address: address.to_string(),
                labels: pod
                    .map(|p| {
                        p.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
                weight: weight(pod, load_balancer),
                pod: pod_name,
                identity: topology.identity(pod),
            });
        }
    }
    endpoints
}

/// An endpoint's weight, from the first of: the policy's first `weights` entry whose
/// selector matches the pod; the pod's `bulwark.io/weight` annotation; its
/// `weight_label` value (clamped to 1 to [`MAX_WEIGHT`]); else 1 (weighted balancing
/// then treats it as an ordinary endpoint rather than dropping it).
fn weight(pod: Option<&crate::model::Pod>, load_balancer: Option<&LoadBalancer>) -> u32 {
    let Some(pod) = pod else {
        return 1;
    };
    let by_policy = load_balancer.and_then(|lb| {
        lb.weights
            .iter()
            .find(|rule| {
                rule.match_labels
                    .iter()
                    .all(|(k, v)| pod.labels.get(k) == Some(v))
            })
            .map(|rule| rule.weight)
    });
    let by_label = || {
        load_balancer
            .and_then(|lb| pod.labels.get(lb.weight_label.as_deref()?))
            .and_then(|v| v.parse::<u32>().ok())
            .map(|w| w.clamp(1, MAX_WEIGHT))
    };
    by_policy.or(pod.weight).or_else(by_label).unwrap_or(1)
}
