//! Traffic splitting: the rules of the HTTPRoutes and GRPCRoutes attached to each
//! service port, in the Gateway API's precedence order, in wire form.
//!
//! Precedence is decided per match, across every rule of every route on the port: the
//! more specific match first (exact path, regex, longest prefix, method, most headers),
//! then the older route (`creationTimestamp`, unknown counting as newest), then the
//! route's `namespace/name`, then HTTPRoute before GRPCRoute, then rule and match order
//! in the route. So each wire entry carries one match, and the agent takes the first
//! entry that matches.
//!
//! The Gateway API merges the HTTPRoutes and GRPCRoutes of one port. A GRPCRoute's
//! matches are already paths here (`/service/method` exact, `/service` prefix, a
//! method-only or RegularExpression match a regular expression), so both kinds rank
//! together by the one ranking above: a gRPC call goes to the most specific match of
//! either kind.

use std::collections::{BTreeSet, HashMap, HashSet};

use bulwark_proto::v1 as proto;

use super::diagnostics::Diagnostic;
use crate::model::http_route::{self as route, HttpRoute, ParentRef};
use crate::model::{Kind, Model, ObjectName, Protocol, Service, ServicePort};

/// The routes attached to each service (namespace, name), with the parent reference
/// that attaches them.
pub(super) struct Attached<'a> {
    by_service: HashMap<(&'a str, &'a str), Vec<Attachment<'a>>>,
}

/// A route of some kind, attached by one of its parent references.
type Attachment<'a> = (Kind, &'a HttpRoute, &'a ParentRef);

impl<'a> Attached<'a> {
    /// Attaches every route of the model, reporting parents and backends that do not
    /// resolve.
    pub(super) fn new(model: &'a Model, diagnostics: &mut BTreeSet<Diagnostic>) -> Self {
        let mut by_service: HashMap<_, Vec<_>> = HashMap::new();
        let routes = Kind::ROUTES.into_iter().flat_map(|kind| {
            model
                .routes(kind)
                .into_iter()
                .flat_map(move |routes| routes.values().map(move |r| (kind, r)))
        });
        for (kind, r) in routes {
            let namespace = r.name.namespace.as_str();
            for parent in &r.parents {
                match model
                    .services
                    .get(&ObjectName::new(namespace, parent.service.as_str()))
                {
                    None => {
                        diagnostics.insert(Diagnostic::MissingService {
                            kind,
                            policy: r.name.clone(),
                            service: parent.service.clone(),
                        });
                    }
                    Some(service) => {
                        if !service
                            .ports
                            .iter()
                            .any(|p| p.protocol == Protocol::Tcp && parent.covers(p.port, &p.name))
                        {
                            diagnostics.insert(Diagnostic::MissingSection {
                                kind,
                                policy: r.name.clone(),
                                service: parent.service.clone(),
                                section: describe_parent(parent),
                            });
                        }
                    }
                }
                by_service
                    .entry((namespace, parent.service.as_str()))
                    .or_default()
                    .push((kind, r, parent));
            }
            for rule in &r.rules {
                for backend in &rule.backends {
                    let resolved = model
                        .services
                        .get(&ObjectName::new(namespace, backend.service.as_str()))
                        .is_some_and(|s| {
                            s.ports
                                .iter()
                                .any(|p| p.protocol == Protocol::Tcp && p.port == backend.port)
                        });
                    if !resolved {
                        diagnostics.insert(Diagnostic::UnresolvedBackend {
                            kind,
                            route: r.name.clone(),
                            service: backend.service.clone(),
                            port: backend.port,
                        });
                    }
                }
            }
        }
        Attached { by_service }
    }

