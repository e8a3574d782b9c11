//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`) in the mesh profile
//! (GAMMA): a route whose `parentRefs` name a Service splits that Service's traffic.
//!
//! Our own serde types rather than the `gateway-api` crate's: its 0.21 release does
//! build with kube 3.1 / k8s-openapi 0.27, but its generated types accept unknown
//! fields (the folder source reports them with their field path, like `kubectl
//! --validate=strict`), and we read only the subset the agent enforces, rejecting the
//! rest (filters, timeouts, query matches) with a reason instead of silently dropping
//! it. Both sources decode through here, so both report the same paths.

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::meta::ObjectMeta;
use super::service::port_number;
use super::{FieldError, field, item};
use crate::model::http_route as model;

/// The API group of the Gateway API.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Most `parentRefs` a route may have (the Gateway API's limit).
pub const MAX_PARENT_REFS: usize = 32;
/// Most rules a route may have.
pub const MAX_RULES: usize = 16;
/// Most matches in one rule.
pub const MAX_MATCHES: usize = 64;
/// Most matches over all rules of a route.
pub const MAX_TOTAL_MATCHES: usize = 128;
/// Most header matches in one match.
pub const MAX_HEADERS: usize = 16;
/// Most backends of one rule.
pub const MAX_BACKENDS: usize = 16;
/// Longest path value.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest header value to match.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Largest backend weight.
pub const MAX_WEIGHT: i64 = 1_000_000;
/// Compiled size limit of one regular expression: a route cannot make agents build a
/// huge automaton.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// An `HTTPRoute` document.
#[derive(Clone, Debug, Deserialize)]
pub struct HttpRouteDocument {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, required.
    pub spec: Option<HttpRouteSpec>,
}

/// `spec`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// Where the route attaches: Services (ours) or Gateways (another implementation's).
    pub parent_refs: Option<Vec<ParentReference>>,
    /// Ignored for Service parents (GAMMA): the Service's name is the host.
    pub hostnames: Option<Vec<String>>,
    /// The rules; default: one rule matching everything.
    pub rules: Option<Vec<RuleSpec>>,
}

/// `spec.parentRefs[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// `""` or `core` for a Service; default `gateway.networking.k8s.io`.
    pub group: Option<String>,
    /// `Service` for us; default `Gateway`.
    pub kind: Option<String>,
    /// Must be the route's own namespace.
    pub namespace: Option<String>,
    /// The parent's name.
    pub name: Option<String>,
    /// A port name of the Service.
    pub section_name: Option<String>,
    /// A port number of the Service.
    pub port: Option<i64>,
}

/// `spec.rules[]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// The rule's name (informational).
    pub name: Option<String>,
    /// ORed conditions; default: every request.
    pub matches: Option<Vec<MatchSpec>>,
    /// Only `RequestHeaderModifier` is supported.
    pub filters: Option<Vec<FilterSpec>>,
    /// The weighted backends.
    pub backend_refs: Option<Vec<BackendRefSpec>>,
    /// Not supported (use a ResiliencePolicy): rejected when set.
    pub timeouts: Option<Value>,
    /// Not supported (use a ResiliencePolicy): rejected when set.
    pub retry: Option<Value>,
    /// Not supported: rejected when set.
    pub session_persistence: Option<Value>,
}

/// `spec.rules[].filters[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FilterSpec {
    /// The filter type; only `RequestHeaderModifier` is supported.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The header changes of a `RequestHeaderModifier`.
    pub request_header_modifier: Option<HeaderModifierSpec>,
    /// The configuration of other filter types (refused).
    #[serde(flatten)]
    pub other: serde_yaml_ng::Mapping,
}

/// `filters[].requestHeaderModifier`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifierSpec {
    /// Headers to replace (or add).
    pub set: Option<Vec<HeaderValueSpec>>,
    /// Headers to append.
    pub add: Option<Vec<HeaderValueSpec>>,
    /// Header names to remove.
    pub remove: Option<Vec<String>>,
}

