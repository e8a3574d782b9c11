//! The Kubernetes source: watches Services, EndpointSlices, Pods and the Bulwark
//! policy kinds cluster-wide and turns them into the same [`Model`] the folder source
//! produces, through the same decoder (so both report the same field paths).
//!
//! Objects are watched untyped and decoded one by one, so that one object that does not
//! deserialize is rejected (and reported) instead of failing the whole list. kube's
//! watcher relists after a `410 Gone` and retries with backoff through API server
//! outages; a relist replaces what a kind held, so deletions missed while disconnected
//! are not kept. An invalid new version of an object keeps its last valid version in
//! force.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value as Json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{Publisher, RejectedObject};
use crate::api::status::PolicyStatus;
use crate::api::{self, Decoded, FieldError, POLICY_GROUP};
use crate::lease::LeaseSettings;
use crate::model::{Kind, Model, Object, ObjectKey, ObjectName};
use crate::timestamp::Timestamp;

/// What `file` says in the rejections of this source.
pub const ORIGIN: &str = "kubernetes";

/// How to reach the cluster and which Lease elects the status writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// A kubeconfig file; `None`: in-cluster config, or `$KUBECONFIG`/`~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The status Lease.
    pub lease: LeaseSettings,
}

/// Why the cluster cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No usable configuration (not in a pod, no kubeconfig).
    #[error(
        "cannot configure the Kubernetes client: {0}; run in a pod, set KUBECONFIG, or use \
         --source kubernetes:PATH_TO_KUBECONFIG"
    )]
    Config(String),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Builds a client from the settings.
pub async fn client(settings: &KubernetesSettings) -> Result<Client, KubeError> {
    let config = match &settings.kubeconfig {
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
        }
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// The API resource of a kind.
pub fn resource(kind: Kind) -> ApiResource {
    let (group, version, plural) = match kind {
        Kind::Service => ("", "v1", "services"),
        Kind::Pod => ("", "v1", "pods"),
        Kind::EndpointSlice => ("discovery.k8s.io", "v1", "endpointslices"),
        Kind::ResiliencePolicy => (POLICY_GROUP, "v1alpha1", "resiliencepolicies"),
        Kind::RateLimitPolicy => (POLICY_GROUP, "v1alpha1", "ratelimitpolicies"),
        Kind::ShardTopology => (POLICY_GROUP, "v1alpha1", "shardtopologies"),
        Kind::HttpRoute => (api::http_route::GATEWAY_GROUP, "v1", "httproutes"),
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind.as_str()),
        plural,
    )
}

/// Whether a kind is one of ours, with a status the control plane writes.
pub const fn has_status(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::ResiliencePolicy | Kind::RateLimitPolicy | Kind::ShardTopology
    )
}

/// What the source knows about one of our policies, for its status.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObservation {
    /// `metadata.generation` of the version seen last.
    pub generation: Option<i64>,
    /// The conditions it carries now.
    pub status: PolicyStatus,
    /// Why the version seen last is invalid; `None` when it is valid.
    pub error: Option<FieldError>,
    /// Whether an earlier valid version stays in force despite `error`.
    pub kept_previous: bool,
}

/// What the source knows about an HTTPRoute with Service parents, for its status.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteObservation {
    /// `metadata.generation` of the version seen last.
    pub generation: Option<i64>,
    /// `spec.parentRefs` entries that name a Service, as written (read leniently, so
    /// that an invalid route still gets a status for each of its parents).
    pub parent_refs: Vec<Json>,
    /// `status.parents` as it is now (every controller's entries).
    pub status_parents: Vec<Json>,
    /// Why the version seen last is invalid; `None` when it is valid.
    pub error: Option<FieldError>,
    /// Whether an earlier valid version stays in force despite `error`.
    pub kept_previous: bool,
}

/// A consistent picture for the status writer: the model and every policy's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The model, as published to the index.
    pub model: Arc<Model>,
    /// Every policy by key.
    pub policies: BTreeMap<ObjectKey, PolicyObservation>,
    /// Every HTTPRoute with a Service parent, by name.
    pub routes: BTreeMap<ObjectName, RouteObservation>,
}

