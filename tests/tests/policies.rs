//! Each policy, end to end: a client → the agent's outbound listener → test
//! upstreams, with the real control plane pushing the config over gRPC.

use std::time::Duration;

use bulwark_tests::assert_eventually;
use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::{Harness, loopback, resilience_policy};
use bulwark_tests::mesh::Mesh;
use bulwark_tests::upstream::{Knobs, Upstream};
use http::Method;

async fn upstream(name: &str, knobs: Knobs) -> Upstream {
    Upstream::start(loopback(), name, knobs)
        .await
        .expect("upstream starts")
}

const REVIEWS: &str = "http://reviews.test/";

/// Starts a control plane and an agent over `mesh` with a ResiliencePolicy on
/// `service` whose `spec` is given as YAML lines below `spec:`.
async fn start_with_policy(mesh: Mesh, service: &str, spec: &str) -> Harness {
    mesh.write_policy("policy.yaml", &resilience_policy(service, service, spec))
        .expect("the mesh folder is writable");
    Harness::start(mesh).await
}

#[tokio::test]
async fn breaker_opens_after_n_failures_fails_fast_and_closes_after_one_probe() {
    let up = upstream("reviews-0", Knobs::failing(1.0, 500)).await;
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    let h = start_with_policy(mesh, "reviews", "  circuitBreaker:\n    consecutiveFailures: 3\n    openDuration: 1s\n    maxOpenDuration: 10s\n").await;

    for _ in 0..3 {
        let rsp = h.client.get(REVIEWS, &[]).await.unwrap();
        assert_eq!(rsp.status, 500, "the upstream's own failure comes through");
        assert_eq!(rsp.reason(), None);
    }
    // Open: fails fast, and the upstream sees nothing more.
    for _ in 0..5 {
        let rsp = h.client.get(REVIEWS, &[]).await.unwrap();
        assert_eq!(rsp.status, 503);
        assert_eq!(rsp.reason(), Some("circuit-open"));
        assert!(rsp.header("retry-after").is_some());
    }
    assert_eq!(up.stats().total, 3, "no request reaches an open endpoint");
    let m = h.metrics().await;
    assert_eq!(
        m.get("bulwark_breaker_state", &[("dst", "reviews.test:80")]),
        1.0
    );
    assert_eq!(
        m.get("bulwark_breaker_trips_total", &[("dst", "reviews.test:80")]),
        1.0
    );

    // The endpoint recovers; after the open period exactly one probe goes
    // through, succeeds, and the breaker closes.
    up.set_knobs(Knobs::healthy());
    assert_eventually!(h.client.get(REVIEWS, &[]).await.unwrap().status == 200);
    assert_eq!(
        up.stats().total,
        4,
        "exactly one probe reached the endpoint"
    );
    for _ in 0..5 {
        assert_eq!(h.client.get(REVIEWS, &[]).await.unwrap().status, 200);
    }
    let m = h.metrics().await;
    assert_eq!(
        m.get("bulwark_breaker_state", &[("dst", "reviews.test:80")]),
        0.0
    );
    h.shutdown().await;
}

#[tokio::test]
async fn failed_probe_reopens_the_breaker() {
    let up = upstream("reviews-0", Knobs::failing(1.0, 500)).await;
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    let h = start_with_policy(mesh, "reviews", "  circuitBreaker:\n    consecutiveFailures: 2\n    openDuration: 500ms\n    maxOpenDuration: 10s\n").await;
    for _ in 0..2 {
        assert_eq!(h.client.get(REVIEWS, &[]).await.unwrap().status, 500);
    }
    // The probe after the open period fails: the upstream sees it, and the
    // breaker opens again (a second trip) instead of letting traffic through.
    assert_eventually!(
        up.stats().total == 3 || {
            let _ = h.client.get(REVIEWS, &[]).await;
            false
        }
    );
    let rsp = h.client.get(REVIEWS, &[]).await.unwrap();
    assert_eq!(rsp.reason(), Some("circuit-open"));
    let m = h.metrics().await;
    assert_eq!(
        m.get("bulwark_breaker_trips_total", &[("dst", "reviews.test:80")]),
        2.0
    );
    h.shutdown().await;
}

