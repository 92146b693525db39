//! Conversion of the connection manager's path normalization fields:
//! `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`
//! land in the model with Envoy's defaults when unset; an unknown action is
//! refused naming the field; `path_normalization_options`, which Envoy does
//! not implement, is ignored with a warning as Envoy ignores it.

use ferry_model::{ChainKind, EscapedSlashesAction, PathNormalization};
use ferry_xds::bootstrap::parse_bootstrap;
use serde_json::{Value, json};

/// A bootstrap whose one connection manager has these extra fields.
fn bootstrap(fields: Value) -> String {
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "in",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    });
    if let (Some(h), Some(f)) = (hcm.as_object_mut(), fields.as_object()) {
        h.extend(f.clone());
    }
    json!({"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
        "clusters": [{"name": "backend", "connect_timeout": "1s", "type": "STATIC",
            "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9090}}}}]}]}}]}})
    .to_string()
}

/// The settings converted, and the warnings.
fn convert(fields: Value) -> Result<(PathNormalization, Vec<String>), String> {
    let b = parse_bootstrap("test.json", &bootstrap(fields)).map_err(|e| e.to_string())?;
    let chain = &b.snapshot.listeners[0].filter_chains[0];
    let ChainKind::Http(hcm) = &chain.kind else {
        return Err("not an HTTP chain".into());
    };
    Ok((hcm.path_normalization, b.warnings.0))
}

fn settings(
    normalize_path: bool,
    merge_slashes: bool,
    e: EscapedSlashesAction,
) -> PathNormalization {
    PathNormalization {
        normalize_path,
        merge_slashes,
        escaped_slashes: e,
    }
}

#[test]
fn settings_convert() {
    use EscapedSlashesAction as A;
    let cases = [
        (json!({}), settings(false, false, A::KeepUnchanged)),
        (
            json!({"path_with_escaped_slashes_action": "IMPLEMENTATION_SPECIFIC_DEFAULT"}),
            settings(false, false, A::KeepUnchanged),
        ),
        (
            json!({"normalize_path": true, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"}),
            settings(true, false, A::KeepUnchanged),
        ),
        (
            json!({"normalize_path": false, "merge_slashes": true}),
            settings(false, true, A::KeepUnchanged),
        ),
        (
            json!({"normalize_path": true, "merge_slashes": true,
                "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"}),
            settings(true, true, A::UnescapeAndForward),
        ),
        (
            json!({"path_with_escaped_slashes_action": "REJECT_REQUEST"}),
            settings(false, false, A::RejectRequest),
        ),
        (
            json!({"path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"}),
            settings(false, false, A::UnescapeAndRedirect),
        ),
    ];
    for (fields, want) in cases {
        let (got, warnings) = convert(fields.clone()).expect("converts");
        assert_eq!(got, want, "{fields}");
        assert!(warnings.is_empty(), "{fields}: {warnings:?}");
    }
}

#[test]
fn unknown_action_is_refused() {
    let err = convert(json!({"path_with_escaped_slashes_action": 9})).unwrap_err();
    assert!(err.contains("path_with_escaped_slashes_action"), "{err}");
}

/// `path_normalization_options` is not implemented by Envoy either
/// (`not-implemented-hide`): accepted, changing nothing, as in Envoy.
#[test]
fn path_normalization_options_is_inert_as_in_envoy() {
    let (got, warnings) = convert(json!({
        "normalize_path": true,
        "path_normalization_options": {"forwarding_transformation": {
            "operations": [{"merge_slashes": {}}]}},
    }))
    .expect("converts");
    assert_eq!(
        got,
        settings(true, false, EscapedSlashesAction::KeepUnchanged)
    );
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains("path_normalization_options")),
        "{warnings:?}"
    );
}
