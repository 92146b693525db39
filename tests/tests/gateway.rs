//! The bookinfo ingress gateway end to end, the same through Envoy and
//! through Ferry: `ferry-pilot serve` reads Istio's
//! `bookinfo-gateway.yaml` (a Gateway on port 8080 selecting
//! `istio: ingressgateway`, a VirtualService routing `/productpage`,
//! `/static`, `/login`, `/logout` and `/api/v1/products` to productpage)
//! beside the bookinfo services; the gateway pod (a `router~…` node with
//! the ingress labels) runs Envoy or `ferry gateway`; a client pod asks
//! the gateway's address for `/productpage` and must reach the productpage
//! workload (an echo server answering with its name), while a path no rule
//! routes gets the gateway's 404. A TLS PASSTHROUGH server then routes by
//! SNI to a backend that terminates TLS itself (its own certificate
//! reaches the client); an SNI no `tls` route names gets no answer. Last,
//! a RequestAuthentication and a DENY policy on the gateway: `/productpage`
//! needs a valid token of Istio's demo issuer, an invalid one gets 401.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, Mesh, Pod, Proc, ferry_bin, workspace_bin};
use ferry_tests::proxy::apps_dir;

const GATEWAY_PORT: u16 = 8080;

/// The project's own bookinfo networking files (`samples/bookinfo/networking`).
fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/bookinfo/networking")
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

/// The bookinfo services with the productpage and details workloads.
fn kube_yaml(productpage: Ipv4Addr, details: Ipv4Addr) -> String {
    let mut out = String::new();
    for (name, vip) in [
        ("productpage", "10.96.0.10"),
        ("reviews", "10.96.0.20"),
        ("ratings", "10.96.0.30"),
        ("details", "10.96.0.40"),
    ] {
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: http, port: 9080, targetPort: 9080}}]}}\n---\n"
        );
    }
    for (pod, ip) in [("productpage", productpage), ("details", details)] {
        out += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}-v1, namespace: default, labels: {{app: {pod}, version: v1}}}}\n\
             spec: {{serviceAccountName: bookinfo-{pod}, containers: [{{name: app, image: echo, ports: [{{containerPort: 9080}}]}}]}}\n\
             status: {{podIP: {ip}}}\n---\n"
        );
    }
    out
}

