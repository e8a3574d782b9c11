//! Bulwark's control plane: reads policies and topology from a source, resolves them in
//! an index, and streams each agent its view over gRPC.
//!
//! ```text
//! source (dir) ──Model──► index ──IndexState──► one task per agent stream ──► agent
//!                  │                                     │
//!                  └── rejections ──► admin (/errors)    └── registry ──► admin (/agents)
//! ```
//!
//! [`ControlPlane::start`] runs everything in-process (the binary, tests and the demo
//! use it).
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

pub mod admin;
pub mod api;
pub mod crds;
pub mod discovery;
pub mod duration;
// The fuzz target's body: for `fuzz/` (the `fuzzing` feature) and the corpus replay.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod index;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod source;
pub mod status;
pub mod timestamp;
// issue 5: the sidecar-injection webhook
pub mod webhook;

#[cfg(test)]
mod testing;

pub use source::Source;

use crate::admin::AdminState;
use crate::discovery::agents::AgentRegistry;
use crate::discovery::grpc::DiscoveryService;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::source::Publisher;
use crate::source::dir::{DirSource, DirWatcher};

/// Default `--grpc-addr`.
pub const DEFAULT_GRPC_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9990));
/// Default `--admin-addr`.
pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9991));
/// Default `--debounce`: how long the folder must be quiet before it is re-read.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);

/// How long [`ControlPlane::shutdown`] waits for tasks before aborting them.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on agent connections, so dead agents (and their registry entries) go away.
const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may stay unanswered before the connection is closed.
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on agent connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How to run a control plane.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where configuration comes from.
    pub source: Source,
    /// The gRPC listen address (port 0 picks a free port).
    pub grpc_addr: SocketAddr,
    /// The admin HTTP listen address (port 0 picks a free port).
    pub admin_addr: SocketAddr,
    /// Quiet period after a change in the folder before it is re-read; more than zero.
    pub debounce: Duration,
    /// Workload identity: TLS on the gRPC port, authenticated discovery and the
    /// `Identity` service. `None`: plaintext discovery that believes the agent's hello.
    pub identity: Option<identity::IdentitySettings>,
}

impl Settings {
    /// Settings with the default addresses and debounce.
    pub fn new(source: Source) -> Self {
        Settings {
            source,
            grpc_addr: DEFAULT_GRPC_ADDR,
            admin_addr: DEFAULT_ADMIN_ADDR,
            debounce: DEFAULT_DEBOUNCE,
            identity: None,
        }
    }
}

