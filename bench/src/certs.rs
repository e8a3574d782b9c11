//! Certificates for N agents: the real control plane's `Identity` service over TLS,
//! called by N simulated agents, each with its own token (a token file of N entries)
//! and its own key pair, as a fleet of agents starting at once (a rollout, a node pool
//! replaced, a control-plane restart) would.
//!
//! Each simulated agent does what a real one does at start: a new TCP connection, a TLS
//! handshake verifying the control plane against the mesh's anchor, one `Certify` call
//! with its bearer token and CSR; then it checks the answer names its SPIFFE ID, and
//! closes. The key pairs and CSRs are made before the clock starts (what an agent does
//! on its own CPU). At most `concurrency` agents are in flight at once; each latency
//! runs from the agent's connect to its answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bulwark_proto::identity::v1::CertifyRequest;
use bulwark_proto::identity::v1::identity_client::IdentityClient;
use hdrhistogram::Histogram;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::{Endpoint, Uri};

use crate::identity::{IdentityControlPlane, Token, write_token_file};
use crate::load;
use crate::procstat::{self, Sample};
use crate::sut::{self, Layout};

/// ServiceAccounts the simulated pods are spread over (many pods share one, as in a
/// real cluster); each pod has its own token.
const SERVICE_ACCOUNTS: usize = 100;
/// How long one agent's connect and call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many agents ask for a certificate, and how many at once.
#[derive(Clone, Copy, Debug)]
pub struct CertScenario {
    /// Simulated agents (distinct pods, tokens and key pairs).
    pub agents: usize,
    /// Agents in flight at once.
    pub concurrency: usize,
}

/// What issuing the certificates measured.
#[derive(Clone, Debug)]
pub struct CertResult {
    /// The scenario.
    pub scenario: CertScenario,
    /// Certificates received and checked.
    pub issued: u64,
    /// Agents that got no valid certificate.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// From the first agent's connect to the last answer.
    pub elapsed: Duration,
    /// Per agent, connect to answer, nanoseconds.
    pub latency: Histogram<u64>,
    /// Making the key pairs and CSRs up front (not in `elapsed`).
    pub keygen: Duration,
    /// The control plane's CPU time during the run.
    pub cpu: Duration,
    /// The control plane before the first agent (started, token file read, idle).
    pub before: Sample,
    /// The control plane after the last answer.
    pub after: Sample,
}

impl CertResult {
    /// Certificates per second.
    pub fn rate(&self) -> f64 {
        self.issued as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at `quantile`.
    pub fn quantile(&self, quantile: f64) -> Duration {
        Duration::from_nanos(self.latency.value_at_quantile(quantile))
    }
}

/// A new P-256 key pair (as the agent makes) and its PKCS#10 request, DER; the key is
/// dropped, the control plane only reads the request's public key.
fn csr() -> Result<Vec<u8>, rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok(rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec())
}

/// One agent: connect, TLS, `Certify`, check the answer.
async fn certify(
    cp: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: &Token,
    csr_der: Vec<u8>,
) -> Result<(), String> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let endpoint = Endpoint::from_shared(format!("https://{cp}")).map_err(|e| e.to_string())?;
    // One connection per agent, as each real agent has its own channel.
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(cp).await?;
                tcp.set_nodelay(true)?;
                let tls = connector
                    .connect(ServerName::IpAddress(cp.ip().into()), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut request = tonic::Request::new(CertifyRequest {
        csr_der,
        namespace: token.namespace.clone(),
        pod_name: token.pod.clone(),
        service_account: token.service_account.clone(),
    });
    let bearer = format!("Bearer {}", token.token)
        .parse()
        .map_err(|_| "the token is not a header value".to_owned())?;
    request.metadata_mut().insert("authorization", bearer);
    let answer = IdentityClient::new(channel)
        .certify(request)
        .await
        .map_err(|s| format!("Certify: {:?} {}", s.code(), s.message()))?
        .into_inner();
    if answer.chain_der.is_empty() || answer.spiffe_id != token.spiffe_id() {
        return Err(format!(
            "unexpected answer: {} certificates for {:?}",
            answer.chain_der.len(),
            answer.spiffe_id
        ));
    }
    Ok(())
}