/// istio-agent's bootstrap for the ingress gateway pod, reduced to ADS.
fn bootstrap(ip: Ipv4Addr, pilot: Ipv4Addr) -> String {
    format!(
        r#"node:
  id: router~{ip}~istio-ingressgateway-7c9d.istio-system~istio-system.svc.cluster.local
  cluster: istio-ingressgateway.istio-system
  metadata: {{NAMESPACE: istio-system, LABELS: {{app: istio-ingressgateway, istio: ingressgateway}}, SERVICE_ACCOUNT: istio-ingressgateway-service-account, INSTANCE_IPS: "{ip}"}}
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

struct Setup {
    _mesh: Mesh,
    client: Pod,
    gateway: (Pod, Proc),
    _apps: Vec<(Pod, Proc)>,
    _pilot: (Pod, Proc),
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    /// `GET path` through the gateway from the client pod: the status and
    /// the answering workload's name (from the echo server's JSON).
    fn get(&self, path: &str) -> Result<(u16, String)> {
        self.get_with(path, &[])
    }

    /// [`Setup::get`] with extra curl arguments (headers).
    fn get_with(&self, path: &str, extra: &[&str]) -> Result<(u16, String)> {
        let url = format!("http://{}:{GATEWAY_PORT}{path}", self.gateway.0.ip());
        let out = self
            .client
            .cmd("curl")
            .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').context(text.clone())?;
        let status: u16 = code.trim().parse().with_context(|| format!("{text:?}"))?;
        let name = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
            .unwrap_or_default();
        Ok((status, name))
    }

    /// Polls `/productpage` until the gateway has its configuration.
    fn until_routed(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.get("/productpage");
            if matches!(&got, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway never routed /productpage: last answer {got:?}\n{}",
                    self.gateway.1.logs().stderr
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn start(envoy: bool) -> Result<Option<Setup>> {
    if !netns::require_root() {
        return Ok(None);
    }
    let samples = samples();
    let proxy_bin = if envoy { envoy_bin()? } else { ferry_bin() };
    let mesh = Mesh::new()?;
    let istiod = mesh.pod("istiod")?;
    let gateway = mesh.pod("ingress")?;
    let productpage = mesh.pod("productpage")?;
    let details = mesh.pod("details")?;
    let client = mesh.pod("client")?;
    let dir = std::env::temp_dir().join(format!("ferry-gateway-{}", istiod.ns_name()));
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(
        config.join("bookinfo.yaml"),
        kube_yaml(productpage.ip(), details.ip()),
    )?;
    std::fs::copy(
        samples.join("bookinfo-gateway.yaml"),
        config.join("bookinfo-gateway.yaml"),
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
    let mut apps = Vec::new();
    for (pod, name) in [(productpage, "productpage"), (details, "details")] {
        let app = pod
            .cmd("python3")
            .arg("-u")
            .arg(apps_dir().join("echo.py"))
            .args(["http", "9080", name])
            .env("ECHO_BIND", "0.0.0.0")
            .label("app")
            .spawn()?;
        pod.wait_port(9080, Duration::from_secs(15))?;
        apps.push((pod, app));
    }
    let file = dir.join("ingress.yaml");
    std::fs::write(&file, bootstrap(gateway.ip(), istiod.ip()))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let cmd = gateway.cmd(&proxy_bin);
    let cmd = if envoy {
        cmd.arg("-c").arg(&file).args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ])
    } else {
        cmd.args(["gateway", "--concurrency", "1", "--config"])
            .arg(&file)
    };
    let proc = cmd.label("gateway").spawn()?;
    if let Err(e) = gateway.wait_port(GATEWAY_PORT, Duration::from_secs(30)) {
        bail!(
            "gateway never listened on {GATEWAY_PORT}: {e}\npilot: {}\ngateway: {}",
            pilot.logs().stderr,
            proc.logs().stderr
        );
    }
    Ok(Some(Setup {
        _mesh: mesh,
        client,
        gateway: (gateway, proc),
        _apps: apps,
        _pilot: (istiod, pilot),
        dir,
    }))
}

/// What a client observes through the gateway.
fn observe(s: &Setup) -> Result<Vec<String>> {
    s.until_routed()?;
    let mut seen = Vec::new();
    for path in [
        "/productpage",
        "/static/style.css",
        "/api/v1/products/1",
        "/login",
        "/details",
        "/",
    ] {
        let (status, name) = s.get(path)?;
        seen.push(format!("{path} -> {status} {name}"));
    }
    ensure!(
        seen[0] == "/productpage -> 200 productpage",
        "GET /productpage through the gateway: {seen:?}"
    );
    ensure!(
        seen[1..4].iter().all(|l| l.ends_with("200 productpage")),
        "routed paths: {seen:?}"
    );
    // Not routed by the VirtualService: the gateway's 404, never details.
    ensure!(
        seen[4..].iter().all(|l| l.ends_with("404 ")),
        "unrouted paths: {seen:?}"
    );
    Ok(seen)
}

/// A TLS server answering `GET` with its name, certificate for `host`.
const TLS_BACKEND: &str = r#"
import http.server, json, ssl, sys
port, name, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"name": name, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// A Gateway passing TLS through by SNI to `secure` (which terminates it
/// itself) and the VirtualService `tls` route that says where.
const PASSTHROUGH_YAML: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tls-gateway, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8443, name: tls, protocol: TLS}
    hosts: [secure.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: default}
spec:
  hosts: [secure.example.com]
  gateways: [tls-gateway]
  tls:
  - match:
    - sniHosts: [secure.example.com]
    route:
    - destination: {host: secure, port: {number: 443}}
";

/// TLS PASSTHROUGH: the gateway picks the route by SNI without
/// terminating; the backend's own certificate reaches the client.
fn passthrough(envoy: bool) -> Result<Option<Vec<String>>> {
    let Some(s) = start(envoy)? else {
        return Ok(None);
    };
    let secure = s._mesh.pod("secure")?;
    let certs = s.dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    let (cert, key) = (certs.join("tls.crt"), certs.join("tls.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=secure.example.com"])
        .args(["-addext", "subjectAltName=DNS:secure.example.com"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [&cert, &key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644))?;
    }
    let backend = secure
        .cmd("python3")
        .args(["-u", "-c", TLS_BACKEND, "8443", "secure"])
        .arg(&cert)
        .arg(&key)
        .label("tls-backend")
        .spawn()?;
    secure.wait_port(8443, Duration::from_secs(15))?;
    let config = s.dir.join("config");
    std::fs::write(
        config.join("secure.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: secure, namespace: default}}\n\
             spec: {{clusterIP: 10.96.0.50, selector: {{app: secure}}, ports: [{{name: tls, port: 443, targetPort: 8443}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: secure-1, namespace: default, labels: {{app: secure}}}}\n\
             spec: {{containers: [{{name: app, image: tls}}]}}\nstatus: {{podIP: {}}}\n---\n{PASSTHROUGH_YAML}",
            secure.ip()
        ),
    )?;
    let gw = s.gateway.0.ip();
    // `verify`: check the backend's own certificate (it is not terminated
    // on the way); otherwise accept any, so that only routing can fail.
    let curl = |sni: &str, verify: bool| -> Result<String> {
        let cmd = s.client.cmd("curl").args(["-s", "-m", "5"]);
        let cmd = if verify {
            cmd.arg("--cacert").arg(&cert)
        } else {
            cmd.arg("-k")
        };
        let out = cmd
            .args([
                "--resolve",
                &format!("{sni}:8443:{gw}"),
                &format!("https://{sni}:8443/hello"),
            ])
            .output()?;
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) => format!(
                "{sni} -> {} {}",
                v["name"].as_str().unwrap_or(""),
                v["path"].as_str().unwrap_or("")
            ),
            Err(_) if !out.status.success() => format!("{sni} -> no answer"),
            Err(_) => format!("{sni} -> unexpected answer {body:?}"),
        })
    };
    // The new configuration needs a moment to reach the gateway.
    let deadline = Instant::now() + Duration::from_secs(30);
    let routed = loop {
        let got = curl("secure.example.com", true)?;
        if got.ends_with("secure /hello") || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        routed == "secure.example.com -> secure /hello",
        "TLS passthrough: {routed}\ngateway: {}",
        s.gateway.1.logs().stderr
    );
    // An SNI no route names finds no filter chain: the gateway closes.
    let other = curl("other.example.com", false)?;
    ensure!(other.contains("no answer"), "unrouted SNI: {other}");
    drop(backend);
    Ok(Some(vec![routed, other]))
}

