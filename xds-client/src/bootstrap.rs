//! The Envoy bootstrap file (YAML or JSON): its static resources become the
//! first snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::bootstrap::v3 as bootstrap_pb;
use ferry_model::Snapshot;

use crate::convert::{self, ConvertError, Warnings};

/// A loaded bootstrap: the proto (for `/config_dump`), the snapshot built from
/// its static resources, and what was skipped on the way.
#[derive(Debug)]
pub struct Bootstrap {
    pub proto: bootstrap_pb::Bootstrap,
    pub snapshot: Snapshot,
    pub admin_address: Option<SocketAddr>,
    pub warnings: Warnings,
    /// The ADS client's settings, when the bootstrap has `dynamic_resources`.
    pub ads: Option<crate::ads::AdsConfig>,
    /// `admin.access_log`: where admin requests are logged.
    pub admin_access_logs: std::sync::Arc<ferry_model::access_log::AccessLogs>,
    /// `tracing.http`: the tracer of connection managers whose `tracing`
    /// names none.
    pub tracing: Option<std::sync::Arc<ferry_model::tracing::Provider>>,
    /// `layered_runtime`, also installed as the process's runtime.
    pub runtime: crate::runtime::Runtime,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML or JSON: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {message}")]
    Schema { path: String, message: String },
    #[error("{path}: {source}")]
    Convert { path: String, source: ConvertError },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

pub fn load_bootstrap(path: &Path) -> Result<Bootstrap, BootstrapError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
        path: p.clone(),
        source,
    })?;
    parse_bootstrap(&p, &text)
}

