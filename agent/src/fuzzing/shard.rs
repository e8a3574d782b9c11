//! The `shard_key` target: a request head, then a protobuf `ServicePort` whose shard
//! topology (with the port's endpoints and load balancer) places the request. The key
//! source is validated and applied on its own first, so that a topology the config would
//! refuse for another reason still tests the key; then the port is built as the config
//! builds it and the request is placed, twice, as the outbound path places it.

use std::net::SocketAddr;

use bulwark_proto::v1;
use prost::Message;

use super::{metrics, split_request};
use crate::config::destination::Destination;
use crate::policy::shard::key::KeySource;

/// The port's name, as the config would call it.
const DST: &str = "shard.fuzz:80";

/// Extracts the shard key of the input's request and places the request; panics when a
/// key is empty or not taken from the request.
pub fn shard_key(data: &[u8]) {
    let (parts, rest) = split_request(data);
    let Ok(port) = v1::ServicePort::decode(rest) else {
        return;
    };
    let kind = port
        .shard_topology
        .as_ref()
        .and_then(|t| t.key.as_ref())
        .and_then(|k| k.kind.as_ref());
    if let Some(kind) = kind
        && let Ok(source) = KeySource::try_from(kind)
    {
        let _ = source.to_json();
        if let Some(parts) = &parts
            && let Some(key) = source.extract(parts)
        {
            assert!(!key.is_empty(), "an empty key counts as missing");
            assert!(
                taken_from(key.as_bytes(), parts),
                "the key {key:?} is not in the request"
            );
        }
    }

    let (_, metrics) = metrics();
    let Ok(dst) = Destination::build(DST, &port, None, &metrics) else {
        return;
    };
    let (Some(router), Some(parts)) = (&dst.shards, &parts) else {
        return;
    };
    let _ = router.to_json();
    let client = Some(SocketAddr::from(([10, 0, 0, 1], 40_000)));
    let affinity = dst
        .policy
        .hash_on
        .as_ref()
        .and_then(|h| h.key(&parts.headers, client.map(|c| c.ip())));
    // Twice: a write recorded for read-your-writes is looked up by the second placing.
    for _ in 0..2 {
        if let Ok(route) = router.route(parts, client)
            && let Ok((_picked, role)) = route.pick(&[], affinity)
        {
            route.record(role, false);
        }
    }
}

/// Whether `key` is part of the request's target or one of its header values.
fn taken_from(key: &[u8], parts: &http::request::Parts) -> bool {
    let within = |hay: &[u8]| hay.windows(key.len()).any(|w| w == key);
    within(parts.uri.to_string().as_bytes()) || parts.headers.values().any(|v| within(v.as_bytes()))
}
