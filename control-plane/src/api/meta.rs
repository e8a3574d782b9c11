//! `metadata`: the part of every Kubernetes object the control plane reads.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{DEFAULT_NAMESPACE, FieldError};
use crate::model::ObjectName;
use crate::timestamp::Timestamp;

/// `metadata` (other fields, such as uid, are ignored).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// `metadata.name`, required.
    pub name: Option<String>,
    /// `metadata.namespace`, `default` when absent.
    pub namespace: Option<String>,
    /// `metadata.labels`.
    pub labels: Option<BTreeMap<String, String>>,
    /// `metadata.annotations` (read only where a kind says so, e.g. a Pod's weight).
    pub annotations: Option<BTreeMap<String, String>>,
    /// `metadata.creationTimestamp`, RFC 3339.
    pub creation_timestamp: Option<Timestamp>,
}

impl ObjectMeta {
    /// The object's namespace and name, checked.
    pub fn object_name(&self) -> Result<ObjectName, FieldError> {
        let name = match self.name.as_deref() {
            Some(name) if !name.is_empty() => name,
            _ => return Err(FieldError::required("metadata.name")),
        };
        let namespace = match self.namespace.as_deref() {
            None => DEFAULT_NAMESPACE,
            Some("") => {
                return Err(FieldError::new(
                    "metadata.namespace",
                    "must not be empty (leave it out for `default`)",
                ));
            }
            Some(ns) => ns,
        };
        Ok(ObjectName::new(namespace, name))
    }
}

/// Most labels a selector may name (one home for the schema and the check).
pub const MAX_SELECTOR_LABELS: usize = 16;
/// Longest label value Kubernetes allows.
pub const MAX_LABEL_VALUE: usize = 63;

/// The schema of a `matchLabels` map: one to [`MAX_SELECTOR_LABELS`] labels, values at
/// most [`MAX_LABEL_VALUE`] long (bounded for the CEL cost estimator), and no `default`:
/// schemars derives `{}` from `#[serde(default)]`, which fails `minProperties`, and the
/// API server refuses a CRD whose default does not validate against its own schema.
pub fn label_selector(schema: &mut schemars::Schema) {
    schema.remove("default");
    schema.insert("minProperties".into(), 1.into());
    schema.insert("maxProperties".into(), MAX_SELECTOR_LABELS.into());
    schema.insert(
        "additionalProperties".into(),
        serde_json::json!({"type": "string", "maxLength": MAX_LABEL_VALUE}),
    );
}
