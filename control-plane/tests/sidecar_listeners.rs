//! The Sidecar resource's `ingress` and `egress` listeners and
//! `captureMode: NONE` as istiod applies them: a workload without capture
//! (`INTERCEPTION_MODE: NONE`) gets no virtual listeners but real ports (an
//! ingress listener at the proxy's IP delivering to its `defaultEndpoint`,
//! egress ports on localhost), and a captured workload's ingress and
//! egress listeners become chains of `virtualInbound` and per-port
//! listeners, unless they ask for `captureMode: NONE`.

use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use ferry_pilot::istio::source::parse_documents;
use ferry_pilot::istio::translate::{Mesh, MeshOptions, Proxy, ProxyConfig};

const OBJECTS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: vm, namespace: default, labels: {app: vm}}
spec: {containers: [{name: vm, image: vm}]}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: vm, namespace: default}
spec: {clusterIP: 10.96.0.5, selector: {app: vm}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.7, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.96.0.9, selector: {app: db}, ports: [{name: tcp, port: 5432}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: vm, namespace: default}
spec:
  workloadSelector: {labels: {app: vm}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 9090, protocol: TCP, name: tcp}
    defaultEndpoint: 0.0.0.0:7070
    captureMode: NONE
  egress:
  - port: {number: 9080, protocol: HTTP, name: egress-http}
    hosts: [./reviews.default.svc.cluster.local]
    captureMode: NONE
  - port: {number: 5432, protocol: TCP, name: egress-db}
    bind: 127.0.0.2
    captureMode: NONE
    hosts: [./db.default.svc.cluster.local]
  - hosts: [./vm.default.svc.cluster.local]
";

fn config(none: bool) -> ProxyConfig {
    let snap = parse_documents(OBJECTS, Path::new("objects.yaml"));
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mesh = Mesh::new(&snap, MeshOptions::default());
    let mut p = Proxy {
        id: "sidecar~10.0.0.5~vm.default~default.svc.cluster.local".into(),
        namespace: "default".into(),
        ips: vec!["10.0.0.5".into()],
        interception_none: none,
        ..Default::default()
    };
    mesh.complete_proxy(&mut p);
    mesh.proxy_config(&p)
}

fn listener<'a>(cfg: &'a ProxyConfig, name: &str) -> &'a Listener {
    cfg.listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no {name} in {:?}",
                cfg.listeners.iter().map(|l| &l.name).collect::<Vec<_>>()
            )
        })
}

fn address_of(l: &Listener) -> (String, u32) {
    match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => (
            s.address.clone(),
            match s.port_specifier {
                Some(PortSpecifier::PortValue(p)) => p,
                _ => 0,
            },
        ),
        other => panic!("{other:?}"),
    }
}

fn binds(l: &Listener) -> bool {
    l.bind_to_port.as_ref().is_none_or(|b| b.value)
}

fn endpoint_of(cfg: &ProxyConfig, cluster: &str) -> (String, u32) {
    let c = cfg
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster}"));
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32))
    );
    let ep = &c.load_assignment.as_ref().expect("present").endpoints[0].lb_endpoints[0];
    match &ep.host_identifier {
        Some(HostIdentifier::Endpoint(e)) => {
            match e.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(address::Address::SocketAddress(s)) => (
                    s.address.clone(),
                    match s.port_specifier {
                        Some(PortSpecifier::PortValue(p)) => p,
                        _ => 0,
                    },
                ),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_capture_the_ports_are_real_listeners() {
    let cfg = config(true);
    let names: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
    assert!(
        !names.contains(&"virtualInbound") && !names.contains(&"virtualOutbound"),
        "{names:?}"
    );
    // Ingress: at the proxy's IP, bound, delivering to the default endpoint.
    let http = listener(&cfg, "10.0.0.5_9080");
    assert_eq!(address_of(http), ("10.0.0.5".into(), 9080));
    assert!(binds(http));
    assert_eq!(
        endpoint_of(&cfg, "inbound|9080||"),
        ("127.0.0.1".into(), 8080)
    );
    let tcp = listener(&cfg, "10.0.0.5_9090");
    assert!(binds(tcp));
    // 0.0.0.0 is the pod's IP, left from 127.0.0.6 only under capture.
    assert_eq!(
        endpoint_of(&cfg, "inbound|9090||"),
        ("10.0.0.5".into(), 7070)
    );
    let c = cfg
        .clusters
        .iter()
        .find(|c| c.name == "inbound|9090||")
        .expect("present");
    assert!(c.upstream_bind_config.is_none());
    // Service ports are not bound without an ingress listener for them.
    assert!(!names.iter().any(|n| n.ends_with("_8080")), "{names:?}");
    // Egress: the port listeners at their binds, the catch-all's service
    // ports on localhost; nothing for services only a port listener imports.
    let egress = listener(&cfg, "127.0.0.1_9080");
    assert!(binds(egress));
    assert!(cfg.routes.iter().any(|r| r.name == "9080"));
    let db = listener(&cfg, "127.0.0.2_5432");
    assert!(binds(db));
    assert_eq!(address_of(db), ("127.0.0.2".into(), 5432));
    assert!(binds(listener(&cfg, "127.0.0.1_80")));
    assert!(!names.contains(&"127.0.0.1_5432"), "{names:?}");
}

#[test]
fn with_capture_only_capture_mode_none_binds() {
    let cfg = config(false);
    let inbound = listener(&cfg, "virtualInbound");
    let chains: Vec<&str> = inbound
        .filter_chains
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    // The ingress listener without a capture mode is a chain of virtualInbound;
    // the service port 8080 is not (the ingress listeners replace them).
    assert!(chains.contains(&"0.0.0.0_9080"), "{chains:?}");
    assert!(!chains.contains(&"0.0.0.0_8080"), "{chains:?}");
    assert!(!chains.contains(&"0.0.0.0_9090"), "{chains:?}");
    let tcp = listener(&cfg, "10.0.0.5_9090");
    assert!(binds(tcp));
    let c = cfg
        .clusters
        .iter()
        .find(|c| c.name == "inbound|9090||")
        .expect("present");
    assert!(
        c.upstream_bind_config.is_some(),
        "the pod's IP is left from 127.0.0.6"
    );
    // Egress listeners with captureMode NONE bind; the catch-all's ports
    // stay captured (reached through virtualOutbound).
    assert!(binds(listener(&cfg, "127.0.0.1_9080")));
    assert!(binds(listener(&cfg, "127.0.0.2_5432")));
    assert!(!binds(listener(&cfg, "0.0.0.0_80")));
    assert!(cfg.listeners.iter().any(|l| l.name == "virtualOutbound"));
}

#[test]
fn what_is_not_applied_is_refused() {
    let text = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s, namespace: default}\n\
        spec:\n  ingress:\n  - port: {number: 9080, protocol: HTTP, name: http}\n    defaultEndpoint: 10.0.0.1:8080\n\
        \x20   tls: {mode: SIMPLE}\n  egress:\n  - bind: unix:///var/run/x.sock\n    port: {number: 80, protocol: HTTP, name: h}\n    hosts: [./*]\n";
    let snap = parse_documents(text, Path::new("sidecar.yaml"));
    let problems = ferry_pilot::pilot::problems(&snap).join("\n");
    for field in [
        "spec.ingress[0].defaultEndpoint",
        "spec.ingress[0].tls",
        "spec.egress[0].bind",
    ] {
        assert!(problems.contains(field), "{field} not refused:\n{problems}");
    }
}
