//! The upstream connector: TCP with a connect timeout, an optional cap on
//! connections per destination (the bulkhead's `maxConnections`), and mutual TLS to
//! meshed endpoints.
//!
//! A connection holds a semaphore permit for as long as it lives, and a request that
//! needs a new connection waits for a permit (or for a pooled connection to free up,
//! whichever comes first: `transport/upstream.rs` races both).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::client::TlsStream;

use super::BoxError;
use super::tls::{Alpn, MeshPeers, MeshTls};

/// Connects to endpoints, within an optional connection limit.
#[derive(Clone, Debug)]
pub struct Connector {
    http: HttpConnector,
    limit: Option<Arc<Semaphore>>,
    mesh: Option<Mesh>,
}

/// Mutual TLS for the meshed endpoints of one destination.
#[derive(Clone, Debug)]
struct Mesh {
    tls: Arc<MeshTls>,
    peers: Arc<MeshPeers>,
    alpn: Alpn,
}

impl Connector {
    /// A connector with `connect_timeout` per attempt and at most `limit` open connections.
    pub fn new(connect_timeout: Duration, limit: Option<Arc<Semaphore>>) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        Self {
            http,
            limit,
            mesh: None,
        }
    }

    /// Whether new connections wait for a slot in a connection limit.
    pub fn is_limited(&self) -> bool {
        self.limit.is_some()
    }

    /// This connector, speaking mutual TLS (with `alpn`) to the endpoints `peers` names.
    pub fn with_mesh(mut self, tls: Arc<MeshTls>, peers: Arc<MeshPeers>, alpn: Alpn) -> Self {
        self.mesh = Some(Mesh { tls, peers, alpn });
        self
    }
}

/// The endpoint a URI names, when its host is an IP address (as endpoints' are).
fn endpoint(uri: &http::Uri) -> Option<SocketAddr> {
    let host = uri.host()?;
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, uri.port_u16()?))
}

impl tower::Service<http::Uri> for Connector {
    type Response = LimitedConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<LimitedConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let mut http = self.http.clone();
        let limit = self.limit.clone();
        // Only a meshed endpoint of an agent with identity on gets TLS; the lookup is
        // per new connection, never per request.
        let tls = self.mesh.as_ref().and_then(|mesh| {
            let addr = endpoint(&uri)?;
            let expected = mesh.peers.expected(addr)?;
            mesh.tls
                .enabled()
                .then(|| (Arc::clone(&mesh.tls), addr, expected, mesh.alpn))
        });
        Box::pin(async move {
            let permit = match limit {
                Some(sem) => Some(sem.acquire_owned().await?),
                None => None,
            };
            let tcp = tower::Service::call(&mut http, uri).await?;
            let io = match tls {
                None => Io::Plain { io: tcp },
                Some((tls, addr, expected, alpn)) => {
                    let stream = tls.connect(tcp.into_inner(), addr, &expected, alpn).await?;
                    Io::Tls {
                        io: TokioIo::new(stream),
                    }
                }
            };
            Ok(LimitedConn {
                io,
                _permit: permit,
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A plaintext or mutual-TLS connection.
    #[project = IoProj]
    enum Io {
        Plain { #[pin] io: TokioIo<TcpStream> },
        Tls { #[pin] io: TokioIo<TlsStream<TcpStream>> },
    }
}

/// Forwards a call to whichever connection `$io` is.
macro_rules! either {
    ($io:expr, $inner:ident => $call:expr) => {
        match $io {
            IoProj::Plain { io: $inner } => $call,
            IoProj::Tls { io: $inner } => $call,
        }
    };
}

pin_project_lite::pin_project! {
    /// A connection that frees its slot in the connection limit when dropped.
    pub struct LimitedConn {
        #[pin]
        io: Io,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl Read for LimitedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        either!(self.project().io.project(), io => io.poll_read(cx, buf))
    }
}

impl Write for LimitedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        either!(self.project().io.project(), io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either!(self.project().io.project(), io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either!(self.project().io.project(), io => io.poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain { io } => io.is_write_vectored(),
            Io::Tls { io } => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        either!(self.project().io.project(), io => io.poll_write_vectored(cx, bufs))
    }
}

/// Forwards a call to the stream inside whichever connection `$io` is, for tokio's I/O
/// traits (the `h2` crate's; hyper's are above).
macro_rules! either_stream {
    ($io:expr, $inner:ident => $call:expr) => {
        match $io {
            IoProj::Plain { io } => {
                let $inner = Pin::new(io.get_mut().inner_mut());
                $call
            }
            IoProj::Tls { io } => {
                let $inner = Pin::new(io.get_mut().inner_mut());
                $call
            }
        }
    };
}

impl tokio::io::AsyncRead for LimitedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        either_stream!(self.project().io.project(), io => tokio::io::AsyncRead::poll_read(io, cx, buf))
    }
}

impl tokio::io::AsyncWrite for LimitedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        either_stream!(self.project().io.project(), io => tokio::io::AsyncWrite::poll_write(io, cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either_stream!(self.project().io.project(), io => tokio::io::AsyncWrite::poll_flush(io, cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either_stream!(self.project().io.project(), io => tokio::io::AsyncWrite::poll_shutdown(io, cx))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain { io } => tokio::io::AsyncWrite::is_write_vectored(io.inner()),
            Io::Tls { io } => tokio::io::AsyncWrite::is_write_vectored(io.inner()),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        either_stream!(self.project().io.project(), io => tokio::io::AsyncWrite::poll_write_vectored(io, cx, bufs))
    }
}
