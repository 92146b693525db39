//! Traces and access logs as istiod configures them: the Telemetry API (root namespace,
//! namespace and workload levels, client and server modes), `meshConfig.defaultProviders`,
//! and meshConfig's legacy settings, translated for a sidecar and a gateway; the refusals
//! of what the translation does not implement. `istio_envoy.rs` has Envoy accept the same.

use std::path::Path;

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log_filter};
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, ZipkinConfig, tracing::http};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::Tracing,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::r#type::tracing::v3::custom_tag;
use ferry_pilot::istio::source::{Snapshot, parse_documents};
use ferry_pilot::istio::translate::{Mesh, MeshOptions, NodeType, Proxy, ProxyConfig};
use ferry_pilot::istio::types::mesh::MeshConfig;
use ferry_pilot::istio::validate::{validate, validate_telemetry_providers};
use prost::{Message, Name};

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: productpage}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: 10.96.0.11
  selector: {app: db}
  ports: [{name: tcp, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-1, namespace: default, labels: {app: productpage, service.istio.io/canonical-name: productpage}}
spec: {serviceAccountName: productpage}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: zipkin, namespace: istio-system}
spec:
  clusterIP: 10.96.9.1
  ports: [{name: http, port: 9411}]
---
apiVersion: v1
kind: Service
metadata: {name: otel, namespace: istio-system}
spec:
  clusterIP: 10.96.9.2
  ports: [{name: grpc, port: 4317}, {name: http, port: 4318}]
"#;

const MESH: &str = r#"
accessLogFile: /dev/stdout
extensionProviders:
- name: otel
  opentelemetry: {service: otel.istio-system.svc.cluster.local, port: 4317, maxTagLength: 99}
- name: otel-http
  opentelemetry:
    service: otel.istio-system.svc.cluster.local
    port: 4318
    http: {path: /v1/traces, timeout: 3s, headers: [{name: x-token, value: t}]}
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
- name: json-log
  envoyFileAccessLog:
    path: /tmp/access.json
    logFormat: {labels: {code: "%RESPONSE_CODE%", path: "%REQ(:PATH)%"}}
- name: datadog
  datadog: {service: dd.istio-system.svc.cluster.local, port: 8126}
"#;

/// Root namespace: OTLP tracing at 10 % with a literal tag, and the `envoy` access log;
/// namespace `default`: the JSON log too, but not on the server side; the productpage
/// workload: Zipkin for its server side at 50 %.
const TELEMETRY: &str = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 10
    customTags:
      team: {literal: {value: shop}}
      user: {header: {name: x-user, defaultValue: none}}
  accessLogging:
  - providers: [{name: envoy}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: ns, namespace: default}
spec:
  accessLogging:
  - providers: [{name: envoy}, {name: json-log}]
  - match: {mode: SERVER}
    providers: [{name: json-log}]
    disabled: true
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: productpage, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  tracing:
  - match: {mode: SERVER}
    providers: [{name: zipkin}]
    randomSamplingPercentage: 50
"#;

fn snapshot(extra: &str) -> Snapshot {
    let mut snap = parse_documents(WORKLOADS, Path::new("workloads.yaml"));
    let more = parse_documents(extra, Path::new("telemetry.yaml"));
    assert!(more.errors.is_empty(), "{:?}", more.errors);
    snap.resources.extend(more.resources);
    snap
}

fn options(mesh: &str) -> MeshOptions {
    let cfg: MeshConfig = serde_yaml_ng::from_str(mesh).expect("mesh config");
    MeshOptions::from_mesh_config(&cfg)
}

