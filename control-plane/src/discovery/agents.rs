//! The registry of connected agents, for the admin `/agents` page and metrics. Each agent
//! costs one small entry; it is removed when its stream ends.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bulwark_proto::v1 as proto;
use serde::Serialize;

use crate::metrics::Metrics;
use crate::timestamp::Timestamp;

/// Who an agent says it is (its `hello`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentIdentity {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's service account.
    pub service_account: String,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// The agent's build version.
    pub agent_version: String,
    /// The highest API revision the agent understands.
    pub protocol_version: u32,
}

impl From<proto::Identity> for AgentIdentity {
    fn from(id: proto::Identity) -> Self {
        AgentIdentity {
            namespace: id.namespace,
            pod_name: id.pod_name,
            service_account: id.service_account,
            labels: id.labels.into_iter().collect(),
            agent_version: id.agent_version,
            protocol_version: id.protocol_version,
        }
    }
}

/// An ACK as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AckRecord {
    /// The version the agent applied.
    pub version: u64,
    /// When the ACK arrived.
    pub at: Timestamp,
}

/// A NACK as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NackRecord {
    /// The version the agent rejected.
    pub version: u64,
    /// The agent's reason.
    pub error: String,
    /// When the NACK arrived.
    pub at: Timestamp,
}

/// What happened on an agent's stream so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentStatus {
    /// The version of the last snapshot sent.
    pub sent_version: Option<u64>,
    /// Snapshots sent on this stream.
    pub snapshots_sent: u64,
    /// ACKs received on this stream.
    pub acks: u64,
    /// NACKs received on this stream.
    pub nacks: u64,
    /// The last ACK.
    pub last_ack: Option<AckRecord>,
    /// The last NACK.
    pub last_nack: Option<NackRecord>,
    /// What the last snapshot left out because the agent's protocol is too old to
    /// enforce it (a sharded port then has no endpoints).
    pub held_back: Vec<crate::discovery::compat::HeldBack>,
}

/// One connected agent.
#[derive(Debug)]
pub struct AgentEntry {
    id: u64,
    identity: AgentIdentity,
    peer: Option<SocketAddr>,
    connected_since: Timestamp,
    status: Mutex<AgentStatus>,
}

impl AgentEntry {
    /// The agent's identity.
    pub fn identity(&self) -> &AgentIdentity {
        &self.identity
    }

    /// A snapshot was sent, leaving out `held_back`. Returns whether what is held back
    /// changed since the previous snapshot.
    pub fn record_sent(
        &self,
        version: u64,
        held_back: &[crate::discovery::compat::HeldBack],
    ) -> bool {
        let mut status = self.lock();
        status.sent_version = Some(version);
        status.snapshots_sent += 1;
        if status.held_back == held_back {
            return false;
        }
        status.held_back = held_back.to_vec();
        true
    }

    /// An ACK arrived.
    pub fn record_ack(&self, version: u64) {
        let mut status = self.lock();
        status.acks += 1;
        status.last_ack = Some(AckRecord {
            version,
            at: Timestamp::now(),
        });
    }

    /// A NACK arrived.
    pub fn record_nack(&self, version: u64, error: String) {
        let mut status = self.lock();
        status.nacks += 1;
        status.last_nack = Some(NackRecord {
            version,
            error,
            at: Timestamp::now(),
        });
    }

    /// The stream's status so far.
    pub fn status(&self) -> AgentStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentStatus> {
        // The status is plain data, valid even if a holder panicked.
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An agent as the admin `/agents` page shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AgentInfo {
    /// Registry id, unique per stream.
    pub id: u64,
    /// Who the agent is.
    pub identity: AgentIdentity,
    /// The agent's address as seen by the control plane.
    pub peer: Option<String>,
    /// When the stream opened.
    pub connected_since: Timestamp,
    /// Versions, counts, last ACK and NACK.
    #[serde(flatten)]
    pub status: AgentStatus,
}

/// Which agents the admin `/agents` page lists: a namespace, and a page of the list
/// sorted by namespace and pod (10,000 agents make a 5 MB page otherwise).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentQuery {
    /// Only agents in this namespace.
    pub namespace: Option<String>,
    /// Skip this many agents.
    pub offset: usize,
    /// At most this many agents.
    pub limit: Option<usize>,
}

/// A page of agents.
#[derive(Clone, Debug)]
pub struct AgentPage {
    /// How many agents matched, on every page together.
    pub total: usize,
    /// The agents of this page.
    pub agents: Vec<AgentInfo>,
}

/// Connected agents by stream.
#[derive(Debug)]
pub struct AgentRegistry {
    next_id: AtomicU64,
    agents: Mutex<HashMap<u64, Arc<AgentEntry>>>,
    metrics: Arc<Metrics>,
}

/// An agent's place in the registry; dropping it removes the agent.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<AgentRegistry>,
    entry: Arc<AgentEntry>,
}

impl Registration {
    /// The registered agent.
    pub fn entry(&self) -> &AgentEntry {
        &self.entry
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.entry.id);
        self.registry.metrics.agents_connected.dec();
    }
}

