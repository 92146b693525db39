//! Istio's TCP metadata exchange (`istio-peer-exchange` ALPN,
//! `istio.metadata_exchange` / `envoy.tcp.metadataexchange.config.MetadataExchange`)
//! and the reference Envoy 1.40.
//!
//! Upstream Envoy cannot speak it: the filter lives in Istio's proxy
//! (`istio/proxy`, `source/extensions/filters/network/metadata_exchange`), not
//! in Envoy. The first test keeps the evidence: Envoy 1.40's `/server_info`
//! lists no extension of that type (nor Istio's HTTP `peer_metadata` or
//! `istio.stats`), and `--mode validate` refuses a listener that names it.
//! So ferry-pilot gives an Envoy node neither the filter nor the ALPN that
//! promises it, and the interop that matters with Envoy sidecars is that
//! their TCP traffic with Ferry sidecars stays intact both ways with no
//! exchange (a Ferry server then names its client by certificate, a Ferry
//! client its server by the cluster's service), while
//! Ferry sidecars exchange with each other (`mesh_metrics.rs`) and write the
//! frame byte for byte as Istio's protocol lays it out (the unit tests of
//! `proxy/src/metadata_exchange.rs`).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::istio::{App, IstioMesh, Proxy, Workload, curl, tcp_exchange};
use ferry_tests::proxy::{TempDir, free_port};
use serde_json::{Value, json};

const MX_TYPE: &str = "envoy.tcp.metadataexchange.config.MetadataExchange";

fn tcp_listener(port: u16, filters: Value) -> Value {
    json!({"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": filters}]}],
        "clusters": [{"name": "c", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}}]}})
}

fn tcp_proxy() -> Value {
    json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "t", "cluster": "c"}})
}

#[test]
fn envoy_1_40_has_no_metadata_exchange() -> Result<()> {
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let version = Command::new(&bin).arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    ensure!(version.contains("/1.40."), "not Envoy 1.40: {version}");

    // What this build registers.
    let port = free_port();
    let running = Envoy::start(&bin, &tcp_listener(port, json!([tcp_proxy()])), port)?;
    let out = Command::new("curl")
        .args([
            "-sf",
            &format!("http://127.0.0.1:{}/server_info", running.admin()),
        ])
        .output()?;
    ensure!(out.status.success(), "/server_info: {out:?}");
    let info: Value = serde_json::from_slice(&out.stdout)?;
    let extensions = info["node"]["extensions"]
        .as_array()
        .context("node.extensions")?;
    ensure!(extensions.len() > 100, "{} extensions", extensions.len());
    let type_urls: Vec<&str> = extensions
        .iter()
        .flat_map(|e| e["type_urls"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    ensure!(type_urls.contains(&"envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"));
    for istio_only in [
        MX_TYPE,
        "io.istio.http.peer_metadata.Config",
        "stats.PluginConfig",
    ] {
        ensure!(
            !type_urls.contains(&istio_only),
            "Envoy 1.40 registers {istio_only}"
        );
    }
    let names: Vec<&str> = extensions
        .iter()
        .filter_map(|e| e["name"].as_str())
        .filter(|n| n.contains("metadata_exchange") || n.contains("peer_metadata"))
        .collect();
    ensure!(names.is_empty(), "{names:?}");
    drop(running);

    // And a listener naming the filter, as istiod writes it, is refused.
    let dir = TempDir::new("envoy-mx")?;
    let mx = json!({"name": "istio.metadata_exchange", "typed_config": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": format!("type.googleapis.com/{MX_TYPE}"),
        "value": {"protocol": "istio-peer-exchange"}}});
    let path = dir.path().join("mx.json");
    std::fs::write(
        &path,
        serde_json::to_string(&tcp_listener(free_port(), json!([mx, tcp_proxy()])))?,
    )?;
    let out = Command::new(&bin)
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!out.status.success(), "Envoy accepted the filter:\n{text}");
    ensure!(
        text.contains(MX_TYPE) || text.contains("istio.metadata_exchange"),
        "the refusal should name the filter:\n{text}"
    );
    Ok(())
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "ferry-client",
        namespace: "default",
        app: "ferry-client",
        version: "v1",
        service_account: "ferry-client",
        injected: true,
        runs: App::None,
    },
    Workload {
        name: "envoy-client",
        namespace: "default",
        app: "envoy-client",
        version: "v1",
        service_account: "envoy-client",
        injected: true,
        runs: App::None,
    },
    Workload {
        name: "ferry-echo",
        namespace: "default",
        app: "ferry-echo",
        version: "v1",
        service_account: "ferry-echo",
        injected: true,
        runs: App::None,
    },
    Workload {
        name: "envoy-echo",
        namespace: "default",
        app: "envoy-echo",
        version: "v1",
        service_account: "envoy-echo",
        injected: true,
        runs: App::None,
    },
];

