//! Running iptables: choosing the backend, checking the capability, applying a rule set.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use serde::Serialize;

use super::{Family, InitOptions, rule_sets};

/// The Linux capability number of `CAP_NET_ADMIN`.
const CAP_NET_ADMIN: u32 = 12;

/// Which iptables implementation the rules go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Backend {
    /// `iptables-nft`: the kernel's nf_tables behind the iptables syntax.
    Nft,
    /// `iptables-legacy`: the older x_tables.
    Legacy,
}

/// `--iptables-backend`: a backend, or `auto` to detect the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
pub enum BackendChoice {
    /// Use the backend that already holds rules (nft when neither does).
    #[default]
    Auto,
    /// Force `iptables-nft`.
    Nft,
    /// Force `iptables-legacy`.
    Legacy,
}

impl Backend {
    /// `nft` or `legacy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    fn program(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        format!("{base}-{}-{tool}", self.as_str())
    }

    /// The command that applies a rule set (its input on stdin).
    pub fn restore_command(self, family: Family) -> Vec<String> {
        vec![self.program(family, "restore"), "--noflush".to_owned()]
    }

    fn save_command(self, family: Family) -> Vec<String> {
        vec![
            self.program(family, "save"),
            "-t".to_owned(),
            "nat".to_owned(),
        ]
    }
}

/// Picks the backend the host uses: the one holding more rules, as kube-proxy and
/// the CNI plugins will have written theirs there; nft when it is a tie (a fresh
/// pod network namespace), legacy when only legacy can be read. `None` counts
/// mean that backend's tools failed.
pub fn choose_backend(nft_rules: Option<usize>, legacy_rules: Option<usize>) -> Option<Backend> {
    match (nft_rules, legacy_rules) {
        (Some(n), Some(l)) if l > n => Some(Backend::Legacy),
        (Some(_), _) => Some(Backend::Nft),
        (None, Some(_)) => Some(Backend::Legacy),
        (None, None) => None,
    }
}

/// Counts the rules (`-A` lines) in `iptables-save` output.
pub fn count_rules(save_output: &str) -> usize {
    save_output.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Whether the `CapEff` line of `/proc/self/status` includes `CAP_NET_ADMIN`.
pub fn has_net_admin(proc_status: &str) -> bool {
    proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// `init` could not install the rules.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The process lacks `CAP_NET_ADMIN`.
    #[error(
        "bulwark-agent init needs the NET_ADMIN capability to install iptables rules; run it as root or add NET_ADMIN to the init container's securityContext.capabilities.add"
    )]
    NoNetAdmin,
    /// Neither iptables backend could be run.
    #[error(
        "neither iptables-nft-save nor iptables-legacy-save could be run ({0}); install iptables (apt-get install iptables) or pass --iptables-backend"
    )]
    NoIptables(String),
    /// A command could not be started.
    #[error("cannot run {program}: {source} (is iptables installed?)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

fn run(command: &[String], input: Option<&str>) -> Result<Output, InitError> {
    let program = command.first().cloned().unwrap_or_default();
    let spawn_err = |source| InitError::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = Command::new(&program)
        .args(command.iter().skip(1))
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let output = child.wait_with_output().map_err(spawn_err)?;
    if !output.status.success() {
        return Err(InitError::Failed {
            program,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

fn save(backend: Backend, family: Family) -> Result<String, InitError> {
    let output = run(&backend.save_command(family), None)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails with [`InitError::NoNetAdmin`] unless this process has `CAP_NET_ADMIN`.
pub fn check_capability() -> Result<(), InitError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if has_net_admin(&status) {
        Ok(())
    } else {
        Err(InitError::NoNetAdmin)
    }
}

/// Detects the backend (for `BackendChoice::Auto`) by counting the rules each holds.
pub fn detect(choice: BackendChoice) -> Result<Backend, InitError> {
    match choice {
        BackendChoice::Nft => Ok(Backend::Nft),
        BackendChoice::Legacy => Ok(Backend::Legacy),
        BackendChoice::Auto => {
            let count = |backend: Backend| {
                run(&[backend.program(Family::V4, "save")], None)
                    .map(|o| count_rules(&String::from_utf8_lossy(&o.stdout)))
            };
            let nft = count(Backend::Nft);
            let legacy = count(Backend::Legacy);
            let why = match (&nft, &legacy) {
                (Err(n), Err(l)) => format!("{n}; {l}"),
                _ => String::new(),
            };
            choose_backend(nft.ok(), legacy.ok()).ok_or(InitError::NoIptables(why))
        }
    }
}

/// Installs the rules of `options` with `backend`, leaving Bulwark's chains
/// exactly as `options` say however often it runs. Checks `CAP_NET_ADMIN` first
/// so that a missing capability gets a clear message.
pub fn apply(options: &InitOptions, backend: Backend) -> Result<(), InitError> {
    check_capability()?;
    for set in rule_sets(options) {
        let existing = save(backend, set.family)?;
        let input = set.restore_input(&existing);
        run(&backend.restore_command(set.family), Some(&input))?;
        tracing::info!(
            family = set.family.as_str(),
            backend = backend.as_str(),
            rules = set.rules.len(),
            "redirect rules installed"
        );
    }
    Ok(())
}
