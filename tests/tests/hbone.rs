//! HBONE, the client side: a sidecar fed the exact shapes istiod sends in
//! an ambient mesh (an internal listener `connect_originate` with the
//! original_dst filter and a tunnelling TCP proxy, an ORIGINAL_DST cluster
//! `connect_originate` with port override 15008 over TLS 1.3 / ALPN h2 with
//! a trust-domain SAN prefix, a service cluster whose endpoints are internal
//! addresses with `tunnel: http` metadata and an `internal_upstream`
//! transport socket match) reaches HBONE pods: [`HboneServer`]s speaking
//! ztunnel's server side on two loopback addresses. Each server reports the
//! `:authority` (the pod's IP and target port), the caller's SPIFFE
//! identity and the TLS connection of each CONNECT stream, so pooling (one
//! connection per destination), balancing across the service's endpoints
//! and half-close in both directions are checked from the far end. Envoy
//! 1.40 given the same bootstrap must give the same answers.
//!
//! Envoy comes from `ferry_tests::envoy`; without it only Ferry's half runs
//! (with a note), except under `CI=true`, where a missing Envoy fails.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::hbone::HboneServer;
use ferry_tests::istiod_hbone::{
    connect_originate_cluster, connect_originate_listener, internal_listener_extension,
    service_cluster,
};
use ferry_tests::pki::{Ca, Leaf};
use ferry_tests::proxy::{
    Bootstrap, Ferry, RunLock, TempDir, free_port, http_request, local, tcp_proxy,
};
use serde_json::{Value, json};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

/// The whole sidecar: an outbound TCP listener on `port` to the service.
fn config(dir: &Path, port: u16, hbone_port: u16, pods: &[SocketAddr]) -> Value {
    let service = "outbound|8080||echo.default.svc.cluster.local";
    let doc = Bootstrap::new()
        .listener(json!({
            "name": "outbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [tcp_proxy("outbound", service)]}],
        }))
        .listener(connect_originate_listener())
        .cluster(service_cluster(service, pods))
        .cluster(connect_originate_cluster(dir, hbone_port))
        .render();
    let mut doc: Value = serde_json::from_str(&doc).unwrap_or(Value::Null);
    doc["bootstrap_extensions"] = internal_listener_extension();
    doc
}

