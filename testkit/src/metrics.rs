//! Reads Prometheus/OpenMetrics text (an admin `/metrics` page) so tests can
//! ask for one number: `metrics.get("bulwark_retries_total", &[("dst", "reviews.demo:80")])`.

use std::net::SocketAddr;

use crate::client::{self, ClientError};

/// One sample: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name as exposed (`bulwark_requests_total`, `..._bucket`).
    pub name: String,
    /// The labels, in the order exposed.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// A label's value, if the sample has that label.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether the sample has every one of `labels` (and perhaps others).
    pub fn matches(&self, labels: &[(&str, &str)]) -> bool {
        labels
            .iter()
            .all(|&(key, value)| self.label(key) == Some(value))
    }
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    samples: Vec<Sample>,
    /// Families declared by `# TYPE` lines (a family may have no sample yet).
    families: Vec<String>,
}

/// A scrape that failed or a page that is not Prometheus text.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The request for `/metrics` failed.
    #[error("scraping http://{admin}/metrics failed: {source}")]
    Request {
        /// The admin address.
        admin: SocketAddr,
        /// Why.
        source: Box<ClientError>,
    },
    /// `/metrics` answered with something other than 200.
    #[error("scraping http://{admin}/metrics: status {status}: {body}")]
    Status {
        /// The admin address.
        admin: SocketAddr,
        /// The status received.
        status: http::StatusCode,
        /// The start of the body.
        body: String,
    },
    /// A line is not a valid sample.
    #[error("metrics line {line_number}: {reason}: {line:?}")]
    Parse {
        /// 1-based line number.
        line_number: usize,
        /// The line.
        line: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl Metrics {
    /// Fetches and parses `http://{admin}/metrics`.
    pub async fn scrape(admin: SocketAddr) -> Result<Metrics, MetricsError> {
        let response = client::get(admin, "/metrics", &[])
            .await
            .map_err(|source| MetricsError::Request {
                admin,
                source: Box::new(source),
            })?;
        if response.status != http::StatusCode::OK {
            let mut body = response.text();
            body.truncate(200);
            return Err(MetricsError::Status {
                admin,
                status: response.status,
                body,
            });
        }
        Metrics::parse(&response.text())
    }

    /// Parses Prometheus text format 0.0.4 or OpenMetrics text. Comments, `# EOF`,
    /// timestamps and exemplars are skipped.
    pub fn parse(text: &str) -> Result<Metrics, MetricsError> {
        let mut samples = Vec::new();
        let mut families = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                if let Some(family) = declaration.split_whitespace().next() {
                    families.push(family.to_owned());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let sample = parse_sample(line).map_err(|reason| MetricsError::Parse {
                line_number: index + 1,
                line: line.to_owned(),
                reason,
            })?;
            samples.push(sample);
        }
        Ok(Metrics { samples, families })
    }

    /// Whether the page exposes metric `name`: a sample of it, or a `# TYPE`
    /// declaration of its family (`bulwark_retries` for `bulwark_retries_total`),
    /// which tells "exported but still zero" from "not exported at all".
    pub fn has(&self, name: &str) -> bool {
        if self.samples(name).next().is_some() {
            return true;
        }
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        self.families
            .iter()
            .any(|declared| declared == name || declared == family)
    }

    /// The sum of the samples named `name` that carry all of `labels`; 0 if none does.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|sample| sample.matches(labels))
            .map(|sample| sample.value)
            .sum()
    }

    /// The samples named `name`.
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |sample| sample.name == name)
    }

    /// Every sample, in page order.
    pub fn all(&self) -> &[Sample] {
        &self.samples
    }

    /// Estimates quantile `q` (0..=1) of histogram `name` (without `_bucket`)
    /// over the series matching `labels`, as PromQL's `histogram_quantile`
    /// does: linear inside the bucket. `None` without observations.
    pub fn histogram_quantile(&self, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket_name = format!("{name}_bucket");
        // Sum matching series per upper bound, so several series merge into one histogram.
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for sample in self
            .samples(&bucket_name)
            .filter(|sample| sample.matches(labels))
        {
            let le = parse_value(sample.label("le")?)?;
            match buckets.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, count)) => *count += sample.value,
                None => buckets.push((le, sample.value)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let (mut lower_bound, mut lower_count) = (0.0, 0.0);
        for &(bound, count) in &buckets {
            if count >= rank {
                if bound.is_infinite() {
                    // Like Prometheus: the answer is the highest finite bound.
                    return Some(lower_bound);
                }
                let in_bucket = count - lower_count;
                if in_bucket <= 0.0 {
                    return Some(bound);
                }
                return Some(
                    lower_bound + (bound - lower_bound) * (rank - lower_count) / in_bucket,
                );
            }
            (lower_bound, lower_count) = (bound, count);
        }
        Some(lower_bound)
    }
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    if name_end == 0 {
        return Err("expected a metric name");
    }
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let value_text = rest.split_whitespace().next().ok_or("expected a value")?;
    let value = parse_value(value_text).ok_or("the value is not a number")?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `key="value",...}` and returns what follows the closing brace.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut Vec<(String, String)>,
) -> Result<&'a str, &'static str> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let key_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("unterminated labels")?;
        if key_end == 0 {
            return Err("expected a label name");
        }
        let key = rest[..key_end].to_owned();
        rest = rest[key_end..].trim_start();
        rest = rest
            .strip_prefix('=')
            .ok_or("expected '=' after a label name")?;
        rest = rest.trim_start();
        rest = rest
            .strip_prefix('"')
            .ok_or("expected a quoted label value")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((key, value));
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label");
        }
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP bulwark_requests Requests by destination.
# TYPE bulwark_requests counter
bulwark_requests_total{direction="outbound",dst="reviews.demo:80",status_class="2xx"} 120
bulwark_requests_total{direction="outbound",dst="reviews.demo:80",status_class="5xx"} 3
bulwark_requests_total{direction="outbound",dst="catalog.demo:80",status_class="2xx"} 40 1700000000000
bulwark_requests_total{direction="inbound",dst="frontend.demo:80",status_class="4xx"} 7 # {trace_id="a b} c"} 1.0
bulwark_breaker_state{dst="reviews.demo:80",endpoint="127.0.0.23:8080"} 1
bulwark_config_version 1732212345678
odd_label_value{path="a\"b\\c\nd, e}"} -2.5e-3
bulwark_request_duration_seconds_bucket{direction="outbound",dst="reviews.demo:80",le="0.005"} 50
bulwark_request_duration_seconds_bucket{direction="outbound",dst="reviews.demo:80",le="0.01"} 90
bulwark_request_duration_seconds_bucket{direction="outbound",dst="reviews.demo:80",le="0.1"} 100
bulwark_request_duration_seconds_bucket{direction="outbound",dst="reviews.demo:80",le="+Inf"} 100
bulwark_request_duration_seconds_sum{direction="outbound",dst="reviews.demo:80"} 0.6
bulwark_request_duration_seconds_count{direction="outbound",dst="reviews.demo:80"} 100
# TYPE bulwark_retry_budget_exhausted counter
# EOF
"#;

    #[test]
    fn get_sums_the_series_that_match() {
        let metrics = Metrics::parse(PAGE).unwrap();
        assert_eq!(
            metrics.get("bulwark_requests_total", &[("dst", "reviews.demo:80")]),
            123.0
        );
        assert_eq!(
            metrics.get(
                "bulwark_requests_total",
                &[("dst", "reviews.demo:80"), ("status_class", "5xx")]
            ),
            3.0
        );
        assert_eq!(metrics.get("bulwark_requests_total", &[]), 170.0);
        assert_eq!(
            metrics.get("bulwark_requests_total", &[("dst", "payments.demo:80")]),
            0.0
        );
        assert_eq!(metrics.get("bulwark_no_such_metric", &[]), 0.0);
        assert_eq!(
            metrics.get("bulwark_config_version", &[]),
            1_732_212_345_678.0
        );
    }

    #[test]
    fn timestamps_exemplars_and_escapes_are_handled() {
        let metrics = Metrics::parse(PAGE).unwrap();
        assert_eq!(
            metrics.get("bulwark_requests_total", &[("dst", "catalog.demo:80")]),
            40.0
        );
        assert_eq!(
            metrics.get("bulwark_requests_total", &[("direction", "inbound")]),
            7.0
        );
        let odd = metrics.samples("odd_label_value").next().unwrap();
        assert_eq!(odd.label("path"), Some("a\"b\\c\nd, e}"));
        assert_eq!(odd.value, -0.0025);
        let breaker = metrics.samples("bulwark_breaker_state").next().unwrap();
        assert_eq!(breaker.label("endpoint"), Some("127.0.0.23:8080"));
    }

    #[test]
    fn declared_families_without_samples_exist() {
        let metrics = Metrics::parse(PAGE).unwrap();
        assert!(metrics.has("bulwark_retry_budget_exhausted_total"));
        assert!(metrics.has("bulwark_requests_total"));
        assert!(metrics.has("bulwark_config_version"));
        assert!(!metrics.has("bulwark_retries_total"));
        assert_eq!(
            metrics.get("bulwark_retry_budget_exhausted_total", &[]),
            0.0
        );
    }

    #[test]
    fn histogram_quantile_interpolates_inside_the_bucket() {
        let metrics = Metrics::parse(PAGE).unwrap();
        let labels = [("dst", "reviews.demo:80")];
        let p50 = metrics
            .histogram_quantile("bulwark_request_duration_seconds", &labels, 0.5)
            .unwrap();
        assert!((p50 - 0.005).abs() < 1e-9, "{p50}");
        let p70 = metrics
            .histogram_quantile("bulwark_request_duration_seconds", &labels, 0.7)
            .unwrap();
        assert!((p70 - 0.0075).abs() < 1e-9, "{p70}");
        let p99 = metrics
            .histogram_quantile("bulwark_request_duration_seconds", &labels, 0.99)
            .unwrap();
        assert!((p99 - 0.091).abs() < 1e-9, "{p99}");
        assert_eq!(
            metrics.histogram_quantile("bulwark_request_duration_seconds", &[("dst", "nope")], 0.5),
            None
        );
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let err = Metrics::parse("ok 1\nbroken{a=\"x\" 2\n").unwrap_err();
        match err {
            MetricsError::Parse { line_number, .. } => assert_eq!(line_number, 2),
            other => panic!("unexpected error {other}"),
        }
        assert!(Metrics::parse("name notanumber").is_err());
        assert!(Metrics::parse("{a=\"b\"} 1").is_err());
    }
}
