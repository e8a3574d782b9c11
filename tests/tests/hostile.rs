//! Limits against hostile clients, end to end on loopback with real sockets: slow
//! heads and idle connections closed, connections over a listener's limit refused,
//! request smuggling and broken bodies answered 400 without blaming the endpoint,
//! CONNECT and absolute-form kept off the agent's own listeners, and HTTP/2 stream
//! limits and rapid resets. Timeouts here are short settings; the tests assert that
//! connections close, never how fast.

use std::net::SocketAddr;
use std::time::Duration;

use bulwark_agent::{Agent, Settings};
use bulwark_control_plane::ControlPlane;
use bulwark_tests::client::HttpClient;
use bulwark_tests::harness::{
    CONFIG_DEADLINE, agent_settings, control_plane_settings, loopback, resilience_policy,
};
use bulwark_tests::mesh::Mesh;
use bulwark_tests::upstream::{Knobs, Upstream};
use bulwark_tests::{Metrics, eventually_named, poll_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for the agent to close a connection it should close.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);
/// A timeout short enough for a test, long enough for a loaded machine.
const SHORT: Duration = Duration::from_millis(300);

/// A control plane over `mesh` and an agent for `app` (inbound to `app_port`), its
/// settings tuned by `tune`; returns when the agent has its config.
async fn start(
    mesh: &Mesh,
    app_port: Option<u16>,
    tune: impl FnOnce(&mut Settings),
) -> (ControlPlane, Agent) {
    let cp = ControlPlane::start(control_plane_settings(mesh, loopback()))
        .await
        .expect("control plane starts");
    let mut settings = agent_settings(cp.grpc_addr(), "client", app_port);
    tune(&mut settings);
    let agent = Agent::start(settings).await.expect("agent starts");
    let admin = HttpClient::direct(agent.admin_addr());
    poll_until(CONFIG_DEADLINE, "the agent is ready", || {
        let admin = admin.clone();
        async move {
            admin
                .get("/ready", &[])
                .await
                .ok()
                .filter(|r| r.status == 200)
        }
    })
    .await
    .expect("agent ready");
    (cp, agent)
}

async fn metrics(agent: &Agent) -> Metrics {
    Metrics::scrape(agent.admin_addr())
        .await
        .expect("agent metrics")
}

