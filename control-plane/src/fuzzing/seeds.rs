//! Writes the seed inputs of every fuzz target into `fuzz/corpus/<target>/seed-*`: real
//! inputs, made the way the mesh makes them. The config targets get what the control
//! plane sends for the examples (and for variants of their routes and shard topology);
//! the connection targets get real request heads, and the bytes a real HTTP/2 client
//! writes. Run by `hack/fuzz.sh --seed`; the fuzzer and its replays only read them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulwark_proto::v1 as proto;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::io::AsyncReadExt;

use crate::discovery::view::{AgentView, ViewCache};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::source::dir::DirSource;
use crate::testing::with_document;

/// The shard topology of `examples/sharded/orders.yaml` with its key and strategy
/// replaced, so that every kind of key and strategy is seeded.
const SHARD_VARIANTS: [(&str, &str); 4] = [
    (
        "path-segment-hash",
        "  key: {type: Path, segment: 1}\n  strategy: {type: Hash}\n",
    ),
    (
        "path-pattern-directory",
        "  key: {type: Path, pattern: '^/tenants/(?P<key>[^/]+)'}\n  \
         missingKey: {action: DefaultShard, shard: b}\n  \
         strategy: {type: Directory, directory: {entries: {acme: a}, defaultShard: b}}\n",
    ),
    (
        "query-consistent-hash",
        "  key: {type: Query, name: tenant}\n  strategy: {type: ConsistentHash, virtualNodes: 16}\n",
    ),
    (
        "grpc-metadata-hash",
        "  key: {type: GrpcMetadata, name: x-customer}\n  strategy: {type: Hash}\n",
    ),
];

/// Routes beside the canary's: regular expressions, exact paths, methods, a header
/// modifier, and a GRPCRoute.
const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: checkout-rules, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: checkout-v1, port: 80}]
  rules:
    - matches:
        - path: {type: RegularExpression, value: "/api/v[0-9]+/.*"}
          headers:
            - {type: RegularExpression, name: x-user, value: "(alice|bob)"}
            - {name: x-tier, value: gold}
        - path: {type: Exact, value: /health}
          method: GET
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-route, value: regex}]
            add: [{name: x-added, value: "1"}]
            remove: [x-remove-me]
      backendRefs:
        - {name: checkout-v2, port: 80, weight: 3}
        - {name: checkout-v1, port: 80, weight: 1}
---
apiVersion: v1
kind: Service
metadata: {name: greeter, namespace: shop}
spec:
  selector: {app: greeter}
  ports: [{name: grpc, port: 50051, appProtocol: grpc}]
---
apiVersion: v1
kind: Service
metadata: {name: greeter-v2, namespace: shop}
spec:
  selector: {app: greeter, version: v2}
  ports: [{name: grpc, port: 50051, appProtocol: grpc}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter-canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter, port: 50051}]
  rules:
    - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
      backendRefs: [{name: greeter-v2, port: 50051}]
    - backendRefs: [{name: greeter, port: 50051}]
"#;

/// Request heads the route and shard seeds pair with a port.
const HEADS: [&str; 6] = [
    "GET / HTTP/1.1\r\nHost: checkout\r\n\r\n",
    "GET /checkout HTTP/1.1\r\nHost: checkout.shop\r\nx-canary: true\r\n\r\n",
    "POST /checkout/pay HTTP/1.1\r\nHost: checkout\r\nContent-Length: 0\r\n\r\n",
    "GET /api/v2/items?tenant=acme HTTP/1.1\r\nHost: checkout-v1\r\nx-user: alice\r\nx-tier: gold\r\nx-remove-me: 1\r\n\r\n",
    "POST /tenants/acme/orders?tenant=acme HTTP/1.1\r\nHost: orders\r\nx-customer: zed\r\nx-session: s1\r\nContent-Length: 0\r\n\r\n",
    "POST /helloworld.Greeter/SayHello HTTP/1.1\r\nHost: greeter:50051\r\ncontent-type: application/grpc\r\nte: trailers\r\nx-customer: alice\r\nx-bulwark-consistency: strong\r\n\r\n",
];

