//! Traffic splitting of gRPC services end to end: Gateway API GRPCRoutes (mesh
//! profile) in the folder the real control plane reads, pushed over gRPC to a real
//! agent, and real gRPC calls over h2c through the agent's outbound listener to test
//! upstreams that say who they are (`x-upstream`).

use std::collections::BTreeMap;

use bulwark_tests::HttpClient;
use bulwark_tests::assert_eventually;
use bulwark_tests::harness::{Harness, loopback};
use bulwark_tests::mesh::{Mesh, NAMESPACE};
use bulwark_tests::upstream::{Knobs, Upstream};

/// The parent `greeter` and its two versions, each a Service with one upstream.
struct Versions {
    ups: Vec<Upstream>,
}

impl Versions {
    async fn start() -> Versions {
        let mut ups = Vec::new();
        for name in ["greeter", "greeter-v1", "greeter-v2"] {
            ups.push(
                Upstream::start(loopback(), name, Knobs::healthy())
                    .await
                    .expect("upstream starts"),
            );
        }
        Versions { ups }
    }

    fn mesh(&self) -> Mesh {
        Mesh::with_services(self.ups.iter().map(|u| (u.name(), vec![u.addr()])))
            .expect("a temporary mesh folder")
    }
}

/// A GRPCRoute named `greeter-canary` on Service `greeter` with these `rules` lines.
fn route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: greeter-canary
  namespace: {NAMESPACE}
spec:
  parentRefs:
    - group: \"\"
      kind: Service
      name: greeter
      port: 80
  rules:
{rules}"
    )
}

/// The routes the agent has in force on `greeter.test:80`.
async fn routes(h: &Harness) -> serde_json::Value {
    let config = h.config().await;
    config["config"]["destinations"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == "greeter.test:80"))
        .map(|d| d["routes"].clone())
        .unwrap_or_default()
}

async fn start(versions: &Versions, route_yaml: &str) -> Harness {
    let mesh = versions.mesh();
    mesh.write("route.yaml", route_yaml)
        .expect("the mesh folder is writable");
    let h = Harness::start(mesh).await;
    assert_eventually!(routes(&h).await.as_array().is_some_and(|r| !r.is_empty()));
    h
}

/// One gRPC call over h2c through the agent: who answered (or the agent's gRPC status
/// and reason).
async fn call(h: &Harness, method: &str, metadata: &[(&str, &str)]) -> String {
    let grpc = HttpClient::h2(h.agent.outbound_addr());
    let rsp = grpc
        .grpc(&format!("http://greeter.test/{method}"), metadata, b"hello")
        .await
        .expect("the agent answers");
    match rsp.upstream() {
        Some(name) => {
            assert_eq!(rsp.grpc_status(), Some(0), "{name} answered {method}");
            name.to_owned()
        }
        None => format!(
            "grpc-status {} {}",
            rsp.grpc_status().unwrap_or(u32::MAX),
            rsp.reason().unwrap_or("")
        ),
    }
}

#[tokio::test]
async fn a_90_10_split_of_grpc_calls_lands_within_its_bound() {
    let versions = Versions::start().await;
    let h = start(
        &versions,
        &route(
            "    - backendRefs:
        - {name: greeter-v1, port: 80, weight: 90}
        - {name: greeter-v2, port: 80, weight: 10}
",
        ),
    )
    .await;
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..400 {
        *seen
            .entry(call(&h, "helloworld.Greeter/SayHello", &[]).await)
            .or_default() += 1;
    }
    let v1 = seen.get("greeter-v1").copied().unwrap_or(0);
    let v2 = seen.get("greeter-v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 400, "every call reached a backend: {seen:?}");
    // 90% of 400 is 360; allow 5 points either way (the agent's schedule is exact).
    assert!((340..=380).contains(&v1), "{seen:?}");
    assert!((20..=60).contains(&v2), "{seen:?}");

    let m = h.metrics().await;
    let count = |backend: &str| {
        m.get(
            "bulwark_route_requests_total",
            &[
                ("dst", "greeter.test:80"),
                ("route", "GRPCRoute test/greeter-canary"),
                ("rule", "0"),
                ("backend", backend),
            ],
        )
    };
    assert_eq!(count("greeter-v2.test:80"), f64::from(v2));
    h.shutdown().await;
}

#[tokio::test]
async fn method_and_header_matches_pick_their_backend_and_the_rest_goes_to_the_parent() {
    let versions = Versions::start().await;
    let h = start(
        &versions,
        &route(
            "    - matches:
        - method: {service: helloworld.Greeter, method: SayHelloAgain}
      backendRefs: [{name: greeter-v2, port: 80}]
    - matches:
        - headers: [{name: x-canary, value: \"true\"}]
      backendRefs: [{name: greeter-v1, port: 80}]
    - matches:
        - method: {method: Ping}
      backendRefs: [{name: greeter-v9, port: 80}]
",
        ),
    )
    .await;
    // The method match sends one method to v2, whatever the metadata.
    for metadata in [&[][..], &[("x-canary", "true")][..]] {
        assert_eq!(
            call(&h, "helloworld.Greeter/SayHelloAgain", metadata).await,
            "greeter-v2"
        );
    }
    // The header match takes the other methods that carry it.
    assert_eq!(
        call(&h, "helloworld.Greeter/SayHello", &[("x-canary", "true")]).await,
        "greeter-v1"
    );
    assert_eq!(
        call(&h, "helloworld.Greeter/SayHello", &[("x-canary", "no")]).await,
        "greeter"
    );
    // Nothing matches: the parent Service.
    assert_eq!(
        call(&h, "helloworld.Greeter/SayHello", &[]).await,
        "greeter"
    );
    assert_eq!(
        call(&h, "other.Service/SayHelloAgain", &[]).await,
        "greeter"
    );
    // A backend that does not exist: a gRPC status the client can read, not a bare 500.
    assert_eq!(
        call(&h, "grpc.health.v1.Health/Ping", &[]).await,
        "grpc-status 13 backend-not-found"
    );
    h.shutdown().await;
}
