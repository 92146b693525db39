//! Real Envoy 1.40 as a bookinfo sidecar under `ferry-pilot`: the Istio
//! bookinfo sample (`bookinfo.yaml`, `destination-rule-all.yaml` and, in
//! turn, each `virtual-service-*.yaml`) translated for the productpage and
//! the reviews proxies; Envoy must ACK every resource (zero NACKs). Also the
//! refusal of an invalid change while the last good set keeps serving, and
//! AuthorizationPolicies of every action (RBAC and ext_authz filters) on
//! sidecars and a gateway.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_pilot::istio::source::load_dir;
use ferry_pilot::istio::translate::MeshOptions;
use ferry_pilot::pilot::Pilot;
use ferry_pilot::xds::{CLUSTER, Cache, ENDPOINT, LISTENER, ROUTE, Server, SyncState};
use serde_json::json;

/// The project's own bookinfo (`samples/bookinfo`, laid out as Istio's sample).
fn bookinfo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/bookinfo")
}

/// Istio's samples beside the repository; the tests using them are ignored when absent (see
/// build.rs) and fail under `CI=true`.
fn istio_samples() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-samples/bookinfo");
    assert!(
        p.is_dir(),
        "{} is missing (Istio's material, ../shared beside the repository)",
        p.display()
    );
    p
}

/// A directory with the bookinfo app, its destination rules and `vs`.
fn config_dir(bookinfo: &Path, vs: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-bookinfo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    for f in [
        "platform/kube/bookinfo.yaml",
        "networking/destination-rule-all.yaml",
        vs,
    ] {
        let src = bookinfo.join(f);
        std::fs::copy(&src, dir.join(src.file_name().expect("name"))).expect("copy");
    }
    dir
}

async fn start_pilot(dir: &Path) -> (Server, std::net::SocketAddr, Arc<Pilot>) {
    start_pilot_with(dir, MeshOptions::default()).await
}

async fn start_pilot_with(
    dir: &Path,
    options: MeshOptions,
) -> (Server, std::net::SocketAddr, Arc<Pilot>) {
    let snapshot = load_dir(dir).expect("load");
    let pilot = Arc::new(Pilot::new(&snapshot, options).expect("valid configuration"));
    let p = pilot.clone();
    let server = Server::per_node(Cache::new(), Arc::new(move |node, _| p.cache_for(node)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener, std::future::pending()).await });
    (server, addr, pilot)
}

fn node(app: &str, version: &str, ip: &str) -> (String, serde_json::Value) {
    (
        format!("sidecar~{ip}~{app}-{version}-7d9f.default~default.svc.cluster.local"),
        json!({"NAMESPACE": "default", "LABELS": {"app": app, "version": version},
               "SERVICE_ACCOUNT": format!("bookinfo-{app}"), "INSTANCE_IPS": ip}),
    )
}

async fn all_acked(server: &Server, envoy: &Envoy, node: &str) {
    let synced = server
        .wait_for(ENVOY_WAIT, |streams| {
            let s = streams.iter().find(|s| s.node_id == node)?;
            [CLUSTER, ENDPOINT, LISTENER, ROUTE]
                .iter()
                .all(|t| {
                    s.types
                        .get(*t)
                        .is_some_and(|t| t.state == SyncState::Synced)
                })
                .then(|| s.clone())
        })
        .await;
    let s = match synced {
        Ok(s) => s,
        Err(e) => panic!("{e}\nEnvoy log:\n{}", envoy.log()),
    };
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        assert_eq!(
            s.types[t].nacks, 0,
            "{node} {t}: {:?}",
            s.types[t].last_nack
        );
        assert!(s.types[t].sent_resources > 0, "{node} {t}: nothing sent");
    }
}

