//! Per-proxy translation of Istio configuration into Envoy v3 resources
//! shaped like istiod's: the `virtualOutbound` / `virtualInbound` capture
//! listeners, per-port outbound listeners with RDS route names like `9080`,
//! `outbound|9080|v1|reviews.default.svc.cluster.local` clusters with their
//! ClusterLoadAssignments, and `inbound|PORT||` clusters to the local app.
//! [`Mesh`] indexes a snapshot once; [`Mesh::proxy_config`] answers for one
//! [`Proxy`] (its namespace, labels, service account and IPs, which decide
//! the Sidecar scope, `sourceLabels` matches and inbound ports; its
//! locality, which orders endpoints). A `router` node (a gateway) gets the
//! listeners of the Gateways selecting it instead of the capture listeners
//! (`gateway`); `delegate` merges delegated rules, `locality` applies
//! locality load balancing, PeerAuthentication decides the inbound mTLS
//! chains and AuthorizationPolicy adds RBAC filters to them (`authz`,
//! `ext_authz`).

pub mod access_log;
pub mod authz;
mod cluster;
pub mod credentials;
mod delegate;
pub mod ext_authz;
mod gateway;
pub mod hbone;
pub mod jwt;
mod listener;
pub mod locality;
pub mod name_table;
pub mod outbound;
pub mod registry;
mod route;
pub mod telemetry;
mod util;

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::{Struct, value::Kind};

use super::names::{self, DEFAULT_DOMAIN, ROOT_NAMESPACE};
use super::source::{Resource, Snapshot, Spec};
use super::types::mesh::{DefaultProviders, ExtensionProvider, PathNormalization, ProxyTracing};
use super::types::networking::{
    DestinationRule, OutboundMode, Sidecar, Subset, TrafficPolicy, VirtualService,
};
use super::types::security::{MtlsMode, MutualTls};
pub use outbound::{Outbound, OutboundClass};
pub use registry::{Registry, Service, ServicePort};

/// Everything one proxy is served.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyConfig {
    pub listeners: Vec<Listener>,
    /// A sidecar's are shared with the proxies of its class (see
    /// [`route`]'s memo).
    pub routes: Vec<std::sync::Arc<RouteConfiguration>>,
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    /// The DNS name table (NDS) of a sidecar; `None` for gateways.
    pub name_table: Option<ferry_envoy_json::istio_nds::NameTable>,
    /// The `kubernetes://` secrets (credentialName) its listeners and
    /// clusters name, from the Secrets of its namespace.
    pub secrets: Vec<envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret>,
}

/// What a proxy is, from the first field of its node id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NodeType {
    /// `sidecar~…`: captures its pod's traffic.
    #[default]
    Sidecar,
    /// `router~…`: a gateway, serving the ports its Gateways declare.
    Router,
}

/// The proxy a configuration is made for, from its node metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Proxy {
    pub node_type: NodeType,
    /// The node id (`sidecar~10.0.0.5~reviews-v1-abc.default~default.svc.cluster.local`).
    pub id: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ips: Vec<String>,
    /// Pod name, when the node id carries it.
    pub pod_name: Option<String>,
    /// `region/zone/subzone` from the node's locality, else its Pod's.
    pub locality: String,
    /// The proxy implements Istio's `istio.stats` network filter (Ferry,
    /// or istio-proxy, which says `ISTIO_VERSION`); upstream Envoy would
    /// reject the listener.
    pub istio_network_stats: bool,
    /// The node's `cluster` (`app.namespace`): the service name of the
    /// spans it reports.
    pub cluster: String,
    /// `MESH_ID` and `CLUSTER_ID` of the node metadata (span tags).
    pub mesh_id: String,
    pub cluster_id: String,
    /// `INTERCEPTION_MODE: NONE`: nothing redirects the workload's traffic
    /// (a VM, a pod without capture); listeners bind their ports for real.
    pub interception_none: bool,
    /// `ENABLE_HBONE: "true"`: the sidecar accepts HBONE on 15008 (in an
    /// ambient mesh it gets `connect_terminate` and `main_internal`).
    pub enable_hbone: bool,
    /// `DISABLE_HBONE_SEND: "true"`: no tunnelled endpoints and no
    /// `connect_originate` cluster for this proxy.
    pub disable_hbone_send: bool,
    /// `ISTIO_VERSION` of istio-proxy (`1.29.2`), when the node says it.
    pub istio_version: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error(
        "node {0:?} has no namespace: set metadata NAMESPACE or use an id like sidecar~IP~pod.namespace~namespace.svc.cluster.local"
    )]
    NoNamespace(String),
}

