//! Route tables with compiled matchers: virtual host selection by domain and
//! the ordered route list of each virtual host, as Envoy evaluates them.

use std::time::Duration;

use http::HeaderMap;
use regex::Regex;

#[derive(Debug, Default)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    /// Match the host without its port (`ignore_port_in_host_matching`, set
    /// by istiod, whose domains carry no ports).
    pub ignore_port_in_host_matching: bool,
    /// Reject the table when a route names a cluster that does not exist
    /// (`validate_clusters`; Envoy's default is off for RDS).
    pub validate_clusters: bool,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<DomainMatcher>,
    pub routes: Vec<Route>,
}

/// One entry of a virtual host's `domains`, compiled by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainMatcher {
    Exact(String),
    /// `*.example.com` (stored as `.example.com`) or `*-bar.com`.
    Suffix(String),
    /// `foo.*` (stored as `foo.`).
    Prefix(String),
    Any,
}

impl DomainMatcher {
    pub fn parse(domain: &str) -> Self {
        let d = domain.to_ascii_lowercase();
        if d == "*" {
            DomainMatcher::Any
        } else if let Some(s) = d.strip_prefix('*') {
            DomainMatcher::Suffix(s.to_string())
        } else if let Some(p) = d.strip_suffix('*') {
            DomainMatcher::Prefix(p.to_string())
        } else {
            DomainMatcher::Exact(d)
        }
    }

    /// Match quality: exact beats the longest suffix, which beats the longest
    /// prefix, which beats `*` (Envoy's virtual host search order).
    fn rank(&self, host: &str) -> Option<(u8, usize)> {
        match self {
            DomainMatcher::Exact(d) => (d == host).then_some((3, d.len())),
            DomainMatcher::Suffix(s) => {
                (host.len() > s.len() && host.ends_with(s.as_str())).then_some((2, s.len()))
            }
            DomainMatcher::Prefix(p) => {
                (host.len() > p.len() && host.starts_with(p.as_str())).then_some((1, p.len()))
            }
            DomainMatcher::Any => Some((0, 0)),
        }
    }
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub route_match: RouteMatch,
    pub action: RouteAction,
    pub request_headers_to_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub request_headers_to_remove: Vec<http::HeaderName>,
    /// `route.hash_policy`: the request hash for ring hash and maglev clusters.
    pub hash_policy: Vec<crate::cluster::HashPolicy>,
    /// Per-filter overrides of the fault filter (`typed_per_filter_config`),
    /// by HTTP filter name; the route's entry replaces its virtual host's.
    pub fault_overrides: Vec<(String, std::sync::Arc<crate::fault::FaultConfig>)>,
}

impl Route {
    /// The fault configuration overriding the filter named `filter`, if any.
    pub fn fault_override(&self, filter: &str) -> Option<&crate::fault::FaultConfig> {
        self.fault_overrides
            .iter()
            .find(|(n, _)| n == filter)
            .map(|(_, f)| f.as_ref())
    }
}

#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
    /// Matches `/foo` and `/foo/...` but not `/foobar`.
    SeparatedPrefix(String),
}

#[derive(Debug, Clone)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

