//! The machine, versions and load a run was made on, for the record in the results.

use std::fmt::Write as _;
use std::process::Command;

fn command(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let text = String::from_utf8_lossy(&text);
    text.lines().next().map(|l| l.trim().to_owned())
}

/// The CPU model, from `/proc/cpuinfo`.
fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines().find_map(|l| {
        l.strip_prefix("model name")?
            .split_once(':')
            .map(|(_, v)| v.trim().to_owned())
    })
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A Markdown list describing the machine and versions.
pub fn describe(haproxy: Option<&std::path::Path>) -> String {
    let unknown = || "unknown".to_owned();
    let mut out = String::new();
    // `nproc --all`: the runner itself is pinned, so its own view shows fewer CPUs.
    let cpus = command("nproc", &["--all"]).unwrap_or_else(unknown);
    let _ = writeln!(
        out,
        "- machine: {} ({} CPUs visible), kernel {}",
        cpu_model().unwrap_or_else(unknown),
        cpus,
        command("uname", &["-sr"]).unwrap_or_else(unknown)
    );
    let _ = writeln!(
        out,
        "- versions: bulwark {} (git {}), {}, {}",
        env!("CARGO_PKG_VERSION"),
        command("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(unknown),
        command("rustc", &["-V"]).unwrap_or_else(unknown),
        haproxy
            .and_then(|h| command(&h.display().to_string(), &["-v"]))
            .unwrap_or_else(|| "HAProxy not run".to_owned())
    );
    let _ = writeln!(
        out,
        "- date: {}",
        command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(unknown)
    );
    out
}
