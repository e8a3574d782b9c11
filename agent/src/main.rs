//! `bulwark-agent`: the per-pod proxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_agent::init::{self, BackendChoice, Cidr, InitOptions};
use bulwark_agent::limits::{
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
    DEFAULT_HTTP2_MAX_PENDING_RESETS, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_HEADERS_BYTES, DEFAULT_PROXY_PASSTHROUGH, Limits,
};
use bulwark_agent::metrics::DEFAULT_MAX_CALLER_LABELS;
use bulwark_agent::settings::{
    DEFAULT_OPAQUE_PORTS, DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_WORKER_THREADS,
};
use bulwark_agent::telemetry::{self, LogFormat};
use bulwark_agent::{Agent, Identity, InboundSpec, Settings};
use clap::{Parser, Subcommand};

/// The agent's allocator: jemalloc, whose freed pages go back to the OS (glibc's malloc
/// kept the memory of closed connections for the life of the process: docs/benchmarks.md,
/// "Memory under hostile clients"). Configured by [`allocator::configure`].
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, set when the agent starts.
#[cfg(unix)]
mod allocator {
    use tikv_jemalloc_ctl::{Access, AsName};

    /// How long an unused dirty page stays before it goes back to the OS (jemalloc's
    /// default, 10 s, holds a burst of closed connections' memory that long).
    const DIRTY_DECAY_MS: isize = 1000;

    /// A background thread purges unused pages even while the agent is idle (otherwise
    /// only allocations do); dirty pages go after [`DIRTY_DECAY_MS`], straight to the
    /// OS (`muzzy_decay_ms` 0: not through `MADV_FREE`, which the kernel takes back
    /// only under memory pressure, so RSS would not fall). For the arenas made from now
    /// on and for those that exist (the runtime's threads have allocated already).
    /// `_RJEM_MALLOC_CONF` in the environment still sets the rest.
    pub fn configure() {
        let set = |name: &str, value: isize| {
            let _ = format!("{name}\0").as_str().name().write(value);
        };
        set("arenas.dirty_decay_ms", DIRTY_DECAY_MS);
        set("arenas.muzzy_decay_ms", 0);
        let arenas: u32 = b"arenas.narenas\0".name().read().unwrap_or(0);
        for i in 0..arenas {
            // An arena not yet initialised refuses; it will take the defaults above.
            set(&format!("arena.{i}.dirty_decay_ms"), DIRTY_DECAY_MS);
            set(&format!("arena.{i}.muzzy_decay_ms"), 0);
        }
        // Without one (a platform jemalloc has none for), pages go back on allocations.
        let _ = tikv_jemalloc_ctl::background_thread::write(true);
    }
}

/// Bulwark's per-pod agent: enforces timeouts, retries, circuit breaking,
/// bulkheads and rate limits on the pod's traffic.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the pod's iptables redirect rules (the sidecar's init step; needs NET_ADMIN).
    Init(InitArgs),
    /// Wait until the agent's admin /ready answers 200 (the postStart hook of injected
    /// pods without native sidecars).
    WaitReady(WaitReadyArgs),
}

