//! Problems found while attaching policies: not errors in any one document, but
//! combinations an operator should hear about. Each is logged once, when it appears.

use std::fmt;

use tracing::{info, warn};

use crate::model::{Kind, ObjectName};

/// A policy that cannot (fully) take effect, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Diagnostic {
    /// Two ResiliencePolicies attach to the same service port; only the winner applies.
    Conflict {
        /// The service.
        service: ObjectName,
        /// The port's name.
        port: String,
        /// The policy in force.
        winner: ObjectName,
        /// The policy that is not applied to this port.
        loser: ObjectName,
    },
    /// A policy targets a Service that does not exist (yet); it applies once it does.
    MissingService {
        /// The policy's kind.
        kind: Kind,
        /// The policy.
        policy: ObjectName,
        /// The missing service's name (in the policy's namespace).
        service: String,
    },
    /// A policy's `sectionName` matches no TCP port of the service.
    MissingSection {
        /// The policy's kind.
        kind: Kind,
        /// The policy.
        policy: ObjectName,
        /// The service.
        service: String,
        /// The section (port name) that does not exist.
        section: String,
    },
    /// A named `targetPort` that no EndpointSlice port resolves, so a rate limit has no port.
    UnresolvedTargetPort {
        /// The policy's kind (RateLimitPolicy or AuthorizationPolicy).
        kind: Kind,
        /// The policy.
        policy: ObjectName,
        /// The service.
        service: String,
        /// The service port's name.
        port: String,
        /// The named target port.
        target_port: String,
    },
    /// An inbound policy (RateLimitPolicy, AuthorizationPolicy) targets a Service
    /// without a selector: no agent enforces it.
    NoSelector {
        /// The policy's kind.
        kind: Kind,
        /// The policy.
        policy: ObjectName,
        /// The service.
        service: String,
    },
    /// Two PeerAuthentications cover the same pods: both namespace-wide in one
    /// namespace, or both selecting a pod of the model by label. Only the winner (the
    /// older, by creation time then name) sets those pods' mode.
    PeerAuthenticationConflict {
        /// The policy in force there.
        winner: ObjectName,
        /// The policy that is not applied there.
        loser: ObjectName,
        /// Both are namespace-wide (otherwise both select some pod).
        namespace_wide: bool,
    },
    /// An HTTPRoute backend names a Service or port that does not exist: its share of
    /// the traffic gets 500.
    UnresolvedBackend {
        /// HTTPRoute or GRPCRoute.
        kind: Kind,
        /// The route.
        route: ObjectName,
        /// The backend Service's name (in the route's namespace).
        service: String,
        /// The backend port.
        port: u16,
    },
}

impl Diagnostic {
    /// Where a PeerAuthentication conflict is, in words: every pod of the namespace, or
    /// the pods that both policies select.
    pub fn peer_authentication_place(winner: &ObjectName, namespace_wide: bool) -> String {
        if namespace_wide {
            format!("every pod of namespace {}", winner.namespace)
        } else {
            "the pods both select".to_owned()
        }
    }

    /// Logs the diagnostic at the level it deserves.
    pub fn log(&self) {
        match self {
            Diagnostic::Conflict {
                service,
                port,
                winner,
                loser,
            } => warn!(
                %service, port = %port, %winner, %loser,
                "two ResiliencePolicies attach to the same port; the more specific, then the older, wins"
            ),
            Diagnostic::MissingService {
                kind,
                policy,
                service,
            } => info!(
                %kind, %policy, %service,
                "policy targets a Service that does not exist; it applies once the Service appears"
            ),
            Diagnostic::MissingSection {
                kind,
                policy,
                service,
                section,
            } => warn!(
                %kind, %policy, %service, section = %section,
                "policy's sectionName matches no TCP port of the Service"
            ),
            Diagnostic::UnresolvedTargetPort {
                kind,
                policy,
                service,
                port,
                target_port,
            } => warn!(
                %kind, %policy, %service, port = %port, target_port = %target_port,
                "named targetPort matches no EndpointSlice port; the policy has no port to apply to"
            ),
            Diagnostic::NoSelector {
                kind,
                policy,
                service,
            } => warn!(
                %kind, %policy, %service,
                "the policy targets a Service without a selector; no pod enforces it"
            ),
            Diagnostic::PeerAuthenticationConflict {
                winner,
                loser,
                namespace_wide,
            } => warn!(
                %winner, %loser, namespace_wide,
                "two PeerAuthentications cover the same pods; a selector policy beats a \
                 namespace-wide one, then the older wins"
            ),
            Diagnostic::UnresolvedBackend {
                kind,
                route,
                service,
                port,
            } => warn!(
                kind = kind.as_str(), %route, %service, port,
                "route backend names no such Service port; its share of requests gets 500"
            ),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnostic::Conflict {
                service,
                port,
                winner,
                loser,
            } => write!(
                f,
                "ResiliencePolicy {loser} is not applied to {service} port {port:?}: {winner} wins"
            ),
            Diagnostic::MissingService {
                kind,
                policy,
                service,
            } => write!(
                f,
                "{kind} {policy} targets Service {service}, which does not exist"
            ),
            Diagnostic::MissingSection {
                kind,
                policy,
                service,
                section,
            } => write!(
                f,
                "{kind} {policy} targets section {section:?} of Service {service}, which has no such TCP port"
            ),
            Diagnostic::UnresolvedTargetPort {
                kind,
                policy,
                service,
                port,
                target_port,
            } => write!(
                f,
                "{kind} {policy}: Service {service} port {port:?} has targetPort \
                 {target_port:?}, which no EndpointSlice port resolves"
            ),
            Diagnostic::NoSelector {
                kind,
                policy,
                service,
            } => write!(
                f,
                "{kind} {policy} targets Service {service}, which has no selector"
            ),
            Diagnostic::PeerAuthenticationConflict {
                winner,
                loser,
                namespace_wide,
            } => write!(
                f,
                "PeerAuthentication {loser} is not applied to {}: {winner} wins",
                Diagnostic::peer_authentication_place(winner, *namespace_wide)
            ),
            Diagnostic::UnresolvedBackend {
                kind,
                route,
                service,
                port,
            } => write!(
                f,
                "{kind} {route}: backend Service {service} port {port} does not exist; \
                 its share of requests gets 500"
            ),
        }
    }
}
