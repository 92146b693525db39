//! Clusters and their endpoints.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub kind: ClusterKind,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    /// The policy's settings (`*_lb_config`, `common_lb_config`).
    pub lb: LbConfig,
    /// `outlier_detection`; `None`: endpoints are never ejected. Boxed, as
    /// is the health check: a cluster model is held twice per EDS cluster
    /// (as received and with its endpoints), by the ten thousand in a large
    /// mesh, and most clusters have neither.
    pub outlier_detection: Option<Box<OutlierDetection>>,
    /// `circuit_breakers.thresholds` by routing priority.
    pub circuit_breakers: CircuitBreakers,
    /// HTTP/2 `max_concurrent_streams` upstream (Envoy's default 2^31 - 1).
    pub max_concurrent_streams: Option<u32>,
    pub protocol: UpstreamProtocol,
    /// How long an idle pooled upstream connection is kept (Envoy default 1 h).
    pub idle_timeout: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    /// HTTP/1 `header_key_format` upstream: the case request header names
    /// are written in.
    pub header_case: crate::http_protocol::HeaderCase,
    /// Source address for upstream connections (`upstream_bind_config`);
    /// Istio binds inbound passthrough to 127.0.0.6 so that the pod's own
    /// redirect rules let it through to the app.
    pub bind_source: Option<std::net::IpAddr>,
    /// TLS origination (`UpstreamTlsContext`); `None`: plaintext (Istio's
    /// outbound clusters choose per endpoint, in `transport_socket_matches`).
    pub tls: Option<Box<crate::tls::UpstreamTls>>,
    /// Per-endpoint transport choice (Istio: mTLS to endpoints labelled
    /// `tlsMode: istio`, plaintext to the others); the first match wins,
    /// then `tls`.
    pub transport_socket_matches: Vec<TransportSocketMatch>,
    /// The cluster's own transport socket is `internal_upstream` passing
    /// the endpoints' original_dst metadata (as in a match).
    pub internal_upstream: bool,
    /// The host of the first service in istiod's `istio.services` cluster
    /// metadata: Istio's metrics name it as the destination service where
    /// the cluster name does not (inbound clusters).
    pub istio_service: Option<String>,
    /// Istio's TCP metadata exchange as an upstream network filter
    /// (`filters`: `envoy.tcp.metadataexchange.config.MetadataExchange`):
    /// the ALPN protocol under which this node's metadata frame is written
    /// first on a proxied TCP connection and the server's is read back.
    pub metadata_exchange: Option<String>,
    /// `upstream_http_protocol_options`: the TLS SNI and/or the server
    /// certificate's expected DNS name taken from each request's host.
    pub auto_sni: AutoSni,
    /// `upstream_connection_options.tcp_keepalive`: keepalive probes on
    /// upstream connections.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `common_http_protocol_options.max_connection_duration`: an upstream
    /// connection this old takes no new request and closes once idle.
    pub max_connection_duration: Option<Duration>,
    /// `dns_lookup_family` and `dns_refresh_rate` (STRICT_DNS clusters).
    pub dns: DnsSettings,
    /// `health_checks` (at most one): active health checking of every
    /// endpoint; `None`: hosts are healthy unless EDS or outlier detection
    /// says otherwise.
    pub health_check: Option<Box<crate::health_check::HealthCheck>>,
    /// `ignore_health_on_host_removal`: a host discovery removed leaves at
    /// once, instead of staying while its active health check passes.
    pub ignore_health_on_host_removal: bool,
}

/// `TcpKeepalive`: `SO_KEEPALIVE` with these settings (`None`: the
/// system's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// How a DNS cluster resolves its hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsSettings {
    pub lookup_family: DnsLookupFamily,
    /// `dns_refresh_rate` (Envoy default 5 s).
    pub refresh_rate: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            lookup_family: DnsLookupFamily::Auto,
            refresh_rate: Duration::from_secs(5),
        }
    }
}

