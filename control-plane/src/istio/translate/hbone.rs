//! Ambient mode (istiod's `PILOT_ENABLE_AMBIENT`): the HBONE resources
//! istiod adds to sidecars and gateways once ambient is on, in its exact
//! shapes. Every sidecar and gateway gets the internal listener and the
//! ORIGINAL_DST cluster `connect_originate` (HTTP/2 CONNECT over TLS 1.3,
//! ALPN h2, trust-domain SAN prefixes, to the pod's port 15008); service
//! clusters get the `hbone` transport socket match (`internal_upstream`
//! passing the endpoint's original_dst metadata through); endpoints of
//! HBONE-capable pods (captured by ambient, or labelled
//! `networking.istio.io/tunnel: http`) become internal addresses to
//! `connect_originate`. A sidecar whose node says `ENABLE_HBONE` also
//! accepts HBONE: `connect_terminate` on 15008 ends the CONNECT and hands
//! the stream, with the authority and the peer's identity in filter state,
//! to the internal listener `main_internal` (cluster of the same name),
//! which holds the pod's inbound chains without mTLS, limited to its own
//! IPs, with RBAC reading the peer's principal from filter state.
//!
//! Sources: istio's pilot/pkg/networking/core (listener.go, cluster.go,
//! cluster_tls.go, cluster_waypoint.go, listener_waypoint.go,
//! listener_inbound.go), pilot/pkg/xds/endpoints/endpoint_builder.go and
//! pilot/pkg/security/authz/model/principal.go.

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{
        ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy, OriginalDstLbConfig,
        TransportSocketMatch,
    },
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, CidrRange, EnvoyInternalAddress, Http1ProtocolOptions, Http2ProtocolOptions,
    HttpProtocolOptions as CommonHttpOptions, Metadata, TransportSocket, address,
    envoy_internal_address::AddressNameSpecifier, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::rbac::v3::{Policy, Principal, Rbac, principal};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::transport_sockets::internal_upstream::v3::{
    InternalUpstreamTransport, internal_upstream_transport::MetadataValueSource,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, TlsParameters,
    UpstreamTlsContext, common_tls_context::CombinedCertificateValidationContext,
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
use envoy_types::pb::envoy::r#type::matcher::v3::{
    FilterStateMatcher, StringMatcher, filter_state_matcher, string_matcher::MatchPattern,
};
use envoy_types::pb::envoy::r#type::metadata::v3::{
    MetadataKey, MetadataKind, metadata_key::PathSegment, metadata_key::path_segment::Segment,
    metadata_kind,
};
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value::Kind};
use prost::Message;
use serde_json::json;

use super::registry::Endpoint as RegistryEndpoint;
use super::util::{agent_sds, any, duration, seconds};
use super::{NodeType, Scope};

/// The internal listener and cluster that originate HBONE.
pub const CONNECT_ORIGINATE: &str = "connect_originate";
/// The listener on 15008 that terminates HBONE.
pub const CONNECT_TERMINATE: &str = "connect_terminate";
/// The internal listener (and its cluster) of terminated HBONE streams.
pub const MAIN_INTERNAL: &str = "main_internal";
/// `model.HBoneInboundListenPort`.
pub const HBONE_PORT: u32 = 15008;
/// Pod label opting a workload into HBONE (the injector sets it on
/// sidecars that listen on 15008; any pod may carry it).
pub const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";
/// Pod label putting a workload in ambient mode (served by ztunnel).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The endpoint metadata filter naming the tunnel's destination.
pub const ORIGINAL_DST_KEY: &str = "envoy.filters.listener.original_dst";
/// The filter state key of the HBONE caller's SPIFFE identity.
pub const PEER_PRINCIPAL_KEY: &str = "io.istio.peer_principal";
const TRANSPORT_SOCKET_MATCH_KEY: &str = "envoy.transport_socket_match";
const HTTP_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const RAW_BUFFER: &str = "envoy.transport_sockets.raw_buffer";
/// istiod's HTTP/2 keepalive on `connect_terminate` (h2KeepaliveInterval,
/// h2KeepaliveTimeout).
const H2_KEEPALIVE_INTERVAL_SECS: i64 = 10;
const H2_KEEPALIVE_TIMEOUT_SECS: i64 = 20;
/// `HBONE idle timeout` when `meshConfig.hboneIdleTimeout` says none.
const DEFAULT_HBONE_IDLE_TIMEOUT_SECS: u64 = 3600;

