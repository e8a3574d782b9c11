//! Hostile clients on the agent's inbound listener (where the world reaches the pod):
//!
//! - slowloris: connections that send a request line, then one header line every
//!   `trickle`, and never finish the head. The agent should close each one at its
//!   header-read timeout, and give the memory back once they are gone;
//! - idle: keep-alive connections that made one request and hold still. What they
//!   cost in RSS while open, and whether it comes back once they close.
//!
//! Raw sockets, so that the runner's own side of each connection costs a few hundred
//! bytes and 10,000 of them fit beside the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Check, Config, Row, rss_kib, rss_settled, steady};
use crate::sut::{Agent, ControlPlane, Layout, MeshDir, Policies, Upstream};

/// Connections being opened at once (a listener's accept backlog is finite).
const OPENING: usize = 128;
/// RSS may stay this far above the baseline once the connections are gone (the target).
const RSS_SLACK_BYTES: u64 = 2_000_000;
/// How long memory gets to come back after the connections close.
const SETTLE: Duration = Duration::from_secs(10);
/// How late past the header timeout a close still counts as "at the timeout". The
/// agent's timer starts when it accepts, the runner's clock when it connects: on a busy
/// machine a burst of connects can overflow the listener's accept queue, and the
/// client's kernel sends the handshake again 1 s later (`nstat TcpExtListenOverflows`).
const CLOSE_SLACK: Duration = Duration::from_millis(1500);
/// The idle-connections target: RSS with all of them open.
const IDLE_RSS_TARGET_BYTES: u64 = 30_000_000;
/// At most this long for the idle connections' RSS to stop falling.
const IDLE_STEADY: Duration = Duration::from_secs(40);
/// RSS is steady once it has not fallen for this long: longer than the agent's pool
/// purge interval (5 s: the idle upstream connections beyond recent use close then, half
/// at a time) plus the allocator's decay (1 s).
const IDLE_FLAT: Duration = Duration::from_secs(7);

/// The process's RSS once it no longer falls: the lowest reading, taken every half
/// second until it has not fallen for [`IDLE_FLAT`] (or `limit` passed).
async fn rss_steady(pid: u32, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut lowest = rss_kib(pid).unwrap_or(0);
    let mut flat = 0;
    let readings = IDLE_FLAT.as_millis() / 500;
    while flat < readings && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib(pid).unwrap_or(0);
        if now < lowest {
            (lowest, flat) = (now, 0);
        } else {
            flat += 1;
        }
    }
    lowest
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A control plane and an agent whose inbound listener forwards to `upstream`, warmed
/// up with a second of GETs on its inbound listener so that the baseline RSS includes
/// what any served request leaves (pools, buffers, metrics).
async fn agent(
    layout: &Layout,
    config: &Config,
    upstream: &Upstream,
    name: &str,
) -> anyhow::Result<(MeshDir, ControlPlane, Agent)> {
    let mesh = MeshDir::new(upstream.http, 1, Policies::None)?;
    let cp = ControlPlane::start(layout, &mesh, "50ms", None).await?;
    let agent = Agent::start(
        layout,
        name,
        cp.grpc,
        upstream.http.port(),
        None,
        &config.agent_args,
    )
    .await?;
    let warm_up = steady(
        agent.inbound,
        http::Method::GET,
        200,
        Duration::from_secs(1),
    )
    .await?;
    let _ = warm_up.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((mesh, cp, agent))
}

/// How one slowloris connection ended.
enum Slow {
    /// The connect failed (refused or shed).
    NotOpened,
    /// The agent closed it this long after it was opened.
    Closed(Duration),
    /// Still open when the watch ended.
    Open,
}

