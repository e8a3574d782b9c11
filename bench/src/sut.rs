//! The systems under test, each started as its own process: the fixed upstream, the
//! control plane and agent (over a mesh folder of Kubernetes-shaped YAML), and HAProxy.
//! Proxies run under `taskset` on the proxy CPUs, everything else on the load CPUs.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long a process has to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The namespace of the bench mesh.
pub const NAMESPACE: &str = "bench";
/// The service every workload calls, as the agent routes it.
pub const SERVICE_AUTHORITY: &str = "bench.bench";

/// Where binaries are, where logs go, which CPUs each side gets.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The folder holding `bulwark-agent`, `bulwark-control-plane` and `bulwark-bench`.
    pub bin_dir: PathBuf,
    /// One log file per process.
    pub log_dir: PathBuf,
    /// `taskset -c` list for proxies (none: no pinning).
    pub proxy_cpus: Option<String>,
    /// `taskset -c` list for the upstream (and the runner, when it is started pinned).
    pub load_cpus: Option<String>,
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    /// Starts `program args`, pinned to `cpus` with `taskset` when given, output to `NAME.log`.
    pub fn spawn(
        layout: &Layout,
        name: &str,
        program: &Path,
        args: &[String],
        cpus: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        std::fs::create_dir_all(&layout.log_dir)
            .with_context(|| format!("creating {}", layout.log_dir.display()))?;
        let log = layout.log_dir.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut command = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(program);
                c
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {} (is it built?)", program.display()))?;
        // taskset execs the program, so the pid is the program's.
        let pid = child.id().context("the child has a pid")?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            pid,
            log,
        })
    }

    /// The process id (for `/proc`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// An error if the process has exited, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); {}", self.name, self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("last lines of {}:\n{tail}", self.log.display())
    }

    /// Waits until `check` holds, failing if the process dies or time runs out.
    pub async fn wait<F, Fut>(&mut self, what: &str, mut check: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if check().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: {what} not within {READY_TIMEOUT:?}; {}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (what the kubelet sends a container it stops), through `kill(1)`
    /// so that the bench needs no `unsafe` and no extra crate.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed ({status})", self.pid);
        }
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; its exit status if it did.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Stops the process and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?)
}

/// Whether something accepts TCP connections on `addr`.
pub async fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_ok()
}

/// The status of `GET path` on `addr` (HTTP/1.0, no keep-alive), if it answered.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// `GET path` on `addr` over HTTP/1.0: the status and the body as text, if it answered.
pub async fn fetch(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.get(9..12)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The fixed upstream (HTTP and TCP sink) in its own process on the load CPUs.
#[derive(Debug)]
pub struct Upstream {
    /// The process.
    pub proc: Proc,
    /// The 1 KiB HTTP server.
    pub http: SocketAddr,
    /// The TCP sink.
    pub sink: SocketAddr,
}

impl Upstream {
    /// Starts `bulwark-bench upstream` and waits until both ports accept.
    pub async fn start(layout: &Layout) -> anyhow::Result<Upstream> {
        Self::start_named(layout, "upstream", Duration::ZERO).await
    }

    /// Starts an upstream logging to `NAME.log` that waits `latency` before each answer.
    pub async fn start_named(
        layout: &Layout,
        name: &str,
        latency: Duration,
    ) -> anyhow::Result<Upstream> {
        Self::start_at(layout, name, free_addr()?, latency).await
    }

    /// Starts an upstream serving HTTP on `http` (e.g. a second loopback address on the
    /// same port as another endpoint).
    pub async fn start_at(
        layout: &Layout,
        name: &str,
        http: SocketAddr,
        latency: Duration,
    ) -> anyhow::Result<Upstream> {
        let sink = free_addr()?;
        let args = vec![
            "upstream".to_owned(),
            "--http".to_owned(),
            http.to_string(),
            "--sink".to_owned(),
            sink.to_string(),
            "--latency-ms".to_owned(),
            latency.as_millis().to_string(),
        ];
        let mut proc = Proc::spawn(
            layout,
            name,
            &layout.bin_dir.join("bulwark-bench"),
            &args,
            layout.load_cpus.as_deref(),
            &[],
        )?;
        proc.wait("listening", || async {
            accepts(http).await && accepts(sink).await
        })
        .await?;
        Ok(Upstream { proc, http, sink })
    }
}

/// How the agent is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policies {
    /// Service discovery only, no policy.
    None,
    /// Every policy on the bench service, none of them triggering.
    All,
}

