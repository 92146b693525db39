//! In-place filter-chain updates on loopback: one listener on three ports
//! (`additional_addresses`), a chain per destination port, pushed over xDS
//! by ferry-pilot's ADS server in this process while connections are open:
//! - a TCP chain that does not change keeps its connections through every
//!   update (one echoes long after the drain deadline of the others);
//! - a TCP chain whose network RBAC alone changes keeps the connection the
//!   new policy still allows and closes, within a second, the one it
//!   denies (clients bind distinct loopback addresses, 127.0.0.2 and .3),
//!   counted in `tcp.rbac.denied` and `listener.l.ferry.rbac_recheck_*`;
//! - an HTTP chain whose route changes: a request in flight finishes (200),
//!   and the next request on a kept-alive connection already runs on the
//!   new route and is answered with `Connection: close`, after which the
//!   connection closes;
//! - a TCP chain whose cluster changes drains: closed at the drain deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::Any;
use ferry_envoy_json::Descriptors;
use ferry_pilot::xds::{CLUSTER, Cache, LISTENER, Server, to_any};
use ferry_tests::proxy::{App, Ferry, free_port};
use serde_json::{Value, json};

const NODE: &str = "sidecar~127.0.0.1~chains.test~test.svc.cluster.local";
const DRAIN: Duration = Duration::from_secs(2);

fn static_cluster(d: &Descriptors, name: &str, port: u16) -> Any {
    let v = json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}});
    to_any(
        &d.from_json::<Cluster>("envoy.config.cluster.v3.Cluster", v)
            .expect("cluster"),
    )
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Value {
    json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": stat_prefix, "cluster": cluster}})
}

/// istiod's shape of a TCP ALLOW policy: network RBAC, stat prefix `tcp.`.
fn allow_from(sources: &[&str]) -> Value {
    let principals: Vec<Value> = sources
        .iter()
        .map(|s| json!({"direct_remote_ip": {"address_prefix": s, "prefix_len": 32}}))
        .collect();
    json!({"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "stat_prefix": "tcp.",
        "rules": {"policies": {"ns[test]-policy[clients]-rule[0]": {
            "permissions": [{"any": true}], "principals": principals}}}}})
}

fn http_chain(version: &str) -> Value {
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "web",
        "route_config": {"name": "web", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"}, "route": {"cluster": "web", "timeout": "10s"},
            "request_headers_to_add": [{"header": {"key": "x-chain-version", "value": version}}]}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}})
}

struct Ports {
    steady: u16,
    guarded: u16,
    web: u16,
}

/// The listener: the steady TCP chain (`steady_cluster`), the guarded TCP
/// chain allowing `allowed`, the HTTP chain at `version`.
fn listener(
    d: &Descriptors,
    p: &Ports,
    steady_cluster: &str,
    allowed: &[&str],
    version: &str,
) -> Any {
    let addr = |port: u16| json!({"socket_address": {"address": "127.0.0.1", "port_value": port}});
    let chain = |port: u16, filters: Vec<Value>| json!({"filter_chain_match": {"destination_port": port}, "filters": filters});
    let v = json!({
        "name": "l",
        "address": addr(p.steady),
        "additional_addresses": [{"address": addr(p.guarded)}, {"address": addr(p.web)}],
        "filter_chains": [
            chain(p.steady, vec![tcp_proxy("steady", steady_cluster)]),
            chain(p.guarded, vec![allow_from(allowed), tcp_proxy("guarded", "echo")]),
            chain(p.web, vec![http_chain(version)]),
        ]
    });
    to_any(
        &d.from_json::<Listener>("envoy.config.listener.v3.Listener", v)
            .expect("listener"),
    )
}

fn bootstrap(xds_port: u16) -> String {
    format!(
        r#"node: {{id: "{NODE}", cluster: chains}}
dynamic_resources:
  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}}}]}}]
"#
    )
}

/// ferry-pilot's ADS server on a free port, in its own runtime.
struct Plane {
    _rt: tokio::runtime::Runtime,
    server: Server,
    port: u16,
}

