//! `RateLimitPolicy` (`bulwark.io/v1alpha1`): token buckets enforced by the agents of
//! the target's pods on inbound requests.

use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;
use super::resilience::positive;
use super::{FieldError, field, item, target};
use crate::duration::Duration;
use crate::model::policy as model;

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
        Ok(model::Limit {
            name,
            key,
            requests,
            per,
            burst,
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
                burst: 7
            }]
        );
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
