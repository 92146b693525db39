//! The cluster manager against Envoy 1.40: every scenario runs one static
//! bootstrap through Ferry and through Envoy in front of the same three echo
//! backends (`a`, `b`, `c`) and asserts the same observable result: which
//! backend answered, how requests spread, which endpoint was ejected, what
//! overflowed. Envoy comes from `ferry_tests::envoy`; without it the
//! Envoy half is skipped, unless `CI=true`, where that is a failure.
//!
//! Needs the `ferry` binary (`cargo build -p ferry-proxy`) and Python 3.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, free_port, http_connection_manager, listener, local,
};
use serde_json::{Value, json};

// ------------------------------------------------------------------------------ the two proxies

/// The proxy under test: the same observations through either.
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

    fn stat(&self, name: &str) -> u64 {
        match self {
            Proxy::Ferry(f) => f.stat(name),
            Proxy::Envoy(e) => e.stat(name).unwrap_or(0),
        }
    }
}

/// Runs `check` once through Ferry and once through Envoy (when present),
/// each on a fresh listener port with the same configuration.
fn both(build: impl Fn(u16) -> Value, check: impl Fn(&Proxy, u16) -> Result<()>) -> Result<()> {
    let port = free_port();
    let cfg = build(port);
    let ferry = Ferry::start(&serde_json::to_string_pretty(&cfg)?)?;
    let p = Proxy::Ferry(ferry);
    check(&p, port).with_context(|| "through ferry")?;
    drop(p);
    if let Some(bin) = envoy::bin()? {
        let port = free_port();
        let e = Envoy::start(&bin, &build(port), port)?;
        let p = Proxy::Envoy(e);
        check(&p, port).with_context(|| "through envoy")?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------ configuration

fn backends() -> Result<Vec<App>> {
    ["a", "b", "c"].iter().map(|n| App::http(n, &[])).collect()
}

fn cluster(ports: &[u16], extra: Value) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    let mut c = json!({
        "name": "svc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "svc", "endpoints": [{"lb_endpoints": endpoints}]},
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn config(port: u16, cluster: Value, route: Value) -> Value {
    let mut r = json!({"cluster": "svc", "timeout": "0s"});
    if let (Some(r), Some(extra)) = (r.as_object_mut(), route.as_object()) {
        for (k, v) in extra {
            r.insert(k.clone(), v.clone());
        }
    }
    let routes = vec![json!({"match": {"prefix": "/"}, "route": r})];
    let doc = Bootstrap::new()
        .listener(listener(
            "in",
            port,
            vec![json!({"filters": [http_connection_manager("in", routes)]})],
        ))
        .cluster(cluster)
        .render();
    serde_json::from_str(&doc).unwrap_or(Value::Null)
}

// ------------------------------------------------------------------------------ client

/// One request on its own connection: status and body.
fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    get_head(port, path, headers).map(|(status, _, body)| (status, body))
}

/// One request on its own connection: status, response head and body.
fn get_head(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&local(port), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no response head: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head:?}"))?;
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// Whether a response head carries Envoy's `x-envoy-overloaded: true`.
fn overloaded(head: &str) -> bool {
    head.lines().any(|l| l.trim() == "x-envoy-overloaded: true")
}

/// Which backend answered (the echo's `name`), or `status:NNN`.
fn who(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<String> {
    let (status, body) = get(port, path, headers)?;
    if status != 200 {
        return Ok(format!("status:{status}"));
    }
    let v: Value = serde_json::from_str(&body).with_context(|| format!("echo body {body:?}"))?;
    Ok(v["name"].as_str().unwrap_or("?").to_string())
}

fn spread(port: u16, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        *m.entry(who(port, "/", &[])?).or_default() += 1;
    }
    Ok(m)
}

/// A backend that answers every request with 503 (keep-alive) and counts them.
struct Failing {
    port: u16,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Failing {
    fn start() -> Result<Failing> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        l.set_nonblocking(true)?;
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (hits.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let h = h.clone();
                        thread::spawn(move || serve_503(s, &h));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Failing { port, hits, stop })
    }
}

fn serve_503(s: TcpStream, hits: &AtomicUsize) {
    let _ = s.set_nonblocking(false);
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        // Request line and headers up to the blank line; requests carry no body.
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        hits.fetch_add(1, Ordering::Relaxed);
        let body = "{\"name\":\"bad\"}";
        let resp = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for Failing {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------------------ scenarios

#[test]
fn round_robin_spreads_evenly() -> Result<()> {
    let apps = backends()?;
    let ports: Vec<u16> = apps.iter().map(|a| a.port).collect();
    both(
        |port| {
            config(
                port,
                cluster(&ports, json!({"lb_policy": "ROUND_ROBIN"})),
                json!({}),
            )
        },
        |p, port| {
            let m = spread(port, 300)?;
            for n in ["a", "b", "c"] {
                let c = m.get(n).copied().unwrap_or(0);
                if !(90..=110).contains(&c) {
                    bail!("{}: {n} got {c} of 300: {m:?}", p.name());
                }
            }
            Ok(())
        },
    )
}

#[test]
fn ring_hash_sticks_by_header() -> Result<()> {
    let apps = backends()?;
    let ports: Vec<u16> = apps.iter().map(|a| a.port).collect();
    both(
        |port| {
            config(
                port,
                cluster(&ports, json!({"lb_policy": "RING_HASH"})),
                json!({"hash_policy": [{"header": {"header_name": "x-user"}}]}),
            )
        },
        |p, port| {
            let mut owners = BTreeMap::new();
            for k in 0..30 {
                let user = format!("user-{k}");
                let first = who(port, "/", &[("x-user", &user)])?;
                for _ in 0..4 {
                    let again = who(port, "/", &[("x-user", &user)])?;
                    if again != first {
                        bail!("{}: {user} went to {first} then {again}", p.name());
                    }
                }
                *owners.entry(first).or_insert(0) += 1;
            }
            if owners.len() < 3 {
                bail!("{}: 30 keys on fewer than 3 backends: {owners:?}", p.name());
            }
            Ok(())
        },
    )
}

/// A retry of a hashed request: without the previous-hosts predicate it
/// goes back to the same host (the hash has not changed); with it, to
/// another host (walking on along the ring).
#[test]
fn ring_hash_retries_stay_or_move_as_the_predicate_says() -> Result<()> {
    let apps = backends()?;
    let ports: Vec<u16> = apps.iter().map(|a| a.port).collect();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    for previous_hosts in [false, true] {
        let mut retry = json!({"retry_on": "5xx", "num_retries": 1});
        if previous_hosts {
            retry["retry_host_predicate"] = json!([{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }]);
            // Each attempt steps one entry along the ring, which may still
            // be the same host (Envoy's ring says so too): with 3 hosts, 5
            // attempts stay put for about 1 request in 250, 40 for none.
            retry["host_selection_retry_max_attempts"] = json!(40);
        }
        both(
            |port| {
                config(
                    port,
                    cluster(&ports, json!({"lb_policy": "RING_HASH"})),
                    json!({
                        "hash_policy": [{"header": {"header_name": "x-user"}}],
                        "retry_policy": retry,
                    }),
                )
            },
            |p, port| {
                for k in 0..10 {
                    // A fresh path per request and proxy: each backend
                    // fails its first request for it, so a retry on the
                    // same host succeeds and one on another host fails.
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let path = format!("/flaky/1/503/{n}");
                    let user = format!("user-{k}");
                    let answer = who(port, &path, &[("x-user", &user)])?;
                    let mut hits = Vec::new();
                    for app in &apps {
                        let (_, body) = get(app.port, &format!("/hits{path}"), &[])?;
                        let v: Value = serde_json::from_str(&body)?;
                        hits.push(v["hits"].as_u64().unwrap_or(0));
                    }
                    let mut spread = hits.clone();
                    spread.sort_unstable();
                    let want: &[u64] = if previous_hosts {
                        &[0, 1, 1]
                    } else {
                        &[0, 0, 2]
                    };
                    if answer.starts_with("status:") != previous_hosts || spread != want {
                        bail!(
                            "{} (previous_hosts {previous_hosts}): {user} answered {answer}, hits per backend {hits:?}",
                            p.name()
                        );
                    }
                }
                Ok(())
            },
        )?;
    }
    Ok(())
}

#[test]
fn maglev_sticks_by_query_parameter() -> Result<()> {
    let apps = backends()?;
    let ports: Vec<u16> = apps.iter().map(|a| a.port).collect();
    both(
        |port| {
            config(
                port,
                cluster(&ports, json!({"lb_policy": "MAGLEV"})),
                json!({"hash_policy": [{"query_parameter": {"name": "user"}}]}),
            )
        },
        |p, port| {
            let mut owners = BTreeMap::new();
            for k in 0..30 {
                let user = format!("user-{k}");
                let path = format!("/?user={user}&n=1");
                let first = who(port, &path, &[])?;
                for _ in 0..2 {
                    if who(port, &path, &[])? != first {
                        bail!("{}: {user} moved", p.name());
                    }
                }
                *owners.entry(first).or_insert(0) += 1;
            }
            if owners.len() < 3 {
                bail!("{}: {owners:?}", p.name());
            }
            Ok(())
        },
    )
}

/// Cookie hash policy with a TTL: a request without the cookie gets one
/// (`set-cookie`), and sending it back sticks to one backend.
#[test]
fn cookie_hash_policy_sets_and_sticks() -> Result<()> {
    let apps = backends()?;
    let ports: Vec<u16> = apps.iter().map(|a| a.port).collect();
    both(
        |port| {
            config(
                port,
                cluster(&ports, json!({"lb_policy": "RING_HASH"})),
                json!({"hash_policy": [
                    {"cookie": {"name": "sticky", "ttl": "60s", "path": "/"}},
                ]}),
            )
        },
        |p, port| {
            let head = raw_head(port, "/", &[])?;
            let cookie = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("set-cookie")
                        .then(|| v.trim().to_string())
                })
                .ok_or_else(|| anyhow!("{}: no set-cookie in {head:?}", p.name()))?;
            if !cookie.starts_with("sticky=") || !cookie.contains("Max-Age=60") {
                bail!("{}: set-cookie {cookie:?}", p.name());
            }
            let pair = cookie.split(';').next().unwrap_or_default().to_string();
            let first = who(port, "/", &[("cookie", &pair)])?;
            for _ in 0..10 {
                if who(port, "/", &[("cookie", &pair)])? != first {
                    bail!("{}: the cookie did not stick", p.name());
                }
            }
            Ok(())
        },
    )
}

/// The head of a response (status line and headers).
fn raw_head(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&local(port), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    Ok(text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string())
}

fn socket(port: u16) -> Value {
    json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}})
}

