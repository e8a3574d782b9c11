//! The control plane's Prometheus metrics (served at admin `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::{Kind, Model};

/// Label set of `bulwark_cp_objects`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The object kind (`Service`, `ResiliencePolicy`, ...).
    pub kind: &'static str,
}

/// Label set of the identity refusals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// What was refused: `certificate` or `discovery`.
    pub request: &'static str,
    /// Why: `unauthenticated` (no or a bad token), `mismatch` (another pod or service
    /// account than the token's), `invalid` (a malformed certificate request).
    pub reason: &'static str,
}

/// Every metric the control plane exports; cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `bulwark_cp_agents_connected`: agents with an open stream.
    pub agents_connected: Gauge,
    /// `bulwark_cp_snapshots_sent_total`: snapshots handed to agent streams.
    pub snapshots_sent: Counter,
    /// `bulwark_cp_deltas_sent_total`: of the snapshots sent, those that carried only
    /// what changed (protocol 6).
    pub deltas_sent: Counter,
    /// `bulwark_cp_snapshot_bytes_total`: encoded bytes of the snapshots sent.
    pub snapshot_bytes: Counter,
    /// `bulwark_cp_acks_total`: snapshots agents applied.
    pub acks: Counter,
    /// `bulwark_cp_nacks_total`: snapshots agents rejected.
    pub nacks: Counter,
    /// `bulwark_cp_held_back_snapshots_total`: snapshots that left out features the
    /// agent's protocol version cannot enforce.
    pub held_back_snapshots: Counter,
    /// `bulwark_cp_objects{kind}`: valid objects in force, by kind.
    pub objects: Family<KindLabels, Gauge>,
    /// `bulwark_cp_rejected_objects`: documents currently rejected by the source.
    pub rejected_objects: Gauge,
    /// `bulwark_cp_revision`: the index's revision.
    pub revision: Gauge,
    /// `bulwark_cp_status_leader`: 1 while this replica holds the status Lease.
    pub status_leader: Gauge,
    /// `bulwark_cp_status_writes_total`: policy status patches that succeeded.
    pub status_writes: Counter,
    /// `bulwark_cp_status_write_errors_total`: policy status patches that failed.
    pub status_write_errors: Counter,
    /// `bulwark_cp_certificates_issued_total`: workload certificates signed.
    pub certificates_issued: Counter,
    /// `bulwark_cp_identity_refusals_total{request, reason}`: certificate requests and
    /// discovery streams refused.
    pub identity_refusals: Family<RefusalLabels, Counter>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let agents_connected = Gauge::default();
        let snapshots_sent = Counter::default();
        let deltas_sent = Counter::default();
        let snapshot_bytes = Counter::default();
        let acks = Counter::default();
        let nacks = Counter::default();
        let held_back_snapshots = Counter::default();
        let objects = Family::<KindLabels, Gauge>::default();
        let rejected_objects = Gauge::default();
        let revision = Gauge::default();
        let status_leader = Gauge::default();
        let status_writes = Counter::default();
        let status_write_errors = Counter::default();
        let certificates_issued = Counter::default();
        let identity_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "bulwark_cp_certificates_issued",
            "Workload certificates signed",
            certificates_issued.clone(),
        );
        registry.register(
            "bulwark_cp_identity_refusals",
            "Certificate requests and discovery streams refused, by request and reason",
            identity_refusals.clone(),
        );
        registry.register(
            "bulwark_cp_agents_connected",
            "Agents with an open discovery stream",
            agents_connected.clone(),
        );
        registry.register(
            "bulwark_cp_snapshots_sent",
            "Configuration snapshots sent to agents",
            snapshots_sent.clone(),
        );
        registry.register(
            "bulwark_cp_deltas_sent",
            "Of the snapshots sent, those that carried only what changed (protocol 6)",
            deltas_sent.clone(),
        );
        registry.register(
            "bulwark_cp_snapshot_bytes",
            "Encoded bytes of the snapshots sent",
            snapshot_bytes.clone(),
        );
        registry.register(
            "bulwark_cp_acks",
            "Snapshots agents acknowledged (applied)",
            acks.clone(),
        );
        registry.register(
            "bulwark_cp_nacks",
            "Snapshots agents rejected (they kept their previous config)",
            nacks.clone(),
        );
        registry.register(
            "bulwark_cp_held_back_snapshots",
            "Snapshots that left out features the agent's protocol version cannot enforce (see admin /agents)",
            held_back_snapshots.clone(),
        );
        registry.register(
            "bulwark_cp_objects",
            "Valid objects in force, by kind",
            objects.clone(),
        );
        registry.register(
            "bulwark_cp_rejected_objects",
            "Documents currently rejected by the source (see admin /errors)",
            rejected_objects.clone(),
        );
        registry.register(
            "bulwark_cp_revision",
            "Revision of the index (unix milliseconds at start, +1 per change)",
            revision.clone(),
        );
        registry.register(
            "bulwark_cp_status_leader",
            "1 while this replica holds the status Lease and writes policy status (Kubernetes source)",
            status_leader.clone(),
        );
        registry.register(
            "bulwark_cp_status_writes",
            "Policy status patches that succeeded",
            status_writes.clone(),
        );
        registry.register(
            "bulwark_cp_status_write_errors",
            "Policy status patches that failed (retried later)",
            status_write_errors.clone(),
        );
        for kind in Kind::ALL {
            objects
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(0);
        }
        Metrics {
            registry,
            agents_connected,
            snapshots_sent,
            deltas_sent,
            snapshot_bytes,
            acks,
            nacks,
            held_back_snapshots,
            objects,
            rejected_objects,
            revision,
            status_leader,
            status_writes,
            status_write_errors,
            certificates_issued,
            identity_refusals,
        }
    }

    /// Counts a refused certificate request or discovery stream.
    pub fn identity_refused(&self, request: &'static str, reason: &'static str) {
        self.identity_refusals
            .get_or_create(&RefusalLabels { request, reason })
            .inc();
    }

    /// Sets `bulwark_cp_objects` from a model.
    pub fn set_objects(&self, model: &Model) {
        for kind in Kind::ALL {
            let count = i64::try_from(model.count(kind)).unwrap_or(i64::MAX);
            self.objects
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(count);
        }
    }

    /// Sets `bulwark_cp_revision`.
    pub fn set_revision(&self, revision: u64) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_documented_names() {
        let m = Metrics::new();
        m.snapshots_sent.inc();
        m.set_revision(1_700_000_000_000);
        let text = m.encode();
        for line in [
            "bulwark_cp_agents_connected 0",
            "bulwark_cp_snapshots_sent_total 1",
            "bulwark_cp_acks_total 0",
            "bulwark_cp_nacks_total 0",
            "bulwark_cp_objects{kind=\"ResiliencePolicy\"} 0",
            "bulwark_cp_rejected_objects 0",
            "bulwark_cp_revision 1700000000000",
            "bulwark_cp_status_leader 0",
            "bulwark_cp_status_writes_total 0",
            "bulwark_cp_status_write_errors_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
