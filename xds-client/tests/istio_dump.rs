//! The configuration istiod really sends (a captured Istio 1.18 sidecar
//! config dump, in `../shared/istio-config-dumps/` when checked out beside
//! this repository) parses through the v3 descriptor set.

use std::path::Path;

const DUMP: &str = "../../shared/istio-config-dumps/istio-1.18.2-sidecar-hotelreservation-geo.json";

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn istio_config_dump_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DUMP);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (Istio's material, ../shared beside the repository)",
            path.display()
        )
    });
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dump: envoy_types::pb::envoy::admin::v3::ConfigDump =
        ferry_xds::json::from_json("envoy.admin.v3.ConfigDump", value).unwrap();
    assert_eq!(dump.configs.len(), 7);
}

/// Every resource istiod sent that Envoy accepted converts into the model
/// (Istio's own filters are recognised, never a reason to reject); the one
/// listener Envoy rejected is rejected here too.
#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn istio_resources_convert() {
    use envoy_types::pb::google::protobuf::Any;
    use ferry_xds::store::{CLUSTER, ENDPOINT, LISTENER, ROUTE, parse};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DUMP);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (Istio's material, ../shared beside the repository)",
            path.display()
        )
    });
    let dump: serde_json::Value = serde_json::from_str(&text).unwrap();
    let configs = dump["configs"].as_array().unwrap();
    let section = |ty: &str| {
        configs
            .iter()
            .find(|c| c["@type"].as_str().unwrap().ends_with(&format!(".{ty}")))
            .unwrap()
    };
    let descriptors_for_any = ferry_xds::json::Descriptors::load().unwrap();
    let to_any = |type_url: &str, name: &str, v: &serde_json::Value| -> Any {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("@type");
        let msg = type_url.rsplit('/').next().unwrap();
        let value = match msg {
            "envoy.config.listener.v3.Listener" => {
                let m: envoy_types::pb::envoy::config::listener::v3::Listener =
                    descriptors_for_any.from_json(msg, v).unwrap();
                prost::Message::encode_to_vec(&m)
            }
            "envoy.config.cluster.v3.Cluster" => {
                let m: envoy_types::pb::envoy::config::cluster::v3::Cluster =
                    descriptors_for_any.from_json(msg, v).unwrap();
                prost::Message::encode_to_vec(&m)
            }
            "envoy.config.route.v3.RouteConfiguration" => {
                let m: envoy_types::pb::envoy::config::route::v3::RouteConfiguration =
                    descriptors_for_any.from_json(msg, v).unwrap();
                prost::Message::encode_to_vec(&m)
            }
            _ => {
                let m: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
                    descriptors_for_any
                        .from_json(msg, v)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                prost::Message::encode_to_vec(&m)
            }
        };
        Any {
            type_url: type_url.to_string(),
            value,
        }
    };
    let mut failures = Vec::new();
    let mut count = 0;
    // Chains reporting Istio's metrics, by reporter.
    let (mut source, mut destination) = (0, 0);
    let mut check = |type_url: &str, name: &str, v: &serde_json::Value| {
        count += 1;
        let mut w = ferry_xds::Warnings::default();
        match parse(type_url, &to_any(type_url, name, v), &mut w) {
            Err((_, e)) => failures.push(e.to_string()),
            Ok((_, ferry_xds::store::Parsed::Listener(l))) => {
                for c in &l.filter_chains {
                    match c.istio_stats.map(|s| s.reporter) {
                        Some(ferry_model::Reporter::Source) => source += 1,
                        Some(ferry_model::Reporter::Destination) => destination += 1,
                        None => {}
                    }
                }
            }
            Ok(_) => {}
        }
    };
    for l in section("ListenersConfigDump")["dynamic_listeners"]
        .as_array()
        .unwrap()
    {
        if let Some(active) = l.get("active_state") {
            check(LISTENER, l["name"].as_str().unwrap(), &active["listener"]);
        }
    }
    for c in section("ClustersConfigDump")["dynamic_active_clusters"]
        .as_array()
        .unwrap()
    {
        check(CLUSTER, "", &c["cluster"]);
    }
    for r in section("RoutesConfigDump")["dynamic_route_configs"]
        .as_array()
        .unwrap()
    {
        check(ROUTE, "", &r["route_config"]);
    }
    for e in section("EndpointsConfigDump")["dynamic_endpoint_configs"]
        .as_array()
        .unwrap()
    {
        check(ENDPOINT, "", &e["endpoint_config"]);
    }
    assert!(
        failures.is_empty(),
        "{} of {count} rejected:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(count > 400, "{count}");
    // istio.stats is in the outbound chains of the dump (its inbound
    // listener is the rejected one below).
    assert!(source > 100 && destination == 0, "{source} {destination}");

    // The listener Envoy rejected (a Lua filter without source) is rejected.
    let failed = section("ListenersConfigDump")["dynamic_listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|l| l.get("error_state"))
        .unwrap();
    let mut w = ferry_xds::Warnings::default();
    let (name, err) = parse(
        LISTENER,
        &to_any(LISTENER, "virtualInbound", &failed["failed_configuration"]),
        &mut w,
    )
    .unwrap_err();
    assert_eq!(name.as_deref(), Some("virtualInbound"));
    assert!(err.to_string().contains("envoy.filters.http.lua"), "{err}");
}
