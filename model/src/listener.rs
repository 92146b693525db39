//! Listeners, filter chains and Envoy's filter-chain selection.
//!
//! Selection follows Envoy's documented order: destination port, destination
//! IP (longest prefix), server name (exact, then longest wildcard), transport
//! protocol, application protocols, source IP (longest prefix), source port.
//! At each step the chains with a specific match win over chains that leave the
//! criterion empty; if none is left, the listener's default chain applies.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::cidr::CidrRange;
use crate::route::RouteConfig;

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// A hash of the listener's configuration: listeners whose fingerprint is
    /// unchanged by an update keep running untouched.
    pub fingerprint: u64,
    /// A hash of everything but the filter chains (Envoy's
    /// `filterChainOnlyChange` ignores `filter_chains` and
    /// `default_filter_chain`): when only the chains changed, the listener
    /// is updated in place and connections on unchanged chains are kept.
    pub settings_fingerprint: u64,
    pub address: SocketAddr,
    /// More addresses served by the same listener (`additional_addresses`,
    /// e.g. `[::]:15001` beside `0.0.0.0:15001` in a dual-stack pod).
    pub additional_addresses: Vec<SocketAddr>,
    /// `false` for listeners that only receive connections handed over by an
    /// original-destination listener (Istio's per-port outbound listeners).
    pub bind_to_port: bool,
    /// `internal_listener`: no socket; it takes connections handed over in
    /// process by a cluster whose endpoint is an `envoy_internal_address`
    /// naming it (`address` is unused).
    pub internal: bool,
    pub use_original_dst: bool,
    pub listener_filters: ListenerFilters,
    /// How long protocol detection may wait for the client's bytes
    /// (`listener_filters_timeout`: Envoy's 15 s when unset). `None`: no
    /// limit (`0s`, istiod's setting), as in Envoy.
    pub detection_timeout: Option<Duration>,
    /// An explicit `listener_filters_timeout` without
    /// `continue_on_listener_filters_timeout`: the connection is closed when
    /// detection runs out of time, as Envoy closes it.
    pub close_on_detection_timeout: bool,
    pub filter_chains: Vec<Arc<FilterChain>>,
    pub default_chain: Option<Arc<FilterChain>>,
    /// `filter_chain_matcher`: when set, it alone chooses among
    /// `filter_chains` (their `filter_chain_match` is ignored, as Envoy
    /// ignores it), the default chain taking what it does not match.
    pub filter_chain_matcher: Option<Arc<crate::chain_matcher::ChainMatcher>>,
    /// `tcp_keepalive`: keepalive probes on accepted connections.
    pub tcp_keepalive: Option<crate::cluster::TcpKeepalive>,
    /// The listener's own access logs: connections no filter chain took.
    pub access_logs: Arc<crate::access_log::AccessLogs>,
}

/// Which listener filters are configured (the ones Ferry implements natively).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerFilters {
    pub original_dst: bool,
    pub tls_inspector: bool,
    pub http_inspector: bool,
    /// Each filter's `filter_disabled`: the connections it skips.
    pub original_dst_disabled: Option<PortPredicate>,
    pub tls_inspector_disabled: Option<PortPredicate>,
    pub http_inspector_disabled: Option<PortPredicate>,
}

impl ListenerFilters {
    /// Whether the TLS inspector runs for a connection to `destination`.
    pub fn tls_inspector_for(&self, destination: Option<SocketAddr>) -> bool {
        self.tls_inspector && !skips(&self.tls_inspector_disabled, destination)
    }

    /// Whether the HTTP inspector runs for a connection to `destination`.
    pub fn http_inspector_for(&self, destination: Option<SocketAddr>) -> bool {
        self.http_inspector && !skips(&self.http_inspector_disabled, destination)
    }

    /// Whether the original destination filter runs for a connection
    /// accepted on `local`.
    pub fn original_dst_for(&self, local: SocketAddr) -> bool {
        self.original_dst && !skips(&self.original_dst_disabled, Some(local))
    }
}

fn skips(p: &Option<PortPredicate>, destination: Option<SocketAddr>) -> bool {
    p.as_ref()
        .is_some_and(|p| p.matches(destination.map(|d| d.port())))
}

/// Envoy's `ListenerFilterChainMatchPredicate` over a connection's
/// destination port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortPredicate {
    Any,
    /// `destination_port_range`: `[start, end)`.
    Range(u32, u32),
    Or(Vec<PortPredicate>),
    And(Vec<PortPredicate>),
    Not(Box<PortPredicate>),
}

impl PortPredicate {
    pub fn matches(&self, port: Option<u16>) -> bool {
        match self {
            PortPredicate::Any => true,
            PortPredicate::Range(start, end) => {
                port.is_some_and(|p| (*start..*end).contains(&u32::from(p)))
            }
            PortPredicate::Or(v) => v.iter().any(|p| p.matches(port)),
            PortPredicate::And(v) => v.iter().all(|p| p.matches(port)),
            PortPredicate::Not(p) => !p.matches(port),
        }
    }
}

