//! `RateLimitPolicy` (`bulwark.io/v1alpha1`): token buckets enforced by the agents of
//! the target's pods on inbound requests, or by the callers' agents on requests to the
//! target (outbound); per pod, split over the service's pods, or shared through Redis.

use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;
use super::resilience::positive;
use super::{FieldError, field, item, target};
use crate::duration::Duration;
use crate::model::policy as model;
use bulwark_proto::defaults::{DEFAULT_RATE_LIMIT_COST, MAX_RATE_LIMIT_COST};

/// Longest limit name (it becomes a metric label).
pub const MAX_LIMIT_NAME_LEN: usize = 63;

/// A `RateLimitPolicy` document as the folder source reads it: metadata and an
/// optional spec, so that a missing spec is reported as `spec: required`.
#[derive(Clone, Debug, Deserialize)]
pub struct RateLimitPolicyDocument {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, required.
    pub spec: Option<RateLimitPolicySpec>,
}

/// What a service's pods accept: token buckets enforced by the agents of the target
/// Service's pods on inbound requests. A request must pass every limit; one that does
/// not is answered 429 rate-limited with Retry-After.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, kube::CustomResource)]
#[kube(
    group = "bulwark.io",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    plural = "ratelimitpolicies",
    namespaced,
    doc = "A RateLimitPolicy: token-bucket rate limits that the pods of the target Services enforce on inbound requests.",
    status = "super::status::PolicyStatus",
    shortname = "rlp",
    category = "bulwark",
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".spec.targetRefs[*].name","description":"the Services the policy attaches to"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].status","description":"whether the control plane applies the policy"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    /// The Services (or single ports of them, with `sectionName`) whose pods enforce
    /// the limits, in the policy's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Option<Vec<target::TargetRef>>,
    /// Inbound (the target's pods limit the requests they receive; the default) or
    /// Outbound (every caller's agent limits its requests to the target, e.g. a
    /// third-party API behind a Service).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Inbound"))]
    pub direction: Option<DirectionSpec>,
    /// Add `RateLimit-Policy` and `RateLimit` headers (IETF httpapi draft) to
    /// responses, beside `Retry-After` on refusals. Default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<bool>,
    /// The limits; a request must pass every one. At least one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 16),
        extend("x-kubernetes-validations" = [{
            "rule": "self.all(a, !has(a.name) || self.exists_one(b, has(b.name) && b.name == a.name))",
            "message": "limit names must be unique within a policy",
        }])
    )]
    pub limits: Option<Vec<LimitSpec>>,
}

/// One entry of `spec.limits`: a token bucket.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.name)", "message": "name is required"},
    {"rule": "has(self.rate)", "message": "rate is required"},
    {
        "rule": "!has(self.onStoreUnavailable) || (has(self.scope) && self.scope == 'Shared')",
        "message": "onStoreUnavailable is only allowed when scope is Shared",
        "fieldPath": ".onStoreUnavailable",
    },
]))]
pub struct LimitSpec {
    /// The limit's name, unique within the policy; a metric label. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
    /// What gets its own bucket. Default: one bucket shared by all requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<KeySpec>,
    /// How fast tokens come back. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateSpec>,
    /// Bucket size in requests: how many are allowed at once after a quiet period (at
    /// least 1). Default rate.requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// Service (the default: the rate and burst are split over the target's ready pods,
    /// re-split as they come and go, so the limit holds at any replica count), Pod (every
    /// pod enforces the whole limit on its own: N pods accept N times it) or Shared (one
    /// bucket per key in Redis, drawn by every agent: exact under uneven traffic).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Service"))]
    pub scope: Option<ScopeSpec>,
    /// For scope Shared: what the limit does while Redis is unreachable. FallbackToSplit
    /// (the default: each pod enforces its Service-scope share), FailOpen (no limit) or
    /// FailClosed (every request refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_store_unavailable: Option<StoreUnavailableSpec>,
    /// Tokens a request takes. Default: 1 for every request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostSpec>,
}

