//! Reads the demo's own expectations from the example policies, so the summary
//! states the arithmetic of the limits actually in force rather than numbers
//! copied into the code.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// A token bucket: `burst` at once, then `per_second` refilled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Tokens available at once.
    pub burst: f64,
    /// Tokens added per second.
    pub per_second: f64,
}

impl Bucket {
    /// How many of a steady stream of requests the bucket lets through, sent
    /// over `span` (first to last request) faster than it refills.
    pub fn allowed_over(&self, span: Duration) -> f64 {
        self.burst + self.per_second * span.as_secs_f64()
    }
}

#[derive(Debug, Deserialize)]
struct Document {
    kind: Option<String>,
    metadata: Option<Metadata>,
    spec: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Limit {
    name: String,
    rate: Rate,
    burst: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct Rate {
    requests: f64,
    per: String,
}

/// A string or number at `path` in a YAML document.
pub fn text(value: &Value, path: &[&str]) -> Option<String> {
    let mut at = value;
    for key in path {
        at = at.get(*key)?;
    }
    match at {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The subfolder of each example folder with what only the folder source can read
/// (endpoints and pods on loopback); a cluster takes the folder without it.
pub const LOCAL: &str = "local";

/// Every document of the `*.yaml` files of a folder, for reading the demo's
/// expectations from the examples.
pub struct Manifests(Vec<Value>);

/// A Pod of the examples: its name, labels and address (`status.podIP` and the port
/// of its Service's EndpointSlices).
pub struct PodManifest {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// Where it serves.
    pub addr: SocketAddr,
}

impl Manifests {
    /// Reads every document of the `*.yaml` files of `dir`.
    /// Reads `dir` and its `local/` folder (the loopback pods and endpoints that only
    /// the folder source takes), as the demo's control plane reads both.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut documents = Vec::new();
        let local = dir.join(LOCAL);
        let mut files = yaml_files(dir)?;
        if local.is_dir() {
            files.extend(yaml_files(&local)?);
        }
        for file in files {
            let yaml =
                fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            for document in serde_yaml_ng::Deserializer::from_str(&yaml) {
                let value: Value = Deserialize::deserialize(document)
                    .with_context(|| format!("parsing {}", file.display()))?;
                documents.push(value);
            }
        }
        Ok(Self(documents))
    }

    /// The documents of `kind`, in any namespace.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> {
        self.0
            .iter()
            .filter(move |d| text(d, &["kind"]).as_deref() == Some(kind))
    }

    /// The documents of `kind` in `namespace` (none given is `default`).
    pub fn in_namespace<'a>(
        &'a self,
        kind: &'a str,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Value> {
        self.of_kind(kind).filter(move |d| {
            text(d, &["metadata", "namespace"])
                .as_deref()
                .unwrap_or("default")
                == namespace
        })
    }

    /// Service `namespace/name`.
    pub fn service<'a>(&'a self, namespace: &'a str, name: &str) -> Option<&'a Value> {
        self.in_namespace("Service", namespace)
            .find(|d| text(d, &["metadata", "name"]).as_deref() == Some(name))
    }

    /// The first port of Service `namespace/name`.
    pub fn service_port(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        self.service(namespace, name)
            .and_then(|d| d.get("spec")?.get("ports")?.get(0))
            .and_then(|p| text(p, &["port"]))
            .with_context(|| format!("no Service {namespace}/{name} with a port"))
    }

    /// The Pods of `namespace`, at the port of Service `service`'s EndpointSlices.
    pub fn pods(&self, namespace: &str, service: &str) -> anyhow::Result<Vec<PodManifest>> {
        let pod_port = self
            .in_namespace("EndpointSlice", namespace)
            .find(|d| {
                text(d, &["metadata", "labels", "kubernetes.io/service-name"]).as_deref()
                    == Some(service)
            })
            .and_then(|d| d.get("ports")?.get(0))
            .and_then(|p| text(p, &["port"]))
            .with_context(|| format!("no EndpointSlice of {namespace}/{service} with a port"))?;
        let mut pods = Vec::new();
        for pod in self.in_namespace("Pod", namespace) {
            let name = text(pod, &["metadata", "name"]).context("a Pod without a name")?;
            let labels: BTreeMap<String, String> = pod
                .get("metadata")
                .and_then(|m| m.get("labels"))
                .map(|l| serde_yaml_ng::from_value(l.clone()))
                .transpose()
                .with_context(|| format!("labels of Pod {name}"))?
                .unwrap_or_default();
            let ip = text(pod, &["status", "podIP"])
                .with_context(|| format!("Pod {name} has no status.podIP"))?;
            let addr: SocketAddr = format!("{ip}:{pod_port}")
                .parse()
                .with_context(|| format!("Pod {name}: {ip}:{pod_port} is not an address"))?;
            pods.push(PodManifest { name, labels, addr });
        }
        Ok(pods)
    }
}

/// Finds limit `limit` of RateLimitPolicy `namespace/name` in the `*.yaml` files of `dir`.
pub fn rate_limit(dir: &Path, namespace: &str, name: &str, limit: &str) -> anyhow::Result<Bucket> {
    for file in yaml_files(dir)? {
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            // Other documents are the control plane's business; skip what we do not understand.
            let Ok(document) = Document::deserialize(document) else {
                continue;
            };
            let Some(metadata) = document.metadata else {
                continue;
            };
            if document.kind.as_deref() != Some("RateLimitPolicy")
                || metadata.name.as_deref() != Some(name)
                || metadata.namespace.as_deref().unwrap_or("default") != namespace
            {
                continue;
            }
            let limits = document
                .spec
                .as_ref()
                .and_then(|spec| spec.get("limits"))
                .cloned()
                .context("the policy has no spec.limits")?;
            let limits: Vec<Limit> = serde_yaml_ng::from_value(limits).with_context(|| {
                format!(
                    "reading spec.limits of {namespace}/{name} in {}",
                    file.display()
                )
            })?;
            let Some(found) = limits.into_iter().find(|l| l.name == limit) else {
                bail!("RateLimitPolicy {namespace}/{name} has no limit named {limit}");
            };
            let per = gateway_duration(&found.rate.per)
                .with_context(|| format!("rate.per of limit {limit} in {}", file.display()))?;
            return Ok(Bucket {
                burst: found.burst.unwrap_or(found.rate.requests),
                per_second: found.rate.requests / per.as_secs_f64(),
            });
        }
    }
    bail!("no RateLimitPolicy {namespace}/{name} in {}", dir.display())
}