/// One TCP exchange through the proxy: `line` sent, the sending side
/// closed, everything read until the far end closes.
fn exchange(port: u16, line: &str) -> Result<String> {
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(line.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut got = String::new();
    s.read_to_string(&mut got)?;
    Ok(got)
}

struct Mesh {
    dir: TempDir,
    ca: Ca,
}

impl Mesh {
    fn new() -> Result<Mesh> {
        let dir = TempDir::new("hbone")?;
        let ca = Ca::new("mesh root")?;
        let client = ca.leaf(CLIENT_ID, &[])?;
        std::fs::write(dir.path().join("cert.pem"), &client.cert_pem)?;
        std::fs::write(dir.path().join("key.pem"), &client.key_pem)?;
        std::fs::write(dir.path().join("root.pem"), ca.pem())?;
        Ok(Mesh { dir, ca })
    }

    fn pod(&self, ip: [u8; 4], port: u16, identity: &str) -> Result<HboneServer> {
        let leaf: Leaf = self.ca.leaf(identity, &[])?;
        HboneServer::start(SocketAddr::from((ip, port)), &self.ca.pem(), &leaf)
    }
}

/// What a client sees of four connections to the service, in order.
fn observe(port: u16) -> Result<Vec<String>> {
    (0..4)
        .map(|i| exchange(port, &format!("ping {i}\nand more\n")))
        .collect()
}

/// Round robin over the two pods (starting with either), each answer from
/// the pod tunnelled to, echoed to the end.
fn check_round_robin(proxy: &str, got: &[String], pods: &[SocketAddr; 2]) {
    let first = usize::from(!got[0].starts_with(&format!("hbone {} ", pods[0])));
    for (i, answer) in got.iter().enumerate() {
        let pod = pods[(i + first) % 2];
        assert_eq!(
            answer,
            &format!("hbone {pod} from {CLIENT_ID}\nping {i}\nand more\n"),
            "{proxy}, connection {i}: tunnelled to {pod}, echoed to the end"
        );
    }
}

#[test]
fn sidecar_reaches_hbone_pods_through_connect_originate() -> Result<()> {
    let _lock = RunLock::shared();
    let mesh = Mesh::new()?;
    let hbone_port = free_port();
    let server_id = "spiffe://cluster.local/ns/default/sa/echo";
    let a = mesh.pod([127, 0, 14, 1], hbone_port, server_id)?;
    let b = mesh.pod([127, 0, 14, 2], hbone_port, server_id)?;
    let pods: [SocketAddr; 2] = ["127.0.14.1:8080".parse()?, "127.0.14.2:8080".parse()?];
    let port = free_port();
    let ferry = Ferry::start(&config(mesh.dir.path(), port, hbone_port, &pods).to_string())?;
    let got = observe(port).with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    check_round_robin("ferry", &got, &pods);
    // Round robin over the two pods; on each, one pooled TLS connection
    // carries both CONNECT streams.
    for (server, pod) in [(&a, pods[0]), (&b, pods[1])] {
        let seen = server.seen();
        assert_eq!(seen.len(), 2, "{pod}: {seen:?}");
        assert!(
            seen.iter().all(|s| s.connection == 1
                && s.status == 200
                && s.authority == pod.to_string()
                && s.peer == CLIENT_ID),
            "{pod}: {seen:?}"
        );
    }
    let stats = ferry.stats()?;
    assert_eq!(
        stats
            .get("cluster.connect_originate.upstream_cx_total")
            .copied(),
        Some(2),
        "one HBONE connection per pod:\n{stats:?}"
    );
    drop(ferry);

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let port = free_port();
    let e = Envoy::start(
        &bin,
        &config(mesh.dir.path(), port, hbone_port, &pods),
        port,
    )?;
    let seen = observe(port).with_context(|| format!("through envoy:\n{}", e.log()))?;
    check_round_robin("envoy", &seen, &pods);
    // Envoy, too, pools one connection per pod (each server's second; the
    // start-up probe of Envoy's port may add a stream).
    for (server, pod) in [(&a, pods[0]), (&b, pods[1])] {
        let seen = server.seen();
        assert!(seen.len() >= 4, "{pod}: {seen:?}");
        assert!(
            seen[2..]
                .iter()
                .all(|s| s.connection == 2 && s.status == 200),
            "{pod}: {seen:?}"
        );
    }
    Ok(())
}

/// A pod whose certificate is of another trust domain fails the SAN
/// prefix check: no CONNECT reaches it, and the client's connection closes
/// without an answer.
#[test]
fn hbone_peer_of_another_trust_domain_is_refused() -> Result<()> {
    let _lock = RunLock::shared();
    let mesh = Mesh::new()?;
    let hbone_port = free_port();
    let pod = mesh.pod(
        [127, 0, 14, 3],
        hbone_port,
        "spiffe://evil.example/ns/default/sa/echo",
    )?;
    let pods: [SocketAddr; 1] = ["127.0.14.3:8080".parse()?];
    let port = free_port();
    let ferry = Ferry::start(&config(mesh.dir.path(), port, hbone_port, &pods).to_string())?;
    let got = exchange(port, "ping\n").unwrap_or_default();
    assert_eq!(got, "", "nothing comes back:\n{}", ferry.log());
    assert!(pod.seen().is_empty(), "{:?}", pod.seen());
    let stats = ferry.stats()?;
    let failed = |k: &str| stats.get(k).copied().unwrap_or_default();
    assert!(
        failed("cluster.connect_originate.ssl.connection_error") > 0,
        "the handshake failed:\n{stats:?}"
    );
    Ok(())
}

/// Holds `n` tunnels open at once through the sidecar on `port`: each
/// sends a line and reads the pod's greeting and echo, and stays open
/// until all are answered. Returns the connections (to drop them).
fn hold_tunnels(port: u16, n: usize, pod: SocketAddr) -> Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(local(port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let line = format!("tunnel {i}\n");
        s.write_all(line.as_bytes())?;
        let want = format!("hbone {pod} from {CLIENT_ID}\n{line}");
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got)
            .with_context(|| format!("tunnel {i} of {n}: no greeting and echo"))?;
        assert_eq!(String::from_utf8_lossy(&got), want, "tunnel {i}");
        held.push(s);
    }
    Ok(held)
}

