//! The sidecar-injection webhook: `admission.k8s.io/v1` `AdmissionReview`s over HTTPS
//! at `/inject`, answered with a JSON patch that adds the agent (see [`inject`]).
//!
//! The chart registers two webhooks: one for namespaces labelled
//! `bulwark.io/inject=enabled` (path [`ENABLED_NAMESPACE_PATH`], failure policy from
//! values, `Fail` by default) and one for every other namespace except the system ones
//! (path [`PATH`], failure policy `Ignore`), where only an annotated pod is injected.
//! So the webhook needs no access to Namespaces. (A webhook path cannot carry a query
//! string: the API server accepts only DNS-label segments.)
//!
//! The serving certificate comes from a folder (the chart's TLS Secret) and is re-read
//! when it changes ([`certs`]).
//!
//! With workload identity, injected agents mount the mesh's trust anchors from a
//! ConfigMap in their namespace, which the control plane keeps ([`anchors`]; that task,
//! not the webhook, watches Namespaces).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, info, info_span, warn};

pub mod anchors;
pub mod certs;
pub mod config;
pub mod inject;

pub use config::{InjectConfig, SidecarMode};

/// Reviews of pods whose namespace does not carry `bulwark.io/inject=enabled`.
pub const PATH: &str = "/inject";
/// Reviews of pods whose namespace carries `bulwark.io/inject=enabled`.
pub const ENABLED_NAMESPACE_PATH: &str = "/inject/enabled-namespace";

/// Default `--webhook-addr`.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9443";
/// The largest review body read; the API server's own limit for an object is 3 MiB.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`Settings::cert_reload`]: how often the certificate folder is re-read.
pub const DEFAULT_CERT_RELOAD: Duration = Duration::from_secs(10);

/// How to run the webhook.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The HTTPS listen address (port 0 picks a free port).
    pub addr: SocketAddr,
    /// The folder holding `tls.crt` and `tls.key`.
    pub cert_dir: PathBuf,
    /// What to inject.
    pub inject: InjectConfig,
    /// How often the certificate folder is re-read; more than zero.
    pub cert_reload: Duration,
    /// Whether the agent goes in as a native sidecar (decided from `sidecarMode` and
    /// the API server's version by the caller, see [`native_sidecars`]).
    pub native: bool,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener could not be bound.
    #[error("cannot listen for the webhook on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The serving certificate could not be loaded.
    #[error("the webhook's certificate: {0}")]
    Cert(#[from] certs::CertError),
    /// TLS could not be set up.
    #[error("the webhook's TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    /// The sidecar mode is `Auto` and the API server's version could not be learnt.
    #[error(
        "cannot learn the API server's version for sidecarMode Auto (set Native or Container): {0}"
    )]
    Version(String),
}

/// Whether pods get a native sidecar, from the mode and the API server's version
/// (`major`, `minor` as `/version` reports them, e.g. "1" and "29+").
pub fn native_sidecars(mode: SidecarMode, major: &str, minor: &str) -> Option<bool> {
    let number = |s: &str| {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    };
    match mode {
        SidecarMode::Native => Some(true),
        SidecarMode::Container => Some(false),
        SidecarMode::Auto => {
            let (major, minor) = (number(major)?, number(minor)?);
            Some(major > 1 || (major == 1 && minor >= 29))
        }
    }
}

/// Whether pods get a native sidecar: `mode`, or for `Auto` the API server's `/version`.
pub async fn detect_native(mode: SidecarMode, client: &kube::Client) -> Result<bool, Error> {
    if let Some(native) = native_sidecars(mode, "", "") {
        return Ok(native);
    }
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| Error::Version(e.to_string()))?;
    let native = native_sidecars(mode, &version.major, &version.minor).ok_or_else(|| {
        Error::Version(format!(
            "unreadable version major {:?} minor {:?}",
            version.major, version.minor
        ))
    })?;
    info!(
        major = %version.major,
        minor = %version.minor,
        native,
        "sidecar mode from the API server's version"
    );
    Ok(native)
}

/// A running webhook; dropping it stops it.
#[derive(Debug)]
pub struct Webhook {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    reload: JoinHandle<()>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
        self.reload.abort();
    }
}

