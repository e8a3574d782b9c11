use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::*;

/// A one-shot HTTP/1.1 server that records the request head it receives and answers 200.
async fn recording_server() -> (SocketAddr, oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (head_tx, head_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "client closed before finishing its head");
            head.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-bulwark-reason: none\r\n\r\nok")
            .await
            .unwrap();
        let _ = head_tx.send(String::from_utf8(head).unwrap());
    });
    (addr, head_rx)
}

#[tokio::test]
async fn proxy_requests_are_in_absolute_form() {
    let (addr, head) = recording_server().await;
    let response = proxy_get(
        addr,
        "http://reviews.demo/x?y=1",
        &[("x-tenant-id", "acme")],
    )
    .await
    .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.text(), "ok");
    assert_eq!(response.reason(), Some("none"));
    let head = head.await.unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("get http://reviews.demo/x?y=1 http/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nhost: reviews.demo\r\n"), "{head}");
    assert!(head.contains("\r\nx-tenant-id: acme\r\n"), "{head}");
}

#[tokio::test]
async fn direct_requests_are_in_origin_form_with_host() {
    let (addr, head) = recording_server().await;
    get(addr, "/items", &[]).await.unwrap();
    let head = head.await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get /items http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("\r\nhost: {addr}\r\n")), "{head}");

    // A Host header given by the test wins: that is how origin-form requests name a service.
    let (addr, head) = recording_server().await;
    get(addr, "/", &[("host", "reviews.demo")]).await.unwrap();
    let head = head.await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get / http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nhost: reviews.demo\r\n"), "{head}");
    assert_eq!(head.matches("host:").count(), 1, "{head}");
}

#[tokio::test]
async fn proxy_requests_need_an_absolute_url() {
    let err = proxy_get("127.0.0.1:9".parse().unwrap(), "/relative", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NotAbsolute { .. }), "{err}");
    let err = get("127.0.0.1:9".parse().unwrap(), "/", &[("bad header", "x")])
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidHeader { .. }), "{err}");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let (_stream, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let client = HttpClient::direct(addr).with_timeout(Duration::from_millis(100));
    let err = client.get("/", &[]).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn refused_connections_are_request_errors() {
    // Bind then drop to find a port nobody listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = get(addr, "/", &[]).await.unwrap_err();
    assert!(matches!(err, ClientError::Request { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
