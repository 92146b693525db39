//! `ferry-pilot inject`: the sidecar injector's job (`istioctl kube-inject`,
//! the admission webhook's patch), done on YAML. Every pod template of a
//! Pod, Deployment, ReplicaSet, StatefulSet, DaemonSet, Job or CronJob gets
//! - the init container `istio-init` running `ferry iptables` (capture
//!   rules, Istio's defaults) with the network capabilities it needs,
//! - the sidecar container `istio-proxy` running `ferry sidecar` as uid
//!   1337 on a shared bootstrap (a ConfigMap per namespace, emitted once)
//!   whose node identity the downward API completes (`POD_NAME`,
//!   `POD_NAMESPACE`, `INSTANCE_IP`, `SERVICE_ACCOUNT`), with the mesh CA
//!   as its certificate source, readiness on 15021 and metrics on 15090,
//! - Istio's labels (`security.istio.io/tlsMode: istio`, the canonical
//!   service and revision) and the `sidecar.istio.io/status` annotation.
//!
//! - the `traffic.sidecar.istio.io/*` capture annotations as `ferry
//!   iptables` flags (include/exclude outbound IP ranges, include/exclude
//!   inbound ports, exclude outbound ports); the ones it has no flag for
//!   are refused, naming the annotation.
//!
//! A Pod's workload is named as Istio names it (its Deployment or other
//! controller), so a pod injected by the webhook ([`inject_pod`]) and the
//! same pod piped through `ferry-pilot inject` get the same patch.
//!
//! As Istio's injector: a template labelled or annotated
//! `sidecar.istio.io/inject: "false"` is left alone, and so is one already
//! injected (injecting twice changes nothing). Other documents pass through
//! unchanged.
//!
//! What istio-agent does beside Envoy is prepared here as Istio's injector
//! prepares it:
//! - the app's HTTP, TCP and gRPC liveness/readiness/startup probes (and
//!   HTTP/TCP `postStart`/`preStop` hooks) become HTTP GETs of
//!   `/app-health/<container>/livez|readyz|startupz` on the status port
//!   15020, the originals passed in `ISTIO_KUBE_APP_PROBERS`
//!   (`sidecar.istio.io/rewriteAppHTTPProbers: "false"` keeps them);
//! - the `prometheus.io/scrape|port|path` annotations move into
//!   `ISTIO_PROMETHEUS_ANNOTATIONS` and point at 15020's merged
//!   `/stats/prometheus` (`prometheus.istio.io/merge-metrics: "false"`
//!   keeps them);
//! - `proxy.istio.io/config`'s `holdApplicationUntilProxyStarts` puts the
//!   sidecar first with a `postStart` hook (`ferry wait`) that returns once
//!   it is ready, and its `proxyMetadata` become environment variables of
//!   the sidecar and the init container (`ISTIO_META_DNS_CAPTURE`,
//!   `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`, …);
//! - `sidecar.istio.io/nativeSidecar: "true"` (or `--native-sidecars`)
//!   makes the sidecar a Kubernetes native sidecar: an init container with
//!   `restartPolicy: Always` right after `istio-init`, a startup probe on
//!   15021 and a `preStop` drain, so it starts before the app and stops
//!   after it (Jobs complete).

use std::collections::BTreeSet;

use serde_yaml_ng::{Mapping, Value};

/// What the injected containers run and where they find the control plane.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    /// The `ferry` image for the sidecar.
    pub proxy_image: String,
    /// The image of the init container (`ferry iptables` with iptables).
    pub init_image: String,
    /// `host:port` of ferry-pilot's (or istiod's) xDS and CA port.
    pub discovery_address: String,
    /// The mesh default of `holdApplicationUntilProxyStarts`.
    pub hold_application_until_proxy_starts: bool,
    /// Make sidecars native sidecar containers unless a pod says otherwise.
    pub native_sidecars: bool,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            proxy_image: "ferry-proxy:latest".into(),
            init_image: "ferry-init:latest".into(),
            discovery_address: "ferry-pilot.istio-system.svc:15010".into(),
            hold_application_until_proxy_starts: false,
            native_sidecars: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {index}: {message}")]
    Yaml { index: usize, message: String },
    #[error("document {index} ({name}): {message}")]
    Workload {
        index: usize,
        name: String,
        message: String,
    },
}

/// The agent's status port, where rewritten probes and merged metrics go.
pub const STATUS_PORT: u16 = 15020;
/// Where the images put the binary (the `postStart`/`preStop` hooks exec it).
const FERRY: &str = "/usr/local/bin/ferry";
const PROXY_CONTAINER: &str = "istio-proxy";
const INIT_CONTAINER: &str = "istio-init";

const INJECT: &str = "sidecar.istio.io/inject";
const STATUS: &str = "sidecar.istio.io/status";
/// Name of the ConfigMap (and volume) holding the shared bootstrap.
pub const BOOTSTRAP_CONFIG_MAP: &str = "ferry-bootstrap";

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

/// The bootstrap every injected sidecar of a namespace shares: no node id
/// (the sidecar builds it from the downward API's variables), admin on
/// loopback, ADS to the control plane.
pub fn bootstrap(discovery_address: &str) -> String {
    let (host, port) = discovery_address
        .rsplit_once(':')
        .unwrap_or((discovery_address, "15010"));
    format!(
        "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}\n\
         dynamic_resources:\n\
         \x20 ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}\n\
         \x20 lds_config: {{ads: {{}}, resource_api_version: V3}}\n\
         \x20 cds_config: {{ads: {{}}, resource_api_version: V3}}\n\
         static_resources:\n\
         \x20 clusters:\n\
         \x20 - name: xds-grpc\n\
         \x20   type: STRICT_DNS\n\
         \x20   connect_timeout: 1s\n\
         \x20   typed_extension_protocol_options:\n\
         \x20     envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n\
         \x20       \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n\
         \x20       explicit_http_config: {{http2_protocol_options: {{}}}}\n\
         \x20   load_assignment:\n\
         \x20     cluster_name: xds-grpc\n\
         \x20     endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}}}]}}]\n"
    )
}

