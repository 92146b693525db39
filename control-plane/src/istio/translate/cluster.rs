//! Clusters and their endpoints: `outbound|PORT|SUBSET|HOST` for every
//! service port the proxy imports (one per DestinationRule subset too), the
//! `inbound|PORT||` clusters to the local application, and istiod's fixed
//! clusters (`BlackHoleCluster`, `PassthroughCluster`,
//! `InboundPassthroughClusterIpv4`). DestinationRule traffic policies become
//! load balancing, circuit breakers, HTTP protocol options, outlier
//! detection and upstream TLS here.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, UpstreamConnectionOptions,
    circuit_breakers::Thresholds,
    cluster::TransportSocketMatch,
    cluster::{
        ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig, LbConfig, LbPolicy,
        LeastRequestLbConfig, MaglevLbConfig, RingHashLbConfig, RoundRobinLbConfig,
        SlowStartConfig,
        common_lb_config::{LocalityConfigSpecifier, LocalityWeightedLbConfig},
    },
};
use envoy_types::pb::envoy::config::core::v3::{
    BindConfig, DataSource, Http1ProtocolOptions, Http2ProtocolOptions,
    HttpProtocolOptions as CommonHttpOptions, Metadata, RuntimeDouble, SocketAddress, TcpKeepalive,
    TransportSocket, UpstreamHttpProtocolOptions, data_source, socket_address::PortSpecifier,
    transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, TlsCertificate,
    TlsParameters, UpstreamTlsContext, common_tls_context::CombinedCertificateValidationContext,
    common_tls_context::ValidationContextType, subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig,
        explicit_http_config::ProtocolConfig,
    },
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, UInt64Value, Value, value::Kind};

use super::registry::{Endpoint as RegistryEndpoint, ServiceKind, selects};
use super::util::{ads, agent_sds, any, duration, seconds, socket_address};
use super::{ProxyConfig, Scope, Service, ServicePort};
use crate::istio::names::{self, Protocol};
use crate::istio::types::networking::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, Location, Resolution, SimpleLb,
    TrafficPolicy,
};
use crate::istio::types::security::MtlsMode;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;

pub const BLACKHOLE: &str = "BlackHoleCluster";
pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const INBOUND_PASSTHROUGH: &str = "InboundPassthroughClusterIpv4";
/// Source address of connections to the local application, so that the
/// interception rules let them through instead of capturing them again.
pub const INBOUND_BIND_ADDRESS: &str = "127.0.0.6";
const HTTP_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Envoy's "unlimited", istiod's default for every circuit breaker.
const UNLIMITED: u32 = u32::MAX;

pub(super) fn build(scope: &Scope<'_>, out: &mut ProxyConfig) {
    out.clusters.push(Cluster {
        name: BLACKHOLE.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(seconds(10)),
        ..Default::default()
    });
    out.clusters.push(original_dst(PASSTHROUGH, None));
    out.clusters.push(original_dst(
        INBOUND_PASSTHROUGH,
        Some(INBOUND_BIND_ADDRESS),
    ));
    // The outbound clusters come from [`outbound_all`], shared by the
    // proxies of one class (see `outbound`).
    if scope.proxy.node_type == super::NodeType::Router {
        // A gateway has no local application to deliver to.
        return;
    }
    for port in super::listener::inbound_ports(scope) {
        let name = names::inbound_cluster(port.port);
        let default_endpoint = port
            .ingress
            .and_then(|l| l.default_endpoint.as_deref())
            .filter(|e| !e.is_empty());
        let mut c = match default_endpoint {
            Some(ep) => match default_endpoint_cluster(scope, &name, ep) {
                Some(c) => c,
                // istiod skips an endpoint it cannot read (validation
                // refuses such a Sidecar first).
                None => continue,
            },
            None => original_dst(&name, Some(INBOUND_BIND_ADDRESS)),
        };
        if port.protocol.is_http() || port.protocol == Protocol::Unknown {
            c.typed_extension_protocol_options.insert(
                HTTP_OPTIONS_KEY.into(),
                any(&http_options(port.protocol, None)),
            );
        }
        c.metadata = Some(services_metadata(&port.services));
        out.clusters.push(c);
    }
}

