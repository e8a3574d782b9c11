//! `bulwark-bench`: `run` measures every path and prints (and writes) the tables;
//! `faults` runs the fault suite and prints (and writes) its table; `upstream` is the
//! fixed upstream the runners start as their own process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_bench::certs::CertScenario;
use bulwark_bench::cpscale::Scenario;
use bulwark_bench::run::Config;
use bulwark_bench::sut::Layout;
use bulwark_bench::{faults, load, machine, mtls, ratelimit, report, run, sut, upstream};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Bulwark's benchmarks: the agent beside HAProxy, and the control plane at scale")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure every path and print the tables.
    Run(Box<RunArgs>),
    /// Run the fault suite against the release agent and print its table.
    Faults(Box<FaultArgs>),
    /// Print the HAProxy config the bench runs (for profiling HAProxy by hand, as
    /// `bench/callgrind.sh` does with `PROXY=haproxy`).
    HaproxyConfig {
        /// The HTTP/1.1 frontend.
        #[arg(long)]
        h1: SocketAddr,
        /// The h2c frontend.
        #[arg(long)]
        h2: SocketAddr,
        /// The TCP frontend.
        #[arg(long)]
        tcp: SocketAddr,
        /// The upstream's HTTP server.
        #[arg(long)]
        http: SocketAddr,
        /// The upstream's TCP sink.
        #[arg(long)]
        sink: SocketAddr,
    },
    /// Send a fixed rate of requests to one address and print the latency (for profiling
    /// a proxy by hand, e.g. under callgrind).
    Load {
        /// Where to connect.
        #[arg(long)]
        addr: SocketAddr,
        /// Host / :authority of the requests.
        #[arg(long, default_value = "bench.bench")]
        authority: String,
        /// `h1` or `h2`.
        #[arg(long, default_value = "h1")]
        protocol: String,
        /// Requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// HTTP/2 connections the requests are spread over.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Requests kept in flight (closed loop, as many as the target answers);
        /// 0: the fixed `--rate` instead.
        #[arg(long, default_value_t = 0)]
        concurrency: usize,
    },
    /// Serve 1 KiB answers over HTTP/1.1 and h2c, and discard bytes on a TCP sink.
    Upstream {
        /// The HTTP address.
        #[arg(long)]
        http: SocketAddr,
        /// The TCP sink address.
        #[arg(long)]
        sink: SocketAddr,
        /// Milliseconds to wait before each answer.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
}

