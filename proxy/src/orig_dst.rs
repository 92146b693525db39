//! The original destination of a redirected connection (`SO_ORIGINAL_DST`),
//! for IPv4 and IPv6, as netfilter's REDIRECT records it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// Reads the pre-NAT destination of an accepted socket; `None` if the
/// connection was not redirected (then the local address is the destination).
pub fn original_dst(sock: &impl AsRawFd, local: SocketAddr) -> Option<SocketAddr> {
    let fd = sock.as_raw_fd();
    let addr = if local.is_ipv4() {
        let mut sa: libc::sockaddr_in = unsafe_zeroed_in();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `sa` is a properly sized, writable sockaddr_in and `len` its size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return None;
        }
        parse_v4(&sa)
    } else {
        let mut sa: libc::sockaddr_in6 = unsafe_zeroed_in6();
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: `sa` is a properly sized, writable sockaddr_in6 and `len` its size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                IP6T_SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return None;
        }
        parse_v6(&sa)
    };
    addr.filter(|a| *a != local)
}

fn unsafe_zeroed_in() -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    }
}

fn unsafe_zeroed_in6() -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: 0,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
        sin6_scope_id: 0,
    }
}

/// Network byte order fields → address.
pub fn parse_v4(sa: &libc::sockaddr_in) -> Option<SocketAddr> {
    (i32::from(sa.sin_family) == libc::AF_INET).then(|| {
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        ))
    })
}

pub fn parse_v6(sa: &libc::sockaddr_in6) -> Option<SocketAddr> {
    (i32::from(sa.sin6_family) == libc::AF_INET6).then(|| {
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        // A v4-mapped destination is reported as the IPv4 address it is.
        match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, u16::from_be(sa.sin6_port))),
            None => SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sa.sin6_port),
                sa.sin6_flowinfo,
                sa.sin6_scope_id,
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_network_byte_order() {
        let mut sa = unsafe_zeroed_in();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = 9080u16.to_be();
        sa.sin_addr.s_addr = u32::from(Ipv4Addr::new(10, 1, 2, 3)).to_be();
        assert_eq!(parse_v4(&sa), Some("10.1.2.3:9080".parse().unwrap()));

        let mut sa6 = unsafe_zeroed_in6();
        sa6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa6.sin6_port = 443u16.to_be();
        sa6.sin6_addr.s6_addr = "fd00::7".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(parse_v6(&sa6), Some("[fd00::7]:443".parse().unwrap()));
        sa6.sin6_addr.s6_addr = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(parse_v6(&sa6), Some("10.0.0.1:443".parse().unwrap()));
        sa6.sin6_family = 0;
        assert_eq!(parse_v6(&sa6), None);
    }

    #[test]
    fn unredirected_socket_has_no_original_dst() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(original_dst(&s, addr), None);
    }
}
