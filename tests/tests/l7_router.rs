//! The router's and HTTP filters' behaviour, proven equal to Envoy's: every scenario runs
//! the same static bootstrap through Ferry and through Envoy 1.40 in front of the same
//! `tests/apps/echo.py` backends, and asserts the same observations — status codes, how
//! many requests the backend saw (retries), delays within a tolerance, abort ratios within
//! a binomial bound, shadow requests reaching the mirror cluster with the `-shadow` host.
//!
//! Envoy comes from `ferry_tests::envoy`; without it a test is skipped with a note,
//! except under `CI=true`, where a missing Envoy fails the test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

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

    fn stat(&self, name: &str) -> Result<u64> {
        match self {
            Proxy::Ferry(f) => Ok(f.stat(name)),
            Proxy::Envoy(e) => e.stat(name),
        }
    }
}

/// Runs `observe` against Ferry and then Envoy, each started on `config(port)`, and
/// returns both observations (Ferry's first). `None`: Envoy is unavailable (skipped).
fn differential<T>(
    config: impl Fn(u16) -> String,
    mut observe: impl FnMut(&Proxy, u16) -> Result<T>,
) -> Result<Option<(T, T)>> {
    let Some(bin) = envoy::bin()? else {
        return Ok(None);
    };
    let port = free_port();
    let ferry = Proxy::Ferry(Ferry::start(&config(port))?);
    let a = observe(&ferry, port).with_context(|| match &ferry {
        Proxy::Ferry(f) => format!("through ferry; log:\n{}", f.log()),
        Proxy::Envoy(_) => String::new(),
    })?;
    drop(ferry);
    let port = free_port();
    let envoy = Proxy::Envoy(Envoy::start(
        &bin,
        &serde_json::from_str(&config(port))?,
        port,
    )?);
    let b = observe(&envoy, port).with_context(|| match &envoy {
        Proxy::Envoy(e) => format!("through envoy; log:\n{}", e.log()),
        Proxy::Ferry(_) => String::new(),
    })?;
    Ok(Some((a, b)))
}

// ------------------------------------------------------------------------------ client

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    elapsed: Duration,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
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

/// One HTTP/1.1 request on `s`, which stays open.
fn exchange(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply> {
    let start = Instant::now();
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
    // Read the head, then exactly Content-Length bytes: waiting for the close would time
    // the proxies' connection teardown (Envoy's delayed close) instead of the request.
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
    let elapsed = start.elapsed();
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
        elapsed,
    })
}

fn get(port: u16, path: &str) -> Result<Reply> {
    request(port, "GET", path, &[], b"")
}

/// How many requests `app` received for `path`, and the Host of the last one.
fn hits(app: &App, path: &str) -> Result<(u64, String)> {
    let (status, body) = http_request(local(app.port), "GET", &format!("/hits{path}"))?;
    if status != 200 {
        bail!("/hits answered {status}");
    }
    let v: Value = serde_json::from_str(&body)?;
    Ok((
        v["hits"].as_u64().unwrap_or(0),
        v["host"].as_str().unwrap_or_default().to_string(),
    ))
}

// ------------------------------------------------------------------------------ config

/// An HTTP listener on `port` with one virtual host (`*`) holding `routes`, and the HTTP
/// filters `filters` before the router.
fn http(port: u16, routes: Vec<Value>, filters: Vec<Value>, vhost_extra: Value) -> Value {
    let mut hcm = http_connection_manager("in", routes);
    let tc = &mut hcm["typed_config"];
    if let (Some(vh), Some(extra)) = (
        tc["route_config"]["virtual_hosts"][0].as_object_mut(),
        vhost_extra.as_object(),
    ) {
        vh.extend(extra.clone());
    }
    if let Some(list) = tc["http_filters"].as_array_mut() {
        for (i, f) in filters.into_iter().enumerate() {
            list.insert(i, f);
        }
    }
    listener("in", port, vec![json!({"filters": [hcm]})])
}

/// A route for `prefix` to `cluster` that strips the prefix, with extra `route` fields.
fn route(prefix: &str, cluster: &str, extra: Value) -> Value {
    let mut action = json!({"cluster": cluster, "prefix_rewrite": "/", "timeout": "5s"});
    if let (Some(a), Some(e)) = (action.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    json!({"match": {"prefix": prefix}, "route": action})
}

const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

fn fault_filter(config: Value) -> Value {
    let mut c = config;
    c["@type"] = json!(FAULT);
    json!({"name": "envoy.filters.http.fault", "typed_config": c})
}

fn percent(n: u32) -> Value {
    json!({"numerator": n, "denominator": "HUNDRED"})
}

fn render(listener: Value, clusters: Vec<Value>) -> String {
    let mut b = Bootstrap::new().listener(listener);
    for c in clusters {
        b = b.cluster(c);
    }
    b.render()
}

/// A unique tag per proxy run, so per-path hit counts never mix.
fn tag(p: &Proxy) -> String {
    format!("{}-{}", p.name(), free_port())
}

// ------------------------------------------------------------------------------ retries

#[test]
fn retries_on_a_flaky_backend() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let dead = free_port();
    let config = |port| {
        let routes = vec![
            route(
                "/r3/",
                "backend",
                json!({"retry_policy": {"retry_on": "5xx", "num_retries": 3}}),
            ),
            // A policy without num_retries retries once.
            route(
                "/r1/",
                "backend",
                json!({"retry_policy": {"retry_on": "5xx"}}),
            ),
            route(
                "/gw/",
                "backend",
                json!({"retry_policy": {"retry_on": "gateway-error", "num_retries": 2}}),
            ),
            route(
                "/4xx/",
                "backend",
                json!({"retry_policy": {"retry_on": "retriable-4xx", "num_retries": 2}}),
            ),
            route(
                "/codes/",
                "backend",
                json!({"retry_policy": {
                "retry_on": "retriable-status-codes", "retriable_status_codes": [418], "num_retries": 2}}),
            ),
            route(
                "/grpc/",
                "backend",
                json!({"retry_policy": {"retry_on": "unavailable", "num_retries": 2}}),
            ),
            route(
                "/reset/",
                "backend",
                json!({"retry_policy": {"retry_on": "reset", "num_retries": 2}}),
            ),
            route(
                "/cf/",
                "dead",
                json!({"retry_policy": {"retry_on": "connect-failure", "num_retries": 2}}),
            ),
            route("/none/", "backend", json!({})),
        ];
        // The virtual host's policy applies to routes without their own.
        let vhost = json!({"retry_policy": {"retry_on": "5xx", "num_retries": 2}});
        let mut routes = routes;
        routes.push(route("/vh/", "backend", json!({})));
        render(
            http(port, routes, vec![], vhost),
            vec![
                static_cluster("backend", &[app.port], Upstream::Http1),
                static_cluster("dead", &[dead], Upstream::Http1),
            ],
        )
    };
    let cases: &[(&str, &str)] = &[
        ("/r3/", "/flaky/2/503"),
        ("/r3/", "/flaky/9/503"),
        ("/r3/", "/flaky/1/404"),
        ("/r1/", "/flaky/9/500"),
        ("/gw/", "/flaky/1/502"),
        ("/gw/", "/flaky/1/500"),
        ("/4xx/", "/flaky/1/409"),
        ("/codes/", "/flaky/1/418"),
        ("/codes/", "/flaky/1/503"),
        ("/grpc/", "/grpc-status/14"),
        ("/grpc/", "/grpc-status/4"),
        ("/reset/", "/drop/1"),
        ("/none/", "/flaky/1/503"),
        ("/vh/", "/flaky/1/503"),
    ];
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let mut out = Vec::new();
        // Ferry re-sends a request on a fresh connection itself when a reused one was
        // closed under it (the keep-alive race); Envoy counts that as a retry under
        // `reset`. Both are requests sent again.
        let retries = || -> Result<u64> {
            Ok(p.stat("cluster.backend.upstream_rq_retry")?
                + p.stat("cluster.backend.upstream_rq_retry_stale_connection")?)
        };
        for (i, (prefix, path)) in cases.iter().enumerate() {
            let backend_path = format!("{path}/{t}/{i}");
            let before = retries()?;
            let r = get(port, &format!("{prefix}{}", &backend_path[1..]))?;
            let (n, _) = hits(&app, &backend_path)?;
            let counted = retries()? - before;
            out.push(format!(
                "{prefix}{path}: status {} hits {n} retries {counted}",
                r.status
            ));
        }
        let r = get(port, "/cf/x")?;
        out.push(format!(
            "/cf/: status {} retries {}",
            r.status,
            p.stat("cluster.dead.upstream_rq_retry")?
        ));
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    // The expectations themselves, so a shared mistake cannot pass.
    assert!(
        ferry.contains(&"/r3//flaky/2/503: status 200 hits 3 retries 2".to_string()),
        "{ferry:#?}"
    );
    assert!(
        ferry.contains(&"/r3//flaky/9/503: status 503 hits 4 retries 3".to_string()),
        "{ferry:#?}"
    );
    Ok(())
}

#[test]
fn a_retried_post_body_is_sent_again_whole() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let routes = vec![route(
            "/r/",
            "backend",
            json!({"retry_policy": {"retry_on": "5xx", "num_retries": 2}}),
        )];
        render(
            http(port, routes, vec![], json!({})),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let small = vec![b'a'; 10_000];
    // Beyond both proxies' retry buffers (Envoy: the 1 MiB connection buffer limit).
    let large = vec![b'a'; 2 << 20];
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let r = request(port, "POST", &format!("/r/flaky/2/503/{t}"), &[], &small)?;
        let echo: Value = serde_json::from_str(&r.body)?;
        let (n, _) = hits(&app, &format!("/flaky/2/503/{t}"))?;
        let big = request(
            port,
            "POST",
            &format!("/r/flaky/2/503/{t}/large"),
            &[],
            &large,
        )?;
        let (big_hits, _) = hits(&app, &format!("/flaky/2/503/{t}/large"))?;
        Ok((r.status, echo["body_len"].as_u64(), n, big.status, big_hits))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry, (200, Some(10_000), 3, 503, 1));
    Ok(())
}

// ------------------------------------------------------------------------------ timeouts

