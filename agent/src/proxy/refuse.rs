//! What the proxy refuses from a client before any destination is involved: a request
//! body the client broke (malformed chunked framing, or the client went away), and a
//! `CONNECT` or absolute-form target among the agent's own addresses, or outside the
//! mesh when passthrough is off.
//!
//! A broken body surfaces as the upstream request's failure; [`client_body`] marks
//! the body's errors as the client's so that the send's error can be told apart from
//! an endpoint's failure ([`body_fault`]): the answer is 400, the connection closes,
//! and neither the endpoint's breaker nor the retry loop sees a failure.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::MapErr;
use hyper::body::Incoming;

use super::local_response;
use crate::config::target::Target;
use crate::reason;
use crate::transport::{BoxError, ProxyBody};

// === impl ClientBodyError ===

/// The client's request body failed while it was being sent on.
#[derive(Debug)]
pub struct ClientBodyError(hyper::Error);

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the client's request body failed: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn mark(error: hyper::Error) -> BoxError {
    Box::new(ClientBodyError(error))
}

/// The client's request body, its errors marked as the client's (no allocation until
/// an error).
pub fn client_errors(body: Incoming) -> MapErr<Incoming, fn(hyper::Error) -> BoxError> {
    body.map_err(mark as fn(hyper::Error) -> BoxError)
}

/// The client's request body, its errors marked as the client's, boxed.
pub fn client_body(body: Incoming) -> ProxyBody {
    client_errors(body).boxed_unsync()
}

/// How a client broke its request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFault {
    /// The framing is broken (a bad chunk size or chunk end): counted as `bad-chunked`.
    Malformed,
    /// The client closed before the body's end.
    Aborted,
}

impl BodyFault {
    /// What hyper's error reading the client's body says.
    pub fn of(error: &hyper::Error) -> BodyFault {
        if error.is_incomplete_message() || error.is_closed() || error.is_canceled() {
            BodyFault::Aborted
        } else {
            BodyFault::Malformed
        }
    }
}

/// Whether `error` (a failed send, or a failed read of the body) came from the
/// client's body, and how.
pub fn body_fault(error: &(dyn std::error::Error + 'static)) -> Option<BodyFault> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(ClientBodyError(body)) = e.downcast_ref::<ClientBodyError>() {
            return Some(BodyFault::of(body));
        }
        source = e.source();
    }
    None
}

/// The answer to a request whose body the client broke: 400 `bad-request`, and the
/// connection closes (what follows on it cannot be framed).
pub fn bad_body() -> Response<ProxyBody> {
    let mut rsp = local_response(StatusCode::BAD_REQUEST, reason::BAD_REQUEST, None);
    rsp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    rsp
}

// === impl Targets ===

/// Where `CONNECT` and absolute-form requests may go.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    /// The agent's own listeners (admin, inbound, …), never a target.
    own: Vec<SocketAddr>,
    /// Destinations outside the mesh are allowed.
    pub passthrough: bool,
}

impl Targets {
    /// Targets that exclude `own` addresses; outside the mesh only with `passthrough`.
    pub fn new(own: Vec<SocketAddr>, passthrough: bool) -> Self {
        Self { own, passthrough }
    }

    /// Whether `addr` reaches one of the agent's own listeners: the same address, or
    /// its port on loopback (or on 0.0.0.0, which Linux takes for loopback) when the
    /// listener is on loopback or all addresses.
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        let local = ip.is_loopback() || ip.is_unspecified();
        self.own.iter().any(|listener| {
            listener.port() == addr.port()
                && (listener.ip().to_canonical() == ip
                    || local && (listener.ip().is_loopback() || listener.ip().is_unspecified()))
        })
    }

    /// Whether `target` names one of the agent's own listeners (by address, or as
    /// `localhost`).
    pub fn names_own(&self, target: Target<'_>) -> bool {
        match target {
            Target::Addr(addr) => self.is_own(addr),
            Target::Name {
                name,
                namespace: None,
                port,
            } if name.eq_ignore_ascii_case("localhost") => {
                self.is_own(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port))
            }
            Target::Name { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn own_listeners_are_found_by_address_loopback_and_name() {
        let targets = Targets::new(vec![addr("127.0.0.1:4191"), addr("0.0.0.0:4143")], true);
        assert!(targets.is_own(addr("127.0.0.1:4191")));
        assert!(targets.is_own(addr("127.0.0.2:4191")));
        assert!(targets.is_own(addr("[::1]:4191")));
        assert!(targets.is_own(addr("0.0.0.0:4191")));
        assert!(targets.is_own(addr("[::ffff:127.0.0.1]:4143")));
        assert!(
            !targets.is_own(addr("10.0.0.7:4191")),
            "another pod's admin"
        );
        assert!(!targets.is_own(addr("127.0.0.1:8080")));
        let localhost = Target::Name {
            name: "LOCALHOST",
            namespace: None,
            port: 4143,
        };
        assert!(targets.names_own(localhost));
        let service = Target::Name {
            name: "localhost",
            namespace: Some("demo"),
            port: 4143,
        };
        assert!(!targets.names_own(service), "a Service named localhost");
    }

    #[test]
    fn only_errors_of_the_clients_body_are_the_clients() {
        let io = std::io::Error::other("endpoint reset");
        assert_eq!(body_fault(&io), None);
    }
}
