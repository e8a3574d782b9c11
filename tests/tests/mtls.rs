//! Mutual TLS between real agents on loopback: the frontend's agent originates mTLS
//! to the payments pod's agent (meshed: the injector's annotation, its ServiceAccount
//! `payments`), which terminates it and knows the caller is `frontend`, so an
//! AuthorizationPolicy that admits only `frontend` lets the meshed call through and
//! refuses a plaintext caller. Certificates come from the control plane over the real
//! identity path (token file, CSR, signed certificate). The trust anchor rotates under
//! steady traffic with no failed request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulwark_agent::Agent;
use bulwark_control_plane::identity::authority::Authority;
use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::CONFIG_DEADLINE;
use bulwark_tests::identity_mesh::{IdentityMesh, Pod, TRUST_DOMAIN};
use bulwark_tests::mesh::NAMESPACE;
use bulwark_tests::upstream::Reply;
use bulwark_tests::{Metrics, poll_until};

/// The pods of the tests: the caller, the protected pod and a workload with a valid
/// certificate of its own that no policy admits.
const FRONTEND: Pod = Pod {
    name: "frontend-0",
    service_account: "frontend",
    token: "frontend-0-token-0123456789abcdef",
};
const PAYMENTS: Pod = Pod {
    name: "payments-0",
    service_account: "payments",
    token: "payments-0-token-0123456789abcdef",
};
const INTRUDER: Pod = Pod {
    name: "intruder-0",
    service_account: "intruder",
    token: "intruder-0-token-0123456789abcdef",
};
const PODS: [Pod; 3] = [FRONTEND, PAYMENTS, INTRUDER];

async fn world() -> World {
    IdentityMesh::start(&PODS).await
}

async fn world_with(authority: Arc<Authority>, dir: tempfile::TempDir) -> World {
    IdentityMesh::start_with(authority, dir, &PODS).await
}

type World = IdentityMesh;

/// The payments side of the tests, over the shared identity mesh.
trait Payments {
    /// The payments Service whose one endpoint is `addr`, on Pod payments-0; `meshed`
    /// puts the injector's annotation on the pod. Only `frontend` may call it.
    fn payments(&self, addr: SocketAddr, meshed: bool);
}

