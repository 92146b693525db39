//! The Kubernetes parts of the local mesh: from the objects of a configuration it plans which
//! pods run ([`Plan`]: one per Deployment replica or bare Pod, with the injector's decision
//! and the app each runs), gives Services without one a cluster IP, and writes the
//! configuration directory `ferry-pilot serve` watches as an API server would hold it: every
//! object in its own file (`<kind>-<namespace>-<name>.yaml`, what [`crate::istio::apply`]
//! replaces), Services with their cluster IPs, and a Pod object with its address for every
//! pod it started.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use serde_yaml_ng::Value;

use super::LocalError;
use crate::istio::apply::object_file;
use crate::istio::source::{Resource, Snapshot, Spec, parse_documents, split_documents};
use crate::istio::translate::registry::{TLS_MODE_LABEL, injected};
use crate::istio::types::kube::PodSpec;

/// Where cluster IPs are handed out from (Kubernetes' default service range).
const SERVICE_RANGE: [u8; 3] = [10, 96, 0];
/// At most this many pods per Deployment: a demo, not a scheduler.
const MAX_REPLICAS: u32 = 3;

/// What a pod's container runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppRun {
    /// `bookinfo.py SERVICE VERSION` (the image `ferry/bookinfo`, or Istio's
    /// `examples-bookinfo-SERVICE-VERSION` images).
    Bookinfo { service: String, version: String },
    /// `standin.py PORT...`: an HTTP answer naming the pod on each container port.
    Standin,
    /// Nothing listens (a container without ports, such as a client).
    Nothing,
}

/// One pod to run.
#[derive(Clone, Debug)]
pub struct PodPlan {
    /// The pod's name (the Deployment's name and the replica's number).
    pub name: String,
    /// The Deployment's name (the pod's own for a bare Pod).
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub service_account: String,
    /// Gets `ferry iptables` and a sidecar.
    pub injected: bool,
    pub run: AppRun,
    pub image: String,
    /// The container ports (the app listens on them).
    pub ports: Vec<u32>,
}

/// A Service and the cluster IP it has.
#[derive(Clone, Debug)]
pub struct ServicePlan {
    pub name: String,
    pub namespace: String,
    /// `None` for a headless Service.
    pub cluster_ip: Option<Ipv4Addr>,
    /// The first port: what the apps of its namespace learn from the environment.
    pub port: Option<u32>,
}

/// The pods and Services of a configuration.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub pods: Vec<PodPlan>,
    pub services: Vec<ServicePlan>,
    /// Namespaces whose pods are injected by their label.
    pub injected_namespaces: Vec<String>,
}