/// `dns_lookup_family`: which of a name's addresses are used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DnsLookupFamily {
    /// IPv6 addresses when there are any, else IPv4 (Envoy's default).
    #[default]
    Auto,
    V4Only,
    V6Only,
    /// IPv4 addresses when there are any, else IPv6.
    V4Preferred,
    All,
}

impl DnsLookupFamily {
    /// The addresses of one name this family keeps.
    pub fn select(self, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        let v4: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv4()).collect();
        let v6: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv6()).collect();
        match self {
            DnsLookupFamily::All => addrs.to_vec(),
            DnsLookupFamily::V4Only => v4,
            DnsLookupFamily::V6Only => v6,
            DnsLookupFamily::Auto if v6.is_empty() => v4,
            DnsLookupFamily::Auto => v6,
            DnsLookupFamily::V4Preferred if v4.is_empty() => v6,
            DnsLookupFamily::V4Preferred => v4,
        }
    }
}

/// Envoy's `UpstreamHttpProtocolOptions`: names taken per request from the
/// upstream request's host (or `header`), so connections are pooled per
/// name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoSni {
    /// `auto_sni`: the name is sent as SNI.
    pub sni: bool,
    /// `auto_san_validation`: the server's certificate must carry the name
    /// as a DNS SAN (instead of the configured SAN matchers).
    pub san_validation: bool,
    /// `override_auto_sni_header` (lower case): where the name is read
    /// instead of `:authority`.
    pub header: Option<String>,
}

impl AutoSni {
    pub fn enabled(&self) -> bool {
        self.sni || self.san_validation
    }
}

#[derive(Debug, Clone)]
pub struct TransportSocketMatch {
    pub name: String,
    /// Metadata the endpoint must carry under `envoy.transport_socket_match`.
    pub criteria: Vec<(String, String)>,
    pub tls: Option<crate::tls::UpstreamTls>,
    /// `envoy.transport_sockets.internal_upstream` (around a plaintext
    /// socket): the endpoint's `envoy.filters.listener.original_dst`
    /// metadata travels with the in-process connection.
    pub internal_upstream: bool,
}

/// `original_dst_lb_config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginalDstLb {
    /// `upstream_port_override`: the port connected to instead of the
    /// original destination's.
    pub port_override: Option<u16>,
    /// `metadata_key` `envoy.filters.listener.original_dst` / `waypoint`:
    /// the address in the connection's metadata under that key, when
    /// present, replaces the original destination (Istio's waypoint).
    pub waypoint_from_metadata: bool,
}

#[derive(Debug, Clone)]
pub enum ClusterKind {
    /// Endpoints are fixed addresses (STATIC, or EDS once resolved). Shared
    /// with the endpoint assignment they came from: a mesh's endpoints are
    /// held once.
    Static(std::sync::Arc<Vec<Endpoint>>),
    /// Host names resolved by DNS, every address used (STRICT_DNS).
    StrictDns(Vec<DnsEndpoint>),
    /// The connection's original destination is the upstream (PassthroughCluster).
    OriginalDst,
    /// Nothing is proxied (Istio's BlackHoleCluster: STATIC with no endpoints).
    BlackHole,
    /// Endpoints come from EDS under this service name; a snapshot replaces
    /// it with the assignment's endpoints once they arrived.
    Eds { service_name: String },
}

/// Where an endpoint is reached: an IP socket, or a Unix socket (`pipe`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostAddr {
    Ip(SocketAddr),
    Pipe(PipeAddr),
    /// `envoy_internal_address`: an internal listener of this process.
    Internal(InternalAddr),
}

/// `EnvoyInternalAddress`: the internal listener's name and the
/// endpoint's id (which tells endpoints to one listener apart).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InternalAddr {
    pub listener: std::sync::Arc<str>,
    pub endpoint_id: std::sync::Arc<str>,
}

/// An endpoint's `envoy.filters.listener.original_dst` filter metadata,
/// which Istio sets on endpoints reached through an internal listener:
/// `local` is where the tunnel goes, `waypoint` (if any) who carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct OriginalDstMeta {
    pub local: Option<SocketAddr>,
    pub waypoint: Option<SocketAddr>,
}

