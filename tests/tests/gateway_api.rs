//! HTTPRoutes and GRPCRoutes from Kubernetes, against the kit's in-test API server and a real agent:
//! with the Gateway API CRDs installed the control plane watches HTTPRoutes and their
//! rules reach the agent; without them it does not touch the group, reports nothing and
//! keeps serving agents; CRDs installed after it started are found by re-discovery, and
//! CRDs deleted take their routes with them without a retry loop.

use std::path::PathBuf;
use std::time::Duration;

use bulwark_agent::Agent;
use bulwark_control_plane::{ControlPlane, Settings};
use bulwark_tests::apiserver::{ApiServer, assert_rbac_allows};
use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::{agent_settings, kubernetes_control_plane_settings};
use bulwark_tests::mesh::NAMESPACE;
use bulwark_tests::poll_until;
use serde_json::Value;

/// Generous: the machine is loaded, and watch retries back off.
const DEADLINE: Duration = Duration::from_secs(30);

/// API discovery of the Gateway API is asked again this often (30 s by default), so
/// that CRDs installed or deleted later are noticed well within [`DEADLINE`].
const RECHECK: Duration = Duration::from_millis(200);

fn settings(kubeconfig: PathBuf) -> Settings {
    kubernetes_control_plane_settings(kubeconfig, "cp-1", RECHECK)
}

fn apply_service(server: &ApiServer, name: &str, ip: &str) {
    server.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
         spec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
    ));
    server.apply(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-abcde, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n  - addresses: ['{ip}']\n    conditions: {{ready: true}}\n"
    ));
}

fn http_route(v2_weight: u32, extra: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: orders-canary, namespace: {NAMESPACE}, creationTimestamp: '2024-01-01T00:00:00Z'}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: orders}}]\n  rules:\n\
         \x20 - backendRefs:\n      - {{name: orders, port: 80, weight: 90}}\n\
         \x20     - {{name: orders-v2, port: 80, weight: {v2_weight}{extra}}}\n"
    )
}