/// `spec.direction`: Inbound (the target's pods enforce) or Outbound (its callers do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum DirectionSpec {
    /// Requests into the target's pods.
    Inbound,
    /// Requests from the mesh to the target.
    Outbound,
}

/// `spec.limits[].scope`: Pod, Service (default) or Shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum ScopeSpec {
    /// Every pod enforces the whole limit.
    Pod,
    /// The limit is split over the ready pods.
    Service,
    /// One bucket per key in Redis.
    Shared,
}

/// `spec.limits[].onStoreUnavailable`: FailOpen, FailClosed or FallbackToSplit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 32))]
pub enum StoreUnavailableSpec {
    /// Let every request through the limit.
    FailOpen,
    /// Refuse every request.
    FailClosed,
    /// Enforce the pod's split share.
    FallbackToSplit,
}

/// `spec.limits[].cost`: how many tokens a request takes.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CostSpec {
    /// Tokens for a request no rule matches (at least 1). Default 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub default: Option<u32>,
    /// Fixed costs by method and path prefix; the first rule that matches applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub rules: Option<Vec<CostRuleSpec>>,
    /// A response header (lower case) whose value, an integer, is charged as further
    /// tokens once the response arrives (after-the-fact accounting: the bucket may go
    /// into debt, which later requests wait out).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[!#$%&'*+.^_`|~0-9a-z-]+$"), length(max = 256))]
    pub response_header: Option<String>,
}

/// `spec.limits[].cost.rules[]`: requests with `method` (any when absent) whose path
/// starts with `pathPrefix` (any when absent) cost `cost` tokens.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.cost)", "message": "cost is required"},
]))]
pub struct CostRuleSpec {
    /// An HTTP method in upper case, e.g. POST.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Z]+$"), length(max = 16))]
    pub method: Option<String>,
    /// A path prefix, starting with `/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"), length(max = 1024))]
    pub path_prefix: Option<String>,
    /// Tokens, at least 1. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub cost: Option<u32>,
}

/// `spec.limits[].key`: which requests share a bucket.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.type) && self.type == 'Header' ? has(self.header) : !has(self.header)",
    "message": "header is required when type is Header, and only allowed then",
}]))]
pub struct KeySpec {
    /// None (one bucket for all), ClientAddress (one per client IP), ClientIdentity (one
    /// per caller's mesh identity, proven by mutual TLS; plaintext callers share one) or
    /// Header (one per value of `header`). Default None.
    #[serde(rename = "type")]
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "None"))]
    pub kind: Option<KeyType>,
    /// The request header (lower case) whose value picks the bucket, for type Header,
    /// e.g. x-tenant-id; requests without it share one bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[!#$%&'*+.^_`|~0-9a-z-]+$"), length(max = 256))]
    pub header: Option<String>,
}

/// `spec.limits[].key.type`: None (one bucket for all, the default), ClientAddress
/// (one per client IP), ClientIdentity (one per caller's mesh identity) or Header (one
/// per value of `header`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 32))]
pub enum KeyType {
    /// One bucket for everyone.
    None,
    /// One bucket per client IP address.
    ClientAddress,
    /// One bucket per caller's mesh identity (its SPIFFE ID).
    ClientIdentity,
    /// One bucket per value of a request header.
    Header,
}

/// `spec.limits[].rate`: `requests` tokens added per `per`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.requests)", "message": "requests is required"},
    {"rule": "has(self.per)", "message": "per is required"},
]))]
pub struct RateSpec {
    /// Tokens (requests) added per period, at least 1. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests: Option<u32>,
    /// The period (a duration such as 1s or 1m, more than 0). Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per: Option<Duration>,
}

impl TryFrom<RateLimitPolicyDocument> for model::RateLimitPolicy {
    type Error = FieldError;

    fn try_from(policy: RateLimitPolicyDocument) -> Result<Self, FieldError> {
        let name = policy.metadata.object_name()?;
        let spec = policy.spec.ok_or_else(|| FieldError::required("spec"))?;
        spec.validate(name, policy.metadata.creation_timestamp)
    }
}