/// Priority spill-over: with one of two P0 endpoints UNHEALTHY, P0 keeps
/// 0.5 × 1.4 = 70 % of the traffic and P1 takes the rest.
#[test]
fn priority_failover_follows_the_healthy_share() -> Result<()> {
    let apps = backends()?;
    let (a, b, c) = (apps[0].port, apps[1].port, apps[2].port);
    both(
        |port| {
            let mut cl = cluster(&[], json!({}));
            cl["load_assignment"]["endpoints"] = json!([
                {"priority": 0, "lb_endpoints": [
                    {"endpoint": socket(a)},
                    {"endpoint": socket(c), "health_status": "UNHEALTHY"},
                ]},
                {"priority": 1, "lb_endpoints": [{"endpoint": socket(b)}]},
            ]);
            config(port, cl, json!({}))
        },
        |p, port| {
            let m = spread(port, 400)?;
            let (na, nb) = (
                m.get("a").copied().unwrap_or(0),
                m.get("b").copied().unwrap_or(0),
            );
            if m.contains_key("c") || !(240..=320).contains(&na) || na + nb != 400 {
                bail!("{}: expected a ≈ 280, b ≈ 120, c none: {m:?}", p.name());
            }
            Ok(())
        },
    )
}

/// Locality-weighted balancing: localities of weight 1 and 3.
#[test]
fn locality_weights_split_traffic() -> Result<()> {
    let apps = backends()?;
    let (a, b) = (apps[0].port, apps[1].port);
    both(
        |port| {
            let mut cl = cluster(
                &[],
                json!({"common_lb_config": {"locality_weighted_lb_config": {}}}),
            );
            cl["load_assignment"]["endpoints"] = json!([
                {"locality": {"zone": "z1"}, "load_balancing_weight": 1,
                 "lb_endpoints": [{"endpoint": socket(a)}]},
                {"locality": {"zone": "z2"}, "load_balancing_weight": 3,
                 "lb_endpoints": [{"endpoint": socket(b)}]},
            ]);
            config(port, cl, json!({}))
        },
        |p, port| {
            let m = spread(port, 400)?;
            let nb = m.get("b").copied().unwrap_or(0);
            if !(260..=340).contains(&nb) {
                bail!("{}: expected b ≈ 300 of 400: {m:?}", p.name());
            }
            Ok(())
        },
    )
}

