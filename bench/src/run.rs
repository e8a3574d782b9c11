//! The runner: starts each path in turn, drives the same workloads through it, samples
//! the proxy's CPU and memory around each run, and gathers the results.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::certs::{self, CertResult, CertScenario};
use crate::cpscale::{self, ScaleResult, Scenario};
use crate::load::{self, Client, Protocol, Run, Target};
use crate::mtls::{self, MtlsResult};
use crate::procstat::{self, Sample};
use crate::sut::{self, AgentPath, Haproxy, Layout, Policies, Upstream};
use crate::tcp::{self, Route, Transfer};

/// What to run and for how long (from flags or `BENCH_*` variables).
#[derive(Clone, Debug)]
pub struct Config {
    /// Fixed rates, requests per second.
    pub rates: Vec<u32>,
    /// Length of each fixed-rate run.
    pub duration: Duration,
    /// Length of the warm-up before each protocol's runs (not measured).
    pub warmup: Duration,
    /// Length of each saturation run.
    pub saturation: Duration,
    /// HTTP/1.1 requests (and connections) in flight during saturation.
    pub concurrency: usize,
    /// HTTP/2 connections per client.
    pub h2_connections: usize,
    /// HTTP/2 requests in flight per connection during saturation.
    pub h2_streams: usize,
    /// TCP streams and the length of the pass-through runs.
    pub tcp_streams: usize,
    /// Length of each pass-through run.
    pub tcp_duration: Duration,
    /// Services in the agent's view for the main rows.
    pub services: usize,
    /// Services for each "many services" row (empty: none).
    pub many_services: Vec<usize>,
    /// Run HAProxy (an error if it is missing).
    pub haproxy: bool,
    /// Control-plane scenarios (empty: skip).
    pub scale: Vec<Scenario>,
    /// Run the proxy paths (false: only the control-plane scenarios).
    pub proxies: bool,
    /// The mTLS row (none: skip it).
    pub mtls: Option<mtls::Settings>,
    /// Certificate issuing runs (empty: skip).
    pub certs: Vec<CertScenario>,
    /// Count instructions per request under callgrind (agent and HAProxy rows).
    pub instructions: bool,
}

/// One fixed-rate run and the proxy's CPU during it.
#[derive(Clone, Debug)]
pub struct RateResult {
    /// Requests per second asked for.
    pub rate: u32,
    /// The run.
    pub run: Run,
    /// The proxy's CPU time during the run (none for the direct path).
    pub cpu: Option<Duration>,
}

impl RateResult {
    /// Proxy CPU seconds per 1,000 requests (equal to vCPU per 1,000 requests/s).
    pub fn cpu_per_1k(&self) -> Option<f64> {
        let requests = (self.run.ok + self.run.errors).max(1) as f64;
        self.cpu.map(|cpu| cpu.as_secs_f64() * 1_000.0 / requests)
    }
}

/// One protocol over one path.
#[derive(Clone, Debug)]
pub struct ProtocolResult {
    /// The protocol.
    pub protocol: Protocol,
    /// The fixed-rate runs, in the order of [`Config::rates`].
    pub rates: Vec<RateResult>,
    /// The saturation run.
    pub saturation: Run,
    /// The proxy's CPU time during the saturation run (none for the direct path).
    pub saturation_cpu: Option<Duration>,
    /// Proxy memory after the first fixed-rate run.
    pub after_first_rate: Option<Sample>,
}

impl ProtocolResult {
    /// Proxy CPU seconds per 1,000 requests during the saturation run.
    pub fn saturation_cpu_per_1k(&self) -> Option<f64> {
        let requests = (self.saturation.ok + self.saturation.errors).max(1) as f64;
        self.saturation_cpu
            .map(|cpu| cpu.as_secs_f64() * 1_000.0 / requests)
    }
}

/// Which kind of path a row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Straight to the upstream.
    Direct,
    /// The agent without policy.
    Agent,
    /// The agent with every policy.
    AgentPolicies,
    /// The agent's inbound listener with its rate limits.
    AgentInbound,
    /// The agent with many services in its view.
    AgentManyServices,
    /// HAProxy.
    Haproxy,
}

/// One path's results.
#[derive(Clone, Debug)]
pub struct PathResult {
    /// The row's label.
    pub name: String,
    /// Which path.
    pub kind: PathKind,
    /// Per protocol.
    pub protocols: Vec<ProtocolResult>,
    /// Pass-through, if this path has one.
    pub tcp: Option<TcpResult>,
    /// The proxy's memory at the end.
    pub end: Option<Sample>,
}

/// The pass-through row of a path.
#[derive(Clone, Debug)]
pub struct TcpResult {
    /// How the streams went.
    pub route: &'static str,
    /// What was moved.
    pub transfer: Transfer,
    /// The proxy's CPU time.
    pub cpu: Option<Duration>,
}

/// Everything one `make bench` measured.
#[derive(Clone, Debug)]
pub struct Results {
    /// Per path.
    pub paths: Vec<PathResult>,
    /// Control-plane scenarios.
    pub scale: Vec<ScaleResult>,
    /// The mTLS row, if it ran.
    pub mtls: Option<MtlsResult>,
    /// Certificate issuing runs.
    pub certs: Vec<CertResult>,
    /// Instructions per request under callgrind (empty: not measured).
    pub instructions: Vec<crate::instructions::Row>,
}

