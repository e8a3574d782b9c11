//! The canary of `examples/canary/`: reads the HTTPRoute (its parent, its header
//! rule and its weighted rule) and the pods of each backend from the example YAML,
//! sends requests through the agent that each rule takes (and some that none
//! takes), and checks from the upstreams' own answers (`x-upstream`) that the split
//! is the one the weights say and that header-matched requests all reach their
//! backend.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bulwark_testkit::{HttpClient, Metrics};
use bytes::Bytes;
use http::Method;
use serde_yaml_ng::Value;
use tokio::time::{Instant, MissedTickBehavior};

use crate::examples::{Manifests, PodManifest, text};
use crate::report::count;

/// One tick of canary traffic every this long (10 ticks a second).
const TICK: Duration = Duration::from_millis(100);
/// Every this many ticks a header-matched request, and a request no rule takes.
const HEADER_EVERY: usize = 4;
const UNROUTED_EVERY: usize = 10;

/// One pod behind the route's backends.
#[derive(Debug, Clone)]
pub struct CanaryPod {
    /// The pod's name (also the demo upstream's name, so its `x-upstream`).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The backend Service whose selector takes it (e.g. `checkout-v1`).
    pub backend: String,
}

/// A rule of the route that the demo drives.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    /// `(backend Service, weight)` in the order written; weight defaults to 1.
    backends: Vec<(String, u64)>,
}

impl Rule {
    fn total(&self) -> u64 {
        self.backends.iter().map(|(_, w)| w).sum()
    }

