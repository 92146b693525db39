//! Traces and access logs of one proxy as istiod configures them: from the
//! Telemetry resources in scope (the root namespace's, the proxy
//! namespace's, the first of its namespace whose selector picks the
//! workload, later ones overriding earlier ones), from
//! `meshConfig.defaultProviders`, and without either from meshConfig's
//! legacy settings (`accessLogFile`, `enableTracing` with
//! `defaultConfig.tracing`).
//!
//! Client settings apply to outbound listeners and gateways, server
//! settings to the inbound listener. Tracing becomes each connection
//! manager's `tracing` block (a `zipkin` or `opentelemetry` provider with
//! its collector's outbound cluster, sampling, Istio's span tags, custom
//! tags) and the UUID request id extension; access logging becomes the
//! `envoyFileAccessLog` providers' entries on connection managers, TCP
//! proxies and, with the `NR` filter, listeners. A provider istiod would
//! skip (unknown, or its service not in the registry) is skipped with a
//! warning; kinds and fields Ferry's translation does not implement are
//! refused by validation.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::accesslog::v3::AccessLog;
use envoy_types::pb::envoy::config::core::v3::{
    GrpcService, HeaderValue, HeaderValueOption, HttpService, HttpUri, TrafficDirection,
    grpc_service, header_value_option::HeaderAppendAction, http_uri,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, Listener, filter};
use envoy_types::pb::envoy::config::trace::v3::{
    OpenTelemetryConfig, ZipkinConfig, tracing::Http as TracingHttp, tracing::http::ConfigType,
    zipkin_config,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, RequestIdExtension, http_connection_manager::Tracing,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::request_id::uuid::v3::UuidRequestIdConfig;
use envoy_types::pb::envoy::r#type::metadata::v3::{
    MetadataKey, MetadataKind, metadata_key, metadata_kind,
};
use envoy_types::pb::envoy::r#type::tracing::v3::{CustomTag as PbTag, custom_tag};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use prost::{Message, Name};

use super::access_log;
use super::util::{any, duration};
use super::{Mesh, NodeType, Proxy, Scope};
use crate::istio::source::Spec;
use crate::istio::types::mesh::{ExtensionProvider, FileAccessLogProvider, HttpHeader};
use crate::istio::types::telemetry::{CustomTag, Telemetry, WorkloadMode};

/// istiod's built-in file access log provider (`/dev/stdout`).
pub const BUILTIN_ENVOY: &str = "envoy";
/// istiod's built-in metrics provider.
pub const BUILTIN_PROMETHEUS: &str = "prometheus";
/// `PILOT_TRACE_SAMPLING`'s default (percent).
const DEFAULT_SAMPLING: f64 = 1.0;

/// The providers every mesh has unless it defines its own of the name.
pub fn builtin_providers() -> Vec<ExtensionProvider> {
    vec![
        ExtensionProvider {
            name: BUILTIN_ENVOY.into(),
            envoy_file_access_log: Some(FileAccessLogProvider {
                path: "/dev/stdout".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ExtensionProvider {
            name: BUILTIN_PROMETHEUS.into(),
            prometheus: Some(serde_json::json!({})),
            ..Default::default()
        },
    ]
}

/// What a provider name is used for, for the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Tracing,
    AccessLogging,
    Metrics,
}

/// Why a provider cannot serve where it is named.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProviderUseError {
    #[error("extension provider {0:?} is not defined in meshConfig.extensionProviders")]
    Unknown(String),
    #[error("extension provider {name:?} ({kind}) cannot be used for {usage}: {why}")]
    Unsupported {
        name: String,
        kind: &'static str,
        usage: &'static str,
        why: &'static str,
    },
}

/// The provider of that name (as istiod, ignoring case).
pub fn provider<'a>(
    mesh_providers: &'a [ExtensionProvider],
    name: &str,
) -> Option<&'a ExtensionProvider> {
    mesh_providers
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(name))
}

