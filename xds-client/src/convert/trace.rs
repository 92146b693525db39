//! The connection manager's `tracing` and the tracers
//! (`envoy.tracers.opentelemetry`, `envoy.tracers.zipkin`, in the block or
//! the bootstrap's `tracing.http`) → `ferry_model::tracing`.
//!
//! What Ferry would record differently from Envoy is refused by name: other
//! tracers, `verbose` span logs, OTLP exporters, resource detectors and
//! samplers, Google gRPC, Zipkin's protobuf and gRPC transports, split
//! spans and timestamped trace ids, operation name formats, switching off
//! context propagation, formatter custom tags, and request id extensions
//! other than Envoy's UUID one with its defaults.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::config::trace::v3 as trace_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use envoy_types::pb::envoy::r#type::tracing::v3 as tag_pb;
use ferry_model as m;
use ferry_model::tracing as mt;

use super::{ConvertError, Ctx, Typed, duration};

const OTEL_TYPE: &str = "envoy.config.trace.v3.OpenTelemetryConfig";
const ZIPKIN_TYPE: &str = "envoy.config.trace.v3.ZipkinConfig";

/// `type.v3.Percent` as Envoy applies it: a fraction of 10 000 (to 0.01 %).
fn percent(p: &Option<envoy_types::pb::envoy::r#type::v3::Percent>) -> m::Fraction {
    let value = p.as_ref().map_or(100.0, |p| p.value).clamp(0.0, 100.0);
    m::Fraction {
        numerator: (value * 100.0) as u32,
        denominator: 10_000,
    }
}

/// The connection manager's `tracing` (`None` when it has none).
/// `start_child_span` is the router's, which `spawn_upstream_span`
/// overrides when set.
pub(super) fn http_connection_manager(
    ctx: &Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
    start_child_span: bool,
) -> Result<Option<Arc<mt::Tracing>>, ConvertError> {
    request_id_extension(ctx, field, h)?;
    let Some(t) = &h.tracing else {
        return Ok(None);
    };
    let field = format!("{field}.tracing");
    if t.verbose {
        return Err(ctx.err(
            format!("{field}.verbose"),
            "verbose span annotations are not supported",
        ));
    }
    for (name, set) in [
        ("operation", !t.operation.is_empty()),
        ("upstream_operation", !t.upstream_operation.is_empty()),
    ] {
        if set {
            return Err(ctx.err(
                format!("{field}.{name}"),
                "operation name formats are not supported (route decorators are)",
            ));
        }
    }
    if t.no_context_propagation {
        return Err(ctx.err(
            format!("{field}.no_context_propagation"),
            "switching off trace context propagation is not supported",
        ));
    }
    let provider = match &t.provider {
        Some(p) => Some(Arc::new(provider(ctx, &format!("{field}.provider"), p)?)),
        None => None,
    };
    let mut custom_tags = Vec::with_capacity(t.custom_tags.len());
    for (i, c) in t.custom_tags.iter().enumerate() {
        custom_tags.push(custom_tag(ctx, &format!("{field}.custom_tags[{i}]"), c)?);
    }
    Ok(Some(Arc::new(mt::Tracing {
        provider,
        client_sampling: percent(&t.client_sampling),
        random_sampling: percent(&t.random_sampling),
        overall_sampling: percent(&t.overall_sampling),
        max_path_tag_length: t
            .max_path_tag_length
            .as_ref()
            .map_or(256, |v| v.value as usize),
        custom_tags,
        upstream_spans: t
            .spawn_upstream_span
            .as_ref()
            .map_or(start_child_span, |v| v.value),
        egress: ctx.outbound,
    })))
}

