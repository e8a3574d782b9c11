//! `AuthorizationPolicy` (`bulwark.io/v1alpha1`): who may call a workload, enforced by
//! the inbound side of its pods' agents from the caller's mutual-TLS identity.

use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;
use super::shard::SelectorSpec;
use super::{FieldError, field, item, target};
use crate::model::authorization as model;

/// Most rules in one policy.
pub const MAX_RULES: usize = 64;
/// Most entries in one rule's `from`, `to` or `when`.
pub const MAX_ENTRIES: usize = 32;

/// An `AuthorizationPolicy` document as the folder source reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct AuthorizationPolicyDocument {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, required.
    pub spec: Option<AuthorizationPolicySpec>,
}

/// Who may call the protected workloads: allow rules over the caller's workload
/// identity (its ServiceAccount, from mutual TLS), the path, the method and headers. A
/// workload with no policy allows every caller; with any policy, it denies what no
/// rule allows (403 with x-bulwark-reason unauthorized). `mode: Shadow` counts what it
/// would deny without denying. Opaque TCP connections are judged by the caller alone:
/// only rules without `to` operations and `when` conditions can allow them.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, kube::CustomResource)]
#[kube(
    group = "bulwark.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    doc = "An AuthorizationPolicy: which callers, paths, methods and headers the protected workloads accept.",
    status = "super::status::PolicyStatus",
    shortname = "azp",
    category = "bulwark",
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".spec.targetRefs[*].name","description":"the Services whose pods the policy protects"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].status","description":"whether the control plane applies the policy"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.targetRefs) ? !has(self.selector) : has(self.selector)",
    "message": "give exactly one of targetRefs and selector",
}]))]
pub struct AuthorizationPolicySpec {
    /// The Services (or single ports of them, with `sectionName`) whose pods the policy
    /// protects, in the policy's namespace. Exactly one of targetRefs and selector.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Option<Vec<target::TargetRef>>,
    /// The pods the policy protects, by label, in the policy's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorSpec>,
    /// Enforce (deny what no rule allows) or Shadow (count it, deny nothing). Default
    /// Enforce.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Enforce"))]
    pub mode: Option<ModeSpec>,
    /// The allow rules; a request is allowed when any rule holds for it. An empty list
    /// allows nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub rules: Option<Vec<RuleSpec>>,
}

/// `spec.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum ModeSpec {
    /// Deny what no rule allows.
    Enforce,
    /// Count what would be denied; deny nothing.
    Shadow,
}

/// One allow rule: it holds when the caller is one of `from`, the request is one of
/// `to`, and every condition of `when` holds. A missing part holds for every request.
/// A rule naming methods, paths or headers never allows an opaque TCP connection.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// The callers; absent: any caller, including ones without a mesh identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub from: Option<Vec<SourceSpec>>,
    /// The operations; absent: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub to: Option<Vec<OperationSpec>>,
    /// Header conditions, all of which must hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub when: Option<Vec<HeaderSpec>>,
}

/// A caller: a ServiceAccount (in `namespace`, default the policy's), every workload of
/// a namespace, or a SPIFFE ID pattern. `*` matches any one name.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    // `namespace` is a CEL keyword: the API server reads the field as `__namespace__`.
    "rule": "has(self.identity) ? !has(self.serviceAccount) && !has(self.__namespace__) : has(self.serviceAccount) || has(self.__namespace__)",
    "message": "give identity alone, or serviceAccount and/or namespace",
}]))]
pub struct SourceSpec {
    /// The caller's ServiceAccount name, or `*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account: Option<String>,
    /// The caller's namespace, or `*`. Default: the policy's namespace when
    /// serviceAccount is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// A SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, where
    /// any of the three names may be `*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub identity: Option<String>,
}

/// Operations: methods and paths; a missing list allows any.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationSpec {
    /// HTTP methods in upper case (gRPC calls are POST).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 16),
        inner(regex(pattern = "^[A-Z]+$"), length(max = 32))
    )]
    pub methods: Option<Vec<String>>,
    /// Paths: exact (`/charge`), or a prefix ending in `*` (`/api/*`, `/pkg.Svc/*`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 32),
        inner(regex(pattern = "^/"), length(max = 1024))
    )]
    pub paths: Option<Vec<String>>,
}

/// A header the request must carry, with one of `values`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderSpec {
    /// The header name (lower case). Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub name: Option<String>,
    /// Allowed values, compared exactly. At least one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16), inner(length(max = 1024)))]
    pub values: Option<Vec<String>>,
}

