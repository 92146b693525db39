//! Hostile clients and hostile backends, run through Ferry and through Envoy 1.40 on the
//! same static bootstrap: request smuggling variants, oversized and numerous headers,
//! slowloris heads and bodies, hundreds of idle connections, HTTP/2 rapid reset,
//! CONTINUATION and other floods, garbage prefaces, and backends that answer with bad
//! framing or stop at every point of a response.
//!
//! Every case asserts that Ferry is at least as strict as Envoy (what Envoy refuses, Ferry
//! refuses; where Envoy closes the connection, Ferry closes it) and never less available
//! (a good request after the attack still succeeds, the backend never sees a smuggled
//! request, a pooled upstream connection is never poisoned). Malformed requests go over
//! raw TCP sockets; good HTTP/2 requests through curl. Nothing is measured by time: a slow
//! client only asserts what it was answered.
//!
//! Envoy comes from `ferry_tests::envoy`; without it a test is skipped with a note, except
//! under `CI=true`, where a missing Envoy fails the test.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, apps_dir, curl, free_port, http_connection_manager,
    http_request, listener, local, static_cluster,
};
use serde_json::{Value, json};

// ------------------------------------------------------------------------------ proxies

/// One of the two proxies under comparison.
enum Proxy {
    Ferry(Ferry),
    Envoy(Envoy),
}

impl Proxy {
    fn name(&self) -> &'static str {
        match self {
            Proxy::Ferry(_) => "ferry",
            Proxy::Envoy(_) => "envoy",
        }
    }

    fn stat(&self, name: &str) -> Result<u64> {
        match self {
            Proxy::Ferry(f) => Ok(f.stat(name)),
            Proxy::Envoy(e) => e.stat(name),
        }
    }

    fn log(&self) -> String {
        match self {
            Proxy::Ferry(f) => f.log(),
            Proxy::Envoy(e) => e.log(),
        }
    }
}

/// The listeners of one proxy run.
#[derive(Debug, Clone, Copy)]
struct Ports {
    /// Envoy's defaults everywhere.
    edge: u16,
    /// Tight limits and timeouts.
    strict: u16,
    /// The options that loosen Envoy's defaults.
    lenient: u16,
    /// Short connection and stream timers.
    timers: u16,
    /// A short `max_connection_duration`.
    aging: u16,
    /// An `idle_timeout` longer than the second after which Ferry parks
    /// an idle HTTP/1 connection.
    idling: u16,
}

/// The backends every proxy run shares.
struct Backends {
    echo: App,
    bad: BadBackend,
}

impl Backends {
    fn start() -> Result<Self> {
        Ok(Self {
            echo: App::http("echo", &[])?,
            bad: BadBackend::start()?,
        })
    }
}

/// `tests/apps/badhttp.py`, killed on drop.
struct BadBackend {
    child: std::process::Child,
    port: u16,
}

impl BadBackend {
    fn start() -> Result<Self> {
        let port = free_port();
        let child = std::process::Command::new("python3")
            .arg(apps_dir().join("badhttp.py"))
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("spawning badhttp.py")?;
        let me = Self { child, port };
        for _ in 0..1000 {
            if TcpStream::connect(local(port)).is_ok() {
                return Ok(me);
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("badhttp.py did not listen on {port}")
    }
}

impl Drop for BadBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn routes() -> Vec<Value> {
    vec![
        json!({"match": {"prefix": "/case/"}, "route": {"cluster": "bad", "timeout": "0s"}}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "echo", "timeout": "0s"}}),
    ]
}

/// A connection manager named `name` with `extra` fields merged in.
fn hcm(name: &str, extra: Value) -> Value {
    let mut h = http_connection_manager(name, routes());
    if let (Some(tc), Some(e)) = (h["typed_config"].as_object_mut(), extra.as_object()) {
        tc.extend(e.clone());
    }
    h
}

fn bootstrap(p: &Ports, b: &Backends) -> String {
    let strict = json!({
        "request_headers_timeout": "1s",
        "request_timeout": "2s",
        "max_request_headers_kb": 4,
        "common_http_protocol_options": {
            "max_headers_count": 20,
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
    });
    let lenient = json!({
        "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
        "http_protocol_options": {
            "accept_http_10": true,
            "default_host_for_http_10": "default.example",
            "allow_chunked_length": true,
            "allow_custom_methods": true,
        },
    });
    let timers = json!({
        "stream_idle_timeout": "1s",
        "drain_timeout": "0.2s",
        "common_http_protocol_options": {"idle_timeout": "1s", "max_requests_per_connection": 3},
    });
    let aging = json!({
        "drain_timeout": "0.2s",
        "common_http_protocol_options": {"max_connection_duration": "1s"},
    });
    // (`delayed_close_timeout` 0: Envoy would otherwise wait a second more
    // for the client's FIN before it closes, which Ferry does not.)
    let idling = json!({
        "drain_timeout": "0.5s",
        "delayed_close_timeout": "0s",
        "common_http_protocol_options": {"idle_timeout": "2.5s"},
    });
    Bootstrap::new()
        .listener(listener(
            "edge",
            p.edge,
            vec![json!({"filters": [hcm("edge", json!({}))]})],
        ))
        .listener(listener(
            "strict",
            p.strict,
            vec![json!({"filters": [hcm("strict", strict)]})],
        ))
        .listener(listener(
            "lenient",
            p.lenient,
            vec![json!({"filters": [hcm("lenient", lenient)]})],
        ))
        .listener(listener(
            "timers",
            p.timers,
            vec![json!({"filters": [hcm("timers", timers)]})],
        ))
        .listener(listener(
            "aging",
            p.aging,
            vec![json!({"filters": [hcm("aging", aging)]})],
        ))
        .listener(listener(
            "idling",
            p.idling,
            vec![json!({"filters": [hcm("idling", idling)]})],
        ))
        .cluster(static_cluster("echo", &[b.echo.port], Upstream::Http1))
        .cluster(static_cluster("bad", &[b.bad.port], Upstream::Http1))
        .render()
}

/// Runs `observe` against Ferry, then Envoy, each on the same bootstrap; returns both
/// observations (Ferry's first). `None`: Envoy is unavailable (skipped).
fn differential<T>(
    b: &Backends,
    mut observe: impl FnMut(&Proxy, &Ports) -> Result<T>,
) -> Result<Option<(T, T)>> {
    let Some(bin) = envoy::bin()? else {
        return Ok(None);
    };
    let ports = || Ports {
        edge: free_port(),
        strict: free_port(),
        lenient: free_port(),
        timers: free_port(),
        aging: free_port(),
        idling: free_port(),
    };
    let p = ports();
    let ferry = Proxy::Ferry(Ferry::start(&bootstrap(&p, b))?);
    let a = observe(&ferry, &p).with_context(|| format!("through ferry; log:\n{}", ferry.log()))?;
    drop(ferry);
    let p = ports();
    let config: Value = serde_json::from_str(&bootstrap(&p, b))?;
    let envoy = Proxy::Envoy(Envoy::start(&bin, &config, p.edge)?);
    for port in [p.strict, p.lenient, p.timers, p.aging, p.idling] {
        wait_accepting(port)?;
    }
    let e = observe(&envoy, &p).with_context(|| format!("through envoy; log:\n{}", envoy.log()))?;
    Ok(Some((a, e)))
}

fn wait_accepting(port: u16) -> Result<()> {
    for _ in 0..500 {
        if TcpStream::connect(local(port)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {port}")
}

fn skipped() -> Result<()> {
    eprintln!("Envoy is not available: the comparison is skipped");
    Ok(())
}

// ------------------------------------------------------------------------------ HTTP/1

/// What a raw HTTP/1 exchange saw.
#[derive(Clone, PartialEq, Eq)]
struct Seen {
    /// `None`: the connection ended without a response.
    status: Option<u16>,
    /// The response said `Connection: close`, or the connection ended.
    closes: bool,
    /// The body arrived as framed (length or last chunk).
    complete: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.body[..self.body.len().min(80)];
        f.debug_struct("Seen")
            .field("status", &self.status)
            .field("closes", &self.closes)
            .field("complete", &self.complete)
            .field("body_len", &self.body.len())
            .field("body", &String::from_utf8_lossy(shown))
            .finish()
    }
}

impl Seen {
    /// Not served: no response, or an error status.
    fn refused(&self) -> bool {
        self.status.is_none_or(|s| s >= 400)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Bytes read from a socket, ending at EOF or a reset (whatever arrived before it stays).
struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Wire {
    fn more(&mut self) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let mut chunk = [0u8; 16384];
        match self.s.read(&mut chunk) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            // A proxy that closes with unread request bytes resets the connection.
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                self.eof = true;
                Ok(false)
            }
            Err(e) => Err(anyhow!("reading the response: {e}")),
        }
    }

    /// The next `n` bytes, or fewer at EOF.
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        while self.buf.len() < n && self.more()? {}
        let n = n.min(self.buf.len());
        Ok(self.buf.drain(..n).collect())
    }

    fn line(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = self.buf.drain(..i + 2).take(i).collect();
                return Ok(Some(l));
            }
            if !self.more()? {
                return Ok(None);
            }
        }
    }
}

