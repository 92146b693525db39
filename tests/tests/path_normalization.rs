//! Path normalization proven equal to Envoy's, with the RBAC policy it protects: one
//! static bootstrap with a listener per connection-manager setting (istiod's default
//! BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES, REJECT_REQUEST, UNESCAPE_AND_REDIRECT,
//! normalization off, and nothing set with `path_normalization_options`, which Envoy
//! ignores), each with an RBAC DENY on the `/admin` prefix in istiod's shape and a route
//! to a backend that reports the request target it received. A table of tricky paths
//! and a batch of generated ones go through Envoy 1.40 and through Ferry as raw
//! HTTP/1.1; every answer must be the same: status, the path at the backend, the
//! redirect's `Location`, whether the answer closes the connection, the path
//! normalization counters. Requests Envoy's HTTP/1 codec and hyper's parse differently before
//! normalization (a fragment, `<`, `>`, `` ` `` or `"` in the target) are left out; the
//! README lists them.
//!
//! The bypasses of the issue (`/./admin`, `/x/../admin`, `/%61dmin`, `/%2e/admin` under
//! istiod's defaults) are also asserted on Ferry alone, so they hold even where Envoy
//! is missing; the comparison itself is skipped with a note then, except under
//! `CI=true`, where a missing Envoy fails the test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    Bootstrap, Ferry, RunLock, Upstream, accepts, free_port, http_connection_manager, listener,
    local, static_cluster,
};
use serde_json::{Value, json};

// ------------------------------------------------------------------------------ backend

/// A backend that answers every request with the request target and the
/// `x-envoy-original-path` header it received, as JSON, on keep-alive
/// connections. Python's server would not do: it rewrites a leading `//`.
fn start_backend() -> Result<u16> {
    let listener = TcpListener::bind(local(0))?;
    let port = listener.local_addr()?.port();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = serve(conn);
            });
        }
    });
    Ok(port)
}

fn serve(conn: TcpStream) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let target = line.split(' ').nth(1).unwrap_or_default().to_string();
        let mut original = Value::Null;
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "x-envoy-original-path" => original = json!(v.trim()),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        r.read_exact(&mut body)?;
        let answer = json!({"path": target, "original": original}).to_string();
        // One write: a response in pieces would wait on delayed ACKs.
        let response = format!(
            "HTTP/1.1 200 OK\r\nx-backend: echo\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        out.write_all(response.as_bytes())?;
    }
}

// ------------------------------------------------------------------------------ config

/// The connection manager settings under test: a listener each.
const SETTINGS: &[(&str, &str)] = &[
    // istiod's, for meshConfig pathNormalization BASE (its default).
    (
        "base",
        r#"{"normalize_path": true, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"}"#,
    ),
    (
        "merge_slashes",
        r#"{"normalize_path": true, "merge_slashes": true, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"}"#,
    ),
    (
        "decode_and_merge",
        r#"{"normalize_path": true, "merge_slashes": true, "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"}"#,
    ),
    (
        "reject",
        r#"{"normalize_path": true, "merge_slashes": true, "path_with_escaped_slashes_action": "REJECT_REQUEST"}"#,
    ),
    (
        "redirect",
        r#"{"normalize_path": true, "merge_slashes": true, "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"}"#,
    ),
    // istiod's for NONE.
    (
        "none",
        r#"{"normalize_path": false, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"}"#,
    ),
    // Nothing set: Envoy's defaults; the hidden options are not implemented by Envoy.
    (
        "unset",
        r#"{"path_normalization_options": {"forwarding_transformation": {"operations": [{"normalize_path_rfc_3986": {}}, {"merge_slashes": {}}]}}}"#,
    ),
];

/// istiod's translation of an AuthorizationPolicy DENY with `paths: ["/admin*"]`.
fn deny_admin() -> Value {
    json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"ns[default]-policy[deny-admin]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                    {"url_path": {"path": {"prefix": "/admin"}}},
                ]}}]}}],
                "principals": [{"and_ids": {"ids": [{"any": true}]}}],
            }}},
            "shadow_rules_stat_prefix": "istio_dry_run_allow_",
        },
    })
}

