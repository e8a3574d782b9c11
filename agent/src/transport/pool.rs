//! The connections kept open to one endpoint: idle HTTP/1.1 connections and one
//! shared HTTP/2 connection, handed to requests by the upstream clients (`transport/upstream.rs`).
//!
//! Our own pool rather than hyper-util's legacy client pool, because that pool cost
//! about a seventh of an HTTP/1.1 request's instructions (docs/benchmarks.md): every
//! checkout and return hashed the `(scheme, authority)` key with SipHash in one map for
//! all endpoints, and every HTTP/1.1 response spawned a task that waited for the
//! connection to be ready again. Here each endpoint owns its pool (the balancer's pick
//! leads straight to it), a connection goes back when its response body ends, and a
//! task runs per pool only while it holds idle connections.
//!
//! The idle list is a LIFO behind a `std` mutex held for one push or pop, never across
//! an `.await`: the most recently used connection goes out first (least likely to have
//! been closed by the server's own keep-alive timeout), and the oldest ones age out.
//! Idle connections are closed after [`IDLE_TIMEOUT`], and, like HAProxy's
//! `pool-purge-delay`, every [`PURGE_INTERVAL`] half of those beyond the peak that the
//! last interval used are closed, so that a burst's connections (and their buffers) do
//! not stay for the whole idle timeout.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http1;
use tokio::sync::Notify;

use super::ProxyBody;

/// Idle connections are closed after this long without a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often idle connections are aged and the excess over recent use is closed.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(5);

/// [`IDLE_TIMEOUT`] in purge intervals.
const IDLE_TICKS: u32 = (IDLE_TIMEOUT.as_secs() / PURGE_INTERVAL.as_secs()) as u32;

/// An HTTP/1.1 connection's request handle.
pub type H1 = http1::SendRequest<ProxyBody>;

/// An HTTP/2 connection's request handle (cloned per request).
pub use super::http2::H2;

/// The pooled connections to one endpoint.
#[derive(Default)]
pub struct Pool {
    /// Idle HTTP/1.1 connections, the most recently returned last.
    idle: Mutex<Vec<Idle>>,
    /// The shared HTTP/2 connection, if one is open.
    h2: ArcSwapOption<Shared>,
    /// Held while an HTTP/2 connection is being made, so that concurrent first
    /// requests share one.
    pub(super) h2_connecting: tokio::sync::Mutex<()>,
    /// Woken when a connection is returned, for requests waiting on a connection limit.
    returned: Notify,
    /// Requests waiting on `returned` (none: a return notifies nobody, taking no lock).
    waiting: AtomicUsize,
    /// Bumped by [`Pool::reset`]: connections checked out before it are not taken back.
    epoch: AtomicU32,
    /// Purge intervals since the pool was made (the idle clock: no clock read per request).
    tick: AtomicU32,
    /// HTTP/1.1 connections checked out now.
    in_use: AtomicUsize,
    /// The most checked out at once since the last purge.
    peak: AtomicUsize,
    /// Whether the purge task runs.
    purging: AtomicBool,
}

/// An idle HTTP/1.1 connection and when it went idle.
struct Idle {
    conn: H1,
    tick: u32,
}

