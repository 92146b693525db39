//! `x-forwarded-for` and trust, as Envoy's connection manager decides them
//! before routing and before any filter: who the client is (the peer, a
//! trusted hop of `x-forwarded-for`, or what an original-IP detection
//! extension reads), whether the request is internal (`x-envoy-internal`) or
//! comes from the edge (`x-envoy-external-address`), and which `x-envoy-*`
//! request headers survive: only an internal request may steer the router
//! with them (Envoy's `mutateRequestHeaders` and `cleanInternalHeaders`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ferry_model::forwarded::{ClientTrust, InternalAddresses, IpDetection};
use http::header::{HeaderMap, HeaderName, HeaderValue};

const XFF: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const XFP: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const INTERNAL: http::HeaderName = http::HeaderName::from_static("x-envoy-internal");
const EXTERNAL_ADDRESS: http::HeaderName =
    http::HeaderName::from_static("x-envoy-external-address");

/// Removed from every request that is not internal.
const INTERNAL_ONLY: &[&str] = &[
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Removed as well from requests that come from the edge.
const EDGE_ONLY: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
];

/// The client of one request, as the filters and the router see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress {
    /// Envoy's downstream remote address: RBAC `remote_ip`, rate limits'
    /// `remote_address`, `%DOWNSTREAM_REMOTE_ADDRESS%` (port 0 when read
    /// from a header).
    pub remote: SocketAddr,
    /// The request is internal (`x-envoy-internal: true` was set).
    pub internal: bool,
    /// The request entered the trusted network here (`use_remote_address`
    /// and not internal).
    pub edge: bool,
}

/// The request as this connection manager received it.
pub struct Downstream<'a> {
    /// The connection's peer.
    pub peer: SocketAddr,
    /// The address appended to `x-forwarded-for` for a loopback peer: this
    /// host's first non-loopback address, as Envoy's local address.
    pub local: IpAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    pub use_remote_address: bool,
    pub trust: &'a ClientTrust,
    /// The route table's `internal_only_headers`.
    pub internal_only_headers: &'a [HeaderName],
}

/// Applies the connection manager's trust decisions to `headers`: the client
/// address, `x-forwarded-for`, `x-envoy-internal`, `x-envoy-external-address`
/// and the removal of the internal-only headers. `Err` carries the status an
/// original-IP detection extension rejects the request with.
pub fn mutate_request(headers: &mut HeaderMap, d: &Downstream<'_>) -> Result<ClientAddress, u16> {
    // Nothing below adds an `x-envoy-*` header before the removals.
    let envoy_headers = super::headers::any_envoy_header(headers);
    if envoy_headers {
        headers.remove(INTERNAL);
    }
    let trust = d.trust;
    let mut detected: Option<SocketAddr> = None;
    let mut trusted_checks = false;
    if d.use_remote_address {
        trusted_checks = !headers.contains_key(XFF);
        if trust.xff_num_trusted_hops > 0 {
            detected = last_xff_address(headers, trust.xff_num_trusted_hops - 1).0;
        }
        if detected.is_none() {
            detected = Some(d.peer);
        }
        if !trust.skip_xff_append {
            append_xff(headers, d);
        }
        if trust.xff_num_trusted_hops == 0 || !headers.contains_key(XFP) {
            headers.insert(XFP, HeaderValue::from_static(d.scheme));
        }
    } else {
        let default = [IpDetection::Xff {
            num_trusted_hops: trust.xff_num_trusted_hops,
            trusted_cidrs: None,
            skip_xff_append: true,
        }];
        let detection = if trust.detection.is_empty() {
            &default[..]
        } else {
            &trust.detection[..]
        };
        for ext in detection {
            let found = detect(ext, headers, d.peer)?;
            if let Some((addr, checks, skip_append)) = found {
                detected = Some(addr);
                trusted_checks = checks;
                if !skip_append {
                    append_xff(headers, d);
                }
                break;
            }
        }
    }
    let internal = trusted_checks && detected.is_some_and(|a| is_internal(&trust.internal, a.ip()));
    let remote = detected.unwrap_or(d.peer);
    let edge = !internal && d.use_remote_address;
    if internal {
        headers.insert(INTERNAL, HeaderValue::from_static("true"));
    } else {
        if edge && envoy_headers {
            for h in EDGE_ONLY {
                headers.remove(*h);
            }
        }
        if envoy_headers {
            for h in INTERNAL_ONLY {
                headers.remove(*h);
            }
        }
        for h in d.internal_only_headers {
            headers.remove(h);
        }
    }
    if edge && let Ok(v) = HeaderValue::from_str(&remote.ip().to_string()) {
        headers.insert(EXTERNAL_ADDRESS, v);
    }
    Ok(ClientAddress {
        remote,
        internal,
        edge,
    })
}