impl StringMatcher {
    pub fn matches(&self, value: &str, ignore_case: bool) -> bool {
        let eq = |a: &str, b: &str| {
            if ignore_case {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        match self {
            StringMatcher::Exact(s) => eq(value, s),
            StringMatcher::Prefix(s) => value.len() >= s.len() && eq(&value[..s.len()], s),
            StringMatcher::Suffix(s) => {
                value.len() >= s.len() && eq(&value[value.len() - s.len()..], s)
            }
            StringMatcher::Contains(s) => {
                if ignore_case {
                    value.to_ascii_lowercase().contains(&s.to_ascii_lowercase())
                } else {
                    value.contains(s.as_str())
                }
            }
            StringMatcher::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug)]
pub struct HeaderMatcher {
    pub name: http::HeaderName,
    /// `None`: the header only has to be present.
    pub matcher: Option<StringMatcher>,
    pub ignore_case: bool,
    pub invert: bool,
    /// `present_match: false` inverts presence (the header must be absent).
    pub present: bool,
}

impl HeaderMatcher {
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter().peekable();
        let result = match &self.matcher {
            None => values.peek().is_some() == self.present,
            Some(m) => {
                // Envoy joins repeated headers with "," before matching.
                let joined: Vec<&str> = values.filter_map(|v| v.to_str().ok()).collect();
                !joined.is_empty() && m.matches(&joined.join(","), self.ignore_case)
            }
        };
        result != self.invert
    }
}

#[derive(Debug)]
pub enum RouteAction {
    Route {
        cluster: ClusterSpecifier,
        prefix_rewrite: Option<String>,
        host_rewrite: Option<String>,
        /// Envoy's default route timeout is 15 s; `None` disables it.
        timeout: Option<Duration>,
        /// The route's retry policy, or its virtual host's (a route's own
        /// policy replaces the virtual host's whole, as in Envoy).
        retry_policy: Option<std::sync::Arc<RetryPolicy>>,
        /// Per-route stream idle timeout (`RouteAction.idle_timeout`).
        idle_timeout: Option<Duration>,
        /// `request_mirror_policies`: shadow copies to other clusters.
        mirrors: Vec<MirrorPolicy>,
        /// `max_stream_duration.max_stream_duration`: the longest the whole
        /// exchange may take, from the request's arrival.
        max_stream_duration: Option<Duration>,
        /// The virtual host's `include_request_attempt_count` and
        /// `include_attempt_count_in_response` (`x-envoy-attempt-count`).
        attempt_count: AttemptCount,
    },
    DirectResponse {
        status: http::StatusCode,
        body: Option<String>,
    },
    Redirect {
        status: http::StatusCode,
        scheme: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        path: Option<String>,
        prefix_rewrite: Option<String>,
        strip_query: bool,
    },
}

/// Envoy's `FractionalPercent`: `numerator` out of `denominator`
/// (100, 10 000 or 1 000 000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: u32,
}

impl Fraction {
    pub const ALL: Fraction = Fraction {
        numerator: 100,
        denominator: 100,
    };

    /// Whether a uniform random `roll` falls inside the fraction, as Envoy's
    /// runtime feature check does (`roll % denominator < numerator`).
    pub fn hits(&self, roll: u64) -> bool {
        self.denominator != 0 && roll % u64::from(self.denominator) < u64::from(self.numerator)
    }
}

/// Where `x-envoy-attempt-count` is added (Envoy adds it only when asked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptCount {
    pub request: bool,
    pub response: bool,
}

/// `RouteAction.request_mirror_policies[]`.
#[derive(Debug, Clone)]
pub struct MirrorPolicy {
    pub cluster: String,
    /// `runtime_fraction.default_value`; absent means every request.
    pub fraction: Fraction,
}

/// The conditions of `retry_on` (Envoy's names in comments).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, a reset, a connect failure or a per-try timeout.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504, and resets as `5xx`.
    pub gateway_error: bool,
    /// `reset`: the upstream reset, disconnected or timed out (per try).
    pub reset: bool,
    /// `connect-failure`: connection failure or connect timeout.
    pub connect_failure: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// `refused-stream`: HTTP/2 REFUSED_STREAM.
    pub refused_stream: bool,
    /// `retriable-status-codes`: the policy's `retriable_status_codes`.
    pub retriable_status_codes: bool,
    /// `reset-before-request`: a reset before any byte of the request was sent.
    pub reset_before_request: bool,
    /// gRPC `grpc-status` in the response headers: `cancelled` (1),
    /// `deadline-exceeded` (4), `resource-exhausted` (8), `internal` (13),
    /// `unavailable` (14).
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_internal: bool,
    pub grpc_unavailable: bool,
}

impl RetryOn {
    /// Parses Envoy's comma-separated `retry_on`; returns the conditions and
    /// the names it does not know (which Envoy ignores).
    pub fn parse(s: &str) -> (Self, Vec<String>) {
        let mut on = RetryOn::default();
        let mut unknown = Vec::new();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match token {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => on.retriable_status_codes = true,
                "reset-before-request" => on.reset_before_request = true,
                "cancelled" => on.grpc_cancelled = true,
                "deadline-exceeded" => on.grpc_deadline_exceeded = true,
                "resource-exhausted" => on.grpc_resource_exhausted = true,
                "internal" => on.grpc_internal = true,
                "unavailable" => on.grpc_unavailable = true,
                other => unknown.push(other.to_string()),
            }
        }
        (on, unknown)
    }
}

