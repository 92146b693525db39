//! Bookinfo's traffic management, the same through Envoy sidecars and
//! through Ferry sidecars: pods as network namespaces with real capture
//! rules, echo workloads that answer with their name (`reviews-v2`), every
//! sidecar fed by `ferry-pilot serve` from the Istio sample files. Each
//! scenario of the Istio docs must give the same observable result through
//! both data planes.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, Mesh, Pod, Proc, ferry_bin, workspace_bin};
use ferry_tests::proxy::apps_dir;

const REVIEWS_VIP: &str = "10.96.0.20";
const RATINGS_VIP: &str = "10.96.0.30";

fn samples() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/istio-samples/bookinfo/networking");
    p.is_dir().then_some(p)
}

fn envoy_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_ENVOY").map(PathBuf::from)
        && path.is_file()
    {
        return Ok(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-envoy.sh");
    let out = std::process::Command::new("bash").arg(&script).output()?;
    ensure!(
        out.status.success(),
        "install-envoy.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The workloads: name, app label, version label.
const WORKLOADS: &[(&str, &str, &str)] = &[
    ("productpage", "productpage", "v1"),
    ("reviews-v1", "reviews", "v1"),
    ("reviews-v2", "reviews", "v2"),
    ("reviews-v3", "reviews", "v3"),
    ("ratings", "ratings", "v1"),
];

fn kube_yaml(ips: &[(String, Ipv4Addr)]) -> String {
    let mut out = String::new();
    for (name, vip) in [
        ("productpage", "10.96.0.10"),
        ("reviews", REVIEWS_VIP),
        ("ratings", RATINGS_VIP),
        ("details", "10.96.0.40"),
    ] {
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: http, port: 9080, targetPort: 9080}}]}}\n---\n"
        );
    }
    for (pod, ip) in ips {
        let (_, app, version) = WORKLOADS
            .iter()
            .find(|w| w.0 == pod)
            .copied()
            .unwrap_or(("", "", ""));
        out += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: default, labels: {{app: {app}, version: {version}}}}}\n\
             spec: {{serviceAccountName: bookinfo-{app}, containers: [{{name: app, image: echo, ports: [{{containerPort: 9080}}]}}]}}\n\
             status: {{podIP: {ip}}}\n---\n"
        );
    }
    out
}

fn bootstrap(pod: &str, ip: Ipv4Addr, pilot: Ipv4Addr) -> String {
    let (_, app, version) = WORKLOADS
        .iter()
        .find(|w| w.0 == pod)
        .copied()
        .unwrap_or(("", "", ""));
    format!(
        r#"node:
  id: sidecar~{ip}~{pod}.default~default.svc.cluster.local
  cluster: {app}.default
  metadata: {{NAMESPACE: default, LABELS: {{app: {app}, version: {version}}}, SERVICE_ACCOUNT: bookinfo-{app}, INSTANCE_IPS: "{ip}"}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}
dynamic_resources:
  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {pilot}, port_value: 15010}}}}}}}}]}}]
"#
    )
}

struct Bookinfo {
    _mesh: Mesh,
    pods: Vec<(Pod, Vec<Proc>)>,
    _pilot: (Pod, Proc),
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

