//! What one agent sees: every service of the mesh (outbound, shared by all agents) and
//! the rate limits, authorization policies and mutual-TLS mode its own pod enforces
//! (inbound). A view only produces a snapshot when its content changed; its version is
//! the index revision of that change.
//!
//! The first snapshot of a stream is the whole view. After it, an agent of protocol
//! [`bulwark_proto::INCREMENTAL_SINCE`] or newer gets deltas: the services added or
//! changed since the snapshot before (found by `Service.version`, the revision at
//! which each last changed), the ones removed, and the inbound part only when it
//! changed. An older agent gets the whole view at every change. A view whose agent
//! NACKed a delta sends the whole view next ([`AgentView::nacked`]).
//!
//! Work shared by all agents is done once per index state, not once per agent: the
//! outbound part is encoded to protobuf once and every whole snapshot carries those
//! bytes (a change to 10,000 agents used to deep-copy and re-encode the whole service
//! list 10,000 times); a delta is computed and encoded once per pair of outbound
//! states (agents that were sent the same state share it); and the inbound limits are
//! computed once per namespace and label set (pods of one Deployment share them). See
//! [`ViewCache`].
//!
//! Agents of an older protocol get the outbound part without what they cannot enforce
//! ([`crate::discovery::compat`]); that variant too is built and encoded once per index state and
//! protocol level, lazily, the first time an agent of that level needs it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use crate::discovery::compat::{self, HeldBack};
use crate::index::{Inbound, IndexState, Outbound};
use bulwark_proto::v1 as proto;
use bytes::{BufMut, Bytes, BytesMut};

/// The protobuf field numbers of `Snapshot`.
const VERSION_FIELD: u32 = 1;
const SERVICES_FIELD: u32 = 2;
const INBOUND_FIELD: u32 = 3;
const BASE_VERSION_FIELD: u32 = 4;
const REMOVED_FIELD: u32 = 5;

/// The view of one connected agent, remembering what it was last sent.
#[derive(Debug)]
pub struct AgentView {
    namespace: String,
    labels: BTreeMap<String, String>,
    cache: Arc<ViewCache>,
    /// The protocol level the agent is served at ([`compat::level`]).
    level: u32,
    /// Whether the agent takes deltas.
    incremental: bool,
    sent: Option<PendingSnapshot>,
    /// The pod's inbound part the last snapshot was made from, before anything was held
    /// back from it: compared with the next one, so that an older agent's stripped
    /// inbound part does not read as a change at every new index state.
    sent_inbound: Option<Arc<proto::Inbound>>,
    /// The next snapshot goes whole: the agent refused what it was sent, so what it
    /// holds is not what the view last produced.
    resync: bool,
    /// A snapshot is owed even if nothing changed (the whole view after a NACKed delta).
    owed: bool,
    /// The version of the last whole snapshot produced (0: none yet).
    last_whole: u64,
}

/// A snapshot ready to go out, whole or a delta. It holds the shared outbound part by
/// reference (the service list and its encoding, or the delta's), so agents waiting to
/// receive it cost no copy of the mesh.
#[derive(Clone, Debug)]
pub struct PendingSnapshot {
    version: u64,
    /// 0: the whole view; else the version this delta applies onto.
    base_version: u64,
    /// The whole outbound part the agent holds once it applied this snapshot.
    outbound: Arc<Outbound>,
    /// For a delta, what changed in the outbound part; `None` for a whole snapshot.
    delta: Option<SharedDelta>,
    /// `outbound.services` as `Snapshot.services` fields, shared by every agent of the
    /// same protocol level (a whole snapshot).
    outbound_encoded: Bytes,
    /// The inbound part of the agent's pod (rate limits, authorization, mutual-TLS
    /// mode), shared by the agents with the same namespace and labels.
    inbound: Arc<proto::Inbound>,
    /// Whether the message carries `inbound`: always in a whole snapshot, only when it
    /// changed in a delta.
    with_inbound: bool,
    /// What the agent's protocol level cannot enforce and was left out.
    held_back: Arc<[HeldBack]>,
}

impl PendingSnapshot {
    /// What was held back because the agent's protocol is too old (empty for a current agent).
    pub fn held_back(&self) -> &[HeldBack] {
        &self.held_back
    }

    /// The snapshot's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// For a delta, the version it applies onto; `None` for the whole view.
    pub fn base_version(&self) -> Option<u64> {
        (self.base_version != 0).then_some(self.base_version)
    }

    /// The rate limits of the agent's pod.
    pub fn rate_limits(&self) -> &[proto::RateLimit] {
        &self.inbound.rate_limits
    }

    /// The authorization policies of the agent's pod.
    pub fn authorization(&self) -> &[proto::AuthorizationPolicy] {
        &self.inbound.authorization
    }

    /// The PeerAuthentication of the agent's pod (none: Permissive).
    pub fn peer_authentication(&self) -> Option<&proto::PeerAuthentication> {
        self.inbound.peer_authentication.as_ref()
    }

    /// The wire message, as a struct (a deep copy of the services: for tests and
    /// diagnostics; the stream sends [`PendingSnapshot::encode`]'s bytes).
    pub fn to_snapshot(&self) -> proto::Snapshot {
        let (services, removed_services) = match &self.delta {
            None => (self.outbound.services.clone(), Vec::new()),
            Some(delta) => (delta.changes.updated.clone(), delta.changes.removed.clone()),
        };
        proto::Snapshot {
            version: self.version,
            services,
            inbound: self.with_inbound.then(|| (*self.inbound).clone()),
            base_version: self.base_version,
            removed_services,
        }
    }

    /// The `Snapshot.services` fields (and, for a delta, the `removed_services` ones).
    fn outbound_parts(&self) -> (&Bytes, Option<&Bytes>) {
        match &self.delta {
            None => (&self.outbound_encoded, None),
            Some(delta) => (&delta.updated_encoded, Some(&delta.removed_encoded)),
        }
    }

