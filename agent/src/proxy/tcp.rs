//! Opaque TCP: bytes relayed both ways, with connection-level policy for mesh
//! destinations (connect timeout, max connections, per-endpoint breaker on
//! connect failures, balancing) and an idle timeout for every connection.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::reason;
use crate::balance::PickError;
use crate::destination::Destination;
use crate::retry::Failure;

/// Copy buffer per direction.
const BUF_SIZE: usize = 16 * 1024;

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed their sending half.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// Bytes each way once a relay ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relayed {
    /// Client to server.
    pub sent: u64,
    /// Server to client.
    pub received: u64,
    /// Why it ended.
    pub end: RelayEnd,
}

/// Relays bytes between `client` and `server` until both have closed their
/// sending side, each close passed on as a half-close (FIN) to the other, or
/// until nothing moves for `idle`.
pub async fn relay<C, S>(client: C, server: S, idle: Duration) -> io::Result<Relayed>
where
    C: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, shared by both directions.
    let last = AtomicU64::new(0);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut server_rd, mut server_wr) = tokio::io::split(server);
    let activity = Activity { last: &last, start };
    let up = copy_half(&mut client_rd, &mut server_wr, activity, &sent);
    let down = copy_half(&mut server_rd, &mut client_wr, activity, &received);
    let watchdog = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let due = start + since + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let end = tokio::select! {
        both = async { tokio::try_join!(up, down) } => {
            both?;
            RelayEnd::Closed
        }
        () = watchdog => RelayEnd::Idle,
    };
    Ok(Relayed {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        end,
    })
}

/// When a relay last moved a byte (either way), for its idle timeout.
#[derive(Clone, Copy)]
struct Activity<'a> {
    last: &'a AtomicU64,
    start: Instant,
}

impl Activity<'_> {
    fn touch(self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }
}

/// Copies one direction until EOF, then half-closes the writer.
async fn copy_half<R, W>(
    rd: &mut R,
    wr: &mut W,
    activity: Activity<'_>,
    total: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the other direction keeps flowing.
            wr.shutdown().await?;
            return Ok(());
        }
        // Bytes read count as activity even while the write waits for a slow reader.
        activity.touch();
        wr.write_all(&buf[..n]).await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// Why an opaque connection to a mesh destination was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// Connects to an endpoint of `dst` under its connection policy: the