impl Plan {
    /// Plans the pods and Services of `snapshot`.
    pub fn new(snapshot: &Snapshot) -> Result<Plan, LocalError> {
        let namespaces: BTreeMap<&str, &BTreeMap<String, String>> = snapshot
            .resources
            .iter()
            .filter(|r| matches!(r.spec, Spec::Namespace))
            .map(|r| (r.meta.name.as_str(), &r.meta.labels))
            .collect();
        let mut plan = Plan {
            injected_namespaces: namespaces
                .iter()
                .filter(|(_, l)| injected(&BTreeMap::new(), &BTreeMap::new(), Some(l)))
                .map(|(n, _)| n.to_string())
                .collect(),
            ..Plan::default()
        };
        let mut next_vip = 10u8;
        for r in &snapshot.resources {
            match &r.spec {
                Spec::Deployment(d) => {
                    let template = &d.spec.template;
                    let replicas = d.spec.replicas.unwrap_or(1).min(MAX_REPLICAS);
                    for i in 0..replicas {
                        plan.pods.push(pod_plan(
                            format!("{}-{i}", r.meta.name),
                            r,
                            &template.metadata.labels,
                            &template.metadata.annotations,
                            &template.spec,
                            &namespaces,
                        )?);
                    }
                }
                Spec::Pod(p) if p.status.pod_ip.as_deref().unwrap_or_default().is_empty() => {
                    plan.pods.push(pod_plan(
                        r.meta.name.clone(),
                        r,
                        &r.meta.labels,
                        &r.meta.annotations,
                        &p.spec,
                        &namespaces,
                    )?);
                }
                Spec::Service(s) => {
                    let cluster_ip = match s.spec.cluster_ip.as_deref() {
                        Some("None") => None,
                        Some(ip) if !ip.is_empty() => Some(ip.parse().map_err(|_| {
                            LocalError::Config(format!(
                                "{}: Service {}/{}: spec.clusterIP {ip:?} is not an IPv4 address",
                                r.origin, r.meta.namespace, r.meta.name
                            ))
                        })?),
                        _ => {
                            let [a, b, c] = SERVICE_RANGE;
                            let ip = Ipv4Addr::new(a, b, c, next_vip);
                            next_vip = next_vip.checked_add(1).ok_or_else(|| {
                                LocalError::Config("more than 245 Services".to_string())
                            })?;
                            Some(ip)
                        }
                    };
                    plan.services.push(ServicePlan {
                        name: r.meta.name.clone(),
                        namespace: r.meta.namespace.clone(),
                        cluster_ip,
                        port: s.spec.ports.first().map(|p| p.port),
                    });
                }
                _ => {}
            }
        }
        let mut names: Vec<&str> = plan.pods.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(LocalError::Config(format!(
                "two pods would be named {:?} (the same Deployment name in two namespaces): \
                 rename one",
                w[0]
            )));
        }
        Ok(plan)
    }

    /// The environment Kubernetes gives a pod of `namespace` for its namespace's Services
    /// (`REVIEWS_SERVICE_HOST`, `REVIEWS_SERVICE_PORT`).
    pub fn service_env(&self, namespace: &str) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for s in self.services.iter().filter(|s| s.namespace == namespace) {
            if let (Some(ip), Some(port)) = (s.cluster_ip, s.port) {
                let key = s.name.to_uppercase().replace('-', "_");
                env.push((format!("{key}_SERVICE_HOST"), ip.to_string()));
                env.push((format!("{key}_SERVICE_PORT"), port.to_string()));
            }
        }
        env
    }
}

fn pod_plan(
    name: String,
    owner: &Resource,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    spec: &PodSpec,
    namespaces: &BTreeMap<&str, &BTreeMap<String, String>>,
) -> Result<PodPlan, LocalError> {
    let namespace = owner.meta.namespace.clone();
    let workload = owner.meta.name.clone();
    let is_injected = injected(
        labels,
        annotations,
        namespaces.get(namespace.as_str()).copied(),
    );
    let mut labels = labels.clone();
    if is_injected {
        labels
            .entry(TLS_MODE_LABEL.to_string())
            .or_insert_with(|| "istio".to_string());
    }
    let container = spec.containers.first().ok_or_else(|| {
        LocalError::Config(format!(
            "{}: {} {}/{}: no containers",
            owner.origin, owner.kind, namespace, owner.meta.name
        ))
    })?;
    let ports: Vec<u32> = spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .map(|p| p.container_port)
        .collect();
    let run = app_of(&container.image, &container.args);
    let run = match run {
        AppRun::Standin if ports.is_empty() => AppRun::Nothing,
        other => other,
    };
    Ok(PodPlan {
        name,
        workload,
        namespace,
        labels,
        annotations: annotations.clone(),
        service_account: spec.service_account().to_string(),
        injected: is_injected,
        run,
        image: container.image.clone(),
        ports,
    })
}

