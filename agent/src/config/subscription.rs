//! The agent's stream to the control plane: subscribe with the pod's identity,
//! apply each snapshot, whole or delta (ACK), or keep the old config (NACK), reconnect
//! with backoff (the first message of every stream is the whole view), and keep
//! enforcing the last good config while disconnected.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bulwark_proto::v1::{self, agent_message, discovery_client::DiscoveryClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::policy::retry::backoff::{BackoffConfig, ExponentialBackoff};
use crate::settings::Identity;

/// How often idle rate-limit buckets are swept.
const RATE_LIMIT_SWEEP: Duration = Duration::from_secs(60);

/// Why a stream to the control plane ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The ServiceAccount token could not be read.
    #[error(
        "cannot read the ServiceAccount token {path}: {reason} (is the projected token volume mounted?)"
    )]
    Token {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The stream failed.
    #[error("control plane stream failed: {0}")]
    Status(#[from] tonic::Status),
    /// The stream was closed by the control plane.
    #[error("control plane closed the stream")]
    Closed,
}

/// Applies snapshots to the config in force.
#[derive(Debug)]
pub struct Applier {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
}

impl Applier {
    /// An applier swapping into `config`; `ready` turns true with the first good snapshot.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        ready: watch::Sender<bool>,
    ) -> Self {
        Self {
            config,
            metrics,
            ready,
        }
    }

    /// Builds and swaps in the config of `snapshot` (the whole view, or a delta onto the
    /// config in force); on error the old config stays.
    pub fn apply(&self, snapshot: &v1::Snapshot) -> Result<(), ConfigError> {
        let current = self.config.load();
        let base_version =
            bulwark_proto::delta::is_delta(snapshot).then_some(snapshot.base_version);
        match Config::build(snapshot, &current, &self.metrics) {
            Ok(config) => {
                let services = config.destinations().len();
                self.config.store(Arc::new(config));
                self.metrics.config_update(snapshot.version, true);
                self.ready.send_replace(true);
                info!(
                    version = snapshot.version,
                    ?base_version,
                    updated = snapshot.services.len(),
                    removed = snapshot.removed_services.len(),
                    destinations = services,
                    "config applied"
                );
                Ok(())
            }
            Err(error) => {
                self.metrics.config_update(snapshot.version, false);
                warn!(version = snapshot.version, ?base_version, %error, kept = current.version, "config rejected; keeping the previous one");
                Err(error)
            }
        }
    }
}

/// How the agent reaches the control plane.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The address, for logs.
    pub address: String,
    /// The channel (plaintext or TLS, see `identity::channel`).
    pub channel: tonic::transport::Channel,
    /// The projected ServiceAccount token to present, re-read at every connect (the
    /// kubelet rotates it).
    pub token_file: Option<std::path::PathBuf>,
}

/// Runs the subscription until `shutdown` turns true.
pub async fn run(
    connection: Connection,
    identity: Identity,
    applier: Applier,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = ExponentialBackoff::new(
        BackoffConfig {
            base: ExponentialBackoff::INITIAL,
            max: ExponentialBackoff::MAX,
        },
        fastrand::Rng::new(),
    );
    let mut sweep = tokio::time::interval(RATE_LIMIT_SWEEP);
    loop {
        let result = {
            let stream = stream_once(&connection, &identity, &applier, &mut backoff);
            tokio::pin!(stream);
            loop {
                tokio::select! {
                    r = &mut stream => break r,
                    _ = sweep.tick() => {
                        for limiter in applier.config.load().limiters() {
                            limiter.evict_idle();
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            }
        };
        let delay = backoff.next_delay();
        match result {
            Ok(()) | Err(StreamError::Closed) => {
                info!(retry_in = ?delay, "control plane closed the stream; keeping the last config");
            }
            Err(error) => {
                warn!(%error, retry_in = ?delay, "control plane unavailable; keeping the last config");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn stream_once(
    connection: &Connection,
    identity: &Identity,
    applier: &Applier,
    backoff: &mut ExponentialBackoff,
) -> Result<(), StreamError> {
    let address = connection.address.as_str();
    let mut client = DiscoveryClient::new(connection.channel.clone());
    let (tx, rx) = mpsc::channel(8);
    let hello = v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(v1::Identity {
            namespace: identity.namespace.clone(),
            pod_name: identity.pod_name.clone(),
            service_account: identity.service_account.clone(),
            labels: identity
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: bulwark_proto::PROTOCOL_VERSION,
        })),
    };
    tx.send(hello).await.map_err(|_| StreamError::Closed)?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(path) = &connection.token_file {
        let token = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| StreamError::Token {
                path: path.display().to_string(),
                reason: source.to_string(),
            })?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| StreamError::Token {
                path: path.display().to_string(),
                reason: "not a valid header value".to_owned(),
            })?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut snapshots = client.stream(request).await?.into_inner();
    info!(control_plane = %address, "subscribed");
    while let Some(snapshot) = snapshots.message().await? {
        backoff.reset();
        debug!(
            version = snapshot.version,
            base_version = snapshot.base_version,
            services = snapshot.services.len(),
            removed = snapshot.removed_services.len(),
            "snapshot received"
        );
        let answer = match applier.apply(&snapshot) {
            Ok(()) => agent_message::Kind::Ack(v1::Ack {
                version: snapshot.version,
            }),
            Err(error) => agent_message::Kind::Nack(v1::Nack {
                version: snapshot.version,
                error: error.to_string(),
            }),
        };
        tx.send(v1::AgentMessage { kind: Some(answer) })
            .await
            .map_err(|_| StreamError::Closed)?;
    }
    Err(StreamError::Closed)
}
