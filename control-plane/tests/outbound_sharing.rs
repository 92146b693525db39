//! The outbound clusters and endpoints are translated once per proxy class
//! and shared: proxies that differ only in what outbound translation does
//! not read (their other labels, IPs, ids) share one translation, and a
//! proxy that differs in one input it reads (a label a DestinationRule's
//! `workloadSelector`, a Sidecar's selector or a `failoverPriority`
//! names, its locality under locality load balancing, its namespace, its
//! node flags) gets a translation of its own, equal to what a mesh that
//! never translated anybody else gives it. The same holds for a sidecar's
//! outbound route configurations, whose class adds the labels that
//! VirtualService `sourceLabels` name.

use std::path::Path;
use std::sync::Arc;

use ferry_pilot::istio::source::{Snapshot, parse_documents};
use ferry_pilot::istio::translate::{Mesh, MeshOptions, Proxy};

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: ratings}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: shop}
spec: {clusterIP: 10.96.0.12, selector: {app: details}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata:
  name: internal
  namespace: shop
  annotations: {networking.istio.io/exportTo: "."}
spec: {clusterIP: 10.96.0.13, selector: {app: internal}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: shop, labels: {app: reviews}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-gold, namespace: shop, labels: {app: ratings, tier: gold, istio-locality: us-west.zone1.a}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-silver, namespace: shop, labels: {app: ratings, tier: silver, istio-locality: us-west.zone1.a}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: details-west, namespace: shop, labels: {app: details, istio-locality: us-west.zone1.a}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: details-east, namespace: shop, labels: {app: details, istio-locality: us-east.zone1.a}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: internal-1, namespace: shop, labels: {app: internal}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.6}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-special, namespace: shop}
spec:
  host: reviews
  workloadSelector: {matchLabels: {role: special}}
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {localityLbSetting: {enabled: true, failoverPriority: [tier]}}
    outlierDetection: {consecutive5xxErrors: 5}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details, namespace: shop}