/// The outbound clusters of every service port `scope` imports (and of
/// each DestinationRule subset), with the endpoints of those EDS discovers,
/// each sorted by name (stably: of equal names the last built wins, as in
/// the cache).
pub(super) fn outbound_all(scope: &Scope<'_>) -> super::outbound::Outbound {
    let mut out = ProxyConfig::default();
    for svc in &scope.services {
        for port in &svc.ports {
            outbound(scope, svc, port, None, &mut out);
            for subset in scope.subsets(svc) {
                outbound(
                    scope,
                    svc,
                    port,
                    Some((&subset.name, &subset.labels)),
                    &mut out,
                );
            }
        }
    }
    if scope.proxy.istio_network_stats {
        for c in &mut out.clusters {
            if speaks_peer_exchange(c) {
                c.filters
                    .push(envoy_types::pb::envoy::config::cluster::v3::Filter {
                        name: super::listener::METADATA_EXCHANGE.into(),
                        typed_config: Some(super::listener::metadata_exchange_config()),
                        ..Default::default()
                    });
            }
        }
    }
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
    out.endpoints
        .sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    super::outbound::Outbound {
        clusters: out.clusters,
        endpoints: out.endpoints,
    }
}

/// The inbound cluster of a Sidecar ingress listener's `defaultEndpoint`,
/// as istiod builds it: `127.0.0.1:PORT` (`[::1]:PORT`) is localhost,
/// `0.0.0.0:PORT` (`[::]:PORT`) the proxy's IP of that family (localhost
/// when it has none), `unix://PATH` a Unix socket. A connection to the
/// pod's IP leaves from 127.0.0.6, which capture lets through.
fn default_endpoint_cluster(scope: &Scope<'_>, name: &str, ep: &str) -> Option<Cluster> {
    use envoy_types::pb::envoy::config::core::v3::{Address, Pipe, address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    let ips = &scope.proxy.ips;
    let (address, bind) = if let Some(path) = ep.strip_prefix("unix://") {
        (
            Address {
                address: Some(address::Address::Pipe(Pipe {
                    path: path.to_string(),
                    mode: 0,
                })),
            },
            None,
        )
    } else {
        let (host, port) = ep.rsplit_once(':')?;
        let port: u32 = port.parse().ok()?;
        let family = |v6: bool| ips.iter().find(|ip| ip.contains(':') == v6).cloned();
        let (ip, pod) = match host.trim_matches(['[', ']']) {
            "0.0.0.0" => match family(false) {
                Some(ip) => (ip, true),
                None => ("127.0.0.1".to_string(), false),
            },
            "::" => match family(true) {
                Some(ip) => (ip, true),
                None => ("::1".to_string(), false),
            },
            "127.0.0.1" => ("127.0.0.1".to_string(), false),
            "::1" => ("::1".to_string(), false),
            _ => return None,
        };
        let bind = (pod && !scope.proxy.interception_none).then_some(INBOUND_BIND_ADDRESS);
        (super::util::socket_address(&ip, port), bind)
    };
    let mut c = original_dst(name, bind);
    c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
    c.lb_policy = LbPolicy::RoundRobin as i32;
    c.load_assignment = Some(ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(address),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    });
    Some(c)
}

