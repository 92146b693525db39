//! Clusters and their endpoints.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub kind: ClusterKind,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    pub protocol: UpstreamProtocol,
    /// How long an idle pooled upstream connection is kept (Envoy default 1 h).
    pub idle_timeout: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    /// Source address for upstream connections (`upstream_bind_config`);
    /// Istio binds inbound passthrough to 127.0.0.6 so that the pod's own
    /// redirect rules let it through to the app.
    pub bind_source: Option<std::net::IpAddr>,
    /// TLS origination (`UpstreamTlsContext`); `None`: plaintext.
    pub tls: Option<crate::tls::UpstreamTls>,
    /// Per-endpoint transport choice (Istio: mTLS to endpoints labelled
    /// `tlsMode: istio`, plaintext to the others); the first match wins,
    /// then `tls`.
    pub transport_socket_matches: Vec<TransportSocketMatch>,
}

#[derive(Debug, Clone)]
pub struct TransportSocketMatch {
    pub name: String,
    /// Metadata the endpoint must carry under `envoy.transport_socket_match`.
    pub criteria: Vec<(String, String)>,
    pub tls: Option<crate::tls::UpstreamTls>,
}

#[derive(Debug, Clone)]
pub enum ClusterKind {
    /// Endpoints are fixed addresses (STATIC, or EDS once resolved).
    Static(Vec<Endpoint>),
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    /// `filter_metadata["envoy.transport_socket_match"]` as strings.
    pub transport_socket_match: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEndpoint {
    pub host: String,
    pub port: u16,
    pub weight: u32,
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