/// Starts a control plane with `scenario.agents` tokens on `cpus`, has every agent ask
/// for its certificate, and stops it.
pub async fn run(
    layout: &Layout,
    scenario: CertScenario,
    cpus: Option<&str>,
) -> anyhow::Result<CertResult> {
    let dir = tempfile::Builder::new()
        .prefix("bulwark-bench-certs-")
        .tempdir()?;
    let mesh = dir.path().join("mesh");
    std::fs::create_dir(&mesh)?;
    // A mesh of one service: certificates do not depend on it.
    std::fs::write(
        mesh.join("services.yaml"),
        sut::service_yaml("bench", &[sut::free_addr()?]),
    )?;
    let tokens: Vec<Token> = (0..scenario.agents)
        .map(|i| {
            Token::new(
                sut::NAMESPACE,
                &format!("sa-{}", i % SERVICE_ACCOUNTS),
                &format!("agent-{i}"),
            )
        })
        .collect();
    let token_file = dir.path().join("tokens.yaml");
    write_token_file(&token_file, &tokens)?;

    let agents = scenario.agents;
    let keygen_start = Instant::now();
    let csrs = tokio::task::spawn_blocking(move || {
        (0..agents).map(|_| csr()).collect::<Result<Vec<_>, _>>()
    })
    .await?
    .context("making the agents' key pairs")?;
    let keygen = keygen_start.elapsed();

    let cp = IdentityControlPlane::start(
        layout,
        "control-plane-certs",
        &mesh,
        &token_file,
        &dir.path().join("anchor.pem"),
        cpus,
    )
    .await?;
    let tls = cp.client_config()?;
    let ticks = procstat::ticks_per_second();
    let before = procstat::sample(cp.cp.proc.pid(), ticks)?;

    let slots = Arc::new(Semaphore::new(scenario.concurrency.max(1)));
    let mut running = JoinSet::new();
    let mut result = CertResult {
        scenario,
        issued: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latency: load::histogram(),
        keygen,
        cpu: Duration::ZERO,
        before,
        after: before,
    };
    let mut collect =
        |done: Result<(Duration, Result<(), String>), tokio::task::JoinError>| match done {
            Ok((latency, Ok(()))) => {
                result.issued += 1;
                load::record(&mut result.latency, latency);
            }
            Ok((_, Err(error))) => {
                result.errors += 1;
                result.first_error.get_or_insert(error);
            }
            Err(error) => {
                result.errors += 1;
                result.first_error.get_or_insert(error.to_string());
            }
        };
    let start = Instant::now();
    for (token, csr_der) in tokens.into_iter().zip(csrs) {
        let slot = Arc::clone(&slots).acquire_owned().await?;
        let (tls, grpc) = (Arc::clone(&tls), cp.cp.grpc);
        running.spawn(async move {
            let _slot = slot;
            let sent = Instant::now();
            let outcome = tokio::time::timeout(CALL_TIMEOUT, certify(grpc, tls, &token, csr_der))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {CALL_TIMEOUT:?}")));
            (sent.elapsed(), outcome)
        });
        while let Some(done) = running.try_join_next() {
            collect(done);
        }
    }
    while let Some(done) = running.join_next().await {
        collect(done);
    }
    result.elapsed = start.elapsed();
    let after = procstat::sample(cp.cp.proc.pid(), ticks)?;
    result.cpu = after.cpu.saturating_sub(before.cpu);
    result.after = after;
    cp.cp.proc.stop().await;
    Ok(result)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// The agents the target is about.
pub const TARGET_AGENTS: usize = 10_000;
/// The time the target allows them.
pub const TARGET_TIME: Duration = Duration::from_secs(60);

/// The table of the certificate runs, as Markdown.
pub fn markdown(results: &[CertResult]) -> String {
    let mut out = String::new();
    if results.is_empty() {
        return out;
    }
    out.push_str(
        "#### Certificates for N agents (the Identity service over TLS, one connection per agent)\n\n",
    );
    out.push_str(
        "| agents | in flight | total s | certificates/s | connect→certificate p50 / p99 / max ms | errors | control-plane CPU s (ms per certificate) | control-plane RSS before / after / peak MiB | key pairs made up front, s |\n|---:|---:|---:|---:|---|---:|---|---|---:|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} | {} / {} / {} | {} | {:.2} ({:.3}) | {} / {} / {} | {:.2} |\n",
            r.scenario.agents,
            r.scenario.concurrency,
            r.elapsed.as_secs_f64(),
            r.rate(),
            ms(r.quantile(0.5)),
            ms(r.quantile(0.99)),
            ms(Duration::from_nanos(r.latency.max())),
            r.errors,
            r.cpu.as_secs_f64(),
            r.cpu.as_secs_f64() * 1e3 / r.issued.max(1) as f64,
            mib(r.before.rss_kib),
            mib(r.after.rss_kib),
            mib(r.after.peak_rss_kib),
            r.keygen.as_secs_f64(),
        ));
    }
    for r in results.iter().filter(|r| r.errors > 0) {
        out.push_str(&format!(
            "\n- errors with {} agents: {} ({})\n",
            r.scenario.agents,
            r.errors,
            r.first_error.as_deref().unwrap_or("-")
        ));
    }
    out.push('\n');
    out
}

/// The target line: `(target, measured, met)`, for runs of at least [`TARGET_AGENTS`].
pub fn targets(results: &[CertResult]) -> Vec<(String, String, Option<bool>)> {
    results
        .iter()
        .filter(|r| r.scenario.agents >= TARGET_AGENTS)
        .map(|r| {
            (
                format!(
                    "certificates for {} agents within {} s",
                    r.scenario.agents,
                    TARGET_TIME.as_secs()
                ),
                format!(
                    "{:.1} s ({:.0}/s, {} errors); control plane RSS {} → {} MiB, peak {} MiB",
                    r.elapsed.as_secs_f64(),
                    r.rate(),
                    r.errors,
                    mib(r.before.rss_kib),
                    mib(r.after.rss_kib),
                    mib(r.after.peak_rss_kib)
                ),
                Some(r.elapsed <= TARGET_TIME && r.errors == 0),
            )
        })
        .collect()
}
