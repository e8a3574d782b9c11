//! An agent that gets a config it cannot apply NACKs it with the reason and keeps
//! the old one. The real control plane never sends such a config (it validates
//! first), so a scripted control plane speaks the same gRPC API here.

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
        }],
        inbound: None,
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
