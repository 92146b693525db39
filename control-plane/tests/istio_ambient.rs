//! Ambient mode (`MeshOptions::ambient`, ferry-pilot's `--ambient` /
//! `PILOT_ENABLE_AMBIENT`): the HBONE resources istiod sends, compared
//! field by field with istiod's shapes written out here as Envoy JSON (from
//! istio's pilot/pkg/networking/core and xds/endpoints, see
//! ../shared/istio-notes/ambient-hbone-and-gateway-api.md): the
//! `connect_originate` listener and cluster, the `hbone` transport socket
//! match of service clusters, internal-address endpoints for pods in
//! ambient mode or labelled `networking.istio.io/tunnel: http` (but not for
//! sidecars taking Istio mTLS), and, for `ENABLE_HBONE` sidecars,
//! `connect_terminate`, `main_internal` and RBAC on filter state. Off by
//! default: nothing changes then. Real Envoy 1.40 must ACK it all.

use crate::common;

use std::collections::BTreeMap;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use ferry_pilot::istio::source::load_file;
use ferry_pilot::istio::translate::{Mesh, MeshOptions, NodeType, Proxy, ProxyConfig};
use prost::Message;
use serde_json::{Value, json};

const OBJECTS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {clusterIP: 10.96.0.20, selector: {app: echo}, ports: [{name: tcp, port: 8080, targetPort: 9000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-ambient, namespace: default, labels: {app: echo, istio.io/dataplane-mode: ambient}}
spec: {serviceAccountName: echo, containers: [{name: app, image: app}]}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-sidecar, namespace: default, labels: {app: echo, security.istio.io/tlsMode: istio, networking.istio.io/tunnel: http}}
spec: {serviceAccountName: echo, containers: [{name: app, image: app}]}
status: {podIP: 10.1.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-tunnel, namespace: default, labels: {app: echo, networking.istio.io/tunnel: http}}
spec: {serviceAccountName: echo, containers: [{name: app, image: app}]}
status: {podIP: 10.1.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-plain, namespace: default, labels: {app: echo}}
spec: {serviceAccountName: echo, containers: [{name: app, image: app}]}
status: {podIP: 10.1.0.8}
---
apiVersion: v1
kind: Service
metadata: {name: sleep, namespace: default}
spec: {clusterIP: 10.96.0.30, selector: {app: sleep}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep, security.istio.io/tlsMode: istio}}
spec: {serviceAccountName: sleep, containers: [{name: app, image: app}]}
status: {podIP: 10.1.0.9}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-curl, namespace: default}
spec:
  selector: {matchLabels: {app: sleep}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/curl]}}]
";

const ECHO: &str = "outbound|8080||echo.default.svc.cluster.local";

fn mesh(ambient: bool, extra: impl FnOnce(&mut MeshOptions)) -> Mesh {
    let dir = std::env::temp_dir().join(format!("ferry-ambient-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join(format!(
        "objects-{ambient}-{:?}.yaml",
        std::thread::current().id()
    ));
    std::fs::write(&file, OBJECTS).expect("write");
    let snap = load_file(&file).expect("load");
    let _ = std::fs::remove_file(&file);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mut options = MeshOptions {
        ambient,
        trust_domain_aliases: vec!["old.example".into()],
        ..Default::default()
    };
    extra(&mut options);
    Mesh::new(&snap, options)
}

fn sleep_proxy(edit: impl FnOnce(&mut Proxy)) -> Proxy {
    let mut p = Proxy {
        id: "sidecar~10.1.0.9~sleep.default~default.svc.cluster.local".into(),
        namespace: "default".into(),
        labels: BTreeMap::from([
            ("app".to_string(), "sleep".to_string()),
            ("security.istio.io/tlsMode".to_string(), "istio".to_string()),
        ]),
        service_account: "sleep".into(),
        ips: vec!["10.1.0.9".into()],
        ..Default::default()
    };
    edit(&mut p);
    p
}

/// Envoy JSON of a message, normalised through the schema (so nested
/// `Any`s compare by content).
fn to_json<M: Message + Default + prost::Name>(m: &M) -> Value {
    ferry_envoy_json::to_json(&M::full_name(), m).expect("to JSON")
}

fn normalised<M: Message + Default + prost::Name>(expected: Value) -> Value {
    let m: M = ferry_envoy_json::from_json(&M::full_name(), expected).expect("expected shape");
    to_json(&m)
}

