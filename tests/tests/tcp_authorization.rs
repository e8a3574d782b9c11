//! AuthorizationPolicy on opaque TCP, and inbound metrics labelled with the caller,
//! between real agents over mutual TLS on loopback.
//!
//! The payments pod's policy allows `frontend` by its identity alone, and `intruder` only
//! on HTTP paths under `/public/`. A tunnel (`CONNECT`, opaque TCP with ALPN
//! `bulwark-tcp` between the agents) from the frontend reaches the app; one from the
//! intruder is closed by the payments agent right after the handshake, before any byte
//! reaches the app, while the intruder's HTTP requests to `/public/` still pass. The
//! payments agent's inbound metrics carry each caller's `namespace/serviceaccount`.

use std::net::SocketAddr;
use std::time::Duration;

use bulwark_agent::Agent;
use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::CONFIG_DEADLINE;
use bulwark_tests::identity_mesh::{IdentityMesh, Pod};
use bulwark_tests::mesh::NAMESPACE;
use bulwark_tests::{Metrics, poll_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The pods of the test; each proves its identity with a token.
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

type World = IdentityMesh;

/// A real agent for `pod` over `world`, once it has its config and certificate;
/// `inbound_app` puts an inbound listener in front of that app port.
async fn agent(world: &World, pod: &Pod, inbound_app: Option<u16>) -> Agent {
    let agent = world.agent(pod, inbound_app).await;
    ready(&agent).await;
    agent
}

/// The payments side of the test, over the shared identity mesh.
trait Payments {
    /// The payments Service, its one meshed endpoint at `addr`, and its
    /// AuthorizationPolicy.
    fn payments(&self, addr: SocketAddr);
}

impl Payments for World {
    /// The payments Service, its one meshed endpoint at `addr` (the agent in front of
    /// the app), and its AuthorizationPolicy.
    fn payments(&self, addr: SocketAddr) {
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
  annotations: {{bulwark.io/injected: test}}
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
    - from: [{{serviceAccount: intruder}}]
      to: [{{paths: ['/public/*']}}]
",
            app_port = self.app.addr().port(),
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
                let config: serde_json::Value =
                    admin.get("/config", &[]).await.ok()?.json().ok()?;
                let ready = admin.get("/ready", &[]).await.ok()?.status == 200;
                (ready && config["identity"]["spiffeId"].is_string()).then_some(())
            }
        },
    )
    .await
    .expect("agent ready");
}

/// Waits until `agent` sends `http://payments/public/x` to the payments pod over mutual
/// TLS (before it knows the meshed endpoint, the call would pass through or fail).
async fn knows_payments(agent: &Agent) {
    let client = HttpClient::proxy(agent.outbound_addr()).with_timeout(Duration::from_secs(5));
    let url = format!("http://payments.{NAMESPACE}/public/x");
    poll_until(CONFIG_DEADLINE, "payments answers over mutual TLS", || {
        let client = client.clone();
        let url = url.clone();
        async move {
            let metrics = Metrics::scrape(agent.admin_addr()).await.ok()?;
            let tls = metrics.get("bulwark_tls_handshakes_total", &[("direction", "outbound")]);
            let rsp = client.get(&url, &[]).await.ok()?;
            (rsp.status.as_u16() == 200 && tls >= 1.0).then_some(())
        }
    })
    .await
    .expect("payments reachable");
}

/// Opens a `CONNECT payments.test:80` tunnel through `agent`'s outbound listener (opaque
/// TCP, mutual TLS with ALPN `bulwark-tcp` to the payments pod), sends one HTTP/1.1
/// request through it, and returns all the bytes that come back.
async fn through_tunnel(agent: &Agent) -> Vec<u8> {
    let target = format!("payments.{NAMESPACE}:80");
    let mut tcp = TcpStream::connect(agent.outbound_addr())
        .await
        .expect("the outbound listener accepts");
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("CONNECT sent");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tcp.read(&mut byte).await.expect("CONNECT answered");
        assert_eq!(n, 1, "the tunnel closed before its head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "tunnel opened: {head}");
    // The peer may already have closed: a refused write is as good as an empty answer.
    let _ = tcp
        .write_all(b"GET /tcp HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
        .await;
    let mut reply = Vec::new();
    // A reset by the peer ends it as well as a close: whatever arrived before counts.
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
        .await
        .expect("the tunnel ends");
    reply
}

#[tokio::test]
async fn tcp_is_authorized_by_the_callers_identity_and_metrics_name_the_caller() {
    let world = IdentityMesh::start(&[FRONTEND, PAYMENTS, INTRUDER]).await;
    let payments = agent(&world, &PAYMENTS, Some(world.app.addr().port())).await;
    world.payments(payments.inbound_addrs()[0]);
    let frontend = agent(&world, &FRONTEND, None).await;
    let intruder = agent(&world, &INTRUDER, None).await;
    // Both callers reach payments over mutual TLS on an HTTP path the policy opens to
    // both (frontend: any request; intruder: /public/*).
    knows_payments(&frontend).await;
    knows_payments(&intruder).await;
    let served_before = world.app.stats().total;

    // The frontend is allowed by its identity alone: its TCP tunnel reaches the app.
    let reply = through_tunnel(&frontend).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(world.app.stats().total, served_before + 1);

    // The intruder's only rule needs an HTTP path: its tunnel is closed after the
    // handshake with nothing from the app, and the app sees no request.
    let reply = through_tunnel(&intruder).await;
    assert!(
        reply.is_empty(),
        "denied: {}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(world.app.stats().total, served_before + 1);
    // Its HTTP requests outside /public/ are refused as before.
    let rsp = HttpClient::proxy(intruder.outbound_addr())
        .get(&format!("http://payments.{NAMESPACE}/private"), &[])
        .await
        .expect("answered");
    assert_eq!(rsp.status.as_u16(), 403);
    assert_eq!(rsp.reason(), Some("unauthorized"));

    let metrics = Metrics::scrape(payments.admin_addr())
        .await
        .expect("metrics");
    let frontend_label = format!("{NAMESPACE}/frontend");
    let intruder_label = format!("{NAMESPACE}/intruder");
    let denied = |caller: &str, protocol: &str| {
        metrics.get(
            "bulwark_unauthorized_total",
            &[
                ("policy", &format!("{NAMESPACE}/payments")),
                ("caller", caller),
                ("protocol", protocol),
            ],
        )
    };
    assert_eq!(denied(&intruder_label, "tcp"), 1.0);
    assert_eq!(denied(&intruder_label, "http"), 1.0);
    assert_eq!(denied(&frontend_label, "tcp"), 0.0);
    let tunnels = |caller: &str| {
        metrics.get(
            "bulwark_tcp_connections_total",
            &[("direction", "inbound"), ("caller", caller)],
        )
    };
    assert_eq!(tunnels(&frontend_label), 1.0);
    assert_eq!(tunnels(&intruder_label), 0.0);
    let requests = |caller: &str, class: &str| {
        metrics.get(
            "bulwark_requests_total",
            &[
                ("direction", "inbound"),
                ("caller", caller),
                ("status_class", class),
            ],
        )
    };
    assert!(requests(&frontend_label, "2xx") >= 1.0);
    assert!(requests(&intruder_label, "2xx") >= 1.0, "/public/x");
    assert_eq!(requests(&intruder_label, "4xx"), 1.0, "/private");

    intruder.shutdown().await;
    frontend.shutdown().await;
    payments.shutdown().await;
    world.cp.shutdown().await;
}
