//! The injection webhook as the API server calls it: `ferry-pilot
//! serve-kube --webhook-addr` (its namespaces from a local API server,
//! [`kube_api`]) is sent `AdmissionReview` v1 requests over HTTPS (HTTP/2,
//! the certificate checked against the mesh CA's root for the default
//! webhook name) for bookinfo's Pods as the ReplicaSet controller creates
//! them (no name yet, defaults filled in, the service account token
//! volume). Each patch, applied to its Pod, must give exactly what
//! `ferry-pilot inject` writes for the same Pod; a namespace's
//! `istio-injection` label, a Pod's `sidecar.istio.io/inject`,
//! `proxy.istio.io/config` and `traffic.sidecar.istio.io/*` are honoured.
//! The namespace's bootstrap ConfigMap, which the sidecar mounts, is
//! written through the API as `inject` writes it, and the webhook
//! configuration's `caBundle` is kept at the CA's root. A second test serves
//! given certificates.

#![cfg(feature = "kube")]

use crate::kube_api;

use crate::common;

use common::free_addr;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube_api::{ApiServer, Options, read_yaml, yaml_objects};
use serde_json::{Value, json};

const PILOT: &str = env!("CARGO_BIN_EXE_ferry-pilot");
/// What injection is told in both runs (the webhook and `inject`).
const INJECT_FLAGS: &[&str] = &[
    "--proxy-image",
    "ferry-proxy:0.1.0",
    "--init-image",
    "ferry-init:0.1.0",
    "--discovery-address",
    "ferry-pilot.istio-system.svc:15012",
];

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/bookinfo")
}

/// The Pod the ReplicaSet controller of `deployment` creates, as the API
/// server hands it to mutating webhooks: no name yet, the owner, the
/// defaults and the service account token volume filled in.
fn pod(deployment: &Value, namespace: &str) -> Value {
    let name = deployment["metadata"]["name"].as_str().expect("name");
    let template = &deployment["spec"]["template"];
    let mut labels = template["metadata"]["labels"].clone();
    labels["pod-template-hash"] = json!("7d4b9c8f5");
    let token = "kube-api-access-x7k2p";
    let mut spec = template["spec"].clone();
    for c in spec["containers"].as_array_mut().expect("containers") {
        for p in c["ports"].as_array_mut().into_iter().flatten() {
            p["protocol"] = json!("TCP");
        }
        c["resources"] = json!({});
        c["terminationMessagePath"] = json!("/dev/termination-log");
        c["terminationMessagePolicy"] = json!("File");
        c["imagePullPolicy"] = json!("IfNotPresent");
        c["volumeMounts"] = json!([{"name": token, "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]);
    }
    let sa = spec["serviceAccountName"].clone();
    let defaults = json!({
        "volumes": [{"name": token, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst", "serviceAccount": sa, "securityContext": {},
        "schedulerName": "default-scheduler", "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority", "priority": 0,
        "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
    });
    for (k, v) in defaults.as_object().expect("object") {
        spec[k] = v.clone();
    }
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": format!("{name}-7d4b9c8f5-"),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{name}-7d4b9c8f5"), "uid": "0c9d4f1e-1111-4a2b-9c3d-5e6f7a8b9c0d",
                "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "v1", "time": "2026-01-05T10:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:generateName": {}}}}],
        },
        "spec": spec,
        "status": {},
    });
    if let Some(a) = template["metadata"].get("annotations") {
        pod["metadata"]["annotations"] = a.clone();
    }
    // The shape of a Pod: what k8s-openapi's type reads and writes back.
    let typed: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(pod.clone()).expect("a Pod");
    assert_eq!(
        serde_json::to_value(&typed).expect("JSON"),
        pod,
        "not a Pod's shape"
    );
    // Go writes a zero time as null.
    pod["metadata"]["creationTimestamp"] = Value::Null;
    pod
}

fn deployments() -> Vec<Value> {
    read_yaml(&samples().join("platform/kube/bookinfo.yaml"))
        .into_iter()
        .filter(|o| o["kind"] == "Deployment")
        .collect()
}

fn deployment(name: &str) -> Value {
    deployments()
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no deployment {name}"))
}

static UID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// The AdmissionReview the API server sends for `object` (`CREATE` by
/// the ReplicaSet controller unless `operation` says otherwise).
fn review(object: &Value, operation: &str) -> Value {
    let uid = format!(
        "5b3a0c2e-7f41-4d7a-9e0b-{:012x}",
        UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = match object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .split_once('/')
    {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            object["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
    };
    let resource = format!("{}s", kind.to_lowercase());
    let gvk = json!({"group": group, "version": version, "kind": kind});
    let gvr = json!({"group": group, "version": version, "resource": resource});
    let mut request = json!({
        "uid": uid, "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
        "namespace": object["metadata"]["namespace"], "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": "3c8f2a10-5d6e-4b7f-8a9c-0d1e2f3a4b5c",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]},
        "object": object, "oldObject": null, "dryRun": false,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    });
    if let Some(name) = object["metadata"]["name"].as_str() {
        request["name"] = json!(name);
    }
    if operation == "UPDATE" {
        request["oldObject"] = object.clone();
        request["options"] = json!({"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1"});
    }
    json!({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request})
}

/// POSTs `body` to `https://addr/inject` over HTTP/2, trusting `root_pem`
/// for `server_name`.
async fn post(
    addr: SocketAddr,
    root_pem: &[u8],
    server_name: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.expect("root PEM")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).expect("name");
    let tls = connector
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS to the webhook as {server_name}: {e}"));
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "HTTP/2");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::post(format!("https://{server_name}{path}?timeout=10s"))
        .header("content-type", "application/json")
        .header("accept", "application/json, */*")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The webhook's answer for `object`: whether it was allowed, the object
