//! The discovery gRPC service: one bidirectional stream per agent. The agent says
//! `hello`, gets its snapshot, then a new one (a delta from protocol 6) whenever its
//! view changes, and answers each with an ACK or a NACK; a NACKed delta is answered with
//! the whole view. Each stream is one task that watches the index; no
//! thread and no copy of the mesh per agent: what all agents share (the encoded service
//! list, the limits of a label set) is computed once per index state, in a
//! [`ViewCache`], and the routing and codec in [`server`] send it as it is.

mod server;

pub use server::DiscoveryServer;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bulwark_proto::v1 as proto;
use bulwark_proto::v1::agent_message::Kind;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::discovery::agents::{AgentIdentity, AgentRegistry, Registration};
use crate::discovery::view::{AgentView, PendingSnapshot, ViewCache};
use crate::identity::discovery::DiscoveryAuth;
use crate::index::IndexState;
use crate::metrics::Metrics;

/// How long an agent may take to send `hello` after opening the stream.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Discovery` service.
#[derive(Clone, Debug)]
pub struct DiscoveryService {
    state: watch::Receiver<Arc<IndexState>>,
    agents: Arc<AgentRegistry>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    cache: Arc<ViewCache>,
    auth: Option<DiscoveryAuth>,
}

impl DiscoveryService {
    /// A service streaming views of `state`; streams end when `shutdown` becomes true.
    pub fn new(
        state: watch::Receiver<Arc<IndexState>>,
        agents: Arc<AgentRegistry>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        DiscoveryService {
            state,
            agents,
            metrics,
            shutdown,
            cache: Arc::new(ViewCache::new()),
            auth: None,
        }
    }

    /// With `auth`, a stream is served only to an agent whose token proves the pod it
    /// claims, with that pod's labels from the cluster.
    pub fn with_auth(mut self, auth: Option<DiscoveryAuth>) -> Self {
        self.auth = auth;
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> DiscoveryServer {
        DiscoveryServer::new(self)
    }
}

/// What the per-agent task hands to the response stream.
#[derive(Debug)]
enum Outgoing {
    Snapshot(PendingSnapshot),
    End(Status),
}

/// The response stream of one agent. It yields snapshots that hold the shared parts by
/// reference; the codec writes the wire message when tonic is ready to send it, so a slow
/// agent holds a reference to the shared mesh, not a copy.
#[derive(Debug)]
pub struct SnapshotStream {
    rx: mpsc::Receiver<Outgoing>,
}

impl Stream for SnapshotStream {
    type Item = Result<PendingSnapshot, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|next| {
            next.map(|outgoing| match outgoing {
                Outgoing::Snapshot(snapshot) => Ok(snapshot),
                Outgoing::End(status) => Err(status),
            })
        })
    }
}

impl DiscoveryService {
    /// Serves one agent's stream: reads its hello, registers it, and spawns the task that
    /// sends its snapshots and reads its ACKs.
    async fn stream(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let peer = request.remote_addr();
        let (metadata, _, mut messages) = request.into_parts();
        let mut identity = read_hello(&mut messages).await?;
        if let Some(auth) = &self.auth {
            auth.authenticate(&metadata, &mut identity).await?;
        }
        let registration = self.agents.register(identity, peer);
        let id = registration.entry().identity();
        info!(
            namespace = %id.namespace,
            pod = %id.pod_name,
            service_account = %id.service_account,
            agent_version = %id.agent_version,
            peer = ?peer,
            "agent connected"
        );
        let view = AgentView::new(
            id.namespace.clone(),
            id.labels.clone(),
            Arc::clone(&self.cache),
        )
        .with_protocol(id.protocol_version);
        let (tx, rx) = mpsc::channel(1);
        let stream = AgentStream {
            registration,
            view,
            state: self.state.clone(),
            metrics: Arc::clone(&self.metrics),
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(stream.run(messages, tx));
        Ok(Response::new(SnapshotStream { rx }))
    }
}

/// Waits for the agent's `hello` and checks it.
async fn read_hello(
    messages: &mut Streaming<proto::AgentMessage>,
) -> Result<AgentIdentity, Status> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, messages.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "no hello within {}s: an agent must open the stream with AgentMessage.hello",
                HELLO_TIMEOUT.as_secs()
            ))
        })??;
    let identity = match first {
        Some(proto::AgentMessage {
            kind: Some(Kind::Hello(identity)),
        }) => identity,
        Some(_) => {
            return Err(Status::invalid_argument(
                "the first message must be hello (AgentMessage.hello with the agent's identity)",
            ));
        }
        None => {
            return Err(Status::invalid_argument(
                "the stream ended before hello: an agent must open it with AgentMessage.hello",
            ));
        }
    };
    if identity.namespace.is_empty() {
        return Err(Status::invalid_argument(
            "hello.namespace is empty: the agent must say which namespace its pod runs in",
        ));
    }
    Ok(identity.into())
}

/// The task behind one agent's stream.
struct AgentStream {
    registration: Registration,
    view: AgentView,
    state: watch::Receiver<Arc<IndexState>>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
}