    /// The length of [`PendingSnapshot::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let uint64 = |field: u32, value: u64| {
            if value == 0 {
                0
            } else {
                prost::encoding::uint64::encoded_len(field, &value)
            }
        };
        let (services, removed) = self.outbound_parts();
        let inbound = if self.with_inbound {
            prost::encoding::message::encoded_len(INBOUND_FIELD, &*self.inbound)
        } else {
            0
        };
        uint64(VERSION_FIELD, self.version)
            + services.len()
            + inbound
            + uint64(BASE_VERSION_FIELD, self.base_version)
            + removed.map_or(0, Bytes::len)
    }

    /// Writes the `Snapshot` message: the same bytes prost would write for
    /// [`PendingSnapshot::to_snapshot`] (fields in number order), with the services
    /// copied from the shared encoding instead of encoded again.
    pub fn encode(&self, buf: &mut impl BufMut) {
        if self.version != 0 {
            prost::encoding::uint64::encode(VERSION_FIELD, &self.version, buf);
        }
        let (services, removed) = self.outbound_parts();
        buf.put_slice(services);
        if self.with_inbound {
            prost::encoding::message::encode(INBOUND_FIELD, &*self.inbound, buf);
        }
        if self.base_version != 0 {
            prost::encoding::uint64::encode(BASE_VERSION_FIELD, &self.base_version, buf);
        }
        if let Some(removed) = removed {
            buf.put_slice(removed);
        }
    }
}

impl PendingSnapshot {
    /// The snapshot as one gRPC message in parts, in order: a new buffer with the 5-byte
    /// gRPC prefix (uncompressed, the length) and the version; the services' shared
    /// encoding, by reference; a new buffer with the inbound part and the base version;
    /// the removals' shared encoding. Together they are the prefix and
    /// [`PendingSnapshot::encode`]'s bytes; empty parts are left out.
    pub fn chunks(&self) -> Vec<Bytes> {
        let (services, removed) = self.outbound_parts();
        // A message over 4 GiB cannot be built from a mesh in memory.
        let len = u32::try_from(self.encoded_len()).unwrap_or(u32::MAX);
        let mut head = BytesMut::with_capacity(5 + 10);
        head.put_u8(0);
        head.put_u32(len);
        if self.version != 0 {
            prost::encoding::uint64::encode(VERSION_FIELD, &self.version, &mut head);
        }
        let mut tail = BytesMut::new();
        if self.with_inbound {
            prost::encoding::message::encode(INBOUND_FIELD, &*self.inbound, &mut tail);
        }
        if self.base_version != 0 {
            prost::encoding::uint64::encode(BASE_VERSION_FIELD, &self.base_version, &mut tail);
        }
        [
            Some(head.freeze()),
            Some(services.clone()),
            Some(tail.freeze()),
            removed.cloned(),
        ]
        .into_iter()
        .flatten()
        .filter(|chunk| !chunk.is_empty())
        .collect()
    }
}

/// What every agent's view shares: the encoding of the current outbound part, the
/// deltas to it from the outbound parts agents were last sent, and the inbound limits of
/// each (namespace, labels) for the current inbound part. Each is computed by the first
/// agent that needs it and reused until the index moves on.
#[derive(Debug, Default)]
pub struct ViewCache {
    /// For one outbound state: its variant per protocol level.
    outbound: Mutex<Option<(Arc<Outbound>, ByLevel)>>,
    /// For one outbound state: the deltas to it, by the `changed_at` of the state they
    /// start from and by protocol level.
    deltas: Mutex<Option<(Arc<Outbound>, DeltasTo)>>,
    inbound: Mutex<InboundMemo>,
}

/// The variants of one outbound state, by protocol level.
type ByLevel = HashMap<u32, SharedOutbound>;

/// The deltas to one outbound state, by the `changed_at` of the state each starts
/// from and by protocol level.
type DeltasTo = HashMap<(u64, u32), SharedDelta>;

/// The outbound part as agents of one protocol level get it.
#[derive(Clone, Debug)]
struct SharedOutbound {
    /// The services (the index's own `Arc` when nothing is held back).
    outbound: Arc<Outbound>,
    /// `outbound.services` as `Snapshot.services` fields.
    encoded: Bytes,
    held_back: Arc<[HeldBack]>,
}

/// What changed between two outbound states, as agents of one protocol level get it.
#[derive(Clone, Debug)]
struct SharedDelta {
    changes: Arc<OutboundDelta>,
    /// `changes.updated` as `Snapshot.services` fields.
    updated_encoded: Bytes,
    /// `changes.removed` as `Snapshot.removed_services` fields.
    removed_encoded: Bytes,
}

/// The services added or changed, and the ones removed, between two outbound states.
#[derive(Debug, Default, PartialEq)]
pub struct OutboundDelta {
    /// Added or changed, in the list's order (namespace, then name).
    pub updated: Vec<proto::Service>,
    /// Gone, in the same order.
    pub removed: Vec<proto::ServiceRef>,
}

impl OutboundDelta {
    /// What changed from `from` to `to`: a walk of both sorted lists comparing each
    /// service's version, so its cost is the number of services, not their content.
    pub fn between(from: &Outbound, to: &Outbound) -> Self {
        fn key(s: &proto::Service) -> (&str, &str) {
            (s.namespace.as_str(), s.name.as_str())
        }
        let mut delta = OutboundDelta::default();
        let gone = |s: &proto::Service| proto::ServiceRef {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            version: to.changed_at,
        };
        let mut old = from.services.iter().peekable();
        for service in &to.services {
            while let Some(removed) = old.next_if(|o| key(o) < key(service)) {
                delta.removed.push(gone(removed));
            }
            match old.next_if(|o| key(o) == key(service)) {
                Some(before) if before.version == service.version => {}
                _ => delta.updated.push(service.clone()),
            }
        }
        delta.removed.extend(old.map(gone));
        delta
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.updated.is_empty() && self.removed.is_empty()
    }
}

/// Inbound limits by namespace and labels, for one inbound state.
#[derive(Debug, Default)]
struct InboundMemo {
    of: Option<Arc<Inbound>>,
    #[allow(clippy::type_complexity)]
    limits: HashMap<String, HashMap<BTreeMap<String, String>, (Arc<proto::Inbound>, u64)>>,
}

