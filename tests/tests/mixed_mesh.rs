//! A mesh where Envoy and Ferry sidecars serve side by side, fed by one ferry-pilot, in the
//! netns bed: what an operator swapping one proxy for the other pod by pod relies on.
//!
//! - Istio's extauthz task: meshConfig names the sample's HTTP authorizer
//!   (`envoyExtAuthzHttp`), a CUSTOM AuthorizationPolicy sends `/headers` on both an
//!   Envoy-fronted and a Ferry-fronted httpbin to it; from a client of each kind, a request
//!   with `x-ext-authz: allow` passes, one without is denied with the authorizer's 403 and
//!   text, and a path the policy does not cover never asks.
//! - Consistent-hash stickiness: a DestinationRule hashes on `x-user` (a ring hash, as
//!   istiod sets it) over four endpoints, two behind each kind of sidecar; for every key,
//!   the Envoy client and the Ferry client choose the same endpoint, every time.
//! - Istio's secure-ingress task across kinds: a `ferry gateway` in front of an Envoy-sidecar
//!   backend and an Envoy gateway in front of a Ferry-sidecar backend, both with the
//!   `credentialName` Secret ferry-pilot serves, SIMPLE then MUTUAL.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::istio::{App, IstioMesh, Proxy, Workload, curl};
use ferry_tests::pki::Ca;

const HTTPBIN_FERRY_VIP: &str = "10.96.2.1";
const HTTPBIN_ENVOY_VIP: &str = "10.96.2.2";
const EXT_AUTHZ_VIP: &str = "10.96.2.3";
const ECHO_VIP: &str = "10.96.2.4";

const MESH_CONFIG: &str = "extensionProviders:
- name: sample-ext-authz-http
  envoyExtAuthzHttp:
    service: ext-authz.default.svc.cluster.local
    port: 8000
    includeRequestHeadersInCheck: [x-ext-authz]
";

/// The extauthz task's policy, once per httpbin, and the hash rule.
const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz-ferry, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin-ferry}}
  action: CUSTOM
  provider: {name: sample-ext-authz-http}
  rules: [{to: [{operation: {paths: [/headers]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz-envoy, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin-envoy}}
  action: CUSTOM
  provider: {name: sample-ext-authz-http}
  rules: [{to: [{operation: {paths: [/headers]}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
";

/// The secure-ingress task's Gateway and VirtualService, once per gateway: each gateway
/// kind routes to the httpbin behind the other kind of sidecar.
const SECURE_INGRESS: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: via-ferry, namespace: default}
spec:
  selector: {istio: gw-ferry}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [ferry-gw.example.com]
    tls: {mode: MODE, credentialName: httpbin-credential}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: via-envoy, namespace: default}
spec:
  selector: {istio: gw-envoy}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [envoy-gw.example.com]
    tls: {mode: MODE, credentialName: httpbin-credential}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: via-ferry, namespace: default}
spec:
  hosts: [ferry-gw.example.com]
  gateways: [via-ferry]
  http: [{route: [{destination: {host: httpbin-envoy, port: {number: 8080}}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: via-envoy, namespace: default}
spec:
  hosts: [envoy-gw.example.com]
  gateways: [via-envoy]
  http: [{route: [{destination: {host: httpbin-ferry, port: {number: 8080}}}]}]
";

fn workloads() -> Vec<Workload> {
    let w = |name, app, runs| Workload {
        name,
        namespace: "default",
        app,
        version: "v1",
        service_account: app,
        injected: true,
        runs,
    };
    vec![
        w("client-ferry", "client-ferry", App::None),
        w("client-envoy", "client-envoy", App::None),
        w("httpbin-ferry", "httpbin-ferry", App::Http(8080)),
        w("httpbin-envoy", "httpbin-envoy", App::Http(8080)),
        w("ext-authz", "ext-authz", App::ExtAuthz(8000)),
        w("echo-1", "echo", App::Http(8080)),
        w("echo-2", "echo", App::Http(8080)),
        w("echo-3", "echo", App::Http(8080)),
        w("echo-4", "echo", App::Http(8080)),
    ]
}

/// Which proxy runs beside each workload: the name says it, and the echo endpoints
/// alternate.
fn proxy_of(w: &Workload) -> Proxy {
    if w.name.ends_with("-envoy") || w.name == "echo-2" || w.name == "echo-4" {
        Proxy::Envoy
    } else {
        Proxy::Ferry
    }
}

fn objects(ips: &[(&str, Ipv4Addr)]) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n---\n",
    );
    for w in workloads() {
        let ip = ips
            .iter()
            .find(|(n, _)| *n == w.name)
            .map(|(_, ip)| ip.to_string())
            .unwrap_or_default();
        out += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{app: {}, version: v1}}}}\n\
             spec: {{serviceAccountName: {}, containers: [{{name: app, image: echo}}]}}\nstatus: {{podIP: {ip}}}\n---\n",
            w.name, w.app, w.service_account
        );
    }
    for (name, vip, port) in [
        ("httpbin-ferry", HTTPBIN_FERRY_VIP, 8080),
        ("httpbin-envoy", HTTPBIN_ENVOY_VIP, 8080),
        ("ext-authz", EXT_AUTHZ_VIP, 8000),
        ("echo", ECHO_VIP, 8080),
    ] {
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: http, port: {port}, targetPort: {port}}}]}}\n---\n"
        );
    }
    out
}