#[test]
fn least_request_spreads() -> Result<()> {
    let apps = backends()?;
    let ports: Vec<u16> = apps.iter().map(|a| a.port).collect();
    both(
        |port| {
            config(
                port,
                cluster(&ports, json!({"lb_policy": "LEAST_REQUEST"})),
                json!({}),
            )
        },
        |p, port| {
            // Sequential requests leave every host idle: P2C is then uniform.
            let m = spread(port, 300)?;
            for n in ["a", "b", "c"] {
                let c = m.get(n).copied().unwrap_or(0);
                if !(60..=140).contains(&c) {
                    bail!("{}: {n} got {c} of 300: {m:?}", p.name());
                }
            }
            Ok(())
        },
    )
}

#[test]
fn outlier_detection_ejects_a_failing_backend() -> Result<()> {
    let apps: Vec<App> = ["a", "b"]
        .iter()
        .map(|n| App::http(n, &[]))
        .collect::<Result<_>>()?;
    let outlier = json!({
        "lb_policy": "ROUND_ROBIN",
        "outlier_detection": {
            "consecutive_5xx": 3,
            "interval": "1s",
            "base_ejection_time": "4s",
            "max_ejection_percent": 100,
        },
    });
    let check = |p: &Proxy, port: u16, bad: &Failing| -> Result<()> {
        let mut m = BTreeMap::new();
        for _ in 0..30 {
            *m.entry(who(port, "/", &[])?).or_insert(0) += 1;
        }
        let hits = bad.hits.load(Ordering::Relaxed);
        // Ejected on the third consecutive 5xx (Envoy ejects on its main
        // thread, so one more request may slip through).
        if !(3..=4).contains(&hits) {
            bail!("{}: failing backend saw {hits} requests: {m:?}", p.name());
        }
        thread::sleep(Duration::from_millis(300));
        let m2 = spread(port, 60)?;
        if bad.hits.load(Ordering::Relaxed) != hits || m2.contains_key("status:503") {
            bail!("{}: ejected backend still got traffic: {m2:?}", p.name());
        }
        if p.stat("cluster.svc.outlier_detection.ejections_enforced_total") != 1 {
            bail!("{}: ejections_enforced_total is not 1", p.name());
        }
        // After the base ejection time (and the next interval tick) the
        // endpoint is back in rotation.
        thread::sleep(Duration::from_secs(5));
        let back = spread(port, 30)?;
        if bad.hits.load(Ordering::Relaxed) == hits {
            bail!(
                "{}: the ejected backend never came back: {back:?}",
                p.name()
            );
        }
        Ok(())
    };
    // A fresh failing backend per proxy, so that its count starts at zero.
    let bad = Failing::start()?;
    let ports = [apps[0].port, apps[1].port, bad.port];
    let port = free_port();
    let f = Proxy::Ferry(Ferry::start(&serde_json::to_string(&config(
        port,
        cluster(&ports, outlier.clone()),
        json!({}),
    ))?)?);
    check(&f, port, &bad).context("through ferry")?;
    drop(f);
    if let Some(bin) = envoy::bin()? {
        let bad = Failing::start()?;
        let ports = [apps[0].port, apps[1].port, bad.port];
        let port = free_port();
        let e = Proxy::Envoy(Envoy::start(
            &bin,
            &config(port, cluster(&ports, outlier), json!({})),
            port,
        )?);
        check(&e, port, &bad).context("through envoy")?;
    }
    Ok(())
}