fn sidecar() -> Proxy {
    Proxy {
        id: "sidecar~10.0.0.5~productpage-1.default~default.svc.cluster.local".into(),
        namespace: "default".into(),
        labels: [
            ("app", "productpage"),
            ("service.istio.io/canonical-name", "productpage"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ips: vec!["10.0.0.5".into()],
        cluster: "productpage.default".into(),
        ..Default::default()
    }
}

fn config(snap: &Snapshot, options: MeshOptions, proxy: &Proxy) -> ProxyConfig {
    Mesh::new(snap, options).proxy_config(proxy)
}

fn listener(cfg: &ProxyConfig, inbound: bool) -> &Listener {
    cfg.listeners
        .iter()
        .find(|l| {
            (l.traffic_direction == TrafficDirection::Inbound as i32) == inbound
                && l.filter_chains
                    .iter()
                    .any(|c| !hcms(c.filters.iter()).is_empty())
        })
        .expect("listener with a connection manager")
}

fn hcms<'a>(
    filters: impl Iterator<Item = &'a envoy_types::pb::envoy::config::listener::v3::Filter>,
) -> Vec<HttpConnectionManager> {
    filters
        .filter_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(t))
                if t.type_url == HttpConnectionManager::type_url() =>
            {
                HttpConnectionManager::decode(t.value.as_slice()).ok()
            }
            _ => None,
        })
        .collect()
}

fn first_hcm(l: &Listener) -> HttpConnectionManager {
    l.filter_chains
        .iter()
        .flat_map(|c| hcms(c.filters.iter()))
        .next()
        .expect("connection manager")
}

fn tcp_proxies(cfg: &ProxyConfig) -> Vec<TcpProxy> {
    cfg.listeners
        .iter()
        .flat_map(|l| l.filter_chains.iter().flat_map(|c| c.filters.iter()))
        .filter_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(t)) if t.type_url == TcpProxy::type_url() => {
                TcpProxy::decode(t.value.as_slice()).ok()
            }
            _ => None,
        })
        .collect()
}

fn log_paths(logs: &[AccessLog]) -> Vec<String> {
    use envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
    logs.iter()
        .filter_map(|l| match &l.config_type {
            Some(
                envoy_types::pb::envoy::config::accesslog::v3::access_log::ConfigType::TypedConfig(
                    t,
                ),
            ) => FileAccessLog::decode(t.value.as_slice())
                .ok()
                .map(|f| f.path),
            _ => None,
        })
        .collect()
}

fn tag_names(t: &Tracing) -> Vec<&str> {
    t.custom_tags.iter().map(|c| c.tag.as_str()).collect()
}

