//! `envoy.filters.http.local_ratelimit`: a token bucket per configuration
//! (the filter's, or a route's override); the decision per request, as
//! Envoy's filter takes it: `filter_enabled` decides whether the request
//! counts at all, a token is taken, and `filter_enforced` decides whether a
//! request without a token is refused or only marked.

use ferry_model::ratelimit::LocalRateLimit;

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

/// `rolls`: two uniform random numbers (enabled, enforced).
pub fn decide(cfg: &LocalRateLimit, rolls: (u64, u64)) -> Decision {
    if !cfg.filter_enabled.hits(rolls.0) {
        return Decision::Disabled;
    }
    if cfg.bucket.as_ref().is_none_or(|b| b.try_acquire()) {
        return Decision::Allowed;
    }
    if cfg.filter_enforced.hits(rolls.1) {
        Decision::Limited
    } else {
        Decision::LimitedNotEnforced
    }
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
        }
    }

    #[test]
    fn tokens_then_limited() {
        let c = cfg(100, 100);
        let got: Vec<_> = (0..3).map(|_| decide(&c, (0, 0))).collect();
        assert_eq!(
            got,
            [Decision::Allowed, Decision::Allowed, Decision::Limited]
        );
        let shadow = cfg(100, 0);
        let got: Vec<_> = (0..3).map(|_| decide(&shadow, (0, 0))).collect();
        assert_eq!(got[2], Decision::LimitedNotEnforced);
        // Disabled (Envoy's default of 0 %) takes no token.
        let off = cfg(0, 100);
        assert!((0..5).all(|_| decide(&off, (0, 0)) == Decision::Disabled));
    }
}
