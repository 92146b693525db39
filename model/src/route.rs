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
    /// `internal_only_headers`: removed from requests that are not internal.
    pub internal_only_headers: Vec<http::HeaderName>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<DomainMatcher>,
    pub routes: Vec<Route>,
    /// `require_tls`: requests that did not arrive over TLS (by
    /// `x-forwarded-proto`) are redirected to `https` instead of routed.
    pub require_tls: TlsRequirement,
}

/// `VirtualHost.require_tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsRequirement {
    #[default]
    None,
    /// Only requests that are not internal (`x-envoy-internal`) must use TLS.
    ExternalOnly,
    All,
}

impl VirtualHost {
    /// Whether a request must be redirected to `https` (Envoy's SSL redirect
    /// route): `forwarded_proto` is the request's `x-forwarded-proto`, as the
    /// connection manager left it; `internal`, whether `x-envoy-internal` is
    /// `true`.
    pub fn redirects_to_https(&self, forwarded_proto: &str, internal: bool) -> bool {
        match self.require_tls {
            TlsRequirement::None => false,
            TlsRequirement::All => forwarded_proto != "https",
            TlsRequirement::ExternalOnly => forwarded_proto != "https" && !internal,
        }
    }
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
    pub(crate) fn rank(&self, host: &str) -> Option<(u8, usize)> {
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
    /// Request header mutations of the route, then its virtual host's, then
    /// the route table's (Envoy's order: the outermost level is applied last).
    pub request_headers: HeaderMutations,
    /// The same for the response.
    pub response_headers: HeaderMutations,
    /// `route.hash_policy`: the request hash for ring hash and maglev clusters.
    pub hash_policy: Vec<crate::cluster::HashPolicy>,
    /// Per-filter overrides of the fault filter (`typed_per_filter_config`),
    /// by HTTP filter name; the route's entry replaces its virtual host's.
    pub fault_overrides: Vec<(String, std::sync::Arc<crate::fault::FaultConfig>)>,
    /// CORS policies (`typed_per_filter_config` and the inline `cors`).
    pub cors: RouteCors,
    /// Per-filter overrides of the local rate limit filter; the route's
    /// entry replaces its virtual host's.
    pub ratelimit_overrides: Vec<(String, std::sync::Arc<crate::ratelimit::LocalRateLimit>)>,
    /// Per-filter overrides of the RBAC filter (`RBACPerRoute`); the
    /// route's entry replaces its virtual host's. An override without rules
    /// turns the filter off for the route.
    pub rbac_overrides: Vec<(String, std::sync::Arc<crate::rbac::HttpRbac>)>,
    /// Per-filter overrides of the JWT filter (`PerRouteConfig`); the
    /// route's entry replaces its virtual host's.
    pub jwt_overrides: Vec<(String, crate::jwt::JwtPerRoute)>,
    /// Per-filter overrides of the ext_authz filter (`ExtAuthzPerRoute`):
    /// the most specific level's `disabled`, the context extensions merged.
    pub ext_authz_overrides: Vec<(String, crate::ext_authz::ExtAuthzPerRoute)>,
    /// `CompressorPerRoute` by filter name (whether it turns the filter
    /// off); the route's entry replaces its virtual host's.
    pub compressor_overrides: Vec<(String, bool)>,
    /// `route.rate_limits`: the descriptors of a request for rate limiting.
    pub rate_limits: Vec<crate::ratelimit::RateLimitPolicy>,
    /// The virtual host's `rate_limits`.
    pub vhost_rate_limits: std::sync::Arc<Vec<crate::ratelimit::RateLimitPolicy>>,
    /// `upgrade_configs`: upgrade types (lower case) this route allows or
    /// refuses, overriding the connection manager's.
    pub upgrades: Vec<(String, bool)>,
    /// A CONNECT `upgrade_configs` entry with `connect_config`: a CONNECT
    /// request is terminated here, answered 200 once a TCP connection to
    /// the cluster is open, and its stream's bytes carried over it.
    pub connect_terminate: bool,
    /// The most request body kept to replay for retries and mirrors
    /// (`request_body_buffer_limit`, `per_request_buffer_limit_bytes`, of the
    /// route or its virtual host); `None`: the listener's or Ferry's default.
    pub request_body_buffer_limit: Option<u64>,
    /// `decorator`: the operation name of the route's spans.
    pub decorator: Option<crate::tracing::Decorator>,
}

impl Route {
    /// Whether an upgrade of this type passes (`upgrade_type` as the
    /// `Upgrade` header names it): the route's own setting when it has one,
    /// else `default` (the connection manager's).
    pub fn allows_upgrade(&self, upgrade_type: &str, default: bool) -> bool {
        self.upgrades
            .iter()
            .find(|(t, _)| t.eq_ignore_ascii_case(upgrade_type))
            .map_or(default, |(_, enabled)| *enabled)
    }

