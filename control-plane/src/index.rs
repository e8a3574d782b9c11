//! The index: the validated model resolved into what agents need (services with
//! endpoints and effective policies; rate limits by the services whose pods enforce
//! them), versioned so that each agent's view knows when its content last changed.
//!
//! The index keeps a revision that starts at the current Unix time in milliseconds (so
//! versions keep increasing across control-plane restarts) and grows by one per change.
//! The outbound part is built once per change and shared by every agent; each part
//! records the revision at which its content last changed, so that a view's version is
//! the revision at which *its* content last changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use bulwark_proto::v1 as proto;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::metrics::Metrics;
use crate::model::{Endpoint, EndpointSlice, Model, ObjectName, Pod};

pub mod diagnostics;
mod inbound;
mod outbound;
mod routes;

pub use diagnostics::Diagnostic;
pub(crate) use inbound::merge as merge_rate_limits;

/// One published state of the index; cheap to share (everything is behind `Arc`).
#[derive(Debug)]
pub struct IndexState {
    /// The revision of this state.
    pub revision: u64,
    /// Every service, for every agent's outbound view.
    pub outbound: Arc<Outbound>,
    /// Rate limits, looked up per agent.
    pub inbound: Arc<Inbound>,
}

/// The outbound part of every view.
#[derive(Debug, PartialEq)]
pub struct Outbound {
    /// Services in wire form, sorted by namespace and name, each with the revision at
    /// which it last changed (`Service.version`), which deltas are computed from.
    pub services: Vec<proto::Service>,
    /// The revision at which this content last changed.
    pub changed_at: u64,
}

/// Rate limits by namespace and Service, for building agents' inbound views.
#[derive(Debug, Default)]
pub struct Inbound {
    namespaces: BTreeMap<String, NamespaceInbound>,
}

#[derive(Debug, Default)]
struct NamespaceInbound {
    /// By service name.
    services: BTreeMap<String, InboundService>,
    /// The last revision at which a service's limits stopped applying to some pods
    /// (removed, or its selector changed): the only change no remaining entry records.
    removed_at: u64,
}

#[derive(Debug)]
struct InboundService {
    limits: inbound::ServiceLimits,
    changed_at: u64,
}

impl Inbound {
    /// The inbound part (rate limits, authorization policies, and the PeerAuthentication
    /// that takes precedence; none when no policy covers the pod, which the agent reads
    /// as Permissive) for an agent with these labels in this namespace, and the revision
    /// at which it last changed.
    pub fn for_agent(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> (proto::Inbound, u64) {
        let mut inbound = proto::Inbound::default();
        let Some(ns) = self.namespaces.get(namespace) else {
            return (inbound, 0);
        };
        let mut changed_at = ns.removed_at;
        let mut peer_authentication: Option<&inbound::RankedPeerAuthentication> = None;
        for service in ns.services.values() {
            let matches = service
                .limits
                .selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v));
            if matches {
                changed_at = changed_at.max(service.changed_at);
                inbound
                    .rate_limits
                    .extend(service.limits.limits.iter().cloned());
                inbound
                    .authorization
                    .extend(service.limits.authorization.iter().cloned());
                if let Some(candidate) = &service.limits.peer_authentication
                    && peer_authentication.is_none_or(|p| candidate.precedence < p.precedence)
                {
                    peer_authentication = Some(candidate);
                }
            }
        }
        inbound.peer_authentication = peer_authentication.map(|p| p.message.clone());
        merge_rate_limits(&mut inbound.rate_limits);
        inbound::merge_authorization(&mut inbound.authorization);
        (inbound, changed_at)
    }

    fn build(
        previous: &Inbound,
        resolved: BTreeMap<ObjectName, inbound::ServiceLimits>,
        revision: u64,
    ) -> Inbound {
        let mut namespaces: BTreeMap<String, NamespaceInbound> = previous
            .namespaces
            .iter()
            .map(|(ns, old)| {
                let still = |name: &String, old: &InboundService| {
                    resolved
                        .get(&ObjectName::new(ns.as_str(), name.as_str()))
                        .is_some_and(|new| new.selector == old.limits.selector)
                };
                let removed = old.services.iter().any(|(name, svc)| !still(name, svc));
                let removed_at = if removed { revision } else { old.removed_at };
                (
                    ns.clone(),
                    NamespaceInbound {
                        services: BTreeMap::new(),
                        removed_at,
                    },
                )
            })
            .collect();
        for (name, limits) in resolved {
            let old = previous
                .namespaces
                .get(&name.namespace)
                .and_then(|ns| ns.services.get(&name.name));
            let changed_at = match old {
                Some(old) if old.limits == limits => old.changed_at,
                _ => revision,
            };
            namespaces
                .entry(name.namespace)
                .or_default()
                .services
                .insert(name.name, InboundService { limits, changed_at });
        }
        Inbound { namespaces }
    }

    fn same_limits(&self, resolved: &BTreeMap<ObjectName, inbound::ServiceLimits>) -> bool {
        let count: usize = self.namespaces.values().map(|ns| ns.services.len()).sum();
        count == resolved.len()
            && resolved.iter().all(|(name, limits)| {
                self.namespaces
                    .get(&name.namespace)
                    .and_then(|ns| ns.services.get(&name.name))
                    .is_some_and(|old| old.limits == *limits)
            })
    }
}