/// `messages` as repeated fields number `field`, in one buffer.
fn encode_repeated<M: prost::Message>(field: u32, messages: &[M]) -> Bytes {
    let len = messages
        .iter()
        .map(|m| prost::encoding::message::encoded_len(field, m))
        .sum();
    let mut buf = BytesMut::with_capacity(len);
    for message in messages {
        prost::encoding::message::encode(field, message, &mut buf);
    }
    buf.freeze()
}

impl ViewCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// `outbound` as agents at protocol `level` get it, with its services encoded as
    /// `Snapshot.services` fields: once per outbound state and level.
    fn outbound(&self, outbound: &Arc<Outbound>, level: u32) -> SharedOutbound {
        let mut cached = self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
        let levels = match cached.as_mut() {
            Some((of, levels)) if Arc::ptr_eq(of, outbound) => levels,
            _ => &mut cached.insert((Arc::clone(outbound), HashMap::new())).1,
        };
        if let Some(found) = levels.get(&level) {
            return found.clone();
        }
        let (outbound, held_back) = match compat::for_level(&outbound.services, level) {
            None => (Arc::clone(outbound), Vec::new()),
            Some((services, held_back)) => (
                Arc::new(Outbound {
                    services,
                    changed_at: outbound.changed_at,
                }),
                held_back,
            ),
        };
        let shared = SharedOutbound {
            encoded: encode_repeated(SERVICES_FIELD, &outbound.services),
            outbound,
            held_back: held_back.into(),
        };
        levels.insert(level, shared.clone());
        shared
    }

    /// The delta from `from` to `to` as agents at protocol `level` get it: once per pair
    /// of outbound states and level (every agent that was sent `from` shares it).
    fn delta(&self, from: &Outbound, to: &Arc<Outbound>, level: u32) -> SharedDelta {
        let mut cached = self.deltas.lock().unwrap_or_else(PoisonError::into_inner);
        let deltas = match cached.as_mut() {
            Some((of, deltas)) if Arc::ptr_eq(of, to) => deltas,
            _ => &mut cached.insert((Arc::clone(to), HashMap::new())).1,
        };
        if let Some(found) = deltas.get(&(from.changed_at, level)) {
            return found.clone();
        }
        let mut changes = OutboundDelta::between(from, to);
        if let Some((services, _)) = compat::for_level(&changes.updated, level) {
            // What is held back is reported from the whole view's variant; a delta
            // only carries the stripped services.
            changes.updated = services;
        }
        let shared = SharedDelta {
            updated_encoded: encode_repeated(SERVICES_FIELD, &changes.updated),
            removed_encoded: encode_repeated(REMOVED_FIELD, &changes.removed),
            changes: Arc::new(changes),
        };
        deltas.insert((from.changed_at, level), shared.clone());
        shared
    }

    /// The limits of pods with `labels` in `namespace`, once per inbound state and label set.
    fn inbound(
        &self,
        inbound: &Arc<Inbound>,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> (Arc<proto::Inbound>, u64) {
        let mut memo = self.inbound.lock().unwrap_or_else(PoisonError::into_inner);
        if !memo.of.as_ref().is_some_and(|of| Arc::ptr_eq(of, inbound)) {
            memo.of = Some(Arc::clone(inbound));
            memo.limits.clear();
        }
        // Looked up by reference first: the common case (a label set seen before)
        // allocates nothing.
        if let Some(found) = memo.limits.get(namespace).and_then(|ns| ns.get(labels)) {
            return found.clone();
        }
        let (part, changed_at) = inbound.for_agent(namespace, labels);
        let value = (Arc::new(part), changed_at);
        memo.limits
            .entry(namespace.to_owned())
            .or_default()
            .insert(labels.clone(), value.clone());
        value
    }
}

impl AgentView {
    /// The view of an agent in `namespace` whose pod has `labels`, sharing `cache` with
    /// the other agents' views.
    pub fn new(
        namespace: impl Into<String>,
        labels: BTreeMap<String, String>,
        cache: Arc<ViewCache>,
    ) -> Self {
        AgentView {
            namespace: namespace.into(),
            labels,
            cache,
            level: bulwark_proto::PROTOCOL_VERSION,
            incremental: true,
            sent: None,
            sent_inbound: None,
            resync: false,
            owed: false,
            last_whole: 0,
        }
    }

    /// The same view for an agent that speaks `protocol_version`: what it cannot
    /// enforce is held back ([`compat`]), and below
    /// [`bulwark_proto::INCREMENTAL_SINCE`] every snapshot is the whole view.
    pub fn with_protocol(mut self, protocol_version: u32) -> Self {
        self.level = compat::level(protocol_version);
        self.incremental = self.level >= bulwark_proto::INCREMENTAL_SINCE;
        self
    }

    /// The version last produced, if any.
    pub fn version(&self) -> Option<u64> {
        self.sent.as_ref().map(|s| s.version)
    }

    /// The agent NACKed `version`. The view then sends the whole view at its next
    /// snapshot (the agent holds an older version than the one deltas would start
    /// from), and says whether that should go now: yes when a delta was refused (the
    /// whole view may apply where the delta did not: the agent may have missed one),
    /// no when the whole view itself was (it would be refused again; the next change
    /// may mend it). A NACK of a version older than the last whole snapshot says
    /// nothing new and changes nothing.
    pub fn nacked(&mut self, version: u64) -> bool {
        if !self.incremental || version < self.last_whole {
            return false;
        }
        self.resync = true;
        self.owed = version > self.last_whole;
        self.owed
    }