fn connect(port: u16) -> Result<TcpStream> {
    let s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `raw` on a new connection and reads one response.
fn exchange(port: u16, raw: &[u8]) -> Result<Seen> {
    let mut s = connect(port)?;
    // A proxy may answer and close before it read everything.
    let _ = s.write_all(raw);
    read_response(s)
}

fn read_response(s: TcpStream) -> Result<Seen> {
    let mut w = Wire {
        s,
        buf: Vec::new(),
        eof: false,
    };
    read_response_on(&mut w)
}

/// Reads one response from `w`, leaving what follows it (a pipelined
/// response) in `w`.
fn read_response_on(w: &mut Wire) -> Result<Seen> {
    let Some(status_line) = w.line()? else {
        return Ok(Seen {
            status: None,
            closes: true,
            complete: false,
            headers: Vec::new(),
            body: Vec::new(),
        });
    };
    let status_line = String::from_utf8_lossy(&status_line).into_owned();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let Some(l) = w.line()? else { break };
        if l.is_empty() {
            break;
        }
        let l = String::from_utf8_lossy(&l).into_owned();
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    let complete = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let Some(size) = w.line()? else { break false };
            let size = usize::from_str_radix(String::from_utf8_lossy(&size).trim(), 16)?;
            if size == 0 {
                break w.line()?.is_some();
            }
            let chunk = w.take(size + 2)?;
            let whole = chunk.len() == size + 2;
            body.extend_from_slice(&chunk[..size.min(chunk.len())]);
            if !whole {
                break false;
            }
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = w.take(n)?;
        body.len() == n
    } else if matches!(status, 100..=199 | 204 | 304) {
        true
    } else {
        while w.more()? {}
        body = std::mem::take(&mut w.buf);
        true
    };
    let closes = w.eof || get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    Ok(Seen {
        status: Some(status),
        closes,
        complete,
        headers,
        body,
    })
}

/// A well-formed request on a new connection is answered 200.
fn good(port: u16) -> Result<()> {
    let seen = exchange(port, b"GET /ok HTTP/1.1\r\nHost: good.example\r\n\r\n")?;
    if seen.status != Some(200) || !seen.complete {
        bail!("a good request after the attack was answered {seen:?}");
    }
    Ok(())
}

/// A well-formed HTTP/2 request (curl, prior knowledge) is answered 200.
fn good_h2(port: u16) -> Result<()> {
    let url = format!("http://127.0.0.1:{port}/ok");
    let out = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ])?;
    let code = String::from_utf8_lossy(&out.stdout);
    if code != "200" {
        bail!("a good HTTP/2 request after the attack was answered {code}");
    }
    Ok(())
}

/// How many requests the echo backend got for `path`.
fn hits(app: &App, path: &str) -> Result<u64> {
    let (status, body) = http_request(local(app.port), "GET", &format!("/hits{path}"))?;
    if status != 200 {
        bail!("/hits answered {status}");
    }
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["hits"].as_u64().unwrap_or(0))
}

/// Ferry refuses at least what Envoy refuses, and closes at least where Envoy closes.
fn at_least_as_strict(case: &str, ferry: &Seen, envoy: &Seen) -> Result<()> {
    if envoy.refused() && !ferry.refused() {
        bail!("{case}: Envoy refused ({envoy:?}) but Ferry served it ({ferry:?})");
    }
    if envoy.refused() && envoy.closes && !ferry.closes {
        bail!("{case}: Envoy closed the connection, Ferry kept it ({ferry:?})");
    }
    Ok(())
}

// ------------------------------------------------------------------------------ smuggling

