//! An in-test Kubernetes API server: real HTTP on a loopback port, speaking the API's
//! protocol for the resources the control plane uses. There is no API server on these
//! machines, so this is the one part the Kubernetes tests fake.
//!
//! It does what a cluster does for these resources: lists with a `resourceVersion`,
//! chunked `?watch=true` streams of `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events that
//! resume from a version, `410 Gone` (as an `ERROR` event, like the real one) for a
//! version older than its history, get/create/update with optimistic concurrency
//! (`409 Conflict`), merge `PATCH` on `/status`, and `metadata.generation` that moves
//! only when the spec does. Tests drive it like a cluster (`apply`, `delete`), take it
//! away and bring it back (`stop`, `restart`), compact its history (`compact`), and read
//! every request it served (`requests`), so that a test can check them against RBAC.
//!
//! It also answers TokenReviews (issue 15) as a real API server does for ServiceAccount
//! tokens: [`ApiServer::create_token`] stands for `kubectl create token`, a token bound
//! to a pod is valid while that pod exists, and a token proves nothing for an audience
//! it was not made for.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

/// How often an idle watch gets a `BOOKMARK` (when it asked for bookmarks).
const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);

/// A resource the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group, `""` for core.
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Plural (the URL segment).
    pub plural: &'static str,
    /// Kind.
    pub kind: &'static str,
}

/// Every resource the control plane touches.
pub const RESOURCES: [Resource; 13] = [
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
    },
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
    },
    Resource {
        group: "bulwark.io",
        version: "v1alpha1",
        plural: "resiliencepolicies",
        kind: "ResiliencePolicy",
    },
    Resource {
        group: "bulwark.io",
        version: "v1alpha1",
        plural: "ratelimitpolicies",
        kind: "RateLimitPolicy",
    },
    Resource {
        group: "bulwark.io",
        version: "v1alpha1",
        plural: "shardtopologies",
        kind: "ShardTopology",
    },
    Resource {
        group: "bulwark.io",
        version: "v1alpha1",
        plural: "authorizationpolicies",
        kind: "AuthorizationPolicy",
    },
    Resource {
        group: "bulwark.io",
        version: "v1alpha1",
        plural: "peerauthentications",
        kind: "PeerAuthentication",
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
    },
    // issue 15: the trust-anchor ConfigMap in every namespace.
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
    },
    Resource {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
    },
    // issue 6: served only after `serve_gateway_api` (the CRDs are optional in a cluster).
    Resource {
        group: GATEWAY_GROUP,
        version: "v1",
        plural: "httproutes",
        kind: "HTTPRoute",
    },
    Resource {
        group: GATEWAY_GROUP,
        version: "v1",
        plural: "grpcroutes",
        kind: "GRPCRoute",
    },
];

/// The Gateway API's group, whose CRDs a cluster may or may not have.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

impl Resource {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether its objects live outside namespaces (stored under namespace `""`).
    pub fn cluster_scoped(&self) -> bool {
        self.plural == "namespaces"
    }

    fn by_plural(group: &str, plural: &str) -> Option<Resource> {
        RESOURCES
            .into_iter()
            .find(|r| r.group == group && r.plural == plural)
    }

    fn by_kind(api_version: &str, kind: &str) -> Option<Resource> {
        RESOURCES
            .into_iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
    }
}

