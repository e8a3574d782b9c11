//! Policy delivery under load: the control plane killed and restarted with a changed
//! policy (the agent fails static, then takes the new policy), and the policy file
//! rewritten many times (the agent ACKs the last version). Steady GETs to a healthy
//! upstream throughout: none may fail.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::Method;

use super::{Check, Config, Row, failures, json_page, poll, rss_kib, steady};
use crate::sut::{self, Agent, ControlPlane, Layout, MeshDir, Policies, Upstream};

/// The policy file in the mesh folder.
const POLICY_FILE: &str = "policy.yaml";
/// How long the agent may take to show a policy written to the folder.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(15);
/// The control plane's debounce: edits closer together than this are one change.
const DEBOUNCE: &str = "50ms";
/// The debounce of the rewrites scenario, below the gap between two rewrites, so that
/// each rewrite becomes its own version sent to the agent.
const REWRITE_DEBOUNCE: &str = "10ms";
/// The gap between two rewrites.
const REWRITE_GAP: Duration = Duration::from_millis(30);

/// A ResiliencePolicy on `bench` in the spirit of `examples/resilience.yaml`, with
/// `attempts` tries and a `request_ms` request timeout: the two values the scenarios
/// change.
pub fn policy_yaml(attempts: u32, request_ms: u64) -> String {
    format!(
        "apiVersion: bulwark.io/v1alpha1
kind: ResiliencePolicy
metadata: {{name: bench, namespace: {ns}}}
spec:
  targetRefs: [{{kind: Service, name: bench}}]
  timeout: {{request: {request_ms}ms, connect: 250ms}}
  retry:
    attempts: {attempts}
    perTryTimeout: 1s
    backoff: {{base: 25ms, max: 250ms}}
    retryOn: [connect-failure, reset, gateway-error]
    budget: {{ratio: 0.2, minPerSecond: 10, window: 10s}}
  circuitBreaker:
    consecutiveFailures: 5
    failureRatio: {{threshold: 0.5, minRequests: 20, window: 10s}}
    openDuration: 3s
  bulkhead: {{maxConcurrentRequests: 4096, maxPending: 1024, queueTimeout: 250ms}}
  loadBalancer: {{strategy: RoundRobin}}
",
        ns = sut::NAMESPACE,
    )
}