/// Why the control plane could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error(
        "cannot listen for {what} on {addr}: {source}; is another control plane running, or \
         the port in use?"
    )]
    Bind {
        /// `gRPC` or `admin HTTP`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The source failed (missing folder, watcher).
    #[error(transparent)]
    Source(#[from] source::Error),
    /// A setting is out of range.
    #[error("invalid settings: {0}")]
    Settings(&'static str),
    /// The gRPC server stopped with an error.
    #[error("the gRPC server failed: {0}")]
    Grpc(#[source] tonic::transport::Error),
    /// The control plane's serving certificate could not be made.
    #[error(transparent)]
    Identity(#[from] identity::serving::ServingError),
    /// A start-up task could not run (the runtime is shutting down).
    #[error("a control-plane task failed to run: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A running control plane. Dropping it stops it in the background; prefer
/// [`ControlPlane::shutdown`], which waits.
#[derive(Debug)]
pub struct ControlPlane {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    failures: mpsc::Receiver<Error>,
}

impl ControlPlane {
    /// Binds both listeners, loads the source once, and starts serving. A source folder
    /// that does not exist is an error; invalid documents in it are not (they are
    /// reported at admin `/errors`).
    pub async fn start(settings: Settings) -> Result<Self, Error> {
        if settings.debounce.is_zero() {
            return Err(Error::Settings("debounce must be more than zero"));
        }
        let bind = |what, addr| async move {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { what, addr, source })?;
            let bound =
                listener
                    .local_addr()
                    .map_err(|source| Error::Bind { what, addr, source })?;
            Ok::<_, Error>((listener, bound))
        };
        let (grpc_listener, grpc_addr) = bind("gRPC", settings.grpc_addr).await?;
        let (admin_listener, admin_addr) = bind("admin HTTP", settings.admin_addr).await?;

        let metrics = Arc::new(Metrics::new());
        let publisher = Publisher::new(Arc::clone(&metrics));
        let (shutdown, stop) = watch::channel(false);
        let (mut tasks, api_reach) =
            start_source(&settings, publisher.clone(), Arc::clone(&metrics), &stop).await?;
        let mut models = publisher.models();
        let model = Arc::clone(&models.borrow_and_update());
        let index = Index::with_trust_domain(
            unix_millis(),
            &model,
            Arc::clone(&metrics),
            settings
                .identity
                .as_ref()
                .map(|id| id.authority.trust_domain().to_owned()),
        );
        let state = index.subscribe();
        let ready = Arc::new(AtomicBool::new(false));

        let (failed, failures) = mpsc::channel(4);
        let agents = Arc::new(AgentRegistry::new(Arc::clone(&metrics)));
        let admin_state = Arc::new(AdminState {
            metrics: Arc::clone(&metrics),
            agents: Arc::clone(&agents),
            rejections: publisher.rejections(),
            ready: Arc::clone(&ready),
            api_reach,
        });

        tasks.extend([
            ("index", index.spawn(models, stop.clone())),
            (
                "admin",
                tokio::spawn(admin::serve(admin_listener, admin_state, stop.clone())),
            ),
        ]);

        let auth = settings.identity.as_ref().map(|id| {
            identity::discovery::DiscoveryAuth::new(
                id.reviewer.clone(),
                publisher.models(),
                Arc::clone(&metrics),
            )
        });
        let metrics_for_identity = Arc::clone(&metrics);
        let discovery = DiscoveryService::new(state, agents, metrics, stop.clone()).with_auth(auth);
        let mut grpc_stop = stop.clone();
        let shutdown_signal = async move { stopped(&mut grpc_stop).await };
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT));
        let server: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match &settings.identity {
            None => {
                let incoming = TcpIncoming::from(grpc_listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(TCP_KEEPALIVE));
                Box::pin(
                    builder
                        .add_service(discovery.into_server())
                        .serve_with_incoming_shutdown(incoming, shutdown_signal),
                )
            }
            Some(id) => {
                // Agents dial over TLS with the mesh's anchor; the certificate renews
                // itself before it expires.
                let provider = Arc::new(bulwark_proto::tls::provider());
                let serving = identity::serving::ServingCert::new(
                    Arc::clone(&id.authority),
                    provider,
                    id.serving_names.clone(),
                )
                .map_err(Error::Identity)?;
                let config = serving
                    .server_config()
                    .map_err(|e| Error::Identity(e.into()))?;
                tasks.push(("serving-cert", serving.spawn_renewal(stop.clone())));
                // A rotated issuer (the Secret's files changed) signs from now on,
                // the serving certificate included.
                let reissue = Arc::clone(&serving);
                if let Some(task) = id
                    .authority
                    .spawn_reload(move || reissue.reissue(), stop.clone())
                {
                    tasks.push(("identity-reload", task));
                }
                let incoming = identity::serving::incoming(grpc_listener, config, stop.clone());
                let certify = identity::service::IdentityService::new(
                    Arc::clone(&id.authority),
                    id.reviewer.clone(),
                    Arc::clone(&metrics_for_identity),
                );
                Box::pin(
                    builder
                        .add_service(discovery.into_server())
                        .add_service(certify.into_server())
                        .serve_with_incoming_shutdown(incoming, shutdown_signal),
                )
            }
        };
        tasks.push((
            "grpc",
            tokio::spawn(async move {
                if let Err(error) = server.await {
                    let _ = failed.send(Error::Grpc(error)).await;
                }
            }),
        ));

        ready.store(true, Ordering::Release);
        info!(%grpc_addr, %admin_addr, "control plane serving");
        Ok(ControlPlane {
            grpc_addr,
            admin_addr,
            shutdown,
            tasks,
            failures,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Resolves with the error if a server stops on its own; pending while all is well.
    pub async fn failure(&mut self) -> Error {
        match self.failures.recv().await {
            Some(error) => error,
            None => std::future::pending().await,
        }
    }

    /// Stops accepting, ends every agent stream (agents see `UNAVAILABLE` and reconnect
    /// elsewhere or later), and waits for the tasks, at most a few seconds.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_TIMEOUT;
        for (name, mut task) in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                warn!(task = name, "task did not stop in time; aborting it");
                task.abort();
            }
        }
        info!("control plane stopped");
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// How often start-up reports that it still waits for the cluster.
const SYNC_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The tasks that follow the source, named for the logs.
type SourceTasks = Vec<(&'static str, JoinHandle<()>)>;

/// Loads the source once (the folder, or a first complete list of the cluster) and
/// starts the tasks that follow it. Kubernetes also gets the status writer and its Lease,
/// whose elector says whether the API server answers.
async fn start_source(
    settings: &Settings,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    stop: &watch::Receiver<bool>,
) -> Result<(SourceTasks, Option<watch::Receiver<lease::ApiReach>>), Error> {
    match &settings.source {
        Source::Dir(dirs) => {
            let source = DirSource::open_all(dirs.iter().cloned())?;
            // Watch before the first load, so that no change after it is missed.
            let watcher = DirWatcher::start(source.dirs(), settings.debounce)?;
            let (source, loaded) = tokio::task::spawn_blocking(move || {
                let mut source = source;
                let loaded = source.load();
                (source, loaded)
            })
            .await
            .map_err(Error::Task)?;
            let loaded = loaded?;
            info!(
                source = %settings.source,
                objects = ?model::Kind::ALL.map(|k| (k.as_str(), loaded.model.count(k))),
                rejected = loaded.rejected.len(),
                "source loaded"
            );
            publisher.publish(loaded.model, loaded.rejected);
            Ok((
                vec![("source", watcher.spawn(source, publisher, stop.clone()))],
                None,
            ))
        }
        Source::Kubernetes(kube_settings) => {
            let client = source::kubernetes::client(kube_settings)
                .await
                .map_err(source::Error::from)?;
            let source = source::kubernetes::spawn(
                &client,
                publisher.clone(),
                settings.debounce,
                kube_settings.gateway_api_recheck,
                stop,
            );
            let mut synced = source.synced.clone();
            // Serving before the first complete list would hand agents an empty mesh.
            loop {
                tokio::select! {
                    result = synced.wait_for(|s| *s) => {
                        if result.is_err() {
                            return Err(Error::Settings("the Kubernetes source stopped before its first list"));
                        }
                        break;
                    }
                    _ = tokio::time::sleep(SYNC_REPORT_INTERVAL) => {
                        warn!("still waiting for a first complete list of every watched kind from the API server");
                    }
                }
            }
            let model = Arc::clone(&publisher.models().borrow());
            info!(
                source = %settings.source,
                objects = ?model::Kind::ALL.map(|k| (k.as_str(), model.count(k))),
                "cluster listed"
            );
            let mut tasks = source.tasks;
            let (lease, leader, api_reach) =
                lease::spawn(client.clone(), kube_settings.lease.clone(), stop.clone());
            tasks.push(("lease", lease));
            tasks.push((
                "status",
                status::spawn(client, source.observed, leader, metrics, stop.clone()),
            ));
            Ok((tasks, Some(api_reach)))
        }
    }
}

/// Resolves once `shutdown` is set (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across other awaits.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The index's first revision: now, in Unix milliseconds, so that versions keep
/// increasing across restarts.
fn unix_millis() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}