    /// The wire rules of one port of `service`, in precedence order.
    pub(super) fn rules(&self, service: &Service, port: &ServicePort) -> Vec<proto::HttpRouteRule> {
        let key = (service.name.namespace.as_str(), service.name.name.as_str());
        let Some(attached) = self.by_service.get(&key) else {
            return Vec::new();
        };
        // A route attached twice to the same port (by name and by number) counts once.
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        for &(kind, r, parent) in attached {
            if !parent.covers(port.port, &port.name) || !seen.insert((kind, &r.name)) {
                continue;
            }
            for (rule_index, rule) in r.rules.iter().enumerate() {
                for (match_index, m) in rule.matches.iter().enumerate() {
                    entries.push(Entry {
                        kind,
                        route: r,
                        rule_index,
                        match_index,
                        rule,
                        m,
                    });
                }
            }
        }
        entries.sort_by(|a, b| {
            a.m.precedence(b.m)
                .then_with(|| {
                    (a.route.created.is_none(), a.route.created)
                        .cmp(&(b.route.created.is_none(), b.route.created))
                })
                .then_with(|| a.route.name.cmp(&b.route.name))
                .then_with(|| a.kind.cmp(&b.kind))
                .then_with(|| (a.rule_index, a.match_index).cmp(&(b.rule_index, b.match_index)))
        });
        entries
            .into_iter()
            .map(|e| wire_rule(&e, service, port))
            .collect()
    }
}

struct Entry<'a> {
    kind: Kind,
    route: &'a HttpRoute,
    rule_index: usize,
    match_index: usize,
    rule: &'a route::Rule,
    m: &'a route::Match,
}

fn describe_parent(parent: &ParentRef) -> String {
    match (&parent.section, parent.port) {
        (Some(s), Some(p)) => format!("{s} (port {p})"),
        (Some(s), None) => s.clone(),
        (None, Some(p)) => format!("port {p}"),
        (None, None) => String::new(),
    }
}

fn wire_rule(e: &Entry<'_>, service: &Service, port: &ServicePort) -> proto::HttpRouteRule {
    let namespace = &e.route.name.namespace;
    // GAMMA: a rule without backends sends its requests to the parent Service.
    let backends = if e.rule.backends.is_empty() {
        vec![proto::HttpBackend {
            namespace: service.name.namespace.clone(),
            name: service.name.name.clone(),
            port: u32::from(port.port),
            weight: 1,
        }]
    } else {
        e.rule
            .backends
            .iter()
            .map(|b| proto::HttpBackend {
                namespace: namespace.clone(),
                name: b.service.clone(),
                port: u32::from(b.port),
                weight: b.weight,
            })
            .collect()
    };
    proto::HttpRouteRule {
        // `namespace/name` for an HTTPRoute (as before GRPCRoutes), `GRPCRoute
        // namespace/name` for a GRPCRoute: the agent's metrics and admin page tell them
        // apart.
        source: match e.kind {
            Kind::GrpcRoute => format!("{} {}", e.kind, e.route.name),
            _ => e.route.name.to_string(),
        },
        rule_index: u32::try_from(e.rule_index).unwrap_or(u32::MAX),
        matches: vec![wire_match(e.m)],
        backends,
        request_header_modifier: e.rule.request_headers.as_ref().map(|m| {
            let pairs = |list: &[(String, String)]| {
                list.iter()
                    .map(|(name, value)| proto::HttpHeader {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect()
            };
            proto::HttpHeaderModifier {
                set: pairs(&m.set),
                add: pairs(&m.add),
                remove: m.remove.clone(),
            }
        }),
    }
}

fn wire_match(m: &route::Match) -> proto::HttpRouteMatch {
    use proto::http_header_match::Type as HeaderType;
    use proto::http_path_match::Type as PathType;
    let (kind, value) = match &m.path {
        route::PathMatch::Exact(v) => (PathType::Exact, v),
        route::PathMatch::Prefix(v) => (PathType::Prefix, v),
        route::PathMatch::Regex(v) => (PathType::RegularExpression, v),
    };
    proto::HttpRouteMatch {
        path: Some(proto::HttpPathMatch {
            r#type: kind as i32,
            value: value.clone(),
        }),
        headers: m
            .headers
            .iter()
            .map(|h| {
                let (kind, value) = match &h.value {
                    route::ValueMatch::Exact(v) => (HeaderType::Exact, v),
                    route::ValueMatch::Regex(v) => (HeaderType::RegularExpression, v),
                };
                proto::HttpHeaderMatch {
                    r#type: kind as i32,
                    name: h.name.clone(),
                    value: value.clone(),
                }
            })
            .collect(),
        method: m.method.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;
