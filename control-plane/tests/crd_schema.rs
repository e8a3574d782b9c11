//! The committed CRDs pass the checks a real API server makes when it installs them,
//! which the in-test API server does not: the schema is structural, every `default`
//! validates against its own schema, and every string, list and map under a CEL rule is
//! bounded, so the server's cost estimator can price the rule.
//!
//! The rules are the API server's (apiextensions-apiserver `validation.go` and
//! `schema/validation.go`), written down as they apply to what `make crds` emits.

use std::path::Path;

use bulwark_control_plane::crds;
use serde_json::{Map, Value};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the repository")
}

/// Each committed CRD's file name and `openAPIV3Schema`, as JSON.
fn committed_schemas() -> Vec<(String, Value)> {
    let dir = root().join(crds::CRD_DIR);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the CRD folder is committed") {
        let path = entry.expect("a readable CRD folder").path();
        let text = std::fs::read_to_string(&path).expect("a readable CRD");
        let crd: Value = serde_yaml_ng::from_str(&text).expect("the CRD parses as YAML");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        for version in crd["spec"]["versions"].as_array().expect("versions") {
            let schema = version["schema"]["openAPIV3Schema"].clone();
            assert!(schema.is_object(), "{name}: a version without a schema");
            out.push((format!("{name} {} ", version["name"]), schema));
        }
    }
    assert_eq!(
        out.len(),
        crds::definitions().len(),
        "every CRD, one version each"
    );
    out
}

/// Calls `visit` on every schema node below (and including) `node`, with its path.
fn walk(node: &Value, path: &str, visit: &mut dyn FnMut(&str, &Map<String, Value>)) {
    let Some(map) = node.as_object() else {
        return;
    };
    visit(path, map);
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            walk(prop, &format!("{path}.{name}"), visit);
        }
    }
    if let Some(items) = map.get("items") {
        walk(items, &format!("{path}[]"), visit);
    }
    if let Some(extra @ Value::Object(_)) = map.get("additionalProperties") {
        walk(extra, &format!("{path}{{}}"), visit);
    }
    for junctor in ["allOf", "anyOf", "oneOf"] {
        for (i, sub) in map
            .get(junctor)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            walk(sub, &format!("{path}.{junctor}[{i}]"), visit);
        }
    }
    if let Some(not) = map.get("not") {
        walk(not, &format!("{path}.not"), visit);
    }
}

/// Keywords a structural schema never has (the server refuses them or their values).
const FORBIDDEN: &[&str] = &[
    "$ref",
    "$schema",
    "definitions",
    "dependencies",
    "patternProperties",
    "additionalItems",
    "id",
];

/// What makes a schema not structural, as the API server says it.
fn structural_violations(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(schema, "", &mut |path, node| {
        let open = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
            || node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        let in_junctor = path.contains("Of[") || path.ends_with(".not") || path.contains(".not.");
        if !in_junctor && !open && node.get("type").and_then(Value::as_str).is_none() {
            out.push(format!("{path}: no type"));
        }
        if in_junctor {
            for key in [
                "description",
                "type",
                "default",
                "additionalProperties",
                "nullable",
            ] {
                if node.contains_key(key) {
                    out.push(format!("{path}: {key} inside allOf/anyOf/oneOf/not"));
                }
            }
        }
        for key in FORBIDDEN {
            if node.contains_key(*key) {
                out.push(format!("{path}: {key} is not allowed"));
            }
        }
        if node.contains_key("properties") && node.contains_key("additionalProperties") {
            out.push(format!(
                "{path}: properties and additionalProperties together"
            ));
        }
        if node.get("additionalProperties") == Some(&Value::Bool(false)) {
            out.push(format!("{path}: additionalProperties: false"));
        }
        if node.get("uniqueItems") == Some(&Value::Bool(true)) {
            out.push(format!("{path}: uniqueItems: true"));
        }
        if node.get("type").and_then(Value::as_str) == Some("array") && !node.contains_key("items")
        {
            out.push(format!("{path}: an array without items"));
        }
        if node.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
            let item_type = node["items"]["type"].as_str().unwrap_or("");
            if !matches!(item_type, "string" | "integer" | "number" | "boolean") {
                out.push(format!("{path}: list-type set over non-scalar items"));
            }
        }
    });
    // `metadata` may only restrict name and generateName.
    if let Some(meta) = schema["properties"]["metadata"].as_object() {
        for key in meta.keys() {
            if !matches!(key.as_str(), "type" | "properties") {
                out.push(format!(".metadata: {key} is not allowed"));
            }
        }
        for name in meta
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.keys())
        {
            if !matches!(name.as_str(), "name" | "generateName") {
                out.push(format!(".metadata.{name}: only name and generateName"));
            }
        }
    }
    out
}

