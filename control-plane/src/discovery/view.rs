//! What one agent sees: every service of the mesh (outbound, shared by all agents) and
//! the rate limits, authorization policies and mutual-TLS mode its own pod enforces
//! (inbound). A view only produces a snapshot when its content changed; its version is
//! the index revision of that change.
//!
//! Work shared by all agents is done once per index state, not once per agent: the
//! outbound part is encoded to protobuf once and every snapshot carries those bytes
//! (a change to 10,000 agents used to deep-copy and re-encode the whole service list
//! 10,000 times), and the inbound limits are computed once per namespace and label set
//! (pods of one Deployment share them). See [`ViewCache`].
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

/// The view of one connected agent, remembering what it was last sent.
#[derive(Debug)]
pub struct AgentView {
    namespace: String,
    labels: BTreeMap<String, String>,
    cache: Arc<ViewCache>,
    /// The protocol level the agent is served at ([`compat::level`]).
    level: u32,
    sent: Option<PendingSnapshot>,
    /// The pod's inbound part the last snapshot was made from, before anything was held
    /// back from it: compared with the next one, so that an older agent's stripped
    /// inbound part does not read as a change at every new index state.
    sent_inbound: Option<Arc<proto::Inbound>>,
}

/// A snapshot ready to go out. It holds the shared outbound part by reference (the
/// service list and its encoding), so agents waiting to receive it cost no copy of the
/// mesh.
#[derive(Clone, Debug)]
pub struct PendingSnapshot {
    version: u64,
    outbound: Arc<Outbound>,
    /// `outbound.services` as `Snapshot.services` fields, shared by every agent.
    outbound_encoded: Bytes,
    /// The inbound part of the agent's pod (rate limits, authorization, mutual-TLS
    /// mode), shared by the agents with the same namespace and labels.
    inbound: Arc<proto::Inbound>,
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
        proto::Snapshot {
            version: self.version,
            services: self.outbound.services.clone(),
            inbound: Some((*self.inbound).clone()),
        }
    }

    /// The length of [`PendingSnapshot::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let version = if self.version == 0 {
            0
        } else {
            prost::encoding::uint64::encoded_len(VERSION_FIELD, &self.version)
        };
        version
            + self.outbound_encoded.len()
            + prost::encoding::message::encoded_len(INBOUND_FIELD, &*self.inbound)
    }

    /// Writes the `Snapshot` message: the same bytes prost would write for
    /// [`PendingSnapshot::to_snapshot`], with the services copied from the shared
    /// encoding instead of encoded again.
    pub fn encode(&self, buf: &mut impl BufMut) {
        if self.version != 0 {
            prost::encoding::uint64::encode(VERSION_FIELD, &self.version, buf);
        }
        buf.put_slice(&self.outbound_encoded);
        prost::encoding::message::encode(INBOUND_FIELD, &*self.inbound, buf);
    }
}

/// What every agent's view shares: the encoding of the current outbound part, and the
/// inbound limits of each (namespace, labels) for the current inbound part. Each is
/// computed by the first agent that needs it and reused until the index moves on.
#[derive(Debug, Default)]
pub struct ViewCache {
    /// For one outbound state: its variant per protocol level.
    outbound: Mutex<Option<(Arc<Outbound>, ByLevel)>>,
    inbound: Mutex<InboundMemo>,
}

/// The variants of one outbound state, by protocol level.
type ByLevel = HashMap<u32, SharedOutbound>;

/// The outbound part as agents of one protocol level get it.
#[derive(Clone, Debug)]
struct SharedOutbound {
    /// The services (the index's own `Arc` when nothing is held back).
    outbound: Arc<Outbound>,
    /// `outbound.services` as `Snapshot.services` fields.
    encoded: Bytes,
    held_back: Arc<[HeldBack]>,
}

/// Inbound limits by namespace and labels, for one inbound state.
#[derive(Debug, Default)]
struct InboundMemo {
    of: Option<Arc<Inbound>>,
    #[allow(clippy::type_complexity)]
    limits: HashMap<String, HashMap<BTreeMap<String, String>, (Arc<proto::Inbound>, u64)>>,
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
        let len = outbound
            .services
            .iter()
            .map(|s| prost::encoding::message::encoded_len(SERVICES_FIELD, s))
            .sum();
        let mut buf = BytesMut::with_capacity(len);
        for service in &outbound.services {
            prost::encoding::message::encode(SERVICES_FIELD, service, &mut buf);
        }
        let shared = SharedOutbound {
            outbound,
            encoded: buf.freeze(),
            held_back: held_back.into(),
        };
        levels.insert(level, shared.clone());
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
            sent: None,
            sent_inbound: None,
        }
    }

    /// The same view for an agent that speaks `protocol_version`: what it cannot
    /// enforce is held back ([`compat`]).
    pub fn with_protocol(mut self, protocol_version: u32) -> Self {
        self.level = compat::level(protocol_version);
        self
    }

    /// The version last produced, if any.
    pub fn version(&self) -> Option<u64> {
        self.sent.as_ref().map(|s| s.version)
    }

    /// The next snapshot for this agent, or `None` when its content is unchanged.
    pub fn update(&mut self, state: &IndexState) -> Option<PendingSnapshot> {
        let (inbound, inbound_changed_at) =
            self.cache
                .inbound(&state.inbound, &self.namespace, &self.labels);
        if let Some(sent) = &self.sent
            && sent.outbound.changed_at == state.outbound.changed_at
            && self.sent_inbound.as_ref() == Some(&inbound)
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
        let snapshot = PendingSnapshot {
            version,
            outbound: shared.outbound,
            outbound_encoded: shared.encoded,
            inbound,
            held_back,
        };
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
        assert_eq!(
            a.outbound_encoded.as_ptr(),
            b.outbound_encoded.as_ptr(),
            "one buffer for every agent"
        );
        assert_eq!(a.to_snapshot().services.len(), 5);
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
}
