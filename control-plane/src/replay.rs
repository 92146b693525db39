//! Resources from Envoy's own files, to serve over ADS: the replay of an
//! Envoy `/config_dump` (`envoy.admin.v3.ConfigDump`, what a real control
//! plane such as istiod sent that Envoy) and the static resources of an Envoy
//! bootstrap (the same configuration statically and over xDS, for tests).
//! The result is a per-type list of named `Any`s ready for the [`Cache`].

use std::collections::{HashMap, HashSet};
use std::path::Path;

use envoy_types::pb::envoy::admin::v3::{
    ClustersConfigDump, ConfigDump, EndpointsConfigDump, ListenersConfigDump, RoutesConfigDump,
    SecretsConfigDump, UpdateFailureState,
};
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use crate::xds::{self, Cache, to_any};

/// Named resources of one type.
pub type Named = Vec<(String, Any)>;

/// The resources to serve, per xDS type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub listeners: Named,
    pub clusters: Named,
    pub routes: Named,
    /// ClusterLoadAssignments, one per EDS cluster, named as the cluster
    /// asks for them (`eds_cluster_config.service_name`, else its name).
    pub endpoints: Named,
    pub secrets: Named,
}

impl Resources {
    /// Each list with its type URL.
    pub fn by_type(&self) -> [(&'static str, &Named); 5] {
        [
            (xds::CLUSTER, &self.clusters),
            (xds::ENDPOINT, &self.endpoints),
            (xds::LISTENER, &self.listeners),
            (xds::ROUTE, &self.routes),
            (xds::SECRET, &self.secrets),
        ]
    }

    /// Replaces the cache's resources of all five types with these (empty
    /// types too, so a client's wildcard requests are answered).
    pub fn load_into(&self, cache: &Cache) {
        for (url, items) in self.by_type() {
            cache.set(url, items.iter().cloned());
        }
    }
}

/// What a replay includes.
#[derive(Clone, Copy, Debug)]
pub struct ReplayOptions {
    /// Also serve the dump's `static_*` resources (from the bootstrap of the
    /// Envoy that was dumped). Unnamed static listeners are named
    /// `<address>_<port>`, unnamed static route configurations
    /// `static_route_config_<n>`.
    pub include_static: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            include_static: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON or YAML: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {message}")]
    Schema { path: String, message: String },
    #[error("{path}: {what}: {source}")]
    Decode {
        path: String,
        what: String,
        source: prost::DecodeError,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

/// Loads an Envoy `/config_dump` file (JSON or YAML).
pub fn load_config_dump(path: &Path, opts: ReplayOptions) -> Result<Resources, ReplayError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
        path: origin.clone(),
        source,
    })?;
    parse_config_dump(&origin, &text, opts)
}

/// Parses config dump text; `origin` names it in errors.
pub fn parse_config_dump(
    origin: &str,
    text: &str,
    opts: ReplayOptions,
) -> Result<Resources, ReplayError> {
    let value = parse_value(origin, text)?;
    let dump: ConfigDump = ferry_envoy_json::from_json("envoy.admin.v3.ConfigDump", value)
        .map_err(|message| ReplayError::Schema {
            path: origin.to_string(),
            message,
        })?;
    from_config_dump(origin, &dump, opts)
}

/// Loads the static listeners, clusters and secrets of an Envoy bootstrap.
pub fn load_bootstrap(path: &Path) -> Result<Resources, ReplayError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
        path: origin.clone(),
        source,
    })?;
    parse_bootstrap(&origin, &text)
}

/// Parses bootstrap text (JSON or YAML); `origin` names it in errors.
pub fn parse_bootstrap(origin: &str, text: &str) -> Result<Resources, ReplayError> {
    let value = parse_value(origin, text)?;
    let bootstrap: Bootstrap =
        ferry_envoy_json::from_json("envoy.config.bootstrap.v3.Bootstrap", value).map_err(
            |message| ReplayError::Schema {
                path: origin.to_string(),
                message,
            },
        )?;
    let statics = bootstrap.static_resources.unwrap_or_default();
    let mut listeners = Collector::new("listener");
    for mut l in statics.listeners {
        if l.name.is_empty() {
            l.name = listener_name(&l, listeners.out.len());
        }
        listeners.push(l.name.clone(), to_any(&l));
    }
    let mut clusters = Collector::new("cluster");
    for c in statics.clusters {
        clusters.push(c.name.clone(), to_any(&c));
    }
    let mut secrets = Collector::new("secret");
    for s in statics.secrets {
        secrets.push(s.name.clone(), to_any(&s));
    }
    Ok(Resources {
        listeners: listeners.out,
        clusters: clusters.out,
        secrets: secrets.out,
        ..Resources::default()
    })
}

fn parse_value(origin: &str, text: &str) -> Result<serde_json::Value, ReplayError> {
    // Dumps are JSON; YAML (a superset) is the fallback for hand-written files.
    serde_json::from_str(text).or_else(|_| {
        serde_yaml_ng::from_str(text).map_err(|e| ReplayError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })
    })
}

/// Named resources without duplicates (the first occurrence wins).
struct Collector {
    kind: &'static str,
    out: Named,
    seen: HashSet<String>,
}