    /// The fault configuration overriding the filter named `filter`, if any.
    pub fn fault_override(&self, filter: &str) -> Option<&crate::fault::FaultConfig> {
        self.fault_overrides
            .iter()
            .find(|(n, _)| n == filter)
            .map(|(_, f)| f.as_ref())
    }

    /// The CORS policies for the filter named `filter`, most specific first
    /// (the route's, then its virtual host's); the deprecated inline `cors`
    /// fields are used when no `typed_per_filter_config` entry exists, as
    /// Envoy does.
    pub fn cors_policies(&self, filter: &str) -> Vec<&crate::cors::CorsPolicy> {
        let named: Vec<_> = self
            .cors
            .per_filter
            .iter()
            .filter(|(n, _)| n == filter)
            .map(|(_, p)| p.as_ref())
            .collect();
        if named.is_empty() {
            self.cors.inline.iter().map(|p| p.as_ref()).collect()
        } else {
            named
        }
    }

    /// The RBAC configuration overriding the filter named `filter` (the
    /// route's entry, else its virtual host's).
    /// Whether the route turns the compressor filter `filter` off.
    pub fn compressor_disabled(&self, filter: &str) -> bool {
        self.compressor_overrides
            .iter()
            .any(|(n, off)| n == filter && *off)
    }

    pub fn jwt_override(&self, filter: &str) -> Option<&crate::jwt::JwtPerRoute> {
        self.jwt_overrides
            .iter()
            .find(|(n, _)| n == filter)
            .map(|(_, f)| f)
    }

    /// The ext_authz settings of the filter named `filter` on this route.
    pub fn ext_authz_override(&self, filter: &str) -> Option<&crate::ext_authz::ExtAuthzPerRoute> {
        self.ext_authz_overrides
            .iter()
            .find(|(n, _)| n == filter)
            .map(|(_, f)| f)
    }

    /// The RBAC configuration overriding the filter named `filter`, if any.
    pub fn rbac_override(&self, filter: &str) -> Option<&crate::rbac::HttpRbac> {
        self.rbac_overrides
            .iter()
            .find(|(n, _)| n == filter)
            .map(|(_, f)| f.as_ref())
    }