impl TryFrom<AuthorizationPolicyDocument> for model::AuthorizationPolicy {
    type Error = FieldError;

    fn try_from(policy: AuthorizationPolicyDocument) -> Result<Self, FieldError> {
        let name = policy.metadata.object_name()?;
        let spec = policy.spec.ok_or_else(|| FieldError::required("spec"))?;
        spec.validate(name, policy.metadata.creation_timestamp)
    }
}

impl AuthorizationPolicySpec {
    /// Checks the spec (every rule, CEL ones included) and applies the defaults.
    pub fn validate(
        self,
        name: crate::model::ObjectName,
        created: Option<crate::timestamp::Timestamp>,
    ) -> Result<model::AuthorizationPolicy, FieldError> {
        let attachment = match (self.target_refs, self.selector) {
            (Some(refs), None) => {
                model::Attachment::Targets(target::validate(Some(refs), "spec.targetRefs")?)
            }
            (None, Some(selector)) => {
                let labels = selector.checked_labels("spec.selector.matchLabels")?;
                if labels.is_empty() {
                    return Err(FieldError::new(
                        "spec.selector.matchLabels",
                        "needs at least one label (an empty selector would protect every pod of \
                         the namespace; say so with one policy per Service instead)",
                    ));
                }
                model::Attachment::Selector(labels)
            }
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "spec",
                    "give exactly one of targetRefs and selector, not both",
                ));
            }
            (None, None) => {
                return Err(FieldError::new(
                    "spec",
                    "give exactly one of targetRefs and selector",
                ));
            }
        };
        let mode = match self.mode.unwrap_or(ModeSpec::Enforce) {
            ModeSpec::Enforce => model::Mode::Enforce,
            ModeSpec::Shadow => model::Mode::Shadow,
        };
        let specs = self.rules.unwrap_or_default();
        if specs.len() > MAX_RULES {
            return Err(FieldError::new(
                "spec.rules",
                format!("holds {} rules; at most {MAX_RULES}", specs.len()),
            ));
        }
        let rules = specs
            .into_iter()
            .enumerate()
            .map(|(i, rule)| rule.validate(&item("spec.rules", i), &name.namespace))
            .collect::<Result<_, _>>()?;
        Ok(model::AuthorizationPolicy {
            name,
            created,
            attachment,
            mode,
            rules,
        })
    }
}

/// Refuses an empty list (write the part out to match anything) or one over the cap.
fn entries<T>(list: Option<Vec<T>>, path: &str) -> Result<Vec<T>, FieldError> {
    match list {
        None => Ok(Vec::new()),
        Some(list) if list.is_empty() => Err(FieldError::new(
            path,
            "must not be empty (leave it out to match every request)",
        )),
        Some(list) if list.len() > MAX_ENTRIES => Err(FieldError::new(
            path,
            format!("holds {} entries; at most {MAX_ENTRIES}", list.len()),
        )),
        Some(list) => Ok(list),
    }
}

impl RuleSpec {
    fn validate(self, path: &str, namespace: &str) -> Result<model::AuthorizationRule, FieldError> {
        let from_path = field(path, "from");
        let from = entries(self.from, &from_path)?
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.validate(&item(&from_path, i), namespace))
            .collect::<Result<_, _>>()?;
        let to_path = field(path, "to");
        let to = entries(self.to, &to_path)?
            .into_iter()
            .enumerate()
            .map(|(i, o)| o.validate(&item(&to_path, i)))
            .collect::<Result<_, _>>()?;
        let when_path = field(path, "when");
        let when = entries(self.when, &when_path)?
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.validate(&item(&when_path, i)))
            .collect::<Result<_, _>>()?;
        Ok(model::AuthorizationRule { from, to, when })
    }
}

