//! The injection webhook end to end: real AdmissionReviews over HTTPS to the running
//! webhook, the returned JSON patch applied to the pod, and the result checked.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bulwark_control_plane::webhook::config::{IdentityInjection, RateLimitStoreInjection};
use bulwark_control_plane::webhook::inject::{IDENTITY_DIR, IDENTITY_VOLUME};
use bulwark_control_plane::webhook::{self, InjectConfig, SidecarMode, Webhook};
use bulwark_tests::eventually_named;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Pod};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const IMAGE: &str = "ghcr.io/bulwark-mesh/agent:0.1.0";
const CP_ADDR: &str = "http://bulwark-control-plane.bulwark.svc:9990";
const CP_NAMESPACE: &str = "bulwark";
/// The control plane's address with identity on (the chart's default).
const CP_TLS_ADDR: &str = "https://bulwark-control-plane.bulwark.svc:9990";

/// A CA and a serving certificate for `localhost`, written as `tls.crt`/`tls.key`.
/// Returns the CA's PEM.
fn write_certs(dir: &Path) -> String {
    let ca_key = rcgen::KeyPair::generate().expect("generating test certificates");
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).expect("generating test certificates");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bulwark-webhook-ca");
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .expect("generating test certificates");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("generating test certificates");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("generating test certificates");
    let cert = params
        .signed_by(&key, &issuer)
        .expect("generating test certificates");
    std::fs::write(dir.join("tls.crt.tmp"), cert.pem()).expect("generating test certificates");
    std::fs::write(dir.join("tls.key.tmp"), key.serialize_pem())
        .expect("generating test certificates");
    std::fs::rename(dir.join("tls.key.tmp"), dir.join("tls.key"))
        .expect("generating test certificates");
    std::fs::rename(dir.join("tls.crt.tmp"), dir.join("tls.crt"))
        .expect("generating test certificates");
    ca_cert.pem()
}

struct Running {
    webhook: Webhook,
    ca: String,
    dir: TempDir,
}

async fn start(native: bool, configure: impl FnOnce(&mut InjectConfig)) -> Running {
    let dir = tempfile::tempdir().expect("starting the webhook under test");
    let ca = write_certs(dir.path());
    let mut inject = InjectConfig::new(IMAGE, CP_ADDR, CP_NAMESPACE);
    inject.version = "0.1.0".to_owned();
    configure(&mut inject);
    let webhook = Webhook::start(webhook::Settings {
        addr: "127.0.0.1:0"
            .parse()
            .expect("starting the webhook under test"),
        cert_dir: dir.path().to_owned(),
        cert_reload: Duration::from_millis(100),
        inject,
        native,
    })
    .await
    .expect("the webhook starts with a test certificate");
    Running { webhook, ca, dir }
}

/// Sends one HTTPS request trusting only `ca`; the status and the body.
async fn send(
    addr: SocketAddr,
    ca: &str,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots
            .add(cert.expect("building the test request"))
            .expect("building the test request");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        // rustls's own defaults, as a client that is not ours (the API server) would offer.
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("aws-lc-rs supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::try_from("localhost").expect("building the test request"),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a well-formed request");
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("building the test request")
        .to_bytes();
    Ok((status, body))
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/webhook")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("reading a webhook fixture");
    serde_yaml_ng::from_str(&text).expect("reading a webhook fixture")
}