/// A header name and value.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueSpec {
    /// The name (case-insensitive).
    pub name: Option<String>,
    /// The value.
    pub value: Option<String>,
}

/// Most entries in each list of a RequestHeaderModifier.
pub const MAX_HEADER_CHANGES: usize = 16;

/// `spec.rules[].matches[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchSpec {
    /// The path condition; default `PathPrefix /`.
    pub path: Option<PathSpec>,
    /// Header conditions, all of which must hold.
    pub headers: Option<Vec<HeaderSpec>>,
    /// Not supported: rejected when not empty.
    pub query_params: Option<Vec<Value>>,
    /// The method.
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSpec {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Default `/`.
    pub value: Option<String>,
}

/// `matches[].headers[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The header name (case-insensitive).
    pub name: Option<String>,
    /// The value to match.
    pub value: Option<String>,
}

/// `spec.rules[].backendRefs[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRefSpec {
    /// `""` or `core`.
    pub group: Option<String>,
    /// `Service` (default).
    pub kind: Option<String>,
    /// The Service's name.
    pub name: Option<String>,
    /// Must be the route's own namespace (no ReferenceGrant support).
    pub namespace: Option<String>,
    /// The Service port number; required.
    pub port: Option<i64>,
    /// Relative weight, 0 to 1,000,000; default 1.
    pub weight: Option<i64>,
    /// Not supported: rejected when not empty.
    pub filters: Option<Vec<Value>>,
}

fn is_core(group: Option<&str>) -> bool {
    matches!(group, Some("" | "core"))
}

impl TryFrom<HttpRouteDocument> for model::HttpRoute {
    type Error = FieldError;

    fn try_from(doc: HttpRouteDocument) -> Result<Self, FieldError> {
        let spec = doc.spec.ok_or_else(|| FieldError::required("spec"))?;
        route(doc.metadata, spec.parent_refs, spec.rules, rule)
    }
}

/// The validated route of either kind: its Service parents and its rules (one rule
/// matching everything when `specs` is absent), each validated by `rule`, within the
/// Gateway API's limits on rules and matches.
pub(super) fn route<S: Default>(
    metadata: ObjectMeta,
    parent_refs: Option<Vec<ParentReference>>,
    specs: Option<Vec<S>>,
    rule: fn(S, &str, &str) -> Result<model::Rule, FieldError>,
) -> Result<model::HttpRoute, FieldError> {
    let name = metadata.object_name()?;
    let created = metadata.creation_timestamp;
    let parents = parents(parent_refs.unwrap_or_default(), &name.namespace)?;
    if parents.is_empty() {
        // A route of some Gateway: not ours to judge.
        return Ok(model::HttpRoute {
            name,
            created,
            parents,
            rules: Vec::new(),
        });
    }
    let specs = specs.unwrap_or_else(|| vec![S::default()]);
    if specs.len() > MAX_RULES {
        return Err(FieldError::new(
            "spec.rules",
            format!("at most {MAX_RULES} rules, got {}", specs.len()),
        ));
    }
    let mut rules = Vec::with_capacity(specs.len());
    let mut total = 0;
    for (i, spec) in specs.into_iter().enumerate() {
        let rule = rule(spec, &item("spec.rules", i), &name.namespace)?;
        total += rule.matches.len();
        rules.push(rule);
    }
    if total > MAX_TOTAL_MATCHES {
        return Err(FieldError::new(
            "spec.rules",
            format!("at most {MAX_TOTAL_MATCHES} matches over all rules, got {total}"),
        ));
    }
    Ok(model::HttpRoute {
        name,
        created,
        parents,
        rules,
    })
}

