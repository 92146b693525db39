//! Gateways: a `router~…` proxy selected by a Gateway's labels gets one
//! listener per server port in istiod's shapes (HTTP → RDS `http.PORT`,
//! terminated HTTPS → SNI chains with SDS credentials and RDS
//! `https.PORT.NAME.GATEWAY.NS`, PASSTHROUGH → SNI chains proxied as TCP,
//! TCP → tcp_proxy), virtual hosts from the VirtualServices bound to the
//! Gateway (delegates merged in), and the validation of conflicting
//! Gateways and unknown references.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    RouteConfiguration, route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier as TcpCluster,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use ferry_pilot::istio::source::load_dir;
use ferry_pilot::istio::translate::{Mesh, MeshOptions, NodeType, Proxy, ProxyConfig};
use ferry_pilot::istio::validate::{Code, validate};
use prost::Message;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gateway")
}

fn router(labels: &[(&str, &str)]) -> Proxy {
    Proxy {
        node_type: NodeType::Router,
        id: "router~10.1.1.99~ingress-1.istio-system~istio-system.svc.cluster.local".into(),
        namespace: "istio-system".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    }
}

fn ingress() -> anyhow::Result<ProxyConfig> {
    let snap = load_dir(&fixtures())?;
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let findings = validate(&snap);
    assert!(findings.is_empty(), "{findings:#?}");
    let mesh = Mesh::new(&snap, MeshOptions::default());
    Ok(mesh.proxy_config(&router(&[("istio", "ingressgateway")])))
}

fn listener<'a>(cfg: &'a ProxyConfig, name: &str) -> &'a Listener {
    cfg.listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

fn decode<M: Message + Default>(chain: &FilterChain, name: &str) -> M {
    let f = chain
        .filters
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no filter {name} in chain {}", chain.name));
    match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => M::decode(&*any.value).expect("decode"),
        other => panic!("{other:?}"),
    }
}

fn hcm(chain: &FilterChain) -> HttpConnectionManager {
    decode(chain, "envoy.filters.network.http_connection_manager")
}

fn tcp(chain: &FilterChain) -> TcpProxy {
    decode(chain, "envoy.filters.network.tcp_proxy")
}

fn rds(chain: &FilterChain) -> String {
    match hcm(chain).route_specifier {
        Some(RouteSpecifier::Rds(r)) => r.route_config_name,
        other => panic!("{other:?}"),
    }
}

fn route_config<'a>(cfg: &'a ProxyConfig, name: &str) -> &'a RouteConfiguration {
    cfg.routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no route config {name}"))
}

