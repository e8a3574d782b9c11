//! A control plane with workload identity on, as the mTLS and certificate benchmarks
//! run it: a generated issuer (`--identity-generate`, its trust anchor written to a
//! file), a local token file standing in for TokenReview (`--token-file`), TLS on its
//! gRPC port, and a TLS client configuration that trusts it.

use std::hash::{BuildHasher as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use crate::sut::{ControlPlane, Layout, free_addr};

/// The trust domain of the bench mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// One entry of the control plane's token file: a token and whom it proves.
#[derive(Clone, Debug)]
pub struct Token {
    /// The bearer token (at least 16 characters, as the control plane requires).
    pub token: String,
    /// The namespace it proves.
    pub namespace: String,
    /// The ServiceAccount it proves.
    pub service_account: String,
    /// The pod it is bound to.
    pub pod: String,
}

impl Token {
    /// A token for `pod` of `service_account` in `namespace`, unique to this run.
    pub fn new(namespace: &str, service_account: &str, pod: &str) -> Token {
        Token {
            token: format!("{pod}-{}", nonce()),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod: pod.to_owned(),
        }
    }

    /// The SPIFFE ID a certificate for this token names.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// 16 hex digits, different in every call (the standard library's random hash keys):
/// tokens of one run never repeat and never match another run's.
fn nonce() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    format!("{:016x}", hasher.finish())
}

/// Writes the control plane's token file: `tokens: [{token, namespace, serviceAccount, pod}]`.
pub fn write_token_file(path: &Path, tokens: &[Token]) -> std::io::Result<()> {
    let mut text = String::with_capacity(64 + tokens.len() * 96);
    text.push_str("tokens:\n");
    for t in tokens {
        text.push_str(&format!(
            "  - {{token: \"{}\", namespace: {}, serviceAccount: {}, pod: {}}}\n",
            t.token, t.namespace, t.service_account, t.pod
        ));
    }
    std::fs::write(path, text)
}

/// A control plane process with identity on.
#[derive(Debug)]
pub struct IdentityControlPlane {
    /// The process and its addresses (gRPC is TLS).
    pub cp: ControlPlane,
    /// The trust anchor it wrote (PEM).
    pub anchor: PathBuf,
}

impl IdentityControlPlane {
    /// Starts `bulwark-control-plane --source dir:MESH` with a generated issuer whose
    /// anchor goes to `anchor` and the tokens of `token_file`, on `cpus`, logging to
    /// `NAME.log`; waits for `/ready`.
    pub async fn start(
        layout: &Layout,
        name: &str,
        mesh: &Path,
        token_file: &Path,
        anchor: &Path,
        cpus: Option<&str>,
    ) -> anyhow::Result<IdentityControlPlane> {
        let identity = [
            "--identity-generate".to_owned(),
            anchor.display().to_string(),
            "--trust-domain".to_owned(),
            TRUST_DOMAIN.to_owned(),
            "--token-file".to_owned(),
            token_file.display().to_string(),
            "--tls-name".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let cp =
            ControlPlane::start_with(layout, name, mesh, "50ms", cpus, free_addr()?, &identity)
                .await?;
        Ok(IdentityControlPlane {
            cp,
            anchor: anchor.to_owned(),
        })
    }

    /// The address agents dial: `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.cp.grpc.port())
    }

    /// The trust anchors it wrote.
    pub fn anchors(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let pem = std::fs::read(&self.anchor)
            .with_context(|| format!("reading {}", self.anchor.display()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", self.anchor.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{} holds no certificate",
            self.anchor.display()
        );
        Ok(certs)
    }

    /// A TLS 1.3 client configuration (the mesh's provider, as the agent's) trusting its
    /// anchors and offering `h2`: what an agent's channel to it uses.
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(self.anchors()?);
        anyhow::ensure!(added > 0, "no trust anchor of the control plane parses");
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(bulwark_proto::tls::provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}
