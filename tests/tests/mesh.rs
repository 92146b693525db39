//! Two pods, each a network namespace with `ferry iptables` rules and a Ferry
//! sidecar running as uid 1337, the way Istio runs them: a client in one pod
//! talks to real apps in the other, and every byte crosses both sidecars
//! (client outbound 15001 → server inbound 15006). Each case proves the
//! passage with both sidecars' counters.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, Mesh, Pod, Proc, ferry_bin};
use ferry_tests::proxy::apps_dir;

const HTTP: u16 = 8080;
const WS: u16 = 8081;
const GRPC: u16 = 9090;
const TCP: u16 = 9000;
/// Declared nowhere: reaches the server through both passthrough paths.
const BANNER: u16 = 3306;

fn hcm(stat_prefix: &str, cluster: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat_prefix}
          upgrade_configs: [{{upgrade_type: websocket}}]
          route_config:
            name: {stat_prefix}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: "{cluster}", timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
    )
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "{stat_prefix}"
          cluster: "{cluster}""#
    )
}

/// `protocol`: "h1", "h2" or "downstream".
fn cluster(name: &str, addr: &str, port: u16, protocol: &str) -> String {
    let opts = match protocol {
        "h2" => "explicit_http_config: {http2_protocol_options: {}}",
        "downstream" => "use_downstream_protocol_config: {}",
        _ => "explicit_http_config: {http_protocol_options: {}}",
    };
    format!(
        r#"
  - name: "{name}"
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        {opts}
    load_assignment:
      cluster_name: "{name}"
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {addr}, port_value: {port}}}}}}}"#
    )
}

/// One per-port outbound listener as istiod shapes it: HTTP if the client
/// speaks HTTP, plain TCP otherwise.
fn outbound_listener(port: u16, cluster_name: &str, http: bool) -> String {
    let stat = format!("outbound_0.0.0.0_{port}");
    let chains = if http {
        format!(
            "
    - filter_chain_match: {{application_protocols: [http/1.0, http/1.1, h2c]}}
      filters:{}
    - filters:{}",
            hcm(&stat, cluster_name),
            tcp_proxy(cluster_name, cluster_name)
        )
    } else {
        format!("\n    - filters:{}", tcp_proxy(cluster_name, cluster_name))
    };
    format!(
        r#"
  - name: 0.0.0.0_{port}
    address: {{socket_address: {{address: 0.0.0.0, port_value: {port}}}}}
    bind_to_port: false
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}}
    filter_chains:{chains}"#
    )
}

/// The sidecar of a pod whose peer is `peer`: outbound listeners for the
/// peer's declared ports, the inbound listener for its own apps.
fn sidecar_config(peer: Ipv4Addr) -> String {
    let mut listeners = format!(
        r#"
  - name: virtualOutbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}
    additional_addresses: [{{address: {{socket_address: {{address: "::", port_value: 15001}}}}}}]
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}
    filter_chains:
    - name: virtualOutbound-catchall-tcp
      filters:{}"#,
        tcp_proxy("PassthroughCluster", "PassthroughCluster")
    );
    for (port, http) in [(HTTP, true), (WS, true), (GRPC, true), (TCP, false)] {
        listeners += &outbound_listener(port, &format!("outbound|{port}||peer"), http);
    }
    let mut inbound_chains = String::new();
    for (port, http) in [(HTTP, true), (WS, true), (GRPC, true), (TCP, false)] {
        let c = format!("inbound|{port}||");
        let filters = if http {
            hcm(&format!("inbound_0.0.0.0_{port}"), &c)
        } else {
            tcp_proxy(&c, &c)
        };
        inbound_chains += &format!(
            "\n    - filter_chain_match: {{destination_port: {port}}}\n      filters:{filters}"
        );
    }
    inbound_chains += &format!(
        "\n    - filter_chain_match: {{application_protocols: [http/1.0, http/1.1, h2c]}}\n      filters:{}\n    - filters:{}",
        hcm("inbound_passthrough", "InboundPassthroughClusterIpv4"),
        tcp_proxy(
            "InboundPassthroughClusterIpv4",
            "InboundPassthroughClusterIpv4"
        )
    );
    listeners += &format!(
        r#"
  - name: virtualInbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}
    additional_addresses: [{{address: {{socket_address: {{address: "::", port_value: 15006}}}}}}]
    listener_filters_timeout: 0s
    continue_on_listener_filters_timeout: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
      filter_disabled: {{destination_port_range: {{start: {BANNER}, end: {banner_end}}}}}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}}
      filter_disabled: {{destination_port_range: {{start: {BANNER}, end: {banner_end}}}}}
    filter_chains:{inbound_chains}"#,
        banner_end = BANNER + 1
    );
    let peer = peer.to_string();
    let mut clusters = String::from(
        r#"
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
  - name: InboundPassthroughClusterIpv4
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    upstream_bind_config: {source_address: {address: 127.0.0.6, port_value: 0}}"#,
    );
    clusters += &cluster(&format!("outbound|{HTTP}||peer"), &peer, HTTP, "downstream");
    clusters += &cluster(&format!("outbound|{WS}||peer"), &peer, WS, "h1");
    clusters += &cluster(&format!("outbound|{GRPC}||peer"), &peer, GRPC, "h2");
    clusters += &cluster(&format!("outbound|{TCP}||peer"), &peer, TCP, "h1");
    clusters += &cluster(&format!("inbound|{HTTP}||"), "127.0.0.1", HTTP, "h1");
    clusters += &cluster(&format!("inbound|{WS}||"), "127.0.0.1", WS, "h1");
    clusters += &cluster(&format!("inbound|{GRPC}||"), "127.0.0.1", GRPC, "h2");
    clusters += &cluster(&format!("inbound|{TCP}||"), "127.0.0.1", TCP, "h1");
    format!(
        "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}\nstatic_resources:\n  listeners:{listeners}\n  clusters:{clusters}\n"
    )
}

