//! The routing and policy fields that change decisions (issue 15), proven equal to Envoy's:
//! each scenario runs the same static bootstrap through Ferry and through Envoy 1.40 in
//! front of the same `tests/apps/echo.py` backends and compares what a client and the
//! backends observe. Each scenario also asserts its expectations outright, so a mistake
//! shared by both proxies cannot pass.
//!
//! Covered: `require_tls` (ALL and EXTERNAL_ONLY), route and connection manager
//! `upgrade_configs`, the `server` header, ring hash and Maglev host choice,
//! `treat_missing_header_as_empty` and inverted matchers on absent headers,
//! `retriable_request_headers`, weighted clusters' header mutations, host rewrite,
//! `header_name` and `typed_per_filter_config`, a route table's `typed_per_filter_config`,
//! `internal_only_headers`, `direct_source_prefix_ranges` and `source_type` in filter chain
//! selection, `healthy_panic_threshold`, upstream `max_connection_duration`, a route's
//! `request_body_buffer_limit` and the JWT filter's `clear_route_cache`.
//!
//! Envoy comes from `ferry_tests::envoy`; without it a test is skipped with a note,
//! except under `CI=true`, where a missing Envoy fails the test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, free_port, http_connection_manager, http_request,
    listener, local, static_cluster,
};
use serde_json::{Value, json};

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

    fn log(&self) -> String {
        match self {
            Proxy::Ferry(f) => f.log(),
            Proxy::Envoy(e) => e.log(),
        }
    }
}

/// Runs `observe` against Ferry and then Envoy, each started on `config(ports)` with
/// `n` fresh listener ports, and returns both observations (Ferry's first). `None`:
/// Envoy is unavailable (skipped).
fn differential<T>(
    n: usize,
    config: impl Fn(&[u16]) -> String,
    mut observe: impl FnMut(&Proxy, &[u16]) -> Result<T>,
) -> Result<Option<(T, T)>> {
    let Some(bin) = envoy::bin()? else {
        return Ok(None);
    };
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let ferry = Proxy::Ferry(Ferry::start(&config(&ports))?);
    let a =
        observe(&ferry, &ports).with_context(|| format!("through ferry; log:\n{}", ferry.log()))?;
    drop(ferry);
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let envoy = Proxy::Envoy(Envoy::start(
        &bin,
        &serde_json::from_str(&config(&ports))?,
        ports[0],
    )?);
    for p in &ports[1..] {
        wait_listening(*p)?;
    }
    let b =
        observe(&envoy, &ports).with_context(|| format!("through envoy; log:\n{}", envoy.log()))?;
    Ok(Some((a, b)))
}

