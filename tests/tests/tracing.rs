//! Distributed tracing as Envoy does it, compared with Envoy 1.40. Two hops — an outbound
//! listener (egress) forwarding to an inbound one (ingress, with a span per upstream
//! attempt) in front of the echo backend — run one bootstrap through Envoy and then
//! through Ferry, on the same ports, reporting to collectors in this test process: an
//! OTLP/gRPC server (`TraceService/Export`), an OTLP/HTTP endpoint and a Zipkin v2 JSON
//! endpoint. The same requests go through each (fresh traces, a W3C or B3 parent, a
//! decorated route, an unsampled parent, sampling by the request id) and the spans must
//! have the same names, kinds, parent links, tags (keys, and the values that do not vary)
//! and propagation: the backend sees the same kind of context. Then, through Ferry alone:
//! a dead collector and a collector that never answers leave requests unharmed, the spans
//! are counted as dropped or failed, and sampling at 0 % exports nothing.
//!
//! Without Envoy, Ferry's spans are still checked on their own, except under `CI=true`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, curl, free_port, listener, static_cluster,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde_json::{Value, json};

// ------------------------------------------------------------------------------ receivers

/// A span as received, whatever the wire format.
#[derive(Debug, Clone)]
struct Got {
    trace: String,
    id: String,
    parent: Option<String>,
    name: String,
    kind: String,
    tags: BTreeMap<String, String>,
    /// OTLP's W3C sampled flag and remote-parent bit; Zipkin: none.
    flags: Option<u32>,
    error: bool,
    /// The resource's attribute keys (OTLP).
    resource: BTreeSet<String>,
}

type Spans = Arc<Mutex<Vec<Got>>>;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_otlp(req: &ExportTraceServiceRequest, out: &Spans) {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    let mut spans = out.lock().unwrap_or_else(|p| p.into_inner());
    for rs in &req.resource_spans {
        let resource: BTreeSet<String> = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter().map(|a| a.key.clone()))
            .collect();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                let tags = s
                    .attributes
                    .iter()
                    .map(|a| {
                        let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(V::StringValue(s)) => s.clone(),
                            other => format!("{other:?}"),
                        };
                        (a.key.clone(), v)
                    })
                    .collect();
                spans.push(Got {
                    trace: hex(&s.trace_id),
                    id: hex(&s.span_id),
                    parent: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    name: s.name.clone(),
                    kind: match s.kind {
                        2 => "SERVER".into(),
                        3 => "CLIENT".into(),
                        k => format!("kind {k}"),
                    },
                    tags,
                    flags: Some(s.flags),
                    error: s.status.as_ref().is_some_and(|st| st.code == 2),
                    resource: resource.clone(),
                });
            }
        }
    }
}

fn from_zipkin(body: &[u8], out: &Spans) {
    let Ok(Value::Array(list)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let mut spans = out.lock().unwrap_or_else(|p| p.into_inner());
    for s in list {
        let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
        let tags = s["tags"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        spans.push(Got {
            trace: text("traceId"),
            id: text("id"),
            parent: s["parentId"].as_str().map(str::to_string),
            name: text("name"),
            kind: text("kind"),
            tags,
            flags: None,
            error: false,
            resource: s["localEndpoint"]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default(),
        });
    }
}

#[tonic::async_trait]
impl TraceService for OtlpSink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        from_otlp(req.get_ref(), &self.0);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

struct OtlpSink(Spans);

/// An OTLP/gRPC collector on a runtime of its own.
fn grpc_collector(port: u16, spans: Spans) -> Result<()> {
    let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
    l.set_nonblocking(true)?;
    thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                return;
            };
            let incoming = tonic::transport::server::TcpIncoming::from(l);
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(TraceServiceServer::new(OtlpSink(spans)), incoming)
                .await;
        });
    });
    Ok(())
}

/// How an HTTP collector treats requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Collector {
    /// Takes OTLP/HTTP protobuf or Zipkin JSON bodies.
    Store,
    /// Reads the request and never answers.
    Hang,
}

