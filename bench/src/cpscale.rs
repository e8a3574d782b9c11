//! The control-plane scale bench: one process simulates N agents as real gRPC discovery
//! streams (several per HTTP/2 connection), a policy file is changed, and each agent
//! records when the new version reached it and it sent its ACK. With several replicas,
//! the connections are spread over them (as a Service spreads agents) and the CPU and
//! memory figures are the replicas' sums.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bulwark_proto::v1::agent_message::Kind;
use bulwark_proto::v1::{Ack, AgentMessage, Identity};
use hdrhistogram::Histogram;
use prost::Message as _;
use std::sync::Arc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Status, Streaming};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::procstat;
use crate::sut::{self, ControlPlane, Layout, MeshDir, NAMESPACE, Policies};

/// How long the whole mesh may take to connect, or a change to reach everyone.
const DEADLINE: Duration = Duration::from_secs(120);
/// Agents waiting for their first snapshot at once: a rollout, not all pods of the
/// cluster in the same millisecond (10,000 at once with 1,000 services each overran the
/// control plane's 10 s hello timeout on a loaded 2-core machine).
const CONNECTING: usize = 500;
/// The control plane's debounce of file changes during the bench (part of every figure).
pub const DEBOUNCE: &str = "20ms";

/// One scale scenario.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Simulated agents.
    pub agents: usize,
    /// Services in the mesh (every agent's view holds all of them).
    pub services: usize,
    /// Agents sharing one HTTP/2 connection.
    pub agents_per_connection: usize,
    /// Control-plane replicas serving the agents, each over the same folder.
    pub replicas: usize,
}

/// What a scenario measured.
#[derive(Clone, Debug)]
pub struct ScaleResult {
    /// The scenario.
    pub scenario: Scenario,
    /// From the first connect until every agent had ACKed its first snapshot.
    pub connect_all: Duration,
    /// From the file write to each agent's ACK of the new version, nanoseconds.
    pub propagation: Histogram<u64>,
    /// From the file write until the control plane had counted every ACK.
    pub acked_at_control_plane: Option<Duration>,
    /// Protobuf bytes of the new snapshots, all agents together.
    pub bytes_per_change: u64,
    /// Control-plane CPU time spent on the change.
    pub cpu_per_change: Duration,
    /// Control-plane CPU time spent on connecting everyone.
    pub cpu_connect: Duration,
    /// Control-plane resident memory after the change, KiB.
    pub rss_kib: u64,
    /// Control-plane peak resident memory, KiB.
    pub peak_rss_kib: u64,
    /// Size of the admin `/agents` answer, bytes.
    pub agents_page_bytes: Option<usize>,
}

fn identity(n: usize, services: usize) -> Identity {
    let app = if n.is_multiple_of(services) {
        "bench".to_owned()
    } else {
        format!("svc-{}", n % services)
    };
    Identity {
        namespace: NAMESPACE.to_owned(),
        pod_name: format!("{app}-{n}"),
        service_account: "default".to_owned(),
        labels: [("app".to_owned(), app)].into(),
        agent_version: "bench".to_owned(),
        protocol_version: bulwark_proto::PROTOCOL_VERSION,
    }
}

/// A policy on `bench` (and a rate limit on every tenth service, so that inbound views
/// differ between agents); `attempts` is what the change edits.
fn policies(services: usize, attempts: u32) -> String {
    let mut yaml = format!(
        "apiVersion: bulwark.io/v1alpha1
kind: ResiliencePolicy
metadata: {{name: bench, namespace: {NAMESPACE}}}
spec:
  targetRefs: [{{kind: Service, name: bench}}]
  retry: {{attempts: {attempts}}}
"
    );
    for n in (10..services).step_by(10) {
        yaml.push_str(&format!(
            "---
apiVersion: bulwark.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: svc-{n}, namespace: {NAMESPACE}}}
spec:
  targetRefs: [{{kind: Service, name: svc-{n}}}]
  limits: [{{name: total, rate: {{requests: 100, per: 1s}}}}]
"
        ));
    }
    yaml
}

/// What a simulated agent reads of a snapshot: its version and size. A real agent
/// decodes the service list on its own CPU; 10,000 simulated agents decoding it in one
/// process would measure the simulator rather than the control plane.
#[derive(Clone, Copy, Debug)]
struct SnapshotHead {
    /// `Snapshot.version`.
    version: u64,
    /// The encoded size of the whole message.
    bytes: u64,
}