/// Gives each of `services` its version: the previous service's when its content is the
/// same, else `revision`. Both lists are sorted by namespace and name (the model's
/// order). Returns whether the list changed: a service added, changed or removed.
fn stamp(previous: &[proto::Service], services: &mut [proto::Service], revision: u64) -> bool {
    fn key(s: &proto::Service) -> (&str, &str) {
        (s.namespace.as_str(), s.name.as_str())
    }
    let mut changed = previous.len() != services.len();
    let mut old = previous.iter().peekable();
    for service in services.iter_mut() {
        while old.next_if(|o| key(o) < key(service)).is_some() {
            changed = true;
        }
        match old.next_if(|o| key(o) == key(service)) {
            Some(before) => {
                service.version = before.version;
                if *service != *before {
                    service.version = revision;
                    changed = true;
                }
            }
            None => {
                service.version = revision;
                changed = true;
            }
        }
    }
    changed || old.next().is_some()
}

/// Lookups over a model's topology, built once per resolution.
pub(crate) struct Topology<'a> {
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    pods: &'a BTreeMap<ObjectName, Pod>,
    pods_by_ip: HashMap<(&'a str, IpAddr), &'a Pod>,
    trust_domain: Option<&'a str>,
}

impl<'a> Topology<'a> {
    fn new(model: &'a Model, trust_domain: Option<&'a str>) -> Self {
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        // BTreeMap order: each service's slices come sorted by name.
        for slice in model.endpoint_slices.values() {
            slices
                .entry((slice.name.namespace.as_str(), slice.service.as_str()))
                .or_default()
                .push(slice);
        }
        let mut pods_by_ip = HashMap::new();
        for pod in model.pods.values() {
            for ip in &pod.ips {
                pods_by_ip.insert((pod.name.namespace.as_str(), *ip), pod);
            }
        }
        Topology {
            slices,
            pods: &model.pods,
            pods_by_ip,
            trust_domain,
        }
    }

    /// The EndpointSlices of a service.
    fn slices(&self, service: &'a ObjectName) -> &[&'a EndpointSlice] {
        self.slices
            .get(&(service.namespace.as_str(), service.name.as_str()))
            .map_or(&[], Vec::as_slice)
    }

    /// The ready pods behind a service's endpoints (a pod by its `targetRef`, else by
    /// its address): what a Service-scope rate limit is split over.
    fn ready_pods(&self, service: &'a ObjectName) -> usize {
        let mut pods = BTreeSet::new();
        for endpoint in self
            .slices(service)
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.ready)
        {
            pods.insert(match &endpoint.pod {
                Some(pod) => Err(pod),
                None => Ok(endpoint.address),
            });
        }
        pods.len()
    }

    /// The meshed pods of the model: the callers an outbound Service-scope limit is split
    /// over (any of them may call).
    fn meshed_pods(&self) -> usize {
        self.pods.values().filter(|p| p.meshed).count()
    }

    /// The pod behind an endpoint: by its `targetRef`, else by its address.
    fn pod(&self, namespace: &str, endpoint: &Endpoint) -> Option<&'a Pod> {
        match &endpoint.pod {
            Some(name) => self.pods.get(name),
            None => self.pods_by_ip.get(&(namespace, endpoint.address)).copied(),
        }
    }

    /// The SPIFFE ID a caller must find at `pod`: set when the mesh issues identities
    /// and the pod carries an agent; empty otherwise (plaintext).
    fn identity(&self, pod: Option<&Pod>) -> String {
        let (Some(td), Some(pod)) = (self.trust_domain, pod) else {
            return String::new();
        };
        if !pod.meshed {
            return String::new();
        }
        // A name the API server accepted is always valid; anything else is no identity.
        crate::identity::spiffe::SpiffeId::new(td, &pod.name.namespace, &pod.service_account)
            .map(|id| id.to_string())
            .unwrap_or_default()
    }
}

