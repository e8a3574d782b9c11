//! What one agent sees: every service of the mesh (outbound, shared by all agents) and
//! the rate limits its own pod enforces (inbound). A view only produces a snapshot when
//! its content changed; its version is the index revision of that change.

use std::collections::BTreeMap;
use std::sync::Arc;

use bulwark_proto::v1 as proto;

use crate::index::{IndexState, Outbound};

/// The view of one connected agent, remembering what it was last sent.
#[derive(Debug)]
pub struct AgentView {
    namespace: String,
    labels: BTreeMap<String, String>,
    sent: Option<PendingSnapshot>,
}

/// A snapshot ready to go out. It holds the shared outbound part by reference, so that
/// agents waiting to receive it cost no copy of the mesh; the wire message is built only
/// when the stream is ready to encode it.
#[derive(Clone, Debug)]
pub struct PendingSnapshot {
    version: u64,
    outbound: Arc<Outbound>,
    inbound: Vec<proto::RateLimit>,
}

impl PendingSnapshot {
    /// The snapshot's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The rate limits of the agent's pod.
    pub fn rate_limits(&self) -> &[proto::RateLimit] {
        &self.inbound
    }

    /// The wire message.
    pub fn to_snapshot(&self) -> proto::Snapshot {
        proto::Snapshot {
            version: self.version,
            services: self.outbound.services.clone(),
            inbound: Some(proto::Inbound {
                rate_limits: self.inbound.clone(),
            }),
        }
    }
}

impl AgentView {
    /// The view of an agent in `namespace` whose pod has `labels`.
    pub fn new(namespace: impl Into<String>, labels: BTreeMap<String, String>) -> Self {
        AgentView {
            namespace: namespace.into(),
            labels,
            sent: None,
        }
    }

    /// The version last produced, if any.
    pub fn version(&self) -> Option<u64> {
        self.sent.as_ref().map(|s| s.version)
    }

    /// The next snapshot for this agent, or `None` when its content is unchanged.
    pub fn update(&mut self, state: &IndexState) -> Option<PendingSnapshot> {
        let (inbound, inbound_changed_at) = state.inbound.for_agent(&self.namespace, &self.labels);
        if let Some(sent) = &self.sent
            && sent.outbound.changed_at == state.outbound.changed_at
            && sent.inbound == inbound
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
        let snapshot = PendingSnapshot {
            version,
            outbound: Arc::clone(&state.outbound),
            inbound,
        };
        self.sent = Some(snapshot.clone());
        Some(snapshot)
    }
}

#[cfg(test)]
mod tests {
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

    struct Mesh {
        index: Index,
        frontend: AgentView,
        catalog: AgentView,
        other_namespace: AgentView,
    }

    impl Mesh {
        fn new(model: &Model) -> Self {
            let mut mesh = Mesh {
                index: Index::new(START, model, Arc::new(Metrics::new())),
                frontend: AgentView::new("demo", labels(&[("app", "frontend"), ("pod", "a")])),
                catalog: AgentView::new("demo", labels(&[("app", "catalog")])),
                other_namespace: AgentView::new("prod", labels(&[("app", "frontend")])),
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
        let mut view = AgentView::new("demo", labels(&[("app", "frontend")]));
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
        without.rate_limit_policies.clear();
        assert_eq!(mesh.apply(&without), [Some(START + 1), None, None]);

        // A fresh view (a reconnecting agent) gets the same version for the same content.
        let state = mesh.index.state();
        let mut fresh = AgentView::new("demo", labels(&[("app", "frontend")]));
        assert_eq!(fresh.update(&state).unwrap().version(), START + 1);
        let mut fresh_catalog = AgentView::new("demo", labels(&[("app", "catalog")]));
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
        let mut fresh = AgentView::new("demo", labels(&[("app", "catalog")]));
        assert_eq!(
            fresh.update(&mesh.index.state()).unwrap().version(),
            START + 1
        );
    }
}