/// What is known of a connection when its filter chain is chosen.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    pub destination: Option<SocketAddr>,
    pub source: Option<SocketAddr>,
    pub server_name: Option<String>,
    /// `"tls"` or `"raw_buffer"` once the TLS inspector ran.
    pub transport_protocol: Option<&'static str>,
    /// ALPN values (TLS) or `http/1.0`, `http/1.1`, `h2c` from the HTTP inspector.
    pub application_protocols: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<CidrRange>,
    pub server_names: Vec<String>,
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
    /// `direct_source_prefix_ranges`: the directly connected peer (the
    /// source, here: no listener filter rewrites it).
    pub direct_source_prefix_ranges: Vec<CidrRange>,
    pub source_type: SourceType,
    pub source_prefix_ranges: Vec<CidrRange>,
    pub source_ports: Vec<u16>,
}

/// `FilterChainMatch.source_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceType {
    #[default]
    Any,
    /// The source is a loopback address or the destination's own address.
    SameIpOrLoopback,
    /// Any other source.
    External,
}

#[derive(Debug)]
pub struct FilterChain {
    pub name: String,
    /// A hash of the chain's whole message, match included: Envoy tells
    /// chains apart by message, so a chain with the same fingerprint in a
    /// new version of its listener is the same chain.
    pub fingerprint: u64,
    /// The same without its `envoy.filters.network.rbac` filters: two
    /// chains that differ only in network RBAC have equal values, and an
    /// update between them re-checks connections instead of draining them.
    pub fingerprint_without_network_rbac: u64,
    pub filter_chain_match: FilterChainMatch,
    /// TLS termination (`DownstreamTlsContext`); `None`: plaintext.
    pub tls: Option<crate::tls::DownstreamTls>,
    /// `envoy.filters.network.rbac` filters before the terminal filter, in order.
    pub rbac: Vec<Arc<crate::rbac::NetworkRbac>>,
    /// `envoy.filters.network.ext_authz` filters before `tcp_proxy`, in order.
    pub ext_authz: Vec<Arc<crate::ext_authz::NetworkExtAuthz>>,
    /// The `on_new_connection` values of the chain's
    /// `envoy.filters.network.set_filter_state` filters, in order: set on
    /// the connection's filter state when it is accepted, before any other
    /// filter reads it.
    pub set_filter_state: Vec<crate::filter_state::FilterStateValue>,
    pub kind: ChainKind,
    /// Istio's standard metrics (`istio.stats`, on the connection manager
    /// or as a network filter): `None` when the chain has no such filter.
    pub istio_stats: Option<IstioStats>,
    /// Istio's TCP metadata exchange (`istio.metadata_exchange`,
    /// `envoy.tcp.metadataexchange.config.MetadataExchange`): the ALPN
    /// protocol (`istio-peer-exchange`) under which the client's metadata
    /// frame is read off the connection and this node's is written back.
    /// `None`: no such filter.
    pub metadata_exchange: Option<String>,
    /// The listener's `per_connection_buffer_limit_bytes`: the most request
    /// body kept for retries and mirrors when the route sets no
    /// `request_body_buffer_limit` (Envoy's retry buffer); `None`: Ferry's
    /// default.
    pub request_buffer_limit: Option<u32>,
}

/// Istio's `istio.stats` filter (`stats.PluginConfig`) as Ferry applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioStats {
    pub reporter: Reporter,
    /// Never take `destination_service` from the `Host` header when the
    /// cluster does not name the service.
    pub disable_host_header_fallback: bool,
}

/// Which side of a connection reports a metric (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The client's proxy (outbound listeners).
    Source,
    /// The server's proxy (inbound listeners).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The terminal network filter of a chain.
#[derive(Debug)]
pub enum ChainKind {
    Tcp(TcpProxy),
    Http(HttpConnectionManager),
}