/// A pod allowing 10 streams per connection (the peer's
/// SETTINGS_MAX_CONCURRENT_STREAMS) while 25 tunnels to it are open at
/// once: the sidecar opens more HBONE connections rather than queueing the
/// streams past the limit, so every tunnel is answered, no connection ever
/// carries more than 10, in Ferry as in Envoy. Ferry opens no more
/// connections than it needs (three); Envoy may open one more while its
/// first is still connecting.
#[test]
fn tunnels_beyond_the_peers_stream_limit_open_more_connections() -> Result<()> {
    let _lock = RunLock::shared();
    let mesh = Mesh::new()?;
    let hbone_port = free_port();
    let leaf = mesh
        .ca
        .leaf("spiffe://cluster.local/ns/default/sa/echo", &[])?;
    let pod: SocketAddr = "127.0.14.4:8080".parse()?;
    let check = |proxy: &str, seen: &[ferry_tests::hbone::Seen], log: String| {
        let mut per: std::collections::BTreeMap<u64, usize> = Default::default();
        for s in seen {
            assert_eq!(
                (s.status, s.authority.as_str()),
                (200, "127.0.14.4:8080"),
                "{proxy}: {s:?}"
            );
            *per.entry(s.connection).or_default() += 1;
        }
        assert_eq!(
            seen.len(),
            25,
            "{proxy}: every tunnel reached the pod once: {seen:?}\n{log}"
        );
        assert!(
            per.values().all(|&n| n <= 10),
            "{proxy}: streams per connection {per:?}\n{log}"
        );
        assert!(per.len() >= 3, "{proxy}: connections used {per:?}\n{log}");
    };

    let server = HboneServer::start_with_streams(
        SocketAddr::from(([127, 0, 14, 4], hbone_port)),
        &mesh.ca.pem(),
        &leaf,
        10,
    )?;
    let port = free_port();
    let ferry = Ferry::start(&config(mesh.dir.path(), port, hbone_port, &[pod]).to_string())?;
    let held =
        hold_tunnels(port, 25, pod).with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    check("ferry", &server.seen(), ferry.log());
    let stats = ferry.stats()?;
    assert_eq!(
        stats
            .get("cluster.connect_originate.upstream_cx_total")
            .copied(),
        Some(3),
        "{stats:?}"
    );
    drop((held, ferry));

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    // The same pod for Envoy (a second server could not bind the port
    // until the first had let go of it); its streams so far are Ferry's.
    let port = free_port();
    let ferry_streams = server.seen().len();
    let e = Envoy::start(
        &bin,
        &config(mesh.dir.path(), port, hbone_port, &[pod]),
        port,
    )?;
    // The start-up probe of Envoy's port makes a tunnel of its own (closed
    // at once): let it arrive, and leave it out.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while server.seen().len() == ferry_streams && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = server.seen().len();
    let held =
        hold_tunnels(port, 25, pod).with_context(|| format!("through envoy:\n{}", e.log()))?;
    check("envoy", &server.seen()[before..], e.log());
    drop(held);
    Ok(())
}

/// Starts a proxy with this configuration, the listener's port given; the
/// proxy stops when what it returns is dropped.
type Start<'a> = dyn Fn(&Value, u16) -> Result<Box<dyn std::any::Any>> + 'a;

