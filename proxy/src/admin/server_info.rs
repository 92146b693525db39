//! `/server_info`: version, state, uptimes, the command line as Envoy's
//! `CommandLineOptions` (Ferry's values under Envoy's keys) and the node.

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde_json::json;

use crate::run::Runtime;

/// Ferry's version in Envoy's `SHA/VERSION/STATUS/BUILD_TYPE/SSL` shape.
pub fn version() -> String {
    format!("ferry/{}/Clean/RELEASE/rustls", env!("CARGO_PKG_VERSION"))
}

pub(super) fn respond(rt: &Runtime) -> Response<Full<Bytes>> {
    let a = &rt.admin;
    let uptime = format!("{}s", a.started.elapsed().as_secs());
    let node = ferry_xds::json::to_json("envoy.config.core.v3.Node", &a.node)
        .unwrap_or_else(|_| json!({}));
    let level = super::logging::current_default();
    // Envoy's `CommandLineOptions` keys, with Ferry's values.
    let options: serde_json::Map<String, serde_json::Value> = [
        ("base_id", json!("0")),
        ("concurrency", json!(a.concurrency)),
        ("config_path", json!(a.config_path)),
        ("config_yaml", json!("")),
        ("allow_unknown_static_fields", json!(false)),
        ("admin_address_path", json!("")),
        ("local_address_ip_version", json!("v4")),
        ("log_level", json!(level)),
        ("component_log_level", json!("")),
        ("log_format", json!("")),
        ("log_path", json!("")),
        ("service_cluster", json!(a.node.cluster)),
        ("service_node", json!(a.node.id)),
        ("service_zone", json!("")),
        // Access log batches wait at most this long (Envoy's
        // `--file-flush-interval-msec`).
        (
            "file_flush_interval",
            json!(format!(
                "{:.3}s",
                crate::access_log::FLUSH_INTERVAL.as_secs_f64()
            )),
        ),
        (
            "drain_time",
            json!(format!("{}s", a.drain_timeout.as_secs())),
        ),
        (
            "parent_shutdown_time",
            json!(format!("{}s", a.drain_timeout.as_secs())),
        ),
        ("mode", json!("Serve")),
        ("disable_hot_restart", json!(true)),
        ("enable_mutex_tracing", json!(false)),
        ("restart_epoch", json!(0)),
        ("cpuset_threads", json!(false)),
        ("reject_unknown_dynamic_fields", json!(false)),
        ("log_format_escaped", json!(false)),
        ("disabled_extensions", json!([])),
        ("ignore_unknown_dynamic_fields", json!(false)),
        ("use_dynamic_base_id", json!(false)),
        ("base_id_path", json!("")),
        (
            "drain_strategy",
            json!(match rt.drain_strategy {
                crate::drain::Strategy::Gradual => "Gradual",
                crate::drain::Strategy::Immediate => "Immediate",
            }),
        ),
        ("enable_fine_grain_logging", json!(false)),
        ("socket_path", json!("")),
        ("socket_mode", json!(0)),
        ("enable_core_dump", json!(false)),
        ("stats_tag", json!([])),
        ("skip_hot_restart_on_no_parent", json!(false)),
        ("skip_hot_restart_parent_stats", json!(false)),
        ("skip_deprecated_logs", json!(false)),
        ("file_flush_min_size", json!(0)),
        ("log_stacktrace_single_entry", json!(false)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    super::json(&json!({
        "version": version(),
        "state": super::state(rt, super::Role::Admin).0,
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        "hot_restart_version": "disabled",
        "hot_restart_initializing": false,
        "command_line_options": options,
        "node": node,
    }))
}
