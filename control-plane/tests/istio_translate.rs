//! Translation of Istio configuration into Envoy resources: names and shapes
//! as istiod makes them, VirtualService and DestinationRule features on the
//! project's fixtures, the bookinfo scenarios from the shared Istio samples,
//! and a JSON round trip of every produced resource through Envoy's v3
//! schema.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::LbPolicy};
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, route::Action, route_action::ClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use ferry_pilot::istio::source::{Snapshot, load_dir, load_file};
use ferry_pilot::istio::translate::{Mesh, MeshOptions, Proxy, ProxyConfig};
use prost::Message;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mesh")
}

fn proxy(namespace: &str, labels: &[(&str, &str)]) -> Proxy {
    Proxy {
        id: "sidecar~10.1.0.1~test.ns~ns.svc.cluster.local".into(),
        namespace: namespace.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    }
}

fn fixture_config(labels: &[(&str, &str)]) -> anyhow::Result<ProxyConfig> {
    let snap = load_dir(&fixtures())?;
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mesh = Mesh::new(&snap, MeshOptions::default());
    Ok(mesh.proxy_config(&proxy("shop", labels)))
}

fn names<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|i| name(i).to_string()).collect()
}

fn route_config<'a>(cfg: &'a ProxyConfig, name: &str) -> &'a RouteConfiguration {
    cfg.routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no route config {name}"))
}

fn vhost_routes<'a>(rc: &'a RouteConfiguration, vhost: &str) -> &'a [Route] {
    &rc.virtual_hosts
        .iter()
        .find(|v| v.name == vhost)
        .unwrap_or_else(|| panic!("no virtual host {vhost}"))
        .routes
}

fn action(route: &Route) -> &RouteAction {
    match &route.action {
        Some(Action::Route(a)) => a,
        other => panic!("route {} has action {other:?}", route.name),
    }
}

fn cluster_of(route: &Route) -> &str {
    match &action(route).cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => c,
        other => panic!("route {} targets {other:?}", route.name),
    }
}

fn cluster<'a>(cfg: &'a ProxyConfig, name: &str) -> &'a Cluster {
    cfg.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

const REVIEWS: &str = "reviews.shop.svc.cluster.local";

#[test]
fn fixture_resources_have_istiod_names() -> anyhow::Result<()> {
    let cfg = fixture_config(&[("app", "reviews"), ("version", "v1")])?;
    let listeners = names(&cfg.listeners, |l| &l.name);
    for l in [
        "virtualOutbound",
        "virtualInbound",
        "0.0.0.0_9080",
        "10.96.0.31_5432",
        "0.0.0.0_6379",
        "0.0.0.0_80",
    ] {
        assert!(
            listeners.contains(&l.to_string()),
            "{l} missing from {listeners:?}"
        );
    }
    let clusters = names(&cfg.clusters, |c| &c.name);
    for c in [
        "BlackHoleCluster",
        "PassthroughCluster",
        "InboundPassthroughClusterIpv4",
        "outbound|9080||reviews.shop.svc.cluster.local",
        "outbound|9080|v1|reviews.shop.svc.cluster.local",
        "outbound|9080|v3|reviews.shop.svc.cluster.local",
        "outbound|9080||ratings.shop.svc.cluster.local",
        "outbound|5432||db.shop.svc.cluster.local",
        "outbound|80||httpbin.org",
        "inbound|9080||",
    ] {
        assert!(
            clusters.contains(&c.to_string()),
            "{c} missing from {clusters:?}"
        );
    }
    // The reviews proxy serves 9080 only: no inbound cluster for ratings.
    assert!(!clusters.iter().any(|c| c == "inbound|8080||"));
    let rc = route_config(&cfg, "9080");
    let vh = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == format!("{REVIEWS}:9080"))
        .expect("reviews vhost");
    for d in [
        REVIEWS,
        "reviews",
        "reviews.shop",
        "reviews.shop.svc",
        "reviews:9080",
        "reviews.shop.svc.cluster.local:9080",
    ] {
        assert!(
            vh.domains.contains(&d.to_string()),
            "{d} missing from {:?}",
            vh.domains
        );
    }
    let ratings = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name.starts_with("ratings."))
        .expect("ratings vhost");
    assert!(ratings.domains.contains(&"10.96.0.21:9080".to_string()));
    assert_eq!(
        rc.virtual_hosts.last().map(|v| v.name.as_str()),
        Some("allow_any")
    );
    Ok(())
}

