//! Mutual TLS between agents: originating it to meshed endpoints and terminating it
//! from meshed callers, with the TLS configurations of the agent's current workload
//! certificate.
//!
//! The configurations are rebuilt when the certificate is renewed and read with one
//! atomic load per new connection: connections already open keep the session they
//! have (a renewal drops nothing), new ones present the new certificate.
//!
//! A destination endpoint is meshed when the control plane names the identity found
//! there ([`MeshPeers`]). To a meshed endpoint the agent speaks mutual TLS and requires
//! exactly that SPIFFE ID; when the agent has identity enabled but no valid certificate
//! (before the first is issued, or after one expired unrenewed) it refuses to connect
//! rather than fall back to plaintext. An agent started without identity speaks
//! plaintext everywhere.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bulwark_proto::tls::group_label;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use tracing::{info, warn};

use crate::identity::credentials::{Credentials, unix_secs};
use crate::identity::renewal::IdentityState;
use crate::identity::tls::{
    TlsConfigError, TlsCounters, client_config, peer_identity, server_config,
};

/// ALPN of HTTP/2 between agents.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/1.1 between agents.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN of opaque TCP between agents: the bytes are relayed as they are.
pub const ALPN_OPAQUE: &[u8] = b"bulwark-tcp";

/// How many distinct (peer, reason) handshake failures are remembered so that each is
/// logged once; beyond it, failures are only counted.
const LOGGED_FAILURES_MAX: usize = 4096;

/// The first byte of a TLS record carrying a handshake (a ClientHello): no HTTP
/// request and no plaintext protocol the mesh detects starts with it.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The configurations built from one certificate.
struct Configs {
    own: Arc<str>,
    client_h1: Arc<ClientConfig>,
    client_h2: Arc<ClientConfig>,
    client_opaque: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

/// Why a mutual-TLS connection could not be made or taken.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The agent has identity on but no valid certificate to present.
    #[error(
        "no workload certificate to present (not issued yet, or expired unrenewed: see the agent's /ready)"
    )]
    NoCertificate,
    /// The handshake failed.
    #[error("TLS handshake failed ({reason}): {source}")]
    Handshake {
        /// A short reason, the metric label.
        reason: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The handshake did not finish in time.
    #[error("the TLS handshake did not finish within {0:?}")]
    Timeout(Duration),
    /// The peer is in the mesh but is not the workload the control plane named.
    #[error("the peer is {found:?}, expected {expected}")]
    WrongIdentity {
        /// The identity expected.
        expected: Arc<str>,
        /// The identity found, if the certificate had one.
        found: Option<String>,
    },
}

impl TlsError {
    /// The metric label of this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::NoCertificate => "no-certificate",
            TlsError::Handshake { reason, .. } => reason,
            TlsError::Timeout(_) => "timeout",
            TlsError::WrongIdentity { .. } => "wrong-identity",
        }
    }
}

/// The reason label of a failed handshake: what an operator would check first.
fn handshake_reason(error: &io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error as E};
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return match error.kind() {
            io::ErrorKind::UnexpectedEof => "closed",
            io::ErrorKind::InvalidData => "not-tls",
            _ => "io",
        };
    };
    match tls {
        E::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        E::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not-yet-valid",
        E::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown-issuer",
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "wrong-trust-domain",
        E::InvalidCertificate(CertificateError::Revoked) => "revoked",
        E::InvalidCertificate(CertificateError::BadSignature) => "bad-signature",
        E::InvalidCertificate(_) => "bad-certificate",
        E::NoCertificatesPresented => "no-client-certificate",
        E::AlertReceived(AlertDescription::CertificateExpired) => "peer-says-expired",
        E::AlertReceived(AlertDescription::UnknownCA) => "peer-says-unknown-issuer",
        E::AlertReceived(AlertDescription::CertificateRequired) => "peer-wants-certificate",
        E::AlertReceived(_) => "alert",
        E::NoApplicationProtocol => "no-application-protocol",
        _ => "protocol",
    }
}

/// The agent's mesh TLS: its current configurations, or none (identity disabled).
pub struct MeshTls {
    /// `None`: the agent runs without identity and speaks plaintext.
    configs: Option<ArcSwapOption<Configs>>,
    counters: TlsCounters,
    handshake_timeout: Duration,
    logged: Mutex<HashSet<(SocketAddr, &'static str)>>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("enabled", &self.enabled())
            .field("identity", &self.own_identity())
            .finish_non_exhaustive()
    }
}

