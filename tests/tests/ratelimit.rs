//! Rate limits, end to end: mesh → the agents' inbound listeners → the local app, and
//! app → the agent's outbound listener → a limited destination. Service-scope limits
//! split over the ready pods; Shared ones kept in a real redis-server by several real
//! agents.

use std::net::SocketAddr;
use std::time::Duration;

use bulwark_agent::Agent;
use bulwark_agent::policy::ratelimit::store::StoreSettings;
use bulwark_control_plane::ControlPlane;
use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::{
    CONFIG_DEADLINE, Harness, agent_settings, control_plane_settings, loopback,
};
use bulwark_tests::mesh::{Mesh, NAMESPACE, service_yaml};
use bulwark_tests::redis::RedisServer;
use bulwark_tests::upstream::{Knobs, Upstream};
use bulwark_tests::{Metrics, poll_until};

/// A RateLimitPolicy `name` on Service `name` with `spec` (YAML lines indented by two
/// spaces, below `spec:`, after the target).
fn policy_on(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: bulwark.io/v1alpha1
kind: RateLimitPolicy
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  targetRefs: [{{kind: Service, name: {name}}}]
{spec}"
    )
}

/// A RateLimitPolicy `frontend` on Service `frontend` with these limits (YAML list items
/// indented by four spaces).
fn rate_limit_policy(limits: &str) -> String {
    policy_on("frontend", &format!("  limits:\n{limits}"))
}

#[tokio::test]
async fn per_tenant_buckets_follow_the_token_bucket_arithmetic() {
    let app = Upstream::start(loopback(), "frontend-app", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("frontend", vec![app.addr()])]).unwrap();
    // One token per 10 minutes: within the test only the burst of 5 counts.
    mesh.write_policy(
        "limits.yaml",
        &rate_limit_policy(
            "    - name: per-tenant\n      key:\n        type: Header\n        header: x-tenant-id\n      rate:\n        requests: 1\n        per: 10m\n      burst: 5\n",
        ),
    )
    .unwrap();
    let h = Harness::start_as(mesh, "frontend", Some(app.addr().port())).await;
    let inbound = HttpClient::direct(h.agent.inbound_addrs()[0]);

    let mut acme = Vec::new();
    for _ in 0..8 {
        acme.push(inbound.get("/", &[("x-tenant-id", "acme")]).await.unwrap());
    }
    let passed = acme.iter().filter(|r| r.status == 200).count();
    assert_eq!(passed, 5, "a burst of 5 passes, the rest are limited");
    for limited in acme.iter().filter(|r| r.status != 200) {
        assert_eq!(limited.status, 429);
        assert_eq!(limited.reason(), Some("rate-limited"));
        let after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
        assert!(
            after > 500 && after <= 600,
            "the next token is ~10 minutes away: {after}s"
        );
    }
    // Another tenant has its own bucket.
    for _ in 0..5 {
        assert_eq!(
            inbound
                .get("/", &[("x-tenant-id", "globex")])
                .await
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(
        app.stats().total,
        10,
        "limited requests never reach the app"
    );
    let m = h.metrics().await;
    assert_eq!(
        m.get(
            "bulwark_rate_limited_total",
            &[("policy", "test/frontend"), ("limit", "per-tenant")]
        ),
        3.0
    );
    h.shutdown().await;
}

#[tokio::test]
async fn limits_only_apply_to_the_pods_of_the_target_service() {
    let app = Upstream::start(loopback(), "other-app", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("frontend", vec![]), ("other", vec![app.addr()])]).unwrap();
    mesh.write_policy(
        "limits.yaml",
        &rate_limit_policy(
            "    - name: total\n      key:\n        type: None\n      rate:\n        requests: 1\n        per: 10m\n      burst: 1\n",
        ),
    )
    .unwrap();
    // This agent serves a pod of `other`, which no policy limits.
    let h = Harness::start_as(mesh, "other", Some(app.addr().port())).await;
    let inbound = HttpClient::direct(h.agent.inbound_addrs()[0]);
    for _ in 0..5 {
        assert_eq!(inbound.get("/", &[]).await.unwrap().status, 200);
    }
    h.shutdown().await;
}

/// A control plane and several agents, each a pod of Service `frontend` forwarding to
/// one shared app; the Service lists `ready` of them as ready endpoints.
struct Fleet {
    mesh: Mesh,
    control_plane: ControlPlane,
    agents: Vec<Agent>,
    app: Upstream,
    /// Endpoints of Service `frontend`, ready or not.
    pods: usize,
}

