//! Galley's job: every resource of a [`Snapshot`] checked, each problem
//! reported as a [`Finding`] naming the file and line, the resource, the
//! field path and a stable code in Istio's analyzer numbering (`IST0101
//! ReferencedResourceNotFound`, `IST0106 SchemaValidationError`, …), so
//! messages read the same as `istioctl analyze`'s and tools can match codes.
//! Load errors (unknown fields, wrong types) become findings here too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::names::{self, DEFAULT_DOMAIN, Protocol};
use super::source::{Origin, Resource, Snapshot, Spec};
use super::translate::{Mesh, MeshOptions};
use super::types::networking::{
    ClientTlsMode, Destination, HttpMatchRequest, HttpRoute, OutlierDetection, StringMatch,
    TrafficPolicy, VirtualService,
};
use super::types::{Percent, ResourceKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "Error",
            Severity::Warning => "Warning",
            Severity::Info => "Info",
        })
    }
}

/// A stable message code and its name, numbered as Istio's analyzers do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    /// IST0002: a field that still works but is on its way out.
    Deprecated,
    /// IST0101: a host, subset or gateway that nothing defines.
    ReferencedResourceNotFound,
    /// IST0106: the resource breaks its schema (unknown field, wrong type,
    /// bad regex, weights, ranges).
    SchemaValidationError,
    /// IST0109: two VirtualServices bound to the mesh claim one host.
    ConflictingMeshGatewayVirtualServiceHosts,
    /// IST0111: several Sidecars without a selector in one namespace.
    MultipleSidecarsWithoutWorkloadSelectors,
    /// IST0118: a service port name without a protocol prefix.
    PortNameIsNotUnderNamingConvention,
    /// IST0132: a VirtualService bound to a Gateway none of whose servers
    /// serves any of its hosts.
    VirtualServiceHostNotFoundInGateway,
    /// IST0145: two Gateways selecting the same workloads claim one host
    /// on one port.
    ConflictingGateways,
    /// IST0130: a rule after a catch-all rule.
    VirtualServiceUnreachableRule,
    /// IST0131: a match identical to an earlier one.
    VirtualServiceIneffectiveMatch,
    /// IST0127: a selector that no workload of its namespace matches.
    NoMatchingWorkloadsFound,
    /// IST0133: valid, but likely not what was meant.
    SchemaWarning,
}

impl Code {
    pub fn id(self) -> &'static str {
        match self {
            Code::Deprecated => "IST0002",
            Code::ReferencedResourceNotFound => "IST0101",
            Code::SchemaValidationError => "IST0106",
            Code::ConflictingMeshGatewayVirtualServiceHosts => "IST0109",
            Code::MultipleSidecarsWithoutWorkloadSelectors => "IST0111",
            Code::PortNameIsNotUnderNamingConvention => "IST0118",
            Code::VirtualServiceUnreachableRule => "IST0130",
            Code::ConflictingGateways => "IST0145",
            Code::VirtualServiceIneffectiveMatch => "IST0131",
            Code::VirtualServiceHostNotFoundInGateway => "IST0132",
            Code::NoMatchingWorkloadsFound => "IST0127",
            Code::SchemaWarning => "IST0133",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Code::Deprecated => "Deprecated",
            Code::ReferencedResourceNotFound => "ReferencedResourceNotFound",
            Code::SchemaValidationError => "SchemaValidationError",
            Code::ConflictingMeshGatewayVirtualServiceHosts => {
                "ConflictingMeshGatewayVirtualServiceHosts"
            }
            Code::MultipleSidecarsWithoutWorkloadSelectors => {
                "MultipleSidecarsWithoutWorkloadSelectors"
            }
            Code::PortNameIsNotUnderNamingConvention => "PortNameIsNotUnderNamingConvention",
            Code::VirtualServiceUnreachableRule => "VirtualServiceUnreachableRule",
            Code::ConflictingGateways => "ConflictingGateways",
            Code::VirtualServiceIneffectiveMatch => "VirtualServiceIneffectiveMatch",
            Code::VirtualServiceHostNotFoundInGateway => "VirtualServiceHostNotFoundInGateway",
            Code::NoMatchingWorkloadsFound => "NoMatchingWorkloadsFound",
            Code::SchemaWarning => "SchemaWarning",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Code::ReferencedResourceNotFound
            | Code::SchemaValidationError
            | Code::ConflictingMeshGatewayVirtualServiceHosts
            | Code::MultipleSidecarsWithoutWorkloadSelectors
            | Code::ConflictingGateways => Severity::Error,
            Code::Deprecated
            | Code::VirtualServiceHostNotFoundInGateway
            | Code::VirtualServiceUnreachableRule
            | Code::VirtualServiceIneffectiveMatch
            | Code::NoMatchingWorkloadsFound
            | Code::SchemaWarning => Severity::Warning,
            Code::PortNameIsNotUnderNamingConvention => Severity::Info,
        }
    }
}

/// One problem found.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub code: Code,
    pub severity: Severity,
    pub origin: Origin,
    pub resource: Option<ResourceKey>,
    /// Field path from the document root (`spec.http[1].route[0].weight`);
    /// empty when the finding is about the resource as a whole.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Finding {
    /// `Error [IST0101] (VirtualService default/reviews spec.http[0]…)
    /// file.yaml:12 Referenced host not found: "reviewz"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}] ", self.severity, self.code.id())?;
        match (&self.resource, self.field.is_empty()) {
            (Some(r), false) => write!(f, "({r} {}) ", self.field)?,
            (Some(r), true) => write!(f, "({r}) ")?,
            (None, false) => write!(f, "({}) ", self.field)?,
            (None, true) => {}
        }
        write!(f, "{} {}: {}", self.origin, self.code.name(), self.message)
    }
}

/// The resources of a conflict other than `me`, each with the file and
/// line it comes from: several files often hold objects of the same name
/// (Istio's samples define `reviews` in five), and the name alone would
/// repeat without saying which is which.
fn others(me: &Resource, all: &[&Resource]) -> String {
    all.iter()
        .filter(|r| !std::ptr::eq(**r, me))
        .map(|r| format!("{} ({})", r.key(), r.origin))
        .collect::<Vec<_>>()
        .join(", ")
}

/// When the conflict is one object (same kind, namespace and name) in
/// several files, what applying them all would do.
fn same_object_note(me: &Resource, all: &[&Resource]) -> &'static str {
    let key = me.key();
    if all.iter().any(|r| !std::ptr::eq(*r, me) && r.key() == key) {
        " (the same object in several files: `kubectl apply` keeps the last one applied; apply one of them)"
    } else {
        ""
    }
}

/// Whether any finding is an error (what makes `analyze` exit non-zero).
pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