fn plane(cache: Cache) -> Result<Plane> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let std_listener = StdListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let port = std_listener.local_addr()?.port();
    let server = Server::new(cache);
    let s = server.clone();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        let _ = s.serve(l, std::future::pending()).await;
    });
    Ok(Plane {
        _rt: rt,
        server,
        port,
    })
}

/// A TCP client bound to `source` (a loopback address), talking line by line.
struct Client {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Client {
    fn connect(source: &str, port: u16) -> Result<Self> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let from: SocketAddr = format!("{source}:0").parse()?;
        sock.bind(&from.into())?;
        let to: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        sock.connect_timeout(&to.into(), Duration::from_secs(2))?;
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// Sends a line and reads it back from the echo.
    fn echo(&mut self, line: &str) -> Result<()> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let mut got = String::new();
        self.reader.read_line(&mut got)?;
        ensure!(got.trim_end() == line, "echoed {got:?} for {line:?}");
        Ok(())
    }

    /// Whether the proxy closes the connection within `within` (EOF or a
    /// reset), sending nothing.
    fn closed_within(&mut self, within: Duration) -> Result<bool> {
        self.stream.set_read_timeout(Some(within))?;
        let mut buf = [0u8; 64];
        let closed = match self.reader.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => bail!("unexpected bytes {:?}", &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(_) => true,
        };
        self.stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(closed)
    }
}

/// An HTTP/1.1 keep-alive client on one connection.
struct Http {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

/// A response: status, lower-cased headers, body.
type Answer = (u16, Vec<(String, String)>, String);

impl Http {
    fn connect(port: u16) -> Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    fn send(&mut self, path: &str) -> Result<()> {
        write!(
            self.stream,
            "GET {path} HTTP/1.1\r\nHost: web\r\nUser-Agent: keep-alive-test\r\n\r\n"
        )?;
        Ok(())
    }

    fn read(&mut self) -> Result<Answer> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {line:?}"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .context("a content-length")?;
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    }

    fn get(&mut self, path: &str) -> Result<Answer> {
        self.send(path)?;
        self.read()
    }

    /// Whether the server closed the connection (EOF) within `within`.
    fn closed_within(&mut self, within: Duration) -> Result<bool> {
        self.stream.set_read_timeout(Some(within))?;
        let mut buf = [0u8; 1];
        Ok(match self.reader.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => bail!("bytes after the last answer"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(_) => true,
        })
    }
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The version the route added, as the backend received it.
fn chain_version(a: &Answer) -> Result<String> {
    let echo: Value = serde_json::from_str(&a.2).with_context(|| a.2.clone())?;
    Ok(echo["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| {
            h[0].as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case("x-chain-version"))
        })
        .and_then(|h| h[1].as_str())
        .unwrap_or_default()
        .to_string())
}