/// What woke an agent's task up.
enum Event<'a> {
    /// The response stream can take a snapshot.
    Ready(Result<mpsc::Permit<'a, Outgoing>, mpsc::error::SendError<()>>),
    /// The index published a new state (`false`: the index is gone).
    Changed(bool),
    /// The agent sent something, or its side of the stream ended.
    Message(Result<Option<proto::AgentMessage>, Status>),
    /// The control plane is shutting down.
    Shutdown,
    /// The response stream was dropped: the agent went away.
    Closed,
}

impl AgentStream {
    async fn run(
        mut self,
        mut messages: Streaming<proto::AgentMessage>,
        tx: mpsc::Sender<Outgoing>,
    ) {
        // Whether the view may have changed since it was last sent. The snapshot is
        // built only once the previous one has been taken by the stream, from the
        // latest state, so bursts of changes coalesce for slow agents.
        let mut dirty = true;
        loop {
            let event = tokio::select! {
                permit = tx.reserve(), if dirty => Event::Ready(permit),
                changed = self.state.changed() => Event::Changed(changed.is_ok()),
                message = messages.message() => Event::Message(message),
                _ = crate::stopped(&mut self.shutdown) => Event::Shutdown,
                _ = tx.closed() => Event::Closed,
            };
            match event {
                Event::Ready(Ok(permit)) => {
                    dirty = false;
                    let state = Arc::clone(&self.state.borrow_and_update());
                    if let Some(snapshot) = self.view.update(&state) {
                        let version = snapshot.version();
                        let entry = self.registration.entry();
                        if entry.record_sent(version, snapshot.held_back()) {
                            self.report_held_back(snapshot.held_back());
                        }
                        if !snapshot.held_back().is_empty() {
                            self.metrics.held_back_snapshots.inc();
                        }
                        let base_version = snapshot.base_version();
                        let bytes = snapshot.encoded_len();
                        permit.send(Outgoing::Snapshot(snapshot));
                        self.metrics.snapshots_sent.inc();
                        self.metrics.snapshot_bytes.inc_by(bytes as u64);
                        if base_version.is_some() {
                            self.metrics.deltas_sent.inc();
                        }
                        debug!(pod = %self.pod(), version, ?base_version, bytes, "snapshot sent");
                    }
                }
                Event::Ready(Err(_)) | Event::Closed => break,
                Event::Changed(true) => dirty = true,
                Event::Changed(false) | Event::Shutdown => {
                    let _ = tx.try_send(Outgoing::End(shutting_down()));
                    break;
                }
                Event::Message(Ok(Some(message))) => match self.handle(message) {
                    Ok(resend) => dirty |= resend,
                    Err(status) => {
                        let _ = tx.try_send(Outgoing::End(status));
                        break;
                    }
                },
                Event::Message(Ok(None)) => {
                    debug!(pod = %self.pod(), "agent closed its stream");
                    break;
                }
                Event::Message(Err(status)) => {
                    debug!(pod = %self.pod(), %status, "agent stream failed");
                    break;
                }
            }
        }
        let id = self.registration.entry().identity();
        info!(namespace = %id.namespace, pod = %id.pod_name, "agent disconnected");
    }

    fn pod(&self) -> &str {
        &self.registration.entry().identity().pod_name
    }

    /// Says, once per change, what this agent's snapshots leave out.
    fn report_held_back(&self, held_back: &[crate::discovery::compat::HeldBack]) {
        let id = self.registration.entry().identity();
        if held_back.is_empty() {
            info!(namespace = %id.namespace, pod = %id.pod_name, "nothing held back from the agent any more");
            return;
        }
        let ports: Vec<String> = held_back
            .iter()
            .map(|h| {
                format!(
                    "{} ({}, needs protocol {})",
                    h.port, h.feature, h.needs_protocol
                )
            })
            .collect();
        warn!(
            namespace = %id.namespace,
            pod = %id.pod_name,
            protocol_version = id.protocol_version,
            agent_version = %id.agent_version,
            held_back = ?ports,
            "the agent's protocol is too old for features in force: they are held back and its sharded ports get no endpoints (503 no-endpoints) until it is upgraded"
        );
    }

    /// Records an ACK or NACK; `Ok(true)` when the agent should get the whole view now.
    fn handle(&mut self, message: proto::AgentMessage) -> Result<bool, Status> {
        let mut resend = false;
        let entry = self.registration.entry();
        match message.kind {
            Some(Kind::Ack(ack)) => {
                entry.record_ack(ack.version);
                self.metrics.acks.inc();
                debug!(pod = %self.pod(), version = ack.version, "agent applied snapshot");
            }
            Some(Kind::Nack(nack)) => {
                warn!(
                    namespace = %entry.identity().namespace,
                    pod = %self.pod(),
                    version = nack.version,
                    error = %nack.error,
                    "agent rejected a snapshot and keeps its previous config"
                );
                resend = self.view.nacked(nack.version);
                entry.record_nack(nack.version, nack.error);
                self.metrics.nacks.inc();
            }
            Some(Kind::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "hello may only be sent once, as the first message of the stream",
                ));
            }
            // A message kind from a newer agent: ignore it, as the proto's rules say.
            None => debug!(pod = %self.pod(), "ignoring an agent message of unknown kind"),
        }
        Ok(resend)
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the control plane is shutting down; reconnect")
}
