//! Ferry's data path on real sockets over loopback: real clients (curl, h2load, grpcio,
//! websockets, raw sockets) talk to a `ferry sidecar` in front of the backends of
//! `tests/apps/`. Every test checks what the client got and, through Ferry's admin `/stats`,
//! that the traffic really went through Ferry.
//!
//! Needs the `ferry` binary (`cargo build -p ferry-proxy`), curl, h2load and Python 3 with
//! `grpcio` and `websockets`.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, apps_dir, curl, free_port, http_connection_manager,
    http_listener, listener, local, read_response, run, static_cluster, tcp_proxy,
};
use serde_json::{Value, json};

/// A client connection to Ferry. Requests are written whole: without Nagle's algorithm a
/// request split over writes would wait for delayed ACKs.
fn connect(port: u16) -> Result<TcpStream> {
    let stream = TcpStream::connect(local(port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The echo's JSON answer: the body after the last blank line of `curl -i` output.
fn echo_json(text: &str) -> Result<Value> {
    let body = text.rsplit("\r\n\r\n").next().unwrap_or(text);
    serde_json::from_str(body).with_context(|| format!("not an echo answer: {text:?}"))
}

/// The header names the backend received, exactly as they came on the wire.
fn header_names(echo: &Value) -> Vec<String> {
    echo["headers"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter_map(|h| h[0].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn header<'a>(echo: &'a Value, name: &str) -> Option<&'a str> {
    echo["headers"].as_array()?.iter().find_map(|h| {
        h[0].as_str()
            .filter(|n| n.eq_ignore_ascii_case(name))
            .and(h[1].as_str())
    })
}

/// One HTTP listener `in` on a fresh port in front of an HTTP/1.1 echo backend (`backend`).
fn simple(app_args: &[&str]) -> Result<(App, Ferry, u16)> {
    simple_with(app_args, &[])
}

/// [`simple`] with extra arguments for Ferry.
fn simple_with(app_args: &[&str], ferry_args: &[&str]) -> Result<(App, Ferry, u16)> {
    let app = App::http("backend", app_args)?;
    let port = free_port();
    let cfg = Bootstrap::new()
        .http("in", port, "backend")
        .static_cluster("backend", &[app.port], Upstream::Http1)
        .render();
    let ferry = Ferry::start_with(&cfg, ferry_args)?;
    Ok((app, ferry, port))
}

/// What a streaming transfer may cost: Ferry's whole peak RSS, whatever the size of the body
/// (a debug build already peaks at about 48 MiB while it loads its configuration).
const RSS_LIMIT: u64 = 64 << 20;

/// Ferry's arguments for the memory-bounded tests. One worker thread: with two, buffers
/// allocated on one worker and freed on the other stay with the allocator and add a
/// body-size-independent 10-30 MiB that would blur what these tests measure (buffering).
const ONE_WORKER: &[&str] = &["--concurrency", "1"];

// ------------------------------------------------------------------------------ HTTP/1

#[test]
fn http10_request_gets_an_http10_answer() -> Result<()> {
    let _lock = RunLock::shared();
    // As Envoy: HTTP/1.0 is refused (426) unless the connection manager accepts it.
    let (_app, ferry, port) = simple(&[])?;
    let out = stdout(&curl(&["--http1.0", "-i", &url(port, "/old")])?);
    ensure!(out.starts_with("HTTP/1.1 426"), "status line: {out:?}");
    ensure!(ferry.stat("cluster.backend.upstream_rq_total") == 0);
    drop(ferry);
    let app = App::http("backend", &[])?;
    let port = free_port();
    let routes = vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}})];
    let mut hcm = http_connection_manager("in", routes);
    hcm["typed_config"]["http_protocol_options"] = json!({"accept_http_10": true});
    let cfg = Bootstrap::new()
        .listener(listener("in", port, vec![json!({"filters": [hcm]})]))
        .static_cluster("backend", &[app.port], Upstream::Http1)
        .render();
    let ferry = Ferry::start(&cfg)?;
    let out = stdout(&curl(&["--http1.0", "-i", &url(port, "/old")])?);
    ensure!(out.starts_with("HTTP/1.0 200"), "status line: {out:?}");
    let echo = echo_json(&out)?;
    ensure!(echo["path"] == "/old" && echo["method"] == "GET", "{echo}");
    ensure!(ferry.stat("http.in.downstream_rq_http1_total") == 1);
    ensure!(ferry.stat("http.in.downstream_rq_2xx") == 1);
    ensure!(ferry.stat("cluster.backend.upstream_rq_total") == 1);
    Ok(())
}

