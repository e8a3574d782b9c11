//! W3C trace context: with span export on, the agent continues the caller's
//! trace and hands the upstream a `traceparent` whose parent is the agent's span.
//! (Its own test binary: it installs the process-wide tracing subscriber.)

use bulwark_agent::Agent;
use bulwark_agent::telemetry::{self, LogFormat};
use bulwark_control_plane::ControlPlane;
use bulwark_tests::client::HttpClient;
use bulwark_tests::eventually::poll_until;
use bulwark_tests::harness::{agent_settings, control_plane_settings, loopback};
use bulwark_tests::mesh::Mesh;
use bulwark_tests::upstream::{Knobs, Reply, Upstream};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn the_agent_continues_the_callers_trace() {
    // Spans go to an OTLP endpoint that is not there: export fails quietly in
    // the background, which is what an agent must tolerate anyway.
    let telemetry = telemetry::init(
        "bulwark-agent-test",
        LogFormat::Text,
        Some("http://127.0.0.1:9".to_owned()),
    )
    .unwrap();
    let up = Upstream::start(loopback(), "reviews-0", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    let cp = ControlPlane::start(control_plane_settings(&mesh, loopback()))
        .await
        .unwrap();
    let agent = Agent::start_with(
        agent_settings(cp.grpc_addr(), "client", None),
        telemetry.propagation(),
    )
    .await
    .unwrap();
    let client = HttpClient::proxy(agent.outbound_addr());
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let reply: Reply = poll_until(std::time::Duration::from_secs(10), "reviews routed", || {
        let client = client.clone();
        let traceparent = traceparent.clone();
        async move {
            let rsp = client
                .get("http://reviews.test/", &[("traceparent", &traceparent)])
                .await
                .ok()?;
            (rsp.status == 200).then(|| rsp.json().ok()).flatten()
        }
    })
    .await
    .unwrap();
    let seen = reply.traceparent.expect("the upstream got a traceparent");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(parts[1], TRACE_ID, "same trace");
    assert_ne!(parts[2], CALLER_SPAN, "the parent is now the agent's span");
    assert_eq!(parts[3], "01", "still sampled");
    agent.shutdown().await;
    cp.shutdown().await;
}
