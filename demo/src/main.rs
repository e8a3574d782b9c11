//! `bulwark-demo` (`make demo`): starts the control plane on `examples/`,
//! `examples/sharded/` and `examples/canary/` (each with its `local/` folder of loopback
//! endpoints), the demo upstreams (healthy, flaky,
//! one that goes down and comes back, one that hangs, the pods of a sharded service
//! and those of a canary) and the agent as
//! real processes; drives traffic through the agent for
//! 30 seconds; prints what each policy did; and stops everything it started,
//! also on Ctrl-C and on errors.

mod canary;
mod examples;
mod identity;
mod latency;
mod observer;
mod progress;
mod report;
mod scaling;
mod sharded;
mod supervisor;
mod traffic;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bulwark_testkit::{HttpClient, Metrics, Stats};
use bytes::Bytes;
use clap::Parser;
use http::Method;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing_subscriber::EnvFilter;

use crate::progress::Progress;
use crate::report::{Inputs, UpstreamReport};
use crate::supervisor::Supervisor;
use crate::traffic::{Run, Steady};

/// Runs Bulwark end to end on loopback and summarises what each policy did.
#[derive(Debug, Parser)]
#[command(name = "bulwark-demo", version)]
struct Args {
    /// Folder holding bulwark-control-plane, bulwark-agent and bulwark-upstream
    /// [default: the folder of this executable].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Folder of mesh YAML the control plane serves (with its `sharded/` and `canary/` folders).
    #[arg(long, default_value = "examples")]
    examples: PathBuf,
    /// Folder for the processes' logs [default: BIN_DIR/../demo/logs, i.e. target/demo/logs].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// How long each process may take to become ready, in seconds.
    #[arg(long, default_value_t = 20)]
    ready_timeout: u64,
}

// Fixed addresses (COMMON ports; upstream addresses from examples/services.yaml).
const CP_GRPC: &str = "127.0.0.1:9990";
const CP_ADMIN: &str = "127.0.0.1:9991";
const AGENT_OUTBOUND: &str = "127.0.0.1:4140";
const AGENT_INBOUND: &str = "127.0.0.1:4143";
const AGENT_ADMIN: &str = "127.0.0.1:4191";
const FRONTEND_APP: &str = "127.0.0.1:8080";
const REVIEWS_DOWN: &str = "127.0.0.23:8080";

// The script, in time from the start of the traffic.
const TRAFFIC: Duration = Duration::from_secs(30);
const BREAK_AT: Duration = Duration::from_secs(3);
const HEAL_AT: Duration = Duration::from_secs(15);
const PAYMENTS_FROM: Duration = Duration::from_secs(8);
const PAYMENTS_UNTIL: Duration = Duration::from_secs(16);
const INBOUND_FROM: Duration = Duration::from_secs(18);
const INBOUND_UNTIL: Duration = Duration::from_secs(28);

/// How often the demo checks that every process is still running.
const LIVENESS_CHECK: Duration = Duration::from_millis(500);

/// One demo upstream process.
struct UpstreamSpec {
    name: &'static str,
    addr: &'static str,
    role: &'static str,
    knobs: &'static [&'static str],
}

