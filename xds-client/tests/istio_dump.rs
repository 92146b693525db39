//! The configuration istiod really sends (a captured Istio 1.18 sidecar
//! config dump, in `../shared/istio-config-dumps/` when checked out beside
//! this repository) parses through the v3 descriptor set.

use std::path::Path;

const DUMP: &str = "../../shared/istio-config-dumps/istio-1.18.2-sidecar-hotelreservation-geo.json";

#[test]
fn istio_config_dump_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DUMP);
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("{} not present; skipped", path.display());
        return;
    };
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dump: envoy_types::pb::envoy::admin::v3::ConfigDump =
        ferry_xds::json::from_json("envoy.admin.v3.ConfigDump", value).unwrap();
    assert_eq!(dump.configs.len(), 7);
}
