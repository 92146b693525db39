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
//! As Istio's injector: a template labelled or annotated
//! `sidecar.istio.io/inject: "false"` is left alone, and so is one already
//! injected (injecting twice changes nothing). Other documents pass through
//! unchanged.

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
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            proxy_image: "ferry-proxy:latest".into(),
            init_image: "ferry-init:latest".into(),
            discovery_address: "ferry-pilot.istio-system.svc:15010".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {index}: {message}")]
    Yaml { index: usize, message: String },
}

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

fn init_container(opts: &InjectOptions) -> Value {
    map(vec![
        ("name", s("istio-init")),
        ("image", s(&opts.init_image)),
        ("args", Value::Sequence(vec![s("iptables")])),
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

fn sidecar_container(opts: &InjectOptions, workload: &str) -> Value {
    map(vec![
        ("name", s("istio-proxy")),
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
            Value::Sequence(vec![
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
            ]),
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

/// Injects one pod template; `workload` names it (the owner's name).
fn inject_template(template: &mut Value, workload: &str, opts: &InjectOptions) {
    if !template.is_mapping() {
        return;
    }
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
    let annotations = mapping_at(mapping_at_value(template, "metadata"), "annotations");
    annotations.insert(
        s(STATUS),
        s(&format!(
            r#"{{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["{BOOTSTRAP_CONFIG_MAP}"]}}"#
        )),
    );
    let spec = mapping_at_value(template, "spec");
    seq_at(spec, "initContainers").insert(0, init_container(opts));
    seq_at(spec, "containers").push(sidecar_container(opts, workload));
    seq_at(spec, "volumes").push(map(vec![
        ("name", s(BOOTSTRAP_CONFIG_MAP)),
        ("configMap", map(vec![("name", s(BOOTSTRAP_CONFIG_MAP))])),
    ]));
}

/// The mapping under `key` as a `Value`, made when absent.
fn mapping_at_value<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    mapping_at(v, key);
    v.get_mut(key).expect("just made")
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
                inject_template(template, &name, opts);
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

    #[test]
    fn bad_yaml_names_the_document() {
        let err = inject("kind: Pod\n---\n: [", &InjectOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("document 1:"), "{err}");
    }
}