fn tls_context(chain: &FilterChain) -> DownstreamTlsContext {
    let ts = chain.transport_socket.as_ref().expect("transport socket");
    match &ts.config_type {
        Some(
            envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                any,
            ),
        ) => DownstreamTlsContext::decode(&*any.value).expect("decode"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gateway_listeners_follow_the_servers() -> anyhow::Result<()> {
    let cfg = ingress()?;
    let names: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "0.0.0.0_15443",
            "0.0.0.0_5432",
            "0.0.0.0_8080",
            "0.0.0.0_8443",
            "0.0.0.0_9443"
        ]
    );
    // No capture listeners and no inbound clusters on a gateway.
    assert!(!names.contains(&"virtualOutbound"));
    assert!(!cfg.clusters.iter().any(|c| c.name.starts_with("inbound|")));
    assert!(
        cfg.clusters
            .iter()
            .any(|c| c.name == "outbound|9080||productpage.shop.svc.cluster.local")
    );

    // HTTP: one chain, RDS http.8080, the gateway is the edge.
    let http = listener(&cfg, "0.0.0.0_8080");
    assert_eq!(http.filter_chains.len(), 1);
    assert!(
        http.bind_to_port.is_none(),
        "a gateway binds its ports itself"
    );
    let h = hcm(&http.filter_chains[0]);
    assert_eq!(h.use_remote_address.map(|b| b.value), Some(true));
    assert_eq!(rds(&http.filter_chains[0]), "http.8080");

    // HTTPS: a chain per server, by SNI, certificates from SDS.
    let https = listener(&cfg, "0.0.0.0_8443");
    assert_eq!(https.filter_chains.len(), 2);
    assert_eq!(
        https.listener_filters[0].name,
        "envoy.filters.listener.tls_inspector"
    );
    let shop = &https.filter_chains[0];
    assert_eq!(
        shop.filter_chain_match
            .as_ref()
            .map(|m| m.server_names.clone()),
        Some(vec!["shop.example.com".to_string()])
    );
    assert_eq!(rds(shop), "https.8443.https-shop.public.shop");
    let ctx = tls_context(shop);
    let common = ctx.common_tls_context.expect("common");
    assert_eq!(
        common.tls_certificate_sds_secret_configs[0].name,
        "kubernetes://shop-cert"
    );
    assert_eq!(common.alpn_protocols, ["h2", "http/1.1"]);
    assert!(ctx.require_client_certificate.is_none());
    let partners = tls_context(&https.filter_chains[1]);
    assert_eq!(
        partners.require_client_certificate.map(|b| b.value),
        Some(true)
    );
    let common = partners.common_tls_context.expect("common");
    assert_eq!(
        common.tls_certificate_sds_secret_configs[0].name,
        "kubernetes://partners-cert"
    );
    let Some(
        envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType::CombinedValidationContext(v),
    ) = common.validation_context_type
    else {
        panic!("no combined validation context");
    };
    assert_eq!(
        v.validation_context_sds_secret_config
            .map(|s| s.name)
            .as_deref(),
        Some("kubernetes://partners-cert-cacert")
    );

    // PASSTHROUGH: SNI → TCP proxy to the tls route's cluster, no TLS
    // termination.
    let pass = listener(&cfg, "0.0.0.0_9443");
    assert_eq!(pass.filter_chains.len(), 1);
    let chain = &pass.filter_chains[0];
    assert!(chain.transport_socket.is_none());
    assert_eq!(
        chain
            .filter_chain_match
            .as_ref()
            .map(|m| m.server_names.clone()),
        Some(vec!["secure.example.com".to_string()])
    );
    assert_eq!(
        tcp(chain).cluster_specifier,
        Some(TcpCluster::Cluster(
            "outbound|443||secure.shop.svc.cluster.local".into()
        ))
    );

    // ISTIO_MUTUAL: terminated with the mesh certificate, then TCP.
    let mesh_tls = listener(&cfg, "0.0.0.0_15443");
    let ctx = tls_context(&mesh_tls.filter_chains[0]);
    assert_eq!(ctx.require_client_certificate.map(|b| b.value), Some(true));
    assert_eq!(
        ctx.common_tls_context
            .expect("common")
            .tls_certificate_sds_secret_configs[0]
            .name,
        "default"
    );

    // TCP.
    let db = listener(&cfg, "0.0.0.0_5432");
    assert_eq!(
        tcp(&db.filter_chains[0]).cluster_specifier,
        Some(TcpCluster::Cluster(
            "outbound|5432||db.shop.svc.cluster.local".into()
        ))
    );
    Ok(())
}