/// A cluster that connects to the connection's original destination.
fn original_dst(name: &str, bind: Option<&str>) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        connect_timeout: Some(seconds(10)),
        lb_policy: LbPolicy::ClusterProvided as i32,
        circuit_breakers: Some(circuit_breakers(None)),
        upstream_bind_config: bind.map(|ip| BindConfig {
            source_address: Some(SocketAddress {
                address: ip.into(),
                port_specifier: Some(PortSpecifier::PortValue(0)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn outbound(
    scope: &Scope<'_>,
    svc: &Service,
    port: &ServicePort,
    subset: Option<(&str, &BTreeMap<String, String>)>,
    out: &mut ProxyConfig,
) {
    let name = names::outbound_cluster(port.port, subset.map_or("", |s| s.0), &svc.host);
    let policy = scope.traffic_policy(svc, port.port, subset.map(|s| s.0));
    let simple = policy.load_balancer.as_ref().and_then(|lb| lb.simple);
    let mut c = Cluster {
        name: name.clone(),
        connect_timeout: Some(
            policy
                .connection_pool
                .as_ref()
                .and_then(|cp| cp.tcp.as_ref())
                .and_then(|t| t.connect_timeout)
                .map_or(seconds(10), |d| duration(d.0)),
        ),
        circuit_breakers: Some(circuit_breakers(policy.connection_pool.as_ref())),
        metadata: Some(services_metadata(&[svc])),
        ..Default::default()
    };
    let endpoints: Vec<&RegistryEndpoint> = svc
        .endpoints
        .iter()
        .filter(|e| subset.is_none_or(|(_, labels)| selects(labels, &e.labels)))
        .collect();
    let headless = matches!(svc.kind, ServiceKind::Kube { headless: true });
    let resolution = match svc.kind {
        ServiceKind::Entry { resolution, .. } => Some(resolution),
        ServiceKind::Kube { .. } => None,
    };
    if simple == Some(SimpleLb::Passthrough) || headless || resolution == Some(Resolution::None) {
        // The caller already picked the address (headless DNS, a
        // passthrough rule or an entry without resolution).
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        ));
        c.lb_policy = LbPolicy::ClusterProvided as i32;
    } else if matches!(
        resolution,
        Some(Resolution::Dns | Resolution::DnsRoundRobin)
    ) {
        let dtype = if resolution == Some(Resolution::Dns) {
            DiscoveryType::StrictDns
        } else {
            DiscoveryType::LogicalDns
        };
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(dtype as i32));
        // Logical DNS takes exactly one address.
        let eps: Vec<&RegistryEndpoint> = if dtype == DiscoveryType::LogicalDns {
            endpoints.iter().take(1).copied().collect()
        } else {
            endpoints.clone()
        };
        c.load_assignment = Some(load_assignment(
            scope,
            &policy,
            &name,
            &svc.namespace,
            port.port,
            &eps,
        ));
        load_balancer(scope, &policy, &mut c);
    } else {
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
        c.eds_cluster_config = Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.clone(),
        });
        load_balancer(scope, &policy, &mut c);
        out.endpoints.push(load_assignment(
            scope,
            &policy,
            &name,
            &svc.namespace,
            port.port,
            &endpoints,
        ));
    }
    let auto_sni = policy.tls.as_ref().and_then(auto_sni_options);
    if port.protocol.is_http() || port.protocol == Protocol::Unknown {
        let mut options = http_options(port.protocol, policy.connection_pool.as_ref());
        options.upstream_http_protocol_options = auto_sni;
        c.typed_extension_protocol_options
            .insert(HTTP_OPTIONS_KEY.into(), any(&options));
    } else if auto_sni.is_some() {
        // istiod sets them whatever the port's protocol.
        c.typed_extension_protocol_options.insert(
            HTTP_OPTIONS_KEY.into(),
            any(&HttpProtocolOptions {
                upstream_http_protocol_options: auto_sni,
                ..Default::default()
            }),
        );
    }
    if let Some(tcp) = policy
        .connection_pool
        .as_ref()
        .and_then(|cp| cp.tcp.as_ref())
        && let Some(ka) = &tcp.tcp_keepalive
    {
        c.upstream_connection_options = Some(UpstreamConnectionOptions {
            tcp_keepalive: Some(TcpKeepalive {
                keepalive_probes: ka.probes.map(|v| UInt32Value { value: v }),
                keepalive_time: ka.time.map(|d| UInt32Value {
                    value: d.0.as_secs() as u32,
                }),
                keepalive_interval: ka.interval.map(|d| UInt32Value {
                    value: d.0.as_secs() as u32,
                }),
            }),
            ..Default::default()
        });
    }
    if let Some(od) = &policy.outlier_detection {
        c.outlier_detection = Some(outlier_detection(od));
        if let Some(min) = od.min_health_percent {
            c.common_lb_config
                .get_or_insert_with(CommonLbConfig::default)
                .healthy_panic_threshold = Some(Percent {
                value: f64::from(min),
            });
        }
    }
    match &policy.tls {
        Some(tls) => {
            c.transport_socket = upstream_tls(scope, svc, port.port, subset.map(|s| s.0), tls);
        }
        None => {
            c.transport_socket_matches =
                auto_mtls(scope, svc, port.port, subset.map(|s| s.0), &endpoints);
        }
    }
    if super::hbone::sends(scope) {
        use super::hbone::UpstreamTls;
        let tls = match policy.tls.as_ref().and_then(|t| t.mode) {
            None if policy.tls.is_none() => UpstreamTls::Auto,
            Some(ClientTlsMode::IstioMutual) => UpstreamTls::IstioMutual,
            _ => UpstreamTls::User,
        };
        super::hbone::apply_transport_socket_matches(&mut c, tls);
    }
    out.clusters.push(c);
}

