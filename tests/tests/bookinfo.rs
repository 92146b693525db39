//! The istio.io traffic-management tasks beyond bookinfo's own walk-through (which
//! `walkthrough.rs` runs on the project's fixtures): request timeouts, mirroring and circuit
//! breaking with the tasks' files as they are (`../shared/istio-samples/istio.io-tasks/`), the
//! same through Envoy sidecars and through Ferry sidecars. Pods are network namespaces with
//! real capture rules, injected as Istio injects them (Istio mTLS between sidecars,
//! certificates from ferry-pilot's CA), echo workloads answer with their name (`reviews-v2`,
//! httpbin v1/v2), every sidecar is fed by `ferry-pilot serve`. Ferry runs twice: on the local bootstrap, and
//! on istio-agent's own bootstrap as the agent writes it (Istio's golden: its 15021 and 15090
//! listeners, delta ADS through the agent's `XDS` Unix socket). Needs Istio's material beside
//! the repository: without it the test is listed as skipped (and fails under `CI=true`).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, Mesh, Pod, Proc, ferry_bin, workspace_bin};
use ferry_tests::proxy::{apps_dir, unix_relay};

/// A Service as a client addresses it: its cluster IP, port and host name.
struct Svc {
    vip: &'static str,
    port: u16,
    host: &'static str,
}

const REVIEWS: Svc = Svc {
    vip: "10.96.0.20",
    port: 9080,
    host: "reviews",
};
const RATINGS: Svc = Svc {
    vip: "10.96.0.30",
    port: 9080,
    host: "ratings",
};
const HTTPBIN: Svc = Svc {
    vip: "10.96.0.50",
    port: 8000,
    host: "httpbin",
};

/// `../shared/istio-samples`: bookinfo's networking files and the
/// istio.io tasks' files, applied as they are.
fn samples() -> Result<PathBuf> {
    ferry_tests::istio_material("istio-samples/bookinfo/networking")?;
    ferry_tests::istio_material("istio-samples")
}

const BOOKINFO: &str = "bookinfo/networking";
const TIMEOUTS: &str = "istio.io-tasks/traffic-management/request-timeouts";
const MIRRORING: &str = "istio.io-tasks/traffic-management/mirroring";

/// The workloads: name, app label, version label, the port the app serves.
/// httpbin v1/v2 stand in for the mirroring task's httpbin deployments.
const WORKLOADS: &[(&str, &str, &str, u16)] = &[
    ("productpage", "productpage", "v1", 9080),
    ("reviews-v1", "reviews", "v1", 9080),
    ("reviews-v2", "reviews", "v2", 9080),
    ("reviews-v3", "reviews", "v3", 9080),
    ("ratings", "ratings", "v1", 9080),
    ("httpbin-v1", "httpbin", "v1", 80),
    ("httpbin-v2", "httpbin", "v2", 80),
];

fn kube_yaml(ips: &[(String, Ipv4Addr)]) -> String {
    let mut out = String::new();
    for (name, vip, port, target) in [
        ("productpage", "10.96.0.10", 9080, 9080),
        ("reviews", REVIEWS.vip, 9080, 9080),
        ("ratings", RATINGS.vip, 9080, 9080),
        ("details", "10.96.0.40", 9080, 9080),
        // As the mirroring task's httpbin Service: port 8000 to the pods' 80.
        ("httpbin", HTTPBIN.vip, HTTPBIN.port, 80),
    ] {
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: http, port: {port}, targetPort: {target}}}]}}\n---\n"
        );
    }
    out += "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio-injection: enabled}}\n---\n";
    for (pod, ip) in ips {
        let (_, app, version, port) = WORKLOADS
            .iter()
            .find(|w| w.0 == pod)
            .copied()
            .unwrap_or(("", "", "", 0));
        out += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: default, labels: {{app: {app}, version: {version}}}}}\n\
             spec: {{serviceAccountName: bookinfo-{app}, containers: [{{name: app, image: echo, ports: [{{containerPort: {port}}}]}}]}}\n\
             status: {{podIP: {ip}}}\n---\n"
        );
    }
    out
}

/// Which data plane the sidecars run, on which bootstrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sidecars {
    /// Envoy 1.40 on the local bootstrap, its certificate over SDS.
    Envoy,
    /// `ferry sidecar --ca-addr` on the local bootstrap.
    Ferry,
    /// `ferry sidecar --ca-addr` on istio-agent's own bootstrap (Istio's
    /// golden), ADS through the agent's `XDS` Unix socket relayed to
    /// ferry-pilot.
    FerryOnAgentBootstrap,
}

