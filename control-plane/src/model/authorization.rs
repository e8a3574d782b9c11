//! A validated `AuthorizationPolicy`: who may call a workload.
//!
//! A workload with no policy allows every caller. A workload with any policy in
//! `Enforce` mode denies every request that no rule of those policies allows; `Shadow`
//! policies are evaluated and their would-be denials counted, never enforced.

use std::collections::BTreeMap;

use super::policy::TargetRef;
use super::{CreationTime, ObjectName};

/// Whether a policy's denials are enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Requests no rule allows are denied (403 unauthorized).
    Enforce,
    /// Denials are counted and logged, and the request goes on.
    Shadow,
}

/// Which workloads a policy protects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// The pods behind these Services (or these Service ports).
    Targets(Vec<TargetRef>),
    /// The pods in the policy's namespace with all these labels.
    Selector(BTreeMap<String, String>),
}

/// A name that is either anything or one exact value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamePattern {
    /// Any value (`*`).
    Any,
    /// Exactly this value.
    Exact(String),
}

impl NamePattern {
    /// `*` is any; anything else is exact.
    pub fn parse(value: &str) -> Self {
        if value == "*" {
            NamePattern::Any
        } else {
            NamePattern::Exact(value.to_owned())
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            NamePattern::Any => true,
            NamePattern::Exact(exact) => exact == value,
        }
    }
}

/// Callers a rule allows: workloads whose SPIFFE ID has these parts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceMatch {
    /// The trust domain (`Any` for a service account or namespace entry: the mesh's own
    /// trust domain is the only one its agents accept).
    pub trust_domain: NamePattern,
    /// The caller's namespace.
    pub namespace: NamePattern,
    /// The caller's ServiceAccount.
    pub service_account: NamePattern,
}

/// A path condition: exact, or a prefix (written with a trailing `*`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathMatch {
    /// The whole path (without the query).
    Exact(String),
    /// Paths starting with this.
    Prefix(String),
}

/// What a rule allows the callers to do; empty lists allow anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationMatch {
    /// HTTP methods (upper case).
    pub methods: Vec<String>,
    /// Paths.
    pub paths: Vec<PathMatch>,
}

/// A header the request must carry with one of the values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderCondition {
    /// The header name (lower case).
    pub name: String,
    /// Allowed values (exact).
    pub values: Vec<String>,
}

/// One allow rule: every part must hold; an empty part holds for every request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorizationRule {
    /// Any of these callers; empty: any caller, unauthenticated ones too.
    pub from: Vec<SourceMatch>,
    /// Any of these operations; empty: any operation.
    pub to: Vec<OperationMatch>,
    /// All of these headers.
    pub when: Vec<HeaderCondition>,
}

/// Who may call the workloads a policy protects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// Namespace and name.
    pub name: ObjectName,
    /// `metadata.creationTimestamp`, when known.
    pub created: CreationTime,
    /// The protected workloads.
    pub attachment: Attachment,
    /// Enforce or Shadow.
    pub mode: Mode,
    /// The allow rules; none allows nothing (in Enforce mode, a deny-all).
    pub rules: Vec<AuthorizationRule>,
}