/// How long a TLS handshake may take on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Plaintext everywhere: the agent has no workload identity.
impl Default for MeshTls {
    fn default() -> Self {
        Self {
            configs: None,
            counters: TlsCounters::default(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            logged: Mutex::new(HashSet::new()),
        }
    }
}

impl MeshTls {
    /// Mutual TLS with the credentials `state` publishes, rebuilt on every change
    /// until `state`'s sender is gone; counted in `counters`.
    pub fn follow(
        mut state: watch::Receiver<IdentityState>,
        counters: TlsCounters,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let tls = Arc::new(Self {
            configs: Some(ArcSwapOption::empty()),
            counters,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            logged: Mutex::new(HashSet::new()),
        });
        let updated = Arc::clone(&tls);
        let task = tokio::spawn(async move {
            loop {
                let credentials = state.borrow_and_update().credentials.clone();
                updated.install(credentials.as_deref());
                if state.changed().await.is_err() {
                    break;
                }
            }
        });
        (tls, task)
    }

    /// Builds and publishes the configurations of `credentials` (none: present nothing).
    fn install(&self, credentials: Option<&Credentials>) {
        let Some(slot) = &self.configs else {
            return;
        };
        let built = credentials.map(|c| (c, build(c)));
        match built {
            None => {
                slot.store(None);
                self.counters.expiry.set(0);
            }
            Some((c, Ok(configs))) => {
                info!(spiffe_id = %c.spiffe_id, "mutual TLS uses the new workload certificate");
                slot.store(Some(Arc::new(configs)));
                self.counters
                    .expiry
                    .set(i64::try_from(unix_secs(c.not_after)).unwrap_or(i64::MAX));
            }
            // Keep what works: a certificate rustls refuses is the control plane's bug,
            // and the one in use stays valid until it expires.
            Some((c, Err(error))) => {
                warn!(spiffe_id = %c.spiffe_id, %error, "cannot use the new workload certificate for TLS; keeping the one in use");
            }
        }
    }

    /// Whether the agent has identity on (it may still lack a certificate).
    pub fn enabled(&self) -> bool {
        self.configs.is_some()
    }

    /// The SPIFFE ID the agent presents now, if any.
    pub fn own_identity(&self) -> Option<Arc<str>> {
        let slot = self.configs.as_ref()?;
        slot.load().as_ref().map(|c| Arc::clone(&c.own))
    }

    /// The counters.
    pub fn counters(&self) -> &TlsCounters {
        &self.counters
    }

    /// The configurations of the certificate in use.
    fn current(&self) -> Result<Arc<Configs>, TlsError> {
        self.configs
            .as_ref()
            .and_then(|slot| slot.load_full())
            .ok_or(TlsError::NoCertificate)
    }

    fn log_failure(&self, peer: SocketAddr, direction: &'static str, error: &TlsError) {
        self.counters.failure(direction, error.reason());
        let first = {
            let mut logged = self
                .logged
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            logged.len() < LOGGED_FAILURES_MAX && logged.insert((peer, error.reason()))
        };
        if first {
            warn!(%peer, direction, reason = error.reason(), %error, "mutual TLS failed (logged once per peer and reason; see bulwark_tls_handshake_failures_total)");
        }
    }

    /// Originates mutual TLS on `stream` to the endpoint `peer`, which must prove it is
    /// `expected`; `alpn` is the application protocol to speak.
    pub async fn connect(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        expected: &Arc<str>,
        alpn: Alpn,
    ) -> Result<client::TlsStream<TcpStream>, TlsError> {
        let result = self.try_connect(stream, peer, expected, alpn).await;
        match &result {
            Ok(tls) => self.counters.handshake(
                "outbound",
                group_label(tls.get_ref().1.negotiated_key_exchange_group()),
            ),
            Err(error) => self.log_failure(peer, "outbound", error),
        }
        result
    }

    async fn try_connect(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        expected: &Arc<str>,
        alpn: Alpn,
    ) -> Result<client::TlsStream<TcpStream>, TlsError> {
        let configs = self.current()?;
        let config = match alpn {
            Alpn::Http1 => &configs.client_h1,
            Alpn::Http2 => &configs.client_h2,
            Alpn::Opaque => &configs.client_opaque,
        };
        // Peers are named by SPIFFE ID, not DNS: the IP is a placeholder rustls never
        // sends (no SNI for addresses) and the verifier ignores.
        let name = ServerName::IpAddress(peer.ip().into());
        let handshake = TlsConnector::from(Arc::clone(config)).connect(name, stream);
        let tls = tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| TlsError::Timeout(self.handshake_timeout))?
            .map_err(|source| TlsError::Handshake {
                reason: handshake_reason(&source),
                source,
            })?;
        let found = peer_identity(tls.get_ref().1.peer_certificates());
        if found.as_deref() != Some(expected.as_ref()) {
            return Err(TlsError::WrongIdentity {
                expected: Arc::clone(expected),
                found,
            });
        }
        Ok(tls)
    }