fn labels(pod: &str) -> (&'static str, &'static str) {
    let (_, app, version, _) = WORKLOADS
        .iter()
        .find(|w| w.0 == pod)
        .copied()
        .unwrap_or(("", "", "", 0));
    (app, version)
}

/// istio-agent's bootstrap for `pod`: the node as the agent names it, ADS
/// through the Unix socket `xds`.
fn agent_bootstrap(pod: &str, ip: Ipv4Addr, xds: &Path) -> Result<String> {
    let (app, version) = labels(pod);
    ferry_tests::istio::agent_bootstrap(
        &format!("sidecar~{ip}~{pod}.default~default.svc.cluster.local"),
        &format!("{app}.default"),
        &serde_json::json!({
            "NAMESPACE": "default",
            "NAME": pod,
            "LABELS": {"app": app, "version": version, "security.istio.io/tlsMode": "istio"},
            "SERVICE_ACCOUNT": format!("bookinfo-{app}"),
            "INSTANCE_IPS": ip.to_string(),
        }),
        xds,
    )
}

fn bootstrap(pod: &str, ip: Ipv4Addr, pilot: Ipv4Addr) -> String {
    let (app, version) = labels(pod);
    // As injected pods: Istio mTLS between the sidecars, certificates from
    // ferry-pilot's CA (Envoy over SDS, Ferry by CSR).
    ferry_tests::istio::bootstrap_for(
        &format!("sidecar~{ip}~{pod}.default~default.svc.cluster.local"),
        &format!("{app}.default"),
        &format!(
            "NAMESPACE: default, LABELS: {{app: {app}, version: {version}, security.istio.io/tlsMode: istio}}, \
             SERVICE_ACCOUNT: bookinfo-{app}, INSTANCE_IPS: \"{ip}\""
        ),
        pilot,
    )
}

struct Bookinfo {
    _mesh: Mesh,
    pods: Vec<(Pod, Vec<Proc>)>,
    pilot: (Pod, Proc),
    config: PathBuf,
    samples: PathBuf,
    dir: PathBuf,
}

impl Drop for Bookinfo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bookinfo {
    fn client(&self) -> &Pod {
        &self.pods[0].0
    }