/// Flags of `bulwark-agent wait-ready`.
#[derive(Debug, clap::Args)]
struct WaitReadyArgs {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:4191")]
    admin_addr: SocketAddr,
    /// How long to wait, in seconds, before failing.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// Flags of `bulwark-agent init`.
#[derive(Debug, clap::Args)]
struct InitArgs {
    /// The agent's UID: its own traffic is never redirected.
    #[arg(long, env = "BULWARK_AGENT_UID", default_value_t = init::DEFAULT_AGENT_UID)]
    agent_uid: u32,
    /// The agent's GID: traffic of processes in this group is never redirected.
    #[arg(long, env = "BULWARK_AGENT_GID", default_value_t = init::DEFAULT_AGENT_UID)]
    agent_gid: u32,
    /// The agent's outbound listener port (outbound TCP is redirected here).
    #[arg(long, default_value_t = 4140)]
    outbound_port: u16,
    /// The agent's transparent inbound listener port (inbound TCP is redirected here).
    #[arg(long, default_value_t = 4143)]
    inbound_port: u16,
    /// Other agent ports reached directly, never redirected (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4191")]
    agent_ports: Vec<u16>,
    /// Inbound destination ports to leave alone (comma-separated).
    #[arg(long, env = "BULWARK_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports to leave alone (comma-separated).
    #[arg(long, env = "BULWARK_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination ranges to leave alone, e.g. 169.254.169.254/32,fd00::/8.
    #[arg(long, env = "BULWARK_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<Cidr>,
    /// Install the IPv6 (ip6tables) rules too.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ipv6: bool,
    /// Which iptables backend to use; `auto` picks the one that already holds rules.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    iptables_backend: BackendChoice,
    /// Print the commands and rules instead of installing them.
    #[arg(long)]
    dry_run: bool,
}

impl InitArgs {
    fn options(&self) -> InitOptions {
        InitOptions {
            agent_uid: self.agent_uid,
            agent_gid: self.agent_gid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            agent_ports: self.agent_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            ipv6: self.ipv6,
        }
    }
}

/// Flags of the agent itself.
#[derive(Debug, clap::Args)]
struct Args {
    /// The control plane's gRPC address: http://HOST:PORT, or https://HOST:PORT (TLS,
    /// verified against --control-plane-ca).
    #[arg(
        long,
        env = "BULWARK_CONTROL_PLANE",
        default_value = "http://127.0.0.1:9990"
    )]
    control_plane: String,
    /// The mesh's trust anchors (PEM) for an https:// control plane.
    #[arg(long, env = "BULWARK_CONTROL_PLANE_CA")]
    control_plane_ca: Option<std::path::PathBuf>,
    /// The pod's projected ServiceAccount token (audience bulwark), presented to the
    /// control plane; with an https:// control plane the agent also gets its workload
    /// certificate with it.
    #[arg(long, env = "BULWARK_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// The pod's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The pod's name.
    #[arg(long, env = "POD_NAME", default_value = "local")]
    pod_name: String,
    /// The pod's service account.
    #[arg(long, env = "POD_SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    /// A pod label, KEY=VALUE; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The outbound listener (point the app's HTTP_PROXY here).
    #[arg(long, env = "BULWARK_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    outbound_addr: SocketAddr,
    /// A second outbound listener for IPv6, e.g. [::1]:4140 (ip6tables redirects
    /// a pod's outbound IPv6 TCP to ::1 on the outbound port).
    #[arg(long, env = "BULWARK_OUTBOUND_ADDR_V6")]
    outbound_addr_v6: Option<SocketAddr>,
    /// An inbound listener and the app port it forwards to, LISTEN=APP_PORT; repeat for more.
    #[arg(long = "inbound", value_name = "LISTEN=APP_PORT")]
    inbounds: Vec<InboundSpec>,
    /// The transparent inbound listener: iptables (`bulwark-agent init`) redirects
    /// the pod's inbound TCP here, and each connection goes to the app port its client dialled.
    #[arg(long, env = "BULWARK_INBOUND_TRANSPARENT", value_name = "ADDR")]
    inbound_transparent: Option<SocketAddr>,
    /// How long to wait for a redirected client's first bytes before treating
    /// the connection as opaque TCP, in milliseconds.
    #[arg(long, env = "BULWARK_DETECT_TIMEOUT_MS", default_value_t = 200)]
    detect_timeout_ms: u64,
    /// Ports whose redirected connections are opaque TCP, without detection
    /// (comma-separated; empty for none).
    #[arg(long, env = "BULWARK_OPAQUE_PORTS", default_value_t = Ports(DEFAULT_OPAQUE_PORTS.to_vec()))]
    opaque_ports: Ports,
    /// How long an opaque TCP connection may stay silent both ways, in seconds.
    #[arg(long, default_value_t = DEFAULT_TCP_IDLE_TIMEOUT.as_secs())]
    tcp_idle_timeout_secs: u64,
    /// Inbound requests and connections in the app at once; more get 503 bulkhead-full.
    #[arg(long, env = "BULWARK_INBOUND_MAX_CONCURRENCY")]
    inbound_max_concurrency: Option<usize>,
    /// Append the client's address to X-Forwarded-For on inbound HTTP requests.
    #[arg(long)]
    forwarded_for: bool,
    /// Distinct caller identities (namespace/serviceaccount) with a `caller` label of
    /// their own on inbound metrics; later ones share `caller="other"`.
    #[arg(long, env = "BULWARK_MAX_CALLER_LABELS", default_value_t = DEFAULT_MAX_CALLER_LABELS)]
    max_caller_labels: usize,
    /// The rate-limit store of Shared limits: redis://HOST:PORT[/DB], or rediss:// for
    /// TLS. Without it, Shared limits apply their onStoreUnavailable mode.
    #[arg(long, env = "BULWARK_RATE_LIMIT_STORE_URL")]
    rate_limit_store_url: Option<String>,
    /// The rate-limit store's ACL user, if any.
    #[arg(long, env = "BULWARK_RATE_LIMIT_STORE_USERNAME")]
    rate_limit_store_username: Option<String>,
    /// The rate-limit store's password (from the chart's Secret; never logged).
    #[arg(
        long,
        env = "BULWARK_RATE_LIMIT_STORE_PASSWORD",
        hide_env_values = true
    )]
    rate_limit_store_password: Option<String>,
    /// Trust anchors (PEM) for a rediss:// store; default: the system's.
    #[arg(long, env = "BULWARK_RATE_LIMIT_STORE_CA_FILE")]
    rate_limit_store_ca_file: Option<std::path::PathBuf>,
    /// How long a client may take to send a whole request head, from connecting or from
    /// the first byte of a keep-alive request, in milliseconds; then the connection is
    /// closed (0: no limit).
    #[arg(long, env = "BULWARK_HEADER_READ_TIMEOUT_MS", default_value_t = millis(DEFAULT_HEADER_READ_TIMEOUT))]
    header_read_timeout_ms: u64,
    /// How long a connection may stay with no request in flight (HTTP/1.1 keep-alive,
    /// HTTP/2 with no stream open), in milliseconds; then it is closed (0: no limit).
    #[arg(long, env = "BULWARK_IDLE_TIMEOUT_MS", default_value_t = millis(DEFAULT_IDLE_TIMEOUT))]
    idle_timeout_ms: u64,
    /// Threads that run the proxy (0: one per CPU). One suits a sidecar with a core or
    /// less; more only help a pod given several cores.
    #[arg(long, env = "BULWARK_WORKER_THREADS", default_value_t = DEFAULT_WORKER_THREADS)]
    worker_threads: usize,
    /// Connections each listener holds at once; more are closed as soon as accepted
    /// (0: no limit).
    #[arg(long, env = "BULWARK_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Bytes of a request's headers (an HTTP/1.1 head is answered 431 beyond it, an
    /// HTTP/2 stream refused); also the most an HTTP/1.1 connection buffers.
    #[arg(long, env = "BULWARK_MAX_REQUEST_HEADERS_BYTES", default_value_t = DEFAULT_MAX_REQUEST_HEADERS_BYTES)]
    max_request_headers_bytes: usize,
    /// HTTP/2 streams one client connection may have open at once.
    #[arg(long, env = "BULWARK_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS)]
    http2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may open and reset before the agent accepts them; one
    /// more closes the connection with GOAWAY (rapid reset, CVE-2023-44487).
    #[arg(long, env = "BULWARK_HTTP2_MAX_PENDING_RESETS", default_value_t = DEFAULT_HTTP2_MAX_PENDING_RESETS)]
    http2_max_pending_resets: usize,
    /// Let CONNECT and absolute-form requests reach destinations outside the mesh; false:
    /// only mesh destinations (403). The agent's own listeners are refused either way.
    #[arg(long, env = "BULWARK_PROXY_PASSTHROUGH", default_value_t = DEFAULT_PROXY_PASSTHROUGH, action = clap::ArgAction::Set)]
    proxy_passthrough: bool,
    /// Where the local app listens.
    #[arg(long, env = "BULWARK_APP_HOST", default_value = "127.0.0.1")]
    app_host: IpAddr,
    /// The admin listener (/metrics, /ready, /config).
    #[arg(long, env = "BULWARK_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    admin_addr: SocketAddr,
    /// How long shutdown waits for in-flight requests, in seconds.
    #[arg(long, default_value_t = 5)]
    drain_timeout_secs: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Where to send spans over OTLP/gRPC; unset: no spans are exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// A duration as the whole milliseconds a flag takes.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A flag's number where 0 means no limit.
