//! Issue 21's rows: a limit shared by several agents, and what a Shared limit costs.
//!
//! - **Accuracy**: 4 agents, pods of Service `bench`, each sent 400 requests/s by its own
//!   client, under one limit of 200/s (burst 20): Shared (one bucket in a real
//!   redis-server on loopback) and Service scope (the control plane's split). The
//!   accepted total should be 200/s ± 5 %.
//! - **Cost**: one agent at 1,000 requests/s under a Shared limit it never reaches, and
//!   the same under a Pod-scope limit: the agent's CPU per 1,000 requests both ways, and
//!   the Redis round trips per request (the agent's own counter over the requests sent).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::load::{self, Client, Protocol, Target};
use crate::procstat;
use crate::sut::{self, Agent, ControlPlane, Layout, MeshDir, Policies, Proc, Upstream};

/// Where the rate-limit rows go in docs/benchmarks.md (issue 21's section).
pub const BEGIN: &str = "<!-- ratelimit:results:begin -->";
/// The end of the rate-limit rows.
pub const END: &str = "<!-- ratelimit:results:end -->";

/// The shared limit, requests per second.
const LIMIT: u32 = 200;
/// Its burst: small beside the run, so the total is about the rate.
const BURST: u32 = 20;
/// Agents sharing it.
const AGENTS: usize = 4;
/// What each agent's client sends, requests per second.
const OFFERED: u32 = 400;
/// The rate of the cost rows.
const COST_RATE: u32 = 1_000;

/// How long each row runs.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Each accuracy run.
    pub duration: Duration,
    /// Each cost run.
    pub cost_duration: Duration,
}

/// One accuracy row.
#[derive(Clone, Debug)]
pub struct Accuracy {
    /// `Shared` or `Service`.
    pub scope: &'static str,
    /// Requests accepted in all, per second.
    pub accepted: f64,
    /// Per agent, per second.
    pub per_agent: Vec<f64>,
    /// Requests that failed otherwise than by the limit (should be 0).
    pub other_errors: u64,
}

/// One cost row.
#[derive(Clone, Debug)]
pub struct Cost {
    /// `Pod` (local) or `Shared`.
    pub scope: &'static str,
    /// The agent's CPU per 1,000 requests, milliseconds.
    pub cpu_per_1k: f64,
    /// Store round trips per request.
    pub round_trips: f64,
    /// Requests answered 200 of those sent.
    pub ok: u64,
    /// Requests sent.
    pub sent: u64,
}

/// Everything the rate-limit rows measured.
#[derive(Clone, Debug)]
pub struct Results {
    /// Shared, then Service scope.
    pub accuracy: Vec<Accuracy>,
    /// Pod, then Shared.
    pub cost: Vec<Cost>,
}

/// A redis-server on a free loopback port, as a bench process.
async fn redis(layout: &Layout) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = sut::free_addr()?;
    let args = [
        "--bind",
        "127.0.0.1",
        "--port",
        &addr.port().to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .map(str::to_owned);
    let program = which("redis-server").context(
        "redis-server is not installed (apt-get install redis-server; hack/setup.sh does)",
    )?;
    let mut proc = Proc::spawn(
        layout,
        "redis",
        &program,
        &args,
        layout.load_cpus.as_deref(),
        &[],
    )?;
    proc.wait("listening", || sut::accepts(addr)).await?;
    Ok((proc, addr))
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// Whether the rows can run here.
pub fn available() -> bool {
    which("redis-server").is_some()
}

fn policy(scope: &str, requests: u32, burst: u32) -> String {
    format!(
        "apiVersion: bulwark.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: bench, namespace: {ns}}}
spec:
  targetRefs: [{{kind: Service, name: bench}}]
  limits:
    - name: total
      rate: {{requests: {requests}, per: 1s}}
      burst: {burst}
      scope: {scope}
",
        ns = sut::NAMESPACE
    )
}

/// Runs every row.
pub async fn run(layout: &Layout, settings: Settings) -> anyhow::Result<Results> {
    let upstream = Upstream::start_named(layout, "ratelimit-upstream", Duration::ZERO).await?;
    let (redis, redis_addr) = redis(layout).await?;
    let store = vec![
        "--rate-limit-store-url".to_owned(),
        format!("redis://{redis_addr}"),
    ];
    let mut accuracy = Vec::new();
    for scope in ["Shared", "Service"] {
        eprintln!("  rate limit: {AGENTS} agents under one {scope} limit of {LIMIT}/s");
        accuracy.push(accuracy_row(layout, &upstream, &store, scope, settings.duration).await?);
    }
    let mut cost = Vec::new();
    for scope in ["Pod", "Shared"] {
        eprintln!("  rate limit: one agent at {COST_RATE}/s under a {scope} limit");
        cost.push(cost_row(layout, &upstream, &store, scope, settings.cost_duration).await?);
    }
    redis.stop().await;
    upstream.proc.stop().await;
    Ok(Results { accuracy, cost })
}

/// The mesh of the rows: Service `bench` with one ready endpoint per agent (distinct
/// loopback addresses on the upstream's port), and the policy.
fn mesh(upstream: &Upstream, pods: usize, policy: &str) -> anyhow::Result<MeshDir> {
    let endpoints: Vec<SocketAddr> = (0..pods)
        .map(|i| SocketAddr::from(([127, 0, 2, (i + 1) as u8], upstream.http.port())))
        .collect();
    let mesh = MeshDir::with_endpoints(&endpoints, 1, Policies::None)?;
    mesh.write("limits.yaml", policy)?;
    Ok(mesh)
}

async fn start_agents(
    layout: &Layout,
    control_plane: &ControlPlane,
    upstream: &Upstream,
    store: &[String],
    count: usize,
    what: &str,
) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::new();
    for i in 0..count {
        agents.push(
            Agent::start(
                layout,
                &format!("agent-ratelimit-{what}-{i}"),
                control_plane.grpc,
                upstream.http.port(),
                layout.proxy_cpus.as_deref(),
                store,
            )
            .await?,
        );
    }
    Ok(agents)
}