/// Checks that a provider exists and that Ferry's translation implements
/// its kind for this use.
pub fn check_provider(
    mesh_providers: &[ExtensionProvider],
    name: &str,
    usage: Usage,
) -> Result<(), ProviderUseError> {
    let p = provider(mesh_providers, name).ok_or_else(|| ProviderUseError::Unknown(name.into()))?;
    let unsupported = |usage: &'static str, why: &'static str| ProviderUseError::Unsupported {
        name: name.into(),
        kind: p.kind(),
        usage,
        why,
    };
    match usage {
        Usage::Tracing => match (&p.zipkin, &p.opentelemetry) {
            (Some(_), _) => Ok(()),
            (_, Some(o)) if o.resource_detectors.is_some() => Err(unsupported(
                "tracing",
                "resource detectors are not supported",
            )),
            (_, Some(o)) if o.dynatrace_sampler.is_some() => Err(unsupported(
                "tracing",
                "the Dynatrace sampler is not supported",
            )),
            (_, Some(_)) => Ok(()),
            _ => Err(unsupported(
                "tracing",
                "only zipkin and opentelemetry tracers are supported",
            )),
        },
        Usage::AccessLogging if p.envoy_file_access_log.is_some() => Ok(()),
        Usage::AccessLogging => Err(unsupported(
            "access logging",
            "only envoyFileAccessLog is supported",
        )),
        Usage::Metrics if p.prometheus.is_some() => Ok(()),
        Usage::Metrics => Err(unsupported(
            "metrics",
            "only Istio's standard metrics (prometheus) are supported",
        )),
    }
}

/// The mesh configuration's own telemetry settings that Ferry's
/// translation cannot honour: default providers of a kind it does not
/// implement, formatter custom tags with operators.
pub fn check_mesh(
    providers: &[ExtensionProvider],
    defaults: &crate::istio::types::mesh::DefaultProviders,
    proxy_tracing: &crate::istio::types::mesh::ProxyTracing,
) -> Vec<String> {
    let mut out = Vec::new();
    for (field, names, usage) in [
        (
            "defaultProviders.tracing",
            &defaults.tracing,
            Usage::Tracing,
        ),
        (
            "defaultProviders.accessLogging",
            &defaults.access_logging,
            Usage::AccessLogging,
        ),
        (
            "defaultProviders.metrics",
            &defaults.metrics,
            Usage::Metrics,
        ),
    ] {
        for (i, n) in names.iter().enumerate() {
            if let Err(e) = check_provider(providers, n, usage) {
                out.push(format!("{field}[{i}]: {e}"));
            }
        }
    }
    for (name, tag) in &proxy_tracing.custom_tags {
        if tag
            .formatter
            .as_ref()
            .is_some_and(|f| f.value.contains('%'))
        {
            out.push(format!(
                "defaultConfig.tracing.customTags.{name}.formatter: custom tags with format operators are not supported"
            ));
        }
    }
    out
}

/// The Telemetry resources that apply to a proxy, least specific first.
fn applicable<'a>(mesh: &'a Mesh, proxy: &Proxy) -> Vec<&'a Telemetry> {
    let of_ns = |ns: &str| -> Vec<&'a Telemetry> {
        mesh.telemetries
            .iter()
            .filter(|r| r.meta.namespace == ns)
            .filter_map(|r| match &r.spec {
                Spec::Telemetry(t) => Some(t),
                _ => None,
            })
            .collect()
    };
    let selects = |t: &Telemetry| {
        t.selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty())
    };
    let wide = |ns: &str| of_ns(ns).into_iter().find(|t| !selects(t));
    let root = &mesh.options.root_namespace;
    let mut out = Vec::new();
    out.extend(wide(root));
    if proxy.namespace != *root {
        out.extend(wide(&proxy.namespace));
    }
    out.extend(of_ns(&proxy.namespace).into_iter().find(|t| {
        selects(t)
            && t.selector
                .as_ref()
                .is_some_and(|s| super::registry::selects(&s.match_labels, &proxy.labels))
    }));
    out
}

// ------------------------------------------------------------------ tracing

/// One side's merged tracing settings (istiod's `TracingSpec`).
#[derive(Clone, Debug)]
struct TraceSpec<'a> {
    provider: Option<&'a ExtensionProvider>,
    disabled: bool,
    sampling: Option<f64>,
    custom_tags: Option<&'a BTreeMap<String, CustomTag>>,
    istio_tags: bool,
}

