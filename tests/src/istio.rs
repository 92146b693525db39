//! A small Istio mesh in the netns bed: `ferry-pilot serve` (ADS, SDS and
//! the CA) in an `istiod` pod, workload pods running a real app, and, for
//! injected workloads, the capture rules and a sidecar: Ferry (its agent
//! sends a CSR to the CA) or Envoy (its certificate over SDS from
//! ferry-pilot's `sds-grpc`). Tests give the Kubernetes objects and apply
//! Istio files as the istio.io tasks do, then look at what clients get.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{self, Mesh, Pod, Proc, ferry_bin, workspace_bin};
use crate::proxy::apps_dir;

/// The data plane of every sidecar in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    /// `ferry sidecar --ca-addr`: its own key, a CSR to the mesh CA.
    Ferry,
    /// Envoy 1.40: its certificate over SDS from ferry-pilot.
    Envoy,
}

/// What a workload pod runs.
#[derive(Clone, Debug)]
pub enum App {
    /// `echo.py http PORT NAME`: JSON answers naming the workload.
    Http(u16),
    /// `echo.py tcp PORT` on each port: a TCP echo.
    TcpEcho(Vec<u16>),
    /// `echo.py prefix PORT WORD` on each port: a TCP echo answering
    /// `WORD <what was sent>`, as Istio's tcp-echo server.
    TcpPrefix(Vec<u16>, &'static str),
    /// `echo.py extauthz PORT`: Istio's ext-authz sample server (HTTP
    /// check): allows a request carrying `x-ext-authz: allow`, denies
    /// others with 403.
    ExtAuthz(u16),
    /// Only a client (curl, nc).
    None,
}

#[derive(Clone, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub namespace: &'static str,
    pub app: &'static str,
    pub version: &'static str,
    pub service_account: &'static str,
    /// Gets capture rules and a sidecar (the namespace must be labelled
    /// for injection in the Kubernetes objects, or the pod annotated).
    pub injected: bool,
    pub runs: App,
}

/// How ferry-pilot runs in a mesh, beyond its defaults.
#[derive(Clone, Debug, Default)]
pub struct PilotSetup<'a> {
    /// istiod's `mesh` YAML (`--mesh-config`).
    pub mesh_config: Option<&'a str>,
    /// Its environment, as istiod's (`PILOT_ENABLE_AMBIENT=true`).
    pub env: Vec<(&'a str, &'a str)>,
    /// The mesh CA's root certificate and key (PEM files), for tests that
    /// issue certificates of their own from the same root.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Workloads whose sidecar's node says `ENABLE_HBONE: "true"` (accepts
    /// HBONE on 15008 in an ambient mesh).
    pub enable_hbone: Vec<&'a str>,
    /// The node of each workload named here ([`Mesh::pod_on_node`]: its
    /// own segment, routed to the others); the rest, and istiod, are on
    /// node 0.
    pub nodes: Vec<(&'a str, u8)>,
}

/// The running mesh. Dropping it stops every process and removes the pods.
pub struct IstioMesh {
    pub proxy: Proxy,
    pods: Vec<(Workload, Pod, Vec<Proc>)>,
    /// Ingress gateways: pod and proxy (`ferry gateway` or Envoy).
    gateways: Vec<(String, Pod, Proc)>,
    pub pilot: Proc,
    pub istiod: Pod,
    config: PathBuf,
    dir: PathBuf,
    mesh: Mesh,
}

