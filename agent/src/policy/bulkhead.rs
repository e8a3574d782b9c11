//! Bulkhead, one per destination: at most `max_concurrent_requests` in flight, a bounded FIFO
//! queue of waiting requests with a queue timeout, and a cap on upstream connections. Each
//! destination has its own, so a hanging service cannot starve calls to a healthy one.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bulwark_proto::{defaults, v1};
use tokio::sync::Semaphore;

use crate::policy::duration::{InvalidDuration, duration};

/// A `bulkhead` section that cannot be enforced. Messages name the field within the section;
/// the caller prefixes the section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBulkhead {
    /// `queue_timeout` is absent although requests may queue.
    #[error(
        "queueTimeout is missing while maxPending is {0}; the control plane must send an exact value"
    )]
    MissingQueueTimeout(u32),
    /// `queue_timeout` is not a valid duration.
    #[error("queueTimeout: {0}")]
    QueueTimeout(InvalidDuration),
    /// `queue_timeout` is zero although requests may queue.
    #[error(
        "queueTimeout is 0 while maxPending is {0}; queued requests would time out at once (set maxPending to 0 to disable the queue)"
    )]
    ZeroQueueTimeout(u32),
}

/// Validated bulkhead config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkheadConfig {
    /// Requests in flight at once; 0 = unlimited (no queue either).
    pub max_concurrent_requests: u32,
    /// Requests that may wait for a slot; more are rejected at once.
    pub max_pending: u32,
    /// How long a request may wait for a slot.
    pub queue_timeout: Duration,
    /// Upstream connections at once; 0 = unlimited.
    pub max_connections: u32,
}

impl Default for BulkheadConfig {
    /// The policy API's defaults: 100 in flight, 50 pending for up to 250ms, connections unlimited.
    fn default() -> Self {
        Self {
            max_concurrent_requests: defaults::DEFAULT_MAX_CONCURRENT_REQUESTS,
            max_pending: defaults::DEFAULT_MAX_PENDING,
            queue_timeout: defaults::DEFAULT_QUEUE_TIMEOUT,
            max_connections: defaults::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl BulkheadConfig {
    /// A bulkhead that limits nothing.
    pub fn unlimited() -> Self {
        Self {
            max_concurrent_requests: 0,
            max_pending: 0,
            queue_timeout: Duration::ZERO,
            max_connections: 0,
        }
    }

    /// Whether requests can ever have to wait in the queue.
    fn queues(&self) -> bool {
        self.max_concurrent_requests > 0 && self.max_pending > 0
    }
}

impl TryFrom<&v1::Bulkhead> for BulkheadConfig {
    type Error = InvalidBulkhead;

    fn try_from(proto: &v1::Bulkhead) -> Result<Self, Self::Error> {
        let mut config = Self {
            max_concurrent_requests: proto.max_concurrent_requests,
            max_pending: proto.max_pending,
            queue_timeout: Duration::ZERO,
            max_connections: proto.max_connections,
        };
        match &proto.queue_timeout {
            Some(timeout) => {
                config.queue_timeout = duration(timeout).map_err(InvalidBulkhead::QueueTimeout)?;
            }
            // Without a queue the timeout is never used.
            None if !config.queues() => {}
            None => return Err(InvalidBulkhead::MissingQueueTimeout(config.max_pending)),
        }
        if config.queues() && config.queue_timeout.is_zero() {
            return Err(InvalidBulkhead::ZeroQueueTimeout(config.max_pending));
        }
        Ok(config)
    }
}

/// Why the bulkhead refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BulkheadFull {
    /// Every slot is busy and the queue is full.
    #[error("bulkhead full: every request slot is busy and the wait queue is full")]
    QueueFull,
    /// The request waited the whole queue timeout without getting a slot.
    #[error("bulkhead full: no request slot freed up within the queue timeout")]
    QueueTimeout,
}

impl BulkheadFull {
    /// A short name for logs and metrics labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::QueueFull => "queue-full",
            Self::QueueTimeout => "queue-timeout",
        }
    }
}

/// A destination's bulkhead, shared as `Arc` by its requests.
pub struct Bulkhead {
    config: BulkheadConfig,
    shared: Arc<Shared>,
    connections: Option<Arc<Semaphore>>,
}

#[derive(Debug)]
struct Shared {
    /// `None` when concurrency is unlimited.
    slots: Option<Semaphore>,
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    rejected: AtomicU64,
}

