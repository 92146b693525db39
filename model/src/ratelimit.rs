//! The local rate limit filter's settings
//! (`envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`) and
//! its token bucket.
//!
//! The bucket lives with the configuration that declares it, as in Envoy:
//! the filter's bucket is shared by every connection of the listener, a
//! per-route configuration has a bucket of its own, and a new snapshot
//! starts full buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::route::{Fraction, HeaderKey, HeaderMatcher, HeaderMutations};

#[derive(Debug)]
pub struct LocalRateLimit {
    pub stat_prefix: String,
    /// `status.code` (default 429).
    pub status: http::StatusCode,
    /// `None`: no bucket configured, nothing is limited.
    pub bucket: Option<TokenBucket>,
    /// `filter_enabled.default_value` (Envoy's default: 0 %, disabled).
    pub filter_enabled: Fraction,
    /// `filter_enforced.default_value` (Envoy's default: 0 %, not enforced).
    pub filter_enforced: Fraction,
    /// Added to the rate limited responses.
    pub response_headers: HeaderMutations,
    /// Added to requests over the limit that are not enforced.
    pub request_headers_when_not_enforced: HeaderMutations,
    /// `rate_limited_as_resource_exhausted`: a limited gRPC request gets
    /// `RESOURCE_EXHAUSTED` (8) instead of `UNAVAILABLE` (14).
    pub grpc_resource_exhausted: bool,
    /// `descriptors`: buckets for the requests whose route `rate_limits`
    /// produce exactly these entries.
    pub descriptors: Vec<Descriptor>,
    /// `stage`: only the route rate limits of this stage count.
    pub stage: u32,
    /// `always_consume_default_token_bucket` (default true): the filter's
    /// bucket is taken from even when a descriptor matched.
    pub always_consume_default: bool,
    /// `vh_rate_limits`.
    pub vh_rate_limits: VhRateLimits,
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`: every response of a
    /// counted request says `x-ratelimit-limit`, `-remaining` and `-reset`.
    pub x_ratelimit_headers: bool,
    /// `local_rate_limit_per_downstream_connection`: each connection has
    /// buckets of its own, shaped like the configured ones.
    pub per_connection: bool,
}

/// Whether the virtual host's `rate_limits` count beside the route's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VhRateLimits {
    /// The virtual host's only when the route has none.
    #[default]
    Override,
    Include,
    Ignore,
}

/// One `LocalRateLimitDescriptor`.
#[derive(Debug)]
pub struct Descriptor {
    pub entries: Vec<(String, String)>,
    pub bucket: TokenBucket,
}

/// One entry of a route's (or virtual host's) `rate_limits`: the actions
/// that make one descriptor of a request.
#[derive(Debug)]
pub struct RateLimitPolicy {
    pub stage: u32,
    pub actions: Vec<RateLimitAction>,
}

#[derive(Debug)]
pub enum RateLimitAction {
    /// `("remote_address", <downstream IP>)`.
    RemoteAddress,
    /// `("destination_cluster", <the route's cluster>)`.
    DestinationCluster,
    /// `(key, value)` always (`generic_key`).
    GenericKey { key: String, value: String },
    /// `(key, <the header's value>)`; an absent header drops the
    /// descriptor, or only this entry with `skip_if_absent`.
    RequestHeaders {
        header: HeaderKey,
        key: String,
        skip_if_absent: bool,
    },
    /// `("masked_remote_address", <downstream IP masked to a CIDR>)`.
    MaskedRemoteAddress { v4_len: u8, v6_len: u8 },
    /// `(key, <the query parameter's first value>)`; absent as for headers.
    QueryParameter {
        name: String,
        key: String,
        skip_if_absent: bool,
    },
    /// `(key, value)` when the query parameter matchers all match
    /// (`expect_match: true`) or not all (`false`).
    QueryParameterValueMatch {
        key: String,
        value: String,
        expect_match: bool,
        matchers: Vec<crate::route::QueryParameterMatcher>,
    },
    /// `(key, value)` when the headers all match (`expect_match: true`) or
    /// not all (`false`); otherwise the descriptor is dropped.
    HeaderValueMatch {
        key: String,
        value: String,
        expect_match: bool,
        headers: Vec<HeaderMatcher>,
    },
}

/// A token bucket refilled continuously at `tokens_per_fill` per
/// `fill_interval` (fractions of a token accumulate), never above
/// `max_tokens`, full at creation: what Envoy 1.40 does (after 1.2 s a
/// bucket of 4 tokens per 4 s has one token again, not none).
///
/// Lock-free: the state is one instant, the time at which the bucket was
/// (or would have been) empty, in seconds since creation as the bits of an
/// `f64`, moved forward by compare-and-swap for each token taken.
#[derive(Debug)]
pub struct TokenBucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    created: Instant,
    /// Tokens per second.
    rate: f64,
    /// Seconds since `created` at which the bucket is empty (`f64` bits).
    empty_at: AtomicU64,
}

