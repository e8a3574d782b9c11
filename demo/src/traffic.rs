//! Load generators: open-loop requests at a steady rate, each outcome recorded
//! with its time and latency.

use std::time::Duration;

use bulwark_testkit::HttpClient;
use bytes::Bytes;
use http::Method;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

/// What happened to one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When it was sent, from the start of the traffic.
    pub at: Duration,
    /// How long until the whole answer arrived (or the failure).
    pub latency: Duration,
    /// The status, or `None` if no answer arrived (connection failed, client timeout).
    pub status: Option<u16>,
    /// The agent's `x-bulwark-reason`, if the agent answered itself.
    pub reason: Option<String>,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// The transport error, if there was no answer.
    pub error: Option<String>,
}

impl Outcome {
    /// Whether the answer was a 2xx.
    pub fn is_success(&self) -> bool {
        self.status
            .is_some_and(|status| (200..300).contains(&status))
    }

    /// Whether the agent answered with this reason.
    pub fn has_reason(&self, reason: &str) -> bool {
        self.reason.as_deref() == Some(reason)
    }
}

/// Everything one generator saw.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// One entry per request sent.
    pub outcomes: Vec<Outcome>,
    /// Ticks skipped because `max_in_flight` requests were already waiting.
    pub skipped: u64,
}

/// One stream of identical requests at a fixed rate.
#[derive(Debug, Clone)]
pub struct Steady {
    /// The client (and so the address and framing) to use.
    pub client: HttpClient,
    /// The method.
    pub method: Method,
    /// The URL (absolute through the proxy, or a path).
    pub url: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// Requests per second.
    pub rate: f64,
    /// When to start, from the start of the traffic.
    pub from: Duration,
    /// When to stop sending, from the start of the traffic.
    pub until: Duration,
    /// At most this many requests waiting for an answer; further ticks are skipped.
    pub max_in_flight: usize,
}

impl Steady {
    /// Sends the requests (open loop: a slow answer does not delay the next
    /// request) and returns once every answer is in.
    pub async fn run(self, start: Instant) -> Run {
        let period = Duration::from_secs_f64(1.0 / self.rate.max(0.001));
        let end = start + self.until;
        tokio::time::sleep_until(start + self.from).await;
        let mut ticks = tokio::time::interval(period);
        // After a stall, carry on at the rate rather than sending a burst.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut in_flight = JoinSet::new();
        let mut run = Run::default();
        loop {
            tokio::select! {
                tick = ticks.tick() => {
                    if tick >= end {
                        break;
                    }
                    if in_flight.len() >= self.max_in_flight {
                        run.skipped += 1;
                        continue;
                    }
                    let client = self.client.clone();
                    let (method, url, headers, body) =
                        (self.method.clone(), self.url.clone(), self.headers.clone(), self.body.clone());
                    in_flight.spawn(async move {
                        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        send(&client, method, &url, &pairs, body, start, tick).await
                    });
                }
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok(outcome) = done {
                        run.outcomes.push(outcome);
                    }
                }
            }
        }
        while let Some(done) = in_flight.join_next().await {
            if let Ok(outcome) = done {
                run.outcomes.push(outcome);
            }
        }
        run.outcomes.sort_by_key(|outcome| outcome.at);
        run
    }
}

/// Sends one request that was due at `scheduled` and records what happened.
/// Its time and latency count from when it was due, not from when its task got
/// to run, so a busy machine shows up as latency instead of shifting the schedule
/// (no coordinated omission).
pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    start: Instant,
    scheduled: Instant,
) -> Outcome {
    let result = client.request(method, url, headers, body).await;
    let latency = scheduled.elapsed();
    let at = scheduled.saturating_duration_since(start);
    match result {
        Ok(response) => Outcome {
            at,
            latency,
            status: Some(response.status.as_u16()),
            reason: response.reason().map(str::to_owned),
            retry_after: response.header("retry-after").map(str::to_owned),
            error: None,
        },
        Err(err) => Outcome {
            at,
            latency,
            status: None,
            reason: None,
            retry_after: None,
            error: Some(err.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use bulwark_testkit::{Knobs, Upstream};

    use super::*;

    fn steady(client: HttpClient, max_in_flight: usize) -> Steady {
        Steady {
            client,
            method: Method::GET,
            url: "/".to_owned(),
            headers: vec![("x-tenant-id".to_owned(), "acme".to_owned())],
            body: Bytes::new(),
            rate: 200.0,
            from: Duration::from_millis(20),
            until: Duration::from_millis(120),
            max_in_flight,
        }
    }

    #[tokio::test]
    async fn sends_within_its_window_and_records_each_answer() {
        let upstream = Upstream::start(
            "127.0.0.1:0".parse().unwrap(),
            "up",
            Knobs::failing(1.0, 500),
        )
        .await
        .unwrap();
        let start = Instant::now();
        let run = steady(HttpClient::direct(upstream.addr()), 64)
            .run(start)
            .await;
        assert!(!run.outcomes.is_empty());
        assert!(
            run.outcomes.len() <= 21,
            "{} requests in 100 ms at 200/s",
            run.outcomes.len()
        );
        assert_eq!(
            upstream.stats().total,
            run.outcomes.len() as u64,
            "every send is recorded"
        );
        for outcome in &run.outcomes {
            assert_eq!(outcome.status, Some(500));
            assert!(!outcome.is_success());
            assert!(
                outcome.at >= Duration::from_millis(20) && outcome.at < Duration::from_millis(120)
            );
        }
        assert!(
            run.outcomes.windows(2).all(|w| w[0].at <= w[1].at),
            "sorted by time"
        );
    }

    #[tokio::test]
    async fn never_has_more_than_max_in_flight_waiting() {
        let upstream = Upstream::start("127.0.0.1:0".parse().unwrap(), "hang", Knobs::hanging())
            .await
            .unwrap();
        let client = HttpClient::direct(upstream.addr()).with_timeout(Duration::from_millis(300));
        let run = steady(client, 2).run(Instant::now()).await;
        // Both requests hang past the end of the window; every later tick is skipped.
        assert_eq!(run.outcomes.len(), 2);
        assert!(run.skipped >= 1);
        assert!(
            run.outcomes
                .iter()
                .all(|o| o.status.is_none() && o.error.is_some())
        );
    }
}