impl Bulkhead {
    /// A bulkhead enforcing `config`.
    pub fn new(config: BulkheadConfig) -> Self {
        let slots = (config.max_concurrent_requests > 0)
            .then(|| Semaphore::new(config.max_concurrent_requests as usize));
        let connections = (config.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(config.max_connections as usize)));
        Self {
            config,
            shared: Arc::new(Shared {
                slots,
                in_flight: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
                rejected: AtomicU64::new(0),
            }),
            connections,
        }
    }

    /// A bulkhead that admits everything (it still counts requests in flight).
    pub fn unlimited() -> Self {
        Self::new(BulkheadConfig::unlimited())
    }

    /// Waits for a request slot: at once if one is free, else in a FIFO queue bounded by
    /// `max_pending`, for at most `queue_timeout`. Cancelling the wait leaves the queue.
    pub async fn acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        let Some(slots) = &self.shared.slots else {
            return Ok(self.permit());
        };
        // `try_acquire` only succeeds when nobody is queued: the semaphore hands released
        // permits to waiters first, so a newcomer cannot overtake the queue.
        if let Ok(slot) = slots.try_acquire() {
            slot.forget();
            return Ok(self.permit());
        }
        let Some(_queued) = self.enqueue() else {
            return Err(self.reject(BulkheadFull::QueueFull));
        };
        match tokio::time::timeout(self.config.queue_timeout, slots.acquire()).await {
            Ok(Ok(slot)) => {
                slot.forget();
                Ok(self.permit())
            }
            Ok(Err(_closed)) => {
                // The semaphore is never closed; refuse rather than admit unlimited.
                Err(self.reject(BulkheadFull::QueueFull))
            }
            Err(_elapsed) => Err(self.reject(BulkheadFull::QueueTimeout)),
        }
    }

    /// Requests holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Requests refused so far (queue full or queue timeout).
    pub fn rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// The cap on upstream connections, for the connector; `None` if unlimited.
    pub fn connection_limit(&self) -> Option<Arc<Semaphore>> {
        self.connections.clone()
    }

    /// The config in force.
    pub fn config(&self) -> &BulkheadConfig {
        &self.config
    }

    fn permit(&self) -> BulkheadPermit {
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        BulkheadPermit {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Takes a place in the queue if one is free.
    fn enqueue(&self) -> Option<QueuePlace<'_>> {
        let max = self.config.max_pending as usize;
        self.shared
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                (queued < max).then_some(queued + 1)
            })
            .ok()
            .map(|_| QueuePlace {
                queued: &self.shared.queued,
            })
    }

    fn reject(&self, why: BulkheadFull) -> BulkheadFull {
        // The caller logs the decision, with the destination it concerns.
        self.shared.rejected.fetch_add(1, Ordering::Relaxed);
        why
    }
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("config", &self.config)
            .field("in_flight", &self.in_flight())
            .field("queued", &self.queued())
            .field("rejected", &self.rejected())
            .finish()
    }
}

/// A place in the wait queue; leaving it (slot granted, timeout or cancellation) frees it.
struct QueuePlace<'a> {
    queued: &'a AtomicUsize,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request slot in a bulkhead; released when dropped.
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct BulkheadPermit {
    shared: Arc<Shared>,
}

impl Drop for BulkheadPermit {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(slots) = &self.shared.slots {
            slots.add_permits(1);
        }
    }
}