impl Proxy {
    /// Reads what istio-agent puts in the node: `NAMESPACE`, `LABELS`,
    /// `SERVICE_ACCOUNT`, `INSTANCE_IPS`, and the `type~ip~pod.ns~domain` id
    /// as a fallback for the namespace, IP and pod name.
    pub fn from_node(node: &Node) -> Result<Self, ProxyError> {
        let meta = node.metadata.as_ref();
        let text = |key: &str| {
            meta.and_then(|m| m.fields.get(key))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                    _ => None,
                })
        };
        let mut parts = node.id.split('~');
        let (id_type, id_ip, id_pod) = (parts.next(), parts.next(), parts.next());
        let node_type = match id_type {
            Some("router") => NodeType::Router,
            _ => NodeType::Sidecar,
        };
        let (pod_name, id_ns) = match id_pod.and_then(|p| p.split_once('.')) {
            Some((pod, ns)) => (Some(pod.to_string()), Some(ns.to_string())),
            None => (None, None),
        };
        let namespace = text("NAMESPACE")
            .or(id_ns)
            .ok_or_else(|| ProxyError::NoNamespace(node.id.clone()))?;
        let mut ips: Vec<String> = text("INSTANCE_IPS")
            .map(|s| s.split(',').map(|ip| ip.trim().to_string()).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = id_ip.filter(|ip| !ip.is_empty())
        {
            ips.push(ip.to_string());
        }
        let labels = meta
            .and_then(|m| m.fields.get("LABELS"))
            .and_then(|v| match &v.kind {
                Some(Kind::StructValue(s)) => Some(string_map(s)),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Self {
            node_type,
            id: node.id.clone(),
            namespace,
            labels,
            service_account: text("SERVICE_ACCOUNT").unwrap_or_default(),
            ips,
            pod_name: text("POD_NAME").or(pod_name),
            locality: node
                .locality
                .as_ref()
                .filter(|l| !l.region.is_empty())
                .map(|l| {
                    [l.region.as_str(), &l.zone, &l.sub_zone]
                        .join("/")
                        .trim_end_matches('/')
                        .to_string()
                })
                .unwrap_or_default(),
            istio_network_stats: node.user_agent_name == "ferry" || text("ISTIO_VERSION").is_some(),
            cluster: node.cluster.clone(),
            mesh_id: text("MESH_ID").unwrap_or_default(),
            cluster_id: text("CLUSTER_ID").unwrap_or_default(),
            interception_none: text("INTERCEPTION_MODE").as_deref() == Some("NONE"),
            enable_hbone: text("ENABLE_HBONE").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            disable_hbone_send: text("DISABLE_HBONE_SEND")
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            istio_version: text("ISTIO_VERSION"),
        })
    }
}

