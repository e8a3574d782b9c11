//! Incremental discovery end to end: a real agent (protocol 6) and a scripted agent of
//! protocol 5 on one real control plane. After the first snapshot the real agent gets
//! only what changed, and routes by it; the old one keeps getting the whole view.
// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use bulwark_proto::v1::agent_message::Kind;
use bulwark_proto::v1::discovery_client::DiscoveryClient;
use bulwark_proto::v1::{AgentMessage, Identity, Snapshot};
use bulwark_tests::harness::{CONFIG_DEADLINE, Harness, loopback, resilience_policy};
use bulwark_tests::mesh::{Mesh, NAMESPACE};
use bulwark_tests::metrics::Metrics;
use bulwark_tests::upstream::{Knobs, Upstream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// An agent of protocol 5, scripted: it only reads what it is sent.
struct OldAgent {
    _tx: mpsc::Sender<AgentMessage>,
    snapshots: Streaming<Snapshot>,
}

impl OldAgent {
    async fn connect(grpc: std::net::SocketAddr) -> OldAgent {
        let (tx, rx) = mpsc::channel(4);
        let hello = Identity {
            namespace: NAMESPACE.into(),
            pod_name: "old-0".into(),
            service_account: "old".into(),
            labels: [("app".to_owned(), "old".to_owned())].into(),
            agent_version: "0.0.5".into(),
            protocol_version: 5,
        };
        tx.send(AgentMessage {
            kind: Some(Kind::Hello(hello)),
        })
        .await
        .unwrap();
        let snapshots = DiscoveryClient::connect(format!("http://{grpc}"))
            .await
            .unwrap()
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        OldAgent { _tx: tx, snapshots }
    }

    async fn next(&mut self) -> Snapshot {
        tokio::time::timeout(CONFIG_DEADLINE, self.snapshots.message())
            .await
            .expect("a snapshot within the deadline")
            .unwrap()
            .expect("the stream stays open")
    }
}

/// The service names in the agent's `/config`.
fn destinations(config: &serde_json::Value) -> Vec<String> {
    config["config"]["destinations"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|d| d["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_real_agent_routes_by_deltas_while_an_old_agent_gets_the_whole_view() {
    let reviews = Upstream::start(loopback(), "reviews-0", Knobs::healthy())
        .await
        .unwrap();
    let ratings = Upstream::start(loopback(), "ratings-0", Knobs::healthy())
        .await
        .unwrap();
    let details = Upstream::start(loopback(), "details-0", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([
        ("reviews", vec![reviews.addr()]),
        ("ratings", vec![ratings.addr()]),
    ])
    .unwrap();
    let h = Harness::start(mesh).await;
    let cp = h.control_plane.as_ref().unwrap();
    let mut old = OldAgent::connect(cp.grpc_addr()).await;
    let first = old.next().await;
    assert_eq!(first.base_version, 0);
    assert_eq!(first.services.len(), 2);
    let version = h.config_version().await;

    // A service added: the agent routes to it.
    h.mesh.add_service("details", &[details.addr()]).unwrap();
    let version = h.wait_version_above(version).await;
    let rsp = h.client.get("http://details.test/", &[]).await.unwrap();
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.upstream(), Some("details-0"));
    let whole = old.next().await;
    assert_eq!(whole.base_version, 0, "protocol 5: the whole view");
    assert_eq!(whole.services.len(), 3);
    assert_eq!(whole.version, version, "one version for old and new agents");

    // A policy on one service: in force at once, the other services untouched.
    h.mesh
        .write_policy(
            "reviews.yaml",
            &resilience_policy("reviews", "reviews", "  retry:\n    attempts: 4\n"),
        )
        .unwrap();
    let version = h.wait_version_above(version).await;
    let config = h.config().await;
    let retry = config["config"]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "reviews.test:80")
        .map(|d| d["retry"]["attempts"].clone());
    assert_eq!(retry, Some(serde_json::json!(4)));
    assert_eq!(old.next().await.services.len(), 3);

    // A service removed: gone from the agent's config.
    h.mesh.remove_service("ratings").unwrap();
    h.wait_version_above(version).await;
    assert_eq!(
        destinations(&h.config().await),
        ["details.test:80", "reviews.test:80"]
    );
    assert_eq!(old.next().await.services.len(), 2);
    for (host, upstream) in [("reviews.test", "reviews-0"), ("details.test", "details-0")] {
        let rsp = h.client.get(&format!("http://{host}/"), &[]).await.unwrap();
        assert_eq!(rsp.status, 200, "{host}");
        assert_eq!(rsp.upstream(), Some(upstream), "{host}");
    }

    // The real agent got its first view whole and the three changes as deltas; the old
    // agent four whole views.
    let metrics = Metrics::scrape(cp.admin_addr()).await.unwrap();
    assert_eq!(metrics.get("bulwark_cp_snapshots_sent_total", &[]), 8.0);
    assert_eq!(metrics.get("bulwark_cp_deltas_sent_total", &[]), 3.0);
    assert_eq!(metrics.get("bulwark_cp_nacks_total", &[]), 0.0);
    h.shutdown().await;
}

#[tokio::test]
async fn an_agent_that_reconnects_starts_again_from_the_whole_view() {
    let reviews = Upstream::start(loopback(), "reviews-0", Knobs::healthy())
        .await
        .unwrap();
    let ratings = Upstream::start(loopback(), "ratings-0", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("reviews", vec![reviews.addr()])]).unwrap();
    let mut h = Harness::start(mesh).await;
    let version = h.config_version().await;

    // The control plane goes away; the mesh changes meanwhile; a new one starts.
    h.stop_control_plane().await;
    h.mesh.add_service("ratings", &[ratings.addr()]).unwrap();
    h.mesh.remove_service("reviews").unwrap();
    h.restart_control_plane().await;
    h.wait_version_above(version).await;
    assert_eq!(destinations(&h.config().await), ["ratings.test:80"]);
    let rsp = h.client.get("http://ratings.test/", &[]).await.unwrap();
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.upstream(), Some("ratings-0"));
    let cp = h.control_plane.as_ref().unwrap();
    let metrics = Metrics::scrape(cp.admin_addr()).await.unwrap();
    assert_eq!(
        metrics.get("bulwark_cp_deltas_sent_total", &[]),
        0.0,
        "a new stream starts with the whole view"
    );
    h.shutdown().await;
}