fn load_balancer(scope: &Scope<'_>, policy: &TrafficPolicy, c: &mut Cluster) {
    let Some(lb) = &policy.load_balancer else {
        c.lb_policy = LbPolicy::LeastRequest as i32;
        return;
    };
    if super::locality::distributes(policy, &scope.proxy.locality) {
        c.common_lb_config
            .get_or_insert_with(CommonLbConfig::default)
            .locality_config_specifier = Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(
            LocalityWeightedLbConfig {},
        ));
    }
    if let Some(ch) = &lb.consistent_hash {
        if let Some(m) = &ch.maglev {
            c.lb_policy = LbPolicy::Maglev as i32;
            c.lb_config = Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
                table_size: m.table_size.map(|v| UInt64Value { value: v }),
            }));
        } else {
            c.lb_policy = LbPolicy::RingHash as i32;
            let min = ch
                .ring_hash
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(ch.minimum_ring_size)
                .unwrap_or(1024);
            c.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value { value: min }),
                ..Default::default()
            }));
        }
        return;
    }
    c.lb_policy = match lb.simple {
        Some(SimpleLb::RoundRobin) => LbPolicy::RoundRobin,
        Some(SimpleLb::Random) => LbPolicy::Random,
        // LEAST_CONN is the deprecated name of LEAST_REQUEST; istiod's
        // default is LEAST_REQUEST too.
        _ => LbPolicy::LeastRequest,
    } as i32;
    // Warm-up: new endpoints ramp up over the window (Envoy's slow start,
    // for round robin and least request only).
    let window = lb
        .warmup
        .as_ref()
        .and_then(|w| w.duration)
        .or(lb.warmup_duration_secs);
    if let Some(window) = window {
        let slow_start = SlowStartConfig {
            slow_start_window: Some(duration(window.0)),
            aggression: lb
                .warmup
                .as_ref()
                .and_then(|w| w.aggression)
                .map(|a| RuntimeDouble {
                    default_value: a,
                    runtime_key: String::new(),
                }),
            min_weight_percent: lb
                .warmup
                .as_ref()
                .and_then(|w| w.minimum_percent)
                .map(|p| Percent { value: p }),
        };
        if c.lb_policy == LbPolicy::RoundRobin as i32 {
            c.lb_config = Some(LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
                slow_start_config: Some(slow_start),
            }));
        } else if c.lb_policy == LbPolicy::LeastRequest as i32 {
            c.lb_config = Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                slow_start_config: Some(slow_start),
                ..Default::default()
            }));
        }
    }
}

/// istiod's thresholds: everything unlimited unless the connection pool
/// says otherwise.
fn circuit_breakers(cp: Option<&ConnectionPoolSettings>) -> CircuitBreakers {
    let mut t = Thresholds {
        max_connections: Some(UInt32Value { value: UNLIMITED }),
        max_pending_requests: Some(UInt32Value { value: UNLIMITED }),
        max_requests: Some(UInt32Value { value: UNLIMITED }),
        max_retries: Some(UInt32Value { value: UNLIMITED }),
        track_remaining: true,
        ..Default::default()
    };
    let positive = |v: Option<i32>| {
        v.filter(|v| *v > 0)
            .map(|v| UInt32Value { value: v as u32 })
    };
    if let Some(cp) = cp {
        if let Some(tcp) = &cp.tcp
            && let Some(v) = positive(tcp.max_connections)
        {
            t.max_connections = Some(v);
        }
        if let Some(http) = &cp.http {
            if let Some(v) = positive(http.http1_max_pending_requests) {
                t.max_pending_requests = Some(v);
            }
            if let Some(v) = positive(http.http2_max_requests) {
                t.max_requests = Some(v);
            }
            if let Some(v) = positive(http.max_retries) {
                t.max_retries = Some(v);
            }
        }
    }
    CircuitBreakers {
        thresholds: vec![t],
        ..Default::default()
    }
}