spec:
  host: details
  trafficPolicy:
    loadBalancer: {localityLbSetting: {enabled: true}}
    outlierDetection: {consecutive5xxErrors: 5}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings-by-source, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - match: [{sourceLabels: {track: canary}}]
    route: [{destination: {host: ratings}}]
    timeout: 3s
  - route: [{destination: {host: ratings}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: narrow, namespace: shop}
spec:
  workloadSelector: {labels: {role: narrow}}
  egress: [{hosts: [./ratings.shop.svc.cluster.local]}]
"#;

fn snapshot() -> Snapshot {
    let snap = parse_documents(MESH, Path::new("mesh.yaml"));
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    snap
}

fn client(name: &str, ip: &str, labels: &[(&str, &str)]) -> Proxy {
    Proxy {
        id: format!("sidecar~{ip}~{name}.shop~shop.svc.cluster.local"),
        namespace: "shop".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ips: vec![ip.into()],
        pod_name: Some(name.into()),
        locality: "us-west/zone1/a".into(),
        istio_network_stats: true,
        ..Default::default()
    }
}

/// Two proxies that differ only in other labels, IP, pod and id: nothing
/// outbound translation reads.
fn one_class() -> (Proxy, Proxy) {
    (
        client("client-a", "10.0.1.1", &[("app", "client-a")]),
        client(
            "client-b",
            "10.0.1.2",
            &[("app", "client-b"), ("version", "v2")],
        ),
    )
}

/// `base` with one more label.
fn labelled(base: &Proxy, k: &str, v: &str) -> Proxy {
    let mut p = base.clone();
    p.labels.insert(k.into(), v.into());
    p
}

/// `base` in another namespace.
fn in_namespace(base: &Proxy, ns: &str) -> Proxy {
    let mut p = base.clone();
    p.namespace = ns.into();
    p
}

#[test]
fn proxies_of_one_class_share_one_outbound_translation() {
    let snap = snapshot();
    let mesh = Mesh::new(&snap, MeshOptions::default());
    let (a, b) = one_class();
    assert_eq!(mesh.outbound_class(&a), mesh.outbound_class(&b));
    let (_, out_a) = mesh.proxy_config_shared(&a);
    let (own_b, out_b) = mesh.proxy_config_shared(&b);
    assert!(Arc::ptr_eq(&out_a, &out_b), "one translation for the class");
    // What ferry-pilot asks for once it holds the class's encoding.
    assert_eq!(mesh.proxy_config_own(&b), own_b);
    assert_eq!(mesh.outbound_classes(), 1);
    assert!(
        out_a.clusters.len() >= 4 && !out_a.endpoints.is_empty(),
        "{} clusters, {} assignments",
        out_a.clusters.len(),
        out_a.endpoints.len()
    );
    // What b is sent is what a mesh that never translated a gives it.
    let fresh = Mesh::new(&snap, MeshOptions::default());
    assert_eq!(mesh.proxy_config(&b), fresh.proxy_config(&b));
}

#[test]
fn a_proxy_differing_in_one_input_gets_its_own_translation() {
    let snap = snapshot();
    let base = client("client-a", "10.0.1.1", &[("app", "client-a")]);
    let variants: Vec<(&str, Proxy)> = vec![
        (
            "a label a DestinationRule's workloadSelector names",
            labelled(&base, "role", "special"),
        ),
        (
            "a label a Sidecar's selector names",
            labelled(&base, "role", "narrow"),
        ),
        ("a failoverPriority label", labelled(&base, "tier", "gold")),
        ("the locality", {
            let mut p = base.clone();
            p.locality = "us-east/zone1/a".into();
            p
        }),
        ("the namespace", in_namespace(&base, "web")),
        ("the istio network stats flag", {
            let mut p = base.clone();
            p.istio_network_stats = false;
            p
        }),
    ];
    for (what, variant) in variants {
        // Either may be translated first: neither may get the other's.
        for first_base in [true, false] {
            let mesh = Mesh::new(&snap, MeshOptions::default());
            let order = if first_base {
                [&base, &variant]
            } else {
                [&variant, &base]
            };
            let shared: Vec<_> = order
                .iter()
                .map(|p| (mesh.proxy_config(p), mesh.proxy_config_shared(p).1))
                .collect();
            assert_ne!(
                mesh.outbound_class(&base),
                mesh.outbound_class(&variant),
                "{what}"
            );
            assert!(!Arc::ptr_eq(&shared[0].1, &shared[1].1), "{what}");
            assert_eq!(mesh.outbound_classes(), 2, "{what}");
            // The input matters here: the translations differ ...
            assert_ne!(*shared[0].1, *shared[1].1, "{what} changes nothing");
            // ... and each is what a fresh mesh gives that proxy alone.
            for (p, (cfg, _)) in order.iter().zip(&shared) {
                let fresh = Mesh::new(&snap, MeshOptions::default());
                assert!(
                    *cfg == fresh.proxy_config(p),
                    "{what}: {} got another proxy's outbound translation",
                    p.id
                );
            }
        }
    }
}

#[test]
fn proxies_of_one_class_share_their_route_configurations() {
    let snap = snapshot();
    let mesh = Mesh::new(&snap, MeshOptions::default());
    let (a, b) = one_class();
    let cfg_a = mesh.proxy_config(&a);
    // While a's are held, b gets the same ones.
    let cfg_b = mesh.proxy_config(&b);
    assert!(!cfg_a.routes.is_empty());
    assert_eq!(cfg_a.routes.len(), cfg_b.routes.len());
    for (ra, rb) in cfg_a.routes.iter().zip(&cfg_b.routes) {
        assert!(Arc::ptr_eq(ra, rb), "route {} translated twice", ra.name);
    }
    let fresh = Mesh::new(&snap, MeshOptions::default());
    assert!(cfg_b == fresh.proxy_config(&b));
}

#[test]
fn a_proxy_differing_in_one_route_input_gets_its_own_routes() {
    let snap = snapshot();
    let base = client("client-a", "10.0.1.1", &[("app", "client-a")]);
    // (what, variant, whether its routes differ from the base's)
    let variants: Vec<(&str, Proxy, bool)> = vec![
        (
            "a label a VirtualService's sourceLabels names",
            labelled(&base, "track", "canary"),
            true,
        ),
        (
            "a label a Sidecar's selector names",
            labelled(&base, "role", "narrow"),
            true,
        ),
        (
            "a label a DestinationRule's workloadSelector names",
            labelled(&base, "role", "special"),
            false,
        ),
        ("the namespace", in_namespace(&base, "web"), true),
    ];
    for (what, variant, differs) in variants {
        for first_base in [true, false] {
            let mesh = Mesh::new(&snap, MeshOptions::default());
            let order = if first_base {
                [&base, &variant]
            } else {
                [&variant, &base]
            };
            let cfgs: Vec<_> = order.iter().map(|p| mesh.proxy_config(p)).collect();
            let shared = cfgs[0]
                .routes
                .iter()
                .any(|r| cfgs[1].routes.iter().any(|o| Arc::ptr_eq(r, o)));
            assert!(!shared, "{what}: a route configuration of the other class");
            assert_eq!(cfgs[0].routes != cfgs[1].routes, differs, "{what}");
            for (p, cfg) in order.iter().zip(&cfgs) {
                let fresh = Mesh::new(&snap, MeshOptions::default());
                assert!(
                    *cfg == fresh.proxy_config(p),
                    "{what}: {} got another proxy's routes",
                    p.id
                );
            }
        }
    }
}
