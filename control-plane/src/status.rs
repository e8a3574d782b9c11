//! Policy status: judges every Bulwark policy the Kubernetes source sees and writes its
//! `Accepted` condition, only from the replica holding the status Lease and only when
//! the condition changed. HTTPRoutes and GRPCRoutes with Service parents get their
//! `status.parents` entries the same way ([`route`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::api::status::{ACCEPTED, Reason};
use crate::index::{self, Diagnostic};
use crate::metrics::Metrics;
use crate::model::authorization::Attachment;
use crate::model::{Kind, Model, ObjectKey, ObjectName, TargetRef};
use crate::source::kubernetes::{Observed, PolicyObservation, resource};

pub mod route;

/// How often the writer re-checks everything even without news (a status someone else
/// overwrote is put right within this time).
pub const RESYNC: Duration = Duration::from_secs(30);

/// The `Accepted` condition a policy should carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The reason.
    pub reason: Reason,
    /// What an operator reads in `kubectl describe`.
    pub message: String,
}

impl Verdict {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Verdict {
            reason,
            message: message.into(),
        }
    }
}

fn targets<'m>(model: &'m Model, key: &ObjectKey) -> Option<&'m [TargetRef]> {
    match key.kind {
        Kind::ResiliencePolicy => model
            .resilience_policies
            .get(&key.name)
            .map(|p| &p.targets[..]),
        Kind::RateLimitPolicy => model
            .rate_limit_policies
            .get(&key.name)
            .map(|p| &p.targets[..]),
        Kind::ShardTopology => model
            .shard_topologies
            .get(&key.name)
            .map(|p| &p.targets[..]),
        Kind::AuthorizationPolicy => {
            model
                .authorization_policies
                .get(&key.name)
                .map(|p| match &p.attachment {
                    Attachment::Targets(targets) => &targets[..],
                    // A selector names pods, not Services: there is nothing to miss.
                    Attachment::Selector(_) => &[],
                })
        }
        // It covers pods by label or by namespace, never through a Service.
        Kind::PeerAuthentication => model.peer_authentications.get(&key.name).map(|_| &[][..]),
        Kind::Service | Kind::EndpointSlice | Kind::Pod | Kind::HttpRoute | Kind::GrpcRoute => None,
    }
}

/// Judges one policy: `Invalid` beats `TargetNotFound` beats `Conflicted`.
pub fn judge(
    key: &ObjectKey,
    observation: &PolicyObservation,
    model: &Model,
    diagnostics: &BTreeSet<Diagnostic>,
) -> Verdict {
    if let Some(error) = &observation.error {
        let kept = if observation.kept_previous {
            "; the last accepted version stays in force"
        } else {
            "; it is not applied"
        };
        return Verdict::new(Reason::Invalid, format!("{error}{kept}"));
    }
    let Some(targets) = targets(model, key) else {
        return Verdict::new(Reason::Invalid, "the policy is not in the model");
    };
    let mut missing = Vec::new();
    for d in diagnostics {
        match d {
            Diagnostic::MissingService {
                kind,
                policy,
                service,
            } if *kind == key.kind && *policy == key.name => {
                missing.push(format!(
                    "Service {}/{service} does not exist",
                    key.name.namespace
                ));
            }
            Diagnostic::MissingSection {
                kind,
                policy,
                service,
                section,
            } if *kind == key.kind && *policy == key.name => missing.push(format!(
                "Service {}/{service} has no TCP port named {section:?}",
                key.name.namespace
            )),
            _ => {}
        }
    }
    if key.kind == Kind::ShardTopology {
        for target in targets {
            let name = ObjectName::new(key.name.namespace.as_str(), target.service.as_str());
            if !model.services.contains_key(&name) {
                missing.push(format!("Service {name} does not exist"));
            }
        }
    }
    if !targets.is_empty() && missing.len() >= targets.len() {
        return Verdict::new(
            Reason::TargetNotFound,
            format!("{}; the policy applies once it does", missing.join("; ")),
        );
    }
    let mut lost: BTreeMap<&ObjectName, Vec<String>> = BTreeMap::new();
    for d in diagnostics {
        let (winner, place) = match d {
            Diagnostic::Conflict {
                service,
                port,
                winner,
                loser,
            } if key.kind == Kind::ResiliencePolicy && *loser == key.name => {
                (winner, format!("{service} port {port}"))
            }
            Diagnostic::PeerAuthenticationConflict {
                winner,
                loser,
                namespace_wide,
            } if key.kind == Kind::PeerAuthentication && *loser == key.name => (
                winner,
                Diagnostic::peer_authentication_place(winner, *namespace_wide),
            ),
            _ => continue,
        };
        lost.entry(winner).or_default().push(place);
    }
    if key.kind == Kind::ShardTopology {
        for (winner, services) in shard_conflicts(model, &key.name) {
            lost.insert(winner, services);
        }
    }
    if !lost.is_empty() {
        let mut message = String::new();
        for (winner, places) in lost {
            if !message.is_empty() {
                message.push_str("; ");
            }
            let _ = write!(
                message,
                "{} {winner} takes precedence on {} (more specific, or older by creation time, then name)",
                key.kind,
                places.join(", ")
            );
        }
        return Verdict::new(Reason::Conflicted, message);
    }
    let mut message = "the policy is in force".to_owned();
    if !missing.is_empty() {
        let _ = write!(message, " (except: {})", missing.join("; "));
    }
    Verdict::new(Reason::Accepted, message)
}

