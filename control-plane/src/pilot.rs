//! `ferry-pilot serve`: Istio configuration from a [`Source`], validated as
//! galley does, translated per proxy as istiod does, served over ADS. Each
//! proxy gets a cache of its own, computed when it connects (its node names
//! its namespace, labels and service account) and recomputed on every
//! accepted change of the source; a type whose resources come out the same
//! is not pushed again, and the caches share one copy of every encoded
//! resource equal across proxies. The outbound clusters and endpoints are
//! translated and encoded once per proxy class (see
//! [`crate::istio::translate::outbound`]) and change. A change with errors is refused with the
//! validation messages and the last good configuration keeps serving.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

use crate::istio::source::{Snapshot, Source};
use crate::istio::translate::{
    Mesh, MeshOptions, Outbound, OutboundClass, Proxy, ProxyConfig, credentials,
};
use crate::istio::validate::{self, Severity};
use crate::xds::{
    CLUSTER, Cache, CachedResource, ENDPOINT, Interner, LISTENER, ROUTE, SECRET, to_any,
};

/// The secrets `default` (certificate and key) and `ROOTCA` (the root), as
/// SDS resources.
fn workload_secrets(
    leaf: &str,
    key: &str,
    root: &str,
) -> Vec<(String, envoy_types::pb::google::protobuf::Any)> {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, Secret, TlsCertificate, secret::Type,
    };
    let inline = |s: &str| {
        Some(DataSource {
            specifier: Some(Specifier::InlineString(s.to_string())),
            ..Default::default()
        })
    };
    let cert = Secret {
        name: "default".into(),
        r#type: Some(Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(leaf),
            private_key: inline(key),
            ..Default::default()
        })),
    };
    let root = Secret {
        name: "ROOTCA".into(),
        r#type: Some(Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(root),
            ..Default::default()
        })),
    };
    vec![
        ("default".into(), to_any(&cert)),
        ("ROOTCA".into(), to_any(&root)),
    ]
}

/// Why a configuration was refused: every problem, one message each.
#[derive(Debug, thiserror::Error)]
#[error("configuration refused:\n{}", .0.join("\n"))]
pub struct Refused(pub Vec<String>);

/// The errors of a snapshot: load errors (syntax, unknown fields) and
/// validation findings of severity Error.
pub fn problems(snapshot: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = snapshot.errors.iter().map(|e| e.to_string()).collect();
    out.extend(
        validate::validate(snapshot)
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.to_string()),
    );
    out
}

/// [`problems`] and those the mesh configuration reveals: the providers
/// Telemetry resources name.
pub fn problems_in_mesh(snapshot: &Snapshot, options: &MeshOptions) -> Vec<String> {
    let mut out = problems(snapshot);
    out.extend(
        validate::validate_telemetry_providers(snapshot, options)
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.to_string()),
    );
    out
}

struct State {
    mesh: Arc<Mesh>,
    /// Every proxy seen, by node id: its identity and its cache.
    proxies: HashMap<String, (Proxy, Cache)>,
    /// The outbound part of each proxy class of `mesh`, encoded once for
    /// every proxy of the class (the messages themselves are dropped once
    /// encoded).
    encoded: HashMap<OutboundClass, Arc<Encoded>>,
}

/// An [`Outbound`] encoded as the caches hold it.
struct Encoded {
    clusters: Vec<(Arc<str>, CachedResource)>,
    endpoints: Vec<(Arc<str>, CachedResource)>,
}

impl Encoded {
    fn new(outbound: &Outbound, interner: &Interner) -> Self {
        let encode = |any| CachedResource::new(any, Some(interner));
        Self {
            clusters: outbound
                .clusters
                .iter()
                .map(|c| (Arc::from(c.name.as_str()), encode(to_any(c))))
                .collect(),
            endpoints: outbound
                .endpoints
                .iter()
                .map(|e| (Arc::from(e.cluster_name.as_str()), encode(to_any(e))))
                .collect(),
        }
    }
}