/// Upstream HTTP settings: HTTP/2 for `grpc`/`http2` ports (or an
/// `UPGRADE` policy), the downstream's protocol for ports of unknown
/// protocol, HTTP/1.1 otherwise; plus the pool's per-connection limits.
fn http_options(protocol: Protocol, cp: Option<&ConnectionPoolSettings>) -> HttpProtocolOptions {
    let http = cp.and_then(|cp| cp.http.as_ref());
    let tcp = cp.and_then(|cp| cp.tcp.as_ref());
    let upgrade = http.and_then(|h| h.h2_upgrade_policy)
        == Some(crate::istio::types::networking::H2UpgradePolicy::Upgrade);
    let h2 = Http2ProtocolOptions {
        max_concurrent_streams: http
            .and_then(|h| h.max_concurrent_streams)
            .filter(|v| *v > 0)
            .map(|v| UInt32Value { value: v as u32 }),
        ..Default::default()
    };
    let upstream = if http.is_some_and(|h| h.use_client_protocol)
        || (protocol == Protocol::Unknown && !upgrade)
    {
        UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
            http_protocol_options: Some(Http1ProtocolOptions::default()),
            http2_protocol_options: Some(h2),
            ..Default::default()
        })
    } else if protocol.is_http2() || upgrade {
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(h2)),
        })
    } else {
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::HttpProtocolOptions(
                Http1ProtocolOptions::default(),
            )),
        })
    };
    let mut common = CommonHttpOptions::default();
    let mut any_common = false;
    if let Some(d) = http
        .and_then(|h| h.idle_timeout)
        .or(tcp.and_then(|t| t.idle_timeout))
    {
        common.idle_timeout = Some(duration(d.0));
        any_common = true;
    }
    if let Some(v) = http
        .and_then(|h| h.max_requests_per_connection)
        .filter(|v| *v > 0)
    {
        common.max_requests_per_connection = Some(UInt32Value { value: v as u32 });
        any_common = true;
    }
    if let Some(d) = tcp.and_then(|t| t.max_connection_duration) {
        common.max_connection_duration = Some(duration(d.0));
        any_common = true;
    }
    HttpProtocolOptions {
        common_http_protocol_options: any_common.then_some(common),
        upstream_protocol_options: Some(upstream),
        ..Default::default()
    }
}

fn outlier_detection(od: &crate::istio::types::networking::OutlierDetection) -> OutlierDetection {
    let u32v = |v: u32| Some(UInt32Value { value: v });
    let mut out = OutlierDetection {
        interval: od.interval.map(|d| duration(d.0)),
        base_ejection_time: od.base_ejection_time.map(|d| duration(d.0)),
        max_ejection_percent: od.max_ejection_percent.map(|v| UInt32Value {
            value: v.clamp(0, 100) as u32,
        }),
        split_external_local_origin_errors: od.split_external_local_origin_errors,
        // Istio turns off what it did not ask for: Envoy would otherwise
        // enforce its own 5xx and success-rate defaults.
        enforcing_consecutive_5xx: u32v(0),
        enforcing_consecutive_gateway_failure: u32v(0),
        enforcing_success_rate: u32v(0),
        ..Default::default()
    };
    let five_xx = od
        .consecutive_5xx_errors
        .or(od.consecutive_errors.map(|v| v.max(0) as u32));
    if let Some(v) = five_xx {
        out.consecutive_5xx = u32v(v);
        out.enforcing_consecutive_5xx = u32v(if v > 0 { 100 } else { 0 });
    }
    if let Some(v) = od.consecutive_gateway_errors {
        out.consecutive_gateway_failure = u32v(v);
        out.enforcing_consecutive_gateway_failure = u32v(if v > 0 { 100 } else { 0 });
    }
    if let Some(v) = od.consecutive_local_origin_failures {
        out.consecutive_local_origin_failure = u32v(v);
        out.enforcing_consecutive_local_origin_failure = u32v(100);
    }
    out
}

