//! Whether an inbound port takes plaintext callers (PeerAuthentication): Permissive
//! takes mutual TLS and plaintext, Strict only mutual TLS.

use std::collections::HashMap;

use bulwark_proto::v1;
use serde::Serialize;

/// The mutual-TLS mode of a port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Mutual TLS and plaintext both accepted.
    #[default]
    Permissive,
    /// Plaintext connections are closed.
    Strict,
}

impl Mode {
    fn from_proto(mode: i32) -> Mode {
        // An unknown value comes from a newer control plane; Strict is the safe reading
        // of a mode this agent does not know only if it could enforce it, which it can.
        match v1::MtlsMode::try_from(mode) {
            Ok(v1::MtlsMode::Strict) => Mode::Strict,
            Ok(v1::MtlsMode::Permissive | v1::MtlsMode::Unspecified) => Mode::Permissive,
            Err(_) => Mode::Strict,
        }
    }
}

/// The pod's inbound mutual-TLS modes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// `namespace/name` of the policy (empty: none, Permissive).
    pub source: String,
    mode: Mode,
    ports: HashMap<u16, Mode>,
}

impl PeerAuthentication {
    /// The modes a snapshot sets (none: Permissive everywhere). Ports out of range are
    /// ignored: no pod port can match them.
    pub fn from_proto(proto: Option<&v1::PeerAuthentication>) -> Self {
        let Some(p) = proto else {
            return Self::default();
        };
        PeerAuthentication {
            source: p.source.clone(),
            mode: Mode::from_proto(p.mode),
            ports: p
                .port_modes
                .iter()
                .filter_map(|(port, mode)| {
                    Some((u16::try_from(*port).ok()?, Mode::from_proto(*mode)))
                })
                .collect(),
        }
    }

    /// The mode of the local (pod) `port`.
    pub fn mode(&self, port: u16) -> Mode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }

    /// Whether `port` refuses plaintext.
    pub fn strict(&self, port: u16) -> bool {
        self.mode(port) == Mode::Strict
    }

    /// The modes for the admin `/config` page.
    pub fn to_json(&self) -> serde_json::Value {
        let mut ports: Vec<_> = self.ports.iter().collect();
        ports.sort_by_key(|(port, _)| **port);
        serde_json::json!({
            "source": self.source,
            "mode": self.mode,
            "ports": ports.into_iter().map(|(p, m)| serde_json::json!({"port": p, "mode": m})).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_policy_is_permissive_and_ports_override_the_pod_mode() {
        assert!(!PeerAuthentication::from_proto(None).strict(8080));
        let strict = v1::PeerAuthentication {
            source: "shop/strict".into(),
            mode: v1::MtlsMode::Strict as i32,
            port_modes: [(9090, v1::MtlsMode::Permissive as i32), (70_000, 1)].into(),
        };
        let pa = PeerAuthentication::from_proto(Some(&strict));
        assert!(pa.strict(8080));
        assert!(!pa.strict(9090), "the port's own mode wins");
        let unset = v1::PeerAuthentication {
            mode: v1::MtlsMode::Unspecified as i32,
            ..Default::default()
        };
        assert!(!PeerAuthentication::from_proto(Some(&unset)).strict(8080));
    }

    #[test]
    fn a_mode_this_agent_does_not_know_is_read_as_strict() {
        let newer = v1::PeerAuthentication {
            mode: 7,
            ..Default::default()
        };
        assert!(PeerAuthentication::from_proto(Some(&newer)).strict(80));
    }
}