/// A Unix socket path; one starting with `@` names a socket in Linux's
/// abstract namespace (Envoy's spelling), the rest is the file path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipeAddr(pub std::sync::Arc<str>);

impl PipeAddr {
    /// The abstract namespace name (without the `@`), if it is one.
    pub fn abstract_name(&self) -> Option<&str> {
        self.0.strip_prefix('@')
    }
}

impl HostAddr {
    /// The IP socket, for what only IP endpoints have (source binding, SNI
    /// from an address, original destination).
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            HostAddr::Ip(a) => Some(*a),
            HostAddr::Pipe(_) | HostAddr::Internal(_) => None,
        }
    }
}

impl From<SocketAddr> for HostAddr {
    fn from(a: SocketAddr) -> Self {
        HostAddr::Ip(a)
    }
}

/// Envoy's spelling in stats, logs and the admin pages: `ip:port`, or the
/// pipe's path (`@name` for an abstract one).
impl std::fmt::Display for HostAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostAddr::Ip(a) => a.fmt(f),
            HostAddr::Pipe(p) => f.write_str(&p.0),
            HostAddr::Internal(i) => i.fmt(f),
        }
    }
}

/// Envoy's spelling: `envoy://listener/endpoint_id`.
impl std::fmt::Display for InternalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "envoy://{}/{}", self.listener, self.endpoint_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: HostAddr,
    pub weight: u32,
    /// The locality's priority (0 is the most preferred).
    pub priority: u32,
    /// Index of the endpoint's locality within the assignment, so that
    /// endpoints of one locality can be grouped again.
    pub locality: u32,
    /// `load_balancing_weight` of the locality (locality-weighted balancing).
    pub locality_weight: u32,
    /// EDS health status as the balancer uses it.
    pub health: EndpointHealth,
    /// What few endpoints carry, boxed together (`None`: none of it), as a
    /// mesh holds endpoints by the hundred thousand
    /// (`endpoint_sizes_stay_small`).
    pub extras: Option<Box<EndpointExtras>>,
}

/// The parts of an [`Endpoint`] most endpoints lack.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointExtras {
    /// `endpoint.hostname`: the host's name (`auto_host_sni`,
    /// `auto_host_rewrite`).
    pub hostname: Option<std::sync::Arc<str>>,
    /// `filter_metadata["envoy.transport_socket_match"]` as strings.
    pub transport_socket_match: Vec<(String, String)>,
    /// `filter_metadata["envoy.filters.listener.original_dst"]` (the
    /// default: absent).
    pub original_dst_meta: OriginalDstMeta,
    /// `endpoint.health_check_config`: where and how active health checks
    /// reach this endpoint (the default: at its own address).
    pub health_check: crate::health_check::EndpointCheck,
}

impl EndpointExtras {
    /// `None` when it holds nothing.
    pub fn boxed(self) -> Option<Box<Self>> {
        (self != Self::default()).then(|| Box::new(self))
    }
}

impl Endpoint {
    /// An endpoint at `address` with weight 1 and nothing else set.
    pub fn at(address: HostAddr) -> Self {
        Self {
            address,
            weight: 1,
            priority: 0,
            locality: 0,
            locality_weight: 1,
            health: EndpointHealth::Healthy,
            extras: None,
        }
    }

    /// `endpoint.hostname`.
    pub fn hostname(&self) -> Option<&std::sync::Arc<str>> {
        self.extras.as_ref()?.hostname.as_ref()
    }

    /// `filter_metadata["envoy.transport_socket_match"]` (empty when absent).
    pub fn transport_socket_match(&self) -> &[(String, String)] {
        self.extras
            .as_ref()
            .map_or(&[], |e| e.transport_socket_match.as_slice())
    }

    /// The original_dst metadata (empty when absent).
    pub fn original_dst(&self) -> OriginalDstMeta {
        self.extras
            .as_ref()
            .map(|e| e.original_dst_meta)
            .unwrap_or_default()
    }