fn custom_tag(
    ctx: &Ctx<'_>,
    field: &str,
    c: &tag_pb::CustomTag,
) -> Result<mt::CustomTag, ConvertError> {
    use tag_pb::custom_tag::Type;
    if c.tag.is_empty() {
        return Err(ctx.err(format!("{field}.tag"), "a tag name is required"));
    }
    let default = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let value = match &c.r#type {
        Some(Type::Literal(l)) => mt::TagValue::Literal(l.value.clone()),
        // A format string; one without an operator is its own value.
        Some(Type::Value(v)) if !v.contains('%') => mt::TagValue::Literal(v.clone()),
        Some(Type::Value(_)) => {
            return Err(ctx.err(
                format!("{field}.value"),
                "custom tags with format operators are not supported",
            ));
        }
        // Read once, as Envoy reads it when the configuration is loaded.
        Some(Type::Environment(e)) => match std::env::var(&e.name) {
            Ok(v) => mt::TagValue::Literal(v),
            Err(_) => mt::TagValue::Literal(e.default_value.clone()),
        },
        Some(Type::RequestHeader(h)) => mt::TagValue::RequestHeader {
            name: http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).map_err(
                |_| {
                    ctx.err(
                        format!("{field}.request_header.name"),
                        format!("{:?} is not a header name", h.name),
                    )
                },
            )?,
            default: default(&h.default_value),
        },
        Some(Type::Metadata(md)) => {
            use envoy_types::pb::envoy::r#type::metadata::v3::metadata_key::path_segment::Segment;
            use envoy_types::pb::envoy::r#type::metadata::v3::metadata_kind::Kind;
            let kind = md.kind.as_ref().and_then(|k| k.kind.as_ref());
            if !matches!(kind, Some(Kind::Request(_))) {
                return Err(ctx.err(
                    format!("{field}.metadata.kind"),
                    "only request (dynamic) metadata tags are supported",
                ));
            }
            let Some(key) = &md.metadata_key else {
                return Err(ctx.err(
                    format!("{field}.metadata.metadata_key"),
                    "a metadata key is required",
                ));
            };
            let mut path = Vec::with_capacity(key.path.len());
            for (i, p) in key.path.iter().enumerate() {
                match &p.segment {
                    Some(Segment::Key(k)) => path.push(k.clone()),
                    _ => {
                        return Err(ctx.err(
                            format!("{field}.metadata.metadata_key.path[{i}]"),
                            "only key path segments are supported",
                        ));
                    }
                }
            }
            mt::TagValue::RequestMetadata {
                filter: key.key.clone(),
                path,
                default: default(&md.default_value),
            }
        }
        None => return Err(ctx.err(field, "a custom tag needs a value source")),
    };
    Ok(mt::CustomTag {
        tag: c.tag.clone(),
        value,
    })
}

/// `request_id_extension`: Envoy's UUID extension with its defaults (the
/// trace decision packed into the id, sampling by the id) is what Ferry
/// does; other extensions and those switched off are refused.
fn request_id_extension(
    ctx: &Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
) -> Result<(), ConvertError> {
    use envoy_types::pb::envoy::extensions::request_id::uuid::v3::UuidRequestIdConfig;
    use prost::Name;
    let Some(any) = h
        .request_id_extension
        .as_ref()
        .and_then(|e| e.typed_config.as_ref())
    else {
        return Ok(());
    };
    let field = format!("{field}.request_id_extension.typed_config");
    if any.type_url != UuidRequestIdConfig::type_url() {
        return Err(ctx.err(
            field,
            format!(
                "request id extension {:?} is not supported (only envoy.request_id.uuid)",
                any.type_url
            ),
        ));
    }
    let c: UuidRequestIdConfig =
        prost::Message::decode(any.value.as_slice()).map_err(|e| ctx.err(&field, e.to_string()))?;
    for (name, v) in [
        ("pack_trace_reason", &c.pack_trace_reason),
        (
            "use_request_id_for_trace_sampling",
            &c.use_request_id_for_trace_sampling,
        ),
    ] {
        if v.as_ref().is_some_and(|b| !b.value) {
            return Err(ctx.err(
                format!("{field}.{name}"),
                "only the default (true) is supported",
            ));
        }
    }
    Ok(())
}

/// A tracer (`tracing.provider` or the bootstrap's `tracing.http`).
pub fn provider(
    ctx: &Ctx<'_>,
    field: &str,
    p: &trace_pb::tracing::Http,
) -> Result<mt::Provider, ConvertError> {
    let Some(trace_pb::tracing::http::ConfigType::TypedConfig(any)) = &p.config_type else {
        return Err(ctx.err(field, format!("tracer {:?} has no typed_config", p.name)));
    };
    let tf = format!("{field}.typed_config");
    let typed = Typed::from_any(any).map_err(|e| ctx.err(&tf, e))?;
    match typed.type_name() {
        OTEL_TYPE => {
            let c: trace_pb::OpenTelemetryConfig = typed.decode().map_err(|e| ctx.err(&tf, e))?;
            opentelemetry(ctx, &tf, &c).map(mt::Provider::OpenTelemetry)
        }
        ZIPKIN_TYPE => {
            let c: trace_pb::ZipkinConfig = typed.decode().map_err(|e| ctx.err(&tf, e))?;
            zipkin(ctx, &tf, &c).map(mt::Provider::Zipkin)
        }
        t => Err(ctx.err(
            &tf,
            format!(
                "unsupported tracer {:?} ({t}); Ferry reports to envoy.tracers.opentelemetry and envoy.tracers.zipkin",
                p.name
            ),
        )),
    }
}

