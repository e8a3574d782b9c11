//! SIGTERM with requests in flight: the upstream answers slowly, a batch of GETs is
//! inside the agent when it gets SIGTERM (what the kubelet sends). Each request in
//! flight must complete (graceful drain), the agent must refuse new connections from
//! then on and exit 0 once the last request is answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::policy::policy_yaml;
use super::{Check, Config, Row, poll, rss_kib};
use crate::load::{Client, Protocol, Target};
use crate::sut::{self, Agent, ControlPlane, Layout, MeshDir, Policies, Upstream};

/// How long after SIGTERM a new connection may still be accepted: the signal has to
/// reach the agent and its accept loops have to stop.
const STOP_ACCEPTING: Duration = Duration::from_millis(100);
/// The agent's drain timeout (its default): requests still open after it are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests in flight through the agent, from its bulkhead gauge.
async fn in_flight(agent: &Agent) -> Option<u64> {
    let (_, text) = sut::fetch(agent.admin, "/metrics").await?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("bulwark_bulkhead_in_flight"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

/// What became of the connections opened after SIGTERM.
#[derive(Debug, Default)]
struct Probes {
    refused: u64,
    accepted: u64,
    /// Accepted later than [`STOP_ACCEPTING`] after SIGTERM.
    accepted_late: u64,
    /// Accepted and answered 200.
    served: u64,
}

/// Opens one connection and, if it is accepted, sends a GET and reads the status.
async fn probe(agent: &Agent, since: Instant, probes: &mut Probes) {
    let Ok(mut stream) = TcpStream::connect(agent.outbound).await else {
        probes.refused += 1;
        return;
    };
    probes.accepted += 1;
    if since.elapsed() > STOP_ACCEPTING {
        probes.accepted_late += 1;
    }
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        sut::SERVICE_AUTHORITY
    );
    let answered = async {
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    if let Ok(Some(true)) = tokio::time::timeout(Duration::from_secs(3), answered).await {
        probes.served += 1;
    }
}

/// Scenario 4: see the module doc.
pub async fn sigterm(layout: &Layout, config: &Config) -> anyhow::Result<Row> {
    let upstream = Upstream::start_named(layout, "upstream-slow", config.slow_answer).await?;
    let mesh = MeshDir::new(upstream.http, 1, Policies::None)?;
    mesh.write("policy.yaml", &policy_yaml(3, 10_000))?;
    let cp = ControlPlane::start(layout, &mesh, "50ms", None).await?;
    let mut agent = Agent::start(
        layout,
        "agent-sigterm",
        cp.grpc,
        upstream.http.port(),
        None,
        &config.agent_args,
    )
    .await?;
    let before = rss_kib(agent.proc.pid());

    let target = Target {
        addr: agent.outbound,
        authority: sut::SERVICE_AUTHORITY.to_owned(),
        protocol: Protocol::Http1,
    };
    let client = Arc::new(
        Client::connect(target, 1)
            .await
            .context("connecting to the agent")?,
    );
    let mut requests = Vec::with_capacity(config.in_flight);
    for _ in 0..config.in_flight {
        let client = Arc::clone(&client);
        requests.push(tokio::spawn(async move { client.request().await }));
    }
    let wanted = config.in_flight as u64;
    let seen = poll(config.slow_answer / 2, || async {
        in_flight(&agent).await.filter(|n| *n >= wanted)
    })
    .await
    .or(in_flight(&agent).await)
    .unwrap_or(0);
    let at_sigterm = rss_kib(agent.proc.pid());
    agent.proc.terminate()?;
    let signalled = Instant::now();

    let mut probes = Probes::default();
    let limit = DRAIN_TIMEOUT + Duration::from_secs(5);
    let exit = loop {
        if let Some(status) = agent.proc.wait_exit(Duration::from_millis(20)).await {
            break Some(status);
        }
        if signalled.elapsed() > limit {
            break None;
        }
        probe(&agent, signalled, &mut probes).await;
    };
    let exited_after = signalled.elapsed();
    let mut completed = 0u64;
    let mut first_error = None;
    for request in requests {
        match request.await {
            Ok(Ok(())) => completed += 1,
            Ok(Err(error)) => {
                first_error.get_or_insert_with(|| error.to_string());
            }
            Err(error) => {
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    agent.proc.stop().await;
    cp.proc.stop().await;
    upstream.proc.stop().await;

    let failed = wanted - completed;
    let exit_text = match exit {
        Some(status) => format!(
            "exited ({status}) {:.2} s after SIGTERM",
            exited_after.as_secs_f64()
        ),
        None => format!("still running {limit:?} after SIGTERM"),
    };
    let probe_text = format!(
        "{} connection attempts after SIGTERM: {} refused, {} accepted ({} after {} ms, {} served)",
        probes.refused + probes.accepted,
        probes.refused,
        probes.accepted,
        probes.accepted_late,
        STOP_ACCEPTING.as_millis(),
        probes.served
    );
    Ok(Row {
        scenario: "SIGTERM with requests in flight".to_owned(),
        sent: Some(wanted),
        failed: Some(failed),
        failed_idempotent: Some(failed),
        rss_before_kib: before,
        rss_after_kib: at_sigterm,
        notes: format!(
            "{wanted} GETs to a {} ms upstream, {seen} in flight at SIGTERM; {exit_text}; {probe_text}{}; RSS after is at SIGTERM",
            config.slow_answer.as_millis(),
            first_error
                .map(|e| format!("; first failure: {e}"))
                .unwrap_or_default()
        ),
        checks: vec![
            Check::new(
                "SIGTERM: every request in flight completes",
                format!("{completed} of {wanted} answered 200"),
                failed == 0,
            ),
            Check::new(
                "SIGTERM: new connections refused once the agent stops accepting",
                probe_text,
                probes.accepted_late == 0 && probes.refused > 0,
            ),
            Check::new(
                "SIGTERM: the agent exits 0 once drained",
                exit_text,
                exit.is_some_and(|s| s.success()) && exited_after < DRAIN_TIMEOUT,
            ),
        ],
    })
}