/// A folder of Kubernetes-shaped YAML for the control plane.
#[derive(Debug)]
pub struct MeshDir {
    dir: tempfile::TempDir,
}

impl MeshDir {
    /// Service `bench` (and `extra - 1` more, for views of many services), all served by
    /// `upstream`, with `policies`.
    pub fn new(
        upstream: SocketAddr,
        services: usize,
        policies: Policies,
    ) -> anyhow::Result<MeshDir> {
        Self::with_endpoints(&[upstream], services, policies)
    }

    /// Like [`MeshDir::new`], every service served by all of `endpoints`.
    pub fn with_endpoints(
        endpoints: &[SocketAddr],
        services: usize,
        policies: Policies,
    ) -> anyhow::Result<MeshDir> {
        let dir = tempfile::Builder::new()
            .prefix("bulwark-bench-")
            .tempdir()?;
        let mut yaml = service_yaml("bench", endpoints);
        for n in 1..services {
            yaml.push_str("---\n");
            yaml.push_str(&service_yaml(&format!("svc-{n}"), endpoints));
        }
        std::fs::write(dir.path().join("services.yaml"), yaml)?;
        if policies == Policies::All {
            std::fs::write(dir.path().join("policies.yaml"), ALL_POLICIES)?;
        }
        Ok(MeshDir { dir })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `file` atomically (aside, then renamed), as an editor or kubectl would.
    pub fn write(&self, file: &str, contents: &str) -> std::io::Result<()> {
        let aside = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&aside, contents)?;
        std::fs::rename(aside, self.dir.path().join(file))
    }
}

/// A Service on port 80 and its EndpointSlice with `endpoints` (all on one port).
pub fn service_yaml(name: &str, endpoints: &[SocketAddr]) -> String {
    let port = endpoints.first().map_or(80, SocketAddr::port);
    let mut yaml = String::new();
    let _ = write!(
        yaml,
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: {port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-0
  namespace: {NAMESPACE}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
",
    );
    for endpoint in endpoints {
        let _ = writeln!(
            yaml,
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}",
            endpoint.ip()
        );
    }
    yaml
}

/// Every policy on `bench`, set so that none triggers at the bench's load: a timeout,
/// retries with a budget, a breaker, a bulkhead far above the concurrency, and inbound
/// rate limits far above the rate.
pub const ALL_POLICIES: &str = "apiVersion: bulwark.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: bench, namespace: bench}
spec:
  targetRefs: [{kind: Service, name: bench}]
  timeout: {request: 5s, connect: 1s}
  retry:
    attempts: 3
    perTryTimeout: 2s
    backoff: {base: 25ms, max: 250ms}
    retryOn: [connect-failure, reset, gateway-error]
    budget: {ratio: 0.2, minPerSecond: 10, window: 10s}
  circuitBreaker:
    consecutiveFailures: 5
    failureRatio: {threshold: 0.5, minRequests: 20, window: 10s}
    openDuration: 5s
  bulkhead: {maxConcurrentRequests: 4096, maxPending: 1024, queueTimeout: 250ms}
  loadBalancer: {strategy: LeastRequest}
---
apiVersion: bulwark.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: bench, namespace: bench}
spec:
  targetRefs: [{kind: Service, name: bench}]
  limits:
    - name: total
      rate: {requests: 10000000, per: 1s}
    - name: per-client
      key: {type: ClientAddress}
      rate: {requests: 10000000, per: 1s}
";

/// A control plane process over a mesh folder.
#[derive(Debug)]
pub struct ControlPlane {
    /// The process.
    pub proc: Proc,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
}

impl ControlPlane {
    /// Starts `bulwark-control-plane --source dir:MESH` on `cpus` and waits for `/ready`.
    pub async fn start(
        layout: &Layout,
        mesh: &MeshDir,
        debounce: &str,
        cpus: Option<&str>,
    ) -> anyhow::Result<ControlPlane> {
        Self::start_at(layout, "control-plane", mesh, debounce, cpus, free_addr()?).await
    }