/// The pod template of a workload document, if it has one.
fn template_mut<'a>(kind: &str, doc: &'a mut Value) -> Option<&'a mut Value> {
    match kind {
        "Pod" => doc.get("spec").is_some().then_some(doc),
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" => {
            doc.get_mut("spec")?.get_mut("template")
        }
        "CronJob" => doc
            .get_mut("spec")?
            .get_mut("jobTemplate")?
            .get_mut("spec")?
            .get_mut("template"),
        _ => None,
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

fn mapping_at<'a>(v: &'a mut Value, key: &str) -> &'a mut Mapping {
    let m = v
        .as_mapping_mut()
        .expect("a mapping (checked by the caller)");
    let entry = m
        .entry(s(key))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !entry.is_mapping() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry.as_mapping_mut().expect("just made a mapping")
}

fn seq_at<'a>(v: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    let m = v
        .as_mapping_mut()
        .expect("a mapping (checked by the caller)");
    let entry = m
        .entry(s(key))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !entry.is_sequence() {
        *entry = Value::Sequence(Vec::new());
    }
    entry.as_sequence_mut().expect("just made a sequence")
}

fn env_field(name: &str, path: &str) -> Value {
    map(vec![
        ("name", s(name)),
        (
            "valueFrom",
            map(vec![("fieldRef", map(vec![("fieldPath", s(path))]))]),
        ),
    ])
}

fn env_value(name: &str, value: &str) -> Value {
    map(vec![("name", s(name)), ("value", s(value))])
}

/// `traffic.sidecar.istio.io/*` annotations and the `ferry iptables` flag
/// each becomes (the `istio-iptables` arguments of Istio's injection
/// template, spelled out).
const TRAFFIC_FLAGS: [(&str, &str); 5] = [
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "--include-outbound-ip-ranges",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "--exclude-outbound-ip-ranges",
    ),
    (
        "traffic.sidecar.istio.io/includeInboundPorts",
        "--include-inbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/excludeInboundPorts",
        "--exclude-inbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "--exclude-outbound-ports",
    ),
];

/// Capture annotations `ferry iptables` has no counterpart for: refused
/// rather than ignored, so a pod never runs with capture it did not ask for.
const TRAFFIC_UNSUPPORTED: [&str; 3] = [
    "traffic.sidecar.istio.io/includeOutboundPorts",
    "traffic.sidecar.istio.io/kubevirtInterfaces",
    "traffic.sidecar.istio.io/excludeInterfaces",
];

/// The init container's arguments: `iptables` and a flag per
/// `traffic.sidecar.istio.io/*` annotation the template carries.
fn iptables_args(template: &Value) -> Result<Vec<Value>, String> {
    if let Some(key) = TRAFFIC_UNSUPPORTED
        .iter()
        .find(|k| annotation(template, k).is_some())
    {
        return Err(format!("annotation {key}: not supported by ferry iptables"));
    }
    let mut args = vec![s("iptables")];
    for (key, flag) in TRAFFIC_FLAGS {
        if let Some(v) = annotation(template, key) {
            let v: String = v.split(',').map(str::trim).collect::<Vec<_>>().join(",");
            args.push(s(&format!("{flag}={v}")));
        }
    }
    Ok(args)
}

fn init_container(opts: &InjectOptions, metadata: &[(String, String)], args: Vec<Value>) -> Value {
    map(vec![
        ("name", s(INIT_CONTAINER)),
        ("image", s(&opts.init_image)),
        ("args", Value::Sequence(args)),
        (
            "env",
            Value::Sequence(metadata.iter().map(|(k, v)| env_value(k, v)).collect()),
        ),
        (
            "securityContext",
            map(vec![
                ("runAsUser", Value::from(0)),
                ("runAsNonRoot", Value::from(false)),
                (
                    "capabilities",
                    map(vec![(
                        "add",
                        Value::Sequence(vec![s("NET_ADMIN"), s("NET_RAW")]),
                    )]),
                ),
            ]),
        ),
    ])
}

fn sidecar_container(opts: &InjectOptions, workload: &str, extra_env: Vec<Value>) -> Value {
    map(vec![
        ("name", s(PROXY_CONTAINER)),
        ("image", s(&opts.proxy_image)),
        (
            "args",
            Value::Sequence(vec![
                s("sidecar"),
                s("--config"),
                s("/etc/ferry/bootstrap.yaml"),
            ]),
        ),
        (
            "env",
            Value::Sequence(
                vec![
                    env_field("POD_NAME", "metadata.name"),
                    env_field("POD_NAMESPACE", "metadata.namespace"),
                    env_field("INSTANCE_IP", "status.podIP"),
                    env_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
                    map(vec![
                        ("name", s("CA_ADDR")),
                        ("value", s(&opts.discovery_address)),
                    ]),
                    map(vec![
                        ("name", s("ISTIO_META_WORKLOAD_NAME")),
                        ("value", s(workload)),
                    ]),
                    map(vec![
                        ("name", s("ISTIO_META_CLUSTER_ID")),
                        ("value", s("Kubernetes")),
                    ]),
                ]
                .into_iter()
                .chain(extra_env)
                .collect(),
            ),
        ),
        (
            "ports",
            Value::Sequence(vec![map(vec![
                ("name", s("http-envoy-prom")),
                ("containerPort", Value::from(15090)),
                ("protocol", s("TCP")),
            ])]),
        ),
        (
            "readinessProbe",
            map(vec![
                (
                    "httpGet",
                    map(vec![
                        ("path", s("/healthz/ready")),
                        ("port", Value::from(15021)),
                    ]),
                ),
                ("periodSeconds", Value::from(2)),
            ]),
        ),
        (
            "securityContext",
            map(vec![
                ("runAsUser", Value::from(1337)),
                ("runAsGroup", Value::from(1337)),
                ("runAsNonRoot", Value::from(true)),
                ("allowPrivilegeEscalation", Value::from(false)),
            ]),
        ),
        (
            "volumeMounts",
            Value::Sequence(vec![map(vec![
                ("name", s(BOOTSTRAP_CONFIG_MAP)),
                ("mountPath", s("/etc/ferry")),
            ])]),
        ),
    ])
}