impl Collector {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            out: Vec::new(),
            seen: HashSet::new(),
        }
    }

    fn push(&mut self, name: String, any: Any) {
        if self.seen.insert(name.clone()) {
            self.out.push((name, any));
        } else {
            tracing::debug!(replay.kind = self.kind, replay.name = %name, "duplicate name skipped");
        }
    }
}

/// Builds the resources of a parsed config dump.
pub fn from_config_dump(
    origin: &str,
    dump: &ConfigDump,
    opts: ReplayOptions,
) -> Result<Resources, ReplayError> {
    let d = Decoder { origin };
    let mut listeners = Collector::new("listener");
    let mut clusters = Collector::new("cluster");
    let mut routes = Collector::new("route configuration");
    let mut secrets = Collector::new("secret");
    let mut assignments: HashMap<String, ClusterLoadAssignment> = HashMap::new();
    let mut cluster_protos: Vec<Cluster> = Vec::new();

    for config in &dump.configs {
        match config.type_url.rsplit('/').next().unwrap_or_default() {
            "envoy.admin.v3.ListenersConfigDump" => {
                let l: ListenersConfigDump = d.decode(config, "ListenersConfigDump")?;
                for dl in &l.dynamic_listeners {
                    // What the control plane sent last: a listener still
                    // warming, else the active one, else the rejected one.
                    let any = dl
                        .warming_state
                        .as_ref()
                        .and_then(|s| s.listener.as_ref())
                        .or_else(|| dl.active_state.as_ref().and_then(|s| s.listener.as_ref()))
                        .or_else(|| failed(dl.error_state.as_ref()));
                    if let Some(any) = any {
                        let (name, any) = d.listener(any, listeners.out.len())?;
                        listeners.push(name, any);
                    }
                }
                if opts.include_static {
                    for sl in &l.static_listeners {
                        if let Some(any) = &sl.listener {
                            let (name, any) = d.listener(any, listeners.out.len())?;
                            listeners.push(name, any);
                        }
                    }
                }
            }
            "envoy.admin.v3.ClustersConfigDump" => {
                let c: ClustersConfigDump = d.decode(config, "ClustersConfigDump")?;
                let dynamic = c
                    .dynamic_warming_clusters
                    .iter()
                    .chain(&c.dynamic_active_clusters)
                    .filter_map(|dc| {
                        dc.cluster
                            .as_ref()
                            .or_else(|| failed(dc.error_state.as_ref()))
                    });
                let statics = c
                    .static_clusters
                    .iter()
                    .filter(|_| opts.include_static)
                    .filter_map(|sc| sc.cluster.as_ref());
                for any in dynamic.chain(statics) {
                    let cluster: Cluster = d.typed(any, "cluster")?;
                    if clusters.seen.contains(&cluster.name) {
                        continue;
                    }
                    clusters.push(cluster.name.clone(), any.clone());
                    cluster_protos.push(cluster);
                }
            }
            "envoy.admin.v3.RoutesConfigDump" => {
                let r: RoutesConfigDump = d.decode(config, "RoutesConfigDump")?;
                let dynamic = r.dynamic_route_configs.iter().filter_map(|dr| {
                    dr.route_config
                        .as_ref()
                        .or_else(|| failed(dr.error_state.as_ref()))
                });
                for any in dynamic {
                    let rc: RouteConfiguration = d.typed(any, "route configuration")?;
                    routes.push(rc.name, any.clone());
                }
                if opts.include_static {
                    for (i, any) in r
                        .static_route_configs
                        .iter()
                        .filter_map(|sr| sr.route_config.as_ref())
                        .enumerate()
                    {
                        let mut rc: RouteConfiguration = d.typed(any, "route configuration")?;
                        if rc.name.is_empty() {
                            rc.name = format!("static_route_config_{i}");
                            routes.push(rc.name.clone(), to_any(&rc));
                        } else {
                            routes.push(rc.name, any.clone());
                        }
                    }
                }
            }
            "envoy.admin.v3.EndpointsConfigDump" => {
                let e: EndpointsConfigDump = d.decode(config, "EndpointsConfigDump")?;
                let all = e
                    .dynamic_endpoint_configs
                    .iter()
                    .filter_map(|de| de.endpoint_config.as_ref())
                    .chain(
                        e.static_endpoint_configs
                            .iter()
                            .filter_map(|se| se.endpoint_config.as_ref()),
                    );
                for any in all {
                    let cla: ClusterLoadAssignment = d.typed(any, "endpoint assignment")?;
                    assignments.entry(cla.cluster_name.clone()).or_insert(cla);
                }
            }
            "envoy.admin.v3.SecretsConfigDump" => {
                let s: SecretsConfigDump = d.decode(config, "SecretsConfigDump")?;
                let dynamic = s
                    .dynamic_warming_secrets
                    .iter()
                    .chain(&s.dynamic_active_secrets)
                    .filter_map(|ds| ds.secret.as_ref());
                let statics = s
                    .static_secrets
                    .iter()
                    .filter(|_| opts.include_static)
                    .filter_map(|ss| ss.secret.as_ref());
                for any in dynamic.chain(statics) {
                    let secret: Secret = d.typed(any, "secret")?;
                    secrets.push(secret.name, any.clone());
                }
            }
            // Bootstrap and scoped routes: nothing ADS serves.
            _ => {}
        }
    }

    // One assignment per EDS cluster, under the name its EDS request uses.
    let mut endpoints = Collector::new("endpoint assignment");
    for cluster in &cluster_protos {
        let eds = matches!(
            cluster.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
        );
        if !eds {
            continue;
        }
        let service = cluster
            .eds_cluster_config
            .as_ref()
            .map(|c| c.service_name.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(cluster.name.as_str());
        let mut cla = assignments
            .get(service)
            .or_else(|| assignments.get(&cluster.name))
            .cloned()
            .unwrap_or_else(|| {
                // Served empty rather than left out, so the cluster warms.
                tracing::debug!(replay.cluster = %cluster.name, "no endpoints in the dump");
                ClusterLoadAssignment::default()
            });
        cla.cluster_name = service.to_string();
        endpoints.push(service.to_string(), to_any(&cla));
    }

    Ok(Resources {
        listeners: listeners.out,
        clusters: clusters.out,
        routes: routes.out,
        endpoints: endpoints.out,
        secrets: secrets.out,
    })
}

fn failed(state: Option<&UpdateFailureState>) -> Option<&Any> {
    state.and_then(|s| s.failed_configuration.as_ref())
}

struct Decoder<'a> {
    origin: &'a str,
}

