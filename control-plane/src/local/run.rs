//! Brings a configuration up as a local mesh: a [`ferry_netns::Mesh`] with an `istiod` pod
//! running `ferry-pilot serve` (ADS, SDS and the CA on 15010) on the configuration directory
//! the [`platform`](super::platform) writes, one pod per planned workload running its app,
//! then, when injected, `ferry iptables` (the init container) and the sidecar as uid 1337
//! (`ferry sidecar` with its certificate from the CA, or Envoy with its certificate over SDS),
//! and an ingress gateway pod (`istio: ingressgateway` in `istio-system`) running
//! `ferry gateway` or Envoy. Dropping the [`LocalMesh`] stops every process and removes every
//! namespace (the capture rules live inside them).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_netns::{Mesh, MeshOptions, Pod, Proc};

use super::LocalError;
use super::bootstrap::{Node, bootstrap};
use super::platform::{AppRun, Plan, PodPlan, StartedPod, set_mode, write_config};
use super::samples::{BOOKINFO_APP, STANDIN_APP};
use crate::istio::source::{Snapshot, Spec, parse_documents};

/// The ingress gateway's pod, as Istio installs it.
pub const GATEWAY_POD: &str = "istio-ingressgateway";
pub const GATEWAY_NAMESPACE: &str = "istio-system";
const GATEWAY_ACCOUNT: &str = "istio-ingressgateway-service-account";
/// The uid the proxies run as; the capture rules let its traffic through.
const PROXY_UID: u32 = 1337;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which data plane the proxies run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proxy {
    /// `ferry sidecar` / `ferry gateway` (its agent asks the CA for its certificate).
    Ferry,
    /// Envoy at this path (certificates over SDS from ferry-pilot).
    Envoy(PathBuf),
}

/// How to bring the mesh up.
#[derive(Clone, Debug)]
pub struct Options {
    /// `ferry-pilot` (run as `serve` in the istiod pod).
    pub pilot_bin: PathBuf,
    /// `ferry` (`iptables`, and the proxies when [`Proxy::Ferry`]).
    pub ferry_bin: PathBuf,
    pub proxy: Proxy,
    /// Holds `config/` (watched by ferry-pilot), `bootstrap/`, `apps/`, `bin/` and `logs/`.
    pub state_dir: PathBuf,
    /// Processes die with the thread that spawned them (see [`MeshOptions`]).
    pub die_with_parent: bool,
    /// `--cert-ttl` of Ferry sidecars (their default when `None`).
    pub cert_ttl: Option<String>,
    /// More arguments for `ferry-pilot serve` (`--log-level …`).
    pub pilot_args: Vec<String>,
    /// Set from elsewhere (a signal) to abandon the start-up.
    pub cancel: Arc<AtomicBool>,
}

/// A pod the mesh runs: its plan, its namespace and its processes.
pub struct Running {
    pub plan: PodPlan,
    pub pod: Pod,
    pub app: Option<Proc>,
    pub sidecar: Option<Proc>,
}

/// The running mesh. Dropping it stops every process and deletes every namespace.
pub struct LocalMesh {
    pub plan: Plan,
    pub pods: Vec<Running>,
    /// The ingress gateway's pod and proxy.
    pub gateway: Running,
    /// The ports the Gateways selecting the ingress gateway serve.
    pub gateway_ports: Vec<u32>,
    pub istiod: Pod,
    pub pilot: Proc,
    config_dir: PathBuf,
    // Dropped last: the pods above are removed before their bridge.
    mesh: Mesh,
}

