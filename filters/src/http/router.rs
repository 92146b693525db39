//! `envoy.filters.http.router`: the parts of the router that rewrite a request
//! or answer it locally (path rewrites, redirects), and the `x-envoy-*`
//! request headers through which an internal client steers its timeout and
//! retries (the connection manager has already removed them from any other).

use std::time::Duration;

use ferry_model::{RetryOn, RetryPolicy};
use http::{HeaderMap, Uri};

/// What a request's `x-envoy-*` headers change of the route's policy.
#[derive(Debug, Default)]
pub struct HeaderOverrides {
    /// `x-envoy-upstream-rq-timeout-ms` (`Some(None)`: 0, no timeout).
    pub timeout: Option<Option<Duration>>,
    /// `x-envoy-upstream-rq-per-try-timeout-ms`.
    pub per_try_timeout: Option<Duration>,
    /// The route's retry policy merged with `x-envoy-retry-on`,
    /// `x-envoy-retry-grpc-on`, `x-envoy-max-retries` and
    /// `x-envoy-retriable-status-codes` (`None`: nothing changed).
    pub retry: Option<RetryPolicy>,
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Reads the router's `x-envoy-*` request headers as Envoy does, and
/// consumes them (Envoy removes them before the request goes on).
pub fn header_overrides(h: &mut HeaderMap, route: Option<&RetryPolicy>) -> HeaderOverrides {
    if !super::headers::any_envoy_header(h) {
        return HeaderOverrides {
            timeout: None,
            per_try_timeout: None,
            retry: None,
        };
    }
    let mut out = HeaderOverrides {
        timeout: header_u64(h, "x-envoy-upstream-rq-timeout-ms")
            .map(|ms| (ms > 0).then(|| Duration::from_millis(ms))),
        per_try_timeout: header_u64(h, "x-envoy-upstream-rq-per-try-timeout-ms")
            .map(Duration::from_millis),
        retry: None,
    };
    h.remove("x-envoy-upstream-rq-timeout-ms");
    h.remove("x-envoy-upstream-rq-per-try-timeout-ms");
    let text = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let on = [text("x-envoy-retry-on"), text("x-envoy-retry-grpc-on")]
        .into_iter()
        .flatten()
        .fold(RetryOn::default(), |acc, s| acc.union(RetryOn::parse(&s).0));
    let max = header_u64(h, "x-envoy-max-retries").and_then(|n| u32::try_from(n).ok());
    let codes: Vec<u16> = text("x-envoy-retriable-status-codes")
        .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_default();
    // Consumed here, as Envoy's router does: they never reach the upstream.
    for h_name in [
        "x-envoy-retry-on",
        "x-envoy-retry-grpc-on",
        "x-envoy-max-retries",
        "x-envoy-retriable-status-codes",
        "x-envoy-retriable-header-names",
    ] {
        h.remove(h_name);
    }
    let touched = on.any() || max.is_some() || !codes.is_empty();
    let base = route.map(|p| p.retry_on).unwrap_or_default().union(on);
    // As Envoy: without any retry condition there is no retry at all, so
    // `x-envoy-max-retries` alone changes nothing.
    if touched && base.any() {
        let mut p = route.cloned().unwrap_or_default();
        p.retry_on = base;
        if let Some(n) = max {
            p.num_retries = n;
        }
        p.retriable_status_codes.extend(codes);
        out.retry = Some(p);
    }
    out
}

/// `append_x_forwarded_host`: the Host a route rewrote is appended to
/// `x-forwarded-host` (comma-separated, as Envoy appends it).
pub fn append_forwarded_host(h: &mut HeaderMap, original: &http::HeaderValue) {
    let value = match h.get("x-forwarded-host").map(|v| v.as_bytes()) {
        Some(prev) if !prev.is_empty() => {
            let mut v = prev.to_vec();
            v.push(b',');
            v.extend_from_slice(original.as_bytes());
            http::HeaderValue::from_bytes(&v).ok()
        }
        _ => Some(original.clone()),
    };
    if let Some(v) = value {
        h.insert("x-forwarded-host", v);
    }
}

/// `x-envoy-expected-rq-timeout-ms` for an attempt `elapsed` into the
/// request: the per-try timeout, else the route timeout, within what is
/// left of the route timeout (1 ms at least); `None` without any timeout.
pub fn expected_timeout(
    timeout: Option<Duration>,
    per_try: Option<Duration>,
    elapsed: Duration,
) -> Option<u64> {
    let global = timeout.map_or(0, |t| t.as_millis() as u64);
    let mut expected = per_try.map_or(0, |t| t.as_millis() as u64);
    if expected == 0 {
        expected = global;
    }
    if expected == 0 {
        return None;
    }
    if global > 0 {
        let elapsed = elapsed.as_millis() as u64;
        expected = if elapsed >= global {
            1
        } else {
            expected.min(global - elapsed)
        };
    }
    Some(expected)
}

/// Replaces the matched prefix of `path_and_query` (Envoy's `prefix_rewrite`).
pub fn rewrite_prefix(path_and_query: &str, matched_prefix: &str, replacement: &str) -> String {
    match path_and_query.get(..matched_prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(matched_prefix) => {
            format!("{replacement}{}", &path_and_query[matched_prefix.len()..])
        }
        _ => path_and_query.to_string(),
    }
}

/// What a redirect route changes.
#[derive(Debug, Default)]
pub struct Redirect<'a> {
    pub scheme: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: Option<u16>,
    pub path: Option<&'a str>,
    /// `(matched prefix, replacement)`.
    pub prefix_rewrite: Option<(&'a str, &'a str)>,
    pub strip_query: bool,
}