async fn slow_connection(
    addr: std::net::SocketAddr,
    trickle: Duration,
    until: Instant,
    opening: Arc<Semaphore>,
    open: Arc<AtomicU64>,
) -> Slow {
    let permit = opening.acquire_owned().await;
    let opened = Instant::now();
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return Slow::NotOpened;
    };
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench.bench\r\n")
        .await
        .is_err()
    {
        return Slow::Closed(opened.elapsed());
    }
    drop(permit);
    open.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 512];
    let mut line = 0u64;
    let ended = loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                // An answer (a 408) may come first; the close is what counts.
                Ok(n) if n > 0 => continue,
                _ => break Slow::Closed(opened.elapsed()),
            },
            () = tokio::time::sleep(trickle) => {
                line += 1;
                let header = format!("X-Slow-{line}: 1\r\n");
                if stream.write_all(header.as_bytes()).await.is_err() {
                    break Slow::Closed(opened.elapsed());
                }
            }
            () = tokio::time::sleep_until(until.into()) => break Slow::Open,
        }
    };
    open.fetch_sub(1, Ordering::Relaxed);
    ended
}

/// Scenario 5: see the module doc.
pub async fn slowloris(
    layout: &Layout,
    config: &Config,
    upstream: &Upstream,
) -> anyhow::Result<Row> {
    let (_mesh, cp, agent) = agent(layout, config, upstream, "agent-slowloris").await?;
    let pid = agent.proc.pid();
    let baseline = rss_kib(pid).unwrap_or(0);
    let window = config
        .header_timeout
        .map_or(config.observe, |t| t + Duration::from_secs(5));
    let started = Instant::now();
    let until = started + window;
    let opening = Arc::new(Semaphore::new(OPENING));
    let open = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..config.slowloris {
        tasks.spawn(slow_connection(
            agent.inbound,
            config.trickle,
            until,
            Arc::clone(&opening),
            Arc::clone(&open),
        ));
    }
    // Sample while they trickle: the peak, and how many were open at the timeout.
    let mut peak = baseline;
    let mut open_at_timeout = None;
    let mut ended = Vec::with_capacity(config.slowloris);
    while !tasks.is_empty() {
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        if let Some(timeout) = config.header_timeout
            && open_at_timeout.is_none()
            && started.elapsed() >= timeout + CLOSE_SLACK
        {
            open_at_timeout = Some(open.load(Ordering::Relaxed));
        }
        let tick = tokio::time::sleep(Duration::from_millis(250));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                () = &mut tick => break,
                next = tasks.join_next() => match next {
                    Some(result) => ended.push(result),
                    None => break,
                },
            }
        }
    }
    let (mut not_opened, mut closed, mut still_open) = (0u64, 0u64, 0u64);
    let mut longest = Duration::ZERO;
    let mut late = 0u64;
    for result in ended {
        match result {
            Ok(Slow::NotOpened) => not_opened += 1,
            Ok(Slow::Closed(after)) => {
                closed += 1;
                longest = longest.max(after);
                if config
                    .header_timeout
                    .is_some_and(|t| after > t + Duration::from_millis(100))
                {
                    late += 1;
                }
            }
            Ok(Slow::Open) | Err(_) => still_open += 1,
        }
    }
    // Whatever the agent left open, the client has now closed.
    let after = rss_settled(pid, baseline, RSS_SLACK_BYTES / 1024, SETTLE).await;
    agent.proc.stop().await;
    cp.proc.stop().await;

    let n = config.slowloris as u64;
    let timeout_text = config.header_timeout.map_or_else(
        || "the agent has no header-read timeout flag".to_owned(),
        |t| format!("header timeout {} s", t.as_secs_f64()),
    );
    let closed_text = format!(
        "{closed} of {n} closed by the agent (the last {:.2} s after it opened; {late} later than the timeout + 0.1 s), {still_open} still open after {:.0} s, {not_opened} not accepted{}",
        longest.as_secs_f64(),
        window.as_secs_f64(),
        open_at_timeout
            .map(|o| format!(", {o} open at the timeout + {} s", CLOSE_SLACK.as_secs()))
            .unwrap_or_default()
    );
    let returned = after.saturating_sub(baseline) * 1024 <= RSS_SLACK_BYTES;
    Ok(Row {
        scenario: format!("slowloris ({n} connections)"),
        sent: Some(n),
        failed: None,
        failed_idempotent: None,
        rss_before_kib: Some(baseline),
        rss_after_kib: Some(after),
        notes: format!(
            "a header line every {} s; {timeout_text}; {closed_text}; RSS peak {}",
            config.trickle.as_secs_f64(),
            mib(peak)
        ),
        checks: vec![
            Check::new(
                format!("{n} slowloris connections closed within the header timeout"),
                format!("{timeout_text}; {closed_text}"),
                config
                    .header_timeout
                    .is_some_and(|t| closed == n && longest <= t + CLOSE_SLACK),
            ),
            Check::new(
                "slowloris: RSS back within 2 MB of its baseline",
                format!(
                    "{} → peak {} → {} ({} s after the last close at most)",
                    mib(baseline),
                    mib(peak),
                    mib(after),
                    SETTLE.as_secs()
                ),
                returned,
            ),
        ],
    })
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body); its status.
async fn read_response(stream: &mut TcpStream) -> std::io::Result<u16> {
    let broken = |what: &str| std::io::Error::other(what.to_owned());
    let mut raw = Vec::with_capacity(2048);
    let mut buf = [0u8; 2048];
    let head_end = loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 || raw.len() > 64 * 1024 {
            return Err(broken("closed before the response head"));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| broken("no status line"))?;
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let done = |raw: &[u8]| match length {
        Some(len) => raw.len() >= head_end + len,
        None => raw[head_end..].ends_with(b"0\r\n\r\n"),
    };
    while !done(&raw) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(broken("closed before the end of the body"));
        }
        raw.extend_from_slice(&buf[..n]);
    }
    Ok(status)
}