/// The HBONE listeners and clusters of one proxy (service clusters and
/// endpoints are adjusted where `cluster` builds them).
pub(super) fn build(scope: &Scope<'_>, out: &mut super::ProxyConfig) {
    if !sends(scope) {
        return;
    }
    out.listeners.extend(connect_originate_listener());
    // `DISABLE_HBONE_SEND` drops the cluster only, as istiod does.
    if !scope.proxy.disable_hbone_send {
        out.clusters.push(connect_originate_cluster(scope));
    }
    if listens(scope) {
        out.clusters.push(main_internal_cluster());
        out.listeners.extend(connect_terminate_listener(scope));
        out.listeners
            .push(super::listener::hbone_main_internal(scope));
    }
}

/// Whether a pod speaks HBONE itself: captured by ambient (ztunnel serves
/// it; istiod learns it from the ambient index, here from the pod's
/// `istio.io/dataplane-mode: ambient`) or labelled
/// `networking.istio.io/tunnel: http` (istiod's `SupportsTunnel`).
pub fn supports_tunnel(e: &RegistryEndpoint) -> bool {
    e.labels.get(TUNNEL_LABEL).is_some_and(|v| v == "http")
        || e.labels
            .get(DATAPLANE_MODE_LABEL)
            .is_some_and(|v| v == "ambient")
}

/// istiod's `features.EnableHBONESend`: on with ambient.
pub(super) fn sends(scope: &Scope<'_>) -> bool {
    scope.mesh.options.ambient
}

/// istiod's `EnableHBONEListen`: an ambient mesh and a sidecar whose node
/// says `ENABLE_HBONE`.
pub(super) fn listens(scope: &Scope<'_>) -> bool {
    scope.mesh.options.ambient
        && scope.proxy.enable_hbone
        && scope.proxy.node_type == NodeType::Sidecar
}

/// Whether `proxy` reaches endpoint `e` over HBONE (endpoint_builder.go):
/// the endpoint supports a tunnel, and does not take Istio mTLS (a sidecar
/// with `tlsMode: istio` keeps classic mTLS unless
/// `PILOT_PREFER_SENDING_HBONE`), and the node does not say
/// `DISABLE_HBONE_SEND`. Only IP endpoints are tunnelled.
pub(super) fn tunnels_to(scope: &Scope<'_>, e: &RegistryEndpoint) -> bool {
    sends(scope)
        && !scope.proxy.disable_hbone_send
        && supports_tunnel(e)
        && (!e.istio_mtls() || scope.mesh.options.prefer_hbone_send)
        && e.address.parse::<std::net::IpAddr>().is_ok()
}

/// The endpoint of an HBONE pod at `ip:port`: an internal address to
/// `connect_originate` identified by the target, the target as original_dst
/// metadata (`local`) and `tunnel: http` for the transport socket match.
pub(super) fn tunnel_endpoint(ip: &str, port: u32, metadata: &mut Metadata) -> Endpoint {
    let target = match ip.parse::<std::net::IpAddr>() {
        Ok(addr) => std::net::SocketAddr::new(addr, port as u16).to_string(),
        Err(_) => format!("{ip}:{port}"),
    };
    metadata.filter_metadata.insert(
        ORIGINAL_DST_KEY.into(),
        text_struct([("local", target.as_str())]),
    );
    metadata.filter_metadata.insert(
        TRANSPORT_SOCKET_MATCH_KEY.into(),
        text_struct([("tunnel", "http")]),
    );
    Endpoint {
        address: Some(internal_address(CONNECT_ORIGINATE, &target)),
        ..Default::default()
    }
}

fn internal_address(listener: &str, endpoint_id: &str) -> Address {
    Address {
        address: Some(address::Address::EnvoyInternalAddress(
            EnvoyInternalAddress {
                endpoint_id: endpoint_id.into(),
                address_name_specifier: Some(AddressNameSpecifier::ServerListenerName(
                    listener.into(),
                )),
            },
        )),
    }
}

fn text_struct<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

fn raw_buffer() -> TransportSocket {
    TransportSocket {
        name: RAW_BUFFER.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            &RawBuffer {},
        ))),
    }
}