#[test]
fn gateway_routes_come_from_bound_virtual_services() -> anyhow::Result<()> {
    let cfg = ingress()?;
    let rc = route_config(&cfg, "http.8080");
    let vhosts: Vec<(&str, Vec<String>)> = rc
        .virtual_hosts
        .iter()
        .map(|v| (v.name.as_str(), v.domains.clone()))
        .collect();
    assert_eq!(
        vhosts,
        [
            (
                "api.example.com:8080",
                vec![
                    "api.example.com".to_string(),
                    "api.example.com:*".to_string()
                ]
            ),
            (
                "shop.example.com:8080",
                vec![
                    "shop.example.com".to_string(),
                    "shop.example.com:*".to_string()
                ]
            ),
        ]
    );
    // The shop host: the delegate's two rules under /api, then the parent's
    // own matches.
    let shop = &rc.virtual_hosts[1].routes;
    let paths: Vec<(String, String)> = shop
        .iter()
        .map(|r| {
            let path = match r.r#match.as_ref().and_then(|m| m.path_specifier.clone()) {
                Some(PathSpecifier::Prefix(p)) => format!("prefix:{p}"),
                Some(PathSpecifier::Path(p)) => format!("exact:{p}"),
                other => format!("{other:?}"),
            };
            let cluster = match &r.action {
                Some(Action::Route(a)) => match &a.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) => c.clone(),
                    other => format!("{other:?}"),
                },
                other => format!("{other:?}"),
            };
            (path, cluster)
        })
        .collect();
    let pp = "outbound|9080||productpage.shop.svc.cluster.local".to_string();
    assert_eq!(
        paths,
        [
            (
                "prefix:/api/reviews".to_string(),
                "outbound|9080||reviews.shop.svc.cluster.local".to_string()
            ),
            ("prefix:/api".to_string(), pp.clone()),
            ("exact:/productpage".to_string(), pp.clone()),
            ("prefix:/static".to_string(), pp),
        ]
    );
    // The weighted split of api.example.com.
    let api = &rc.virtual_hosts[0].routes[0];
    let Some(Action::Route(a)) = &api.action else {
        panic!("{api:?}")
    };
    let Some(ClusterSpecifier::WeightedClusters(w)) = &a.cluster_specifier else {
        panic!("{a:?}")
    };
    let weights: Vec<(String, u32)> = w
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.map_or(0, |w| w.value)))
        .collect();
    assert_eq!(
        weights,
        [
            (
                "outbound|9080||reviews.shop.svc.cluster.local".to_string(),
                80
            ),
            (
                "outbound|9080||productpage.shop.svc.cluster.local".to_string(),
                20
            ),
        ]
    );
    // The HTTPS server routes its own host only; MUTUAL partners too.
    let https = route_config(&cfg, "https.8443.https-shop.public.shop");
    assert_eq!(https.virtual_hosts.len(), 1);
    assert_eq!(https.virtual_hosts[0].name, "shop.example.com:8443");
    let partners = route_config(&cfg, "https.8443.https-partners.public.shop");
    assert_eq!(partners.virtual_hosts[0].name, "partners.example.com:8443");
    Ok(())
}

#[test]
fn gateway_selector_and_mesh_binding() -> anyhow::Result<()> {
    let snap = load_dir(&fixtures())?;
    let mesh = Mesh::new(&snap, MeshOptions::default());
    // The egress gateway has a server but nothing is bound to it: istiod's
    // 404 virtual host.
    let egress = mesh.proxy_config(&router(&[("istio", "egressgateway")]));
    let names: Vec<&str> = egress.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["0.0.0.0_80"]);
    let rc = route_config(&egress, "http.80");
    assert_eq!(rc.virtual_hosts[0].name, "blackhole:80");
    assert!(matches!(
        rc.virtual_hosts[0].routes[0].action,
        Some(Action::DirectResponse(ref d)) if d.status == 404
    ));
    // A router nobody selects gets no listeners at all.
    let none = mesh.proxy_config(&router(&[("istio", "other")]));
    assert!(none.listeners.is_empty());
    // A sidecar sees only `mesh`-bound rules: api.example.com is bound to
    // both, shop.example.com only to the gateway.
    let sidecar = Proxy {
        id: "sidecar~10.1.1.10~productpage-1.shop~shop.svc.cluster.local".into(),
        namespace: "shop".into(),
        ..Default::default()
    };
    let cfg = mesh.proxy_config(&sidecar);
    assert!(cfg.listeners.iter().any(|l| l.name == "virtualOutbound"));
    assert!(!cfg.routes.iter().any(|r| r.name.starts_with("http.")));
    Ok(())
}

#[test]
fn node_id_says_router() {
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: "router~10.1.1.99~ingress-1.istio-system~istio-system.svc.cluster.local".into(),
        ..Default::default()
    };
    let p = Proxy::from_node(&node).expect("proxy");
    assert_eq!(p.node_type, NodeType::Router);
    assert_eq!(p.namespace, "istio-system");
}