/// The Service parents; other parents (Gateways) are skipped.
pub(super) fn parents(
    refs: Vec<ParentReference>,
    namespace: &str,
) -> Result<Vec<model::ParentRef>, FieldError> {
    if refs.len() > MAX_PARENT_REFS {
        return Err(FieldError::new(
            "spec.parentRefs",
            format!("at most {MAX_PARENT_REFS} parentRefs, got {}", refs.len()),
        ));
    }
    let mut out = Vec::new();
    for (i, r) in refs.into_iter().enumerate() {
        let at = item("spec.parentRefs", i);
        if !is_core(r.group.as_deref()) || r.kind.as_deref() != Some("Service") {
            continue;
        }
        let service = match r.name {
            Some(n) if !n.is_empty() => n,
            _ => return Err(FieldError::required(field(&at, "name"))),
        };
        if let Some(ns) = r.namespace.as_deref()
            && ns != namespace
        {
            return Err(FieldError::new(
                field(&at, "namespace"),
                format!(
                    "must be the route's namespace {namespace:?}: Bulwark supports producer \
                     routes only (a route in the Service's own namespace), got {ns:?}"
                ),
            ));
        }
        let port = r
            .port
            .map(|p| port_number(p, field(&at, "port")))
            .transpose()?;
        let section = r.section_name.filter(|s| !s.is_empty());
        out.push(model::ParentRef {
            service,
            port,
            section,
        });
    }
    Ok(out)
}

pub(super) fn unsupported(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Sequence(s)) => !s.is_empty(),
        Some(Value::Mapping(m)) => !m.is_empty(),
        Some(_) => true,
    }
}

fn rule(spec: RuleSpec, at: &str, namespace: &str) -> Result<model::Rule, FieldError> {
    let request_headers = filters(spec.filters.unwrap_or_default(), &field(at, "filters"))?;
    let rejected = [
        (
            "timeouts",
            spec.timeouts,
            "not supported: set timeouts in a ResiliencePolicy on the backend Service",
        ),
        (
            "retry",
            spec.retry,
            "not supported: set retries in a ResiliencePolicy on the backend Service",
        ),
        (
            "sessionPersistence",
            spec.session_persistence,
            "not supported: use a ResiliencePolicy loadBalancer with ConsistentHash",
        ),
    ];
    for (name, value, reason) in rejected {
        if unsupported(value.as_ref()) {
            return Err(FieldError::new(field(at, name), reason));
        }
    }
    rule_of(
        spec.matches,
        route_match,
        spec.backend_refs,
        request_headers,
        at,
        namespace,
    )
}

/// A rule of either kind from its decoded filters, its `matches` (each validated by the
/// kind's function; none: one match of every request) and its `backendRefs`, within the
/// Gateway API's limits.
pub(super) fn rule_of<M>(
    matches: Option<Vec<M>>,
    one_match: fn(M, &str) -> Result<model::Match, FieldError>,
    backend_refs: Option<Vec<BackendRefSpec>>,
    request_headers: Option<model::HeaderModifier>,
    at: &str,
    namespace: &str,
) -> Result<model::Rule, FieldError> {
    let specs = matches.unwrap_or_default();
    if specs.len() > MAX_MATCHES {
        return Err(FieldError::new(
            field(at, "matches"),
            format!("at most {MAX_MATCHES} matches, got {}", specs.len()),
        ));
    }
    let mut matches = Vec::with_capacity(specs.len().max(1));
    for (i, m) in specs.into_iter().enumerate() {
        matches.push(one_match(m, &item(&field(at, "matches"), i))?);
    }
    if matches.is_empty() {
        matches.push(model::Match {
            path: model::PathMatch::Prefix("/".to_owned()),
            headers: Vec::new(),
            method: None,
        });
    }
    let refs = backend_refs.unwrap_or_default();
    if refs.len() > MAX_BACKENDS {
        return Err(FieldError::new(
            field(at, "backendRefs"),
            format!("at most {MAX_BACKENDS} backendRefs, got {}", refs.len()),
        ));
    }
    let mut backends = Vec::with_capacity(refs.len());
    for (i, r) in refs.into_iter().enumerate() {
        backends.push(backend(r, &item(&field(at, "backendRefs"), i), namespace)?);
    }
    Ok(model::Rule {
        matches,
        backends,
        request_headers,
    })
}

