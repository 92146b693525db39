//! The Sidecar resource for a workload without capture, in the netns bed:
//! a pod with no iptables rules (a VM, or a pod where capture is not
//! allowed) runs a Ferry sidecar with `INTERCEPTION_MODE: NONE`, fed by
//! ferry-pilot with a Sidecar whose ingress listener serves the port 9080
//! (its `defaultEndpoint` the app on 127.0.0.1:8080, which nothing outside
//! the pod can reach otherwise) and whose egress listener puts the reviews
//! service on the pod's localhost:9080. A client pod reaches the app only
//! through the sidecar's real listener; the app reaches reviews by
//! connecting to localhost.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Result, ensure};
use ferry_tests::istio::{App, Workload, bootstrap, curl};
use ferry_tests::netns::{self, Mesh, workspace_bin};
use ferry_tests::proxy::apps_dir;

#[test]
fn a_workload_without_capture_gets_real_listening_ports() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let istiod = mesh.pod("istiod")?;
    let vm = mesh.pod("vm")?;
    let reviews = mesh.pod("reviews")?;
    let client = mesh.pod("client")?;
    let dir = std::env::temp_dir().join(format!("ferry-sidecar-res-{}", istiod.ns_name()));
    let cfg = dir.join("config");
    std::fs::create_dir_all(&cfg)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    std::fs::write(
        cfg.join("objects.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio-injection: enabled}}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: vm, namespace: default, labels: {{app: vm, version: v1}}}}\n\
             spec: {{serviceAccountName: vm, containers: [{{name: vm, image: vm}}]}}\nstatus: {{podIP: {vm_ip}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews, namespace: default, labels: {{app: reviews}}, annotations: {{sidecar.istio.io/inject: \"false\"}}}}\n\
             spec: {{containers: [{{name: reviews, image: reviews, ports: [{{containerPort: 9080}}]}}]}}\nstatus: {{podIP: {reviews_ip}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\n\
             spec: {{clusterIP: 10.96.0.7, selector: {{app: reviews}}, ports: [{{name: http, port: 9080}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: vm, namespace: default}}\n\
             spec:\n  workloadSelector: {{labels: {{app: vm}}}}\n  ingress:\n\
             \x20 - port: {{number: 9080, protocol: HTTP, name: http}}\n    defaultEndpoint: 127.0.0.1:8080\n\
             \x20 egress:\n  - port: {{number: 9080, protocol: HTTP, name: http}}\n    hosts: [./reviews.default.svc.cluster.local]\n",
            vm_ip = vm.ip(),
            reviews_ip = reviews.ip(),
        ),
    )?;
    let pilot = istiod
        .cmd(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args(["serve", "--listen", "0.0.0.0:15010", "--config"])
        .arg(&cfg)
        .label("pilot")
        .spawn()?;
    istiod.wait_port(15010, Duration::from_secs(30))?;
    let echo = |pod: &netns::Pod, port: &str, name: &str, bind: &str| {
        pod.cmd("python3")
            .arg("-u")
            .arg(apps_dir().join("echo.py"))
            .args(["http", port, name])
            .env("ECHO_BIND", bind)
            .label(name)
            .spawn()
    };
    // The app listens on localhost only.
    let _app = echo(&vm, "8080", "vm-app", "127.0.0.1")?;
    let _reviews = echo(&reviews, "9080", "reviews-v1", "0.0.0.0")?;
    vm.wait_port(8080, Duration::from_secs(15))?;
    reviews.wait_port(9080, Duration::from_secs(15))?;

    // No `ferry iptables`: nothing is captured in this pod.
    let w = Workload {
        name: "vm",
        namespace: "default",
        app: "vm",
        version: "v1",
        service_account: "vm",
        injected: true,
        runs: App::None,
    };
    let boot = dir.join("vm.yaml");
    std::fs::write(&boot, bootstrap(&w, vm.ip(), istiod.ip()))?;
    std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o644))?;
    let sidecar = ferry_tests::istio::agent_sidecar(&vm, &boot, istiod.ip())
        .env("ISTIO_META_INTERCEPTION_MODE", "NONE")
        .label("sidecar")
        .spawn()?;
    vm.wait_sidecar_ready(&sidecar, Duration::from_secs(30))?;
    let diag = || {
        format!(
            "\n--- sidecar:\n{}\n--- pilot:\n{}",
            sidecar.logs().stderr,
            pilot.logs().stderr
        )
    };
    // The sidecar bound the Sidecar's ports, and no capture listener.
    let logs = sidecar.logs().stderr;
    for bound in [
        format!("listener.name={}_9080", vm.ip()),
        "listener.name=127.0.0.1_9080".into(),
    ] {
        ensure!(logs.contains(&bound), "no {bound}:{}", diag());
    }
    ensure!(
        !logs.contains("listener.name=virtualInbound")
            && !logs.contains("listener.name=virtualOutbound"),
        "virtual listeners without capture:{}",
        diag()
    );

    // The app is not reachable from outside the pod by itself…
    let (direct, _) = curl(&client, &format!("http://{}:8080/", vm.ip()), &[])?;
    ensure!(
        direct == 0,
        "the app's localhost port answered from outside: {direct}"
    );
    // …but through the sidecar's ingress listener on the pod's IP.
    let (code, body) = curl(&client, &format!("http://{}:9080/hello", vm.ip()), &[])?;
    ensure!(
        code == 200 && body.contains("\"vm-app\""),
        "ingress listener: {code} {body}{}",
        diag()
    );
    // The egress listener: reviews on the pod's localhost, routed by Host.
    let (code, body) = curl(
        &vm,
        "http://127.0.0.1:9080/ratings",
        &["-H", "Host: reviews.default.svc.cluster.local:9080"],
    )?;
    ensure!(
        code == 200 && body.contains("\"reviews-v1\""),
        "egress listener: {code} {body}{}",
        diag()
    );
    // Requests the app sends straight to a pod IP are not intercepted.
    let (code, body) = curl(&vm, &format!("http://{}:9080/", reviews.ip()), &[])?;
    ensure!(
        code == 200 && body.contains("\"reviews-v1\""),
        "{code} {body}"
    );
    Ok(())
}
