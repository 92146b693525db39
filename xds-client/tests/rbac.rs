//! Conversion of the RBAC filters: every RBAC filter Istio's AuthorizationPolicy
//! translation produces (the goldens in `../shared/istio-goldens/authz-builder/`,
//! when checked out beside this repository) converts, wrapped in a connection
//! manager or a TCP filter chain; per-route overrides and the network filter
//! land in the model; what Ferry cannot evaluate is refused naming the field.

use std::path::Path;

use ferry_model::rbac::{Action, Enforcement, Permission, Principal};
use ferry_model::{ChainKind, HttpFilterConfig, Snapshot};
use ferry_xds::bootstrap::parse_bootstrap;
use serde_json::{Value, json};

const GOLDENS: &str = "../../shared/istio-goldens/authz-builder";

fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

fn cluster() -> Value {
    json!({"name": "backend", "connect_timeout": "1s", "type": "STATIC",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9090}}}}]}]}})
}

/// A bootstrap whose one listener runs `filter` in a connection manager
/// (an HTTP filter) with `routes`, or before a tcp_proxy (a network filter).
fn bootstrap(filter: Value, routes: Value) -> String {
    let network = filter["typedConfig"]["@type"]
        .as_str()
        .or(filter["typed_config"]["@type"].as_str())
        .is_some_and(|t| t.contains(".network."));
    let filters = if network {
        json!([filter, {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "tcp", "cluster": "backend"}}])
    } else {
        json!([{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "in",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
            "http_filters": [filter, router()]}}])
    };
    json!({"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}},
            "filter_chains": [{"filters": filters}]}],
        "clusters": [cluster()]}})
    .to_string()
}

fn default_routes() -> Value {
    json!([{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}])
}

fn load(text: &str) -> Result<Snapshot, String> {
    parse_bootstrap("test.json", text)
        .map(|b| b.snapshot)
        .map_err(|e| e.to_string())
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn every_istio_rbac_golden_converts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDENS);
    let mut converted = 0;
    for sub in ["http", "tcp"] {
        let entries = std::fs::read_dir(dir.join(sub)).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (Istio's material, ../shared beside the repository)",
                dir.display()
            )
        });
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !name.contains("-out") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let filter: Value = serde_yaml_ng::from_str(&text).unwrap();
            let ty = filter["typedConfig"]["@type"].as_str().unwrap_or_default();
            if !ty.contains(".rbac.v3.RBAC") {
                // ext_authz outputs (CUSTOM action) are another filter.
                continue;
            }
            let snap = load(&bootstrap(filter, default_routes()))
                .unwrap_or_else(|e| panic!("{sub}/{name}: {e}"));
            let chain = &snap.listeners[0].filter_chains[0];
            match &chain.kind {
                ChainKind::Http(h) => assert!(
                    matches!(h.http_filters[0].config, HttpFilterConfig::Rbac(_)),
                    "{name}"
                ),
                ChainKind::Tcp(_) => assert_eq!(chain.rbac.len(), 1, "{name}"),
            }
            converted += 1;
        }
    }
    assert!(converted >= 50, "only {converted} goldens converted");
}

fn rbac_filter(config: Value) -> Value {
    let mut c = config;
    c["@type"] = json!("type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC");
    json!({"name": "envoy.filters.http.rbac", "typed_config": c})
}