/// Whether the template asks not to be injected.
fn opted_out(template: &Value) -> bool {
    str_at(template, &["metadata", "labels", INJECT])
        .or(str_at(template, &["metadata", "annotations", INJECT]))
        == Some("false")
}

/// Whether the template was injected already.
fn injected(template: &Value) -> bool {
    str_at(template, &["metadata", "annotations", STATUS]).is_some()
}

/// `proxy.istio.io/config` as far as injection reads it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfigAnnotation {
    #[serde(default)]
    hold_application_until_proxy_starts: Option<bool>,
    #[serde(default)]
    proxy_metadata: std::collections::BTreeMap<String, String>,
}

fn annotation<'a>(template: &'a Value, key: &str) -> Option<&'a str> {
    str_at(template, &["metadata", "annotations", key])
}

/// Kubernetes' boolean strings, as Go's `strconv.ParseBool` reads them.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Prometheus' annotation key normalisation (`prometheus.io/scrape` and
/// `prometheus-io/scrape` are the same key to it).
fn sanitize_label(k: &str) -> String {
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Istio's reserved ports, never an app's metrics port.
const RESERVED_PORTS: [u16; 9] = [
    15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090,
];

/// The metrics merge (the injector's `applyPrometheusMerge`): returns the
/// `ISTIO_PROMETHEUS_ANNOTATIONS` value, if any, after pointing the
/// annotations at the status port.
fn prometheus_merge(template: &mut Value) -> Result<Option<String>, String> {
    let annotations = template["metadata"]["annotations"]
        .as_mapping()
        .cloned()
        .unwrap_or_default();
    let get = |key: &str| {
        annotations.iter().find_map(|(k, v)| {
            (k.as_str().map(sanitize_label).as_deref() == Some(key))
                .then(|| v.as_str().unwrap_or_default().to_string())
        })
    };
    if get("prometheus_istio_io_merge_metrics").and_then(|v| parse_bool(&v)) == Some(false) {
        return Ok(None);
    }
    if let Some(scrape) = get("prometheus_io_scrape").and_then(|v| parse_bool(&v))
        && !scrape
    {
        return Ok(None);
    }
    let target = STATUS_PORT.to_string();
    let port = get("prometheus_io_port");
    if port.as_deref() == Some(target.as_str()) {
        // Injected already, or the user points at the agent.
        return Ok(None);
    }
    if let Some(p) = &port {
        let n: u16 = p.trim().parse().ok().filter(|n| *n != 0).ok_or_else(|| {
            format!("invalid prometheus scrape configuration: invalid port {p:?}")
        })?;
        if RESERVED_PORTS.contains(&n) {
            return Err(format!(
                "invalid prometheus scrape configuration: port {p} is reserved for Istio and cannot be scraped"
            ));
        }
    }
    let mut cfg = serde_json::Map::new();
    for (key, field) in [
        ("prometheus_io_scrape", "scrape"),
        ("prometheus_io_path", "path"),
        ("prometheus_io_port", "port"),
    ] {
        if let Some(v) = get(key) {
            cfg.insert(field.into(), serde_json::Value::String(v));
        }
    }
    let env = (!cfg.is_empty()).then(|| serde_json::Value::Object(cfg).to_string());
    let annotations = mapping_at(mapping_at_value(template, "metadata"), "annotations");
    annotations.retain(|k, _| {
        !matches!(
            k.as_str().map(sanitize_label).as_deref(),
            Some("prometheus_io_scrape" | "prometheus_io_port" | "prometheus_io_path")
        )
    });
    annotations.insert(s("prometheus.io/port"), s(&target));
    annotations.insert(s("prometheus.io/path"), s("/stats/prometheus"));
    annotations.insert(s("prometheus.io/scrape"), s("true"));
    Ok(env)
}

/// The rewritten probe handler: an HTTP GET of `path` on the status port
/// (an HTTPS GET becomes HTTP: the agent answers in plaintext).
fn rewritten_get(original: Option<&Value>, path: &str) -> Value {
    let mut get = original
        .cloned()
        .unwrap_or_else(|| Value::Mapping(Mapping::new()));
    if let Some(m) = get.as_mapping_mut() {
        m.insert(s("path"), s(path));
        m.insert(s("port"), Value::from(STATUS_PORT));
        if m.get(s("scheme")).and_then(Value::as_str) == Some("HTTPS") {
            m.insert(s("scheme"), s("HTTP"));
        }
    }
    get
}

/// A probe or lifecycle handler as the agent's prober config (the
/// kubelet's handler with numeric ports and the probe's timeout), or
/// `None` when it is not rewritten.
fn prober_of(handler: &Value, ports: &Mapping, is_probe: bool) -> Option<Value> {
    let http = handler.get("httpGet");
    let tcp = handler.get("tcpSocket");
    let grpc = handler.get("grpc").filter(|_| is_probe);
    let resolve = |action: &Value| -> Option<Value> {
        let mut action = action.clone();
        let port = action.get("port")?.clone();
        let n = match &port {
            Value::Number(n) => n.as_u64()?,
            Value::String(name) => match name.parse::<u64>() {
                Ok(n) => n,
                Err(_) => ports.get(s(name)).and_then(Value::as_u64)?,
            },
            _ => return None,
        };
        if n == u64::from(STATUS_PORT) {
            return None;
        }
        action.as_mapping_mut()?.insert(s("port"), Value::from(n));
        Some(action)
    };
    let mut out = Mapping::new();
    if let Some(h) = http {
        out.insert(s("httpGet"), resolve(h)?);
    } else if let Some(t) = tcp {
        out.insert(s("tcpSocket"), resolve(t)?);
    } else if let Some(g) = grpc {
        out.insert(s("grpc"), g.clone());
    } else {
        return None;
    }
    if is_probe {
        // The API server's default, which the kubelet applies too.
        let timeout = handler
            .get("timeoutSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        out.insert(s("timeoutSeconds"), Value::from(timeout));
    }
    Some(Value::Mapping(out))
}

/// Rewrites the app containers' probes to the status port and returns the
/// `ISTIO_KUBE_APP_PROBERS` value (the injector's `DumpAppProbers` and
/// `patchRewriteProbe`).
fn rewrite_probes(spec: &mut Value) -> Option<String> {
    let mut probers = serde_json::Map::new();
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_sequence_mut) else {
            continue;
        };
        for c in containers {
            let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_string) else {
                continue;
            };
            if name == PROXY_CONTAINER || name == INIT_CONTAINER {
                continue;
            }
            let mut ports = Mapping::new();
            for p in c
                .get("ports")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                if let (Some(n), Some(port)) = (p.get("name"), p.get("containerPort")) {
                    ports.insert(n.clone(), port.clone());
                }
            }
            for (field, kind) in [
                ("readinessProbe", "readyz"),
                ("livenessProbe", "livez"),
                ("startupProbe", "startupz"),
            ] {
                let path = format!("/app-health/{name}/{kind}");
                let Some(probe) = c.get_mut(field) else {
                    continue;
                };
                let Some(prober) = prober_of(probe, &ports, true) else {
                    continue;
                };
                if let Ok(j) = serde_json::to_value(&prober) {
                    probers.insert(path.clone(), j);
                }
                let Some(m) = probe.as_mapping_mut() else {
                    continue;
                };
                let get = rewritten_get(m.get(s("httpGet")), &path);
                m.remove(s("tcpSocket"));
                m.remove(s("grpc"));
                m.insert(s("httpGet"), get);
            }
            for (field, kind) in [("preStop", "prestopz"), ("postStart", "poststartz")] {
                let path = format!("/app-lifecycle/{name}/{kind}");
                let Some(handler) = c.get_mut("lifecycle").and_then(|l| l.get_mut(field)) else {
                    continue;
                };
                let Some(prober) = prober_of(handler, &ports, false) else {
                    continue;
                };
                if let Ok(j) = serde_json::to_value(&prober) {
                    probers.insert(path.clone(), j);
                }
                let Some(m) = handler.as_mapping_mut() else {
                    continue;
                };
                let get = rewritten_get(m.get(s("httpGet")), &path);
                m.remove(s("tcpSocket"));
                m.insert(s("httpGet"), get);
            }
        }
    }
    (!probers.is_empty()).then(|| serde_json::Value::Object(probers).to_string())
}