/// One request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The RBAC verb: get, list, watch, create, update, patch, delete.
    pub verb: String,
    /// The API group.
    pub group: String,
    /// The resource as RBAC names it: `leases`, `resiliencepolicies/status`.
    pub resource: String,
    /// The namespace, if the path named one.
    pub namespace: Option<String>,
    /// The object's name, for requests on one object.
    pub name: Option<String>,
    /// The bearer token the client sent (tells two clients apart).
    pub token: Option<String>,
    /// The request's content type (which PATCH flavour).
    pub content_type: Option<String>,
    /// The body, for writes.
    pub body: Option<Value>,
}

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    plural: &'static str,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// Objects by (plural, namespace, name).
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<WatchEvent>,
    /// Watches from before this version get 410 Gone.
    oldest: u64,
    requests: Vec<Recorded>,
    next_uid: u64,
    /// What `/version` reports as (major, minor); default 1.31.
    version: Option<(String, String)>,
    /// Whether the Gateway API CRDs are "installed" (discovery and HTTPRoute requests
    /// answer; otherwise 404, like a cluster without them; asked for anyway, they are
    /// recorded).
    gateway_api: bool,
    /// How often `/apis/gateway.networking.k8s.io/v1` was asked for.
    discovery_requests: usize,
    /// Bearer tokens refused with 401, as a real server refuses a deleted
    /// ServiceAccount's token.
    revoked: std::collections::BTreeSet<String>,
    /// ServiceAccount tokens made by `create_token`, for TokenReviews.
    tokens: BTreeMap<String, IssuedToken>,
}

/// A ServiceAccount token the server made.
#[derive(Clone, Debug)]
struct IssuedToken {
    namespace: String,
    service_account: String,
    /// The pod it is bound to: name and uid.
    pod: Option<(String, String)>,
    audiences: Vec<String>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running server.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    connections: Option<JoinSet<()>>,
    kubeconfig_dir: tempfile::TempDir,
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as `2024-05-01T12:00:00Z` (what Kubernetes writes).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(map) = target {
                for (key, value) in fields {
                    if value.is_null() {
                        map.remove(key);
                    } else {
                        merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(code, &status(code, reason, message))
}

/// What a real API server answers for a group it does not serve: Go's plain-text 404,
/// not a JSON Status (clients must not log it as a malformed error).
fn group_not_served() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(b"404 page not found\n")).boxed())
        .expect("a valid response")
}

/// What a request path names.
#[derive(Debug)]
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => return None,
    };
    Some(Target {
        resource: Resource::by_plural(group, plural)?,
        namespace,
        name,
        subresource,
    })
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record_event(
        &mut self,
        kind: &'static str,
        resource: Resource,
        namespace: &str,
        object: Value,
    ) {
        let rv = self.rv;
        self.history.push(WatchEvent {
            rv,
            plural: resource.plural,
            namespace: namespace.to_owned(),
            kind,
            object,
        });
    }

    /// Creates or replaces an object; `expected_rv` enforces optimistic concurrency.
    /// Returns the stored object and whether it was created.
    fn store(
        &mut self,
        resource: Resource,
        namespace: &str,
        mut object: Value,
        expected_rv: Option<&str>,
        create_only: bool,
    ) -> Result<(Value, bool), (StatusCode, String, String)> {
        let name = object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or((
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid".into(),
                "metadata.name: Required value".into(),
            ))?
            .to_owned();
        let key = (resource.plural, namespace.to_owned(), name.clone());
        let previous = self.objects.get(&key).cloned();
        if create_only && previous.is_some() {
            return Err((
                StatusCode::CONFLICT,
                "AlreadyExists".into(),
                format!("{} \"{name}\" already exists", resource.plural),
            ));
        }
        if let (Some(expected), Some(prev)) = (expected_rv, &previous)
            && prev["metadata"]["resourceVersion"].as_str() != Some(expected)
        {
            return Err((
                StatusCode::CONFLICT,
                "Conflict".into(),
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    resource.plural
                ),
            ));
        }
        let rv = self.bump();
        let meta = &mut object["metadata"];
        if !resource.cluster_scoped() {
            meta["namespace"] = json!(namespace);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        match &previous {
            Some(prev) => {
                for field in ["uid", "creationTimestamp"] {
                    meta[field] = prev["metadata"][field].clone();
                }
                let generation = prev["metadata"]["generation"].as_i64().unwrap_or(1);
                let spec_changed = prev.get("spec") != object.get("spec");
                object["metadata"]["generation"] = json!(if spec_changed {
                    generation + 1
                } else {
                    generation
                });
                // Status is a subresource: a write to the object keeps it.
                match prev.get("status") {
                    Some(status) => object["status"] = status.clone(),
                    None => {
                        if let Value::Object(map) = &mut object {
                            map.remove("status");
                        }
                    }
                }
            }
            None => {
                self.next_uid += 1;
                let uid = format!("00000000-0000-0000-0000-{:012}", self.next_uid);
                let meta = &mut object["metadata"];
                meta["uid"] = json!(uid);
                if meta["creationTimestamp"].as_str().is_none() {
                    meta["creationTimestamp"] = json!(now_rfc3339());
                }
                meta["generation"] = json!(1);
            }
        }
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        self.objects.insert(key, object.clone());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record_event(kind, resource, namespace, object.clone());
        Ok((object, previous.is_none()))
    }

    fn patch_status(
        &mut self,
        resource: Resource,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Option<Value> {
        let key = (resource.plural, namespace.to_owned(), name.to_owned());
        let mut object = self.objects.get(&key)?.clone();
        let mut status = object.get("status").cloned().unwrap_or(json!({}));
        if let Some(p) = patch.get("status") {
            merge_patch(&mut status, p);
        }
        object["status"] = status;
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key, object.clone());
        self.record_event("MODIFIED", resource, namespace, object.clone());
        Some(object)
    }

    fn remove(&mut self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let key = (resource.plural, namespace.to_owned(), name.to_owned());
        let mut object = self.objects.remove(&key)?;
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record_event("DELETED", resource, namespace, object.clone());
        Some(object)
    }

    fn list(&self, resource: Resource, namespace: Option<&str>) -> Value {
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((plural, ns, _), _)| {
                *plural == resource.plural && namespace.is_none_or(|n| n == ns)
            })
            .map(|(_, o)| o.clone())
            .collect();
        json!({
            "apiVersion": resource.api_version(),
            "kind": format!("{}List", resource.kind),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        })
    }
}