impl Decoder<'_> {
    fn decode<M: Message + Default>(&self, any: &Any, what: &str) -> Result<M, ReplayError> {
        M::decode(any.value.as_slice()).map_err(|source| ReplayError::Decode {
            path: self.origin.to_string(),
            what: what.to_string(),
            source,
        })
    }

    /// Decodes a resource, checking that the `Any` holds the expected type.
    fn typed<M: Message + Default + Name>(&self, any: &Any, what: &str) -> Result<M, ReplayError> {
        if any.type_url != M::type_url() {
            return Err(ReplayError::Invalid {
                path: self.origin.to_string(),
                what: format!(
                    "a {what} of type {} (expected {})",
                    any.type_url,
                    M::type_url()
                ),
            });
        }
        self.decode(any, what)
    }

    /// A listener and its name, naming an unnamed (static) one after its address.
    fn listener(&self, any: &Any, index: usize) -> Result<(String, Any), ReplayError> {
        let mut l: Listener = self.typed(any, "listener")?;
        if l.name.is_empty() {
            l.name = listener_name(&l, index);
            return Ok((l.name.clone(), to_any(&l)));
        }
        Ok((l.name, any.clone()))
    }
}

/// `<address>_<port>` (istiod's style) for a listener without a name.
fn listener_name(l: &Listener, index: usize) -> String {
    let socket = l.address.as_ref().and_then(|a| match &a.address {
        Some(Address::SocketAddress(sa)) => Some(sa),
        _ => None,
    });
    match socket {
        Some(sa) => match sa.port_specifier {
            Some(PortSpecifier::PortValue(p)) => format!("{}_{p}", sa.address),
            Some(PortSpecifier::NamedPort(ref n)) => format!("{}_{n}", sa.address),
            None => format!("{}_0", sa.address),
        },
        None => format!("static_listener_{index}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_static_resources() {
        let yaml = r#"
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: backend
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}}]}]
"#;
        let r = parse_bootstrap("inline", yaml).unwrap();
        assert_eq!(r.listeners.len(), 1);
        assert_eq!(r.listeners[0].0, "127.0.0.1_10000");
        let l = Listener::decode(r.listeners[0].1.value.as_slice()).unwrap();
        assert_eq!(l.name, "127.0.0.1_10000");
        assert_eq!(r.clusters[0].0, "backend");
        assert!(r.routes.is_empty() && r.endpoints.is_empty());
    }

    #[test]
    fn eds_assignments_follow_service_name() {
        let dump = serde_json::json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
             "dynamic_active_clusters": [
                {"cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                  "name": "a", "type": "EDS", "eds_cluster_config": {"service_name": "svc-a", "eds_config": {"ads": {}}}}},
                {"cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                  "name": "b", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}},
                {"cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                  "name": "c", "type": "STATIC"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
             "dynamic_endpoint_configs": [
                {"endpoint_config": {"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                  "cluster_name": "a", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}}}]}]}},
                {"endpoint_config": {"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                  "cluster_name": "c"}}]}
        ]});
        let r = parse_config_dump("inline", &dump.to_string(), ReplayOptions::default()).unwrap();
        let names: Vec<&str> = r.endpoints.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["svc-a", "b"]);
        let a = ClusterLoadAssignment::decode(r.endpoints[0].1.value.as_slice()).unwrap();
        assert_eq!(a.cluster_name, "svc-a");
        assert_eq!(a.endpoints.len(), 1, "found under the cluster's name");
        let b = ClusterLoadAssignment::decode(r.endpoints[1].1.value.as_slice()).unwrap();
        assert!(b.endpoints.is_empty());
    }
}
