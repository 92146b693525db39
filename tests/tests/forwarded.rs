//! `x-forwarded-for` and trust, proven equal to Envoy 1.40's: one bootstrap holds several
//! HTTP listeners that differ only in the connection manager's trust settings
//! (`use_remote_address`, `xff_num_trusted_hops`, `skip_xff_append`,
//! `internal_address_config`, the custom-header original-IP detection extension), each with
//! an RBAC filter that denies the `remote_ip` 6.6.6.6 and the `direct_remote_ip`
//! 127.0.0.9. A table of (listener, peer address, `x-forwarded-for`) rows runs through
//! Ferry and through Envoy from clients bound to different loopback addresses; both must
//! give the same status (the RBAC verdict) and the same `x-forwarded-for`,
//! `x-envoy-external-address`, `x-envoy-internal` and surviving `x-envoy-*` headers at the
//! backend. Then a client's `x-envoy-max-retries`/`x-envoy-retry-on` and
//! `x-envoy-upstream-rq-timeout-ms` are ignored from an external client and honoured from
//! an internal one, by both.
//!
//! Envoy comes from `ferry_tests::envoy`; without it a test is skipped with a note, except
//! under `CI=true`, where a missing Envoy fails the test.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, free_port, http_connection_manager, http_request,
    listener, local, static_cluster,
};
use serde_json::{Value, json};

/// The listeners' trust settings, by name.
fn variants() -> Vec<(&'static str, Value, Vec<Value>)> {
    let cidr = |a: &str, l: u32| json!({"address_prefix": a, "prefix_len": l});
    vec![
        ("default", json!({}), vec![]),
        ("remote", json!({"use_remote_address": true}), vec![]),
        (
            "hops",
            json!({"use_remote_address": true, "xff_num_trusted_hops": 1,
                   "internal_address_config": {"cidr_ranges": [cidr("127.0.0.0", 8)]}}),
            vec![],
        ),
        ("private", json!({"internal_address_config": {}}), vec![]),
        (
            "skip",
            json!({"use_remote_address": true, "skip_xff_append": true,
                   "internal_address_config": {"cidr_ranges": [cidr("10.0.0.0", 8)]}}),
            vec![],
        ),
        (
            "header",
            json!({"internal_address_config": {}}),
            vec![json!({
                "name": "envoy.http.original_ip_detection.custom_header",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.original_ip_detection.custom_header.v3.CustomHeaderConfig",
                    "header_name": "x-real-ip",
                    "allow_extension_to_set_address_as_trusted": true,
                    "reject_with_status": {"code": 421},
                },
            })],
        ),
    ]
}

fn rbac() -> Value {
    let ip = |a: &str| json!({"address_prefix": a, "prefix_len": 32});
    json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {
                "xff": {"permissions": [{"any": true}], "principals": [{"remote_ip": ip("6.6.6.6")}]},
                "peer": {"permissions": [{"any": true}], "principals": [{"direct_remote_ip": ip("127.0.0.9")}]},
            }},
        },
    })
}

/// One listener per variant, ports in `ports` (same order), all to the echo backend.
fn config(ports: &[u16], backend: u16) -> Value {
    let mut b = Bootstrap::new();
    for ((name, settings, detection), port) in variants().into_iter().zip(ports) {
        let route =
            json!({"match": {"prefix": "/"}, "route": {"cluster": "backend", "timeout": "5s"}});
        let mut hcm = http_connection_manager(name, vec![route]);
        let tc = &mut hcm["typed_config"];
        if let (Some(t), Some(s)) = (tc.as_object_mut(), settings.as_object()) {
            t.extend(s.clone());
        }
        if !detection.is_empty() {
            tc["original_ip_detection_extensions"] = json!(detection);
        }
        if let Some(filters) = tc["http_filters"].as_array_mut() {
            filters.insert(0, rbac());
        }
        b = b.listener(listener(name, *port, vec![json!({"filters": [hcm]})]));
    }
    let doc = b
        .cluster(static_cluster("backend", &[backend], Upstream::Http1))
        .render();
    serde_json::from_str(&doc).unwrap_or(Value::Null)
}

