//! Limits against hostile clients: what every listener enforces on the connections it
//! accepts, the one home of their defaults, and the counters that show them.
//!
//! A leaf module: the settings hold a [`Limits`], the transport enforces it, the
//! metrics register the [`ListenerCounters`] the transport increments.
//!
//! | limit | default | like |
//! |---|---|---|
//! | a request head must arrive within | 10 s | HAProxy's `timeout http-request` |
//! | a keep-alive connection may wait for its next request | 60 s | nginx's `keepalive_timeout` (75 s) |
//! | connections open at once, per listener | 10,000 | HAProxy's `maxconn` |
//! | bytes of a request's headers (HTTP/1.1 head, HTTP/2 header list) | 64 KiB | Envoy's `max_request_headers_kb` (60 KiB) |
//! | HTTP/2 streams open at once, per connection | 100 | RFC 9113 §6.5.2's floor |
//! | HTTP/2 streams a client may reset before the agent accepted them | 20 | the h2 crate, after CVE-2023-44487 |

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

/// A connection that has not sent a whole request head this long after it opened (or
/// after the first byte of a keep-alive request) is closed.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request in flight is closed after this long (HTTP/1.1
/// keep-alive between requests, HTTP/2 with no stream open).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections one listener holds open at once; more are closed as soon as accepted.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Bytes of a request's headers: an HTTP/1.1 request head (answered 431 beyond it)
/// and an HTTP/2 header list (the stream is refused). Also what an HTTP/1.1
/// connection's read buffer may grow to, so that a connection costs at most this much
/// for its head whatever the client sends.
pub const DEFAULT_MAX_REQUEST_HEADERS_BYTES: usize = 64 * 1024;
/// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 streams a client may open and reset before the agent accepted them; one
/// more and the connection is closed with GOAWAY `ENHANCE_YOUR_CALM` (rapid reset,
/// CVE-2023-44487).
pub const DEFAULT_HTTP2_MAX_PENDING_RESETS: usize = 20;
/// HTTP/2 streams the agent may reset because the client broke the protocol on them
/// before the connection is closed with GOAWAY (hyper's default).
pub const HTTP2_MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// `CONNECT` and absolute-form requests may reach destinations outside the mesh (an
/// app's `HTTPS_PROXY` to an external API), as transparent traffic may.
pub const DEFAULT_PROXY_PASSTHROUGH: bool = true;
/// hyper's floor for an HTTP/1.1 connection's read buffer.
const MIN_HTTP1_BUFFER: usize = 8 * 1024;

/// What each listener enforces on the connections it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// How long a client may take to send a whole request head, from the connection's
    /// start or the first byte of a keep-alive request (none: unlimited).
    #[serde(with = "millis")]
    pub header_read_timeout: Option<Duration>,
    /// How long a connection may stay with no request in flight (none: unlimited).
    #[serde(with = "millis")]
    pub idle_timeout: Option<Duration>,
    /// Connections each listener holds at once (none: unlimited).
    pub max_connections: Option<usize>,
    /// Bytes of a request's headers.
    pub max_request_headers_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before they were accepted.
    pub http2_max_pending_resets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_connections: Some(DEFAULT_MAX_CONNECTIONS),
            max_request_headers_bytes: DEFAULT_MAX_REQUEST_HEADERS_BYTES,
            http2_max_concurrent_streams: DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
            http2_max_pending_resets: DEFAULT_HTTP2_MAX_PENDING_RESETS,
        }
    }
}

impl Limits {
    /// The largest an HTTP/1.1 connection's read buffer may grow (hyper takes no less
    /// than 8 KiB).
    pub fn http1_max_buffer(&self) -> usize {
        self.max_request_headers_bytes.max(MIN_HTTP1_BUFFER)
    }

    /// The HTTP/2 header list limit, in the `u32` HTTP/2 settings take.
    pub fn http2_max_header_list_size(&self) -> u32 {
        u32::try_from(self.max_request_headers_bytes).unwrap_or(u32::MAX)
    }
}

/// Why a request was refused before it reached any destination (the `reason` label of
/// `bulwark_refused_requests`; the response says `bad-request` or `forbidden`).
pub mod refused {
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3: a smuggling attempt).
    pub const CL_TE: &str = "cl-te";
    /// A request body whose chunked framing is broken.
    pub const BAD_CHUNKED: &str = "bad-chunked";
    pub use crate::reason::{ABSOLUTE_FORM_DENIED, CONNECT_DENIED};
}

/// The connection counters of one listener: cheap clones of atomics, resolved once
/// when the listener starts.
#[derive(Clone, Debug, Default)]
pub struct ListenerCounters {
    /// Connections open now (the connection limit counts on this gauge).
    pub open: Gauge,
    /// Connections closed as soon as accepted: the listener was at its limit.
    pub refused: Counter,
    /// Connections closed because a request head did not arrive in time.
    pub header_timeouts: Counter,
    /// Connections closed after staying idle too long.
    pub idle_timeouts: Counter,
    /// Requests answered 400 for carrying both `Content-Length` and `Transfer-Encoding`.
    pub cl_te: Counter,
    /// HTTP/2 connections closed with GOAWAY because the client broke a limit or the
    /// protocol, by the HTTP/2 error code (labels: listener, reason).
    pub http2_goaways: Family<Vec<(&'static str, String)>, Counter>,
    /// The listener's name (the `listener` label).
    pub listener: &'static str,
}

impl ListenerCounters {
    /// Counts an HTTP/2 connection closed with GOAWAY `reason` (e.g.
    /// `enhance-your-calm`); rare, so the family lookup is affordable.
    pub fn http2_goaway(&self, reason: &str) {
        self.http2_goaways
            .get_or_create(&vec![
                ("listener", self.listener.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }
}

/// Serialises an optional duration as milliseconds for the admin dump.
mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_never_go_below_what_hyper_takes() {
        let small = Limits {
            max_request_headers_bytes: 1024,
            ..Limits::default()
        };
        assert_eq!(small.http1_max_buffer(), 8 * 1024);
        assert_eq!(Limits::default().http1_max_buffer(), 64 * 1024);
        assert_eq!(Limits::default().http2_max_header_list_size(), 64 * 1024);
    }

    #[test]
    fn the_dump_shows_milliseconds() {
        let json = serde_json::to_value(Limits::default()).unwrap();
        assert_eq!(json["header_read_timeout"], "10000ms");
        assert_eq!(json["idle_timeout"], "60000ms");
        assert_eq!(json["max_connections"], 10_000);
    }
}
