//! Workload identity: the control plane is the mesh's certificate authority.
//!
//! An agent proves who it is with its projected ServiceAccount token ([`token`]); the
//! control plane signs a short-lived certificate for that workload's SPIFFE ID
//! ([`spiffe`], [`authority`]) over the `Identity` gRPC service ([`service`]). What an
//! agent says about itself is only ever compared with what its token proves.

pub mod authority;
pub mod discovery;
pub mod service;
pub mod serving;
pub mod spiffe;
pub mod token;

use tonic::Status;
use tonic::metadata::MetadataMap;

use std::sync::Arc;

use authority::Authority;
use token::{Reviewed, TokenReviewer};

/// Identity and TLS for the control plane's gRPC port: with them, agents connect over
/// TLS, prove who they are with their token, and get certificates.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// The mesh's certificate authority.
    pub authority: Arc<Authority>,
    /// Who checks the agents' tokens.
    pub reviewer: TokenReviewer,
    /// The names agents dial the control plane by (DNS names and IP addresses), for
    /// its serving certificate.
    pub serving_names: Vec<String>,
}

/// The bearer token of a call (`authorization: Bearer …`).
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated(
                "no bearer token: the agent sends its projected ServiceAccount token \
                 (audience bulwark) as `authorization: Bearer …`",
            )
        })
}

/// Whether what a caller claims (namespace, pod, service account) is what its token
/// proved; the error says what differs.
pub fn claims_match(
    reviewed: &Reviewed,
    namespace: &str,
    pod_name: &str,
    service_account: &str,
) -> Result<(), String> {
    if reviewed.namespace != namespace || reviewed.service_account != service_account {
        return Err(format!(
            "claims {namespace}/{service_account} but the token is of service account \
             {}/{}",
            reviewed.namespace, reviewed.service_account
        ));
    }
    match &reviewed.pod_name {
        Some(pod) if pod != pod_name => Err(format!(
            "claims pod {namespace}/{pod_name} but the token is bound to pod {namespace}/{pod}"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviewed(pod: Option<&str>) -> Reviewed {
        Reviewed {
            namespace: "shop".into(),
            service_account: "orders".into(),
            pod_name: pod.map(str::to_owned),
        }
    }

    #[test]
    fn a_claim_must_be_what_the_token_proves() {
        assert!(claims_match(&reviewed(Some("orders-0")), "shop", "orders-0", "orders").is_ok());
        let other_pod = claims_match(&reviewed(Some("orders-0")), "shop", "orders-1", "orders");
        assert_eq!(
            other_pod.unwrap_err(),
            "claims pod shop/orders-1 but the token is bound to pod shop/orders-0"
        );
        assert!(claims_match(&reviewed(None), "kube-system", "x", "orders").is_err());
        assert!(claims_match(&reviewed(None), "shop", "x", "payments").is_err());
        // A token bound to no pod (a local token file entry without one) proves the
        // service account only.
        assert!(claims_match(&reviewed(None), "shop", "any", "orders").is_ok());
    }

    #[test]
    fn the_bearer_token_comes_from_the_authorization_header() {
        let mut metadata = MetadataMap::new();
        assert_eq!(
            bearer_token(&metadata).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        metadata.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&metadata).unwrap(), "abc");
        metadata.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer_token(&metadata).is_err());
    }
}