/// The client and server specs, or `None` when neither a Telemetry nor a
/// default provider configures tracing (meshConfig's legacy settings then).
fn tracing_specs<'a>(mesh: &'a Mesh, tels: &[&'a Telemetry]) -> Option<[TraceSpec<'a>; 2]> {
    let providers = &mesh.options.extension_providers;
    let defaults = &mesh.options.default_providers.tracing;
    let entries: Vec<_> = tels.iter().flat_map(|t| &t.tracing).collect();
    if entries.is_empty() && defaults.is_empty() {
        return None;
    }
    // Only the first provider counts, as in istiod.
    let base = TraceSpec {
        provider: defaults.first().and_then(|n| provider(providers, n)),
        disabled: false,
        sampling: None,
        custom_tags: None,
        istio_tags: true,
    };
    let mut specs = [base.clone(), base];
    for m in entries {
        let mode = m
            .match_
            .as_ref()
            .map_or(WorkloadMode::ClientAndServer, |s| s.mode);
        for (spec, side) in specs
            .iter_mut()
            .zip([WorkloadMode::Client, WorkloadMode::Server])
        {
            if !mode.covers(side) {
                continue;
            }
            if let Some(first) = m.providers.first() {
                spec.provider = provider(providers, &first.name);
            }
            if let Some(d) = m.disable_span_reporting {
                spec.disabled = d;
            }
            if let Some(t) = &m.custom_tags {
                spec.custom_tags = Some(t);
            }
            if let Some(p) = m.random_sampling_percentage {
                spec.sampling = Some(p);
            }
            if let Some(e) = m.enable_istio_tags {
                spec.istio_tags = e;
            }
        }
    }
    for s in &mut specs {
        if s.provider.is_none() {
            s.disabled = true;
        }
    }
    Some(specs)
}

/// `defaultConfig.tracing.sampling`, or `PILOT_TRACE_SAMPLING`'s default.
fn proxy_sampling(mesh: &Mesh) -> f64 {
    let s = mesh.options.proxy_tracing.sampling;
    if s == 0.0 {
        DEFAULT_SAMPLING
    } else if s > 100.0 {
        1.0
    } else {
        s
    }
}

fn percent(value: f64) -> Option<Percent> {
    Some(Percent { value })
}

fn literal_tag(tag: &str, value: &str) -> PbTag {
    PbTag {
        tag: tag.into(),
        r#type: Some(custom_tag::Type::Literal(custom_tag::Literal {
            value: value.into(),
        })),
    }
}

/// The tags istiod puts on every span of a proxy (`buildServiceTags`).
fn service_tags(proxy: &Proxy) -> Vec<PbTag> {
    let or = |v: &str, d: &str| {
        if v.is_empty() {
            d.to_string()
        } else {
            v.to_string()
        }
    };
    let label = |k: &str| proxy.labels.get(k).map(String::as_str).unwrap_or_default();
    vec![
        literal_tag(
            "istio.canonical_revision",
            &or(label("service.istio.io/canonical-revision"), "latest"),
        ),
        literal_tag(
            "istio.canonical_service",
            &or(label("service.istio.io/canonical-name"), "unknown"),
        ),
        literal_tag("istio.mesh_id", &or(&proxy.mesh_id, "unknown")),
        literal_tag("istio.namespace", &or(&proxy.namespace, "default")),
        literal_tag("istio.cluster_id", &or(&proxy.cluster_id, "unknown")),
    ]
}

/// The dry-run AuthorizationPolicy tags: the RBAC filter's shadow verdict
/// from the request's metadata.
fn policy_tags() -> Vec<PbTag> {
    let tag = |name: &str, key: String| PbTag {
        tag: name.into(),
        r#type: Some(custom_tag::Type::Metadata(custom_tag::Metadata {
            kind: Some(MetadataKind {
                kind: Some(metadata_kind::Kind::Request(metadata_kind::Request {})),
            }),
            metadata_key: Some(MetadataKey {
                key: "envoy.filters.http.rbac".into(),
                path: vec![metadata_key::PathSegment {
                    segment: Some(metadata_key::path_segment::Segment::Key(key)),
                }],
            }),
            default_value: String::new(),
        })),
    };
    let mut out = Vec::new();
    for (side, prefix) in [
        ("allow", "istio_dry_run_allow_"),
        ("deny", "istio_dry_run_deny_"),
    ] {
        out.push(tag(
            &format!("istio.authorization.dry_run.{side}_policy.name"),
            format!("{prefix}shadow_effective_policy_id"),
        ));
        out.push(tag(
            &format!("istio.authorization.dry_run.{side}_policy.result"),
            format!("{prefix}shadow_engine_result"),
        ));
    }
    out
}