/// `FullMetadataPassthroughInternalUpstreamTransportSocket`: the endpoint's
/// original_dst metadata and the cluster's and endpoint's `istio`
/// metadata go with the internal connection; `inner` runs inside.
fn internal_upstream(inner: TransportSocket) -> TransportSocket {
    let source = |kind: metadata_kind::Kind, name: &str| MetadataValueSource {
        kind: Some(MetadataKind { kind: Some(kind) }),
        name: name.into(),
    };
    let host = || metadata_kind::Kind::Host(metadata_kind::Host {});
    TransportSocket {
        name: "envoy.transport_sockets.internal_upstream".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            &InternalUpstreamTransport {
                passthrough_metadata: vec![
                    source(host(), ORIGINAL_DST_KEY),
                    source(
                        metadata_kind::Kind::Cluster(metadata_kind::Cluster {}),
                        "istio",
                    ),
                    source(host(), "istio"),
                ],
                transport_socket: Some(inner),
            },
        ))),
    }
}

/// istiod's `hbone` transport socket match: endpoints with `tunnel: http`.
fn hbone_match(inner: TransportSocket) -> TransportSocketMatch {
    TransportSocketMatch {
        name: "hbone".into(),
        r#match: Some(text_struct([("tunnel", "http")])),
        transport_socket: Some(internal_upstream(inner)),
    }
}

fn plaintext_match() -> TransportSocketMatch {
    TransportSocketMatch {
        name: "tlsMode-disabled".into(),
        r#match: Some(Struct::default()),
        transport_socket: Some(raw_buffer()),
    }
}

/// How a service cluster's upstream TLS was decided, for
/// [`apply_transport_socket_matches`].
pub(super) enum UpstreamTls {
    /// No DestinationRule TLS: auto mTLS (its matches already on the
    /// cluster) or plaintext.
    Auto,
    /// A DestinationRule's `ISTIO_MUTUAL`.
    IstioMutual,
    /// A DestinationRule's other mode (its socket, if any, on the cluster).
    User,
}

/// istiod's `applyHBONETransportSocketMatches`: HBONE endpoints tunnel
/// (plaintext inside, or the user's TLS inside the tunnel), the others
/// keep what the cluster had (auto mTLS by `tlsMode`, the rule's ISTIO
/// mTLS, the rule's TLS, or plaintext).
pub(super) fn apply_transport_socket_matches(c: &mut Cluster, tls: UpstreamTls) {
    let original_dst = c.cluster_discovery_type
        == Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        ));
    match tls {
        UpstreamTls::Auto => {
            if c.transport_socket_matches.is_empty() {
                c.transport_socket_matches = vec![hbone_match(raw_buffer()), plaintext_match()];
            } else {
                c.transport_socket_matches
                    .insert(0, hbone_match(raw_buffer()));
            }
        }
        // istiod leaves original-destination clusters with a rule's TLS
        // as they are.
        _ if original_dst => {}
        tls => match c.transport_socket.take() {
            None => c.transport_socket_matches = vec![hbone_match(raw_buffer()), plaintext_match()],
            Some(ts) => {
                c.transport_socket_matches = match tls {
                    // HBONE replaces Istio mTLS where the endpoint has it.
                    UpstreamTls::IstioMutual => vec![
                        hbone_match(raw_buffer()),
                        TransportSocketMatch {
                            name: "tlsMode-istio".into(),
                            r#match: None,
                            transport_socket: Some(ts),
                        },
                    ],
                    // The user's TLS reaches the backend, tunnelled or not.
                    _ => vec![
                        hbone_match(ts.clone()),
                        TransportSocketMatch {
                            name: "user".into(),
                            r#match: None,
                            transport_socket: Some(ts),
                        },
                    ],
                };
            }
        },
    }
}

/// istiod's `buildCommonConnectTLSContext`: the workload certificate and
/// root from the agent's SDS, peers of the mesh's trust domains (and
/// aliases) only, TLS 1.3, ALPN h2.
fn connect_tls_context(scope: &Scope<'_>) -> CommonTlsContext {
    let sans = scope
        .mesh
        .trust_domains()
        .into_iter()
        .filter(|td| !td.is_empty())
        .map(|td| SubjectAltNameMatcher {
            san_type: SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Prefix(format!("spiffe://{td}/"))),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: TlsProtocol::TlSv13 as i32,
            tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        alpn_protocols: vec!["h2".into()],
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
    }
}