#[test]
fn keep_alive_reuses_one_upstream_connection() -> Result<()> {
    let _lock = RunLock::shared();
    let (_app, ferry, port) = simple(&[])?;
    let stream = connect(port)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    // The most requests the backend saw on one connection.
    let mut busiest = 0;
    for i in 0..50 {
        writer.write_all(format!("GET /ka/{i} HTTP/1.1\r\nHost: svc\r\n\r\n").as_bytes())?;
        let resp = read_response(&mut reader)?;
        ensure!(resp.status == 200, "request {i}: {}", resp.status_line);
        let echo = resp.json()?;
        ensure!(echo["path"] == format!("/ka/{i}"), "{echo}");
        busiest = busiest.max(echo["conn_requests"].as_u64().unwrap_or(0));
    }
    // One connection, or two when a request arrived before the previous response's
    // connection was back in the pool: the pool takes it back in a task of its own, which
    // can run after the client has read the whole response and sent the next request.
    let upstream_cx = ferry.stat("cluster.backend.upstream_cx_total");
    ensure!(
        upstream_cx <= 2,
        "50 sequential requests opened {upstream_cx} upstream connections"
    );
    ensure!(
        busiest >= 25,
        "no backend connection served more than {busiest} requests"
    );
    ensure!(ferry.stat("http.in.downstream_cx_total") == 1);
    ensure!(ferry.stat("http.in.downstream_rq_total") == 50);
    ensure!(ferry.stat("cluster.backend.upstream_rq_2xx") == 50);
    Ok(())
}

#[test]
fn expect_100_continue() -> Result<()> {
    let _lock = RunLock::shared();
    let (_app, ferry, port) = simple(&[])?;
    let started = Instant::now();
    let out = stdout(&curl(&[
        "-i",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "10",
        "--data-binary",
        &"x".repeat(100_000),
        &url(port, "/upload"),
    ])?);
    let elapsed = started.elapsed();
    ensure!(
        out.starts_with("HTTP/1.1 100 Continue"),
        "no interim response: {out:?}"
    );
    ensure!(out.contains("HTTP/1.1 200"), "{out:?}");
    // Without the interim response curl would have waited out --expect100-timeout.
    ensure!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let echo = echo_json(&out)?;
    ensure!(echo["body_len"] == 100_000, "{echo}");
    ensure!(
        header(&echo, "expect").is_none(),
        "Expect was forwarded: {echo}"
    );
    ensure!(ferry.stat("cluster.backend.upstream_rq_2xx") == 1);
    Ok(())
}

#[test]
fn hop_by_hop_headers_stripped_and_proxy_headers_added() -> Result<()> {
    let _lock = RunLock::shared();
    let (_app, ferry, port) = simple(&[])?;
    let stream = connect(port)?;
    let mut writer = stream.try_clone()?;
    writer.write_all(
        b"GET /headers HTTP/1.1\r\nHost: svc.local\r\nConnection: keep-alive, X-Secret\r\n\
          X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
          X-MiXeD-Case: 1\r\nUser-Agent: raw-test\r\n\r\n",
    )?;
    let resp = read_response(&mut BufReader::new(stream))?;
    ensure!(resp.status == 200, "{}", resp.status_line);
    let echo = resp.json()?;
    let names = header_names(&echo);
    for gone in ["x-secret", "keep-alive", "proxy-connection"] {
        ensure!(
            !names.iter().any(|n| n.eq_ignore_ascii_case(gone)),
            "{gone} reached the backend: {names:?}"
        );
    }
    if let Some(conn) = header(&echo, "connection") {
        ensure!(
            !conn.to_ascii_lowercase().contains("x-secret"),
            "Connection forwarded: {conn}"
        );
    }
    // Names are written in lower case, as Envoy writes them (see
    // `header_names_are_written_in_envoys_case`).
    ensure!(
        names.iter().any(|n| n == "x-mixed-case") && names.iter().any(|n| n == "user-agent"),
        "header names not in lower case: {names:?}"
    );
    ensure!(header(&echo, "x-forwarded-proto") == Some("http"), "{echo}");
    let id = header(&echo, "x-request-id").unwrap_or_default();
    ensure!(
        id.len() == 36 && id.matches('-').count() == 4,
        "x-request-id {id:?}"
    );
    ensure!(header(&echo, "host") == Some("svc.local"), "{echo}");
    ensure!(ferry.stat("cluster.backend.upstream_rq_total") == 1);
    Ok(())
}

