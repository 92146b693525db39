//! The service registry translation reads: every service the mesh knows
//! (Kubernetes Services and ServiceEntry hosts) with its ports, protocols,
//! virtual IP and endpoints, and the workloads behind them (Pods,
//! WorkloadEntries, Deployments' pod templates). Built once per snapshot and
//! shared by every proxy's translation.

use std::collections::{BTreeMap, HashMap};

use crate::istio::names::{self, Protocol};
use crate::istio::source::{Resource, Snapshot, Spec};
use crate::istio::types::IntOrString;
use crate::istio::types::kube::{self, SERVICE_NAME_LABEL};
use crate::istio::types::networking::{Location, Resolution};

/// Label injected pods carry when their sidecar accepts Istio mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Where a service comes from, which decides its cluster type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// A Kubernetes Service; `headless` when `clusterIP: None`.
    Kube { headless: bool },
    /// A ServiceEntry host.
    Entry {
        resolution: Resolution,
        location: Location,
    },
}

/// How a service port reaches its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u32),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u32,
    pub target: TargetPort,
    pub protocol: Protocol,
}

/// One address that serves a service, with the labels subsets select on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// An IP, or a DNS name for DNS-resolved ServiceEntries.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Service port → port on this endpoint.
    pub ports: BTreeMap<u32, u32>,
    pub weight: Option<u32>,
    /// `region/zone/subzone`, empty when unknown.
    pub locality: String,
}

impl Endpoint {
    pub fn istio_mtls(&self) -> bool {
        self.labels
            .get(TLS_MODE_LABEL)
            .is_some_and(|m| m == "istio")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Fully qualified host (`reviews.default.svc.cluster.local`).
    pub host: String,
    pub name: String,
    pub namespace: String,
    pub kind: ServiceKind,
    /// The virtual IP, when the manifest gives one.
    pub vip: Option<String>,
    pub ports: Vec<ServicePort>,
    /// Workload selector (Kubernetes `selector`, ServiceEntry
    /// `workloadSelector`); `None` when endpoints are listed explicitly.
    pub selector: Option<BTreeMap<String, String>>,
    pub endpoints: Vec<Endpoint>,
    /// `exportTo`: `*` (default), `.` or namespaces.
    pub export_to: Vec<String>,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }

    /// Whether a proxy in `namespace` may see this service.
    pub fn visible_from(&self, namespace: &str) -> bool {
        exported_to(&self.export_to, &self.namespace, namespace)
    }
}

/// `exportTo` semantics: empty or `*` is everyone, `.` the owner's namespace.
pub fn exported_to(export_to: &[String], owner: &str, namespace: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && owner == namespace) || e == namespace)
}

/// A workload that may run a sidecar: a Pod, a WorkloadEntry or the pod
/// template of a Deployment (labels and identity, no address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ip: Option<String>,
    /// Named container ports (for `targetPort: http`).
    pub named_ports: BTreeMap<String, u32>,
    /// `region/zone/subzone`, empty when unknown.
    pub locality: String,
}

/// The locality of a pod, from Istio's `istio-locality` label
/// (`region.zone.subzone`) or the Kubernetes topology labels (the node's,
/// copied to the pod) with Istio's `topology.istio.io/subzone`.
pub fn pod_locality(labels: &BTreeMap<String, String>) -> String {
    if let Some(l) = labels.get("istio-locality") {
        return l.replace('.', "/");
    }
    let get = |k: &str| labels.get(k).map(String::as_str).unwrap_or("");
    let parts = [
        get("topology.kubernetes.io/region"),
        get("topology.kubernetes.io/zone"),
        get("topology.istio.io/subzone"),
    ];
    if parts.iter().all(|p| p.is_empty()) {
        return String::new();
    }
    parts.join("/").trim_end_matches('/').to_string()
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub services: Vec<Service>,
    pub workloads: Vec<Workload>,
}

