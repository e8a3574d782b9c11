//! Who a bearer token proves the caller is: a TokenReview on Kubernetes, a local token
//! file without a cluster (so that the demo and the tests take the same path).
//!
//! A projected ServiceAccount token bound to a pod proves the namespace, the service
//! account and the pod's name; the caller's own claims are only compared with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde::Deserialize;

/// The audience agents' tokens are minted for (the projected volume's `audience`), so
/// that a token meant for the API server or another service is refused here.
pub const AUDIENCE: &str = "bulwark";
/// Where Kubernetes puts the bound pod's name in a reviewed token's user info.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// Longest token accepted (real projected tokens are about 1 KB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What a token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount.
    pub service_account: String,
    /// The pod the token is bound to (absent for a token not bound to a pod).
    pub pod_name: Option<String>,
}

/// Why a token proved nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// No token, or larger than any real one.
    #[error(
        "no usable bearer token (send the projected ServiceAccount token as `authorization: Bearer …`)"
    )]
    Missing,
    /// The reviewer says the token is not valid (expired, forged, wrong audience).
    #[error("the token is not valid: {0}")]
    Refused(String),
    /// The token is valid but not a ServiceAccount's.
    #[error("the token belongs to {0:?}, not to a ServiceAccount")]
    NotServiceAccount(String),
    /// The API server could not be asked.
    #[error(
        "cannot review the token with the API server: {0}; check that the control plane may create tokenreviews"
    )]
    Unavailable(String),
}

/// Why a local token file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("token file {path}: {reason}")]
pub struct TokenFileError {
    path: PathBuf,
    reason: String,
}

/// One entry of a local token file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenEntry {
    token: String,
    namespace: String,
    service_account: String,
    #[serde(default)]
    pod: Option<String>,
}

/// The local token file: `tokens: [{token, namespace, serviceAccount, pod}]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

/// Reviews tokens.
#[derive(Clone)]
pub enum TokenReviewer {
    /// Asks the API server (TokenReview), for tokens with our audience.
    Kubernetes(kube::Client),
    /// Looks tokens up in a file read at start.
    Local(BTreeMap<String, Reviewed>),
}

impl std::fmt::Debug for TokenReviewer {
    // Tokens are secrets: never in a log or a dump.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenReviewer::Kubernetes(_) => f.write_str("TokenReviewer::Kubernetes"),
            TokenReviewer::Local(tokens) => {
                write!(f, "TokenReviewer::Local({} tokens)", tokens.len())
            }
        }
    }
}

impl TokenReviewer {
    /// Reads a local token file.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let error = |reason: String| TokenFileError {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let file: TokenFile = serde_yaml_ng::from_str(&text).map_err(|e| error(e.to_string()))?;
        let mut tokens = BTreeMap::new();
        for (i, entry) in file.tokens.into_iter().enumerate() {
            if entry.token.len() < 16 {
                return Err(error(format!(
                    "tokens[{i}]: a token must be at least 16 characters (a guessable token \
                     would let anyone be that workload)"
                )));
            }
            let reviewed = Reviewed {
                namespace: entry.namespace,
                service_account: entry.service_account,
                pod_name: entry.pod,
            };
            if tokens.insert(entry.token, reviewed).is_some() {
                return Err(error(format!("tokens[{i}]: the same token twice")));
            }
        }
        Ok(TokenReviewer::Local(tokens))
    }

    /// Who `token` proves the caller is.
    pub async fn review(&self, token: &str) -> Result<Reviewed, ReviewError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(ReviewError::Missing);
        }
        match self {
            TokenReviewer::Local(tokens) => tokens
                .get(token)
                .cloned()
                .ok_or_else(|| ReviewError::Refused("not in the token file".to_owned())),
            TokenReviewer::Kubernetes(client) => review_with_api_server(client, token).await,
        }
    }
}

async fn review_with_api_server(
    client: &kube::Client,
    token: &str,
) -> Result<Reviewed, ReviewError> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![AUDIENCE.to_owned()]),
        },
        ..TokenReview::default()
    };
    let reviewed = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ReviewError::Refused(
            status
                .error
                .unwrap_or_else(|| "not authenticated".to_owned()),
        ));
    }
    // A server that ignores audiences would answer for any token: insist on ours.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
    {
        return Err(ReviewError::Refused(format!(
            "the token is not for audience {AUDIENCE:?}"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = parse_service_account(&username)
        .ok_or_else(|| ReviewError::NotServiceAccount(username.clone()))?;
    let pod_name = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get(POD_NAME_EXTRA))
        .and_then(|values| values.first().cloned());
    Ok(Reviewed {
        namespace,
        service_account,
        pod_name,
    })
}

/// `system:serviceaccount:<ns>:<sa>` → (ns, sa).
fn parse_service_account(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| (ns.to_owned(), sa.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            parse_service_account("system:serviceaccount:shop:orders"),
            Some(("shop".into(), "orders".into()))
        );
        for other in [
            "system:node:n1",
            "admin",
            "system:serviceaccount:shop",
            "system:serviceaccount::orders",
            "system:serviceaccount:a:b:c",
        ] {
            assert_eq!(parse_service_account(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn a_local_token_file_stands_in_for_the_api_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(
            &path,
            "tokens:\n  - {token: frontend-token-0123456789, namespace: demo, serviceAccount: frontend, pod: frontend-0}\n",
        )
        .unwrap();
        let reviewer = TokenReviewer::from_file(&path).unwrap();
        assert_eq!(
            reviewer.review("frontend-token-0123456789").await.unwrap(),
            Reviewed {
                namespace: "demo".into(),
                service_account: "frontend".into(),
                pod_name: Some("frontend-0".into()),
            }
        );
        assert!(matches!(
            reviewer.review("forged-token-0123456789").await,
            Err(ReviewError::Refused(_))
        ));
        assert!(matches!(
            reviewer.review("").await,
            Err(ReviewError::Missing)
        ));
        assert!(!format!("{reviewer:?}").contains("frontend-token"));
    }

    #[test]
    fn a_bad_token_file_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(
            &path,
            "tokens:\n  - {token: short, namespace: demo, serviceAccount: frontend}\n",
        )
        .unwrap();
        let error = TokenReviewer::from_file(&path).unwrap_err().to_string();
        assert!(
            error.contains("tokens[0]: a token must be at least 16"),
            "{error}"
        );
        std::fs::write(&path, "tokens:\n  - {token: x, namespace: demo}\n").unwrap();
        let error = TokenReviewer::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("serviceAccount"), "{error}");
    }
}
