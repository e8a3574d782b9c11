//! Traffic splitting of gRPC services end to end: Gateway API GRPCRoutes (mesh
//! profile) in the folder the real control plane reads, pushed over gRPC to a real
//! agent, and real gRPC calls over h2c through the agent's outbound listener to test
//! upstreams that say who they are (`x-upstream`).

use std::collections::BTreeMap;

use bulwark_tests::HttpClient;
use bulwark_tests::canary::{self, Versions};
use bulwark_tests::harness::Harness;

/// The GRPCRoute `greeter-canary` on Service `greeter` with these `rules` lines.
fn route(rules: &str) -> String {
    canary::route("GRPCRoute", "greeter", rules)
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
    let versions = Versions::start("greeter").await;
    let h = versions
        .harness(&route(
            "    - backendRefs:
        - {name: greeter-v1, port: 80, weight: 90}
        - {name: greeter-v2, port: 80, weight: 10}
",
        ))
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
    let versions = Versions::start("greeter").await;
    let h = versions
        .harness(&route(
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
        ))
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