/// Whether every label of `selector` is set to the same value in `labels`.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The snapshot indexed once for [`Registry::build`], so that a Service
/// finds its Endpoints, EndpointSlices and workloads without scanning every
/// resource (which made building the registry quadratic in the mesh).
struct Index<'a> {
    /// Workload positions by namespace, in snapshot order.
    workloads_by_namespace: HashMap<&'a str, Vec<usize>>,
    /// Workload positions by namespace and one of their labels, in
    /// snapshot order: a selector looks among the workloads that carry
    /// its rarest label only.
    workloads_by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    /// The first workload of each `(namespace, name)`.
    workload_by_name: HashMap<(&'a str, &'a str), usize>,
    /// Endpoints (by their name) and EndpointSlices (by their
    /// `kubernetes.io/service-name` label) by `(namespace, service)`, in
    /// snapshot order.
    endpoints: HashMap<(&'a str, &'a str), Vec<&'a Resource>>,
}

impl<'a> Index<'a> {
    fn new(snapshot: &'a Snapshot, workloads: &'a [Workload]) -> Self {
        let mut workloads_by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut workload_by_name = HashMap::new();
        let mut workloads_by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            for (k, v) in &w.labels {
                workloads_by_label
                    .entry((w.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
            workloads_by_namespace
                .entry(w.namespace.as_str())
                .or_default()
                .push(i);
            workload_by_name
                .entry((w.namespace.as_str(), w.name.as_str()))
                .or_insert(i);
        }
        let mut endpoints: HashMap<(&str, &str), Vec<&Resource>> = HashMap::new();
        for r in &snapshot.resources {
            let service = match &r.spec {
                Spec::Endpoints(_) => Some(r.meta.name.as_str()),
                Spec::EndpointSlice(_) => r.meta.labels.get(SERVICE_NAME_LABEL).map(String::as_str),
                _ => None,
            };
            if let Some(service) = service {
                endpoints
                    .entry((r.meta.namespace.as_str(), service))
                    .or_default()
                    .push(r);
            }
        }
        Self {
            workloads_by_namespace,
            workloads_by_label,
            workload_by_name,
            endpoints,
        }
    }

    /// The workloads of `namespace` that `selector` selects, in snapshot
    /// order.
    fn selected<'w>(
        &'w self,
        workloads: &'w [Workload],
        namespace: &str,
        selector: &'w BTreeMap<String, String>,
    ) -> Vec<&'w Workload> {
        // The candidates: those with the selector's rarest label (none
        // when some label is on no workload), or the whole namespace for
        // an empty selector.
        let candidates: &[usize] = if selector.is_empty() {
            self.workloads_by_namespace
                .get(namespace)
                .map(Vec::as_slice)
                .unwrap_or_default()
        } else {
            selector
                .iter()
                .map(|(k, v)| {
                    self.workloads_by_label
                        .get(&(namespace, k.as_str(), v.as_str()))
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                })
                .min_by_key(|c| c.len())
                .unwrap_or_default()
        };
        candidates
            .iter()
            .map(|i| &workloads[*i])
            .filter(|w| selects(selector, &w.labels))
            .collect()
    }
}

