//! Outbound HTTP routing: the route configuration named after a port
//! (`9080`), one virtual host per service on that port with istiod's domain
//! list, and each VirtualService HTTP rule as Envoy routes (matches, weighted
//! clusters, redirects, rewrites, timeouts, retries, faults, mirrors, CORS,
//! header operations). Hash policies of consistent-hash DestinationRules are
//! attached here too, since Envoy hashes per route.
//!
//! A sidecar's route configurations are translated once per [`RouteClass`]
//! and port, and shared while somebody holds them ([`Memo`]): with thousands
//! of services they are most of what a change costs per proxy, and proxies
//! of one workload class get the same ones.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HeaderValue, HeaderValueOption, RuntimeFractionalPercent, data_source,
    header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::route::v3::{
    Decorator, DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction,
    RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
    header_matcher::HeaderMatchSpecifier,
    query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    retry_policy::{RetryBackOff, RetryHostPredicate},
    route::Action,
    route_action::{
        ClusterSpecifier, HashPolicy, HostRewriteSpecifier, RequestMirrorPolicy, hash_policy,
    },
    route_match::PathSpecifier,
    weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
    FaultDelay, fault_delay::FaultDelaySecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    FaultAbort, HttpFault, fault_abort::ErrorType,
};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value};

use super::cluster::PASSTHROUGH;
use super::outbound::OutboundClass;
use super::registry::{ServiceKind, selects};
use super::util::{any, duration, fraction, seconds};
use super::{Scope, Service};
use crate::istio::names;
use crate::istio::source::Resource;
use crate::istio::types::networking::{
    Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRoute, OutboundMode, StringMatch,
    UnmatchedPreflights, VirtualService,
};

pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

/// Istio's retry conditions when a rule sets none.
pub const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// The route configuration for outbound HTTP port `port`.
/// Everything of a proxy that a sidecar's outbound route configuration
/// reads. It reads the proxy's namespace (`exportTo`, `sourceNamespace`,
/// rule precedence), the Sidecar that scopes it and the DestinationRules
/// whose `workloadSelector` selects it (all three in its
/// [`OutboundClass`]), and its labels only through VirtualService
/// `sourceLabels`: the proxy's value of each label some match names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RouteClass {
    outbound: OutboundClass,
    source_labels: Vec<Option<String>>,
    port: u32,
    /// The services of the port's virtual hosts (their places in the mesh's
    /// registry, which lives as long as the memo).
    services: Vec<usize>,
}

/// The sidecar route configurations of one mesh, by [`RouteClass`]. Held
/// weakly: ferry-pilot holds them while it translates every proxy for a
/// change, and the messages go once they are encoded.
#[derive(Debug, Default)]
pub(super) struct Memo {
    /// Every label a VirtualService `sourceLabels` names, sorted.
    source_labels: Vec<String>,
    table: Mutex<HashMap<RouteClass, Weak<RouteConfiguration>>>,
}

impl Memo {
    pub(super) fn new(virtual_services: &[Resource]) -> Self {
        let mut keys = BTreeSet::new();
        for r in virtual_services {
            if let crate::istio::source::Spec::VirtualService(vs) = &r.spec {
                for m in vs.http.iter().flat_map(|h| &h.match_) {
                    keys.extend(m.source_labels.keys().cloned());
                }
            }
        }
        Self {
            source_labels: keys.into_iter().collect(),
            table: Mutex::default(),
        }
    }
}

/// [`route_config`] for a sidecar, shared with every proxy of its class
/// while somebody holds it.
pub(super) fn shared_route_config(
    scope: &Scope<'_>,
    port: u32,
    services: &[&Service],
) -> Arc<RouteConfiguration> {
    let memo = &scope.mesh.routes;
    let class = RouteClass {
        outbound: scope.mesh.outbound.class(scope),
        source_labels: memo
            .source_labels
            .iter()
            .map(|k| scope.proxy.labels.get(k).cloned())
            .collect(),
        port,
        services: services
            .iter()
            .map(|s| std::ptr::from_ref::<Service>(s) as usize)
            .collect(),
    };
    let mut table = memo.table.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(held) = table.get(&class).and_then(Weak::upgrade) {
        return held;
    }
    let made = Arc::new(route_config(scope, port, services));
    table.insert(class, Arc::downgrade(&made));
    made
}

