//! One distributed trace across every hop of a mesh in the netns bed, configured the way
//! istiod configures it: meshConfig defines an OpenTelemetry provider (OTLP/gRPC to a
//! collector Service), a root-namespace Telemetry resource turns tracing on at 100 %, and
//! ferry-pilot translates both for an ingress gateway (`ferry gateway`) and two Ferry
//! sidecars. An outside client calls the gateway, which routes to `frontend`; frontend's
//! app calls `backend` through its own sidecar, passing the trace headers on as bookinfo's
//! services do. The collector, an OTLP receiver in its own pod, must get one trace: the
//! gateway's server span (the root) and its upstream span, frontend's inbound server span,
//! frontend's outbound client span, backend's inbound server span, each the child of the
//! one before, with Envoy's span names (the route's decorator, `host:port/*`) and tags.

use std::time::Duration;

use anyhow::{Result, ensure};
use ferry_tests::istio::{App, IstioMesh, Proxy, Workload, curl};
use ferry_tests::otlp::{Collector, Span};

const FRONTEND_VIP: &str = "10.96.1.10";
const BACKEND_VIP: &str = "10.96.1.20";
const OTEL_VIP: &str = "10.96.9.2";
const FRONTEND: &str = "frontend.default.svc.cluster.local";
const BACKEND: &str = "backend.default.svc.cluster.local";

const MESH_CONFIG: &str = "extensionProviders:
- name: otel
  opentelemetry: {service: otel.observability.svc.cluster.local, port: 4317}
";

const ISTIO: &str = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 100
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: front, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ['*']}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: default}
spec:
  hosts: ['*']
  gateways: [front]
  http: [{route: [{destination: {host: frontend, port: {number: 8080}}}]}]
";

fn workloads() -> Vec<Workload> {
    let w = |name, injected, namespace, runs| Workload {
        name,
        namespace,
        app: name,
        version: "v1",
        service_account: name,
        injected,
        runs,
    };
    vec![
        w("frontend", true, "default", App::Http(8080)),
        w("backend", true, "default", App::Http(8080)),
        // The collector's pod: no sidecar, the test serves OTLP in its namespace.
        w("collector", false, "observability", App::None),
    ]
}

fn objects(ips: &[(&str, std::net::Ipv4Addr)]) -> String {
    let ip = |n: &str| {
        ips.iter()
            .find(|(w, _)| *w == n)
            .map(|(_, ip)| ip.to_string())
            .unwrap_or_default()
    };
    let pod = |name: &str, ns: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}, version: v1}}}}\n\
             spec: {{serviceAccountName: {name}, containers: [{{name: app, image: echo}}]}}\nstatus: {{podIP: {}}}\n---\n",
            ip(name)
        )
    };
    let svc = |name: &str, ns: &str, vip: &str, app: &str, port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: {app}}}, ports: [{port}]}}\n---\n"
        )
    };
    let http = "{name: http, port: 8080, targetPort: 8080}";
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio-injection: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: observability}}\n---\n\
         {}{}{}{}{}{}",
        svc("frontend", "default", FRONTEND_VIP, "frontend", http),
        svc("backend", "default", BACKEND_VIP, "backend", http),
        svc(
            "otel",
            "observability",
            OTEL_VIP,
            "collector",
            "{name: grpc, port: 4317, targetPort: 4317}"
        ),
        pod("frontend", "default"),
        pod("backend", "default"),
        pod("collector", "observability"),
    )
}