#[test]
fn circuit_breaker_overflow_is_503_uo() -> Result<()> {
    let apps = backends()?;
    let ports: Vec<u16> = apps.iter().map(|a| a.port).collect();
    both(
        |port| {
            config(
                port,
                cluster(
                    &ports,
                    json!({"circuit_breakers": {"thresholds": [{"max_requests": 1}]}}),
                ),
                json!({}),
            )
        },
        |p, port| {
            let handles: Vec<_> = (0..5)
                .map(|k| {
                    thread::spawn(move || {
                        thread::sleep(Duration::from_millis(if k == 0 { 0 } else { 150 }));
                        get_head(port, "/sleep/800", &[])
                    })
                })
                .collect();
            let mut codes = BTreeMap::new();
            let mut bodies = Vec::new();
            for h in handles {
                let (status, head, body) = h.join().map_err(|_| anyhow!("client panicked"))??;
                *codes.entry(status).or_insert(0) += 1;
                // Envoy marks the refused requests, and only those.
                if overloaded(&head) != (status == 503) {
                    bail!("{}: x-envoy-overloaded on a {status}: {head}", p.name());
                }
                if status == 503 {
                    bodies.push(body);
                }
            }
            if codes.get(&200) != Some(&1) || codes.get(&503) != Some(&4) {
                bail!("{}: expected one 200 and four 503: {codes:?}", p.name());
            }
            if !bodies.iter().all(|b| b.contains("overflow")) {
                bail!("{}: overflow bodies: {bodies:?}", p.name());
            }
            let overflow = p.stat("cluster.svc.upstream_rq_active_overflow");
            if overflow != 4 {
                bail!("{}: upstream_rq_active_overflow = {overflow}", p.name());
            }
            Ok(())
        },
    )
}