/// What one detection extension finds: the address, whether it may make the
/// request internal, and whether `x-forwarded-for` is left as it is.
type Detected = Option<(SocketAddr, bool, bool)>;

fn detect(ext: &IpDetection, headers: &HeaderMap, peer: SocketAddr) -> Result<Detected, u16> {
    match ext {
        IpDetection::Xff {
            num_trusted_hops,
            trusted_cidrs: None,
            skip_xff_append,
        } => {
            let (addr, single) = last_xff_address(headers, *num_trusted_hops);
            Ok(addr.map(|a| (a, single, *skip_xff_append)))
        }
        IpDetection::Xff {
            trusted_cidrs: Some(cidrs),
            skip_xff_append,
            ..
        } => {
            if !cidrs.iter().any(|c| c.contains(peer.ip())) {
                return Ok(None);
            }
            // From the right, the first address that is not a trusted proxy;
            // all trusted: the leftmost.
            let Some(list) = xff_value(headers) else {
                return Ok(None);
            };
            let entries: Vec<&str> = list.split(',').collect();
            let mut found = None;
            for e in entries.iter().rev() {
                let Some(ip) = parse_ip(e.trim()) else {
                    return Ok(None);
                };
                found = Some(ip);
                if !cidrs.iter().any(|c| c.contains(ip)) {
                    break;
                }
            }
            let single = entries.len() == 1;
            Ok(found.map(|ip| (SocketAddr::new(ip, 0), single, *skip_xff_append)))
        }
        IpDetection::CustomHeader {
            header,
            trusted,
            reject_with,
        } => {
            let ip = headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(parse_ip);
            match (ip, reject_with) {
                (Some(ip), _) => Ok(Some((SocketAddr::new(ip, 0), *trusted, true))),
                (None, Some(status)) => Err(*status),
                (None, None) => Ok(None),
            }
        }
    }
}

/// Every `x-forwarded-for` value joined by commas, as Envoy keeps one header.
fn xff_value(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(XFF).iter().peekable();
    values.peek()?;
    let parts: Vec<&str> = values.map(|v| v.to_str().unwrap_or("")).collect();
    Some(parts.join(","))
}

/// Envoy's `getLastAddressFromXFF`: skips `skip` entries from the right and
/// parses the next one; the flag says whether it was the only entry (and
/// nothing was skipped), which alone lets an address make a request internal.
pub fn last_xff_address(headers: &HeaderMap, skip: u32) -> (Option<SocketAddr>, bool) {
    let Some(value) = xff_value(headers) else {
        return (None, false);
    };
    let mut rest = value.as_str();
    for _ in 0..skip {
        match rest.rfind(',') {
            Some(i) => rest = &rest[..i],
            None => return (None, false),
        }
    }
    let last_comma = rest.rfind(',');
    if let Some(i) = last_comma
        && i + 1 < rest.len()
    {
        rest = &rest[i + 1..];
    }
    match parse_ip(rest.trim()) {
        Some(ip) => (
            Some(SocketAddr::new(ip, 0)),
            last_comma.is_none() && skip == 0,
        ),
        None => (None, false),
    }
}

