//! Gateways (`router~…` proxies) in istiod's layout: one listener per port
//! the selected Gateways' servers declare (`0.0.0.0_8080`). Plain HTTP
//! servers of a port share one connection manager with RDS `http.8080`,
//! whose virtual hosts are the hosts of the VirtualServices bound to those
//! Gateways; terminated HTTPS servers get a filter chain per server (SNI
//! from its hosts, the certificate from SDS, RDS
//! `https.443.PORTNAME.GATEWAY.NAMESPACE`); TLS PASSTHROUGH servers get one
//! SNI filter chain per VirtualService `tls` match, proxied as TCP; TCP
//! servers proxy to the VirtualService `tcp` routes. Clusters and endpoints
//! are the sidecar's outbound ones.
//! AuthorizationPolicies selecting the gateway pod put their RBAC filters on
//! every server chain, as on a sidecar's inbound chains.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, TransportSocket,
    config_source::ConfigSourceSpecifier,
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TrafficDirection, data_source, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, Route, RouteConfiguration, VirtualHost, route::Action,
    virtual_host::TlsRequirementType,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds,
    http_connection_manager::{ForwardClientCertDetails, RouteSpecifier},
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy,
    tcp_proxy::{
        ClusterSpecifier as TcpClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight,
    },
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    TlsCertificate,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
};
use envoy_types::pb::google::protobuf::BoolValue;

use super::listener::{
    HCM, TCP_PROXY, common_hcm, http_filter, listener_filter, typed_filter, with_path_normalization,
};
use super::route::{self, CORS_FILTER, FAULT_FILTER, binds, prefix_match};
use super::util::{ads, agent_sds, any, socket_address};
use super::{ProxyConfig, Scope, registry::selects};
use crate::istio::names;
use crate::istio::source::{Resource, Spec};
use crate::istio::types::networking::{
    RouteDestination, Server, ServerTlsMode, ServerTlsSettings, TlsMatchAttributes, VirtualService,
};

/// One server of a Gateway selecting this proxy.
struct GwServer<'a> {
    /// The Gateway as VirtualServices name it: `namespace/name`.
    gateway: String,
    namespace: &'a str,
    name: &'a str,
    server: &'a Server,
}

impl GwServer<'_> {
    fn protocol(&self) -> String {
        self.server.port.protocol.to_ascii_uppercase()
    }

    fn tls_mode(&self) -> Option<ServerTlsMode> {
        self.server
            .tls
            .as_ref()
            .map(|t| t.mode.unwrap_or(ServerTlsMode::Simple))
    }

    fn passthrough(&self) -> bool {
        matches!(
            self.tls_mode(),
            Some(ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough)
        )
    }

    /// Whether this server answers `host` written in a VirtualService of
    /// `vs_namespace`: server hosts may carry a `namespace/` prefix (`*`,
    /// `.` for the Gateway's own, or a name).
    fn host_for(&self, vs_namespace: &str, host: &str) -> Option<String> {
        self.server.hosts.iter().find_map(|h| {
            let (ns, pattern) = h.split_once('/').unwrap_or(("*", h));
            let ns_ok = match ns {
                "*" => true,
                "." => vs_namespace == self.namespace,
                other => other == vs_namespace,
            };
            if !ns_ok {
                return None;
            }
            // The narrower of the two names the virtual host.
            if names::host_matches(pattern, host) {
                Some(host.to_string())
            } else if names::host_matches(host, pattern) {
                Some(pattern.to_string())
            } else {
                None
            }
        })
    }

    /// The server's hosts as SNI names (`*` means any, so none).
    fn server_names(&self) -> Vec<String> {
        let names: Vec<String> = self
            .server
            .hosts
            .iter()
            .map(|h| h.split_once('/').map_or(h.as_str(), |(_, h)| h).to_string())
            .collect();
        if names.iter().any(|h| h == "*") {
            Vec::new()
        } else {
            names
        }
    }
}

/// The Gateways whose selector picks this proxy. A Gateway without a
/// selector applies to every gateway proxy.
fn servers<'a>(scope: &Scope<'a>) -> Vec<GwServer<'a>> {
    let mut out = Vec::new();
    for r in &scope.mesh.gateways {
        let Spec::Gateway(gw) = &r.spec else { continue };
        if !selects(&gw.selector, &scope.proxy.labels) {
            continue;
        }
        out.extend(gw.servers.iter().map(|server| GwServer {
            gateway: format!("{}/{}", r.meta.namespace, r.meta.name),
            namespace: &r.meta.namespace,
            name: &r.meta.name,
            server,
        }));
    }
    out
}