/// Istio mTLS to a sidecar: the workload certificate and mesh root from
/// the agent's SDS, ALPN `istio-peer-exchange`/`istio`, the destination's
/// service accounts as expected SPIFFE identities (unless the rule names
/// its own), and istiod's SNI `outbound_.PORT_.SUBSET_.HOST`.
fn istio_mutual(
    scope: &Scope<'_>,
    svc: &Service,
    port: u32,
    subset: Option<&str>,
    tls: &ClientTlsSettings,
) -> UpstreamTlsContext {
    let san = |value: &str| SubjectAltNameMatcher {
        san_type: SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(value.to_string())),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut accounts: Vec<&str> = svc
        .endpoints
        .iter()
        .map(|e| e.service_account.as_str())
        .filter(|s| !s.is_empty())
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    let sans = if tls.subject_alt_names.is_empty() {
        accounts
            .iter()
            .map(|sa| {
                san(&format!(
                    "spiffe://{}/ns/{}/sa/{sa}",
                    scope.mesh.options.trust_domain, svc.namespace
                ))
            })
            .collect()
    } else {
        tls.subject_alt_names.iter().map(|s| san(s)).collect()
    };
    UpstreamTlsContext {
        sni: tls
            .sni
            .clone()
            .unwrap_or_else(|| format!("outbound_.{port}_.{}_.{}", subset.unwrap_or(""), svc.host)),
        common_tls_context: Some(CommonTlsContext {
            tls_params: Some(TlsParameters {
                tls_minimum_protocol_version: TlsProtocol::TlSv12 as i32,
                tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            // Only a proxy that speaks the TCP metadata exchange offers
            // its protocol (see `listener::inbound_tls`).
            alpn_protocols: if scope.proxy.istio_network_stats {
                vec![super::listener::PEER_EXCHANGE_ALPN.into(), "istio".into()]
            } else {
                vec!["istio".into()]
            },
            tls_certificate_sds_secret_configs: vec![agent_sds("default")],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: sans,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(agent_sds("ROOTCA")),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tls_socket(ctx: &UpstreamTlsContext) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(ctx))),
    }
}

/// Whether a cluster originates Istio mTLS offering the TCP metadata
/// exchange's ALPN (auto mTLS or a DestinationRule's ISTIO_MUTUAL): istiod
/// gives those the exchange as an upstream filter.
fn speaks_peer_exchange(c: &Cluster) -> bool {
    let offers = |ts: &TransportSocket| match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(a)) => {
            <UpstreamTlsContext as prost::Message>::decode(a.value.as_slice()).is_ok_and(|ctx| {
                ctx.common_tls_context.is_some_and(|common| {
                    common
                        .alpn_protocols
                        .iter()
                        .any(|p| p == super::listener::PEER_EXCHANGE_ALPN)
                })
            })
        }
        _ => false,
    };
    c.transport_socket.as_ref().is_some_and(offers)
        || c.transport_socket_matches
            .iter()
            .filter_map(|m| m.transport_socket.as_ref())
            .any(offers)
}

/// Auto mTLS as istiod does it when the DestinationRule sets no TLS:
/// endpoints whose metadata says `tlsMode: istio` (pods with a sidecar)
/// get Istio mTLS, the others plain TCP. Only written when some endpoint
/// can use it (otherwise the match never selects TLS), never to
/// mesh-external services, nor when the service's namespace disables
/// mTLS with a PeerAuthentication.
fn auto_mtls(
    scope: &Scope<'_>,
    svc: &Service,
    port: u32,
    subset: Option<&str>,
    endpoints: &[&RegistryEndpoint],
) -> Vec<TransportSocketMatch> {
    let external = matches!(
        svc.kind,
        ServiceKind::Entry {
            location: Location::MeshExternal,
            ..
        }
    );
    if external
        || !endpoints.iter().any(|e| e.istio_mtls())
        || scope.mesh.namespace_mtls(&svc.namespace) == Some(MtlsMode::Disable)
    {
        return Vec::new();
    }
    let ctx = istio_mutual(scope, svc, port, subset, &ClientTlsSettings::default());
    vec![
        TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(struct_of([("tlsMode", "istio")])),
            transport_socket: Some(tls_socket(&ctx)),
        },
        TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Struct::default()),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.raw_buffer".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(any(
                    &RawBuffer {},
                ))),
            }),
        },
    ]
}

