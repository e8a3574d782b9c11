//! The control plane end to end: a real tonic client over loopback against
//! `ControlPlane::start` on a copy of the example mesh, and its admin endpoints.
// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bulwark_control_plane::{ControlPlane, Settings, Source};
use bulwark_proto::v1::agent_message::Kind;
use bulwark_proto::v1::discovery_client::DiscoveryClient;
use bulwark_proto::v1::rate_limit_key::Kind as KeyKind;
use bulwark_proto::v1::{Ack, AgentMessage, Identity, Nack, Snapshot};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const DEADLINE: Duration = Duration::from_secs(10);

#[path = "support/fixture.rs"]
mod fixture;

use fixture::{Fixture, http_get};

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    fixture::eventually(what, DEADLINE, check).await;
}

/// Connects a test agent to the fixture's control plane.
async fn connect_agent(fx: &Fixture, pod: &str, labels: &[(&str, &str)]) -> Agent {
    Agent::connect(fx.cp.grpc_addr(), pod, labels).await
}

/// A test agent: a discovery stream and the sending half of its messages.
struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    snapshots: Streaming<Snapshot>,
    /// The whole view, with every delta received so far applied.
    view: Snapshot,
}

fn hello(pod: &str, labels: &[(&str, &str)]) -> AgentMessage {
    hello_at(pod, labels, bulwark_proto::PROTOCOL_VERSION)
}

/// A hello from an agent that speaks `protocol_version`.
fn hello_at(pod: &str, labels: &[(&str, &str)], protocol_version: u32) -> AgentMessage {
    AgentMessage {
        kind: Some(Kind::Hello(Identity {
            namespace: "demo".into(),
            pod_name: pod.into(),
            service_account: "default".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            agent_version: "test".into(),
            protocol_version,
        })),
    }
}

async fn open(addr: SocketAddr, first: AgentMessage) -> Result<Agent, tonic::Status> {
    let mut client = DiscoveryClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let snapshots = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Agent {
        tx,
        snapshots,
        view: Snapshot::default(),
    })
}

impl Agent {
    async fn connect(addr: SocketAddr, pod: &str, labels: &[(&str, &str)]) -> Agent {
        open(addr, hello(pod, labels)).await.unwrap()
    }

    /// The next message as it came: the whole view or a delta.
    async fn next_message(&mut self) -> Snapshot {
        tokio::time::timeout(DEADLINE, self.snapshots.message())
            .await
            .expect("no snapshot within the deadline")
            .unwrap()
            .expect("stream ended")
    }

    /// The whole view after the next message (a delta applied to what came before).
    async fn next(&mut self) -> Snapshot {
        let message = self.next_message().await;
        bulwark_proto::delta::apply(&mut self.view, message).unwrap();
        self.view.clone()
    }

    async fn ack(&self, version: u64) {
        let kind = Kind::Ack(Ack { version });
        self.tx
            .send(AgentMessage { kind: Some(kind) })
            .await
            .unwrap();
    }

    async fn nack(&self, version: u64, error: &str) {
        let kind = Kind::Nack(Nack {
            version,
            error: error.into(),
        });
        self.tx
            .send(AgentMessage { kind: Some(kind) })
            .await
            .unwrap();
    }
}

fn service<'a>(snapshot: &'a Snapshot, name: &str) -> &'a bulwark_proto::v1::Service {
    snapshot
        .services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name} in the snapshot"))
}

fn attempts(snapshot: &Snapshot, name: &str) -> Option<u32> {
    let port = &service(snapshot, name).ports[0];
    Some(port.resilience.as_ref()?.retry.as_ref()?.attempts)
}