/// A route's retry policy (`envoy.config.route.v3.RetryPolicy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// Retries after the first attempt (Envoy's default is 1).
    pub num_retries: u32,
    /// Timeout of each attempt; `None` leaves only the route timeout.
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    /// Exponential back-off: base interval (default 25 ms) and cap
    /// (default 10 × base).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// `envoy.retry_host_predicates.previous_hosts`: a retry avoids the
    /// endpoints already tried.
    pub previous_hosts: bool,
    /// `host_selection_retry_max_attempts` (default 1): how many times the
    /// endpoint choice is redone to satisfy the host predicate.
    pub host_selection_max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retry_on: RetryOn::default(),
            num_retries: 1,
            per_try_timeout: None,
            retriable_status_codes: Vec::new(),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            previous_hosts: false,
            host_selection_max_attempts: 1,
        }
    }
}

#[derive(Debug)]
pub enum ClusterSpecifier {
    Name(String),
    Weighted(Vec<WeightedCluster>),
}

#[derive(Debug)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
}

impl ClusterSpecifier {
    /// Picks the cluster; `roll` is a uniform random number.
    pub fn pick(&self, roll: u64) -> &str {
        match self {
            ClusterSpecifier::Name(n) => n,
            ClusterSpecifier::Weighted(ws) => {
                let total: u64 = ws.iter().map(|w| u64::from(w.weight)).sum();
                if total == 0 {
                    return ws.first().map(|w| w.name.as_str()).unwrap_or("");
                }
                let mut point = roll % total;
                for w in ws {
                    if point < u64::from(w.weight) {
                        return &w.name;
                    }
                    point -= u64::from(w.weight);
                }
                ws.last().map(|w| w.name.as_str()).unwrap_or("")
            }
        }
    }
}

impl RouteConfig {
    pub fn referenced_clusters(&self) -> Vec<&str> {
        let mut out = Vec::new();
        for vh in &self.virtual_hosts {
            for r in &vh.routes {
                if let RouteAction::Route { cluster, .. } = &r.action {
                    match cluster {
                        ClusterSpecifier::Name(n) => out.push(n.as_str()),
                        ClusterSpecifier::Weighted(ws) => {
                            out.extend(ws.iter().map(|w| w.name.as_str()))
                        }
                    }
                }
            }
        }
        out
    }

    /// The virtual host for a `Host`/`:authority` value, matched as given
    /// (port included), as Envoy does without `strip_any_host_port`.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let host = host.to_ascii_lowercase();
        if self.ignore_port_in_host_matching {
            return self.best_vhost(strip_port(&host));
        }
        self.best_vhost(&host)
    }

    fn best_vhost(&self, host: &str) -> Option<&VirtualHost> {
        let mut best: Option<((u8, usize), &VirtualHost)> = None;
        for vh in &self.virtual_hosts {
            for d in &vh.domains {
                if let Some(rank) = d.rank(host)
                    && best.is_none_or(|(b, _)| rank > b)
                {
                    best = Some((rank, vh));
                }
            }
        }
        best.map(|(_, vh)| vh)
    }

    /// The first route of the matching virtual host that matches the request.
    pub fn find_route(&self, host: &str, path: &str, headers: &HeaderMap) -> Option<&Route> {
        let vh = self.virtual_host(host)?;
        vh.routes
            .iter()
            .find(|r| r.route_match.matches(path, headers))
    }
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            h
        }
        _ => host,
    }
}

impl RouteMatch {
    /// `path` is the request's path with the query string.
    pub fn matches(&self, path_and_query: &str, headers: &HeaderMap) -> bool {
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(p, _)| p);
        let ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(path, p, self.case_sensitive),
            PathMatch::Exact(p) => {
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::SeparatedPrefix(p) => {
                starts_with(path, p, self.case_sensitive)
                    && (path.len() == p.len() || path.as_bytes().get(p.len()) == Some(&b'/'))
            }
        };
        ok && self.headers.iter().all(|h| h.matches(headers))
    }
}

