//! The HTTP connection manager's header handling: hop-by-hop headers are
//! connection-scoped and never forwarded; `x-forwarded-proto` and
//! `x-request-id` are filled in as Envoy does by default.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
];

/// Whether the request asks to switch protocols (WebSocket and friends).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Which of [`HOP_BY_HOP`] `name` is.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    HOP_BY_HOP.iter().position(|h| *h == name.as_str())
}

/// Whether any header is an `x-envoy-*` one. Most requests carry none, and
/// one pass over their few names is cheaper than looking up each of the
/// `x-envoy-*` names the connection manager and the router remove or read.
pub fn any_envoy_header(headers: &HeaderMap) -> bool {
    headers.keys().any(|k| k.as_str().starts_with("x-envoy-"))
}

/// Removes hop-by-hop headers and those the `Connection` header names. With
/// `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive so that the
/// upstream sees the protocol switch.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the message's few names finds which hop-by-hop ones it
    // carries (most carry none, or only `Connection`), instead of a lookup
    // per hop-by-hop name.
    let mut present = 0u32;
    let mut te = false;
    for k in headers.keys() {
        if let Some(i) = hop_by_hop_index(k) {
            present |= 1 << i;
        }
        te |= k == header::TE;
    }
    if present == 0 && !te && !keep_upgrade {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0 || keep_upgrade && (*name == "connection" || *name == "upgrade")
        {
            continue;
        }
        headers.remove(*name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // `te` may only carry "trailers" past a proxy (gRPC relies on it).
    if let Some(te) = headers.get(header::TE) {
        let trailers = te
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

/// Request headers as Envoy's connection manager sets them before routing.
pub fn prepare_request(headers: &mut HeaderMap, scheme: &'static str, generate_request_id: bool) {
    let upgrade = is_upgrade(headers);
    strip_hop_by_hop(headers, upgrade);
    // The proxy answers `Expect: 100-continue` itself (as Envoy does by
    // default), so the upstream must not wait for a second interim response.
    headers.remove(header::EXPECT);
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static(scheme));
    }
    if generate_request_id && !headers.contains_key("x-request-id") {
        headers.insert("x-request-id", request_id());
    }
}

/// Response headers before they go downstream.
pub fn prepare_response(headers: &mut HeaderMap, upgraded: bool) {
    strip_hop_by_hop(headers, upgraded);
}

/// A random UUID v4, as Envoy's default request-id extension generates.
/// The bytes come from `rand`'s thread-local generator rather than
/// `uuid`'s `v4` feature, which asks the kernel (a `getrandom` call) for
/// every id: this runs once per request that arrives without one.
pub fn request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate"),
            ("expect", "100-continue"),
            ("x-keep", "yes"),
        ]);
        prepare_request(&mut h, "http", true);
        assert!(h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("transfer-encoding").is_none());
        assert!(h.get("expect").is_none());
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["x-forwarded-proto"], "http");
        let id = h["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(request_id(), request_id());
    }

    #[test]
    fn existing_request_id_and_proto_are_kept() {
        let mut h = map(&[("x-request-id", "abc"), ("x-forwarded-proto", "https")]);
        prepare_request(&mut h, "http", true);
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn upgrade_headers_survive_for_websocket() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        prepare_request(&mut h, "http", false);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }
}