    /// Like [`ControlPlane::start`], serving gRPC on `grpc` (to restart one where its
    /// agents look for it), logging to `NAME.log`.
    pub async fn start_at(
        layout: &Layout,
        name: &str,
        mesh: &MeshDir,
        debounce: &str,
        cpus: Option<&str>,
        grpc: SocketAddr,
    ) -> anyhow::Result<ControlPlane> {
        Self::start_with(layout, name, mesh.path(), debounce, cpus, grpc, &[]).await
    }

    /// Like [`ControlPlane::start_at`] over the folder `mesh`, with `extra` flags after
    /// the bench's own (e.g. workload identity).
    pub async fn start_with(
        layout: &Layout,
        name: &str,
        mesh: &Path,
        debounce: &str,
        cpus: Option<&str>,
        grpc: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<ControlPlane> {
        let admin = free_addr()?;
        let mut args = vec![
            "--source".to_owned(),
            format!("dir:{}", mesh.display()),
            "--grpc-addr".to_owned(),
            grpc.to_string(),
            "--admin-addr".to_owned(),
            admin.to_string(),
            "--debounce".to_owned(),
            debounce.to_owned(),
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(
            layout,
            name,
            &layout.bin_dir.join("bulwark-control-plane"),
            &args,
            cpus,
            &[("RUST_LOG", "warn")],
        )?;
        proc.wait("/ready", || async {
            http_status(admin, "/ready").await == Some(200)
        })
        .await?;
        Ok(ControlPlane { proc, grpc, admin })
    }
}

/// An agent process for pod `bench-0` of service `bench`: an outbound listener, one
/// inbound listener in front of the pod's app, an admin listener.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// The outbound (explicit proxy) listener.
    pub outbound: SocketAddr,
    /// The inbound listener, forwarding to the app port.
    pub inbound: SocketAddr,
    /// The admin listener (`/ready`, `/metrics`, `/config`).
    pub admin: SocketAddr,
}

impl Agent {
    /// Starts `bulwark-agent` (logging to `NAME.log`) against the control plane at `grpc`,
    /// forwarding inbound traffic to `app_port` on loopback, with `extra` flags after
    /// the bench's own; waits until `/ready` (the first config applied).
    pub async fn start(
        layout: &Layout,
        name: &str,
        grpc: SocketAddr,
        app_port: u16,
        cpus: Option<&str>,
        extra: &[String],
    ) -> anyhow::Result<Agent> {
        let (outbound, inbound, admin) = (free_addr()?, free_addr()?, free_addr()?);
        let mut args = vec![
            "--control-plane".to_owned(),
            format!("http://{grpc}"),
            "--namespace".to_owned(),
            NAMESPACE.to_owned(),
            "--pod-name".to_owned(),
            "bench-0".to_owned(),
            "--service-account".to_owned(),
            "bench".to_owned(),
            "--label".to_owned(),
            "app=bench".to_owned(),
            "--outbound-addr".to_owned(),
            outbound.to_string(),
            "--admin-addr".to_owned(),
            admin.to_string(),
            "--inbound".to_owned(),
            format!("{inbound}={app_port}"),
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(
            layout,
            name,
            &layout.bin_dir.join("bulwark-agent"),
            &args,
            cpus,
            &[("RUST_LOG", "warn")],
        )?;
        proc.wait("/ready (first config applied)", || async {
            http_status(admin, "/ready").await == Some(200)
        })
        .await?;
        Ok(Agent {
            proc,
            outbound,
            inbound,
            admin,
        })
    }
}

/// An agent (and the control plane feeding it) in front of the upstream.
#[derive(Debug)]
pub struct AgentPath {
    /// The agent process (the one measured).
    pub agent: Proc,
    /// The control plane.
    pub control_plane: ControlPlane,
    /// The outbound (explicit proxy) listener.
    pub outbound: SocketAddr,
    /// The inbound listener, forwarding to the upstream as the pod's app.
    pub inbound: SocketAddr,
    _mesh: MeshDir,
}

impl AgentPath {
    /// Starts a control plane serving `services` services with `policies`, and an agent
    /// for pod `bench-0` of service `bench`, and waits until the agent has its config.
    pub async fn start(
        layout: &Layout,
        upstream: &Upstream,
        services: usize,
        policies: Policies,
    ) -> anyhow::Result<AgentPath> {
        let mesh = MeshDir::new(upstream.http, services, policies)?;
        let control_plane =
            ControlPlane::start(layout, &mesh, "50ms", layout.load_cpus.as_deref()).await?;
        let name = match policies {
            Policies::None => format!("agent-{services}-services"),
            Policies::All => format!("agent-policies-{services}-services"),
        };
        let agent = Agent::start(
            layout,
            &name,
            control_plane.grpc,
            upstream.http.port(),
            layout.proxy_cpus.as_deref(),
            &[],
        )
        .await?;
        Ok(AgentPath {
            agent: agent.proc,
            control_plane,
            outbound: agent.outbound,
            inbound: agent.inbound,
            _mesh: mesh,
        })
    }