/// A DNS label (namespace) or subdomain (service account), or `*`.
fn name(value: &str, path: &str, subdomain: bool) -> Result<model::NamePattern, FieldError> {
    let label = |s: &str| {
        (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let valid = value == "*"
        || if subdomain {
            value.len() <= 253 && value.split('.').all(label)
        } else {
            label(value)
        };
    if valid {
        Ok(model::NamePattern::parse(value))
    } else {
        Err(FieldError::new(
            path,
            format!("{value:?} is neither a Kubernetes name nor *"),
        ))
    }
}

impl SourceSpec {
    fn validate(self, path: &str, namespace: &str) -> Result<model::SourceMatch, FieldError> {
        match (self.identity, self.service_account, self.namespace) {
            (Some(id), None, None) => identity_pattern(&id, &field(path, "identity")),
            (Some(_), _, _) => Err(FieldError::new(
                path,
                "give identity alone, or serviceAccount and/or namespace",
            )),
            (None, None, None) => Err(FieldError::new(
                path,
                "give serviceAccount, namespace or identity",
            )),
            (None, sa, ns) => Ok(model::SourceMatch {
                trust_domain: model::NamePattern::Any,
                namespace: match ns {
                    Some(ns) => name(&ns, &field(path, "namespace"), false)?,
                    // A service account alone is one of the policy's namespace.
                    None => model::NamePattern::Exact(namespace.to_owned()),
                },
                service_account: match sa {
                    Some(sa) => name(&sa, &field(path, "serviceAccount"), true)?,
                    None => model::NamePattern::Any,
                },
            }),
        }
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` with `*` for any of the three names.
fn identity_pattern(value: &str, path: &str) -> Result<model::SourceMatch, FieldError> {
    let invalid = || {
        FieldError::new(
            path,
            format!(
                "{value:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> \
                 (each name may be *)"
            ),
        )
    };
    let rest = value.strip_prefix("spiffe://").ok_or_else(invalid)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
        return Err(invalid());
    };
    let td_ok = *td == "*"
        || (!td.is_empty()
            && td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            }));
    if !td_ok {
        return Err(invalid());
    }
    Ok(model::SourceMatch {
        trust_domain: model::NamePattern::parse(td),
        namespace: name(ns, path, false).map_err(|_| invalid())?,
        service_account: name(sa, path, true).map_err(|_| invalid())?,
    })
}

impl OperationSpec {
    fn validate(self, path: &str) -> Result<model::OperationMatch, FieldError> {
        let methods_path = field(path, "methods");
        let methods = entries(self.methods, &methods_path)?;
        for (i, m) in methods.iter().enumerate() {
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(FieldError::new(
                    item(&methods_path, i),
                    format!("{m:?} is not an HTTP method in upper case"),
                ));
            }
        }
        let paths_path = field(path, "paths");
        let paths = entries(self.paths, &paths_path)?
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let at = item(&paths_path, i);
                if !p.starts_with('/') || p.len() > 1024 {
                    return Err(FieldError::new(
                        at,
                        format!("{p:?} must start with / (at most 1024 characters)"),
                    ));
                }
                match p.strip_suffix('*') {
                    Some(prefix) if prefix.contains('*') => Err(FieldError::new(
                        at,
                        "only a trailing * is allowed (a prefix match)",
                    )),
                    Some(prefix) => Ok(model::PathMatch::Prefix(prefix.to_owned())),
                    None if p.contains('*') => Err(FieldError::new(
                        at,
                        "only a trailing * is allowed (a prefix match)",
                    )),
                    None => Ok(model::PathMatch::Exact(p)),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(model::OperationMatch { methods, paths })
    }
}

impl HeaderSpec {
    fn validate(self, path: &str) -> Result<model::HeaderCondition, FieldError> {
        let name_path = field(path, "name");
        let name = self.name.ok_or_else(|| FieldError::required(&name_path))?;
        let valid = http::HeaderName::from_str(&name).is_ok()
            && !name.bytes().any(|b| b.is_ascii_uppercase());
        if !valid {
            return Err(FieldError::new(
                name_path,
                format!("{name:?} is not a lowercase HTTP header name"),
            ));
        }
        let values = self.values.unwrap_or_default();
        if values.is_empty() {
            return Err(FieldError::new(
                field(path, "values"),
                "needs at least one value",
            ));
        }
        Ok(model::HeaderCondition { name, values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{NamePattern::*, PathMatch, SourceMatch};

    fn policy(spec: &str) -> Result<model::AuthorizationPolicy, FieldError> {
        let yaml = format!("metadata: {{name: pay, namespace: shop}}\nspec:\n{spec}");
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let typed: AuthorizationPolicyDocument = serde_path_to_error::deserialize(value)
            .map_err(|e| FieldError::new(e.path().to_string(), e.into_inner().to_string()))?;
        typed.try_into()
    }

    fn error(spec: &str) -> String {
        policy(spec).unwrap_err().to_string()
    }

    const TARGET: &str = "  targetRefs: [{kind: Service, name: payments}]\n";

    #[test]
    fn sources_paths_and_headers_are_read_with_defaults() {
        let p = policy(&format!(
            "{TARGET}  rules:\n\
             \x20   - from: [{{serviceAccount: orders}}, {{namespace: monitoring}}, \
             {{identity: 'spiffe://cluster.local/ns/*/sa/checkout'}}]\n\
             \x20     to: [{{methods: [POST], paths: [/charge, '/refund/*']}}]\n\
             \x20     when: [{{name: x-tenant, values: [acme]}}]\n\
             \x20   - {{}}\n"
        ))
        .unwrap();
        assert_eq!(p.mode, model::Mode::Enforce);
        assert!(
            matches!(p.attachment, model::Attachment::Targets(ref t) if t[0].service == "payments")
        );
        let rule = &p.rules[0];
        assert_eq!(
            rule.from,
            vec![
                SourceMatch {
                    trust_domain: Any,
                    namespace: Exact("shop".into()),
                    service_account: Exact("orders".into())
                },
                SourceMatch {
                    trust_domain: Any,
                    namespace: Exact("monitoring".into()),
                    service_account: Any
                },
                SourceMatch {
                    trust_domain: Exact("cluster.local".into()),
                    namespace: Any,
                    service_account: Exact("checkout".into())
                },
            ]
        );
        assert_eq!(
            rule.to[0].paths,
            vec![
                PathMatch::Exact("/charge".into()),
                PathMatch::Prefix("/refund/".into())
            ]
        );
        assert_eq!(rule.when[0].values, vec!["acme".to_owned()]);
        assert_eq!(
            p.rules[1],
            model::AuthorizationRule::default(),
            "an empty rule allows all"
        );
        let shadow =
            policy("  selector: {matchLabels: {app: payments}}\n  mode: Shadow\n").unwrap();
        assert_eq!(shadow.mode, model::Mode::Shadow);
        assert!(shadow.rules.is_empty(), "no rules: allows nothing");
    }

    #[test]
    fn each_rule_names_its_path_and_reason() {
        let cases = [
            (
                "  mode: Enforce\n".to_owned(),
                "spec: give exactly one of targetRefs and selector",
            ),
            (
                format!("{TARGET}  selector: {{matchLabels: {{a: b}}}}\n"),
                "spec: give exactly one of targetRefs and selector, not both",
            ),
            (
                "  selector: {matchLabels: {}}\n".to_owned(),
                "spec.selector.matchLabels: needs at least one label",
            ),
            (
                format!("{TARGET}  rules: [{{from: []}}]\n"),
                "spec.rules[0].from: must not be empty",
            ),
            (
                format!("{TARGET}  rules: [{{from: [{{}}]}}]\n"),
                "spec.rules[0].from[0]: give serviceAccount, namespace or identity",
            ),
            (
                format!(
                    "{TARGET}  rules: [{{from: [{{identity: 'spiffe://td/ns/a/sa/b', namespace: a}}]}}]\n"
                ),
                "spec.rules[0].from[0]: give identity alone",
            ),
            (
                format!("{TARGET}  rules: [{{from: [{{identity: 'spiffe://td/ns/a'}}]}}]\n"),
                "spec.rules[0].from[0].identity: \"spiffe://td/ns/a\" is not spiffe://",
            ),
            (
                format!("{TARGET}  rules: [{{from: [{{serviceAccount: Orders}}]}}]\n"),
                "spec.rules[0].from[0].serviceAccount: \"Orders\" is neither",
            ),
            (
                format!("{TARGET}  rules: [{{to: [{{paths: ['/a/*/b']}}]}}]\n"),
                "spec.rules[0].to[0].paths[0]: only a trailing * is allowed",
            ),
            (
                format!("{TARGET}  rules: [{{to: [{{paths: [charge]}}]}}]\n"),
                "spec.rules[0].to[0].paths[0]: \"charge\" must start with /",
            ),
            (
                format!("{TARGET}  rules: [{{to: [{{methods: [post]}}]}}]\n"),
                "spec.rules[0].to[0].methods[0]: \"post\" is not an HTTP method",
            ),
            (
                format!("{TARGET}  rules: [{{when: [{{name: X-Tenant, values: [a]}}]}}]\n"),
                "spec.rules[0].when[0].name: \"X-Tenant\" is not a lowercase",
            ),
            (
                format!("{TARGET}  rules: [{{when: [{{name: x-tenant}}]}}]\n"),
                "spec.rules[0].when[0].values: needs at least one value",
            ),
            (
                format!("{TARGET}  mode: Audit\n"),
                "spec.mode: unknown variant `Audit`",
            ),
        ];
        for (spec, expected) in cases {
            let got = error(&spec);
            assert!(
                got.starts_with(expected),
                "{spec}\n got: {got}\nwant: {expected}"
            );
        }
    }
}