impl ChainKind {
    pub fn referenced_clusters(&self) -> Vec<&str> {
        match self {
            ChainKind::Tcp(t) if t.weighted.is_empty() => vec![t.cluster.as_str()],
            ChainKind::Tcp(t) => t.weighted.iter().map(|(c, _)| c.as_str()).collect(),
            ChainKind::Http(h) => match &h.routes {
                RouteSource::Inline(rc) => rc.referenced_clusters(),
                RouteSource::Rds(_) => Vec::new(),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct TcpProxy {
    pub stat_prefix: String,
    /// The cluster (with `weighted`: the first of them).
    pub cluster: String,
    /// `weighted_clusters`: each connection goes to one of these, chosen
    /// in proportion to the weights (all positive); empty for one cluster.
    pub weighted: Vec<(String, u32)>,
    /// Envoy's default is one hour; `None` disables the timeout.
    pub idle_timeout: Option<Duration>,
    /// One entry per connection, when it closes.
    pub access_logs: Arc<crate::access_log::AccessLogs>,
    /// `max_connect_attempts`: upstream connections tried (on other hosts
    /// when there are) before the connection is given up (Envoy's default 1).
    pub max_connect_attempts: u32,
    /// `max_downstream_connection_duration`: the connection is closed at
    /// this age, busy or not.
    pub max_downstream_connection_duration: Option<Duration>,
    /// `hash_policy` with `source_ip`: ring hash and Maglev pick the host
    /// by the client's address.
    pub hash_source_ip: bool,
    /// `tunneling_config`: the connection is carried as an HTTP/2 CONNECT
    /// stream over the cluster's connection instead of raw bytes.
    pub tunneling: Option<Tunneling>,
}

/// `TcpProxy.TunnelingConfig`: how the CONNECT request is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunneling {
    /// The `:authority` of the CONNECT request.
    pub hostname: TunnelHost,
    /// `headers_to_add` with literal values (appended).
    pub headers: Vec<(String, String)>,
}

/// `tunneling_config.hostname`: a literal, or the downstream connection's
/// local (original destination) address, Istio's
/// `%DOWNSTREAM_LOCAL_ADDRESS%`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelHost {
    Literal(String),
    DownstreamLocalAddress,
}

impl TcpProxy {
    /// The cluster of a new connection; `roll` is uniform in
    /// `0..total weight` (any value for a single cluster).
    pub fn pick_cluster(&self, roll: u64) -> &str {
        let mut left = roll;
        for (name, w) in &self.weighted {
            if left < u64::from(*w) {
                return name;
            }
            left -= u64::from(*w);
        }
        &self.cluster
    }

    /// The sum of the weights (0 for a single cluster).
    pub fn total_weight(&self) -> u64 {
        self.weighted.iter().map(|(_, w)| u64::from(*w)).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpCodec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub codec: HttpCodec,
    pub routes: RouteSource,
    pub generate_request_id: bool,
    /// Idle timeout of a downstream connection (Envoy default 1h).
    pub idle_timeout: Option<Duration>,
    /// Idle timeout of a single stream (Envoy default 5 min).
    pub stream_idle_timeout: Option<Duration>,
    /// How long the whole request may take to arrive (Envoy default: none).
    pub request_timeout: Option<Duration>,
    pub use_remote_address: bool,
    /// What happens to `x-forwarded-client-cert` (Envoy's default: removed).
    pub forward_client_cert: ForwardClientCert,
    /// What the element added for an mTLS client carries.
    pub client_cert_details: ClientCertDetails,
    /// The HTTP filters Ferry runs before the router, in order.
    pub http_filters: Vec<HttpFilter>,
    /// Who the client is and whether it is trusted (XFF, internal addresses).
    pub client_trust: crate::forwarded::ClientTrust,
    /// The router's `suppress_envoy_headers`: no `x-envoy-overloaded`,
    /// `x-envoy-expected-rq-timeout-ms` and the like.
    pub suppress_envoy_headers: bool,
    /// One entry per request, when it ends.
    pub access_logs: Arc<crate::access_log::AccessLogs>,
    /// `tracing`: the spans of its requests.
    pub tracing: Option<Arc<crate::tracing::Tracing>>,
    /// What is done to the request path before routing and the filters
    /// (`normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`).
    pub path_normalization: PathNormalization,
    /// Limits and protocol options enforced on the downstream clients
    /// (shared: every connection holds it).
    pub protocol: Arc<crate::http_protocol::DownstreamProtocol>,
    /// `server_name` and `server_header_transformation`.
    pub server_header: ServerHeader,
    /// `upgrade_configs`: the upgrade types (lower case) allowed or refused
    /// unless the route says otherwise; any other type is refused (403).
    pub upgrades: Vec<(String, bool)>,
}

impl HttpConnectionManager {
    /// Whether the connection manager lets an upgrade of this type through
    /// (a route's own `upgrade_configs` may still override it).
    pub fn allows_upgrade(&self, upgrade_type: &str) -> bool {
        self.upgrades
            .iter()
            .any(|(t, enabled)| *enabled && t.eq_ignore_ascii_case(upgrade_type))
    }
}

/// The `server` header of every response, local replies included
/// (`server_header_transformation` with `server_name`, Envoy's default being
/// to overwrite it with `envoy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerHeader {
    /// Always this value.
    Overwrite(http::HeaderValue),
    /// This value when the response has none.
    AppendIfAbsent(http::HeaderValue),
    /// Left as it is (absent from local replies).
    PassThrough,
}

impl ServerHeader {
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        match self {
            ServerHeader::Overwrite(v) => {
                headers.insert(http::header::SERVER, v.clone());
            }
            ServerHeader::AppendIfAbsent(v) => {
                if !headers.contains_key(http::header::SERVER) {
                    headers.insert(http::header::SERVER, v.clone());
                }
            }
            ServerHeader::PassThrough => {}
        }
    }
}

/// The connection manager's path normalization settings. The default is
/// Envoy's when none of the fields is set: the path is left as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathNormalization {
    /// `normalize_path`: RFC 3986 dot-segment removal, percent-decoding of
    /// unreserved characters, backslashes read as slashes.
    pub normalize_path: bool,
    /// `merge_slashes`: adjacent slashes become one.
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action`.
    pub escaped_slashes: EscapedSlashesAction,
}

/// `path_with_escaped_slashes_action`: what a path with `%2F` or `%5C` (in
/// either case) gets. `IMPLEMENTATION_SPECIFIC_DEFAULT` is `KeepUnchanged`,
/// as Envoy resolves it without a runtime override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashesAction {
    #[default]
    KeepUnchanged,
    /// Answered 400.
    RejectRequest,
    /// Answered 307 with the unescaped (and normalized) path as `Location`.
    UnescapeAndRedirect,
    /// Unescaped, then normalized and forwarded.
    UnescapeAndForward,
}

/// `forward_client_cert_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardClientCert {
    /// Remove the header.
    #[default]
    Sanitize,
    /// Forward it unchanged on mTLS connections, remove it otherwise.
    ForwardOnly,
    /// Forward it unchanged always.
    AlwaysForwardOnly,
    /// On mTLS connections append this connection's element, else remove.
    AppendForward,
    /// On mTLS connections replace it by this connection's element, else remove.
    SanitizeSet,
}

/// `set_current_client_cert_details` (By and Hash are always there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientCertDetails {
    pub subject: bool,
    pub uri: bool,
    pub dns: bool,
}