#[test]
fn route_and_per_try_timeouts() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let routes = vec![
            route("/route/", "backend", json!({"timeout": "0.3s"})),
            route(
                "/try/",
                "backend",
                json!({"timeout": "5s", "retry_policy": {
                "retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.2s"}}),
            ),
        ];
        render(
            http(port, routes, vec![], json!({})),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let route = get(port, &format!("/route/sleep/1000/{t}"))?;
        let fast = get(port, &format!("/route/sleep/10/{t}"))?;
        // The timeout covers the whole response: a body still arriving is cut.
        let body = get(port, &format!("/route/slowbody/1000/{t}"))?;
        let tries = get(port, &format!("/try/sleep/400/{t}"))?;
        let (n, _) = hits(&app, &format!("/sleep/400/{t}"))?;
        Ok((
            (route.status, route.body.clone(), route.elapsed),
            fast.status,
            (tries.status, tries.elapsed, n),
            (body.status, body.body.len(), body.elapsed),
        ))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    for (who, o) in [("ferry", &ferry), ("envoy", &envoy)] {
        assert_eq!(o.0.0, 504, "{who}");
        assert_eq!(o.0.1, "upstream request timeout", "{who}");
        assert!(near(o.0.2, 300), "{who}: route timeout after {:?}", o.0.2);
        assert_eq!(o.1, 200, "{who}");
        assert_eq!((o.2.0, o.2.2), (504, 3), "{who}");
        assert_eq!(
            (o.3.0, o.3.1),
            (200, 0),
            "{who}: response body past the timeout"
        );
        assert!(near(o.3.2, 300), "{who}: body cut after {:?}", o.3.2);
    }
    // Three tries of 200 ms plus two back-offs (at most 25 and 75 ms).
    assert!(
        ferry.2.1.abs_diff(envoy.2.1) < Duration::from_millis(250),
        "per-try: ferry {:?}, envoy {:?}",
        ferry.2.1,
        envoy.2.1
    );
    Ok(())
}

/// Within ±150 ms of `ms`.
fn near(d: Duration, ms: u64) -> bool {
    d.abs_diff(Duration::from_millis(ms)) <= Duration::from_millis(150)
}

// ------------------------------------------------------------------------------ faults

#[test]
fn fault_delays_and_aborts() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let filter = fault_filter(json!({
            "delay": {"fixed_delay": "0.3s", "percentage": percent(100)},
        }));
        let abort_half =
            json!({"@type": FAULT, "abort": {"http_status": 503, "percentage": percent(50)}});
        let grpc =
            json!({"@type": FAULT, "abort": {"grpc_status": 14, "percentage": percent(100)}});
        let headers = json!({"@type": FAULT,
            "abort": {"header_abort": {}, "percentage": percent(100)},
            "delay": {"header_delay": {}, "percentage": percent(100)}});
        let only_jason = json!({"@type": FAULT,
            "abort": {"http_status": 418, "percentage": percent(100)},
            "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]});
        let with = |prefix: &str, cfg: Value| {
            let mut r = route(prefix, "backend", json!({}));
            r["typed_per_filter_config"] = json!({"envoy.filters.http.fault": cfg});
            r
        };
        // A direct response: the abort ratio is measured without a backend's latency.
        let mut half = json!({"match": {"prefix": "/half/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}}});
        half["typed_per_filter_config"] = json!({"envoy.filters.http.fault": abort_half});
        let routes = vec![
            half,
            with("/grpc/", grpc),
            with("/hdr/", headers),
            with("/jason/", only_jason),
            route("/delay/", "backend", json!({})),
        ];
        render(
            http(port, routes, vec![filter], json!({})),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    const N: usize = 500;
    let observed = differential(config, |p, port| {
        let delay = get(port, "/delay/x")?;
        let mut aborted: usize = 0;
        let t0 = Instant::now();
        let mut conn = connect(port)?;
        for _ in 0..N {
            let r = exchange(&mut conn, "GET", "/half/x", &[], b"")?;
            match r.status {
                503 => {
                    aborted += 1;
                    if r.body != "fault filter abort" {
                        bail!("abort body {:?}", r.body);
                    }
                }
                200 => {}
                s => bail!("unexpected status {s}"),
            }
        }
        eprintln!("{}: {N} requests in {:?}", p.name(), t0.elapsed());
        let grpc = get(port, "/grpc/x")?;
        let grpc_req = request(
            port,
            "POST",
            "/grpc/x",
            &[("content-type", "application/grpc")],
            b"",
        )?;
        let hdr_abort = request(
            port,
            "GET",
            "/hdr/x",
            &[("x-envoy-fault-abort-request", "429")],
            b"",
        )?;
        let hdr_pct = request(
            port,
            "GET",
            "/hdr/x",
            &[
                ("x-envoy-fault-abort-request", "429"),
                ("x-envoy-fault-abort-request-percentage", "0"),
            ],
            b"",
        )?;
        let hdr_delay = request(
            port,
            "GET",
            "/hdr/x",
            &[("x-envoy-fault-delay-request", "200")],
            b"",
        )?;
        let hdr_none = get(port, "/hdr/x")?;
        let jason = request(port, "GET", "/jason/x", &[("end-user", "jason")], b"")?;
        let other = request(port, "GET", "/jason/x", &[("end-user", "mike")], b"")?;
        Ok((
            (delay.status, delay.elapsed),
            aborted,
            (
                grpc.status,
                grpc.header("grpc-status").map(str::to_string),
                grpc.header("content-type").map(str::to_string),
                grpc.body.clone(),
                grpc_req.status,
                grpc_req.header("grpc-status").map(str::to_string),
                grpc_req.header("grpc-message").map(str::to_string),
                grpc_req.header("content-type").map(str::to_string),
            ),
            (
                hdr_abort.status,
                hdr_pct.status,
                hdr_delay.status,
                hdr_delay.elapsed,
                hdr_none.status,
            ),
            (jason.status, other.status),
            (
                p.stat("http.in.fault.aborts_injected")?,
                p.stat("http.in.fault.delays_injected")?,
            ),
        ))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    for (who, o) in [("ferry", &ferry), ("envoy", &envoy)] {
        assert_eq!(o.0.0, 200, "{who}");
        assert!(near(o.0.1, 300), "{who}: delayed {:?}", o.0.1);
        // 50 % of 500: mean 250, standard deviation ~11.2; five of them either way.
        assert!(o.1.abs_diff(N / 2) <= 56, "{who}: {} of {N} aborted", o.1);
        assert!(near(o.3.3, 200), "{who}: header delay {:?}", o.3.3);
    }
    assert_eq!(ferry.2, envoy.2, "gRPC abort");
    assert_eq!(
        (ferry.3.0, ferry.3.1, ferry.3.2, ferry.3.4),
        (envoy.3.0, envoy.3.1, envoy.3.2, envoy.3.4),
        "header-controlled faults"
    );
    assert_eq!(ferry.3.0, 429);
    assert_eq!(ferry.4, envoy.4, "header-matched faults");
    assert_eq!(ferry.4, (418, 200));
    assert_eq!(ferry.5.1, envoy.5.1, "delays_injected");
    // The abort ratio, the gRPC aborts (2), the header abort and the matched one.
    assert_eq!(ferry.5.0, (ferry.1 + 4) as u64, "aborts_injected");
    assert_eq!(envoy.5.0, (envoy.1 + 4) as u64, "aborts_injected");
    Ok(())
}

// ------------------------------------------------------------------------------ mirroring

#[test]
fn mirroring_reaches_the_shadow_and_never_hurts_the_request() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let shadow = App::http("shadow", &[])?;
    let dead = free_port();
    let config = |port| {
        let routes = vec![
            route(
                "/m/",
                "backend",
                json!({"request_mirror_policies": [{"cluster": "shadow"}]}),
            ),
            route(
                "/none/",
                "backend",
                json!({"request_mirror_policies": [{"cluster": "shadow",
                "runtime_fraction": {"default_value": percent(0)}}]}),
            ),
            route(
                "/dead/",
                "backend",
                json!({"request_mirror_policies": [{"cluster": "dead"}]}),
            ),
        ];
        render(
            http(port, routes, vec![], json!({})),
            vec![
                static_cluster("backend", &[app.port], Upstream::Http1),
                static_cluster("shadow", &[shadow.port], Upstream::Http1),
                static_cluster("dead", &[dead], Upstream::Http1),
            ],
        )
    };
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let host = [("Host", "reviews.default:9080")];
        let main = request(port, "GET", &format!("/m/a/{t}"), &host, b"")?;
        let post = request(port, "POST", &format!("/m/b/{t}"), &host, &[b'x'; 2000])?;
        let none = request(port, "GET", &format!("/none/c/{t}"), &host, b"")?;
        let dead = request(port, "GET", &format!("/dead/d/{t}"), &host, b"")?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let (mut a, mut b) = (
            hits(&shadow, &format!("/a/{t}"))?,
            hits(&shadow, &format!("/b/{t}"))?,
        );
        while (a.0 == 0 || b.0 == 0) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            a = hits(&shadow, &format!("/a/{t}"))?;
            b = hits(&shadow, &format!("/b/{t}"))?;
        }
        thread::sleep(Duration::from_millis(200));
        let c = hits(&shadow, &format!("/c/{t}"))?;
        let main_hits = hits(&app, &format!("/a/{t}"))?;
        Ok((
            (main.status, main_hits.0, main_hits.1),
            (a.0, a.1),
            (post.status, b.0),
            (none.status, c.0),
            dead.status,
        ))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry.1, (1, "reviews.default-shadow:9080".to_string()));
    assert_eq!(ferry.0.2, "reviews.default:9080");
    Ok(())
}

#[test]
fn idle_timeout_and_max_stream_duration() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let routes = vec![
            route("/idle/", "backend", json!({"idle_timeout": "0.3s"})),
            route(
                "/msd/",
                "backend",
                json!({"max_stream_duration": {"max_stream_duration": "0.3s"}}),
            ),
        ];
        render(
            http(port, routes, vec![], json!({})),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |_p, port| {
        let mut out = Vec::new();
        for path in [
            "/idle/sleep/1000",
            "/idle/slowbody/1000",
            "/idle/sleep/10",
            "/msd/sleep/1000",
            "/msd/slowbody/1000",
            "/msd/sleep/10",
        ] {
            let r = get(port, path)?;
            // Bodies differ in the headers echoed (Envoy adds its own); whole or cut is the point.
            let body = if r.status == 200 {
                r.body.len().min(10).to_string()
            } else {
                r.body.clone()
            };
            out.push((path, r.status, body, near(r.elapsed, 300)));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(
        ferry[0],
        ("/idle/sleep/1000", 504, "stream timeout".into(), true)
    );
    assert_eq!(ferry[4], ("/msd/slowbody/1000", 200, "0".into(), true));
    Ok(())
}

#[test]
fn attempt_count_header_only_when_asked() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |asked: bool| {
        move |port| {
            let routes = vec![route(
                "/r/",
                "backend",
                json!({"retry_policy": {"retry_on": "5xx", "num_retries": 3}}),
            )];
            let vhost = if asked {
                json!({"include_request_attempt_count": true, "include_attempt_count_in_response": true})
            } else {
                json!({})
            };
            render(
                http(port, routes, vec![], vhost),
                vec![static_cluster("backend", &[app.port], Upstream::Http1)],
            )
        }
    };
    let observe = |p: &Proxy, port: u16| -> Result<(Option<String>, Option<String>)> {
        let r = get(port, &format!("/r/flaky/2/503/{}", tag(p)))?;
        let echo: Value = serde_json::from_str(&r.body)?;
        let upstream = echo["headers"].as_array().and_then(|hs| {
            hs.iter()
                .find(|h| {
                    h[0].as_str()
                        .is_some_and(|n| n.eq_ignore_ascii_case("x-envoy-attempt-count"))
                })
                .and_then(|h| h[1].as_str().map(str::to_string))
        });
        Ok((
            upstream,
            r.header("x-envoy-attempt-count").map(str::to_string),
        ))
    };
    let Some((ferry, envoy)) = differential(config(true), observe)? else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry, (Some("3".into()), Some("3".into())));
    let Some((ferry, envoy)) = differential(config(false), observe)? else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry, (None, None));
    Ok(())
}

/// Ferry's access log carries Envoy's response flags for what the router and the filters
/// did: DI (delay injected), FI (abort injected), URX (retries exhausted), UT (route
/// timeout), NC (no cluster), RL (rate limited).
#[test]
fn access_log_response_flags() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let port = free_port();
    let filter =
        fault_filter(json!({"delay": {"fixed_delay": "0.05s", "percentage": percent(100)}}));
    let mut abort = route("/abort/", "backend", json!({}));
    abort["typed_per_filter_config"] = json!({"envoy.filters.http.fault":
        {"@type": FAULT, "abort": {"http_status": 503, "percentage": percent(100)}}});
    let mut plain = route("/", "backend", json!({}));
    plain["typed_per_filter_config"] = json!({"envoy.filters.http.fault": {"@type": FAULT}});
    let mut limited = route("/limited/", "backend", json!({}));
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    limited["typed_per_filter_config"] = json!({
        "envoy.filters.http.fault": {"@type": FAULT},
        "envoy.filters.http.local_ratelimit": {"@type": LOCAL_RL, "stat_prefix": "route_rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "3600s"},
            "filter_enabled": all, "filter_enforced": all}});
    let routes = vec![
        abort,
        route("/delay/", "backend", json!({})),
        route(
            "/r/",
            "backend",
            json!({"retry_policy": {"retry_on": "5xx", "num_retries": 1}}),
        ),
        route("/t/", "backend", json!({"timeout": "0.1s"})),
        json!({"match": {"prefix": "/nc/"}, "route": {"cluster_header": "x-cluster"},
            "typed_per_filter_config": {"envoy.filters.http.fault": {"@type": FAULT}}}),
        limited,
        plain,
    ];
    let rl = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": LOCAL_RL, "stat_prefix": "rl"}});
    let cfg = render(
        http(port, routes, vec![filter, rl], json!({})),
        vec![static_cluster("backend", &[app.port], Upstream::Http1)],
    );
    let ferry = Ferry::start_with(&cfg, &["--access-log"])?;
    let t = free_port();
    let expect = [
        (format!("/abort/x/{t}"), 503, "FI"),
        (format!("/delay/x/{t}"), 200, "DI"),
        (format!("/r/flaky/9/503/{t}"), 503, "URX"),
        (format!("/t/sleep/500/{t}"), 504, "UT"),
        (format!("/nc/{t}"), 503, "NC"),
        (format!("/limited/a/{t}"), 200, "-"),
        (format!("/limited/b/{t}"), 429, "RL"),
        (format!("/plain/{t}"), 200, "-"),
    ];
    for (path, status, _) in &expect {
        assert_eq!(get(port, path)?.status, *status, "{path}");
    }
    thread::sleep(Duration::from_millis(100));
    let log = ferry.log();
    for (path, _, flag) in &expect {
        let line = log
            .lines()
            .find(|l| l.contains("access") && l.contains(path.as_str()))
            .ok_or_else(|| anyhow!("no access log line for {path}:\n{log}"))?;
        assert!(
            line.contains(&format!("response_flags={flag} "))
                || line.contains(&format!("response_flags=\"{flag}\"")),
            "{path}: {line}"
        );
    }
    Ok(())
}

/// `x-envoy-retry-on`, `x-envoy-max-retries` and `x-envoy-upstream-rq-timeout-ms` from a
/// client change nothing: only the route configuration decides.
#[test]
fn x_envoy_request_headers_are_not_honoured() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        render(
            http(
                port,
                vec![route("/", "backend", json!({}))],
                vec![],
                json!({}),
            ),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let retry = [("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2")];
        let r = request(port, "GET", &format!("/flaky/1/503/{t}"), &retry, b"")?;
        let (n, _) = hits(&app, &format!("/flaky/1/503/{t}"))?;
        let timeout = [("x-envoy-upstream-rq-timeout-ms", "100")];
        let slow = request(port, "GET", &format!("/sleep/400/{t}"), &timeout, b"")?;
        Ok((r.status, n, slow.status))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry, (503, 1, 200));
    Ok(())
}

/// With `envoy.retry_host_predicates.previous_hosts`, a retry goes to an endpoint not yet
/// tried: behind a random balancer over one failing and one healthy endpoint, every request
/// succeeds on its first retry at the latest.
#[test]
fn retries_avoid_previous_hosts() -> Result<()> {
    let _lock = RunLock::shared();
    let bad = App::http("bad", &["--status", "503"])?;
    let good = App::http("good", &[])?;
    let config = |port| {
        let policy = json!({"retry_policy": {
            "retry_on": "5xx",
            "num_retries": 1,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }],
            "host_selection_retry_max_attempts": 20,
        }});
        let mut cluster = static_cluster("backend", &[bad.port, good.port], Upstream::Http1);
        cluster["lb_policy"] = json!("RANDOM");
        render(
            http(port, vec![route("/", "backend", policy)], vec![], json!({})),
            vec![cluster],
        )
    };
    const N: usize = 20;
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let mut ok = 0;
        for i in 0..N {
            if get(port, &format!("/x/{t}/{i}"))?.status == 200 {
                ok += 1;
            }
        }
        Ok(ok)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!((ferry, envoy), (N, N));
    Ok(())
}

