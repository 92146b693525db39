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

    // Protocol detection on an internal listener (Istio's main_internal).
    let mut l = connect_originate();
    l["listener_filters"]
        .as_array_mut()
        .expect("list")
        .push(json!({"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}));
    let e = listener(l).expect_err("tls_inspector");
    assert!(
        e.contains("internal_listener") && e.contains("tls_inspector"),
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
