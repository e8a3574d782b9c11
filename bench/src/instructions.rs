//! Instructions per request under callgrind, the agent's and HAProxy's side by side:
//! the figure that holds on a shared machine, where CPU time drifts between runs.
//! Each row is one run of `bench/callgrind.sh`: 2,000 requests at 100/s on one
//! connection after a warm-up, or for `h2m8` 10 s with 32 HTTP/2 requests in flight
//! over 4 connections (as `h2load -c4 -m8`); see docs/benchmarks.md, "Agent profile".

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// The rows measured: (proxy, policies, protocol).
const ROWS: [(&str, &str, &str); 8] = [
    ("agent", "none", "h1"),
    ("agent", "all", "h1"),
    ("haproxy", "none", "h1"),
    ("agent", "none", "h2"),
    ("haproxy", "none", "h2"),
    ("agent", "none", "h2m8"),
    ("agent", "all", "h2m8"),
    ("haproxy", "none", "h2m8"),
];

/// The script that measures one row.
const SCRIPT: &str = "bench/callgrind.sh";

/// One measured row.
#[derive(Clone, Debug)]
pub struct Row {
    /// `agent` or `haproxy`.
    pub proxy: &'static str,
    /// `none` or `all` (the bench's every-policy set).
    pub policies: &'static str,
    /// `h1`, `h2` or `h2m8` (HTTP/2, several streams in flight per connection).
    pub protocol: &'static str,
    /// Instructions per request, or why there is no figure.
    pub per_request: Result<u64, String>,
}

/// Whether callgrind can run here (valgrind and the script present).
pub fn available() -> bool {
    Path::new(SCRIPT).is_file()
        && Command::new("valgrind")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Measures every row with the binaries in `bin_dir`; HAProxy's rows only with `haproxy`.
pub fn run(bin_dir: &Path, haproxy: bool) -> Vec<Row> {
    ROWS.iter()
        .filter(|(proxy, _, _)| haproxy || *proxy == "agent")
        .map(|&(proxy, policies, protocol)| {
            eprintln!("callgrind: {proxy}, policies {policies}, {protocol}");
            let per_request = measure(bin_dir, proxy, policies, protocol);
            match &per_request {
                Ok(n) => eprintln!("  {n} instructions per request"),
                Err(e) => eprintln!("  no figure: {e}"),
            }
            Row {
                proxy,
                policies,
                protocol,
                per_request,
            }
        })
        .collect()
}

fn measure(bin_dir: &Path, proxy: &str, policies: &str, protocol: &str) -> Result<u64, String> {
    // The closed-loop row runs for a fixed time; the others send 2,000 at 100/s.
    let seconds = if protocol == "h2m8" { "10" } else { "20" };
    let out = Command::new("bash")
        .args([SCRIPT, policies, protocol, "100", seconds])
        .env("BIN_DIR", bin_dir)
        .env("PROXY", proxy)
        .output()
        .map_err(|e| format!("running {SCRIPT}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{SCRIPT} failed ({}): {}",
            out.status,
            stderr.lines().last().unwrap_or("no output")
        ));
    }
    per_request(&stdout).ok_or_else(|| format!("{SCRIPT} printed no per-request figure"))
}

/// The `per-request=N` figure of the script's summary line.
fn per_request(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .filter_map(|l| l.split("per-request=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// The figure of one row, if measured.
pub fn figure(rows: &[Row], proxy: &str, policies: &str, protocol: &str) -> Option<u64> {
    rows.iter()
        .find(|r| r.proxy == proxy && r.policies == policies && r.protocol == protocol)
        .and_then(|r| r.per_request.as_ref().ok().copied())
}

/// The table, with each agent row's ratio to HAProxy's of the same protocol.
pub fn markdown(rows: &[Row]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "#### Instructions per request (callgrind; 2,000 requests at 100/s on one connection, \
         or 32 HTTP/2 requests in flight over 4 connections for 10 s)\n\n\
         | proxy | policies | protocol | instructions per request | / HAProxy's |\n\
         |---|---|---|---:|---:|\n",
    );
    for r in rows {
        let figure = match &r.per_request {
            Ok(n) => n.to_string(),
            Err(e) => format!("- ({e})"),
        };
        let ratio = match (
            r.proxy,
            &r.per_request,
            figure_of(rows, "haproxy", r.protocol),
        ) {
            ("agent", Ok(n), Some(h)) if h > 0 => format!("{:.2}x", *n as f64 / h as f64),
            _ => "-".to_owned(),
        };
        let protocol = match r.protocol {
            "h2" => "HTTP/2",
            "h2m8" => "HTTP/2, 32 in flight (-c4 -m8)",
            _ => "HTTP/1.1",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {protocol} | {figure} | {ratio} |",
            r.proxy, r.policies
        );
    }
    out.push('\n');
    out
}

fn figure_of(rows: &[Row], proxy: &str, protocol: &str) -> Option<u64> {
    figure(rows, proxy, "none", protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_s_figure_is_read() {
        let out = "warm-up: ...\nproxy=agent policies=none protocol=h1 rate=100/s requests=2000 \
                   instructions=75163131 per-request=37581\ndump: x\n";
        assert_eq!(per_request(out), Some(37581));
        assert_eq!(per_request("nothing here\n"), None);
    }

    #[test]
    fn agent_rows_carry_their_ratio_to_haproxy() {
        let row = |proxy, protocol, n: Result<u64, String>| Row {
            proxy,
            policies: "none",
            protocol,
            per_request: n,
        };
        let rows = [
            row("agent", "h1", Ok(30_000)),
            row("haproxy", "h1", Ok(60_000)),
            row("agent", "h2", Err("valgrind failed".into())),
        ];
        let text = markdown(&rows);
        assert!(
            text.contains("| agent | none | HTTP/1.1 | 30000 | 0.50x |"),
            "{text}"
        );
        assert!(
            text.contains("| haproxy | none | HTTP/1.1 | 60000 | - |"),
            "{text}"
        );
        assert!(
            text.contains("| agent | none | HTTP/2 | - (valgrind failed) | - |"),
            "{text}"
        );
    }
}
