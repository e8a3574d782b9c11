//! Core `v1/Service`: the fields the mesh uses (others, such as `type`, are ignored).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;
use serde::de::{self, Visitor};

use super::meta::ObjectMeta;
use super::{FieldError, field, item};
use crate::model;

/// A `Service` object.
#[derive(Clone, Debug, Deserialize)]
pub struct Service {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: Option<ServiceSpec>,
}

/// `spec` of a Service.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Pod labels that select the service's pods.
    pub selector: Option<BTreeMap<String, String>>,
    /// `clusterIP` (`None` for headless).
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `clusterIPs`, which wins over `clusterIP` when present.
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    /// The ports.
    pub ports: Option<Vec<ServicePortSpec>>,
}

/// `spec.ports[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortSpec {
    /// Required when there is more than one port.
    pub name: Option<String>,
    /// The port clients call.
    pub port: Option<i64>,
    /// The pod's port: number or container port name; `port` when absent.
    pub target_port: Option<IntOrString>,
    /// `TCP` (default), `UDP` or `SCTP`.
    pub protocol: Option<String>,
    /// Application protocol hint (`http`, `kubernetes.io/h2c`, ...).
    pub app_protocol: Option<String>,
}

/// A Kubernetes int-or-string value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntOrString {
    /// A number.
    Int(i64),
    /// A string.
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntOrStringVisitor;

        impl Visitor<'_> for IntOrStringVisitor {
            type Value = IntOrString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("port {v} is out of range")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_owned()))
            }
        }

        deserializer.deserialize_any(IntOrStringVisitor)
    }
}

/// A port number in 1..=65535.
pub(crate) fn port_number(value: i64, path: impl Into<String>) -> Result<u16, FieldError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(FieldError::new(
            path,
            format!("must be a port number between 1 and 65535, got {value}"),
        )),
    }
}

/// `TCP` (the default), `UDP` or `SCTP`.
pub(crate) fn protocol(value: Option<&str>, path: &str) -> Result<model::Protocol, FieldError> {
    match value {
        None | Some("TCP") => Ok(model::Protocol::Tcp),
        Some("UDP") => Ok(model::Protocol::Udp),
        Some("SCTP") => Ok(model::Protocol::Sctp),
        Some(other) => Err(FieldError::new(
            field(path, "protocol"),
            format!("must be TCP, UDP or SCTP, got {other:?}"),
        )),
    }
}

impl TryFrom<Service> for model::Service {
    type Error = FieldError;

    fn try_from(service: Service) -> Result<Self, FieldError> {
        let name = service.metadata.object_name()?;
        let spec = service.spec.ok_or_else(|| FieldError::required("spec"))?;

        let cluster_ips = match (spec.cluster_ips, spec.cluster_ip) {
            (Some(ips), _) => ips
                .iter()
                .enumerate()
                .filter_map(|(i, ip)| cluster_ip(ip, || item("spec.clusterIPs", i)).transpose())
                .collect::<Result<Vec<_>, _>>()?,
            (None, Some(ip)) => cluster_ip(&ip, || "spec.clusterIP".to_owned())?
                .into_iter()
                .collect(),
            (None, None) => Vec::new(),
        };

        let specs = spec.ports.unwrap_or_default();
        let several = specs.len() > 1;
        let mut names = HashSet::new();
        let mut ports = Vec::with_capacity(specs.len());
        for (i, p) in specs.into_iter().enumerate() {
            let path = item("spec.ports", i);
            let port_name = p.name.unwrap_or_default();
            if port_name.is_empty() && several {
                return Err(FieldError::new(
                    field(&path, "name"),
                    "required when a service has more than one port",
                ));
            }
            if !names.insert(port_name.clone()) {
                return Err(FieldError::new(
                    field(&path, "name"),
                    format!("duplicate port name {port_name:?}"),
                ));
            }
            let port = port_number(
                p.port
                    .ok_or_else(|| FieldError::required(field(&path, "port")))?,
                field(&path, "port"),
            )?;
            let target_port = match p.target_port {
                None => model::TargetPort::Number(port),
                Some(IntOrString::Int(n)) => {
                    model::TargetPort::Number(port_number(n, field(&path, "targetPort"))?)
                }
                Some(IntOrString::String(s)) if s.is_empty() => {
                    return Err(FieldError::new(
                        field(&path, "targetPort"),
                        "must be a port number or a non-empty port name",
                    ));
                }
                Some(IntOrString::String(s)) => model::TargetPort::Name(s),
            };
            ports.push(model::ServicePort {
                name: port_name,
                port,
                target_port,
                protocol: protocol(p.protocol.as_deref(), &path)?,
                app_protocol: p.app_protocol.filter(|a| !a.is_empty()),
            });
        }

        Ok(model::Service {
            name,
            // An empty selector selects nothing: the endpoints are managed by hand.
            selector: spec.selector.filter(|s| !s.is_empty()),
            cluster_ips,
            ports,
        })
    }
}

