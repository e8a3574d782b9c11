//! The sharded service of `examples/sharded/`: reads its layout (key, ranges, which
//! pod holds which shard and role) from the example YAML, drives keyed reads and
//! writes through the agent, makes one shard's replicas fail for a while, and
//! checks from the upstreams' own answers (`x-upstream`) that every request landed
//! where the topology says.

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

use crate::examples::{Manifests, PodManifest, gateway_duration, text};
use crate::progress::Progress;
use crate::report::count;

/// The customers whose orders the demo reads and writes (the shard key's values).
const CUSTOMERS: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "mallory", "nina", "oscar", "peggy", "trent",
    "victor",
];
/// One tick of keyed traffic every this long (20 ticks a second).
const TICK: Duration = Duration::from_millis(50);
/// When the last shard's replicas start answering 500, and when they heal.
const FAIL_FROM: Duration = Duration::from_secs(10);
const FAIL_UNTIL: Duration = Duration::from_secs(18);
/// Plain reads answered with an error before the breakers move them off the failing
/// replicas; more means the breakers did not do their job.
const MAX_FAILED_READS: usize = 20;

/// A shard's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Takes writes (and reads that must be fresh).
    Primary,
    /// Takes reads.
    Replica,
}

/// One pod of the sharded service.
#[derive(Debug, Clone)]
pub struct ShardPod {
    /// The pod's name (also the demo upstream's name, so its `x-upstream`).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The shard it holds.
    pub shard: String,
    /// Its role in that shard.
    pub role: Role,
}

/// One `Range` strategy entry: keys in `[start, end)` belong to `shard`.
#[derive(Debug, Clone)]
struct KeyRange {
    start: Option<String>,
    end: Option<String>,
    shard: String,
}

/// The sharded service as the example YAML describes it.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `namespace/name` of the ShardTopology.
    topology: String,
    /// `http://NAME.NAMESPACE:PORT`, the URL base through the outbound proxy.
    base_url: String,
    /// The request header holding the shard key.
    key_header: String,
    /// The read-your-writes client header and window, if set.
    ryw: Option<(String, Duration)>,
    /// The key ranges, in the order written.
    ranges: Vec<KeyRange>,
    /// The shards' names, in the order written.
    shards: Vec<String>,
    /// Every pod that holds a shard.
    pub pods: Vec<ShardPod>,
}

/// Whether `labels` hold every pair of `selector.matchLabels`.
fn selects(selector: Option<&Value>, labels: &BTreeMap<String, String>) -> bool {
    let Some(Value::Mapping(wanted)) = selector.and_then(|s| s.get("matchLabels")) else {
        return false;
    };
    wanted.iter().all(|(k, v)| {
        let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
            return false;
        };
        labels.get(k).is_some_and(|have| have == v)
    })
}

