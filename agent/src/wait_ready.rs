//! `bulwark-agent wait-ready`: blocks until the agent's admin `/ready` answers 200.
//!
//! Injected pods on clusters without native sidecars run it as the agent container's
//! `postStart` hook: Kubernetes starts the next container only once the hook returns, so
//! the app starts after the agent is ready.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long to wait between two checks.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent did not become ready in time.
#[derive(Debug, thiserror::Error)]
#[error("the agent at {addr} was not ready after {timeout:?}: {last}")]
pub struct NotReady {
    /// The admin address polled.
    pub addr: SocketAddr,
    /// How long it waited.
    pub timeout: Duration,
    /// What the last check saw.
    pub last: String,
}

/// One `GET /ready`; `Ok(())` on 200, otherwise what was seen.
async fn check(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let request = format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream
            .read(&mut head[read..])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let status_line = String::from_utf8_lossy(&head[..read]);
    let status = status_line.split_whitespace().nth(1).unwrap_or("none");
    if status == "200" {
        Ok(())
    } else {
        Err(format!("/ready answered {status}"))
    }
}

/// Polls `http://addr/ready` until it answers 200 or `timeout` passes.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<(), NotReady> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match tokio::time::timeout(CHECK_TIMEOUT, check(addr)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(seen)) => seen,
            Err(_) => "the check timed out".to_owned(),
        };
        if tokio::time::Instant::now() + POLL_INTERVAL > deadline {
            return Err(NotReady {
                addr,
                timeout,
                last,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// An admin stand-in answering 503 `not_ready` times, then 200.
    async fn admin(not_ready: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = conn.read(&mut buf).await;
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let status = if n < not_ready {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = conn
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn returns_once_the_agent_answers_ready() {
        let addr = admin(3).await;
        wait_ready(addr, Duration::from_secs(60)).await.unwrap();
    }

    #[tokio::test]
    async fn gives_up_with_what_it_saw() {
        let addr = admin(usize::MAX).await;
        let error = wait_ready(addr, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("/ready answered 503"), "{error}");
    }
}