    /// Replaces the traffic rules with `files` (paths under the samples;
    /// the services and `destination-rule-all.yaml` stay). A file given as
    /// `PATH#Kind` contributes only its documents of that kind.
    fn apply(&self, files: &[&str]) -> Result<()> {
        for e in std::fs::read_dir(&self.config)? {
            let p = e?.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n != "bookinfo.yaml" && n != "destination-rule-all.yaml")
            {
                std::fs::remove_file(p)?;
            }
        }
        for f in files {
            let (path, kind) = match f.split_once('#') {
                Some((p, k)) => (p, Some(k)),
                None => (*f, None),
            };
            let text = std::fs::read_to_string(self.samples.join(path))
                .with_context(|| format!("reading {path}"))?;
            let text = match kind {
                None => text,
                Some(kind) => text
                    .split("\n---")
                    .filter(|doc| doc.contains(&format!("kind: {kind}")))
                    .collect::<Vec<_>>()
                    .join("\n---"),
            };
            let name = Path::new(path)
                .file_name()
                .context("a file name")?
                .to_string_lossy()
                .into_owned();
            let name = match kind {
                Some(kind) => format!("{}-{kind}.yaml", name.trim_end_matches(".yaml")),
                None => name,
            };
            // Written whole under a temporary name, then renamed: the
            // control plane never reads half a file.
            let tmp = self.config.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, self.config.join(&name))?;
        }
        Ok(())
    }

    /// `clients` concurrent connections from productpage, each sending `n`
    /// requests for `path` in turn; the status codes, in no order.
    fn concurrent(&self, svc: &Svc, path: &str, clients: usize, n: usize) -> Result<Vec<u16>> {
        let Svc { vip, port, host } = svc;
        let script = format!(
            "import http.client, threading\n\
             codes = []\n\
             def run():\n\
             \x20   for i in range({n}):\n\
             \x20       c = http.client.HTTPConnection('{vip}', {port}, timeout=20)\n\
             \x20       c.request('GET', '{path}', headers={{'Host': '{host}:{port}'}})\n\
             \x20       r = c.getresponse(); r.read(); codes.append(r.status); c.close()\n\
             ts = [threading.Thread(target=run) for _ in range({clients})]\n\
             [t.start() for t in ts]; [t.join() for t in ts]\n\
             print(' '.join(map(str, codes)))\n"
        );
        let out = self
            .client()
            .cmd("/usr/bin/python3")
            .args(["-c", &script])
            .timeout(Duration::from_secs(120))
            .run()?;
        out.split_whitespace().map(|c| Ok(c.parse()?)).collect()
    }

    /// What the app of pod `name` counted for `path` (`/hits` of echo.py):
    /// the number of requests and the Host of the last one.
    fn hits(&self, name: &str, path: &str) -> Result<(u64, String)> {
        let (pod, _) = self
            .pods
            .iter()
            .find(|(p, _)| p.name() == name)
            .with_context(|| format!("no pod {name}"))?;
        let port = WORKLOADS.iter().find(|w| w.0 == name).map_or(9080, |w| w.3);
        let out = pod
            .cmd("curl")
            .args(["-s", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{port}/hits{path}"))
            .output()?;
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("/hits from {name}: {:?}", out))?;
        Ok((
            doc["hits"].as_u64().unwrap_or(0),
            doc["host"].as_str().unwrap_or("").to_string(),
        ))
    }

    /// Runs `n` requests for `path` from productpage; returns the answering
    /// names (or `status:NNN`; `NAME>STATUS:UPSTREAM` when the app called
    /// another service) with the time each took.
    fn requests(
        &self,
        svc: &Svc,
        path: &str,
        user: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, f64)>> {
        let Svc { vip, port, host } = svc;
        let user = user
            .map(|u| format!("'end-user': '{u}',"))
            .unwrap_or_default();
        let script = format!(
            "import http.client, json, time\n\
             c = http.client.HTTPConnection('{vip}', {port}, timeout=20)\n\
             for i in range({n}):\n\
             \x20   t = time.monotonic()\n\
             \x20   c.request('GET', '{path}', headers={{'Host': '{host}:{port}', {user}}})\n\
             \x20   r = c.getresponse(); body = r.read()\n\
             \x20   doc = json.loads(body) if r.status == 200 else None\n\
             \x20   name = doc['name'] if doc else 'status:%d' % r.status\n\
             \x20   up = doc.get('upstream') if doc else None\n\
             \x20   name += '>%s:%s' % (up['status'], up['name']) if up else ''\n\
             \x20   print(name, round(time.monotonic() - t, 3), flush=True)\n"
        );
        let out = self
            .client()
            .cmd("/usr/bin/python3")
            .args(["-c", &script])
            .timeout(Duration::from_secs(120))
            .run()?;
        out.lines()
            .map(|l| {
                let (name, t) = l.split_once(' ').context(l.to_string())?;
                Ok((name.to_string(), t.parse()?))
            })
            .collect()
    }

    /// What the control plane and the client's sidecar believe, for a
    /// failure message: the xDS status of every stream, the end of the
    /// control plane's log and the client sidecar's route configuration.
    fn diagnostics(&self) -> String {
        let (istiod, pilot) = &self.pilot;
        let curl = |pod: &Pod, url: &str| {
            pod.cmd("curl")
                .args(["-s", "--max-time", "5", url])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| e.to_string())
        };
        let syncz = curl(istiod, "http://127.0.0.1:15014/debug/syncz");
        let logs = pilot.logs().stderr;
        let tail: Vec<&str> = logs.lines().rev().take(60).collect();
        let routes = curl(
            self.client(),
            "http://127.0.0.1:15000/config_dump?resource=dynamic_route_configs",
        );
        let sidecar = self.pods[0].1[1].logs().stderr;
        let sidecar: Vec<&str> = sidecar.lines().rev().take(30).collect();
        format!(
            "--- control plane /debug/syncz:\n{syncz}\n--- control plane log (last lines):\n{}\n\
             --- client sidecar routes:\n{routes}\n--- client sidecar log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            sidecar.into_iter().rev().collect::<Vec<_>>().join("\n"),
        )
    }

    /// Polls until a request with `user` gets an answer (name, seconds)
    /// that `want` accepts (a new configuration needs a moment to reach the
    /// sidecars).
    fn until(
        &self,
        svc: &Svc,
        path: &str,
        user: Option<&str>,
        want: impl Fn(&str, f64) -> bool,
    ) -> Result<()> {
        self.until_all(svc, path, user, 1, want)
    }

    /// Polls until `k` requests in a row all get answers `want` accepts:
    /// for a change whose result was also possible before it.
    fn until_all(
        &self,
        svc: &Svc,
        path: &str,
        user: Option<&str>,
        k: usize,
        want: impl Fn(&str, f64) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.requests(svc, path, user, k)?;
            if got.len() == k && got.iter().all(|(n, t)| want(n, *t)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "configuration never took effect: last answer {got:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn start(sidecars: Sidecars) -> Result<Option<Bookinfo>> {
    if !netns::require_root() {
        return Ok(None);
    }
    let samples = samples()?;
    let envoy = sidecars == Sidecars::Envoy;
    let proxy_bin = if envoy {
        ferry_tests::envoy::require_bin()?
    } else {
        ferry_bin()
    };
    let mesh = Mesh::new()?;
    let istiod = mesh.pod("istiod")?;
    let mut pods = Vec::new();
    for (name, _, _, _) in WORKLOADS {
        pods.push(mesh.pod(name)?);
    }
    let dir = std::env::temp_dir().join(format!("ferry-bookinfo-{}", istiod.ns_name()));
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let ips: Vec<(String, Ipv4Addr)> = WORKLOADS
        .iter()
        .zip(&pods)
        .map(|(w, p)| (w.0.to_string(), p.ip()))
        .collect();
    std::fs::write(config.join("bookinfo.yaml"), kube_yaml(&ips))?;
    std::fs::copy(
        samples.join(BOOKINFO).join("destination-rule-all.yaml"),
        config.join("destination-rule-all.yaml"),
    )?;
    std::fs::copy(
        samples.join(BOOKINFO).join("virtual-service-all-v1.yaml"),
        config.join("virtual-service-all-v1.yaml"),
    )?;

    let pilot = istiod
        .cmd(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:15010",
            "--status-addr",
            "127.0.0.1:15014",
            "--log-level",
            "ferry_pilot=debug",
            "--config",
        ])
        .arg(&config)
        .label("pilot")
        .spawn()?;
    if let Err(e) = istiod.wait_port(15010, Duration::from_secs(30)) {
        bail!("{e}: {}", pilot.logs().stderr);
    }
    let mut started = Vec::new();
    for ((name, _, _, port), pod) in WORKLOADS.iter().zip(pods) {
        let app = pod
            .cmd("python3")
            .arg("-u")
            .arg(apps_dir().join("echo.py"))
            .args(["http", &port.to_string(), name])
            .env("ECHO_BIND", "0.0.0.0")
            .env(
                "ECHO_HOSTS",
                format!("reviews={},ratings={}", REVIEWS.vip, RATINGS.vip),
            )
            .label("app")
            .spawn()?;
        pod.wait_port(*port, Duration::from_secs(15))?;
        let out = pod.cmd(ferry_bin()).arg("iptables").output()?;
        ensure!(
            out.status.success(),
            "ferry iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = if sidecars == Sidecars::FerryOnAgentBootstrap {
            // The agent's XDS socket: a relay to ferry-pilot stands in
            // for the agent's XDS proxy to istiod.
            let xds = dir.join(format!("{name}.xds.sock"));
            let (dialer, pilot) = (istiod.dialer(), SocketAddr::from((istiod.ip(), 15010)));
            unix_relay(&xds, move || {
                dialer
                    .dial(pilot, Duration::from_secs(2))
                    .map_err(|e| anyhow::anyhow!("{e}"))
            })?;
            let file = dir.join(format!("{name}.json"));
            std::fs::write(&file, agent_bootstrap(name, pod.ip(), &xds)?)?;
            file
        } else {
            let file = dir.join(format!("{name}.yaml"));
            std::fs::write(&file, bootstrap(name, pod.ip(), istiod.ip()))?;
            file
        };
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        let cmd = pod.cmd(&proxy_bin);
        let cmd = if envoy {
            cmd.arg("-c").arg(&file).args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
        } else {
            cmd.args(["sidecar", "--concurrency", "1", "--config"])
                .arg(&file)
                .arg("--ca-addr")
                .arg(format!("{}:15010", istiod.ip()))
        };
        let sidecar = cmd.as_uid(1337).label("sidecar").spawn()?;
        started.push((pod, vec![app, sidecar]));
    }
    for (pod, procs) in &started {
        pod.wait_sidecar_ready(&procs[1], Duration::from_secs(30))?;
        if sidecars == Sidecars::FerryOnAgentBootstrap {
            // The golden's own listeners serve what the agent's pods are
            // probed and scraped on: 15021 through its `agent` cluster to
            // the status port, 15090 from the admin's stats.
            let ready = pod
                .cmd("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
                .arg("http://127.0.0.1:15021/healthz/ready")
                .run()?;
            ensure!(
                ready.trim() == "200",
                "{}: 15021/healthz/ready answered {ready}: {}",
                pod.name(),
                procs[1].logs().stderr
            );
            let scrape = pod
                .cmd("curl")
                .args(["-s", "-m", "5", "http://127.0.0.1:15090/stats/prometheus"])
                .run()?;
            ensure!(
                scrape.contains("# TYPE "),
                "{}: 15090 is not Prometheus text: {:.300}",
                pod.name(),
                scrape
            );
        }
    }
    Ok(Some(Bookinfo {
        _mesh: mesh,
        pods: started,
        pilot: (istiod, pilot),
        config,
        samples,
        dir,
    }))
}

/// The istio.io tasks' outcomes (after bookinfo's all-v1 routing and the
/// mTLS identity check); returns a description of what was observed, to
/// compare the two data planes.
fn scenarios(b: &Bookinfo) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    // virtual-service-all-v1: only v1.
    b.until(&REVIEWS, "/x", None, |n, _| n == "reviews-v1")?;
    let all = b.requests(&REVIEWS, "/x", None, 30)?;
    ensure!(
        all.iter().all(|(n, _)| n == "reviews-v1"),
        "all-v1: {all:?}"
    );
    seen.push("all-v1: 30/30 reviews-v1".to_string());

    // Auto mTLS: reviews sees productpage's identity.
    let Svc { vip, port, host } = REVIEWS;
    let body = b
        .client()
        .cmd("curl")
        .args(["-s", "-m", "5", "-H", &format!("Host: {host}:{port}")])
        .arg(format!("http://{vip}:{port}/identity"))
        .run()?;
    ensure!(
        body.contains("URI=spiffe://cluster.local/ns/default/sa/bookinfo-productpage"),
        "reviews did not see productpage's SPIFFE identity in x-forwarded-client-cert: {body}"
    );
    seen.push("mTLS: productpage's identity reaches reviews".to_string());

    seen.extend(request_timeouts(b)?);
    seen.extend(mirroring(b)?);
    seen.extend(circuit_breaking(b)?);
    Ok(seen)
}

