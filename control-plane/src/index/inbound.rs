//! The inbound part of views: RateLimitPolicies and AuthorizationPolicies resolved onto
//! the pods that enforce them (through the Services they target, with the pod ports
//! each applies to, or through a label selector), and PeerAuthentications by the pods
//! they may cover (which one does is decided per pod, by precedence).

use std::collections::{BTreeMap, BTreeSet};

use bulwark_proto::v1 as proto;

use super::Topology;
use super::diagnostics::Diagnostic;
use super::outbound::has_tcp_port;
use crate::discovery::wire;
use crate::model::authorization::{self as authz, Attachment};
use crate::model::peer_authentication::{PeerAuthentication, Precedence};
use crate::model::policy::Direction;
use crate::model::{Kind, Model, ObjectName, Protocol, TargetPort, TargetRef};

/// The inbound policy enforced by a set of pods: those behind one Service, or those an
/// AuthorizationPolicy or a PeerAuthentication selects by label (or by namespace).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ServiceLimits {
    /// The pods' labels must all match this (an empty one matches every pod of the
    /// namespace); agents whose labels do enforce the policy.
    pub selector: BTreeMap<String, String>,
    /// The rate limits, merged and sorted (see [`merge`]).
    pub limits: Vec<proto::RateLimit>,
    /// The authorization policies, merged and sorted by source (see [`merge_authorization`]).
    pub authorization: Vec<proto::AuthorizationPolicy>,
    /// A PeerAuthentication that covers these pods, unless another one that also
    /// does takes precedence.
    pub peer_authentication: Option<RankedPeerAuthentication>,
}

/// A PeerAuthentication in wire form, with its rank among the policies that may cover
/// the same pod.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RankedPeerAuthentication {
    /// The smaller wins.
    pub precedence: Precedence,
    /// What the pods get when it wins.
    pub message: proto::PeerAuthentication,
}

/// The key of the pods a policy of `kind` selects by label (or by namespace), beside
/// the Services in the same namespace: a `/` never appears in a Service's name, so the
/// two cannot meet.
fn selector_key(kind: Kind, policy: &ObjectName) -> String {
    format!("{kind}/{}", policy.name)
}

/// The Service a policy's target names and the pod ports it reaches, or why not (a
/// diagnostic). `None` when nothing can be enforced.
fn target_ports<'m>(
    model: &'m Model,
    topology: &Topology<'_>,
    kind: Kind,
    policy: &ObjectName,
    target: &TargetRef,
    diagnostics: &mut BTreeSet<Diagnostic>,
) -> Option<(ObjectName, &'m BTreeMap<String, String>, Vec<u32>)> {
    let name = ObjectName::new(policy.namespace.as_str(), target.service.as_str());
    let Some(service) = model.services.get(&name) else {
        diagnostics.insert(Diagnostic::MissingService {
            kind,
            policy: policy.clone(),
            service: target.service.clone(),
        });
        return None;
    };
    let Some(selector) = &service.selector else {
        diagnostics.insert(Diagnostic::NoSelector {
            kind,
            policy: policy.clone(),
            service: target.service.clone(),
        });
        return None;
    };
    if let Some(section) = &target.section
        && !has_tcp_port(service, section)
    {
        diagnostics.insert(Diagnostic::MissingSection {
            kind,
            policy: policy.clone(),
            service: target.service.clone(),
            section: section.clone(),
        });
        return None;
    }
    let mut ports = BTreeSet::new();
    for port in service.ports.iter().filter(|p| {
        p.protocol == Protocol::Tcp && target.section.as_ref().is_none_or(|s| *s == p.name)
    }) {
        match &port.target_port {
            TargetPort::Number(n) => {
                ports.insert(u32::from(*n));
            }
            TargetPort::Name(target_port) => {
                let resolved = topology
                    .slices(&service.name)
                    .iter()
                    .flat_map(|s| s.ports.iter())
                    .filter(|p| p.name == port.name && p.protocol == Protocol::Tcp)
                    .map(|p| u32::from(p.port))
                    .collect::<Vec<_>>();
                if resolved.is_empty() {
                    diagnostics.insert(Diagnostic::UnresolvedTargetPort {
                        kind,
                        policy: policy.clone(),
                        service: target.service.clone(),
                        port: port.name.clone(),
                        target_port: target_port.clone(),
                    });
                }
                ports.extend(resolved);
            }
        }
    }
    // An empty port list means "every port" on the wire, so a policy whose ports could
    // not be resolved must not be sent at all.
    if ports.is_empty() {
        return None;
    }
    Some((name, selector, ports.into_iter().collect()))
}