fn review(pod: &Value, namespace: &str, operation: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"].as_str().unwrap_or(""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// The webhook's answer to a review of `pod`.
async fn admit(running: &Running, pod: &Value, namespace: &str, labelled: bool) -> Value {
    let path = if labelled {
        webhook::ENABLED_NAMESPACE_PATH
    } else {
        webhook::PATH
    };
    let body = serde_json::to_vec(&review(pod, namespace, "CREATE")).expect("a review serializes");
    let (status, body) = send(
        running.webhook.addr(),
        &running.ca,
        Method::POST,
        path,
        body,
    )
    .await
    .expect("the webhook answers over HTTPS");
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let review: Value = serde_json::from_slice(&body).expect("the webhook answers a review");
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let response = review["response"].clone();
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    response
}

/// Applies the response's patch to `pod`; the injected pod, checked to be a valid Pod.
fn apply(pod: &Value, response: &Value) -> (Value, Pod) {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let encoded = response["patch"]
        .as_str()
        .expect("the webhook returns a valid JSON patch for a valid Pod");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("the patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes)
        .expect("the webhook returns a valid JSON patch for a valid Pod");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch)
        .expect("the webhook returns a valid JSON patch for a valid Pod");
    let typed: Pod = serde_json::from_value(patched.clone())
        .expect("the webhook returns a valid JSON patch for a valid Pod");
    (patched, typed)
}

fn no_patch(response: &Value) {
    assert_eq!(response["allowed"], true, "{response}");
    assert!(
        response.get("patch").is_none(),
        "unexpected patch: {response}"
    );
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a k8s_openapi::api::core::v1::EnvVar> {
    container.env.iter().flatten().find(|e| e.name == name)
}

fn env_value(container: &Container, name: &str) -> Option<String> {
    env(container, name).and_then(|e| e.value.clone())
}

#[tokio::test]
async fn a_plain_pod_in_a_labelled_namespace_gets_the_init_container_and_a_native_agent() {
    let running = start(true, |_| {}).await;
    let pod = fixture("plain.yaml");
    let response = admit(&running, &pod, "shop", true).await;
    let (patched, typed) = apply(&pod, &response);
    let spec = typed.spec.as_ref().unwrap();

    let inits = spec.init_containers.as_ref().unwrap();
    let names: Vec<_> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["bulwark-init", "bulwark-agent"]);

    let init = &inits[0];
    assert_eq!(init.image.as_deref(), Some(IMAGE));
    let args = init.args.as_ref().unwrap();
    assert_eq!(args[0], "init");
    for arg in [
        "--agent-uid=1337",
        "--agent-gid=1337",
        "--outbound-port=4140",
        "--inbound-port=4143",
        "--agent-ports=4191",
        "--ipv6=false",
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg} missing from {args:?}");
    }
    let sc = init.security_context.as_ref().unwrap();
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..])
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_user, Some(0));
    assert!(
        init.env.is_none(),
        "no exclusions were asked for: {:?}",
        init.env
    );
    assert_eq!(init.volume_mounts.as_ref().unwrap()[0].mount_path, "/run");

    let agent = &inits[1];
    assert_eq!(agent.restart_policy.as_deref(), Some("Always"));
    assert!(agent.lifecycle.is_none());
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(1337));
    assert_eq!(sc.run_as_group, Some(1337));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().unwrap().add, None);
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    let probe = agent
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/ready"));
    assert_eq!(
        patched["spec"]["initContainers"][1]["readinessProbe"]["httpGet"]["port"],
        4191
    );
    assert_eq!(
        env_value(agent, "BULWARK_CONTROL_PLANE").as_deref(),
        Some(CP_ADDR)
    );
    assert_eq!(
        env_value(agent, "BULWARK_ADMIN_ADDR").as_deref(),
        Some("0.0.0.0:4191")
    );
    assert_eq!(
        env_value(agent, "BULWARK_INBOUND_TRANSPARENT").as_deref(),
        Some("0.0.0.0:4143")
    );
    assert_eq!(
        env_value(agent, "BULWARK_OUTBOUND_ADDR").as_deref(),
        Some("127.0.0.1:4140")
    );
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        let field = env(agent, name)
            .unwrap()
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref();
        assert_eq!(field.unwrap().field_path, path, "{name}");
    }
    assert_eq!(
        agent.args.as_deref().unwrap(),
        ["--label=app=web", "--label=pod-template-hash=7d9f8b6c5"]
    );

    // The app is untouched, and the pod records the injection.
    assert_eq!(patched["spec"]["containers"], pod["spec"]["containers"]);
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({"bulwark.io/injected": "0.1.0"})
    );
    let volumes = spec.volumes.as_ref().unwrap();
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0].name, "bulwark-init-run");
    assert!(volumes[0].empty_dir.is_some());
    // Without identity: no token, no anchors, plaintext.
    assert!(env(agent, "BULWARK_TOKEN_FILE").is_none());
    assert!(agent.volume_mounts.is_none());
}