/// One implemented HTTP filter of a connection manager, with the name
/// per-route overrides (`typed_per_filter_config`) refer to it by.
#[derive(Debug, Clone)]
pub struct HttpFilter {
    pub name: String,
    pub config: HttpFilterConfig,
}

#[derive(Debug, Clone)]
pub enum HttpFilterConfig {
    Fault(Arc<crate::fault::FaultConfig>),
    /// `envoy.filters.http.cors`: the policies come from the routes.
    Cors,
    LocalRateLimit(Arc<crate::ratelimit::LocalRateLimit>),
    /// `envoy.filters.http.rbac`.
    Rbac(Arc<crate::rbac::HttpRbac>),
    /// `istio.stats`: observes every request, never changes one.
    IstioStats(IstioStats),
    /// `envoy.filters.http.jwt_authn`.
    JwtAuthn(Arc<crate::jwt::JwtAuthn>),
    /// `envoy.filters.http.ext_authz`.
    ExtAuthz(Arc<crate::ext_authz::ExtAuthz>),
    /// `envoy.filters.http.compressor` (response direction).
    Compressor(Arc<crate::compressor::Compressor>),
    /// `envoy.filters.http.set_filter_state`.
    SetFilterState(Arc<crate::filter_state::SetFilterState>),
}

/// Where a connection manager's route table comes from.
#[derive(Debug, Clone)]
pub enum RouteSource {
    Inline(Arc<RouteConfig>),
    /// A route configuration delivered by RDS, looked up by name in the
    /// current snapshot for every request, so route changes reach
    /// long-lived connections.
    Rds(String),
}

/// The steps of filter chain selection, in Envoy's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainStep {
    DestinationPort,
    DestinationIp,
    ServerName,
    TransportProtocol,
    ApplicationProtocols,
    DirectSourceIp,
    SourceType,
    SourceIp,
    SourcePort,
}

impl ChainStep {
    /// The `filter_chain_match` field the step reads.
    pub fn field(self) -> &'static str {
        match self {
            ChainStep::DestinationPort => "destination_port",
            ChainStep::DestinationIp => "prefix_ranges",
            ChainStep::ServerName => "server_names",
            ChainStep::TransportProtocol => "transport_protocol",
            ChainStep::ApplicationProtocols => "application_protocols",
            ChainStep::DirectSourceIp => "direct_source_prefix_ranges",
            ChainStep::SourceType => "source_type",
            ChainStep::SourceIp => "source_prefix_ranges",
            ChainStep::SourcePort => "source_ports",
        }
    }
}

/// Whether choosing a chain still depends on what the client sends first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetectionNeeds {
    pub tls: bool,
    pub http: bool,
}

impl DetectionNeeds {
    pub fn any(self) -> bool {
        self.tls || self.http
    }
}