#[test]
fn endpoints_follow_subset_labels_and_target_ports() -> anyhow::Result<()> {
    let cfg = fixture_config(&[("app", "productpage")])?;
    let addrs = |name: &str| -> Vec<String> {
        let cla = cfg
            .endpoints
            .iter()
            .find(|e| e.cluster_name == name)
            .unwrap_or_else(|| panic!("no CLA {name}"));
        cla.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| format!("{e:?}"))
            .collect()
    };
    let v2 = addrs("outbound|9080|v2|reviews.shop.svc.cluster.local");
    assert_eq!(v2.len(), 1);
    assert!(v2[0].contains("10.1.0.12"));
    assert_eq!(
        addrs("outbound|9080||reviews.shop.svc.cluster.local").len(),
        3
    );
    // tlsMode metadata only on the pod labelled for Istio mTLS.
    let v1 = addrs("outbound|9080|v1|reviews.shop.svc.cluster.local");
    assert!(v1[0].contains("tlsMode"));
    assert!(!v2[0].contains("tlsMode"));
    // targetPort `api` resolves through the pod's named container port.
    let ratings = addrs("outbound|9080||ratings.shop.svc.cluster.local");
    assert!(
        ratings[0].contains("10.1.0.21") && ratings[0].contains("8080"),
        "{ratings:?}"
    );
    // EndpointSlice endpoints that are not ready are left out.
    let db = addrs("outbound|5432||db.shop.svc.cluster.local");
    assert_eq!(db.len(), 1);
    Ok(())
}

#[test]
fn virtual_service_features_become_route_fields() -> anyhow::Result<()> {
    let cfg = fixture_config(&[("app", "productpage")])?;
    let routes = vhost_routes(route_config(&cfg, "9080"), &format!("{REVIEWS}:9080"));
    let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    // The match for other source labels is dropped for this proxy.
    assert_eq!(names, ["jason", "regex", "regex", "moved", "split"]);

    let jason = &routes[0];
    let m = jason.r#match.as_ref().expect("match");
    assert_eq!(m.headers[0].name, "end-user");
    assert_eq!(m.query_parameters[0].name, "debug");
    assert_eq!(cluster_of(jason), format!("outbound|9080|v2|{REVIEWS}"));
    let fault = HttpFault::decode(
        jason.typed_per_filter_config["envoy.filters.http.fault"]
            .value
            .as_slice(),
    )?;
    assert_eq!(
        fault.delay.and_then(|d| d.percentage).map(|p| p.numerator),
        Some(500_000)
    );
    assert_eq!(
        fault.abort.and_then(|a| a.percentage).map(|p| p.numerator),
        Some(5_000)
    );
    assert_eq!(jason.request_headers_to_remove, ["x-debug"]);
    let retry = action(jason)
        .retry_policy
        .as_ref()
        .expect("default retries");
    assert_eq!(retry.num_retries.map(|n| n.value), Some(2));
    assert_eq!(
        retry.retry_on,
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    );
    assert_eq!(
        action(jason).hash_policy.len(),
        1,
        "consistent hash from the DestinationRule"
    );

    let regex = action(&routes[1]);
    assert_eq!(regex.prefix_rewrite, "/v1/");
    assert_eq!(regex.timeout.map(|t| t.seconds), Some(3));
    let retry = regex.retry_policy.as_ref().expect("retries");
    assert_eq!(retry.num_retries.map(|n| n.value), Some(4));
    assert_eq!(retry.retry_on, "5xx,reset,retriable-status-codes");
    assert_eq!(retry.retriable_status_codes, [503]);
    assert!(
        routes[1]
            .r#match
            .as_ref()
            .and_then(|m| m.case_sensitive)
            .is_some_and(|c| !c.value)
    );

    assert!(matches!(routes[3].action, Some(Action::Redirect(_))));

    let split = action(&routes[4]);
    let Some(ClusterSpecifier::WeightedClusters(wc)) = &split.cluster_specifier else {
        panic!("split is not weighted");
    };
    let weights: Vec<(String, u32)> = wc
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.map(|w| w.value).unwrap_or(0)))
        .collect();
    assert_eq!(
        weights,
        [
            (format!("outbound|9080|v1|{REVIEWS}"), 75),
            (format!("outbound|9080|v2|{REVIEWS}"), 25)
        ]
    );
    assert_eq!(wc.clusters[0].response_headers_to_add.len(), 1);
    assert!(split.retry_policy.is_none(), "attempts: 0 disables retries");
    assert_eq!(
        split.request_mirror_policies[0].cluster,
        format!("outbound|9080|v3|{REVIEWS}")
    );
    assert!(
        routes[4]
            .typed_per_filter_config
            .contains_key("envoy.filters.http.cors")
    );
    Ok(())
}

