//! Distributed tracing as Envoy configures it: a connection manager's
//! `tracing` block (sampling, custom tags, upstream spans, path tag length)
//! and the tracer it reports to (`envoy.tracers.opentelemetry` over OTLP/gRPC
//! or OTLP/HTTP, `envoy.tracers.zipkin` with v2 JSON), or the bootstrap's
//! server-wide tracer when the block names none.
//!
//! Pure configuration plus the sampling decision Envoy takes from the
//! request id; spans and their export live in the proxy.

use std::sync::Arc;
use std::time::Duration;

use crate::route::Fraction;

/// A connection manager's `tracing`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// The tracer; `None`: the bootstrap's (`tracing.http`), if any.
    pub provider: Option<Arc<Provider>>,
    /// `client_sampling` (requests with `x-client-trace-id`), default 100%.
    pub client_sampling: Fraction,
    /// `random_sampling`, default 100%.
    pub random_sampling: Fraction,
    /// `overall_sampling`, default 100%.
    pub overall_sampling: Fraction,
    /// `max_path_tag_length` of `http.url`, default 256.
    pub max_path_tag_length: usize,
    pub custom_tags: Vec<CustomTag>,
    /// A span per upstream attempt (`spawn_upstream_span`, or the router's
    /// `start_child_span` when that is unset).
    pub upstream_spans: bool,
    /// The listener is outbound: spans are `egress <host>` of kind client;
    /// otherwise `ingress` of kind server.
    pub egress: bool,
}

/// A route's `decorator`: its spans' operation name, sent on to the next
/// proxy (`x-envoy-decorator-operation`) unless `propagate` is false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decorator {
    pub operation: String,
    pub propagate: bool,
}

/// One `custom_tags` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomTag {
    pub tag: String,
    pub value: TagValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagValue {
    /// A literal (`literal`), or an environment variable read when the
    /// configuration was loaded (`environment`, as Envoy reads it).
    Literal(String),
    /// A request header, else the default (no tag without either).
    RequestHeader {
        name: http::HeaderName,
        default: Option<String>,
    },
    /// The request's dynamic metadata under `filter`, at `path`, else the
    /// default.
    RequestMetadata {
        filter: String,
        path: Vec<String>,
        default: Option<String>,
    },
}

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    OpenTelemetry(OpenTelemetry),
    Zipkin(Zipkin),
}

impl Provider {
    /// The extension's name.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::OpenTelemetry(_) => "envoy.tracers.opentelemetry",
            Provider::Zipkin(_) => "envoy.tracers.zipkin",
        }
    }

    /// The cluster spans are sent to.
    pub fn cluster(&self) -> &str {
        match self {
            Provider::OpenTelemetry(o) => match &o.transport {
                OtlpTransport::Grpc { cluster, .. } | OtlpTransport::Http { cluster, .. } => {
                    cluster
                }
            },
            Provider::Zipkin(z) => &z.cluster,
        }
    }
}

/// `envoy.config.trace.v3.OpenTelemetryConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTelemetry {
    pub transport: OtlpTransport,
    /// `service_name` (Envoy's default: `unknown_service:envoy`).
    pub service_name: String,
    /// Spans kept before a flush (`max_cache_size`, default 1024); more are
    /// dropped.
    pub max_cache_size: usize,
    /// `set_telemetry_sdk_resource_attributes` (default true).
    pub sdk_attributes: bool,
    /// `set_service_name_resource_attribute` (default true).
    pub service_name_attribute: bool,
    /// `set_instrumentation_scope` (default true).
    pub instrumentation_scope: bool,
}

/// How OTLP reaches the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtlpTransport {
    /// `grpc_service.envoy_grpc`: `TraceService/Export` over HTTP/2.
    Grpc {
        cluster: String,
        authority: String,
        timeout: Option<Duration>,
        metadata: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    /// `http_service`: a POST of the protobuf request.
    Http {
        cluster: String,
        /// The URI's authority and path.
        authority: String,
        path: String,
        timeout: Duration,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
}

/// `envoy.config.trace.v3.ZipkinConfig` (v2 JSON over HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zipkin {
    pub cluster: String,
    /// `collector_endpoint`: the path spans are POSTed to.
    pub path: String,
    /// `collector_hostname` (default: the cluster's name).
    pub hostname: String,
    pub timeout: Duration,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub trace_id_128bit: bool,
    /// `shared_span_context` (default true): a server span reuses the
    /// calling client span's id.
    pub shared_span_context: bool,
    /// `trace_context_option: USE_B3_WITH_W3C_PROPAGATION`: W3C
    /// `traceparent` is read when no B3 headers came, and sent beside B3.
    pub w3c: bool,
}

