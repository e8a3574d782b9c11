//! One request to a mesh destination, as the sequence of steps of its policy:
//!
//! ```text
//! route        the shard and its copy (ShardTopology): the key picks the shard;
//!              reads may go to replicas, writes go to the primary
//! rate limit   (outbound limits are taken before the HTTPRoute split, by
//!              [`super::Outbound`]; an admission step goes here)
//! deadline     the earliest of the policy's request timeout and the client's grpc-timeout
//! retry loop   while the policy, the deadline and the retry budget allow
//!   attempt    bulkhead slot → balancer pick + breaker permit → send → classify
//! ```
//!
//! The destination itself (original destination, Host or absolute URI) and its
//! HTTPRoute split were decided before, by [`super::Outbound`]. Retries sit outside
//! the bulkhead and the balancer so that a retry waits for its own slot and may land
//! on another endpoint (the balancer avoids the endpoints already tried).
//!
//! The steps are a plain ordered list of calls on small policy types
//! ([`Deadline`], [`Retries`], [`attempt`]), not tower layers: a layer stack would
//! make each step a `Service` owning its request, with a boxed (or deeply nested
//! generic) future per layer and the body shared across layers for replay. One
//! `async fn` calling the steps in order compiles to one state machine that borrows
//! the request's state from its own frame: no allocation and no dynamic dispatch per
//! step, and the order reads top to bottom.

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use super::attempt::{Outgoing, Refused, ReplayBody, attempt};
use crate::config::destination::Destination;
use crate::grpc;
use crate::limits::refused;
use crate::policy::retry::{Failure, NoRetry, Retries};
use crate::policy::shard::{Route, RouteError};
use crate::policy::timeout::Deadline;
use crate::proxy::body::{Prefix, read_prefix};
use crate::proxy::refuse::{BodyFault, bad_body, body_fault, client_body, client_errors};
use crate::proxy::{local_response, strip_hop_by_hop};
use crate::reason;
use crate::transport::{BoxError, ProxyBody};

/// The address of the client that sent a request, set by the listener as a request
/// extension (read-your-writes keys clients by it when no client header is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

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

async fn send(
    dst: &Destination,
    pinned: Option<SocketAddr>,
    req: Request<Incoming>,
    start: Instant,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let client = parts.extensions.get::<ClientAddr>().map(|c| c.0);

    // 1. Route: the shard and its copy.
    let route = match shard_route(dst, &parts, client) {
        Ok(route) => route,
        // No usable key and no default shard.
        Err(RouteError::KeyMissing) => {
            return local(dst, StatusCode::BAD_REQUEST, reason::SHARD_KEY_MISSING);
        }
    };
    // 2. Rate limit: taken before (see the module doc).
    // 3. Deadline.
    let grpc = grpc::is_grpc(&parts.headers);
    let client_timeout = if grpc {
        grpc::timeout(&parts.headers)
    } else {
        None
    };
    let deadline = Deadline::new(start, dst.policy.timeouts.request, client_timeout);
    // 4. Retry loop: the body is kept for replay when a retry may follow.
    let mut retries = Retries::new(
        dst.policy.retry.as_ref(),
        dst.budget.as_deref(),
        &parts.method,
    );
    let body = match replay_body(body, &mut retries).await {
        Ok(body) => body,
        Err(error) => {
            debug!(dst = %dst.name, %error, "client body failed before the request was sent");
            return client_fault(dst, body_fault(error.as_ref()));
        }
    };
    let affinity = dst
        .policy
        .hash_on
        .as_ref()
        .and_then(|h| h.key(&parts.headers, client.map(|c| c.ip())));
    let mut outgoing = Outgoing {
        dst,
        pinned,
        route,
        affinity,
        path: parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        method: parts.method,
        headers: Some(parts.headers),
        body,
        http2: dst.http2 || parts.version == http::Version::HTTP_2,
        grpc,
    };
    let mut last: Option<Response<ProxyBody>> = None;
    loop {
        // 5. One attempt.
        let tried = match attempt(&mut outgoing, &retries, &deadline).await {
            Ok(tried) => tried,
            Err(refused) => return refused_response(dst, refused, last),
        };
        let (rsp, retryable) = match tried.outcome {
            Ok(answer) => {
                let retry = retries.retries_response(answer.rsp.status(), answer.grpc_status);
                (answer.rsp, retry)
            }
            Err(failure) => (
                failure_response(dst, failure),
                retries.retries_failure(failure),
            ),
        };
        if retryable {
            match retries.next(tried.endpoint, &deadline) {
                Ok(backoff) => {
                    dst.metrics.retry();
                    backoff.wait().await;
                    last = Some(rsp);
                    continue;
                }
                Err(NoRetry::BudgetExhausted) => {
                    dst.metrics.budget_exhausted();
                    debug!(dst = %dst.name, "retry budget exhausted");
                }
                Err(NoRetry::Deadline | NoRetry::Policy) => {}
            }
        }
        if retries.attempt() > 0
            && !rsp.status().is_server_error()
            && rsp.headers().get(reason::REASON_HEADER).is_none()
        {
            dst.metrics.recovered();
        }
        return rsp;
    }
}