#[test]
fn destination_rule_policies_reach_clusters() -> anyhow::Result<()> {
    let cfg = fixture_config(&[("app", "productpage")])?;
    let parent = cluster(&cfg, &format!("outbound|9080||{REVIEWS}"));
    assert_eq!(parent.lb_policy, LbPolicy::RingHash as i32);
    let t = &parent
        .circuit_breakers
        .as_ref()
        .expect("breakers")
        .thresholds[0];
    assert_eq!(t.max_connections.map(|v| v.value), Some(100));
    assert_eq!(t.max_pending_requests.map(|v| v.value), Some(10));
    assert_eq!(t.max_requests.map(|v| v.value), Some(50));
    assert_eq!(parent.connect_timeout.map(|d| d.seconds), Some(3));
    let od = parent
        .outlier_detection
        .as_ref()
        .expect("outlier detection");
    assert_eq!(od.consecutive_5xx.map(|v| v.value), Some(3));
    assert_eq!(od.base_ejection_time.map(|d| d.seconds), Some(60));
    assert!(parent.transport_socket.is_none());
    assert_eq!(
        parent
            .eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.as_str()),
        Some(parent.name.as_str())
    );
    // The v3 subset overrides the load balancer and adds Istio mTLS.
    let v3 = cluster(&cfg, &format!("outbound|9080|v3|{REVIEWS}"));
    assert_eq!(v3.lb_policy, LbPolicy::RoundRobin as i32);
    assert!(v3.transport_socket.is_some());
    assert_eq!(
        v3.circuit_breakers, parent.circuit_breakers,
        "the rest is inherited"
    );
    // Services without a rule get istiod's defaults.
    let ratings = cluster(&cfg, "outbound|9080||ratings.shop.svc.cluster.local");
    assert_eq!(ratings.lb_policy, LbPolicy::LeastRequest as i32);
    Ok(())
}

#[test]
fn inbound_side_serves_the_local_ports() -> anyhow::Result<()> {
    let snap = load_dir(&fixtures())?;
    let mesh = Mesh::new(&snap, MeshOptions::default());
    // Only the IP is known: the pod (and so its labels and named ports)
    // is found through it.
    let mut p = Proxy {
        namespace: "shop".into(),
        ips: vec!["10.1.0.21".into()],
        ..Default::default()
    };
    mesh.complete_proxy(&mut p);
    assert_eq!(p.labels.get("app").map(String::as_str), Some("ratings"));
    let cfg = mesh.proxy_config(&p);
    let inbound = cfg
        .listeners
        .iter()
        .find(|l| l.name == "virtualInbound")
        .expect("virtualInbound");
    let chains = names(&inbound.filter_chains, |c| &c.name);
    // targetPort `api` is the pod's container port 8080.
    assert!(chains.contains(&"0.0.0.0_8080".to_string()), "{chains:?}");
    assert!(!chains.contains(&"0.0.0.0_9080".to_string()), "{chains:?}");
    assert!(chains.contains(&"virtualInbound-catchall-http".to_string()));
    assert!(cfg.clusters.iter().any(|c| c.name == "inbound|8080||"));
    assert_eq!(inbound.listener_filters.len(), 3);
    Ok(())
}