#[derive(Parser, Debug)]
struct FaultArgs {
    /// Steady GETs per second through the agent in the traffic scenarios.
    #[arg(long, env = "FAULTS_RATE", default_value_t = 300)]
    rate: u32,
    /// How many times the policy file is rewritten.
    #[arg(long, env = "FAULTS_REWRITES", default_value_t = 200)]
    rewrites: usize,
    /// Requests in flight when the agent gets SIGTERM.
    #[arg(long, env = "FAULTS_IN_FLIGHT", default_value_t = 64)]
    in_flight: usize,
    /// The slow upstream's answer time in the SIGTERM scenario, milliseconds.
    #[arg(long, env = "FAULTS_SLOW_ANSWER_MS", default_value_t = 500)]
    slow_answer_ms: u64,
    /// Slowloris connections.
    #[arg(long, env = "FAULTS_SLOWLORIS", default_value_t = 2000)]
    slowloris: usize,
    /// Seconds between the header lines of a slowloris connection.
    #[arg(long, env = "FAULTS_TRICKLE", default_value_t = 2.0)]
    trickle: f64,
    /// Seconds slowloris connections are watched when the agent has no header timeout.
    #[arg(long, env = "FAULTS_OBSERVE", default_value_t = 20.0)]
    observe: f64,
    /// Idle keep-alive connections.
    #[arg(long, env = "FAULTS_IDLE", default_value_t = 10_000)]
    idle: usize,
    /// Flags added to every agent's command line, space separated.
    #[arg(
        long,
        env = "FAULTS_AGENT_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    agent_args: Vec<String>,
    /// Scenarios to run, comma separated (control-plane, endpoint, rewrites, sigterm,
    /// slowloris, idle); empty: all.
    #[arg(long, env = "FAULTS_ONLY", value_delimiter = ',')]
    only: Vec<String>,
    /// Exit 1 when an outcome is not met (after printing and writing the table).
    #[arg(long, env = "FAULTS_STRICT", default_value_t = 1)]
    strict: u8,
    /// Where `bulwark-agent` and `bulwark-control-plane` are (default: beside this binary).
    #[arg(long, env = "BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Where each process logs.
    #[arg(long, env = "BENCH_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// The Markdown file whose fault-suite section is replaced (`-`: print only).
    #[arg(long, env = "FAULTS_OUTPUT", default_value = "docs/benchmarks.md")]
    output: PathBuf,
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// Fixed request rates, comma separated.
    #[arg(
        long,
        env = "BENCH_RATES",
        value_delimiter = ',',
        default_value = "1000,5000"
    )]
    rates: Vec<u32>,
    /// Seconds of each fixed-rate run.
    #[arg(long, env = "BENCH_DURATION", default_value_t = 5.0)]
    duration: f64,
    /// Seconds of warm-up before each protocol's runs.
    #[arg(long, env = "BENCH_WARMUP", default_value_t = 1.0)]
    warmup: f64,
    /// Seconds of each saturation run.
    #[arg(long, env = "BENCH_SATURATION", default_value_t = 3.0)]
    saturation: f64,
    /// Requests in flight during saturation.
    #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections per client.
    #[arg(long, env = "BENCH_H2_CONNECTIONS", default_value_t = 4)]
    h2_connections: usize,
    /// HTTP/2 requests in flight per connection during saturation (`h2load -m`).
    #[arg(long, env = "BENCH_H2_STREAMS", default_value_t = 8)]
    h2_streams: usize,
    /// TCP streams in the pass-through runs.
    #[arg(long, env = "BENCH_TCP_STREAMS", default_value_t = 4)]
    tcp_streams: usize,
    /// Seconds of each pass-through run.
    #[arg(long, env = "BENCH_TCP_DURATION", default_value_t = 3.0)]
    tcp_duration: f64,
    /// Services in the agent's view in the main rows.
    #[arg(long, env = "BENCH_SERVICES", default_value_t = 10)]
    services: usize,
    /// Services for the "many services" rows, one row each (comma separated; 0 or
    /// empty leaves them out).
    #[arg(
        long,
        env = "BENCH_MANY_SERVICES",
        value_delimiter = ',',
        default_value = "1000,10000"
    )]
    many_services: Vec<usize>,
    /// Include HAProxy (1) or leave it out (0).
    #[arg(long, env = "BENCH_HAPROXY", default_value_t = 1)]
    haproxy: u8,
    /// Simulated agents for the control-plane scenarios (comma separated; empty skips them).
    #[arg(
        long,
        env = "BENCH_AGENTS",
        value_delimiter = ',',
        default_value = "1000"
    )]
    agents: Vec<usize>,
    /// Services in the control-plane scenarios (comma separated).
    #[arg(
        long,
        env = "BENCH_CP_SERVICES",
        value_delimiter = ',',
        default_value = "100,1000"
    )]
    cp_services: Vec<usize>,
    /// Simulated agents per HTTP/2 connection.
    #[arg(long, env = "BENCH_AGENTS_PER_CONNECTION", default_value_t = 10)]
    agents_per_connection: usize,
    /// Control-plane replicas in the control-plane scenarios (agents spread over them).
    #[arg(long, env = "BENCH_CP_REPLICAS", default_value_t = 1)]
    cp_replicas: usize,
    /// CPUs (a `taskset -c` list) for the proxies and the control plane; empty: no pinning.
    #[arg(long, env = "BENCH_PROXY_CPUS", default_value = "1")]
    proxy_cpus: String,
    /// CPUs for the upstream; empty: no pinning.
    #[arg(long, env = "BENCH_LOAD_CPUS", default_value = "0")]
    load_cpus: String,
    /// The mTLS row (two agents, plaintext and mutual TLS between them): 1 runs it
    /// with the proxies, 0 leaves it out.
    #[arg(long, env = "BENCH_MTLS", default_value_t = 1)]
    mtls: u8,
    /// Rounds of each mTLS-row run (ABBA: plaintext, mTLS, mTLS, plaintext, ...).
    #[arg(long, env = "BENCH_MTLS_ROUNDS", default_value_t = 2)]
    mtls_rounds: usize,
    /// New connections per second in the mTLS row's handshake runs.
    #[arg(long, env = "BENCH_MTLS_CONNECTION_RATE", default_value_t = 200)]
    mtls_connection_rate: u32,
    /// Seconds of each handshake run.
    #[arg(long, env = "BENCH_MTLS_CONNECTION_DURATION", default_value_t = 3.0)]
    mtls_connection_duration: f64,
    /// Tunnels in flight in the new-connection saturation run.
    #[arg(long, env = "BENCH_MTLS_CONNECTION_CONCURRENCY", default_value_t = 16)]
    mtls_connection_concurrency: usize,
    /// Simulated agents asking the control plane for a certificate (comma separated;
    /// empty skips it).
    #[arg(
        long,
        env = "BENCH_CERT_AGENTS",
        value_delimiter = ',',
        default_value = "10000"
    )]
    cert_agents: Vec<usize>,
    /// Certificate requests in flight at once.
    #[arg(long, env = "BENCH_CERT_CONCURRENCY", default_value_t = 100)]
    cert_concurrency: usize,
    /// Count instructions per request under callgrind, the agent's and HAProxy's:
    /// `auto` (when valgrind is installed), `1` or `0`.
    #[arg(long, env = "BENCH_CALLGRIND", default_value = "auto")]
    callgrind: String,
    /// What to run: `all`, `proxies` (with the mTLS row), `control-plane` (with the
    /// certificates), `mtls`, `certs` or `ratelimit` (issue 21's rows, which `all`
    /// runs last when redis-server is installed).
    #[arg(long, env = "BENCH_ONLY", default_value = "all")]
    only: String,
    /// Where `bulwark-agent` and `bulwark-control-plane` are (default: beside this binary).
    #[arg(long, env = "BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Where each process logs.
    #[arg(long, env = "BENCH_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// The Markdown file whose results section is replaced (`-`: print only).
    #[arg(long, env = "BENCH_OUTPUT", default_value = "docs/benchmarks.md")]
    output: PathBuf,
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn cpus(list: &str) -> Option<String> {
    let list = list.trim();
    (!list.is_empty()).then(|| list.to_owned())
}