/// The names of the pod's volumes, in order.
fn volume_names(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<&str> {
    spec.volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect()
}

/// The settings the chart renders by default: identity on, an `https://` control plane.
fn with_identity(config: &mut InjectConfig) {
    config.control_plane_address = CP_TLS_ADDR.to_owned();
    config.identity = Some(IdentityInjection::default());
}

/// What the agent of an identity-injected pod must have: the control plane over TLS,
/// the anchors and token files of its projected volume, mounted read-only.
fn assert_identity_wiring(agent: &Container) {
    assert_eq!(
        env_value(agent, "BULWARK_CONTROL_PLANE").as_deref(),
        Some(CP_TLS_ADDR)
    );
    assert_eq!(
        env_value(agent, "BULWARK_TOKEN_FILE").as_deref(),
        Some(bulwark_agent::identity::client::DEFAULT_TOKEN_PATH),
        "where the agent looks by default"
    );
    assert_eq!(
        env_value(agent, "BULWARK_CONTROL_PLANE_CA").as_deref(),
        Some("/var/run/secrets/bulwark.io/serviceaccount/ca.crt")
    );
    let mounts = agent
        .volume_mounts
        .as_ref()
        .expect("the agent mounts its identity");
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].name, IDENTITY_VOLUME);
    assert_eq!(mounts[0].mount_path, IDENTITY_DIR);
    assert_eq!(mounts[0].read_only, Some(true));
    assert_eq!(
        mounts[0].sub_path, None,
        "a subPath mount would never be updated"
    );
}

#[tokio::test]
async fn with_identity_the_agent_gets_a_projected_token_and_the_trust_anchors() {
    let running = start(true, with_identity).await;
    let pod = fixture("no-automount.yaml");
    let (patched, typed) = apply(&pod, &admit(&running, &pod, "shop", true).await);
    let spec = typed.spec.as_ref().unwrap();
    let inits = spec.init_containers.as_ref().unwrap();
    assert_eq!(inits[1].name, "bulwark-agent");
    assert_identity_wiring(&inits[1]);
    // Only the agent sees the token: not the init container, not the app.
    assert_eq!(inits[0].volume_mounts.as_ref().unwrap().len(), 1);
    assert_eq!(patched["spec"]["containers"], pod["spec"]["containers"]);
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(
        patched["spec"]["volumes"],
        json!([
            {"name": "bulwark-init-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": "bulwark-identity", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "bulwark", "expirationSeconds": 3600, "path": "token"}},
                {"configMap": {"name": "bulwark-trust-anchors", "items": [{"key": "ca.crt", "path": "ca.crt"}], "optional": false}}
            ]}}
        ])
    );
}

#[tokio::test]
async fn the_agent_gets_the_rate_limit_store_and_its_credentials_from_the_namespaces_secret() {
    let running = start(true, |config| {
        config.rate_limit_store = Some(RateLimitStoreInjection {
            url: "rediss://redis.mesh.svc:6380".into(),
            secret_name: Some("redis-auth".into()),
            password_key: "password".into(),
            username_key: "username".into(),
        });
    })
    .await;
    let pod = fixture("plain.yaml");
    let (_, typed) = apply(&pod, &admit(&running, &pod, "shop", true).await);
    let inits = typed
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .clone()
        .unwrap();
    let agent = &inits[1];
    assert_eq!(
        env_value(agent, "BULWARK_RATE_LIMIT_STORE_URL").as_deref(),
        Some("rediss://redis.mesh.svc:6380")
    );
    for (name, key) in [
        ("BULWARK_RATE_LIMIT_STORE_PASSWORD", "password"),
        ("BULWARK_RATE_LIMIT_STORE_USERNAME", "username"),
    ] {
        let var = env(agent, name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(var.value, None, "never the value itself in the pod spec");
        let secret = var
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("redis-auth", key)
        );
        assert_eq!(
            secret.optional,
            Some(true),
            "a namespace without it still starts pods"
        );
    }
}

