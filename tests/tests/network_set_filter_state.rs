//! `envoy.filters.network.set_filter_state` and `%FILTER_STATE%`, Ferry
//! against Envoy 1.40 on one bootstrap, in the shape of Istio's waypoint
//! (`main_internal`'s direct-to-pod chains): a socket listener's network
//! `set_filter_state` sets the `original_dst` destination from the address
//! the client dialled (shared ONCE) and the caller's address as a string
//! (shared TRANSITIVE), and its `tcp_proxy` opens an internal connection to
//! `inner`. There the `original_dst` filter restores the destination, RBAC
//! allows only the caller named in the filter state, and a second network
//! `set_filter_state` re-shares the destination it came with
//! (`%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%`,
//! ONCE, as the waypoint does) for the next internal hop, `inner2`, whose
//! `tcp_proxy` reaches the destination through an ORIGINAL_DST cluster and
//! logs what the filter state holds. A second socket listener sets the same
//! objects before a connection manager, whose router's connections to
//! `inner` carry them (the waypoint's `direct-http` chain). Which backend
//! answers, what is logged, and who is refused must be the same through
//! both proxies.
//!
//! Envoy comes from `ferry_tests::envoy`; without it only Ferry's half runs
//! (with a note), except under `CI=true`, where a missing Envoy fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::istiod_hbone::internal_listener_extension;
use ferry_tests::proxy::{Bootstrap, Ferry, RunLock, TempDir, free_port};
use serde_json::{Value, json};

/// The two backends: the same port on two addresses, each answering with
/// its name.
const BACKEND_A: [u8; 4] = [127, 0, 18, 1];
const BACKEND_B: [u8; 4] = [127, 0, 18, 2];
/// The caller RBAC allows, and one it does not.
const CALLER: [u8; 4] = [127, 0, 0, 1];
const STRANGER: [u8; 4] = [127, 0, 0, 5];
const ORIGINAL_DST_LOCAL: &str = "envoy.filters.listener.original_dst.local_ip";

/// A backend on each address, one port: each connection's bytes come back
/// behind the backend's name, then the end.
fn backends() -> Result<u16> {
    for _ in 0..20 {
        let a = TcpListener::bind(SocketAddr::from((BACKEND_A, 0)))?;
        let port = a.local_addr()?.port();
        let Ok(b) = TcpListener::bind(SocketAddr::from((BACKEND_B, port))) else {
            continue;
        };
        for (name, l) in [("A", a), ("B", b)] {
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(mut s) = s else { return };
                    std::thread::spawn(move || {
                        let mut got = Vec::new();
                        let mut buf = [0u8; 1024];
                        // An HTTP request (the connection manager's chain) is
                        // answered by name; other bytes come back behind it.
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            got.extend_from_slice(&buf[..n]);
                            if got.starts_with(b"GET ") && got.ends_with(b"\r\n\r\n") {
                                let _ = write!(
                                    s,
                                    "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n{name}"
                                );
                                return;
                            }
                        }
                        let _ = write!(s, "{name}:{}", String::from_utf8_lossy(&got));
                    });
                }
            });
        }
        return Ok(port);
    }
    bail!("no port free on both backend addresses")
}

fn typed(ty: &str, body: Value) -> Value {
    let mut v = body;
    v["@type"] = json!(format!("type.googleapis.com/{ty}"));
    v
}

fn filter(name: &str, ty: &str, body: Value) -> Value {
    json!({"name": name, "typed_config": typed(ty, body)})
}

fn set_filter_state(values: Vec<Value>) -> Value {
    filter(
        "envoy.filters.network.set_filter_state",
        "envoy.extensions.filters.network.set_filter_state.v3.Config",
        json!({"on_new_connection": values}),
    )
}

fn value(key: &str, factory: Option<&str>, format: &str, shared: &str) -> Value {
    let mut v = json!({
        "object_key": key,
        "format_string": {"text_format_source": {"inline_string": format}},
        "shared_with_upstream": shared,
    });
    if let Some(f) = factory {
        v["factory_key"] = json!(f);
    }
    v
}

fn tcp_proxy(cluster: &str, log: Option<(&Path, &str)>) -> Value {
    let mut body = json!({"stat_prefix": cluster, "cluster": cluster});
    if let Some((path, format)) = log {
        body["access_log"] = json!([filter(
            "envoy.access_loggers.file",
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            json!({"path": path.display().to_string(),
                "log_format": {"text_format_source": {"inline_string": format}}}),
        )]);
    }
    filter(
        "envoy.filters.network.tcp_proxy",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        body,
    )
}

fn original_dst_filter() -> Value {
    filter(
        "envoy.filters.listener.original_dst",
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
        json!({}),
    )
}

