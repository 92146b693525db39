//! The client's resource cache: every resource received (proto, version,
//! time, converted model), and the assembly of a complete snapshot from it,
//! with Envoy's warming rules: a listener waits for its route
//! configurations, an EDS cluster for its endpoints, each up to the initial
//! fetch timeout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterPb;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerPb;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use ferry_model as m;
use prost::Message;

use crate::convert::{self, ConvertError, Warnings};

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A validated resource, converted into the model.
#[derive(Debug, Clone)]
pub enum Parsed {
    Listener(Arc<m::Listener>),
    Route(Arc<m::RouteConfig>),
    Cluster(Arc<m::Cluster>),
    Endpoints(Arc<Vec<m::Endpoint>>),
    Secret(Arc<m::tls::Secret>),
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub version: String,
    pub last_updated: SystemTime,
    /// The resource as received (encoded), for `/config_dump`: the wire form
    /// is several times smaller than the decoded proto.
    pub raw: Vec<u8>,
    pub parsed: Parsed,
}

/// Decodes and converts one resource of `type_url`. The error names the
/// resource (its name too when it could be decoded that far).
pub fn parse(
    type_url: &str,
    any: &Any,
    warnings: &mut Warnings,
) -> Result<(String, Parsed), (Option<String>, ConvertError)> {
    let undecodable = |name: &str, e: prost::DecodeError| {
        (
            None,
            ConvertError {
                resource: format!("{name} resource"),
                field: String::new(),
                message: format!("cannot decode: {e}"),
            },
        )
    };
    if any.type_url != type_url {
        return Err((
            None,
            ConvertError {
                resource: "response".into(),
                field: "resources".into(),
                message: format!("a {} resource in a {type_url} response", any.type_url),
            },
        ));
    }
    Ok(match type_url {
        LISTENER => {
            let pb =
                ListenerPb::decode(any.value.as_slice()).map_err(|e| undecodable("listener", e))?;
            let model = convert::listener(&pb, warnings).map_err(|e| (Some(pb.name.clone()), e))?;
            (pb.name, Parsed::Listener(Arc::new(model)))
        }
        ROUTE => {
            let pb = RouteConfiguration::decode(any.value.as_slice())
                .map_err(|e| undecodable("route_configuration", e))?;
            let model =
                convert::route_config(&pb, warnings).map_err(|e| (Some(pb.name.clone()), e))?;
            (pb.name, Parsed::Route(Arc::new(model)))
        }
        CLUSTER => {
            let pb =
                ClusterPb::decode(any.value.as_slice()).map_err(|e| undecodable("cluster", e))?;
            let model = convert::cluster(&pb, warnings).map_err(|e| (Some(pb.name.clone()), e))?;
            (pb.name, Parsed::Cluster(Arc::new(model)))
        }
        ENDPOINT => {
            let pb = ClusterLoadAssignment::decode(any.value.as_slice())
                .map_err(|e| undecodable("cluster_load_assignment", e))?;
            let eps = convert::cluster_load_assignment(&pb, warnings)
                .map_err(|e| (Some(pb.cluster_name.clone()), e))?;
            (pb.cluster_name, Parsed::Endpoints(Arc::new(eps)))
        }
        SECRET => {
            use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
            let pb = Secret::decode(any.value.as_slice()).map_err(|e| undecodable("secret", e))?;
            let model = convert::secret(&pb, warnings).map_err(|e| (Some(pb.name.clone()), e))?;
            (pb.name, Parsed::Secret(Arc::new(model)))
        }
        other => {
            return Err((
                None,
                ConvertError {
                    resource: "response".into(),
                    field: "type_url".into(),
                    message: format!("unsupported resource type {other}"),
                },
            ));
        }
    })
}

/// Field 1 of every resource type the store holds (`Listener.name`,
/// `RouteConfiguration.name`, `Cluster.name`,
/// `ClusterLoadAssignment.cluster_name`, `Secret.name`): decoding only it
/// names a resource without converting it.
#[derive(Clone, PartialEq, prost::Message)]
struct NameOnly {
    #[prost(string, tag = "1")]
    name: String,
}

/// The name of an encoded resource of any stored type (`None`: not
/// decodable).
pub fn resource_name(raw: &[u8]) -> Option<String> {
    NameOnly::decode(raw).ok().map(|n| n.name)
}