#[test]
fn tls_passthrough_gateway_through_envoy_and_ferry_alike() -> Result<()> {
    let Some(with_envoy) = passthrough(true).context("through Envoy")? else {
        return Ok(());
    };
    let Some(with_ferry) = passthrough(false).context("through Ferry")? else {
        return Ok(());
    };
    eprintln!("observed through both: {with_ferry:#?}");
    assert_eq!(with_ferry, with_envoy);
    Ok(())
}

/// RequestAuthentication and an AuthorizationPolicy on the ingress gateway
/// (Istio's demo issuer, its JWKS inline): `/productpage` needs a token of
/// that issuer, other routes take none; an invalid token is refused at the
/// gateway.
const INGRESS_JWT_YAML: &str = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ingress-jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  jwtRules:
  - issuer: testing@secure.istio.io
    jwks: 'JWKS'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-require-jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ['*']}}]
    to: [{operation: {paths: [/productpage]}}]
";

/// What a client sees through a gateway under [`INGRESS_JWT_YAML`], once
/// the policy holds.
fn observe_jwt(s: &Setup, token: &str) -> Result<Vec<String>> {
    s.until_routed()?;
    let jwks =
        std::fs::read_to_string(ferry_tests::istio_material("istio-samples/jwt/jwks.json")?)?;
    let yaml = INGRESS_JWT_YAML.replace("JWKS", jwks.trim());
    let config = s.dir.join("config");
    std::fs::write(config.join(".jwt.yaml.tmp"), yaml)?;
    std::fs::rename(config.join(".jwt.yaml.tmp"), config.join("jwt.yaml"))?;
    let good = format!("Authorization: Bearer {token}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<String> = [
            ("/productpage", "no token", None),
            ("/productpage", "demo token", Some(good.as_str())),
            (
                "/productpage",
                "invalid token",
                Some("Authorization: Bearer invalid"),
            ),
            ("/login", "no token", None),
        ]
        .iter()
        .map(|(path, what, h)| {
            let extra: Vec<&str> = h.map(|h| vec!["-H", h]).unwrap_or_default();
            s.get_with(path, &extra)
                .map(|(st, name)| format!("{path} ({what}) -> {st} {name}"))
        })
        .collect::<Result<_>>()?;
        let want = ["403 ", "200 productpage", "401 ", "200 productpage"];
        if seen.iter().zip(want).all(|(l, w)| l.ends_with(w)) {
            return Ok(seen);
        }
        if Instant::now() > deadline {
            bail!("the gateway never enforced the JWT policy: {seen:#?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn jwt_at_the_gateway_through_envoy_and_ferry_alike() -> Result<()> {
    let tokens = std::fs::read_to_string(ferry_tests::istio_material(
        "istio-samples/jwt/tokens.json",
    )?)?;
    let tokens: serde_json::Value = serde_json::from_str(&tokens)?;
    let demo = tokens["demo.jwt"].as_str().context("demo.jwt")?.to_string();
    let Some(envoy) = start(true)? else {
        return Ok(());
    };
    let with_envoy = observe_jwt(&envoy, &demo).context("through Envoy")?;
    drop(envoy);
    let Some(ferry) = start(false)? else {
        return Ok(());
    };
    let with_ferry = observe_jwt(&ferry, &demo).context("through Ferry")?;
    eprintln!("observed through both: {with_ferry:#?}");
    assert_eq!(with_ferry, with_envoy);
    Ok(())
}

#[test]
fn bookinfo_gateway_through_envoy_and_ferry_alike() -> Result<()> {
    let Some(envoy) = start(true)? else {
        return Ok(());
    };
    let with_envoy = observe(&envoy).context("through Envoy")?;
    drop(envoy);
    let Some(ferry) = start(false)? else {
        return Ok(());
    };
    let with_ferry = observe(&ferry).context("through Ferry")?;
    eprintln!("observed through both: {with_ferry:#?}");
    assert_eq!(with_ferry, with_envoy);
    Ok(())
}

/// Istio's secure-ingress task: a Gateway terminating TLS for
/// `httpbin.example.com` with `credentialName: httpbin-credential`, a
/// Kubernetes Secret in the gateway's namespace that ferry-pilot serves
/// over SDS as `kubernetes://httpbin-credential` (and, for MUTUAL, the CA
/// of client certificates as `kubernetes://httpbin-credential-cacert`).
const SECURE_INGRESS_YAML: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure-gateway, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [httpbin.example.com]
    tls: {mode: MODE, credentialName: httpbin-credential}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.example.com]
  gateways: [secure-gateway]
  http:
  - route:
    - destination: {host: productpage, port: {number: 9080}}
";

/// Runs openssl in `dir`, failing with its error text.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The task's certificates: the `example.com` CA, the server's
/// `httpbin.example.com` and a client's, both signed by it.
fn secure_ingress_certs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/O=example Inc./CN=example.com",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    )?;
    for (name, cn) in [
        ("server", "httpbin.example.com"),
        ("client", "client.example.com"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                &format!("subjectAltName=DNS:{cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-days",
                "1",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                if name == "server" { "1" } else { "2" },
                "-copy_extensions",
                "copy",
                "-in",
                &format!("{name}.csr"),
                "-out",
                &format!("{name}.crt"),
            ],
        )?;
    }
    for entry in std::fs::read_dir(dir)? {
        std::fs::set_permissions(entry?.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// The Secret as `kubectl create secret tls` writes it (base64 `data`),
/// with `ca.crt` for MUTUAL as the task's `secret generic` adds it.
fn credential_secret(certs: &Path, with_ca: bool) -> Result<String> {
    use base64::Engine;
    let b64 = |f: &str| -> Result<String> {
        Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(certs.join(f))?))
    };
    let mut data = format!(
        "  tls.crt: {}\n  tls.key: {}\n",
        b64("server.crt")?,
        b64("server.key")?
    );
    if with_ca {
        data += &format!("  ca.crt: {}\n", b64("ca.crt")?);
    }
    Ok(format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: httpbin-credential, namespace: istio-system}}\n\
         type: kubernetes.io/tls\ndata:\n{data}"
    ))
}

