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
    /// How often API discovery is asked again whether the Gateway API is installed,
    /// while it is not ([`GATEWAY_API_RECHECK`] by default).
    pub gateway_api_recheck: Duration,
}

impl KubernetesSettings {
    /// Settings with the default Gateway API re-discovery interval.
    pub fn new(kubeconfig: Option<PathBuf>, lease: LeaseSettings) -> Self {
        KubernetesSettings {
            kubeconfig,
            lease,
            gateway_api_recheck: GATEWAY_API_RECHECK,
        }
    }
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
    client_from(settings.kubeconfig.as_deref()).await
}

/// Builds a client from a kubeconfig file, or without one from the pod's service account
/// or KUBECONFIG.
pub async fn client_from(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
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
    // kube builds its rustls configuration with the process's default provider (and
    // installs rustls's own if there is none): make it the mesh's, so the connection to
    // the API server offers the same key exchange as every other TLS of ours. An error
    // only says one is installed already (an earlier client).
    let _ = bulwark_proto::tls::provider().install_default();
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
        Kind::GrpcRoute => (api::http_route::GATEWAY_GROUP, "v1", "grpcroutes"),
        Kind::AuthorizationPolicy => (POLICY_GROUP, "v1alpha1", "authorizationpolicies"),
        Kind::PeerAuthentication => (POLICY_GROUP, "v1alpha1", "peerauthentications"),
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
        Kind::ResiliencePolicy
            | Kind::RateLimitPolicy
            | Kind::ShardTopology
            | Kind::AuthorizationPolicy
            | Kind::PeerAuthentication
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

/// What the source knows about a route (HTTPRoute, GRPCRoute) with Service parents,
/// for its status.
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
    /// Every route (HTTPRoute, GRPCRoute) with a Service parent, by kind and name.
    pub routes: BTreeMap<ObjectKey, RouteObservation>,
}