impl Listener {
    /// Every address the listener serves.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        std::iter::once(self.address).chain(self.additional_addresses.iter().copied())
    }

    /// Whether a chain with this fingerprint is one of this listener's
    /// (the default chain included).
    pub fn has_chain(&self, fingerprint: u64) -> bool {
        self.filter_chains
            .iter()
            .chain(&self.default_chain)
            .any(|c| c.fingerprint == fingerprint)
    }

    /// Chooses the filter chain for a connection (Envoy's matching order).
    pub fn select_chain(&self, info: &ConnectionInfo) -> Option<&Arc<FilterChain>> {
        self.select_chain_observed(info, |_, _| {})
    }

    /// [`Listener::select_chain`], telling `observe` which candidates are
    /// left after each step (what `/explain` reports; a no-op otherwise).
    pub fn select_chain_observed(
        &self,
        info: &ConnectionInfo,
        mut observe: impl FnMut(ChainStep, &[&Arc<FilterChain>]),
    ) -> Option<&Arc<FilterChain>> {
        if let Some(m) = &self.filter_chain_matcher {
            use crate::chain_matcher::Selection;
            return match m.select(info) {
                Selection::Chain(i) => self.filter_chains.get(i),
                Selection::Missing => None,
                Selection::NoMatch => self.default_chain.as_ref(),
            };
        }
        let mut cands: Vec<&Arc<FilterChain>> = self.filter_chains.iter().collect();
        narrow_destination_port(&mut cands, info);
        observe(ChainStep::DestinationPort, &cands);
        narrow_destination_ip(&mut cands, info);
        observe(ChainStep::DestinationIp, &cands);
        narrow_server_name(&mut cands, info.server_name.as_deref());
        observe(ChainStep::ServerName, &cands);
        narrow(&mut cands, |m| {
            match (&m.transport_protocol, info.transport_protocol) {
                (None, _) => Some(false),
                (Some(t), Some(got)) if t == got => Some(true),
                (Some(t), None) if t == "raw_buffer" => Some(true),
                _ => None,
            }
        });
        observe(ChainStep::TransportProtocol, &cands);
        narrow(&mut cands, |m| {
            if m.application_protocols.is_empty() {
                Some(false)
            } else if m
                .application_protocols
                .iter()
                .any(|p| info.application_protocols.iter().any(|a| a == p))
            {
                Some(true)
            } else {
                None
            }
        });
        observe(ChainStep::ApplicationProtocols, &cands);
        narrow_direct_source_ip(&mut cands, info);
        observe(ChainStep::DirectSourceIp, &cands);
        narrow_source_type(&mut cands, info);
        observe(ChainStep::SourceType, &cands);
        narrow_source_ip(&mut cands, info);
        observe(ChainStep::SourceIp, &cands);
        narrow_source_port(&mut cands, info);
        observe(ChainStep::SourcePort, &cands);
        cands.first().copied().or(self.default_chain.as_ref())
    }

    /// Which inspections could change the chain chosen for this destination.
    /// When the candidates left after the address steps do not care about the
    /// transport or application protocol, no byte needs to be awaited.
    pub fn detection_needs(&self, destination: Option<SocketAddr>) -> DetectionNeeds {
        if let Some(m) = &self.filter_chain_matcher {
            return self.matcher_detection_needs(m, destination);
        }
        let info = ConnectionInfo {
            destination,
            ..Default::default()
        };
        let mut cands: Vec<&Arc<FilterChain>> = self.filter_chains.iter().collect();
        narrow_destination_port(&mut cands, &info);
        narrow_destination_ip(&mut cands, &info);
        let mut needs = DetectionNeeds::default();
        let tls = self.listener_filters.tls_inspector_for(destination);
        let http = self.listener_filters.http_inspector_for(destination);
        for c in cands {
            let m = &c.filter_chain_match;
            if tls && (m.transport_protocol.is_some() || !m.server_names.is_empty()) {
                needs.tls = true;
            }
            if !m.application_protocols.is_empty() && (http || tls) {
                needs.http |= http;
                needs.tls |= tls;
            }
        }
        needs
    }
}

impl Listener {
    /// What a `filter_chain_matcher` reads that only the inspectors learn:
    /// server name and transport protocol from the TLS inspector,
    /// application protocols from either.
    fn matcher_detection_needs(
        &self,
        m: &crate::chain_matcher::ChainMatcher,
        destination: Option<SocketAddr>,
    ) -> DetectionNeeds {
        use crate::chain_matcher::Input;
        let tls = self.listener_filters.tls_inspector_for(destination);
        let http = self.listener_filters.http_inspector_for(destination);
        let mut needs = DetectionNeeds::default();
        for input in m.inputs() {
            match *input {
                Input::ServerName | Input::TransportProtocol => needs.tls |= tls,
                Input::ApplicationProtocol => {
                    needs.tls |= tls;
                    needs.http |= http;
                }
                _ => {}
            }
        }
        needs
    }
}