    /// The next snapshot for this agent, or `None` when its content is unchanged (and
    /// no whole view is owed after a NACK).
    pub fn update(&mut self, state: &IndexState) -> Option<PendingSnapshot> {
        let (inbound, inbound_changed_at) =
            self.cache
                .inbound(&state.inbound, &self.namespace, &self.labels);
        let inbound_same = self.sent_inbound.as_ref() == Some(&inbound);
        if let Some(sent) = &self.sent
            && !self.owed
            && sent.outbound.changed_at == state.outbound.changed_at
            && inbound_same
        {
            return None;
        }
        // The newest change among the parts this view is made of. It is exact for a
        // fresh view too, so an agent that reconnects to an unchanged mesh gets the
        // version it already has.
        let mut version = state.outbound.changed_at.max(inbound_changed_at);
        if let Some(sent) = &self.sent {
            // Versions never repeat for one agent, whatever the bookkeeping above says.
            version = version.max(sent.version + 1);
        }
        let shared = self.cache.outbound(&state.outbound, self.level);
        self.sent_inbound = Some(Arc::clone(&inbound));
        let (inbound, held_back) = match compat::hold_back_inbound(&inbound, self.level) {
            None => (inbound, shared.held_back),
            Some((stripped, inbound_held_back)) => {
                let mut all = shared.held_back.to_vec();
                all.extend(inbound_held_back);
                (stripped, all.into())
            }
        };
        let base = self
            .sent
            .as_ref()
            .filter(|_| self.incremental && !self.resync);
        let snapshot = match base {
            Some(sent) => PendingSnapshot {
                version,
                base_version: sent.version,
                delta: Some(
                    self.cache
                        .delta(&sent.outbound, &state.outbound, self.level),
                ),
                outbound: shared.outbound,
                outbound_encoded: Bytes::new(),
                inbound,
                with_inbound: !inbound_same,
                held_back,
            },
            None => {
                self.last_whole = version;
                PendingSnapshot {
                    version,
                    base_version: 0,
                    delta: None,
                    outbound: shared.outbound,
                    outbound_encoded: shared.encoded,
                    inbound,
                    with_inbound: true,
                    held_back,
                }
            }
        };
        self.resync = false;
        self.owed = false;
        self.sent = Some(snapshot.clone());
        Some(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::index::Index;
    use crate::metrics::Metrics;
    use crate::model::Model;
    use crate::testing::{examples, with_document};

    const START: u64 = 1_000;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A view with a cache of its own.
    fn view(namespace: &str, labels: BTreeMap<String, String>) -> AgentView {
        AgentView::new(namespace, labels, Arc::new(ViewCache::new()))
    }

    struct Mesh {
        index: Index,
        cache: Arc<ViewCache>,
        frontend: AgentView,
        catalog: AgentView,
        other_namespace: AgentView,
    }

    impl Mesh {
        fn new(model: &Model) -> Self {
            // The three views share a cache, as every stream of a control plane does.
            let cache = Arc::new(ViewCache::new());
            let shared = |namespace: &str, pairs: &[(&str, &str)]| {
                AgentView::new(namespace, labels(pairs), Arc::clone(&cache))
            };
            let mut mesh = Mesh {
                index: Index::new(START, model, Arc::new(Metrics::new())),
                cache: Arc::clone(&cache),
                frontend: shared("demo", &[("app", "frontend"), ("pod", "a")]),
                catalog: shared("demo", &[("app", "catalog")]),
                other_namespace: shared("prod", &[("app", "frontend")]),
            };
            let state = mesh.index.state();
            for v in mesh.views() {
                let _ = v.update(&state);
            }
            mesh
        }

        fn views(&mut self) -> [&mut AgentView; 3] {
            [
                &mut self.frontend,
                &mut self.catalog,
                &mut self.other_namespace,
            ]
        }

        /// Applies a model and returns the new snapshot (if any) of each agent.
        fn apply(&mut self, model: &Model) -> [Option<u64>; 3] {
            self.index.apply(model);
            let state = self.index.state();
            self.views().map(|v| v.update(&state).map(|s| s.version()))
        }
    }

    #[test]
    fn the_first_view_carries_everything() {
        let mut view = view("demo", labels(&[("app", "frontend")]));
        let index = Index::new(START, &examples(), Arc::new(Metrics::new()));
        let snapshot = view.update(&index.state()).unwrap().to_snapshot();
        assert_eq!(snapshot.version, START);
        assert_eq!(snapshot.services.len(), 4);
        let limits = snapshot.inbound.unwrap().rate_limits;
        assert_eq!(
            limits.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["per-tenant", "total"]
        );
        assert!(limits.iter().all(|l| l.ports == [8080]));
        assert!(view.update(&index.state()).is_none(), "nothing new");
    }

    #[test]
    fn a_resilience_policy_change_reaches_every_agent() {
        let mut mesh = Mesh::new(&examples());
        let edited = with_document(
            examples(),
            "apiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
             metadata: {name: reviews, namespace: demo}\n\
             spec: {targetRefs: [{kind: Service, name: reviews}], retry: {attempts: 5}}\n",
        );
        assert_eq!(mesh.apply(&edited), [Some(START + 1); 3]);
    }

    #[test]
    fn a_rate_limit_change_reaches_only_the_matching_pods() {
        let mut mesh = Mesh::new(&examples());
        let edited = with_document(
            examples(),
            "apiVersion: bulwark.io/v1alpha1\nkind: RateLimitPolicy\n\
             metadata: {name: frontend, namespace: demo}\n\
             spec:\n  targetRefs: [{kind: Service, name: frontend}]\n\
             \x20 limits: [{name: total, rate: {requests: 50, per: 1s}}]\n",
        );
        assert_eq!(mesh.apply(&edited), [Some(START + 1), None, None]);
        assert_eq!(mesh.frontend.version(), Some(START + 1));
        assert_eq!(
            mesh.catalog.version(),
            Some(START),
            "catalog's view did not change"
        );
    }

    #[test]
    fn no_change_means_no_new_version() {
        let mut mesh = Mesh::new(&examples());
        assert_eq!(mesh.apply(&examples()), [None; 3]);
        assert_eq!(
            mesh.index.state().revision,
            START,
            "no revision for nothing"
        );

        // A change that no agent can see (an unused Pod) sends nothing either.
        let with_pod = with_document(
            examples(),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: idle, namespace: demo, labels: {app: idle}}\n",
        );
        assert_eq!(mesh.apply(&with_pod), [None; 3]);
    }

    #[test]
    fn losing_its_limits_is_a_change_for_the_pod() {
        let mut mesh = Mesh::new(&examples());
        let mut without = examples();
        // Every inbound policy of the frontend's pods goes: their entry is removed.
        without.rate_limit_policies.clear();
        without.authorization_policies.clear();
        assert_eq!(mesh.apply(&without), [Some(START + 1), None, None]);

        // A fresh view (a reconnecting agent) gets the same version for the same content.
        let state = mesh.index.state();
        let mut fresh = view("demo", labels(&[("app", "frontend")]));
        assert_eq!(fresh.update(&state).unwrap().version(), START + 1);
        let mut fresh_catalog = view("demo", labels(&[("app", "catalog")]));
        assert_eq!(
            fresh_catalog.update(&state).unwrap().version(),
            START + 1,
            "conservative: a removal in a namespace counts for every fresh view there, \
             so a reconnecting agent never gets a version below one it already had"
        );
    }

    #[test]
    fn a_reconnecting_agent_gets_the_version_it_has_when_nothing_changed() {
        let mut mesh = Mesh::new(&examples());
        let edited = with_document(
            examples(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: demo}\n\
             spec: {ports: [{port: 80}]}\n",
        );
        assert_eq!(mesh.apply(&edited), [Some(START + 1); 3]);
        let mut fresh = view("demo", labels(&[("app", "catalog")]));
        assert_eq!(
            fresh.update(&mesh.index.state()).unwrap().version(),
            START + 1
        );
    }

    #[test]
    fn the_shared_encoding_is_what_prost_writes_for_the_whole_message() {
        let mut mesh = Mesh::new(&examples());
        let edited = with_document(
            examples(),
            "apiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
             metadata: {name: reviews, namespace: demo}\n\
             spec: {targetRefs: [{kind: Service, name: reviews}], retry: {attempts: 4}}\n",
        );
        mesh.index.apply(&edited);
        let state = mesh.index.state();
        for view in mesh.views() {
            let fresh = AgentView::new(
                view.namespace.clone(),
                view.labels.clone(),
                Arc::new(ViewCache::new()),
            );
            let mut fresh = fresh;
            for snapshot in [view.update(&state), fresh.update(&state)] {
                let snapshot = snapshot.expect("a new snapshot");
                let mut bytes = Vec::new();
                snapshot.encode(&mut bytes);
                assert_eq!(bytes, snapshot.to_snapshot().encode_to_vec());
                assert_eq!(snapshot.encoded_len(), bytes.len());
                let decoded = proto::Snapshot::decode(bytes.as_slice()).unwrap();
                assert_eq!(decoded, snapshot.to_snapshot());
            }
        }
    }

    #[test]
    fn the_pods_an_authorization_policy_protects_get_its_rules_and_a_new_version() {
        let mut mesh = Mesh::new(&examples());
        let before = mesh.apply(&examples());
        assert_eq!(before, [None, None, None]);
        let edited = with_document(
            examples(),
            "apiVersion: bulwark.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: frontend, namespace: demo}\n\
             spec: {targetRefs: [{kind: Service, name: frontend}], rules: [{from: [{serviceAccount: checkout}]}]}\n",
        );
        let [frontend, catalog, other] = mesh.apply(&edited);
        assert!(frontend.is_some(), "the protected pod's view changed");
        assert_eq!((catalog, other), (None, None), "no other view changed");
        let state = mesh.index.state();
        let mut fresh = view("demo", labels(&[("app", "frontend")]));
        let snapshot = fresh.update(&state).unwrap();
        let policies = snapshot.authorization();
        assert_eq!(policies.len(), 1);
        assert_eq!(policies[0].source, "demo/frontend");
        assert_eq!(policies[0].rules[0].from[0].service_account, "checkout");
        let mut bytes = Vec::new();
        snapshot.encode(&mut bytes);
        assert_eq!(bytes, snapshot.to_snapshot().encode_to_vec());
        assert!(snapshot.held_back().is_empty());

        // An agent from before AuthorizationPolicy would ignore the rules and allow every
        // caller: they are left out and reported as held back.
        let mut old = view("demo", labels(&[("app", "frontend")])).with_protocol(2);
        let snapshot = old.update(&state).unwrap();
        assert!(snapshot.authorization().is_empty());
        assert!(
            !snapshot.rate_limits().is_empty(),
            "the rest of the inbound part stays"
        );
        assert_eq!(
            snapshot
                .held_back()
                .iter()
                .map(|h| (h.port.as_str(), h.feature))
                .collect::<Vec<_>>(),
            [("inbound (demo/frontend)", "authorization")]
        );
    }

    #[test]
    fn a_strict_peer_authentication_reaches_its_pods_and_is_held_back_from_older_agents() {
        let mut mesh = Mesh::new(&examples());
        let edited = with_document(
            examples(),
            "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {name: frontend-mtls, namespace: demo}\n\
             spec:\n  selector: {matchLabels: {app: frontend}}\n  mode: Strict\n\
             \x20 portLevelMtls: [{port: 9090, mode: Permissive}, {port: 8443, mode: Strict}]\n",
        );
        let [frontend, catalog, other] = mesh.apply(&edited);
        assert!(frontend.is_some(), "the selected pod's view changed");
        assert_eq!((catalog, other), (None, None), "no other view changed");
        let state = mesh.index.state();
        let agent = |protocol: u32| {
            view("demo", labels(&[("app", "frontend")]))
                .with_protocol(protocol)
                .update(&state)
                .unwrap()
        };
        let current = agent(bulwark_proto::PROTOCOL_VERSION);
        let p = current.peer_authentication().unwrap();
        assert_eq!(
            (p.source.as_str(), p.mode),
            ("demo/frontend-mtls", i32::from(proto::MtlsMode::Strict))
        );
        assert!(current.held_back().is_empty());
        let mut bytes = Vec::new();
        current.encode(&mut bytes);
        assert_eq!(bytes, current.to_snapshot().encode_to_vec());

        // Protocol 3 cannot refuse plaintext: the policy is left out, its Strict places
        // are reported, and the authorization rules (protocol 3) still go, reported as
        // not enforced on opaque TCP (protocol 5).
        let held = |s: &PendingSnapshot| {
            s.held_back()
                .iter()
                .map(|h| (h.port.clone(), h.feature, h.needs_protocol))
                .collect::<Vec<_>>()
        };
        let three = agent(3);
        assert!(three.peer_authentication().is_none());
        assert!(!three.authorization().is_empty());
        assert_eq!(
            held(&three),
            [
                ("inbound (demo/frontend)".to_owned(), "authorization.tcp", 5),
                (
                    "inbound (demo/frontend-mtls)".to_owned(),
                    "peerAuthentication.mode",
                    4
                ),
                (
                    "inbound port 8443 (demo/frontend-mtls)".to_owned(),
                    "peerAuthentication.mode",
                    4
                ),
            ]
        );
        let two = agent(2);
        assert!(two.authorization().is_empty() && two.peer_authentication().is_none());
        assert_eq!(
            held(&two).iter().map(|h| h.1).collect::<Vec<_>>(),
            [
                "authorization",
                "peerAuthentication.mode",
                "peerAuthentication.mode"
            ]
        );
    }

    #[test]
    fn what_is_held_back_from_an_older_agent_is_no_change_at_the_next_state() {
        let with_policies = with_document(
            examples(),
            "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {name: mesh, namespace: demo}\nspec: {mode: Strict}\n",
        );
        let mut index = Index::new(START, &with_policies, Arc::new(Metrics::new()));
        let cache = Arc::new(ViewCache::new());
        // The frontend's AuthorizationPolicy and the Strict mode are both held back.
        let mut old =
            AgentView::new("demo", labels(&[("app", "frontend")]), cache).with_protocol(2);
        let first = old.update(&index.state()).unwrap();
        assert_eq!(first.held_back().len(), 2);
        // A change to another namespace's inbound part: a new state, nothing new here.
        index.apply(&with_document(
            with_policies,
            "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {name: mesh, namespace: prod}\nspec: {mode: Strict}\n",
        ));
        assert_eq!(index.state().revision, START + 1);
        assert!(old.update(&index.state()).is_none(), "no new snapshot");
    }

    #[test]
    fn a_permissive_peer_authentication_costs_an_older_agent_nothing_to_report() {
        let index = Index::new(
            START,
            &with_document(
                examples(),
                "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
                 metadata: {name: mesh, namespace: demo}\nspec: {mode: Permissive}\n",
            ),
            Arc::new(Metrics::new()),
        );
        let mut old = view("demo", labels(&[("app", "catalog")])).with_protocol(3);
        let snapshot = old.update(&index.state()).unwrap();
        assert!(
            snapshot.peer_authentication().is_none(),
            "it cannot read it"
        );
        assert!(snapshot.held_back().is_empty(), "it takes plaintext anyway");
        let mut current = view("demo", labels(&[("app", "catalog")]));
        let snapshot = current.update(&index.state()).unwrap();
        assert_eq!(snapshot.peer_authentication().unwrap().source, "demo/mesh");
    }

    #[test]
    fn agents_share_one_encoding_of_the_services_per_state() {
        let mut mesh = Mesh::new(&examples());
        let edited = with_document(
            examples(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: demo}\n\
             spec: {ports: [{port: 80}]}\n",
        );
        mesh.index.apply(&edited);
        let state = mesh.index.state();
        let a = mesh.frontend.update(&state).unwrap();
        let b = mesh.other_namespace.update(&state).unwrap();
        let (a_delta, b_delta) = (a.delta.as_ref().unwrap(), b.delta.as_ref().unwrap());
        assert!(
            Arc::ptr_eq(&a_delta.changes, &b_delta.changes),
            "one delta for every agent sent the same state"
        );
        assert_eq!(
            a_delta.updated_encoded.as_ptr(),
            b_delta.updated_encoded.as_ptr()
        );
        assert_eq!(a.to_snapshot().services.len(), 1, "only the new service");
        let fresh = |namespace: &str| {
            AgentView::new(namespace, labels(&[("app", "x")]), Arc::clone(&mesh.cache))
                .update(&state)
                .unwrap()
        };
        let (c, d) = (fresh("demo"), fresh("prod"));
        assert_eq!(
            c.outbound_encoded.as_ptr(),
            d.outbound_encoded.as_ptr(),
            "one buffer of the whole view for every agent"
        );
        assert_eq!(c.to_snapshot().services.len(), 5);
    }

    #[test]
    fn pods_with_the_same_labels_share_their_limits_and_others_do_not() {
        let cache = Arc::new(ViewCache::new());
        let index = Index::new(START, &examples(), Arc::new(Metrics::new()));
        let state = index.state();
        let mut views: Vec<AgentView> = [
            ("demo", "frontend"),
            ("demo", "frontend"),
            ("demo", "catalog"),
            ("prod", "frontend"),
        ]
        .iter()
        .map(|(ns, app)| AgentView::new(*ns, labels(&[("app", app)]), Arc::clone(&cache)))
        .collect();
        let limits: Vec<Vec<String>> = views
            .iter_mut()
            .map(|v| {
                let snapshot = v.update(&state).unwrap();
                snapshot
                    .rate_limits()
                    .iter()
                    .map(|l| l.name.clone())
                    .collect()
            })
            .collect();
        assert_eq!(limits[0], ["per-tenant", "total"]);
        assert_eq!(limits[1], limits[0]);
        assert!(limits[2].is_empty(), "catalog has no limits: {limits:?}");
        assert!(limits[3].is_empty(), "another namespace: {limits:?}");

        // A new state invalidates the memo: a pod that gains limits sees them.
        let mut index = index;
        let mut without = examples();
        without.rate_limit_policies.clear();
        index.apply(&without);
        let mut again = AgentView::new("demo", labels(&[("app", "frontend")]), cache);
        assert!(
            again
                .update(&index.state())
                .unwrap()
                .rate_limits()
                .is_empty()
        );
    }

    /// The example mesh plus the sharded example (its topology, policy and pods).
    fn sharded_examples() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sharded");
        ["orders.yaml", "local/pods.yaml"]
            .iter()
            .fold(examples(), |model, file| {
                with_document(model, &std::fs::read_to_string(dir.join(file)).unwrap())
            })
    }