/// connection limit, the balancer (or `pinned`, for a connection to one pod's
/// address), each endpoint's breaker (connect failures count), the connect
/// timeout, and connect-failure retries to other endpoints when the retry
/// policy allows them. The returned permit holds a connection slot.
pub async fn connect(
    dst: &Destination,
    pinned: Option<SocketAddr>,
) -> Result<(TcpStream, Option<tokio::sync::OwnedSemaphorePermit>), Refused> {
    let slot = match dst.bulkhead.connection_limit() {
        Some(limit) => match limit.try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                debug!(dst = %dst.name, reason = reason::BULKHEAD_FULL, "connection refused: maxConnections reached");
                return Err(Refused(reason::BULKHEAD_FULL));
            }
        },
        None => None,
    };
    let attempts = match (&dst.policy.retry, pinned) {
        (Some(r), None) if r.retries_failure(Failure::Connect) => r.attempts.max(1),
        _ => 1,
    };
    let mut avoid = Vec::new();
    let mut last = Refused(reason::CONNECT_FAILED);
    for attempt in 0..attempts {
        let picked = match pinned {
            Some(addr) => dst.balancer.pick_addr(addr),
            None => dst.balancer.pick(&avoid),
        };
        let picked = match picked {
            Ok(p) => p,
            Err(PickError::NoEndpoints) => return Err(Refused(reason::NO_ENDPOINTS)),
            Err(PickError::AllOpen { .. }) if attempt == 0 => {
                debug!(dst = %dst.name, reason = reason::CIRCUIT_OPEN, "connection refused: every endpoint's breaker is open");
                return Err(Refused(reason::CIRCUIT_OPEN));
            }
            Err(PickError::AllOpen { .. }) => return Err(last),
        };
        let (endpoint, permit, _load) = picked.into_parts();
        let addr = endpoint.addr;
        match tokio::time::timeout(dst.policy.timeouts.connect, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                permit.success();
                if let Err(error) = stream.set_nodelay(true) {
                    debug!(%error, "cannot set TCP_NODELAY");
                }
                return Ok((stream, slot));
            }
            Ok(Err(error)) => {
                debug!(dst = %dst.name, endpoint = %addr, %error, attempt, "connect failed");
                permit.failure();
                last = Refused(reason::CONNECT_FAILED);
            }
            Err(_) => {
                debug!(dst = %dst.name, endpoint = %addr, attempt, "connect timed out");
                permit.failure();
                last = Refused(reason::TIMEOUT);
            }
        }
        avoid.push(addr);
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bulwark_proto::v1;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::breaker::BreakerState;
    use crate::config::Config;
    use crate::metrics::Metrics;

    fn secs(s: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    }

    /// A destination over `endpoints` that trips after 2 connect failures, may
    /// retry a connect failure once, and holds at most `max_connections`.
    fn destination(endpoints: &[SocketAddr], max_connections: u32) -> Destination {
        let metrics = Metrics::new(Arc::new(arc_swap::ArcSwap::from_pointee(Config::default())));
        let port = v1::ServicePort {
            port: 7000,
            app_protocol: "tcp".into(),
            endpoints: endpoints
                .iter()
                .map(|a| v1::Endpoint {
                    address: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            resilience: Some(v1::ResiliencePolicy {
                retry: Some(v1::Retry {
                    attempts: 2,
                    retry_on: vec!["connect-failure".into()],
                    ..Default::default()
                }),
                circuit_breaker: Some(v1::CircuitBreaker {
                    consecutive_failures: 2,
                    open_duration: secs(60),
                    max_open_duration: secs(60),
                    half_open_probes: 1,
                    ..Default::default()
                }),
                bulkhead: Some(v1::Bulkhead {
                    max_connections,
                    ..Default::default()
                }),
                load_balancer: Some(v1::LoadBalancer {
                    strategy: 1,
                    hash_on: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Destination::build("db.test:7000", &port, None, &metrics).unwrap()
    }

    /// An address where nothing listens (connections are refused at once).
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn connect_failures_go_to_another_endpoint_and_trip_the_breaker() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed_port().await;
        let dst = destination(&[dead, live.local_addr().unwrap()], 0);
        // Round robin starts at the dead endpoint: each connect fails there and is
        // retried on the live one.
        for _ in 0..2 {
            let (stream, _) = connect(&dst, None).await.unwrap();
            assert_eq!(stream.peer_addr().unwrap(), live.local_addr().unwrap());
        }
        let dead_ep = dst
            .balancer
            .endpoints()
            .iter()
            .find(|e| e.addr == dead)
            .unwrap();
        assert_eq!(
            dead_ep.breaker.state(),
            BreakerState::Open,
            "two connect failures trip it"
        );
        // With its breaker open the dead endpoint gets no more connection attempts.
        for _ in 0..3 {
            let (stream, _) = connect(&dst, None).await.unwrap();
            assert_eq!(stream.peer_addr().unwrap(), live.local_addr().unwrap());
        }
    }

    #[tokio::test]
    async fn a_pinned_dead_endpoint_is_refused_then_circuit_open() {
        let dead = closed_port().await;
        let dst = destination(&[dead], 0);
        assert_eq!(
            connect(&dst, Some(dead)).await.unwrap_err(),
            Refused(reason::CONNECT_FAILED)
        );
        assert_eq!(
            connect(&dst, Some(dead)).await.unwrap_err(),
            Refused(reason::CONNECT_FAILED)
        );
        assert_eq!(
            connect(&dst, Some(dead)).await.unwrap_err(),
            Refused(reason::CIRCUIT_OPEN)
        );
        let empty = destination(&[], 0);
        assert_eq!(
            connect(&empty, None).await.unwrap_err(),
            Refused(reason::NO_ENDPOINTS)
        );
    }

    #[tokio::test]
    async fn max_connections_is_a_bulkhead_on_open_connections() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = destination(&[live.local_addr().unwrap()], 1);
        let first = connect(&dst, None).await.unwrap();
        assert_eq!(
            connect(&dst, None).await.unwrap_err(),
            Refused(reason::BULKHEAD_FULL)
        );
        drop(first);
        assert!(
            connect(&dst, None).await.is_ok(),
            "the slot is free once the connection closes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_close_passes_through_and_the_other_way_keeps_flowing() {
        let (mut client, client_side) = tokio::io::duplex(1024);
        let (server_side, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(client_side, server_side, Duration::from_secs(60)));
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "the server sees the client's FIN");
        server.write_all(b"late reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"late reply");
        let done = relay.await.unwrap().unwrap();
        assert_eq!(done.end, RelayEnd::Closed);
        assert_eq!((done.sent, done.received), (7, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_and_activity_postpones_it() {
        let (mut client, client_side) = tokio::io::duplex(1024);
        let (server_side, mut server) = tokio::io::duplex(1024);
        let start = Instant::now();
        let relay = tokio::spawn(relay(client_side, server_side, Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(6)).await;
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        let done = relay.await.unwrap().unwrap();
        assert_eq!(done.end, RelayEnd::Idle);
        assert_eq!((done.sent, done.received), (4, 0));
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(16),
            "10 s after the last byte"
        );
    }
}
