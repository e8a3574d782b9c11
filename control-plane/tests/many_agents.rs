//! The control plane under thousands of agents: 2,000 real discovery streams over
//! loopback, a change that concerns half of them, then one that concerns all.
//!
//! The agents share 20 HTTP/2 connections (100 streams each), so the test holds about 40
//! sockets (under 60 open files in all), far below any usual `ulimit -n`; a deployment with one connection
//! per agent needs one descriptor per agent on the control plane's side instead. No
//! concurrency limit needs raising: tonic's server advertises no
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (it passes `None` over hyper's default of 200) and
//! sets no per-connection concurrency limit, and tonic's `Channel` has no concurrency
//! limit by default. Were the server to cap streams per connection below 100, the streams
//! over the cap would wait for a free slot and the test would fail on its deadline.
// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bulwark_proto::v1::agent_message::Kind;
use bulwark_proto::v1::discovery_client::DiscoveryClient;
use bulwark_proto::v1::{Ack, AgentMessage, Identity, Snapshot};
use futures::future::join_all;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

const AGENTS: usize = 2_000;
const CHANNELS: usize = 20;
/// Generous: it bounds a failing run, it is not a speed requirement.
const DEADLINE: Duration = Duration::from_secs(60);
/// Far below one per agent; the runtime, the file watcher and tokio's blocking pool fit.
const MAX_THREADS: usize = 100;
/// Both ends of each connection, the listeners, the watcher: far below one per agent.
const MAX_FILES: usize = 200;

#[path = "support/fixture.rs"]
mod fixture;

use fixture::Fixture;

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    fixture::eventually(what, DEADLINE, check).await;
}

/// A metric without labels from the control plane's `/metrics`.
async fn metric(fx: &Fixture, name: &str) -> f64 {
    let (status, text) = fx.admin("/metrics").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Waits until `/metrics` shows `connected` agents and `acks` ACKs in all.
async fn wait_for_acks(fx: &Fixture, connected: usize, acks: usize) {
    eventually(&format!("{connected} agents and {acks} ACKs"), || async {
        metric(fx, "bulwark_cp_agents_connected").await == connected as f64
            && metric(fx, "bulwark_cp_acks_total").await == acks as f64
    })
    .await;
}

/// The control plane's `/agents` list.
async fn listed_agents(fx: &Fixture) -> Vec<serde_json::Value> {
    let value = fx.admin_json("/agents").await;
    value.as_array().cloned().unwrap_or_default()
}

/// A test agent: a discovery stream and the sending half of its messages.
struct Agent {
    frontend: bool,
    tx: mpsc::Sender<AgentMessage>,
    snapshots: Streaming<Snapshot>,
    /// The whole view, with every delta received so far applied.
    view: Snapshot,
}

impl Agent {
    /// Even agents are frontend pods, odd ones are not.
    async fn connect(channel: Channel, n: usize) -> Agent {
        let frontend = n.is_multiple_of(2);
        let app = if frontend { "frontend" } else { "other" };
        let hello = Identity {
            namespace: "demo".into(),
            pod_name: format!("{app}-{n}"),
            service_account: "default".into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            agent_version: "test".into(),
            protocol_version: bulwark_proto::PROTOCOL_VERSION,
        };
        let (tx, rx) = mpsc::channel(4);
        tx.send(AgentMessage {
            kind: Some(Kind::Hello(hello)),
        })
        .await
        .unwrap();
        let snapshots = DiscoveryClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Agent {
            frontend,
            tx,
            snapshots,
            view: Snapshot::default(),
        }
    }

    /// Receives the next snapshot, ACKs it, and returns the whole view it makes.
    async fn next_and_ack(&mut self) -> Snapshot {
        let snapshot = tokio::time::timeout(DEADLINE, self.snapshots.message())
            .await
            .expect("no snapshot within the deadline")
            .unwrap()
            .expect("stream ended");
        let ack = Kind::Ack(Ack {
            version: snapshot.version,
        });
        self.tx
            .send(AgentMessage { kind: Some(ack) })
            .await
            .unwrap();
        bulwark_proto::delta::apply(&mut self.view, snapshot).unwrap();
        self.view.clone()
    }
}
fn reviews_attempts(snapshot: &Snapshot) -> Option<u32> {
    let reviews = snapshot.services.iter().find(|s| s.name == "reviews")?;
    Some(
        reviews.ports[0]
            .resilience
            .as_ref()?
            .retry
            .as_ref()?
            .attempts,
    )
}

/// The `requests` of each inbound rate limit, by name.
fn limits(snapshot: &Snapshot) -> Vec<(String, u32)> {
    let inbound = snapshot.inbound.as_ref().unwrap();
    inbound
        .rate_limits
        .iter()
        .map(|l| (l.name.clone(), l.requests))
        .collect()
}

/// The one version every snapshot carries: views with the same content agree on it.
/// Frontend agents get the two inbound limits of `demo/frontend`, the others none.
fn assert_limits_follow_roles(agents: &[Agent], snapshots: &[Snapshot]) {
    for (agent, snapshot) in agents.iter().zip(snapshots) {
        let expected = if agent.frontend { 2 } else { 0 };
        assert_eq!(
            limits(snapshot).len(),
            expected,
            "frontend: {}",
            agent.frontend
        );
    }
}

fn one_version<'a>(snapshots: impl IntoIterator<Item = &'a Snapshot>) -> u64 {
    let versions: BTreeSet<u64> = snapshots.into_iter().map(|s| s.version).collect();
    assert_eq!(versions.len(), 1, "versions: {versions:?}");
    versions.into_iter().next().unwrap()
}