    #[test]
    fn an_old_agent_gets_sharded_ports_without_endpoints_from_a_shared_encoding() {
        let index = Index::new(START, &sharded_examples(), Arc::new(Metrics::new()));
        let state = index.state();
        let cache = Arc::new(ViewCache::new());
        let view = |protocol: u32| {
            AgentView::new("demo", labels(&[("app", "frontend")]), Arc::clone(&cache))
                .with_protocol(protocol)
        };
        let orders = |snapshot: &PendingSnapshot| {
            snapshot
                .to_snapshot()
                .services
                .into_iter()
                .find(|s| s.name == "orders")
                .unwrap()
                .ports
                .remove(0)
        };

        let current = view(bulwark_proto::PROTOCOL_VERSION)
            .update(&state)
            .unwrap();
        assert!(current.held_back().is_empty());
        let port = orders(&current);
        assert!(port.shard_topology.is_some());
        assert_eq!(port.endpoints.len(), 6);

        let old = view(1).update(&state).unwrap();
        let port = orders(&old);
        assert!(port.shard_topology.is_none());
        assert!(port.endpoints.is_empty(), "fails closed: no endpoints");
        // The frontend's AuthorizationPolicy (examples/) is held back too.
        let outbound: Vec<_> = old
            .held_back()
            .iter()
            .filter(|h| h.feature != "authorization")
            .collect();
        assert_eq!(outbound.len(), 1);
        assert_eq!(outbound[0].port, "orders.shop:80");
        // Every other service is the same as for a current agent.
        let others = |s: &PendingSnapshot| {
            let mut services = s.to_snapshot().services;
            services.retain(|s| s.name != "orders");
            services
        };
        assert_eq!(others(&old), others(&current));

        // Both encodings are what prost writes, and each is shared per level.
        for snapshot in [&current, &old] {
            let mut bytes = Vec::new();
            snapshot.encode(&mut bytes);
            assert_eq!(bytes, snapshot.to_snapshot().encode_to_vec());
            assert_eq!(bytes.len(), snapshot.encoded_len());
        }
        let old_again = view(0).update(&state).unwrap();
        assert_eq!(
            old_again.outbound_encoded.as_ptr(),
            old.outbound_encoded.as_ptr(),
            "agents of one level share the bytes"
        );
        let newer = view(9).update(&state).unwrap();
        assert_eq!(
            newer.outbound_encoded.as_ptr(),
            current.outbound_encoded.as_ptr()
        );
        assert!(
            Arc::ptr_eq(&current.outbound, &state.outbound),
            "no copy for current agents"
        );
    }

