//! ferry-pilot emits only what the proxy applies: every configuration the
//! project has fixtures for, and each file of the shared Istio samples
//! (`../shared/istio-samples`, beside the workloads of its sample), is
//! translated for every proxy it concerns (a sidecar per workload and per
//! namespace, a gateway per Gateway selector), and each resource goes
//! through the proxy's converters: none may be refused, and none may carry
//! a field the proxy only warns about.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ferry_pilot::istio::source::{Snapshot, Spec, load_dir, load_file};
use ferry_pilot::istio::translate::{Mesh, MeshOptions, NodeType, Proxy, ProxyConfig};
use ferry_xds::convert::{self, Warnings};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn samples() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-samples");
    p.is_dir().then_some(p)
}

/// The proxies a snapshot concerns: a sidecar for each workload's labels
/// and a bare one per namespace, a gateway for each Gateway's selector.
fn proxies(snap: &Snapshot) -> Vec<Proxy> {
    let mut sidecars: BTreeSet<(String, Vec<(String, String)>)> = BTreeSet::new();
    let mut routers: BTreeSet<Vec<(String, String)>> = BTreeSet::new();
    for r in &snap.resources {
        let ns = r.meta.namespace.clone();
        let labels = match &r.spec {
            Spec::Pod(_) => Some(r.meta.labels.clone()),
            Spec::Deployment(d) => Some(d.spec.template.metadata.labels.clone()),
            Spec::Gateway(g) => {
                routers.insert(g.selector.clone().into_iter().collect());
                None
            }
            _ => None,
        };
        sidecars.insert((ns.clone(), Vec::new()));
        if let Some(l) = labels {
            sidecars.insert((ns, l.into_iter().collect()));
        }
    }
    let mut out: Vec<Proxy> = sidecars
        .into_iter()
        .map(|(namespace, labels)| Proxy {
            id: format!("sidecar~10.9.0.1~probe.{namespace}~{namespace}.svc.cluster.local"),
            namespace,
            labels: labels.into_iter().collect(),
            ips: vec!["10.9.0.1".into()],
            ..Default::default()
        })
        .collect();
    out.extend(routers.into_iter().map(|labels| Proxy {
        node_type: NodeType::Router,
        id: "router~10.9.0.2~gateway.istio-system~istio-system.svc.cluster.local".into(),
        namespace: "istio-system".into(),
        labels: labels.into_iter().collect(),
        ips: vec!["10.9.0.2".into()],
        ..Default::default()
    }));
    out
}

/// Errors that say nothing of what ferry-pilot emits: certificate files
/// a Gateway names, which exist only in a real pod.
fn environmental(e: &ferry_xds::ConvertError) -> bool {
    e.message.starts_with("cannot read ")
}

/// What the proxy does not support at all, whatever the control plane:
/// ServiceEntry endpoints on Unix sockets (`unix://`).
fn unsupported(e: &ferry_xds::ConvertError) -> bool {
    e.message.contains("\"unix://")
}

/// Every problem the proxy finds in one proxy's configuration.
fn check(cfg: &ProxyConfig, what: &str, problems: &mut Vec<String>) {
    let mut w = Warnings::default();
    let mut refused = |r: Result<(), ferry_xds::ConvertError>| {
        if let Err(e) = r
            && !environmental(&e)
            && !unsupported(&e)
        {
            problems.push(format!("{what}: refused: {e}"));
        }
    };
    for l in &cfg.listeners {
        refused(convert::listener(l, &mut w).map(|_| ()));
    }
    for r in &cfg.routes {
        refused(convert::route_config(r, &mut w).map(|_| ()));
    }
    for c in &cfg.clusters {
        refused(convert::cluster(c, &mut w).map(|_| ()));
    }
    for e in &cfg.endpoints {
        refused(convert::cluster_load_assignment(e, &mut w).map(|_| ()));
    }
    problems.extend(w.0.into_iter().map(|w| format!("{what}: warned: {w}")));
}

fn check_snapshot(snap: &Snapshot, what: &str, problems: &mut Vec<String>) -> usize {
    let mesh = Mesh::new(snap, MeshOptions::default());
    let mut resources = 0;
    for mut p in proxies(snap) {
        mesh.complete_proxy(&mut p);
        let cfg = mesh.proxy_config(&p);
        resources += cfg.listeners.len() + cfg.routes.len() + cfg.clusters.len();
        check(&cfg, &format!("{what} ({})", p.id), problems);
    }
    resources
}

#[test]
fn fixtures_translate_to_what_the_proxy_applies() {
    let mut problems = Vec::new();
    let mut resources = 0;
    for dir in ["mesh", "authz", "gateway", "locality", "mtls"] {
        let snap = load_dir(&fixtures().join(dir)).expect("fixtures load");
        assert!(snap.errors.is_empty(), "{dir}: {:?}", snap.errors);
        resources += check_snapshot(&snap, dir, &mut problems);
    }
    assert!(resources > 0, "nothing was translated");
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

#[test]
fn istio_samples_translate_to_what_the_proxy_applies() {
    let Some(root) = samples() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "../shared/istio-samples is missing"
        );
        eprintln!("skipped: ../shared/istio-samples is not checked out beside the repository");
        return;
    };
    let mut problems = Vec::new();
    let mut translated = 0;
    let mut samples_seen = 0;
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("samples")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for sample in dirs {
        let mut files = Vec::new();
        yaml_files(&sample, &mut files);
        let loaded: Vec<(PathBuf, Snapshot)> = files
            .into_iter()
            .filter_map(|f| load_file(&f).ok().map(|s| (f, s)))
            .filter(|(_, s)| s.errors.is_empty())
            .collect();
        // The sample's workloads, beside each of its other files in turn.
        let is_workload = |s: &Spec| {
            matches!(
                s,
                Spec::Service(_) | Spec::Pod(_) | Spec::Deployment(_) | Spec::Namespace
            )
        };
        let mut workloads = Snapshot::default();
        for (_, s) in &loaded {
            workloads
                .resources
                .extend(s.resources.iter().filter(|r| is_workload(&r.spec)).cloned());
        }
        for (file, s) in &loaded {
            let config: Vec<_> = s
                .resources
                .iter()
                .filter(|r| !is_workload(&r.spec) && !matches!(r.spec, Spec::Other))
                .cloned()
                .collect();
            if config.is_empty() {
                continue;
            }
            let mut snap = Snapshot::default();
            snap.resources.extend(workloads.resources.iter().cloned());
            snap.resources.extend(config);
            let what = file
                .strip_prefix(&root)
                .unwrap_or(file)
                .display()
                .to_string();
            translated += check_snapshot(&snap, &what, &mut problems);
            samples_seen += 1;
        }
    }
    assert!(
        samples_seen > 0 && translated > 0,
        "no sample was translated"
    );
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