/// A pod with its apps, its capture rules and its sidecar.
struct MeshPod {
    pod: Pod,
    sidecar: Proc,
    _apps: Vec<Proc>,
    _config_dir: TempConfig,
}

struct TempConfig(PathBuf);

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn echo(pod: &Pod, args: &[&str]) -> Result<Proc> {
    Ok(pod
        .cmd("python3")
        .arg("-u")
        .arg(apps_dir().join("echo.py"))
        .args(args)
        .env("ECHO_BIND", "0.0.0.0")
        .label(&format!("echo-{}", args[0]))
        .spawn()?)
}

impl MeshPod {
    fn start(pod: Pod, peer: Ipv4Addr) -> Result<MeshPod> {
        let name = pod.name().to_string();
        let apps = vec![
            echo(&pod, &["http", &HTTP.to_string(), &name])?,
            echo(&pod, &["ws", &WS.to_string()])?,
            echo(&pod, &["grpc", &GRPC.to_string()])?,
            echo(&pod, &["tcp", &TCP.to_string()])?,
            echo(&pod, &["banner", &BANNER.to_string()])?,
        ];
        for port in [HTTP, WS, GRPC, TCP, BANNER] {
            pod.wait_port(port, Duration::from_secs(15))?;
        }
        let out = pod.cmd(ferry_bin()).args(["iptables", "--ipv6"]).output()?;
        ensure!(
            out.status.success(),
            "ferry iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The sidecar runs as uid 1337 and must read its configuration.
        let dir = std::env::temp_dir().join(format!("ferry-mesh-{}", pod.ns_name()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let config = dir.join("bootstrap.yaml");
        std::fs::write(&config, sidecar_config(peer))?;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))?;
        let sidecar = pod
            .cmd(ferry_bin())
            .args([
                "sidecar",
                "--concurrency",
                "1",
                "--drain-timeout",
                "10s",
                "--config",
            ])
            .arg(&config)
            .as_uid(1337)
            .label("sidecar")
            .spawn()?;
        let mp = MeshPod {
            pod,
            sidecar,
            _apps: apps,
            _config_dir: TempConfig(dir),
        };
        mp.wait_ready()?;
        Ok(mp)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self
                .pod
                .cmd("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:15021/healthz/ready",
                ])
                .output()?;
            if String::from_utf8_lossy(&out.stdout) == "200" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "sidecar of {} not ready: {}",
                    self.pod.name(),
                    self.sidecar.logs().stderr
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let text = self
            .pod
            .cmd("curl")
            .args(["-s", "http://127.0.0.1:15000/stats"])
            .run()?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect())
    }

    fn stat(&self, name: &str) -> u64 {
        self.stats()
            .ok()
            .and_then(|s| s.get(name).copied())
            .unwrap_or(0)
    }
}

/// A client pod and a server pod, each with its sidecar.
fn two_pods() -> Result<Option<(Mesh, MeshPod, MeshPod)>> {
    if !netns::require_root() {
        return Ok(None);
    }
    let mesh = Mesh::new()?;
    let client = mesh.pod("client")?;
    let server = mesh.pod("server")?;
    let (cip, sip) = (client.ip(), server.ip());
    let server = MeshPod::start(server, cip)?;
    let client = MeshPod::start(client, sip)?;
    Ok(Some((mesh, client, server)))
}