impl Registry {
    pub fn build(snapshot: &Snapshot, domain: &str) -> Self {
        let workloads = workloads(snapshot);
        let index = Index::new(snapshot, &workloads);
        let mut services = Vec::new();
        for (r, svc) in snapshot.of(|s| match s {
            Spec::Service(s) => Some(s),
            _ => None,
        }) {
            if svc.spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            services.push(kube_service(&index, &workloads, r, svc, domain));
        }
        for (r, se) in snapshot.of(|s| match s {
            Spec::ServiceEntry(s) => Some(s),
            _ => None,
        }) {
            let ns = &r.meta.namespace;
            let ports: Vec<ServicePort> = se
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    port: p.number,
                    target: TargetPort::Number(p.target_port.unwrap_or(p.number)),
                    protocol: p
                        .protocol
                        .as_deref()
                        .map_or(Protocol::Unknown, Protocol::parse),
                })
                .collect();
            let resolution = se.resolution.unwrap_or(Resolution::None);
            let selector = se.workload_selector.as_ref().map(|s| s.labels.clone());
            let mut endpoints: Vec<Endpoint> = se
                .endpoints
                .iter()
                .filter_map(|we| {
                    let address = we.address.clone()?;
                    Some(Endpoint {
                        address,
                        labels: we.labels.clone(),
                        service_account: we.service_account.clone().unwrap_or_default(),
                        ports: ports
                            .iter()
                            .map(|p| {
                                (
                                    p.port,
                                    we.ports.get(&p.name).copied().unwrap_or(target_number(p)),
                                )
                            })
                            .collect(),
                        weight: we.weight,
                        locality: we.locality.clone().unwrap_or_default(),
                    })
                })
                .collect();
            if let Some(sel) = &selector {
                endpoints.extend(
                    index
                        .selected(&workloads, ns, sel)
                        .into_iter()
                        .filter_map(|w| workload_endpoint(w, &ports)),
                );
            }
            for host in &se.hosts {
                let mut eps = endpoints.clone();
                if eps.is_empty()
                    && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
                    && !host.starts_with('*')
                {
                    // A DNS entry without endpoints resolves its own host.
                    eps.push(Endpoint {
                        address: host.clone(),
                        labels: BTreeMap::new(),
                        service_account: String::new(),
                        ports: ports.iter().map(|p| (p.port, target_number(p))).collect(),
                        weight: None,
                        locality: String::new(),
                    });
                }
                services.push(Service {
                    host: names::resolve_host(host, ns, domain),
                    name: host.clone(),
                    namespace: ns.clone(),
                    kind: ServiceKind::Entry {
                        resolution,
                        location: se.location.unwrap_or(Location::MeshExternal),
                    },
                    vip: se.addresses.iter().find(|a| !a.contains('/')).cloned(),
                    ports: ports.clone(),
                    selector: selector.clone(),
                    endpoints: eps,
                    export_to: se.export_to.clone(),
                });
            }
        }
        // Sorted by host (stable: the first of equal hosts stays first),
        // which [`Registry::service`] relies on.
        services.sort_by(|a, b| a.host.cmp(&b.host));
        Self {
            services,
            workloads,
        }
    }

    /// The first service of `host` (services are sorted by host).
    pub fn service(&self, host: &str) -> Option<&Service> {
        let at = self.services.partition_point(|s| s.host.as_str() < host);
        self.services.get(at).filter(|s| s.host == host)
    }

    /// The pod a proxy runs in, by name (`pod.namespace` from the node id)
    /// or by IP.
    pub fn find_workload(&self, name: Option<(&str, &str)>, ips: &[String]) -> Option<&Workload> {
        if let Some((pod, ns)) = name
            && let Some(w) = self
                .workloads
                .iter()
                .find(|w| w.name == pod && w.namespace == ns && w.ip.is_some())
        {
            return Some(w);
        }
        self.workloads
            .iter()
            .find(|w| w.ip.as_ref().is_some_and(|ip| ips.contains(ip)))
    }
}

fn target_number(p: &ServicePort) -> u32 {
    match p.target {
        TargetPort::Number(n) => n,
        TargetPort::Name(_) => p.port,
    }
}

fn workload_endpoint(w: &Workload, ports: &[ServicePort]) -> Option<Endpoint> {
    let ip = w.ip.clone()?;
    Some(Endpoint {
        address: ip,
        labels: w.labels.clone(),
        service_account: w.service_account.clone(),
        ports: ports
            .iter()
            .map(|p| {
                let target = match &p.target {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => w.named_ports.get(name).copied().unwrap_or(p.port),
                };
                (p.port, target)
            })
            .collect(),
        weight: None,
        locality: w.locality.clone(),
    })
}

/// Pod label or annotation that asks for (or refuses) a sidecar.
pub const INJECT_KEY: &str = "sidecar.istio.io/inject";
/// Namespace label that turns injection on for its pods.
pub const INJECTION_LABEL: &str = "istio-injection";

/// Whether the injector gives a pod of `namespace` (with `namespace_labels`)
/// a sidecar: the pod's own label or annotation decides, else the
/// namespace's `istio-injection: enabled` or revision label (`istio.io/rev`).
pub fn injected(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    if let Some(v) = labels
        .get(INJECT_KEY)
        .or_else(|| annotations.get(INJECT_KEY))
    {
        return v == "true";
    }
    namespace_labels.is_some_and(|l| {
        l.get(INJECTION_LABEL).is_some_and(|v| v == "enabled") || l.contains_key("istio.io/rev")
    })
}

