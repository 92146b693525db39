//! Access logs as Envoy writes them. One bootstrap — connection manager access logs in
//! Istio's TEXT format, a JSON format, Envoy's default format and filtered logs; TCP proxy
//! logs; a listener's own log for connections no filter chain takes — runs through Envoy
//! 1.40 and then through Ferry on the same ports, the same requests go through each (a
//! forwarded GET and POST, HTTP/2 with `x-forwarded-for`, a prefix rewrite, a direct
//! response, a redirect, no route, a refused connection, a cluster without endpoints, an
//! unknown cluster, a route timeout, an injected fault, an RBAC denial; TCP to an echo
//! server and to a closed port), and every log line must come out the same once the
//! volatile fields (times, durations, request ids, ephemeral ports) are normalised.
//!
//! Envoy comes from `ferry_tests::envoy`; without it Ferry's lines are still checked
//! against the expected ones, except under `CI=true`, where a missing Envoy fails the test.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, TempDir, Upstream, curl, free_port, listener, static_cluster,
};
use serde_json::{Value, json};

const FILE_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// istiod's default TEXT access log format (meshConfig `accessLogEncoding: TEXT`).
const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// istiod's default JSON format, and more operators.
fn json_format() -> Value {
    json!({
        "start_time": "%START_TIME%",
        "route_name": "%ROUTE_NAME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "rewritten": "%REQ(:PATH)%",
        "protocol": "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "response_flags_long": "%RESPONSE_FLAGS_LONG%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "duration": "%DURATION%",
        "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
        "user_agent": "%REQ(USER-AGENT)%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "authority": "%REQ(:AUTHORITY)%",
        "upstream_host": "%UPSTREAM_HOST%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
        "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "downstream_direct_remote_port": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
        "requested_server_name": "%REQUESTED_SERVER_NAME%",
        "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
        "content_type": "%RESP(CONTENT-TYPE)%",
        "ua_short": "%REQ(USER-AGENT):4%",
        "access_log_type": "%ACCESS_LOG_TYPE%",
        "local_port": "%DOWNSTREAM_LOCAL_PORT%",
        "literal": "x=%PROTOCOL%/%RESPONSE_CODE%",
        "number": 7,
        "flag": true,
        "nested": {"up": "%UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"},
    })
}

fn file_log(path: &Path, format: Option<Value>, filter: Option<Value>) -> Value {
    let mut cfg = json!({"@type": FILE_LOG, "path": path.to_string_lossy()});
    if let Some(f) = format {
        cfg["log_format"] = f;
    }
    let mut l = json!({"name": "envoy.access_loggers.file", "typed_config": cfg});
    if let Some(f) = filter {
        l["filter"] = f;
    }
    l
}

fn text(s: &str) -> Value {
    json!({"text_format_source": {"inline_string": s}})
}

struct Ports {
    http: u16,
    tcp: u16,
    tcp_dead: u16,
    no_chain: u16,
    backend: u16,
    echo: u16,
    dead: u16,
}

fn route(prefix: &str, action: Value) -> Value {
    json!({"match": {"prefix": prefix}, "route": action})
}

