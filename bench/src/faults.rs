//! `make faults`: the release agent under faults, with real processes on loopback, each
//! scenario bounded in count and time and reported as one table row (requests sent,
//! failed, failed idempotent, the agent's RSS before and after) plus the outcomes it
//! checks. Measured, never asserted by timed tests: `tests/tests/faults.rs` asserts the
//! same outcomes at a small scale.
//!
//! | scenario | module | the fault |
//! |---|---|---|
//! | control plane killed | [`policy`] | SIGKILL under steady GETs, policy edited, restarted |
//! | policy rewrites | [`policy`] | the policy file rewritten 200 times under steady GETs |
//! | endpoint killed | [`endpoint`] | one of two upstream processes SIGKILLed mid-traffic |
//! | SIGTERM | [`drain`] | SIGTERM to the agent with slow requests in flight |
//! | slowloris | [`hostile`] | connections that trickle a request head, a line every 2 s |
//! | idle connections | [`hostile`] | many keep-alive connections holding still |

pub mod drain;
pub mod endpoint;
pub mod hostile;
pub mod policy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::load::{self, Client, Protocol, Run, Target};
use crate::procstat;
use crate::sut::{self, Layout, Upstream};

/// How big and how long each scenario is (from flags or `FAULTS_*` variables).
#[derive(Clone, Debug)]
pub struct Config {
    /// Steady GETs per second through the agent during the traffic scenarios.
    pub rate: u32,
    /// How many times the policy file is rewritten.
    pub rewrites: usize,
    /// Requests in flight when the agent gets SIGTERM.
    pub in_flight: usize,
    /// The upstream's answer time in the SIGTERM scenario.
    pub slow_answer: Duration,
    /// Slowloris connections.
    pub slowloris: usize,
    /// How often each slowloris connection sends one more header line.
    pub trickle: Duration,
    /// The agent's header-read timeout, if it has one (`--help` names the flag).
    pub header_timeout: Option<Duration>,
    /// How long slowloris connections are watched when the agent has no header timeout.
    pub observe: Duration,
    /// Idle keep-alive connections.
    pub idle: usize,
    /// Flags added to every agent's command line (e.g. limits to try).
    pub agent_args: Vec<String>,
    /// The scenarios to run, by [`Scenario::name`]; empty: all.
    pub only: Vec<String>,
}

/// One scenario of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// The control plane killed under load and restarted with a changed policy.
    ControlPlaneKilled,
    /// One of two endpoints killed mid-traffic.
    EndpointKilled,
    /// The policy rewritten many times under load.
    PolicyRewrites,
    /// SIGTERM to the agent with requests in flight.
    Sigterm,
    /// Connections that never finish their request head.
    Slowloris,
    /// Many idle keep-alive connections.
    IdleConnections,
}

impl Scenario {
    /// Every scenario, in the order they run.
    pub const ALL: [Scenario; 6] = [
        Scenario::ControlPlaneKilled,
        Scenario::EndpointKilled,
        Scenario::PolicyRewrites,
        Scenario::Sigterm,
        Scenario::Slowloris,
        Scenario::IdleConnections,
    ];

    /// The short name `FAULTS_ONLY` selects it by.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::ControlPlaneKilled => "control-plane",
            Scenario::EndpointKilled => "endpoint",
            Scenario::PolicyRewrites => "rewrites",
            Scenario::Sigterm => "sigterm",
            Scenario::Slowloris => "slowloris",
            Scenario::IdleConnections => "idle",
        }
    }
}

/// An outcome a scenario checks, and whether it held.
#[derive(Clone, Debug)]
pub struct Check {
    /// What should hold.
    pub expected: String,
    /// What was measured.
    pub measured: String,
    /// Whether it held (none: could not be measured in this run).
    pub met: Option<bool>,
}