/// A workload's labels as the injector and istio-cni leave them: an
/// injected pod carries `security.istio.io/tlsMode: istio`, which is what
/// marks its endpoints as accepting Istio mTLS; a pod istio-cni captures
/// for ambient (see [`ambient_captured`]) is marked
/// `istio.io/dataplane-mode: ambient`, which is how translation knows its
/// endpoints speak HBONE (istiod learns it from its ambient index).
fn with_tls_mode(
    mut labels: BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    if !labels.contains_key(TLS_MODE_LABEL) && injected(&labels, annotations, namespace_labels) {
        labels.insert(TLS_MODE_LABEL.into(), "istio".into());
    }
    // What istio-cni did wins over what the pod asked for.
    if ambient_captured(&labels, annotations, namespace_labels) {
        labels.insert(super::hbone::DATAPLANE_MODE_LABEL.into(), "ambient".into());
    }
    labels
}

/// Annotation istio-cni sets on the pods it redirected to ztunnel.
pub const AMBIENT_REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// Whether istio-cni puts a pod in ambient mode: it says so
/// (`ambient.istio.io/redirection: enabled`), or its namespace is labelled
/// `istio.io/dataplane-mode: ambient` and the pod neither opts out with its
/// own label (`none`) nor runs a sidecar.
fn ambient_captured(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    if annotations
        .get(AMBIENT_REDIRECTION_ANNOTATION)
        .is_some_and(|v| v == "enabled")
    {
        return true;
    }
    !labels.contains_key(super::hbone::DATAPLANE_MODE_LABEL)
        && !labels.contains_key(TLS_MODE_LABEL)
        && namespace_labels.is_some_and(|l| {
            l.get(super::hbone::DATAPLANE_MODE_LABEL)
                .is_some_and(|v| v == "ambient")
        })
}

fn workloads(snapshot: &Snapshot) -> Vec<Workload> {
    let mut out = Vec::new();
    let namespaces: BTreeMap<&str, &BTreeMap<String, String>> = snapshot
        .resources
        .iter()
        .filter(|r| matches!(r.spec, Spec::Namespace))
        .map(|r| (r.meta.name.as_str(), &r.meta.labels))
        .collect();
    for r in &snapshot.resources {
        let ns_labels = namespaces.get(r.meta.namespace.as_str()).copied();
        let named = |spec: &kube::PodSpec| {
            spec.containers
                .iter()
                .flat_map(|c| &c.ports)
                .filter_map(|p| Some((p.name.clone()?, p.container_port)))
                .collect()
        };
        match &r.spec {
            Spec::Pod(pod) => out.push(Workload {
                name: r.meta.name.clone(),
                namespace: r.meta.namespace.clone(),
                labels: with_tls_mode(r.meta.labels.clone(), &r.meta.annotations, ns_labels),
                service_account: pod.spec.service_account().to_string(),
                ip: pod.status.pod_ip.clone().filter(|ip| !ip.is_empty()),
                named_ports: named(&pod.spec),
                locality: pod_locality(&r.meta.labels),
            }),
            Spec::Deployment(d) => out.push(Workload {
                name: r.meta.name.clone(),
                namespace: r.meta.namespace.clone(),
                labels: with_tls_mode(
                    d.spec.template.metadata.labels.clone(),
                    &d.spec.template.metadata.annotations,
                    ns_labels,
                ),
                service_account: d.spec.template.spec.service_account().to_string(),
                ip: None,
                named_ports: named(&d.spec.template.spec),
                locality: pod_locality(&d.spec.template.metadata.labels),
            }),
            Spec::WorkloadEntry(we) => out.push(Workload {
                name: r.meta.name.clone(),
                namespace: r.meta.namespace.clone(),
                // A WorkloadEntry's own labels are the ones selectors see.
                labels: if we.labels.is_empty() {
                    r.meta.labels.clone()
                } else {
                    we.labels.clone()
                },
                service_account: we
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                ip: we.address.clone(),
                named_ports: we.ports.clone(),
                locality: we.locality.clone().unwrap_or_default(),
            }),
            _ => {}
        }
    }
    out
}