fn limit<T: PartialEq + Default>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

/// A comma-separated list of ports, possibly empty.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ports(Vec<u16>);

impl std::str::FromStr for Ports {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse()
                    .map_err(|_| format!("{p:?} is not a port number (1-65535)"))
            })
            .collect::<Result<_, _>>()
            .map(Ports)
    }
}

impl std::fmt::Display for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&list.join(","))
    }
}

fn parse_labels(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for l in raw {
        let Some((k, v)) = l.split_once('=') else {
            bail!("label {l:?} is not KEY=VALUE");
        };
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}

fn main() -> anyhow::Result<()> {
    #[cfg(unix)]
    allocator::configure();
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if cli.run.worker_threads > 0 {
        runtime.worker_threads(cli.run.worker_threads);
    }
    runtime
        .build()
        .context("starting the async runtime")?
        .block_on(start(cli))
}

/// Runs the subcommand, or the agent.
async fn start(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        // One line for the operator (no backtrace even with RUST_BACKTRACE set):
        // init runs as an init container whose log is read in `kubectl describe`.
        Some(Command::Init(init)) => run_init(&init).map_err(|error| {
            eprintln!("Error: {error:#}");
            std::process::exit(1)
        }),
        Some(Command::WaitReady(args)) => bulwark_agent::wait_ready::wait_ready(
            args.admin_addr,
            Duration::from_secs(args.timeout_secs),
        )
        .await
        .map_err(|error| {
            eprintln!("Error: {error}");
            std::process::exit(1)
        }),
        None => run(cli.run).await,
    }
}