/// A schema node as a JSON Schema a validator takes: the Kubernetes extensions left out
/// (they are annotations to a JSON Schema validator), and `nullable` made a union with
/// null as the API server reads it.
fn as_json_schema(node: &Value) -> Value {
    match node {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                if key.starts_with("x-kubernetes-") || key == "nullable" || key == "default" {
                    continue;
                }
                let value = match key.as_str() {
                    "properties" => Value::Object(
                        value
                            .as_object()
                            .into_iter()
                            .flatten()
                            .map(|(k, v)| (k.clone(), as_json_schema(v)))
                            .collect(),
                    ),
                    "items" | "additionalProperties" | "not" => as_json_schema(value),
                    "allOf" | "anyOf" | "oneOf" => Value::Array(
                        value
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(as_json_schema)
                            .collect(),
                    ),
                    _ => value.clone(),
                };
                out.insert(key.clone(), value);
            }
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = out.get("type").cloned()
            {
                out.insert("type".into(), serde_json::json!([t, "null"]));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Defaults that do not validate against the schema they stand in.
fn invalid_defaults(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(schema, "", &mut |path, node| {
        let Some(default) = node.get("default") else {
            return;
        };
        let json_schema = as_json_schema(&Value::Object(node.clone()));
        let validator = match jsonschema::draft4::new(&json_schema) {
            Ok(v) => v,
            Err(e) => {
                out.push(format!("{path}: the schema does not compile: {e}"));
                return;
            }
        };
        for error in validator.iter_errors(default) {
            out.push(format!("{path}.default: {default}: {error}"));
        }
    });
    out
}

/// Strings, lists and maps under a CEL rule that have no upper bound.
fn unbounded_under_rules(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(schema, "", &mut |path, node| {
        if !node.contains_key("x-kubernetes-validations") {
            return;
        }
        // Everything the rule can reach: the node and what is below it.
        walk(&Value::Object(node.clone()), path, &mut |at, inner| {
            let bounded = |key: &str| inner.contains_key(key);
            match inner.get("type").and_then(Value::as_str) {
                Some("string") if !bounded("maxLength") => {
                    // Durations and dates have a fixed-size text form; the estimator knows.
                    let sized = matches!(
                        inner.get("format").and_then(Value::as_str),
                        Some("date-time" | "date" | "duration")
                    );
                    if !sized {
                        out.push(format!("{at}: a string without maxLength"));
                    }
                }
                Some("array") if !bounded("maxItems") => {
                    out.push(format!("{at}: a list without maxItems"));
                }
                Some("object")
                    if inner.contains_key("additionalProperties") && !bounded("maxProperties") =>
                {
                    out.push(format!("{at}: a map without maxProperties"));
                }
                _ => {}
            }
        });
    });
    out.sort();
    out.dedup();
    out
}

/// Runs `check` on every committed CRD and fails with everything it found in all.
fn assert_none(what: &str, check: fn(&Value) -> Vec<String>) {
    let found: Vec<String> = committed_schemas()
        .into_iter()
        .flat_map(|(crd, schema)| check(&schema).into_iter().map(move |f| format!("{crd}{f}")))
        .collect();
    assert!(found.is_empty(), "{what}:\n{}", found.join("\n"));
}

#[test]
fn every_crd_schema_is_structural() {
    assert_none("not structural", structural_violations);
}

#[test]
fn every_default_validates_against_its_own_schema() {
    assert_none(
        "the API server refuses the CRD for these defaults",
        invalid_defaults,
    );
}

#[test]
fn every_input_of_a_cel_rule_is_bounded() {
    assert_none(
        "the API server's cost estimator refuses rules over unbounded input",
        unbounded_under_rules,
    );
}

/// Every CEL rule of the committed CRDs: (CRD, schema path, rule text).
fn cel_rules() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (crd, schema) in committed_schemas() {
        walk(&schema, "", &mut |path, node| {
            for rule in node
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let text = rule["rule"].as_str().unwrap_or_default().to_owned();
                out.push((crd.clone(), path.to_owned(), text));
            }
        });
    }
    out
}

/// Rules of the form `A == B` or `A != B` over two booleans, which the cost estimator of
/// 1.24-era servers refuses (`cond ? has(x) : !has(x)` says the same and passes).
#[test]
fn no_cel_rule_compares_two_booleans() {
    let compares_has =
        regex::Regex::new(r"(has\([^)]*\)|\))\s*[!=]=\s*(!?has\(|\()").expect("a valid pattern");
    for (crd, path, text) in cel_rules() {
        assert!(
            !compares_has.is_match(&text),
            "{crd} {path}: {text:?} compares two booleans; write it as `c ? has(x) : !has(x)`"
        );
    }
}

/// CEL keywords that a field name must be escaped from (`self.__namespace__`), or the
/// API server refuses the rule as reading an undefined field.
const CEL_RESERVED: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

#[test]
fn no_cel_rule_reads_a_keyword_unescaped() {
    let field = regex::Regex::new(r"\.([A-Za-z_][A-Za-z0-9_]*)").expect("a valid pattern");
    for (crd, path, text) in cel_rules() {
        for name in field.captures_iter(&text).map(|c| c[1].to_owned()) {
            assert!(
                !CEL_RESERVED.contains(&name.as_str()),
                "{crd} {path}: {text:?} reads .{name}; write .__{name}__"
            );
        }
    }
}

// === the checks themselves fail on what a server refuses ===

#[test]
fn the_checks_catch_what_a_server_refuses() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "x-kubernetes-validations": [{"rule": "self.name.size() > 0"}],
                "properties": {
                    "name": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}},
                    "labels": {
                        "type": "object",
                        "default": {},
                        "minProperties": 1,
                        "additionalProperties": {"type": "string"}
                    },
                    "loose": {"properties": {}}
                }
            }
        }
    });
    assert_eq!(
        structural_violations(&schema),
        vec![".spec.loose: no type".to_owned()]
    );
    let defaults = invalid_defaults(&schema);
    assert_eq!(defaults.len(), 1, "{defaults:?}");
    assert!(
        defaults[0].starts_with(".spec.labels.default"),
        "{defaults:?}"
    );
    assert_eq!(
        unbounded_under_rules(&schema),
        vec![
            ".spec.labels: a map without maxProperties".to_owned(),
            ".spec.labels{}: a string without maxLength".to_owned(),
            ".spec.name: a string without maxLength".to_owned(),
            ".spec.tags: a list without maxItems".to_owned(),
        ]
    );
}
