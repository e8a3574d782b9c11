//! `bulwark-control-plane`: serves agents their configuration from a cluster or a folder
//! of YAML.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_control_plane::source::kubernetes;
use bulwark_control_plane::{ControlPlane, DEFAULT_DEBOUNCE, Settings, Source, webhook};
use clap::{Parser, ValueEnum};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Bulwark's control plane: reads policies and services, streams each agent its view.
#[derive(Debug, Parser)]
#[command(name = "bulwark-control-plane", version, about)]
struct Args {
    /// Where configuration comes from: `kubernetes` (in-cluster config, or KUBECONFIG),
    /// `kubernetes:KUBECONFIG`, or `dir:PATH`, a folder of Kubernetes-shaped YAML
    /// (re-read on change); repeat `--source dir:PATH` to read several folders as one.
    /// Default: `kubernetes` inside a pod.
    #[arg(long, env = "BULWARK_CP_SOURCE")]
    source: Vec<Source>,

    /// Namespace of the Lease that elects the replica writing policy status (Kubernetes
    /// source); default: the pod's namespace (POD_NAMESPACE), else `default`.
    #[arg(long, env = "BULWARK_CP_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    /// This replica's identity in the Lease; default: POD_NAME, else the host name.
    #[arg(long, env = "BULWARK_CP_IDENTITY")]
    identity: Option<String>,

    /// gRPC listen address for agents.
    #[arg(long, env = "BULWARK_CP_GRPC_ADDR", default_value = "0.0.0.0:9990")]
    grpc_addr: SocketAddr,

    /// Admin HTTP listen address (/metrics, /ready, /agents, /errors).
    #[arg(long, env = "BULWARK_CP_ADMIN_ADDR", default_value = "0.0.0.0:9991")]
    admin_addr: SocketAddr,

    /// Quiet period after a change in the folder before it is re-read (e.g. 200ms, 1s).
    #[arg(long, env = "BULWARK_CP_DEBOUNCE", default_value = "200ms", value_parser = parse_debounce)]
    debounce: Duration,

    // issue 5: the injection webhook
    /// Serve the sidecar-injection webhook (HTTPS) on this address; unset: no webhook.
    #[arg(long, env = "BULWARK_CP_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,

    /// Folder holding the webhook's `tls.crt` and `tls.key` (re-read when they change).
    #[arg(
        long,
        env = "BULWARK_CP_WEBHOOK_CERT_DIR",
        default_value = "/var/run/bulwark/webhook-tls"
    )]
    webhook_cert_dir: PathBuf,

    /// What the webhook injects (YAML: image, controlPlaneAddress, ports, resources, ...).
    #[arg(
        long,
        env = "BULWARK_CP_WEBHOOK_CONFIG",
        default_value = "/etc/bulwark/inject.yaml"
    )]
    webhook_config: PathBuf,

    /// Log format; the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "BULWARK_CP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_debounce(value: &str) -> Result<Duration, String> {
    let d: bulwark_control_plane::duration::Duration = value.parse().map_err(|e| format!("{e}"))?;
    if d.is_zero() {
        return Err(format!(
            "must be more than zero (default {}ms)",
            DEFAULT_DEBOUNCE.as_millis()
        ));
    }
    Ok(d.as_std())
}

/// kube's client logs a WARN for every error answer that is not a JSON Status, such as
/// the plain-text 404 of a group the API server does not serve (the Gateway API before
/// its CRDs are installed, asked every recheck). The control plane handles those answers
/// and says what they mean itself, so that module is quiet below ERROR unless RUST_LOG
/// names kube_client.
const QUIET_KUBE_CLIENT: &str = "kube_client::client=error";

