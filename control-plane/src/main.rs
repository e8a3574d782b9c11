//! `bulwark-control-plane`: serves agents their configuration from a cluster or a folder
//! of YAML.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_control_plane::source::kubernetes;
use bulwark_control_plane::{ControlPlane, DEFAULT_DEBOUNCE, Settings, Source, identity, webhook};
use clap::{Parser, ValueEnum};
use tracing::{error, info, warn};
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

    // issue 15: workload identity
    /// Folder of the mesh's issuer (a kubernetes.io/tls Secret: tls.crt, tls.key and
    /// optionally ca.crt with the trust anchors). Turns on TLS for agents, authenticated
    /// discovery and certificates.
    #[arg(
        long,
        env = "BULWARK_CP_IDENTITY_DIR",
        conflicts_with = "identity_generate"
    )]
    identity_dir: Option<PathBuf>,

    /// For a mesh without a cluster: make a new issuer at start and write its trust
    /// anchor (PEM) to this file for the agents. Turns identity on like --identity-dir.
    #[arg(long, env = "BULWARK_CP_IDENTITY_GENERATE")]
    identity_generate: Option<PathBuf>,

    /// The SPIFFE trust domain of the mesh's identities.
    #[arg(long, env = "BULWARK_CP_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// Lifetime of the workload certificates (agents renew at 70 % of it).
    #[arg(
        long = "cert-lifetime",
        env = "BULWARK_CP_CERT_LIFETIME",
        default_value = "24h",
        value_parser = parse_duration
    )]
    certificate_lifetime: Duration,

    /// Tokens and the identities they prove (YAML: tokens: [{token, namespace,
    /// serviceAccount, pod}]), standing in for TokenReview without a cluster.
    #[arg(long, env = "BULWARK_CP_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// A name (DNS or IP) agents dial the control plane by, for its serving
    /// certificate; repeat for several. Default: localhost, 127.0.0.1 and, in a pod,
    /// the Service names in its namespace.
    #[arg(long = "tls-name", env = "BULWARK_CP_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    let d: bulwark_control_plane::duration::Duration = value.parse().map_err(|e| format!("{e}"))?;
    if d.is_zero() {
        return Err("must be more than zero".to_owned());
    }
    Ok(d.as_std())
}