/// The addresses the access log prints around an internal connection.
/// The outbound listener goes first through `hop`, an internal listener
/// without `original_dst` (endpoint id `hop-1`), whose TCP proxy takes the
/// service cluster: there the local address is the internal address itself
/// (`envoy://hop/hop-1`, which has no IP and no port) and the remote one
/// Envoy's placeholder `envoy://internal_client_address/`. The upstream
/// host of a connection to an internal listener is its internal address
/// (`envoy://connect_originate/<endpoint id>`) and its upstream local
/// address the placeholder; on `connect_originate`, the placeholder is the
/// downstream remote address and the destination the `original_dst`
/// filter restored is the local one. Ferry must print what Envoy 1.40
/// prints.
#[test]
fn access_log_addresses_of_the_internal_connection_are_envoys() -> Result<()> {
    let _lock = RunLock::shared();
    let mesh = Mesh::new()?;
    let hbone_port = free_port();
    let _a = mesh.pod(
        [127, 0, 14, 3],
        hbone_port,
        "spiffe://cluster.local/ns/default/sa/echo",
    )?;
    let pods: [SocketAddr; 1] = ["127.0.14.3:8080".parse()?];
    let log = |name: &str, path: &Path| {
        let format = format!(
            "{name} remote=%DOWNSTREAM_REMOTE_ADDRESS% remote_ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% \
             remote_port=%DOWNSTREAM_REMOTE_PORT% local=%DOWNSTREAM_LOCAL_ADDRESS% \
             local_ip=%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% local_port=%DOWNSTREAM_LOCAL_PORT% \
             upstream_host=%UPSTREAM_HOST% upstream_local=%UPSTREAM_LOCAL_ADDRESS% \
             upstream_remote=%UPSTREAM_REMOTE_ADDRESS% cluster=%UPSTREAM_CLUSTER%\n"
        );
        json!([{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path.display().to_string(),
            "log_format": {"text_format_source": {"inline_string": format}}}}])
    };
    let run = |start: &Start| -> Result<Vec<String>> {
        let port = free_port();
        let path = mesh.dir.path().join(format!("access-{port}.log"));
        let mut cfg = with_hop(config(mesh.dir.path(), port, hbone_port, &pods));
        for l in cfg["static_resources"]["listeners"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            let name = l["name"].as_str().unwrap_or_default().to_string();
            l["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = log(&name, &path);
        }
        let proxy = start(&cfg, port)?;
        let got = exchange(port, "ping\n")?;
        anyhow::ensure!(got.starts_with("hbone "), "{got}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut lines: Vec<String> = text
                .lines()
                // The outbound listener's client port is the test's.
                .map(|l| {
                    l.split(' ')
                        .map(|f| match f.split_once('=') {
                            Some(("remote" | "remote_port" | "local" | "local_port", _))
                                if l.starts_with("outbound ") =>
                            {
                                format!("{}=<client>", f.split('=').next().unwrap_or(""))
                            }
                            Some(("upstream_local", v))
                                if l.starts_with("connect_originate ") && v.starts_with("127.") =>
                            {
                                "upstream_local=<socket>".to_string()
                            }
                            _ => f.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            lines.sort();
            // Envoy's start-up probe of its port makes a connection too.
            lines.dedup();
            if lines.len() >= 3 || std::time::Instant::now() > deadline {
                drop(proxy);
                return Ok(lines);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let ferry = run(&|cfg, _| Ok(Box::new(Ferry::start(&cfg.to_string())?)))?;
    assert!(
        ferry
            .iter()
            .any(|l| l.contains("remote=envoy://internal_client_address/")),
        "{ferry:#?}"
    );
    assert!(
        ferry.iter().any(|l| l.starts_with("hop ")
            && l.contains(" local=envoy://hop/hop-1 local_ip=envoy://hop/hop-1 local_port= ")),
        "{ferry:#?}"
    );
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let envoy = run(&|cfg, port| Ok(Box::new(Envoy::start(&bin, cfg, port)?)))?;
    assert_eq!(ferry, envoy);
    Ok(())
}

/// The counters of one proxy after a run (0 for a counter it does not
/// have), and its `/clusters` host lines.
struct Counted {
    stats: BTreeMap<String, u64>,
    clusters: String,
}

impl Counted {
    fn read(admin: u16) -> Result<Counted> {
        let (_, body) = http_request(local(admin), "GET", "/stats")?;
        let stats = body
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.trim().to_string(), v.trim().parse().ok()?))
            })
            .collect();
        let (_, clusters) = http_request(local(admin), "GET", "/clusters")?;
        Ok(Counted { stats, clusters })
    }

    fn stat(&self, name: &str) -> u64 {
        self.stats.get(name).copied().unwrap_or_default()
    }

    /// A host's counter on `/clusters` (`cluster::host::name::value`).
    fn host(&self, cluster: &str, host: &str, name: &str) -> Option<u64> {
        let prefix = format!("{cluster}::{host}::{name}::");
        self.clusters
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }
}

const SERVICE: &str = "outbound|8080||echo.default.svc.cluster.local";

/// The counters compared: the `connect_originate` cluster, whose HTTP/2
/// pool carries the tunnels, the service cluster, whose TCP pool carries
/// the internal connections to `connect_originate`, and both TCP proxies.
fn compared() -> Vec<String> {
    let mut names = Vec::new();
    for cluster in ["connect_originate", SERVICE] {
        for n in [
            "upstream_cx_total",
            "upstream_cx_active",
            "upstream_rq_total",
            "upstream_rq_pending_total",
            "upstream_rq_active",
            // Envoy's TCP proxy charges no response code to the cluster for
            // a CONNECT answered 200 (its router does, for requests).
            "upstream_rq_2xx",
            "upstream_rq_4xx",
            "upstream_rq_5xx",
        ] {
            names.push(format!("cluster.{cluster}.{n}"));
        }
    }
    names.push("cluster.connect_originate.upstream_cx_http2_total".into());
    names.push("cluster.connect_originate.upstream_cx_http1_total".into());
    names.push("cluster.connect_originate.ssl.handshake".into());
    for prefix in ["outbound", "connect_originate"] {
        for n in [
            "downstream_cx_total",
            "downstream_cx_rx_bytes_total",
            "downstream_cx_tx_bytes_total",
        ] {
            names.push(format!("tcp.{prefix}.{n}"));
        }
    }
    names
}

/// A listener for `Envoy::start` to wait on (it connects to the port it
/// waits for): an outbound listener probed would make a tunnel.
fn probe_listener(port: u16) -> Value {
    json!({
        "name": "probe",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.direct_response", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config"}}]}],
    })
}

