//! Listeners in istiod's layout. `virtualOutbound` (15001) receives every
//! intercepted outbound connection and hands it, by original destination,
//! to a per-port listener (`0.0.0.0_9080` for HTTP with RDS route `9080`,
//! `VIP_PORT` for TCP services with a virtual IP) or to the catch-all
//! (PassthroughCluster, or BlackHoleCluster under REGISTRY_ONLY).
//! `virtualInbound` (15006) holds one filter chain per port the local
//! workload serves, routing to `inbound|PORT||`, and passthrough chains for
//! everything else; all of them carry the proxy's AuthorizationPolicies.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    CidrRange, TrafficDirection, TransportSocket, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, VirtualHost, route::Action,
    route_action::ClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
    http_connection_manager::{
        ForwardClientCertDetails, PathWithEscapedSlashesAction, RouteSpecifier,
        SetCurrentClientCertDetails, UpgradeConfig,
    },
    http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy,
    tcp_proxy::{
        ClusterSpecifier as TcpClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight,
    },
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SubjectAltNameMatcher,
    TlsParameters,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value};

use super::cluster::{BLACKHOLE, INBOUND_PASSTHROUGH, PASSTHROUGH};
use super::registry::{TLS_MODE_LABEL, TargetPort, selects};
use super::route::{self, CORS_FILTER, FAULT_FILTER};
use super::util::{ads, agent_sds, any, seconds, socket_address};
use super::{ProxyConfig, Scope, Service};
use crate::istio::names::{self, Protocol};
use crate::istio::types::networking::{CaptureMode, IstioIngressListener, OutboundMode};
use crate::istio::types::security::MtlsMode;

pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
pub const OUTBOUND_PORT: u32 = 15001;
pub const INBOUND_PORT: u32 = 15006;
pub(super) const HCM: &str = "envoy.filters.network.http_connection_manager";
pub(super) const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
/// What `http_inspector` reports for plaintext HTTP/1.1 and HTTP/2.
const HTTP_ALPN: [&str; 2] = ["http/1.1", "h2c"];

/// A port the local workload serves, and the services it serves it for.
pub(super) struct InboundPort<'a> {
    pub port: u32,
    pub protocol: Protocol,
    pub services: Vec<&'a Service>,
    /// The Sidecar ingress listener that declares the port, if one does.
    pub ingress: Option<&'a IstioIngressListener>,
}

/// The ports the local workload serves, keyed by the port the application
/// listens on: as istiod builds them, a Sidecar's ingress listeners alone
/// when it has any, else the ports of the services whose selector picks
/// this proxy (in its own namespace); none for a proxy without capture
/// and without ingress listeners (binding the services' ports would take
/// them from the application).
pub(super) fn inbound_ports<'a>(scope: &Scope<'a>) -> Vec<InboundPort<'a>> {
    let by_service = service_ports(scope);
    let ingress: Vec<&IstioIngressListener> = scope
        .sidecar
        .map(|(_, sc)| sc.ingress.iter().collect())
        .unwrap_or_default();
    if !ingress.is_empty() {
        let mut ports: BTreeMap<u32, InboundPort<'a>> = BTreeMap::new();
        for l in ingress {
            ports.entry(l.port.number).or_insert_with(|| InboundPort {
                port: l.port.number,
                protocol: l
                    .port
                    .protocol
                    .as_deref()
                    .map_or(Protocol::Unknown, Protocol::parse),
                // The services of that port name the telemetry, when any.
                services: by_service
                    .iter()
                    .find(|p| p.port == l.port.number)
                    .map(|p| p.services.clone())
                    .unwrap_or_default(),
                ingress: Some(l),
            });
        }
        return ports.into_values().collect();
    }
    if scope.proxy.interception_none {
        return Vec::new();
    }
    by_service
}

/// Where an inbound port's listener binds for real, when it does: an
/// ingress listener with `captureMode: NONE`, or with the default mode on
/// a proxy without capture; at its `bind`, else the proxy's IP.
pub(super) fn inbound_bind(scope: &Scope<'_>, p: &InboundPort<'_>) -> Option<String> {
    let l = p.ingress?;
    let binds = match l.capture_mode {
        Some(CaptureMode::None) => true,
        Some(CaptureMode::Iptables) => false,
        Some(CaptureMode::Default) | None => scope.proxy.interception_none,
    };
    binds.then(|| {
        l.bind
            .clone()
            .filter(|b| !b.is_empty())
            .or_else(|| scope.proxy.ips.first().cloned())
            .unwrap_or_else(|| "0.0.0.0".into())
    })
}

