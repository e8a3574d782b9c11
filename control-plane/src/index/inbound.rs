//! The inbound part of views: RateLimitPolicies resolved onto the Services they target,
//! with the pod ports each limit applies to.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_proto::v1 as proto;

use super::Topology;
use super::diagnostics::Diagnostic;
use super::outbound::has_tcp_port;
use crate::model::{Kind, Model, ObjectName, Protocol, TargetPort};
use crate::wire;

/// The limits enforced by the pods of one Service.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ServiceLimits {
    /// The Service's selector; agents whose labels match it enforce the limits.
    pub selector: BTreeMap<String, String>,
    /// The limits, merged and sorted (see [`merge`]).
    pub limits: Vec<proto::RateLimit>,
}

/// Rate limits by the Service whose pods enforce them.
pub(super) fn limits(
    model: &Model,
    topology: &Topology<'_>,
    diagnostics: &mut BTreeSet<Diagnostic>,
) -> BTreeMap<ObjectName, ServiceLimits> {
    let mut by_service: BTreeMap<ObjectName, ServiceLimits> = BTreeMap::new();
    for policy in model.rate_limit_policies.values() {
        for target in &policy.targets {
            let name = ObjectName::new(policy.name.namespace.as_str(), target.service.as_str());
            let Some(service) = model.services.get(&name) else {
                diagnostics.insert(Diagnostic::MissingService {
                    kind: Kind::RateLimitPolicy,
                    policy: policy.name.clone(),
                    service: target.service.clone(),
                });
                continue;
            };
            let Some(selector) = &service.selector else {
                diagnostics.insert(Diagnostic::NoSelector {
                    policy: policy.name.clone(),
                    service: target.service.clone(),
                });
                continue;
            };
            if let Some(section) = &target.section
                && !has_tcp_port(service, section)
            {
                diagnostics.insert(Diagnostic::MissingSection {
                    kind: Kind::RateLimitPolicy,
                    policy: policy.name.clone(),
                    service: target.service.clone(),
                    section: section.clone(),
                });
                continue;
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
                                policy: policy.name.clone(),
                                service: target.service.clone(),
                                port: port.name.clone(),
                                target_port: target_port.clone(),
                            });
                        }
                        ports.extend(resolved);
                    }
                }
            }
            // An empty port list means "every port" on the wire, so a limit whose ports
            // could not be resolved must not be sent at all.
            if ports.is_empty() {
                continue;
            }
            let ports: Vec<u32> = ports.into_iter().collect();
            let entry = by_service.entry(name).or_insert_with(|| ServiceLimits {
                selector: selector.clone(),
                limits: Vec::new(),
            });
            entry.limits.extend(
                policy
                    .limits
                    .iter()
                    .map(|limit| wire::rate_limit(&policy.name, limit, ports.clone())),
            );
        }
    }
    for entry in by_service.values_mut() {
        merge(&mut entry.limits);
    }
    by_service
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