/// The route step: the shard and copy of a sharded destination's request.
fn shard_route<'a>(
    dst: &'a Destination,
    parts: &http::request::Parts,
    client: Option<SocketAddr>,
) -> Result<Option<Route<'a>>, RouteError> {
    let Some(router) = &dst.shards else {
        return Ok(None);
    };
    router.route(parts, client).map(Some).inspect_err(|_| {
        debug!(dst = %dst.name, topology = %router.source, reason = reason::SHARD_KEY_MISSING, "request rejected");
    })
}

/// Reads the body for replay when a retry may follow; a body too large (or with
/// trailers) is sent once, and the request gets a single try.
async fn replay_body(body: Incoming, retries: &mut Retries<'_>) -> Result<ReplayBody, BoxError> {
    let Some(limit) = retries.replay_limit() else {
        return Ok(ReplayBody::Once(Some(client_body(body))));
    };
    match read_prefix(client_errors(body), limit).await {
        Ok(Prefix::Complete {
            data,
            trailers: None,
        }) => Ok(ReplayBody::Replayable(data)),
        Ok(other) => {
            retries.single_try();
            Ok(ReplayBody::Once(Some(other.into_body())))
        }
        Err(error) => Err(error),
    }
}

fn local(dst: &Destination, status: StatusCode, why: &'static str) -> Response<ProxyBody> {
    dst.metrics.local_response(why);
    local_response(status, why, None)
}

/// The answer to a request whose body the client broke: 400, the connection closed,
/// nothing held against the endpoint.
fn client_fault(dst: &Destination, fault: Option<BodyFault>) -> Response<ProxyBody> {
    if fault == Some(BodyFault::Malformed) {
        dst.metrics.refused_request(refused::BAD_CHUNKED);
    }
    dst.metrics.local_response(reason::BAD_REQUEST);
    bad_body()
}

fn failure_response(dst: &Destination, failure: Failure) -> Response<ProxyBody> {
    match failure {
        Failure::Connect => local(dst, StatusCode::BAD_GATEWAY, reason::CONNECT_FAILED),
        Failure::Reset => local(dst, StatusCode::BAD_GATEWAY, reason::UPSTREAM_RESET),
        Failure::Timeout => local(dst, StatusCode::GATEWAY_TIMEOUT, reason::TIMEOUT),
    }
}

/// The answer to a request whose try was refused: the previous try's response when
/// there was one (a retry that could not go), else the refusal's own.
fn refused_response(
    dst: &Destination,
    refused: Refused,
    last: Option<Response<ProxyBody>>,
) -> Response<ProxyBody> {
    let own = |status, why| move || local(dst, status, why);
    match refused {
        Refused::Deadline => failure_response(dst, Failure::Timeout),
        Refused::ClientBody(fault) => client_fault(dst, Some(fault)),
        Refused::NoEndpoints => local(dst, StatusCode::SERVICE_UNAVAILABLE, reason::NO_ENDPOINTS),
        Refused::BulkheadFull(_) => {
            last.unwrap_or_else(own(StatusCode::SERVICE_UNAVAILABLE, reason::BULKHEAD_FULL))
        }
        Refused::PrimaryUnavailable => last.unwrap_or_else(own(
            StatusCode::SERVICE_UNAVAILABLE,
            reason::SHARD_PRIMARY_UNAVAILABLE,
        )),
        Refused::AllOpen { retry_after } => last.unwrap_or_else(|| {
            dst.metrics.local_response(reason::CIRCUIT_OPEN);
            local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                reason::CIRCUIT_OPEN,
                Some(retry_after),
            )
        }),
    }
}
