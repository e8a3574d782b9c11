//! TLS for the control plane's own gRPC port: a serving certificate the authority
//! signs and renews before it expires, and the accepted connections as tonic takes
//! them.
//!
//! tonic's built-in TLS takes a fixed certificate; ours rotates with the authority's
//! lifetime (a day by default), so the handshake is ours: a rustls resolver that
//! always hands out the current certificate, and an accept loop that finishes each
//! handshake in its own task (a slow client cannot hold up the others).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use super::authority::{Authority, SignError};

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 1024;
/// Renew the serving certificate when this share of its lifetime has passed.
const RENEW_AT: f64 = 0.7;

/// Why the serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The authority refused.
    #[error("cannot sign the control plane's serving certificate: {0}")]
    Sign(#[from] SignError),
    /// rustls refused the key.
    #[error("cannot use the control plane's serving key: {0}")]
    Key(#[from] rustls::Error),
}

/// The control plane's serving certificate, re-signed before it expires.
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
    authority: Arc<Authority>,
    provider: Arc<CryptoProvider>,
    names: Vec<String>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// A certificate for `names` (DNS names and IP addresses agents dial).
    pub fn new(
        authority: Arc<Authority>,
        provider: Arc<CryptoProvider>,
        names: Vec<String>,
    ) -> Result<Arc<Self>, ServingError> {
        let key = issue(&authority, &provider, &names)?;
        Ok(Arc::new(ServingCert {
            current: ArcSwap::from_pointee(key),
            authority,
            provider,
            names,
        }))
    }

    /// The TLS server configuration (TLS 1.3, ALPN h2 for gRPC) using this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Re-signs the certificate at 70 % of its lifetime until `shutdown`.
    pub fn spawn_renewal(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let every = this.authority.lifetime().mul_f64(RENEW_AT);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = crate::stopped(&mut shutdown) => return,
                }
                this.reissue();
            }
        })
    }

    /// Signs a new serving certificate now (at renewal, or when the issuer changed).
    pub fn reissue(&self) {
        match issue(&self.authority, &self.provider, &self.names) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                info!("renewed the control plane's serving certificate");
            }
            // The current one stays valid for the remaining 30 % of its life.
            Err(error) => {
                warn!(%error, "cannot renew the control plane's serving certificate; retrying at the next interval")
            }
        }
    }
}

fn issue(
    authority: &Authority,
    provider: &CryptoProvider,
    names: &[String],
) -> Result<CertifiedKey, ServingError> {
    let (chain, key) = authority.serving(names, SystemTime::now())?;
    Ok(CertifiedKey::from_der(chain, key, provider)?)
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A TLS connection to the gRPC port, as tonic's server takes it.
#[derive(Debug)]
pub struct TlsConnection(TlsStream<TcpStream>);

/// What a handler can learn of a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        TlsConnectInfo {
            remote_addr: self.0.get_ref().0.peer_addr().ok(),
        }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts TCP connections on `listener` and yields those whose TLS handshake
/// finished, until `shutdown`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&handshakes).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = crate::stopped(&mut shutdown) => return,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "cannot accept a gRPC connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = crate::stopped(&mut shutdown) => return,
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConnection(tls))).await;
                    }
                    Ok(Err(error)) => {
                        debug!(%peer, %error, "TLS handshake with a gRPC client failed")
                    }
                    Err(_) => debug!(%peer, "TLS handshake with a gRPC client timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::authority::DEFAULT_LIFETIME;
    use rustls::pki_types::ServerName;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn serves_tls_with_a_certificate_agents_verify_against_the_anchor() {
        let authority = Arc::new(Authority::generate("td", DEFAULT_LIFETIME).unwrap());
        let provider = Arc::new(bulwark_proto::tls::provider());
        let serving = ServingCert::new(
            Arc::clone(&authority),
            Arc::clone(&provider),
            vec![
                "bulwark-control-plane.bulwark.svc".into(),
                "127.0.0.1".into(),
            ],
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let mut connections = incoming(listener, serving.server_config().unwrap(), shutdown);

        // A client that does not finish its handshake does not block the next one.
        let _stalled = TcpStream::connect(addr).await.unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(authority.anchors()[0].clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        for name in ["bulwark-control-plane.bulwark.svc", "127.0.0.1"] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let client = connector
                .connect(ServerName::try_from(name).unwrap(), tcp)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let accepted = connections.next().await.unwrap().unwrap();
            assert!(accepted.connect_info().remote_addr.is_some());
            // Discovery and identity use the mesh's post-quantum hybrid key exchange.
            for group in [
                client.get_ref().1.negotiated_key_exchange_group(),
                accepted.0.get_ref().1.negotiated_key_exchange_group(),
            ] {
                assert_eq!(
                    group.map(|g| g.name()),
                    Some(rustls::NamedGroup::X25519MLKEM768)
                );
            }
        }
        let tcp = TcpStream::connect(addr).await.unwrap();
        let wrong = connector
            .connect(ServerName::try_from("elsewhere.example").unwrap(), tcp)
            .await;
        assert!(
            wrong.is_err(),
            "the certificate names only the control plane"
        );
    }
}
