//! Requests are sent again only when it is safe, and boundedly. A raw TCP backend in this
//! test answers most requests and resets (RST) the connection after reading the ones it
//! is told to "crash" on; the same bootstrap runs through Ferry and Envoy 1.40, with a
//! warm pool of kept-alive upstream connections, and both must deliver a crashing request
//! the same number of times with the same status, response flags and retry counters:
//! once without a retry policy or with `connect-failure` only, `1 + num_retries` times
//! with `retry_on: reset`. A backend that closes its kept-alive connections right after
//! each answer (the keep-alive race) never fails a request through Ferry.
//!
//! Envoy comes from `ferry_tests::envoy`; without it the differential test is skipped with
//! a note, except under `CI=true`, where a missing Envoy fails it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    Bootstrap, Ferry, RunLock, TempDir, Upstream, free_port, http_connection_manager, http_request,
    listener, local, static_cluster,
};
use serde_json::{Value, json};

// ------------------------------------------------------------------------------ backend

/// How the raw backend treats a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answer keep-alive; reset after reading a request whose path contains `/crash`.
    ResetOnCrash,
    /// Answer every request (keep-alive, no `Connection: close`), then close at once.
    CloseAfterAnswer,
}

/// A raw HTTP/1.1 backend on a thread; counts requests per path.
struct Backend {
    port: u16,
    hits: Arc<Mutex<BTreeMap<String, u64>>>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    fn start(mode: Mode) -> Result<Backend> {
        let l = TcpListener::bind(local(0))?;
        let port = l.local_addr()?.port();
        let hits: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let h = h.clone();
                thread::spawn(move || serve(conn, mode, &h));
            }
        });
        Ok(Backend { port, hits, stop })
    }

    fn hits(&self, path: &str) -> u64 {
        self.hits
            .lock()
            .map(|m| m.get(path).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(local(self.port));
    }
}

fn serve(conn: TcpStream, mode: Mode, hits: &Mutex<BTreeMap<String, u64>>) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        // The rest of the head (the requests carry no body).
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        if let Ok(mut m) = hits.lock() {
            *m.entry(path.clone()).or_insert(0) += 1;
        }
        if mode == Mode::ResetOnCrash && path.contains("/crash") {
            // Read, then reset: SO_LINGER 0 makes the close an RST.
            let sock = socket2::SockRef::from(&writer);
            let _ = sock.set_linger(Some(Duration::ZERO));
            return;
        }
        if path.contains("/slow") {
            thread::sleep(Duration::from_millis(150));
        }
        let body = format!("{{\"path\":\"{path}\"}}");
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if writer
            .write_all(format!("{head}{body}").as_bytes())
            .is_err()
        {
            return;
        }
        if mode == Mode::CloseAfterAnswer {
            return;
        }
    }
}

// ------------------------------------------------------------------------------ client

/// One GET on its own connection: status and response head.
fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad response: {text:?}"))?;
    Ok((status, text))
}

// ------------------------------------------------------------------------------ config

fn route(prefix: &str, policy: Value) -> Value {
    let mut action = json!({"cluster": "svc", "timeout": "5s"});
    if let (Some(a), Some(p)) = (action.as_object_mut(), policy.as_object()) {
        a.extend(p.clone());
    }
    json!({"match": {"prefix": prefix}, "route": action})
}

fn config(port: u16, backend: u16, access_log: Option<&str>) -> Value {
    let routes = vec![
        route("/none/", json!({})),
        route(
            "/reset/",
            json!({"retry_policy": {"retry_on": "reset", "num_retries": 2}}),
        ),
        route(
            "/cf/",
            json!({"retry_policy": {"retry_on": "connect-failure", "num_retries": 2}}),
        ),
        route("/", json!({})),
    ];
    let mut hcm = http_connection_manager("in", routes);
    if let Some(path) = access_log {
        // Envoy's response flags, written where the test reads them (Ferry's come from
        // its own access log).
        hcm["typed_config"]["access_log"] = json!([{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": {"text_format_source": {"inline_string": "%REQ(:PATH)% response_flags=%RESPONSE_FLAGS% \n"}},
            },
        }]);
    }
    let doc = Bootstrap::new()
        .listener(listener("in", port, vec![json!({"filters": [hcm]})]))
        .cluster(static_cluster("svc", &[backend], Upstream::Http1))
        .render();
    serde_json::from_str(&doc).unwrap_or(Value::Null)
}

/// What one crashing request looked like through one proxy.
#[derive(Debug, PartialEq, Eq)]
struct Crash {
    route: &'static str,
    status: u16,
    delivered: u64,
    flags: String,
    retries: u64,
    limit_exceeded: u64,
}