/// Checks every resource of `snapshot`; findings come sorted by file, line
/// and field so reports are stable.
pub fn validate(snapshot: &Snapshot) -> Vec<Finding> {
    let mut v = Validator::new(snapshot);
    for e in &snapshot.errors {
        v.findings.push(Finding {
            code: Code::SchemaValidationError,
            severity: Severity::Error,
            origin: e.origin.clone(),
            resource: e.resource.clone(),
            field: e.field.clone(),
            message: e.message.clone(),
        });
    }
    for r in &snapshot.resources {
        let mut cx = Cx { v: &mut v, r };
        match &r.spec {
            Spec::VirtualService(vs) => cx.virtual_service(vs),
            Spec::DestinationRule(dr) => cx.destination_rule(dr),
            Spec::Gateway(gw) => cx.gateway(gw),
            Spec::ServiceEntry(se) => cx.service_entry(se),
            Spec::Sidecar(sc) => cx.sidecar(sc),
            Spec::Service(svc) => cx.service(svc),
            Spec::AuthorizationPolicy(ap) => cx.authorization_policy(ap),
            Spec::RequestAuthentication(ra) => cx.request_authentication(ra),
            Spec::PeerAuthentication(pa) => cx.peer_authentication(pa),
            Spec::Telemetry(t) => cx.telemetry(t),
            _ => {}
        }
    }
    v.cross_resource_checks(snapshot);
    let mut findings = v.findings;
    findings.sort_by(|a, b| (&a.origin, &a.field, a.code).cmp(&(&b.origin, &b.field, b.code)));
    findings
}

/// Checks that need the mesh configuration: the extension provider of
/// every CUSTOM AuthorizationPolicy must exist (`IST0101`) and be usable
/// (`IST0106`: port, service, statusOnError, pathPrefix), or its policies
/// deny instead.
pub fn validate_mesh(snapshot: &Snapshot, options: &MeshOptions) -> Vec<Finding> {
    use super::translate::ext_authz::{ProviderError, check_provider};
    let mesh = Mesh::new(snapshot, options.clone());
    let mut out = validate_telemetry_providers(snapshot, options);
    for r in &snapshot.resources {
        let Spec::AuthorizationPolicy(ap) = &r.spec else {
            continue;
        };
        let Some(p) = ap
            .provider
            .as_ref()
            .filter(|_| ap.action == Some(super::types::security::AuthzAction::Custom))
        else {
            continue;
        };
        match check_provider(&mesh, &p.name) {
            Ok(()) => {}
            Err(e @ ProviderError::Unknown(_)) => out.push(finding(
                r,
                Code::ReferencedResourceNotFound,
                "spec.provider.name",
                e.to_string(),
            )),
            Err(e) => out.push(finding(
                r,
                Code::SchemaValidationError,
                "spec.provider.name",
                e.to_string(),
            )),
        }
    }
    out
}

/// The providers Telemetry resources name must exist in
/// `meshConfig.extensionProviders` (`IST0101`) and be of a kind Ferry's
/// translation implements for that use (`IST0106`).
pub fn validate_telemetry_providers(snapshot: &Snapshot, options: &MeshOptions) -> Vec<Finding> {
    use super::translate::telemetry::{ProviderUseError, Usage, check_provider};
    let mut out = Vec::new();
    for r in &snapshot.resources {
        let Spec::Telemetry(t) = &r.spec else {
            continue;
        };
        let uses = t
            .tracing
            .iter()
            .enumerate()
            .flat_map(|(i, x)| {
                x.providers.iter().enumerate().map(move |(j, p)| {
                    (
                        format!("spec.tracing[{i}].providers[{j}]"),
                        &p.name,
                        Usage::Tracing,
                    )
                })
            })
            .chain(t.access_logging.iter().enumerate().flat_map(|(i, x)| {
                x.providers.iter().enumerate().map(move |(j, p)| {
                    (
                        format!("spec.accessLogging[{i}].providers[{j}]"),
                        &p.name,
                        Usage::AccessLogging,
                    )
                })
            }))
            .chain(t.metrics.iter().enumerate().flat_map(|(i, x)| {
                x.providers.iter().enumerate().map(move |(j, p)| {
                    (
                        format!("spec.metrics[{i}].providers[{j}]"),
                        &p.name,
                        Usage::Metrics,
                    )
                })
            }));
        for (field, name, usage) in uses {
            match check_provider(&options.extension_providers, name, usage) {
                Ok(()) => {}
                Err(e @ ProviderUseError::Unknown(_)) => out.push(finding(
                    r,
                    Code::ReferencedResourceNotFound,
                    &format!("{field}.name"),
                    e.to_string(),
                )),
                Err(e) => out.push(finding(
                    r,
                    Code::SchemaValidationError,
                    &format!("{field}.name"),
                    e.to_string(),
                )),
            }
        }
    }
    out
}

