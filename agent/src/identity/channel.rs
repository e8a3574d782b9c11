//! The agent's gRPC channel to the control plane: plaintext for `http://`, TLS verified
//! against the mesh's trust anchors for `https://`.
//!
//! tonic's own TLS would pull in a second TLS stack configuration; a connector of ours
//! keeps one rustls set-up (ring, TLS 1.3, our anchors) for every TLS the agent does.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

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
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(anchors.iter().cloned());
    if added == 0 {
        return Err(ChannelError::Anchors {
            path: "(given)".to_owned(),
            reason: "no anchor parses".to_owned(),
        });
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
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
