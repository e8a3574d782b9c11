//! The CEL rules in the committed CRDs and the control plane's own checks agree: each
//! cross-field case is refused by both or by neither. Clusters without CEL get the
//! control plane's verdict in status; clusters with it refuse at admission; both must
//! say the same thing about the same spec.

use std::path::Path;

use bulwark_control_plane::api::{self, Decoded};
use serde_json::Value;

fn spec_schema(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/bulwark/crds")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("the CRD is committed");
    let crd: Value = serde_yaml_ng::from_str(&text).expect("the CRD is YAML");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// Messages of the CEL rules `value` breaks, evaluated as the API server does: each rule
/// on the node that carries it, with `self` bound to that node's value.
fn cel_errors(schema: &Value, value: &Value, out: &mut Vec<String>) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let source = rule["rule"].as_str().expect("a rule");
        let program = cel::Program::compile(source)
            .unwrap_or_else(|e| panic!("the CEL rule {source:?} does not parse: {e}"));
        let mut context = cel::Context::default();
        context.add_variable_from_value("self", cel::to_value(value).expect("a CEL value"));
        match program.execute(&context) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => {
                out.push(rule["message"].as_str().unwrap_or("").to_owned())
            }
            other => panic!("the CEL rule {source:?} does not evaluate on {value}: {other:?}"),
        }
    }
    match value {
        Value::Object(fields) => {
            for (name, field) in fields {
                if let Some(property) = schema["properties"].get(name) {
                    cel_errors(property, field, out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                cel_errors(&schema["items"], item, out);
            }
        }
        _ => {}
    }
}

/// The CRD's bound on consistent-hash virtual nodes is the one the Rust validation
/// (and the agent, which keeps the same number) enforce.
#[test]
fn the_virtual_node_maximum_is_the_same_in_the_crd() {
    let schema = spec_schema("shardtopologies.yaml");
    assert_eq!(
        schema["properties"]["strategy"]["properties"]["virtualNodes"]["maximum"].as_f64(),
        Some(f64::from(api::shard::MAX_VIRTUAL_NODES))
    );
}

fn rust_verdict(kind: &str, spec: &Value) -> Result<(), String> {
    let document = serde_json::json!({
        "apiVersion": "bulwark.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "p", "namespace": "demo"},
        "spec": spec,
    });
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::to_value(&document).expect("YAML");
    match api::decode(yaml) {
        Ok(Decoded::Object(_)) => Ok(()),
        Ok(other) => Err(format!("not decoded: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn check(kind: &str, file: &str, cases: &[(&str, bool)]) {
    let schema = spec_schema(file);
    for (yaml, valid) in cases {
        let spec: Value = serde_yaml_ng::from_str(yaml).expect("a YAML spec");
        let mut errors = Vec::new();
        cel_errors(&schema, &spec, &mut errors);
        let rust = rust_verdict(kind, &spec);
        assert_eq!(
            errors.is_empty(),
            *valid,
            "CEL on {yaml}: {errors:?} (expected {})",
            if *valid { "valid" } else { "invalid" }
        );
        assert_eq!(
            rust.is_ok(),
            *valid,
            "the control plane on {yaml}: {rust:?} (CEL said {errors:?})"
        );
    }
}

const TARGET: &str = "targetRefs: [{kind: Service, name: s}]";

#[test]
fn resilience_policy_rules_agree() {
    let cases: Vec<(String, bool)> = vec![
        (
            format!("{{{TARGET}, retry: {{backoff: {{base: 1s, max: 2s}}}}}}"),
            true,
        ),
        (
            format!("{{{TARGET}, retry: {{backoff: {{base: 1m30s, max: 2m}}}}}}"),
            true,
        ),
        (
            format!("{{{TARGET}, retry: {{backoff: {{base: 2s, max: 1s}}}}}}"),
            false,
        ),
        (
            format!("{{{TARGET}, retry: {{backoff: {{base: 2s}}}}}}"),
            true,
        ),
        (
            format!("{{{TARGET}, circuitBreaker: {{openDuration: 2m, maxOpenDuration: 1m}}}}"),
            false,
        ),
        (
            format!("{{{TARGET}, circuitBreaker: {{openDuration: 1m, maxOpenDuration: 1m}}}}"),
            true,
        ),
        (
            format!("{{{TARGET}, circuitBreaker: {{consecutiveFailures: 0}}}}"),
            false,
        ),
        (
            format!(
                "{{{TARGET}, circuitBreaker: {{consecutiveFailures: 0, failureRatio: {{threshold: 0.5}}}}}}"
            ),
            true,
        ),
        (
            format!("{{{TARGET}, circuitBreaker: {{failureRatio: {{minRequests: 5}}}}}}"),
            false,
        ),
        (
            format!("{{{TARGET}, circuitBreaker: {{failureRatio: {{threshold: 1.5}}}}}}"),
            false,
        ),
        (
            format!("{{{TARGET}, circuitBreaker: {{failureRatio: {{threshold: 0.0}}}}}}"),
            false,
        ),
        ("{targetRefs: [{name: s}]}".to_owned(), false),
        ("{targetRefs: [{kind: Service}]}".to_owned(), false),
        (
            format!(
                "{{{TARGET}, loadBalancer: {{strategy: WeightedRoundRobin, weights: [{{selector: {{matchLabels: {{a: b}}}}, weight: 2}}]}}}}"
            ),
            true,
        ),
        (
            format!(
                "{{{TARGET}, loadBalancer: {{strategy: RoundRobin, weights: [{{selector: {{matchLabels: {{a: b}}}}, weight: 2}}]}}}}"
            ),
            false,
        ),
        (
            format!("{{{TARGET}, loadBalancer: {{weightLabel: w}}}}"),
            false,
        ),
    ];
    let cases: Vec<(&str, bool)> = cases.iter().map(|(y, v)| (y.as_str(), *v)).collect();
    check("ResiliencePolicy", "resiliencepolicies.yaml", &cases);
}

#[test]
fn rate_limit_policy_rules_agree() {
    let rate = "rate: {requests: 1, per: 1s}";
    let cases: Vec<(String, bool)> = vec![
        (
            format!("{{{TARGET}, limits: [{{name: a, {rate}}}, {{name: b, {rate}}}]}}"),
            true,
        ),
        (
            format!("{{{TARGET}, limits: [{{name: a, {rate}}}, {{name: a, {rate}}}]}}"),
            false,
        ),
        (format!("{{{TARGET}, limits: [{{{rate}}}]}}"), false),
        (format!("{{{TARGET}, limits: [{{name: a}}]}}"), false),
        (
            format!("{{{TARGET}, limits: [{{name: a, rate: {{per: 1s}}}}]}}"),
            false,
        ),
        (
            format!("{{{TARGET}, limits: [{{name: a, {rate}, key: {{type: Header}}}}]}}"),
            false,
        ),
        (
            format!(
                "{{{TARGET}, limits: [{{name: a, {rate}, key: {{type: Header, header: x-a}}}}]}}"
            ),
            true,
        ),
        (
            format!(
                "{{{TARGET}, limits: [{{name: a, {rate}, key: {{type: None, header: x-a}}}}]}}"
            ),
            false,
        ),
        (
            format!("{{{TARGET}, limits: [{{name: a, {rate}, key: {{header: x-a}}}}]}}"),
            false,
        ),
        (
            format!(
                "{{{TARGET}, limits: [{{name: a, {rate}, scope: Shared, onStoreUnavailable: FailOpen}}]}}"
            ),
            true,
        ),
        (
            format!("{{{TARGET}, limits: [{{name: a, {rate}, onStoreUnavailable: FailOpen}}]}}"),
            false,
        ),
        (
            format!(
                "{{{TARGET}, limits: [{{name: a, {rate}, scope: Pod, onStoreUnavailable: FailClosed}}]}}"
            ),
            false,
        ),
        (
            format!(
                "{{{TARGET}, direction: Outbound, responseHeaders: true, limits: [{{name: a, {rate}, cost: {{default: 2, rules: [{{method: POST, pathPrefix: /q, cost: 5}}], responseHeader: x-cost}}}}]}}"
            ),
            true,
        ),
        (
            format!(
                "{{{TARGET}, limits: [{{name: a, {rate}, cost: {{rules: [{{method: POST}}]}}}}]}}"
            ),
            false,
        ),
    ];
    let cases: Vec<(&str, bool)> = cases.iter().map(|(y, v)| (y.as_str(), *v)).collect();
    check("RateLimitPolicy", "ratelimitpolicies.yaml", &cases);
}

#[test]
fn shard_topology_rules_agree() {
    let shards = "shards: [{name: a, primary: {matchLabels: {s: a}}}, {name: b, primary: {matchLabels: {s: b}}}]";
    let header = "key: {type: Header, name: x-k}";
    let cases: Vec<(String, bool)> = vec![
        (
            format!("{{{TARGET}, {header}, strategy: {{type: Hash}}, {shards}}}"),
            true,
        ),
        (
            format!("{{{TARGET}, strategy: {{type: Hash}}, {shards}}}"),
            false,
        ),
        (format!("{{{TARGET}, {header}, {shards}}}"), false),
        (
            format!("{{{TARGET}, {header}, strategy: {{type: Hash}}}}"),
            false,
        ),
        (
            format!("{{{TARGET}, key: {{type: Header}}, strategy: {{type: Hash}}, {shards}}}"),
            false,
        ),
        (
            format!(
                "{{{TARGET}, key: {{type: Path, segment: 1}}, strategy: {{type: Hash}}, {shards}}}"
            ),
            true,
        ),
        (
            format!("{{{TARGET}, key: {{type: Path}}, strategy: {{type: Hash}}, {shards}}}"),
            false,
        ),
        (
            format!(
                "{{{TARGET}, key: {{type: Path, segment: 1, name: x}}, strategy: {{type: Hash}}, {shards}}}"
            ),
            false,
        ),
        (
            format!(
                "{{{TARGET}, key: {{type: Query, name: t, segment: 1}}, strategy: {{type: Hash}}, {shards}}}"
            ),
            false,
        ),
        (
            format!("{{{TARGET}, {header}, strategy: {{type: Range}}, {shards}}}"),
            false,
        ),
        (
            format!(
                "{{{TARGET}, {header}, strategy: {{type: Range, ranges: [{{end: m, shard: a}}, {{start: m, shard: b}}]}}, {shards}}}"
            ),
            true,
        ),
        (
            format!(
                "{{{TARGET}, {header}, strategy: {{type: Range, ranges: [{{start: z, end: a, shard: a}}]}}, {shards}}}"
            ),
            false,
        ),
        (
            format!(
                "{{{TARGET}, {header}, strategy: {{type: Range, ranges: [{{shard: c}}]}}, {shards}}}"
            ),
            false,
        ),
        (
            format!("{{{TARGET}, {header}, strategy: {{type: Hash, virtualNodes: 5}}, {shards}}}"),
            false,
        ),
        (
            format!(
                "{{{TARGET}, {header}, strategy: {{type: ConsistentHash, virtualNodes: 5}}, {shards}}}"
            ),
            true,
        ),
        (
            format!(
                "{{{TARGET}, {header}, strategy: {{type: Directory, directory: {{entries: {{t: a}}, defaultShard: c}}}}, {shards}}}"
            ),
            false,
        ),
        (
            format!(
                "{{{TARGET}, {header}, missingKey: {{action: DefaultShard}}, strategy: {{type: Hash}}, {shards}}}"
            ),
            false,
        ),
        (
            format!(
                "{{{TARGET}, {header}, missingKey: {{action: DefaultShard, shard: c}}, strategy: {{type: Hash}}, {shards}}}"
            ),
            false,
        ),
        (
            format!(
                "{{{TARGET}, {header}, missingKey: {{action: DefaultShard, shard: b}}, strategy: {{type: Hash}}, {shards}}}"
            ),
            true,
        ),
        (
            format!(
                "{{{TARGET}, {header}, missingKey: {{shard: b}}, strategy: {{type: Hash}}, {shards}}}"
            ),
            false,
        ),
        (
            format!("{{{TARGET}, {header}, strategy: {{type: Hash}}, shards: [{{name: a}}]}}"),
            false,
        ),
    ];
    let cases: Vec<(&str, bool)> = cases.iter().map(|(y, v)| (y.as_str(), *v)).collect();
    check("ShardTopology", "shardtopologies.yaml", &cases);
}

#[test]
fn peer_authentication_rules_agree() {
    check(
        "PeerAuthentication",
        "peerauthentications.yaml",
        &[
            ("{}", true),
            ("{mode: Strict}", true),
            ("{selector: {matchLabels: {app: web}}, mode: Strict}", true),
            ("{selector: {}, mode: Strict}", false),
            (
                "{portLevelMtls: [{port: 8080, mode: Strict}, {port: 9090, mode: Permissive}]}",
                true,
            ),
            (
                "{portLevelMtls: [{port: 8080, mode: Strict}, {port: 8080, mode: Permissive}]}",
                false,
            ),
            ("{portLevelMtls: [{port: 8080}]}", false),
            ("{portLevelMtls: [{mode: Strict}]}", false),
        ],
    );
}