pub(super) fn route_config(
    scope: &Scope<'_>,
    port: u32,
    services: &[&Service],
) -> RouteConfiguration {
    let mut used = BTreeSet::new();
    let mut virtual_hosts = Vec::new();
    for svc in services {
        let domains: Vec<String> = domains(scope, svc, port)
            .into_iter()
            .filter(|d| used.insert(d.clone()))
            .collect();
        // Envoy refuses a domain twice in one route configuration; a host
        // claimed by two services keeps its first owner.
        if domains.is_empty() {
            continue;
        }
        let routes = match scope.virtual_service(&svc.host) {
            Some((r, vs)) => {
                let routes = vs_routes(scope, &svc.host, port, r, vs, MESH);
                if routes.is_empty() {
                    vec![default_route(scope, svc, port)]
                } else {
                    routes
                }
            }
            None => vec![default_route(scope, svc, port)],
        };
        virtual_hosts.push(VirtualHost {
            name: format!("{}:{port}", svc.host),
            domains,
            routes,
            include_request_attempt_count: true,
            ..Default::default()
        });
    }
    let fallback = match scope.outbound_policy {
        OutboundMode::AllowAny => VirtualHost {
            name: "allow_any".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "allow_any".into(),
                r#match: Some(prefix_match("/")),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(PASSTHROUGH.into())),
                    timeout: Some(seconds(0)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            include_request_attempt_count: true,
            ..Default::default()
        },
        OutboundMode::RegistryOnly => VirtualHost {
            name: "block_all".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "block_all".into(),
                r#match: Some(prefix_match("/")),
                action: Some(Action::DirectResponse(DirectResponseAction {
                    status: 502,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            include_request_attempt_count: true,
            ..Default::default()
        },
    };
    if !used.contains("*") {
        virtual_hosts.push(fallback);
    }
    RouteConfiguration {
        name: port.to_string(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// The names a client may use for `svc` on `port`, as istiod lists them:
/// the FQDN and its shorter forms (the bare name only from the service's
/// own namespace), the VIP, each with and without `:port`.
fn domains(scope: &Scope<'_>, svc: &Service, port: u32) -> Vec<String> {
    let mut names = vec![svc.host.clone()];
    if matches!(svc.kind, ServiceKind::Kube { .. }) {
        let domain = &scope.mesh.options.domain;
        let base = format!("{}.{}", svc.name, svc.namespace);
        names.push(format!(
            "{base}.svc.{}",
            domain.split('.').next().unwrap_or(domain)
        ));
        names.push(format!("{base}.svc"));
        names.push(base);
        if svc.namespace == scope.proxy.namespace {
            names.push(svc.name.clone());
        }
    }
    names.dedup();
    if let Some(vip) = &svc.vip {
        names.push(vip.clone());
    }
    let mut out = Vec::with_capacity(names.len() * 2);
    for n in names {
        out.push(format!("{n}:{port}"));
        out.push(n);
    }
    // Keep "name" before "name:port" for readability of dumps.
    out.sort_by_key(|d| d.contains(':') && !d.starts_with('['));
    out.dedup();
    out
}

/// The route istiod writes for a service without a VirtualService.
fn default_route(scope: &Scope<'_>, svc: &Service, port: u32) -> Route {
    let cluster = names::outbound_cluster(port, "", &svc.host);
    Route {
        name: "default".into(),
        r#match: Some(prefix_match("/")),
        decorator: Some(decorator(svc, port)),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster)),
            timeout: Some(seconds(0)),
            retry_policy: Some(default_retry_policy()),
            hash_policy: hash_policy(scope, svc, port, None),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub(super) fn decorator(svc: &Service, port: u32) -> Decorator {
    host_decorator(&svc.host, port)
}

fn host_decorator(host: &str, port: u32) -> Decorator {
    Decorator {
        operation: format!("{host}:{port}/*"),
        ..Default::default()
    }
}

pub(super) fn prefix_match(prefix: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix(prefix.into())),
        ..Default::default()
    }
}

pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        retry_on: DEFAULT_RETRY_ON.into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retry_host_predicate: vec![previous_hosts()],
        host_selection_retry_max_attempts: 5,
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

fn previous_hosts() -> RetryHostPredicate {
    RetryHostPredicate {
        name: "envoy.retry_host_predicates.previous_hosts".into(),
        config_type: Some(
            envoy_types::pb::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                any(&PreviousHostsPredicate {}),
            ),
        ),
    }
}

/// The gateway name sidecars' rules bind to.
pub const MESH: &str = "mesh";

/// Whether a `gateways` list written in a resource of `namespace` names
/// `binding` (`mesh`, or a gateway as `namespace/name`). An empty list
/// binds to the mesh only.
pub(super) fn binds(gateways: &[String], namespace: &str, binding: &str) -> bool {
    if gateways.is_empty() {
        return binding == MESH;
    }
    gateways.iter().any(|g| {
        if g == MESH {
            binding == MESH
        } else if g.contains('/') {
            g == binding
        } else {
            binding.split_once('/') == Some((namespace, g.as_str()))
        }
    })
}

/// Routes of the HTTP rules of `vs` that apply to this proxy on `port`
/// under `binding` (the mesh or one gateway); `host` names the routes'
/// decorator. Delegated rules are replaced by the delegate's rules under
/// the parent's matches. Empty when no rule applies.
pub(super) fn vs_routes(
    scope: &Scope<'_>,
    host: &str,
    port: u32,
    r: &Resource,
    vs: &VirtualService,
    binding: &str,
) -> Vec<Route> {
    let mut out = Vec::new();
    let ns = r.meta.namespace.as_str();
    // A match's gateways replace the VirtualService's.
    let vs_bound = binds(&vs.gateways, ns, binding);
    for rule in &vs.http {
        let matches: Vec<Option<&HttpMatchRequest>> = if rule.match_.is_empty() {
            if !vs_bound {
                continue;
            }
            vec![None]
        } else {
            rule.match_
                .iter()
                .filter(|m| applies(scope, m, port, ns, binding, vs_bound))
                .map(Some)
                .collect()
        };
        if let Some(d) = &rule.delegate {
            let Some((dr, dvs)) = scope.delegate(&d.name, d.namespace.as_deref().unwrap_or(ns))
            else {
                continue;
            };
            for m in &matches {
                for child in &dvs.http {
                    let Some(merged) = super::delegate::merge(rule, *m, child) else {
                        continue;
                    };
                    let cms: Vec<Option<&HttpMatchRequest>> = if merged.match_.is_empty() {
                        vec![None]
                    } else {
                        merged.match_.iter().map(Some).collect()
                    };
                    for cm in cms {
                        out.push(http_route(scope, host, port, dr, &merged, cm));
                    }
                }
            }
        } else {
            for m in &matches {
                out.push(http_route(scope, host, port, r, rule, *m));
            }
        }
        // A rule without a match catches everything: nothing after it runs.
        if rule.match_.is_empty() {
            break;
        }
    }
    out
}

/// Whether a match's proxy-side conditions hold: port, gateways, source
/// labels and namespace are decided here, per proxy, not by Envoy.
fn applies(
    scope: &Scope<'_>,
    m: &HttpMatchRequest,
    port: u32,
    ns: &str,
    binding: &str,
    vs_bound: bool,
) -> bool {
    let bound = if m.gateways.is_empty() {
        vs_bound
    } else {
        binds(&m.gateways, ns, binding)
    };
    bound
        && m.port.is_none_or(|p| p == port)
        && selects(&m.source_labels, &scope.proxy.labels)
        && m.source_namespace
            .as_ref()
            .is_none_or(|n| n == &scope.proxy.namespace)
}

fn http_route(
    scope: &Scope<'_>,
    host: &str,
    port: u32,
    r: &Resource,
    rule: &HttpRoute,
    m: Option<&HttpMatchRequest>,
) -> Route {
    let name = match (rule.name.as_deref(), m.and_then(|m| m.name.as_deref())) {
        (Some(a), Some(b)) => format!("{a}.{b}"),
        (Some(a), None) => a.to_string(),
        (None, Some(b)) => b.to_string(),
        (None, None) => String::new(),
    };
    let mut route = Route {
        name,
        r#match: Some(route_match(m)),
        decorator: Some(host_decorator(host, port)),
        ..Default::default()
    };
    let ns = r.meta.namespace.as_str();
    if let Some(h) = &rule.headers {
        apply_headers(
            h,
            &mut route.request_headers_to_add,
            &mut route.request_headers_to_remove,
            &mut route.response_headers_to_add,
            &mut route.response_headers_to_remove,
        );
    }
    if let Some(redirect) = &rule.redirect {
        route.action = Some(Action::Redirect(RedirectAction {
            host_redirect: redirect.authority.clone().unwrap_or_default(),
            port_redirect: redirect.port.unwrap_or(0),
            response_code: match redirect.redirect_code.unwrap_or(301) {
                302 => RedirectResponseCode::Found,
                303 => RedirectResponseCode::SeeOther,
                307 => RedirectResponseCode::TemporaryRedirect,
                308 => RedirectResponseCode::PermanentRedirect,
                _ => RedirectResponseCode::MovedPermanently,
            } as i32,
            scheme_rewrite_specifier: redirect
                .scheme
                .clone()
                .map(SchemeRewriteSpecifier::SchemeRedirect),
            path_rewrite_specifier: redirect
                .uri
                .clone()
                .map(PathRewriteSpecifier::PathRedirect)
                .or_else(|| {
                    redirect
                        .prefix_rewrite
                        .clone()
                        .map(PathRewriteSpecifier::PrefixRewrite)
                }),
            ..Default::default()
        }));
        return route;
    }
    if let Some(dr) = &rule.direct_response {
        route.action = Some(Action::DirectResponse(DirectResponseAction {
            status: dr.status,
            body: dr.body.as_ref().and_then(|b| {
                let specifier = match (&b.string, &b.bytes) {
                    (Some(s), _) => data_source::Specifier::InlineString(s.clone()),
                    (None, Some(b64)) => data_source::Specifier::InlineBytes(base64_decode(b64)?),
                    (None, None) => return None,
                };
                Some(DataSource {
                    specifier: Some(specifier),
                    ..Default::default()
                })
            }),
            ..Default::default()
        }));
        return route;
    }
    let mut action = RouteAction {
        timeout: Some(rule.timeout.map_or(seconds(0), |d| duration(d.0))),
        ..Default::default()
    };
    // Destinations: one cluster, or weighted clusters (zero weights dropped,
    // as istiod does).
    let dests: Vec<_> = rule
        .route
        .iter()
        .filter(|d| d.weight.unwrap_or(0) > 0 || rule.route.len() == 1)
        .collect();
    let dests = if dests.is_empty() {
        rule.route.iter().take(1).collect()
    } else {
        dests
    };
    let mut first_service = None;
    if dests.len() == 1 {
        let d = dests[0];
        let (cluster, target) = cluster_for(scope, &d.destination, ns, port);
        first_service = target.map(|s| {
            (
                s,
                d.destination.subset.clone(),
                destination_port(&d.destination, target, port),
            )
        });
        if let Some(h) = &d.headers {
            apply_headers(
                h,
                &mut route.request_headers_to_add,
                &mut route.request_headers_to_remove,
                &mut route.response_headers_to_add,
                &mut route.response_headers_to_remove,
            );
        }
        action.cluster_specifier = Some(ClusterSpecifier::Cluster(cluster));
    } else {
        let clusters = dests
            .iter()
            .map(|d| {
                let (name, _) = cluster_for(scope, &d.destination, ns, port);
                let mut cw = ClusterWeight {
                    name,
                    weight: Some(UInt32Value {
                        value: d.weight.unwrap_or(0).max(0) as u32,
                    }),
                    ..Default::default()
                };
                if let Some(h) = &d.headers {
                    apply_headers(
                        h,
                        &mut cw.request_headers_to_add,
                        &mut cw.request_headers_to_remove,
                        &mut cw.response_headers_to_add,
                        &mut cw.response_headers_to_remove,
                    );
                }
                cw
            })
            .collect();
        action.cluster_specifier = Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters,
            ..Default::default()
        }));
    }
    if let Some((target, subset, dport)) = first_service {
        action.hash_policy = hash_policy(scope, target, dport, subset.as_deref());
    }
    if let Some(rw) = &rule.rewrite {
        if let Some(uri) = &rw.uri {
            action.prefix_rewrite = uri.clone();
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            action.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(regex(&rr.match_)),
                substitution: rr.rewrite.clone(),
            });
        }
        if let Some(authority) = &rw.authority {
            action.host_rewrite_specifier =
                Some(HostRewriteSpecifier::HostRewriteLiteral(authority.clone()));
        }
    }
    action.retry_policy = match &rule.retries {
        None => Some(default_retry_policy()),
        Some(r) if r.attempts <= 0 => None,
        Some(r) => {
            let mut policy = RetryPolicy {
                num_retries: Some(UInt32Value {
                    value: r.attempts as u32,
                }),
                per_try_timeout: r.per_try_timeout.map(|d| duration(d.0)),
                host_selection_retry_max_attempts: 5,
                retry_host_predicate: if r.retry_ignore_previous_hosts == Some(false) {
                    Vec::new()
                } else {
                    vec![previous_hosts()]
                },
                retry_back_off: r.backoff.map(|d| RetryBackOff {
                    base_interval: Some(duration(d.0)),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match &r.retry_on {
                None => {
                    policy.retry_on = DEFAULT_RETRY_ON.into();
                    policy.retriable_status_codes = vec![503];
                }
                Some(on) => {
                    // Numbers in retryOn are status codes to retry on.
                    let mut conds = Vec::new();
                    for c in on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                        match c.parse::<u32>() {
                            Ok(code) => policy.retriable_status_codes.push(code),
                            Err(_) => conds.push(c.to_string()),
                        }
                    }
                    if !policy.retriable_status_codes.is_empty()
                        && !conds.iter().any(|c| c == "retriable-status-codes")
                    {
                        conds.push("retriable-status-codes".into());
                    }
                    policy.retry_on = conds.join(",");
                }
            }
            Some(policy)
        }
    };
    let mirrors: Vec<(&Destination, f64)> = rule
        .mirror
        .iter()
        .map(|d| {
            let pct = rule
                .mirror_percentage
                .map(|p| p.value)
                .or(rule.mirror_percent.map(f64::from))
                .unwrap_or(100.0);
            (d, pct)
        })
        .chain(
            rule.mirrors
                .iter()
                .map(|m| (&m.destination, m.percentage.map_or(100.0, |p| p.value))),
        )
        .collect();
    action.request_mirror_policies = mirrors
        .into_iter()
        .map(|(d, pct)| RequestMirrorPolicy {
            cluster: cluster_for(scope, d, ns, port).0,
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: Some(fraction(pct)),
                ..Default::default()
            }),
            trace_sampled: Some(BoolValue { value: false }),
            ..Default::default()
        })
        .collect();
    if let Some(fault) = &rule.fault {
        let http_fault = HttpFault {
            delay: fault.delay.as_ref().and_then(|d| {
                let delay = d.fixed_delay.or(d.exponential_delay)?;
                Some(FaultDelay {
                    fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(duration(delay.0))),
                    percentage: Some(fraction(
                        d.percentage
                            .map(|p| p.value)
                            .or(d.percent.map(f64::from))
                            .unwrap_or(100.0),
                    )),
                })
            }),
            abort: fault.abort.as_ref().and_then(|a| {
                let error_type = match (a.http_status, &a.grpc_status) {
                    (Some(s), _) => ErrorType::HttpStatus(s.max(0) as u32),
                    (None, Some(g)) => ErrorType::GrpcStatus(grpc_code(g)?),
                    _ => return None,
                };
                Some(FaultAbort {
                    error_type: Some(error_type),
                    percentage: Some(fraction(a.percentage.map_or(100.0, |p| p.value))),
                    ..Default::default()
                })
            }),
            ..Default::default()
        };
        route
            .typed_per_filter_config
            .insert(FAULT_FILTER.into(), any(&http_fault));
    }
    if let Some(cors) = &rule.cors_policy {
        route
            .typed_per_filter_config
            .insert(CORS_FILTER.into(), cors_policy(cors));
    }
    route.action = Some(Action::Route(action));
    route
}

