//! Pooled HTTP clients to one destination's endpoints (HTTP/1.1 and HTTP/2).

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use super::ProxyBody;
use super::connector::Connector;
use super::tls::{Alpn, MeshPeers, MeshTls};

/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// HTTP clients sharing one connect timeout and connection limit.
#[derive(Clone, Debug)]
pub struct Upstream {
    h1: Client<Connector, ProxyBody>,
    h2: Client<Connector, ProxyBody>,
    connect_timeout: Duration,
    peers: Option<(Arc<MeshTls>, Arc<MeshPeers>)>,
}

impl Upstream {
    /// Plaintext clients that connect within `connect_timeout`, at most `limit`
    /// connections at once.
    pub fn new(connect_timeout: Duration, limit: Option<Arc<Semaphore>>) -> Self {
        let connector = Connector::new(connect_timeout, limit);
        Self::with_connectors(connector.clone(), connector, connect_timeout, None)
    }

    /// Like [`Upstream::new`], speaking mutual TLS with `tls` to the endpoints that
    /// [`Upstream::set_meshed`] names.
    pub fn meshed(
        connect_timeout: Duration,
        limit: Option<Arc<Semaphore>>,
        tls: Arc<MeshTls>,
    ) -> Self {
        let peers = Arc::new(MeshPeers::default());
        let connector = Connector::new(connect_timeout, limit);
        let h1 = connector
            .clone()
            .with_mesh(Arc::clone(&tls), Arc::clone(&peers), Alpn::Http1);
        let h2 = connector.with_mesh(Arc::clone(&tls), Arc::clone(&peers), Alpn::Http2);
        Self::with_connectors(h1, h2, connect_timeout, Some((tls, peers)))
    }

    fn with_connectors(
        h1: Connector,
        h2: Connector,
        connect_timeout: Duration,
        peers: Option<(Arc<MeshTls>, Arc<MeshPeers>)>,
    ) -> Self {
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(h1);
        let h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .build(h2);
        Self {
            h1,
            h2,
            connect_timeout,
            peers,
        }
    }

    /// Names the meshed endpoints and the identity each must prove (no effect on
    /// plaintext clients). Pooled connections stay as they are.
    pub fn set_meshed(&self, peers: std::collections::HashMap<std::net::SocketAddr, Arc<str>>) {
        if let Some((_, mesh)) = &self.peers {
            mesh.set(peers);
        }
    }

    /// The identity expected at the meshed endpoint `addr` (none: plaintext).
    pub fn expected(&self, addr: std::net::SocketAddr) -> Option<Arc<str>> {
        self.peers.as_ref()?.1.expected(addr)
    }

    /// The mutual TLS to use to `addr` and the identity it must prove, when `addr` is a
    /// meshed endpoint and the agent has identity on (for connections other than these
    /// clients', e.g. opaque TCP).
    pub fn mesh_to(&self, addr: std::net::SocketAddr) -> Option<(&Arc<MeshTls>, Arc<str>)> {
        let (tls, peers) = self.peers.as_ref()?;
        tls.enabled().then_some(())?;
        Some((tls, peers.expected(addr)?))
    }

    /// Whether these clients can speak mutual TLS.
    pub fn is_meshed(&self) -> bool {
        self.peers.is_some()
    }

    /// The connect timeout these clients use.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Sends `req` over HTTP/2 (prior knowledge) when `http2`, else HTTP/1.1.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
        http2: bool,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        if http2 {
            *req.version_mut() = Version::HTTP_2;
            self.h2.request(req).await
        } else {
            *req.version_mut() = Version::HTTP_11;
            self.h1.request(req).await
        }
    }
}
