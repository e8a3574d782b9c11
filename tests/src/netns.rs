//! Pods as Linux network namespaces, for the namespaced end-to-end tests (root only).
//!
//! A [`Topology`] is a "node" namespace that routes between pod namespaces and
//! the test's own (root) namespace, each joined to the node by a veth pair:
//!
//! ```text
//!  root ns (test, control plane) ──veth── node ns (router) ──veth── pod ns (app + agent)
//!                                                          └─veth── pod ns ...
//! ```
//!
//! Every name carries a random id, so tests run in parallel; everything is
//! removed on drop (panics included): deleting the node namespace deletes the
//! veth pairs, and each pod namespace is deleted with its [`Netns`].
//! Code runs inside a namespace either as a process ([`Netns::command`]) or as
//! tasks on a runtime whose thread has entered it ([`Netns::runtime`]).

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::sync::oneshot;

/// Whether the namespaced tests can run here: root, with `ip`, `iptables` and
/// `setpriv`. When they cannot, prints why; with `CI=true` that is a failure.
pub fn can_run(test: &str) -> bool {
    let missing: Vec<&str> = ["ip", "iptables", "iptables-save", "setpriv"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .collect();
    let why = if !rustix::process::geteuid().is_root() {
        Some("it needs root (network namespaces and iptables)".to_owned())
    } else if !missing.is_empty() {
        Some(format!(
            "{} not found (hack/setup.sh installs iptables)",
            missing.join(", ")
        ))
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("{test}: cannot run the namespaced test on CI: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|dir| dir.join(tool).is_file())
    })
}

/// Runs `ip ARGS...`, failing with its stderr.
pub fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up.
    pub fn create(name: &str) -> io::Result<Netns> {
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program ARGS...` in the namespace to completion, failing with its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` in the namespace (`ip netns exec` execs it,
    /// so killing the child kills the program).
    pub fn command(&self, program: impl AsRef<Path>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program.as_ref())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// A runtime whose thread has entered this namespace: sockets made by tasks
    /// spawned on it (servers, clients) live in the namespace.
    pub fn runtime(&self) -> io::Result<NsRuntime> {
        let path = PathBuf::from("/var/run/netns").join(&self.name);
        let file = File::open(&path)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                let entered = rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(io::Error::from)
                .and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                });
                match entered {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(rt.handle().clone()));
                        // Drive the spawned tasks until the NsRuntime is dropped.
                        rt.block_on(async {
                            let _ = stop_rx.await;
                        });
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| io::Error::other("namespace thread died"))??;
        Ok(NsRuntime {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {error}");
        }
    }
}