fn string_map(s: &Struct) -> BTreeMap<String, String> {
    s.fields
        .iter()
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

/// Mesh-wide settings (istiod's MeshConfig, the parts translation uses).
#[derive(Clone, Debug, PartialEq)]
pub struct MeshOptions {
    /// DNS suffix of Kubernetes services.
    pub domain: String,
    /// Namespace of mesh-wide Sidecars and DestinationRules.
    pub root_namespace: String,
    /// Where traffic to unknown destinations goes.
    pub outbound_traffic_policy: OutboundMode,
    /// Trust domain of SPIFFE identities (`spiffe://cluster.local/ns/…`).
    pub trust_domain: String,
    /// Other trust domains treated as the local one
    /// (`meshConfig.trustDomainAliases`): AuthorizationPolicy principals
    /// naming any of them (or `cluster.local`) match all of them.
    pub trust_domain_aliases: Vec<String>,
    /// `meshConfig.extensionProviders`: the external authorizers that
    /// CUSTOM AuthorizationPolicies name.
    pub extension_providers: Vec<ExtensionProvider>,
    /// `meshConfig.accessLogFile` and its format.
    pub access_log: access_log::MeshAccessLog,
    /// `meshConfig.defaultProviders`: the tracer and access loggers where
    /// no Telemetry resource says otherwise.
    pub default_providers: DefaultProviders,
    /// `meshConfig.enableTracing` (istiod's default: on): without a
    /// Telemetry or default tracing provider, connection managers trace
    /// with the proxy's bootstrap tracer.
    pub enable_tracing: bool,
    /// `defaultConfig.tracing`: sampling (percent), custom tags and path
    /// tag length.
    pub proxy_tracing: ProxyTracing,
    /// `meshConfig.pathNormalization.normalization`.
    pub path_normalization: PathNormalization,
    /// Ambient mode (istiod's `PILOT_ENABLE_AMBIENT`; off by default):
    /// HBONE resources for every sidecar and gateway, see [`hbone`].
    pub ambient: bool,
    /// `PILOT_PREFER_SENDING_HBONE`: HBONE even to endpoints that accept
    /// Istio mTLS.
    pub prefer_hbone_send: bool,
    /// `meshConfig.hboneIdleTimeout` (istiod's default: 1h).
    pub hbone_idle_timeout: Option<std::time::Duration>,
    /// `meshConfig.connectTimeout` (istiod's default: 10s), of the
    /// clusters istiod builds from it (`connect_originate`).
    pub connect_timeout: std::time::Duration,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_string(),
            root_namespace: ROOT_NAMESPACE.to_string(),
            outbound_traffic_policy: OutboundMode::AllowAny,
            trust_domain: DEFAULT_DOMAIN.to_string(),
            trust_domain_aliases: Vec::new(),
            extension_providers: telemetry::builtin_providers(),
            access_log: Default::default(),
            default_providers: DefaultProviders::default(),
            enable_tracing: true,
            proxy_tracing: ProxyTracing::default(),
            path_normalization: PathNormalization::Default,
            ambient: false,
            prefer_hbone_send: false,
            hbone_idle_timeout: None,
            connect_timeout: std::time::Duration::from_secs(10),
        }
    }
}

impl MeshOptions {
    /// What of the mesh configuration's telemetry settings translation
    /// cannot honour, one message each (empty when all is well).
    pub fn telemetry_problems(&self) -> Vec<String> {
        telemetry::check_mesh(
            &self.extension_providers,
            &self.default_providers,
            &self.proxy_tracing,
        )
    }

    /// The defaults with what an istiod `mesh` configuration sets.
    pub fn from_mesh_config(cfg: &super::types::mesh::MeshConfig) -> Self {
        let mut out = Self::default();
        if let Some(td) = cfg.trust_domain.as_ref().filter(|t| !t.is_empty()) {
            out.trust_domain.clone_from(td);
        }
        out.trust_domain_aliases
            .clone_from(&cfg.trust_domain_aliases);
        if let Some(ns) = cfg.root_namespace.as_ref().filter(|n| !n.is_empty()) {
            out.root_namespace.clone_from(ns);
        }
        if let Some(mode) = cfg.outbound_traffic_policy.as_ref().and_then(|p| p.mode) {
            out.outbound_traffic_policy = mode;
        }
        out.extension_providers.clone_from(&cfg.extension_providers);
        // istiod's built-in providers (`envoy`, `prometheus`) unless the
        // configuration defines its own of the same name.
        for b in telemetry::builtin_providers() {
            if !out.extension_providers.iter().any(|p| p.name == b.name) {
                out.extension_providers.push(b);
            }
        }
        out.default_providers.clone_from(&cfg.default_providers);
        out.enable_tracing = cfg.enable_tracing.unwrap_or(true);
        if let Some(t) = &cfg.default_config.tracing {
            out.proxy_tracing.clone_from(t);
        }
        out.access_log = access_log::MeshAccessLog {
            file: cfg.access_log_file.clone(),
            json: cfg.access_log_encoding.eq_ignore_ascii_case("JSON"),
            format: cfg.access_log_format.clone(),
            disable_listener_log: cfg.disable_envoy_listener_log,
        };
        if let Some(p) = &cfg.path_normalization {
            out.path_normalization = p.normalization;
        }
        out.hbone_idle_timeout = cfg.hbone_idle_timeout.map(|d| d.0);
        if let Some(d) = cfg.connect_timeout {
            out.connect_timeout = d.0;
        }
        out
    }
}