    /// The `health_check_config` (the default when absent).
    pub fn health_check(&self) -> &crate::health_check::EndpointCheck {
        self.extras
            .as_ref()
            .map_or(crate::health_check::EndpointCheck::unset(), |e| {
                &e.health_check
            })
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    #[test]
    fn endpoint_sizes_stay_small() {
        // Was 120 bytes with its rarely set parts inline.
        let size = std::mem::size_of::<Endpoint>();
        assert!(size <= 72, "Endpoint is {size} bytes");
        let plain = Endpoint::at(HostAddr::Ip(([10, 0, 0, 1], 80).into()));
        assert!(plain.extras.is_none() && plain.hostname().is_none());
        assert!(EndpointExtras::default().boxed().is_none());
    }
}

/// Envoy's health statuses folded into what load balancing distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointHealth {
    /// HEALTHY or UNKNOWN.
    #[default]
    Healthy,
    /// DEGRADED: used only while no healthy endpoint of its priority is left.
    Degraded,
    /// UNHEALTHY, DRAINING or TIMEOUT: counts towards its priority's size
    /// (so the healthy share, and the spill-over, are Envoy's) but gets no
    /// traffic outside panic mode.
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEndpoint {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    /// `endpoint.health_check_config` of the name's addresses.
    pub health_check: crate::health_check::EndpointCheck,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
    ClusterProvided,
}

/// Which HTTP version to speak upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// The downstream request's version (Istio's protocol sniffing clusters).
    UseDownstream,
}

/// Settings of the load balancing policies (Envoy's defaults in [`Default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LbConfig {
    /// `common_lb_config.healthy_panic_threshold` in percent (default 50;
    /// 0 disables panic mode).
    pub healthy_panic_threshold: f64,
    /// Least request: `active_request_bias` (default 1.0): a weighted host's
    /// load is `(active + 1)^bias / weight`.
    pub active_request_bias: f64,
    /// Round robin and least request: `slow_start_config`.
    pub slow_start: Option<SlowStart>,
    /// Least request: hosts sampled per pick (`choice_count`, default 2).
    pub choice_count: u32,
    /// Ring hash: `minimum_ring_size` (1024) and `maximum_ring_size` (8M).
    pub min_ring_size: u64,
    pub max_ring_size: u64,
    /// Maglev: `table_size`, a prime (65537).
    pub maglev_table_size: u64,
    /// `common_lb_config.locality_weighted_lb_config` is set.
    pub locality_weighted: bool,
    /// Priority spill-over factor in percent (`overprovisioning_factor`, 140).
    pub overprovisioning_factor: u32,
    /// Least request scored by a peak-sensitive moving average of latency
    /// instead of active requests (metadata `ferry.lb: peak_ewma`); an opt-in
    /// that reacts to a slow endpoint before its queue builds up.
    pub peak_ewma: bool,
    /// `original_dst_lb_config` of an ORIGINAL_DST cluster.
    pub original_dst: OriginalDstLb,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            choice_count: 2,
            min_ring_size: 1024,
            max_ring_size: 8 * 1024 * 1024,
            maglev_table_size: 65537,
            locality_weighted: false,
            overprovisioning_factor: 140,
            peak_ewma: false,
            original_dst: OriginalDstLb::default(),
            healthy_panic_threshold: 50.0,
            active_request_bias: 1.0,
            slow_start: None,
        }
    }
}

/// Envoy's slow start: a host new to the cluster gets its weight scaled by
/// `max(min_weight, (age / window)^(1 / aggression))` until it is
/// `window` old.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    pub window: Duration,
    /// `aggression` (default 1.0: linear).
    pub aggression: f64,
    /// `min_weight_percent` as a fraction (default 0.1).
    pub min_weight: f64,
}