/// A single-threaded runtime inside a network namespace; stopped on drop.
#[derive(Debug)]
pub struct NsRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    /// Runs `future` in the namespace; await the handle from any runtime.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    /// Runs `future` in the namespace and waits for its output.
    pub async fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.spawn(future).await {
            Ok(out) => out,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One pod: a namespace with an address on its link to the node.
#[derive(Debug)]
pub struct Pod {
    /// The pod's name (as given to [`Topology::new`]).
    pub name: String,
    /// The pod's IP address.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, in a [`Topology::dual_stack`] topology.
    pub ip6: Option<Ipv6Addr>,
    /// The pod's namespace.
    pub netns: Netns,
}

/// The root namespace, a node namespace routing between pods, and the pods.
#[derive(Debug)]
pub struct Topology {
    /// The pods, in the order given.
    pub pods: Vec<Pod>,
    /// The root namespace's address, reachable from every pod (run the control plane here).
    pub root_ip: Ipv4Addr,
    /// A folder for this topology's logs.
    pub logs: tempfile::TempDir,
    route: String,
    // Dropped last: deleting it removes every veth pair.
    node: Netns,
}

impl Topology {
    /// Builds the node and one pod per name, each pod with a default route
    /// through the node, and a route from the root namespace to the pods.
    pub fn new(pod_names: &[&str]) -> io::Result<Topology> {
        Self::build(pod_names, false)
    }

    /// Like [`Topology::new`], with IPv6 between the pods too: each pod also gets
    /// an address in a ULA /48 and an IPv6 default route through the node.
    pub fn dual_stack(pod_names: &[&str]) -> io::Result<Topology> {
        Self::build(pod_names, true)
    }

    fn build(pod_names: &[&str], ipv6: bool) -> io::Result<Topology> {
        let id = format!("{:06x}", fastrand::u32(..0x100_0000));
        // 10.X.Y.0/24 for the whole topology: root link .0/30, pod i link .(4i+4)/30.
        let net = [10, 200 + fastrand::u8(..50), fastrand::u8(..)];
        let addr = |host: u8| Ipv4Addr::new(net[0], net[1], net[2], host);
        let node = Netns::create(&format!("bw-{id}-node"))?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let prefix6 = format!("fd00:{:x}:{:x}", net[1], net[2]);
        if ipv6 {
            node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }

        // root <-> node.
        let (root_if, node_if) = (format!("bw{id}r"), format!("bw{id}n"));
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", &node_if,
        ])?;
        ip(&["link", "set", &node_if, "netns", node.name()])?;
        ip(&["addr", "add", &format!("{}/30", addr(1)), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        node.exec(
            "ip",
            &["addr", "add", &format!("{}/30", addr(2)), "dev", &node_if],
        )?;
        node.exec("ip", &["link", "set", &node_if, "up"])?;
        let route = format!("{}.{}.{}.0/24", net[0], net[1], net[2]);
        ip(&["route", "add", &route, "via", &addr(2).to_string()])?;

        let mut pods = Vec::new();
        for (index, name) in pod_names.iter().enumerate() {
            let base = u8::try_from(4 * index + 4)
                .ok()
                .filter(|b| *b < 252)
                .ok_or_else(|| io::Error::other("too many pods for one /24"))?;
            let (gateway, pod_ip) = (addr(base + 1), addr(base + 2));
            let netns = Netns::create(&format!("bw-{id}-{name}"))?;
            let (pod_if, peer_if) = (format!("bw{id}p{index}"), format!("bw{id}q{index}"));
            node.exec(
                "ip",
                &[
                    "link", "add", &peer_if, "type", "veth", "peer", "name", &pod_if,
                ],
            )?;
            node.exec("ip", &["link", "set", &pod_if, "netns", netns.name()])?;
            if ipv6 {
                // No duplicate address detection: a tentative link-local address
                // would hold up neighbour discovery (and so every IPv6 packet)
                // for the first second or two.
                node.exec(
                    "sysctl",
                    &["-qw", &format!("net.ipv6.conf.{peer_if}.accept_dad=0")],
                )?;
                netns.exec(
                    "sysctl",
                    &["-qw", &format!("net.ipv6.conf.{pod_if}.accept_dad=0")],
                )?;
            }
            node.exec(
                "ip",
                &["addr", "add", &format!("{gateway}/30"), "dev", &peer_if],
            )?;
            node.exec("ip", &["link", "set", &peer_if, "up"])?;
            netns.exec(
                "ip",
                &["addr", "add", &format!("{pod_ip}/30"), "dev", &pod_if],
            )?;
            netns.exec("ip", &["link", "set", &pod_if, "up"])?;
            netns.exec(
                "ip",
                &["route", "add", "default", "via", &gateway.to_string()],
            )?;
            let ip6 = if ipv6 {
                let link = format!("{prefix6}:{:x}", index + 1);
                let (gateway6, pod_ip6) = (format!("{link}::1"), format!("{link}::2"));
                node.exec(
                    "ip",
                    &[
                        "-6",
                        "addr",
                        "add",
                        &format!("{gateway6}/64"),
                        "dev",
                        &peer_if,
                        "nodad",
                    ],
                )?;
                netns.exec(
                    "ip",
                    &[
                        "-6",
                        "addr",
                        "add",
                        &format!("{pod_ip6}/64"),
                        "dev",
                        &pod_if,
                        "nodad",
                    ],
                )?;
                netns.exec("ip", &["-6", "route", "add", "default", "via", &gateway6])?;
                Some(
                    pod_ip6
                        .parse()
                        .map_err(|_| io::Error::other(format!("bad IPv6 address {pod_ip6}")))?,
                )
            } else {
                None
            };
            pods.push(Pod {
                name: (*name).to_owned(),
                ip: pod_ip,
                ip6,
                netns,
            });
        }
        let logs = tempfile::Builder::new()
            .prefix(&format!("bulwark-netns-{id}-"))
            .tempdir()?;
        Ok(Topology {
            pods,
            root_ip: addr(1),
            logs,
            route,
            node,
        })
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("a pod of that name was created")
    }

    /// A log file for a process named `name`, in [`Topology::logs`].
    pub fn log_file(&self, name: &str) -> io::Result<(File, PathBuf)> {
        let path = self.logs.path().join(format!("{name}.log"));
        Ok((File::create(&path)?, path))
    }

    /// An address in the topology's range that no interface has (a Service's
    /// cluster IP: pods route it to the node, and only the redirect rules give it meaning).
    pub fn virtual_ip(&self, host: u8) -> Ipv4Addr {
        let mut octets = self.root_ip.octets();
        octets[3] = host;
        Ipv4Addr::from(octets)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The route goes with the root veth when the node namespace is deleted;
        // remove it first anyway so that nothing dangles if that fails.
        let _ = ip(&["route", "del", &self.route]);
        let _ = &self.node;
    }
}

/// The path of a workspace binary in the running test's target folder, after
/// `cargo build --workspace --all-targets` (what `make test` has just built, so
/// a no-op there; a `-p bulwark-tests` run would otherwise use a stale binary, and
/// building only `-p PACKAGE` would compile it again with other features).
pub fn binary(name: &str) -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| io::Error::other("test binary is not in target/<profile>/deps"))?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "--workspace", "--all-targets"]);
    if release {
        build.arg("--release");
    }
    let status = build.status()?;
    if !status.success() {
        return Err(io::Error::other(
            "cargo build --workspace --all-targets failed",
        ));
    }
    let path = profile_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::other(format!(
            "{} was not built",
            path.display()
        )))
    }
}
