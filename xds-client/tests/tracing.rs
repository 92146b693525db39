//! Conversion of the connection manager's `tracing` and of the tracers: sampling as
//! Envoy's 10 000ths, custom tags, upstream spans from `spawn_upstream_span` or the
//! router's `start_child_span`, the listener's direction, the bootstrap's server-wide
//! tracer, and refusals naming what Ferry would record differently.

use ferry_model::tracing::{OtlpTransport, Provider, TagValue, Tracing};
use ferry_model::{ChainKind, Snapshot};
use ferry_xds::bootstrap::parse_bootstrap;

fn bootstrap(direction: &str, tracing: &str, router: &str, top: &str) -> String {
    format!(
        r#"
{top}
static_resources:
  listeners:
  - name: http
    traffic_direction: {direction}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
{tracing}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                decorator: {{operation: op, propagate: false}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{router}
  clusters:
  - name: backend
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9090}}}}}}
"#
    )
}

const OTEL: &str = r#"          tracing:
            random_sampling: {value: 1.5}
            max_path_tag_length: 64
            custom_tags:
            - {tag: a, literal: {value: x}}
            - {tag: b, request_header: {name: X-Tag, default_value: none}}
            - {tag: c, environment: {name: FERRY_NO_SUCH_VARIABLE, default_value: dflt}}
            - tag: d
              metadata:
                kind: {request: {}}
                metadata_key: {key: envoy.filters.http.rbac, path: [{key: shadow_effective_policy_id}]}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {envoy_grpc: {cluster_name: otel}, timeout: 2s}
                service_name: web"#;

fn load(text: &str) -> Snapshot {
    match parse_bootstrap("test.yaml", text) {
        Ok(b) => b.snapshot,
        Err(e) => panic!("{e}\n{text}"),
    }
}