impl Drop for IstioMesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An Envoy v3 bootstrap for a sidecar of `w` at `ip`: node metadata as
/// Istio's injector sets it, ADS and SDS from ferry-pilot.
/// `ferry-pilot serve` in `pod` on its ADS port 15010 with the configuration
/// directory `config`, returned once it listens.
pub fn serve_pilot(pod: &Pod, config: &Path) -> Result<Proc> {
    let pilot = pod
        .cmd(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args(["serve", "--listen", "0.0.0.0:15010", "--config"])
        .arg(config)
        .label("pilot")
        .spawn()?;
    if let Err(e) = pod.wait_port(15010, Duration::from_secs(30)) {
        bail!("{e}: {}", pilot.logs().stderr);
    }
    Ok(pilot)
}

/// `ferry sidecar` in `pod` on the bootstrap `boot`, as its own agent
/// (`--ca-addr` to ferry-pilot at `pilot`), as the proxy's uid 1337: the
/// caller adds what else it needs and spawns it.
pub fn agent_sidecar(pod: &Pod, boot: &Path, pilot: Ipv4Addr) -> netns::PodCommand {
    pod.cmd(ferry_bin())
        .args(["sidecar", "--concurrency", "1", "--status-addr", "off"])
        .arg("--ca-addr")
        .arg(format!("{pilot}:15010"))
        .arg("--config")
        .arg(boot)
        .as_uid(1337)
}

pub fn bootstrap(w: &Workload, ip: Ipv4Addr, pilot: Ipv4Addr) -> String {
    let Workload {
        name,
        namespace: ns,
        app,
        version,
        service_account: sa,
        ..
    } = w;
    bootstrap_for(
        &format!("sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local"),
        &format!("{app}.{ns}"),
        &format!(
            "NAMESPACE: {ns}, LABELS: {{app: {app}, version: {version}, security.istio.io/tlsMode: istio}}, \
             SERVICE_ACCOUNT: {sa}, INSTANCE_IPS: \"{ip}\""
        ),
        pilot,
    )
}

/// A bootstrap with this node (`metadata` is the inside of a YAML flow
/// map), ADS and SDS from ferry-pilot at `pilot`: the local platform's, which
/// `ferry-pilot demo` runs its proxies on.
pub use ferry_pilot::local::bootstrap::bootstrap_for;

/// istio-agent's bootstrap as the agent writes it (Istio's
/// `bootstrap-default_golden.json`, from `../shared`), made a pod's: the node
/// is this workload's (`metadata` joins the golden's keys) and ADS comes
/// through the Unix socket `xds_socket`, the agent's `XDS` socket. The rest
/// is the golden's as written: the 15021 readiness and 15090 Prometheus
/// listeners, the `sds-grpc` socket (unused beside `--ca-addr`), runtime,
/// stats and overload settings, delta ADS.
pub fn agent_bootstrap(
    node_id: &str,
    cluster: &str,
    metadata: &serde_json::Value,
    xds_socket: &Path,
) -> Result<String> {
    let path = crate::istio_material(
        "istio-config-dumps/istio-upstream-testdata/bootstrap-default_golden.json",
    )?;
    let mut golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    golden["node"]["id"] = node_id.into();
    golden["node"]["cluster"] = cluster.into();
    let Some(meta) = golden["node"]["metadata"].as_object_mut() else {
        bail!("{}: no node metadata", path.display());
    };
    if let Some(extra) = metadata.as_object() {
        meta.extend(extra.clone());
    }
    let Some(xds) = golden["static_resources"]["clusters"]
        .as_array_mut()
        .and_then(|cs| cs.iter_mut().find(|c| c["name"] == "xds-grpc"))
    else {
        bail!("{}: no xds-grpc cluster", path.display());
    };
    let pipe = &mut xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["pipe"]["path"];
    ensure!(
        pipe.is_string(),
        "{}: xds-grpc is not a pipe",
        path.display()
    );
    *pipe = xds_socket.display().to_string().into();
    Ok(serde_json::to_string_pretty(&golden)?)
}

impl IstioMesh {
    /// Starts the mesh, or `None` when not root (outside CI). `objects`
    /// gets each workload's name and IP and returns the Kubernetes YAML.
    pub fn start(
        proxy: Proxy,
        workloads: &[Workload],
        objects: impl Fn(&[(&str, Ipv4Addr)]) -> String,
        cert_ttl: &str,
    ) -> Result<Option<Self>> {
        Self::start_mixed(proxy, |_| proxy, workloads, objects, cert_ttl)
    }

    /// As [`IstioMesh::start`], with the proxy of each workload chosen by
    /// `proxy_of` (`proxy` names the run in messages).
    pub fn start_mixed(
        proxy: Proxy,
        proxy_of: impl Fn(&Workload) -> Proxy,
        workloads: &[Workload],
        objects: impl Fn(&[(&str, Ipv4Addr)]) -> String,
        cert_ttl: &str,
    ) -> Result<Option<Self>> {
        Self::start_full(proxy, proxy_of, workloads, objects, cert_ttl, None)
    }

    /// As [`IstioMesh::start`], ferry-pilot reading `mesh_config` (the `mesh`
    /// YAML of istiod's ConfigMap: extension providers, tracing defaults).
    pub fn start_with_mesh_config(
        proxy: Proxy,
        workloads: &[Workload],
        objects: impl Fn(&[(&str, Ipv4Addr)]) -> String,
        mesh_config: &str,
    ) -> Result<Option<Self>> {
        Self::start_full(
            proxy,
            |_| proxy,
            workloads,
            objects,
            "24h",
            Some(mesh_config),
        )
    }

    /// [`IstioMesh::start_mixed`] with ferry-pilot reading `mesh_config`.
    pub fn start_mixed_with_mesh_config(
        proxy: Proxy,
        proxy_of: impl Fn(&Workload) -> Proxy,
        workloads: &[Workload],
        objects: impl Fn(&[(&str, Ipv4Addr)]) -> String,
        mesh_config: &str,
    ) -> Result<Option<Self>> {
        Self::start_full(
            proxy,
            proxy_of,
            workloads,
            objects,
            "24h",
            Some(mesh_config),
        )
    }

    fn start_full(
        proxy: Proxy,
        proxy_of: impl Fn(&Workload) -> Proxy,
        workloads: &[Workload],
        objects: impl Fn(&[(&str, Ipv4Addr)]) -> String,
        cert_ttl: &str,
        mesh_config: Option<&str>,
    ) -> Result<Option<Self>> {
        Self::start_with(
            proxy,
            proxy_of,
            workloads,
            objects,
            cert_ttl,
            PilotSetup {
                mesh_config,
                ..Default::default()
            },
        )
    }

    /// [`IstioMesh::start_mixed`] with ferry-pilot run as `setup` says.
    pub fn start_with(
        proxy: Proxy,
        proxy_of: impl Fn(&Workload) -> Proxy,
        workloads: &[Workload],
        objects: impl Fn(&[(&str, Ipv4Addr)]) -> String,
        cert_ttl: &str,
        setup: PilotSetup<'_>,
    ) -> Result<Option<Self>> {
        let mesh_config = setup.mesh_config;
        if !netns::require_root() {
            return Ok(None);
        }
        let envoy = crate::envoy::require_bin()?;
        let mesh = Mesh::new()?;
        let istiod = mesh.pod("istiod")?;
        let mut pods = Vec::new();
        for w in workloads {
            let node = setup
                .nodes
                .iter()
                .find(|(n, _)| *n == w.name)
                .map_or(0, |(_, node)| *node);
            pods.push(mesh.pod_on_node(w.name, node)?);
        }
        let dir = std::env::temp_dir().join(format!("ferry-istio-{}", istiod.ns_name()));
        let config = dir.join("config");
        std::fs::create_dir_all(&config)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let ips: Vec<(&str, Ipv4Addr)> = workloads
            .iter()
            .zip(&pods)
            .map(|(w, p)| (w.name, p.ip()))
            .collect();
        std::fs::write(config.join("objects.yaml"), objects(&ips))?;
        let mut pilot = istiod
            .cmd(workspace_bin("ferry-pilot", "ferry-pilot"))
            .args(["serve", "--listen", "0.0.0.0:15010", "--config"])
            .arg(&config);
        if let Some(text) = mesh_config {
            let file = dir.join("mesh.yaml");
            std::fs::write(&file, text)?;
            pilot = pilot.arg("--mesh-config").arg(file);
        }
        for (k, v) in &setup.env {
            pilot = pilot.env(k, v);
        }
        if let Some((cert, key)) = &setup.ca {
            pilot = pilot.arg("--ca-cert").arg(cert).arg("--ca-key").arg(key);
        }
        let pilot = pilot.label("pilot").spawn()?;
        if let Err(e) = istiod.wait_port(15010, Duration::from_secs(30)) {
            bail!("{e}: {}", pilot.logs().stderr);
        }
        let mut started = Vec::new();
        for (w, pod) in workloads.iter().zip(pods) {
            let mut procs = Vec::new();
            let echo = |args: &[&str]| {
                pod.cmd("python3")
                    .arg("-u")
                    .arg(apps_dir().join("echo.py"))
                    .args(args)
                    .env("ECHO_BIND", "0.0.0.0")
                    .label("app")
                    .spawn()
            };
            match &w.runs {
                App::Http(port) => {
                    procs.push(echo(&["http", &port.to_string(), w.name])?);
                    pod.wait_port(*port, Duration::from_secs(15))?;
                }
                App::TcpEcho(ports) => {
                    for port in ports {
                        procs.push(echo(&["tcp", &port.to_string()])?);
                        pod.wait_port(*port, Duration::from_secs(15))?;
                    }
                }
                App::TcpPrefix(ports, word) => {
                    for port in ports {
                        procs.push(echo(&["prefix", &port.to_string(), word])?);
                        pod.wait_port(*port, Duration::from_secs(15))?;
                    }
                }
                App::ExtAuthz(port) => {
                    procs.push(echo(&["extauthz", &port.to_string()])?);
                    pod.wait_port(*port, Duration::from_secs(15))?;
                }
                App::None => {}
            }
            if w.injected {
                let out = pod.cmd(ferry_bin()).arg("iptables").output()?;
                ensure!(
                    out.status.success(),
                    "ferry iptables: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let file = dir.join(format!("{}.yaml", w.name));
                let mut text = bootstrap(w, pod.ip(), istiod.ip());
                if setup.enable_hbone.contains(&w.name) {
                    // As the ambient profile's ISTIO_META_ENABLE_HBONE.
                    text = text.replacen("metadata: {", "metadata: {ENABLE_HBONE: \"true\", ", 1);
                }
                std::fs::write(&file, text)?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
                let cmd = match proxy_of(w) {
                    Proxy::Ferry => pod
                        .cmd(ferry_bin())
                        .args(["sidecar", "--concurrency", "1", "--cert-ttl", cert_ttl])
                        .arg("--ca-addr")
                        .arg(format!("{}:15010", istiod.ip()))
                        .arg("--config")
                        .arg(&file),
                    // As istio-agent runs it: connections of a changed filter
                    // chain are told to close on their next response, so an
                    // updated policy holds at once.
                    Proxy::Envoy => pod.cmd(&envoy).arg("-c").arg(&file).args([
                        "--drain-strategy",
                        "immediate",
                        "--drain-time-s",
                        "45",
                        "--concurrency",
                        "1",
                        "--disable-hot-restart",
                        "--log-level",
                        "warn",
                    ]),
                };
                procs.push(cmd.as_uid(1337).label("sidecar").spawn()?);
            }
            started.push((w.clone(), pod, procs));
        }
        for (w, pod, procs) in &started {
            if w.injected
                && let Some(sidecar) = procs.last()
            {
                pod.wait_sidecar_ready(sidecar, Duration::from_secs(30))?;
            }
        }
        Ok(Some(IstioMesh {
            proxy,
            pods: started,
            gateways: Vec::new(),
            pilot,
            istiod,
            config,
            dir,
            mesh,
        }))
    }

    /// Starts an ingress gateway (a `router` node, no capture) in a new pod
    /// of `namespace` whose labels are `labels` (`istio: ingressgateway`):
    /// `ferry gateway` or Envoy, as the mesh's proxy. Returns its address.
    pub fn add_gateway(
        &mut self,
        name: &str,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Result<Ipv4Addr> {
        self.add_gateway_with(self.proxy, name, namespace, labels)
    }

    /// [`IstioMesh::add_gateway`] run by `proxy`, whatever the mesh's.
    pub fn add_gateway_with(
        &mut self,
        proxy: Proxy,
        name: &str,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Result<Ipv4Addr> {
        let pod = self.mesh.pod(name)?;
        let ip = pod.ip();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        // Its Pod joins the objects: its address gives it an identity.
        let objects = self.config.join("objects.yaml");
        let mut text = std::fs::read_to_string(&objects)?;
        text.push_str(&format!(
            "\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{}}}}}\n\
             spec: {{serviceAccountName: {name}, containers: [{{name: istio-proxy, image: proxy}}]}}\nstatus: {{podIP: {ip}}}\n",
            labels.join(", ")
        ));
        let tmp = self.config.join(".objects.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &objects)?;
        let text = bootstrap_for(
            &format!("router~{ip}~{name}.{namespace}~{namespace}.svc.cluster.local"),
            &format!("{name}.{namespace}"),
            &format!(
                "NAMESPACE: {namespace}, LABELS: {{{}}}, SERVICE_ACCOUNT: {name}, INSTANCE_IPS: \"{ip}\"",
                labels.join(", ")
            ),
            self.istiod.ip(),
        );
        let file = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&file, text)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        let cmd = match proxy {
            Proxy::Ferry => pod
                .cmd(ferry_bin())
                .args(["gateway", "--concurrency", "1", "--config"])
                .arg(&file),
            Proxy::Envoy => pod
                .cmd(crate::envoy::require_bin()?)
                .arg("-c")
                .arg(&file)
                .args([
                    "--drain-strategy",
                    "immediate",
                    "--drain-time-s",
                    "45",
                    "--concurrency",
                    "1",
                    "--disable-hot-restart",
                    "--log-level",
                    "warn",
                ]),
        };
        let proc = cmd.as_uid(1337).label("gateway").spawn()?;
        pod.wait_sidecar_ready(&proc, Duration::from_secs(30))?;
        self.gateways.push((name.to_string(), pod, proc));
        Ok(ip)
    }

    /// A pod with no sidecar and no app, to play an outside client.
    pub fn add_client(&mut self, name: &str) -> Result<Pod> {
        Ok(self.mesh.pod(name)?)
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|(w, _, _)| w.name == name)
            .map(|(_, p, _)| p)
            .unwrap_or_else(|| panic!("no workload {name:?} in this mesh"))
    }

    /// The sidecar process of workload `name`.
    pub fn sidecar(&self, name: &str) -> Option<&Proc> {
        self.pods
            .iter()
            .find(|(w, _, _)| w.name == name && w.injected)
            .and_then(|(_, _, procs)| procs.last())
    }

    /// Replaces the applied Istio files with `files` (the Kubernetes
    /// objects stay), each written whole and renamed into place.
    pub fn apply(&self, files: &[&Path]) -> Result<()> {
        for e in std::fs::read_dir(&self.config)? {
            let p = e?.path();
            if p.file_name().is_some_and(|n| n != "objects.yaml") {
                std::fs::remove_file(p)?;
            }
        }
        for f in files {
            let name = f.file_name().context("a file name")?.to_string_lossy();
            let text = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
            let tmp = self.config.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, self.config.join(&*name))?;
        }
        Ok(())
    }

    /// Writes one applied file (`name` in the configuration directory)
    /// whole and renames it into place, leaving the others as they are: an
    /// edit of one resource, as `kubectl apply -f` of one file.
    pub fn put(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.config.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.config.join(name))?;
        Ok(())
    }

    /// Removes one applied file (`kubectl delete -f`).
    pub fn delete(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.config.join(name))
            .with_context(|| format!("no applied file {name}"))
    }

    /// The logs a failure message needs: the control plane's and every
    /// sidecar's (last lines).
    pub fn diagnostics(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        let mut out = format!("--- pilot:\n{}\n", tail(self.pilot.logs().stderr));
        for (w, _, procs) in &self.pods {
            if w.injected
                && let Some(s) = procs.last()
            {
                out.push_str(&format!(
                    "--- {} sidecar:\n{}\n",
                    w.name,
                    tail(s.logs().stderr)
                ));
            }
        }
        out
    }

    /// Polls `probe` until `want` accepts its result (a configuration
    /// change needs a moment to reach the sidecars); the last result, or
    /// an error with the diagnostics after `timeout`.
    pub fn until<T: std::fmt::Debug>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<T>,
        want: impl Fn(&T) -> bool,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = probe()?;
            if want(&got) {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} ({:?} sidecars): last result {got:?}\n{}",
                    self.proxy,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// An HTTP request with curl from `pod`: the status (0 when the connection
/// failed) and the body. `extra` are more curl arguments (`-X POST`, `-H …`).
pub fn curl(pod: &Pod, url: &str, extra: &[&str]) -> Result<(u16, String)> {
    let out = pod
        .cmd("curl")
        .args(["-sS", "-m", "5", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .timeout(Duration::from_secs(10))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        // No answer: curl's own error says why (refused, reset, timeout).
        return Ok((
            0,
            format!("{body}{}", String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    Ok((code, body.to_string()))
}

/// A request header as `echo.py` reports it in its JSON answer (names
/// compared without case); an error when the answer is not echo's JSON.
pub fn echo_header(body: &str, name: &str) -> Result<Option<String>> {
    let echo: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("echo answer {body:?}"))?;
    Ok(echo["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .and_then(|h| h[1].as_str())
        .map(str::to_string))
}

/// Sends `line` over TCP from `pod` and returns what came back before the
/// server or the proxy closed (empty when refused or reset).
pub fn tcp_exchange(pod: &Pod, host: &str, port: u16, line: &str) -> Result<String> {
    let script = format!(
        "import socket,sys\n\
         try:\n\
         \x20   s = socket.create_connection(('{host}', {port}), timeout=3)\n\
         \x20   s.sendall(b'{line}\\n'); s.settimeout(2); out = b''\n\
         \x20   while not out.endswith(b'\\n'):\n\
         \x20       b = s.recv(4096)\n\
         \x20       if not b: break\n\
         \x20       out += b\n\
         \x20   sys.stdout.write(out.decode())\n\
         except Exception as e:\n\
         \x20   pass\n"
    );
    Ok(pod
        .cmd("python3")
        .args(["-c", &script])
        .timeout(Duration::from_secs(10))
        .run()?
        .trim()
        .to_string())
}

/// An HTTP/1.1 GET over TLS from `pod` to `host:port`, presenting the
/// client certificate in `cert`/`key` (PEM files) and offering `alpn`, the
/// server's certificate not checked (a forger has nothing to check it
/// with): the status, or `None` when the handshake or the connection
/// failed.
pub fn tls_get(
    pod: &Pod,
    host: &str,
    port: u16,
    cert: &Path,
    key: &Path,
    alpn: &[&str],
) -> Result<Option<u16>> {
    let alpn = alpn
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "import socket,ssl,sys\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
         ctx.check_hostname = False\n\
         ctx.verify_mode = ssl.CERT_NONE\n\
         ctx.load_cert_chain('{cert}', '{key}')\n\
         ctx.set_alpn_protocols([{alpn}])\n\
         try:\n\
         \x20   s = ctx.wrap_socket(socket.create_connection(('{host}', {port}), timeout=3))\n\
         \x20   s.sendall(b'GET /hello HTTP/1.1\\r\\nhost: {host}\\r\\nconnection: close\\r\\n\\r\\n')\n\
         \x20   out = s.recv(64)\n\
         \x20   sys.stdout.write(out.split(b' ')[1].decode() if out.startswith(b'HTTP/') else 'none')\n\
         except Exception as e:\n\
         \x20   sys.stdout.write('none')\n",
        cert = cert.display(),
        key = key.display(),
    );
    let out = pod
        .cmd("python3")
        .args(["-c", &script])
        .timeout(Duration::from_secs(10))
        .run()?;
    Ok(out.trim().parse().ok())
}

/// A long-lived TCP connection from a pod to an echo server
/// (`clients.py hold`): a line echoed when it opens, then one more each time
/// it is poked; the time the proxy closed it, if it did.
pub struct TcpHolder {
    proc: Proc,
    ctl: PathBuf,
    name: String,
    pokes: u32,
}

impl TcpHolder {
    /// Connects from `pod` to `host:port` and waits for the first echo.
    /// `ctl` is a directory the test and the holder share.
    pub fn open(pod: &Pod, host: &str, port: u16, ctl: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(ctl)?;
        let proc = pod
            .cmd("python3")
            .arg("-u")
            .arg(apps_dir().join("clients.py"))
            .arg("hold")
            .arg(format!("{host}:{port}"))
            .arg(ctl)
            .arg(name)
            .label(&format!("hold-{name}"))
            .spawn()?;
        let holder = Self {
            proc,
            ctl: ctl.to_path_buf(),
            name: name.to_string(),
            pokes: 0,
        };
        holder.wait_echo("start")?;
        Ok(holder)
    }

    fn wait_echo(&self, word: &str) -> Result<()> {
        let want = format!("echoed {word}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.proc.logs().stdout;
            if out.lines().any(|l| l == want) {
                return Ok(());
            }
            if out
                .lines()
                .any(|l| l.starts_with("closed") || l.starts_with("unexpected"))
                || Instant::now() > deadline
            {
                bail!("{}: no {want:?}: {}", self.name, self.proc.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one more line over the same connection and waits for its echo.
    pub fn poke(&mut self) -> Result<()> {
        self.pokes += 1;
        std::fs::write(self.ctl.join(format!("{}.{}", self.name, self.pokes)), "")?;
        self.wait_echo(&self.pokes.to_string())
    }

    /// When the connection was seen closed (UNIX seconds), if it was.
    pub fn closed_at(&self) -> Option<f64> {
        self.proc
            .logs()
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("closed ")?.trim().parse().ok())
    }

    pub fn logs(&self) -> String {
        self.proc.logs().to_string()
    }
}

// ------------------------------------------------------------- task steps

/// What a client does and what the docs say it gets.
#[derive(Clone, Debug)]
pub enum Check {
    /// curl from the client pod: `Host:port` (a Service name resolved to
    /// its cluster IP, or `pod:NAME`), path, extra curl arguments, the
    /// expected status (0: the connection failed or was reset).
    Http {
        client: String,
        host: String,
        port: u16,
        path: &'static str,
        args: &'static [&'static str],
        status: u16,
    },
    /// A line over TCP to `host` (a Service name or `pod:NAME`): echoed
    /// back when allowed, nothing when rejected.
    Tcp {
        client: String,
        host: String,
        port: u16,
        allowed: bool,
    },
}

/// The files in force for a step (replacing the previous step's), and
/// what must hold then.
pub struct Step {
    pub apply: &'static [&'static str],
    pub checks: Vec<Check>,
}

pub fn http(client: &str, host: &str, port: u16, path: &'static str, status: u16) -> Check {
    http_with(client, host, port, path, &[], status)
}

pub fn http_with(
    client: &str,
    host: &str,
    port: u16,
    path: &'static str,
    args: &'static [&'static str],
    status: u16,
) -> Check {
    Check::Http {
        client: client.to_string(),
        host: host.to_string(),
        port,
        path,
        args,
        status,
    }
}

pub fn tcp(client: &str, host: &str, port: u16, allowed: bool) -> Check {
    Check::Tcp {
        client: client.to_string(),
        host: host.to_string(),
        port,
        allowed,
    }
}

/// Runs one check: whether its result is the expected one, and the result.
fn run_check(m: &IstioMesh, c: &Check, vips: &[(&str, &str)]) -> Result<(bool, String)> {
    let vip = |host: &str| {
        vips.iter()
            .find(|(h, _)| *h == host)
            .map(|(_, v)| v.to_string())
            .with_context(|| format!("no cluster IP for {host:?}"))
    };
    match c {
        Check::Http {
            client,
            host,
            port,
            path,
            args,
            status,
        } => {
            // `pod:NAME` is the pod's own address, as kube-proxy would
            // pick it for a client without a sidecar.
            let (url, resolve) = match host.strip_prefix("pod:") {
                Some(pod) => (format!("http://{}:{port}{path}", m.pod(pod).ip()), None),
                None => (
                    format!("http://{host}:{port}{path}"),
                    Some(format!("{host}:{port}:{}", vip(host)?)),
                ),
            };
            let mut extra: Vec<&str> = Vec::new();
            if let Some(r) = &resolve {
                extra.extend(["--resolve", r.as_str()]);
            }
            extra.extend(args.iter());
            let (code, body) = curl(m.pod(client), &url, &extra)?;
            let short: String = body.chars().take(60).collect();
            Ok((code == *status, format!("{code} {short}")))
        }
        Check::Tcp {
            client,
            host,
            port,
            allowed,
        } => {
            let addr = match host.strip_prefix("pod:") {
                Some(pod) => m.pod(pod).ip().to_string(),
                None => vip(host)?,
            };
            let line = format!("port {port}");
            let got = tcp_exchange(m.pod(client), &addr, *port, &line)?;
            Ok(((got == line) == *allowed, format!("{got:?}")))
        }
    }
}

/// Runs a task's steps: each step's files applied (from `dir`), then its
/// checks polled until every one gives the expected result in the same
/// round, twice in a row. `vips` maps Service names to cluster IPs.
pub fn run_steps(
    m: &IstioMesh,
    dir: &Path,
    task: &str,
    steps: &[Step],
    vips: &[(&str, &str)],
) -> Result<()> {
    for (i, step) in steps.iter().enumerate() {
        let files: Vec<PathBuf> = step.apply.iter().map(|f| dir.join(f)).collect();
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        m.apply(&refs)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut good_rounds = 0;
        loop {
            let mut wrong = Vec::new();
            for c in &step.checks {
                let (ok, got) = run_check(m, c, vips)?;
                if !ok {
                    wrong.push(format!("{c:?} got {got}"));
                }
            }
            good_rounds = if wrong.is_empty() { good_rounds + 1 } else { 0 };
            if good_rounds == 2 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{task} step {} ({:?}) through {:?} sidecars: never as the docs expect:\n{}\n{}",
                    i + 1,
                    step.apply,
                    m.proxy,
                    wrong.join("\n"),
                    m.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(())
}

/// A Pod (labels `app`, `version: v1`) with its service account and IP.
pub fn pod_yaml(ips: &[(&str, Ipv4Addr)], name: &str, ns: &str, app: &str, sa: &str) -> String {
    let ip = ips
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, ip)| ip.to_string())
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}, version: v1}}}}\n\
         spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
    )
}

/// A Service selecting `app: NAME`, with (name, port, target port) ports.
pub fn service_yaml(name: &str, ns: &str, vip: &str, ports: &[(&str, u16, u16)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, t)| format!("{{name: {n}, port: {p}, targetPort: {t}}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{}]}}\n---\n",
        ports.join(", ")
    )
}
