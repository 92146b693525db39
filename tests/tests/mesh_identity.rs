//! Workload identities end to end: `ferry-pilot serve` is the mesh CA, and
//! each Ferry sidecar's agent (`--ca-addr`) gets its pod's SPIFFE
//! certificate from it by CSR, as istio-agent does with istiod. Pods are
//! network namespaces with real capture rules; the namespace is labelled
//! for injection and a PeerAuthentication makes mTLS STRICT. Proven here:
//! - the client's call reaches the server over Istio mTLS, and the server
//!   app sees the client's SPIFFE identity in `x-forwarded-client-cert`;
//! - a pod without a sidecar cannot reach the server any more (STRICT);
//! - certificates are renewed at half their lifetime (a 6 s lifetime here:
//!   short enough to see two renewals, long enough that a starved machine
//!   still renews before expiry) while requests keep succeeding across the
//!   rotations;
//! - the CA knows callers by their pod's address: a CSR from an address no
//!   pod has is refused;
//! - a self-signed certificate claiming a mesh identity is refused by the
//!   STRICT inbound of Ferry and of Envoy (the combined validation context
//!   with the SDS `ROOTCA`, as istiod sends it).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::istio::{App, IstioMesh, Proxy, Workload, curl, echo_header, tls_get};
use ferry_tests::netns::{Proc, ferry_bin};
use ferry_tests::pki::Leaf;

const SERVER_VIP: &str = "10.96.1.10";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "server",
        namespace: "default",
        app: "server",
        version: "v1",
        service_account: "server",
        injected: true,
        runs: App::Http(8080),
    },
    Workload {
        name: "client",
        namespace: "default",
        app: "client",
        version: "v1",
        service_account: "sleep",
        injected: true,
        runs: App::None,
    },
    Workload {
        name: "legacy",
        namespace: "default",
        app: "legacy",
        version: "v1",
        service_account: "legacy",
        injected: false,
        runs: App::None,
    },
];

fn objects(ips: &[(&str, Ipv4Addr)]) -> String {
    let ip = |n: &str| ips.iter().find(|(w, _)| *w == n).map(|(_, ip)| *ip);
    let pod = |name: &str, sa: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}{extra}}}\n\
             spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: echo}}]}}\nstatus: {{podIP: {}}}\n---\n",
            ip(name).map(|i| i.to_string()).unwrap_or_default()
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio-injection: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: default}}\n\
         spec: {{clusterIP: {SERVER_VIP}, selector: {{app: server}}, ports: [{{name: http, port: 8080, targetPort: 8080}}]}}\n---\n\
         {}{}{}\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: default}}\n\
         spec: {{mtls: {{mode: STRICT}}}}\n",
        pod("server", "server", ""),
        pod("client", "sleep", ""),
        pod(
            "legacy",
            "legacy",
            ", annotations: {sidecar.istio.io/inject: \"false\"}"
        ),
    )
}

fn start(proxy: Proxy, cert_ttl: &str) -> Result<Option<IstioMesh>> {
    IstioMesh::start(proxy, WORKLOADS, objects, cert_ttl)
}

fn url() -> String {
    format!("http://{SERVER_VIP}:8080/hello")
}

fn issued(pilot: &Proc, identity: &str) -> usize {
    pilot
        .logs()
        .stderr
        .lines()
        .filter(|l| l.contains("certificate issued") && l.contains(identity))
        .count()
}

/// Client → server over mTLS: the `x-forwarded-client-cert` the app saw.
fn xfcc(m: &IstioMesh) -> Result<String> {
    let (_, body) = m.until(
        "the client never reached the server",
        Duration::from_secs(20),
        || curl(m.pod("client"), &url(), &[]),
        |(code, _)| *code == 200,
    )?;
    echo_header(&body, "x-forwarded-client-cert")?.with_context(|| {
        format!(
            "no x-forwarded-client-cert reached the app: {body}\n{}",
            m.diagnostics()
        )
    })
}

