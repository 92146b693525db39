//! The configuration of Envoy's fault injection filter
//! (`envoy.filters.http.fault`, `HTTPFault`): which requests get a delay or
//! an abort, how long and with which status. The decision per request lives
//! in `ferry-filters`; this module only holds the validated settings, both
//! for the filter in a connection manager and for per-route overrides.

use std::time::Duration;

use crate::route::{Fraction, HeaderMatcher};

/// One `HTTPFault`.
#[derive(Debug, Default)]
pub struct FaultConfig {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
    /// Faults apply only to requests whose headers all match.
    pub headers: Vec<HeaderMatcher>,
    /// Faults apply only when the route's cluster is this one.
    pub upstream_cluster: Option<String>,
    /// Faults apply only to requests from these downstream nodes
    /// (`x-envoy-downstream-service-node`).
    pub downstream_nodes: Vec<String>,
    /// At most this many requests are faulted at once.
    pub max_active_faults: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DelaySource {
    Fixed(Duration),
    /// `header_delay`: the duration comes from `x-envoy-fault-delay-request`.
    Header,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultDelay {
    pub source: DelaySource,
    pub percentage: Fraction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortSource {
    Http(u16),
    Grpc(u32),
    /// `header_abort`: the status comes from `x-envoy-fault-abort-request`
    /// or `x-envoy-fault-abort-grpc-request`.
    Header,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultAbort {
    pub source: AbortSource,
    pub percentage: Fraction,
}