impl RateLimitPolicySpec {
    /// Checks the spec (every rule, CEL ones included) and applies the defaults.
    pub fn validate(
        self,
        name: crate::model::ObjectName,
        created: Option<crate::timestamp::Timestamp>,
    ) -> Result<model::RateLimitPolicy, FieldError> {
        let spec = self;
        let targets = target::validate(spec.target_refs, "spec.targetRefs")?;
        let limits = spec.limits.unwrap_or_default();
        if limits.is_empty() {
            return Err(FieldError::new(
                "spec.limits",
                "must hold at least one limit",
            ));
        }
        let mut validated: Vec<model::Limit> = Vec::with_capacity(limits.len());
        for (i, limit) in limits.into_iter().enumerate() {
            let path = item("spec.limits", i);
            let limit = limit.validate(&path)?;
            if validated.iter().any(|l| l.name == limit.name) {
                return Err(FieldError::new(
                    field(&path, "name"),
                    format!(
                        "duplicate limit name {:?}: names must be unique within a policy",
                        limit.name
                    ),
                ));
            }
            validated.push(limit);
        }
        Ok(model::RateLimitPolicy {
            name,
            created,
            targets,
            direction: match spec.direction.unwrap_or(DirectionSpec::Inbound) {
                DirectionSpec::Inbound => model::Direction::Inbound,
                DirectionSpec::Outbound => model::Direction::Outbound,
            },
            response_headers: spec.response_headers.unwrap_or(false),
            limits: validated,
        })
    }
}

impl LimitSpec {
    fn validate(self, path: &str) -> Result<model::Limit, FieldError> {
        let name = match self.name {
            Some(name) if !name.is_empty() => name,
            _ => return Err(FieldError::required(field(path, "name"))),
        };
        if name.len() > MAX_LIMIT_NAME_LEN {
            return Err(FieldError::new(
                field(path, "name"),
                format!("must be at most {MAX_LIMIT_NAME_LEN} characters"),
            ));
        }
        let key = match self.key {
            None => model::LimitKey::None,
            Some(key) => key.validate(&field(path, "key"))?,
        };
        let rate_path = field(path, "rate");
        let rate = self.rate.ok_or_else(|| FieldError::required(&rate_path))?;
        let requests = match rate.requests {
            None => return Err(FieldError::required(field(&rate_path, "requests"))),
            Some(0) => {
                return Err(FieldError::new(
                    field(&rate_path, "requests"),
                    "must be at least 1",
                ));
            }
            Some(n) => n,
        };
        let per = positive(rate.per, &rate_path, "per")?
            .ok_or_else(|| FieldError::required(field(&rate_path, "per")))?;
        let burst = self.burst.unwrap_or(requests);
        if burst == 0 {
            return Err(FieldError::new(
                field(path, "burst"),
                "must be at least 1, or no request could ever pass",
            ));
        }
        let scope = match self.scope.unwrap_or(ScopeSpec::Service) {
            ScopeSpec::Pod => model::Scope::Pod,
            ScopeSpec::Service => model::Scope::Service,
            ScopeSpec::Shared => model::Scope::Shared,
        };
        let on_store_unavailable = match (scope, self.on_store_unavailable) {
            (model::Scope::Shared, mode) => {
                match mode.unwrap_or(StoreUnavailableSpec::FallbackToSplit) {
                    StoreUnavailableSpec::FailOpen => model::StoreUnavailable::FailOpen,
                    StoreUnavailableSpec::FailClosed => model::StoreUnavailable::FailClosed,
                    StoreUnavailableSpec::FallbackToSplit => {
                        model::StoreUnavailable::FallbackToSplit
                    }
                }
            }
            (_, None) => model::StoreUnavailable::FallbackToSplit,
            (scope, Some(_)) => {
                return Err(FieldError::new(
                    field(path, "onStoreUnavailable"),
                    format!("only allowed when scope is Shared, not {scope:?}"),
                ));
            }
        };
        let cost = match self.cost {
            None => model::Cost::default(),
            Some(cost) => cost.validate(&field(path, "cost"))?,
        };
        Ok(model::Limit {
            name,
            key,
            requests,
            per,
            burst,
            scope,
            on_store_unavailable,
            cost,
        })
    }
}