/// Keeps the candidates whose predicate says "specific match" (`Some(true)`),
/// or failing that those that leave the criterion open (`Some(false)`).
fn narrow(cands: &mut Vec<&Arc<FilterChain>>, f: impl Fn(&FilterChainMatch) -> Option<bool>) {
    let results: Vec<Option<bool>> = cands.iter().map(|c| f(&c.filter_chain_match)).collect();
    let want = if results.contains(&Some(true)) {
        Some(true)
    } else {
        Some(false)
    };
    let mut i = 0;
    cands.retain(|_| {
        let keep = results[i] == want;
        i += 1;
        keep
    });
}

/// Like [`narrow`] with a rank: the highest rank wins (longest prefix).
fn narrow_ranked(cands: &mut Vec<&Arc<FilterChain>>, f: impl Fn(&FilterChainMatch) -> Option<i32>) {
    let ranks: Vec<Option<i32>> = cands.iter().map(|c| f(&c.filter_chain_match)).collect();
    let best = ranks.iter().flatten().copied().max();
    let mut i = 0;
    cands.retain(|_| {
        let keep = best.is_some() && ranks[i] == best;
        i += 1;
        keep
    });
}

fn prefix_rank(ranges: &[CidrRange], ip: Option<IpAddr>) -> Option<i32> {
    if ranges.is_empty() {
        return Some(-1);
    }
    let ip = ip?;
    ranges
        .iter()
        .filter(|r| r.contains(ip))
        .map(|r| i32::from(r.prefix_len))
        .max()
}

fn narrow_destination_port(cands: &mut Vec<&Arc<FilterChain>>, info: &ConnectionInfo) {
    let port = info.destination.map(|d| d.port());
    narrow(cands, |m| match m.destination_port {
        None => Some(false),
        Some(p) if Some(p) == port => Some(true),
        Some(_) => None,
    });
}

fn narrow_destination_ip(cands: &mut Vec<&Arc<FilterChain>>, info: &ConnectionInfo) {
    let ip = info.destination.map(|d| d.ip());
    narrow_ranked(cands, |m| prefix_rank(&m.prefix_ranges, ip));
}

fn narrow_server_name(cands: &mut Vec<&Arc<FilterChain>>, sni: Option<&str>) {
    narrow_ranked(cands, |m| {
        if m.server_names.is_empty() {
            return Some(0);
        }
        let sni = sni?;
        m.server_names
            .iter()
            .filter_map(|n| {
                if n.eq_ignore_ascii_case(sni) {
                    Some(i32::MAX)
                } else if let Some(suffix) = n.strip_prefix('*') {
                    let matches = sni.len() > suffix.len()
                        && sni[sni.len() - suffix.len()..].eq_ignore_ascii_case(suffix);
                    matches.then(|| i32::try_from(suffix.len()).unwrap_or(i32::MAX - 1))
                } else {
                    None
                }
            })
            .max()
    });
}

fn narrow_direct_source_ip(cands: &mut Vec<&Arc<FilterChain>>, info: &ConnectionInfo) {
    let ip = info.source.map(|s| s.ip());
    narrow_ranked(cands, |m| prefix_rank(&m.direct_source_prefix_ranges, ip));
}

/// Whether the connection comes from this host: a loopback source, or the
/// destination's own address (Envoy's `SAME_IP_OR_LOOPBACK`).
pub fn is_local_source(info: &ConnectionInfo) -> bool {
    info.source
        .is_some_and(|s| s.ip().is_loopback() || info.destination.is_some_and(|d| d.ip() == s.ip()))
}

fn narrow_source_type(cands: &mut Vec<&Arc<FilterChain>>, info: &ConnectionInfo) {
    let local = is_local_source(info);
    narrow(cands, |m| match m.source_type {
        SourceType::Any => Some(false),
        SourceType::SameIpOrLoopback if local => Some(true),
        SourceType::External if !local && info.source.is_some() => Some(true),
        _ => None,
    });
}

fn narrow_source_ip(cands: &mut Vec<&Arc<FilterChain>>, info: &ConnectionInfo) {
    let ip = info.source.map(|s| s.ip());
    narrow_ranked(cands, |m| prefix_rank(&m.source_prefix_ranges, ip));
}

fn narrow_source_port(cands: &mut Vec<&Arc<FilterChain>>, info: &ConnectionInfo) {
    let port = info.source.map(|s| s.port());
    narrow(cands, |m| {
        if m.source_ports.is_empty() {
            Some(false)
        } else if port.is_some_and(|p| m.source_ports.contains(&p)) {
            Some(true)
        } else {
            None
        }
    });
}

