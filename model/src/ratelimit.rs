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

use crate::route::{Fraction, HeaderMutations};

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
}

/// A token bucket refilled by `tokens_per_fill` at each elapsed
/// `fill_interval`, never above `max_tokens`; full at creation.
///
/// Lock-free: the number of fills already credited and the tokens left are
/// one atomic word, updated by compare-and-swap.
#[derive(Debug)]
pub struct TokenBucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    created: Instant,
    /// `fills << 32 | tokens`.
    state: AtomicU64,
}

impl TokenBucket {
    pub fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> Self {
        TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval,
            created: Instant::now(),
            state: AtomicU64::new(u64::from(max_tokens)),
        }
    }

    /// Takes one token if there is one.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    fn try_acquire_at(&self, now: Instant) -> bool {
        let interval = self.fill_interval.as_nanos().max(1);
        let fills_now = now.saturating_duration_since(self.created).as_nanos() / interval;
        let fills_now = u32::try_from(fills_now).unwrap_or(u32::MAX);
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            let fills = (cur >> 32) as u32;
            let mut tokens = cur as u32;
            if fills_now > fills {
                let added = u64::from(fills_now - fills) * u64::from(self.tokens_per_fill);
                tokens = (u64::from(tokens) + added).min(u64::from(self.max_tokens)) as u32;
            }
            let fills = fills.max(fills_now);
            let (ok, left) = match tokens.checked_sub(1) {
                Some(left) => (true, left),
                None => (false, 0),
            };
            let next = (u64::from(fills) << 32) | u64::from(left);
            if next == cur {
                return ok;
            }
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return ok,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_drains_and_refills_per_interval() {
        let b = TokenBucket::new(3, 2, Duration::from_secs(10));
        let t0 = b.created;
        assert!(b.try_acquire_at(t0));
        assert!(b.try_acquire_at(t0));
        assert!(b.try_acquire_at(t0));
        assert!(!b.try_acquire_at(t0 + Duration::from_secs(9)));
        // One fill: two tokens.
        assert!(b.try_acquire_at(t0 + Duration::from_secs(10)));
        assert!(b.try_acquire_at(t0 + Duration::from_secs(11)));
        assert!(!b.try_acquire_at(t0 + Duration::from_secs(12)));
        // Many fills never exceed the maximum.
        let later = t0 + Duration::from_secs(1000);
        assert!((0..3).all(|_| b.try_acquire_at(later)));
        assert!(!b.try_acquire_at(later));
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