/// What the checks look names up in.
struct Validator {
    findings: Vec<Finding>,
    /// Every known service host (Kubernetes FQDNs and ServiceEntry hosts).
    hosts: BTreeSet<String>,
    /// Subset names per resolved DestinationRule host.
    subsets: BTreeMap<String, BTreeSet<String>>,
    /// Gateways as `namespace/name`.
    gateways: BTreeSet<String>,
    /// The hosts of each Gateway's servers (without `namespace/`).
    gateway_hosts: BTreeMap<String, Vec<String>>,
    /// VirtualServices as `namespace/name`.
    virtual_services: BTreeSet<String>,
    /// VirtualServices some rule delegates to, as `namespace/name`.
    delegates: BTreeSet<String>,
    /// Labels of the workloads (Pods, Deployment templates,
    /// WorkloadEntries) by namespace.
    workloads: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Validator {
    fn new(snapshot: &Snapshot) -> Self {
        let mut hosts = BTreeSet::new();
        let mut subsets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut gateways = BTreeSet::new();
        let mut gateway_hosts = BTreeMap::new();
        let mut virtual_services = BTreeSet::new();
        let mut delegates = BTreeSet::new();
        let mut workloads: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
        for r in &snapshot.resources {
            let ns = &r.meta.namespace;
            match &r.spec {
                Spec::Pod(_) => {
                    workloads
                        .entry(ns.clone())
                        .or_default()
                        .push(r.meta.labels.clone());
                }
                Spec::Deployment(d) => {
                    workloads
                        .entry(ns.clone())
                        .or_default()
                        .push(d.spec.template.metadata.labels.clone());
                }
                Spec::WorkloadEntry(we) => {
                    workloads
                        .entry(ns.clone())
                        .or_default()
                        .push(we.labels.clone());
                }
                Spec::VirtualService(vs) => {
                    virtual_services.insert(format!("{ns}/{}", r.meta.name));
                    for d in vs.http.iter().filter_map(|h| h.delegate.as_ref()) {
                        delegates.insert(format!(
                            "{}/{}",
                            d.namespace.as_deref().unwrap_or(ns),
                            d.name
                        ));
                    }
                }
                Spec::Service(_) => {
                    hosts.insert(names::service_fqdn(&r.meta.name, ns, DEFAULT_DOMAIN));
                }
                Spec::ServiceEntry(se) => {
                    hosts.extend(
                        se.hosts
                            .iter()
                            .map(|h| names::resolve_host(h, ns, DEFAULT_DOMAIN)),
                    );
                }
                Spec::DestinationRule(dr) => {
                    subsets
                        .entry(names::resolve_host(&dr.host, ns, DEFAULT_DOMAIN))
                        .or_default()
                        .extend(dr.subsets.iter().map(|s| s.name.clone()));
                }
                Spec::Gateway(gw) => {
                    gateways.insert(format!("{ns}/{}", r.meta.name));
                    gateway_hosts.insert(
                        format!("{ns}/{}", r.meta.name),
                        gw.servers
                            .iter()
                            .flat_map(|s| &s.hosts)
                            .map(|h| h.split_once('/').map_or(h.as_str(), |(_, h)| h).to_string())
                            .collect(),
                    );
                }
                _ => {}
            }
        }
        Self {
            findings: Vec::new(),
            hosts,
            subsets,
            gateways,
            gateway_hosts,
            virtual_services,
            delegates,
            workloads,
        }
    }

    fn host_known(&self, host: &str) -> bool {
        self.hosts.contains(host)
            || self
                .hosts
                .iter()
                .any(|known| names::host_matches(known, host) || names::host_matches(host, known))
    }

    /// IST0109: two mesh-bound VirtualServices for the same host. Istio
    /// merges neither; only one of them takes effect.
    fn cross_resource_checks(&mut self, snapshot: &Snapshot) {
        let mut owners: BTreeMap<String, Vec<&Resource>> = BTreeMap::new();
        let mut default_sidecars: BTreeMap<&str, Vec<&Resource>> = BTreeMap::new();
        // (selector, port, host) → the Gateways that claim it.
        type ServerKey = (Vec<(String, String)>, u32, String);
        let mut servers: BTreeMap<ServerKey, Vec<&Resource>> = BTreeMap::new();
        for r in &snapshot.resources {
            match &r.spec {
                Spec::Gateway(gw) => {
                    let selector: Vec<(String, String)> = gw
                        .selector
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    for s in &gw.servers {
                        for h in &s.hosts {
                            let host = h.split_once('/').map_or(h.as_str(), |(_, h)| h);
                            let claimants = servers
                                .entry((selector.clone(), s.port.number, host.to_string()))
                                .or_default();
                            if !claimants.iter().any(|c| std::ptr::eq(*c, r)) {
                                claimants.push(r);
                            }
                        }
                    }
                }
                Spec::VirtualService(vs) if binds_mesh(vs) => {
                    for h in &vs.hosts {
                        owners
                            .entry(names::resolve_host(h, &r.meta.namespace, DEFAULT_DOMAIN))
                            .or_default()
                            .push(r);
                    }
                }
                Spec::Sidecar(sc) if sc.workload_selector.is_none() => {
                    default_sidecars
                        .entry(&r.meta.namespace)
                        .or_default()
                        .push(r);
                }
                _ => {}
            }
        }
        for (host, rs) in owners {
            if rs.len() < 2 {
                continue;
            }
            for r in &rs {
                self.findings.push(finding(
                    r,
                    Code::ConflictingMeshGatewayVirtualServiceHosts,
                    "spec.hosts",
                    format!(
                        "host {host} is also defined for the mesh gateway by {}; only one takes effect{}",
                        others(r, &rs),
                        same_object_note(r, &rs)
                    ),
                ));
            }
        }
        for ((selector, port, host), rs) in servers {
            if rs.len() < 2 {
                continue;
            }
            let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            for r in &rs {
                self.findings.push(finding(
                    r,
                    Code::ConflictingGateways,
                    "spec.servers",
                    format!(
                        "host {host} on port {port} for workloads {{{}}} is also served by {}; only one takes effect{}",
                        selector.join(","),
                        others(r, &rs),
                        same_object_note(r, &rs)
                    ),
                ));
            }
        }
        for (ns, rs) in default_sidecars {
            if rs.len() < 2 {
                continue;
            }
            for r in &rs {
                self.findings.push(finding(
                    r,
                    Code::MultipleSidecarsWithoutWorkloadSelectors,
                    "spec.workloadSelector",
                    format!(
                        "namespace {ns} has {} Sidecars without a workload selector",
                        rs.len()
                    ),
                ));
            }
        }
    }
}

fn finding(r: &Resource, code: Code, field: &str, message: String) -> Finding {
    Finding {
        code,
        severity: code.severity(),
        origin: r.origin.clone(),
        resource: Some(r.key()),
        field: field.to_string(),
        message,
    }
}

fn binds_mesh(vs: &VirtualService) -> bool {
    vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh")
}

/// Checks on one resource.
struct Cx<'a> {
    v: &'a mut Validator,
    r: &'a Resource,
}

