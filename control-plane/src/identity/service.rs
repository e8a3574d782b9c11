//! The `Identity` gRPC service: reviews the caller's token, compares what it claims
//! with what the token proves, and signs its certificate request.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bulwark_proto::identity::v1::identity_server::{Identity, IdentityServer};
use bulwark_proto::identity::v1::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::authority::Authority;
use super::spiffe::SpiffeId;
use super::token::{Reviewed, TokenReviewer};
use super::{bearer_token, claims_match};
use crate::metrics::Metrics;

/// Signs workload certificates for callers whose token proves who they claim to be.
#[derive(Debug, Clone)]
pub struct IdentityService {
    authority: Arc<Authority>,
    reviewer: TokenReviewer,
    metrics: Arc<Metrics>,
}

impl IdentityService {
    /// A service signing with `authority`, trusting what `reviewer` says of tokens.
    pub fn new(authority: Arc<Authority>, reviewer: TokenReviewer, metrics: Arc<Metrics>) -> Self {
        IdentityService {
            authority,
            reviewer,
            metrics,
        }
    }

    /// The tonic server to add to the gRPC router.
    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    /// Who the caller is, from its token, provided it claims the same.
    async fn authenticate(
        &self,
        token: &str,
        request: &CertifyRequest,
    ) -> Result<Reviewed, Status> {
        let reviewed = self.reviewer.review(token).await.map_err(|error| {
            warn!(
                namespace = %request.namespace,
                pod = %request.pod_name,
                %error,
                "certificate request refused: the token proves nothing"
            );
            self.metrics
                .identity_refused("certificate", "unauthenticated");
            Status::unauthenticated(error.to_string())
        })?;
        if let Err(mismatch) = claims_match(
            &reviewed,
            &request.namespace,
            &request.pod_name,
            &request.service_account,
        ) {
            warn!(
                namespace = %request.namespace,
                pod = %request.pod_name,
                %mismatch,
                "certificate request refused: the claimed identity is not the token's"
            );
            self.metrics.identity_refused("certificate", "mismatch");
            return Err(Status::permission_denied(mismatch));
        }
        Ok(reviewed)
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let token = bearer_token(request.metadata())?.to_owned();
        let request = request.into_inner();
        let reviewed = self.authenticate(&token, &request).await?;
        let id = SpiffeId::new(
            self.authority.trust_domain(),
            &reviewed.namespace,
            &reviewed.service_account,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let issued = self
            .authority
            .sign(&request.csr_der, &id, SystemTime::now())
            .map_err(|error| {
                warn!(spiffe_id = %id, pod = %request.pod_name, %error, "certificate request refused");
                self.metrics.identity_refused("certificate", "invalid");
                Status::invalid_argument(error.to_string())
            })?;
        info!(spiffe_id = %id, pod = %request.pod_name, "certificate issued");
        self.metrics.certificates_issued.inc();
        Ok(Response::new(CertifyResponse {
            chain_der: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_anchors_der: self
                .authority
                .anchors()
                .iter()
                .map(|c| c.to_vec())
                .collect(),
            spiffe_id: id.to_string(),
            not_after_unix_ms: unix_ms(issued.not_after),
        }))
    }
}
