//! The demo's running commentary: one line per event, stamped with the time
//! since the traffic started.

use std::io::Write as _;
use std::time::Duration;

use tokio::time::Instant;

/// Prints timestamped progress lines to stdout.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    start: Instant,
}

impl Progress {
    /// Progress measured from `start`.
    pub fn new(start: Instant) -> Self {
        Self { start }
    }

    /// The time since `start`.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Prints `message` stamped with `at`.
    pub fn say(&self, at: Duration, message: &str) {
        let mut out = std::io::stdout().lock();
        // A closed stdout (the demo piped into `head`) is no reason to stop the demo.
        let _ = writeln!(out, "[{:>5.1}s] {message}", at.as_secs_f64());
    }

    /// Prints `message` stamped with now.
    pub fn now(&self, message: &str) {
        self.say(self.elapsed(), message);
    }
}