/// An IPv4 or IPv6 address without port or brackets, as `inet_pton` reads it.
fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

/// Appends the peer (the local address for a loopback peer) to
/// `x-forwarded-for`, comma-separated as Envoy writes it.
fn append_xff(headers: &mut HeaderMap, d: &Downstream<'_>) {
    let ip = if is_loopback(d.peer.ip()) {
        d.local
    } else {
        d.peer.ip()
    };
    let value = match xff_value(headers) {
        Some(prev) if !prev.is_empty() => format!("{prev},{ip}"),
        _ => ip.to_string(),
    };
    headers.remove(XFF);
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(XFF, v);
    }
}

/// Envoy's loopback check: the canonical addresses only.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    }
}

/// Whether a detected client address makes a request internal.
pub fn is_internal(cfg: &InternalAddresses, ip: IpAddr) -> bool {
    match cfg {
        InternalAddresses::None => false,
        InternalAddresses::Ranges(r) => r.iter().any(|c| c.contains(ip)),
        InternalAddresses::Private => match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                o[0] == 10
                    || (o[0] == 192 && o[1] == 168)
                    || (o[0] == 172 && (16..=31).contains(&o[1]))
                    || v4 == Ipv4Addr::LOCALHOST
            }
            IpAddr::V6(v6) => v6.octets()[0] == 0xfd || v6 == Ipv6Addr::LOCALHOST,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::CidrRange;

    fn run(
        xff: Option<&str>,
        peer: &str,
        use_remote_address: bool,
        trust: &ClientTrust,
    ) -> (Result<ClientAddress, u16>, HeaderMap) {
        let mut h = HeaderMap::new();
        if let Some(x) = xff {
            h.insert(XFF, x.parse().unwrap());
        }
        h.insert("x-envoy-max-retries", "3".parse().unwrap());
        h.insert("x-envoy-decorator-operation", "op".parse().unwrap());
        let d = Downstream {
            peer: format!("{peer}:4000").parse().unwrap(),
            local: "192.0.2.2".parse().unwrap(),
            scheme: "http",
            use_remote_address,
            trust,
            internal_only_headers: &[],
        };
        let r = mutate_request(&mut h, &d);
        (r, h)
    }

    fn get(h: &HeaderMap, n: impl http::header::AsHeaderName) -> Option<&str> {
        h.get(n).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn last_address_and_single_flag() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(XFF, v.parse().unwrap());
            h
        };
        let ip = |s: &str| Some(SocketAddr::new(s.parse().unwrap(), 0));
        assert_eq!(last_xff_address(&h("1.1.1.1"), 0), (ip("1.1.1.1"), true));
        assert_eq!(
            last_xff_address(&h("1.1.1.1, 2.2.2.2"), 0),
            (ip("2.2.2.2"), false)
        );
        assert_eq!(
            last_xff_address(&h("1.1.1.1,2.2.2.2"), 1),
            (ip("1.1.1.1"), false)
        );
        assert_eq!(last_xff_address(&h("1.1.1.1"), 1), (None, false));
        assert_eq!(last_xff_address(&h("1.1.1.1,"), 0), (None, false));
        assert_eq!(last_xff_address(&h("junk"), 0), (None, false));
        assert_eq!(last_xff_address(&h("::1"), 0), (ip("::1"), true));
    }

    #[test]
    fn default_trusts_no_one() {
        let trust = ClientTrust::default();
        let (r, h) = run(Some("10.0.0.1"), "127.0.0.1", false, &trust);
        let r = r.unwrap();
        assert_eq!(r.remote.ip().to_string(), "10.0.0.1");
        assert!(!r.internal && !r.edge);
        assert_eq!(get(&h, "x-envoy-max-retries"), None);
        assert_eq!(get(&h, "x-envoy-decorator-operation"), Some("op"));
        assert_eq!(get(&h, XFF), Some("10.0.0.1"));
    }

    #[test]
    fn internal_when_the_single_address_is_listed() {
        let trust = ClientTrust {
            internal: InternalAddresses::Ranges(vec!["10.0.0.0/8".parse::<CidrRange>().unwrap()]),
            ..ClientTrust::default()
        };
        let (r, h) = run(Some("10.0.0.1"), "127.0.0.1", false, &trust);
        assert!(r.unwrap().internal);
        assert_eq!(get(&h, INTERNAL), Some("true"));
        assert_eq!(get(&h, "x-envoy-max-retries"), Some("3"));
        // Two addresses never make a request internal.
        let (r, _) = run(Some("10.0.0.2,10.0.0.1"), "127.0.0.1", false, &trust);
        assert!(!r.unwrap().internal);
        // use_remote_address: the peer decides, and an XFF makes it external.
        let (r, h) = run(None, "10.1.1.1", true, &trust);
        assert!(r.unwrap().internal);
        assert_eq!(get(&h, XFF), Some("10.1.1.1"));
        let (r, h) = run(Some("10.0.0.9"), "10.1.1.1", true, &trust);
        let r = r.unwrap();
        assert!(!r.internal && r.edge);
        assert_eq!(get(&h, XFF), Some("10.0.0.9,10.1.1.1"));
        assert_eq!(get(&h, EXTERNAL_ADDRESS), Some("10.1.1.1"));
        assert_eq!(get(&h, "x-envoy-decorator-operation"), None);
    }

    #[test]
    fn trusted_hops_and_loopback_peer() {
        let trust = ClientTrust {
            xff_num_trusted_hops: 1,
            ..ClientTrust::default()
        };
        let (r, h) = run(Some("5.5.5.5,6.6.6.6"), "127.0.0.1", true, &trust);
        assert_eq!(r.unwrap().remote.ip().to_string(), "6.6.6.6");
        assert_eq!(get(&h, XFF), Some("5.5.5.5,6.6.6.6,192.0.2.2"));
        let (r, _) = run(Some("5.5.5.5,6.6.6.6"), "127.0.0.1", false, &trust);
        assert_eq!(r.unwrap().remote.ip().to_string(), "5.5.5.5");
    }

    #[test]
    fn custom_header_detection() {
        let trust = ClientTrust {
            detection: vec![IpDetection::CustomHeader {
                header: "x-real-ip".into(),
                trusted: true,
                reject_with: Some(429),
            }],
            internal: InternalAddresses::Private,
            ..ClientTrust::default()
        };
        let (r, _) = run(None, "127.0.0.1", false, &trust);
        assert_eq!(r, Err(429));
        let mut h = HeaderMap::new();
        h.insert("x-real-ip", "192.168.1.1".parse().unwrap());
        let d = Downstream {
            peer: "127.0.0.1:1".parse().unwrap(),
            local: "192.0.2.2".parse().unwrap(),
            scheme: "http",
            use_remote_address: false,
            trust: &trust,
            internal_only_headers: &[],
        };
        let r = mutate_request(&mut h, &d).unwrap();
        assert!(r.internal);
        assert_eq!(r.remote.ip().to_string(), "192.168.1.1");
    }

    #[test]
    fn trusted_cidrs_walk_from_the_right() {
        let trust = ClientTrust {
            detection: vec![IpDetection::Xff {
                num_trusted_hops: 0,
                trusted_cidrs: Some(vec!["10.0.0.0/8".parse().unwrap()]),
                skip_xff_append: true,
            }],
            ..ClientTrust::default()
        };
        let (r, _) = run(Some("1.1.1.1,2.2.2.2,10.0.0.5"), "10.9.9.9", false, &trust);
        assert_eq!(r.unwrap().remote.ip().to_string(), "2.2.2.2");
        // An untrusted peer: no detection, the peer stays the client.
        let (r, _) = run(Some("1.1.1.1"), "8.8.8.8", false, &trust);
        assert_eq!(r.unwrap().remote.ip().to_string(), "8.8.8.8");
    }
}