fn bootstrap(ports: &[u16], backend: u16) -> Result<String> {
    let mut b = Bootstrap::new().cluster(static_cluster("backend", &[backend], Upstream::Http1));
    for ((name, settings), port) in SETTINGS.iter().zip(ports) {
        let routes = vec![
            // Route rewrites: Envoy keeps the (normalized) path it replaced.
            json!({"match": {"prefix": "/rewrite/"},
                "route": {"cluster": "backend", "timeout": "5s", "prefix_rewrite": "/rewritten/"}}),
            json!({"match": {"safe_regex": {"regex": "/regex/.*"}},
                "route": {"cluster": "backend", "timeout": "5s", "regex_rewrite": {
                    "pattern": {"regex": "^/regex/(.*)$"}, "substitution": "/r/\\1"}}}),
            json!({"match": {"prefix": "/"}, "route": {"cluster": "backend", "timeout": "5s"}}),
        ];
        let mut hcm = http_connection_manager(name, routes);
        let cfg = &mut hcm["typed_config"];
        let settings: Value = serde_json::from_str(settings)?;
        if let (Some(cfg), Some(s)) = (cfg.as_object_mut(), settings.as_object()) {
            cfg.extend(s.clone());
        }
        if let Some(filters) = cfg["http_filters"].as_array_mut() {
            filters.insert(0, deny_admin());
        }
        b = b.listener(listener(name, *port, vec![json!({"filters": [hcm]})]));
    }
    Ok(b.render())
}

// ------------------------------------------------------------------------------ client

/// What one request showed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: u16,
    /// The request target the backend received (when it answered).
    backend_path: Option<String>,
    /// `x-envoy-original-path` at the backend.
    original_header: Option<String>,
    location: Option<String>,
    /// `grpc-status` of the answer (gRPC requests).
    grpc_status: Option<String>,
    /// The answer ends the connection (`Connection: close`). Waiting for the
    /// close itself would wait out Envoy's delayed close, a second a request.
    closes: bool,
}

/// A response: status line, headers (names lower-cased), body.
type Response = (String, Vec<(String, String)>, Vec<u8>);

/// Reads one response (by its Content-Length); `None` when the connection
/// closed before any byte.
fn read_response(s: &mut TcpStream) -> Result<Option<Response>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            if raw.is_empty() {
                return Ok(None);
            }
            bail!(
                "connection closed inside a response head: {:?}",
                String::from_utf8_lossy(&raw)
            );
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed inside a response body");
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(len);
    Ok(Some((status_line, headers, body)))
}

