//! An endpoint killed mid-traffic: two upstream processes serve `bench`, one is
//! SIGKILLed while GETs and POSTs flow. The GETs (idempotent) are retried on the other
//! endpoint under the policy of `examples/resilience.yaml` (3 attempts, retry on
//! connect failure, reset and gateway errors); POSTs are never retried, so a POST that
//! was on the killed endpoint may fail and is counted apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use http::Method;

use super::policy::policy_yaml;
use super::{Check, Config, Row, failures, rss_kib, steady};
use crate::sut::{Agent, ControlPlane, Layout, MeshDir, Policies, Upstream, free_addr};

/// Scenario 2: see the module doc.
pub async fn endpoint_killed(layout: &Layout, config: &Config) -> anyhow::Result<Row> {
    // One port on two loopback addresses: one EndpointSlice port serves both.
    let first = free_addr()?;
    let second = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), first.port());
    let survivor = Upstream::start_at(layout, "endpoint-survivor", first, Duration::ZERO).await?;
    let victim = Upstream::start_at(layout, "endpoint-killed", second, Duration::ZERO)
        .await
        .with_context(|| format!("a second endpoint on {second}"))?;
    let mesh = MeshDir::with_endpoints(&[first, second], 1, Policies::None)?;
    mesh.write("policy.yaml", &policy_yaml(3, 2_000))?;
    let cp = ControlPlane::start(layout, &mesh, "50ms", None).await?;
    let agent = Agent::start(
        layout,
        "agent-endpoint-killed",
        cp.grpc,
        first.port(),
        None,
        &config.agent_args,
    )
    .await?;
    let before = rss_kib(agent.proc.pid());

    let load_time = Duration::from_secs(6);
    let post_rate = (config.rate / 10).max(1);
    let gets = steady(agent.outbound, Method::GET, config.rate, load_time).await?;
    let posts = steady(agent.outbound, Method::POST, post_rate, load_time).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    victim.proc.stop().await;
    let gets = gets.await.context("the GET load task")?;
    let posts = posts.await.context("the POST load task")?;
    let after = rss_kib(agent.proc.pid());
    agent.proc.stop().await;
    cp.proc.stop().await;
    survivor.proc.stop().await;

    let sent = gets.ok + gets.errors + posts.ok + posts.errors;
    Ok(Row {
        scenario: "an endpoint killed mid-traffic (1 of 2)".to_owned(),
        sent: Some(sent),
        failed: Some(gets.errors + posts.errors),
        failed_idempotent: Some(gets.errors),
        rss_before_kib: before,
        rss_after_kib: after,
        notes: format!(
            "{} GET/s + {post_rate} POST/s for {} s, one endpoint SIGKILLed at 2 s; GETs: {}; POSTs (not retried): {}",
            config.rate,
            load_time.as_secs(),
            failures(&gets),
            failures(&posts)
        ),
        checks: vec![Check::new(
            "endpoint killed: no idempotent request fails (retried on the other endpoint)",
            format!("{} of {} GETs failed", gets.errors, gets.ok + gets.errors),
            gets.errors == 0,
        )],
    })
}
