//! Shard- and replica-aware routing end to end: a client → the agent's outbound
//! listener → test upstreams that say who they are (`x-upstream`), with the real control
//! plane reading a ShardTopology and pushing it over gRPC.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bulwark_tests::assert_eventually;
use bulwark_tests::harness::{Harness, loopback, resilience_policy};
use bulwark_tests::mesh::{LabelledPod, Mesh, NAMESPACE, service_with_pods_yaml};
use bulwark_tests::upstream::{Knobs, Upstream};
use http::Method;

const ORDERS: &str = "http://orders.test/orders";

/// The pods of `orders`: shard a (primary, two replicas) and shard b (primary, one replica).
struct Pods {
    ups: BTreeMap<&'static str, Upstream>,
}

impl Pods {
    async fn start() -> Pods {
        let mut ups = BTreeMap::new();
        for name in [
            "a-primary",
            "a-replica-0",
            "a-replica-1",
            "b-primary",
            "b-replica-0",
        ] {
            let up = Upstream::start(loopback(), name, Knobs::healthy())
                .await
                .expect("upstream starts");
            ups.insert(name, up);
        }
        Pods { ups }
    }

    fn get(&self, name: &str) -> &Upstream {
        &self.ups[name]
    }

    fn yaml(&self) -> String {
        let addr = |n: &str| -> SocketAddr { self.ups[n].addr() };
        let pods: Vec<LabelledPod<'_>> = vec![
            (
                "a-primary",
                addr("a-primary"),
                &[("shard", "a"), ("role", "primary")],
            ),
            (
                "a-replica-0",
                addr("a-replica-0"),
                &[("shard", "a"), ("role", "replica")],
            ),
            (
                "a-replica-1",
                addr("a-replica-1"),
                &[("shard", "a"), ("role", "replica")],
            ),
            (
                "b-primary",
                addr("b-primary"),
                &[("shard", "b"), ("role", "primary")],
            ),
            (
                "b-replica-0",
                addr("b-replica-0"),
                &[("shard", "b"), ("role", "replica")],
            ),
        ];
        service_with_pods_yaml("orders", &pods)
    }
}

/// A ShardTopology on `orders` with two shards and `extra` spec lines (key, strategy...).
fn topology(extra: &str) -> String {
    format!(
        "apiVersion: bulwark.io/v1alpha1
kind: ShardTopology
metadata:
  name: orders
  namespace: {NAMESPACE}
spec:
  targetRefs: [{{kind: Service, name: orders}}]
  shards:
    - name: a
      primary: {{matchLabels: {{shard: a, role: primary}}}}
      replicas: {{matchLabels: {{shard: a, role: replica}}}}
    - name: b
      primary: {{matchLabels: {{shard: b, role: primary}}}}
      replicas: {{matchLabels: {{shard: b, role: replica}}}}
{extra}"
    )
}

/// Keys below "m" are shard a, the rest shard b.
const RANGES: &str = "  key: {type: Header, name: x-customer}
  strategy:
    type: Range
    ranges:
      - {end: m, shard: a}
      - {start: m, shard: b}
";

async fn start(pods: &Pods, topology_yaml: &str, policy: Option<&str>) -> Harness {
    let mesh = Mesh::new().expect("a temporary mesh folder");
    mesh.write("service-orders.yaml", &pods.yaml())
        .expect("the mesh folder is writable");
    mesh.write("topology.yaml", topology_yaml)
        .expect("the mesh folder is writable");
    if let Some(spec) = policy {
        mesh.write_policy("policy.yaml", &resilience_policy("orders", "orders", spec))
            .expect("the mesh folder is writable");
    }
    let h = Harness::start(mesh).await;
    // Wait until the topology is in force (the first snapshot may predate it).
    assert_eventually!(
        h.config().await["config"]["destinations"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| !d["shardTopology"].is_null()))
    );
    h
}