fn err(text: &str) -> String {
    match parse_bootstrap("test.yaml", text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn tracing(s: &Snapshot) -> &Tracing {
    match &s.listeners[0].filter_chains[0].kind {
        ChainKind::Http(h) => h.tracing.as_deref().expect("tracing"),
        ChainKind::Tcp(_) => panic!("not HTTP"),
    }
}

#[test]
fn opentelemetry_block() {
    let s = load(&bootstrap("OUTBOUND", OTEL, "", ""));
    let t = tracing(&s);
    assert!(t.egress);
    assert_eq!(
        (t.random_sampling.numerator, t.random_sampling.denominator),
        (150, 10_000)
    );
    assert_eq!(t.client_sampling.numerator, 10_000);
    assert_eq!(t.max_path_tag_length, 64);
    assert!(!t.upstream_spans);
    assert_eq!(t.custom_tags.len(), 4);
    assert!(
        matches!(&t.custom_tags[1].value, TagValue::RequestHeader { name, default } if name == "x-tag" && default.as_deref() == Some("none"))
    );
    assert_eq!(t.custom_tags[2].value, TagValue::Literal("dflt".into()));
    assert!(
        matches!(&t.custom_tags[3].value, TagValue::RequestMetadata { filter, path, .. } if filter == "envoy.filters.http.rbac" && path == &["shadow_effective_policy_id"])
    );
    let Some(Provider::OpenTelemetry(o)) = t.provider.as_deref() else {
        panic!("provider");
    };
    assert_eq!(o.service_name, "web");
    assert!(
        matches!(&o.transport, OtlpTransport::Grpc { cluster, authority, .. } if cluster == "otel" && authority == "otel")
    );
    let route = &s.listeners[0].filter_chains[0].kind;
    let ChainKind::Http(h) = route else {
        panic!("http")
    };
    let ferry_model::RouteSource::Inline(rc) = &h.routes else {
        panic!("inline routes")
    };
    let d = rc.virtual_hosts[0].routes[0]
        .decorator
        .as_ref()
        .expect("decorator");
    assert_eq!((d.operation.as_str(), d.propagate), ("op", false));
}

#[test]
fn upstream_spans_and_the_bootstrap_tracer() {
    let zipkin_top = r#"tracing:
  http:
    name: envoy.tracers.zipkin
    typed_config:
      "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
      collector_cluster: zipkin
      collector_endpoint: /api/v2/spans
      collector_endpoint_version: HTTP_JSON
      trace_id_128bit: true
      shared_span_context: false"#;
    let router = "              start_child_span: true";
    let text = bootstrap("INBOUND", "          tracing: {}", router, zipkin_top);
    let b = parse_bootstrap("test.yaml", &text).expect("accepted");
    let t = tracing(&b.snapshot);
    assert!(t.upstream_spans && !t.egress && t.provider.is_none());
    let Some(Provider::Zipkin(z)) = b.tracing.as_deref() else {
        panic!("bootstrap tracer");
    };
    assert!(z.trace_id_128bit && !z.shared_span_context && !z.w3c);
    assert_eq!(
        (z.hostname.as_str(), z.path.as_str()),
        ("zipkin", "/api/v2/spans")
    );
    // spawn_upstream_span wins over the router's start_child_span.
    let text = bootstrap(
        "INBOUND",
        "          tracing: {spawn_upstream_span: false}",
        router,
        "",
    );
    assert!(!tracing(&load(&text)).upstream_spans);
}

#[test]
fn refusals_name_the_field() {
    let block = |provider: &str| {
        format!(
            r#"          tracing:
            provider:
              name: x
              typed_config:
{provider}"#
        )
    };
    let cases = [
        (
            "          tracing: {verbose: true}".to_string(),
            "tracing.verbose",
        ),
        (
            block(
                r#"                "@type": type.googleapis.com/envoy.config.trace.v3.DatadogConfig
                collector_cluster: dd
                service_name: web"#,
            ),
            "unsupported tracer \"x\"",
        ),
        (
            block(
                r#"                "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
                collector_cluster: zipkin
                collector_endpoint: /api/v2/spans
                collector_endpoint_version: HTTP_PROTO"#,
            ),
            "collector_endpoint_version",
        ),
        (
            block(
                r#"                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {envoy_grpc: {cluster_name: otel}}
                sampler: {name: envoy.tracers.opentelemetry.samplers.always_on, typed_config: {"@type": type.googleapis.com/envoy.extensions.tracers.opentelemetry.samplers.v3.AlwaysOnSamplerConfig}}"#,
            ),
            "sampler",
        ),
        (
            block(
                r#"                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                service_name: web"#,
            ),
            "a grpc_service or http_service is required",
        ),
        (
            r#"          tracing:
            custom_tags:
            - tag: m
              metadata: {kind: {route: {}}, metadata_key: {key: k, path: [{key: a}]}}"#
                .to_string(),
            "custom_tags[0].metadata.kind",
        ),
        (
            "          tracing: {custom_tags: [{tag: f, value: \"%REQ(x)%\"}]}".to_string(),
            "custom_tags[0].value",
        ),
        (
            "          tracing: {operation: \"%REQ(:PATH)%\"}".to_string(),
            "tracing.operation",
        ),
        (
            "          tracing: {upstream_operation: up}".to_string(),
            "tracing.upstream_operation",
        ),
        (
            "          tracing: {no_context_propagation: true}".to_string(),
            "tracing.no_context_propagation",
        ),
        (
            r#"          request_id_extension:
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig
              use_request_id_for_trace_sampling: false"#
                .to_string(),
            "request_id_extension.typed_config.use_request_id_for_trace_sampling",
        ),
    ];
    for (tracing, want) in cases {
        let e = err(&bootstrap("OUTBOUND", &tracing, "", ""));
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    let route_tracing = bootstrap("OUTBOUND", "", "", "").replace(
        "                decorator: {operation: op, propagate: false}\n",
        "                tracing: {random_sampling: {numerator: 1}}\n",
    );
    assert!(err(&route_tracing).contains("routes[0].tracing"));
    let upstream_log = bootstrap(
        "OUTBOUND",
        "",
        r#"              upstream_log:
              - name: envoy.access_loggers.stdout
                typed_config: {"@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog}"#,
        "",
    );
    assert!(err(&upstream_log).contains("upstream_log"));
    // What istiod emits with Telemetry tracing: the UUID extension with its
    // defaults, and a formatter tag that is a plain value.
    let istiod = bootstrap(
        "OUTBOUND",
        r#"          request_id_extension:
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig
              use_request_id_for_trace_sampling: true
          tracing: {custom_tags: [{tag: v, value: plain}]}"#,
        "",
        "",
    );
    let s = load(&istiod);
    assert!(matches!(&tracing(&s).custom_tags[0].value, TagValue::Literal(v) if v == "plain"));
}
