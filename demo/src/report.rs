//! The summary printed at the end: one block per policy, with numbers from
//! the demo's own observations and from the agent's metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bulwark_testkit::{Metrics, Stats};

use crate::examples::Bucket;
use crate::latency::Latencies;
use crate::observer::{BreakerEvent, Observations};
use crate::traffic::{Outcome, Run};

/// One test upstream the demo ran, and what it counted.
#[derive(Debug, Clone)]
pub struct UpstreamReport {
    /// Its name (`reviews-1`).
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
    /// What it described itself as (`flaky: 30% 503`).
    pub role: String,
    /// Its counters at the end, if they could be read.
    pub stats: Option<Stats>,
}

/// Everything the summary is made of.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// How long the traffic ran.
    pub traffic: Duration,
    /// GETs to reviews through the outbound proxy.
    pub reviews: &'a Run,
    /// GETs to catalog through the outbound proxy.
    pub catalog: &'a Run,
    /// POSTs to payments through the outbound proxy.
    pub payments: &'a Run,
    /// When payments was being flooded.
    pub payments_window: (Duration, Duration),
    /// Inbound requests of tenant acme.
    pub acme: &'a Run,
    /// Inbound requests of tenant globex.
    pub globex: &'a Run,
    /// The breaker timeline and bulkhead peaks.
    pub observations: &'a Observations,
    /// The agent's metrics at the end.
    pub metrics: Option<&'a Metrics>,
    /// The control plane's metrics at the end.
    pub control_plane: Option<&'a Metrics>,
    /// The test upstreams.
    pub upstreams: &'a [UpstreamReport],
    /// The per-tenant bucket of the example policy, if it could be read.
    pub bucket: Option<Bucket>,
}

/// A metric from the final scrape: `None` when the agent does not export it at all.
fn metric(inputs: &Inputs<'_>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let metrics = inputs.metrics?;
    metrics.has(name).then(|| metrics.get(name, labels))
}

/// A metric as a count, or `n/a` if the agent does not export it.
fn metric_count(inputs: &Inputs<'_>, name: &str, labels: &[(&str, &str)]) -> String {
    match metric(inputs, name, labels) {
        Some(value) => count(value.round() as u64),
        None => "n/a".to_owned(),
    }
}

/// Every agent metric the summary reads, to explain an `n/a`.
const METRICS_USED: &[&str] = &[
    "bulwark_retries_total",
    "bulwark_retries_recovered_total",
    "bulwark_retry_budget_exhausted_total",
    "bulwark_breaker_state",
    "bulwark_breaker_trips_total",
    "bulwark_local_responses_total",
    "bulwark_bulkhead_in_flight",
    "bulwark_bulkhead_queued",
    "bulwark_bulkhead_rejected_total",
    "bulwark_rate_limited_total",
    "bulwark_config_version",
    "bulwark_config_updates_total",
];

/// Renders the whole summary.
pub fn render(inputs: &Inputs<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n=== Summary: {:.0} s of traffic through the agent ===",
        inputs.traffic.as_secs_f64()
    );
    retries(&mut out, inputs);
    breakers(&mut out, inputs);
    bulkhead(&mut out, inputs);
    timeouts(&mut out, inputs);
    rate_limit(&mut out, inputs);
    config(&mut out, inputs);
    let skipped: u64 = [
        inputs.reviews,
        inputs.catalog,
        inputs.payments,
        inputs.acme,
        inputs.globex,
    ]
    .iter()
    .map(|run| run.skipped)
    .sum();
    if skipped > 0 {
        let _ = writeln!(
            out,
            "\n(the demo skipped {} sends because too many requests were waiting for an answer)",
            count(skipped)
        );
    }
    match inputs.metrics {
        None => {
            let _ = writeln!(out, "\n(n/a: the agent's metrics could not be read)");
        }
        Some(metrics) => {
            let missing: Vec<&str> = METRICS_USED
                .iter()
                .copied()
                .filter(|name| !metrics.has(name))
                .collect();
            if !missing.is_empty() {
                let _ = writeln!(
                    out,
                    "\n(n/a: the agent does not export {})",
                    missing.join(", ")
                );
            }
        }
    }
    out
}

