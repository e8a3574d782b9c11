//! Runs a control plane and an agent in-process on ephemeral loopback ports,
//! over a [`Mesh`] folder, for end-to-end tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bulwark_agent::{Agent, Identity, InboundSpec};
use bulwark_control_plane::{ControlPlane, Source};

use crate::client::HttpClient;
use crate::eventually::poll_until;
use crate::mesh::{Mesh, NAMESPACE};
use crate::metrics::Metrics;

/// How long a harness waits for the agent to receive a config.
pub const CONFIG_DEADLINE: Duration = Duration::from_secs(15);

/// Control plane settings for a test: the mesh folder, loopback ports, a short debounce.
pub fn control_plane_settings(
    mesh: &Mesh,
    grpc_addr: SocketAddr,
) -> bulwark_control_plane::Settings {
    bulwark_control_plane::Settings {
        source: Source::Dir(vec![mesh.path().to_path_buf()]),
        grpc_addr,
        admin_addr: loopback(),
        debounce: Duration::from_millis(50),
        identity: None,
    }
}

/// Control plane settings for a test against an in-test API server: its kubeconfig, a
/// Lease held as `identity` with short terms, Gateway API discovery asked every
/// `gateway_api_recheck`, loopback ports.
pub fn kubernetes_control_plane_settings(
    kubeconfig: std::path::PathBuf,
    identity: &str,
    gateway_api_recheck: Duration,
) -> bulwark_control_plane::Settings {
    use bulwark_control_plane::lease::LeaseSettings;
    use bulwark_control_plane::source::kubernetes::KubernetesSettings;
    bulwark_control_plane::Settings {
        source: Source::Kubernetes(KubernetesSettings {
            kubeconfig: Some(kubeconfig),
            lease: LeaseSettings {
                duration: Duration::from_secs(3),
                retry: Duration::from_millis(200),
                ..LeaseSettings::new(crate::apiserver::CONTROL_PLANE_NAMESPACE, identity)
            },
            gateway_api_recheck,
        }),
        grpc_addr: loopback(),
        admin_addr: loopback(),
        debounce: Duration::from_millis(50),
        identity: None,
    }
}

/// `127.0.0.1:0`.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Agent settings for a pod of `app` in the test namespace, talking to `control_plane`.
pub fn agent_settings(
    control_plane: SocketAddr,
    app: &str,
    inbound_app_port: Option<u16>,
) -> bulwark_agent::Settings {
    let identity = Identity {
        namespace: NAMESPACE.to_owned(),
        pod_name: format!("{app}-0"),
        service_account: app.to_owned(),
        labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
    };
    let mut settings = bulwark_agent::Settings::new(format!("http://{control_plane}"), identity);
    settings.outbound_addr = loopback();
    settings.admin_addr = loopback();
    settings.inbounds = inbound_app_port
        .map(|port| InboundSpec {
            listen: loopback(),
            app_port: port,
        })
        .into_iter()
        .collect();
    settings.drain_timeout = Duration::from_secs(2);
    settings
}

/// A control plane and one agent over a mesh folder.
pub struct Harness {
    /// The mesh folder the control plane reads.
    pub mesh: Mesh,
    /// The control plane (None while stopped by a test).
    pub control_plane: Option<ControlPlane>,
    /// The agent.
    pub agent: Agent,
    /// An HTTP/1.1 client using the agent's outbound listener as its proxy.
    pub client: HttpClient,
    grpc_addr: SocketAddr,
}

impl Harness {
    /// Starts both and waits until the agent has its first config.
    pub async fn start(mesh: Mesh) -> Harness {
        Self::start_as(mesh, "client", None).await
    }

    /// Starts both with the agent serving a pod of `app`, forwarding inbound
    /// traffic to `inbound_app_port` if given.
    pub async fn start_as(mesh: Mesh, app: &str, inbound_app_port: Option<u16>) -> Harness {
        let cp = ControlPlane::start(control_plane_settings(&mesh, loopback()))
            .await
            .expect("control plane starts");
        let grpc_addr = cp.grpc_addr();
        let agent = Agent::start(agent_settings(grpc_addr, app, inbound_app_port))
            .await
            .expect("agent starts");
        let client = HttpClient::proxy(agent.outbound_addr());
        let harness = Harness {
            mesh,
            control_plane: Some(cp),
            agent,
            client,
            grpc_addr,
        };
        harness.wait_ready().await;
        harness
    }

    /// Waits until the agent's `/ready` answers 200.
    pub async fn wait_ready(&self) {
        let admin = HttpClient::direct(self.agent.admin_addr());
        poll_until(CONFIG_DEADLINE, "the agent is ready", || {
            let admin = admin.clone();
            async move {
                admin
                    .get("/ready", &[])
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
            }
        })
        .await
        .expect("agent becomes ready");
    }

    /// The agent's `/config` as JSON.
    pub async fn config(&self) -> serde_json::Value {
        let admin = HttpClient::direct(self.agent.admin_addr());
        let rsp = admin.get("/config", &[]).await.expect("admin answers");
        rsp.json().expect("/config is JSON")
    }

    /// The version of the agent's config in force.
    pub async fn config_version(&self) -> u64 {
        self.config().await["config"]["version"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits until the agent's config version is above `version`; returns the new one.
    pub async fn wait_version_above(&self, version: u64) -> u64 {
        poll_until(
            CONFIG_DEADLINE,
            "a newer config reaches the agent",
            || async move { Some(self.config_version().await).filter(|v| *v > version) },
        )
        .await
        .expect("the agent receives a newer config")
    }

    /// Scrapes the agent's metrics.
    pub async fn metrics(&self) -> Metrics {
        Metrics::scrape(self.agent.admin_addr())
            .await
            .expect("agent metrics")
    }

    /// Stops the control plane (the agent stays up).
    pub async fn stop_control_plane(&mut self) {
        if let Some(cp) = self.control_plane.take() {
            cp.shutdown().await;
        }
    }

    /// Starts the control plane again on the same gRPC address.
    pub async fn restart_control_plane(&mut self) {
        let mut last_error = None;
        // The old listener's port may take a moment to be free again.
        for _ in 0..50 {
            match ControlPlane::start(control_plane_settings(&self.mesh, self.grpc_addr)).await {
                Ok(cp) => {
                    self.control_plane = Some(cp);
                    return;
                }
                Err(error) => {
                    last_error = Some(error);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!(
            "control plane restarts on {}: {last_error:?}",
            self.grpc_addr
        );
    }

    /// The control plane's admin address.
    pub fn control_plane_admin(&self) -> SocketAddr {
        self.control_plane
            .as_ref()
            .map(ControlPlane::admin_addr)
            .expect("control plane running")
    }

    /// Stops everything.
    pub async fn shutdown(mut self) {
        self.stop_control_plane().await;
        self.agent.shutdown().await;
    }
}

/// A `ResiliencePolicy` named `name` on Service `service` with `spec` (YAML
/// lines indented by two spaces, below `spec:`).
pub fn resilience_policy(name: &str, service: &str, spec: &str) -> String {
    format!(
        "apiVersion: bulwark.io/v1alpha1
kind: ResiliencePolicy
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  targetRefs:
    - kind: Service
      name: {service}
{spec}"
    )
}

/// Certificates as PEM (e.g. the mesh's anchors, for an agent's `--control-plane-ca`).
pub fn pem(certs: &[rustls::pki_types::CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in certs {
        let text = base64::engine::general_purpose::STANDARD.encode(cert);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        // Base64 is ASCII, so every 64-byte chunk is a str.
        for line in text.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}
