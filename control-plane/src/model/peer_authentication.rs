//! A validated `PeerAuthentication`: whether a workload's agents take plaintext callers.
//!
//! One policy applies to a pod: a policy whose selector matches the pod's labels beats
//! the namespace-wide ones (no selector); among policies of the same kind the oldest
//! wins (creation time, then name). A pod that no policy applies to is Permissive.

use std::collections::BTreeMap;

use super::{CreationTime, ObjectName};

/// Whether an inbound port takes plaintext callers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MtlsMode {
    /// Mutual TLS and plaintext are both accepted; a plaintext caller has no identity.
    #[default]
    Permissive,
    /// Only mutual TLS with a mesh identity; plaintext connections are closed.
    Strict,
}

/// The mutual-TLS mode of the pods a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// Namespace and name.
    pub name: ObjectName,
    /// `metadata.creationTimestamp`, when known.
    pub created: CreationTime,
    /// The pods of the policy's namespace with all these labels; `None`: every pod of
    /// the namespace.
    pub selector: Option<BTreeMap<String, String>>,
    /// The mode of every port without an override.
    pub mode: MtlsMode,
    /// Modes by pod port, overriding `mode`.
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthentication {
    /// Whether the policy covers a pod of its namespace with `labels` (before
    /// precedence: another policy may still win there).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// Where the policy ranks among those covering the same pod (the smaller wins).
    pub fn precedence(&self) -> Precedence {
        Precedence {
            namespace_wide: self.selector.is_none(),
            undated: self.created.is_none(),
            created: self.created,
            name: self.name.name.clone(),
        }
    }
}

/// Where a policy ranks among those covering one pod, field by field: the smaller
/// wins. A selector policy comes before a namespace-wide one; then the older (one
/// without a creation time, from a folder, after every one with); then the name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Precedence {
    /// The policy has no selector.
    pub namespace_wide: bool,
    /// The policy has no creation time.
    pub undated: bool,
    /// Its creation time.
    pub created: CreationTime,
    /// Its name (every policy that can cover a pod is in the pod's namespace).
    pub name: String,
}