/// An EDS cluster with its endpoints, as last assembled: while neither the
/// cluster nor its assignment changes, every snapshot shares this one, so an
/// update to other resources leaves it (and its pools) untouched.
#[derive(Debug)]
struct Resolved {
    cluster: Arc<m::Cluster>,
    endpoints: Arc<Vec<m::Endpoint>>,
    resolved: Arc<m::Cluster>,
}

/// Everything received, by type URL and name.
#[derive(Debug, Default)]
pub struct Store {
    pub resources: HashMap<&'static str, BTreeMap<String, Entry>>,
    /// SDS secrets are someone else's to deliver and are not waited for: a
    /// configuration looked at away from any proxy (`ferry-pilot explain`),
    /// whose certificates the proxy's agent would serve.
    pub secrets_elsewhere: bool,
    /// When a listener or cluster started waiting for what it references.
    warming_since: HashMap<(&'static str, String), Instant>,
    /// EDS clusters resolved with their endpoints, by cluster name.
    resolved: HashMap<String, Resolved>,
}

pub fn type_key(type_url: &str) -> Option<&'static str> {
    [LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET]
        .into_iter()
        .find(|t| *t == type_url)
}

/// What a snapshot build produced.
pub struct Assembled {
    pub snapshot: m::Snapshot,
    /// Resources still warming (their dependencies have not arrived).
    pub warming: Vec<String>,
    /// The earliest moment a warming resource times out and must be
    /// activated anyway.
    pub next_deadline: Option<Instant>,
}

impl Store {
    pub fn of(&self, type_url: &'static str) -> impl Iterator<Item = (&String, &Entry)> {
        self.resources
            .get(type_url)
            .into_iter()
            .flat_map(|m| m.iter())
    }

    pub fn get(&self, type_url: &'static str, name: &str) -> Option<&Entry> {
        self.resources.get(type_url).and_then(|m| m.get(name))
    }

    pub fn versions(&self, type_url: &'static str) -> HashMap<String, String> {
        self.of(type_url)
            .map(|(k, e)| (k.clone(), e.version.clone()))
            .collect()
    }

    pub fn upsert(
        &mut self,
        type_url: &'static str,
        name: String,
        version: String,
        raw: Vec<u8>,
        parsed: Parsed,
    ) {
        self.resources.entry(type_url).or_default().insert(
            name,
            Entry {
                version,
                last_updated: SystemTime::now(),
                raw,
                parsed,
            },
        );
    }

    pub fn remove(&mut self, type_url: &'static str, name: &str) {
        if let Some(m) = self.resources.get_mut(type_url) {
            m.remove(name);
        }
        self.warming_since.remove(&(type_url, name.to_string()));
    }

    /// Keeps only `names` of a type (state-of-the-world LDS/CDS: what a
    /// response leaves out is gone).
    pub fn retain(&mut self, type_url: &'static str, names: &BTreeSet<String>) {
        if let Some(m) = self.resources.get_mut(type_url) {
            m.retain(|k, _| names.contains(k));
        }
    }

    /// Route configuration names the listeners need (RDS subscriptions).
    pub fn wanted_routes(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (_, e) in self.of(LISTENER) {
            if let Parsed::Listener(l) = &e.parsed {
                out.extend(rds_names(l));
            }
        }
        out
    }

    /// Whether a cluster of that name is known (dynamic or static).
    pub fn has_cluster(&self, name: &str, statics: &HashMap<String, Arc<m::Cluster>>) -> bool {
        statics.contains_key(name) || self.get(CLUSTER, name).is_some()
    }

