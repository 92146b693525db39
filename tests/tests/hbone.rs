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
use ferry_tests::proxy::{Bootstrap, Ferry, RunLock, TempDir, free_port, local, tcp_proxy};
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