#[tokio::test]
async fn all_endpoints_open_fails_fast_and_one_open_endpoint_is_skipped() {
    let bad = upstream("reviews-bad", Knobs::failing(1.0, 500)).await;
    let good = upstream("reviews-good", Knobs::healthy()).await;
    let mesh = Mesh::with_services([("reviews", vec![bad.addr(), good.addr()])]).unwrap();
    let h = start_with_policy(mesh, "reviews", "  circuitBreaker:\n    consecutiveFailures: 2\n    openDuration: 1m\n    maxOpenDuration: 1m\n  loadBalancer:\n    strategy: RoundRobin\n").await;
    // Round robin sends every other request to the bad endpoint until it trips.
    for _ in 0..6 {
        let _ = h.client.get(REVIEWS, &[]).await.unwrap();
    }
    assert_eq!(
        bad.stats().total,
        2,
        "the bad endpoint is skipped once open"
    );
    for _ in 0..10 {
        let rsp = h.client.get(REVIEWS, &[]).await.unwrap();
        assert_eq!(rsp.status, 200);
        assert_eq!(rsp.upstream(), Some("reviews-good"));
    }
    h.shutdown().await;
}

#[tokio::test]
async fn retries_land_on_a_healthy_endpoint() {
    let bad = upstream("reviews-bad", Knobs::failing(1.0, 503)).await;
    let good = upstream("reviews-good", Knobs::healthy()).await;
    let mesh = Mesh::with_services([("reviews", vec![bad.addr(), good.addr()])]).unwrap();
    let h = start_with_policy(mesh, "reviews", "  retry:\n    attempts: 2\n    retryOn: [gateway-error]\n    backoff:\n      base: 1ms\n      max: 5ms\n  loadBalancer:\n    strategy: RoundRobin\n").await;
    for _ in 0..20 {
        let rsp = h.client.get(REVIEWS, &[]).await.unwrap();
        assert_eq!(
            rsp.status, 200,
            "every request recovers on the healthy endpoint"
        );
        assert_eq!(rsp.upstream(), Some("reviews-good"));
    }
    let failed_tries = bad.stats().total;
    assert!(
        failed_tries >= 5,
        "round robin sent tries to the bad endpoint: {failed_tries}"
    );
    assert_eq!(good.stats().total, 20);
    let m = h.metrics().await;
    assert_eq!(
        m.get("bulwark_retries_total", &[("dst", "reviews.test:80")]),
        failed_tries as f64
    );
    assert_eq!(
        m.get(
            "bulwark_retries_recovered_total",
            &[("dst", "reviews.test:80")]
        ),
        failed_tries as f64
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_retry_budget_caps_retries_during_an_outage() {
    let bad = upstream("reviews-bad", Knobs::failing(1.0, 503)).await;
    let mesh = Mesh::with_services([("reviews", vec![bad.addr()])]).unwrap();
    // No ratio, 1 retry per second of floor over a 10s window: 10 retries at most.
    let h = start_with_policy(mesh, "reviews", "  retry:\n    attempts: 3\n    retryOn: [gateway-error]\n    backoff:\n      base: 1ms\n      max: 1ms\n    budget:\n      ratio: 0\n      minPerSecond: 1\n      window: 10s\n").await;
    for _ in 0..40 {
        assert_eq!(h.client.get(REVIEWS, &[]).await.unwrap().status, 503);
    }
    let m = h.metrics().await;
    let retries = m.get("bulwark_retries_total", &[("dst", "reviews.test:80")]);
    assert!(
        retries <= 10.0,
        "the budget allows 10 retries, saw {retries}"
    );
    assert!(
        retries >= 9.0,
        "the floor's retries were used, saw {retries}"
    );
    assert_eq!(bad.stats().total as f64, 40.0 + retries);
    assert!(
        m.get(
            "bulwark_retry_budget_exhausted_total",
            &[("dst", "reviews.test:80")]
        ) >= 29.0
    );
    h.shutdown().await;
}

#[tokio::test]
async fn post_is_not_retried_unless_the_policy_allows_it() {
    let bad = upstream("reviews-bad", Knobs::failing(1.0, 503)).await;
    let mesh = Mesh::with_services([("reviews", vec![bad.addr()])]).unwrap();
    let policy = |non_idempotent: bool| {
        resilience_policy(
            "reviews",
            "reviews",
            &format!(
                "  retry:\n    attempts: 3\n    retryOn: [gateway-error]\n    nonIdempotent: {non_idempotent}\n    backoff:\n      base: 1ms\n      max: 1ms\n"
            ),
        )
    };
    mesh.write_policy("policy.yaml", &policy(false)).unwrap();
    let h = Harness::start(mesh).await;
    let rsp = h
        .client
        .request(Method::POST, REVIEWS, &[], "order")
        .await
        .unwrap();
    assert_eq!(rsp.status, 503);
    assert_eq!(bad.stats().total, 1, "a POST goes once");
    let rsp = h
        .client
        .request(Method::PUT, REVIEWS, &[], "order")
        .await
        .unwrap();
    assert_eq!(rsp.status, 503);
    assert_eq!(
        bad.stats().total,
        4,
        "an idempotent PUT is retried, body and all"
    );

    let version = h.config_version().await;
    h.mesh.write_policy("policy.yaml", &policy(true)).unwrap();
    h.wait_version_above(version).await;
    let _ = h
        .client
        .request(Method::POST, REVIEWS, &[], "order")
        .await
        .unwrap();
    assert_eq!(
        bad.stats().total,
        7,
        "with nonIdempotent: true a POST is retried too"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_bulkhead_keeps_a_hanging_service_from_starving_a_healthy_one() {
    let hanging = upstream("payments-0", Knobs::hanging()).await;
    let healthy = upstream("catalog-0", Knobs::healthy()).await;
    let mesh = Mesh::with_services([
        ("payments", vec![hanging.addr()]),
        ("catalog", vec![healthy.addr()]),
    ])
    .unwrap();
    let h = start_with_policy(
        mesh,
        "payments",
        "  bulkhead:\n    maxConcurrentRequests: 4\n    maxPending: 2\n    queueTimeout: 50ms\n",
    )
    .await;

    // Twenty concurrent calls to the hanging service: four hold the slots,
    // two queue and time out, the rest are rejected at once.
    let slow = HttpClient::proxy(h.agent.outbound_addr()).with_timeout(Duration::from_secs(60));
    let mut hung = Vec::new();
    for _ in 0..20 {
        let slow = slow.clone();
        hung.push(tokio::spawn(async move {
            slow.get("http://payments.test/", &[]).await
        }));
    }
    assert_eventually!(hanging.stats().in_flight == 4);
    let m = h.metrics().await;
    assert_eq!(
        m.get("bulwark_bulkhead_in_flight", &[("dst", "payments.test:80")]),
        4.0
    );

    // Meanwhile the healthy service answers every call.
    for _ in 0..50 {
        let rsp = h.client.get("http://catalog.test/", &[]).await.unwrap();
        assert_eq!(rsp.status, 200);
    }
    assert_eventually!(
        h.metrics().await.get(
            "bulwark_bulkhead_rejected_total",
            &[("dst", "payments.test:80")]
        ) == 16.0
    );
    assert_eq!(
        hanging.stats().in_flight,
        4,
        "the hanging service never got more than its share"
    );
    let finished = hung.iter().filter(|t| t.is_finished()).count();
    assert_eq!(
        finished, 16,
        "the rejected calls were answered, the four in flight still hang"
    );
    for task in hung {
        task.abort();
    }
    h.shutdown().await;
}

#[tokio::test]
async fn request_timeout_answers_504() {
    let hanging = upstream("payments-0", Knobs::hanging()).await;
    let mesh = Mesh::with_services([("payments", vec![hanging.addr()])]).unwrap();
    let h = start_with_policy(mesh, "payments", "  timeout:\n    request: 200ms\n").await;
    let rsp = h.client.get("http://payments.test/", &[]).await.unwrap();
    assert_eq!(rsp.status, 504);
    assert_eq!(rsp.reason(), Some("timeout"));
    h.shutdown().await;
}

#[tokio::test]
async fn per_try_timeout_moves_the_retry_to_another_endpoint() {
    let hanging = upstream("reviews-hang", Knobs::hanging()).await;
    let good = upstream("reviews-good", Knobs::healthy()).await;
    let mesh = Mesh::with_services([("reviews", vec![hanging.addr(), good.addr()])]).unwrap();
    let h = start_with_policy(mesh, "reviews", "  timeout:\n    request: 5s\n  retry:\n    attempts: 2\n    perTryTimeout: 500ms\n    retryOn: [gateway-error]\n    backoff:\n      base: 1ms\n      max: 1ms\n  loadBalancer:\n    strategy: RoundRobin\n").await;
    for _ in 0..4 {
        let rsp = h.client.get(REVIEWS, &[]).await.unwrap();
        assert_eq!(rsp.status, 200);
        assert_eq!(rsp.upstream(), Some("reviews-good"));
    }
    assert!(hanging.stats().total >= 1);
    h.shutdown().await;
}

#[tokio::test]
async fn agent_made_errors_say_why() {
    // A closed port: connect fails.
    let closed = {
        let l = std::net::TcpListener::bind(loopback()).unwrap();
        l.local_addr().unwrap()
    };
    let mesh = Mesh::with_services([("down", vec![closed]), ("empty", vec![])]).unwrap();
    let h = Harness::start(mesh).await;

    let rsp = h.client.get("http://down.test/", &[]).await.unwrap();
    assert_eq!(rsp.status, 502);
    assert_eq!(rsp.reason(), Some("connect-failed"));

    let rsp = h.client.get("http://empty.test/", &[]).await.unwrap();
    assert_eq!(rsp.status, 503);
    assert_eq!(rsp.reason(), Some("no-endpoints"));

    // A request back to the agent's own listener, by address or as localhost,
    // and a tunnel to it, are loops.
    let port = h.agent.outbound_addr().port();
    for url in [
        format!("http://{}/", h.agent.outbound_addr()),
        format!("http://localhost:{port}/"),
    ] {
        let rsp = h.client.get(&url, &[]).await.unwrap();
        assert_eq!(rsp.status, 508, "{url}");
        assert_eq!(rsp.reason(), Some("loop-detected"));
    }
    let rsp = h
        .client
        .request(
            Method::CONNECT,
            &format!("http://localhost:{port}"),
            &[],
            "",
        )
        .await
        .unwrap();
    assert_eq!(rsp.status, 508, "a CONNECT to itself");

    // Malformed: an origin-form request without a Host header.
    let direct = HttpClient::direct(h.agent.outbound_addr());
    let rsp = direct.get("/", &[("host", "bad host:x")]).await.unwrap();
    assert_eq!(rsp.status, 400);
    h.shutdown().await;
}

#[tokio::test]
async fn unknown_destinations_pass_through_and_are_counted() {
    let outside = upstream("outside", Knobs::healthy()).await;
    let h = Harness::start(Mesh::new().unwrap()).await;
    let url = format!("http://{}/hello", outside.addr());
    let rsp = h.client.get(&url, &[]).await.unwrap();
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.upstream(), Some("outside"));
    let m = h.metrics().await;
    assert_eq!(m.get("bulwark_passthrough_requests_total", &[]), 1.0);
    h.shutdown().await;
}

#[tokio::test]
async fn grpc_status_in_trailers_is_retried_over_http2() {
    let unavailable = upstream(
        "greeter-bad",
        Knobs {
            grpc_status: Some(14),
            ..Knobs::healthy()
        },
    )
    .await;
    let good = upstream(
        "greeter-good",
        Knobs {
            grpc_status: Some(0),
            ..Knobs::healthy()
        },
    )
    .await;
    let mesh = Mesh::with_services([("greeter", vec![unavailable.addr(), good.addr()])]).unwrap();
    let h = start_with_policy(mesh, "greeter", "  retry:\n    attempts: 2\n    retryOn: []\n    grpcCodes: [unavailable]\n    nonIdempotent: true\n    backoff:\n      base: 1ms\n      max: 1ms\n  loadBalancer:\n    strategy: RoundRobin\n").await;
    // A gRPC client speaks HTTP/2 to the outbound listener.
    let grpc = HttpClient::h2(h.agent.outbound_addr());
    for _ in 0..6 {
        let rsp = grpc
            .grpc(
                "http://greeter.test/helloworld.Greeter/SayHello",
                &[],
                b"hi",
            )
            .await
            .unwrap();
        assert_eq!(rsp.status, 200);
        assert_eq!(
            rsp.grpc_status(),
            Some(0),
            "UNAVAILABLE in the trailers was retried"
        );
        assert_eq!(rsp.upstream(), Some("greeter-good"));
    }
    assert!(unavailable.stats().total >= 2);
    h.shutdown().await;
}

#[tokio::test]
async fn connect_tunnels_pass_through_and_https_proxy_form_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let outside = upstream("outside", Knobs::healthy()).await;
    let h = Harness::start(Mesh::new().unwrap()).await;

    let mut tcp = tokio::net::TcpStream::connect(h.agent.outbound_addr())
        .await
        .unwrap();
    let target = outside.addr();
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "tunnel established: {head}"
    );
    // Anything may flow through the tunnel; here, plain HTTP to the upstream.
    tcp.write_all(b"GET /through HTTP/1.1\r\nHost: outside\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("x-upstream: outside"),
        "{reply}"
    );

    let rsp = h.client.get("https://reviews.test/", &[]).await.unwrap();
    assert_eq!(
        rsp.status, 400,
        "https in proxy form would be plaintext to a TLS port"
    );
    let m = h.metrics().await;
    assert_eq!(m.get("bulwark_passthrough_requests_total", &[]), 1.0);
    h.shutdown().await;
}

#[tokio::test]
async fn a_retry_prefers_an_endpoint_the_request_has_not_tried() {
    // Two bad endpoints and one good, three tries: only the preference for
    // untried endpoints guarantees that the last try reaches the good one
    // (least request alone would sometimes go back to a bad endpoint whose
    // earlier try has finished).
    let bad1 = upstream("reviews-bad-1", Knobs::failing(1.0, 503)).await;
    let bad2 = upstream("reviews-bad-2", Knobs::failing(1.0, 503)).await;
    let good = upstream("reviews-good", Knobs::healthy()).await;
    let mesh =
        Mesh::with_services([("reviews", vec![bad1.addr(), bad2.addr(), good.addr()])]).unwrap();
    let h = start_with_policy(mesh, "reviews", "  retry:\n    attempts: 3\n    retryOn: [gateway-error]\n    backoff:\n      base: 1ms\n      max: 1ms\n    budget:\n      ratio: 10\n      minPerSecond: 1000\n      window: 10s\n  loadBalancer:\n    strategy: LeastRequest\n").await;
    for _ in 0..60 {
        let rsp = h.client.get(REVIEWS, &[]).await.unwrap();
        assert_eq!(rsp.status, 200, "a retry went to an endpoint not tried yet");
    }
    let bad = bad1.stats().total + bad2.stats().total;
    assert!(bad >= 20, "bad endpoints were picked first often: {bad}");
    h.shutdown().await;
}

#[tokio::test]
async fn resets_are_retried_only_when_the_policy_says_so() {
    let resetting = upstream(
        "reviews-reset",
        Knobs {
            reset: true,
            ..Knobs::healthy()
        },
    )
    .await;
    let good = upstream("reviews-good", Knobs::healthy()).await;
    let mesh = Mesh::with_services([("reviews", vec![resetting.addr(), good.addr()])]).unwrap();
    let policy = |retry_on: &str| {
        resilience_policy(
            "reviews",
            "reviews",
            &format!(
                "  retry:\n    attempts: 2\n    retryOn: [{retry_on}]\n    backoff:\n      base: 1ms\n      max: 1ms\n  loadBalancer:\n    strategy: RoundRobin\n"
            ),
        )
    };
    mesh.write_policy("policy.yaml", &policy("reset")).unwrap();
    let h = Harness::start(mesh).await;
    for _ in 0..10 {
        let rsp = h.client.get(REVIEWS, &[]).await.unwrap();
        assert_eq!(rsp.status, 200);
        assert_eq!(rsp.upstream(), Some("reviews-good"));
    }
    assert!(
        resetting.stats().resets >= 4,
        "round robin sent tries to the resetting endpoint"
    );

    let version = h.config_version().await;
    h.mesh
        .write_policy("policy.yaml", &policy("connect-failure"))
        .unwrap();
    h.wait_version_above(version).await;
    let reasons: Vec<Option<String>> = reasons_of(&h, 10).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.as_deref() == Some("upstream-reset")),
        "without `reset` in retryOn the reset comes back as 502 upstream-reset: {reasons:?}"
    );
    h.shutdown().await;
}