fn headers(
    ctx: &Ctx<'_>,
    field: &str,
    list: &[core_pb::HeaderValueOption],
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, ConvertError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, h) in list.iter().enumerate() {
        let Some(hv) = &h.header else { continue };
        let name = http::HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes());
        let value = http::HeaderValue::from_str(&hv.value);
        match (name, value) {
            (Ok(n), Ok(v)) => out.push((n, v)),
            _ => {
                return Err(ctx.err(
                    format!("{field}[{i}].header"),
                    format!("invalid header {:?}", hv.key),
                ));
            }
        }
    }
    Ok(out)
}

/// An `HttpService`: (cluster, authority, path, timeout, headers).
type HttpTarget = (
    String,
    String,
    String,
    Duration,
    Vec<(http::HeaderName, http::HeaderValue)>,
);

fn http_service(
    ctx: &Ctx<'_>,
    field: &str,
    s: &core_pb::HttpService,
) -> Result<HttpTarget, ConvertError> {
    let Some(u) = &s.http_uri else {
        return Err(ctx.err(format!("{field}.http_uri"), "an http_uri is required"));
    };
    let cluster = match &u.http_upstream_type {
        Some(core_pb::http_uri::HttpUpstreamType::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => {
            return Err(ctx.err(format!("{field}.http_uri.cluster"), "a cluster is required"));
        }
    };
    // Envoy reads the host and path of a URI without a scheme too
    // (`host/path`, as istiod writes OTLP/HTTP endpoints).
    let text = if u.uri.contains("://") {
        u.uri.clone()
    } else {
        format!("http://{}", u.uri)
    };
    let uri: http::Uri = text.parse().map_err(|_| {
        ctx.err(
            format!("{field}.http_uri.uri"),
            format!("{:?} is not a URI", u.uri),
        )
    })?;
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| cluster.clone());
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let timeout = duration(&u.timeout).unwrap_or(Duration::from_secs(1));
    let headers = headers(
        ctx,
        &format!("{field}.request_headers_to_add"),
        &s.request_headers_to_add,
    )?;
    Ok((cluster, authority, path, timeout, headers))
}

fn opentelemetry(
    ctx: &Ctx<'_>,
    field: &str,
    c: &trace_pb::OpenTelemetryConfig,
) -> Result<mt::OpenTelemetry, ConvertError> {
    if c.exporter.is_some() {
        return Err(ctx.err(
            format!("{field}.exporter"),
            "OTLP exporter extensions are not supported",
        ));
    }
    if let Some(d) = c.resource_detectors.first() {
        return Err(ctx.err(
            format!("{field}.resource_detectors[0]"),
            format!("resource detector {:?} is not supported", d.name),
        ));
    }
    if let Some(s) = &c.sampler {
        return Err(ctx.err(
            format!("{field}.sampler"),
            format!("sampler {:?} is not supported", s.name),
        ));
    }
    let transport = match (&c.grpc_service, &c.http_service) {
        (Some(g), None) => {
            use core_pb::grpc_service::TargetSpecifier;
            let Some(TargetSpecifier::EnvoyGrpc(e)) = &g.target_specifier else {
                return Err(ctx.err(
                    format!("{field}.grpc_service.google_grpc"),
                    "only envoy_grpc is supported",
                ));
            };
            if e.cluster_name.is_empty() {
                return Err(ctx.err(
                    format!("{field}.grpc_service.envoy_grpc.cluster_name"),
                    "a cluster is required",
                ));
            }
            let mut metadata = Vec::new();
            for (i, hv) in g.initial_metadata.iter().enumerate() {
                match (
                    http::HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes()),
                    http::HeaderValue::from_str(&hv.value),
                ) {
                    (Ok(n), Ok(v)) => metadata.push((n, v)),
                    _ => {
                        return Err(ctx.err(
                            format!("{field}.grpc_service.initial_metadata[{i}]"),
                            format!("invalid metadata {:?}", hv.key),
                        ));
                    }
                }
            }
            mt::OtlpTransport::Grpc {
                authority: if e.authority.is_empty() {
                    e.cluster_name.clone()
                } else {
                    e.authority.clone()
                },
                cluster: e.cluster_name.clone(),
                timeout: duration(&g.timeout),
                metadata,
            }
        }
        (None, Some(h)) => {
            let (cluster, authority, path, timeout, headers) =
                http_service(ctx, &format!("{field}.http_service"), h)?;
            mt::OtlpTransport::Http {
                cluster,
                authority,
                path,
                timeout,
                headers,
            }
        }
        (Some(_), Some(_)) => {
            return Err(ctx.err(
                field,
                "grpc_service and http_service are mutually exclusive",
            ));
        }
        (None, None) => {
            return Err(ctx.err(
                field,
                "a grpc_service or http_service is required to export spans",
            ));
        }
    };
    let flag = |v: &Option<envoy_types::pb::google::protobuf::BoolValue>| {
        v.as_ref().is_none_or(|b| b.value)
    };
    Ok(mt::OpenTelemetry {
        transport,
        service_name: if c.service_name.is_empty() {
            "unknown_service:envoy".into()
        } else {
            c.service_name.clone()
        },
        max_cache_size: c.max_cache_size.as_ref().map_or(1024, |v| v.value as usize),
        sdk_attributes: flag(&c.set_telemetry_sdk_resource_attributes),
        service_name_attribute: flag(&c.set_service_name_resource_attribute),
        instrumentation_scope: flag(&c.set_instrumentation_scope),
    })
}

