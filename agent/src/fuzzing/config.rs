//! The `config_snapshot` target: a protobuf `Snapshot` as the control plane sends it,
//! built into the agent's config as the subscription applies it, then applied again on
//! top of itself (the push that reuses breakers, pools and buckets), shown on `/config`
//! and scraped on `/metrics`. Each destination's policy is then put to use as a request
//! puts it (its deadline, retries and backoffs, bulkhead, and breakers tripped by
//! failures), since a value the conversion accepts must not fail later, on a request.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bulwark_proto::v1;
use futures::FutureExt;
use http::{Method, StatusCode};
use prost::Message;
use tokio::runtime::Runtime;
use tokio::time::Instant;

use super::metrics;
use crate::config::Config;
use crate::config::destination::Destination;
use crate::config::target::Target;
use crate::policy::retry::tries::Retries;
use crate::policy::timeout::Deadline;

/// The endpoint tries are said to have gone to.
const TRIED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 80);
/// Failures fed to one breaker at most (a threshold may be far higher).
const MAX_FAILURES: usize = 64;
/// Endpoints per destination whose breakers are tripped, at most.
const MAX_ENDPOINTS: usize = 4;

/// Builds the input's snapshot and uses it; panics when a snapshot that built once does
/// not build on top of itself, or when one of its service ports cannot be looked up by
/// name.
pub fn config_snapshot(data: &[u8]) {
    let Ok(snapshot) = v1::Snapshot::decode(data) else {
        return;
    };
    let (in_force, metrics) = metrics();
    let Ok(first) = Config::build(&snapshot, &Config::default(), &metrics) else {
        return;
    };
    let second = Config::build(&snapshot, &first, &metrics)
        .unwrap_or_else(|e| panic!("a snapshot that built once fails on top of itself: {e}"));
    for svc in &snapshot.services {
        for port in &svc.ports {
            let target = Target::Name {
                name: &svc.name,
                namespace: Some(&svc.namespace),
                port: u16::try_from(port.port).unwrap_or(0),
            };
            assert!(
                second.lookup(target, "").is_some(),
                "{}.{}:{} is not found by name",
                svc.name,
                svc.namespace,
                port.port
            );
        }
    }
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        // The paused clock: a bulkhead's queue timeout passes without real waiting.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap_or_else(|e| panic!("cannot start a runtime: {e}"))
    });
    for dst in second.destinations() {
        runtime.block_on(use_policy(dst));
    }
    let _ = second.to_json();
    in_force.store(Arc::new(second));
    let _ = metrics.encode();
}

/// Puts `dst`'s policy to use as one failing request would.
async fn use_policy(dst: &Destination) {
    let policy = &dst.policy;
    let deadline = Deadline::new(Instant::now(), policy.timeouts.request, None);
    let mut retries = Retries::new(policy.retry.as_ref(), dst.budget.as_deref(), &Method::GET);
    let _ = deadline.for_try(retries.per_try_timeout());
    // Every try answered 503, as far as the policy's attempts, deadline and budget go.
    while retries.retries_response(StatusCode::SERVICE_UNAVAILABLE, None) {
        match retries.next(TRIED, &deadline) {
            Ok(backoff) => {
                let _ = deadline.allows(backoff.delay);
            }
            Err(_) => break,
        }
    }
    // A slot, then one more request (which queues, times out, or is refused); a wait
    // that cannot end is the bulkhead's to bound, not this harness's.
    if let Some(Ok(_slot)) = dst.bulkhead.acquire().now_or_never() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3600), dst.bulkhead.acquire())
            .await;
    }
    for endpoint in dst.balancer.endpoints().iter().take(MAX_ENDPOINTS) {
        for _ in 0..MAX_FAILURES {
            match endpoint.breaker.acquire() {
                Ok(permit) => permit.failure(),
                Err(_) => break,
            }
        }
        let _ = (endpoint.breaker.state(), endpoint.breaker.retry_after());
    }
}