/// The Service entries of an HTTPRoute's `spec.parentRefs` and its `status.parents`.
fn route_parts(object: &DynamicObject) -> (Vec<Json>, Vec<Json>) {
    let list = |value: Option<&Json>| match value {
        Some(Json::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    let parent_refs = list(object.data.get("spec").and_then(|s| s.get("parentRefs")))
        .into_iter()
        .filter(|p| {
            matches!(p.get("group").and_then(Json::as_str), Some("" | "core"))
                && p.get("kind").and_then(Json::as_str) == Some("Service")
        })
        .collect();
    let status_parents = list(object.data.get("status").and_then(|s| s.get("parents")));
    (parent_refs, status_parents)
}

#[derive(Clone, Debug)]
struct Entry {
    good: Option<Object>,
    error: Option<(FieldError, Timestamp)>,
    generation: Option<i64>,
    status: PolicyStatus,
    /// For HTTPRoutes: the Service parentRefs and `status.parents`.
    route: Option<(Vec<Json>, Vec<Json>)>,
}

#[derive(Debug, Default)]
struct KindCache {
    entries: BTreeMap<ObjectName, Entry>,
    relisting: Option<BTreeMap<ObjectName, Entry>>,
    synced: bool,
}

/// Every watched object, by kind.
#[derive(Debug, Default)]
struct Cache {
    kinds: BTreeMap<Kind, KindCache>,
}

/// An object's name, read from its metadata.
fn name_of(object: &DynamicObject) -> Option<ObjectName> {
    let name = object.metadata.name.as_deref().filter(|n| !n.is_empty())?;
    let namespace = object
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(api::DEFAULT_NAMESPACE);
    Some(ObjectName::new(namespace, name))
}

/// Decodes one object with the folder source's decoder: the same rules, the same paths.
fn decode(kind: Kind, object: &DynamicObject) -> Result<Object, FieldError> {
    let resource = resource(kind);
    let mut json = serde_json::to_value(object)
        .map_err(|e| FieldError::new("", format!("cannot re-encode the object: {e}")))?;
    if let Json::Object(map) = &mut json {
        // List items carry no apiVersion/kind; the decoder needs them.
        map.insert(
            "apiVersion".into(),
            Json::String(resource.api_version.clone()),
        );
        map.insert("kind".into(), Json::String(resource.kind.clone()));
    }
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::to_value(&json)
        .map_err(|e| FieldError::new("", format!("cannot convert the object: {e}")))?;
    match api::decode(yaml) {
        Ok(Decoded::Object(object)) => Ok(object),
        Ok(Decoded::Skipped { .. } | Decoded::Empty) => {
            Err(FieldError::new("", "not an object of the watched kind"))
        }
        Err(e) => Err(e.error),
    }
}

impl Cache {
    fn entry(kind: Kind, object: &DynamicObject, previous: Option<&Entry>) -> Entry {
        let status = if has_status(kind) {
            object
                .data
                .get("status")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or_default()
        } else {
            PolicyStatus::default()
        };
        let generation = object.metadata.generation;
        let route = (kind == Kind::HttpRoute).then(|| route_parts(object));
        match decode(kind, object) {
            Ok(good) => Entry {
                good: Some(good),
                error: None,
                generation,
                status,
                route,
            },
            Err(error) => {
                let since = previous
                    .and_then(|p| p.error.as_ref())
                    .filter(|(e, _)| *e == error)
                    .map_or_else(Timestamp::now, |(_, since)| *since);
                if previous
                    .and_then(|p| p.error.as_ref())
                    .is_none_or(|(e, _)| *e != error)
                {
                    warn!(
                        kind = kind.as_str(),
                        object = %name_of(object).map(|n| n.to_string()).unwrap_or_default(),
                        path = %error.path,
                        reason = %error.reason,
                        "object rejected; its last valid version, if any, stays in force"
                    );
                }
                Entry {
                    good: previous.and_then(|p| p.good.clone()),
                    error: Some((error, since)),
                    generation,
                    status,
                    route,
                }
            }
        }
    }

    /// Applies one watch event; returns whether anything may have changed.
    fn apply(&mut self, kind: Kind, event: Event<DynamicObject>) -> bool {
        let cache = self.kinds.entry(kind).or_default();
        match event {
            Event::Init => {
                cache.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let Some(name) = name_of(&object) else {
                    warn!(kind = kind.as_str(), "skipped an object without a name");
                    return false;
                };
                let entry = Cache::entry(kind, &object, cache.entries.get(&name));
                cache
                    .relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name, entry);
                false
            }
            Event::InitDone => {
                cache.entries = cache.relisting.take().unwrap_or_default();
                if !cache.synced {
                    info!(
                        kind = kind.as_str(),
                        objects = cache.entries.len(),
                        "listed"
                    );
                }
                cache.synced = true;
                true
            }
            Event::Apply(object) => {
                let Some(name) = name_of(&object) else {
                    warn!(kind = kind.as_str(), "skipped an object without a name");
                    return false;
                };
                let entry = Cache::entry(kind, &object, cache.entries.get(&name));
                cache.entries.insert(name, entry);
                true
            }
            Event::Delete(object) => {
                let Some(name) = name_of(&object) else {
                    return false;
                };
                cache.entries.remove(&name).is_some()
            }
        }
    }

    fn synced(&self) -> bool {
        Kind::ALL
            .iter()
            .all(|k| self.kinds.get(k).is_some_and(|c| c.synced))
    }

    /// The HTTPRoutes with Service parents, for their status.
    fn routes(&self) -> BTreeMap<ObjectName, RouteObservation> {
        let Some(cache) = self.kinds.get(&Kind::HttpRoute) else {
            return BTreeMap::new();
        };
        cache
            .entries
            .iter()
            .filter_map(|(name, entry)| {
                let (parent_refs, status_parents) = entry.route.clone()?;
                (!parent_refs.is_empty()).then(|| {
                    let observation = RouteObservation {
                        generation: entry.generation,
                        parent_refs,
                        status_parents,
                        error: entry.error.as_ref().map(|(e, _)| e.clone()),
                        kept_previous: entry.good.is_some(),
                    };
                    (name.clone(), observation)
                })
            })
            .collect()
    }

    /// The model, the rejections and the policies' observations.
    fn snapshot(
        &self,
    ) -> (
        Model,
        Vec<RejectedObject>,
        BTreeMap<ObjectKey, PolicyObservation>,
    ) {
        let mut model = Model::default();
        let mut rejected = Vec::new();
        let mut policies = BTreeMap::new();
        for (&kind, cache) in &self.kinds {
            for (name, entry) in &cache.entries {
                if let Some(good) = &entry.good {
                    model.insert(good.clone());
                }
                let key = ObjectKey {
                    kind,
                    name: name.clone(),
                };
                if let Some((error, since)) = &entry.error {
                    rejected.push(RejectedObject {
                        file: ORIGIN.to_owned(),
                        document: None,
                        line: None,
                        object: Some(key.to_string()),
                        path: error.path.clone(),
                        reason: error.reason.clone(),
                        kept_previous: entry.good.is_some(),
                        since: *since,
                    });
                }
                if has_status(kind) {
                    policies.insert(
                        key,
                        PolicyObservation {
                            generation: entry.generation,
                            status: entry.status.clone(),
                            error: entry.error.as_ref().map(|(e, _)| e.clone()),
                            kept_previous: entry.good.is_some(),
                        },
                    );
                }
            }
        }
        (model, rejected, policies)
    }
}

/// A running Kubernetes source.
#[derive(Debug)]
pub struct KubernetesSource {
    /// The watchers and the task that folds their events into models.
    pub tasks: Vec<(&'static str, JoinHandle<()>)>,
    /// Whether every kind has been listed once (the first model is complete).
    pub synced: watch::Receiver<bool>,
    /// The model and the policies' states, for the status writer.
    pub observed: watch::Receiver<Arc<Observed>>,
}

/// Follows one kind until `shutdown` or until nobody listens.
async fn follow(
    kind: Kind,
    api: Api<DynamicObject>,
    events: &mpsc::Sender<(Kind, Event<DynamicObject>)>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = tokio::select! {
            _ = crate::stopped(shutdown) => break,
            next = stream.next() => next,
        };
        match next {
            None => break,
            Some(Ok(event)) => {
                if events.send((kind, event)).await.is_err() {
                    break;
                }
            }
            Some(Err(error)) => warn!(
                kind = kind.as_str(),
                %error,
                "watch failed; retrying with backoff (for Bulwark kinds: are the CRDs \
                 installed? kubectl apply -f charts/bulwark/crds/)"
            ),
        }
    }
}

/// How often the control plane looks again for the Gateway API while it is absent.
pub const GATEWAY_API_RECHECK: Duration = Duration::from_secs(30);

/// Waits until the cluster serves `HTTPRoute` in `gateway.networking.k8s.io/v1` (API
/// discovery), so that a cluster without the Gateway API CRDs gets no failing watch and
/// no error every few seconds. Meanwhile the kind counts as listed and empty, so the
/// other kinds' model is published. Returns false on shutdown.
async fn gateway_api_installed(
    client: &Client,
    events: &mpsc::Sender<(Kind, Event<DynamicObject>)>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let group_version = format!("{}/v1", api::http_route::GATEWAY_GROUP);
    let mut reported_absent = false;
    loop {
        let absent = match client.list_api_group_resources(&group_version).await {
            Ok(list) => !list.resources.iter().any(|r| r.name == "httproutes"),
            Err(kube::Error::Api(status)) if status.code == 404 => true,
            Err(error) => {
                // Not an answer about the group (the API server is away, RBAC): ask again soon.
                debug!(%error, "API discovery of the Gateway API failed; retrying");
                tokio::select! {
                    _ = crate::stopped(shutdown) => return false,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                continue;
            }
        };
        if !absent {
            info!(group_version = %group_version, "the Gateway API is installed; watching HTTPRoutes");
            return true;
        }
        if !reported_absent {
            info!(
                group_version = %group_version,
                recheck_secs = GATEWAY_API_RECHECK.as_secs(),
                "the Gateway API CRDs are not installed; HTTPRoutes (traffic splitting) are not \
                 watched until they are"
            );
            reported_absent = true;
            for event in [Event::Init, Event::InitDone] {
                if events.send((Kind::HttpRoute, event)).await.is_err() {
                    return false;
                }
            }
        }
        tokio::select! {
            _ = crate::stopped(shutdown) => return false,
            () = tokio::time::sleep(GATEWAY_API_RECHECK) => {}
        }
    }
}

/// Starts a watcher per kind and the task that publishes models through `publisher`
/// after each burst of events (quiet for `debounce`).
pub fn spawn(
    client: &Client,
    publisher: Publisher,
    debounce: Duration,
    shutdown: &watch::Receiver<bool>,
) -> KubernetesSource {
    let (events, mut received) = mpsc::channel::<(Kind, Event<DynamicObject>)>(1024);
    let mut tasks = Vec::new();
    for kind in Kind::ALL {
        let client = client.clone();
        let events = events.clone();
        let mut shutdown = shutdown.clone();
        tasks.push((
            "watch",
            tokio::spawn(async move {
                if kind == Kind::HttpRoute
                    && !gateway_api_installed(&client, &events, &mut shutdown).await
                {
                    return;
                }
                let api: Api<DynamicObject> = Api::all_with(client, &resource(kind));
                follow(kind, api, &events, &mut shutdown).await;
            }),
        ));
    }
    drop(events);
    let (synced_tx, synced) = watch::channel(false);
    let (observed_tx, observed) = watch::channel(Arc::new(Observed::default()));
    let mut shutdown = shutdown.clone();
    tasks.push((
        "source",
        tokio::spawn(async move {
            let mut cache = Cache::default();
            loop {
                let first = tokio::select! {
                    _ = crate::stopped(&mut shutdown) => break,
                    first = received.recv() => first,
                };
                let Some((kind, event)) = first else { break };
                let mut changed = cache.apply(kind, event);
                // Let a burst (a relist, a rollout) settle, then publish once.
                tokio::time::sleep(debounce).await;
                while let Ok((kind, event)) = received.try_recv() {
                    changed |= cache.apply(kind, event);
                }
                if !changed || !cache.synced() {
                    continue;
                }
                let (model, rejected, policies) = cache.snapshot();
                let routes = cache.routes();
                debug!(
                    objects = ?Kind::ALL.map(|k| (k.as_str(), model.count(k))),
                    rejected = rejected.len(),
                    "publishing the cluster's model"
                );
                let model = Arc::new(model);
                publisher.publish((*model).clone(), rejected);
                observed_tx.send_if_modified(|current| {
                    let next = Observed {
                        model,
                        policies,
                        routes,
                    };
                    if **current == next {
                        false
                    } else {
                        *current = Arc::new(next);
                        true
                    }
                });
                synced_tx.send_if_modified(|s| !std::mem::replace(s, true));
            }
        }),
    ));
    KubernetesSource {
        tasks,
        synced,
        observed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, attempts: u32, generation: i64) -> DynamicObject {
        let mut object = DynamicObject::new(name, &resource(Kind::ResiliencePolicy))
            .within("demo")
            .data(serde_json::json!({
                "spec": {
                    "targetRefs": [{"kind": "Service", "name": "reviews"}],
                    "retry": {"attempts": attempts},
                },
            }));
        object.metadata.generation = Some(generation);
        object
    }

    fn attempts(cache: &Cache, name: &str) -> Option<u32> {
        let (model, _, _) = cache.snapshot();
        model
            .resilience_policies
            .get(&ObjectName::new("demo", name))
            .and_then(|p| p.retry.as_ref())
            .map(|r| r.attempts)
    }

    #[test]
    fn an_invalid_version_keeps_the_last_valid_one_and_is_reported() {
        let mut cache = Cache::default();
        assert!(cache.apply(Kind::ResiliencePolicy, Event::Apply(policy("a", 2, 1))));
        cache.apply(Kind::ResiliencePolicy, Event::Apply(policy("a", 11, 2)));
        assert_eq!(attempts(&cache, "a"), Some(2));
        let (_, rejected, policies) = cache.snapshot();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].path, "spec.retry.attempts");
        assert!(rejected[0].kept_previous);
        let observation = &policies[&ObjectKey {
            kind: Kind::ResiliencePolicy,
            name: ObjectName::new("demo", "a"),
        }];
        assert_eq!(observation.generation, Some(2));
        assert!(observation.error.is_some());

        cache.apply(Kind::ResiliencePolicy, Event::Apply(policy("a", 3, 3)));
        assert_eq!(attempts(&cache, "a"), Some(3));
        assert!(cache.snapshot().1.is_empty(), "fixed: no longer rejected");
    }

    #[test]
    fn a_relist_replaces_what_a_kind_held_and_sync_needs_every_kind() {
        let mut cache = Cache::default();
        for kind in Kind::ALL {
            cache.apply(kind, Event::Init);
            assert!(!cache.synced());
            cache.apply(kind, Event::InitDone);
        }
        assert!(cache.synced());
        cache.apply(Kind::ResiliencePolicy, Event::Apply(policy("gone", 2, 1)));
        cache.apply(Kind::ResiliencePolicy, Event::Apply(policy("kept", 2, 1)));
        // A relist after a 410 lists only what still exists.
        cache.apply(Kind::ResiliencePolicy, Event::Init);
        cache.apply(
            Kind::ResiliencePolicy,
            Event::InitApply(policy("kept", 4, 2)),
        );
        assert_eq!(
            attempts(&cache, "gone"),
            Some(2),
            "the old state holds until the relist is done"
        );
        assert!(cache.apply(Kind::ResiliencePolicy, Event::InitDone));
        assert_eq!(attempts(&cache, "gone"), None);
        assert_eq!(attempts(&cache, "kept"), Some(4));
        assert!(cache.apply(Kind::ResiliencePolicy, Event::Delete(policy("kept", 4, 2))));
        assert_eq!(attempts(&cache, "kept"), None);
    }

    #[test]
    fn an_object_that_does_not_deserialize_is_skipped_not_fatal() {
        let mut cache = Cache::default();
        let broken = DynamicObject::new("web", &resource(Kind::Service))
            .within("demo")
            .data(serde_json::json!({"spec": {"ports": 3}}));
        cache.apply(Kind::Service, Event::Apply(broken));
        let (model, rejected, _) = cache.snapshot();
        assert!(model.services.is_empty());
        assert_eq!(rejected[0].object.as_deref(), Some("Service demo/web"));
        assert_eq!(rejected[0].path, "spec.ports");
    }

    #[test]
    fn a_watched_pod_brings_its_weight_annotation() {
        let mut cache = Cache::default();
        let mut pod = DynamicObject::new("web-0", &resource(Kind::Pod))
            .within("demo")
            .data(serde_json::json!({"status": {"podIP": "10.0.0.1"}}));
        pod.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
        pod.metadata.annotations = Some([("bulwark.io/weight".to_owned(), "4".to_owned())].into());
        cache.apply(Kind::Pod, Event::Apply(pod));
        let (model, rejected, _) = cache.snapshot();
        assert!(rejected.is_empty());
        assert_eq!(
            model.pods[&ObjectName::new("demo", "web-0")].weight,
            Some(4)
        );
    }
}
