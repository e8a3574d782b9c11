//! Workload identity end to end, over real TLS on loopback: the control plane's gRPC
//! port serves TLS with a certificate agents verify against the mesh's anchor; an agent
//! with a valid token gets a certificate for exactly its SPIFFE ID and its discovery
//! stream; a forged token, another pod's name, a malformed request or a plaintext
//! client get nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bulwark_agent::identity::channel;
use bulwark_agent::identity::client::{Claims, GrpcCertifier};
use bulwark_agent::identity::credentials::PendingKey;
use bulwark_agent::identity::renewal::Certifier as _;
use bulwark_agent::identity::tls::spiffe_id;
use bulwark_control_plane::ControlPlane;
use bulwark_control_plane::identity::IdentitySettings;
use bulwark_control_plane::identity::authority::{Authority, DEFAULT_LIFETIME};
use bulwark_control_plane::identity::token::TokenReviewer;
use bulwark_proto::v1::agent_message::Kind;
use bulwark_proto::v1::discovery_client::DiscoveryClient;
use bulwark_proto::v1::{AgentMessage, Identity};
use bulwark_tests::harness::agent_settings;
use bulwark_tests::harness::pem;
use bulwark_tests::mesh::{Mesh, NAMESPACE};
use tokio_stream::wrappers::ReceiverStream;

const TOKEN: &str = "frontend-0-token-0123456789abcdef";
/// The token of the in-process agent's pod (namespace `test`, see the harness).
const AGENT_TOKEN: &str = "test-frontend-0-token-0123456789";

struct Running {
    cp: ControlPlane,
    authority: Arc<Authority>,
    dir: tempfile::TempDir,
    _mesh: Mesh,
}

async fn start() -> Running {
    let mesh = Mesh::with_services([(
        "reviews",
        vec!["127.0.0.1:1".parse().expect("setting up the identity test")],
    )])
    .expect("setting up the identity test");
    let dir = tempfile::tempdir().expect("setting up the identity test");
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:\n  - {{token: {TOKEN}, namespace: demo, serviceAccount: frontend, pod: frontend-0}}\n\
             \x20 - {{token: {AGENT_TOKEN}, namespace: {NAMESPACE}, serviceAccount: frontend, pod: frontend-0}}\n"
        ),
    )
    .expect("setting up the identity test");
    let authority = Arc::new(
        Authority::generate("cluster.local", DEFAULT_LIFETIME)
            .expect("setting up the identity test"),
    );
    let mut settings = bulwark_tests::harness::control_plane_settings(
        &mesh,
        "127.0.0.1:0".parse().expect("setting up the identity test"),
    );
    settings.identity = Some(IdentitySettings {
        authority: Arc::clone(&authority),
        reviewer: TokenReviewer::from_file(&tokens).expect("setting up the identity test"),
        serving_names: vec!["localhost".into(), "127.0.0.1".into()],
    });
    let cp = ControlPlane::start(settings)
        .await
        .expect("setting up the identity test");
    Running {
        cp,
        authority,
        dir,
        _mesh: mesh,
    }
}

impl Running {
    fn channel(&self) -> tonic::transport::Channel {
        channel::connect(
            &format!("https://127.0.0.1:{}", self.cp.grpc_addr().port()),
            Some(&self.authority.anchors()),
        )
        .expect("setting up the identity test")
    }

    fn certifier(&self, token: &str, pod: &str) -> GrpcCertifier {
        let path = self.dir.path().join(format!("{pod}.token"));
        std::fs::write(&path, token).expect("setting up the identity test");
        GrpcCertifier::new(
            self.channel(),
            path,
            Claims {
                namespace: "demo".into(),
                pod_name: pod.into(),
                service_account: "frontend".into(),
            },
        )
    }

    /// Opens a discovery stream with `token` (if any) claiming `pod`; the first answer.
    async fn discover(&self, token: Option<&str>, pod: &str) -> Result<u64, tonic::Status> {
        let mut client = DiscoveryClient::new(self.channel());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(AgentMessage {
            kind: Some(Kind::Hello(Identity {
                namespace: "demo".into(),
                pod_name: pod.into(),
                service_account: "frontend".into(),
                labels: [("app".to_owned(), "frontend".to_owned())].into(),
                agent_version: "test".into(),
                protocol_version: bulwark_proto::PROTOCOL_VERSION,
            })),
        })
        .await
        .expect("setting up the identity test");
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}")
                    .parse()
                    .expect("setting up the identity test"),
            );
        }
        let mut snapshots = client.stream(request).await?.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(15), snapshots.message())
            .await
            .expect("an answer within 15 s")?;
        Ok(first.map_or(0, |s| s.version))
    }
}

#[tokio::test]
async fn an_agent_gets_a_certificate_for_exactly_the_identity_its_token_proves() {
    let running = start().await;
    let key = PendingKey::generate().unwrap();
    let signed = running
        .certifier(TOKEN, "frontend-0")
        .certify(key.csr_der().to_vec())
        .await
        .unwrap();
    assert_eq!(
        signed.spiffe_id,
        "spiffe://cluster.local/ns/demo/sa/frontend"
    );
    assert_eq!(
        spiffe_id(&signed.chain[0]).as_deref(),
        Some("spiffe://cluster.local/ns/demo/sa/frontend")
    );
    assert_eq!(signed.anchors, running.authority.anchors());
    let left = signed.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(left > DEFAULT_LIFETIME - Duration::from_secs(300) && left <= DEFAULT_LIFETIME);
    let metrics = bulwark_tests::Metrics::scrape(running.cp.admin_addr())
        .await
        .unwrap();
    assert_eq!(
        metrics.get("bulwark_cp_certificates_issued_total", &[]),
        1.0
    );
    running.cp.shutdown().await;
}

