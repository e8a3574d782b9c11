//! Who may subscribe to which pod's configuration: the agent's token proves its pod and
//! service account, and the pod's labels come from the cluster, not from the agent.

use std::sync::Arc;

use tokio::sync::watch;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tracing::warn;

use super::token::TokenReviewer;
use super::{bearer_token, claims_match};
use crate::discovery::agents::AgentIdentity;
use crate::metrics::Metrics;
use crate::model::{Model, ObjectName};

/// Authenticates discovery streams.
#[derive(Debug, Clone)]
pub struct DiscoveryAuth {
    reviewer: TokenReviewer,
    models: watch::Receiver<Arc<Model>>,
    metrics: Arc<Metrics>,
}

impl DiscoveryAuth {
    /// Checks tokens with `reviewer`; takes pods from the source's `models`.
    pub fn new(
        reviewer: TokenReviewer,
        models: watch::Receiver<Arc<Model>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        DiscoveryAuth {
            reviewer,
            models,
            metrics,
        }
    }

    /// Refuses a stream whose token does not prove the pod and service account its
    /// hello claims; then replaces the claimed labels with the pod's own, when the
    /// source knows the pod (a cluster always does; a folder may not).
    pub async fn authenticate(
        &self,
        metadata: &MetadataMap,
        hello: &mut AgentIdentity,
    ) -> Result<(), Status> {
        let result = self.check(metadata, hello).await;
        if let Err(status) = &result {
            let reason = match status.code() {
                tonic::Code::Unauthenticated => "unauthenticated",
                _ => "mismatch",
            };
            self.metrics.identity_refused("discovery", reason);
        }
        result
    }

    async fn check(&self, metadata: &MetadataMap, hello: &mut AgentIdentity) -> Result<(), Status> {
        let token = bearer_token(metadata)?;
        let reviewed = self.reviewer.review(token).await.map_err(|error| {
            warn!(namespace = %hello.namespace, pod = %hello.pod_name, %error, "discovery refused: the token proves nothing");
            Status::unauthenticated(error.to_string())
        })?;
        if let Err(mismatch) = claims_match(
            &reviewed,
            &hello.namespace,
            &hello.pod_name,
            &hello.service_account,
        ) {
            warn!(namespace = %hello.namespace, pod = %hello.pod_name, %mismatch, "discovery refused: the claimed identity is not the token's");
            return Err(Status::permission_denied(mismatch));
        }
        let name = ObjectName::new(hello.namespace.as_str(), hello.pod_name.as_str());
        let pod = self.models.borrow().pods.get(&name).cloned();
        if let Some(pod) = pod {
            if pod.service_account != hello.service_account {
                return Err(Status::permission_denied(format!(
                    "pod {name} runs as service account {}, not {}",
                    pod.service_account, hello.service_account
                )));
            }
            hello.labels = pod.labels;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::model;

    fn auth(model: Model) -> (DiscoveryAuth, watch::Sender<Arc<Model>>) {
        let mut tokens = std::collections::BTreeMap::new();
        tokens.insert(
            "orders-0-token-0123456789".to_owned(),
            super::super::token::Reviewed {
                namespace: "shop".into(),
                service_account: "orders".into(),
                pod_name: Some("orders-0".into()),
            },
        );
        let (tx, rx) = watch::channel(Arc::new(model));
        (
            DiscoveryAuth::new(TokenReviewer::Local(tokens), rx, Arc::new(Metrics::new())),
            tx,
        )
    }

    fn hello(pod: &str, sa: &str) -> AgentIdentity {
        AgentIdentity {
            namespace: "shop".into(),
            pod_name: pod.into(),
            service_account: sa.into(),
            labels: [("app".to_owned(), "payments".to_owned())].into(),
            agent_version: "test".into(),
            protocol_version: bulwark_proto::PROTOCOL_VERSION,
        }
    }

    fn metadata(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: orders-0, namespace: shop, labels: {app: orders, version: v2}}\nspec: {serviceAccountName: orders}\n";

    #[tokio::test]
    async fn the_labels_are_the_pods_not_the_agents_claim() {
        let (auth, _tx) = auth(model(POD));
        let mut claim = hello("orders-0", "orders");
        auth.authenticate(&metadata("orders-0-token-0123456789"), &mut claim)
            .await
            .unwrap();
        assert_eq!(claim.labels["app"], "orders", "not the claimed payments");
        assert_eq!(claim.labels["version"], "v2");
    }

    #[tokio::test]
    async fn a_forged_token_or_another_pods_name_is_refused() {
        let (auth, _tx) = auth(model(POD));
        let forged = auth
            .authenticate(
                &metadata("forged-token-0123456789"),
                &mut hello("orders-0", "orders"),
            )
            .await
            .unwrap_err();
        assert_eq!(forged.code(), tonic::Code::Unauthenticated);
        let other_pod = auth
            .authenticate(
                &metadata("orders-0-token-0123456789"),
                &mut hello("payments-0", "orders"),
            )
            .await
            .unwrap_err();
        assert_eq!(other_pod.code(), tonic::Code::PermissionDenied);
        assert!(
            other_pod.message().contains("bound to pod shop/orders-0"),
            "{}",
            other_pod.message()
        );
        let no_token = auth
            .authenticate(&MetadataMap::new(), &mut hello("orders-0", "orders"))
            .await
            .unwrap_err();
        assert_eq!(no_token.code(), tonic::Code::Unauthenticated);
    }
}