/// What a client sees of the secure-ingress task through one gateway:
/// SIMPLE (the server verified against the CA, no client certificate),
/// then MUTUAL (refused without a client certificate, served with one).
/// The backend answers `/status/418` with that status, as httpbin does.
fn observe_secure_ingress(envoy: bool) -> Result<Option<Vec<String>>> {
    let Some(s) = start(envoy)? else {
        return Ok(None);
    };
    s.until_routed()?;
    let certs = s.dir.join("certs");
    secure_ingress_certs(&certs)?;
    let config = s.dir.join("config");
    let gw = s.gateway.0.ip();
    let curl = |client_cert: bool| -> Result<String> {
        let cmd = s
            .client
            .cmd("curl")
            .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg("--cacert")
            .arg(certs.join("ca.crt"))
            .args(["--resolve", &format!("httpbin.example.com:8443:{gw}")]);
        let cmd = if client_cert {
            cmd.arg("--cert")
                .arg(certs.join("client.crt"))
                .arg("--key")
                .arg(certs.join("client.key"))
        } else {
            cmd
        };
        let out = cmd
            .arg("https://httpbin.example.com:8443/status/418")
            .output()?;
        Ok(format!(
            "client certificate {client_cert}: {} (curl exit {})",
            String::from_utf8_lossy(&out.stdout),
            out.status.code().unwrap_or(-1)
        ))
    };
    let until = |want: &str, client_cert: bool| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = curl(client_cert)?;
            if got.contains(want) || Instant::now() > deadline {
                return Ok(got);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut seen = Vec::new();
    std::fs::write(
        config.join("credential.yaml"),
        credential_secret(&certs, false)?,
    )?;
    std::fs::write(
        config.join("secure-ingress.yaml"),
        SECURE_INGRESS_YAML.replace("MODE", "SIMPLE"),
    )?;
    let simple = until(": 418", false)?;
    ensure!(
        simple.contains(": 418 "),
        "SIMPLE: {simple}\ngateway: {}",
        s.gateway.1.logs().stderr
    );
    seen.push(format!("SIMPLE, {simple}"));
    std::fs::write(
        config.join("credential.yaml"),
        credential_secret(&certs, true)?,
    )?;
    std::fs::write(
        config.join("secure-ingress.yaml"),
        SECURE_INGRESS_YAML.replace("MODE", "MUTUAL"),
    )?;
    // Once MUTUAL holds, a client without a certificate is refused in the
    // handshake (curl gets no status).
    let refused = until(": 000", false)?;
    ensure!(
        refused.contains(": 000 "),
        "MUTUAL without a client certificate: {refused}\ngateway: {}",
        s.gateway.1.logs().stderr
    );
    seen.push(format!("MUTUAL, {refused}"));
    let mutual = until(": 418", true)?;
    ensure!(
        mutual.contains(": 418 "),
        "MUTUAL with a client certificate: {mutual}\ngateway: {}",
        s.gateway.1.logs().stderr
    );
    seen.push(format!("MUTUAL, {mutual}"));
    Ok(Some(seen))
}

#[test]
fn secure_ingress_simple_and_mutual_through_envoy_and_ferry_alike() -> Result<()> {
    let Some(with_envoy) = observe_secure_ingress(true).context("through Envoy")? else {
        return Ok(());
    };
    let Some(with_ferry) = observe_secure_ingress(false).context("through Ferry")? else {
        return Ok(());
    };
    eprintln!("observed through both: {with_ferry:#?}");
    // The exit code of a refused handshake is curl's reading of the alert,
    // which may differ between two TLS stacks; the status may not.
    let statuses = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|l| l.split(" (curl exit").next().unwrap_or(l).to_string())
            .collect()
    };
    assert_eq!(statuses(&with_ferry), statuses(&with_envoy));
    Ok(())
}