    fn resilience(service: &str, attempts: u32) -> String {
        format!(
            "apiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
             metadata: {{name: {service}, namespace: demo}}\n\
             spec: {{targetRefs: [{{kind: Service, name: {service}}}], retry: {{attempts: {attempts}}}}}\n"
        )
    }

    fn names(services: &[proto::Service]) -> Vec<&str> {
        services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn after_the_first_snapshot_an_agent_gets_only_what_changed() {
        let mut mesh = Mesh::new(&examples());
        let edited = with_document(examples(), &resilience("reviews", 4));
        mesh.index.apply(&edited);
        let state = mesh.index.state();
        let snapshot = mesh.catalog.update(&state).unwrap();
        assert_eq!(snapshot.base_version(), Some(START));
        let message = snapshot.to_snapshot();
        assert_eq!(names(&message.services), ["reviews"]);
        assert_eq!(message.services[0].version, START + 1);
        assert!(message.removed_services.is_empty());
        assert!(message.inbound.is_none(), "the inbound part did not change");
        let mut bytes = Vec::new();
        snapshot.encode(&mut bytes);
        assert_eq!(bytes, message.encode_to_vec());
        assert_eq!(bytes.len(), snapshot.encoded_len());
        assert!(
            bytes.len() < 1024,
            "one changed service costs under 1 KiB: {}",
            bytes.len()
        );

        // A service removed: named in the next delta with its revision.
        let mut without = edited;
        without
            .services
            .retain(|name, _| name.name.as_str() != "payments");
        mesh.index.apply(&without);
        let snapshot = mesh.catalog.update(&mesh.index.state()).unwrap();
        assert_eq!(snapshot.base_version(), Some(START + 1));
        let message = snapshot.to_snapshot();
        let removed: Vec<_> = message
            .removed_services
            .iter()
            .map(|r| (r.namespace.as_str(), r.name.as_str(), r.version))
            .collect();
        assert_eq!(removed, [("demo", "payments", START + 2)]);
        let mut bytes = Vec::new();
        snapshot.encode(&mut bytes);
        assert_eq!(bytes, message.encode_to_vec());
    }

    #[test]
    fn the_chunks_are_the_grpc_message_and_share_the_services_encoding() {
        let mut mesh = Mesh::new(&examples());
        mesh.index
            .apply(&with_document(examples(), &resilience("reviews", 4)));
        let state = mesh.index.state();
        let delta = mesh.frontend.update(&state).unwrap();
        let whole = view("demo", labels(&[("app", "frontend")]))
            .update(&state)
            .unwrap();
        for snapshot in [&delta, &whole] {
            let mut expected = vec![0];
            expected.extend(u32::try_from(snapshot.encoded_len()).unwrap().to_be_bytes());
            snapshot.encode(&mut expected);
            assert_eq!(snapshot.chunks().concat(), expected);
        }
        assert_eq!(
            whole.chunks()[1].as_ptr(),
            whole.outbound_encoded.as_ptr(),
            "the services go by reference"
        );
    }

    #[test]
    fn an_agent_below_protocol_6_gets_the_whole_view_at_every_change() {
        let cache = Arc::new(ViewCache::new());
        let mut index = Index::new(START, &examples(), Arc::new(Metrics::new()));
        let mut old = AgentView::new("demo", labels(&[("app", "catalog")]), Arc::clone(&cache))
            .with_protocol(5);
        let mut new = AgentView::new("demo", labels(&[("app", "catalog")]), cache);
        let _ = (old.update(&index.state()), new.update(&index.state()));
        index.apply(&with_document(examples(), &resilience("reviews", 4)));
        let state = index.state();
        let whole = old.update(&state).unwrap();
        assert_eq!(whole.base_version(), None);
        assert_eq!(whole.to_snapshot().services.len(), 4);
        let delta = new.update(&state).unwrap();
        assert_eq!(delta.version(), whole.version(), "one version for both");
        let mut applied = fresh_whole(&examples_state(), "catalog");
        bulwark_proto::delta::apply(&mut applied, delta.to_snapshot()).unwrap();
        assert_eq!(
            applied,
            whole.to_snapshot(),
            "the delta ends where the whole view is"
        );
    }

    fn examples_state() -> Arc<IndexState> {
        Index::new(START, &examples(), Arc::new(Metrics::new())).state()
    }

    /// The whole view a fresh agent with `app` gets of `state`.
    fn fresh_whole(state: &IndexState, app: &str) -> proto::Snapshot {
        view("demo", labels(&[("app", app)]))
            .update(state)
            .unwrap()
            .to_snapshot()
    }

    #[test]
    fn a_nacked_delta_is_answered_with_the_whole_view_and_a_nacked_whole_view_waits() {
        let mut mesh = Mesh::new(&examples());
        mesh.index
            .apply(&with_document(examples(), &resilience("reviews", 4)));
        let delta = mesh.catalog.update(&mesh.index.state()).unwrap();
        assert_eq!(delta.base_version(), Some(START));
        assert!(
            mesh.catalog.nacked(delta.version()),
            "send the whole view now"
        );
        let whole = mesh.catalog.update(&mesh.index.state()).unwrap();
        assert_eq!(whole.base_version(), None);
        assert_eq!(
            whole.version(),
            delta.version() + 1,
            "versions never repeat"
        );
        assert!(mesh.catalog.update(&mesh.index.state()).is_none());
        assert!(
            !mesh.catalog.nacked(delta.version()),
            "a NACK from before the whole view changes nothing"
        );
        assert!(mesh.catalog.update(&mesh.index.state()).is_none());

        // The whole view refused: nothing now (it would be refused again), the whole
        // view again at the next change.
        assert!(!mesh.catalog.nacked(whole.version()));
        assert!(mesh.catalog.update(&mesh.index.state()).is_none());
        mesh.index
            .apply(&with_document(examples(), &resilience("reviews", 5)));
        let next = mesh.catalog.update(&mesh.index.state()).unwrap();
        assert_eq!(next.base_version(), None);
        let after = {
            mesh.index
                .apply(&with_document(examples(), &resilience("reviews", 6)));
            mesh.catalog.update(&mesh.index.state()).unwrap()
        };
        assert_eq!(after.base_version(), Some(next.version()), "deltas again");
    }

    /// A small random mesh: `services` services, some with a policy, some gone.
    fn random_model(rng: &mut fastrand::Rng) -> Model {
        let mut yaml = String::new();
        for n in 0..12 {
            if rng.u8(..4) == 0 {
                continue;
            }
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{n}, namespace: demo}}\n\
                 spec: {{ports: [{{port: {}}}]}}\n",
                80 + u32::from(rng.u8(..2))
            ));
            if rng.bool() {
                yaml.push_str("---\n");
                yaml.push_str(&resilience(&format!("svc-{n}"), 1 + u32::from(rng.u8(..3))));
            }
        }
        if rng.bool() {
            yaml.push_str(
                "---\napiVersion: bulwark.io/v1alpha1\nkind: RateLimitPolicy\n\
                 metadata: {name: catalog, namespace: demo}\n\
                 spec:\n  targetRefs: [{kind: Service, name: catalog}]\n\
                 \x20 limits: [{name: total, rate: {requests: 50, per: 1s}}]\n",
            );
        }
        with_document(examples(), &yaml)
    }

    /// For random sequences of changes, an agent that applies every snapshot it gets
    /// (the changes in each delta shuffled, some deltas NACKed and answered with the
    /// whole view, several changes coalesced into one delta) holds what a fresh agent
    /// gets whole. A deterministic randomized test (fixed seeds), not proptest, which
    /// is not a dependency.
    #[test]
    fn deltas_in_any_order_end_where_the_whole_view_is() {
        for seed in 0..64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let cache = Arc::new(ViewCache::new());
            let mut index = Index::new(START, &random_model(&mut rng), Arc::new(Metrics::new()));
            let mut view = AgentView::new("demo", labels(&[("app", "catalog")]), cache);
            let mut held = view.update(&index.state()).unwrap().to_snapshot();
            for step in 0..24 {
                index.apply(&random_model(&mut rng));
                // Coalescing: a slow agent's stream takes a snapshot now and then.
                if rng.u8(..3) == 0 {
                    continue;
                }
                let Some(snapshot) = view.update(&index.state()) else {
                    continue;
                };
                let mut message = snapshot.to_snapshot();
                rng.shuffle(&mut message.services);
                rng.shuffle(&mut message.removed_services);
                if snapshot.base_version().is_some() && rng.u8(..5) == 0 {
                    // A delta refused: the agent keeps what it holds. (A whole view is
                    // refused only for its content, which the next change must mend;
                    // the test above covers it.)
                    view.nacked(message.version);
                    continue;
                }
                match bulwark_proto::delta::apply(&mut held, message) {
                    Ok(()) => {}
                    Err(error) => {
                        assert!(
                            view.nacked(snapshot.version()),
                            "seed {seed} step {step}: {error}"
                        );
                    }
                }
            }
            // Let the agent catch up, as its stream would.
            while let Some(snapshot) = view.update(&index.state()) {
                if let Err(error) = bulwark_proto::delta::apply(&mut held, snapshot.to_snapshot()) {
                    assert!(view.nacked(snapshot.version()), "seed {seed}: {error}");
                }
            }
            let mut whole = fresh_whole(&index.state(), "catalog");
            whole.version = held.version;
            // A whole view received shuffled keeps its order; order means nothing.
            held.services
                .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            assert_eq!(held, whole, "seed {seed}");
        }
    }
}
