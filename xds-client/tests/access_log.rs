//! Conversion of access logs: the file, stdout and stderr loggers with every format
//! Envoy accepts, the filters, and refusals naming what Ferry does not write (other
//! loggers, formatter extensions, metadata and CEL filters, unknown command
//! operators, periodic logging).

use ferry_model::access_log::{Filter, LogFormat, Sink};
use ferry_model::{ChainKind, Snapshot};
use ferry_xds::bootstrap::parse_bootstrap;

/// A bootstrap whose connection manager has `access_log` (YAML list items indented
/// for `access_log:`), and a TCP proxy listener with `tcp_log`.
fn bootstrap(access_log: &str, tcp_log: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          access_log:
{access_log}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8081}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: backend
          access_log:
{tcp_log}
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

const STDOUT: &str = r#"          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"#;

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

fn hcm_logs(s: &Snapshot) -> &ferry_model::access_log::AccessLogs {
    match &s.listeners[0].filter_chains[0].kind {
        ChainKind::Http(h) => &h.access_logs,
        ChainKind::Tcp(_) => panic!("not an HTTP chain"),
    }
}

#[test]
fn loggers_formats_and_filters() {
    let dir = std::env::temp_dir().join(format!("ferry-xds-alog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.log");
    let logs = format!(
        r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {path}
          - name: envoy.access_loggers.file
            filter:
              and_filter:
                filters:
                - status_code_filter: {{comparison: {{op: GE, value: {{default_value: 500, runtime_key: k}}}}}}
                - or_filter:
                    filters:
                    - response_flag_filter: {{flags: [UF, NR]}}
                    - header_filter: {{header: {{name: x-debug, present_match: true}}}}
                    - runtime_filter: {{runtime_key: r, percent_sampled: {{numerator: 5}}}}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {path}
              log_format:
                json_format: {{code: "%RESPONSE_CODE%", n: 1, nested: {{p: "%PROTOCOL%"}}}}
                omit_empty_values: true
          - name: envoy.access_loggers.stderr
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog
              log_format:
                text_format_source: {{inline_string: "%REQ(:PATH)% %RESP(content-type)% %TRAILER(grpc-status)%\n"}}"#,
        path = path.display()
    );
    let s = load(&bootstrap(&logs, STDOUT));
    let l = hcm_logs(&s);
    assert_eq!(l.logs.len(), 3);
    assert_eq!(l.logs[0].sink, Sink::File(path.display().to_string()));
    // No format: Envoy's default line.
    assert_eq!(l.logs[0].format, LogFormat::default_text());
    assert!(matches!(
        l.logs[1].filter,
        Some(Filter::And(ref fs)) if fs.len() == 2 && matches!(fs[1], Filter::Or(ref o) if o.len() == 3)
    ));
    assert!(matches!(
        l.logs[1].format,
        LogFormat::Json {
            omit_empty: true,
            ..
        }
    ));
    assert_eq!(l.logs[2].sink, Sink::Stderr);
    // The headers the formats and filters read are the ones kept of each request.
    let req: Vec<&str> = l.needs.request.iter().map(|h| h.as_str()).collect();
    for h in [
        "x-envoy-original-path",
        "x-request-id",
        "x-debug",
        "user-agent",
    ] {
        assert!(req.contains(&h), "{h} missing from {req:?}");
    }
    assert_eq!(
        l.needs.response[0].as_str(),
        "x-envoy-upstream-service-time"
    );
    assert!(l.needs.trailers.iter().any(|h| h == "grpc-status"));
    match &s.listeners[1].filter_chains[0].kind {
        ChainKind::Tcp(t) => assert_eq!(t.access_logs.logs[0].sink, Sink::Stdout),
        ChainKind::Http(_) => panic!("not a TCP chain"),
    }
    assert!(
        path.exists(),
        "the file is created when the configuration loads"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refusals_name_the_field() {
    let cases = [
        (
            r#"          - name: envoy.access_loggers.http_grpc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
              common_config: {log_name: x, transport_api_version: V3, grpc_service: {envoy_grpc: {cluster_name: backend}}}"#,
            "access_log[0].typed_config: unsupported access logger \"envoy.access_loggers.http_grpc\"",
        ),
        (
            r#"          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format: {text_format_source: {inline_string: "%DYNAMIC_METADATA(istio.mixer:x)%"}}"#,
            "unsupported command %DYNAMIC_METADATA%",
        ),
        (
            r#"          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format: {text_format_source: {inline_string: "%NOT_A_COMMAND%"}}"#,
            "unsupported command %NOT_A_COMMAND%",
        ),
        (
            r#"          - name: envoy.access_loggers.stdout
            filter: {extension_filter: {name: envoy.access_loggers.extension_filters.cel, typed_config: {"@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter, expression: "response.code >= 400"}}}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"#,
            "access_log[0].filter.extension_filter",
        ),
        (
            r#"          - name: envoy.access_loggers.stdout
            filter: {metadata_filter: {}}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"#,
            "access_log[0].filter.metadata_filter",
        ),
        (
            r#"          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                text_format_source: {inline_string: "x"}
                formatters: [{name: envoy.formatter.req_without_query, typed_config: {"@type": type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery}}]"#,
            "log_format.formatters[0]: formatter extension",
        ),
        (
            r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /nonexistent-dir-of-ferry/x.log"#,
            "access_log[0].typed_config.path: cannot open access log",
        ),
    ];
    for (log, want) in cases {
        let e = err(&bootstrap(log, STDOUT));
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    // One entry per request or connection, at its end: periodic logging is refused.
    let periodic = bootstrap(STDOUT, STDOUT).replace(
        "          stat_prefix: ingress\n",
        "          stat_prefix: ingress\n          access_log_options: {access_log_flush_interval: 1s}\n",
    );
    assert!(err(&periodic).contains("access_log_options"), "{periodic}");
    let periodic = bootstrap(STDOUT, STDOUT).replace(
        "          stat_prefix: tcp\n",
        "          stat_prefix: tcp\n          access_log_options: {flush_access_log_on_connected: true}\n",
    );
    assert!(err(&periodic).contains("access_log_options"), "{periodic}");
}

#[test]
fn dev_stdout_is_the_process_stdout() {
    let logs = r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /dev/stdout
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /dev/stderr"#;
    let s = load(&bootstrap(logs, STDOUT));
    let l = hcm_logs(&s);
    assert_eq!(l.logs[0].sink, Sink::Stdout);
    assert_eq!(l.logs[1].sink, Sink::Stderr);
}
