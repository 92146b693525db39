//! The shapes istiod sends every sidecar once ambient is enabled
//! (`connect_originate` listener and cluster, service clusters whose
//! endpoints are internal addresses), as the converter reads them: what
//! Ferry acts on lands in the model, what it does not is refused naming the
//! field.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use ferry_model::cluster::HostAddr;
use ferry_model::listener::TunnelHost;
use ferry_model::{ChainKind, ClusterKind};
use serde_json::{Value, json};

fn listener(v: Value) -> Result<ferry_model::Listener, String> {
    let pb: Listener = ferry_xds::json::from_json("envoy.config.listener.v3.Listener", v)?;
    let mut w = ferry_xds::Warnings::default();
    ferry_xds::convert::listener(&pb, &mut w).map_err(|e| e.to_string())
}

fn cluster(v: Value) -> Result<(ferry_model::Cluster, Vec<String>), String> {
    let pb: Cluster = ferry_xds::json::from_json("envoy.config.cluster.v3.Cluster", v)?;
    let mut w = ferry_xds::Warnings::default();
    let c = ferry_xds::convert::cluster(&pb, &mut w).map_err(|e| e.to_string())?;
    Ok((c, w.0))
}

fn connect_originate() -> Value {
    json!({
        "name": "connect_originate",
        "internal_listener": {},
        "use_original_dst": false,
        "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
        "filter_chains": [{"filters": [{"name": "tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "connect_originate",
            "cluster": "connect_originate",
            "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
        }}]}],
    })
}

fn originate_cluster() -> Value {
    json!({
        "name": "connect_originate",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "cleanup_interval": "60s",
        "original_dst_lb_config": {
            "upstream_port_override": 15008,
            "metadata_key": {"key": "envoy.filters.listener.original_dst", "path": [{"key": "waypoint"}]},
        },
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "3600s"},
            "explicit_http_config": {"http2_protocol_options": {"allow_connect": true}},
        }},
    })
}

fn service_cluster(inner: Value) -> Value {
    json!({
        "name": "outbound|80||echo.default.svc.cluster.local",
        "type": "STATIC",
        "load_assignment": {"cluster_name": "x", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"envoy_internal_address": {
                "server_listener_name": "connect_originate", "endpoint_id": "10.0.1.5:8080"}}},
            "metadata": {"filter_metadata": {
                "envoy.filters.listener.original_dst": {"local": "10.0.1.5:8080"},
                "envoy.transport_socket_match": {"tunnel": "http"},
            }},
        }]}]},
        "transport_socket_matches": [{"name": "hbone", "match": {"tunnel": "http"}, "transport_socket": {
            "name": "internal_upstream",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                "passthrough_metadata": [
                    {"kind": {"host": {}}, "name": "envoy.filters.listener.original_dst"},
                    {"kind": {"cluster": {}}, "name": "istio"},
                ],
                "transport_socket": inner,
            },
        }}],
    })
}