/// Injects one pod template; `workload` names it (the owner's name).
fn inject_template(
    template: &mut Value,
    workload: &str,
    opts: &InjectOptions,
) -> Result<(), String> {
    if !template.is_mapping() {
        return Ok(());
    }
    let proxy_config: ProxyConfigAnnotation = match annotation(template, "proxy.istio.io/config") {
        Some(text) => serde_yaml_ng::from_str(text)
            .map_err(|e| format!("annotation proxy.istio.io/config: {e}"))?,
        None => ProxyConfigAnnotation::default(),
    };
    let native = match annotation(template, "sidecar.istio.io/nativeSidecar") {
        Some(v) => v != "false",
        None => opts.native_sidecars,
    };
    // A native sidecar starts before the app by itself: no hold then.
    let hold = proxy_config
        .hold_application_until_proxy_starts
        .unwrap_or(opts.hold_application_until_proxy_starts)
        && !native;
    let rewrite = annotation(template, "sidecar.istio.io/rewriteAppHTTPProbers")
        .and_then(parse_bool)
        .unwrap_or(true);
    let mut metadata: Vec<(String, String)> = proxy_config.proxy_metadata.into_iter().collect();
    // `sidecar.istio.io/interceptionMode: NONE`: no capture (no init
    // container), and the proxy says so to the control plane, which then
    // binds the workload's ports for real (Sidecar ingress/egress).
    let no_capture = annotation(template, "sidecar.istio.io/interceptionMode") == Some("NONE");
    if let Some(mode) = annotation(template, "sidecar.istio.io/interceptionMode") {
        metadata.retain(|(k, _)| k != "ISTIO_META_INTERCEPTION_MODE");
        metadata.push(("ISTIO_META_INTERCEPTION_MODE".into(), mode.to_string()));
    }
    let iptables = iptables_args(template)?;
    let prometheus = prometheus_merge(template)?;

    let labels = mapping_at(mapping_at_value(template, "metadata"), "labels");
    let app = labels
        .get(s("app"))
        .and_then(Value::as_str)
        .unwrap_or(workload)
        .to_string();
    let version = labels
        .get(s("version"))
        .and_then(Value::as_str)
        .unwrap_or("latest")
        .to_string();
    labels.insert(s("security.istio.io/tlsMode"), s("istio"));
    labels
        .entry(s("service.istio.io/canonical-name"))
        .or_insert_with(|| s(&app));
    labels
        .entry(s("service.istio.io/canonical-revision"))
        .or_insert_with(|| s(&version));
    let (init_list, proxy_list) = match (native, no_capture) {
        (true, false) => (r#"["istio-init","istio-proxy"]"#, "[]"),
        (true, true) => (r#"["istio-proxy"]"#, "[]"),
        (false, false) => (r#"["istio-init"]"#, r#"["istio-proxy"]"#),
        (false, true) => ("[]", r#"["istio-proxy"]"#),
    };
    let annotations = mapping_at(mapping_at_value(template, "metadata"), "annotations");
    annotations.insert(
        s(STATUS),
        s(&format!(
            r#"{{"initContainers":{init_list},"containers":{proxy_list},"volumes":["{BOOTSTRAP_CONFIG_MAP}"]}}"#
        )),
    );
    let spec = mapping_at_value(template, "spec");
    let probers = if rewrite { rewrite_probes(spec) } else { None };
    let mut env: Vec<Value> = metadata.iter().map(|(k, v)| env_value(k, v)).collect();
    if let Some(p) = &probers {
        env.push(env_value("ISTIO_KUBE_APP_PROBERS", p));
    }
    if let Some(p) = &prometheus {
        env.push(env_value("ISTIO_PROMETHEUS_ANNOTATIONS", p));
    }
    let mut sidecar = sidecar_container(opts, workload, env);
    if let Some(m) = sidecar.as_mapping_mut() {
        if native {
            m.insert(s("restartPolicy"), s("Always"));
            // The kubelet starts the app once this passes.
            m.insert(
                s("startupProbe"),
                map(vec![
                    (
                        "httpGet",
                        map(vec![
                            ("path", s("/healthz/ready")),
                            ("port", Value::from(15021)),
                        ]),
                    ),
                    ("initialDelaySeconds", Value::from(0)),
                    ("periodSeconds", Value::from(1)),
                    ("timeoutSeconds", Value::from(3)),
                    ("failureThreshold", Value::from(600)),
                ]),
            );
            // Pod shutdown starts: drain; SIGTERM comes once the app is gone.
            m.insert(
                s("lifecycle"),
                map(vec![(
                    "preStop",
                    map(vec![(
                        "exec",
                        map(vec![(
                            "command",
                            Value::Sequence(vec![
                                s(FERRY),
                                s("request"),
                                s(&format!("--debug-port={STATUS_PORT}")),
                                s("POST"),
                                s("drain"),
                            ]),
                        )]),
                    )]),
                )]),
            );
        } else if hold {
            // The kubelet starts the next container only once postStart
            // returned: `ferry wait` returns when the sidecar is ready.
            m.insert(
                s("lifecycle"),
                map(vec![(
                    "postStart",
                    map(vec![(
                        "exec",
                        map(vec![(
                            "command",
                            Value::Sequence(vec![s(FERRY), s("wait")]),
                        )]),
                    )]),
                )]),
            );
        }
    }
    let inits = seq_at(spec, "initContainers");
    if !no_capture {
        inits.insert(0, init_container(opts, &metadata, iptables));
    }
    if native {
        inits.insert(usize::from(!no_capture), sidecar);
    } else if hold {
        seq_at(spec, "containers").insert(0, sidecar);
    } else {
        seq_at(spec, "containers").push(sidecar);
    }
    seq_at(spec, "volumes").push(map(vec![
        ("name", s(BOOTSTRAP_CONFIG_MAP)),
        ("configMap", map(vec![("name", s(BOOTSTRAP_CONFIG_MAP))])),
    ]));
    Ok(())
}

/// The mapping under `key` as a `Value`, made when absent.
fn mapping_at_value<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    mapping_at(v, key);
    v.get_mut(key).expect("just made")
}

/// The workload a Pod belongs to, as Istio's injector names it
/// (`GetDeployMetaFromPod`): for a pod a ReplicaSet controls, its
/// Deployment (the ReplicaSet's name less `-<pod-template-hash>`); for
/// another controller, the controller's name; else the pod's name, or its
/// `generateName` less the trailing dash (a pod being created has no name
/// yet).
pub fn pod_workload_name(pod: &Value) -> String {
    let meta = &pod["metadata"];
    let owner = meta["ownerReferences"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|o| o["controller"].as_bool() == Some(true));
    if let Some(owner) = owner
        && let Some(name) = owner["name"].as_str()
    {
        let hash = str_at(meta, &["labels", "pod-template-hash"]);
        if owner["kind"].as_str() == Some("ReplicaSet")
            && let Some(hash) = hash
            && let Some(deployment) = name.strip_suffix(&format!("-{hash}"))
        {
            return deployment.to_string();
        }
        return name.to_string();
    }
    if let Some(name) = meta["name"].as_str().filter(|n| !n.is_empty()) {
        return name.to_string();
    }
    match meta["generateName"].as_str() {
        Some(g) if !g.is_empty() => g.trim_end_matches('-').to_string(),
        _ => "workload".to_string(),
    }
}

/// Injects one Pod (the admission webhook's object) as [`inject`] injects
/// a Pod document: `Ok(false)` when it opted out or carries a sidecar
/// already, and is left as it was.
pub fn inject_pod(pod: &mut Value, opts: &InjectOptions) -> Result<bool, String> {
    if !pod.is_mapping() || injected(pod) || opted_out(pod) {
        return Ok(false);
    }
    let workload = pod_workload_name(pod);
    inject_template(pod, &workload, opts)?;
    Ok(true)
}

/// Injects every workload of a multi-document YAML text; returns the new
/// text with one bootstrap ConfigMap per namespace that got a sidecar
/// (workloads without a namespace get the ConfigMap without one too, so
/// `kubectl apply -n NS` puts both in the same place).
pub fn inject(text: &str, opts: &InjectOptions) -> Result<String, InjectError> {
    let mut out = Vec::new();
    let mut namespaces: BTreeSet<Option<String>> = BTreeSet::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let mut value =
            <Value as serde::Deserialize>::deserialize(doc).map_err(|e| InjectError::Yaml {
                index,
                message: e.to_string(),
            })?;
        if value.is_null() {
            continue;
        }
        let kind = str_at(&value, &["kind"]).unwrap_or_default().to_string();
        let name = str_at(&value, &["metadata", "name"])
            .unwrap_or("workload")
            .to_string();
        let namespace = str_at(&value, &["metadata", "namespace"]).map(str::to_string);
        if kind == "ConfigMap" && name == BOOTSTRAP_CONFIG_MAP {
            // A previous injection's: made again below.
            continue;
        }
        if let Some(template) = template_mut(&kind, &mut value) {
            if injected(template) {
                namespaces.insert(namespace);
            } else if !opted_out(template) {
                let workload = if kind == "Pod" {
                    pod_workload_name(template)
                } else {
                    name.clone()
                };
                inject_template(template, &workload, opts).map_err(|message| {
                    InjectError::Workload {
                        index,
                        name: name.clone(),
                        message,
                    }
                })?;
                namespaces.insert(namespace);
            }
        }
        out.push(
            serde_yaml_ng::to_string(&value).map_err(|e| InjectError::Yaml {
                index,
                message: e.to_string(),
            })?,
        );
    }
    for ns in namespaces {
        let mut meta = vec![("name", s(BOOTSTRAP_CONFIG_MAP))];
        if let Some(ns) = &ns {
            meta.push(("namespace", s(ns)));
        }
        let cm = map(vec![
            ("apiVersion", s("v1")),
            ("kind", s("ConfigMap")),
            ("metadata", map(meta)),
            (
                "data",
                map(vec![(
                    "bootstrap.yaml",
                    s(&bootstrap(&opts.discovery_address)),
                )]),
            ),
        ]);
        out.push(
            serde_yaml_ng::to_string(&cm).map_err(|e| InjectError::Yaml {
                index: usize::MAX,
                message: e.to_string(),
            })?,
        );
    }
    Ok(out.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080}]}\n---\n\
        apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews-v1}\n\
        spec:\n  template:\n    metadata: {labels: {app: reviews, version: v1}}\n    spec:\n      serviceAccountName: bookinfo-reviews\n      containers: [{name: reviews, image: reviews}]\n---\n\
        apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: legacy, namespace: other}\n\
        spec:\n  template:\n    metadata: {labels: {app: legacy}, annotations: {sidecar.istio.io/inject: \"false\"}}\n    spec: {containers: [{name: legacy, image: legacy}]}\n";

    fn docs(text: &str) -> Vec<Value> {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
            .collect()
    }

    #[test]
    fn workloads_get_init_and_sidecar_containers_and_istio_labels() {
        let out = inject(APP, &InjectOptions::default()).unwrap();
        let d = docs(&out);
        assert_eq!(d.len(), 4, "{out}");
        // The Service is untouched.
        assert_eq!(d[0], docs(APP)[0]);
        let t = &d[1]["spec"]["template"];
        let containers = t["spec"]["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 2);
        assert_eq!(containers[0]["name"], s("reviews"));
        assert_eq!(containers[1]["name"], s("istio-proxy"));
        assert_eq!(
            containers[1]["securityContext"]["runAsUser"],
            Value::from(1337)
        );
        let env = containers[1]["env"].as_sequence().unwrap();
        assert!(env.iter().any(|e| e["name"] == s("INSTANCE_IP")
            && e["valueFrom"]["fieldRef"]["fieldPath"] == s("status.podIP")));
        assert!(env.iter().any(|e| e["name"] == s("CA_ADDR")));
        assert_eq!(t["spec"]["initContainers"][0]["args"][0], s("iptables"));
        assert_eq!(
            t["metadata"]["labels"]["security.istio.io/tlsMode"],
            s("istio")
        );
        assert_eq!(
            t["metadata"]["labels"]["service.istio.io/canonical-name"],
            s("reviews")
        );
        assert_eq!(
            t["metadata"]["labels"]["service.istio.io/canonical-revision"],
            s("v1")
        );
        assert!(t["metadata"]["annotations"][STATUS].as_str().is_some());
        // Opted out: unchanged.
        assert_eq!(d[2], docs(APP)[2]);
        // One ConfigMap, for the namespace that got a sidecar.
        assert_eq!(d[3]["kind"], s("ConfigMap"));
        assert!(d[3]["metadata"].get("namespace").is_none());
        let boot = d[3]["data"]["bootstrap.yaml"].as_str().unwrap();
        assert!(boot.contains("ferry-pilot.istio-system.svc"), "{boot}");
        assert!(boot.contains("port_value: 15010"), "{boot}");
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let once = inject(APP, &InjectOptions::default()).unwrap();
        let twice = inject(&once, &InjectOptions::default()).unwrap();
        assert_eq!(docs(&once), docs(&twice));
    }

    #[test]
    fn every_bookinfo_deployment_is_injected() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../samples/bookinfo/platform/kube/bookinfo.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        let out = inject(&text, &InjectOptions::default()).unwrap();
        let d = docs(&out);
        let deployments: Vec<&Value> = d.iter().filter(|v| v["kind"] == s("Deployment")).collect();
        assert_eq!(deployments.len(), 6);
        for dep in deployments {
            let names: Vec<&str> = dep["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|c| c["name"].as_str())
                .collect();
            assert_eq!(names.last(), Some(&"istio-proxy"), "{names:?}");
        }
    }

    const PROBED: &str = concat!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n",
        "    prometheus.io/scrape: \"true\"\n    prometheus.io/port: \"9102\"\n    prometheus.io/path: /custom\n",
        "spec:\n  containers:\n  - name: web\n    ports: [{name: http, containerPort: 8080}]\n",
        "    readinessProbe: {httpGet: {path: /ready, port: http, scheme: HTTPS, httpHeaders: [{name: x-probe, value: r}]}, timeoutSeconds: 3}\n",
        "    livenessProbe: {tcpSocket: {port: 8080}}\n    startupProbe: {grpc: {port: 9090, service: web}}\n",
    );

    fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
        c["env"]
            .as_sequence()?
            .iter()
            .find(|e| e["name"] == s(name))?["value"]
            .as_str()
    }

    #[test]
    fn probes_are_rewritten_to_the_status_port_as_istio_does() {
        let out = inject(PROBED, &InjectOptions::default()).unwrap();
        let d = docs(&out);
        let c = &d[0]["spec"]["containers"];
        let web = &c[0];
        assert_eq!(
            web["readinessProbe"]["httpGet"]["path"],
            s("/app-health/web/readyz")
        );
        assert_eq!(web["readinessProbe"]["httpGet"]["port"], Value::from(15020));
        assert_eq!(web["readinessProbe"]["httpGet"]["scheme"], s("HTTP"));
        // The kubelet's headers stay (the agent passes them on).
        assert_eq!(
            web["readinessProbe"]["httpGet"]["httpHeaders"][0]["name"],
            s("x-probe")
        );
        assert_eq!(web["readinessProbe"]["timeoutSeconds"], Value::from(3));
        assert!(web["livenessProbe"].get("tcpSocket").is_none());
        assert_eq!(
            web["livenessProbe"]["httpGet"]["path"],
            s("/app-health/web/livez")
        );
        assert!(web["startupProbe"].get("grpc").is_none());
        let proxy = &c[1];
        assert_eq!(proxy["name"], s("istio-proxy"));
        let probers: serde_json::Value =
            serde_json::from_str(env_of(proxy, "ISTIO_KUBE_APP_PROBERS").unwrap()).unwrap();
        assert_eq!(
            probers["/app-health/web/readyz"],
            serde_json::json!({"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTPS",
                "httpHeaders": [{"name": "x-probe", "value": "r"}]}, "timeoutSeconds": 3})
        );
        assert_eq!(
            probers["/app-health/web/livez"],
            serde_json::json!({"tcpSocket": {"port": 8080}, "timeoutSeconds": 1})
        );
        assert_eq!(
            probers["/app-health/web/startupz"],
            serde_json::json!({"grpc": {"port": 9090, "service": "web"}, "timeoutSeconds": 1})
        );
        // Metrics merge: the annotations point at the agent, the originals
        // travel in the environment.
        let ann = &d[0]["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/port"], s("15020"));
        assert_eq!(ann["prometheus.io/path"], s("/stats/prometheus"));
        let prom: serde_json::Value =
            serde_json::from_str(env_of(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS").unwrap()).unwrap();
        assert_eq!(
            prom,
            serde_json::json!({"scrape": "true", "port": "9102", "path": "/custom"})
        );
        // Injecting again changes nothing.
        let twice = inject(&out, &InjectOptions::default()).unwrap();
        assert_eq!(docs(&twice), d);
    }

    #[test]
    fn opting_out_keeps_probes_and_annotations() {
        let text = PROBED.replace(
            "    prometheus.io/scrape: \"true\"\n",
            "    prometheus.io/scrape: \"true\"\n    sidecar.istio.io/rewriteAppHTTPProbers: \"false\"\n    prometheus.istio.io/merge-metrics: \"false\"\n",
        );
        let d = docs(&inject(&text, &InjectOptions::default()).unwrap());
        let c = &d[0]["spec"]["containers"];
        assert_eq!(
            c[0]["livenessProbe"]["tcpSocket"]["port"],
            Value::from(8080)
        );
        assert_eq!(
            d[0]["metadata"]["annotations"]["prometheus.io/port"],
            s("9102")
        );
        assert!(env_of(&c[1], "ISTIO_KUBE_APP_PROBERS").is_none());
        assert!(env_of(&c[1], "ISTIO_PROMETHEUS_ANNOTATIONS").is_none());
        // A reserved port is refused, naming the workload.
        let bad = PROBED.replace("\"9102\"", "\"15090\"");
        let e = inject(&bad, &InjectOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("(web)") && e.contains("reserved"), "{e}");
    }

    #[test]
    fn hold_application_puts_the_sidecar_first_with_a_wait_hook() {
        let text = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: job}\nspec:\n  template:\n    metadata:\n      annotations:\n        proxy.istio.io/config: '{\"holdApplicationUntilProxyStarts\": true, \"proxyMetadata\": {\"EXIT_ON_ZERO_ACTIVE_CONNECTIONS\": \"true\", \"ISTIO_META_DNS_CAPTURE\": \"true\"}}'\n    spec: {restartPolicy: Never, containers: [{name: job, image: job}]}\n";
        let d = docs(&inject(text, &InjectOptions::default()).unwrap());
        let spec = &d[0]["spec"]["template"]["spec"];
        let proxy = &spec["containers"][0];
        assert_eq!(proxy["name"], s("istio-proxy"));
        assert_eq!(
            proxy["lifecycle"]["postStart"]["exec"]["command"],
            Value::Sequence(vec![s("/usr/local/bin/ferry"), s("wait")])
        );
        assert_eq!(
            env_of(proxy, "EXIT_ON_ZERO_ACTIVE_CONNECTIONS"),
            Some("true")
        );
        // The init container sees the metadata too (DNS capture rules).
        assert_eq!(
            env_of(&spec["initContainers"][0], "ISTIO_META_DNS_CAPTURE"),
            Some("true")
        );
        assert_eq!(spec["containers"][1]["name"], s("job"));
    }

    #[test]
    fn native_sidecars_are_restartable_init_containers() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {sidecar.istio.io/nativeSidecar: \"true\"}}\nspec: {containers: [{name: app, image: app}]}\n";
        let d = docs(&inject(text, &InjectOptions::default()).unwrap());
        let spec = &d[0]["spec"];
        assert_eq!(spec["containers"].as_sequence().unwrap().len(), 1);
        let inits = spec["initContainers"].as_sequence().unwrap();
        assert_eq!(inits[0]["name"], s("istio-init"));
        assert_eq!(inits[1]["name"], s("istio-proxy"));
        assert_eq!(inits[1]["restartPolicy"], s("Always"));
        assert_eq!(
            inits[1]["startupProbe"]["httpGet"]["port"],
            Value::from(15021)
        );
        assert_eq!(
            inits[1]["lifecycle"]["preStop"]["exec"]["command"][4],
            s("drain")
        );
        // The mesh default applies without the annotation; the pod's "false" wins.
        let plain = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: app, image: app}]}\n";
        let opts = InjectOptions {
            native_sidecars: true,
            ..InjectOptions::default()
        };
        let d = docs(&inject(plain, &opts).unwrap());
        assert_eq!(d[0]["spec"]["initContainers"][1]["name"], s("istio-proxy"));
        let off = text.replace("\"true\"", "\"false\"");
        let d = docs(&inject(&off, &opts).unwrap());
        assert_eq!(d[0]["spec"]["containers"][1]["name"], s("istio-proxy"));
    }

    #[test]
    fn interception_none_has_no_init_container() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {sidecar.istio.io/interceptionMode: NONE}}\nspec: {containers: [{name: app, image: app}]}\n";
        let d = docs(&inject(text, &InjectOptions::default()).unwrap());
        let spec = &d[0]["spec"];
        assert!(spec["initContainers"].as_sequence().unwrap().is_empty());
        let proxy = &spec["containers"][1];
        assert_eq!(env_of(proxy, "ISTIO_META_INTERCEPTION_MODE"), Some("NONE"));
        // Injecting again changes nothing.
        let out = inject(text, &InjectOptions::default()).unwrap();
        assert_eq!(
            docs(&inject(&out, &InjectOptions::default()).unwrap()),
            docs(&out)
        );
    }

    #[test]
    fn traffic_annotations_become_iptables_flags() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    traffic.sidecar.istio.io/excludeOutboundIPRanges: \"10.0.0.0/8, 172.16.0.0/12\"\n    traffic.sidecar.istio.io/includeInboundPorts: \"9080\"\n    traffic.sidecar.istio.io/excludeOutboundPorts: \"3306\"\nspec: {containers: [{name: app, image: app}]}\n";
        let d = docs(&inject(text, &InjectOptions::default()).unwrap());
        assert_eq!(
            d[0]["spec"]["initContainers"][0]["args"],
            Value::Sequence(vec![
                s("iptables"),
                s("--exclude-outbound-ip-ranges=10.0.0.0/8,172.16.0.0/12"),
                s("--include-inbound-ports=9080"),
                s("--exclude-outbound-ports=3306"),
            ])
        );
        // Without them: Istio's defaults, which are ferry iptables' own.
        let plain = inject(APP, &InjectOptions::default()).unwrap();
        assert_eq!(
            docs(&plain)[1]["spec"]["template"]["spec"]["initContainers"][0]["args"],
            Value::Sequence(vec![s("iptables")])
        );
        // One ferry iptables cannot honour is refused, not ignored.
        let bad = text.replace("excludeOutboundPorts", "includeOutboundPorts");
        let e = inject(&bad, &InjectOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("traffic.sidecar.istio.io/includeOutboundPorts"),
            "{e}"
        );
    }

    #[test]
    fn a_pod_is_named_after_its_deployment() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  generateName: reviews-v1-7d4b9c8f5-\n  labels: {app: reviews, pod-template-hash: 7d4b9c8f5}\n  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-7d4b9c8f5, uid: u, controller: true}]\nspec: {containers: [{name: reviews, image: r}]}\n";
        let d = docs(&inject(pod, &InjectOptions::default()).unwrap());
        let proxy = &d[0]["spec"]["containers"][1];
        assert_eq!(
            env_of(proxy, "ISTIO_META_WORKLOAD_NAME"),
            Some("reviews-v1")
        );
        let mut v = docs(pod).remove(0);
        assert!(inject_pod(&mut v, &InjectOptions::default()).unwrap());
        assert_eq!(v, d[0]);
        // Injected already: left alone.
        assert!(!inject_pod(&mut v, &InjectOptions::default()).unwrap());
        let bare = docs("metadata: {generateName: job-}\nspec: {}\n").remove(0);
        assert_eq!(pod_workload_name(&bare), "job");
    }

    #[test]
    fn bad_yaml_names_the_document() {
        let err = inject("kind: Pod\n---\n: [", &InjectOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("document 1:"), "{err}");
    }
}
