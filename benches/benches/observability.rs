//! What access logs and traces cost a request, off the socket: rendering an
//! entry in istiod's TEXT and JSON formats, evaluating a filter, the tracing
//! decision taken from the request id, and encoding a finished span for
//! OTLP and for Zipkin (per span, in a batch of 64).
//!
//! `cargo bench -p ferry-benches --bench observability`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use ferry_model::access_log::{Filter, JsonFormat, LogFormat, Op};
use ferry_model::format::LogTemplate;
use ferry_model::stream_info::{LogType, StreamInfo};
use ferry_model::tracing::{
    OpenTelemetry, OtlpTransport, Reason, RequestTraceHints, Tracing, Zipkin, mark_request_id,
};
use ferry_proxy::trace::{Kind, Span};

const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

fn info() -> StreamInfo {
    let mut i = StreamInfo::new(LogType::DownstreamEnd, SystemTime::now());
    i.duration = Some(Duration::from_millis(3));
    i.bytes_sent = 612;
    i.protocol = Some("HTTP/1.1");
    i.response_code = Some(200);
    i.response_code_details = Some("via_upstream".into());
    i.upstream_host = "10.0.0.7:9080"
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(Into::into);
    i.upstream_cluster = Some("outbound|9080||reviews.default.svc.cluster.local".into());
    i.upstream_local = "10.0.0.3:40112".parse().ok();
    i.downstream_local = "10.96.0.12:9080".parse().ok();
    i.downstream_remote = "10.0.0.3:51234".parse().ok();
    i.route_name = Some("default".into());
    i.request.method = "GET".into();
    i.request.path = "/reviews/0".into();
    i.request.authority = "reviews:9080".into();
    i.request.scheme = "http";
    let h = &mut i.request.headers;
    h.insert(
        "user-agent",
        "python-requests/2.31"
            .parse()
            .unwrap_or_else(|_| http::HeaderValue::from_static("x")),
    );
    h.insert(
        "x-request-id",
        http::HeaderValue::from_static("5f3a1c2e-7b44-4d2a-9c1e-0a1b2c3d4e5f"),
    );
    i.response_headers.insert(
        "x-envoy-upstream-service-time",
        http::HeaderValue::from_static("2"),
    );
    i
}

fn access_logs(c: &mut Criterion) {
    let info = info();
    let text = LogFormat::Text {
        template: LogTemplate::parse(ISTIO_TEXT).unwrap_or_default(),
        omit_empty: false,
    };
    c.bench_function("access_log/istio_text_line", |b| {
        b.iter(|| black_box(text.render(black_box(&info))))
    });
    let fields = [
        ("start_time", "%START_TIME%"),
        ("method", "%REQ(:METHOD)%"),
        ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
        ("protocol", "%PROTOCOL%"),
        ("response_code", "%RESPONSE_CODE%"),
        ("response_flags", "%RESPONSE_FLAGS%"),
        ("bytes_sent", "%BYTES_SENT%"),
        ("duration", "%DURATION%"),
        ("upstream_host", "%UPSTREAM_HOST%"),
        ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
        ("request_id", "%REQ(X-REQUEST-ID)%"),
        ("user_agent", "%REQ(USER-AGENT)%"),
    ];
    let json = LogFormat::Json {
        fields: Arc::new(JsonFormat::Object(
            fields
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_string(),
                        JsonFormat::Template(LogTemplate::parse(v).unwrap_or_default()),
                    )
                })
                .collect(),
        )),
        omit_empty: false,
    };
    c.bench_function("access_log/istio_json_line", |b| {
        b.iter(|| black_box(json.render(black_box(&info))))
    });
    let filter = Filter::And(vec![
        Filter::NotHealthCheck,
        Filter::StatusCode(Op::Ge, 400),
    ]);
    c.bench_function("access_log/filter", |b| {
        b.iter(|| black_box(filter.evaluate(black_box(&info), 7)))
    });
}