/// The app an image stands for: Ferry's bookinfo image with its arguments, Istio's bookinfo
/// images by name, anything else a stand-in.
fn app_of(image: &str, args: &[String]) -> AppRun {
    const SERVICES: [&str; 4] = ["productpage", "details", "reviews", "ratings"];
    let repo = image.split(':').next().unwrap_or_default();
    if repo.ends_with("ferry/bookinfo")
        && let [service, rest @ ..] = args
        && SERVICES.contains(&service.as_str())
    {
        return AppRun::Bookinfo {
            service: service.clone(),
            version: rest.first().cloned().unwrap_or_else(|| "v1".to_string()),
        };
    }
    // Istio's images: `…/examples-bookinfo-reviews-v2:1.20.3`.
    if let Some(rest) = repo
        .rsplit('/')
        .next()
        .and_then(|n| n.strip_prefix("examples-bookinfo-"))
        && let Some((service, version)) = rest.split_once('-')
        && SERVICES.contains(&service)
        && version.len() >= 2
        && version.starts_with('v')
        && version[1..].chars().all(|c| c.is_ascii_digit())
    {
        return AppRun::Bookinfo {
            service: service.to_string(),
            version: version.to_string(),
        };
    }
    AppRun::Standin
}

/// A pod the platform started: what the Pod object records.
#[derive(Clone, Debug)]
pub struct StartedPod<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub service_account: &'a str,
    pub ports: &'a [u32],
    pub ip: Ipv4Addr,
}