/// What `/agents` says of each group, frontend pods first: for every agent, the version
/// last sent, the version last ACKed and how many snapshots it got.
async fn check_agents(fx: &Fixture, frontend: (u64, u64), other: (u64, u64)) {
    let agents = listed_agents(fx).await;
    assert_eq!(agents.len(), AGENTS);
    let mut frontends = 0;
    for agent in &agents {
        let (version, sent) = match agent["identity"]["labels"]["app"].as_str() {
            Some("frontend") => {
                frontends += 1;
                frontend
            }
            Some("other") => other,
            app => panic!("unexpected app label {app:?} in {agent}"),
        };
        assert_eq!(agent["sent_version"], version, "{agent}");
        assert_eq!(agent["last_ack"]["version"], version, "{agent}");
        assert_eq!(agent["snapshots_sent"], sent, "{agent}");
        assert_eq!(agent["acks"], sent, "{agent}");
        assert!(agent["last_nack"].is_null(), "{agent}");
    }
    assert_eq!(frontends, AGENTS / 2);
}

/// Threads and open file descriptors of this process, where the OS shows them (Linux).
fn threads_and_files() -> Option<(usize, usize)> {
    let count = |dir| Some(std::fs::read_dir(dir).ok()?.count());
    Some((count("/proc/self/task")?, count("/proc/self/fd")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_agents_get_only_the_changes_that_concern_them() {
    let started = Instant::now();
    let fx = Fixture::start().await;
    let endpoint = Endpoint::from_shared(format!("http://{}", fx.cp.grpc_addr())).unwrap();
    let channels = join_all((0..CHANNELS).map(|_| endpoint.connect())).await;
    let channels: Vec<Channel> = channels.into_iter().map(Result::unwrap).collect();
    let mut agents =
        join_all((0..AGENTS).map(|n| Agent::connect(channels[n % CHANNELS].clone(), n))).await;

    // Everyone gets the mesh and ACKs it.
    let first = join_all(agents.iter_mut().map(Agent::next_and_ack)).await;
    let v1 = one_version(&first);
    for snapshot in &first {
        assert_eq!(snapshot.services.len(), 4);
    }
    assert_limits_follow_roles(&agents, &first);
    wait_for_acks(&fx, AGENTS, AGENTS).await;
    check_agents(&fx, (v1, 1), (v1, 1)).await;
    // Both ends of the 20 connections live in this process, and this file holds this one
    // test only: a thread, a socket or a file per agent would show here.
    if let Some((threads, files)) = threads_and_files() {
        eprintln!("{threads} threads and {files} open files for {AGENTS} agents");
        assert!(
            threads < MAX_THREADS,
            "{threads} threads: is there a thread per agent?"
        );
        assert!(
            files < MAX_FILES,
            "{files} open files: is there one per agent?"
        );
    }
    eprintln!(
        "{AGENTS} agents connected and ACKed in {:?}",
        started.elapsed()
    );

    // A rate-limit edit reaches the frontend pods...
    let phase = Instant::now();
    fx.replace("ratelimit.yaml", "requests: 200", "requests: 300");
    let frontends = agents.iter_mut().filter(|a| a.frontend);
    let second = join_all(frontends.map(Agent::next_and_ack)).await;
    let v2 = one_version(&second);
    assert!(v2 > v1, "{v2} > {v1}");
    for snapshot in &second {
        assert_eq!(
            limits(snapshot),
            [("per-tenant".to_owned(), 20), ("total".to_owned(), 300)]
        );
    }
    wait_for_acks(&fx, AGENTS, AGENTS + AGENTS / 2).await;
    check_agents(&fx, (v2, 2), (v1, 1)).await;
    eprintln!(
        "a rate-limit edit reached {} frontends in {:?}",
        AGENTS / 2,
        phase.elapsed()
    );

    // ...and no other pod: the next thing each of them hears of is a later change that
    // concerns every agent.
    let phase = Instant::now();
    fx.replace("resilience.yaml", "attempts: 3 ", "attempts: 5 ");
    let third = join_all(agents.iter_mut().map(Agent::next_and_ack)).await;
    let v3 = one_version(&third);
    assert!(v3 > v2, "{v3} > {v2}");
    for snapshot in &third {
        assert_eq!(reviews_attempts(snapshot), Some(5));
    }
    assert_limits_follow_roles(&agents, &third);
    wait_for_acks(&fx, AGENTS, 2 * AGENTS + AGENTS / 2).await;
    check_agents(&fx, (v3, 3), (v3, 2)).await;
    assert_eq!(
        metric(&fx, "bulwark_cp_snapshots_sent_total").await,
        (2 * AGENTS + AGENTS / 2) as f64,
        "one snapshot per agent per change that concerns it, and no more"
    );
    assert_eq!(
        metric(&fx, "bulwark_cp_deltas_sent_total").await,
        (AGENTS + AGENTS / 2) as f64,
        "after the first, every snapshot is a delta"
    );
    eprintln!(
        "a resilience edit reached all {AGENTS} agents in {:?}",
        phase.elapsed()
    );

    // Agents that go away leave nothing behind.
    drop(agents);
    eventually("every agent to leave", || async {
        metric(&fx, "bulwark_cp_agents_connected").await == 0.0
    })
    .await;
    assert!(listed_agents(&fx).await.is_empty());
    fx.cp.shutdown().await;
    eprintln!("done in {:?}", started.elapsed());
}