/// A request that hides a second one (`GET /smuggled-…`) behind framing the two halves of
/// a proxy chain could read differently.
fn smuggling_cases(tag: &str) -> Vec<(&'static str, Vec<u8>)> {
    let hidden = format!("GET /smuggled-{tag} HTTP/1.1\r\nHost: x\r\n\r\n");
    let with = |head: &str, body: &str| format!("{head}\r\n\r\n{body}{hidden}").into_bytes();
    // A request Envoy takes as well-formed: what follows it would be a pipelined request,
    // not a smuggled one, so nothing follows it.
    let alone = |head: &str, body: &str| format!("{head}\r\n\r\n{body}").into_bytes();
    let chunked_end = "0\r\n\r\n";
    let cl = hidden.len() + chunked_end.len();
    vec![
        (
            "CL then TE",
            with(
                &format!(
                    "POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: {cl}\r\nTransfer-Encoding: chunked"
                ),
                chunked_end,
            ),
        ),
        (
            "TE then CL",
            with(
                &format!(
                    "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: {cl}"
                ),
                chunked_end,
            ),
        ),
        (
            "CL 0 and TE",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked",
                chunked_end,
            ),
        ),
        (
            "duplicate CL, same value",
            with(
                &format!(
                    "POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: {cl}\r\nContent-Length: {cl}"
                ),
                chunked_end,
            ),
        ),
        (
            "duplicate CL, different values",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 0",
                chunked_end,
            ),
        ),
        (
            "CL list",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 0",
                chunked_end,
            ),
        ),
        (
            "CL with a sign",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: +5",
                chunked_end,
            ),
        ),
        (
            "TE chunked, identity",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity",
                chunked_end,
            ),
        ),
        (
            "TE identity, chunked",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked",
                chunked_end,
            ),
        ),
        (
            "TE twice",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                chunked_end,
            ),
        ),
        (
            "TE xchunked",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked",
                chunked_end,
            ),
        ),
        (
            "TE with space before colon",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked",
                chunked_end,
            ),
        ),
        (
            "TE folded (obs-fold)",
            alone(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked",
                chunked_end,
            ),
        ),
        (
            "obs-fold in another header",
            alone("GET /s HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c", ""),
        ),
        (
            "bare LF line ends",
            b"GET /s HTTP/1.1\nHost: a\n\n".to_vec(),
        ),
        (
            "bare CR in a header",
            with("GET /s HTTP/1.1\r\nHost: a\rX-A: b", ""),
        ),
        (
            "chunk size not hex",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
                "zz\r\nabc\r\n0\r\n\r\n",
            ),
        ),
        (
            "negative chunk size",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
                "-3\r\nabc\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk size 0x",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
                "0x3\r\nabc\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk size overflow",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
                "fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk shorter than its size",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
                "5\r\nabc\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk lines with bare LF",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
                "3\nabc\n0\n\n",
            ),
        ),
        (
            "chunk extension with LF",
            with(
                "POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
                "3;a\nb\r\nabc\r\n0\r\n\r\n",
            ),
        ),
        (
            "NUL in a header value",
            with("GET /s HTTP/1.1\r\nHost: a\r\nX-A: b\0c", ""),
        ),
        (
            "NUL in a header name",
            with("GET /s HTTP/1.1\r\nHost: a\r\nX-\0A: b", ""),
        ),
        (
            "control character in a value",
            with("GET /s HTTP/1.1\r\nHost: a\r\nX-A: b\x01c", ""),
        ),
        (
            "space in a header name",
            with("GET /s HTTP/1.1\r\nHost: a\r\nX A: b", ""),
        ),
        ("no Host", with("GET /s HTTP/1.1", "")),
        (
            "fragment in the target",
            with("GET /s#x HTTP/1.1\r\nHost: a", ""),
        ),
        (
            "target without a slash",
            with("GET s HTTP/1.1\r\nHost: a", ""),
        ),
        ("lower-case method", with("get /s HTTP/1.1\r\nHost: a", "")),
        ("unknown method", with("FOO /s HTTP/1.1\r\nHost: a", "")),
        ("HTTP/1.0", with("GET /s HTTP/1.0", "")),
        (
            "HTTP/1.0 with TE",
            with(
                "POST /s HTTP/1.0\r\nTransfer-Encoding: chunked",
                chunked_end,
            ),
        ),
        ("HTTP/1.2", with("GET /s HTTP/1.2\r\nHost: a", "")),
        ("HTTP/0.9", format!("GET /s\r\n\r\n{hidden}").into_bytes()),
        (
            "TLS record on a plaintext port",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n".to_vec(),
        ),
    ]
}