fn span(i: u8) -> Span {
    let now = SystemTime::now();
    let mut s = Span {
        trace_id: [i; 16],
        span_id: [i.wrapping_add(1); 8],
        parent_id: Some([3; 8]),
        name: "reviews.default.svc.cluster.local:9080/*".into(),
        kind: Kind::Server,
        start: now,
        end: now + Duration::from_millis(3),
        tags: Vec::new(),
        sampled: true,
        remote_parent: true,
        shared: false,
        tracestate: None,
        b3_single: false,
    };
    for (k, v) in [
        (
            "node_id",
            "sidecar~10.0.0.3~reviews-v1.default~default.svc.cluster.local",
        ),
        ("zone", ""),
        ("guid:x-request-id", "5f3a1c2e-7b44-9d2a-9c1e-0a1b2c3d4e5f"),
        ("http.url", "http://reviews:9080/reviews/0"),
        ("http.method", "GET"),
        ("downstream_cluster", "-"),
        ("user_agent", "python-requests/2.31"),
        ("http.protocol", "HTTP/1.1"),
        ("peer.address", "10.0.0.3"),
        ("request_size", "0"),
        ("response_size", "612"),
        ("component", "proxy"),
        ("upstream_cluster", "inbound|9080||"),
        ("upstream_cluster.name", "inbound|9080||"),
        ("http.status_code", "200"),
        ("response_flags", "-"),
        ("istio.canonical_service", "reviews"),
        ("istio.mesh_id", "cluster.local"),
    ] {
        s.tag(k, v);
    }
    s
}

fn tracing(c: &mut Criterion) {
    let pct = |n| ferry_model::Fraction {
        numerator: n,
        denominator: 10_000,
    };
    let cfg = Tracing {
        provider: None,
        client_sampling: pct(10_000),
        random_sampling: pct(100),
        overall_sampling: pct(10_000),
        max_path_tag_length: 256,
        custom_tags: Vec::new(),
        upstream_spans: false,
        egress: true,
    };
    let id = "5f3a1c2e-7b44-4d2a-9c1e-0a1b2c3d4e5f";
    c.bench_function("tracing/decision_at_1_percent", |b| {
        b.iter(|| {
            let h = RequestTraceHints {
                request_id: Some(black_box(id)),
                ..Default::default()
            };
            let r = cfg.decide(&h).unwrap_or(Reason::NotTraceable);
            black_box(mark_request_id(id, r))
        })
    });
    let otel = OpenTelemetry {
        transport: OtlpTransport::Http {
            cluster: "otel".into(),
            authority: "otel:4318".into(),
            path: "/v1/traces".into(),
            timeout: Duration::from_secs(1),
            headers: Vec::new(),
        },
        service_name: "reviews".into(),
        max_cache_size: 1024,
        sdk_attributes: true,
        service_name_attribute: true,
        instrumentation_scope: true,
    };
    let batch: Vec<Span> = (0..64).map(span).collect();
    c.bench_function("tracing/otlp_encode_batch_of_64", |b| {
        b.iter(|| {
            let req = ferry_proxy::trace::opentelemetry::encode(&otel, black_box(&batch));
            black_box(prost::Message::encode_to_vec(&req))
        })
    });
    let zipkin = Zipkin {
        cluster: "zipkin".into(),
        path: "/api/v2/spans".into(),
        hostname: "zipkin".into(),
        timeout: Duration::from_secs(5),
        headers: Vec::new(),
        trace_id_128bit: true,
        shared_span_context: false,
        w3c: false,
    };
    let local = std::net::IpAddr::from([10, 0, 0, 3]);
    c.bench_function("tracing/zipkin_encode_batch_of_64", |b| {
        b.iter(|| {
            let v =
                ferry_proxy::trace::zipkin::encode(&zipkin, black_box(&batch), "reviews", local);
            black_box(serde_json::to_vec(&v))
        })
    });
}

criterion_group!(observability, access_logs, tracing);
criterion_main!(observability);