/// A cost (per request or per rule) within 1..=[`MAX_RATE_LIMIT_COST`].
fn cost_value(value: u32, path: String) -> Result<u32, FieldError> {
    if (1..=MAX_RATE_LIMIT_COST).contains(&value) {
        Ok(value)
    } else {
        Err(FieldError::new(
            path,
            format!("must be from 1 to {MAX_RATE_LIMIT_COST}"),
        ))
    }
}

impl CostSpec {
    fn validate(self, path: &str) -> Result<model::Cost, FieldError> {
        let default = match self.default {
            None => DEFAULT_RATE_LIMIT_COST,
            Some(n) => cost_value(n, field(path, "default"))?,
        };
        let mut rules = Vec::new();
        for (i, rule) in self.rules.unwrap_or_default().into_iter().enumerate() {
            let rule_path = item(&field(path, "rules"), i);
            let cost = rule
                .cost
                .ok_or_else(|| FieldError::required(field(&rule_path, "cost")))?;
            let cost = cost_value(cost, field(&rule_path, "cost"))?;
            if let Some(method) = &rule.method
                && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(FieldError::new(
                    field(&rule_path, "method"),
                    format!("{method:?} is not an upper-case HTTP method such as POST"),
                ));
            }
            if let Some(prefix) = &rule.path_prefix
                && !prefix.starts_with('/')
            {
                return Err(FieldError::new(
                    field(&rule_path, "pathPrefix"),
                    format!("{prefix:?} must start with /"),
                ));
            }
            rules.push(model::CostRule {
                method: rule.method,
                path_prefix: rule.path_prefix,
                cost,
            });
        }
        let response_header = match self.response_header {
            None => None,
            Some(header) => {
                let valid = http::HeaderName::from_str(&header).is_ok()
                    && !header.bytes().any(|b| b.is_ascii_uppercase());
                if !valid {
                    return Err(FieldError::new(
                        field(path, "responseHeader"),
                        format!("{header:?} is not a valid lowercase HTTP header name"),
                    ));
                }
                Some(header)
            }
        };
        Ok(model::Cost {
            default,
            rules,
            response_header,
        })
    }
}

