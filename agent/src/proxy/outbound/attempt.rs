//! One try of an outbound request:
//!
//! ```text
//! bulkhead slot → balancer pick (with its breaker permit) → send → classify the outcome
//! ```
//!
//! The balancer only picks endpoints whose breaker grants a permit
//! ([`CircuitBreaker::acquire`](crate::policy::breaker::CircuitBreaker::acquire)), so
//! pick and permit are one call. The try reports its outcome to the breaker (a 5xx,
//! a failure or an unreadable gRPC response count against the endpoint) and to the
//! shard's metrics; what happens next (another try, or this answer) is the retry
//! loop's business, in `forward`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::transport::upstream::Leased;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tracing::debug;

use crate::config::destination::Destination;
use crate::grpc::grpc_status;
use crate::policy::balance::{PickError, Picked};
use crate::policy::breaker::BreakerPermit;
use crate::policy::bulkhead::{BulkheadFull, BulkheadPermit};
use crate::policy::endpoint::EndpointLoad;
use crate::policy::retry::{Failure, Retries};
use crate::policy::shard::{Role, Route, ShardPickError};
use crate::policy::timeout::{Deadline, Elapsed};
use crate::proxy::body::{Prefix, read_prefix, replay};
use crate::proxy::refuse::{BodyFault, body_fault};
use crate::proxy::strip_hop_by_hop;
use crate::reason;
use crate::transport::{BoxError, ProxyBody, full};

/// The request body, kept for replay when the policy may retry.
pub enum ReplayBody {
    /// Read in full: every try sends a copy.
    Replayable(Bytes),
    /// Sent once, by the only try allowed.
    Once(Option<ProxyBody>),
}

impl ReplayBody {
    fn for_attempt(&mut self) -> ProxyBody {
        match self {
            ReplayBody::Replayable(data) => full(data.clone()),
            // A one-shot body is only sent by the single attempt it allows.
            ReplayBody::Once(body) => body.take().unwrap_or_else(|| full(Bytes::new())),
        }
    }
}

/// What every try of one request shares: where it may go and what it sends.
pub struct Outgoing<'a> {
    /// The destination and its policy state.
    pub dst: &'a Destination,
    /// Every try goes to this endpoint (a connection redirected to one pod's address).
    pub pinned: Option<SocketAddr>,
    /// The shard and copy, for a sharded destination.
    pub route: Option<Route<'a>>,
    /// The session key, for consistent hashing.
    pub affinity: Option<u64>,
    /// The request's method.
    pub method: Method,
    /// The request's path and query.
    pub path: PathAndQuery,
    /// The request's headers: earlier tries send copies, the last takes them.
    pub headers: Option<HeaderMap>,
    /// The request's body.
    pub body: ReplayBody,
    /// Speak HTTP/2 to the endpoint.
    pub http2: bool,
    /// The request is gRPC (its outcome may be in `grpc-status`).
    pub grpc: bool,
}

/// Why a try could not be sent; the request ends there.
#[derive(Debug)]
pub enum Refused {
    /// The deadline passed while the try waited for a bulkhead slot.
    Deadline,
    /// The bulkhead's queue is full, or the wait outlasted the queue timeout.
    BulkheadFull(BulkheadFull),
    /// A write to a shard whose primary has no endpoint or an open breaker.
    PrimaryUnavailable,
    /// The destination has no endpoint.
    NoEndpoints,
    /// Every endpoint's breaker is open; one may admit again in `retry_after`.
    AllOpen {
        /// The shortest wait until some endpoint admits again.
        retry_after: Duration,
    },
    /// The client broke its request body while the try sent it: the endpoint is not
    /// to blame (its breaker permit is dropped unsettled) and no retry may follow.
    ClientBody(BodyFault),
}

/// An endpoint's answer to a try.
pub struct Answer {
    /// The response, hop-by-hop headers removed; its body holds the try's bulkhead
    /// slot and endpoint load until it ends.
    pub rsp: Response<ProxyBody>,
    /// The gRPC status, if the response carried one where it was looked for.
    pub grpc_status: Option<u32>,
}

