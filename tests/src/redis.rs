//! A real `redis-server` on a loopback port for one test: the rate-limit store of Shared
//! limits. `hack/setup.sh` installs it (`make test` runs that first).
//!
//! No persistence, so a restart is an empty store, as after a failover without a
//! replica; it is killed when dropped.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// How long a started server may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A running (or stopped, between [`RedisServer::stop`] and [`RedisServer::start_again`])
/// redis-server.
#[derive(Debug)]
pub struct RedisServer {
    addr: SocketAddr,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free loopback port, requiring `password` if given. Panics with
    /// what to install when redis-server is missing.
    pub async fn start(password: Option<&str>) -> RedisServer {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("a local address").port()
        };
        let mut server = RedisServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            password: password.map(str::to_owned),
            child: None,
        };
        server.start_again().await;
        server
    }

    /// `redis://127.0.0.1:PORT`, without credentials.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server (SIGKILL: no goodbye to its clients, as a crash).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port, empty; waits until it accepts connections.
    pub async fn start_again(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run redis-server ({e}): install it (apt-get install redis-server; hack/setup.sh does) for the rate-limit store tests"
            )
        });
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not listen on {} within {START_DEADLINE:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
