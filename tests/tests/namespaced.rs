//! End to end through real iptables redirects: two pods as network namespaces,
//! each with `bulwark-agent init`'s rules and an agent running as the skipped
//! UID, a control plane in the root namespace. A plain client in pod A dials
//! pod B's address (or its Service's cluster IP) and knows nothing of the mesh.
//!
//! Root only: elsewhere each test prints that it was skipped (and fails on CI).
#![cfg(target_os = "linux")]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bulwark_control_plane::{ControlPlane, Source};
use bulwark_tests::grpc;
use bulwark_tests::mesh::NAMESPACE;
use bulwark_tests::netns::{self, Pod, Topology};
use bulwark_tests::{HttpClient, Knobs, Mesh, Metrics, Upstream, eventually_named, poll_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;

/// The UID and GID the agents run as (what `init` skips by default).
const AGENT_UID: &str = "1337";
const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
/// A server-speaks-first protocol, declared `appProtocol: tcp`.
const GREETING_PORT: u16 = 7000;
/// The same protocol on a port that declares nothing: found by detection's timeout.
const UNDECLARED_PORT: u16 = 7001;
const ADMIN_PORT: u16 = 4191;
const DEADLINE: Duration = Duration::from_secs(30);

/// Service `server` (pod B) with an HTTP port left to detection, a gRPC port and
/// an opaque port, and a cluster IP that only the redirect rules give meaning to.
fn server_yaml(cluster_ip: IpAddr, pod_ip: IpAddr, pod_ip6: Option<IpAddr>) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: server
  namespace: {NAMESPACE}
spec:
  clusterIP: {cluster_ip}
  selector:
    app: server
  ports:
    - name: http
      port: {HTTP_PORT}
      targetPort: {HTTP_PORT}
    - name: grpc
      port: {GRPC_PORT}
      targetPort: {GRPC_PORT}
      appProtocol: grpc
    - name: greeting
      port: {GREETING_PORT}
      targetPort: {GREETING_PORT}
      appProtocol: tcp
    - name: undeclared
      port: {UNDECLARED_PORT}
      targetPort: {UNDECLARED_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: server-0
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: server
addressType: IPv4
ports:
  - name: http
    port: {HTTP_PORT}
  - name: grpc
    port: {GRPC_PORT}
  - name: greeting
    port: {GREETING_PORT}
  - name: undeclared
    port: {UNDECLARED_PORT}
endpoints:
  - addresses: [\"{pod_ip}\"]
    conditions:
      ready: true
    targetRef:
      kind: Pod
      name: server-0
      namespace: {NAMESPACE}
"
    );
    if let Some(ip6) = pod_ip6 {
        yaml.push_str(&format!(
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: server-0-v6
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: server
addressType: IPv6
ports:
  - name: http
    port: {HTTP_PORT}
endpoints:
  - addresses: [\"{ip6}\"]
    conditions:
      ready: true
    targetRef:
      kind: Pod
      name: server-0
      namespace: {NAMESPACE}
"
        ));
    }
    yaml
}

/// Two pods (client, server) with rules and agents, and a control plane.
struct Cluster {
    // Dropped first: the agents, then the control plane, then the namespaces.
    agents: Vec<Child>,
    control_plane: Option<ControlPlane>,
    mesh: Mesh,
    topology: Topology,
    agent_bin: PathBuf,
}

impl Cluster {
    /// Builds the pods, installs the rules, starts the control plane and both
    /// agents (with `extra` agent flags), and waits until both are ready.
    async fn start(extra: &[&str]) -> Cluster {
        Self::start_with(extra, false).await
    }

    /// Like [`Cluster::start`]; with `dual_stack`, the pods have IPv6 addresses
    /// too and the agents listen for redirected IPv6 connections.
    async fn start_with(extra: &[&str], dual_stack: bool) -> Cluster {
        let agent_bin = netns::binary("bulwark-agent").expect("bulwark-agent builds");
        let names = ["client", "server"];
        let topology = if dual_stack {
            Topology::dual_stack(&names)
        } else {
            Topology::new(&names)
        }
        .expect("namespaces and veths");
        let server_ip = IpAddr::V4(topology.pod("server").ip);
        let server_ip6 = topology.pod("server").ip6.map(IpAddr::V6);
        let mesh = Mesh::new().expect("mesh folder");
        mesh.write(
            "service-server.yaml",
            &server_yaml(IpAddr::V4(cluster_ip(&topology)), server_ip, server_ip6),
        )
        .expect("service written");
        let control_plane = ControlPlane::start(bulwark_control_plane::Settings {
            source: Source::Dir(vec![mesh.path().to_path_buf()]),
            grpc_addr: SocketAddr::new(IpAddr::V4(topology.root_ip), 0),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            debounce: Duration::from_millis(50),
            identity: None,
        })
        .await
        .expect("control plane starts");
        let mut cluster = Cluster {
            agents: Vec::new(),
            control_plane: Some(control_plane),
            mesh,
            topology,
            agent_bin,
        };
        for pod in &cluster.topology.pods {
            pod.netns
                .exec(&cluster.agent_bin.to_string_lossy(), &["init"])
                .expect("bulwark-agent init installs the rules");
        }
        for index in 0..cluster.topology.pods.len() {
            let mut flags = extra.to_vec();
            if dual_stack {
                // `[::]` takes IPv4 clients too (as mapped addresses).
                flags.extend(["--outbound-addr-v6", "[::1]:4140"]);
                flags.extend(["--inbound-transparent", "[::]:4143"]);
            } else {
                flags.extend(["--inbound-transparent", "0.0.0.0:4143"]);
            }
            let child = cluster.spawn_agent(index, &flags);
            cluster.agents.push(child);
        }
        for pod in &cluster.topology.pods {
            let admin = HttpClient::direct(SocketAddr::new(IpAddr::V4(pod.ip), ADMIN_PORT));
            let logs = cluster.topology.logs.path().display().to_string();
            poll_until(
                DEADLINE,
                &format!("agent of {} is ready (logs in {logs})", pod.name),
                || {
                    let admin = admin.clone();
                    async move {
                        admin
                            .get("/ready", &[])
                            .await
                            .ok()
                            .filter(|r| r.status == 200)
                    }
                },
            )
            .await
            .expect("agent ready");
        }
        cluster
    }

    fn spawn_agent(&self, index: usize, extra: &[&str]) -> Child {
        let pod = &self.topology.pods[index];
        let cp = self
            .control_plane
            .as_ref()
            .expect("control plane running")
            .grpc_addr();
        let (log, _) = self
            .topology
            .log_file(&format!("agent-{}", pod.name))
            .expect("log file");
        let mut cmd = pod.netns.command("setpriv");
        cmd.args([
            "--reuid",
            AGENT_UID,
            "--regid",
            AGENT_UID,
            "--clear-groups",
            "--",
        ])
        .arg(&self.agent_bin)
        .args(["--control-plane", &format!("http://{cp}")])
        .args([
            "--namespace",
            NAMESPACE,
            "--pod-name",
            &format!("{}-0", pod.name),
        ])
        .args(["--label", &format!("app={}", pod.name)])
        .args(["--outbound-addr", "127.0.0.1:4140"])
        .args(["--admin-addr", &format!("0.0.0.0:{ADMIN_PORT}")])
        .args(extra)
        .env("RUST_LOG", "info,bulwark_agent=debug")
        .stdout(Stdio::null())
        .stderr(log);
        cmd.spawn().expect("agent starts")
    }

    fn pod(&self, name: &str) -> &Pod {
        self.topology.pod(name)
    }

    /// A test upstream named `server-0` on `port` in the server pod, with the namespace
    /// runtime it runs on (the upstream stops when that runtime is dropped).
    async fn serve_upstream(&self, port: u16, knobs: Knobs) -> (netns::NsRuntime, Upstream) {
        let runtime = self
            .pod("server")
            .netns
            .runtime()
            .expect("a runtime in the server pod's namespace");
        let upstream = runtime
            .run(Upstream::start(
                SocketAddr::from(([0, 0, 0, 0], port)),
                "server-0",
                knobs,
            ))
            .await
            .expect("the test upstream starts in the server pod");
        (runtime, upstream)
    }

    fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.pod(pod).ip), port)
    }

    async fn metrics(&self, pod: &str) -> Metrics {
        Metrics::scrape(self.addr(pod, ADMIN_PORT))
            .await
            .expect("agent metrics")
    }

    /// Waits until both agents have a config that includes the newest mesh files.
    async fn wait_for_version_above(&self, pod: &str, version: f64) {
        eventually_named(
            DEADLINE,
            "a newer config reaches the agent",
            || async move { self.metrics(pod).await.get("bulwark_config_version", &[]) > version },
        )
        .await;
    }
}