fn assert_shape<M: Message + Default + prost::Name>(what: &str, actual: &M, expected: Value) {
    let (got, want) = (to_json(actual), normalised::<M>(expected));
    assert_eq!(
        got,
        want,
        "{what}:\ngot  {}\nwant {}",
        serde_json::to_string_pretty(&got).unwrap_or_default(),
        serde_json::to_string_pretty(&want).unwrap_or_default()
    );
}

fn listener<'a>(cfg: &'a ProxyConfig, name: &str) -> Option<&'a Listener> {
    cfg.listeners.iter().find(|l| l.name == name)
}

fn cluster<'a>(cfg: &'a ProxyConfig, name: &str) -> Option<&'a Cluster> {
    cfg.clusters.iter().find(|c| c.name == name)
}

fn endpoints<'a>(cfg: &'a ProxyConfig, name: &str) -> &'a ClusterLoadAssignment {
    cfg.endpoints
        .iter()
        .find(|e| e.cluster_name == name)
        .unwrap_or_else(|| panic!("no endpoints for {name}"))
}

/// The endpoints of `cla` as JSON, by address (socket or internal).
fn endpoint_json(cla: &ClusterLoadAssignment) -> BTreeMap<String, Value> {
    let json = to_json(cla);
    let mut out = BTreeMap::new();
    for group in json["endpoints"].as_array().into_iter().flatten() {
        for ep in group["lb_endpoints"].as_array().into_iter().flatten() {
            let addr = &ep["endpoint"]["address"];
            let key = match addr.get("socket_address") {
                Some(s) => format!(
                    "{}:{}",
                    s["address"].as_str().unwrap_or(""),
                    s["port_value"]
                ),
                None => format!(
                    "internal {}",
                    addr["envoy_internal_address"]["endpoint_id"]
                        .as_str()
                        .unwrap_or("")
                ),
            };
            out.insert(key, ep.clone());
        }
    }
    out
}

fn sds(name: &str) -> Value {
    json!({"name": name, "sds_config": {
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": true,
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
        },
        "initial_fetch_timeout": "0s",
        "resource_api_version": "V3",
    }})
}

/// `buildCommonConnectTLSContext`: TLS 1.3 only, ALPN h2, one URI SAN
/// prefix per trust domain (and alias).
fn connect_tls() -> Value {
    json!({
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [sds("default")],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}},
                {"san_type": "URI", "matcher": {"prefix": "spiffe://old.example/"}},
            ]},
            "validation_context_sds_secret_config": sds("ROOTCA"),
        },
    })
}

fn unlimited() -> Value {
    json!({"thresholds": [{
        "max_connections": 4294967295u32, "max_pending_requests": 4294967295u32,
        "max_requests": 4294967295u32, "max_retries": 4294967295u32, "track_remaining": true,
    }]})
}

