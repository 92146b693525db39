//! `ferry-pilot explain`: the control plane's answer to "what would this request get from
//! this pod's proxy, and why" must be the proxy's own. A small mesh in the netns bed
//! (ferry-pilot, two Ferry sidecars) has a VirtualService with a header-matched route, a
//! weighted split with retries and a timeout, and an ALLOW AuthorizationPolicy on the
//! server; for the same questions — the client's outbound request down each route, the
//! server's inbound request from an allowed and a refused principal — the JSON of
//! `ferry-pilot explain --pod …` on the configuration directory must equal the JSON of the
//! sidecar's `/explain` (each cluster's endpoints included), and say the expected route,
//! weighted choice, retry policy and RBAC verdict. Then a request is sent for real from the
//! client and reaches the workload the explanation named.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::istio::{App, IstioMesh, Proxy, Workload, curl};
use ferry_tests::netns::workspace_bin;
use serde_json::Value;

/// `/explain`'s parameters, repeated keys in order.
type Query<'a> = Vec<(&'a str, &'a str)>;

const SERVER_VIP: &str = "10.96.3.10";
const HOST: &str = "server.default.svc.cluster.local";

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "client",
        namespace: "default",
        app: "client",
        version: "v1",
        service_account: "client",
        injected: true,
        runs: App::None,
    },
    Workload {
        name: "server",
        namespace: "default",
        app: "server",
        version: "v1",
        service_account: "server",
        injected: true,
        runs: App::Http(8080),
    },
];

fn objects(ips: &[(&str, Ipv4Addr)]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio-injection: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: default}}\n\
         spec: {{clusterIP: {SERVER_VIP}, selector: {{app: server}}, ports: [{{name: http, port: 8080, targetPort: 8080}}]}}\n---\n"
    );
    for (name, ip) in ips {
        out += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}, version: v1}}}}\n\
             spec: {{serviceAccountName: {name}, containers: [{{name: app, image: echo}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
        );
    }
    out
}

const ISTIO: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: server, namespace: default}
spec:
  host: server
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server, namespace: default}
spec:
  hosts: [server]
  http:
  - name: testers
    match: [{headers: {x-user: {exact: tester}}}]
    route: [{destination: {host: server, subset: v1}}]
  - name: split
    timeout: 7s
    retries: {attempts: 2, perTryTimeout: 2s, retryOn: 5xx}
    route:
    - {destination: {host: server, subset: v1}, weight: 90}
    - {destination: {host: server, subset: v2}, weight: 10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]
";