fn run_init(args: &InitArgs) -> anyhow::Result<()> {
    let options = args.options();
    if args.dry_run {
        let backend = match args.iptables_backend {
            BackendChoice::Legacy => init::Backend::Legacy,
            BackendChoice::Nft => init::Backend::Nft,
            // A dry run changes nothing; detect when the tools are there, else show nft.
            BackendChoice::Auto => {
                init::iptables::detect(BackendChoice::Auto).unwrap_or(init::Backend::Nft)
            }
        };
        print!("{}", init::render_plan(&options, backend));
        return Ok(());
    }
    init::iptables::check_capability()?;
    let backend = init::iptables::detect(args.iptables_backend)?;
    init::apply(&options, backend)?;
    eprintln!(
        "bulwark-agent init: redirect rules installed ({} backend): outbound TCP to port {}, inbound TCP to port {}",
        backend.as_str(),
        options.outbound_port,
        options.inbound_port
    );
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let telemetry = telemetry::init("bulwark-agent", args.log_format, args.otlp_endpoint)
        .context("setting up logs and traces")?;
    let identity = Identity {
        namespace: args.namespace,
        pod_name: args.pod_name,
        service_account: args.service_account,
        labels: parse_labels(&args.labels)?,
    };
    let mut settings = Settings::new(args.control_plane, identity);
    settings.outbound_addr = args.outbound_addr;
    settings.outbound_addr_v6 = args.outbound_addr_v6;
    settings.inbounds = args.inbounds;
    settings.app_host = args.app_host;
    settings.admin_addr = args.admin_addr;
    settings.drain_timeout = Duration::from_secs(args.drain_timeout_secs);
    settings.inbound_transparent = args.inbound_transparent;
    settings.detect_timeout = Duration::from_millis(args.detect_timeout_ms);
    settings.opaque_ports = args.opaque_ports.0;
    settings.tcp_idle_timeout = Duration::from_secs(args.tcp_idle_timeout_secs);
    settings.inbound_max_concurrency = args.inbound_max_concurrency;
    settings.forwarded_for = args.forwarded_for;
    settings.max_caller_labels = args.max_caller_labels;
    settings.rate_limit_store = args.rate_limit_store_url.map(|url| {
        let mut store = bulwark_agent::policy::ratelimit::store::StoreSettings::new(url);
        store.username = args.rate_limit_store_username;
        store.password = args.rate_limit_store_password.filter(|p| !p.is_empty());
        store.ca_file = args.rate_limit_store_ca_file;
        store
    });
    settings.control_plane_ca = args.control_plane_ca;
    settings.token_file = args.token_file;
    settings.limits = Limits {
        header_read_timeout: limit(args.header_read_timeout_ms).map(Duration::from_millis),
        idle_timeout: limit(args.idle_timeout_ms).map(Duration::from_millis),
        max_connections: limit(args.max_connections),
        max_request_headers_bytes: args.max_request_headers_bytes,
        http2_max_concurrent_streams: args.http2_max_concurrent_streams,
        http2_max_pending_resets: args.http2_max_pending_resets,
    };
    settings.proxy_passthrough = args.proxy_passthrough;
    let agent = Agent::start_with(settings, telemetry.propagation())
        .await
        .context("starting the agent")?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    drop(telemetry);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