#[cfg(test)]
mod tests {

    #[test]
    fn weighted_tcp_clusters_split_by_weight() {
        let tp = TcpProxy {
            stat_prefix: "t".into(),
            cluster: "v1".into(),
            weighted: vec![("v1".into(), 80), ("v2".into(), 20)],
            idle_timeout: None,
            access_logs: Default::default(),
            max_connect_attempts: 1,
            max_downstream_connection_duration: None,
            hash_source_ip: false,
            tunneling: None,
        };
        assert_eq!(tp.total_weight(), 100);
        assert_eq!(tp.pick_cluster(0), "v1");
        assert_eq!(tp.pick_cluster(79), "v1");
        assert_eq!(tp.pick_cluster(80), "v2");
        assert_eq!(tp.pick_cluster(99), "v2");
        let counts = (0..100).filter(|r| tp.pick_cluster(*r) == "v2").count();
        assert_eq!(counts, 20);
        let single = TcpProxy {
            weighted: Vec::new(),
            ..tp
        };
        assert_eq!(single.total_weight(), 0);
        assert_eq!(single.pick_cluster(0), "v1");
    }
    use super::*;
    use crate::route::RouteConfig;

    fn chain(name: &str, m: FilterChainMatch) -> Arc<FilterChain> {
        Arc::new(FilterChain {
            name: name.into(),
            fingerprint: 0,
            fingerprint_without_network_rbac: 0,
            filter_chain_match: m,
            tls: None,
            rbac: Vec::new(),
            ext_authz: Vec::new(),
            set_filter_state: Vec::new(),
            istio_stats: None,
            metadata_exchange: None,
            request_buffer_limit: None,
            kind: ChainKind::Tcp(TcpProxy {
                stat_prefix: name.into(),
                cluster: "c".into(),
                weighted: Vec::new(),
                idle_timeout: None,
                access_logs: Default::default(),
                max_connect_attempts: 1,
                max_downstream_connection_duration: None,
                hash_source_ip: false,
                tunneling: None,
            }),
        })
    }

    fn listener(chains: Vec<Arc<FilterChain>>) -> Listener {
        Listener {
            name: "l".into(),
            fingerprint: 0,
            settings_fingerprint: 0,
            address: "0.0.0.0:15001".parse().unwrap(),
            additional_addresses: vec![],
            bind_to_port: true,
            internal: false,
            use_original_dst: true,
            listener_filters: ListenerFilters {
                original_dst: true,
                tls_inspector: true,
                http_inspector: true,
                ..ListenerFilters::default()
            },
            detection_timeout: None,
            close_on_detection_timeout: false,
            filter_chains: chains,
            default_chain: Some(chain("default", FilterChainMatch::default())),
            filter_chain_matcher: None,
            tcp_keepalive: None,
            access_logs: Default::default(),
        }
    }

    #[test]
    fn direct_source_and_source_type_narrow_the_chains() {
        let cidr = |s: &str| {
            let (ip, len) = s.split_once('/').unwrap();
            CidrRange::new(ip.parse().unwrap(), len.parse().unwrap()).unwrap()
        };
        let l = listener(vec![
            chain(
                "peers",
                FilterChainMatch {
                    direct_source_prefix_ranges: vec![cidr("10.1.0.0/16")],
                    ..Default::default()
                },
            ),
            chain(
                "local",
                FilterChainMatch {
                    source_type: SourceType::SameIpOrLoopback,
                    ..Default::default()
                },
            ),
            chain(
                "external",
                FilterChainMatch {
                    source_type: SourceType::External,
                    ..Default::default()
                },
            ),
        ]);
        let pick = |src: &str, dst: &str| {
            let info = ConnectionInfo {
                destination: Some(dst.parse().unwrap()),
                source: Some(src.parse().unwrap()),
                ..Default::default()
            };
            l.select_chain(&info).map(|c| c.name.clone()).unwrap()
        };
        // The direct source is matched before the source type.
        assert_eq!(pick("10.1.2.3:4000", "10.9.9.9:80"), "peers");
        assert_eq!(pick("127.0.0.1:4000", "10.9.9.9:80"), "local");
        assert_eq!(pick("10.9.9.9:4000", "10.9.9.9:80"), "local", "same IP");
        assert_eq!(pick("10.2.0.1:4000", "10.9.9.9:80"), "external");
    }