/// Parses bootstrap text; `origin` names it in errors.
pub fn parse_bootstrap(origin: &str, text: &str) -> Result<Bootstrap, BootstrapError> {
    // YAML is a superset of JSON, so one parser serves both forms.
    let value: serde_json::Value =
        serde_yaml_ng::from_str(text).map_err(|e| BootstrapError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
    let proto: bootstrap_pb::Bootstrap =
        crate::json::from_json("envoy.config.bootstrap.v3.Bootstrap", value).map_err(
            |message| BootstrapError::Schema {
                path: origin.to_string(),
                message,
            },
        )?;
    let mut warnings = Warnings::default();
    let conv = |source| BootstrapError::Convert {
        path: origin.to_string(),
        source,
    };
    // The runtime is installed before any resource is converted: the
    // converters read the values a `runtime_key` names, and the RE2 limit.
    let runtime = convert::bootstrap_fields(&proto, &mut warnings).map_err(conv)?;
    crate::runtime::install(runtime.clone());
    let statics = proto.static_resources.clone().unwrap_or_default();
    let ads = ads_config(&proto).map_err(|message| BootstrapError::Invalid {
        path: origin.to_string(),
        message,
    })?;
    // The management server's own clusters (often Unix sockets) serve the
    // client, not the data path.
    let control_clusters: Vec<String> = ads_cluster_names(&proto);
    let mut listeners = Vec::with_capacity(statics.listeners.len());
    for (i, l) in statics.listeners.iter().enumerate() {
        let named;
        let l = if l.name.is_empty() {
            // Envoy names a static listener given none itself (an internal
            // id); Ferry names it after its address, as stats do.
            let mut copy = l.clone();
            copy.name = unnamed_listener_name(&copy, i);
            named = copy;
            &named
        } else {
            l
        };
        let l = convert::listener(l, &mut warnings).map_err(conv)?;
        if listeners
            .iter()
            .any(|x: &Arc<ferry_model::Listener>| x.name == l.name)
        {
            return Err(BootstrapError::Invalid {
                path: origin.to_string(),
                message: format!("listener {:?}: name: duplicate listener name", l.name),
            });
        }
        listeners.push(Arc::new(l));
    }
    let mut clusters = ferry_model::ShardedMap::with_capacity(statics.clusters.len());
    for c in statics
        .clusters
        .iter()
        .filter(|c| !control_clusters.contains(&c.name))
    {
        let c = convert::cluster(c, &mut warnings).map_err(conv)?;
        if clusters.contains_key(&c.name) {
            return Err(BootstrapError::Invalid {
                path: origin.to_string(),
                message: format!("cluster {:?}: name: duplicate cluster name", c.name),
            });
        }
        clusters.insert(c.name.clone(), Arc::new(c));
    }
    let mut secrets = HashMap::with_capacity(statics.secrets.len());
    for sec in &statics.secrets {
        let model = convert::secret(sec, &mut warnings).map_err(conv)?;
        if secrets.insert(sec.name.clone(), Arc::new(model)).is_some() {
            return Err(BootstrapError::Invalid {
                path: origin.to_string(),
                message: format!("secret {:?}: name: duplicate secret name", sec.name),
            });
        }
    }
    let mut ads = ads;
    if let Some(a) = ads.as_mut() {
        a.secrets = secrets.clone();
    }
    let snapshot = Snapshot {
        version: format!("static:{origin}"),
        listeners,
        clusters,
        routes: HashMap::new(),
        secrets,
        ..Default::default()
    };
    if ads.is_none() {
        // Without xDS, every secret named must be a static one.
        for name in crate::store::sds_names(&snapshot.listeners, snapshot.clusters.values()) {
            if !snapshot.secrets.contains_key(&name) {
                return Err(BootstrapError::Invalid {
                    path: origin.to_string(),
                    message: format!(
                        "secret {name:?}: unknown static secret (SDS over ADS needs dynamic_resources)"
                    ),
                });
            }
        }
        // Without xDS nothing will ever fill RDS or EDS references.
        for l in &snapshot.listeners {
            for c in l.filter_chains.iter().chain(l.default_chain.iter()) {
                if let ferry_model::ChainKind::Http(h) = &c.kind
                    && let ferry_model::RouteSource::Rds(name) = &h.routes
                {
                    return Err(BootstrapError::Invalid {
                        path: origin.to_string(),
                        message: format!(
                            "listener {:?}: filter chain {:?}: route configuration {name:?} by RDS needs dynamic_resources",
                            l.name, c.name
                        ),
                    });
                }
            }
        }
        for c in snapshot.clusters.values() {
            if matches!(c.kind, ferry_model::ClusterKind::Eds { .. }) {
                return Err(BootstrapError::Invalid {
                    path: origin.to_string(),
                    message: format!("cluster {:?}: type: EDS needs dynamic_resources", c.name),
                });
            }
        }
        snapshot.validate().map_err(|e| BootstrapError::Invalid {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
    }
    let admin_address = proto
        .admin
        .as_ref()
        .and_then(|a| a.address.as_ref())
        .and_then(|a| match &a.address {
            Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) => {
                let port = match sa.port_specifier {
                    Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => {
                        u16::try_from(p).ok()?
                    }
                    _ => return None,
                };
                Some(SocketAddr::new(sa.address.parse().ok()?, port))
            }
            _ => None,
        });
    let admin_access_logs = match &proto.admin {
        Some(a) => convert::admin_access_logs(a, &mut warnings).map_err(conv)?,
        None => Default::default(),
    };
    // Deprecated in Envoy's API, still what istiod's bootstraps carry.
    #[allow(deprecated)]
    let tracing = match &proto.tracing {
        Some(t) => convert::bootstrap_provider(t, &mut warnings).map_err(conv)?,
        None => None,
    };
    Ok(Bootstrap {
        proto,
        snapshot,
        admin_address,
        warnings,
        ads,
        admin_access_logs,
        tracing,
        runtime,
    })
}

/// The name istio-agent gives the static cluster of its SDS server.
pub const AGENT_SDS_CLUSTER: &str = "sds-grpc";

/// The agent's SDS server, when the bootstrap has istio-agent's layout: a
/// static `sds-grpc` cluster whose endpoint is a Unix socket (`pipe`)
/// that is not the ADS server's. Ferry under a real istio-agent fetches the
/// workload certificate and root from it, as Envoy does.
pub fn agent_sds_target(proto: &bootstrap_pb::Bootstrap) -> Option<crate::ads::XdsTarget> {
    use envoy_types::pb::envoy::config::core::v3::address::Address as A;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    if ads_cluster_names(proto)
        .iter()
        .any(|n| n == AGENT_SDS_CLUSTER)
    {
        return None;
    }
    let cluster = proto
        .static_resources
        .iter()
        .flat_map(|s| s.clusters.iter())
        .find(|c| c.name == AGENT_SDS_CLUSTER)?;
    cluster
        .load_assignment
        .iter()
        .flat_map(|la| la.endpoints.iter())
        .flat_map(|e| e.lb_endpoints.iter())
        .find_map(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) => match ep.address.as_ref()?.address.as_ref()? {
                A::Pipe(p) => Some(crate::ads::XdsTarget::Unix(p.path.clone().into())),
                _ => None,
            },
            _ => None,
        })
}