/// The Service entries of a route's `spec.parentRefs` and its `status.parents`.
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
    /// For routes: the Service parentRefs and `status.parents`.
    route: Option<(Vec<Json>, Vec<Json>)>,
    /// Invalid fields of the version in force that were ignored (a pod's bad weight
    /// annotation), remembered so that each is logged once, not at every re-decode.
    ignored: Vec<FieldError>,
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
    /// How many ignored-field warnings were logged (each once per object and problem).
    ignored_logged: usize,
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
/// Fields that were ignored rather than rejecting the object go to `ignored`.
fn decode(
    kind: Kind,
    object: &DynamicObject,
    ignored: &mut Vec<FieldError>,
) -> Result<Object, FieldError> {
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
    match api::decode_noting(yaml, ignored) {
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
        let route = kind.is_route().then(|| route_parts(object));
        let mut ignored = Vec::new();
        match decode(kind, object, &mut ignored) {
            Ok(good) => Entry {
                good: Some(good),
                error: None,
                generation,
                status,
                route,
                ignored,
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
                    // What was ignored belongs to the version that stays in force.
                    ignored: previous.map(|p| p.ignored.clone()).unwrap_or_default(),
                }
            }
        }
    }

    /// Logs the fields `entry` ignored that `previous` (the same object as known
    /// before) did not; returns how many. A pod re-decoded with the same bad weight
    /// says nothing; a new bad value, or one that comes back after a fix, is logged.
    fn report_ignored(
        kind: Kind,
        name: &ObjectName,
        entry: &Entry,
        previous: Option<&Entry>,
    ) -> usize {
        let mut logged = 0;
        for error in &entry.ignored {
            if previous.is_some_and(|p| p.ignored.contains(error)) {
                continue;
            }
            warn!(
                kind = kind.as_str(),
                object = %name,
                path = %error.path,
                reason = %error.reason,
                "ignoring an invalid field; the object is used without it"
            );
            logged += 1;
        }
        logged
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
                let previous = cache.entries.get(&name);
                let entry = Cache::entry(kind, &object, previous);
                self.ignored_logged += Cache::report_ignored(kind, &name, &entry, previous);
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
                let previous = cache.entries.get(&name);
                let entry = Cache::entry(kind, &object, previous);
                self.ignored_logged += Cache::report_ignored(kind, &name, &entry, previous);
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

    /// The routes (HTTPRoutes, GRPCRoutes) with Service parents, for their status.
    fn routes(&self) -> BTreeMap<ObjectKey, RouteObservation> {
        Kind::ROUTES
            .iter()
            .filter_map(|kind| self.kinds.get(kind).map(|cache| (*kind, cache)))
            .flat_map(|(kind, cache)| cache.entries.iter().map(move |e| (kind, e)))
            .filter_map(|(kind, (name, entry))| {
                let (parent_refs, status_parents) = entry.route.clone()?;
                (!parent_refs.is_empty()).then(|| {
                    let observation = RouteObservation {
                        generation: entry.generation,
                        parent_refs,
                        status_parents,
                        error: entry.error.as_ref().map(|(e, _)| e.clone()),
                        kept_previous: entry.good.is_some(),
                    };
                    let key = ObjectKey {
                        kind,
                        name: name.clone(),
                    };
                    (key, observation)
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

/// Why [`follow`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stopped {
    /// Shutdown, or nobody listens any more.
    Shutdown,
    /// The API server answered 404: it does not serve the kind (any more).
    NotServed,
}

/// Whether a watch error may be the API server saying it does not serve the resource:
/// a 404, or a watch body that is no JSON. A real API server answers a watch of a kind
/// it no longer serves with Go's plain-text `404 page not found`, and kube's watch
/// stream reports that body as a parse error, not as a 404. Discovery then decides: a
/// kind still served is watched again after a pause, its routes kept.
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => {
            matches!(e, kube::Error::Api(s) if s.code == 404)
        }
        watcher::Error::WatchFailed(e) => {
            matches!(
                e,
                kube::Error::Api(s) if s.code == 404
            ) || matches!(e, kube::Error::SerdeError(_))
        }
        watcher::Error::WatchError(status) => status.code == 404,
        watcher::Error::NoResourceVersion => false,
    }
}

/// Follows one kind until `shutdown` or until nobody listens; for routes also until
/// the API server stops serving them (the Gateway API CRDs were deleted), which the
/// caller handles through discovery instead of retrying a 404 forever.
async fn follow(
    kind: Kind,
    api: Api<DynamicObject>,
    events: &mpsc::Sender<(Kind, Event<DynamicObject>)>,
    shutdown: &mut watch::Receiver<bool>,
) -> Stopped {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = tokio::select! {
            _ = crate::stopped(shutdown) => return Stopped::Shutdown,
            next = stream.next() => next,
        };
        match next {
            None => return Stopped::Shutdown,
            Some(Ok(event)) => {
                if events.send((kind, event)).await.is_err() {
                    return Stopped::Shutdown;
                }
            }
            Some(Err(error)) if kind.is_route() && not_served(&error) => {
                debug!(kind = kind.as_str(), %error, "the API server no longer serves the kind");
                return Stopped::NotServed;
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

/// How often the control plane looks again for the Gateway API while it is absent, by
/// default ([`KubernetesSettings::gateway_api_recheck`]).
pub const GATEWAY_API_RECHECK: Duration = Duration::from_secs(30);

/// How long to wait before asking discovery again after it failed (not an answer).
const DISCOVERY_RETRY: Duration = Duration::from_secs(2);

/// Sleeps for `duration`; false when shutdown came first.
async fn pause(duration: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = crate::stopped(shutdown) => false,
        () = tokio::time::sleep(duration) => true,
    }
}

/// Whether API discovery lists `plural` in `group_version`; `None` on shutdown.
/// Failures that are no answer about the group (the API server is away, RBAC) are
/// retried.
async fn gateway_api_served(
    client: &Client,
    group_version: &str,
    plural: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<bool> {
    loop {
        match client.list_api_group_resources(group_version).await {
            Ok(list) => return Some(list.resources.iter().any(|r| r.name == plural)),
            Err(kube::Error::Api(status)) if status.code == 404 => return Some(false),
            Err(error) => {
                debug!(%error, "API discovery of the Gateway API failed; retrying");
                if !pause(DISCOVERY_RETRY, shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// Follows one route kind (HTTPRoutes or GRPCRoutes) while API discovery lists it in
/// `gateway.networking.k8s.io/v1`, each kind on its own (GRPCRoute reached the standard
/// channel later than HTTPRoute, so a cluster may serve one and not the other), so that
/// a cluster without the CRD gets no failing watch and no error every few seconds.
/// While the kind is absent it counts as listed and empty, so the other kinds' model is
/// published, and discovery is asked again every `recheck`. When the kind goes away
/// (its CRD is deleted) its routes are dropped from the model, once, with one log line,
/// and the source goes back to waiting.
async fn follow_routes(
    kind: Kind,
    client: Client,
    events: mpsc::Sender<(Kind, Event<DynamicObject>)>,
    mut shutdown: watch::Receiver<bool>,
    recheck: Duration,
) {
    let resource = resource(kind);
    let group_version = resource.api_version.clone();
    let plural = resource.plural.as_str();
    // Whether the (empty) absence has been published since the group was last served.
    let mut reported_absent = false;
    // Whether the last watch ended because the API server stopped serving the kind.
    let mut lost = false;
    loop {
        let served = gateway_api_served(&client, &group_version, plural, &mut shutdown).await;
        let Some(served) = served else { return };
        if served && lost {
            // Discovery still lists the kind although their watch got a 404 (a CRD
            // being deleted, or an API server that disagrees with itself): look again
            // later rather than spin between the two.
            debug!(
                %group_version,
                kind = kind.as_str(),
                "the kind is not served yet discovery lists it; looking again later"
            );
            lost = false;
            if !pause(recheck, &mut shutdown).await {
                return;
            }
            continue;
        }
        if served {
            info!(%group_version, kind = kind.as_str(), "the Gateway API serves the kind; watching it");
            reported_absent = false;
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            match follow(kind, api, &events, &mut shutdown).await {
                Stopped::Shutdown => return,
                Stopped::NotServed => {
                    // Ask discovery at once, so that routes of deleted CRDs go promptly.
                    lost = true;
                    continue;
                }
            }
        }
        if !reported_absent {
            if lost {
                warn!(
                    %group_version,
                    kind = kind.as_str(),
                    recheck_secs = recheck.as_secs_f64(),
                    "the Gateway API kind is no longer served (was its CRD deleted?); its routes \
                     (traffic splitting) are dropped and not watched until it is back"
                );
            } else {
                info!(
                    %group_version,
                    kind = kind.as_str(),
                    recheck_secs = recheck.as_secs_f64(),
                    "the Gateway API CRD of the kind is not installed; its routes (traffic \
                     splitting) are not watched until it is"
                );
            }
            reported_absent = true;
            // An empty relist: whatever the last watch held is dropped.
            for event in [Event::Init, Event::InitDone] {
                if events.send((kind, event)).await.is_err() {
                    return;
                }
            }
        }
        lost = false;
        if !pause(recheck, &mut shutdown).await {
            return;
        }
    }
}

/// Starts a watcher per kind and the task that publishes models through `publisher`
/// after each burst of events (quiet for `debounce`).
/// HTTPRoutes and GRPCRoutes are each watched only while API discovery shows them,
/// asked again every `gateway_api_recheck` while it does not.
pub fn spawn(
    client: &Client,
    publisher: Publisher,
    debounce: Duration,
    gateway_api_recheck: Duration,
    shutdown: &watch::Receiver<bool>,
) -> KubernetesSource {
    let (events, mut received) = mpsc::channel::<(Kind, Event<DynamicObject>)>(1024);
    let mut tasks = Vec::new();
    for kind in Kind::ALL {
        let client = client.clone();
        let events = events.clone();
        let mut shutdown = shutdown.clone();
        let task = if kind.is_route() {
            tokio::spawn(follow_routes(
                kind,
                client,
                events,
                shutdown,
                gateway_api_recheck,
            ))
        } else {
            tokio::spawn(async move {
                let api: Api<DynamicObject> = Api::all_with(client, &resource(kind));
                follow(kind, api, &events, &mut shutdown).await;
            })
        };
        tasks.push(("watch", task));
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

    fn weighted_pod(weight: &str) -> DynamicObject {
        let mut pod = DynamicObject::new("web-0", &resource(Kind::Pod))
            .within("demo")
            .data(serde_json::json!({"status": {"podIP": "10.0.0.1"}}));
        pod.metadata.annotations = Some([(WEIGHT.to_owned(), weight.to_owned())].into());
        pod
    }

    const WEIGHT: &str = crate::model::WEIGHT_ANNOTATION;

    #[test]
    fn a_bad_weight_annotation_is_logged_once_per_pod_and_value() {
        let mut cache = Cache::default();
        cache.apply(Kind::Pod, Event::Apply(weighted_pod("heavy")));
        assert_eq!(cache.ignored_logged, 1);
        let (model, rejected, _) = cache.snapshot();
        assert_eq!(model.pods[&ObjectName::new("demo", "web-0")].weight, None);
        assert!(rejected.is_empty(), "the pod is used, weighing 1");

        // Re-decoded unchanged (any change of the pod, a relist): not again.
        cache.apply(Kind::Pod, Event::Apply(weighted_pod("heavy")));
        cache.apply(Kind::Pod, Event::Init);
        cache.apply(Kind::Pod, Event::InitApply(weighted_pod("heavy")));
        cache.apply(Kind::Pod, Event::InitDone);
        assert_eq!(cache.ignored_logged, 1);

        // Another bad value is news; so is a bad value again after a fix.
        cache.apply(Kind::Pod, Event::Apply(weighted_pod("0")));
        assert_eq!(cache.ignored_logged, 2);
        cache.apply(Kind::Pod, Event::Apply(weighted_pod("3")));
        assert_eq!(cache.ignored_logged, 2);
        cache.apply(Kind::Pod, Event::Apply(weighted_pod("0")));
        assert_eq!(cache.ignored_logged, 3);

        // A pod that is gone is forgotten: a new pod of the same name is reported.
        cache.apply(Kind::Pod, Event::Delete(weighted_pod("0")));
        cache.apply(Kind::Pod, Event::Apply(weighted_pod("0")));
        assert_eq!(cache.ignored_logged, 4);

        // An invalid version keeps the last valid one, and its known problem, in force.
        let mut broken = weighted_pod("0");
        broken.data = serde_json::json!({"status": {"podIP": "not-an-ip"}});
        cache.apply(Kind::Pod, Event::Apply(broken));
        cache.apply(Kind::Pod, Event::Apply(weighted_pod("0")));
        assert_eq!(cache.ignored_logged, 4);
    }

    #[test]
    fn only_a_404_means_the_kind_is_not_served() {
        let status = |code| kube::core::Status::failure("no", "NotFound").with_code(code);
        let api = |code| kube::Error::Api(status(code).boxed());
        assert!(not_served(&watcher::Error::InitialListFailed(api(404))));
        assert!(not_served(&watcher::Error::WatchStartFailed(api(404))));
        assert!(not_served(&watcher::Error::WatchError(status(404).boxed())));
        // Forbidden or an API server in trouble: retried with backoff, routes kept.
        assert!(!not_served(&watcher::Error::WatchStartFailed(api(403))));
        assert!(!not_served(&watcher::Error::WatchFailed(api(503))));
        assert!(!not_served(&watcher::Error::NoResourceVersion));
        // What a watch of an unserved kind on a real API server yields: its plain-text
        // 404 body, which kube reports as a parse error.
        let plain_404 =
            serde_json::from_str::<serde_json::Value>("404 page not found").unwrap_err();
        assert!(not_served(&watcher::Error::WatchFailed(
            kube::Error::SerdeError(plain_404)
        )));
    }

    #[test]
    fn grpc_routes_are_decoded_and_observed_next_to_http_routes() {
        let route = |kind: Kind, name: &str| {
            DynamicObject::new(name, &resource(kind))
                .within("shop")
                .data(serde_json::json!({
                    "spec": {
                        "parentRefs": [{"group": "", "kind": "Service", "name": "greeter"}],
                        "rules": [{"matches": [{"method": {"service": "a.Greeter"}}]}],
                    },
                }))
        };
        let mut cache = Cache::default();
        // The same name in both kinds: two routes, two observations.
        cache.apply(
            Kind::GrpcRoute,
            Event::Apply(route(Kind::GrpcRoute, "greeter")),
        );
        let mut http = route(Kind::HttpRoute, "greeter");
        http.data["spec"]["rules"] = serde_json::json!([{}]);
        cache.apply(Kind::HttpRoute, Event::Apply(http));
        let (model, rejected, _) = cache.snapshot();
        assert!(rejected.is_empty(), "{rejected:?}");
        let name = ObjectName::new("shop", "greeter");
        assert_eq!(
            model.grpc_routes[&name].rules[0].matches[0].path,
            crate::model::http_route::PathMatch::Prefix("/a.Greeter".into())
        );
        assert!(model.http_routes.contains_key(&name));
        let kinds: Vec<Kind> = cache.routes().into_keys().map(|k| k.kind).collect();
        assert_eq!(kinds, [Kind::HttpRoute, Kind::GrpcRoute]);

        // An invalid GRPCRoute is observed with its error, for its status.
        let mut bad = route(Kind::GrpcRoute, "greeter");
        bad.data["spec"]["rules"][0]["matches"][0]["method"] = serde_json::json!({"type": "Exact"});
        cache.apply(Kind::GrpcRoute, Event::Apply(bad));
        let routes = cache.routes();
        let observed = &routes[&ObjectKey {
            kind: Kind::GrpcRoute,
            name,
        }];
        assert_eq!(
            observed.error.as_ref().map(|e| e.path.as_str()),
            Some("spec.rules[0].matches[0].method")
        );
        assert!(observed.kept_previous);
    }
}