/// Istio's circuit-breaking task: one connection, one pending request, one
/// request per connection; five concurrent slow requests give two answers
/// and three overflows.
#[test]
fn circuit_breaker_pending_overflow() -> Result<()> {
    let app = App::http("a", &[])?;
    let ports = [app.port];
    both(
        |port| {
            let mut c = cluster(
                &ports,
                json!({"circuit_breakers": {"thresholds": [
                    {"max_connections": 1, "max_pending_requests": 1}
                ]}}),
            );
            c["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "common_http_protocol_options": {"max_requests_per_connection": 1},
                    "explicit_http_config": {"http_protocol_options": {}},
                }
            });
            config(port, c, json!({}))
        },
        |p, port| {
            let handles: Vec<_> = (0..5)
                .map(|k| {
                    thread::spawn(move || {
                        thread::sleep(Duration::from_millis(if k == 0 { 0 } else { 150 }));
                        get_head(port, "/sleep/600", &[])
                    })
                })
                .collect();
            let mut codes = BTreeMap::new();
            for h in handles {
                let (status, head, _) = h.join().map_err(|_| anyhow!("client panicked"))??;
                *codes.entry(status).or_insert(0) += 1;
                if overloaded(&head) != (status == 503) {
                    bail!("{}: x-envoy-overloaded on a {status}: {head}", p.name());
                }
            }
            if codes.get(&200) != Some(&2) || codes.get(&503) != Some(&3) {
                bail!("{}: expected two 200 and three 503: {codes:?}", p.name());
            }
            let overflow = p.stat("cluster.svc.upstream_rq_pending_overflow");
            if overflow != 3 {
                bail!("{}: upstream_rq_pending_overflow = {overflow}", p.name());
            }
            if p.stat("cluster.svc.upstream_cx_overflow") == 0 {
                bail!("{}: upstream_cx_overflow not counted", p.name());
            }
            Ok(())
        },
    )
}