/// The checks every pairing must pass: identities in XFCC, STRICT.
fn check_mtls(m: &IstioMesh) -> Result<()> {
    let xfcc = xfcc(m)?;
    ensure!(
        xfcc.contains(&format!("By={SERVER_ID}")) && xfcc.contains(&format!("URI={CLIENT_ID}")),
        "XFCC {xfcc:?} should name the server as By and the client as URI"
    );
    // STRICT: a pod without a sidecar is refused.
    let direct = format!("http://{}:8080/hello", m.pod("server").ip());
    let (code, body) = curl(m.pod("legacy"), &direct, &[])?;
    ensure!(
        code != 200,
        "plaintext reached a STRICT workload: {code} {body}"
    );
    // A forger claiming the client's SPIFFE identity with a self-signed
    // certificate is refused at the handshake, on the HTTP mTLS chains
    // (Istio's ALPN) and on the TCP one alike.
    let forged = Leaf::self_signed(CLIENT_ID, &[])?;
    let (cert, key) = (m.dir().join("forged.pem"), m.dir().join("forged.key"));
    std::fs::write(&cert, &forged.cert_pem)?;
    std::fs::write(&key, &forged.key_pem)?;
    let server_ip = m.pod("server").ip().to_string();
    for alpn in [
        &["istio-http/1.1"][..],
        &["istio-peer-exchange", "istio"],
        &[],
    ] {
        let got = tls_get(m.pod("legacy"), &server_ip, 8080, &cert, &key, alpn)?;
        ensure!(
            got.is_none(),
            "a self-signed certificate claiming {CLIENT_ID} was answered {got:?} (ALPN {alpn:?})\n{}",
            m.diagnostics()
        );
    }
    Ok(())
}

#[test]
fn ferry_sidecars_get_certificates_by_csr_and_renew_them() -> Result<()> {
    let Some(m) = start(Proxy::Ferry, "6s")? else {
        return Ok(());
    };
    check_mtls(&m)?;

    // Rotation: renewed at half the lifetime left, about every 3 s; calls
    // keep working throughout (a 7 s window holds two renewals).
    let first = (issued(&m.pilot, CLIENT_ID), issued(&m.pilot, SERVER_ID));
    let until = Instant::now() + Duration::from_secs(7);
    let mut calls = 0;
    while Instant::now() < until {
        let (code, body) = curl(m.pod("client"), &url(), &[])?;
        if code != 200 {
            // What each sidecar counted, to tell where the call stopped.
            for pod in ["client", "server"] {
                let (_, stats) = curl(m.pod(pod), "http://127.0.0.1:15000/stats", &[])?;
                let counted: Vec<&str> = stats
                    .lines()
                    .filter(|l| !l.ends_with(": 0") && l.contains("stream_"))
                    .collect();
                eprintln!("--- {pod} sidecar's counters:\n{}", counted.join("\n"));
            }
        }
        ensure!(
            code == 200,
            "call {calls} during rotation failed: {code} {body}\n{}",
            m.diagnostics()
        );
        calls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = (issued(&m.pilot, CLIENT_ID), issued(&m.pilot, SERVER_ID));
    ensure!(
        after.0 >= first.0 + 2 && after.1 >= first.1 + 2,
        "certificates were not renewed at half their lifetime: {first:?} -> {after:?}\n{}",
        m.diagnostics()
    );
    ensure!(calls >= 10, "only {calls} calls in 7 s");

    // The CA knows callers by their pod's address: one no pod in the
    // configuration has gets nothing, whatever identity its node claims.
    let rogue = m.mesh().pod("rogue")?;
    let out = rogue
        .cmd(ferry_bin())
        .args(["sidecar", "--concurrency", "1", "--ready-addr", "off"])
        .args(["--prometheus-addr", "off"])
        .arg("--ca-addr")
        .arg(format!("{}:15010", m.istiod.ip()))
        .arg("--config")
        .arg(m.dir().join("client.yaml"))
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
                "the CA did not refuse an unknown caller\n--- rogue:\n{log}\n{}",
                m.diagnostics()
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

/// Envoy sidecars get theirs over SDS from ferry-pilot and pass the same
/// checks; an Envoy client and a Ferry server, and the reverse, speak
/// Istio mTLS with each other.
#[test]
fn envoy_sidecars_get_certificates_over_sds_and_interoperate_with_ferry() -> Result<()> {
    for (client, server) in [
        (Proxy::Envoy, Proxy::Envoy),
        (Proxy::Envoy, Proxy::Ferry),
        (Proxy::Ferry, Proxy::Envoy),
    ] {
        let proxy_of = |w: &Workload| if w.name == "server" { server } else { client };
        let Some(m) = IstioMesh::start_mixed(client, proxy_of, WORKLOADS, objects, "24h")? else {
            return Ok(());
        };
        check_mtls(&m).with_context(|| format!("client {client:?}, server {server:?}"))?;
    }
    Ok(())
}
