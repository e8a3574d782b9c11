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