/// with the patch applied (unchanged without one) and the refusal's text.
struct Answer {
    allowed: bool,
    patched: Value,
    message: String,
    patch: Option<Value>,
}

fn answer(sent: &Value, reply: &Value) -> Answer {
    let req = &sent["request"];
    assert_eq!(reply["apiVersion"], "admission.k8s.io/v1", "{reply}");
    assert_eq!(reply["kind"], "AdmissionReview", "{reply}");
    let resp = &reply["response"];
    assert_eq!(resp["uid"], req["uid"], "the request's uid: {reply}");
    let mut patched = req["object"].clone();
    let patch = resp.get("patch").map(|p| {
        assert_eq!(resp["patchType"], "JSONPatch", "{reply}");
        let text = p.as_str().expect("the patch is base64 text");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64");
        let ops: Value = serde_json::from_slice(&bytes).expect("a JSON patch");
        let patch: json_patch::Patch = serde_json::from_value(ops.clone()).expect("RFC 6902");
        json_patch::patch(&mut patched, &patch).expect("the patch applies");
        ops
    });
    Answer {
        allowed: resp["allowed"] == true,
        patched,
        message: resp["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        patch,
    }
}

/// `ferry-pilot inject -f POD.yaml`'s Pod.
fn inject_output(pod: &Value, dir: &Path) -> Value {
    inject_docs(pod, dir)
        .into_iter()
        .find(|d| d["kind"] == "Pod")
        .expect("the Pod in inject's output")
}

/// The data of the bootstrap ConfigMap `ferry-pilot inject` writes beside `pod`.
fn inject_bootstrap(pod: &Value, dir: &Path) -> Value {
    inject_docs(pod, dir)
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the ConfigMap in inject's output")["data"]
        .clone()
}

fn inject_docs(pod: &Value, dir: &Path) -> Vec<Value> {
    let file = dir.join("pod.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(pod).expect("YAML")).expect("write");
    let out = Command::new(PILOT)
        .arg("inject")
        .arg("-f")
        .arg(&file)
        .args(INJECT_FLAGS)
        .output()
        .expect("run ferry-pilot inject");
    assert!(
        out.status.success(),
        "inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_objects(&String::from_utf8_lossy(&out.stdout))
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// Istio's injector configuration, pointed at ferry-pilot: by namespace
/// label, and by the Pod's own label in other namespaces.
fn webhook_configuration() -> Value {
    let hook = |name: &str, namespace_selector: Value, object_selector: Value| {
        json!({
            "name": name,
            "clientConfig": {"service": {"name": "ferry-pilot", "namespace": "istio-system",
                "path": "/inject", "port": 443}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                "resources": ["pods"], "scope": "*"}],
            "failurePolicy": "Fail", "matchPolicy": "Equivalent", "reinvocationPolicy": "Never",
            "sideEffects": "None", "timeoutSeconds": 10, "admissionReviewVersions": ["v1"],
            "namespaceSelector": namespace_selector, "objectSelector": object_selector,
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "istio-sidecar-injector", "labels": {"app": "sidecar-injector"}},
        "webhooks": [
            hook("namespace.sidecar-injector.istio.io",
                json!({"matchLabels": {"istio-injection": "enabled"}}),
                json!({"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]})),
            hook("object.sidecar-injector.istio.io",
                json!({"matchExpressions": [{"key": "istio-injection", "operator": "DoesNotExist"}]}),
                json!({"matchLabels": {"sidecar.istio.io/inject": "true"}})),
        ],
    })
}

async fn wait_ca_bundle(server: &ApiServer, bundle: &str, pilot: &Pilot) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let cfg = server
            .get(
                "mutatingwebhookconfigurations",
                "",
                "istio-sidecar-injector",
            )
            .expect("configuration");
        let hooks = cfg["webhooks"].as_array().expect("webhooks");
        if hooks
            .iter()
            .all(|h| h["clientConfig"]["caBundle"] == bundle)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "caBundle not set: {cfg}\n{}",
            pilot.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Pilot {
    child: Child,
    log: PathBuf,
}

impl Drop for Pilot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pilot {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reviews_of_bookinfo_pods_are_answered_with_injects_patch() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = ApiServer::start(Options::default()).await;
    for ns in read_yaml(&samples().join("platform/namespace.yaml")) {
        server.apply(ns);
    }
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy"}}));
    // A bootstrap from an older install, to be brought up to date.
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ferry-bootstrap", "namespace": "legacy"},
        "data": {"bootstrap.yaml": "stale"}}));
    server.apply(webhook_configuration());
    let dir = server.dir.join("webhook");
    std::fs::create_dir_all(&dir).expect("dir");
    let root = dir.join("root.pem");
    let webhook = free_addr();
    let log = dir.join("pilot.log");
    let child = Command::new(PILOT)
        .args(["serve-kube", "--listen"])
        .arg(free_addr().to_string())
        .arg("--webhook-addr")
        .arg(webhook.to_string())
        .arg("--ca-root-out")
        .arg(&root)
        .args(["--webhook-config", "istio-sidecar-injector"])
        .args(INJECT_FLAGS)
        .env("KUBECONFIG", server.kubeconfig_path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start ferry-pilot serve-kube");
    let pilot = Pilot { child, log };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(webhook).await.is_err() || !root.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the webhook does not listen: {}",
            pilot.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root_pem = std::fs::read(&root).expect("root");
    // The configuration's caBundle is the mesh CA's root, and is set
    // again when an upgrade resets it.
    let bundle = base64::engine::general_purpose::STANDARD.encode(&root_pem);
    wait_ca_bundle(&server, &bundle, &pilot).await;
    server.apply(webhook_configuration());
    wait_ca_bundle(&server, &bundle, &pilot).await;
    assert_eq!(
        server.count("PATCH", "mutatingwebhookconfigurations"),
        2,
        "patched at start and after the reset"
    );
    // The certificate the mesh CA made is for the default webhook name.
    let host = "ferry-pilot.istio-system.svc";
    let ask = |object: Value| {
        let root_pem = root_pem.clone();
        async move {
            let sent = review(&object, "CREATE");
            let (status, reply) = post(webhook, &root_pem, host, "/inject", &sent).await;
            assert_eq!(status, 200, "{reply}");
            answer(&sent, &reply)
        }
    };

    // Every bookinfo Pod in `default` (istio-injection=enabled): the patch
    // gives inject's Pod, named after its Deployment.
    for d in deployments() {
        let name = d["metadata"]["name"].as_str().expect("name").to_string();
        let pod = pod(&d, "default");
        let a = ask(pod.clone()).await;
        assert!(a.allowed, "{name}: {}", a.message);
        assert!(a.patch.is_some(), "{name}: no patch");
        assert_eq!(
            a.patched,
            inject_output(&pod, &dir),
            "{name}: the webhook's pod and inject's differ"
        );
        let containers = a.patched["spec"]["containers"]
            .as_array()
            .expect("containers");
        let proxy = containers.last().expect("proxy");
        assert_eq!(proxy["name"], "istio-proxy", "{name}");
        assert_eq!(proxy["image"], "ferry-proxy:0.1.0");
        assert_eq!(
            env_of(proxy, "ISTIO_META_WORKLOAD_NAME"),
            Some(name.as_str())
        );
        assert_eq!(
            a.patched["spec"]["initContainers"][0]["image"],
            "ferry-init:0.1.0"
        );
        assert_eq!(
            a.patched["metadata"]["labels"]["security.istio.io/tlsMode"],
            "istio"
        );
        // What the API server set stays (the token volume, the owner).
        assert_eq!(
            a.patched["spec"]["volumes"][0]["name"],
            "kube-api-access-x7k2p"
        );
        assert_eq!(
            a.patched["metadata"]["ownerReferences"],
            pod["metadata"]["ownerReferences"]
        );
    }

    // The namespace's bootstrap, which the sidecars mount: inject's.
    let cm = server
        .get("configmaps", "default", "ferry-bootstrap")
        .expect("the webhook wrote the bootstrap ConfigMap");
    assert_eq!(
        cm["data"],
        inject_bootstrap(&pod(&deployment("details-v1"), "default"), &dir)
    );
    assert!(
        server
            .get("configmaps", "istio-system", "ferry-bootstrap")
            .is_none()
    );

    // proxy.istio.io/config and traffic.sidecar.istio.io/* on productpage,
    // with a readiness probe to rewrite.
    let mut d = deployment("productpage-v1");
    d["spec"]["template"]["metadata"]["annotations"] = json!({
        "proxy.istio.io/config": "{\"holdApplicationUntilProxyStarts\": true, \"proxyMetadata\": {\"ISTIO_META_DNS_CAPTURE\": \"true\"}}",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32",
        "traffic.sidecar.istio.io/excludeInboundPorts": "9090",
    });
    d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/health", "port": 9080}, "periodSeconds": 5});
    let p = pod(&d, "default");
    let a = ask(p.clone()).await;
    assert!(a.allowed, "{}", a.message);
    assert_eq!(a.patched, inject_output(&p, &dir), "annotated productpage");
    let spec = &a.patched["spec"];
    assert_eq!(
        spec["containers"][0]["name"], "istio-proxy",
        "held: the proxy first"
    );
    assert_eq!(
        env_of(&spec["containers"][0], "ISTIO_META_DNS_CAPTURE"),
        Some("true")
    );
    assert_eq!(
        spec["initContainers"][0]["args"],
        json!([
            "iptables",
            "--exclude-outbound-ip-ranges=169.254.169.254/32",
            "--exclude-inbound-ports=9090"
        ])
    );
    assert_eq!(
        spec["containers"][1]["readinessProbe"]["httpGet"]["path"],
        "/app-health/productpage/readyz"
    );

    // sidecar.istio.io/inject: "false" in an enabled namespace: unchanged.
    let mut d = deployment("ratings-v1");
    d["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
    let p = pod(&d, "default");
    let a = ask(p.clone()).await;
    assert!(a.allowed && a.patch.is_none(), "opted out: {:?}", a.patch);

    // A namespace without the label: unchanged, unless the Pod asks.
    let details = deployment("details-v1");
    let p = pod(&details, "legacy");
    let a = ask(p.clone()).await;
    assert!(a.allowed && a.patch.is_none(), "legacy: {:?}", a.patch);
    let stale = server
        .get("configmaps", "legacy", "ferry-bootstrap")
        .expect("cm");
    assert_eq!(
        stale["data"]["bootstrap.yaml"], "stale",
        "nothing injected, nothing written"
    );
    let mut d = details.clone();
    d["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("true");
    let asked = pod(&d, "legacy");
    let a = ask(asked.clone()).await;
    assert!(a.allowed && a.patch.is_some(), "asked for: {}", a.message);
    assert_eq!(a.patched, inject_output(&asked, &dir));
    let cm = server
        .get("configmaps", "legacy", "ferry-bootstrap")
        .expect("cm");
    assert_eq!(
        cm["data"],
        inject_bootstrap(&asked, &dir),
        "brought up to date"
    );

    // A namespace the source has not seen yet (created a moment ago): the
    // API server's selector matched it; the Pod's own label still decides.
    let fresh = pod(&details, "fresh");
    let a = ask(fresh.clone()).await;
    assert!(a.allowed && a.patch.is_some(), "fresh: {}", a.message);
    assert_eq!(a.patched, inject_output(&fresh, &dir), "fresh namespace");
    let mut d = details.clone();
    d["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
    let a = ask(pod(&d, "fresh")).await;
    assert!(a.allowed && a.patch.is_none(), "fresh, opted out");

    // A dry run (`kubectl create --dry-run=server`) is answered alike and
    // writes nothing.
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "trial", "labels": {"istio-injection": "enabled"}}}));
    let trial = pod(&details, "trial");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let mut sent = review(&trial, "CREATE");
        sent["request"]["dryRun"] = json!(true);
        let (_, reply) = post(webhook, &root_pem, host, "/inject", &sent).await;
        let a = answer(&sent, &reply);
        if a.patch.is_some() {
            assert_eq!(a.patched, inject_output(&trial, &dir), "dry run");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "namespace trial not seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        server
            .get("configmaps", "trial", "ferry-bootstrap")
            .is_none(),
        "a dry run wrote"
    );

    // `kubectl label namespace legacy istio-injection=enabled`: seen
    // through the watch, the next Pod is injected.
    let mut ns = server.get("namespaces", "", "legacy").expect("legacy");
    ns["metadata"]["labels"] = json!({"istio-injection": "enabled"});
    server.apply(ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let a = ask(p.clone()).await;
        if a.patch.is_some() {
            assert_eq!(a.patched, inject_output(&p, &dir), "legacy, labelled");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the namespace label is not followed: {}",
            pilot.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A capture annotation ferry iptables has no flag for: refused, named.
    let mut d = deployment("reviews-v2");
    d["spec"]["template"]["metadata"]["annotations"] =
        json!({"traffic.sidecar.istio.io/includeOutboundPorts": "8080"});
    let a = ask(pod(&d, "default")).await;
    assert!(!a.allowed && a.patch.is_none());
    assert!(
        a.message
            .contains("traffic.sidecar.istio.io/includeOutboundPorts"),
        "{}",
        a.message
    );

    // Not a Pod being created: allowed as it is.
    let injected = inject_output(&pod(&deployment("reviews-v3"), "default"), &dir);
    let sent = review(&injected, "UPDATE");
    let (_, reply) = post(webhook, &root_pem, host, "/inject", &sent).await;
    let a = answer(&sent, &reply);
    assert!(a.allowed && a.patch.is_none(), "update: {reply}");
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "details", "namespace": "default"},
        "spec": {"ports": [{"port": 9080, "protocol": "TCP", "targetPort": 9080}], "selector": {"app": "details"}}});
    let a = ask(svc).await;
    assert!(a.allowed && a.patch.is_none(), "a Service");
    // Istio's per-revision paths are served too; others are not.
    let sent = review(&pod(&details, "default"), "CREATE");
    let (status, _) = post(
        webhook,
        &root_pem,
        host,
        "/inject/cluster/Kubernetes/net/network1",
        &sent,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(webhook, &root_pem, host, "/validate", &sent).await;
    assert_eq!(status, 404);
    assert!(
        pilot.log().contains("injection webhook serving"),
        "{}",
        pilot.log()
    );
}

/// `--webhook-cert/--webhook-key`'s path, through the library: the given
/// certificate is served, and the answer is the same patch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_certificate_is_served() {
    use ferry_pilot::inject::InjectOptions;
    use ferry_pilot::webhook::{Injector, ServingCert, serve, tls_config};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).expect("ca").pem();
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["injector.mesh.svc".to_string()]).expect("params");
    let cert = params
        .signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key))
        .expect("cert");
    let serving =
        ServingCert::given(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).expect("given");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let labels: BTreeMap<String, String> =
        [("istio-injection".to_string(), "enabled".to_string())].into();
    let injector = Arc::new(Injector::new(
        InjectOptions::default(),
        Arc::new(move |ns: &str| (ns == "default").then(|| labels.clone())),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        tls_config(Arc::new(serving)),
        injector,
        async {
            let _ = stopped.await;
        },
    ));
    let p = pod(&deployment("reviews-v1"), "default");
    let sent = review(&p, "CREATE");
    let (status, reply) = post(
        addr,
        ca_pem.as_bytes(),
        "injector.mesh.svc",
        "/inject",
        &sent,
    )
    .await;
    assert_eq!(status, 200);
    let a = answer(&sent, &reply);
    assert!(a.allowed, "{}", a.message);
    let mut want = serde_yaml_ng::to_value(&p).expect("YAML");
    assert!(ferry_pilot::inject::inject_pod(&mut want, &InjectOptions::default()).expect("inject"));
    assert_eq!(a.patched, serde_json::to_value(&want).expect("JSON"));
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the webhook stops")
        .expect("task");
}
