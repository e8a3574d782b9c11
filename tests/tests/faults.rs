//! The fault suite at a small scale, asserted: the control plane killed under load and
//! restarted with a changed policy, an endpoint killed mid-traffic, policy rewrites under
//! load, and shutdown (what SIGTERM starts) with requests in flight. `make faults` runs
//! the same scenarios on the release binaries at full size and measures memory; the
//! hostile-client limits (slow heads, idle connections) are asserted in `hostile.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use bulwark_tests::client::HttpClient;
use bulwark_tests::eventually::poll_until;
use bulwark_tests::harness::{CONFIG_DEADLINE, Harness, loopback, resilience_policy};
use bulwark_tests::mesh::Mesh;
use bulwark_tests::upstream::{Knobs, Upstream};
use bulwark_tests::{Response, assert_eventually};

const URL: &str = "http://reviews.test/";

/// Pause between two requests of one load worker: enough traffic to overlap every
/// fault, little enough to leave the CPU to the agent.
const PACE: Duration = Duration::from_millis(5);

/// A ResiliencePolicy on `reviews` in the spirit of `examples/resilience.yaml`: `attempts`
/// tries on connect failures, resets and gateway errors, a `request` timeout.
fn policy(attempts: u32, request: &str) -> String {
    resilience_policy(
        "reviews",
        "reviews",
        &format!(
            "  timeout:
    request: {request}
    connect: 250ms
  retry:
    attempts: {attempts}
    perTryTimeout: 1s
    backoff: {{base: 10ms, max: 50ms}}
    retryOn: [connect-failure, reset, gateway-error]
    budget: {{ratio: 0.2, minPerSecond: 10, window: 10s}}
  circuitBreaker:
    consecutiveFailures: 5
    openDuration: 3s
  loadBalancer:
    strategy: RoundRobin
"
        ),
    )
}

/// The `reviews` destination's retry attempts and request timeout in the agent's `/config`.
async fn enforced(h: &Harness) -> Option<(u64, String)> {
    let config = h.config().await;
    let destination = config["config"]["destinations"]
        .as_array()?
        .iter()
        .find(|d| {
            d["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("reviews."))
        })?
        .clone();
    Some((
        destination["retry"]["attempts"].as_u64()?,
        destination["timeouts"]["request"].as_str()?.to_owned(),
    ))
}

/// Waits until the agent enforces `attempts` and a `request_ms` timeout.
async fn wait_enforced(h: &Harness, attempts: u64, request_ms: u64) {
    let want = (attempts, format!("{request_ms}ms"));
    poll_until(CONFIG_DEADLINE, "the agent enforces the policy", || {
        let want = want.clone();
        async move { enforced(h).await.filter(|got| *got == want) }
    })
    .await
    .unwrap_or_else(|timed_out| panic!("{timed_out}; the agent has {:?}", want));
}

// === Load ===

/// What a load saw.
#[derive(Debug, Default)]
struct Counts {
    sent: u64,
    failed: u64,
    first_failure: Option<String>,
}

impl Counts {
    /// Panics unless requests were sent and none failed.
    fn assert_none_failed(&self, what: &str) {
        assert!(self.sent > 0, "{what}: no request was sent");
        assert_eq!(
            self.failed, 0,
            "{what}: {} of {} failed, the first with {:?}",
            self.failed, self.sent, self.first_failure
        );
    }
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    sent: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

/// Requests from a few workers in a loop until stopped; any answer but 200 is a failure.
struct Load {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(client: &HttpClient, method: Method, workers: usize) -> Load {
        let shared = Arc::new(Shared::default());
        let workers = (0..workers)
            .map(|_| {
                let (client, method, shared) =
                    (client.clone(), method.clone(), Arc::clone(&shared));
                tokio::spawn(async move {
                    while !shared.stop.load(Ordering::SeqCst) {
                        let outcome = client.request(method.clone(), URL, &[], Bytes::new()).await;
                        shared.sent.fetch_add(1, Ordering::SeqCst);
                        let failure = match outcome {
                            Ok(Response { status, .. }) if status == 200 => None,
                            Ok(rsp) => Some(format!("{} ({:?})", rsp.status, rsp.reason())),
                            Err(error) => Some(error.to_string()),
                        };
                        if let Some(failure) = failure {
                            shared.failed.fetch_add(1, Ordering::SeqCst);
                            let mut first = shared
                                .first_failure
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner);
                            first.get_or_insert(failure);
                        }
                        tokio::time::sleep(PACE).await;
                    }
                })
            })
            .collect();
        Load { shared, workers }
    }

    fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Waits until `more` requests were sent from now: traffic went on through a fault.
    async fn wait_more(&self, more: u64) {
        let target = self.sent() + more;
        assert_eventually!(
            self.sent() >= target,
            "{more} more requests sent (now {})",
            self.sent()
        );
    }

    async fn stop(self) -> Counts {
        self.shared.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.expect("load worker");
        }
        Counts {
            sent: self.shared.sent.load(Ordering::SeqCst),
            failed: self.shared.failed.load(Ordering::SeqCst),
            first_failure: self
                .shared
                .first_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        }
    }
}

// === the scenarios ===