/// The control plane's `/errors`, once it lists a rejection.
async fn rejections(fx: &Fixture) -> serde_json::Value {
    eventually("a rejection in /errors", || async {
        fx.admin_json("/errors")
            .await
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;
    fx.admin_json("/errors").await
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn an_agent_gets_the_mesh_its_limits_and_the_exact_policies() {
    let fx = Fixture::start().await;
    let mut agent = connect_agent(&fx, "frontend-0", &[("app", "frontend")]).await;
    let snapshot = agent.next().await;

    let mut names: Vec<_> = snapshot.services.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["catalog", "frontend", "payments", "reviews"]);
    let reviews = service(&snapshot, "reviews");
    assert_eq!(reviews.namespace, "demo");
    let port = &reviews.ports[0];
    assert_eq!((port.name.as_str(), port.port), ("http", 80));
    let endpoints: Vec<_> = port.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(
        endpoints,
        ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"],
        "127.0.0.24 is not ready"
    );

    let policy = port.resilience.as_ref().unwrap();
    assert_eq!(policy.source, "demo/reviews");
    let timeouts = policy.timeouts.unwrap();
    assert_eq!(timeouts.request.unwrap().seconds, 2);
    assert_eq!(timeouts.connect.unwrap().nanos, 250_000_000);
    let retry = policy.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 3);
    assert_eq!(
        retry.retry_on,
        ["connect-failure", "reset", "gateway-error"]
    );
    assert_eq!(retry.grpc_codes, [14]);
    assert_eq!(retry.max_body_bytes, 65_536);
    let breaker = policy.circuit_breaker.unwrap();
    assert_eq!(breaker.failure_ratio.unwrap().min_requests, 20);
    assert_eq!(breaker.max_open_duration.unwrap().seconds, 30);

    // Defaults filled in where the example leaves fields out.
    let payments = service(&snapshot, "payments").ports[0]
        .resilience
        .as_ref()
        .unwrap();
    let retry = payments.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 1);
    assert_eq!(retry.backoff.unwrap().base.unwrap().nanos, 25_000_000);
    assert_eq!(retry.budget.unwrap().ratio, 0.2);
    assert_eq!(payments.circuit_breaker.unwrap().half_open_probes, 1);
    assert_eq!(payments.bulkhead.unwrap().max_connections, 0);
    assert!(payments.timeouts.unwrap().connect.is_some());
    let catalog = service(&snapshot, "catalog").ports[0]
        .resilience
        .as_ref()
        .unwrap();
    assert!(
        catalog.timeouts.unwrap().connect.is_none(),
        "absent field stays unset"
    );
    assert!(catalog.circuit_breaker.is_none());
    assert_eq!(
        catalog.bulkhead.unwrap().queue_timeout.unwrap().nanos,
        250_000_000
    );

    let limits = snapshot.inbound.unwrap().rate_limits;
    assert_eq!(limits.len(), 2);
    let per_tenant = limits.iter().find(|l| l.name == "per-tenant").unwrap();
    assert_eq!(per_tenant.source, "demo/frontend");
    assert_eq!(per_tenant.ports, [8080]);
    assert_eq!((per_tenant.requests, per_tenant.burst), (20, 10));
    assert_eq!(
        per_tenant.key.as_ref().unwrap().kind,
        Some(KeyKind::Header("x-tenant-id".into()))
    );

    // Other pods enforce no limits.
    let mut catalog_agent = connect_agent(&fx, "catalog-0", &[("app", "catalog")]).await;
    let other = catalog_agent.next().await;
    assert!(other.inbound.unwrap().rate_limits.is_empty());
    assert_eq!(
        other.version, snapshot.version,
        "same content, same revision"
    );
    fx.cp.shutdown().await;
}