/// `--bin-dir`, or the folder of this binary.
fn bin_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir),
        None => Ok(std::env::current_exe()
            .context("finding this binary")?
            .parent()
            .context("this binary has a folder")?
            .to_path_buf()),
    }
}

/// The agent's flag for its header-read timeout.
const HEADER_TIMEOUT_FLAG: &str = "--header-read-timeout-ms";

/// The header-read timeout the agents of the suite run with: the one given in
/// `agent_args`, else the default `bulwark-agent --help` shows; none if the agent has
/// no such flag (or it is 0, no limit).
fn header_timeout(bin_dir: &std::path::Path, agent_args: &[String]) -> Option<Duration> {
    let given = agent_args.iter().enumerate().find_map(|(i, arg)| {
        let value = arg.strip_prefix(HEADER_TIMEOUT_FLAG)?;
        match value.strip_prefix('=') {
            Some(value) => Some(value.to_owned()),
            None if value.is_empty() => agent_args.get(i + 1).cloned(),
            None => None,
        }
    });
    let ms = match given {
        Some(value) => value.parse::<u64>().ok()?,
        None => {
            let out = std::process::Command::new(bin_dir.join("bulwark-agent"))
                .arg("--help")
                .output()
                .ok()?;
            let help = String::from_utf8_lossy(&out.stdout).into_owned();
            let after = &help[help.find(HEADER_TIMEOUT_FLAG)?..];
            let default = &after[after.find("[default: ")? + "[default: ".len()..];
            default[..default.find(']')?].trim().parse::<u64>().ok()?
        }
    };
    (ms > 0).then(|| Duration::from_millis(ms))
}

