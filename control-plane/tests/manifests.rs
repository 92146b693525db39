//! `manifests/kubernetes`: every object is what its Kubernetes type (k8s-openapi's,
//! generated from the API's OpenAPI schema) reads and writes back unchanged,
//! so no field is misspelt, misplaced or of the wrong type; and the pieces
//! agree with each other and with ferry-pilot: the ClusterRole grants what
//! the Kubernetes source watches and the webhook writes, a CRD exists for
//! every Istio kind the source reads, the Service, the container's ports
//! and the webhook configuration point at the same ports, and the
//! Deployment's arguments are ones `ferry-pilot serve-kube` accepts.

#![cfg(feature = "kube")]

use crate::kube_api;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_pilot::istio::kube_source::WATCHED;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube_api::read_yaml;
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/kubernetes")
}

/// `value` read as `T` and written back must be `value` itself.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> T {
    let name = format!(
        "{} {}",
        value["kind"].as_str().unwrap_or_default(),
        value["metadata"]["name"].as_str().unwrap_or_default()
    );
    let t: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{name}: not a {}: {e}", std::any::type_name::<T>()));
    let back = serde_json::to_value(&t).expect("JSON");
    assert_eq!(
        &back, value,
        "{name}: fields the type does not know or writes otherwise"
    );
    t
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    services: Vec<Service>,
    deployments: Vec<Deployment>,
    webhooks: Vec<MutatingWebhookConfiguration>,
    crds: Vec<CustomResourceDefinition>,
}

fn objects() -> Objects {
    let mut o = Objects::default();
    for file in ["ferry-pilot.yaml", "istio-crds.yaml"] {
        for v in read_yaml(&dir().join(file)) {
            match v["kind"].as_str().unwrap_or_default() {
                "Namespace" => o.namespaces.push(typed(&v)),
                "ServiceAccount" => o.accounts.push(typed(&v)),
                "ClusterRole" => o.roles.push(typed(&v)),
                "ClusterRoleBinding" => o.bindings.push(typed(&v)),
                "Service" => o.services.push(typed(&v)),
                "Deployment" => o.deployments.push(typed(&v)),
                "MutatingWebhookConfiguration" => o.webhooks.push(typed(&v)),
                "CustomResourceDefinition" => o.crds.push(typed(&v)),
                other => panic!("{file}: a {other} the test does not check"),
            }
        }
    }
    o
}

/// The value of `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

