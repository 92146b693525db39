//! Real Envoy (1.40, from `scripts/install-envoy.sh`) as the ADS client, over
//! state of the world and delta: it ACKs a small configuration (an HTTP
//! listener with RDS routes to an EDS cluster), shows it in `/config_dump`,
//! routes a request with it, and NACKs a route with an invalid regex, which
//! the server's status records with Envoy's error_detail.
//! Skipped with a notice when Envoy cannot be installed (failed under CI=true).

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use ferry_pilot::xds::{CLUSTER, Cache, ENDPOINT, LISTENER, ROUTE, SyncState};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A one-line HTTP backend.
async fn backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = l.local_addr().expect("backend addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nferry-ok\n",
                    )
                    .await;
            });
        }
    });
    addr
}

fn route_config(regex: Option<&str>) -> (String, envoy_types::pb::google::protobuf::Any) {
    let matcher = match regex {
        Some(r) => json!({"safe_regex": {"regex": r}}),
        None => json!({"prefix": "/"}),
    };
    let any = json_any::<RouteConfiguration>(json!({
        "name": "local_route",
        "virtual_hosts": [{"name": "all", "domains": ["*"],
            "routes": [{"match": matcher, "route": {"cluster": "backend"}}]}]
    }));
    ("local_route".to_string(), any)
}

fn config(cache: &Cache, listen_port: u16, backend: SocketAddr) {
    let cluster = json_any::<Cluster>(json!({
        "name": "backend", "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
    }));
    let cla = json_any::<ClusterLoadAssignment>(json!({
        "cluster_name": "backend",
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address":
            {"address": "127.0.0.1", "port_value": backend.port()}}}}]}]
    }));
    let listener = json_any::<Listener>(json!({
        "name": "http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "http",
                "rds": {"route_config_name": "local_route",
                        "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        }]}]
    }));
    cache.set(CLUSTER, [("backend".to_string(), cluster)]);
    cache.set(ENDPOINT, [("backend".to_string(), cla)]);
    cache.set(LISTENER, [("http".to_string(), listener)]);
    cache.set(ROUTE, [route_config(None)]);
}

/// The `name`s Envoy's `/config_dump` lists for one dump type.
fn dumped(dump: &serde_json::Value, kind: &str) -> Vec<String> {
    let section = dump["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .find(|c| {
            c["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with(&format!(".{kind}")))
        })
        .unwrap_or_else(|| panic!("no {kind} in the dump"));
    let (list, pointer) = match kind {
        "ListenersConfigDump" => ("dynamic_listeners", "/active_state/listener/name"),
        "ClustersConfigDump" => ("dynamic_active_clusters", "/cluster/name"),
        "RoutesConfigDump" => ("dynamic_route_configs", "/route_config/name"),
        "EndpointsConfigDump" => ("dynamic_endpoint_configs", "/endpoint_config/cluster_name"),
        other => panic!("{other}"),
    };
    section[list]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.pointer(pointer).and_then(|n| n.as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

async fn scenario(api_type: &str, node: &str) {
    let Some(bin) = envoy_binary() else { return };
    let cache = Cache::new();
    let listen_port = free_port();
    config(&cache, listen_port, backend().await);
    let (server, xds) = start(cache.clone()).await;
    let envoy = start_envoy(&bin, node, api_type, xds, json!({}));

    for url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        if let Err(e) = server.wait_ack(node, url, "v1", ENVOY_WAIT).await {
            panic!("{e}\nEnvoy log:\n{}", envoy.log());
        }
    }
    let status = server.status();
    let proxy = status
        .iter()
        .find(|p| p.node_id == node)
        .expect("Envoy's stream");
    assert_eq!(proxy.node_cluster, "ferry-test");
    for url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        let t = &proxy.types[url];
        assert_eq!(t.nacks, 0, "{url}: {:?}", t.last_nack);
        assert_eq!(t.state, SyncState::Synced, "{url}");
    }
    assert!(proxy.types[CLUSTER].wildcard && proxy.types[LISTENER].wildcard);
    assert_eq!(proxy.types[ENDPOINT].subscribed, ["backend"]);
    assert_eq!(proxy.types[ROUTE].subscribed, ["local_route"]);

    let admin = envoy.admin().await;
    let (code, body) = http_get(admin, "/config_dump?include_eds").await;
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump is JSON");
    assert_eq!(dumped(&dump, "ListenersConfigDump"), ["http"]);
    assert_eq!(dumped(&dump, "ClustersConfigDump"), ["backend"]);
    assert_eq!(dumped(&dump, "RoutesConfigDump"), ["local_route"]);
    assert_eq!(dumped(&dump, "EndpointsConfigDump"), ["backend"]);

    // The served configuration routes traffic.
    let mut answered = None;
    for _ in 0..100 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", listen_port)),
        )
        .await
        {
            drop(stream);
            answered = Some(http_get(SocketAddr::from(([127, 0, 0, 1], listen_port)), "/").await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered, Some((200, "ferry-ok\n".to_string())));

    // An invalid regex: Envoy NACKs the route configuration.
    let bad = cache.set(ROUTE, [route_config(Some("(unclosed"))]);
    assert_eq!(bad, "v2");
    let nack = match server.wait_nack(node, ROUTE, ENVOY_WAIT).await {
        Ok(n) => n,
        Err(e) => panic!("{e}\nEnvoy log:\n{}", envoy.log()),
    };
    eprintln!("{api_type}: Envoy's NACK: {nack:?}");
    assert_eq!(nack.version, "v2");
    assert!(
        nack.message.contains("unclosed") || nack.message.to_lowercase().contains("regex"),
        "{}",
        nack.message
    );
    let status = server.status();
    let t = &status
        .iter()
        .find(|p| p.node_id == node)
        .expect("Envoy's stream")
        .types[ROUTE];
    assert_eq!(t.state, SyncState::Nacked);
    assert_eq!(t.acked_version.as_deref(), Some("v1"));
    assert_eq!(t.nacks, 1);
    // The good routes stay in force.
    let (code, _) = http_get(SocketAddr::from(([127, 0, 0, 1], listen_port)), "/").await;
    assert_eq!(code, 200);

    // A fixed route is ACKed again.
    cache.set(ROUTE, [route_config(Some("/.*"))]);
    if let Err(e) = server.wait_ack(node, ROUTE, "v3", ENVOY_WAIT).await {
        panic!("{e}\nEnvoy log:\n{}", envoy.log());
    }
}

#[tokio::test]
async fn envoy_sotw_acks_config_and_nacks_bad_route() {
    scenario("GRPC", "envoy-sotw").await;
}

#[tokio::test]
async fn envoy_delta_acks_config_and_nacks_bad_route() {
    scenario("DELTA_GRPC", "envoy-delta").await;
}