#[tokio::test]
async fn with_identity_in_container_mode_the_first_container_gets_them_after_the_pods_volumes() {
    let running = start(false, |config| {
        with_identity(config);
        config.sidecar_mode = SidecarMode::Container;
        config.identity = Some(IdentityInjection {
            token_expiration_seconds: 600,
        });
    })
    .await;
    let pod = fixture("init-containers.yaml");
    let (patched, typed) = apply(&pod, &admit(&running, &pod, "storage", true).await);
    let spec = typed.spec.as_ref().unwrap();
    assert_eq!(spec.containers[0].name, "bulwark-agent");
    assert_identity_wiring(&spec.containers[0]);
    assert_eq!(
        volume_names(spec),
        ["data", "bulwark-init-run", "bulwark-identity"]
    );
    assert_eq!(
        patched["spec"]["volumes"][2]["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
        600
    );
    assert_eq!(
        patched["spec"]["containers"][1],
        pod["spec"]["containers"][0]
    );
}

#[tokio::test]
async fn a_pod_with_init_containers_and_volumes_keeps_them_after_the_agent() {
    let running = start(true, |_| {}).await;
    let pod = fixture("init-containers.yaml");
    let response = admit(&running, &pod, "storage", true).await;
    let (patched, typed) = apply(&pod, &response);
    let spec = typed.spec.as_ref().unwrap();
    let names: Vec<_> = spec
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    // The agent runs before the app's init containers, so they reach the mesh too.
    assert_eq!(names, ["bulwark-init", "bulwark-agent", "migrate"]);
    assert_eq!(
        patched["spec"]["initContainers"][2],
        pod["spec"]["initContainers"][0]
    );
    assert_eq!(volume_names(spec), ["data", "bulwark-init-run"]);
    // The pod's own security context and annotations stay; the record is added.
    assert_eq!(
        patched["spec"]["securityContext"],
        pod["spec"]["securityContext"]
    );
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({"team": "storage", "bulwark.io/injected": "0.1.0"})
    );
    assert_eq!(patched["spec"]["containers"], pod["spec"]["containers"]);
}