/// Opens one keep-alive connection and makes one request on it.
async fn idle_connection(addr: std::net::SocketAddr, opening: Arc<Semaphore>) -> Option<TcpStream> {
    let _permit = opening.acquire_owned().await;
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench.bench\r\n\r\n")
        .await
        .ok()?;
    let status = tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .ok()?
        .ok()?;
    (status == 200).then_some(stream)
}

/// Scenario 6: see the module doc.
pub async fn idle(layout: &Layout, config: &Config, upstream: &Upstream) -> anyhow::Result<Row> {
    let (_mesh, cp, agent) = agent(layout, config, upstream, "agent-idle").await?;
    let pid = agent.proc.pid();
    let baseline = rss_kib(pid).unwrap_or(0);
    let opening = Arc::new(Semaphore::new(OPENING));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..config.idle {
        tasks.spawn(idle_connection(agent.inbound, Arc::clone(&opening)));
    }
    let mut streams = Vec::with_capacity(config.idle);
    while let Some(opened) = tasks.join_next().await {
        if let Ok(Some(stream)) = opened {
            streams.push(stream);
        }
    }
    let opened_in = started.elapsed();
    // Let the agent finish with the requests (pooled upstream connections settle), then
    // measure the idle state: the agent's allocator gives freed pages back over about a
    // second (jemalloc's decay), so the state the connections' requests left is gone
    // only once RSS stops falling.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_them = rss_steady(pid, IDLE_STEADY).await;
    let held = streams.len() as u64;
    drop(streams);
    let after = rss_settled(pid, baseline, RSS_SLACK_BYTES / 1024, SETTLE).await;
    agent.proc.stop().await;
    cp.proc.stop().await;

    let n = config.idle as u64;
    let per_connection = with_them.saturating_sub(baseline) as f64 * 1024.0 / held.max(1) as f64;
    let measured = format!(
        "{} with {held} of {n} open ({:.1} KiB each above the {} baseline)",
        mib(with_them),
        per_connection / 1024.0,
        mib(baseline)
    );
    Ok(Row {
        scenario: format!("{n} idle keep-alive connections"),
        sent: Some(n),
        failed: Some(n - held),
        failed_idempotent: Some(n - held),
        rss_before_kib: Some(baseline),
        rss_after_kib: Some(after),
        notes: format!(
            "one GET each, then silence; opened in {:.1} s; RSS (once it stops falling) {measured}; {} once closed",
            opened_in.as_secs_f64(),
            mib(after)
        ),
        checks: vec![
            Check::new(
                format!("{n} idle connections ≤ 30 MB RSS"),
                measured,
                held == n && with_them * 1024 <= IDLE_RSS_TARGET_BYTES,
            ),
            Check::new(
                "idle connections: RSS back within 2 MB of its baseline once closed",
                format!("{} → {}", mib(baseline), mib(after)),
                after.saturating_sub(baseline) * 1024 <= RSS_SLACK_BYTES,
            ),
        ],
    })
}
