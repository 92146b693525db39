//! The Kubernetes source against an API server that speaks the real
//! protocol ([`kube_api`]: HTTPS, bearer token, paged lists, watches with
//! bookmarks and 410 Gone), on bookinfo as a cluster holds it: Namespaces,
//! Services, one Pod per Deployment with its status, the EndpointSlices the
//! endpoint controller would write, the ingress gateway's Service and Pod,
//! and Istio's resources (two of Istio's CRDs not installed, one of them
//! installed later). The same objects, as the server stores them, are also
//! written to files: every proxy's translation from the API must equal its
//! translation from the files, first, once the CRD is installed, after
//! changes seen through the watch, after watches resume from a bookmark,
//! and after a relist forced by 410 Gone.

#![cfg(feature = "kube")]

use crate::kube_api;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use ferry_envoy_json::istio_nds::NameTable;
use ferry_pilot::istio::kube_source::{KubeSource, WATCHED};
use ferry_pilot::istio::source::{Snapshot, Source, load_dir};
use ferry_pilot::istio::translate::{Mesh, MeshOptions, NodeType, Proxy};
use kube_api::{ApiServer, KINDS, Options, read_yaml};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn samples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/bookinfo")
}

/// A running Pod as the API server shows it, for a Deployment's template.
fn pod(deployment: &Value, index: usize, ip: &str) -> Value {
    let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = deployment["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let template = &deployment["spec"]["template"];
    let mut labels = template["metadata"]["labels"].clone();
    labels["pod-template-hash"] = json!("7d4b9c8f5");
    let mut spec = template["spec"].clone();
    spec["nodeName"] = json!("node-1");
    spec["restartPolicy"] = json!("Always");
    spec["dnsPolicy"] = json!("ClusterFirst");
    spec["schedulerName"] = json!("default-scheduler");
    spec["terminationGracePeriodSeconds"] = json!(30);
    if let Some(sa) = spec.get("serviceAccountName").cloned() {
        spec["serviceAccount"] = sa;
    }
    let statuses: Vec<Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            json!({"name": c["name"], "ready": true, "restartCount": 0,
                   "image": c["image"], "imageID": "", "started": true,
                   "state": {"running": {"startedAt": "2026-01-05T10:00:04Z"}}})
        })
        .collect();
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{name}-7d4b9c8f5-{}", ["x2k9p", "b7qzt", "m4wvd", "c8rjn", "h5tgs", "p9lkf", "z3nqa"][index % 7]),
            "generateName": format!("{name}-7d4b9c8f5-"),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{name}-7d4b9c8f5"), "uid": "0c9d4f1e-1111-4a2b-9c3d-5e6f7a8b9c0d",
                "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": spec,
        "status": {
            "phase": "Running", "hostIP": "172.18.0.2", "hostIPs": [{"ip": "172.18.0.2"}],
            "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "BestEffort",
            "startTime": "2026-01-05T10:00:01Z",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-05T10:00:05Z"},
                           {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-05T10:00:01Z"}],
            "containerStatuses": statuses,
        }
    });
    if let Some(a) = template["metadata"].get("annotations") {
        pod["metadata"]["annotations"] = a.clone();
    }
    pod
}

