//! CPU time and memory of a process, read from `/proc/PID/stat` and `/proc/PID/status`.

use std::time::Duration;

/// CPU and memory of a process at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// User plus system CPU time of every thread so far.
    pub cpu: Duration,
    /// Resident set size now, in KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size so far, in KiB (`VmHWM`).
    pub peak_rss_kib: u64,
    /// The anonymous part of the resident set now, in KiB (`RssAnon`): the process's
    /// own memory, without the pages of its binary and libraries, which every process
    /// running the same files shares.
    pub anon_kib: u64,
}

/// Errors reading `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The file could not be read (the process is gone?).
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file did not have the expected shape.
    #[error("unexpected contents in {0}")]
    Parse(String),
}

/// Reads `pid`'s CPU time and memory; `ticks_per_second` is `getconf CLK_TCK`.
pub fn sample(pid: u32, ticks_per_second: u64) -> Result<Sample, ProcError> {
    let stat_path = format!("/proc/{pid}/stat");
    let stat = read(&stat_path)?;
    let ticks = cpu_ticks(&stat).ok_or(ProcError::Parse(stat_path))?;
    let status_path = format!("/proc/{pid}/status");
    let status = read(&status_path)?;
    let rss_kib = status_kib(&status, "VmRSS:").ok_or(ProcError::Parse(status_path.clone()))?;
    let peak_rss_kib =
        status_kib(&status, "VmHWM:").ok_or(ProcError::Parse(status_path.clone()))?;
    let anon_kib = status_kib(&status, "RssAnon:").ok_or(ProcError::Parse(status_path))?;
    Ok(Sample {
        cpu: Duration::from_secs_f64(ticks as f64 / ticks_per_second.max(1) as f64),
        rss_kib,
        peak_rss_kib,
        anon_kib,
    })
}

/// The clock ticks per second of `/proc/PID/stat`'s times (`getconf CLK_TCK`, 100 if
/// that cannot be run).
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn read(path: &str) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_owned(),
        source,
    })
}

/// utime + stime (fields 14 and 15) from a `stat` line. The command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted after its closing parenthesis.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_counted_after_the_command_name() {
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("42 (short) S 1"), None);
    }

    #[test]
    fn memory_lines_are_read_in_kib() {
        let status = "Name:\tx\nVmHWM:\t   9876 kB\nVmRSS:\t    5432 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(5432));
        assert_eq!(status_kib(status, "VmHWM:"), Some(9876));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = sample(std::process::id(), ticks_per_second()).unwrap();
        assert!(me.peak_rss_kib >= me.rss_kib && me.rss_kib > 0, "{me:?}");
    }
}