impl Cx<'_> {
    fn report(&mut self, code: Code, field: impl Into<String>, message: impl Into<String>) {
        let f = finding(self.r, code, &field.into(), message.into());
        self.v.findings.push(f);
    }

    fn schema(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.report(Code::SchemaValidationError, field, message);
    }

    fn ns(&self) -> &str {
        &self.r.meta.namespace
    }

    fn regex(&mut self, field: &str, pattern: &str) {
        if let Err(e) = regex::Regex::new(pattern) {
            // The regex crate and Envoy's RE2 accept the same syntax family
            // (no backreferences, no lookaround); its message is precise.
            let detail = e
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string();
            self.schema(field, format!("invalid regex {pattern:?}: {detail}"));
        }
    }

    /// `presence_ok`: an empty match means "present" (headers, query params).
    fn string_match(&mut self, field: &str, m: &StringMatch, presence_ok: bool) {
        let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set > 1 {
            self.schema(field, "set only one of exact, prefix or regex");
        } else if set == 0 && !presence_ok {
            self.schema(field, "one of exact, prefix or regex is required");
        }
        if let Some(re) = &m.regex {
            self.regex(&format!("{field}.regex"), re);
        }
    }

    fn percent(&mut self, field: &str, p: &Percent) {
        if !(0.0..=100.0).contains(&p.value) {
            self.schema(field, format!("percentage {} is outside 0..100", p.value));
        }
    }

    fn destination(&mut self, field: &str, d: &Destination) {
        if d.host.is_empty() {
            self.schema(format!("{field}.host"), "destination host is required");
            return;
        }
        let host = names::resolve_host(&d.host, self.ns(), DEFAULT_DOMAIN);
        if !self.v.host_known(&host) {
            self.report(
                Code::ReferencedResourceNotFound,
                format!("{field}.host"),
                format!("referenced host not found: {:?}", d.host),
            );
        }
        if let Some(subset) = &d.subset {
            let known = self
                .v
                .subsets
                .iter()
                .any(|(h, s)| names::host_matches(h, &host) && s.contains(subset));
            if !known {
                self.report(
                    Code::ReferencedResourceNotFound,
                    format!("{field}.subset"),
                    format!(
                        "referenced host+subset in destinationrule not found: \"{}+{subset}\"",
                        d.host
                    ),
                );
            }
        }
        if let Some(port) = &d.port
            && (port.number == 0 || port.number > 65535)
        {
            self.schema(
                format!("{field}.port.number"),
                format!("invalid port {}", port.number),
            );
        }
    }

    fn virtual_service(&mut self, vs: &VirtualService) {
        let me = format!("{}/{}", self.ns(), self.r.meta.name);
        let is_delegate = self.v.delegates.contains(&me);
        if vs.hosts.is_empty() && !is_delegate {
            self.schema(
                "spec.hosts",
                "at least one host is required (only a delegate VirtualService may have none)",
            );
        }
        if is_delegate && !vs.hosts.is_empty() {
            self.schema(
                "spec.hosts",
                "a delegate VirtualService must not set hosts; it takes its parent's",
            );
        }
        for (i, h) in vs.hosts.iter().enumerate() {
            if h.is_empty() || (h.contains('*') && !h.starts_with('*')) || h.contains('/') {
                self.schema(format!("spec.hosts[{i}]"), format!("invalid host {h:?}"));
            }
        }
        for (i, g) in vs.gateways.iter().enumerate() {
            self.gateway_ref(&format!("spec.gateways[{i}]"), g);
            if g == "mesh" || vs.hosts.is_empty() {
                continue;
            }
            let full = if g.contains('/') {
                g.clone()
            } else {
                format!("{}/{g}", self.ns())
            };
            if let Some(server_hosts) = self.v.gateway_hosts.get(&full) {
                let served = vs.hosts.iter().any(|h| {
                    server_hosts
                        .iter()
                        .any(|sh| names::host_matches(sh, h) || names::host_matches(h, sh))
                });
                if !served {
                    self.report(
                        Code::VirtualServiceHostNotFoundInGateway,
                        "spec.hosts",
                        format!(
                            "none of the hosts {:?} is served by gateway {full} (its servers' hosts: {server_hosts:?})",
                            vs.hosts
                        ),
                    );
                }
            }
        }
        let mut seen: Vec<(usize, usize, &HttpMatchRequest)> = Vec::new();
        let mut catch_all: Option<usize> = None;
        for (i, route) in vs.http.iter().enumerate() {
            let f = format!("spec.http[{i}]");
            self.http_route(&f, route);
            if let Some(first) = catch_all {
                self.report(
                    Code::VirtualServiceUnreachableRule,
                    f.clone(),
                    format!("rule #{i} is not used: rule #{first} has no match and catches every request before it"),
                );
            }
            if route.match_.is_empty() && catch_all.is_none() {
                catch_all = Some(i);
            }
            for (j, m) in route.match_.iter().enumerate() {
                if let Some((pi, pj, _)) = seen.iter().find(|(_, _, prev)| same_match(prev, m)) {
                    self.report(
                        Code::VirtualServiceIneffectiveMatch,
                        format!("{f}.match[{j}]"),
                        format!("match #{j} of rule #{i} is not used: it duplicates match #{pj} of rule #{pi}"),
                    );
                } else {
                    seen.push((i, j, m));
                }
            }
        }
        for (i, route) in vs.tcp.iter().enumerate() {
            let f = format!("spec.tcp[{i}]");
            self.l4_destinations(&f, route.route.iter().map(|d| (&d.destination, d.weight)));
            for (j, m) in route.match_.iter().enumerate() {
                for (k, g) in m.gateways.iter().enumerate() {
                    self.gateway_ref(&format!("{f}.match[{j}].gateways[{k}]"), g);
                }
            }
        }
        for (i, route) in vs.tls.iter().enumerate() {
            let f = format!("spec.tls[{i}]");
            if route.match_.iter().any(|m| m.sni_hosts.is_empty()) {
                self.schema(format!("{f}.match"), "every TLS match needs sniHosts");
            }
            self.l4_destinations(&f, route.route.iter().map(|d| (&d.destination, d.weight)));
        }
    }

    fn gateway_ref(&mut self, field: &str, g: &str) {
        if g == "mesh" {
            return;
        }
        let full = if g.contains('/') {
            g.to_string()
        } else {
            format!("{}/{g}", self.ns())
        };
        if !self.v.gateways.contains(&full) {
            self.report(
                Code::ReferencedResourceNotFound,
                field,
                format!("referenced gateway not found: {g:?}"),
            );
        }
    }

    fn l4_destinations<'d>(
        &mut self,
        field: &str,
        dests: impl Iterator<Item = (&'d Destination, Option<i32>)>,
    ) {
        let dests: Vec<_> = dests.collect();
        if dests.is_empty() {
            self.schema(
                format!("{field}.route"),
                "at least one route destination is required",
            );
        }
        for (k, (d, _)) in dests.iter().enumerate() {
            self.destination(&format!("{field}.route[{k}].destination"), d);
        }
        self.weights(field, dests.iter().map(|(_, w)| *w));
    }

    fn weights(&mut self, field: &str, weights: impl Iterator<Item = Option<i32>>) {
        let weights: Vec<Option<i32>> = weights.collect();
        for (k, w) in weights.iter().enumerate() {
            if w.is_some_and(|w| !(0..=100).contains(&w)) {
                self.schema(
                    format!("{field}.route[{k}].weight"),
                    format!("weight {} is outside 0..100", w.unwrap_or_default()),
                );
            }
        }
        // One destination may leave its weight out (it gets everything).
        if weights.len() > 1 || weights.iter().any(Option::is_some) {
            let total: i32 = weights.iter().map(|w| w.unwrap_or(0)).sum();
            if total != 100 && !(weights.len() == 1 && weights[0].is_none()) {
                self.schema(
                    format!("{field}.route"),
                    format!("total destination weight {total} != 100"),
                );
            }
        }
    }

    fn http_route(&mut self, f: &str, route: &HttpRoute) {
        let has_route = !route.route.is_empty();
        let actions = [
            has_route,
            route.redirect.is_some(),
            route.direct_response.is_some(),
            route.delegate.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if actions == 0 {
            self.schema(
                f,
                "one of route, redirect, directResponse or delegate is required",
            );
        } else if actions > 1 {
            self.schema(
                f,
                "route, redirect, directResponse and delegate exclude each other",
            );
        }
        if let Some(d) = &route.delegate {
            let target = format!("{}/{}", d.namespace.as_deref().unwrap_or(self.ns()), d.name);
            // A delegate with hosts is reported on the delegate itself.
            if !self.v.virtual_services.contains(&target) {
                self.report(
                    Code::ReferencedResourceNotFound,
                    format!("{f}.delegate"),
                    format!("referenced delegate VirtualService not found: {target:?}"),
                );
            }
        }
        if route.websocket_upgrade.is_some() {
            self.report(
                Code::Deprecated,
                format!("{f}.websocketUpgrade"),
                "websocketUpgrade was removed from the API and is ignored: upgrades are always allowed",
            );
        }
        for (j, m) in route.match_.iter().enumerate() {
            let mf = format!("{f}.match[{j}]");
            for (name, sm) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    self.string_match(&format!("{mf}.{name}"), sm, false);
                }
            }
            for (name, map) in [
                ("headers", &m.headers),
                ("queryParams", &m.query_params),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (k, sm) in map {
                    self.string_match(&format!("{mf}.{name}.{k}"), sm, true);
                }
            }
            for (k, g) in m.gateways.iter().enumerate() {
                self.gateway_ref(&format!("{mf}.gateways[{k}]"), g);
            }
            if let Some(port) = m.port
                && (port == 0 || port > 65535)
            {
                self.schema(format!("{mf}.port"), format!("invalid port {port}"));
            }
        }
        for (k, d) in route.route.iter().enumerate() {
            self.destination(&format!("{f}.route[{k}].destination"), &d.destination);
        }
        self.weights(f, route.route.iter().map(|d| d.weight));
        if let Some(rw) = &route.rewrite
            && let Some(rr) = &rw.uri_regex_rewrite
        {
            self.regex(&format!("{f}.rewrite.uriRegexRewrite.match"), &rr.match_);
            if rw.uri.is_some() {
                self.schema(
                    format!("{f}.rewrite"),
                    "uri and uriRegexRewrite exclude each other",
                );
            }
        }
        if let Some(t) = route.timeout
            && !t.0.is_zero()
            && t.0 < std::time::Duration::from_millis(1)
        {
            self.schema(format!("{f}.timeout"), "timeout must be at least 1ms");
        }
        if let Some(r) = &route.retries {
            if r.attempts < 0 {
                self.schema(
                    format!("{f}.retries.attempts"),
                    "attempts cannot be negative",
                );
            }
            if let Some(on) = &r.retry_on {
                for (k, cond) in on.split(',').map(str::trim).enumerate() {
                    if !RETRY_ON.contains(&cond) && cond.parse::<u16>().is_err() {
                        self.schema(
                            format!("{f}.retries.retryOn"),
                            format!("unknown retry condition #{k} {cond:?}"),
                        );
                    }
                }
            }
        }
        if let Some(fault) = &route.fault {
            if fault.delay.is_none() && fault.abort.is_none() {
                self.schema(format!("{f}.fault"), "a fault needs a delay or an abort");
            }
            if let Some(d) = &fault.delay {
                if d.fixed_delay.is_none() && d.exponential_delay.is_none() {
                    self.schema(format!("{f}.fault.delay"), "fixedDelay is required");
                }
                if let Some(p) = &d.percentage {
                    self.percent(&format!("{f}.fault.delay.percentage.value"), p);
                }
                if d.percent.is_some() {
                    self.report(
                        Code::Deprecated,
                        format!("{f}.fault.delay.percent"),
                        "percent is deprecated; use percentage",
                    );
                }
            }
            if let Some(a) = &fault.abort {
                match (a.http_status, &a.grpc_status, &a.http2_error) {
                    (Some(s), None, None) if (200..=599).contains(&s) => {}
                    (Some(s), None, None) => self.schema(
                        format!("{f}.fault.abort.httpStatus"),
                        format!("HTTP status {s} is outside 200..599"),
                    ),
                    (None, Some(_), None) | (None, None, Some(_)) => {}
                    _ => self.schema(
                        format!("{f}.fault.abort"),
                        "set exactly one of httpStatus, grpcStatus or http2Error",
                    ),
                }
                if let Some(p) = &a.percentage {
                    self.percent(&format!("{f}.fault.abort.percentage.value"), p);
                }
            }
        }
        if let Some(m) = &route.mirror {
            self.destination(&format!("{f}.mirror"), m);
            if route.mirror_percent.is_some() {
                self.report(
                    Code::Deprecated,
                    format!("{f}.mirrorPercent"),
                    "mirrorPercent is deprecated; use mirrorPercentage",
                );
            }
        }
        if let Some(p) = &route.mirror_percentage {
            self.percent(&format!("{f}.mirrorPercentage.value"), p);
        }
        for (k, m) in route.mirrors.iter().enumerate() {
            self.destination(&format!("{f}.mirrors[{k}].destination"), &m.destination);
            if let Some(p) = &m.percentage {
                self.percent(&format!("{f}.mirrors[{k}].percentage.value"), p);
            }
        }
        if let Some(cors) = &route.cors_policy {
            for (k, o) in cors.allow_origins.iter().enumerate() {
                self.string_match(&format!("{f}.corsPolicy.allowOrigins[{k}]"), o, false);
            }
            if !cors.allow_origin.is_empty() {
                self.report(
                    Code::Deprecated,
                    format!("{f}.corsPolicy.allowOrigin"),
                    "allowOrigin is deprecated; use allowOrigins",
                );
            }
        }
    }

    fn destination_rule(&mut self, dr: &super::types::networking::DestinationRule) {
        if dr.host.is_empty() {
            self.schema("spec.host", "host is required");
        } else {
            let host = names::resolve_host(&dr.host, self.ns(), DEFAULT_DOMAIN);
            if !self.v.host_known(&host) {
                self.report(
                    Code::ReferencedResourceNotFound,
                    "spec.host",
                    format!("referenced host not found: {:?}", dr.host),
                );
            }
        }
        if let Some(tp) = &dr.traffic_policy {
            self.traffic_policy("spec.trafficPolicy", tp);
        }
        let mut names = BTreeSet::new();
        for (i, s) in dr.subsets.iter().enumerate() {
            let f = format!("spec.subsets[{i}]");
            if s.name.is_empty() {
                self.schema(format!("{f}.name"), "subset name is required");
            } else if !names.insert(&s.name) {
                self.schema(
                    format!("{f}.name"),
                    format!("duplicate subset name {:?}", s.name),
                );
            }
            if let Some(tp) = &s.traffic_policy {
                self.traffic_policy(&format!("{f}.trafficPolicy"), tp);
            }
        }
    }

    fn traffic_policy(&mut self, f: &str, tp: &TrafficPolicy) {
        if let Some(l) = tp
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.locality_lb_setting.as_ref())
        {
            let lf = format!("{f}.loadBalancer.localityLbSetting");
            if !l.distribute.is_empty() && !l.failover.is_empty() {
                self.schema(&lf, "distribute and failover exclude each other");
            }
            for (i, d) in l.distribute.iter().enumerate() {
                let total: u32 = d.to.values().sum();
                if total != 100 {
                    self.schema(
                        format!("{lf}.distribute[{i}].to"),
                        format!("locality weights sum to {total}, not 100"),
                    );
                }
                if d.from.is_empty() {
                    self.schema(format!("{lf}.distribute[{i}].from"), "from is required");
                }
            }
            for (i, fo) in l.failover.iter().enumerate() {
                if fo.from == fo.to || fo.from.is_empty() || fo.to.is_empty() {
                    self.schema(
                        format!("{lf}.failover[{i}]"),
                        format!(
                            "failover needs two different regions, got from {:?} to {:?}",
                            fo.from, fo.to
                        ),
                    );
                }
            }
        }
        if let Some(lb) = &tp.load_balancer {
            if lb.simple.is_some() && lb.consistent_hash.is_some() {
                self.schema(
                    format!("{f}.loadBalancer"),
                    "simple and consistentHash exclude each other",
                );
            }
            if let Some(ch) = &lb.consistent_hash {
                let keys = [
                    ch.http_header_name.is_some(),
                    ch.http_cookie.is_some(),
                    ch.use_source_ip.is_some(),
                    ch.http_query_parameter_name.is_some(),
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if keys != 1 {
                    self.schema(
                        format!("{f}.loadBalancer.consistentHash"),
                        "set exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
                    );
                }
                if ch.ring_hash.is_some() && ch.maglev.is_some() {
                    self.schema(
                        format!("{f}.loadBalancer.consistentHash"),
                        "ringHash and maglev exclude each other",
                    );
                }
            }
        }
        if let Some(od) = &tp.outlier_detection {
            self.outlier(&format!("{f}.outlierDetection"), od);
        }
        if let Some(tls) = &tp.tls {
            self.client_tls(&format!("{f}.tls"), tls);
        }
        if let Some(cp) = &tp.connection_pool
            && let Some(http) = &cp.http
        {
            for (name, v) in [
                ("http1MaxPendingRequests", http.http1_max_pending_requests),
                ("http2MaxRequests", http.http2_max_requests),
                ("maxRequestsPerConnection", http.max_requests_per_connection),
                ("maxRetries", http.max_retries),
            ] {
                if v.is_some_and(|v| v < 0) {
                    self.schema(
                        format!("{f}.connectionPool.http.{name}"),
                        "cannot be negative",
                    );
                }
            }
        }
        for (i, p) in tp.port_level_settings.iter().enumerate() {
            let pf = format!("{f}.portLevelSettings[{i}]");
            if p.port.as_ref().is_none_or(|p| p.number == 0) {
                self.schema(
                    format!("{pf}.port"),
                    "a port-level setting needs a port number",
                );
            }
            if let Some(od) = &p.outlier_detection {
                self.outlier(&format!("{pf}.outlierDetection"), od);
            }
            if let Some(tls) = &p.tls {
                self.client_tls(&format!("{pf}.tls"), tls);
            }
        }
    }

    fn outlier(&mut self, f: &str, od: &OutlierDetection) {
        for (name, v) in [
            ("maxEjectionPercent", od.max_ejection_percent),
            ("minHealthPercent", od.min_health_percent),
        ] {
            if v.is_some_and(|v| !(0..=100).contains(&v)) {
                self.schema(format!("{f}.{name}"), "must be within 0..100");
            }
        }
        if od.consecutive_errors.is_some() {
            self.report(
                Code::Deprecated,
                format!("{f}.consecutiveErrors"),
                "consecutiveErrors is deprecated; use consecutive5xxErrors",
            );
        }
    }

    fn client_tls(&mut self, f: &str, tls: &super::types::networking::ClientTlsSettings) {
        let mode = tls.mode.unwrap_or(ClientTlsMode::Disable);
        if mode == ClientTlsMode::Mutual
            && tls.credential_name.is_none()
            && (tls.client_certificate.is_none() || tls.private_key.is_none())
        {
            self.schema(
                f,
                "MUTUAL needs clientCertificate and privateKey, or a credentialName",
            );
        }
        if mode == ClientTlsMode::IstioMutual
            && (tls.client_certificate.is_some()
                || tls.private_key.is_some()
                || tls.ca_certificates.is_some())
        {
            self.schema(
                f,
                "ISTIO_MUTUAL uses the mesh certificates; certificate files cannot be set",
            );
        }
    }

    fn gateway(&mut self, gw: &super::types::networking::Gateway) {
        if gw.servers.is_empty() {
            self.schema("spec.servers", "at least one server is required");
        }
        for (i, s) in gw.servers.iter().enumerate() {
            let f = format!("spec.servers[{i}]");
            if s.port.number == 0 || s.port.number > 65535 {
                self.schema(
                    format!("{f}.port.number"),
                    format!("invalid port {}", s.port.number),
                );
            }
            let proto = s.port.protocol.to_ascii_uppercase();
            if !matches!(
                proto.as_str(),
                "HTTP" | "HTTPS" | "GRPC" | "GRPC-WEB" | "HTTP2" | "MONGO" | "TCP" | "TLS"
            ) {
                self.schema(
                    format!("{f}.port.protocol"),
                    format!("unknown protocol {:?}", s.port.protocol),
                );
            }
            if s.hosts.is_empty() {
                self.schema(format!("{f}.hosts"), "at least one host is required");
            }
            if matches!(proto.as_str(), "HTTPS" | "TLS") && s.tls.is_none() {
                self.schema(
                    format!("{f}.tls"),
                    format!("a {proto} server needs tls settings"),
                );
            }
            if let Some(tls) = &s.tls {
                use super::types::networking::ServerTlsMode as M;
                let mode = tls.mode.unwrap_or(M::Simple);
                let terminates = matches!(mode, M::Simple | M::Mutual | M::OptionalMutual);
                let has_cert = tls.credential_name.is_some()
                    || !tls.credential_names.is_empty()
                    || (tls.server_certificate.is_some() && tls.private_key.is_some());
                if terminates && matches!(proto.as_str(), "HTTPS" | "TLS") && !has_cert {
                    self.schema(
                        format!("{f}.tls"),
                        format!(
                            "{mode:?} TLS needs credentialName (a Kubernetes Secret) or serverCertificate and privateKey"
                        ),
                    );
                }
                if mode == M::Mutual
                    && tls.credential_name.is_none()
                    && tls.credential_names.is_empty()
                    && tls.ca_certificates.is_none()
                {
                    self.schema(
                        format!("{f}.tls.caCertificates"),
                        "MUTUAL TLS with certificate files needs caCertificates",
                    );
                }
                if matches!(mode, M::Passthrough | M::AutoPassthrough) && proto == "HTTP" {
                    self.schema(
                        format!("{f}.tls.mode"),
                        "PASSTHROUGH needs an HTTPS or TLS server",
                    );
                }
            }
        }
    }

    fn service_entry(&mut self, se: &super::types::networking::ServiceEntry) {
        use super::types::networking::Resolution;
        if se.hosts.is_empty() {
            self.schema("spec.hosts", "at least one host is required");
        }
        let resolution = se.resolution.unwrap_or(Resolution::None);
        for (i, h) in se.hosts.iter().enumerate() {
            if h.starts_with('*')
                && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
            {
                self.schema(
                    format!("spec.hosts[{i}]"),
                    format!("wildcard host {h:?} cannot be resolved with DNS resolution"),
                );
            }
        }
        let mut numbers = BTreeSet::new();
        for (i, p) in se.ports.iter().enumerate() {
            if p.number == 0 || p.number > 65535 {
                self.schema(
                    format!("spec.ports[{i}].number"),
                    format!("invalid port {}", p.number),
                );
            } else if !numbers.insert(p.number) {
                self.schema(
                    format!("spec.ports[{i}].number"),
                    format!("duplicate port {}", p.number),
                );
            }
        }
        if resolution == Resolution::Static
            && se.endpoints.is_empty()
            && se.workload_selector.is_none()
        {
            self.schema(
                "spec.endpoints",
                "STATIC resolution needs endpoints or a workloadSelector",
            );
        }
        if !se.endpoints.is_empty() && se.workload_selector.is_some() {
            self.schema(
                "spec.workloadSelector",
                "endpoints and workloadSelector exclude each other",
            );
        }
    }

    fn sidecar(&mut self, sc: &super::types::networking::Sidecar) {
        for (i, e) in sc.egress.iter().enumerate() {
            if e.hosts.is_empty() {
                self.schema(
                    format!("spec.egress[{i}].hosts"),
                    "at least one host is required",
                );
            }
            for (k, h) in e.hosts.iter().enumerate() {
                if h.split_once('/')
                    .is_none_or(|(ns, host)| ns.is_empty() || host.is_empty())
                {
                    self.schema(
                        format!("spec.egress[{i}].hosts[{k}]"),
                        format!("host {h:?} must have the form namespace/dnsName"),
                    );
                }
            }
        }
        for (i, e) in sc.egress.iter().enumerate() {
            if e.bind.as_deref().is_some_and(|b| b.starts_with("unix://")) {
                self.schema(
                    format!("spec.egress[{i}].bind"),
                    "Unix-socket egress listeners are not served by ferry-pilot",
                );
            } else if let Some(b) = e.bind.as_deref().filter(|b| !b.is_empty())
                && b.parse::<std::net::IpAddr>().is_err()
            {
                self.schema(
                    format!("spec.egress[{i}].bind"),
                    format!("bind {b:?} must be an IP address"),
                );
            }
            if e.bind.as_deref().is_some_and(|b| !b.is_empty()) && e.port.is_none() {
                self.schema(
                    format!("spec.egress[{i}].port"),
                    "an egress listener with a bind needs a port",
                );
            }
        }
        for (i, l) in sc.ingress.iter().enumerate() {
            if l.port.number == 0 || l.port.number > 65535 {
                self.schema(
                    format!("spec.ingress[{i}].port.number"),
                    format!("invalid port {}", l.port.number),
                );
            }
            // istiod's forms: localhost or the pod's IP of either family,
            // or a Unix socket.
            if let Some(ep) = l.default_endpoint.as_deref().filter(|e| !e.is_empty())
                && !ep.starts_with("unix://")
            {
                let ok = ep.rsplit_once(':').is_some_and(|(host, port)| {
                    matches!(host, "127.0.0.1" | "0.0.0.0" | "[::1]" | "[::]")
                        && port.parse::<u16>().is_ok_and(|p| p != 0)
                });
                if !ok {
                    self.schema(
                        format!("spec.ingress[{i}].defaultEndpoint"),
                        format!(
                            "{ep:?} must be 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT or unix://PATH"
                        ),
                    );
                }
            }
            if let Some(b) = l.bind.as_deref().filter(|b| !b.is_empty())
                && b.parse::<std::net::IpAddr>().is_err()
            {
                self.schema(
                    format!("spec.ingress[{i}].bind"),
                    format!("bind {b:?} must be an IP address"),
                );
            }
            // Applied by nobody here: refused rather than ignored.
            if l.tls.is_some() {
                self.schema(
                    format!("spec.ingress[{i}].tls"),
                    "TLS termination on Sidecar ingress listeners is not implemented by ferry-pilot",
                );
            }
            if l.connection_pool.is_some() {
                self.schema(
                    format!("spec.ingress[{i}].connectionPool"),
                    "connection pool settings on Sidecar ingress listeners are not implemented by ferry-pilot",
                );
            }
        }
    }

    fn service(&mut self, svc: &super::types::kube::Service) {
        for (i, p) in svc.spec.ports.iter().enumerate() {
            let proto = Protocol::from_service_port(p.name.as_deref(), p.app_protocol.as_deref());
            if proto == Protocol::Unknown && p.protocol.as_deref().unwrap_or("TCP") != "UDP" {
                self.report(
                    Code::PortNameIsNotUnderNamingConvention,
                    format!("spec.ports[{i}]"),
                    format!(
                        "port {} ({}) has no protocol prefix or appProtocol; the proxy will sniff it",
                        p.port,
                        p.name.as_deref().unwrap_or("unnamed")
                    ),
                );
            }
        }
    }

    fn authorization_policy(&mut self, ap: &super::types::security::AuthorizationPolicy) {
        use super::types::security::AuthzAction;
        let custom = ap.action == Some(AuthzAction::Custom);
        self.authorization_rules(ap);
        if custom && ap.provider.is_none() {
            self.schema("spec.provider", "a CUSTOM action needs a provider");
        }
        if !custom && ap.provider.is_some() {
            self.schema(
                "spec.provider",
                "a provider is only allowed with the CUSTOM action",
            );
        }
        if ap.selector.is_some() && (ap.target_ref.is_some() || !ap.target_refs.is_empty()) {
            self.schema("spec.selector", "selector and targetRef exclude each other");
        }
        if let Some(v) = self.r.meta.annotations.get("istio.io/dry-run")
            && !matches!(
                v.as_str(),
                "1" | "t"
                    | "T"
                    | "true"
                    | "TRUE"
                    | "True"
                    | "0"
                    | "f"
                    | "F"
                    | "false"
                    | "FALSE"
                    | "False"
            )
        {
            self.schema(
                "metadata.annotations[istio.io/dry-run]",
                format!("{v:?} is not a boolean"),
            );
        }
        if let Some(sel) = &ap.selector
            && !sel.match_labels.is_empty()
            && let Some(ws) = self.v.workloads.get(self.ns())
            && !ws
                .iter()
                .any(|w| sel.match_labels.iter().all(|(k, v)| w.get(k) == Some(v)))
        {
            let labels: Vec<String> = sel
                .match_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            self.report(
                Code::NoMatchingWorkloadsFound,
                "spec.selector.matchLabels",
                format!(
                    "no workload in namespace {} has the labels {}",
                    self.ns(),
                    labels.join(",")
                ),
            );
        }
        for (i, rule) in ap.rules.iter().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                let s = &from.source;
                for (name, list) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    for (k, ip) in list.iter().enumerate() {
                        if !valid_cidr(ip) {
                            self.schema(
                                format!("spec.rules[{i}].from[{j}].source.{name}[{k}]"),
                                format!("invalid IP address or CIDR {ip:?}"),
                            );
                        }
                    }
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                if !c.key.is_empty() && !known_condition_key(&c.key) {
                    self.schema(
                        format!("spec.rules[{i}].when[{j}].key"),
                        format!("unknown attribute {:?}", c.key),
                    );
                }
                let check: Option<(ValueCheck, &str)> = match c.key.as_str() {
                    "source.ip" | "remote.ip" | "destination.ip" => {
                        Some((valid_cidr, "IP address or CIDR"))
                    }
                    "destination.port" => Some((|p: &str| p.parse::<u16>().is_ok(), "port")),
                    _ => None,
                };
                if let Some((ok, what)) = check {
                    for (name, list) in [("values", &c.values), ("notValues", &c.not_values)] {
                        for (k, v) in list.iter().enumerate() {
                            if !ok(v) {
                                self.schema(
                                    format!("spec.rules[{i}].when[{j}].{name}[{k}]"),
                                    format!("invalid {what} {v:?}"),
                                );
                            }
                        }
                    }
                }
            }
            for (j, to) in rule.to.iter().enumerate() {
                for (k, port) in to
                    .operation
                    .ports
                    .iter()
                    .chain(&to.operation.not_ports)
                    .enumerate()
                {
                    if port.parse::<u16>().is_err() {
                        self.schema(
                            format!("spec.rules[{i}].to[{j}].operation.ports[{k}]"),
                            format!("invalid port {port:?}"),
                        );
                    }
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                if c.key.is_empty() {
                    self.schema(format!("spec.rules[{i}].when[{j}].key"), "key is required");
                }
                if c.values.is_empty() && c.not_values.is_empty() {
                    self.schema(
                        format!("spec.rules[{i}].when[{j}]"),
                        "values or notValues is required",
                    );
                }
            }
        }
    }

    /// istiod's webhook checks of the rules' shape, and its warning about
    /// DENY rules that only name HTTP attributes.
    fn authorization_rules(&mut self, ap: &super::types::security::AuthorizationPolicy) {
        use super::types::security::AuthzAction;
        let action = ap.action.unwrap_or(AuthzAction::Allow);
        if ap.rules.is_empty() && matches!(action, AuthzAction::Deny | AuthzAction::Custom) {
            self.schema(
                "spec.rules",
                "a DENY or CUSTOM policy without rules never applies; add an empty rule {} to match every request",
            );
        }
        for (i, rule) in ap.rules.iter().enumerate() {
            let mut tcp_from = false;
            for (j, from) in rule.from.iter().enumerate() {
                let s = &from.source;
                let field = format!("spec.rules[{i}].from[{j}].source");
                let identity = s.principals.len()
                    + s.not_principals.len()
                    + s.namespaces.len()
                    + s.not_namespaces.len();
                let accounts = s.service_accounts.len() + s.not_service_accounts.len();
                if identity > 0 && accounts > 0 {
                    self.schema(
                        &field,
                        "serviceAccounts cannot be combined with principals or namespaces",
                    );
                }
                let network = s.ip_blocks.len()
                    + s.not_ip_blocks.len()
                    + s.remote_ip_blocks.len()
                    + s.not_remote_ip_blocks.len()
                    + s.trust_domains.len()
                    + s.not_trust_domains.len();
                if identity + accounts + network > 0 {
                    tcp_from = true;
                }
                if identity
                    + accounts
                    + network
                    + s.request_principals.len()
                    + s.not_request_principals.len()
                    == 0
                {
                    self.schema(&field, "source must not be empty");
                }
                if action == AuthzAction::Custom {
                    for (name, n) in [
                        ("namespaces", s.namespaces.len() + s.not_namespaces.len()),
                        ("serviceAccounts", accounts),
                        ("principals", s.principals.len() + s.not_principals.len()),
                        (
                            "requestPrincipals",
                            s.request_principals.len() + s.not_request_principals.len(),
                        ),
                    ] {
                        if n > 0 {
                            self.schema(
                                &field,
                                format!("{name} is not supported with the CUSTOM action"),
                            );
                        }
                    }
                }
            }
            let mut tcp_to = false;
            for (j, to) in rule.to.iter().enumerate() {
                let o = &to.operation;
                if o.ports.len() + o.not_ports.len() > 0 {
                    tcp_to = true;
                }
                if o.ports.len()
                    + o.not_ports.len()
                    + o.methods.len()
                    + o.not_methods.len()
                    + o.paths.len()
                    + o.not_paths.len()
                    + o.hosts.len()
                    + o.not_hosts.len()
                    == 0
                {
                    self.schema(
                        format!("spec.rules[{i}].to[{j}].operation"),
                        "operation must not be empty",
                    );
                }
            }
            if action == AuthzAction::Custom {
                for (j, c) in rule.when.iter().enumerate() {
                    let k = c.key.as_str();
                    if matches!(
                        k,
                        "source.namespace" | "source.serviceAccount" | "source.principal"
                    ) || k.starts_with("request.auth.")
                    {
                        self.schema(
                            format!("spec.rules[{i}].when[{j}].key"),
                            format!("{k} is not supported with the CUSTOM action"),
                        );
                    }
                }
            }
            let from_only_http = !rule.from.is_empty() && rule.to.is_empty() && !tcp_from;
            let to_only_http = !rule.to.is_empty() && !tcp_to;
            if action == AuthzAction::Deny && (from_only_http || to_only_http) {
                self.report(
                    Code::SchemaWarning,
                    format!("spec.rules[{i}]"),
                    "this DENY rule names only HTTP attributes, so on the TCP ports in the \
                     policy's scope it denies every connection; list the ports it is meant for",
                );
            }
        }
    }

    fn request_authentication(&mut self, ra: &super::types::security::RequestAuthentication) {
        for (i, rule) in ra.jwt_rules.iter().enumerate() {
            if rule.issuer.is_empty() {
                self.schema(format!("spec.jwtRules[{i}].issuer"), "issuer is required");
            }
            if rule.jwks.is_some() && rule.jwks_uri.is_some() {
                self.schema(
                    format!("spec.jwtRules[{i}]"),
                    "jwks and jwksUri exclude each other",
                );
            }
        }
    }

    /// What Ferry's translation of the Telemetry API does not implement is
    /// refused by name.
    fn telemetry(&mut self, t: &super::types::telemetry::Telemetry) {
        if t.target_ref.is_some() || !t.target_refs.is_empty() {
            self.schema(
                "spec.targetRef",
                "policy attachment (targetRef, targetRefs) is not supported; use selector",
            );
        }
        for (i, tr) in t.tracing.iter().enumerate() {
            let f = format!("spec.tracing[{i}]");
            if tr
                .random_sampling_percentage
                .is_some_and(|p| !(0.0..=100.0).contains(&p))
            {
                self.schema(
                    format!("{f}.randomSamplingPercentage"),
                    "must be in [0, 100]",
                );
            }
            if tr.use_request_id_for_trace_sampling == Some(false) {
                self.schema(
                    format!("{f}.useRequestIdForTraceSampling"),
                    "false is not supported: Ferry samples by the request id",
                );
            }
            if tr.disable_context_propagation == Some(true) {
                self.schema(
                    format!("{f}.disableContextPropagation"),
                    "switching off trace context propagation is not supported",
                );
            }
            for (name, tag) in tr.custom_tags.iter().flatten() {
                let tf = format!("{f}.customTags.{name}");
                let kinds = [
                    tag.literal.is_some(),
                    tag.environment.is_some(),
                    tag.header.is_some(),
                    tag.formatter.is_some(),
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if kinds != 1 {
                    self.schema(
                        &tf,
                        "set exactly one of literal, environment, header or formatter",
                    );
                }
                if tag
                    .formatter
                    .as_ref()
                    .is_some_and(|x| x.value.contains('%'))
                {
                    self.schema(
                        format!("{tf}.formatter"),
                        "custom tags with format operators are not supported",
                    );
                }
            }
        }
        for (i, m) in t.metrics.iter().enumerate() {
            if !m.overrides.is_empty() {
                self.schema(
                    format!("spec.metrics[{i}].overrides"),
                    "metrics overrides are not supported: Istio's standard metrics are fixed",
                );
            }
        }
        for (i, a) in t.access_logging.iter().enumerate() {
            if a.filter.is_some() {
                self.schema(
                    format!("spec.accessLogging[{i}].filter"),
                    "CEL filters are not supported",
                );
            }
        }
    }

    fn peer_authentication(&mut self, pa: &super::types::security::PeerAuthentication) {
        for port in pa.port_level_mtls.keys() {
            if *port == 0 || *port > 65535 {
                self.schema(
                    format!("spec.portLevelMtls.{port}"),
                    format!("invalid port {port}"),
                );
            }
        }
        if pa
            .selector
            .as_ref()
            .is_some_and(|s| s.match_labels.is_empty())
            && !pa.port_level_mtls.is_empty()
        {
            self.schema(
                "spec.selector.matchLabels",
                "port-level mTLS needs a selector with labels",
            );
        }
        if !pa.port_level_mtls.is_empty() && pa.selector.is_none() {
            self.schema(
                "spec.portLevelMtls",
                "port-level mTLS needs a workload selector",
            );
        }
    }
}