fn ads_cluster_names(proto: &bootstrap_pb::Bootstrap) -> Vec<String> {
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    proto
        .dynamic_resources
        .iter()
        .flat_map(|d| d.ads_config.iter())
        .flat_map(|a| a.grpc_services.iter())
        .filter_map(|g| match &g.target_specifier {
            Some(TargetSpecifier::EnvoyGrpc(e)) => Some(e.cluster_name.clone()),
            _ => None,
        })
        .collect()
}

/// The ADS client's settings from `dynamic_resources`: ADS over gRPC (SotW or
/// delta) to a static cluster, LDS and CDS through it.
fn ads_config(proto: &bootstrap_pb::Bootstrap) -> Result<Option<crate::ads::AdsConfig>, String> {
    use envoy_types::pb::envoy::config::core::v3::address::Address as A;
    use envoy_types::pb::envoy::config::core::v3::api_config_source::ApiType;
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let Some(dynamic) = &proto.dynamic_resources else {
        return Ok(None);
    };
    let Some(ads) = &dynamic.ads_config else {
        return Err("dynamic_resources.ads_config: only ADS is supported".into());
    };
    let delta = match ApiType::try_from(ads.api_type) {
        Ok(ApiType::Grpc) | Ok(ApiType::AggregatedGrpc) => false,
        Ok(ApiType::DeltaGrpc) | Ok(ApiType::AggregatedDeltaGrpc) => true,
        _ => {
            return Err(format!(
                "dynamic_resources.ads_config.api_type: {} is not supported (GRPC or DELTA_GRPC)",
                ads.api_type
            ));
        }
    };
    for (field, src) in [
        ("lds_config", &dynamic.lds_config),
        ("cds_config", &dynamic.cds_config),
    ] {
        match src
            .as_ref()
            .and_then(|s| s.config_source_specifier.as_ref())
        {
            Some(ConfigSourceSpecifier::Ads(_)) | None => {}
            Some(_) => {
                return Err(format!(
                    "dynamic_resources.{field}: only `ads: {{}}` is supported"
                ));
            }
        }
    }
    let cluster_name = ads_cluster_names(proto).into_iter().next().ok_or(
        "dynamic_resources.ads_config.grpc_services[0]: an envoy_grpc cluster is required",
    )?;
    let cluster = proto
        .static_resources
        .iter()
        .flat_map(|s| s.clusters.iter())
        .find(|c| c.name == cluster_name)
        .ok_or_else(|| {
            format!(
                "dynamic_resources.ads_config: cluster {cluster_name:?} is not a static cluster"
            )
        })?;
    let address = cluster
        .load_assignment
        .iter()
        .flat_map(|la| la.endpoints.iter())
        .flat_map(|e| e.lb_endpoints.iter())
        .find_map(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) => {
                ep.address.as_ref().and_then(|a| a.address.clone())
            }
            _ => None,
        })
        .ok_or_else(|| format!("cluster {cluster_name:?}: load_assignment: no endpoint address"))?;
    let target = match address {
        A::SocketAddress(sa) => {
            let port = match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => p,
                _ => return Err(format!("cluster {cluster_name:?}: port_value is required")),
            };
            let host = if sa.address.contains(':') {
                format!("[{}]", sa.address)
            } else {
                sa.address.clone()
            };
            crate::ads::XdsTarget::Tcp(format!("{host}:{port}"))
        }
        A::Pipe(p) => crate::ads::XdsTarget::Unix(p.path.into()),
        _ => {
            return Err(format!(
                "cluster {cluster_name:?}: unsupported address kind"
            ));
        }
    };
    // TLS to the management server: the cluster's UpstreamTlsContext, whose
    // secrets are inline, files, or static secrets of the bootstrap.
    let tls = match &cluster.transport_socket {
        Some(_) => {
            let mut warnings = Warnings::default();
            convert::cluster(cluster, &mut warnings)
                .map_err(|e| e.to_string())?
                .tls
                .map(|t| *t)
        }
        None => None,
    };
    let fetch = dynamic
        .cds_config
        .as_ref()
        .and_then(|c| c.initial_fetch_timeout.as_ref())
        .map(|d| std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32));
    let initial_fetch_timeout = match fetch {
        None => std::time::Duration::from_secs(15),
        // Zero disables the timeout: wait as long as it takes.
        Some(d) if d.is_zero() => std::time::Duration::from_secs(365 * 24 * 3600),
        Some(d) => d,
    };
    Ok(Some(crate::ads::AdsConfig {
        target,
        delta,
        node: proto.node.clone().unwrap_or_default(),
        initial_fetch_timeout,
        tls,
        secrets: HashMap::new(),
        local_secrets: None,
        agent_sds: None,
        name_table: None,
    }))
}