/// istiod's default thresholds (everything unlimited).
fn unlimited_breakers() -> envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers {
    use envoy_types::pb::envoy::config::cluster::v3::{
        CircuitBreakers, circuit_breakers::Thresholds,
    };
    let max = Some(UInt32Value { value: u32::MAX });
    CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: max,
            max_pending_requests: max,
            max_requests: max,
            max_retries: max,
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The cluster `connect_originate` (`buildConnectOriginate`): to the
/// tunnel's original destination on port 15008 (or the `waypoint` of the
/// endpoint's metadata), HTTP/2 with CONNECT, mTLS without SNI.
pub(super) fn connect_originate_cluster(scope: &Scope<'_>) -> Cluster {
    let options = &scope.mesh.options;
    let idle = options
        .hbone_idle_timeout
        .unwrap_or(std::time::Duration::from_secs(
            DEFAULT_HBONE_IDLE_TIMEOUT_SECS,
        ));
    let http = HttpProtocolOptions {
        common_http_protocol_options: Some(CommonHttpOptions {
            idle_timeout: Some(duration(idle)),
            ..Default::default()
        }),
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions {
                    allow_connect: true,
                    ..Default::default()
                })),
            },
        )),
        ..Default::default()
    };
    Cluster {
        name: CONNECT_ORIGINATE.into(),
        alt_stat_name: format!("{CONNECT_ORIGINATE};"),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(duration(options.connect_timeout)),
        cleanup_interval: Some(seconds(60)),
        circuit_breakers: Some(unlimited_breakers()),
        typed_extension_protocol_options: [(HTTP_OPTIONS_KEY.to_string(), any(&http))]
            .into_iter()
            .collect(),
        lb_config: Some(LbConfig::OriginalDstLbConfig(OriginalDstLbConfig {
            upstream_port_override: Some(UInt32Value { value: HBONE_PORT }),
            metadata_key: Some(MetadataKey {
                key: ORIGINAL_DST_KEY.into(),
                path: vec![PathSegment {
                    segment: Some(Segment::Key("waypoint".into())),
                }],
            }),
            ..Default::default()
        })),
        transport_socket: Some(TransportSocket {
            name: "tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(
                &UpstreamTlsContext {
                    common_tls_context: Some(connect_tls_context(scope)),
                    ..Default::default()
                },
            ))),
        }),
        ..Default::default()
    }
}

/// The cluster `main_internal` (`buildInternalUpstreamCluster`): one
/// internal endpoint, the listener `main_internal`; the downstream's HTTP
/// protocol, 5 minutes idle.
pub(super) fn main_internal_cluster() -> Cluster {
    let http = HttpProtocolOptions {
        common_http_protocol_options: Some(CommonHttpOptions {
            idle_timeout: Some(seconds(300)),
            ..Default::default()
        }),
        upstream_protocol_options: Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            UseDownstreamHttpConfig {
                http_protocol_options: Some(Http1ProtocolOptions::default()),
                http2_protocol_options: Some(Http2ProtocolOptions::default()),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    Cluster {
        name: MAIN_INTERNAL.into(),
        alt_stat_name: format!("{MAIN_INTERNAL};"),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        circuit_breakers: Some(unlimited_breakers()),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: MAIN_INTERNAL.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(internal_address(MAIN_INTERNAL, "")),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        transport_socket: Some(TransportSocket {
            name: "internal_upstream".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(
                &InternalUpstreamTransport {
                    passthrough_metadata: Vec::new(),
                    transport_socket: Some(TransportSocket {
                        name: "raw_buffer".into(),
                        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
                            &RawBuffer {},
                        ))),
                    }),
                },
            ))),
        }),
        typed_extension_protocol_options: [(HTTP_OPTIONS_KEY.to_string(), any(&http))]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// istiod's shapes are written as Envoy JSON where that reads closest to
/// the notes; a shape that does not convert is a bug of this file, caught
/// by its tests, so it is logged and left out rather than served broken.
fn from_json<M: Message + Default + prost::Name>(value: serde_json::Value) -> Option<M> {
    match ferry_envoy_json::from_json::<M>(&M::full_name(), value) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(resource.type = %M::full_name(), error = %e, "HBONE shape does not convert");
            None
        }
    }
}

