//! The admin listener: `/metrics`, `/ready`, `/config`.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::config::Config;
use crate::identity::renewal::IdentityState;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::transport::{ProxyBody, full};

/// What the admin pages read.
#[derive(Debug)]
pub struct Admin {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    settings: Settings,
    identity: Option<watch::Receiver<IdentityState>>,
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
            identity: None,
        }
    }

    /// Shows the agent's workload identity (once its renewal task runs) on `/config`.
    pub fn with_identity(mut self, identity: Option<watch::Receiver<IdentityState>>) -> Self {
        self.identity = identity;
        self
    }

    /// The identity part of `/config`: the SPIFFE ID and expiry, never the key.
    fn identity_json(&self) -> serde_json::Value {
        let Some(state) = &self.identity else {
            return serde_json::Value::Null;
        };
        let state = state.borrow().clone();
        let now = std::time::SystemTime::now();
        serde_json::json!({
            "spiffeId": state.credentials.as_ref().map(|c| c.spiffe_id.clone()),
            "expiresInSecs": state.credentials.as_ref().map(|c| c.remaining(now).as_secs()),
            "issuer": state.credentials.as_ref().and_then(|c| crate::identity::tls::issuer(c.chain.first()?)),
            "anchors": state.credentials.as_ref().map(|c| c.anchors.len()),
            "lastError": state.last_error,
        })
    }

    /// Serves one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        self.route(req.method(), req.uri().path(), peer)
    }

    /// Answers `method path` from `peer`.
    fn route(&self, method: &Method, path: &str, peer: SocketAddr) -> Response<ProxyBody> {
        if method != Method::GET && method != Method::HEAD {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        match path {
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            "/ready" => {
                if *self.ready.borrow() {
                    // Ready whether or not the rate-limit store answers (Shared limits
                    // then apply their mode): the detail says which.
                    let detail = match &self.config.load().store {
                        Some(store) => match store.unavailable_reason() {
                            None => {
                                format!("ready\nrate-limit store {}: available\n", store.address())
                            }
                            Some(reason) => format!(
                                "ready\nrate-limit store {}: unavailable ({reason}); Shared limits apply their onStoreUnavailable mode\n",
                                store.address()
                            ),
                        },
                        None => "ready\n".to_owned(),
                    };
                    respond(StatusCode::OK, "text/plain", detail)
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: no config from the control plane yet\n",
                    )
                }
            }
            // The pod's whole view of the mesh: only to a caller on the pod's own
            // loopback, where `kubectl port-forward` and `kubectl exec` arrive; the
            // admin port listens on every address for the kubelet and Prometheus.
            "/config" if !peer.ip().to_canonical().is_loopback() => respond(
                StatusCode::FORBIDDEN,
                "text/plain",
                "forbidden: /config reveals the mesh and is served on loopback only; use \
                 `kubectl port-forward pod/<pod> 4191`\n",
            ),
            "/config" => {
                let body = serde_json::json!({
                    "identity": self.identity_json(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn admin() -> Admin {
        let config = Arc::new(ArcSwap::from_pointee(Config::default()));
        let metrics = Arc::new(Metrics::new(Arc::clone(&config)));
        let (_, ready) = watch::channel(true);
        let settings = Settings::new("http://127.0.0.1:9990", crate::Identity::default());
        Admin::new(config, metrics, ready, settings)
    }

    #[tokio::test]
    async fn config_answers_loopback_only_while_ready_and_metrics_stay_open() {
        let admin = admin();
        for (peer, local) in [
            ("127.0.0.1:40000", true),
            ("[::1]:40000", true),
            ("[::ffff:127.0.0.1]:40000", true),
            ("10.244.1.7:40000", false),
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            let config = admin.route(&Method::GET, "/config", peer);
            if local {
                assert_eq!(config.status(), StatusCode::OK, "{peer}");
                let body = config.into_body().collect().await.unwrap().to_bytes();
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert!(json["config"].is_object());
            } else {
                assert_eq!(config.status(), StatusCode::FORBIDDEN, "{peer}");
            }
            for path in ["/ready", "/metrics"] {
                assert_eq!(
                    admin.route(&Method::GET, path, peer).status(),
                    StatusCode::OK,
                    "{path} from {peer}"
                );
            }
        }
    }
}
