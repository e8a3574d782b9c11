//! The pass-through workload: a few TCP streams writing as fast as they can to the sink,
//! directly, through a proxy's TCP frontend, or through an HTTP `CONNECT` tunnel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How each stream reaches the sink.
#[derive(Clone, Copy, Debug)]
pub enum Route {
    /// Connect to this address and write (the sink itself, or a TCP proxy in front of it).
    Plain(SocketAddr),
    /// Connect to this HTTP proxy and open `CONNECT sink` first.
    Connect {
        /// The proxy.
        proxy: SocketAddr,
        /// The sink.
        sink: SocketAddr,
    },
}

/// Bytes written and the time it took.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// Bytes written by all streams.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl Transfer {
    /// Bytes per second.
    pub fn rate(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

const CHUNK: usize = 64 * 1024;

async fn open(route: Route) -> std::io::Result<TcpStream> {
    match route {
        Route::Plain(addr) => TcpStream::connect(addr).await,
        Route::Connect { proxy, sink } => {
            let mut stream = TcpStream::connect(proxy).await?;
            stream
                .write_all(format!("CONNECT {sink} HTTP/1.1\r\nHost: {sink}\r\n\r\n").as_bytes())
                .await?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await? == 0 || head.len() > 8192 {
                    return Err(std::io::Error::other("the proxy closed during CONNECT"));
                }
                head.push(byte[0]);
            }
            if !head.starts_with(b"HTTP/1.1 200") {
                let line = String::from_utf8_lossy(&head);
                return Err(std::io::Error::other(format!(
                    "CONNECT refused: {}",
                    line.lines().next().unwrap_or_default()
                )));
            }
            Ok(stream)
        }
    }
}

/// Writes through `streams` connections for `duration`.
pub async fn transfer(
    route: Route,
    streams: usize,
    duration: Duration,
) -> std::io::Result<Transfer> {
    let mut opened = Vec::with_capacity(streams);
    for _ in 0..streams {
        opened.push(open(route).await?);
    }
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for mut stream in opened {
        tasks.push(tokio::spawn(async move {
            let chunk = vec![0x5au8; CHUNK];
            let mut bytes = 0u64;
            while Instant::now() < end {
                stream.write_all(&chunk).await?;
                bytes += CHUNK as u64;
            }
            stream.shutdown().await?;
            Ok::<_, std::io::Error>(bytes)
        }));
    }
    let mut bytes = 0;
    for task in tasks {
        bytes += task.await.map_err(std::io::Error::other)??;
    }
    Ok(Transfer {
        bytes,
        elapsed: start.elapsed(),
    })
}