/// An indexed snapshot, ready to translate for any proxy.
#[derive(Debug)]
pub struct Mesh {
    pub options: MeshOptions,
    pub registry: Registry,
    virtual_services: Vec<Resource>,
    destination_rules: Vec<Resource>,
    sidecars: Vec<Resource>,
    gateways: Vec<Resource>,
    peer_authentications: Vec<Resource>,
    authorization_policies: Vec<Resource>,
    request_authentications: Vec<Resource>,
    telemetries: Vec<Resource>,
    secrets: Vec<Resource>,
    /// The outbound clusters and endpoints translated so far, by proxy
    /// class.
    outbound: outbound::Memo,
    /// The sidecar route configurations translated so far, by class.
    routes: route::Memo,
}

impl Mesh {
    pub fn new(snapshot: &Snapshot, options: MeshOptions) -> Self {
        let pick = |f: fn(&Spec) -> bool| -> Vec<Resource> {
            snapshot
                .resources
                .iter()
                .filter(|r| f(&r.spec))
                .cloned()
                .collect()
        };
        let destination_rules = pick(|s| matches!(s, Spec::DestinationRule(_)));
        let snapshot_vs = pick(|s| matches!(s, Spec::VirtualService(_)));
        Self {
            registry: Registry::build(snapshot, &options.domain),
            outbound: outbound::Memo::new(&destination_rules),
            routes: route::Memo::new(&snapshot_vs),
            virtual_services: snapshot_vs,
            destination_rules,
            sidecars: pick(|s| matches!(s, Spec::Sidecar(_))),
            gateways: pick(|s| matches!(s, Spec::Gateway(_))),
            peer_authentications: pick(|s| matches!(s, Spec::PeerAuthentication(_))),
            authorization_policies: pick(|s| matches!(s, Spec::AuthorizationPolicy(_))),
            request_authentications: pick(|s| matches!(s, Spec::RequestAuthentication(_))),
            telemetries: pick(|s| matches!(s, Spec::Telemetry(_))),
            secrets: pick(|s| matches!(s, Spec::Secret(_))),
            options,
        }
    }

    /// The mTLS mode a PeerAuthentication without selector sets for
    /// `namespace` (its own, else the root namespace's mesh-wide one);
    /// `None` when neither sets one.
    pub fn namespace_mtls(&self, namespace: &str) -> Option<MtlsMode> {
        let wide = |ns: &str| {
            self.peer_authentications
                .iter()
                .find_map(|r| match &r.spec {
                    Spec::PeerAuthentication(pa)
                        if r.meta.namespace == ns && pa.selector.is_none() =>
                    {
                        pa.mtls
                            .as_ref()
                            .and_then(|m| m.mode)
                            .filter(|m| *m != MtlsMode::Unset)
                    }
                    _ => None,
                })
        };
        wide(namespace).or_else(|| wide(&self.options.root_namespace))
    }

