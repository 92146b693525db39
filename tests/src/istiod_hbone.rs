//! istiod's HBONE client shapes for test bootstraps (from
//! `../shared/istio-notes/ambient-hbone-and-gateway-api.md`): the
//! `connect_originate` internal listener and cluster, and a service cluster
//! whose endpoints are internal addresses to it, as every ambient-enabled
//! sidecar gets them; plus the bootstrap extension internal listeners need.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::{Value, json};

/// The mesh's trust domain the shapes check peers against.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// istiod's `connect_originate` internal listener (listener_waypoint.go
/// `buildConnectForwarder`).
pub fn connect_originate_listener() -> Value {
    json!({
        "name": "connect_originate",
        "internal_listener": {},
        "use_original_dst": false,
        "listener_filters": [{
            "name": "envoy.filters.listener.original_dst",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
        }],
        "filter_chains": [{"filters": [{
            "name": "tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "connect_originate",
                "cluster": "connect_originate",
                "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
            },
        }]}],
    })
}

/// istiod's `connect_originate` cluster (cluster_waypoint.go), with the
/// workload certificate and root as files instead of SDS.
pub fn connect_originate_cluster(dir: &Path, hbone_port: u16) -> Value {
    let file = |f: &str| json!({"filename": dir.join(f).display().to_string()});
    json!({
        "name": "connect_originate",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "2s",
        "cleanup_interval": "60s",
        "original_dst_lb_config": {
            "upstream_port_override": hbone_port,
            "metadata_key": {"key": "envoy.filters.listener.original_dst", "path": [{"key": "waypoint"}]},
        },
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "3600s"},
            "explicit_http_config": {"http2_protocol_options": {"allow_connect": true}},
        }},
        "transport_socket": {"name": "tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
                "alpn_protocols": ["h2"],
                "tls_certificates": [{"certificate_chain": file("cert.pem"), "private_key": file("key.pem")}],
                "validation_context": {
                    "trusted_ca": file("root.pem"),
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"prefix": format!("spiffe://{TRUST_DOMAIN}/")}}],
                },
            },
        }},
    })
}

/// An EDS-shaped endpoint of an ambient pod (endpoint_builder.go): an
/// internal address to `connect_originate`, the pod's address as
/// original_dst metadata, `tunnel: http`.
pub fn hbone_endpoint(pod: SocketAddr) -> Value {
    json!({
        "endpoint": {"address": {"envoy_internal_address": {
            "server_listener_name": "connect_originate",
            "endpoint_id": pod.to_string(),
        }}},
        "metadata": {"filter_metadata": {
            "envoy.filters.listener.original_dst": {"local": pod.to_string()},
            "envoy.transport_socket_match": {"tunnel": "http"},
        }},
    })
}

/// The service's cluster with istiod's transport socket matches
/// (cluster_tls.go): `hbone` for tunnel endpoints, plaintext otherwise.
pub fn service_cluster(name: &str, pods: &[SocketAddr]) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{
            "lb_endpoints": pods.iter().map(|p| hbone_endpoint(*p)).collect::<Vec<_>>(),
        }]},
        "transport_socket_matches": [
            {"name": "hbone", "match": {"tunnel": "http"}, "transport_socket": {
                "name": "internal_upstream",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                    "passthrough_metadata": [
                        {"kind": {"host": {}}, "name": "envoy.filters.listener.original_dst"},
                        {"kind": {"cluster": {}}, "name": "istio"},
                        {"kind": {"host": {}}, "name": "istio"},
                    ],
                    "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
                    }},
                },
            }},
            {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
                "name": "envoy.transport_sockets.raw_buffer",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
            }},
        ],
    })
}

/// The bootstrap extension that turns on internal listeners (Envoy needs
/// it; Ferry accepts it).
pub fn internal_listener_extension() -> Value {
    json!([{
        "name": "envoy.bootstrap.internal_listener",
        "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            "value": {"buffer_size_kb": 64},
        },
    }])
}