    /// The local rate limit configuration overriding the filter named
    /// `filter` (the route's entry, else its virtual host's).
    pub fn ratelimit_override(&self, filter: &str) -> Option<&crate::ratelimit::LocalRateLimit> {
        self.ratelimit_overrides
            .iter()
            .find(|(n, _)| n == filter)
            .map(|(_, f)| f.as_ref())
    }
}

/// The CORS policies a route sees: per filter name, most specific first.
#[derive(Debug, Default)]
pub struct RouteCors {
    pub per_filter: Vec<(String, std::sync::Arc<crate::cors::CorsPolicy>)>,
    /// The deprecated `RouteAction.cors` and `VirtualHost.cors`, in that order.
    pub inline: Vec<std::sync::Arc<crate::cors::CorsPolicy>>,
}

/// Header removals and additions, applied in order.
#[derive(Debug, Default, Clone)]
pub struct HeaderMutations {
    pub ops: Vec<HeaderOp>,
}

#[derive(Debug, Clone)]
pub enum HeaderOp {
    Remove(http::HeaderName),
    Add(HeaderToAdd),
}

/// One `HeaderValueOption`: its value is a compiled format string.
#[derive(Debug, Clone)]
pub struct HeaderToAdd {
    pub name: http::HeaderName,
    pub value: crate::format::HeaderFormat,
    pub action: AppendAction,
    /// `keep_empty_value`: add the header even when its value formats empty.
    pub keep_empty: bool,
}

/// `HeaderValueOption.append_action` (the deprecated `append` maps onto the
/// first two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies the removals and additions to `target`, formatting values
    /// with `ctx`; `%REQ()%` reads `request`, or `target` itself when the
    /// mutations are the request's (values are all formatted first).
    pub fn apply(
        &self,
        target: &mut HeaderMap,
        ctx: &crate::format::FormatContext<'_>,
        request: Option<&HeaderMap>,
    ) {
        if self.ops.is_empty() {
            return;
        }
        let values: Vec<Option<String>> = {
            let req = request.unwrap_or(target);
            self.ops
                .iter()
                .map(|op| match op {
                    HeaderOp::Add(h) => Some(h.value.render(ctx, req)),
                    HeaderOp::Remove(_) => None,
                })
                .collect()
        };
        for (op, value) in self.ops.iter().zip(values) {
            match op {
                HeaderOp::Remove(name) => {
                    target.remove(name);
                }
                HeaderOp::Add(h) => {
                    let value = value.unwrap_or_default();
                    if value.is_empty() && !h.keep_empty {
                        continue;
                    }
                    let Ok(value) = http::HeaderValue::from_str(&value) else {
                        continue;
                    };
                    match h.action {
                        AppendAction::AppendIfExistsOrAdd => {
                            target.append(h.name.clone(), value);
                        }
                        AppendAction::AddIfAbsent => {
                            if !target.contains_key(&h.name) {
                                target.insert(h.name.clone(), value);
                            }
                        }
                        AppendAction::OverwriteIfExistsOrAdd => {
                            target.insert(h.name.clone(), value);
                        }
                        AppendAction::OverwriteIfExists => {
                            if target.contains_key(&h.name) {
                                target.insert(h.name.clone(), value);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// The route table's `ignore_path_parameters_in_path_matching`: the
    /// path is matched up to its first `;`.
    pub ignore_path_parameters: bool,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    /// `query_parameters`: every one must match the query string.
    pub query_parameters: Vec<QueryParameterMatcher>,
    /// `grpc: {}`: only gRPC requests (content-type `application/grpc`,
    /// `application/grpc+…` or `application/grpc;…`).
    pub grpc: bool,
    /// `runtime_fraction.default_value` (there is no runtime layer, so the
    /// default applies): the share of requests this route may match.
    pub runtime_fraction: Option<Fraction>,
}

/// `RouteMatch.query_parameters[]`: only the first value of a repeated
/// parameter counts, and it is matched as it appears in the URL
/// (percent-encoded), as in Envoy.
#[derive(Debug)]
pub struct QueryParameterMatcher {
    pub name: String,
    pub kind: QueryMatch,
}

#[derive(Debug)]
pub enum QueryMatch {
    /// No specifier: the parameter has to be present.
    Present,
    /// `present_match`: `true` asks for presence, `false` for absence.
    PresentMatch(bool),
    String {
        matcher: StringMatcher,
        ignore_case: bool,
    },
}

impl QueryParameterMatcher {
    pub fn matches(&self, query: Option<&str>) -> bool {
        let value = query.and_then(|q| first_query_value(q, &self.name));
        if let QueryMatch::PresentMatch(p) = self.kind {
            return value.is_some() == p;
        }
        let Some(value) = value else {
            return false;
        };
        match &self.kind {
            QueryMatch::Present | QueryMatch::PresentMatch(_) => true,
            QueryMatch::String {
                matcher,
                ignore_case,
            } => matcher.matches(value, *ignore_case),
        }
    }
}

/// The first value of `name` in a query string (`a=1&b&c=`); a parameter
/// without `=` has the empty value.
pub fn first_query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the request is gRPC by its content-type, as Envoy's router
/// checks it.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .is_some_and(|v| {
            v.starts_with(GRPC) && matches!(v.get(GRPC.len()), None | Some(b'+') | Some(b';'))
        })
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
    /// Matches `/foo` and `/foo/...` but not `/foobar`.
    SeparatedPrefix(String),
    /// `connect_matcher`: CONNECT requests only (which no path matcher
    /// other than an empty prefix matches: they have no path).
    Connect,
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

#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    pub name: HeaderKey,
    /// `None`: the header only has to be present.
    pub matcher: Option<StringMatcher>,
    pub ignore_case: bool,
    pub invert: bool,
    /// `present_match: false` inverts presence (the header must be absent).
    pub present: bool,
    /// `treat_missing_header_as_empty`: an absent header is matched as the
    /// empty value (a string matcher may then match it).
    pub treat_missing_as_empty: bool,
}

/// The header a matcher reads: a regular header or one of HTTP/2's
/// pseudo-headers, which Envoy matches like headers (istiod matches methods
/// with `:method` and authorities with `:authority`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderKey {
    Name(http::HeaderName),
    Method,
    Path,
    Authority,
    Scheme,
}

impl From<http::HeaderName> for HeaderKey {
    fn from(n: http::HeaderName) -> Self {
        HeaderKey::Name(n)
    }
}

impl HeaderKey {
    /// `name` as configured (pseudo-headers start with `:`); `None` when it
    /// is neither a header name nor a pseudo-header Envoy knows.
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            ":method" => Some(HeaderKey::Method),
            ":path" => Some(HeaderKey::Path),
            ":authority" | "host" => Some(HeaderKey::Authority),
            ":scheme" => Some(HeaderKey::Scheme),
            n => http::HeaderName::from_bytes(n.as_bytes())
                .ok()
                .map(HeaderKey::Name),
        }
    }
}

/// The pseudo-headers of a request, for matchers that read them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pseudo<'a> {
    pub method: &'a str,
    /// The path with its query.
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
}

