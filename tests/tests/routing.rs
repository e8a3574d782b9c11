//! Traffic splitting end to end: Gateway API HTTPRoutes (mesh profile) in the folder the
//! real control plane reads, pushed over gRPC to a real agent, and a client sending
//! through the agent's outbound listener to test upstreams that say who they are
//! (`x-upstream`).

use std::collections::BTreeMap;
use std::time::Duration;

use bulwark_tests::assert_eventually;
use bulwark_tests::canary::{self, Versions};
use bulwark_tests::client::HttpClient;
use bulwark_tests::eventually::poll_until;
use bulwark_tests::harness::Harness;
use bulwark_tests::upstream::Reply;
use http::Method;

const ORDERS: &str = "http://orders.test";

/// The HTTPRoute `orders-canary` on Service `orders` with these `rules` lines.
fn route(rules: &str) -> String {
    canary::route("HTTPRoute", "orders", rules)
}

fn split(v1: u32, v2: u32) -> String {
    route(&format!(
        "    - backendRefs:
        - {{name: orders-v1, port: 80, weight: {v1}}}
        - {{name: orders-v2, port: 80, weight: {v2}}}
"
    ))
}

/// Who answered `n` requests, by upstream name (`status NNN` for agent-made answers).
async fn tally(
    h: &Harness,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, u32> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let rsp = h
            .client
            .request(method.clone(), url, headers, "")
            .await
            .expect("the agent answers");
        let who = match rsp.upstream() {
            Some(name) => name.to_owned(),
            None => format!(
                "status {} {}",
                rsp.status.as_u16(),
                rsp.reason().unwrap_or("")
            ),
        };
        *seen.entry(who).or_default() += 1;
    }
    seen
}

