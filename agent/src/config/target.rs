//! Where an outbound request is going: a mesh Service by name or address, or elsewhere.

use std::net::{IpAddr, SocketAddr};

/// The destination named by a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// `name[.namespace[.svc[.cluster-domain]]]:port`.
    Name {
        /// The Service name.
        name: &'a str,
        /// The namespace; `None` means the agent's own.
        namespace: Option<&'a str>,
        /// The port.
        port: u16,
    },
    /// An IP address and port.
    Addr(SocketAddr),
}

/// A request whose destination cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidTarget {
    /// Neither an absolute URI nor a Host header.
    #[error(
        "request names no destination: send an absolute URI (HTTP proxy form) or a Host header"
    )]
    Missing,
    /// The Host header is not valid.
    #[error("the Host header is not a valid authority")]
    BadHost,
}

/// Reads the destination of a request: the absolute URI's authority (proxy form,
/// HTTP/2 `:authority`) or else the `Host` header. The port defaults to 80.
pub fn authority(req: &http::Request<impl Sized>) -> Result<(&str, u16), InvalidTarget> {
    if let Some(auth) = req.uri().authority() {
        return Ok((auth.host(), auth.port_u16().unwrap_or(80)));
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .ok_or(InvalidTarget::Missing)?
        .to_str()
        .map_err(|_| InvalidTarget::BadHost)?;
    split_host_port(host)
}

fn split_host_port(host: &str) -> Result<(&str, u16), InvalidTarget> {
    if host.is_empty() {
        return Err(InvalidTarget::BadHost);
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    if let Some(rest) = host.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or(InvalidTarget::BadHost)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| InvalidTarget::BadHost)?,
            None if after.is_empty() => 80,
            None => return Err(InvalidTarget::BadHost),
        };
        return Ok((ip, port));
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Ok((h, p.parse().map_err(|_| InvalidTarget::BadHost)?)),
        Some(_) => Err(InvalidTarget::BadHost),
        None => Ok((host, 80)),
    }
}

/// Classifies a host as a Service name or an address. Names that are not of the
/// Service forms (e.g. `api.example.com`) come back as `None`: not in the mesh.
pub fn classify(host: &str, port: u16) -> Option<Target<'_>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(Target::Addr(SocketAddr::new(ip, port)));
    }
    let host = host.trim_end_matches('.');
    let mut labels = host.split('.');
    let name = labels.next().filter(|n| !n.is_empty())?;
    let namespace = labels.next();
    match labels.next() {
        None => {}
        // `name.ns.svc` and `name.ns.svc.<cluster domain>`.
        Some(svc) if svc.eq_ignore_ascii_case("svc") => {}
        Some(_) => return None,
    }
    Some(Target::Name {
        name,
        namespace,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn reads_proxy_form_and_host_header() {
        assert_eq!(
            authority(&req("http://reviews.demo:9080/x", None)),
            Ok(("reviews.demo", 9080))
        );
        assert_eq!(
            authority(&req("/x", Some("reviews.demo"))),
            Ok(("reviews.demo", 80))
        );
        assert_eq!(authority(&req("/x", Some("[::1]:81"))), Ok(("::1", 81)));
        assert_eq!(authority(&req("/x", None)), Err(InvalidTarget::Missing));
        assert_eq!(
            authority(&req("/x", Some("a:b"))),
            Err(InvalidTarget::BadHost)
        );
        assert_eq!(
            authority(&req("/x", Some(":80"))),
            Err(InvalidTarget::BadHost)
        );
    }

    #[test]
    fn classifies_service_names() {
        let name = |n, ns| {
            Some(Target::Name {
                name: n,
                namespace: ns,
                port: 80,
            })
        };
        assert_eq!(classify("reviews", 80), name("reviews", None));
        assert_eq!(classify("reviews.demo", 80), name("reviews", Some("demo")));
        assert_eq!(
            classify("reviews.demo.svc", 80),
            name("reviews", Some("demo"))
        );
        assert_eq!(
            classify("reviews.demo.svc.cluster.local.", 80),
            name("reviews", Some("demo"))
        );
        assert_eq!(classify("api.example.com", 80), None);
        assert_eq!(
            classify("10.0.0.1", 80),
            Some(Target::Addr("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            classify("::1", 81),
            Some(Target::Addr("[::1]:81".parse().unwrap()))
        );
    }
}