/// The `*.yaml` and `*.yml` files directly in `dir` (not hidden), sorted: the files
/// the control plane's folder source reads.
pub fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
                && !path
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Parses a Gateway API duration such as `1s`, `250ms` or `1m30s`.
pub fn gateway_duration(text: &str) -> anyhow::Result<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        bail!("empty duration");
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            bail!("{text:?} is not a duration like 1s, 250ms or 1m30s");
        }
        let value: u64 = rest[..digits].parse()?;
        rest = &rest[digits..];
        let (unit, after) = if let Some(after) = rest.strip_prefix("ms") {
            (Duration::from_millis(1), after)
        } else if let Some(after) = rest.strip_prefix('h') {
            (Duration::from_secs(3600), after)
        } else if let Some(after) = rest.strip_prefix('m') {
            (Duration::from_secs(60), after)
        } else if let Some(after) = rest.strip_prefix('s') {
            (Duration::from_secs(1), after)
        } else {
            bail!("{text:?} is not a duration like 1s, 250ms or 1m30s");
        };
        total += unit * u32::try_from(value)?;
        rest = after;
    }
    if total.is_zero() {
        bail!("{text:?} is zero");
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(gateway_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(
            gateway_duration("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(gateway_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(gateway_duration("1.5s").is_err());
        assert!(gateway_duration("s").is_err());
        assert!(gateway_duration("").is_err());
    }

    #[test]
    fn finds_the_per_tenant_limit_of_the_examples() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let bucket = rate_limit(&examples, "demo", "frontend", "per-tenant").unwrap();
        assert_eq!(
            bucket,
            Bucket {
                burst: 10.0,
                per_second: 20.0
            }
        );
        assert_eq!(bucket.allowed_over(Duration::from_secs(10)), 210.0);
        assert!(rate_limit(&examples, "demo", "frontend", "nope").is_err());
        assert!(rate_limit(&examples, "other", "frontend", "per-tenant").is_err());
    }

    #[test]
    fn burst_defaults_to_the_rate() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("limits.yaml"),
            "kind: Service\n---\nkind: RateLimitPolicy\nmetadata: {name: api}\nspec:\n  limits:\n    - name: all\n      rate: {requests: 5, per: 500ms}\n",
        )
        .unwrap();
        let bucket = rate_limit(dir.path(), "default", "api", "all").unwrap();
        assert_eq!(
            bucket,
            Bucket {
                burst: 5.0,
                per_second: 10.0
            }
        );
    }
}