fn wait_listening(port: u16) -> Result<()> {
    for _ in 0..100 {
        if TcpStream::connect(local(port)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {port}")
}

// ------------------------------------------------------------------------------ client

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The request header `name` as the echo backend received it.
    fn echoed(&self, name: &str) -> Option<String> {
        let v: Value = serde_json::from_str(&self.body).ok()?;
        let values: Vec<String> = v["headers"]
            .as_array()?
            .iter()
            .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
            .filter_map(|h| h[1].as_str().map(str::to_string))
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    /// The echoed JSON field `key` (`name`, `path`, `conn_requests`, …).
    fn field(&self, key: &str) -> String {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .map(|v| match &v[key] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            })
            .unwrap_or_default()
    }
}

fn connect(port: u16) -> Result<TcpStream> {
    let s = TcpStream::connect(local(port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// One HTTP/1.1 request on its own connection.
fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply> {
    let mut s = connect(port)?;
    let mut all = vec![("Connection", "close")];
    all.extend_from_slice(headers);
    exchange(&mut s, method, path, &all, body)
}

/// One HTTP/1.1 request on `s`, which stays open. The whole answer is read: up to
/// Content-Length, or to the close.
fn exchange(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str("Host: test.local\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    s.write_all(&out)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no response head: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// A request that may find no filter chain: the connection closes without an answer.
fn try_request(port: u16, path: &str) -> String {
    match request(port, "GET", path, &[], b"") {
        Ok(r) => format!("{} {}", r.status, r.body),
        Err(_) => "closed".to_string(),
    }
}

/// How many requests `app` received for `path`.
fn hits(app: &App, path: &str) -> Result<u64> {
    let (status, body) = http_request(local(app.port), "GET", &format!("/hits{path}"))?;
    if status != 200 {
        bail!("/hits answered {status}");
    }
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["hits"].as_u64().unwrap_or(0))
}

/// A unique tag per proxy run, so per-path hit counts never mix.
fn tag(p: &Proxy) -> String {
    format!("{}-{}", p.name(), free_port())
}

// ------------------------------------------------------------------------------ config

/// An HTTP listener on `port` whose route table is `route_config` (its `name` is set),
/// with the HTTP filters `filters` before the router and extra connection manager fields.
fn http(port: u16, route_config: Value, filters: Vec<Value>, hcm_extra: Value) -> Value {
    let mut hcm = http_connection_manager(&format!("in{port}"), vec![]);
    let tc = &mut hcm["typed_config"];
    let mut rc = route_config;
    rc["name"] = json!(format!("routes{port}"));
    tc["route_config"] = rc;
    if let Some(list) = tc["http_filters"].as_array_mut() {
        for (i, f) in filters.into_iter().enumerate() {
            list.insert(i, f);
        }
    }
    if let (Some(tc), Some(extra)) = (tc.as_object_mut(), hcm_extra.as_object()) {
        tc.extend(extra.clone());
    }
    listener(&format!("in{port}"), port, vec![json!({"filters": [hcm]})])
}

/// A route table with one virtual host for every domain holding `routes`.
fn table(routes: Vec<Value>) -> Value {
    json!({"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]})
}

/// A route for `prefix` to `cluster` that strips the prefix, with extra action fields.
fn route(prefix: &str, cluster: &str, extra: Value) -> Value {
    let mut action = json!({"cluster": cluster, "prefix_rewrite": "/", "timeout": "5s"});
    if let (Some(a), Some(e)) = (action.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    json!({"match": {"prefix": prefix}, "route": action})
}

fn direct(m: Value, body: &str) -> Value {
    json!({"match": m, "direct_response": {"status": 200, "body": {"inline_string": body}}})
}

const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

/// The fault filter with no fault of its own: only per-route configurations abort.
fn fault_filter() -> Value {
    json!({"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT}})
}

/// A per-filter configuration for the fault filter aborting every request with `status`.
fn abort(status: u16) -> Value {
    json!({"envoy.filters.http.fault": {"@type": FAULT, "abort": {
        "http_status": status, "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}})
}

fn render(listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    let mut b = Bootstrap::new();
    for l in listeners {
        b = b.listener(l);
    }
    for c in clusters {
        b = b.cluster(c);
    }
    b.render()
}

// ------------------------------------------------------------------------------ require_tls

/// `require_tls`: a plain-text request to a virtual host requiring TLS is redirected to
/// https (301, same host and path) before any route; ALL redirects every request not
/// forwarded as https, EXTERNAL_ONLY spares requests marked `x-envoy-internal: true`.
#[test]
fn require_tls_redirects_to_https() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |ports: &[u16]| {
        let rc = json!({"virtual_hosts": [
            {"name": "all", "domains": ["all.test"], "require_tls": "ALL",
             "routes": [route("/", "backend", json!({}))]},
            {"name": "ext", "domains": ["ext.test"], "require_tls": "EXTERNAL_ONLY",
             "routes": [route("/", "backend", json!({}))]},
            {"name": "none", "domains": ["*"], "routes": [route("/", "backend", json!({}))]},
        ]});
        render(
            vec![http(ports[0], rc, vec![], json!({}))],
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(1, config, |_, ports| {
        let port = ports[0];
        let mut out = Vec::new();
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("all", &[("Host", "all.test")]),
            ("all port", &[("Host", "all.test:8080")]),
            (
                "all https",
                &[("Host", "all.test"), ("x-forwarded-proto", "https")],
            ),
            (
                "all internal",
                &[("Host", "all.test"), ("x-envoy-internal", "true")],
            ),
            ("ext", &[("Host", "ext.test")]),
            (
                "ext internal",
                &[("Host", "ext.test"), ("x-envoy-internal", "true")],
            ),
            (
                "ext https",
                &[("Host", "ext.test"), ("x-forwarded-proto", "https")],
            ),
            ("none", &[("Host", "none.test")]),
        ];
        for (what, headers) in cases {
            let r = request(port, "GET", "/a/b?x=1", headers, b"")?;
            out.push(format!(
                "{what}: {} location={:?}",
                r.status,
                r.header("location")
            ));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry[0],
        "all: 301 location=Some(\"https://all.test/a/b?x=1\")"
    );
    assert!(ferry[4].starts_with("ext: 301"), "{ferry:#?}");
    assert!(ferry[7].starts_with("none: 200"), "{ferry:#?}");
    Ok(())
}

// ------------------------------------------------------------------------------ upgrades

/// A route's `upgrade_configs` overrides the connection manager's: a disabled upgrade type
/// is refused with 403 before any filter; the same route serves plain requests.
#[test]
fn route_upgrade_configs() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |ports: &[u16]| {
        let routes = vec![
            route(
                "/off/",
                "backend",
                json!({"upgrade_configs": [{"upgrade_type": "websocket", "enabled": false}]}),
            ),
            route("/on/", "backend", json!({})),
        ];
        render(
            vec![http(
                ports[0],
                table(routes),
                vec![],
                json!({"upgrade_configs": [{"upgrade_type": "websocket"}]}),
            )],
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let upgrade = [("Connection", "Upgrade"), ("Upgrade", "websocket")];
    let observed = differential(1, config, |_, ports| {
        let port = ports[0];
        let off = request(port, "GET", "/off/x", &upgrade, b"")?;
        let plain = request(port, "GET", "/off/x", &[], b"")?;
        // The upgrade allowed reaches the backend, which answers it without switching
        // (how each proxy relays that refusal's body differs: only the status counts).
        let on = request(port, "GET", "/on/x", &upgrade, b"")?;
        Ok(vec![
            format!("off upgrade: {}", off.status),
            format!("off plain: {} {}", plain.status, plain.field("path")),
            format!("on upgrade: {}", on.status),
        ])
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry[0], "off upgrade: 403");
    assert_eq!(ferry[1], "off plain: 200 /x");
    assert_eq!(ferry[2], "on upgrade: 200");
    Ok(())
}

/// The connection manager's `upgrade_configs`: an upgrade type it does not list (or lists
/// disabled) is refused with 403, unless the route enables it; and its `server` header
/// (`server_name`, `server_header_transformation`) on proxied answers and local replies.
#[test]
fn connection_manager_upgrades_and_server_header() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |ports: &[u16]| {
        let routes = || {
            vec![
                route("/plain/", "backend", json!({})),
                route(
                    "/on/",
                    "backend",
                    json!({"upgrade_configs": [{"upgrade_type": "websocket", "enabled": true}]}),
                ),
            ]
        };
        render(
            vec![
                // Envoy's defaults: no upgrade listed, `server: envoy` overwritten.
                http(
                    ports[0],
                    table(routes()),
                    vec![],
                    json!({"upgrade_configs": []}),
                ),
                http(
                    ports[1],
                    table(routes()),
                    vec![],
                    json!({
                        "server_name": "istio-envoy",
                        "server_header_transformation": "APPEND_IF_ABSENT",
                        "upgrade_configs": [{"upgrade_type": "websocket", "enabled": false}],
                    }),
                ),
                http(
                    ports[2],
                    table(routes()),
                    vec![],
                    json!({
                        "server_header_transformation": "PASS_THROUGH",
                        "upgrade_configs": [{"upgrade_type": "WebSocket"}],
                    }),
                ),
            ],
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let upgrade = [("Connection", "Upgrade"), ("Upgrade", "websocket")];
    let observed = differential(3, config, |_, ports| {
        let mut seen = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let plain_up = request(*port, "GET", "/plain/x", &upgrade, b"")?;
            let on_up = request(*port, "GET", "/on/x", &upgrade, b"")?;
            let plain = request(*port, "GET", "/plain/x", &[], b"")?;
            let missing = request(*port, "GET", "/nowhere", &[], b"")?;
            let server = |r: &Reply| r.header("server").unwrap_or("-").to_string();
            seen.push(format!(
                "{i}: upgrade plain {} on {}; proxied {} server {:?}; local {} server {:?}",
                plain_up.status,
                on_up.status,
                plain.status,
                server(&plain),
                missing.status,
                server(&missing),
            ));
        }
        Ok(seen)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry[0],
        "0: upgrade plain 403 on 200; proxied 200 server \"envoy\"; local 404 server \"envoy\""
    );
    assert_eq!(
        ferry[1],
        "1: upgrade plain 403 on 200; proxied 200 server \"echo\"; local 404 server \"istio-envoy\""
    );
    assert_eq!(
        ferry[2],
        "2: upgrade plain 200 on 200; proxied 200 server \"echo\"; local 404 server \"-\""
    );
    Ok(())
}

/// Ring hash and Maglev choose hosts as Envoy does (XXH64 of the request's key and of
/// `address_n`, Envoy's ring and table construction): keys hashed from a header land on
/// the same backend through Ferry and through Envoy.
#[test]
fn hashed_keys_land_on_the_same_host_as_in_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let apps = (1..=4)
        .map(|i| App::http(&format!("b{i}"), &[]))
        .collect::<Result<Vec<App>>>()?;
    let backends: Vec<u16> = apps.iter().map(|a| a.port).collect();
    for policy in ["RING_HASH", "MAGLEV"] {
        let config = |ports: &[u16]| {
            let mut c = static_cluster("hashed", &backends, Upstream::Http1);
            c["lb_policy"] = json!(policy);
            let r = route(
                "/",
                "hashed",
                json!({"hash_policy": [{"header": {"header_name": "x-key"}}]}),
            );
            render(
                vec![http(ports[0], table(vec![r]), vec![], json!({}))],
                vec![c],
            )
        };
        let observed = differential(1, config, |_, ports| {
            // 1,000 keys over four connections at once, each its own share.
            let port = ports[0];
            let shares = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..4)
                    .map(|w| {
                        scope.spawn(move || -> Result<Vec<String>> {
                            let mut s = connect(port)?;
                            (0..250)
                                .map(|i| {
                                    let key = format!("user-{}", w * 250 + i);
                                    let r = exchange(
                                        &mut s,
                                        "GET",
                                        "/x",
                                        &[("x-key", key.as_str())],
                                        b"",
                                    )?;
                                    Ok(r.field("name"))
                                })
                                .collect()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
                    .collect::<Result<Vec<Vec<String>>>>()
            })?;
            Ok(shares.concat())
        })?;
        let Some((ferry, envoy)) = observed else {
            return Ok(());
        };
        let differ = ferry.iter().zip(&envoy).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{policy}: {differ} of 1000 keys on another host");
        for b in ["b1", "b2", "b3", "b4"] {
            assert!(ferry.iter().any(|n| n == b), "{policy}: {b} never chosen");
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ header matches

/// `treat_missing_header_as_empty` makes an absent header match as the empty string; an
/// inverted value matcher never matches an absent header (Envoy's semantics), while an
/// inverted `present_match` does.
#[test]
fn missing_headers_in_route_matches() -> Result<()> {
    let _lock = RunLock::shared();
    let config = |ports: &[u16]| {
        let routes = vec![
            direct(
                json!({"prefix": "/", "headers": [{"name": "x-a", "string_match": {"exact": ""},
                    "treat_missing_header_as_empty": true}]}),
                "empty-or-missing",
            ),
            direct(
                json!({"prefix": "/", "headers": [{"name": "x-b", "string_match": {"prefix": "v"},
                    "invert_match": true}]}),
                "b-not-v",
            ),
            direct(
                json!({"prefix": "/", "headers": [{"name": "x-c", "string_match": {"suffix": "z"},
                    "treat_missing_header_as_empty": true, "invert_match": true}]}),
                "c-not-z",
            ),
            direct(
                json!({"prefix": "/", "headers": [{"name": "x-d", "present_match": true,
                    "invert_match": true}]}),
                "d-absent",
            ),
            direct(json!({"prefix": "/"}), "fallback"),
        ];
        render(
            vec![http(ports[0], table(routes), vec![], json!({}))],
            vec![],
        )
    };
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("nothing", &[]),
        ("a set", &[("x-a", "1")]),
        ("a empty", &[("x-a", "")]),
        ("b other", &[("x-a", "1"), ("x-b", "w")]),
        ("b v", &[("x-a", "1"), ("x-b", "vv")]),
        ("c z", &[("x-a", "1"), ("x-b", "vv"), ("x-c", "zz")]),
        (
            "d",
            &[("x-a", "1"), ("x-b", "vv"), ("x-c", "zz"), ("x-d", "1")],
        ),
    ];
    let observed = differential(1, config, |_, ports| {
        let mut out = Vec::new();
        for (what, headers) in cases {
            let r = request(ports[0], "GET", "/", headers, b"")?;
            out.push(format!("{what}: {} {}", r.status, r.body));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry,
        [
            "nothing: 200 empty-or-missing",
            "a set: 200 c-not-z",
            "a empty: 200 empty-or-missing",
            "b other: 200 b-not-v",
            "b v: 200 c-not-z",
            "c z: 200 d-absent",
            "d: 200 fallback",
        ]
    );
    Ok(())
}

// ------------------------------------------------------------------------------ retries

/// `retriable_request_headers`: only requests carrying a matching header are retried.
#[test]
fn retriable_request_headers() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |ports: &[u16]| {
        let routes = vec![route(
            "/r/",
            "backend",
            json!({"retry_policy": {"retry_on": "5xx", "num_retries": 2,
                "retriable_request_headers": [{"name": "x-retry", "string_match": {"exact": "yes"}}]}}),
        )];
        render(
            vec![http(ports[0], table(routes), vec![], json!({}))],
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(1, config, |p, ports| {
        let t = tag(p);
        let mut out = Vec::new();
        for (what, headers) in [
            ("with", &[("x-retry", "yes")][..]),
            ("other", &[("x-retry", "no")][..]),
            ("without", &[][..]),
        ] {
            let path = format!("/flaky/1/503/{t}/{what}");
            let r = request(ports[0], "GET", &format!("/r{path}"), headers, b"")?;
            out.push(format!("{what}: {} hits {}", r.status, hits(&app, &path)?));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry,
        [
            "with: 200 hits 2",
            "other: 503 hits 1",
            "without: 503 hits 1"
        ]
    );
    Ok(())
}

/// A route's `request_body_buffer_limit`, or else the listener's
/// `per_connection_buffer_limit_bytes`, bounds the body kept for retries: a larger body
/// is sent once and not retried.
#[test]
fn request_body_buffer_limit_bounds_retries() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |ports: &[u16]| {
        let retry = json!({"retry_policy": {"retry_on": "5xx", "num_retries": 2}});
        let mut r = route("/r/", "backend", retry.clone());
        r["request_body_buffer_limit"] = json!(4096);
        let mut by_listener = http(
            ports[1],
            table(vec![route("/r/", "backend", retry)]),
            vec![],
            json!({}),
        );
        by_listener["per_connection_buffer_limit_bytes"] = json!(4096);
        render(
            vec![
                http(ports[0], table(vec![r]), vec![], json!({})),
                by_listener,
            ],
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(2, config, |p, ports| {
        let t = tag(p);
        let mut out = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            for (what, len) in [("small", 1000), ("large", 100_000)] {
                let path = format!("/flaky/1/503/{t}/{i}/{what}");
                let body = vec![b'a'; len];
                let r = request(*port, "POST", &format!("/r{path}"), &[], &body)?;
                out.push(format!(
                    "{i} {what}: {} hits {}",
                    r.status,
                    hits(&app, &path)?
                ));
            }
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry,
        [
            "0 small: 200 hits 2",
            "0 large: 503 hits 1",
            "1 small: 200 hits 2",
            "1 large: 503 hits 1",
        ]
    );
    Ok(())
}

// ------------------------------------------------------------------------------ per-filter configs

/// A weighted cluster's header mutations, host rewrite and `typed_per_filter_config`
/// apply when it is picked; `header_name` picks by a request header's value; a route
/// table's `typed_per_filter_config` applies to routes without their own. A filter's own
/// answer (the fault's abort) carries the route's and the picked cluster's response
/// headers, as Envoy's local replies do.
#[test]
fn weighted_clusters_and_table_filter_configs() -> Result<()> {
    let _lock = RunLock::shared();
    let a = App::http("a", &[])?;
    let b = App::http("b", &[])?;
    let config = |ports: &[u16]| {
        let mut own = route("/own/", "a", json!({}));
        own["typed_per_filter_config"] = abort(429);
        own["response_headers_to_add"] = json!([{"header": {"key": "x-own", "value": "1"}}]);
        let mut rc = table(vec![own, route("/plain/", "a", json!({}))]);
        rc["typed_per_filter_config"] = abort(503);
        rc["response_headers_to_add"] = json!([{"header": {"key": "x-table", "value": "1"}}]);
        // A second table without its own configuration: the filter does nothing.
        let mut weighted = json!({"match": {"prefix": "/w/"}, "route": {"prefix_rewrite": "/",
        "weighted_clusters": {"header_name": "x-pick", "clusters": [
            {"name": "a", "weight": 50,
             "request_headers_to_add": [{"header": {"key": "x-picked", "value": "a"}}],
             "request_headers_to_remove": ["x-drop"],
             "response_headers_to_add": [{"header": {"key": "x-was", "value": "a"}}],
             "host_rewrite_literal": "a.example"},
            {"name": "b", "weight": 50,
             "response_headers_to_add": [{"header": {"key": "x-was", "value": "b"}}],
             "typed_per_filter_config": abort(418)},
        ]}}});
        weighted["response_headers_to_add"] = json!([{"header": {"key": "x-route", "value": "w"}}]);
        let rc2 = table(vec![weighted, route("/plain/", "a", json!({}))]);
        render(
            vec![
                http(ports[0], rc, vec![fault_filter()], json!({})),
                http(ports[1], rc2, vec![fault_filter()], json!({})),
            ],
            vec![
                static_cluster("a", &[a.port], Upstream::Http1),
                static_cluster("b", &[b.port], Upstream::Http1),
            ],
        )
    };
    let observed = differential(2, config, |_, ports| {
        let mut out = Vec::new();
        let mut note = |what: &str, r: Reply| {
            out.push(format!(
                "{what}: {} {} picked={:?} drop={:?} host={:?} was={:?} route={:?} own={:?} table={:?}",
                r.status,
                r.field("name"),
                r.echoed("x-picked"),
                r.echoed("x-drop"),
                r.echoed("host"),
                r.header("x-was"),
                r.header("x-route"),
                r.header("x-own"),
                r.header("x-table"),
            ))
        };
        note("own", request(ports[0], "GET", "/own/x", &[], b"")?);
        note("table", request(ports[0], "GET", "/plain/x", &[], b"")?);
        // header_name: the value is the pick (0..100): below 50 is a, from 50 b.
        let pick = |v| [("x-pick", v), ("x-drop", "1")];
        note("a", request(ports[1], "GET", "/w/x", &pick("10"), b"")?);
        note("b", request(ports[1], "GET", "/w/x", &pick("70"), b"")?);
        note("no config", request(ports[1], "GET", "/plain/x", &[], b"")?);
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry,
        [
            "own: 429  picked=None drop=None host=None was=None route=None own=Some(\"1\") table=Some(\"1\")",
            "table: 503  picked=None drop=None host=None was=None route=None own=None table=Some(\"1\")",
            "a: 200 a picked=Some(\"a\") drop=None host=Some(\"a.example\") was=Some(\"a\") route=Some(\"w\") own=None table=None",
            "b: 418  picked=None drop=None host=None was=Some(\"b\") route=Some(\"w\") own=None table=None",
            "no config: 200 a picked=None drop=None host=Some(\"test.local\") was=None route=None own=None table=None",
        ]
    );
    Ok(())
}

/// `internal_only_headers` are removed from requests that are not internal.
#[test]
fn internal_only_headers_are_removed() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |ports: &[u16]| {
        let mut rc = table(vec![route("/", "backend", json!({}))]);
        rc["internal_only_headers"] = json!(["x-secret"]);
        render(
            vec![
                http(ports[0], rc.clone(), vec![], json!({})),
                http(ports[1], rc, vec![], json!({"use_remote_address": true})),
            ],
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(2, config, |_, ports| {
        let mut out = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            for (what, headers) in [
                ("plain", &[("x-secret", "s")][..]),
                (
                    "internal",
                    &[("x-secret", "s"), ("x-envoy-internal", "true")][..],
                ),
            ] {
                let r = request(*port, "GET", "/x", headers, b"")?;
                out.push(format!(
                    "{i} {what}: {} secret={:?}",
                    r.status,
                    r.echoed("x-secret")
                ));
            }
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert!(
        ferry.iter().any(|l| l.ends_with("secret=None")),
        "{ferry:#?}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ filter chains

/// A listener whose filter chains answer their own name, each matching `matches[i]`.
fn chains(port: u16, matches: &[(&str, Value)]) -> Value {
    let chains = matches
        .iter()
        .map(|(name, m)| {
            let mut hcm = http_connection_manager(
                &format!("{name}{port}"),
                vec![direct(json!({"prefix": "/"}), name)],
            );
            hcm["typed_config"]["route_config"]["name"] = json!(format!("{name}{port}"));
            let mut c = json!({"name": name, "filters": [hcm]});
            if !m.is_null() {
                c["filter_chain_match"] = m.clone();
            }
            c
        })
        .collect();
    listener(&format!("l{port}"), port, chains)
}

/// `direct_source_prefix_ranges` and `source_type` select filter chains as Envoy does:
/// the most specific direct source range first, then the source type; a connection
/// that the most specific level's chains do not accept gets no chain at all.
#[test]
fn filter_chains_by_direct_source_and_source_type() -> Result<()> {
    let _lock = RunLock::shared();
    let config = |ports: &[u16]| {
        render(
            vec![
                chains(
                    ports[0],
                    &[
                        ("external", json!({"source_type": "EXTERNAL"})),
                        ("local", json!({"source_type": "SAME_IP_OR_LOOPBACK"})),
                    ],
                ),
                chains(
                    ports[1],
                    &[
                        (
                            "ten",
                            json!({"direct_source_prefix_ranges": [
                            {"address_prefix": "10.0.0.0", "prefix_len": 8}]}),
                        ),
                        ("default", Value::Null),
                    ],
                ),
                chains(
                    ports[2],
                    &[
                        (
                            "loop8",
                            json!({"direct_source_prefix_ranges": [
                            {"address_prefix": "127.0.0.0", "prefix_len": 8}]}),
                        ),
                        (
                            "loop32",
                            json!({"direct_source_prefix_ranges": [
                            {"address_prefix": "127.0.0.1", "prefix_len": 32}]}),
                        ),
                        ("default", Value::Null),
                    ],
                ),
                chains(
                    ports[3],
                    &[
                        (
                            "ext",
                            json!({"direct_source_prefix_ranges": [
                            {"address_prefix": "127.0.0.0", "prefix_len": 8}],
                            "source_type": "EXTERNAL"}),
                        ),
                        ("default", Value::Null),
                    ],
                ),
            ],
            vec![],
        )
    };
    let observed = differential(4, config, |_, ports| {
        Ok(ports
            .iter()
            .map(|p| try_request(*p, "/"))
            .collect::<Vec<_>>())
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry, ["200 local", "200 default", "200 loop32", "closed"]);
    Ok(())
}

// ------------------------------------------------------------------------------ clusters

/// The cluster with `ports` as endpoints, all but the first marked UNHEALTHY, and
/// `healthy_panic_threshold` when given.
fn panic_cluster(name: &str, ports: &[u16], threshold: Option<f64>) -> Value {
    let mut c = static_cluster(name, ports, Upstream::Http1);
    if let Some(eps) = c["load_assignment"]["endpoints"][0]["lb_endpoints"].as_array_mut() {
        for e in eps.iter_mut().skip(1) {
            e["health_status"] = json!("UNHEALTHY");
        }
    }
    if let Some(t) = threshold {
        c["common_lb_config"] = json!({"healthy_panic_threshold": {"value": t}});
    }
    c
}

/// `healthy_panic_threshold`: below it, the load balancer ignores health and spreads over
/// every host; 0 disables panic; the default is 50%.
#[test]
fn healthy_panic_threshold() -> Result<()> {
    let _lock = RunLock::shared();
    let a = App::http("a", &[])?;
    let b = App::http("b", &[])?;
    let c = App::http("c", &[])?;
    let config = |ports: &[u16]| {
        let routes = vec![
            route("/half-default/", "half_default", json!({})),
            route("/half-100/", "half_100", json!({})),
            route("/third-default/", "third_default", json!({})),
            route("/third-0/", "third_0", json!({})),
        ];
        render(
            vec![http(ports[0], table(routes), vec![], json!({}))],
            vec![
                panic_cluster("half_default", &[a.port, b.port], None),
                panic_cluster("half_100", &[a.port, b.port], Some(100.0)),
                panic_cluster("third_default", &[a.port, b.port, c.port], None),
                panic_cluster("third_0", &[a.port, b.port, c.port], Some(0.0)),
            ],
        )
    };
    let observed = differential(1, config, |_, ports| {
        let mut out = Vec::new();
        for prefix in [
            "/half-default/",
            "/half-100/",
            "/third-default/",
            "/third-0/",
        ] {
            let mut names = std::collections::BTreeSet::new();
            for _ in 0..30 {
                let r = request(ports[0], "GET", &format!("{prefix}x"), &[], b"")?;
                names.insert(format!("{} {}", r.status, r.field("name")));
            }
            out.push(format!("{prefix}: {names:?}"));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry,
        [
            "/half-default/: {\"200 a\"}",
            "/half-100/: {\"200 a\", \"200 b\"}",
            "/third-default/: {\"200 a\", \"200 b\", \"200 c\"}",
            "/third-0/: {\"200 a\"}",
        ]
    );
    Ok(())
}

/// Upstream `max_connection_duration`: a connection older than it is not reused (the
/// backend sees the next request on a new connection); without it, it is.
#[test]
fn upstream_max_connection_duration() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |ports: &[u16]| {
        let mut limited = static_cluster("limited", &[app.port], Upstream::Http1);
        limited["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"max_connection_duration": "1s"},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        });
        let routes = vec![
            route("/limited/", "limited", json!({})),
            route("/kept/", "kept", json!({})),
        ];
        render(
            vec![http(ports[0], table(routes), vec![], json!({}))],
            vec![
                limited,
                static_cluster("kept", &[app.port], Upstream::Http1),
            ],
        )
    };
    let observed = differential(1, config, |_, ports| {
        let mut out = Vec::new();
        for prefix in ["/limited/", "/kept/"] {
            let first = request(ports[0], "GET", &format!("{prefix}x"), &[], b"")?;
            thread::sleep(Duration::from_millis(1600));
            let second = request(ports[0], "GET", &format!("{prefix}x"), &[], b"")?;
            out.push(format!(
                "{prefix}: {} {} then {} {}",
                first.status,
                first.field("conn_requests"),
                second.status,
                second.field("conn_requests")
            ));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry,
        ["/limited/: 200 1 then 200 1", "/kept/: 200 1 then 200 2"]
    );
    Ok(())
}

// ------------------------------------------------------------------------------ JWT

/// Istio's sample JWKS (security/tools/jwt/samples) and its `demo` token (issuer and
/// subject `testing@secure.istio.io`, expiring in 2118).
const DEMO_JWKS: &str = r#"{ "keys":[ {"e":"AQAB","kid":"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ","kty":"RSA","n":"xAE7eB6qugXyCAG3yhh7pkDkT65pHymX-P7KfIupjf59vsdo91bSP9C8H07pSAGQO1MV_xFj9VswgsCg4R6otmg5PV2He95lZdHtOcU5DXIg_pbhLdKXbi66GlVeK6ABZOUW3WYtnNHD-91gVuoeJT_DwtGGcp4ignkgXfkiEm4sw-4sfb4qdt5oLbyVpmW6x9cfa7vs2WTfURiCrBoUqgBo_-4WTiULmmHSGZHOjzwa8WtrtOQGsAFjIbno85jp6MnGGGZPYZbDAa_b3y5u-YpW7ypZrvD8BgtKVjgtQgZhLAGezMt0ua3DRrWnKqTZ0BJ_EyxOGuHJrLsn00fnMQ"}]}"#;
const DEMO: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkRIRmJwb0lVcXJZOHQyenBBMnFYZkNtcjVWTzVaRXI0UnpIVV8tZW52dlEiLCJ0eXAiOiJKV1QifQ.eyJleHAiOjQ2ODU5ODk3MDAsImZvbyI6ImJhciIsImlhdCI6MTUzMjM4OTcwMCwiaXNzIjoidGVzdGluZ0BzZWN1cmUuaXN0aW8uaW8iLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.CfNnxWP2tcnR9q0vxyxweaF3ovQYHYZl82hAUsn21bwQd9zP7c-LS9qd_vpdLG4Tn1A15NxfCjp5f7QNBUo-KC9PJqYpgGbaXhaGx7bEdFWjcwv3nZzvc7M__ZpaCERdwU7igUmJqYGBYQ51vr2njU9ZimyKkfDe3axcyiBZde7G6dabliUosJvvKOPcKIWPccCgefSj_GNfwIip3-SsFdlR7BtbVUcqR-yv-XOxJ3Uc1MI0tz3uMiiZcyPV7sNCU4KRnemRIMHVOfuvHsU60_GhGbiSFzgPTAa9WTltbnarTbxudb_YEOx12JiwYToeX0DCPb43W1tzIBxgm8NxUg";

/// The JWT filter with one provider copying the `sub` claim to `x-sub` (a token is
/// optional), with or without `clear_route_cache`.
fn jwt_filter(clear_route_cache: bool) -> Value {
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"demo": {
                "issuer": "testing@secure.istio.io",
                "local_jwks": {"inline_string": DEMO_JWKS},
                "claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"}],
                "clear_route_cache": clear_route_cache,
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "demo"}, {"allow_missing": {}}]}}}],
        },
    })
}

/// `clear_route_cache`: once the JWT filter has added a claim header, the route is chosen
/// again — the router and the filters after it (here the fault filter's per-route abort)
/// use the route the claim selects; without it the route chosen before the filters stands.
#[test]
fn jwt_clear_route_cache_chooses_the_route_again() -> Result<()> {
    let _lock = RunLock::shared();
    let config = |ports: &[u16]| {
        let mut by_claim = direct(
            json!({"prefix": "/", "headers": [{"name": "x-sub",
                "string_match": {"exact": "testing@secure.istio.io"}}]}),
            "by-claim",
        );
        by_claim["typed_per_filter_config"] = abort(418);
        let routes = || {
            table(vec![
                by_claim.clone(),
                direct(json!({"prefix": "/"}), "default"),
            ])
        };
        render(
            vec![
                http(
                    ports[0],
                    routes(),
                    vec![jwt_filter(true), fault_filter()],
                    json!({}),
                ),
                http(
                    ports[1],
                    routes(),
                    vec![jwt_filter(false), fault_filter()],
                    json!({}),
                ),
            ],
            vec![],
        )
    };
    let bearer = format!("Bearer {DEMO}");
    let observed = differential(2, config, |_, ports| {
        let mut out = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let r = request(*port, "GET", "/x", &[("Authorization", &bearer)], b"")?;
            out.push(format!("{i} token: {} {}", r.status, r.body));
            let r = request(*port, "GET", "/x", &[], b"")?;
            out.push(format!("{i} none: {} {}", r.status, r.body));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry[0], "0 token: 418 fault filter abort");
    assert_eq!(ferry[1], "0 none: 200 default");
    assert_eq!(ferry[2], "1 token: 200 default");
    Ok(())
}
