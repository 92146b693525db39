//! istio-agent's file-mounted secrets when the sidecar is its own agent
//! (`--ca-addr`): istiod names certificate files mounted in the pod as the
//! SDS secrets `file-cert:CERT~KEY` and `file-root:PATH` on the agent's
//! `sds-grpc` cluster, and the agent serves them by reading the files.
//! Here a pod's Ferry sidecar takes its workload certificate from
//! ferry-pilot's CA by CSR and has a TLS listener whose certificate and
//! client-certificate roots are such names: a client with a certificate
//! from the mounted root is served with the mounted certificate, one
//! without is refused, and when the mounted files are replaced (a rotated
//! Kubernetes Secret) new handshakes get the new certificate.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::istio::{App, Workload, agent_sidecar, bootstrap, serve_pilot};
use ferry_tests::netns::{self, Mesh, Pod};
use ferry_tests::pki::Ca;
use serde_yaml_ng::Value;

const PORT: u16 = 8443;

fn objects(ip: std::net::Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: default, labels: {{app: web, version: v1}}}}\n\
         spec: {{serviceAccountName: web, containers: [{{name: web, image: web}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

/// The SDS config of a name on the agent's cluster, as istiod writes it.
fn on_agent(name: &str) -> Value {
    serde_yaml_ng::from_str(&format!(
        "name: '{name}'\nsds_config:\n  api_config_source:\n    api_type: GRPC\n    transport_api_version: V3\n    \
         grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}]\n  resource_api_version: V3\n"
    ))
    .unwrap_or(Value::Null)
}

/// The pod's bootstrap with a TLS listener on `PORT` whose certificate and
/// roots are the file-mounted secrets in `dir`, named on the bootstrap's
/// `sds-grpc` cluster (a socket nobody serves: the sidecar is the agent).
fn with_file_listener(boot: &str, dir: &Path) -> Result<String> {
    let mut doc: Value = serde_yaml_ng::from_str(boot)?;
    let d = dir.display();
    let mut listener: Value = serde_yaml_ng::from_str(&format!(
        "name: files\naddress: {{socket_address: {{address: 0.0.0.0, port_value: {PORT}}}}}\n\
         filter_chains:\n- transport_socket:\n    name: envoy.transport_sockets.tls\n    typed_config:\n      \
         '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n      \
         require_client_certificate: true\n      common_tls_context: {{}}\n  \
         filters:\n  - name: envoy.filters.network.http_connection_manager\n    typed_config:\n      \
         '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n      \
         stat_prefix: files\n      route_config:\n        virtual_hosts:\n        - name: all\n          domains: ['*']\n          \
         routes: [{{match: {{prefix: /}}, direct_response: {{status: 200, body: {{inline_string: served}}}}}}]\n      \
         http_filters:\n      - name: envoy.filters.http.router\n        typed_config:\n          \
         '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n"
    ))?;
    let common =
        &mut listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"];
    common["tls_certificate_sds_secret_configs"] = Value::Sequence(vec![on_agent(&format!(
        "file-cert:{d}/cert.pem~{d}/key.pem"
    ))]);
    common["validation_context_sds_secret_config"] = on_agent(&format!("file-root:{d}/root.pem"));
    let statics = &mut doc["static_resources"];
    if !statics["listeners"].is_sequence() {
        statics["listeners"] = Value::Sequence(vec![]);
    }
    if let Some(l) = statics["listeners"].as_sequence_mut() {
        l.push(listener);
    }
    let has_agent_cluster = statics["clusters"]
        .as_sequence()
        .is_some_and(|c| c.iter().any(|c| c["name"].as_str() == Some("sds-grpc")));
    ensure!(has_agent_cluster, "the bootstrap has no sds-grpc cluster");
    Ok(serde_yaml_ng::to_string(&doc)?)
}

/// Mounts a certificate for `web.files.test` from `ca` and `root` as the
/// client roots, as a Secret volume is written (files replaced whole).
fn mount(dir: &Path, ca: &Ca, root: &Ca) -> Result<String> {
    let leaf = ca.leaf("spiffe://files.test/web", &["web.files.test"])?;
    for (name, body) in [
        ("cert.pem", leaf.cert_pem.as_str()),
        ("key.pem", leaf.key_pem.as_str()),
        ("root.pem", &root.pem()),
    ] {
        let tmp = dir.join(format!(".{name}.new"));
        std::fs::write(&tmp, body)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(leaf.cert_pem)
}

/// A TLS call to the pod's listener from `from`: the HTTP status (0 when
/// the handshake failed) and the certificate the server presented.
fn call(
    from: &Pod,
    to: std::net::Ipv4Addr,
    dir: &Path,
    client: Option<&str>,
) -> Result<(u16, String)> {
    let mut cmd = from
        .cmd("curl")
        .args([
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n%{certs}",
        ])
        .args(["--cacert", &format!("{}/server-ca.pem", dir.display())])
        .args(["--resolve", &format!("web.files.test:{PORT}:{to}")]);
    if let Some(who) = client {
        cmd = cmd
            .args(["--cert", &format!("{}/{who}.pem", dir.display())])
            .args(["--key", &format!("{}/{who}.key", dir.display())]);
    }
    let out = cmd
        .arg(format!("https://web.files.test:{PORT}/"))
        .timeout(Duration::from_secs(10))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, certs) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    Ok((code.trim().parse().unwrap_or(0), certs.to_string()))
}

/// Whether the PEM certificate `pem` is among what curl printed of the
/// server's chain.
fn presented(certs: &str, pem: &str) -> bool {
    let body = |s: &str| -> String {
        s.lines()
            .filter(|l| !l.starts_with("-----") && !l.contains(':'))
            .collect::<String>()
    };
    body(certs).contains(&body(pem))
}

#[test]
fn file_mounted_secrets_are_read_and_followed_by_the_in_process_agent() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let istiod = mesh.pod("istiod")?;
    let web = mesh.pod("web")?;
    let client = mesh.pod("client")?;
    let dir = std::env::temp_dir().join(format!("ferry-file-secrets-{}", istiod.ns_name()));
    let cfg = dir.join("config");
    let certs = dir.join("certs");
    std::fs::create_dir_all(&cfg)?;
    std::fs::create_dir_all(&certs)?;
    for d in [&dir, &certs] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let _cleanup = Cleanup(dir.clone());
    std::fs::write(cfg.join("objects.yaml"), objects(web.ip()))?;
    let pilot = serve_pilot(&istiod, &cfg)?;

    // The server's CA (what clients trust) and the client CA the mounted
    // root names; a client certificate from each of the two.
    let server_ca = Ca::new("files server CA")?;
    let client_ca = Ca::new("files client CA")?;
    let stranger_ca = Ca::new("another CA")?;
    std::fs::write(certs.join("server-ca.pem"), server_ca.pem())?;
    for (who, ca) in [("trusted", &client_ca), ("stranger", &stranger_ca)] {
        let leaf = ca.leaf(&format!("spiffe://files.test/{who}"), &[])?;
        std::fs::write(certs.join(format!("{who}.pem")), &leaf.cert_pem)?;
        std::fs::write(certs.join(format!("{who}.key")), &leaf.key_pem)?;
    }
    for f in std::fs::read_dir(&certs)? {
        std::fs::set_permissions(f?.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    let first = mount(&certs, &server_ca, &client_ca)?;

    let w = Workload {
        name: "web",
        namespace: "default",
        app: "web",
        version: "v1",
        service_account: "web",
        injected: true,
        runs: App::None,
    };
    let boot = dir.join("web.yaml");
    std::fs::write(
        &boot,
        with_file_listener(&bootstrap(&w, web.ip(), istiod.ip()), &certs)?,
    )?;
    std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o644))?;
    let sidecar = agent_sidecar(&web, &boot, istiod.ip())
        .env("POD_NAMESPACE", "default")
        .label("sidecar")
        .spawn()?;
    let diag = || {
        format!(
            "\n--- sidecar:\n{}\n--- pilot:\n{}",
            sidecar.logs().stderr,
            pilot.logs().stderr
        )
    };
    web.wait_port(PORT, Duration::from_secs(30))
        .with_context(diag)?;

    // Served with the mounted certificate, to a client the mounted root
    // trusts (the secrets may still be on their way when the port opens).
    let deadline = Instant::now() + Duration::from_secs(15);
    let (code, seen) = loop {
        let got = call(&client, web.ip(), &certs, Some("trusted"))?;
        if got.0 == 200 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        code == 200,
        "a trusted client was answered {code}{}",
        diag()
    );
    ensure!(
        presented(&seen, &first),
        "not the mounted certificate:\n{seen}{}",
        diag()
    );
    let (code, _) = call(&client, web.ip(), &certs, Some("stranger"))?;
    ensure!(
        code == 0,
        "a client of another CA was answered {code}{}",
        diag()
    );
    let (code, _) = call(&client, web.ip(), &certs, None)?;
    ensure!(
        code == 0,
        "a client without a certificate was answered {code}{}",
        diag()
    );
    ensure!(
        sidecar
            .logs()
            .stderr
            .contains("workload certificate issued"),
        "the in-process agent got no workload certificate{}",
        diag()
    );

    // The Secret is rotated: new handshakes get the new certificate.
    let second = mount(&certs, &server_ca, &client_ca)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, seen) = call(&client, web.ip(), &certs, Some("trusted"))?;
        if code == 200 && presented(&seen, &second) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the rotated certificate was not served (last {code}):\n{seen}{}",
                diag()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