/// The `bench` destination's retry attempts and request timeout (ms) in the agent's
/// `/config`, and the config's version.
pub async fn agent_policy(agent: &Agent) -> Option<(u64, u64, u64)> {
    let page = json_page(agent.admin, "/config").await?;
    let config = &page["config"];
    let version = config["version"].as_u64()?;
    let destination = config["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["name"].as_str().is_some_and(|n| n.starts_with("bench.")))?;
    let attempts = destination["retry"]["attempts"].as_u64()?;
    let request = destination["timeouts"]["request"]
        .as_str()?
        .strip_suffix("ms")?
        .parse()
        .ok()?;
    Some((attempts, request, version))
}

/// Waits until the agent enforces `attempts` and `request_ms`; its config version then.
async fn wait_policy(agent: &Agent, attempts: u64, request_ms: u64) -> Option<u64> {
    poll(PROPAGATION_LIMIT, || async {
        agent_policy(agent)
            .await
            .filter(|(a, r, _)| (*a, *r) == (attempts, request_ms))
            .map(|(_, _, version)| version)
    })
    .await
}

/// The agent's stream as the control plane's `/agents` shows it: the last version sent,
/// the last version ACKed, and how many ACKs.
async fn acks(control_plane: &ControlPlane) -> Option<(u64, u64, u64)> {
    let page = json_page(control_plane.admin, "/agents").await?;
    let status = page.as_array()?.first()?;
    Some((
        status["sent_version"].as_u64()?,
        status["last_ack"]["version"].as_u64()?,
        status["acks"].as_u64()?,
    ))
}

/// A control plane on `grpc`, retried for a few seconds: the killed one's port may
/// still be held for a moment.
async fn restart(
    layout: &Layout,
    mesh: &MeshDir,
    grpc: std::net::SocketAddr,
) -> anyhow::Result<ControlPlane> {
    let mut last = None;
    for _ in 0..20 {
        match ControlPlane::start_at(
            layout,
            "control-plane-restarted",
            mesh,
            DEBOUNCE,
            None,
            grpc,
        )
        .await
        {
            Ok(cp) => return Ok(cp),
            Err(error) => {
                last = Some(error);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
        .with_context(|| format!("restarting the control plane on {grpc}"))
}

/// Scenario 1: steady GETs; the control plane is SIGKILLed, the policy changes (3 → 2
/// attempts, 5 s → 4 s timeout) while it is down, and it is restarted on the same
/// address. No request may fail, and the agent must end with the new policy.
pub async fn control_plane_killed(
    layout: &Layout,
    config: &Config,
    upstream: &Upstream,
) -> anyhow::Result<Row> {
    let mesh = MeshDir::new(upstream.http, 1, Policies::None)?;
    mesh.write(POLICY_FILE, &policy_yaml(3, 5_000))?;
    let cp = ControlPlane::start(layout, &mesh, DEBOUNCE, None).await?;
    let grpc = cp.grpc;
    let agent = Agent::start(
        layout,
        "agent-control-plane-killed",
        grpc,
        upstream.http.port(),
        None,
        &config.agent_args,
    )
    .await?;
    let first = wait_policy(&agent, 3, 5_000)
        .await
        .context("the first policy reaches the agent")?;
    let before = rss_kib(agent.proc.pid());

    let load_time = Duration::from_secs(8);
    let load = steady(agent.outbound, Method::GET, config.rate, load_time).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cp.proc.stop().await;
    let killed = Instant::now();
    mesh.write(POLICY_FILE, &policy_yaml(2, 4_000))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cp = restart(layout, &mesh, grpc).await?;
    let restarted = Instant::now();
    let down = restarted - killed;
    let new_version = wait_policy(&agent, 2, 4_000).await;
    let taken = restarted.elapsed();
    let run = load.await.context("the load task")?;
    let after = rss_kib(agent.proc.pid());
    agent.proc.stop().await;
    cp.proc.stop().await;

    let sent = run.ok + run.errors;
    let policy = match new_version {
        Some(version) => format!(
            "new policy (3 → 2 attempts, 5 s → 4 s timeout) in force {:.2} s after the restart, config version {first} → {version}",
            taken.as_secs_f64()
        ),
        None => format!("the new policy did not reach the agent within {PROPAGATION_LIMIT:?}"),
    };
    Ok(Row {
        scenario: "control plane killed under load, restarted with a changed policy".to_owned(),
        sent: Some(sent),
        failed: Some(run.errors),
        failed_idempotent: Some(run.errors),
        rss_before_kib: before,
        rss_after_kib: after,
        notes: format!(
            "{} GET/s for {} s; control plane down {:.1} s; {policy}; {}",
            config.rate,
            load_time.as_secs(),
            down.as_secs_f64(),
            failures(&run)
        ),
        checks: vec![
            Check::new(
                "control plane killed: no request fails (fail static)",
                format!("{} of {sent} failed", run.errors),
                run.errors == 0,
            ),
            Check::new(
                "control plane restarted: the agent takes the changed policy",
                policy,
                new_version.is_some(),
            ),
        ],
    })
}

/// Scenario 3: steady GETs while the policy file is rewritten `config.rewrites` times,
/// each with other values, [`REWRITE_GAP`] apart. No request may fail; the agent must enforce the
/// last values and have ACKed the last version sent; RSS is compared before and after.
pub async fn rewrites(
    layout: &Layout,
    config: &Config,
    upstream: &Upstream,
) -> anyhow::Result<Row> {
    let mesh = MeshDir::new(upstream.http, 1, Policies::None)?;
    mesh.write(POLICY_FILE, &policy_yaml(3, 5_000))?;
    let cp = ControlPlane::start(layout, &mesh, REWRITE_DEBOUNCE, None).await?;
    let agent = Agent::start(
        layout,
        "agent-rewrites",
        cp.grpc,
        upstream.http.port(),
        None,
        &config.agent_args,
    )
    .await?;
    wait_policy(&agent, 3, 5_000)
        .await
        .context("the first policy reaches the agent")?;
    let before = rss_kib(agent.proc.pid());

    let gap = REWRITE_GAP;
    let load_time = gap * config.rewrites as u32 + Duration::from_secs(2);
    let load = steady(agent.outbound, Method::GET, config.rate, load_time).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut last = (3, 5_000);
    for n in 0..config.rewrites {
        // Every rewrite changes the timeout; the attempts alternate.
        last = (2 + (n % 2) as u64, 4_000 + n as u64);
        mesh.write(POLICY_FILE, &policy_yaml(last.0 as u32, last.1))?;
        tokio::time::sleep(gap).await;
    }
    let version = wait_policy(&agent, last.0, last.1).await;
    let acked = poll(PROPAGATION_LIMIT, || async {
        acks(&cp).await.filter(|(sent, acked, _)| sent == acked)
    })
    .await;
    let run = load.await.context("the load task")?;
    let after = rss_kib(agent.proc.pid());
    agent.proc.stop().await;
    cp.proc.stop().await;

    let sent = run.ok + run.errors;
    let acked_text = match acked {
        Some((sent, _, count)) => format!("last version sent ({sent}) ACKed; {count} ACKs in all"),
        None => "the last version sent was not ACKed".to_owned(),
    };
    let rss_growth = after.zip(before).map(|(a, b)| a.saturating_sub(b));
    Ok(Row {
        scenario: format!("{} policy rewrites under load", config.rewrites),
        sent: Some(sent),
        failed: Some(run.errors),
        failed_idempotent: Some(run.errors),
        rss_before_kib: before,
        rss_after_kib: after,
        notes: format!(
            "{} GET/s; a rewrite every {} ms; {}; agent config version {}; {}",
            config.rate,
            gap.as_millis(),
            acked_text,
            version.map_or_else(|| "-".to_owned(), |v| v.to_string()),
            failures(&run)
        ),
        checks: vec![
            Check::new(
                "policy rewrites: no request fails",
                format!("{} of {sent} failed", run.errors),
                run.errors == 0,
            ),
            Check::new(
                "policy rewrites: the agent enforces the last policy and ACKed the last version",
                format!(
                    "{}; {acked_text}",
                    if version.is_some() {
                        "last policy in force"
                    } else {
                        "last policy not in force"
                    }
                ),
                version.is_some() && acked.is_some(),
            ),
            Check::new(
                "policy rewrites: RSS stable (within 2 MB)",
                rss_growth.map_or_else(
                    || "-".to_owned(),
                    |g| format!("+{:.1} MiB", g as f64 / 1024.0),
                ),
                rss_growth.is_some_and(|g| g * 1024 <= 2_000_000),
            ),
        ],
    })
}
