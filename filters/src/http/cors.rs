//! `envoy.filters.http.cors`: answers CORS preflight requests itself and adds
//! `access-control-allow-origin` (and friends) to the responses of allowed
//! cross-origin requests, with the route's policies as Envoy reads them —
//! each setting from the most specific policy that has it (route, then
//! virtual host), `filter_enabled` and `shadow_enabled` from the most
//! specific policy of all.

use ferry_model::cors::CorsPolicy;
use http::{HeaderMap, HeaderValue, Method};

const ALLOW_ORIGIN: &str = "access-control-allow-origin";
const ALLOW_CREDENTIALS: &str = "access-control-allow-credentials";
const ALLOW_METHODS: &str = "access-control-allow-methods";
const ALLOW_HEADERS: &str = "access-control-allow-headers";
const MAX_AGE: &str = "access-control-max-age";
const EXPOSE_HEADERS: &str = "access-control-expose-headers";
const ALLOW_PRIVATE_NETWORK: &str = "access-control-allow-private-network";

/// What the filter decided for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not a CORS request for this filter: nothing to do.
    Pass,
    /// A preflight to answer directly with 200 and these headers.
    Preflight(HeaderMap),
    /// An allowed cross-origin request: its response gets these headers.
    Simple(HeaderMap),
    /// A preflight from an origin that is not allowed, with
    /// `forward_not_matching_preflights: false`: answered here, as Envoy
    /// does, with the policy's methods, headers, max-age and credentials
    /// but no `access-control-allow-origin`.
    Refused(HeaderMap),
}

/// Counters the decision moved (`origin_valid`, `origin_invalid`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub origin_valid: bool,
    pub origin_invalid: bool,
}