// `split_spans_for_request` is deprecated, and refused when set.
#[allow(deprecated)]
fn zipkin(
    ctx: &Ctx<'_>,
    field: &str,
    c: &trace_pb::ZipkinConfig,
) -> Result<mt::Zipkin, ConvertError> {
    use trace_pb::zipkin_config::{CollectorEndpointVersion as V, TraceContextOption as T};
    match V::try_from(c.collector_endpoint_version) {
        Ok(V::HttpJson) => {}
        _ => {
            return Err(ctx.err(
                format!("{field}.collector_endpoint_version"),
                "only HTTP_JSON (Zipkin v2 JSON) is supported",
            ));
        }
    }
    if c.split_spans_for_request {
        return Err(ctx.err(
            format!("{field}.split_spans_for_request"),
            "split spans are not supported",
        ));
    }
    if c.timestamp_trace_ids {
        return Err(ctx.err(
            format!("{field}.timestamp_trace_ids"),
            "timestamped trace ids are not supported",
        ));
    }
    let w3c = match T::try_from(c.trace_context_option) {
        Ok(T::UseB3) => false,
        Ok(T::UseB3WithW3cPropagation) => true,
        Err(_) => {
            return Err(ctx.err(
                format!("{field}.trace_context_option"),
                format!("unknown value {}", c.trace_context_option),
            ));
        }
    };
    let (cluster, hostname, path, timeout, headers) = match &c.collector_service {
        Some(s) => http_service(ctx, &format!("{field}.collector_service"), s)?,
        None => {
            if c.collector_cluster.is_empty() {
                return Err(ctx.err(
                    format!("{field}.collector_cluster"),
                    "a collector cluster is required",
                ));
            }
            let hostname = if c.collector_hostname.is_empty() {
                c.collector_cluster.clone()
            } else {
                c.collector_hostname.clone()
            };
            (
                c.collector_cluster.clone(),
                hostname,
                if c.collector_endpoint.is_empty() {
                    "/api/v2/spans".into()
                } else {
                    c.collector_endpoint.clone()
                },
                Duration::from_secs(5),
                Vec::new(),
            )
        }
    };
    Ok(mt::Zipkin {
        cluster,
        path,
        hostname,
        timeout,
        headers,
        trace_id_128bit: c.trace_id_128bit,
        shared_span_context: c.shared_span_context.as_ref().is_none_or(|v| v.value),
        w3c,
    })
}

/// The bootstrap's server-wide tracer (`tracing.http`).
pub fn bootstrap_provider(
    t: &trace_pb::Tracing,
    warnings: &mut super::Warnings,
) -> Result<Option<Arc<mt::Provider>>, ConvertError> {
    let ctx = Ctx {
        resource: "bootstrap".into(),
        warnings,
        inbound: false,
        outbound: false,
    };
    match &t.http {
        Some(h) => Ok(Some(Arc::new(provider(&ctx, "tracing.http", h)?))),
        None => Ok(None),
    }
}

/// A route's `decorator`; its `tracing` overrides are refused.
pub(super) fn decorator(
    ctx: &Ctx<'_>,
    field: &str,
    r: &envoy_types::pb::envoy::config::route::v3::Route,
) -> Result<Option<mt::Decorator>, ConvertError> {
    if r.tracing.is_some() {
        return Err(ctx.err(
            format!("{field}.tracing"),
            "per-route tracing overrides are not supported",
        ));
    }
    Ok(r.decorator.as_ref().map(|d| mt::Decorator {
        operation: d.operation.clone(),
        propagate: d.propagate.as_ref().is_none_or(|v| v.value),
    }))
}