/// Older ShardTopologies on the same Service win (creation time, then name).
fn shard_conflicts<'m>(model: &'m Model, name: &ObjectName) -> Vec<(&'m ObjectName, Vec<String>)> {
    let Some(this) = model.shard_topologies.get(name) else {
        return Vec::new();
    };
    let rank = |t: &crate::model::ShardTopology| (t.created.is_none(), t.created, t.name.clone());
    let mut out = Vec::new();
    for other in model.shard_topologies.values() {
        if other.name == *name || other.name.namespace != name.namespace || rank(other) > rank(this)
        {
            continue;
        }
        let shared: Vec<String> = this
            .targets
            .iter()
            .filter(|t| other.targets.iter().any(|o| o.service == t.service))
            .map(|t| format!("Service {}/{}", name.namespace, t.service))
            .collect();
        if !shared.is_empty() {
            out.push((&other.name, shared));
        }
    }
    out
}

/// Whether the policy already carries this verdict for its current generation.
fn up_to_date(observation: &PolicyObservation, verdict: &Verdict) -> bool {
    observation
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == ACCEPTED)
        .is_some_and(|c| {
            c.status == verdict.reason.status()
                && c.reason == verdict.reason.as_str()
                && c.message == verdict.message
                && c.observed_generation == observation.generation
        })
}

/// The conditions to write: the others as they are, `Accepted` replaced (its transition
/// time kept when its status did not change).
fn conditions(observation: &PolicyObservation, verdict: &Verdict) -> Vec<Condition> {
    let previous = observation
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == ACCEPTED);
    let last_transition_time = previous
        .filter(|c| c.status == verdict.reason.status())
        .map_or_else(
            || Time(Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    let mut conditions: Vec<Condition> = observation
        .status
        .conditions
        .iter()
        .filter(|c| c.type_ != ACCEPTED)
        .cloned()
        .collect();
    conditions.push(Condition {
        type_: ACCEPTED.to_owned(),
        status: verdict.reason.status().to_owned(),
        reason: verdict.reason.as_str().to_owned(),
        message: verdict.message.clone(),
        observed_generation: observation.generation,
        last_transition_time,
    });
    conditions
}

/// Writes status while `leader` says this replica holds the Lease.
pub fn spawn(
    client: Client,
    mut observed: watch::Receiver<Arc<Observed>>,
    mut leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // What we patched and have not seen come back through the watch yet.
        let mut written: BTreeMap<ObjectKey, (Option<i64>, Verdict)> = BTreeMap::new();
        let mut routes_written: BTreeMap<ObjectKey, String> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => break,
                changed = observed.changed() => if changed.is_err() { break },
                changed = leader.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(RESYNC) => {
                    written.clear();
                    routes_written.clear();
                }
            }
            let leading = *leader.borrow_and_update();
            metrics.status_leader.set(i64::from(leading));
            if !leading {
                written.clear();
                routes_written.clear();
                continue;
            }
            let snapshot = Arc::clone(&observed.borrow_and_update());
            let diagnostics = index::diagnose(&snapshot.model);
            written.retain(|key, _| snapshot.policies.contains_key(key));
            for (key, observation) in &snapshot.policies {
                let verdict = judge(key, observation, &snapshot.model, &diagnostics);
                if up_to_date(observation, &verdict) {
                    written.remove(key);
                    continue;
                }
                let pending = (observation.generation, verdict);
                if written.get(key) == Some(&pending) {
                    continue;
                }
                let verdict = &pending.1;
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &key.name.namespace, &resource(key.kind));
                let patch = serde_json::json!({
                    "status": { "conditions": conditions(observation, verdict) }
                });
                match api
                    .patch_status(
                        &key.name.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        info!(
                            policy = %key,
                            reason = verdict.reason.as_str(),
                            message = %verdict.message,
                            "status written"
                        );
                        metrics.status_writes.inc();
                        written.insert(key.clone(), pending);
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        debug!(policy = %key, "the policy went away before its status was written");
                    }
                    Err(error) => {
                        metrics.status_write_errors.inc();
                        warn!(policy = %key, %error, "cannot write the policy's status; retrying later");
                    }
                }
            }
            write_routes(&client, &snapshot, &mut routes_written, &metrics).await;
        }
    })
}