const CIRCUIT_BREAKING: &str = "istio.io-tasks/traffic-management/circuit-breaking";

/// The istio.io circuit-breaking task: one connection and one pending
/// request allowed to httpbin; three concurrent clients overflow, some of
/// their requests get 503 and the client sidecar counts pending overflows.
fn circuit_breaking(b: &Bookinfo) -> Result<Vec<String>> {
    b.apply(&[&format!(
        "{CIRCUIT_BREAKING}/01-destination-rule-httpbin.yaml"
    )])?;
    let stat =
        "cluster.outbound|8000||httpbin.default.svc.cluster.local.upstream_rq_pending_overflow";
    // Wait until the breaker is in force: a burst overflows.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (codes, overflow) = loop {
        let codes = b.concurrent(&HTTPBIN, "/sleep/100", 3, 10)?;
        let overflow = b.client().sidecar_stat(stat)?;
        if overflow > 0 || Instant::now() > deadline {
            break (codes, overflow);
        }
    };
    let ok = codes.iter().filter(|c| **c == 200).count();
    let rejected = codes.iter().filter(|c| **c == 503).count();
    ensure!(
        overflow > 0 && ok > 0 && rejected > 0 && ok + rejected == codes.len(),
        "circuit breaking: {ok}x200, {rejected}x503 of {codes:?}, {stat} = {overflow}"
    );
    Ok(vec![
        "circuit-breaking: 3 concurrent clients -> some 200, some 503, pending overflow counted"
            .to_string(),
    ])
}