/// The cluster's `max_retries` circuit breaker stops retries: with it at zero a retriable
/// answer is passed on as it is and counted as `upstream_rq_retry_overflow`.
#[test]
fn retry_circuit_breaker_caps_retries() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let mut cluster = static_cluster("backend", &[app.port], Upstream::Http1);
        cluster["circuit_breakers"] = json!({"thresholds": [{"max_retries": 0}]});
        let policy = json!({"retry_policy": {"retry_on": "5xx", "num_retries": 3}});
        render(
            http(port, vec![route("/", "backend", policy)], vec![], json!({})),
            vec![cluster],
        )
    };
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let r = get(port, &format!("/flaky/1/503/{t}"))?;
        let (n, _) = hits(&app, &format!("/flaky/1/503/{t}"))?;
        Ok((
            r.status,
            n,
            p.stat("cluster.backend.upstream_rq_retry_overflow")?,
        ))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry, (503, 1, 1));
    Ok(())
}

/// A retry budget replaces `max_retries`: with a budget of at least one
/// retry the request is retried although `max_retries` is 0; with a budget
/// of none it overflows.
#[test]
fn retry_budget_replaces_max_retries() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    for (budget, want) in [
        (
            json!({"budget_percent": {"value": 100.0}, "min_retry_concurrency": 1}),
            (200, 2, 0),
        ),
        (
            json!({"budget_percent": {"value": 0.0}, "min_retry_concurrency": 0}),
            (503, 1, 1),
        ),
    ] {
        let config = |port| {
            let mut cluster = static_cluster("backend", &[app.port], Upstream::Http1);
            cluster["circuit_breakers"] =
                json!({"thresholds": [{"max_retries": 0, "retry_budget": budget}]});
            let policy = json!({"retry_policy": {"retry_on": "5xx", "num_retries": 3}});
            render(
                http(port, vec![route("/", "backend", policy)], vec![], json!({})),
                vec![cluster],
            )
        };
        let observed = differential(config, |p, port| {
            let t = format!("{}-{}", tag(p), want.0);
            let r = get(port, &format!("/flaky/1/503/{t}"))?;
            let (n, _) = hits(&app, &format!("/flaky/1/503/{t}"))?;
            Ok((
                r.status,
                n,
                p.stat("cluster.backend.upstream_rq_retry_overflow")?,
            ))
        })?;
        let Some((ferry, envoy)) = observed else {
            return Ok(());
        };
        assert_eq!(ferry, envoy);
        assert_eq!(ferry, want);
    }
    Ok(())
}