/// The most specific policy that sets a value.
fn first<'a, T>(policies: &[&'a CorsPolicy], f: impl Fn(&'a CorsPolicy) -> Option<T>) -> Option<T> {
    policies.iter().find_map(|p| f(p))
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Decides for one request; `rolls` are two uniform random numbers (for
/// `filter_enabled` and `shadow_enabled`).
pub fn decide(
    policies: &[&CorsPolicy],
    method: &Method,
    headers: &HeaderMap,
    rolls: (u64, u64),
) -> (Decision, Stats) {
    let mut stats = Stats::default();
    let Some(top) = policies.first() else {
        return (Decision::Pass, stats);
    };
    let enabled = top.filter_enabled.is_none_or(|f| f.hits(rolls.0));
    let shadow = top.shadow_enabled.is_some_and(|f| f.hits(rolls.1));
    if !enabled && !shadow {
        return (Decision::Pass, stats);
    }
    let Some(origin) = headers.get(http::header::ORIGIN).filter(|o| !o.is_empty()) else {
        return (Decision::Pass, stats);
    };
    let allowed = first(policies, |p| {
        (!p.allow_origins.is_empty()).then_some(&p.allow_origins)
    })
    .is_some_and(|matchers| {
        let origin = origin.to_str().unwrap_or_default();
        matchers
            .iter()
            .any(|(m, ic)| m.matches("*", *ic) || m.matches(origin, *ic))
    });
    let preflight = method == Method::OPTIONS
        && headers
            .get("access-control-request-method")
            .is_some_and(|v| !v.is_empty());
    if !allowed {
        stats.origin_invalid = true;
        let forward = first(policies, |p| p.forward_not_matching_preflights).unwrap_or(true);
        if enabled && preflight && !forward {
            let mut out = HeaderMap::new();
            preflight_headers(policies, headers, &mut out);
            return (Decision::Refused(out), stats);
        }
        return (Decision::Pass, stats);
    }
    stats.origin_valid = true;
    if !enabled {
        return (Decision::Pass, stats);
    }
    let mut out = HeaderMap::new();
    out.insert(ALLOW_ORIGIN, origin.clone());
    if preflight {
        preflight_headers(policies, headers, &mut out);
    } else {
        credentials(policies, &mut out);
    }
    // A preflight answer goes back through the filter's response side too,
    // which adds the exposed headers, as in Envoy.
    put(
        &mut out,
        EXPOSE_HEADERS,
        first(policies, |p| non_empty(&p.expose_headers)),
    );
    if preflight {
        (Decision::Preflight(out), stats)
    } else {
        (Decision::Simple(out), stats)
    }
}

fn put(out: &mut HeaderMap, name: &'static str, v: Option<&str>) {
    if let Some(v) = v
        && let Ok(v) = HeaderValue::from_str(v)
    {
        out.insert(name, v);
    }
}

fn credentials(policies: &[&CorsPolicy], out: &mut HeaderMap) {
    if first(policies, |p| p.allow_credentials).unwrap_or(false) {
        out.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
}

/// What a preflight answer carries besides the origin and exposed headers.
fn preflight_headers(policies: &[&CorsPolicy], request: &HeaderMap, out: &mut HeaderMap) {
    credentials(policies, out);
    put(
        out,
        ALLOW_METHODS,
        first(policies, |p| non_empty(&p.allow_methods)),
    );
    put(
        out,
        ALLOW_HEADERS,
        first(policies, |p| non_empty(&p.allow_headers)),
    );
    put(out, MAX_AGE, first(policies, |p| non_empty(&p.max_age)));
    let private = first(policies, |p| p.allow_private_network_access).unwrap_or(false);
    if private
        && request
            .get("access-control-request-private-network")
            .is_some_and(|v| v == "true")
    {
        put(out, ALLOW_PRIVATE_NETWORK, Some("true"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{Fraction, StringMatcher};

    fn policy() -> CorsPolicy {
        CorsPolicy {
            allow_origins: vec![(StringMatcher::Suffix(".example.com".into()), false)],
            allow_methods: "GET,POST".into(),
            allow_headers: "x-a".into(),
            expose_headers: "x-b".into(),
            max_age: "600".into(),
            allow_credentials: Some(true),
            ..Default::default()
        }
    }

    fn req(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn preflight_and_simple() {
        let p = policy();
        let pre = req(&[
            ("origin", "https://a.example.com"),
            ("access-control-request-method", "POST"),
        ]);
        let (d, s) = decide(&[&p], &Method::OPTIONS, &pre, (0, 0));
        let Decision::Preflight(h) = d else {
            panic!("{d:?}")
        };
        assert!(s.origin_valid);
        assert_eq!(h[ALLOW_ORIGIN], "https://a.example.com");
        assert_eq!(h[ALLOW_METHODS], "GET,POST");
        assert_eq!(h[ALLOW_HEADERS], "x-a");
        assert_eq!(h[MAX_AGE], "600");
        assert_eq!(h[ALLOW_CREDENTIALS], "true");
        assert_eq!(h[EXPOSE_HEADERS], "x-b");

        let simple = req(&[("origin", "https://a.example.com")]);
        let (d, _) = decide(&[&p], &Method::GET, &simple, (0, 0));
        let Decision::Simple(h) = d else {
            panic!("{d:?}")
        };
        assert_eq!(h[EXPOSE_HEADERS], "x-b");
        assert!(h.get(ALLOW_METHODS).is_none());
    }

    #[test]
    fn refused_origin_disabled_policy_and_fallback() {
        let p = policy();
        let other = req(&[("origin", "https://evil.org")]);
        let (d, s) = decide(&[&p], &Method::GET, &other, (0, 0));
        assert_eq!(d, Decision::Pass);
        assert!(s.origin_invalid);
        // A shadow-only policy counts but changes nothing.
        let shadow = CorsPolicy {
            filter_enabled: Some(Fraction {
                numerator: 0,
                denominator: 100,
            }),
            shadow_enabled: Some(Fraction::ALL),
            ..policy()
        };
        let ok = req(&[("origin", "https://a.example.com")]);
        let (d, s) = decide(&[&shadow], &Method::GET, &ok, (0, 0));
        assert_eq!(d, Decision::Pass);
        assert!(s.origin_valid);
        // Settings the route lacks come from the virtual host.
        let route = CorsPolicy {
            allow_origins: vec![(StringMatcher::Exact("*".into()), false)],
            ..Default::default()
        };
        let (d, _) = decide(&[&route, &p], &Method::GET, &other, (0, 0));
        let Decision::Simple(h) = d else {
            panic!("{d:?}")
        };
        assert_eq!(h[ALLOW_ORIGIN], "https://evil.org");
        assert_eq!(h[EXPOSE_HEADERS], "x-b");
        // Refused preflights are answered without the origin.
        let strict = CorsPolicy {
            forward_not_matching_preflights: Some(false),
            ..policy()
        };
        let pre = req(&[
            ("origin", "https://evil.org"),
            ("access-control-request-method", "GET"),
        ]);
        let (d, _) = decide(&[&strict], &Method::OPTIONS, &pre, (0, 0));
        let Decision::Refused(h) = d else {
            panic!("{d:?}")
        };
        assert!(h.get(ALLOW_ORIGIN).is_none());
        assert_eq!(h[ALLOW_METHODS], "GET,POST");
    }
}