#[tokio::test]
async fn acks_and_nacks_show_up_in_agents_and_metrics() {
    let fx = Fixture::start().await;
    let mut agent = connect_agent(&fx, "frontend-0", &[("app", "frontend")]).await;
    let snapshot = agent.next().await;
    agent.ack(snapshot.version).await;
    eventually("the ACK in /agents", || async {
        let agents = fx.admin_json("/agents").await;
        agents[0]["last_ack"]["version"] == snapshot.version
    })
    .await;
    let agents = fx.admin_json("/agents").await;
    assert_eq!(agents.as_array().unwrap().len(), 1);
    let entry = &agents[0];
    assert_eq!(entry["identity"]["pod_name"], "frontend-0");
    assert_eq!(entry["identity"]["labels"]["app"], "frontend");
    assert_eq!(entry["sent_version"], snapshot.version);
    assert!(entry["connected_since"].is_string());
    assert!(entry["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(entry["last_nack"].is_null());

    agent
        .nack(snapshot.version, "unknown retryOn condition")
        .await;
    eventually("the NACK in /agents", || async {
        let agents = fx.admin_json("/agents").await;
        agents[0]["last_nack"]["error"] == "unknown retryOn condition"
    })
    .await;
    let agents = fx.admin_json("/agents").await;
    assert_eq!(agents[0]["last_nack"]["version"], snapshot.version);

    let (status, metrics) = fx.admin("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&metrics, "bulwark_cp_agents_connected"), Some(1.0));
    assert_eq!(metric(&metrics, "bulwark_cp_acks_total"), Some(1.0));
    assert_eq!(metric(&metrics, "bulwark_cp_nacks_total"), Some(1.0));
    assert_eq!(
        metric(&metrics, "bulwark_cp_snapshots_sent_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "bulwark_cp_objects{kind=\"Service\"}"),
        Some(4.0)
    );
    assert_eq!(
        metric(&metrics, "bulwark_cp_revision"),
        Some(snapshot.version as f64)
    );
    assert_eq!(fx.admin("/ready").await.0, 200);
    assert_eq!(fx.admin("/nothing-here").await.0, 404);

    drop(agent);
    eventually("the agent to leave /agents", || async {
        fx.admin_json("/agents")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    let (_, metrics) = fx.admin("/metrics").await;
    assert_eq!(metric(&metrics, "bulwark_cp_agents_connected"), Some(0.0));
    fx.cp.shutdown().await;
}

#[tokio::test]
async fn edits_reach_agents_and_invalid_edits_keep_the_last_good_policy() {
    let fx = Fixture::start().await;
    let mut agent = connect_agent(&fx, "frontend-0", &[("app", "frontend")]).await;
    let first = agent.next().await;
    assert_eq!(attempts(&first, "reviews"), Some(3));

    // A valid edit: a new snapshot, one revision up.
    let resilience = fx.read("resilience.yaml");
    fx.write(
        "resilience.yaml",
        &resilience.replace("attempts: 3 ", "attempts: 4 "),
    );
    let second = agent.next().await;
    assert_eq!(attempts(&second, "reviews"), Some(4));
    assert_eq!(second.version, first.version + 1);

    // An invalid edit: rejected, reported with file and path, the old policy stays.
    fx.write(
        "resilience.yaml",
        &resilience.replace("attempts: 3 ", "attempts: 0 "),
    );
    let errors = rejections(&fx).await;
    let rejected = &errors[0];
    assert!(
        rejected["file"]
            .as_str()
            .unwrap()
            .ends_with("resilience.yaml")
    );
    assert_eq!(rejected["document"], 0);
    assert_eq!(rejected["path"], "spec.retry.attempts");
    assert_eq!(rejected["object"], "ResiliencePolicy demo/reviews");
    assert_eq!(rejected["kept_previous"], true);
    let (_, metrics) = fx.admin("/metrics").await;
    assert_eq!(metric(&metrics, "bulwark_cp_rejected_objects"), Some(1.0));

    // The next change the agent hears of is the next valid one, exactly one revision
    // later: the invalid edit changed nothing anywhere.
    let ratelimit = fx.read("ratelimit.yaml");
    fx.write(
        "ratelimit.yaml",
        &ratelimit.replace("requests: 200", "requests: 300"),
    );
    let third = agent.next().await;
    assert_eq!(third.version, second.version + 1);
    assert_eq!(
        attempts(&third, "reviews"),
        Some(4),
        "last good version in force"
    );
    let total = third
        .inbound
        .as_ref()
        .unwrap()
        .rate_limits
        .iter()
        .find(|l| l.name == "total")
        .cloned();
    assert_eq!(total.unwrap().requests, 300);

    // Fixing the document clears the error.
    fx.write("resilience.yaml", &resilience);
    let fourth = agent.next().await;
    assert_eq!(attempts(&fourth, "reviews"), Some(3));
    assert!(
        fx.admin_json("/errors")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    fx.cp.shutdown().await;
}

#[tokio::test]
async fn deleting_a_file_removes_its_objects() {
    let fx = Fixture::start().await;
    let mut agent = connect_agent(&fx, "frontend-0", &[("app", "frontend")]).await;
    let first = agent.next().await;
    assert_eq!(first.inbound.unwrap().rate_limits.len(), 2);

    std::fs::remove_file(fx.path("ratelimit.yaml")).unwrap();
    let second = agent.next().await;
    assert!(second.version > first.version);
    assert!(second.inbound.unwrap().rate_limits.is_empty());

    std::fs::remove_file(fx.path("resilience.yaml")).unwrap();
    let third = agent.next().await;
    assert!(
        third
            .services
            .iter()
            .all(|s| s.ports.iter().all(|p| p.resilience.is_none()))
    );
    fx.cp.shutdown().await;
}

#[tokio::test]
async fn a_change_only_reaches_the_agents_it_affects() {
    let fx = Fixture::start().await;
    let mut frontend = connect_agent(&fx, "frontend-0", &[("app", "frontend")]).await;
    let mut catalog = connect_agent(&fx, "catalog-0", &[("app", "catalog")]).await;
    let start = frontend.next().await.version;
    assert_eq!(catalog.next().await.version, start);

    // A rate-limit edit for frontend's pods: frontend hears of it...
    let ratelimit = fx.read("ratelimit.yaml");
    fx.write(
        "ratelimit.yaml",
        &ratelimit.replace("burst: 100", "burst: 150"),
    );
    assert_eq!(frontend.next().await.version, start + 1);

    // ...catalog does not: the next thing it receives is the later, global change.
    let resilience = fx.read("resilience.yaml");
    fx.write(
        "resilience.yaml",
        &resilience.replace("attempts: 3 ", "attempts: 5 "),
    );
    let next = catalog.next().await;
    assert_eq!(next.version, start + 2);
    assert_eq!(attempts(&next, "reviews"), Some(5));
    assert_eq!(frontend.next().await.version, start + 2);
    fx.cp.shutdown().await;
}

#[tokio::test]
async fn the_first_message_must_be_hello() {
    let fx = Fixture::start().await;
    let ack = AgentMessage {
        kind: Some(Kind::Ack(Ack { version: 1 })),
    };
    let status = match open(fx.cp.grpc_addr(), ack).await {
        Ok(mut agent) => agent.snapshots.message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("first message must be hello"),
        "{status:?}"
    );

    let mut nameless = hello("x", &[]);
    if let Some(Kind::Hello(identity)) = &mut nameless.kind {
        identity.namespace.clear();
    }
    let status = match open(fx.cp.grpc_addr(), nameless).await {
        Ok(mut agent) => agent.snapshots.message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("hello.namespace is empty"),
        "{status:?}"
    );

    // hello is only the first message.
    let mut agent = connect_agent(&fx, "frontend-0", &[("app", "frontend")]).await;
    agent.next().await;
    agent.tx.send(hello("frontend-0", &[])).await.unwrap();
    let status = tokio::time::timeout(DEADLINE, agent.snapshots.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    eventually("rejected agents to leave /agents", || async {
        fx.admin_json("/agents")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    fx.cp.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_agent_streams_with_unavailable() {
    let fx = Fixture::start().await;
    let mut agent = connect_agent(&fx, "frontend-0", &[("app", "frontend")]).await;
    agent.next().await;
    let Fixture { dir: _dir, cp } = fx;
    let stopping = tokio::spawn(cp.shutdown());
    let status = tokio::time::timeout(DEADLINE, agent.snapshots.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    drop(agent);
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn start_fails_on_a_missing_folder_but_not_on_invalid_documents() {
    let dir = tempfile::tempdir().unwrap();
    let settings = |path: PathBuf| Settings {
        source: Source::Dir(vec![path]),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        debounce: Duration::from_millis(50),
        identity: None,
    };
    let err = ControlPlane::start(settings(dir.path().join("missing")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot read the source folder"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Service\n",
    )
    .unwrap();
    let cp = ControlPlane::start(settings(dir.path().to_owned()))
        .await
        .unwrap();
    let (status, body) = http_get(cp.admin_addr(), "/errors").await;
    assert_eq!(status, 200);
    let errors: Vec<HashMap<String, serde_json::Value>> = serde_json::from_str(&body).unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["path"], "metadata.name");
    cp.shutdown().await;
}

/// Waits for a snapshot that holds service `name`.
async fn until_service(agent: &mut Agent, name: &str) -> Snapshot {
    loop {
        let snapshot = agent.next().await;
        agent.ack(snapshot.version).await;
        if snapshot.services.iter().any(|s| s.name == name) {
            return snapshot;
        }
    }
}

#[tokio::test]
async fn an_agent_of_protocol_1_gets_sharded_ports_without_endpoints() {
    let fx = Fixture::start().await;
    let sharded = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sharded");
    // The pods first: any snapshot with the Service has its endpoints.
    for (file, name) in [
        ("local/pods.yaml", "pods.yaml"),
        ("orders.yaml", "orders.yaml"),
    ] {
        fx.write(name, &std::fs::read_to_string(sharded.join(file)).unwrap());
    }
    // An agent from before shard topologies, scripted: it says protocol 1.
    let mut old = open(fx.cp.grpc_addr(), hello_at("old-0", &[("app", "old")], 1))
        .await
        .unwrap();
    let mut current = connect_agent(&fx, "new-0", &[("app", "new")]).await;

    let snapshot = until_service(&mut old, "orders").await;
    let port = &service(&snapshot, "orders").ports[0];
    assert!(port.shard_topology.is_none(), "it could not enforce it");
    assert!(
        port.endpoints.is_empty(),
        "no endpoints, so no write reaches a replica: {:?}",
        port.endpoints
    );
    assert_eq!(
        service(&snapshot, "reviews").ports[0].endpoints.len(),
        3,
        "unsharded services are untouched"
    );
    let snapshot = until_service(&mut current, "orders").await;
    let port = &service(&snapshot, "orders").ports[0];
    assert!(port.shard_topology.is_some());
    assert_eq!(port.endpoints.len(), 6);

    // /agents says what was held back from whom, and why.
    let agents = fx.admin_json("/agents").await;
    let entry = |pod: &str| {
        agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["identity"]["pod_name"] == pod)
            .unwrap()
            .clone()
    };
    let old_entry = entry("old-0");
    assert_eq!(old_entry["identity"]["protocol_version"], 1);
    assert_eq!(
        old_entry["held_back"],
        serde_json::json!([{"port": "orders.shop:80", "feature": "shardTopology", "needs_protocol": 2}])
    );
    assert_eq!(entry("new-0")["held_back"], serde_json::json!([]));
    let (_, metrics) = fx.admin("/metrics").await;
    assert!(metric(&metrics, "bulwark_cp_held_back_snapshots_total").unwrap() >= 1.0);

    // Without the topology, the old agent gets the endpoints again.
    std::fs::remove_file(fx.path("orders.yaml")).unwrap();
    let snapshot = old.next().await;
    assert!(
        snapshot.services.iter().all(|s| s.name != "orders"),
        "the Service was in orders.yaml too"
    );
    eventually("nothing held back any more", || async {
        let agents = fx.admin_json("/agents").await;
        agents
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["held_back"] == serde_json::json!([]))
    })
    .await;
    fx.cp.shutdown().await;
}

/// The inbound mutual-TLS mode an agent was sent, as `(source, mode)`.
fn mtls(snapshot: &Snapshot) -> Option<(String, i32)> {
    let p = snapshot.inbound.as_ref()?.peer_authentication.as_ref()?;
    Some((p.source.clone(), p.mode))
}

#[tokio::test]
async fn a_peer_authentication_from_a_folder_reaches_its_pods_and_an_invalid_edit_keeps_it() {
    use bulwark_proto::v1::MtlsMode;
    let fx = Fixture::start().await;
    let mut current = connect_agent(&fx, "catalog-0", &[("app", "catalog")]).await;
    let first = current.next().await;
    assert_eq!(mtls(&first), None, "no policy: none sent, Permissive");
    let mut old = open(
        fx.cp.grpc_addr(),
        hello_at("catalog-1", &[("app", "catalog")], 3),
    )
    .await
    .unwrap();
    old.next().await;

    let policy = "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
                  metadata: {name: mesh, namespace: demo}\nspec:\n  mode: Strict\n";
    fx.write("mtls.yaml", policy);
    let strict = Some(("demo/mesh".to_owned(), i32::from(MtlsMode::Strict)));
    assert_eq!(mtls(&current.next().await), strict);

    // An agent of protocol 3 cannot refuse plaintext: /agents says so.
    eventually(
        "the Strict mode held back from catalog-1 in /agents",
        || async {
            fx.admin_json("/agents")
                .await
                .as_array()
                .is_some_and(|agents| {
                    agents.iter().any(|a| {
                        a["identity"]["pod_name"] == "catalog-1"
                            && a["held_back"]
                                == serde_json::json!([{"port": "inbound (demo/mesh)",
                            "feature": "peerAuthentication.mode", "needs_protocol": 4}])
                    })
                })
        },
    )
    .await;
    assert_eq!(mtls(&old.next().await), None);

    // An invalid edit is rejected with its path; the agent keeps Strict.
    fx.write(
        "mtls.yaml",
        &format!("{policy}  portLevelMtls: [{{port: 8080, mode: Strict}}, {{port: 8080, mode: Permissive}}]\n"),
    );
    let errors = rejections(&fx).await;
    assert_eq!(errors[0]["object"], "PeerAuthentication demo/mesh");
    assert_eq!(errors[0]["path"], "spec.portLevelMtls[1].port");
    assert_eq!(errors[0]["kept_previous"], true);
    // The next change this agent hears of is a valid one, with Strict still in force.
    let resilience = fx.read("resilience.yaml");
    fx.write(
        "resilience.yaml",
        &resilience.replace("attempts: 3 ", "attempts: 4 "),
    );
    let next = current.next().await;
    assert_eq!(attempts(&next, "reviews"), Some(4));
    assert_eq!(mtls(&next), strict, "the last good version stays");

    // Deleting the policy sends none again: Permissive.
    std::fs::remove_file(fx.path("mtls.yaml")).unwrap();
    assert_eq!(mtls(&current.next().await), None);
    fx.cp.shutdown().await;
}

/// A Service with one port and no endpoints, as a file of its own.
fn extra_service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{ports: [{{port: 80}}]}}\n"
    )
}

#[tokio::test]
async fn agents_of_protocol_5_and_6_on_one_control_plane_hold_the_same_mesh() {
    let fx = Fixture::start().await;
    let mut old = open(
        fx.cp.grpc_addr(),
        hello_at("catalog-old", &[("app", "catalog")], 5),
    )
    .await
    .unwrap();
    let mut new = connect_agent(&fx, "catalog-new", &[("app", "catalog")]).await;
    let first = new.next().await;
    assert_eq!(old.next().await, first, "both start from the whole view");

    // A policy edit: the old agent gets the whole view, the new one the one service.
    let resilience = fx.read("resilience.yaml");
    fx.write(
        "resilience.yaml",
        &resilience.replace("attempts: 3 ", "attempts: 4 "),
    );
    let whole = old.next_message().await;
    assert_eq!(whole.base_version, 0);
    assert_eq!(whole.services.len(), 4);
    let delta = new.next_message().await;
    assert_eq!(delta.version, whole.version);
    assert_eq!(delta.base_version, first.version);
    let changed: Vec<_> = delta.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(changed, ["reviews"], "only what changed");
    assert_eq!(delta.services[0].version, delta.version);
    assert!(delta.removed_services.is_empty());
    assert!(delta.inbound.is_none(), "the inbound part did not change");
    bulwark_proto::delta::apply(&mut new.view, delta).unwrap();
    assert_eq!(new.view, whole, "the delta ends where the whole view is");
    old.view = whole;

    // A service added, then removed.
    fx.write("extra.yaml", &extra_service("extra"));
    let added = new.next_message().await;
    assert_eq!(
        added
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["extra"]
    );
    bulwark_proto::delta::apply(&mut new.view, added).unwrap();
    assert_eq!(new.view, old.next().await);
    std::fs::remove_file(fx.path("extra.yaml")).unwrap();
    let removed = new.next_message().await;
    assert!(removed.services.is_empty());
    let gone: Vec<_> = removed
        .removed_services
        .iter()
        .map(|r| (r.namespace.as_str(), r.name.as_str(), r.version))
        .collect();
    assert_eq!(gone, [("demo", "extra", removed.version)]);
    bulwark_proto::delta::apply(&mut new.view, removed).unwrap();
    assert_eq!(new.view, old.next().await);

    let (_, metrics) = fx.admin("/metrics").await;
    assert_eq!(metric(&metrics, "bulwark_cp_deltas_sent_total"), Some(3.0));
    assert_eq!(
        metric(&metrics, "bulwark_cp_snapshots_sent_total"),
        Some(8.0)
    );
    fx.cp.shutdown().await;
}

#[tokio::test]
async fn a_nacked_delta_is_answered_with_the_whole_view() {
    let fx = Fixture::start().await;
    let mut agent = connect_agent(&fx, "catalog-0", &[("app", "catalog")]).await;
    let first = agent.next().await;
    agent.ack(first.version).await;
    let resilience = fx.read("resilience.yaml");
    fx.write(
        "resilience.yaml",
        &resilience.replace("attempts: 3 ", "attempts: 4 "),
    );
    let delta = agent.next_message().await;
    assert_eq!(delta.base_version, first.version);
    // The agent cannot apply it: it keeps `first`, and gets the whole view at once,
    // with no change to the mesh.
    agent.nack(delta.version, "cannot apply").await;
    let whole = agent.next_message().await;
    assert_eq!(whole.base_version, 0, "the whole view");
    assert_eq!(whole.version, delta.version + 1, "versions never repeat");
    assert_eq!(attempts(&whole, "reviews"), Some(4));
    agent.ack(whole.version).await;
    agent.view = whole.clone();

    // Back to deltas for the next change.
    fx.write(
        "resilience.yaml",
        &resilience.replace("attempts: 3 ", "attempts: 5 "),
    );
    let next = agent.next_message().await;
    assert_eq!(next.base_version, whole.version);
    fx.cp.shutdown().await;
}

#[tokio::test]
async fn an_agent_that_reconnects_mid_delta_gets_the_whole_view() {
    let fx = Fixture::start().await;
    let mut agent = connect_agent(&fx, "catalog-0", &[("app", "catalog")]).await;
    let first = agent.next().await;
    agent.ack(first.version).await;
    let resilience = fx.read("resilience.yaml");
    fx.write(
        "resilience.yaml",
        &resilience.replace("attempts: 3 ", "attempts: 4 "),
    );
    let delta = agent.next_message().await;
    assert_eq!(delta.base_version, first.version);
    // Gone before applying or answering it; meanwhile the mesh moves on.
    drop(agent);
    fx.write("extra.yaml", &extra_service("extra"));
    eventually(
        "the agent gone and the new service in the index",
        || async {
            let (_, metrics) = fx.admin("/metrics").await;
            let revision = metric(&metrics, "bulwark_cp_revision").unwrap_or(0.0);
            revision > delta.version as f64
                && fx
                    .admin_json("/agents")
                    .await
                    .as_array()
                    .is_some_and(Vec::is_empty)
        },
    )
    .await;
    let mut again = connect_agent(&fx, "catalog-0", &[("app", "catalog")]).await;
    let whole = again.next_message().await;
    assert_eq!(whole.base_version, 0, "a new stream starts whole");
    assert!(whole.version > delta.version);
    assert_eq!(attempts(&whole, "reviews"), Some(4));
    assert!(whole.services.iter().any(|s| s.name == "extra"));
    fx.cp.shutdown().await;
}