fn custom_tags(tags: &BTreeMap<String, CustomTag>) -> Vec<PbTag> {
    tags.iter()
        .filter_map(|(name, t)| {
            let ty = if let Some(l) = &t.literal {
                custom_tag::Type::Literal(custom_tag::Literal {
                    value: l.value.clone(),
                })
            } else if let Some(e) = &t.environment {
                custom_tag::Type::Environment(custom_tag::Environment {
                    name: e.name.clone(),
                    default_value: e.default_value.clone(),
                })
            } else if let Some(h) = &t.header {
                custom_tag::Type::RequestHeader(custom_tag::Header {
                    name: h.name.clone(),
                    default_value: h.default_value.clone(),
                })
            } else if let Some(f) = &t.formatter {
                custom_tag::Type::Value(f.value.clone())
            } else {
                return None;
            };
            Some(PbTag {
                tag: name.clone(),
                r#type: Some(ty),
            })
        })
        .collect()
}

/// A collector header's value (`envName`: istiod's environment).
fn header_value(h: &HttpHeader) -> String {
    match (&h.value, &h.env_name) {
        (Some(v), _) => v.clone(),
        (None, Some(env)) => std::env::var(env).unwrap_or_default(),
        (None, None) => String::new(),
    }
}

fn headers_to_add(headers: &[HttpHeader]) -> Vec<HeaderValueOption> {
    headers
        .iter()
        .map(|h| HeaderValueOption {
            header: Some(HeaderValue {
                key: h.name.clone(),
                value: header_value(h),
                ..Default::default()
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        })
        .collect()
}

/// The provider block of a tracer, and its `maxTagLength`.
fn tracer(mesh: &Mesh, proxy: &Proxy, p: &ExtensionProvider) -> Result<(TracingHttp, u32), String> {
    let target = |service: &str, port: u32| {
        super::ext_authz::target(mesh, &p.name, service, port).map_err(|e| e.to_string())
    };
    if let Some(z) = &p.zipkin {
        let (host, cluster) = target(&z.service, z.port)?;
        let path = if z.path.is_empty() {
            "/api/v2/spans"
        } else {
            &z.path
        };
        let context = match z.trace_context_option.as_str() {
            "USE_B3_WITH_W3C_PROPAGATION" => {
                zipkin_config::TraceContextOption::UseB3WithW3cPropagation
            }
            _ => zipkin_config::TraceContextOption::UseB3,
        };
        let cfg = ZipkinConfig {
            collector_endpoint_version: zipkin_config::CollectorEndpointVersion::HttpJson as i32,
            trace_id_128bit: !z.enable_64bit_trace_id,
            shared_span_context: Some(BoolValue { value: false }),
            collector_service: Some(HttpService {
                http_uri: Some(HttpUri {
                    uri: format!("http://{host}{path}"),
                    http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(cluster)),
                    timeout: Some(duration(
                        z.timeout.map_or(std::time::Duration::from_secs(5), |d| d.0),
                    )),
                }),
                request_headers_to_add: headers_to_add(&z.headers),
                ..Default::default()
            }),
            trace_context_option: context as i32,
            ..Default::default()
        };
        return Ok((
            TracingHttp {
                name: "envoy.tracers.zipkin".into(),
                config_type: Some(ConfigType::TypedConfig(any(&cfg))),
            },
            z.max_tag_length,
        ));
    }
    if let Some(o) = &p.opentelemetry {
        let (host, cluster) = target(&o.service, o.port)?;
        let mut cfg = OpenTelemetryConfig {
            service_name: proxy.cluster.clone(),
            ..Default::default()
        };
        match &o.http {
            Some(h) => {
                let path = h.path.trim_start_matches('/');
                cfg.http_service = Some(HttpService {
                    http_uri: Some(HttpUri {
                        uri: if path.is_empty() {
                            host
                        } else {
                            format!("{host}/{path}")
                        },
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(cluster)),
                        timeout: h.timeout.map(|d| duration(d.0)),
                    }),
                    request_headers_to_add: headers_to_add(&h.headers),
                    ..Default::default()
                });
            }
            None => {
                let g = o.grpc.clone().unwrap_or_default();
                cfg.grpc_service = Some(GrpcService {
                    target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                        grpc_service::EnvoyGrpc {
                            cluster_name: cluster,
                            authority: host,
                            ..Default::default()
                        },
                    )),
                    timeout: g.timeout.map(|d| duration(d.0)),
                    initial_metadata: g
                        .initial_metadata
                        .iter()
                        .map(|h| HeaderValue {
                            key: h.name.clone(),
                            value: header_value(h),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                });
            }
        }
        return Ok((
            TracingHttp {
                name: "envoy.tracers.opentelemetry".into(),
                config_type: Some(ConfigType::TypedConfig(any(&cfg))),
            },
            o.max_tag_length,
        ));
    }
    Err(format!(
        "extension provider {:?} ({}) is not a tracer Ferry implements",
        p.name,
        p.kind()
    ))
}