fn kube_service(
    index: &Index<'_>,
    workloads: &[Workload],
    r: &Resource,
    svc: &kube::Service,
    domain: &str,
) -> Service {
    let ns = &r.meta.namespace;
    let name = &r.meta.name;
    let ports: Vec<ServicePort> = svc
        .spec
        .ports
        .iter()
        .map(|p| ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port: p.port,
            target: match &p.target_port {
                Some(IntOrString::Int(n)) => {
                    TargetPort::Number(u32::try_from(*n).unwrap_or(p.port))
                }
                Some(IntOrString::String(s)) => match s.parse::<u32>() {
                    Ok(n) => TargetPort::Number(n),
                    Err(_) => TargetPort::Name(s.clone()),
                },
                None => TargetPort::Number(p.port),
            },
            protocol: Protocol::from_service_port(p.name.as_deref(), p.app_protocol.as_deref()),
        })
        .collect();
    let headless = svc.spec.cluster_ip.as_deref() == Some("None");
    let pod_labels = |target: &Option<kube::ObjectReference>| {
        target
            .as_ref()
            .and_then(|t| {
                let namespace = t.namespace.as_ref().unwrap_or(ns);
                index
                    .workload_by_name
                    .get(&(namespace.as_str(), t.name.as_str()))
                    .map(|i| &workloads[*i])
            })
            .map(|w| {
                (
                    w.labels.clone(),
                    w.service_account.clone(),
                    w.locality.clone(),
                )
            })
            .unwrap_or_default()
    };
    // Explicit Endpoints / EndpointSlices win over the selector: they are
    // what kube-proxy would use, and the only source for selector-less
    // services.
    let mut endpoints = Vec::new();
    let mut explicit = false;
    let explicit_resources = index
        .endpoints
        .get(&(ns.as_str(), name.as_str()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    for er in explicit_resources {
        let map_ports = |eports: &[kube::EndpointPort]| -> BTreeMap<u32, u32> {
            ports
                .iter()
                .filter_map(|sp| {
                    let ep = if eports.len() == 1 {
                        eports.first()
                    } else {
                        eports
                            .iter()
                            .find(|e| e.name.as_deref().unwrap_or("") == sp.name)
                    }?;
                    Some((sp.port, ep.port))
                })
                .collect()
        };
        match &er.spec {
            Spec::Endpoints(e) if &er.meta.name == name => {
                explicit = true;
                for subset in &e.subsets {
                    let pmap = map_ports(&subset.ports);
                    for a in &subset.addresses {
                        let (labels, sa, locality) = pod_labels(&a.target_ref);
                        endpoints.push(Endpoint {
                            address: a.ip.clone(),
                            labels,
                            service_account: sa,
                            ports: pmap.clone(),
                            weight: None,
                            locality,
                        });
                    }
                }
            }
            Spec::EndpointSlice(s) if er.meta.labels.get(SERVICE_NAME_LABEL) == Some(name) => {
                explicit = true;
                let pmap = map_ports(&s.ports);
                for e in s
                    .endpoints
                    .iter()
                    .filter(|e| e.conditions.ready != Some(false))
                {
                    let (labels, sa, locality) = pod_labels(&e.target_ref);
                    for a in &e.addresses {
                        endpoints.push(Endpoint {
                            address: a.clone(),
                            labels: labels.clone(),
                            service_account: sa.clone(),
                            ports: pmap.clone(),
                            weight: None,
                            locality: locality.clone(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    if !explicit && let Some(sel) = &svc.spec.selector {
        endpoints.extend(
            index
                .selected(workloads, ns, sel)
                .into_iter()
                .filter_map(|w| workload_endpoint(w, &ports)),
        );
    }
    endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    endpoints.dedup_by(|a, b| a.address == b.address);
    let export_to = r
        .meta
        .annotations
        .get("networking.istio.io/exportTo")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    Service {
        host: names::service_fqdn(name, ns, domain),
        name: name.clone(),
        namespace: ns.clone(),
        kind: ServiceKind::Kube { headless },
        vip: svc
            .spec
            .cluster_ip
            .clone()
            .filter(|ip| !ip.is_empty() && ip != "None"),
        ports,
        selector: svc.spec.selector.clone(),
        endpoints,
        export_to,
    }
}