#[test]
fn every_resource_round_trips_through_the_envoy_schema() -> anyhow::Result<()> {
    let cfg = fixture_config(&[("app", "productpage")])?;
    round_trip(&cfg)
}

fn round_trip(cfg: &ProxyConfig) -> anyhow::Result<()> {
    let d = ferry_envoy_json::Descriptors::load().map_err(anyhow::Error::msg)?;
    fn check<M: Message + Default + PartialEq + std::fmt::Debug>(
        d: &ferry_envoy_json::Descriptors,
        full_name: &str,
        msg: &M,
    ) -> anyhow::Result<()> {
        let json = d.to_json(full_name, msg).map_err(anyhow::Error::msg)?;
        let back: M = d
            .from_json(full_name, json.clone())
            .map_err(anyhow::Error::msg)?;
        // Compared as JSON: nested `Any` payloads may be re-encoded with
        // another (equally valid) field order.
        let again = d.to_json(full_name, &back).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            again == json,
            "{full_name} changed in a JSON round trip:\n{json}\n{again}"
        );
        if &back != msg {
            eprintln!("{full_name}: bytes differ after a round trip (same JSON)");
        }
        Ok(())
    }
    for l in &cfg.listeners {
        check(&d, "envoy.config.listener.v3.Listener", l)?;
    }
    for r in &cfg.routes {
        check(&d, "envoy.config.route.v3.RouteConfiguration", &**r)?;
    }
    for c in &cfg.clusters {
        check(&d, "envoy.config.cluster.v3.Cluster", c)?;
    }
    for e in &cfg.endpoints {
        check(&d, "envoy.config.endpoint.v3.ClusterLoadAssignment", e)?;
    }
    Ok(())
}

// ------------------------------------------------------------------ bookinfo

/// The project's own bookinfo (`samples/bookinfo`, laid out as Istio's sample).
fn bookinfo() -> Option<PathBuf> {
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/bookinfo"))
}

fn bookinfo_config(vs_file: Option<&str>) -> anyhow::Result<Option<ProxyConfig>> {
    let Some(dir) = bookinfo() else {
        return Ok(None);
    };
    let mut snap = Snapshot::default();
    let mut files = vec![
        dir.join("platform/kube/bookinfo.yaml"),
        dir.join("networking/destination-rule-all.yaml"),
    ];
    files.extend(vs_file.map(|f| dir.join("networking").join(f)));
    for f in files {
        let s = load_file(&f)?;
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        snap.resources.extend(s.resources);
    }
    let mesh = Mesh::new(&snap, MeshOptions::default());
    let cfg = mesh.proxy_config(&proxy(
        "default",
        &[("app", "productpage"), ("version", "v1")],
    ));
    round_trip(&cfg)?;
    Ok(Some(cfg))
}

const BOOK_REVIEWS: &str = "reviews.default.svc.cluster.local";

#[test]
fn bookinfo_has_istiod_shapes() -> anyhow::Result<()> {
    let Some(cfg) = bookinfo_config(None)? else {
        return Ok(());
    };
    let clusters = names(&cfg.clusters, |c| &c.name);
    for svc in ["productpage", "details", "ratings", "reviews"] {
        assert!(clusters.contains(&format!("outbound|9080||{svc}.default.svc.cluster.local")));
        assert!(clusters.contains(&format!("outbound|9080|v1|{svc}.default.svc.cluster.local")));
    }
    assert!(clusters.contains(&format!("outbound|9080|v3|{BOOK_REVIEWS}")));
    assert!(clusters.contains(&"inbound|9080||".to_string()));
    let listeners = names(&cfg.listeners, |l| &l.name);
    assert!(listeners.contains(&"0.0.0.0_9080".to_string()));
    let rc = route_config(&cfg, "9080");
    let routes = vhost_routes(rc, &format!("{BOOK_REVIEWS}:9080"));
    assert_eq!(
        cluster_of(&routes[0]),
        format!("outbound|9080||{BOOK_REVIEWS}")
    );
    Ok(())
}

