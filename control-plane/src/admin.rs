//! The admin HTTP server: `/metrics`, `/ready`, `/agents`, `/errors`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::discovery::agents::{AgentQuery, AgentRegistry};
use crate::lease::ApiReach;
use crate::metrics::Metrics;
use crate::source::RejectedObject;

/// How long open admin connections may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin pages show.
#[derive(Debug)]
pub struct AdminState {
    /// Metrics for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Agents for `/agents`.
    pub agents: Arc<AgentRegistry>,
    /// Rejected documents for `/errors`.
    pub rejections: watch::Receiver<Arc<[RejectedObject]>>,
    /// Set once the first load is done, for `/ready`.
    pub ready: Arc<AtomicBool>,
    /// Whether the API server answers (Kubernetes source), for `/ready`.
    pub api_reach: Option<watch::Receiver<ApiReach>>,
}

/// `/ready`: 200 once the first load is done, while the API server (if any) answers.
fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    if !state.ready.load(Ordering::Acquire) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first load of the source has not finished\n",
        );
    }
    let failing = state
        .api_reach
        .as_ref()
        .and_then(|reach| match &*reach.borrow() {
            ApiReach::Answering => None,
            ApiReach::Failing { why, .. } => Some(why.clone()),
        });
    match failing {
        None => text(StatusCode::OK, "ready\n"),
        Some(why) => with_type(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!(
                "not ready: {why}; agents keep the last config, but cluster changes and policy \
                 status wait until the API server answers\n"
            ),
        ),
    }
}

/// Serves admin requests on `listener` until `shutdown` is set.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "admin server cannot accept a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let state = Arc::clone(&state);
                let service = service_fn(move |request: Request<Incoming>| {
                    let response = route(&state, &request, peer.ip());
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        debug!(%peer, %error, "admin connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("admin connections still open at shutdown; dropping them");
    }
}

/// Answers one request.
pub fn route<B>(state: &AdminState, request: &Request<B>, peer: IpAddr) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let known = matches!(path, "/metrics" | "/ready" | "/agents" | "/errors");
    if known && !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // /agents (every pod's name and labels) and /errors (every rejected object) reveal
    // the mesh: only to a caller on the pod's own loopback, which is where `kubectl
    // port-forward` arrives. The kubelet's /ready and Prometheus' /metrics stay open.
    if matches!(path, "/agents" | "/errors") && !peer.to_canonical().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            "forbidden: this page reveals the mesh and is served on loopback only; use \
             `kubectl -n <namespace> port-forward deploy/bulwark-control-plane 9991`\n",
        );
    }
    match path {
        "/metrics" => with_type(StatusCode::OK, OPENMETRICS, state.metrics.encode()),
        "/ready" => ready(state),
        "/agents" => match agent_query(request.uri().query()) {
            Ok(query) => {
                let page = state.agents.page(&query);
                let mut response = json(&page.agents);
                response
                    .headers_mut()
                    .insert(TOTAL_COUNT, header::HeaderValue::from(page.total));
                response
            }
            Err(message) => with_type(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                message,
            ),
        },
        "/errors" => {
            let rejections = Arc::clone(&state.rejections.borrow());
            json(&*rejections)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /ready, /agents or /errors\n",
        ),
    }
}

/// The header of `/agents` saying how many agents matched on all pages.
const TOTAL_COUNT: &str = "x-total-count";

/// Reads `/agents?namespace=NS&offset=N&limit=N`; every parameter is optional.
fn agent_query(query: Option<&str>) -> Result<AgentQuery, String> {
    let mut parsed = AgentQuery::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("/agents: {key} must be a whole number, got {value:?}\n"))
        };
        match key {
            "namespace" if !value.is_empty() => parsed.namespace = Some(value.to_owned()),
            "offset" => parsed.offset = number()?,
            "limit" => parsed.limit = Some(number()?),
            _ => {
                return Err(format!(
                    "/agents: unknown parameter {pair:?}; use namespace=NS, offset=N, limit=N\n"
                ));
            }
        }
    }
    Ok(parsed)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body)
}