/// The rule's filters: at most one `RequestHeaderModifier`; any other type is refused.
pub(super) fn filters(
    specs: Vec<FilterSpec>,
    at: &str,
) -> Result<Option<model::HeaderModifier>, FieldError> {
    let mut modifier = None;
    for (i, f) in specs.into_iter().enumerate() {
        let fat = item(at, i);
        match f.kind.as_deref() {
            Some("RequestHeaderModifier") => {}
            Some(other) => {
                return Err(FieldError::new(
                    field(&fat, "type"),
                    format!(
                        "filter {other} is not supported by Bulwark (only RequestHeaderModifier); \
                         the route is not applied"
                    ),
                ));
            }
            None => return Err(FieldError::required(field(&fat, "type"))),
        }
        if let Some((key, _)) = f.other.iter().next() {
            let key = key.as_str().unwrap_or("?");
            return Err(FieldError::new(
                field(&fat, key),
                "only requestHeaderModifier goes with type RequestHeaderModifier",
            ));
        }
        if modifier.is_some() {
            return Err(FieldError::new(
                field(&fat, "type"),
                "at most one RequestHeaderModifier per rule",
            ));
        }
        let spec = f
            .request_header_modifier
            .ok_or_else(|| FieldError::required(field(&fat, "requestHeaderModifier")))?;
        modifier = Some(header_modifier(
            spec,
            &field(&fat, "requestHeaderModifier"),
        )?);
    }
    Ok(modifier)
}

fn header_modifier(
    spec: HeaderModifierSpec,
    at: &str,
) -> Result<model::HeaderModifier, FieldError> {
    let pairs = |list: Option<Vec<HeaderValueSpec>>, name: &str| {
        let path = field(at, name);
        let list = list.unwrap_or_default();
        if list.len() > MAX_HEADER_CHANGES {
            return Err(FieldError::new(
                path,
                format!("at most {MAX_HEADER_CHANGES} entries, got {}", list.len()),
            ));
        }
        let mut out: Vec<(String, String)> = Vec::with_capacity(list.len());
        for (i, h) in list.into_iter().enumerate() {
            let hat = item(&path, i);
            let name = header_name(h.name, &field(&hat, "name"))?;
            if out.iter().any(|(n, _)| *n == name) {
                return Err(FieldError::new(
                    field(&hat, "name"),
                    format!("header {name:?} is listed twice (names are case-insensitive)"),
                ));
            }
            let value = h
                .value
                .ok_or_else(|| FieldError::required(field(&hat, "value")))?;
            if value.len() > MAX_HEADER_VALUE_LEN || value.chars().any(|c| c.is_control()) {
                return Err(FieldError::new(
                    field(&hat, "value"),
                    format!(
                        "must be at most {MAX_HEADER_VALUE_LEN} characters without control characters"
                    ),
                ));
            }
            out.push((name, value));
        }
        Ok(out)
    };
    let set = pairs(spec.set, "set")?;
    let add = pairs(spec.add, "add")?;
    let names = spec.remove.unwrap_or_default();
    if names.len() > MAX_HEADER_CHANGES {
        return Err(FieldError::new(
            field(at, "remove"),
            format!("at most {MAX_HEADER_CHANGES} entries, got {}", names.len()),
        ));
    }
    let mut remove: Vec<String> = Vec::with_capacity(names.len());
    for (i, n) in names.into_iter().enumerate() {
        let name = header_name(Some(n), &item(&field(at, "remove"), i))?;
        if !remove.contains(&name) {
            remove.push(name);
        }
    }
    Ok(model::HeaderModifier { set, add, remove })
}

