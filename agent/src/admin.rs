//! The admin listener: `/metrics`, `/ready`, `/config`.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{ProxyBody, full};
use crate::settings::Settings;

/// What the admin pages read.
#[derive(Debug)]
pub struct Admin {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    settings: Settings,
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<ProxyBody> {
    let mut rsp = Response::new(full(body));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    rsp
}

impl Admin {
    /// Admin state.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        ready: watch::Receiver<bool>,
        settings: Settings,
    ) -> Self {
        Self {
            config,
            metrics,
            ready,
            settings,
        }
    }

    /// Serves one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<ProxyBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        match req.uri().path() {
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            "/ready" => {
                if *self.ready.borrow() {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: no config from the control plane yet\n",
                    )
                }
            }
            "/config" => {
                let body = serde_json::json!({
                    "settings": self.settings,
                    "config": self.config.load().to_json(),
                });
                respond(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec_pretty(&body).unwrap_or_default(),
                )
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics, /ready, /config\n",
            ),
        }
    }
}