fn wait_for(what: &str, ferry: &Ferry, f: impl Fn(&Ferry) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f(ferry) {
        if Instant::now() > deadline {
            bail!("{what}:\n{}", ferry.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn filter_chains_update_in_place() -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let echo = App::mode("tcp")?;
    let web = App::http("web", &[])?;
    let p = Ports {
        steady: free_port(),
        guarded: free_port(),
        web: free_port(),
    };
    let cache = Cache::new();
    cache.set(
        CLUSTER,
        [
            ("echo".to_string(), static_cluster(&d, "echo", echo.port)),
            ("echo2".to_string(), static_cluster(&d, "echo2", echo.port)),
            ("web".to_string(), static_cluster(&d, "web", web.port)),
        ],
    );
    let both = ["127.0.0.2", "127.0.0.3"];
    cache.set(
        LISTENER,
        [("l".to_string(), listener(&d, &p, "echo", &both, "v1"))],
    );
    let plane = plane(cache)?;
    let ferry = Ferry::start_with(
        &bootstrap(plane.port),
        &[
            "--drain-timeout",
            &format!("{}s", DRAIN.as_secs()),
            "--concurrency",
            "1",
        ],
    )?;
    wait_for("the listener never served", &ferry, |f| {
        f.stat("listener_manager.listener_added") >= 1
    })?;

    let mut steady = Client::connect("127.0.0.1", p.steady)?;
    let mut kept = Client::connect("127.0.0.2", p.guarded)?;
    let mut denied = Client::connect("127.0.0.3", p.guarded)?;
    steady.echo("steady 1")?;
    kept.echo("kept 1")?;
    denied.echo("denied 1")?;
    let mut keepalive = Http::connect(p.web)?;
    let first = keepalive.get("/")?;
    ensure!(
        first.0 == 200 && chain_version(&first)? == "v1",
        "{first:?}"
    );
    ensure!(header(&first, "connection") != Some("close"), "{first:?}");
    let mut in_flight = Http::connect(p.web)?;
    in_flight.get("/")?;
    assert_eq!(ferry.stat("tcp.rbac.allowed"), 2);

    // Update 1: the guarded chain's RBAC now allows 127.0.0.2 only, and the
    // HTTP chain's route adds v2. The steady chain is the same message.
    in_flight.send("/sleep/1500")?;
    std::thread::sleep(Duration::from_millis(200));
    plane.server.cache().apply(
        LISTENER,
        [(
            "l".to_string(),
            listener(&d, &p, "echo", &["127.0.0.2"], "v2"),
        )],
        [],
    );
    wait_for("the first update never applied", &ferry, |f| {
        f.stat("listener_manager.listener_in_place_updated") >= 1
    })?;
    assert!(
        denied.closed_within(Duration::from_secs(1))?,
        "the connection the new policy denies stayed open:\n{}",
        ferry.log()
    );
    kept.echo("kept 2")?;
    steady.echo("steady 2")?;
    assert_eq!(ferry.stat("listener.l.ferry.rbac_recheck_closed"), 1);
    assert_eq!(ferry.stat("listener.l.ferry.rbac_recheck_kept"), 1);
    assert_eq!(ferry.stat("tcp.rbac.denied"), 1);
    // The request in flight on the changed HTTP chain finished.
    let slow = in_flight.read()?;
    assert_eq!(slow.0, 200, "{slow:?}");
    // The next request on the kept-alive connection runs on the new chain
    // and is the connection's last.
    let next = keepalive.get("/")?;
    assert_eq!(next.0, 200, "{next:?}");
    assert_eq!(chain_version(&next)?, "v2", "{next:?}");
    assert_eq!(header(&next, "connection"), Some("close"), "{next:?}");
    assert!(keepalive.closed_within(Duration::from_secs(1))?);
    // A new connection is served as v2 and kept alive.
    let mut fresh = Http::connect(p.web)?;
    let answer = fresh.get("/")?;
    assert_eq!(chain_version(&answer)?, "v2");
    assert_ne!(header(&answer, "connection"), Some("close"), "{answer:?}");

    // Update 2: the steady chain's cluster changes: its connection drains
    // (closed at the deadline); the guarded one, unchanged now, stays.
    plane.server.cache().apply(
        LISTENER,
        [(
            "l".to_string(),
            listener(&d, &p, "echo2", &["127.0.0.2"], "v2"),
        )],
        [],
    );
    wait_for("the second update never applied", &ferry, |f| {
        f.stat("listener_manager.listener_in_place_updated") >= 2
    })?;
    let changed_at = Instant::now();
    steady.echo("steady 3")?;
    assert!(
        steady.closed_within(DRAIN + Duration::from_secs(2))?,
        "a connection of a changed TCP chain outlived the drain deadline"
    );
    assert!(
        changed_at.elapsed() >= DRAIN - Duration::from_millis(300),
        "a draining TCP connection was closed before the deadline"
    );
    kept.echo("kept 3")?;
    assert_eq!(ferry.stat("listener.l.ferry.cx_drained_by_update"), 3);
    assert_eq!(ferry.stat("listener.l.ferry.rbac_recheck_closed"), 1);
    drop(plane);
    Ok(())
}
