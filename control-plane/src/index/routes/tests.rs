use bulwark_proto::v1 as proto;

use crate::index::Index;
use crate::metrics::Metrics;
use crate::testing::model;
use std::sync::Arc;

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: orders, namespace: shop}\n\
    spec: {ports: [{name: http, port: 80}, {name: grpc, port: 9090}]}\n\
    ---\napiVersion: v1\nkind: Service\nmetadata: {name: orders-v2, namespace: shop}\n\
    spec: {ports: [{name: http, port: 80}]}\n";

fn route(name: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: shop, creationTimestamp: '{created}'}}\nspec:\n{spec}"
    )
}

fn port_rules(yaml: &str, port: usize) -> Vec<proto::HttpRouteRule> {
    let index = Index::new(1, &model(yaml), Arc::new(Metrics::new()));
    let state = index.state();
    let orders = state
        .outbound
        .services
        .iter()
        .find(|s| s.name == "orders")
        .unwrap();
    orders.ports[port].routes.clone()
}

/// Each rule as `route#rule path-kind:value`.
fn summary(rules: &[proto::HttpRouteRule]) -> Vec<String> {
    rules
        .iter()
        .map(|r| {
            let m = &r.matches[0];
            let p = m.path.as_ref().unwrap();
            let mut s = format!("{}#{} {}:{}", r.source, r.rule_index, p.r#type, p.value);
            if !m.method.is_empty() {
                s.push_str(&format!(" {}", m.method));
            }
            if !m.headers.is_empty() {
                s.push_str(&format!(" h{}", m.headers.len()));
            }
            s
        })
        .collect()
}

#[test]
fn rules_of_all_routes_on_a_port_are_ordered_by_the_gateway_api_precedence() {
    let parent = "  parentRefs: [{group: '', kind: Service, name: orders}]\n";
    let yaml = format!(
        "{SERVICES}{}{}",
        route(
            "b-newer",
            "2024-02-01T00:00:00Z",
            &format!(
                "{parent}  rules:\n  - backendRefs: [{{name: orders-v2, port: 80}}]\n\
                 \x20 - matches: [{{path: {{value: /api}}}}, {{path: {{value: /api/v2}}}}]\n\
                 \x20 - matches: [{{path: {{value: /api}}, method: GET}}]\n\
                 \x20 - matches: [{{path: {{value: /api}}, method: GET, headers: [{{name: a, value: b}}]}}]\n"
            )
        ),
        route(
            "a-older",
            "2024-01-01T00:00:00Z",
            &format!(
                "{parent}  rules:\n  - matches: [{{path: {{type: Exact, value: /api}}}}]\n\
                 \x20 - matches: [{{path: {{value: /api}}}}]\n\
                 \x20 - matches: [{{path: {{type: RegularExpression, value: '/x.*'}}}}]\n"
            )
        ),
    );
    // Path types on the wire: 0 exact, 1 prefix, 2 regex.
    assert_eq!(
        summary(&port_rules(&yaml, 0)),
        [
            "shop/a-older#0 0:/api",
            "shop/a-older#2 2:/x.*",
            "shop/b-newer#1 1:/api/v2",
            "shop/b-newer#3 1:/api GET h1",
            "shop/b-newer#2 1:/api GET",
            "shop/a-older#1 1:/api",
            "shop/b-newer#1 1:/api",
            "shop/b-newer#0 1:/",
        ]
        .map(String::from)
    );
}

#[test]
fn equal_matches_go_to_the_older_route_then_by_name() {
    let parent = "  parentRefs: [{group: '', kind: Service, name: orders}]\n  rules: [{}]\n";
    let yaml = format!(
        "{SERVICES}{}{}{}",
        route("c", "2024-01-01T00:00:00Z", parent),
        route("b", "2024-03-01T00:00:00Z", parent),
        route("a", "2024-03-01T00:00:00Z", parent),
    );
    let order: Vec<_> = port_rules(&yaml, 0).into_iter().map(|r| r.source).collect();
    assert_eq!(order, ["shop/c", "shop/a", "shop/b"]);
}

#[test]
fn a_parent_port_narrows_the_route_and_no_backends_means_the_parent() {
    let yaml = format!(
        "{SERVICES}{}",
        route(
            "grpc-only",
            "2024-01-01T00:00:00Z",
            "  parentRefs: [{group: '', kind: Service, name: orders, port: 9090}]\n  rules: [{}]\n"
        )
    );
    assert!(port_rules(&yaml, 0).is_empty(), "port 80 is untouched");
    let rules = port_rules(&yaml, 1);
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].backends,
        [proto::HttpBackend {
            namespace: "shop".into(),
            name: "orders".into(),
            port: 9090,
            weight: 1,
        }]
    );
}