async fn faults(args: FaultArgs) -> anyhow::Result<()> {
    let bin_dir = bin_dir(args.bin_dir.clone())?;
    let agent_args: Vec<String> = args
        .agent_args
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect();
    let header_timeout = header_timeout(&bin_dir, &agent_args);
    let layout = Layout {
        log_dir: args
            .log_dir
            .clone()
            .unwrap_or_else(|| bin_dir.join("faults-logs")),
        bin_dir,
        proxy_cpus: None,
        load_cpus: None,
    };
    let config = faults::Config {
        rate: args.rate.max(1),
        rewrites: args.rewrites,
        in_flight: args.in_flight.max(1),
        slow_answer: Duration::from_millis(args.slow_answer_ms),
        slowloris: args.slowloris,
        trickle: seconds(args.trickle),
        header_timeout,
        observe: seconds(args.observe),
        idle: args.idle,
        agent_args,
        only: args.only.into_iter().filter(|o| !o.is_empty()).collect(),
    };
    let load_before = machine::load_average();
    let rows = faults::run(&layout, &config).await?;
    let load_after = machine::load_average();
    let mut text = machine::describe(None);
    text.push_str(&format!(
        "- command: `make faults` with FAULTS_RATE={} FAULTS_REWRITES={} FAULTS_IN_FLIGHT={} \
         FAULTS_SLOWLORIS={} FAULTS_IDLE={}{}\n",
        config.rate,
        config.rewrites,
        config.in_flight,
        config.slowloris,
        config.idle,
        if config.agent_args.is_empty() {
            String::new()
        } else {
            format!(" FAULTS_AGENT_ARGS=\"{}\"", config.agent_args.join(" "))
        }
    ));
    text.push_str(&format!(
        "- load average (1, 5, 15 min): {load_before} before, {load_after} after\n\n"
    ));
    text.push_str(&report::faults(&rows));
    println!("{text}");
    if args.output.as_os_str() != "-" {
        let doc = std::fs::read_to_string(&args.output).unwrap_or_default();
        let doc = report::splice_between(&doc, report::FAULTS_BEGIN, report::FAULTS_END, &text);
        std::fs::write(&args.output, doc)
            .with_context(|| format!("writing {}", args.output.display()))?;
        eprintln!("results written to {}", args.output.display());
    }
    let missed = rows
        .iter()
        .flat_map(|r| &r.checks)
        .filter(|c| c.met == Some(false))
        .count();
    if missed > 0 && args.strict != 0 {
        anyhow::bail!(
            "{missed} outcome(s) not met (see the table; FAULTS_STRICT=0 to exit 0 anyway)"
        );
    }
    Ok(())
}

async fn bench(args: RunArgs) -> anyhow::Result<()> {
    let bin_dir = bin_dir(args.bin_dir.clone())?;
    let layout = Layout {
        log_dir: args
            .log_dir
            .clone()
            .unwrap_or_else(|| bin_dir.join("bench-logs")),
        bin_dir,
        proxy_cpus: cpus(&args.proxy_cpus),
        load_cpus: cpus(&args.load_cpus),
    };
    // The rate-limit rows (issue 21) run on their own, spliced into their own section.
    if args.only == "ratelimit" {
        return ratelimit_rows(&layout, &args).await;
    }
    // (proxy rows, control-plane scale, mTLS row, certificates)
    let (proxies, control_plane, mtls_row, certs) = match args.only.as_str() {
        "all" => (true, true, args.mtls != 0, true),
        "proxies" => (true, false, args.mtls != 0, false),
        "control-plane" => (false, true, false, true),
        "mtls" => (false, false, true, false),
        "certs" => (false, false, false, true),
        other => {
            anyhow::bail!(
                "BENCH_ONLY={other}: expected all, proxies, control-plane, mtls, certs or ratelimit"
            )
        }
    };
    let mut scale = Vec::new();
    for &agents in args.agents.iter().filter(|a| control_plane && **a > 0) {
        for &services in &args.cp_services {
            scale.push(Scenario {
                agents,
                services: services.max(1),
                agents_per_connection: args.agents_per_connection,
                replicas: args.cp_replicas.max(1),
            });
        }
    }
    let config = Config {
        rates: args.rates.clone(),
        duration: seconds(args.duration),
        warmup: seconds(args.warmup),
        saturation: seconds(args.saturation),
        concurrency: args.concurrency.max(1),
        h2_connections: args.h2_connections.max(1),
        h2_streams: args.h2_streams.max(1),
        tcp_streams: args.tcp_streams.max(1),
        tcp_duration: seconds(args.tcp_duration),
        services: args.services.max(1),
        many_services: args
            .many_services
            .iter()
            .copied()
            .filter(|&n| n > 0)
            .collect(),
        haproxy: args.haproxy != 0,
        scale,
        proxies,
        mtls: mtls_row.then(|| mtls::Settings {
            rounds: args.mtls_rounds.max(1),
            connection_rate: args.mtls_connection_rate.max(1),
            connection_duration: seconds(args.mtls_connection_duration),
            connection_concurrency: args.mtls_connection_concurrency.max(1),
        }),
        certs: args
            .cert_agents
            .iter()
            .filter(|n| certs && **n > 0)
            .map(|&agents| CertScenario {
                agents,
                concurrency: args.cert_concurrency.max(1),
            })
            .collect(),
        instructions: proxies
            && match args.callgrind.as_str() {
                "0" => false,
                "1" => true,
                _ => bulwark_bench::instructions::available(),
            },
    };
    let load_before = machine::load_average();
    let results = run::run(&layout, &config).await?;
    let load_after = machine::load_average();
    let haproxy = config.haproxy.then(sut::haproxy_binary).flatten();
    let mut text = String::new();
    text.push_str(&machine::describe(haproxy.as_deref()));
    text.push_str(&format!(
        "- command: `make bench` with BENCH_RATES={} BENCH_DURATION={} BENCH_SATURATION={} \
         BENCH_CONCURRENCY={} BENCH_H2_CONNECTIONS={} BENCH_H2_STREAMS={} \
         BENCH_MANY_SERVICES={} BENCH_AGENTS={} BENCH_CP_SERVICES={} BENCH_CP_REPLICAS={} \
         BENCH_PROXY_CPUS={} BENCH_LOAD_CPUS={} BENCH_MTLS_ROUNDS={} BENCH_CERT_AGENTS={}\n",
        join(&args.rates),
        args.duration,
        args.saturation,
        args.concurrency,
        args.h2_connections,
        args.h2_streams,
        join(&args.many_services),
        join(&args.agents),
        join(&args.cp_services),
        args.cp_replicas,
        args.proxy_cpus,
        args.load_cpus,
        args.mtls_rounds,
        join(&args.cert_agents),
    ));
    text.push_str(&format!(
        "- load average (1, 5, 15 min): {load_before} before, {load_after} after\n\n"
    ));
    text.push_str(&report::markdown(&results, &config.rates));
    println!("{text}");
    if args.output.as_os_str() != "-" {
        let doc = std::fs::read_to_string(&args.output).unwrap_or_default();
        std::fs::write(&args.output, report::splice(&doc, &text))
            .with_context(|| format!("writing {}", args.output.display()))?;
        eprintln!("results written to {}", args.output.display());
    }
    if args.only == "all" {
        if ratelimit::available() {
            ratelimit_rows(&layout, &args).await?;
        } else {
            eprintln!(
                "rate-limit rows skipped: redis-server is not installed (hack/setup.sh installs it)"
            );
        }
    }
    Ok(())
}