#[test]
fn request_smuggling_is_refused_before_routing() -> Result<()> {
    let _lock = RunLock::shared();
    let b = Backends::start()?;
    let observed = differential(&b, |p, ports| {
        let tag = format!("{}-{}", p.name(), ports.edge);
        let mut seen = Vec::new();
        for (case, raw) in smuggling_cases(&tag) {
            let s = exchange(ports.edge, &raw).with_context(|| case.to_string())?;
            good(ports.edge).with_context(|| format!("after {case}"))?;
            seen.push((case, s));
        }
        // No smuggled request ever reached the backend.
        let smuggled = hits(&b.echo, &format!("/smuggled-{tag}"))?;
        if smuggled != 0 {
            bail!("the backend saw {smuggled} smuggled request(s)");
        }
        // allow_chunked_length: served, with the length removed before forwarding.
        let body = "3\r\nabc\r\n0\r\n\r\n";
        let raw = format!(
            "POST /cl-te HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
            body.len()
        );
        let lenient = exchange(ports.lenient, raw.as_bytes())?;
        if lenient.status != Some(200) {
            bail!("allow_chunked_length: {lenient:?}");
        }
        let echoed: Value = serde_json::from_slice(&lenient.body)?;
        let names: Vec<String> = echoed["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h[0].as_str().map(str::to_ascii_lowercase))
            .collect();
        if names.iter().any(|n| n == "content-length") {
            bail!("the backend got both content-length and transfer-encoding: {names:?}");
        }
        if echoed["body_len"] != 3 {
            bail!("allow_chunked_length: body {}", echoed["body_len"]);
        }
        let protocol_errors = p.stat("http.edge.downstream_cx_protocol_error")?;
        Ok((seen, protocol_errors))
    })?;
    let Some(((ferry, ferry_errors), (envoy, _))) = observed else {
        return skipped();
    };
    for ((case, f), (_, e)) in ferry.iter().zip(&envoy) {
        eprintln!(
            "{case:32} ferry {:?}{} envoy {:?}{}",
            f.status,
            if f.closes { " close" } else { "" },
            e.status,
            if e.closes { " close" } else { "" }
        );
        at_least_as_strict(case, f, e)?;
    }
    // Where Envoy names the problem precisely, Ferry gives the same status.
    for (case, status) in [
        ("CL then TE", 400),
        ("TE then CL", 400),
        ("duplicate CL, same value", 400),
        ("TE chunked, identity", 501),
        ("TE identity, chunked", 501),
        ("TE twice", 501),
        ("HTTP/1.0", 426),
        ("chunk size not hex", 400),
        ("no Host", 400),
        ("unknown method", 400),
    ] {
        let (_, f) = ferry
            .iter()
            .find(|(c, _)| *c == case)
            .ok_or_else(|| anyhow!("no case {case}"))?;
        let (_, e) = envoy
            .iter()
            .find(|(c, _)| *c == case)
            .ok_or_else(|| anyhow!("no case {case}"))?;
        assert_eq!(e.status, Some(status), "envoy, {case}");
        assert_eq!(f.status, Some(status), "ferry, {case}");
        assert!(f.closes, "ferry closes after {case}");
    }
    assert!(ferry_errors > 0, "downstream_cx_protocol_error counted");
    Ok(())
}

// ------------------------------------------------------------------------------ limits

fn head_with(target: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut h = format!("GET {target} HTTP/1.1\r\nHost: a\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// A head of exactly `len` bytes (request line to the empty line), as Envoy counts it.
fn head_of_len(len: usize) -> Vec<u8> {
    let fixed = head_with("/", &[("X-Big".into(), String::new())]).len();
    head_with("/", &[("X-Big".into(), "a".repeat(len - fixed))])
}

fn numbered(n: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (format!("X-H{i}"), "v".into())).collect()
}

#[test]
fn oversized_and_numerous_headers() -> Result<()> {
    let _lock = RunLock::shared();
    let b = Backends::start()?;
    let observed = differential(&b, |p, ports| {
        let kib = |n: usize| "a".repeat(n * 1024);
        let cases: Vec<(&str, u16, Vec<u8>)> = vec![
            (
                "59 KiB header",
                ports.edge,
                head_with("/", &[("X-Big".into(), kib(59))]),
            ),
            (
                "61 KiB header",
                ports.edge,
                head_with("/", &[("X-Big".into(), kib(61))]),
            ),
            (
                "100 KiB header",
                ports.edge,
                head_with("/", &[("X-Big".into(), kib(100))]),
            ),
            (
                "61 KiB target",
                ports.edge,
                head_with(&format!("/{}", kib(61)), &[]),
            ),
            ("head of 60 KiB", ports.edge, head_of_len(60 * 1024)),
            ("head of 60 KiB + 1", ports.edge, head_of_len(60 * 1024 + 1)),
            ("100 headers", ports.edge, head_with("/", &numbered(99))),
            ("101 headers", ports.edge, head_with("/", &numbered(100))),
            ("1000 headers", ports.edge, head_with("/", &numbered(999))),
            ("head of 4 KiB (limit 4)", ports.strict, head_of_len(4096)),
            (
                "head of 4 KiB + 1 (limit 4)",
                ports.strict,
                head_of_len(4097),
            ),
            (
                "20 headers (limit 20)",
                ports.strict,
                head_with("/", &numbered(19)),
            ),
            (
                "21 headers (limit 20)",
                ports.strict,
                head_with("/", &numbered(20)),
            ),
            (
                "underscore, REJECT_REQUEST",
                ports.strict,
                head_with("/", &[("X_Under".into(), "1".into())]),
            ),
            (
                "underscore, DROP_HEADER",
                ports.lenient,
                head_with(
                    "/",
                    &[
                        ("X_Under".into(), "1".into()),
                        ("X-Keep".into(), "1".into()),
                    ],
                ),
            ),
            ("HTTP/1.0", ports.edge, b"GET / HTTP/1.0\r\n\r\n".to_vec()),
            (
                "HTTP/1.0, accept_http_10",
                ports.lenient,
                b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            ),
            (
                "custom method, allowed",
                ports.lenient,
                b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            ),
        ];
        let mut seen = Vec::new();
        for (case, port, raw) in cases {
            let s = exchange(port, &raw).with_context(|| case.to_string())?;
            good(port).with_context(|| format!("after {case}"))?;
            seen.push((case, s));
        }
        let counters = [
            "http1.requests_rejected_with_underscores_in_headers",
            "http1.dropped_headers_with_underscores",
        ]
        .iter()
        .map(|n| p.stat(n))
        .collect::<Result<Vec<_>>>()?;
        Ok((seen, counters))
    })?;
    let Some(((ferry, ferry_counters), (envoy, envoy_counters))) = observed else {
        return skipped();
    };
    assert_eq!(ferry_counters, vec![1, 1], "ferry's underscore counters");
    assert_eq!(envoy_counters, vec![1, 1], "envoy's underscore counters");
    for ((case, f), (_, e)) in ferry.iter().zip(&envoy) {
        eprintln!("{case:32} ferry {:?} envoy {:?}", f.status, e.status);
        at_least_as_strict(case, f, e)?;
        // The limits are Envoy's to the byte: the same status either side of them.
        assert_eq!(f.status, e.status, "{case}");
    }
    let find = |v: &[(&str, Seen)], case: &str| {
        v.iter()
            .find(|(c, _)| *c == case)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| anyhow!("no case {case}"))
    };
    for v in [&ferry, &envoy] {
        let dropped: Value = serde_json::from_slice(&find(v, "underscore, DROP_HEADER")?.body)?;
        let names = dropped["headers"].to_string().to_ascii_lowercase();
        assert!(
            !names.contains("x_under") && names.contains("x-keep"),
            "{names}"
        );
        let h10: Value = serde_json::from_slice(&find(v, "HTTP/1.0, accept_http_10")?.body)?;
        assert!(
            h10["headers"].to_string().contains("default.example"),
            "{h10}"
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------ slow clients

/// A head sent a byte at a time, far slower than `request_headers_timeout` (1 s): the
/// proxy answers 408 and closes before the head is complete.
fn slowloris(port: u16) -> Result<Seen> {
    let s = connect(port)?;
    let mut writer = s.try_clone()?;
    let head = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(400)
    );
    let sender = thread::spawn(move || {
        let mut sent = 0;
        for b in head.as_bytes() {
            if writer.write_all(&[*b]).is_err() {
                break;
            }
            sent += 1;
            thread::sleep(Duration::from_millis(50));
        }
        (sent, head.len())
    });
    let seen = read_response(s)?;
    let (sent, total) = sender.join().map_err(|_| anyhow!("sender panicked"))?;
    if sent >= total {
        bail!("the whole slow head was accepted: {seen:?}");
    }
    Ok(seen)
}

#[test]
fn slow_and_idle_clients() -> Result<()> {
    let _lock = RunLock::shared();
    let b = Backends::start()?;
    let observed = differential(&b, |p, ports| {
        let slow = slowloris(ports.strict)?;
        good(ports.strict)?;
        // A body that stops: request_timeout (2 s) answers 408.
        let stalled = {
            let mut s = connect(ports.strict)?;
            s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")?;
            read_response(s)?
        };
        good(ports.strict)?;
        // Hundreds of idle connections, and as many with half a head, hold nothing up.
        let mut idle = Vec::new();
        for i in 0..300 {
            let mut s = connect(ports.edge)?;
            if i % 2 == 0 {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHo");
            }
            idle.push(s);
        }
        good(ports.edge)?;
        good_h2(ports.edge)?;
        // Every idle connection is still usable: the proxy kept them all.
        let mut s = idle.swap_remove(1);
        s.write_all(b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n")?;
        let late = read_response(s)?;
        drop(idle);
        let header_timeouts = p.stat("http.strict.downstream_rq_header_timeout")?;
        let request_timeouts = p.stat("http.strict.downstream_rq_timeout")?;
        Ok((slow, stalled, late, header_timeouts, request_timeouts))
    })?;
    let Some((ferry, envoy)) = observed else {
        return skipped();
    };
    for (name, (slow, stalled, late, headers, requests)) in [("ferry", &ferry), ("envoy", &envoy)] {
        eprintln!(
            "{name}: slowloris {slow:?}\nstalled body {stalled:?}\nlate {:?}",
            late.status
        );
        assert_eq!(slow.status, Some(408), "{name}: slowloris");
        assert!(slow.closes, "{name}: slowloris closes");
        assert_eq!(stalled.status, Some(408), "{name}: stalled body");
        assert!(stalled.closes, "{name}: stalled body closes");
        assert_eq!(
            late.status,
            Some(200),
            "{name}: an idle connection still serves"
        );
        assert!(*headers >= 1, "{name}: downstream_rq_header_timeout");
        assert!(*requests >= 1, "{name}: downstream_rq_timeout");
    }
    Ok(())
}

// ------------------------------------------------------------------------------ HTTP/2

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: a literal header without indexing, plain (non-Huffman) strings.
fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend(hpack_len(name.len()));
    out.extend_from_slice(name);
    out.extend(hpack_len(value.len()));
    out.extend_from_slice(value);
    out
}

fn hpack_len(mut n: usize) -> Vec<u8> {
    if n < 127 {
        return vec![n as u8];
    }
    let mut out = vec![127u8];
    n -= 127;
    while n >= 128 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out
}

/// A GET's header block (`:method GET`, `:scheme http` from the static table).
fn request_block(extra: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    b.extend(literal(b":path", b"/ok"));
    b.extend(literal(b":authority", b"a"));
    for (k, v) in extra {
        b.extend(literal(k, v));
    }
    b
}

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// What an HTTP/2 attack saw: the first stream's answer and whether the connection ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct H2Seen {
    status: Option<u16>,
    reset: bool,
    goaway: bool,
    closed: bool,
}

impl H2Seen {
    fn refused(&self) -> bool {
        self.status.is_none_or(|s| s >= 400)
    }

    fn ended(&self) -> bool {
        self.goaway || self.closed
    }
}

/// `:status` of a response header block, for the forms servers send it in: an indexed
/// static entry, or a literal with the indexed name `:status` and a (Huffman) value.
fn status_of(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    let statics = [200, 204, 206, 304, 400, 404, 500];
    if (0x88..=0x8e).contains(&first) {
        return Some(statics[usize::from(first - 0x88)]);
    }
    if first & 0x0f != 8 && first & 0x3f != 8 {
        return None;
    }
    let len_byte = *block.get(1)?;
    let len = usize::from(len_byte & 0x7f);
    let value = block.get(2..2 + len)?;
    let text = if len_byte & 0x80 == 0 {
        String::from_utf8_lossy(value).into_owned()
    } else {
        huffman_digits(value)?
    };
    text.parse().ok()
}

/// Decodes a Huffman string of digits (RFC 7541 Appendix B codes for '0'–'9').
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<bool> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1))
        .collect();
    let codes: [(u32, usize); 10] = [
        (0x0, 5),
        (0x1, 5),
        (0x2, 5),
        (0x19, 6),
        (0x1a, 6),
        (0x1b, 6),
        (0x1c, 6),
        (0x1d, 6),
        (0x1e, 6),
        (0x1f, 6),
    ];
    let mut out = String::new();
    let mut i = 0;
    'next: while i < bits.len() {
        for (d, (code, len)) in codes.iter().enumerate() {
            if i + len <= bits.len() {
                let v = bits[i..i + len]
                    .iter()
                    .fold(0u32, |acc, b| acc << 1 | u32::from(*b));
                if v == *code {
                    out.push(char::from(b'0' + d as u8));
                    i += len;
                    continue 'next;
                }
            }
        }
        // The rest must be padding (all ones, shorter than a byte).
        return (bits.len() - i < 8 && bits[i..].iter().all(|b| *b)).then_some(out);
    }
    Some(out)
}

