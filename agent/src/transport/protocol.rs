//! Which protocol a redirected connection speaks: from the port's declared
//! protocol when there is one, else by reading the client's first bytes.
//!
//! Detection never stalls a server-speaks-first protocol (MySQL, SMTP, Redis
//! replies): when the client sends nothing within the detection timeout the
//! connection is opaque TCP. Ports declared opaque skip detection entirely.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// The HTTP/2 connection preface a prior-knowledge client sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods that start an HTTP/1.x request, with their trailing space.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Enough bytes to decide: the longer of the HTTP/2 preface and the longest method.
const DETECT_BYTES: usize = 64;

/// The protocol a connection is served with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    Http2,
    /// Anything else: bytes relayed as they come.
    Opaque,
}

/// What a port is declared to speak (a Service port's `appProtocol`, or `--opaque-ports`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Hint {
    /// Nothing declared: detect.
    #[default]
    Detect,
    /// `http`: HTTP/1.x (an HTTP/2 preface is still recognised).
    Http,
    /// `http2`, `grpc`, `kubernetes.io/h2c`: HTTP/2 prior knowledge.
    Http2,
    /// `tcp`, `opaque`, or a port in `--opaque-ports`: never detected, relayed as bytes.
    Opaque,
}

impl Hint {
    /// Reads a Service port's `appProtocol`. Values Bulwark does not know
    /// (e.g. `kubernetes.io/ws`, `mysql`) mean detect.
    pub fn from_app_protocol(app_protocol: &str) -> Hint {
        match app_protocol.to_ascii_lowercase().as_str() {
            "http" | "http1" | "http/1.1" => Hint::Http,
            "http2" | "h2c" | "grpc" | "kubernetes.io/h2c" => Hint::Http2,
            "tcp" | "opaque" => Hint::Opaque,
            _ => Hint::Detect,
        }
    }

    /// Whether the client's first bytes must be read to choose the protocol.
    pub fn needs_detection(self) -> bool {
        !matches!(self, Hint::Opaque)
    }
}

/// What the bytes read so far say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The protocol is known.
    Known(Protocol),
    /// The bytes so far are the start of an HTTP request; read more.
    NeedMore,
}

/// Classifies the first bytes a client sent.
pub fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf.starts_with(H2_PREFACE) {
        return Verdict::Known(Protocol::Http2);
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Verdict::Known(Protocol::Http1);
    }
    let prefix_of = |known: &[u8]| buf.len() < known.len() && known.starts_with(buf);
    if prefix_of(H2_PREFACE) || METHODS.iter().any(|m| prefix_of(m)) {
        return Verdict::NeedMore;
    }
    Verdict::Known(Protocol::Opaque)
}

/// Reads from `io` until its first bytes say which protocol it speaks, or until
/// `timeout` passes (then: opaque, e.g. a server-speaks-first protocol). Returns
/// the protocol and the bytes read, which the caller must replay.
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let deadline = Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(DETECT_BYTES);
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            // The client said nothing in time: it waits for the server to speak.
            Err(_) => return Ok((Protocol::Opaque, buf.freeze())),
            // The client closed its side: relay what there is as opaque bytes.
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
        match classify(&buf) {
            Verdict::Known(protocol) => return Ok((protocol, buf.freeze())),
            Verdict::NeedMore if buf.len() >= DETECT_BYTES => {
                return Ok((Protocol::Opaque, buf.freeze()));
            }
            Verdict::NeedMore => buf.reserve(DETECT_BYTES),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n"),
            Verdict::Known(Protocol::Http1)
        );
        assert_eq!(
            classify(b"OPTIONS * HTTP/1.1"),
            Verdict::Known(Protocol::Http1)
        );
        assert_eq!(classify(H2_PREFACE), Verdict::Known(Protocol::Http2));
        assert_eq!(classify(b"PRI * HT"), Verdict::NeedMore);
        assert_eq!(classify(b"PO"), Verdict::NeedMore);
        assert_eq!(classify(b"P"), Verdict::NeedMore);
        assert_eq!(classify(b""), Verdict::NeedMore);
        // A Redis command, a TLS ClientHello, a lower-case method.
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n"),
            Verdict::Known(Protocol::Opaque)
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01]),
            Verdict::Known(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Verdict::Known(Protocol::Opaque)
        );
        assert_eq!(classify(b"GETX"), Verdict::Known(Protocol::Opaque));
    }

    #[test]
    fn reads_app_protocol_hints() {
        assert_eq!(Hint::from_app_protocol("http"), Hint::Http);
        assert_eq!(Hint::from_app_protocol("grpc"), Hint::Http2);
        assert_eq!(Hint::from_app_protocol("kubernetes.io/h2c"), Hint::Http2);
        assert_eq!(Hint::from_app_protocol("TCP"), Hint::Opaque);
        assert_eq!(Hint::from_app_protocol(""), Hint::Detect);
        assert_eq!(Hint::from_app_protocol("kubernetes.io/ws"), Hint::Detect);
        assert!(!Hint::Opaque.needs_detection());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let start = Instant::now();
        let (protocol, read) = detect(&mut server, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert!(read.is_empty());
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        client.write_all(b"x").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_preface_in_pieces_is_http2() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(&H2_PREFACE[..5]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(&H2_PREFACE[5..]).await.unwrap();
            client.write_all(b"\0\0\0\x04").await.unwrap();
            client
        });
        let (protocol, read) = detect(&mut server, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Http2);
        assert!(
            read.starts_with(H2_PREFACE),
            "every byte read is kept for replay"
        );
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_method_that_stalls_is_opaque_with_its_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PO").await.unwrap();
        let (protocol, read) = detect(&mut server, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert_eq!(&read[..], b"PO");
    }
}