/// Writes the `status.parents` of every route (HTTPRoute, GRPCRoute) whose entries are
/// out of date; `written` holds what was patched and not yet seen back (without
/// transition times).
async fn write_routes(
    client: &Client,
    snapshot: &Observed,
    written: &mut BTreeMap<ObjectKey, String>,
    metrics: &Metrics,
) {
    written.retain(|name, _| snapshot.routes.contains_key(name));
    let now = serde_json::to_value(Time(Timestamp::now()))
        .ok()
        .and_then(|t| t.as_str().map(str::to_owned))
        .unwrap_or_default();
    for (key, observation) in &snapshot.routes {
        let name = &key.name;
        let Some(parents) = route::desired(key, observation, &snapshot.model, &now) else {
            written.remove(key);
            continue;
        };
        let fingerprint = without_times(&parents, observation.generation);
        if written.get(key) == Some(&fingerprint) {
            continue;
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &name.namespace, &resource(key.kind));
        let patch = serde_json::json!({ "status": { "parents": parents } });
        match api
            .patch_status(&name.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(kind = key.kind.as_str(), route = %name, "route status written");
                metrics.status_writes.inc();
                written.insert(key.clone(), fingerprint);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                debug!(kind = key.kind.as_str(), route = %name, "the route went away before its status was written");
            }
            Err(error) => {
                metrics.status_write_errors.inc();
                warn!(kind = key.kind.as_str(), route = %name, %error, "cannot write the route's status; retrying later");
            }
        }
    }
}

/// The entries as text without their transition times (which differ between two
/// computations of the same verdict).
fn without_times(parents: &[serde_json::Value], generation: Option<i64>) -> String {
    let mut copy = parents.to_vec();
    for entry in &mut copy {
        if let Some(conditions) = entry
            .get_mut("conditions")
            .and_then(serde_json::Value::as_array_mut)
        {
            for c in conditions {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastTransitionTime");
                }
            }
        }
    }
    format!("{generation:?} {}", serde_json::Value::Array(copy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::FieldError;
    use crate::api::status::PolicyStatus;

    fn observation(error: Option<FieldError>, kept: bool) -> PolicyObservation {
        PolicyObservation {
            generation: Some(2),
            status: PolicyStatus::default(),
            error,
            kept_previous: kept,
        }
    }

    fn key(kind: Kind, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            name: ObjectName::new("demo", name),
        }
    }

    #[test]
    fn invalid_names_the_field_and_whether_the_last_version_stays() {
        let obs = observation(
            Some(FieldError::new(
                "spec.retry.attempts",
                "must be between 1 and 10",
            )),
            true,
        );
        let v = judge(
            &key(Kind::ResiliencePolicy, "a"),
            &obs,
            &Model::default(),
            &BTreeSet::new(),
        );
        assert_eq!(v.reason, Reason::Invalid);
        assert_eq!(
            v.message,
            "spec.retry.attempts: must be between 1 and 10; the last accepted version stays in force"
        );
    }

    #[test]
    fn the_younger_of_two_namespace_wide_peer_authentications_is_conflicted() {
        let model = crate::testing::model(
            "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {name: old, namespace: demo, creationTimestamp: '2024-01-01T00:00:00Z'}\n\
             spec: {mode: Strict}\n---\n\
             apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {name: young, namespace: demo, creationTimestamp: '2024-02-01T00:00:00Z'}\n\
             spec: {}\n---\n\
             apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {name: web, namespace: demo, creationTimestamp: '2024-03-01T00:00:00Z'}\n\
             spec: {selector: {matchLabels: {app: web}}, mode: Permissive}\n",
        );
        let diagnostics = index::diagnose(&model);
        let verdict = |name: &str| {
            judge(
                &key(Kind::PeerAuthentication, name),
                &observation(None, false),
                &model,
                &diagnostics,
            )
        };
        let young = verdict("young");
        assert_eq!(young.reason, Reason::Conflicted);
        assert_eq!(
            young.message,
            "PeerAuthentication demo/old takes precedence on every pod of namespace demo \
             (more specific, or older by creation time, then name)"
        );
        for in_force in ["old", "web"] {
            assert_eq!(verdict(in_force).reason, Reason::Accepted, "{in_force}");
        }
    }

    #[test]
    fn conditions_keep_others_and_the_transition_time_when_status_is_unchanged() {
        let mut obs = observation(None, false);
        let old = Time(Timestamp::from_second(1_000).unwrap());
        obs.status.conditions = vec![
            Condition {
                type_: ACCEPTED.into(),
                status: "True".into(),
                reason: "Accepted".into(),
                message: "old".into(),
                observed_generation: Some(1),
                last_transition_time: old.clone(),
            },
            Condition {
                type_: "Other".into(),
                status: "True".into(),
                reason: "X".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: old.clone(),
            },
        ];
        let accepted = Verdict::new(Reason::Accepted, "the policy is in force");
        assert!(
            !up_to_date(&obs, &accepted),
            "generation and message moved on"
        );
        let written = conditions(&obs, &accepted);
        assert_eq!(written.len(), 2);
        let a = written.iter().find(|c| c.type_ == ACCEPTED).unwrap();
        assert_eq!(a.last_transition_time, old);
        assert_eq!(a.observed_generation, Some(2));
        obs.status.conditions = written.clone();
        assert!(up_to_date(&obs, &accepted));

        let invalid = Verdict::new(Reason::Invalid, "x");
        let written = conditions(&obs, &invalid);
        let a = written.iter().find(|c| c.type_ == ACCEPTED).unwrap();
        assert_eq!(a.status, "False");
        assert_ne!(a.last_transition_time, old, "the status flipped");
    }
}