    /// The mTLS mode of a workload's inbound `port`, by Istio's
    /// precedence: a PeerAuthentication selecting the workload (its
    /// port-level setting first), then the namespace's, then the mesh's;
    /// `UNSET` defers to the next; PERMISSIVE when nothing says otherwise.
    pub fn workload_mtls(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u32,
    ) -> MtlsMode {
        let set = |m: Option<&MutualTls>| m.and_then(|m| m.mode).filter(|m| *m != MtlsMode::Unset);
        let selected = self
            .peer_authentications
            .iter()
            .find_map(|r| match &r.spec {
                Spec::PeerAuthentication(pa)
                    if r.meta.namespace == namespace
                        && pa
                            .selector
                            .as_ref()
                            .is_some_and(|s| registry::selects(&s.match_labels, labels)) =>
                {
                    set(pa.port_level_mtls.get(&port)).or(set(pa.mtls.as_ref()))
                }
                _ => None,
            });
        selected
            .or_else(|| self.namespace_mtls(namespace))
            .unwrap_or(MtlsMode::Permissive)
    }

    /// Fills what the node left out (labels, service account, IP) from the
    /// proxy's own Pod when the snapshot has it.
    pub fn complete_proxy(&self, proxy: &mut Proxy) {
        let name = proxy
            .pod_name
            .as_deref()
            .map(|p| (p, proxy.namespace.as_str()));
        if let Some(w) = self.registry.find_workload(name, &proxy.ips) {
            if proxy.labels.is_empty() {
                proxy.labels = w.labels.clone();
            }
            if proxy.service_account.is_empty() {
                proxy.service_account = w.service_account.clone();
            }
            if proxy.ips.is_empty() {
                proxy.ips.extend(w.ip.clone());
            }
            if proxy.locality.is_empty() {
                proxy.locality.clone_from(&w.locality);
            }
        }
    }

    /// The listeners, routes, clusters and endpoints for `proxy`.
    pub fn proxy_config(&self, proxy: &Proxy) -> ProxyConfig {
        let (mut out, outbound) = self.proxy_config_shared(proxy);
        // The outbound clusters are named `outbound|…`, which none of the
        // proxy's own are: merged, the order is the one a single sort of
        // everything gives.
        out.clusters.extend(outbound.clusters.iter().cloned());
        out.endpoints.extend(outbound.endpoints.iter().cloned());
        out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
        out.endpoints
            .sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
        out
    }

    /// [`Mesh::proxy_config`] in two parts: what is `proxy`'s own, and the
    /// outbound clusters and endpoints it shares with every proxy of its
    /// [`OutboundClass`] (translated once per class and mesh).
    pub fn proxy_config_shared(&self, proxy: &Proxy) -> (ProxyConfig, std::sync::Arc<Outbound>) {
        let scope = Scope::new(self, proxy);
        let outbound = self.outbound.get(&scope);
        (self.own_config(&scope, Some(&outbound)), outbound)
    }

    /// The first part of [`Mesh::proxy_config_shared`] alone, for a caller
    /// that holds its class's outbound part already (a gateway's still
    /// reads it, for the secrets its clusters name).
    pub fn proxy_config_own(&self, proxy: &Proxy) -> ProxyConfig {
        self.own_config(&Scope::new(self, proxy), None)
    }

    fn own_config(&self, scope: &Scope<'_>, outbound: Option<&Outbound>) -> ProxyConfig {
        let proxy = scope.proxy;
        let mut out = ProxyConfig::default();
        cluster::build(scope, &mut out);
        match proxy.node_type {
            NodeType::Sidecar => {
                listener::build(scope, &mut out);
                out.name_table = Some(name_table::build(scope));
            }
            NodeType::Router => gateway::build(scope, &mut out),
        }
        telemetry::apply(scope, &mut out.listeners);
        // After telemetry: istiod gives these its own filtered logs, which
        // are not written yet.
        hbone::build(scope, &mut out);
        // Only gateways' servers name `kubernetes://` secrets (the
        // sidecars' TLS is the mesh's own): no need to decode every
        // sidecar cluster's TLS context on each push.
        if proxy.node_type == NodeType::Router {
            let held;
            let outbound = match outbound {
                Some(o) => o,
                None => {
                    held = self.outbound.get(scope);
                    &*held
                }
            };
            credentials::build(scope, &mut out, &outbound.clusters);
        }
        out.listeners.sort_by(|a, b| a.name.cmp(&b.name));
        out.routes.sort_by(|a, b| a.name.cmp(&b.name));
        out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
        out.endpoints
            .sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
        out
    }

