use std::error::Error as _;

use super::*;
use crate::client::{ClientError, HttpClient};

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Sends `count` GETs one after another and returns which ones failed.
async fn failure_pattern(upstream: &Upstream, count: usize) -> Vec<bool> {
    let client = HttpClient::direct(upstream.addr());
    let mut pattern = Vec::with_capacity(count);
    for _ in 0..count {
        let response = client.get("/", &[]).await.unwrap();
        pattern.push(match response.status.as_u16() {
            200 => false,
            503 => true,
            other => panic!("unexpected status {other}"),
        });
    }
    pattern
}

fn io_error_kind(err: &ClientError) -> Option<io::ErrorKind> {
    let mut source = err.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        source = err.source();
    }
    None
}

#[tokio::test]
async fn fail_ratio_is_deterministic_for_a_seed() {
    let knobs = Knobs {
        seed: 42,
        ..Knobs::failing(0.3, 503)
    };
    let first = Upstream::start(any_port(), "first", knobs.clone())
        .await
        .unwrap();
    let second = Upstream::start(any_port(), "second", knobs).await.unwrap();

    let pattern = failure_pattern(&first, 1000).await;
    assert_eq!(
        pattern,
        failure_pattern(&second, 1000).await,
        "same seed, same failures"
    );

    let mut rng = fastrand::Rng::with_seed(42);
    let expected: Vec<bool> = (0..1000).map(|_| rng.f64() < 0.3).collect();
    assert_eq!(pattern, expected);
    let failures = pattern.iter().filter(|&&failed| failed).count();
    assert!(
        (250..=350).contains(&failures),
        "{failures} of 1000 failed, expected about 300"
    );

    let stats = first.stats();
    assert_eq!(stats.total, 1000);
    assert_eq!(stats.failures, failures as u64);
    assert_eq!(stats.by_method.get("GET"), Some(&1000));
    assert_eq!(stats.in_flight, 0);

    // Setting knobs restarts the sequence; another seed gives another one.
    first.set_knobs(Knobs {
        seed: 42,
        ..Knobs::failing(0.3, 503)
    });
    assert_eq!(failure_pattern(&first, 50).await, expected[..50]);
    first.set_knobs(Knobs {
        seed: 7,
        ..Knobs::failing(0.3, 503)
    });
    assert_ne!(failure_pattern(&first, 50).await, expected[..50]);
}

#[tokio::test]
async fn failures_use_the_configured_status() {
    let upstream = Upstream::start(any_port(), "down", Knobs::failing(1.0, 500))
        .await
        .unwrap();
    let response = crate::client::get(upstream.addr(), "/", &[]).await.unwrap();
    assert_eq!(response.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response.upstream(), Some("down"));
    assert!(response.json::<Reply>().unwrap().failed);
}

#[tokio::test]
async fn replies_describe_the_request() {
    let upstream = Upstream::start(any_port(), "catalog-0", Knobs::healthy())
        .await
        .unwrap();
    let headers = [
        ("x-tenant-id", "acme"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
    ];
    let response = crate::client::request(
        upstream.addr(),
        Method::POST,
        "/items/7?full=1",
        &headers,
        "hello",
    )
    .await
    .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.upstream(), Some("catalog-0"));
    let reply: Reply = response.json().unwrap();
    assert_eq!(
        reply,
        Reply {
            name: "catalog-0".into(),
            method: "POST".into(),
            path: "/items/7".into(),
            query: Some("full=1".into()),
            tenant_id: Some("acme".into()),
            traceparent: Some(headers[1].1.into()),
            forwarded_for: None,
            body_len: 5,
            failed: false,
        }
    );
    assert_eq!(upstream.stats().by_method.get("POST"), Some(&1));
}