/// What a client's first bytes may be: HTTP/1 heads, HTTP/2's preface, and the
/// protocols a transparent listener must leave opaque.
const FIRST_BYTES: [(&str, &[u8]); 10] = [
    ("get", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("options", b"OPTIONS * HTTP/1.1\r\n"),
    ("post-split", b"PO"),
    (
        "preface",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ),
    ("preface-partial", b"PRI * HTTP/2"),
    (
        "tls-client-hello",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ),
    ("redis", b"*1\r\n$4\r\nPING\r\n"),
    ("ssh", b"SSH-2.0-OpenSSH_9.6\r\n"),
    ("lower-case", b"get / HTTP/1.1\r\n"),
    (
        "proxy-protocol",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 40000 80\r\n",
    ),
];

/// Client connections of the outbound listener used as a proxy: every request of the
/// mesh's `echo.fuzz` service, and what a hostile client sends.
const CONNECTIONS: [(&str, &str); 14] = [
    ("get", "GET / HTTP/1.1\r\nHost: echo\r\n\r\n"),
    (
        "absolute-form",
        "GET http://echo.fuzz/split/a HTTP/1.1\r\nHost: echo.fuzz\r\n\r\n",
    ),
    (
        "post-length",
        "POST /items HTTP/1.1\r\nHost: echo.fuzz.svc.cluster.local\r\nContent-Length: 5\r\n\r\nhello",
    ),
    (
        "post-chunked",
        "POST /upload HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n",
    ),
    (
        "cl-te",
        "POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "bad-chunk",
        "POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    ),
    (
        "short-body",
        "PUT / HTTP/1.1\r\nHost: echo\r\nContent-Length: 100\r\n\r\nshort",
    ),
    (
        "connect-mesh",
        "CONNECT echo.fuzz:80 HTTP/1.1\r\nHost: echo.fuzz:80\r\n\r\nGET / HTTP/1.1\r\nHost: echo\r\n\r\n",
    ),
    (
        "connect-own",
        "CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n",
    ),
    (
        "pipelined",
        "GET /a HTTP/1.1\r\nHost: echo\r\n\r\nHEAD /b HTTP/1.1\r\nHost: echo\r\n\r\nGET /c HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n",
    ),
    (
        "expect-continue",
        "POST / HTTP/1.1\r\nHost: echo\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
    ),
    ("http10", "GET / HTTP/1.0\r\nHost: echo:80\r\n\r\n"),
    (
        "grpc-over-http1",
        "POST /helloworld.Greeter/SayHello HTTP/1.1\r\nHost: nowhere\r\ncontent-type: application/grpc\r\n\r\n",
    ),
    ("bad-host", "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n"),
];

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, data: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), data).unwrap();
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The model of the example folders `dirs` (relative to `examples/`).
fn load(dirs: &[&str]) -> Model {
    let outcome = DirSource::open_all(dirs.iter().map(|d| examples().join(d)))
        .unwrap()
        .load()
        .unwrap();
    assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
    outcome.model
}

/// The snapshots the control plane sends for `model`: to each distinct pod (namespace
/// and labels, three at most) at the current protocol, and to the first at the oldest.
fn snapshots(model: &Model) -> Vec<proto::Snapshot> {
    let index = Index::new(1, model, Arc::new(Metrics::new()));
    let state = index.state();
    let cache = Arc::new(ViewCache::new());
    let mut agents: Vec<(String, BTreeMap<String, String>)> = model
        .pods
        .values()
        .map(|p| (p.name.namespace.clone(), p.labels.clone()))
        .collect();
    agents.dedup();
    agents.truncate(3);
    if agents.is_empty() {
        // A mesh without pods (endpoints only): an agent of the examples' namespace.
        agents.push(("shop".to_owned(), BTreeMap::new()));
    }
    let oldest = agents.first().cloned().map(|a| (a, super::OLDEST_PROTOCOL));
    agents
        .into_iter()
        .map(|a| (a, bulwark_proto::PROTOCOL_VERSION))
        .chain(oldest)
        .filter_map(|((namespace, labels), protocol)| {
            AgentView::new(namespace, labels, Arc::clone(&cache))
                .with_protocol(protocol)
                .update(&state)
                .map(|s| s.to_snapshot())
        })
        .collect()
}

