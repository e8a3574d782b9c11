//! Sends one request to a mesh destination under its policy.
//!
//! Order, from the design: timeout (one deadline for the whole request) →
//! retry loop → per try: bulkhead slot → balancer pick (skipping endpoints
//! whose breaker is open, avoiding endpoints that already failed this request)
//! → breaker permit → upstream. Retries sit outside the bulkhead and the
//! balancer so that a retry waits for its own slot and may land elsewhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use crate::config::destination::Destination;
use crate::policy::balance::PickError;
use crate::policy::retry::{Failure, RetryPolicy};
use crate::policy::shard::{RouteError, ShardPickError};
use crate::proxy::body::{Prefix, read_prefix, replay};
use crate::proxy::{local_response, strip_hop_by_hop};
use crate::reason;
use crate::transport::{ProxyBody, full};

/// The address of the client that sent a request, set by the listener as a request
/// extension (read-your-writes keys clients by it when no client header is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The request body, kept for replay when the policy may retry.
enum Body {
    Replayable(Bytes),
    Once(Option<ProxyBody>),
}

impl Body {
    fn for_attempt(&mut self) -> ProxyBody {
        match self {
            Body::Replayable(data) => full(data.clone()),
            // A one-shot body is only sent by the single attempt it allows.
            Body::Once(body) => body.take().unwrap_or_else(|| full(Bytes::new())),
        }
    }
}

/// Forwards `req` to `dst` and records the outcome in `dst`'s metrics.
pub async fn forward(dst: Arc<Destination>, req: Request<Incoming>) -> Response<ProxyBody> {
    forward_to(dst, None, req).await
}

/// Like [`forward`]; with `pinned`, every try goes to that endpoint (a
/// redirected connection to one pod's address) instead of a balanced pick.
pub async fn forward_to(
    dst: Arc<Destination>,
    pinned: Option<SocketAddr>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let rsp = send(&dst, pinned, req, start).await;
    dst.metrics.response(rsp.status(), start.elapsed());
    rsp
}

fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

fn min_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn local(dst: &Destination, status: StatusCode, why: &'static str) -> Response<ProxyBody> {
    dst.metrics.local_response(why);
    local_response(status, why, None)
}

fn failure_response(dst: &Destination, failure: Failure) -> Response<ProxyBody> {
    match failure {
        Failure::Connect => local(dst, StatusCode::BAD_GATEWAY, reason::CONNECT_FAILED),
        Failure::Reset => local(dst, StatusCode::BAD_GATEWAY, reason::UPSTREAM_RESET),
        Failure::Timeout => local(dst, StatusCode::GATEWAY_TIMEOUT, reason::TIMEOUT),
    }
}