/// istiod's `setAutoSniAndAutoSanValidation`: for SIMPLE and MUTUAL
/// origination without an `sni`, the request's host is sent as SNI, and
/// (certificates verified, no `subjectAltNames`) required as the server's
/// name.
fn auto_sni_options(tls: &ClientTlsSettings) -> Option<UpstreamHttpProtocolOptions> {
    let mode = tls.mode.unwrap_or(ClientTlsMode::Disable);
    if !matches!(mode, ClientTlsMode::Simple | ClientTlsMode::Mutual) || tls.sni.is_some() {
        return None;
    }
    Some(UpstreamHttpProtocolOptions {
        auto_sni: true,
        auto_san_validation: tls.subject_alt_names.is_empty()
            && tls.insecure_skip_verify != Some(true),
        ..Default::default()
    })
}

/// DestinationRule `tls` as an upstream TLS transport socket.
fn upstream_tls(
    scope: &Scope<'_>,
    svc: &Service,
    port: u32,
    subset: Option<&str>,
    tls: &ClientTlsSettings,
) -> Option<TransportSocket> {
    let mode = tls.mode.unwrap_or(ClientTlsMode::Disable);
    let file = |path: &str| DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    };
    let san = |kind: SanType, value: &str| SubjectAltNameMatcher {
        san_type: kind as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(value.to_string())),
            ..Default::default()
        }),
        ..Default::default()
    };
    let ctx = match mode {
        ClientTlsMode::Disable => return None,
        ClientTlsMode::IstioMutual => istio_mutual(scope, svc, port, subset, tls),
        ClientTlsMode::Simple | ClientTlsMode::Mutual => {
            let mut common = CommonTlsContext::default();
            if tls.insecure_skip_verify != Some(true) {
                let mut vc = CertificateValidationContext {
                    match_typed_subject_alt_names: tls
                        .subject_alt_names
                        .iter()
                        .map(|s| san(SanType::Dns, s))
                        .collect(),
                    ..Default::default()
                };
                // Without caCertificates istiod names the system's roots
                // (`file-root:system`, which istio-agent reads from the
                // OS bundle); the bundle's file is named here, so that every
                // proxy verifies the server (Envoy skips `system_root_certs`).
                let ca = tls
                    .ca_certificates
                    .clone()
                    .unwrap_or_else(|| ferry_xds::file_secrets::system_ca_bundle().to_string());
                vc.trusted_ca = Some(file(&ca));
                if let Some(crl) = &tls.ca_crl {
                    vc.crl = Some(file(crl));
                }
                common.validation_context_type = Some(ValidationContextType::ValidationContext(vc));
            }
            if mode == ClientTlsMode::Mutual
                && let (Some(cert), Some(key)) = (&tls.client_certificate, &tls.private_key)
            {
                common.tls_certificates.push(TlsCertificate {
                    certificate_chain: Some(file(cert)),
                    private_key: Some(file(key)),
                    ..Default::default()
                });
            }
            // Without an explicit SNI the request's host is sent (and
            // checked), through the cluster's `auto_sni` (see
            // [`auto_sni_options`]), as istiod does.
            UpstreamTlsContext {
                sni: tls.sni.clone().unwrap_or_default(),
                common_tls_context: Some(common),
                ..Default::default()
            }
        }
    };
    Some(tls_socket(&ctx))
}