/// The log filter: RUST_LOG (default `info`), with kube's client quiet unless named.
fn log_filter(rust_log: Option<&str>) -> EnvFilter {
    let spec = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or("info");
    let filter = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
    if spec.contains("kube_client") {
        return filter;
    }
    match QUIET_KUBE_CLIENT.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn init_logging(format: LogFormat) {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    // Colour codes only for a person at a terminal; a log file or collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on Ctrl-C or SIGTERM, naming the signal.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            result.context("cannot listen for Ctrl-C")?;
            Ok("SIGINT")
        }
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// Starts the injection webhook, asking the API server's version when the sidecar mode
/// is `Auto`: through the Kubernetes source's client settings (its kubeconfig), else the
/// default client configuration (in a pod, or KUBECONFIG).
async fn start_webhook(
    addr: SocketAddr,
    cert_dir: PathBuf,
    config: &std::path::Path,
    source: &Source,
) -> anyhow::Result<webhook::Webhook> {
    let inject = webhook::InjectConfig::load(config)?;
    let native = match webhook::native_sidecars(inject.sidecar_mode, "", "") {
        Some(native) => native,
        None => {
            let kubeconfig = match source {
                Source::Kubernetes(k) => k.kubeconfig.as_deref(),
                Source::Dir(_) => None,
            };
            let client = kubernetes::client_from(kubeconfig).await.context(
                "cannot reach the API server to learn its version (or set sidecarMode in the \
                 webhook config)",
            )?;
            webhook::detect_native(inject.sidecar_mode, &client).await?
        }
    };
    let settings = webhook::Settings {
        addr,
        cert_dir,
        cert_reload: webhook::DEFAULT_CERT_RELOAD,
        inject,
        native,
    };
    webhook::Webhook::start(settings)
        .await
        .context("the injection webhook could not start")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let source = match Source::combine(args.source)? {
        Some(source) => source,
        // The Kubernetes service environment is set in every pod.
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Source::kubernetes(
            None,
            bulwark_control_plane::api::DEFAULT_NAMESPACE,
            "bulwark",
        ),
        None => anyhow::bail!(
            "--source is required outside a pod: kubernetes, kubernetes:KUBECONFIG or dir:PATH \
             (repeatable)"
        ),
    };
    let source = match source {
        Source::Kubernetes(mut k) => {
            let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
            if let Some(ns) = args.lease_namespace.or_else(|| env("POD_NAMESPACE")) {
                k.lease.namespace = ns;
            }
            k.lease.identity = args
                .identity
                .or_else(|| env("POD_NAME"))
                .or_else(|| env("HOSTNAME"))
                .unwrap_or_else(|| format!("bulwark-control-plane-{}", std::process::id()));
            Source::Kubernetes(k)
        }
        other => other,
    };
    let settings = Settings {
        source,
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        debounce: args.debounce,
        identity: None,
    };
    // issue 5: the injection webhook starts first, so pods created while the source
    // syncs are not refused.
    let _webhook = match args.webhook_addr {
        Some(addr) => Some(
            start_webhook(
                addr,
                args.webhook_cert_dir,
                &args.webhook_config,
                &settings.source,
            )
            .await?,
        ),
        None => None,
    };
    let mut control_plane = ControlPlane::start(settings)
        .await
        .context("the control plane could not start")?;
    let outcome = tokio::select! {
        signal = shutdown_signal() => signal.map(|signal| info!(signal, "shutting down")),
        failure = control_plane.failure() => {
            error!(error = %failure, "the control plane failed; shutting down");
            Err(failure.into())
        }
    };
    control_plane.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(args: &[&str]) -> Result<Option<Source>, String> {
        let args = Args::try_parse_from(
            std::iter::once("bulwark-control-plane").chain(args.iter().copied()),
        )
        .map_err(|e| e.to_string())?;
        Source::combine(args.source).map_err(|e| e.to_string())
    }

    #[test]
    fn kube_clients_parse_warnings_are_quiet_unless_asked_for() {
        for rust_log in [
            None,
            Some("info"),
            Some("debug"),
            Some("bulwark=trace,warn"),
        ] {
            let filter = log_filter(rust_log).to_string();
            assert!(filter.contains(QUIET_KUBE_CLIENT), "{rust_log:?}: {filter}");
        }
        let filter = log_filter(Some("info,kube_client=debug")).to_string();
        assert!(!filter.contains(QUIET_KUBE_CLIENT), "{filter}");
    }

    #[test]
    fn source_flags_repeat_for_folders() {
        assert_eq!(
            sources(&["--source", "dir:examples"]).unwrap(),
            Some(Source::Dir(vec!["examples".into()])),
            "the single form is unchanged"
        );
        assert_eq!(
            sources(&["--source", "dir:a", "--source=dir:b", "--source", "dir:c"]).unwrap(),
            Some(Source::Dir(vec!["a".into(), "b".into(), "c".into()])),
            "in the order given"
        );
        // A comma is part of a folder's name, as it always was.
        assert_eq!(
            sources(&["--source", "dir:a,b"]).unwrap(),
            Some(Source::Dir(vec!["a,b".into()]))
        );
        assert_eq!(sources(&[]).unwrap(), None);
    }

    #[test]
    fn kubernetes_does_not_mix_with_folders() {
        for flags in [
            ["--source", "kubernetes", "--source", "dir:a"],
            ["--source", "dir:a", "--source", "kubernetes:/kc"],
        ] {
            let err = sources(&flags).unwrap_err();
            assert!(
                err.contains("kubernetes and dir: cannot be combined"),
                "{flags:?}: {err}"
            );
        }
        let err = sources(&["--source", "kubernetes", "--source", "kubernetes"]).unwrap_err();
        assert!(err.contains("give one kubernetes source"), "{err}");
    }

    #[test]
    fn the_same_folder_twice_is_refused() {
        let err = sources(&[
            "--source", "dir:a", "--source", "dir:b", "--source", "dir:a/",
        ])
        .unwrap_err();
        assert!(err.contains(r#""dir:a/""#), "{err}");
        assert!(err.contains("this folder is given twice"), "{err}");
    }
}
