//! The control plane on Kubernetes, against the kit's in-test API server (real HTTP,
//! the API's list/watch/410/PATCH protocol) and a real agent over real gRPC: objects
//! created, changed and deleted in the "cluster" reach the agent; every policy gets an
//! `Accepted` condition; invalid and conflicting policies are reported without touching
//! what agents run; outages and expired watches lose nothing; only the Lease holder
//! writes status; and every call the control plane makes is covered by its RBAC rules.

use std::path::PathBuf;
use std::time::Duration;

use bulwark_agent::Agent;
use bulwark_control_plane::source::kubernetes::GATEWAY_API_RECHECK;
use bulwark_control_plane::{ControlPlane, Settings};
use bulwark_tests::apiserver::ApiServer;
use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::{agent_settings, kubernetes_control_plane_settings};
use bulwark_tests::mesh::NAMESPACE;
use bulwark_tests::poll_until;
use serde_json::Value;

/// Generous: the machine is loaded, and watch retries back off.
const DEADLINE: Duration = Duration::from_secs(30);

fn settings(kubeconfig: PathBuf, identity: &str) -> Settings {
    kubernetes_control_plane_settings(kubeconfig, identity, GATEWAY_API_RECHECK)
}

fn service(name: &str, ip: &str) -> [String; 3] {
    [
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
             spec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
        ),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-abcde, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints:\n  - addresses: ['{ip}']\n    conditions: {{ready: true}}\n\
             \x20   targetRef: {{kind: Pod, name: {name}-0, namespace: {NAMESPACE}}}\n"
        ),
        format!(
            "apiVersion: v1\nkind: Pod\n\
             metadata: {{name: {name}-0, namespace: {NAMESPACE}, labels: {{app: {name}, version: v1}}}}\n\
             spec: {{serviceAccountName: {name}}}\nstatus: {{podIP: '{ip}', podIPs: [{{ip: '{ip}'}}]}}\n"
        ),
    ]
}

fn policy(name: &str, service: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
         metadata: {{name: {name}, namespace: {NAMESPACE}, creationTimestamp: '{created}'}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: {service}}}]\n{spec}"
    )
}