/// Rate limits and authorization policies by the pods that enforce them.
pub(super) fn limits(
    model: &Model,
    topology: &Topology<'_>,
    diagnostics: &mut BTreeSet<Diagnostic>,
) -> BTreeMap<ObjectName, ServiceLimits> {
    let mut by_service: BTreeMap<ObjectName, ServiceLimits> = BTreeMap::new();
    for policy in model
        .rate_limit_policies
        .values()
        .filter(|p| p.direction == Direction::Inbound)
    {
        for target in &policy.targets {
            let Some((name, selector, ports)) = target_ports(
                model,
                topology,
                Kind::RateLimitPolicy,
                &policy.name,
                target,
                diagnostics,
            ) else {
                continue;
            };
            let pods = topology.ready_pods(&name);
            entry(&mut by_service, name, selector).limits.extend(
                policy
                    .limits
                    .iter()
                    .map(|limit| wire::rate_limit(policy, limit, ports.clone(), pods)),
            );
        }
    }
    for policy in model.authorization_policies.values() {
        match &policy.attachment {
            Attachment::Targets(targets) => {
                for target in targets {
                    let Some((name, selector, ports)) = target_ports(
                        model,
                        topology,
                        Kind::AuthorizationPolicy,
                        &policy.name,
                        target,
                        diagnostics,
                    ) else {
                        continue;
                    };
                    entry(&mut by_service, name, selector)
                        .authorization
                        .push(authorization_message(policy, ports));
                }
            }
            Attachment::Selector(labels) => {
                let name = ObjectName::new(
                    policy.name.namespace.as_str(),
                    selector_key(Kind::AuthorizationPolicy, &policy.name),
                );
                entry(&mut by_service, name, labels)
                    .authorization
                    .push(authorization_message(policy, Vec::new()));
            }
        }
    }
    let every_pod = BTreeMap::new();
    for policy in model.peer_authentications.values() {
        let name = ObjectName::new(
            policy.name.namespace.as_str(),
            selector_key(Kind::PeerAuthentication, &policy.name),
        );
        let selector = policy.selector.as_ref().unwrap_or(&every_pod);
        entry(&mut by_service, name, selector).peer_authentication =
            Some(RankedPeerAuthentication {
                precedence: policy.precedence(),
                message: wire::peer_authentication(policy),
            });
    }
    peer_authentication_conflicts(model, diagnostics);
    for entry in by_service.values_mut() {
        merge(&mut entry.limits);
        merge_authorization(&mut entry.authorization);
    }
    by_service
}

/// The entry of the pods behind `name`, made with `selector` the first time.
fn entry<'a>(
    by_service: &'a mut BTreeMap<ObjectName, ServiceLimits>,
    name: ObjectName,
    selector: &BTreeMap<String, String>,
) -> &'a mut ServiceLimits {
    by_service.entry(name).or_insert_with(|| ServiceLimits {
        selector: selector.clone(),
        limits: Vec::new(),
        authorization: Vec::new(),
        peer_authentication: None,
    })
}