impl HeaderMatcher {
    /// Matches the regular headers only (pseudo-headers count as absent).
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        self.matches_request(headers, None)
    }

    pub fn matches_request(&self, headers: &HeaderMap, pseudo: Option<&Pseudo<'_>>) -> bool {
        let joined: Option<String> = match &self.name {
            HeaderKey::Name(name) => {
                // Envoy joins repeated headers with "," before matching.
                let values: Vec<&str> = headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                match values.len() {
                    0 if !headers.contains_key(name) => None,
                    _ => Some(values.join(",")),
                }
            }
            pseudo_key => pseudo.map(|p| {
                match pseudo_key {
                    HeaderKey::Method => p.method,
                    HeaderKey::Path => p.path,
                    HeaderKey::Authority => p.authority,
                    _ => p.scheme,
                }
                .to_string()
            }),
        };
        let joined = match joined {
            None if self.treat_missing_as_empty && self.matcher.is_some() => Some(String::new()),
            v => v,
        };
        let result = match (&self.matcher, joined) {
            (None, v) => v.is_some() == self.present,
            (Some(m), Some(v)) => m.matches(&v, self.ignore_case),
            // As Envoy: an absent header matches no value matcher, inverted
            // or not.
            (Some(_), None) => return false,
        };
        result != self.invert
    }
}

#[derive(Debug)]
pub enum RouteAction {
    Route {
        cluster: ClusterSpecifier,
        prefix_rewrite: Option<String>,
        /// `regex_rewrite`: the path (without its query) rewritten by a
        /// global regex substitution.
        regex_rewrite: Option<RegexRewrite>,
        host_rewrite: Option<HostRewrite>,
        /// Envoy's default route timeout is 15 s; `None` disables it.
        timeout: Option<Duration>,
        /// The route's retry policy, or its virtual host's (a route's own
        /// policy replaces the virtual host's whole, as in Envoy).
        retry_policy: Option<std::sync::Arc<RetryPolicy>>,
        /// Per-route stream idle timeout (`RouteAction.idle_timeout`):
        /// `None` when unset (the connection manager's
        /// `stream_idle_timeout` applies), `Some(ZERO)` when disabled.
        idle_timeout: Option<Duration>,
        /// `request_mirror_policies`: shadow copies to other clusters.
        mirrors: Vec<MirrorPolicy>,
        /// `max_stream_duration.max_stream_duration`: the longest the whole
        /// exchange may take, from the request's arrival.
        max_stream_duration: Option<Duration>,
        /// The virtual host's `include_request_attempt_count` and
        /// `include_attempt_count_in_response` (`x-envoy-attempt-count`).
        attempt_count: AttemptCount,
        /// `cluster_not_found_response_code` (default 503).
        cluster_not_found: http::StatusCode,
        /// `append_x_forwarded_host`: a rewritten Host is appended to
        /// `x-forwarded-host`.
        append_x_forwarded_host: bool,
        /// Timeouts a gRPC request's `grpc-timeout` header sets.
        grpc_timeouts: Box<GrpcTimeouts>,
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

/// How a gRPC request's `grpc-timeout` header sets its timeouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrpcTimeouts {
    /// `max_grpc_timeout` (and `grpc_timeout_offset`): the route timeout of a
    /// gRPC request is its `grpc-timeout` (none: no timeout), less the
    /// offset, capped at the maximum (zero: no cap).
    pub route_timeout: Option<GrpcTimeout>,
    /// `max_stream_duration.grpc_timeout_header_max` (and `…_offset`): the
    /// `grpc-timeout` of a gRPC request, less the offset and capped, is its
    /// maximum stream duration.
    pub stream_duration: Option<GrpcTimeout>,
}

/// A cap and an offset for a `grpc-timeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrpcTimeout {
    /// Zero: no cap.
    pub max: Duration,
    pub offset: Option<Duration>,
}

impl GrpcTimeout {
    /// The timeout for a request whose `grpc-timeout` is `header` (zero or
    /// none: infinite, as Envoy reads it), as Envoy's router computes it.
    pub fn apply(&self, header: Option<Duration>) -> Option<Duration> {
        let mut t = header.unwrap_or(Duration::ZERO);
        // The offset applies only when it leaves some time.
        if let Some(o) = self.offset
            && o < t
        {
            t -= o;
        }
        if !self.max.is_zero() && (t.is_zero() || t > self.max) {
            t = self.max;
        }
        (!t.is_zero()).then_some(t)
    }
}