async fn agent_config(agent: &Agent) -> Value {
    let admin = HttpClient::direct(agent.admin_addr());
    match admin.get("/config", &[]).await {
        Ok(rsp) => rsp.json().unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// The agent's routes on `orders.test:80`, once it knows the destination.
async fn orders_routes(agent: &Agent) -> Option<Value> {
    let config = agent_config(agent).await;
    config["config"]["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == format!("orders.{NAMESPACE}:80"))
        .map(|d| d["routes"].clone())
}

async fn wait_for_routes(agent: &Agent, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    poll_until(DEADLINE, what, || async {
        orders_routes(agent).await.filter(|r| check(r))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Our `status.parents` entry's conditions of route `orders-canary`, as
/// (type, status, reason, message, observedGeneration).
fn route_conditions(server: &ApiServer) -> Vec<(String, String, String, String, i64)> {
    conditions_of(server, "HTTPRoute")
}

/// [`route_conditions`] of the `orders-canary` of a route kind.
fn conditions_of(server: &ApiServer, kind: &str) -> Vec<(String, String, String, String, i64)> {
    let Some(route) = server.get(kind, NAMESPACE, "orders-canary") else {
        return Vec::new();
    };
    let text = |c: &Value, k: &str| c[k].as_str().unwrap_or_default().to_owned();
    route["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] == "bulwark.io/mesh")
        .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            (
                text(&c, "type"),
                text(&c, "status"),
                text(&c, "reason"),
                text(&c, "message"),
                c["observedGeneration"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

async fn wait_for_route_status(
    server: &ApiServer,
    what: &str,
    check: impl Fn(&[(String, String, String, String, i64)]) -> bool,
) -> Vec<(String, String, String, String, i64)> {
    poll_until(DEADLINE, what, || async {
        Some(route_conditions(server)).filter(|c| check(c))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; conditions: {:?}", route_conditions(server)))
}

fn v2_weight(routes: &Value) -> Option<u64> {
    routes[0]["backends"][1]["weight"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproutes_are_watched_when_the_gateway_api_is_installed() {
    let server = ApiServer::start().await;
    server.serve_gateway_api();
    server.apply(&http_route(10, ""));
    let (cp, agent) = start(&server).await;

    let routes = wait_for_routes(&agent, "the route reaches the agent", |r| {
        v2_weight(r) == Some(10)
    })
    .await;
    assert_eq!(routes[0]["route"], format!("{NAMESPACE}/orders-canary"));
    assert_eq!(
        routes[0]["backends"][1]["service"],
        format!("orders-v2.{NAMESPACE}:80")
    );
    assert_eq!(routes[0]["backends"][1]["resolved"], true);

    // The lease holder writes the route's status: accepted, every backend found.
    let conditions = wait_for_route_status(&server, "Accepted and ResolvedRefs", |c| {
        c.len() == 2 && c.iter().all(|c| c.1 == "True")
    })
    .await;
    assert_eq!(conditions[0].0, "Accepted");
    assert_eq!(conditions[1].2, "ResolvedRefs");

    // Edited in the cluster: the agent follows.
    server.apply(&http_route(30, ""));
    wait_for_routes(&agent, "the new weight reaches the agent", |r| {
        v2_weight(r) == Some(30)
    })
    .await;

    // An invalid version is reported and the last valid one stays in force.
    server.apply(&http_route(30, ", filters: [{type: RequestMirror}]"));
    let cp_admin = HttpClient::direct(cp.admin_addr());
    let errors = poll_until(DEADLINE, "the bad route is listed at /errors", || async {
        let text = cp_admin.get("/errors", &[]).await.ok()?.text();
        text.contains("HTTPRoute").then_some(text)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        errors.contains("spec.rules[0].backendRefs[1].filters"),
        "{errors}"
    );
    assert_eq!(
        v2_weight(&orders_routes(&agent).await.unwrap_or_default()),
        Some(30)
    );
    let conditions = wait_for_route_status(&server, "Accepted=False", |c| {
        c.first().is_some_and(|c| c.1 == "False")
    })
    .await;
    assert_eq!(conditions[0].2, "UnsupportedValue");
    assert!(
        conditions[0]
            .3
            .contains("spec.rules[0].backendRefs[1].filters")
            && conditions[0]
                .3
                .contains("the last accepted version stays in force"),
        "{conditions:?}"
    );

    // A backend that does not exist: accepted, but ResolvedRefs=False.
    server.apply(&http_route(30, "").replace("orders-v2", "orders-v3"));
    wait_for_route_status(&server, "BackendNotFound", |c| {
        c.len() == 2 && c[0].1 == "True" && c[1].2 == "BackendNotFound"
    })
    .await;

    // Deleted: the port has no routes again.
    assert!(server.delete("HTTPRoute", NAMESPACE, "orders-canary"));
    wait_for_routes(&agent, "the route is gone at the agent", |r| {
        r.as_array().is_some_and(Vec::is_empty)
    })
    .await;

    // Everything the control plane asked of the group is allowed by its RBAC rules.
    let gateway = server.gateway_requests();
    assert!(gateway.iter().any(|r| r.verb == "watch"), "{gateway:?}");
    assert!(
        gateway
            .iter()
            .any(|r| r.verb == "patch" && r.resource == "httproutes/status"),
        "{gateway:?}"
    );
    // One patch per change of verdict or generation (four of them), not a rewrite loop.
    let patches = gateway.iter().filter(|r| r.verb == "patch").count();
    assert!((4..=6).contains(&patches), "{patches} status patches");
    assert_rbac_allows(&gateway);
    agent.shutdown().await;
    cp.shutdown().await;
}

/// Serves `orders` and `orders-v2` from `server` and starts the control plane and an
/// agent on it.
async fn start(server: &ApiServer) -> (ControlPlane, Agent) {
    apply_service(server, "orders", "127.0.0.31");
    apply_service(server, "orders-v2", "127.0.0.32");
    let cp = ControlPlane::start(settings(server.kubeconfig("cp-1")))
        .await
        .expect("the control plane lists the cluster and starts");
    let agent = Agent::start(agent_settings(cp.grpc_addr(), "client", None))
        .await
        .expect("the agent starts");
    (cp, agent)
}

/// [`start`] on a `server` that does not serve the Gateway API (yet): the agent knows
/// `orders` and no routes.
async fn start_without_gateway_api(server: &ApiServer) -> (ControlPlane, Agent) {
    let (cp, agent) = start(server).await;
    let routes = wait_for_routes(&agent, "the agent knows orders", |_| true).await;
    assert_eq!(
        routes,
        Value::Array(Vec::new()),
        "no routes without the CRDs"
    );
    (cp, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_gateway_api_the_control_plane_stays_quiet_and_serves_agents() {
    let server = ApiServer::start().await;
    // Stored, but the group is not served: nothing should read it.
    server.apply(&http_route(10, ""));
    let (cp, agent) = start_without_gateway_api(&server).await;

    // Later changes still reach the agent: the source is synced without HTTPRoutes.
    apply_service(&server, "payments", "127.0.0.33");
    poll_until(DEADLINE, "payments reaches the agent", || async {
        let config = agent_config(&agent).await;
        config["config"]["destinations"]
            .as_array()?
            .iter()
            .any(|d| d["name"] == format!("payments.{NAMESPACE}:80"))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let cp_admin = HttpClient::direct(cp.admin_addr());
    let errors = cp_admin.get("/errors", &[]).await.unwrap().text();
    assert_eq!(errors.trim(), "[]", "nothing is reported: {errors}");
    let gateway = server.gateway_requests();
    assert!(
        gateway.is_empty(),
        "no list or watch of a group that is not there: {gateway:?}"
    );
    agent.shutdown().await;
    cp.shutdown().await;
}

/// The HTTPRoute list and watch requests served so far.
fn route_requests(server: &ApiServer) -> usize {
    server
        .gateway_requests()
        .iter()
        .filter(|r| matches!(r.verb.as_str(), "list" | "watch"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_crds_installed_later_are_found_and_deleted_ones_drop_their_routes() {
    let server = ApiServer::start().await;
    let (cp, agent) = start_without_gateway_api(&server).await;

    // The CRDs are installed, then a route is created: re-discovery finds the group.
    server.serve_gateway_api();
    server.apply(&http_route(10, ""));
    let routes = wait_for_routes(&agent, "the route reaches the agent", |r| {
        v2_weight(r) == Some(10)
    })
    .await;
    assert_eq!(routes[0]["route"], format!("{NAMESPACE}/orders-canary"));
    wait_for_route_status(&server, "Accepted and ResolvedRefs", |c| {
        c.len() == 2 && c.iter().all(|c| c.1 == "True")
    })
    .await;
    // Watched from now on: an edit reaches the agent like any other change.
    server.apply(&http_route(40, ""));
    wait_for_routes(&agent, "the edited route reaches the agent", |r| {
        v2_weight(r) == Some(40)
    })
    .await;

    // The CRDs are deleted (the stored route stays behind, and no DELETED event comes):
    // the control plane drops the route itself.
    server.stop_serving_gateway_api();
    wait_for_routes(&agent, "the route is dropped at the agent", |r| {
        r.as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let cp_admin = HttpClient::direct(cp.admin_addr());
    let errors = cp_admin.get("/errors", &[]).await.unwrap().text();
    assert_eq!(
        errors.trim(),
        "[]",
        "a missing group is not an error: {errors}"
    );
    // Back to asking discovery, not to retrying a watch that gets 404s.
    let requests = route_requests(&server);
    let discoveries = server.gateway_api_discoveries();
    poll_until(DEADLINE, "three more discoveries", || async {
        (server.gateway_api_discoveries() >= discoveries + 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        route_requests(&server),
        requests,
        "no HTTPRoute list or watch while discovery says the group is gone"
    );

    // Installed again: the route is back.
    server.serve_gateway_api();
    wait_for_routes(&agent, "the route is back at the agent", |r| {
        v2_weight(r) == Some(40)
    })
    .await;
    assert_rbac_allows(&server.gateway_requests());
    agent.shutdown().await;
    cp.shutdown().await;
}

fn grpc_route(method: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
         metadata: {{name: orders-canary, namespace: {NAMESPACE}}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: orders, port: 80}}]\n  rules:\n\
         \x20 - matches: [{{method: {{service: shop.Orders, method: {method}}}}}]\n\
         \x20   backendRefs: [{{name: orders-v2, port: 80}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcroutes_are_watched_reach_the_agent_and_get_status() {
    let server = ApiServer::start().await;
    server.serve_gateway_api();
    server.apply(&grpc_route("Place"));
    let (cp, agent) = start(&server).await;

    let path = |routes: &Value| {
        routes[0]["matches"][0]["path"]["value"]
            .as_str()
            .map(str::to_owned)
    };
    let routes = wait_for_routes(&agent, "the GRPCRoute reaches the agent", |r| {
        path(r).as_deref() == Some("/shop.Orders/Place")
    })
    .await;
    assert_eq!(
        routes[0]["route"],
        format!("GRPCRoute {NAMESPACE}/orders-canary")
    );
    assert_eq!(
        routes[0]["backends"][0]["service"],
        format!("orders-v2.{NAMESPACE}:80")
    );
    assert_eq!(routes[0]["backends"][0]["resolved"], true);

    let accepted = |c: &[(String, String, String, String, i64)]| {
        c.len() == 2 && c.iter().all(|c| c.1 == "True")
    };
    poll_until(
        DEADLINE,
        "the GRPCRoute is Accepted and ResolvedRefs",
        || async { Some(()).filter(|()| accepted(&conditions_of(&server, "GRPCRoute"))) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", conditions_of(&server, "GRPCRoute")));

    // An edit reaches the agent; an invalid version is refused by field path with a
    // status, and the last valid one stays in force.
    server.apply(&grpc_route("Cancel"));
    wait_for_routes(&agent, "the edited GRPCRoute reaches the agent", |r| {
        path(r).as_deref() == Some("/shop.Orders/Cancel")
    })
    .await;
    server.apply(&grpc_route("'Can cel'"));
    let refused = poll_until(DEADLINE, "the bad GRPCRoute is not accepted", || async {
        conditions_of(&server, "GRPCRoute")
            .into_iter()
            .next()
            .filter(|c| c.1 == "False")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refused.2, "UnsupportedValue");
    assert!(
        refused.3.contains("spec.rules[0].matches[0].method.method")
            && refused
                .3
                .contains("the last accepted version stays in force"),
        "{refused:?}"
    );
    assert_eq!(
        path(&orders_routes(&agent).await.unwrap_or_default()).as_deref(),
        Some("/shop.Orders/Cancel")
    );

    assert!(server.delete("GRPCRoute", NAMESPACE, "orders-canary"));
    wait_for_routes(&agent, "the GRPCRoute is gone at the agent", |r| {
        r.as_array().is_some_and(Vec::is_empty)
    })
    .await;

    let gateway = server.gateway_requests();
    for (resource, verb) in [("grpcroutes", "watch"), ("grpcroutes/status", "patch")] {
        assert!(
            gateway
                .iter()
                .any(|r| r.resource == resource && r.verb == verb),
            "no {verb} of {resource}: {gateway:?}"
        );
    }
    assert_rbac_allows(&gateway);
    agent.shutdown().await;
    cp.shutdown().await;
}
