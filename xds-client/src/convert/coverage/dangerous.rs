//! The fields the configuration audit (`CONFIG-COVERAGE.md`) found most
//! dangerous to ignore, in the listener, route, cluster and endpoint
//! converters: each is set, alone, to a value other than its default on a
//! working listener or cluster, and the conversion must either refuse it
//! naming the field, or apply it — the converted configuration differs from
//! the one without it, nothing warns about it, and a named test proves the
//! behaviour (that test must exist).
//!
//! The audit's other dangerous fields belong to the TLS context (see
//! `tls.rs`), the HTTP connection manager and `tcp_proxy`.

use prost::Message;
use serde_json::{Value, json};

use super::super::Warnings;
use super::probe::{CLUSTER, LISTENER, MATCHER_LISTENER, descriptors, parse};

enum Expect {
    /// Refused: the error's field path names this field.
    Refused(&'static str),
    /// Applied; proven by the test `fn` in the file (relative to the
    /// workspace).
    Applied(&'static str, &'static str),
    /// Accepted as a documented tuning knob, with a warning naming it.
    Warned(&'static str),
}

use Expect::{Applied, Refused, Warned};

const ROUTES: &str = "tests/tests/route_decisions.rs";

const HEALTH: &str = "tests/tests/health_check.rs";

const HCM: &str = "/filter_chains/0/filters/0/typed_config";

/// `(what, resource, JSON pointer of the field, value, expectation)`:
/// `resource` is "listener" or "cluster".
fn cases() -> Vec<(&'static str, &'static str, String, Value, Expect)> {
    let rc = format!("{HCM}/route_config");
    let vh = format!("{rc}/virtual_hosts/0");
    let r0 = format!("{vh}/routes/0");
    let fault = json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"http_status": 418, "percentage": {"numerator": 100}}});
    let up =
        "/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    vec![
        // Security (the audit's top 25).
        (
            "VirtualHost.require_tls ALL",
            "listener",
            format!("{vh}/require_tls"),
            json!("ALL"),
            Applied(ROUTES, "require_tls_redirects_to_https"),
        ),
        (
            "VirtualHost.require_tls EXTERNAL_ONLY",
            "listener",
            format!("{vh}/require_tls"),
            json!("EXTERNAL_ONLY"),
            Applied(ROUTES, "require_tls_redirects_to_https"),
        ),
        (
            "FilterConfig.disabled false: enabling per route a filter the connection manager disables",
            "listener",
            format!("{r0}/typed_per_filter_config/off"),
            json!({"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig"}),
            Refused("disabled"),
        ),
        (
            "RouteConfiguration.typed_per_filter_config",
            "listener",
            format!("{rc}/typed_per_filter_config"),
            json!({"fault": fault}),
            Applied(ROUTES, "weighted_clusters_and_table_filter_configs"),
        ),
        (
            "WeightedCluster.ClusterWeight.typed_per_filter_config",
            "listener",
            format!("{r0}/route/weighted_clusters/clusters/0/typed_per_filter_config"),
            json!({"fault": fault}),
            Applied(ROUTES, "weighted_clusters_and_table_filter_configs"),
        ),
        (
            "FilterChainMatch.direct_source_prefix_ranges",
            "listener",
            "/filter_chains/0/filter_chain_match/direct_source_prefix_ranges".into(),
            json!([{"address_prefix": "10.0.0.0", "prefix_len": 8}]),
            Applied(ROUTES, "filter_chains_by_direct_source_and_source_type"),
        ),
        (
            "FilterChainMatch.source_type",
            "listener",
            "/filter_chains/0/filter_chain_match/source_type".into(),
            json!("EXTERNAL"),
            Applied(ROUTES, "filter_chains_by_direct_source_and_source_type"),
        ),
        (
            "Listener.filter_chain_matcher",
            "matcher-listener",
            "/filter_chain_matcher".into(),
            json!({"matcher_tree": {
                "input": {"name": "port", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput"}},
                "exact_match_map": {"map": {"10001": {"action": {"name": "b",
                    "typed_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "b"}}}}}}}),
            Applied(
                "tests/tests/filter_chain_matcher.rs",
                "filter_chain_matcher_routes_as_envoy",
            ),
        ),
        (
            "Cluster.transport_socket_matcher",
            "cluster",
            "/transport_socket_matcher".into(),
            json!({}),
            Refused("transport_socket_matcher"),
        ),
        (
            "RouteAction.upgrade_configs (websocket disabled)",
            "listener",
            format!("{r0}/route/upgrade_configs"),
            json!([{"upgrade_type": "websocket", "enabled": false}]),
            Applied(ROUTES, "route_upgrade_configs"),
        ),
        (
            "HeaderMatcher.treat_missing_header_as_empty",
            "listener",
            format!("{r0}/match/headers/0/treat_missing_header_as_empty"),
            json!(true),
            Applied(ROUTES, "missing_headers_in_route_matches"),
        ),
        (
            "RouteMatch.filter_state",
            "listener",
            format!("{r0}/match/filter_state"),
            json!([{"key": "k", "string_match": {"exact": "v"}}]),
            Refused("filter_state"),
        ),
        (
            "Principal.filter_state (RBAC)",
            "listener",
            format!("{HCM}/http_filters/3/typed_config/rules/policies/p/principals/0"),
            json!({"filter_state": {"key": "k", "string_match": {"exact": "v"}}}),
            Applied(
                "tests/tests/hbone_server.rs",
                "rbac_on_the_peer_principal_carried_in_filter_state",
            ),
        ),
        (
            "CircuitBreakers.Thresholds per_host_thresholds",
            "cluster",
            "/circuit_breakers".into(),
            json!({"per_host_thresholds": [{"max_connections": 1}]}),
            Applied(
                "proxy/src/cluster.rs",
                "per_host_max_connections_caps_each_endpoint",
            ),
        ),
        (
            "CircuitBreakers.Thresholds.max_connection_pools",
            "cluster",
            "/circuit_breakers".into(),
            json!({"thresholds": [{"max_connection_pools": 4}]}),
            Refused("max_connection_pools"),
        ),
        // Routing and limits (the audit's next in line).
        (
            "Cluster.lb_subset_config",
            "cluster",
            "/lb_subset_config".into(),
            json!({"subset_selectors": [{"keys": ["version"]}]}),
            Refused("lb_subset_config"),
        ),
        (
            "RouteAction.metadata_match",
            "listener",
            format!("{r0}/route/metadata_match"),
            json!({"filter_metadata": {"envoy.lb": {"version": "v1"}}}),
            Refused("metadata_match"),
        ),
        (
            "WeightedCluster.ClusterWeight.metadata_match",
            "listener",
            format!("{r0}/route/weighted_clusters/clusters/0/metadata_match"),
            json!({"filter_metadata": {"envoy.lb": {"version": "v1"}}}),
            Refused("metadata_match"),
        ),
        (
            "Cluster.health_checks",
            "cluster",
            "/health_checks".into(),
            json!([{"timeout": "1s", "interval": "5s", "unhealthy_threshold": 2,
                "healthy_threshold": 1, "http_health_check": {"path": "/healthz"}}]),
            Applied(
                HEALTH,
                "http_health_check_fails_and_recovers_hosts_as_envoy",
            ),
        ),
        (
            "RetryPolicy.retriable_request_headers",
            "listener",
            format!("{r0}/route/retry_policy/retriable_request_headers"),
            json!([{"name": "x-retry", "string_match": {"exact": "yes"}}]),
            Applied(ROUTES, "retriable_request_headers"),
        ),
        (
            "Listener.per_connection_buffer_limit_bytes",
            "listener",
            "/per_connection_buffer_limit_bytes".into(),
            json!(4096),
            Applied(ROUTES, "request_body_buffer_limit_bounds_retries"),
        ),
        (
            "Route.request_body_buffer_limit",
            "listener",
            format!("{r0}/request_body_buffer_limit"),
            json!(4096),
            Applied(ROUTES, "request_body_buffer_limit_bounds_retries"),
        ),
        (
            "VirtualHost.request_body_buffer_limit",
            "listener",
            format!("{vh}/request_body_buffer_limit"),
            json!(4096),
            Applied(ROUTES, "request_body_buffer_limit_bounds_retries"),
        ),
        (
            // Envoy: the upstream connection's read watermark, flow control only.
            "Cluster.per_connection_buffer_limit_bytes",
            "cluster",
            "/per_connection_buffer_limit_bytes".into(),
            json!(4096),
            Warned("per_connection_buffer_limit_bytes"),
        ),
        (
            "CommonLbConfig.healthy_panic_threshold",
            "cluster",
            "/common_lb_config".into(),
            json!({"healthy_panic_threshold": {"value": 0}}),
            Applied(ROUTES, "healthy_panic_threshold"),
        ),
        (
            "Cluster.load_balancing_policy",
            "cluster",
            "/load_balancing_policy".into(),
            json!({}),
            Refused("load_balancing_policy"),
        ),
        (
            "OriginalDstLbConfig.use_http_header",
            "cluster",
            "/original_dst_lb_config".into(),
            json!({"use_http_header": true}),
            Refused("use_http_header"),
        ),
        (
            "OriginalDstLbConfig.upstream_port_override",
            "cluster",
            "/original_dst_lb_config".into(),
            json!({"upstream_port_override": 8080}),
            Applied(
                "tests/tests/hbone.rs",
                "sidecar_reaches_hbone_pods_through_connect_originate",
            ),
        ),
        (
            "RouteConfiguration.vhost_header",
            "listener",
            format!("{rc}/vhost_header"),
            json!("x-vhost"),
            Refused("vhost_header"),
        ),
        (
            "VirtualHost.matcher",
            "listener",
            format!("{vh}/matcher"),
            json!({}),
            Refused("matcher"),
        ),
        (
            "RouteConfiguration.internal_only_headers",
            "listener",
            format!("{rc}/internal_only_headers"),
            json!(["x-secret"]),
            Applied(ROUTES, "internal_only_headers_are_removed"),
        ),
        (
            "upstreams HttpProtocolOptions.http_filters",
            "cluster",
            format!("{up}/http_filters"),
            json!([{"name": "envoy.filters.http.upstream_codec"}]),
            Refused("http_filters"),
        ),
        (
            "HedgePolicy.initial_requests",
            "listener",
            format!("{r0}/route/hedge_policy/initial_requests"),
            json!(2),
            Refused("initial_requests"),
        ),
        (
            "JwtProvider.clear_route_cache",
            "listener",
            format!("{HCM}/http_filters/4/typed_config/providers/p/clear_route_cache"),
            json!(true),
            Applied(ROUTES, "jwt_clear_route_cache_chooses_the_route_again"),
        ),
        (
            "JwtProvider.header_in_metadata",
            "listener",
            format!("{HCM}/http_filters/4/typed_config/providers/p/header_in_metadata"),
            json!("jwt_header"),
            Refused("header_in_metadata"),
        ),
        // Fields ferry-pilot emits.
        (
            "Cluster.SlowStartConfig (DestinationRule warmup)",
            "cluster",
            "/round_robin_lb_config".into(),
            json!({"slow_start_config": {"slow_start_window": "30s"}}),
            Applied("proxy/src/lb.rs", "slow_start_ramps_a_new_host_up"),
        ),
        (
            "UpstreamConnectionOptions.tcp_keepalive",
            "cluster",
            "/upstream_connection_options".into(),
            json!({"tcp_keepalive": {"keepalive_time": 300}}),
            Applied("proxy/src/cluster.rs", "upstream_tcp_keepalive_is_set"),
        ),
        (
            "HttpProtocolOptions.max_connection_duration (upstream)",
            "cluster",
            format!("{up}/common_http_protocol_options"),
            json!({"max_connection_duration": "60s"}),
            Applied(ROUTES, "upstream_max_connection_duration"),
        ),
    ]
}

/// Converts the resource, its model printed without fingerprints (which
/// change with any byte of the message).
fn convert(kind: &str, v: &Value) -> (Result<String, String>, Vec<String>) {
    use envoy_types::pb::envoy::config::{cluster::v3 as c, listener::v3 as l};
    let name = match kind {
        "listener" | "matcher-listener" => "envoy.config.listener.v3.Listener",
        _ => "envoy.config.cluster.v3.Cluster",
    };
    let desc = descriptors().get_message_by_name(name).expect("descriptor");
    let bytes = parse(&desc, &v.to_string()).encode_to_vec();
    let mut w = Warnings::default();
    let r = match kind {
        "listener" | "matcher-listener" => super::super::listener::listener(
            &l::Listener::decode(bytes.as_slice()).expect("decode"),
            &mut w,
        )
        .map(|m| format!("{m:?}")),
        _ => super::super::cluster::cluster(
            &c::Cluster::decode(bytes.as_slice()).expect("decode"),
            &mut w,
        )
        .map(|m| format!("{m:?}")),
    };
    (
        r.map(|s| without_fingerprints(&s))
            .map_err(|e| format!("{}: {}", e.field, e)),
        w.0,
    )
}

fn without_fingerprints(s: &str) -> String {
    let mut out = s.to_string();
    // Hashes of the message and times of the conversion (token buckets).
    for key in [
        "fingerprint: ",
        "fingerprint_without_network_rbac: ",
        "empty_at: ",
    ] {
        let mut kept = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(key) {
            let end = i + key.len();
            kept.push_str(&rest[..end]);
            rest = rest[end..].trim_start_matches(|c: char| c.is_ascii_digit());
        }
        kept.push_str(rest);
        out = kept;
    }
    let mut kept = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("Instant {") {
        kept.push_str(&rest[..i]);
        rest = rest[i..].split_once('}').map_or("", |(_, r)| r);
    }
    kept.push_str(rest);
    kept
}

/// Sets the value at a JSON pointer, creating the last step.
fn set(v: &mut Value, pointer: &str, value: Value) {
    let (parent, last) = pointer.rsplit_once('/').expect("pointer");
    let holder = v
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("the base has no {parent}"));
    match holder {
        Value::Object(o) => {
            o.insert(last.to_string(), value);
        }
        Value::Array(a) => {
            let i: usize = last.parse().expect("index");
            a[i] = value;
        }
        other => panic!("{parent} is {other}"),
    }
}

/// Whether a field path names `field` as one of its steps.
fn names(path: &str, field: &str) -> bool {
    path.split(['.', ':', ' '])
        .map(|s| s.split(['[', '{']).next().unwrap_or(s))
        .any(|s| s == field)
}

#[test]
fn dangerous_fields_are_applied_or_refused_by_name() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = Vec::new();
    for (what, kind, pointer, value, expect) in cases() {
        let mut base: Value = serde_json::from_str(match kind {
            "listener" => LISTENER,
            "matcher-listener" => MATCHER_LISTENER,
            _ => CLUSTER,
        })
        .expect("base JSON");
        let (before, _) = convert(kind, &base);
        let before = before.unwrap_or_else(|e| panic!("the base {kind} does not convert: {e}"));
        // The printed configuration is the same for the same message.
        assert_eq!(Ok(before.clone()), convert(kind, &base).0);
        set(&mut base, &pointer, value);
        let (after, warnings) = convert(kind, &base);
        let last = pointer.rsplit('/').next().unwrap_or_default();
        let field_warned = |f: &str| {
            warnings
                .iter()
                .any(|w| names(w.split(": ").nth(1).unwrap_or(""), f))
        };
        match expect {
            Refused(field) => match &after {
                Err(e) if names(e.split(": ").next().unwrap_or(""), field) => {}
                other => problems.push(format!("{what}: not refused by name: {other:?}")),
            },
            Warned(field) => {
                if after.is_err() || !field_warned(field) {
                    problems.push(format!(
                        "{what}: not accepted with a warning: {after:?} {warnings:?}"
                    ));
                }
            }
            Applied(file, test) => {
                match &after {
                    Ok(model) if *model == before => problems.push(format!(
                        "{what}: accepted but the converted configuration is unchanged"
                    )),
                    Ok(_) => {}
                    Err(e) => problems.push(format!("{what}: refused: {e}")),
                }
                if field_warned(last) {
                    problems.push(format!("{what}: applied but warned: {warnings:?}"));
                }
                let source = std::fs::read_to_string(root.join(file))
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                if !source.contains(&format!("fn {test}(")) {
                    problems.push(format!("{what}: no behaviour test {file}::{test}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