/// `Snapshot` with only its version: prost skips the other fields unparsed.
#[derive(Clone, PartialEq, prost::Message)]
struct VersionOnly {
    #[prost(uint64, tag = "1")]
    version: u64,
}

/// Sends `AgentMessage`s, reads [`SnapshotHead`]s.
#[derive(Clone, Copy, Debug, Default)]
struct HeadCodec;

impl Codec for HeadCodec {
    type Encode = AgentMessage;
    type Decode = SnapshotHead;
    type Encoder = HeadCodec;
    type Decoder = HeadCodec;

    fn encoder(&mut self) -> Self::Encoder {
        HeadCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        HeadCodec
    }
}

impl Encoder for HeadCodec {
    type Item = AgentMessage;
    type Error = Status;

    fn encode(&mut self, item: AgentMessage, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|error| Status::internal(error.to_string()))
    }
}

impl Decoder for HeadCodec {
    type Item = SnapshotHead;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<SnapshotHead>, Status> {
        use bytes::Buf as _;
        let bytes = buf.remaining() as u64;
        let head = VersionOnly::decode(buf).map_err(|error| Status::internal(error.to_string()))?;
        Ok(Some(SnapshotHead {
            version: head.version,
            bytes,
        }))
    }
}

/// Opens a discovery stream that sends what `rx` yields.
async fn open_stream(
    channel: Channel,
    rx: mpsc::Receiver<AgentMessage>,
) -> anyhow::Result<Streaming<SnapshotHead>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/bulwark.mesh.v1.Discovery/Stream");
    let request = tonic::Request::new(ReceiverStream::new(rx));
    Ok(grpc.streaming(request, path, HeadCodec).await?.into_inner())
}