fn classify_error(err: &hyper_util::client::legacy::Error) -> Failure {
    if err.is_connect() {
        Failure::Connect
    } else {
        Failure::Reset
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

async fn send(
    dst: &Destination,
    pinned: Option<SocketAddr>,
    req: Request<Incoming>,
    start: Instant,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let http2 = dst.http2 || parts.version == http::Version::HTTP_2;
    let grpc = crate::grpc::is_grpc(&parts.headers);
    // The client's own deadline (`grpc-timeout`) bounds the request too.
    let client_deadline = if grpc {
        crate::grpc::timeout(&parts.headers)
    } else {
        None
    };
    let deadline = min_opt(dst.policy.timeouts.request, client_deadline).map(|t| start + t);
    let policy: Option<&RetryPolicy> = dst
        .policy
        .retry
        .as_ref()
        .filter(|r| r.attempts > 1 && r.allows_method(&parts.method));
    if let Some(budget) = &dst.budget {
        budget.deposit();
    }
    let mut body = match policy {
        Some(p) => match read_prefix(body, p.max_body_bytes).await {
            Ok(Prefix::Complete {
                data,
                trailers: None,
            }) => Body::Replayable(data),
            Ok(other) => Body::Once(Some(other.into_body())),
            Err(error) => {
                debug!(dst = %dst.name, %error, "client body failed before the request was sent");
                return local(dst, StatusCode::BAD_REQUEST, reason::BAD_REQUEST);
            }
        },
        None => Body::Once(Some(body.map_err(Into::into).boxed_unsync())),
    };
    let attempts = match (&body, policy) {
        (Body::Replayable(_), Some(p)) => p.attempts,
        _ => 1,
    };
    let per_try = policy.and_then(|p| p.per_try_timeout);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let client = parts.extensions.get::<ClientAddr>().map(|c| c.0);
    // Consistent hashing: the session key of the request, if the policy hashes on one.
    let affinity = dst
        .policy
        .hash_on
        .as_ref()
        .and_then(|h| h.key(&parts.headers, client.map(|c| c.ip())));
    // A sharded service: the request's key picks the shard, its kind the copy.
    let route = match &dst.shards {
        None => None,
        Some(router) => match router.route(&parts, client) {
            Ok(route) => Some(route),
            Err(RouteError::KeyMissing) => {
                debug!(dst = %dst.name, topology = %router.source, reason = reason::SHARD_KEY_MISSING, "request rejected");
                return local(dst, StatusCode::BAD_REQUEST, reason::SHARD_KEY_MISSING);
            }
        },
    };
    let method = parts.method;
    // The last try takes the headers; earlier ones send copies.
    let mut headers = Some(parts.headers);
    let mut avoid: Vec<SocketAddr> = Vec::new();
    let mut rng = fastrand::Rng::new();
    let mut last: Option<Response<ProxyBody>> = None;

    for attempt in 0..attempts {
        let is_last = attempt + 1 == attempts;

        // Bulkhead: wait for a slot, within the queue timeout and the deadline.
        let slot = match remaining(deadline) {
            Some(left) => match tokio::time::timeout(left, dst.bulkhead.acquire()).await {
                Ok(slot) => slot,
                Err(_) => return failure_response(dst, Failure::Timeout),
            },
            None => dst.bulkhead.acquire().await,
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(full) => {
                debug!(
                    dst = %dst.name,
                    reason = reason::BULKHEAD_FULL,
                    cause = full.as_str(),
                    in_flight = dst.bulkhead.in_flight(),
                    queued = dst.bulkhead.queued(),
                    "request rejected"
                );
                return last.unwrap_or_else(|| {
                    local(dst, StatusCode::SERVICE_UNAVAILABLE, reason::BULKHEAD_FULL)
                });
            }
        };

        // Balancer + breaker.
        let mut role = None;
        let picked = match (pinned, &route) {
            (Some(addr), _) => dst.balancer.pick_addr(addr),
            (None, None) => dst.balancer.pick_keyed(&avoid, affinity),
            (None, Some(route)) => match route.pick(&avoid, affinity) {
                Ok((picked, r)) => {
                    role = Some(r);
                    Ok(picked)
                }
                Err(ShardPickError::Unavailable(e)) => Err(e),
                Err(ShardPickError::PrimaryUnavailable) => {
                    debug!(
                        dst = %dst.name,
                        shard = %route.shard.name,
                        reason = reason::SHARD_PRIMARY_UNAVAILABLE,
                        "the shard's primary cannot take the write"
                    );
                    return last.unwrap_or_else(|| {
                        local(
                            dst,
                            StatusCode::SERVICE_UNAVAILABLE,
                            reason::SHARD_PRIMARY_UNAVAILABLE,
                        )
                    });
                }
            },
        };
        let picked = match picked {
            Ok(picked) => picked,
            Err(PickError::NoEndpoints) => {
                return local(dst, StatusCode::SERVICE_UNAVAILABLE, reason::NO_ENDPOINTS);
            }
            Err(PickError::AllOpen { retry_after }) => {
                debug!(
                    dst = %dst.name,
                    reason = reason::CIRCUIT_OPEN,
                    endpoints = dst.balancer.endpoints().len(),
                    ?retry_after,
                    "every endpoint's breaker is open"
                );
                if let Some(last) = last {
                    return last;
                }
                dst.metrics.local_response(reason::CIRCUIT_OPEN);
                return local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    reason::CIRCUIT_OPEN,
                    Some(retry_after),
                );
            }
        };
        let (endpoint, permit, load) = picked.into_parts();
        let addr = endpoint.addr;
        let mut req = Request::new(body.for_attempt());
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri_for(&path, &endpoint.authority);
        *req.headers_mut() = if is_last {
            headers.take().unwrap_or_default()
        } else {
            headers.clone().unwrap_or_default()
        };

        let limit = min_opt(per_try, remaining(deadline));
        let try_deadline = limit.map(|l| Instant::now() + l);
        let result = match limit {
            Some(limit) => match tokio::time::timeout(limit, dst.upstream.send(req, http2)).await {
                Ok(r) => r.map_err(|e| classify_error(&e)),
                Err(_) => Err(Failure::Timeout),
            },
            None => dst
                .upstream
                .send(req, http2)
                .await
                .map_err(|e| classify_error(&e)),
        };

        if let (Some(route), Some(role)) = (&route, role) {
            let failed = result
                .as_ref()
                .map_or(true, |r| r.status().is_server_error());
            route.record(role, failed);
        }
        let (rsp, retryable) = match result {
            Ok(rsp) => {
                let status = rsp.status();
                let mut grpc_status = if grpc {
                    crate::grpc::grpc_status(rsp.headers())
                } else {
                    None
                };
                let (head, rsp_body) = rsp.into_parts();
                let mut rsp_body: ProxyBody = rsp_body.map_err(Into::into).boxed_unsync();
                // A gRPC status usually arrives in the trailers: read a small
                // response to its end so a retry can be decided on it.
                if let Some(p) = policy.filter(|p| {
                    grpc && grpc_status.is_none() && !is_last && p.wants_grpc_trailers()
                }) {
                    let read = read_prefix(rsp_body, p.max_body_bytes);
                    let read = match remaining(try_deadline) {
                        Some(left) => tokio::time::timeout(left, read)
                            .await
                            .unwrap_or_else(|_| Err("timed out reading the response".into())),
                        None => read.await,
                    };
                    match read {
                        Ok(Prefix::Complete { data, trailers }) => {
                            grpc_status = trailers.as_ref().and_then(crate::grpc::grpc_status);
                            rsp_body = replay(data, trailers);
                        }
                        Ok(partial) => rsp_body = partial.into_body(),
                        Err(_) => {
                            permit.failure();
                            let failure = Failure::Reset;
                            let retry = policy.is_some_and(|p| p.retries_failure(failure));
                            last = Some(failure_response(dst, failure));
                            if retry && may_retry(dst, deadline, attempt, policy, &mut rng).await {
                                avoid.push(addr);
                                continue;
                            }
                            return last.unwrap_or_else(|| failure_response(dst, failure));
                        }
                    }
                }
                if status.is_server_error() {
                    permit.failure();
                } else {
                    permit.success();
                }
                let retryable =
                    !is_last && policy.is_some_and(|p| p.retries_response(status, grpc_status));
                let mut head = head;
                strip_hop_by_hop(&mut head.headers);
                // The slot and the endpoint's load count last as long as the
                // response body: a slow body still occupies the destination.
                let guards = (slot, load);
                let rsp_body = rsp_body
                    .map_frame(move |f| {
                        let _ = &guards;
                        f
                    })
                    .boxed_unsync();
                (Response::from_parts(head, rsp_body), retryable)
            }
            Err(failure) => {
                permit.failure();
                debug!(dst = %dst.name, endpoint = %addr, ?failure, attempt, "try failed");
                let retryable = !is_last && policy.is_some_and(|p| p.retries_failure(failure));
                (failure_response(dst, failure), retryable)
            }
        };

        if retryable && may_retry(dst, deadline, attempt, policy, &mut rng).await {
            avoid.push(addr);
            last = Some(rsp);
            continue;
        }
        if attempt > 0
            && !rsp.status().is_server_error()
            && rsp.headers().get(reason::REASON_HEADER).is_none()
        {
            dst.metrics.recovered();
        }
        return rsp;
    }
    last.unwrap_or_else(|| local(dst, StatusCode::BAD_GATEWAY, reason::CONNECT_FAILED))
}

/// Decides whether one more try may go, and waits out its backoff. Retries
/// need the budget's consent and must fit before the deadline.
async fn may_retry(
    dst: &Destination,
    deadline: Option<Instant>,
    attempt: u32,
    policy: Option<&RetryPolicy>,
    rng: &mut fastrand::Rng,
) -> bool {
    let Some(policy) = policy else {
        return false;
    };
    let delay = policy.backoff.delay(attempt, rng);
    if remaining(deadline).is_some_and(|left| left <= delay) {
        return false;
    }
    if let Some(budget) = &dst.budget
        && !budget.withdraw()
    {
        dst.metrics.budget_exhausted();
        debug!(dst = %dst.name, "retry budget exhausted");
        return false;
    }
    dst.metrics.retry();
    tokio::time::sleep(delay).await;
    true
}