impl Webhook {
    /// Loads the certificate, binds the listener and starts serving.
    pub async fn start(settings: Settings) -> Result<Self, Error> {
        let cert = certs::ReloadingCert::load(&settings.cert_dir)?;
        let mut tls =
            rustls::ServerConfig::builder_with_provider(Arc::new(bulwark_proto::tls::provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(cert.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(settings.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: settings.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: settings.addr,
            source,
        })?;
        let (shutdown, stop) = watch::channel(false);
        let reload = tokio::spawn(cert.watch(
            settings.cert_reload.max(Duration::from_millis(10)),
            stop.clone(),
        ));
        let handler = Arc::new(Handler {
            config: settings.inject,
            native: settings.native,
        });
        info!(%addr, native = settings.native, "injection webhook listening");
        let task = tokio::spawn(serve(listener, acceptor, handler, stop));
        Ok(Webhook {
            addr,
            shutdown,
            task,
            reload,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handler: Arc<Handler>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        tokio::spawn(
            async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => return debug!(%error, "TLS handshake failed"),
                    Err(_) => return debug!("TLS handshake timed out"),
                };
                let service = service_fn(move |request| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler.handle(request).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
                    debug!(%error, "webhook connection ended with an error");
                }
            }
            .instrument(info_span!("webhook", %peer)),
        );
    }
}

/// The review as JSON with its patch base64-encoded, as the API defines `[]byte` fields
/// (kube-core writes the bytes as a JSON array of numbers).
fn encode_patch(review: AdmissionReview<DynamicObject>) -> serde_json::Value {
    use base64::Engine as _;
    let patch = review.response.as_ref().and_then(|r| r.patch.clone());
    let mut value = serde_json::to_value(review).unwrap_or_default();
    if let (Some(patch), Some(response)) = (patch, value.get_mut("response")) {
        response["patch"] =
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    value
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}

/// Answers requests with what [`inject`] decides.
#[derive(Debug)]
struct Handler {
    config: InjectConfig,
    native: bool,
}

type Body = Full<Bytes>;

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, message: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(message.as_bytes())));
    *response.status_mut() = status;
    response
}

fn invalid(status: StatusCode, reason: String) -> Response<Body> {
    warn!(%reason, "malformed admission review");
    json(status, &AdmissionResponse::invalid(reason).into_review())
}

impl Handler {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        let namespace_enabled = path == ENABLED_NAMESPACE_PATH;
        match (request.method(), path) {
            (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
            (&Method::POST, PATH | ENABLED_NAMESPACE_PATH) => {}
            (_, PATH | ENABLED_NAMESPACE_PATH) => {
                return text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
            }
            _ => return text(StatusCode::NOT_FOUND, "not found: try POST /inject\n"),
        }
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(error) => {
                return invalid(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("cannot read the request body (at most {MAX_BODY} bytes): {error}"),
                );
            }
        };
        let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
            Ok(review) => review,
            Err(error) => {
                return invalid(
                    StatusCode::BAD_REQUEST,
                    format!("the body is not an admission.k8s.io/v1 AdmissionReview: {error}"),
                );
            }
        };
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(request) => request,
            Err(_) => {
                return invalid(
                    StatusCode::BAD_REQUEST,
                    "the AdmissionReview has no request".to_owned(),
                );
            }
        };
        let response = self.review(&request, namespace_enabled);
        json(StatusCode::OK, &encode_patch(response.into_review()))
    }

    fn review(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        namespace_enabled: bool,
    ) -> AdmissionResponse {
        let response = AdmissionResponse::from(request);
        let namespace = request.namespace.clone().unwrap_or_default();
        let span = info_span!("review", uid = %request.uid, %namespace, name = %request.name);
        let _entered = span.enter();
        if request.kind.kind != "Pod" || request.operation != Operation::Create {
            debug!(kind = %request.kind.kind, "not a Pod CREATE; allowed unchanged");
            return response;
        }
        let Some(object) = &request.object else {
            return response.deny("the review of a Pod CREATE carries no object");
        };
        let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
            Ok(pod) => pod,
            Err(error) => return response.deny(format!("the object is not a valid Pod: {error}")),
        };
        let mut response = response;
        if let Some(warning) = inject::unknown_inject_value(&pod) {
            // Shown by kubectl; the value is ignored, as if unset.
            response.warnings = Some(vec![warning]);
        }
        if let Err(skip) = inject::decide(&pod, &namespace, namespace_enabled, &self.config) {
            debug!(reason = %skip, "not injected");
            return response;
        }
        let patch = match inject::patch(&pod, &self.config, self.native) {
            Ok(patch) => patch,
            Err(error) => {
                info!(%error, "injection denied");
                return response.deny(format!("bulwark cannot inject this pod: {error}"));
            }
        };
        match response.clone().with_patch(patch) {
            Ok(patched) => {
                info!(native = self.native, "agent injected");
                patched
            }
            Err(error) => response.deny(format!("cannot encode the patch: {error}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sidecars_from_the_api_server_version() {
        let auto = SidecarMode::Auto;
        assert_eq!(native_sidecars(auto, "1", "29"), Some(true));
        assert_eq!(native_sidecars(auto, "1", "31+"), Some(true));
        assert_eq!(native_sidecars(auto, "1", "28"), Some(false));
        assert_eq!(native_sidecars(auto, "2", "0"), Some(true));
        assert_eq!(native_sidecars(auto, "", "x"), None);
        assert_eq!(
            native_sidecars(SidecarMode::Container, "1", "31"),
            Some(false)
        );
        assert_eq!(native_sidecars(SidecarMode::Native, "1", "20"), Some(true));
    }
}