#[test]
fn telemetry_levels_and_modes_as_istiod() {
    let snap = snapshot(TELEMETRY);
    let opts = options(MESH);
    let cfg = config(&snap, opts, &sidecar());

    // Client side (outbound): the root namespace's OTLP tracer at 10 %.
    let out = first_hcm(listener(&cfg, false));
    let t = out.tracing.as_ref().expect("outbound tracing");
    let p = t.provider.as_ref().expect("provider");
    assert_eq!(p.name, "envoy.tracers.opentelemetry");
    let Some(http::ConfigType::TypedConfig(any)) = &p.config_type else {
        panic!("typed config")
    };
    let otel = OpenTelemetryConfig::decode(any.value.as_slice()).expect("otel");
    assert_eq!(otel.service_name, "productpage.default");
    let grpc = otel.grpc_service.expect("grpc");
    assert!(format!("{grpc:?}").contains("outbound|4317||otel.istio-system.svc.cluster.local"));
    assert_eq!(t.random_sampling.as_ref().map(|p| p.value), Some(10.0));
    assert_eq!(t.client_sampling.as_ref().map(|p| p.value), Some(100.0));
    assert_eq!(t.max_path_tag_length.as_ref().map(|v| v.value), Some(99));
    assert!(
        t.spawn_upstream_span.is_none(),
        "sidecars do not spawn upstream spans"
    );
    assert_eq!(
        tag_names(t),
        [
            "istio.authorization.dry_run.allow_policy.name",
            "istio.authorization.dry_run.allow_policy.result",
            "istio.authorization.dry_run.deny_policy.name",
            "istio.authorization.dry_run.deny_policy.result",
            "istio.canonical_revision",
            "istio.canonical_service",
            "istio.cluster_id",
            "istio.mesh_id",
            "istio.namespace",
            "team",
            "user",
        ]
    );
    let canonical = t
        .custom_tags
        .iter()
        .find(|c| c.tag == "istio.canonical_service")
        .and_then(|c| c.r#type.clone());
    assert_eq!(
        canonical,
        Some(custom_tag::Type::Literal(custom_tag::Literal {
            value: "productpage".into()
        }))
    );
    assert!(out.request_id_extension.is_some());

    // Server side (inbound): the workload's Zipkin at 50 %.
    let inb = first_hcm(listener(&cfg, true));
    let t = inb.tracing.as_ref().expect("inbound tracing");
    let p = t.provider.as_ref().expect("provider");
    assert_eq!(p.name, "envoy.tracers.zipkin");
    let Some(http::ConfigType::TypedConfig(any)) = &p.config_type else {
        panic!("typed config")
    };
    let z = ZipkinConfig::decode(any.value.as_slice()).expect("zipkin");
    let svc = z.collector_service.expect("collector service");
    let uri = svc.http_uri.expect("uri");
    assert_eq!(
        uri.uri,
        "http://zipkin.istio-system.svc.cluster.local/api/v2/spans"
    );
    assert!(z.trace_id_128bit);
    assert_eq!(t.random_sampling.as_ref().map(|p| p.value), Some(50.0));

    // Access logs: the namespace's providers on the client side (the root's `envoy` one
    // with meshConfig's format, and the JSON one), only `envoy` on the server side; the
    // listeners have them with the NR filter; TCP proxies too.
    assert_eq!(
        log_paths(&out.access_log),
        ["/dev/stdout", "/tmp/access.json"]
    );
    assert_eq!(log_paths(&inb.access_log), ["/dev/stdout"]);
    let l = listener(&cfg, false);
    assert_eq!(log_paths(&l.access_log).len(), 2);
    assert!(l.access_log.iter().all(|a| matches!(
        a.filter.as_ref().and_then(|f| f.filter_specifier.as_ref()),
        Some(access_log_filter::FilterSpecifier::ResponseFlagFilter(r)) if r.flags == ["NR"]
    )));
    assert!(
        tcp_proxies(&cfg).iter().any(|t| !t.access_log.is_empty()),
        "TCP proxies log"
    );
}

#[test]
fn gateways_spawn_upstream_spans_and_default_providers_apply() {
    let snap = snapshot("");
    let mesh =
        format!("{MESH}defaultProviders: {{tracing: [otel-http], accessLogging: [json-log]}}\n");
    let gw = Proxy {
        node_type: NodeType::Router,
        id: "router~10.0.0.9~gw-1.istio-system~istio-system.svc.cluster.local".into(),
        namespace: "istio-system".into(),
        cluster: "istio-ingressgateway.istio-system".into(),
        ..Default::default()
    };
    let gateway = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
"#;
    let mut snap2 = snap.clone();
    snap2
        .resources
        .extend(parse_documents(gateway, Path::new("gw.yaml")).resources);
    let cfg = config(&snap2, options(&mesh), &gw);
    let hcm = first_hcm(cfg.listeners.first().expect("gateway listener"));
    let t = hcm.tracing.as_ref().expect("tracing");
    assert_eq!(t.spawn_upstream_span.as_ref().map(|b| b.value), Some(true));
    let Some(http::ConfigType::TypedConfig(any)) =
        t.provider.as_ref().and_then(|p| p.config_type.as_ref())
    else {
        panic!("provider")
    };
    let otel = OpenTelemetryConfig::decode(any.value.as_slice()).expect("otel");
    let svc = otel.http_service.expect("http service");
    assert_eq!(
        svc.http_uri.expect("uri").uri,
        "otel.istio-system.svc.cluster.local/v1/traces"
    );
    assert_eq!(svc.request_headers_to_add.len(), 1);
    // Sampling falls back to PILOT_TRACE_SAMPLING's 1 %.
    assert_eq!(t.random_sampling.as_ref().map(|p| p.value), Some(1.0));
    // The default access log provider replaces meshConfig's accessLogFile.
    assert_eq!(log_paths(&hcm.access_log), ["/tmp/access.json"]);
}

#[test]
fn legacy_mesh_settings_without_telemetry() {
    let snap = snapshot("");
    // istiod's default: tracing with the bootstrap's tracer at 1 %.
    let cfg = config(&snap, MeshOptions::default(), &sidecar());
    let hcm = first_hcm(listener(&cfg, false));
    let t = hcm.tracing.as_ref().expect("legacy tracing");
    assert!(t.provider.is_none());
    assert_eq!(t.random_sampling.as_ref().map(|p| p.value), Some(1.0));
    assert!(tag_names(t).contains(&"istio.canonical_service"));
    assert!(hcm.request_id_extension.is_none());
    assert!(hcm.access_log.is_empty());
    // defaultConfig.tracing and enableTracing: false.
    let cfg = config(
        &snap,
        options(
            "defaultConfig: {tracing: {sampling: 25, maxPathTagLength: 40, customTags: {dc: {environment: {name: DC, defaultValue: x}}}}}\n",
        ),
        &sidecar(),
    );
    let t = first_hcm(listener(&cfg, false)).tracing.expect("tracing");
    assert_eq!(t.random_sampling.as_ref().map(|p| p.value), Some(25.0));
    assert_eq!(t.max_path_tag_length.as_ref().map(|v| v.value), Some(40));
    assert!(tag_names(&t).contains(&"dc"));
    let cfg = config(&snap, options("enableTracing: false\n"), &sidecar());
    assert!(first_hcm(listener(&cfg, false)).tracing.is_none());
    // A Telemetry that disables span reporting.
    let off = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: off, namespace: default}
spec:
  tracing: [{providers: [{name: zipkin}], disableSpanReporting: true}]
"#;
    let cfg = config(&snapshot(off), options(MESH), &sidecar());
    assert!(first_hcm(listener(&cfg, false)).tracing.is_none());
}