impl AgentRegistry {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        AgentRegistry {
            next_id: AtomicU64::new(1),
            agents: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Adds an agent until the returned registration is dropped.
    pub fn register(
        self: &Arc<Self>,
        identity: AgentIdentity,
        peer: Option<SocketAddr>,
    ) -> Registration {
        let entry = Arc::new(AgentEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            identity,
            peer,
            connected_since: Timestamp::now(),
            status: Mutex::new(AgentStatus::default()),
        });
        self.lock().insert(entry.id, Arc::clone(&entry));
        self.metrics.agents_connected.inc();
        Registration {
            registry: Arc::clone(self),
            entry,
        }
    }

    /// How many agents are connected.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every connected agent, by namespace, pod and id.
    pub fn list(&self) -> Vec<AgentInfo> {
        self.page(&AgentQuery::default()).agents
    }

    /// The agents `query` selects, by namespace, pod and id, and how many matched in all.
    /// Only the entries of the page are copied out of the registry.
    pub fn page(&self, query: &AgentQuery) -> AgentPage {
        let mut entries: Vec<Arc<AgentEntry>> = self
            .lock()
            .values()
            .filter(|e| {
                query
                    .namespace
                    .as_ref()
                    .is_none_or(|ns| e.identity.namespace == *ns)
            })
            .cloned()
            .collect();
        entries.sort_by(|a, b| {
            (&a.identity.namespace, &a.identity.pod_name, a.id).cmp(&(
                &b.identity.namespace,
                &b.identity.pod_name,
                b.id,
            ))
        });
        let total = entries.len();
        let entries: Vec<Arc<AgentEntry>> = entries
            .into_iter()
            .skip(query.offset)
            .take(query.limit.unwrap_or(usize::MAX))
            .collect();
        let list: Vec<AgentInfo> = entries
            .iter()
            .map(|e| AgentInfo {
                id: e.id,
                identity: e.identity.clone(),
                peer: e.peer.map(|p| p.to_string()),
                connected_since: e.connected_since,
                status: e.status(),
            })
            .collect();
        AgentPage {
            total,
            agents: list,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<AgentEntry>>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(pod: &str) -> AgentIdentity {
        AgentIdentity {
            namespace: "demo".into(),
            pod_name: pod.into(),
            service_account: "sa".into(),
            labels: BTreeMap::new(),
            agent_version: "0.1.0".into(),
            protocol_version: 1,
        }
    }

    #[test]
    fn agents_are_listed_while_registered_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(AgentRegistry::new(Arc::clone(&metrics)));
        let b = registry.register(identity("b"), None);
        let a = registry.register(identity("a"), "10.0.0.1:5000".parse().ok());
        a.entry().record_sent(7, &[]);
        a.entry().record_ack(7);
        a.entry().record_nack(8, "unknown retryOn".into());
        let list = registry.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].identity.pod_name, "a");
        assert_eq!(list[0].status.sent_version, Some(7));
        assert_eq!(list[0].status.last_ack.as_ref().unwrap().version, 7);
        assert_eq!(
            list[0].status.last_nack.as_ref().unwrap().error,
            "unknown retryOn"
        );
        assert_eq!(list[0].peer.as_deref(), Some("10.0.0.1:5000"));
        assert_eq!(metrics.agents_connected.get(), 2);

        drop(b);
        assert_eq!(registry.len(), 1);
        assert_eq!(metrics.agents_connected.get(), 1);
        drop(a);
        assert!(registry.is_empty());
        assert_eq!(metrics.agents_connected.get(), 0);
    }

    #[test]
    fn the_json_shape_is_flat_and_stable() {
        let registry = Arc::new(AgentRegistry::new(Arc::new(Metrics::new())));
        let r = registry.register(identity("p"), None);
        r.entry().record_sent(3, &[]);
        let json = serde_json::to_value(registry.list()).unwrap();
        let agent = &json[0];
        assert_eq!(agent["identity"]["pod_name"], "p");
        assert_eq!(agent["sent_version"], 3);
        assert!(agent["last_ack"].is_null());
        assert!(agent["connected_since"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn pages_filter_by_namespace_and_slice_the_sorted_list() {
        let registry = Arc::new(AgentRegistry::new(Arc::new(Metrics::new())));
        let mut held = Vec::new();
        for pod in ["d", "b", "a", "c"] {
            held.push(registry.register(identity(pod), None));
        }
        let mut other = identity("a");
        other.namespace = "prod".into();
        held.push(registry.register(other, None));

        let pods = |page: AgentPage| -> (usize, Vec<String>) {
            let pods = page
                .agents
                .into_iter()
                .map(|a| a.identity.pod_name)
                .collect();
            (page.total, pods)
        };
        let query = AgentQuery {
            namespace: Some("demo".into()),
            offset: 1,
            limit: Some(2),
        };
        assert_eq!(
            pods(registry.page(&query)),
            (4, vec!["b".into(), "c".into()])
        );
        let past_the_end = AgentQuery {
            offset: 10,
            ..AgentQuery::default()
        };
        assert_eq!(pods(registry.page(&past_the_end)), (5, vec![]));
        assert_eq!(registry.list().len(), 5);
        assert_eq!(registry.list()[4].identity.namespace, "prod");
    }
}
