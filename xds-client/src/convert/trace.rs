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

use super::coverage::{Coverage, fields, path};
use super::{ConvertError, Ctx, Typed, duration};

fields!(pub(super) static TRACING = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing" {
    "client_sampling": applied,
    "random_sampling": applied,
    "overall_sampling": applied,
    "verbose": refused "verbose span annotations are not supported",
    "max_path_tag_length": applied,
    "custom_tags": applied,
    "provider": applied,
    "spawn_upstream_span": applied,
    "operation": refused "operation name formats are not supported (route decorators are)",
    "upstream_operation": refused "operation name formats are not supported (route decorators are)",
    "no_context_propagation": refused "switching off trace context propagation is not supported",
});

fields!(pub(super) static BOOTSTRAP_TRACING = "envoy.config.trace.v3.Tracing" {
    "http": applied "the tracer of connection managers without their own provider",
});

fields!(pub(super) static TRACING_HTTP = "envoy.config.trace.v3.Tracing.Http" {
    "name": applied,
    "typed_config": applied "envoy.tracers.opentelemetry and envoy.tracers.zipkin; other tracers are refused",
});

fields!(pub(super) static OPENTELEMETRY = "envoy.config.trace.v3.OpenTelemetryConfig" {
    "grpc_service": applied "envoy_grpc only; google_grpc is refused",
    "http_service": applied,
    "exporter": refused "OTLP exporter extensions are not supported",
    "service_name": applied,
    "resource_detectors": refused "resource detectors are not supported",
    "sampler": refused "samplers are not supported",
    "max_cache_size": applied,
    "set_telemetry_sdk_resource_attributes": applied,
    "set_service_name_resource_attribute": applied,
    "set_instrumentation_scope": applied,
});

fields!(pub(super) static ZIPKIN = "envoy.config.trace.v3.ZipkinConfig" {
    "collector_cluster": applied,
    "collector_endpoint": applied,
    "trace_id_128bit": applied,
    "shared_span_context": applied,
    "collector_endpoint_version": applied "HTTP_JSON (Zipkin v2 JSON) only; the others are refused",
    "collector_hostname": applied,
    "split_spans_for_request": refused "split spans are not supported",
    "trace_context_option": applied,
    "collector_service": applied,
    "timestamp_trace_ids": refused "timestamped trace ids are not supported",
});

fields!(pub(super) static CUSTOM_TAG = "envoy.type.tracing.v3.CustomTag" {
    "tag": applied "required",
    "literal": applied,
    "environment": applied "read once, when the configuration is loaded",
    "request_header": applied,
    "metadata": applied,
    "value": applied "a value without format operators; one with operators is refused",
});

fields!(pub(super) static CUSTOM_TAG_LITERAL = "envoy.type.tracing.v3.CustomTag.Literal" {
    "value": applied,
});

fields!(pub(super) static CUSTOM_TAG_ENVIRONMENT = "envoy.type.tracing.v3.CustomTag.Environment" {
    "name": applied,
    "default_value": applied,
});

fields!(pub(super) static CUSTOM_TAG_HEADER = "envoy.type.tracing.v3.CustomTag.Header" {
    "name": applied "a header name; others are refused",
    "default_value": applied,
});

fields!(pub(super) static CUSTOM_TAG_METADATA = "envoy.type.tracing.v3.CustomTag.Metadata" {
    "kind": applied "request (dynamic) metadata only; other kinds are refused",
    "metadata_key": applied "required; key path segments only",
    "default_value": applied,
});

fields!(pub(super) static METADATA_KIND = "envoy.type.metadata.v3.MetadataKind" ("custom tag") {
    "request": applied,
    "route": refused "only request (dynamic) metadata tags are supported",
    "cluster": refused "only request (dynamic) metadata tags are supported",
    "host": refused "only request (dynamic) metadata tags are supported",
});

fields!(pub(super) static METADATA_KEY = "envoy.type.metadata.v3.MetadataKey" ("custom tag") {
    "key": applied "the filter namespace",
    "path": applied "key segments; other segments are refused",
});

fields!(pub(super) static GRPC_SERVICE = "envoy.config.core.v3.GrpcService" ("span export") {
    "envoy_grpc": applied,
    "google_grpc": refused "only envoy_grpc is supported",
    "timeout": applied,
    "initial_metadata": applied,
    "retry_policy": refused "retries of span exports are not supported",
});

fields!(pub(super) static ENVOY_GRPC = "envoy.config.core.v3.GrpcService.EnvoyGrpc" ("span export") {
    "cluster_name": applied "required",
    "authority": applied,
    "retry_policy": refused "retries of span exports are not supported",
    "max_receive_message_length": warned "the collector's replies are read whole",
    "skip_envoy_headers": inert "the exporter's calls carry no x-envoy-* headers either way; the spans are the same",
});