/// `header_key_format` as Envoy writes HTTP/1 header names: lower case by default, as they
/// came with the `preserve_case` formatter, capitalised words with `proper_case_words`; set
/// on the connection manager (what the client gets back) and on the cluster (what the backend
/// sees). Ferry and Envoy 1.40 are given the same bootstrap and must write the same names.
#[test]
fn header_names_are_written_in_envoys_case() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let Some(envoy_bin) = ferry_tests::envoy::bin()? else {
        return Ok(());
    };
    let preserve = json!({"stateful_formatter": {"name": "preserve_case", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig"}}});
    let proper = json!({"proper_case_words": {}});
    let config = |port: u16, format: Option<&Value>| -> Result<Value> {
        let mut cfg: Value = serde_json::from_str(
            &Bootstrap::new()
                .http("in", port, "backend")
                .static_cluster("backend", &[app.port], Upstream::Http1)
                .render(),
        )?;
        if let Some(f) = format {
            cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                ["http_protocol_options"] = json!({"header_key_format": f});
            cfg["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {"header_key_format": f}}}});
        }
        Ok(cfg)
    };
    // The names the backend saw and the backend's own response headers as the client got
    // them.
    let exchange = |port: u16| -> Result<(Vec<String>, Vec<String>)> {
        let stream = connect(port)?;
        let mut writer = stream.try_clone()?;
        writer.write_all(
            b"GET /headers HTTP/1.1\r\nHost: svc.local\r\nX-MiXeD-Case: 1\r\n\
              x-lower-one: 1\r\nUser-Agent: raw-test\r\n\r\n",
        )?;
        let resp = read_response(&mut BufReader::new(stream))?;
        ensure!(resp.status == 200, "{}", resp.status_line);
        let upstream: Vec<String> = header_names(&resp.json()?)
            .into_iter()
            .filter(|n| {
                ["x-mixed-case", "x-lower-one", "user-agent"]
                    .contains(&n.to_ascii_lowercase().as_str())
            })
            .collect();
        let downstream: Vec<String> = resp
            .headers
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|n| {
                ["content-type", "content-length"].contains(&n.to_ascii_lowercase().as_str())
            })
            .collect();
        Ok((upstream, downstream))
    };
    for (label, format, expected) in [
        (
            "default",
            None,
            ["x-mixed-case", "x-lower-one", "user-agent", "content-type"],
        ),
        (
            "preserve_case",
            Some(&preserve),
            ["X-MiXeD-Case", "x-lower-one", "User-Agent", "Content-Type"],
        ),
        (
            "proper_case_words",
            Some(&proper),
            ["X-Mixed-Case", "X-Lower-One", "User-Agent", "Content-Type"],
        ),
    ] {
        let port = free_port();
        let ferry = Ferry::start_with(&config(port, format)?.to_string(), &[])?;
        let got_ferry = exchange(port).with_context(|| format!("Ferry, {label}"))?;
        drop(ferry);
        let port = free_port();
        let envoy =
            ferry_tests::envoy::Envoy::start_with(&envoy_bin, &config(port, format)?, port, &[])?;
        let got_envoy = exchange(port).with_context(|| format!("Envoy, {label}"))?;
        drop(envoy);
        ensure!(
            got_ferry == got_envoy,
            "{label}: Ferry wrote {got_ferry:?}, Envoy {got_envoy:?}"
        );
        for name in expected {
            ensure!(
                got_ferry.0.iter().chain(&got_ferry.1).any(|n| n == name),
                "{label}: {name} not written: {got_ferry:?}"
            );
        }
    }
    Ok(())
}

/// A backend that closes a kept-alive connection just as Ferry reuses it: every request
/// still succeeds, through a transparent retry on a fresh connection.
#[test]
fn keep_alive_race_is_retried_transparently() -> Result<()> {
    let _lock = RunLock::shared();
    let (_app, ferry, port) = simple(&["--drop-reused"])?;
    for i in 0..20 {
        // A new client connection each time, spaced out: only Ferry's pool carries state.
        let out = stdout(&curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url(port, &format!("/race/{i}")),
        ])?);
        ensure!(out == "200", "request {i} answered {out}");
        thread::sleep(Duration::from_millis(20));
    }
    ensure!(ferry.stat("http.in.downstream_rq_5xx") == 0);
    ensure!(ferry.stat("http.in.downstream_rq_2xx") == 20);
    let retried = ferry.stat("cluster.backend.upstream_rq_retry_stale_connection");
    ensure!(retried > 0, "no stale-connection retry happened");
    Ok(())
}