/// The encodings of the route configurations that the proxies of one class
/// translated for a change share (see `translate::route`), by the
/// configuration's address. Holding the configurations keeps the mesh's memo
/// of them, and so the sharing, alive while the class is translated.
#[derive(Default)]
struct RouteEncodings(HashMap<usize, (Arc<RouteConfiguration>, Arc<str>, CachedResource)>);

impl RouteEncodings {
    fn encode(
        &mut self,
        r: &Arc<RouteConfiguration>,
        interner: &Interner,
    ) -> (Arc<str>, CachedResource) {
        let (_, name, encoded) = self.0.entry(Arc::as_ptr(r) as usize).or_insert_with(|| {
            (
                r.clone(),
                Arc::from(r.name.as_str()),
                CachedResource::new(to_any(&**r), Some(interner)),
            )
        });
        (name.clone(), encoded.clone())
    }
}

/// Translates `proxy` (of outbound `class`) on `mesh` and fills its cache:
/// the outbound part of its class is translated and encoded by the first
/// proxy of the class.
fn translate(
    mesh: &Mesh,
    proxy: &Proxy,
    class: OutboundClass,
    cache: &Cache,
    memo: &mut HashMap<OutboundClass, Arc<Encoded>>,
    routes: &mut RouteEncodings,
    interner: &Interner,
) {
    let (cfg, shared) = match memo.get(&class) {
        Some(shared) => (mesh.proxy_config_own(proxy), shared.clone()),
        None => {
            let (cfg, outbound) = mesh.proxy_config_shared(proxy);
            let shared = Arc::new(Encoded::new(&outbound, interner));
            memo.insert(class, shared.clone());
            (cfg, shared)
        }
    };
    fill(cache, &cfg, &shared, routes, interner);
}

/// A node that connected from an address, with its cache and when the
/// certificate served to it (if any) is due for renewal.
struct Peer {
    ip: std::net::IpAddr,
    cache: Cache,
    renew_at: Option<std::time::Instant>,
}

/// The translation side of the control plane.
pub struct Pilot {
    state: Mutex<State>,
    options: MeshOptions,
    /// The mesh CA, when workload certificates are served over SDS.
    ca: std::sync::OnceLock<Arc<crate::ca::Ca>>,
    /// Where each node connected from, with its cache: whose certificate
    /// it may have.
    peers: Mutex<HashMap<String, Peer>>,
    /// Shares equal encoded resources between the proxies' caches.
    interner: Interner,
}