/// Opens a connection, sends the preface and `frames` (from another thread, so a proxy
/// that answers a flood is read while it is sent), and reads until the first stream is
/// answered or reset, a GOAWAY arrives or the connection ends.
fn h2_attack(port: u16, frames: Vec<u8>, preface: bool) -> Result<H2Seen> {
    let s = connect(port)?;
    let mut writer = s.try_clone()?;
    let sender = thread::spawn(move || {
        let mut all = Vec::new();
        if preface {
            all.extend_from_slice(PREFACE);
            all.extend(frame(0x4, 0, 0, &[]));
        }
        all.extend(frames);
        // The proxy may close while this is still sending.
        let _ = writer.write_all(&all);
    });
    let mut w = Wire {
        s,
        buf: Vec::new(),
        eof: false,
    };
    let mut seen = H2Seen::default();
    loop {
        let head = w.take(9)?;
        if head.len() < 9 {
            seen.closed = true;
            break;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, stream) = (
            head[3],
            u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        );
        let payload = w.take(len)?;
        match kind {
            0x1 if stream == 1 => {
                seen.status = status_of(&payload);
                break;
            }
            0x3 if stream == 1 => {
                seen.reset = true;
                break;
            }
            0x7 => {
                seen.goaway = true;
                // After GOAWAY the proxy closes once its streams are done.
                break;
            }
            _ => {}
        }
    }
    let _ = w.s.shutdown(Shutdown::Both);
    let _ = sender.join();
    Ok(seen)
}

