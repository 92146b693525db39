//! `envoy.tracers.opentelemetry`: spans as an OTLP `ExportTraceServiceRequest`
//! (the `opentelemetry-proto` types), sent over gRPC
//! (`TraceService/Export`, HTTP/2) or OTLP/HTTP (a protobuf POST), with the
//! resource attributes, scope and span flags Envoy sets.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use ferry_model::tracing::{OpenTelemetry, OtlpTransport};
use http::{HeaderMap, HeaderValue, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status, status};
use prost::Message;

use super::{ExportError, Kind, Span};
use crate::http::body::UpstreamBody;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
        ..Default::default()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// OTLP span flags: the context's `is_remote` is known (0x100), the parent
/// was remote (0x200), and W3C's sampled bit.
fn flags(s: &Span) -> u32 {
    0x100 | if s.remote_parent { 0x200 } else { 0 } | u32::from(s.sampled)
}

/// The export request for a batch of spans.
pub fn encode(o: &OpenTelemetry, spans: &[Span]) -> ExportTraceServiceRequest {
    let version = crate::admin::server_info::version();
    let mut attributes = Vec::new();
    if o.sdk_attributes {
        attributes.push(kv("telemetry.sdk.version", &version));
        attributes.push(kv("telemetry.sdk.language", "rust"));
        attributes.push(kv("telemetry.sdk.name", "ferry"));
    }
    if o.service_name_attribute {
        attributes.push(kv("service.name", &o.service_name));
    }
    let spans = spans
        .iter()
        .map(|s| opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            trace_state: s.tracestate.clone().unwrap_or_default(),
            parent_span_id: s.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
            flags: flags(s),
            name: s.name.clone(),
            kind: match s.kind {
                Kind::Server => 2,
                Kind::Client => 3,
            },
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end),
            attributes: s.tags.iter().map(|(k, v)| kv(k, v)).collect(),
            status: s.is_error().then(|| Status {
                message: String::new(),
                code: status::StatusCode::Error as i32,
            }),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes,
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: o.instrumentation_scope.then(|| InstrumentationScope {
                    name: "ferry".into(),
                    version,
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The request to the collector: (request, over HTTP/2, timeout).
pub(super) fn request(
    o: &OpenTelemetry,
    spans: &[Span],
) -> (http::Request<UpstreamBody>, bool, Duration) {
    let msg = encode(o, spans).encode_to_vec();
    let agent = HeaderValue::from_str(&format!(
        "OTel-OTLP-Exporter-Ferry/{}",
        env!("CARGO_PKG_VERSION")
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("OTel-OTLP-Exporter-Ferry"));
    match &o.transport {
        OtlpTransport::Http {
            authority,
            path,
            timeout,
            headers,
            ..
        } => {
            let mut req = super::post(
                authority,
                path,
                headers,
                "application/x-protobuf",
                Bytes::from(msg),
                false,
            );
            req.headers_mut().insert(http::header::USER_AGENT, agent);
            (req, false, *timeout)
        }
        OtlpTransport::Grpc {
            authority,
            timeout,
            metadata,
            ..
        } => {
            // A gRPC message: uncompressed, length-prefixed.
            let mut framed = BytesMut::with_capacity(msg.len() + 5);
            framed.put_u8(0);
            framed.put_u32(msg.len() as u32);
            framed.put_slice(&msg);
            let mut req = super::post(
                authority,
                EXPORT_PATH,
                metadata,
                "application/grpc",
                framed.freeze(),
                true,
            );
            let h = req.headers_mut();
            h.insert(http::header::TE, HeaderValue::from_static("trailers"));
            h.insert(http::header::USER_AGENT, agent);
            if let Some(t) = timeout
                && let Ok(v) = HeaderValue::from_str(&format!("{}m", t.as_millis()))
            {
                h.insert("grpc-timeout", v);
            }
            (req, true, timeout.unwrap_or(Duration::from_secs(5)))
        }
    }
}

/// Whether the collector took the batch: a 2xx, and `grpc-status: 0` for
/// gRPC.
pub(super) fn check(
    o: &OpenTelemetry,
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> Result<(), ExportError> {
    if !status.is_success() {
        return Err(ExportError::Status(status.to_string()));
    }
    if matches!(o.transport, OtlpTransport::Grpc { .. }) {
        let code = trailers
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0");
        if code != "0" {
            return Err(ExportError::Status(format!("grpc-status {code}")));
        }
    }
    Ok(())
}