    /// The class `proxy`'s outbound clusters and endpoints are shared in.
    pub fn outbound_class(&self, proxy: &Proxy) -> OutboundClass {
        self.outbound.class(&Scope::new(self, proxy))
    }

    /// How many outbound classes this mesh has translated.
    pub fn outbound_classes(&self) -> usize {
        self.outbound.len()
    }
}

/// What one proxy sees: the services its Sidecar imports, the routing
/// rules for them and the policies that apply.
pub(crate) struct Scope<'a> {
    pub mesh: &'a Mesh,
    pub proxy: &'a Proxy,
    pub services: Vec<&'a Service>,
    pub outbound_policy: OutboundMode,
    sidecar: Option<(&'a Resource, &'a Sidecar)>,
}

impl<'a> Scope<'a> {
    fn new(mesh: &'a Mesh, proxy: &'a Proxy) -> Self {
        let sidecar = Self::find_sidecar(mesh, proxy);
        let outbound_policy = sidecar
            .and_then(|(_, sc)| sc.outbound_traffic_policy.as_ref())
            .and_then(|p| p.mode)
            .unwrap_or(mesh.options.outbound_traffic_policy);
        let mut scope = Self {
            mesh,
            proxy,
            services: Vec::new(),
            outbound_policy,
            sidecar,
        };
        scope.services = mesh
            .registry
            .services
            .iter()
            .filter(|s| s.visible_from(&proxy.namespace) && scope.imports(&s.namespace, &s.host))
            .collect();
        scope
    }

    /// The Sidecar that applies: one in the proxy's namespace selecting its
    /// labels, else that namespace's selector-less one, else the root
    /// namespace's selector-less one (Istio's precedence).
    fn find_sidecar(mesh: &'a Mesh, proxy: &Proxy) -> Option<(&'a Resource, &'a Sidecar)> {
        let all = mesh.sidecars.iter().filter_map(|r| match &r.spec {
            Spec::Sidecar(sc) => Some((r, &**sc)),
            _ => None,
        });
        let in_ns: Vec<_> = all
            .clone()
            .filter(|(r, _)| r.meta.namespace == proxy.namespace)
            .collect();
        in_ns
            .iter()
            .find(|(_, sc)| {
                sc.workload_selector
                    .as_ref()
                    .is_some_and(|sel| registry::selects(&sel.labels, &proxy.labels))
            })
            .or_else(|| in_ns.iter().find(|(_, sc)| sc.workload_selector.is_none()))
            .copied()
            .or_else(|| {
                all.clone().find(|(r, sc)| {
                    r.meta.namespace == mesh.options.root_namespace
                        && sc.workload_selector.is_none()
                })
            })
    }

    /// Sidecar egress scoping: `namespace/host` entries where the namespace
    /// may be `*` or `.` (the proxy's) and the host a wildcard. Without a
    /// Sidecar (or without egress listeners) everything is imported.
    fn imports(&self, namespace: &str, host: &str) -> bool {
        let Some((_, sc)) = self.sidecar else {
            return true;
        };
        if sc.egress.is_empty() {
            return true;
        }
        sc.egress
            .iter()
            .any(|e| self.egress_imports(e, namespace, host))
    }

    /// Whether the services of `svc` get the per-port outbound listeners of
    /// the catch-all egress listener (one without `port`); those imported
    /// only by egress listeners with a port get that port's listener alone.
    pub(crate) fn catch_all_imports(&self, svc: &Service) -> bool {
        let Some((_, sc)) = self.sidecar else {
            return true;
        };
        sc.egress.is_empty()
            || sc
                .egress
                .iter()
                .any(|e| e.port.is_none() && self.egress_imports(e, &svc.namespace, &svc.host))
    }