/// The port a destination goes to: its own, the service's only port, or
/// the port the request arrived on.
fn destination_port(d: &Destination, target: Option<&Service>, port: u32) -> u32 {
    if let Some(p) = &d.port {
        return p.number;
    }
    match target {
        Some(s) if s.ports.len() == 1 => s.ports[0].port,
        _ => port,
    }
}

pub(super) fn cluster_for<'a>(
    scope: &Scope<'a>,
    d: &Destination,
    ns: &str,
    port: u32,
) -> (String, Option<&'a Service>) {
    let target = scope.resolve(&d.host, ns);
    let host = target.map_or_else(
        || names::resolve_host(&d.host, ns, &scope.mesh.options.domain),
        |s| s.host.clone(),
    );
    let dport = destination_port(d, target, port);
    (
        names::outbound_cluster(dport, d.subset.as_deref().unwrap_or(""), &host),
        target,
    )
}

/// DestinationRule `consistentHash` → the route's hash policy.
fn hash_policy(
    scope: &Scope<'_>,
    svc: &Service,
    port: u32,
    subset: Option<&str>,
) -> Vec<HashPolicy> {
    let policy = scope.traffic_policy(svc, port, subset);
    let Some(ch) = policy.load_balancer.and_then(|lb| lb.consistent_hash) else {
        return Vec::new();
    };
    let specifier = if let Some(h) = ch.http_header_name {
        hash_policy::PolicySpecifier::Header(hash_policy::Header {
            header_name: h,
            ..Default::default()
        })
    } else if let Some(c) = ch.http_cookie {
        hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
            name: c.name,
            path: c.path.unwrap_or_default(),
            ttl: c.ttl.map(|d| duration(d.0)),
            attributes: c
                .attributes
                .into_iter()
                .map(|a| hash_policy::CookieAttribute {
                    name: a.name,
                    value: a.value.unwrap_or_default(),
                })
                .collect(),
        })
    } else if ch.use_source_ip == Some(true) {
        hash_policy::PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties {
            source_ip: true,
        })
    } else if let Some(q) = ch.http_query_parameter_name {
        hash_policy::PolicySpecifier::QueryParameter(hash_policy::QueryParameter { name: q })
    } else {
        return Vec::new();
    };
    vec![HashPolicy {
        policy_specifier: Some(specifier),
        ..Default::default()
    }]
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher {
        regex: pattern.to_string(),
        ..Default::default()
    }
}