impl ApiServer {
    /// Starts a server on a free loopback port.
    pub async fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let mut server = ApiServer {
            shared: Arc::new(Shared::default()),
            addr,
            connections: None,
            kubeconfig_dir: tempfile::tempdir().expect("a temporary folder"),
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let mut connections = JoinSet::new();
        let shared = Arc::clone(&self.shared);
        let mut tasks = JoinSet::new();
        connections.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = Arc::clone(&shared);
                tasks.spawn(async move {
                    let service = service_fn(move |request| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(shared, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                // Reap finished connections; dropping `tasks` (on stop) aborts the rest.
                while tasks.try_join_next().is_some() {}
            }
        });
        self.connections = Some(connections);
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig for this server whose user presents `token`; returns its path.
    pub fn kubeconfig(&self, token: &str) -> PathBuf {
        let path = self
            .kubeconfig_dir
            .path()
            .join(format!("{token}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: test, cluster: {{server: 'http://{}'}}}}]\n\
             users: [{{name: {token}, user: {{token: {token}}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: {token}, namespace: default}}}}]\n\
             current-context: test\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    /// The folder holding the kubeconfigs.
    pub fn kubeconfig_dir(&self) -> &Path {
        self.kubeconfig_dir.path()
    }

    /// Creates or updates an object from YAML or JSON (as `kubectl apply` would; the
    /// status is not touched).
    pub fn apply(&self, manifest: &str) -> Value {
        let object: Value = serde_yaml_ng::from_str(manifest).expect("a YAML manifest");
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource = Resource::by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("the test API server does not serve {api_version} {kind}"));
        let namespace = match object["metadata"]["namespace"].as_str() {
            _ if resource.cluster_scoped() => "",
            Some(namespace) => namespace,
            None => "default",
        }
        .to_owned();
        let stored = self
            .shared
            .lock()
            .store(resource, &namespace, object, None, false)
            .expect("apply succeeds")
            .0;
        self.shared.changed.notify_waiters();
        stored
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let resource = RESOURCES
            .into_iter()
            .find(|r| r.kind == kind)
            .expect("a served kind");
        let existed = self
            .shared
            .lock()
            .remove(resource, namespace, name)
            .is_some();
        self.shared.changed.notify_waiters();
        existed
    }

    /// An object as stored.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = RESOURCES.into_iter().find(|r| r.kind == kind)?;
        self.shared
            .lock()
            .objects
            .get(&(resource.plural, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The `Accepted` condition of a policy: (status, reason, message, observedGeneration).
    pub fn accepted(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<(String, String, String, i64)> {
        let object = self.get(kind, namespace, name)?;
        let conditions = object["status"]["conditions"].as_array()?.clone();
        let c = conditions.iter().find(|c| c["type"] == "Accepted")?;
        Some((
            c["status"].as_str()?.to_owned(),
            c["reason"].as_str()?.to_owned(),
            c["message"].as_str()?.to_owned(),
            c["observedGeneration"].as_i64()?,
        ))
    }

    /// Sets what `/version` reports, e.g. ("1", "28") (issue 5: the webhook's sidecar mode).
    pub fn set_version(&self, major: &str, minor: &str) {
        self.shared.lock().version = Some((major.to_owned(), minor.to_owned()));
    }

    /// Installs the Gateway API CRDs: `/apis/gateway.networking.k8s.io/v1` and its
    /// HTTPRoutes and GRPCRoutes are served from now on.
    pub fn serve_gateway_api(&self) {
        self.shared.lock().gateway_api = true;
    }

    /// Refuses `token` with 401 from now on (a deleted or rotated ServiceAccount).
    pub fn revoke_token(&self, token: &str) {
        self.shared.lock().revoked.insert(token.to_owned());
    }

    /// A ServiceAccount token for `audiences` (none: the API server's own), bound to
    /// `pod` if given (which must exist), as `kubectl create token SA --audience A
    /// --bound-object-kind Pod --bound-object-name POD` makes one.
    pub fn create_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<&str>,
        audiences: &[&str],
    ) -> String {
        let mut state = self.shared.lock();
        let pod = pod.map(|name| {
            let uid = state
                .objects
                .get(&("pods", namespace.to_owned(), name.to_owned()))
                .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
                .unwrap_or_else(|| panic!("no pod {namespace}/{name} to bind a token to"));
            (name.to_owned(), uid)
        });
        let audiences = if audiences.is_empty() {
            vec![API_SERVER_AUDIENCE.to_owned()]
        } else {
            audiences.iter().map(|a| (*a).to_owned()).collect()
        };
        let token = format!(
            "eyJhbGciOiJSUzI1NiJ9.test-{}-{namespace}-{service_account}",
            state.tokens.len()
        );
        state.tokens.insert(
            token.clone(),
            IssuedToken {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                pod,
                audiences,
            },
        );
        token
    }

    /// Accepts `token` again.
    pub fn restore_token(&self, token: &str) {
        self.shared.lock().revoked.remove(token);
    }

    /// Uninstalls the Gateway API CRDs: discovery and HTTPRoute requests answer 404 from
    /// now on, and open HTTPRoute watches end (as the API server ends them when a CRD
    /// goes). Stored routes are kept and no DELETED events are sent (a real API server
    /// deletes the objects first), so a test sees the control plane drop them by itself.
    pub fn stop_serving_gateway_api(&self) {
        self.shared.lock().gateway_api = false;
        self.shared.changed.notify_waiters();
    }

    /// How many times API discovery of the Gateway API (`/apis/gateway.networking.k8s.io/v1`)
    /// was asked for, served or not.
    pub fn gateway_api_discoveries(&self) -> usize {
        self.shared.lock().discovery_requests
    }

    /// Every request served so far (including those of the Gateway API while it is not
    /// served, which got a 404).
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The requests to the Gateway API group served (or refused) so far.
    pub fn gateway_requests(&self) -> Vec<Recorded> {
        let mut requests = self.requests();
        requests.retain(|r| r.group == GATEWAY_GROUP);
        requests
    }

    /// Forgets the event history: a watch resuming from any earlier version gets 410.
    pub fn compact(&self) {
        let mut state = self.shared.lock();
        state.oldest = state.rv + 1;
        state.history.clear();
    }

    /// Takes the server away: closes the listener and every connection (watches included).
    pub async fn stop(&mut self) {
        if let Some(mut connections) = self.connections.take() {
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
    }

    /// Brings the server back on the same address, with the same objects.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut last = None;
        for _ in 0..100 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.serve(listener);
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        panic!(
            "the API server cannot listen on {} again: {last:?}",
            self.addr
        );
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(connections) = self.connections.as_mut() {
            connections.abort_all();
        }
    }
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let token = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token.is_some_and(|t| shared.lock().revoked.contains(t)) {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    // issue 15: TokenReviews (a create of a virtual resource: recorded, never stored).
    if parts.uri.path() == TOKEN_REVIEWS_PATH {
        return token_review(&shared, &parts, body).await;
    }
    // issue 5: `/version` (public, not a resource: not recorded).
    if parts.method == Method::GET && parts.uri.path() == "/version" {
        let (major, minor) = shared
            .lock()
            .version
            .clone()
            .unwrap_or_else(|| ("1".to_owned(), "31".to_owned()));
        return respond(
            StatusCode::OK,
            &json!({
                "major": major, "minor": minor,
                "gitVersion": format!("v{major}.{minor}.0"), "gitCommit": "test",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64",
            }),
        );
    }
    // issue 6: API discovery of the Gateway API group (public, not recorded).
    let gateway_api = shared.lock().gateway_api;
    let discovery = format!("/apis/{GATEWAY_GROUP}/v1");
    if parts.method == Method::GET && parts.uri.path().trim_end_matches('/') == discovery {
        shared.lock().discovery_requests += 1;
        if !gateway_api {
            return group_not_served();
        }
        return respond(
            StatusCode::OK,
            &json!({
                "kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": format!("{GATEWAY_GROUP}/v1"),
                "resources": [
                    {"name": "httproutes", "singularName": "httproute", "namespaced": true,
                     "kind": "HTTPRoute", "verbs": ["delete", "deletecollection", "get", "list",
                     "patch", "create", "update", "watch"]},
                    {"name": "httproutes/status", "singularName": "", "namespaced": true,
                     "kind": "HTTPRoute", "verbs": ["get", "patch", "update"]},
                    {"name": "grpcroutes", "singularName": "grpcroute", "namespaced": true,
                     "kind": "GRPCRoute", "verbs": ["delete", "deletecollection", "get", "list",
                     "patch", "create", "update", "watch"]},
                    {"name": "grpcroutes/status", "singularName": "", "namespaced": true,
                     "kind": "GRPCRoute", "verbs": ["get", "patch", "update"]},
                ],
            }),
        );
    }
    let Some(target) = parse_path(parts.uri.path()) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let params = query(&parts.uri);
    let watching = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&parts.method, &target.name) {
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        _ => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported",
            );
        }
    };
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
    };
    let body: Option<Value> = if bytes.is_empty() {
        None
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        }
    };
    let resource_name = match &target.subresource {
        Some(sub) => format!("{}/{sub}", target.resource.plural),
        None => target.resource.plural.to_owned(),
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    shared.lock().requests.push(Recorded {
        verb: verb.to_owned(),
        group: target.resource.group.to_owned(),
        resource: resource_name,
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        token: header("authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned)),
        content_type: header("content-type"),
        body: body.clone(),
    });
    // Recorded all the same, so that a test can tell that nobody asked for it.
    if target.resource.group == GATEWAY_GROUP && !gateway_api {
        return group_not_served();
    }
    let resource = target.resource;
    let namespace = match &target.namespace {
        _ if resource.cluster_scoped() => String::new(),
        Some(namespace) => namespace.clone(),
        None => "default".to_owned(),
    };
    match verb {
        "list" => {
            let list = shared.lock().list(resource, target.namespace.as_deref());
            respond(StatusCode::OK, &list)
        }
        "watch" => watch(shared, resource, target.namespace, &params),
        "get" => {
            let name = target.name.unwrap_or_default();
            let found = shared
                .lock()
                .objects
                .get(&(resource.plural, namespace, name.clone()))
                .cloned();
            match found {
                Some(object) => respond(StatusCode::OK, &object),
                None => error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", resource.plural),
                ),
            }
        }
        "create" | "update" => {
            let Some(object) = body else {
                return error(StatusCode::BAD_REQUEST, "BadRequest", "no body");
            };
            if target.subresource.is_some() {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "use PATCH for status",
                );
            }
            let expected = object["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned);
            let result = shared.lock().store(
                resource,
                &namespace,
                object,
                if verb == "update" {
                    expected.as_deref()
                } else {
                    None
                },
                verb == "create",
            );
            shared.changed.notify_waiters();
            match result {
                Ok((object, created)) => respond(
                    if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    &object,
                ),
                Err((code, reason, message)) => error(code, &reason, &message),
            }
        }
        "patch" => {
            let name = target.name.unwrap_or_default();
            let merge = header("content-type")
                .is_some_and(|c| c.starts_with("application/merge-patch+json"));
            if !merge {
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "the test API server takes merge patches only",
                );
            }
            if target.subresource.is_none() {
                // issue 15: a merge patch of a whole object (the trust-anchor ConfigMaps).
                let patched = {
                    let mut state = shared.lock();
                    let key = (resource.plural, namespace.clone(), name.clone());
                    state.objects.get(&key).cloned().map(|mut object| {
                        merge_patch(&mut object, &body.unwrap_or(Value::Null));
                        state.store(resource, &namespace, object, None, false)
                    })
                };
                shared.changed.notify_waiters();
                return match patched {
                    Some(Ok((object, _))) => respond(StatusCode::OK, &object),
                    Some(Err((code, reason, message))) => error(code, &reason, &message),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{} \"{name}\" not found", resource.plural),
                    ),
                };
            }
            if target.subresource.as_deref() != Some("status") {
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "the test API server patches objects and their /status only",
                );
            }
            let patched = shared.lock().patch_status(
                resource,
                &namespace,
                &name,
                &body.unwrap_or(Value::Null),
            );
            shared.changed.notify_waiters();
            match patched {
                Some(object) => respond(StatusCode::OK, &object),
                None => error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", resource.plural),
                ),
            }
        }
        _ => {
            let name = target.name.unwrap_or_default();
            let removed = shared.lock().remove(resource, &namespace, &name);
            shared.changed.notify_waiters();
            match removed {
                Some(object) => respond(StatusCode::OK, &object),
                None => error(StatusCode::NOT_FOUND, "NotFound", "not found"),
            }
        }
    }
}