/// A backend whose keep-alive timeout (50 ms) matches the client's pace: whatever side of the
/// race a request lands on, it must not fail.
#[test]
fn keep_alive_idle_close_never_fails_a_request() -> Result<()> {
    let _lock = RunLock::shared();
    let (_app, ferry, port) = simple(&["--idle-close", "50"])?;
    let stream = connect(port)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    for i in 0..40 {
        writer.write_all(format!("GET /idle/{i} HTTP/1.1\r\nHost: svc\r\n\r\n").as_bytes())?;
        let resp = read_response(&mut reader)?;
        ensure!(resp.status == 200, "request {i}: {}", resp.status_line);
        // Around the backend's idle timeout, on both sides of it.
        thread::sleep(Duration::from_millis(45 + (i % 3) * 5));
    }
    ensure!(ferry.stat("http.in.downstream_rq_5xx") == 0);
    ensure!(ferry.stat("cluster.backend.upstream_rq_2xx") == 40);
    eprintln!(
        "idle-close race: {} upstream connections, {} stale-connection retries",
        ferry.stat("cluster.backend.upstream_cx_total"),
        ferry.stat("cluster.backend.upstream_rq_retry_stale_connection")
    );
    Ok(())
}

// ------------------------------------------------------------------------------ HTTP/2

#[test]
fn h2c_prior_knowledge_to_http1_upstream() -> Result<()> {
    let _lock = RunLock::shared();
    let (_app, ferry, port) = simple(&[])?;
    let out = stdout(&curl(&[
        "--http2-prior-knowledge",
        "-i",
        "-H",
        "X-Trace: abc",
        &url(port, "/h2/one"),
    ])?);
    ensure!(out.starts_with("HTTP/2 200"), "{out:?}");
    let echo = echo_json(&out)?;
    ensure!(
        echo["path"] == "/h2/one" && echo["version"] == "HTTP/1.1",
        "{echo}"
    );
    ensure!(header(&echo, "x-trace") == Some("abc"), "{echo}");
    ensure!(
        header(&echo, "host") == Some(&*format!("127.0.0.1:{port}")),
        "{echo}"
    );
    ensure!(ferry.stat("http.in.downstream_rq_http2_total") == 1);
    ensure!(ferry.stat("cluster.backend.upstream_rq_2xx") == 1);
    Ok(())
}

/// h2 on both sides: a front Ferry speaks HTTP/2 to a second Ferry (codec AUTO), which
/// forwards to the HTTP/1.1 echo.
#[test]
fn h2c_prior_knowledge_to_http2_upstream() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let inner_port = free_port();
    let inner = Ferry::start(
        &Bootstrap::new()
            .http("inner", inner_port, "backend")
            .static_cluster("backend", &[app.port], Upstream::Http1)
            .render(),
    )?;
    let port = free_port();
    let front = Ferry::start(
        &Bootstrap::new()
            .http("in", port, "inner")
            .static_cluster("inner", &[inner_port], Upstream::Http2)
            .render(),
    )?;
    for path in ["/a", "/b"] {
        let out = stdout(&curl(&["--http2-prior-knowledge", "-i", &url(port, path)])?);
        ensure!(out.starts_with("HTTP/2 200"), "{out:?}");
        ensure!(echo_json(&out)?["path"] == path);
    }
    ensure!(front.stat("http.in.downstream_rq_http2_total") == 2);
    ensure!(front.stat("cluster.inner.upstream_rq_2xx") == 2);
    ensure!(front.stat("cluster.inner.upstream_cx_total") == 1);
    // The inner proxy was spoken to in HTTP/2, on one multiplexed connection.
    ensure!(inner.stat("http.inner.downstream_rq_http2_total") == 2);
    ensure!(inner.stat("http.inner.downstream_cx_total") == 1);
    Ok(())
}

#[test]
fn h2load_many_streams() -> Result<()> {
    let _lock = RunLock::shared();
    let (_app, ferry, port) = simple(&[])?;
    let out = run(
        Command::new("h2load").args(["-n", "2000", "-c", "4", "-m", "10", &url(port, "/load")]),
        Duration::from_secs(60),
    )?;
    let text = stdout(&out);
    ensure!(out.status.success(), "h2load failed: {text}");
    ensure!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "h2load: {text}"
    );
    ensure!(text.contains("status codes: 2000 2xx"), "h2load: {text}");
    ensure!(ferry.stat("http.in.downstream_rq_http2_total") == 2000);
    ensure!(ferry.stat("http.in.downstream_cx_total") == 4);
    ensure!(ferry.stat("cluster.backend.upstream_rq_2xx") == 2000);
    Ok(())
}