/// The ports of the services whose selector picks this proxy.
fn service_ports<'a>(scope: &Scope<'a>) -> Vec<InboundPort<'a>> {
    let proxy = scope.proxy;
    let pod_name = proxy
        .pod_name
        .as_deref()
        .map(|p| (p, proxy.namespace.as_str()));
    let workload = scope.mesh.registry.find_workload(pod_name, &proxy.ips);
    let mut ports: BTreeMap<u32, InboundPort<'a>> = BTreeMap::new();
    for svc in &scope.mesh.registry.services {
        let Some(sel) = &svc.selector else { continue };
        if svc.namespace != proxy.namespace || sel.is_empty() || !selects(sel, &proxy.labels) {
            continue;
        }
        for p in &svc.ports {
            let target = match &p.target {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => workload
                    .and_then(|w| w.named_ports.get(name).copied())
                    .unwrap_or(p.port),
            };
            let entry = ports.entry(target).or_insert_with(|| InboundPort {
                port: target,
                protocol: p.protocol,
                services: Vec::new(),
                ingress: None,
            });
            // HTTP wins over a weaker declaration of the same port.
            if entry.protocol == Protocol::Unknown
                || (p.protocol.is_http() && !entry.protocol.is_http())
            {
                entry.protocol = p.protocol;
            }
            if !entry.services.iter().any(|s| s.host == svc.host) {
                entry.services.push(svc);
            }
        }
    }
    ports.into_values().collect()
}

pub(super) fn build(scope: &Scope<'_>, out: &mut ProxyConfig) {
    let first = out.listeners.len();
    // Without capture nothing arrives at 15001/15006: the workload's ports
    // are real listeners instead.
    if !scope.proxy.interception_none {
        out.listeners.push(virtual_outbound(scope));
        out.listeners.push(virtual_inbound(scope));
    }
    for p in inbound_ports(scope) {
        if let Some(bind) = inbound_bind(scope, &p) {
            out.listeners.push(bound_inbound(scope, &p, &bind));
        }
    }
    outbound(scope, out);
    egress_port_listeners(scope, out);
    if scope.proxy.istio_network_stats {
        for l in &mut out.listeners[first..] {
            let inbound = l.traffic_direction == TrafficDirection::Inbound as i32;
            for chain in &mut l.filter_chains {
                add_tcp_stats(chain);
                if inbound {
                    add_metadata_exchange(chain);
                }
            }
        }
    }
}

/// Istio's TCP metadata exchange protocol (an ALPN name).
pub(super) const PEER_EXCHANGE_ALPN: &str = "istio-peer-exchange";

/// `envoy.tcp.metadataexchange.config.MetadataExchange`, Istio's proxy's
/// own type: `protocol` is the ALPN under which the exchange is spoken.
#[derive(Clone, PartialEq, prost::Message)]
struct MetadataExchange {
    #[prost(string, tag = "1")]
    protocol: String,
}

/// The `istio.metadata_exchange` filter as istiod writes it, on inbound
/// mTLS chains carrying TCP (first, so the frame never reaches another
/// filter) and on outbound clusters as an upstream filter. Network filters
/// cannot be optional: only proxies that implement it (Ferry, Istio's
/// proxy) get it, as `istio.stats` on TCP.
pub(super) fn metadata_exchange_config() -> Any {
    Any {
        type_url: "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange".into(),
        value: prost::Message::encode_to_vec(&MetadataExchange {
            protocol: PEER_EXCHANGE_ALPN.into(),
        }),
    }
}

pub(super) const METADATA_EXCHANGE: &str = "istio.metadata_exchange";

/// Puts the exchange first on an inbound chain that takes Istio mTLS
/// carrying TCP (its match names `istio-peer-exchange`).
fn add_metadata_exchange(chain: &mut FilterChain) {
    let peer_exchange = chain.filter_chain_match.as_ref().is_some_and(|m| {
        m.application_protocols
            .iter()
            .any(|p| p == PEER_EXCHANGE_ALPN)
    });
    if peer_exchange && chain.filters.iter().any(|f| f.name == TCP_PROXY) {
        chain.filters.insert(
            0,
            typed_filter(METADATA_EXCHANGE, metadata_exchange_config()),
        );
    }
}

/// Istio's telemetry extension: `stats.PluginConfig`, empty as istiod
/// sends it (the listener's direction tells the reporter).
const ISTIO_STATS: &str = "istio.stats";

/// `xds.type.v3.TypedStruct`, which every Envoy can decode and print.
#[derive(Clone, PartialEq, prost::Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<envoy_types::pb::google::protobuf::Struct>,
}

/// The configuration wrapped in a TypedStruct: an Envoy without Istio's
/// extensions cannot print a bare `stats.PluginConfig` in its
/// `/config_dump`, while proxies that know it read it the same.
fn istio_stats_config() -> Any {
    let ts = TypedStruct {
        type_url: "type.googleapis.com/stats.PluginConfig".into(),
        value: Some(Default::default()),
    };
    Any {
        type_url: "type.googleapis.com/xds.type.v3.TypedStruct".into(),
        value: prost::Message::encode_to_vec(&ts),
    }
}

/// The HTTP `istio.stats` filter, before the router as istiod puts it.
/// Optional: Envoy without Istio's extensions skips it rather than
/// rejecting the listener.
fn istio_stats_http() -> HttpFilter {
    HttpFilter {
        is_optional: true,
        ..http_filter(ISTIO_STATS, istio_stats_config())
    }
}

/// `istio.stats` right before a chain's TCP proxy (after any
/// authorization filter), as istiod does. Network filters cannot be
/// optional, so only proxies that implement it get it.
fn add_tcp_stats(chain: &mut FilterChain) {
    if let Some(i) = chain.filters.iter().position(|f| f.name == TCP_PROXY) {
        chain
            .filters
            .insert(i, typed_filter(ISTIO_STATS, istio_stats_config()));
    }
}

pub(super) fn typed_filter(name: &str, config: Any) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