/// Where TokenReviews are created.
pub const TOKEN_REVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// The audience of a token made without one, and of a review that names none: the API
/// server's own (its `--service-account-issuer`, which `--api-audiences` defaults to).
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc";

/// Answers a TokenReview as the API server's ServiceAccount authenticator does.
async fn token_review(
    shared: &Shared,
    parts: &http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    if parts.method != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        );
    }
    let review: Value = match body.collect().await.map(|b| b.to_bytes()) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(review) => review,
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        },
        Err(_) => return error(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
    };
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut state = shared.lock();
    state.requests.push(Recorded {
        verb: "create".to_owned(),
        group: "authentication.k8s.io".to_owned(),
        resource: "tokenreviews".to_owned(),
        namespace: None,
        name: None,
        token: header(http::header::AUTHORIZATION)
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned)),
        content_type: header(http::header::CONTENT_TYPE),
        body: Some(review.clone()),
    });
    let spec = &review["spec"];
    let token = spec["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = match spec["audiences"].as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => vec![API_SERVER_AUDIENCE.to_owned()],
    };
    let status = match state.tokens.get(token) {
        // The answers' texts are a 1.24 API server's.
        None => json!({"user": {}, "error": "invalid bearer token"}),
        Some(issued) => {
            let audiences: Vec<&String> = wanted
                .iter()
                .filter(|a| issued.audiences.contains(a))
                .collect();
            let pod_gone = issued.pod.as_ref().is_some_and(|(name, uid)| {
                state
                    .objects
                    .get(&("pods", issued.namespace.clone(), name.clone()))
                    .is_none_or(|pod| pod["metadata"]["uid"].as_str() != Some(uid.as_str()))
            });
            if audiences.is_empty() {
                json!({
                    "user": {},
                    "error": format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                        issued.audiences, wanted
                    ),
                })
            } else if pod_gone {
                json!({
                    "user": {},
                    "error": "[invalid bearer token, service account token has been invalidated]",
                })
            } else {
                let ns = &issued.namespace;
                let mut extra = serde_json::Map::new();
                if let Some((name, uid)) = &issued.pod {
                    extra.insert(
                        "authentication.kubernetes.io/pod-name".into(),
                        json!([name]),
                    );
                    extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
                }
                json!({
                    "authenticated": true,
                    "user": {
                        "username": format!("system:serviceaccount:{ns}:{}", issued.service_account),
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                        "extra": extra,
                    },
                    "audiences": audiences,
                })
            }
        }
    };
    drop(state);
    respond(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        }),
    )
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A chunked stream of watch events from `resourceVersion` on.
fn watch(
    shared: Arc<Shared>,
    resource: Resource,
    namespace: Option<String>,
    params: &BTreeMap<String, String>,
) -> Response<Body> {
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let oldest = shared.lock().oldest;
        if from != 0 && from + 1 < oldest {
            let gone = status(
                StatusCode::GONE,
                "Expired",
                &format!("too old resource version: {from} ({oldest})"),
            );
            let _ = tx.send(event_line("ERROR", &gone)).await;
            return;
        }
        let mut last = if from == 0 { shared.lock().rv } else { from };
        loop {
            // Register for news before reading, so none is missed in between.
            let changed = shared.changed.notified();
            let (events, rv) = {
                let state = shared.lock();
                if resource.group == GATEWAY_GROUP && !state.gateway_api {
                    // The CRD is gone: so is its watch.
                    return;
                }
                let events: Vec<Bytes> = state
                    .history
                    .iter()
                    .filter(|e| {
                        e.rv > last
                            && e.plural == resource.plural
                            && namespace.as_ref().is_none_or(|n| *n == e.namespace)
                    })
                    .map(|e| event_line(e.kind, &e.object))
                    .collect();
                (events, state.rv)
            };
            last = rv;
            for line in events {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(BOOKMARK_INTERVAL) => {
                    if bookmarks {
                        let bookmark = json!({
                            "apiVersion": resource.api_version(),
                            "kind": resource.kind,
                            "metadata": {"resourceVersion": last.to_string()},
                        });
                        if tx.send(event_line("BOOKMARK", &bookmark)).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let body =
        StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .expect("a valid response")
}

/// The namespace the tests' control planes run in (their Lease's).
pub const CONTROL_PLANE_NAMESPACE: &str = "bulwark-system";

/// Whether the control plane's RBAC rules (the chart's ClusterRole, with identity's
/// rules as by default, and its Role in [`CONTROL_PLANE_NAMESPACE`]) allow `r`.
pub fn rbac_allows(r: &Recorded) -> bool {
    use bulwark_control_plane::crds;
    let allowed = if r.namespace.as_deref() == Some(CONTROL_PLANE_NAMESPACE) {
        crds::allows_in_own_namespace(&r.group, &r.resource, &r.verb, r.name.as_deref())
    } else {
        crds::allows(&r.group, &r.resource, &r.verb)
    };
    allowed || crds::identity_allows(&r.group, &r.resource, &r.verb, r.name.as_deref())
}

/// Panics unless the control plane's RBAC rules allow every one of `requests`.
pub fn assert_rbac_allows(requests: &[Recorded]) {
    for r in requests {
        assert!(rbac_allows(r), "{r:?} is not allowed by the chart's RBAC");
    }
}