#[test]
fn conflicting_gateways_and_unknown_references_are_reported() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-gw-conflict-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("gw.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a, namespace: shop}\n\
         spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [shop.example.com]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: b, namespace: shop}\n\
         spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [shop.example.com]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: shop}\n\
         spec:\n  hosts: [shop.example.com]\n  gateways: [nowhere]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    delegate: {name: missing}\n",
    )?;
    let snap = load_dir(&dir)?;
    let findings = validate(&snap);
    let _ = std::fs::remove_dir_all(&dir);
    let conflicts: Vec<_> = findings
        .iter()
        .filter(|f| f.code == Code::ConflictingGateways)
        .collect();
    assert_eq!(conflicts.len(), 2, "{findings:#?}");
    let text = conflicts[0].to_string();
    assert!(
        text.contains("IST0145") && text.contains("gw.yaml") && text.contains("port 80"),
        "{text}"
    );
    let missing: Vec<String> = findings
        .iter()
        .filter(|f| f.code == Code::ReferencedResourceNotFound)
        .map(|f| format!("{} {}", f.field, f.message))
        .collect();
    assert_eq!(
        missing,
        [
            "spec.gateways[0] referenced gateway not found: \"nowhere\"",
            "spec.http[0].delegate referenced delegate VirtualService not found: \"shop/missing\"",
        ]
    );
    Ok(())
}

#[test]
fn sidecar_tls_routes_choose_by_sni() -> anyhow::Result<()> {
    let snap = load_dir(&fixtures())?;
    let mesh = Mesh::new(&snap, MeshOptions::default());
    let cfg = mesh.proxy_config(&Proxy {
        id: "sidecar~10.1.1.10~productpage-1.shop~shop.svc.cluster.local".into(),
        namespace: "shop".into(),
        ..Default::default()
    });
    let l = listener(&cfg, "10.96.1.30_443");
    assert_eq!(
        l.listener_filters.first().map(|f| f.name.as_str()),
        Some("envoy.filters.listener.tls_inspector")
    );
    let chains: Vec<(Vec<String>, Option<TcpCluster>)> = l
        .filter_chains
        .iter()
        .map(|c| {
            (
                c.filter_chain_match
                    .as_ref()
                    .map(|m| m.server_names.clone())
                    .unwrap_or_default(),
                tcp(c).cluster_specifier,
            )
        })
        .collect();
    assert_eq!(chains.len(), 3, "{chains:#?}");
    assert_eq!(
        chains[0].0,
        [
            "secure.shop.svc.cluster.local".to_string(),
            "secure".to_string()
        ]
    );
    let Some(TcpCluster::WeightedClusters(w)) = &chains[0].1 else {
        panic!("{chains:?}")
    };
    let weights: Vec<(&str, u32)> = w
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("outbound|443||secure.shop.svc.cluster.local", 80),
            ("outbound|443||secure-canary.shop.svc.cluster.local", 20),
        ]
    );
    assert_eq!(chains[1].0, ["legacy.secure.example.com".to_string()]);
    assert_eq!(
        chains[1].1,
        Some(TcpCluster::Cluster(
            "outbound|443||secure-canary.shop.svc.cluster.local".into()
        ))
    );
    // Without a matching SNI: the service itself.
    assert!(chains[2].0.is_empty());
    assert_eq!(
        chains[2].1,
        Some(TcpCluster::Cluster(
            "outbound|443||secure.shop.svc.cluster.local".into()
        ))
    );
    Ok(())
}

