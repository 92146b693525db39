//! A listener's `filter_chain_matcher` (the unified matcher istiod puts in
//! waypoint and newer listeners) chooses the same filter chain in Ferry as in
//! Envoy 1.40: destination port map, prefix map (longest first, falling back to a
//! shorter prefix), `xds.type.matcher.v3.IPMatcher` ranges
//! (longest first, `exclusive`, fallback when a nested matcher fails), server
//! name, ALPN and transport protocol from the TLS inspector, HTTP/1.1 from the
//! HTTP inspector, a matcher list with `and`/`not` predicates,
//! `on_no_match`, the default chain, and an action naming a chain the
//! listener lacks (the connection is closed).
//!
//! Every chain is a `tcp_proxy` to its own backend, which writes its name
//! and closes, so the client reads which chain took its connection. The
//! listener binds `0.0.0.0` on six ports (`additional_addresses`) and the
//! client connects to different loopback addresses to vary the destination.
//!
//! Envoy comes from `ferry_tests::envoy`; without it Ferry's half still runs
//! (against the expected chains) and the comparison is skipped with a note,
//! except under `CI=true`, where a missing Envoy fails the test.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{Bootstrap, Ferry, RunLock, Upstream, free_port, static_cluster};
use serde_json::{Value, json};

/// The chains of the listener (each a `tcp_proxy` to the backend of the
/// same name); `default` is the `default_filter_chain`.
const CHAINS: &[&str] = &[
    "alpn",
    "http11",
    "pfx-sni",
    "pfx16",
    "ip32",
    "sni-a",
    "excl",
    "wide",
    "sni-x",
    "port1",
    "tls",
    "top-no-match",
    "default",
];

/// A backend that answers every connection with its name, then closes.
fn backend(name: &'static str) -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                // Half-close after the name and drain what the client sent,
                // so that closing never resets the name away.
                let _ = s.write_all(name.as_bytes());
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            });
        }
    });
    Ok(port)
}

fn input(ty: &str) -> Value {
    json!({"name": ty, "typed_config": {
        "@type": format!("type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.{ty}")}})
}

fn action(chain: &str) -> Value {
    json!({"action": {"name": chain, "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": chain}}})
}

fn exact(input_type: &str, map: Value, on_no_match: Option<Value>) -> Value {
    let mut m =
        json!({"matcher_tree": {"input": input(input_type), "exact_match_map": {"map": map}}});
    if let Some(o) = on_no_match {
        m["on_no_match"] = o;
    }
    json!({"matcher": m})
}

fn range(prefix: &str, len: u32, exclusive: bool, on_match: Value) -> Value {
    json!({"ranges": [{"address_prefix": prefix, "prefix_len": len}],
           "exclusive": exclusive, "on_match": on_match})
}

