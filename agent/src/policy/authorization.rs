//! Authorization: whether a caller may make a request to this pod, or open an opaque TCP
//! connection to it, from the caller's mutual-TLS identity and (for HTTP) the request's
//! method, path and headers.
//!
//! A pod with no policy on a port allows every caller there. With any `Enforce` policy
//! on the port, a request is allowed only when some rule of an enforcing policy holds;
//! `Shadow` policies are evaluated beside them and only say what they would deny. A
//! caller without a mesh identity (plaintext in Permissive mode) matches only rules
//! with no `from`.
//!
//! An opaque TCP connection goes through the same rules ([`Authorization::check_tcp`]),
//! as Istio does: it has no method, path or header, so a rule that asks for any of them
//! (a `to` entry with methods or paths, any `when`) cannot hold for it, and only rules
//! that need nothing but the caller can allow it. One evaluation serves both ([`Access`]).
//!
//! The check reads the config and the request; it allocates nothing and takes no lock.

use bulwark_proto::v1;
use http::HeaderMap;

/// A caller's verified SPIFFE ID, split once per connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerId {
    uri: String,
    // Byte ranges of the three names within `uri`.
    trust_domain: (usize, usize),
    namespace: (usize, usize),
    service_account: (usize, usize),
}

impl PeerId {
    /// Splits `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else is no mesh identity.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        if td.is_empty() || ns.is_empty() || sa.is_empty() {
            return None;
        }
        let td_start = "spiffe://".len();
        let ns_start = td_start + td.len() + "/ns/".len();
        let sa_start = ns_start + ns.len() + "/sa/".len();
        Some(PeerId {
            uri: uri.to_owned(),
            trust_domain: (td_start, td_start + td.len()),
            namespace: (ns_start, ns_start + ns.len()),
            service_account: (sa_start, sa_start + sa.len()),
        })
    }

    /// The whole SPIFFE ID.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.uri[self.trust_domain.0..self.trust_domain.1]
    }

    /// The caller's namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace.0..self.namespace.1]
    }

    /// The caller's ServiceAccount.
    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account.0..self.service_account.1]
    }
}

/// An authorization section the agent cannot enforce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAuthorization {
    /// A path condition has no kind.
    #[error("policy {policy}: rules[{rule}].to[{op}].paths[{path}] has neither exact nor prefix")]
    EmptyPath {
        /// The policy.
        policy: String,
        /// Rule index.
        rule: usize,
        /// Operation index.
        op: usize,
        /// Path index.
        path: usize,
    },
    /// A port is out of range.
    #[error("policy {policy}: port {port} is not a TCP port")]
    Port {
        /// The policy.
        policy: String,
        /// The value.
        port: u32,
    },
    /// A method is not an HTTP method token.
    #[error("policy {policy}: {method:?} is not an HTTP method")]
    Method {
        /// The policy.
        policy: String,
        /// The value.
        method: String,
    },
    /// A header name is not valid.
    #[error("policy {policy}: {name:?} is not a header name")]
    Header {
        /// The policy.
        policy: String,
        /// The name.
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    Any,
    Exact(Box<str>),
}