/// A connection manager's `tracing` (istiod's
/// `configureTracingFromTelemetry`) and whether the UUID request id
/// extension goes with it; `None`: no tracing.
fn hcm_tracing(
    mesh: &Mesh,
    proxy: &Proxy,
    spec: Option<&TraceSpec<'_>>,
) -> Option<(Tracing, bool)> {
    let pt = &mesh.options.proxy_tracing;
    let mut tags;
    let mut t = Tracing::default();
    let with_extension = match spec {
        None => {
            if !mesh.options.enable_tracing {
                return None;
            }
            tags = if pt.enable_istio_tags.unwrap_or(true) {
                [service_tags(proxy), policy_tags()].concat()
            } else {
                Vec::new()
            };
            tags.extend(custom_tags(&pt.custom_tags));
            t.random_sampling = percent(proxy_sampling(mesh));
            false
        }
        Some(spec) => {
            if spec.disabled {
                return None;
            }
            let p = spec.provider?;
            let (http, max_tag) = match tracer(mesh, proxy, p) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(proxy.id = %proxy.id, error = %e, "tracing provider skipped");
                    return None;
                }
            };
            t.provider = Some(http);
            if proxy.node_type == NodeType::Router {
                // PILOT_SPAWN_UPSTREAM_SPAN_FOR_GATEWAY's default.
                t.spawn_upstream_span = Some(BoolValue { value: true });
            }
            if max_tag != 0 {
                t.max_path_tag_length = Some(UInt32Value { value: max_tag });
            }
            t.random_sampling = percent(spec.sampling.unwrap_or_else(|| proxy_sampling(mesh)));
            tags = if spec.istio_tags {
                [service_tags(proxy), policy_tags()].concat()
            } else {
                Vec::new()
            };
            match spec.custom_tags.filter(|t| !t.is_empty()) {
                Some(own) => tags.extend(custom_tags(own)),
                None => tags.extend(custom_tags(&pt.custom_tags)),
            }
            true
        }
    };
    t.client_sampling = percent(100.0);
    t.overall_sampling = percent(100.0);
    tags.sort_by(|a, b| a.tag.cmp(&b.tag));
    t.custom_tags = tags;
    if t.max_path_tag_length.is_none() && pt.max_path_tag_length != 0 {
        t.max_path_tag_length = Some(UInt32Value {
            value: pt.max_path_tag_length,
        });
    }
    Some((t, with_extension))
}

fn uuid_extension() -> RequestIdExtension {
    RequestIdExtension {
        typed_config: Some(any(&UuidRequestIdConfig {
            use_request_id_for_trace_sampling: Some(BoolValue { value: true }),
            ..Default::default()
        })),
    }
}

// ------------------------------------------------------------ access logs

/// The access log entries of one side, or `None` when neither a Telemetry
/// nor a default provider configures access logging (meshConfig's
/// `accessLogFile` then). An empty list switches access logs off.
fn access_logs(mesh: &Mesh, tels: &[&Telemetry], mode: WorkloadMode) -> Option<Vec<AccessLog>> {
    let defaults = &mesh.options.default_providers.access_logging;
    let levels: Vec<_> = tels
        .iter()
        .filter(|t| !t.access_logging.is_empty())
        .collect();
    if levels.is_empty() && defaults.is_empty() {
        return None;
    }
    // istiod's `mergeLogs`: the most specific level naming providers says
    // which are in scope; each entry then enables or disables them.
    let mut enabled: BTreeMap<String, ()> = BTreeMap::new();
    if levels.is_empty() {
        enabled.extend(defaults.iter().map(|d| (d.clone(), ())));
    } else {
        let mut in_scope: Vec<String> = defaults.clone();
        for l in &levels {
            let names: Vec<String> = l
                .access_logging
                .iter()
                .flat_map(|a| a.providers.iter().map(|p| p.name.clone()))
                .collect();
            if !names.is_empty() {
                in_scope = names;
            }
        }
        let mut parent: Vec<String> = defaults.clone();
        for l in &levels {
            for a in &l.access_logging {
                let mut names: Vec<String> = a.providers.iter().map(|p| p.name.clone()).collect();
                if names.is_empty() {
                    names.clone_from(&parent);
                }
                parent.clone_from(&names);
                for name in names {
                    if !in_scope.contains(&name)
                        || !a.match_.as_ref().is_none_or(|m| m.mode.covers(mode))
                    {
                        continue;
                    }
                    if a.disabled == Some(true) {
                        enabled.remove(&name);
                    } else {
                        enabled.insert(name, ());
                    }
                }
            }
        }
    }
    let providers = &mesh.options.extension_providers;
    Some(
        enabled
            .keys()
            .filter_map(|name| {
                let p = provider(providers, name);
                match p.and_then(|p| p.envoy_file_access_log.as_ref().map(|f| (p, f))) {
                    Some((p, f)) => Some(access_log::from_provider(
                        &p.name,
                        f,
                        &mesh.options.access_log,
                    )),
                    None => {
                        tracing::warn!(provider = %name, "access log provider skipped: not an envoyFileAccessLog provider");
                        None
                    }
                }
            })
            .collect(),
    )
}