fn string_matcher(m: &StringMatch) -> Option<StringMatcher> {
    let pattern = if let Some(e) = &m.exact {
        MatchPattern::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        MatchPattern::Prefix(p.clone())
    } else if let Some(r) = &m.regex {
        MatchPattern::SafeRegex(regex(r))
    } else {
        return None;
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

fn header_matcher(name: &str, m: &StringMatch, invert: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_ascii_lowercase(),
        invert_match: invert,
        // An empty match only asks for the header to be there.
        header_match_specifier: Some(match string_matcher(m) {
            Some(sm) => HeaderMatchSpecifier::StringMatch(sm),
            None => HeaderMatchSpecifier::PresentMatch(true),
        }),
        ..Default::default()
    }
}

fn route_match(m: Option<&HttpMatchRequest>) -> RouteMatch {
    let Some(m) = m else {
        return prefix_match("/");
    };
    let mut rm = RouteMatch {
        path_specifier: Some(match &m.uri {
            Some(StringMatch { exact: Some(p), .. }) => PathSpecifier::Path(p.clone()),
            Some(StringMatch {
                prefix: Some(p), ..
            }) => PathSpecifier::Prefix(p.clone()),
            Some(StringMatch { regex: Some(r), .. }) => PathSpecifier::SafeRegex(regex(r)),
            _ => PathSpecifier::Prefix("/".into()),
        }),
        case_sensitive: m.ignore_uri_case.then_some(BoolValue { value: false }),
        ..Default::default()
    };
    for (name, sm) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        if let Some(sm) = sm {
            rm.headers.push(header_matcher(name, sm, false));
        }
    }
    for (name, sm) in &m.headers {
        rm.headers.push(header_matcher(name, sm, false));
    }
    for (name, sm) in &m.without_headers {
        rm.headers.push(header_matcher(name, sm, true));
    }
    for (name, sm) in &m.query_params {
        let specifier = match string_matcher(sm) {
            // `exact: ""` asks only for presence, as in Istio.
            Some(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(e)),
                ..
            }) if e.is_empty() => QueryParameterMatchSpecifier::PresentMatch(true),
            Some(s) => QueryParameterMatchSpecifier::StringMatch(s),
            None => QueryParameterMatchSpecifier::PresentMatch(true),
        };
        rm.query_parameters.push(QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(specifier),
        });
    }
    rm
}