fn read_body(r: &mut BufReader<TcpStream>, head: &str) -> Result<Vec<u8>> {
    let lower = head.to_ascii_lowercase();
    if lower.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)?;
            if n == 0 {
                r.read_line(&mut line)?;
                return Ok(body);
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let len = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// An HTTP collector: OTLP/HTTP (protobuf) and Zipkin (JSON) by content type.
fn http_collector(port: u16, spans: Spans, mode: Collector) -> Result<()> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            let spans = spans.clone();
            thread::spawn(move || -> Result<()> {
                let mut w = conn.try_clone()?;
                let mut r = BufReader::new(conn);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line)? == 0 {
                            return Ok(());
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let body = read_body(&mut r, &head)?;
                    if mode == Collector::Hang {
                        thread::sleep(Duration::from_secs(3600));
                    }
                    if head.to_ascii_lowercase().contains("application/json") {
                        from_zipkin(&body, &spans);
                    } else if let Ok(req) = ExportTraceServiceRequest::decode(body.as_slice()) {
                        from_otlp(&req, &spans);
                    }
                    w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
                }
            });
        }
    });
    Ok(())
}

// ------------------------------------------------------------------------------ config

const OTEL: &str = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig";
const ZIPKIN: &str = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    OtlpGrpc,
    OtlpHttp,
    Zipkin,
}

struct Ports {
    out: u16,
    inb: u16,
    backend: u16,
    grpc: u16,
    http: u16,
}

fn provider(t: Tracer, collector_port: u16) -> Value {
    match t {
        Tracer::OtlpGrpc => json!({"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": OTEL, "service_name": "web",
            "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "1s"}}}),
        Tracer::OtlpHttp => json!({"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": OTEL, "service_name": "web",
            "http_service": {"http_uri": {"uri": format!("http://127.0.0.1:{collector_port}/v1/traces"),
                "cluster": "otlp-http", "timeout": "1s"}}}}),
        Tracer::Zipkin => json!({"name": "envoy.tracers.zipkin", "typed_config": {
            "@type": ZIPKIN, "collector_cluster": "otlp-http",
            "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON",
            "trace_id_128bit": true, "shared_span_context": false}}),
    }
}

fn hcm(prefix: &str, routes: Value, tracing: Value) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": prefix,
            "tracing": tracing,
            "route_config": {"name": prefix, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    })
}

fn config(t: Tracer, p: &Ports, random_sampling: f64, collector_port: u16) -> Value {
    let prov = provider(t, collector_port);
    let out_tracing = json!({
        "provider": prov,
        "random_sampling": {"value": random_sampling},
        "custom_tags": [
            {"tag": "lit", "literal": {"value": "v"}},
            {"tag": "hdr", "request_header": {"name": "x-tag", "default_value": "none"}},
            {"tag": "env", "environment": {"name": "FERRY_TRACE_TEST_NONE", "default_value": "d"}},
        ],
    });
    // Istio's dry-run tags: the RBAC filter's shadow verdict, from the request's metadata.
    let dry_run = |tag: &str, key: &str| {
        json!({"tag": tag, "metadata": {"kind": {"request": {}},
            "metadata_key": {"key": "envoy.filters.http.rbac", "path": [{"key": key}]}}})
    };
    let in_tracing = json!({"provider": prov, "spawn_upstream_span": true,
    "random_sampling": {"value": random_sampling},
    "custom_tags": [
        dry_run("istio.authorization.dry_run.deny_policy.name", "istio_dry_run_deny_shadow_effective_policy_id"),
        dry_run("istio.authorization.dry_run.deny_policy.result", "istio_dry_run_deny_shadow_engine_result"),
    ]});
    let out_routes = json!([
        {"match": {"prefix": "/dec/"}, "decorator": {"operation": "my-op"}, "route": {"cluster": "inbound"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "inbound"}},
    ]);
    let in_routes = json!([{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]);
    let mut out = listener(
        "out",
        p.out,
        vec![json!({"filters": [hcm("out", out_routes, out_tracing)]})],
    );
    out["traffic_direction"] = json!("OUTBOUND");
    let mut in_hcm = hcm("in", in_routes, in_tracing);
    let shadow = json!({"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "shadow_rules": {"action": "DENY", "policies": {"ns[default]-policy[dry]-rule[0]": {
            "permissions": [{"url_path": {"path": {"prefix": "/dec/"}}}],
            "principals": [{"any": true}]}}},
        "shadow_rules_stat_prefix": "istio_dry_run_deny_"}});
    if let Some(filters) = in_hcm["typed_config"]["http_filters"].as_array_mut() {
        filters.insert(0, shadow);
    }
    let mut inb = listener("in", p.inb, vec![json!({"filters": [in_hcm]})]);
    inb["traffic_direction"] = json!("INBOUND");
    let doc = Bootstrap::new()
        .listener(out)
        .listener(inb)
        .cluster(static_cluster("inbound", &[p.inb], Upstream::Http1))
        .cluster(static_cluster("backend", &[p.backend], Upstream::Http1))
        .cluster(static_cluster("otlp", &[p.grpc], Upstream::Http2))
        .cluster(static_cluster(
            "otlp-http",
            &[collector_port],
            Upstream::Http1,
        ))
        .render();
    let mut v: Value = serde_json::from_str(&doc).unwrap_or(Value::Null);
    // Flush at once (Envoy's runtime keys, which Ferry reads from the same layer).
    v["layered_runtime"] = json!({"layers": [{"name": "static", "static_layer": {
        "tracing.opentelemetry.flush_interval_ms": 50, "tracing.opentelemetry.min_flush_spans": 1,
        "tracing.zipkin.flush_interval_ms": 50, "tracing.zipkin.min_flush_spans": 1}}]});
    v
}