/// What one side of a proxy gets: access log entries (or meshConfig's)
/// and the tracing block.
struct Side {
    logs: Vec<AccessLog>,
    listener_logs: Vec<AccessLog>,
    tracing: Option<(Tracing, bool)>,
}

fn side(
    mesh: &Mesh,
    proxy: &Proxy,
    tels: &[&Telemetry],
    specs: Option<&[TraceSpec<'_>; 2]>,
    mode: WorkloadMode,
) -> Side {
    let mesh_log = &mesh.options.access_log;
    let logs = match access_logs(mesh, tels, mode) {
        Some(list) => list,
        None if mesh_log.file.is_empty() => Vec::new(),
        None => vec![mesh_log.file_access_log()],
    };
    let listener_logs = if mesh_log.disable_listener_log {
        Vec::new()
    } else {
        logs.iter()
            .cloned()
            .map(|mut l| {
                l.filter = Some(access_log::listener_filter());
                l
            })
            .collect()
    };
    let spec = specs.map(|s| match mode {
        WorkloadMode::Server => &s[1],
        _ => &s[0],
    });
    Side {
        logs,
        listener_logs,
        tracing: hcm_tracing(mesh, proxy, spec),
    }
}

/// Adds the proxy's access logs and tracing to its listeners.
pub(super) fn apply(scope: &Scope<'_>, listeners: &mut [Listener]) {
    let (mesh, proxy) = (scope.mesh, scope.proxy);
    let tels = applicable(mesh, proxy);
    let specs = tracing_specs(mesh, &tels);
    let client = side(mesh, proxy, &tels, specs.as_ref(), WorkloadMode::Client);
    let server = side(mesh, proxy, &tels, specs.as_ref(), WorkloadMode::Server);
    for l in listeners {
        let inbound = proxy.node_type == NodeType::Sidecar
            && l.traffic_direction == TrafficDirection::Inbound as i32;
        let side = if inbound { &server } else { &client };
        l.access_log.extend(side.listener_logs.iter().cloned());
        let chains = l
            .filter_chains
            .iter_mut()
            .chain(l.default_filter_chain.iter_mut());
        for chain in chains {
            for f in &mut chain.filters {
                edit_filter(f, side);
            }
        }
    }
}

fn edit_filter(f: &mut Filter, side: &Side) {
    let Some(filter::ConfigType::TypedConfig(typed)) = &mut f.config_type else {
        return;
    };
    if typed.type_url == HttpConnectionManager::type_url() {
        if side.logs.is_empty() && side.tracing.is_none() {
            return;
        }
        if let Ok(mut hcm) = HttpConnectionManager::decode(typed.value.as_slice()) {
            hcm.access_log.extend(side.logs.iter().cloned());
            if let Some((t, extension)) = &side.tracing {
                hcm.tracing = Some(t.clone());
                if *extension {
                    hcm.request_id_extension = Some(uuid_extension());
                }
            }
            *typed = any(&hcm);
        }
    } else if typed.type_url == TcpProxy::type_url()
        && !side.logs.is_empty()
        && let Ok(mut tcp) = TcpProxy::decode(typed.value.as_slice())
    {
        tcp.access_log.extend(side.logs.iter().cloned());
        *typed = any(&tcp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_providers_serve_their_use() {
        let b = builtin_providers();
        assert_eq!(check_provider(&b, "envoy", Usage::AccessLogging), Ok(()));
        assert_eq!(check_provider(&b, "Prometheus", Usage::Metrics), Ok(()));
        assert!(matches!(
            check_provider(&b, "envoy", Usage::Tracing),
            Err(ProviderUseError::Unsupported { .. })
        ));
        assert_eq!(
            check_provider(&b, "zipkin", Usage::Tracing),
            Err(ProviderUseError::Unknown("zipkin".into()))
        );
    }
}