/// What attaching the policies of `model` finds (conflicts, missing targets), without
/// building a state: the status writer judges each policy by it.
pub fn diagnose(model: &Model) -> BTreeSet<Diagnostic> {
    let mut diagnostics = BTreeSet::new();
    let topology = Topology::new(model, None);
    outbound::services(model, &topology, &mut diagnostics);
    inbound::limits(model, &topology, &mut diagnostics);
    diagnostics
}

/// The index: owns the current state and publishes every new one.
#[derive(Debug)]
pub struct Index {
    state: watch::Sender<Arc<IndexState>>,
    diagnostics: BTreeSet<Diagnostic>,
    metrics: Arc<Metrics>,
    trust_domain: Option<String>,
}

impl Index {
    /// An index over `model`, at `revision`, for a mesh without workload identity.
    pub fn new(revision: u64, model: &Model, metrics: Arc<Metrics>) -> Self {
        Self::with_trust_domain(revision, model, metrics, None)
    }

    /// An index over `model`, at `revision`; with a `trust_domain`, endpoints of meshed
    /// pods carry the SPIFFE ID callers must find there.
    pub fn with_trust_domain(
        revision: u64,
        model: &Model,
        metrics: Arc<Metrics>,
        trust_domain: Option<String>,
    ) -> Self {
        let mut diagnostics = BTreeSet::new();
        let topology = Topology::new(model, trust_domain.as_deref());
        let mut services = outbound::services(model, &topology, &mut diagnostics);
        stamp(&[], &mut services, revision);
        let limits = inbound::limits(model, &topology, &mut diagnostics);
        for d in &diagnostics {
            d.log();
        }
        metrics.set_objects(model);
        metrics.set_revision(revision);
        let state = IndexState {
            revision,
            outbound: Arc::new(Outbound {
                services,
                changed_at: revision,
            }),
            inbound: Arc::new(Inbound::build(&Inbound::default(), limits, revision)),
        };
        Index {
            state: watch::Sender::new(Arc::new(state)),
            diagnostics,
            metrics,
            trust_domain,
        }
    }

    /// Follows the published states.
    pub fn subscribe(&self) -> watch::Receiver<Arc<IndexState>> {
        self.state.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> Arc<IndexState> {
        self.state.borrow().clone()
    }

    /// The current diagnostics (conflicts, missing targets, ...).
    pub fn diagnostics(&self) -> &BTreeSet<Diagnostic> {
        &self.diagnostics
    }

    /// Resolves a new model. Publishes a new state, one revision up, only when what
    /// agents can see changed; returns whether it did.
    pub fn apply(&mut self, model: &Model) -> bool {
        let mut diagnostics = BTreeSet::new();
        let topology = Topology::new(model, self.trust_domain.as_deref());
        let mut services = outbound::services(model, &topology, &mut diagnostics);
        let limits = inbound::limits(model, &topology, &mut diagnostics);
        for d in diagnostics.difference(&self.diagnostics) {
            d.log();
        }
        self.diagnostics = diagnostics;
        self.metrics.set_objects(model);

        let current = self.state();
        let revision = current.revision + 1;
        let same_outbound = !stamp(&current.outbound.services, &mut services, revision);
        let same_inbound = current.inbound.same_limits(&limits);
        if same_outbound && same_inbound {
            return false;
        }
        let outbound = if same_outbound {
            Arc::clone(&current.outbound)
        } else {
            Arc::new(Outbound {
                services,
                changed_at: revision,
            })
        };
        // An unchanged part is shared with the previous state, not rebuilt: views key
        // what they computed from it (encodings, per-label-set limits) by its `Arc`, so a
        // change to one part leaves the work done for the other valid.
        let inbound = if same_inbound {
            Arc::clone(&current.inbound)
        } else {
            Arc::new(Inbound::build(&current.inbound, limits, revision))
        };
        info!(
            revision,
            outbound_changed = !same_outbound,
            inbound_changed = !same_inbound,
            services = outbound.services.len(),
            "configuration changed"
        );
        self.metrics.set_revision(revision);
        self.state.send_replace(Arc::new(IndexState {
            revision,
            outbound,
            inbound,
        }));
        true
    }

    /// Applies every model `models` publishes until `shutdown` is set or the source ends.
    pub fn spawn(
        mut self,
        mut models: watch::Receiver<Arc<Model>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => break,
                    changed = models.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let model = Arc::clone(&models.borrow_and_update());
                        self.apply(&model);
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
