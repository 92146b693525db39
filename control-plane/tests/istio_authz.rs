//! AuthorizationPolicy translation against istiod's own builder goldens
//! (`shared/istio-goldens/authz-builder`, see its `cases.yaml`): every case
//! loads its policies, translates them for a sidecar in namespace `foo`
//! labelled `app: httpbin, version: v1`, and compares each emitted filter
//! with the golden one after both went through the xDS descriptors (so
//! field order, camelCase and map order do not matter). Also the wiring:
//! inbound HTTP chains get the RBAC filter before the router, TCP chains
//! before `tcp_proxy`, and only the policies selecting the proxy apply.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::listener::v3::{Filter, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter,
};
use ferry_envoy_json::Descriptors;
use ferry_pilot::istio::source::{Snapshot, load_dir, parse_documents};
use ferry_pilot::istio::translate::{Mesh, MeshOptions, Proxy};
use ferry_pilot::istio::types::mesh::ExtensionProvider;
use prost::Message;
use serde::Deserialize;
use serde_json::Value;

const HTTP_FILTER: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter";
const NETWORK_FILTER: &str = "envoy.config.listener.v3.Filter";

/// The goldens; their tests are ignored when Istio's material is absent (see build.rs), and
/// fail under `CI=true`.
fn goldens() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-goldens/authz-builder");
    assert!(
        p.is_dir(),
        "{} is missing (Istio's material, ../shared beside the repository)",
        p.display()
    );
    p
}

#[derive(Deserialize)]
struct Cases {
    mesh_configs: BTreeMap<String, MeshConfig>,
    http: Vec<Case>,
    tcp: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    extension_providers: Vec<ExtensionProvider>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    input: String,
    want: Vec<String>,
    mesh_config: Option<String>,
    trust_domain: Option<TrustDomain>,
}

#[derive(Deserialize)]
struct TrustDomain {
    local: String,
    aliases: Vec<String>,
}

/// The service the CUSTOM cases' providers point at.
const EXT_AUTHZ_SERVICE: &str = "apiVersion: v1\nkind: Service\n\
metadata: {name: my-custom-ext-authz, namespace: foo}\n\
spec: {clusterIP: 10.96.9.9, ports: [{name: grpc, port: 9000}]}\n";

fn mesh_for(dir: &Path, cases: &Cases, case: &Case) -> Mesh {
    let input = dir.join(&case.input);
    let text = std::fs::read_to_string(&input).expect("read input");
    let mut snap: Snapshot = parse_documents(&text, &input);
    let svc = parse_documents(EXT_AUTHZ_SERVICE, Path::new("ext-authz.yaml"));
    snap.resources.extend(svc.resources);
    assert!(snap.errors.is_empty(), "{}: {:?}", case.name, snap.errors);
    let mut options = MeshOptions::default();
    if let Some(td) = &case.trust_domain {
        options.trust_domain.clone_from(&td.local);
        options.trust_domain_aliases.clone_from(&td.aliases);
    }
    if let Some(mc) = &case.mesh_config {
        options.extension_providers = cases.mesh_configs[mc].extension_providers.clone();
    }
    Mesh::new(&snap, options)
}