/// Sends `GET target` (with `extra` header lines) on a connection of its own.
fn request(port: u16, target: &str, extra: &str) -> Result<Seen> {
    let mut s = TcpStream::connect(local(port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: test.local\r\n{extra}\r\n").as_bytes())?;
    let (status_line, headers, body) =
        read_response(&mut s)?.ok_or_else(|| anyhow!("no answer to {target:?}"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let (backend_path, original_header) = if header("x-backend").is_some() {
        let v: Value = serde_json::from_slice(&body)?;
        (
            v["path"].as_str().map(str::to_string),
            v["original"].as_str().map(str::to_string),
        )
    } else {
        (None, None)
    };
    Ok(Seen {
        status,
        backend_path,
        original_header,
        location: header("location"),
        grpc_status: header("grpc-status"),
        closes: header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
    })
}

// ------------------------------------------------------------------------------ paths

/// The table: the issue's bypasses and the corners of each setting.
#[rustfmt::skip]
const PATHS: &[&str] = &[
    "/admin", "/ADMIN", "/Admin/x", "/public", "/admin/x", "/./admin", "/x/../admin",
    "/%61dmin", "/%2e/admin", "/%2E%2E/admin", "/.%2e/admin", "/%2e./admin", "//admin",
    "///admin", "/admin%2F", "/admin%2fx", "/%2Fadmin", "/%2fadmin", "/%5Cadmin", "/%5cadmin",
    "/a/%2f../admin", "/a/%2F%2E%2E%2Fadmin", "/a%2f..%2fadmin", "/admin?x=/../",
    "/x?/../admin", "/public?/admin", "\\admin", "/\\admin", "/x\\..\\admin", "/x/..\\admin",
    "/.\\admin", "/%00", "/admin%00", "/x/%00/../admin", "/../../../../admin",
    "/a/b/c/../../../../../../admin", "/..", "/.", "/../", "/x/..", "/x/.", "//", "///",
    "/x//y//", "/x/./../y/./z/..", "/%2e%2e%2f%2e%2e%2fadmin", "/..;/admin", "/x/..;/admin",
    "/x/.;a/admin", "/x/%2e%2e;/admin", "/x;/../admin", "/%41DMIN", "/%7eadmin", "/%7Eu/%5F",
    "/a%", "/a%2", "/a%zz", "/%%30%30", "/%%32%65%%32%65/admin", "/%25%32%65",
    "/%252e%252e/admin", "/x%3B/../admin", "/%3fadmin", "/a%3Fb?c%3F", "/a%23b", "/a%20b",
    "/{x}|^", "/a?b=%2F&c=..", "/a?", "/?", "*", "admin", "a/b", "admin?x",
    "http://test.local/./admin", "http://test.local/x/%2F/../admin", "http://test.local",
    "http://test.local?/admin", "/./admin/../x", "/rewrite/a?q=/../", "/rewrite/./a/../b",
    "/x/../rewrite/%61", "/rewrite%2Fa", "//rewrite/a", "/regex/a?q=1", "/x/../regex/%62/./c",
    "/regex%2Fa",
];

/// More, made of the pieces normalization reads (both codecs
/// accept each raw): a small generator with its seed printed, so a failure
/// can be replayed with `FERRY_PATH_SEED`.
fn generated(seed: u64, n: usize) -> Vec<String> {
    const PIECES: &[&str] = &[
        "/", "/", "/", "//", ".", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "%",
        "%%", "%25", "%00", "%41", "%61", "%7e", "%3B", ";", ";", "a", "b", "admin", "admin", "x",
        "~", "-", "_", "%2", "%g1", "%30", "%3", "{", "|", "}", "^", "@", ":", "+", "[", "]", "=",
        "&", "?",
    ];
    let mut state = seed;
    let mut next = move |bound: usize| -> usize {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % bound as u64) as usize
    };
    (0..n)
        .map(|_| {
            let mut p = String::from("/");
            for _ in 0..next(12) {
                p.push_str(PIECES[next(PIECES.len())]);
            }
            p
        })
        .collect()
}

// ------------------------------------------------------------------------------ the test

/// Every path through every listener of one proxy.
type Observations = BTreeMap<(&'static str, String), Seen>;

fn observe(ports: &[u16], paths: &[String]) -> Result<Observations> {
    let mut out = BTreeMap::new();
    for ((name, _), port) in SETTINGS.iter().zip(ports) {
        for p in paths {
            let seen = request(*port, p, "").with_context(|| format!("{name}: {p:?}"))?;
            out.insert((*name, p.clone()), seen);
        }
        // A gRPC client cannot follow a redirect.
        let seen = request(
            *port,
            "/a%2Fb",
            "content-type: application/grpc\r\nte: trailers\r\n",
        )?;
        out.insert((*name, "grpc /a%2Fb".into()), seen);
    }
    Ok(out)
}

fn counters(ports: &[u16], stat: impl Fn(&str) -> Result<u64>) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for (name, _) in SETTINGS.iter().take(ports.len()) {
        for c in [
            "downstream_rq_failed_path_normalization",
            "downstream_rq_redirected_with_normalized_path",
        ] {
            let key = format!("http.{name}.{c}");
            let v = stat(&key)?;
            out.push((key, v));
        }
    }
    Ok(out)
}

fn wait_accepting(ports: &[u16]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ports.iter().all(|p| accepts(*p)) {
        if Instant::now() >= deadline {
            bail!("listeners {ports:?} not all accepting");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn paths_normalize_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let backend = start_backend()?;
    let seed = std::env::var("FERRY_PATH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("generated paths: FERRY_PATH_SEED={seed}");
    let mut paths: Vec<String> = PATHS.iter().map(|p| p.to_string()).collect();
    // `FERRY_PATH_COUNT` runs more of them (the default keeps the test at
    // a few seconds).
    let count = std::env::var("FERRY_PATH_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    paths.extend(generated(seed, count));

    let ferry_ports: Vec<u16> = SETTINGS.iter().map(|_| free_port()).collect();
    let ferry = Ferry::start(&bootstrap(&ferry_ports, backend)?)?;
    wait_accepting(&ferry_ports)?;
    let started = Instant::now();
    let by_ferry = observe(&ferry_ports, &paths)
        .with_context(|| format!("through ferry; log:\n{}", ferry.log()))?;
    eprintln!(
        "ferry: {} requests in {:?}",
        by_ferry.len(),
        started.elapsed()
    );
    // The issue's bypasses, under istiod's default settings: denied.
    for p in [
        "/admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/%2e/admin",
        "/..;/admin",
    ] {
        let seen = &by_ferry[&("base", p.to_string())];
        assert_eq!(seen.status, 403, "{p} through ferry: {seen:?}");
    }
    assert_eq!(
        by_ferry[&("base", "/ADMIN".to_string())]
            .backend_path
            .as_deref(),
        Some("/ADMIN")
    );
    // Normalization keeps no original path; a route rewrite keeps the
    // normalized one.
    let rewritten = &by_ferry[&("base", "/x/../rewrite/%61".to_string())];
    assert_eq!(rewritten.backend_path.as_deref(), Some("/rewritten/a"));
    assert_eq!(rewritten.original_header.as_deref(), Some("/rewrite/a"));
    assert!(
        by_ferry[&("base", "/./admin/../x".to_string())]
            .original_header
            .is_none()
    );
    // A gRPC request is not redirected: a gRPC error (INTERNAL, from the 400).
    let grpc = &by_ferry[&("redirect", "grpc /a%2Fb".to_string())];
    assert_eq!(
        (grpc.backend_path.as_deref(), grpc.grpc_status.as_deref()),
        (None, Some("13")),
        "{grpc:?}"
    );
    let ferry_counters = counters(&ferry_ports, |k| Ok(ferry.stat(k)))?;
    drop(ferry);

    let Some(bin) = envoy::bin()? else {
        eprintln!("envoy not installed; the comparison is skipped");
        return Ok(());
    };
    let envoy_ports: Vec<u16> = SETTINGS.iter().map(|_| free_port()).collect();
    let config: Value = serde_json::from_str(&bootstrap(&envoy_ports, backend)?)?;
    let envoy = Envoy::start(&bin, &config, envoy_ports[0])?;
    wait_accepting(&envoy_ports)?;
    let by_envoy = observe(&envoy_ports, &paths)
        .with_context(|| format!("through envoy; log:\n{}", envoy.log()))?;
    let envoy_counters = counters(&envoy_ports, |k| envoy.stat(k))?;

    let mut differ = Vec::new();
    for (key, e) in &by_envoy {
        let f = &by_ferry[key];
        if f != e {
            differ.push(format!("{key:?}\n  envoy: {e:?}\n  ferry: {f:?}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {} answers differ (FERRY_PATH_SEED={seed}):\n{}",
        differ.len(),
        by_envoy.len(),
        differ.join("\n")
    );
    assert_eq!(
        ferry_counters, envoy_counters,
        "path normalization counters"
    );
    // Something was exercised: every kind of answer came up.
    let statuses: std::collections::BTreeSet<u16> = by_envoy.values().map(|s| s.status).collect();
    for s in [200, 307, 400, 403] {
        assert!(statuses.contains(&s), "no {s} among {statuses:?}");
    }
    eprintln!(
        "{} answers equal; counters {envoy_counters:?}",
        by_envoy.len()
    );
    Ok(())
}