/// A cluster IP, or `None` for the headless markers `None` and `""`.
fn cluster_ip(value: &str, path: impl FnOnce() -> String) -> Result<Option<IpAddr>, FieldError> {
    if value.is_empty() || value == "None" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| FieldError::new(path(), format!("{value:?} is not an IP address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Result<model::Service, FieldError> {
        let full = format!("metadata: {{name: web, namespace: demo}}\nspec:\n{yaml}");
        let s: Service =
            serde_yaml_ng::from_str(&full).map_err(|e| FieldError::new("", e.to_string()))?;
        s.try_into()
    }

    #[test]
    fn reads_ports_cluster_ips_and_selector() {
        let s = service(
            "  selector: {app: web}\n  clusterIP: 10.0.0.1\n  clusterIPs: [10.0.0.1, 'fd00::1']\n\
             \x20 type: ClusterIP\n\
             \x20 ports:\n\
             \x20 - {name: http, port: 80, targetPort: 8080, appProtocol: http}\n\
             \x20 - {name: grpc, port: 9090, targetPort: grpc-port, protocol: TCP}\n\
             \x20 - {name: dns, port: 53, protocol: UDP}\n",
        )
        .unwrap();
        assert_eq!(s.selector.unwrap()["app"], "web");
        assert_eq!(s.cluster_ips.len(), 2);
        assert_eq!(s.ports[0].target_port, model::TargetPort::Number(8080));
        assert_eq!(s.ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(
            s.ports[1].target_port,
            model::TargetPort::Name("grpc-port".into())
        );
        assert_eq!(
            s.ports[2].target_port,
            model::TargetPort::Number(53),
            "defaults to port"
        );
        assert_eq!(s.ports[2].protocol, model::Protocol::Udp);
    }

    #[test]
    fn headless_and_selectorless_services() {
        let s = service("  clusterIP: None\n  selector: {}\n  ports: [{port: 80}]\n").unwrap();
        assert!(s.cluster_ips.is_empty());
        assert_eq!(s.selector, None);
        assert_eq!(s.ports[0].name, "");
    }

    #[test]
    fn invalid_services_name_the_field() {
        let err = |yaml: &str| service(yaml).unwrap_err().to_string();
        assert_eq!(
            err("  ports: [{port: 0}]\n"),
            "spec.ports[0].port: must be a port number between 1 and 65535, got 0"
        );
        assert_eq!(
            err("  ports: [{name: a}]\n"),
            "spec.ports[0].port: required"
        );
        assert_eq!(
            err("  ports: [{name: a, port: 1}, {port: 2}]\n"),
            "spec.ports[1].name: required when a service has more than one port"
        );
        assert_eq!(
            err("  ports: [{name: a, port: 1}, {name: a, port: 2}]\n"),
            "spec.ports[1].name: duplicate port name \"a\""
        );
        assert_eq!(
            err("  ports: [{port: 80, targetPort: 70000}]\n"),
            "spec.ports[0].targetPort: must be a port number between 1 and 65535, got 70000"
        );
        assert_eq!(
            err("  ports: [{port: 80, protocol: tcp}]\n"),
            "spec.ports[0].protocol: must be TCP, UDP or SCTP, got \"tcp\""
        );
        assert_eq!(
            err("  clusterIPs: [10.0.0.1, nope]\n"),
            "spec.clusterIPs[1]: \"nope\" is not an IP address"
        );
    }
}
