//! `PeerAuthentication` (`bulwark.io/v1alpha1`): whether the inbound side of a
//! workload's agents takes plaintext callers (Permissive) or only mutual TLS (Strict).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;
use super::shard::SelectorSpec;
use super::{FieldError, field, item};
use crate::model::peer_authentication as model;

/// Most entries in `spec.portLevelMtls`.
pub const MAX_PORT_LEVEL: usize = 32;

/// A `PeerAuthentication` document as the folder source reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct PeerAuthenticationDocument {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, required.
    pub spec: Option<PeerAuthenticationSpec>,
}

/// Whether the agents of the selected pods take plaintext callers: Permissive (the
/// default) takes mutual TLS and plaintext, Strict closes every connection that is not
/// mutual TLS with a mesh identity. One policy applies to a pod: a policy whose selector
/// matches it beats a namespace-wide one (no selector); among several of the same kind
/// the oldest (creation time, then name) wins and the others are Conflicted. A pod no
/// policy applies to is Permissive.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, kube::CustomResource)]
#[kube(
    group = "bulwark.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    namespaced,
    doc = "A PeerAuthentication: whether the selected pods take plaintext callers (Permissive) or only mutual TLS (Strict).",
    status = "super::status::PolicyStatus",
    shortname = "peerauthn",
    category = "bulwark",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode","description":"Permissive (mutual TLS and plaintext) or Strict (mutual TLS only)"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector.matchLabels","description":"the labels of the pods it applies to; none: every pod of the namespace","priority":1}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].status","description":"whether the control plane applies the policy"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.selector) || has(self.selector.matchLabels)",
    "message": "selector needs matchLabels; leave selector out for every pod of the namespace",
}]))]
pub struct PeerAuthenticationSpec {
    /// The pods the policy applies to, by label, in the policy's namespace. Absent: every
    /// pod of the namespace (a namespace-wide policy, which any matching selector policy
    /// overrides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorSpec>,
    /// The mode of every port of the selected pods that `portLevelMtls` does not name.
    /// Default Permissive.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Permissive"))]
    pub mode: Option<MtlsModeSpec>,
    /// Modes for single pod ports, overriding `mode` there (e.g. Strict everywhere but
    /// a health port the kubelet calls in plaintext). Each port at most once.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        extend("x-kubernetes-validations" = [{
            "rule": "self.all(a, !has(a.port) || self.exists_one(b, has(b.port) && b.port == a.port))",
            "message": "each port may appear once in portLevelMtls",
        }])
    )]
    pub port_level_mtls: Option<Vec<PortMtlsSpec>>,
}

/// Permissive: the agent takes mutual-TLS and plaintext callers (a plaintext caller has
/// no identity: only AuthorizationPolicy rules without `from` allow it). Strict: the
/// agent closes every connection that is not mutual TLS with a mesh identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum MtlsModeSpec {
    /// Mutual TLS and plaintext.
    Permissive,
    /// Mutual TLS only.
    Strict,
}

/// One entry of `spec.portLevelMtls`: the mode of one pod port.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.port)", "message": "port is required"},
    {"rule": "has(self.mode)", "message": "mode is required"},
]))]
pub struct PortMtlsSpec {
    /// The port on the pod the app listens on (a container port, not a Service port),
    /// 1 to 65535. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
    /// The mode of this port. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsModeSpec>,
}

impl TryFrom<PeerAuthenticationDocument> for model::PeerAuthentication {
    type Error = FieldError;

    fn try_from(policy: PeerAuthenticationDocument) -> Result<Self, FieldError> {
        let name = policy.metadata.object_name()?;
        let spec = policy.spec.ok_or_else(|| FieldError::required("spec"))?;
        spec.validate(name, policy.metadata.creation_timestamp)
    }
}

impl From<MtlsModeSpec> for model::MtlsMode {
    fn from(mode: MtlsModeSpec) -> Self {
        match mode {
            MtlsModeSpec::Permissive => model::MtlsMode::Permissive,
            MtlsModeSpec::Strict => model::MtlsMode::Strict,
        }
    }
}

impl PeerAuthenticationSpec {
    /// Checks the spec (every rule, CEL ones included) and applies the defaults.
    pub fn validate(
        self,
        name: crate::model::ObjectName,
        created: Option<crate::timestamp::Timestamp>,
    ) -> Result<model::PeerAuthentication, FieldError> {
        let selector = match self.selector {
            None => None,
            Some(selector) => {
                let labels = selector.checked_labels("spec.selector.matchLabels")?;
                if labels.is_empty() {
                    return Err(FieldError::new(
                        "spec.selector.matchLabels",
                        "needs at least one label (leave selector out for every pod of the \
                         namespace)",
                    ));
                }
                Some(labels)
            }
        };
        let entries = self.port_level_mtls.unwrap_or_default();
        if entries.len() > MAX_PORT_LEVEL {
            return Err(FieldError::new(
                "spec.portLevelMtls",
                format!("holds {} ports; at most {MAX_PORT_LEVEL}", entries.len()),
            ));
        }
        let mut port_modes = BTreeMap::new();
        for (i, entry) in entries.into_iter().enumerate() {
            let path = item("spec.portLevelMtls", i);
            let (port, mode) = entry.validate(&path)?;
            if port_modes.insert(port, mode).is_some() {
                return Err(FieldError::new(
                    field(&path, "port"),
                    format!("port {port} is given twice; each port may appear once"),
                ));
            }
        }
        Ok(model::PeerAuthentication {
            name,
            created,
            selector,
            mode: self.mode.map_or(model::MtlsMode::Permissive, Into::into),
            port_modes,
        })
    }
}

