//! One of three endpoints dies under load: a client pod with real capture
//! rules and a sidecar (Ferry, then Envoy 1.40 on the same bootstrap) sends
//! a steady stream of idempotent requests to a service VIP backed by three
//! pods; the app of one pod is killed in the middle. With retries on
//! connect-failure/reset and outlier detection, the client must see no
//! failure at all, through either sidecar, and the dead endpoint must end
//! up ejected.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::netns::{self, Mesh, Pod, Proc, ferry_bin};
use ferry_tests::proxy::apps_dir;

const VIP: &str = "10.96.1.1";
const PORT: u16 = 8080;

fn bootstrap(backends: &[String]) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|ip| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {PORT}}}}}}}}}"
            )
        })
        .collect();
    let endpoints = endpoints.join(", ");
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  - name: {VIP}_{PORT}
    address: {{socket_address: {{address: {VIP}, port_value: {PORT}}}}}
    bind_to_port: false
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_{VIP}_{PORT}
          route_config:
            name: svc
            virtual_hosts:
            - name: svc
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: "outbound|{PORT}||svc"
                  timeout: 10s
                  retry_policy:
                    retry_on: connect-failure,reset
                    num_retries: 3
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config: {{"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}
                    host_selection_retry_max_attempts: 5
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
  - name: "outbound|{PORT}||svc"
    type: STATIC
    connect_timeout: 1s
    outlier_detection:
      consecutive_5xx: 2
      interval: 1s
      base_ejection_time: 30s
      max_ejection_percent: 100
    load_assignment:
      cluster_name: "outbound|{PORT}||svc"
      endpoints: [{{lb_endpoints: [{endpoints}]}}]
"#
    )
}

/// What wrk reported: requests completed and every kind of failure.
#[derive(Debug)]
struct Load {
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
    output: String,
}

fn parse_wrk(out: &str) -> Result<Load> {
    let requests = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n))
        .with_context(|| format!("no request count in wrk's output:\n{out}"))?
        .trim()
        .parse()?;
    let non_2xx = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map_or(Ok(0), |n| n.trim().parse())?;
    // "Socket errors: connect 0, read 1, write 0, timeout 0"
    let socket_errors = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|l| {
            l.split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Ok(Load {
        requests,
        non_2xx,
        socket_errors,
        output: out.to_string(),
    })
}

struct Bed {
    _mesh: Mesh,
    client: Pod,
    backends: Vec<(Pod, Proc)>,
    sidecar: Proc,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(proxy: &Path, envoy: bool) -> Result<Bed> {
    let mesh = Mesh::new()?;
    let client = mesh.pod("client")?;
    let mut backends = Vec::new();
    for name in ["svc-a", "svc-b", "svc-c"] {
        let pod = mesh.pod(name)?;
        let app = pod
            .cmd("python3")
            .arg("-u")
            .arg(apps_dir().join("echo.py"))
            .args(["http", &PORT.to_string(), name])
            .env("ECHO_BIND", "0.0.0.0")
            .label("app")
            .spawn()?;
        pod.wait_port(PORT, Duration::from_secs(15))?;
        backends.push((pod, app));
    }
    let out = client.cmd(ferry_bin()).arg("iptables").output()?;
    ensure!(
        out.status.success(),
        "ferry iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::env::temp_dir().join(format!("ferry-endpoint-loss-{}", client.ns_name()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let file = dir.join("bootstrap.yaml");
    let ips: Vec<String> = backends.iter().map(|(p, _)| p.ip().to_string()).collect();
    std::fs::write(&file, bootstrap(&ips))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let cmd = client.cmd(proxy);
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
    let bed = Bed {
        _mesh: mesh,
        client,
        backends,
        sidecar,
        _dir: TempDir(dir),
    };
    bed.client
        .wait_sidecar_ready(&bed.sidecar, Duration::from_secs(30))?;
    Ok(bed)
}

impl Bed {
    /// Which backends answer now, over `n` requests through the sidecar.
    fn answering(&self, n: usize) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for _ in 0..n {
            let out = self
                .client
                .cmd("curl")
                .args(["-s", "--max-time", "5"])
                .arg(format!("http://{VIP}:{PORT}/who"))
                .output()?;
            let doc: serde_json::Value =
                serde_json::from_slice(&out.stdout).with_context(|| format!("answer: {out:?}"))?;
            names.push(doc["name"].as_str().unwrap_or("?").to_string());
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Drives wrk for 4 s through the sidecar and kills `svc-c`'s app
    /// after 1.5 s.
    fn kill_under_load(&mut self) -> Result<Load> {
        let wrk = self
            .client
            .cmd("wrk")
            .args(["-t", "2", "-c", "8", "-d", "4s"])
            .arg(format!("http://{VIP}:{PORT}/"))
            .label("wrk")
            .spawn()?;
        std::thread::sleep(Duration::from_millis(1500));
        let (_, victim) = &mut self.backends[2];
        victim.signal(libc::SIGKILL)?;
        let mut wrk = wrk;
        let status = wrk.wait_timeout(Duration::from_secs(30))?;
        let out = wrk.logs();
        ensure!(status.success(), "wrk failed: {out}");
        parse_wrk(&out.stdout)
    }
}

/// Runs the scenario through one sidecar; returns what the client saw.
fn scenario(proxy: &Path, envoy: bool) -> Result<String> {
    let name = if envoy { "envoy" } else { "ferry" };
    let mut bed = start(proxy, envoy)?;
    let before = bed.answering(12)?;
    ensure!(
        before == ["svc-a", "svc-b", "svc-c"],
        "{name}: before the loss, answered by {before:?}"
    );
    let load = bed.kill_under_load()?;
    eprintln!(
        "{name}: {} requests, {} non-2xx, {} socket errors",
        load.requests, load.non_2xx, load.socket_errors
    );
    ensure!(
        load.requests > 100,
        "{name}: too little load to mean anything: {}",
        load.output
    );
    ensure!(
        load.non_2xx == 0 && load.socket_errors == 0,
        "{name}: the client saw failures: {}\nsidecar log:\n{}",
        load.output,
        bed.sidecar.logs().stderr
    );
    let after = bed.answering(12)?;
    ensure!(
        after == ["svc-a", "svc-b"],
        "{name}: after the loss, answered by {after:?}"
    );
    let cluster = format!("cluster.outbound|{PORT}||svc");
    let retried = bed
        .client
        .sidecar_stat(&format!("{cluster}.upstream_rq_retry"))?;
    let ejected = bed.client.sidecar_stat(&format!(
        "{cluster}.outlier_detection.ejections_enforced_total"
    ))?;
    ensure!(
        ejected >= 1,
        "{name}: the dead endpoint was not ejected (retries {retried})"
    );
    Ok(format!(
        "no client-visible failure; dead endpoint ejected; survivors answer: {after:?}"
    ))
}

#[test]
fn killing_one_of_three_endpoints_under_load_fails_nothing() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let ferry = scenario(&ferry_bin(), false).context("through Ferry")?;
    let envoy_bin = ferry_tests::envoy::bin()?;
    if let Some(bin) = envoy_bin {
        let envoy = scenario(&bin, true).context("through Envoy")?;
        assert_eq!(ferry, envoy);
    }
    Ok(())
}
