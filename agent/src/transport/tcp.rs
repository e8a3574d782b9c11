//! Opaque TCP: bytes relayed both ways, each half-close passed on, with an idle
//! timeout for every connection. The connection policy of mesh destinations
//! (limits, balancing, breakers) is applied before, by `proxy::outbound::opaque`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

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