pub(super) fn listener_filter(name: &str, config: Any) -> ListenerFilter {
    ListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

pub(super) fn http_filter(name: &str, config: Any) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

pub(super) fn tcp_chain(
    name: &str,
    stat_prefix: &str,
    cluster: TcpClusterSpecifier,
    m: Option<FilterChainMatch>,
) -> FilterChain {
    FilterChain {
        name: name.into(),
        filter_chain_match: m,
        filters: vec![typed_filter(
            TCP_PROXY,
            any(&TcpProxy {
                stat_prefix: stat_prefix.into(),
                cluster_specifier: Some(cluster),
                ..Default::default()
            }),
        )],
        ..Default::default()
    }
}

pub(super) fn to_cluster(name: &str) -> TcpClusterSpecifier {
    TcpClusterSpecifier::Cluster(name.into())
}

/// Where connections nothing else claims go.
pub(super) fn catch_all_cluster(scope: &Scope<'_>) -> &'static str {
    match scope.outbound_policy {
        OutboundMode::AllowAny => PASSTHROUGH,
        OutboundMode::RegistryOnly => BLACKHOLE,
    }
}

fn virtual_outbound(scope: &Scope<'_>) -> Listener {
    let fallback = catch_all_cluster(scope);
    Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(socket_address("0.0.0.0", OUTBOUND_PORT)),
        use_original_dst: Some(BoolValue { value: true }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![
            // A connection addressed to 15001 itself would loop forever.
            tcp_chain(
                "virtualOutbound-blackhole",
                BLACKHOLE,
                to_cluster(BLACKHOLE),
                Some(FilterChainMatch {
                    destination_port: Some(UInt32Value {
                        value: OUTBOUND_PORT,
                    }),
                    ..Default::default()
                }),
            ),
            tcp_chain(
                "virtualOutbound-catchall-tcp",
                fallback,
                to_cluster(fallback),
                None,
            ),
        ],
        ..Default::default()
    }
}

fn virtual_inbound(scope: &Scope<'_>) -> Listener {
    let mut chains = vec![tcp_chain(
        "virtualInbound-blackhole",
        BLACKHOLE,
        to_cluster(BLACKHOLE),
        Some(FilterChainMatch {
            destination_port: Some(UInt32Value {
                value: INBOUND_PORT,
            }),
            ..Default::default()
        }),
    )];
    for p in inbound_ports(scope) {
        if inbound_bind(scope, &p).is_none() {
            chains.extend(port_chains(scope, &p));
        }
    }
    // Ports the workload does not declare pass through to it, under the
    // workload-wide mTLS mode.
    let mode = if mesh_capable(scope) {
        scope
            .mesh
            .workload_mtls(&scope.proxy.namespace, &scope.proxy.labels, 0)
    } else {
        MtlsMode::Disable
    };
    let passthrough_hcm = || {
        typed_filter(
            HCM,
            any(&with_path_normalization(
                scope,
                inbound_hcm(0, INBOUND_PASSTHROUGH, &format!("{INBOUND_PASSTHROUGH}/*")),
            )),
        )
    };
    if mode != MtlsMode::Disable {
        let tls_match = |alpn: &[&str]| FilterChainMatch {
            transport_protocol: "tls".into(),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        chains.push(FilterChain {
            name: "virtualInbound-catchall-http".into(),
            filter_chain_match: Some(tls_match(&ISTIO_HTTP_ALPN)),
            filters: vec![passthrough_hcm()],
            transport_socket: Some(inbound_tls(scope, true)),
            ..Default::default()
        });
        let mut chain = tcp_chain(
            VIRTUAL_INBOUND,
            INBOUND_PASSTHROUGH,
            to_cluster(INBOUND_PASSTHROUGH),
            Some(tls_match(&ISTIO_TCP_ALPN)),
        );
        chain.transport_socket = Some(inbound_tls(scope, false));
        chains.push(chain);
    }
    if mode != MtlsMode::Strict {
        let raw = mode != MtlsMode::Disable;
        chains.push(FilterChain {
            name: "virtualInbound-catchall-http".into(),
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: if raw {
                    "raw_buffer".into()
                } else {
                    String::new()
                },
                application_protocols: HTTP_ALPN.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            filters: vec![passthrough_hcm()],
            ..Default::default()
        });
        chains.push(tcp_chain(
            VIRTUAL_INBOUND,
            INBOUND_PASSTHROUGH,
            to_cluster(INBOUND_PASSTHROUGH),
            raw.then(|| FilterChainMatch {
                transport_protocol: "raw_buffer".into(),
                ..Default::default()
            }),
        ));
    }
    apply_authz(scope, &mut chains);
    Listener {
        name: VIRTUAL_INBOUND.into(),
        address: Some(socket_address("0.0.0.0", INBOUND_PORT)),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![
            listener_filter(
                "envoy.filters.listener.original_dst",
                any(&OriginalDst::default()),
            ),
            listener_filter(
                "envoy.filters.listener.tls_inspector",
                any(&TlsInspector::default()),
            ),
            listener_filter(
                "envoy.filters.listener.http_inspector",
                any(&HttpInspector::default()),
            ),
        ],
        listener_filters_timeout: Some(seconds(0)),
        continue_on_listener_filters_timeout: true,
        filter_chains: chains,
        ..Default::default()
    }
}

/// The filter chains of one inbound port: Istio mTLS and plaintext as the
/// PeerAuthentication of the port says, HTTP or TCP as its protocol.
fn port_chains(scope: &Scope<'_>, p: &InboundPort<'_>) -> Vec<FilterChain> {
    port_chains_in(scope, p, false)
}

/// [`port_chains`]; `hbone`: for `main_internal`, where the tunnel already
/// authenticated the peer, so the chains take no mTLS.
fn port_chains_in(scope: &Scope<'_>, p: &InboundPort<'_>, hbone: bool) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    let cluster = names::inbound_cluster(p.port);
    let chain_name = format!("0.0.0.0_{}", p.port);
    let dport = |alpn: bool| FilterChainMatch {
        destination_port: Some(UInt32Value { value: p.port }),
        application_protocols: if alpn {
            HTTP_ALPN.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let operation = p.services.first().map_or_else(
        || format!("{cluster}/*"),
        |s| format!("{}:{}/*", s.host, p.port),
    );
    let mode = if hbone {
        MtlsMode::Disable
    } else if mesh_capable(scope) {
        scope
            .mesh
            .workload_mtls(&scope.proxy.namespace, &scope.proxy.labels, p.port)
    } else {
        MtlsMode::Disable
    };
    let is_http = p.protocol.is_http();
    let sniffed = p.protocol == Protocol::Unknown;
    // Istio mTLS chains (PERMISSIVE and STRICT): the peer's ALPN says
    // whether it carries HTTP (`istio-http/1.1`, `istio-h2`) or TCP.
    if mode != MtlsMode::Disable {
        let tls_match = |alpn: &[&str]| FilterChainMatch {
            destination_port: Some(UInt32Value { value: p.port }),
            transport_protocol: "tls".into(),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        if is_http || sniffed {
            let mut alpn = Vec::new();
            if is_http {
                alpn.extend(ISTIO_TCP_ALPN);
            }
            alpn.extend(ISTIO_HTTP_ALPN);
            chains.push(FilterChain {
                name: chain_name.clone(),
                filter_chain_match: Some(tls_match(&alpn)),
                filters: vec![typed_filter(
                    HCM,
                    any(&with_path_normalization(
                        scope,
                        inbound_hcm(p.port, &cluster, &operation),
                    )),
                )],
                transport_socket: Some(inbound_tls(scope, true)),
                ..Default::default()
            });
        }
        if !is_http {
            let mut chain = tcp_chain(
                &chain_name,
                &cluster,
                to_cluster(&cluster),
                Some(tls_match(&ISTIO_TCP_ALPN)),
            );
            chain.transport_socket = Some(inbound_tls(scope, false));
            chains.push(chain);
        }
    }
    if mode == MtlsMode::Strict {
        return chains;
    }
    // With TLS chains beside them, plaintext chains say so.
    let raw = |mut m: FilterChainMatch| {
        if mode != MtlsMode::Disable {
            m.transport_protocol = "raw_buffer".into();
        }
        Some(m)
    };
    let http = |alpn: bool| FilterChain {
        name: chain_name.clone(),
        filter_chain_match: raw(dport(alpn)),
        filters: vec![typed_filter(
            HCM,
            any(&with_path_normalization(
                scope,
                inbound_hcm(p.port, &cluster, &operation),
            )),
        )],
        ..Default::default()
    };
    match p.protocol {
        proto if proto.is_http() => chains.push(http(false)),
        // Undeclared protocol: HTTP when the inspector sees HTTP, raw
        // TCP otherwise, as istiod sniffs.
        Protocol::Unknown => {
            chains.push(http(true));
            chains.push(tcp_chain(
                &chain_name,
                &cluster,
                to_cluster(&cluster),
                raw(dport(false)),
            ));
        }
        _ => chains.push(tcp_chain(
            &chain_name,
            &cluster,
            to_cluster(&cluster),
            raw(dport(false)),
        )),
    }
    chains
}

/// An inbound port's own listener (Sidecar ingress without capture): the
/// port's chains with the proxy's policies, and the inspectors they need.
fn bound_inbound(scope: &Scope<'_>, p: &InboundPort<'_>, bind: &str) -> Listener {
    let mut chains = port_chains(scope, p);
    apply_authz(scope, &mut chains);
    let tls = chains.iter().any(|c| {
        c.filter_chain_match
            .as_ref()
            .is_some_and(|m| m.transport_protocol == "tls")
    });
    let sniff = chains.iter().any(|c| {
        c.filter_chain_match
            .as_ref()
            .is_some_and(|m| m.transport_protocol != "tls" && !m.application_protocols.is_empty())
    });
    let mut listener_filters = Vec::new();
    if tls {
        listener_filters.extend(tls_inspector());
    }
    if sniff {
        listener_filters.push(listener_filter(
            "envoy.filters.listener.http_inspector",
            any(&HttpInspector::default()),
        ));
    }
    let inspect = !listener_filters.is_empty();
    Listener {
        name: format!("{bind}_{}", p.port),
        address: Some(socket_address(bind, p.port)),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters,
        listener_filters_timeout: inspect.then(|| seconds(0)),
        continue_on_listener_filters_timeout: inspect,
        filter_chains: chains,
        ..Default::default()
    }
}

/// The internal listener `main_internal` of a sidecar accepting HBONE
/// (istiod's `buildInboundHBONEListeners`): the chains of each inbound
/// port and the passthrough chains, all without mTLS, with the proxy's
/// policies reading the peer's identity from filter state; the
/// destination from the filter state `connect_terminate` set.
pub(super) fn hbone_main_internal(scope: &Scope<'_>) -> Listener {
    let mut chains = Vec::new();
    for p in inbound_ports(scope) {
        if inbound_bind(scope, &p).is_none() {
            chains.extend(port_chains_in(scope, &p, true));
        }
    }
    chains.push(FilterChain {
        name: "virtualInbound-catchall-http".into(),
        filter_chain_match: Some(FilterChainMatch {
            application_protocols: HTTP_ALPN.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        filters: vec![typed_filter(
            HCM,
            any(&with_path_normalization(
                scope,
                inbound_hcm(0, INBOUND_PASSTHROUGH, &format!("{INBOUND_PASSTHROUGH}/*")),
            )),
        )],
        ..Default::default()
    });
    chains.push(tcp_chain(
        VIRTUAL_INBOUND,
        INBOUND_PASSTHROUGH,
        to_cluster(INBOUND_PASSTHROUGH),
        None,
    ));
    let mut http_authz: Vec<_> = scope
        .mesh
        .jwt_http_filter(scope.proxy)
        .into_iter()
        .collect();
    http_authz.extend(scope.mesh.authz_http_filters(scope.proxy));
    let mut network_authz = scope.mesh.authz_network_filters(scope.proxy);
    super::hbone::filter_state_principals(&mut http_authz, &mut network_authz);
    for chain in &mut chains {
        super::authz::apply(chain, &http_authz, &network_authz);
    }
    let mut listener_filters = vec![listener_filter(
        "envoy.filters.listener.original_dst",
        any(&OriginalDst::default()),
    )];
    if chains.iter().any(|c| {
        c.filter_chain_match
            .as_ref()
            .is_some_and(|m| !m.application_protocols.is_empty())
    }) {
        listener_filters.push(listener_filter(
            "envoy.filters.listener.http_inspector",
            any(&HttpInspector::default()),
        ));
    }
    super::hbone::main_internal_listener(scope, chains, listener_filters)
}

/// The proxy's JWT and authorization filters on inbound chains.
fn apply_authz(scope: &Scope<'_>, chains: &mut [FilterChain]) {
    // JWT authentication first: the authorization filters read what it
    // verified.
    let mut http_authz: Vec<_> = scope
        .mesh
        .jwt_http_filter(scope.proxy)
        .into_iter()
        .collect();
    http_authz.extend(scope.mesh.authz_http_filters(scope.proxy));
    let network_authz = scope.mesh.authz_network_filters(scope.proxy);
    for chain in chains {
        super::authz::apply(chain, &http_authz, &network_authz);
    }
}

/// ALPN of Istio mTLS carrying TCP, and carrying HTTP (the client sidecar
/// prefixes the application's protocol with `istio-`).
const ISTIO_TCP_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];
const ISTIO_HTTP_ALPN: [&str; 3] = ["istio-http/1.0", "istio-http/1.1", "istio-h2"];

/// Whether this proxy's workload accepts Istio mTLS: the injector marks
/// the pods it gives a sidecar with `security.istio.io/tlsMode: istio`
/// (see [`super::registry::injected`]); other proxies keep plaintext
/// inbound chains, as nothing would send them mTLS.
fn mesh_capable(scope: &Scope<'_>) -> bool {
    scope
        .proxy
        .labels
        .get(TLS_MODE_LABEL)
        .is_some_and(|m| m == "istio")
}

/// The server side of Istio mTLS on the inbound listener: the workload
/// certificate and the mesh root from the agent's SDS, a client
/// certificate from the trust domain required.
fn inbound_tls(scope: &Scope<'_>, http: bool) -> TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_params: Some(TlsParameters {
                tls_minimum_protocol_version: TlsProtocol::TlSv12 as i32,
                tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            // `istio-peer-exchange` promises the TCP metadata exchange: a
            // proxy that cannot speak it (Envoy without Istio's
            // extensions) must not take it, or a client that speaks it
            // would write its frame into the application's stream.
            alpn_protocols: if http || !scope.proxy.istio_network_stats {
                vec!["h2".into(), "http/1.1".into()]
            } else {
                vec![PEER_EXCHANGE_ALPN.into(), "h2".into(), "http/1.1".into()]
            },
            tls_certificate_sds_secret_configs: vec![agent_sds("default")],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: SanType::Uri as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(MatchPattern::Prefix(format!(
                                    "spiffe://{}/",
                                    scope.mesh.options.trust_domain
                                ))),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(agent_sds("ROOTCA")),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
    }
}

/// The inbound HTTP connection manager: an inline route table sending
/// everything to the local application's cluster.
fn inbound_hcm(port: u32, cluster: &str, operation: &str) -> HttpConnectionManager {
    let route_config = RouteConfiguration {
        name: if port == 0 {
            INBOUND_PASSTHROUGH.into()
        } else {
            names::inbound_cluster(port)
        },
        virtual_hosts: vec![VirtualHost {
            name: format!("inbound|http|{port}"),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "default".into(),
                r#match: Some(route::prefix_match("/")),
                decorator: Some(envoy_types::pb::envoy::config::route::v3::Decorator {
                    operation: operation.into(),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
                    timeout: Some(seconds(0)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    };
    HttpConnectionManager {
        stat_prefix: format!("inbound_0.0.0.0_{port}"),
        route_specifier: Some(RouteSpecifier::RouteConfig(route_config)),
        http_filters: vec![
            istio_stats_http(),
            http_filter("envoy.filters.http.router", any(&Router::default())),
        ],
        use_remote_address: Some(BoolValue { value: false }),
        forward_client_cert_details: ForwardClientCertDetails::AppendForward as i32,
        // As istiod: the peer's subject, DNS and URI (SPIFFE) SANs reach the app.
        set_current_client_cert_details: Some(SetCurrentClientCertDetails {
            subject: Some(BoolValue { value: true }),
            dns: true,
            uri: true,
            ..Default::default()
        }),
        ..common_hcm()
    }
}

pub(super) fn common_hcm() -> HttpConnectionManager {
    HttpConnectionManager {
        upgrade_configs: vec![UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        stream_idle_timeout: Some(seconds(0)),
        ..Default::default()
    }
}

/// `meshConfig.pathNormalization` on a connection manager, as istiod sets
/// it on every one it builds (sidecar inbound and outbound, gateways):
/// escaped slashes kept but with DECODE_AND_MERGE_SLASHES, RFC 3986
/// normalization but with NONE, slashes merged from MERGE_SLASHES on.
pub(super) fn with_path_normalization(
    scope: &Scope<'_>,
    hcm: HttpConnectionManager,
) -> HttpConnectionManager {
    use crate::istio::types::mesh::PathNormalization as N;
    let level = scope.mesh.options.path_normalization;
    let escaped = match level {
        N::DecodeAndMergeSlashes => PathWithEscapedSlashesAction::UnescapeAndForward,
        _ => PathWithEscapedSlashesAction::KeepUnchanged,
    };
    HttpConnectionManager {
        normalize_path: Some(BoolValue {
            value: level != N::None,
        }),
        merge_slashes: matches!(level, N::MergeSlashes | N::DecodeAndMergeSlashes),
        path_with_escaped_slashes_action: escaped as i32,
        ..hcm
    }
}

/// The outbound HTTP connection manager of port `port`: routes from RDS
/// (`"9080"`), and the fault and CORS filters that routes configure per
/// route, before the router.
fn outbound_hcm(port: u32) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: format!("outbound_0.0.0.0_{port}"),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: port.to_string(),
        })),
        http_filters: vec![
            http_filter(FAULT_FILTER, any(&HttpFault::default())),
            http_filter(CORS_FILTER, any(&Cors::default())),
            istio_stats_http(),
            http_filter("envoy.filters.http.router", any(&Router::default())),
        ],
        use_remote_address: Some(BoolValue { value: false }),
        ..common_hcm()
    }
}

/// The TCP proxy target of `svc` on `port`: the first TCP rule of its
/// VirtualService that applies, else the service's own cluster.
pub(super) fn tcp_target(scope: &Scope<'_>, svc: &Service, port: u32) -> TcpClusterSpecifier {
    let default = names::outbound_cluster(port, "", &svc.host);
    let Some((r, vs)) = scope.virtual_service(&svc.host) else {
        return to_cluster(&default);
    };
    let ns = r.meta.namespace.as_str();
    let applies = |m: &crate::istio::types::networking::L4MatchAttributes| {
        m.port.is_none_or(|p| p == port)
            && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
            && selects(&m.source_labels, &scope.proxy.labels)
            && m.source_namespace
                .as_ref()
                .is_none_or(|n| n == &scope.proxy.namespace)
    };
    let Some(rule) = vs
        .tcp
        .iter()
        .find(|t| t.match_.is_empty() || t.match_.iter().any(applies))
    else {
        return to_cluster(&default);
    };
    let dests: Vec<_> = rule
        .route
        .iter()
        .filter(|d| d.weight.unwrap_or(0) > 0 || rule.route.len() == 1)
        .collect();
    match dests.as_slice() {
        [] => to_cluster(&default),
        [one] => to_cluster(&route::cluster_for(scope, &one.destination, ns, port).0),
        many => TcpClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|d| ClusterWeight {
                    name: route::cluster_for(scope, &d.destination, ns, port).0,
                    weight: d.weight.unwrap_or(0).max(0) as u32,
                    ..Default::default()
                })
                .collect(),
        }),
    }
}

fn is_tcp(p: Protocol) -> bool {
    matches!(p, Protocol::Tcp | Protocol::Tls | Protocol::Https)
}

/// The services of one outbound port: HTTP or sniffed ones (served through
/// the port's route configuration), TCP ones without a VIP, and the sniffed
/// ones again (whose non-HTTP bytes need somewhere to go).
type PortServices<'a> = (Vec<&'a Service>, Vec<&'a Service>, Vec<&'a Service>);

/// Per-port outbound listeners and the route configurations they name.
fn outbound(scope: &Scope<'_>, out: &mut ProxyConfig) {
    let none = scope.proxy.interception_none;
    let mut by_port: BTreeMap<u32, PortServices<'_>> = BTreeMap::new();
    for svc in scope.services.iter().filter(|s| scope.catch_all_imports(s)) {
        for p in &svc.ports {
            let entry = by_port.entry(p.port).or_default();
            if is_tcp(p.protocol) {
                match &svc.vip {
                    // Without capture nothing arrives at a VIP: the port
                    // on localhost serves one service.
                    Some(vip) if !none => out.listeners.push(vip_listener(scope, svc, vip, p.port)),
                    _ => entry.1.push(svc),
                }
            } else {
                entry.0.push(svc);
                if p.protocol == Protocol::Unknown {
                    entry.2.push(svc);
                }
            }
        }
    }
    for (port, (http, mut tcp, sniffed)) in by_port {
        if http.is_empty() && tcp.is_empty() {
            continue;
        }
        if none {
            // One localhost port, one protocol: HTTP routes by Host; a TCP
            // port goes to the first service declaring it.
            if !http.is_empty() {
                tcp.clear();
            } else {
                tcp.truncate(1);
            }
        }
        let mut chains = Vec::new();
        let mut sni = false;
        for svc in &tcp {
            let ranges: Vec<CidrRange> = svc
                .endpoints
                .iter()
                .filter(|e| e.address.parse::<std::net::IpAddr>().is_ok())
                .map(|e| CidrRange {
                    address_prefix: e.address.clone(),
                    prefix_len: Some(UInt32Value {
                        value: if e.address.contains(':') { 128 } else { 32 },
                    }),
                })
                .collect();
            let lone = http.is_empty() && tcp.len() == 1;
            if ranges.is_empty() && !lone {
                // Nothing tells its connections apart from the others'.
                continue;
            }
            let cluster = names::outbound_cluster(port, "", &svc.host);
            let base = FilterChainMatch {
                prefix_ranges: ranges,
                ..Default::default()
            };
            let sni_chains = tls_chains(scope, svc, port, &base);
            sni |= !sni_chains.is_empty();
            chains.extend(sni_chains);
            chains.push(tcp_chain(
                &cluster,
                &cluster,
                tcp_target(scope, svc, port),
                (!lone).then_some(base),
            ));
        }
        let mut listener_filters = Vec::new();
        if !http.is_empty() {
            chains.push(FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    transport_protocol: "raw_buffer".into(),
                    application_protocols: HTTP_ALPN.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
                filters: vec![typed_filter(
                    HCM,
                    any(&with_path_normalization(scope, outbound_hcm(port))),
                )],
                ..Default::default()
            });
            listener_filters = vec![
                listener_filter(
                    "envoy.filters.listener.tls_inspector",
                    any(&TlsInspector::default()),
                ),
                listener_filter(
                    "envoy.filters.listener.http_inspector",
                    any(&HttpInspector::default()),
                ),
            ];
            out.routes
                .push(route::shared_route_config(scope, port, &http));
        }
        // Non-HTTP bytes on a port of undeclared protocol go to the one
        // service that could mean them; anything else follows the policy.
        let default_filter_chain = match sniffed.as_slice() {
            [svc] => {
                let cluster = names::outbound_cluster(port, "", &svc.host);
                tcp_chain(&cluster, &cluster, tcp_target(scope, svc, port), None)
            }
            _ => {
                let c = catch_all_cluster(scope);
                tcp_chain("PassthroughFilterChain", c, to_cluster(c), None)
            }
        };
        if sni && listener_filters.is_empty() {
            listener_filters = tls_inspector();
        }
        let has_http = !http.is_empty();
        if chains.is_empty() && !has_http {
            // Every TCP service of the port was skipped: a listener without
            // a chain is refused by Envoy and Ferry alike.
            continue;
        }
        let inspect = !listener_filters.is_empty();
        let bind = if none { "127.0.0.1" } else { "0.0.0.0" };
        out.listeners.push(Listener {
            name: format!("{bind}_{port}"),
            address: Some(socket_address(bind, port)),
            filter_chains: chains,
            default_filter_chain: has_http.then_some(default_filter_chain),
            listener_filters,
            listener_filters_timeout: inspect.then(|| seconds(0)),
            continue_on_listener_filters_timeout: inspect,
            traffic_direction: TrafficDirection::Outbound as i32,
            // Without capture the application connects to it directly.
            bind_to_port: (!none).then_some(BoolValue { value: false }),
            ..Default::default()
        });
    }
}

/// The Sidecar's egress listeners with a `port`: one listener for the
/// services its `hosts` import on that port, at its `bind` (localhost when
/// it binds for real: `captureMode: NONE` or a proxy without capture),
/// HTTP through the port's route table, TCP to the first such service.
fn egress_port_listeners(scope: &Scope<'_>, out: &mut ProxyConfig) {
    let Some((_, sc)) = scope.sidecar else {
        return;
    };
    for e in &sc.egress {
        let Some(port) = &e.port else { continue };
        let number = port.number;
        let bind_to_port =
            scope.proxy.interception_none || e.capture_mode == Some(CaptureMode::None);
        let bind = match e.bind.as_deref().filter(|b| !b.is_empty()) {
            Some(b) => b.to_string(),
            None if bind_to_port => "127.0.0.1".into(),
            None => "0.0.0.0".into(),
        };
        if bind.starts_with("unix://") {
            tracing::warn!(sidecar.egress.bind = %bind, "Unix-socket egress listeners are not served; skipped");
            continue;
        }
        let imported: Vec<&Service> = scope
            .services
            .iter()
            .filter(|s| scope.egress_imports(e, &s.namespace, &s.host))
            .copied()
            .collect();
        if imported.is_empty() {
            continue;
        }
        // Only the services that have the listener's port are routed, as
        // istiod builds the port's route table.
        let services: Vec<&Service> = imported
            .into_iter()
            .filter(|s| s.port(number).is_some())
            .collect();
        let first = services.first();
        let protocol = match port.protocol.as_deref().map(Protocol::parse) {
            Some(p) if p != Protocol::Unknown => p,
            _ => first
                .and_then(|s| s.port(number))
                .map_or(Protocol::Unknown, |p| p.protocol),
        };
        let chain = if is_tcp(protocol) {
            let Some(first) = first else { continue };
            let cluster = names::outbound_cluster(number, "", &first.host);
            tcp_chain(&cluster, &cluster, tcp_target(scope, first, number), None)
        } else {
            let route = number.to_string();
            if !out.routes.iter().any(|r| r.name == route) {
                let http: Vec<&Service> = services
                    .iter()
                    .filter(|s| s.port(number).is_some_and(|p| !is_tcp(p.protocol)))
                    .copied()
                    .collect();
                out.routes
                    .push(route::shared_route_config(scope, number, &http));
            }
            FilterChain {
                filters: vec![typed_filter(
                    HCM,
                    any(&with_path_normalization(scope, outbound_hcm(number))),
                )],
                ..Default::default()
            }
        };
        let name = format!("{bind}_{number}");
        // The egress listener's port wins over the catch-all's listener
        // of the same address.
        out.listeners.retain(|l| l.name != name);
        out.listeners.push(Listener {
            name,
            address: Some(socket_address(&bind, number)),
            filter_chains: vec![chain],
            traffic_direction: TrafficDirection::Outbound as i32,
            bind_to_port: (!bind_to_port).then_some(BoolValue { value: false }),
            ..Default::default()
        });
    }
}

/// `VIP_PORT` for a TCP service with a virtual IP.
fn vip_listener(scope: &Scope<'_>, svc: &Service, vip: &str, port: u32) -> Listener {
    let cluster = names::outbound_cluster(port, "", &svc.host);
    let mut chains = tls_chains(scope, svc, port, &FilterChainMatch::default());
    let sni = !chains.is_empty();
    chains.push(tcp_chain("", &cluster, tcp_target(scope, svc, port), None));
    Listener {
        name: format!("{vip}_{port}"),
        address: Some(socket_address(vip, port)),
        filter_chains: chains,
        listener_filters: if sni { tls_inspector() } else { Vec::new() },
        listener_filters_timeout: sni.then(|| seconds(0)),
        continue_on_listener_filters_timeout: sni,
        traffic_direction: TrafficDirection::Outbound as i32,
        bind_to_port: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

fn tls_inspector() -> Vec<ListenerFilter> {
    vec![listener_filter(
        "envoy.filters.listener.tls_inspector",
        any(&TlsInspector::default()),
    )]
}

/// VirtualService `tls` rules for a TLS or HTTPS port of `svc`: one filter
/// chain per rule, chosen by the client's SNI (`sniHosts`) on top of
/// `base` (the port's destination match), proxied as TCP to the rule's
/// destinations.
fn tls_chains(
    scope: &Scope<'_>,
    svc: &Service,
    port: u32,
    base: &FilterChainMatch,
) -> Vec<FilterChain> {
    let protocol = svc.port(port).map(|p| p.protocol);
    if !matches!(protocol, Some(Protocol::Tls | Protocol::Https)) {
        return Vec::new();
    }
    let Some((r, vs)) = scope.virtual_service(&svc.host) else {
        return Vec::new();
    };
    let ns = r.meta.namespace.as_str();
    let vs_bound = route::binds(&vs.gateways, ns, route::MESH);
    let mut taken = std::collections::BTreeSet::new();
    let mut chains = Vec::new();
    for rule in &vs.tls {
        let mut sni: Vec<String> = rule
            .match_
            .iter()
            .filter(|m| {
                super::gateway::tls_match_applies(m, ns, route::MESH, vs_bound, port)
                    && selects(&m.source_labels, &scope.proxy.labels)
                    && m.source_namespace
                        .as_ref()
                        .is_none_or(|n| n == &scope.proxy.namespace)
            })
            .flat_map(|m| m.sni_hosts.iter().cloned())
            .collect();
        // Envoy refuses two chains with the same match: the first rule
        // naming a host keeps it, as istiod's first match would win.
        sni.retain(|h| taken.insert(h.clone()));
        if sni.is_empty() {
            continue;
        }
        let Some(target) = super::gateway::l4_target(scope, &rule.route, ns, port) else {
            continue;
        };
        let name = match &target {
            TcpClusterSpecifier::Cluster(c) => c.clone(),
            TcpClusterSpecifier::WeightedClusters(_) => {
                names::outbound_cluster(port, "", &svc.host)
            }
        };
        let mut m = base.clone();
        m.server_names = sni;
        chains.push(tcp_chain(&name, &name, target, Some(m)));
    }
    chains
}
