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

impl Pod {
    /// Validates the pod for the model. A bad [`model::WEIGHT_ANNOTATION`] does not cost
    /// the pod its endpoints: it weighs 1, and the problem goes to `ignored` for the
    /// source to report (once per value, not at every re-decode of the pod).
    pub fn into_model(self, ignored: &mut Vec<FieldError>) -> Result<model::Pod, FieldError> {
        let pod = self;
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
        let weight = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(model::WEIGHT_ANNOTATION))
            .and_then(|value| match parse_weight(value) {
                Ok(weight) => Some(weight),
                Err(why) => {
                    ignored.push(FieldError::new(
                        format!("metadata.annotations[{}]", model::WEIGHT_ANNOTATION),
                        format!("{value:?} is {why}; the pod weighs 1"),
                    ));
                    None
                }
            });
        let meshed = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(model::INJECTED_ANNOTATION));
        Ok(model::Pod {
            name,
            weight,
            meshed,
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

/// A weight annotation's value: an integer from 1 to [`model::MAX_WEIGHT`].
fn parse_weight(value: &str) -> Result<u32, &'static str> {
    match value.trim().parse::<u32>() {
        Ok(w) if (1..=model::MAX_WEIGHT).contains(&w) => Ok(w),
        Ok(_) => Err("not between 1 and 10000"),
        Err(_) => Err("not an integer"),
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
        let pod = pod.into_model(&mut Vec::new()).unwrap();
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
        let pod = pod.into_model(&mut Vec::new()).unwrap();
        assert_eq!(pod.service_account, "web");
    }

    #[test]
    fn reads_the_weight_annotation_and_notes_bad_values() {
        let weight = |value: &str| {
            let pod: Pod = serde_yaml_ng::from_str(&format!(
                "metadata: {{name: p, annotations: {{bulwark.io/weight: {value:?}}}}}\n"
            ))
            .unwrap();
            let mut ignored = Vec::new();
            let weight = pod.into_model(&mut ignored).unwrap().weight;
            (
                weight,
                ignored
                    .into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(weight("3"), (Some(3), vec![]));
        assert_eq!(weight(" 10000 "), (Some(10_000), vec![]));
        assert_eq!(weight("0").0, None);
        assert_eq!(weight("10001").0, None);
        assert_eq!(weight("-2").0, None);
        assert_eq!(
            weight("heavy"),
            (
                None,
                vec![
                    "metadata.annotations[bulwark.io/weight]: \"heavy\" is not an integer; the pod \
                     weighs 1"
                        .to_owned()
                ]
            )
        );
        assert_eq!(weight("0").1.len(), 1);
        let pod: Pod = serde_yaml_ng::from_str("metadata: {name: p}\n").unwrap();
        let mut ignored = Vec::new();
        assert_eq!(pod.into_model(&mut ignored).unwrap().weight, None);
        assert!(ignored.is_empty());
    }

    #[test]
    fn a_bad_ip_names_its_field() {
        let pod: Pod =
            serde_yaml_ng::from_str("metadata: {name: p}\nstatus: {podIPs: [{ip: x}]}\n").unwrap();
        let err = pod.into_model(&mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "status.podIPs[0].ip: \"x\" is not an IP address"
        );
    }
}
