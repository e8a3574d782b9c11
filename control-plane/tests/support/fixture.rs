//! What the control plane's integration tests share: a control plane on a
//! private copy of `examples/`, an admin HTTP client, and a polling wait.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_control_plane::{ControlPlane, Settings, Source};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// Polls `check` every 20ms until it holds, failing the test after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A control plane on a private copy of `examples/` and its loopback endpoints
/// (`examples/local/`), in one folder.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub cp: ControlPlane,
}

impl Fixture {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for folder in [examples.clone(), examples.join("local")] {
            for entry in std::fs::read_dir(folder).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
                }
            }
        }
        let cp = ControlPlane::start(Settings {
            source: Source::Dir(vec![dir.path().to_owned()]),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            debounce: Duration::from_millis(50),
            identity: None,
        })
        .await
        .unwrap();
        Fixture { dir, cp }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path(file)).unwrap()
    }

    /// Replaces a file the way editors do: write a hidden temporary file, rename it over.
    pub fn write(&self, file: &str, text: &str) {
        let tmp = self.path(&format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path(file)).unwrap();
    }

    pub async fn admin(&self, path: &str) -> (u16, String) {
        http_get(self.cp.admin_addr(), path).await
    }

    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.admin(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Replaces `from` with `to` in a file, the way editors write.
    pub fn replace(&self, file: &str, from: &str, to: &str) {
        let text = self.read(file);
        assert!(text.contains(from), "{file} has no {from:?}");
        self.write(file, &text.replace(from, to));
    }
}

/// GETs `path` from an HTTP/1.1 server; returns the status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}