    #[test]
    fn listener_filter_predicates_match_destination_ports() {
        let istio = PortPredicate::Range(15006, 15007);
        assert!(istio.matches(Some(15006)));
        assert!(!istio.matches(Some(15007)), "the range ends before `end`");
        let not_http = PortPredicate::Not(Box::new(PortPredicate::Or(vec![
            PortPredicate::Range(80, 81),
            PortPredicate::Range(8080, 8081),
        ])));
        assert!(not_http.matches(Some(443)));
        assert!(!not_http.matches(Some(8080)));
        assert!(
            PortPredicate::And(vec![PortPredicate::Any, PortPredicate::Range(1, 2)])
                .matches(Some(1))
        );
        let filters = ListenerFilters {
            tls_inspector: true,
            tls_inspector_disabled: Some(istio),
            ..ListenerFilters::default()
        };
        assert!(!filters.tls_inspector_for(Some("10.0.0.1:15006".parse().unwrap())));
        assert!(filters.tls_inspector_for(Some("10.0.0.1:8443".parse().unwrap())));
        // A listener whose TLS inspector is off for the port does not wait
        // for a ClientHello there.
        let mut l = listener(vec![chain(
            "tls",
            FilterChainMatch {
                transport_protocol: Some("tls".into()),
                ..Default::default()
            },
        )]);
        l.listener_filters = filters;
        assert!(
            !l.detection_needs(Some("10.0.0.1:15006".parse().unwrap()))
                .tls
        );
        assert!(
            l.detection_needs(Some("10.0.0.1:8443".parse().unwrap()))
                .tls
        );
    }

    fn info(dst: &str, tp: &'static str, alpn: &[&str]) -> ConnectionInfo {
        ConnectionInfo {
            destination: Some(dst.parse().unwrap()),
            source: Some("10.0.0.9:40000".parse().unwrap()),
            server_name: None,
            transport_protocol: Some(tp),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn port_then_protocol_then_default() {
        let l = listener(vec![
            chain(
                "9080-http",
                FilterChainMatch {
                    destination_port: Some(9080),
                    application_protocols: vec!["http/1.1".into(), "h2c".into()],
                    ..Default::default()
                },
            ),
            chain(
                "9080-tcp",
                FilterChainMatch {
                    destination_port: Some(9080),
                    ..Default::default()
                },
            ),
            chain(
                "net-10",
                FilterChainMatch {
                    prefix_ranges: vec!["10.0.0.0/8".parse().unwrap()],
                    ..Default::default()
                },
            ),
            chain(
                "net-10-1",
                FilterChainMatch {
                    prefix_ranges: vec!["10.1.0.0/16".parse().unwrap()],
                    ..Default::default()
                },
            ),
        ]);
        let pick = |i: &ConnectionInfo| l.select_chain(i).unwrap().name.clone();
        assert_eq!(
            pick(&info("10.1.1.1:9080", "raw_buffer", &["http/1.1"])),
            "9080-http"
        );
        assert_eq!(pick(&info("10.1.1.1:9080", "raw_buffer", &[])), "9080-tcp");
        assert_eq!(pick(&info("10.1.1.1:9080", "tls", &["h2"])), "9080-tcp");
        assert_eq!(pick(&info("10.1.1.1:80", "raw_buffer", &[])), "net-10-1");
        assert_eq!(pick(&info("10.2.1.1:80", "raw_buffer", &[])), "net-10");
        assert_eq!(pick(&info("192.168.1.1:80", "raw_buffer", &[])), "default");
        // No backtracking, as in Envoy: a specific transport match that then
        // fails on ALPN does not fall back to a chain without transport.
        let l2 = listener(vec![
            chain(
                "raw-http",
                FilterChainMatch {
                    transport_protocol: Some("raw_buffer".into()),
                    application_protocols: vec!["http/1.1".into()],
                    ..Default::default()
                },
            ),
            chain("any", FilterChainMatch::default()),
        ]);
        let got = l2
            .select_chain(&info("1.1.1.1:1", "raw_buffer", &[]))
            .unwrap();
        assert_eq!(got.name, "default");
        assert!(
            l.detection_needs(Some("10.1.1.1:9080".parse().unwrap()))
                .any()
        );
        assert!(
            !l.detection_needs(Some("10.1.1.1:3306".parse().unwrap()))
                .any()
        );
        let _ = RouteConfig::default();
    }

    #[test]
    fn server_names_exact_beats_wildcard() {
        let l = listener(vec![
            chain(
                "wild",
                FilterChainMatch {
                    server_names: vec!["*.example.com".into()],
                    ..Default::default()
                },
            ),
            chain(
                "exact",
                FilterChainMatch {
                    server_names: vec!["api.example.com".into()],
                    ..Default::default()
                },
            ),
        ]);
        let mut i = info("1.2.3.4:443", "tls", &[]);
        i.server_name = Some("api.example.com".into());
        assert_eq!(l.select_chain(&i).unwrap().name, "exact");
        i.server_name = Some("www.example.com".into());
        assert_eq!(l.select_chain(&i).unwrap().name, "wild");
        i.server_name = Some("other.org".into());
        assert_eq!(l.select_chain(&i).unwrap().name, "default");
    }
}