    /// Whether one egress listener's `hosts` import `namespace/host`.
    pub(crate) fn egress_imports(
        &self,
        e: &super::types::networking::IstioEgressListener,
        namespace: &str,
        host: &str,
    ) -> bool {
        e.hosts.iter().any(|entry| {
            let Some((ns, pattern)) = entry.split_once('/') else {
                return false;
            };
            let ns_ok = match ns {
                "*" => true,
                "." => namespace == self.proxy.namespace,
                "~" => false,
                other => other == namespace,
            };
            ns_ok && names::host_matches(pattern, host)
        })
    }

    /// The VirtualService bound to the mesh that routes `host`, the oldest
    /// first as istiod would have it (snapshot order stands in for creation
    /// time). Exact hosts win over wildcards.
    pub fn virtual_service(&self, host: &str) -> Option<(&'a Resource, &'a VirtualService)> {
        let mut best: Option<(usize, &'a Resource, &'a VirtualService)> = None;
        for r in &self.mesh.virtual_services {
            let Spec::VirtualService(vs) = &r.spec else {
                continue;
            };
            let ns = &r.meta.namespace;
            if !(vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh")) {
                continue;
            }
            if !registry::exported_to(&vs.export_to, ns, &self.proxy.namespace) {
                continue;
            }
            for h in &vs.hosts {
                let resolved = names::resolve_host(h, ns, &self.mesh.options.domain);
                let rank = if resolved == host {
                    0
                } else if names::host_matches(&resolved, host) {
                    // Longer wildcards are more specific.
                    usize::MAX - resolved.len()
                } else {
                    continue;
                };
                if best.as_ref().is_none_or(|(b, _, _)| rank < *b) {
                    best = Some((rank, r, vs));
                }
            }
        }
        best.map(|(_, r, vs)| (r, vs))
    }

    /// The VirtualService `name` in `namespace`, the target of a delegate.
    pub fn delegate(
        &self,
        name: &str,
        namespace: &str,
    ) -> Option<(&'a Resource, &'a VirtualService)> {
        self.mesh
            .virtual_services
            .iter()
            .find_map(|r| match &r.spec {
                Spec::VirtualService(vs)
                    if r.meta.name == name && r.meta.namespace == namespace =>
                {
                    Some((r, vs))
                }
                _ => None,
            })
    }

    /// The DestinationRule for `host` as istiod picks it: the proxy's
    /// namespace, then the service's, then the root namespace; exact hosts
    /// before wildcards; a workload selector must match the proxy.
    pub fn destination_rule(
        &self,
        service: &Service,
    ) -> Option<(&'a Resource, &'a DestinationRule)> {
        let mut best: Option<((u8, usize), &'a Resource, &'a DestinationRule)> = None;
        for r in &self.mesh.destination_rules {
            let Spec::DestinationRule(dr) = &r.spec else {
                continue;
            };
            let ns = r.meta.namespace.as_str();
            let ns_rank = if ns == self.proxy.namespace {
                0
            } else if ns == service.namespace {
                1
            } else if ns == self.mesh.options.root_namespace {
                2
            } else {
                3
            };
            if ns_rank > 0 && !registry::exported_to(&dr.export_to, ns, &self.proxy.namespace) {
                continue;
            }
            if let Some(sel) = &dr.workload_selector
                && (ns != self.proxy.namespace
                    || !registry::selects(&sel.match_labels, &self.proxy.labels))
            {
                continue;
            }
            let resolved = names::resolve_host(&dr.host, ns, &self.mesh.options.domain);
            let host_rank = if resolved == service.host {
                0
            } else if names::host_matches(&resolved, &service.host) {
                usize::MAX - resolved.len()
            } else {
                continue;
            };
            let rank = (ns_rank, host_rank);
            if best.as_ref().is_none_or(|(b, _, _)| rank < *b) {
                best = Some((rank, r, dr));
            }
        }
        best.map(|(_, r, dr)| (r, dr))
    }