    /// Stops both processes.
    pub async fn stop(self) {
        self.agent.stop().await;
        self.control_plane.proc.stop().await;
    }
}

/// HAProxy in front of the upstream: HTTP/1.1, h2c and TCP frontends.
#[derive(Debug)]
pub struct Haproxy {
    /// The process.
    pub proc: Proc,
    /// HTTP/1.1 frontend.
    pub h1: SocketAddr,
    /// h2c (prior knowledge) frontend.
    pub h2: SocketAddr,
    /// TCP frontend to the sink.
    pub tcp: SocketAddr,
    _config: tempfile::NamedTempFile,
}

/// The `haproxy` binary on the PATH, if any.
pub fn haproxy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
}

impl Haproxy {
    /// Writes the configuration closest to the agent's policies and starts HAProxy with
    /// one thread on the proxy CPUs.
    pub async fn start(
        layout: &Layout,
        binary: &Path,
        upstream: &Upstream,
    ) -> anyhow::Result<Haproxy> {
        let (h1, h2, tcp) = (free_addr()?, free_addr()?, free_addr()?);
        let config = haproxy_config(h1, h2, tcp, upstream.http, upstream.sink);
        let mut file = tempfile::Builder::new()
            .prefix("bulwark-bench-haproxy-")
            .suffix(".cfg")
            .tempfile()?;
        std::io::Write::write_all(&mut file, config.as_bytes())?;
        let args = vec![
            "-db".to_owned(),
            "-f".to_owned(),
            file.path().display().to_string(),
        ];
        let mut proc = Proc::spawn(
            layout,
            "haproxy",
            binary,
            &args,
            layout.proxy_cpus.as_deref(),
            &[],
        )?;
        proc.wait("listening", || async {
            accepts(h1).await && accepts(h2).await && accepts(tcp).await
        })
        .await?;
        Ok(Haproxy {
            proc,
            h1,
            h2,
            tcp,
            _config: file,
        })
    }
}

/// The closest HAProxy equivalent of the agent's policies: connect and server timeouts,
/// retries on connection failures and gateway errors (with redispatch), a connection cap
/// per server; one thread, like the agent's one core.
pub fn haproxy_config(
    h1: SocketAddr,
    h2: SocketAddr,
    tcp: SocketAddr,
    http: SocketAddr,
    sink: SocketAddr,
) -> String {
    format!(
        "global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 5s
    timeout queue 250ms
    retries 2
    option redispatch
    option http-keep-alive

frontend h1
    bind {h1}
    default_backend upstream_h1

frontend h2
    bind {h2} proto h2
    default_backend upstream_h2

frontend tcp
    mode tcp
    bind {tcp}
    default_backend sink

backend upstream_h1
    retry-on conn-failure empty-response response-timeout 502 503 504
    server up {http} maxconn 4096

backend upstream_h2
    retry-on conn-failure empty-response response-timeout 502 503 504
    server up {http} proto h2 maxconn 4096

backend sink
    mode tcp
    server sink {sink}
",
        http = http,
        sink = sink,
    )
}
