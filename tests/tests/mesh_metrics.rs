//! Istio's standard metrics end to end: ferry-pilot puts `istio.stats` in
//! every sidecar chain, a client calls an HTTP server and a TCP echo over
//! Istio mTLS through Ferry sidecars (pods are network namespaces with
//! real capture rules), and each sidecar's `/stats/prometheus` on Istio's
//! port 15090, scraped from inside its pod, reports what it saw: the
//! client as `reporter="source"`, the servers as `reporter="destination"`,
//! with the SPIFFE principals, namespaces, service and response codes, and
//! on TCP the peer's workload labels from Istio's TCP metadata exchange.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, ensure};
use ferry_tests::istio::{App, IstioMesh, Proxy, Workload, curl, tcp_exchange};

const SERVER_VIP: &str = "10.96.1.10";
const ECHO_VIP: &str = "10.96.1.11";
const SERVER_HOST: &str = "server.default.svc.cluster.local";
const ECHO_HOST: &str = "echo.default.svc.cluster.local";
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
        name: "echo",
        namespace: "default",
        app: "echo",
        version: "v2",
        service_account: "echo",
        injected: true,
        runs: App::TcpEcho(Vec::new()),
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
];

fn workloads() -> Vec<Workload> {
    let mut w = WORKLOADS.to_vec();
    w[1].runs = App::TcpEcho(vec![9000]);
    w
}

fn objects(ips: &[(&str, Ipv4Addr)]) -> String {
    let ip = |n: &str| ips.iter().find(|(w, _)| *w == n).map(|(_, ip)| *ip);
    let pod = |name: &str, sa: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n\
             spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: echo}}]}}\nstatus: {{podIP: {}}}\n---\n",
            ip(name).map(|i| i.to_string()).unwrap_or_default()
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio-injection: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: default}}\n\
         spec: {{clusterIP: {SERVER_VIP}, selector: {{app: server}}, ports: [{{name: http, port: 8080, targetPort: 8080}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\n\
         spec: {{clusterIP: {ECHO_VIP}, selector: {{app: echo}}, ports: [{{name: tcp, port: 9000, targetPort: 9000}}]}}\n---\n\
         {}{}{}\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: default}}\n\
         spec: {{mtls: {{mode: STRICT}}}}\n",
        pod("server", "server"),
        pod("echo", "echo"),
        pod("client", "sleep"),
    )
}

/// The sum of the samples of `metric` whose labels include all of `labels`.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn scrape(m: &IstioMesh, pod: &str) -> Result<String> {
    let (code, body) = curl(m.pod(pod), "http://127.0.0.1:15090/stats/prometheus", &[])?;
    ensure!(code == 200, "scrape of {pod}: {code} {body}");
    Ok(body)
}

