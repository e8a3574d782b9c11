//! Redirected connections: recover where each was going, choose its protocol,
//! and serve it as HTTP (with the destination's request policy) or as opaque
//! TCP (with its connection policy).
//!
//! The outbound listener takes both kinds of client: an app that uses it as
//! an explicit HTTP proxy (no original destination) and an app whose
//! connections iptables redirected (see `bulwark-agent init`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::debug;

use super::inbound::{Front, Inbound, InboundOptions};
use super::outbound::{Outbound, PASSTHROUGH_CONNECT_TIMEOUT, opaque};
use crate::config::Config;
use crate::config::destination::Destination;
use crate::metrics::Metrics;
use crate::transport::orig_dst::original_dst;
use crate::transport::prefixed::Prefixed;
use crate::transport::protocol::{self, Hint, Protocol};
use crate::transport::server::Conn;
use crate::transport::tcp::{self, RelayEnd};
use crate::transport::tls::Alpn;

/// How redirected connections are classified and relayed.
#[derive(Clone, Debug)]
pub struct Interception {
    /// How long to wait for a client's first bytes before treating it as opaque.
    pub detect_timeout: Duration,
    /// Ports that are always opaque TCP (no detection), both directions.
    pub opaque_ports: Arc<HashSet<u16>>,
    /// How long an opaque connection may stay silent both ways.
    pub tcp_idle_timeout: Duration,
}

impl Interception {
    fn hint(&self, port: u16, declared: Option<Hint>) -> Hint {
        if self.opaque_ports.contains(&port) {
            Hint::Opaque
        } else {
            declared.unwrap_or_default()
        }
    }

    /// Chooses the protocol of `stream`: declared, or detected from its first
    /// bytes (returned for replay).
    async fn protocol(&self, stream: &mut TcpStream, hint: Hint) -> Option<(Protocol, Bytes)> {
        match hint {
            Hint::Opaque => Some((Protocol::Opaque, Bytes::new())),
            // hyper's server tells HTTP/1 from an HTTP/2 preface itself.
            Hint::Http => Some((Protocol::Http1, Bytes::new())),
            Hint::Http2 => Some((Protocol::Http2, Bytes::new())),
            Hint::Detect => match protocol::detect(stream, self.detect_timeout).await {
                Ok(found) => Some(found),
                Err(error) => {
                    debug!(%error, "connection failed during protocol detection");
                    None
                }
            },
        }
    }
}

/// Serves one connection accepted by the outbound listener.
pub async fn outbound(
    outbound: Arc<Outbound>,
    interception: Interception,
    mut stream: TcpStream,
    peer: SocketAddr,
    conn: Conn,
) {
    let Some(orig) = original_dst(&stream) else {
        // Not redirected: an app using the listener as its HTTP proxy.
        let handler = move |req, peer| Arc::clone(&outbound).handle(req, peer);
        return conn.serve_http(stream, peer, handler).await;
    };
    let found = outbound.config().load().lookup_original(orig);
    let hint = interception.hint(orig.port(), found.as_ref().map(|(d, _)| d.hint));
    // Boxed: detection's state (its timer, the bytes peeked) ends before the connection
    // does, and inline it would stay in the connection's task for as long as it lives.
    let Some((protocol, prefix)) = Box::pin(interception.protocol(&mut stream, hint)).await else {
        return;
    };
    debug!(%peer, %orig, dst = found.as_ref().map(|(d, _)| d.name.as_ref()), ?protocol, "redirected outbound connection");
    let io = Prefixed::new(prefix, stream);
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let handler = move |mut req: http::Request<hyper::body::Incoming>, peer| {
                req.extensions_mut()
                    .insert(super::outbound::forward::ClientAddr(peer));
                Arc::clone(&outbound).handle_redirected(req, orig)
            };
            conn.serve_http(io, peer, handler).await;
        }
        // Boxed: opaque TCP's state (an mTLS connect, the relay) is not HTTP's, and
        // inline every HTTP connection's task would keep room for it.
        Protocol::Opaque => {
            Box::pin(opaque_outbound(
                &outbound,
                &interception,
                found,
                io,
                peer,
                orig,
            ))
            .await
        }
    }
}