/// Reads the one ShardTopology in `dir` (key from a header, Range strategy), its
/// Service, and the pods holding its shards (labels, `status.podIP`, and the port of
/// the Service's EndpointSlices).
pub fn layout(dir: &Path) -> anyhow::Result<Layout> {
    let manifests = Manifests::load(dir)?;
    let topologies: Vec<&Value> = manifests.of_kind("ShardTopology").collect();
    let [topology] = topologies[..] else {
        bail!(
            "{} holds {} ShardTopologies; the demo drives exactly one",
            dir.display(),
            topologies.len()
        );
    };
    let namespace =
        text(topology, &["metadata", "namespace"]).unwrap_or_else(|| "default".to_owned());
    let name = text(topology, &["metadata", "name"]).context("the ShardTopology has no name")?;
    let spec = topology
        .get("spec")
        .context("the ShardTopology has no spec")?;
    let service = spec
        .get("targetRefs")
        .and_then(|refs| refs.get(0))
        .and_then(|r| text(r, &["name"]))
        .context("the ShardTopology has no targetRefs[0].name")?;
    if text(spec, &["key", "type"]).as_deref() != Some("Header") {
        bail!("the demo drives a ShardTopology keyed by a Header");
    }
    let key_header = text(spec, &["key", "name"]).context("spec.key.name")?;
    if text(spec, &["strategy", "type"]).as_deref() != Some("Range") {
        bail!("the demo checks a ShardTopology with the Range strategy");
    }
    let ranges = spec
        .get("strategy")
        .and_then(|s| s.get("ranges"))
        .and_then(Value::as_sequence)
        .context("spec.strategy.ranges")?
        .iter()
        .map(|r| {
            Ok(KeyRange {
                start: text(r, &["start"]),
                end: text(r, &["end"]),
                shard: text(r, &["shard"]).context("a range without a shard")?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ryw = match spec.get("readYourWrites") {
        Some(ryw) => Some((
            text(ryw, &["clientHeader"])
                .context("the demo needs readYourWrites.clientHeader to tell its clients apart")?,
            gateway_duration(&text(ryw, &["window"]).context("readYourWrites.window")?)?,
        )),
        None => None,
    };
    let shard_specs = spec
        .get("shards")
        .and_then(Value::as_sequence)
        .context("spec.shards")?;
    let shards: Vec<String> = shard_specs
        .iter()
        .map(|s| text(s, &["name"]).context("a shard without a name"))
        .collect::<anyhow::Result<_>>()?;

    let service_port = manifests.service_port(&namespace, &service)?;
    let mut pods = Vec::new();
    for PodManifest { name, labels, addr } in manifests.pods(&namespace, &service)? {
        for shard in shard_specs {
            let Some(shard_name) = text(shard, &["name"]) else {
                continue;
            };
            let role = if selects(shard.get("primary"), &labels) {
                Role::Primary
            } else if selects(shard.get("replicas"), &labels) {
                Role::Replica
            } else {
                continue;
            };
            pods.push(ShardPod {
                name: name.clone(),
                addr,
                shard: shard_name,
                role,
            });
        }
    }
    if pods.is_empty() {
        bail!("no Pod in {} holds a shard of {service}", dir.display());
    }
    Ok(Layout {
        topology: format!("{namespace}/{name}"),
        base_url: format!("http://{service}.{namespace}:{service_port}"),
        key_header,
        ryw,
        ranges,
        shards,
        pods,
    })
}

impl Layout {
    /// The shard the ranges give `key`.
    fn shard_of(&self, key: &str) -> Option<&str> {
        self.ranges
            .iter()
            .find(|r| {
                r.start.as_deref().is_none_or(|s| key >= s)
                    && r.end.as_deref().is_none_or(|e| key < e)
            })
            .map(|r| r.shard.as_str())
    }

    fn pod(&self, name: &str) -> Option<&ShardPod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The shard whose replicas the demo makes fail: the last one written.
    fn failing_shard(&self) -> Option<&str> {
        self.shards.last().map(String::as_str)
    }

    fn describe_ranges(&self) -> String {
        self.ranges
            .iter()
            .map(|r| {
                format!(
                    "{} {}..{}",
                    r.shard,
                    r.start
                        .as_deref()
                        .map(|s| format!("{s:?}"))
                        .unwrap_or_default(),
                    r.end
                        .as_deref()
                        .map(|e| format!("{e:?}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a keyed request was meant to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A GET from a client that has not written: a replica.
    Read,
    /// A POST: the primary.
    Write,
    /// A GET right after the same client's write: the primary (read-your-writes).
    OwnWrite,
    /// A GET with `x-bulwark-consistency: strong`: the primary.
    Strong,
    /// A GET from a client whose write is older than the window: a replica again.
    Late,
    /// A GET without the key: 400 `shard-key-missing`.
    NoKey,
}

/// One request and its answer.
#[derive(Debug, Clone)]
pub struct Record {
    at: Duration,
    kind: Kind,
    key: Option<&'static str>,
    status: Option<u16>,
    reason: Option<String>,
    upstream: Option<String>,
    error: Option<String>,
}

impl Record {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

async fn send(
    layout: &Layout,
    client: &HttpClient,
    start: Instant,
    kind: Kind,
    key: Option<&'static str>,
    session: Option<&str>,
) -> Record {
    let at = start.elapsed();
    let url = format!("{}/orders/{}", layout.base_url, key.unwrap_or("none"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(key) = key {
        headers.push((&layout.key_header, key));
    }
    if let (Some(session), Some((header, _))) = (session, &layout.ryw) {
        headers.push((header, session));
    }
    if kind == Kind::Strong {
        headers.push(("x-bulwark-consistency", "strong"));
    }
    let (method, body) = if kind == Kind::Write {
        (Method::POST, Bytes::from_static(br#"{"item": "book"}"#))
    } else {
        (Method::GET, Bytes::new())
    };
    match client.request(method, &url, &headers, body).await {
        Ok(response) => Record {
            at,
            kind,
            key,
            status: Some(response.status.as_u16()),
            reason: response.reason().map(str::to_owned),
            upstream: response.upstream().map(str::to_owned),
            error: None,
        },
        Err(err) => Record {
            at,
            kind,
            key,
            status: None,
            reason: None,
            upstream: None,
            error: Some(err.to_string()),
        },
    }
}

/// Sends keyed traffic to the sharded service through the agent at `proxy` until
/// `until`: each tick one read, write (followed by the same client's read) or strong
/// read, for the customers in turn; the failing shard's replicas answer 500 from
/// [`FAIL_FROM`] to [`FAIL_UNTIL`].
pub async fn drive(
    layout: &Layout,
    proxy: SocketAddr,
    start: Instant,
    progress: Progress,
    until: Duration,
) -> Vec<Record> {
    let client = HttpClient::proxy(proxy).with_timeout(Duration::from_secs(10));
    let mut records = Vec::new();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let late_after = layout
        .ryw
        .as_ref()
        .map(|(_, window)| *window + Duration::from_secs(2));
    let (mut failing, mut healed, mut late_sent) = (false, false, false);
    let failing_replicas: Vec<&ShardPod> = layout
        .pods
        .iter()
        .filter(|p| p.role == Role::Replica && Some(p.shard.as_str()) == layout.failing_shard())
        .collect();
    records.push(send(layout, &client, start, Kind::NoKey, None, None).await);
    // A client that writes once at the start, and reads again after its window.
    records.push(
        send(
            layout,
            &client,
            start,
            Kind::Write,
            Some(CUSTOMERS[0]),
            Some("early"),
        )
        .await,
    );
    for i in 0usize.. {
        let tick = ticks.tick().await;
        let at = tick.saturating_duration_since(start);
        if at >= until {
            break;
        }
        if !failing && at >= FAIL_FROM {
            failing = true;
            for pod in &failing_replicas {
                crate::set_knobs(
                    pod.addr,
                    r#"{"fail_ratio": 1.0, "fail_status": 500}"#,
                    progress,
                )
                .await;
            }
            progress.now(&format!(
                "{}: shard {}'s replicas now answer 500; reads fall back to its primary once their breakers open",
                layout.topology,
                layout.failing_shard().unwrap_or("?")
            ));
        }
        if !healed && at >= FAIL_UNTIL {
            healed = true;
            for pod in &failing_replicas {
                crate::set_knobs(pod.addr, "{}", progress).await;
            }
            progress.now(&format!(
                "{}: shard {}'s replicas healthy again; probes will close their breakers",
                layout.topology,
                layout.failing_shard().unwrap_or("?")
            ));
        }
        if let Some(after) = late_after
            && !late_sent
            && at >= after
        {
            late_sent = true;
            records.push(
                send(
                    layout,
                    &client,
                    start,
                    Kind::Late,
                    Some(CUSTOMERS[0]),
                    Some("early"),
                )
                .await,
            );
        }
        let customer = CUSTOMERS[i % CUSTOMERS.len()];
        match i % 5 {
            3 => {
                let session = format!("s{i}");
                records.push(
                    send(
                        layout,
                        &client,
                        start,
                        Kind::Write,
                        Some(customer),
                        Some(&session),
                    )
                    .await,
                );
                records.push(
                    send(
                        layout,
                        &client,
                        start,
                        Kind::OwnWrite,
                        Some(customer),
                        Some(&session),
                    )
                    .await,
                );
            }
            1 => {
                records.push(send(layout, &client, start, Kind::Strong, Some(customer), None).await)
            }
            _ => records.push(send(layout, &client, start, Kind::Read, Some(customer), None).await),
        }
    }
    records
}

/// Who served what, per shard, from the records.
#[derive(Debug, Default)]
struct Tally {
    reads: BTreeMap<String, u64>,
    writes: BTreeMap<String, u64>,
    own_writes: u64,
    strong: u64,
    keys: Vec<&'static str>,
}

/// Renders the sharded block of the summary and returns what went wrong (routing
/// that contradicts the topology).
pub fn report(
    out: &mut String,
    layout: &Layout,
    records: &[Record],
    metrics: Option<&Metrics>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let failing_shard = layout.failing_shard().unwrap_or_default();
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    let (mut fallback_reads, mut failed_reads) = (Vec::new(), 0usize);
    let mut late = None;
    let mut no_key = None;
    for record in records {
        if record.kind == Kind::NoKey {
            no_key = Some(record);
            continue;
        }
        let key = record.key.unwrap_or_default();
        let Some(expected) = layout.shard_of(key) else {
            problems.push(format!(
                "sharded: no range of {} holds key {key:?}",
                layout.topology
            ));
            continue;
        };
        let tally = tallies.entry(expected).or_default();
        if !tally.keys.contains(&key) {
            tally.keys.push(key);
        }
        if !record.ok() {
            if record.kind == Kind::Read && expected == failing_shard && record.at >= FAIL_FROM {
                failed_reads += 1;
            } else {
                problems.push(format!(
                    "sharded: {:?} of key {key} at {:.1}s failed: {:?} {:?} {:?}",
                    record.kind,
                    record.at.as_secs_f64(),
                    record.status,
                    record.reason,
                    record.error
                ));
            }
            continue;
        }
        let served = record.upstream.as_deref().and_then(|name| layout.pod(name));
        let Some(pod) = served else {
            problems.push(format!(
                "sharded: key {key} was answered by {:?}, not a pod of {}",
                record.upstream, layout.topology
            ));
            continue;
        };
        if pod.shard != expected {
            problems.push(format!(
                "sharded: key {key} belongs to shard {expected} but {} (shard {}) served it",
                pod.name, pod.shard
            ));
            continue;
        }
        let wanted = match record.kind {
            Kind::Read if expected == failing_shard && record.at >= FAIL_FROM => None,
            Kind::Read | Kind::Late => Some(Role::Replica),
            Kind::Write | Kind::OwnWrite | Kind::Strong | Kind::NoKey => Some(Role::Primary),
        };
        if wanted.is_some_and(|role| role != pod.role) {
            problems.push(format!(
                "sharded: a {:?} request of key {key} at {:.1}s reached the {:?} {}",
                record.kind,
                record.at.as_secs_f64(),
                pod.role,
                pod.name
            ));
        }
        match record.kind {
            Kind::Read => {
                *tally.reads.entry(pod.name.clone()).or_default() += 1;
                if pod.role == Role::Primary {
                    fallback_reads.push(record.at);
                }
            }
            Kind::Write => *tally.writes.entry(pod.name.clone()).or_default() += 1,
            Kind::OwnWrite => tally.own_writes += 1,
            Kind::Strong => tally.strong += 1,
            Kind::Late => late = Some((record, pod)),
            Kind::NoKey => {}
        }
    }

    let _ = writeln!(
        out,
        "\nsharded service ({} from examples/sharded: key {}, ranges {})",
        layout.topology,
        layout.key_header,
        layout.describe_ranges()
    );
    for shard in &layout.shards {
        let tally = tallies.get(shard.as_str());
        // Reads a primary served are fallbacks; say so.
        let list = |served: Option<&BTreeMap<String, u64>>, reads: bool| match served {
            Some(map) if !map.is_empty() => map
                .iter()
                .map(|(pod, n)| {
                    let fallback =
                        reads && layout.pod(pod).is_some_and(|p| p.role == Role::Primary);
                    format!(
                        "{pod} {}{}",
                        count(*n),
                        if fallback { " (fallback)" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            _ => "none".to_owned(),
        };
        let _ = writeln!(
            out,
            "  shard {shard} (keys {})",
            tally.map(|t| t.keys.join(", ")).unwrap_or_default()
        );
        let _ = writeln!(out, "    reads   {}", list(tally.map(|t| &t.reads), true));
        let _ = writeln!(out, "    writes  {}", list(tally.map(|t| &t.writes), false));
        if let Some(t) = tally {
            let _ = writeln!(
                out,
                "    on the primary too: {} reads right after the client's own write (read-your-writes), {} strong reads",
                count(t.own_writes),
                count(t.strong)
            );
        }
        for pod in layout.pods.iter().filter(|p| &p.shard == shard) {
            let reads = tally
                .and_then(|t| t.reads.get(&pod.name))
                .copied()
                .unwrap_or(0);
            let writes = tally
                .and_then(|t| t.writes.get(&pod.name))
                .copied()
                .unwrap_or(0);
            match pod.role {
                Role::Replica if reads == 0 => problems.push(format!(
                    "sharded: replica {} of shard {shard} served no read",
                    pod.name
                )),
                Role::Primary if writes == 0 => problems.push(format!(
                    "sharded: primary {} of shard {shard} took no write",
                    pod.name
                )),
                _ => {}
            }
        }
    }

    let fallbacks =
        metrics.map(|m| m.get("bulwark_shard_fallbacks_total", &[("shard", failing_shard)]));
    let _ = writeln!(
        out,
        "  {:.0}-{:.0}s shard {failing_shard}'s replicas answered 500: {} reads failed before their breakers opened, then {} reads{} fell back to the primary; the agent counted {} fallbacks",
        FAIL_FROM.as_secs_f64(),
        FAIL_UNTIL.as_secs_f64(),
        failed_reads,
        count(fallback_reads.len() as u64),
        match (fallback_reads.first(), fallback_reads.last()) {
            (Some(first), Some(last)) =>
                format!(" ({:.1}-{:.1}s)", first.as_secs_f64(), last.as_secs_f64()),
            _ => String::new(),
        },
        fallbacks.map_or("n/a".to_owned(), |n| count(n.round() as u64)),
    );
    if fallback_reads.is_empty() {
        problems.push(format!(
            "sharded: no read of shard {failing_shard} fell back to its primary while its replicas failed"
        ));
    }
    if failed_reads > MAX_FAILED_READS {
        problems.push(format!(
            "sharded: {failed_reads} reads failed while shard {failing_shard}'s replicas did (more than {MAX_FAILED_READS}: did the breakers open?)"
        ));
    }
    if let Some((header, window)) = &layout.ryw {
        match late {
            Some((record, pod)) => {
                let _ = writeln!(
                    out,
                    "  read-your-writes expires: a read with the same {header} {:.1}s after its write went to {} (window {:.0}s)",
                    record.at.as_secs_f64(),
                    pod.name,
                    window.as_secs_f64()
                );
            }
            None => problems.push(
                "sharded: the read after the read-your-writes window got no answer from a pod"
                    .to_owned(),
            ),
        }
    }
    match no_key {
        Some(record)
            if record.status == Some(400)
                && record.reason.as_deref() == Some("shard-key-missing") =>
        {
            let _ = writeln!(
                out,
                "  a request without {}: 400 shard-key-missing",
                layout.key_header
            );
        }
        other => problems.push(format!(
            "sharded: a request without {} got {:?} {:?}, not 400 shard-key-missing",
            layout.key_header,
            other.and_then(|r| r.status),
            other.and_then(|r| r.reason.clone())
        )),
    }
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "  as the topology says: every key on its shard, every write on a primary, no plain read on a primary except in the fallback"
        );
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_layout_of_the_sharded_example() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sharded");
        let layout = layout(&dir).unwrap();
        assert_eq!(layout.topology, "shop/orders");
        assert_eq!(layout.base_url, "http://orders.shop:80");
        assert_eq!(layout.key_header, "x-customer");
        assert_eq!(layout.shards, ["a", "b"]);
        assert_eq!(layout.shard_of("alice"), Some("a"));
        assert_eq!(layout.shard_of("m"), Some("b"));
        assert_eq!(layout.shard_of("zoe"), Some("b"));
        let roles: Vec<(&str, &str, Role)> = layout
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.shard.as_str(), p.role))
            .collect();
        assert_eq!(roles.len(), 6);
        assert!(roles.contains(&("orders-a-primary-0", "a", Role::Primary)));
        assert!(roles.contains(&("orders-b-replica-1", "b", Role::Replica)));
        // Both shards hold keys of the demo's customers.
        for shard in ["a", "b"] {
            assert!(CUSTOMERS.iter().any(|c| layout.shard_of(c) == Some(shard)));
        }
    }
}