/// Issue 21's rows (`BENCH_ONLY=ratelimit`, or after the others with `all`), spliced
/// between their own markers in the output.
async fn ratelimit_rows(layout: &Layout, args: &RunArgs) -> anyhow::Result<()> {
    let settings = ratelimit::Settings {
        duration: seconds(args.duration),
        cost_duration: seconds(args.duration),
    };
    let text = ratelimit::run(layout, settings).await?.markdown();
    println!("{text}");
    if args.output.as_os_str() != "-" {
        let doc = std::fs::read_to_string(&args.output).unwrap_or_default();
        let doc = report::splice_between(&doc, ratelimit::BEGIN, ratelimit::END, &text);
        std::fs::write(&args.output, doc)
            .with_context(|| format!("writing {}", args.output.display()))?;
    }
    Ok(())
}

fn join<T: ToString>(values: &[T]) -> String {
    values
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => bench(*args).await,
        Cmd::Faults(args) => faults(*args).await,
        Cmd::HaproxyConfig {
            h1,
            h2,
            tcp,
            http,
            sink,
        } => {
            print!("{}", sut::haproxy_config(h1, h2, tcp, http, sink));
            Ok(())
        }
        Cmd::Upstream {
            http,
            sink,
            latency_ms,
        } => upstream::run(http, sink, Duration::from_millis(latency_ms)).await,
        Cmd::Load {
            addr,
            authority,
            protocol,
            rate,
            duration,
            connections,
            concurrency,
        } => {
            let protocol = match protocol.as_str() {
                "h1" => load::Protocol::Http1,
                "h2" => load::Protocol::Http2,
                other => anyhow::bail!("--protocol {other}: expected h1 or h2"),
            };
            let target = load::Target {
                addr,
                authority,
                protocol,
            };
            let client =
                std::sync::Arc::new(load::Client::connect(target, connections.max(1)).await?);
            let run = match concurrency {
                0 => load::open_loop(client, rate, seconds(duration)).await,
                n => load::saturate(client, n, seconds(duration)).await,
            };
            println!(
                "{} ok, {} errors ({}); p50 {:?} p99 {:?} p99.9 {:?}",
                run.ok,
                run.errors,
                run.first_error.as_deref().unwrap_or("none"),
                run.quantile(0.5),
                run.quantile(0.99),
                run.quantile(0.999)
            );
            Ok(())
        }
    }
}