fn flags_of(log: &str, path: &str) -> String {
    log.lines()
        .filter(|l| l.contains(path))
        .find_map(|l| {
            let f = l.split("response_flags=").nth(1)?;
            Some(
                f.trim_start_matches('"')
                    .split(['"', ' '])
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .unwrap_or_default()
}

/// Warms the proxy's pool with several kept-alive upstream connections, then sends one
/// crashing GET per route.
fn crash_all(
    port: u16,
    backend: &Backend,
    tag: &str,
    stat: &dyn Fn(&str) -> Result<u64>,
    log: &dyn Fn() -> String,
) -> Result<Vec<Crash>> {
    let warm: Vec<_> = (0..6)
        .map(|i| {
            let path = format!("/slow/{tag}/{i}");
            thread::spawn(move || get(port, &path))
        })
        .collect();
    for w in warm {
        let (status, _) = w.join().map_err(|_| anyhow!("client panicked"))??;
        if status != 200 {
            bail!("warm-up answered {status}");
        }
    }
    let mut out = Vec::new();
    for route in ["/none", "/reset", "/cf"] {
        let path = format!("{route}/crash/{tag}");
        let retries = stat("cluster.svc.upstream_rq_retry")?;
        let exceeded = stat("cluster.svc.upstream_rq_retry_limit_exceeded")?;
        let (status, _) = get(port, &path)?;
        thread::sleep(Duration::from_millis(200));
        out.push(Crash {
            route,
            status,
            delivered: backend.hits(&path),
            flags: path,
            retries: stat("cluster.svc.upstream_rq_retry")? - retries,
            limit_exceeded: stat("cluster.svc.upstream_rq_retry_limit_exceeded")? - exceeded,
        });
    }
    let log = log();
    for c in &mut out {
        c.flags = flags_of(&log, &c.flags);
    }
    Ok(out)
}

/// The bug this guards against: a reset after a GET was read made Ferry send it again on
/// every pooled connection in turn.
#[test]
fn a_request_read_then_reset_is_replayed_only_by_the_retry_policy() -> Result<()> {
    let _lock = RunLock::shared();
    let backend = Backend::start(Mode::ResetOnCrash)?;
    let port = free_port();
    let cfg = config(port, backend.port, None);
    let ferry = Ferry::start_with(&serde_json::to_string_pretty(&cfg)?, &["--access-log"])?;
    let through_ferry = crash_all(port, &backend, "ferry", &|n| Ok(ferry.stat(n)), &|| {
        ferry.log()
    })
    .with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    let expected = vec![
        Crash {
            route: "/none",
            status: 503,
            delivered: 1,
            flags: "UC".into(),
            retries: 0,
            limit_exceeded: 0,
        },
        Crash {
            route: "/reset",
            status: 503,
            delivered: 3,
            flags: "URX,UC".into(),
            retries: 2,
            limit_exceeded: 1,
        },
        Crash {
            route: "/cf",
            status: 503,
            delivered: 1,
            flags: "UC".into(),
            retries: 0,
            limit_exceeded: 0,
        },
    ];
    assert_eq!(through_ferry, expected, "through ferry");
    drop(ferry);
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let dir = TempDir::new("replay-envoy")?;
    let log_path = dir.path().join("access.log");
    let log_file = log_path.to_string_lossy().into_owned();
    let port = free_port();
    let e = Envoy::start(&bin, &config(port, backend.port, Some(&log_file)), port)?;
    let read_log = || {
        // Envoy flushes its access log files every 10 s; reopening them flushes now.
        let _ = http_request(local(e.admin()), "POST", "/reopen_logs");
        thread::sleep(Duration::from_millis(300));
        std::fs::read_to_string(&log_path).unwrap_or_default()
    };
    let through_envoy = crash_all(port, &backend, "envoy", &|n| e.stat(n), &read_log)
        .with_context(|| format!("through envoy:\n{}", e.log()))?;
    assert_eq!(
        through_envoy,
        through_ferry,
        "Envoy and Ferry differ; Envoy access log:\n{}",
        read_log()
    );
    Ok(())
}

/// A backend that closes every kept-alive connection right after answering: each request
/// Ferry sends on a pooled connection finds it closed, and is sent once more on a fresh
/// one; none fails, and no request reaches the backend twice.
/// A backend that closes after every answer without saying so. Once its close
/// has reached the proxy (a pause after each answer), a request never fails: a
/// connection found closed is not used, and one closed as the request crossed it
/// sends the request again on a new one. A request sent at once may instead land
/// in the server's receive buffer just before it closes; the server's kernel then
/// answers with a reset that on the wire is the same as a server that read the
/// request and crashed, so as in Envoy it fails the request (503, UC) unless the
/// route's retry policy covers resets, and then it succeeds. In no case is a
/// request delivered twice.
#[test]
fn a_backend_closing_after_each_answer_fails_no_request_once_its_close_is_seen() -> Result<()> {
    let _lock = RunLock::shared();
    let backend = Backend::start(Mode::CloseAfterAnswer)?;
    let port = free_port();
    let cfg = config(port, backend.port, None);
    let ferry = Ferry::start(&serde_json::to_string_pretty(&cfg)?)?;
    const N: usize = 40;
    let mut raced = 0;
    for (prefix, policy) in [("/race/", false), ("/reset/race/", true)] {
        for i in 0..N {
            let path = format!("{prefix}{i}");
            // Every other request waits until the previous close has surely arrived.
            let paused = i % 2 == 1;
            if paused {
                thread::sleep(Duration::from_millis(20));
            }
            let (status, text) = get(port, &path)?;
            let hits = backend.hits(&path);
            if hits > 1 {
                bail!("{path} reached the backend {hits} times");
            }
            if status != 200 {
                // Only an unpaused request without a reset policy may lose the race,
                // and then only to the reset, having reached no application.
                if paused || policy || status != 503 || !text.contains("connection termination") {
                    thread::sleep(Duration::from_millis(300));
                    bail!("{path} answered {status}: {text}\n{}", ferry.log());
                }
                raced += 1;
            }
        }
    }
    assert_eq!(
        ferry.stat("http.in.downstream_rq_2xx") + raced,
        2 * N as u64
    );
    eprintln!(
        "close-after-answer: {} upstream connections, {} sent again on a fresh one, {raced} lost to a reset without a retry policy",
        ferry.stat("cluster.svc.upstream_cx_total"),
        ferry.stat("cluster.svc.upstream_rq_retry_stale_connection")
    );
    Ok(())
}