/// The internal listener `connect_originate` (`buildConnectForwarder`):
/// the destination from the endpoint's original_dst metadata, a TCP proxy
/// tunnelling to it as CONNECT with `:authority` the pod's `ip:port`.
pub(super) fn connect_originate_listener() -> Option<Listener> {
    from_json(json!({
        "name": CONNECT_ORIGINATE,
        "use_original_dst": false,
        "internal_listener": {},
        "listener_filters": [{
            "name": ORIGINAL_DST_KEY,
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
        }],
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": CONNECT_ORIGINATE,
                "cluster": CONNECT_ORIGINATE,
                "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
            },
        }]}],
    }))
}

/// The filter-state object factory of Istio's hashable strings: istio-proxy
/// 1.29.2 and later register `istio.hashable_string`; istiod gives older
/// proxies (and so upstream Envoy, which has no such factory)
/// `envoy.string`.
fn string_factory(scope: &Scope<'_>) -> &'static str {
    let newer = scope.proxy.istio_version.as_deref().is_some_and(|v| {
        let mut parts = v
            .trim_start_matches('v')
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let version = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        version >= (1, 29, 2)
    });
    if newer {
        "istio.hashable_string"
    } else {
        "envoy.string"
    }
}

/// The listener `connect_terminate` on 15008 (`buildConnectTerminateListener`,
/// `buildHCMConnectTerminateChain`): mTLS with a client certificate of the
/// trust domain, HTTP/2 CONNECT terminated to the cluster `main_internal`,
/// the authority (the target `ip:port`), the caller's address and both
/// identities put in filter state shared with that upstream.
pub(super) fn connect_terminate_listener(scope: &Scope<'_>) -> Option<Listener> {
    let tls = any(
        &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext {
            common_tls_context: Some(connect_tls_context(scope)),
            require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue {
                value: true,
            }),
            ..Default::default()
        },
    );
    let factory = string_factory(scope);
    let state = |key: &str, format: &str, factory: Option<&str>| {
        let mut v = json!({
            "object_key": key,
            "format_string": {"text_format_source": {"inline_string": format}},
            "shared_with_upstream": "ONCE",
        });
        if let Some(f) = factory {
            v["factory_key"] = json!(f);
        }
        v
    };
    let mut http_filters = Vec::new();
    // istio-proxy's peer metadata discovery only feeds telemetry, and only
    // istio-proxy has it.
    if scope.proxy.istio_version.is_some() {
        http_filters.push(json!({
            "name": "waypoint_downstream_peer_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
                "value": {"downstream_discovery": [{"workload_discovery": {}}], "shared_with_upstream": true},
            },
        }));
    }
    http_filters.push(json!({
        "name": "connect_authority",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
            "on_request_headers": [
                state("envoy.filters.listener.original_dst.local_ip", "%REQ(:AUTHORITY)%", None),
                state("io.istio.connect_authority", "%REQ(:AUTHORITY)%", Some(factory)),
                state("envoy.filters.listener.original_dst.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%", None),
                state(PEER_PRINCIPAL_KEY, "%DOWNSTREAM_PEER_URI_SAN%", Some(factory)),
                state("io.istio.local_principal", "%DOWNSTREAM_LOCAL_URI_SAN%", Some(factory)),
            ],
        },
    }));
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));
    let mut listener: Listener = from_json(json!({
        "name": CONNECT_TERMINATE,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": HBONE_PORT}},
        "connection_balance_config": {"exact_balance": {}},
        "filter_chains": [{
            "name": "default",
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": CONNECT_TERMINATE,
                    "route_config": {
                        "name": "default",
                        "virtual_hosts": [{
                            "name": "default",
                            "domains": ["*"],
                            "routes": [{
                                "match": {"connect_matcher": {}},
                                "route": {
                                    "cluster": MAIN_INTERNAL,
                                    "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                                },
                            }],
                        }],
                    },
                    // istiod's proxy headers of the sidecar inbound class
                    // (GetProxyHeaders without proxyHeaders settings).
                    "forward_client_cert_details": "APPEND_FORWARD",
                    "server_name": "istio-envoy",
                    "set_current_client_cert_details": {"subject": true, "uri": true, "dns": true},
                    "use_remote_address": false,
                    "stream_idle_timeout": "0s",
                    "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                    "http2_protocol_options": {
                        "allow_connect": true,
                        "max_concurrent_streams": 100,
                        "connection_keepalive": {
                            "interval": format!("{H2_KEEPALIVE_INTERVAL_SECS}s"),
                            "timeout": format!("{H2_KEEPALIVE_TIMEOUT_SECS}s"),
                        },
                    },
                    "http_filters": http_filters,
                },
            }],
        }],
    }))?;
    if let Some(chain) = listener.filter_chains.first_mut() {
        chain.transport_socket = Some(TransportSocket {
            name: "tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(tls)),
        });
    }
    Some(listener)
}

