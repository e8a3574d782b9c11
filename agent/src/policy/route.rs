//! Traffic splitting (Gateway API HTTPRoute, mesh profile): the rules attached to a
//! service port, which request each takes, and which weighted backend it goes to.
//!
//! The control plane sends the rules in precedence order; the first rule with a match
//! that holds decides. Its backend is picked by smooth weighted round robin over a
//! schedule built once per config, so a split is exact over every full turn of the
//! schedule (90/10 is 9 of every 10 requests) rather than only on average, and tests are
//! repeatable. A backend is a service port of the same snapshot, looked up when the
//! request comes (never routed again: no recursion); one that does not resolve answers
//! its share with 500 `backend-not-found`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bulwark_proto::v1;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method};
use prometheus_client::metrics::counter::Counter;
use regex::Regex;
use serde_json::{Value, json};

use crate::metrics::Metrics;
use crate::policy::balance::schedule;

/// Compiled size limit of a regular expression (the control plane checks the same).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A route rule the agent cannot enforce (the snapshot is NACKed).
#[derive(Debug, thiserror::Error)]
pub enum InvalidRoute {
    /// A regular expression that does not compile.
    #[error("route {source_name:?} rule {rule}: invalid regular expression {pattern:?}: {error}")]
    Regex {
        /// `namespace/name` of the route.
        source_name: String,
        /// The rule's index.
        rule: u32,
        /// The pattern.
        pattern: String,
        /// Why.
        error: regex::Error,
    },
    /// A header name, method, enum value or port that is not valid.
    #[error("route {source_name:?} rule {rule}: {what}")]
    Field {
        /// `namespace/name` of the route.
        source_name: String,
        /// The rule's index.
        rule: u32,
        /// What is wrong.
        what: String,
    },
}

/// The service port a backend names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service port number.
    pub port: u16,
}

impl std::fmt::Display for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}:{}", self.name, self.namespace, self.port)
    }
}

/// A weighted backend of a rule.
#[derive(Debug)]
pub struct Backend {
    /// The service port.
    pub key: BackendKey,
    /// Relative weight (0: never picked).
    pub weight: u32,
    /// Whether the backend is the port the rule is attached to (its endpoints are used
    /// directly).
    pub is_parent: bool,
    requests: Counter,
}

impl Backend {
    /// Counts a request sent to (or refused for) this backend.
    pub fn count(&self) {
        self.requests.inc();
    }
}