/// A request's `grpc-timeout` header: up to 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`); `None` when absent or malformed.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
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
    /// `host_rewrite_literal`: the mirror's Host (before the suffix).
    pub host_rewrite: Option<String>,
    /// `-shadow` is appended to the host (unless
    /// `disable_shadow_host_suffix_append`).
    pub host_suffix: bool,
}

impl MirrorPolicy {
    /// The mirror's Host for a request to `authority`.
    pub fn host(&self, authority: &str) -> String {
        let host = self.host_rewrite.as_deref().unwrap_or(authority);
        if !self.host_suffix {
            return host.to_string();
        }
        match host.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => format!("{h}-shadow:{p}"),
            _ => format!("{host}-shadow"),
        }
    }
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
    /// `retriable-headers`: a response matching the policy's
    /// `retriable_headers`.
    pub retriable_headers: bool,
    /// `envoy-ratelimited`: a response carrying `x-envoy-ratelimited`.
    pub envoy_ratelimited: bool,
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
                "retriable-headers" => on.retriable_headers = true,
                "envoy-ratelimited" => on.envoy_ratelimited = true,
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

    /// Both sets of conditions (a route's policy and `x-envoy-retry-on`).
    pub fn union(self, o: Self) -> Self {
        Self {
            server_error: self.server_error || o.server_error,
            gateway_error: self.gateway_error || o.gateway_error,
            reset: self.reset || o.reset,
            connect_failure: self.connect_failure || o.connect_failure,
            retriable_4xx: self.retriable_4xx || o.retriable_4xx,
            refused_stream: self.refused_stream || o.refused_stream,
            retriable_status_codes: self.retriable_status_codes || o.retriable_status_codes,
            reset_before_request: self.reset_before_request || o.reset_before_request,
            retriable_headers: self.retriable_headers || o.retriable_headers,
            envoy_ratelimited: self.envoy_ratelimited || o.envoy_ratelimited,
            grpc_cancelled: self.grpc_cancelled || o.grpc_cancelled,
            grpc_deadline_exceeded: self.grpc_deadline_exceeded || o.grpc_deadline_exceeded,
            grpc_resource_exhausted: self.grpc_resource_exhausted || o.grpc_resource_exhausted,
            grpc_internal: self.grpc_internal || o.grpc_internal,
            grpc_unavailable: self.grpc_unavailable || o.grpc_unavailable,
        }
    }

    /// Whether any condition is set.
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}

/// A route's retry policy (`envoy.config.route.v3.RetryPolicy`).
#[derive(Debug, Clone)]
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
    /// `retriable_request_headers`: when set, only requests matching one of
    /// them are retried.
    pub retriable_request_headers: Vec<HeaderMatcher>,
    /// `retriable_headers`: responses matching one of them are retried
    /// (`retry_on: retriable-headers`).
    pub retriable_headers: Vec<HeaderMatcher>,
}

impl RetryPolicy {
    /// Whether the request may be retried at all
    /// (`retriable_request_headers`).
    pub fn request_retriable(&self, headers: &HeaderMap, pseudo: &Pseudo<'_>) -> bool {
        self.retriable_request_headers.is_empty()
            || self
                .retriable_request_headers
                .iter()
                .any(|m| m.matches_request(headers, Some(pseudo)))
    }
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
            retriable_request_headers: Vec::new(),
            retriable_headers: Vec::new(),
        }
    }
}

/// `RegexMatchAndSubstitute`: every match of `pattern` in the value is
/// replaced by `substitution` (already in the `regex` crate's `${1}` form).
#[derive(Debug, Clone)]
pub struct RegexRewrite {
    pub pattern: Regex,
    pub substitution: String,
}

impl RegexRewrite {
    pub fn apply(&self, value: &str) -> String {
        self.pattern
            .replace_all(value, self.substitution.as_str())
            .into_owned()
    }
}

/// How the router rewrites the Host/`:authority` header.
#[derive(Debug, Clone)]
pub enum HostRewrite {
    /// `host_rewrite_literal`.
    Literal(String),
    /// `host_rewrite_header`: the value of this request header, when present.
    Header(http::HeaderName),
    /// `host_rewrite_path_regex`: the path (without its query) rewritten.
    PathRegex(RegexRewrite),
    /// `auto_host_rewrite`: the host name of the chosen endpoint (the DNS
    /// name of a STRICT_DNS endpoint; no change for others).
    Auto,
    /// `host_rewrite`: a format string (`prefix-%REQ(x-host)%`); an empty
    /// result leaves the Host alone.
    Format(crate::format::HeaderFormat),
}