/// Waits until `agent` enforces the bench's limit (its `/config` lists it).
async fn wait_limit(agent: &Agent) -> anyhow::Result<()> {
    for _ in 0..200 {
        if let Some((200, body)) = sut::fetch(agent.admin, "/config").await
            && body.contains("\"total\"")
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "the agent at {} never got the bench's rate limit",
        agent.admin
    )
}

fn target(addr: SocketAddr) -> Target {
    Target {
        addr,
        authority: sut::SERVICE_AUTHORITY.to_owned(),
        protocol: Protocol::Http1,
    }
}

async fn accuracy_row(
    layout: &Layout,
    upstream: &Upstream,
    store: &[String],
    scope: &'static str,
    duration: Duration,
) -> anyhow::Result<Accuracy> {
    let mesh = mesh(upstream, AGENTS, &policy(scope, LIMIT, BURST))?;
    let control_plane =
        ControlPlane::start(layout, &mesh, "50ms", layout.load_cpus.as_deref()).await?;
    let agents = start_agents(layout, &control_plane, upstream, store, AGENTS, scope).await?;
    for agent in &agents {
        wait_limit(agent).await?;
    }
    let mut runs = Vec::new();
    for agent in &agents {
        let client = Arc::new(Client::connect(target(agent.inbound), 1).await?);
        runs.push(tokio::spawn(load::open_loop(client, OFFERED, duration)));
    }
    let mut per_agent = Vec::new();
    let mut other_errors = 0;
    for run in runs {
        let run = run.await.context("a load generator")?;
        per_agent.push(run.ok as f64 / duration.as_secs_f64());
        // Refusals are errors to the load generator; anything but a 429 is a failure.
        if run
            .first_error
            .as_deref()
            .is_some_and(|e| !e.contains("429"))
        {
            other_errors += run.errors;
        }
    }
    for agent in agents {
        agent.proc.stop().await;
    }
    control_plane.proc.stop().await;
    Ok(Accuracy {
        scope,
        accepted: per_agent.iter().sum(),
        per_agent,
        other_errors,
    })
}