fn raw_buffer() -> Value {
    json!({"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}})
}

fn hbone_match() -> Value {
    json!({"name": "hbone", "match": {"tunnel": "http"}, "transport_socket": {
        "name": "envoy.transport_sockets.internal_upstream",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            "passthrough_metadata": [
                {"kind": {"host": {}}, "name": "envoy.filters.listener.original_dst"},
                {"kind": {"cluster": {}}, "name": "istio"},
                {"kind": {"host": {}}, "name": "istio"},
            ],
            "transport_socket": raw_buffer(),
        },
    }})
}

#[test]
fn off_by_default_nothing_changes() {
    let proxy = sleep_proxy(|p| p.enable_hbone = true);
    let default = Mesh::new(
        &load_objects(),
        MeshOptions {
            trust_domain_aliases: vec!["old.example".into()],
            ..Default::default()
        },
    )
    .proxy_config(&proxy);
    let off = mesh(false, |_| {}).proxy_config(&proxy);
    assert_eq!(default, off);
    let text = format!("{off:?}");
    for word in [
        "connect_originate",
        "connect_terminate",
        "main_internal",
        "EnvoyInternalAddress",
        "hbone",
    ] {
        assert!(!text.contains(word), "{word} without ambient");
    }
    // The ambient pod is a plain endpoint then.
    assert!(endpoint_json(endpoints(&off, ECHO)).contains_key("10.1.0.5:9000"));
}

fn load_objects() -> ferry_pilot::istio::source::Snapshot {
    let file =
        std::env::temp_dir().join(format!("ferry-ambient-default-{}.yaml", std::process::id()));
    std::fs::write(&file, OBJECTS).expect("write");
    let snap = load_file(&file).expect("load");
    let _ = std::fs::remove_file(&file);
    snap
}

#[test]
fn every_proxy_gets_connect_originate_in_istiods_shape() {
    let mesh = mesh(true, |o| {
        o.hbone_idle_timeout = Some(std::time::Duration::from_secs(1800));
        o.connect_timeout = std::time::Duration::from_secs(3);
    });
    let sidecar = mesh.proxy_config(&sleep_proxy(|_| {}));
    let gateway = mesh.proxy_config(&Proxy {
        node_type: NodeType::Router,
        id: "router~10.1.0.50~gw.istio-system~istio-system.svc.cluster.local".into(),
        namespace: "istio-system".into(),
        ips: vec!["10.1.0.50".into()],
        ..Default::default()
    });
    for (who, cfg) in [("sidecar", &sidecar), ("gateway", &gateway)] {
        assert_shape(
            &format!("{who} listener"),
            listener(cfg, "connect_originate").expect("connect_originate listener"),
            json!({
                "name": "connect_originate",
                "use_original_dst": false,
                "internal_listener": {},
                "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "connect_originate",
                    "cluster": "connect_originate",
                    "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                }}]}],
            }),
        );
        assert_shape(
            &format!("{who} cluster"),
            cluster(cfg, "connect_originate").expect("connect_originate cluster"),
            json!({
                "name": "connect_originate",
                "alt_stat_name": "connect_originate;",
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "3s",
                "cleanup_interval": "60s",
                "circuit_breakers": unlimited(),
                "original_dst_lb_config": {
                    "upstream_port_override": 15008,
                    "metadata_key": {"key": "envoy.filters.listener.original_dst", "path": [{"key": "waypoint"}]},
                },
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "common_http_protocol_options": {"idle_timeout": "1800s"},
                    "explicit_http_config": {"http2_protocol_options": {"allow_connect": true}},
                }},
                "transport_socket": {"name": "tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": connect_tls(),
                }},
            }),
        );
        // Without ENABLE_HBONE, nothing listens on 15008.
        assert!(listener(cfg, "connect_terminate").is_none(), "{who}");
        assert!(cluster(cfg, "main_internal").is_none(), "{who}");
    }
}

#[test]
fn hbone_capable_endpoints_become_internal_addresses() {
    let cfg = mesh(true, |_| {}).proxy_config(&sleep_proxy(|_| {}));
    let eps = endpoint_json(endpoints(&cfg, ECHO));
    let internal = |ip: &str| {
        json!({
            "endpoint": {"address": {"envoy_internal_address": {
                "server_listener_name": "connect_originate", "endpoint_id": format!("{ip}:9000")}}},
            "metadata": {"filter_metadata": {
                "envoy.filters.listener.original_dst": {"local": format!("{ip}:9000")},
                "envoy.transport_socket_match": {"tunnel": "http"},
            }},
            "load_balancing_weight": 1,
        })
    };
    let keys: Vec<&String> = eps.keys().collect();
    assert_eq!(
        keys,
        [
            "10.1.0.6:9000",
            "10.1.0.8:9000",
            "internal 10.1.0.5:9000",
            "internal 10.1.0.7:9000"
        ],
        "ambient (.5) and tunnel-labelled (.7) pods tunnel; the sidecar (.6) keeps Istio mTLS"
    );
    assert_eq!(eps["internal 10.1.0.5:9000"], internal("10.1.0.5"));
    assert_eq!(eps["internal 10.1.0.7:9000"], internal("10.1.0.7"));
    assert_eq!(
        eps["10.1.0.6:9000"]["metadata"]["filter_metadata"]["envoy.transport_socket_match"],
        json!({"tlsMode": "istio"})
    );
    // The service cluster: HBONE first, then auto mTLS, then plaintext.
    let c = to_json(cluster(&cfg, ECHO).expect("echo cluster"));
    let matches = c["transport_socket_matches"].as_array().expect("matches");
    let names: Vec<&str> = matches.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, ["hbone", "tlsMode-istio", "tlsMode-disabled"]);
    assert_eq!(
        matches[0],
        normalised::<envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch>(
            hbone_match()
        )
    );
    assert!(c.get("transport_socket").is_none());

    // PILOT_PREFER_SENDING_HBONE: the sidecar that takes mTLS is tunnelled too.
    let prefer = mesh(true, |o| o.prefer_hbone_send = true).proxy_config(&sleep_proxy(|_| {}));
    assert!(endpoint_json(endpoints(&prefer, ECHO)).contains_key("internal 10.1.0.6:9000"));

    // DISABLE_HBONE_SEND: no tunnel and no connect_originate cluster, but
    // the listener and the transport socket matches stay (as istiod).
    let no_send = mesh(true, |_| {}).proxy_config(&sleep_proxy(|p| p.disable_hbone_send = true));
    let eps = endpoint_json(endpoints(&no_send, ECHO));
    assert!(eps.keys().all(|k| !k.starts_with("internal")), "{eps:?}");
    assert!(cluster(&no_send, "connect_originate").is_none());
    assert!(listener(&no_send, "connect_originate").is_some());
}

