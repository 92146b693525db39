//! `pipe` (Unix socket) endpoints of STATIC clusters, as istio-agent's
//! bootstrap uses them: a TCP proxy and an HTTP route reach backends that
//! listen on a Unix socket file and on an abstract socket (`@name`), through
//! Ferry and through Envoy 1.40 fed the same bootstrap; both must carry the
//! same traffic to the same servers. The backends are real Unix-socket
//! servers in this process.
//!
//! Envoy comes from `ferry_tests::envoy`; without it only Ferry's half runs
//! (with a note), except under `CI=true`, where a missing Envoy fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    Bootstrap, Ferry, RunLock, TempDir, free_port, http_listener, local, tcp_proxy,
};
use serde_json::{Value, json};

/// Serves each connection of `l` on its own thread: HTTP/1.1 requests get
/// `200` with the body `<name> <path>`; anything else is echoed back.
fn serve(l: UnixListener, name: &'static str) {
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            thread::spawn(move || {
                let Ok(mut w) = conn.try_clone() else { return };
                let mut r = BufReader::new(conn);
                let mut line = String::new();
                while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                    let http = line.ends_with(" HTTP/1.1\r\n");
                    if !http {
                        if w.write_all(line.as_bytes()).is_err() {
                            return;
                        }
                        line.clear();
                        continue;
                    }
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    // The head: skip to the empty line (requests carry no body).
                    loop {
                        let mut h = String::new();
                        if !matches!(r.read_line(&mut h), Ok(n) if n > 0) {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                    }
                    let body = format!("{name} {path}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
}

/// A listener in Linux's abstract namespace.
fn abstract_listener(name: &str) -> Result<UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    Ok(UnixListener::bind_addr(&addr)?)
}

fn pipe_cluster(name: &str, path: &str) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": path}}}}
        ]}]},
    })
}

/// HTTP on `http` to the socket file, TCP on `tcp` to the abstract socket.
fn config(http: u16, tcp: u16, file: &Path, abstract_name: &str) -> Value {
    let routes = vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "file"}})];
    let doc = Bootstrap::new()
        .listener(http_listener("h", http, routes))
        .listener(json!({
            "name": "t",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": tcp}},
            "filter_chains": [{"filters": [tcp_proxy("t", "abstract")]}],
        }))
        .cluster(pipe_cluster("file", &file.display().to_string()))
        .cluster(pipe_cluster("abstract", &format!("@{abstract_name}")))
        .render();
    serde_json::from_str(&doc).unwrap_or(Value::Null)
}

/// What a client sees: the HTTP answer's status line and body, and the echo
/// of a line through the TCP proxy.
fn observe(http: u16, tcp: u16) -> Result<(String, String, String)> {
    let mut s = TcpStream::connect(local(http))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /where HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no response head")?;
    let status = head.lines().next().unwrap_or("").to_string();
    let mut t = TcpStream::connect(local(tcp))?;
    t.set_read_timeout(Some(Duration::from_secs(5)))?;
    t.write_all(b"ping over the abstract socket\n")?;
    let mut echo = String::new();
    BufReader::new(t).read_line(&mut echo)?;
    Ok((status, body.to_string(), echo))
}

#[test]
fn static_cluster_endpoints_on_unix_sockets() -> Result<()> {
    let _lock = RunLock::shared();
    let dir = TempDir::new("pipe")?;
    let file = dir.path().join("backend.sock");
    serve(UnixListener::bind(&file)?, "file-backend");
    let abstract_name = format!("ferry-test-pipe-{}", std::process::id());
    serve(abstract_listener(&abstract_name)?, "abstract-backend");

    let expected = (
        "HTTP/1.1 200 OK".to_string(),
        "file-backend /where".to_string(),
        "ping over the abstract socket\n".to_string(),
    );
    let (http, tcp) = (free_port(), free_port());
    let ferry = Ferry::start(&config(http, tcp, &file, &abstract_name).to_string())?;
    let got = observe(http, tcp).with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    assert_eq!(got, expected, "through ferry");
    let stats = ferry.stats()?;
    assert_eq!(
        stats.get("cluster.file.upstream_cx_total").copied(),
        Some(1),
        "one upstream connection to the socket file"
    );
    drop(ferry);

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let (http, tcp) = (free_port(), free_port());
    let e = Envoy::start(&bin, &config(http, tcp, &file, &abstract_name), http)?;
    let seen = observe(http, tcp).with_context(|| format!("through envoy:\n{}", e.log()))?;
    assert_eq!(
        seen, got,
        "Envoy and Ferry reach the same Unix-socket servers"
    );
    Ok(())
}

/// What Envoy refuses of a pipe, Ferry refuses at start-up with the field's
/// name: a file mode on an abstract socket, a mode beyond 0777, a pipe as a
/// listener's address (Ferry listens on TCP only) and in a DNS cluster.
#[test]
fn pipe_misuse_is_refused_by_name() -> Result<()> {
    let _lock = RunLock::shared();
    let port = free_port();
    let with_cluster = |c: Value| Bootstrap::new().http("h", port, "c").cluster(c).render();
    let mut abstract_mode = pipe_cluster("c", "@ferry-abstract");
    abstract_mode["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
        ["mode"] = json!(0o600);
    let mut big_mode = pipe_cluster("c", "/tmp/x.sock");
    big_mode["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
        ["mode"] = json!(0o1777);
    let mut dns = pipe_cluster("c", "/tmp/x.sock");
    dns["type"] = json!("STRICT_DNS");
    let listener = {
        let mut doc: Value = serde_json::from_str(&with_cluster(pipe_cluster("c", "/tmp/x.sock")))?;
        doc["static_resources"]["listeners"][0]["address"] =
            json!({"pipe": {"path": "/tmp/ferry-listener.sock"}});
        doc.to_string()
    };
    for (what, cfg, field) in [
        ("abstract mode", with_cluster(abstract_mode), "pipe.mode"),
        ("mode > 0777", with_cluster(big_mode), "pipe.mode"),
        ("DNS cluster", with_cluster(dns), "pipe"),
        ("listener", listener, "address.pipe"),
    ] {
        let mut f = Ferry::spawn(&cfg, &[])?;
        let st = f.wait_exit(Duration::from_secs(10))?;
        if st.success() || st.code() != Some(1) {
            bail!("{what}: ferry should exit 1, got {st}:\n{}", f.log());
        }
        let log = f.log();
        assert!(
            log.contains(field),
            "{what}: the refusal names {field}:\n{log}"
        );
    }
    Ok(())
}