/// Diagnoses every PeerAuthentication that loses somewhere: a namespace-wide one to an
/// older namespace-wide one, a selector one to another that selects the same pod of the
/// model and ranks first. A selector policy beating a namespace-wide one is the point
/// of having both, not a conflict.
fn peer_authentication_conflicts(model: &Model, diagnostics: &mut BTreeSet<Diagnostic>) {
    let mut wide: BTreeMap<&str, Vec<(Precedence, &PeerAuthentication)>> = BTreeMap::new();
    let mut selecting: BTreeMap<&str, Vec<(Precedence, &PeerAuthentication)>> = BTreeMap::new();
    for policy in model.peer_authentications.values() {
        let by_namespace = if policy.selector.is_none() {
            &mut wide
        } else {
            &mut selecting
        };
        by_namespace
            .entry(policy.name.namespace.as_str())
            .or_default()
            .push((policy.precedence(), policy));
    }
    let mut conflict = |winner: &PeerAuthentication, loser: &PeerAuthentication| {
        diagnostics.insert(Diagnostic::PeerAuthenticationConflict {
            winner: winner.name.clone(),
            loser: loser.name.clone(),
            namespace_wide: loser.selector.is_none(),
        });
    };
    for policies in wide.values_mut().chain(selecting.values_mut()) {
        policies.sort_by(|a, b| a.0.cmp(&b.0));
    }
    for policies in wide.values() {
        if let [(_, winner), losers @ ..] = policies.as_slice() {
            for (_, loser) in losers {
                conflict(winner, loser);
            }
        }
    }
    for pod in model.pods.values() {
        let Some(policies) = selecting.get(pod.name.namespace.as_str()) else {
            continue;
        };
        // Sorted: the first policy that selects the pod wins it.
        let mut covering = policies.iter().filter(|(_, p)| p.selects(&pod.labels));
        if let Some((_, winner)) = covering.next() {
            for (_, loser) in covering {
                conflict(winner, loser);
            }
        }
    }
}

/// An AuthorizationPolicy as the agent enforces it on `ports` (empty: every port).
fn authorization_message(
    policy: &authz::AuthorizationPolicy,
    ports: Vec<u32>,
) -> proto::AuthorizationPolicy {
    let name = |n: &authz::NamePattern| match n {
        authz::NamePattern::Any => "*".to_owned(),
        authz::NamePattern::Exact(v) => v.clone(),
    };
    proto::AuthorizationPolicy {
        source: policy.name.to_string(),
        ports,
        shadow: policy.mode == authz::Mode::Shadow,
        rules: policy
            .rules
            .iter()
            .map(|rule| proto::AuthorizationRule {
                from: rule
                    .from
                    .iter()
                    .map(|s| proto::SourceMatch {
                        trust_domain: name(&s.trust_domain),
                        namespace: name(&s.namespace),
                        service_account: name(&s.service_account),
                    })
                    .collect(),
                to: rule
                    .to
                    .iter()
                    .map(|o| proto::OperationMatch {
                        methods: o.methods.clone(),
                        paths: o
                            .paths
                            .iter()
                            .map(|p| proto::PathMatch {
                                kind: Some(match p {
                                    authz::PathMatch::Exact(e) => {
                                        proto::path_match::Kind::Exact(e.clone())
                                    }
                                    authz::PathMatch::Prefix(e) => {
                                        proto::path_match::Kind::Prefix(e.clone())
                                    }
                                }),
                            })
                            .collect(),
                    })
                    .collect(),
                when: rule
                    .when
                    .iter()
                    .map(|c| proto::HeaderCondition {
                        name: c.name.clone(),
                        values: c.values.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Sorts authorization policies by source and merges the entries of one policy that
/// reaches a pod through several targets into one with the union of their ports (an
/// entry with every port absorbs the rest).
pub(crate) fn merge_authorization(policies: &mut Vec<proto::AuthorizationPolicy>) {
    policies.sort_by(|a, b| a.source.cmp(&b.source));
    policies.dedup_by(|later, kept| {
        if later.source != kept.source {
            return false;
        }
        if kept.ports.is_empty() || later.ports.is_empty() {
            kept.ports.clear();
        } else {
            kept.ports.append(&mut later.ports);
            kept.ports.sort_unstable();
            kept.ports.dedup();
        }
        true
    });
}

/// Sorts limits by policy and name and merges the entries of the same limit (a policy
/// reaching a pod through several targets) into one with the union of their ports.
pub(crate) fn merge(limits: &mut Vec<proto::RateLimit>) {
    limits.sort_by(|a, b| (&a.source, &a.name).cmp(&(&b.source, &b.name)));
    limits.dedup_by(|later, kept| {
        if later.source == kept.source && later.name == kept.name {
            kept.ports.append(&mut later.ports);
            kept.ports.sort_unstable();
            kept.ports.dedup();
            true
        } else {
            false
        }
    });
}
