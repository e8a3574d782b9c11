//! An agent that gets a config it cannot apply NACKs it with the reason and keeps
//! the old one, whether the config came whole or as a delta. The real control plane
//! never sends such a config (it validates first), so a scripted control plane speaks
//! the same gRPC API here.

use std::net::SocketAddr;
use std::sync::Mutex;

use bulwark_agent::Agent;
use bulwark_proto::v1::discovery_server::{Discovery, DiscoveryServer};
use bulwark_proto::v1::{self, agent_message};
use bulwark_tests::client::HttpClient;
use bulwark_tests::eventually::poll_until;
use bulwark_tests::harness::{agent_settings, loopback};
use bulwark_tests::metrics::Metrics;
use bulwark_tests::upstream::{Knobs, Upstream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Hands the test the agent's messages and lets it push snapshots.
struct Scripted {
    from_agent: mpsc::UnboundedSender<v1::AgentMessage>,
    to_agent: Mutex<Option<mpsc::Receiver<Result<v1::Snapshot, Status>>>>,
}

#[tonic::async_trait]
impl Discovery for Scripted {
    type StreamStream = ReceiverStream<Result<v1::Snapshot, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let from_agent = self.from_agent.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let _ = from_agent.send(msg);
            }
        });
        let rx = self
            .to_agent
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .take()
            .ok_or_else(|| Status::unavailable("one stream only"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn snapshot(version: u64, upstream: SocketAddr, retry_on: &str) -> v1::Snapshot {
    v1::Snapshot {
        version,
        services: vec![v1::Service {
            name: "reviews".into(),
            namespace: "test".into(),
            ports: vec![v1::ServicePort {
                name: "http".into(),
                port: 80,
                endpoints: vec![v1::Endpoint {
                    address: upstream.to_string(),
                    ..Default::default()
                }],
                resilience: Some(v1::ResiliencePolicy {
                    source: "test/reviews".into(),
                    retry: Some(v1::Retry {
                        attempts: 2,
                        retry_on: vec![retry_on.into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            cluster_ips: vec![],
            version,
        }],
        inbound: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_config_the_agent_cannot_apply_is_nacked_and_the_old_one_kept() {
    let up = Upstream::start(loopback(), "reviews-0", Knobs::healthy())
        .await
        .unwrap();
    let (from_agent, mut agent_messages) = mpsc::unbounded_channel();
    let (to_agent, rx) = mpsc::channel(4);
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(Scripted {
                from_agent,
                to_agent: Mutex::new(Some(rx)),
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let agent = Agent::start(agent_settings(cp_addr, "client", None))
        .await
        .unwrap();

    let hello = agent_messages.recv().await.unwrap();
    match hello.kind {
        Some(agent_message::Kind::Hello(id)) => {
            assert_eq!(id.namespace, "test");
            assert_eq!(id.labels.get("app").map(String::as_str), Some("client"));
        }
        other => panic!("the agent opens with its identity, got {other:?}"),
    }

    to_agent
        .send(Ok(snapshot(7, up.addr(), "gateway-error")))
        .await
        .unwrap();
    match agent_messages.recv().await.unwrap().kind {
        Some(agent_message::Kind::Ack(ack)) => assert_eq!(ack.version, 7),
        other => panic!("a good snapshot is ACKed, got {other:?}"),
    }

    to_agent
        .send(Ok(snapshot(8, up.addr(), "whenever")))
        .await
        .unwrap();
    match agent_messages.recv().await.unwrap().kind {
        Some(agent_message::Kind::Nack(nack)) => {
            assert_eq!(nack.version, 8);
            assert!(
                nack.error.contains("whenever"),
                "the NACK says why: {}",
                nack.error
            );
            assert!(
                nack.error.contains("reviews.test:80"),
                "and where: {}",
                nack.error
            );
        }
        other => panic!("a bad snapshot is NACKed, got {other:?}"),
    }

    // Version 7 is still in force and still routes.
    let admin = HttpClient::direct(agent.admin_addr());
    let config: serde_json::Value = admin.get("/config", &[]).await.unwrap().json().unwrap();
    assert_eq!(config["config"]["version"], 7);
    let client = HttpClient::proxy(agent.outbound_addr());
    let rsp = client.get("http://reviews.test/", &[]).await.unwrap();
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.upstream(), Some("reviews-0"));
    let m = poll_until(std::time::Duration::from_secs(5), "metrics", || async {
        Metrics::scrape(agent.admin_addr()).await.ok()
    })
    .await
    .unwrap();
    assert_eq!(
        m.get("bulwark_config_updates_total", &[("result", "nack")]),
        1.0
    );
    assert_eq!(m.get("bulwark_config_version", &[]), 7.0);

    agent.shutdown().await;
    server.abort();
}

/// A delta (protocol 6) onto `base` that replaces `reviews.test` with `service`.
fn delta(version: u64, base: u64, service: v1::Service) -> v1::Snapshot {
    v1::Snapshot {
        version,
        base_version: base,
        services: vec![service],
        ..Default::default()
    }
}

/// A service with one port at `upstream`.
fn plain(name: &str, version: u64, upstream: &str) -> v1::Service {
    v1::Service {
        name: name.into(),
        namespace: "test".into(),
        version,
        ports: vec![v1::ServicePort {
            name: "http".into(),
            port: 80,
            endpoints: vec![v1::Endpoint {
                address: upstream.into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_delta_the_agent_cannot_apply_is_nacked_and_the_last_good_config_kept() {
    let reviews = Upstream::start(loopback(), "reviews-0", Knobs::healthy())
        .await
        .unwrap();
    let ratings = Upstream::start(loopback(), "ratings-0", Knobs::healthy())
        .await
        .unwrap();
    let (from_agent, mut agent_messages) = mpsc::unbounded_channel();
    let (to_agent, rx) = mpsc::channel(4);
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(Scripted {
                from_agent,
                to_agent: Mutex::new(Some(rx)),
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let agent = Agent::start(agent_settings(cp_addr, "client", None))
        .await
        .unwrap();
    match agent_messages.recv().await.unwrap().kind {
        Some(agent_message::Kind::Hello(id)) => {
            assert_eq!(id.protocol_version, bulwark_proto::PROTOCOL_VERSION);
            assert!(id.protocol_version >= bulwark_proto::INCREMENTAL_SINCE);
        }
        other => panic!("the agent opens with its identity, got {other:?}"),
    }
    let mut answer = async || agent_messages.recv().await.unwrap().kind;

    to_agent
        .send(Ok(snapshot(7, reviews.addr(), "gateway-error")))
        .await
        .unwrap();
    assert!(matches!(
        answer().await,
        Some(agent_message::Kind::Ack(v1::Ack { version: 7 }))
    ));

    // A good delta: ratings added, reviews untouched.
    to_agent
        .send(Ok(delta(
            8,
            7,
            plain("ratings", 8, &ratings.addr().to_string()),
        )))
        .await
        .unwrap();
    assert!(matches!(
        answer().await,
        Some(agent_message::Kind::Ack(v1::Ack { version: 8 }))
    ));

    // A delta with an endpoint the agent cannot parse: NACKed, version 8 stays whole.
    to_agent
        .send(Ok(delta(9, 8, plain("reviews", 9, "not-an-address"))))
        .await
        .unwrap();
    match answer().await {
        Some(agent_message::Kind::Nack(nack)) => {
            assert_eq!(nack.version, 9);
            assert!(nack.error.contains("reviews.test:80"), "{}", nack.error);
            assert!(nack.error.contains("not-an-address"), "{}", nack.error);
        }
        other => panic!("a bad delta is NACKed, got {other:?}"),
    }
    // A delta made for the refused version does not apply to the one in force.
    to_agent
        .send(Ok(v1::Snapshot {
            version: 10,
            base_version: 9,
            removed_services: vec![v1::ServiceRef {
                namespace: "test".into(),
                name: "ratings".into(),
                version: 10,
            }],
            ..Default::default()
        }))
        .await
        .unwrap();
    match answer().await {
        Some(agent_message::Kind::Nack(nack)) => {
            assert_eq!(nack.version, 10);
            assert!(
                nack.error
                    .contains("delta onto version 9 but version 8 is in force"),
                "{}",
                nack.error
            );
        }
        other => panic!("a delta onto another version is NACKed, got {other:?}"),
    }

    let admin = HttpClient::direct(agent.admin_addr());
    let config: serde_json::Value = admin.get("/config", &[]).await.unwrap().json().unwrap();
    assert_eq!(config["config"]["version"], 8);
    let client = HttpClient::proxy(agent.outbound_addr());
    for (host, upstream) in [("reviews.test", "reviews-0"), ("ratings.test", "ratings-0")] {
        let rsp = client.get(&format!("http://{host}/"), &[]).await.unwrap();
        assert_eq!(rsp.status, 200, "{host}");
        assert_eq!(rsp.upstream(), Some(upstream), "{host}");
    }

    // The whole view mends it.
    to_agent
        .send(Ok(snapshot(11, reviews.addr(), "gateway-error")))
        .await
        .unwrap();
    assert!(matches!(
        answer().await,
        Some(agent_message::Kind::Ack(v1::Ack { version: 11 }))
    ));
    let config: serde_json::Value = admin.get("/config", &[]).await.unwrap().json().unwrap();
    assert_eq!(config["config"]["version"], 11);
    let names: Vec<_> = config["config"]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["reviews.test:80"],
        "the whole view replaced the deltas"
    );

    agent.shutdown().await;
    server.abort();
}
