//! Workload identity on the Kubernetes source, as the chart runs it: the control plane
//! checks agents' tokens with TokenReviews against the in-test API server (which
//! answers them as a real one does), and writes the mesh's trust anchors into every
//! namespace's `bulwark-trust-anchors` ConfigMap, from which the agent verifies it. An
//! agent whose projected token the API server vouches for gets its certificate and its
//! config; a forged token, a token for another audience, a token of a deleted pod or
//! one claiming another pod get nothing. A rotated anchor bundle reaches every
//! namespace. Every call is one the chart's RBAC allows, and every identity rule is used.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bulwark_agent::Agent;
use bulwark_agent::identity::channel;
use bulwark_agent::identity::client::{Claims, GrpcCertifier};
use bulwark_agent::identity::credentials::PendingKey;
use bulwark_agent::identity::renewal::Certifier as _;
use bulwark_control_plane::ControlPlane;
use bulwark_control_plane::crds::IDENTITY_RBAC_RULES;
use bulwark_control_plane::identity::IdentitySettings;
use bulwark_control_plane::identity::authority::{Authority, DEFAULT_LIFETIME};
use bulwark_control_plane::identity::token::TokenReviewer;
use bulwark_control_plane::source::kubernetes::{GATEWAY_API_RECHECK, client_from};
use bulwark_control_plane::webhook::anchors::{
    AnchorSync, TRUST_ANCHORS_CONFIGMAP, TRUST_ANCHORS_KEY, certificates_pem,
};
use bulwark_tests::apiserver::{ApiServer, CONTROL_PLANE_NAMESPACE, Recorded, rbac_allows};
use bulwark_tests::harness::{agent_settings, kubernetes_control_plane_settings};
use bulwark_tests::mesh::NAMESPACE;
use bulwark_tests::poll_until;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::Value;

/// Generous: the machine is loaded, and watches back off.
const DEADLINE: Duration = Duration::from_secs(30);

fn pod(name: &str, service_account: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {app}}}, \
         annotations: {{bulwark.io/injected: 0.1.0}}}}\n\
         spec: {{serviceAccountName: {service_account}}}\n"
    )
}

/// A cluster with namespaces, the `reviews` Service and the pods `frontend-0` and
/// `frontend-1` (service account `frontend`) and `payments-0`.
async fn cluster() -> ApiServer {
    let server = ApiServer::start().await;
    for ns in [NAMESPACE, "default", "kube-system", CONTROL_PLANE_NAMESPACE] {
        server.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
        ));
    }
    server.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: {NAMESPACE}}}\n\
         spec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
    ));
    server.apply(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: reviews-abcde, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: reviews}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n  - addresses: ['127.0.0.31']\n    conditions: {{ready: true}}\n"
    ));
    server.apply(&pod("frontend-0", "frontend", "frontend"));
    server.apply(&pod("frontend-1", "frontend", "frontend"));
    server.apply(&pod("payments-0", "payments", "payments"));
    server
}

/// The control plane as the chart runs it: the Kubernetes source, identity with
/// TokenReviews, and the trust-anchor ConfigMaps.
struct Running {
    server: ApiServer,
    cp: ControlPlane,
    _anchors: AnchorSync,
    dir: tempfile::TempDir,
}

async fn start() -> Running {
    let server = cluster().await;
    let kubeconfig = server.kubeconfig("bulwark-control-plane");
    let authority = Arc::new(
        Authority::generate("cluster.local", DEFAULT_LIFETIME).expect("setting up the test"),
    );
    let client = client_from(Some(&kubeconfig))
        .await
        .expect("setting up the test");
    let mut settings =
        kubernetes_control_plane_settings(kubeconfig, "cp-identity", GATEWAY_API_RECHECK);
    settings.identity = Some(IdentitySettings {
        authority: Arc::clone(&authority),
        reviewer: TokenReviewer::Kubernetes(client.clone()),
        serving_names: vec!["localhost".into(), "127.0.0.1".into()],
    });
    let cp = ControlPlane::start(settings)
        .await
        .expect("the control plane starts with identity on Kubernetes");
    let excluded = BTreeSet::from([CONTROL_PLANE_NAMESPACE.to_owned(), "kube-system".to_owned()]);
    let anchors = AnchorSync::spawn(
        client,
        Arc::clone(&authority),
        excluded,
        Duration::from_millis(100),
    );
    Running {
        server,
        cp,
        _anchors: anchors,
        dir: tempfile::tempdir().expect("setting up the test"),
    }
}