#[test]
fn bookinfo_all_v1_routes_every_service_to_v1() -> anyhow::Result<()> {
    let Some(cfg) = bookinfo_config(Some("virtual-service-all-v1.yaml"))? else {
        return Ok(());
    };
    let rc = route_config(&cfg, "9080");
    for svc in ["productpage", "details", "ratings", "reviews"] {
        let host = format!("{svc}.default.svc.cluster.local");
        let routes = vhost_routes(rc, &format!("{host}:9080"));
        assert_eq!(cluster_of(&routes[0]), format!("outbound|9080|v1|{host}"));
    }
    Ok(())
}

#[test]
fn bookinfo_reviews_test_v2_matches_jason_first() -> anyhow::Result<()> {
    let Some(cfg) = bookinfo_config(Some("virtual-service-reviews-test-v2.yaml"))? else {
        return Ok(());
    };
    let routes = vhost_routes(route_config(&cfg, "9080"), &format!("{BOOK_REVIEWS}:9080"));
    assert_eq!(routes.len(), 2);
    let m = routes[0].r#match.as_ref().expect("match");
    assert_eq!(m.headers.len(), 1);
    assert_eq!(m.headers[0].name, "end-user");
    assert!(format!("{:?}", m.headers[0]).contains("jason"));
    assert_eq!(
        cluster_of(&routes[0]),
        format!("outbound|9080|v2|{BOOK_REVIEWS}")
    );
    assert_eq!(
        cluster_of(&routes[1]),
        format!("outbound|9080|v1|{BOOK_REVIEWS}")
    );
    Ok(())
}

#[test]
fn bookinfo_reviews_50_v3_splits_evenly() -> anyhow::Result<()> {
    let Some(cfg) = bookinfo_config(Some("virtual-service-reviews-50-v3.yaml"))? else {
        return Ok(());
    };
    let routes = vhost_routes(route_config(&cfg, "9080"), &format!("{BOOK_REVIEWS}:9080"));
    let Some(ClusterSpecifier::WeightedClusters(wc)) = &action(&routes[0]).cluster_specifier else {
        panic!("not weighted");
    };
    let weights: Vec<(String, u32)> = wc
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.map(|w| w.value).unwrap_or(0)))
        .collect();
    assert_eq!(
        weights,
        [
            (format!("outbound|9080|v1|{BOOK_REVIEWS}"), 50),
            (format!("outbound|9080|v3|{BOOK_REVIEWS}"), 50)
        ]
    );
    Ok(())
}

fn ratings_fault(file: &str) -> anyhow::Result<Option<(Vec<Route>, HttpFault)>> {
    let Some(cfg) = bookinfo_config(Some(file))? else {
        return Ok(None);
    };
    let routes = vhost_routes(
        route_config(&cfg, "9080"),
        "ratings.default.svc.cluster.local:9080",
    )
    .to_vec();
    let fault = HttpFault::decode(
        routes[0].typed_per_filter_config["envoy.filters.http.fault"]
            .value
            .as_slice(),
    )?;
    assert!(
        !routes[1]
            .typed_per_filter_config
            .contains_key("envoy.filters.http.fault")
    );
    // The HCM carries the fault filter the per-route configs refer to.
    let listener = cfg
        .listeners
        .iter()
        .find(|l| l.name == "0.0.0.0_9080")
        .expect("listener");
    let hcm = listener
        .filter_chains
        .iter()
        .flat_map(|c| &c.filters)
        .find_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any))
                if f.name == "envoy.filters.network.http_connection_manager" =>
            {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .expect("outbound HCM");
    let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        filters,
        [
            "envoy.filters.http.fault",
            "envoy.filters.http.cors",
            "istio.stats",
            "envoy.filters.http.router"
        ]
    );
    Ok(Some((routes, fault)))
}