/// The EndpointSlice the endpoint controller writes for `service` and the
/// ready `pods` its selector matches.
fn endpoint_slice(service: &Value, pods: &[Value]) -> Value {
    let name = service["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = service["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let selector = service["spec"]["selector"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let endpoints: Vec<Value> = pods
        .iter()
        .filter(|p| p["metadata"]["namespace"] == namespace)
        .filter(|p| {
            selector
                .iter()
                .all(|(k, v)| &p["metadata"]["labels"][k] == v)
        })
        .map(|p| {
            json!({"addresses": [p["status"]["podIP"]],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-1",
                   "targetRef": {"kind": "Pod", "namespace": namespace, "name": p["metadata"]["name"],
                                 "uid": p["metadata"]["uid"]}})
        })
        .collect();
    let ports: Vec<Value> = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            json!({"name": p["name"], "protocol": "TCP",
                   "port": p.get("targetPort").filter(|t| t.is_u64()).unwrap_or(&p["port"])})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-8xk2q"), "namespace": namespace,
            "generateName": format!("{name}-"),
            "labels": {"kubernetes.io/service-name": name,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                "uid": service["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// A Service as the API server returns it (cluster IP allocated, defaults
/// filled in).
fn service(mut svc: Value, cluster_ip: &str) -> Value {
    svc["metadata"]["namespace"] = svc["metadata"]
        .get("namespace")
        .cloned()
        .unwrap_or(json!("default"));
    let spec = &mut svc["spec"];
    spec["clusterIP"] = json!(cluster_ip);
    spec["clusterIPs"] = json!([cluster_ip]);
    spec["type"] = spec.get("type").cloned().unwrap_or(json!("ClusterIP"));
    spec["sessionAffinity"] = json!("None");
    spec["ipFamilies"] = json!(["IPv4"]);
    spec["ipFamilyPolicy"] = json!("SingleStack");
    spec["internalTrafficPolicy"] = json!("Cluster");
    if let Some(ports) = spec["ports"].as_array_mut() {
        for p in ports {
            p["protocol"] = json!("TCP");
            if p.get("targetPort").is_none() {
                p["targetPort"] = p["port"].clone();
            }
        }
    }
    svc["status"] = json!({"loadBalancer": {}});
    svc
}

/// Bookinfo as a cluster holds it, in the order `kubectl apply` and the
/// controllers would create it.
struct World {
    server: ApiServer,
}

impl World {
    async fn start() -> World {
        // Sidecar and WorkloadEntry: CRDs this cluster does not have.
        let served = KINDS
            .iter()
            .copied()
            .filter(|k| !matches!(k.plural, "sidecars" | "workloadentries"))
            .collect();
        let server = ApiServer::start(Options {
            served,
            ..Options::default()
        })
        .await;
        let world = World { server };
        for ns in read_yaml(&samples().join("platform/namespace.yaml")) {
            let mut ns = ns;
            let name = ns["metadata"]["name"].clone();
            ns["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            ns["spec"] = json!({"finalizers": ["kubernetes"]});
            ns["status"] = json!({"phase": "Active"});
            world.server.apply(ns);
        }
        let kube = read_yaml(&samples().join("platform/kube/bookinfo.yaml"));
        let mut deployments: Vec<Value> = kube
            .iter()
            .filter(|o| o["kind"] == "Deployment")
            .cloned()
            .collect();
        deployments.push(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "istio-ingressgateway", "namespace": "istio-system"},
            "spec": {"template": {"metadata": {"labels": {"app": "istio-ingressgateway", "istio": "ingressgateway"}},
                "spec": {"serviceAccountName": "istio-ingressgateway-service-account",
                         "containers": [{"name": "istio-proxy", "image": "ferry-proxy:0.1.0"}]}}}
        }));
        let mut services: Vec<Value> = kube
            .iter()
            .filter(|o| o["kind"] == "Service")
            .cloned()
            .collect();
        services.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "istio-ingressgateway", "namespace": "istio-system",
                         "labels": {"app": "istio-ingressgateway", "istio": "ingressgateway"}},
            "spec": {"type": "LoadBalancer", "selector": {"istio": "ingressgateway"},
                     "ports": [{"name": "http2", "port": 80, "targetPort": 8080}]}
        }));
        for (i, svc) in services.into_iter().enumerate() {
            world
                .server
                .apply(service(svc, &format!("10.96.{}.{}", 100 + i, 10 + i)));
        }
        for (i, d) in deployments.iter().enumerate() {
            world
                .server
                .apply(pod(d, i, &format!("10.244.1.{}", 10 + i)));
        }
        world.sync_endpoint_slices();
        for file in [
            "networking/bookinfo-gateway.yaml",
            "networking/destination-rule-all.yaml",
            "networking/virtual-service-all-v1.yaml",
            "security/peer-authentication-strict.yaml",
        ] {
            world.apply_file(file);
        }
        world
    }

    /// `kubectl apply -f samples/bookinfo/FILE` (namespace `default` unless
    /// the object names one).
    fn apply_file(&self, file: &str) {
        for mut o in read_yaml(&samples().join(file)) {
            if o["metadata"].get("namespace").is_none() {
                o["metadata"]["namespace"] = json!("default");
            }
            self.server.apply(o);
        }
    }

    /// The endpoint controller's job: every Service's slice follows its Pods.
    fn sync_endpoint_slices(&self) {
        let pods = self.server.objects("pods");
        for svc in self.server.objects("services") {
            let slice = endpoint_slice(&svc, &pods);
            let ns = slice["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = slice["metadata"]["name"].as_str().unwrap_or_default();
            let same = self
                .server
                .get("endpointslices", ns, name)
                .is_some_and(|old| old["endpoints"] == slice["endpoints"]);
            if !same {
                self.server.apply(slice);
            }
        }
    }

    /// The objects the server stores now, written to files as
    /// `kubectl get -o yaml` would print them, then read by the file source.
    fn files_snapshot(&self) -> Snapshot {
        let dir = self.server.dir.join("files");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        for &(_, _, _, plural) in WATCHED {
            for (i, o) in self.server.objects(plural).into_iter().enumerate() {
                let text = serde_yaml_ng::to_string(&o).expect("YAML");
                std::fs::write(dir.join(format!("{plural}-{i}.yaml")), text).expect("write");
            }
        }
        let snap = load_dir(&dir).expect("load the files");
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        snap
    }

    /// A proxy per Pod: sidecars, and the gateway as a router.
    fn proxies(&self) -> Vec<Proxy> {
        self.server
            .objects("pods")
            .iter()
            .map(|p| {
                let name = p["metadata"]["name"].as_str().unwrap_or_default();
                let ns = p["metadata"]["namespace"].as_str().unwrap_or_default();
                let ip = p["status"]["podIP"].as_str().unwrap_or_default();
                let router = name.starts_with("istio-ingressgateway");
                let ty = if router { "router" } else { "sidecar" };
                Proxy {
                    node_type: if router {
                        NodeType::Router
                    } else {
                        NodeType::Sidecar
                    },
                    id: format!("{ty}~{ip}~{name}.{ns}~{ns}.svc.cluster.local"),
                    namespace: ns.into(),
                    pod_name: Some(name.into()),
                    ips: vec![ip.into()],
                    istio_network_stats: true,
                    ..Default::default()
                }
            })
            .collect()
    }
}