fn raw_buffer() -> Value {
    json!({"name": "raw_buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}})
}

#[test]
fn istiod_ambient_shapes_are_accepted_and_land_in_the_model() {
    let l = listener(connect_originate()).expect("connect_originate listener");
    assert!(l.internal && !l.bind_to_port && l.listener_filters.original_dst);
    let ChainKind::Tcp(tp) = &l.filter_chains[0].kind else {
        panic!("a TCP chain: {:?}", l.filter_chains[0].kind);
    };
    let t = tp.tunneling.as_ref().expect("tunneling");
    assert_eq!(t.hostname, TunnelHost::DownstreamLocalAddress);

    let (c, _) = cluster(originate_cluster()).expect("connect_originate cluster");
    assert_eq!(c.lb.original_dst.port_override, Some(15008));
    assert!(c.lb.original_dst.waypoint_from_metadata);

    let (c, warnings) = cluster(service_cluster(raw_buffer())).expect("service cluster");
    assert!(c.transport_socket_matches[0].internal_upstream);
    let ClusterKind::Static(eps) = &c.kind else {
        panic!("static: {:?}", c.kind);
    };
    let HostAddr::Internal(addr) = &eps[0].address else {
        panic!("internal: {:?}", eps[0].address);
    };
    assert_eq!(
        (&*addr.listener, &*addr.endpoint_id),
        ("connect_originate", "10.0.1.5:8080")
    );
    assert_eq!(eps[0].original_dst().local, "10.0.1.5:8080".parse().ok());
    assert!(
        warnings.iter().any(|w| w.contains("\"istio\"")),
        "the istio metadata is not passed, and says so: {warnings:?}"
    );
}

#[test]
fn what_is_not_acted_on_is_refused_by_name() {
    // TLS inside the internal connection.
    let tls = json!({"name": "tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {}}});
    let e = cluster(service_cluster(tls)).expect_err("TLS inside internal_upstream");
    assert!(e.contains("transport_socket"), "{e}");

    // A metadata key other than Istio's waypoint.
    let mut c = originate_cluster();
    c["original_dst_lb_config"]["metadata_key"]["path"] = json!([{"key": "other"}]);
    let e = cluster(c).expect_err("other metadata key");
    assert!(e.contains("metadata_key"), "{e}");

    // A tunnel host with another substitution.
    let mut l = connect_originate();
    l["filter_chains"][0]["filters"][0]["typed_config"]["tunneling_config"]["hostname"] =
        json!("%REQ(x)%:80");
    let e = listener(l).expect_err("other substitution");
    assert!(e.contains("hostname"), "{e}");

    // Tunnelling over POST.
    let mut l = connect_originate();
    l["filter_chains"][0]["filters"][0]["typed_config"]["tunneling_config"]["use_post"] =
        json!(true);
    let e = listener(l).expect_err("POST");
    assert!(e.contains("use_post"), "{e}");

    // Protocol detection on an internal listener (Istio's main_internal for
    // sniffed ports) is taken...
    let mut l = connect_originate();
    l["listener_filters"]
        .as_array_mut()
        .expect("list")
        .push(json!({"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}));
    listener(l).expect("tls_inspector on an internal listener");
    // ...but TLS on its chains is not served: refused by name.
    let mut l = connect_originate();
    l["filter_chains"][0]["transport_socket"] =
        connect_terminate()["filter_chains"][0]["transport_socket"].clone();
    let e = listener(l).expect_err("TLS on an internal listener's chain");
    assert!(
        e.contains("filter_chains[0].transport_socket") && e.contains("internal listener"),
        "{e}"
    );

    // Route metadata passed through.
    let mut c = service_cluster(raw_buffer());
    c["transport_socket_matches"][0]["transport_socket"]["typed_config"]["passthrough_metadata"] =
        json!([{"kind": {"route": {}}, "name": "x"}]);
    let e = cluster(c).expect_err("route metadata");
    assert!(e.contains("passthrough_metadata"), "{e}");

    // An internal address as a listener's address.
    let mut l = connect_originate();
    l["internal_listener"] = Value::Null;
    l.as_object_mut()
        .expect("object")
        .remove("internal_listener");
    l["address"] = json!({"envoy_internal_address": {"server_listener_name": "x"}});
    let e = listener(l).expect_err("internal address on a socket listener");
    assert!(e.contains("envoy_internal_address"), "{e}");
}

/// istiod's `connect_terminate` listener (listener_waypoint.go
/// `buildConnectTerminateListener`), certificates inline.
fn connect_terminate() -> Value {
    let value = |key: &str, fmt: &str, factory: Option<&str>| {
        let mut v = json!({
            "object_key": key,
            "format_string": {"text_format_source": {"inline_string": fmt}},
            "shared_with_upstream": "ONCE",
        });
        if let Some(f) = factory {
            v["factory_key"] = json!(f);
        }
        v
    };
    json!({
        "name": "connect_terminate",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15008}},
        "connection_balance_config": {"exact_balance": {}},
        "filter_chains": [{
            "name": "default",
            "transport_socket": {"name": "tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
                    "alpn_protocols": ["h2"],
                    "tls_certificate_sds_secret_configs": [{"name": "default"}],
                    "combined_validation_context": {
                        "default_validation_context": {"match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}]},
                        "validation_context_sds_secret_config": {"name": "ROOTCA"},
                    },
                },
            }},
            "filters": [{"name": "connect_terminate", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "connect_terminate",
                "http2_protocol_options": {"allow_connect": true, "max_concurrent_streams": 100,
                    "connection_keepalive": {"interval": "10s", "timeout": "10s"}},
                "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                "stream_idle_timeout": "0s",
                "use_remote_address": false,
                "set_current_client_cert_details": {"subject": true, "uri": true, "dns": true},
                "route_config": {"name": "default", "virtual_hosts": [{"name": "default", "domains": ["*"],
                    "routes": [{"name": "default", "match": {"connect_matcher": {}}, "route": {
                        "cluster": "main_internal",
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                    }}]}]},
                "http_filters": [
                    {"name": "connect_authority", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
                        "on_request_headers": [
                            value("envoy.filters.listener.original_dst.local_ip", "%REQ(:AUTHORITY)%", None),
                            value("io.istio.connect_authority", "%REQ(:AUTHORITY)%", Some("istio.hashable_string")),
                            value("envoy.filters.listener.original_dst.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%", None),
                            value("io.istio.peer_principal", "%DOWNSTREAM_PEER_URI_SAN%", Some("istio.hashable_string")),
                            value("io.istio.local_principal", "%DOWNSTREAM_LOCAL_URI_SAN%", Some("istio.hashable_string")),
                        ],
                    }},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                ],
            }}],
        }],
    })
}

/// istiod's `main_internal` cluster (cluster_waypoint.go).
fn main_internal_cluster() -> Value {
    json!({
        "name": "main_internal",
        "type": "STATIC",
        "load_assignment": {"cluster_name": "main_internal", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "main_internal"}}}}]}]},
        "transport_socket": {"name": "internal_upstream", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            "transport_socket": raw_buffer(),
        }},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "300s"},
            "use_downstream_protocol_config": {},
        }},
    })
}