/// A counter's value in an agent's `/metrics` (0 when absent).
async fn counter(agent: &Agent, name: &str) -> f64 {
    let Some((200, text)) = sut::fetch(agent.admin, "/metrics").await else {
        return 0.0;
    };
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn cost_row(
    layout: &Layout,
    upstream: &Upstream,
    store: &[String],
    scope: &'static str,
    duration: Duration,
) -> anyhow::Result<Cost> {
    // Far above the rate: the limit is consulted on every request and never refuses.
    let mesh = mesh(upstream, 1, &policy(scope, 1_000_000, 1_000_000))?;
    let control_plane =
        ControlPlane::start(layout, &mesh, "50ms", layout.load_cpus.as_deref()).await?;
    let agent = start_agents(layout, &control_plane, upstream, store, 1, scope)
        .await?
        .remove(0);
    wait_limit(&agent).await?;
    let client = Arc::new(Client::connect(target(agent.inbound), 1).await?);
    // Warm-up: connections, the first leases.
    let _ = load::open_loop(Arc::clone(&client), COST_RATE, Duration::from_secs(1)).await;
    let ticks = procstat::ticks_per_second();
    let trips_before = counter(&agent, "bulwark_rate_limit_store_round_trips_total").await;
    let before = procstat::sample(agent.proc.pid(), ticks)?;
    let run = load::open_loop(client, COST_RATE, duration).await;
    let after = procstat::sample(agent.proc.pid(), ticks)?;
    let trips = counter(&agent, "bulwark_rate_limit_store_round_trips_total").await - trips_before;
    let sent = run.ok + run.errors;
    agent.proc.stop().await;
    control_plane.proc.stop().await;
    let cpu = after.cpu.saturating_sub(before.cpu);
    Ok(Cost {
        scope,
        cpu_per_1k: cpu.as_secs_f64() * 1_000.0 / (sent.max(1) as f64 / 1_000.0),
        round_trips: trips / sent.max(1) as f64,
        ok: run.ok,
        sent,
    })
}

impl Results {
    /// The rows as Markdown (what goes between [`BEGIN`] and [`END`]).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{AGENTS} agents (pods of one Service), each sent {OFFERED} requests/s by its own client, \
             under one limit of {LIMIT}/s (burst {BURST}):\n\n\
             | scope | accepted in all | per agent | within ±5 % of {LIMIT}/s | other failures |\n\
             |---|---|---|---|---|\n"
        ));
        for row in &self.accuracy {
            let each: Vec<String> = row.per_agent.iter().map(|r| format!("{r:.0}")).collect();
            let within = (row.accepted - f64::from(LIMIT)).abs() <= f64::from(LIMIT) * 0.05;
            out.push_str(&format!(
                "| {} | {:.1}/s | {} | {} | {} |\n",
                row.scope,
                row.accepted,
                each.join(" / "),
                if within { "yes" } else { "**no**" },
                row.other_errors
            ));
        }
        out.push_str(&format!(
            "\nOne agent at {COST_RATE} requests/s under a limit it never reaches, Redis on loopback:\n\n\
             | scope | agent CPU per 1k requests | Redis round trips per request | answered 200 |\n\
             |---|---|---|---|\n"
        ));
        for row in &self.cost {
            out.push_str(&format!(
                "| {} | {:.1} ms | {:.4} | {} of {} |\n",
                row.scope, row.cpu_per_1k, row.round_trips, row.ok, row.sent
            ));
        }
        if let [local, shared] = self.cost.as_slice()
            && local.cpu_per_1k > 0.0
        {
            let added = (shared.cpu_per_1k / local.cpu_per_1k - 1.0) * 100.0;
            out.push_str(&format!(
                "\nAdded CPU of a Shared limit over a local one: {added:+.1} % (target: at most +10 %).\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_say_whether_the_limit_held_and_what_sharing_costs() {
        let results = Results {
            accuracy: vec![
                Accuracy {
                    scope: "Shared",
                    accepted: 201.0,
                    per_agent: vec![50.0, 51.0, 50.0, 50.0],
                    other_errors: 0,
                },
                Accuracy {
                    scope: "Service",
                    accepted: 230.0,
                    per_agent: vec![57.5; 4],
                    other_errors: 0,
                },
            ],
            cost: vec![
                Cost {
                    scope: "Pod",
                    cpu_per_1k: 40.0,
                    round_trips: 0.0,
                    ok: 5_000,
                    sent: 5_000,
                },
                Cost {
                    scope: "Shared",
                    cpu_per_1k: 42.0,
                    round_trips: 0.001,
                    ok: 5_000,
                    sent: 5_000,
                },
            ],
        };
        let text = results.markdown();
        assert!(!text.contains(BEGIN), "the splice adds the markers");
        assert!(
            text.contains("| Shared | 201.0/s | 50 / 51 / 50 / 50 | yes | 0 |"),
            "{text}"
        );
        assert!(
            text.contains("| Service | 230.0/s | 58 / 58 / 58 / 58 | **no** | 0 |"),
            "{text}"
        );
        assert!(
            text.contains("| Shared | 42.0 ms | 0.0010 | 5000 of 5000 |"),
            "{text}"
        );
        assert!(text.contains("+5.0 %"), "{text}");
    }
}