    /// Terminates mutual TLS from `peer` on `io` (whose first byte was a TLS handshake
    /// record); the stream and the caller's verified SPIFFE ID.
    pub async fn accept<I>(
        &self,
        io: I,
        peer: SocketAddr,
    ) -> Result<(server::TlsStream<I>, Option<String>), TlsError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let result = self.try_accept(io).await;
        match &result {
            Ok((tls, _)) => self.counters.handshake(
                "inbound",
                group_label(tls.get_ref().1.negotiated_key_exchange_group()),
            ),
            Err(error) => self.log_failure(peer, "inbound", error),
        }
        result
    }

    async fn try_accept<I>(&self, io: I) -> Result<(server::TlsStream<I>, Option<String>), TlsError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let configs = self.current()?;
        let handshake = TlsAcceptor::from(Arc::clone(&configs.server)).accept(io);
        let tls = tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| TlsError::Timeout(self.handshake_timeout))?
            .map_err(|source| TlsError::Handshake {
                reason: handshake_reason(&source),
                source,
            })?;
        let caller = peer_identity(tls.get_ref().1.peer_certificates());
        Ok((tls, caller))
    }
}

/// The application protocol spoken inside a mutual-TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2.
    Http2,
    /// Opaque TCP.
    Opaque,
}

impl Alpn {
    /// What the server side negotiated (`None`: the client offered nothing we speak).
    pub fn negotiated(protocol: Option<&[u8]>) -> Option<Alpn> {
        match protocol? {
            ALPN_H2 => Some(Alpn::Http2),
            ALPN_HTTP1 => Some(Alpn::Http1),
            ALPN_OPAQUE => Some(Alpn::Opaque),
            _ => None,
        }
    }
}

fn build(credentials: &Credentials) -> Result<Configs, TlsConfigError> {
    let provider = Arc::new(bulwark_proto::tls::provider());
    let client = |alpn: &[u8]| {
        client_config(credentials, Arc::clone(&provider), &[alpn]).map(|mut c| {
            // Resuming skips the certificate exchange, which is where the peer's identity
            // is learnt; every connection is a full handshake (they are long-lived and
            // pooled, so this costs little).
            c.resumption = rustls::client::Resumption::disabled();
            Arc::new(c)
        })
    };
    let mut server = server_config(
        credentials,
        Arc::clone(&provider),
        &[ALPN_H2, ALPN_HTTP1, ALPN_OPAQUE],
    )?;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    Ok(Configs {
        own: credentials.spiffe_id.as_str().into(),
        client_h1: client(ALPN_HTTP1)?,
        client_h2: client(ALPN_H2)?,
        client_opaque: client(ALPN_OPAQUE)?,
        server: Arc::new(server),
    })
}

/// Which endpoints of one destination are meshed, and the identity each must prove;
/// replaced as a whole on every config change, read once per new connection.
#[derive(Debug, Default)]
pub struct MeshPeers(ArcSwap<HashMap<SocketAddr, Arc<str>>>);

impl MeshPeers {
    /// Replaces the meshed endpoints.
    pub fn set(&self, peers: HashMap<SocketAddr, Arc<str>>) {
        if **self.0.load() != peers {
            self.0.store(Arc::new(peers));
        }
    }

    /// The identity expected at `addr`, if it is meshed.
    pub fn expected(&self, addr: SocketAddr) -> Option<Arc<str>> {
        self.0.load().get(&addr).cloned()
    }
}

/// A connection to an endpoint: plaintext, or mutual TLS to a meshed one.
#[derive(Debug)]
pub enum MaybeTls {
    /// Plaintext.
    Plain(TcpStream),
    /// Mutual TLS.
    Tls(Box<client::TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(io) => io,
            MaybeTls::Tls(io) => io.get_ref().0,
        }
    }
}

// Both streams are `Unpin`, so the enum is, and each call re-pins the one inside.
macro_rules! either_io {
    ($self:ident, $io:ident => $call:expr) => {
        match $self.get_mut() {
            MaybeTls::Plain(io) => {
                let $io = std::pin::Pin::new(io);
                $call
            }
            MaybeTls::Tls(io) => {
                let $io = std::pin::Pin::new(io.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        either_io!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        either_io!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        either_io!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        either_io!(self, io => io.poll_shutdown(cx))
    }
}