/// The internal listener `main_internal` around `chains` (the pod's
/// inbound chains built without mTLS, see `listener::hbone_inbound_chains`):
/// each limited to the proxy's own IPs and cleared of its transport
/// protocol; a blackhole chain when there is none.
pub(super) fn main_internal_listener(
    scope: &Scope<'_>,
    mut chains: Vec<FilterChain>,
    listener_filters: Vec<envoy_types::pb::envoy::config::listener::v3::ListenerFilter>,
) -> Listener {
    let own: Vec<CidrRange> = scope
        .proxy
        .ips
        .iter()
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map(|ip| CidrRange {
            address_prefix: ip.to_string(),
            prefix_len: Some(UInt32Value {
                value: if ip.is_ipv4() { 32 } else { 128 },
            }),
        })
        .collect();
    for c in &mut chains {
        let m = c.filter_chain_match.get_or_insert_with(Default::default);
        m.transport_protocol.clear();
        m.prefix_ranges.clone_from(&own);
    }
    if chains.is_empty() {
        chains.push(super::listener::tcp_chain(
            "virtualInbound-blackhole",
            super::cluster::BLACKHOLE,
            super::listener::to_cluster(super::cluster::BLACKHOLE),
            None,
        ));
    }
    Listener {
        name: MAIN_INTERNAL.into(),
        traffic_direction: envoy_types::pb::envoy::config::core::v3::TrafficDirection::Inbound
            as i32,
        continue_on_listener_filters_timeout: true,
        listener_specifier: Some(
            envoy_types::pb::envoy::config::listener::v3::listener::ListenerSpecifier::InternalListener(
                Default::default(),
            ),
        ),
        listener_filters,
        filter_chains: chains,
        ..Default::default()
    }
}

/// The authorization filters of HBONE chains: the internal connection
/// carries no TLS, so RBAC reads the caller's identity from the filter
/// state `connect_terminate` set (`principalAuthenticated` with
/// `useAuthenticated: false`).
pub(super) fn filter_state_principals(http: &mut [HttpFilter], network: &mut [Filter]) {
    for f in http {
        if let Some(http_filter::ConfigType::TypedConfig(cfg)) = &mut f.config_type
            && cfg.type_url == <HttpRbac as prost::Name>::type_url()
            && let Ok(mut rbac) = HttpRbac::decode(cfg.value.as_slice())
        {
            rbac.rules.iter_mut().for_each(rewrite_rbac);
            rbac.shadow_rules.iter_mut().for_each(rewrite_rbac);
            *cfg = any(&rbac);
        }
    }
    for f in network {
        if let Some(filter::ConfigType::TypedConfig(cfg)) = &mut f.config_type
            && cfg.type_url == <NetworkRbac as prost::Name>::type_url()
            && let Ok(mut rbac) = NetworkRbac::decode(cfg.value.as_slice())
        {
            rbac.rules.iter_mut().for_each(rewrite_rbac);
            rbac.shadow_rules.iter_mut().for_each(rewrite_rbac);
            *cfg = any(&rbac);
        }
    }
}

fn rewrite_rbac(rbac: &mut Rbac) {
    for policy in rbac.policies.values_mut() {
        rewrite_policy(policy);
    }
}

fn rewrite_policy(policy: &mut Policy) {
    for p in &mut policy.principals {
        rewrite_principal(p);
    }
}

fn rewrite_principal(p: &mut Principal) {
    match &mut p.identifier {
        Some(principal::Identifier::Authenticated(a)) => {
            let name = a.principal_name.take();
            p.identifier = Some(principal::Identifier::FilterState(FilterStateMatcher {
                key: PEER_PRINCIPAL_KEY.into(),
                matcher: name.map(filter_state_matcher::Matcher::StringMatch),
            }));
        }
        Some(principal::Identifier::AndIds(set) | principal::Identifier::OrIds(set)) => {
            set.ids.iter_mut().for_each(rewrite_principal);
        }
        Some(principal::Identifier::NotId(inner)) => rewrite_principal(inner),
        _ => {}
    }
}