/// The process whose CPU a path's runs are charged to.
struct Meter {
    pid: Option<u32>,
    ticks: u64,
}

impl Meter {
    fn sample(&self) -> anyhow::Result<Option<Sample>> {
        self.pid
            .map(|pid| procstat::sample(pid, self.ticks))
            .transpose()
            .context("sampling the proxy's /proc")
    }
}

fn cpu_between(before: Option<Sample>, after: Option<Sample>) -> Option<Duration> {
    Some(after?.cpu.saturating_sub(before?.cpu))
}

async fn measure_http(
    config: &Config,
    target: Target,
    meter: &Meter,
    protocols_label: &str,
) -> anyhow::Result<ProtocolResult> {
    let protocol = target.protocol;
    eprintln!("  {protocols_label} {}", protocol.name());
    let client = Arc::new(
        Client::connect(target.clone(), config.h2_connections)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?,
    );
    if let Some(&rate) = config.rates.first() {
        let _ = load::open_loop(Arc::clone(&client), rate, config.warmup).await;
    }
    let mut rates = Vec::new();
    let mut after_first_rate = None;
    for &rate in &config.rates {
        let before = meter.sample()?;
        let run = load::open_loop(Arc::clone(&client), rate, config.duration).await;
        let after = meter.sample()?;
        eprintln!(
            "    {rate}/s: p50 {:?} p99 {:?} ok {} errors {}{}",
            run.quantile(0.5),
            run.quantile(0.99),
            run.ok,
            run.errors,
            run.first_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        if after_first_rate.is_none() {
            after_first_rate = after;
        }
        rates.push(RateResult {
            rate,
            run,
            cpu: cpu_between(before, after),
        });
    }
    // HTTP/2 keeps several requests in flight on each connection, as h2load -m does.
    let in_flight = match protocol {
        Protocol::Http1 => config.concurrency,
        Protocol::Http2 => config.h2_connections * config.h2_streams,
    };
    let before = meter.sample()?;
    let saturation = load::saturate(client, in_flight, config.saturation).await;
    let saturation_cpu = cpu_between(before, meter.sample()?);
    eprintln!("    saturation: {:.0} req/s", saturation.throughput());
    Ok(ProtocolResult {
        protocol,
        rates,
        saturation,
        saturation_cpu,
        after_first_rate,
    })
}

async fn measure_tcp(
    config: &Config,
    route: Route,
    label: &'static str,
    meter: &Meter,
) -> anyhow::Result<TcpResult> {
    let before = meter.sample()?;
    let transfer = tcp::transfer(route, config.tcp_streams, config.tcp_duration)
        .await
        .with_context(|| format!("pass-through over {label}"))?;
    let after = meter.sample()?;
    eprintln!("  TCP {label}: {:.0} MB/s", transfer.rate() / 1e6);
    Ok(TcpResult {
        route: label,
        transfer,
        cpu: cpu_between(before, after),
    })
}

fn target(addr: std::net::SocketAddr, authority: &str, protocol: Protocol) -> Target {
    Target {
        addr,
        authority: authority.to_owned(),
        protocol,
    }
}

const BOTH: [Protocol; 2] = [Protocol::Http1, Protocol::Http2];

/// Runs every path (and the control-plane scenarios) and returns what they measured.
pub async fn run(layout: &Layout, config: &Config) -> anyhow::Result<Results> {
    let ticks = procstat::ticks_per_second();
    let haproxy_binary = if config.haproxy && config.proxies {
        Some(sut::haproxy_binary().context(
            "haproxy is not installed: run hack/bench.sh (it installs it with apt-get), \
             or set BENCH_HAPROXY=0 to leave its row out",
        )?)
    } else {
        None
    };
    let mut paths = Vec::new();
    if config.proxies {
        run_proxies(layout, config, ticks, haproxy_binary, &mut paths).await?;
    }
    let mut scale = Vec::new();
    for &scenario in &config.scale {
        eprintln!(
            "control plane: {} agents, {} services",
            scenario.agents, scenario.services
        );
        let result = cpscale::run(layout, scenario, layout.proxy_cpus.as_deref()).await?;
        eprintln!(
            "  p99 {:?}, max {:?}",
            Duration::from_nanos(result.propagation.value_at_quantile(0.99)),
            Duration::from_nanos(result.propagation.max())
        );
        scale.push(result);
    }
    let mtls = match &config.mtls {
        Some(settings) => {
            eprintln!("mutual TLS between two agents");
            let mut upstream =
                Upstream::start_named(layout, "upstream-mtls", Duration::ZERO).await?;
            let result = mtls::run(layout, config, settings, &upstream).await;
            upstream.proc.check_alive()?;
            upstream.proc.stop().await;
            Some(result?)
        }
        None => None,
    };
    let mut issued = Vec::new();
    for &scenario in &config.certs {
        eprintln!(
            "certificates: {} agents, {} in flight",
            scenario.agents, scenario.concurrency
        );
        let result = certs::run(layout, scenario, layout.proxy_cpus.as_deref()).await?;
        eprintln!(
            "  {:.2} s, {:.0}/s, p99 {:?}, {} errors{}",
            result.elapsed.as_secs_f64(),
            result.rate(),
            result.quantile(0.99),
            result.errors,
            result
                .first_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        issued.push(result);
    }
    let instructions = if config.instructions {
        crate::instructions::run(&layout.bin_dir, config.haproxy)
    } else {
        Vec::new()
    };
    Ok(Results {
        paths,
        scale,
        mtls,
        certs: issued,
        instructions,
    })
}

async fn run_proxies(
    layout: &Layout,
    config: &Config,
    ticks: u64,
    haproxy_binary: Option<std::path::PathBuf>,
    paths: &mut Vec<PathResult>,
) -> anyhow::Result<()> {
    let mut upstream = Upstream::start(layout).await?;

    // Direct.
    eprintln!("direct");
    let meter = Meter { pid: None, ticks };
    let upstream_authority = upstream.http.to_string();
    let mut protocols = Vec::new();
    for protocol in BOTH {
        protocols.push(
            measure_http(
                config,
                target(upstream.http, &upstream_authority, protocol),
                &meter,
                "direct",
            )
            .await?,
        );
    }
    let tcp = measure_tcp(config, Route::Plain(upstream.sink), "plain TCP", &meter).await?;
    paths.push(PathResult {
        name: "direct".to_owned(),
        kind: PathKind::Direct,
        protocols,
        tcp: Some(tcp),
        end: None,
    });

    // The agent, without and with policies.
    for policies in [Policies::None, Policies::All] {
        let (name, kind) = match policies {
            Policies::None => ("agent, no policy", PathKind::Agent),
            Policies::All => ("agent, every policy", PathKind::AgentPolicies),
        };
        eprintln!("{name}");
        let path = AgentPath::start(layout, &upstream, config.services, policies).await?;
        let meter = Meter {
            pid: Some(path.agent.pid()),
            ticks,
        };
        let mut protocols = Vec::new();
        for protocol in BOTH {
            protocols.push(
                measure_http(
                    config,
                    target(path.outbound, sut::SERVICE_AUTHORITY, protocol),
                    &meter,
                    name,
                )
                .await?,
            );
        }
        let tcp = if policies == Policies::None {
            let route = Route::Connect {
                proxy: path.outbound,
                sink: upstream.sink,
            };
            Some(measure_tcp(config, route, "CONNECT tunnel", &meter).await?)
        } else {
            None
        };
        let end = meter.sample()?;
        paths.push(PathResult {
            name: name.to_owned(),
            kind,
            protocols,
            tcp,
            end,
        });
        if policies == Policies::All {
            // Rate limits are inbound policy: measure the same process's inbound listener.
            let inbound_authority = path.inbound.to_string();
            let protocols = vec![
                measure_http(
                    config,
                    target(path.inbound, &inbound_authority, Protocol::Http1),
                    &meter,
                    "agent inbound",
                )
                .await?,
            ];
            paths.push(PathResult {
                name: "agent inbound, rate limits".to_owned(),
                kind: PathKind::AgentInbound,
                protocols,
                tcp: None,
                end: meter.sample()?,
            });
        }
        path.stop().await;
        upstream.proc.check_alive()?;
    }

    for &services in &config.many_services {
        let name = format!("agent, no policy, {services} services");
        eprintln!("{name}");
        let path = AgentPath::start(layout, &upstream, services, Policies::None).await?;
        let meter = Meter {
            pid: Some(path.agent.pid()),
            ticks,
        };
        let protocols = vec![
            measure_http(
                config,
                target(path.outbound, sut::SERVICE_AUTHORITY, Protocol::Http1),
                &meter,
                &name,
            )
            .await?,
        ];
        paths.push(PathResult {
            name,
            kind: PathKind::AgentManyServices,
            protocols,
            tcp: None,
            end: meter.sample()?,
        });
        path.stop().await;
    }

    if let Some(binary) = haproxy_binary {
        eprintln!("haproxy");
        let haproxy = Haproxy::start(layout, &binary, &upstream).await?;
        let meter = Meter {
            pid: Some(haproxy.proc.pid()),
            ticks,
        };
        let authority = sut::SERVICE_AUTHORITY;
        let protocols = vec![
            measure_http(
                config,
                target(haproxy.h1, authority, Protocol::Http1),
                &meter,
                "haproxy",
            )
            .await?,
            measure_http(
                config,
                target(haproxy.h2, authority, Protocol::Http2),
                &meter,
                "haproxy",
            )
            .await?,
        ];
        let tcp = measure_tcp(config, Route::Plain(haproxy.tcp), "mode tcp", &meter).await?;
        paths.push(PathResult {
            name: "HAProxy".to_owned(),
            kind: PathKind::Haproxy,
            protocols,
            tcp: Some(tcp),
            end: meter.sample()?,
        });
        haproxy.proc.stop().await;
    }
    upstream.proc.stop().await;
    Ok(())
}