impl Check {
    /// A check that `met`.
    pub fn new(expected: impl Into<String>, measured: impl Into<String>, met: bool) -> Check {
        Check {
            expected: expected.into(),
            measured: measured.into(),
            met: Some(met),
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// The scenario, as the table names it.
    pub scenario: String,
    /// Requests (or connections) sent.
    pub sent: Option<u64>,
    /// How many failed.
    pub failed: Option<u64>,
    /// How many idempotent requests (GETs) failed.
    pub failed_idempotent: Option<u64>,
    /// The agent's RSS before the fault, KiB.
    pub rss_before_kib: Option<u64>,
    /// The agent's RSS after it, KiB.
    pub rss_after_kib: Option<u64>,
    /// What else was seen.
    pub notes: String,
    /// The outcomes checked.
    pub checks: Vec<Check>,
}

/// Runs the selected scenarios in order; a scenario that cannot run at all (a process
/// that does not start) becomes a row saying why, and the suite goes on.
pub async fn run(layout: &Layout, config: &Config) -> anyhow::Result<Vec<Row>> {
    let selected: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| config.only.is_empty() || config.only.iter().any(|o| o == s.name()))
        .collect();
    let upstream = Upstream::start(layout).await?;
    let mut rows = Vec::new();
    for scenario in selected {
        eprintln!("faults: {}", scenario.name());
        let result = match scenario {
            Scenario::ControlPlaneKilled => {
                policy::control_plane_killed(layout, config, &upstream).await
            }
            Scenario::EndpointKilled => endpoint::endpoint_killed(layout, config).await,
            Scenario::PolicyRewrites => policy::rewrites(layout, config, &upstream).await,
            Scenario::Sigterm => drain::sigterm(layout, config).await,
            Scenario::Slowloris => hostile::slowloris(layout, config, &upstream).await,
            Scenario::IdleConnections => hostile::idle(layout, config, &upstream).await,
        };
        let row = result.unwrap_or_else(|error| Row {
            scenario: scenario.name().to_owned(),
            notes: format!("did not run: {error:#}"),
            checks: vec![Check {
                expected: format!("{} runs", scenario.name()),
                measured: format!("{error:#}"),
                met: Some(false),
            }],
            ..Row::default()
        });
        eprintln!("  {}", row.notes);
        rows.push(row);
    }
    upstream.proc.stop().await;
    Ok(rows)
}

/// The agent's RSS now, KiB (none once it is gone).
pub fn rss_kib(pid: u32) -> Option<u64> {
    procstat::sample(pid, 100).ok().map(|s| s.rss_kib)
}

/// Polls the agent's RSS every 100 ms until it is within `slack_kib` of `baseline_kib`
/// or `limit` passes; the last reading. Memory a process frees reaches the kernel
/// lazily (the allocator trims its heaps in its own time), so one reading right after
/// connections close would overstate what is kept.
pub async fn rss_settled(pid: u32, baseline_kib: u64, slack_kib: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let now = rss_kib(pid).unwrap_or(0);
        if now <= baseline_kib + slack_kib || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Steady HTTP/1.1 requests with `method` at `rate` per second for `duration` through
/// the agent's outbound listener `addr`, as a task; its [`Run`] counts what failed
/// (an error, or anything but 200 with the 1 KiB body).
pub async fn steady(
    addr: SocketAddr,
    method: http::Method,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<Run>> {
    let target = Target {
        addr,
        authority: sut::SERVICE_AUTHORITY.to_owned(),
        protocol: Protocol::Http1,
    };
    let client = Client::connect(target, 1)
        .await
        .with_context(|| format!("connecting to the agent at {addr}"))?
        .with_method(method);
    Ok(tokio::spawn(load::open_loop(
        Arc::new(client),
        rate,
        duration,
    )))
}

/// A one-line summary of a run's failures: how many and the first error.
pub fn failures(run: &Run) -> String {
    match &run.first_error {
        Some(error) if run.errors > 0 => format!("{} failed, first: {error}", run.errors),
        _ => format!("{} failed", run.errors),
    }
}

/// Reads a JSON admin page (the agent's `/config`, the control plane's `/agents`).
pub async fn json_page(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let (status, body) = sut::fetch(addr, path).await?;
    (status == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

/// Polls `check` every 50 ms until it returns `Some` or `limit` passes.
pub async fn poll<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
