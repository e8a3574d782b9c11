//! The mTLS row: client → agent A (outbound) → agent B (inbound) → upstream, once in
//! plaintext and once with mutual TLS between the two agents, in the same run and
//! through the same two processes.
//!
//! A control plane with identity on serves two Services whose one endpoint each is a
//! listener of agent B: `mtls.bench`, on Pod `bench-0` with the injector's annotation
//! (meshed: agent A originates mTLS and requires B's SPIFFE ID), and `plain.bench`, on
//! Pod `plain-0` without it (plaintext, accepted by B's Permissive port). Both agents
//! have certificates from the control plane; only the annotation differs. The two paths
//! are run in turn, plaintext and mTLS alternating in ABBA order over `rounds` so that
//! drift in the machine's load falls on both alike, and CPU is charged to both agents.
//!
//! Handshakes: keep-alive runs open few connections between the agents (they are
//! pooled), so each new connection's cost is measured apart: every client connection
//! opens a `CONNECT` tunnel through A to the service and sends one request with
//! `Connection: close`, so that A opens a new connection (and, meshed, a handshake) to B
//! for each. A tunnel to a meshed endpoint is opaque TCP over mTLS (B relays it to the
//! app on a new connection); to the plaintext endpoint B serves it as HTTP (to the app
//! over its pool), so the difference per connection is the handshake plus that.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::identity::{IdentityControlPlane, TRUST_DOMAIN, Token, write_token_file};
use crate::load::{self, Client, Protocol, Run, Target};
use crate::procstat::{self, Sample};
use crate::sut::{self, Layout, Proc, Upstream, fetch, free_addr, http_status};

/// The meshed service.
pub const MTLS_AUTHORITY: &str = "mtls.bench";
/// The plaintext service.
pub const PLAIN_AUTHORITY: &str = "plain.bench";

/// How the mTLS row runs (beside the main [`crate::run::Config`]'s rates and durations).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Rounds per rate (ABBA: plaintext, mTLS, mTLS, plaintext, ...).
    pub rounds: usize,
    /// New connections per second in the handshake runs.
    pub connection_rate: u32,
    /// Length of each handshake run.
    pub connection_duration: Duration,
    /// Tunnels in flight in the new-connection saturation run.
    pub connection_concurrency: usize,
}

/// Plaintext or mutual TLS between the agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The endpoint is not meshed.
    Plain,
    /// The endpoint is meshed.
    Mtls,
}

impl Variant {
    /// The row label.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plaintext",
            Variant::Mtls => "mTLS",
        }
    }

    fn authority(self) -> &'static str {
        match self {
            Variant::Plain => PLAIN_AUTHORITY,
            Variant::Mtls => MTLS_AUTHORITY,
        }
    }
}

/// CPU of both agents during some runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Agent A (outbound).
    pub a: Duration,
    /// Agent B (inbound).
    pub b: Duration,
}

impl Cpu {
    /// Both agents.
    pub fn both(&self) -> Duration {
        self.a + self.b
    }

    fn add(&mut self, other: Cpu) {
        self.a += other.a;
        self.b += other.b;
    }
}

/// One variant's runs at one rate, summed over rounds.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Requests (or connections) per second asked for (0: closed loop).
    pub rate: u32,
    /// The runs, merged.
    pub run: Run,
    /// The agents' CPU over those runs.
    pub cpu: Cpu,
    /// Mutual-TLS handshakes agent A completed during them.
    pub handshakes: u64,
}

impl Measured {
    /// Seconds of CPU per 1,000 requests (or connections): `(A, B, both)`.
    pub fn cpu_per_1k(&self) -> (f64, f64, f64) {
        let n = (self.run.ok + self.run.errors).max(1) as f64;
        let per = |d: Duration| d.as_secs_f64() * 1_000.0 / n;
        (per(self.cpu.a), per(self.cpu.b), per(self.cpu.both()))
    }
}

/// One protocol: per variant, the fixed-rate runs and saturation.
#[derive(Clone, Debug)]
pub struct ProtocolRows {
    /// The protocol.
    pub protocol: Protocol,
    /// `(variant, fixed-rate runs in rate order, saturation)`.
    pub variants: Vec<(Variant, Vec<Measured>, Measured)>,
}

