//! `discovery.k8s.io/v1/EndpointSlice`: the endpoints behind a Service.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::Deserialize;

use super::meta::ObjectMeta;
use super::service::{port_number, protocol};
use super::{FieldError, field, item};
use crate::model::{self, ObjectName};

/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An `EndpointSlice` object.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// `metadata`; `labels["kubernetes.io/service-name"]` names the Service.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `IPv4` or `IPv6` (`FQDN` is not supported).
    pub address_type: Option<String>,
    /// The ports every endpoint serves.
    pub ports: Option<Vec<EndpointPortSpec>>,
    /// The endpoints.
    pub endpoints: Option<Vec<EndpointSpec>>,
}

/// `ports[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPortSpec {
    /// Matches the Service port of the same name.
    pub name: Option<String>,
    /// The port number on the endpoints.
    pub port: Option<i64>,
    /// `TCP` (default), `UDP` or `SCTP`.
    pub protocol: Option<String>,
}

/// `endpoints[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// The endpoint's addresses; Kubernetes treats them as fungible, we use the first.
    pub addresses: Option<Vec<String>>,
    /// Readiness.
    pub conditions: Option<ConditionsSpec>,
    /// The pod behind the endpoint.
    pub target_ref: Option<ObjectReference>,
}

/// `endpoints[].conditions`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionsSpec {
    /// Absent means ready.
    pub ready: Option<bool>,
}

/// `endpoints[].targetRef`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    /// `Pod` for the references we use.
    pub kind: Option<String>,
    /// The object's name.
    pub name: Option<String>,
    /// The object's namespace; the slice's when absent.
    pub namespace: Option<String>,
}

impl TryFrom<EndpointSlice> for model::EndpointSlice {
    type Error = FieldError;

    fn try_from(slice: EndpointSlice) -> Result<Self, FieldError> {
        let name = slice.metadata.object_name()?;
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty())
            .cloned()
            .ok_or_else(|| {
                FieldError::new(
                    "metadata.labels",
                    format!(
                        "the label {SERVICE_NAME_LABEL} is required: it names the slice's Service"
                    ),
                )
            })?;
        let ipv6 = match slice.address_type.as_deref() {
            Some("IPv4") => false,
            Some("IPv6") => true,
            Some("FQDN") => {
                return Err(FieldError::new(
                    "addressType",
                    "FQDN slices are not supported: agents need IP addresses",
                ));
            }
            Some(other) => {
                return Err(FieldError::new(
                    "addressType",
                    format!("must be IPv4 or IPv6, got {other:?}"),
                ));
            }
            None => return Err(FieldError::required("addressType")),
        };

        let mut names = HashSet::new();
        let mut ports = Vec::new();
        for (i, p) in slice.ports.unwrap_or_default().into_iter().enumerate() {
            let path = item("ports", i);
            let port_name = p.name.unwrap_or_default();
            if !names.insert(port_name.clone()) {
                return Err(FieldError::new(
                    field(&path, "name"),
                    format!("duplicate port name {port_name:?}"),
                ));
            }
            let number = p.port.ok_or_else(|| {
                FieldError::new(
                    field(&path, "port"),
                    "required: a slice port without a number is not supported",
                )
            })?;
            ports.push(model::EndpointPort {
                name: port_name,
                port: port_number(number, field(&path, "port"))?,
                protocol: protocol(p.protocol.as_deref(), &path)?,
            });
        }

        let mut endpoints = Vec::new();
        for (i, e) in slice.endpoints.unwrap_or_default().into_iter().enumerate() {
            let path = item("endpoints", i);
            let addresses = e.addresses.unwrap_or_default();
            if addresses.is_empty() {
                return Err(FieldError::new(
                    field(&path, "addresses"),
                    "must hold at least one address",
                ));
            }
            let mut parsed = Vec::with_capacity(addresses.len());
            for (j, a) in addresses.iter().enumerate() {
                let at = item(&field(&path, "addresses"), j);
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| FieldError::new(&at, format!("{a:?} is not an IP address")))?;
                if ip.is_ipv6() != ipv6 {
                    let family = if ipv6 { "IPv6" } else { "IPv4" };
                    return Err(FieldError::new(
                        at,
                        format!("{a} does not match the slice's addressType {family}"),
                    ));
                }
                parsed.push(ip);
            }
            let pod = e
                .target_ref
                .and_then(|r| match (r.kind.as_deref(), r.name) {
                    (Some("Pod"), Some(pod)) if !pod.is_empty() => Some(ObjectName::new(
                        r.namespace.unwrap_or_else(|| name.namespace.clone()),
                        pod,
                    )),
                    _ => None,
                });
            endpoints.push(model::Endpoint {
                address: parsed[0],
                ready: e.conditions.and_then(|c| c.ready).unwrap_or(true),
                pod,
            });
        }

        Ok(model::EndpointSlice {
            name,
            service,
            ports,
            endpoints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(body: &str) -> Result<model::EndpointSlice, FieldError> {
        let yaml = format!(
            "metadata: {{name: s, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}\n{body}"
        );
        let s: EndpointSlice = serde_yaml_ng::from_str(&yaml).unwrap();
        s.try_into()
    }

    #[test]
    fn reads_ports_endpoints_readiness_and_pods() {
        let s = slice(
            "addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n\
             - {addresses: [10.0.0.1], conditions: {ready: true}, targetRef: {kind: Pod, name: web-0}}\n\
             - {addresses: [10.0.0.2], conditions: {ready: false, serving: true}, nodeName: n1}\n\
             - {addresses: [10.0.0.3]}\n",
        )
        .unwrap();
        assert_eq!(s.service, "web");
        assert_eq!(s.ports[0].port, 8080);
        assert_eq!(s.endpoints[0].pod, Some(ObjectName::new("demo", "web-0")));
        assert!(s.endpoints[0].ready);
        assert!(!s.endpoints[1].ready);
        assert!(s.endpoints[2].ready, "absent readiness counts as ready");
    }

    #[test]
    fn invalid_slices_name_the_field() {
        let err = |body: &str| slice(body).unwrap_err().to_string();
        assert_eq!(err("ports: []\n"), "addressType: required");
        assert!(
            err("addressType: FQDN\n").starts_with("addressType: FQDN slices are not supported")
        );
        assert_eq!(
            err("addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [nope]}]\n"),
            "endpoints[1].addresses[0]: \"nope\" is not an IP address"
        );
        assert_eq!(
            err("addressType: IPv4\nendpoints: [{addresses: ['::1']}]\n"),
            "endpoints[0].addresses[0]: ::1 does not match the slice's addressType IPv4"
        );
        assert_eq!(
            err("addressType: IPv4\nports: [{name: a, port: 0}]\n"),
            "ports[0].port: must be a port number between 1 and 65535, got 0"
        );
        assert_eq!(
            err("addressType: IPv4\nendpoints: [{conditions: {ready: true}}]\n"),
            "endpoints[0].addresses: must hold at least one address"
        );

        let unlabeled: EndpointSlice =
            serde_yaml_ng::from_str("metadata: {name: s}\naddressType: IPv4\n").unwrap();
        let err = model::EndpointSlice::try_from(unlabeled).unwrap_err();
        assert_eq!(err.path, "metadata.labels");
        assert!(err.reason.contains(SERVICE_NAME_LABEL));
    }
}
