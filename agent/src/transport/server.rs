//! The accept loop every listener shares, and HTTP serving of one connection:
//! HTTP/1.1 and HTTP/2 (prior knowledge) on one port, graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::ProxyBody;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves HTTP on accepted connections; each connection it serves is drained on shutdown.
pub struct Conn {
    name: &'static str,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("name", &self.name).finish()
    }
}

impl Conn {
    /// Serves HTTP/1.1 or HTTP/2 on `io` with `handler` until the connection ends.
    pub async fn serve_http<I, H, F>(self, io: I, peer: SocketAddr, handler: H)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let svc = service_fn(move |req| {
            let rsp = handler(req, peer);
            async move { Ok::<_, Infallible>(rsp.await) }
        });
        // Upgrades are on so that CONNECT tunnels work on the outbound listener.
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        if let Err(error) = self.watcher.watch(conn).await {
            debug!(listener = self.name, %peer, %error, "connection ended with an error");
        }
    }
}

/// Accepts connections on `listener` and hands each to `dispatch` (in its own
/// task) until `shutdown` turns true, then waits up to `drain` for the HTTP
/// connections to finish their requests.
pub async fn serve_connections<D, F>(
    listener: TcpListener,
    name: &'static str,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    dispatch: D,
) where
    D: Fn(TcpStream, SocketAddr, Conn) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d;
                    // policy (rate limit keys, X-Forwarded-For) wants a.b.c.d.
                    Ok((stream, peer)) => (stream, SocketAddr::new(peer.ip().to_canonical(), peer.port())),
                    Err(error) => {
                        warn!(listener = name, %error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                if let Err(error) = stream.set_nodelay(true) {
                    debug!(listener = name, %error, "cannot set TCP_NODELAY");
                }
                let conn = Conn { name, builder: Arc::clone(&builder), watcher: graceful.watcher() };
                tokio::spawn(dispatch(stream, peer, conn));
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        info!(
            listener = name,
            ?drain,
            "drain timed out; closing remaining connections"
        );
    }
}

/// Serves HTTP with `handler` on every connection of `listener` (see [`serve_connections`]).
pub async fn serve<H, F>(
    listener: TcpListener,
    name: &'static str,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    serve_connections(
        listener,
        name,
        shutdown,
        drain,
        move |stream, peer, conn| conn.serve_http(stream, peer, handler.clone()),
    )
    .await;
}