fn httpbin() -> Proxy {
    Proxy {
        id: "sidecar~10.0.0.1~httpbin-1.foo~foo.svc.cluster.local".into(),
        namespace: "foo".into(),
        labels: [("app", "httpbin"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// A golden file through the descriptors: parsed as the proto, rendered back.
fn golden(d: &Descriptors, path: &Path, type_name: &str) -> Value {
    let text = std::fs::read_to_string(path).expect("read golden");
    let yaml: Value = serde_yaml_ng::from_str(&text).expect("golden YAML");
    match type_name {
        HTTP_FILTER => {
            let f: HttpFilter = d.from_json(type_name, yaml).expect("golden HttpFilter");
            d.to_json(type_name, &f).expect("render")
        }
        _ => {
            let f: Filter = d.from_json(type_name, yaml).expect("golden Filter");
            d.to_json(type_name, &f).expect("render")
        }
    }
}

/// Cases left out, with the reason (none today: CUSTOM is translated too).
const SKIPPED: &[(&str, &str)] = &[];

fn run(kind: &str) {
    let dir = goldens();
    let text = std::fs::read_to_string(dir.join("cases.yaml")).expect("cases.yaml");
    let cases: Cases = serde_yaml_ng::from_str(&text).expect("parse cases.yaml");
    let d = Descriptors::load().expect("descriptors");
    let list = if kind == "http" {
        &cases.http
    } else {
        &cases.tcp
    };
    let mut failures = Vec::new();
    let mut passed = 0;
    for case in list {
        if let Some((_, why)) = SKIPPED.iter().find(|(n, _)| *n == case.name) {
            eprintln!("{kind}/{}: skipped: {why}", case.name);
            continue;
        }
        let mesh = mesh_for(&dir, &cases, case);
        let got: Vec<Value> = if kind == "http" {
            mesh.authz_http_filters(&httpbin())
                .iter()
                .map(|f| d.to_json(HTTP_FILTER, f).expect("render"))
                .collect()
        } else {
            mesh.authz_network_filters(&httpbin())
                .iter()
                .map(|f| d.to_json(NETWORK_FILTER, f).expect("render"))
                .collect()
        };
        let type_name = if kind == "http" {
            HTTP_FILTER
        } else {
            NETWORK_FILTER
        };
        let want: Vec<Value> = case
            .want
            .iter()
            .map(|w| golden(&d, &dir.join(w), type_name))
            .collect();
        // `AUTHZ_DUMP=CASE` prints what was built for one case.
        if std::env::var("AUTHZ_DUMP").is_ok_and(|v| v == case.name) {
            eprintln!("{}", serde_json::to_string_pretty(&got).unwrap_or_default());
        }
        // istiod's second pass over the HTTP cases has its own goldens
        // (`extended-*`); they must say the same.
        for w in &case.want {
            let (dir_part, file) = w.rsplit_once('/').unwrap_or(("", w));
            let ext = dir.join(dir_part).join(format!("extended-{file}"));
            if ext.is_file() {
                assert_eq!(
                    golden(&d, &ext, type_name),
                    golden(&d, &dir.join(w), type_name),
                    "{}",
                    ext.display()
                );
            }
        }
        if got == want {
            passed += 1;
        } else {
            failures.push(format!(
                "{kind}/{}:\n got: {}\nwant: {}",
                case.name,
                serde_json::to_string_pretty(&got).unwrap_or_default(),
                serde_json::to_string_pretty(&want).unwrap_or_default()
            ));
        }
    }
    eprintln!("{kind}: {passed} golden cases pass");
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        list.len(),
        failures.join("\n\n")
    );
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn http_goldens_match_istiod() {
    run("http");
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn tcp_goldens_match_istiod() {
    run("tcp");
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/authz")
}

fn hcm_filters(chain_filters: &[Filter]) -> Vec<String> {
    let Some(filter::ConfigType::TypedConfig(any)) = chain_filters
        .iter()
        .find(|f| f.name == "envoy.filters.network.http_connection_manager")
        .and_then(|f| f.config_type.clone())
    else {
        return Vec::new();
    };
    let hcm = HttpConnectionManager::decode(&*any.value).expect("hcm");
    hcm.http_filters.iter().map(|f| f.name.clone()).collect()
}

fn inbound(mesh: &Mesh, app: &str, ip: &str) -> Listener {
    let mut p = Proxy {
        id: format!("sidecar~{ip}~{app}-v1-1.default~default.svc.cluster.local"),
        namespace: "default".into(),
        ips: vec![ip.into()],
        pod_name: Some(format!("{app}-v1-1")),
        ..Default::default()
    };
    mesh.complete_proxy(&mut p);
    let cfg = mesh.proxy_config(&p);
    cfg.listeners
        .into_iter()
        .find(|l| l.name == "virtualInbound")
        .expect("virtualInbound")
}

#[test]
fn inbound_chains_carry_the_policies_of_their_proxy() {
    let snap = load_dir(&fixtures()).expect("load");
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mesh = Mesh::new(&snap, MeshOptions::default());
    let reviews = inbound(&mesh, "reviews", "10.1.0.21");
    let http = reviews
        .filter_chains
        .iter()
        .find(|c| {
            c.name == "0.0.0.0_9080"
                && c.filters
                    .iter()
                    .any(|f| f.name == "envoy.filters.network.http_connection_manager")
        })
        .expect("reviews 9080 chain");
    assert_eq!(
        hcm_filters(&http.filters),
        [
            "envoy.filters.http.rbac",
            "envoy.filters.http.rbac",
            "istio.stats",
            "envoy.filters.http.router"
        ]
    );
    // The TCP port: network RBAC before tcp_proxy.
    let tcp = reviews
        .filter_chains
        .iter()
        .find(|c| c.name == "0.0.0.0_9000")
        .expect("reviews 9000 chain");
    let names: Vec<&str> = tcp.filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "envoy.filters.network.rbac",
            "envoy.filters.network.rbac",
            "envoy.filters.network.tcp_proxy"
        ]
    );
    // Policies selecting other workloads leave ratings alone but for the
    // mesh-wide one in the root namespace.
    let ratings = inbound(&mesh, "ratings", "10.1.0.31");
    let chain = ratings
        .filter_chains
        .iter()
        .find(|c| c.name == "0.0.0.0_9080")
        .expect("ratings 9080 chain");
    assert_eq!(
        hcm_filters(&chain.filters),
        [
            "envoy.filters.http.rbac",
            "istio.stats",
            "envoy.filters.http.router"
        ]
    );
}

#[test]
fn analyze_reports_authorization_policy_mistakes() {
    use ferry_pilot::istio::validate::validate;
    let snap = load_dir(&fixtures()).expect("load");
    let clean: Vec<String> = validate(&snap)
        .iter()
        .map(|f| format!("{} {}", f.code.id(), f.field))
        .collect();
    assert!(clean.is_empty(), "{clean:?}");

    let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: broken
  namespace: shop
  annotations: {istio.io/dry-run: "maybe"}
spec:
  selector: {matchLabels: {app: api}}
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/33], notRemoteIpBlocks: [not-an-ip]}
    to:
    - operation: {ports: ["http"]}
    when:
    - key: request.header[x-user]
      values: [a]
    - key: destination.port
      values: ["99999"]
    - key: source.ip
      notValues: [10.1.1.1/8, 1.2.3.4]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-shapes, namespace: shop}
spec:
  action: DENY
  rules:
  - to:
    - operation: {methods: [DELETE]}
  - from:
    - source: {namespaces: [a], serviceAccounts: [b]}
    - source: {}
"#;
    let snap = parse_documents(text, Path::new("broken.yaml"));
    let got: Vec<String> = validate(&snap)
        .iter()
        .map(|f| format!("{} {}", f.code.id(), f.field))
        .collect();
    assert_eq!(
        got,
        [
            "IST0106 metadata.annotations[istio.io/dry-run]",
            "IST0106 spec.rules[0].from[0].source.ipBlocks[0]",
            "IST0106 spec.rules[0].from[0].source.notRemoteIpBlocks[0]",
            "IST0106 spec.rules[0].to[0].operation.ports[0]",
            "IST0106 spec.rules[0].when[0].key",
            "IST0106 spec.rules[0].when[1].values[0]",
            "IST0127 spec.selector.matchLabels",
            "IST0133 spec.rules[0]",
            "IST0106 spec.rules[1].from[0].source",
            "IST0106 spec.rules[1].from[1].source",
        ]
    );
}