/// Builds the `Location` of a redirect from the request's scheme, host and path.
pub fn redirect_location(req_scheme: &str, req_host: &str, uri: &Uri, r: &Redirect<'_>) -> String {
    let scheme = r.scheme.unwrap_or(req_scheme);
    let (host_only, req_port) = match req_host.rsplit_once(':') {
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') || h.ends_with(']') =>
        {
            (h, Some(p))
        }
        _ => (req_host, None),
    };
    let host = r.host.unwrap_or(host_only);
    let port = match (r.port, r.scheme, req_port) {
        (Some(p), _, _) => format!(":{p}"),
        // A scheme change drops the old port, as Envoy does.
        (None, Some(_), _) => String::new(),
        (None, None, Some(p)) if r.host.is_none() => format!(":{p}"),
        _ => String::new(),
    };
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let (path, query) = match pq.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (pq, None),
    };
    let mut new_path = match (r.path, r.prefix_rewrite) {
        (Some(p), _) => p.to_string(),
        (None, Some((matched, repl))) => rewrite_prefix(path, matched, repl),
        _ => path.to_string(),
    };
    if let Some(q) = query
        && !r.strip_query
        && r.path.is_none_or(|p| !p.contains('?'))
    {
        new_path.push('?');
        new_path.push_str(q);
    }
    format!("{scheme}://{host}{port}{new_path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_request_headers_override_the_route() {
        let mut h = HeaderMap::new();
        h.insert("x-envoy-upstream-rq-timeout-ms", "250".parse().unwrap());
        h.insert("x-envoy-max-retries", "2".parse().unwrap());
        let o = header_overrides(&mut h, None);
        assert_eq!(o.timeout, Some(Some(Duration::from_millis(250))));
        assert!(o.retry.is_none(), "no retry condition, no retries");
        assert!(!h.contains_key("x-envoy-upstream-rq-timeout-ms"));
        // The router consumes the headers it reads, as Envoy does.
        assert!(!h.contains_key("x-envoy-max-retries"));
        h.insert("x-envoy-max-retries", "2".parse().unwrap());
        h.insert("x-envoy-retry-on", "5xx".parse().unwrap());
        let o = header_overrides(&mut h, None);
        let p = o.retry.unwrap();
        assert!(p.retry_on.server_error);
        assert_eq!(p.num_retries, 2);
        assert_eq!(
            expected_timeout(Some(Duration::from_secs(5)), None, Duration::ZERO),
            Some(5000)
        );
        assert_eq!(
            expected_timeout(
                Some(Duration::from_secs(5)),
                Some(Duration::from_secs(1)),
                Duration::from_millis(4500)
            ),
            Some(500)
        );
        assert_eq!(expected_timeout(None, None, Duration::ZERO), None);
    }

    #[test]
    fn prefix_rewrite() {
        assert_eq!(rewrite_prefix("/v1/api?x=1", "/v1/", "/"), "/api?x=1");
        assert_eq!(rewrite_prefix("/other", "/v1/", "/"), "/other");
    }

    #[test]
    fn redirects() {
        let uri: Uri = "/a/b?q=1".parse().unwrap();
        let r = Redirect {
            scheme: Some("https"),
            ..Default::default()
        };
        assert_eq!(
            redirect_location("http", "example.com:8080", &uri, &r),
            "https://example.com/a/b?q=1"
        );
        let r = Redirect {
            host: Some("new.example"),
            path: Some("/x"),
            strip_query: true,
            ..Default::default()
        };
        assert_eq!(
            redirect_location("http", "example.com", &uri, &r),
            "http://new.example/x"
        );
        let r = Redirect {
            prefix_rewrite: Some(("/a", "/z")),
            ..Default::default()
        };
        assert_eq!(
            redirect_location("http", "example.com:8080", &uri, &r),
            "http://example.com:8080/z/b?q=1"
        );
    }
}
