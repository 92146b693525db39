//! The client's resource cache: every resource received (proto, version,
//! time, converted model), and the assembly of a complete snapshot from it,
//! with Envoy's warming rules: a listener waits for its route
//! configurations, an EDS cluster for its endpoints, each up to the initial
//! fetch timeout.
//!
//! Assembly is incremental where it can be: the store notes which clusters
//! and endpoint assignments changed since the last snapshot, and when that
//! snapshot is the one being replaced, only those clusters (and the ones
//! still warming) are looked at again; every other cluster is carried over
//! as the same `Arc`, and the snapshot says which clusters changed, so the
//! runtime need not compare the rest either.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterPb;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerPb;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use ferry_model as m;
use prost::Message;

use crate::convert::{self, ConvertError, Warnings};

/// Maps keyed by resource names, looked up once per cluster per update.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

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

impl Parsed {
    /// Whether both are the very same converted resource (a resource sent
    /// again unchanged keeps what it converted to).
    fn same(&self, other: &Parsed) -> bool {
        match (self, other) {
            (Parsed::Listener(a), Parsed::Listener(b)) => Arc::ptr_eq(a, b),
            (Parsed::Route(a), Parsed::Route(b)) => Arc::ptr_eq(a, b),
            (Parsed::Cluster(a), Parsed::Cluster(b)) => Arc::ptr_eq(a, b),
            (Parsed::Endpoints(a), Parsed::Endpoints(b)) => Arc::ptr_eq(a, b),
            (Parsed::Secret(a), Parsed::Secret(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
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
    pub resources: FastMap<&'static str, BTreeMap<String, Entry>>,
    /// SDS secrets are someone else's to deliver and are not waited for: a
    /// configuration looked at away from any proxy (`ferry-pilot explain`),
    /// whose certificates the proxy's agent would serve.
    pub secrets_elsewhere: bool,
    /// When a listener or cluster started waiting for what it references.
    warming_since: FastMap<(&'static str, String), Instant>,
    /// EDS clusters resolved with their endpoints, by cluster name.
    resolved: FastMap<String, Resolved>,
    /// Clusters and assignments changed since the last assembly.
    changed: Changed,
    /// The last assembly, which the next one may start from.
    last: Option<Last>,
    /// EDS service name → the clusters of other names that use it (most
    /// clusters use the service of their own name, which is not noted). It
    /// may name clusters that no longer do (until the next full assembly),
    /// never too few.
    eds_users: FastMap<String, Vec<String>>,
}

/// What changed in the store since the last assembly, for the clusters.
#[derive(Debug, Default)]
struct Changed {
    /// Cluster names upserted or removed.
    clusters: FastSet<String>,
    /// EDS service names whose assignment was upserted or removed.
    endpoints: FastSet<String>,
}

/// What the next assembly needs of the last one to start from it.
#[derive(Debug)]
struct Last {
    serial: u64,
    secrets_elsewhere: bool,
    /// The static clusters it was assembled with.
    base_clusters: m::ShardedMap<Arc<m::Cluster>>,
    /// Clusters that were waiting for their endpoints or secrets, whose
    /// timeout lies ahead: looked at again every time.
    warming: Vec<String>,
}

/// Numbers every assembled snapshot, process-wide.
static SERIAL: AtomicU64 = AtomicU64::new(1);

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
        let unchanged = self
            .get(type_url, &name)
            .is_some_and(|e| e.parsed.same(&parsed));
        if !unchanged {
            self.note_change(type_url, &name);
        }
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
        if let Some(m) = self.resources.get_mut(type_url)
            && m.remove(name).is_some()
        {
            self.note_change(type_url, name);
        }
        self.warming_since.remove(&(type_url, name.to_string()));
    }

    /// Keeps only `names` of a type (state-of-the-world LDS/CDS: what a
    /// response leaves out is gone).
    pub fn retain(&mut self, type_url: &'static str, names: &BTreeSet<String>) {
        let mut gone = Vec::new();
        if let Some(m) = self.resources.get_mut(type_url) {
            m.retain(|k, _| {
                let keep = names.contains(k);
                if !keep {
                    gone.push(k.clone());
                }
                keep
            });
        }
        for name in gone {
            self.note_change(type_url, &name);
        }
    }

    /// Remembers that a cluster or an assignment changed (listeners, routes
    /// and secrets are looked at in full by every assembly).
    fn note_change(&mut self, type_url: &'static str, name: &str) {
        match type_url {
            CLUSTER => self.changed.clusters.insert(name.to_string()),
            ENDPOINT => self.changed.endpoints.insert(name.to_string()),
            _ => false,
        };
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
    pub fn has_cluster(&self, name: &str, statics: &m::ShardedMap<Arc<m::Cluster>>) -> bool {
        statics.contains_key(name) || self.get(CLUSTER, name).is_some()
    }

    /// EDS service names the clusters need.
    pub fn wanted_endpoints(&self, statics: &m::ShardedMap<Arc<m::Cluster>>) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = statics
            .values()
            .filter_map(|c| eds_name(c).map(str::to_string))
            .collect();
        for (_, e) in self.of(CLUSTER) {
            if let Parsed::Cluster(c) = &e.parsed
                && let Some(n) = eds_name(c)
            {
                out.insert(n.to_string());
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
    ///
    /// When `previous` is this store's last assembly and neither the
    /// secrets nor the static clusters changed since, only the clusters
    /// that changed (or use an assignment that changed, or are still
    /// warming) are assembled again: the others are `previous`'s, which a
    /// full assembly would give too.
    pub fn assemble(
        &mut self,
        base: &m::Snapshot,
        previous: Option<&m::Snapshot>,
        initial_fetch_timeout: Duration,
        version: String,
    ) -> Assembled {
        let mut w = Warming {
            now: Instant::now(),
            timeout: initial_fetch_timeout,
            descriptions: Vec::new(),
            next_deadline: None,
            clusters: Vec::new(),
        };
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

        let (clusters, cluster_changes) = match self.incremental_from(base, previous, &secrets) {
            Some(prev) => {
                let (clusters, names) = self.reassemble_clusters(base, prev, &secrets, &mut w);
                let changes = m::ClusterChanges {
                    after: prev.serial,
                    names,
                };
                (clusters, Some(changes))
            }
            None => (
                self.assemble_all_clusters(base, previous, &secrets, &mut w),
                None,
            ),
        };
        self.changed = Changed::default();
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        self.last = Some(Last {
            serial,
            secrets_elsewhere: self.secrets_elsewhere,
            base_clusters: base.clusters.clone(),
            warming: std::mem::take(&mut w.clusters),
        });
        let now = w.now;
        let elsewhere = self.secrets_elsewhere;
        let missing_secret = |names: &[String]| missing_secret(&secrets, elsewhere, names);

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
            let deadline = since + w.timeout;
            if now >= deadline {
                listeners.push(l);
            } else {
                w.descriptions.push(format!("listener {name:?}"));
                w.next_deadline = Some(w.next_deadline.map_or(deadline, |d| d.min(deadline)));
                if let Some(prev) = previous.and_then(|p| p.listener(&name)) {
                    listeners.push(prev.clone());
                }
            }
        }
        Assembled {
            snapshot: m::Snapshot {
                version,
                listeners,
                clusters,
                routes,
                secrets,
                serial,
                cluster_changes,
            },
            warming: w.descriptions,
            next_deadline: w.next_deadline,
        }
    }

    /// `previous`, when the clusters may be assembled starting from it: it
    /// is this store's last assembly, and what every cluster depends on
    /// besides its own resources (secrets, static clusters) is unchanged.
    fn incremental_from<'a>(
        &self,
        base: &m::Snapshot,
        previous: Option<&'a m::Snapshot>,
        secrets: &HashMap<String, Arc<m::tls::Secret>>,
    ) -> Option<&'a m::Snapshot> {
        let last = self.last.as_ref()?;
        let prev = previous?;
        (prev.serial == last.serial
            && last.secrets_elsewhere == self.secrets_elsewhere
            && same_clusters(&last.base_clusters, &base.clusters)
            && same_arcs(&prev.secrets, secrets))
        .then_some(prev)
    }

    /// Every cluster: the static ones, then each dynamic one and each
    /// static EDS one as [`Store::assemble_cluster`] decides.
    fn assemble_all_clusters(
        &mut self,
        base: &m::Snapshot,
        previous: Option<&m::Snapshot>,
        secrets: &HashMap<String, Arc<m::tls::Secret>>,
        w: &mut Warming,
    ) -> m::ShardedMap<Arc<m::Cluster>> {
        let mut clusters = base.clusters.clone();
        let dynamic_clusters: Vec<(String, Arc<m::Cluster>)> = self
            .of(CLUSTER)
            .filter_map(|(n, e)| match &e.parsed {
                Parsed::Cluster(c) => Some((n.clone(), c.clone())),
                _ => None,
            })
            .collect();
        self.eds_users.clear();
        for (name, c) in dynamic_clusters
            .iter()
            .map(|(n, c)| (n, c))
            .chain(base.clusters.iter().filter(|(_, c)| eds_name(c).is_some()))
        {
            self.note_eds_user(name, c);
            self.assemble_cluster(name, c, secrets, previous, &mut clusters, w);
        }
        // Forget clusters gone from the snapshot (a resolved cluster kept
        // at its previous version stays shared).
        self.resolved.retain(|name, r| {
            clusters
                .get(name)
                .is_some_and(|c| Arc::ptr_eq(c, &r.resolved))
        });
        clusters
    }

    /// `prev`'s clusters with those that changed since assembled again (as
    /// [`Store::assemble_all_clusters`] would), and the names of those that
    /// differ from `prev`'s now.
    fn reassemble_clusters(
        &mut self,
        base: &m::Snapshot,
        prev: &m::Snapshot,
        secrets: &HashMap<String, Arc<m::tls::Secret>>,
        w: &mut Warming,
    ) -> (m::ShardedMap<Arc<m::Cluster>>, Vec<String>) {
        let changed = std::mem::take(&mut self.changed);
        let mut names: BTreeSet<String> = changed.clusters.into_iter().collect();
        for service in changed.endpoints {
            if let Some(users) = self.eds_users.get(&service) {
                names.extend(users.iter().cloned());
            }
            names.insert(service);
        }
        if let Some(last) = &self.last {
            names.extend(last.warming.iter().cloned());
        }
        let mut clusters = prev.clusters.clone();
        for name in &names {
            // In the order of the full assembly: the static cluster, the
            // dynamic one in its place, a static EDS one resolved.
            match base.clusters.get(name) {
                Some(b) => clusters.insert(name.clone(), b.clone()),
                None => clusters.remove(name),
            };
            let dynamic = match self.get(CLUSTER, name).map(|e| &e.parsed) {
                Some(Parsed::Cluster(c)) => Some(c.clone()),
                _ => None,
            };
            if let Some(c) = dynamic {
                self.note_eds_user(name, &c);
                self.assemble_cluster(name, &c, secrets, Some(prev), &mut clusters, w);
            }
            if let Some(b) = base.clusters.get(name).filter(|b| eds_name(b).is_some()) {
                self.assemble_cluster(name, b, secrets, Some(prev), &mut clusters, w);
            }
            if let Some(r) = self.resolved.get(name)
                && !clusters
                    .get(name)
                    .is_some_and(|c| Arc::ptr_eq(c, &r.resolved))
            {
                self.resolved.remove(name);
            }
        }
        let differ = names
            .into_iter()
            .filter(
                |n| match (prev.clusters.get(n.as_str()), clusters.get(n.as_str())) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                    (None, None) => false,
                    _ => true,
                },
            )
            .collect();
        (clusters, differ)
    }

    /// Puts cluster `name` (configured as `c`) into `clusters`: with its
    /// endpoints and secrets there, resolved; while it waits for them, at
    /// its version in `previous` (or not at all); once its wait timed out,
    /// as it is (active without endpoints, as Envoy does).
    fn assemble_cluster(
        &mut self,
        name: &str,
        c: &Arc<m::Cluster>,
        secrets: &HashMap<String, Arc<m::tls::Secret>>,
        previous: Option<&m::Snapshot>,
        clusters: &mut m::ShardedMap<Arc<m::Cluster>>,
        w: &mut Warming,
    ) {
        // A cluster waits for its secrets as for its endpoints.
        let resolved = match eds_name(c) {
            _ if missing_secret(secrets, self.secrets_elsewhere, &cluster_sds_names(c)) => None,
            None => Some(c.clone()),
            Some(service) => match self.get(ENDPOINT, service).map(|e| &e.parsed) {
                Some(Parsed::Endpoints(eps)) => {
                    let eps = eps.clone();
                    Some(self.resolve(name, c, eps))
                }
                _ => None,
            },
        };
        let key = || (CLUSTER, name.to_string());
        match resolved {
            Some(c) => {
                if !self.warming_since.is_empty() {
                    self.warming_since.remove(&key());
                }
                clusters.insert(name.to_string(), c);
            }
            None => {
                let since = *self.warming_since.entry(key()).or_insert(w.now);
                let deadline = since + w.timeout;
                if w.now >= deadline {
                    // Timed out: active without endpoints, as Envoy does.
                    clusters.insert(name.to_string(), c.clone());
                } else if let Some(prev) = previous.and_then(|p| p.clusters.get(name)) {
                    clusters.insert(name.to_string(), prev.clone());
                }
                if w.now < deadline {
                    w.descriptions.push(format!("cluster {name:?}"));
                    w.next_deadline = Some(w.next_deadline.map_or(deadline, |d| d.min(deadline)));
                    w.clusters.push(name.to_string());
                }
            }
        }
    }

    /// Records that cluster `name` uses the assignment of an EDS service
    /// of another name.
    fn note_eds_user(&mut self, name: &str, c: &m::Cluster) {
        if let Some(service) = eds_name(c).filter(|s| *s != name) {
            let users = self.eds_users.entry(service.to_string()).or_default();
            if !users.iter().any(|u| u == name) {
                users.push(name.to_string());
            }
        }
    }
}

/// What an assembly learns about warming resources.
struct Warming {
    now: Instant,
    timeout: Duration,
    /// `cluster "x"`, `listener "y"`: those whose timeout lies ahead.
    descriptions: Vec<String>,
    next_deadline: Option<Instant>,
    /// The clusters among them.
    clusters: Vec<String>,
}

/// Whether a resource naming the SDS secrets `names` waits for one.
fn missing_secret(
    secrets: &HashMap<String, Arc<m::tls::Secret>>,
    elsewhere: bool,
    names: &[String],
) -> bool {
    !elsewhere && names.iter().any(|n| !secrets.contains_key(n))
}

/// Whether both maps hold the same `Arc`s under the same names.
fn same_arcs<T>(a: &HashMap<String, Arc<T>>, b: &HashMap<String, Arc<T>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| Arc::ptr_eq(v, w)))
}

