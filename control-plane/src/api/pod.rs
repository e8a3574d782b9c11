//! Core `v1/Pod`: only its labels and IPs, to label the endpoints it backs.

use std::net::IpAddr;

use serde::Deserialize;

use super::meta::ObjectMeta;
use super::{FieldError, item};
use crate::model;

/// A `Pod` object (of its `spec`, only the service account is read).
#[derive(Clone, Debug, Deserialize)]
pub struct Pod {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: Option<PodSpec>,
    /// `status`.
    pub status: Option<PodStatus>,
}

/// `spec` of a Pod.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// `spec.serviceAccountName`; `default` when absent.
    pub service_account_name: Option<String>,
}

/// `status` of a Pod.
#[derive(Clone, Debug, Deserialize)]
pub struct PodStatus {
    /// `status.podIP`.
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// `status.podIPs`.
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

/// `status.podIPs[]`.
#[derive(Clone, Debug, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: Option<String>,
}

impl TryFrom<Pod> for model::Pod {
    type Error = FieldError;

    fn try_from(pod: Pod) -> Result<Self, FieldError> {
        let name = pod.metadata.object_name()?;
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(status) = pod.status {
            let listed = status
                .pod_ips
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    p.ip.map(|ip| (format!("{}.ip", item("status.podIPs", i)), ip))
                });
            let single = status.pod_ip.map(|ip| ("status.podIP".to_owned(), ip));
            for (path, ip) in single.into_iter().chain(listed) {
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| FieldError::new(path, format!("{ip:?} is not an IP address")))?;
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        Ok(model::Pod {
            name,
            labels: pod.metadata.labels.unwrap_or_default(),
            ips,
            service_account: pod
                .spec
                .and_then(|s| s.service_account_name)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labels_and_ips() {
        let pod: Pod = serde_yaml_ng::from_str(
            "metadata: {name: web-0, labels: {app: web}}\n\
             spec: {containers: [{name: app, image: x}]}\n\
             status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}\n",
        )
        .unwrap();
        let pod = model::Pod::try_from(pod).unwrap();
        assert_eq!(pod.name.to_string(), "default/web-0");
        assert_eq!(pod.labels["app"], "web");
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.service_account, "default");

        let pod: Pod = serde_yaml_ng::from_str(
            "metadata: {name: web-1}
spec: {serviceAccountName: web}
",
        )
        .unwrap();
        assert_eq!(model::Pod::try_from(pod).unwrap().service_account, "web");
    }

    #[test]
    fn a_bad_ip_names_its_field() {
        let pod: Pod =
            serde_yaml_ng::from_str("metadata: {name: p}\nstatus: {podIPs: [{ip: x}]}\n").unwrap();
        let err = model::Pod::try_from(pod).unwrap_err();
        assert_eq!(
            err.to_string(),
            "status.podIPs[0].ip: \"x\" is not an IP address"
        );
    }
}
