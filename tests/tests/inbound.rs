//! The inbound side's server-side concurrency limit and X-Forwarded-For, end
//! to end: mesh → the agent's inbound listener → the local app.

use std::time::Duration;

use bulwark_agent::Agent;
use bulwark_control_plane::ControlPlane;
use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::{CONFIG_DEADLINE, agent_settings, control_plane_settings, loopback};
use bulwark_tests::mesh::Mesh;
use bulwark_tests::upstream::{Knobs, Reply, Upstream};
use bulwark_tests::{Metrics, eventually_named, poll_until};

async fn start(
    app: &Upstream,
    max_concurrency: Option<usize>,
    forwarded_for: bool,
) -> (ControlPlane, Agent) {
    let mesh = Mesh::with_services([("frontend", vec![app.addr()])]).expect("mesh folder");
    let cp = ControlPlane::start(control_plane_settings(&mesh, loopback()))
        .await
        .expect("control plane starts");
    let mut settings = agent_settings(cp.grpc_addr(), "frontend", Some(app.addr().port()));
    settings.inbound_max_concurrency = max_concurrency;
    settings.forwarded_for = forwarded_for;
    let agent = Agent::start(settings).await.expect("agent starts");
    let admin = HttpClient::direct(agent.admin_addr());
    poll_until(CONFIG_DEADLINE, "the agent is ready", || {
        let admin = admin.clone();
        async move {
            admin
                .get("/ready", &[])
                .await
                .ok()
                .filter(|r| r.status == 200)
        }
    })
    .await
    .expect("agent ready");
    // The mesh folder may go: the control plane has read it.
    drop(mesh);
    (cp, agent)
}

#[tokio::test]
async fn the_app_sees_the_client_in_x_forwarded_for_when_configured() {
    let app = Upstream::start(loopback(), "frontend-app", Knobs::healthy())
        .await
        .unwrap();
    let (_cp, agent) = start(&app, None, true).await;
    let inbound = HttpClient::direct(agent.inbound_addrs()[0]);
    let rsp = inbound.get("/", &[]).await.unwrap();
    let reply: Reply = rsp.json().unwrap();
    assert_eq!(reply.forwarded_for.as_deref(), Some("127.0.0.1"));
    let rsp = inbound
        .get("/", &[("x-forwarded-for", "203.0.113.7")])
        .await
        .unwrap();
    let reply: Reply = rsp.json().unwrap();
    assert_eq!(
        reply.forwarded_for.as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );

    let (_cp2, plain) = start(&app, None, false).await;
    let rsp = HttpClient::direct(plain.inbound_addrs()[0])
        .get("/", &[])
        .await
        .unwrap();
    let reply: Reply = rsp.json().unwrap();
    assert_eq!(reply.forwarded_for, None, "off unless configured");
}

#[tokio::test]
async fn the_inbound_concurrency_limit_answers_503_when_the_app_is_full() {
    let app = Upstream::start(
        loopback(),
        "frontend-app",
        Knobs {
            hang: true,
            ..Knobs::healthy()
        },
    )
    .await
    .unwrap();
    let (_cp, agent) = start(&app, Some(1), false).await;
    let inbound =
        HttpClient::direct(agent.inbound_addrs()[0]).with_timeout(Duration::from_secs(30));
    let hanging = tokio::spawn({
        let inbound = inbound.clone();
        async move { inbound.get("/slow", &[]).await }
    });
    eventually_named(
        CONFIG_DEADLINE,
        "the first request reaches the app",
        || async { app.stats().in_flight == 1 },
    )
    .await;
    let rsp = inbound.get("/", &[]).await.unwrap();
    assert_eq!(rsp.status, 503);
    assert_eq!(rsp.reason(), Some("bulkhead-full"));
    let port = app.addr().port().to_string();
    let dst = format!("localhost:{port}");
    let metrics = Metrics::scrape(agent.admin_addr()).await.unwrap();
    assert_eq!(
        metrics.get(
            "bulwark_local_responses_total",
            &[
                ("direction", "inbound"),
                ("dst", &dst),
                ("reason", "bulkhead-full")
            ]
        ),
        1.0
    );
    // Once the slow request is gone (its client gave up), the slot is free again.
    app.set_knobs(Knobs::healthy());
    hanging.abort();
    eventually_named(
        CONFIG_DEADLINE,
        "a request is admitted once the slot is free",
        || async { inbound.get("/", &[]).await.is_ok_and(|r| r.status == 200) },
    )
    .await;
}

/// AuthorizationPolicy end to end on the inbound side: a caller without a mesh identity
/// (plaintext) is allowed only what a rule with no `from` allows, gets 403 with
/// `x-bulwark-reason: unauthorized` otherwise, and is counted; a Shadow policy only
/// counts.
#[tokio::test]
async fn authorization_policies_deny_what_no_rule_allows() {
    let app = Upstream::start(loopback(), "frontend-app", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("frontend", vec![app.addr()])]).expect("mesh folder");
    mesh.write_policy(
        "authz.yaml",
        "apiVersion: bulwark.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: frontend, namespace: test}\n\
         spec:\n  targetRefs: [{kind: Service, name: frontend}]\n\
         \x20 rules:\n\
         \x20   - {to: [{methods: [GET], paths: [/health]}]}\n\
         \x20   - {from: [{serviceAccount: checkout}]}\n\
         ---\napiVersion: bulwark.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: audit, namespace: test}\n\
         spec:\n  selector: {matchLabels: {app: frontend}}\n  mode: Shadow\n\
         \x20 rules: [{to: [{paths: ['/public/*']}]}]\n",
    )
    .unwrap();
    let cp = ControlPlane::start(control_plane_settings(&mesh, loopback()))
        .await
        .unwrap();
    let agent = Agent::start(agent_settings(
        cp.grpc_addr(),
        "frontend",
        Some(app.addr().port()),
    ))
    .await
    .unwrap();
    let inbound = HttpClient::direct(agent.inbound_addrs()[0]);
    let health = poll_until(CONFIG_DEADLINE, "the policy is in force", || {
        let inbound = inbound.clone();
        async move {
            let denied = inbound.get("/orders", &[]).await.ok()?;
            (denied.status == 403).then_some(())
        }
    })
    .await;
    health.unwrap();
    let denied = inbound.get("/orders", &[]).await.unwrap();
    assert_eq!(denied.reason(), Some("unauthorized"));
    assert_eq!(denied.upstream(), None, "the app never saw it");
    let allowed = inbound.get("/health", &[]).await.unwrap();
    assert_eq!(
        allowed.status, 200,
        "a rule with no `from` allows any caller"
    );
    let metrics = Metrics::scrape(agent.admin_addr()).await.unwrap();
    assert_eq!(
        metrics.get(
            "bulwark_unauthorized_total",
            &[("policy", "test/frontend"), ("caller", "unauthenticated")]
        ),
        2.0
    );
    // The shadow policy allows only /public/*: it would deny /health, and counts that.
    assert!(
        metrics.get(
            "bulwark_shadow_unauthorized_total",
            &[("policy", "test/audit"), ("caller", "unauthenticated")]
        ) >= 1.0
    );
    agent.shutdown().await;
    cp.shutdown().await;
}