/// VirtualServices bound to `gateway` (in any namespace they are exported
/// to the gateway's namespace from), oldest first.
fn bound<'a>(scope: &Scope<'a>, gateway: &str) -> Vec<(&'a Resource, &'a VirtualService)> {
    let gw_ns = gateway.split_once('/').map_or("", |(ns, _)| ns);
    scope
        .mesh
        .virtual_services
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::VirtualService(vs)
                if binds(&vs.gateways, &r.meta.namespace, gateway)
                    && super::registry::exported_to(&vs.export_to, &r.meta.namespace, gw_ns) =>
            {
                Some((r, vs))
            }
            _ => None,
        })
        .collect()
}

pub(super) fn build(scope: &Scope<'_>, out: &mut ProxyConfig) {
    let mut by_port: BTreeMap<u32, Vec<GwServer<'_>>> = BTreeMap::new();
    for s in servers(scope) {
        by_port.entry(s.server.port.number).or_default().push(s);
    }
    // AuthorizationPolicies selecting the gateway pod guard every server.
    // JWT authentication first: the authorization filters read what it
    // verified.
    let mut http_authz: Vec<_> = scope
        .mesh
        .jwt_http_filter(scope.proxy)
        .into_iter()
        .collect();
    http_authz.extend(scope.mesh.authz_http_filters(scope.proxy));
    let network_authz = scope.mesh.authz_network_filters(scope.proxy);
    for (port, servers) in by_port {
        let mut chains = Vec::new();
        let mut plain_http = Vec::new();
        let mut tls = false;
        for s in &servers {
            let proto = s.protocol();
            match proto.as_str() {
                // Plain HTTP (with `httpsRedirect`, if any, on its hosts).
                "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => plain_http.push(s),
                "HTTPS" | "TLS" if s.tls_mode() == Some(ServerTlsMode::AutoPassthrough) => {
                    tls = true;
                    chains.extend(auto_passthrough_chains(scope, s));
                }
                "HTTPS" | "TLS" if s.passthrough() => {
                    tls = true;
                    chains.extend(passthrough_chains(scope, s, port));
                }
                "HTTPS" => {
                    tls = true;
                    let rds = format!(
                        "https.{port}.{}.{}.{}",
                        s.server.port.name, s.name, s.namespace
                    );
                    out.routes
                        .push(std::sync::Arc::new(route_config(scope, &rds, port, &[s])));
                    chains.push(FilterChain {
                        filter_chain_match: Some(FilterChainMatch {
                            server_names: s.server_names(),
                            ..Default::default()
                        }),
                        filters: vec![typed_filter(
                            HCM,
                            any(&with_path_normalization(scope, gateway_hcm(port, &rds))),
                        )],
                        transport_socket: downstream_tls(s, true),
                        name: rds.clone(),
                        ..Default::default()
                    });
                }
                "TLS" => {
                    tls = true;
                    if let Some(target) = tcp_target(scope, s, port) {
                        let mut chain = tcp_proxy_chain(
                            &format!("{}_{port}", s.gateway.replace('/', "_")),
                            target,
                        );
                        chain.filter_chain_match = Some(FilterChainMatch {
                            server_names: s.server_names(),
                            ..Default::default()
                        });
                        chain.transport_socket = downstream_tls(s, false);
                        chains.push(chain);
                    }
                }
                // TCP, MONGO and the like: raw TCP to the bound routes.
                _ => {
                    if let Some(target) = tcp_target(scope, s, port) {
                        chains.push(tcp_proxy_chain(
                            &format!("{}_{port}", s.gateway.replace('/', "_")),
                            target,
                        ));
                    }
                }
            }
        }
        if !plain_http.is_empty() {
            let rds = format!("http.{port}");
            out.routes.push(std::sync::Arc::new(route_config(
                scope,
                &rds,
                port,
                &plain_http,
            )));
            chains.push(FilterChain {
                filters: vec![typed_filter(
                    HCM,
                    any(&with_path_normalization(scope, gateway_hcm(port, &rds))),
                )],
                ..Default::default()
            });
        }
        if chains.is_empty() {
            // istiod drops a listener with nothing to serve.
            continue;
        }
        for chain in &mut chains {
            super::authz::apply(chain, &http_authz, &network_authz);
        }
        let bind = servers
            .iter()
            .find_map(|s| s.server.bind.clone())
            .unwrap_or_else(|| "0.0.0.0".into());
        out.listeners.push(Listener {
            name: format!("{bind}_{port}"),
            address: Some(socket_address(&bind, port)),
            filter_chains: chains,
            listener_filters: if tls {
                vec![listener_filter(
                    "envoy.filters.listener.tls_inspector",
                    any(&TlsInspector::default()),
                )]
            } else {
                Vec::new()
            },
            traffic_direction: TrafficDirection::Outbound as i32,
            ..Default::default()
        });
    }
}