fn retries(out: &mut String, inputs: &Inputs<'_>) {
    let dst = [("dst", "reviews.demo:80")];
    let run = inputs.reviews;
    let ok = run.outcomes.iter().filter(|o| o.is_success()).count();
    let _ = writeln!(out, "\nretries (reviews.demo:80)");
    let _ = writeln!(
        out,
        "  {} requests sent, {} answered 2xx{}",
        count(run.outcomes.len() as u64),
        count(ok as u64),
        failures_suffix(&run.outcomes),
    );
    let _ = writeln!(
        out,
        "  {} failed tries retried, {} recovered; budget exhausted {} times",
        metric_count(inputs, "bulwark_retries_total", &dst),
        metric_count(inputs, "bulwark_retries_recovered_total", &dst),
        metric_count(inputs, "bulwark_retry_budget_exhausted_total", &dst),
    );
    for upstream in inputs
        .upstreams
        .iter()
        .filter(|u| u.name.starts_with("reviews"))
    {
        let _ = match &upstream.stats {
            Some(stats) => writeln!(
                out,
                "  {} ({}): {} tries, {} failed",
                upstream.addr,
                upstream.role,
                count(stats.total),
                count(stats.failures)
            ),
            None => writeln!(
                out,
                "  {} ({}): stats unavailable",
                upstream.addr, upstream.role
            ),
        };
    }
}

fn breakers(out: &mut String, inputs: &Inputs<'_>) {
    let _ = writeln!(out, "\ncircuit breaker (per endpoint)");
    if inputs.observations.breakers.is_empty() {
        let _ = writeln!(out, "  no breaker changed state");
    }
    for (key, events) in &inputs.observations.breakers {
        let _ = writeln!(
            out,
            "  endpoint {} ({}) {}",
            key.endpoint,
            key.dst,
            describe_timeline(events)
        );
    }
    for (dst, run) in outbound_runs(inputs) {
        let fast: Vec<&Outcome> = run
            .outcomes
            .iter()
            .filter(|o| o.has_reason("circuit-open"))
            .collect();
        if fast.is_empty() {
            continue;
        }
        let latency = Latencies::new(fast.iter().map(|o| o.latency));
        let _ = writeln!(
            out,
            "  {dst}: {} failed fast (503 circuit-open: every endpoint open){}; the agent counted {}",
            requests(fast.len()),
            latency
                .quantile(0.99)
                .map(|p99| format!(", p99 {}", ms(p99)))
                .unwrap_or_default(),
            metric_count(
                inputs,
                "bulwark_local_responses_total",
                &[("dst", dst), ("reason", "circuit-open")]
            ),
        );
    }
    if inputs.observations.failed_scrapes > 0 {
        let _ = writeln!(
            out,
            "  ({} of {} metric scrapes failed; last error: {})",
            inputs.observations.failed_scrapes,
            inputs.observations.failed_scrapes + inputs.observations.scrapes,
            inputs
                .observations
                .last_error
                .as_deref()
                .unwrap_or("unknown"),
        );
    }
}

/// "opened at 3.1s, re-opened at 6.1s and 12.2s, closed after a probe at 24.2s".
pub fn describe_timeline(events: &[(Duration, BreakerEvent)]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut reopened: Vec<String> = Vec::new();
    let flush = |parts: &mut Vec<String>, reopened: &mut Vec<String>| {
        if !reopened.is_empty() {
            parts.push(format!("re-opened at {}", join_and(reopened)));
            reopened.clear();
        }
    };
    for &(at, event) in events {
        match event {
            BreakerEvent::Opened => {
                flush(&mut parts, &mut reopened);
                parts.push(format!("opened at {}", secs(at)));
            }
            BreakerEvent::Reopened => reopened.push(secs(at)),
            // Half-open lasts as long as one probe: the events around it tell the story.
            BreakerEvent::HalfOpen => {}
            BreakerEvent::Closed => {
                flush(&mut parts, &mut reopened);
                parts.push(format!("closed after a probe at {}", secs(at)));
            }
        }
    }
    flush(&mut parts, &mut reopened);
    if events
        .last()
        .is_some_and(|(_, event)| *event != BreakerEvent::Closed)
    {
        parts.push("still open at the end".to_owned());
    }
    parts.join(", ")
}