/// A cluster whose one endpoint is the internal listener `listener`, as
/// istiod writes `main_internal`'s.
fn internal_cluster(listener: &str) -> Value {
    json!({
        "name": listener,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": listener, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"envoy_internal_address": {"server_listener_name": listener}}}}]}]},
        "transport_socket": {"name": "internal_upstream", "typed_config": typed(
            "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            json!({"transport_socket": {"name": "raw_buffer", "typed_config": typed(
                "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer", json!({}))}}),
        )},
    })
}

/// What `inner2` logs of each connection: its restored destination, the
/// objects PLAIN and TYPED, one cut short, one absent.
const INNER2_LOG: &str = "%DOWNSTREAM_LOCAL_ADDRESS% \
    %FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)% \
    %FILTER_STATE(envoy.filters.listener.original_dst.local_ip)% \
    %FILTER_STATE(test.caller:PLAIN)% %FILTER_STATE(test.caller:TYPED)% \
    %FILTER_STATE(test.caller:PLAIN):5% %FILTER_STATE(test.absent:PLAIN)%\n";
/// What the connection manager logs of each request: the connection's
/// objects, which the request's filter state starts as.
const WEB_LOG: &str = "%REQ(:PATH)% %RESPONSE_CODE% \
    %FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)% %FILTER_STATE(test.caller)%\n";
/// What the socket listener logs: the objects it set itself.
const OUTER_LOG: &str = "%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)% \
    %FILTER_STATE(test.caller)%\n";

fn config(dir: &Path, port: u16, web_port: u16, backend_port: u16) -> Value {
    let caller = Ipv4Addr::from(CALLER).to_string();
    let outer = json!({
        "name": "outer",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [
            set_filter_state(vec![
                value(ORIGINAL_DST_LOCAL, None,
                    &format!("%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%:{backend_port}"), "ONCE"),
                value("test.caller", Some("envoy.string"),
                    "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "TRANSITIVE"),
            ]),
            tcp_proxy("inner", Some((&dir.join("outer.log"), OUTER_LOG))),
        ]}],
    });
    // The same objects before a connection manager, whose router's
    // connections to `inner` carry them.
    let web = json!({
        "name": "web",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": web_port}},
        "filter_chains": [{"filters": [
            set_filter_state(vec![
                value(ORIGINAL_DST_LOCAL, None,
                    &format!("%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%:{backend_port}"), "ONCE"),
                value("test.caller", Some("envoy.string"),
                    "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "TRANSITIVE"),
            ]),
            filter("envoy.filters.network.http_connection_manager",
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                json!({
                    "stat_prefix": "web",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inner"}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": typed(
                        "envoy.extensions.filters.http.router.v3.Router", json!({}))}],
                    "access_log": [filter("envoy.access_loggers.file",
                        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        json!({"path": dir.join("web.log").display().to_string(),
                            "log_format": {"text_format_source": {"inline_string": WEB_LOG}}}))],
                })),
        ]}],
    });
    let inner = json!({
        "name": "inner",
        "internal_listener": {},
        "listener_filters": [original_dst_filter()],
        "filter_chains": [{"filters": [
            filter("envoy.filters.network.rbac", "envoy.extensions.filters.network.rbac.v3.RBAC",
                json!({"stat_prefix": "inner.", "rules": {"policies": {"caller": {
                    "permissions": [{"any": true}],
                    "principals": [{"filter_state": {"key": "test.caller",
                        "string_match": {"exact": caller}}}],
                }}}})),
            // The waypoint's `connect_authority`: the destination it came
            // with, shared once more.
            set_filter_state(vec![value(ORIGINAL_DST_LOCAL, None,
                "%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%", "ONCE")]),
            tcp_proxy("inner2", None),
        ]}],
    });
    let inner2 = json!({
        "name": "inner2",
        "internal_listener": {},
        "listener_filters": [original_dst_filter()],
        "filter_chains": [{"filters": [
            tcp_proxy("original_dst", Some((&dir.join("inner2.log"), INNER2_LOG))),
        ]}],
    });
    let doc = Bootstrap::new()
        .listener(outer)
        .listener(web)
        .listener(inner)
        .listener(inner2)
        .cluster(internal_cluster("inner"))
        .cluster(internal_cluster("inner2"))
        .cluster(json!({
            "name": "original_dst",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "2s",
        }))
        .render();
    let mut doc: Value = serde_json::from_str(&doc).unwrap_or(Value::Null);
    doc["bootstrap_extensions"] = internal_listener_extension();
    doc
}

/// Sends `payload` from `from` to `to`, ends the sending side unless told
/// to keep it open, and reads everything that comes back.
fn exchange(from: [u8; 4], to: SocketAddr, payload: &str, end: bool) -> Result<String> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((from, 0)).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(payload.as_bytes())?;
    if end {
        s.shutdown(std::net::Shutdown::Write)?;
    }
    let mut got = Vec::new();
    // A refused connection may be reset rather than ended.
    let _ = s.read_to_end(&mut got);
    Ok(String::from_utf8_lossy(&got).into_owned())
}

fn call(from: [u8; 4], to: SocketAddr, payload: &str) -> Result<String> {
    exchange(from, to, payload, true)
}

