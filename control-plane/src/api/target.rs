//! `targetRefs`: how a policy attaches to Services (Gateway API policy attachment).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{FieldError, field, item};
use crate::model;

/// One entry of `spec.targetRefs`: a Service in the policy's namespace (Gateway API
/// policy attachment, LocalPolicyTargetReferenceWithSectionName).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.kind)", "message": "kind is required (Service)"},
    {"rule": "has(self.name)", "message": "name is required"},
]))]
pub struct TargetRef {
    /// The API group of the target: "" (the core group of Service). Default "".
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^$"), length(max = 253), extend("default" = ""))]
    pub group: Option<String>,
    /// The kind of the target: Service. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^Service$"), length(max = 63))]
    pub kind: Option<String>,
    /// The Service's name, in the policy's namespace. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// A port name of the Service: the policy applies to that port only. Default: every
    /// port.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub section_name: Option<String>,
}

/// Checks `spec.targetRefs` (at `path`): non-empty, Services only, no duplicates.
pub fn validate(
    refs: Option<Vec<TargetRef>>,
    path: &str,
) -> Result<Vec<model::TargetRef>, FieldError> {
    let refs = refs.unwrap_or_default();
    if refs.is_empty() {
        return Err(FieldError::new(
            path,
            "must name at least one Service (kind: Service, name: ...)",
        ));
    }
    let mut targets: Vec<model::TargetRef> = Vec::with_capacity(refs.len());
    for (i, r) in refs.into_iter().enumerate() {
        let at = item(path, i);
        match r.group.as_deref() {
            None | Some("") => {}
            Some(group) => {
                return Err(FieldError::new(
                    field(&at, "group"),
                    format!("must be \"\" (the core API group of Service), got {group:?}"),
                ));
            }
        }
        match r.kind.as_deref() {
            Some("Service") => {}
            None => {
                return Err(FieldError::new(
                    field(&at, "kind"),
                    "required: must be Service",
                ));
            }
            Some(kind) => {
                return Err(FieldError::new(
                    field(&at, "kind"),
                    format!("must be Service, got {kind:?}: policies attach to Services"),
                ));
            }
        }
        let service = match r.name {
            Some(name) if !name.is_empty() => name,
            _ => return Err(FieldError::required(field(&at, "name"))),
        };
        let section = match r.section_name {
            Some(s) if s.is_empty() => {
                return Err(FieldError::new(
                    field(&at, "sectionName"),
                    "must not be empty (leave it out to target every port)",
                ));
            }
            other => other,
        };
        let target = model::TargetRef { service, section };
        if targets.contains(&target) {
            return Err(FieldError::new(at, "duplicate of an earlier targetRef"));
        }
        targets.push(target);
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Result<Vec<model::TargetRef>, FieldError> {
        validate(serde_yaml_ng::from_str(yaml).unwrap(), "spec.targetRefs")
    }

    #[test]
    fn accepts_services_with_and_without_section() {
        let t = check(
            "[{group: '', kind: Service, name: a}, {kind: Service, name: a, sectionName: http}]",
        )
        .unwrap();
        assert_eq!(
            t[0],
            model::TargetRef {
                service: "a".into(),
                section: None
            }
        );
        assert_eq!(t[1].section.as_deref(), Some("http"));
    }

    #[test]
    fn each_rule_reports_its_path() {
        let err = |yaml: &str| check(yaml).unwrap_err().to_string();
        assert_eq!(
            err("[]"),
            "spec.targetRefs: must name at least one Service (kind: Service, name: ...)"
        );
        assert!(
            err("[{group: apps, kind: Service, name: a}]")
                .starts_with("spec.targetRefs[0].group: must be \"\"")
        );
        assert!(
            err("[{kind: Deployment, name: a}]")
                .starts_with("spec.targetRefs[0].kind: must be Service")
        );
        assert_eq!(
            err("[{name: a}]"),
            "spec.targetRefs[0].kind: required: must be Service"
        );
        assert_eq!(
            err("[{kind: Service}]"),
            "spec.targetRefs[0].name: required"
        );
        assert!(
            err("[{kind: Service, name: a, sectionName: ''}]")
                .starts_with("spec.targetRefs[0].sectionName")
        );
        assert_eq!(
            err("[{kind: Service, name: a}, {kind: Service, name: a}]"),
            "spec.targetRefs[1]: duplicate of an earlier targetRef"
        );
    }

    #[test]
    fn target_refs_are_local_so_a_namespace_is_an_unknown_field() {
        let err =
            serde_yaml_ng::from_str::<TargetRef>("{kind: Service, name: a, namespace: other}")
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown field `namespace`"), "{err}");
    }
}