    /// The effective traffic policy of `service` on `port` for `subset`:
    /// the rule's policy, its port-level settings, then the subset's policy
    /// and the subset's port-level settings, each later one overriding the
    /// earlier field by field (loadBalancer, connectionPool,
    /// outlierDetection, tls), as istiod merges them.
    pub fn traffic_policy(
        &self,
        service: &Service,
        port: u32,
        subset: Option<&str>,
    ) -> TrafficPolicy {
        let mut out = TrafficPolicy::default();
        let Some((_, dr)) = self.destination_rule(service) else {
            return out;
        };
        let mut layers: Vec<&TrafficPolicy> = dr.traffic_policy.iter().collect();
        if let Some(name) = subset
            && let Some(tp) = dr
                .subsets
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.traffic_policy.as_ref())
        {
            layers.push(tp);
        }
        for tp in layers {
            merge(&mut out, tp, port);
        }
        out
    }

    /// The subsets of `service`'s DestinationRule.
    pub fn subsets(&self, service: &Service) -> &'a [Subset] {
        self.destination_rule(service)
            .map(|(_, dr)| dr.subsets.as_slice())
            .unwrap_or_default()
    }

    /// Resolves a destination host written in a resource of `namespace`.
    pub fn resolve(&self, host: &str, namespace: &str) -> Option<&'a Service> {
        let fqdn = names::resolve_host(host, namespace, &self.mesh.options.domain);
        self.services
            .iter()
            .copied()
            .find(|s| s.host == fqdn)
            .or_else(|| self.mesh.registry.service(&fqdn))
    }
}

fn merge(out: &mut TrafficPolicy, tp: &TrafficPolicy, port: u32) {
    let TrafficPolicy {
        load_balancer,
        connection_pool,
        outlier_detection,
        tls,
        ..
    } = tp;
    if load_balancer.is_some() {
        out.load_balancer.clone_from(load_balancer);
    }
    if connection_pool.is_some() {
        out.connection_pool.clone_from(connection_pool);
    }
    if outlier_detection.is_some() {
        out.outlier_detection.clone_from(outlier_detection);
    }
    if tls.is_some() {
        out.tls.clone_from(tls);
    }
    if let Some(p) = tp
        .port_level_settings
        .iter()
        .find(|p| p.port.as_ref().is_some_and(|sel| sel.number == port))
    {
        if p.load_balancer.is_some() {
            out.load_balancer.clone_from(&p.load_balancer);
        }
        if p.connection_pool.is_some() {
            out.connection_pool.clone_from(&p.connection_pool);
        }
        if p.outlier_detection.is_some() {
            out.outlier_detection.clone_from(&p.outlier_detection);
        }
        if p.tls.is_some() {
            out.tls.clone_from(&p.tls);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Value;

    fn text(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }

    #[test]
    fn proxy_reads_istio_agent_metadata() {
        let mut labels = Struct::default();
        labels.fields.insert("app".into(), text("reviews"));
        let mut meta = Struct::default();
        meta.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        meta.fields
            .insert("SERVICE_ACCOUNT".into(), text("bookinfo-reviews"));
        let node = Node {
            id: "sidecar~10.1.0.11~reviews-v1-abc.shop~shop.svc.cluster.local".into(),
            metadata: Some(meta),
            ..Default::default()
        };
        let p = Proxy::from_node(&node).expect("proxy");
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.ips, ["10.1.0.11"]);
        assert_eq!(p.pod_name.as_deref(), Some("reviews-v1-abc"));
        assert_eq!(p.service_account, "bookinfo-reviews");
        assert_eq!(p.labels.get("app").map(String::as_str), Some("reviews"));
        let bare = Node {
            id: "router".into(),
            ..Default::default()
        };
        assert_eq!(
            Proxy::from_node(&bare),
            Err(ProxyError::NoNamespace("router".into()))
        );
    }
}