/// Everything the mTLS row measured.
#[derive(Clone, Debug)]
pub struct MtlsResult {
    /// HTTP/1.1 and HTTP/2 keep-alive.
    pub protocols: Vec<ProtocolRows>,
    /// New connections: `(variant, fixed connection rate, saturation)`.
    pub connections: Vec<(Variant, Measured, Measured)>,
    /// The settings.
    pub settings: Settings,
    /// Agent A's and B's memory at the end.
    pub end: (Sample, Sample),
}

/// The control plane, the two agents and the upstream of the mTLS row.
struct World {
    cp: IdentityControlPlane,
    a: Proc,
    a_outbound: SocketAddr,
    a_admin: SocketAddr,
    b: Proc,
    ticks: u64,
    _dir: tempfile::TempDir,
}

/// The mesh: the two services, each with one endpoint on a listener of agent B.
fn mesh_yaml(app_port: u16, mtls_port: u16, plain_port: u16) -> String {
    let mut yaml = String::new();
    for (name, pod, port, annotations) in [
        ("mtls", "bench-0", mtls_port, "{bulwark.io/injected: bench}"),
        ("plain", "plain-0", plain_port, "{}"),
    ] {
        let ns = sut::NAMESPACE;
        yaml.push_str(&format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: {app_port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-0
  namespace: {ns}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: [\"127.0.0.1\"]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: {pod}, namespace: {ns}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {ns}
  labels: {{app: {name}}}
  annotations: {annotations}
spec: {{serviceAccountName: bench}}
status: {{podIP: \"127.0.0.1\"}}
---
"
        ));
    }
    yaml
}

/// An agent of pod `token.pod` with identity, `extra` flags after the common ones;
/// waits until it is ready and shows its SPIFFE ID.
async fn start_agent(
    layout: &Layout,
    name: &str,
    cp: &IdentityControlPlane,
    token: &Token,
    token_dir: &Path,
    extra: Vec<String>,
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let token_file = token_dir.join(format!("{}.token", token.pod));
    std::fs::write(&token_file, &token.token)?;
    let (outbound, admin) = (free_addr()?, free_addr()?);
    let mut args = vec![
        "--control-plane".to_owned(),
        cp.url(),
        "--control-plane-ca".to_owned(),
        cp.anchor.display().to_string(),
        "--token-file".to_owned(),
        token_file.display().to_string(),
        "--namespace".to_owned(),
        token.namespace.clone(),
        "--pod-name".to_owned(),
        token.pod.clone(),
        "--service-account".to_owned(),
        token.service_account.clone(),
        "--outbound-addr".to_owned(),
        outbound.to_string(),
        "--admin-addr".to_owned(),
        admin.to_string(),
    ];
    args.extend(extra);
    let mut proc = Proc::spawn(
        layout,
        name,
        &layout.bin_dir.join("bulwark-agent"),
        &args,
        layout.proxy_cpus.as_deref(),
        &[("RUST_LOG", "warn")],
    )?;
    proc.wait("/ready with a workload certificate", || async {
        http_status(admin, "/ready").await == Some(200)
            && config(admin)
                .await
                .is_some_and(|c| c["identity"]["spiffeId"].is_string())
    })
    .await?;
    Ok((proc, outbound, admin))
}

/// The agent's `/config`, parsed.
async fn config(admin: SocketAddr) -> Option<serde_json::Value> {
    let (status, body) = fetch(admin, "/config").await?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// The identity agent A expects at the one endpoint of `authority` (`Some("")`: the
/// endpoint is there, plaintext).
async fn expected_identity(admin: SocketAddr, authority: &str) -> Option<String> {
    let config = config(admin).await?;
    let name = format!("{authority}:80");
    let dst = config["config"]["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name.as_str())?;
    let endpoint = dst["endpoints"].as_array()?.first()?;
    Some(endpoint["identity"].as_str().unwrap_or_default().to_owned())
}

/// Mutual-TLS handshakes agent A has completed (`bulwark_tls_handshakes_total`).
async fn handshakes(admin: SocketAddr) -> u64 {
    let Some((_, metrics)) = fetch(admin, "/metrics").await else {
        return 0;
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("bulwark_tls_handshakes_total{") && l.contains("outbound"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

impl World {
    async fn start(layout: &Layout, upstream: &Upstream) -> anyhow::Result<World> {
        let dir = tempfile::Builder::new()
            .prefix("bulwark-bench-mtls-")
            .tempdir()?;
        let mesh = dir.path().join("mesh");
        std::fs::create_dir(&mesh)?;
        let (mtls_listener, plain_listener) = (free_addr()?, free_addr()?);
        let app_port = upstream.http.port();
        std::fs::write(
            mesh.join("services.yaml"),
            mesh_yaml(app_port, mtls_listener.port(), plain_listener.port()),
        )?;
        let client = Token::new(sut::NAMESPACE, "client", "client-0");
        let server = Token::new(sut::NAMESPACE, "bench", "bench-0");
        let token_file = dir.path().join("tokens.yaml");
        write_token_file(&token_file, &[client.clone(), server.clone()])?;
        let cp = IdentityControlPlane::start(
            layout,
            "control-plane-mtls",
            &mesh,
            &token_file,
            &dir.path().join("anchor.pem"),
            layout.load_cpus.as_deref(),
        )
        .await?;
        let (b, _, _) = start_agent(
            layout,
            "agent-b-inbound",
            &cp,
            &server,
            dir.path(),
            vec![
                "--label".to_owned(),
                "app=mtls".to_owned(),
                "--inbound".to_owned(),
                format!("{mtls_listener}={app_port}"),
                "--inbound".to_owned(),
                format!("{plain_listener}={app_port}"),
            ],
        )
        .await?;
        let (mut a, a_outbound, a_admin) = start_agent(
            layout,
            "agent-a-outbound",
            &cp,
            &client,
            dir.path(),
            vec!["--label".to_owned(), "app=client".to_owned()],
        )
        .await?;
        let want = format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            server.namespace, server.service_account
        );
        a.wait("both services in agent A's view, mtls.bench meshed", || {
            let want = want.clone();
            async move {
                expected_identity(a_admin, MTLS_AUTHORITY).await.as_deref() == Some(&want)
                    && expected_identity(a_admin, PLAIN_AUTHORITY).await.as_deref() == Some("")
            }
        })
        .await?;
        Ok(World {
            cp,
            a,
            a_outbound,
            a_admin,
            b,
            ticks: procstat::ticks_per_second(),
            _dir: dir,
        })
    }

    fn samples(&self) -> anyhow::Result<(Sample, Sample)> {
        Ok((
            procstat::sample(self.a.pid(), self.ticks).context("sampling agent A")?,
            procstat::sample(self.b.pid(), self.ticks).context("sampling agent B")?,
        ))
    }

    /// Runs `work` and charges both agents' CPU and A's handshakes to it.
    async fn measure<F>(&self, rate: u32, work: F) -> anyhow::Result<Measured>
    where
        F: Future<Output = Run>,
    {
        let shakes = handshakes(self.a_admin).await;
        let before = self.samples()?;
        let run = work.await;
        let after = self.samples()?;
        let shakes = handshakes(self.a_admin).await.saturating_sub(shakes);
        Ok(Measured {
            rate,
            run,
            cpu: Cpu {
                a: after.0.cpu.saturating_sub(before.0.cpu),
                b: after.1.cpu.saturating_sub(before.1.cpu),
            },
            handshakes: shakes,
        })
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
        self.cp.cp.proc.stop().await;
    }
}

/// Adds `m` to the `slot` of earlier rounds.
fn absorb(slot: &mut Option<Measured>, m: Measured) {
    match slot {
        None => *slot = Some(m),
        Some(acc) => {
            acc.run.absorb(m.run);
            acc.cpu.add(m.cpu);
            acc.handshakes += m.handshakes;
        }
    }
}

/// ABBA: plaintext first in even rounds, mTLS first in odd ones.
fn order(round: usize) -> [Variant; 2] {
    if round.is_multiple_of(2) {
        [Variant::Plain, Variant::Mtls]
    } else {
        [Variant::Mtls, Variant::Plain]
    }
}

fn index(v: Variant) -> usize {
    match v {
        Variant::Plain => 0,
        Variant::Mtls => 1,
    }
}

/// One new connection through A: `CONNECT authority:80`, one request with
/// `Connection: close`, the whole 200 answer read to its end.
async fn tunnel_once(proxy: SocketAddr, authority: &'static str) -> Result<(), String> {
    let mut stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let connect = format!("CONNECT {authority}:80 HTTP/1.1\r\nHost: {authority}:80\r\n\r\n");
    stream
        .write_all(connect.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // The proxy's answer to CONNECT is a head alone; read it byte by byte so that none
    // of the tunnelled answer is taken with it.
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.map_err(|e| e.to_string())? == 0 || head.len() > 4096 {
            return Err("the proxy closed during CONNECT".to_owned());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        let text = String::from_utf8_lossy(&head);
        return Err(format!(
            "CONNECT refused: {}",
            text.lines().next().unwrap_or_default()
        ));
    }
    let request = format!("GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::with_capacity(2048);
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    if !answer.starts_with(b"HTTP/1.1 200") || answer.len() < crate::upstream::BODY_SIZE {
        return Err(format!(
            "unexpected answer through the tunnel ({} bytes)",
            answer.len()
        ));
    }
    Ok(())
}

/// Runs the mTLS row: `config`'s rates, durations and concurrency, `settings`'s rounds
/// and handshake runs, against `upstream`.
pub async fn run(
    layout: &Layout,
    config: &crate::run::Config,
    settings: &Settings,
    upstream: &Upstream,
) -> anyhow::Result<MtlsResult> {
    let world = World::start(layout, upstream).await?;
    let result = measure_all(&world, config, settings).await;
    let end = world.samples();
    world.stop().await;
    let mut result = result?;
    result.end = end?;
    Ok(result)
}

/// Runs `work` for both variants, `rounds` times in ABBA order, charging each run its
/// agents' CPU, and logs each run under `label`; `[plaintext, mTLS]`, each summed over
/// the rounds.
async fn abba<W, F>(
    world: &World,
    rounds: usize,
    rate: u32,
    label: &str,
    work: W,
) -> anyhow::Result<[Measured; 2]>
where
    W: Fn(Variant) -> F,
    F: Future<Output = Run>,
{
    let mut acc: [Option<Measured>; 2] = [None, None];
    for round in 0..rounds.max(1) {
        for variant in order(round) {
            let m = world.measure(rate, work(variant)).await?;
            eprintln!(
                "    {} {label}: {:.0}/s, p50 {:?} p99 {:?}, ok {} errors {}{}, CPU A {:?} B {:?}",
                variant.name(),
                m.run.throughput(),
                m.run.quantile(0.5),
                m.run.quantile(0.99),
                m.run.ok,
                m.run.errors,
                m.run
                    .first_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default(),
                m.cpu.a,
                m.cpu.b
            );
            absorb(&mut acc[index(variant)], m);
        }
    }
    let [plain, mtls] = acc;
    Ok([
        plain.context("no round ran")?,
        mtls.context("no round ran")?,
    ])
}

async fn measure_all(
    world: &World,
    config: &crate::run::Config,
    settings: &Settings,
) -> anyhow::Result<MtlsResult> {
    let rounds = settings.rounds;
    let mut protocols = Vec::new();
    for protocol in [Protocol::Http1, Protocol::Http2] {
        eprintln!("  two agents, {}", protocol.name());
        let mut clients = Vec::new();
        for variant in [Variant::Plain, Variant::Mtls] {
            let target = Target {
                addr: world.a_outbound,
                authority: variant.authority().to_owned(),
                protocol,
            };
            let client = Arc::new(
                Client::connect(target, config.h2_connections)
                    .await
                    .with_context(|| format!("connecting to agent A for {}", variant.name()))?,
            );
            if let Some(&rate) = config.rates.first() {
                let _ = load::open_loop(Arc::clone(&client), rate, config.warmup).await;
            }
            clients.push(client);
        }
        let client = |v: Variant| Arc::clone(&clients[index(v)]);
        let mut plain = Vec::new();
        let mut mtls = Vec::new();
        for &rate in &config.rates {
            let [p, m] = abba(world, rounds, rate, &format!("{rate}/s"), |v| {
                load::open_loop(client(v), rate, config.duration)
            })
            .await?;
            plain.push(p);
            mtls.push(m);
        }
        let [plain_sat, mtls_sat] = abba(world, rounds, 0, "saturation", |v| {
            load::saturate(client(v), config.concurrency, config.saturation)
        })
        .await?;
        protocols.push(ProtocolRows {
            protocol,
            variants: vec![
                (Variant::Plain, plain, plain_sat),
                (Variant::Mtls, mtls, mtls_sat),
            ],
        });
    }

    eprintln!("  two agents, a new connection per request");
    let proxy = world.a_outbound;
    let rate = settings.connection_rate;
    let [plain_fixed, mtls_fixed] = abba(world, rounds, rate, "new connections", |v| {
        let authority = v.authority();
        load::open_loop_with(rate, settings.connection_duration, move || {
            tunnel_once(proxy, authority)
        })
    })
    .await?;
    let [plain_closed, mtls_closed] = abba(world, rounds, 0, "new connections, saturation", |v| {
        let authority = v.authority();
        load::saturate_with(
            settings.connection_concurrency,
            config.saturation,
            move || tunnel_once(proxy, authority),
        )
    })
    .await?;
    Ok(MtlsResult {
        protocols,
        connections: vec![
            (Variant::Plain, plain_fixed, plain_closed),
            (Variant::Mtls, mtls_fixed, mtls_closed),
        ],
        settings: settings.clone(),
        end: (Sample::default(), Sample::default()),
    })
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

impl MtlsResult {
    fn rows(&self, protocol: Protocol) -> Option<&ProtocolRows> {
        self.protocols.iter().find(|p| p.protocol == protocol)
    }

    /// mTLS over plaintext CPU per request (both agents) at `rate`.
    pub fn cpu_ratio(&self, protocol: Protocol, rate: u32) -> Option<f64> {
        let rows = self.rows(protocol)?;
        let at = |v: Variant| {
            let (_, rates, _) = rows.variants.iter().find(|(x, _, _)| *x == v)?;
            Some(rates.iter().find(|m| m.rate == rate)?.cpu_per_1k().2)
        };
        let (plain, mtls) = (at(Variant::Plain)?, at(Variant::Mtls)?);
        (plain > 0.0).then(|| mtls / plain)
    }

    /// CPU per new connection, milliseconds, `(A, B, both)`, of `variant`'s fixed-rate
    /// connection run.
    fn per_connection(&self, variant: Variant) -> Option<(f64, f64, f64)> {
        let (_, fixed, _) = self.connections.iter().find(|(v, _, _)| *v == variant)?;
        Some(fixed.cpu_per_1k())
    }

    /// The handshake cost per new connection: mTLS minus plaintext CPU per connection,
    /// milliseconds, `(A, B, both)`.
    pub fn handshake_cost(&self) -> Option<(f64, f64, f64)> {
        let (p, m) = (
            self.per_connection(Variant::Plain)?,
            self.per_connection(Variant::Mtls)?,
        );
        Some((m.0 - p.0, m.1 - p.1, m.2 - p.2))
    }

    /// Whether every run completed without an error.
    fn clean(&self) -> bool {
        let keep_alive = self
            .protocols
            .iter()
            .flat_map(|p| &p.variants)
            .flat_map(|(_, rates, sat)| rates.iter().chain([sat]));
        let connections = self.connections.iter().flat_map(|(_, f, c)| [f, c]);
        keep_alive.chain(connections).all(|m| m.run.errors == 0)
    }

    /// The tables of the mTLS row, as Markdown.
    pub fn markdown(&self, rates: &[u32]) -> String {
        let mut out = String::new();
        out.push_str(
            "#### Mutual TLS between two agents (client → agent A → agent B → upstream)\n\n",
        );
        let mut header = "| protocol | between the agents | max req/s |".to_owned();
        let mut rule = "|---|---|---:|".to_owned();
        for r in rates {
            header.push_str(&format!(
                " {r}/s p50 / p99 / p99.9 ms | CPU s per 1k req @{r}/s, A / B / both |"
            ));
            rule.push_str("---|---|");
        }
        header.push_str(" handshakes (A) |");
        rule.push_str("---:|");
        out.push_str(&format!("{header}\n{rule}\n"));
        let mut errors = Vec::new();
        for rows in &self.protocols {
            for (variant, measured, saturation) in &rows.variants {
                out.push_str(&format!(
                    "| {} | {} | {:.0} |",
                    rows.protocol.name(),
                    variant.name(),
                    saturation.run.throughput()
                ));
                let mut shakes = saturation.handshakes;
                for r in rates {
                    match measured.iter().find(|m| m.rate == *r) {
                        Some(m) => {
                            let (a, b, both) = m.cpu_per_1k();
                            out.push_str(&format!(
                                " {} / {} / {} | {a:.4} / {b:.4} / **{both:.4}** |",
                                ms(m.run.quantile(0.5)),
                                ms(m.run.quantile(0.99)),
                                ms(m.run.quantile(0.999)),
                            ));
                            shakes += m.handshakes;
                            if m.run.errors > 0 {
                                errors.push(format!(
                                    "{} {} at {r}/s: {} of {} failed ({})",
                                    rows.protocol.name(),
                                    variant.name(),
                                    m.run.errors,
                                    m.run.ok + m.run.errors,
                                    m.run.first_error.as_deref().unwrap_or("lost")
                                ));
                            }
                        }
                        None => out.push_str(" - | - |"),
                    }
                }
                out.push_str(&format!(" {shakes} |\n"));
            }
        }
        for error in errors {
            out.push_str(&format!("\n- errors: {error}\n"));
        }
        out.push('\n');

        out.push_str("| protocol |");
        let mut rule = "|---|".to_owned();
        for r in rates {
            out.push_str(&format!(" mTLS / plaintext CPU per request @{r}/s |"));
            rule.push_str("---:|");
        }
        out.push_str(" mTLS − plaintext p50 @");
        out.push_str(&rates.first().map_or("-".to_owned(), u32::to_string));
        out.push_str("/s ms | max throughput mTLS / plaintext |\n");
        rule.push_str("---:|---:|\n");
        out.push_str(&rule);
        for rows in &self.protocols {
            out.push_str(&format!("| {} |", rows.protocol.name()));
            for r in rates {
                match self.cpu_ratio(rows.protocol, *r) {
                    Some(x) => out.push_str(&format!(" {x:.2} |")),
                    None => out.push_str(" - |"),
                }
            }
            let find = |v: Variant| rows.variants.iter().find(|(x, _, _)| *x == v);
            let p50 = rates.first().and_then(|r| {
                let at = |v: Variant| {
                    find(v)?
                        .1
                        .iter()
                        .find(|m| m.rate == *r)
                        .map(|m| m.run.quantile(0.5).as_secs_f64())
                };
                Some(at(Variant::Mtls)? - at(Variant::Plain)?)
            });
            let throughput = find(Variant::Mtls)
                .zip(find(Variant::Plain))
                .map(|(m, p)| m.2.run.throughput() / p.2.run.throughput().max(1e-9));
            out.push_str(&format!(
                " {} | {} |\n",
                p50.map_or("-".to_owned(), |d| format!("{:+.3}", d * 1e3)),
                throughput.map_or("-".to_owned(), |t| format!("{t:.2}"))
            ));
        }
        out.push('\n');

        let s = &self.settings;
        out.push_str(&format!(
            "New connections: each a `CONNECT` tunnel through A and one request with \
             `Connection: close` ({}/s for {} s per round, then {} in flight for the \
             saturation figure):\n\n",
            s.connection_rate,
            s.connection_duration.as_secs_f64(),
            s.connection_concurrency
        ));
        out.push_str(
            "| between the agents | new connections/s at saturation | p50 / p99 ms | CPU ms per connection, A / B / both | handshakes (A) | errors |\n|---|---:|---|---|---:|---:|\n",
        );
        for (variant, fixed, closed) in &self.connections {
            let (a, b, both) = fixed.cpu_per_1k();
            out.push_str(&format!(
                "| {} | {:.0} | {} / {} | {a:.3} / {b:.3} / **{both:.3}** | {} | {} |\n",
                variant.name(),
                closed.run.throughput(),
                ms(fixed.run.quantile(0.5)),
                ms(fixed.run.quantile(0.99)),
                fixed.handshakes + closed.handshakes,
                fixed.run.errors + closed.run.errors
            ));
        }
        if let Some((a, b, both)) = self.handshake_cost() {
            out.push_str(&format!(
                "\n**Handshake cost per new connection** (mTLS minus plaintext CPU per \
                 connection): {both:.3} ms (A, the client side: {a:.3}; B, the server side: \
                 {b:.3}).\n"
            ));
        }
        let (a, b) = self.end;
        out.push_str(&format!(
            "\nPeak RSS at the end: agent A {} MiB, agent B {} MiB.\n\n",
            mib(a.peak_rss_kib),
            mib(b.peak_rss_kib)
        ));
        out
    }

    /// The target lines of the mTLS row: `(target, measured, met)`.
    pub fn targets(&self, rates: &[u32]) -> Vec<(String, String, Option<bool>)> {
        let mut lines = Vec::new();
        let Some(&high) = rates.last() else {
            return lines;
        };
        for protocol in [Protocol::Http1, Protocol::Http2] {
            if let Some(ratio) = self.cpu_ratio(protocol, high) {
                lines.push((
                    format!(
                        "mTLS between two agents ≤ +15 % CPU per request over plaintext ({}, @{high}/s)",
                        protocol.name()
                    ),
                    format!("{:+.1} %", (ratio - 1.0) * 100.0),
                    Some(ratio <= 1.15),
                ));
            }
        }
        if let Some((_, _, both)) = self.handshake_cost() {
            lines.push((
                "mTLS handshake cost per new connection reported".to_owned(),
                format!("{both:.3} ms CPU (both agents)"),
                Some(self.clean()),
            ));
        }
        lines
    }
}