#[test]
fn destination_rule_tls_is_kept_inside_or_beside_the_tunnel() {
    let file = std::env::temp_dir().join(format!("ferry-ambient-dr-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        format!(
            "{OBJECTS}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: echo, namespace: default}}\n\
             spec: {{host: echo, trafficPolicy: {{tls: {{mode: SIMPLE}}}}}}\n"
        ),
    )
    .expect("write");
    let snap = load_file(&file).expect("load");
    let _ = std::fs::remove_file(&file);
    let cfg = Mesh::new(
        &snap,
        MeshOptions {
            ambient: true,
            ..Default::default()
        },
    )
    .proxy_config(&sleep_proxy(|_| {}));
    let c = to_json(cluster(&cfg, ECHO).expect("echo cluster"));
    let matches = c["transport_socket_matches"].as_array().expect("matches");
    let names: Vec<&str> = matches.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, ["hbone", "user"]);
    let user_tls = &matches[1]["transport_socket"];
    assert_eq!(user_tls["name"], "envoy.transport_sockets.tls");
    assert_eq!(
        &matches[0]["transport_socket"]["typed_config"]["transport_socket"], user_tls,
        "the user's TLS runs inside the tunnel"
    );
    assert!(c.get("transport_socket").is_none());
}

#[test]
fn enable_hbone_sidecar_gets_connect_terminate_and_main_internal() {
    let cfg = mesh(true, |_| {}).proxy_config(&sleep_proxy(|p| p.enable_hbone = true));
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
    // Upstream Envoy (no ISTIO_VERSION) gets `envoy.string`, as istiod gives
    // proxies before 1.29.2, and no istio-proxy peer metadata filter.
    assert_shape(
        "connect_terminate",
        listener(&cfg, "connect_terminate").expect("connect_terminate"),
        json!({
            "name": "connect_terminate",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15008}},
            "connection_balance_config": {"exact_balance": {}},
            "filter_chains": [{
                "name": "default",
                "transport_socket": {"name": "tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": connect_tls(),
                    "require_client_certificate": true,
                }},
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "connect_terminate",
                    "route_config": {"name": "default", "virtual_hosts": [{
                        "name": "default", "domains": ["*"],
                        "routes": [{"match": {"connect_matcher": {}}, "route": {
                            "cluster": "main_internal",
                            "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                        }}],
                    }]},
                    "forward_client_cert_details": "APPEND_FORWARD",
                    "server_name": "istio-envoy",
                    "set_current_client_cert_details": {"subject": true, "uri": true, "dns": true},
                    "use_remote_address": false,
                    "stream_idle_timeout": "0s",
                    "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                    "http2_protocol_options": {
                        "allow_connect": true,
                        "max_concurrent_streams": 100,
                        "connection_keepalive": {"interval": "10s", "timeout": "20s"},
                    },
                    "http_filters": [
                        {"name": "connect_authority", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
                            "on_request_headers": [
                                state("envoy.filters.listener.original_dst.local_ip", "%REQ(:AUTHORITY)%", None),
                                state("io.istio.connect_authority", "%REQ(:AUTHORITY)%", Some("envoy.string")),
                                state("envoy.filters.listener.original_dst.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%", None),
                                state("io.istio.peer_principal", "%DOWNSTREAM_PEER_URI_SAN%", Some("envoy.string")),
                                state("io.istio.local_principal", "%DOWNSTREAM_LOCAL_URI_SAN%", Some("envoy.string")),
                            ],
                        }},
                        {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                    ],
                }}],
            }],
        }),
    );
    assert_shape(
        "main_internal cluster",
        cluster(&cfg, "main_internal").expect("main_internal cluster"),
        json!({
            "name": "main_internal",
            "alt_stat_name": "main_internal;",
            "type": "STATIC",
            "circuit_breakers": unlimited(),
            "load_assignment": {"cluster_name": "main_internal", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"envoy_internal_address": {"server_listener_name": "main_internal"}}}}]}]},
            "transport_socket": {"name": "internal_upstream", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                "transport_socket": {"name": "raw_buffer", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}},
            }},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"idle_timeout": "300s"},
                "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
            }},
        }),
    );
    let l = to_json(listener(&cfg, "main_internal").expect("main_internal listener"));
    assert_eq!(l["internal_listener"], json!({}));
    assert_eq!(l["traffic_direction"], "INBOUND");
    assert_eq!(l["continue_on_listener_filters_timeout"], true);
    assert_eq!(
        l["listener_filters"][0]["name"],
        "envoy.filters.listener.original_dst"
    );
    let chains = l["filter_chains"].as_array().expect("chains");
    let names: Vec<&str> = chains.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "0.0.0.0_8080",
            "virtualInbound-catchall-http",
            "virtualInbound"
        ]
    );
    for c in chains {
        let m = &c["filter_chain_match"];
        assert_eq!(
            m["prefix_ranges"],
            json!([{"address_prefix": "10.1.0.9", "prefix_len": 32}]),
            "only the pod's own IP: {c}"
        );
        assert!(m.get("transport_protocol").is_none(), "{c}");
        assert!(c.get("transport_socket").is_none(), "no mTLS inside: {c}");
    }
    // RBAC reads the HBONE peer from filter state, not from a TLS peer.
    let text = l.to_string();
    assert!(
        text.contains(
            r#"{"filter_state":{"key":"io.istio.peer_principal","string_match":{"exact":"spiffe://cluster.local/ns/default/sa/curl"}}}"#
        ),
        "{text}"
    );
    assert!(!text.contains("authenticated"), "{text}");
    // The sidecar's own inbound listener still checks TLS peers.
    let inbound = to_json(listener(&cfg, "virtualInbound").expect("virtualInbound")).to_string();
    assert!(inbound.contains("authenticated") && !inbound.contains("filter_state"));

    // istio-proxy 1.29.2 and later gets istiod's hashable strings.
    let istio = mesh(true, |_| {}).proxy_config(&sleep_proxy(|p| {
        p.enable_hbone = true;
        p.istio_version = Some("1.29.2".into());
    }));
    let text =
        to_json(listener(&istio, "connect_terminate").expect("connect_terminate")).to_string();
    assert!(text.contains("istio.hashable_string") && !text.contains("envoy.string"));
    assert!(text.contains("io.istio.http.peer_metadata.Config"));
}

