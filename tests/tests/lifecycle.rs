//! The config lifecycle: edits reach a running agent without dropping requests,
//! invalid files change nothing, and the agent fails static while the control
//! plane is away.

use std::time::Duration;

use bulwark_agent::Agent;
use bulwark_control_plane::{ControlPlane, Source};
use bulwark_tests::client::HttpClient;
use bulwark_tests::eventually::poll_until;
use bulwark_tests::harness::{
    CONFIG_DEADLINE, Harness, agent_settings, control_plane_settings, loopback, resilience_policy,
};
use bulwark_tests::mesh::Mesh;
use bulwark_tests::upstream::{Knobs, Upstream};

const SLOW: Duration = Duration::from_millis(400);

async fn slow_upstream() -> Upstream {
    Upstream::start(
        loopback(),
        "reviews-0",
        Knobs {
            latency: SLOW,
            ..Knobs::healthy()
        },
    )
    .await
    .expect("test setup")
}

fn timeout_policy(request: &str) -> String {
    resilience_policy(
        "reviews",
        "reviews",
        &format!("  timeout:\n    request: {request}\n"),
    )
}

#[tokio::test]
async fn a_policy_edit_takes_effect_without_dropping_in_flight_requests() {
    let up = slow_upstream().await;
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    mesh.write_policy("policy.yaml", &timeout_policy("10s"))
        .unwrap();
    let h = Harness::start(mesh).await;
    let version = h.config_version().await;

    let mut in_flight = Vec::new();
    for _ in 0..5 {
        let client = h.client.clone();
        in_flight.push(tokio::spawn(async move {
            client.get("http://reviews.test/", &[]).await
        }));
    }
    bulwark_tests::assert_eventually!(up.stats().in_flight == 5);
    // Tighten the timeout below the upstream's latency while those requests wait.
    h.mesh
        .write_policy("policy.yaml", &timeout_policy("100ms"))
        .unwrap();
    let new_version = h.wait_version_above(version).await;
    assert!(new_version > version);

    for request in in_flight {
        let rsp = request.await.unwrap().unwrap();
        assert_eq!(
            rsp.status, 200,
            "requests in flight finish under the config they started with"
        );
    }
    let rsp = h.client.get("http://reviews.test/", &[]).await.unwrap();
    assert_eq!(rsp.status, 504, "new requests get the new timeout");
    assert_eq!(rsp.reason(), Some("timeout"));
    h.shutdown().await;
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_last_good_config_and_says_why() {
    let up = slow_upstream().await;
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    mesh.write_policy("policy.yaml", &timeout_policy("100ms"))
        .unwrap();
    let h = Harness::start(mesh).await;
    let version = h.config_version().await;

    // Not a duration: rejected with the file and the field path.
    h.mesh
        .write_policy("policy.yaml", &timeout_policy("soon"))
        .unwrap();
    let cp_admin = HttpClient::direct(h.control_plane_admin());
    let errors = poll_until(
        Duration::from_secs(10),
        "the control plane reports the bad file",
        || {
            let cp_admin = cp_admin.clone();
            async move {
                let text = cp_admin.get("/errors", &[]).await.ok()?.text();
                text.contains("policy.yaml").then_some(text)
            }
        },
    )
    .await
    .unwrap();
    assert!(
        errors.contains("spec.timeout.request"),
        "the error names the field: {errors}"
    );

    assert_eq!(
        h.config_version().await,
        version,
        "nothing reached the agent"
    );
    let rsp = h.client.get("http://reviews.test/", &[]).await.unwrap();
    assert_eq!(
        rsp.status, 504,
        "the last good policy (100ms) is still enforced"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_agent_fails_static_without_the_control_plane_and_resyncs_when_it_returns() {
    let up = slow_upstream().await;
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    mesh.write_policy("policy.yaml", &timeout_policy("100ms"))
        .unwrap();
    let mut h = Harness::start(mesh).await;
    let version = h.config_version().await;

    h.stop_control_plane().await;
    for _ in 0..3 {
        let rsp = h.client.get("http://reviews.test/", &[]).await.unwrap();
        assert_eq!(
            rsp.status, 504,
            "the policy is still enforced with the control plane gone"
        );
    }
    let admin = HttpClient::direct(h.agent.admin_addr());
    assert_eq!(
        admin.get("/ready", &[]).await.unwrap().status,
        200,
        "still ready"
    );

    // Loosen the policy while the control plane is down; it comes back and resyncs.
    h.mesh
        .write_policy("policy.yaml", &timeout_policy("5s"))
        .unwrap();
    h.restart_control_plane().await;
    h.wait_version_above(version).await;
    let rsp = h.client.get("http://reviews.test/", &[]).await.unwrap();
    assert_eq!(
        rsp.status, 200,
        "the resynced policy allows the slow upstream"
    );
    h.shutdown().await;
}

/// `--source dir:A --source dir:B`: the agent is served the services of both folders,
/// follows a service added to the second one, and a service defined again in the second
/// folder is listed at `/errors` while the first folder's definition keeps serving.
#[tokio::test]
async fn two_folders_serve_one_mesh() {
    let start = |name: &'static str| Upstream::start(loopback(), name, Knobs::healthy());
    let catalog = start("catalog-0").await.unwrap();
    let reviews = start("reviews-0").await.unwrap();
    let decoy = start("decoy-0").await.unwrap();
    let first = Mesh::with_services([("catalog", vec![catalog.addr()])]).unwrap();
    let second = Mesh::new().unwrap();
    let mut settings = control_plane_settings(&first, loopback());
    settings.source = Source::Dir(vec![first.path().to_owned(), second.path().to_owned()]);
    let cp = ControlPlane::start(settings).await.unwrap();
    let agent = Agent::start(agent_settings(cp.grpc_addr(), "client", None))
        .await
        .unwrap();
    let client = HttpClient::proxy(agent.outbound_addr());
    let answered_by = |url: &'static str| {
        let client = client.clone();
        async move {
            let rsp = client.get(url, &[]).await.ok()?;
            Some(rsp.upstream()?.to_owned())
        }
    };
    let served = poll_until(
        CONFIG_DEADLINE,
        "catalog from the first folder is served",
        || answered_by("http://catalog.test/"),
    )
    .await
    .unwrap();
    assert_eq!(served, "catalog-0");

    second.add_service("reviews", &[reviews.addr()]).unwrap();
    let served = poll_until(
        CONFIG_DEADLINE,
        "reviews added to the second folder is served",
        || answered_by("http://reviews.test/"),
    )
    .await
    .unwrap();
    assert_eq!(served, "reviews-0");

    second.add_service("catalog", &[decoy.addr()]).unwrap();
    let cp_admin = HttpClient::direct(cp.admin_addr());
    let duplicate = format!(
        "already defined in {}",
        first.path().join("service-catalog.yaml").display()
    );
    let errors = poll_until(
        CONFIG_DEADLINE,
        "the duplicate is listed at /errors",
        || async {
            let text = cp_admin.get("/errors", &[]).await.ok()?.text();
            text.contains(&duplicate).then_some(text)
        },
    )
    .await
    .unwrap();
    assert!(
        errors.contains(
            &second
                .path()
                .join("service-catalog.yaml")
                .display()
                .to_string()
        ),
        "{errors}"
    );
    for _ in 0..5 {
        let rsp = client.get("http://catalog.test/", &[]).await.unwrap();
        assert_eq!(
            rsp.upstream(),
            Some("catalog-0"),
            "the first definition wins"
        );
    }
    assert_eq!(decoy.stats().total, 0, "the duplicate is never served");
    cp.shutdown().await;
    agent.shutdown().await;
}
