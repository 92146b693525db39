//! `envoy.filters.http.local_ratelimit`: a token bucket per configuration
//! (the filter's, or a route's override); the decision per request, as
//! Envoy's filter takes it: `filter_enabled` decides whether the request
//! counts at all, a token is taken, and `filter_enforced` decides whether a
//! request without a token is refused or only marked.

use std::net::IpAddr;

use ferry_model::Pseudo;
use ferry_model::ratelimit::{
    LocalRateLimit, RateLimitAction, RateLimitPolicy, TokenBucket, VhRateLimits,
};
use http::HeaderMap;

/// The entries of one request descriptor.
pub type Entries = Vec<(String, String)>;

/// What the route's rate limit actions read of a request.
pub struct RequestInfo<'a> {
    pub pseudo: Pseudo<'a>,
    pub headers: &'a HeaderMap,
    pub remote: IpAddr,
    /// The route's cluster.
    pub cluster: &'a str,
}

/// The request's descriptors from the route's and virtual host's
/// `rate_limits` of the filter's stage (the virtual host's as
/// `vh_rate_limits` says).
pub fn descriptors(
    cfg: &LocalRateLimit,
    route: &[RateLimitPolicy],
    vhost: &[RateLimitPolicy],
    req: &RequestInfo<'_>,
) -> Vec<Entries> {
    if cfg.descriptors.is_empty() {
        return Vec::new();
    }
    let vhost = match cfg.vh_rate_limits {
        VhRateLimits::Override if route.is_empty() => vhost,
        VhRateLimits::Include => vhost,
        _ => &[],
    };
    route
        .iter()
        .chain(vhost)
        .filter(|p| p.stage == cfg.stage)
        .filter_map(|p| descriptor(p, req))
        .collect()
}

/// `ip` masked to a prefix, as a CIDR (`10.1.2.0/24`).
fn masked(ip: IpAddr, v4_len: u8, v6_len: u8) -> String {
    match ip {
        IpAddr::V4(a) => {
            let len = v4_len.min(32);
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let net = std::net::Ipv4Addr::from(u32::from(a) & mask);
            format!("{net}/{len}")
        }
        IpAddr::V6(a) => {
            let len = v6_len.min(128);
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            let net = std::net::Ipv6Addr::from(u128::from(a) & mask);
            format!("{net}/{len}")
        }
    }
}

