//! `envoy.tracers.zipkin`: spans as Zipkin v2 JSON (`HTTP_JSON`), POSTed
//! to the collector endpoint, each with its local endpoint (the node's
//! cluster and this host's address), its `cr`/`ss` annotation and, for a
//! server span sharing its caller's id, `shared`.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_model::tracing::Zipkin;
use serde_json::{Map, Value, json};

use super::{Kind, Span, hex};
use crate::http::body::UpstreamBody;

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The JSON array of a batch of spans.
pub fn encode(z: &Zipkin, spans: &[Span], service: &str, local: IpAddr) -> Value {
    let endpoint = match local {
        IpAddr::V4(a) => json!({"serviceName": service, "ipv4": a.to_string(), "port": 0}),
        IpAddr::V6(a) => json!({"serviceName": service, "ipv6": a.to_string(), "port": 0}),
    };
    Value::Array(
        spans
            .iter()
            .map(|s| {
                let trace_id = if z.trace_id_128bit || s.trace_id[..8] != [0; 8] {
                    hex(&s.trace_id)
                } else {
                    hex(&s.trace_id[8..])
                };
                // Envoy's Zipkin spans leave out empty tags (`zone`).
                let tags: Map<String, Value> = s
                    .tags
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                let end = micros(s.end);
                let mut v = json!({
                    "traceId": trace_id,
                    "id": hex(&s.span_id),
                    "name": s.name,
                    "kind": match s.kind {
                        Kind::Server => "SERVER",
                        Kind::Client => "CLIENT",
                    },
                    "timestamp": micros(s.start),
                    "duration": end.saturating_sub(micros(s.start)),
                    "localEndpoint": endpoint,
                    "tags": tags,
                    "annotations": [{
                        "timestamp": end,
                        "value": match s.kind {
                            Kind::Server => "ss",
                            Kind::Client => "cr",
                        },
                    }],
                });
                if let Some(p) = s.parent_id {
                    v["parentId"] = json!(hex(&p));
                }
                if s.shared {
                    v["shared"] = json!(true);
                }
                v
            })
            .collect(),
    )
}

/// The request to the collector: (request, over HTTP/2, timeout).
pub(super) fn request(
    z: &Zipkin,
    spans: &[Span],
    service: &str,
    local: IpAddr,
) -> (http::Request<UpstreamBody>, bool, Duration) {
    let body = serde_json::to_vec(&encode(z, spans, service, local)).unwrap_or_default();
    let req = super::post(
        &z.hostname,
        &z.path,
        &z.headers,
        "application/json",
        Bytes::from(body),
        false,
    );
    (req, false, z.timeout)
}
