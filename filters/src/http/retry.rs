//! The router's retry decisions (`RouteAction.retry_policy`), as Envoy's
//! `RetryStateImpl` makes them: which outcomes of an attempt are retried
//! under which `retry_on` conditions, and the jittered exponential back-off
//! before the next attempt. Pure functions; the proxy owns the attempts.

use std::time::Duration;

use ferry_model::RetryPolicy;
use http::HeaderMap;

/// How one upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived with this status (and `grpc-status`, if the
    /// headers carried one: a trailers-only gRPC answer).
    Response {
        status: u16,
        grpc_status: Option<u32>,
        /// The response carries `x-envoy-ratelimited`.
        ratelimited: bool,
        /// The response matches one of the policy's `retriable_headers`.
        retriable_header: bool,
    },
    /// The connection could not be established (refused, timed out).
    ConnectFailure,
    /// The connection or stream went away before the response headers.
    Reset,
    /// The upstream refused the HTTP/2 stream (REFUSED_STREAM).
    RefusedStream,
    /// The attempt ran out of its per-try timeout.
    PerTryTimeout,
}

impl Outcome {
    /// The outcome of response headers, under `policy` (whose
    /// `retriable_headers` the headers are checked against).
    pub fn from_response(status: u16, headers: &HeaderMap, policy: Option<&RetryPolicy>) -> Self {
        let grpc_status = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let retriable_header = policy.is_some_and(|p| {
            p.retry_on.retriable_headers && p.retriable_headers.iter().any(|m| m.matches(headers))
        });
        Outcome::Response {
            status,
            grpc_status,
            ratelimited: headers.contains_key("x-envoy-ratelimited"),
            retriable_header,
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep the outcome: it is not retriable under the policy.
    Done,
    /// Retry after the back-off.
    RetryWithBackoff,
    /// Retry at once (a refused stream never reached the application).
    RetryImmediately,
}

/// Whether `outcome` is retriable under `policy` (retries left are the
/// caller's business).
pub fn decide(policy: &RetryPolicy, outcome: Outcome) -> Decision {
    let on = &policy.retry_on;
    match outcome {
        Outcome::Response {
            status,
            grpc_status,
            ratelimited,
            retriable_header,
        } => {
            let http = (on.server_error && status >= 500)
                || (on.envoy_ratelimited && ratelimited)
                || retriable_header
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_4xx && status == 409)
                || (on.retriable_status_codes && policy.retriable_status_codes.contains(&status));
            let grpc = match grpc_status {
                Some(1) => on.grpc_cancelled,
                Some(4) => on.grpc_deadline_exceeded,
                Some(8) => on.grpc_resource_exhausted,
                Some(13) => on.grpc_internal,
                Some(14) => on.grpc_unavailable,
                _ => false,
            };
            if http || grpc {
                Decision::RetryWithBackoff
            } else {
                Decision::Done
            }
        }
        // Envoy treats every reset, connect failures and per-try timeouts
        // included, as retriable under `5xx`, `gateway-error` and `reset`.
        _ if on.server_error || on.gateway_error || on.reset => Decision::RetryWithBackoff,
        Outcome::ConnectFailure if on.connect_failure || on.reset_before_request => {
            Decision::RetryWithBackoff
        }
        Outcome::RefusedStream if on.refused_stream => Decision::RetryImmediately,
        _ => Decision::Done,
    }
}

/// The back-off before retry number `retry` (1 for the first retry): a
/// uniform pick in `[0, (2^retry - 1) × base)`, capped at the maximum, as
/// Envoy's `JitteredExponentialBackOffStrategy` (with the default 25 ms
/// base: 0–24 ms, 0–74 ms, 0–174 ms, …, at most 250 ms).
pub fn backoff(policy: &RetryPolicy, retry: u32, roll: u64) -> Duration {
    let base = u64::try_from(policy.backoff_base.as_millis()).unwrap_or(u64::MAX);
    let max = u64::try_from(policy.backoff_max.as_millis()).unwrap_or(u64::MAX);
    let multiplier = 1u64
        .checked_shl(retry.min(62))
        .map_or(u64::MAX, |m| m - 1)
        .max(1);
    let ceiling = base.saturating_mul(multiplier).max(1);
    Duration::from_millis((roll % ceiling).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::RetryOn;

    fn policy(retry_on: &str) -> RetryPolicy {
        RetryPolicy {
            retry_on: RetryOn::parse(retry_on).0,
            retriable_status_codes: vec![418],
            ..Default::default()
        }
    }

    fn resp(status: u16) -> Outcome {
        Outcome::Response {
            status,
            grpc_status: None,
            ratelimited: false,
            retriable_header: false,
        }
    }

    #[test]
    fn response_conditions() {
        use Decision::*;
        let p = policy("5xx");
        assert_eq!(decide(&p, resp(500)), RetryWithBackoff);
        assert_eq!(decide(&p, resp(503)), RetryWithBackoff);
        assert_eq!(decide(&p, resp(404)), Done);
        let p = policy("gateway-error");
        assert_eq!(decide(&p, resp(500)), Done);
        assert_eq!(decide(&p, resp(502)), RetryWithBackoff);
        assert_eq!(decide(&p, resp(504)), RetryWithBackoff);
        let p = policy("retriable-4xx");
        assert_eq!(decide(&p, resp(409)), RetryWithBackoff);
        assert_eq!(decide(&p, resp(429)), Done);
        let p = policy("retriable-status-codes");
        assert_eq!(decide(&p, resp(418)), RetryWithBackoff);
        assert_eq!(decide(&p, resp(503)), Done);
        let p = policy("unavailable,cancelled");
        let grpc = |s| Outcome::Response {
            status: 200,
            grpc_status: Some(s),
            ratelimited: false,
            retriable_header: false,
        };
        assert_eq!(decide(&p, grpc(14)), RetryWithBackoff);
        assert_eq!(decide(&p, grpc(1)), RetryWithBackoff);
        assert_eq!(decide(&p, grpc(4)), Done);
        assert_eq!(decide(&p, grpc(0)), Done);
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(
            decide(&p, Outcome::from_response(200, &h, Some(&p))),
            RetryWithBackoff
        );
    }

    #[test]
    fn retriable_headers_and_ratelimited() {
        use Decision::*;
        let mut p = policy("retriable-headers");
        p.retriable_headers = vec![ferry_model::HeaderMatcher {
            name: ferry_model::HeaderKey::parse("x-upstream-retry").unwrap(),
            matcher: Some(ferry_model::StringMatcher::Exact("true".into())),
            ignore_case: false,
            invert: false,
            present: true,
            treat_missing_as_empty: false,
        }];
        let mut h = HeaderMap::new();
        assert_eq!(decide(&p, Outcome::from_response(200, &h, Some(&p))), Done);
        h.insert("x-upstream-retry", "true".parse().unwrap());
        assert_eq!(
            decide(&p, Outcome::from_response(200, &h, Some(&p))),
            RetryWithBackoff
        );
        // Without the condition, matching headers retry nothing.
        let mut q = p.clone();
        q.retry_on = RetryOn::parse("5xx").0;
        assert_eq!(decide(&q, Outcome::from_response(200, &h, Some(&q))), Done);
        let p = policy("envoy-ratelimited");
        let mut h = HeaderMap::new();
        assert_eq!(decide(&p, Outcome::from_response(429, &h, Some(&p))), Done);
        h.insert("x-envoy-ratelimited", "true".parse().unwrap());
        assert_eq!(
            decide(&p, Outcome::from_response(429, &h, Some(&p))),
            RetryWithBackoff
        );
    }

    #[test]
    fn reset_conditions() {
        use Decision::*;
        for on in ["5xx", "gateway-error", "reset"] {
            let p = policy(on);
            for o in [
                Outcome::ConnectFailure,
                Outcome::Reset,
                Outcome::PerTryTimeout,
            ] {
                assert_eq!(decide(&p, o), RetryWithBackoff, "{on} {o:?}");
            }
        }
        let p = policy("connect-failure");
        assert_eq!(decide(&p, Outcome::ConnectFailure), RetryWithBackoff);
        assert_eq!(decide(&p, Outcome::Reset), Done);
        assert_eq!(decide(&p, Outcome::PerTryTimeout), Done);
        assert_eq!(decide(&p, resp(503)), Done);
        let p = policy("refused-stream");
        assert_eq!(decide(&p, Outcome::RefusedStream), RetryImmediately);
        assert_eq!(decide(&p, Outcome::Reset), Done);
        assert_eq!(decide(&policy("retriable-4xx"), Outcome::Reset), Done);
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = RetryPolicy::default();
        let max_of = |retry| (0..10_000).map(|r| backoff(&p, retry, r)).max().unwrap();
        assert_eq!(max_of(1), Duration::from_millis(24));
        assert_eq!(max_of(2), Duration::from_millis(74));
        assert_eq!(max_of(3), Duration::from_millis(174));
        assert_eq!(max_of(4), Duration::from_millis(250));
        assert_eq!(max_of(60), Duration::from_millis(250));
        assert_eq!(backoff(&p, 1, 0), Duration::ZERO);
    }
}