fn h2_cases() -> Vec<(&'static str, Vec<u8>, bool)> {
    let get = request_block(&[]);
    let many = |n: usize| {
        let extra: Vec<_> = (0..n)
            .map(|i| (format!("x-h{i}").into_bytes(), b"v".to_vec()))
            .collect();
        request_block(&extra)
    };
    let mut rapid_reset = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        rapid_reset.extend(frame(0x1, END_STREAM | END_HEADERS, id, &get));
        rapid_reset.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
    }
    let mut continuation = frame(0x1, END_STREAM, 1, &get);
    for _ in 0..20_000 {
        continuation.extend(frame(0x9, 0, 1, b"\x00"));
    }
    let mut empty_continuation = frame(0x1, END_STREAM, 1, &get);
    for _ in 0..20_000 {
        empty_continuation.extend(frame(0x9, 0, 1, b""));
    }
    let mut empty_data = frame(0x1, END_HEADERS, 1, &get);
    for _ in 0..1000 {
        empty_data.extend(frame(0x0, 0, 1, b""));
    }
    let repeat = |f: Vec<u8>, n: usize| f.repeat(n);
    let big = request_block(&[(b"x-big".to_vec(), vec![b'a'; 70_000])]);
    let mut oversized = frame(0x1, END_STREAM, 1, &big[..16_000]);
    let rest: Vec<&[u8]> = big[16_000..].chunks(16_000).collect();
    for (i, c) in rest.iter().enumerate() {
        let flags = if i + 1 == rest.len() { END_HEADERS } else { 0 };
        oversized.extend(frame(0x9, flags, 1, c));
    }
    vec![
        (
            "good request",
            frame(0x1, END_STREAM | END_HEADERS, 1, &get),
            true,
        ),
        (
            "100 headers",
            frame(0x1, END_STREAM | END_HEADERS, 1, &many(96)),
            true,
        ),
        (
            "101 headers",
            frame(0x1, END_STREAM | END_HEADERS, 1, &many(97)),
            true,
        ),
        ("70 KB header", oversized, true),
        ("rapid reset", rapid_reset, true),
        ("CONTINUATION flood", continuation, true),
        ("empty CONTINUATION flood", empty_continuation, true),
        ("empty DATA flood", empty_data, true),
        (
            "PING flood",
            repeat(frame(0x6, 0, 0, &[0; 8]), 20_000),
            true,
        ),
        (
            "SETTINGS flood",
            repeat(frame(0x4, 0, 0, &[]), 20_000),
            true,
        ),
        (
            "PRIORITY flood",
            repeat(frame(0x2, 0, 3, &[0, 0, 0, 1, 16]), 2_000),
            true,
        ),
        (
            "WINDOW_UPDATE flood",
            repeat(frame(0x8, 0, 0, &[0, 0, 0, 1]), 2_000),
            true,
        ),
        (
            "HEADERS on stream 0",
            frame(0x1, END_STREAM | END_HEADERS, 0, &get),
            true,
        ),
        (
            "connection-specific header",
            frame(
                0x1,
                END_STREAM | END_HEADERS,
                1,
                &request_block(&[(b"transfer-encoding".to_vec(), b"chunked".to_vec())]),
            ),
            true,
        ),
        (
            "upper-case header name",
            frame(
                0x1,
                END_STREAM | END_HEADERS,
                1,
                &request_block(&[(b"X-Upper".to_vec(), b"v".to_vec())]),
            ),
            true,
        ),
        (
            "frame longer than SETTINGS allow",
            [&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1][..], &[b'x'; 100]].concat(),
            true,
        ),
        (
            "garbage after a broken preface",
            [&b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"[..], &[0; 40]].concat(),
            false,
        ),
        (
            "random bytes",
            (0..200u8).map(|i| i.wrapping_mul(151)).collect(),
            false,
        ),
    ]
}

#[test]
fn http2_floods_and_bad_frames() -> Result<()> {
    let _lock = RunLock::shared();
    let b = Backends::start()?;
    let observed = differential(&b, |p, ports| {
        let mut seen = Vec::new();
        for (case, frames, preface) in h2_cases() {
            let s = h2_attack(ports.edge, frames, preface).with_context(|| case.to_string())?;
            good_h2(ports.edge).with_context(|| format!("after {case}"))?;
            good(ports.edge).with_context(|| format!("after {case}"))?;
            seen.push((case, s));
        }
        let floods = [
            "http2.inbound_empty_frames_flood",
            "http2.inbound_priority_frames_flood",
            "http2.inbound_window_update_frames_flood",
        ]
        .iter()
        .map(|n| p.stat(n))
        .collect::<Result<Vec<_>>>()?;
        Ok((seen, floods))
    })?;
    let Some(((ferry, ferry_floods), (envoy, envoy_floods))) = observed else {
        return skipped();
    };
    // Malformed request headers: Envoy ends the whole connection (its default for
    // invalid HTTP messaging), the h2 codec resets the stream (RFC 9113 §8.1.1); both
    // refuse the request. Every other case Envoy ends, Ferry ends too.
    let stream_errors = ["connection-specific header"];
    for ((case, f), (_, e)) in ferry.iter().zip(&envoy) {
        eprintln!("{case:34} ferry {f:?}\n{:34} envoy {e:?}", "");
        if e.refused() && !f.refused() {
            bail!("{case}: Envoy refused ({e:?}), Ferry answered {f:?}");
        }
        let refused_stream = stream_errors.contains(case) && f.reset;
        if e.ended() && !f.ended() && !refused_stream && f.status.is_none_or(|s| s < 400) {
            bail!("{case}: Envoy ended the connection, Ferry did not: {f:?}");
        }
    }
    let good = &ferry[0].1;
    assert_eq!(good.status, Some(200), "a plain HTTP/2 request is served");
    for case in [
        "rapid reset",
        "CONTINUATION flood",
        "empty DATA flood",
        "PING flood",
        "SETTINGS flood",
    ] {
        let (_, f) = ferry
            .iter()
            .find(|(c, _)| *c == case)
            .ok_or_else(|| anyhow!("{case}"))?;
        assert!(
            f.ended() && f.status.is_none(),
            "ferry ends the connection on {case}: {f:?}"
        );
    }
    eprintln!("flood counters: ferry {ferry_floods:?} envoy {envoy_floods:?}");
    for (i, (f, e)) in ferry_floods.iter().zip(&envoy_floods).enumerate() {
        assert!(*f >= 1, "ferry counts flood {i}");
        assert!(*e >= 1, "envoy counts flood {i}");
    }
    Ok(())
}

