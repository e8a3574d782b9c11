//! Where a redirected connection was going: `SO_ORIGINAL_DST` (IPv4) and
//! `IP6T_SO_ORIGINAL_DST` (IPv6), read from conntrack through socket2's safe API.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination the client connected to before iptables redirected it to the
/// agent. `None` when the connection was not redirected (an explicit-proxy
/// client) or the kernel cannot say (no conntrack entry, not Linux).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let orig = read(stream, local)?;
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    // Without NAT, conntrack reports the address the socket is bound to.
    (orig != local).then_some(orig)
}

#[cfg(target_os = "linux")]
fn read(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    // An IPv4 client of a dual-stack (`[::]`) listener has an IPv4 conntrack entry.
    let addr = match local {
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => sock.original_dst_v6(),
        _ => sock.original_dst_v4(),
    };
    let addr = addr.ok()?.as_socket()?;
    // An IPv4 connection on a dual-stack socket reports a mapped address.
    Some(match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    })
}

#[cfg(not(target_os = "linux"))]
fn read(_stream: &TcpStream, _local: SocketAddr) -> Option<SocketAddr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(original_dst(&server), None);
    }
}
