//! The `Identity` client: sends the certificate request with the pod's projected
//! ServiceAccount token, read from its file at every call (the kubelet rotates it).

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use bulwark_proto::identity::v1::CertifyRequest;
use bulwark_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::CertificateDer;
use tonic::transport::Channel;

use super::credentials::Signed;
use super::renewal::{Certifier, CertifyError};

/// Where Kubernetes mounts the projected token the webhook asks for.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/bulwark.io/serviceaccount/token";
/// How long one certificate request may take.
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Who the agent says it is: compared by the control plane with what the token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's ServiceAccount.
    pub service_account: String,
}

/// Asks the control plane's `Identity` service over `channel`.
#[derive(Debug, Clone)]
pub struct GrpcCertifier {
    channel: Channel,
    token_path: PathBuf,
    claims: Claims,
}

impl GrpcCertifier {
    /// A certifier for `claims`, authenticating with the token in `token_path`.
    pub fn new(channel: Channel, token_path: PathBuf, claims: Claims) -> Self {
        GrpcCertifier {
            channel,
            token_path,
            claims,
        }
    }
}

impl Certifier for GrpcCertifier {
    async fn certify(&self, csr_der: Vec<u8>) -> Result<Signed, CertifyError> {
        let token = tokio::fs::read_to_string(&self.token_path)
            .await
            .map_err(|e| {
                CertifyError(format!(
                    "cannot read the ServiceAccount token {}: {e} (is the projected token \
                     volume mounted?)",
                    self.token_path.display()
                ))
            })?;
        let mut request = tonic::Request::new(CertifyRequest {
            csr_der,
            namespace: self.claims.namespace.clone(),
            pod_name: self.claims.pod_name.clone(),
            service_account: self.claims.service_account.clone(),
        });
        request.set_timeout(CERTIFY_TIMEOUT);
        let bearer = format!("Bearer {}", token.trim());
        let value = bearer.parse().map_err(|_| {
            CertifyError(format!(
                "the token in {} is not a valid header value",
                self.token_path.display()
            ))
        })?;
        request.metadata_mut().insert("authorization", value);
        let response = IdentityClient::new(self.channel.clone())
            .certify(request)
            .await
            .map_err(|status| {
                CertifyError(format!(
                    "the control plane refused the certificate request ({:?}): {}",
                    status.code(),
                    status.message()
                ))
            })?
            .into_inner();
        let not_after = u64::try_from(response.not_after_unix_ms)
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
            .map_err(|_| CertifyError("the certificate's expiry is before 1970".to_owned()))?;
        Ok(Signed {
            spiffe_id: response.spiffe_id,
            chain: response
                .chain_der
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            anchors: response
                .trust_anchors_der
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            not_after,
        })
    }
}
