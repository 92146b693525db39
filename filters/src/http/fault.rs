//! `envoy.filters.http.fault`: deciding, per request, whether to inject a
//! delay and/or an abort, as Envoy's fault filter does. The decision is a
//! pure function of the configuration, the request headers, the route's
//! cluster and random rolls; the proxy sleeps and answers accordingly.
//!
//! Header-controlled faults (`x-envoy-fault-*`) are honoured only when the
//! configuration asks for them (`header_delay` / `header_abort`), and their
//! percentage headers can lower, never raise, the configured percentage.

use std::time::Duration;

use ferry_model::Fraction;
use ferry_model::fault::{AbortSource, DelaySource, FaultConfig};
use http::HeaderMap;

pub const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
pub const DELAY_PERCENT_HEADER: &str = "x-envoy-fault-delay-request-percentage";
pub const ABORT_HEADER: &str = "x-envoy-fault-abort-request";
pub const ABORT_GRPC_HEADER: &str = "x-envoy-fault-abort-grpc-request";
pub const ABORT_PERCENT_HEADER: &str = "x-envoy-fault-abort-request-percentage";
/// The header Envoy reads the caller's node name from (`downstream_nodes`).
pub const DOWNSTREAM_NODE_HEADER: &str = "x-envoy-downstream-service-node";

/// The body of an injected abort, as Envoy writes it.
pub const ABORT_BODY: &str = "fault filter abort";

/// An injected abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// Answer with this HTTP status.
    Http(u16),
    /// Answer a gRPC trailers-only response with this `grpc-status`.
    Grpc(u32),
}

/// Whether the filter applies to the request at all (header matchers,
/// upstream cluster, downstream nodes); pseudo-header matchers see nothing.
pub fn applies(cfg: &FaultConfig, headers: &HeaderMap, cluster: &str) -> bool {
    applies_to(cfg, headers, None, cluster)
}

/// [`applies`] with the request's pseudo-headers for the matchers that
/// read them (`:method`, `:path`, `:authority`).
pub fn applies_to(
    cfg: &FaultConfig,
    headers: &HeaderMap,
    pseudo: Option<&ferry_model::Pseudo<'_>>,
    cluster: &str,
) -> bool {
    if cfg
        .upstream_cluster
        .as_deref()
        .is_some_and(|c| c != cluster)
    {
        return false;
    }
    if !cfg.downstream_nodes.is_empty() {
        let node = headers
            .get(DOWNSTREAM_NODE_HEADER)
            .and_then(|v| v.to_str().ok());
        if !node.is_some_and(|n| cfg.downstream_nodes.iter().any(|d| d == n)) {
            return false;
        }
    }
    cfg.headers
        .iter()
        .all(|h| h.matches_request(headers, pseudo))
}