impl LocalMesh {
    /// Builds the mesh for the configuration `files` ((name, text) pairs), telling `progress`
    /// what it does.
    pub fn start(
        files: &[(String, String)],
        opts: &Options,
        progress: &mut dyn FnMut(&str),
    ) -> Result<LocalMesh, LocalError> {
        let mut snapshot = Snapshot::default();
        for (name, text) in files {
            let s = parse_documents(text, Path::new(name));
            if let Some(e) = s.errors.first() {
                return Err(LocalError::Config(e.to_string()));
            }
            snapshot.resources.extend(s.resources);
        }
        let plan = Plan::new(&snapshot)?;
        let gateway_ports = gateway_ports(&snapshot);

        let dirs = StateDirs::create(&opts.state_dir)?;
        let ferry = dirs.install_ferry(&opts.ferry_bin)?;
        let mesh = Mesh::with_options(MeshOptions {
            log_root: dirs.logs.clone(),
            die_with_parent: opts.die_with_parent,
        })?;
        let istiod = mesh.pod("istiod")?;
        let mut pods = Vec::new();
        for p in &plan.pods {
            check(opts)?;
            pods.push((p.clone(), mesh.pod(&p.name)?));
        }
        let gateway_labels = BTreeMap::from([
            ("app".to_string(), GATEWAY_POD.to_string()),
            ("istio".to_string(), "ingressgateway".to_string()),
        ]);
        let gateway_pod = mesh.pod(GATEWAY_POD)?;
        let mut started: Vec<StartedPod<'_>> = pods
            .iter()
            .map(|(p, pod)| StartedPod {
                name: &p.name,
                namespace: &p.namespace,
                labels: &p.labels,
                service_account: &p.service_account,
                ports: &p.ports,
                ip: pod.ip(),
            })
            .collect();
        started.push(StartedPod {
            name: GATEWAY_POD,
            namespace: GATEWAY_NAMESPACE,
            labels: &gateway_labels,
            service_account: GATEWAY_ACCOUNT,
            ports: &[],
            ip: gateway_pod.ip(),
        });
        write_config(&dirs.config, files, &plan, &started)?;

        progress(&format!(
            "control plane: ferry-pilot serve in pod istiod ({}): ADS, SDS and the CA on :15010",
            istiod.ip()
        ));
        let pilot = istiod
            .cmd(&opts.pilot_bin)
            .args([
                "serve",
                "--listen",
                "0.0.0.0:15010",
                "--status-addr",
                "127.0.0.1:15014",
            ])
            .args(&opts.pilot_args)
            .arg("--config")
            .arg(&dirs.config)
            .label("pilot")
            .spawn()?;
        wait(opts, "ferry-pilot", &pilot, || {
            Ok(istiod.wait_port(15010, Duration::from_millis(200)).is_ok())
        })?;

        let mut running = Vec::new();
        for (p, pod) in pods {
            check(opts)?;
            let app = start_app(&p, &pod, &plan, &dirs)?;
            let sidecar = if p.injected {
                let out = pod.cmd(&ferry).arg("iptables").output()?;
                if !out.status.success() {
                    return Err(LocalError::Failed(format!(
                        "ferry iptables in pod {}: {}",
                        p.name,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                let node = Node {
                    kind: "sidecar",
                    pod: &p.name,
                    workload: &p.workload,
                    namespace: &p.namespace,
                    ip: pod.ip(),
                    labels: &p.labels,
                    service_account: &p.service_account,
                };
                Some(start_proxy(&pod, &node, istiod.ip(), opts, &ferry, &dirs)?)
            } else {
                None
            };
            progress(&format!(
                "pod {:<18} {:<15} {}{}",
                p.name,
                pod.ip().to_string(),
                describe(&p.run, &p.ports),
                if p.injected {
                    " + ferry iptables + sidecar"
                } else {
                    " (no sidecar)"
                }
            ));
            running.push(Running {
                plan: p,
                pod,
                app,
                sidecar,
            });
        }
        let gateway_plan = PodPlan {
            name: GATEWAY_POD.to_string(),
            workload: GATEWAY_POD.to_string(),
            namespace: GATEWAY_NAMESPACE.to_string(),
            labels: gateway_labels.clone(),
            annotations: BTreeMap::new(),
            service_account: GATEWAY_ACCOUNT.to_string(),
            injected: false,
            run: AppRun::Nothing,
            image: String::new(),
            ports: gateway_ports.clone(),
        };
        let node = Node {
            kind: "router",
            pod: GATEWAY_POD,
            workload: GATEWAY_POD,
            namespace: GATEWAY_NAMESPACE,
            ip: gateway_pod.ip(),
            labels: &gateway_labels,
            service_account: GATEWAY_ACCOUNT,
        };
        let gateway_proc = start_proxy(&gateway_pod, &node, istiod.ip(), opts, &ferry, &dirs)?;
        let gateway = Running {
            plan: gateway_plan,
            pod: gateway_pod,
            app: None,
            sidecar: Some(gateway_proc),
        };
        for r in running.iter().chain(std::iter::once(&gateway)) {
            if let Some(proxy) = &r.sidecar {
                wait(
                    opts,
                    &format!("the proxy of pod {}", r.plan.name),
                    proxy,
                    || Ok(proxy_ready(&r.pod)),
                )?;
            }
        }
        progress(&format!(
            "ingress gateway: {} in pod {GATEWAY_POD} ({}), ports {:?}",
            match opts.proxy {
                Proxy::Ferry => "ferry gateway",
                Proxy::Envoy(_) => "Envoy",
            },
            gateway.pod.ip(),
            gateway_ports
        ));
        Ok(LocalMesh {
            plan,
            pods: running,
            gateway,
            gateway_ports,
            istiod,
            pilot,
            config_dir: dirs.config,
            mesh,
        })
    }

    /// The directory ferry-pilot watches (edit it, or apply to it).
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// The running pod named `name` (`reviews-v1-0`), the gateway included.
    pub fn pod(&self, name: &str) -> Option<&Running> {
        self.pods
            .iter()
            .chain(std::iter::once(&self.gateway))
            .find(|r| r.plan.name == name)
    }

    /// The address of the gateway's first port inside the mesh.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        let port = u16::try_from(*self.gateway_ports.first()?).ok()?;
        Some(SocketAddr::new(IpAddr::V4(self.gateway.pod.ip()), port))
    }

    /// The pids of every process the mesh started (control plane, apps, proxies).
    pub fn pids(&self) -> Vec<u32> {
        let mut out = vec![self.pilot.pid()];
        for r in self.pods.iter().chain(std::iter::once(&self.gateway)) {
            out.extend(r.app.iter().chain(r.sidecar.iter()).map(Proc::pid));
        }
        out
    }

    /// The last lines of the control plane's and every proxy's log, for a failure message.
    pub fn diagnostics(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let mut out = format!("--- ferry-pilot:\n{}\n", tail(self.pilot.logs().stderr));
        for r in self.pods.iter().chain(std::iter::once(&self.gateway)) {
            if let Some(s) = &r.sidecar {
                out.push_str(&format!(
                    "--- {} proxy:\n{}\n",
                    r.plan.name,
                    tail(s.logs().stderr)
                ));
            }
            if let Some(a) = &r.app {
                let err = a.logs().stderr;
                if !err.trim().is_empty() {
                    out.push_str(&format!("--- {} app:\n{}\n", r.plan.name, tail(err)));
                }
            }
        }
        out
    }
}

/// The directories of a run under the state directory.
struct StateDirs {
    config: PathBuf,
    bootstrap: PathBuf,
    apps: PathBuf,
    bin: PathBuf,
    logs: PathBuf,
}

impl StateDirs {
    fn create(root: &Path) -> Result<StateDirs, LocalError> {
        let dirs = StateDirs {
            config: root.join("config"),
            bootstrap: root.join("bootstrap"),
            apps: root.join("apps"),
            bin: root.join("bin"),
            logs: root.join("logs"),
        };
        for d in [
            root,
            &dirs.config,
            &dirs.bootstrap,
            &dirs.apps,
            &dirs.bin,
            &dirs.logs,
        ] {
            std::fs::create_dir_all(d).map_err(LocalError::io("creating", d))?;
            // The proxies run as uid 1337 and read their bootstraps from here.
            set_mode(d, 0o755)?;
        }
        for (name, text) in [("bookinfo.py", BOOKINFO_APP), ("standin.py", STANDIN_APP)] {
            let path = dirs.apps.join(name);
            std::fs::write(&path, text).map_err(LocalError::io("writing", &path))?;
            set_mode(&path, 0o644)?;
        }
        Ok(dirs)
    }

    /// A copy of `ferry` the proxies' uid can run wherever the build lives (a home directory
    /// closed to other users, say).
    fn install_ferry(&self, ferry: &Path) -> Result<PathBuf, LocalError> {
        let dest = self.bin.join("ferry");
        std::fs::copy(ferry, &dest).map_err(LocalError::io("copying", ferry))?;
        set_mode(&dest, 0o755)?;
        Ok(dest)
    }
}

fn check(opts: &Options) -> Result<(), LocalError> {
    if opts.cancel.load(Ordering::Relaxed) {
        return Err(LocalError::Interrupted);
    }
    Ok(())
}

/// Polls `ready` until it holds, the process exits, the start-up is cancelled, or
/// [`READY_TIMEOUT`] passes.
fn wait(
    opts: &Options,
    what: &str,
    proc: &Proc,
    mut ready: impl FnMut() -> Result<bool, LocalError>,
) -> Result<(), LocalError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        check(opts)?;
        if ready()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LocalError::Failed(format!(
                "{what} not ready after {READY_TIMEOUT:?}:\n{}",
                proc.logs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the proxy's admin answers `/ready` with `LIVE` (Envoy's and Ferry's alike).
fn proxy_ready(pod: &Pod) -> bool {
    let admin = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
    pod.http_get(admin, "127.0.0.1", "/ready", &[])
        .is_ok_and(|r| r.status == 200 && r.body.trim() == "LIVE")
}

fn describe(run: &AppRun, ports: &[u32]) -> String {
    match run {
        AppRun::Bookinfo { service, version } => format!("bookinfo {service} {version}"),
        AppRun::Standin => format!("stand-in app on {ports:?}"),
        AppRun::Nothing => "no app".to_string(),
    }
}

fn start_app(
    p: &PodPlan,
    pod: &Pod,
    plan: &Plan,
    dirs: &StateDirs,
) -> Result<Option<Proc>, LocalError> {
    let port = p.ports.first().copied().unwrap_or(9080);
    let cmd = pod.cmd("python3").arg("-u");
    let cmd = match &p.run {
        AppRun::Bookinfo { service, version } => cmd
            .arg(dirs.apps.join("bookinfo.py"))
            .args([service, version])
            .env("PORT", port.to_string()),
        AppRun::Standin => cmd
            .arg(dirs.apps.join("standin.py"))
            .args(p.ports.iter().map(u32::to_string)),
        AppRun::Nothing => return Ok(None),
    };
    let mut cmd = cmd.env("POD_NAME", &p.name).label("app");
    for (k, v) in plan.service_env(&p.namespace) {
        cmd = cmd.env(k, v);
    }
    let app = cmd.spawn()?;
    for port in &p.ports {
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if pod.wait_port(port, Duration::from_secs(15)).is_err() {
            return Err(LocalError::Failed(format!(
                "the app of pod {} does not listen on {port}:\n{}",
                p.name,
                app.logs()
            )));
        }
    }
    Ok(Some(app))
}

fn start_proxy(
    pod: &Pod,
    node: &Node<'_>,
    pilot: Ipv4Addr,
    opts: &Options,
    ferry: &Path,
    dirs: &StateDirs,
) -> Result<Proc, LocalError> {
    let file = dirs.bootstrap.join(format!("{}.yaml", node.pod));
    std::fs::write(&file, bootstrap(node, pilot)).map_err(LocalError::io("writing", &file))?;
    set_mode(&file, 0o644)?;
    let cmd = match &opts.proxy {
        Proxy::Ferry if node.kind == "router" => pod
            .cmd(ferry)
            .args(["gateway", "--concurrency", "1", "--config"])
            .arg(&file),
        Proxy::Ferry => {
            let mut cmd = pod
                .cmd(ferry)
                .args(["sidecar", "--concurrency", "1", "--ca-addr"])
                .arg(format!("{pilot}:15010"))
                .arg("--config")
                .arg(&file);
            if let Some(ttl) = &opts.cert_ttl {
                cmd = cmd.args(["--cert-ttl", ttl]);
            }
            cmd
        }
        Proxy::Envoy(envoy) => pod.cmd(envoy).arg("-c").arg(&file).args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]),
    };
    let label = if node.kind == "router" {
        "gateway"
    } else {
        "sidecar"
    };
    Ok(cmd.as_uid(PROXY_UID).label(label).spawn()?)
}

/// The server ports of the Gateways that select the ingress gateway's labels.
fn gateway_ports(snapshot: &Snapshot) -> Vec<u32> {
    let mut ports: Vec<u32> = snapshot
        .resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Gateway(g) => Some(g),
            _ => None,
        })
        .filter(|g| {
            g.selector.iter().all(|(k, v)| {
                (k == "istio" && v == "ingressgateway") || (k == "app" && v == GATEWAY_POD)
            })
        })
        .flat_map(|g| g.servers.iter().map(|s| s.port.number))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