#[test]
fn https_redirect_file_certificates_and_missing_credentials() -> anyhow::Result<()> {
    use envoy_types::pb::envoy::config::route::v3::virtual_host::TlsRequirementType;
    let dir = std::env::temp_dir().join(format!("ferry-gw-redirect-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(fixtures().join("services.yaml"), dir.join("services.yaml"))?;
    std::fs::write(
        dir.join("gw.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  selector: {istio: ingressgateway}\n  servers:\n\
         \x20 - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [shop.example.com]\n    tls: {httpsRedirect: true}\n\
         \x20 - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [shop.example.com]\n\
         \x20   tls: {mode: SIMPLE, serverCertificate: /etc/certs/tls.crt, privateKey: /etc/certs/tls.key}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: shop, namespace: shop}\n\
         spec:\n  hosts: [shop.example.com]\n  gateways: [web]\n  http:\n  - route:\n    - destination: {host: productpage}\n",
    )?;
    let snap = load_dir(&dir)?;
    let findings = validate(&snap);
    assert!(findings.is_empty(), "{findings:#?}");
    let cfg = Mesh::new(&snap, MeshOptions::default())
        .proxy_config(&router(&[("istio", "ingressgateway")]));
    let rc = route_config(&cfg, "http.80");
    assert_eq!(
        rc.virtual_hosts[0].require_tls,
        TlsRequirementType::All as i32
    );
    let https = listener(&cfg, "0.0.0.0_443");
    let common = tls_context(&https.filter_chains[0])
        .common_tls_context
        .expect("common");
    assert!(common.tls_certificate_sds_secret_configs.is_empty());
    assert_eq!(common.tls_certificates.len(), 1);

    // The same HTTPS server without any certificate is refused.
    std::fs::write(
        dir.join("gw.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  selector: {istio: ingressgateway}\n  servers:\n\
         \x20 - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [shop.example.com]\n    tls: {mode: SIMPLE}\n",
    )?;
    let findings = validate(&load_dir(&dir)?);
    let _ = std::fs::remove_dir_all(&dir);
    let text: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    assert_eq!(text.len(), 1, "{text:#?}");
    assert!(
        text[0].contains("IST0106")
            && text[0].contains("spec.servers[0].tls")
            && text[0].contains("credentialName")
            && text[0].contains("gw.yaml"),
        "{text:?}"
    );
    Ok(())
}

#[test]
fn virtual_services_of_one_gateway_host_merge_and_unserved_hosts_warn() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-gw-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(fixtures().join("services.yaml"), dir.join("services.yaml"))?;
    std::fs::write(
        dir.join("gw.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  selector: {istio: ingressgateway}\n  servers:\n\
         \x20 - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [shop.example.com]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: shop}\n\
         spec:\n  hosts: [shop.example.com]\n  gateways: [web]\n  http:\n  - match: [{uri: {prefix: /reviews}}]\n    route:\n    - destination: {host: reviews}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b, namespace: shop}\n\
         spec:\n  hosts: [shop.example.com]\n  gateways: [web]\n  http:\n  - route:\n    - destination: {host: productpage}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: c, namespace: shop}\n\
         spec:\n  hosts: [other.example.com]\n  gateways: [web]\n  http:\n  - route:\n    - destination: {host: productpage}\n",
    )?;
    let snap = load_dir(&dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    let findings: Vec<String> = validate(&snap)
        .iter()
        .map(|f| {
            format!(
                "{} {:?} {}",
                f.code.id(),
                f.resource.as_ref().map(|r| r.name.clone()),
                f.field
            )
        })
        .collect();
    assert_eq!(findings, ["IST0132 Some(\"c\") spec.hosts"]);
    let cfg = Mesh::new(&snap, MeshOptions::default())
        .proxy_config(&router(&[("istio", "ingressgateway")]));
    let rc = route_config(&cfg, "http.80");
    assert_eq!(rc.virtual_hosts.len(), 1);
    let clusters: Vec<String> = rc.virtual_hosts[0]
        .routes
        .iter()
        .map(|r| match &r.action {
            Some(Action::Route(a)) => match &a.cluster_specifier {
                Some(ClusterSpecifier::Cluster(c)) => c.clone(),
                other => format!("{other:?}"),
            },
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        clusters,
        [
            "outbound|9080||reviews.shop.svc.cluster.local",
            "outbound|9080||productpage.shop.svc.cluster.local"
        ]
    );
    Ok(())
}

#[test]
fn auto_passthrough_and_mesh_delegation() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-gw-auto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(fixtures().join("services.yaml"), dir.join("services.yaml"))?;
    std::fs::write(
        dir.join("gw.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: eastwest, namespace: istio-system}\n\
         spec:\n  selector: {istio: eastwestgateway}\n  servers:\n\
         \x20 - port: {number: 15443, name: tls, protocol: TLS}\n    hosts: [\"*.shop.svc.cluster.local\"]\n    tls: {mode: AUTO_PASSTHROUGH}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\n\
         spec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - match: [{headers: {end-user: {exact: jason}}}]\n    delegate: {name: reviews-jason}\n\
         \x20 - route:\n    - destination: {host: reviews}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews-jason, namespace: shop}\n\
         spec:\n  http:\n  - match: [{uri: {prefix: /beta}}]\n    route:\n    - destination: {host: reviews, subset: v1}\n",
    )?;
    let snap = load_dir(&dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    let findings = validate(&snap);
    assert!(findings.is_empty(), "{findings:#?}");
    let mesh = Mesh::new(&snap, MeshOptions::default());

    // East-west: chains named by the client sidecar's SNI.
    let ew = mesh.proxy_config(&router(&[("istio", "eastwestgateway")]));
    let l = listener(&ew, "0.0.0.0_15443");
    let sni: Vec<String> = l
        .filter_chains
        .iter()
        .flat_map(|c| {
            c.filter_chain_match
                .clone()
                .unwrap_or_default()
                .server_names
        })
        .collect();
    assert!(
        sni.contains(&"outbound_.9080_.v1_.reviews.shop.svc.cluster.local".to_string())
            && sni.contains(&"outbound_.9080_._.productpage.shop.svc.cluster.local".to_string()),
        "{sni:?}"
    );
    let v1 = l
        .filter_chains
        .iter()
        .find(|c| {
            c.filter_chain_match.as_ref().is_some_and(|m| {
                m.server_names == ["outbound_.9080_.v1_.reviews.shop.svc.cluster.local"]
            })
        })
        .expect("v1 chain");
    assert_eq!(
        tcp(v1).cluster_specifier,
        Some(TcpCluster::Cluster(
            "outbound|9080|v1|reviews.shop.svc.cluster.local".into()
        ))
    );

    // A sidecar: the delegate's rule under the parent's header match, then
    // the parent's catch-all.
    let cfg = mesh.proxy_config(&Proxy {
        id: "sidecar~10.1.1.10~productpage-1.shop~shop.svc.cluster.local".into(),
        namespace: "shop".into(),
        ..Default::default()
    });
    let rc = route_config(&cfg, "9080");
    let vh = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == "reviews.shop.svc.cluster.local:9080")
        .expect("reviews vhost");
    assert_eq!(vh.routes.len(), 2);
    let first = vh.routes[0].r#match.as_ref().expect("match");
    assert_eq!(
        first.path_specifier,
        Some(PathSpecifier::Prefix("/beta".into()))
    );
    assert_eq!(first.headers.len(), 1);
    assert_eq!(first.headers[0].name, "end-user");
    let Some(Action::Route(a)) = &vh.routes[0].action else {
        panic!()
    };
    assert_eq!(
        a.cluster_specifier,
        Some(ClusterSpecifier::Cluster(
            "outbound|9080|v1|reviews.shop.svc.cluster.local".into()
        ))
    );
    Ok(())
}

/// `credentialName`: the `kubernetes://` secrets a gateway's listeners
/// name are served from the Secrets of the gateway's own namespace, with
/// istiod's key names (generic `cert`/`key`/`cacert`/`crl`, TLS
/// `tls.crt`/`tls.key`/`ca.crt`), the CA from `NAME-cacert` first; another
/// namespace's Secret of the same name is never served, and one without
/// its keys is not served at all.
#[test]
fn credential_name_secrets_come_from_the_gateways_namespace() -> anyhow::Result<()> {
    use base64::Engine;
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    use ferry_pilot::istio::source::parse_documents;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let yaml = format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: shop-cert, namespace: istio-system}}
type: Opaque
stringData: {{cert: SHOP-CERT, key: SHOP-KEY}}
---
apiVersion: v1
kind: Secret
metadata: {{name: shop-cert, namespace: default}}
stringData: {{cert: OTHER-NAMESPACE, key: OTHER-NAMESPACE}}
---
apiVersion: v1
kind: Secret
metadata: {{name: partners-cert, namespace: istio-system}}
type: kubernetes.io/tls
data: {{tls.crt: {}, tls.key: {}, ca.crt: {}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: partners-cert-cacert, namespace: istio-system}}
data: {{cacert: {}, crl: {}}}
",
        b64("PARTNERS-CERT"),
        b64("PARTNERS-KEY"),
        b64("NOT-THIS-CA"),
        b64("PARTNERS-CA"),
        b64("PARTNERS-CRL"),
    );
    let mut snap = load_dir(&fixtures())?;
    snap.resources
        .extend(parse_documents(&yaml, Path::new("secrets.yaml")).resources);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mesh = Mesh::new(&snap, MeshOptions::default());
    let cfg = mesh.proxy_config(&router(&[("istio", "ingressgateway")]));
    let text = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
        .as_ref()
        .and_then(|d| d.specifier.as_ref())
    {
        Some(Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).to_string(),
        other => panic!("not inline bytes: {other:?}"),
    };
    let mut served: Vec<String> = Vec::new();
    for s in &cfg.secrets {
        served.push(match &s.r#type {
            Some(Type::TlsCertificate(t)) => format!(
                "{}: {} {}",
                s.name,
                text(&t.certificate_chain),
                text(&t.private_key)
            ),
            Some(Type::ValidationContext(v)) => {
                format!("{}: {} {}", s.name, text(&v.trusted_ca), text(&v.crl))
            }
            other => panic!("{}: {other:?}", s.name),
        });
    }
    served.sort();
    assert_eq!(
        served,
        [
            "kubernetes://partners-cert-cacert: PARTNERS-CA PARTNERS-CRL",
            "kubernetes://partners-cert: PARTNERS-CERT PARTNERS-KEY",
            "kubernetes://shop-cert: SHOP-CERT SHOP-KEY",
        ]
    );

    // Without `NAME-cacert`, the CA is the credential's own `ca.crt`.
    snap.resources
        .retain(|r| r.meta.name != "partners-cert-cacert");
    let cfg = Mesh::new(&snap, MeshOptions::default())
        .proxy_config(&router(&[("istio", "ingressgateway")]));
    let ca = cfg
        .secrets
        .iter()
        .find(|s| s.name == "kubernetes://partners-cert-cacert")
        .expect("the CA from partners-cert");
    let Some(Type::ValidationContext(v)) = &ca.r#type else {
        panic!("{ca:?}")
    };
    assert_eq!(text(&v.trusted_ca), "NOT-THIS-CA");
    assert!(v.crl.is_none());

    // A gateway of another namespace gets none of istio-system's secrets.
    let mut other = router(&[("istio", "ingressgateway")]);
    other.namespace = "default".into();
    other.id = "router~10.1.1.98~ingress-2.default~default.svc.cluster.local".into();
    let cfg = Mesh::new(&snap, MeshOptions::default()).proxy_config(&other);
    let names: Vec<&str> = cfg.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["kubernetes://shop-cert"], "{names:?}");
    let Some(Type::TlsCertificate(t)) = &cfg.secrets[0].r#type else {
        panic!()
    };
    assert_eq!(text(&t.certificate_chain), "OTHER-NAMESPACE");

    // A Secret without the keys is not served.
    let broken = parse_documents(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-cert, namespace: istio-system}\nstringData: {tls.crt: ONLY-A-CERT}\n",
        Path::new("broken.yaml"),
    );
    snap.resources
        .retain(|r| !(r.meta.name == "shop-cert" && r.meta.namespace == "istio-system"));
    snap.resources.extend(broken.resources);
    let cfg = Mesh::new(&snap, MeshOptions::default())
        .proxy_config(&router(&[("istio", "ingressgateway")]));
    assert!(
        cfg.secrets
            .iter()
            .all(|s| s.name != "kubernetes://shop-cert"),
        "{:?}",
        cfg.secrets
    );
    Ok(())
}