fn config(p: &Ports, dir: &Path) -> Value {
    let log = |n: &str| dir.join(n);
    let mut named = route(
        "/named/",
        json!({"cluster": "backend", "prefix_rewrite": "/bytes/"}),
    );
    named["name"] = json!("named-route");
    let mut direct = json!({"match": {"prefix": "/direct"},
        "direct_response": {"status": 200, "body": {"inline_string": "hello"}}});
    direct["name"] = json!("direct-route");
    let mut fault = route("/fault/", json!({"cluster": "backend"}));
    fault["typed_per_filter_config"] = json!({"envoy.filters.http.fault": {"@type": FAULT,
        "abort": {"http_status": 503, "percentage": {"numerator": 100}}}});
    let routes = vec![
        named,
        direct,
        json!({"match": {"prefix": "/redirect"},
            "redirect": {"path_redirect": "/elsewhere", "response_code": "MOVED_PERMANENTLY"}}),
        route("/dead/", json!({"cluster": "dead"})),
        route("/empty/", json!({"cluster": "empty"})),
        route("/nc/", json!({"cluster_header": "x-cluster"})),
        route("/sleep/", json!({"cluster": "backend", "timeout": "0.2s"})),
        fault,
        route("/deny/", json!({"cluster": "backend"})),
        route("/bytes/", json!({"cluster": "backend"})),
    ];
    let access_log = vec![
        file_log(&log("istio.log"), Some(text(ISTIO_TEXT)), None),
        file_log(
            &log("json.log"),
            Some(json!({"json_format": json_format()})),
            None,
        ),
        // Envoy's default format, errors only.
        file_log(
            &log("errors.log"),
            None,
            Some(json!({"status_code_filter": {"comparison": {"op": "GE",
                "value": {"default_value": 400, "runtime_key": "errors_min"}}}})),
        ),
        file_log(
            &log("flagged.log"),
            Some(text("%REQ(:PATH)% %RESPONSE_FLAGS% %RESPONSE_CODE%\n")),
            Some(json!({"or_filter": {"filters": [
                {"response_flag_filter": {"flags": ["UF", "NR", "UH"]}},
                {"header_filter": {"header": {"name": "x-log", "present_match": true}}},
            ]}})),
        ),
        file_log(
            &log("sampled.log"),
            Some(
                json!({"text_format_source": {"inline_string": "%REQ(:PATH)% [%UPSTREAM_HOST%]\n"},
                "omit_empty_values": true}),
            ),
            Some(json!({"and_filter": {"filters": [
                {"not_health_check_filter": {}},
                {"runtime_filter": {"runtime_key": "sampled",
                    "percent_sampled": {"numerator": 100, "denominator": "HUNDRED"}}},
                {"duration_filter": {"comparison": {"op": "GE",
                    "value": {"default_value": 0, "runtime_key": "d"}}}},
            ]}})),
        ),
    ];
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "web",
            "access_log": access_log,
            "route_config": {"name": "web", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
            "http_filters": [
                {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT}},
                {"name": "envoy.filters.http.rbac", "typed_config": {"@type": RBAC, "rules": {
                    "action": "DENY",
                    "policies": {"deny-path": {
                        "permissions": [{"url_path": {"path": {"prefix": "/deny/"}}}],
                        "principals": [{"any": true}]}}}}},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
            ],
        },
    });
    let tcp_format = json!({"json_format": {
        "code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%",
        "received": "%BYTES_RECEIVED%", "sent": "%BYTES_SENT%",
        "upstream_host": "%UPSTREAM_HOST%", "cluster": "%UPSTREAM_CLUSTER%",
        "upstream_local": "%UPSTREAM_LOCAL_ADDRESS%",
        "downstream_local": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "termination": "%CONNECTION_TERMINATION_DETAILS%",
        "protocol": "%PROTOCOL%", "method": "%REQ(:METHOD)%",
        "type": "%ACCESS_LOG_TYPE%"}});
    let tcp = |name: &str, port: u16, cluster: &str, file: &str| {
        listener(
            name,
            port,
            vec![json!({"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": name, "cluster": cluster,
                "access_log": [file_log(&log(file), Some(tcp_format.clone()), None)],
            }}]})],
        )
    };
    // No chain takes a connection from 127.0.0.1: the listener's own log has it.
    let mut no_chain = listener(
        "no_chain",
        p.no_chain,
        vec![json!({
            "filter_chain_match": {"source_prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]},
            "filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "no_chain", "cluster": "echo"}}]})],
    );
    no_chain["access_log"] = json!([file_log(
        &log("listener.log"),
        Some(text(
            "%RESPONSE_FLAGS% %CONNECTION_TERMINATION_DETAILS% %DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST% %RESPONSE_CODE%\n"
        )),
        Some(json!({"response_flag_filter": {"flags": ["NR"]}})),
    )]);
    let doc = Bootstrap::new()
        .listener(listener("web", p.http, vec![json!({"filters": [hcm]})]))
        .listener(tcp("tcp", p.tcp, "echo", "tcp.log"))
        .listener(tcp("tcp_dead", p.tcp_dead, "dead", "tcp.log"))
        .listener(no_chain)
        .cluster(static_cluster("backend", &[p.backend], Upstream::Http1))
        .cluster(static_cluster("echo", &[p.echo], Upstream::Http1))
        .cluster(static_cluster("dead", &[p.dead], Upstream::Http1))
        .cluster(static_cluster("empty", &[], Upstream::Http1))
        .render();
    serde_json::from_str(&doc).unwrap_or(Value::Null)
}

/// The requests, in order: (curl arguments after the URL's path, expected status).
fn requests() -> Vec<(Vec<&'static str>, &'static str, u16)> {
    vec![
        (vec![], "/bytes/100", 200),
        (vec!["-d", "hello world"], "/bytes/50", 200),
        (
            vec!["--http2-prior-knowledge", "-H", "x-forwarded-for: 10.1.2.3"],
            "/bytes/70",
            200,
        ),
        (vec![], "/named/10", 200),
        (vec![], "/direct", 200),
        (vec![], "/redirect", 301),
        (vec![], "/nothing", 404),
        (vec![], "/dead/x", 503),
        (vec![], "/empty/x", 503),
        (vec!["-H", "x-cluster: nope"], "/nc/x", 503),
        (vec![], "/sleep/2000", 504),
        (vec![], "/fault/x", 503),
        (vec![], "/deny/x", 403),
        (vec!["-H", "x-log: 1"], "/bytes/5", 200),
    ]
}

/// What one proxy wrote, by log file.
type Logs = BTreeMap<String, Vec<String>>;

/// Sends the requests and TCP connections; returns every log file's lines once they
/// stopped growing.
fn exercise(p: &Ports, dir: &Path) -> Result<Logs> {
    for (args, path, status) in requests() {
        let url = format!("http://127.0.0.1:{}{path}", p.http);
        let mut all = vec![
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-A",
            "test-agent/1.0",
        ];
        all.extend(args);
        all.push(&url);
        let out = curl(&all)?;
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got != status.to_string() {
            bail!("{path}: status {got}, expected {status}");
        }
    }
    // TCP: an echoed line, half-closed; then a connection to a closed port.
    let mut s = TcpStream::connect(("127.0.0.1", p.tcp))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"hello\n")?;
    s.shutdown(Shutdown::Write)?;
    let mut echoed = Vec::new();
    s.read_to_end(&mut echoed)?;
    if echoed != b"hello\nbye\n" {
        bail!("tcp echo answered {:?}", String::from_utf8_lossy(&echoed));
    }
    drop(s);
    let mut s = TcpStream::connect(("127.0.0.1", p.tcp_dead))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = s.read_to_end(&mut Vec::new());
    drop(s);
    let mut s = TcpStream::connect(("127.0.0.1", p.no_chain))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = s.read_to_end(&mut Vec::new());
    drop(s);
    // Entries are written when streams end and flushed shortly after.
    let expected = [
        ("istio.log", requests().len()),
        ("json.log", requests().len()),
        ("tcp.log", 2),
        ("listener.log", 1),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = read_logs(dir)?;
        let complete = expected
            .iter()
            .all(|(f, n)| logs.get(*f).is_some_and(|l| l.len() >= *n));
        if complete {
            // Let late writes of other files land too.
            thread::sleep(Duration::from_millis(300));
            return read_logs(dir);
        }
        if Instant::now() >= deadline {
            bail!("access logs incomplete after 10s: {logs:#?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn read_logs(dir: &Path) -> Result<Logs> {
    let mut out = Logs::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".log") {
            continue;
        }
        let text = std::fs::read_to_string(e.path())?;
        out.insert(name, text.lines().map(str::to_string).collect());
    }
    Ok(out)
}

/// Replaces what differs from run to run: times, durations, ids, ephemeral ports.
fn normalise(logs: &Logs, fixed_ports: &[u16]) -> Logs {
    let uuid = regex::Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
        .expect("regex");
    let time = regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z").expect("regex");
    let addr = regex::Regex::new(r"127\.0\.0\.1:(\d+)").expect("regex");
    // `%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%`.
    let durations = regex::Regex::new(r#" (\d+) (\d+) \d+ (\d+|-) ""#).expect("regex");
    let ports = |s: &str| {
        addr.replace_all(s, |c: &regex::Captures<'_>| {
            let port: u16 = c[1].parse().unwrap_or(0);
            if fixed_ports.contains(&port) {
                c[0].to_string()
            } else {
                "127.0.0.1:EPHEMERAL".to_string()
            }
        })
        .into_owned()
    };
    let mut out = Logs::new();
    for (file, lines) in logs {
        let norm: Vec<String> = lines
            .iter()
            .map(|l| {
                if let Ok(mut v) = serde_json::from_str::<Value>(l)
                    && let Some(o) = v.as_object_mut()
                {
                    for k in ["duration", "start_time", "request_id"] {
                        if o.get(k).is_some_and(|v| !v.is_null()) {
                            o.insert(k.into(), json!("<volatile>"));
                        }
                    }
                    if o.get("upstream_service_time")
                        .is_some_and(|v| v.is_string())
                    {
                        o.insert("upstream_service_time".into(), json!("<ms>"));
                    }
                    return ports(&v.to_string());
                }
                let l = time.replace_all(l, "<time>");
                let l = uuid.replace_all(&l, "<id>");
                let l = durations.replace_all(&l, |c: &regex::Captures<'_>| {
                    let st = if &c[3] == "-" { "-" } else { "<ms>" };
                    format!(" {} {} <ms> {st} \"", &c[1], &c[2])
                });
                ports(&l)
            })
            .collect();
        out.insert(file.clone(), norm);
    }
    out
}

#[test]
fn access_logs_match_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let echo = App::mode("tcp")?;
    let p = Ports {
        http: free_port(),
        tcp: free_port(),
        tcp_dead: free_port(),
        no_chain: free_port(),
        backend: app.port,
        echo: echo.port,
        dead: free_port(),
    };
    let fixed = [
        p.http, p.tcp, p.tcp_dead, p.no_chain, p.backend, p.echo, p.dead,
    ];

    let ferry_dir = TempDir::new("alog-ferry")?;
    let cfg = config(&p, ferry_dir.path());
    let ferry = Ferry::start(&serde_json::to_string(&cfg)?)?;
    let ferry_logs = normalise(&exercise(&p, ferry_dir.path())?, &fixed);
    drop(ferry);

    // What Ferry wrote, as expected on its own.
    let istio = &ferry_logs["istio.log"];
    assert_eq!(istio.len(), requests().len(), "{istio:#?}");
    let expect_istio = [
        "[<time>] \"GET /bytes/100 HTTP/1.1\" 200 - via_upstream - \"-\" 0 100 <ms> <ms> \"-\" \"test-agent/1.0\" \"<id>\"",
        "[<time>] \"POST /bytes/50 HTTP/1.1\" 200 - via_upstream - \"-\" 11 50 <ms> <ms>",
        "\"GET /named/10 HTTP/1.1\" 200 - via_upstream",
        "\"GET /direct HTTP/1.1\" 200 - direct_response - \"-\" 0 5 <ms> - ",
        "\"GET /nothing HTTP/1.1\" 404 NR route_not_found - \"-\" 0 0 <ms> -",
        "\"GET /dead/x HTTP/1.1\" 503 UF upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused} - \"delayed_connect_error:_Connection_refused\"",
        "\"GET /empty/x HTTP/1.1\" 503 UH no_healthy_upstream - \"-\" 0 19 <ms> -",
        "\"GET /sleep/2000 HTTP/1.1\" 504 UT response_timeout - \"-\" 0 24 <ms> -",
        "\"GET /fault/x HTTP/1.1\" 503 FI fault_filter_abort",
        "\"GET /deny/x HTTP/1.1\" 403 - rbac_access_denied_matched_policy[deny-path]",
    ];
    for e in expect_istio {
        assert!(
            istio.iter().any(|l| l.contains(e)),
            "no line like {e:?} in {istio:#?}"
        );
    }
    let errors = &ferry_logs["errors.log"];
    assert_eq!(errors.len(), 7, "status >= 400 only: {errors:#?}");
    assert_eq!(
        ferry_logs["flagged.log"],
        [
            "/nothing NR 404",
            "/dead/x UF 503",
            "/empty/x UH 503",
            "/bytes/5 - 200"
        ]
    );
    let sampled = &ferry_logs["sampled.log"];
    assert_eq!(sampled.len(), requests().len());
    assert!(sampled.iter().any(|l| l == "/direct []"), "{sampled:#?}");
    assert_eq!(ferry_logs["listener.log"].len(), 1);

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let envoy_dir = TempDir::new("alog-envoy")?;
    let cfg = config(&p, envoy_dir.path());
    let envoy = Envoy::start_with(&bin, &cfg, p.http, &["--file-flush-interval-msec", "50"])
        .context("starting Envoy")?;
    let envoy_logs = normalise(&exercise(&p, envoy_dir.path())?, &fixed);
    drop(envoy);
    for (file, lines) in &envoy_logs {
        let ours = ferry_logs
            .get(file)
            .ok_or_else(|| anyhow!("Ferry wrote no {file}"))?;
        for (i, (e, f)) in lines.iter().zip(ours).enumerate() {
            assert_eq!(
                f, e,
                "{file} line {i}: Ferry (left) and Envoy (right) differ"
            );
        }
        assert_eq!(
            ours.len(),
            lines.len(),
            "{file}: {ours:#?}\nEnvoy: {lines:#?}"
        );
    }
    Ok(())
}