/// A try that was sent, and what came of it.
pub struct Tried {
    /// Where it went.
    pub endpoint: SocketAddr,
    /// The answer, or how the try failed.
    pub outcome: Result<Answer, Failure>,
    /// A failed try's bulkhead slot and endpoint load, held until the retry decision
    /// (an answer's are held by its body).
    _guards: Option<(BulkheadPermit, EndpointLoad)>,
}

/// Makes one try of `req`: a bulkhead slot (waiting within the deadline), an endpoint
/// (one not yet `tried` if any admits), the send (within the try's own deadline), and
/// the outcome reported to the endpoint's breaker.
pub async fn attempt(
    req: &mut Outgoing<'_>,
    retries: &Retries<'_>,
    deadline: &Deadline,
) -> Result<Tried, Refused> {
    let dst = req.dst;
    // 1. Bulkhead slot.
    let slot = match deadline.run(dst.bulkhead.acquire()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(full)) => {
            debug!(
                dst = %dst.name,
                reason = reason::BULKHEAD_FULL,
                cause = full.as_str(),
                in_flight = dst.bulkhead.in_flight(),
                queued = dst.bulkhead.queued(),
                "request rejected"
            );
            return Err(Refused::BulkheadFull(full));
        }
        Err(Elapsed) => return Err(Refused::Deadline),
    };
    // 2. Balancer pick and breaker permit.
    let (picked, role) = req.pick(retries.tried())?;
    let (endpoint, permit, load) = picked.into_parts();
    // 3. Send.
    let try_deadline = deadline.for_try(retries.per_try_timeout());
    let upstream_req = req.request(&endpoint.authority, retries.is_last());
    let sent = match try_deadline
        .run(dst.upstream.send(&endpoint.pool, upstream_req, req.http2))
        .await
    {
        Ok(Ok(rsp)) => Ok(rsp),
        Ok(Err(error)) => match body_fault(&error) {
            Some(fault) => {
                debug!(dst = %dst.name, endpoint = %endpoint.addr, %error, "the client broke its request body");
                return Err(Refused::ClientBody(fault));
            }
            None if error.is_connect() => Err(Failure::Connect),
            None => Err(Failure::Reset),
        },
        Err(Elapsed) => Err(Failure::Timeout),
    };
    if let (Some(route), Some(role)) = (&req.route, role) {
        let failed = sent.as_ref().map_or(true, |r| r.status().is_server_error());
        route.record(role, failed);
    }
    // 4. Classify the outcome, and report it to the breaker. In place, in this frame:
    // only the rare read of a gRPC response's trailers is a future of its own.
    let guards = (slot, load);
    let rsp = match sent {
        Ok(rsp) => rsp,
        Err(failure) => return Ok(failed(req, retries, endpoint.addr, permit, failure, guards)),
    };
    let status = rsp.status();
    let (mut head, body) = rsp.into_parts();
    let found = req.grpc.then(|| grpc_status(&head.headers));
    let (body, grpc_status) = match (found, retries.trailers_limit()) {
        // gRPC with no status in the headers, and a retry may follow: the status is in
        // the trailers of a small response.
        (Some(None), Some(limit)) => match read_trailers(body, limit, &try_deadline).await {
            Ok((body, grpc_status)) => (Held::boxed(body, guards), grpc_status),
            Err(failure) => {
                return Ok(failed(req, retries, endpoint.addr, permit, failure, guards));
            }
        },
        (found, _) => (Held::boxed(body, guards), found.flatten()),
    };
    if status.is_server_error() {
        permit.failure();
    } else {
        permit.success();
    }
    strip_hop_by_hop(&mut head.headers);
    Ok(Tried {
        endpoint: endpoint.addr,
        outcome: Ok(Answer {
            rsp: Response::from_parts(head, body),
            grpc_status,
        }),
        _guards: None,
    })
}

/// A try that failed: reported to the endpoint's breaker; its slot and load are held
/// until the retry decision.
fn failed(
    req: &Outgoing<'_>,
    retries: &Retries<'_>,
    endpoint: SocketAddr,
    permit: BreakerPermit,
    failure: Failure,
    guards: (BulkheadPermit, EndpointLoad),
) -> Tried {
    permit.failure();
    debug!(dst = %req.dst.name, %endpoint, ?failure, attempt = retries.attempt(), "try failed");
    Tried {
        endpoint,
        outcome: Err(failure),
        _guards: Some(guards),
    }
}

