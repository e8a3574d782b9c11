//! Gateway API `GRPCRoute` (`gateway.networking.k8s.io/v1`) in the mesh profile
//! (GAMMA): a route whose `parentRefs` name a Service splits that Service's gRPC
//! traffic.
//!
//! A gRPC call is an HTTP/2 `POST` to `/<service>/<method>`, so a GRPCRoute is
//! translated here into the same validated route as an HTTPRoute (and the same wire
//! entries the agent already matches): a method match becomes a path match, header
//! matches, the `RequestHeaderModifier` filter and weighted backends are the HTTPRoute
//! ones. Parent references, header matches, filters and backends are decoded by the
//! HTTPRoute code, so both kinds give the same reasons at the same field paths.

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::http_route::{self, BackendRefSpec, FilterSpec, HeaderSpec, ParentReference};
use super::meta::ObjectMeta;
use super::{FieldError, field};
use crate::model::http_route as model;

/// Longest service or method name (the Gateway API's limit).
pub const MAX_NAME_LEN: usize = 1024;

/// A `GRPCRoute` document.
#[derive(Clone, Debug, Deserialize)]
pub struct GrpcRouteDocument {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, required.
    pub spec: Option<GrpcRouteSpec>,
}

/// `spec`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    /// Where the route attaches: Services (ours) or Gateways (another implementation's).
    pub parent_refs: Option<Vec<ParentReference>>,
    /// Ignored for Service parents (GAMMA): the Service's name is the host.
    pub hostnames: Option<Vec<String>>,
    /// The rules; default: one rule matching every call.
    pub rules: Option<Vec<GrpcRuleSpec>>,
}

/// `spec.rules[]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRuleSpec {
    /// The rule's name (informational).
    pub name: Option<String>,
    /// ORed conditions; default: every call.
    pub matches: Option<Vec<GrpcMatchSpec>>,
    /// Only `RequestHeaderModifier` is supported.
    pub filters: Option<Vec<FilterSpec>>,
    /// The weighted backends.
    pub backend_refs: Option<Vec<BackendRefSpec>>,
    /// Not supported: rejected when set.
    pub session_persistence: Option<Value>,
}

/// `spec.rules[].matches[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatchSpec {
    /// The service/method condition; default: every method of every service.
    pub method: Option<MethodSpec>,
    /// Header (metadata) conditions, all of which must hold.
    pub headers: Option<Vec<HeaderSpec>>,
}

/// `matches[].method`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The fully qualified service name (`pkg.Service`); default: any.
    pub service: Option<String>,
    /// The method name; default: any.
    pub method: Option<String>,
}

impl TryFrom<GrpcRouteDocument> for model::HttpRoute {
    type Error = FieldError;

    fn try_from(doc: GrpcRouteDocument) -> Result<Self, FieldError> {
        let spec = doc.spec.ok_or_else(|| FieldError::required("spec"))?;
        http_route::route(doc.metadata, spec.parent_refs, spec.rules, rule)
    }
}

fn rule(spec: GrpcRuleSpec, at: &str, namespace: &str) -> Result<model::Rule, FieldError> {
    let request_headers =
        http_route::filters(spec.filters.unwrap_or_default(), &field(at, "filters"))?;
    if http_route::unsupported(spec.session_persistence.as_ref()) {
        return Err(FieldError::new(
            field(at, "sessionPersistence"),
            "not supported: use a ResiliencePolicy loadBalancer with ConsistentHash",
        ));
    }
    http_route::rule_of(
        spec.matches,
        grpc_match,
        spec.backend_refs,
        request_headers,
        at,
        namespace,
    )
}

fn grpc_match(spec: GrpcMatchSpec, at: &str) -> Result<model::Match, FieldError> {
    let path = match spec.method {
        None => model::PathMatch::Prefix("/".to_owned()),
        Some(m) => method(m, &field(at, "method"))?,
    };
    let headers = http_route::headers(spec.headers, at)?;
    // Every gRPC call is a POST; the method is left open so that the entry ranks like
    // an HTTPRoute match on the same path (see the module documentation).
    Ok(model::Match {
        path,
        headers,
        method: None,
    })
}

/// The path condition of a method match: `/service/method`.
fn method(spec: MethodSpec, at: &str) -> Result<model::PathMatch, FieldError> {
    let service = spec.service.filter(|s| !s.is_empty());
    let name = spec.method.filter(|m| !m.is_empty());
    for (part, value) in [("service", &service), ("method", &name)] {
        if let Some(v) = value
            && v.len() > MAX_NAME_LEN
        {
            return Err(FieldError::new(
                field(at, part),
                format!("at most {MAX_NAME_LEN} characters, got {}", v.len()),
            ));
        }
    }
    match spec.kind.as_deref().unwrap_or("Exact") {
        "Exact" => {
            if let Some(s) = &service
                && !is_service_name(s)
            {
                return Err(FieldError::new(
                    field(at, "service"),
                    format!(
                        "must be a fully qualified gRPC service name like pkg.Service, got {s:?}"
                    ),
                ));
            }
            if let Some(m) = &name
                && !is_identifier(m)
            {
                return Err(FieldError::new(
                    field(at, "method"),
                    format!("must be a gRPC method name (letters, digits, _), got {m:?}"),
                ));
            }
            Ok(match (service, name) {
                (Some(s), Some(m)) => model::PathMatch::Exact(format!("/{s}/{m}")),
                (Some(s), None) => model::PathMatch::Prefix(format!("/{s}")),
                (None, Some(m)) => model::PathMatch::Regex(format!("/[^/]+/{}", regex::escape(&m))),
                (None, None) => {
                    return Err(FieldError::new(
                        at,
                        "an Exact method match needs service, method or both",
                    ));
                }
            })
        }
        "RegularExpression" => {
            for (part, value) in [("service", &service), ("method", &name)] {
                if let Some(v) = value {
                    http_route::regex(v, &field(at, part))?;
                }
            }
            let part =
                |p: Option<String>| p.map_or_else(|| "[^/]+".to_owned(), |p| format!("(?:{p})"));
            let pattern = format!("/{}/{}", part(service), part(name));
            http_route::regex(&pattern, at)?;
            Ok(model::PathMatch::Regex(pattern))
        }
        other => Err(FieldError::new(
            field(at, "type"),
            format!("must be Exact or RegularExpression, got {other:?}"),
        )),
    }
}

/// `[A-Za-z_][A-Za-z_0-9]*`.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Dot-separated identifiers, optionally with a leading dot (the Gateway API's pattern).
fn is_service_name(s: &str) -> bool {
    s.strip_prefix('.')
        .unwrap_or(s)
        .split('.')
        .all(is_identifier)
}

#[cfg(test)]
mod tests;