fn workloads() -> Vec<Workload> {
    let mut w = WORKLOADS.to_vec();
    w[2].runs = App::TcpEcho(vec![9000]);
    w[3].runs = App::TcpEcho(vec![9000]);
    w
}

fn objects(ips: &[(&str, Ipv4Addr)]) -> String {
    let mut out = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\n\
         spec: {mtls: {mode: STRICT}}\n---\n"
        .to_string();
    for (name, vip) in [("ferry-echo", "10.96.2.10"), ("envoy-echo", "10.96.2.20")] {
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: tcp, port: 9000, targetPort: 9000}}]}}\n---\n"
        );
    }
    for (name, ip) in ips {
        out += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}, version: v1}}}}\n\
             spec: {{serviceAccountName: {name}, containers: [{{name: app, image: echo}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
        );
    }
    out
}

/// The sum of the samples of `metric` whose labels include all of `labels`.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|r| r.starts_with('{')))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Ferry and Envoy sidecars side by side under STRICT mTLS: every pairing's
/// TCP bytes arrive exactly (no exchange frame ever reaches an
/// application), Ferry↔Ferry exchanges metadata, and a Ferry sidecar facing
/// an Envoy one names it by its certificate only.
#[test]
fn tcp_between_ferry_and_envoy_sidecars_both_ways() -> Result<()> {
    let proxy_of = |w: &Workload| {
        if w.name.starts_with("envoy") {
            Proxy::Envoy
        } else {
            Proxy::Ferry
        }
    };
    let Some(m) = IstioMesh::start_mixed(Proxy::Ferry, proxy_of, &workloads(), objects, "24h")?
    else {
        return Ok(());
    };
    let pairs = [
        ("ferry-client", "10.96.2.10"),
        ("ferry-client", "10.96.2.20"),
        ("envoy-client", "10.96.2.10"),
        ("envoy-client", "10.96.2.20"),
    ];
    for (client, vip) in pairs {
        let line = format!("from-{client}-to-{vip}");
        // The echo answers the line: exactly the line proves no frame
        // reached either end (a stray frame's bytes are not even UTF-8).
        let (_, got) = m.until(
            &format!("{client} → {vip}"),
            Duration::from_secs(20),
            || Ok(((), tcp_exchange(m.pod(client), vip, 9000, &line)?)),
            |(_, got)| !got.is_empty(),
        )?;
        ensure!(
            got == line,
            "{client} → {vip}: got {got:?}\n{}",
            m.diagnostics()
        );
    }
    let scrape = |pod: &str| -> Result<String> {
        let (code, body) = curl(m.pod(pod), "http://127.0.0.1:15090/stats/prometheus", &[])?;
        ensure!(code == 200, "scrape of {pod}: {code}");
        Ok(body)
    };
    let closed = |text: &String, labels: &[(&str, &str)]| {
        sample(text, "istio_tcp_connections_closed_total", labels) >= 1
    };
    // Ferry ↔ Ferry: each side has the other's workload labels.
    let client = m.until(
        "ferry-client's connection to ferry-echo",
        Duration::from_secs(10),
        || scrape("ferry-client"),
        |t| {
            closed(
                t,
                &[
                    ("reporter", "source"),
                    ("destination_workload", "ferry-echo"),
                    ("destination_app", "ferry-echo"),
                ],
            )
        },
    )?;
    // Ferry → Envoy: only the cluster names the destination (its service);
    // no workload labels, since nothing was exchanged.
    let envoy_dest = [
        ("reporter", "source"),
        (
            "destination_service",
            "envoy-echo.default.svc.cluster.local",
        ),
        ("destination_workload", "unknown"),
    ];
    ensure!(closed(&client, &envoy_dest), "{client}");
    ensure!(
        sample(
            &client,
            "istio_tcp_connections_closed_total",
            &[("destination_workload", "envoy-echo")]
        ) == 0,
        "an Envoy sidecar exchanged metadata?\n{client}"
    );
    // Envoy → Ferry: the client's certificate names it; Ferry → Ferry: the
    // exchange adds its workload labels.
    let server = m.until(
        "ferry-echo's connections",
        Duration::from_secs(10),
        || scrape("ferry-echo"),
        |t| {
            closed(
                t,
                &[
                    ("reporter", "destination"),
                    ("source_workload", "ferry-client"),
                    ("source_app", "ferry-client"),
                ],
            ) && closed(
                t,
                &[
                    ("reporter", "destination"),
                    (
                        "source_principal",
                        "spiffe://cluster.local/ns/default/sa/envoy-client",
                    ),
                ],
            )
        },
    )?;
    ensure!(
        sample(
            &server,
            "istio_tcp_connections_closed_total",
            &[("source_workload", "envoy-client")]
        ) == 0,
        "{server}"
    );
    Ok(())
}
