//! The `route_match` target: a request head, then a protobuf `ServicePort` whose
//! HTTPRoute rules are built as the config builds them (and again on top of themselves,
//! as a config push does) and take the request as the outbound path's route step does.

use bulwark_proto::v1;
use prost::Message;

use super::{metrics, split_request};
use crate::policy::route::RouteTable;

/// The port's name, as the config would call it.
const DST: &str = "route.fuzz:80";

/// Builds the input's rules and routes its request; panics when rules that built once
/// do not build again on top of themselves.
pub fn route_match(data: &[u8]) {
    let (parts, rest) = split_request(data);
    let Ok(port) = v1::ServicePort::decode(rest) else {
        return;
    };
    let (_, metrics) = metrics();
    let Ok(first) = RouteTable::build(&port.routes, DST, None, &metrics) else {
        return;
    };
    let table = RouteTable::build(&port.routes, DST, Some(&first), &metrics)
        .unwrap_or_else(|e| panic!("rules that built once fail on top of themselves: {e}"));
    let _ = table.to_json(|_| true);
    let Some(mut parts) = parts else {
        return;
    };
    let Some(rule) = table.select(&parts.method, parts.uri.path(), &parts.headers) else {
        return;
    };
    rule.modify(&mut parts.headers);
    if let Some(backend) = rule.pick() {
        backend.count();
    }
}