/// [`same_arcs`] for clusters: at once when the maps share every shard.
fn same_clusters(a: &m::ShardedMap<Arc<m::Cluster>>, b: &m::ShardedMap<Arc<m::Cluster>>) -> bool {
    a.same_shards(b)
        || (a.len() == b.len()
            && a.iter()
                .all(|(k, v)| b.get(k).is_some_and(|w| Arc::ptr_eq(v, w))))
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

fn eds_name(c: &m::Cluster) -> Option<&str> {
    match &c.kind {
        m::ClusterKind::Eds { service_name } => Some(service_name),
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

    /// An EDS cluster whose assignment is `service`'s.
    fn eds_cluster_of(name: &str, service: &str) -> Any {
        any(
            CLUSTER,
            &ClusterPb {
                name: name.into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                eds_cluster_config: Some(EdsClusterConfig {
                    service_name: service.into(),
                    ..Default::default()
                }),
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

    /// Assembles after `prev`, the snapshot being replaced.
    fn assemble_after(st: &mut Store, prev: &m::Snapshot) -> m::Snapshot {
        st.assemble(
            &m::Snapshot::default(),
            Some(prev),
            Duration::from_secs(10),
            "v".into(),
        )
        .snapshot
    }

    fn changes(s: &m::Snapshot) -> Option<(u64, Vec<&str>)> {
        s.cluster_changes
            .as_ref()
            .map(|c| (c.after, c.names.iter().map(String::as_str).collect()))
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
        assert_eq!(changes(&first), None, "nothing to start from");
        // Nothing changed: every cluster is the same one, and the snapshot
        // says none changed.
        let again = assemble_after(&mut st, &first);
        for (name, c) in &first.clusters {
            assert!(Arc::ptr_eq(c, &again.clusters[name]), "{name} rebuilt");
        }
        assert_eq!(changes(&again), Some((first.serial, vec![])));
        // The same assignment sent again (state of the world) is no change.
        let same = st.get(ENDPOINT, "a").expect("stored").parsed.clone();
        st.upsert(ENDPOINT, "a".into(), "2".into(), Vec::new(), same);
        let again = assemble_after(&mut st, &again);
        assert_eq!(changes(&again).map(|c| c.1), Some(vec![]));
        // b's endpoints change: b alone is new, with the new endpoint, and
        // the snapshot names b alone as changed.
        put(&mut st, ENDPOINT, &assignment("b", 81));
        let next = assemble_after(&mut st, &again);
        assert!(Arc::ptr_eq(&first.clusters["a"], &next.clusters["a"]));
        assert!(Arc::ptr_eq(&first.clusters["c"], &next.clusters["c"]));
        assert!(!Arc::ptr_eq(&first.clusters["b"], &next.clusters["b"]));
        assert_eq!(changes(&next), Some((again.serial, vec!["b"])));
        let m::ClusterKind::Static(eps) = &next.clusters["b"].kind else {
            panic!("b is not resolved: {:?}", next.clusters["b"].kind);
        };
        assert_eq!(eps[0].address.ip().map(|a| a.port()), Some(81));
        // A full assembly gives the very same clusters.
        let full = assemble(&mut st);
        assert_eq!(full.clusters.len(), 3);
        for (name, c) in &next.clusters {
            assert!(Arc::ptr_eq(c, &full.clusters[name]), "{name} differs");
        }
        // A removed cluster is forgotten.
        st.remove(CLUSTER, "c");
        let last = assemble_after(&mut st, &full);
        assert!(!last.clusters.contains_key("c"));
        assert!(!st.resolved.contains_key("c"));
        assert_eq!(changes(&last), Some((full.serial, vec!["c"])));
        // Starting from a snapshot that is not the last one assembled is a
        // full assembly.
        let stale = assemble_after(&mut st, &next);
        assert_eq!(changes(&stale), None);
        assert!(!stale.clusters.contains_key("c"));
    }

    #[test]
    fn a_cluster_warming_for_its_endpoints_is_assembled_again_until_they_come() {
        let mut st = Store::default();
        put(&mut st, CLUSTER, &eds_cluster("a"));
        put(&mut st, ENDPOINT, &assignment("a", 80));
        let first = assemble(&mut st);
        // d arrives without its assignment: it warms (absent, as before).
        put(&mut st, CLUSTER, &eds_cluster("d"));
        let a = st.assemble(
            &m::Snapshot::default(),
            Some(&first),
            Duration::from_secs(10),
            "v".into(),
        );
        assert_eq!(a.warming, ["cluster \"d\""]);
        assert!(a.next_deadline.is_some());
        assert!(!a.snapshot.clusters.contains_key("d"));
        assert_eq!(changes(&a.snapshot), Some((first.serial, vec![])));
        // Its assignment comes: d is active, and named as the change.
        put(&mut st, ENDPOINT, &assignment("d", 80));
        let next = assemble_after(&mut st, &a.snapshot);
        assert!(matches!(next.clusters["d"].kind, m::ClusterKind::Static(_)));
        assert_eq!(changes(&next), Some((a.snapshot.serial, vec!["d"])));
        assert!(Arc::ptr_eq(&first.clusters["a"], &next.clusters["a"]));
        // A cluster waiting in vain is active without endpoints once its
        // timeout passes, even when nothing else changes.
        put(&mut st, CLUSTER, &eds_cluster("e"));
        let waiting = assemble_after(&mut st, &next);
        assert!(!waiting.clusters.contains_key("e"));
        let timed_out = st
            .assemble(
                &m::Snapshot::default(),
                Some(&waiting),
                Duration::ZERO,
                "v".into(),
            )
            .snapshot;
        assert!(matches!(
            timed_out.clusters["e"].kind,
            m::ClusterKind::Eds { .. }
        ));
        assert_eq!(changes(&timed_out).map(|c| c.1), Some(vec!["e"]));
    }

    #[test]
    fn an_assignment_shared_by_clusters_of_other_names_rebuilds_them_all() {
        let mut st = Store::default();
        put(&mut st, CLUSTER, &eds_cluster("a"));
        put(&mut st, ENDPOINT, &assignment("a", 80));
        for name in ["p", "q"] {
            put(&mut st, CLUSTER, &eds_cluster_of(name, "shared"));
        }
        put(&mut st, ENDPOINT, &assignment("shared", 80));
        let first = assemble(&mut st);
        assert_eq!(first.clusters.len(), 3);
        put(&mut st, ENDPOINT, &assignment("shared", 81));
        let next = assemble_after(&mut st, &first);
        assert_eq!(changes(&next), Some((first.serial, vec!["p", "q"])));
        assert!(Arc::ptr_eq(&first.clusters["a"], &next.clusters["a"]));
        // q moves to a's assignment: a change of a reaches it from now on.
        put(&mut st, CLUSTER, &eds_cluster_of("q", "a"));
        let moved = assemble_after(&mut st, &next);
        assert_eq!(changes(&moved).map(|c| c.1), Some(vec!["q"]));
        put(&mut st, ENDPOINT, &assignment("a", 82));
        let last = assemble_after(&mut st, &moved);
        assert_eq!(changes(&last).map(|c| c.1), Some(vec!["a", "q"]));
        let m::ClusterKind::Static(eps) = &last.clusters["q"].kind else {
            panic!("q is not resolved");
        };
        assert_eq!(eps[0].address.ip().map(|a| a.port()), Some(82));
    }
}