fn starts_with(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    path.len() >= prefix.len()
        && if case_sensitive {
            path.starts_with(prefix)
        } else {
            path[..prefix.len()].eq_ignore_ascii_case(prefix)
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, path: PathMatch) -> Route {
        Route {
            name: name.into(),
            route_match: RouteMatch {
                path,
                case_sensitive: true,
                headers: vec![],
            },
            action: RouteAction::DirectResponse {
                status: http::StatusCode::OK,
                body: None,
            },
            request_headers_to_add: vec![],
            request_headers_to_remove: vec![],
            fault_overrides: vec![],
            hash_policy: vec![],
        }
    }

    fn vh(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| DomainMatcher::parse(d)).collect(),
            routes,
        }
    }

    #[test]
    fn virtual_host_priority() {
        let mut rc = RouteConfig {
            name: "r".into(),
            ignore_port_in_host_matching: false,
            validate_clusters: false,
            virtual_hosts: vec![
                vh("any", &["*"], vec![]),
                vh("suffix", &["*.example.com"], vec![]),
                vh("prefix", &["api.*"], vec![]),
                vh("exact", &["api.example.com", "reviews:9080"], vec![]),
            ],
        };
        let name = |h: &str| rc.virtual_host(h).unwrap().name.clone();
        assert_eq!(name("api.example.com"), "exact");
        assert_eq!(name("API.example.com"), "exact");
        assert_eq!(name("www.example.com"), "suffix");
        assert_eq!(name("api.other.org"), "prefix");
        assert_eq!(name("reviews:9080"), "exact");
        assert_eq!(name("api.example.com:80"), "prefix");
        assert_eq!(name("www.example.com:80"), "any");
        assert_eq!(name("x"), "any");
        rc.ignore_port_in_host_matching = true;
        assert_eq!(
            rc.virtual_host("www.example.com:80").unwrap().name,
            "suffix"
        );
        assert_eq!(rc.virtual_host("[::1]:80").unwrap().name, "any");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }

    #[test]
    fn path_matching_in_order() {
        let rc = RouteConfig {
            name: "r".into(),
            ignore_port_in_host_matching: false,
            validate_clusters: false,
            virtual_hosts: vec![vh(
                "v",
                &["*"],
                vec![
                    route("exact", PathMatch::Exact("/login".into())),
                    route("sep", PathMatch::SeparatedPrefix("/api".into())),
                    route("re", PathMatch::Regex(Regex::new("^/v[0-9]+/.*$").unwrap())),
                    route("prefix", PathMatch::Prefix("/".into())),
                ],
            )],
        };
        let h = HeaderMap::new();
        let name = |p: &str| rc.find_route("x", p, &h).unwrap().name.clone();
        assert_eq!(name("/login?next=1"), "exact");
        assert_eq!(name("/api/x"), "sep");
        assert_eq!(name("/api"), "sep");
        assert_eq!(name("/apix"), "prefix");
        assert_eq!(name("/v2/a"), "re");
    }

    #[test]
    fn header_matchers() {
        let mut h = HeaderMap::new();
        h.insert("end-user", "jason".parse().unwrap());
        let m = |matcher, invert, present| HeaderMatcher {
            name: http::HeaderName::from_static("end-user"),
            matcher,
            ignore_case: false,
            invert,
            present,
        };
        assert!(m(Some(StringMatcher::Exact("jason".into())), false, true).matches(&h));
        assert!(!m(Some(StringMatcher::Exact("json".into())), false, true).matches(&h));
        assert!(m(Some(StringMatcher::Exact("json".into())), true, true).matches(&h));
        assert!(m(Some(StringMatcher::Prefix("ja".into())), false, true).matches(&h));
        assert!(m(None, false, true).matches(&h));
        assert!(!m(None, false, true).matches(&HeaderMap::new()));
        assert!(m(None, false, false).matches(&HeaderMap::new()));
    }

    #[test]
    fn retry_on_and_fractions() {
        let (on, unknown) = RetryOn::parse("5xx, connect-failure,unavailable,bogus");
        assert!(on.server_error && on.connect_failure && on.grpc_unavailable);
        assert!(!on.gateway_error && !on.reset);
        assert_eq!(unknown, vec!["bogus".to_string()]);
        let half = Fraction {
            numerator: 50,
            denominator: 100,
        };
        assert_eq!((0..1000).filter(|r| half.hits(*r)).count(), 500);
        assert!(
            !Fraction {
                numerator: 0,
                denominator: 100
            }
            .hits(0)
        );
        assert!(Fraction::ALL.hits(99));
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let spec = ClusterSpecifier::Weighted(vec![
            WeightedCluster {
                name: "a".into(),
                weight: 25,
            },
            WeightedCluster {
                name: "b".into(),
                weight: 75,
            },
        ]);
        let a = (0..100).filter(|r| spec.pick(*r) == "a").count();
        assert_eq!(a, 25);
    }
}