/// Relays one outbound opaque TCP connection: to the destination's endpoints under its
/// policy when the mesh knows it, else straight to where the app dialled.
async fn opaque_outbound(
    outbound: &Outbound,
    interception: &Interception,
    found: Option<(Arc<Destination>, Option<SocketAddr>)>,
    io: Prefixed<TcpStream>,
    peer: SocketAddr,
    orig: SocketAddr,
) {
    match found {
        Some((dst, pinned)) => match opaque::connect(&dst, pinned).await {
            Ok((upstream, _slot)) => {
                dst.metrics.tcp_connection();
                log_relay(
                    tcp::relay(io, upstream, interception.tcp_idle_timeout).await,
                    orig,
                );
            }
            Err(refused) => {
                dst.metrics.local_response(refused.0);
                debug!(dst = %dst.name, reason = refused.0, %peer, "opaque connection refused");
            }
        },
        None => {
            outbound.metrics().passthrough_connection();
            match tokio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, TcpStream::connect(orig)).await
            {
                Ok(Ok(upstream)) => {
                    log_relay(
                        tcp::relay(io, upstream, interception.tcp_idle_timeout).await,
                        orig,
                    );
                }
                Ok(Err(error)) => debug!(%orig, %error, "passthrough connect failed"),
                Err(_) => debug!(%orig, "passthrough connect timed out"),
            }
        }
    }
}

fn log_relay(result: std::io::Result<tcp::Relayed>, dst: SocketAddr) {
    match result {
        Ok(done) if done.end == RelayEnd::Idle => debug!(%dst, "idle connection closed"),
        Ok(done) => debug!(%dst, sent = done.sent, received = done.received, "connection closed"),
        Err(error) => debug!(%dst, %error, "connection ended with an error"),
    }
}

/// The transparent inbound listener's state: one [`Inbound`] per app port,
/// made on the first connection to that port.
#[derive(Debug)]
pub struct InboundPorts {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    app_host: std::net::IpAddr,
    options: InboundOptions,
    interception: Interception,
    ports: Mutex<HashMap<u16, Arc<Inbound>>>,
}

impl InboundPorts {
    /// Inbound state for every app port on `app_host`.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        app_host: std::net::IpAddr,
        options: InboundOptions,
        interception: Interception,
    ) -> Self {
        Self {
            config,
            metrics,
            app_host,
            options,
            interception,
            ports: Mutex::new(HashMap::new()),
        }
    }

    fn port(&self, port: u16) -> Arc<Inbound> {
        let mut ports = self
            .ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(ports.entry(port).or_insert_with(|| {
            Arc::new(Inbound::with_options(
                Arc::clone(&self.config),
                Arc::clone(&self.metrics),
                SocketAddr::new(self.app_host, port),
                self.options.clone(),
            ))
        }))
    }

    /// Serves one connection redirected to the inbound listener: to the app on
    /// the port the client dialled. A meshed caller's mutual TLS is terminated first
    /// (its ALPN says HTTP or opaque TCP); a plaintext one is detected as before.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, conn: Conn) {
        let Some(orig) = original_dst(&stream) else {
            debug!(%peer, "inbound connection was not redirected: no app port to send it to; closing");
            return;
        };
        let inbound = self.port(orig.port());
        // Boxed: see `Inbound::serve_http`.
        let front =
            Box::pin(inbound.front(stream, peer, orig.port(), self.interception.detect_timeout))
                .await;
        let mut stream = match front {
            None => return,
            Some(Front::Tls { io, caller, alpn }) => {
                debug!(%peer, %orig, ?alpn, caller = caller.as_ref().map(|c| c.as_str()), "inbound mutual TLS connection");
                if alpn == Some(Alpn::Opaque) {
                    // Boxed: see `Inbound::serve_http`.
                    return Box::pin(inbound.relay(io, peer, caller.as_ref())).await;
                }
                // HTTP/1.1 or HTTP/2 (hyper tells them apart by the preface).
                return conn
                    .serve_http(io, peer, move |req, peer| {
                        Arc::clone(&inbound).handle(req, peer, caller.clone())
                    })
                    .await;
            }
            Some(Front::Plain(stream)) => stream,
        };
        let declared = self
            .config
            .load()
            .lookup_original(orig)
            .map(|(d, _)| d.hint);
        let hint = self.interception.hint(orig.port(), declared);
        // Boxed, as the front step above and outbound detection.
        let Some((protocol, prefix)) =
            Box::pin(self.interception.protocol(&mut stream, hint)).await
        else {
            return;
        };
        debug!(%peer, %orig, ?protocol, "redirected inbound connection");
        let io = Prefixed::new(prefix, stream);
        match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                conn.serve_http(io, peer, move |req, peer| {
                    Arc::clone(&inbound).handle(req, peer, None)
                })
                .await;
            }
            Protocol::Opaque => Box::pin(inbound.relay(io, peer, None)).await,
        }
    }
}
