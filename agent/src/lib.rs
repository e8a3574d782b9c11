//! The Bulwark agent: a per-pod proxy that enforces resilience policy pushed
//! by the control plane.
//!
//! [`Agent::start`] binds the listeners (outbound, inbound, admin), subscribes
//! to the control plane and serves until [`Agent::shutdown`].

pub mod admin;
pub mod config;
// The fuzz targets' bodies: for `fuzz/` (the `fuzzing` feature) and the corpus replays.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod identity;
pub mod init;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reason;
pub mod settings;
pub mod telemetry;
pub mod transport;
// issue 5: the postStart wait of injected pods without native sidecars
pub mod wait_ready;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use settings::{Identity, InboundSpec, Settings};

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control plane's address or trust anchors are unusable.
    #[error(transparent)]
    ControlPlane(#[from] identity::channel::ChannelError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source} (is another process using the port?)")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The rate-limit store's settings are unusable.
    #[error(transparent)]
    RateLimitStore(#[from] policy::ratelimit::store::StoreError),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    outbound_addr: SocketAddr,
    inbound_transparent_addr: Option<SocketAddr>,
    inbound_addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let bind_err = |source| Error::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    Ok((listener, local))
}

impl Agent {
    /// Binds every listener and starts serving; traffic is proxied without policy
    /// until the first config arrives (`/ready` says when).
    pub async fn start(settings: Settings) -> Result<Self, Error> {
        Self::start_with(settings, telemetry::Propagation::default()).await
    }

    /// Like [`Agent::start`], with trace propagation set up by [`telemetry::init`].
    pub async fn start_with(
        settings: Settings,
        propagation: telemetry::Propagation,
    ) -> Result<Self, Error> {
        let channel = identity::channel::connect_with_file(
            &settings.control_plane,
            settings.control_plane_ca.as_deref(),
        )?;
        let connection = config::subscription::Connection {
            address: settings.control_plane.clone(),
            channel: channel.clone(),
            token_file: settings.token_file.clone(),
        };
        // A workload certificate comes over TLS only: the token would otherwise cross
        // the network in the clear.
        let certifier = match &settings.token_file {
            Some(token) if settings.control_plane.starts_with("https://") => {
                Some(identity::client::GrpcCertifier::new(
                    channel,
                    token.clone(),
                    identity::client::Claims {
                        namespace: settings.identity.namespace.clone(),
                        pod_name: settings.identity.pod_name.clone(),
                        service_account: settings.identity.service_account.clone(),
                    },
                ))
            }
            _ => None,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let store = match &settings.rate_limit_store {
            Some(store) => Some(policy::ratelimit::store::Store::spawn(
                store,
                shutdown_rx.clone(),
            )?),
            None => None,
        };
        let config = Arc::new(ArcSwap::from_pointee(config::Config::with_tls_and_store(
            Arc::default(),
            store.clone(),
        )));
        let metrics = Arc::new(metrics::Metrics::with_caller_labels(
            Arc::clone(&config),
            settings.max_caller_labels,
        ));
        let (ready_tx, ready_rx) = watch::channel(false);
        let drain = settings.drain_timeout;
        let limits = settings.limits;
        let options = |name: &'static str| transport::server::ListenerOptions {
            limits,
            counters: Arc::new(metrics.listener(name)),
        };
        let mut tasks = Vec::new();
        let identity_state = certifier.map(|certifier| {
            let (task, state) = identity::renewal::spawn(certifier, shutdown_rx.clone());
            tasks.push(task);
            state
        });
        // Mutual TLS with other agents follows the certificate; without identity the
        // agent speaks plaintext everywhere.
        if let Some(state) = &identity_state {
            let (tls, task) = transport::tls::MeshTls::follow(state.clone(), metrics.tls());
            tasks.push(task);
            config.store(Arc::new(config::Config::with_tls_and_store(tls, store)));
        }

        let (outbound_listener, outbound_addr) = bind("outbound", settings.outbound_addr).await?;
        let outbound_v6 = match settings.outbound_addr_v6 {
            Some(addr) => Some(bind("outbound-v6", addr).await?),
            None => None,
        };
        let mut inbound_listeners = Vec::with_capacity(settings.inbounds.len());
        for spec in &settings.inbounds {
            let (listener, addr) = bind("inbound", spec.listen).await?;
            inbound_listeners.push((listener, addr, spec.app_port));
        }
        let (admin_listener, admin_addr) = bind("admin", settings.admin_addr).await?;
        let transparent_listener = match settings.inbound_transparent {
            Some(addr) => Some(bind("inbound-transparent", addr).await?),
            None => None,
        };
        let interception = proxy::transparent::Interception {
            detect_timeout: settings.detect_timeout,
            opaque_ports: Arc::new(settings.opaque_ports.iter().copied().collect()),
            tcp_idle_timeout: settings.tcp_idle_timeout,
        };
        let inbound_options = proxy::inbound::InboundOptions {
            max_concurrency: settings
                .inbound_max_concurrency
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            forwarded_for: settings.forwarded_for,
            tcp_idle_timeout: settings.tcp_idle_timeout,
        };

        // The agent's other listeners: never a CONNECT or absolute-form target (its
        // outbound listener is a loop, answered 508).
        let own = outbound_v6
            .iter()
            .map(|(_, addr)| *addr)
            .chain(inbound_listeners.iter().map(|(_, addr, _)| *addr))
            .chain(transparent_listener.iter().map(|(_, addr)| *addr))
            .chain([admin_addr])
            .collect();
        let outbound = Arc::new(
            proxy::outbound::Outbound::new(
                Arc::clone(&config),
                Arc::clone(&metrics),
                settings.identity.namespace.clone(),
                outbound_addr,
                propagation,
            )
            .with_targets(proxy::refuse::Targets::new(own, settings.proxy_passthrough)),
        );
        for (listener, name) in std::iter::once((outbound_listener, "outbound"))
            .chain(outbound_v6.map(|(listener, _)| (listener, "outbound-v6")))
        {
            let outbound = Arc::clone(&outbound);
            let interception = interception.clone();
            tasks.push(tokio::spawn(transport::server::serve_connections(
                listener,
                options(name),
                shutdown_rx.clone(),
                drain,
                move |stream, peer, conn| {
                    proxy::transparent::outbound(
                        Arc::clone(&outbound),
                        interception.clone(),
                        stream,
                        peer,
                        conn,
                    )
                },
            )));
        }

        let mut inbound_addrs = Vec::with_capacity(inbound_listeners.len());
        for (listener, addr, app_port) in inbound_listeners {
            let app = SocketAddr::new(settings.app_host, app_port);
            let inbound = Arc::new(proxy::inbound::Inbound::with_options(
                Arc::clone(&config),
                Arc::clone(&metrics),
                app,
                inbound_options.clone(),
            ));
            let wait = settings.detect_timeout;
            tasks.push(tokio::spawn(transport::server::serve_connections(
                listener,
                options("inbound"),
                shutdown_rx.clone(),
                drain,
                move |stream, peer, conn| Arc::clone(&inbound).serve_http(stream, peer, conn, wait),
            )));
            inbound_addrs.push(addr);
        }

        let mut inbound_transparent_addr = None;
        if let Some((listener, addr)) = transparent_listener {
            let ports = Arc::new(proxy::transparent::InboundPorts::new(
                Arc::clone(&config),
                Arc::clone(&metrics),
                settings.app_host,
                inbound_options,
                interception,
            ));
            tasks.push(tokio::spawn(transport::server::serve_connections(
                listener,
                options("inbound-transparent"),
                shutdown_rx.clone(),
                drain,
                move |stream, peer, conn| Arc::clone(&ports).serve(stream, peer, conn),
            )));
            inbound_transparent_addr = Some(addr);
        }

        let admin = Arc::new(
            admin::Admin::new(
                Arc::clone(&config),
                Arc::clone(&metrics),
                ready_rx,
                settings.clone(),
            )
            .with_identity(identity_state),
        );
        tasks.push(tokio::spawn(transport::server::serve(
            admin_listener,
            options("admin"),
            shutdown_rx.clone(),
            drain,
            move |req, peer| Arc::clone(&admin).handle(req, peer),
        )));

        let applier = config::subscription::Applier::new(config, metrics, ready_tx);
        tasks.push(tokio::spawn(config::subscription::run(
            connection,
            settings.identity.clone(),
            applier,
            shutdown_rx.clone(),
        )));

        tracing::info!(
            outbound = %outbound_addr,
            inbound = ?inbound_addrs,
            inbound_transparent = ?inbound_transparent_addr,
            admin = %admin_addr,
            control_plane = %settings.control_plane,
            "agent started"
        );
        Ok(Self {
            outbound_addr,
            inbound_transparent_addr,
            inbound_addrs,
            admin_addr,
            shutdown,
            tasks,
        })
    }

    /// The outbound listener's address.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    /// The inbound listeners' addresses, in the order of `Settings::inbounds`.
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        self.inbound_addrs.clone()
    }

    /// The transparent inbound listener's address, if one was configured.
    pub fn inbound_transparent_addr(&self) -> Option<SocketAddr> {
        self.inbound_transparent_addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting, drains open requests (up to the drain timeout) and stops.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