    /// Replaces the VirtualServices with `files` (from the samples).
    fn apply(&self, files: &[&str]) -> Result<()> {
        for e in std::fs::read_dir(&self.config)? {
            let p = e?.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("virtual-service"))
            {
                std::fs::remove_file(p)?;
            }
        }
        for f in files {
            std::fs::copy(self.samples.join(f), self.config.join(f))?;
        }
        Ok(())
    }

    /// Runs `n` requests from productpage; returns the answering names (or
    /// `status:NNN`) with the time each took.
    fn requests(
        &self,
        vip: &str,
        host: &str,
        user: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, f64)>> {
        let user = user
            .map(|u| format!("'end-user': '{u}',"))
            .unwrap_or_default();
        let script = format!(
            "import http.client, json, time\n\
             c = http.client.HTTPConnection('{vip}', 9080, timeout=20)\n\
             for i in range({n}):\n\
             \x20   t = time.monotonic()\n\
             \x20   c.request('GET', '/x', headers={{'Host': '{host}:9080', {user}}})\n\
             \x20   r = c.getresponse(); body = r.read()\n\
             \x20   name = json.loads(body)['name'] if r.status == 200 else 'status:%d' % r.status\n\
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

    /// Polls until a request with `user` reaches what `want` accepts (a new
    /// configuration needs a moment to reach the sidecars).
    fn until(
        &self,
        vip: &str,
        host: &str,
        user: Option<&str>,
        want: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.requests(vip, host, user, 1)?;
            if got.first().is_some_and(|(n, _)| want(n)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("configuration never took effect: last answer {got:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn start(envoy: bool) -> Result<Option<Bookinfo>> {
    if !netns::require_root() {
        return Ok(None);
    }
    let Some(samples) = samples() else {
        eprintln!("../shared/istio-samples not present; skipped");
        return Ok(None);
    };
    let proxy_bin = if envoy { envoy_bin()? } else { ferry_bin() };
    let mesh = Mesh::new()?;
    let istiod = mesh.pod("istiod")?;
    let mut pods = Vec::new();
    for (name, _, _) in WORKLOADS {
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
        samples.join("destination-rule-all.yaml"),
        config.join("destination-rule-all.yaml"),
    )?;
    std::fs::copy(
        samples.join("virtual-service-all-v1.yaml"),
        config.join("virtual-service-all-v1.yaml"),
    )?;

    let pilot = istiod
        .cmd(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args(["serve", "--listen", "0.0.0.0:15010", "--config"])
        .arg(&config)
        .label("pilot")
        .spawn()?;
    if let Err(e) = istiod.wait_port(15010, Duration::from_secs(30)) {
        bail!("{e}: {}", pilot.logs().stderr);
    }
    let mut started = Vec::new();
    for ((name, _, _), pod) in WORKLOADS.iter().zip(pods) {
        let app = pod
            .cmd("python3")
            .arg("-u")
            .arg(apps_dir().join("echo.py"))
            .args(["http", "9080", name])
            .env("ECHO_BIND", "0.0.0.0")
            .label("app")
            .spawn()?;
        pod.wait_port(9080, Duration::from_secs(15))?;
        let out = pod.cmd(ferry_bin()).arg("iptables").output()?;
        ensure!(
            out.status.success(),
            "ferry iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, bootstrap(name, pod.ip(), istiod.ip()))?;
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
        };
        let sidecar = cmd.as_uid(1337).label("sidecar").spawn()?;
        started.push((pod, vec![app, sidecar]));
    }
    for (pod, procs) in &started {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = pod
                .cmd("curl")
                .args(["-s", "http://127.0.0.1:15000/ready"])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).trim() == "LIVE" {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "sidecar of {} not ready: {}",
                    pod.name(),
                    procs[1].logs().stderr
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(Some(Bookinfo {
        _mesh: mesh,
        pods: started,
        _pilot: (istiod, pilot),
        config,
        samples,
        dir,
    }))
}

/// The Istio docs' request-routing, traffic-shifting and fault-injection
/// outcomes; returns a description of what was observed, to compare the two
/// data planes.
fn scenarios(b: &Bookinfo) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    // virtual-service-all-v1: only v1.
    b.until(REVIEWS_VIP, "reviews", None, |n| n == "reviews-v1")?;
    let all = b.requests(REVIEWS_VIP, "reviews", None, 30)?;
    ensure!(
        all.iter().all(|(n, _)| n == "reviews-v1"),
        "all-v1: {all:?}"
    );
    seen.push("all-v1: 30/30 reviews-v1".to_string());

    // reviews-test-v2: jason reaches v2, everybody else v1.
    b.apply(&[
        "virtual-service-all-v1.yaml",
        "virtual-service-reviews-test-v2.yaml",
    ])?;
    let _ = std::fs::remove_file(b.config.join("virtual-service-all-v1.yaml"));
    b.apply(&["virtual-service-reviews-test-v2.yaml"])?;
    b.until(REVIEWS_VIP, "reviews", Some("jason"), |n| n == "reviews-v2")?;
    let jason = b.requests(REVIEWS_VIP, "reviews", Some("jason"), 20)?;
    let others = b.requests(REVIEWS_VIP, "reviews", Some("mallory"), 20)?;
    ensure!(
        jason.iter().all(|(n, _)| n == "reviews-v2"),
        "jason: {jason:?}"
    );
    ensure!(
        others.iter().all(|(n, _)| n == "reviews-v1"),
        "others: {others:?}"
    );
    seen.push("reviews-test-v2: jason 20/20 v2, others 20/20 v1".to_string());

    // reviews-50-v3: a 50/50 split of v1 and v3 within a 99.9 % binomial bound.
    b.apply(&["virtual-service-reviews-50-v3.yaml"])?;
    b.until(REVIEWS_VIP, "reviews", None, |n| n == "reviews-v3")?;
    let n = 1000;
    let split = b.requests(REVIEWS_VIP, "reviews", None, n)?;
    let v1 = split.iter().filter(|(s, _)| s == "reviews-v1").count();
    let v3 = split.iter().filter(|(s, _)| s == "reviews-v3").count();
    ensure!(
        v1 + v3 == n,
        "50-v3 reached something else: {:?}",
        split
            .iter()
            .find(|(s, _)| s != "reviews-v1" && s != "reviews-v3")
    );
    // 3.29 standard deviations of Binomial(1000, 0.5).
    let bound = (3.29 * (n as f64 * 0.25).sqrt()).ceil() as usize;
    ensure!(
        v1.abs_diff(n / 2) <= bound,
        "50-v3: v1 {v1}, v3 {v3} (bound ±{bound})"
    );
    seen.push("reviews-50-v3: within the 99.9% bound".to_string());

    // ratings-test-abort: jason gets 500, others reach ratings.
    b.apply(&["virtual-service-ratings-test-abort.yaml"])?;
    b.until(RATINGS_VIP, "ratings", Some("jason"), |n| n == "status:500")?;
    let jason = b.requests(RATINGS_VIP, "ratings", Some("jason"), 10)?;
    let others = b.requests(RATINGS_VIP, "ratings", None, 10)?;
    ensure!(
        jason.iter().all(|(n, _)| n == "status:500"),
        "abort: {jason:?}"
    );
    ensure!(
        others.iter().all(|(n, _)| n == "ratings"),
        "abort, others: {others:?}"
    );
    seen.push("ratings-test-abort: jason 10/10 500, others 10/10 ratings".to_string());

    // ratings-test-delay: jason waits 7 s, others do not.
    b.apply(&["virtual-service-ratings-test-delay.yaml"])?;
    b.until(RATINGS_VIP, "ratings", None, |n| n == "ratings")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let slow = loop {
        let r = b.requests(RATINGS_VIP, "ratings", Some("jason"), 1)?;
        if r.first().is_some_and(|(_, t)| *t >= 6.5) || Instant::now() > deadline {
            break r;
        }
    };
    ensure!(
        slow.iter()
            .all(|(n, t)| n == "ratings" && (6.5..9.0).contains(t)),
        "delay: {slow:?}"
    );
    let fast = b.requests(RATINGS_VIP, "ratings", None, 5)?;
    ensure!(
        fast.iter().all(|(n, t)| n == "ratings" && *t < 1.0),
        "delay, others: {fast:?}"
    );
    seen.push("ratings-test-delay: jason ~7 s, others fast".to_string());
    Ok(seen)
}

#[test]
fn bookinfo_through_envoy_and_ferry_alike() -> Result<()> {
    let Some(envoy) = start(true)? else {
        return Ok(());
    };
    let with_envoy = scenarios(&envoy).context("through Envoy")?;
    drop(envoy);
    let Some(ferry) = start(false)? else {
        return Ok(());
    };
    let with_ferry = scenarios(&ferry).context("through Ferry")?;
    assert_eq!(with_ferry, with_envoy);
    Ok(())
}