/// One translated resource, compared as a message (protobuf maps are hash
/// maps: their encoding's order varies from one translation to the next).
#[derive(Clone, Debug, PartialEq)]
enum Res {
    Listener(Box<Listener>),
    Route(Box<RouteConfiguration>),
    Cluster(Box<Cluster>),
    Endpoints(Box<ClusterLoadAssignment>),
    NameTable(Box<NameTable>),
}

impl Res {
    fn text(&self) -> String {
        format!("{self:#?}")
    }
}

/// Every proxy's resources, by proxy and then by kind and name.
type Translation = BTreeMap<String, BTreeMap<String, Res>>;

fn translate(snap: &Snapshot, proxies: &[Proxy]) -> Translation {
    let mesh = Mesh::new(snap, MeshOptions::default());
    proxies
        .iter()
        .map(|p| {
            let mut p = p.clone();
            mesh.complete_proxy(&mut p);
            let cfg = mesh.proxy_config(&p);
            let mut out = BTreeMap::new();
            for l in &cfg.listeners {
                out.insert(
                    format!("listener {}", l.name),
                    Res::Listener(Box::new(l.clone())),
                );
            }
            for r in &cfg.routes {
                out.insert(
                    format!("route {}", r.name),
                    Res::Route(Box::new((**r).clone())),
                );
            }
            for c in &cfg.clusters {
                out.insert(
                    format!("cluster {}", c.name),
                    Res::Cluster(Box::new(c.clone())),
                );
            }
            for e in &cfg.endpoints {
                out.insert(
                    format!("endpoints {}", e.cluster_name),
                    Res::Endpoints(Box::new(e.clone())),
                );
            }
            if let Some(t) = &cfg.name_table {
                out.insert("name table".into(), Res::NameTable(Box::new(t.clone())));
            }
            (p.id.clone(), out)
        })
        .collect()
}

/// What differs between two translations, proxy by proxy (empty: equal).
fn differences(a: &Translation, b: &Translation) -> Vec<String> {
    let mut out = Vec::new();
    for (proxy, ra) in a {
        let Some(rb) = b.get(proxy) else {
            out.push(format!("{proxy}: missing"));
            continue;
        };
        for (name, res) in ra {
            match rb.get(name) {
                None => out.push(format!("{proxy}: {name} only from the files")),
                Some(other) if other != res => {
                    let (text, other) = (res.text(), other.text());
                    let line = text
                        .lines()
                        .zip(other.lines())
                        .find(|(a, b)| a != b)
                        .map(|(a, b)| format!("files `{}` / API `{}`", a.trim(), b.trim()))
                        .unwrap_or_else(|| "lengths".into());
                    out.push(format!("{proxy}: {name} differs: {line}"))
                }
                _ => {}
            }
        }
        for name in rb.keys().filter(|n| !ra.contains_key(*n)) {
            out.push(format!("{proxy}: {name} only from the API"));
        }
    }
    out
}