#[test]
fn mesh_config_sets_trust_domains_and_providers() {
    use ferry_pilot::istio::types::mesh::MeshConfig;
    let cfg: MeshConfig = serde_yaml_ng::from_str(
        "trustDomain: td1\ntrustDomainAliases: [cluster.local]\nenableTracing: true\n\
         outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n\
         extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc: {service: opa.authz.svc.cluster.local, port: 9191}\n\
         - name: zipkin\n  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}\n",
    )
    .expect("mesh config");
    let o = MeshOptions::from_mesh_config(&cfg);
    assert_eq!(o.trust_domain, "td1");
    assert_eq!(o.trust_domain_aliases, ["cluster.local"]);
    assert_eq!(o.root_namespace, "istio-system");
    // The two configured, then istiod's built-in `envoy` and `prometheus`.
    let names: Vec<&str> = o
        .extension_providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["opa", "zipkin", "envoy", "prometheus"]);
    assert_eq!(
        o.extension_providers[0]
            .envoy_ext_authz_grpc
            .as_ref()
            .map(|g| g.port),
        Some(9191)
    );
}

#[test]
fn analyze_checks_custom_providers_against_the_mesh_config() {
    use ferry_pilot::istio::validate::validate_mesh;
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: opa, namespace: authz}
spec: {clusterIP: 10.96.8.8, ports: [{name: grpc, port: 9191}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: good, namespace: shop}
spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: shop}
spec: {action: CUSTOM, provider: {name: opa2}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec: {action: CUSTOM, provider: {name: far}, rules: [{}]}
"#;
    let snap = parse_documents(text, Path::new("custom.yaml"));
    let providers = serde_json::json!([
        {"name": "opa", "envoyExtAuthzGrpc": {"service": "authz/opa.authz.svc.cluster.local", "port": 9191}},
        {"name": "far", "envoyExtAuthzHttp": {"service": "authz/opa", "port": 9191}},
    ]);
    let options = MeshOptions {
        extension_providers: serde_json::from_value(providers).expect("providers"),
        ..MeshOptions::default()
    };
    let got: Vec<String> = validate_mesh(&snap, &options)
        .iter()
        .map(|f| {
            format!(
                "{} {} {}",
                f.code.id(),
                f.resource.as_ref().map_or("", |r| r.name.as_str()),
                f.message
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "IST0101 typo extension provider \"opa2\" is not defined in meshConfig.extensionProviders",
            "IST0106 broken extension provider \"far\": service \"authz/opa\" not found",
        ]
    );
}

#[test]
fn gateway_servers_carry_the_policies_selecting_the_gateway_pod() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: ["*"]
  gateways: [shop]
  http:
  - route:
    - destination: {host: productpage}
  tcp:
  - route:
    - destination: {host: reviews, port: {number: 9000}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  rules:
  - to:
    - operation: {hosts: [shop.example.com]}
"#;
    let mut snap = load_dir(&fixtures()).expect("load");
    snap.resources
        .extend(parse_documents(extra, Path::new("gateway.yaml")).resources);
    let mesh = Mesh::new(&snap, MeshOptions::default());
    let gw = Proxy {
        node_type: ferry_pilot::istio::translate::NodeType::Router,
        id: "router~10.0.9.1~ingress-1.istio-system~istio-system.svc.cluster.local".into(),
        namespace: "istio-system".into(),
        labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
        ..Default::default()
    };
    let cfg = mesh.proxy_config(&gw);
    let http = cfg
        .listeners
        .iter()
        .find(|l| l.name.ends_with("_80"))
        .expect("port 80 listener");
    // The root namespace's mesh-wide DENY and the gateway's ALLOW, before
    // the traffic filters.
    assert_eq!(
        hcm_filters(&http.filter_chains[0].filters),
        [
            "envoy.filters.http.rbac",
            "envoy.filters.http.rbac",
            "envoy.filters.http.fault",
            "envoy.filters.http.cors",
            "envoy.filters.http.router"
        ]
    );
    let tcp = cfg
        .listeners
        .iter()
        .find(|l| l.name.ends_with("_31400"))
        .expect("port 31400 listener");
    let names: Vec<&str> = tcp.filter_chains[0]
        .filters
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.network.rbac",
            "envoy.filters.network.rbac",
            "envoy.filters.network.tcp_proxy"
        ]
    );
}

