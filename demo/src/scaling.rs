//! The scene of a service-wide limit while the service scales: Service `api` (three
//! agents in front of one app) has a RateLimitPolicy of 60 requests/s with the default
//! scope, Service. With one ready pod, that pod takes all the traffic and accepts 60/s;
//! once three are ready, each accepts its third, and the service still accepts 60/s in
//! all, where Pod scope would have let through 180/s.
//!
//! The scene's Service, EndpointSlices and policy live in a folder of its own beside the
//! demo's logs, which the control plane reads as one more source; scaling rewrites the
//! EndpointSlices there, as the endpoints controller would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bulwark_testkit::HttpClient;
use bytes::Bytes;
use http::Method;
use tokio::time::Instant;

use crate::strings;
use crate::supervisor::Supervisor;
use crate::traffic::{Run, Steady};

/// The service-wide limit, requests per second.
pub const LIMIT: u32 = 60;
/// The limit's burst.
const BURST: u32 = 20;
/// The app every `api` agent forwards to.
const APP: &str = "127.0.0.71:8080";
/// The scene's pods: names and the address each agent listens on (inbound on 4143,
/// outbound on 4140, admin on 4191).
pub const PODS: [(&str, &str); 3] = [
    ("api-0", "127.0.0.72"),
    ("api-1", "127.0.0.73"),
    ("api-2", "127.0.0.74"),
];
/// How long each phase sends.
const PHASE: Duration = Duration::from_secs(3);
/// The start of each phase not counted: the burst, and a re-split's fresh buckets.
const WARM_UP: Duration = Duration::from_millis(800);
/// Requests per second each phase sends in all (well over the limit).
const OFFERED: f64 = 180.0;

/// The scene's folder.
pub fn dir(log_dir: &Path) -> PathBuf {
    log_dir.parent().unwrap_or(log_dir).join("scaling")
}

/// Writes the scene's Service (one ready pod) and policy into `dir`.
pub fn prepare(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    scale(dir, 1)?;
    let policy = format!(
        "# Written by bulwark-demo: a service-wide limit (scope Service, the default).\n\
         apiVersion: bulwark.io/v1alpha1\nkind: RateLimitPolicy\n\
         metadata: {{name: api, namespace: demo}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: api}}]\n  limits:\n\
         \x20   - name: total\n      rate: {{requests: {LIMIT}, per: 1s}}\n      burst: {BURST}\n"
    );
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy).with_context(|| format!("writing {}", path.display()))
}

/// Rewrites Service `api` with `ready` of its pods ready.
fn scale(dir: &Path, ready: usize) -> anyhow::Result<()> {
    let app_port = APP.rsplit(':').next().unwrap_or("8080");
    let mut yaml = format!(
        "# Written by bulwark-demo: {ready} of {} pods ready.\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: demo}}\n\
         spec:\n  selector: {{app: api}}\n  ports: [{{name: http, port: 80, targetPort: {app_port}}}]\n",
        PODS.len()
    );
    for (i, (pod, ip)) in PODS.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {pod}, namespace: demo, labels: {{kubernetes.io/service-name: api}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {app_port}}}]\n\
             endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: {}}}, targetRef: {{kind: Pod, name: {pod}, namespace: demo}}}}]\n",
            i < ready
        ));
    }
    // Written aside and renamed, so that the control plane never reads half a file.
    let (aside, path) = (dir.join(".service.yaml.tmp"), dir.join("service.yaml"));
    std::fs::write(&aside, yaml).with_context(|| format!("writing {}", aside.display()))?;
    std::fs::rename(&aside, &path).with_context(|| format!("writing {}", path.display()))
}

/// What the scene measured.
pub struct Scaled {
    /// Accepted per second by the one ready pod.
    pub one: f64,
    /// Accepted per second by each of the three ready pods.
    pub three: Vec<f64>,
    /// The burst each pod enforced once three were ready.
    pub split_burst: Option<u64>,
}

fn addr(ip: &str, port: u16) -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::new(ip.parse()?, port))
}

/// Starts the app and the three agents (with the tokens in `tokens`), then sends to one
/// ready pod, scales to three, and sends to all three.
pub async fn run(
    supervisor: &mut Supervisor,
    scene_dir: &Path,
    control_plane: &str,
    anchor: &Path,
    tokens: &[PathBuf],
    timeout: Duration,
) -> anyhow::Result<Scaled> {
    supervisor.spawn(
        "api-app",
        "bulwark-upstream",
        &strings(&["--listen", APP, "--name", "api"]),
    )?;
    supervisor
        .wait_ready("api-app", APP.parse()?, "/_upstream/stats", timeout)
        .await?;
    for ((pod, ip), token) in PODS.iter().zip(tokens) {
        let args = strings(&[
            "--control-plane",
            control_plane,
            "--control-plane-ca",
            &anchor.display().to_string(),
            "--token-file",
            &token.display().to_string(),
            "--namespace",
            "demo",
            "--pod-name",
            pod,
            "--service-account",
            "api",
            "--label",
            "app=api",
            "--outbound-addr",
            &format!("{ip}:4140"),
            "--inbound",
            &format!("{ip}:4143={}", APP.rsplit(':').next().unwrap_or("8080")),
            "--admin-addr",
            &format!("{ip}:4191"),
        ]);
        supervisor.spawn(&format!("agent-{pod}"), "bulwark-agent", &args)?;
    }
    for (pod, ip) in PODS {
        supervisor
            .wait_ready(&format!("agent-{pod}"), addr(ip, 4191)?, "/ready", timeout)
            .await?;
    }
    wait_split(1, timeout).await?;
    let one = accepted_per_second(&[PODS[0].1], OFFERED)
        .await?
        .iter()
        .sum();
    scale(scene_dir, PODS.len())?;
    let split_burst = wait_split(PODS.len(), timeout).await?;
    let ips: Vec<&str> = PODS.iter().map(|(_, ip)| *ip).collect();
    let three = accepted_per_second(&ips, OFFERED / PODS.len() as f64).await?;
    Ok(Scaled {
        one,
        three,
        split_burst,
    })
}