#[test]
fn unresolvable_backends_are_still_sent_and_diagnosed() {
    let yaml = format!(
        "{SERVICES}{}",
        route(
            "canary",
            "2024-01-01T00:00:00Z",
            "  parentRefs: [{group: '', kind: Service, name: orders}]\n  rules:\n\
             \x20 - backendRefs: [{name: orders-v2, port: 80, weight: 9}, {name: orders-v3, port: 80}, \
             {name: orders-v2, port: 81}]\n"
        )
    );
    let rules = port_rules(&yaml, 0);
    assert_eq!(
        rules[0].backends.len(),
        3,
        "the agent answers their share with 500"
    );
    let diagnostics = crate::index::diagnose(&model(&yaml));
    let text: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("orders-v3 port 80 does not exist")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("orders-v2 port 81 does not exist")),
        "{text:?}"
    );
}

fn grpc_route(name: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
         metadata: {{name: {name}, namespace: shop, creationTimestamp: '{created}'}}\nspec:\n{spec}"
    )
}

#[test]
fn grpc_and_http_routes_on_one_port_rank_together_by_their_paths() {
    let parent = "  parentRefs: [{group: '', kind: Service, name: orders, port: 9090}]\n";
    let yaml = format!(
        "{SERVICES}{}{}",
        grpc_route(
            "greeter",
            "2024-02-01T00:00:00Z",
            &format!(
                "{parent}  rules:\n  - backendRefs: [{{name: orders-v2, port: 80, weight: 9}}]\n\
                 \x20 - matches: [{{method: {{service: a.Greeter, method: SayHello}}}}]\n\
                 \x20 - matches: [{{method: {{service: a.Greeter}}}}]\n\
                 \x20 - matches: [{{method: {{method: Ping}}, headers: [{{name: x-canary, value: 'on'}}]}}]\n"
            )
        ),
        route(
            "greeter",
            "2024-01-01T00:00:00Z",
            &format!("{parent}  rules:\n  - matches: [{{path: {{value: /a.Greeter}}}}]\n"),
        ),
    );
    // Path types on the wire: 0 exact, 1 prefix, 2 regex. The exact method first, then
    // the regex (method only), then the service prefixes (the older HTTPRoute wins the
    // equal one), then everything.
    assert_eq!(
        summary(&port_rules(&yaml, 1)),
        [
            "GRPCRoute shop/greeter#1 0:/a.Greeter/SayHello",
            "GRPCRoute shop/greeter#3 2:/[^/]+/Ping h1",
            "shop/greeter#0 1:/a.Greeter",
            "GRPCRoute shop/greeter#2 1:/a.Greeter",
            "GRPCRoute shop/greeter#0 1:/",
        ]
    );
    let rules = port_rules(&yaml, 1);
    assert_eq!(rules[4].backends[0].name, "orders-v2");
    assert_eq!(rules[4].backends[0].weight, 9);
    // The parent port narrows the route: port 80 carries none of it.
    assert!(port_rules(&yaml, 0).is_empty());
}