/// The sum of a Prometheus metric's samples whose labels contain all of
/// `labels`, and the label sets seen.
fn prometheus(text: &str, name: &str, labels: &[&str]) -> (u64, Vec<String>) {
    let mut sum = 0;
    let mut sets = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((set, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        if labels.iter().all(|l| set.contains(l)) {
            sum += value.trim().parse::<u64>().unwrap_or_default();
            sets.push(set.to_string());
        }
    }
    (sum, sets)
}

/// Sequential calls, then tunnels held open at once, through one proxy:
/// the gauges while the tunnels are open, then the counters once every
/// tunnel has ended.
fn tunnelled_calls(
    port: u16,
    admin: u16,
    pod: SocketAddr,
    held: usize,
) -> Result<(Counted, Counted)> {
    for i in 0..3 {
        let got = exchange(port, &format!("ping {i}\n"))?;
        anyhow::ensure!(got.starts_with(&format!("hbone {pod} ")), "{got}");
    }
    let open = hold_tunnels(port, held, pod)?;
    let during = Counted::read(admin)?;
    drop(open);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let after = Counted::read(admin)?;
        let settled = after.stat("cluster.connect_originate.upstream_rq_active") == 0
            && after.stat(&format!("cluster.{SERVICE}.upstream_rq_active")) == 0
            && after.stat("tcp.outbound.downstream_cx_total") == 3 + held as u64;
        if settled || std::time::Instant::now() > deadline {
            // The last byte counts land as the connections end.
            std::thread::sleep(Duration::from_millis(200));
            return Ok((during, Counted::read(admin)?));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tunnelled call is counted as Envoy 1.40 counts what istiod's
/// `connect_originate` does: each CONNECT stream is a request of the
/// `connect_originate` cluster (`upstream_rq_total`, pending while its
/// HTTP/2 connection is being opened, active while the tunnel lives, the
/// endpoint's `rq_total`, but no response-code counters and no
/// `rq_success`/`rq_error`: those are the router's), and each internal
/// connection a request of the service cluster's TCP pool; the TCP
/// proxies count the same connections and bytes. Istio's TCP metrics of
/// the outbound chain (`istio.stats`, which Envoy 1.40 does not have:
/// istio-proxy builds it from the downstream connection's byte meter)
/// match Envoy's TCP proxy counters of that chain.
#[test]
fn tunnel_streams_are_counted_as_envoy_counts_them() -> Result<()> {
    let _lock = RunLock::shared();
    let mesh = Mesh::new()?;
    let hbone_port = free_port();
    let _pod = mesh.pod(
        [127, 0, 14, 6],
        hbone_port,
        "spiffe://cluster.local/ns/default/sa/echo",
    )?;
    let pod: SocketAddr = "127.0.14.6:8080".parse()?;
    let host = format!("127.0.14.6:{hbone_port}");
    let internal = format!("envoy://connect_originate/{pod}");
    let held = 2;

    let port = free_port();
    let mut cfg = config(mesh.dir.path(), port, hbone_port, &[pod]);
    // istio.stats before the TCP proxy of the outbound chain, as istiod
    // puts it (Ferry only: Envoy 1.40 refuses it).
    let filters = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"];
    if let Some(f) = filters.as_array_mut() {
        f.insert(
            0,
            json!({"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}}),
        );
    }
    let ferry = Ferry::start(&cfg.to_string())?;
    let (ferry_during, ferry_after) = tunnelled_calls(port, ferry.admin_port(), pod, held)
        .with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    let (_, text) = http_request(local(ferry.admin_port()), "GET", "/stats/prometheus")?;
    drop(ferry);

    // What Ferry counts on its own, against what the calls were.
    let calls = 3 + held as u64;
    for (name, want) in [
        ("cluster.connect_originate.upstream_rq_total", calls),
        ("cluster.connect_originate.upstream_rq_pending_total", 1),
        ("cluster.connect_originate.upstream_cx_http2_total", 1),
        (&format!("cluster.{SERVICE}.upstream_rq_total"), calls),
        (
            &format!("cluster.{SERVICE}.upstream_rq_pending_total"),
            calls,
        ),
    ] {
        assert_eq!(ferry_after.stat(name), want, "ferry: {name}");
    }
    for cluster in ["connect_originate", SERVICE] {
        let name = format!("cluster.{cluster}.upstream_rq_active");
        assert_eq!(
            ferry_during.stat(&name),
            held as u64,
            "ferry, tunnels open: {name}"
        );
    }
    // One pooled HTTP/2 connection to the pod; one internal connection per
    // tunnel open.
    assert_eq!(
        ferry_during.stat("cluster.connect_originate.upstream_cx_active"),
        1
    );
    assert_eq!(
        ferry_during.stat(&format!("cluster.{SERVICE}.upstream_cx_active")),
        held as u64
    );
    assert_eq!(
        ferry_after.host("connect_originate", &host, "rq_total"),
        Some(calls)
    );
    assert_eq!(
        ferry_during.host("connect_originate", &host, "rq_active"),
        Some(held as u64),
        "ferry, tunnels open"
    );
    assert_eq!(
        ferry_after.host(SERVICE, &internal, "rq_total"),
        Some(calls)
    );

    // Istio's TCP metrics of the outbound chain: every call opened and
    // closed, its bytes as the TCP proxy counted them.
    let labels = [
        "reporter=\"source\"",
        "destination_service=\"echo.default.svc.cluster.local\"",
        "request_protocol=\"tcp\"",
    ];
    let istio = |name: &str| prometheus(&text, name, &labels);
    let (opened, sets) = istio("istio_tcp_connections_opened_total");
    assert_eq!(opened, calls, "{sets:?}\n{text}");
    assert_eq!(
        istio("istio_tcp_connections_closed_total").0,
        calls,
        "{text}"
    );
    let (sent, _) = istio("istio_tcp_sent_bytes_total");
    let (received, _) = istio("istio_tcp_received_bytes_total");
    assert_eq!(
        sent,
        ferry_after.stat("tcp.outbound.downstream_cx_tx_bytes_total")
    );
    assert_eq!(
        received,
        ferry_after.stat("tcp.outbound.downstream_cx_rx_bytes_total")
    );
    // One series: the internal connection carries no TLS, so istio-proxy
    // knows neither the destination's principal nor the security policy
    // on this chain (its client side reads both from the upstream TLS).
    assert!(
        sets.len() == 1
            && sets[0].contains("destination_principal=\"unknown\"")
            && sets[0].contains("connection_security_policy=\"unknown\"")
            && sets[0].contains("response_flags=\"-\""),
        "{sets:#?}"
    );

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    // Envoy::start connects to the port it waits for: a listener of its
    // own, so that no probe makes a tunnel.
    let port = free_port();
    let probe = free_port();
    let mut cfg = config(mesh.dir.path(), port, hbone_port, &[pod]);
    if let Some(l) = cfg["static_resources"]["listeners"].as_array_mut() {
        l.push(probe_listener(probe));
    }
    let e = Envoy::start(&bin, &cfg, probe)?;
    let (envoy_during, envoy_after) = tunnelled_calls(port, e.admin(), pod, held)
        .with_context(|| format!("through envoy:\n{}", e.log()))?;

    let pick = |c: &Counted| -> BTreeMap<String, u64> {
        compared()
            .into_iter()
            .map(|n| {
                let v = c.stat(&n);
                (n, v)
            })
            .collect()
    };
    assert_eq!(
        pick(&ferry_after),
        pick(&envoy_after),
        "after the calls: ferry, then envoy"
    );
    eprintln!("counted alike: {:#?}", pick(&envoy_after));
    for cluster in ["connect_originate", SERVICE] {
        for gauge in ["upstream_rq_active", "upstream_cx_active"] {
            let name = format!("cluster.{cluster}.{gauge}");
            assert_eq!(
                ferry_during.stat(&name),
                envoy_during.stat(&name),
                "tunnels open: {name}"
            );
        }
    }
    for (cluster, host) in [
        ("connect_originate", host.as_str()),
        (SERVICE, internal.as_str()),
    ] {
        for stat in ["rq_active", "cx_active"] {
            assert_eq!(
                ferry_during.host(cluster, host, stat),
                envoy_during.host(cluster, host, stat),
                "tunnels open, {cluster}::{host}::{stat}:\n{}\n{}",
                ferry_during.clusters,
                envoy_during.clusters
            );
        }
        for stat in ["rq_total", "rq_success", "rq_error"] {
            assert_eq!(
                ferry_after.host(cluster, host, stat),
                envoy_after.host(cluster, host, stat),
                "{cluster}::{host}::{stat}:\n{}\n{}",
                ferry_after.clusters,
                envoy_after.clusters
            );
        }
    }
    // Istio's counters against Envoy's TCP proxy on the outbound chain.
    assert_eq!(opened, envoy_after.stat("tcp.outbound.downstream_cx_total"));
    assert_eq!(
        sent,
        envoy_after.stat("tcp.outbound.downstream_cx_tx_bytes_total")
    );
    assert_eq!(
        received,
        envoy_after.stat("tcp.outbound.downstream_cx_rx_bytes_total")
    );
    Ok(())
}

/// A CONNECT the pod refuses (400: the authority is not an address of the
/// pod, which the endpoint's `waypoint` metadata sends the tunnel to) is
/// still a request of `connect_originate` and its endpoint, counted alike
/// by Ferry and Envoy 1.40: neither an error of the endpoint nor a
/// response code of the cluster, the call failing as a connect failure.
#[test]
fn a_refused_tunnel_is_counted_as_envoy_counts_it() -> Result<()> {
    let _lock = RunLock::shared();
    let mesh = Mesh::new()?;
    let hbone_port = free_port();
    let pod = mesh.pod(
        [127, 0, 14, 7],
        hbone_port,
        "spiffe://cluster.local/ns/default/sa/echo",
    )?;
    let elsewhere: SocketAddr = "127.0.14.8:8080".parse()?;
    let host = format!("127.0.14.7:{hbone_port}");
    let cfg = |port: u16| {
        let mut cfg = config(mesh.dir.path(), port, hbone_port, &[elsewhere]);
        cfg["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
            [0]["metadata"]["filter_metadata"]["envoy.filters.listener.original_dst"]["waypoint"] =
            json!(format!("127.0.14.7:{hbone_port}"));
        cfg
    };
    let run = |port: u16, admin: u16| -> Result<Counted> {
        let got = exchange(port, "ping\n").unwrap_or_default();
        anyhow::ensure!(got.is_empty(), "a refused tunnel answers nothing: {got}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let c = Counted::read(admin)?;
            if (c.stat("tcp.outbound.downstream_cx_total") == 1
                && c.stat(&format!("cluster.{SERVICE}.upstream_rq_active")) == 0)
                || std::time::Instant::now() > deadline
            {
                std::thread::sleep(Duration::from_millis(200));
                return Counted::read(admin);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let port = free_port();
    let ferry = Ferry::start(&cfg(port).to_string())?;
    let ferry_after = run(port, ferry.admin_port())
        .with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    drop(ferry);
    let seen = pod.seen();
    assert!(
        seen.len() == 1 && seen[0].status == 400 && seen[0].authority == elsewhere.to_string(),
        "the pod refused the tunnel: {seen:?}"
    );
    assert_eq!(
        ferry_after.stat("cluster.connect_originate.upstream_rq_total"),
        1
    );
    assert_eq!(
        ferry_after.host("connect_originate", &host, "rq_total"),
        Some(1)
    );
    assert_eq!(
        ferry_after.host("connect_originate", &host, "rq_error"),
        Some(0)
    );

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let port = free_port();
    let probe = free_port();
    let mut c = cfg(port);
    if let Some(l) = c["static_resources"]["listeners"].as_array_mut() {
        l.push(probe_listener(probe));
    }
    let e = Envoy::start(&bin, &c, probe)?;
    let envoy_after =
        run(port, e.admin()).with_context(|| format!("through envoy:\n{}", e.log()))?;
    assert!(
        pod.seen()[1..].iter().all(|s| s.status == 400),
        "{:?}",
        pod.seen()
    );
    let pick = |c: &Counted| -> BTreeMap<String, u64> {
        compared()
            .into_iter()
            // The bytes of a refused call are the client's only.
            .filter(|n| !n.starts_with("tcp.connect_originate.downstream_cx_tx"))
            .map(|n| {
                let v = c.stat(&n);
                (n, v)
            })
            .collect()
    };
    assert_eq!(pick(&ferry_after), pick(&envoy_after), "ferry, then envoy");
    for stat in ["rq_total", "rq_success", "rq_error"] {
        assert_eq!(
            ferry_after.host("connect_originate", &host, stat),
            envoy_after.host("connect_originate", &host, stat),
            "{stat}:\n{}\n{}",
            ferry_after.clusters,
            envoy_after.clusters
        );
    }
    Ok(())
}

/// `cfg` with the outbound listener's TCP proxy sent through `hop`, an
/// internal listener with no listener filter (nothing restores a
/// destination there), reached at endpoint id `hop-1`, whose TCP proxy
/// takes the service cluster the outbound listener took.
fn with_hop(mut cfg: Value) -> Value {
    let proxy = "/filter_chains/0/filters/0/typed_config";
    let Some(listeners) = cfg["static_resources"]["listeners"].as_array_mut() else {
        return cfg;
    };
    let Some(outbound) = listeners.iter_mut().find(|l| l["name"] == "outbound") else {
        return cfg;
    };
    let Some(service) = outbound.pointer_mut(proxy).map(|p| p["cluster"].take()) else {
        return cfg;
    };
    if let Some(p) = outbound.pointer_mut(proxy) {
        p["cluster"] = json!("hop");
    }
    listeners.push(json!({
        "name": "hop",
        "internal_listener": {},
        "filter_chains": [{"filters": [tcp_proxy("hop", service.as_str().unwrap_or_default())]}],
    }));
    if let Some(clusters) = cfg["static_resources"]["clusters"].as_array_mut() {
        clusters.push(json!({
            "name": "hop",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {"cluster_name": "hop", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"envoy_internal_address": {"server_listener_name": "hop", "endpoint_id": "hop-1"}}}}]}]},
        }));
    }
    cfg
}