/// Waits until every agent enforces the limit split over `pods`; its burst then.
async fn wait_split(pods: usize, timeout: Duration) -> anyhow::Result<Option<u64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut bursts = Vec::new();
        for (_, ip) in PODS {
            let config: serde_json::Value = bulwark_testkit::get(addr(ip, 4191)?, "/config", &[])
                .await
                .ok()
                .and_then(|r| r.json().ok())
                .unwrap_or_default();
            let limit = &config["config"]["inbound"]["rateLimits"][0];
            if limit["split"].as_u64() == Some(pods as u64) {
                bursts.push(limit["burst"].as_u64());
            }
        }
        if bursts.len() == PODS.len() {
            return Ok(bursts[0]);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the api agents did not get the limit split over {pods} pod(s) within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `rate` requests/s to each agent in `ips` for a phase; what each accepted per
/// second after the warm-up.
async fn accepted_per_second(ips: &[&str], rate: f64) -> anyhow::Result<Vec<f64>> {
    let start = Instant::now();
    let mut runs = Vec::new();
    for ip in ips {
        let steady = Steady {
            client: HttpClient::direct(addr(ip, 4143)?).with_timeout(Duration::from_secs(5)),
            method: Method::GET,
            url: "/".to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            rate,
            from: Duration::ZERO,
            until: PHASE,
            max_in_flight: 64,
        };
        runs.push(tokio::spawn(steady.run(start)));
    }
    let mut rates = Vec::new();
    for run in runs {
        let run: Run = run.await.context("a load generator")?;
        let counted = run
            .outcomes
            .iter()
            .filter(|o| o.at >= WARM_UP && o.is_success())
            .count();
        rates.push(counted as f64 / (PHASE - WARM_UP).as_secs_f64());
    }
    Ok(rates)
}

/// The scene's block of the summary, and its problems: a limit that did not hold.
pub fn report(out: &mut String, scaled: &anyhow::Result<Scaled>) -> Vec<String> {
    out.push_str(&format!(
        "\nservice-wide rate limit while scaling (RateLimitPolicy demo/api: {LIMIT}/s, scope Service)\n"
    ));
    let scaled = match scaled {
        Ok(scaled) => scaled,
        Err(error) => {
            out.push_str(&format!("  not run: {error:#}\n"));
            return vec![format!("the scaling scene failed: {error:#}")];
        }
    };
    let one = scaled.one;
    let three: f64 = scaled.three.iter().sum();
    let each: Vec<String> = scaled.three.iter().map(|r| format!("{r:.0}")).collect();
    out.push_str(&format!(
        "  1 ready pod: {one:.0}/s accepted of {OFFERED:.0}/s sent\n  \
         3 ready pods: {three:.0}/s accepted in all ({} per pod, burst {} each) of {OFFERED:.0}/s sent; \
         Pod scope would have accepted {}/s\n",
        each.join(" + "),
        scaled.split_burst.map_or("?".to_owned(), |b| b.to_string()),
        LIMIT as usize * PODS.len(),
    ));
    let mut problems = Vec::new();
    let limit = f64::from(LIMIT);
    for (what, rate) in [("one ready pod", one), ("three ready pods", three)] {
        if !(limit * 0.75..=limit * 1.25).contains(&rate) {
            problems.push(format!(
                "the service-wide limit of {LIMIT}/s did not hold with {what}: {rate:.0}/s accepted"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scene_files_are_a_service_and_a_policy_the_control_plane_reads() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        let service = std::fs::read_to_string(dir.path().join("service.yaml")).unwrap();
        assert_eq!(service.matches("ready: true").count(), 1);
        scale(dir.path(), 3).unwrap();
        let service = std::fs::read_to_string(dir.path().join("service.yaml")).unwrap();
        assert_eq!(service.matches("ready: true").count(), 3);
        let mut kinds = Vec::new();
        for file in ["service.yaml", "policy.yaml"] {
            let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let value: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
                kinds.push(value["kind"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(
            kinds,
            [
                "Service",
                "EndpointSlice",
                "EndpointSlice",
                "EndpointSlice",
                "RateLimitPolicy"
            ]
        );
    }

    #[test]
    fn a_limit_that_held_is_no_problem_and_one_that_multiplied_is() {
        let mut out = String::new();
        let held = Ok(Scaled {
            one: 61.0,
            three: vec![20.0, 21.0, 19.0],
            split_burst: Some(6),
        });
        assert!(report(&mut out, &held).is_empty(), "{out}");
        assert!(
            out.contains("3 ready pods: 60/s accepted in all (20 + 21 + 19 per pod, burst 6 each)"),
            "{out}"
        );
        let multiplied = Ok(Scaled {
            one: 60.0,
            three: vec![60.0, 60.0, 60.0],
            split_burst: Some(20),
        });
        assert_eq!(report(&mut String::new(), &multiplied).len(), 1);
    }
}