/// The matcher under test; `ports` are the listener's six ports.
fn matcher(ports: &[u16]) -> Value {
    let ip = json!({"matcher": {"matcher_tree": {
    "input": input("DestinationIPInput"),
    "custom_match": {"name": "ip", "typed_config": {
        "@type": "type.googleapis.com/xds.type.matcher.v3.IPMatcher",
        "range_matchers": [
            range("0.0.0.0", 0, false, action("wide")),
            range("127.0.0.0", 16, true, action("excl")),
            range("127.0.0.0", 24, false,
                exact("ServerNameInput", json!({"a.test": action("sni-a")}), None)),
            range("127.0.0.2", 32, false, action("ip32")),
        ]}}}}});
    let list = json!({"matcher": {"matcher_list": {"matchers": [
        {"predicate": {"single_predicate": {"input": input("ApplicationProtocolInput"),
            "value_match": {"exact": "'h2','http/1.1'"}}},
         "on_match": action("alpn")},
        {"predicate": {"and_matcher": {"predicate": [
            {"single_predicate": {"input": input("ApplicationProtocolInput"),
                "value_match": {"exact": "'http/1.1'"}}},
            {"single_predicate": {"input": input("TransportProtocolInput"),
                "value_match": {"exact": "raw_buffer"}}}]}},
         "on_match": action("http11")},
        {"predicate": {"single_predicate": {"input": input("ServerNameInput"),
            "value_match": {"prefix": "x"}}},
         "on_match": action("sni-x")},
        {"predicate": {"not_matcher": {"single_predicate": {"input": input("SourceIPInput"),
            "value_match": {"exact": "127.0.0.9"}}}},
         "on_match": action("port1")},
    ]}}});
    let mut map = serde_json::Map::new();
    map.insert(ports[0].to_string(), ip);
    map.insert(ports[1].to_string(), list);
    map.insert(
        ports[2].to_string(),
        exact(
            "TransportProtocolInput",
            json!({"tls": action("tls")}),
            None,
        ),
    );
    map.insert(ports[4].to_string(), action("missing"));
    // A prefix map: the longest prefix first; its branch failing, the next.
    map.insert(
        ports[5].to_string(),
        json!({"matcher": {"matcher_tree": {"input": input("DestinationIPInput"),
        "prefix_match_map": {"map": {
            "127.0.0.": exact("ServerNameInput", json!({"p.test": action("pfx-sni")}), None),
            "127.0.": action("pfx16"),
        }}}}}),
    );
    json!({"matcher_tree": {"input": input("DestinationPortInput"), "exact_match_map": {"map": map}},
           "on_no_match": exact("DestinationIPInput", json!({"127.0.0.5": action("top-no-match")}), None)})
}