#[derive(Debug)]
pub enum ClusterSpecifier {
    Name(String),
    Weighted(WeightedClusters),
    /// `cluster_header`: the cluster named by this request header (missing
    /// header or unknown cluster: 503, flag `NC`).
    Header(http::HeaderName),
}

/// `weighted_clusters`.
#[derive(Debug, Default)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    /// `header_name`: the request header whose value (an unsigned integer)
    /// is the random value that picks the cluster, when it parses.
    pub random_header: Option<http::HeaderName>,
}

/// One `ClusterWeight`: the cluster, its weight, and what the route does
/// differently when this cluster is picked.
#[derive(Debug, Default)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    /// Request header mutations applied before the route's.
    pub request_headers: HeaderMutations,
    /// Response header mutations applied before the route's.
    pub response_headers: HeaderMutations,
    /// `host_rewrite_literal`: replaces the route's host rewrite.
    pub host_rewrite: Option<String>,
    /// `typed_per_filter_config`: filter overrides more specific than the
    /// route's.
    pub filters: FilterOverrides,
}

/// Per-filter overrides (`typed_per_filter_config`) by HTTP filter name.
#[derive(Debug, Default, Clone)]
pub struct FilterOverrides {
    pub fault: Vec<(String, std::sync::Arc<crate::fault::FaultConfig>)>,
    pub cors: Vec<(String, std::sync::Arc<crate::cors::CorsPolicy>)>,
    pub ratelimit: Vec<(String, std::sync::Arc<crate::ratelimit::LocalRateLimit>)>,
    pub rbac: Vec<(String, std::sync::Arc<crate::rbac::HttpRbac>)>,
    pub jwt: Vec<(String, crate::jwt::JwtPerRoute)>,
    pub ext_authz: Vec<(String, crate::ext_authz::ExtAuthzPerRoute)>,
    /// `CompressorPerRoute` by filter name: whether it turns the filter off.
    pub compressor: Vec<(String, bool)>,
}

impl FilterOverrides {
    pub fn is_empty(&self) -> bool {
        self.fault.is_empty()
            && self.cors.is_empty()
            && self.ratelimit.is_empty()
            && self.rbac.is_empty()
            && self.jwt.is_empty()
            && self.ext_authz.is_empty()
            && self.compressor.is_empty()
    }

    pub fn fault(&self, filter: &str) -> Option<&crate::fault::FaultConfig> {
        find(&self.fault, filter).map(|f| f.as_ref())
    }

    pub fn cors(&self, filter: &str) -> Option<&crate::cors::CorsPolicy> {
        find(&self.cors, filter).map(|f| f.as_ref())
    }

    pub fn ratelimit(&self, filter: &str) -> Option<&crate::ratelimit::LocalRateLimit> {
        find(&self.ratelimit, filter).map(|f| f.as_ref())
    }

    pub fn rbac(&self, filter: &str) -> Option<&crate::rbac::HttpRbac> {
        find(&self.rbac, filter).map(|f| f.as_ref())
    }

    pub fn jwt(&self, filter: &str) -> Option<&crate::jwt::JwtPerRoute> {
        find(&self.jwt, filter)
    }

    pub fn ext_authz(&self, filter: &str) -> Option<&crate::ext_authz::ExtAuthzPerRoute> {
        find(&self.ext_authz, filter)
    }
}

fn find<'a, T>(list: &'a [(String, T)], filter: &str) -> Option<&'a T> {
    list.iter().find(|(n, _)| n == filter).map(|(_, v)| v)
}

impl WeightedClusters {
    /// The entry `roll` picks (or the `header_name` header's value, when it
    /// holds a number); `None` when every weight is zero.
    pub fn pick(&self, roll: u64, headers: &HeaderMap) -> Option<&WeightedCluster> {
        let total: u64 = self.clusters.iter().map(|w| u64::from(w.weight)).sum();
        if total == 0 {
            return self.clusters.first();
        }
        let roll = self
            .random_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(roll);
        let mut point = roll % total;
        for w in &self.clusters {
            if point < u64::from(w.weight) {
                return Some(w);
            }
            point -= u64::from(w.weight);
        }
        self.clusters.last()
    }
}