fn curl(pod: &MeshPod, args: &[&str]) -> Result<String> {
    let out = pod
        .pod
        .cmd("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "curl {args:?} failed: {}\nclient sidecar: {}",
        String::from_utf8_lossy(&out.stderr),
        pod.sidecar.logs().stderr
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn http_versions_cross_both_sidecars() -> Result<()> {
    let Some((_mesh, client, server)) = two_pods()? else {
        return Ok(());
    };
    let url = format!("http://{}:{HTTP}/hello", server.pod.ip());

    let body = curl(&client, &[&url])?;
    let v: serde_json::Value = serde_json::from_str(&body).context(body.clone())?;
    assert_eq!(v["name"], "server", "{body}");
    let headers: Vec<String> = v["headers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h[0].as_str().map(str::to_ascii_lowercase))
                .collect()
        })
        .unwrap_or_default();
    assert!(headers.iter().any(|h| h == "x-request-id"), "{body}");
    assert!(headers.iter().any(|h| h == "x-forwarded-proto"), "{body}");

    // As Envoy on istiod's configuration (no `HTTP10` node metadata, so no
    // `accept_http_10`): HTTP/1.0 is refused with 426.
    let head = curl(&client, &["--http1.0", "-i", &url])?;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");

    let h2 = curl(
        &client,
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            &url,
        ],
    )?;
    assert_eq!(h2, "200 2");

    // Keep-alive: several requests on one client connection.
    let mut args = vec!["-w", "%{http_code}\n"];
    for _ in 0..4 {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    let many = curl(&client, &args)?;
    assert_eq!(many.lines().filter(|l| *l == "200").count(), 4, "{many}");

    let out = client.stat("http.outbound_0.0.0.0_8080.downstream_rq_total");
    let inb = server.stat("http.inbound_0.0.0.0_8080.downstream_rq_total");
    assert_eq!(out, 7, "client sidecar saw {out} outbound requests");
    // The HTTP/1.0 request went no further than the client's sidecar.
    assert_eq!(inb, 6, "server sidecar saw {inb} inbound requests");
    assert_eq!(
        client.stat("http.outbound_0.0.0.0_8080.downstream_rq_http2_total"),
        1
    );
    Ok(())
}

#[test]
fn grpc_and_websocket_cross_both_sidecars() -> Result<()> {
    let Some((_mesh, client, server)) = two_pods()? else {
        return Ok(());
    };
    let clients = apps_dir().join("clients.py");
    let grpc = client
        .pod
        .cmd("python3")
        .arg(&clients)
        .args(["grpc", &format!("{}:{GRPC}", server.pod.ip())])
        .timeout(Duration::from_secs(30))
        .run()?;
    let v: serde_json::Value = serde_json::from_str(grpc.trim()).context(grpc.clone())?;
    assert_eq!(v["unary"]["code"], "OK", "{grpc}");
    assert_eq!(v["unary"]["reply"], "hello through ferry");
    assert_eq!(v["unary"]["trailers"]["x-echo-trailer"], "done", "{grpc}");
    assert_eq!(v["stream"]["code"], "OK");
    assert_eq!(v["stream"]["messages"].as_array().map(Vec::len), Some(5));
    assert!(client.stat("http.outbound_0.0.0.0_9090.downstream_rq_http2_total") >= 2);
    assert!(server.stat("http.inbound_0.0.0.0_9090.downstream_rq_http2_total") >= 2);

    let ws = client
        .pod
        .cmd("python3")
        .arg(&clients)
        .args(["ws", &format!("ws://{}:{WS}/echo", server.pod.ip())])
        .timeout(Duration::from_secs(30))
        .run()?;
    let v: serde_json::Value = serde_json::from_str(ws.trim()).context(ws.clone())?;
    assert_eq!(v["text"], "hello through ferry", "{ws}");
    assert_eq!(v["binary_ok"], true, "{ws}");
    assert_eq!(
        client.stat("http.outbound_0.0.0.0_8081.downstream_rq_total"),
        1
    );
    assert_eq!(
        server.stat("http.inbound_0.0.0.0_8081.downstream_rq_total"),
        1
    );
    Ok(())
}

#[test]
fn tcp_half_close_and_server_first_protocol() -> Result<()> {
    let Some((_mesh, client, server)) = two_pods()? else {
        return Ok(());
    };
    let sip = server.pod.ip();
    // The client sends, then half-closes; the echo answers and says "bye"
    // only after it saw the FIN, which proves the FIN crossed both sidecars
    // while the return path stayed open.
    let script = format!(
        "import socket,time\ns=socket.create_connection(('{sip}',{TCP}),timeout=10)\ns.sendall(b'ping\\n')\ns.shutdown(socket.SHUT_WR)\ndata=b''\nwhile True:\n  b=s.recv(65536)\n  if not b: break\n  data+=b\nprint(data.decode(),end='')\n"
    );
    let out = client
        .pod
        .cmd("python3")
        .args(["-c", &script])
        .timeout(Duration::from_secs(20))
        .run()?;
    assert_eq!(out, "ping\nbye\n");
    assert_eq!(
        client.stat(&format!("tcp.outbound|{TCP}||peer.downstream_cx_total")),
        1
    );
    assert_eq!(
        server.stat(&format!("tcp.inbound|{TCP}||.downstream_cx_total")),
        1
    );

    // A server-first protocol (MySQL's port): the client says nothing until
    // the banner arrives. istiod turns the inspectors off for a port
    // declared TCP, so nothing waits for the client; on a port where they
    // run, the connection would wait for it, as Envoy's does.
    let script = format!(
        "import socket,time\nt=time.monotonic()\ns=socket.create_connection(('{sip}',{BANNER}),timeout=10)\nb=s.recv(100)\nprint(int((time.monotonic()-t)*1000), b.decode().strip())\n"
    );
    let out = client
        .pod
        .cmd("python3")
        .args(["-c", &script])
        .timeout(Duration::from_secs(20))
        .run()?;
    let (ms, banner) = out.trim().split_once(' ').context(out.clone())?;
    assert_eq!(banner, "220 ferry-test ready");
    let ms: u64 = ms.parse()?;
    assert!(ms < 500, "the banner took {ms} ms");
    assert_eq!(client.stat("tcp.PassthroughCluster.downstream_cx_total"), 1);
    assert_eq!(
        server.stat("tcp.InboundPassthroughClusterIpv4.downstream_cx_total"),
        1
    );
    Ok(())
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn one_gib_upload_streams_with_flat_memory() -> Result<()> {
    let Some((_mesh, client, server)) = two_pods()? else {
        return Ok(());
    };
    let url = format!("http://{}:{HTTP}/upload", server.pod.ip());
    let script = format!(
        "head -c 1073741824 /dev/zero | curl -sS --max-time 300 -H 'Transfer-Encoding: chunked' -T - {url}"
    );
    let out = client
        .pod
        .cmd("sh")
        .args(["-c", &script])
        .timeout(Duration::from_secs(320))
        .run()?;
    let v: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    assert_eq!(v["body_len"], 1_073_741_824u64, "{out}");
    for (who, p) in [("client", &client), ("server", &server)] {
        let kib = peak_rss_kib(p.sidecar.pid());
        assert!(
            kib > 0 && kib < 64 * 1024,
            "{who} sidecar peaked at {kib} KiB"
        );
    }
    Ok(())
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() -> Result<()> {
    let Some((_mesh, client, server)) = two_pods()? else {
        return Ok(());
    };
    let url = format!("http://{}:{HTTP}/sleep/1500", server.pod.ip());
    let request = client
        .pod
        .cmd("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
            &url,
        ])
        .label("slow-request")
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.stat("http.outbound_0.0.0.0_8080.downstream_rq_active") == 0 {
        ensure!(
            Instant::now() < deadline,
            "the request never reached the client sidecar"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    client.sidecar.signal(libc::SIGTERM)?;
    let mut request = request;
    let status = request.wait_timeout(Duration::from_secs(20))?;
    assert!(status.success());
    assert_eq!(request.logs().stdout, "200");
    let mut sidecar = client.sidecar;
    let exit = sidecar.wait_timeout(Duration::from_secs(15))?;
    assert!(exit.success(), "sidecar exit: {exit}");
    assert!(sidecar.logs().stderr.contains("draining"));
    Ok(())
}

#[test]
fn ipv6_capture_reads_the_original_destination() -> Result<()> {
    let Some((_mesh, client, server)) = two_pods()? else {
        return Ok(());
    };
    // No listener serves the IPv6 destination: the client sidecar passes the
    // connection through to the original destination, where the server
    // sidecar's inbound capture takes it by destination port.
    let url = format!("http://[{}]:{HTTP}/v6", server.pod.ip6());
    let body = curl(&client, &["-g", &url])?;
    let v: serde_json::Value = serde_json::from_str(&body).context(body.clone())?;
    assert_eq!(v["name"], "server", "{body}");
    assert_eq!(v["path"], "/v6");
    assert_eq!(client.stat("tcp.PassthroughCluster.downstream_cx_total"), 1);
    assert_eq!(
        server.stat("http.inbound_0.0.0.0_8080.downstream_rq_total"),
        1
    );
    Ok(())
}