#[test]
fn grpc_unary_and_server_streaming() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::mode("grpc")?;
    let port = free_port();
    let ferry = Ferry::start(
        &Bootstrap::new()
            .http("in", port, "grpc")
            .static_cluster("grpc", &[app.port], Upstream::Http2)
            .render(),
    )?;
    let out = run(
        Command::new("python3")
            .arg(apps_dir().join("clients.py"))
            .args(["grpc", &format!("127.0.0.1:{port}")]),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "grpc client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_str(stdout(&out).trim())?;
    let want = json!({
        "unary": {"code": "OK", "reply": "hello through ferry", "trailers": {"x-echo-trailer": "done"}},
        "stream": {"code": "OK", "messages": ["0", "1", "2", "3", "4"], "trailers": {"x-echo-trailer": "done"}},
    });
    ensure!(got == want, "got {got}");
    ensure!(ferry.stat("http.in.downstream_rq_http2_total") == 2);
    ensure!(ferry.stat("cluster.grpc.upstream_rq_2xx") == 2);
    Ok(())
}

#[test]
fn websocket_echo() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::mode("ws")?;
    let port = free_port();
    let ferry = Ferry::start(
        &Bootstrap::new()
            .http("in", port, "ws")
            .static_cluster("ws", &[app.port], Upstream::Http1)
            .render(),
    )?;
    let out = run(
        Command::new("python3")
            .arg(apps_dir().join("clients.py"))
            .args(["ws", &format!("ws://127.0.0.1:{port}/chat")]),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "ws client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_str(stdout(&out).trim())?;
    ensure!(
        got == json!({"text": "hello through ferry", "binary_ok": true, "binary_len": 102400}),
        "got {got}"
    );
    ensure!(ferry.stat("http.in.downstream_rq_1xx") == 1);
    ensure!(ferry.stat("cluster.ws.upstream_rq_1xx") == 1);
    Ok(())
}

// ------------------------------------------------------------------------------ TCP

#[test]
fn tcp_half_close_passes_through() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::mode("tcp")?;
    let port = free_port();
    let ferry = Ferry::start(
        &Bootstrap::new()
            .tcp("tcpin", port, "echo")
            .static_cluster("echo", &[app.port], Upstream::Http1)
            .render(),
    )?;
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"hello\n")?;
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf)?;
    ensure!(&buf == b"hello\n");
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    ensure!(
        rest == b"bye\n",
        "after half-close got {:?}",
        String::from_utf8_lossy(&rest)
    );
    ensure!(ferry.stat("tcp.tcpin.downstream_cx_total") == 1);
    Ok(())
}

/// Connects and reads the banner; returns how long it took.
fn read_banner(port: u16) -> Result<(TcpStream, Duration)> {
    read_banner_within(port, Duration::from_secs(5))
}

fn read_banner_within(port: u16, within: Duration) -> Result<(TcpStream, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(within))?;
    let want = b"220 ferry-test ready\r\n";
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)
        .context("the banner did not arrive")?;
    let elapsed = started.elapsed();
    ensure!(got == want, "banner {:?}", String::from_utf8_lossy(&got));
    // The connection is a normal echo after the banner.
    s.write_all(b"ping\n")?;
    let mut echo = [0u8; 5];
    s.read_exact(&mut echo)?;
    ensure!(&echo == b"ping\n");
    Ok((s, elapsed))
}

#[test]
fn server_first_banner_through_tcp_proxy() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::mode("banner")?;
    let port = free_port();
    let ferry = Ferry::start(
        &Bootstrap::new()
            .tcp("smtp", port, "banner")
            .static_cluster("banner", &[app.port], Upstream::Http1)
            .render(),
    )?;
    let (_s, elapsed) = read_banner(port)?;
    ensure!(
        elapsed < Duration::from_millis(200),
        "banner took {elapsed:?}"
    );
    ensure!(ferry.stat("tcp.smtp.downstream_cx_total") == 1);
    Ok(())
}

/// A listener that looks at the first bytes to choose between HTTP and TCP
/// (`http_inspector`), with `listener_filters_timeout` (`None`: unset) and
/// `continue_on_listener_filters_timeout`.
fn detecting_bootstrap(
    port: u16,
    banner: u16,
    web: u16,
    timeout: Option<&str>,
    continue_on_timeout: bool,
) -> String {
    let routes = vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "web"}})];
    let mut l = listener(
        "mixed",
        port,
        vec![
            json!({
                "filter_chain_match": {"application_protocols": ["http/1.1", "h2c"]},
                "filters": [http_connection_manager("mixed_http", routes)],
            }),
            json!({"filters": [tcp_proxy("mixed_tcp", "banner")]}),
        ],
    );
    l["listener_filters"] = json!([{
        "name": "envoy.filters.listener.http_inspector",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"},
    }]);
    if let Some(t) = timeout {
        l["listener_filters_timeout"] = json!(t);
    }
    l["continue_on_listener_filters_timeout"] = json!(continue_on_timeout);
    Bootstrap::new()
        .listener(l)
        .static_cluster("banner", &[banner], Upstream::Http1)
        .static_cluster("web", &[web], Upstream::Http1)
        .render()
}

