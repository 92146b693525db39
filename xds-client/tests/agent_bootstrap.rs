//! istio-agent's bootstrap (`bootstrap-default_golden.json` in
//! `../shared/istio-config-dumps/istio-upstream-testdata/`): every field is
//! applied, refused by name or accepted with a warning naming it; what the
//! agent's bootstrap sets beyond that is refused by name.

use std::path::Path;

const GOLDEN: &str =
    "../../shared/istio-config-dumps/istio-upstream-testdata/bootstrap-default_golden.json";

fn golden() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (Istio's material, ../shared beside the repository)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("the golden bootstrap is JSON")
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn agent_bootstrap_is_accepted_with_its_knobs_named() {
    let b = ferry_xds::bootstrap::parse_bootstrap("golden", &golden().to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    let warned: &Vec<String> = &b.warnings.0;
    for field in [
        "layered_runtime",
        "stats_config.stats_tags",
        "stats_config.stats_matcher",
        "stats_config.use_all_default_tags",
        "deferred_stat_options",
        "application_log_config",
        "cluster_manager.outlier_detection",
        "cluster_manager.enable_deferred_cluster_creation",
        "admin.profile_path",
    ] {
        assert!(
            warned.iter().any(|w| w.contains(field)),
            "{field} is warned about: {warned:#?}"
        );
    }
    // The static runtime layer is read: the fragment flag is the agent's.
    assert!(!b.runtime.reject_path_with_fragment());
    assert_eq!(b.runtime.re2_max_program_size(), 32768);
    // The compressors and the Unix-socket SDS cluster are taken as they are.
    assert!(b.snapshot.clusters.contains_key("sds-grpc"));
    assert_eq!(b.snapshot.listeners.len(), 2);
}

/// A change to the golden bootstrap.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn what_ferry_cannot_do_is_refused_by_name() {
    let cases: Vec<(&str, Edit)> = vec![
        (
            "overload_manager.resource_monitors[0].typed_config.max_active_downstream_connections",
            Box::new(|g| {
                g["overload_manager"]["resource_monitors"][0]["typed_config"]["max_active_downstream_connections"] =
                    1000.into()
            }),
        ),
        (
            "overload_manager.actions",
            Box::new(|g| {
                g["overload_manager"]["actions"] = serde_json::json!([{
                    "name": "envoy.overload_actions.stop_accepting_requests",
                    "triggers": [{"name": "envoy.resource_monitors.global_downstream_max_connections",
                                  "threshold": {"value": 0.9}}]}])
            }),
        ),
        (
            "stats_sinks",
            Box::new(|g| {
                g["stats_sinks"] = serde_json::json!([{"name": "envoy.stat_sinks.statsd",
                    "typed_config": {"@type": "type.googleapis.com/envoy.config.metrics.v3.StatsdSink",
                                     "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8125}}}}])
            }),
        ),
        (
            "bootstrap_extensions[0]",
            Box::new(|g| g["bootstrap_extensions"][0]["name"] = "envoy.bootstrap.wasm".into()),
        ),
        (
            "cluster_manager.local_cluster_name",
            Box::new(|g| g["cluster_manager"]["local_cluster_name"] = "x".into()),
        ),
        (
            "header_prefix",
            Box::new(|g| g["header_prefix"] = "x-foo".into()),
        ),
    ];
    for (field, edit) in cases {
        let mut g = golden();
        edit(&mut g);
        match ferry_xds::bootstrap::parse_bootstrap("golden", &g.to_string()) {
            Ok(_) => panic!("{field}: accepted"),
            Err(e) => assert!(e.to_string().contains(field), "{field}: {e}"),
        }
    }
}