/// Fills `cache` with `cfg`, the proxy's own resources, and `shared`, the
/// outbound clusters and endpoints of its class.
fn fill(
    cache: &Cache,
    cfg: &ProxyConfig,
    shared: &Encoded,
    shared_routes: &mut RouteEncodings,
    interner: &Interner,
) {
    let encode = |any| CachedResource::new(any, Some(interner));
    // Clusters and endpoints before listeners and routes, as the proxy
    // wants them; a type that did not change is left alone, so that an
    // endpoint change pushes endpoints only. But a changed cluster warms in
    // Envoy until its endpoints come again (a state-of-the-world proxy asks
    // for them anew and waits for an answer), and a changed listener until
    // its routes do: with clusters, endpoints go out again, and with
    // listeners, routes, as istiod pushes them.
    let before = cache.version(CLUSTER);
    let clusters_changed = cache.replace_cached(
        CLUSTER,
        cfg.clusters
            .iter()
            .map(|c| (Arc::from(c.name.as_str()), encode(to_any(c))))
            .chain(shared.clusters.iter().cloned()),
    ) != before;
    let endpoints = cfg
        .endpoints
        .iter()
        .map(|e| (Arc::from(e.cluster_name.as_str()), encode(to_any(e))))
        .chain(shared.endpoints.iter().cloned());
    if clusters_changed {
        cache.set_cached(ENDPOINT, endpoints);
    } else {
        cache.replace_cached(ENDPOINT, endpoints);
    }
    let before = cache.version(LISTENER);
    let listeners_changed = cache.replace(
        LISTENER,
        cfg.listeners.iter().map(|l| (l.name.clone(), to_any(l))),
    ) != before;
    let routes: Vec<_> = cfg
        .routes
        .iter()
        .map(|r| shared_routes.encode(r, interner))
        .collect();
    if listeners_changed {
        cache.set_cached(ROUTE, routes);
    } else {
        cache.replace_cached(ROUTE, routes);
    }
    // credentialName secrets, beside the workload's own (`default`,
    // `ROOTCA`), which only the CA side changes.
    let current = cache.snapshot(SECRET);
    let wanted: HashMap<String, envoy_types::pb::google::protobuf::Any> = cfg
        .secrets
        .iter()
        .map(|s| (s.name.clone(), to_any(s)))
        .collect();
    let stale: Vec<String> = current
        .resources
        .keys()
        .filter(|n| n.starts_with(credentials::PREFIX) && !wanted.contains_key(&***n))
        .map(|n| n.to_string())
        .collect();
    let changed: Vec<(String, envoy_types::pb::google::protobuf::Any)> = wanted
        .into_iter()
        .filter(|(n, a)| {
            current
                .resources
                .get(n.as_str())
                .is_none_or(|c| *c.any != *a)
        })
        .collect();
    if !stale.is_empty() || !changed.is_empty() {
        cache.apply(SECRET, changed, stale);
    }
    // NDS: one unnamed resource, as istiod sends it.
    if let Some(nt) = &cfg.name_table {
        cache.replace(
            ferry_envoy_json::istio_nds::NAME_TABLE_TYPE,
            [(
                String::new(),
                crate::istio::translate::name_table::to_any(nt),
            )],
        );
    }
}

impl Pilot {
    /// Builds from a first snapshot, which must be valid.
    pub fn new(snapshot: &Snapshot, options: MeshOptions) -> Result<Self, Refused> {
        let errors = problems_in_mesh(snapshot, &options);
        if !errors.is_empty() {
            return Err(Refused(errors));
        }
        Ok(Self {
            state: Mutex::new(State {
                mesh: Arc::new(Mesh::new(snapshot, options.clone())),
                proxies: HashMap::new(),
                encoded: HashMap::new(),
            }),
            options,
            ca: std::sync::OnceLock::new(),
            peers: Mutex::new(HashMap::new()),
            interner: Interner::new(),
        })
    }

