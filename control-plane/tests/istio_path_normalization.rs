//! `meshConfig.pathNormalization`: every HTTP connection manager ferry-pilot
//! builds (sidecar inbound, sidecar outbound, gateway) carries the fields
//! istiod's listener builder sets for the level — `normalize_path`,
//! `merge_slashes`, `path_with_escaped_slashes_action` — with istiod's
//! default (BASE) when the mesh config says nothing.

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::PathWithEscapedSlashesAction,
};
use ferry_pilot::istio::source::load_dir;
use ferry_pilot::istio::translate::{Mesh, MeshOptions, NodeType, Proxy, ProxyConfig};
use ferry_pilot::istio::types::mesh::MeshConfig;
use prost::Message;

fn fixtures(dir: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir)
}

fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
    l.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The sidecar of productpage (an HTTP port inbound, HTTP services
/// outbound) and the ingress gateway, under the mesh config `mesh_yaml`.
fn translate(mesh_yaml: &str) -> anyhow::Result<(ProxyConfig, ProxyConfig)> {
    let cfg: MeshConfig = serde_yaml_ng::from_str(mesh_yaml)?;
    let options = MeshOptions::from_mesh_config(&cfg);
    let snap = load_dir(&fixtures("mesh"))?;
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let sidecar = Mesh::new(&snap, options.clone()).proxy_config(&Proxy {
        id: "sidecar~10.1.0.1~productpage-1.shop~shop.svc.cluster.local".into(),
        namespace: "shop".into(),
        labels: labels(&[("app", "productpage")]),
        ..Default::default()
    });
    let snap = load_dir(&fixtures("gateway"))?;
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let gateway = Mesh::new(&snap, options).proxy_config(&Proxy {
        node_type: NodeType::Router,
        id: "router~10.1.1.99~ingress-1.istio-system~istio-system.svc.cluster.local".into(),
        namespace: "istio-system".into(),
        labels: labels(&[("istio", "ingressgateway")]),
        ..Default::default()
    });
    Ok((sidecar, gateway))
}

/// Every connection manager of `cfg`, by listener and chain.
fn hcms(cfg: &ProxyConfig) -> Vec<(String, HttpConnectionManager)> {
    let mut out = Vec::new();
    for l in &cfg.listeners {
        for chain in &l.filter_chains {
            for f in &chain.filters {
                if f.name != "envoy.filters.network.http_connection_manager" {
                    continue;
                }
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    panic!("{}: {}: no typed config", l.name, chain.name);
                };
                let hcm = HttpConnectionManager::decode(&*any.value).expect("decode");
                out.push((format!("{} {}", l.name, chain.name), hcm));
            }
        }
    }
    out
}

/// What istiod sets: `normalize_path`, `merge_slashes`, the action.
type Fields = (Option<bool>, bool, PathWithEscapedSlashesAction);

fn fields(h: &HttpConnectionManager) -> Fields {
    (
        h.normalize_path.as_ref().map(|v| v.value),
        h.merge_slashes,
        PathWithEscapedSlashesAction::try_from(h.path_with_escaped_slashes_action)
            .expect("a known action"),
    )
}

#[test]
fn every_connection_manager_follows_the_level() -> anyhow::Result<()> {
    use PathWithEscapedSlashesAction::{KeepUnchanged, UnescapeAndForward};
    let levels: [(&str, Fields); 6] = [
        ("{}", (Some(true), false, KeepUnchanged)),
        (
            "pathNormalization: {normalization: DEFAULT}",
            (Some(true), false, KeepUnchanged),
        ),
        (
            "pathNormalization: {normalization: BASE}",
            (Some(true), false, KeepUnchanged),
        ),
        (
            "pathNormalization: {normalization: NONE}",
            (Some(false), false, KeepUnchanged),
        ),
        (
            "pathNormalization: {normalization: MERGE_SLASHES}",
            (Some(true), true, KeepUnchanged),
        ),
        (
            "pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}",
            (Some(true), true, UnescapeAndForward),
        ),
    ];
    for (mesh, want) in levels {
        let (sidecar, gateway) = translate(mesh)?;
        let sidecar = hcms(&sidecar);
        let gateway = hcms(&gateway);
        // Each kind is there to be checked.
        assert!(
            sidecar.iter().any(|(n, _)| n.starts_with("virtualInbound")),
            "{mesh}: no inbound connection manager"
        );
        assert!(
            sidecar
                .iter()
                .any(|(n, _)| !n.starts_with("virtualInbound")),
            "{mesh}: no outbound connection manager"
        );
        assert!(!gateway.is_empty(), "{mesh}: no gateway connection manager");
        for (name, hcm) in sidecar.iter().chain(&gateway) {
            assert_eq!(fields(hcm), want, "{mesh}: {name}");
        }
    }
    Ok(())
}

#[test]
fn an_unknown_level_is_refused() {
    let err = serde_yaml_ng::from_str::<MeshConfig>("pathNormalization: {normalization: ALL}")
        .expect_err("ALL is no level");
    assert!(err.to_string().contains("ALL"), "{err}");
}