#[tokio::test]
async fn an_annotated_pod_is_injected_in_a_namespace_without_the_label_with_its_exclusions() {
    let running = start(true, |config| {
        config.skip_outbound_cidrs = vec!["169.254.169.254/32".to_owned()];
    })
    .await;
    let pod = fixture("annotated.yaml");
    let response = admit(&running, &pod, "payments", false).await;
    let (_, typed) = apply(&pod, &response);
    let inits = typed
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .clone()
        .unwrap();
    let init = &inits[0];
    assert_eq!(
        env_value(init, "BULWARK_EXCLUDE_INBOUND_PORTS").as_deref(),
        Some("9090,9091")
    );
    assert_eq!(
        env_value(init, "BULWARK_EXCLUDE_OUTBOUND_PORTS").as_deref(),
        Some("5432")
    );
    assert_eq!(
        env_value(init, "BULWARK_EXCLUDE_OUTBOUND_CIDRS").as_deref(),
        Some("10.96.0.1/32,fd00::/8,169.254.169.254/32")
    );
    let limits = inits[1]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(limits["memory"].0, "256Mi");
    // No CPU limit of two cores or more: the agent keeps its one worker thread.
    assert_eq!(env_value(&inits[1], "BULWARK_WORKER_THREADS"), None);
    let mut busy = pod.clone();
    busy["metadata"]["annotations"]["bulwark.io/agent-cpu-limit"] = json!("2500m");
    let (_, typed) = apply(&busy, &admit(&running, &busy, "payments", false).await);
    let agent = &typed
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()[1];
    assert_eq!(
        env_value(agent, "BULWARK_WORKER_THREADS").as_deref(),
        Some("2")
    );

    // The same pod without the annotation is left alone there.
    let mut plain = pod.clone();
    plain["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("bulwark.io/inject");
    no_patch(&admit(&running, &plain, "payments", false).await);
}

#[tokio::test]
async fn opted_out_injected_and_host_network_pods_are_left_alone() {
    let running = start(true, |_| {}).await;
    for name in ["opted-out.yaml", "injected.yaml", "host-network.yaml"] {
        let response = admit(&running, &fixture(name), "shop", true).await;
        no_patch(&response);
    }
    // A pod that went through the webhook once is not injected twice.
    let pod = fixture("plain.yaml");
    let (once, _) = apply(&pod, &admit(&running, &pod, "shop", true).await);
    no_patch(&admit(&running, &once, "shop", true).await);
    // Nor is one carrying the agent without the record.
    let mut stripped = once.clone();
    stripped["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    no_patch(&admit(&running, &stripped, "shop", true).await);
}

#[tokio::test]
async fn pods_in_kube_system_and_the_control_planes_namespace_are_never_injected() {
    let running = start(true, |_| {}).await;
    let mut pod = fixture("plain.yaml");
    pod["metadata"]["annotations"] = json!({"bulwark.io/inject": "enabled"});
    for namespace in ["kube-system", CP_NAMESPACE] {
        no_patch(&admit(&running, &pod, namespace, true).await);
    }
    let (_, typed) = apply(&pod, &admit(&running, &pod, "default", false).await);
    assert!(typed.spec.unwrap().init_containers.is_some());
}

#[tokio::test]
async fn without_native_sidecars_the_agent_is_the_first_container_and_holds_the_app_back() {
    let running = start(false, |config| config.sidecar_mode = SidecarMode::Container).await;
    let pod = fixture("init-containers.yaml");
    let (patched, typed) = apply(&pod, &admit(&running, &pod, "storage", true).await);
    let spec = typed.spec.as_ref().unwrap();
    let inits: Vec<_> = spec
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(inits, ["bulwark-init", "migrate"]);
    let containers: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(containers, ["bulwark-agent", "db"]);
    let agent = &spec.containers[0];
    assert_eq!(agent.restart_policy, None);
    let hook = agent
        .lifecycle
        .as_ref()
        .unwrap()
        .post_start
        .as_ref()
        .unwrap();
    let command = hook.exec.as_ref().unwrap().command.as_ref().unwrap();
    assert_eq!(
        command[..2],
        ["bulwark-agent".to_owned(), "wait-ready".to_owned()]
    );
    assert_eq!(
        patched["spec"]["containers"][1],
        pod["spec"]["containers"][0]
    );
}

#[tokio::test]
async fn a_bad_annotation_denies_the_pod_with_the_reason() {
    let running = start(true, |_| {}).await;
    let response = admit(&running, &fixture("bad-annotation.yaml"), "shop", false).await;
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("bulwark.io/skip-inbound-ports"),
        "{message}"
    );
    assert!(message.contains("\"http\" is not a port"), "{message}");

    let mut pod = fixture("annotated.yaml");
    pod["metadata"]["annotations"]["bulwark.io/agent-memory-limit"] = json!("lots");
    let response = admit(&running, &pod, "shop", false).await;
    assert_eq!(response["allowed"], false, "{response}");
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("agent-memory-limit")
    );
}