/// `max_active_faults`: with one delay in progress, a concurrent request is not faulted.
#[test]
fn max_active_faults_bounds_concurrent_faults() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let filter = fault_filter(json!({
            "delay": {"fixed_delay": "0.5s", "percentage": percent(100)},
            "max_active_faults": 1,
        }));
        render(
            http(
                port,
                vec![route("/", "backend", json!({}))],
                vec![filter],
                json!({}),
            ),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |p, port| {
        let first = thread::spawn(move || get(port, "/a"));
        thread::sleep(Duration::from_millis(150));
        let second = get(port, "/b")?;
        let first = first
            .join()
            .map_err(|_| anyhow!("client thread panicked"))??;
        Ok((
            (first.status, near(first.elapsed, 500)),
            (second.status, second.elapsed < Duration::from_millis(300)),
            p.stat("http.in.fault.faults_overflow")?,
            p.stat("http.in.fault.delays_injected")?,
        ))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry, ((200, true), (200, true), 1, 1));
    Ok(())
}

// ------------------------------------------------------------------------------ matches, actions

/// The value of `name` the backend received (its echo lists every header).
fn echoed(r: &Reply, name: &str) -> Option<String> {
    let v: Value = serde_json::from_str(&r.body).ok()?;
    let values: Vec<String> = v["headers"]
        .as_array()?
        .iter()
        .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .filter_map(|h| h[1].as_str().map(str::to_string))
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// The echoed JSON field `key` (`name`, `path`, …) of a backend's answer.
fn echo_field(r: &Reply, key: &str) -> String {
    serde_json::from_str::<Value>(&r.body)
        .ok()
        .and_then(|v| v[key].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn direct(m: Value, body: &str) -> Value {
    json!({"match": m, "direct_response": {"status": 200, "body": {"inline_string": body}}})
}

/// Query parameter matchers (every string matcher, `ignore_case`, `present_match`, a
/// parameter without value, the first of repeated values, percent-encoded values), the
/// `grpc` match and `runtime_fraction` pick the same routes through Ferry and Envoy.
#[test]
fn query_parameter_grpc_and_runtime_fraction_matches() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("grpc-backend", &[])?;
    let q = |name: &str, m: Value| json!({"prefix": "/", "query_parameters": [{"name": name, "string_match": m}]});
    let config = |port| {
        let routes = vec![
            direct(q("e", json!({"exact": "Yes"})), "exact"),
            direct(
                q("i", json!({"exact": "yes", "ignore_case": true})),
                "ignore-case",
            ),
            direct(q("p", json!({"prefix": "ab"})), "prefix"),
            direct(q("s", json!({"suffix": "yz"})), "suffix"),
            direct(q("c", json!({"contains": "mid"})), "contains"),
            direct(
                q("r", json!({"safe_regex": {"regex": "[0-9]{3}"}})),
                "regex",
            ),
            direct(q("sp", json!({"exact": "a b"})), "decoded"),
            direct(q("sp", json!({"exact": "a%20b"})), "encoded"),
            direct(
                json!({"prefix": "/", "query_parameters": [{"name": "present", "present_match": true}]}),
                "present",
            ),
            direct(
                json!({"prefix": "/", "query_parameters": [{"name": "bare"}]}),
                "bare",
            ),
            // gRPC requests get gRPC-shaped local replies from Envoy: to the backend.
            json!({"match": {"prefix": "/", "grpc": {}}, "route": {"cluster": "backend"}}),
            direct(
                json!({"prefix": "/never", "runtime_fraction": {"default_value": {"numerator": 0}, "runtime_key": "k0"}}),
                "never",
            ),
            direct(
                json!({"prefix": "/always", "runtime_fraction": {"default_value": {"numerator": 100}, "runtime_key": "k1"}}),
                "always",
            ),
            direct(
                json!({"prefix": "/half", "runtime_fraction": {"default_value": {"numerator": 5000, "denominator": "TEN_THOUSAND"}, "runtime_key": "k2"}}),
                "half",
            ),
            // Last but one: every request without the parameter matches it.
            direct(
                json!({"prefix": "/", "query_parameters": [{"name": "absent", "present_match": false}]}),
                "present-false",
            ),
            direct(json!({"prefix": "/"}), "fallback"),
        ];
        render(
            http(port, routes, vec![], json!({})),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("/x?e=Yes", vec![]),
        ("/x?e=yes", vec![]),
        ("/x?i=YES", vec![]),
        ("/x?p=abc", vec![]),
        ("/x?s=xyz", vec![]),
        ("/x?c=amidst", vec![]),
        ("/x?r=123", vec![]),
        ("/x?r=1234", vec![]),
        ("/x?e=no&e=Yes", vec![]),
        ("/x?e=Yes&e=no", vec![]),
        ("/x?sp=a%20b", vec![]),
        ("/x?present", vec![]),
        ("/x?present=", vec![]),
        ("/x?absent=1", vec![]),
        ("/x?bare=1", vec![]),
        ("/x?bare", vec![]),
        ("/x?E=Yes", vec![]),
        ("/x", vec![("content-type", "application/grpc")]),
        ("/x", vec![("content-type", "application/grpc+proto")]),
        ("/x", vec![("content-type", "application/grpc-web")]),
        ("/x", vec![("content-type", "application/json")]),
        // A direct response to a gRPC request is a trailers-only gRPC answer.
        ("/x?e=Yes", vec![("content-type", "application/grpc")]),
        (
            "/x?absent=1&r=9",
            vec![("content-type", "application/grpc")],
        ),
        ("/never", vec![]),
        ("/always", vec![]),
    ];
    let observed = differential(config, |_, port| {
        let mut out = Vec::new();
        for (path, headers) in &cases {
            let r = request(port, "GET", path, headers, b"")?;
            let who = match echo_field(&r, "name") {
                n if n.is_empty() => r.body.clone(),
                n => n,
            };
            out.push(format!(
                "{path} {headers:?} -> {} {who} {:?} {:?} {:?}",
                r.status,
                r.header("content-type"),
                r.header("grpc-status"),
                r.header("grpc-message"),
            ));
        }
        let half = (0..200)
            .map(|_| get(port, "/half").map(|r| r.body == "half"))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|h| *h)
            .count();
        Ok((out, half))
    })?;
    let Some(((ferry, ferry_half), (envoy, envoy_half))) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert!(ferry.iter().any(|l| l.contains("200 regex")), "{ferry:?}");
    // 200 draws at 50 %: both within ±5 standard deviations (±35) of 100.
    for half in [ferry_half, envoy_half] {
        assert!((65..=135).contains(&half), "{ferry_half} {envoy_half}");
    }
    Ok(())
}

/// `cluster_header` picks the backend per request (a missing header or an unknown cluster is
/// 503); `regex_rewrite` rewrites the path with groups and keeps the query;
/// `host_rewrite_header`, `host_rewrite_path_regex` and `auto_host_rewrite` (STRICT_DNS)
/// change the Host the backend sees.
#[test]
fn cluster_header_and_rewrites() -> Result<()> {
    let _lock = RunLock::shared();
    let a = App::http("a", &[])?;
    let b = App::http("b", &[])?;
    let config = |port| {
        let routes = vec![
            json!({"match": {"prefix": "/ch/"}, "route": {"cluster_header": "x-cluster", "timeout": "5s"}}),
            json!({"match": {"prefix": "/ch404/"}, "route": {"cluster_header": "x-cluster",
                "cluster_not_found_response_code": "NOT_FOUND"}}),
            json!({"match": {"prefix": "/rx/"}, "route": {"cluster": "a", "regex_rewrite": {
                "pattern": {"regex": "^/rx/([^/]+)/([^/]+)$"}, "substitution": "/\\2/and/\\1"}}}),
            json!({"match": {"prefix": "/all/"}, "route": {"cluster": "a", "regex_rewrite": {
                "pattern": {"regex": "o"}, "substitution": "0"}}}),
            json!({"match": {"prefix": "/hh/"}, "route": {"cluster": "a", "host_rewrite_header": "x-host"}}),
            json!({"match": {"prefix": "/hp/"}, "route": {"cluster": "a", "host_rewrite_path_regex": {
                "pattern": {"regex": "^/hp/([a-z]+)/.*$"}, "substitution": "\\1.example.com"}}}),
            json!({"match": {"prefix": "/dns/"}, "route": {"cluster": "dns", "auto_host_rewrite": true}}),
            json!({"match": {"prefix": "/lit/"}, "route": {"cluster": "a", "host_rewrite_literal": "fixed.example"}}),
            json!({"match": {"prefix": "/static/"}, "route": {"cluster": "a", "auto_host_rewrite": true}}),
        ];
        let dns = json!({
            "name": "dns", "type": "STRICT_DNS", "connect_timeout": "1s",
            "dns_lookup_family": "V4_ONLY",
            "load_assignment": {"cluster_name": "dns", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "localhost", "port_value": b.port}}}}
            ]}]}
        });
        render(
            http(port, routes, vec![], json!({})),
            vec![
                static_cluster("a", &[a.port], Upstream::Http1),
                static_cluster("b", &[b.port], Upstream::Http1),
                dns,
            ],
        )
    };
    let observed = differential(config, |_, port| {
        let mut out = Vec::new();
        let mut note = |what: &str, r: Reply| {
            out.push(format!(
                "{what}: {} {} {} host={} original={:?} forwarded={:?}",
                r.status,
                echo_field(&r, "name"),
                echo_field(&r, "path"),
                echoed(&r, "host").unwrap_or_default(),
                echoed(&r, "x-envoy-original-host"),
                echoed(&r, "x-forwarded-host"),
            ))
        };
        note(
            "ch a",
            request(port, "GET", "/ch/x", &[("x-cluster", "a")], b"")?,
        );
        note(
            "ch b",
            request(port, "GET", "/ch/x", &[("x-cluster", "b")], b"")?,
        );
        note("ch none", get(port, "/ch/x")?);
        note(
            "ch unknown",
            request(port, "GET", "/ch/x", &[("x-cluster", "zz")], b"")?,
        );
        note("rx", get(port, "/rx/one/two?k=v")?);
        note("rx miss", get(port, "/rx/one/two/three")?);
        note("all", get(port, "/all/foo/boo")?);
        note(
            "hh",
            request(port, "GET", "/hh/x", &[("x-host", "other.example")], b"")?,
        );
        note("hh none", get(port, "/hh/x")?);
        note("hp", get(port, "/hp/reviews/x?q=1")?);
        note("literal", get(port, "/lit/x")?);
        note(
            "literal same",
            request(port, "GET", "/lit/x", &[("Host", "fixed.example")], b"")?,
        );
        // STRICT_DNS may need a moment for its first resolution.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dns = get(port, "/dns/x")?;
        while dns.status != 200 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            dns = get(port, "/dns/x")?;
        }
        note("dns", dns);
        note("static", get(port, "/static/x")?);
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert!(ferry[0].starts_with("ch a: 200 a"), "{ferry:?}");
    assert!(ferry[2].starts_with("ch none: 503"), "{ferry:?}");
    assert!(ferry[4].contains("/two/and/one?k=v"), "{ferry:?}");
    Ok(())
}