impl Name {
    fn new(value: &str) -> Self {
        if value == "*" {
            Name::Any
        } else {
            Name::Exact(value.into())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Name::Any => true,
            Name::Exact(exact) => &**exact == value,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    trust_domain: Name,
    namespace: Name,
    service_account: Name,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Path {
    Exact(Box<str>),
    Prefix(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Operation {
    methods: Vec<http::Method>,
    paths: Vec<Path>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    name: http::HeaderName,
    values: Vec<Box<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Policy {
    source: Box<str>,
    ports: Vec<u16>,
    shadow: bool,
    rules: Vec<Rule>,
}

/// The authorization policies of this pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorization {
    policies: Vec<Policy>,
}

/// What is being authorized: an HTTP request, or an opaque TCP connection, which has
/// none of a request's attributes.
#[derive(Clone, Copy, Debug)]
pub enum Access<'r> {
    /// An HTTP request; `path` is without the query.
    Http {
        /// The method.
        method: &'r http::Method,
        /// The path, without the query.
        path: &'r str,
        /// The headers.
        headers: &'r HeaderMap,
    },
    /// An opaque TCP connection (plaintext, or mutual TLS with ALPN `bulwark-tcp`).
    Tcp,
}

/// What the policies say of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// No policy protects the port.
    Unprotected,
    /// An enforcing rule allows it; `shadow_denied` names a shadow policy that would
    /// have denied it, if any.
    Allowed {
        /// A shadow policy that would deny the request.
        shadow_denied: Option<&'a str>,
    },
    /// No enforcing rule allows it: answer 403 unauthorized.
    Denied {
        /// The first enforcing policy on the port (for the metric and log).
        policy: &'a str,
    },
}

impl TryFrom<&[v1::AuthorizationPolicy]> for Authorization {
    type Error = InvalidAuthorization;

    fn try_from(protos: &[v1::AuthorizationPolicy]) -> Result<Self, Self::Error> {
        let mut policies = Vec::with_capacity(protos.len());
        for proto in protos {
            let policy = proto.source.as_str();
            let ports = proto
                .ports
                .iter()
                .map(|&p| {
                    u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                        InvalidAuthorization::Port {
                            policy: policy.to_owned(),
                            port: p,
                        }
                    })
                })
                .collect::<Result<_, _>>()?;
            let mut rules = Vec::with_capacity(proto.rules.len());
            for (r, rule) in proto.rules.iter().enumerate() {
                let from = rule
                    .from
                    .iter()
                    .map(|s| Source {
                        trust_domain: Name::new(&s.trust_domain),
                        namespace: Name::new(&s.namespace),
                        service_account: Name::new(&s.service_account),
                    })
                    .collect();
                let mut to = Vec::with_capacity(rule.to.len());
                for (o, op) in rule.to.iter().enumerate() {
                    // A method that does not parse is refused, never dropped: dropping
                    // the last one would widen the rule to every method.
                    let methods = op
                        .methods
                        .iter()
                        .map(|m| {
                            http::Method::from_bytes(m.as_bytes()).map_err(|_| {
                                InvalidAuthorization::Method {
                                    policy: policy.to_owned(),
                                    method: m.clone(),
                                }
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    let mut paths = Vec::with_capacity(op.paths.len());
                    for (p, path) in op.paths.iter().enumerate() {
                        paths.push(match &path.kind {
                            Some(v1::path_match::Kind::Exact(e)) => Path::Exact(e.as_str().into()),
                            Some(v1::path_match::Kind::Prefix(e)) => {
                                Path::Prefix(e.as_str().into())
                            }
                            None => {
                                return Err(InvalidAuthorization::EmptyPath {
                                    policy: policy.to_owned(),
                                    rule: r,
                                    op: o,
                                    path: p,
                                });
                            }
                        });
                    }
                    to.push(Operation { methods, paths });
                }
                let when = rule
                    .when
                    .iter()
                    .map(|c| {
                        let name =
                            http::HeaderName::from_bytes(c.name.as_bytes()).map_err(|_| {
                                InvalidAuthorization::Header {
                                    policy: policy.to_owned(),
                                    name: c.name.clone(),
                                }
                            })?;
                        Ok(Condition {
                            name,
                            values: c.values.iter().map(|v| v.as_str().into()).collect(),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                rules.push(Rule { from, to, when });
            }
            policies.push(Policy {
                source: policy.into(),
                ports,
                shadow: proto.shadow,
                rules,
            });
        }
        Ok(Authorization { policies })
    }
}

impl Source {
    fn matches(&self, peer: &PeerId) -> bool {
        self.trust_domain.matches(peer.trust_domain())
            && self.namespace.matches(peer.namespace())
            && self.service_account.matches(peer.service_account())
    }
}

impl Operation {
    /// A TCP connection has no method and no path: only an operation that asks for
    /// neither holds for it.
    fn matches(&self, access: Access<'_>) -> bool {
        let (method, path) = match access {
            Access::Http { method, path, .. } => (Some(method), Some(path)),
            Access::Tcp => (None, None),
        };
        (self.methods.is_empty() || method.is_some_and(|m| self.methods.contains(m)))
            && (self.paths.is_empty()
                || path.is_some_and(|path| {
                    self.paths.iter().any(|p| match p {
                        Path::Exact(e) => &**e == path,
                        Path::Prefix(prefix) => path.starts_with(&**prefix),
                    })
                }))
    }
}

impl Condition {
    /// A TCP connection carries no header, so no header condition holds for it.
    fn holds(&self, access: Access<'_>) -> bool {
        let Access::Http { headers, .. } = access else {
            return false;
        };
        headers.get_all(&self.name).iter().any(|v| {
            self.values
                .iter()
                .any(|want| v.as_bytes() == want.as_bytes())
        })
    }
}

impl Rule {
    fn allows(&self, peer: Option<&PeerId>, access: Access<'_>) -> bool {
        let from =
            self.from.is_empty() || peer.is_some_and(|p| self.from.iter().any(|s| s.matches(p)));
        from && (self.to.is_empty() || self.to.iter().any(|o| o.matches(access)))
            && self.when.iter().all(|c| c.holds(access))
    }
}

impl Policy {
    fn applies_to(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }

    fn allows(&self, peer: Option<&PeerId>, access: Access<'_>) -> bool {
        self.rules.iter().any(|r| r.allows(peer, access))
    }
}

impl Authorization {
    /// Whether no policy is configured at all (the step can be skipped).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The decision for an HTTP request on local `port` from `peer` (None: no mesh
    /// identity). `path` is the path without the query.
    pub fn check(
        &self,
        port: u16,
        peer: Option<&PeerId>,
        method: &http::Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Decision<'_> {
        self.decide(
            port,
            peer,
            Access::Http {
                method,
                path,
                headers,
            },
        )
    }

    /// The decision for an opaque TCP connection to local `port` from `peer` (None: no
    /// mesh identity): only rules that need nothing but the caller can allow it.
    pub fn check_tcp(&self, port: u16, peer: Option<&PeerId>) -> Decision<'_> {
        self.decide(port, peer, Access::Tcp)
    }

    /// The decision for `access` on local `port` from `peer`: the one evaluation behind
    /// [`Authorization::check`] and [`Authorization::check_tcp`].
    pub fn decide(&self, port: u16, peer: Option<&PeerId>, access: Access<'_>) -> Decision<'_> {
        let mut enforcing: Option<&str> = None;
        let mut allowed = false;
        let mut shadow_denied = None;
        for policy in self.policies.iter().filter(|p| p.applies_to(port)) {
            let allows = policy.allows(peer, access);
            if policy.shadow {
                if !allows && shadow_denied.is_none() {
                    shadow_denied = Some(&*policy.source);
                }
            } else {
                enforcing.get_or_insert(&*policy.source);
                allowed |= allows;
            }
        }
        match enforcing {
            Some(policy) if !allowed => Decision::Denied { policy },
            None if shadow_denied.is_none() => Decision::Unprotected,
            _ => Decision::Allowed { shadow_denied },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn source(td: &str, ns: &str, sa: &str) -> v1::SourceMatch {
        v1::SourceMatch {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    fn exact(p: &str) -> v1::PathMatch {
        v1::PathMatch {
            kind: Some(v1::path_match::Kind::Exact(p.into())),
        }
    }

    fn prefix(p: &str) -> v1::PathMatch {
        v1::PathMatch {
            kind: Some(v1::path_match::Kind::Prefix(p.into())),
        }
    }

    /// payments: orders may POST /charge and anything under /refund/; monitoring may GET
    /// /metrics; tenant acme's requests from checkout anywhere.
    fn payments(shadow: bool) -> v1::AuthorizationPolicy {
        v1::AuthorizationPolicy {
            source: "shop/payments".into(),
            ports: vec![8080],
            shadow,
            rules: vec![
                v1::AuthorizationRule {
                    from: vec![source("*", "shop", "orders")],
                    to: vec![v1::OperationMatch {
                        methods: vec!["POST".into()],
                        paths: vec![exact("/charge"), prefix("/refund/")],
                    }],
                    when: vec![],
                },
                v1::AuthorizationRule {
                    from: vec![source("*", "monitoring", "*")],
                    to: vec![v1::OperationMatch {
                        methods: vec!["GET".into()],
                        paths: vec![exact("/metrics")],
                    }],
                    when: vec![],
                },
                v1::AuthorizationRule {
                    from: vec![source("cluster.local", "*", "checkout")],
                    to: vec![],
                    when: vec![v1::HeaderCondition {
                        name: "x-tenant".into(),
                        values: vec!["acme".into()],
                    }],
                },
            ],
        }
    }

    fn peer(ns: &str, sa: &str) -> PeerId {
        PeerId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap()
    }

    fn check<'a>(
        authz: &'a Authorization,
        peer: Option<&PeerId>,
        method: Method,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Decision<'a> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, v.parse().unwrap());
        }
        authz.check(8080, peer, &method, path, &map)
    }

    #[test]
    fn allows_only_what_a_rule_allows() {
        let authz = Authorization::try_from(&[payments(false)][..]).unwrap();
        let orders = peer("shop", "orders");
        let allowed = Decision::Allowed {
            shadow_denied: None,
        };
        let denied = Decision::Denied {
            policy: "shop/payments",
        };
        assert_eq!(
            check(&authz, Some(&orders), Method::POST, "/charge", &[]),
            allowed
        );
        assert_eq!(
            check(&authz, Some(&orders), Method::POST, "/refund/7", &[]),
            allowed
        );
        assert_eq!(
            check(&authz, Some(&orders), Method::GET, "/charge", &[]),
            denied
        );
        assert_eq!(
            check(&authz, Some(&orders), Method::POST, "/charge/x", &[]),
            denied
        );
        assert_eq!(
            check(
                &authz,
                Some(&peer("shop", "reviews")),
                Method::POST,
                "/charge",
                &[]
            ),
            denied
        );
        assert_eq!(
            check(
                &authz,
                Some(&peer("monitoring", "prometheus")),
                Method::GET,
                "/metrics",
                &[]
            ),
            allowed
        );
        assert_eq!(
            check(&authz, None, Method::GET, "/metrics", &[]),
            denied,
            "no identity"
        );
        let checkout = peer("web", "checkout");
        assert_eq!(
            check(
                &authz,
                Some(&checkout),
                Method::DELETE,
                "/x",
                &[("x-tenant", "acme")]
            ),
            allowed
        );
        assert_eq!(
            check(
                &authz,
                Some(&checkout),
                Method::DELETE,
                "/x",
                &[("x-tenant", "globex")]
            ),
            denied
        );
        // Another port of the pod is not protected.
        assert_eq!(
            authz.check(9090, None, &Method::GET, "/", &HeaderMap::new()),
            Decision::Unprotected
        );
        assert_eq!(
            Authorization::default().check(8080, None, &Method::GET, "/", &HeaderMap::new()),
            Decision::Unprotected
        );
    }

    #[test]
    fn shadow_policies_report_without_denying() {
        let authz = Authorization::try_from(&[payments(true)][..]).unwrap();
        let reviews = peer("shop", "reviews");
        assert_eq!(
            check(&authz, Some(&reviews), Method::POST, "/charge", &[]),
            Decision::Allowed {
                shadow_denied: Some("shop/payments")
            }
        );
        assert_eq!(
            check(
                &authz,
                Some(&peer("shop", "orders")),
                Method::POST,
                "/charge",
                &[]
            ),
            Decision::Unprotected,
            "a shadow policy that allows changes nothing"
        );
    }

    #[test]
    fn a_policy_with_no_rules_denies_everything_and_rules_of_enforcing_policies_add_up() {
        let deny_all = v1::AuthorizationPolicy {
            source: "shop/deny-all".into(),
            ports: vec![],
            shadow: false,
            rules: vec![],
        };
        let authz = Authorization::try_from(&[deny_all.clone()][..]).unwrap();
        assert_eq!(
            check(&authz, Some(&peer("shop", "orders")), Method::GET, "/", &[]),
            Decision::Denied {
                policy: "shop/deny-all"
            }
        );
        let both = Authorization::try_from(&[deny_all, payments(false)][..]).unwrap();
        assert_eq!(
            check(
                &both,
                Some(&peer("shop", "orders")),
                Method::POST,
                "/charge",
                &[]
            ),
            Decision::Allowed {
                shadow_denied: None
            },
            "any enforcing policy's rule allows"
        );
    }

    #[test]
    fn a_tcp_connection_is_allowed_only_by_rules_that_need_nothing_but_the_caller() {
        // payments' rules all need HTTP (a method and path, or a header): no TCP at all.
        let http_only = Authorization::try_from(&[payments(false)][..]).unwrap();
        let denied = Decision::Denied {
            policy: "shop/payments",
        };
        for caller in [
            peer("shop", "orders"),
            peer("monitoring", "prometheus"),
            peer("web", "checkout"),
        ] {
            assert_eq!(
                http_only.check_tcp(8080, Some(&caller)),
                denied,
                "{}",
                caller.as_str()
            );
        }
        let allowed = Decision::Allowed {
            shadow_denied: None,
        };
        // A rule of the caller alone, and one whose operation names nothing.
        let mut mixed = payments(false);
        mixed.rules.push(v1::AuthorizationRule {
            from: vec![source("*", "batch", "*")],
            to: vec![],
            when: vec![],
        });
        mixed.rules.push(v1::AuthorizationRule {
            from: vec![source("*", "shop", "reports")],
            to: vec![v1::OperationMatch {
                methods: vec![],
                paths: vec![],
            }],
            when: vec![],
        });
        let mixed = Authorization::try_from(&[mixed][..]).unwrap();
        assert_eq!(
            mixed.check_tcp(8080, Some(&peer("batch", "nightly"))),
            allowed
        );
        assert_eq!(
            mixed.check_tcp(8080, Some(&peer("shop", "reports"))),
            allowed
        );
        assert_eq!(mixed.check_tcp(8080, Some(&peer("shop", "orders"))), denied);
        assert_eq!(mixed.check_tcp(8080, None), denied, "no identity");
        // The same rules still serve HTTP as before.
        assert_eq!(
            check(
                &mixed,
                Some(&peer("shop", "orders")),
                Method::POST,
                "/charge",
                &[]
            ),
            allowed
        );
        // A rule with no `from` is the only one a caller without an identity matches.
        let open = Authorization::try_from(
            &[v1::AuthorizationPolicy {
                source: "shop/open".into(),
                ports: vec![5432],
                shadow: false,
                rules: vec![v1::AuthorizationRule::default()],
            }][..],
        )
        .unwrap();
        assert_eq!(open.check_tcp(5432, None), allowed);
        assert_eq!(
            open.check_tcp(6379, None),
            Decision::Unprotected,
            "another port"
        );
        assert_eq!(
            Authorization::default().check_tcp(5432, None),
            Decision::Unprotected,
            "no policy allows all"
        );
    }

    #[test]
    fn shadow_and_deny_all_policies_judge_tcp_as_they_judge_http() {
        let shadow = Authorization::try_from(&[payments(true)][..]).unwrap();
        assert_eq!(
            shadow.check_tcp(8080, Some(&peer("shop", "orders"))),
            Decision::Allowed {
                shadow_denied: Some("shop/payments")
            }
        );
        let deny_all = Authorization::try_from(
            &[v1::AuthorizationPolicy {
                source: "shop/deny-all".into(),
                ports: vec![],
                shadow: false,
                rules: vec![],
            }][..],
        )
        .unwrap();
        assert_eq!(
            deny_all.check_tcp(1, Some(&peer("shop", "orders"))),
            Decision::Denied {
                policy: "shop/deny-all"
            }
        );
    }

    #[test]
    fn peer_ids_split_once_and_refuse_other_forms() {
        let p = PeerId::parse("spiffe://td/ns/shop/sa/orders").unwrap();
        assert_eq!(
            (p.trust_domain(), p.namespace(), p.service_account()),
            ("td", "shop", "orders")
        );
        for bad in [
            "spiffe://td/ns/shop",
            "spiffe://td/ns//sa/x",
            "spiffe://td/ns/a/sa/b/c",
            "https://td/ns/a/sa/b",
        ] {
            assert_eq!(PeerId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn what_the_agent_cannot_enforce_is_refused() {
        let mut bad = payments(false);
        bad.rules[0].to[0].paths.push(v1::PathMatch { kind: None });
        let error = Authorization::try_from(&[bad][..]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "policy shop/payments: rules[0].to[0].paths[2] has neither exact nor prefix"
        );
        let mut port = payments(false);
        port.ports = vec![70000];
        assert!(Authorization::try_from(&[port][..]).is_err());
        let mut method = payments(false);
        method.rules[0].to[0].methods = vec!["PO ST".into()];
        assert!(matches!(
            Authorization::try_from(&[method][..]),
            Err(InvalidAuthorization::Method { .. })
        ));
    }
}