fn bulkhead(out: &mut String, inputs: &Inputs<'_>) {
    let (from, until) = inputs.payments_window;
    let payments = &inputs.payments.outcomes;
    let rejected = payments
        .iter()
        .filter(|o| o.has_reason("bulkhead-full"))
        .count();
    let _ = writeln!(out, "\nbulkhead (payments hangs; catalog is healthy)");
    let peak = |peaks: &BTreeMap<String, f64>| {
        peaks
            .get("payments.demo:80")
            .map_or_else(|| "n/a".to_owned(), |v| count(*v as u64))
    };
    let _ = writeln!(
        out,
        "  payments.demo:80: {} of {} requests rejected (503 bulkhead-full), agent counted {}; at most {} in flight and {} queued",
        count(rejected as u64),
        count(payments.len() as u64),
        metric_count(
            inputs,
            "bulwark_bulkhead_rejected_total",
            &[("dst", "payments.demo:80")]
        ),
        peak(&inputs.observations.max_in_flight),
        peak(&inputs.observations.max_queued),
    );
    let catalog = &inputs.catalog.outcomes;
    let before = Latencies::new(
        catalog
            .iter()
            .filter(|o| o.at < from && o.is_success())
            .map(|o| o.latency),
    );
    let during = Latencies::new(
        catalog
            .iter()
            .filter(|o| o.at >= from && o.at < until && o.is_success())
            .map(|o| o.latency),
    );
    let failed = catalog.iter().filter(|o| !o.is_success()).count();
    let _ = writeln!(
        out,
        "  catalog.demo:80: {} before, {} while payments was saturated; {} of {} catalog requests failed",
        percentiles(&before),
        percentiles(&during),
        count(failed as u64),
        count(catalog.len() as u64),
    );
}

fn timeouts(out: &mut String, inputs: &Inputs<'_>) {
    let timed_out: Vec<&Outcome> = all_outbound(inputs)
        .filter(|o| o.has_reason("timeout"))
        .collect();
    let latency = Latencies::new(timed_out.iter().map(|o| o.latency));
    let _ = writeln!(out, "\ntimeouts");
    match (latency.mean(), latency.quantile(0.0), latency.quantile(1.0)) {
        (Some(mean), Some(min), Some(max)) => {
            let _ = writeln!(
                out,
                "  payments.demo:80: {} answered 504 (timeout) after {:.2} s on average ({:.2}-{:.2} s)",
                requests(timed_out.len()),
                mean.as_secs_f64(),
                min.as_secs_f64(),
                max.as_secs_f64(),
            );
        }
        _ => {
            let _ = writeln!(out, "  no request was answered 504 (timeout)");
        }
    }
}

fn rate_limit(out: &mut String, inputs: &Inputs<'_>) {
    let _ = writeln!(
        out,
        "\nrate limit (RateLimitPolicy demo/frontend, on the agent's inbound listener)"
    );
    for (tenant, run) in [("acme", inputs.acme), ("globex", inputs.globex)] {
        let outcomes = &run.outcomes;
        let limited: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == Some(429)).collect();
        let allowed = outcomes.iter().filter(|o| o.is_success()).count();
        let mut retry_after: Vec<&str> = limited
            .iter()
            .filter_map(|o| o.retry_after.as_deref())
            .collect();
        retry_after.sort_unstable();
        retry_after.dedup();
        let span = match (outcomes.first(), outcomes.last()) {
            (Some(first), Some(last)) => last.at.saturating_sub(first.at),
            _ => Duration::ZERO,
        };
        let rate = if span.is_zero() {
            0.0
        } else {
            (outcomes.len().saturating_sub(1)) as f64 / span.as_secs_f64()
        };
        let _ = writeln!(
            out,
            "  {tenant}: {} sent at {rate:.0}/s, {} allowed, {} answered 429{}",
            count(outcomes.len() as u64),
            count(allowed as u64),
            count(limited.len() as u64),
            if retry_after.is_empty() {
                String::new()
            } else {
                format!(" (Retry-After: {})", retry_after.join(", "))
            },
        );
        if let Some(bucket) = inputs.bucket
            && tenant == "acme"
        {
            let _ = writeln!(
                out,
                "        expected: burst {} + {}/s x {:.2} s = {:.0} allowed",
                bucket.burst,
                bucket.per_second,
                span.as_secs_f64(),
                bucket.allowed_over(span),
            );
        }
    }
    let _ = writeln!(
        out,
        "  the agent counted {} requests over the per-tenant limit",
        metric_count(
            inputs,
            "bulwark_rate_limited_total",
            &[("policy", "demo/frontend"), ("limit", "per-tenant")]
        ),
    );
}

