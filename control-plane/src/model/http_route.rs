//! A validated Gateway API `HTTPRoute` in the mesh profile (GAMMA): rules that split
//! the traffic of a Service port over weighted backend Services.

use std::cmp::Ordering;

use super::ObjectName;
use crate::timestamp::Timestamp;

/// A validated HTTPRoute. Only its Service parents are kept: parents of other kinds
/// (Gateways) belong to another implementation.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    /// The route's namespace and name.
    pub name: ObjectName,
    /// When it was created: older routes win precedence ties.
    pub created: Option<Timestamp>,
    /// The Service ports whose traffic the route takes (empty: none of ours).
    pub parents: Vec<ParentRef>,
    /// The rules, in manifest order.
    pub rules: Vec<Rule>,
}

/// A parent Service (in the route's namespace), narrowed to one port or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    /// The Service's name.
    pub service: String,
    /// `port`: only this port number.
    pub port: Option<u16>,
    /// `sectionName`: only the port of this name.
    pub section: Option<String>,
}

impl ParentRef {
    /// Whether the reference covers this port of its service.
    pub fn covers(&self, port: u16, name: &str) -> bool {
        self.port.is_none_or(|p| p == port) && self.section.as_deref().is_none_or(|s| s == name)
    }
}

/// One rule: requests any of `matches` selects go to `backends` by weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// ORed; never empty (a rule without matches gets the default `PathPrefix /`).
    pub matches: Vec<Match>,
    /// The weighted backends (may be empty or all zero: such requests get 500).
    pub backends: Vec<Backend>,
    /// The RequestHeaderModifier filter, if any.
    pub request_headers: Option<HeaderModifier>,
}

/// Header changes (names lower case, each at most once per list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    /// Replace the value (add when absent).
    pub set: Vec<(String, String)>,
    /// Append a value.
    pub add: Vec<(String, String)>,
    /// Remove.
    pub remove: Vec<String>,
}

/// Conditions that must all hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    /// The path condition (default `PathPrefix /`).
    pub path: PathMatch,
    /// Header conditions (names lower case, unique).
    pub headers: Vec<HeaderMatch>,
    /// The method, upper case.
    pub method: Option<String>,
}

impl Match {
    /// The Gateway API's precedence between matches, most specific first: an exact path,
    /// then the longest prefix, then a method, then the most headers. The spec leaves
    /// regular expressions to implementations: like Linkerd, they rank after exact paths
    /// and before prefixes (longer first), so that a regex rule is not shadowed by the
    /// default `PathPrefix /` of a rule without matches.
    pub fn precedence(&self, other: &Match) -> Ordering {
        let rank = |m: &Match| match &m.path {
            PathMatch::Exact(v) => (0, std::cmp::Reverse(v.len())),
            PathMatch::Regex(v) => (1, std::cmp::Reverse(v.len())),
            PathMatch::Prefix(v) => (2, std::cmp::Reverse(v.len())),
        };
        rank(self)
            .cmp(&rank(other))
            .then_with(|| other.method.is_some().cmp(&self.method.is_some()))
            .then_with(|| other.headers.len().cmp(&self.headers.len()))
    }
}

/// A path condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole leading segments (`/a` matches `/a`, `/a/`, `/a/b`, not `/ab`).
    Prefix(String),
    /// A regular expression the whole path must match.
    Regex(String),
}

/// A header condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// The header name, lower case.
    pub name: String,
    /// What its value must be.
    pub value: ValueMatch,
}

/// A value condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    /// Equal, case-sensitive.
    Exact(String),
    /// The whole value matches the regular expression.
    Regex(String),
}

/// A weighted backend: a Service port in the route's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The Service's name.
    pub service: String,
    /// The Service port number.
    pub port: u16,
    /// Relative weight (0: none of the traffic).
    pub weight: u32,
}