#[test]
fn what_is_not_implemented_is_refused_by_name() {
    let bad = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: bad, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]
  tracing:
  - providers: [{name: datadog}]
    randomSamplingPercentage: 150
    useRequestIdForTraceSampling: false
    customTags: {f: {formatter: {value: "%REQ(x)%"}}}
  - providers: [{name: nope}]
  metrics:
  - overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]
  accessLogging:
  - providers: [{name: zipkin}]
    filter: {expression: "response.code >= 400"}
"#;
    let snap = snapshot(bad);
    let mut found: Vec<String> = validate(&snap)
        .into_iter()
        .chain(validate_telemetry_providers(&snap, &options(MESH)))
        .filter(|f| f.resource.as_ref().is_some_and(|r| r.kind == "Telemetry"))
        .map(|f| format!("{} {}", f.code.id(), f.field))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "IST0101 spec.tracing[1].providers[0].name",
            "IST0106 spec.accessLogging[0].filter",
            "IST0106 spec.accessLogging[0].providers[0].name",
            "IST0106 spec.metrics[0].overrides",
            "IST0106 spec.targetRef",
            "IST0106 spec.tracing[0].customTags.f.formatter",
            "IST0106 spec.tracing[0].providers[0].name",
            "IST0106 spec.tracing[0].randomSamplingPercentage",
            "IST0106 spec.tracing[0].useRequestIdForTraceSampling",
        ]
    );
    // An unknown field is a load error.
    let typo = parse_documents(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t}\nspec: {tracng: []}\n",
        Path::new("typo.yaml"),
    );
    assert_eq!(typo.errors.len(), 1, "{:?}", typo.errors);
    // Mesh defaults naming a provider of another kind.
    let o = options(&format!(
        "{MESH}defaultProviders: {{tracing: [datadog], accessLogging: [otel]}}\n"
    ));
    let problems = o.telemetry_problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("defaultProviders.tracing[0]"));
    assert!(problems[1].contains("only envoyFileAccessLog"));
}