#[tokio::test]
async fn forged_tokens_other_pods_and_malformed_requests_get_nothing() {
    let running = start().await;
    let csr = PendingKey::generate().unwrap().csr_der().to_vec();
    let forged = running
        .certifier("forged-token-0123456789abcdef", "frontend-0")
        .certify(csr.clone())
        .await
        .unwrap_err();
    assert!(forged.0.contains("Unauthenticated"), "{}", forged.0);
    let other_pod = running
        .certifier(TOKEN, "frontend-1")
        .certify(csr)
        .await
        .unwrap_err();
    assert!(
        other_pod.0.contains("PermissionDenied") && other_pod.0.contains("bound to pod"),
        "{}",
        other_pod.0
    );
    let malformed = running
        .certifier(TOKEN, "frontend-0")
        .certify(b"not a certificate request".to_vec())
        .await
        .unwrap_err();
    assert!(
        malformed.0.contains("InvalidArgument") && malformed.0.contains("PKCS#10"),
        "{}",
        malformed.0
    );
    let metrics = bulwark_tests::Metrics::scrape(running.cp.admin_addr())
        .await
        .unwrap();
    for reason in ["unauthenticated", "mismatch", "invalid"] {
        assert_eq!(
            metrics.get(
                "bulwark_cp_identity_refusals_total",
                &[("request", "certificate"), ("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        metrics.get("bulwark_cp_certificates_issued_total", &[]),
        0.0
    );
    running.cp.shutdown().await;
}

#[tokio::test]
async fn discovery_serves_only_an_agent_whose_token_proves_its_pod() {
    let running = start().await;
    assert!(running.discover(Some(TOKEN), "frontend-0").await.unwrap() > 0);
    let none = running.discover(None, "frontend-0").await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    let forged = running
        .discover(Some("forged-token-0123456789abcdef"), "frontend-0")
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::Unauthenticated);
    let other = running
        .discover(Some(TOKEN), "payments-0")
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied);
    let metrics = bulwark_tests::Metrics::scrape(running.cp.admin_addr())
        .await
        .unwrap();
    let refused = |reason| {
        metrics.get(
            "bulwark_cp_identity_refusals_total",
            &[("request", "discovery"), ("reason", reason)],
        )
    };
    assert_eq!(
        (refused("unauthenticated"), refused("mismatch")),
        (2.0, 1.0)
    );
    // A plaintext client cannot talk to the TLS port at all.
    let plain = channel::connect(
        &format!("http://127.0.0.1:{}", running.cp.grpc_addr().port()),
        None,
    )
    .unwrap();
    let mut client = DiscoveryClient::new(plain);
    let (_tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1);
    assert!(client.stream(ReceiverStream::new(rx)).await.is_err());
    running.cp.shutdown().await;
}

/// A real agent whose pod is `pod`, presenting `token`, subscribing over TLS.
async fn agent(running: &Running, pod: &str, token: &str) -> bulwark_agent::Agent {
    let anchor = running.dir.path().join("anchor.pem");
    std::fs::write(&anchor, pem(&running.authority.anchors())).expect("setting up the agent");
    let token_file = running.dir.path().join(format!("{pod}.agent-token"));
    std::fs::write(&token_file, token).expect("setting up the agent");
    let mut settings = agent_settings(running.cp.grpc_addr(), "frontend", None);
    settings.identity.pod_name = pod.to_owned();
    settings.control_plane = format!("https://127.0.0.1:{}", running.cp.grpc_addr().port());
    settings.control_plane_ca = Some(anchor);
    settings.token_file = Some(token_file);
    bulwark_agent::Agent::start(settings)
        .await
        .expect("setting up the agent")
}

async fn admin_json(agent: &bulwark_agent::Agent, path: &str) -> Option<(u16, serde_json::Value)> {
    let response = bulwark_tests::client::get(agent.admin_addr(), path, &[])
        .await
        .ok()?;
    let json = response.json().unwrap_or(serde_json::Value::Null);
    Some((response.status.as_u16(), json))
}

#[tokio::test]
async fn a_real_agent_subscribes_over_tls_and_shows_its_identity() {
    let running = start().await;
    let agent = agent(&running, "frontend-0", AGENT_TOKEN).await;
    let identity = bulwark_tests::poll_until(
        Duration::from_secs(20),
        "the agent has its config and its certificate",
        || async {
            let (ready, _) = admin_json(&agent, "/ready").await?;
            let (_, config) = admin_json(&agent, "/config").await?;
            (ready == 200 && config["identity"]["spiffeId"].is_string())
                .then(|| config["identity"].clone())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        identity["spiffeId"],
        format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/frontend")
    );
    assert!(identity["expiresInSecs"].as_u64().unwrap() > 23 * 3600);
    assert!(identity["lastError"].is_null());
    let text = admin_json(&agent, "/config").await.unwrap().1.to_string();
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains(AGENT_TOKEN),
        "no secret on /config"
    );
    agent.shutdown().await;
    running.cp.shutdown().await;
}

#[tokio::test]
async fn an_agent_claiming_another_pod_gets_neither_config_nor_certificate() {
    let running = start().await;
    let agent = agent(&running, "frontend-1", AGENT_TOKEN).await;
    let error = bulwark_tests::poll_until(
        Duration::from_secs(20),
        "the certificate request is refused",
        || async {
            let (_, config) = admin_json(&agent, "/config").await?;
            config["identity"]["lastError"].as_str().map(str::to_owned)
        },
    )
    .await
    .unwrap();
    assert!(error.contains("PermissionDenied"), "{error}");
    let (ready, _) = admin_json(&agent, "/ready").await.unwrap();
    assert_eq!(ready, 503, "no config was served to it");
    agent.shutdown().await;
    running.cp.shutdown().await;
}