/// Waits until the agent closes `stream` (EOF or reset), reading and discarding.
async fn closed_by_agent(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(CLOSE_DEADLINE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// One HTTP/1.1 response read off `stream`: its status line and headers (lower-case)
/// and its body, by Content-Length.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout(CLOSE_DEADLINE, stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = data[head_end..].to_vec();
    while body.len() < length {
        let n = tokio::time::timeout(CLOSE_DEADLINE, stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some((status, head, body))
}

async fn get_on(stream: &mut TcpStream, target: &str) -> Option<u16> {
    stream
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
        .await
        .ok()?;
    read_response(stream).await.map(|(status, _, _)| status)
}

async fn app() -> Upstream {
    Upstream::start(loopback(), "app", Knobs::healthy())
        .await
        .expect("upstream starts")
}

#[tokio::test]
async fn slow_request_heads_are_closed_after_the_header_timeout() {
    let app = app().await;
    let mesh = Mesh::new().unwrap();
    let (_cp, agent) = start(&mesh, Some(app.addr().port()), |s| {
        s.limits.header_read_timeout = Some(SHORT);
    })
    .await;
    let inbound = agent.inbound_addrs()[0];
    const SLOW: usize = 20;
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut stream = TcpStream::connect(inbound).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        slow.push(stream);
    }
    // A header line every 100 ms, forever, until the agent closes the connection.
    let trickles = slow.into_iter().map(|mut stream| {
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..100 {
                match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await
                {
                    Ok(Ok(0) | Err(_)) => return true,
                    Ok(Ok(_)) => return false,
                    Err(_) => {}
                }
                if stream.write_all(b"x-slow: 1\r\n").await.is_err() {
                    return true;
                }
            }
            false
        })
    });
    for trickle in trickles {
        assert!(
            trickle.await.unwrap(),
            "the agent closes a connection whose head never ends, without answering"
        );
    }
    // A client that sends its head at once is served.
    let mut quick = TcpStream::connect(inbound).await.unwrap();
    assert_eq!(get_on(&mut quick, "/").await, Some(200));
    let m = metrics(&agent).await;
    assert_eq!(
        m.get(
            "bulwark_connections_closed_total",
            &[("listener", "inbound"), ("reason", "header-timeout")]
        ),
        SLOW as f64
    );
    assert_eq!(
        m.get(
            "bulwark_connections_closed_total",
            &[("listener", "inbound"), ("reason", "idle-timeout")]
        ),
        0.0
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = app().await;
    let mesh = Mesh::new().unwrap();
    let (_cp, agent) = start(&mesh, Some(app.addr().port()), |s| {
        s.limits.idle_timeout = Some(SHORT);
    })
    .await;
    let inbound = agent.inbound_addrs()[0];
    // Requests closer together than the idle timeout keep the connection.
    let mut busy = TcpStream::connect(inbound).await.unwrap();
    for _ in 0..6 {
        assert_eq!(get_on(&mut busy, "/").await, Some(200));
        tokio::time::sleep(SHORT / 3).await;
    }
    // Then silence: the agent closes it.
    assert!(closed_by_agent(&mut busy).await, "idle connection closed");
    let m = metrics(&agent).await;
    assert_eq!(
        m.get(
            "bulwark_connections_closed_total",
            &[("listener", "inbound"), ("reason", "idle-timeout")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "bulwark_connections_closed_total",
            &[("listener", "inbound"), ("reason", "header-timeout")]
        ),
        0.0
    );
}

#[tokio::test]
async fn connections_over_the_listeners_limit_are_refused_and_counted() {
    let app = app().await;
    let mesh = Mesh::new().unwrap();
    let (_cp, agent) = start(&mesh, Some(app.addr().port()), |s| {
        s.limits.max_connections = Some(3);
    })
    .await;
    let inbound = agent.inbound_addrs()[0];
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(inbound).await.unwrap();
        assert_eq!(get_on(&mut stream, "/").await, Some(200));
        held.push(stream);
    }
    for _ in 0..2 {
        let mut over = TcpStream::connect(inbound).await.unwrap();
        let _ = over.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
        assert!(
            read_response(&mut over).await.is_none(),
            "closed without an answer"
        );
    }
    // The connections under the limit keep working.
    for stream in &mut held {
        assert_eq!(get_on(stream, "/").await, Some(200));
    }
    let m = metrics(&agent).await;
    assert_eq!(
        m.get(
            "bulwark_connections_refused_total",
            &[("listener", "inbound")]
        ),
        2.0
    );
    assert_eq!(
        m.get("bulwark_connections_open", &[("listener", "inbound")]),
        3.0
    );
    // A place frees when a connection goes.
    drop(held.pop());
    eventually_named(CLOSE_DEADLINE, "a new connection is served", || async {
        let Ok(mut stream) = TcpStream::connect(inbound).await else {
            return false;
        };
        get_on(&mut stream, "/").await == Some(200)
    })
    .await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400_and_closes() {
    let app = app().await;
    let mesh = Mesh::with_services([("app", vec![app.addr()])]).unwrap();
    let (_cp, agent) = start(&mesh, None, |_| {}).await;
    let mut stream = TcpStream::connect(agent.outbound_addr()).await.unwrap();
    stream
        .write_all(
            b"POST http://app.test/ HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n",
        )
        .await
        .unwrap();
    let (status, head, _) = read_response(&mut stream).await.expect("an answer");
    assert_eq!(status, 400);
    assert!(head.contains("x-bulwark-reason: bad-request"), "{head}");
    assert!(
        closed_by_agent(&mut stream).await,
        "nothing after it is read"
    );
    assert_eq!(app.stats().total, 0, "nothing reached the upstream");
    let m = metrics(&agent).await;
    assert_eq!(
        m.get(
            "bulwark_refused_requests_total",
            &[("listener", "outbound"), ("reason", "cl-te")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_malformed_chunked_body_is_400_and_never_an_endpoint_failure() {
    let plain = app().await;
    let retried = Upstream::start(loopback(), "retried", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([
        ("plain", vec![plain.addr()]),
        ("retried", vec![retried.addr()]),
    ])
    .unwrap();
    // One failure would open either breaker.
    let breaker = "  circuitBreaker:\n    consecutiveFailures: 1\n    openDuration: 1m\n    maxOpenDuration: 1m\n";
    mesh.write_policy("plain.yaml", &resilience_policy("plain", "plain", breaker))
        .unwrap();
    let retry = format!(
        "{breaker}  retry:\n    attempts: 3\n    nonIdempotent: true\n    backoff:\n      base: 1ms\n      max: 1ms\n"
    );
    mesh.write_policy(
        "retried.yaml",
        &resilience_policy("retried", "retried", &retry),
    )
    .unwrap();
    let (_cp, agent) = start(&mesh, None, |_| {}).await;
    let client = HttpClient::proxy(agent.outbound_addr());
    for service in ["plain", "retried"] {
        let url = format!("http://{service}.test/");
        eventually_named(CONFIG_DEADLINE, "the policy is in force", || async {
            let m = metrics(&agent).await;
            m.samples("bulwark_breaker_state")
                .any(|s| s.label("dst") == Some(&format!("{service}.test:80")))
        })
        .await;
        let mut stream = TcpStream::connect(agent.outbound_addr()).await.unwrap();
        stream
            .write_all(
                format!(
                    "POST {url} HTTP/1.1\r\nHost: {service}.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5\r\nhello\r\nzz-not-a-size\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let (status, head, _) = read_response(&mut stream).await.expect("an answer");
        assert_eq!(status, 400, "{service}");
        assert!(head.contains("x-bulwark-reason: bad-request"), "{head}");
        assert!(
            closed_by_agent(&mut stream).await,
            "{service}: connection closed"
        );
        // The endpoint was not blamed: its breaker is closed and it still serves.
        let rsp = client.get(&url, &[]).await.unwrap();
        assert_eq!(rsp.status, 200, "{service}: the breaker did not open");
        let m = metrics(&agent).await;
        let dst = format!("{service}.test:80");
        assert_eq!(m.get("bulwark_breaker_state", &[("dst", &dst)]), 0.0);
        assert_eq!(m.get("bulwark_breaker_trips_total", &[("dst", &dst)]), 0.0);
        assert_eq!(
            m.get(
                "bulwark_requests_total",
                &[("dst", &dst), ("status_class", "5xx")]
            ),
            0.0
        );
        assert_eq!(m.get("bulwark_retries_total", &[("dst", &dst)]), 0.0);
    }
    let m = metrics(&agent).await;
    assert_eq!(
        m.get(
            "bulwark_refused_requests_total",
            &[("listener", "outbound"), ("reason", "bad-chunked")]
        ),
        2.0
    );
}

/// Sends `CONNECT target` on a new connection to `proxy`; the status, and the
/// connection for a tunnel.
async fn connect(proxy: SocketAddr, target: &str) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.expect("the proxy accepts");
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("CONNECT sent");
    let (status, head, _) = read_response(&mut stream).await.expect("an answer");
    (status, head, stream)
}

#[tokio::test]
async fn connect_and_absolute_form_never_reach_the_agents_own_listeners() {
    let app = app().await;
    let outside = Upstream::start(loopback(), "outside", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("app", vec![app.addr()])]).unwrap();
    let (_cp, agent) = start(&mesh, Some(app.addr().port()), |_| {}).await;
    let proxy = agent.outbound_addr();
    let admin_port = agent.admin_addr().port();
    let inbound_port = agent.inbound_addrs()[0].port();
    for target in [
        format!("127.0.0.1:{admin_port}"),
        format!("localhost:{admin_port}"),
        format!("[::1]:{inbound_port}"),
        format!("127.0.0.1:{inbound_port}"),
    ] {
        let (status, head, _) = connect(proxy, &target).await;
        assert_eq!(status, 403, "CONNECT {target}");
        assert!(head.contains("x-bulwark-reason: connect-denied"), "{head}");
    }
    let client = HttpClient::proxy(proxy);
    let rsp = client
        .get(&format!("http://127.0.0.1:{admin_port}/metrics"), &[])
        .await
        .unwrap();
    assert_eq!(rsp.status, 403);
    assert_eq!(rsp.reason(), Some("absolute-form-denied"));

    // A mesh destination's tunnel goes to one of its endpoints.
    let (status, _, mut tunnel) = connect(proxy, "app.test:80").await;
    assert_eq!(status, 200, "CONNECT to a mesh destination");
    assert_eq!(get_on(&mut tunnel, "/through").await, Some(200));
    assert_eq!(app.stats().total, 1);
    // Outside the mesh: passed through by default.
    let (status, _, _) = connect(proxy, &outside.addr().to_string()).await;
    assert_eq!(status, 200, "CONNECT outside the mesh");
    let rsp = client
        .get(&format!("http://{}/", outside.addr()), &[])
        .await
        .unwrap();
    assert_eq!(rsp.upstream(), Some("outside"));

    let m = metrics(&agent).await;
    assert_eq!(
        m.get(
            "bulwark_refused_requests_total",
            &[("listener", "outbound"), ("reason", "connect-denied")]
        ),
        4.0
    );
    assert_eq!(
        m.get(
            "bulwark_refused_requests_total",
            &[("listener", "outbound"), ("reason", "absolute-form-denied")]
        ),
        1.0
    );
}

#[tokio::test]
async fn without_passthrough_only_mesh_destinations_are_proxied() {
    let app = app().await;
    let outside = Upstream::start(loopback(), "outside", Knobs::healthy())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("app", vec![app.addr()])]).unwrap();
    let (_cp, agent) = start(&mesh, None, |s| s.proxy_passthrough = false).await;
    let proxy = agent.outbound_addr();
    let (status, head, _) = connect(proxy, &outside.addr().to_string()).await;
    assert_eq!(status, 403);
    assert!(head.contains("x-bulwark-reason: connect-denied"), "{head}");
    let client = HttpClient::proxy(proxy);
    let rsp = client
        .get(&format!("http://{}/", outside.addr()), &[])
        .await
        .unwrap();
    assert_eq!(rsp.status, 403);
    assert_eq!(rsp.reason(), Some("absolute-form-denied"));
    assert_eq!(outside.stats().total, 0);
    let rsp = client.get("http://app.test/", &[]).await.unwrap();
    assert_eq!(rsp.status, 200, "a mesh destination");
    let (status, _, _) = connect(proxy, "app.test:80").await;
    assert_eq!(status, 200);
}

// === HTTP/2, frame by frame ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM_HEADERS: u8 = 0x5;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("a small frame")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A HEADERS block for `GET http://app.test/` in HPACK without dynamic state.
fn get_app() -> Vec<u8> {
    // :method GET, :scheme http, :path /, then :authority (indexed name 1) as a literal.
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 8];
    block.extend_from_slice(b"app.test");
    block
}

/// One frame read off `stream`: (type, flags, stream id, payload), or `None` at EOF.
async fn read_frame(stream: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    tokio::time::timeout(CLOSE_DEADLINE, stream.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    tokio::time::timeout(CLOSE_DEADLINE, stream.read_exact(&mut payload))
        .await
        .ok()?
        .ok()?;
    Some((head[3], head[4], id, payload))
}

/// An HTTP/2 connection to `addr` past the SETTINGS exchange.
async fn h2_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("the agent accepts");
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&hello).await.expect("preface sent");
    loop {
        let (kind, flags, _, _) = read_frame(&mut stream)
            .await
            .expect("the server's SETTINGS");
        if kind == SETTINGS && flags & 1 == 0 {
            break;
        }
    }
    stream
        .write_all(&frame(SETTINGS, 1, 0, &[]))
        .await
        .expect("SETTINGS acknowledged");
    stream
}

fn code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

#[tokio::test]
async fn http2_streams_beyond_the_limit_are_refused() {
    let app = Upstream::start(loopback(), "app", Knobs::hanging())
        .await
        .unwrap();
    let mesh = Mesh::with_services([("app", vec![app.addr()])]).unwrap();
    let (_cp, agent) = start(&mesh, None, |s| {
        s.limits.http2_max_concurrent_streams = 2;
    })
    .await;
    let mut stream = h2_connection(agent.outbound_addr()).await;
    let block = get_app();
    let mut burst = Vec::new();
    for id in [1u32, 3, 5, 7] {
        burst.extend(frame(HEADERS, END_STREAM_HEADERS, id, &block));
    }
    stream.write_all(&burst).await.unwrap();
    let mut refused = Vec::new();
    while refused.len() < 2 {
        let (kind, _, id, payload) = read_frame(&mut stream)
            .await
            .expect("RST_STREAM for the streams over the limit");
        if kind == RST_STREAM {
            assert_eq!(code(&payload, 0), REFUSED_STREAM);
            refused.push(id);
        }
    }
    refused.sort_unstable();
    assert_eq!(refused, [5, 7]);
    eventually_named(CLOSE_DEADLINE, "two requests reach the app", || async {
        app.stats().in_flight == 2
    })
    .await;
    assert_eq!(app.stats().max_in_flight, 2);
}

#[tokio::test]
async fn a_rapid_reset_burst_ends_with_goaway() {
    let app = app().await;
    let mesh = Mesh::with_services([("app", vec![app.addr()])]).unwrap();
    let (_cp, agent) = start(&mesh, None, |_| {}).await;
    let mut stream = h2_connection(agent.outbound_addr()).await;
    let block = get_app();
    let mut burst = Vec::new();
    for n in 0..500u32 {
        let id = 2 * n + 1;
        burst.extend(frame(HEADERS, END_STREAM_HEADERS, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    // The agent may close while the burst is still being written.
    let _ = stream.write_all(&burst).await;
    let mut goaway = None;
    for _ in 0..10_000 {
        match read_frame(&mut stream).await {
            Some((GOAWAY, _, _, payload)) => {
                goaway = Some(code(&payload, 4));
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "GOAWAY ENHANCE_YOUR_CALM");
    assert!(closed_by_agent(&mut stream).await, "the connection closes");
    assert!(app.stats().total < 500, "not every reset stream was served");
    let m = metrics(&agent).await;
    assert_eq!(
        m.get(
            "bulwark_http2_goaways_total",
            &[("listener", "outbound"), ("reason", "enhance-your-calm")]
        ),
        1.0
    );
}