/// The endpoints of one cluster, grouped by locality, with the rule's
/// locality weights or failover priorities for this proxy.
fn load_assignment(
    scope: &Scope<'_>,
    policy: &TrafficPolicy,
    cluster: &str,
    namespace: &str,
    service_port: u32,
    endpoints: &[&RegistryEndpoint],
) -> ClusterLoadAssignment {
    // As istiod: an endpoint whose workload's PeerAuthentication disables
    // mTLS on the target port is not offered mTLS by auto mTLS (its
    // `tlsMode` marker is left out), or its plaintext-only port would
    // refuse every handshake.
    let mtls = |e: &RegistryEndpoint| {
        let target = e.ports.get(&service_port).copied().unwrap_or(service_port);
        e.istio_mtls()
            && scope.mesh.workload_mtls(namespace, &e.labels, target) != MtlsMode::Disable
    };
    // `failoverPriority` labels: how many of them, in order, an endpoint
    // shares with the proxy decides its priority (all shared: 0).
    let priority_labels: &[String] = super::locality::setting(policy)
        .filter(|_| policy.outlier_detection.is_some())
        .map(|s| s.failover_priority.as_slice())
        .unwrap_or_default();
    // As istiod does, a proxy's and an endpoint's locality count as their
    // topology labels.
    use super::outbound::with_topology;
    let proxy_labels = with_topology(&scope.proxy.labels, &scope.proxy.locality);
    let label_priority = |e: &RegistryEndpoint| -> u32 {
        if priority_labels.is_empty() {
            return 0;
        }
        let labels = with_topology(&e.labels, &e.locality);
        let shared = priority_labels
            .iter()
            .take_while(|k| {
                let want = proxy_labels.get(*k);
                want.is_some() && labels.get(*k) == want
            })
            .count();
        (priority_labels.len() - shared) as u32
    };
    let mut by_locality: BTreeMap<(&str, u32), Vec<LbEndpoint>> = BTreeMap::new();
    for e in endpoints {
        by_locality
            .entry((e.locality.as_str(), label_priority(e)))
            .or_default()
            .push(lb_endpoint(scope, e, service_port, mtls(e)));
    }
    if by_locality.is_empty() {
        by_locality.insert(("", 0), Vec::new());
    }
    let mut groups: Vec<LocalityLbEndpoints> = by_locality
        .into_iter()
        .map(|((l, priority), lb_endpoints)| LocalityLbEndpoints {
            locality: super::locality::parse(l),
            lb_endpoints,
            priority,
            ..Default::default()
        })
        .collect();
    super::locality::apply(policy, &scope.proxy.locality, &mut groups);
    ClusterLoadAssignment {
        cluster_name: cluster.into(),
        endpoints: groups,
        ..Default::default()
    }
}

fn lb_endpoint(
    scope: &Scope<'_>,
    e: &RegistryEndpoint,
    service_port: u32,
    mtls: bool,
) -> LbEndpoint {
    let port = e.ports.get(&service_port).copied().unwrap_or(service_port);
    let mut metadata = Metadata::default();
    if super::hbone::tunnels_to(scope, e) {
        let endpoint = super::hbone::tunnel_endpoint(&e.address, port, &mut metadata);
        return LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(endpoint)),
            metadata: Some(metadata),
            load_balancing_weight: Some(UInt32Value {
                value: e.weight.unwrap_or(1).max(1),
            }),
            ..Default::default()
        };
    }
    if mtls {
        // What transport_socket_matches select on (`tlsMode: istio`).
        metadata.filter_metadata.insert(
            "envoy.transport_socket_match".into(),
            struct_of([("tlsMode", "istio")]),
        );
    }
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(&e.address, port)),
            ..Default::default()
        })),
        metadata: (!metadata.filter_metadata.is_empty()).then_some(metadata),
        load_balancing_weight: Some(UInt32Value {
            value: e.weight.unwrap_or(1).max(1),
        }),
        ..Default::default()
    }
}

fn struct_of<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), string_value(v)))
            .collect::<HashMap<_, _>>()
            .into_iter()
            .collect(),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// istiod's `istio.services` cluster metadata: which services a cluster
/// serves (used by telemetry and `istioctl`).
fn services_metadata(services: &[&Service]) -> Metadata {
    let list = services
        .iter()
        .map(|s| Value {
            kind: Some(Kind::StructValue(struct_of([
                ("host", s.host.as_str()),
                ("name", s.name.as_str()),
                ("namespace", s.namespace.as_str()),
            ]))),
        })
        .collect();
    let mut istio = Struct::default();
    istio.fields.insert(
        "services".into(),
        Value {
            kind: Some(Kind::ListValue(
                envoy_types::pb::google::protobuf::ListValue { values: list },
            )),
        },
    );
    let mut md = Metadata::default();
    md.filter_metadata.insert("istio".into(), istio);
    md
}
