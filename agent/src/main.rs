//! `bulwark-agent`: the per-pod proxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_agent::telemetry::{self, LogFormat};
use bulwark_agent::{Agent, Identity, InboundSpec, Settings};
use clap::Parser;

/// Bulwark's per-pod agent: enforces timeouts, retries, circuit breaking,
/// bulkheads and rate limits on the pod's traffic.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The control plane's gRPC address.
    #[arg(
        long,
        env = "BULWARK_CONTROL_PLANE",
        default_value = "http://127.0.0.1:9990"
    )]
    control_plane: String,
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
    /// An inbound listener and the app port it forwards to, LISTEN=APP_PORT; repeat for more.
    #[arg(long = "inbound", value_name = "LISTEN=APP_PORT")]
    inbounds: Vec<InboundSpec>,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    settings.inbounds = args.inbounds;
    settings.app_host = args.app_host;
    settings.admin_addr = args.admin_addr;
    settings.drain_timeout = Duration::from_secs(args.drain_timeout_secs);
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