    /// Namespace and service account of the workload at `ip` (a pod or a
    /// WorkloadEntry), which the CA takes as the caller's identity.
    pub fn workload_at(&self, ip: std::net::IpAddr) -> Option<(String, String)> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ip = ip.to_string();
        st.mesh
            .registry
            .workloads
            .iter()
            .find(|w| w.ip.as_deref() == Some(ip.as_str()))
            .map(|w| (w.namespace.clone(), w.service_account.clone()))
    }

    /// Serves workload certificates from `ca` over SDS (see
    /// [`Pilot::cache_for_peer`]). Only the first call counts.
    pub fn set_ca(&self, ca: Arc<crate::ca::Ca>) {
        let _ = self.ca.set(ca);
    }

    /// The cache of a node connecting from `peer`. With a CA, it also holds
    /// the SDS secrets istio-agent would serve (`default`, `ROOTCA`) for
    /// the workload at the peer's address (never for the identity the node
    /// claims), so a proxy without an agent of its own gets its
    /// certificate from the control plane: the key is made here.
    pub fn cache_for_peer(&self, node: &Node, peer: Option<std::net::IpAddr>) -> Cache {
        let cache = self.cache_for(node);
        if let Some(ip) = peer {
            let renew_at = self.serve_certificate(&node.id, ip, &cache, false);
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let entry = peers.entry(node.id.clone()).or_insert(Peer {
                ip,
                cache: cache.clone(),
                renew_at: None,
            });
            entry.ip = ip;
            entry.renew_at = renew_at.or(entry.renew_at);
        }
        cache
    }

    /// Puts a new workload certificate of the pod at `ip` into `cache`
    /// (unless it holds one and `renew` is false, or no pod has that
    /// address yet: a sidecar may connect before its Pod is known, and
    /// every update tries again). Returns when to renew what it served:
    /// at half its lifetime, as istio-agent renews.
    fn serve_certificate(
        &self,
        node: &str,
        ip: std::net::IpAddr,
        cache: &Cache,
        renew: bool,
    ) -> Option<std::time::Instant> {
        let ca = self.ca.get()?;
        if !renew && cache.snapshot(SECRET).resources.contains_key("default") {
            return None;
        }
        let (ns, sa) = self.workload_at(ip)?;
        let identity = ca.identity(&ns, &sa);
        match ca.issue(&identity, None) {
            Ok((leaf, key)) => {
                cache.apply(SECRET, workload_secrets(&leaf, &key, ca.root_pem()), []);
                tracing::info!(xds.node = %node, ca.identity = %identity, renewal = renew, "workload certificate served over SDS");
                Some(std::time::Instant::now() + ca.default_ttl() / 2)
            }
            Err(e) => {
                tracing::warn!(xds.node = %node, error = %e, "no workload certificate");
                None
            }
        }
    }

    /// Serves new certificates (new keys) to the nodes whose certificate
    /// is past half its lifetime; returns how many were renewed.
    pub fn renew_certificates(&self) -> usize {
        let now = std::time::Instant::now();
        let due: Vec<(String, std::net::IpAddr, Cache)> = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, p)| p.renew_at.is_some_and(|t| t <= now))
            .map(|(n, p)| (n.clone(), p.ip, p.cache.clone()))
            .collect();
        let mut renewed = 0;
        for (node, ip, cache) in due {
            let next = self.serve_certificate(&node, ip, &cache, true);
            renewed += usize::from(next.is_some());
            if let Some(p) = self
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&node)
            {
                p.renew_at = next;
            }
        }
        renewed
    }

    /// The cache a connecting node is served from.
    pub fn cache_for(&self, node: &Node) -> Cache {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, cache)) = st.proxies.get(&node.id) {
            return cache.clone();
        }
        let cache = Cache::with_interner(self.interner.clone());
        match Proxy::from_node(node) {
            Ok(mut proxy) => {
                let st = &mut *st;
                st.mesh.complete_proxy(&mut proxy);
                translate(
                    &st.mesh,
                    &proxy,
                    st.mesh.outbound_class(&proxy),
                    &cache,
                    &mut st.encoded,
                    &mut RouteEncodings::default(),
                    &self.interner,
                );
                tracing::info!(xds.node = %node.id, proxy.namespace = %proxy.namespace, "proxy connected");
                st.proxies.insert(node.id.clone(), (proxy, cache.clone()));
            }
            // The node cannot be placed: it gets nothing rather than
            // somebody else's configuration.
            Err(e) => tracing::warn!(xds.node = %node.id, error = %e, "proxy cannot be served"),
        }
        cache
    }

    /// Applies a new snapshot of the source: refused with its problems, or
    /// translated and pushed to every known proxy. Returns how many proxies
    /// were updated.
    pub fn update(&self, snapshot: &Snapshot) -> Result<usize, Refused> {
        let errors = problems_in_mesh(snapshot, &self.options);
        if !errors.is_empty() {
            return Err(Refused(errors));
        }
        let mesh = Arc::new(Mesh::new(snapshot, self.options.clone()));
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        st.mesh = mesh.clone();
        // The encodings were of the previous mesh's translations.
        st.encoded.clear();
        // Class by class: the route configurations a class shares are held
        // while its proxies are translated, and no longer (a mesh of many
        // classes would otherwise hold every class's at once).
        let mut classes: HashMap<OutboundClass, Vec<&mut (Proxy, Cache)>> = HashMap::new();
        for entry in st.proxies.values_mut() {
            mesh.complete_proxy(&mut entry.0);
            classes
                .entry(mesh.outbound_class(&entry.0))
                .or_default()
                .push(entry);
        }
        for (class, members) in classes {
            let mut routes = RouteEncodings::default();
            for (proxy, cache) in members.into_iter().map(|e| &*e) {
                translate(
                    &mesh,
                    proxy,
                    class.clone(),
                    cache,
                    &mut st.encoded,
                    &mut routes,
                    &self.interner,
                );
            }
        }
        let n = st.proxies.len();
        drop(guard);
        // Pods that appeared since their proxy connected get their
        // certificate now.
        let peers: Vec<(String, std::net::IpAddr, Cache)> = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, p)| (n.clone(), p.ip, p.cache.clone()))
            .collect();
        for (node, ip, cache) in peers {
            if let Some(at) = self.serve_certificate(&node, ip, &cache, false)
                && let Some(p) = self
                    .peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&node)
            {
                p.renew_at = Some(at);
            }
        }
        Ok(n)
    }

    /// Follows `source`: after each change (debounced by `quiet`), re-lists
    /// and applies it. Runs until the source goes away.
    pub async fn follow(self: Arc<Self>, source: Arc<dyn Source>, quiet: Duration) {
        let mut changes = source.subscribe();
        while changes.changed().await.is_ok() {
            // Editors write files in several steps: wait for calm.
            loop {
                tokio::time::sleep(quiet).await;
                if !changes.has_changed().unwrap_or(false) {
                    break;
                }
                changes.borrow_and_update();
            }
            match source.list() {
                Ok(snapshot) => match self.update(&snapshot) {
                    Ok(n) => tracing::info!(proxies = n, "configuration pushed"),
                    Err(refused) => {
                        for p in &refused.0 {
                            tracing::error!(config.error = %p, "configuration refused; the last good one keeps serving");
                        }
                    }
                },
                Err(e) => tracing::error!(error = %e, "cannot read the configuration source"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn sds_certificates_follow_the_peer_address_and_are_renewed_at_half_life() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default, labels: {app: a}}\n\
                    spec: {serviceAccountName: sa1, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.5}\n";
        let snapshot =
            crate::istio::source::parse_documents(yaml, std::path::Path::new("pods.yaml"));
        let pilot = Pilot::new(&snapshot, MeshOptions::default()).unwrap();
        let ca = Ca::generate("cluster.local")
            .unwrap()
            .with_default_ttl(Duration::from_secs(2));
        pilot.set_ca(Arc::new(ca));

        // A node claiming the pod's name from another address gets nothing.
        let stranger = pilot.cache_for_peer(
            &node("sidecar~10.0.0.5~p.default~default.svc.cluster.local"),
            Some("10.0.0.9".parse().unwrap()),
        );
        assert!(stranger.snapshot(SECRET).resources.is_empty());

        // From the pod's address: the pod's service account.
        let cache = pilot.cache_for_peer(
            &node("sidecar~10.0.0.5~p.default~x"),
            Some("10.0.0.5".parse().unwrap()),
        );
        let first = cache.snapshot(SECRET);
        assert_eq!(
            first.resources.keys().map(|k| &**k).collect::<Vec<_>>(),
            ["ROOTCA", "default"]
        );
        assert_eq!(pilot.renew_certificates(), 0, "nothing is due yet");
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(pilot.renew_certificates(), 1);
        let second = cache.snapshot(SECRET);
        assert_ne!(first.version, second.version);
        assert_ne!(
            first.resources["default"].version, second.resources["default"].version,
            "a renewal is a new certificate and key"
        );
        assert_eq!(
            first.resources["ROOTCA"].version,
            second.resources["ROOTCA"].version
        );
    }
}
