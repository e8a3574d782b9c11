//! The agent's gRPC channel to the control plane: plaintext for `http://`, TLS verified
//! against the mesh's trust anchors for `https://`.
//!
//! tonic's own TLS would pull in a second TLS stack configuration; a connector of ours
//! keeps one rustls set-up (the mesh's provider, TLS 1.3, our anchors) for every TLS the
//! agent does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{info, warn};

/// How long connecting (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The address is not a URI tonic takes.
    #[error("invalid control-plane address {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    Address(String),
    /// The anchors file could not be read or holds no certificate.
    #[error("cannot read the control plane's trust anchors {path}: {reason}")]
    Anchors {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the settings.
    #[error("cannot set up TLS to the control plane: {0}")]
    Tls(#[from] rustls::Error),
}

/// Reads PEM certificates (the mesh's trust anchors) from `path`.
pub fn read_anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, ChannelError> {
    let error = |reason: String| ChannelError::Anchors {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no CERTIFICATE block".to_owned()));
    }
    Ok(certs)
}

/// A lazily connecting channel to `address`; `https://` addresses are verified against
/// `anchors` (required for them).
pub fn connect(
    address: &str,
    anchors: Option<&[CertificateDer<'static>]>,
) -> Result<Channel, ChannelError> {
    let source = match anchors {
        Some(anchors) => Some(AnchorSource::fixed(anchors)?),
        None => None,
    };
    connect_with(address, source)
}

/// Like [`connect`], with the anchors read from the PEM file at `anchors` at every new
/// connection: a mounted ConfigMap or Secret is rewritten in place when the mesh's
/// anchor rotates, and the agent follows without a restart. A file that no longer
/// parses keeps the last good anchors (logged).
pub fn connect_with_file(address: &str, anchors: Option<&Path>) -> Result<Channel, ChannelError> {
    let source = match anchors {
        Some(path) => Some(AnchorSource::file(path)?),
        None => None,
    };
    connect_with(address, source)
}

/// The TLS configuration to the control plane: its anchors fixed, or re-read from a file.
struct AnchorSource {
    path: Option<PathBuf>,
    current: Mutex<(Vec<CertificateDer<'static>>, Arc<ClientConfig>)>,
}

impl AnchorSource {
    fn fixed(anchors: &[CertificateDer<'static>]) -> Result<Arc<Self>, ChannelError> {
        Ok(Arc::new(AnchorSource {
            path: None,
            current: Mutex::new((anchors.to_vec(), tls_config(anchors)?)),
        }))
    }

    fn file(path: &Path) -> Result<Arc<Self>, ChannelError> {
        let anchors = read_anchors(path)?;
        let config = tls_config(&anchors)?;
        Ok(Arc::new(AnchorSource {
            path: Some(path.to_owned()),
            current: Mutex::new((anchors, config)),
        }))
    }

    /// The configuration for a new connection (re-reading the file, if any).
    fn config(&self) -> Arc<ClientConfig> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(path) = &self.path {
            match read_anchors(path).and_then(|a| tls_config(&a).map(|c| (a, c))) {
                Ok((anchors, config)) if anchors != current.0 => {
                    info!(path = %path.display(), anchors = anchors.len(), "the control plane's trust anchors changed");
                    *current = (anchors, config);
                }
                Ok(_) => {}
                Err(error) => {
                    warn!(%error, "keeping the last good trust anchors for the control plane")
                }
            }
        }
        Arc::clone(&current.1)
    }
}

fn tls_config(anchors: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, ChannelError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(anchors.iter().cloned());
    if added == 0 {
        return Err(ChannelError::Anchors {
            path: "(given)".to_owned(),
            reason: "no anchor parses".to_owned(),
        });
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(bulwark_proto::tls::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn connect_with(
    address: &str,
    anchors: Option<Arc<AnchorSource>>,
) -> Result<Channel, ChannelError> {
    let endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|_| ChannelError::Address(address.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if !address.starts_with("https://") {
        return Ok(endpoint.connect_lazy());
    }
    let anchors = anchors.ok_or_else(|| ChannelError::Anchors {
        path: "(none given)".to_owned(),
        reason: "an https:// control plane needs the mesh's trust anchors (--control-plane-ca)"
            .to_owned(),
    })?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
            let connector = tokio_rustls::TlsConnector::from(anchors.config());
            async move {
                let host = uri
                    .host()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_owned();
                let port = uri.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(host)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        })),
    )
}
