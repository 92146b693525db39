//! `ferry-pilot inject` end to end: bookinfo's Deployments injected as
//! `istioctl kube-inject` would, the result accepted by `ferry-pilot
//! analyze`, its bootstrap ConfigMap accepted by Envoy's `--mode validate`,
//! and one injected pod brought up the way the kubelet would run it: the
//! init container's command programs the pod's netns, the sidecar
//! container's command runs with the environment its spec declares (the
//! downward API's fields filled in), gets its SPIFFE certificate from
//! ferry-pilot's CA and serves the pod's inbound port over Istio mTLS only.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, Mesh, ferry_bin, workspace_bin};
use serde_yaml_ng::Value;

/// The project's own bookinfo (`samples/bookinfo`, as Istio's sample: six Deployments).
fn bookinfo() -> Result<String> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../samples/bookinfo/platform/kube/bookinfo.yaml");
    std::fs::read_to_string(&p).with_context(|| p.display().to_string())
}

fn inject(text: &str, discovery: &str) -> Result<String> {
    let mut child = Command::new(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args(["inject", "-f", "-", "--discovery-address", discovery])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn docs(text: &str) -> Result<Vec<Value>> {
    text.split("\n---\n")
        .map(|d| Ok(serde_yaml_ng::from_str::<Value>(d)?))
        .collect()
}

#[test]
fn injected_bookinfo_runs_its_sidecar_as_declared() -> Result<()> {
    let text = bookinfo()?;
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let istiod = mesh.pod("istiod")?;
    let reviews = mesh.pod("reviews")?;
    let discovery = format!("{}:15010", istiod.ip());
    let injected = inject(&text, &discovery)?;
    let all = docs(&injected)?;
    let deployments: Vec<&Value> = all
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Deployment"))
        .collect();
    ensure!(deployments.len() == 6, "{injected}");
    let bootstrap = all
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .and_then(|d| d["data"]["bootstrap.yaml"].as_str())
        .context("the bootstrap ConfigMap")?;

    let dir = std::env::temp_dir().join(format!("ferry-inject-{}", istiod.ns_name()));
    let cfg = dir.join("config");
    std::fs::create_dir_all(&cfg)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let boot = dir.join("bootstrap.yaml");
    std::fs::write(&boot, bootstrap)?;
    std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o644))?;

    // Real Envoy accepts the bootstrap as it is, given the node identity
    // on its command line (Ferry builds it from the environment).
    let envoy = ferry_tests::envoy::require_bin()?;
    let out = Command::new(&envoy)
        .args([
            "--mode",
            "validate",
            "--service-node",
            "sidecar~10.0.0.1~p.default~default.svc.cluster.local",
        ])
        .args(["--service-cluster", "reviews.default", "-c"])
        .arg(&boot)
        .output()?;
    ensure!(
        out.status.success(),
        "envoy --mode validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The control plane takes the injected workloads, plus the running
    // reviews-v1 pod (its template's labels, its address).
    let deployment = deployments
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("reviews-v1"))
        .context("reviews-v1")?;
    let template = &deployment["spec"]["template"];
    let labels = serde_json::to_string(&template["metadata"]["labels"])?;
    let sa = template["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    let pod = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio-injection: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-v1-0, namespace: default, labels: {labels}}}\n\
         spec: {{serviceAccountName: {sa}, containers: [{{name: reviews, image: reviews, ports: [{{containerPort: 9080}}]}}]}}\n\
         status: {{podIP: {}}}\n",
        reviews.ip()
    );
    std::fs::write(cfg.join("bookinfo-injected.yaml"), &injected)?;
    std::fs::write(cfg.join("pod.yaml"), pod)?;
    let analyze = Command::new(workspace_bin("ferry-pilot", "ferry-pilot"))
        .arg("analyze")
        .arg(&cfg)
        .output()?;
    ensure!(
        analyze.status.success(),
        "analyze of the injected bookinfo: {}",
        String::from_utf8_lossy(&analyze.stdout)
    );
    let pilot = istiod
        .cmd(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args(["serve", "--listen", "0.0.0.0:15010", "--config"])
        .arg(&cfg)
        .label("pilot")
        .spawn()?;
    istiod.wait_port(15010, Duration::from_secs(30))?;

    let app = reviews
        .cmd("python3")
        .arg("-u")
        .arg(ferry_tests::proxy::apps_dir().join("echo.py"))
        .args(["http", "9080", "reviews-v1"])
        .env("ECHO_BIND", "0.0.0.0")
        .label("app")
        .spawn()?;
    reviews.wait_port(9080, Duration::from_secs(15))?;

    // The init container, as declared.
    let init = &template["spec"]["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_sequence()
        .context("init args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let out = reviews.cmd(ferry_bin()).args(&args).output()?;
    ensure!(
        out.status.success(),
        "init container {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The sidecar container, as declared: its args, its environment with
    // the downward API's values, its uid, the ConfigMap at its mount path.
    let sidecar = template["spec"]["containers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"].as_str() == Some("istio-proxy")))
        .context("istio-proxy")?;
    let mount = sidecar["volumeMounts"][0]["mountPath"]
        .as_str()
        .context("mount")?;
    let args: Vec<String> = sidecar["args"]
        .as_sequence()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .map(|a| a.replace(mount, dir.to_str().unwrap_or_default()))
        .collect();
    let uid = sidecar["securityContext"]["runAsUser"]
        .as_u64()
        .context("runAsUser")? as u32;
    let mut cmd = reviews.cmd(ferry_bin()).args(&args);
    for e in sidecar["env"].as_sequence().context("env")? {
        let name = e["name"].as_str().context("env name")?;
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => "reviews-v1-0".to_string(),
            Some("metadata.namespace") => "default".to_string(),
            Some("status.podIP") => reviews.ip().to_string(),
            Some("spec.serviceAccountName") => sa.to_string(),
            Some(other) => bail!("unexpected fieldRef {other}"),
            None => e["value"].as_str().unwrap_or_default().to_string(),
        };
        cmd = cmd.env(name, value);
    }
    let proxy = cmd.as_uid(uid).label("istio-proxy").spawn()?;
    reviews.wait_sidecar_ready(&proxy, Duration::from_secs(30))?;

    // Its certificate came from the CA, for the pod's service account.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !proxy
        .logs()
        .stderr
        .contains("workload certificate issued agent.identity=spiffe://cluster.local/ns/default/sa/bookinfo-reviews")
    {
        if Instant::now() > deadline {
            bail!(
                "no certificate\n--- sidecar:\n{}\n--- pilot:\n{}",
                proxy.logs().stderr,
                pilot.logs().stderr
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The inbound port has Istio mTLS chains (PERMISSIVE: plaintext too),
    // so the pod is reachable by its address from a pod without a sidecar.
    let dump = reviews
        .cmd("curl")
        .args([
            "-s",
            "http://127.0.0.1:15000/config_dump?resource=dynamic_listeners",
        ])
        .run()?;
    ensure!(
        dump.contains("istio-peer-exchange") && dump.contains("0.0.0.0_9080"),
        "no mTLS chains for 9080 in the inbound listener:\n{dump}"
    );
    let client = mesh.pod("client")?;
    let out = client
        .cmd("curl")
        .args(["-s", "-m", "5"])
        .arg(format!("http://{}:9080/hello", reviews.ip()))
        .run()?;
    ensure!(
        out.contains("reviews-v1"),
        "through the injected sidecar: {out}"
    );
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