/// The istio.io authorization tasks (`shared/istio-samples/istio.io-tasks`),
/// step by step as `expectations.yaml` tells them, checked on the filters
/// the task's server proxy gets.
mod tasks {
    use super::*;

    fn dir(task: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/istio-samples/istio.io-tasks/security")
            .join(task);
        assert!(
            p.is_dir(),
            "{} is missing (Istio's material, ../shared beside the repository)",
            p.display()
        );
        Some(p)
    }

    /// tcp-echo (Service ports 9000 and 9001, pod port 9002) and httpbin
    /// (Service port 8000 to 80) in namespace `foo`, with sidecars.
    const FOO: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: foo}
spec:
  clusterIP: 10.96.7.10
  selector: {app: tcp-echo}
  ports: [{name: tcp, port: 9000}, {name: tcp-other, port: 9001}]
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-1, namespace: foo, labels: {app: tcp-echo, version: v1}}
spec: {serviceAccountName: default, containers: [{name: tcp-echo, image: x}]}
status: {podIP: 10.1.7.10}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  clusterIP: 10.96.7.20
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-1, namespace: foo, labels: {app: httpbin, version: v1}}
spec: {serviceAccountName: httpbin, containers: [{name: httpbin, image: x}]}
status: {podIP: 10.1.7.20}
"#;

    /// The mesh after applying `files` of `task` in order (a later file
    /// replaces an earlier policy of the same name, as `kubectl apply`).
    fn mesh_after(task: &Path, files: &[&str]) -> Mesh {
        let mut snap = parse_documents(FOO, Path::new("foo.yaml"));
        for f in files {
            let path = task.join(f);
            let text = std::fs::read_to_string(&path).expect("task file");
            for r in parse_documents(&text, &path).resources {
                snap.resources.retain(|o| o.key() != r.key());
                snap.resources.push(r);
            }
        }
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        Mesh::new(&snap, MeshOptions::default())
    }

    fn inbound_of(mesh: &Mesh, pod: &str, ip: &str) -> Listener {
        let mut p = Proxy {
            id: format!("sidecar~{ip}~{pod}.foo~foo.svc.cluster.local"),
            namespace: "foo".into(),
            ips: vec![ip.into()],
            pod_name: Some(pod.into()),
            ..Default::default()
        };
        mesh.complete_proxy(&mut p);
        mesh.proxy_config(&p)
            .listeners
            .into_iter()
            .find(|l| l.name == "virtualInbound")
            .expect("virtualInbound")
    }

    /// The RBAC configs (as JSON) on the chains of `port` (0: the
    /// pass-through chains), network ones for TCP chains, HTTP ones
    /// otherwise; one entry per chain.
    fn rbac_of(listener: &Listener, port: u32, http: bool) -> Vec<Vec<Value>> {
        let d = Descriptors::load().expect("descriptors");
        let mut out = Vec::new();
        for c in &listener.filter_chains {
            let dport = c
                .filter_chain_match
                .as_ref()
                .and_then(|m| m.destination_port.as_ref())
                .map_or(0, |p| p.value);
            if dport != port || c.name == "virtualInbound-blackhole" {
                continue;
            }
            let has_hcm = c
                .filters
                .iter()
                .any(|f| f.name == "envoy.filters.network.http_connection_manager");
            if has_hcm != http {
                continue;
            }
            let configs: Vec<Value> = if http {
                let Some(filter::ConfigType::TypedConfig(any)) = c
                    .filters
                    .iter()
                    .find(|f| f.name == "envoy.filters.network.http_connection_manager")
                    .and_then(|f| f.config_type.clone())
                else {
                    continue;
                };
                HttpConnectionManager::decode(&*any.value)
                    .expect("hcm")
                    .http_filters
                    .iter()
                    .filter(|f| f.name == "envoy.filters.http.rbac")
                    .map(|f| d.to_json(HTTP_FILTER, f).expect("json")["typed_config"].clone())
                    .collect()
            } else {
                c.filters
                    .iter()
                    .filter(|f| f.name == "envoy.filters.network.rbac")
                    .map(|f| d.to_json(NETWORK_FILTER, f).expect("json")["typed_config"].clone())
                    .collect()
            };
            out.push(configs);
        }
        assert!(!out.is_empty(), "no chain for port {port}");
        out
    }

    fn policy<'a>(rbac: &'a Value, name: &str) -> &'a Value {
        &rbac["rules"]["policies"][name]
    }

    #[test]
    #[cfg_attr(
        no_istio_material,
        ignore = "needs Istio's material in ../shared beside the repository"
    )]
    fn authz_tcp() {
        let Some(task) = dir("authz-tcp") else { return };
        let step = |files: &[&str]| {
            let mesh = mesh_after(&task, files);
            let l = inbound_of(&mesh, "tcp-echo-1", "10.1.7.10");
            (rbac_of(&l, 9000, false), rbac_of(&l, 0, false))
        };
        let name = "ns[foo]-policy[tcp-policy]-rule[0]";
        // 01: ports 9000 and 9001 allowed, the pod-only 9002 (pass-through)
        // falls under the same ALLOW filter and matches nothing.
        let (p9000, pass) = step(&["01-allow-ports-9000-9001.yaml"]);
        for chain in p9000.iter().chain(&pass) {
            assert_eq!(chain.len(), 1);
            let ports = &policy(&chain[0], name)["permissions"][0]["and_rules"]["rules"][0];
            assert_eq!(
                ports["or_rules"]["rules"],
                serde_json::json!([{"destination_port": 9000}, {"destination_port": 9001}])
            );
        }
        // 02: the ALLOW rule names `methods`: on TCP it is dropped, and an
        // ALLOW filter without policies rejects every connection.
        let (p9000, _) = step(&["02-allow-with-http-only-field.yaml"]);
        for chain in &p9000 {
            assert_eq!(chain[0]["rules"], serde_json::json!({}));
        }
        // 03: the DENY rule loses `methods` and denies everything.
        let (p9000, _) = step(&["03-deny-with-http-only-field.yaml"]);
        for chain in &p9000 {
            assert_eq!(chain[0]["rules"]["action"], "DENY");
            assert_eq!(
                policy(&chain[0], name)["permissions"][0]["and_rules"]["rules"],
                serde_json::json!([{"any": true}])
            );
        }
        // 04: with the port kept, only 9000 is denied.
        let (p9000, _) = step(&["04-deny-with-http-only-field-and-port.yaml"]);
        for chain in &p9000 {
            assert_eq!(
                policy(&chain[0], name)["permissions"][0]["and_rules"]["rules"],
                serde_json::json!([{"or_rules": {"rules": [{"destination_port": 9000}]}}])
            );
        }
    }

    #[test]
    #[cfg_attr(
        no_istio_material,
        ignore = "needs Istio's material in ../shared beside the repository"
    )]
    fn authz_deny() {
        let Some(task) = dir("authz-deny") else {
            return;
        };
        let http = |files: &[&str]| {
            let mesh = mesh_after(&task, files);
            rbac_of(&inbound_of(&mesh, "httpbin-1", "10.1.7.20"), 80, true)
        };
        // 01: GET denied.
        for chain in http(&["01-deny-method-get.yaml"]) {
            assert_eq!(chain.len(), 1);
            assert_eq!(chain[0]["rules"]["action"], "DENY");
        }
        // 02: GET denied unless `x-token: admin`.
        for chain in http(&["02-deny-method-get-unless-admin-token.yaml"]) {
            let p = policy(&chain[0], "ns[foo]-policy[deny-method-get]-rule[0]");
            assert_eq!(
                p["principals"][0]["and_ids"]["ids"][0]["not_id"]["or_ids"]["ids"][0]["header"],
                serde_json::json!({"name": "x-token", "string_match": {"exact": "admin"}})
            );
        }
        // 03: the DENY filter first, then the ALLOW one for `/ip`.
        for chain in http(&[
            "02-deny-method-get-unless-admin-token.yaml",
            "03-allow-path-ip.yaml",
        ]) {
            assert_eq!(chain.len(), 2);
            assert_eq!(chain[0]["rules"]["action"], "DENY");
            assert!(
                chain[1]["rules"]["action"].is_null(),
                "ALLOW is the default"
            );
            assert_eq!(
                policy(&chain[1], "ns[foo]-policy[allow-path-ip]-rule[0]")["permissions"][0]["and_rules"]
                    ["rules"][0]["or_rules"]["rules"][0]["url_path"],
                serde_json::json!({"path": {"exact": "/ip"}})
            );
        }
    }

    #[test]
    #[cfg_attr(
        no_istio_material,
        ignore = "needs Istio's material in ../shared beside the repository"
    )]
    fn authz_http_allow_nothing() {
        let Some(task) = dir("authz-http") else {
            return;
        };
        let bookinfo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/istio-samples/bookinfo/platform/kube/bookinfo.yaml");
        let mut snap = parse_documents(
            &std::fs::read_to_string(&bookinfo).expect("bookinfo"),
            &bookinfo,
        );
        let path = task.join("01-allow-nothing.yaml");
        snap.resources.extend(
            parse_documents(&std::fs::read_to_string(&path).expect("task"), &path).resources,
        );
        let mesh = Mesh::new(&snap, MeshOptions::default());
        let p = Proxy {
            id: "sidecar~10.1.0.5~reviews-v1-1.default~default.svc.cluster.local".into(),
            namespace: "default".into(),
            labels: [("app".to_string(), "reviews".to_string())].into(),
            ..Default::default()
        };
        let d = Descriptors::load().expect("descriptors");
        let filters = mesh.authz_http_filters(&p);
        assert_eq!(filters.len(), 1);
        let rbac = d.to_json(HTTP_FILTER, &filters[0]).expect("json")["typed_config"].clone();
        // A policy without rules matches nothing: ALLOW with it allows nothing.
        assert_eq!(
            rbac["rules"]["policies"]["ns[default]-policy[allow-nothing]-rule[0]"],
            serde_json::json!({"permissions": [{"not_rule": {"any": true}}],
                               "principals": [{"not_id": {"any": true}}]})
        );
    }
}