fn config(out: &mut String, inputs: &Inputs<'_>) {
    let _ = writeln!(out, "\nconfig");
    let version = metric(inputs, "bulwark_config_version", &[]);
    let _ = writeln!(
        out,
        "  agent: version {} in force; updates acked: {}, nacked: {}",
        version.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}")),
        metric_count(inputs, "bulwark_config_updates_total", &[("result", "ack")]),
        metric_count(
            inputs,
            "bulwark_config_updates_total",
            &[("result", "nack")]
        ),
    );
    let _ = match inputs.control_plane {
        Some(cp) => {
            let value = |name: &str| {
                if cp.has(name) {
                    count(cp.get(name, &[]).round() as u64)
                } else {
                    "n/a".to_owned()
                }
            };
            writeln!(
                out,
                "  control plane: agents connected: {}, snapshots sent: {}, ACKs: {}, NACKs: {}, rejected documents: {}",
                value("bulwark_cp_agents_connected"),
                value("bulwark_cp_snapshots_sent_total"),
                value("bulwark_cp_acks_total"),
                value("bulwark_cp_nacks_total"),
                value("bulwark_cp_rejected_objects"),
            )
        }
        None => writeln!(out, "  control plane: metrics unavailable"),
    };
}

fn outbound_runs<'a>(inputs: &'a Inputs<'_>) -> [(&'static str, &'a Run); 3] {
    [
        ("reviews.demo:80", inputs.reviews),
        ("catalog.demo:80", inputs.catalog),
        ("payments.demo:80", inputs.payments),
    ]
}

fn all_outbound<'a>(inputs: &'a Inputs<'_>) -> impl Iterator<Item = &'a Outcome> {
    outbound_runs(inputs)
        .into_iter()
        .flat_map(|(_, run)| run.outcomes.iter())
}

/// ", 2 not: 1 x 503 no-endpoints, 1 x no answer" or "".
fn failures_suffix(outcomes: &[Outcome]) -> String {
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for outcome in outcomes.iter().filter(|o| !o.is_success()) {
        let kind = match (outcome.status, &outcome.reason) {
            (Some(status), Some(reason)) => format!("{status} {reason}"),
            (Some(status), None) => format!("{status} from the upstream"),
            (None, _) => "no answer".to_owned(),
        };
        *by_kind.entry(kind).or_default() += 1;
    }
    if by_kind.is_empty() {
        return String::new();
    }
    let total: u64 = by_kind.values().sum();
    let kinds: Vec<String> = by_kind
        .iter()
        .map(|(kind, n)| format!("{} x {kind}", count(*n)))
        .collect();
    format!(", {} not: {}", count(total), kinds.join(", "))
}