#[test]
fn http_filter_per_route_overrides_and_network_filter() {
    let filter = rbac_filter(json!({
        "rules": {"action": "DENY", "policies": {
            "b": {"permissions": [{"destination_port_range": {"start": 80, "end": 90}}],
                  "principals": [{"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]},
            "a": {"permissions": [{"not_rule": {"url_path": {"path": {"prefix": "/x"}}}}],
                  "principals": [{"source_ip": {"address_prefix": "::1"}}]}}},
        "shadow_rules": {"policies": {}},
        "shadow_rules_stat_prefix": "istio_dry_run_allow_",
    }));
    let per_route = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
    let routes = json!([
        {"match": {"prefix": "/off"}, "route": {"cluster": "backend"},
         "typed_per_filter_config": {"envoy.filters.http.rbac": {"@type": per_route}}},
        {"match": {"prefix": "/own"}, "route": {"cluster": "backend"},
         "typed_per_filter_config": {"envoy.filters.http.rbac": {"@type": per_route,
            "rbac": {"rules": {"action": "LOG", "policies": {}}}}}},
        {"match": {"prefix": "/disabled"}, "route": {"cluster": "backend"},
         "typed_per_filter_config": {"envoy.filters.http.rbac": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "backend"}},
    ]);
    let snap = load(&bootstrap(filter, routes)).unwrap();
    let ChainKind::Http(h) = &snap.listeners[0].filter_chains[0].kind else {
        panic!("expected HCM");
    };
    let HttpFilterConfig::Rbac(r) = &h.http_filters[0].config else {
        panic!("expected RBAC");
    };
    let rules = r.rules.as_ref().unwrap();
    assert_eq!(rules.action, Action::Deny);
    // Policies are kept sorted by name, as Envoy iterates them.
    assert_eq!(rules.policies[0].name, "a");
    assert!(matches!(
        rules.policies[0].permissions[0],
        Permission::Not(_)
    ));
    assert!(matches!(
        rules.policies[0].principals[0],
        Principal::SourceIp(_)
    ));
    assert!(matches!(
        rules.policies[1].permissions[0],
        Permission::DestinationPortRange { start: 80, end: 90 }
    ));
    assert_eq!(r.shadow_rules.as_ref().unwrap().action, Action::Allow);
    assert_eq!(r.shadow_rules_stat_prefix, "istio_dry_run_allow_");
    let table = snap.route_config(&h.routes).unwrap();
    let vh = &table.virtual_hosts[0];
    let off = vh.routes[0]
        .rbac_override("envoy.filters.http.rbac")
        .unwrap();
    assert!(off.rules.is_none() && off.shadow_rules.is_none());
    let own = vh.routes[1]
        .rbac_override("envoy.filters.http.rbac")
        .unwrap();
    assert_eq!(own.rules.as_ref().unwrap().action, Action::Log);
    let disabled = vh.routes[2]
        .rbac_override("envoy.filters.http.rbac")
        .unwrap();
    assert!(disabled.rules.is_none());
    assert!(
        vh.routes[3]
            .rbac_override("envoy.filters.http.rbac")
            .is_none()
    );

    let network = json!({"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "stat_prefix": "tcp.", "enforcement_type": "CONTINUOUS",
        "rules": {"policies": {"p": {"permissions": [{"destination_port": 9000}],
            "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://x/ns/a/sa/b"}}}]}}}}});
    let snap = load(&bootstrap(network, default_routes())).unwrap();
    let chain = &snap.listeners[0].filter_chains[0];
    assert!(matches!(chain.kind, ChainKind::Tcp(_)));
    let n = &chain.rbac[0];
    assert_eq!(n.stat_prefix, "tcp.");
    assert_eq!(n.enforcement, Enforcement::Continuous);
    // `delay_deny` postdates the bootstraps' descriptor set (xDS carries it).
    assert_eq!(n.delay_deny, None);
}

#[test]
fn unsupported_rbac_forms_are_refused_by_field() {
    let cases = [
        (
            json!({"rules": {"policies": {"p": {"permissions": [{"any": true}], "principals": [{"any": true}],
                "condition": {"const_expr": {"bool_value": true}}}}}}),
            "condition: CEL conditions are not supported",
        ),
        (
            json!({"matcher": {"on_no_match": {"action": {"name": "a", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.rbac.v3.Action", "name": "x"}}}}}),
            ".matcher: the matcher-based RBAC form is not supported",
        ),
        (
            json!({"rules": {"policies": {"p": {"permissions": [{"destination_port_range": {"start": 90, "end": 80}}],
                "principals": [{"any": true}]}}}}),
            "destination_port_range: range start 90 must be below range end 80",
        ),
        (
            json!({"rules": {"policies": {"p": {"permissions": [{"any": true}],
                "principals": [{"direct_remote_ip": {"address_prefix": "not-an-ip"}}]}}}}),
            "principals[0].direct_remote_ip.address_prefix",
        ),
        (
            json!({"rules": {"policies": {"p": {"permissions": [{"url_path": {"path": {"safe_regex": {"regex": "("}}}}],
                "principals": [{"any": true}]}}}}),
            "permissions[0].url_path.path.safe_regex.regex",
        ),
    ];
    for (config, want) in cases {
        let err = load(&bootstrap(rbac_filter(config), default_routes())).unwrap_err();
        assert!(err.contains(want), "{err}\nwanted: {want}");
        assert!(err.contains("listener \"l\""), "{err}");
    }
    let network = json!({"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"}});
    let err = load(&bootstrap(network, default_routes())).unwrap_err();
    assert!(err.contains("stat_prefix"), "{err}");
}