impl Outgoing<'_> {
    /// An endpoint for one try, admitted by its breaker: the pinned one, the shard's
    /// copy, or the balancer's pick, preferring endpoints not `tried`.
    fn pick(&self, tried: &[SocketAddr]) -> Result<(Picked, Option<Role>), Refused> {
        let dst = self.dst;
        let picked = match (self.pinned, &self.route) {
            (Some(addr), _) => dst.balancer.pick_addr(addr).map(|p| (p, None)),
            (None, None) => dst
                .balancer
                .pick_keyed(tried, self.affinity)
                .map(|p| (p, None)),
            (None, Some(route)) => match route.pick(tried, self.affinity) {
                Ok((picked, role)) => Ok((picked, Some(role))),
                Err(ShardPickError::Unavailable(e)) => Err(e),
                Err(ShardPickError::PrimaryUnavailable) => {
                    debug!(
                        dst = %dst.name,
                        shard = %route.shard.name,
                        reason = reason::SHARD_PRIMARY_UNAVAILABLE,
                        "the shard's primary cannot take the write"
                    );
                    return Err(Refused::PrimaryUnavailable);
                }
            },
        };
        picked.map_err(|error| match error {
            PickError::NoEndpoints => Refused::NoEndpoints,
            PickError::AllOpen { retry_after } => {
                debug!(
                    dst = %dst.name,
                    reason = reason::CIRCUIT_OPEN,
                    endpoints = dst.balancer.endpoints().len(),
                    ?retry_after,
                    "every endpoint's breaker is open"
                );
                Refused::AllOpen { retry_after }
            }
        })
    }

    /// The request of one try, to the endpoint at `authority`.
    fn request(&mut self, authority: &Authority, is_last: bool) -> Request<ProxyBody> {
        let mut req = Request::new(self.body.for_attempt());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri_for(&self.path, authority);
        *req.headers_mut() = if is_last {
            self.headers.take().unwrap_or_default()
        } else {
            self.headers.clone().unwrap_or_default()
        };
        req
    }
}

/// The URI of one try: the original path and query, sent to the endpoint's
/// authority (rendered once per endpoint, not per try).
fn uri_for(path: &PathAndQuery, authority: &Authority) -> Uri {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority.clone());
    uri.path_and_query = Some(path.clone());
    Uri::from_parts(uri).unwrap_or_default()
}

/// Reads a small gRPC response to its end within the try's deadline, for the
/// `grpc-status` in its trailers (the retry decision needs it). A response that fails
/// while being read is a reset.
async fn read_trailers(
    body: Leased,
    limit: usize,
    try_deadline: &Deadline,
) -> Result<(ProxyBody, Option<u32>), Failure> {
    match try_deadline.run(read_prefix(body, limit)).await {
        Ok(Ok(Prefix::Complete { data, trailers })) => {
            let status = trailers.as_ref().and_then(grpc_status);
            Ok((replay(data, trailers), status))
        }
        Ok(Ok(partial)) => Ok((partial.into_body(), None)),
        Ok(Err(_)) | Err(Elapsed) => Err(Failure::Reset),
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its try's bulkhead slot and endpoint load until it
    /// ends (a slow body still occupies the destination), boxed once as a [`ProxyBody`].
    struct Held<B> {
        #[pin]
        body: B,
        guards: (BulkheadPermit, EndpointLoad),
    }
}

impl<B> Held<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn boxed(body: B, guards: (BulkheadPermit, EndpointLoad)) -> ProxyBody {
        Held { body, guards }.boxed_unsync()
    }
}