#[test]
fn ferry_sidecars_report_istio_standard_metrics() -> Result<()> {
    let Some(m) = IstioMesh::start(Proxy::Ferry, &workloads(), objects, "24h")? else {
        return Ok(());
    };
    let url = |path: &str| format!("http://{SERVER_VIP}:8080{path}");
    // The mesh is up once a first call succeeds (it counts: 1 of the 200s).
    m.until(
        "the client never reached the server",
        Duration::from_secs(20),
        || curl(m.pod("client"), &url("/hello"), &[]),
        |(code, _)| *code == 200,
    )?;
    let (ok, not_found, unavailable) = (5, 3, 2);
    for (path, n, want) in [
        ("/hello", ok - 1, 200),
        ("/status/404", not_found, 404),
        ("/status/503", unavailable, 503),
    ] {
        for _ in 0..n {
            let (code, body) = curl(m.pod("client"), &url(path), &[])?;
            ensure!(code == want, "{path}: {code} {body}\n{}", m.diagnostics());
        }
    }

    // Client side: the source reporter, one sample per request.
    let client = scrape(&m, "client")?;
    let out = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", CLIENT_ID),
        ("source_app", "client"),
        ("source_version", "v1"),
        ("destination_service", SERVER_HOST),
        ("destination_service_name", "server"),
        ("destination_service_namespace", "default"),
        // From the server's metadata exchange headers on the response.
        ("destination_workload", "server"),
        ("destination_app", "server"),
        ("destination_principal", SERVER_ID),
        ("request_protocol", "http"),
    ];
    let with = |base: &[(&'static str, &'static str)], extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    for (code, n) in [("200", ok), ("404", not_found), ("503", unavailable)] {
        let got = sample(
            &client,
            "istio_requests_total",
            &with(&out, &[("response_code", code)]),
        );
        ensure!(
            got == n,
            "client: {got} requests with {code}, expected {n}\n{client}"
        );
    }
    let total = ok + not_found + unavailable;
    let durations = sample(
        &client,
        "istio_request_duration_milliseconds_count",
        &[("reporter", "source")],
    );
    ensure!(
        durations == total,
        "client: duration count {durations}, expected {total}\n{client}"
    );
    let sizes = sample(
        &client,
        "istio_response_bytes_count",
        &[("reporter", "source")],
    );
    ensure!(
        sizes == total,
        "client: response size count {sizes}, expected {total}\n{client}"
    );
    ensure!(
        client.contains("# TYPE istio_request_duration_milliseconds histogram\n")
            && client.contains("# TYPE istio_requests_total counter\n"),
        "{client}"
    );

    // Server side: the destination reporter, over mTLS, naming the client
    // by its certificate and its metadata exchange.
    let server = scrape(&m, "server")?;
    let inb = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", CLIENT_ID),
        ("source_app", "client"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", SERVER_ID),
        ("destination_app", "server"),
        // From the inbound cluster's `istio.services` metadata (the
        // request's Host is the service's address).
        ("destination_service", SERVER_HOST),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (code, n) in [("200", ok), ("404", not_found)] {
        let got = sample(
            &server,
            "istio_requests_total",
            &with(&inb, &[("response_code", code)]),
        );
        ensure!(
            got == n,
            "server: {got} requests with {code}, expected {n}\n{server}"
        );
    }
    // A 503 may be retried by the client's sidecar (Istio's default
    // retry policy): the server sees each attempt.
    let unavail = sample(
        &server,
        "istio_requests_total",
        &with(&inb, &[("response_code", "503")]),
    );
    ensure!(
        unavail >= unavailable,
        "server: {unavail} requests with 503, expected at least {unavailable}\n{server}"
    );
    let srv_requests = sample(
        &server,
        "istio_requests_total",
        &[("reporter", "destination")],
    );
    let srv_durations = sample(
        &server,
        "istio_request_duration_milliseconds_count",
        &[("reporter", "destination")],
    );
    ensure!(
        srv_durations == srv_requests,
        "server: duration count {srv_durations} != requests {srv_requests}\n{server}"
    );
    // The admin port serves the same text, and the configuration dump
    // still renders with Istio's filter in it.
    for (path, needle) in [
        ("/stats/prometheus", "istio_requests_total{"),
        ("/config_dump", "istio.stats"),
    ] {
        let (code, body) = curl(
            m.pod("server"),
            &format!("http://127.0.0.1:15000{path}"),
            &[],
        )?;
        ensure!(
            code == 200 && body.contains(needle),
            "admin {path}: {code} {}",
            &body[..body.len().min(500)]
        );
    }
    // The metadata exchange headers do not reach the application.
    let (_, body) = curl(m.pod("client"), &url("/hello"), &[])?;
    ensure!(
        !body.to_ascii_lowercase().contains("x-envoy-peer-metadata"),
        "the app saw the metadata exchange: {body}"
    );

    // TCP: connections and bytes on both sides.
    let line = "ping-through-the-mesh";
    let (_, got) = m.until(
        "the TCP echo never answered",
        Duration::from_secs(20),
        || Ok(((), tcp_exchange(m.pod("client"), ECHO_VIP, 9000, line)?)),
        |(_, got)| got.contains(line),
    )?;
    ensure!(got.contains(line));
    // The server's workload labels reach the client, and the client's the
    // server, through Istio's TCP metadata exchange (`istio-peer-exchange`).
    let tcp_out = [
        ("reporter", "source"),
        ("source_principal", CLIENT_ID),
        ("destination_service", ECHO_HOST),
        ("request_protocol", "tcp"),
        ("destination_workload", "echo"),
        ("destination_workload_namespace", "default"),
        ("destination_app", "echo"),
        ("destination_version", "v2"),
    ];
    let tcp_in = [
        ("reporter", "destination"),
        ("source_principal", CLIENT_ID),
        ("source_workload", "client"),
        ("source_app", "client"),
        ("source_version", "v1"),
        ("source_workload_namespace", "default"),
        ("destination_workload", "echo"),
        ("destination_version", "v2"),
        // The inbound cluster's `istio.services` metadata names it.
        ("destination_service", ECHO_HOST),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (pod, labels) in [("client", &tcp_out[..]), ("echo", &tcp_in[..])] {
        let text = m.until(
            &format!("{pod}: the TCP connection was never reported closed"),
            Duration::from_secs(10),
            || scrape(&m, pod),
            |t| sample(t, "istio_tcp_connections_closed_total", labels) >= 1,
        )?;
        let opened = sample(&text, "istio_tcp_connections_opened_total", labels);
        let sent = sample(&text, "istio_tcp_sent_bytes_total", labels);
        let received = sample(&text, "istio_tcp_received_bytes_total", labels);
        // The exchange is one line each way (with its newline).
        let n = line.len() as u64 + 1;
        ensure!(
            opened >= 1 && sent >= n && received >= n,
            "{pod}: opened {opened}, sent {sent}, received {received}\n{text}"
        );
    }
    Ok(())
}
