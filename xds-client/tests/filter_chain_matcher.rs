//! A listener's `filter_chain_matcher` as the converter reads it: what it
//! accepts selects the chains Envoy would select, and what Ferry does not
//! evaluate (other inputs, custom matchers, actions) is refused naming the
//! type, as are chains without a unique name.

use envoy_types::pb::envoy::config::listener::v3::Listener;
use ferry_model::ConnectionInfo;
use serde_json::{Value, json};

fn input(ty: &str) -> Value {
    json!({"name": ty, "typed_config": {
        "@type": format!("type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.{ty}")}})
}

fn action(chain: &str) -> Value {
    json!({"action": {"name": chain, "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": chain}}})
}

fn listener(names: &[&str], matcher: Value) -> Value {
    let chains: Vec<Value> = names
        .iter()
        .map(|n| {
            json!({"name": n, "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": n, "cluster": "c"}}]})
        })
        .collect();
    json!({"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
           "filter_chains": chains, "filter_chain_matcher": matcher})
}

fn convert(v: Value) -> Result<(ferry_model::Listener, Vec<String>), String> {
    let pb: Listener = ferry_xds::json::from_json("envoy.config.listener.v3.Listener", v)?;
    let mut w = ferry_xds::Warnings::default();
    let l = ferry_xds::convert::listener(&pb, &mut w).map_err(|e| e.to_string())?;
    Ok((l, w.0))
}

fn chosen(l: &ferry_model::Listener, dst: &str, src: &str) -> Option<String> {
    let info = ConnectionInfo {
        destination: Some(dst.parse().expect("address")),
        source: Some(src.parse().expect("address")),
        ..Default::default()
    };
    l.select_chain(&info).map(|c| c.name.clone())
}

/// Prefix maps take the longest prefix first and fall back to shorter ones
/// when a branch does not match; `keep_matching` makes a match count as none.
#[test]
fn prefix_maps_and_keep_matching() {
    let matcher = json!({"matcher_tree": {"input": input("SourceIPInput"), "prefix_match_map": {"map": {
        "10.": action("ten"),
        "10.1.": {"matcher": {"matcher_tree": {"input": input("SourcePortInput"),
            "exact_match_map": {"map": {"7": action("ten-one-port7")}}}}},
        "10.2.": {"keep_matching": true, "action": {"name": "x", "typed_config": {
            "@type": "type.googleapis.com/google.protobuf.StringValue", "value": "skipped"}}},
    }}}});
    let (l, w) =
        convert(listener(&["ten", "ten-one-port7", "skipped"], matcher)).expect("converts");
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(
        chosen(&l, "127.0.0.1:1", "10.1.0.1:7").as_deref(),
        Some("ten-one-port7")
    );
    assert_eq!(
        chosen(&l, "127.0.0.1:1", "10.1.0.1:8").as_deref(),
        Some("ten")
    );
    assert_eq!(
        chosen(&l, "127.0.0.1:1", "10.2.0.1:8").as_deref(),
        Some("ten")
    );
    assert_eq!(chosen(&l, "127.0.0.1:1", "11.0.0.1:8"), None);
}

/// What Ferry does not evaluate is refused, the error naming it.
#[test]
fn unknown_inputs_matchers_and_actions_are_refused_by_name() {
    let tree = |input: Value, rest: Value| {
        let mut t = json!({"input": input});
        if let (Some(t), Some(r)) = (t.as_object_mut(), rest.as_object()) {
            t.extend(r.clone());
        }
        json!({"matcher_tree": t})
    };
    let exact = json!({"exact_match_map": {"map": {"1": action("a")}}});
    let cases = [
        (
            tree(
                json!({"name": "fs", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput",
                    "key": "k"}}),
                exact.clone(),
            ),
            "FilterStateInput",
        ),
        (
            tree(
                json!({"name": "h", "typed_config": {
                    "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                    "header_name": "x"}}),
                exact.clone(),
            ),
            "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
        ),
        (
            tree(
                input("DestinationPortInput"),
                json!({"custom_match": {"name": "ip", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip",
                    "cidr_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}],
                    "stat_prefix": "ip"}}}),
            ),
            "envoy.extensions.matching.input_matchers.ip.v3.Ip",
        ),
        (
            tree(
                input("DestinationPortInput"),
                json!({"exact_match_map": {"map": {"1": {"action": {"name": "a", "typed_config": {
                    "@type": "type.googleapis.com/google.protobuf.UInt32Value", "value": 1}}}}}}),
            ),
            "google.protobuf.UInt32Value",
        ),
        (
            json!({"matcher_list": {"matchers": [{"predicate": {"single_predicate": {
                "input": input("ServerNameInput"),
                "custom_match": {"name": "ip", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip",
                    "cidr_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}],
                    "stat_prefix": "ip"}}}}, "on_match": action("a")}]}}),
            "custom_match",
        ),
    ];
    for (matcher, names) in cases {
        let e = convert(listener(&["a"], matcher)).expect_err("refused");
        assert!(e.contains(names), "{e} does not name {names}");
    }
}

/// With a matcher, every chain needs a name, once; a matcher naming a chain
/// the listener lacks converts with a warning (the connection is closed, as
/// Envoy closes it).
#[test]
fn chain_names_are_required_and_unique() {
    let matcher = json!({"matcher_tree": {"input": input("DestinationPortInput"), "exact_match_map": {"map": {
        "1": action("a"), "2": action("gone")}}}});
    let e = convert(listener(&["a", ""], matcher.clone())).expect_err("unnamed");
    assert!(e.contains("filter_chains[1].name"), "{e}");
    let e = convert(listener(&["a", "a"], matcher.clone())).expect_err("duplicate");
    assert!(e.contains("filter_chains[1].name"), "{e}");
    let (l, w) = convert(listener(&["a"], matcher)).expect("converts");
    assert!(w.iter().any(|w| w.contains("\"gone\"")), "{w:?}");
    assert_eq!(
        chosen(&l, "127.0.0.1:1", "127.0.0.1:9").as_deref(),
        Some("a")
    );
    assert_eq!(chosen(&l, "127.0.0.1:2", "127.0.0.1:9"), None);
}