/// The PEM of the trust-anchor ConfigMap in `namespace`, once it is there.
async fn anchors_in(server: &ApiServer, namespace: &str) -> String {
    poll_until(
        DEADLINE,
        &format!("the trust anchors in {namespace}"),
        || async {
            server
                .get("ConfigMap", namespace, TRUST_ANCHORS_CONFIGMAP)
                .and_then(|c| c["data"][TRUST_ANCHORS_KEY].as_str().map(str::to_owned))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

impl Running {
    /// Writes `text` into the test folder, as the kubelet writes a projected file.
    fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("writing a test file");
        path
    }

    /// A real agent of `pod` (service account `frontend`) presenting `token`, with the
    /// anchors of its namespace's ConfigMap.
    async fn agent(&self, pod: &str, token: &str) -> Agent {
        let anchors = anchors_in(&self.server, NAMESPACE).await;
        let mut settings = agent_settings(self.cp.grpc_addr(), "frontend", None);
        settings.identity.pod_name = pod.to_owned();
        settings.control_plane = format!("https://127.0.0.1:{}", self.cp.grpc_addr().port());
        settings.control_plane_ca = Some(self.file("ca.crt", &anchors));
        settings.token_file = Some(self.file(&format!("{pod}.token"), token));
        Agent::start(settings).await.expect("the agent starts")
    }

    /// Asks for a certificate as `pod` of service account `frontend` with `token`.
    async fn certify(&self, token: &str, pod: &str) -> Result<String, String> {
        let anchors: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(anchors_in(&self.server, NAMESPACE).await.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
        let channel = channel::connect(
            &format!("https://127.0.0.1:{}", self.cp.grpc_addr().port()),
            Some(&anchors),
        )
        .map_err(|e| e.to_string())?;
        let certifier = GrpcCertifier::new(
            channel,
            self.file(&format!("{pod}.certify-token"), token),
            Claims {
                namespace: NAMESPACE.into(),
                pod_name: pod.into(),
                service_account: "frontend".into(),
            },
        );
        let key = PendingKey::generate().map_err(|e| e.to_string())?;
        certifier
            .certify(key.csr_der().to_vec())
            .await
            .map(|signed| signed.spiffe_id)
            .map_err(|e| e.0)
    }
}

async fn admin_json(agent: &Agent, path: &str) -> Option<(u16, Value)> {
    let response = bulwark_tests::client::get(agent.admin_addr(), path, &[])
        .await
        .ok()?;
    Some((
        response.status.as_u16(),
        response.json().unwrap_or(Value::Null),
    ))
}

/// Panics unless the chart's RBAC allows every request, and every identity rule was used.
fn assert_identity_rbac(requests: &[Recorded]) {
    for r in requests {
        assert!(rbac_allows(r), "{r:?} is not allowed by the chart's RBAC");
    }
    for rule in IDENTITY_RBAC_RULES {
        for resource in rule.resources {
            for verb in rule.verbs {
                assert!(
                    requests
                        .iter()
                        .any(|r| rule.api_groups.contains(&r.group.as_str())
                            && r.resource == *resource
                            && r.verb == *verb
                            && (rule.resource_names.is_empty()
                                || r.name
                                    .as_deref()
                                    .is_some_and(|n| rule.resource_names.contains(&n)))),
                    "the identity rules grant {verb} on {resource}, which the control plane never used"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_token_the_api_server_vouches_for_gets_its_certificate_and_config() {
    let running = start().await;
    let token =
        running
            .server
            .create_token(NAMESPACE, "frontend", Some("frontend-0"), &["bulwark"]);
    let agent = running.agent("frontend-0", &token).await;
    let config = poll_until(
        DEADLINE,
        "the agent has its certificate and its config",
        || async {
            let (ready, _) = admin_json(&agent, "/ready").await?;
            let (_, config) = admin_json(&agent, "/config").await?;
            let has_reviews = config["config"]["destinations"]
                .as_array()?
                .iter()
                .any(|d| d["name"] == format!("reviews.{NAMESPACE}:80"));
            (ready == 200 && has_reviews && config["identity"]["spiffeId"].is_string())
                .then_some(config)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config["identity"]["spiffeId"],
        format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/frontend")
    );
    assert!(
        !config.to_string().contains(&token),
        "the token is not on /config"
    );

    // The control plane asked the API server, for our audience only.
    let requests = running.server.requests();
    let reviews: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.resource == "tokenreviews")
        .collect();
    assert!(!reviews.is_empty(), "no TokenReview was made");
    for review in &reviews {
        let spec = &review.body.as_ref().expect("a TokenReview has a body")["spec"];
        assert_eq!(spec["audiences"], serde_json::json!(["bulwark"]));
        assert_eq!(spec["token"], token.as_str());
        assert_eq!(
            review.token.as_deref(),
            Some("bulwark-control-plane"),
            "with the control plane's own credentials"
        );
    }
    // The anchors went to every namespace but the control plane's and kube-system.
    for ns in [NAMESPACE, "default"] {
        let pem = anchors_in(&running.server, ns).await;
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    }
    for ns in [CONTROL_PLANE_NAMESPACE, "kube-system"] {
        assert!(
            running
                .server
                .get("ConfigMap", ns, TRUST_ANCHORS_CONFIGMAP)
                .is_none(),
            "anchors written to {ns}"
        );
    }
    assert_identity_rbac(&running.server.requests());
    agent.shutdown().await;
    running.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_and_stale_tokens_get_nothing() {
    let running = start().await;
    let server = &running.server;
    let valid = server.create_token(NAMESPACE, "frontend", Some("frontend-0"), &["bulwark"]);
    assert_eq!(
        running.certify(&valid, "frontend-0").await.as_deref(),
        Ok(format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/frontend").as_str())
    );

    let forged = "eyJhbGciOiJSUzI1NiJ9.forged.signature";
    let error = running.certify(forged, "frontend-0").await.unwrap_err();
    assert!(
        error.contains("Unauthenticated") && error.contains("invalid bearer token"),
        "{error}"
    );
    // A token for the API server (kubectl create token without --audience) is no
    // token for the mesh: a leaked API token cannot become a mesh identity.
    let api_token = server.create_token(NAMESPACE, "frontend", Some("frontend-0"), &[]);
    let error = running.certify(&api_token, "frontend-0").await.unwrap_err();
    assert!(
        error.contains("Unauthenticated") && error.contains("target audiences"),
        "{error}"
    );
    // A valid token of frontend-0 claiming frontend-1, of the same service account.
    let error = running.certify(&valid, "frontend-1").await.unwrap_err();
    assert!(
        error.contains("PermissionDenied") && error.contains("bound to pod"),
        "{error}"
    );
    // Another service account's token claiming frontend.
    let payments = server.create_token(NAMESPACE, "payments", Some("payments-0"), &["bulwark"]);
    let error = running.certify(&payments, "payments-0").await.unwrap_err();
    assert!(error.contains("PermissionDenied"), "{error}");
    // The pod a token is bound to is gone: the token is too.
    let stale = server.create_token(NAMESPACE, "frontend", Some("frontend-1"), &["bulwark"]);
    assert!(server.delete("Pod", NAMESPACE, "frontend-1"));
    let error = running.certify(&stale, "frontend-1").await.unwrap_err();
    assert!(
        error.contains("Unauthenticated") && error.contains("invalidated"),
        "{error}"
    );

    // A real agent with a forged token gets neither certificate nor config.
    let agent = running.agent("frontend-0", forged).await;
    let error = poll_until(
        DEADLINE,
        "the agent's certificate request is refused",
        || async {
            let (_, config) = admin_json(&agent, "/config").await?;
            config["identity"]["lastError"].as_str().map(str::to_owned)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(error.contains("Unauthenticated"), "{error}");
    let (ready, config) = admin_json(&agent, "/config")
        .await
        .expect("/config answers");
    assert!(
        config["config"]["destinations"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{ready}: {config}"
    );
    assert_eq!(admin_json(&agent, "/ready").await.map(|r| r.0), Some(503));
    let metrics = bulwark_tests::Metrics::scrape(running.cp.admin_addr())
        .await
        .expect("the control plane's metrics");
    assert!(
        metrics.get(
            "bulwark_cp_identity_refusals_total",
            &[("request", "discovery"), ("reason", "unauthenticated")]
        ) >= 1.0
    );
    assert_eq!(
        metrics.get(
            "bulwark_cp_identity_refusals_total",
            &[("request", "certificate"), ("reason", "mismatch")]
        ),
        2.0
    );
    agent.shutdown().await;
    running.cp.shutdown().await;
}

/// An issuer folder as cert-manager writes it: `tls.crt`, `tls.key` (PKCS#8), `ca.crt`.
fn write_issuer(dir: &Path, name: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("generating a test issuer");
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).expect("generating a test issuer");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("generating a test issuer");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("writing a test issuer");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("writing a test issuer");
    std::fs::write(dir.join("ca.crt"), cert.pem()).expect("writing a test issuer");
    cert.pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_anchor_bundle_reaches_every_namespace() {
    let server = cluster().await;
    let dir = tempfile::tempdir().expect("setting up the test");
    let old = write_issuer(dir.path(), "old");
    let authority = Arc::new(
        Authority::load(dir.path(), "cluster.local", DEFAULT_LIFETIME)
            .expect("the issuer folder loads"),
    );
    let client = client_from(Some(&server.kubeconfig("bulwark-control-plane")))
        .await
        .expect("setting up the test");
    let _sync = AnchorSync::spawn(
        client,
        Arc::clone(&authority),
        BTreeSet::from(["kube-system".to_owned()]),
        Duration::from_millis(100),
    );
    assert_eq!(anchors_in(&server, NAMESPACE).await, old);
    assert_eq!(anchors_in(&server, "default").await, old);
    // A namespace made later gets them too.
    server.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n");
    assert_eq!(anchors_in(&server, "late").await, old);

    // 1. Both anchors in ca.crt (the Secret updated by cert-manager or kubectl).
    let other = tempfile::tempdir().expect("setting up the test");
    let new = write_issuer(other.path(), "new");
    std::fs::write(dir.path().join("ca.crt"), format!("{old}{new}")).expect("rotating");
    assert!(authority.reload().expect("the bundle loads"));
    let bundle = certificates_pem(&authority.anchors());
    for ns in [NAMESPACE, "default", "late"] {
        poll_until(DEADLINE, &format!("both anchors in {ns}"), || async {
            (anchors_in(&server, ns).await == bundle).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // 2. The old anchor goes.
    for file in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::copy(other.path().join(file), dir.path().join(file)).expect("rotating");
    }
    assert!(authority.reload().expect("the new issuer loads"));
    for ns in [NAMESPACE, "default", "late"] {
        poll_until(
            DEADLINE,
            &format!("only the new anchor in {ns}"),
            || async { (anchors_in(&server, ns).await == new).then_some(()) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        server
            .get("ConfigMap", "kube-system", TRUST_ANCHORS_CONFIGMAP)
            .is_none()
    );
    let labels = &server
        .get("ConfigMap", "default", TRUST_ANCHORS_CONFIGMAP)
        .expect("the ConfigMap")["metadata"]["labels"];
    assert_eq!(
        labels["app.kubernetes.io/managed-by"],
        "bulwark-control-plane"
    );
    for r in server.requests() {
        assert!(rbac_allows(&r), "{r:?} is not allowed by the chart's RBAC");
        assert!(
            !(r.resource == "configmaps" && matches!(r.verb.as_str(), "get" | "list" | "watch")),
            "the control plane never reads ConfigMaps: {r:?}"
        );
    }
}