/// The name of a static listener given none: its socket address
/// (`0.0.0.0_15090`), else its place in the bootstrap.
fn unnamed_listener_name(
    l: &envoy_types::pb::envoy::config::listener::v3::Listener,
    i: usize,
) -> String {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
    match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(PortSpecifier::PortValue(p)) => format!("{}_{p}", sa.address),
            _ => format!("{}_listener_{i}", sa.address),
        },
        _ => format!("static_listener_{i}"),
    }
}

/// The bootstrap's resources in Envoy's `/config_dump` shape
/// (`envoy.admin.v3.ConfigDump` as JSON): the bootstrap itself, then the
/// static listeners, clusters and route configurations.
pub fn config_dump(
    proto: &bootstrap_pb::Bootstrap,
    last_updated: &str,
) -> Result<serde_json::Value, String> {
    use serde_json::json;
    // One descriptor pool for the whole dump.
    let d = crate::json::Descriptors::load()?;
    let t = |name: &str| format!("type.googleapis.com/envoy.admin.v3.{name}");
    // Each resource carries its `@type`, as Envoy's dump shows the `Any`.
    let typed = |name: &str, v: serde_json::Value| -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("@type".into(), json!(format!("type.googleapis.com/{name}")));
        if let serde_json::Value::Object(m) = v {
            o.extend(m);
        }
        serde_json::Value::Object(o)
    };
    let statics = proto.static_resources.clone().unwrap_or_default();
    let mut listeners = Vec::new();
    for l in &statics.listeners {
        listeners.push(json!({
            "listener": typed("envoy.config.listener.v3.Listener", d.to_json("envoy.config.listener.v3.Listener", l)?),
            "last_updated": last_updated,
        }));
    }
    let mut clusters = Vec::new();
    for c in &statics.clusters {
        clusters.push(json!({
            "cluster": typed("envoy.config.cluster.v3.Cluster", d.to_json("envoy.config.cluster.v3.Cluster", c)?),
            "last_updated": last_updated,
        }));
    }
    let mut secrets = Vec::new();
    for s in &statics.secrets {
        secrets.push(json!({
            "name": s.name,
            "secret": typed("envoy.extensions.transport_sockets.tls.v3.Secret", d.to_json("envoy.extensions.transport_sockets.tls.v3.Secret", s)?),
            "last_updated": last_updated,
        }));
    }
    let mut dump = json!({
        "configs": [
            {
                "@type": t("BootstrapConfigDump"),
                "bootstrap": d.to_json("envoy.config.bootstrap.v3.Bootstrap", proto)?,
                "last_updated": last_updated,
            },
            {"@type": t("ListenersConfigDump"), "static_listeners": listeners},
            {"@type": t("ClustersConfigDump"), "static_clusters": clusters},
            {"@type": t("SecretsConfigDump"), "static_secrets": secrets},
        ]
    });
    // Key material never leaves the process, as Envoy redacts it.
    crate::dump::redact(&mut dump);
    Ok(dump)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 15000}}
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: backend, timeout: 0s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: tcp
    address: {socket_address: {address: 0.0.0.0, port_value: 9000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: backend
  clusters:
  - name: backend
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9090}}}
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
"#;

    fn err(text: &str) -> String {
        parse_bootstrap("test.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn loads_static_resources() {
        let b = parse_bootstrap("test.yaml", GOOD).unwrap();
        assert_eq!(b.snapshot.listeners.len(), 2);
        assert_eq!(b.admin_address, Some("127.0.0.1:15000".parse().unwrap()));
        let c = b.snapshot.cluster("backend").unwrap();
        assert!(
            matches!(&c.kind, ferry_model::ClusterKind::Static(e) if e[0].address.ip().map(|a| a.port()) == Some(9090))
        );
        assert!(matches!(
            b.snapshot.cluster("passthrough").unwrap().kind,
            ferry_model::ClusterKind::OriginalDst
        ));
        let l = b.snapshot.listener("http").unwrap();
        let ferry_model::ChainKind::Http(h) = &l.filter_chains[0].kind else {
            panic!("expected HCM")
        };
        let rc = b.snapshot.route_config(&h.routes).unwrap();
        let route = rc.find_route("x", "/a", &http::HeaderMap::new());
        assert!(route.is_some());
    }

    /// A static listener without a name is named after its address, as
    /// Envoy names such a listener itself.
    #[test]
    fn unnamed_static_listeners_are_named() {
        let b = parse_bootstrap(
            "test.yaml",
            &GOOD.replace("  - name: tcp\n    address", "  - address"),
        )
        .unwrap();
        assert!(b.snapshot.listener("0.0.0.0_9000").is_some());
        assert!(b.snapshot.listener("http").is_some());
    }

    #[test]
    fn errors_name_resource_and_field() {
        let e = err(&GOOD.replace("port_value: 9090", "port_value: 99999"));
        assert!(
            e.contains("cluster \"backend\"") && e.contains("port_value"),
            "{e}"
        );

        let e = err(&GOOD.replace("stat_prefix: tcp", "stat_prefx: tcp"));
        assert!(
            e.contains("static_resources.listeners[1].filter_chains[0].filters[0].typed_config")
                && e.contains("stat_prefx"),
            "{e}"
        );

        let e = err(&GOOD.replace(
            "cluster: backend\n  clusters",
            "cluster: nowhere\n  clusters",
        ));
        assert!(
            e.contains("listener \"tcp\"") && e.contains("unknown cluster \"nowhere\""),
            "{e}"
        );

        let e = err(&GOOD.replace("{prefix: \"/\"}", "{safe_regex: {regex: \"([a-z\"}}"));
        assert!(
            e.contains("listener \"http\"")
                && e.contains("routes[0].match.safe_regex.regex")
                && e.contains("invalid regex"),
            "{e}"
        );

        let e = err(&GOOD.replace(
            "      - name: envoy.filters.http.router\n",
            "      - name: envoy.filters.http.lua\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua\n          - name: envoy.filters.http.router\n",
        ));
        assert!(
            e.contains("http_filters[0]")
                && e.contains("unsupported http filter \"envoy.filters.http.lua\""),
            "{e}"
        );

        let e = err("static_resources: [");
        assert!(e.contains("not valid YAML"), "{e}");
    }

    #[test]
    fn optional_unknown_http_filter_is_skipped_with_warning() {
        let text = GOOD.replace(
            "      - name: envoy.filters.http.router\n",
            "      - name: envoy.filters.http.lua\n            is_optional: true\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua\n          - name: envoy.filters.http.router\n",
        );
        let b = parse_bootstrap("test.yaml", &text).unwrap();
        assert_eq!(b.warnings.0.len(), 1, "{:?}", b.warnings);
        assert!(b.warnings.0[0].contains("envoy.filters.http.lua"));
    }

    #[test]
    fn istio_stats_reporter_follows_the_listener_direction() {
        let text = GOOD
            .replace(
                "  - name: http\n",
                "  - name: http\n    traffic_direction: INBOUND\n",
            )
            .replace(
                "          - name: envoy.filters.http.router\n",
                "          - name: istio.stats\n            typed_config:\n              \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n              type_url: type.googleapis.com/stats.PluginConfig\n              value: {disable_host_header_fallback: true}\n          - name: envoy.filters.http.router\n",
            )
            .replace(
                "      - name: envoy.filters.network.tcp_proxy\n",
                "      - name: istio.stats\n        typed_config:\n          \"@type\": type.googleapis.com/stats.PluginConfig\n      - name: envoy.filters.network.tcp_proxy\n",
            );
        let b = parse_bootstrap("test.yaml", &text).unwrap();
        assert!(b.warnings.0.is_empty(), "{:?}", b.warnings);
        let stats = |name: &str| {
            b.snapshot.listener(name).unwrap().filter_chains[0]
                .istio_stats
                .unwrap()
        };
        assert_eq!(
            stats("http"),
            ferry_model::IstioStats {
                reporter: ferry_model::Reporter::Destination,
                disable_host_header_fallback: true,
            }
        );
        assert_eq!(stats("tcp").reporter, ferry_model::Reporter::Source);
        let plain = parse_bootstrap("test.yaml", GOOD).unwrap();
        assert!(
            plain.snapshot.listener("tcp").unwrap().filter_chains[0]
                .istio_stats
                .is_none()
        );
    }
}