fn mesh() -> Result<Option<IstioMesh>> {
    let m = IstioMesh::start_mixed_with_mesh_config(
        Proxy::Ferry,
        proxy_of,
        &workloads(),
        objects,
        MESH_CONFIG,
    )?;
    Ok(m)
}

/// The workload that answered, from echo's JSON.
fn answered_by(body: &str) -> Result<String> {
    let doc: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("not echo's answer: {body}"))?;
    doc["name"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no name in {body}"))
}

#[test]
fn extauthz_task_and_hash_stickiness_across_envoy_and_ferry_sidecars() -> Result<()> {
    let Some(m) = mesh()? else {
        return Ok(());
    };
    let file = m.dir().join("policies.yaml");
    std::fs::write(&file, POLICIES)?;
    m.apply(&[&file])?;
    let clients = ["client-ferry", "client-envoy"];
    let servers = [
        ("httpbin-ferry", HTTPBIN_FERRY_VIP),
        ("httpbin-envoy", HTTPBIN_ENVOY_VIP),
    ];

    // The extauthz task, from each kind of client to each kind of server.
    for client in clients {
        for (server, vip) in servers {
            let pod = m.pod(client);
            let headers = format!("http://{vip}:8080/headers");
            let what = format!("{client} → {server}");
            // Until the policy holds: a request without the header is denied.
            let (_, denied) = m.until(
                &format!("{what}: the CUSTOM policy never denied"),
                Duration::from_secs(30),
                || curl(pod, &headers, &["-H", "x-ext-authz: deny"]),
                |(code, _)| *code == 403,
            )?;
            ensure!(
                denied.contains("denied by ext_authz for not found header"),
                "{what}: the authorizer's text is passed to the client: {denied:?}"
            );
            let (code, body) = curl(pod, &headers, &["-H", "x-ext-authz: allow"])?;
            ensure!(code == 200, "{what}: allowed request: {code} {body}");
            ensure!(answered_by(&body)? == server, "{what}: answered by {body}");
            let (code, body) = curl(pod, &format!("http://{vip}:8080/ip"), &[])?;
            ensure!(
                code == 200,
                "{what}: a path outside the policy is not checked: {code} {body}"
            );
        }
    }

    // Consistent hashing: both kinds of client choose alike, and stick.
    let url = format!("http://{ECHO_VIP}:8080/");
    let mut choice: BTreeMap<String, String> = BTreeMap::new();
    // The rule is applied once a client's choice no longer moves with repeats.
    for client in clients {
        m.until(
            &format!("{client}: the hash rule never applied"),
            Duration::from_secs(30),
            || {
                let mut seen = Vec::new();
                for _ in 0..6 {
                    let (code, body) = curl(m.pod(client), &url, &["-H", "x-user: probe"])?;
                    ensure!(code == 200, "{client} → echo: {code} {body}");
                    seen.push(answered_by(&body)?);
                }
                Ok(seen)
            },
            |seen| seen.iter().all(|s| *s == seen[0]),
        )?;
    }
    for key in 0..24 {
        let user = format!("x-user: user-{key}");
        for client in clients {
            for _ in 0..2 {
                let (code, body) = curl(m.pod(client), &url, &["-H", &user])?;
                ensure!(code == 200, "{client} → echo ({user}): {code} {body}");
                let by = answered_by(&body)?;
                let first = choice.entry(user.clone()).or_insert_with(|| by.clone());
                ensure!(
                    *first == by,
                    "{user}: {client} chose {by}, the other choice was {first}"
                );
            }
        }
    }
    let used: std::collections::BTreeSet<&String> = choice.values().collect();
    ensure!(
        used.len() >= 2,
        "24 keys all landed on one endpoint: the hash decides nothing ({choice:?})"
    );
    Ok(())
}