/// One GET from `from` (a loopback address) to `port`: status and the echo's JSON.
fn get(from: &str, port: u16, path: &str, headers: &[(&str, &str)]) -> Result<(u16, Value)> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let src: IpAddr = from.parse()?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect(&local(port).into())?;
    let mut s: TcpStream = sock.into();
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
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no response head: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head:?}"))?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// A request header as the backend saw it ("-" when absent).
fn seen(echo: &Value, name: &str) -> String {
    echo["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|kv| {
            let k = kv.get(0)?.as_str()?;
            k.eq_ignore_ascii_case(name)
                .then(|| kv.get(1)?.as_str().map(str::to_string))?
        })
        .unwrap_or_else(|| "-".into())
}

/// (listener, client address, x-forwarded-for, x-real-ip)
const TABLE: &[(&str, &str, Option<&str>, Option<&str>)] = &[
    ("default", "127.0.0.1", None, None),
    ("default", "127.0.0.2", Some("1.1.1.1"), None),
    ("default", "127.0.0.2", Some("6.6.6.6"), None),
    ("default", "127.0.0.2", Some("6.6.6.6, 1.1.1.1"), None),
    ("default", "127.0.0.9", Some("1.1.1.1"), None),
    ("default", "127.0.0.2", Some("10.0.0.1"), None),
    ("remote", "127.0.0.1", None, None),
    ("remote", "127.0.0.2", None, None),
    ("remote", "127.0.0.2", Some("6.6.6.6"), None),
    ("remote", "127.0.0.2", Some("1.1.1.1,2.2.2.2"), None),
    ("hops", "127.0.0.2", None, None),
    ("hops", "127.0.0.2", Some("6.6.6.6"), None),
    ("hops", "127.0.0.2", Some("6.6.6.6,1.1.1.1"), None),
    ("hops", "127.0.0.2", Some("junk"), None),
    ("private", "127.0.0.2", Some("10.1.2.3"), None),
    ("private", "127.0.0.2", Some("192.168.1.1"), None),
    ("private", "127.0.0.2", Some("172.20.0.1"), None),
    ("private", "127.0.0.2", Some("8.8.8.8"), None),
    ("private", "127.0.0.2", Some("127.0.0.1"), None),
    ("private", "127.0.0.2", Some("127.0.0.5"), None),
    ("private", "127.0.0.2", Some("10.0.0.1,10.0.0.2"), None),
    ("private", "127.0.0.2", Some("fd00::1"), None),
    ("private", "127.0.0.2", None, None),
    ("skip", "127.0.0.2", Some("3.3.3.3"), None),
    ("skip", "127.0.0.2", None, None),
    ("header", "127.0.0.2", None, Some("6.6.6.6")),
    ("header", "127.0.0.2", Some("1.1.1.1"), Some("10.9.9.9")),
    ("header", "127.0.0.2", Some("1.1.1.1"), None),
    ("header", "127.0.0.2", None, Some("not-an-ip")),
];

/// Every row of [`TABLE`] through the proxy on `ports`, as comparable lines.
fn observe(ports: &[u16]) -> Result<Vec<String>> {
    let names: Vec<&str> = variants().iter().map(|v| v.0).collect();
    let mut out = Vec::new();
    for (i, (name, from, xff, real_ip)) in TABLE.iter().enumerate() {
        let port = names
            .iter()
            .position(|n| n == name)
            .map(|k| ports[k])
            .ok_or_else(|| anyhow!("no listener {name}"))?;
        let mut headers = vec![
            ("x-envoy-max-retries", "7"),
            ("x-envoy-retry-on", "connect-failure"),
            ("x-envoy-retriable-status-codes", "418"),
            ("x-envoy-decorator-operation", "op"),
            ("x-envoy-internal", "true"),
            ("x-envoy-external-address", "9.9.9.9"),
        ];
        if let Some(x) = xff {
            headers.push(("x-forwarded-for", x));
        }
        if let Some(r) = real_ip {
            headers.push(("x-real-ip", r));
        }
        let (status, echo) = get(from, port, &format!("/row/{i}"), &headers)?;
        out.push(format!(
            "{i} {name} from {from} xff {xff:?} real {real_ip:?} -> {status} xff={} ext={} internal={} max-retries={} retry-on={} codes={} decorator={} expected={}",
            seen(&echo, "x-forwarded-for"),
            seen(&echo, "x-envoy-external-address"),
            seen(&echo, "x-envoy-internal"),
            seen(&echo, "x-envoy-max-retries"),
            seen(&echo, "x-envoy-retry-on"),
            seen(&echo, "x-envoy-retriable-status-codes"),
            seen(&echo, "x-envoy-decorator-operation"),
            seen(&echo, "x-envoy-expected-rq-timeout-ms"),
        ));
    }
    Ok(out)
}