fn config(ports: &[u16], backends: &[(&str, u16)]) -> String {
    let tcp = |name: &str| {
        json!({"name": name, "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": name, "cluster": name}}]})
    };
    let addr = |p: u16| json!({"socket_address": {"address": "0.0.0.0", "port_value": p}});
    let listener = json!({
        "name": "matched",
        "address": addr(ports[0]),
        "additional_addresses": ports[1..].iter().map(|p| json!({"address": addr(*p)})).collect::<Vec<_>>(),
        "listener_filters": [
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
            {"name": "envoy.filters.listener.http_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}],
        "filter_chains": CHAINS.iter().filter(|c| **c != "default").map(|c| tcp(c)).collect::<Vec<_>>(),
        "default_filter_chain": tcp("default"),
        "filter_chain_matcher": matcher(ports),
    });
    let mut b = Bootstrap::new().listener(listener);
    for (name, port) in backends {
        b = b.cluster(static_cluster(name, &[*port], Upstream::Http1));
    }
    b.render()
}

/// What the client sends first.
#[derive(Clone, Copy)]
enum Hello {
    /// Bytes that are neither TLS nor HTTP.
    Plain,
    /// An HTTP/1.1 request.
    Http,
    /// A TLS ClientHello with this server name and ALPN list.
    Tls(&'static str, &'static [&'static str]),
}

impl Hello {
    fn label(self) -> String {
        match self {
            Hello::Plain => "-".into(),
            Hello::Http => "http/1.1".into(),
            Hello::Tls(sni, alpn) => format!("tls {sni} {alpn:?}"),
        }
    }
}

/// A TLS ClientHello naming `sni` and offering `alpn`.
fn client_hello(sni: &str, alpn: &[&str]) -> Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// Which backend answers a connection to `ip:port` that opens with `hello`;
/// "closed" when none does.
fn which(ip: &str, port: u16, hello: Hello) -> Result<String> {
    let addr = SocketAddr::new(ip.parse::<IpAddr>()?, port);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let first = match hello {
        Hello::Tls(sni, alpn) => client_hello(sni, alpn)?,
        Hello::Http => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        Hello::Plain => b"hello\n".to_vec(),
    };
    // A proxy that closes at once may refuse the write; the read tells.
    let _ = s.write_all(&first);
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if CHAINS.iter().any(|c| got == c.as_bytes()) {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                bail!("{addr}: no answer and no close within 3s (got {got:?})")
            }
            Err(_) => break,
        }
    }
    Ok(if got.is_empty() {
        "closed".to_string()
    } else {
        String::from_utf8_lossy(&got).into_owned()
    })
}

const A: Hello = Hello::Tls("a.test", &[]);
const B: Hello = Hello::Tls("b.test", &[]);
const C: Hello = Hello::Tls("c.test", &[]);
const X1: Hello = Hello::Tls("x1.test", &[]);
const ALPN: Hello = Hello::Tls("y.test", &["h2", "http/1.1"]);
const P: Hello = Hello::Tls("p.test", &[]);
const NONE: Hello = Hello::Plain;

/// The connections tried, as `(destination ip, port index, first bytes)`.
const CASES: &[(&str, usize, Hello)] = &[
    // The /32 range.
    ("127.0.0.2", 0, NONE),
    // The /24 range's server name map.
    ("127.0.0.1", 0, A),
    // The /24 branch fails (no SNI): the exclusive /16 is skipped, /0 takes it.
    ("127.0.0.1", 0, NONE),
    // Another server name: the same fallback.
    ("127.0.0.1", 0, B),
    // Outside the /24, the exclusive /16 is the most specific.
    ("127.0.1.1", 0, NONE),
    // The matcher list: ALPN offered in the ClientHello, HTTP/1.1 detected on
    // plain text, a server name prefix, then a negated source IP.
    ("127.0.0.1", 1, ALPN),
    ("127.0.0.1", 1, Hello::Http),
    ("127.0.0.1", 1, X1),
    ("127.0.0.1", 1, NONE),
    // Transport protocol: TLS, then plain text whose nested map fails and
    // falls back to the port map's on_no_match.
    ("127.0.0.1", 2, C),
    ("127.0.0.5", 2, NONE),
    ("127.0.0.1", 2, NONE),
    // A port the map lacks: on_no_match, then the default chain.
    ("127.0.0.5", 3, NONE),
    ("127.0.0.1", 3, NONE),
    // An action naming a chain the listener lacks.
    ("127.0.0.1", 4, NONE),
    // The prefix map: the longest prefix's server name map, then the shorter prefix.
    ("127.0.0.1", 5, P),
    ("127.0.0.1", 5, NONE),
];

fn observe(ports: &[u16]) -> Result<Vec<String>> {
    CASES
        .iter()
        .map(|(ip, i, hello)| {
            which(ip, ports[*i], *hello).map(|got| format!("{ip}:{i} {} -> {got}", hello.label()))
        })
        .collect()
}

/// The chain each case must reach (asserted of Ferry even where Envoy is missing).
const EXPECTED: &[&str] = &[
    "ip32",
    "sni-a",
    "wide",
    "wide",
    "excl",
    "alpn",
    "http11",
    "sni-x",
    "port1",
    "tls",
    "top-no-match",
    "default",
    "top-no-match",
    "default",
    "closed",
    "pfx-sni",
    "pfx16",
];

/// `filter_chain_matcher` picks the chain Envoy picks for every connection.
#[test]
fn filter_chain_matcher_routes_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let mut backends = Vec::new();
    for c in CHAINS {
        backends.push((*c, backend(c)?));
    }
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let ferry = Ferry::start(&config(&ports, &backends))?;
    let through_ferry = observe(&ports).with_context(|| format!("ferry log:\n{}", ferry.log()))?;
    drop(ferry);
    let chosen: Vec<&str> = through_ferry
        .iter()
        .map(|l| l.rsplit(" -> ").next().unwrap_or_default())
        .collect();
    assert_eq!(chosen, EXPECTED, "{through_ferry:#?}");
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let envoy = Envoy::start(
        &bin,
        &serde_json::from_str(&config(&ports, &backends))?,
        ports[0],
    )?;
    let through_envoy = observe(&ports).with_context(|| format!("envoy log:\n{}", envoy.log()))?;
    drop(envoy);
    assert_eq!(through_ferry, through_envoy);
    Ok(())
}
