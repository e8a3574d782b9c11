//! A mesh with workload identity on, on loopback: a control plane that issues
//! certificates (its token file standing in for TokenReview), an app upstream, and real
//! agents that get their certificates over the identity path, as the mTLS and
//! authorization tests need them.

use std::sync::Arc;

use bulwark_agent::Agent;
use bulwark_control_plane::ControlPlane;
use bulwark_control_plane::identity::IdentitySettings;
use bulwark_control_plane::identity::authority::{Authority, DEFAULT_LIFETIME};
use bulwark_control_plane::identity::token::TokenReviewer;

use crate::harness::{agent_settings, control_plane_settings, loopback, pem};
use crate::mesh::{Mesh, NAMESPACE};
use crate::upstream::{Knobs, Upstream};

/// The trust domain the tests' authority issues in.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// A pod's agent in the mesh's namespace: its name, ServiceAccount and token.
#[derive(Clone, Copy, Debug)]
pub struct Pod {
    /// The pod's name.
    pub name: &'static str,
    /// Its ServiceAccount, the identity it is issued.
    pub service_account: &'static str,
    /// The token that proves it (in the control plane's token file).
    pub token: &'static str,
}

/// The control plane with its issuer, the folder its token file and the agents' anchor
/// and token files live in, and the app behind the protected pod's agent.
pub struct IdentityMesh {
    /// The folder source the control plane reads.
    pub mesh: Mesh,
    /// The control plane, serving discovery and identity over TLS.
    pub cp: ControlPlane,
    /// The issuer it signs with.
    pub authority: Arc<Authority>,
    /// Token file, trust anchor and the agents' token files.
    pub dir: tempfile::TempDir,
    /// The app an inbound listener can protect.
    pub app: Upstream,
}

impl IdentityMesh {
    /// A mesh with a new authority in which `pods` can prove who they are.
    pub async fn start(pods: &[Pod]) -> Self {
        let authority =
            Arc::new(Authority::generate(TRUST_DOMAIN, DEFAULT_LIFETIME).expect("mesh authority"));
        Self::start_with(authority, tempfile::tempdir().expect("temp dir"), pods).await
    }

    /// A mesh signing with `authority`, its files in `dir`.
    pub async fn start_with(
        authority: Arc<Authority>,
        dir: tempfile::TempDir,
        pods: &[Pod],
    ) -> Self {
        let mesh = Mesh::new().expect("mesh folder");
        let tokens = dir.path().join("tokens.yaml");
        let entries: String = pods
            .iter()
            .map(|p| {
                format!(
                    "  - {{token: {}, namespace: {NAMESPACE}, serviceAccount: {}, pod: {}}}\n",
                    p.token, p.service_account, p.name
                )
            })
            .collect();
        std::fs::write(&tokens, format!("tokens:\n{entries}")).expect("token file");
        let mut settings = control_plane_settings(&mesh, loopback());
        settings.identity = Some(IdentitySettings {
            authority: Arc::clone(&authority),
            reviewer: TokenReviewer::from_file(&tokens).expect("token reviewer"),
            serving_names: vec!["127.0.0.1".into()],
        });
        let cp = ControlPlane::start(settings)
            .await
            .expect("control plane starts");
        let app = Upstream::start(loopback(), "payments-app", Knobs::healthy())
            .await
            .expect("payments app");
        Self {
            mesh,
            cp,
            authority,
            dir,
            app,
        }
    }

    /// A real agent for `pod` with identity on; `inbound_app` puts an inbound listener
    /// in front of that app port.
    pub async fn agent(&self, pod: &Pod, inbound_app: Option<u16>) -> Agent {
        let anchor = self.dir.path().join("anchor.pem");
        if !anchor.exists() {
            std::fs::write(&anchor, pem(&self.authority.anchors())).expect("anchor file");
        }
        let token_file = self.dir.path().join(format!("{}.token", pod.name));
        std::fs::write(&token_file, pod.token).expect("token file");
        let mut settings = agent_settings(self.cp.grpc_addr(), pod.service_account, inbound_app);
        settings.identity.pod_name = pod.name.to_owned();
        settings.identity.service_account = pod.service_account.to_owned();
        settings.control_plane = format!("https://127.0.0.1:{}", self.cp.grpc_addr().port());
        settings.control_plane_ca = Some(anchor);
        settings.token_file = Some(token_file);
        Agent::start(settings).await.expect("agent starts")
    }
}