fn header_options(ops: &HeaderOperations) -> Vec<HeaderValueOption> {
    let opt = |(k, v): (&String, &String), action: HeaderAppendAction| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    ops.set
        .iter()
        .map(|kv| opt(kv, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            ops.add
                .iter()
                .map(|kv| opt(kv, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .collect()
}

fn apply_headers(
    h: &Headers,
    req_add: &mut Vec<HeaderValueOption>,
    req_remove: &mut Vec<String>,
    resp_add: &mut Vec<HeaderValueOption>,
    resp_remove: &mut Vec<String>,
) {
    if let Some(req) = &h.request {
        req_add.extend(header_options(req));
        req_remove.extend(req.remove.iter().cloned());
    }
    if let Some(resp) = &h.response {
        resp_add.extend(header_options(resp));
        resp_remove.extend(resp.remove.iter().cloned());
    }
}

fn cors_policy(c: &crate::istio::types::networking::CorsPolicy) -> Any {
    let mut origins: Vec<StringMatcher> =
        c.allow_origins.iter().filter_map(string_matcher).collect();
    origins.extend(c.allow_origin.iter().map(|o| StringMatcher {
        match_pattern: Some(MatchPattern::Exact(o.clone())),
        ..Default::default()
    }));
    let policy = CorsPolicy {
        allow_origin_string_match: origins,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c
            .max_age
            .map(|d| d.0.as_secs().to_string())
            .unwrap_or_default(),
        allow_credentials: c.allow_credentials.map(|v| BoolValue { value: v }),
        filter_enabled: Some(RuntimeFractionalPercent {
            default_value: Some(fraction(100.0)),
            ..Default::default()
        }),
        forward_not_matching_preflights: Some(BoolValue {
            value: c.unmatched_preflights != Some(UnmatchedPreflights::Ignore),
        }),
        ..Default::default()
    };
    any(&policy)
}

/// gRPC status names (as Istio's `grpcStatus` takes them) to codes.
fn grpc_code(name: &str) -> Option<u32> {
    const CODES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    name.parse().ok().or_else(|| {
        CODES
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .map(|p| p as u32)
    })
}

/// Base64 as protobuf JSON writes `bytes`: either alphabet, padding
/// optional (whitespace and `=` are dropped first).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(true),
    );
    let standard: String = text
        .chars()
        .filter(|c| !c.is_ascii_whitespace() && *c != '=')
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    LENIENT.decode(standard).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes() {
        assert_eq!(base64_decode("aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("!"), None);
        assert_eq!(base64_decode("-_8"), base64_decode("+/8="));
    }

    #[test]
    fn grpc_names_map_to_codes() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("14"), Some(14));
        assert_eq!(grpc_code("NOPE"), None);
    }
}
