//! The fingerprints a listener update is decided by: a chain is the same
//! chain when its message is (wherever it sits in the list), two chains
//! that differ only in `envoy.filters.network.rbac` share their
//! RBAC-less fingerprint, and the listener's settings fingerprint ignores
//! its chains but not its listener filters or address.

use std::sync::Arc;

use ferry_model::Listener;
use ferry_xds::bootstrap::parse_bootstrap;
use serde_json::{Value, json};

fn tcp_proxy(cluster: &str) -> Value {
    json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp", "cluster": cluster}})
}

fn rbac(ip: &str) -> Value {
    json!({"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "stat_prefix": "tcp.",
        "rules": {"policies": {"p": {
            "permissions": [{"any": true}],
            "principals": [{"direct_remote_ip": {"address_prefix": ip, "prefix_len": 32}}]}}}}})
}

fn chain(port: u16, filters: Vec<Value>) -> Value {
    json!({"filter_chain_match": {"destination_port": port}, "filters": filters})
}

fn listener(chains: Vec<Value>, port: u16, inspector: bool) -> Arc<Listener> {
    let mut l = json!({"name": "l",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": chains});
    if inspector {
        l["listener_filters"] = json!([{"name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]);
    }
    let cluster = |name: &str| {
        json!({"name": name, "connect_timeout": "1s", "type": "STATIC",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9090}}}}]}]}})
    };
    let text = json!({"static_resources": {"listeners": [l],
        "clusters": [cluster("a"), cluster("b")]}})
    .to_string();
    let snapshot = parse_bootstrap("test.json", &text)
        .map(|b| b.snapshot)
        .unwrap_or_else(|e| panic!("{e}"));
    snapshot.listeners[0].clone()
}

#[test]
fn chains_are_known_by_content_and_network_rbac_apart() {
    let before = listener(
        vec![
            chain(1, vec![tcp_proxy("a")]),
            chain(2, vec![rbac("10.0.0.1"), tcp_proxy("b")]),
        ],
        8080,
        false,
    );
    // Reordered, the second chain's RBAC changed, a chain added.
    let after = listener(
        vec![
            chain(3, vec![tcp_proxy("a")]),
            chain(2, vec![rbac("10.0.0.2"), tcp_proxy("b")]),
            chain(1, vec![tcp_proxy("a")]),
        ],
        8080,
        false,
    );
    assert_ne!(before.fingerprint, after.fingerprint);
    assert_eq!(
        before.settings_fingerprint, after.settings_fingerprint,
        "only the chains changed"
    );
    let (a, b) = (&before.filter_chains[0], &before.filter_chains[1]);
    assert!(
        after.has_chain(a.fingerprint),
        "the unchanged chain is kept"
    );
    assert!(
        !after.has_chain(b.fingerprint),
        "the RBAC change is a change"
    );
    let b2 = &after.filter_chains[1];
    assert_ne!(b.fingerprint, b2.fingerprint);
    assert_eq!(
        b.fingerprint_without_network_rbac, b2.fingerprint_without_network_rbac,
        "they differ in network RBAC only"
    );
    assert_ne!(
        b.fingerprint, b.fingerprint_without_network_rbac,
        "a chain with RBAC hashes apart from its bare self"
    );
    assert_eq!(
        a.fingerprint, a.fingerprint_without_network_rbac,
        "a chain without RBAC is its own bare self"
    );
    // The same chain without its RBAC filter is the bare chain.
    let bare = listener(vec![chain(2, vec![tcp_proxy("b")])], 8080, false);
    assert_eq!(
        bare.filter_chains[0].fingerprint,
        b.fingerprint_without_network_rbac
    );
    // Another cluster is another chain, RBAC or not.
    let other = listener(
        vec![chain(2, vec![rbac("10.0.0.1"), tcp_proxy("a")])],
        8080,
        false,
    );
    assert_ne!(
        other.filter_chains[0].fingerprint_without_network_rbac,
        b.fingerprint_without_network_rbac
    );
}

#[test]
fn listener_settings_are_everything_but_the_chains() {
    let chains = || vec![chain(1, vec![tcp_proxy("a")])];
    let base = listener(chains(), 8080, false);
    assert_ne!(
        base.settings_fingerprint,
        listener(chains(), 8080, true).settings_fingerprint,
        "listener filters are settings"
    );
    assert_ne!(
        base.settings_fingerprint,
        listener(chains(), 8081, false).settings_fingerprint,
        "the address is a setting"
    );
    assert_eq!(
        base.settings_fingerprint,
        listener(vec![chain(1, vec![tcp_proxy("b")])], 8080, false).settings_fingerprint
    );
}