impl Drop for Cluster {
    /// A failing test shows the end of each agent's log.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.topology.logs.path()) else {
            return;
        };
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last lines of {} ---\n{}",
                entry.path().display(),
                tail.join("\n")
            );
        }
    }
}

fn cluster_ip(topology: &Topology) -> std::net::Ipv4Addr {
    topology.virtual_ip(250)
}

fn skip(test: &str) -> bool {
    !netns::can_run(test)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_from_a_plain_client_goes_through_both_agents() {
    if skip("http_from_a_plain_client_goes_through_both_agents") {
        return;
    }
    let cluster = Cluster::start(&[]).await;
    let (_server_rt, _upstream) = cluster.serve_upstream(HTTP_PORT, Knobs::default()).await;
    let client_rt = cluster.pod("client").netns.runtime().unwrap();

    // To the pod's own address, and to the Service's cluster IP.
    let pod_addr = cluster.addr("server", HTTP_PORT);
    let vip = SocketAddr::new(IpAddr::V4(cluster_ip(&cluster.topology)), HTTP_PORT);
    for target in [pod_addr, vip] {
        let rsp = client_rt
            .run(async move { HttpClient::direct(target).get("/hello", &[]).await })
            .await
            .unwrap();
        assert_eq!(rsp.status, 200, "{target}: {}", rsp.text());
        assert_eq!(rsp.upstream(), Some("server-0"));
        assert_eq!(rsp.reason(), None);
    }

    let client = cluster.metrics("client").await;
    let outbound = [
        ("direction", "outbound"),
        ("dst", "server.test:8080"),
        ("status_class", "2xx"),
    ];
    assert_eq!(
        client.get("bulwark_requests_total", &outbound),
        2.0,
        "the client's agent proxied both calls"
    );
    let server = cluster.metrics("server").await;
    let inbound = [
        ("direction", "inbound"),
        ("dst", "localhost:8080"),
        ("status_class", "2xx"),
    ];
    assert_eq!(
        server.get("bulwark_requests_total", &inbound),
        2.0,
        "the server's agent took both calls in"
    );
    // The agents' own connections (to the control plane, to each other) were not
    // redirected into themselves: nothing went out as passthrough.
    assert_eq!(client.get("bulwark_passthrough_requests_total", &[]), 0.0);
    assert_eq!(
        client.get("bulwark_passthrough_connections_total", &[]),
        0.0
    );

    // A destination outside the mesh (the root namespace) is passed through untouched, and counted.
    let outside = Upstream::start(
        SocketAddr::new(IpAddr::V4(cluster.topology.root_ip), 0),
        "outside",
        Knobs::default(),
    )
    .await
    .unwrap();
    let outside_addr = outside.addr();
    let rsp = client_rt
        .run(async move { HttpClient::direct(outside_addr).get("/", &[]).await })
        .await
        .unwrap();
    assert_eq!(rsp.upstream(), Some("outside"));
    assert_eq!(
        cluster
            .metrics("client")
            .await
            .get("bulwark_passthrough_requests_total", &[]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_from_a_plain_client_goes_through_both_agents() {
    if skip("ipv6_from_a_plain_client_goes_through_both_agents") {
        return;
    }
    let cluster = Cluster::start_with(&[], true).await;
    let (_server_rt, _upstream) = cluster.serve_upstream(HTTP_PORT, Knobs::default()).await;
    let client_rt = cluster.pod("client").netns.runtime().unwrap();
    let v6 = SocketAddr::new(IpAddr::V6(cluster.pod("server").ip6.unwrap()), HTTP_PORT);
    // Over IPv6 (ip6tables rules, IP6T_SO_ORIGINAL_DST), and over IPv4 to the
    // same dual-stack listeners (an IPv4 conntrack entry behind a [::] socket).
    for target in [v6, cluster.addr("server", HTTP_PORT)] {
        let rsp = client_rt
            .run(async move { HttpClient::direct(target).get("/", &[]).await })
            .await
            .unwrap();
        assert_eq!(rsp.status, 200, "{target}: {}", rsp.text());
        assert_eq!(rsp.upstream(), Some("server-0"));
    }
    let client = cluster.metrics("client").await;
    assert_eq!(
        client.get(
            "bulwark_requests_total",
            &[
                ("direction", "outbound"),
                ("dst", "server.test:8080"),
                ("status_class", "2xx")
            ]
        ),
        2.0,
        "the IPv6 pod address maps to the service like the IPv4 one"
    );
    let server = cluster.metrics("server").await;
    assert_eq!(
        server.get(
            "bulwark_requests_total",
            &[
                ("direction", "inbound"),
                ("dst", "localhost:8080"),
                ("status_class", "2xx")
            ]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_trips_on_a_pod_address() {
    if skip("a_breaker_trips_on_a_pod_address") {
        return;
    }
    let cluster = Cluster::start(&[]).await;
    let before = cluster
        .metrics("client")
        .await
        .get("bulwark_config_version", &[]);
    cluster
        .mesh
        .write(
            "policy.yaml",
            &bulwark_tests::harness::resilience_policy(
                "server",
                "server",
                "  circuitBreaker:\n    consecutiveFailures: 3\n    openDuration: 1m\n    maxOpenDuration: 1m\n",
            ),
        )
        .unwrap();
    cluster.wait_for_version_above("client", before).await;
    let (_server_rt, _upstream) = cluster
        .serve_upstream(HTTP_PORT, Knobs::failing(1.0, 500))
        .await;
    let client_rt = cluster.pod("client").netns.runtime().unwrap();
    let target = cluster.addr("server", HTTP_PORT);
    let statuses = client_rt
        .run(async move {
            let client = HttpClient::direct(target);
            let mut seen = Vec::new();
            for _ in 0..5 {
                let rsp = client.get("/", &[]).await.unwrap();
                seen.push((rsp.status.as_u16(), rsp.reason().map(str::to_owned)));
            }
            seen
        })
        .await;
    assert_eq!(
        &statuses[..3],
        &[(500, None), (500, None), (500, None)],
        "{statuses:?}"
    );
    assert_eq!(
        statuses[3],
        (503, Some("circuit-open".to_owned())),
        "{statuses:?}"
    );
    let client = cluster.metrics("client").await;
    assert_eq!(
        client.get(
            "bulwark_breaker_trips_total",
            &[
                ("dst", "server.test:8080"),
                ("endpoint", &target.to_string())
            ]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_agent_answers_429_over_its_rate_limit() {
    if skip("the_servers_agent_answers_429_over_its_rate_limit") {
        return;
    }
    let cluster = Cluster::start(&[]).await;
    let before = cluster
        .metrics("server")
        .await
        .get("bulwark_config_version", &[]);
    cluster
        .mesh
        .write(
            "ratelimit.yaml",
            &format!(
                "apiVersion: bulwark.io/v1alpha1
kind: RateLimitPolicy
metadata:
  name: server
  namespace: {NAMESPACE}
spec:
  targetRefs:
    - kind: Service
      name: server
  limits:
    - name: per-client
      key:
        type: ClientAddress
      rate:
        requests: 1
        per: 1h
      burst: 2
"
            ),
        )
        .unwrap();
    cluster.wait_for_version_above("server", before).await;
    let (_server_rt, _upstream) = cluster.serve_upstream(HTTP_PORT, Knobs::default()).await;
    let client_rt = cluster.pod("client").netns.runtime().unwrap();
    let target = cluster.addr("server", HTTP_PORT);
    let statuses = client_rt
        .run(async move {
            let client = HttpClient::direct(target);
            let mut seen = Vec::new();
            for _ in 0..3 {
                let rsp = client.get("/", &[]).await.unwrap();
                seen.push((rsp.status.as_u16(), rsp.reason().map(str::to_owned)));
            }
            seen
        })
        .await;
    assert_eq!(
        statuses,
        vec![
            (200, None),
            (200, None),
            (429, Some("rate-limited".to_owned()))
        ],
        "the bucket is keyed on the client pod's own address, which the redirect keeps"
    );
    let server = cluster.metrics("server").await;
    assert_eq!(
        server.get(
            "bulwark_rate_limited_total",
            &[("policy", "test/server"), ("limit", "per-client")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_on_an_opaque_port_is_not_held_by_detection() {
    if skip("a_server_first_protocol_on_an_opaque_port_is_not_held_by_detection") {
        return;
    }
    // Detection would wait a minute for the client's first bytes; the greeting
    // must arrive long before that, because the port is declared opaque.
    let cluster = Cluster::start(&["--detect-timeout-ms", "60000"]).await;
    let server_rt = cluster.pod("server").netns.runtime().unwrap();
    let client_rt = cluster.pod("client").netns.runtime().unwrap();
    serve_greeting(&server_rt, GREETING_PORT).await;
    let target = cluster.addr("server", GREETING_PORT);
    let (greeting, echoed) = greet(&client_rt, target).await;
    assert_eq!(greeting, b"220 greeting ready\r\n");
    assert_eq!(echoed, b"QUIT\r\n");
    let client = cluster.metrics("client").await;
    assert_eq!(
        client.get(
            "bulwark_tcp_connections_total",
            &[("direction", "outbound"), ("dst", "server.test:7000")]
        ),
        1.0
    );
    let server = cluster.metrics("server").await;
    assert_eq!(
        server.get(
            "bulwark_tcp_connections_total",
            &[("direction", "inbound"), ("dst", "localhost:7000")]
        ),
        1.0
    );
}

/// An SMTP-like server on `port` in the namespace of `rt`: greets first, then
/// echoes what the client sent once the client has closed its side.
async fn serve_greeting(rt: &netns::NsRuntime, port: u16) {
    let listener = rt
        .run(async move { TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await })
        .await
        .expect("greeting server binds");
    rt.spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                conn.write_all(b"220 greeting ready\r\n").await?;
                let mut line = Vec::new();
                conn.read_to_end(&mut line).await?;
                conn.write_all(&line).await?;
                conn.shutdown().await
            });
        }
    });
}

/// Connects from the namespace of `rt`, waits for the greeting (20 s at most),
/// sends a line, half-closes, and reads the echo.
async fn greet(rt: &netns::NsRuntime, target: SocketAddr) -> (Vec<u8>, Vec<u8>) {
    rt.run(async move {
        let mut conn = TcpStream::connect(target).await?;
        let mut greeting = [0u8; 20];
        tokio::time::timeout(Duration::from_secs(20), conn.read_exact(&mut greeting))
            .await
            .map_err(|_| {
                std::io::Error::other("no greeting within 20 s: held by protocol detection?")
            })??;
        conn.write_all(b"QUIT\r\n").await?;
        // Half-close: the server sees our FIN and still answers.
        conn.shutdown().await?;
        let mut echoed = Vec::new();
        conn.read_to_end(&mut echoed).await?;
        Ok::<_, std::io::Error>((greeting.to_vec(), echoed))
    })
    .await
    .expect("greeting, then the echo after a half-close")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_on_an_undeclared_port_works_after_detection_gives_up() {
    if skip("a_server_first_protocol_on_an_undeclared_port_works_after_detection_gives_up") {
        return;
    }
    // The default detection timeout (well under a second) on both agents.
    let cluster = Cluster::start(&[]).await;
    let server_rt = cluster.pod("server").netns.runtime().unwrap();
    let client_rt = cluster.pod("client").netns.runtime().unwrap();
    serve_greeting(&server_rt, UNDECLARED_PORT).await;
    let (greeting, echoed) = greet(&client_rt, cluster.addr("server", UNDECLARED_PORT)).await;
    assert_eq!(greeting, b"220 greeting ready\r\n");
    assert_eq!(echoed, b"QUIT\r\n");
    let client = cluster.metrics("client").await;
    assert_eq!(
        client.get(
            "bulwark_tcp_connections_total",
            &[("direction", "outbound"), ("dst", "server.test:7001")]
        ),
        1.0,
        "detected as opaque TCP and proxied under the service's connection policy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_works_end_to_end() {
    if skip("grpc_works_end_to_end") {
        return;
    }
    let cluster = Cluster::start(&[]).await;
    let (_server_rt, upstream) = cluster.serve_upstream(GRPC_PORT, Knobs::default()).await;
    let client_rt = cluster.pod("client").netns.runtime().unwrap();
    let target = cluster.addr("server", GRPC_PORT);
    let rsp = client_rt
        .run(async move {
            HttpClient::h2(target)
                .grpc("/demo.Echo/Say", &[], b"hello")
                .await
        })
        .await
        .unwrap();
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.grpc_status(), Some(grpc::OK), "{rsp:?}");
    assert_eq!(rsp.upstream(), Some("server-0"));
    let client = cluster.metrics("client").await;
    assert_eq!(
        client.get(
            "bulwark_requests_total",
            &[
                ("direction", "outbound"),
                ("dst", "server.test:9090"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );
    let server = cluster.metrics("server").await;
    assert_eq!(
        server.get(
            "bulwark_requests_total",
            &[
                ("direction", "inbound"),
                ("dst", "localhost:9090"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );

    // The caller's grpc-timeout is the deadline; the agent answers a gRPC
    // client with a gRPC status, not a bare 504.
    upstream.set_knobs(Knobs {
        hang: true,
        ..Knobs::default()
    });
    let rsp = client_rt
        .run(async move {
            HttpClient::h2(target)
                .grpc("/demo.Echo/Say", &[("grpc-timeout", "300m")], b"hello")
                .await
        })
        .await
        .unwrap();
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(
        rsp.header("grpc-status"),
        Some("4"),
        "DEADLINE_EXCEEDED: {rsp:?}"
    );
    assert_eq!(rsp.reason(), Some("timeout"));
}

#[tokio::test]
async fn init_is_idempotent_and_says_when_it_lacks_net_admin() {
    if skip("init_is_idempotent_and_says_when_it_lacks_net_admin") {
        return;
    }
    let agent = netns::binary("bulwark-agent").unwrap();
    let ns = netns::Netns::create(&format!("bw-{:06x}-init", fastrand::u32(..0x100_0000))).unwrap();
    let save = |program: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), program, "-t", "nat"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let agent_str = agent.to_string_lossy().to_string();
    ns.exec(&agent_str, &["init", "--exclude-outbound-ports", "5432"])
        .unwrap();
    let first = save("iptables-save");
    ns.exec(&agent_str, &["init", "--exclude-outbound-ports", "5432"])
        .unwrap();
    let second = save("iptables-save");
    let rules = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rules(&first),
        rules(&second),
        "a second run leaves the same rules"
    );
    assert_eq!(
        rules(&second)
            .iter()
            .filter(|l| *l == "-A OUTPUT -p tcp -j BULWARK_OUTPUT")
            .count(),
        1
    );
    assert!(second.contains("--dport 5432 -j RETURN"));
    assert!(
        rules(&save("ip6tables-save"))
            .iter()
            .any(|l| l.contains("-d ::1/128 -j RETURN"))
    );

    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "setpriv",
            "--reuid",
            AGENT_UID,
            "--regid",
            AGENT_UID,
            "--clear-groups",
            "--",
        ])
        .arg(&agent)
        .arg("init")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("needs the NET_ADMIN capability"),
        "{stderr}"
    );
}

#[tokio::test]
async fn init_writes_to_the_backend_the_host_already_uses() {
    if skip("init_writes_to_the_backend_the_host_already_uses") {
        return;
    }
    let agent = netns::binary("bulwark-agent").unwrap();
    let agent = agent.to_string_lossy().to_string();
    let rules_in = |ns: &netns::Netns, save: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), save, "-t", "nat"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("-A") && l.contains("BULWARK"))
            .count()
    };

    // A host whose other rules (kube-proxy, CNI) are in legacy iptables.
    let legacy =
        netns::Netns::create(&format!("bw-{:06x}-leg", fastrand::u32(..0x100_0000))).unwrap();
    legacy
        .exec(
            "iptables-legacy",
            &[
                "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT",
            ],
        )
        .unwrap();
    legacy.exec(&agent, &["init", "--ipv6", "false"]).unwrap();
    assert!(
        rules_in(&legacy, "iptables-legacy-save") > 0,
        "the rules go where the host's are"
    );
    assert_eq!(rules_in(&legacy, "iptables-nft-save"), 0);

    // A fresh namespace: nft. And the flag overrides detection.
    let fresh =
        netns::Netns::create(&format!("bw-{:06x}-nft", fastrand::u32(..0x100_0000))).unwrap();
    fresh.exec(&agent, &["init", "--ipv6", "false"]).unwrap();
    assert!(rules_in(&fresh, "iptables-nft-save") > 0);
    assert_eq!(rules_in(&fresh, "iptables-legacy-save"), 0);
    let forced =
        netns::Netns::create(&format!("bw-{:06x}-frc", fastrand::u32(..0x100_0000))).unwrap();
    forced
        .exec(
            &agent,
            &["init", "--ipv6", "false", "--iptables-backend", "legacy"],
        )
        .unwrap();
    assert!(rules_in(&forced, "iptables-legacy-save") > 0);
}