/// istiod's `main_internal` listener for a pod at 10.0.1.5 serving 8080:
/// the inbound chain limited to the pod's IP, RBAC on the peer principal
/// carried in filter state.
fn main_internal_listener() -> Value {
    json!({
        "name": "main_internal",
        "internal_listener": {},
        "traffic_direction": "INBOUND",
        "continue_on_listener_filters_timeout": true,
        "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
        "filter_chains": [{
            "name": "inbound|8080||",
            "filter_chain_match": {"destination_port": 8080,
                "prefix_ranges": [{"address_prefix": "10.0.1.5", "prefix_len": 32}]},
            "filters": [
                {"name": "envoy.filters.network.rbac", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
                    "stat_prefix": "tcp.",
                    "rules": {"policies": {"ns[default]-policy[allow]-rule[0]": {
                        "permissions": [{"and_rules": {"rules": [{"any": true}]}}],
                        "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [{"filter_state": {
                            "key": "io.istio.peer_principal",
                            "string_match": {"exact": "spiffe://cluster.local/ns/default/sa/sleep"}}}]}}]}}],
                    }}},
                }},
                {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "inbound|8080||", "cluster": "inbound|8080||"}},
            ],
        }],
    })
}

#[test]
fn istiod_server_shapes_are_accepted_and_land_in_the_model() {
    use ferry_model::filter_state::{ObjectKind, Shared};
    let l = listener(connect_terminate()).expect("connect_terminate listener");
    let ChainKind::Http(hcm) = &l.filter_chains[0].kind else {
        panic!("an HTTP chain: {:?}", l.filter_chains[0].kind);
    };
    assert!(hcm.allows_upgrade("CONNECT"));
    let ferry_model::RouteSource::Inline(rc) = &hcm.routes else {
        panic!("inline routes");
    };
    let route = &rc.virtual_hosts[0].routes[0];
    assert!(matches!(
        route.route_match.path,
        ferry_model::PathMatch::Connect
    ));
    assert!(route.connect_terminate);
    let ferry_model::HttpFilterConfig::SetFilterState(sfs) = &hcm.http_filters[0].config else {
        panic!("set_filter_state first: {:?}", hcm.http_filters[0].config);
    };
    let kinds: Vec<_> = sfs
        .on_request_headers
        .iter()
        .map(|v| (v.key.as_str(), v.kind, v.shared))
        .collect();
    assert_eq!(
        kinds[..3],
        [
            (
                "envoy.filters.listener.original_dst.local_ip",
                ObjectKind::Address,
                Shared::Once
            ),
            (
                "io.istio.connect_authority",
                ObjectKind::HashableString,
                Shared::Once
            ),
            (
                "envoy.filters.listener.original_dst.remote_ip",
                ObjectKind::Address,
                Shared::Once
            ),
        ]
    );

    let (c, _) = cluster(main_internal_cluster()).expect("main_internal cluster");
    let ClusterKind::Static(eps) = &c.kind else {
        panic!("static: {:?}", c.kind);
    };
    assert!(matches!(&eps[0].address, HostAddr::Internal(a) if &*a.listener == "main_internal"));

    let l = listener(main_internal_listener()).expect("main_internal listener");
    assert!(l.internal && l.listener_filters.original_dst);
    let chain = &l.filter_chains[0];
    assert_eq!(chain.rbac.len(), 1, "the network RBAC filter");
}

#[test]
fn server_shapes_not_acted_on_are_refused_by_name() {
    let hcm = "/filter_chains/0/filters/0/typed_config";
    let with = |ptr: &str, v: Value| {
        let mut l = connect_terminate();
        *l.pointer_mut(ptr).expect("pointer") = v;
        listener(l)
    };
    // A factory that would steer the connection.
    let e = with(
        &format!("{hcm}/http_filters/0/typed_config/on_request_headers/1/factory_key"),
        json!("envoy.tcp_proxy.cluster"),
    )
    .expect_err("other factory");
    assert!(
        e.contains("factory_key") && e.contains("envoy.tcp_proxy.cluster"),
        "{e}"
    );
    // PROXY protocol on the terminated stream.
    let e = with(
        &format!(
            "{hcm}/route_config/virtual_hosts/0/routes/0/route/upgrade_configs/0/connect_config"
        ),
        json!({"proxy_protocol_config": {}}),
    )
    .expect_err("PROXY protocol");
    assert!(e.contains("proxy_protocol_config"), "{e}");
    // connect_config on a non-CONNECT upgrade.
    let e = with(
        &format!(
            "{hcm}/route_config/virtual_hosts/0/routes/0/route/upgrade_configs/0/upgrade_type"
        ),
        json!("websocket"),
    )
    .expect_err("websocket with connect_config");
    assert!(e.contains("connect_config"), "{e}");
    // Filter state matched as an address.
    let mut l = main_internal_listener();
    *l.pointer_mut("/filter_chains/0/filters/0/typed_config/rules/policies/ns[default]-policy[allow]-rule[0]/principals/0")
        .expect("principal") = json!({"filter_state": {"key": "k", "address_match": {"ranges": []}}});
    let e = listener(l).expect_err("address_match");
    assert!(e.contains("address_match"), "{e}");
}