#[tokio::test]
async fn serves_http2_with_prior_knowledge() {
    let upstream = Upstream::start(any_port(), "h2", Knobs::healthy())
        .await
        .unwrap();
    let response = crate::client::h2_get(upstream.addr(), "/x", &[])
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.version, http::Version::HTTP_2);
    assert_eq!(response.upstream(), Some("h2"));
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let latency = Duration::from_millis(150);
    let upstream = Upstream::start(
        any_port(),
        "slow",
        Knobs {
            latency,
            ..Knobs::default()
        },
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let response = crate::client::get(upstream.addr(), "/", &[]).await.unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert!(
        started.elapsed() >= latency,
        "answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn hang_holds_the_request_until_the_client_goes_away() {
    let upstream = Upstream::start(any_port(), "payments", Knobs::hanging())
        .await
        .unwrap();
    let client = HttpClient::direct(upstream.addr()).with_timeout(Duration::from_millis(300));
    let err = client.get("/pay", &[]).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    // The client gave up and closed its connection: the server lets go too.
    crate::assert_eventually!(upstream.stats().in_flight == 0, "hung request released");
    assert_eq!(upstream.stats().total, 1);

    // While one request hangs, it is counted in flight and the server still answers control requests.
    let hung = tokio::spawn({
        let client = HttpClient::direct(upstream.addr());
        async move { client.get("/pay", &[]).await }
    });
    crate::assert_eventually!(upstream.stats().in_flight == 1);
    let stats: Stats = crate::client::get(upstream.addr(), "/_upstream/stats", &[])
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(stats.in_flight, 1);
    assert!(!hung.is_finished());
    hung.abort();
    crate::assert_eventually!(upstream.stats().in_flight == 0, "aborted request released");
}

#[tokio::test]
async fn grpc_status_arrives_in_trailers() {
    let upstream = Upstream::start(
        any_port(),
        "grpc",
        Knobs {
            grpc_status: Some(grpc::UNAVAILABLE),
            ..Knobs::default()
        },
    )
    .await
    .unwrap();
    let client = HttpClient::h2(upstream.addr());
    let response = client.grpc("/demo.Echo/Say", &[], b"hi").await.unwrap();
    assert_eq!(
        response.status,
        StatusCode::OK,
        "gRPC failures are HTTP 200"
    );
    assert_eq!(response.header("grpc-status"), None, "not trailers-only");
    assert_eq!(
        response
            .trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .unwrap(),
        "14"
    );
    assert_eq!(response.grpc_status(), Some(grpc::UNAVAILABLE));
    let messages = grpc::unframe(&response.body).unwrap();
    let reply: Reply = serde_json::from_slice(&messages[0]).unwrap();
    assert_eq!(reply.body_len, 7, "one framed 2-byte message");
    assert!(reply.failed);

    upstream.set_knobs(Knobs::healthy());
    let ok = client.grpc("/demo.Echo/Say", &[], b"hi").await.unwrap();
    assert_eq!(ok.grpc_status(), Some(grpc::OK));

    // Without grpc_status, fail_ratio fails gRPC requests with UNAVAILABLE in trailers.
    upstream.set_knobs(Knobs::failing(1.0, 500));
    let failed = client.grpc("/demo.Echo/Say", &[], b"hi").await.unwrap();
    assert_eq!(failed.status, StatusCode::OK);
    assert_eq!(failed.grpc_status(), Some(grpc::UNAVAILABLE));
    assert_eq!(upstream.stats().failures, 2);
}

#[tokio::test]
async fn reset_closes_the_connection_without_answering() {
    let upstream = Upstream::start(
        any_port(),
        "flaky",
        Knobs {
            reset: true,
            ..Knobs::default()
        },
    )
    .await
    .unwrap();
    let err = crate::client::get(upstream.addr(), "/", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Request { .. }), "{err}");
    assert_eq!(
        io_error_kind(&err),
        Some(io::ErrorKind::ConnectionReset),
        "{err}"
    );

    let h2_err = crate::client::h2_get(upstream.addr(), "/", &[])
        .await
        .unwrap_err();
    assert!(matches!(h2_err, ClientError::Request { .. }), "{h2_err}");
    assert_eq!(upstream.stats().resets, 2);

    // Back to healthy, the same server answers again.
    upstream.set_knobs(Knobs::healthy());
    let response = crate::client::get(upstream.addr(), "/", &[]).await.unwrap();
    assert_eq!(response.status, StatusCode::OK);
}

#[tokio::test]
async fn knobs_change_over_http() {
    let upstream = Upstream::start(any_port(), "reviews-3", Knobs::healthy())
        .await
        .unwrap();
    let addr = upstream.addr();
    let put = crate::client::request(
        addr,
        Method::PUT,
        "/_upstream/knobs",
        &[],
        r#"{"fail_ratio": 1.0, "fail_status": 500, "latency_ms": 5}"#,
    )
    .await
    .unwrap();
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(upstream.knobs().latency, Duration::from_millis(5));
    assert_eq!(
        crate::client::get(addr, "/", &[]).await.unwrap().status,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let knobs: Knobs = crate::client::get(addr, "/_upstream/knobs", &[])
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(knobs.fail_status, 500);

    let bad = crate::client::request(
        addr,
        Method::PUT,
        "/_upstream/knobs",
        &[],
        r#"{"fail_ratio": 2}"#,
    )
    .await
    .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.text().contains("fail_ratio"), "{}", bad.text());
    let typo = crate::client::request(
        addr,
        Method::PUT,
        "/_upstream/knobs",
        &[],
        r#"{"hangs": true}"#,
    )
    .await
    .unwrap();
    assert_eq!(typo.status, StatusCode::BAD_REQUEST);
    assert!(typo.text().contains("hangs"), "{}", typo.text());
    assert_eq!(
        upstream.knobs().fail_status,
        500,
        "rejected knobs change nothing"
    );

    let stats: Stats = crate::client::get(addr, "/_upstream/stats", &[])
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(stats.total, 1, "control requests are not counted");
    assert_eq!(stats.failures, 1);
    let missing = crate::client::get(addr, "/_upstream/nope", &[])
        .await
        .unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn shutdown_frees_the_address() {
    let upstream = Upstream::start(any_port(), "once", Knobs::healthy())
        .await
        .unwrap();
    let addr = upstream.addr();
    // Leave a keep-alive connection open: shutdown must close it.
    let client = HttpClient::direct(addr);
    assert_eq!(client.get("/", &[]).await.unwrap().status, StatusCode::OK);
    upstream.shutdown().await;
    assert!(
        crate::client::get(addr, "/", &[]).await.is_err(),
        "nothing listens any more"
    );
    let again = Upstream::start(addr, "twice", Knobs::healthy())
        .await
        .unwrap();
    assert_eq!(
        crate::client::get(addr, "/", &[]).await.unwrap().upstream(),
        Some("twice")
    );
    again.shutdown().await;
}

#[tokio::test]
async fn start_rejects_invalid_knobs_and_names() {
    let err = Upstream::start(any_port(), "x", Knobs::failing(2.0, 503))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let err = Upstream::start(any_port(), "bad\nname", Knobs::healthy())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}
