//! The istio.io TCP traffic-shifting task end to end, through an Envoy
//! ingress gateway with Envoy sidecars and through `ferry gateway` with
//! Ferry sidecars: tcp-echo v1 answers `one …`, v2 `two …` (Istio's
//! tcp-echo server), the task's files from `../shared/istio-samples/
//! tcp-echo/` are applied as they are (a TCP Gateway on 31400, subsets, a
//! VirtualService bound to the gateway), and an outside client connects to
//! the gateway: every connection reaches v1, then about 20% reach v2 (within
//! a binomial 99.9% bound over 400 connections).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, ensure};
use ferry_tests::istio::{App, IstioMesh, Proxy, Workload, service_yaml};

const VIP: &str = "10.96.5.10";

fn samples() -> Result<PathBuf> {
    ferry_tests::istio_material("istio-samples/tcp-echo/tcp-echo-all-v1.yaml")?;
    ferry_tests::istio_material("istio-samples/tcp-echo")
}

fn workloads() -> Vec<Workload> {
    ["v1", "v2"]
        .into_iter()
        .map(|v| Workload {
            name: if v == "v1" {
                "tcp-echo-v1"
            } else {
                "tcp-echo-v2"
            },
            namespace: "default",
            app: "tcp-echo",
            version: v,
            service_account: "default",
            injected: true,
            runs: App::TcpPrefix(vec![9000, 9001], if v == "v1" { "one" } else { "two" }),
        })
        .collect()
}

fn objects(ips: &[(&str, Ipv4Addr)]) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio-injection: enabled}}\n---\n",
    );
    out.push_str(&service_yaml(
        "tcp-echo",
        "default",
        VIP,
        &[("tcp", 9000, 9000), ("tcp-other", 9001, 9001)],
    ));
    for (name, ip) in ips {
        let version = name.rsplit('-').next().unwrap_or("v1");
        out.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: tcp-echo, version: {version}}}}}\n\
             spec: {{containers: [{{name: app, image: tcp-echo}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
        ));
    }
    out
}

/// `n` connections from `client` to the gateway, one line each: how many
/// answers started with `one` and with `two` (and any other answers).
fn connect_many(
    client: &ferry_tests::netns::Pod,
    gw: Ipv4Addr,
    n: usize,
) -> Result<(usize, usize, Vec<String>)> {
    let script = format!(
        "import socket\n\
         out = []\n\
         for i in range({n}):\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('{gw}', 31400), timeout=3)\n\
         \x20       s.sendall(b'hello\\n'); s.settimeout(3); b = b''\n\
         \x20       while not b.endswith(b'\\n'):\n\
         \x20           d = s.recv(4096)\n\
         \x20           if not d: break\n\
         \x20           b += d\n\
         \x20       s.close(); out.append(b.decode().strip() or '-')\n\
         \x20   except Exception as e:\n\
         \x20       out.append('error:' + type(e).__name__)\n\
         print('\\n'.join(out))\n"
    );
    let text = client
        .cmd("python3")
        .args(["-c", &script])
        .timeout(Duration::from_secs(120))
        .run()?;
    let (mut one, mut two, mut other) = (0, 0, Vec::new());
    for line in text.lines() {
        match line {
            "one hello" => one += 1,
            "two hello" => two += 1,
            l => other.push(l.to_string()),
        }
    }
    Ok((one, two, other))
}

fn shifting(proxy: Proxy) -> Result<()> {
    let dir = samples()?;
    let Some(mut m) = IstioMesh::start(proxy, &workloads(), objects, "24h")? else {
        return Ok(());
    };
    let gw = m.add_gateway(
        "ingressgateway",
        "istio-system",
        &[("istio", "ingressgateway"), ("app", "istio-ingressgateway")],
    )?;
    let client = m.add_client("outside")?;

    m.apply(&[&dir.join("tcp-echo-all-v1.yaml")])?;
    m.until(
        "tcp-echo-all-v1: every connection to v1",
        Duration::from_secs(30),
        || connect_many(&client, gw, 10),
        |(one, _, _)| *one == 10,
    )?;
    let (one, two, other) = connect_many(&client, gw, 50)?;
    ensure!(
        one == 50 && two == 0 && other.is_empty(),
        "{proxy:?}: all-v1 gave one={one} two={two} other={other:?}"
    );

    // As `kubectl apply` of the second file: its VirtualService replaces
    // the first one's, whose Gateway and DestinationRule stay.
    let all_v1 = std::fs::read_to_string(dir.join("tcp-echo-all-v1.yaml"))?;
    let kept: Vec<&str> = all_v1
        .split("\n---")
        .filter(|doc| doc.contains("kind: Gateway") || doc.contains("kind: DestinationRule"))
        .collect();
    let base = m.dir().join("tcp-echo-gateway-and-subsets.yaml");
    std::fs::write(&base, kept.join("\n---"))?;
    m.apply(&[&base, &dir.join("tcp-echo-20-v2.yaml")])?;
    m.until(
        "tcp-echo-20-v2: some connections reach v2",
        Duration::from_secs(30),
        || connect_many(&client, gw, 20),
        |(_, two, _)| *two > 0,
    )?;
    let n = 400;
    let (one, two, other) = connect_many(&client, gw, n)?;
    ensure!(other.is_empty(), "{proxy:?}: failed connections {other:?}");
    // 20% of 400: mean 80, sd 8; 99.9% two-sided bound ±3.29 sd.
    let (lo, hi) = (80 - 27, 80 + 27);
    ensure!(
        (lo..=hi).contains(&two) && one + two == n,
        "{proxy:?}: 20% to v2 expected, got two={two} one={one} of {n} (bound {lo}..={hi})"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn tcp_traffic_shifting_through_envoy() -> Result<()> {
    shifting(Proxy::Envoy)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn tcp_traffic_shifting_through_ferry() -> Result<()> {
    shifting(Proxy::Ferry)
}