/// Waits until the API source translates every proxy as the files do.
async fn converge(world: &World, source: &KubeSource, what: &str) -> Translation {
    let proxies = world.proxies();
    let files = world.files_snapshot();
    let want = translate(&files, &proxies);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let snap = source.list().expect("list");
        assert!(snap.errors.is_empty(), "{what}: {:?}", snap.errors);
        let got = translate(&snap, &proxies);
        let diff = differences(&want, &got);
        if diff.is_empty() {
            assert_eq!(
                snap.resources.len(),
                files.resources.len(),
                "{what}: same objects"
            );
            return got;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{what}: the API source still translates differently:\n{}\nrequests: {:?}",
                diff.join("\n"),
                world.server.requests()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn resource_names(t: &Translation, proxy_prefix: &str) -> Vec<String> {
    t.iter()
        .filter(|(id, _)| id.contains(proxy_prefix))
        .flat_map(|(_, r)| r.keys().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_source_translates_as_the_files_through_watches_bookmarks_and_relists() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let world = World::start().await;
    let source = KubeSource::with_client(world.server.client().await);
    source.spawn_watchers();
    tokio::time::timeout(WAIT, source.wait_synced())
        .await
        .unwrap_or_else(|_| panic!("not synced: {:?}", world.server.requests()));

    // First list: paged (7 Pods, 4 a page), the absent CRDs empty.
    let first = converge(&world, &source, "first list").await;
    assert_eq!(world.server.count("LIST", "pods"), 2, "one continue");
    assert!(world.server.count("LIST", "sidecars") >= 1);
    let names = resource_names(&first, "productpage");
    assert!(
        names.contains(&"cluster outbound|9080|v1|reviews.default.svc.cluster.local".to_string()),
        "{names:?}"
    );
    let gateway = resource_names(&first, "router~");
    assert!(
        gateway.contains(&"listener 0.0.0.0_8080".to_string()),
        "{gateway:?}"
    );

    // A CRD installed later (Sidecar): empty until then, its objects
    // listed once it is served. productpage may reach reviews only.
    world.server.serve("sidecars");
    world.server.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
        "metadata": {"name": "productpage", "namespace": "default"},
        "spec": {"workloadSelector": {"labels": {"app": "productpage"}},
                 "egress": [{"hosts": ["./reviews.default.svc.cluster.local", "istio-system/*"]}]}
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while world.server.count("LIST", "sidecars") < 2
        || source
            .list()
            .expect("list")
            .of(|s| match s {
                ferry_pilot::istio::source::Spec::Sidecar(x) => Some(x),
                _ => None,
            })
            .next()
            .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Sidecar CRD's objects are not listed: {:?}",
            world.server.requests()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let scoped = converge(&world, &source, "Sidecar CRD installed").await;
    let names = resource_names(&scoped, "productpage");
    assert!(
        !names.iter().any(|n| n.contains("details.default")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("reviews.default")),
        "{names:?}"
    );
    world.server.delete(
        "networking.istio.io/v1",
        "Sidecar",
        "default",
        "productpage",
    );
    assert_eq!(converge(&world, &source, "Sidecar deleted").await, first);

    // Changes arrive through the watch: 50/50 between reviews v1 and v3,
    // then reviews-v3 scaled to zero (its Pod gone, its slice emptied).
    world.apply_file("networking/virtual-service-reviews-50-v3.yaml");
    let split = converge(&world, &source, "reviews 50/50").await;
    assert_ne!(split, first);
    let v3 = world
        .server
        .objects("pods")
        .into_iter()
        .find(|p| {
            p["metadata"]["labels"]["version"] == "v3"
                && p["metadata"]["labels"]["app"] == "reviews"
        })
        .expect("reviews-v3 pod");
    let v3_name = v3["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    world.server.delete("v1", "Pod", "default", &v3_name);
    world.sync_endpoint_slices();
    converge(&world, &source, "reviews-v3 gone").await;
    let lists_before = world.server.count("LIST", "pods");

    // Bookmarks: only Services change, yet every watch hears of the new
    // version; history compacted and watches dropped, they resume from
    // their bookmark without a relist.
    for i in 0..3 {
        let mut svc = world
            .server
            .get("services", "default", "details")
            .expect("details");
        svc["metadata"]["annotations"] = json!({"touched": i.to_string()});
        world.server.apply(svc);
    }
    let rv = world.server.resource_version();
    let watched: Vec<&str> = WATCHED
        .iter()
        .map(|w| w.3)
        .filter(|p| *p != "workloadentries")
        .collect();
    world.server.wait_watches_at(&watched, rv, WAIT).await;
    world.server.compact();
    let watches_before = world.server.requests().len();
    world.server.drop_watches();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let resumed = world.server.requests()[watches_before..]
            .iter()
            .filter(|l| l.verb == "WATCH" && l.resource_version.as_deref() == Some(&rv.to_string()))
            .count();
        if resumed >= watched.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watches did not resume from the bookmark {rv}: {:?}",
            &world.server.requests()[watches_before..]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        world.server.count("LIST", "pods"),
        lists_before,
        "no relist"
    );
    converge(&world, &source, "after resuming from bookmarks").await;

    // 410 Gone: watches dropped and held while reviews-v3 comes back and all
    // traffic moves to it; the history is compacted, so the resumed watches
    // are told their version expired and the kinds are listed again.
    world.server.pause_watches(true);
    world.server.drop_watches();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reviews_v3 = read_yaml(&samples().join("platform/kube/bookinfo.yaml"))
        .into_iter()
        .find(|o| o["metadata"]["name"] == "reviews-v3")
        .expect("reviews-v3 deployment");
    world.server.apply(pod(&reviews_v3, 6, "10.244.1.42"));
    world.sync_endpoint_slices();
    world.apply_file("networking/virtual-service-reviews-v3.yaml");
    world.server.compact();
    let vs_lists = world.server.count("LIST", "virtualservices");
    world.server.pause_watches(false);
    let after = converge(&world, &source, "after 410 Gone").await;
    assert!(
        world.server.count("LIST", "virtualservices") > vs_lists
            && world.server.count("LIST", "pods") > lists_before,
        "no relist after 410: {:?}",
        world.server.requests()
    );
    assert_ne!(after, split);
    let endpoints = &after
        .iter()
        .find(|(id, _)| id.contains("productpage"))
        .expect("productpage")
        .1["endpoints outbound|9080|v3|reviews.default.svc.cluster.local"];
    assert!(
        endpoints.text().contains("10.244.1.42"),
        "the new reviews-v3 pod is an endpoint"
    );
    // The change counter moved with every change.
    assert!(*source.subscribe().borrow() >= 4);
    let _keep: Arc<KubeSource> = source;
}

/// The Secrets gateways name by `credentialName` are watched, but, as
/// istiod watches them, never Helm releases or service account tokens
/// (large, and no gateway's credentials): the field selector keeps them on
/// the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_secrets_are_watched_without_helm_releases_or_tokens() {
    use base64::Engine;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let world = World::start().await;
    let source = KubeSource::with_client(world.server.client().await);
    source.spawn_watchers();
    tokio::time::timeout(WAIT, source.wait_synced())
        .await
        .unwrap_or_else(|_| panic!("not synced: {:?}", world.server.requests()));
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for (name, type_) in [
        ("sh.helm.release.v1.istio.v1", "helm.sh/release.v1"),
        ("default-token", "kubernetes.io/service-account-token"),
        ("httpbin-credential", "kubernetes.io/tls"),
    ] {
        world.server.apply(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "istio-system"},
            "type": type_,
            "data": {"tls.crt": b64("CERT"), "tls.key": b64("KEY")}
        }));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let secrets = loop {
        let snap = source.list().expect("list");
        let secrets: Vec<String> = snap
            .of(|s| match s {
                ferry_pilot::istio::source::Spec::Secret(x) => Some(x),
                _ => None,
            })
            .map(|(r, s)| {
                format!(
                    "{}/{} {:?}",
                    r.meta.namespace,
                    r.meta.name,
                    s.value("tls.crt").expect("base64")
                )
            })
            .collect();
        if !secrets.is_empty() || tokio::time::Instant::now() > deadline {
            break secrets;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        secrets,
        [format!(
            "istio-system/httpbin-credential {:?}",
            Some(b"CERT".to_vec())
        )],
        "requests: {:?}",
        world.server.requests()
    );
    let _keep: Arc<KubeSource> = source;
}