impl KeySpec {
    fn validate(self, path: &str) -> Result<model::LimitKey, FieldError> {
        let header_path = field(path, "header");
        match (self.kind.unwrap_or(KeyType::None), self.header) {
            (KeyType::Header, None) => {
                Err(FieldError::new(header_path, "required when type is Header"))
            }
            (KeyType::Header, Some(header)) => {
                let valid = http::HeaderName::from_str(&header).is_ok()
                    && !header.bytes().any(|b| b.is_ascii_uppercase());
                if valid {
                    Ok(model::LimitKey::Header(header))
                } else {
                    Err(FieldError::new(
                        header_path,
                        format!("{header:?} is not a valid lowercase HTTP header name"),
                    ))
                }
            }
            (kind, Some(_)) => Err(FieldError::new(
                header_path,
                format!("only allowed when type is Header, not {kind:?}"),
            )),
            (KeyType::None, None) => Ok(model::LimitKey::None),
            (KeyType::ClientAddress, None) => Ok(model::LimitKey::ClientAddress),
            (KeyType::ClientIdentity, None) => Ok(model::LimitKey::ClientIdentity),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as StdDuration;

    fn policy(spec: &str) -> Result<model::RateLimitPolicy, FieldError> {
        let yaml = format!(
            "metadata: {{name: fe, namespace: demo}}\n\
             spec:\n  targetRefs: [{{kind: Service, name: frontend}}]\n{spec}"
        );
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let typed: RateLimitPolicyDocument = serde_path_to_error::deserialize(value)
            .map_err(|e| FieldError::new(e.path().to_string(), e.into_inner().to_string()))?;
        typed.try_into()
    }

    #[test]
    fn defaults_key_none_and_burst_equal_to_rate() {
        let p = policy("  limits: [{name: total, rate: {requests: 7, per: 1s}}]\n").unwrap();
        assert_eq!(
            p.limits,
            vec![model::Limit {
                name: "total".into(),
                key: model::LimitKey::None,
                requests: 7,
                per: StdDuration::from_secs(1),
                burst: 7,
                scope: model::Scope::Service,
                on_store_unavailable: model::StoreUnavailable::FallbackToSplit,
                cost: model::Cost::default(),
            }]
        );
        assert_eq!(p.direction, model::Direction::Inbound);
        assert!(!p.response_headers);
    }

    #[test]
    fn keys_are_read() {
        let p = policy(
            "  limits:\n\
             \x20   - {name: a, key: {type: Header, header: x-tenant-id}, rate: {requests: 1, per: 1s}, burst: 3}\n\
             \x20   - {name: b, key: {type: ClientAddress}, rate: {requests: 1, per: 1m}}\n\
             \x20   - {name: c, key: {}, rate: {requests: 1, per: 1s}}\n\
             \x20   - {name: d, key: {type: ClientIdentity}, rate: {requests: 1, per: 1s}}\n",
        )
        .unwrap();
        assert_eq!(
            p.limits[0].key,
            model::LimitKey::Header("x-tenant-id".into())
        );
        assert_eq!(p.limits[0].burst, 3);
        assert_eq!(p.limits[1].key, model::LimitKey::ClientAddress);
        assert_eq!(p.limits[1].per, StdDuration::from_secs(60));
        assert_eq!(p.limits[2].key, model::LimitKey::None);
        assert_eq!(p.limits[3].key, model::LimitKey::ClientIdentity);
    }

    #[test]
    fn scopes_modes_costs_and_direction_are_read() {
        let p = policy(
            "  direction: Outbound\n  responseHeaders: true\n  limits:\n\
             \x20   - {name: a, scope: Pod, rate: {requests: 1, per: 1s}}\n\
             \x20   - {name: b, scope: Shared, onStoreUnavailable: FailClosed, rate: {requests: 1, per: 1s}}\n\
             \x20   - {name: c, scope: Shared, rate: {requests: 1, per: 1s}, cost: {default: 2, responseHeader: x-cost, rules: [{method: POST, pathPrefix: /search, cost: 10}]}}\n",
        )
        .unwrap();
        assert_eq!(p.direction, model::Direction::Outbound);
        assert!(p.response_headers);
        assert_eq!(p.limits[0].scope, model::Scope::Pod);
        assert_eq!(p.limits[1].scope, model::Scope::Shared);
        assert_eq!(
            p.limits[1].on_store_unavailable,
            model::StoreUnavailable::FailClosed
        );
        assert_eq!(
            p.limits[2].on_store_unavailable,
            model::StoreUnavailable::FallbackToSplit
        );
        assert_eq!(
            p.limits[2].cost,
            model::Cost {
                default: 2,
                rules: vec![model::CostRule {
                    method: Some("POST".into()),
                    path_prefix: Some("/search".into()),
                    cost: 10
                }],
                response_header: Some("x-cost".into()),
            }
        );
    }

    #[test]
    fn each_validation_rule_names_its_path_and_reason() {
        let ok_rate = "rate: {requests: 1, per: 1s}";
        let cases = [
            (
                "  limits: []\n".to_owned(),
                "spec.limits: must hold at least one limit",
            ),
            (
                format!("  limits: [{{{ok_rate}}}]\n"),
                "spec.limits[0].name: required",
            ),
            (
                format!("  limits: [{{name: a, {ok_rate}}}, {{name: a, {ok_rate}}}]\n"),
                "spec.limits[1].name: duplicate limit name \"a\"",
            ),
            (
                "  limits: [{name: a}]\n".to_owned(),
                "spec.limits[0].rate: required",
            ),
            (
                "  limits: [{name: a, rate: {per: 1s}}]\n".to_owned(),
                "spec.limits[0].rate.requests: required",
            ),
            (
                "  limits: [{name: a, rate: {requests: 0, per: 1s}}]\n".to_owned(),
                "spec.limits[0].rate.requests: must be at least 1",
            ),
            (
                "  limits: [{name: a, rate: {requests: 1}}]\n".to_owned(),
                "spec.limits[0].rate.per: required",
            ),
            (
                "  limits: [{name: a, rate: {requests: 1, per: 0s}}]\n".to_owned(),
                "spec.limits[0].rate.per: must be greater than 0",
            ),
            (
                format!("  limits: [{{name: a, burst: 0, {ok_rate}}}]\n"),
                "spec.limits[0].burst: must be at least 1",
            ),
            (
                format!("  limits: [{{name: a, key: {{type: Header}}, {ok_rate}}}]\n"),
                "spec.limits[0].key.header: required when type is Header",
            ),
            (
                format!(
                    "  limits: [{{name: a, key: {{type: Header, header: X-Tenant}}, {ok_rate}}}]\n"
                ),
                "spec.limits[0].key.header: \"X-Tenant\" is not a valid lowercase HTTP header name",
            ),
            (
                format!(
                    "  limits: [{{name: a, key: {{type: Header, header: 'x tenant'}}, {ok_rate}}}]\n"
                ),
                "spec.limits[0].key.header: \"x tenant\" is not a valid lowercase HTTP header name",
            ),
            (
                format!("  limits: [{{name: a, key: {{type: None, header: x-a}}, {ok_rate}}}]\n"),
                "spec.limits[0].key.header: only allowed when type is Header",
            ),
            (
                format!("  limits: [{{name: a, key: {{type: Cookie}}, {ok_rate}}}]\n"),
                "spec.limits[0].key.type: unknown variant `Cookie`",
            ),
            (
                format!("  limits: [{{name: a, perSecond: 3, {ok_rate}}}]\n"),
                "spec.limits[0].perSecond: unknown field `perSecond`, expected one of `name`",
            ),
            (
                "  limit: []\n".to_owned(),
                "spec.limit: unknown field `limit`",
            ),
            (
                format!("  limits: [{{name: a, scope: Cluster, {ok_rate}}}]\n"),
                "spec.limits[0].scope: unknown variant `Cluster`",
            ),
            (
                format!("  limits: [{{name: a, onStoreUnavailable: FailOpen, {ok_rate}}}]\n"),
                "spec.limits[0].onStoreUnavailable: only allowed when scope is Shared, not Service",
            ),
            (
                format!(
                    "  limits: [{{name: a, scope: Shared, onStoreUnavailable: Retry, {ok_rate}}}]\n"
                ),
                "spec.limits[0].onStoreUnavailable: unknown variant `Retry`",
            ),
            (
                format!("  limits: [{{name: a, cost: {{default: 0}}, {ok_rate}}}]\n"),
                "spec.limits[0].cost.default: must be from 1 to 1000000",
            ),
            (
                format!(
                    "  limits: [{{name: a, cost: {{rules: [{{method: POST}}]}}, {ok_rate}}}]\n"
                ),
                "spec.limits[0].cost.rules[0].cost: required",
            ),
            (
                format!(
                    "  limits: [{{name: a, cost: {{rules: [{{method: post, cost: 2}}]}}, {ok_rate}}}]\n"
                ),
                "spec.limits[0].cost.rules[0].method: \"post\" is not an upper-case HTTP method",
            ),
            (
                format!(
                    "  limits: [{{name: a, cost: {{rules: [{{pathPrefix: search, cost: 2}}]}}, {ok_rate}}}]\n"
                ),
                "spec.limits[0].cost.rules[0].pathPrefix: \"search\" must start with /",
            ),
            (
                format!("  limits: [{{name: a, cost: {{responseHeader: X-Cost}}, {ok_rate}}}]\n"),
                "spec.limits[0].cost.responseHeader: \"X-Cost\" is not a valid lowercase HTTP header name",
            ),
            (
                format!("  direction: Sideways\n  limits: [{{name: a, {ok_rate}}}]\n"),
                "spec.direction: unknown variant `Sideways`",
            ),
        ];
        for (spec, expected) in cases {
            let got = policy(&spec).unwrap_err().to_string();
            assert!(
                got.starts_with(expected),
                "for {spec:?}\n  got:      {got}\n  expected: {expected}"
            );
        }
    }
}