#[test]
fn secure_ingress_through_each_gateway_kind_to_the_other_sidecar_kind() -> Result<()> {
    let Some(mut m) = mesh()? else {
        return Ok(());
    };
    let via_ferry = m.add_gateway_with(
        Proxy::Ferry,
        "gw-ferry",
        "istio-system",
        &[("istio", "gw-ferry")],
    )?;
    let via_envoy = m.add_gateway_with(
        Proxy::Envoy,
        "gw-envoy",
        "istio-system",
        &[("istio", "gw-envoy")],
    )?;
    let outside = m.add_client("outside")?;
    let certs = m.dir().join("certs");
    std::fs::create_dir_all(&certs)?;
    let ca = Ca::new("example Inc.")?;
    let server = ca.leaf(
        "spiffe://example.com/httpbin",
        &["ferry-gw.example.com", "envoy-gw.example.com"],
    )?;
    let client = ca.leaf("spiffe://example.com/client", &["client.example.com"])?;
    for (file, text) in [
        ("ca.crt", ca.pem()),
        ("client.crt", client.cert_pem.clone()),
        ("client.key", client.key_pem.clone()),
    ] {
        std::fs::write(certs.join(file), text)?;
    }
    let gateways = [
        ("ferry-gw.example.com", via_ferry, "httpbin-envoy"),
        ("envoy-gw.example.com", via_envoy, "httpbin-ferry"),
    ];
    let call = |host: &str, gw: Ipv4Addr, client_cert: bool| -> Result<(u16, String)> {
        let resolve = format!("{host}:8443:{gw}");
        let ca = certs.join("ca.crt").display().to_string();
        let cert = certs.join("client.crt").display().to_string();
        let key = certs.join("client.key").display().to_string();
        let mut extra = vec!["--cacert", &ca, "--resolve", &resolve];
        if client_cert {
            extra.extend(["--cert", &cert, "--key", &key]);
        }
        curl(&outside, &format!("https://{host}:8443/status/418"), &extra)
    };
    for mode in ["SIMPLE", "MUTUAL"] {
        m.put(
            "credential.yaml",
            &credential_secret(
                &server.cert_pem,
                &server.key_pem,
                &ca.pem(),
                mode == "MUTUAL",
            ),
        )?;
        m.put("secure-ingress.yaml", &SECURE_INGRESS.replace("MODE", mode))?;
        for (host, gw, backend) in gateways {
            let what = format!("{mode} through {host}");
            if mode == "MUTUAL" {
                // Once MUTUAL holds, a client without a certificate is refused in the
                // handshake.
                m.until(
                    &format!("{what}: never required a client certificate"),
                    Duration::from_secs(30),
                    || call(host, gw, false),
                    |(code, _)| *code == 0,
                )?;
            }
            let (_, body) = m.until(
                &format!("{what}: never served"),
                Duration::from_secs(30),
                || call(host, gw, true),
                |(code, _)| *code == 418,
            )?;
            ensure!(answered_by(&body)? == backend, "{what}: answered by {body}");
        }
    }
    Ok(())
}

/// The Secret as `kubectl create secret tls` writes it (base64 `data`), with `ca.crt` for
/// MUTUAL as the task's `secret generic` adds it, in the gateways' namespace.
fn credential_secret(cert: &str, key: &str, ca: &str, with_ca: bool) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut data = format!("  tls.crt: {}\n  tls.key: {}\n", b64(cert), b64(key));
    if with_ca {
        data += &format!("  ca.crt: {}\n", b64(ca));
    }
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: httpbin-credential, namespace: istio-system}}\n\
         type: kubernetes.io/tls\ndata:\n{data}"
    )
}
