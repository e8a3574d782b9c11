//! The `protocol_detect` target: a redirected client's first bytes, classified at once
//! and read from a connection in pieces as the transparent listeners read them.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;

use super::runtime;
use crate::transport::protocol::{Hint, Protocol, Verdict, classify, detect};

/// Longer than any detection could wait: the client always closes, so it never does.
const DETECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The most bytes detection reads before it gives up (the module's `DETECT_BYTES`), and
/// the most prefixes checked: beyond it every verdict must already be final.
const DETECT_BYTES: usize = 64;

/// Classifies `data` and detects its protocol over an in-memory connection; panics when
/// a verdict changes as more bytes come, or when detection loses or invents a byte.
pub fn protocol_detect(data: &[u8]) {
    let verdict = classify(data);
    // Once the bytes so far decide, more bytes must not change the decision: detection
    // stops reading at the first decision.
    if let Some(first) = (0..=data.len().min(DETECT_BYTES + 1))
        .map(|end| classify(&data[..end]))
        .find(|v| matches!(v, Verdict::Known(_)))
    {
        assert_eq!(first, verdict, "a longer prefix changed the verdict");
    }
    let _ = Hint::from_app_protocol(&String::from_utf8_lossy(data));

    // A small, input-dependent pipe splits the bytes at varied places.
    let pipe = 1 + data.len() % 17;
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    let (protocol, read) = RUNTIME
        .get_or_init(runtime)
        .block_on(async {
            let (mut client, mut server) = tokio::io::duplex(pipe);
            let write = async move {
                // Detection may stop reading early: the write then fails, as a socket's would.
                let _ = client.write_all(data).await;
                let _ = client.shutdown().await;
            };
            let read = async move {
                let found = detect(&mut server, DETECT_TIMEOUT).await;
                drop(server);
                found
            };
            tokio::join!(write, read).1
        })
        .unwrap_or_else(|e| panic!("an in-memory connection failed: {e}"));

    assert!(
        data.starts_with(&read),
        "the bytes kept for replay are not what the client sent"
    );
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            assert_eq!(classify(&read), Verdict::Known(protocol));
        }
        // Opaque: the bytes say so, or the client stopped, or detection gave up.
        Protocol::Opaque => assert!(
            classify(&read) == Verdict::Known(Protocol::Opaque)
                || read.len() == data.len()
                || read.len() >= DETECT_BYTES,
            "opaque before the bytes decided"
        ),
    }
}
