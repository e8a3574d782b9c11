//! Inbound rate limits, end to end: mesh → the agent's inbound listener → the local app.

use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::{Harness, loopback};
use bulwark_tests::mesh::{Mesh, NAMESPACE};
use bulwark_tests::upstream::{Knobs, Upstream};

fn rate_limit_policy(limits: &str) -> String {
    format!(
        "apiVersion: bulwark.io/v1alpha1
kind: RateLimitPolicy
metadata:
  name: frontend
  namespace: {NAMESPACE}
spec:
  targetRefs:
    - kind: Service
      name: frontend
  limits:
{limits}"
    )
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