impl PortMtlsSpec {
    fn validate(self, path: &str) -> Result<(u16, model::MtlsMode), FieldError> {
        let port_path = field(path, "port");
        let port = self.port.ok_or_else(|| FieldError::required(&port_path))?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| FieldError::new(port_path, format!("{port} is not a port (1-65535)")))?;
        let mode = self
            .mode
            .ok_or_else(|| FieldError::required(field(path, "mode")))?;
        Ok((port, mode.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::MtlsMode::{Permissive, Strict};

    fn policy(spec: &str) -> Result<model::PeerAuthentication, FieldError> {
        let yaml = format!("metadata: {{name: mtls, namespace: shop}}\nspec:\n{spec}");
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let typed: PeerAuthenticationDocument = serde_path_to_error::deserialize(value)
            .map_err(|e| FieldError::new(e.path().to_string(), e.into_inner().to_string()))?;
        typed.try_into()
    }

    #[test]
    fn an_empty_spec_is_a_permissive_namespace_wide_policy() {
        let p = policy("  {}\n").unwrap();
        assert_eq!(p.selector, None);
        assert_eq!(p.mode, Permissive);
        assert!(p.port_modes.is_empty());
        assert!(p.selects(&BTreeMap::new()), "every pod of the namespace");
    }

    #[test]
    fn a_selector_policy_reads_its_mode_and_port_overrides() {
        let p = policy(
            "  selector: {matchLabels: {app: payments}}\n  mode: Strict\n\
             \x20 portLevelMtls: [{port: 9090, mode: Permissive}, {port: 8443, mode: Strict}]\n",
        )
        .unwrap();
        assert_eq!(p.mode, Strict);
        assert_eq!(
            p.port_modes.into_iter().collect::<Vec<_>>(),
            [(8443, Strict), (9090, Permissive)]
        );
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        let p = policy("  selector: {matchLabels: {app: payments}}\n").unwrap();
        assert!(p.selects(&labels(&[("app", "payments"), ("pod", "a")])));
        assert!(!p.selects(&labels(&[("app", "orders")])));
    }

    #[test]
    fn each_mistake_names_its_path_and_reason() {
        let cases = [
            (
                "  selector: {matchLabels: {}}\n",
                "spec.selector.matchLabels: needs at least one label (leave selector out",
            ),
            (
                "  selector: {}\n",
                "spec.selector.matchLabels: needs at least one label",
            ),
            (
                "  mode: Disabled\n",
                "spec.mode: unknown variant `Disabled`",
            ),
            (
                "  portLevelMtls: [{mode: Strict}]\n",
                "spec.portLevelMtls[0].port: required",
            ),
            (
                "  portLevelMtls: [{port: 8080}]\n",
                "spec.portLevelMtls[0].mode: required",
            ),
            (
                "  portLevelMtls: [{port: 0, mode: Strict}]\n",
                "spec.portLevelMtls[0].port: 0 is not a port (1-65535)",
            ),
            (
                "  portLevelMtls: [{port: 70000, mode: Strict}]\n",
                "spec.portLevelMtls[0].port: 70000 is not a port",
            ),
            (
                "  portLevelMtls: [{port: 8080, mode: Strict}, {port: 8080, mode: Permissive}]\n",
                "spec.portLevelMtls[1].port: port 8080 is given twice",
            ),
            (
                "  mtls: {mode: Strict}\n",
                "spec.mtls: unknown field `mtls`",
            ),
        ];
        for (spec, expected) in cases {
            let got = policy(spec).unwrap_err().to_string();
            assert!(
                got.starts_with(expected),
                "{spec}\n got: {got}\nwant: {expected}"
            );
        }
        let many: Vec<String> = (1..=33)
            .map(|p| format!("{{port: {p}, mode: Strict}}"))
            .collect();
        let got = policy(&format!("  portLevelMtls: [{}]\n", many.join(", ")))
            .unwrap_err()
            .to_string();
        assert_eq!(got, "spec.portLevelMtls: holds 33 ports; at most 32");
    }

    #[test]
    fn a_missing_spec_is_required() {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("metadata: {name: mtls, namespace: shop}\n").unwrap();
        let typed: PeerAuthenticationDocument = serde_yaml_ng::from_value(value).unwrap();
        let got: Result<model::PeerAuthentication, _> = typed.try_into();
        assert_eq!(got.unwrap_err().to_string(), "spec: required");
    }
}