/// The connection manager of a gateway server: routes from RDS `rds`, the
/// client's address as the remote address (the gateway is the edge).
fn gateway_hcm(port: u32, rds: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: format!("outbound_0.0.0.0_{port}"),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: rds.into(),
        })),
        http_filters: vec![
            http_filter(FAULT_FILTER, any(&HttpFault::default())),
            http_filter(CORS_FILTER, any(&Cors::default())),
            http_filter("envoy.filters.http.router", any(&Router::default())),
        ],
        use_remote_address: Some(BoolValue { value: true }),
        forward_client_cert_details: ForwardClientCertDetails::SanitizeSet as i32,
        server_name: "istio-envoy".into(),
        ..common_hcm()
    }
}

/// The route configuration `name` for HTTP servers `servers` (all on
/// `port`): one virtual host per host of the VirtualServices bound to
/// their Gateways, `host:port` named, or istiod's 404 `blackhole:PORT`
/// when none is.
fn route_config(
    scope: &Scope<'_>,
    name: &str,
    port: u32,
    servers: &[&GwServer<'_>],
) -> RouteConfiguration {
    let mut hosts: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    let mut redirect = BTreeSet::new();
    let mut seen_vs = BTreeSet::new();
    for s in servers {
        for (r, vs) in bound(scope, &s.gateway) {
            for h in &vs.hosts {
                let Some(host) = s.host_for(&r.meta.namespace, h) else {
                    continue;
                };
                // One VirtualService listed by two servers routes once.
                if !seen_vs.insert((r.key(), host.clone())) {
                    continue;
                }
                let target = vs
                    .http
                    .iter()
                    .flat_map(|rule| rule.route.first())
                    .next()
                    .map(|d| {
                        names::resolve_host(
                            &d.destination.host,
                            &r.meta.namespace,
                            &scope.mesh.options.domain,
                        )
                    })
                    .unwrap_or_else(|| host.clone());
                let routes = route::vs_routes(scope, &target, port, r, vs, &s.gateway);
                if routes.is_empty() {
                    continue;
                }
                if s.server.tls.as_ref().is_some_and(|t| t.https_redirect) {
                    redirect.insert(host.clone());
                }
                // Several VirtualServices for one host on a gateway are
                // merged, the older one's routes first, as istiod does.
                hosts.entry(host).or_default().extend(routes);
            }
        }
    }
    let mut virtual_hosts: Vec<VirtualHost> = hosts
        .into_iter()
        .map(|(host, routes)| VirtualHost {
            name: format!("{host}:{port}"),
            domains: if host == "*" {
                vec!["*".into()]
            } else {
                vec![host.clone(), format!("{host}:*")]
            },
            require_tls: if redirect.contains(&host) {
                TlsRequirementType::All as i32
            } else {
                TlsRequirementType::None as i32
            },
            routes,
            include_request_attempt_count: true,
            ..Default::default()
        })
        .collect();
    if virtual_hosts.is_empty() {
        virtual_hosts.push(VirtualHost {
            name: format!("blackhole:{port}"),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "default".into(),
                r#match: Some(prefix_match("/")),
                action: Some(Action::DirectResponse(DirectResponseAction {
                    status: 404,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            include_request_attempt_count: true,
            ..Default::default()
        });
    }
    RouteConfiguration {
        name: name.into(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// A secret istiod serves itself over ADS (`kubernetes://NAME`, read from
/// the Kubernetes Secret named by `credentialName`).
fn credential_sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: format!("kubernetes://{name}"),
        sds_config: Some(ConfigSource {
            config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

/// The server side of a terminated TLS server: SIMPLE (certificate from
/// `credentialName`), MUTUAL (plus the client CA `NAME-cacert`, client
/// certificate required), ISTIO_MUTUAL (the mesh certificate and root).
fn downstream_tls(s: &GwServer<'_>, http: bool) -> Option<TransportSocket> {
    let tls = s.server.tls.as_ref()?;
    let mode = tls.mode.unwrap_or(ServerTlsMode::Simple);
    let mut common = CommonTlsContext {
        alpn_protocols: if http {
            vec!["h2".into(), "http/1.1".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let mut require_client = false;
    let credential = tls
        .credential_name
        .clone()
        .or_else(|| tls.credential_names.first().cloned());
    match mode {
        ServerTlsMode::IstioMutual => {
            require_client = true;
            common.tls_certificate_sds_secret_configs = vec![agent_sds("default")];
            common.validation_context_type =
                Some(ValidationContextType::CombinedValidationContext(
                    CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext::default()),
                        validation_context_sds_secret_config: Some(agent_sds("ROOTCA")),
                        ..Default::default()
                    },
                ));
        }
        ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => {
            require_client = mode == ServerTlsMode::Mutual;
            match credential {
                Some(cred) => {
                    common.tls_certificate_sds_secret_configs = vec![credential_sds(&cred)];
                    let ca = tls
                        .ca_cert_credential_name
                        .clone()
                        .unwrap_or_else(|| format!("{cred}-cacert"));
                    common.validation_context_type =
                        Some(ValidationContextType::CombinedValidationContext(
                            CombinedCertificateValidationContext {
                                default_validation_context: Some(
                                    CertificateValidationContext::default(),
                                ),
                                validation_context_sds_secret_config: Some(credential_sds(&ca)),
                                ..Default::default()
                            },
                        ));
                }
                None => {
                    common.tls_certificates = file_certificate(tls);
                    common.validation_context_type = Some(
                        ValidationContextType::ValidationContext(CertificateValidationContext {
                            trusted_ca: tls.ca_certificates.as_deref().map(file),
                            ..Default::default()
                        }),
                    );
                }
            }
        }
        _ => match credential {
            Some(cred) => common.tls_certificate_sds_secret_configs = vec![credential_sds(&cred)],
            None => common.tls_certificates = file_certificate(tls),
        },
    }
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: require_client.then_some(BoolValue { value: true }),
        ..Default::default()
    };
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
    })
}

fn file(path: &str) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    }
}

/// The certificate of a server that names files (`serverCertificate`,
/// `privateKey`) rather than a Kubernetes Secret.
fn file_certificate(tls: &ServerTlsSettings) -> Vec<TlsCertificate> {
    match (&tls.server_certificate, &tls.private_key) {
        (Some(cert), Some(key)) => vec![TlsCertificate {
            certificate_chain: Some(file(cert)),
            private_key: Some(file(key)),
            ..Default::default()
        }],
        _ => Vec::new(),
    }
}

fn tcp_proxy_chain(stat_prefix: &str, target: TcpClusterSpecifier) -> FilterChain {
    FilterChain {
        filters: vec![typed_filter(
            TCP_PROXY,
            any(&TcpProxy {
                stat_prefix: stat_prefix.into(),
                cluster_specifier: Some(target),
                ..Default::default()
            }),
        )],
        ..Default::default()
    }
}

/// The TCP proxy target of L4 `routes` written in `namespace`: one
/// cluster, or weighted clusters (zero weights dropped).
pub(super) fn l4_target(
    scope: &Scope<'_>,
    routes: &[RouteDestination],
    namespace: &str,
    port: u32,
) -> Option<TcpClusterSpecifier> {
    let dests: Vec<_> = routes
        .iter()
        .filter(|d| d.weight.unwrap_or(0) > 0 || routes.len() == 1)
        .collect();
    match dests.as_slice() {
        [] => None,
        [one] => Some(TcpClusterSpecifier::Cluster(
            route::cluster_for(scope, &one.destination, namespace, port).0,
        )),
        many => Some(TcpClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|d| ClusterWeight {
                    name: route::cluster_for(scope, &d.destination, namespace, port).0,
                    weight: d.weight.unwrap_or(0).max(0) as u32,
                    ..Default::default()
                })
                .collect(),
        })),
    }
}

/// The first `tcp` rule of a VirtualService bound to this server that
/// applies on `port`.
fn tcp_target(scope: &Scope<'_>, s: &GwServer<'_>, port: u32) -> Option<TcpClusterSpecifier> {
    for (r, vs) in bound(scope, &s.gateway) {
        let ns = r.meta.namespace.as_str();
        if !vs.hosts.iter().any(|h| s.host_for(ns, h).is_some()) {
            continue;
        }
        let vs_bound = binds(&vs.gateways, ns, &s.gateway);
        for rule in &vs.tcp {
            let applies = if rule.match_.is_empty() {
                vs_bound
            } else {
                rule.match_.iter().any(|m| {
                    (if m.gateways.is_empty() {
                        vs_bound
                    } else {
                        binds(&m.gateways, ns, &s.gateway)
                    }) && m.port.is_none_or(|p| p == port)
                })
            };
            if applies && let Some(t) = l4_target(scope, &rule.route, ns, port) {
                return Some(t);
            }
        }
    }
    None
}

/// Whether a TLS match applies under `binding` on `port`.
pub(super) fn tls_match_applies(
    m: &TlsMatchAttributes,
    ns: &str,
    binding: &str,
    vs_bound: bool,
    port: u32,
) -> bool {
    (if m.gateways.is_empty() {
        vs_bound
    } else {
        binds(&m.gateways, ns, binding)
    }) && m.port.is_none_or(|p| p == port)
}

/// AUTO_PASSTHROUGH (east-west gateways): no VirtualService; the client
/// sidecar's SNI `outbound_.PORT_.SUBSET_.HOST` names the cluster, so
/// every service port (and subset) the server's hosts cover gets a chain.
fn auto_passthrough_chains(scope: &Scope<'_>, s: &GwServer<'_>) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    for svc in &scope.services {
        if s.host_for(&svc.namespace, &svc.host).is_none() {
            continue;
        }
        let subsets: Vec<&str> = std::iter::once("")
            .chain(scope.subsets(svc).iter().map(|ss| ss.name.as_str()))
            .collect();
        for p in &svc.ports {
            for subset in &subsets {
                let cluster = names::outbound_cluster(p.port, subset, &svc.host);
                let mut chain =
                    tcp_proxy_chain(&cluster, TcpClusterSpecifier::Cluster(cluster.clone()));
                chain.filter_chain_match = Some(FilterChainMatch {
                    server_names: vec![format!("outbound_.{}_.{subset}_.{}", p.port, svc.host)],
                    ..Default::default()
                });
                chains.push(chain);
            }
        }
    }
    chains
}

/// PASSTHROUGH: one filter chain per `tls` rule of the bound
/// VirtualServices, selected by SNI (`sniHosts`), proxied as TCP.
fn passthrough_chains(scope: &Scope<'_>, s: &GwServer<'_>, port: u32) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    let mut taken = BTreeSet::new();
    for (r, vs) in bound(scope, &s.gateway) {
        let ns = r.meta.namespace.as_str();
        let vs_bound = binds(&vs.gateways, ns, &s.gateway);
        for rule in &vs.tls {
            let mut sni: Vec<String> = rule
                .match_
                .iter()
                .filter(|m| tls_match_applies(m, ns, &s.gateway, vs_bound, port))
                .flat_map(|m| m.sni_hosts.iter())
                .filter(|h| s.host_for(ns, h).is_some())
                .cloned()
                .collect();
            // Envoy refuses two chains with the same match.
            sni.retain(|h| taken.insert(h.clone()));
            if sni.is_empty() {
                continue;
            }
            let Some(target) = l4_target(scope, &rule.route, ns, port) else {
                continue;
            };
            let stat = match &target {
                TcpClusterSpecifier::Cluster(c) => c.clone(),
                TcpClusterSpecifier::WeightedClusters(_) => format!("{}_{port}", s.name),
            };
            let mut chain = tcp_proxy_chain(&stat, target);
            sni.sort();
            chain.filter_chain_match = Some(FilterChainMatch {
                server_names: sni,
                ..Default::default()
            });
            chains.push(chain);
        }
    }
    chains
}
