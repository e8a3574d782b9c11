//! The upstream connector: TCP with a connect timeout, and an optional cap on
//! connections per destination (the bulkhead's `maxConnections`).
//!
//! hyper's client has no cap on total connections, so we wrap its connector:
//! a connection holds a semaphore permit for as long as it lives, and a
//! request that needs a new connection waits for a permit (or for a pooled
//! connection to free up, whichever comes first: the pool races both).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::BoxError;

/// Connects to endpoints, within an optional connection limit.
#[derive(Clone, Debug)]
pub struct Connector {
    http: HttpConnector,
    limit: Option<Arc<Semaphore>>,
}

impl Connector {
    /// A connector with `connect_timeout` per attempt and at most `limit` open connections.
    pub fn new(connect_timeout: Duration, limit: Option<Arc<Semaphore>>) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        Self { http, limit }
    }
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
        Box::pin(async move {
            let permit = match limit {
                Some(sem) => Some(sem.acquire_owned().await?),
                None => None,
            };
            let io = tower::Service::call(&mut http, uri).await?;
            Ok(LimitedConn {
                io,
                _permit: permit,
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A connection that frees its slot in the connection limit when dropped.
    pub struct LimitedConn {
        #[pin]
        io: TokioIo<TcpStream>,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl Connection for LimitedConn {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for LimitedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl Write for LimitedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
}