impl ClusterSpecifier {
    /// Picks the cluster; `roll` is a uniform random number.
    pub fn pick<'a>(&'a self, roll: u64, headers: &'a HeaderMap) -> &'a str {
        match self {
            ClusterSpecifier::Name(n) => n,
            ClusterSpecifier::Header(h) => {
                headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("")
            }
            ClusterSpecifier::Weighted(ws) => ws.pick(roll, headers).map_or("", |w| &w.name),
        }
    }

    /// Picks the cluster, with its weighted-cluster entry when there is one.
    pub fn pick_entry(&self, roll: u64, headers: &HeaderMap) -> (String, Option<&WeightedCluster>) {
        match self {
            ClusterSpecifier::Weighted(ws) => match ws.pick(roll, headers) {
                Some(w) => (w.name.clone(), Some(w)),
                None => (String::new(), None),
            },
            other => (other.pick(roll, headers).to_string(), None),
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
                            out.extend(ws.clusters.iter().map(|w| w.name.as_str()))
                        }
                        ClusterSpecifier::Header(_) => {}
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
    /// Whether the request's virtual host requires TLS the request did not
    /// come over (`require_tls`): `x-forwarded-proto`, as the connection
    /// manager left it, else the connection's scheme, is not `https`.
    pub fn requires_https(
        &self,
        authority: &str,
        headers: &HeaderMap,
        connection_scheme: &str,
    ) -> bool {
        let Some(vh) = self.virtual_host(authority) else {
            return false;
        };
        if vh.require_tls == TlsRequirement::None {
            return false;
        }
        let proto = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(connection_scheme);
        let internal = headers
            .get("x-envoy-internal")
            .is_some_and(|v| v.as_bytes() == b"true");
        vh.redirects_to_https(proto, internal)
    }

    pub fn find_route(&self, host: &str, path: &str, headers: &HeaderMap) -> Option<&Route> {
        self.find_route_rolled(host, path, headers, 0)
    }

    /// [`RouteConfig::find_route`] with the request's random `roll` for the
    /// routes with a `runtime_fraction` (Envoy draws one per request).
    pub fn find_route_rolled(
        &self,
        host: &str,
        path: &str,
        headers: &HeaderMap,
        roll: u64,
    ) -> Option<&Route> {
        let pseudo = Pseudo {
            method: "GET",
            path,
            authority: host,
            scheme: "http",
        };
        self.find_route_for(&pseudo, headers, roll)
    }

    /// The route for a request given by its pseudo-headers (`:authority`
    /// picks the virtual host), its headers and its random `roll`.
    pub fn find_route_for(
        &self,
        pseudo: &Pseudo<'_>,
        headers: &HeaderMap,
        roll: u64,
    ) -> Option<&Route> {
        let vh = self.virtual_host(pseudo.authority)?;
        vh.routes
            .iter()
            .find(|r| r.route_match.matches_pseudo(pseudo, headers, roll))
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
        self.matches_rolled(path_and_query, headers, 0)
    }

    /// [`RouteMatch::matches`] with the request's random `roll`.
    pub fn matches_rolled(&self, path_and_query: &str, headers: &HeaderMap, roll: u64) -> bool {
        let pseudo = Pseudo {
            method: "GET",
            path: path_and_query,
            authority: "",
            scheme: "http",
        };
        self.matches_pseudo(&pseudo, headers, roll)
    }

    /// Matches a request given by its pseudo-headers and headers.
    pub fn matches_pseudo(&self, pseudo: &Pseudo<'_>, headers: &HeaderMap, roll: u64) -> bool {
        let path_and_query = pseudo.path;
        if self.runtime_fraction.is_some_and(|f| !f.hits(roll)) {
            return false;
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        // A CONNECT request has no path: only `connect_matcher` and an
        // empty prefix match it; `connect_matcher` matches nothing else.
        let connect = pseudo.method.eq_ignore_ascii_case("CONNECT");
        let path_ok = match (&self.path, connect) {
            (PathMatch::Connect, c) => c,
            (_, true) => self.path_matches(""),
            (_, false) => self.path_matches(path),
        };
        path_ok
            && self
                .headers
                .iter()
                .all(|h| h.matches_request(headers, Some(pseudo)))
            && self.query_parameters.iter().all(|q| q.matches(query))
            && (!self.grpc || is_grpc(headers))
    }

    /// The path condition alone, on the path without its query (and without
    /// its `;` parameters under `ignore_path_parameters_in_path_matching`).
    pub(crate) fn path_matches(&self, mut path: &str) -> bool {
        if self.ignore_path_parameters
            && let Some((p, _)) = path.split_once(';')
        {
            path = p;
        }
        match &self.path {
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
            PathMatch::Connect => false,
        }
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
                ignore_path_parameters: false,
                case_sensitive: true,
                headers: vec![],
                query_parameters: vec![],
                grpc: false,
                runtime_fraction: None,
            },
            action: RouteAction::DirectResponse {
                status: http::StatusCode::OK,
                body: None,
            },
            request_headers: HeaderMutations::default(),
            response_headers: HeaderMutations::default(),
            fault_overrides: vec![],
            cors: RouteCors::default(),
            ratelimit_overrides: vec![],
            rbac_overrides: vec![],
            jwt_overrides: vec![],
            ext_authz_overrides: vec![],
            compressor_overrides: vec![],
            rate_limits: vec![],
            vhost_rate_limits: Default::default(),
            decorator: None,
            hash_policy: vec![],
            upgrades: vec![],
            connect_terminate: false,
            request_body_buffer_limit: None,
        }
    }