impl Fleet {
    async fn start(agents: usize, ready: usize, store: Option<StoreSettings>) -> Fleet {
        let app = Upstream::start(loopback(), "frontend-app", Knobs::healthy())
            .await
            .expect("the test's setup and requests work");
        let mesh = Mesh::new().expect("the test's setup and requests work");
        let control_plane = ControlPlane::start(control_plane_settings(&mesh, loopback()))
            .await
            .expect("the test's setup and requests work");
        let mut fleet = Fleet {
            mesh,
            control_plane,
            agents: Vec::new(),
            app,
            pods: agents.max(ready),
        };
        fleet.scale(ready);
        for i in 0..agents {
            let mut settings = agent_settings(
                fleet.control_plane.grpc_addr(),
                "frontend",
                Some(fleet.app.addr().port()),
            );
            settings.identity.pod_name = format!("frontend-{i}");
            settings.rate_limit_store = store.clone();
            fleet.agents.push(
                Agent::start(settings)
                    .await
                    .expect("the test's setup and requests work"),
            );
        }
        fleet
    }

    /// Rewrites Service `frontend` with one endpoint per agent (its pod), `ready` of them
    /// ready.
    fn scale(&self, ready: usize) {
        let port = self.app.addr().port();
        let endpoints: Vec<SocketAddr> = (0..self.pods)
            .map(|i| {
                SocketAddr::from((
                    [
                        127,
                        0,
                        1,
                        u8::try_from(i + 1).expect("the test's setup and requests work"),
                    ],
                    port,
                ))
            })
            .collect();
        let mut yaml = service_yaml("frontend", &endpoints);
        for _ in ready..self.pods {
            if let Some(at) = yaml.rfind("ready: true") {
                yaml.replace_range(at..at + "ready: true".len(), "ready: false");
            }
        }
        self.mesh
            .write("service-frontend.yaml", &yaml)
            .expect("the test's setup and requests work");
    }

    fn client(&self, agent: usize) -> HttpClient {
        HttpClient::direct(self.agents[agent].inbound_addrs()[0])
    }

    async fn config(&self, agent: usize) -> serde_json::Value {
        let admin = HttpClient::direct(self.agents[agent].admin_addr());
        let rsp = admin.get("/config", &[]).await.expect("admin answers");
        rsp.json::<serde_json::Value>().expect("/config is JSON")["config"].clone()
    }

    /// Waits until every agent enforces limit `name` with this burst, and returns it.
    async fn wait_limit(&self, name: &str, check: impl Fn(&serde_json::Value) -> bool) {
        for agent in 0..self.agents.len() {
            let check = &check;
            poll_until(
                CONFIG_DEADLINE,
                "the limit reaches the agent",
                || async move {
                    let config = self.config(agent).await;
                    config["inbound"]["rateLimits"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|l| l["name"] == name)
                        .filter(|l| check(l))
                        .cloned()
                },
            )
            .await
            .expect("the agents enforce the limit");
        }
    }

    async fn metrics(&self, agent: usize) -> Metrics {
        Metrics::scrape(self.agents[agent].admin_addr())
            .await
            .expect("agent metrics")
    }

    /// Statuses of `n` requests per agent, sent round robin, with `headers`.
    async fn round_robin(&self, n: usize, headers: &[(&str, &str)]) -> Vec<u16> {
        let mut statuses = Vec::new();
        for _ in 0..n {
            for agent in 0..self.agents.len() {
                statuses.push(
                    self.client(agent)
                        .get("/", headers)
                        .await
                        .expect("the test's setup and requests work")
                        .status
                        .as_u16(),
                );
            }
        }
        statuses
    }

    async fn shutdown(self) {
        for agent in self.agents {
            agent.shutdown().await;
        }
        self.control_plane.shutdown().await;
    }
}

fn passed(statuses: &[u16]) -> usize {
    statuses.iter().filter(|s| **s == 200).count()
}

/// A limit of 12 per 10 minutes: within a test only the burst counts.
fn slow_limit(name: &str, extra: &str) -> String {
    format!(
        "    - name: {name}\n      key:\n        type: Header\n        header: x-tenant-id\n      rate:\n        requests: 12\n        per: 10m\n      burst: 12\n{extra}"
    )
}

