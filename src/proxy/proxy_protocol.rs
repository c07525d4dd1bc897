//! The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2): sent to
//! a backend before the client's first byte, so it learns the client's address; checks
//! and readiness probes send the "no client" form (v2 `LOCAL`, v1 `UNKNOWN`).
//!
//! Headers are written into a caller's stack buffer: no allocation per connection.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

/// Room for the longest header: v1 with two full IPv6 addresses is 107 bytes.
pub const MAX_HEADER: usize = 108;

/// Every v2 header starts with these 12 bytes.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (a relayed connection) or LOCAL (lb's own).
const V2_PROXY: u8 = 0x21;
const V2_LOCAL: u8 = 0x20;
/// Address family and transport: TCP over IPv4, TCP over IPv6, unspecified.
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
const V2_UNSPEC: u8 = 0x00;

/// The header for a connection from `client` that arrived on lb's `local` address,
/// written to `buf`; returns its length (0 when the protocol is off).
pub fn relayed(
    version: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    buf: &mut [u8; MAX_HEADER],
) -> usize {
    let (client, local) = same_family(client, local);
    match version {
        ProxyProtocol::Off => 0,
        ProxyProtocol::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut out = &mut buf[..];
            let room = out.len();
            // 107 bytes always fit: the longest addresses and ports are bounded.
            let _ = write!(
                out,
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                local.ip(),
                client.port(),
                local.port()
            );
            room - out.len()
        }
        ProxyProtocol::V2 => {
            let (family, len) = if client.is_ipv4() {
                (V2_TCP4, 12u16)
            } else {
                (V2_TCP6, 36u16)
            };
            buf[..12].copy_from_slice(&V2_SIGNATURE);
            buf[12] = V2_PROXY;
            buf[13] = family;
            buf[14..16].copy_from_slice(&len.to_be_bytes());
            let mut at = 16;
            for ip in [client.ip(), local.ip()] {
                let octets: &[u8] = match &ip {
                    IpAddr::V4(v4) => &v4.octets(),
                    IpAddr::V6(v6) => &v6.octets(),
                };
                buf[at..at + octets.len()].copy_from_slice(octets);
                at += octets.len();
            }
            for port in [client.port(), local.port()] {
                buf[at..at + 2].copy_from_slice(&port.to_be_bytes());
                at += 2;
            }
            at
        }
    }
}

/// The header for a connection lb makes itself (a health check, a readiness probe).
pub fn local(version: ProxyProtocol) -> &'static [u8] {
    const V2: [u8; 16] = {
        let mut h = [0u8; 16];
        let mut i = 0;
        while i < 12 {
            h[i] = V2_SIGNATURE[i];
            i += 1;
        }
        h[12] = V2_LOCAL;
        h[13] = V2_UNSPEC;
        h
    };
    match version {
        ProxyProtocol::Off => b"",
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n",
        ProxyProtocol::V2 => &V2,
    }
}

/// Both addresses in one family: an IPv4 client on a dual-stack IPv6 socket shows as
/// `::ffff:a.b.c.d`, and a header may not mix families.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v4 = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|ip| SocketAddr::new(IpAddr::V4(ip), a.port())),
        IpAddr::V4(_) => Some(a),
    };
    match (v4(client), v4(local)) {
        (Some(c), Some(l)) => (c, l),
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
                IpAddr::V6(_) => a,
            };
            (v6(client), v6(local))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: ProxyProtocol, client: &str, local: &str) -> Vec<u8> {
        let mut buf = [0u8; MAX_HEADER];
        let n = relayed(
            version,
            client.parse().expect("client"),
            local.parse().expect("local"),
            &mut buf,
        );
        buf[..n].to_vec()
    }

    #[test]
    fn v1_matches_the_spec_examples() {
        assert_eq!(
            header(ProxyProtocol::V1, "192.168.0.1:56324", "192.168.0.11:443"),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        assert_eq!(
            header(ProxyProtocol::V1, "[2001:db8::1]:1234", "[::1]:80"),
            b"PROXY TCP6 2001:db8::1 ::1 1234 80\r\n"
        );
        let longest = header(
            ProxyProtocol::V1,
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        );
        assert_eq!(longest.len(), 104);
        assert!(longest.ends_with(b"65535 65535\r\n"));
    }

    #[test]
    fn v2_is_signature_command_family_length_then_addresses() {
        let h = header(ProxyProtocol::V2, "10.1.2.3:4000", "10.0.0.1:8080");
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend([0x21, 0x11, 0, 12, 10, 1, 2, 3, 10, 0, 0, 1]);
        expected.extend(4000u16.to_be_bytes());
        expected.extend(8080u16.to_be_bytes());
        assert_eq!(h, expected);
        let h6 = header(ProxyProtocol::V2, "[2001:db8::1]:1", "[::1]:2");
        assert_eq!(h6.len(), 16 + 36);
        assert_eq!(&h6[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &h6[16..32],
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&h6[48..52], &[0, 1, 0, 2]);
    }

    #[test]
    fn mapped_ipv4_clients_are_sent_as_ipv4() {
        assert_eq!(
            header(
                ProxyProtocol::V1,
                "[::ffff:10.0.0.9]:5",
                "[::ffff:10.0.0.1]:80"
            ),
            b"PROXY TCP4 10.0.0.9 10.0.0.1 5 80\r\n"
        );
        // A mapped client on a real IPv6 address: both IPv6.
        assert_eq!(
            header(ProxyProtocol::V1, "[::ffff:10.0.0.9]:5", "[2001:db8::1]:80"),
            b"PROXY TCP6 ::ffff:10.0.0.9 2001:db8::1 5 80\r\n"
        );
    }

    #[test]
    fn lbs_own_connections_say_local_or_unknown() {
        assert_eq!(local(ProxyProtocol::V1), b"PROXY UNKNOWN\r\n");
        let v2 = local(ProxyProtocol::V2);
        assert_eq!(&v2[..12], &V2_SIGNATURE);
        assert_eq!(&v2[12..], &[0x20, 0x00, 0, 0]);
        assert!(local(ProxyProtocol::Off).is_empty());
        assert_eq!(header(ProxyProtocol::Off, "1.2.3.4:5", "6.7.8.9:10"), b"");
    }
}
