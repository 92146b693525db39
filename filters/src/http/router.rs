//! `envoy.filters.http.router`: the parts of the router that rewrite a request
//! or answer it locally (path rewrites, redirects).

use http::Uri;

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