fn ports() -> Vec<u16> {
    variants().iter().map(|_| free_port()).collect()
}

#[test]
fn trust_table_matches_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let p = ports();
    let ferry = Ferry::start(&serde_json::to_string_pretty(&config(&p, app.port))?)?;
    let through_ferry = observe(&p).with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    drop(ferry);
    // What Envoy's documentation promises, whatever both proxies do.
    let row = |i: usize| through_ferry[i].as_str();
    assert!(row(2).contains("-> 403"), "{}", row(2));
    assert!(row(3).contains("-> 200"), "{}", row(3));
    assert!(row(4).contains("-> 403"), "{}", row(4));
    assert!(
        row(8).contains("-> 200 xff=6.6.6.6,127.0.0.2 ext=127.0.0.2"),
        "{}",
        row(8)
    );
    assert!(row(11).contains("-> 403"), "{}", row(11));
    assert!(row(12).contains("ext=1.1.1.1"), "{}", row(12));
    assert!(row(14).contains("internal=true"), "{}", row(14));
    assert!(
        row(17).contains("internal=- max-retries=- retry-on=-"),
        "{}",
        row(17)
    );
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let p = ports();
    let e = Envoy::start(&bin, &config(&p, app.port), p[0])?;
    let through_envoy = observe(&p).with_context(|| format!("through envoy:\n{}", e.log()))?;
    for (f, e) in through_ferry.iter().zip(&through_envoy) {
        assert_eq!(f, e, "ferry (left) and envoy (right) differ");
    }
    assert_eq!(through_ferry.len(), through_envoy.len());
    Ok(())
}

/// How many requests the echo backend got for `path`.
fn hits(app: &App, path: &str) -> Result<u64> {
    let (_, body) = http_request(local(app.port), "GET", &format!("/hits{path}"))?;
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["hits"].as_u64().unwrap_or(0))
}

/// `x-envoy-retry-on`/`x-envoy-max-retries` and `x-envoy-upstream-rq-timeout-ms` steer the
/// router only for an internal request (here: a single private `x-forwarded-for` address
/// on the listener with `internal_address_config`).
fn steer(app: &App, ports: &[u16], tag: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (listener, xff) in [("default", "10.1.2.3"), ("private", "10.1.2.3")] {
        let k = variants()
            .iter()
            .position(|v| v.0 == listener)
            .ok_or_else(|| anyhow!("no listener"))?;
        let path = format!("/flaky/1/503/{tag}/{listener}");
        let retry = [
            ("x-forwarded-for", xff),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-max-retries", "2"),
        ];
        let (status, _) = get("127.0.0.2", ports[k], &path, &retry)?;
        let n = hits(app, &path)?;
        let timeout = [
            ("x-forwarded-for", xff),
            ("x-envoy-upstream-rq-timeout-ms", "100"),
        ];
        let (slow, _) = get("127.0.0.2", ports[k], "/sleep/500", &timeout)?;
        out.push(format!(
            "{listener}: retried {status} after {n} hits, slow {slow}"
        ));
    }
    Ok(out)
}

#[test]
fn envoy_request_headers_are_honoured_from_internal_clients_only() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let p = ports();
    let ferry = Ferry::start(&serde_json::to_string_pretty(&config(&p, app.port))?)?;
    let through_ferry = steer(&app, &p, "ferry").with_context(|| ferry.log())?;
    drop(ferry);
    assert_eq!(
        through_ferry,
        vec![
            "default: retried 503 after 1 hits, slow 200".to_string(),
            "private: retried 200 after 2 hits, slow 504".to_string(),
        ]
    );
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let p = ports();
    let e = Envoy::start(&bin, &config(&p, app.port), p[0])?;
    let through_envoy = steer(&app, &p, "envoy").with_context(|| e.log())?;
    assert_eq!(through_ferry, through_envoy);
    Ok(())
}