/// The configured percentage, lowered by the percentage header when the
/// fault is header-controlled (Envoy's `HeaderPercentageProvider`: the
/// header is a numerator over the configured denominator, capped by the
/// configured numerator).
fn percentage(
    configured: Fraction,
    headers: &HeaderMap,
    header: &str,
    from_header: bool,
) -> Fraction {
    if !from_header {
        return configured;
    }
    match headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        Some(n) => Fraction {
            numerator: n.min(configured.numerator),
            denominator: configured.denominator,
        },
        None => configured,
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The delay to inject, if any; `roll` is a uniform random number.
pub fn delay(cfg: &FaultConfig, headers: &HeaderMap, roll: u64) -> Option<Duration> {
    let d = cfg.delay.as_ref()?;
    let from_header = d.source == DelaySource::Header;
    let duration = match &d.source {
        DelaySource::Fixed(t) => *t,
        DelaySource::Header => Duration::from_millis(header_u64(headers, DELAY_HEADER)?),
    };
    percentage(d.percentage, headers, DELAY_PERCENT_HEADER, from_header)
        .hits(roll)
        .then_some(duration)
}

/// The abort to inject, if any; `roll` is a uniform random number.
pub fn abort(cfg: &FaultConfig, headers: &HeaderMap, roll: u64) -> Option<Abort> {
    let a = cfg.abort.as_ref()?;
    let from_header = a.source == AbortSource::Header;
    let what = match &a.source {
        AbortSource::Http(s) => Abort::Http(*s),
        AbortSource::Grpc(s) => Abort::Grpc(*s),
        AbortSource::Header => {
            // An HTTP status outside [200, 600) in the header is ignored.
            match header_u64(headers, ABORT_HEADER) {
                Some(s) if (200..600).contains(&s) => Abort::Http(s as u16),
                _ => Abort::Grpc(u32::try_from(header_u64(headers, ABORT_GRPC_HEADER)?).ok()?),
            }
        }
    };
    percentage(a.percentage, headers, ABORT_PERCENT_HEADER, from_header)
        .hits(roll)
        .then_some(what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::fault::{FaultAbort, FaultDelay};
    use ferry_model::{HeaderMatcher, StringMatcher};

    fn pct(n: u32) -> Fraction {
        Fraction {
            numerator: n,
            denominator: 100,
        }
    }

    fn hdrs(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn fixed_delay_and_abort_follow_percentages() {
        let cfg = FaultConfig {
            delay: Some(FaultDelay {
                source: DelaySource::Fixed(Duration::from_millis(300)),
                percentage: pct(100),
            }),
            abort: Some(FaultAbort {
                source: AbortSource::Http(503),
                percentage: pct(30),
            }),
            ..Default::default()
        };
        let h = HeaderMap::new();
        assert_eq!(delay(&cfg, &h, 7), Some(Duration::from_millis(300)));
        let aborted = (0..1000).filter(|r| abort(&cfg, &h, *r).is_some()).count();
        assert_eq!(aborted, 300);
        assert_eq!(abort(&cfg, &h, 0), Some(Abort::Http(503)));
        // Fault headers do nothing without header_abort / header_delay.
        let h = hdrs(&[(ABORT_HEADER, "418"), (ABORT_PERCENT_HEADER, "0")]);
        assert_eq!(abort(&cfg, &h, 0), Some(Abort::Http(503)));
    }

    #[test]
    fn header_controlled_faults() {
        let cfg = FaultConfig {
            delay: Some(FaultDelay {
                source: DelaySource::Header,
                percentage: pct(50),
            }),
            abort: Some(FaultAbort {
                source: AbortSource::Header,
                percentage: pct(100),
            }),
            ..Default::default()
        };
        assert_eq!(delay(&cfg, &HeaderMap::new(), 0), None);
        assert_eq!(abort(&cfg, &HeaderMap::new(), 0), None);
        let h = hdrs(&[(DELAY_HEADER, "200"), (ABORT_HEADER, "429")]);
        assert_eq!(delay(&cfg, &h, 10), Some(Duration::from_millis(200)));
        assert_eq!(delay(&cfg, &h, 60), None);
        assert_eq!(abort(&cfg, &h, 99), Some(Abort::Http(429)));
        // The percentage header lowers the configured percentage...
        let h = hdrs(&[(ABORT_HEADER, "429"), (ABORT_PERCENT_HEADER, "10")]);
        assert_eq!(abort(&cfg, &h, 9), Some(Abort::Http(429)));
        assert_eq!(abort(&cfg, &h, 10), None);
        // ...and never raises it.
        let h = hdrs(&[(DELAY_HEADER, "5"), (DELAY_PERCENT_HEADER, "100")]);
        assert_eq!(delay(&cfg, &h, 60), None);
        let h = hdrs(&[(ABORT_GRPC_HEADER, "14")]);
        assert_eq!(abort(&cfg, &h, 0), Some(Abort::Grpc(14)));
        let h = hdrs(&[(ABORT_HEADER, "700")]);
        assert_eq!(abort(&cfg, &h, 0), None);
    }

    #[test]
    fn applies_only_to_matching_requests() {
        let cfg = FaultConfig {
            headers: vec![HeaderMatcher {
                name: http::HeaderName::from_static("end-user").into(),
                matcher: Some(StringMatcher::Exact("jason".into())),
                ignore_case: false,
                invert: false,
                present: true,
                treat_missing_as_empty: false,
            }],
            upstream_cluster: Some("ratings".into()),
            ..Default::default()
        };
        let jason = hdrs(&[("end-user", "jason")]);
        assert!(applies(&cfg, &jason, "ratings"));
        assert!(!applies(&cfg, &jason, "reviews"));
        assert!(!applies(&cfg, &HeaderMap::new(), "ratings"));
        let cfg = FaultConfig {
            downstream_nodes: vec!["web".into()],
            ..Default::default()
        };
        assert!(applies(
            &cfg,
            &hdrs(&[(DOWNSTREAM_NODE_HEADER, "web")]),
            "c"
        ));
        assert!(!applies(&cfg, &HeaderMap::new(), "c"));
    }
}