/// The istio.io request-timeouts task: reviews v2 calls ratings, which the
/// caller's sidecar delays 2 s; then a 0.5 s route timeout on reviews turns
/// the slow answer into a 504 after half a second.
fn request_timeouts(b: &Bookinfo) -> Result<Vec<String>> {
    let call = "/call/ratings/9080/x";
    b.apply(&[
        &format!("{TIMEOUTS}/01-reviews-v2.yaml"),
        &format!("{TIMEOUTS}/02-ratings-delay-2s.yaml"),
    ])?;
    b.until(&REVIEWS, call, None, |n, t| {
        n == "reviews-v2>200:ratings" && t >= 1.8
    })?;
    let slow = b.requests(&REVIEWS, call, None, 3)?;
    ensure!(
        slow.iter()
            .all(|(n, t)| n == "reviews-v2>200:ratings" && (1.8..4.0).contains(t)),
        "reviews v2 with ratings delayed 2 s: {slow:?}"
    );
    b.apply(&[
        &format!("{TIMEOUTS}/03-reviews-v2-timeout-0.5s.yaml"),
        &format!("{TIMEOUTS}/02-ratings-delay-2s.yaml"),
    ])?;
    b.until(&REVIEWS, call, None, |n, _| n == "status:504")?;
    let cut = b.requests(&REVIEWS, call, None, 3)?;
    ensure!(
        cut.iter()
            .all(|(n, t)| n == "status:504" && (0.4..1.5).contains(t)),
        "reviews timeout 0.5 s: {cut:?}"
    );
    Ok(vec![
        "request-timeouts: ratings delayed 2 s -> reviews v2 answers after ~2 s".to_string(),
        "request-timeouts: reviews timeout 0.5 s -> 504 after ~0.5 s".to_string(),
    ])
}