/// Node metadata of the sleep sidecar, as istio-agent writes it.
fn sleep_node(enable_hbone: bool) -> (String, Value) {
    let mut meta = json!({"NAMESPACE": "default",
        "LABELS": {"app": "sleep", "security.istio.io/tlsMode": "istio"},
        "SERVICE_ACCOUNT": "sleep", "INSTANCE_IPS": "10.1.0.9"});
    if enable_hbone {
        meta["ENABLE_HBONE"] = json!("true");
    }
    (
        format!("sidecar~10.1.0.9~sleep-{enable_hbone}.default~default.svc.cluster.local"),
        meta,
    )
}

/// `ferry-pilot serve` with ambient switched on as istiod is
/// (`PILOT_ENABLE_AMBIENT=true`), killed on drop.
struct ServePilot(std::process::Child, std::path::PathBuf);

impl Drop for ServePilot {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn serve_ambient(addr: std::net::SocketAddr) -> ServePilot {
    let dir = std::env::temp_dir().join(format!("ferry-ambient-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    // ferry-pilot issues the certificate of the pod at the address a
    // proxy connects from: this one stands for the sidecar on loopback.
    let local = "apiVersion: v1\nkind: Pod\nmetadata: {name: sleep-local, namespace: default}\n\
                 spec: {serviceAccountName: sleep, containers: [{name: app, image: app}]}\n\
                 status: {podIP: 127.0.0.1}\n";
    std::fs::write(dir.join("objects.yaml"), format!("{OBJECTS}---\n{local}")).expect("write");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-pilot"))
        .args(["serve", "--config"])
        .arg(&dir)
        .args(["--listen", &addr.to_string(), "--log-level", "warn"])
        .env("PILOT_ENABLE_AMBIENT", "true")
        .spawn()
        .expect("start ferry-pilot");
    ServePilot(child, dir)
}

#[tokio::test]
async fn envoy_acks_the_ambient_shapes() {
    let Some(bin) = envoy_binary() else { return };
    let xds = free_addr();
    let _pilot = serve_ambient(xds);
    for enable_hbone in [false, true] {
        let (id, meta) = sleep_node(enable_hbone);
        let envoy = start_envoy_with_sds(&bin, &id, "GRPC", xds, meta, Some(xds));
        let admin = envoy.admin().await;
        // Everything sent is in use once the listeners are (clusters warm
        // on their SDS certificate first).
        let deadline = std::time::Instant::now() + ENVOY_WAIT;
        let dump = loop {
            let (_, dump) = http_get(admin, "/config_dump?include_eds").await;
            let (_, stats) = http_get(admin, "/stats").await;
            let ready = stats
                .lines()
                .any(|l| l == "listener_manager.lds.update_success: 1")
                && stats
                    .lines()
                    .any(|l| l == "cluster_manager.warming_clusters: 0")
                && dump.contains("dynamic_listeners");
            if ready {
                for line in stats.lines().filter(|l| l.contains("update_rejected")) {
                    assert!(line.ends_with(": 0"), "{id}: {line}\n{}", envoy.log());
                }
                break dump;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{id}: Envoy did not take its configuration:\n{stats}\n{}",
                envoy.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        for name in [
            "\"connect_originate\"",
            "envoy.transport_sockets.internal_upstream",
            "envoy_internal_address",
            "\"tunnel\": \"http\"",
        ] {
            assert!(
                dump.contains(name),
                "{id}: {name} missing from Envoy's config"
            );
        }
        assert_eq!(
            dump.contains("\"connect_terminate\"") && dump.contains("\"main_internal\""),
            enable_hbone,
            "{id}: 15008 only with ENABLE_HBONE"
        );
        // Listeners active, none failed (15008 bound, main_internal internal).
        let (_, listeners) = http_get(admin, "/listeners?format=json").await;
        assert_eq!(
            listeners.contains("connect_terminate"),
            enable_hbone,
            "{listeners}"
        );
        assert!(listeners.contains("connect_originate"), "{listeners}");
    }
}

/// Which pods are in ambient mode, as istio-cni decides: those of a
/// namespace labelled `istio.io/dataplane-mode: ambient` unless they opt
/// out (`istio.io/dataplane-mode: none`) or run a sidecar, and any pod
/// istio-cni annotated `ambient.istio.io/redirection: enabled`.
#[test]
fn namespace_label_and_cni_annotation_put_pods_in_ambient_mode() {
    let objects = "\
apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: amb}
spec: {clusterIP: 10.96.0.40, selector: {app: api}, ports: [{name: tcp, port: 7000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-captured, namespace: amb, labels: {app: api}}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.1.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-opted-out, namespace: amb, labels: {app: api, istio.io/dataplane-mode: none}}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-sidecar, namespace: amb, labels: {app: api, sidecar.istio.io/inject: \"true\"}}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.1.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: api-redirected, namespace: amb, labels: {app: api, istio.io/dataplane-mode: none},
  annotations: {ambient.istio.io/redirection: enabled}}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.1.1.4}
";
    let file = std::env::temp_dir().join(format!("ferry-ambient-ns-{}.yaml", std::process::id()));
    std::fs::write(&file, objects).expect("write");
    let snap = load_file(&file).expect("load");
    let _ = std::fs::remove_file(&file);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mesh = Mesh::new(
        &snap,
        MeshOptions {
            ambient: true,
            ..Default::default()
        },
    );
    let cfg = mesh.proxy_config(&sleep_proxy(|_| {}));
    let eps = endpoint_json(endpoints(&cfg, "outbound|7000||api.amb.svc.cluster.local"));
    let keys: Vec<&String> = eps.keys().collect();
    assert_eq!(
        keys,
        [
            "10.1.1.2:7000",
            "10.1.1.3:7000",
            "internal 10.1.1.1:7000",
            "internal 10.1.1.4:7000"
        ]
    );
}