/// The shared HTTP/2 connection.
pub(super) struct Shared {
    pub(super) conn: H2,
    epoch: u32,
    /// The tick of its last request (a relaxed store per request).
    used: AtomicU32,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle_count())
            .field("in_use", &self.in_use.load(Ordering::Relaxed))
            .field("h2", &self.h2.load().is_some())
            .finish()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Idle HTTP/1.1 connections now.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Whether the next idle connection would be skipped as closed.
    #[cfg(test)]
    pub(super) fn checkout_would_skip(&self) -> bool {
        self.lock().last().is_some_and(|c| !c.conn.is_ready())
    }

    /// HTTP/1.1 connections checked out now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Closes every idle connection and stops taking back those in use (they finish
    /// their requests): the settings they were made with (TLS, identity, connection
    /// limit) no longer hold.
    pub fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let idle = std::mem::take(&mut *self.lock());
        self.h2.store(None);
        drop(idle);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        // A panic while holding this lock cannot leave the list inconsistent (a push or
        // a pop), so a poisoned lock is used as is.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently returned idle connection that can take a request, as a lease
    /// that returns it when the response ends; closed ones found on the way are dropped.
    pub(super) fn checkout(self: &Arc<Self>) -> Option<Lease> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let conn = {
            let mut idle = self.lock();
            loop {
                let found = idle.pop()?;
                if found.conn.is_ready() {
                    break found.conn;
                }
                // Closed (by the server, or broken) while idle.
            }
        };
        Some(self.lease(conn, epoch, true))
    }

    /// A lease on a new connection.
    pub(super) fn lease_new(self: &Arc<Self>, conn: H1, epoch: u32) -> Lease {
        self.lease(conn, epoch, false)
    }

    fn lease(self: &Arc<Self>, conn: H1, epoch: u32, reused: bool) -> Lease {
        let in_use = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(in_use, Ordering::Relaxed);
        Lease {
            pool: Arc::clone(self),
            conn: Some(conn),
            epoch,
            reused,
        }
    }

    /// Resolves when a connection is returned to the pool (enable it before checking
    /// the pool, so that a return in between is not missed).
    pub(super) fn returned(&self) -> Returned<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Returned {
            notified: self.returned.notified(),
            waiting: &self.waiting,
        }
    }

    /// How many times the pool was [`Pool::reset`].
    pub fn resets(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The epoch to tag a new connection with (read before connecting).
    pub(super) fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Takes `conn` back if it is ready for another request and still of this epoch.
    fn put(self: &Arc<Self>, conn: H1, epoch: u32) {
        if epoch != self.epoch.load(Ordering::Acquire) {
            return;
        }
        if !conn.is_ready() {
            // Not ready yet (its request body is still being sent): back once it is, or
            // dropped if it closes instead. Rare: a response normally ends after its request.
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut conn = conn;
                if conn.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.put(conn, epoch);
                }
            });
            return;
        }
        let tick = self.tick.load(Ordering::Relaxed);
        self.lock().push(Idle { conn, tick });
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.returned.notify_waiters();
        }
        self.start_purging();
    }

    /// The shared HTTP/2 connection, if open and of this epoch.
    pub(super) fn h2(&self) -> Option<H2> {
        let shared = self.h2.load();
        let shared = shared.as_ref()?;
        if shared.conn.is_closed() || shared.epoch != self.epoch.load(Ordering::Acquire) {
            return None;
        }
        shared
            .used
            .store(self.tick.load(Ordering::Relaxed), Ordering::Relaxed);
        Some(shared.conn.clone())
    }

    /// Keeps `conn` as the shared HTTP/2 connection.
    pub(super) fn set_h2(self: &Arc<Self>, conn: H2, epoch: u32) {
        if epoch != self.epoch.load(Ordering::Acquire) {
            return;
        }
        self.h2.store(Some(Arc::new(Shared {
            conn,
            epoch,
            used: AtomicU32::new(self.tick.load(Ordering::Relaxed)),
        })));
        self.start_purging();
    }

    /// Starts the purge task unless it runs.
    fn start_purging(self: &Arc<Self>) {
        if self.purging.load(Ordering::Relaxed) || self.purging.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(purge(pool));
    }

    /// One purge interval passed: closes the idle connections past the idle timeout
    /// and half of those beyond the interval's peak use. Whether anything is left to
    /// watch.
    pub(super) fn purge(&self) -> bool {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let in_use = self.in_use.load(Ordering::Relaxed);
        let peak = self.peak.swap(in_use, Ordering::Relaxed);
        let closed = {
            let mut idle = self.lock();
            let before = idle.len();
            idle.retain(|c| tick.wrapping_sub(c.tick) < IDLE_TICKS && !c.conn.is_closed());
            let wanted = peak.saturating_sub(in_use);
            let excess = idle.len().saturating_sub(wanted);
            // The oldest first (the list is in the order they were returned).
            let dropped: Vec<Idle> = idle.drain(..excess.div_ceil(2)).collect();
            let closed = before - idle.len();
            drop(idle);
            drop(dropped);
            closed
        };
        if closed > 0 {
            tracing::debug!(closed, in_use, peak, "idle upstream connections closed");
        }
        if let Some(shared) = self.h2.load().as_ref()
            && (shared.conn.is_closed()
                || tick.wrapping_sub(shared.used.load(Ordering::Relaxed)) >= IDLE_TICKS)
        {
            self.h2.store(None);
        }
        self.idle_count() > 0 || self.h2.load().is_some()
    }
}

/// Runs [`Pool::purge`] every [`PURGE_INTERVAL`] while the pool holds connections.
async fn purge(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(PURGE_INTERVAL).await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.purge() {
            continue;
        }
        pool.purging.store(false, Ordering::Release);
        // A connection returned between the check and the store would have seen the
        // task running: look once more.
        if pool.idle_count() == 0 && pool.h2.load().is_none()
            || pool.purging.swap(true, Ordering::AcqRel)
        {
            return;
        }
    }
}

pin_project_lite::pin_project! {
    /// A wait for a connection to be returned to a pool.
    pub(super) struct Returned<'a> {
        #[pin]
        notified: tokio::sync::futures::Notified<'a>,
        waiting: &'a AtomicUsize,
    }

    impl PinnedDrop for Returned<'_> {
        fn drop(this: Pin<&mut Self>) {
            this.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Returned<'_> {
    /// Registers the wait, so that a return from now on wakes it.
    pub(super) fn enable(self: Pin<&mut Self>) {
        self.project().notified.enable();
    }
}

impl std::future::Future for Returned<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.project().notified.poll(cx)
    }
}

/// An HTTP/1.1 connection checked out for one request; back to its pool when
/// [`Lease::release`]d (the response ended), closed if dropped before.
pub struct Lease {
    pool: Arc<Pool>,
    conn: Option<H1>,
    epoch: u32,
    reused: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("reused", &self.reused)
            .finish()
    }
}

impl Lease {
    /// The connection's request handle.
    pub(super) fn conn(&mut self) -> Option<&mut H1> {
        self.conn.as_mut()
    }

    /// Whether the connection served requests before this one.
    pub(super) fn reused(&self) -> bool {
        self.reused
    }

    /// The response ended: the connection goes back to the pool.
    pub fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
            self.pool.put(conn, self.epoch);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            // Dropping the handle closes the connection once its response is done with.
            self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