impl Payments for World {
    /// The payments Service whose one endpoint is `addr`, on Pod payments-0; `meshed`
    /// puts the injector's annotation on the pod. Only `frontend` may call it. The
    /// Service's target port is the app's (what a pod's agent protects); the endpoint
    /// is where the agent in front of it listens (iptables would redirect in a pod).
    fn payments(&self, addr: SocketAddr, meshed: bool) {
        let app_port = self.app.addr().port();
        let annotations = if meshed {
            "{bulwark.io/injected: test}"
        } else {
            "{}"
        };
        let yaml = format!(
            "apiVersion: v1
kind: Service
metadata: {{name: payments, namespace: {NAMESPACE}}}
spec:
  selector: {{app: payments}}
  ports: [{{name: http, port: 80, targetPort: {app_port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: payments-1
  namespace: {NAMESPACE}
  labels: {{kubernetes.io/service-name: payments}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: [\"{ip}\"]
    targetRef: {{kind: Pod, name: payments-0, namespace: {NAMESPACE}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: payments-0
  namespace: {NAMESPACE}
  labels: {{app: payments}}
  annotations: {annotations}
spec: {{serviceAccountName: payments}}
status: {{podIP: \"{ip}\"}}
---
apiVersion: bulwark.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: payments, namespace: {NAMESPACE}}}
spec:
  targetRefs: [{{kind: Service, name: payments}}]
  rules:
    - from: [{{serviceAccount: frontend}}]
",
            port = addr.port(),
            ip = addr.ip(),
        );
        self.mesh.write("payments.yaml", &yaml).expect("mesh file");
    }
}

async fn ready(agent: &Agent) {
    let admin = HttpClient::direct(agent.admin_addr());
    poll_until(
        CONFIG_DEADLINE,
        "the agent has its config and certificate",
        || {
            let admin = admin.clone();
            async move {
                let config = admin.get("/config", &[]).await.ok()?;
                let json: serde_json::Value = config.json().ok()?;
                let ready = admin.get("/ready", &[]).await.ok()?.status == 200;
                (ready && json["identity"]["spiffeId"].is_string()).then_some(())
            }
        },
    )
    .await
    .expect("agent ready");
}

/// The frontend agent's `/config` entry of the payments endpoint, once it has one.
async fn payments_endpoint(frontend: &Agent) -> serde_json::Value {
    let admin = HttpClient::direct(frontend.admin_addr());
    poll_until(
        CONFIG_DEADLINE,
        "the frontend's agent knows payments",
        || {
            let admin = admin.clone();
            async move {
                let config: serde_json::Value =
                    admin.get("/config", &[]).await.ok()?.json().ok()?;
                config["config"]["destinations"]
                    .as_array()?
                    .iter()
                    .find(|d| d["name"] == "payments.test:80")
                    .map(|d| d["endpoints"][0].clone())
            }
        },
    )
    .await
    .expect("payments in the frontend's config")
}

/// Polls the frontend's outbound proxy until `http://payments/` gets `status` (once the
/// frontend's agent knows the destination: before, the call would pass through).
async fn call_payments(frontend: &Agent, status: u16) -> bulwark_tests::client::Response {
    payments_endpoint(frontend).await;
    let client = HttpClient::proxy(frontend.outbound_addr()).with_timeout(Duration::from_secs(5));
    let url = format!("http://payments.{NAMESPACE}/");
    poll_until(
        CONFIG_DEADLINE,
        &format!("payments answers {status} through the frontend's agent"),
        || {
            let client = client.clone();
            let url = url.clone();
            async move {
                client
                    .get(&url, &[])
                    .await
                    .ok()
                    .filter(|r| r.status.as_u16() == status)
            }
        },
    )
    .await
    .expect("payments answers")
}

fn tls_metric(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics.get(name, labels)
}

#[tokio::test]
async fn a_meshed_call_carries_the_callers_identity_and_a_plaintext_one_has_none() {
    let world = world().await;
    let payments = world.agent(&PAYMENTS, Some(world.app.addr().port())).await;
    let inbound = payments.inbound_addrs()[0];
    world.payments(inbound, true);
    let frontend = world.agent(&FRONTEND, None).await;
    ready(&payments).await;
    ready(&frontend).await;

    // Through the frontend's agent: mutual TLS, the caller is `frontend`, allowed.
    let rsp = call_payments(&frontend, 200).await;
    let reply: Reply = rsp.json().expect("the app's reply");
    assert_eq!(reply.name, "payments-app");

    // The frontend's agent knows whom it expects there.
    let endpoint = payments_endpoint(&frontend).await;
    assert_eq!(
        endpoint["identity"],
        format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/payments")
    );

    // Straight to the inbound listener in plaintext: no identity, denied.
    let direct = HttpClient::direct(inbound)
        .get("/", &[])
        .await
        .expect("plaintext call");
    assert_eq!(direct.status.as_u16(), 403);
    assert_eq!(direct.reason(), Some("unauthorized"));

    let out = Metrics::scrape(frontend.admin_addr())
        .await
        .expect("metrics");
    // Two agents of this build agree on the post-quantum hybrid key exchange.
    assert!(
        tls_metric(
            &out,
            "bulwark_tls_handshakes_total",
            &[("direction", "outbound"), ("group", "X25519MLKEM768")]
        ) >= 1.0
    );
    let inb = Metrics::scrape(payments.admin_addr())
        .await
        .expect("metrics");
    assert!(
        tls_metric(
            &inb,
            "bulwark_tls_handshakes_total",
            &[("direction", "inbound"), ("group", "X25519MLKEM768")]
        ) >= 1.0
    );
    assert!(
        tls_metric(
            &inb,
            "bulwark_unauthorized_total",
            &[("caller", "unauthenticated")]
        ) >= 1.0
    );
    assert!(inb.get("bulwark_identity_certificate_expiry_timestamp_seconds", &[]) > 0.0);
    frontend.shutdown().await;
    payments.shutdown().await;
    world.cp.shutdown().await;
}

#[tokio::test]
async fn a_strict_pod_refuses_plaintext_and_takes_mutual_tls() {
    let world = world().await;
    let payments = world.agent(&PAYMENTS, Some(world.app.addr().port())).await;
    let inbound = payments.inbound_addrs()[0];
    world.payments(inbound, true);
    world
        .mesh
        .write(
            "strict.yaml",
            &format!(
                "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
                 metadata: {{name: default, namespace: {NAMESPACE}}}\nspec: {{mode: Strict}}\n"
            ),
        )
        .expect("mesh file");
    let frontend = world.agent(&FRONTEND, None).await;
    ready(&payments).await;
    ready(&frontend).await;
    let admin = HttpClient::direct(payments.admin_addr());
    poll_until(CONFIG_DEADLINE, "payments is Strict", || {
        let admin = admin.clone();
        async move {
            let config: serde_json::Value = admin.get("/config", &[]).await.ok()?.json().ok()?;
            (config["config"]["inbound"]["peerAuthentication"]["mode"] == "Strict").then_some(())
        }
    })
    .await
    .expect("the mode reaches the agent");

    // A plaintext caller's connection is closed before any request is read.
    let plaintext = HttpClient::direct(inbound)
        .with_timeout(Duration::from_secs(5))
        .get("/", &[])
        .await;
    assert!(
        plaintext.is_err(),
        "plaintext refused: {:?}",
        plaintext.map(|r| r.status)
    );
    // A meshed caller is served (and allowed by identity).
    let rsp = call_payments(&frontend, 200).await;
    assert_eq!(
        rsp.json::<Reply>().expect("the app's reply").name,
        "payments-app"
    );
    let metrics = Metrics::scrape(payments.admin_addr())
        .await
        .expect("metrics");
    assert!(metrics.get("bulwark_inbound_plaintext_refused_total", &[]) >= 1.0);

    // Back to Permissive: plaintext is taken again (and denied by the policy, 403).
    world.mesh.remove("strict.yaml").expect("mesh file");
    let direct = HttpClient::direct(inbound);
    poll_until(CONFIG_DEADLINE, "plaintext is taken again", || {
        let direct = direct.clone();
        async move {
            direct
                .get("/", &[])
                .await
                .ok()
                .filter(|r| r.status.as_u16() == 403)
        }
    })
    .await
    .expect("Permissive takes plaintext");
    frontend.shutdown().await;
    payments.shutdown().await;
    world.cp.shutdown().await;
}

#[tokio::test]
async fn a_caller_that_is_not_the_expected_workload_is_refused_and_counted() {
    let world = world().await;
    // The intruder's agent listens where payments-0 should be: its certificate is valid
    // in the mesh, but names another workload.
    let intruder = world.agent(&INTRUDER, Some(world.app.addr().port())).await;
    world.payments(intruder.inbound_addrs()[0], true);
    let frontend = world.agent(&FRONTEND, None).await;
    ready(&intruder).await;
    ready(&frontend).await;

    // The handshake succeeds but the identity is wrong: a connect failure, 502.
    let rsp = call_payments(&frontend, 502).await;
    assert_eq!(rsp.reason(), Some("connect-failed"));
    let metrics = Metrics::scrape(frontend.admin_addr())
        .await
        .expect("metrics");
    let failures: Vec<_> = metrics
        .samples("bulwark_tls_handshake_failures_total")
        .map(|s| format!("{s:?}"))
        .collect();
    assert!(
        metrics.get(
            "bulwark_tls_handshake_failures_total",
            &[("direction", "outbound"), ("reason", "wrong-identity")]
        ) >= 1.0,
        "{failures:?}"
    );
    frontend.shutdown().await;
    intruder.shutdown().await;
    world.cp.shutdown().await;
}

#[tokio::test]
async fn an_unmeshed_endpoint_gets_plaintext_as_before() {
    let world = world().await;
    // No agent in front of the app, and no injector annotation: plaintext to the app.
    world.payments(world.app.addr(), false);
    let frontend = world.agent(&FRONTEND, None).await;
    ready(&frontend).await;
    let rsp = call_payments(&frontend, 200).await;
    let reply: Reply = rsp.json().expect("the app's reply");
    assert_eq!(reply.name, "payments-app");
    let metrics = Metrics::scrape(frontend.admin_addr())
        .await
        .expect("metrics");
    assert_eq!(
        metrics.get("bulwark_tls_handshakes_total", &[("direction", "outbound")]),
        0.0
    );
    frontend.shutdown().await;
    world.cp.shutdown().await;
}

/// A self-signed mesh CA: its certificate and key, PEM.
fn ca(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), key.serialize_pem())
}

/// Steady GETs through `client` until `stop`; the statuses that were not 200.
async fn steady(
    client: HttpClient,
    url: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u32, Vec<String>) {
    let mut sent = 0;
    let mut failed = Vec::new();
    while !*stop.borrow() {
        sent += 1;
        match client.get(&url, &[]).await {
            Ok(rsp) if rsp.status.as_u16() == 200 => {}
            Ok(rsp) => failed.push(format!("{} {:?}", rsp.status, rsp.reason())),
            Err(error) => failed.push(error.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (sent, failed)
}

/// The issuer of `agent`'s certificate, as its `/config` shows it.
async fn issuer_of(agent: &Agent) -> String {
    let config: serde_json::Value = HttpClient::direct(agent.admin_addr())
        .get("/config", &[])
        .await
        .expect("/config")
        .json()
        .expect("JSON");
    config["identity"]["issuer"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_trust_anchor_rotates_under_traffic_with_no_failed_request() {
    // Certificates live 3 s (renewed at 70 %), so each phase below lasts longer than one
    // lifetime: every agent has renewed within it.
    const LIFETIME: Duration = Duration::from_secs(3);
    const PHASE: Duration = Duration::from_millis(3_500);
    let (old_cert, old_key) = ca("mesh CA 1");
    let (new_cert, new_key) = ca("mesh CA 2");
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("issuer");
    std::fs::create_dir(&secret).expect("issuer folder");
    let write =
        |name: &str, text: &str| std::fs::write(secret.join(name), text).expect("issuer file");
    // The agents' --control-plane-ca, the trust bundle an operator distributes.
    let bundle_path = dir.path().join("anchor.pem");
    let bundle = |text: &str| std::fs::write(&bundle_path, text).expect("bundle");
    write("tls.crt", &old_cert);
    write("tls.key", &old_key);
    bundle(&old_cert);
    let authority = Arc::new(
        Authority::load(&secret, TRUST_DOMAIN, LIFETIME)
            .expect("issuer folder loads")
            .reload_every(Duration::from_millis(100)),
    );
    let world = world_with(authority, dir).await;
    let payments = world.agent(&PAYMENTS, Some(world.app.addr().port())).await;
    world.payments(payments.inbound_addrs()[0], true);
    let frontend = world.agent(&FRONTEND, None).await;
    ready(&payments).await;
    ready(&frontend).await;
    call_payments(&frontend, 200).await;
    assert_eq!(issuer_of(&payments).await, "CN=mesh CA 1");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(steady(
        HttpClient::proxy(frontend.outbound_addr()).with_timeout(Duration::from_secs(5)),
        format!("http://payments.{NAMESPACE}/"),
        stopped,
    ));
    // A fresh caller at the end of each phase makes new handshakes with the renewed peer.
    let fresh_call = || async {
        let fresh = world.agent(&FRONTEND, None).await;
        ready(&fresh).await;
        let status = call_payments(&fresh, 200).await.status;
        fresh.shutdown().await;
        status
    };

    // 1. Both anchors are trusted; the old issuer still signs.
    write("ca.crt", &format!("{old_cert}{new_cert}"));
    bundle(&format!("{old_cert}{new_cert}"));
    tokio::time::sleep(PHASE).await;
    assert_eq!(fresh_call().await, 200);
    // 2. The new issuer signs: renewed certificates chain to the new anchor.
    write("tls.key", &new_key);
    write("tls.crt", &new_cert);
    tokio::time::sleep(PHASE).await;
    assert_eq!(issuer_of(&payments).await, "CN=mesh CA 2");
    assert_eq!(issuer_of(&frontend).await, "CN=mesh CA 2");
    assert_eq!(fresh_call().await, 200);
    // 3. The old anchor goes.
    write("ca.crt", &new_cert);
    bundle(&new_cert);
    tokio::time::sleep(PHASE).await;
    assert_eq!(fresh_call().await, 200);

    stop.send_replace(true);
    let (sent, failed) = traffic.await.expect("traffic task");
    assert!(sent > 100, "steady traffic ran ({sent} requests)");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    frontend.shutdown().await;
    payments.shutdown().await;
    world.cp.shutdown().await;
}