/// A path condition.
#[derive(Debug)]
enum PathMatch {
    Exact(String),
    /// Without a trailing `/` (except the root).
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn holds(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(v) => path == v,
            PathMatch::Prefix(v) => {
                v == "/"
                    || path
                        .strip_prefix(v.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// A header value condition.
#[derive(Debug)]
enum ValueMatch {
    Exact(Vec<u8>),
    Regex(Regex),
}

/// Conditions that must all hold.
#[derive(Debug)]
struct Match {
    path: Option<PathMatch>,
    headers: Vec<(HeaderName, ValueMatch)>,
    method: Option<Method>,
}

impl Match {
    fn holds(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && self.path.as_ref().is_none_or(|p| p.holds(path))
            && self.headers.iter().all(|(name, want)| {
                // A repeated header matches when any of its values does.
                headers.get_all(name).iter().any(|value| match want {
                    ValueMatch::Exact(v) => value.as_bytes() == v.as_slice(),
                    ValueMatch::Regex(r) => value.to_str().is_ok_and(|s| r.is_match(s)),
                })
            })
    }
}

/// One rule: its matches (ORed) and weighted backends.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of the HTTPRoute.
    pub source: Arc<str>,
    /// The rule's index in the route.
    pub index: u32,
    matches: Vec<Match>,
    /// The backends, in route order.
    pub backends: Vec<Backend>,
    /// Backend indices in smooth weighted round-robin order (empty: all weights 0).
    schedule: Vec<usize>,
    /// Shared with the same rule of the previous config, so a push does not restart
    /// the split.
    cursor: Arc<AtomicUsize>,
    /// What the rule was built from, to recognise it in the next config.
    wire: v1::HttpRouteRule,
    /// Requests that matched the rule but found no backend to pick (all weights 0).
    unweighted: Counter,
    /// The RequestHeaderModifier filter.
    request_headers: Option<HeaderModifier>,
}

/// Header changes a rule makes to the requests it takes.
#[derive(Debug, Default)]
struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderModifier {
    fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl Rule {
    fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.holds(method, path, headers))
    }

    /// Applies the rule's RequestHeaderModifier filter, if it has one.
    pub fn modify(&self, headers: &mut HeaderMap) {
        if let Some(m) = &self.request_headers {
            m.apply(headers);
        }
    }

    /// The next backend by weight; `None` when every weight is 0.
    pub fn pick(&self) -> Option<&Backend> {
        if self.schedule.is_empty() {
            self.unweighted.inc();
            return None;
        }
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
        self.schedule
            .get(turn % self.schedule.len())
            .and_then(|&i| self.backends.get(i))
    }
}

/// The rules of one service port, in precedence order.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The rules.
    pub rules: Vec<Rule>,
}

impl RouteTable {
    /// Validates the wire rules of the port `dst`, reusing the split position of rules
    /// unchanged since `previous`.
    pub fn build(
        rules: &[v1::HttpRouteRule],
        dst: &str,
        previous: Option<&RouteTable>,
        metrics: &Metrics,
    ) -> Result<Self, InvalidRoute> {
        let mut out = Vec::with_capacity(rules.len());
        for wire in rules {
            let reused = previous
                .and_then(|p| p.rules.iter().find(|r| r.wire == *wire))
                .map(|r| Arc::clone(&r.cursor));
            out.push(Rule::build(wire, dst, reused, metrics)?);
        }
        Ok(RouteTable { rules: out })
    }

    /// The first rule that takes the request, if any.
    pub fn select(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(method, path, headers))
    }