/// The example's shard topology with another key and strategy.
fn shard_variant(block: &str) -> String {
    let text = std::fs::read_to_string(examples().join("sharded/orders.yaml")).unwrap();
    let start = text.find("\n  key:\n").unwrap() + 1;
    let end = text.find("\n  shards:\n").unwrap() + 1;
    format!("{}{block}{}", &text[..start], &text[end..])
}

/// The bytes a real HTTP/2 client (hyper's) writes for one request on a new connection.
async fn h2_client_bytes(request: http::Request<Empty<Bytes>>) -> Vec<u8> {
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
    tokio::spawn(conn);
    tokio::spawn(async move { sender.send_request(request).await });
    let mut written = Vec::new();
    let mut buf = [0u8; 4096];
    // The client writes its preface, SETTINGS, and the request at once; it then waits
    // for the server, which never answers.
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(200), server.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        written.extend_from_slice(&buf[..n]);
    }
    written
}

#[tokio::test]
#[ignore = "writes fuzz/corpus/*/seed-*: run by `hack/fuzz.sh --seed`"]
async fn write_seed_corpora() {
    let base = ["", "local"];
    let mut models = vec![
        ("examples", load(&base)),
        ("canary", load(&["", "local", "canary", "canary/local"])),
        ("sharded", load(&["", "local", "sharded", "sharded/local"])),
    ];
    let routes = with_document(load(&["", "local", "canary", "canary/local"]), ROUTES);
    models.push(("routes", routes));
    for (name, block) in SHARD_VARIANTS {
        let model = with_document(load(&["", "local", "sharded/local"]), &shard_variant(block));
        models.push((name, model));
    }

    let mut written = std::collections::HashSet::new();
    for (name, model) in &models {
        for (i, snapshot) in snapshots(model).iter().enumerate() {
            let encoded = snapshot.encode_to_vec();
            if (*name == "examples" || *name == "routes" || i == 0)
                && written.insert(encoded.clone())
            {
                write("config_snapshot", &format!("{name}-{i}"), &encoded);
            }
            if i > 0 {
                continue;
            }
            for port in snapshot.services.iter().flat_map(|s| &s.ports) {
                let (target, heads) = if port.shard_topology.is_some() {
                    ("shard_key", &HEADS[3..])
                } else if !port.routes.is_empty() {
                    ("route_match", &HEADS[..])
                } else {
                    continue;
                };
                for (h, head) in heads.iter().enumerate() {
                    let mut data = head.as_bytes().to_vec();
                    data.extend(port.encode_to_vec());
                    write(target, &format!("{name}-{}-{h}", port.port), &data);
                }
            }
        }
    }

    let mut yaml: Vec<(String, String)> = Vec::new();
    for dir in [
        "",
        "local",
        "canary",
        "canary/local",
        "sharded",
        "sharded/local",
    ] {
        for entry in std::fs::read_dir(examples().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let name = path.strip_prefix(examples()).unwrap().display().to_string();
                yaml.push((
                    name.replace('/', "-"),
                    std::fs::read_to_string(&path).unwrap(),
                ));
            }
        }
    }
    yaml.push(("routes".into(), ROUTES.into()));
    for (name, block) in SHARD_VARIANTS {
        yaml.push((format!("shard-{name}"), shard_variant(block)));
    }
    // What YAML allows beyond the examples: a byte-order mark, CRLF, anchors and merge
    // keys, flow style, and a document that is not an object.
    yaml.push((
        "anchors".into(),
        "\u{feff}base: &b {apiVersion: v1, kind: Service}\r\n---\r\n<<: *b\r\nmetadata: {name: a, namespace: n}\r\nspec: {ports: [{port: 80}]}\r\n---\r\n- just\r\n- a list\r\n".into(),
    ));
    for (name, text) in yaml {
        write("yaml_documents", &name, text.as_bytes());
    }

    for (name, data) in FIRST_BYTES {
        write("protocol_detect", name, data);
    }
    for (name, text) in CONNECTIONS {
        write("http1_head", name, text.as_bytes());
    }
    let get = http::Request::get("http://echo.fuzz/")
        .body(Empty::new())
        .unwrap();
    write("http1_head", "h2-get", &h2_client_bytes(get).await);
    let grpc = http::Request::post("http://echo.fuzz/helloworld.Greeter/SayHello")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Empty::new())
        .unwrap();
    write("http1_head", "h2-grpc", &h2_client_bytes(grpc).await);
}