/// What a client sees on a detecting listener: a server-first protocol's
/// banner (how long it took, or that it never came), and an HTTP request
/// whose client waits before sending it (which chain answered).
fn detection_outcomes(port: u16) -> Result<(Option<Duration>, String)> {
    // The 1 s limits below are well inside 2.5 s.
    let banner = match read_banner_within(port, Duration::from_millis(2500)) {
        Ok((_s, elapsed)) => Some(elapsed),
        Err(_) => None,
    };
    // A slow HTTP client: connected, silent for 300 ms, then its request.
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let slow = if answer.starts_with("HTTP/1.1 200") && answer.contains("\"web\"") {
        "HTTP chain".to_string()
    } else if answer.starts_with("220 ferry-test ready") {
        "TCP chain".to_string()
    } else {
        format!("{:?}", answer.lines().next().unwrap_or(""))
    };
    Ok((banner, slow))
}

/// Protocol detection waits as Envoy's does: a client that is silent for a
/// while (a slow HTTP client, or a server-first protocol's) is waited for
/// until the listener's `listener_filters_timeout` (none at all for `0s`,
/// istiod's setting), never sent to the TCP chain because it was slow; at
/// the timeout the connection goes on undetected
/// (`continue_on_listener_filters_timeout`) or is closed. Compared with
/// Envoy 1.40 on the same bootstraps.
#[test]
fn protocol_detection_waits_as_envoy_waits() -> Result<()> {
    let _lock = RunLock::shared();
    let banner = App::mode("banner")?;
    let web = App::http("web", &[])?;
    let envoy = ferry_tests::envoy::bin()?;
    for (timeout, cont) in [(Some("0s"), true), (Some("1s"), true), (Some("1s"), false)] {
        let port = free_port();
        let config = detecting_bootstrap(port, banner.port, web.port, timeout, cont);
        let ferry = Ferry::start(&config)?;
        let (f_banner, f_slow) = detection_outcomes(port)?;
        // Never the TCP chain for a slow HTTP client.
        ensure!(
            f_slow == "HTTP chain",
            "{timeout:?}/{cont}: slow HTTP client: {f_slow}"
        );
        match (timeout, cont) {
            // No limit: the banner never comes (the client waits for it).
            (Some("0s"), _) => ensure!(f_banner.is_none(), "0s: banner after {f_banner:?}"),
            // At the limit the connection goes on to the TCP chain...
            (_, true) => ensure!(
                f_banner.is_some_and(|d| d >= Duration::from_millis(900)),
                "{timeout:?}: banner after {f_banner:?}"
            ),
            // ...or is closed.
            (_, false) => ensure!(f_banner.is_none(), "closed: banner after {f_banner:?}"),
        }
        if cont && timeout == Some("1s") {
            ensure!(ferry.stat("tcp.mixed_tcp.downstream_cx_total") == 1);
        }
        drop(ferry);
        if let Some(bin) = &envoy {
            let value: serde_json::Value = serde_json::from_str(&config)?;
            let _e = ferry_tests::envoy::Envoy::start(bin, &value, port)?;
            let (e_banner, e_slow) = detection_outcomes(port)?;
            ensure!(
                (e_banner.is_some(), e_slow.as_str()) == (f_banner.is_some(), f_slow.as_str()),
                "{timeout:?}/{cont}: Envoy {e_banner:?} {e_slow}, Ferry {f_banner:?} {f_slow}"
            );
        } else {
            // `envoy::bin` fails under CI=true; elsewhere the comparison is skipped.
            eprintln!("skipped: the comparison with Envoy (not installed)");
        }
    }
    // HTTP on a detecting listener goes to the HTTP chain in both protocols.
    let port = free_port();
    let ferry = Ferry::start(&detecting_bootstrap(
        port,
        banner.port,
        web.port,
        None,
        false,
    ))?;
    let out = stdout(&curl(&["-i", &url(port, "/web")])?);
    ensure!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    ensure!(echo_json(&out)?["name"] == "web");
    let out = stdout(&curl(&[
        "--http2-prior-knowledge",
        "-i",
        &url(port, "/web2"),
    ])?);
    ensure!(out.starts_with("HTTP/2 200"), "{out:?}");
    ensure!(ferry.stat("http.mixed_http.downstream_rq_2xx") == 2);
    Ok(())
}

// ------------------------------------------------------------------------------ streaming