/// Why a request is (or is not) traced, as Envoy keeps it in the request
/// id (`x-request-id`'s 15th character).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotTraceable,
    /// `random_sampling` chose it.
    Sampling,
    /// `x-envoy-force-trace` (internal requests only).
    ServiceForced,
    /// `x-client-trace-id` within `client_sampling`.
    ClientForced,
}

impl Reason {
    pub fn traced(self) -> bool {
        self != Reason::NotTraceable
    }

    /// The character Envoy's UUID request id keeps the reason in.
    pub fn id_char(self) -> u8 {
        match self {
            Reason::NotTraceable => b'4',
            Reason::Sampling => b'9',
            Reason::ServiceForced => b'a',
            Reason::ClientForced => b'b',
        }
    }

    fn of_id(id: &str) -> Reason {
        if id.len() != 36 {
            return Reason::NotTraceable;
        }
        match id.as_bytes()[14] {
            b'9' => Reason::Sampling,
            b'a' => Reason::ServiceForced,
            b'b' => Reason::ClientForced,
            _ => Reason::NotTraceable,
        }
    }
}

/// What the request says about tracing.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTraceHints<'a> {
    pub request_id: Option<&'a str>,
    pub client_trace_id: bool,
    /// `x-envoy-force-trace` on an internal request.
    pub force_trace: bool,
}

impl Tracing {
    /// Envoy's decision (`mutateTracingRequestHeader`): the reason already
    /// in the request id stands; else a client trace id within client
    /// sampling, a forced trace, or random sampling by the request id's
    /// value; overall sampling can still veto. `None` without a usable
    /// request id (nothing is traced then).
    pub fn decide(&self, h: &RequestTraceHints<'_>) -> Option<Reason> {
        let id = h.request_id?;
        let value = crate::access_log::request_id_value(id)? % 10_000;
        let mut reason = Reason::of_id(id);
        if reason == Reason::NotTraceable {
            if h.client_trace_id && self.client_sampling.hits(value) {
                reason = Reason::ClientForced;
            } else if h.force_trace {
                reason = Reason::ServiceForced;
            } else if self.random_sampling.hits(value) {
                reason = Reason::Sampling;
            }
        }
        if !self.overall_sampling.hits(value) {
            reason = Reason::NotTraceable;
        }
        Some(reason)
    }
}

/// The request id with its trace reason written in, as Envoy rewrites it.
pub fn mark_request_id(id: &str, reason: Reason) -> Option<String> {
    if id.len() != 36 || !id.is_ascii() {
        return None;
    }
    let mut b = id.as_bytes().to_vec();
    b[14] = reason.id_char();
    String::from_utf8(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing(random: u32, overall: u32) -> Tracing {
        let pct = |n| Fraction {
            numerator: n,
            denominator: 100,
        };
        Tracing {
            provider: None,
            client_sampling: pct(100),
            random_sampling: pct(random),
            overall_sampling: pct(overall),
            max_path_tag_length: 256,
            custom_tags: Vec::new(),
            upstream_spans: false,
            egress: false,
        }
    }

    #[test]
    fn decisions_follow_the_request_id() {
        // 0x00000032 = 50: within 51 %, not within 50 %.
        let id = "00000032-1111-4111-8111-111111111111";
        let h = |id| RequestTraceHints {
            request_id: Some(id),
            ..Default::default()
        };
        assert_eq!(tracing(51, 100).decide(&h(id)), Some(Reason::Sampling));
        assert_eq!(tracing(50, 100).decide(&h(id)), Some(Reason::NotTraceable));
        assert_eq!(tracing(51, 50).decide(&h(id)), Some(Reason::NotTraceable));
        // A reason already in the id stands (the calling proxy sampled it).
        let sampled = mark_request_id(id, Reason::Sampling).unwrap();
        assert_eq!(&sampled[14..15], "9");
        assert_eq!(tracing(0, 100).decide(&h(&sampled)), Some(Reason::Sampling));
        // Forced and client traces.
        let forced = RequestTraceHints {
            request_id: Some(id),
            force_trace: true,
            ..Default::default()
        };
        assert_eq!(tracing(0, 100).decide(&forced), Some(Reason::ServiceForced));
        let client = RequestTraceHints {
            request_id: Some(id),
            client_trace_id: true,
            ..Default::default()
        };
        assert_eq!(tracing(0, 100).decide(&client), Some(Reason::ClientForced));
        assert_eq!(
            tracing(100, 100).decide(&RequestTraceHints::default()),
            None
        );
        assert_eq!(mark_request_id("short", Reason::Sampling), None);
    }
}