impl<B> Body for Held<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project()
            .body
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bulwark_proto::v1;
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    fn dur(ms: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration {
            seconds: ms / 1000,
            nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap(),
        })
    }

    /// A destination over `endpoints` with a one-slot bulkhead (no queue unless
    /// `queue_ms`), and a breaker tripping on the first failure.
    fn destination(endpoints: &[SocketAddr], queue_ms: Option<i64>) -> Destination {
        let metrics = Metrics::new(Arc::new(arc_swap::ArcSwap::from_pointee(Config::default())));
        let port = v1::ServicePort {
            port: 80,
            endpoints: endpoints
                .iter()
                .map(|a| v1::Endpoint {
                    address: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            resilience: Some(v1::ResiliencePolicy {
                circuit_breaker: Some(v1::CircuitBreaker {
                    consecutive_failures: 1,
                    open_duration: dur(60_000),
                    max_open_duration: dur(60_000),
                    half_open_probes: 1,
                    ..Default::default()
                }),
                bulkhead: Some(v1::Bulkhead {
                    max_concurrent_requests: 1,
                    max_pending: u32::from(queue_ms.is_some()),
                    queue_timeout: queue_ms.and_then(dur),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Destination::build("svc.test:80", &port, None, &metrics).unwrap()
    }

    fn outgoing(dst: &Destination) -> Outgoing<'_> {
        Outgoing {
            dst,
            pinned: None,
            route: None,
            affinity: None,
            method: Method::GET,
            path: PathAndQuery::from_static("/"),
            headers: Some(HeaderMap::new()),
            body: ReplayBody::Once(None),
            http2: false,
            grpc: false,
        }
    }

    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn no_endpoint_refuses_the_try() {
        let dst = destination(&[], None);
        let retries = Retries::new(None, None, &Method::GET);
        let refused = attempt(&mut outgoing(&dst), &retries, &Deadline::default()).await;
        assert!(matches!(refused, Err(Refused::NoEndpoints)));
        assert_eq!(dst.bulkhead.in_flight(), 0, "the slot is given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_refuses_and_the_deadline_bounds_the_queue() {
        let dst = destination(&[], None);
        let retries = Retries::new(None, None, &Method::GET);
        let _held = dst.bulkhead.acquire().await.unwrap();
        let refused = attempt(&mut outgoing(&dst), &retries, &Deadline::default()).await;
        assert!(matches!(refused, Err(Refused::BulkheadFull(_))), "no queue");

        let queued = destination(&[], Some(5_000));
        let _held = queued.bulkhead.acquire().await.unwrap();
        let start = Instant::now();
        let deadline = Deadline::new(start, Some(Duration::from_millis(300)), None);
        let refused = attempt(&mut outgoing(&queued), &retries, &deadline).await;
        assert!(matches!(refused, Err(Refused::Deadline)));
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(300),
            "waited until the deadline, not the queue timeout"
        );
    }

    #[tokio::test]
    async fn a_connect_failure_is_reported_to_the_breaker_and_keeps_its_slot() {
        let dead = closed_port().await;
        let dst = destination(&[dead], None);
        let retries = Retries::new(None, None, &Method::GET);
        let tried = attempt(&mut outgoing(&dst), &retries, &Deadline::default())
            .await
            .unwrap();
        assert_eq!(tried.endpoint, dead);
        assert!(matches!(tried.outcome, Err(Failure::Connect)));
        assert_eq!(dst.bulkhead.in_flight(), 1, "held until the retry decision");
        drop(tried);
        assert_eq!(dst.bulkhead.in_flight(), 0);
        let refused = attempt(&mut outgoing(&dst), &retries, &Deadline::default()).await;
        assert!(
            matches!(refused, Err(Refused::AllOpen { .. })),
            "the breaker opened on the failure"
        );
    }

    #[test]
    fn a_replayable_body_is_sent_by_every_try_a_one_shot_body_once() {
        let mut replay = ReplayBody::Replayable(Bytes::from_static(b"abc"));
        for _ in 0..2 {
            let body = replay.for_attempt();
            assert_eq!(http_body::Body::size_hint(&body).exact(), Some(3));
        }
        let mut once = ReplayBody::Once(Some(full("xyz")));
        assert_eq!(
            http_body::Body::size_hint(&once.for_attempt()).exact(),
            Some(3)
        );
        assert_eq!(
            http_body::Body::size_hint(&once.for_attempt()).exact(),
            Some(0)
        );
    }
}