async fn who(h: &Harness, method: Method, path: &str, headers: &[(&str, &str)]) -> String {
    let url = format!("{ORDERS}{path}");
    tally(h, method, &url, headers, 1)
        .await
        .into_keys()
        .next()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_90_10_split_lands_within_its_bound_and_is_counted_per_backend() {
    let versions = Versions::start("orders").await;
    let h = versions.harness(&split(90, 10)).await;
    let seen = tally(&h, Method::GET, &format!("{ORDERS}/orders"), &[], 400).await;
    let v1 = seen.get("orders-v1").copied().unwrap_or(0);
    let v2 = seen.get("orders-v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 400, "every request reached a backend: {seen:?}");
    // 90% of 400 is 360; allow 5 points either way (the agent's schedule is exact).
    assert!((340..=380).contains(&v1), "{seen:?}");
    assert!((20..=60).contains(&v2), "{seen:?}");
    assert!(
        !seen.contains_key("orders"),
        "the parent got nothing: {seen:?}"
    );

    let m = h.metrics().await;
    let count = |backend: &str| {
        m.get(
            "bulwark_route_requests_total",
            &[
                ("dst", "orders.test:80"),
                ("route", "test/orders-canary"),
                ("rule", "0"),
                ("backend", backend),
            ],
        )
    };
    assert_eq!(count("orders-v1.test:80"), f64::from(v1));
    assert_eq!(count("orders-v2.test:80"), f64::from(v2));
    // The backend's own destination metrics see the requests.
    assert!(
        m.get(
            "bulwark_requests_total",
            &[("dst", "orders-v2.test:80"), ("direction", "outbound")]
        ) >= f64::from(v2)
    );

    // /config shows the route, its weights and that both backends resolve.
    let shown = versions.routes(&h).await;
    assert_eq!(shown[0]["route"], "test/orders-canary");
    assert_eq!(shown[0]["backends"][0]["service"], "orders-v1.test:80");
    assert_eq!(shown[0]["backends"][0]["weight"], 90);
    assert_eq!(shown[0]["backends"][1]["resolved"], true);
    h.shutdown().await;
}

#[tokio::test]
async fn header_path_and_method_matches_pick_their_backend_and_the_rest_goes_to_the_parent() {
    let versions = Versions::start("orders").await;
    let h = versions
        .harness(&route(
            "    - matches:
        - headers: [{name: x-canary, value: \"true\"}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-tenant-id, value: canary-testers}]
      backendRefs: [{name: orders-v2, port: 80}]
    - matches:
        - path: {type: PathPrefix, value: /api}
          method: POST
        - path: {type: Exact, value: /health}
      backendRefs: [{name: orders-v1, port: 80}]
    - matches:
        - path: {type: RegularExpression, value: \"/items/[0-9]+\"}
      backendRefs: [{name: orders-v2, port: 80}]
",
        ))
        .await;
    let canary = [("x-canary", "true")];
    assert_eq!(
        who(&h, Method::GET, "/anything", &canary).await,
        "orders-v2"
    );
    // The rule's RequestHeaderModifier replaced the tenant header on the way.
    let rsp = h
        .client
        .get(
            &format!("{ORDERS}/anything"),
            &[("x-canary", "true"), ("x-tenant-id", "alice")],
        )
        .await
        .unwrap();
    let reply: Reply = rsp.json().unwrap();
    assert_eq!(reply.tenant_id.as_deref(), Some("canary-testers"));
    let rsp = h
        .client
        .get(&format!("{ORDERS}/other"), &[("x-tenant-id", "alice")])
        .await
        .unwrap();
    let reply: Reply = rsp.json().unwrap();
    assert_eq!(
        reply.tenant_id.as_deref(),
        Some("alice"),
        "other rules leave it"
    );
    assert_eq!(who(&h, Method::POST, "/api/orders", &[]).await, "orders-v1");
    assert_eq!(who(&h, Method::POST, "/api", &[]).await, "orders-v1");
    assert_eq!(
        who(&h, Method::POST, "/api/orders", &canary).await,
        "orders-v1",
        "a path match outranks a header-only match"
    );
    assert_eq!(who(&h, Method::GET, "/health", &[]).await, "orders-v1");
    assert_eq!(who(&h, Method::GET, "/items/42", &[]).await, "orders-v2");
    // Everything else keeps going to the parent Service.
    assert_eq!(who(&h, Method::GET, "/api/orders", &[]).await, "orders");
    assert_eq!(
        who(&h, Method::POST, "/apiary", &[]).await,
        "orders",
        "whole segments"
    );
    assert_eq!(who(&h, Method::GET, "/health/deep", &[]).await, "orders");
    assert_eq!(who(&h, Method::GET, "/items/abc", &[]).await, "orders");
    assert_eq!(
        who(&h, Method::GET, "/x", &[("x-canary", "false")]).await,
        "orders"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn an_unknown_backend_gets_500_for_its_share_and_the_parent_may_be_a_backend() {
    let versions = Versions::start("orders").await;
    let h = versions
        .harness(&route(
            "    - matches: [{path: {value: /half}}]
      backendRefs:
        - {name: orders, port: 80}
        - {name: orders-v3, port: 80}
    - matches: [{path: {value: /wrong-port}}]
      backendRefs: [{name: orders-v1, port: 8080}]
    - matches: [{path: {value: /off}}]
      backendRefs: [{name: orders-v1, port: 80, weight: 0}]
",
        ))
        .await;
    let seen = tally(&h, Method::GET, &format!("{ORDERS}/half"), &[], 20).await;
    assert_eq!(seen.get("orders"), Some(&10), "{seen:?}");
    assert_eq!(
        seen.get("status 500 backend-not-found"),
        Some(&10),
        "{seen:?}"
    );
    for path in ["/wrong-port", "/off"] {
        let rsp = h.client.get(&format!("{ORDERS}{path}"), &[]).await.unwrap();
        assert_eq!(rsp.status, 500, "{path}");
        assert_eq!(rsp.reason(), Some("backend-not-found"), "{path}");
        assert_eq!(rsp.upstream(), None);
    }
    // A gRPC caller gets a trailers-only status rather than a bare 500.
    let rsp = h
        .client
        .grpc(&format!("{ORDERS}/off"), &[], b"hello")
        .await
        .unwrap();
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.grpc_status(), Some(13), "INTERNAL");
    assert_eq!(rsp.reason(), Some("backend-not-found"));
    let shown = versions.routes(&h).await;
    let half = shown
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["matches"][0]["path"]["value"] == "/half")
        .unwrap();
    assert_eq!(half["backends"][1]["resolved"], false);
    assert_eq!(
        versions.ups[1].stats().total + versions.ups[2].stats().total,
        0,
        "nothing reached v1 or v2"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn an_edited_route_changes_the_split_without_dropping_requests() {
    let versions = Versions::start("orders").await;
    let h = versions.harness(&split(100, 0)).await;
    assert_eq!(
        tally(&h, Method::GET, ORDERS, &[], 10)
            .await
            .get("orders-v1"),
        Some(&10)
    );
    // Requests keep flowing while the route moves everything to v2.
    let client = h.client.clone();
    let traffic = tokio::spawn(async move {
        let mut statuses = BTreeMap::new();
        let mut last = String::new();
        for _ in 0..2000 {
            let rsp = client.get(ORDERS, &[]).await.expect("the agent answers");
            *statuses.entry(rsp.status.as_u16()).or_insert(0u32) += 1;
            last = rsp.upstream().unwrap_or_default().to_owned();
            if last == "orders-v2" {
                break;
            }
        }
        (statuses, last)
    });
    h.mesh.write("route.yaml", &split(0, 100)).unwrap();
    let (statuses, last) = traffic.await.unwrap();
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200],
        "{statuses:?}"
    );
    assert_eq!(last, "orders-v2", "the new split took effect");
    assert_eq!(
        tally(&h, Method::GET, ORDERS, &[], 10)
            .await
            .get("orders-v2"),
        Some(&10)
    );
    // And the route removed: back to the parent.
    h.mesh.remove("route.yaml").unwrap();
    assert_eventually!(who(&h, Method::GET, "/", &[]).await == "orders");
    h.shutdown().await;
}

#[tokio::test]
async fn an_invalid_route_keeps_the_last_good_one_and_is_reported_with_its_field() {
    let versions = Versions::start("orders").await;
    let h = versions.harness(&split(0, 1)).await;
    let version = h.config_version().await;
    h.mesh
        .write(
            "route.yaml",
            &route(
                "    - matches: [{path: {type: RegularExpression, value: \"/(oops\"}}]
      backendRefs: [{name: orders-v1, port: 80}]
",
            ),
        )
        .unwrap();
    let cp_admin = HttpClient::direct(h.control_plane_admin());
    let errors = poll_until(
        Duration::from_secs(10),
        "the control plane reports the bad route",
        || {
            let cp_admin = cp_admin.clone();
            async move {
                let text = cp_admin.get("/errors", &[]).await.ok()?.text();
                text.contains("route.yaml").then_some(text)
            }
        },
    )
    .await
    .unwrap();
    assert!(
        errors.contains("spec.rules[0].matches[0].path.value"),
        "{errors}"
    );
    assert!(errors.contains("invalid regular expression"), "{errors}");
    assert!(errors.contains("HTTPRoute test/orders-canary"), "{errors}");
    assert_eq!(
        h.config_version().await,
        version,
        "nothing reached the agent"
    );
    assert_eq!(
        tally(&h, Method::GET, ORDERS, &[], 5)
            .await
            .get("orders-v2"),
        Some(&5),
        "the last good route is in force"
    );

    // A filter Bulwark does not implement is refused rather than ignored.
    h.mesh
        .write(
            "route.yaml",
            &route(
                "    - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
      backendRefs: [{name: orders-v1, port: 80}]
",
            ),
        )
        .unwrap();
    assert_eventually!(
        cp_admin
            .get("/errors", &[])
            .await
            .unwrap()
            .text()
            .contains("filter URLRewrite is not supported")
    );
    assert_eq!(who(&h, Method::GET, "/", &[]).await, "orders-v2");
    h.shutdown().await;
}