/// The istio.io mirroring task: httpbin v1 serves everything; with the
/// mirror rule every request is also sent, fire-and-forget, to v2 with a
/// `-shadow` host, while the client sees only v1's answers.
fn mirroring(b: &Bookinfo) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    b.apply(&[&format!("{MIRRORING}/01-default-route-v1.yaml")])?;
    b.until_all(&HTTPBIN, "/headers", None, 10, |n, _| n == "httpbin-v1")?;
    let (v2_before, _) = b.hits("httpbin-v2", "/headers")?;
    let plain = b.requests(&HTTPBIN, "/headers", None, 20)?;
    ensure!(
        plain.iter().all(|(n, _)| n == "httpbin-v1"),
        "default route v1: {plain:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (v2_after, _) = b.hits("httpbin-v2", "/headers")?;
    ensure!(
        v2_after == v2_before,
        "v2 got {} requests without a mirror rule",
        v2_after - v2_before
    );
    seen.push("mirroring: default route -> 20/20 v1, v2 untouched".to_string());

    // 02 replaces the VirtualService of 01; 01's DestinationRule stays.
    b.apply(&[
        &format!("{MIRRORING}/01-default-route-v1.yaml#DestinationRule"),
        &format!("{MIRRORING}/02-mirror-to-v2.yaml"),
    ])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = b.hits("httpbin-v2", "/headers")?.0;
        b.requests(&HTTPBIN, "/headers", None, 1)?;
        std::thread::sleep(Duration::from_millis(200));
        if b.hits("httpbin-v2", "/headers")?.0 > before {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the mirror rule never took effect\n{}",
            b.diagnostics()
        );
    }
    let (v2_before, _) = b.hits("httpbin-v2", "/headers")?;
    let mirrored = b.requests(&HTTPBIN, "/headers", None, 20)?;
    ensure!(
        mirrored.iter().all(|(n, _)| n == "httpbin-v1"),
        "with the mirror the client sees v1 only: {mirrored:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (v2_after, host) = loop {
        let (n, host) = b.hits("httpbin-v2", "/headers")?;
        if n >= v2_before + 20 || Instant::now() > deadline {
            break (n, host);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        v2_after - v2_before == 20,
        "v2 saw {} of 20 mirrored requests",
        v2_after - v2_before
    );
    seen.push(format!(
        "mirroring: 20/20 answered by v1, 20 copies reached v2 with Host {host}"
    ));
    Ok(seen)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn istio_io_traffic_tasks_through_envoy_and_ferry_alike() -> Result<()> {
    let Some(envoy) = start(Sidecars::Envoy)? else {
        return Ok(());
    };
    let with_envoy = scenarios(&envoy).context("through Envoy")?;
    drop(envoy);
    let Some(ferry) = start(Sidecars::Ferry)? else {
        return Ok(());
    };
    let with_ferry = scenarios(&ferry).context("through Ferry")?;
    assert_eq!(with_ferry, with_envoy);
    drop(ferry);
    // The same with Ferry started on istio-agent's bootstrap as the agent
    // writes it, delta ADS from ferry-pilot through the agent's socket.
    let Some(agent) = start(Sidecars::FerryOnAgentBootstrap)? else {
        return Ok(());
    };
    let on_agent = scenarios(&agent).context("through Ferry on istio-agent's bootstrap")?;
    assert_eq!(on_agent, with_envoy);
    Ok(())
}