fn percentiles(latencies: &Latencies) -> String {
    match (latencies.quantile(0.5), latencies.quantile(0.99)) {
        (Some(p50), Some(p99)) => format!("p50 {} / p99 {}", ms(p50), ms(p99)),
        _ => "no samples".to_owned(),
    }
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `1 request`, `1,204 requests`.
pub fn requests(n: usize) -> String {
    if n == 1 {
        "1 request".to_owned()
    } else {
        format!("{} requests", count(n as u64))
    }
}

/// `1234567` -> `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Milliseconds with a precision that suits the size.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// Seconds since the start of the traffic, to a tenth.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observer::BreakerEvent::*;

    fn outcome(at_ms: u64, latency_ms: u64, status: u16, reason: Option<&str>) -> Outcome {
        Outcome {
            at: Duration::from_millis(at_ms),
            latency: Duration::from_millis(latency_ms),
            status: Some(status),
            reason: reason.map(str::to_owned),
            retry_after: (status == 429).then(|| "1".to_owned()),
            error: None,
        }
    }

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1204), "1,204");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(ms(Duration::from_micros(1234)), "1.23 ms");
        assert_eq!(ms(Duration::from_micros(12_345)), "12.3 ms");
        assert_eq!(ms(Duration::from_millis(1000)), "1000 ms");
        assert_eq!(secs(Duration::from_millis(3140)), "3.1s");
    }

    #[test]
    fn breaker_timeline_reads_as_a_sentence() {
        let s = Duration::from_secs;
        assert_eq!(
            describe_timeline(&[
                (s(3), Opened),
                (s(6), HalfOpen),
                (s(6), Reopened),
                (s(12), Reopened),
                (s(24), Closed)
            ]),
            "opened at 3.0s, re-opened at 6.0s and 12.0s, closed after a probe at 24.0s"
        );
        assert_eq!(
            describe_timeline(&[(s(9), Opened)]),
            "opened at 9.0s, still open at the end"
        );
    }

    #[test]
    fn summary_has_a_block_per_policy_with_the_numbers() {
        let reviews = Run {
            outcomes: vec![
                outcome(0, 1, 200, None),
                outcome(5, 1, 200, None),
                outcome(9, 1, 503, Some("no-endpoints")),
            ],
            skipped: 0,
        };
        let catalog = Run {
            outcomes: (0..200)
                .map(|i| outcome(i * 100, 1 + i % 2, 200, None))
                .collect(),
            skipped: 0,
        };
        let payments = Run {
            outcomes: vec![
                outcome(8_000, 1000, 504, Some("timeout")),
                outcome(8_010, 0, 503, Some("bulkhead-full")),
                outcome(9_000, 0, 503, Some("circuit-open")),
            ],
            skipped: 0,
        };
        let acme = Run {
            outcomes: (0..30)
                .map(|i| outcome(i * 20, 1, if i < 12 { 200 } else { 429 }, None))
                .collect(),
            skipped: 0,
        };
        let globex = Run {
            outcomes: vec![outcome(0, 1, 200, None)],
            skipped: 0,
        };
        let metrics = Metrics::parse(
            "bulwark_retries_total{dst=\"reviews.demo:80\"} 412\n\
             bulwark_retries_recovered_total{dst=\"reviews.demo:80\"} 398\n\
             bulwark_retry_budget_exhausted_total{dst=\"reviews.demo:80\"} 0\n\
             bulwark_config_version 17\n\
             bulwark_config_updates_total{result=\"ack\"} 1\n",
        )
        .unwrap();
        let control_plane = Metrics::parse(
            "bulwark_cp_agents_connected 1\n\
             bulwark_cp_snapshots_sent_total 1\n\
             bulwark_cp_acks_total 1\n\
             bulwark_cp_rejected_objects 0\n",
        )
        .unwrap();
        let observations = Observations::default();
        let upstreams = [UpstreamReport {
            name: "reviews-1".into(),
            addr: "127.0.0.21:8080".parse().unwrap(),
            role: "flaky: 30% 503".into(),
            stats: Some(Stats {
                total: 1500,
                failures: 450,
                ..Stats::default()
            }),
        }];
        let text = render(&Inputs {
            traffic: Duration::from_secs(30),
            reviews: &reviews,
            catalog: &catalog,
            payments: &payments,
            payments_window: (Duration::from_secs(8), Duration::from_secs(16)),
            acme: &acme,
            globex: &globex,
            observations: &observations,
            metrics: Some(&metrics),
            control_plane: Some(&control_plane),
            upstreams: &upstreams,
            bucket: Some(Bucket {
                burst: 10.0,
                per_second: 20.0,
            }),
        });
        for expected in [
            "3 requests sent, 2 answered 2xx, 1 not: 1 x 503 no-endpoints",
            "412 failed tries retried, 398 recovered; budget exhausted 0 times",
            "127.0.0.21:8080 (flaky: 30% 503): 1,500 tries, 450 failed",
            "payments.demo:80: 1 request failed fast (503 circuit-open: every endpoint open), p99 0.00 ms; the agent counted n/a",
            "1 of 3 requests rejected (503 bulkhead-full)",
            "catalog.demo:80: p50 1.00 ms / p99 2.00 ms before, p50 1.00 ms / p99 2.00 ms while payments",
            "payments.demo:80: 1 request answered 504 (timeout) after 1.00 s",
            "acme: 30 sent at 50/s, 12 allowed, 18 answered 429 (Retry-After: 1)",
            "expected: burst 10 + 20/s x 0.58 s = 22 allowed",
            "globex: 1 sent at 0/s, 1 allowed, 0 answered 429",
            "agent: version 17 in force; updates acked: 1, nacked: 0",
            "control plane: agents connected: 1, snapshots sent: 1, ACKs: 1, NACKs: n/a, rejected documents: 0",
            "(n/a: the agent does not export bulwark_breaker_state, bulwark_breaker_trips_total, bulwark_local_responses_total,",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }
}