    fn vh(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| DomainMatcher::parse(d)).collect(),
            routes,
            require_tls: TlsRequirement::None,
        }
    }

    #[test]
    fn grpc_timeouts() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_timeout(&h), None);
        for (v, want) in [
            ("2S", Some(Duration::from_secs(2))),
            ("150m", Some(Duration::from_millis(150))),
            ("1H", Some(Duration::from_secs(3600))),
            ("123456789m", None),
            ("5s", None),
            ("m", None),
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&h), want, "{v}");
        }
        let uncapped = GrpcTimeout::default();
        assert_eq!(uncapped.apply(None), None, "no header, no cap: no timeout");
        assert_eq!(
            uncapped.apply(Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        let capped = GrpcTimeout {
            max: Duration::from_secs(1),
            offset: Some(Duration::from_millis(100)),
        };
        assert_eq!(capped.apply(None), Some(Duration::from_secs(1)));
        assert_eq!(
            capped.apply(Some(Duration::from_millis(500))),
            Some(Duration::from_millis(400))
        );
        assert_eq!(
            capped.apply(Some(Duration::from_millis(50))),
            Some(Duration::from_millis(50)),
            "an offset above the timeout is not applied"
        );
        assert_eq!(
            capped.apply(Some(Duration::from_secs(9))),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn virtual_host_priority() {
        let mut rc = RouteConfig {
            name: "r".into(),
            ignore_port_in_host_matching: false,
            validate_clusters: false,
            internal_only_headers: Vec::new(),
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
            internal_only_headers: Vec::new(),
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
            name: HeaderKey::Name(http::HeaderName::from_static("end-user")),
            matcher,
            ignore_case: false,
            invert,
            present,
            treat_missing_as_empty: false,
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
    fn query_values_and_grpc_content_types() {
        assert_eq!(first_query_value("a=1&b&c=&a=2", "a"), Some("1"));
        assert_eq!(first_query_value("a=1&b&c=", "b"), Some(""));
        assert_eq!(first_query_value("a=1&b&c=", "c"), Some(""));
        assert_eq!(first_query_value("a=1", "A"), None);
        let q = |kind| QueryParameterMatcher {
            name: "x".into(),
            kind,
        };
        assert!(q(QueryMatch::PresentMatch(false)).matches(None));
        assert!(q(QueryMatch::PresentMatch(false)).matches(Some("y=1")));
        assert!(!q(QueryMatch::PresentMatch(false)).matches(Some("x")));
        assert!(!q(QueryMatch::Present).matches(Some("y=1")));
        let ct = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, v.parse().unwrap());
            is_grpc(&h)
        };
        assert!(ct("application/grpc"));
        assert!(ct("application/grpc+proto"));
        assert!(ct("application/grpc;charset=utf-8"));
        assert!(!ct("application/grpc-web"));
        assert!(!ct("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
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
        let spec = ClusterSpecifier::Weighted(WeightedClusters {
            clusters: vec![
                WeightedCluster {
                    name: "a".into(),
                    weight: 25,
                    ..Default::default()
                },
                WeightedCluster {
                    name: "b".into(),
                    weight: 75,
                    ..Default::default()
                },
            ],
            random_header: Some(http::HeaderName::from_static("x-roll")),
        });
        let mut h = HeaderMap::new();
        let a = (0..100).filter(|r| spec.pick(*r, &h) == "a").count();
        assert_eq!(a, 25);
        // `header_name`: the header's number is the roll.
        h.insert("x-roll", "24".parse().unwrap());
        assert_eq!(spec.pick(99, &h), "a");
        h.insert("x-roll", "25".parse().unwrap());
        assert_eq!(spec.pick(0, &h), "b");
        h.insert("x-roll", "many".parse().unwrap());
        assert_eq!(spec.pick(0, &h), "a", "not a number: the random roll");
    }
}