// ------------------------------------------------------------------------------ header formatters

/// Request and response `headers_to_add` with formatters (addresses, `%HOSTNAME%`,
/// `%PROTOCOL%`, `%REQ()%`, `%START_TIME%`, `%%`), at route, virtual host and route table
/// levels with every append action, give the same headers through Ferry and Envoy (ports
/// and times normalised).
#[test]
fn header_value_formatters_and_levels() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let add = |k: &str, v: &str, action: &str| json!({"header": {"key": k, "value": v}, "append_action": action});
    let config = |port| {
        let mut r = route("/", "backend", json!({}));
        r["request_headers_to_add"] = json!([
            add(
                "x-remote",
                "%DOWNSTREAM_REMOTE_ADDRESS%",
                "APPEND_IF_EXISTS_OR_ADD"
            ),
            add(
                "x-remote-ip",
                "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                "APPEND_IF_EXISTS_OR_ADD"
            ),
            add(
                "x-local",
                "%DOWNSTREAM_LOCAL_ADDRESS%",
                "APPEND_IF_EXISTS_OR_ADD"
            ),
            add("x-host-name", "%HOSTNAME%", "APPEND_IF_EXISTS_OR_ADD"),
            add("x-proto", "%PROTOCOL%", "APPEND_IF_EXISTS_OR_ADD"),
            add("x-copy", "got-%REQ(x-in)%", "APPEND_IF_EXISTS_OR_ADD"),
            add("x-missing", "%REQ(x-nothing)%", "APPEND_IF_EXISTS_OR_ADD"),
            add("x-start", "%START_TIME%", "APPEND_IF_EXISTS_OR_ADD"),
            add("x-epoch", "%START_TIME(%s)%", "APPEND_IF_EXISTS_OR_ADD"),
            // Date-level specifiers: equal between the two runs unless they straddle midnight.
            add(
                "x-date",
                "%START_TIME(%F|%D|%a|%A|%b|%B|%e|%j|%y|%Z|%z|%%)%",
                "APPEND_IF_EXISTS_OR_ADD",
            ),
            add("x-pct", "100%%", "APPEND_IF_EXISTS_OR_ADD"),
            add(
                "x-up-req",
                "%UPSTREAM_REMOTE_ADDRESS%",
                "APPEND_IF_EXISTS_OR_ADD"
            ),
            add("x-in", "route", "APPEND_IF_EXISTS_OR_ADD"),
            add("x-absent", "route", "ADD_IF_ABSENT"),
            add("x-over", "route", "OVERWRITE_IF_EXISTS"),
            add("x-level", "route", "OVERWRITE_IF_EXISTS_OR_ADD"),
        ]);
        r["request_headers_to_remove"] = json!(["x-drop"]);
        r["response_headers_to_add"] = json!([
            add(
                "x-upstream",
                "%UPSTREAM_REMOTE_ADDRESS%",
                "APPEND_IF_EXISTS_OR_ADD"
            ),
            add("x-resp-req", "%REQ(x-in)%", "APPEND_IF_EXISTS_OR_ADD"),
            add("x-resp-level", "route", "APPEND_IF_EXISTS_OR_ADD"),
        ]);
        let vhost = json!({
            "request_headers_to_add": [add("x-level", "vhost", "APPEND_IF_EXISTS_OR_ADD")],
            "response_headers_to_add": [add("x-resp-level", "vhost", "OVERWRITE_IF_EXISTS_OR_ADD")],
        });
        let mut direct = json!({"match": {"prefix": "/direct"},
            "direct_response": {"status": 201, "body": {"inline_string": "made here"}}});
        direct["response_headers_to_add"] = json!([
            add(
                "x-direct",
                "%REQ(x-in)%-%PROTOCOL%",
                "APPEND_IF_EXISTS_OR_ADD"
            ),
            add(
                "x-up-direct",
                "%UPSTREAM_REMOTE_ADDRESS%",
                "APPEND_IF_EXISTS_OR_ADD"
            ),
        ]);
        let mut l = http(port, vec![direct, r], vec![], vhost);
        let rc = &mut l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"];
        rc["request_headers_to_add"] = json!([add("x-level", "table", "APPEND_IF_EXISTS_OR_ADD")]);
        rc["response_headers_to_add"] =
            json!([add("x-resp-level", "table", "APPEND_IF_EXISTS_OR_ADD")]);
        render(
            l,
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let names = [
        "x-remote",
        "x-remote-ip",
        "x-local",
        "x-host-name",
        "x-proto",
        "x-copy",
        "x-missing",
        "x-start",
        "x-epoch",
        "x-date",
        "x-pct",
        "x-up-req",
        "x-in",
        "x-absent",
        "x-over",
        "x-level",
        "x-drop",
    ];
    let observed = differential(config, |_, port| {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let r = request(
            port,
            "GET",
            "/x",
            &[("x-in", "client"), ("x-over", "client"), ("x-drop", "1")],
            b"",
        )?;
        let mut out = Vec::new();
        for n in names {
            let v = echoed(&r, n).unwrap_or_else(|| "<none>".into());
            // Ports and times differ between the runs: keep their shape.
            let v = match n {
                "x-remote" => v.replace(|c: char| c.is_ascii_digit(), "9"),
                "x-local" => v.replace(&port.to_string(), "PORT"),
                "x-start" => {
                    let shape: String = v
                        .chars()
                        .map(|c| if c.is_ascii_digit() { '9' } else { c })
                        .collect();
                    shape
                }
                "x-epoch" => {
                    let t: u64 = v.parse().unwrap_or(0);
                    format!("within 5s: {}", t >= before && t <= before + 5)
                }
                _ => v,
            };
            out.push(format!("{n}={v}"));
        }
        for n in ["x-upstream", "x-resp-req", "x-resp-level"] {
            let v = r
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
                .join(",");
            out.push(format!(
                "resp {n}={}",
                v.replace(&app.port.to_string(), "APP")
            ));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert!(
        ferry.contains(&"x-remote-ip=127.0.0.1".to_string()),
        "{ferry:?}"
    );
    assert!(
        ferry
            .iter()
            .any(|l| l.starts_with("x-date=") && l.ends_with("|UTC|+0000|%")),
        "{ferry:?}"
    );
    assert!(
        ferry.contains(&"x-local=127.0.0.1:PORT".to_string()),
        "{ferry:?}"
    );
    assert!(
        ferry.contains(&"resp x-upstream=127.0.0.1:APP".to_string()),
        "{ferry:?}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ cors

const CORS: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// Method, path, request headers of one request to make.
type CorsCase = (&'static str, String, Vec<(&'static str, &'static str)>);

fn cors_filter() -> Value {
    json!({"name": "envoy.filters.http.cors", "typed_config":
        {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}})
}

/// The CORS filter with virtual host and route policies: preflights answered by the proxy
/// (allowed origin) or passed to the backend (other origins), simple requests given
/// `access-control-allow-origin` and `-expose-headers`, route settings falling back to the
/// virtual host's field by field, a disabled and a shadow-only policy, the deprecated
/// inline `cors`, and the `origin_valid`/`origin_invalid` counters — the same through Ferry
/// and Envoy.
#[test]
fn cors_preflight_and_simple_requests() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let with = |prefix: &str, policy: Value| {
            let mut r = route(prefix, "backend", json!({}));
            let mut p = policy;
            p["@type"] = json!(CORS);
            r["typed_per_filter_config"] = json!({"envoy.filters.http.cors": p});
            r
        };
        let routes = vec![
            // Only methods of its own: origins, headers, max-age come from the virtual host.
            with(
                "/own/",
                json!({"allow_methods": "PUT", "allow_credentials": false}),
            ),
            with(
                "/any/",
                json!({"allow_origin_string_match": [{"exact": "*"}], "expose_headers": "x-any"}),
            ),
            with(
                "/off/",
                json!({"filter_enabled": {"default_value": {"numerator": 0}, "runtime_key": "c0"}}),
            ),
            with(
                "/shadow/",
                json!({"filter_enabled": {"default_value": {"numerator": 0}, "runtime_key": "c1"},
                       "shadow_enabled": {"default_value": {"numerator": 100}, "runtime_key": "c2"}}),
            ),
            with(
                "/strict/",
                json!({"forward_not_matching_preflights": false, "allow_private_network_access": true}),
            ),
            // The deprecated inline policy is ignored while typed ones exist.
            route(
                "/inline/",
                "backend",
                json!({"cors": {"allow_origin_string_match": [{"exact": "https://evil.org"}]}}),
            ),
            route("/", "backend", json!({})),
        ];
        let vhost = json!({"typed_per_filter_config": {"envoy.filters.http.cors": {
            "@type": CORS,
            "allow_origin_string_match": [{"suffix": ".example.com"}, {"exact": "HTTPS://UPPER.ORG", "ignore_case": true}],
            "allow_methods": "GET,POST",
            "allow_headers": "x-custom,content-type",
            "expose_headers": "x-exposed",
            "max_age": "600",
            "allow_credentials": true,
        }}});
        render(
            http(port, routes, vec![cors_filter()], vhost),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let cors_headers = [
        "access-control-allow-origin",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-max-age",
        "access-control-allow-credentials",
        "access-control-expose-headers",
        "access-control-allow-private-network",
    ];
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let pre = |origin: &'static str| {
            vec![
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
            ]
        };
        let cases: Vec<CorsCase> = vec![
            ("OPTIONS", format!("/p/{t}"), pre("https://a.example.com")),
            ("OPTIONS", format!("/p2/{t}"), pre("https://evil.org")),
            (
                "OPTIONS",
                format!("/p3/{t}"),
                vec![("Origin", "https://a.example.com")],
            ),
            ("OPTIONS", format!("/p4/{t}"), pre("https://upper.org")),
            (
                "GET",
                format!("/s/{t}"),
                vec![("Origin", "https://a.example.com")],
            ),
            (
                "GET",
                format!("/s2/{t}"),
                vec![("Origin", "https://evil.org")],
            ),
            ("GET", format!("/s3/{t}"), vec![]),
            (
                "OPTIONS",
                format!("/own/op/{t}"),
                pre("https://b.example.com"),
            ),
            (
                "GET",
                format!("/own/os/{t}"),
                vec![("Origin", "https://b.example.com")],
            ),
            ("OPTIONS", format!("/any/ap/{t}"), pre("https://evil.org")),
            (
                "GET",
                format!("/any/as/{t}"),
                vec![("Origin", "https://evil.org")],
            ),
            (
                "GET",
                format!("/off/fs/{t}"),
                vec![("Origin", "https://a.example.com")],
            ),
            (
                "OPTIONS",
                format!("/off/fp/{t}"),
                pre("https://a.example.com"),
            ),
            (
                "GET",
                format!("/shadow/hs/{t}"),
                vec![("Origin", "https://a.example.com")],
            ),
            (
                "OPTIONS",
                format!("/strict/sp/{t}"),
                pre("https://evil.org"),
            ),
            (
                "OPTIONS",
                format!("/strict/sp2/{t}"),
                vec![
                    ("Origin", "https://a.example.com"),
                    ("Access-Control-Request-Method", "GET"),
                    ("Access-Control-Request-Private-Network", "true"),
                ],
            ),
            (
                "GET",
                format!("/inline/is/{t}"),
                vec![("Origin", "https://evil.org")],
            ),
        ];
        let mut out = Vec::new();
        for (method, path, headers) in &cases {
            let r = request(port, method, path, headers, b"")?;
            // Which answered: the backend counts what reached it (the routes strip their
            // prefix; every case has a path of its own).
            let seen = ["/own", "/any", "/off", "/shadow", "/strict", "/inline"]
                .iter()
                .find_map(|p| path.strip_prefix(p))
                .unwrap_or(path);
            let backend = hits(&app, seen)?.0;
            let mut line = format!(
                "{method} {} -> {} backend={backend}",
                path.replace(&t, "T"),
                r.status
            );
            for h in cors_headers {
                if let Some(v) = r.header(h) {
                    line.push_str(&format!(" {h}={v}"));
                }
            }
            out.push(line);
        }
        let valid = p.stat("http.in.cors.origin_valid")?;
        let invalid = p.stat("http.in.cors.origin_invalid")?;
        Ok((out, valid, invalid))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    let (lines, valid, _) = &ferry;
    assert!(lines[0].contains("backend=0"), "{lines:?}");
    assert!(lines[0].contains("access-control-max-age=600"), "{lines:?}");
    // forward_not_matching_preflights: false answers the preflight, without an origin.
    let strict = lines
        .iter()
        .find(|l| l.contains("/strict/sp/"))
        .ok_or_else(|| anyhow!("no strict line"))?;
    assert!(
        strict.contains("backend=0") && !strict.contains("allow-origin"),
        "{strict}"
    );
    assert!(*valid > 0);
    Ok(())
}

// ------------------------------------------------------------------------------ local rate limit

const LOCAL_RL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// The local rate limit filter: a token bucket of the filter (3 tokens, refilled hourly)
/// serves three requests and refuses the next with 429 and the configured response headers
/// (no `x-envoy-ratelimited`, whatever Envoy's docs say); a route's own configuration has its own bucket and status;
/// a route that enables but does not enforce only marks the request; counters as Envoy's.
#[test]
fn local_rate_limit_token_buckets() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    let config = |port| {
        let filter = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": LOCAL_RL,
            "stat_prefix": "listener_rl",
            "token_bucket": {"max_tokens": 3, "tokens_per_fill": 3, "fill_interval": "3600s"},
            "filter_enabled": all,
            "filter_enforced": all,
            "response_headers_to_add": [{"header": {"key": "x-limited-by", "value": "listener"},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        }});
        let mut own = route("/own/", "backend", json!({}));
        own["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL,
            "stat_prefix": "route_rl",
            "status": {"code": 503},
            "token_bucket": {"max_tokens": 1, "fill_interval": "3600s"},
            "filter_enabled": all,
            "filter_enforced": all,
        }});
        let mut shadow = route("/shadow/", "backend", json!({}));
        shadow["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL,
            "stat_prefix": "shadow_rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "3600s"},
            "filter_enabled": all,
            "request_headers_to_add_when_not_enforced": [{"header": {"key": "x-over-limit", "value": "yes"}}],
        }});
        let mut off = route("/off/", "backend", json!({}));
        off["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL,
            "stat_prefix": "off_rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "3600s"},
        }});
        let routes = vec![own, shadow, off, route("/", "backend", json!({}))];
        render(
            http(port, routes, vec![filter], json!({})),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |p, port| {
        let mut out = Vec::new();
        for prefix in ["/", "/own/", "/shadow/", "/off/"] {
            for i in 0..5 {
                let r = get(port, &format!("{prefix}x/{i}"))?;
                out.push(format!(
                    "{prefix} {i}: {} {:?} {:?} {:?} over={:?}",
                    r.status,
                    r.header("x-envoy-ratelimited"),
                    r.header("x-limited-by"),
                    (r.status != 200).then(|| r.body.clone()),
                    echoed(&r, "x-over-limit"),
                ));
            }
        }
        let mut counters = Vec::new();
        for prefix in ["listener_rl", "route_rl", "shadow_rl", "off_rl"] {
            for c in ["enabled", "ok", "rate_limited", "enforced"] {
                let name = format!("{prefix}.http_local_rate_limit.{c}");
                counters.push(format!("{name}={}", p.stat(&name)?));
            }
        }
        Ok((out, counters))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    let (lines, _) = &ferry;
    assert!(lines[3].starts_with("/ 3: 429"), "{lines:?}");
    assert!(lines[6].starts_with("/own/ 1: 503"), "{lines:?}");
    Ok(())
}

// ------------------------------------------------------------------------------ filter order, gRPC

/// Every local reply to a gRPC request (no route, unknown cluster, a fault abort with an
/// HTTP status, a rate-limited request) is a trailers-only gRPC answer; a filter's answer
/// goes back through the filters before it, so the CORS filter in front of the rate limit
/// filter adds its headers to the 429; a request no route matches still runs the filters
/// (it takes a token before its 404) — the same through Ferry and Envoy.
#[test]
fn local_replies_to_grpc_and_through_earlier_filters() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    let config = |port| {
        let rl = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": LOCAL_RL,
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "3600s"},
            "filter_enabled": all,
            "filter_enforced": all,
        }});
        let mut limited = route("/limited/", "backend", json!({}));
        limited["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL,
            "stat_prefix": "route_rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "3600s"},
            "filter_enabled": all,
            "filter_enforced": all,
        }});
        let mut exhausted = route("/exhausted/", "backend", json!({}));
        exhausted["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL,
            "stat_prefix": "exhausted_rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "3600s"},
            "filter_enabled": all,
            "filter_enforced": all,
            "rate_limited_as_resource_exhausted": true,
        }});
        let mut abort = route("/abort/", "backend", json!({}));
        abort["typed_per_filter_config"] = json!({"envoy.filters.http.fault":
            {"@type": FAULT, "abort": {"http_status": 503, "percentage": percent(100)}}});
        let routes = vec![
            limited,
            exhausted,
            abort,
            // No x-cluster header: no cluster (503, NC).
            json!({"match": {"prefix": "/nc/"}, "route": {"cluster_header": "x-cluster"}}),
            json!({"match": {"prefix": "/api/"}, "route": {"cluster": "backend"}}),
        ];
        let vhost = json!({"typed_per_filter_config": {"envoy.filters.http.cors": {
            "@type": CORS,
            "allow_origin_string_match": [{"exact": "https://a.example.com"}],
            "expose_headers": "x-exposed",
        }}});
        render(
            http(
                port,
                routes,
                vec![cors_filter(), fault_filter(json!({})), rl],
                vhost,
            ),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let grpc = [("content-type", "application/grpc")];
    let origin = [("Origin", "https://a.example.com")];
    let cases: Vec<(&str, &[(&str, &str)])> = vec![
        ("/nowhere", &grpc),
        ("/nc/x", &grpc),
        ("/nc/x", &[]),
        ("/abort/x", &grpc),
        ("/abort/x", &origin),
        ("/limited/1", &origin),
        ("/limited/2", &origin),
        ("/limited/3", &grpc),
        ("/exhausted/1", &grpc),
        ("/exhausted/2", &grpc),
    ];
    let observed = differential(config, |_, port| {
        let mut out = Vec::new();
        for (path, headers) in &cases {
            let r = request(port, "GET", path, headers, b"")?;
            let body = if r.status == 200 && echo_field(&r, "name") == "backend" {
                "<backend>".to_string()
            } else {
                r.body.clone()
            };
            out.push(format!(
                "{path} {headers:?} -> {} {:?} grpc-status={:?} grpc-message={:?} acao={:?} expose={:?} body={body:?}",
                r.status,
                r.header("content-type"),
                r.header("grpc-status"),
                r.header("grpc-message"),
                r.header("access-control-allow-origin"),
                r.header("access-control-expose-headers"),
            ));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert!(ferry[0].contains("grpc-status=Some(\"12\")"), "{ferry:?}");
    // rate_limited_as_resource_exhausted: RESOURCE_EXHAUSTED instead of UNAVAILABLE.
    assert!(
        ferry
            .last()
            .is_some_and(|l| l.contains("grpc-status=Some(\"8\")")),
        "{ferry:?}"
    );
    Ok(())
}

/// Without any `typed_per_filter_config` policy, the deprecated inline `cors` of the route
/// and of its virtual host apply (the route's settings first, field by field).
#[test]
fn deprecated_inline_cors_policies() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let routes = vec![
            route(
                "/own/",
                "backend",
                json!({"cors": {"allow_methods": "DELETE", "expose_headers": "x-route"}}),
            ),
            route("/", "backend", json!({})),
        ];
        let vhost = json!({"cors": {
            "allow_origin_string_match": [{"prefix": "https://ok."}],
            "allow_methods": "GET",
            "allow_headers": "x-h",
            "max_age": "30",
        }});
        render(
            http(port, routes, vec![cors_filter()], vhost),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |p, port| {
        let t = tag(p);
        let pre = [
            ("Origin", "https://ok.example"),
            ("Access-Control-Request-Method", "DELETE"),
        ];
        let simple = [("Origin", "https://ok.example")];
        let mut out = Vec::new();
        for (method, path, headers) in [
            ("OPTIONS", format!("/own/a/{t}"), &pre[..]),
            ("GET", format!("/own/b/{t}"), &simple[..]),
            ("OPTIONS", format!("/c/{t}"), &pre[..]),
            (
                "GET",
                format!("/d/{t}"),
                &[("Origin", "https://no.example")][..],
            ),
        ] {
            let r = request(port, method, &path, headers, b"")?;
            let mut line = format!("{method} {} -> {}", path.replace(&t, "T"), r.status);
            for (k, v) in &r.headers {
                if k.to_ascii_lowercase().starts_with("access-control-") {
                    line.push_str(&format!(" {}={v}", k.to_ascii_lowercase()));
                }
            }
            out.push(line);
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert!(
        ferry[0].contains("access-control-allow-methods=DELETE"),
        "{ferry:?}"
    );
    Ok(())
}

/// Envoy 1.40 refills a local rate limit bucket continuously: ten tokens per twenty
/// seconds give one token back after about two seconds, not ten at the end of the
/// interval. Three seconds after the bucket started to empty, one request passes and the
/// next is limited (anything from 2 s to 4 s gives that answer; the time is counted from
/// the first request, as the bucket counts it, so a slow first burst does not move it).
#[test]
fn local_rate_limit_refills_continuously() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    let config = |port| {
        let filter = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": LOCAL_RL,
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 10, "tokens_per_fill": 10, "fill_interval": "20s"},
            "filter_enabled": all,
            "filter_enforced": all,
        }});
        render(
            http(
                port,
                vec![route("/", "backend", json!({}))],
                vec![filter],
                json!({}),
            ),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |_, port| {
        let burst = |n: usize| -> Result<Vec<u16>> {
            (0..n)
                .map(|i| Ok(get(port, &format!("/x/{i}"))?.status))
                .collect()
        };
        // Half a token a second, counted from the first request: the
        // second burst starts 3 s after it, whatever the first one took,
        // and finds one and a half tokens.
        let start = std::time::Instant::now();
        let first = burst(11)?;
        thread::sleep(
            (start + Duration::from_secs(3)).saturating_duration_since(std::time::Instant::now()),
        );
        let second = burst(2)?;
        Ok((first, second))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry.1, vec![200, 429]);
    Ok(())
}

/// The same over HTTP/2 (h2c, curl): `%PROTOCOL%` is `HTTP/2`, a gRPC local reply is a
/// trailers-only answer, a CORS preflight is answered by the proxy.
#[test]
fn h2_formatters_grpc_local_reply_and_cors() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let mut r = route("/", "backend", json!({}));
        r["request_headers_to_add"] =
            json!([{"header": {"key": "x-proto", "value": "%PROTOCOL%"}}]);
        r["response_headers_to_add"] =
            json!([{"header": {"key": "x-resp-proto", "value": "%PROTOCOL% %REQ(x-in)%"}}]);
        let vhost = json!({"typed_per_filter_config": {"envoy.filters.http.cors": {
            "@type": CORS,
            "allow_origin_string_match": [{"exact": "https://a.example.com"}],
            "allow_methods": "GET",
        }}});
        let unavailable = json!({"match": {"prefix": "/down"},
            "direct_response": {"status": 503, "body": {"inline_string": "down for now"}}});
        let l = http(port, vec![unavailable, r], vec![cors_filter()], vhost);
        render(
            l,
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let curl = |args: &[&str]| -> Result<String> {
        let out = Command::new("curl")
            .args(["-s", "-i", "--http2-prior-knowledge", "--max-time", "10"])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let pick = |text: &str, names: &[&str]| -> Vec<String> {
        let mut out: Vec<String> = text
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                let k = k.trim().to_ascii_lowercase();
                names
                    .contains(&k.as_str())
                    .then(|| format!("{k}={}", v.trim()))
            })
            .collect();
        out.extend(text.lines().next().map(|l| l.trim().to_string()));
        out
    };
    let observed = differential(config, |_, port| {
        let base = format!("http://127.0.0.1:{port}");
        let plain = curl(&["-H", "x-in: v", &format!("{base}/x")])?;
        let proto = plain
            .split("\r\n\r\n")
            .nth(1)
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
            .and_then(|v| {
                v["headers"].as_array().and_then(|hs| {
                    hs.iter()
                        .find(|h| h[0].as_str() == Some("x-proto"))
                        .and_then(|h| h[1].as_str().map(str::to_string))
                })
            });
        let grpc = curl(&[
            "-H",
            "content-type: application/grpc",
            "-X",
            "POST",
            "-d",
            "",
            &format!("{base}/down"),
        ])?;
        let pre = curl(&[
            "-X",
            "OPTIONS",
            "-H",
            "origin: https://a.example.com",
            "-H",
            "access-control-request-method: GET",
            &format!("{base}/x"),
        ])?;
        Ok((
            proto,
            pick(&plain, &["x-resp-proto"]),
            pick(&grpc, &["content-type", "grpc-status", "grpc-message"]),
            pick(
                &pre,
                &[
                    "access-control-allow-origin",
                    "access-control-allow-methods",
                ],
            ),
        ))
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry.0.as_deref(), Some("HTTP/2"));
    assert!(
        ferry.2.contains(&"grpc-status=14".to_string())
            && ferry.2.contains(&"grpc-message=down for now".to_string()),
        "{ferry:?}"
    );
    assert!(
        ferry
            .3
            .contains(&"access-control-allow-methods=GET".to_string()),
        "{ferry:?}"
    );
    Ok(())
}

/// A virtual host's rate limit configuration replaces the filter's for its routes, one
/// bucket shared by all of them; a route's own replaces the virtual host's; a route whose
/// `FilterConfig` disables the filter is never limited.
#[test]
fn local_rate_limit_virtual_host_override() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    let config = |port| {
        let filter = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": LOCAL_RL,
            "stat_prefix": "listener_rl",
            "token_bucket": {"max_tokens": 100, "fill_interval": "3600s"},
            "filter_enabled": all,
            "filter_enforced": all,
        }});
        let mut own = route("/own/", "backend", json!({}));
        own["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL, "stat_prefix": "route_rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "3600s"},
            "filter_enabled": all, "filter_enforced": all}});
        let mut off = route("/off/", "backend", json!({}));
        off["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}});
        let routes = vec![
            own,
            off,
            route("/a/", "backend", json!({})),
            route("/b/", "backend", json!({})),
        ];
        let vhost = json!({"typed_per_filter_config": {"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL, "stat_prefix": "vhost_rl",
            "token_bucket": {"max_tokens": 2, "fill_interval": "3600s"},
            "filter_enabled": all, "filter_enforced": all}}});
        render(
            http(port, routes, vec![filter], vhost),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |p, port| {
        let mut out = Vec::new();
        for path in [
            "/a/1", "/b/1", "/a/2", "/b/2", "/own/1", "/own/2", "/off/1", "/off/2", "/off/3",
        ] {
            out.push(format!("{path} {}", get(port, path)?.status));
        }
        for prefix in ["listener_rl", "vhost_rl", "route_rl"] {
            let name = format!("{prefix}.http_local_rate_limit.rate_limited");
            out.push(format!("{name}={}", p.stat(&name)?));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry[2], "/a/2 429", "{ferry:?}");
    Ok(())
}

/// Header matchers on pseudo-headers (`:method`, `:authority`, `:path`, `:scheme`, which
/// istiod emits for method and authority matches) and on `host` pick the same routes
/// through Ferry and Envoy.
#[test]
fn pseudo_header_matches() -> Result<()> {
    let _lock = RunLock::shared();
    let h = |name: &str, m: Value| json!({"prefix": "/", "headers": [{"name": name, "string_match": m}]});
    let config = |port| {
        let routes = vec![
            direct(h(":method", json!({"exact": "POST"})), "method"),
            direct(h(":authority", json!({"prefix": "api."})), "authority"),
            direct(h("host", json!({"exact": "hosted.test"})), "host"),
            direct(h(":path", json!({"suffix": "?x=1"})), "path"),
            direct(
                json!({"prefix": "/s", "headers": [{"name": ":scheme", "string_match": {"exact": "http"}}]}),
                "scheme",
            ),
            direct(
                json!({"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "GET"}, "invert_match": true}]}),
                "not-get",
            ),
            direct(json!({"prefix": "/"}), "fallback"),
        ];
        render(http(port, routes, vec![], json!({})), vec![])
    };
    let cases: Vec<CorsCase> = vec![
        ("POST", "/a".to_string(), vec![]),
        ("GET", "/a".to_string(), vec![("Host", "api.example")]),
        ("GET", "/a".to_string(), vec![("Host", "hosted.test")]),
        ("GET", "/a?x=1".to_string(), vec![]),
        ("GET", "/s".to_string(), vec![]),
        ("PUT", "/a".to_string(), vec![]),
        ("GET", "/a".to_string(), vec![]),
    ];
    let observed = differential(config, |_, port| {
        let mut out = Vec::new();
        for (method, path, headers) in &cases {
            let r = request(port, method, path, headers, b"")?;
            out.push(format!(
                "{method} {path} {headers:?} -> {} {}",
                r.status, r.body
            ));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    let names: Vec<&str> = ferry.iter().filter_map(|l| l.rsplit(' ').next()).collect();
    assert_eq!(
        names,
        [
            "method",
            "authority",
            "host",
            "path",
            "scheme",
            "not-get",
            "fallback"
        ]
    );
    Ok(())
}

/// Local rate limit descriptors from the route's `rate_limits` actions, shaped like Istio's
/// `local-rate-limit-service.yaml` sample (remote address, and `:path` by
/// `header_value_match`), plus `request_headers`, `generic_key`, a stage that does not count
/// and `always_consume_default_token_bucket: false` — the same statuses and counters through
/// Ferry and Envoy.
#[test]
fn local_rate_limit_descriptors() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    let bucket = |n: u32| json!({"max_tokens": n, "tokens_per_fill": n, "fill_interval": "3600s"});
    let config = |port| {
        let filter = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": LOCAL_RL, "stat_prefix": "http_local_rate_limiter"}});
        let mut page = route(
            "/app/",
            "backend",
            json!({"rate_limits": [
                {"actions": [{"remote_address": {}}]},
                {"actions": [{"header_value_match": {"descriptor_value": "productpage", "expect_match": true,
                    "headers": [{"name": ":path", "string_match": {"prefix": "/app/productpage", "ignore_case": true}}]}}]},
            ]}),
        );
        page["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL, "stat_prefix": "page",
            "token_bucket": bucket(5),
            "filter_enabled": all, "filter_enforced": all,
            "response_headers_to_add": [{"append": false, "header": {"key": "x-local-rate-limit", "value": "true"}}],
            "descriptors": [{"entries": [{"key": "header_match", "value": "productpage"}], "token_bucket": bucket(2)}],
        }});
        let mut users = route(
            "/users/",
            "backend",
            json!({"rate_limits": [
                {"actions": [{"generic_key": {"descriptor_value": "users"}}, {"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]},
                {"stage": 1, "actions": [{"generic_key": {"descriptor_value": "other-stage"}}]},
            ]}),
        );
        users["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RL, "stat_prefix": "users",
            "token_bucket": bucket(3),
            "always_consume_default_token_bucket": false,
            "filter_enabled": all, "filter_enforced": all,
            "descriptors": [
                {"entries": [{"key": "generic_key", "value": "users"}, {"key": "user", "value": "alice"}], "token_bucket": bucket(1)},
                {"entries": [{"key": "generic_key", "value": "other-stage"}], "token_bucket": bucket(1)},
            ],
        }});
        render(
            http(port, vec![page, users], vec![filter], json!({})),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |p, port| {
        let mut out = Vec::new();
        let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
            ("/app/productpage", vec![]),
            ("/app/ProductPage?x=1", vec![]),
            ("/app/productpage", vec![]),
            ("/app/other", vec![]),
            ("/app/other", vec![]),
            ("/app/other", vec![]),
            ("/app/other", vec![]),
            ("/users/1", vec![("x-user", "alice")]),
            ("/users/2", vec![("x-user", "alice")]),
            ("/users/3", vec![("x-user", "bob")]),
            ("/users/4", vec![]),
            ("/users/5", vec![]),
            ("/users/6", vec![]),
            ("/users/7", vec![("x-user", "bob")]),
        ];
        for (path, headers) in &cases {
            let r = request(port, "GET", path, headers, b"")?;
            out.push(format!(
                "{path} {headers:?} -> {} {:?}",
                r.status,
                r.header("x-local-rate-limit")
            ));
        }
        for prefix in ["page", "users"] {
            for c in ["enabled", "ok", "rate_limited", "enforced"] {
                let name = format!("{prefix}.http_local_rate_limit.{c}");
                out.push(format!("{name}={}", p.stat(&name)?));
            }
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert!(ferry[2].contains("-> 429"), "{ferry:?}");
    Ok(())
}

/// `enable_x_ratelimit_headers: DRAFT_VERSION_03` (as Istio's sample sets it): every answer
/// to a counted request, the backend's and the 429 alike, carries `x-ratelimit-limit` (the
/// deciding bucket's size), `-remaining` and `-reset` (seconds until a token is back), and
/// so does a CORS preflight answered by a filter after it.
#[test]
fn local_rate_limit_x_ratelimit_headers() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    let config = |port| {
        let filter = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": LOCAL_RL, "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 4, "tokens_per_fill": 4, "fill_interval": "3600s"},
            "filter_enabled": all, "filter_enforced": all,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "descriptors": [{"entries": [{"key": "generic_key", "value": "k"}],
                "token_bucket": {"max_tokens": 2, "tokens_per_fill": 1, "fill_interval": "3600s"}}],
        }});
        let keyed = route(
            "/k/",
            "backend",
            json!({"rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "k"}}]}]}),
        );
        // The CORS filter after the rate limit filter: its preflight answers go back
        // through the rate limit filter, which adds its headers.
        let vhost = json!({"typed_per_filter_config": {"envoy.filters.http.cors": {
            "@type": CORS, "allow_origin_string_match": [{"exact": "https://a.example.com"}],
            "allow_methods": "GET"}}});
        render(
            http(
                port,
                vec![keyed, route("/n/", "backend", json!({}))],
                vec![filter, cors_filter()],
                vhost,
            ),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |_, port| {
        let mut out = Vec::new();
        for path in [
            "/k/1", "/k/2", "/k/3", "/n/pre", "/n/1", "/n/2", "/n/3", "/n/4",
        ] {
            let r = if path.ends_with("pre") {
                let pre = [
                    ("Origin", "https://a.example.com"),
                    ("Access-Control-Request-Method", "GET"),
                ];
                request(port, "OPTIONS", path, &pre, b"")?
            } else {
                get(port, path)?
            };
            out.push(format!(
                "{path} {} limit={:?} remaining={:?} reset={:?}",
                r.status,
                r.header("x-ratelimit-limit"),
                r.header("x-ratelimit-remaining"),
                r.header("x-ratelimit-reset"),
            ));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert!(ferry[2].starts_with("/k/3 429"), "{ferry:?}");
    assert!(
        ferry[3].starts_with("/n/pre 200 limit=Some(\"4\")"),
        "{ferry:?}"
    );
    assert!(ferry[7].starts_with("/n/4 429"), "{ferry:?}");
    assert_eq!(
        ferry[1],
        "/k/2 200 limit=Some(\"2\") remaining=Some(\"0\") reset=Some(\"3600\")"
    );
    Ok(())
}

/// `local_rate_limit_per_downstream_connection`: each connection has a bucket of its own.
#[test]
fn local_rate_limit_per_connection() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    let config = |port| {
        let filter = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": LOCAL_RL, "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "3600s"},
            "filter_enabled": all, "filter_enforced": all,
            "local_rate_limit_per_downstream_connection": true,
        }});
        render(
            http(
                port,
                vec![route("/", "backend", json!({}))],
                vec![filter],
                json!({}),
            ),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |_, port| {
        let mut a = connect(port)?;
        let mut b = connect(port)?;
        let mut out = Vec::new();
        // A shared bucket would refuse b from its first request on.
        for (name, s) in [("a", &mut a), ("b", &mut b)] {
            for _ in 0..3 {
                out.push(format!(
                    "{name} {}",
                    exchange(s, "GET", "/x", &[], b"")?.status
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
        ["a 200", "a 200", "a 429", "b 200", "b 200", "b 429"]
    );
    Ok(())
}

/// The fault filter's header matchers read pseudo-headers too: an abort only for POSTs.
#[test]
fn fault_header_matchers_on_pseudo_headers() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |port| {
        let filter = fault_filter(json!({
            "abort": {"http_status": 418, "percentage": percent(100)},
            "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
        }));
        render(
            http(
                port,
                vec![route("/", "backend", json!({}))],
                vec![filter],
                json!({}),
            ),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |_, port| {
        Ok([
            request(port, "GET", "/x", &[], b"")?.status,
            request(port, "POST", "/x", &[], b"")?.status,
        ])
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry, [200, 418]);
    Ok(())
}

/// More rate limit actions: `masked_remote_address` and `request_headers` with
/// `skip_if_absent`, each feeding a descriptor bucket of one token — the same answers
/// through Ferry and Envoy. (The `query_parameters` and `query_parameter_value_match`
/// actions are newer than the bootstraps' descriptor set; they are converted from xDS and
/// unit-tested.)
#[test]
fn local_rate_limit_masked_address_and_optional_header_actions() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let all = json!({"default_value": {"numerator": 100}, "runtime_key": "rl"});
    let one = json!({"max_tokens": 1, "fill_interval": "3600s"});
    let config = |port| {
        let filter = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": LOCAL_RL, "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 100, "fill_interval": "3600s"},
            "filter_enabled": all, "filter_enforced": all,
            "descriptors": [
                {"entries": [{"key": "masked_remote_address", "value": "127.0.0.0/8"}], "token_bucket": one},
                {"entries": [{"key": "generic_key", "value": "g"}, {"key": "opt", "value": "x"}], "token_bucket": one},
            ],
        }});
        let routes = vec![
            route(
                "/masked/",
                "backend",
                json!({"rate_limits": [
                {"actions": [{"masked_remote_address": {"v4_prefix_mask_len": 8}}]}]}),
            ),
            route(
                "/skip/",
                "backend",
                json!({"rate_limits": [
                {"actions": [{"generic_key": {"descriptor_value": "g"}},
                             {"request_headers": {"header_name": "x-opt", "descriptor_key": "opt", "skip_if_absent": true}}]}]}),
            ),
        ];
        render(
            http(port, routes, vec![filter], json!({})),
            vec![static_cluster("backend", &[app.port], Upstream::Http1)],
        )
    };
    let observed = differential(config, |_, port| {
        let mut out = Vec::new();
        for (path, opt) in [
            ("/masked/1", None),
            ("/masked/2", None),
            ("/skip/1", None),
            ("/skip/2", Some("x")),
            ("/skip/3", Some("x")),
            ("/skip/4", None),
        ] {
            let headers: Vec<(&str, &str)> = opt.map(|o| ("x-opt", o)).into_iter().collect();
            let status = request(port, "GET", path, &headers, b"")?.status;
            out.push(format!("{path} {opt:?} {status}"));
        }
        Ok(out)
    })?;
    let Some((ferry, envoy)) = observed else {
        return Ok(());
    };
    assert_eq!(ferry, envoy);
    assert_eq!(ferry[1], "/masked/2 None 429", "{ferry:?}");
    Ok(())
}
