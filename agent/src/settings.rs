//! The agent's own settings: where it listens, who it is, where the control plane is.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

pub use crate::limits::Limits;

/// Default outbound listener: apps point `HTTP_PROXY` at it.
pub const DEFAULT_OUTBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4140);
/// Default admin listener (`/metrics`, `/ready`, `/config`).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4191);

/// Default runtime worker threads: one, as a sidecar is given about a core and every
/// request handed between two threads costs futex wake-ups (about two per HTTP/1.1
/// request and five per HTTP/2 request with two; docs/benchmarks.md).
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// Default time to wait for a redirected client's first bytes before treating
/// the connection as opaque TCP (a server-speaks-first protocol).
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Default idle timeout of opaque TCP connections.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Ports of well-known server-speaks-first protocols, opaque by default (as in
/// Linkerd): SMTP 25 and 587, MySQL 3306, Galera 4444, PostgreSQL 5432, Redis
/// 6379, Elasticsearch transport 9300, memcached 11211.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// The pod this agent serves, as told to the control plane.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's service account.
    pub service_account: String,
    /// The pod's labels (they select the Services the pod belongs to).
    pub labels: BTreeMap<String, String>,
}

/// One inbound listener and the local app port it forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct InboundSpec {
    /// Where the listener binds.
    pub listen: SocketAddr,
    /// The app's port on `Settings::app_host`.
    pub app_port: u16,
}

/// An `--inbound` value that is not `ADDR=PORT`.
#[derive(Debug, thiserror::Error)]
#[error("invalid inbound listener {0:?}: expected LISTEN_ADDR=APP_PORT, e.g. 0.0.0.0:4143=8080")]
pub struct InvalidInbound(String);

impl FromStr for InboundSpec {
    type Err = InvalidInbound;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidInbound(s.to_owned());
        let (listen, port) = s.split_once('=').ok_or_else(err)?;
        Ok(Self {
            listen: listen.trim().parse().map_err(|_| err())?,
            app_port: port.trim().parse().map_err(|_| err())?,
        })
    }
}

/// Everything the agent needs to start; derives `Serialize` for the admin `/config` dump.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// The control plane's gRPC address, e.g. `http://bulwark-control-plane.bulwark:9990`.
    pub control_plane: String,
    /// Who this agent is.
    pub identity: Identity,
    /// The outbound (app → mesh) listener.
    pub outbound_addr: SocketAddr,
    /// A second outbound listener for IPv6 (e.g. `[::1]:4140`): `ip6tables`
    /// redirects a pod's outbound IPv6 TCP to `::1`.
    pub outbound_addr_v6: Option<SocketAddr>,
    /// Inbound (mesh → app) listeners.
    pub inbounds: Vec<InboundSpec>,
    /// The admin listener.
    pub admin_addr: SocketAddr,
    /// Where the local app listens.
    pub app_host: IpAddr,
    /// How long shutdown waits for in-flight requests.
    #[serde(with = "humantime_ms")]
    pub drain_timeout: Duration,
    /// The transparent inbound listener (iptables redirects the pod's inbound
    /// TCP here); the app port is the port each client dialled.
    pub inbound_transparent: Option<SocketAddr>,
    /// How long to wait for a redirected client's first bytes (protocol detection).
    #[serde(with = "humantime_ms")]
    pub detect_timeout: Duration,
    /// Ports whose redirected connections are opaque TCP, never detected.
    pub opaque_ports: Vec<u16>,
    /// How long an opaque TCP connection may stay silent both ways.
    #[serde(with = "humantime_ms")]
    pub tcp_idle_timeout: Duration,
    /// Inbound requests and connections in the app at once (none: unlimited).
    pub inbound_max_concurrency: Option<usize>,
    /// Append the client's address to `X-Forwarded-For` on inbound HTTP requests.
    pub forwarded_for: bool,
    /// The mesh's trust anchors (PEM), to verify an `https://` control plane.
    pub control_plane_ca: Option<std::path::PathBuf>,
    /// The pod's projected ServiceAccount token (audience bulwark): sent to the
    /// control plane with every subscription and certificate request. With an
    /// `https://` control plane the agent also gets a workload certificate.
    pub token_file: Option<std::path::PathBuf>,
    /// What every listener holds its clients to (timeouts, connections, header sizes).
    pub limits: Limits,
    /// Let `CONNECT` and absolute-form requests reach destinations outside the mesh;
    /// off: only mesh destinations. The agent's own listeners are never reachable so.
    pub proxy_passthrough: bool,
    /// Distinct caller identities that get a `caller` label of their own on inbound
    /// metrics; later ones are labelled `other`.
    pub max_caller_labels: usize,
    /// The rate-limit store (Redis) of Shared limits; none: Shared limits apply their
    /// onStoreUnavailable mode.
    pub rate_limit_store: Option<crate::policy::ratelimit::store::StoreSettings>,
}

impl Settings {
    /// Settings with the default ports for an agent of `identity`.
    pub fn new(control_plane: impl Into<String>, identity: Identity) -> Self {
        Self {
            control_plane: control_plane.into(),
            identity,
            outbound_addr: DEFAULT_OUTBOUND,
            outbound_addr_v6: None,
            inbounds: Vec::new(),
            admin_addr: DEFAULT_ADMIN,
            app_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            drain_timeout: Duration::from_secs(5),
            inbound_transparent: None,
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            opaque_ports: DEFAULT_OPAQUE_PORTS.to_vec(),
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            inbound_max_concurrency: None,
            forwarded_for: false,
            control_plane_ca: None,
            token_file: None,
            limits: Limits::default(),
            proxy_passthrough: crate::limits::DEFAULT_PROXY_PASSTHROUGH,
            max_caller_labels: crate::metrics::DEFAULT_MAX_CALLER_LABELS,
            rate_limit_store: None,
        }
    }
}

/// Serialises a duration as milliseconds for the admin dump.
mod humantime_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inbound_specs() {
        let spec: InboundSpec = "127.0.0.1:4143=8080".parse().unwrap();
        assert_eq!(spec.listen, "127.0.0.1:4143".parse().unwrap());
        assert_eq!(spec.app_port, 8080);
        assert!("127.0.0.1:4143".parse::<InboundSpec>().is_err());
        assert!("nonsense=80".parse::<InboundSpec>().is_err());
        assert!("127.0.0.1:1=99999".parse::<InboundSpec>().is_err());
    }
}