#[tokio::test]
async fn envoy_acks_every_bookinfo_virtual_service() {
    let bookinfo = bookinfo();
    let Some(bin) = envoy_binary() else { return };
    let mut files: Vec<String> = std::fs::read_dir(bookinfo.join("networking"))
        .expect("networking dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.starts_with("virtual-service-") && f.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for (i, vs) in files.iter().enumerate() {
        let dir = config_dir(&bookinfo, &format!("networking/{vs}"), &i.to_string());
        let (server, xds, _pilot) = start_pilot(&dir).await;
        for (app, version, ip) in [
            ("productpage", "v1", "10.0.0.11"),
            ("reviews", "v2", "10.0.0.12"),
        ] {
            let (id, meta) = node(app, version, ip);
            let api = if i % 2 == 0 { "GRPC" } else { "DELTA_GRPC" };
            let envoy = start_envoy(&bin, &id, api, xds, meta);
            all_acked(&server, &envoy, &id).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn invalid_change_is_refused_and_the_last_good_set_serves() {
    let bookinfo = bookinfo();
    let Some(bin) = envoy_binary() else { return };
    let dir = config_dir(
        &bookinfo,
        "networking/virtual-service-all-v1.yaml",
        "refuse",
    );
    let (server, xds, pilot) = start_pilot(&dir).await;
    let (id, meta) = node("productpage", "v1", "10.0.0.21");
    let envoy = start_envoy(&bin, &id, "GRPC", xds, meta);
    all_acked(&server, &envoy, &id).await;
    let before = server
        .status()
        .iter()
        .find(|s| s.node_id == id)
        .map(|s| s.types[ROUTE].acked_version.clone());

    // A VirtualService naming a subset that no DestinationRule defines.
    std::fs::write(
        dir.join("broken.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews-broken, namespace: default}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v9}\n",
    )
    .expect("write");
    let refused = pilot
        .update(&load_dir(&dir).expect("load"))
        .expect_err("must be refused");
    let text = refused.to_string();
    assert!(
        text.contains("IST0101") && text.contains("v9") && text.contains("broken.yaml"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = server
        .status()
        .iter()
        .find(|s| s.node_id == id)
        .map(|s| s.types[ROUTE].acked_version.clone());
    assert_eq!(before, after, "nothing was pushed");

    // Fixed: the change is pushed and ACKed.
    std::fs::remove_file(dir.join("broken.yaml")).expect("rm");
    std::fs::remove_file(dir.join("virtual-service-all-v1.yaml")).expect("rm");
    std::fs::copy(
        bookinfo.join("networking/virtual-service-reviews-test-v2.yaml"),
        dir.join("vs2.yaml"),
    )
    .expect("copy");
    let n = pilot.update(&load_dir(&dir).expect("load")).expect("valid");
    assert_eq!(n, 1);
    all_acked(&server, &envoy, &id).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway node (`router~…`) labelled as the ingress gateway.
fn gateway_node(ip: &str) -> (String, serde_json::Value) {
    (
        format!("router~{ip}~istio-ingressgateway-5b7.istio-system~istio-system.svc.cluster.local"),
        json!({"NAMESPACE": "istio-system", "LABELS": {"istio": "ingressgateway", "app": "istio-ingressgateway"},
               "SERVICE_ACCOUNT": "istio-ingressgateway-service-account", "INSTANCE_IPS": ip}),
    )
}

#[tokio::test]
async fn envoy_acks_gateway_listeners_of_every_server_kind() {
    let Some(bin) = envoy_binary() else { return };
    // HTTP, HTTPS SIMPLE and MUTUAL, PASSTHROUGH, ISTIO_MUTUAL and TCP
    // servers, a delegate and weighted routes.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gateway");
    let (server, xds, _pilot) = start_pilot(&dir).await;
    for (i, api) in ["GRPC", "DELTA_GRPC"].iter().enumerate() {
        let (id, meta) = gateway_node(&format!("10.0.9.{}", i + 1));
        let envoy = start_envoy(&bin, &id, api, xds, meta);
        all_acked(&server, &envoy, &id).await;
        let s = server
            .status()
            .into_iter()
            .find(|s| s.node_id == id)
            .expect("status");
        assert!(
            s.types[LISTENER].sent_resources >= 5,
            "{id}: {:?}",
            s.types[LISTENER]
        );
    }
    // An east-west gateway: AUTO_PASSTHROUGH chains by istiod's SNI.
    let id = "router~10.0.9.20~eastwest-1.shop~shop.svc.cluster.local".to_string();
    let meta = json!({"NAMESPACE": "shop", "LABELS": {"istio": "eastwestgateway"}, "INSTANCE_IPS": "10.0.9.20"});
    let envoy = start_envoy(&bin, &id, "DELTA_GRPC", xds, meta);
    // No HTTP server: no route configurations to ask for.
    types_acked(&server, &envoy, &id, &[CLUSTER, ENDPOINT, LISTENER]).await;
    // A sidecar of the same mesh: TLS routes by SNI, weighted.
    let id = "sidecar~10.1.1.10~productpage-1.shop~shop.svc.cluster.local".to_string();
    let meta =
        json!({"NAMESPACE": "shop", "LABELS": {"app": "productpage"}, "INSTANCE_IPS": "10.1.1.10"});
    let envoy = start_envoy(&bin, &id, "GRPC", xds, meta);
    all_acked(&server, &envoy, &id).await;
}

#[tokio::test]
async fn envoy_acks_the_bookinfo_gateway() {
    let bookinfo = bookinfo();
    let Some(bin) = envoy_binary() else { return };
    let dir = config_dir(&bookinfo, "networking/bookinfo-gateway.yaml", "gateway");
    let (server, xds, _pilot) = start_pilot(&dir).await;
    let (id, meta) = gateway_node("10.0.9.10");
    let envoy = start_envoy(&bin, &id, "GRPC", xds, meta);
    all_acked(&server, &envoy, &id).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `types` are ACKed by `node`, and checks they had no NACK.
async fn types_acked(server: &Server, envoy: &Envoy, node: &str, types: &[&str]) {
    let synced = server
        .wait_for(ENVOY_WAIT, |streams| {
            let s = streams.iter().find(|s| s.node_id == node)?;
            types
                .iter()
                .all(|t| {
                    s.types
                        .get(*t)
                        .is_some_and(|t| t.state == SyncState::Synced)
                })
                .then(|| s.clone())
        })
        .await;
    let s = match synced {
        Ok(s) => s,
        Err(e) => panic!("{e}\nEnvoy log:\n{}", envoy.log()),
    };
    for t in types {
        assert_eq!(
            s.types[*t].nacks, 0,
            "{node} {t}: {:?}",
            s.types[*t].last_nack
        );
        assert!(s.types[*t].sent_resources > 0, "{node} {t}: nothing sent");
    }
}

#[tokio::test]
async fn envoy_acks_auto_mtls_clusters_and_peer_authentication_chains() {
    let Some(bin) = envoy_binary() else { return };
    // Injected namespace, auto-mTLS clusters, STRICT, PERMISSIVE (port
    // level) and DISABLE inbound chains.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mtls");
    let (server, xds, _pilot) = start_pilot(&dir).await;
    let node = |pod: &str, ns: &str, ip: &str, labels: serde_json::Value| {
        (
            format!("sidecar~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
            json!({"NAMESPACE": ns, "LABELS": labels, "INSTANCE_IPS": ip}),
        )
    };
    // ledger: every cluster has auto mTLS. Their secrets never come (no
    // agent here), so Envoy keeps the clusters warming and never asks for
    // listeners: clusters and endpoints must be ACKed.
    let (id, meta) = node(
        "ledger-1",
        "bank",
        "10.1.2.10",
        json!({"app": "ledger", "version": "v1", "security.istio.io/tlsMode": "istio"}),
    );
    let envoy = start_envoy(&bin, &id, "GRPC", xds, meta);
    types_acked(&server, &envoy, &id, &[CLUSTER, ENDPOINT]).await;
    // vault: its Sidecar imports only the legacy namespace (no mTLS
    // there), so its clusters warm and its PERMISSIVE inbound chains
    // (mTLS and plaintext) reach Envoy: everything ACKed.
    let (id, meta) = node(
        "vault-1",
        "bank",
        "10.1.2.30",
        json!({"app": "vault", "security.istio.io/tlsMode": "istio"}),
    );
    let envoy = start_envoy(&bin, &id, "DELTA_GRPC", xds, meta);
    all_acked(&server, &envoy, &id).await;
}

#[tokio::test]
async fn envoy_acks_locality_priorities_weights_and_warmup() {
    let Some(bin) = envoy_binary() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/locality");
    let (server, xds, _pilot) = start_pilot(&dir).await;
    // The client pod's locality (us-west/zone1/a) comes from its Pod.
    let id = "sidecar~10.2.0.100~client.geo~geo.svc.cluster.local".to_string();
    let meta =
        json!({"NAMESPACE": "geo", "LABELS": {"app": "client"}, "INSTANCE_IPS": "10.2.0.100"});
    let envoy = start_envoy(&bin, &id, "DELTA_GRPC", xds, meta);
    all_acked(&server, &envoy, &id).await;
}

/// A gateway for the authz fixture, a CUSTOM policy and one for the
/// gateway pod.
const AUTHZ_EXTRA: &str = r#"
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
    - destination: {host: productpage, port: {number: 9080}}
  tcp:
  - match: [{port: 31400}]
    route:
    - destination: {host: reviews, port: {number: 9000}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  rules:
  - from:
    - source: {remoteIpBlocks: [10.0.0.0/8], notRequestPrincipals: ["*"]}
    to:
    - operation: {hosts: ["shop.example.com", "*.shop.example.com"], ports: ["80"]}
  - to:
    - operation: {ports: ["31400"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-ext, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: CUSTOM
  provider: {name: ratings-authz}
  rules:
  - to:
    - operation: {paths: [/api/*]}
    when:
    - key: request.headers[x-tenant]
      values: [shop-*]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-audit, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: AUDIT
  rules:
  - to:
    - operation: {paths: ["/login", "/logout"]}
"#;

#[tokio::test]
async fn envoy_acks_authorization_policies() {
    let Some(bin) = envoy_binary() else { return };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/authz");
    let dir = std::env::temp_dir().join(format!("ferry-authz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    for f in ["workloads.yaml", "policies.yaml"] {
        std::fs::copy(fixtures.join(f), dir.join(f)).expect("copy");
    }
    std::fs::write(dir.join("extra.yaml"), AUTHZ_EXTRA).expect("write");
    let providers: serde_json::Value = json!([{
        "name": "ratings-authz",
        "envoyExtAuthzGrpc": {"service": "default/ratings.default.svc.cluster.local", "port": 9080,
                              "timeout": "0.5s", "statusOnError": "503"}
    }]);
    let options = MeshOptions {
        extension_providers: serde_json::from_value(providers).expect("providers"),
        trust_domain_aliases: vec!["old.example".into()],
        ..MeshOptions::default()
    };
    let (server, xds, _pilot) = start_pilot_with(&dir, options).await;
    for (i, (app, ip)) in [
        ("reviews", "10.1.0.21"),
        ("productpage", "10.1.0.11"),
        ("ratings", "10.1.0.31"),
    ]
    .into_iter()
    .enumerate()
    {
        let (id, _) = node(app, "v1", ip);
        let meta = json!({"NAMESPACE": "default", "LABELS": {"app": app, "version": "v1"},
                          "INSTANCE_IPS": ip});
        let api = if i % 2 == 0 { "GRPC" } else { "DELTA_GRPC" };
        let envoy = start_envoy(&bin, &id, api, xds, meta);
        all_acked(&server, &envoy, &id).await;
        let expected: &[&str] = match app {
            "reviews" => &[
                "envoy.filters.http.rbac",
                "envoy.filters.network.rbac",
                "shadow_rules",
                "ns[default]-policy[reviews-viewer]-rule[1]",
            ],
            "productpage" => &[
                "envoy.filters.http.ext_authz",
                "envoy.filters.network.ext_authz",
                "ns[default]-policy[productpage-audit]-rule[0]",
            ],
            _ => &["ns[istio-system]-policy[deny-test-net]-rule[0]"],
        };
        assert_in_dump(&envoy, expected).await;
    }
    let (id, meta) = gateway_node("10.0.9.30");
    let envoy = start_envoy(&bin, &id, "DELTA_GRPC", xds, meta);
    all_acked(&server, &envoy, &id).await;
    assert_in_dump(
        &envoy,
        &[
            "ns[istio-system]-policy[ingress]-rule[0]",
            "ns[istio-system]-policy[ingress]-rule[1]",
        ],
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The active configuration of `envoy` names each of `needles`.
async fn assert_in_dump(envoy: &Envoy, needles: &[&str]) {
    let (status, dump) = http_get(envoy.admin().await, "/config_dump").await;
    assert_eq!(status, 200);
    for n in needles {
        assert!(dump.contains(n), "{n} not in the config dump");
    }
}

/// tcp-echo and httpbin in namespace `foo`, as the istio.io tasks set up
/// (without injection: this Envoy has no SDS server for mTLS certificates).
const FOO_WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo}
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

#[tokio::test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
async fn envoy_acks_the_istio_io_authorization_tasks() {
    let bookinfo = istio_samples();
    let Some(bin) = envoy_binary() else { return };
    let tasks = bookinfo.join("../istio.io-tasks/security");
    let foo_node = |pod: &str, app: &str, ip: &str| {
        (
            format!("sidecar~{ip}~{pod}.foo~foo.svc.cluster.local"),
            json!({"NAMESPACE": "foo", "LABELS": {"app": app, "version": "v1"}, "INSTANCE_IPS": ip}),
        )
    };
    let bookinfo_files = [
        bookinfo.join("platform/kube/bookinfo.yaml"),
        bookinfo.join("networking/bookinfo-gateway.yaml"),
    ];
    // (task, files applied together, bookinfo or foo)
    let steps: &[(&str, &[&str], bool)] = &[
        (
            "authz-http",
            &[
                "01-allow-nothing.yaml",
                "02-productpage-viewer.yaml",
                "03-bookinfo-gateway-viewer.yaml",
                "04-details-viewer.yaml",
                "05-reviews-viewer.yaml",
                "06-ratings-viewer.yaml",
            ],
            true,
        ),
        (
            "authn-policy",
            &["09-frontend-ingress-deny-no-principal.yaml"],
            true,
        ),
        (
            "authn-policy",
            &["10-frontend-ingress-deny-no-principal-per-path.yaml"],
            true,
        ),
        ("authz-tcp", &["01-allow-ports-9000-9001.yaml"], false),
        ("authz-tcp", &["02-allow-with-http-only-field.yaml"], false),
        ("authz-tcp", &["03-deny-with-http-only-field.yaml"], false),
        (
            "authz-tcp",
            &["04-deny-with-http-only-field-and-port.yaml"],
            false,
        ),
        ("authz-deny", &["01-deny-method-get.yaml"], false),
        (
            "authz-deny",
            &[
                "02-deny-method-get-unless-admin-token.yaml",
                "03-allow-path-ip.yaml",
            ],
            false,
        ),
        (
            "authz-jwt",
            &["01-request-authentication.yaml", "02-require-jwt.yaml"],
            false,
        ),
        (
            "authz-jwt",
            &[
                "01-request-authentication.yaml",
                "03-require-jwt-group-claim.yaml",
            ],
            false,
        ),
    ];
    for (i, (task, files, on_bookinfo)) in steps.iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("ferry-authz-task-{i}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        if *on_bookinfo {
            for f in &bookinfo_files {
                std::fs::copy(f, dir.join(f.file_name().expect("name"))).expect("copy");
            }
        } else {
            std::fs::write(dir.join("foo.yaml"), FOO_WORKLOADS).expect("write");
        }
        for f in *files {
            std::fs::copy(tasks.join(task).join(f), dir.join(f)).expect("copy task file");
        }
        let (server, xds, _pilot) = start_pilot(&dir).await;
        let nodes = if *on_bookinfo {
            vec![
                node("productpage", "v1", "10.0.0.11"),
                node("reviews", "v2", "10.0.0.12"),
                gateway_node("10.0.9.40"),
            ]
        } else {
            vec![
                foo_node("tcp-echo-1", "tcp-echo", "10.1.7.10"),
                foo_node("httpbin-1", "httpbin", "10.1.7.20"),
            ]
        };
        for (id, meta) in nodes {
            let envoy = start_envoy(&bin, &id, "GRPC", xds, meta);
            all_acked(&server, &envoy, &id).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Istio's sample JWKS (the demo tokens' key).
const DEMO_JWKS: &str = r#"{ "keys":[ {"e":"AQAB","kid":"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ","kty":"RSA","n":"xAE7eB6qugXyCAG3yhh7pkDkT65pHymX-P7KfIupjf59vsdo91bSP9C8H07pSAGQO1MV_xFj9VswgsCg4R6otmg5PV2He95lZdHtOcU5DXIg_pbhLdKXbi66GlVeK6ABZOUW3WYtnNHD-91gVuoeJT_DwtGGcp4ignkgXfkiEm4sw-4sfb4qdt5oLbyVpmW6x9cfa7vs2WTfURiCrBoUqgBo_-4WTiULmmHSGZHOjzwa8WtrtOQGsAFjIbno85jp6MnGGGZPYZbDAa_b3y5u-YpW7ypZrvD8BgtKVjgtQgZhLAGezMt0ua3DRrWnKqTZ0BJ_EyxOGuHJrLsn00fnMQ"}]}"#;

/// Serves `body` to every HTTP request on a loopback port (a JWKS server).
fn serve_jwks(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// RequestAuthentication on a sidecar and on a gateway: one rule with an
/// inline JWKS, one whose `jwksUri` ferry-pilot fetches and inlines, one
/// whose `jwksUri` cannot be fetched (the fallback key set), all the token
/// locations and outputs; Envoy ACKs the jwt_authn filters istiod's way.
#[tokio::test]
async fn envoy_acks_request_authentication() {
    let Some(bin) = envoy_binary() else { return };
    let jwks_port = serve_jwks(DEMO_JWKS);
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let dir = std::env::temp_dir().join(format!("ferry-jwt-ack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("foo.yaml"), FOO_WORKLOADS).expect("write");
    let inline = serde_json::to_string(DEMO_JWKS).expect("quote");
    let policies = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt-example, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: testing@secure.istio.io
    jwksUri: http://127.0.0.1:{jwks_port}/jwks.json
  - issuer: inline.example
    jwks: {inline}
    audiences: [httpbin.foo]
    fromHeaders: [{{name: x-jwt, prefix: "Token "}}]
    fromParams: [token]
    fromCookies: [session]
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
    forwardOriginalToken: true
  - issuer: unreachable.example
    jwksUri: http://127.0.0.1:{dead_port}/keys
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: ingress-jwt, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  jwtRules:
  - issuer: testing@secure.istio.io
    jwksUri: http://127.0.0.1:{jwks_port}/jwks.json
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: [group1]}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: httpbin-gateway, namespace: foo}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ["*"]}}]
"#
    );
    std::fs::write(dir.join("jwt.yaml"), policies).expect("write");
    let (server, xds, _pilot) = start_pilot(&dir).await;
    let (id, meta) = (
        "sidecar~10.1.7.20~httpbin-1.foo~foo.svc.cluster.local".to_string(),
        json!({"NAMESPACE": "foo", "LABELS": {"app": "httpbin", "version": "v1"}, "INSTANCE_IPS": "10.1.7.20"}),
    );
    let envoy = start_envoy(&bin, &id, "DELTA_GRPC", xds, meta);
    all_acked(&server, &envoy, &id).await;
    assert_in_dump(
        &envoy,
        &[
            "envoy.filters.http.jwt_authn",
            "origins-0",
            "origins-2",
            "allow_missing",
            "requires_all",
            "x-jwt-payload",
            "DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ",
            "ferry-unfetched",
        ],
    )
    .await;
    let (id, meta) = gateway_node("10.0.9.50");
    let envoy = start_envoy(&bin, &id, "GRPC", xds, meta);
    types_acked(&server, &envoy, &id, &[LISTENER, ROUTE]).await;
    assert_in_dump(&envoy, &["envoy.filters.http.jwt_authn", "origins-0"]).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// meshConfig `accessLogFile` with istiod's TEXT and JSON formats: Envoy ACKs the
/// access logs on every connection manager, TCP proxy and listener (the `NR` filter),
/// on sidecars and gateways.
#[tokio::test]
async fn envoy_acks_mesh_access_logs() {
    let bookinfo = bookinfo();
    let Some(bin) = envoy_binary() else { return };
    for (i, json) in [false, true].into_iter().enumerate() {
        let dir = config_dir(
            &bookinfo,
            "networking/virtual-service-all-v1.yaml",
            &format!("alog{i}"),
        );
        let options = MeshOptions {
            access_log: ferry_pilot::istio::translate::access_log::MeshAccessLog {
                file: "/dev/stdout".into(),
                json,
                ..Default::default()
            },
            ..MeshOptions::default()
        };
        let (server, xds, _pilot) = start_pilot_with(&dir, options).await;
        let (id, meta) = node("productpage", "v1", "10.0.0.41");
        let envoy = start_envoy(&bin, &id, "DELTA_GRPC", xds, meta);
        all_acked(&server, &envoy, &id).await;
        let format_marker = if json {
            "upstream_transport_failure_reason"
        } else {
            "%UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS%"
        };
        assert_in_dump(
            &envoy,
            &[
                "envoy.access_loggers.file",
                "/dev/stdout",
                "response_flag_filter",
                format_marker,
            ],
        )
        .await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The Telemetry API as istiod applies it (an OTLP tracer for the mesh, Zipkin for
/// productpage's server side, the built-in and a JSON file access log), with the collector
/// services in the registry: Envoy accepts every listener, with the tracers, Istio's span
/// tags and the UUID request id extension in place.
#[tokio::test]
async fn envoy_acks_telemetry_tracing_and_access_logs() {
    let bookinfo = bookinfo();
    let Some(bin) = envoy_binary() else { return };
    let dir = config_dir(
        &bookinfo,
        "networking/virtual-service-all-v1.yaml",
        "telemetry",
    );
    let log = dir.join("access.json");
    std::fs::write(
        dir.join("telemetry.yaml"),
        r#"
apiVersion: v1
kind: Service
metadata: {name: zipkin, namespace: istio-system}
spec: {clusterIP: 10.96.9.1, ports: [{name: http, port: 9411}]}
---
apiVersion: v1
kind: Service
metadata: {name: otel, namespace: istio-system}
spec: {clusterIP: 10.96.9.2, ports: [{name: grpc, port: 4317}, {name: http, port: 4318}]}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 10
    customTags: {team: {literal: {value: shop}}}
  accessLogging:
  - providers: [{name: envoy}, {name: json-log}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: productpage, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  tracing:
  - match: {mode: SERVER}
    providers: [{name: zipkin}]
"#,
    )
    .expect("write telemetry");
    let mesh: ferry_pilot::istio::types::mesh::MeshConfig = serde_yaml_ng::from_str(&format!(
        r#"
extensionProviders:
- name: otel
  opentelemetry: {{service: otel.istio-system.svc.cluster.local, port: 4317}}
- name: zipkin
  zipkin: {{service: zipkin.istio-system.svc.cluster.local, port: 9411}}
- name: json-log
  envoyFileAccessLog:
    path: {}
    logFormat: {{labels: {{code: "%RESPONSE_CODE%"}}}}
"#,
        log.display()
    ))
    .expect("mesh config");
    let options = MeshOptions::from_mesh_config(&mesh);
    assert!(options.telemetry_problems().is_empty());
    let (server, xds, _pilot) = start_pilot_with(&dir, options).await;
    let (id, meta) = node("productpage", "v1", "10.0.0.42");
    let envoy = start_envoy(&bin, &id, "DELTA_GRPC", xds, meta);
    all_acked(&server, &envoy, &id).await;
    assert_in_dump(
        &envoy,
        &[
            "envoy.tracers.opentelemetry",
            "outbound|4317||otel.istio-system.svc.cluster.local",
            "envoy.tracers.zipkin",
            "http://zipkin.istio-system.svc.cluster.local/api/v2/spans",
            "istio.canonical_service",
            "UuidRequestIdConfig",
            "access.json",
        ],
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
