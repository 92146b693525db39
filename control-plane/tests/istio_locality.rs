//! DestinationRule `localityLbSetting` and warm-up as istiod writes them
//! for one proxy: endpoints grouped by locality; failover priorities (only
//! with outlier detection) by closeness to the proxy and the `failover`
//! targets; `distribute` weights with locality-weighted balancing; Envoy's
//! slow start for `warmupDurationSecs`.

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    LbConfig, common_lb_config::LocalityConfigSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use ferry_pilot::istio::source::load_dir;
use ferry_pilot::istio::translate::{Mesh, MeshOptions, Proxy, ProxyConfig};
use ferry_pilot::istio::validate::validate;

fn config() -> anyhow::Result<ProxyConfig> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/locality");
    let snap = load_dir(&dir)?;
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let findings = validate(&snap);
    assert!(findings.is_empty(), "{findings:#?}");
    let mesh = Mesh::new(&snap, MeshOptions::default());
    // The client's locality comes from its Pod (`istio-locality`).
    let mut proxy = Proxy {
        id: "sidecar~10.2.0.100~client.geo~geo.svc.cluster.local".into(),
        namespace: "geo".into(),
        pod_name: Some("client".into()),
        ips: vec!["10.2.0.100".into()],
        ..Default::default()
    };
    mesh.complete_proxy(&mut proxy);
    assert_eq!(proxy.locality, "us-west/zone1/a");
    Ok(mesh.proxy_config(&proxy))
}

fn cla<'a>(cfg: &'a ProxyConfig, host: &str) -> &'a ClusterLoadAssignment {
    let name = format!("outbound|80||{host}.geo.svc.cluster.local");
    cfg.endpoints
        .iter()
        .find(|e| e.cluster_name == name)
        .unwrap_or_else(|| panic!("no endpoints {name}"))
}

/// locality → (priority, weight, endpoint count).
fn groups(c: &ClusterLoadAssignment) -> BTreeMap<String, (u32, u32, usize)> {
    c.endpoints
        .iter()
        .map(|g| {
            let l = g.locality.clone().unwrap_or_default();
            (
                format!("{}/{}/{}", l.region, l.zone, l.sub_zone),
                (
                    g.priority,
                    g.load_balancing_weight.map_or(0, |w| w.value),
                    g.lb_endpoints.len(),
                ),
            )
        })
        .collect()
}

#[test]
fn failover_priorities_follow_closeness_and_failover_targets() -> anyhow::Result<()> {
    let cfg = config()?;
    let got = groups(cla(&cfg, "api"));
    let want: BTreeMap<String, (u32, u32, usize)> = [
        ("us-west/zone1/a", (0, 0, 1)),
        ("us-west/zone1/b", (1, 0, 1)),
        ("us-west/zone2/a", (2, 0, 1)),
        ("us-west/zone2/b", (2, 0, 1)),
        ("eu/zone1/a", (3, 0, 1)),
        ("us-east/zone1/a", (4, 0, 1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, want);
    // Without outlier detection Istio does not fail over: one priority.
    let plain = groups(cla(&cfg, "plain"));
    assert_eq!(plain.len(), 6);
    assert!(plain.values().all(|(p, _, _)| *p == 0), "{plain:?}");
    // Warm-up on the round-robin cluster.
    let api = cfg
        .clusters
        .iter()
        .find(|c| c.name == "outbound|80||api.geo.svc.cluster.local")
        .expect("api cluster");
    let Some(LbConfig::RoundRobinLbConfig(rr)) = &api.lb_config else {
        panic!("{:?}", api.lb_config)
    };
    let window = rr
        .slow_start_config
        .as_ref()
        .and_then(|s| s.slow_start_window)
        .map(|d| d.seconds);
    assert_eq!(window, Some(60));
    Ok(())
}

#[test]
fn distribute_weights_localities_and_drops_the_rest() -> anyhow::Result<()> {
    let cfg = config()?;
    let got = groups(cla(&cfg, "web"));
    // zone1 has two localities of one endpoint each: 80 split 40/40;
    // zone2 likewise 20 → 10/10; us-east and eu get nothing.
    let want: BTreeMap<String, (u32, u32, usize)> = [
        ("us-west/zone1/a", (0, 40, 1)),
        ("us-west/zone1/b", (0, 40, 1)),
        ("us-west/zone2/a", (0, 10, 1)),
        ("us-west/zone2/b", (0, 10, 1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, want);
    let web = cfg
        .clusters
        .iter()
        .find(|c| c.name == "outbound|80||web.geo.svc.cluster.local")
        .expect("web cluster");
    assert!(matches!(
        web.common_lb_config
            .as_ref()
            .and_then(|c| c.locality_config_specifier),
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
    ));
    Ok(())
}

#[test]
fn invalid_locality_settings_are_reported() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-locality-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("dr.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: x, namespace: geo}\n\
         spec:\n  host: x.example.com\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n\
         \x20       distribute:\n        - from: us-west/*\n          to: {\"us-west/*\": 70}\n\
         \x20       failover:\n        - {from: us-west, to: us-west}\n",
    )?;
    let findings = validate(&load_dir(&dir)?);
    let _ = std::fs::remove_dir_all(&dir);
    let fields: Vec<String> = findings
        .iter()
        .filter(|f| f.code.id() == "IST0106")
        .map(|f| f.field.clone())
        .collect();
    let base = "spec.trafficPolicy.loadBalancer.localityLbSetting";
    assert_eq!(
        fields,
        [
            base.to_string(),
            format!("{base}.distribute[0].to"),
            format!("{base}.failover[0]"),
        ],
        "{findings:#?}"
    );
    Ok(())
}

#[test]
fn failover_priority_follows_shared_labels() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/locality");
    let snap = load_dir(&dir)?;
    let mesh = Mesh::new(&snap, MeshOptions::default());
    // A client in us-west/zone1: its locality stands for its topology
    // labels, as in istiod.
    let proxy = Proxy {
        id: "sidecar~10.2.0.200~other.geo~geo.svc.cluster.local".into(),
        namespace: "geo".into(),
        locality: "us-west/zone1/c".into(),
        ..Default::default()
    };
    let cfg = mesh.proxy_config(&proxy);
    let got = groups(cla(&cfg, "labelled"));
    // Both labels shared: 0; the region only: 1; neither: 2.
    let want: BTreeMap<String, (u32, u32, usize)> = [
        ("us-west/zone1/a", (0, 0, 1)),
        ("us-west/zone1/b", (0, 0, 1)),
        ("us-west/zone2/a", (1, 0, 1)),
        ("us-west/zone2/b", (1, 0, 1)),
        ("us-east/zone1/a", (2, 0, 1)),
        ("eu/zone1/a", (2, 0, 1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, want);
    Ok(())
}
