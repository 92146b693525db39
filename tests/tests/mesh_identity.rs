//! Workload identities end to end: `ferry-pilot serve` is the mesh CA, and
//! each Ferry sidecar's agent (`--ca-addr`) gets its pod's SPIFFE
//! certificate from it by CSR, as istio-agent does with istiod. Pods are
//! network namespaces with real capture rules; the namespace is labelled
//! for injection and a PeerAuthentication makes mTLS STRICT. Proven here:
//! - the client's call reaches the server over Istio mTLS, and the server
//!   app sees the client's SPIFFE identity in `x-forwarded-client-cert`;
//! - a pod without a sidecar cannot reach the server any more (STRICT);
//! - certificates are renewed at half their lifetime (a 4 s lifetime here)
//!   while requests keep succeeding across the rotations;
//! - the CA knows callers by their pod's address: a CSR from an address no
//!   pod has is refused.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, Mesh, Pod, Proc, ferry_bin, workspace_bin};
use ferry_tests::proxy::apps_dir;

const SERVER_VIP: &str = "10.96.1.10";

fn config(server: &Pod, client: &Pod, legacy: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio-injection: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: default}}\n\
         spec: {{clusterIP: {SERVER_VIP}, selector: {{app: server}}, ports: [{{name: http, port: 8080, targetPort: 8080}}]}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: default, labels: {{app: server}}}}\n\
         spec: {{serviceAccountName: server, containers: [{{name: app, image: echo}}]}}\nstatus: {{podIP: {}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: default, labels: {{app: client}}}}\n\
         spec: {{serviceAccountName: sleep, containers: [{{name: app, image: curl}}]}}\nstatus: {{podIP: {}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: legacy, namespace: default, labels: {{app: legacy}}, annotations: {{sidecar.istio.io/inject: \"false\"}}}}\n\
         spec: {{containers: [{{name: app, image: curl}}]}}\nstatus: {{podIP: {}}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: default}}\n\
         spec: {{mtls: {{mode: STRICT}}}}\n",
        server.ip(),
        client.ip(),
        legacy.ip(),
    )
}

fn bootstrap(pod: &Pod, app: &str, sa: &str, pilot: std::net::Ipv4Addr) -> String {
    let ip = pod.ip();
    let name = pod.name();
    format!(
        r#"node:
  id: sidecar~{ip}~{name}.default~default.svc.cluster.local
  cluster: {app}.default
  metadata: {{NAMESPACE: default, LABELS: {{app: {app}, security.istio.io/tlsMode: istio}}, SERVICE_ACCOUNT: {sa}, INSTANCE_IPS: "{ip}"}}
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
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {pilot}, port_value: 15010}}}}}}}}]}}]
"#
    )
}

/// One request from `pod` to the server Service: the HTTP status (0 when
/// the connection failed) and the body.
fn call(pod: &Pod, url: &str) -> Result<(u16, String)> {
    let out = pod
        .cmd("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", url])
        .timeout(Duration::from_secs(10))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

fn issued(pilot: &Proc, identity: &str) -> usize {
    pilot
        .logs()
        .stderr
        .lines()
        .filter(|l| l.contains("certificate issued") && l.contains(identity))
        .count()
}

/// The proxy a pod runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proxy {
    /// `ferry sidecar --ca-addr`: its own key, a CSR to the CA.
    Ferry,
    /// Envoy: its certificate over SDS from ferry-pilot (`sds-grpc`).
    Envoy,
}

struct Run {
    _mesh: Mesh,
    pilot: Proc,
    server: Pod,
    client: Pod,
    legacy: Pod,
    istiod: Pod,
    sidecars: Vec<Proc>,
    _app: Proc,
    dir: std::path::PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

impl Run {
    fn start(client_proxy: Proxy, server_proxy: Proxy, cert_ttl: &str) -> Result<Option<Run>> {
        if !netns::require_root() {
            return Ok(None);
        }
        let envoy = ferry_tests::envoy::require_bin()?;
        let mesh = Mesh::new()?;
        let istiod = mesh.pod("istiod")?;
        let server = mesh.pod("server")?;
        let client = mesh.pod("client")?;
        let legacy = mesh.pod("legacy")?;
        let dir = std::env::temp_dir().join(format!("ferry-identity-{}", istiod.ns_name()));
        let cfg = dir.join("config");
        std::fs::create_dir_all(&cfg)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(cfg.join("mesh.yaml"), config(&server, &client, &legacy))?;
        let pilot = istiod
            .cmd(workspace_bin("ferry-pilot", "ferry-pilot"))
            .args(["serve", "--listen", "0.0.0.0:15010", "--ca-root-out"])
            .arg(dir.join("root.pem"))
            .arg("--config")
            .arg(&cfg)
            .label("pilot")
            .spawn()?;
        if let Err(e) = istiod.wait_port(15010, Duration::from_secs(30)) {
            bail!("{e}: {}", pilot.logs().stderr);
        }
        let app = server
            .cmd("python3")
            .arg("-u")
            .arg(apps_dir().join("echo.py"))
            .args(["http", "8080", "server"])
            .env("ECHO_BIND", "0.0.0.0")
            .label("app")
            .spawn()?;
        server.wait_port(8080, Duration::from_secs(15))?;
        let mut sidecars = Vec::new();
        for (pod, app, sa, proxy) in [
            (&server, "server", "server", server_proxy),
            (&client, "client", "sleep", client_proxy),
        ] {
            let out = pod.cmd(ferry_bin()).arg("iptables").output()?;
            ensure!(
                out.status.success(),
                "ferry iptables: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let file = dir.join(format!("{app}.yaml"));
            std::fs::write(&file, bootstrap(pod, app, sa, istiod.ip()))?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
            let cmd = match proxy {
                Proxy::Ferry => pod
                    .cmd(ferry_bin())
                    .args(["sidecar", "--concurrency", "1", "--cert-ttl", cert_ttl])
                    .arg("--ca-addr")
                    .arg(format!("{}:15010", istiod.ip()))
                    .arg("--config")
                    .arg(&file),
                Proxy::Envoy => pod.cmd(&envoy).arg("-c").arg(&file).args([
                    "--concurrency",
                    "1",
                    "--disable-hot-restart",
                    "--log-level",
                    "warn",
                ]),
            };
            sidecars.push(cmd.as_uid(1337).label("sidecar").spawn()?);
        }
        for (pod, sidecar) in [&server, &client].into_iter().zip(&sidecars) {
            pod.wait_sidecar_ready(sidecar, Duration::from_secs(30))?;
        }
        Ok(Some(Run {
            _mesh: mesh,
            pilot,
            server,
            client,
            legacy,
            istiod,
            sidecars,
            _app: app,
            dir,
        }))
    }

    fn diagnostics(&self) -> String {
        let inbound = self
            .server
            .cmd("curl")
            .args([
                "-s",
                "http://127.0.0.1:15000/config_dump?resource=dynamic_listeners",
            ])
            .run()
            .unwrap_or_default();
        format!(
            "--- pilot:\n{}\n--- server sidecar:\n{}\n--- client sidecar:\n{}\n--- server listeners:\n{inbound}",
            self.pilot.logs().stderr,
            self.sidecars[0].logs().stderr,
            self.sidecars[1].logs().stderr
        )
    }

    fn url(&self) -> String {
        format!("http://{SERVER_VIP}:8080/hello")
    }

    /// Client → server over mTLS: the `x-forwarded-client-cert` the app saw.
    fn xfcc(&self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let body = loop {
            let (code, body) = call(&self.client, &self.url())?;
            if code == 200 {
                break body;
            }
            if Instant::now() > deadline {
                bail!(
                    "client never reached the server (last {code}: {body})\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let echo: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("echo answer {body:?}"))?;
        echo["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| {
                h[0].as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case("x-forwarded-client-cert"))
            })
            .and_then(|h| h[1].as_str())
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "no x-forwarded-client-cert reached the app: {body}\n{}",
                    self.diagnostics()
                )
            })
    }