async fn agent_config(agent: &Agent) -> Value {
    let admin = HttpClient::direct(agent.admin_addr());
    match admin.get("/config", &[]).await {
        Ok(rsp) => rsp.json().unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// The agent's destination `name` (e.g. `reviews.test:80`), once it has one.
fn destination<'c>(config: &'c Value, name: &str) -> Option<&'c Value> {
    config["config"]["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
}

async fn wait_for_agent<T>(agent: &Agent, what: &str, check: impl Fn(&Value) -> Option<T>) -> T {
    poll_until(DEADLINE, what, || async {
        check(&agent_config(agent).await)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn wait_for_condition(
    server: &ApiServer,
    kind: &str,
    name: &str,
    what: &str,
    check: impl Fn(&(String, String, String, i64)) -> bool,
) -> (String, String, String, i64) {
    poll_until(DEADLINE, what, || async {
        server.accepted(kind, NAMESPACE, name).filter(|c| check(c))
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; the condition is {:?}",
            server.accepted(kind, NAMESPACE, name)
        )
    })
}

fn attempts(config: &Value) -> Option<u64> {
    destination(config, &format!("reviews.{NAMESPACE}:80"))?["retry"]["attempts"].as_u64()
}

fn status_patches(server: &ApiServer, name: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.verb == "patch" && r.name.as_deref() == Some(name))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_objects_reach_the_agent_and_every_policy_gets_a_status() {
    let server = ApiServer::start().await;
    // issue 6: with the Gateway API installed and a route of each kind on reviews (no
    // backends: to reviews itself), so that the HTTPRoute and GRPCRoute rules are
    // exercised too.
    server.serve_gateway_api();
    for kind in ["HTTPRoute", "GRPCRoute"] {
        server.apply(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\n\
             metadata: {{name: reviews-route, namespace: {NAMESPACE}}}\n\
             spec: {{parentRefs: [{{group: '', kind: Service, name: reviews}}]}}\n"
        ));
    }
    for manifest in service("reviews", "127.0.0.21") {
        server.apply(&manifest);
    }
    let cp = ControlPlane::start(settings(server.kubeconfig("cp-1"), "cp-1"))
        .await
        .expect("the control plane lists the cluster and starts");
    let agent = Agent::start(agent_settings(cp.grpc_addr(), "client", None))
        .await
        .expect("the agent starts");

    // The Service and its endpoint, labelled from its Pod, reach the agent.
    wait_for_agent(
        &agent,
        "the agent knows reviews and its pod's labels",
        |c| {
            let d = destination(c, &format!("reviews.{NAMESPACE}:80"))?;
            let endpoint = d["endpoints"].as_array()?.first()?;
            (endpoint["address"] == "127.0.0.21:8080" && endpoint["labels"]["version"] == "v1")
                .then_some(())
        },
    )
    .await;

    // A policy: in force at the agent, Accepted on the object.
    server.apply(&policy(
        "reviews",
        "reviews",
        "2024-01-01T00:00:00Z",
        "  retry: {attempts: 2}\n",
    ));
    wait_for_agent(&agent, "retries of 2 at the agent", |c| {
        (attempts(c) == Some(2)).then_some(())
    })
    .await;
    let accepted = wait_for_condition(&server, "ResiliencePolicy", "reviews", "Accepted", |c| {
        c.1 == "Accepted"
    })
    .await;
    assert_eq!((accepted.0.as_str(), accepted.3), ("True", 1));

    // Modified: the agent follows, the condition observes generation 2.
    server.apply(&policy(
        "reviews",
        "reviews",
        "2024-01-01T00:00:00Z",
        "  retry: {attempts: 4}\n",
    ));
    wait_for_agent(&agent, "retries of 4 at the agent", |c| {
        (attempts(c) == Some(4)).then_some(())
    })
    .await;
    wait_for_condition(
        &server,
        "ResiliencePolicy",
        "reviews",
        "generation 2 accepted",
        |c| c.1 == "Accepted" && c.3 == 2,
    )
    .await;

    // Invalid (attempts 11, as a cluster without CEL would store it): Accepted=False with
    // the field path, and the agent keeps running the last accepted version.
    server.apply(&policy(
        "reviews",
        "reviews",
        "2024-01-01T00:00:00Z",
        "  retry: {attempts: 11}\n",
    ));
    let invalid = wait_for_condition(&server, "ResiliencePolicy", "reviews", "Invalid", |c| {
        c.1 == "Invalid"
    })
    .await;
    assert_eq!((invalid.0.as_str(), invalid.3), ("False", 3));
    assert!(
        invalid
            .2
            .starts_with("spec.retry.attempts: must be between 1 and 10")
            && invalid
                .2
                .ends_with("the last accepted version stays in force"),
        "{}",
        invalid.2
    );
    assert_eq!(attempts(&agent_config(&agent).await), Some(4));

    // A younger policy on the same service: Conflicted, naming the winner; the agent
    // still runs the winner.
    server.apply(&policy(
        "reviews-late",
        "reviews",
        "2024-06-01T00:00:00Z",
        "  retry: {attempts: 7}\n",
    ));
    let conflicted = wait_for_condition(
        &server,
        "ResiliencePolicy",
        "reviews-late",
        "Conflicted",
        |c| c.1 == "Conflicted",
    )
    .await;
    assert!(
        conflicted.2.contains(&format!(
            "ResiliencePolicy {NAMESPACE}/reviews takes precedence"
        )),
        "{}",
        conflicted.2
    );
    assert_eq!(attempts(&agent_config(&agent).await), Some(4));

    // A policy for a Service that does not exist yet: TargetNotFound; then the Service
    // appears and it is Accepted.
    server.apply(&policy(
        "ratings",
        "ratings",
        "2024-01-01T00:00:00Z",
        "  timeout: {request: 2s}\n",
    ));
    let missing = wait_for_condition(
        &server,
        "ResiliencePolicy",
        "ratings",
        "TargetNotFound",
        |c| c.1 == "TargetNotFound",
    )
    .await;
    assert!(
        missing
            .2
            .contains(&format!("Service {NAMESPACE}/ratings does not exist")),
        "{}",
        missing.2
    );
    for manifest in service("ratings", "127.0.0.31") {
        server.apply(&manifest);
    }
    wait_for_condition(
        &server,
        "ResiliencePolicy",
        "ratings",
        "ratings accepted",
        |c| c.1 == "Accepted",
    )
    .await;

    // The other kinds get their status too.
    server.apply(&format!(
        "apiVersion: bulwark.io/v1alpha1\nkind: RateLimitPolicy\n\
         metadata: {{name: reviews, namespace: {NAMESPACE}}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: reviews}}]\n\
         \x20 limits: [{{name: total, rate: {{requests: 10, per: 1s}}}}]\n"
    ));
    server.apply(&format!(
        "apiVersion: bulwark.io/v1alpha1\nkind: ShardTopology\n\
         metadata: {{name: reviews, namespace: {NAMESPACE}}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: reviews}}]\n\
         \x20 key: {{type: Header, name: x-user}}\n  strategy: {{type: Hash}}\n\
         \x20 shards: [{{name: a, primary: {{matchLabels: {{app: reviews}}}}}}]\n"
    ));
    server.apply(&format!(
        "apiVersion: bulwark.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: reviews, namespace: {NAMESPACE}}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: reviews}}]\n\
         \x20 rules: [{{from: [{{serviceAccount: client}}]}}]\n"
    ));
    server.apply(&format!(
        "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
         metadata: {{name: reviews, namespace: {NAMESPACE}}}\n\
         spec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  mode: Strict\n"
    ));
    for kind in [
        "RateLimitPolicy",
        "ShardTopology",
        "AuthorizationPolicy",
        "PeerAuthentication",
    ] {
        wait_for_condition(
            &server,
            kind,
            "reviews",
            &format!("the {kind} accepted"),
            |c| c.1 == "Accepted" && c.0 == "True",
        )
        .await;
    }

    // The old winner is deleted: the younger policy takes over, at the agent and in status.
    assert!(server.delete("ResiliencePolicy", NAMESPACE, "reviews"));
    wait_for_agent(&agent, "the younger policy's 7 attempts", |c| {
        (attempts(c) == Some(7)).then_some(())
    })
    .await;
    wait_for_condition(
        &server,
        "ResiliencePolicy",
        "reviews-late",
        "reviews-late accepted",
        |c| c.1 == "Accepted",
    )
    .await;

    let metrics = bulwark_tests::Metrics::scrape(cp.admin_addr())
        .await
        .expect("control plane metrics");
    assert_eq!(metrics.get("bulwark_cp_status_leader", &[]), 1.0);
    assert!(metrics.get("bulwark_cp_status_writes_total", &[]) >= 6.0);

    // Status is written only when it changes: once settled, no more patches.
    let settled = status_patches(&server, "reviews-late");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        status_patches(&server, "reviews-late"),
        settled,
        "no rewrites of an unchanged status"
    );
    assert!(
        settled <= 3,
        "{settled} patches for two changes of the condition"
    );

    // The routes got their status (from the lease holder).
    for kind in ["HTTPRoute", "GRPCRoute"] {
        poll_until(DEADLINE, &format!("the {kind}'s status"), || async {
            server
                .get(kind, NAMESPACE, "reviews-route")
                .filter(|r| r["status"]["parents"][0]["controllerName"] == "bulwark.io/mesh")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    // Every call the control plane made is one its RBAC rules allow.
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.verb == "watch"));
    for r in &requests {
        assert!(
            bulwark_tests::apiserver::rbac_allows(r),
            "{} {} {:?} in group {:?} (namespace {:?}) is not covered by the RBAC rules",
            r.verb,
            r.resource,
            r.name,
            r.group,
            r.namespace
        );
        if r.verb == "patch" {
            assert_eq!(
                r.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
        }
    }
    // ... and every rule is needed: nothing is granted that the control plane never uses.
    let rules = bulwark_control_plane::crds::RBAC_RULES
        .iter()
        .chain(bulwark_control_plane::crds::NAMESPACE_RBAC_RULES);
    for rule in rules {
        for group in rule.api_groups {
            for resource in rule.resources {
                for verb in rule.verbs {
                    assert!(
                        requests.iter().any(|r| r.group == *group
                            && r.resource == *resource
                            && r.verb == *verb),
                        "the RBAC rules grant {verb} on {resource} in group {group:?}, which the control plane never used"
                    );
                }
            }
        }
    }

    agent.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_and_an_expired_watch_lose_nothing() {
    let mut server = ApiServer::start().await;
    for manifest in service("reviews", "127.0.0.21") {
        server.apply(&manifest);
    }
    server.apply(&policy(
        "reviews",
        "reviews",
        "2024-01-01T00:00:00Z",
        "  retry: {attempts: 2}\n",
    ));
    let cp = ControlPlane::start(settings(server.kubeconfig("cp-1"), "cp-1"))
        .await
        .expect("the control plane starts");
    let agent = Agent::start(agent_settings(cp.grpc_addr(), "client", None))
        .await
        .expect("the agent starts");
    wait_for_agent(&agent, "retries of 2", |c| {
        (attempts(c) == Some(2)).then_some(())
    })
    .await;

    // The API server goes away. While it is gone the cluster changes: the policy is
    // replaced and the endpoint moves. Its history is compacted, so resuming a watch
    // gets 410 Gone and the control plane must relist.
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        attempts(&agent_config(&agent).await),
        Some(2),
        "agents keep their config through an API outage"
    );
    server.delete("ResiliencePolicy", NAMESPACE, "reviews");
    server.apply(&policy(
        "reviews-v2",
        "reviews",
        "2024-02-01T00:00:00Z",
        "  retry: {attempts: 5}\n",
    ));
    let [_, slice, _] = service("reviews", "127.0.0.22");
    server.apply(&slice);
    server.compact();
    server.restart().await;

    wait_for_agent(&agent, "the changes made during the outage", |c| {
        let d = destination(c, &format!("reviews.{NAMESPACE}:80"))?;
        let addresses: Vec<&str> = d["endpoints"]
            .as_array()?
            .iter()
            .filter_map(|e| e["address"].as_str())
            .collect();
        (attempts(c) == Some(5) && addresses == ["127.0.0.22:8080"]).then_some(())
    })
    .await;
    wait_for_condition(
        &server,
        "ResiliencePolicy",
        "reviews-v2",
        "the new policy accepted",
        |c| c.1 == "Accepted",
    )
    .await;
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "resiliencepolicies")
        .count();
    assert!(
        lists >= 2,
        "the expired watch made the control plane list again ({lists} lists)"
    );

    // An object that cannot be read is skipped and reported; the rest keeps flowing.
    server.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: broken, namespace: {NAMESPACE}}}\n\
         spec: {{ports: 3}}\n"
    ));
    server.apply(&policy(
        "reviews-v2",
        "reviews",
        "2024-02-01T00:00:00Z",
        "  retry: {attempts: 6}\n",
    ));
    wait_for_agent(&agent, "retries of 6 despite a broken Service", |c| {
        (attempts(c) == Some(6)).then_some(())
    })
    .await;
    // Watches of different kinds are separate streams: the Service may come a little later.
    let admin = HttpClient::direct(cp.admin_addr());
    poll_until(
        DEADLINE,
        "the broken Service is listed at /errors",
        || async {
            let errors = admin.get("/errors", &[]).await.ok()?.text();
            errors
                .contains(&format!("Service {NAMESPACE}/broken"))
                .then_some(())
        },
    )
    .await
    .unwrap();

    agent.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_status_and_a_standby_takes_over() {
    let server = ApiServer::start().await;
    for manifest in service("reviews", "127.0.0.21") {
        server.apply(&manifest);
    }
    let first = ControlPlane::start(settings(server.kubeconfig("cp-1"), "cp-1"))
        .await
        .expect("the first replica starts");
    let holder = poll_until(DEADLINE, "a replica holds the lease", || async {
        server
            .get("Lease", "bulwark-system", "bulwark-control-plane")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    })
    .await
    .unwrap();
    assert_eq!(holder, "cp-1");
    let second = ControlPlane::start(settings(server.kubeconfig("cp-2"), "cp-2"))
        .await
        .expect("the second replica starts");
    // Both serve agents.
    let agent = Agent::start(agent_settings(second.grpc_addr(), "client", None))
        .await
        .expect("an agent of the standby starts");

    server.apply(&policy(
        "reviews",
        "reviews",
        "2024-01-01T00:00:00Z",
        "  retry: {attempts: 2}\n",
    ));
    wait_for_agent(&agent, "the standby serves the policy", |c| {
        (attempts(c) == Some(2)).then_some(())
    })
    .await;
    wait_for_condition(&server, "ResiliencePolicy", "reviews", "Accepted", |c| {
        c.1 == "Accepted"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writers: Vec<Option<String>> = server
        .requests()
        .into_iter()
        .filter(|r| r.verb == "patch")
        .map(|r| r.token)
        .collect();
    assert!(!writers.is_empty());
    assert!(
        writers.iter().all(|t| t.as_deref() == Some("cp-1")),
        "only the holder writes status: {writers:?}"
    );

    // The holder stops (and releases the lease): the standby takes over and writes.
    first.shutdown().await;
    poll_until(DEADLINE, "the standby holds the lease", || async {
        server
            .get("Lease", "bulwark-system", "bulwark-control-plane")
            .filter(|l| l["spec"]["holderIdentity"] == "cp-2")
    })
    .await
    .unwrap();
    server.apply(&policy(
        "reviews",
        "reviews",
        "2024-01-01T00:00:00Z",
        "  retry: {attempts: 12}\n",
    ));
    wait_for_condition(
        &server,
        "ResiliencePolicy",
        "reviews",
        "Invalid from the new holder",
        |c| c.1 == "Invalid",
    )
    .await;
    let last = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.verb == "patch")
        .and_then(|r| r.token);
    assert_eq!(last.as_deref(), Some("cp-2"));

    agent.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_holder_went_silent_is_taken_after_its_duration() {
    let server = ApiServer::start().await;
    for manifest in service("reviews", "127.0.0.21") {
        server.apply(&manifest);
    }
    server.apply(&policy(
        "reviews",
        "reviews",
        "2024-01-01T00:00:00Z",
        "  retry: {attempts: 2}\n",
    ));
    // A replica that crashed holding the lease: it never renews again.
    server.apply(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\n\
         metadata: {name: bulwark-control-plane, namespace: bulwark-system}\n\
         spec: {holderIdentity: crashed, leaseDurationSeconds: 3, renewTime: '2024-01-01T00:00:00.000000Z'}\n",
    );
    let cp = ControlPlane::start(settings(server.kubeconfig("cp-1"), "cp-1"))
        .await
        .expect("the control plane starts");
    // Renew times are the holder's clock; a replica waits a whole lease duration of its
    // own before taking over, so nobody writes status at first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        status_patches(&server, "reviews"),
        0,
        "status written without the lease"
    );
    wait_for_condition(
        &server,
        "ResiliencePolicy",
        "reviews",
        "Accepted once the lease expired",
        |c| c.1 == "Accepted",
    )
    .await;
    let lease = server
        .get("Lease", "bulwark-system", "bulwark-control-plane")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "cp-1");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_waits_for_an_api_server_that_is_down_at_start() {
    let mut server = ApiServer::start().await;
    for manifest in service("reviews", "127.0.0.21") {
        server.apply(&manifest);
    }
    server.stop().await;
    let kubeconfig = server.kubeconfig("cp-1");
    let starting = tokio::spawn(ControlPlane::start(settings(kubeconfig, "cp-1")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !starting.is_finished(),
        "the control plane must not serve before it has listed the cluster"
    );
    server.restart().await;
    let cp = tokio::time::timeout(DEADLINE, starting)
        .await
        .expect("the control plane starts once the API server is back")
        .unwrap()
        .expect("and starts cleanly");
    let agent = Agent::start(agent_settings(cp.grpc_addr(), "client", None))
        .await
        .expect("the agent starts");
    wait_for_agent(&agent, "the agent knows reviews", |c| {
        destination(c, &format!("reviews.{NAMESPACE}:80")).map(|_| ())
    })
    .await;
    agent.shutdown().await;
    cp.shutdown().await;
}

/// A control plane whose ServiceAccount token stops working says that it cannot
/// authenticate (not that another replica holds the lease), fails `/ready` with the
/// reason once a lease duration has passed, and is ready again when the token works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_fails_readiness_with_the_reason() {
    let server = ApiServer::start().await;
    for manifest in service("reviews", "127.0.0.21") {
        server.apply(&manifest);
    }
    let cp = ControlPlane::start(settings(server.kubeconfig("cp-1"), "cp-1"))
        .await
        .expect("the control plane starts");
    let admin = cp.admin_addr();
    let ready = || bulwark_tests::client::get(admin, "/ready", &[]);
    poll_until(DEADLINE, "the replica holds the lease", || async {
        server
            .get("Lease", "bulwark-system", "bulwark-control-plane")
            .filter(|l| l["spec"]["holderIdentity"] == "cp-1")
    })
    .await
    .unwrap();
    assert_eq!(ready().await.unwrap().status, 200);

    server.revoke_token("cp-1");
    let body = poll_until(DEADLINE, "/ready fails with the reason", || async {
        let response = ready().await.ok()?;
        (response.status == 503).then(|| response.text())
    })
    .await
    .unwrap();
    assert!(
        body.contains("refuses our credentials (401") && body.contains("ServiceAccount token"),
        "{body}"
    );

    server.restore_token("cp-1");
    poll_until(DEADLINE, "ready again once the token works", || async {
        (ready().await.ok()?.status == 200).then_some(())
    })
    .await
    .unwrap();
    cp.shutdown().await;
}