// ------------------------------------------------------------------------------ requests

/// One request: its path, extra curl arguments, and whether spans are expected.
struct Case {
    path: &'static str,
    args: Vec<String>,
    sampled: bool,
}

fn cases(t: Tracer) -> Vec<Case> {
    let parent = |sampled: bool| -> Vec<String> {
        match t {
            Tracer::Zipkin => vec![
                "-H".into(),
                format!(
                    "b3: 0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{}",
                    u8::from(sampled)
                ),
            ],
            _ => vec![
                "-H".into(),
                format!(
                    "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0{}",
                    u8::from(sampled)
                ),
                "-H".into(),
                "tracestate: k=v".into(),
            ],
        }
    };
    let mut with_parent = parent(true);
    with_parent.extend(["-H".to_string(), "x-tag: hello".to_string()]);
    vec![
        Case {
            path: "/fresh/1",
            args: vec![],
            sampled: true,
        },
        Case {
            path: "/dec/2",
            args: with_parent,
            sampled: true,
        },
        Case {
            path: "/unsampled/3",
            args: parent(false),
            sampled: false,
        },
        Case {
            path: "/status/503",
            args: vec![],
            sampled: true,
        },
    ]
}

/// The trace headers and request id the backend received for each case.
fn run_cases(t: Tracer, port: u16) -> Result<Vec<BTreeMap<String, String>>> {
    let mut seen = Vec::new();
    for c in cases(t) {
        let url = format!("http://127.0.0.1:{port}{}", c.path);
        let mut args: Vec<&str> = vec!["-s"];
        args.extend(c.args.iter().map(String::as_str));
        args.push(&url);
        let out = curl(&args)?;
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let headers: BTreeMap<String, String> = doc["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| {
                Some((
                    h[0].as_str()?.to_ascii_lowercase(),
                    h[1].as_str()?.to_string(),
                ))
            })
            .filter(|(k, _)| {
                k.starts_with("x-b3")
                    || k == "b3"
                    || k.starts_with("trace")
                    || k == "x-request-id"
                    || k == "x-envoy-decorator-operation"
            })
            .collect();
        seen.push(headers);
    }
    Ok(seen)
}

/// What the backend saw, without the ids that differ from run to run.
fn propagation_shape(seen: &[BTreeMap<String, String>]) -> Vec<BTreeMap<String, String>> {
    seen.iter()
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    let v = match k.as_str() {
                        // The trace reason of the request id, Envoy's 15th character.
                        "x-request-id" => format!("reason {}", &v[14..15]),
                        "traceparent" => {
                            let parts: Vec<&str> = v.split('-').collect();
                            format!(
                                "{} {} trace {}",
                                parts.first().unwrap_or(&""),
                                parts.get(3).unwrap_or(&""),
                                if v.contains("0af7651916cd43dd8448eb211c80319c") {
                                    "kept"
                                } else {
                                    "new"
                                }
                            )
                        }
                        "x-b3-traceid" | "b3" if v.contains("0af7651916cd43dd8448eb211c80319c") => {
                            "kept".into()
                        }
                        "x-b3-traceid" | "b3" => "new".into(),
                        "x-b3-spanid" | "x-b3-parentspanid" => "id".into(),
                        _ => v.clone(),
                    };
                    (k.clone(), v)
                })
                .collect()
        })
        .collect()
}