#[test]
fn the_manifests_are_kubernetes_objects_that_fit_together() {
    let o = objects();
    assert_eq!(
        (
            o.accounts.len(),
            o.roles.len(),
            o.bindings.len(),
            o.services.len(),
            o.deployments.len(),
            o.webhooks.len()
        ),
        (1, 1, 1, 1, 1, 1)
    );
    let ns = "istio-system";
    assert_eq!(o.namespaces[0].metadata.name.as_deref(), Some(ns));

    // RBAC: every watched kind listed and watched; the webhook's writes.
    let role = &o.roles[0];
    let allows = |group: &str, plural: &str, verb: &str| {
        role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|p| p == plural)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for &(group, _, _, plural) in WATCHED {
        for verb in ["get", "list", "watch"] {
            assert!(allows(group, plural, verb), "{verb} {plural}.{group}");
        }
    }
    for verb in ["get", "create", "update"] {
        assert!(allows("", "configmaps", verb), "{verb} configmaps");
    }
    for verb in ["get", "list", "watch", "patch"] {
        assert!(
            allows(
                "admissionregistration.k8s.io",
                "mutatingwebhookconfigurations",
                verb
            ),
            "{verb} mutatingwebhookconfigurations"
        );
    }
    let binding = &o.bindings[0];
    assert_eq!(
        binding.role_ref.name,
        role.metadata.name.clone().unwrap_or_default()
    );
    let account = &o.accounts[0];
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            Some(&subject.name),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", account.metadata.name.as_ref(), Some(ns))
    );

    // A CRD per Istio kind the source reads, served at the watched version.
    for &(group, version, kind, plural) in WATCHED.iter().filter(|w| w.0.ends_with(".istio.io")) {
        let crd = o
            .crds
            .iter()
            .find(|c| c.spec.group == group && c.spec.names.plural == plural)
            .unwrap_or_else(|| panic!("no CRD for {plural}.{group}"));
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.{group}").as_str())
        );
        assert_eq!(
            (crd.spec.names.kind.as_str(), crd.spec.scope.as_str()),
            (kind, "Namespaced")
        );
        let v = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == version)
            .expect("version");
        assert!(
            v.served && v.storage,
            "{plural}: {version} served and stored"
        );
        assert_eq!(crd.spec.versions.iter().filter(|v| v.storage).count(), 1);
    }

    // The Deployment runs serve-kube as the account, on the ports the
    // Service and the webhook configuration use.
    let d = &o.deployments[0];
    let pod = d.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name, account.metadata.name);
    let labels = d
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert_eq!(
        labels.get("sidecar.istio.io/inject").map(String::as_str),
        Some("false"),
        "no sidecar on the control plane"
    );
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args[0], "serve-kube");
    let container_ports: BTreeMap<String, i32> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    let xds = port_of(flag(&args, "--listen").expect("--listen"));
    let hook = port_of(flag(&args, "--webhook-addr").expect("--webhook-addr"));
    assert!(
        container_ports.values().any(|p| *p == xds) && container_ports.values().any(|p| *p == hook)
    );
    let svc = &o.services[0];
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    assert_eq!(
        svc.spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default()
            .get("app"),
        labels.get("app")
    );
    let target = |port: i32| -> i32 {
        let p = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("no Service port {port}"));
        match p.target_port.as_ref() {
            Some(IntOrString::Int(n)) => *n,
            Some(IntOrString::String(name)) => container_ports[name],
            None => p.port,
        }
    };
    assert_eq!(target(15010), xds);
    let host = format!("{svc_name}.{ns}.svc");
    assert_eq!(
        flag(&args, "--discovery-address"),
        Some(format!("{host}:{xds}").as_str())
    );
    assert_eq!(flag(&args, "--webhook-dns-name"), Some(host.as_str()));
    // What inject writes by default points at the same place.
    assert_eq!(
        ferry_pilot::inject::InjectOptions::default().discovery_address,
        format!("{host}:{xds}")
    );
    let image = |flag_name: &str| flag(&args, flag_name).map(str::to_string);
    let defaults = ferry_pilot::inject::InjectOptions::default();
    assert_eq!(image("--proxy-image"), Some(defaults.proxy_image));
    assert_eq!(image("--init-image"), Some(defaults.init_image));
    let readiness = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness");
    assert_eq!(
        readiness.port,
        IntOrString::Int(port_of(
            flag(&args, "--status-addr").expect("--status-addr")
        ))
    );

    let wh = &o.webhooks[0];
    assert_eq!(flag(&args, "--webhook-config"), wh.metadata.name.as_deref());
    for w in wh.webhooks.iter().flatten() {
        let s = w.client_config.service.as_ref().expect("service");
        assert_eq!(
            (s.name.as_str(), s.namespace.as_str()),
            (svc_name.as_str(), ns)
        );
        assert_eq!(s.path.as_deref(), Some(ferry_pilot::webhook::PATH));
        assert_eq!(target(s.port.unwrap_or(443)), hook, "{}", w.name);
        assert!(
            w.client_config.ca_bundle.is_none(),
            "ferry-pilot sets caBundle"
        );
        assert_eq!(w.admission_review_versions, vec!["v1".to_string()]);
        assert!(matches!(w.side_effects.as_str(), "None" | "NoneOnDryRun"));
    }
}

/// The container's arguments parse: with no cluster to reach, serve-kube
/// stops at connecting (exit 1, saying so), not at its arguments (exit 2).
#[test]
fn the_deployments_arguments_are_accepted_by_serve_kube() {
    let o = objects();
    let args = o.deployments[0]
        .spec
        .template
        .spec
        .as_ref()
        .expect("spec")
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-pilot"))
        .args(&args)
        .env("KUBECONFIG", "/nonexistent/ferry-test-kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run ferry-pilot");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no Kubernetes API"), "{err}");
}
