//! Active health checking (`Cluster.health_checks`, Envoy's
//! `envoy.config.core.v3.HealthCheck`): when and how often each endpoint is
//! checked, how many results move it between healthy and unhealthy, and
//! what a check sends and expects (HTTP, TCP or gRPC), plus the per-endpoint
//! overrides of `Endpoint.health_check_config`.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::HostAddr;
use crate::route::StringMatcher;

/// One cluster's health check, with Envoy's defaults filled in.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// How long one check may take before it counts as a (network) failure.
    pub timeout: Duration,
    /// Between checks of a healthy host.
    pub interval: Duration,
    /// A random delay up to this before a host's first check.
    pub initial_jitter: Duration,
    /// A random extra of up to this on every interval.
    pub interval_jitter: Duration,
    /// A random extra of up to this percentage of every interval.
    pub interval_jitter_percent: u32,
    /// Consecutive failures (network failures, timeouts, retriable
    /// statuses) that make a healthy host unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that make an unhealthy host healthy (a host's
    /// very first check needs one).
    pub healthy_threshold: u32,
    /// Between checks while the cluster has never opened a connection
    /// (Envoy's default 60 s).
    pub no_traffic_interval: Duration,
    /// The same for hosts that are healthy (default: `no_traffic_interval`).
    pub no_traffic_healthy_interval: Duration,
    /// Between checks of an unhealthy host (default: `interval`).
    pub unhealthy_interval: Duration,
    /// After a failure that did not yet make a healthy host unhealthy
    /// (default: `unhealthy_interval`).
    pub unhealthy_edge_interval: Duration,
    /// After a success that did not yet make an unhealthy host healthy
    /// (default: `interval`).
    pub healthy_edge_interval: Duration,
    /// Keep the check's connection between checks (default true).
    pub reuse_connection: bool,
    /// `transport_socket_match_criteria`: the metadata the cluster's
    /// transport socket matches are tried against for check connections
    /// (`None`: the endpoint's own transport).
    pub transport_socket_match_criteria: Option<Vec<(String, String)>>,
    pub checker: Checker,
}

/// What one check does.
#[derive(Debug, Clone)]
pub enum Checker {
    Http(HttpCheck),
    Tcp(TcpCheck),
    Grpc(GrpcCheck),
}

/// `http_health_check`.
#[derive(Debug, Clone)]
pub struct HttpCheck {
    /// The `Host` (`:authority`) sent; `None`: the endpoint's
    /// `health_check_config.hostname`, else the cluster's name.
    pub host: Option<String>,
    pub path: String,
    /// `method` (default GET).
    pub method: http::Method,
    /// `request_headers_to_add` (literal values) and the names in
    /// `request_headers_to_remove`.
    pub headers_to_add: Vec<HeaderToAdd>,
    pub headers_to_remove: Vec<http::HeaderName>,
    /// `[start, end)` status ranges that pass (default `[200, 201)`).
    pub expected_statuses: Vec<(u16, u16)>,
    /// Statuses that fail only towards `unhealthy_threshold` (others fail
    /// the host at once).
    pub retriable_statuses: Vec<(u16, u16)>,
    /// `codec_client_type` HTTP2 (else HTTP/1.1).
    pub http2: bool,
    /// `service_name_matcher`: the response's
    /// `x-envoy-upstream-healthchecked-cluster` must match.
    pub service_name_matcher: Option<StringMatcher>,
}

/// A request header the check adds.
#[derive(Debug, Clone)]
pub struct HeaderToAdd {
    pub name: http::HeaderName,
    pub value: http::HeaderValue,
    /// Appended to a header already there (else it replaces it).
    pub append: bool,
}

/// `tcp_health_check`: connect, write `send`, and pass once every
/// `receive` block was read in order (no blocks: the connect alone passes).
#[derive(Debug, Clone, Default)]
pub struct TcpCheck {
    pub send: Vec<u8>,
    pub receive: Vec<Vec<u8>>,
}

/// `grpc_health_check`: `grpc.health.v1.Health/Check` over HTTP/2.
#[derive(Debug, Clone, Default)]
pub struct GrpcCheck {
    /// `service_name`, sent in the request (empty: the server's overall
    /// health).
    pub service_name: String,
    /// `:authority` (`None`: as for HTTP).
    pub authority: Option<String>,
    /// `initial_metadata`.
    pub metadata: Vec<HeaderToAdd>,
}

/// `Endpoint.health_check_config`: where an endpoint is checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointCheck {
    /// `port_value`: check this port instead of the endpoint's.
    pub port: Option<u16>,
    /// `address`: check this address instead of the endpoint's.
    pub address: Option<HostAddr>,
    /// `hostname`: the Host / authority of HTTP and gRPC checks.
    pub hostname: Option<Arc<str>>,
    /// `disable_active_health_check`: the endpoint is never checked (and
    /// so never failed by active health checking).
    pub disabled: bool,
}

impl EndpointCheck {
    /// The default (the endpoint's own address and name), for holders that
    /// keep only the non-default ones.
    pub fn unset() -> &'static EndpointCheck {
        static UNSET: EndpointCheck = EndpointCheck {
            port: None,
            address: None,
            hostname: None,
            disabled: false,
        };
        &UNSET
    }

    /// The address a check connects to.
    pub fn target(&self, endpoint: &HostAddr) -> HostAddr {
        let base = self.address.clone().unwrap_or_else(|| endpoint.clone());
        match (base, self.port) {
            (HostAddr::Ip(mut a), Some(p)) => {
                a.set_port(p);
                HostAddr::Ip(a)
            }
            (b, _) => b,
        }
    }
}

/// Whether `status` lies in one of the `[start, end)` ranges.
pub fn in_ranges(ranges: &[(u16, u16)], status: u16) -> bool {
    ranges.iter().any(|(s, e)| (*s..*e).contains(&status))
}