/// A header name, lower-cased, or why it is not one.
fn header_name(name: Option<String>, at: &str) -> Result<String, FieldError> {
    let name = name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| FieldError::required(at))?;
    match http_header_name(&name) {
        Some(lower) if name.len() <= 256 => Ok(lower),
        _ => Err(FieldError::new(
            at,
            format!("must be an HTTP header name (at most 256 token characters), got {name:?}"),
        )),
    }
}

/// A match's `headers` (all must hold), at most [`MAX_HEADERS`], no name twice.
pub(super) fn headers(
    specs: Option<Vec<HeaderSpec>>,
    at: &str,
) -> Result<Vec<model::HeaderMatch>, FieldError> {
    let specs = specs.unwrap_or_default();
    if specs.len() > MAX_HEADERS {
        return Err(FieldError::new(
            field(at, "headers"),
            format!("at most {MAX_HEADERS} header matches, got {}", specs.len()),
        ));
    }
    let mut headers: Vec<model::HeaderMatch> = Vec::with_capacity(specs.len());
    for (i, h) in specs.into_iter().enumerate() {
        let hat = item(&field(at, "headers"), i);
        let header = header(h, &hat)?;
        if headers.iter().any(|o| o.name == header.name) {
            return Err(FieldError::new(
                field(&hat, "name"),
                format!(
                    "header {:?} is matched twice (names are case-insensitive)",
                    header.name
                ),
            ));
        }
        headers.push(header);
    }
    Ok(headers)
}

fn route_match(spec: MatchSpec, at: &str) -> Result<model::Match, FieldError> {
    if unsupported(spec.query_params.map(Value::Sequence).as_ref()) {
        return Err(FieldError::new(
            field(at, "queryParams"),
            "query parameter matches are not supported by Bulwark yet",
        ));
    }
    let path = match spec.path {
        None => model::PathMatch::Prefix("/".to_owned()),
        Some(p) => path(p, &field(at, "path"))?,
    };
    let headers = headers(spec.headers, at)?;
    let method = spec
        .method
        .map(|m| {
            const METHODS: [&str; 9] = [
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
            ];
            if METHODS.contains(&m.as_str()) {
                Ok(m)
            } else {
                Err(FieldError::new(
                    field(at, "method"),
                    format!("must be one of {}, got {m:?}", METHODS.join(", ")),
                ))
            }
        })
        .transpose()?;
    Ok(model::Match {
        path,
        headers,
        method,
    })
}

fn path(spec: PathSpec, at: &str) -> Result<model::PathMatch, FieldError> {
    let value = spec.value.unwrap_or_else(|| "/".to_owned());
    let value_at = field(at, "value");
    if value.len() > MAX_PATH_LEN {
        return Err(FieldError::new(
            value_at,
            format!("at most {MAX_PATH_LEN} characters, got {}", value.len()),
        ));
    }
    let kind = spec.kind.as_deref().unwrap_or("PathPrefix");
    if kind == "RegularExpression" {
        regex(&value, &value_at)?;
        return Ok(model::PathMatch::Regex(value));
    }
    if !matches!(kind, "Exact" | "PathPrefix") {
        return Err(FieldError::new(
            field(at, "type"),
            format!("must be Exact, PathPrefix or RegularExpression, got {kind:?}"),
        ));
    }
    if !value.starts_with('/') {
        return Err(FieldError::new(
            value_at,
            format!("must start with \"/\", got {value:?}"),
        ));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            return Err(FieldError::new(
                value_at,
                format!("must not contain {bad:?}, got {value:?}"),
            ));
        }
    }
    if value.ends_with("/..") || value.ends_with("/.") {
        return Err(FieldError::new(
            value_at,
            format!("must not end with \"/..\" or \"/.\", got {value:?}"),
        ));
    }
    if kind == "Exact" {
        return Ok(model::PathMatch::Exact(value));
    }
    // `/foo/` and `/foo` match the same segments.
    let trimmed = value.trim_end_matches('/');
    let prefix = if trimmed.is_empty() { "/" } else { trimmed };
    Ok(model::PathMatch::Prefix(prefix.to_owned()))
}

