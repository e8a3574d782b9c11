//! `status` of every Bulwark policy kind: an `Accepted` condition, written by the
//! control plane that holds the status Lease.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The one condition type the control plane sets.
pub const ACCEPTED: &str = "Accepted";

/// Why a policy is (not) accepted: the `reason` of its `Accepted` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Valid, and every target exists: the policy is in force.
    Accepted,
    /// Valid, but a target Service (or its `sectionName` port) does not exist.
    TargetNotFound,
    /// The spec breaks a rule; the message names the field path. The last accepted
    /// version, if any, stays in force.
    Invalid,
    /// Another policy sets the same thing on the same target and wins.
    Conflicted,
}

impl Reason {
    /// The condition's `reason` string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Accepted => "Accepted",
            Reason::TargetNotFound => "TargetNotFound",
            Reason::Invalid => "Invalid",
            Reason::Conflicted => "Conflicted",
        }
    }

    /// The condition's `status`: only an accepted policy is `True`.
    pub const fn status(self) -> &'static str {
        match self {
            Reason::Accepted => "True",
            _ => "False",
        }
    }
}

/// `status` of a policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The policy's conditions; the control plane sets `Accepted` (reasons Accepted,
    /// TargetNotFound, Invalid, Conflicted) with the generation it judged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
    )]
    pub conditions: Vec<Condition>,
}