/// 1 GiB uploaded in chunks streams through in bounded memory.
#[test]
fn upload_1gib_streams_in_bounded_memory() -> Result<()> {
    const GIB: u64 = 1 << 30;
    let _lock = RunLock::exclusive();
    let (_app, ferry, port) = simple_with(&[], ONE_WORKER)?;
    let started = Instant::now();
    let mut producer = Command::new("head")
        .args(["-c", &GIB.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()?;
    let pipe = producer
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no pipe from head"))?;
    let mut upload = Command::new("curl")
        .args(["-sS", "--max-time", "300", "-T", "-"])
        .arg(url(port, "/upload"))
        .stdin(pipe)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = ferry_tests::proxy::wait_output(&mut upload, Duration::from_secs(320));
    let _ = producer.kill();
    let _ = producer.wait();
    let out = out?;
    let elapsed = started.elapsed();
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(echo["body_len"] == GIB, "{echo}");
    ensure!(echo["method"] == "PUT", "{echo}");
    ensure!(
        header(&echo, "transfer-encoding") == Some("chunked"),
        "{echo}"
    );
    let rss = ferry.peak_rss()?;
    ensure!(
        rss < RSS_LIMIT,
        "ferry peaked at {} MiB moving 1 GiB",
        rss >> 20
    );
    ensure!(ferry.stat("cluster.backend.upstream_rq_2xx") == 1);
    eprintln!(
        "1 GiB upload through ferry: {elapsed:?}, peak RSS {} MiB",
        rss >> 20
    );
    Ok(())
}

#[test]
fn download_100mb() -> Result<()> {
    const SIZE: u64 = 100 << 20;
    let _lock = RunLock::shared();
    let (_app, ferry, port) = simple_with(&[], ONE_WORKER)?;
    let out = stdout(&curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &url(port, &format!("/bytes/{SIZE}")),
    ])?);
    ensure!(out == format!("200 {SIZE}"), "{out}");
    let rss = ferry.peak_rss()?;
    ensure!(rss < RSS_LIMIT, "ferry peaked at {} MiB", rss >> 20);
    ensure!(ferry.stat("cluster.backend.upstream_rq_2xx") == 1);
    Ok(())
}

// ------------------------------------------------------------------------------ drain