    /// EDS service names the clusters need.
    pub fn wanted_endpoints(&self, statics: &HashMap<String, Arc<m::Cluster>>) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = statics.values().filter_map(|c| eds_name(c)).collect();
        for (_, e) in self.of(CLUSTER) {
            if let Parsed::Cluster(c) = &e.parsed
                && let Some(n) = eds_name(c)
            {
                out.insert(n);
            }
        }
        out
    }

    /// The cached listeners with the static ones of `base`, and the cached
    /// clusters.
    fn listeners_and_clusters(
        &self,
        base: &m::Snapshot,
    ) -> (Vec<Arc<m::Listener>>, Vec<Arc<m::Cluster>>) {
        let listeners: Vec<Arc<m::Listener>> = self
            .of(LISTENER)
            .filter_map(|(_, e)| match &e.parsed {
                Parsed::Listener(l) => Some(l.clone()),
                _ => None,
            })
            .chain(base.listeners.iter().cloned())
            .collect();
        let clusters: Vec<Arc<m::Cluster>> = self
            .of(CLUSTER)
            .filter_map(|(_, e)| match &e.parsed {
                Parsed::Cluster(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        (listeners, clusters)
    }

    /// SDS names the listeners and clusters need that the bootstrap does
    /// not hold as static secrets.
    pub fn wanted_secrets(&self, base: &m::Snapshot) -> BTreeSet<String> {
        let (listeners, clusters) = self.listeners_and_clusters(base);
        sds_names(&listeners, clusters.iter().chain(base.clusters.values()))
            .into_iter()
            .filter(|n| !base.secrets.contains_key(n))
            .collect()
    }

    /// The SDS names the cached listeners and clusters (and the static ones
    /// of `base`) want from istio-agent's SDS server.
    pub fn wanted_agent_secrets(&self, base: &m::Snapshot) -> BTreeSet<String> {
        let (listeners, clusters) = self.listeners_and_clusters(base);
        let commons = listeners
            .iter()
            .flat_map(|l| l.filter_chains.iter().chain(l.default_chain.iter()))
            .filter_map(|c| c.tls.as_ref().map(|t| &t.common))
            .chain(
                clusters
                    .iter()
                    .chain(base.clusters.values())
                    .flat_map(|c| {
                        c.tls.as_deref().into_iter().chain(
                            c.transport_socket_matches
                                .iter()
                                .filter_map(|t| t.tls.as_ref()),
                        )
                    })
                    .map(|t| &t.common),
            );
        commons
            .flat_map(|c| c.agent_sds_names().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }

    /// Builds the snapshot: static resources first, then dynamic ones that
    /// finished warming (or whose warming timed out); a warming resource
    /// that was active before stays at its previous version.
    pub fn assemble(
        &mut self,
        base: &m::Snapshot,
        previous: Option<&m::Snapshot>,
        initial_fetch_timeout: Duration,
        version: String,
    ) -> Assembled {
        let now = Instant::now();
        let mut warming = Vec::new();
        let mut next_deadline: Option<Instant> = None;
        let mut routes: HashMap<String, Arc<m::RouteConfig>> = base.routes.clone();
        for (name, e) in self.of(ROUTE) {
            if let Parsed::Route(rc) = &e.parsed {
                routes.insert(name.clone(), rc.clone());
            }
        }

        let mut secrets = base.secrets.clone();
        for (name, e) in self.of(SECRET) {
            if let Parsed::Secret(sec) = &e.parsed {
                secrets.entry(name.clone()).or_insert_with(|| sec.clone());
            }
        }
        let elsewhere = self.secrets_elsewhere;
        let missing_secret =
            |names: &[String]| !elsewhere && names.iter().any(|n| !secrets.contains_key(n));

        let mut clusters = base.clusters.clone();
        let mut still_warming = BTreeSet::new();
        let dynamic_clusters: Vec<(String, Arc<m::Cluster>)> = self
            .of(CLUSTER)
            .filter_map(|(n, e)| match &e.parsed {
                Parsed::Cluster(c) => Some((n.clone(), c.clone())),
                _ => None,
            })
            .collect();
        for (name, c) in dynamic_clusters.iter().map(|(n, c)| (n, c.clone())).chain(
            base.clusters
                .iter()
                .filter(|(_, c)| eds_name(c).is_some())
                .map(|(n, c)| (n, c.clone())),
        ) {
            // A cluster waits for its secrets as for its endpoints.
            let resolved = match eds_name(&c) {
                _ if missing_secret(&cluster_sds_names(&c)) => None,
                None => Some(c.clone()),
                Some(service) => match self.get(ENDPOINT, &service).map(|e| &e.parsed) {
                    Some(Parsed::Endpoints(eps)) => {
                        let eps = eps.clone();
                        Some(self.resolve(name, &c, eps))
                    }
                    _ => None,
                },
            };
            match resolved {
                Some(c) => {
                    self.warming_since.remove(&(CLUSTER, name.clone()));
                    clusters.insert(name.clone(), c);
                }
                None => {
                    let since = *self
                        .warming_since
                        .entry((CLUSTER, name.clone()))
                        .or_insert(now);
                    let deadline = since + initial_fetch_timeout;
                    if now >= deadline {
                        // Timed out: active without endpoints, as Envoy does.
                        clusters.insert(name.clone(), c.clone());
                    } else if let Some(prev) = previous.and_then(|p| p.clusters.get(name.as_str()))
                    {
                        clusters.insert(name.clone(), prev.clone());
                        still_warming.insert(name.clone());
                    } else {
                        still_warming.insert(name.clone());
                    }
                    if now < deadline {
                        warming.push(format!("cluster {name:?}"));
                        next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
                    }
                }
            }
        }

        let mut listeners: Vec<Arc<m::Listener>> = base.listeners.clone();
        let dynamic_listeners: Vec<(String, Arc<m::Listener>)> = self
            .of(LISTENER)
            .filter_map(|(n, e)| match &e.parsed {
                Parsed::Listener(l) => Some((n.clone(), l.clone())),
                _ => None,
            })
            .collect();
        for (name, l) in dynamic_listeners {
            let missing = rds_names(&l).into_iter().any(|r| !routes.contains_key(&r))
                || missing_secret(
                    &sds_names(std::slice::from_ref(&l), std::iter::empty())
                        .into_iter()
                        .collect::<Vec<_>>(),
                );
            if !missing {
                self.warming_since.remove(&(LISTENER, name.clone()));
                listeners.push(l);
                continue;
            }
            let since = *self
                .warming_since
                .entry((LISTENER, name.clone()))
                .or_insert(now);
            let deadline = since + initial_fetch_timeout;
            if now >= deadline {
                listeners.push(l);
            } else {
                warming.push(format!("listener {name:?}"));
                next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
                if let Some(prev) = previous.and_then(|p| p.listener(&name)) {
                    listeners.push(prev.clone());
                }
            }
        }
        let _ = still_warming;
        // Forget clusters gone from the snapshot (a resolved cluster kept
        // at its previous version stays shared).
        self.resolved.retain(|name, r| {
            clusters
                .get(name)
                .is_some_and(|c| Arc::ptr_eq(c, &r.resolved))
        });
        Assembled {
            snapshot: m::Snapshot {
                version,
                listeners,
                clusters,
                routes,
                secrets,
            },
            warming,
            next_deadline,
        }
    }
}

fn rds_names(l: &m::Listener) -> Vec<String> {
    l.filter_chains
        .iter()
        .chain(l.default_chain.iter())
        .filter_map(|c| match &c.kind {
            m::ChainKind::Http(h) => match &h.routes {
                m::RouteSource::Rds(n) => Some(n.clone()),
                m::RouteSource::Inline(_) => None,
            },
            m::ChainKind::Tcp(_) => None,
        })
        .collect()
}

fn cluster_sds_names(c: &m::Cluster) -> Vec<String> {
    ferry_tls::sds_names(
        c.tls
            .as_deref()
            .into_iter()
            .chain(
                c.transport_socket_matches
                    .iter()
                    .filter_map(|t| t.tls.as_ref()),
            )
            .map(|t| &t.common),
    )
}

/// Every SDS name the TLS contexts of `listeners` and `clusters` refer to.
pub fn sds_names<'a>(
    listeners: &[Arc<m::Listener>],
    clusters: impl Iterator<Item = &'a Arc<m::Cluster>>,
) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = listeners
        .iter()
        .flat_map(|l| l.filter_chains.iter().chain(l.default_chain.iter()))
        .filter_map(|c| c.tls.as_ref())
        .flat_map(|t| t.common.sds_names().map(str::to_string).collect::<Vec<_>>())
        .collect();
    for c in clusters {
        out.extend(cluster_sds_names(c));
    }
    out
}

impl Store {
    /// `cluster` with `endpoints`: the one assembled last time when neither
    /// changed, else a new one (remembered for the next assembly).
    fn resolve(
        &mut self,
        name: &str,
        cluster: &Arc<m::Cluster>,
        endpoints: Arc<Vec<m::Endpoint>>,
    ) -> Arc<m::Cluster> {
        if let Some(r) = self.resolved.get(name)
            && Arc::ptr_eq(&r.cluster, cluster)
            && Arc::ptr_eq(&r.endpoints, &endpoints)
        {
            return r.resolved.clone();
        }
        let resolved = Arc::new(with_endpoints(cluster, &endpoints));
        self.resolved.insert(
            name.to_string(),
            Resolved {
                cluster: cluster.clone(),
                endpoints,
                resolved: resolved.clone(),
            },
        );
        resolved
    }
}

fn eds_name(c: &m::Cluster) -> Option<String> {
    match &c.kind {
        m::ClusterKind::Eds { service_name } => Some(service_name.clone()),
        _ => None,
    }
}

fn with_endpoints(c: &m::Cluster, eps: &Arc<Vec<m::Endpoint>>) -> m::Cluster {
    let mut c = c.clone();
    c.kind = if eps.is_empty() {
        m::ClusterKind::BlackHole
    } else {
        m::ClusterKind::Static(eps.clone())
    };
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
    };
    use envoy_types::pb::envoy::config::core::v3::{
        Address, SocketAddress, address, socket_address,
    };
    use envoy_types::pb::envoy::config::endpoint::v3::{
        Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };

    fn any<T: Message>(type_url: &str, m: &T) -> Any {
        Any {
            type_url: type_url.into(),
            value: m.encode_to_vec(),
        }
    }

    fn eds_cluster(name: &str) -> Any {
        any(
            CLUSTER,
            &ClusterPb {
                name: name.into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                eds_cluster_config: Some(EdsClusterConfig::default()),
                ..Default::default()
            },
        )
    }

    fn assignment(name: &str, port: u32) -> Any {
        let ep = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.0.0.1".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        any(
            ENDPOINT,
            &ClusterLoadAssignment {
                cluster_name: name.into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: vec![ep],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
    }

    fn put(st: &mut Store, type_url: &'static str, a: &Any) {
        let (name, p) = parse(type_url, a, &mut Warnings::default()).expect("valid");
        st.upsert(type_url, name, "1".into(), a.value.clone(), p);
    }

    fn assemble(st: &mut Store) -> m::Snapshot {
        st.assemble(
            &m::Snapshot::default(),
            None,
            Duration::from_secs(10),
            "v".into(),
        )
        .snapshot
    }

    #[test]
    fn every_stored_type_is_named_without_converting_it() {
        assert_eq!(resource_name(&eds_cluster("a").value).as_deref(), Some("a"));
        assert_eq!(
            resource_name(&assignment("b", 80).value).as_deref(),
            Some("b")
        );
    }

    #[test]
    fn an_endpoint_update_rebuilds_only_its_own_cluster() {
        let mut st = Store::default();
        for name in ["a", "b", "c"] {
            put(&mut st, CLUSTER, &eds_cluster(name));
            put(&mut st, ENDPOINT, &assignment(name, 80));
        }
        let first = assemble(&mut st);
        assert_eq!(first.clusters.len(), 3);
        // Nothing changed: every cluster is the same one.
        let again = assemble(&mut st);
        for (name, c) in &first.clusters {
            assert!(Arc::ptr_eq(c, &again.clusters[name]), "{name} rebuilt");
        }
        // b's endpoints change: b alone is new, with the new endpoint.
        put(&mut st, ENDPOINT, &assignment("b", 81));
        let next = assemble(&mut st);
        assert!(Arc::ptr_eq(&first.clusters["a"], &next.clusters["a"]));
        assert!(Arc::ptr_eq(&first.clusters["c"], &next.clusters["c"]));
        assert!(!Arc::ptr_eq(&first.clusters["b"], &next.clusters["b"]));
        let m::ClusterKind::Static(eps) = &next.clusters["b"].kind else {
            panic!("b is not resolved: {:?}", next.clusters["b"].kind);
        };
        assert_eq!(eps[0].address.ip().map(|a| a.port()), Some(81));
        // A removed cluster is forgotten.
        st.remove(CLUSTER, "c");
        let last = assemble(&mut st);
        assert!(!last.clusters.contains_key("c"));
        assert!(!st.resolved.contains_key("c"));
    }
}