const UPSTREAMS: &[UpstreamSpec] = &[
    UpstreamSpec {
        name: "catalog-1",
        addr: "127.0.0.11:8080",
        role: "healthy, 1 ms",
        knobs: &["--latency-ms", "1"],
    },
    UpstreamSpec {
        name: "reviews-1",
        addr: "127.0.0.21:8080",
        role: "flaky: 30% 503",
        // With this seed the first 6,000 draws (more tries than 30 s bring)
        // hold no run of 5 failures, so the breaker (5 consecutive failures)
        // leaves this endpoint alone and it shows retries at work. Most seeds
        // give a run of 5 now and then and the breaker trips: right too, but
        // it blurs the story. See `flaky_seed_never_fails_5_in_a_row`.
        knobs: &[
            "--fail-ratio",
            "0.3",
            "--fail-status",
            "503",
            "--seed",
            "1190",
        ],
    },
    UpstreamSpec {
        name: "reviews-2",
        addr: "127.0.0.22:8080",
        role: "healthy",
        knobs: &[],
    },
    UpstreamSpec {
        name: "reviews-3",
        addr: REVIEWS_DOWN,
        role: "500s from 3s to 15s",
        knobs: &[],
    },
    UpstreamSpec {
        name: "payments-1",
        addr: "127.0.0.31:8080",
        role: "hangs",
        knobs: &["--hang"],
    },
    UpstreamSpec {
        name: "frontend",
        addr: FRONTEND_APP,
        role: "the frontend app behind the agent's inbound listener",
        knobs: &[],
    },
];

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    match demo(Args::parse()).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("\nbulwark-demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: Args) -> anyhow::Result<ExitCode> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("finding this executable's folder (pass --bin-dir)")?
            .parent()
            .context("this executable has no parent folder (pass --bin-dir)")?
            .to_owned(),
    };
    let log_dir = match &args.log_dir {
        Some(dir) => dir.clone(),
        None => bin_dir
            .parent()
            .unwrap_or(&bin_dir)
            .join("demo")
            .join("logs"),
    };
    for binary in ["bulwark-control-plane", "bulwark-agent", "bulwark-upstream"] {
        supervisor::check_binary(&bin_dir, binary)?;
    }
    let mut supervisor = Supervisor::new(&bin_dir, &log_dir)?;

    let outcome = tokio::select! {
        result = run(&args, &mut supervisor) => Some(result),
        () = interrupted() => None,
    };
    supervisor.shutdown().await;
    match outcome {
        None => {
            eprintln!("\ninterrupted: every process the demo started has been stopped");
            Ok(ExitCode::from(130))
        }
        Some(Ok(finished)) => {
            print!("{}", finished.summary);
            println!(
                "\nAll demo processes stopped; their logs are in {}",
                log_dir.display()
            );
            if finished.problems.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                for problem in &finished.problems {
                    eprintln!("problem: {problem}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Some(Err(err)) => {
            eprintln!(
                "\nbulwark-demo failed: {err:#}\n(every process it started has been stopped; their logs are in {})",
                log_dir.display()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What a complete run produced.
struct Finished {
    summary: String,
    /// Signs that the demo did not really work (it then exits non-zero).
    problems: Vec<String>,
}

fn addr(text: &str) -> anyhow::Result<SocketAddr> {
    text.parse()
        .with_context(|| format!("{text} is not an address"))
}

async fn run(args: &Args, supervisor: &mut Supervisor) -> anyhow::Result<Finished> {
    let examples = std::fs::canonicalize(&args.examples).with_context(|| {
        format!(
            "examples folder {} not found: run from the repository root or pass --examples",
            args.examples.display()
        )
    })?;
    let sharded_dir = examples.join("sharded");
    let layout = sharded::layout(&sharded_dir)
        .with_context(|| format!("reading the sharded service in {}", sharded_dir.display()))?;
    let canary_dir = examples.join("canary");
    let canary = canary::canary(&canary_dir)
        .with_context(|| format!("reading the canary in {}", canary_dir.display()))?;
    preflight_ports(&layout, &canary)?;
    let ready_timeout = Duration::from_secs(args.ready_timeout);
    let started = Instant::now();

    println!(
        "Starting Bulwark on loopback (process logs in {})",
        supervisor.log_dir().display()
    );
    let identity = identity::prepare(supervisor.log_dir())?;
    let scaling_dir = scaling::dir(supervisor.log_dir());
    scaling::prepare(&scaling_dir)?;
    supervisor.spawn(
        "control-plane",
        "bulwark-control-plane",
        &strings(&[
            "--source",
            &format!("dir:{}", examples.display()),
            "--source",
            &format!("dir:{}", examples.join(examples::LOCAL).display()),
            "--source",
            &format!("dir:{}", sharded_dir.display()),
            "--source",
            &format!("dir:{}", sharded_dir.join(examples::LOCAL).display()),
            "--source",
            &format!("dir:{}", canary_dir.display()),
            "--source",
            &format!("dir:{}", canary_dir.join(examples::LOCAL).display()),
            "--source",
            &format!("dir:{}", scaling_dir.display()),
            "--grpc-addr",
            CP_GRPC,
            "--admin-addr",
            CP_ADMIN,
            "--identity-generate",
            &identity.anchor.display().to_string(),
            "--token-file",
            &identity.tokens.display().to_string(),
        ]),
    )?;
    supervisor
        .wait_ready("control-plane", addr(CP_ADMIN)?, "/ready", ready_timeout)
        .await?;
    println!(
        "  control plane ready: gRPC {CP_GRPC}, admin http://{CP_ADMIN} (serving {}, {} and {}, \
         each with the loopback endpoints of its local/ folder)",
        examples.display(),
        sharded_dir.display(),
        canary_dir.display()
    );

    for upstream in UPSTREAMS {
        let mut upstream_args = strings(&["--listen", upstream.addr, "--name", upstream.name]);
        upstream_args.extend(strings(upstream.knobs));
        supervisor.spawn(upstream.name, "bulwark-upstream", &upstream_args)?;
    }
    for pod in &layout.pods {
        let args = strings(&["--listen", &pod.addr.to_string(), "--name", &pod.name]);
        supervisor.spawn(&pod.name, "bulwark-upstream", &args)?;
    }
    for pod in &canary.pods {
        let args = strings(&["--listen", &pod.addr.to_string(), "--name", &pod.name]);
        supervisor.spawn(&pod.name, "bulwark-upstream", &args)?;
    }
    for upstream in UPSTREAMS {
        supervisor
            .wait_ready(
                upstream.name,
                addr(upstream.addr)?,
                "/_upstream/stats",
                ready_timeout,
            )
            .await?;
        println!(
            "  upstream {:<10} {:<16} {}",
            upstream.name, upstream.addr, upstream.role
        );
    }

    for pod in &layout.pods {
        supervisor
            .wait_ready(&pod.name, pod.addr, "/_upstream/stats", ready_timeout)
            .await?;
        println!(
            "  upstream {:<18} {:<16} shard {} {:?}",
            pod.name, pod.addr, pod.shard, pod.role
        );
    }
    for pod in &canary.pods {
        supervisor
            .wait_ready(&pod.name, pod.addr, "/_upstream/stats", ready_timeout)
            .await?;
        println!(
            "  upstream {:<18} {:<16} backend {}",
            pod.name, pod.addr, pod.backend
        );
    }

    supervisor.spawn(
        "agent",
        "bulwark-agent",
        &strings(&[
            "--control-plane",
            &format!("https://{CP_GRPC}"),
            "--control-plane-ca",
            &identity.anchor.display().to_string(),
            "--token-file",
            &identity.agent_token.display().to_string(),
            "--namespace",
            "demo",
            "--pod-name",
            "frontend-0",
            "--service-account",
            "frontend",
            "--label",
            "app=frontend",
            "--outbound-addr",
            AGENT_OUTBOUND,
            "--inbound",
            &format!("{AGENT_INBOUND}={}", addr(FRONTEND_APP)?.port()),
            "--admin-addr",
            AGENT_ADMIN,
        ]),
    )?;
    supervisor
        .wait_ready("agent", addr(AGENT_ADMIN)?, "/ready", ready_timeout)
        .await?;
    println!(
        "  agent ready: outbound proxy {AGENT_OUTBOUND}, inbound {AGENT_INBOUND} -> {FRONTEND_APP}, admin http://{AGENT_ADMIN}"
    );
    let workload = identity::of_agent(addr(AGENT_ADMIN)?).await;
    println!("  agent identity: {workload}");
    println!(
        "Everything up in {:.1}s; driving traffic for {}s\n",
        started.elapsed().as_secs_f64(),
        TRAFFIC.as_secs()
    );

    let traffic = drive_traffic(supervisor, &layout, &canary).await?;
    println!("Scaling Service api from 1 to 3 ready pods under a service-wide limit");
    let scaled = scaling::run(
        supervisor,
        &scaling_dir,
        &format!("https://{CP_GRPC}"),
        &identity.anchor,
        &identity.api_tokens,
        ready_timeout,
    )
    .await;

    let metrics = match Metrics::scrape(addr(AGENT_ADMIN)?).await {
        Ok(metrics) => Some(metrics),
        Err(err) => {
            eprintln!(
                "warning: the final scrape of the agent's metrics failed ({err}); using the last good one"
            );
            traffic.last_metrics.clone()
        }
    };
    let control_plane = match Metrics::scrape(addr(CP_ADMIN)?).await {
        Ok(metrics) => Some(metrics),
        Err(err) => {
            eprintln!("warning: reading the control plane's metrics failed ({err})");
            None
        }
    };
    let mut upstreams = Vec::with_capacity(UPSTREAMS.len());
    for upstream in UPSTREAMS {
        let upstream_addr = addr(upstream.addr)?;
        upstreams.push(UpstreamReport {
            name: upstream.name.to_owned(),
            addr: upstream_addr,
            role: upstream.role.to_owned(),
            stats: upstream_stats(upstream_addr).await,
        });
    }
    let bucket = match examples::rate_limit(&examples, "demo", "frontend", "per-tenant") {
        Ok(bucket) => Some(bucket),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the per-tenant limit from the examples");
            None
        }
    };

    let mut summary = report::render(&Inputs {
        traffic: TRAFFIC,
        reviews: &traffic.reviews,
        catalog: &traffic.catalog,
        payments: &traffic.payments,
        payments_window: (PAYMENTS_FROM, PAYMENTS_UNTIL),
        acme: &traffic.acme,
        globex: &traffic.globex,
        observations: &traffic.observations,
        metrics: metrics.as_ref(),
        control_plane: control_plane.as_ref(),
        upstreams: &upstreams,
        bucket,
    });

    summary.push_str(&format!(
        "\nidentity\n  control plane: gRPC over TLS with a generated issuer (anchor {}); agents \
         subscribe with their ServiceAccount token\n  agent frontend-0: {workload}\n",
        identity.anchor.display()
    ));
    let denied = identity::denied_call(addr(AGENT_INBOUND)?, addr(AGENT_ADMIN)?).await;
    summary.push_str(&denied.summary);
    let mut problems_from_identity = denied.problems;
    let mut problems = sharded::report(&mut summary, &layout, &traffic.sharded, metrics.as_ref());
    problems.append(&mut problems_from_identity);
    problems.extend(canary::report(
        &mut summary,
        &canary,
        &traffic.canary,
        metrics.as_ref(),
    ));
    problems.extend(scaling::report(&mut summary, &scaled));
    for (what, run) in [
        ("reviews", &traffic.reviews),
        ("catalog", &traffic.catalog),
        ("frontend (inbound)", &traffic.globex),
    ] {
        if !run.outcomes.iter().any(|o| o.is_success()) {
            let example = run
                .outcomes
                .first()
                .map(|o| format!("{:?} {:?} {:?}", o.status, o.reason, o.error))
                .unwrap_or_default();
            problems.push(format!(
                "no request to {what} succeeded through the agent (first outcome: {example})"
            ));
        }
    }
    if metrics.is_none() {
        problems.push(format!(
            "the agent's metrics at http://{AGENT_ADMIN}/metrics could not be read"
        ));
    }
    Ok(Finished { summary, problems })
}

/// Everything the traffic phase produced.
struct Traffic {
    reviews: Run,
    catalog: Run,
    payments: Run,
    acme: Run,
    globex: Run,
    sharded: Vec<sharded::Record>,
    canary: Vec<canary::Record>,
    observations: observer::Observations,
    last_metrics: Option<Metrics>,
}

async fn drive_traffic(
    supervisor: &mut Supervisor,
    layout: &sharded::Layout,
    canary: &canary::Canary,
) -> anyhow::Result<Traffic> {
    let outbound = addr(AGENT_OUTBOUND)?;
    let inbound = addr(AGENT_INBOUND)?;
    let reviews_down = addr(REVIEWS_DOWN)?;
    let proxy = |timeout: Duration| HttpClient::proxy(outbound).with_timeout(timeout);
    let steady = |client: HttpClient,
                  method: Method,
                  url: &str,
                  rate: f64,
                  from: Duration,
                  until: Duration| Steady {
        client,
        method,
        url: url.to_owned(),
        headers: Vec::new(),
        body: Bytes::new(),
        rate,
        from,
        until,
        max_in_flight: 256,
    };
    let reviews = steady(
        proxy(Duration::from_secs(10)),
        Method::GET,
        "http://reviews.demo/",
        200.0,
        Duration::ZERO,
        TRAFFIC,
    );
    let catalog = steady(
        proxy(Duration::from_secs(10)),
        Method::GET,
        "http://catalog.demo/",
        100.0,
        Duration::ZERO,
        TRAFFIC,
    );
    let payments = Steady {
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from_static(br#"{"amount": 42}"#),
        ..steady(
            proxy(Duration::from_secs(5)),
            Method::POST,
            "http://payments.demo/charge",
            40.0,
            PAYMENTS_FROM,
            PAYMENTS_UNTIL,
        )
    };
    let tenant = |name: &str, rate: f64| Steady {
        headers: vec![("x-tenant-id".into(), name.to_owned())],
        ..steady(
            HttpClient::direct(inbound).with_timeout(Duration::from_secs(10)),
            Method::GET,
            "/",
            rate,
            INBOUND_FROM,
            INBOUND_UNTIL,
        )
    };
    let (acme, globex) = (tenant("acme", 50.0), tenant("globex", 4.0));

    let start = Instant::now();
    let progress = Progress::new(start);
    progress.say(
        Duration::ZERO,
        &format!(
            "reviews at 200/s, catalog at 100/s and keyed reads and writes of orders.shop at 20/s, checkout.shop's canary at 10/s through the outbound proxy {AGENT_OUTBOUND}"
        ),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let watcher = observer::watch(addr(AGENT_ADMIN)?, start, progress, stop_rx);
    let generators = async {
        let runs = tokio::join!(
            reviews.run(start),
            catalog.run(start),
            payments.run(start),
            acme.run(start),
            globex.run(start),
            sharded::drive(layout, outbound, start, progress, TRAFFIC),
            canary::drive(canary, outbound, start, TRAFFIC),
            script(start, progress, reviews_down),
        );
        let _ = stop_tx.send(true);
        runs
    };
    let everything = async { tokio::join!(watcher, generators) };
    tokio::pin!(everything);
    let mut liveness = tokio::time::interval(LIVENESS_CHECK);
    let (
        (observations, last_metrics),
        (reviews, catalog, payments, acme, globex, sharded, canary, ()),
    ) = loop {
        tokio::select! {
            done = &mut everything => break done,
            _ = liveness.tick() => supervisor.check_alive()?,
        }
    };
    progress.say(start.elapsed(), "traffic over");
    Ok(Traffic {
        reviews,
        catalog,
        payments,
        acme,
        globex,
        sharded,
        canary,
        observations,
        last_metrics,
    })
}

/// The timed events of the demo, announced as they happen.
async fn script(start: Instant, progress: Progress, reviews_down: SocketAddr) {
    let at = |offset: Duration| tokio::time::sleep_until(start + offset);

    at(BREAK_AT).await;
    set_knobs(
        reviews_down,
        r#"{"fail_ratio": 1.0, "fail_status": 500}"#,
        progress,
    )
    .await;
    progress.now(&format!(
        "{REVIEWS_DOWN} (reviews-3) now answers 500 to everything"
    ));

    at(PAYMENTS_FROM).await;
    progress.now("payments: 40 POST/s to a service that hangs");

    at(HEAL_AT).await;
    set_knobs(reviews_down, "{}", progress).await;
    progress.now(&format!(
        "{REVIEWS_DOWN} (reviews-3) healthy again; a probe will close its breaker"
    ));

    at(PAYMENTS_UNTIL).await;
    progress.now("payments: flood over");

    at(INBOUND_FROM).await;
    progress.now(&format!(
        "inbound: tenant acme at 50/s and globex at 4/s to {AGENT_INBOUND}"
    ));

    at(INBOUND_UNTIL).await;
    progress.now("inbound: done");
}

async fn set_knobs(upstream: SocketAddr, json: &str, progress: Progress) {
    let result = bulwark_testkit::request(
        upstream,
        Method::PUT,
        "/_upstream/knobs",
        &[("content-type", "application/json")],
        json.to_owned(),
    )
    .await;
    match result {
        Ok(response) if response.status == http::StatusCode::OK => {}
        Ok(response) => progress.now(&format!(
            "warning: changing the knobs of {upstream} failed: {} {}",
            response.status,
            response.text()
        )),
        Err(err) => progress.now(&format!(
            "warning: changing the knobs of {upstream} failed: {err}"
        )),
    }
}

async fn upstream_stats(upstream: SocketAddr) -> Option<Stats> {
    match bulwark_testkit::get(upstream, "/_upstream/stats", &[]).await {
        Ok(response) => response.json().ok(),
        Err(err) => {
            tracing::warn!(%upstream, error = %err, "reading upstream stats failed");
            None
        }
    }
}

/// Fails early, with a hint, when an address the demo needs is taken or not
/// local (on macOS, 127.0.0.N for N > 1 needs `sudo ifconfig lo0 alias 127.0.0.N`).
fn preflight_ports(layout: &sharded::Layout, canary: &canary::Canary) -> anyhow::Result<()> {
    let fixed = [
        CP_GRPC,
        CP_ADMIN,
        AGENT_OUTBOUND,
        AGENT_INBOUND,
        AGENT_ADMIN,
    ];
    let mut addresses = Vec::new();
    for text in fixed
        .iter()
        .copied()
        .chain(UPSTREAMS.iter().map(|u| u.addr))
    {
        addresses.push(addr(text)?);
    }
    addresses.extend(layout.pods.iter().map(|p| p.addr));
    addresses.extend(canary.pods.iter().map(|p| p.addr));
    for address in addresses {
        if let Err(err) = TcpListener::bind(address) {
            let hint = match err.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "is an earlier demo or another server still running? (`ss -ltnp` shows who listens)"
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "this loopback address is not configured (on macOS: sudo ifconfig lo0 alias <ip> up)"
                }
                _ => "check the address",
            };
            bail!("the demo needs {address} but cannot listen there: {err}; {hint}");
        }
    }
    Ok(())
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mirrors the test upstream's draw: one `f64` per request, failed when below the ratio.
    #[test]
    fn flaky_seed_never_fails_5_in_a_row() {
        let flaky = UPSTREAMS.iter().find(|u| u.name == "reviews-1").unwrap();
        let knob = |name: &str| {
            let at = flaky.knobs.iter().position(|k| *k == name).unwrap();
            flaky.knobs[at + 1]
        };
        let ratio: f64 = knob("--fail-ratio").parse().unwrap();
        let mut rng = fastrand::Rng::with_seed(knob("--seed").parse().unwrap());
        let (mut run, mut longest, mut failures) = (0, 0, 0);
        for _ in 0..6000 {
            if rng.f64() < ratio {
                run += 1;
                failures += 1;
                longest = longest.max(run);
            } else {
                run = 0;
            }
        }
        assert!(
            longest < 5,
            "a run of {longest} failures would trip the breaker"
        );
        assert!(
            (1650..=1950).contains(&failures),
            "{failures} of 6000: still about 30%"
        );
    }

    #[test]
    fn demo_addresses_parse() {
        for text in [
            CP_GRPC,
            CP_ADMIN,
            AGENT_OUTBOUND,
            AGENT_INBOUND,
            AGENT_ADMIN,
            FRONTEND_APP,
        ] {
            addr(text).unwrap();
        }
        for upstream in UPSTREAMS {
            addr(upstream.addr).unwrap();
        }
    }
}