/// The sidecar's `/explain` from inside its pod.
fn sidecar_explain(m: &IstioMesh, pod: &str, query: &[(&str, &str)]) -> Result<Value> {
    let q: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    let url = format!("http://127.0.0.1:15000/explain?{}", q.join("&"));
    let (code, body) = curl(m.pod(pod), &url, &[])?;
    ensure!(code == 200, "{pod} /explain: {code} {body}");
    serde_json::from_str(&body).with_context(|| body.clone())
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `ferry-pilot explain` on the mesh's configuration directory.
fn pilot_explain(m: &IstioMesh, pod: &str, query: &[(&str, &str)]) -> Result<Value> {
    let mut cmd = Command::new(workspace_bin("ferry-pilot", "ferry-pilot"));
    cmd.args(["explain", "--config"])
        .arg(m.dir().join("config"))
        .args(["--pod", &format!("{pod}.default")]);
    for (k, v) in query {
        cmd.arg(format!("--{k}")).arg(v);
    }
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "ferry-pilot explain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("ferry-pilot explain's JSON")
}

#[test]
fn pilot_explain_agrees_with_the_sidecar() -> Result<()> {
    let Some(m) = IstioMesh::start(Proxy::Ferry, WORKLOADS, objects, "24h")? else {
        return Ok(());
    };
    let file = m.dir().join("istio.yaml");
    std::fs::write(&file, ISTIO)?;
    m.apply(&[&file])?;
    let dst = format!("{SERVER_VIP}:8080");
    let client_ip = m.pod("client").ip().to_string();
    let source = format!("{client_ip}:40000");
    // The sidecar has the VirtualService once its explanation names the route.
    m.until(
        "the client's sidecar never got the VirtualService",
        Duration::from_secs(20),
        || {
            sidecar_explain(
                &m,
                "client",
                &[("destination", &dst), ("authority", HOST), ("path", "/")],
            )
        },
        |v| v.to_string().contains("\"split\""),
    )?;

    let server_ip = m.pod("server").ip().to_string();
    let server_dst = format!("{server_ip}:8080");
    let cases: Vec<(&str, Query, &str)> = vec![
        // Outbound: the header route, then the weighted split with its policy.
        (
            "client",
            vec![
                ("destination", &dst),
                ("authority", HOST),
                ("path", "/a"),
                ("header", "x-user:tester"),
                ("source", &source),
            ],
            "testers",
        ),
        (
            "client",
            vec![
                ("destination", &dst),
                ("authority", HOST),
                ("path", "/b"),
                ("source", &source),
            ],
            "split",
        ),
        // Inbound (what iptables hands to `virtualInbound`): mutual TLS from the
        // allowed principal, and from another.
        (
            "server",
            vec![
                ("listener", "virtualInbound"),
                ("destination", &server_dst),
                ("authority", HOST),
                ("path", "/c"),
                ("source", &source),
                ("principal", "spiffe://cluster.local/ns/default/sa/client"),
                ("alpn", "istio-http/1.1"),
            ],
            "allowed",
        ),
        (
            "server",
            vec![
                ("listener", "virtualInbound"),
                ("destination", &server_dst),
                ("authority", HOST),
                ("path", "/c"),
                ("source", &source),
                ("principal", "spiffe://cluster.local/ns/default/sa/intruder"),
                ("alpn", "istio-http/1.1"),
            ],
            "denied",
        ),
    ];
    for (pod, query, what) in &cases {
        let live = sidecar_explain(&m, pod, query)?;
        let pilot = pilot_explain(&m, pod, query)?;
        let show = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
        ensure!(
            live == pilot,
            "{pod} {what}: the sidecar's /explain and ferry-pilot explain differ\n--- sidecar:\n{}\n--- ferry-pilot:\n{}",
            show(&live),
            show(&pilot)
        );
        let text = live.to_string();
        match *what {
            "testers" => ensure!(
                text.contains("\"testers\"") && text.contains("outbound|8080|v1|server"),
                "{}",
                show(&live)
            ),
            "split" => ensure!(
                text.contains("\"split\"")
                    && text.contains("90%")
                    && text.contains("10%")
                    && text.contains("outbound|8080|v2|server")
                    && text.contains("\"7s\"")
                    && text.contains("5xx"),
                "{}",
                show(&live)
            ),
            "allowed" => ensure!(
                text.contains("inbound|8080||") && !text.contains("denied"),
                "{}",
                show(&live)
            ),
            _ => ensure!(
                text.contains("denied") || text.contains("403"),
                "{}",
                show(&live)
            ),
        }
    }

    // The explanation is what a request gets: the testers' route reaches v1 (the only
    // workload), through the real sidecars.
    let (code, body) = curl(
        m.pod("client"),
        &format!("http://{SERVER_VIP}:8080/a"),
        &["-H", "x-user: tester", "-H", &format!("host: {HOST}")],
    )?;
    ensure!(
        code == 200 && body.contains("\"name\": \"server\""),
        "{code} {body}"
    );

    // A pod that does not exist is an error naming it.
    let out = Command::new(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args(["explain", "--config"])
        .arg(m.dir().join("config"))
        .args(["--pod", "nobody.default", "--destination", &dst])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("nobody.default"),
        "{err}"
    );
    Ok(())
}
