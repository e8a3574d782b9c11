//! The demo's workload identity: a token file standing in for Kubernetes' TokenReview,
//! the token the agent presents, and where the control plane writes its trust anchor.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The files identity uses.
pub struct Files {
    /// The trust anchor the control plane writes and the agent verifies it with.
    pub anchor: PathBuf,
    /// Tokens and the workloads they prove, for the control plane.
    pub tokens: PathBuf,
    /// The demo agent's token (pod frontend-0 of ServiceAccount frontend in demo).
    pub agent_token: PathBuf,
    /// The tokens of the scaling scene's pods (ServiceAccount api in demo), in
    /// [`crate::scaling::PODS`] order.
    pub api_tokens: Vec<PathBuf>,
}

/// Writes a fresh token for the demo agent and the token file naming it, next to the
/// logs (`target/demo/identity`).
pub fn prepare(log_dir: &Path) -> anyhow::Result<Files> {
    let dir = log_dir.parent().unwrap_or(log_dir).join("identity");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A new random token each run, as a projected token would be.
    let token = || -> String {
        std::iter::repeat_with(fastrand::alphanumeric)
            .take(40)
            .collect()
    };
    let files = Files {
        anchor: dir.join("trust-anchor.pem"),
        tokens: dir.join("tokens.yaml"),
        agent_token: dir.join("frontend-0.token"),
        api_tokens: crate::scaling::PODS
            .iter()
            .map(|(pod, _)| dir.join(format!("{pod}.token")))
            .collect(),
    };
    let mut listing =
        String::from("# Written by bulwark-demo: the tokens of the demo agents' pods.\ntokens:\n");
    let pods = std::iter::once(("frontend", "frontend-0", &files.agent_token)).chain(
        crate::scaling::PODS
            .iter()
            .zip(&files.api_tokens)
            .map(|((pod, _), path)| ("api", *pod, path)),
    );
    for (account, pod, path) in pods {
        let token = token();
        std::fs::write(path, &token).with_context(|| format!("writing {}", path.display()))?;
        listing.push_str(&format!(
            "  - {{token: {token}, namespace: demo, serviceAccount: {account}, pod: {pod}}}\n"
        ));
    }
    std::fs::write(&files.tokens, listing)
        .with_context(|| format!("writing {}", files.tokens.display()))?;
    Ok(files)
}

/// The agent's identity as its `/config` shows it, in words.
pub async fn of_agent(admin: SocketAddr) -> String {
    for _ in 0..50 {
        if let Ok(config) = config(admin).await
            && let Some(id) = config["identity"]["spiffeId"].as_str()
        {
            let hours = config["identity"]["expiresInSecs"].as_u64().unwrap_or(0) as f64 / 3600.0;
            return format!(
                "{id} (certificate valid {hours:.1} h more, renewed at 70 % of its life)"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    "no workload certificate yet (see the agent's log)".to_owned()
}

async fn config(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let response = bulwark_testkit::get(admin, "/config", &[]).await?;
    Ok(response.json()?)
}

/// What the authorization block of the summary says, and what went wrong.
pub struct Denied {
    /// The summary block.
    pub summary: String,
    /// Problems that fail the demo.
    pub problems: Vec<String>,
}

/// Sends one request that examples/authorization.yaml does not allow (POST /admin/reset
/// from a caller without a mesh identity) to the agent's inbound listener, and reports
/// the answer and the agent's count.
pub async fn denied_call(inbound: SocketAddr, admin: SocketAddr) -> Denied {
    let mut problems = Vec::new();
    let answer =
        bulwark_testkit::request(inbound, http::Method::POST, "/admin/reset", &[], "").await;
    let (status, reason) = match &answer {
        Ok(r) => (r.status.as_u16(), r.reason().unwrap_or("-").to_owned()),
        Err(e) => (0, format!("no answer: {e}")),
    };
    if status != 403 || reason != "unauthorized" {
        problems.push(format!(
            "POST /admin/reset to the frontend should be 403 unauthorized (AuthorizationPolicy \
             demo/frontend), got {status} {reason}"
        ));
    }
    let counted = match bulwark_testkit::Metrics::scrape(admin).await {
        Ok(m) => m.get(
            "bulwark_unauthorized_total",
            &[("policy", "demo/frontend"), ("caller", "unauthenticated")],
        ),
        Err(_) => 0.0,
    };
    Denied {
        summary: format!(
            "\nauthorization (AuthorizationPolicy demo/frontend, examples/authorization.yaml)\n  \
             GET / from callers without a mesh identity: allowed (the tenants' traffic above)\n  \
             POST /admin/reset without a mesh identity: {status} {reason}; the agent counted \
             {counted} denial(s)\n"
        ),
        problems,
    }
}