/// One line per span for failure messages.
fn show(spans: &[Span]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} [{}] id={} parent={:?} {:?}",
                s.trace, s.name, s.kind, s.id, s.parent, s.tags
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn one_trace_across_gateway_and_two_sidecars() -> Result<()> {
    let Some(mut m) =
        IstioMesh::start_with_mesh_config(Proxy::Ferry, &workloads(), objects, MESH_CONFIG)?
    else {
        return Ok(());
    };
    let listener = m
        .pod("collector")
        .enter(|| std::net::TcpListener::bind(("0.0.0.0", 4317)))??;
    let collector = Collector::serve(listener)?;
    let file = m.dir().join("trace.yaml");
    std::fs::write(&file, ISTIO)?;
    m.apply(&[&file])?;
    let gw = m.add_gateway(
        "ingressgateway",
        "istio-system",
        &[("istio", "ingressgateway"), ("app", "istio-ingressgateway")],
    )?;
    let client = m.add_client("outside")?;

    // The frontend's app calls the backend service through its sidecar.
    let url = format!("http://{gw}:8080/call/{BACKEND_VIP}/8080/hello");
    let (_, body) = m.until(
        "the chain gateway → frontend → backend never answered",
        Duration::from_secs(30),
        || curl(&client, &url, &[]),
        |(code, body)| *code == 200 && body.contains("\"status\": 200"),
    )?;
    ensure!(body.contains("\"name\": \"backend\""), "{body}");

    // Earlier attempts while the configuration arrived may have left traces too: the
    // last request's is the one whose root span is the newest.
    let want_spans = |spans: &[Span]| {
        let Some(root) = spans.iter().rev().find(|s| s.parent.is_none()) else {
            return false;
        };
        spans.iter().filter(|s| s.trace == root.trace).count() >= 5
    };
    let all = collector.wait(Duration::from_secs(20), want_spans)?;
    let root = all
        .iter()
        .rev()
        .find(|s| s.parent.is_none())
        .cloned()
        .expect("checked by wait");
    let trace: Vec<Span> = all
        .iter()
        .filter(|s| s.trace == root.trace)
        .cloned()
        .collect();
    let dump = show(&all);
    ensure!(
        trace.len() == 5,
        "five spans expected in one trace:\n{dump}"
    );

    // Follow the parent links from the root: each span has exactly one child.
    let child = |of: &Span| -> Result<Span> {
        let kids: Vec<&Span> = trace
            .iter()
            .filter(|s| s.parent.as_deref() == Some(of.id.as_str()))
            .collect();
        ensure!(
            kids.len() == 1,
            "{} [{}] should have one child:\n{dump}",
            of.name,
            of.kind
        );
        Ok(kids[0].clone())
    };
    // The gateway's connection manager span: istiod marks gateway listeners OUTBOUND,
    // so Envoy makes it a CLIENT span.
    let gw_server = root;
    let gw_client = child(&gw_server)?;
    let front_in = child(&gw_client)?;
    let front_out = child(&front_in)?;
    let back_in = child(&front_out)?;
    ensure!(
        trace
            .iter()
            .all(|s| s.parent.as_deref() != Some(back_in.id.as_str())),
        "the backend's span is the last:\n{dump}"
    );

    // Envoy's span kinds and names: a connection manager's span is named after the
    // route's decorator (`host:port/*`) and is a CLIENT span on outbound listeners
    // (gateways' included: istiod marks their listeners OUTBOUND), a SERVER span on
    // inbound ones; the gateway's upstream span is `router <cluster> egress`.
    let front_op = format!("{FRONTEND}:8080/*");
    let back_op = format!("{BACKEND}:8080/*");
    let hops = [&gw_server, &gw_client, &front_in, &front_out, &back_in];
    let shape: Vec<(&str, &str)> = hops
        .iter()
        .map(|s| (s.kind.as_str(), s.name.as_str()))
        .collect();
    let gw_upstream = format!("router outbound|8080||{FRONTEND} egress");
    let expect = [
        ("CLIENT", front_op.as_str()),
        ("CLIENT", gw_upstream.as_str()),
        ("SERVER", front_op.as_str()),
        ("CLIENT", back_op.as_str()),
        ("SERVER", back_op.as_str()),
    ];
    ensure!(shape == expect, "span kinds and names {shape:?}:\n{dump}");

    // Each span comes from the proxy it should (the resource's service name is the
    // node's cluster, as Envoy's OpenTelemetry tracer names it).
    let service: Vec<&str> = hops
        .iter()
        .map(|s| s.resource.get("service.name").map_or("", String::as_str))
        .collect();
    ensure!(
        service
            == [
                "ingressgateway.istio-system",
                "ingressgateway.istio-system",
                "frontend.default",
                "frontend.default",
                "backend.default",
            ],
        "service names {service:?}:\n{dump}"
    );

    // Key tags as Envoy sets them.
    let tag = |s: &Span, k: &str| s.tags.get(k).cloned().unwrap_or_default();
    for s in hops {
        ensure!(
            tag(s, "http.status_code") == "200" && tag(s, "response_flags") == "-",
            "{} [{}]: status:\n{dump}",
            s.name,
            s.kind
        );
    }
    for (s, url) in [
        (
            &gw_server,
            format!("http://{}:8080/call/{BACKEND_VIP}/8080/hello", gw),
        ),
        (
            &front_in,
            format!("http://{}:8080/call/{BACKEND_VIP}/8080/hello", gw),
        ),
        (&front_out, format!("http://{BACKEND_VIP}:8080/hello")),
        (&back_in, format!("http://{BACKEND_VIP}:8080/hello")),
    ] {
        ensure!(
            tag(s, "http.method") == "GET" && tag(s, "http.url") == url,
            "{} [{}]: method and url (want {url}):\n{dump}",
            s.name,
            s.kind
        );
    }
    let clusters: Vec<String> = hops.iter().map(|s| tag(s, "upstream_cluster")).collect();
    let outbound = |host: &str| format!("outbound|8080||{host}");
    ensure!(
        clusters
            == [
                outbound(FRONTEND),
                outbound(FRONTEND),
                "inbound|8080||".to_string(),
                outbound(BACKEND),
                "inbound|8080||".to_string(),
            ],
        "upstream_cluster tags {clusters:?}:\n{dump}"
    );
    // Istio's service tags (istiod's `buildServiceTags`: the proxy's namespace), and
    // one request id along the whole chain: the gateway made it, every hop kept it.
    let namespaces: Vec<String> = hops.iter().map(|s| tag(s, "istio.namespace")).collect();
    ensure!(
        namespaces[0] == "istio-system"
            && namespaces[2..].iter().all(|n| n == "default")
            && hops
                .iter()
                .all(|s| !tag(s, "istio.canonical_service").is_empty()),
        "istio tags {namespaces:?}:\n{dump}"
    );
    let id = tag(&gw_server, "guid:x-request-id");
    ensure!(
        !id.is_empty()
            && [&front_in, &front_out, &back_in]
                .iter()
                .all(|s| tag(s, "guid:x-request-id") == id),
        "request id across the hops:\n{dump}"
    );
    Ok(())
}