#[test]
fn sigterm_drains_in_flight_requests() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let port = free_port();
    let cfg = Bootstrap::new()
        .http("in", port, "backend")
        .static_cluster("backend", &[app.port], Upstream::Http1)
        .render();
    let mut ferry = Ferry::start_with(&cfg, &["--drain-timeout", "5s"])?;
    let in_flight = thread::spawn(move || curl(&["-i", &url(port, "/sleep/1500")]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while ferry.stat("cluster.backend.upstream_rq_total") == 0 {
        ensure!(Instant::now() < deadline, "the request never reached ferry");
        thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    ferry.sigterm()?;
    // New connections are refused while the old request finishes.
    let deadline = Instant::now() + Duration::from_secs(1);
    while TcpStream::connect(local(port)).is_ok() {
        ensure!(
            Instant::now() < deadline,
            "ferry still accepts connections while draining"
        );
        thread::sleep(Duration::from_millis(10));
    }
    ensure!(
        !in_flight.is_finished(),
        "the in-flight request ended early"
    );
    let out = in_flight
        .join()
        .map_err(|_| anyhow!("client thread panicked"))??;
    let text = stdout(&out);
    ensure!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    ensure!(echo_json(&text)?["path"] == "/sleep/1500");
    let status = ferry.wait_exit(Duration::from_secs(10))?;
    ensure!(status.code() == Some(0), "ferry exited with {status}");
    ensure!(
        signalled.elapsed() < Duration::from_secs(4),
        "drain waited {:?}",
        signalled.elapsed()
    );
    Ok(())
}

// ------------------------------------------------------------------------------ local replies

#[test]
fn local_replies() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let closed_port = free_port();
    let port = free_port();
    let routes = vec![
        json!({"match": {"prefix": "/direct"},
               "direct_response": {"status": 200, "body": {"inline_string": "hello from ferry"}}}),
        json!({"match": {"prefix": "/empty"}, "route": {"cluster": "empty"}}),
        json!({"match": {"prefix": "/refused"}, "route": {"cluster": "refused"}}),
        json!({"match": {"prefix": "/sleep"}, "route": {"cluster": "backend", "timeout": "1s"}}),
    ];
    let ferry = Ferry::start(
        &Bootstrap::new()
            .listener(http_listener("in", port, routes))
            .cluster(static_cluster("backend", &[app.port], Upstream::Http1))
            .cluster(static_cluster("empty", &[], Upstream::Http1))
            .cluster(static_cluster("refused", &[closed_port], Upstream::Http1))
            .render(),
    )?;
    let fetch = |path: &str| -> Result<(String, String)> {
        let out = stdout(&curl(&["-w", "\n%{http_code}", &url(port, path)])?);
        let (body, code) = out
            .rsplit_once('\n')
            .ok_or_else(|| anyhow!("curl output {out:?}"))?;
        Ok((code.to_string(), body.to_string()))
    };

    ensure!(fetch("/direct")? == ("200".into(), "hello from ferry".into()));
    let (code, _) = fetch("/nowhere")?;
    ensure!(code == "404", "no route: {code}");
    ensure!(ferry.stat("http.in.no_route") == 1);
    ensure!(fetch("/empty")? == ("503".into(), "no healthy upstream".into()));
    let (code, body) = fetch("/refused")?;
    ensure!(code == "503", "connection refused: {code} {body}");
    ensure!(body.contains("connection failure"), "{body}");
    ensure!(ferry.stat("cluster.refused.upstream_cx_connect_fail") == 1);

    let started = Instant::now();
    let (code, body) = fetch("/sleep/3000")?;
    let elapsed = started.elapsed();
    ensure!(code == "504", "timeout: {code} {body}");
    ensure!(body == "upstream request timeout", "{body}");
    ensure!(
        elapsed >= Duration::from_millis(950) && elapsed < Duration::from_millis(2500),
        "504 after {elapsed:?}"
    );
    ensure!(ferry.stat("cluster.backend.upstream_rq_timeout") == 1);
    ensure!(ferry.stat("http.in.downstream_rq_5xx") == 3);
    Ok(())
}

// ------------------------------------------------------------------------------ bad config

/// Ferry refuses a bad bootstrap: exit status 1, a message naming what is wrong, and the
/// listener never bound.
fn rejected(cfg: &str, expect: &[&str], listen_port: u16) -> Result<()> {
    let mut ferry = Ferry::spawn(cfg, &[])?;
    let status = ferry.wait_exit(Duration::from_secs(10))?;
    let log = ferry.log();
    ensure!(status.code() == Some(1), "exit {status}: {log}");
    for e in expect {
        ensure!(log.contains(e), "message lacks {e:?}: {log}");
    }
    ensure!(
        !ferry_tests::proxy::accepts(listen_port),
        "something listens on {listen_port}"
    );
    Ok(())
}

#[test]
fn bad_config_is_rejected_with_a_precise_message() -> Result<()> {
    let _lock = RunLock::shared();
    let port = free_port();
    let base = || Bootstrap::new().static_cluster("backend", &[free_port()], Upstream::Http1);

    // An unknown field inside a typed_config.
    let mut tp = tcp_proxy("tcp", "backend");
    tp["typed_config"]["stat_prefx"] = json!("typo");
    let cfg = base()
        .listener(listener("tcp", port, vec![json!({"filters": [tp]})]))
        .render();
    rejected(
        &cfg,
        &[
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config",
            "stat_prefx",
        ],
        port,
    )?;

    // An invalid regex in a route.
    let routes =
        vec![json!({"match": {"safe_regex": {"regex": "([a-z"}}, "route": {"cluster": "backend"}})];
    let cfg = base().listener(http_listener("web", port, routes)).render();
    rejected(
        &cfg,
        &[
            "listener \"web\"",
            "routes[0].match.safe_regex.regex",
            "invalid regex",
        ],
        port,
    )?;

    // A route to a cluster nobody defined.
    let cfg = base().http("web", port, "nowhere").render();
    rejected(
        &cfg,
        &["listener \"web\"", "unknown cluster \"nowhere\""],
        port,
    )?;
    Ok(())
}

/// A TCP proxy connection with no byte either way for `idle_timeout` is
/// closed by the proxy (Envoy's tcp_proxy idle timeout), and counted.
#[test]
fn tcp_idle_timeout_closes_quiet_connections() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::mode("tcp")?;
    let port = free_port();
    let mut tp = tcp_proxy("idle", "echo");
    tp["typed_config"]["idle_timeout"] = serde_json::json!("1s");
    let ferry = Ferry::start(
        &Bootstrap::new()
            .listener(listener(
                "idle",
                port,
                vec![serde_json::json!({"filters": [tp]})],
            ))
            .static_cluster("echo", &[app.port], Upstream::Http1)
            .render(),
    )?;
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Traffic within the timeout keeps the connection open.
    for _ in 0..3 {
        s.write_all(b"ping\n")?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        std::thread::sleep(Duration::from_millis(600));
    }
    let quiet = Instant::now();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    let waited = quiet.elapsed();
    ensure!(rest.is_empty(), "unexpected bytes {rest:?}");
    ensure!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "closed after {waited:?} of silence"
    );
    ensure!(ferry.stat("tcp.idle.idle_timeout") == 1);
    Ok(())
}