#[test]
fn bookinfo_ratings_test_delay_injects_seven_seconds_for_jason() -> anyhow::Result<()> {
    let Some((routes, fault)) = ratings_fault("virtual-service-ratings-test-delay.yaml")? else {
        return Ok(());
    };
    assert_eq!(
        routes[0]
            .r#match
            .as_ref()
            .map(|m| m.headers[0].name.as_str()),
        Some("end-user")
    );
    let delay = fault.delay.expect("delay");
    assert_eq!(delay.percentage.map(|p| p.numerator), Some(1_000_000));
    assert!(format!("{:?}", delay.fault_delay_secifier).contains("seconds: 7"));
    assert!(fault.abort.is_none());
    Ok(())
}

#[test]
fn bookinfo_ratings_test_abort_returns_500_for_jason() -> anyhow::Result<()> {
    let Some((_, fault)) = ratings_fault("virtual-service-ratings-test-abort.yaml")? else {
        return Ok(());
    };
    let abort = fault.abort.expect("abort");
    assert!(format!("{:?}", abort.error_type).contains("HttpStatus(500)"));
    assert_eq!(abort.percentage.map(|p| p.numerator), Some(1_000_000));
    Ok(())
}

#[test]
fn every_bookinfo_virtual_service_translates_to_valid_envoy() -> anyhow::Result<()> {
    let Some(dir) = bookinfo() else { return Ok(()) };
    for entry in std::fs::read_dir(dir.join("networking"))? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if name.starts_with("virtual-service-") {
            bookinfo_config(Some(&name))?;
        }
    }
    Ok(())
}

/// DestinationRule SIMPLE origination as istiod builds it: the server's
/// certificate always verified (the given CA, else the system's bundle,
/// never an unverified context), and without an `sni` the request's host
/// sent and, without `subjectAltNames`, required as the server's name
/// (`auto_sni`, `auto_san_validation`).
#[test]
fn simple_tls_origination_verifies_the_server_as_istiod_does() -> anyhow::Result<()> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        UpstreamTlsContext, common_tls_context::ValidationContextType,
    };
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    let dir = std::env::temp_dir().join(format!("ferry-dr-simple-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rules = [
        ("plain", "{mode: SIMPLE}"),
        ("sni", "{mode: SIMPLE, sni: api.example.com}"),
        (
            "sans",
            "{mode: SIMPLE, subjectAltNames: [api.example.com], caCertificates: /etc/ca.pem}",
        ),
    ];
    for (name, tls) in rules {
        let host = format!("{name}.example.com");
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{hosts: [{host}], location: MESH_EXTERNAL, resolution: DNS, ports: [{{number: 443, name: https, protocol: HTTP}}]}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{host: {host}, trafficPolicy: {{tls: {tls}}}}}\n"
            ),
        )?;
    }
    let snap = load_dir(&dir)?;
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let cfg = Mesh::new(&snap, MeshOptions::default()).proxy_config(&proxy("shop", &[]));
    for (name, _) in rules {
        let c = cluster(&cfg, &format!("outbound|443||{name}.example.com"));
        let ts = c.transport_socket.as_ref().expect("TLS");
        let Some(
            envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                any,
            ),
        ) = &ts.config_type
        else {
            panic!("typed config")
        };
        let ctx = UpstreamTlsContext::decode(any.value.as_slice())?;
        assert!(
            !ctx.auto_host_sni,
            "{name}: istiod never sets auto_host_sni"
        );
        let common = ctx.common_tls_context.expect("common");
        let Some(ValidationContextType::ValidationContext(vc)) = common.validation_context_type
        else {
            panic!("{name}: an inline validation context")
        };
        assert!(
            vc.trusted_ca.is_some() && vc.system_root_certs.is_none(),
            "{name}: the server is verified against a CA file: {vc:?}"
        );
        let options = c
            .typed_extension_protocol_options
            .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
            .map(|a| HttpProtocolOptions::decode(a.value.as_slice()))
            .transpose()?
            .and_then(|o| o.upstream_http_protocol_options)
            .map(|u| (u.auto_sni, u.auto_san_validation));
        let want = match name {
            "plain" => Some((true, true)),
            "sni" => None,
            _ => Some((true, false)),
        };
        assert_eq!(options, want, "{name}: auto_sni, auto_san_validation");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