impl SlowStart {
    /// The factor of a host `age` old (1.0 once the window has passed).
    pub fn factor(&self, age: Duration) -> f64 {
        if self.window.is_zero() || age >= self.window {
            return 1.0;
        }
        let t = age.max(Duration::from_millis(1)).as_secs_f64() / self.window.as_secs_f64();
        let scaled = if self.aggression == 1.0 {
            t
        } else {
            t.powf(1.0 / self.aggression)
        };
        scaled.max(self.min_weight)
    }
}

/// `outlier_detection`, with Envoy's defaults in [`Default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    /// Percent chance that a detected outlier is ejected (`enforcing_*`).
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub enforcing_success_rate: u32,
    /// Local-origin errors (connect failure, reset, timeout) counted apart
    /// from the status codes the endpoint answered.
    pub split_external_local_origin_errors: bool,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    /// The ejection threshold is mean - stdev × factor / 1000.
    pub success_rate_stdev_factor: u32,
    /// With the split: the success rate of local-origin results is
    /// judged too (`enforcing_local_origin_success_rate`, default 100).
    pub enforcing_local_origin_success_rate: u32,
    /// Failure percentage: a host failing at least this share of its
    /// requests is ejected (`failure_percentage_threshold`, default 85).
    pub failure_percentage_threshold: u32,
    pub enforcing_failure_percentage: u32,
    pub enforcing_failure_percentage_local_origin: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
    /// `max_ejection_time_jitter`: a random extra ejection time up to it.
    pub max_ejection_time_jitter: Duration,
    /// `always_eject_one_host`: one host may be ejected whatever
    /// `max_ejection_percent` says.
    pub always_eject_one_host: bool,
    /// `successful_active_health_check_uneject_host` (default true): a
    /// passing active health check returns an ejected host at once.
    pub uneject_on_health_check_success: bool,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_success_rate: 100,
            split_external_local_origin_errors: false,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            enforcing_local_origin_success_rate: 100,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            max_ejection_time_jitter: Duration::ZERO,
            always_eject_one_host: false,
            uneject_on_health_check_success: true,
        }
    }
}

/// One priority's circuit breaker thresholds (Envoy's defaults in [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// `retry_budget`: when set it replaces `max_retries`.
    pub retry_budget: Option<RetryBudget>,
    /// `track_remaining`: gauges of the capacity left under each threshold.
    pub track_remaining: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
            track_remaining: false,
        }
    }
}

/// Envoy's retry budget: retries in flight may be `budget` of the requests
/// in flight (active and pending), but never fewer than
/// `min_retry_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    /// The budget in parts per million of the requests in flight (Envoy's
    /// `budget_percent` × 10 000; default 20 %).
    pub budget_ppm: u32,
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            budget_ppm: 200_000,
            min_retry_concurrency: 3,
        }
    }
}

impl RetryBudget {
    /// Retries allowed in flight with `in_flight` requests active or pending.
    pub fn allowed(&self, in_flight: u32) -> u32 {
        let budget = u64::from(in_flight) * u64::from(self.budget_ppm) / 1_000_000;
        u32::try_from(budget)
            .unwrap_or(u32::MAX)
            .max(self.min_retry_concurrency)
    }
}

/// `circuit_breakers.thresholds` for the DEFAULT and HIGH routing priorities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CircuitBreakers {
    pub default: Thresholds,
    pub high: Thresholds,
    /// `per_host_thresholds.max_connections`: connections to one endpoint
    /// (the only per-host limit Envoy applies).
    pub per_host_max_connections: Option<u32>,
}

/// One of a route's `hash_policy` entries: what a request's hash for ring
/// hash and maglev is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    pub kind: HashPolicyKind,
    /// Stop at this policy when it produced a hash.
    pub terminal: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashPolicyKind {
    /// The value(s) of a request header (lower-case name).
    Header(String),
    /// A cookie; with a `ttl`, a missing cookie is generated and sent back
    /// with `set-cookie` so the client sticks from then on.
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: Option<String>,
    },
    /// The downstream connection's source IP.
    SourceIp,
    /// A query parameter of the request path.
    QueryParameter(String),
    /// The request's filter state object under this key, when hashable.
    FilterState(String),
}