/// One policy's descriptor; `None` when an action cannot produce its entry.
fn descriptor(p: &RateLimitPolicy, req: &RequestInfo<'_>) -> Option<Entries> {
    let mut out = Vec::with_capacity(p.actions.len());
    for a in &p.actions {
        match a {
            RateLimitAction::RemoteAddress => {
                out.push(("remote_address".into(), req.remote.to_string()));
            }
            RateLimitAction::DestinationCluster => {
                out.push(("destination_cluster".into(), req.cluster.to_string()));
            }
            RateLimitAction::GenericKey { key, value } => out.push((key.clone(), value.clone())),
            RateLimitAction::MaskedRemoteAddress { v4_len, v6_len } => {
                out.push((
                    "masked_remote_address".into(),
                    masked(req.remote, *v4_len, *v6_len),
                ));
            }
            RateLimitAction::QueryParameter {
                name,
                key,
                skip_if_absent,
            } => {
                let query = req.pseudo.path.split_once('?').map(|(_, q)| q);
                match query.and_then(|q| ferry_model::route::first_query_value(q, name)) {
                    Some(v) => out.push((key.clone(), v.to_string())),
                    None if *skip_if_absent => {}
                    None => return None,
                }
            }
            RateLimitAction::QueryParameterValueMatch {
                key,
                value,
                expect_match,
                matchers,
            } => {
                let query = req.pseudo.path.split_once('?').map(|(_, q)| q);
                if matchers.iter().all(|m| m.matches(query)) != *expect_match {
                    return None;
                }
                out.push((key.clone(), value.clone()));
            }
            RateLimitAction::RequestHeaders {
                header,
                key,
                skip_if_absent,
            } => {
                let value = match header {
                    ferry_model::HeaderKey::Name(n) => req
                        .headers
                        .get(n)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    ferry_model::HeaderKey::Method => Some(req.pseudo.method.to_string()),
                    ferry_model::HeaderKey::Path => Some(req.pseudo.path.to_string()),
                    ferry_model::HeaderKey::Authority => Some(req.pseudo.authority.to_string()),
                    ferry_model::HeaderKey::Scheme => Some(req.pseudo.scheme.to_string()),
                };
                match value {
                    Some(v) => out.push((key.clone(), v)),
                    None if *skip_if_absent => {}
                    None => return None,
                }
            }
            RateLimitAction::HeaderValueMatch {
                key,
                value,
                expect_match,
                headers,
            } => {
                let all = headers
                    .iter()
                    .all(|h| h.matches_request(req.headers, Some(&req.pseudo)));
                if all != *expect_match {
                    return None;
                }
                out.push((key.clone(), value.clone()));
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The filter is not enabled for this request.
    Disabled,
    /// A token was taken.
    Allowed,
    /// No token, but not enforced: the request goes on.
    LimitedNotEnforced,
    /// No token: answer with the configured status.
    Limited,
}

/// Buckets shaped like a configuration's, for one downstream connection
/// (`local_rate_limit_per_downstream_connection`).
#[derive(Debug)]
pub struct BucketSet {
    pub default: Option<TokenBucket>,
    /// In the order of the configuration's descriptors.
    pub descriptors: Vec<TokenBucket>,
}

impl BucketSet {
    pub fn like(cfg: &LocalRateLimit) -> Self {
        BucketSet {
            default: cfg.bucket.as_ref().map(TokenBucket::fresh),
            descriptors: cfg.descriptors.iter().map(|d| d.bucket.fresh()).collect(),
        }
    }

    /// Whether these buckets still have the configuration's shapes.
    pub fn fits(&self, cfg: &LocalRateLimit) -> bool {
        let same = |a: &TokenBucket, b: &TokenBucket| {
            a.max_tokens == b.max_tokens
                && a.tokens_per_fill == b.tokens_per_fill
                && a.fill_interval == b.fill_interval
        };
        self.default.is_some() == cfg.bucket.is_some()
            && self
                .default
                .iter()
                .zip(cfg.bucket.iter())
                .all(|(a, b)| same(a, b))
            && self.descriptors.len() == cfg.descriptors.len()
            && self
                .descriptors
                .iter()
                .zip(&cfg.descriptors)
                .all(|(a, d)| same(a, &d.bucket))
    }
}

/// `requested`: the request's descriptors; `own`: the connection's buckets
/// when they are per connection; `rolls`: two uniform random numbers
/// (enabled, enforced).
///
/// The configured descriptors the request carries are taken from first,
/// the slowest-filling first, as Envoy does; the filter's own bucket then
/// too unless a descriptor matched and `always_consume_default_token_bucket`
/// is off. Also returns the bucket the X-RateLimit headers describe: the one
/// that refused, else the first matched descriptor's, else the filter's.
pub fn decide<'c>(
    cfg: &'c LocalRateLimit,
    own: Option<&'c BucketSet>,
    requested: &[Entries],
    rolls: (u64, u64),
) -> (Decision, Option<&'c TokenBucket>) {
    if !cfg.filter_enabled.hits(rolls.0) {
        return (Decision::Disabled, None);
    }
    let default = match own {
        Some(set) => set.default.as_ref(),
        None => cfg.bucket.as_ref(),
    };
    let mut matched: Vec<&TokenBucket> = cfg
        .descriptors
        .iter()
        .enumerate()
        .filter(|(_, d)| requested.contains(&d.entries))
        .filter_map(|(i, d)| match own {
            Some(set) => set.descriptors.get(i),
            None => Some(&d.bucket),
        })
        .collect();
    matched.sort_by(|a, b| a.fill_rate().total_cmp(&b.fill_rate()));
    let mut shown = matched.first().copied().or(default);
    let mut allowed = true;
    for b in &matched {
        if !b.try_acquire() {
            allowed = false;
            shown = Some(b);
            break;
        }
    }
    if allowed
        && (matched.is_empty() || cfg.always_consume_default)
        && let Some(b) = default
        && !b.try_acquire()
    {
        allowed = false;
        shown = Some(b);
    }
    let decision = if allowed {
        Decision::Allowed
    } else if cfg.filter_enforced.hits(rolls.1) {
        Decision::Limited
    } else {
        Decision::LimitedNotEnforced
    };
    (decision, shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::Fraction;
    use ferry_model::ratelimit::TokenBucket;
    use std::time::Duration;

    fn cfg(enabled: u32, enforced: u32) -> LocalRateLimit {
        let pct = |n| Fraction {
            numerator: n,
            denominator: 100,
        };
        LocalRateLimit {
            stat_prefix: "rl".into(),
            status: http::StatusCode::TOO_MANY_REQUESTS,
            bucket: Some(TokenBucket::new(2, 1, Duration::from_secs(3600))),
            filter_enabled: pct(enabled),
            filter_enforced: pct(enforced),
            response_headers: Default::default(),
            request_headers_when_not_enforced: Default::default(),
            grpc_resource_exhausted: false,
            descriptors: Vec::new(),
            stage: 0,
            always_consume_default: true,
            vh_rate_limits: Default::default(),
            x_ratelimit_headers: false,
            per_connection: false,
        }
    }

    #[test]
    fn descriptors_take_their_own_bucket_and_the_default_one() {
        use ferry_model::ratelimit::Descriptor;
        let mut c = cfg(100, 100);
        c.bucket = Some(TokenBucket::new(3, 1, Duration::from_secs(3600)));
        let page = vec![("header_match".to_string(), "page".to_string())];
        c.descriptors.push(Descriptor {
            entries: page.clone(),
            bucket: TokenBucket::new(1, 1, Duration::from_secs(3600)),
        });
        let req = vec![page];
        assert_eq!(decide(&c, None, &req, (0, 0)).0, Decision::Allowed);
        // The descriptor's bucket is empty now; the default one gave one of
        // its three and keeps the other two.
        assert_eq!(decide(&c, None, &req, (0, 0)).0, Decision::Limited);
        assert_eq!(decide(&c, None, &[], (0, 0)).0, Decision::Allowed);
        assert_eq!(decide(&c, None, &[], (0, 0)).0, Decision::Allowed);
        assert_eq!(decide(&c, None, &[], (0, 0)).0, Decision::Limited);
    }

    #[test]
    fn query_parameter_actions() {
        let policy = RateLimitPolicy {
            stage: 0,
            actions: vec![RateLimitAction::QueryParameter {
                name: "tenant".into(),
                key: "t".into(),
                skip_if_absent: false,
            }],
        };
        let headers = HeaderMap::new();
        let info = |path| RequestInfo {
            pseudo: Pseudo {
                method: "GET",
                path,
                authority: "x",
                scheme: "http",
            },
            headers: &headers,
            remote: "127.0.0.1".parse().unwrap(),
            cluster: "c",
        };
        assert_eq!(
            descriptor(&policy, &info("/a?x=1&tenant=t1&tenant=t2")),
            Some(vec![("t".to_string(), "t1".to_string())])
        );
        assert_eq!(descriptor(&policy, &info("/a")), None);
        let matching = RateLimitPolicy {
            stage: 0,
            actions: vec![RateLimitAction::QueryParameterValueMatch {
                key: "query_match".into(),
                value: "debug".into(),
                expect_match: true,
                matchers: vec![ferry_model::QueryParameterMatcher {
                    name: "debug".into(),
                    kind: ferry_model::QueryMatch::String {
                        matcher: ferry_model::StringMatcher::Exact("1".into()),
                        ignore_case: false,
                    },
                }],
            }],
        };
        assert_eq!(
            descriptor(&matching, &info("/a?debug=1")),
            Some(vec![("query_match".to_string(), "debug".to_string())])
        );
        assert_eq!(descriptor(&matching, &info("/a?debug=0")), None);
    }

    #[test]
    fn masks() {
        assert_eq!(masked("10.1.2.3".parse().unwrap(), 24, 128), "10.1.2.0/24");
        assert_eq!(masked("10.1.2.3".parse().unwrap(), 32, 128), "10.1.2.3/32");
        assert_eq!(masked("10.1.2.3".parse().unwrap(), 0, 128), "0.0.0.0/0");
        assert_eq!(
            masked("2001:db8::1".parse().unwrap(), 32, 64),
            "2001:db8::/64"
        );
    }

    #[test]
    fn per_connection_buckets_are_separate() {
        let c = cfg(100, 100);
        let (a, b) = (BucketSet::like(&c), BucketSet::like(&c));
        assert!(a.fits(&c));
        let d = |set| decide(&c, Some(set), &[], (0, 0)).0;
        assert_eq!(
            [d(&a), d(&a), d(&a)],
            [Decision::Allowed, Decision::Allowed, Decision::Limited]
        );
        assert_eq!(d(&b), Decision::Allowed);
        // The configuration's own bucket was never touched.
        assert_eq!(decide(&c, None, &[], (0, 0)).0, Decision::Allowed);
    }

    #[test]
    fn tokens_then_limited() {
        let c = cfg(100, 100);
        let got: Vec<_> = (0..3).map(|_| decide(&c, None, &[], (0, 0)).0).collect();
        assert_eq!(
            got,
            [Decision::Allowed, Decision::Allowed, Decision::Limited]
        );
        let shadow = cfg(100, 0);
        let got: Vec<_> = (0..3)
            .map(|_| decide(&shadow, None, &[], (0, 0)).0)
            .collect();
        assert_eq!(got[2], Decision::LimitedNotEnforced);
        // Disabled (Envoy's default of 0 %) takes no token.
        let off = cfg(0, 100);
        assert!((0..5).all(|_| decide(&off, None, &[], (0, 0)).0 == Decision::Disabled));
    }
}