/// Waits until `n` spans arrived (and no more for a moment).
fn collect(spans: &Spans, n: usize) -> Result<Vec<Got>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = spans.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if got.len() >= n {
            thread::sleep(Duration::from_millis(300));
            return Ok(spans.lock().unwrap_or_else(|p| p.into_inner()).clone());
        }
        if Instant::now() >= deadline {
            bail!("{} of {n} spans arrived: {got:#?}", got.len());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Tags whose values differ from run to run or between the two proxies.
const VOLATILE: &[&str] = &[
    "guid:x-request-id",
    "response_size",
    "upstream_address",
    "peer.address",
];

/// The spans of each case as a tree of (name, kind, tags, error), parents first;
/// ids become their place in the tree ("external" for the caller's).
fn tree(spans: &[Got], t: Tracer) -> Vec<String> {
    let mut out = Vec::new();
    for c in cases(t) {
        let Some(root) = spans.iter().find(|s| {
            s.kind == "CLIENT" && s.tags.get("http.url").is_some_and(|u| u.ends_with(c.path))
        }) else {
            out.push(format!("{}: no span", c.path));
            continue;
        };
        let mut lines = Vec::new();
        let mut stack = vec![(root, 0usize)];
        while let Some((s, depth)) = stack.pop() {
            let tags: Vec<String> = s
                .tags
                .iter()
                .map(|(k, v)| {
                    if VOLATILE.contains(&k.as_str()) {
                        k.clone()
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect();
            let parent = match (&s.parent, depth) {
                (None, _) => "root".to_string(),
                (Some(p), 0) if p == "b7ad6b7169203331" => "external caller".to_string(),
                (Some(_), 0) => "unknown parent".to_string(),
                (Some(_), _) => "child".to_string(),
            };
            let flags = s
                .flags
                .map(|f| format!(" flags={f:#x}"))
                .unwrap_or_default();
            lines.push(format!(
                "{}{} [{}] {parent}{flags} error={} trace={} tags={}",
                "  ".repeat(depth),
                s.name,
                s.kind,
                s.error,
                if s.trace == root.trace {
                    "same"
                } else {
                    "other"
                },
                tags.join(",")
            ));
            let mut children: Vec<&Got> = spans
                .iter()
                .filter(|x| x.parent.as_deref() == Some(s.id.as_str()) && x.trace == s.trace)
                .collect();
            children.sort_by_key(|x| (x.kind.clone(), x.name.clone()));
            for ch in children.into_iter().rev() {
                stack.push((ch, depth + 1));
            }
        }
        out.push(format!("{}:\n{}", c.path, lines.join("\n")));
    }
    out
}

struct Observed {
    propagation: Vec<BTreeMap<String, String>>,
    tree: Vec<String>,
    resource: BTreeSet<String>,
}

/// Runs the cases through one proxy; `start` starts it on the configuration.
fn observe(
    t: Tracer,
    p: &Ports,
    spans: &Spans,
    start: &dyn Fn() -> Result<Box<dyn std::any::Any>>,
) -> Result<Observed> {
    spans.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let proxy = start()?;
    let seen = run_cases(t, p.out)?;
    // Sampled cases: egress, ingress and the upstream attempt of ingress.
    let expected = cases(t).iter().filter(|c| c.sampled).count() * 3;
    let got = collect(spans, expected)?;
    drop(proxy);
    let resource = got.iter().flat_map(|s| s.resource.clone()).collect();
    Ok(Observed {
        propagation: propagation_shape(&seen),
        tree: tree(&got, t),
        resource,
    })
}

fn differential(t: Tracer) -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let p = Ports {
        out: free_port(),
        inb: free_port(),
        backend: app.port,
        grpc: free_port(),
        http: free_port(),
    };
    let spans: Spans = Arc::default();
    grpc_collector(p.grpc, spans.clone())?;
    http_collector(p.http, spans.clone(), Collector::Store)?;
    let cfg = config(t, &p, 100.0, p.http);
    let text = serde_json::to_string(&cfg)?;
    let ferry = observe(t, &p, &spans, &|| {
        Ok(Box::new(Ferry::start(&text)?) as Box<dyn std::any::Any>)
    })?;
    // Ferry on its own: a new trace per fresh request, the caller's kept, an
    // unsampled parent's spans not exported, and request ids marked as sampled.
    let tree = ferry.tree.join("\n");
    assert!(
        tree.contains("/dec/2:\nmy-op [CLIENT] external caller"),
        "{tree}"
    );
    assert!(
        tree.contains("\n  my-op [SERVER] child"),
        "decorator propagated: {tree}"
    );
    assert!(
        tree.contains("router backend egress [CLIENT] child"),
        "{tree}"
    );
    assert!(tree.contains("/unsampled/3: no span"), "{tree}");
    assert!(
        tree.contains(
            "istio.authorization.dry_run.deny_policy.name=ns[default]-policy[dry]-rule[0]"
        ),
        "{tree}"
    );
    assert!(
        tree.contains("istio.authorization.dry_run.deny_policy.result=denied"),
        "{tree}"
    );
    assert_eq!(ferry.propagation[0]["x-request-id"], "reason 9");
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let envoy = observe(t, &p, &spans, &|| {
        Ok(
            Box::new(Envoy::start(&bin, &cfg, p.out).context("starting Envoy")?)
                as Box<dyn std::any::Any>,
        )
    })?;
    assert_eq!(
        ferry.propagation, envoy.propagation,
        "what the backend saw (Ferry, Envoy)"
    );
    for (f, e) in ferry.tree.iter().zip(&envoy.tree) {
        assert_eq!(f, e, "spans (Ferry, Envoy)");
    }
    assert_eq!(ferry.resource, envoy.resource, "resource attributes");
    Ok(())
}

#[test]
fn otlp_grpc_spans_match_envoy() -> Result<()> {
    differential(Tracer::OtlpGrpc)
}

#[test]
fn otlp_http_spans_match_envoy() -> Result<()> {
    differential(Tracer::OtlpHttp)
}

#[test]
fn zipkin_spans_match_envoy() -> Result<()> {
    differential(Tracer::Zipkin)
}

/// A collector that is down, or never answers, costs requests nothing: they all succeed
/// while the spans are counted as failed or dropped (the queue is bounded).
#[test]
fn slow_or_dead_collectors_never_hold_requests() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let hang = free_port();
    let p = Ports {
        out: free_port(),
        inb: free_port(),
        backend: app.port,
        grpc: free_port(),
        http: hang,
    };
    http_collector(hang, Arc::default(), Collector::Hang)?;
    for (label, collector_port) in [("hanging", hang), ("dead", free_port())] {
        let mut cfg = config(Tracer::OtlpHttp, &p, 100.0, collector_port);
        // A small span queue, so that it fills.
        for l in cfg["static_resources"]["listeners"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            l["filter_chains"][0]["filters"][0]["typed_config"]["tracing"]["provider"]["typed_config"]
                ["max_cache_size"] = json!(4);
        }
        let ferry = Ferry::start(&serde_json::to_string(&cfg)?)?;
        for i in 0..40 {
            let url = format!("http://127.0.0.1:{}/bytes/{i}", p.out);
            let out = curl(&[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                &url,
            ])?;
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "200",
                "{label} collector: request {i}"
            );
        }
        thread::sleep(Duration::from_millis(500));
        let stats = ferry.stats()?;
        let dropped = stats
            .get("tracing.opentelemetry.spans_dropped")
            .copied()
            .unwrap_or(0);
        let failed = stats
            .get("tracing.opentelemetry.reports_failed")
            .copied()
            .unwrap_or(0);
        assert!(dropped + failed > 0, "{label} collector: {stats:?}");
        assert_eq!(
            stats
                .get("tracing.opentelemetry.spans_sent")
                .copied()
                .unwrap_or(0),
            0,
            "{label}"
        );
    }
    Ok(())
}

/// Sampling at 0 %: requests carry a request id marked as not traced, their context goes
/// on unsampled, and nothing is exported.
#[test]
fn zero_sampling_exports_nothing() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let p = Ports {
        out: free_port(),
        inb: free_port(),
        backend: app.port,
        grpc: free_port(),
        http: free_port(),
    };
    let spans: Spans = Arc::default();
    http_collector(p.http, spans.clone(), Collector::Store)?;
    let cfg = config(Tracer::OtlpHttp, &p, 0.0, p.http);
    let ferry = Ferry::start(&serde_json::to_string(&cfg)?)?;
    let url = format!("http://127.0.0.1:{}/x", p.out);
    let out = curl(&["-s", &url])?;
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    let header = |n: &str| {
        doc["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h[0].as_str().is_some_and(|k| k.eq_ignore_ascii_case(n)))
            .and_then(|h| h[1].as_str())
            .map(str::to_string)
    };
    let id = header("x-request-id").context("no request id")?;
    assert_eq!(&id[14..15], "4", "{id}");
    let tp = header("traceparent").context("no traceparent")?;
    assert!(tp.ends_with("-00"), "{tp}");
    thread::sleep(Duration::from_millis(500));
    assert!(spans.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
    assert_eq!(ferry.stat("http.out.tracing.not_traceable"), 1);
    Ok(())
}