/// Sends `n` GETs one after another; returns each response's `x-bulwark-reason`.
async fn reasons_of(h: &Harness, n: usize) -> Vec<Option<String>> {
    let mut reasons = Vec::with_capacity(n);
    for _ in 0..n {
        let rsp = h.client.get(REVIEWS, &[]).await.expect("the agent answers");
        reasons.push(rsp.reason().map(str::to_owned));
    }
    reasons
}

#[tokio::test]
async fn bodies_are_replayed_up_to_the_limit_and_larger_ones_sent_once() {
    let bad = upstream("reviews-bad", Knobs::failing(1.0, 503)).await;
    let good = upstream("reviews-good", Knobs::healthy()).await;
    let mesh = Mesh::with_services([
        ("reviews", vec![bad.addr()]),
        ("ratings", vec![bad.addr(), good.addr()]),
    ])
    .unwrap();
    let spec = "  retry:\n    attempts: 2\n    retryOn: [gateway-error]\n    maxBodyBytes: 1024\n    backoff:\n      base: 1ms\n      max: 1ms\n  loadBalancer:\n    strategy: RoundRobin\n";
    mesh.write_policy(
        "reviews.yaml",
        &resilience_policy("reviews", "reviews", spec),
    )
    .unwrap();
    mesh.write_policy(
        "ratings.yaml",
        &resilience_policy("ratings", "ratings", spec),
    )
    .unwrap();
    let h = Harness::start(mesh).await;

    let _ = h
        .client
        .request(Method::PUT, REVIEWS, &[], vec![b'x'; 100])
        .await
        .unwrap();
    assert_eq!(bad.stats().total, 2, "a small body is replayed");
    let _ = h
        .client
        .request(Method::PUT, REVIEWS, &[], vec![b'x'; 4096])
        .await
        .unwrap();
    assert_eq!(
        bad.stats().total,
        3,
        "a body over maxBodyBytes is sent once"
    );

    // The replayed body arrives whole at the endpoint that answers.
    for _ in 0..4 {
        let rsp = h
            .client
            .request(Method::PUT, "http://ratings.test/", &[], vec![b'y'; 700])
            .await
            .unwrap();
        assert_eq!(rsp.status, 200);
        let reply: bulwark_tests::upstream::Reply = rsp.json().unwrap();
        assert_eq!(reply.body_len, 700);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn max_connections_caps_connections_to_the_service() {
    let slow = upstream(
        "catalog-0",
        Knobs {
            latency: Duration::from_millis(50),
            ..Knobs::healthy()
        },
    )
    .await;
    let mesh = Mesh::with_services([("catalog", vec![slow.addr()])]).unwrap();
    let h = start_with_policy(
        mesh,
        "catalog",
        "  bulkhead:\n    maxConcurrentRequests: 10\n    maxConnections: 1\n",
    )
    .await;
    let mut calls = Vec::new();
    for _ in 0..4 {
        let client = HttpClient::proxy(h.agent.outbound_addr());
        calls.push(tokio::spawn(async move {
            client.get("http://catalog.test/", &[]).await
        }));
    }
    for call in calls {
        assert_eq!(
            call.await.unwrap().unwrap().status,
            200,
            "requests wait for the one connection"
        );
    }
    let stats = slow.stats();
    assert_eq!(stats.total, 4);
    assert_eq!(
        stats.max_in_flight, 1,
        "one HTTP/1.1 connection carries one request at a time"
    );
    h.shutdown().await;
}
