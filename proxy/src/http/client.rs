//! The I/O side of deciding who a request's client is: the connection
//! manager applies `ferry_filters::http::forwarded` to each request before
//! routing, with this host's local address (what Envoy appends to
//! `x-forwarded-for` for a loopback peer), and keeps the result on the
//! request for the filters and the router.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use ferry_filters::http::forwarded::{self, ClientAddress, Downstream};
use ferry_model::{HttpConnectionManager, RouteConfig};
use http::Request;

use super::ConnCtx;

/// Decides the request's client and trust, changing its headers as Envoy's
/// connection manager does, and records the result on the request. `Err`:
/// an original-IP detection extension refused the request with that status.
pub(super) fn apply<B>(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    routes: Option<&RouteConfig>,
    req: &mut Request<B>,
) -> Result<ClientAddress, u16> {
    let d = Downstream {
        peer: ctx.peer,
        local: local_address(),
        scheme: if ctx.tls.is_some() { "https" } else { "http" },
        use_remote_address: hcm.use_remote_address,
        trust: &hcm.client_trust,
        internal_only_headers: routes.map_or(&[][..], |r| &r.internal_only_headers[..]),
    };
    let client = forwarded::mutate_request(req.headers_mut(), &d)?;
    req.extensions_mut().insert(client);
    Ok(client)
}

/// The request's downstream remote address (the peer until [`apply`] ran).
pub(super) fn remote<B>(ctx: &ConnCtx, req: &Request<B>) -> SocketAddr {
    req.extensions()
        .get::<ClientAddress>()
        .map_or(ctx.peer, |c| c.remote)
}

/// This host's first non-loopback IPv4 address (loopback when it has none),
/// read once: Envoy's local address.
pub(crate) fn local_address() -> IpAddr {
    static LOCAL: OnceLock<IpAddr> = OnceLock::new();
    *LOCAL.get_or_init(|| first_ipv4().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)))
}

fn first_ipv4() -> Option<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that freeifaddrs releases;
    // the list is only read in between.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return None;
        }
        let mut found = None;
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if ip != Ipv4Addr::LOCALHOST {
                    found = Some(IpAddr::V4(ip));
                    break;
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
        found
    }
}