    /// `90/10`: the weights as written.
    fn describe_weights(&self) -> String {
        self.backends
            .iter()
            .map(|(_, w)| w.to_string())
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// The canary as the example YAML describes it.
#[derive(Debug, Clone)]
pub struct Canary {
    /// `namespace/name` of the HTTPRoute.
    route: String,
    /// The route's namespace (its backends' too).
    namespace: String,
    /// The parent Service's port the route takes.
    port: String,
    /// `http://NAME.NAMESPACE:PORT`, the URL base through the outbound proxy.
    base_url: String,
    /// The header match (`name`, `value`) and its rule.
    header: (String, String, Rule),
    /// The weighted rule's method and path prefix, and the rule.
    weighted: (Method, String, Rule),
    /// Every pod of the parent Service, with the backend that selects it.
    pub pods: Vec<CanaryPod>,
}

fn rule_backends(rule: &Value) -> anyhow::Result<Rule> {
    let backends = rule
        .get("backendRefs")
        .and_then(Value::as_sequence)
        .context("a rule without backendRefs")?
        .iter()
        .map(|b| {
            let name = text(b, &["name"]).context("a backendRef without a name")?;
            let weight = match text(b, &["weight"]) {
                Some(w) => w
                    .parse()
                    .with_context(|| format!("weight {w:?} of backend {name}"))?,
                None => 1,
            };
            Ok((name, weight))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Rule { backends })
}

/// Reads the one HTTPRoute in `dir` with a Service parent: its rule matched by one
/// header (exact value) and its rule splitting a method and path prefix over
/// weighted backends; then the parent Service's port, the pods' addresses
/// (`status.podIP`, the port of the parent's EndpointSlices) and which backend
/// Service's selector takes each pod.
pub fn canary(dir: &Path) -> anyhow::Result<Canary> {
    let manifests = Manifests::load(dir)?;
    let routes: Vec<&Value> = manifests.of_kind("HTTPRoute").collect();
    let [route] = routes[..] else {
        bail!(
            "{} holds {} HTTPRoutes; the demo drives exactly one",
            dir.display(),
            routes.len()
        );
    };
    let namespace = text(route, &["metadata", "namespace"]).unwrap_or_else(|| "default".to_owned());
    let name = text(route, &["metadata", "name"]).context("the HTTPRoute has no name")?;
    let spec = route.get("spec").context("the HTTPRoute has no spec")?;
    let parent = spec
        .get("parentRefs")
        .and_then(|refs| refs.get(0))
        .context("the HTTPRoute has no parentRefs[0]")?;
    if text(parent, &["kind"]).as_deref() != Some("Service") {
        bail!("the demo drives an HTTPRoute whose parent is a Service");
    }
    let service = text(parent, &["name"]).context("parentRefs[0].name")?;
    let rules = spec
        .get("rules")
        .and_then(Value::as_sequence)
        .context("spec.rules")?;

    let mut header = None;
    let mut weighted = None;
    for rule in rules {
        let Some(first) = rule.get("matches").and_then(|m| m.get(0)) else {
            continue;
        };
        let backends = rule_backends(rule)?;
        if let Some(h) = first.get("headers").and_then(|h| h.get(0))
            && first.get("path").is_none()
            && first.get("method").is_none()
            && header.is_none()
        {
            let header_name = text(h, &["name"]).context("a header match without a name")?;
            let value = text(h, &["value"]).context("a header match without a value")?;
            header = Some((header_name.to_ascii_lowercase(), value, backends));
        } else if backends.backends.len() > 1 && weighted.is_none() {
            if text(first, &["path", "type"]).is_some_and(|t| t != "PathPrefix") {
                bail!("the demo drives a weighted rule matched by a PathPrefix");
            }
            let path = text(first, &["path", "value"]).unwrap_or_else(|| "/".to_owned());
            let method = match text(first, &["method"]) {
                Some(m) => Method::from_bytes(m.as_bytes())
                    .with_context(|| format!("method {m:?} of the weighted rule"))?,
                None => Method::GET,
            };
            weighted = Some((method, path, backends));
        }
    }
    let header = header.context("the HTTPRoute has no rule matched by one header alone")?;
    let weighted = weighted.context("the HTTPRoute has no rule with weighted backends")?;
    if weighted.2.total() == 0 {
        bail!("the weighted rule's weights are all 0");
    }

    let port = match text(parent, &["port"]) {
        Some(port) => port,
        None => manifests.service_port(&namespace, &service)?,
    };

    // Each backend Service's selector, to tell which backend a pod belongs to.
    let mut selectors: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for (backend, _) in header.2.backends.iter().chain(&weighted.2.backends) {
        if selectors.iter().any(|(b, _)| b == backend) {
            continue;
        }
        let selector: BTreeMap<String, String> = manifests
            .service(&namespace, backend)
            .and_then(|d| d.get("spec")?.get("selector"))
            .map(|s| serde_yaml_ng::from_value(s.clone()))
            .transpose()
            .with_context(|| format!("selector of Service {backend}"))?
            .with_context(|| format!("no Service {namespace}/{backend} with a selector"))?;
        selectors.push((backend.clone(), selector));
    }

    let mut pods = Vec::new();
    for PodManifest { name, labels, addr } in manifests.pods(&namespace, &service)? {
        let Some((backend, _)) = selectors
            .iter()
            .find(|(_, selector)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        else {
            continue;
        };
        pods.push(CanaryPod {
            name,
            addr,
            backend: backend.clone(),
        });
    }
    for (backend, _) in &weighted.2.backends {
        if !pods.iter().any(|p| &p.backend == backend) {
            bail!(
                "no Pod in {} is selected by backend {backend}",
                dir.display()
            );
        }
    }
    Ok(Canary {
        route: format!("{namespace}/{name}"),
        base_url: format!("http://{service}.{namespace}:{port}"),
        namespace,
        port,
        header,
        weighted,
        pods,
    })
}

impl Canary {
    fn pod(&self, name: &str) -> Option<&CanaryPod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The weighted rule's path prefix with a segment added (`/checkout/7`).
    fn weighted_url(&self, i: usize) -> String {
        format!(
            "{}{}/{i}",
            self.base_url,
            self.weighted.1.trim_end_matches('/')
        )
    }
}

/// What a canary request was meant to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Taken by the weighted rule.
    Weighted,
    /// Carries the header: taken by the header rule.
    Header,
    /// No rule takes it: the parent Service's own pods.
    Unrouted,
}

/// One request and its answer.
#[derive(Debug, Clone)]
pub struct Record {
    kind: Kind,
    status: Option<u16>,
    upstream: Option<String>,
    error: Option<String>,
}

async fn send(canary: &Canary, client: &HttpClient, kind: Kind, i: usize) -> Record {
    let (header_name, header_value, _) = &canary.header;
    let (method, url, headers): (Method, String, Vec<(&str, &str)>) = match kind {
        Kind::Weighted => (
            canary.weighted.0.clone(),
            canary.weighted_url(i),
            Vec::new(),
        ),
        Kind::Header => (
            Method::GET,
            format!("{}/{i}", canary.base_url),
            vec![(header_name.as_str(), header_value.as_str())],
        ),
        // A method and path the weighted rule does not take, without the header.
        Kind::Unrouted => (
            Method::GET,
            format!("{}/health", canary.base_url),
            Vec::new(),
        ),
    };
    match client.request(method, &url, &headers, Bytes::new()).await {
        Ok(response) => Record {
            kind,
            status: Some(response.status.as_u16()),
            upstream: response.upstream().map(str::to_owned),
            error: None,
        },
        Err(err) => Record {
            kind,
            status: None,
            upstream: None,
            error: Some(err.to_string()),
        },
    }
}

/// Sends canary traffic through the agent at `proxy` until `until`: each tick one
/// request the weighted rule takes; every [`HEADER_EVERY`] ticks one with the
/// header, every [`UNROUTED_EVERY`] ticks one that no rule takes.
pub async fn drive(
    canary: &Canary,
    proxy: SocketAddr,
    start: Instant,
    until: Duration,
) -> Vec<Record> {
    let client = HttpClient::proxy(proxy).with_timeout(Duration::from_secs(10));
    let mut records = Vec::new();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for i in 0usize.. {
        let tick = ticks.tick().await;
        if tick.saturating_duration_since(start) >= until {
            break;
        }
        records.push(send(canary, &client, Kind::Weighted, i).await);
        if i % HEADER_EVERY == 1 {
            records.push(send(canary, &client, Kind::Header, i).await);
        }
        if i % UNROUTED_EVERY == 2 {
            records.push(send(canary, &client, Kind::Unrouted, i).await);
        }
    }
    records
}

/// Whether `got` of `sent` requests for a backend of weight `weight` (of `total`)
/// is what smooth weighted round robin gives: exact per full turn of `total`
/// requests, and within one request of the share in between.
fn split_holds(got: u64, sent: u64, weight: u64, total: u64) -> bool {
    // got/sent vs weight/total, in integers: |got * total - sent * weight| < total.
    (got * total).abs_diff(sent * weight) < total
}

/// `name 3, other 4`.
fn by_pod(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(pod, n)| format!("{pod} {}", count(*n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders the canary block of the summary and returns what went wrong (a split
/// off its weights, a header-matched request on another backend, a failure).
pub fn report(
    out: &mut String,
    canary: &Canary,
    records: &[Record],
    metrics: Option<&Metrics>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let (method, path, rule) = &canary.weighted;
    let (header_name, header_value, header_rule) = &canary.header;
    let mut backends: BTreeMap<Kind, BTreeMap<String, u64>> = BTreeMap::new();
    let mut pods: BTreeMap<Kind, BTreeMap<String, u64>> = BTreeMap::new();
    for record in records {
        if !record.status.is_some_and(|s| (200..300).contains(&s)) {
            problems.push(format!(
                "canary: a {:?} request failed: {:?} {:?}",
                record.kind, record.status, record.error
            ));
            continue;
        }
        let Some(pod) = record.upstream.as_deref().and_then(|name| canary.pod(name)) else {
            problems.push(format!(
                "canary: a {:?} request was answered by {:?}, not a pod of {}",
                record.kind, record.upstream, canary.route
            ));
            continue;
        };
        *backends
            .entry(record.kind)
            .or_default()
            .entry(pod.backend.clone())
            .or_default() += 1;
        *pods
            .entry(record.kind)
            .or_default()
            .entry(pod.name.clone())
            .or_default() += 1;
    }
    let got = |kind: Kind, backend: &str| {
        backends
            .get(&kind)
            .and_then(|b| b.get(backend))
            .copied()
            .unwrap_or(0)
    };
    let answered = |kind: Kind| backends.get(&kind).map_or(0, |b| b.values().sum::<u64>());
    let parent = canary.base_url.trim_start_matches("http://").to_owned();
    let _ = writeln!(
        out,
        "\ntraffic split (HTTPRoute {} on {parent} from examples/canary)",
        canary.route
    );

    let n = answered(Kind::Weighted);
    let total = rule.total();
    let shares: Vec<String> = rule
        .backends
        .iter()
        .map(|(backend, _)| {
            let g = got(Kind::Weighted, backend);
            format!(
                "{backend} {} ({:.1}%)",
                count(g),
                if n == 0 {
                    0.0
                } else {
                    100.0 * g as f64 / n as f64
                }
            )
        })
        .collect();
    let expected: Vec<String> = rule
        .backends
        .iter()
        .map(|(_, w)| format!("{:.1}", (n * w) as f64 / total as f64))
        .collect();
    let _ = writeln!(
        out,
        "  {method} {path}/N: {} answered, {}; weights {} expect {}",
        count(n),
        shares.join(", "),
        rule.describe_weights(),
        expected.join("/"),
    );
    for (backend, weight) in &rule.backends {
        let g = got(Kind::Weighted, backend);
        if !split_holds(g, n, *weight, total) {
            problems.push(format!(
                "canary: {backend} got {g} of {n} weighted requests; weight {weight} of {total} gives {:.1}",
                (n * weight) as f64 / total as f64
            ));
        }
    }

    let h = answered(Kind::Header);
    let header_backends: Vec<&str> = header_rule
        .backends
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(b, _)| b.as_str())
        .collect();
    let on_header_backends: u64 = header_backends.iter().map(|b| got(Kind::Header, b)).sum();
    let _ = writeln!(
        out,
        "  {header_name}: {header_value}: {} answered, {} on {} ({})",
        count(h),
        count(on_header_backends),
        header_backends.join(", "),
        pods.get(&Kind::Header).map(by_pod).unwrap_or_default(),
    );
    if h == 0 || on_header_backends != h {
        problems.push(format!(
            "canary: {} of {h} requests with {header_name}: {header_value} reached {}",
            on_header_backends,
            header_backends.join(", ")
        ));
    }

    let u = answered(Kind::Unrouted);
    let _ = writeln!(
        out,
        "  no rule (GET /health): {} answered by the parent's pods ({})",
        count(u),
        pods.get(&Kind::Unrouted).map(by_pod).unwrap_or_default(),
    );
    if u == 0 {
        problems.push("canary: no request that no rule takes was answered".to_owned());
    }

    if let Some(metrics) = metrics {
        let counted: Vec<String> = rule
            .backends
            .iter()
            .map(|(backend, _)| {
                let label = format!("{backend}.{}:{}", canary.namespace, canary.port);
                let n = metrics.get(
                    "bulwark_route_requests_total",
                    &[("route", canary.route.as_str()), ("backend", &label)],
                );
                format!("{backend} {}", count(n.round() as u64))
            })
            .collect();
        let _ = writeln!(
            out,
            "  the agent counted (bulwark_route_requests_total, all rules): {}",
            counted.join(", ")
        );
    }
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "  as the route says: the split within one request of the weights, every {header_name} request on {}",
            header_backends.join(", ")
        );
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_canary_example() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/canary");
        let canary = canary(&dir).unwrap();
        assert_eq!(canary.route, "shop/checkout-canary");
        assert_eq!(canary.base_url, "http://checkout.shop:80");
        assert_eq!(canary.header.0, "x-canary");
        assert_eq!(canary.header.1, "true");
        assert_eq!(canary.header.2.backends, [("checkout-v2".to_owned(), 1)]);
        assert_eq!(canary.weighted.0, Method::POST);
        assert_eq!(canary.weighted.1, "/checkout");
        assert_eq!(
            canary.weighted.2.backends,
            [
                ("checkout-v1".to_owned(), 90),
                ("checkout-v2".to_owned(), 10)
            ]
        );
        assert_eq!(canary.weighted_url(7), "http://checkout.shop:80/checkout/7");
        let pods: Vec<(&str, &str)> = canary
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.backend.as_str()))
            .collect();
        assert_eq!(
            pods,
            [
                ("checkout-v1-0", "checkout-v1"),
                ("checkout-v1-1", "checkout-v1"),
                ("checkout-v2-0", "checkout-v2")
            ]
        );
        assert_eq!(canary.pods[2].addr, "127.0.0.53:8080".parse().unwrap());
    }

    #[test]
    fn canary_pods_do_not_collide_with_other_demo_pods() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let canary = canary(&examples.join("canary")).unwrap();
        let sharded = crate::sharded::layout(&examples.join("sharded")).unwrap();
        for pod in &canary.pods {
            assert!(sharded.pods.iter().all(|p| p.addr != pod.addr), "{pod:?}");
            assert!(
                crate::UPSTREAMS
                    .iter()
                    .all(|u| u.addr != pod.addr.to_string()),
                "{pod:?}"
            );
        }
    }

    /// Smooth weighted round robin, as the agent schedules backends.
    fn smooth(weights: &[u64], picks: usize) -> Vec<usize> {
        let total: i64 = weights.iter().map(|w| *w as i64).sum();
        let mut current = vec![0i64; weights.len()];
        (0..picks)
            .map(|_| {
                for (c, w) in current.iter_mut().zip(weights) {
                    *c += *w as i64;
                }
                let best = (0..weights.len())
                    .max_by_key(|&i| (current[i], -(i as i64)))
                    .unwrap();
                current[best] -= total;
                best
            })
            .collect()
    }

    #[test]
    fn every_prefix_of_a_smooth_schedule_holds_the_split() {
        for weights in [[90, 10], [1, 1], [3, 7]] {
            let total = weights.iter().sum();
            let picks = smooth(&weights, 350);
            for n in 1..=picks.len() {
                for (i, w) in weights.iter().enumerate() {
                    let got = picks[..n].iter().filter(|p| **p == i).count() as u64;
                    assert!(split_holds(got, n as u64, *w, total), "{weights:?} {n}");
                }
            }
        }
        // Full turns are exact; one request off is not.
        assert!(split_holds(270, 300, 90, 100));
        assert!(!split_holds(268, 300, 90, 100));
        assert!(!split_holds(300, 300, 90, 100));
    }

    fn record(kind: Kind, upstream: &str) -> Record {
        Record {
            kind,
            status: Some(200),
            upstream: Some(upstream.to_owned()),
            error: None,
        }
    }

    #[test]
    fn the_report_fails_a_wrong_split_and_a_stray_header_request() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/canary");
        let canary = canary(&dir).unwrap();
        let mut good: Vec<Record> = smooth(&[90, 10], 100)
            .into_iter()
            .map(|i| record(Kind::Weighted, ["checkout-v1-0", "checkout-v2-0"][i]))
            .collect();
        good.push(record(Kind::Header, "checkout-v2-0"));
        good.push(record(Kind::Unrouted, "checkout-v1-1"));
        let mut out = String::new();
        assert!(report(&mut out, &canary, &good, None).is_empty(), "{out}");
        assert!(
            out.contains("checkout-v1 90 (90.0%), checkout-v2 10 (10.0%)"),
            "{out}"
        );

        let mut bad = good.clone();
        bad.push(record(Kind::Header, "checkout-v1-0"));
        bad.extend((0..5).map(|_| record(Kind::Weighted, "checkout-v2-0")));
        let problems = report(&mut String::new(), &canary, &bad, None);
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