/// The identity settings the flags ask for, if any.
async fn identity_settings(
    args: &Args,
    source: &Source,
) -> anyhow::Result<Option<identity::IdentitySettings>> {
    use identity::authority::Authority;
    use identity::token::TokenReviewer;
    let authority = match (&args.identity_dir, &args.identity_generate) {
        (None, None) => return Ok(None),
        (Some(dir), _) => Authority::load(dir, &args.trust_domain, args.certificate_lifetime)?,
        (None, Some(anchor_out)) => {
            let authority = Authority::generate(&args.trust_domain, args.certificate_lifetime)?;
            let pem = webhook::anchors::certificates_pem(&authority.anchors());
            std::fs::write(anchor_out, pem).with_context(|| {
                format!("cannot write the trust anchor to {}", anchor_out.display())
            })?;
            info!(path = %anchor_out.display(), "generated a mesh issuer; its trust anchor is written for the agents");
            authority
        }
    };
    let reviewer = match (&args.token_file, source) {
        (Some(file), _) => TokenReviewer::from_file(file)?,
        (None, Source::Kubernetes(k)) => {
            TokenReviewer::Kubernetes(kubernetes::client_from(k.kubeconfig.as_deref()).await?)
        }
        (None, Source::Dir(_)) => anyhow::bail!(
            "identity without a cluster needs --token-file (the tokens agents present and whom \
             they prove)"
        ),
    };
    let mut names = args.tls_names.clone();
    if names.is_empty() {
        names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if let Ok(ns) = std::env::var("POD_NAMESPACE") {
            let service = "bulwark-control-plane";
            names.extend([
                format!("{service}.{ns}.svc"),
                format!("{service}.{ns}.svc.cluster.local"),
            ]);
        }
    }
    Ok(Some(identity::IdentitySettings {
        authority: std::sync::Arc::new(authority),
        reviewer,
        serving_names: names,
    }))
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
    inject: webhook::InjectConfig,
    source: &Source,
) -> anyhow::Result<webhook::Webhook> {
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

/// With identity on a cluster, and a webhook that injects agents with identity: keeps the
/// trust-anchor ConfigMap that injected pods mount in every namespace the webhook may
/// inject into (see `webhook::anchors`).
async fn start_anchor_sync(
    settings: &Settings,
    inject: Option<&webhook::InjectConfig>,
) -> anyhow::Result<Option<webhook::anchors::AnchorSync>> {
    let Some(inject) = inject else {
        return Ok(None);
    };
    match (&settings.identity, inject.identity.is_some()) {
        (None, false) => return Ok(None),
        (Some(_), false) => {
            warn!(
                "identity is on but the webhook injects agents without it: they subscribe in plaintext, which this control plane refuses"
            );
            return Ok(None);
        }
        (None, true) => {
            warn!(
                "the webhook injects agents with identity but this control plane runs without it (no --identity-dir): they cannot subscribe"
            );
            return Ok(None);
        }
        (Some(_), true) => {}
    }
    let (Some(identity), Source::Kubernetes(k)) = (&settings.identity, &settings.source) else {
        return Ok(None);
    };
    let client = kubernetes::client_from(k.kubeconfig.as_deref())
        .await
        .context("cannot reach the API server to write the trust-anchor ConfigMaps")?;
    let mut excluded: std::collections::BTreeSet<String> =
        inject.excluded_namespaces.iter().cloned().collect();
    excluded.insert(inject.control_plane_namespace.clone());
    excluded.insert(webhook::inject::KUBE_SYSTEM.to_owned());
    Ok(Some(webhook::anchors::AnchorSync::spawn(
        client,
        std::sync::Arc::clone(&identity.authority),
        excluded,
        webhook::anchors::CHECK_EVERY,
    )))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    init_logging(args.log_format);
    let source = match Source::combine(std::mem::take(&mut args.source))? {
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
    let identity = identity_settings(&args, &source)
        .await
        .context("workload identity could not be set up")?;
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
        identity,
    };
    let inject = match args.webhook_addr {
        Some(_) => Some(webhook::InjectConfig::load(&args.webhook_config)?),
        None => None,
    };
    // issue 15: before the webhook, so the anchors that injected pods mount are written
    // as early as can be.
    let _anchors = start_anchor_sync(&settings, inject.as_ref()).await?;
    // issue 5: the injection webhook starts first, so pods created while the source
    // syncs are not refused.
    let _webhook = match (args.webhook_addr, inject) {
        (Some(addr), Some(inject)) => {
            Some(start_webhook(addr, args.webhook_cert_dir, inject, &settings.source).await?)
        }
        _ => None,
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

    fn args(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("bulwark-control-plane").chain(flags.iter().copied()))
            .unwrap()
    }

    #[tokio::test]
    async fn identity_is_on_with_an_issuer_and_needs_tokens_without_a_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let source = Source::Dir(vec![dir.path().to_owned()]);
        assert!(
            identity_settings(&args(&[]), &source)
                .await
                .unwrap()
                .is_none()
        );

        let anchor = dir.path().join("anchor.pem");
        let anchor_flag = format!("--identity-generate={}", anchor.display());
        let error = identity_settings(&args(&[&anchor_flag]), &source)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("--token-file"), "{error}");

        let tokens = dir.path().join("tokens.yaml");
        std::fs::write(
            &tokens,
            "tokens: [{token: a-token-of-sixteen-chars, namespace: demo, serviceAccount: web}]\n",
        )
        .unwrap();
        let token_flag = format!("--token-file={}", tokens.display());
        let settings = identity_settings(
            &args(&[&anchor_flag, &token_flag, "--trust-domain=example.org"]),
            &source,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(settings.authority.trust_domain(), "example.org");
        assert_eq!(settings.serving_names[..2], ["localhost", "127.0.0.1"]);
        // The anchor file is what agents read: PEM of the authority's anchor.
        let pem = std::fs::read(&anchor).unwrap();
        let parsed: Vec<_> = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
            .collect::<Result<Vec<rustls::pki_types::CertificateDer<'static>>, _>>()
            .unwrap();
        assert_eq!(parsed, settings.authority.anchors());
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