fn json<T: Serialize + ?Sized>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            with_type(StatusCode::OK, "application/json", body)
        }
        Err(error) => {
            warn!(%error, "cannot encode an admin page as JSON");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the page as JSON\n",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timestamp::Timestamp;

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn state(ready: bool, rejected: Vec<RejectedObject>) -> AdminState {
        let metrics = Arc::new(Metrics::new());
        let (_, rejections) = watch::channel(Arc::from(rejected));
        AdminState {
            agents: Arc::new(AgentRegistry::new(Arc::clone(&metrics))),
            metrics,
            rejections,
            ready: Arc::new(AtomicBool::new(ready)),
            api_reach: None,
        }
    }

    fn get(state: &AdminState, path: &str) -> (StatusCode, String) {
        let request = Request::get(path).body(()).unwrap();
        let response = route(state, &request, LOOPBACK);
        let status = response.status();
        let body =
            futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                .unwrap()
                .to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[test]
    fn ready_follows_the_first_load() {
        assert_eq!(
            get(&state(false, vec![]), "/ready").0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get(&state(true, vec![]), "/ready").0, StatusCode::OK);
    }

    #[test]
    fn pages_that_reveal_the_mesh_answer_loopback_only() {
        let state = state(true, vec![]);
        for (peer, open) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("10.1.2.3", false),
            ("fd00::1", false),
        ] {
            let peer: IpAddr = peer.parse().unwrap();
            for path in ["/agents", "/errors"] {
                let request = Request::get(path).body(()).unwrap();
                let status = route(&state, &request, peer).status();
                assert_eq!(
                    status == StatusCode::OK,
                    open,
                    "{path} from {peer}: {status}"
                );
                if !open {
                    assert_eq!(status, StatusCode::FORBIDDEN);
                }
            }
            // Readiness and metrics stay reachable for the kubelet and Prometheus.
            for path in ["/ready", "/metrics"] {
                let request = Request::get(path).body(()).unwrap();
                assert_eq!(route(&state, &request, peer).status(), StatusCode::OK);
            }
        }
    }

    #[test]
    fn ready_fails_while_the_api_server_does_not_answer() {
        let (reach, api_reach) = watch::channel(ApiReach::Answering);
        let state = AdminState {
            api_reach: Some(api_reach),
            ..state(true, vec![])
        };
        assert_eq!(get(&state, "/ready").0, StatusCode::OK);
        reach.send_replace(ApiReach::Failing {
            for_secs: 15,
            why: "the API server refuses our credentials (401 Unauthorized)".into(),
        });
        let (status, body) = get(&state, "/ready");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("refuses our credentials (401"), "{body}");
        reach.send_replace(ApiReach::Answering);
        assert_eq!(get(&state, "/ready").0, StatusCode::OK);
    }

    #[test]
    fn errors_lists_rejected_documents() {
        let rejected = RejectedObject {
            file: "examples/policy.yaml".into(),
            document: Some(1),
            line: Some(12),
            object: Some("ResiliencePolicy demo/reviews".into()),
            path: "spec.retry.attempts".into(),
            reason: "must be between 1 and 10".into(),
            kept_previous: true,
            since: Timestamp::now(),
        };
        let (status, body) = get(&state(true, vec![rejected]), "/errors");
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json[0]["file"], "examples/policy.yaml");
        assert_eq!(json[0]["document"], 1);
        assert_eq!(json[0]["path"], "spec.retry.attempts");
        assert_eq!(json[0]["kept_previous"], true);
    }

    #[test]
    fn metrics_agents_and_unknown_paths() {
        let s = state(true, vec![]);
        let (status, body) = get(&s, "/metrics");
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("bulwark_cp_agents_connected 0"), "{body}");
        assert_eq!(get(&s, "/agents"), (StatusCode::OK, "[]\n".to_owned()));
        assert_eq!(get(&s, "/nope").0, StatusCode::NOT_FOUND);
        assert_eq!(get(&s, "/agents?limit=ten").0, StatusCode::BAD_REQUEST);
        assert_eq!(get(&s, "/agents?page=2").0, StatusCode::BAD_REQUEST);
        let post = Request::post("/agents").body(()).unwrap();
        assert_eq!(
            route(&s, &post, LOOPBACK).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn agents_are_paged_and_filtered() {
        let s = state(true, vec![]);
        let mut held = Vec::new();
        for (namespace, pod) in [("demo", "a"), ("demo", "b"), ("demo", "c"), ("prod", "a")] {
            held.push(s.agents.register(
                crate::discovery::agents::AgentIdentity {
                    namespace: namespace.into(),
                    pod_name: pod.into(),
                    service_account: "sa".into(),
                    labels: Default::default(),
                    agent_version: "test".into(),
                    protocol_version: 1,
                },
                None,
            ));
        }
        let request = Request::get("/agents?namespace=demo&offset=1&limit=1")
            .body(())
            .unwrap();
        let response = route(&s, &request, LOOPBACK);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[TOTAL_COUNT], "3");
        let (_, body) = get(&s, "/agents?namespace=demo&offset=1&limit=1");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page.as_array().unwrap().len(), 1);
        assert_eq!(page[0]["identity"]["pod_name"], "b");
        let (_, all) = get(&s, "/agents");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&all)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            4
        );
    }
}