    /// The rules for `/config`; `resolved` tells whether a backend is in the config.
    pub fn to_json(&self, resolved: impl Fn(&BackendKey) -> bool) -> Value {
        Value::Array(
            self.rules
                .iter()
                .map(|r| {
                    json!({
                        "route": r.source.as_ref(),
                        "rule": r.index,
                        "matches": r.wire.matches.iter().map(match_json).collect::<Vec<_>>(),
                        "requestHeaderModifier": r.wire.request_header_modifier.as_ref().map(|m| json!({
                            "set": m.set.iter().map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>(),
                            "add": m.add.iter().map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>(),
                            "remove": m.remove,
                        })),
                        "backends": r.backends.iter().map(|b| json!({
                            "service": b.key.to_string(),
                            "weight": b.weight,
                            "resolved": b.is_parent || resolved(&b.key),
                            "requests": b.requests.get(),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )
    }
}

fn match_json(m: &v1::HttpRouteMatch) -> Value {
    let path = m.path.as_ref().map(|p| {
        let kind = match v1::http_path_match::Type::try_from(p.r#type) {
            Ok(v1::http_path_match::Type::Exact) => "Exact",
            Ok(v1::http_path_match::Type::Prefix) => "PathPrefix",
            Ok(v1::http_path_match::Type::RegularExpression) => "RegularExpression",
            Err(_) => "Unknown",
        };
        json!({"type": kind, "value": p.value})
    });
    let headers: Vec<Value> = m
        .headers
        .iter()
        .map(|h| {
            let kind = match v1::http_header_match::Type::try_from(h.r#type) {
                Ok(v1::http_header_match::Type::Exact) => "Exact",
                Ok(v1::http_header_match::Type::RegularExpression) => "RegularExpression",
                Err(_) => "Unknown",
            };
            json!({"type": kind, "name": h.name, "value": h.value})
        })
        .collect();
    json!({
        "path": path,
        "headers": headers,
        "method": Some(&m.method).filter(|m| !m.is_empty()),
    })
}

impl Rule {
    fn build(
        wire: &v1::HttpRouteRule,
        dst: &str,
        cursor: Option<Arc<AtomicUsize>>,
        metrics: &Metrics,
    ) -> Result<Self, InvalidRoute> {
        let field = |what: String| InvalidRoute::Field {
            source_name: wire.source.clone(),
            rule: wire.rule_index,
            what,
        };
        let regex = |pattern: &str| {
            regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|error| InvalidRoute::Regex {
                    source_name: wire.source.clone(),
                    rule: wire.rule_index,
                    pattern: pattern.to_owned(),
                    error,
                })
        };
        let mut matches = Vec::with_capacity(wire.matches.len());
        for m in &wire.matches {
            let path = match &m.path {
                None => None,
                Some(p) => Some(match v1::http_path_match::Type::try_from(p.r#type) {
                    Ok(v1::http_path_match::Type::Exact) => PathMatch::Exact(p.value.clone()),
                    Ok(v1::http_path_match::Type::Prefix) => {
                        let trimmed = p.value.trim_end_matches('/');
                        PathMatch::Prefix(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
                    }
                    Ok(v1::http_path_match::Type::RegularExpression) => {
                        PathMatch::Regex(regex(&p.value)?)
                    }
                    Err(_) => return Err(field(format!("unknown path match type {}", p.r#type))),
                }),
            };
            let mut headers = Vec::with_capacity(m.headers.len());
            for h in &m.headers {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| field(format!("invalid header name {:?}", h.name)))?;
                let value = match v1::http_header_match::Type::try_from(h.r#type) {
                    Ok(v1::http_header_match::Type::Exact) => {
                        ValueMatch::Exact(h.value.as_bytes().to_vec())
                    }
                    Ok(v1::http_header_match::Type::RegularExpression) => {
                        ValueMatch::Regex(regex(&h.value)?)
                    }
                    Err(_) => {
                        return Err(field(format!("unknown header match type {}", h.r#type)));
                    }
                };
                headers.push((name, value));
            }
            let method = if m.method.is_empty() {
                None
            } else {
                Some(
                    Method::from_bytes(m.method.as_bytes())
                        .map_err(|_| field(format!("invalid method {:?}", m.method)))?,
                )
            };
            matches.push(Match {
                path,
                headers,
                method,
            });
        }
        let rule = wire.rule_index.to_string();
        let mut backends = Vec::with_capacity(wire.backends.len());
        for b in &wire.backends {
            let port = u16::try_from(b.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    field(format!(
                        "backend {}: port {} is out of range",
                        b.name, b.port
                    ))
                })?;
            let key = BackendKey {
                namespace: b.namespace.clone(),
                name: b.name.clone(),
                port,
            };
            let requests = metrics.route_backend(dst, &wire.source, &rule, &key.to_string());
            backends.push(Backend {
                is_parent: key.to_string() == dst,
                key,
                weight: b.weight,
                requests,
            });
        }
        let request_headers = match &wire.request_header_modifier {
            None => None,
            Some(m) => {
                let name = |n: &str| {
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| field(format!("invalid header name {n:?}")))
                };
                let pairs = |list: &[v1::HttpHeader]| {
                    list.iter()
                        .map(|h| {
                            let value = HeaderValue::from_str(&h.value).map_err(|_| {
                                field(format!("invalid value for header {:?}", h.name))
                            })?;
                            Ok((name(&h.name)?, value))
                        })
                        .collect::<Result<Vec<_>, InvalidRoute>>()
                };
                Some(HeaderModifier {
                    set: pairs(&m.set)?,
                    add: pairs(&m.add)?,
                    remove: m.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
                })
            }
        };
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Ok(Rule {
            source: wire.source.as_str().into(),
            index: wire.rule_index,
            matches,
            schedule: schedule(&weights),
            backends,
            cursor: cursor.unwrap_or_default(),
            wire: wire.clone(),
            unweighted: metrics.route_backend(dst, &wire.source, &rule, "none"),
            request_headers,
        })
    }
}

#[cfg(test)]
mod tests;