    /// The checks every pairing must pass: identities in XFCC, STRICT.
    fn check_mtls(&self) -> Result<()> {
        let xfcc = self.xfcc()?;
        ensure!(
            xfcc.contains(&format!("By={SERVER_ID}")) && xfcc.contains(&format!("URI={CLIENT_ID}")),
            "XFCC {xfcc:?} should name the server as By and the client as URI"
        );
        // STRICT: a pod without a sidecar is refused.
        let (code, body) = call(
            &self.legacy,
            &format!("http://{}:8080/hello", self.server.ip()),
        )?;
        ensure!(
            code != 200,
            "plaintext reached a STRICT workload: {code} {body}"
        );
        Ok(())
    }
}

#[test]
fn ferry_sidecars_get_certificates_by_csr_and_renew_them() -> Result<()> {
    let Some(run) = Run::start(Proxy::Ferry, Proxy::Ferry, "4s")? else {
        return Ok(());
    };
    run.check_mtls()?;

    // Rotation: renewed at half the lifetime left, about every 2 s; calls
    // keep working throughout.
    let first = (issued(&run.pilot, CLIENT_ID), issued(&run.pilot, SERVER_ID));
    let until = Instant::now() + Duration::from_secs(5);
    let mut calls = 0;
    while Instant::now() < until {
        let (code, body) = call(&run.client, &run.url())?;
        ensure!(
            code == 200,
            "call {calls} during rotation failed: {code} {body}\n{}",
            run.diagnostics()
        );
        calls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = (issued(&run.pilot, CLIENT_ID), issued(&run.pilot, SERVER_ID));
    ensure!(
        after.0 >= first.0 + 2 && after.1 >= first.1 + 2,
        "certificates were not renewed at half their lifetime: {first:?} -> {after:?}\n{}",
        run.diagnostics()
    );
    ensure!(calls >= 10, "only {calls} calls in 5 s");

    // The CA knows callers by their pod's address: one no pod in the
    // configuration has gets nothing, whatever identity its node claims.
    let rogue = run._mesh.pod("rogue")?;
    let out = rogue
        .cmd(ferry_bin())
        .args(["sidecar", "--concurrency", "1", "--ready-addr", "off"])
        .arg("--ca-addr")
        .arg(format!("{}:15010", run.istiod.ip()))
        .arg("--config")
        .arg(run.dir.join("client.yaml"))
        .as_uid(1337)
        .label("rogue")
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = out.logs().stderr;
        if log.contains(&format!("no workload is known at {}", rogue.ip())) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the CA did not refuse an unknown caller\n--- rogue:\n{log}\n--- pilot:\n{}",
                run.pilot.logs().stderr
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        !out.logs().stderr.contains("workload certificate issued"),
        "an unknown caller got a certificate"
    );
    Ok(())
}

/// Envoy sidecars get theirs over SDS from ferry-pilot, and every pairing
/// of Envoy and Ferry speaks Istio mTLS with the other.
#[test]
fn envoy_and_ferry_sidecars_interoperate_over_istio_mtls() -> Result<()> {
    for (client, server) in [
        (Proxy::Envoy, Proxy::Envoy),
        (Proxy::Envoy, Proxy::Ferry),
        (Proxy::Ferry, Proxy::Envoy),
    ] {
        let Some(run) = Run::start(client, server, "24h")? else {
            return Ok(());
        };
        run.check_mtls()
            .with_context(|| format!("client {client:?}, server {server:?}"))?;
    }
    Ok(())
}