pub(super) fn header(spec: HeaderSpec, at: &str) -> Result<model::HeaderMatch, FieldError> {
    let name = spec
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| FieldError::required(field(at, "name")))?;
    if name.len() > 256 || http_header_name(&name).is_none() {
        return Err(FieldError::new(
            field(at, "name"),
            format!("must be an HTTP header name (at most 256 token characters), got {name:?}"),
        ));
    }
    let value = spec
        .value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| FieldError::required(field(at, "value")))?;
    if value.len() > MAX_HEADER_VALUE_LEN {
        return Err(FieldError::new(
            field(at, "value"),
            format!(
                "at most {MAX_HEADER_VALUE_LEN} characters, got {}",
                value.len()
            ),
        ));
    }
    let value = match spec.kind.as_deref().unwrap_or("Exact") {
        "Exact" => model::ValueMatch::Exact(value),
        "RegularExpression" => {
            regex(&value, &field(at, "value"))?;
            model::ValueMatch::Regex(value)
        }
        other => {
            return Err(FieldError::new(
                field(at, "type"),
                format!("must be Exact or RegularExpression, got {other:?}"),
            ));
        }
    };
    Ok(model::HeaderMatch {
        name: name.to_ascii_lowercase(),
        value,
    })
}

/// A lower-cased header name, if `name` is a valid one.
fn http_header_name(name: &str) -> Option<String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    name.chars().all(token).then(|| name.to_ascii_lowercase())
}

/// Checks that a regular expression compiles the way the agent compiles it: anchored,
/// whole value, with a size limit.
pub fn regex(pattern: &str, at: &str) -> Result<(), FieldError> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map(|_| ())
        .map_err(|e| FieldError::new(at, format!("invalid regular expression: {e}")))
}

pub(super) fn backend(
    spec: BackendRefSpec,
    at: &str,
    namespace: &str,
) -> Result<model::Backend, FieldError> {
    match spec.group.as_deref() {
        None => {}
        group if is_core(group) => {}
        Some(group) => {
            return Err(FieldError::new(
                field(at, "group"),
                format!("must be \"\" (the core group of Service), got {group:?}"),
            ));
        }
    }
    if let Some(kind) = spec.kind.as_deref()
        && kind != "Service"
    {
        return Err(FieldError::new(
            field(at, "kind"),
            format!("must be Service, got {kind:?}"),
        ));
    }
    let service = spec
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| FieldError::required(field(at, "name")))?;
    if let Some(ns) = spec.namespace.as_deref()
        && ns != namespace
    {
        return Err(FieldError::new(
            field(at, "namespace"),
            format!(
                "must be the route's namespace {namespace:?}: cross-namespace backends need a \
                 ReferenceGrant, which Bulwark does not support; got {ns:?}"
            ),
        ));
    }
    let port = spec
        .port
        .ok_or_else(|| FieldError::new(field(at, "port"), "required for a Service backend"))
        .and_then(|p| port_number(p, field(at, "port")))?;
    let weight = spec.weight.unwrap_or(1);
    let weight = u32::try_from(weight)
        .ok()
        .filter(|w| i64::from(*w) <= MAX_WEIGHT)
        .ok_or_else(|| {
            FieldError::new(
                field(at, "weight"),
                format!("must be between 0 and {MAX_WEIGHT}, got {weight}"),
            )
        })?;
    if unsupported(spec.filters.map(Value::Sequence).as_ref()) {
        return Err(FieldError::new(
            field(at, "filters"),
            "backend filters are not supported by Bulwark; a RequestHeaderModifier can go on \
             the rule (the route is not applied)",
        ));
    }
    Ok(model::Backend {
        service,
        port,
        weight,
    })
}

#[cfg(test)]
mod tests;
