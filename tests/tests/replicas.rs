//! Two control-plane replicas serve agents at the same time (the Lease only elects the
//! status writer). An agent reaches them through one address, as through a Kubernetes
//! Service; here a small TCP forwarder plays kube-proxy. When the replica it streams
//! from goes away under load, no request fails (the agent keeps its config), it
//! reconnects through the same address to the other replica, gets the whole view, and
//! later changes reach it from there.
// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bulwark_agent::Agent;
use bulwark_control_plane::ControlPlane;
use bulwark_tests::client::HttpClient;
use bulwark_tests::eventually::poll_until;
use bulwark_tests::harness::{
    CONFIG_DEADLINE, agent_settings, control_plane_settings, loopback, resilience_policy,
};
use bulwark_tests::mesh::Mesh;
use bulwark_tests::upstream::{Knobs, Upstream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One address in front of the replicas: each new connection goes to the replica
/// `backend` names at that moment, as kube-proxy sends it to a ready endpoint.
async fn service_address(backend: watch::Receiver<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let to = *backend.borrow();
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    addr
}

/// How many agents a replica's `/agents` lists.
async fn agents_on(cp: &ControlPlane) -> usize {
    let admin = HttpClient::direct(cp.admin_addr());
    match admin.get("/agents", &[]).await {
        Ok(rsp) => rsp
            .json()
            .ok()
            .and_then(|v: serde_json::Value| v.as_array().map(Vec::len))
            .unwrap_or(0),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn an_agent_fails_over_to_the_other_replica_without_losing_a_request() {
    let reviews = Upstream::start(loopback(), "reviews-0", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("reviews", vec![reviews.addr()])]).unwrap();
    let a = ControlPlane::start(control_plane_settings(&mesh, loopback()))
        .await
        .unwrap();
    let b = ControlPlane::start(control_plane_settings(&mesh, loopback()))
        .await
        .unwrap();
    let (backend, backend_rx) = watch::channel(a.grpc_addr());
    let service = service_address(backend_rx).await;
    let agent = Agent::start(agent_settings(service, "client", None))
        .await
        .unwrap();
    let admin = HttpClient::direct(agent.admin_addr());
    let config = || async {
        let rsp = admin.get("/config", &[]).await.ok()?;
        rsp.json::<serde_json::Value>().ok()
    };
    poll_until(CONFIG_DEADLINE, "the agent's first config", || async {
        config()
            .await
            .filter(|c| c["config"]["version"].as_u64() > Some(0))
    })
    .await
    .unwrap();
    assert_eq!((agents_on(&a).await, agents_on(&b).await), (1, 0));

    // Load through the agent for as long as the failover takes.
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (stop, mut stopped) = watch::channel(false);
    let load = {
        let client = HttpClient::proxy(agent.outbound_addr());
        let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
        tokio::spawn(async move {
            while !*stopped.borrow_and_update() {
                match client.get("http://reviews.test/", &[]).await {
                    Ok(rsp) if rsp.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    // Replica A goes away; new connections reach B.
    backend.send_replace(b.grpc_addr());
    a.shutdown().await;
    poll_until(CONFIG_DEADLINE, "the agent on replica B", || async {
        (agents_on(&b).await == 1).then_some(())
    })
    .await
    .unwrap();

    // A change now reaches the agent from B.
    mesh.write_policy(
        "reviews.yaml",
        &resilience_policy("reviews", "reviews", "  retry:\n    attempts: 4\n"),
    )
    .unwrap();
    poll_until(CONFIG_DEADLINE, "the policy from replica B", || async {
        config()
            .await
            .filter(|c| c["config"]["destinations"][0]["retry"]["attempts"] == serde_json::json!(4))
    })
    .await
    .unwrap();

    stop.send_replace(true);
    load.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 0, "requests flowed");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed while the agent changed replicas"
    );
    agent.shutdown().await;
    b.shutdown().await;
}