#[tokio::test]
async fn a_service_limit_is_split_over_the_ready_pods_and_re_split_as_they_scale() {
    let fleet = Fleet::start(3, 1, None).await;
    // Service scope is the default: no scope in the policy.
    fleet
        .mesh
        .write_policy(
            "limits.yaml",
            &rate_limit_policy(&slow_limit("per-tenant", "")),
        )
        .unwrap();
    // One ready pod: it (and every pod) enforces the whole limit.
    fleet
        .wait_limit("per-tenant", |l| {
            l["burst"] == 12 && l["scope"] == "Service"
        })
        .await;
    assert_eq!(
        passed(&fleet.round_robin(8, &[("x-tenant-id", "a")]).await),
        24,
        "3 pods × 8, each under its 12"
    );

    // Three ready pods: a third each, so the service accepts the limit, not three times it.
    fleet.scale(3);
    fleet
        .wait_limit("per-tenant", |l| l["burst"] == 4 && l["split"] == 3)
        .await;
    let statuses = fleet.round_robin(8, &[("x-tenant-id", "b")]).await;
    assert_eq!(
        passed(&statuses),
        12,
        "the service-wide burst, split: {statuses:?}"
    );
    let config = fleet.config(0).await;
    let limit = &config["inbound"]["rateLimits"][0];
    assert_eq!(
        (limit["requests"].as_u64(), limit["periodMs"].as_u64()),
        (Some(4), Some(600_000)),
        "12 per 10m over 3 pods: 4 per 10m each"
    );

    // No ready pod (all failing their probes, say): a pod enforces the whole limit again
    // rather than none, so the first to become ready is not starved.
    fleet.scale(0);
    fleet
        .wait_limit("per-tenant", |l| l["burst"] == 12 && l["split"] == 1)
        .await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn pod_scope_is_the_whole_limit_on_every_pod() {
    let fleet = Fleet::start(2, 2, None).await;
    fleet
        .mesh
        .write_policy(
            "limits.yaml",
            &rate_limit_policy(&slow_limit("per-tenant", "      scope: Pod\n")),
        )
        .unwrap();
    fleet
        .wait_limit("per-tenant", |l| l["scope"] == "Pod" && l["burst"] == 12)
        .await;
    assert_eq!(
        passed(&fleet.round_robin(15, &[("x-tenant-id", "a")]).await),
        24,
        "two pods accept twice the limit: what Pod scope means"
    );
    fleet.shutdown().await;
}

fn store(redis: &RedisServer) -> Option<StoreSettings> {
    Some(StoreSettings::new(redis.url()))
}

#[tokio::test]
async fn a_shared_limit_holds_across_several_agents_and_tenants_are_isolated() {
    let redis = RedisServer::start(None).await;
    let fleet = Fleet::start(3, 3, store(&redis)).await;
    fleet
        .mesh
        .write_policy(
            "limits.yaml",
            &rate_limit_policy(&slow_limit("per-tenant", "      scope: Shared\n")),
        )
        .unwrap();
    fleet
        .wait_limit("per-tenant", |l| l["shared"]["burst"] == 12)
        .await;
    let statuses = fleet.round_robin(10, &[("x-tenant-id", "acme")]).await;
    // Leases may leave a token unspent on an agent; never more than the limit passes.
    let acme = passed(&statuses);
    assert!(
        (12 - fleet.agents.len()..=12).contains(&acme),
        "12 in all across 3 agents, passed {acme}: {statuses:?}"
    );
    // Another tenant has its own bucket in Redis.
    let globex = passed(&fleet.round_robin(10, &[("x-tenant-id", "globex")]).await);
    assert!(
        (12 - fleet.agents.len()..=12).contains(&globex),
        "globex {globex}"
    );
    // Refusals say when to come back, and never reached the app.
    let refused = fleet
        .client(0)
        .get("/", &[("x-tenant-id", "acme")])
        .await
        .unwrap();
    assert_eq!(refused.status, 429);
    assert_eq!(refused.reason(), Some("rate-limited"));
    let after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(after > 30, "the next of 12 per 10m is ~50s away: {after}");
    assert_eq!(fleet.app.stats().total, (acme + globex) as u64);
    let m = fleet.metrics(0).await;
    assert_eq!(m.get("bulwark_rate_limit_store_up", &[]), 1.0);
    let trips = m.get("bulwark_rate_limit_store_round_trips_total", &[]);
    assert!(trips >= 1.0, "the store was asked");
    fleet.shutdown().await;
}

/// A Shared limit whose store is killed under traffic and restarted: every request is
/// decided (by the limit or by the mode, never failed), the mode is visible in metrics
/// and readiness, and the limit draws from Redis again once it is back.
async fn store_restart(mode: &str, expect_while_down: impl Fn(usize, usize)) {
    let mut redis = RedisServer::start(None).await;
    let fleet = Fleet::start(2, 2, store(&redis)).await;
    let limit = format!(
        "    - name: total\n      rate:\n        requests: 20\n        per: 10m\n      burst: 20\n      scope: Shared\n      onStoreUnavailable: {mode}\n"
    );
    fleet
        .mesh
        .write_policy("limits.yaml", &rate_limit_policy(&limit))
        .expect("the test's setup and requests work");
    fleet
        .wait_limit("total", |l| l["shared"]["onStoreUnavailable"] == mode)
        .await;
    poll_until(CONFIG_DEADLINE, "the store is up", || async {
        (fleet
            .metrics(0)
            .await
            .get("bulwark_rate_limit_store_up", &[])
            == 1.0)
            .then_some(())
    })
    .await
    .expect("the test's setup and requests work");
    assert_eq!(passed(&fleet.round_robin(2, &[]).await), 4);

    redis.stop().await;
    let statuses = fleet.round_robin(20, &[]).await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "every request decided by the limit or its mode: {statuses:?}"
    );
    expect_while_down(passed(&statuses), statuses.len());
    let m = fleet.metrics(0).await;
    assert_eq!(m.get("bulwark_rate_limit_store_up", &[]), 0.0);
    let labels = [
        ("policy", "test/frontend"),
        ("limit", "total"),
        ("mode", mode),
    ];
    assert_eq!(m.get("bulwark_rate_limit_store_mode", &labels), 1.0);
    assert!(m.get("bulwark_rate_limit_store_mode_decisions_total", &labels) >= 19.0);
    let ready = HttpClient::direct(fleet.agents[0].admin_addr())
        .get("/ready", &[])
        .await
        .expect("the test's setup and requests work");
    assert_eq!(ready.status, 200, "still ready: the mode serves");
    assert!(ready.text().contains("unavailable"), "{}", ready.text());

    // Back (empty, as a Redis without persistence): the agents notice within a health
    // check or two, and the whole limit holds again from Redis.
    redis.start_again().await;
    poll_until(
        Duration::from_secs(5),
        "the agents see the store again",
        || async {
            let m = fleet.metrics(1).await;
            (m.get("bulwark_rate_limit_store_up", &[]) == 1.0).then_some(())
        },
    )
    .await
    .expect("the test's setup and requests work");
    let statuses = fleet.round_robin(15, &[]).await;
    let back = passed(&statuses);
    assert!(
        (20 - fleet.agents.len()..=20).contains(&back),
        "the shared 20 once more: {back} of {statuses:?}"
    );
    let labels = [
        ("policy", "test/frontend"),
        ("limit", "total"),
        ("mode", mode),
    ];
    assert_eq!(
        fleet
            .metrics(0)
            .await
            .get("bulwark_rate_limit_store_mode", &labels),
        0.0
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn redis_restart_fail_open_lets_everything_through_meanwhile() {
    store_restart("FailOpen", |passed, sent| assert_eq!(passed, sent)).await;
}

#[tokio::test]
async fn redis_restart_fail_closed_refuses_everything_meanwhile() {
    // A token leased from Redis before it died may still be spent: the store's answer,
    // not the mode's. At most one lease (one token at this rate) per agent.
    store_restart("FailClosed", |passed, _| {
        assert!(passed <= 2, "{passed} passed")
    })
    .await;
}

#[tokio::test]
async fn redis_restart_fallback_to_split_enforces_each_pods_share_meanwhile() {
    // 20 over 2 pods: 10 each, fresh local buckets, and perhaps the one token each agent
    // had leased from Redis before it died.
    store_restart("FallbackToSplit", |passed, _| {
        assert!((20..=22).contains(&passed), "{passed} passed")
    })
    .await;
}

#[tokio::test]
async fn bad_store_credentials_are_a_clear_error_and_the_mode_applies() {
    let redis = RedisServer::start(Some("right-password")).await;
    let mut settings = StoreSettings::new(redis.url());
    settings.password = Some("wrong-password".into());
    let fleet = Fleet::start(1, 1, Some(settings)).await;
    let limit = "    - name: total\n      rate:\n        requests: 20\n        per: 10m\n      scope: Shared\n      onStoreUnavailable: FailClosed\n";
    fleet
        .mesh
        .write_policy("limits.yaml", &rate_limit_policy(limit))
        .unwrap();
    fleet.wait_limit("total", |l| l["shared"].is_object()).await;
    let reason = poll_until(CONFIG_DEADLINE, "the store refuses the agent", || async {
        let config = fleet.config(0).await;
        config["rateLimitStore"]["unavailableReason"]
            .as_str()
            .filter(|r| r.contains("credentials"))
            .map(str::to_owned)
    })
    .await
    .unwrap();
    assert!(
        reason.contains("check the username and password"),
        "{reason}"
    );
    assert!(
        !reason.contains("wrong-password"),
        "never the password: {reason}"
    );
    let rsp = fleet.client(0).get("/", &[]).await.unwrap();
    assert_eq!(rsp.status, 429, "FailClosed applies");
    assert_eq!(rsp.reason(), Some("rate-limited"));
    fleet.shutdown().await;
}

#[tokio::test]
async fn costs_and_rate_limit_headers_end_to_end() {
    let app = Upstream::start(loopback(), "frontend-app", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("frontend", vec![app.addr()])]).unwrap();
    mesh.write_policy(
        "limits.yaml",
        &policy_on(
            "frontend",
            "  responseHeaders: true
  limits:
    - name: total
      rate: {requests: 10, per: 10m}
      cost:
        rules: [{method: POST, pathPrefix: /search, cost: 4}]
",
        ),
    )
    .unwrap();
    let h = Harness::start_as(mesh, "frontend", Some(app.addr().port())).await;
    let inbound = HttpClient::direct(h.agent.inbound_addrs()[0]);
    poll_until(CONFIG_DEADLINE, "the limit arrives", || async {
        let rsp = inbound.get("/", &[]).await.ok()?;
        rsp.header("ratelimit").map(str::to_owned)
    })
    .await
    .unwrap();
    // 1 spent; two searches take 8 more; the third does not fit.
    for _ in 0..2 {
        let rsp = inbound
            .request(http::Method::POST, "/search", &[], bytes::Bytes::new())
            .await
            .unwrap();
        assert_eq!(rsp.status, 200);
    }
    let rsp = inbound
        .request(http::Method::POST, "/search", &[], bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(rsp.status, 429);
    assert_eq!(rsp.header("ratelimit-policy"), Some("\"total\";q=10;w=600"));
    let state = rsp.header("ratelimit").unwrap();
    assert!(state.starts_with("\"total\";r=0;t="), "{state}");
    assert!(rsp.header("retry-after").is_some());
    // A plain request still fits in the last token, and says none are left.
    let rsp = inbound.get("/", &[]).await.unwrap();
    assert_eq!(rsp.status, 200);
    assert!(
        rsp.header("ratelimit")
            .unwrap()
            .starts_with("\"total\";r=0;")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn an_outbound_limit_protects_a_destination_from_the_callers_side() {
    let api = Upstream::start(loopback(), "partner-api", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("partner", vec![api.addr()])]).unwrap();
    mesh.write_policy(
        "outbound.yaml",
        &policy_on(
            "partner",
            "  direction: Outbound
  limits:
    - name: calls
      rate: {requests: 5, per: 10m}
      scope: Pod
",
        ),
    )
    .unwrap();
    let h = Harness::start(mesh).await;
    poll_until(CONFIG_DEADLINE, "the outbound limit arrives", || async {
        let config = h.config().await;
        config["config"]["destinations"]
            .as_array()?
            .iter()
            .any(|d| d["rateLimits"].as_array().is_some_and(|l| !l.is_empty()))
            .then_some(())
    })
    .await
    .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let rsp = h.client.get("http://partner.test/", &[]).await.unwrap();
        if rsp.status == 429 {
            assert_eq!(rsp.reason(), Some("rate-limited"));
        }
        statuses.push(rsp.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(api.stats().total, 5, "refused calls never left the pod");
    let m = h.metrics().await;
    assert_eq!(
        m.get(
            "bulwark_rate_limited_total",
            &[("policy", "test/partner"), ("limit", "calls")]
        ),
        3.0
    );
    h.shutdown().await;
}
