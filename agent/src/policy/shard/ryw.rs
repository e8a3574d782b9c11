//! Read-your-writes: remembers when each client last wrote to each shard, so that its
//! reads of that shard go to the primary for a window after the write.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Entries kept before expired ones are swept (bounds memory under many clients).
const SWEEP_AT: usize = 4096;

/// A client as read-your-writes tells clients apart: the stable hash of its header value
/// or address. A hash rather than the text keeps the request path free of allocation; two
/// clients colliding in 64 bits would at worst send a read to the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId(u64);

impl ClientId {
    /// The client named by these bytes (a header value).
    pub fn of(bytes: &[u8]) -> Self {
        Self(crate::policy::hash::stable_hash(bytes))
    }

    /// The client at this address.
    pub fn at(ip: std::net::IpAddr) -> Self {
        Self(crate::policy::hash::stable_hash_ip(ip))
    }
}

/// Last writes by (client, shard).
#[derive(Debug)]
pub struct ReadYourWrites {
    /// How long after a write the client's reads go to the primary.
    pub window: Duration,
    /// The header naming the client; `None`: the client's address.
    pub client_header: Option<http::HeaderName>,
    writes: Mutex<HashMap<(ClientId, usize), Instant>>,
}

impl ReadYourWrites {
    /// A tracker with no writes yet.
    pub fn new(window: Duration, client_header: Option<http::HeaderName>) -> Self {
        Self {
            window,
            client_header,
            writes: Mutex::new(HashMap::new()),
        }
    }

    /// Records that `client` wrote to `shard` now.
    pub fn wrote(&self, client: ClientId, shard: usize) {
        let now = Instant::now();
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        if writes.len() >= SWEEP_AT {
            let window = self.window;
            writes.retain(|_, at| now.duration_since(*at) < window);
        }
        writes.insert((client, shard), now);
    }

    /// Whether `client` wrote to `shard` within the window.
    pub fn recent(&self, client: ClientId, shard: usize) -> bool {
        let writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        writes
            .get(&(client, shard))
            .is_some_and(|at| at.elapsed() < self.window)
    }

    /// Keeps the writes of `previous` (a config push must not forget them).
    pub fn inherit(&self, previous: &ReadYourWrites) {
        let old = previous.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        writes.extend(old.iter().map(|(k, v)| (*k, *v)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> ClientId {
        ClientId::of(name.as_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_sends_the_clients_reads_of_that_shard_to_the_primary_for_the_window() {
        let ryw = ReadYourWrites::new(Duration::from_secs(2), None);
        assert!(!ryw.recent(id("alice"), 0));
        ryw.wrote(id("alice"), 0);
        assert!(ryw.recent(id("alice"), 0));
        assert!(!ryw.recent(id("alice"), 1), "only the shard written to");
        assert!(!ryw.recent(id("bob"), 0), "only the client that wrote");
        tokio::time::advance(Duration::from_millis(1_900)).await;
        assert!(ryw.recent(id("alice"), 0));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!ryw.recent(id("alice"), 0), "the window has passed");
        ryw.wrote(id("alice"), 0);
        assert!(ryw.recent(id("alice"), 0), "a new write opens a new window");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_writes_are_swept_once_many_clients_wrote() {
        let ryw = ReadYourWrites::new(Duration::from_secs(1), None);
        for i in 0..SWEEP_AT {
            ryw.wrote(id(&format!("c{i}")), 0);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        ryw.wrote(id("late"), 0);
        assert_eq!(ryw.writes.lock().unwrap().len(), 1);
        assert!(ryw.recent(id("late"), 0));
    }
}