/// One of three endpoints is killed under load: with connect-failure/reset
/// retries and outlier detection, idempotent requests never fail.
#[test]
fn killing_an_endpoint_under_load() -> Result<()> {
    let build = |port: u16, ports: &[u16]| {
        config(
            port,
            cluster(
                ports,
                json!({"outlier_detection": {
                    "consecutive_5xx": 1,
                    "interval": "1s",
                    "base_ejection_time": "30s",
                    "max_ejection_percent": 100,
                }}),
            ),
            json!({"retry_policy": {"retry_on": "connect-failure,reset", "num_retries": 3}}),
        )
    };
    let run = |p: &Proxy, port: u16, victim: App| -> Result<usize> {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let total = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (stop, failures, total) = (stop.clone(), failures.clone(), total.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port, "/", &[]) {
                            Ok((200, _)) => {}
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(500));
        drop(victim);
        thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            let _ = c.join();
        }
        let f = failures.load(Ordering::Relaxed);
        eprintln!(
            "{}: {f} failures of {}",
            p.name(),
            total.load(Ordering::Relaxed)
        );
        Ok(f)
    };
    let apps = backends()?;
    let victim = App::http("victim", &[])?;
    let ports = [apps[0].port, apps[1].port, victim.port];
    let port = free_port();
    let f = Proxy::Ferry(Ferry::start(&serde_json::to_string(&build(port, &ports))?)?);
    let ferry_failures = run(&f, port, victim)?;
    drop(f);
    if let Some(bin) = envoy::bin()? {
        let victim = App::http("victim", &[])?;
        let ports = [apps[0].port, apps[1].port, victim.port];
        let port = free_port();
        let e = Proxy::Envoy(Envoy::start(&bin, &build(port, &ports), port)?);
        let envoy_failures = run(&e, port, victim)?;
        if envoy_failures != 0 {
            bail!("envoy: {envoy_failures} client-visible failures");
        }
    }
    if ferry_failures != 0 {
        bail!("ferry: {ferry_failures} client-visible failures");
    }
    Ok(())
}

/// A keep-alive backend answering 200 that notes, for each connection the
/// proxy closed, how long it stayed open after its last response.
struct IdleWatch {
    port: u16,
    open_after_last: Arc<std::sync::Mutex<Vec<Duration>>>,
    stop: Arc<AtomicBool>,
}

impl IdleWatch {
    fn start() -> Result<IdleWatch> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        l.set_nonblocking(true)?;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sn, st) = (seen.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let sn = sn.clone();
                        thread::spawn(move || {
                            if let Some(open) = serve_until_closed(s) {
                                sn.lock().unwrap_or_else(|p| p.into_inner()).push(open);
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(IdleWatch {
            port,
            open_after_last: seen,
            stop,
        })
    }

    fn closed(&self) -> Vec<Duration> {
        self.open_after_last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for IdleWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers bodiless requests with 200 until the client closes; how long
/// the connection stayed open after the last answer (`None`: never answered).
fn serve_until_closed(s: TcpStream) -> Option<Duration> {
    let _ = s.set_nonblocking(false);
    let mut w = s.try_clone().ok()?;
    let mut r = BufReader::new(s);
    let mut last = None;
    loop {
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return last.map(|t: std::time::Instant| t.elapsed()),
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .is_err()
        {
            return None;
        }
        last = Some(std::time::Instant::now());
    }
}

/// `common_http_protocol_options.idle_timeout` on a cluster: a pooled
/// upstream connection with no request for that long is closed by the
/// proxy (Ferry parks it after a second, then closes it on time).
#[test]
fn pooled_connections_close_after_the_cluster_idle_timeout() -> Result<()> {
    let backend = IdleWatch::start()?;
    let options = json!({"typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "2s"},
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }});
    let build = |port| config(port, cluster(&[backend.port], options.clone()), json!({}));
    both(build, |p, port| {
        let before = backend.closed().len();
        let (status, body) = get(port, "/", &[])?;
        if status != 200 || body != "ok" {
            bail!("{}: {status} {body:?}", p.name());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while backend.closed().len() == before {
            if std::time::Instant::now() > deadline {
                bail!(
                    "{}: the idle upstream connection was never closed",
                    p.name()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        let open = backend.closed()[before];
        if open.abs_diff(Duration::from_secs(2)) > Duration::from_millis(400) {
            bail!(
                "{}: the idle upstream connection closed {open:?} after its response, not 2 s",
                p.name()
            );
        }
        let idle_timeouts = p.stat("cluster.svc.upstream_cx_idle_timeout");
        if idle_timeouts != 1 {
            bail!("{}: upstream_cx_idle_timeout {idle_timeouts}", p.name());
        }
        Ok(())
    })
}