// ------------------------------------------------------------------------------ backends

/// The cases of `badhttp.py` (its `CASES`).
const BACKEND_CASES: &[&str] = &[
    "cl-te",
    "te-cl",
    "dup-cl-diff",
    "dup-cl-same",
    "cl-list",
    "cl-bad",
    "te-gzip",
    "te-chunked-identity",
    "bad-chunk",
    "nul-header",
    "obs-fold",
    "space-colon",
    "bad-status",
    "garbage",
    "split",
    "before-status-reset",
    "before-status-close",
    "mid-status-reset",
    "mid-headers-reset",
    "mid-headers-close",
    "after-headers-reset",
    "mid-body-reset",
    "mid-body-close",
    "mid-chunk-reset",
    "mid-chunked-close",
];

#[test]
fn backends_with_bad_framing_or_resets() -> Result<()> {
    let _lock = RunLock::shared();
    let b = Backends::start()?;
    let observed = differential(&b, |_, ports| {
        let mut seen = Vec::new();
        for case in BACKEND_CASES {
            let raw = format!("GET /case/{case} HTTP/1.1\r\nHost: a\r\n\r\n");
            let s = exchange(ports.edge, raw.as_bytes()).with_context(|| case.to_string())?;
            // The next request to the same backend gets its own, clean answer: nothing the
            // bad response smuggled stays in a pooled connection.
            for _ in 0..3 {
                let next = exchange(ports.edge, b"GET /case/next HTTP/1.1\r\nHost: a\r\n\r\n")?;
                if next.status != Some(200) || next.body != b"ok" {
                    bail!("after {case}, the next request got {next:?}");
                }
            }
            seen.push((*case, s));
        }
        Ok(seen)
    })?;
    let Some((ferry, envoy)) = observed else {
        return skipped();
    };
    for ((case, f), (_, e)) in ferry.iter().zip(&envoy) {
        eprintln!(
            "{case:22} ferry {:?} complete={} envoy {:?} complete={}",
            f.status, f.complete, e.status, e.complete
        );
        let delivered = |s: &Seen| s.status.is_some_and(|c| c < 400) && s.complete;
        if delivered(f) && !delivered(e) {
            bail!("{case}: Ferry delivered a response Envoy did not: {f:?} / {e:?}");
        }
        if e.status.is_some_and(|c| c >= 500) && f.status.is_some_and(|c| c < 500) {
            bail!(
                "{case}: Envoy answered {:?}, Ferry {:?}",
                e.status,
                f.status
            );
        }
        if f.body.windows(8).any(|w| w == b"POISONED") {
            bail!("{case}: Ferry passed on a smuggled response");
        }
    }
    // Framing Envoy refuses is a 502 from both.
    for case in [
        "cl-te",
        "te-cl",
        "dup-cl-same",
        "cl-list",
        "te-gzip",
        "te-chunked-identity",
    ] {
        let (_, f) = ferry
            .iter()
            .find(|(c, _)| *c == case)
            .ok_or_else(|| anyhow!("{case}"))?;
        let (_, e) = envoy
            .iter()
            .find(|(c, _)| *c == case)
            .ok_or_else(|| anyhow!("{case}"))?;
        assert_eq!(e.status, Some(502), "envoy, {case}");
        assert_eq!(f.status, Some(502), "ferry, {case}");
        assert!(
            f.header("content-type").is_some(),
            "ferry's 502 is a local reply: {f:?}"
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------ lifetimes

/// Reads until the proxy ends the connection; `false` if it was still open when the read
/// timeout passed.
fn ends(mut s: TcpStream) -> Result<bool> {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset) => return Ok(true),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// What the connection and stream timers did.
#[derive(Debug, PartialEq, Eq)]
struct Lifetimes {
    /// `Connection: close` on the responses of one keep-alive connection
    /// (`max_requests_per_connection` 3).
    max_requests: Vec<bool>,
    /// An HTTP/2 connection past `max_requests_per_connection` gets GOAWAY.
    max_requests_h2_goaway: bool,
    /// An idle HTTP/1 connection is ended (`idle_timeout`).
    idle_h1_closed: bool,
    /// An idle HTTP/2 connection gets GOAWAY.
    idle_h2_goaway: bool,
    /// A body that stops: `stream_idle_timeout`.
    stalled_body: Option<u16>,
    stalled_body_text: String,
    /// A connection kept busy past `max_connection_duration` is told to close.
    aged_out: bool,
    /// An HTTP/1 connection idle past its 2.5 s `idle_timeout` (parked by
    /// Ferry after a second) is closed once the drain that starts then
    /// (`drain_timeout` 0.5 s) is over: 3 s after its response, give or
    /// take 0.4 s.
    idle_closed_on_time: bool,
    /// The counters of each.
    counters: Vec<u64>,
}

#[test]
fn connection_lifetimes_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let b = Backends::start()?;
    let observed = differential(&b, |p, ports| {
        let one = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut max_requests = Vec::new();
        let mut s = connect(ports.timers)?;
        for _ in 0..3 {
            s.write_all(one)?;
            let seen = read_response(s.try_clone()?)?;
            if seen.status != Some(200) {
                bail!("max_requests_per_connection: {seen:?}");
            }
            max_requests.push(seen.closes);
            if seen.closes {
                break;
            }
        }
        let get = request_block(&[]);
        let mut three = Vec::new();
        for id in [1u32, 3, 5, 7] {
            three.extend(frame(0x1, END_STREAM | END_HEADERS, id, &get));
        }
        let h2 = h2_drain(ports.timers, three)?;
        // Idle: one request, then nothing.
        let mut s = connect(ports.timers)?;
        s.write_all(one)?;
        let mut first = [0u8; 12];
        s.read_exact(&mut first)?;
        let idle_h1_closed = ends(s)?;
        let idle_h2 = h2_drain(ports.timers, Vec::new())?;
        let stalled = {
            let mut s = connect(ports.timers)?;
            s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")?;
            read_response(s)?
        };
        // Busy past max_connection_duration (1 s): a response says close.
        let mut aged_out = false;
        let mut s = connect(ports.aging)?;
        for _ in 0..100 {
            if s.write_all(one).is_err() {
                aged_out = true;
                break;
            }
            let seen = read_response(s.try_clone()?)?;
            if seen.closes {
                aged_out = true;
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        // Idle past the park: closed when its idle timeout says.
        let mut s = connect(ports.idling)?;
        s.set_read_timeout(Some(Duration::from_secs(6)))?;
        s.write_all(one)?;
        read_response(s.try_clone()?)?;
        let answered = Instant::now();
        let closed = ends(s)?;
        let took = answered.elapsed();
        let idle_closed_on_time =
            closed && took.abs_diff(Duration::from_millis(3000)) < Duration::from_millis(400);
        if !idle_closed_on_time {
            eprintln!("idle close after {took:?} (closed: {closed})");
        }
        good(ports.edge)?;
        let counters = [
            "http.timers.downstream_cx_max_requests_reached",
            "http.timers.downstream_cx_idle_timeout",
            "http.timers.downstream_rq_idle_timeout",
            "http.aging.downstream_cx_max_duration_reached",
        ]
        .iter()
        .map(|n| p.stat(n).map(|v| v.min(1)))
        .collect::<Result<Vec<_>>>()?;
        Ok(Lifetimes {
            max_requests,
            max_requests_h2_goaway: h2,
            idle_h1_closed,
            idle_h2_goaway: idle_h2,
            stalled_body: stalled.status,
            stalled_body_text: String::from_utf8_lossy(&stalled.body).into_owned(),
            aged_out,
            idle_closed_on_time,
            counters,
        })
    })?;
    let Some((ferry, envoy)) = observed else {
        return skipped();
    };
    eprintln!("ferry {ferry:?}\nenvoy {envoy:?}");
    assert_eq!(ferry, envoy);
    assert_eq!(ferry.max_requests, vec![false, false, true]);
    assert!(ferry.idle_h1_closed && ferry.idle_h2_goaway && ferry.aged_out);
    assert!(ferry.idle_closed_on_time);
    assert_eq!(ferry.stalled_body, Some(408));
    assert_eq!(ferry.counters, vec![1, 1, 1, 1]);
    Ok(())
}

/// What one keep-alive connection saw across idle periods.
#[derive(Debug, PartialEq, Eq)]
struct AcrossIdle {
    /// (status, closes, complete) of each response, in order.
    responses: Vec<(Option<u16>, bool, bool)>,
    /// A body posted in two parts after an idle period reached the backend
    /// whole (its SHA-256, as the backend reports it).
    posted_body_echoed: bool,
}

/// A keep-alive connection that goes idle between requests is served as
/// before when the client sends again, whatever the shape of what it sends:
/// a whole request, a head split across writes, two pipelined requests, a
/// body in two parts, a head begun before the idle period. Ferry parks such
/// a connection after a second without requests (it holds no HTTP/1 codec
/// then), which the `downstream_cx_http1_parked` gauge shows.
#[test]
fn keep_alive_connections_idle_between_requests_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let b = Backends::start()?;
    let idle = Duration::from_millis(1600);
    let observed = differential(&b, |p, ports| {
        let ferry = matches!(p, Proxy::Ferry(_));
        let parked = || p.stat("http.edge.downstream_cx_http1_parked");
        let one = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let s = connect(ports.edge)?;
        let mut w = Wire {
            s: s.try_clone()?,
            buf: Vec::new(),
            eof: false,
        };
        let mut s = s;
        let mut responses = Vec::new();
        let mut seen = |w: &mut Wire| -> Result<Seen> {
            let r = read_response_on(w)?;
            responses.push((r.status, r.closes, r.complete));
            Ok(r)
        };
        s.write_all(one)?;
        seen(&mut w)?;
        thread::sleep(idle);
        if ferry && parked()? != 1 {
            bail!("the idle keep-alive connection was not parked");
        }
        // A whole request.
        s.write_all(one)?;
        seen(&mut w)?;
        if ferry && parked()? != 0 {
            bail!("a connection that sent a request is still counted as parked");
        }
        // A head split across two writes.
        thread::sleep(idle);
        s.write_all(b"GET /ok HTTP/1.1\r\nHo")?;
        thread::sleep(Duration::from_millis(200));
        s.write_all(b"st: a\r\n\r\n")?;
        seen(&mut w)?;
        // Two pipelined requests in one write.
        thread::sleep(idle);
        let mut two = one.to_vec();
        two.extend_from_slice(one);
        s.write_all(&two)?;
        seen(&mut w)?;
        seen(&mut w)?;
        // A body in two parts.
        thread::sleep(idle);
        s.write_all(b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\nfirst-ten!")?;
        thread::sleep(Duration::from_millis(200));
        s.write_all(b"second-ten")?;
        let posted = seen(&mut w)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, b"first-ten!second-ten");
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let posted_body_echoed = String::from_utf8_lossy(&posted.body).contains(&hex);
        // A head begun before an idle period and finished after it: the
        // connection is not parked while a head is on its way.
        s.write_all(b"GET /ok HTTP/1.1\r\n")?;
        thread::sleep(idle);
        if ferry && parked()? != 0 {
            bail!("a connection with a head on its way was parked");
        }
        s.write_all(b"Host: a\r\n\r\n")?;
        seen(&mut w)?;
        // Parked, then closed by the client: the proxy goes on serving.
        thread::sleep(idle);
        if ferry && parked()? != 1 {
            bail!("the idle keep-alive connection was not parked again");
        }
        drop(s);
        drop(w);
        thread::sleep(Duration::from_millis(200));
        if ferry && parked()? != 0 {
            bail!("a closed connection is still counted as parked");
        }
        good(ports.edge)?;
        Ok(AcrossIdle {
            responses,
            posted_body_echoed,
        })
    })?;
    let Some((ferry, envoy)) = observed else {
        return skipped();
    };
    eprintln!("ferry {ferry:?}\nenvoy {envoy:?}");
    assert_eq!(ferry, envoy);
    assert_eq!(ferry.responses, vec![(Some(200), false, true); 7]);
    assert!(ferry.posted_body_echoed);
    Ok(())
}

/// Opens an HTTP/2 connection, sends `frames` and reads until a GOAWAY (`true`) or the end
/// of the connection or the read timeout (`false`).
fn h2_drain(port: u16, frames: Vec<u8>) -> Result<bool> {
    let mut s = connect(port)?;
    let mut all = PREFACE.to_vec();
    all.extend(frame(0x4, 0, 0, &[]));
    all.extend(frames);
    s.write_all(&all)?;
    let mut w = Wire {
        s,
        buf: Vec::new(),
        eof: false,
    };
    loop {
        let head = match w.take(9) {
            Ok(h) => h,
            Err(_) => return Ok(false),
        };
        if head.len() < 9 {
            return Ok(false);
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        if head[3] == 0x7 {
            return Ok(true);
        }
        w.take(len)?;
    }
}