/// Steady GETs while the control plane is stopped, the policy edited and the control
/// plane started again: nothing fails (the agent fails static), and the agent ends with
/// the edited policy.
#[tokio::test]
async fn the_control_plane_killed_under_load_and_restarted_with_a_changed_policy() {
    let up = Upstream::start(loopback(), "reviews-0", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    mesh.write_policy("policy.yaml", &policy(3, "5s")).unwrap();
    let mut h = Harness::start(mesh).await;
    wait_enforced(&h, 3, 5_000).await;

    let load = Load::start(&h.client, Method::GET, 4);
    load.wait_more(20).await;
    h.stop_control_plane().await;
    h.mesh
        .write_policy("policy.yaml", &policy(2, "4s"))
        .unwrap();
    load.wait_more(50).await;
    h.restart_control_plane().await;
    wait_enforced(&h, 2, 4_000).await;
    load.wait_more(20).await;
    let counts = load.stop().await;

    counts.assert_none_failed("GETs");
    h.shutdown().await;
}

/// One of two endpoints stops (its connections reset, new connections refused) while
/// GETs and POSTs flow: every GET is retried on the other endpoint; POSTs are counted
/// but may fail, since they are never retried.
#[tokio::test]
async fn an_endpoint_killed_mid_traffic_fails_no_idempotent_request() {
    // A little latency, so that requests are in flight on the endpoint when it goes.
    let knobs = Knobs {
        latency: Duration::from_millis(20),
        ..Knobs::healthy()
    };
    let survivor = Upstream::start(loopback(), "reviews-0", knobs.clone())
        .await
        .unwrap();
    let victim = Upstream::start(loopback(), "reviews-1", knobs)
        .await
        .unwrap();
    let mesh = Mesh::with_services([("reviews", vec![survivor.addr(), victim.addr()])]).unwrap();
    mesh.write_policy("policy.yaml", &policy(3, "2s")).unwrap();
    let h = Harness::start(mesh).await;
    wait_enforced(&h, 3, 2_000).await;

    let gets = Load::start(&h.client, Method::GET, 4);
    let posts = Load::start(&h.client, Method::POST, 1);
    assert_eventually!(victim.stats().in_flight > 0 && survivor.stats().total >= 10);
    victim.shutdown().await;
    let served_before = survivor.stats().total;
    gets.wait_more(100).await;
    let (gets, posts) = (gets.stop().await, posts.stop().await);

    eprintln!("POSTs, never retried: {posts:?}");
    gets.assert_none_failed("GETs");
    assert!(
        survivor.stats().total > served_before,
        "the survivor serves what the killed endpoint no longer can"
    );
    h.shutdown().await;
}

/// The policy file rewritten 50 times, 10 ms apart, under steady GETs: nothing fails, the
/// agent enforces the last rewrite, and the control plane has its ACK of the last
/// version it sent.
#[tokio::test]
async fn policy_rewrites_under_load_fail_nothing_and_the_last_one_wins() {
    let up = Upstream::start(loopback(), "reviews-0", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    mesh.write_policy("policy.yaml", &policy(3, "5s")).unwrap();
    let h = Harness::start(mesh).await;
    wait_enforced(&h, 3, 5_000).await;

    let load = Load::start(&h.client, Method::GET, 4);
    load.wait_more(20).await;
    let rewrites = 50u64;
    for n in 0..rewrites {
        let attempts = 2 + (n % 2) as u32;
        h.mesh
            .write_policy(
                "policy.yaml",
                &policy(attempts, &format!("{}ms", 4_000 + n)),
            )
            .unwrap();
        // Pacing the writer, not waiting for an outcome.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = rewrites - 1;
    wait_enforced(&h, 2 + last % 2, 4_000 + last).await;
    let cp_admin = HttpClient::direct(h.control_plane_admin());
    let acked = poll_until(
        CONFIG_DEADLINE,
        "the control plane has the ACK of the last version it sent",
        || {
            let cp_admin = cp_admin.clone();
            async move {
                let page: serde_json::Value =
                    cp_admin.get("/agents", &[]).await.ok()?.json().ok()?;
                let agent = page.as_array()?.first()?.clone();
                let sent = agent["sent_version"].as_u64()?;
                (agent["last_ack"]["version"].as_u64()? == sent).then_some(sent)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        h.config_version().await,
        acked,
        "the agent runs the version it ACKed"
    );
    load.wait_more(20).await;
    let counts = load.stop().await;

    counts.assert_none_failed("GETs");
    h.shutdown().await;
}

/// Shutdown, which SIGTERM starts in `bulwark-agent`, with slow requests in flight: the
/// agent stops accepting at once, answers every request in flight, then stops.
#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_refuses_new_connections() {
    let up = Upstream::start(
        loopback(),
        "reviews-0",
        Knobs {
            latency: Duration::from_millis(800),
            ..Knobs::healthy()
        },
    )
    .await
    .unwrap();
    let mesh = Mesh::with_services([("reviews", vec![up.addr()])]).unwrap();
    mesh.write_policy("policy.yaml", &policy(3, "10s")).unwrap();
    let h = Harness::start(mesh).await;
    wait_enforced(&h, 3, 10_000).await;
    let Harness {
        agent,
        control_plane,
        client,
        mesh: _mesh,
        ..
    } = h;
    let outbound = agent.outbound_addr();

    let in_flight = 8;
    let requests: Vec<_> = (0..in_flight)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get(URL, &[]).await })
        })
        .collect();
    assert_eventually!(up.stats().in_flight == in_flight);
    let shutdown = tokio::spawn(agent.shutdown());

    poll_until(
        Duration::from_secs(5),
        "new connections are refused",
        || async { TcpStream::connect(outbound).await.is_err().then_some(()) },
    )
    .await
    .unwrap();
    for request in requests {
        let rsp = request
            .await
            .unwrap()
            .expect("a request in flight completes");
        assert_eq!(rsp.status, 200, "a request in flight is answered");
    }
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("the agent stops once drained")
        .unwrap();
    if let Some(cp) = control_plane {
        cp.shutdown().await;
    }
}