async fn send(
    h: &Harness,
    method: Method,
    customer: &str,
    extra: &[(&str, &str)],
) -> (u16, String) {
    let mut headers = vec![("x-customer", customer)];
    headers.extend_from_slice(extra);
    let rsp = h
        .client
        .request(method, ORDERS, &headers, "")
        .await
        .expect("the agent answers");
    (
        rsp.status.as_u16(),
        rsp.upstream().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn every_key_reaches_its_shard_reads_land_on_replicas_and_writes_on_the_primary() {
    let pods = Pods::start().await;
    // Round robin, so the balance check below is exact: with the default LeastRequest,
    // sequential reads tie and a random pick can leave a replica under 4 of 12.
    let h = start(
        &pods,
        &topology(RANGES),
        Some("  loadBalancer:\n    strategy: RoundRobin\n"),
    )
    .await;

    for customer in ["alice", "bob", "kate", "mallory", "zed", "m"] {
        let shard = if customer < "m" { "a" } else { "b" };
        for _ in 0..4 {
            let (status, who) = send(&h, Method::GET, customer, &[]).await;
            assert_eq!(status, 200);
            assert!(
                who.starts_with(&format!("{shard}-replica")),
                "{customer} read from {who}"
            );
        }
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            let (status, who) = send(&h, method, customer, &[]).await;
            assert_eq!(status, 200);
            assert_eq!(who, format!("{shard}-primary"), "{customer} wrote to {who}");
        }
        let (_, who) = send(
            &h,
            Method::GET,
            customer,
            &[("x-bulwark-consistency", "strong")],
        )
        .await;
        assert_eq!(
            who,
            format!("{shard}-primary"),
            "a strong read goes to the primary"
        );
    }
    // Reads are balanced over both replicas of shard a.
    assert!(
        pods.get("a-replica-0").stats().total >= 4,
        "{}",
        pods.get("a-replica-0").stats().total
    );
    assert!(pods.get("a-replica-1").stats().total >= 4);

    let m = h.metrics().await;
    let dst = ("dst", "orders.test:80");
    assert!(
        m.get(
            "bulwark_shard_requests_total",
            &[dst, ("shard", "a"), ("role", "replica")]
        ) >= 12.0
    );
    assert_eq!(
        m.get(
            "bulwark_shard_requests_total",
            &[dst, ("shard", "b"), ("role", "primary")]
        ),
        12.0
    );
    assert_eq!(
        m.get(
            "bulwark_shard_errors_total",
            &[dst, ("shard", "b"), ("role", "primary")]
        ),
        0.0
    );

    // /config shows the topology and who holds which shard and role.
    let config = h.config().await;
    let dests = config["config"]["destinations"].as_array().unwrap();
    let topo = &dests
        .iter()
        .find(|d| d["name"] == "orders.test:80")
        .unwrap()["shardTopology"];
    assert_eq!(topo["source"], "test/orders");
    assert_eq!(topo["strategy"], "Range");
    assert_eq!(topo["shards"][0]["name"], "a");
    assert_eq!(
        topo["shards"][0]["primary"][0],
        pods.get("a-primary").addr().to_string()
    );
    assert_eq!(topo["shards"][0]["replicas"].as_array().unwrap().len(), 2);
    assert_eq!(
        topo["shards"][1]["replicas"][0],
        pods.get("b-replica-0").addr().to_string()
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_request_without_a_key_is_refused_or_goes_to_the_default_shard() {
    let pods = Pods::start().await;
    let h = start(&pods, &topology(RANGES), None).await;
    let rsp = h.client.get(ORDERS, &[]).await.unwrap();
    assert_eq!(rsp.status, 400);
    assert_eq!(rsp.reason(), Some("shard-key-missing"));
    assert_eq!(rsp.upstream(), None, "no upstream saw it");

    // With a default shard, keyless requests go there.
    h.mesh
        .write(
            "topology.yaml",
            &topology(&format!(
                "{RANGES}  missingKey: {{action: DefaultShard, shard: b}}\n"
            )),
        )
        .unwrap();
    assert_eventually!(h.client.get(ORDERS, &[]).await.unwrap().status == 200);
    let rsp = h.client.get(ORDERS, &[]).await.unwrap();
    assert_eq!(rsp.upstream(), Some("b-replica-0"));
    h.shutdown().await;
}

#[tokio::test]
async fn a_client_reads_its_own_writes_from_the_primary_for_the_window_and_from_replicas_after() {
    let pods = Pods::start().await;
    let h = start(
        &pods,
        &topology(&format!(
            "{RANGES}  readYourWrites: {{window: 3s, clientHeader: x-session}}\n"
        )),
        None,
    )
    .await;
    let alice = [("x-session", "alice")];
    let bob = [("x-session", "bob")];
    let (_, who) = send(&h, Method::GET, "carol", &alice).await;
    assert!(who.starts_with("a-replica"), "no write yet: {who}");
    let (_, who) = send(&h, Method::POST, "carol", &alice).await;
    assert_eq!(who, "a-primary");
    // Right after the write (well within the window on a loaded machine), alice reads
    // from the primary; bob, who did not write, from a replica; alice's reads of the
    // other shard are not affected.
    let (_, who) = send(&h, Method::GET, "carol", &alice).await;
    assert_eq!(who, "a-primary", "alice reads her write");
    let (_, who) = send(&h, Method::GET, "carol", &bob).await;
    assert!(who.starts_with("a-replica"), "bob: {who}");
    let (_, who) = send(&h, Method::GET, "zoe", &alice).await;
    assert!(who.starts_with("b-replica"), "other shard: {who}");
    // A client without the header is known by its address: its own write sends its
    // reads to the primary, and no one else's.
    let (_, who) = send(&h, Method::GET, "dave", &[]).await;
    assert!(
        who.starts_with("a-replica"),
        "no header, no write yet: {who}"
    );
    let (_, who) = send(&h, Method::PUT, "dave", &[]).await;
    assert_eq!(who, "a-primary");
    let (_, who) = send(&h, Method::GET, "dave", &[]).await;
    assert_eq!(who, "a-primary", "a header-less client reads its write");
    let (_, who) = send(&h, Method::GET, "carol", &bob).await;
    assert!(
        who.starts_with("a-replica"),
        "bob is not that client: {who}"
    );
    // After the window, alice reads from replicas again.
    assert_eventually!(
        send(&h, Method::GET, "carol", &alice)
            .await
            .1
            .starts_with("a-replica")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn open_replica_breakers_move_reads_to_other_replicas_then_to_the_primary_and_a_down_primary_fails_writes_fast()
 {
    let pods = Pods::start().await;
    let h = start(
        &pods,
        &topology(RANGES),
        Some("  circuitBreaker:\n    consecutiveFailures: 1\n    openDuration: 1m\n    maxOpenDuration: 1m\n  loadBalancer:\n    strategy: RoundRobin\n"),
    )
    .await;
    pods.get("a-replica-0").set_knobs(Knobs::failing(1.0, 500));
    // Round robin reaches the failing replica within two reads; its breaker opens.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(send(&h, Method::GET, "carol", &[]).await.0);
    }
    assert!(statuses.contains(&500), "{statuses:?}");
    for _ in 0..6 {
        assert_eq!(
            send(&h, Method::GET, "carol", &[]).await,
            (200, "a-replica-1".to_owned())
        );
    }
    // The last replica fails too: reads fall back to the primary.
    pods.get("a-replica-1").set_knobs(Knobs::failing(1.0, 500));
    assert_eq!(send(&h, Method::GET, "carol", &[]).await.0, 500);
    for _ in 0..4 {
        assert_eq!(
            send(&h, Method::GET, "carol", &[]).await,
            (200, "a-primary".to_owned())
        );
    }
    let m = h.metrics().await;
    assert_eq!(
        m.get(
            "bulwark_shard_fallbacks_total",
            &[("dst", "orders.test:80"), ("shard", "a")]
        ),
        4.0
    );
    // The primary goes down: its breaker opens, and writes fail fast, never to a replica.
    pods.get("a-primary").set_knobs(Knobs::failing(1.0, 503));
    assert_eq!(send(&h, Method::POST, "carol", &[]).await.0, 503);
    let seen = pods.get("a-primary").stats().total;
    for _ in 0..3 {
        let rsp = h
            .client
            .request(Method::POST, ORDERS, &[("x-customer", "carol")], "")
            .await
            .unwrap();
        assert_eq!(rsp.status, 503);
        assert_eq!(rsp.reason(), Some("shard-primary-unavailable"));
    }
    assert_eq!(
        pods.get("a-primary").stats().total,
        seen,
        "nothing reached the primary"
    );
    // Shard b is untouched.
    assert_eq!(
        send(&h, Method::POST, "zoe", &[]).await,
        (200, "b-primary".to_owned())
    );
    let m = h.metrics().await;
    assert!(
        m.get(
            "bulwark_shard_errors_total",
            &[
                ("dst", "orders.test:80"),
                ("shard", "a"),
                ("role", "primary")
            ]
        ) >= 4.0
    );
    h.shutdown().await;
}

#[tokio::test]
async fn hashed_keys_spread_over_every_shard_and_each_key_stays_on_its_shard() {
    let pods = Pods::start().await;
    let h = start(
        &pods,
        &topology("  key: {type: Path, segment: 1}\n  strategy: {type: ConsistentHash}\n"),
        None,
    )
    .await;
    let mut by_shard: BTreeMap<char, usize> = BTreeMap::new();
    for i in 0..40 {
        let url = format!("http://orders.test/customers/c{i}/orders");
        let first = h.client.get(&url, &[]).await.unwrap();
        let shard = first.upstream().unwrap().chars().next().unwrap();
        *by_shard.entry(shard).or_default() += 1;
        for _ in 0..2 {
            let again = h.client.get(&url, &[]).await.unwrap();
            assert_eq!(
                again.upstream().unwrap().chars().next(),
                Some(shard),
                "c{i} stays on {shard}"
            );
        }
        let write = h
            .client
            .request(Method::PATCH, &url, &[], "")
            .await
            .unwrap();
        assert_eq!(write.upstream(), Some(format!("{shard}-primary").as_str()));
    }
    assert_eq!(by_shard.len(), 2, "{by_shard:?}");
    assert!(by_shard.values().all(|n| *n >= 8), "{by_shard:?}");
    h.shutdown().await;
}

/// Starts `n` plain upstreams `web-{i}` behind Service `web`, pod `web-{i}` labelled
/// `weight: WEIGHTS[i]`.
async fn weighted_web(weights: &[&'static str], policy: &str) -> (Vec<Upstream>, Harness) {
    let mut ups = Vec::new();
    for i in 0..weights.len() {
        ups.push(
            Upstream::start(loopback(), &format!("web-{i}"), Knobs::healthy())
                .await
                .expect("upstream starts"),
        );
    }
    let names: Vec<String> = (0..weights.len()).map(|i| format!("web-{i}")).collect();
    let labels: Vec<[(&str, &str); 1]> = weights.iter().map(|w| [("weight", *w)]).collect();
    let pods: Vec<LabelledPod<'_>> = names
        .iter()
        .zip(&ups)
        .zip(&labels)
        .map(|((n, u), l)| (n.as_str(), u.addr(), &l[..]))
        .collect();
    let mesh = Mesh::new().expect("a temporary mesh folder");
    mesh.write("service-web.yaml", &service_with_pods_yaml("web", &pods))
        .expect("the mesh folder is writable");
    mesh.write_policy("policy.yaml", &resilience_policy("web", "web", policy))
        .expect("the mesh folder is writable");
    let h = Harness::start(mesh).await;
    assert_eventually!(
        h.config().await["config"]["destinations"]
            .as_array()
            .is_some_and(|d| d
                .iter()
                .any(|d| d["name"] == "web.test:80" && d["loadBalancer"] != "LeastRequest"))
    );
    (ups, h)
}

#[tokio::test]
async fn weighted_round_robin_follows_the_pod_weight_label() {
    let (ups, h) = weighted_web(
        &["3", "1", "not-a-number"],
        "  loadBalancer: {strategy: WeightedRoundRobin, weightLabel: weight}\n",
    )
    .await;
    // The schedule is deterministic: 500 requests are exactly 100 turns of 3:1:1.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..500 {
        let rsp = h.client.get("http://web.test/", &[]).await.unwrap();
        *counts
            .entry(rsp.upstream().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(counts["web-0"], 300, "{counts:?}");
    assert_eq!(counts["web-1"], 100, "{counts:?}");
    assert_eq!(
        counts["web-2"], 100,
        "an unreadable weight counts as 1: {counts:?}"
    );
    drop(ups);
    h.shutdown().await;
}

#[tokio::test]
async fn consistent_hash_keeps_each_session_on_one_endpoint() {
    let (ups, h) = weighted_web(
        &["1", "1", "1"],
        "  loadBalancer: {strategy: ConsistentHash, hashOn: {cookie: session}}\n",
    )
    .await;
    let mut homes = BTreeMap::new();
    for i in 0..30 {
        let cookie = format!("theme=dark; session=s{i}");
        let first = h
            .client
            .get("http://web.test/", &[("cookie", &cookie)])
            .await
            .unwrap();
        let home = first.upstream().unwrap().to_owned();
        for _ in 0..3 {
            let again = h
                .client
                .get("http://web.test/", &[("cookie", &cookie)])
                .await
                .unwrap();
            assert_eq!(again.upstream(), Some(home.as_str()), "session s{i}");
        }
        homes.insert(i, home);
    }
    let used: std::collections::BTreeSet<_> = homes.values().collect();
    assert!(used.len() >= 2, "sessions spread: {homes:?}");
    drop(ups);
    h.shutdown().await;
}

#[tokio::test]
async fn a_grpc_call_is_routed_by_its_metadata_and_a_keyless_call_gets_a_grpc_status() {
    let pods = Pods::start().await;
    let h = start(
        &pods,
        &topology(
            "  key: {type: GrpcMetadata, name: x-customer}
  strategy:
    type: Range
    ranges:
      - {end: m, shard: a}
      - {start: m, shard: b}
  reads:
    grpcMethods: [/shop.Orders/Get]
",
        ),
        None,
    )
    .await;
    // A gRPC client speaks HTTP/2 (h2c) to the outbound listener.
    let grpc = bulwark_tests::HttpClient::h2(h.agent.outbound_addr());
    let call = |method: &'static str, customer: Option<&'static str>| {
        let grpc = grpc.clone();
        async move {
            let metadata: Vec<(&str, &str)> =
                customer.map(|c| ("x-customer", c)).into_iter().collect();
            grpc.grpc(
                &format!("http://orders.test/shop.Orders/{method}"),
                &metadata,
                b"order",
            )
            .await
            .expect("the agent answers")
        }
    };
    for (customer, shard) in [
        ("alice", "a"),
        ("kate", "a"),
        ("mallory", "b"),
        ("zed", "b"),
    ] {
        for _ in 0..3 {
            let rsp = call("Get", Some(customer)).await;
            assert_eq!(rsp.grpc_status(), Some(0));
            let who = rsp.upstream().unwrap_or_default();
            assert!(
                who.starts_with(&format!("{shard}-replica")),
                "{customer}'s Get (a read method) went to {who}"
            );
        }
        // Any other method is a write, although every gRPC call is a POST.
        let rsp = call("Put", Some(customer)).await;
        assert_eq!(rsp.grpc_status(), Some(0));
        assert_eq!(
            rsp.upstream(),
            Some(format!("{shard}-primary").as_str()),
            "{customer}'s Put"
        );
    }

    // No key: a trailers-only gRPC answer the client can read, not a bare 400.
    let rsp = call("Get", None).await;
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.header("content-type"), Some("application/grpc"));
    assert_eq!(rsp.grpc_status(), Some(3), "INVALID_ARGUMENT");
    assert!(
        rsp.trailers.is_none(),
        "trailers-only: the status is in the headers"
    );
    assert!(rsp.body.is_empty());
    assert_eq!(rsp.reason(), Some("shard-key-missing"));
    assert_eq!(
        rsp.header("grpc-message"),
        Some("bulwark: shard-key-missing")
    );
    assert_eq!(rsp.upstream(), None, "no upstream saw it");
    let primaries: u64 = ["a-primary", "b-primary"]
        .iter()
        .map(|p| pods.get(p).stats().total)
        .sum();
    assert_eq!(primaries, 4, "only the four Puts reached a primary");
    h.shutdown().await;
}

/// The weights `/config` shows for `web.test:80`, by endpoint address.
async fn weights_in_force(h: &Harness) -> BTreeMap<String, u64> {
    let config = h.config().await;
    config["config"]["destinations"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == "web.test:80"))
        .and_then(|d| d["endpoints"].as_array())
        .map(|endpoints| {
            endpoints
                .iter()
                .map(|e| {
                    (
                        e["address"].as_str().unwrap_or_default().to_owned(),
                        e["weight"].as_u64().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn spread(h: &Harness, requests: usize) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..requests {
        let rsp = h
            .client
            .get("http://web.test/", &[])
            .await
            .expect("the agent answers");
        *counts
            .entry(rsp.upstream().expect("an upstream answered").to_owned())
            .or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn weighted_round_robin_weights_come_from_the_policy_then_the_annotation_then_the_label() {
    let mut ups = Vec::new();
    for i in 0..3 {
        ups.push(
            Upstream::start(loopback(), &format!("web-{i}"), Knobs::healthy())
                .await
                .unwrap(),
        );
    }
    let pods: Vec<LabelledPod<'_>> = vec![
        // The annotation (3) wins over the label (1).
        ("web-0", ups[0].addr(), &[("weight", "1")]),
        ("web-1", ups[1].addr(), &[("weight", "2"), ("tier", "gold")]),
        // An invalid annotation is ignored: no label either, so it weighs 1.
        ("web-2", ups[2].addr(), &[]),
    ];
    let annotations = [
        ("web-0", "bulwark.io/weight", "3"),
        ("web-2", "bulwark.io/weight", "heavy"),
    ];
    let mesh = Mesh::new().unwrap();
    mesh.write(
        "service-web.yaml",
        &bulwark_tests::mesh::service_with_annotated_pods_yaml("web", &pods, &annotations),
    )
    .unwrap();
    let policy = |extra: &str| {
        resilience_policy(
            "web",
            "web",
            &format!(
                "  loadBalancer:\n    strategy: WeightedRoundRobin\n    weightLabel: weight\n{extra}"
            ),
        )
    };
    mesh.write_policy("policy.yaml", &policy("")).unwrap();
    let h = Harness::start(mesh).await;
    let addr = |i: usize| ups[i].addr().to_string();
    assert_eventually!(weights_in_force(&h).await.get(&addr(0)) == Some(&3));
    let weights = weights_in_force(&h).await;
    assert_eq!(weights[&addr(1)], 2, "the label, without an annotation");
    assert_eq!(weights[&addr(2)], 1, "an invalid annotation counts as none");

    // Any 600 requests are whole turns of the 3:2:1 schedule.
    let counts = spread(&h, 600).await;
    assert_eq!(
        (counts["web-0"], counts["web-1"], counts["web-2"]),
        (300, 200, 100),
        "{counts:?}"
    );

    // A policy weight beats both; the first matching entry wins.
    h.mesh
        .write_policy(
            "policy.yaml",
            &policy(
                "    weights:\n      - {selector: {matchLabels: {tier: gold}}, weight: 5}\n      - {selector: {matchLabels: {app: web}}, weight: 7}\n",
            ),
        )
        .unwrap();
    assert_eventually!(weights_in_force(&h).await.get(&addr(1)) == Some(&5));
    let weights = weights_in_force(&h).await;
    assert_eq!(
        weights[&addr(0)],
        7,
        "the second entry, over the annotation"
    );
    assert_eq!(weights[&addr(2)], 7);
    let counts = spread(&h, 1_900).await;
    assert_eq!(
        (counts["web-0"], counts["web-1"], counts["web-2"]),
        (700, 500, 700),
        "{counts:?}"
    );
    h.shutdown().await;
}