/// Checks one `when` value.
type ValueCheck = fn(&str) -> bool;

/// An IP address or CIDR as AuthorizationPolicy takes them.
fn valid_cidr(v: &str) -> bool {
    crate::istio::types::security::ip_block(v).is_some()
}

/// The `when` keys AuthorizationPolicy understands.
fn known_condition_key(k: &str) -> bool {
    let bracketed = |prefix: &str| {
        k.strip_prefix(prefix)
            .is_some_and(|rest| rest.len() > 2 && rest.starts_with('[') && rest.ends_with(']'))
    };
    matches!(
        k,
        "source.ip"
            | "remote.ip"
            | "source.namespace"
            | "source.principal"
            | "source.serviceAccount"
            | "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "destination.ip"
            | "destination.port"
            | "connection.sni"
    ) || bracketed("request.headers")
        || bracketed("request.auth.claims")
        || (k.starts_with("experimental.envoy.filters.") && k.ends_with(']') && k.contains('['))
}

/// Envoy's `x-envoy-retry-on` and gRPC retry conditions, which Istio passes
/// through unchanged.
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Two matches select the same requests (names and stat prefixes aside).
fn same_match(a: &HttpMatchRequest, b: &HttpMatchRequest) -> bool {
    let strip = |m: &HttpMatchRequest| HttpMatchRequest {
        name: None,
        stat_prefix: None,
        ..m.clone()
    };
    strip(a) == strip(b)
}