/// Writes the configuration directory: each object of `files` ((name, text) pairs) in its own
/// file, Services with the cluster IPs of `plan`, and a Pod object for each started pod.
pub fn write_config(
    dir: &Path,
    files: &[(String, String)],
    plan: &Plan,
    pods: &[StartedPod<'_>],
) -> Result<(), LocalError> {
    std::fs::create_dir_all(dir).map_err(LocalError::io("creating", dir))?;
    let mut other = 0;
    for (name, text) in files {
        for (_, doc) in split_documents(text) {
            let parsed = parse_documents(doc, Path::new(name));
            let (target, body) = match parsed.resources.as_slice() {
                [r] => {
                    let body = match &r.spec {
                        Spec::Service(_) => with_cluster_ip(doc, r, plan)?,
                        _ => format!("{}\n", doc.trim_matches('\n')),
                    };
                    (object_file(dir, &r.key()), body)
                }
                // A List, or something that is no object: kept as it is.
                _ => {
                    other += 1;
                    (
                        dir.join(format!("other-{other}.yaml")),
                        format!("{}\n", doc.trim_matches('\n')),
                    )
                }
            };
            write(&target, &body)?;
        }
    }
    for p in pods {
        let key = crate::istio::types::ResourceKey {
            kind: "Pod".to_string(),
            namespace: p.namespace.to_string(),
            name: p.name.to_string(),
        };
        let labels = serde_json::to_string(p.labels).unwrap_or_else(|_| "{}".to_string());
        let ports: Vec<String> = p
            .ports
            .iter()
            .map(|port| format!("{{containerPort: {port}}}"))
            .collect();
        let body = format!(
            "# Started by the local platform.\napiVersion: v1\nkind: Pod\n\
             metadata: {{name: {}, namespace: {}, labels: {labels}}}\n\
             spec: {{serviceAccountName: {}, containers: [{{name: app, ports: [{}]}}]}}\n\
             status: {{podIP: {}}}\n",
            p.name,
            p.namespace,
            p.service_account,
            ports.join(", "),
            p.ip
        );
        write(&object_file(dir, &key), &body)?;
    }
    Ok(())
}

/// The Service document `doc` with the cluster IP the plan gave it.
fn with_cluster_ip(doc: &str, r: &Resource, plan: &Plan) -> Result<String, LocalError> {
    let ip = plan
        .services
        .iter()
        .find(|s| s.name == r.meta.name && s.namespace == r.meta.namespace)
        .and_then(|s| s.cluster_ip);
    let mut value: Value = serde_yaml_ng::from_str(doc)
        .map_err(|e| LocalError::Config(format!("{}: {e}", r.origin)))?;
    if let (Some(ip), Some(spec)) = (ip, value.get_mut("spec").and_then(Value::as_mapping_mut)) {
        spec.insert("clusterIP".into(), ip.to_string().into());
    }
    serde_yaml_ng::to_string(&value).map_err(|e| LocalError::Config(format!("{}: {e}", r.origin)))
}

fn write(path: &Path, text: &str) -> Result<(), LocalError> {
    crate::istio::apply::write_whole(path, text).map_err(|e| LocalError::Config(e.to_string()))?;
    set_mode(path, 0o644)
}

/// Makes `path` readable by the proxies (uid 1337) and the user.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), LocalError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(LocalError::io("setting the mode of", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::samples::BOOKINFO;

    fn snapshot(files: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (name, text) in files {
            s.resources
                .extend(parse_documents(text, Path::new(name)).resources);
        }
        s
    }

    #[test]
    fn bookinfo_plans_six_injected_pods_and_four_cluster_ips() {
        let plan = Plan::new(&snapshot(BOOKINFO)).expect("plan");
        let names: Vec<&str> = plan.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "details-v1-0",
                "ratings-v1-0",
                "reviews-v1-0",
                "reviews-v2-0",
                "reviews-v3-0",
                "productpage-v1-0"
            ]
        );
        assert!(plan.pods.iter().all(|p| p.injected));
        assert_eq!(
            plan.pods[3].run,
            AppRun::Bookinfo {
                service: "reviews".into(),
                version: "v2".into()
            }
        );
        assert_eq!(
            plan.pods[3].labels.get(TLS_MODE_LABEL).map(String::as_str),
            Some("istio")
        );
        assert_eq!(plan.services.len(), 4);
        let env = plan.service_env("default");
        assert!(
            env.contains(&("REVIEWS_SERVICE_HOST".into(), "10.96.0.12".into())),
            "{env:?}"
        );
        assert!(env.contains(&("REVIEWS_SERVICE_PORT".into(), "9080".into())));
        assert_eq!(plan.injected_namespaces, ["default"]);
    }

    #[test]
    fn images_pick_the_app_and_injection_follows_the_namespace() {
        assert_eq!(
            app_of("docker.io/istio/examples-bookinfo-ratings-v1:1.20.3", &[]),
            AppRun::Bookinfo {
                service: "ratings".into(),
                version: "v1".into()
            }
        );
        assert_eq!(
            app_of("istio/examples-bookinfo-ratings-v2-mysql:1", &[]),
            AppRun::Standin
        );
        assert_eq!(app_of("nginx:1.27", &[]), AppRun::Standin);
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
                    spec:\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - {name: web, image: nginx}\n";
        let plan = Plan::new(&snapshot(&[("w.yaml", text)])).expect("plan");
        assert!(!plan.pods[0].injected);
        assert_eq!(plan.pods[0].run, AppRun::Nothing);
        assert_eq!(plan.pods[0].service_account, "default");
    }

    #[test]
    fn the_configuration_directory_holds_one_object_per_file() {
        let dir = std::env::temp_dir().join(format!("ferry-platform-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files: Vec<(String, String)> = BOOKINFO
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        let plan = Plan::new(&snapshot(BOOKINFO)).expect("plan");
        let p = &plan.pods[0];
        let started = StartedPod {
            name: &p.name,
            namespace: &p.namespace,
            labels: &p.labels,
            service_account: &p.service_account,
            ports: &p.ports,
            ip: Ipv4Addr::new(10, 77, 1, 3),
        };
        write_config(&dir, &files, &plan, &[started]).expect("write");
        let loaded = crate::istio::source::load_dir(&dir).expect("load");
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let svc = loaded
            .resources
            .iter()
            .find(|r| r.kind == "Service" && r.meta.name == "details")
            .expect("details");
        assert_eq!(svc.origin.file, dir.join("service-default-details.yaml"));
        let Spec::Service(s) = &svc.spec else {
            panic!("not a service")
        };
        assert_eq!(s.spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        let pod = loaded
            .resources
            .iter()
            .find(|r| r.kind == "Pod")
            .expect("the pod");
        let Spec::Pod(pod_spec) = &pod.spec else {
            panic!("not a pod")
        };
        assert_eq!(pod_spec.status.pod_ip.as_deref(), Some("10.77.1.3"));
        assert_eq!(
            pod.meta.labels.get("version").map(String::as_str),
            Some("v1")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
