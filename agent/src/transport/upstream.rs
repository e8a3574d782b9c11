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

/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// HTTP clients sharing one connect timeout and connection limit.
#[derive(Clone, Debug)]
pub struct Upstream {
    h1: Client<Connector, ProxyBody>,
    h2: Client<Connector, ProxyBody>,
    connect_timeout: Duration,
}

impl Upstream {
    /// Clients that connect within `connect_timeout`, at most `limit` connections at once.
    pub fn new(connect_timeout: Duration, limit: Option<Arc<Semaphore>>) -> Self {
        let connector = Connector::new(connect_timeout, limit);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .build(connector);
        Self {
            h1,
            h2,
            connect_timeout,
        }
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