#[tokio::test]
async fn malformed_reviews_get_a_clear_error() {
    let running = start(true, |_| {}).await;
    let addr = running.webhook.addr();
    let post = |body: Vec<u8>| send(addr, &running.ca, Method::POST, "/inject", body);

    let (status, body) = post(b"{not json".to_vec()).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["allowed"], false);
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("not an admission.k8s.io/v1 AdmissionReview"),
        "{message}"
    );

    let (status, body) =
        post(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec())
            .await
            .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("has no request"));

    // A review whose object is not a Pod is denied, with the uid echoed.
    let mut broken = review_of(json!({"metadata": {"name": "x"}, "spec": {"containers": "web"}}));
    let (status, body) = post(serde_json::to_vec(&broken).unwrap()).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let response: Value = serde_json::from_slice::<Value>(&body).unwrap()["response"].clone();
    assert_eq!(response["allowed"], false);
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid Pod")
    );

    // An UPDATE is allowed unchanged.
    broken["request"]["operation"] = json!("UPDATE");
    broken["request"]["object"] = fixture("plain.yaml");
    let (status, body) = post(serde_json::to_vec(&broken).unwrap()).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    no_patch(&serde_json::from_slice::<Value>(&body).unwrap()["response"]);

    let (status, _) = send(addr, &running.ca, Method::GET, "/inject", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = send(addr, &running.ca, Method::POST, "/mutate", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The webhook still serves after all that.
    let pod = fixture("plain.yaml");
    apply(&pod, &admit(&running, &pod, "shop", true).await);
}

fn review_of(object: Value) -> Value {
    review(&object, "shop", "CREATE")
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let running = start(true, |_| {}).await;
    let addr = running.webhook.addr();
    let pod = fixture("plain.yaml");
    apply(&pod, &admit(&running, &pod, "shop", true).await);

    // A broken file keeps the last good certificate in use.
    std::fs::write(running.dir.path().join("tls.crt"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = send(addr, &running.ca, Method::GET, "/healthz", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    let new_ca = write_certs(running.dir.path());
    eventually_named(
        Duration::from_secs(30),
        "the new certificate is served",
        || {
            let new_ca = new_ca.clone();
            async move {
                send(addr, &new_ca, Method::GET, "/healthz", Vec::new())
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    assert!(
        send(addr, &running.ca, Method::GET, "/healthz", Vec::new())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn auto_mode_picks_native_sidecars_from_the_api_servers_version() {
    let api = bulwark_tests::apiserver::ApiServer::start().await;
    let url: http::Uri = format!("http://{}", api.addr()).parse().unwrap();
    let client = kube::Client::try_from(kube::Config::new(url)).unwrap();
    for (minor, native) in [("28", false), ("29", true), ("31+", true)] {
        api.set_version("1", minor);
        let detected = webhook::detect_native(SidecarMode::Auto, &client)
            .await
            .unwrap();
        assert_eq!(detected, native, "1.{minor}");
    }
    // A forced mode does not ask.
    api.set_version("1", "20");
    assert!(
        webhook::detect_native(SidecarMode::Native, &client)
            .await
            .unwrap()
    );
    api.set_version("1", "x");
    let error = webhook::detect_native(SidecarMode::Auto, &client)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("set Native or Container"),
        "{error}"
    );
}

/// Sends `pod`'s CREATE review to a webhook binary that is starting, until it answers.
async fn first_review(
    addr: SocketAddr,
    ca: &str,
    pod: &Value,
) -> Result<(StatusCode, Bytes), bulwark_tests::eventually::TimedOut> {
    let body = serde_json::to_vec(&review(pod, "shop", "CREATE")).expect("a review serialises");
    bulwark_tests::poll_until(
        Duration::from_secs(60),
        "the binary's webhook answers",
        || {
            let (ca, body) = (ca.to_owned(), body.clone());
            async move {
                send(
                    addr,
                    &ca,
                    Method::POST,
                    webhook::ENABLED_NAMESPACE_PATH,
                    body,
                )
                .await
                .ok()
            }
        },
    )
    .await
}

/// The `bulwark-control-plane` binary with the webhook flags: it serves reviews with the
/// settings file, and refuses a settings file with an unknown key, naming it.
#[tokio::test]
async fn the_binary_serves_the_webhook_from_its_flags() {
    let binary = bulwark_tests::netns::binary("bulwark-control-plane").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    std::fs::create_dir(&certs).unwrap();
    let ca = write_certs(&certs);
    let mesh = dir.path().join("mesh");
    std::fs::create_dir(&mesh).unwrap();
    let config = dir.path().join("inject.yaml");
    std::fs::write(
        &config,
        format!(
            "image: {IMAGE}\ncontrolPlaneAddress: {CP_ADDR}\ncontrolPlaneNamespace: {CP_NAMESPACE}\n\
             sidecarMode: Container\nversion: 0.1.0\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let spawn = |config: &Path| {
        tokio::process::Command::new(&binary)
            .arg(format!("--source=dir:{}", mesh.display()))
            .args(["--grpc-addr=127.0.0.1:0", "--admin-addr=127.0.0.1:0"])
            .arg(format!("--webhook-addr={addr}"))
            .arg(format!("--webhook-cert-dir={}", certs.display()))
            .arg(format!("--webhook-config={}", config.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let _child = spawn(&config);
    let pod = fixture("plain.yaml");
    let reply = first_review(addr, &ca, &pod).await.unwrap();
    let response: Value = serde_json::from_slice::<Value>(&reply.1).unwrap()["response"].clone();
    let (_, typed) = apply(&pod, &response);
    // sidecarMode: Container from the file: the agent is the first container.
    assert_eq!(typed.spec.unwrap().containers[0].name, "bulwark-agent");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "image: a\ncontrolPlaneAddress: b\ncontrolPlaneNamespace: c\nsidecarMod: Native\n",
    )
    .unwrap();
    let output = spawn(&bad).wait_with_output().await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sidecarMod"), "{stderr}");
}

#[tokio::test]
async fn an_unknown_inject_value_is_ignored_with_a_warning() {
    let running = start(true, |_| {}).await;
    let mut pod = fixture("plain.yaml");
    pod["metadata"]["annotations"] = json!({"bulwark.io/inject": "true"});
    let response = admit(&running, &pod, "shop", false).await;
    no_patch(&response);
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(warning.contains("\"true\" is neither"), "{warning}");
    // In a labelled namespace the namespace decides.
    let response = admit(&running, &pod, "shop", true).await;
    apply(&pod, &response);
    assert!(response["warnings"][0].is_string());
}

/// With `--source kubernetes:PATH` and sidecarMode Auto, the binary asks the API server's
/// version through that kubeconfig, with no KUBECONFIG and no ~/.kube/config to fall back
/// on; and its log, written to a file, carries no terminal colour codes.
#[tokio::test]
async fn the_binary_learns_the_version_through_its_source_kubeconfig() {
    let api = bulwark_tests::apiserver::ApiServer::start().await;
    api.set_version("1", "24");
    let kubeconfig = api.kubeconfig("bulwark-control-plane");
    let binary = bulwark_tests::netns::binary("bulwark-control-plane").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    std::fs::create_dir(&certs).unwrap();
    let ca = write_certs(&certs);
    let config = dir.path().join("inject.yaml");
    std::fs::write(
        &config,
        format!(
            "image: {IMAGE}\ncontrolPlaneAddress: {CP_ADDR}\ncontrolPlaneNamespace: {CP_NAMESPACE}\n\
             version: 0.1.0\n"
        ),
    )
    .unwrap();
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = dir.path().join("control-plane.log");
    let mut child = tokio::process::Command::new(&binary)
        .arg(format!("--source=kubernetes:{}", kubeconfig.display()))
        .args(["--grpc-addr=127.0.0.1:0", "--admin-addr=127.0.0.1:0"])
        .args(["--lease-namespace=bulwark-system", "--identity=cp-0"])
        .arg(format!("--webhook-addr={addr}"))
        .arg(format!("--webhook-cert-dir={}", certs.display()))
        .arg(format!("--webhook-config={}", config.display()))
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", dir.path())
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pod = fixture("plain.yaml");
    let reply = first_review(addr, &ca, &pod).await.unwrap_or_else(|e| {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("{e}\n{log}")
    });
    let response: Value = serde_json::from_slice::<Value>(&reply.1).unwrap()["response"].clone();
    let (_, typed) = apply(&pod, &response);
    // 1.24 has no native sidecars: the agent is an ordinary first container.
    assert_eq!(typed.spec.unwrap().containers[0].name, "bulwark-agent");
    // The API server serves no Gateway API: the control plane says so once, and the
    // client library's own complaint about the plain-text 404 is not logged.
    let text = bulwark_tests::poll_until(
        Duration::from_secs(60),
        "the control plane reports the Gateway API missing",
        || async {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("the Gateway API CRD of the kind is not installed"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    child.kill().await.unwrap();
    assert!(text.contains("INFO"), "the log has lines: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "no colour codes in a log file: {text:?}"
    );
    assert!(!text.contains("Unsuccessful data error parse"), "{text}");
}