/// The lines of `path` for connections to the backends' addresses, once
/// it has `n` of them, sorted (access logs are written when connections
/// close, by a writer of their own, so in no order the calls decide).
/// Envoy's start-up probe (a connection to 127.0.0.1) is left out.
fn lines(path: &Path, n: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut got: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("127.0.18.") || l.starts_with('/'))
            .map(str::to_string)
            .collect();
        if got.len() >= n {
            got.sort();
            return Ok(got);
        }
        if Instant::now() >= deadline {
            bail!(
                "{} has {} lines, not {n}: {text:?}",
                path.display(),
                got.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one proxy did: the answers to the allowed caller (dialling either
/// backend's address, by TCP and by HTTP), the logs of those calls, and the
/// stranger's answer.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    answers: Vec<String>,
    web_answers: Vec<String>,
    outer_log: Vec<String>,
    web_log: Vec<String>,
    inner2_log: Vec<String>,
    stranger: String,
}

/// An HTTP/1.1 GET of `path` from the caller to `to`: the answer's status
/// line and body.
fn get(to: SocketAddr, path: &str) -> Result<String> {
    // An HTTP client keeps its side open until the answer has come.
    let answer = exchange(
        CALLER,
        to,
        &format!("GET {path} HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n"),
        false,
    )?;
    let status = answer.lines().next().unwrap_or_default().to_string();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(format!("{status} {body}"))
}

fn observe(dir: &Path, port: u16, web_port: u16) -> Result<Observed> {
    let answers = vec![
        call(CALLER, SocketAddr::from((BACKEND_A, port)), "one")?,
        call(CALLER, SocketAddr::from((BACKEND_B, port)), "two")?,
    ];
    let web_answers = vec![
        get(SocketAddr::from((BACKEND_A, web_port)), "/a")?,
        get(SocketAddr::from((BACKEND_B, web_port)), "/b")?,
        get(SocketAddr::from((BACKEND_A, web_port)), "/a2")?,
    ];
    let outer_log = lines(&dir.join("outer.log"), 2)?;
    let web_log = lines(&dir.join("web.log"), 3)?;
    let inner2_log = lines(&dir.join("inner2.log"), 5)?;
    // Last: what a refused connection logs is no part of the comparison.
    let stranger = call(STRANGER, SocketAddr::from((BACKEND_A, port)), "three")?;
    Ok(Observed {
        answers,
        web_answers,
        outer_log,
        web_log,
        inner2_log,
        stranger,
    })
}

#[test]
fn network_set_filter_state_steers_and_logs_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let backend_port = backends()?;
    let a = SocketAddr::from((BACKEND_A, backend_port));
    let b = SocketAddr::from((BACKEND_B, backend_port));
    let run_dir = |tag: &str| TempDir::new(&format!("net-sfs-{tag}"));

    let dir = run_dir("ferry")?;
    let (port, web_port) = (free_port(), free_port());
    let cfg = config(dir.path(), port, web_port, backend_port);
    let ferry = Ferry::start(&cfg.to_string())?;
    let got = observe(dir.path(), port, web_port)
        .with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    drop(ferry);
    assert_eq!(
        got.answers,
        ["A:one", "B:two"],
        "the dialled address, carried over two internal hops, picks the backend"
    );
    assert_eq!(
        got.outer_log,
        [format!("{a} \"127.0.0.1\""), format!("{b} \"127.0.0.1\"")]
    );
    let inner2 = |dst: SocketAddr| format!("{dst} {dst} - 127.0.0.1 \"127.0.0.1\" 127.0 -");
    assert_eq!(
        got.web_answers,
        [
            "HTTP/1.1 200 OK A",
            "HTTP/1.1 200 OK B",
            "HTTP/1.1 200 OK A"
        ],
        "the router's connections to the internal listener carry the connection's objects"
    );
    assert_eq!(
        got.web_log,
        [
            format!("/a 200 {a} \"127.0.0.1\""),
            format!("/a2 200 {a} \"127.0.0.1\""),
            format!("/b 200 {b} \"127.0.0.1\""),
        ]
    );
    assert_eq!(
        got.inner2_log,
        [inner2(a), inner2(a), inner2(a), inner2(b), inner2(b)]
    );
    assert_eq!(
        got.stranger, "",
        "RBAC on the filter state refuses the stranger"
    );

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let dir = run_dir("envoy")?;
    let (port, web_port) = (free_port(), free_port());
    let cfg = config(dir.path(), port, web_port, backend_port);
    // Envoy writes its files every 10 s by default.
    let envoy = Envoy::start_with(&bin, &cfg, port, &["--file-flush-interval-msec", "50"])?;
    let e = observe(dir.path(), port, web_port)
        .with_context(|| format!("through envoy:\n{}", envoy.log()))?;
    assert_eq!(got, e, "Ferry and Envoy differ");
    Ok(())
}