/// One simulated agent: receives its first snapshot and ACKs it (reported on `ready`),
/// then waits for a newer one, ACKs it, and reports the delay on `done`. It keeps its
/// stream open until the runner drops `done`'s receiver.
async fn agent(
    channel: Channel,
    hello: Identity,
    connecting: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<anyhow::Result<()>>,
    change: tokio::sync::watch::Receiver<Option<Instant>>,
    done: mpsc::UnboundedSender<anyhow::Result<(Duration, u64)>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let slot = connecting.acquire_owned().await;
    let first = async {
        tx.send(AgentMessage {
            kind: Some(Kind::Hello(hello)),
        })
        .await?;
        let mut snapshots = open_stream(channel, rx).await?;
        let first = snapshots
            .message()
            .await?
            .context("stream ended before a snapshot")?;
        tx.send(AgentMessage {
            kind: Some(Kind::Ack(Ack {
                version: first.version,
            })),
        })
        .await?;
        Ok::<_, anyhow::Error>((first.version, snapshots))
    }
    .await;
    drop(slot);
    let (first_version, mut snapshots) = match first {
        Ok(first) => {
            let _ = ready.send(Ok(()));
            first
        }
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let next = async {
        let next = snapshots
            .message()
            .await?
            .context("stream ended before the change")?;
        tx.send(AgentMessage {
            kind: Some(Kind::Ack(Ack {
                version: next.version,
            })),
        })
        .await?;
        let at = Instant::now();
        if next.version <= first_version {
            bail!("version went from {first_version} to {}", next.version);
        }
        let changed_at = (*change.borrow()).context("a snapshot arrived before the change")?;
        Ok((at.saturating_duration_since(changed_at), next.bytes))
    }
    .await;
    let _ = done.send(next);
    done.closed().await;
    drop((tx, snapshots));
}

/// Runs one scenario against a fresh control plane on `cpus`.
pub async fn run(
    layout: &Layout,
    scenario: Scenario,
    cpus: Option<&str>,
) -> anyhow::Result<ScaleResult> {
    let ticks = procstat::ticks_per_second();
    // The mesh: `services` services, every endpoint on a port nobody listens on.
    let nowhere = "127.0.0.1:9".parse().context("a literal address")?;
    let mesh = MeshDir::new(nowhere, scenario.services, Policies::None)?;
    mesh.write("policies.yaml", &policies(scenario.services, 2))?;
    let mut replicas = Vec::with_capacity(scenario.replicas.max(1));
    for _ in 0..scenario.replicas.max(1) {
        replicas.push(ControlPlane::start(layout, &mesh, DEBOUNCE, cpus).await?);
    }
    let pids: Vec<u32> = replicas.iter().map(|cp| cp.proc.pid()).collect();
    let before_connect = sample_all(&pids, ticks)?;

    let connections = scenario
        .agents
        .div_ceil(scenario.agents_per_connection.max(1));
    let mut channels = Vec::with_capacity(connections);
    for n in 0..connections {
        let cp = &replicas[n % replicas.len()];
        let channel = Endpoint::from_shared(format!("http://{}", cp.grpc))?
            .connect()
            .await
            .with_context(|| format!("connecting to the control plane at {}", cp.grpc))?;
        channels.push(channel);
    }
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (change_tx, change_rx) = tokio::sync::watch::channel(None);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    for n in 0..scenario.agents {
        tokio::spawn(agent(
            channels[n % connections].clone(),
            identity(n, scenario.services),
            Arc::clone(&connecting),
            ready_tx.clone(),
            change_rx.clone(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);
    drop(ready_tx);
    for _ in 0..scenario.agents {
        match tokio::time::timeout(DEADLINE, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(error))) => {
                return Err(error.context("a simulated agent failed to connect"));
            }
            Ok(None) => bail!("the simulated agents stopped early"),
            Err(_) => {
                bail!("the agents did not all receive their first snapshot within {DEADLINE:?}")
            }
        }
    }
    let connect_all = start.elapsed();
    for cp in &mut replicas {
        cp.proc.check_alive()?;
    }
    // Let the first ACKs land before the change.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sample_all(&pids, ticks)?;

    let changed_at = Instant::now();
    change_tx.send_replace(Some(changed_at));
    mesh.write("policies.yaml", &policies(scenario.services, 3))?;

    let mut propagation = Histogram::new_with_bounds(1_000, 600_000_000_000, 3)?;
    let mut bytes_per_change = 0;
    let mut received = 0;
    while received < scenario.agents {
        let next = tokio::time::timeout(DEADLINE, done_rx.recv())
            .await
            .context("the change did not reach every agent in time")?;
        match next {
            Some(Ok((latency, bytes))) => {
                propagation.saturating_record(latency.as_nanos() as u64);
                bytes_per_change += bytes;
                received += 1;
            }
            Some(Err(error)) => return Err(error.context("a simulated agent failed")),
            None => bail!("the simulated agents stopped early"),
        }
    }
    let admins: Vec<_> = replicas.iter().map(|cp| cp.admin).collect();
    let acked_at_control_plane = wait_acks(&admins, 2 * scenario.agents as u64, changed_at).await;
    let after = sample_all(&pids, ticks)?;
    let mut agents_page_bytes = None;
    for admin in &admins {
        if let Some(bytes) = page_size(*admin, "/agents").await {
            agents_page_bytes = Some(agents_page_bytes.unwrap_or(0) + bytes);
        }
    }
    let result = ScaleResult {
        scenario,
        connect_all,
        propagation,
        acked_at_control_plane,
        bytes_per_change,
        cpu_per_change: after.cpu.saturating_sub(before.cpu),
        cpu_connect: before.cpu.saturating_sub(before_connect.cpu),
        rss_kib: after.rss_kib,
        peak_rss_kib: after.peak_rss_kib,
        agents_page_bytes,
    };
    drop(done_rx);
    for cp in replicas {
        cp.proc.stop().await;
    }
    Ok(result)
}

/// The replicas' CPU time and memory, summed.
fn sample_all(pids: &[u32], ticks: u64) -> anyhow::Result<procstat::Sample> {
    let mut sum = procstat::Sample {
        cpu: Duration::ZERO,
        rss_kib: 0,
        peak_rss_kib: 0,
        anon_kib: 0,
    };
    for pid in pids {
        let one = procstat::sample(*pid, ticks)?;
        sum.cpu += one.cpu;
        sum.rss_kib += one.rss_kib;
        sum.peak_rss_kib += one.peak_rss_kib;
        sum.anon_kib += one.anon_kib;
    }
    Ok(sum)
}

/// Polls the replicas' ACK counters until they reach `acks` together; the time since
/// `since`.
async fn wait_acks(admins: &[std::net::SocketAddr], acks: u64, since: Instant) -> Option<Duration> {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        let mut counted = 0;
        for admin in admins {
            let (_, text) = sut::fetch(*admin, "/metrics").await?;
            counted += text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("bulwark_cp_acks_total ")?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .map_or(0, |c| c as u64);
        }
        if counted >= acks {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn page_size(admin: std::net::SocketAddr, path: &str) -> Option<usize> {
    sut::fetch(admin, path).await.map(|(_, body)| body.len())
}
