//! Starts the demo's processes, waits for them to be ready, notices when one
//! dies, and stops them all: on the way out, on Ctrl-C, and (through `Drop`)
//! on any error path.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bulwark_testkit::HttpClient;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How many lines of a child's log an error shows.
const TAIL_LINES: usize = 20;

/// How often readiness is probed.
const READY_POLL: Duration = Duration::from_millis(50);

/// The processes the demo started, in start order.
#[derive(Debug)]
pub struct Supervisor {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    children: Vec<Supervised>,
}

#[derive(Debug)]
struct Supervised {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Supervisor {
    /// A supervisor that runs binaries from `bin_dir` and logs to `log_dir` (created if missing).
    pub fn new(bin_dir: &Path, log_dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(log_dir)
            .with_context(|| format!("creating the log folder {}", log_dir.display()))?;
        Ok(Self {
            bin_dir: bin_dir.to_owned(),
            log_dir: log_dir.to_owned(),
            children: Vec::new(),
        })
    }

    /// The folder the children log to.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Starts `binary` with `args` as `name`; its stdout and stderr go to `LOG_DIR/NAME.log`.
    pub fn spawn(&mut self, name: &str, binary: &str, args: &[String]) -> anyhow::Result<()> {
        let path = check_binary(&self.bin_dir, binary)?;
        let log = self.log_dir.join(format!("{name}.log"));
        let stdout = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stderr = stdout
            .try_clone()
            .with_context(|| format!("opening {} twice", log.display()))?;
        let child = Command::new(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Logs go to files: no colour codes in them.
            .env("NO_COLOR", "1")
            // The last resort if the demo unwinds without reaching `shutdown`.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {}", path.display(), args.join(" ")))?;
        tracing::debug!(%name, pid = ?child.id(), log = %log.display(), "started");
        self.children.push(Supervised {
            name: name.to_owned(),
            child,
            log,
        });
        Ok(())
    }

    /// Waits until `GET http://{addr}{path}` answers 200, failing early (with the
    /// child's log tail) if the process `name` exits, or after `deadline`.
    pub async fn wait_ready(
        &mut self,
        name: &str,
        addr: SocketAddr,
        path: &str,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let client = HttpClient::direct(addr).with_timeout(Duration::from_secs(1));
        let started = Instant::now();
        loop {
            self.check_one(name)?;
            let last_answer = match client.get(path, &[]).await {
                Ok(response) if response.status == http::StatusCode::OK => return Ok(()),
                Ok(response) => format!("status {}", response.status),
                Err(err) => err.to_string(),
            };
            if started.elapsed() >= deadline {
                let tail = self.tail(name);
                bail!(
                    "{name} did not become ready within {deadline:?}: http://{addr}{path} gave {last_answer}\n{tail}"
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Fails (with the log tail) if any child has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.children.iter().map(|c| c.name.clone()).collect();
        for name in names {
            self.check_one(&name)?;
        }
        Ok(())
    }

    fn check_one(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(supervised) = self.children.iter_mut().find(|c| c.name == name) else {
            bail!("no process named {name} was started");
        };
        let status: Option<ExitStatus> = supervised
            .child
            .try_wait()
            .with_context(|| format!("checking on {name}"))?;
        if let Some(status) = status {
            let tail = self.tail(name);
            bail!("{name} exited ({status})\n{tail}");
        }
        Ok(())
    }

    /// The last lines of a child's log, introduced by its path.
    pub fn tail(&self, name: &str) -> String {
        let Some(supervised) = self.children.iter().find(|c| c.name == name) else {
            return String::new();
        };
        let text = match fs::read_to_string(&supervised.log) {
            Ok(text) => text,
            Err(err) => return format!("(cannot read {}: {err})", supervised.log.display()),
        };
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(TAIL_LINES);
        let mut tail = format!("--- last lines of {} ---\n", supervised.log.display());
        for line in &lines[start..] {
            tail.push_str("  ");
            tail.push_str(line);
            tail.push('\n');
        }
        if lines.is_empty() {
            tail.push_str("  (empty)\n");
        }
        tail
    }

    /// Stops every child, the last started first, and waits for each to exit.
    pub async fn shutdown(&mut self) {
        while let Some(mut supervised) = self.children.pop() {
            match supervised.child.try_wait() {
                Ok(Some(_)) => {}
                _ => {
                    if let Err(err) = supervised.child.kill().await {
                        tracing::warn!(name = %supervised.name, error = %err, "stopping a demo process failed");
                    }
                }
            }
        }
    }
}

/// Checks that `binary` exists in `bin_dir`, with a hint to build it if not.
pub fn check_binary(bin_dir: &Path, binary: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir.join(binary);
    if !path.is_file() {
        bail!(
            "{} not found: build the binaries first (`make demo` does: cargo build --release --workspace --bins), \
             or point --bin-dir at the folder that holds them",
            path.display()
        );
    }
    Ok(path)
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for supervised in &mut self.children {
            let _ = supervised.child.start_kill();
        }
    }
}