impl fmt::Debug for BulkheadPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BulkheadPermit")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;
    use tokio::task::JoinHandle;
    use tokio::time::advance;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn bulkhead(max: u32, pending: u32, timeout: Duration) -> Arc<Bulkhead> {
        Arc::new(Bulkhead::new(BulkheadConfig {
            max_concurrent_requests: max,
            max_pending: pending,
            queue_timeout: timeout,
            max_connections: 0,
        }))
    }

    /// Starts a request that queues; lets it reach the queue before returning.
    async fn queue(b: &Arc<Bulkhead>) -> JoinHandle<Result<BulkheadPermit, BulkheadFull>> {
        let b = Arc::clone(b);
        let task = tokio::spawn(async move { b.acquire().await });
        tokio::task::yield_now().await;
        task
    }

    /// Polls a future once: `Some` if it completed.
    fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(waker)) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn admits_up_to_max_concurrent() {
        let b = bulkhead(2, 0, ms(100));
        let first = b.acquire().await.unwrap();
        let _second = b.acquire().await.unwrap();
        assert_eq!(b.in_flight(), 2);
        // No queue: the third is refused at once.
        assert_eq!(b.acquire().await.unwrap_err(), BulkheadFull::QueueFull);
        drop(first);
        assert_eq!(b.in_flight(), 1);
        let _third = b.acquire().await.expect("a released slot is reused");
        assert_eq!(b.rejected(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn queues_up_to_max_pending_then_rejects_at_once() {
        let b = bulkhead(1, 2, ms(100));
        let _busy = b.acquire().await.unwrap();
        let waiting = [queue(&b).await, queue(&b).await];
        assert_eq!(b.queued(), 2);
        // The queue is full: refused without waiting (the clock does not move).
        let before = tokio::time::Instant::now();
        assert_eq!(b.acquire().await.unwrap_err(), BulkheadFull::QueueFull);
        assert_eq!(before.elapsed(), Duration::ZERO);
        assert_eq!(b.rejected(), 1);
        assert_eq!(b.in_flight(), 1);
        for task in waiting {
            task.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn queued_requests_get_released_slots_in_fifo_order() {
        let b = bulkhead(1, 3, ms(100));
        let busy = b.acquire().await.unwrap();
        let mut first = queue(&b).await;
        let mut second = queue(&b).await;
        advance(ms(50)).await;
        assert!(poll_once(&mut first).is_none());

        drop(busy);
        let granted = first
            .await
            .unwrap()
            .expect("the first in line gets the slot");
        assert_eq!(b.in_flight(), 1);
        assert_eq!(b.queued(), 1);
        assert!(poll_once(&mut second).is_none(), "the second still waits");
        // A newcomer does not overtake the queue.
        let mut newcomer = std::pin::pin!(b.acquire());
        assert!(poll_once(&mut newcomer).is_none());

        drop(granted);
        let _second = second.await.unwrap().expect("then the second");
        assert_eq!(b.queued(), 1, "the newcomer is queued behind");
        assert_eq!(b.rejected(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_times_out_after_queue_timeout() {
        let b = bulkhead(1, 1, ms(100));
        let _busy = b.acquire().await.unwrap();
        let mut waiting = queue(&b).await;
        advance(ms(99)).await;
        assert!(poll_once(&mut waiting).is_none(), "still waiting at 99ms");
        advance(ms(1)).await;
        assert_eq!(
            waiting.await.unwrap().unwrap_err(),
            BulkheadFull::QueueTimeout
        );
        assert_eq!(b.queued(), 0);
        assert_eq!(b.rejected(), 1);
        assert_eq!(b.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_wait_leaves_the_queue() {
        let b = bulkhead(1, 1, ms(100));
        let busy = b.acquire().await.unwrap();
        let waiting = queue(&b).await;
        assert_eq!(b.queued(), 1);
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(b.queued(), 0);
        // The place is free again, and the cancelled waiter took no slot.
        let next = queue(&b).await;
        drop(busy);
        let _next = next.await.unwrap().unwrap();
        assert_eq!(b.rejected(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_saturated_bulkhead_does_not_affect_another() {
        let hanging = bulkhead(2, 1, ms(100));
        let healthy = bulkhead(2, 1, ms(100));
        let _stuck = [
            hanging.acquire().await.unwrap(),
            hanging.acquire().await.unwrap(),
        ];
        let queued = queue(&hanging).await;
        assert_eq!(
            hanging.acquire().await.unwrap_err(),
            BulkheadFull::QueueFull
        );

        // The healthy destination admits at once, without waiting.
        let before = tokio::time::Instant::now();
        for _ in 0..100 {
            let _ok = healthy.acquire().await.unwrap();
        }
        assert_eq!(before.elapsed(), Duration::ZERO);
        assert_eq!(healthy.rejected(), 0);
        assert_eq!(healthy.queued(), 0);
        queued.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_admits_everything_and_counts() {
        let b = Bulkhead::unlimited();
        let permits: Vec<_> = futures::future::join_all((0..1_000).map(|_| b.acquire())).await;
        assert!(permits.iter().all(Result::is_ok));
        assert_eq!(b.in_flight(), 1_000);
        drop(permits);
        assert_eq!(b.in_flight(), 0);
        assert!(b.connection_limit().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn connection_limit_has_max_connections_permits() {
        let b = Bulkhead::new(BulkheadConfig {
            max_connections: 3,
            ..BulkheadConfig::default()
        });
        let limit = b.connection_limit().expect("limited");
        assert_eq!(limit.available_permits(), 3);
        // Shared, not a copy: the connector's permits show through the bulkhead's handle.
        let _conn = limit.try_acquire().unwrap();
        assert_eq!(b.connection_limit().unwrap().available_permits(), 2);
    }

    #[test]
    fn validates_proto_bulkhead() {
        let proto = v1::Bulkhead {
            max_concurrent_requests: 64,
            max_pending: 32,
            queue_timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            max_connections: 64,
        };
        assert_eq!(
            BulkheadConfig::try_from(&proto),
            Ok(BulkheadConfig {
                max_concurrent_requests: 64,
                max_pending: 32,
                queue_timeout: ms(100),
                max_connections: 64,
            })
        );
        let missing = v1::Bulkhead {
            queue_timeout: None,
            ..proto
        };
        assert_eq!(
            BulkheadConfig::try_from(&missing),
            Err(InvalidBulkhead::MissingQueueTimeout(32))
        );
        let zero = v1::Bulkhead {
            queue_timeout: Some(prost_types::Duration::default()),
            ..proto
        };
        assert_eq!(
            BulkheadConfig::try_from(&zero),
            Err(InvalidBulkhead::ZeroQueueTimeout(32))
        );
        // Without a queue no timeout is needed.
        let no_queue = v1::Bulkhead {
            max_pending: 0,
            queue_timeout: None,
            ..proto
        };
        assert!(BulkheadConfig::try_from(&no_queue).is_ok());
        let negative = v1::Bulkhead {
            queue_timeout: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..proto
        };
        assert!(matches!(
            BulkheadConfig::try_from(&negative),
            Err(InvalidBulkhead::QueueTimeout(_))
        ));
    }

    #[test]
    fn bulkhead_is_shareable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Bulkhead>();
        assert_send_sync::<BulkheadPermit>();
    }
}
