//! The inbound listener: mesh → app. Enforces the pod's rate limits, then
//! forwards to the local app port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use super::upstream::Upstream;
use super::{ProxyBody, local_response, reason, send_plain};
use crate::config::Config;
use crate::metrics::{Direction, DstMetrics, Metrics};

/// Connect timeout to the local app.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// State shared by the connections of one inbound listener.
#[derive(Debug)]
pub struct Inbound {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    dst: DstMetrics,
    app: Authority,
    app_port: u16,
    upstream: Upstream,
}

impl Inbound {
    /// Inbound state forwarding to the app at `app`.
    pub fn new(config: Arc<ArcSwap<Config>>, metrics: Arc<Metrics>, app: SocketAddr) -> Self {
        let label = format!("localhost:{}", app.port());
        let dst = metrics.destination(Direction::Inbound, &label);
        Self {
            config,
            metrics,
            dst,
            // A SocketAddr always renders as a valid authority.
            app: Authority::try_from(app.to_string())
                .unwrap_or_else(|_| Authority::from_static("127.0.0.1")),
            app_port: app.port(),
            upstream: Upstream::new(APP_CONNECT_TIMEOUT, None),
        }
    }

    /// Handles one request from the mesh.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let limited = self
            .config
            .load()
            .inbound
            .check(self.app_port, peer.ip(), req.headers());
        let rsp = match limited {
            Err(limited) => {
                // The rate limiter logs the refusal with the client, policy and limit.
                self.metrics.rate_limited(&limited.source, &limited.name);
                self.dst.local_response(reason::RATE_LIMITED);
                local_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    reason::RATE_LIMITED,
                    Some(limited.retry_after),
                )
            }
            Ok(()) => self.to_app(req).await,
        };
        self.dst.response(rsp.status(), start.elapsed());
        rsp
    }

    async fn to_app(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        match send_plain(&self.upstream, req, self.app.clone()).await {
            Ok(rsp) => rsp,
            Err(error) => {
                debug!(app = %self.app, %error, "local app did not answer");
                self.dst.local_response(reason::CONNECT_FAILED);
                local_response(StatusCode::BAD_GATEWAY, reason::CONNECT_FAILED, None)
            }
        }
    }
}