impl TokenBucket {
    pub fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> Self {
        let rate = f64::from(tokens_per_fill) / fill_interval.as_secs_f64().max(1e-9);
        let full = f64::from(max_tokens) / rate;
        TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval,
            created: Instant::now(),
            rate,
            empty_at: AtomicU64::new((-full).to_bits()),
        }
    }

    /// A full bucket of the same size and rate.
    pub fn fresh(&self) -> TokenBucket {
        TokenBucket::new(self.max_tokens, self.tokens_per_fill, self.fill_interval)
    }

    /// Tokens per second.
    pub fn fill_rate(&self) -> f64 {
        self.rate
    }

    /// Whole tokens left now.
    pub fn remaining(&self) -> u32 {
        let (tokens, _) = self.level(Instant::now());
        tokens.floor() as u32
    }

    /// Seconds (rounded up) until a token is there; 0 when one is.
    pub fn seconds_until_token(&self) -> u64 {
        let (tokens, _) = self.level(Instant::now());
        if tokens >= 1.0 - 1e-9 {
            return 0;
        }
        ((1.0 - tokens) / self.rate - 1e-6).ceil().max(0.0) as u64
    }

    /// Tokens at `now` (fractional) and the seconds since creation.
    fn level(&self, now: Instant) -> (f64, f64) {
        let now = now.saturating_duration_since(self.created).as_secs_f64();
        let empty_at = f64::from_bits(self.empty_at.load(Ordering::Acquire));
        let tokens = ((now - empty_at) * self.rate).min(f64::from(self.max_tokens));
        (tokens.max(0.0), now)
    }

    /// Takes one token if there is one.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    fn try_acquire_at(&self, now: Instant) -> bool {
        let now = now.saturating_duration_since(self.created).as_secs_f64();
        let full = f64::from(self.max_tokens) / self.rate;
        let per_token = 1.0 / self.rate;
        let mut cur = self.empty_at.load(Ordering::Acquire);
        loop {
            // Never more than a full bucket.
            let empty_at = f64::from_bits(cur).max(now - full);
            // A small tolerance so that float rounding never loses a token
            // that is due exactly now.
            if (now - empty_at) * self.rate < 1.0 - 1e-9 {
                return false;
            }
            let next = (empty_at + per_token).to_bits();
            match self.empty_at.compare_exchange_weak(
                cur,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_drains_and_refills_continuously() {
        // Two tokens per 10 s: one every 5 s.
        let b = TokenBucket::new(3, 2, Duration::from_secs(10));
        let t0 = b.created;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(b.try_acquire_at(t0));
        assert!(b.try_acquire_at(t0));
        assert!(b.try_acquire_at(t0));
        assert!(!b.try_acquire_at(at(4_900)));
        assert!(b.try_acquire_at(at(5_000)));
        assert!(!b.try_acquire_at(at(9_000)));
        assert!(b.try_acquire_at(at(10_000)));
        assert!(!b.try_acquire_at(at(10_000)));
        // A long pause never fills beyond the maximum.
        assert!((0..3).all(|_| b.try_acquire_at(at(1_000_000))));
        assert!(!b.try_acquire_at(at(1_000_000)));
    }

    #[test]
    fn remaining_and_reset() {
        // One token every 10 s.
        let b = TokenBucket::new(2, 1, Duration::from_secs(10));
        assert_eq!((b.remaining(), b.seconds_until_token()), (2, 0));
        assert!(b.try_acquire());
        assert_eq!((b.remaining(), b.seconds_until_token()), (1, 0));
        assert!(b.try_acquire());
        assert_eq!((b.remaining(), b.seconds_until_token()), (0, 10));
    }

    #[test]
    fn bucket_is_shared_across_threads() {
        let b = std::sync::Arc::new(TokenBucket::new(100, 1, Duration::from_secs(3600)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..50).filter(|_| b.try_acquire()).count())
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 100);
    }
}