fields!(pub(super) static HTTP_SERVICE = "envoy.config.core.v3.HttpService" ("span export") {
    "http_uri": applied "required",
    "request_headers_to_add": applied,
    "formatters": refused "formatter extensions are not supported",
});

fields!(pub(super) static HTTP_URI = "envoy.config.core.v3.HttpUri" ("span export") {
    "uri": applied "host and path; a URI without a scheme is read as http://",
    "cluster": applied "required",
    "timeout": applied "1 s when unset",
});

fields!(pub(super) static REQUEST_ID_EXTENSION = "envoy.extensions.filters.network.http_connection_manager.v3.RequestIDExtension" {
    "typed_config": applied "envoy.request_id.uuid only; other extensions are refused",
});

fields!(pub(super) static UUID_REQUEST_ID = "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig" {
    "pack_trace_reason": refused "only the default (true) is supported",
    "use_request_id_for_trace_sampling": refused "only the default (true) is supported",
});

/// The refusal of the first element of a repeated extension field,
/// naming the extension: `{at}.{field}[0]`.
fn refused_first(ctx: &Ctx<'_>, cov: &Coverage, at: &str, field: &str, name: &str) -> ConvertError {
    let why = cov.field(field).map_or("not supported", |f| f.note);
    ctx.err(
        format!("{}[0]", path(at, field)),
        format!("{why}: {name:?}"),
    )
}

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
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
    start_child_span: bool,
) -> Result<Option<Arc<mt::Tracing>>, ConvertError> {
    request_id_extension(ctx, field, h)?;
    let Some(t) = &h.tracing else {
        return Ok(None);
    };
    let cov = &TRACING;
    let field = path(field, "tracing");
    let hcm_pb::http_connection_manager::Tracing {
        client_sampling,
        random_sampling,
        overall_sampling,
        verbose,
        max_path_tag_length,
        custom_tags,
        provider: tracer,
        spawn_upstream_span,
        operation,
        upstream_operation,
        no_context_propagation,
    } = t;
    ctx.refuse(cov, &field, "verbose", *verbose)?;
    ctx.refuse(cov, &field, "operation", !operation.is_empty())?;
    ctx.refuse(
        cov,
        &field,
        "upstream_operation",
        !upstream_operation.is_empty(),
    )?;
    ctx.refuse(
        cov,
        &field,
        "no_context_propagation",
        *no_context_propagation,
    )?;
    let provider = match tracer {
        Some(p) => Some(Arc::new(provider(ctx, &path(&field, "provider"), p)?)),
        None => None,
    };
    let mut tags = Vec::with_capacity(custom_tags.len());
    for (i, c) in custom_tags.iter().enumerate() {
        tags.push(custom_tag(ctx, &format!("{field}.custom_tags[{i}]"), c)?);
    }
    Ok(Some(Arc::new(mt::Tracing {
        provider,
        client_sampling: percent(client_sampling),
        random_sampling: percent(random_sampling),
        overall_sampling: percent(overall_sampling),
        max_path_tag_length: max_path_tag_length
            .as_ref()
            .map_or(256, |v| v.value as usize),
        custom_tags: tags,
        upstream_spans: spawn_upstream_span
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
    use tag_pb::custom_tag::{Environment, Header, Literal, Metadata, Type};
    let tag_pb::CustomTag { tag, r#type } = c;
    if tag.is_empty() {
        return Err(ctx.err(path(field, "tag"), "a tag name is required"));
    }
    let default = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let value = match r#type {
        Some(Type::Literal(Literal { value })) => mt::TagValue::Literal(value.clone()),
        // A format string; one without an operator is its own value.
        Some(Type::Value(v)) if !v.contains('%') => mt::TagValue::Literal(v.clone()),
        Some(Type::Value(_)) => {
            return Err(ctx.err(
                path(field, "value"),
                "custom tags with format operators are not supported",
            ));
        }
        // Read once, as Envoy reads it when the configuration is loaded.
        Some(Type::Environment(Environment {
            name,
            default_value,
        })) => match std::env::var(name) {
            Ok(v) => mt::TagValue::Literal(v),
            Err(_) => mt::TagValue::Literal(default_value.clone()),
        },
        Some(Type::RequestHeader(Header {
            name,
            default_value,
        })) => mt::TagValue::RequestHeader {
            name: http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(
                |_| {
                    ctx.err(
                        format!("{field}.request_header.name"),
                        format!("{name:?} is not a header name"),
                    )
                },
            )?,
            default: default(default_value),
        },
        Some(Type::Metadata(Metadata {
            kind,
            metadata_key,
            default_value,
        })) => {
            use envoy_types::pb::envoy::r#type::metadata::v3::metadata_key::path_segment::Segment;
            use envoy_types::pb::envoy::r#type::metadata::v3::metadata_kind::Kind;
            let at = format!("{field}.metadata.kind");
            match kind.as_ref().and_then(|k| k.kind.as_ref()) {
                Some(Kind::Request(_)) => {}
                Some(Kind::Route(_)) => return Err(ctx.refused(&METADATA_KIND, &at, "route")),
                Some(Kind::Cluster(_)) => {
                    return Err(ctx.refused(&METADATA_KIND, &at, "cluster"));
                }
                Some(Kind::Host(_)) => return Err(ctx.refused(&METADATA_KIND, &at, "host")),
                None => {
                    return Err(ctx.err(at, "a metadata kind (request) is required"));
                }
            }
            let Some(envoy_types::pb::envoy::r#type::metadata::v3::MetadataKey { key, path }) =
                metadata_key
            else {
                return Err(ctx.err(
                    format!("{field}.metadata.metadata_key"),
                    "a metadata key is required",
                ));
            };
            let mut segments = Vec::with_capacity(path.len());
            for (i, p) in path.iter().enumerate() {
                match &p.segment {
                    Some(Segment::Key(k)) => segments.push(k.clone()),
                    _ => {
                        return Err(ctx.err(
                            format!("{field}.metadata.metadata_key.path[{i}]"),
                            "only key path segments are supported",
                        ));
                    }
                }
            }
            mt::TagValue::RequestMetadata {
                filter: key.clone(),
                path: segments,
                default: default(default_value),
            }
        }
        None => return Err(ctx.err(field, "a custom tag needs a value source")),
    };
    Ok(mt::CustomTag {
        tag: tag.clone(),
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
    let Some(hcm_pb::RequestIdExtension { typed_config }) = &h.request_id_extension else {
        return Ok(());
    };
    let Some(any) = typed_config else {
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
    let UuidRequestIdConfig {
        pack_trace_reason,
        use_request_id_for_trace_sampling,
    } = prost::Message::decode(any.value.as_slice()).map_err(|e| ctx.err(&field, e.to_string()))?;
    let cov = &UUID_REQUEST_ID;
    let off = |v: &Option<envoy_types::pb::google::protobuf::BoolValue>| {
        v.as_ref().is_some_and(|b| !b.value)
    };
    ctx.refuse(cov, &field, "pack_trace_reason", off(&pack_trace_reason))?;
    ctx.refuse(
        cov,
        &field,
        "use_request_id_for_trace_sampling",
        off(&use_request_id_for_trace_sampling),
    )?;
    Ok(())
}

/// A tracer (`tracing.provider` or the bootstrap's `tracing.http`).
pub fn provider(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &trace_pb::tracing::Http,
) -> Result<mt::Provider, ConvertError> {
    let trace_pb::tracing::Http { name, config_type } = p;
    let Some(trace_pb::tracing::http::ConfigType::TypedConfig(any)) = config_type else {
        return Err(ctx.err(field, format!("tracer {name:?} has no typed_config")));
    };
    let tf = path(field, "typed_config");
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
                "unsupported tracer {name:?} ({t}); Ferry reports to envoy.tracers.opentelemetry and envoy.tracers.zipkin"
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
    let core_pb::HttpService {
        http_uri,
        request_headers_to_add,
        formatters,
    } = s;
    if let Some(f) = formatters.first() {
        return Err(refused_first(
            ctx,
            &HTTP_SERVICE,
            field,
            "formatters",
            &f.name,
        ));
    }
    let Some(core_pb::HttpUri {
        uri,
        timeout,
        http_upstream_type,
    }) = http_uri
    else {
        return Err(ctx.err(format!("{field}.http_uri"), "an http_uri is required"));
    };
    let cluster = match http_upstream_type {
        Some(core_pb::http_uri::HttpUpstreamType::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => {
            return Err(ctx.err(format!("{field}.http_uri.cluster"), "a cluster is required"));
        }
    };
    // Envoy reads the host and path of a URI without a scheme too
    // (`host/path`, as istiod writes OTLP/HTTP endpoints).
    let text = if uri.contains("://") {
        uri.clone()
    } else {
        format!("http://{uri}")
    };
    let uri: http::Uri = text.parse().map_err(|_| {
        ctx.err(
            format!("{field}.http_uri.uri"),
            format!("{uri:?} is not a URI"),
        )
    })?;
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| cluster.clone());
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let timeout = duration(timeout).unwrap_or(Duration::from_secs(1));
    let headers = headers(
        ctx,
        &format!("{field}.request_headers_to_add"),
        request_headers_to_add,
    )?;
    Ok((cluster, authority, path, timeout, headers))
}

/// The gRPC service spans are exported to (OTLP over gRPC).
fn grpc_target(
    ctx: &mut Ctx<'_>,
    field: &str,
    g: &core_pb::GrpcService,
) -> Result<mt::OtlpTransport, ConvertError> {
    let t = super::grpc_service::grpc_target(ctx, field, g, &GRPC_SERVICE, &ENVOY_GRPC)?;
    Ok(mt::OtlpTransport::Grpc {
        authority: t.authority,
        cluster: t.cluster,
        timeout: t.timeout,
        metadata: t.metadata,
    })
}

fn opentelemetry(
    ctx: &mut Ctx<'_>,
    field: &str,
    c: &trace_pb::OpenTelemetryConfig,
) -> Result<mt::OpenTelemetry, ConvertError> {
    let cov = &OPENTELEMETRY;
    let trace_pb::OpenTelemetryConfig {
        grpc_service,
        http_service: http,
        exporter,
        service_name,
        resource_detectors,
        sampler,
        max_cache_size,
        set_telemetry_sdk_resource_attributes,
        set_service_name_resource_attribute,
        set_instrumentation_scope,
    } = c;
    ctx.refuse(cov, field, "exporter", exporter.is_some())?;
    if let Some(d) = resource_detectors.first() {
        return Err(refused_first(
            ctx,
            cov,
            field,
            "resource_detectors",
            &d.name,
        ));
    }
    if let Some(s) = sampler {
        let why = cov.field("sampler").map_or("not supported", |f| f.note);
        return Err(ctx.err(path(field, "sampler"), format!("{why}: {:?}", s.name)));
    }
    let transport = match (grpc_service, http) {
        (Some(g), None) => grpc_target(ctx, &path(field, "grpc_service"), g)?,
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
        service_name: if service_name.is_empty() {
            "unknown_service:envoy".into()
        } else {
            service_name.clone()
        },
        max_cache_size: max_cache_size.as_ref().map_or(1024, |v| v.value as usize),
        sdk_attributes: flag(set_telemetry_sdk_resource_attributes),
        service_name_attribute: flag(set_service_name_resource_attribute),
        instrumentation_scope: flag(set_instrumentation_scope),
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
    let cov = &ZIPKIN;
    let trace_pb::ZipkinConfig {
        collector_cluster,
        collector_endpoint,
        trace_id_128bit,
        shared_span_context,
        collector_endpoint_version,
        collector_hostname,
        split_spans_for_request,
        trace_context_option,
        collector_service,
        timestamp_trace_ids,
    } = c;
    match V::try_from(*collector_endpoint_version) {
        Ok(V::HttpJson) => {}
        _ => {
            return Err(ctx.err(
                path(field, "collector_endpoint_version"),
                "only HTTP_JSON (Zipkin v2 JSON) is supported",
            ));
        }
    }
    ctx.refuse(
        cov,
        field,
        "split_spans_for_request",
        *split_spans_for_request,
    )?;
    ctx.refuse(cov, field, "timestamp_trace_ids", *timestamp_trace_ids)?;
    let w3c = match T::try_from(*trace_context_option) {
        Ok(T::UseB3) => false,
        Ok(T::UseB3WithW3cPropagation) => true,
        Err(_) => {
            return Err(ctx.err(
                path(field, "trace_context_option"),
                format!("unknown value {trace_context_option}"),
            ));
        }
    };
    let (cluster, hostname, path, timeout, headers) = match collector_service {
        Some(s) => http_service(ctx, &path(field, "collector_service"), s)?,
        None => {
            if collector_cluster.is_empty() {
                return Err(ctx.err(
                    path(field, "collector_cluster"),
                    "a collector cluster is required",
                ));
            }
            let hostname = if collector_hostname.is_empty() {
                collector_cluster.clone()
            } else {
                collector_hostname.clone()
            };
            (
                collector_cluster.clone(),
                hostname,
                if collector_endpoint.is_empty() {
                    "/api/v2/spans".into()
                } else {
                    collector_endpoint.clone()
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
        trace_id_128bit: *trace_id_128bit,
        shared_span_context: shared_span_context.as_ref().is_none_or(|v| v.value),
        w3c,
    })
}

/// The bootstrap's server-wide tracer (`tracing.http`).
pub fn bootstrap_provider(
    t: &trace_pb::Tracing,
    warnings: &mut super::Warnings,
) -> Result<Option<Arc<mt::Provider>>, ConvertError> {
    let mut ctx = Ctx {
        resource: "bootstrap".into(),
        warnings,
        inbound: false,
        outbound: false,
    };
    let trace_pb::Tracing { http } = t;
    match http {
        Some(h) => Ok(Some(Arc::new(provider(&mut ctx, "tracing.http", h)?))),
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
