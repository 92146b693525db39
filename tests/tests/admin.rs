//! The admin API in Envoy's shapes, which `istioctl proxy-config`, Kiali and operators
//! read. One bootstrap (an HTTP listener with an inline route table, a TLS listener with
//! an inline certificate, two clusters) runs through Envoy 1.40 and through Ferry; the
//! same requests go through each, then every admin endpoint is asked of both and their
//! status, content type and JSON structure (keys and value types, not volatile values)
//! must agree: `/server_info`, `/clusters` (text and JSON), `/listeners`, `/config_dump`
//! (whole, `resource=`, `mask=`, `name_regex=`, `include_eds`), `/stats` (`filter=`,
//! `format=json`, `usedonly`), `/stats/prometheus`, `/certs` (the same serial, SANs and
//! validity), `/memory`, `/logging` (listing and changing levels), `/ready` with
//! `/healthcheck/fail|ok`, `/reopen_logs`, `/hot_restart_version`, and finally
//! `/quitquitquit`.
//!
//! Without Envoy, Ferry's answers are still checked on their own, except under `CI=true`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::pki::Ca;
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, TempDir, Upstream, curl, free_port, http_listener,
    static_cluster,
};
use serde_json::{Value, json};

/// One admin answer: status, content type, body.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// A raw HTTP/1.1 request to an admin port.
fn admin(port: u16, method: &str, path: &str) -> Result<Answer> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the response head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Answer {
        status,
        content_type,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The structure of a JSON value: objects keep their keys, leaves become their type,
/// arrays the union of their elements' structures.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => {
            let mut merged = BTreeMap::new();
            let mut leaves = BTreeSet::new();
            for e in a {
                match shape(e) {
                    Value::Object(o) => merged.extend(o),
                    other => {
                        leaves.insert(other.to_string());
                    }
                }
            }
            let mut out: Vec<Value> = leaves.into_iter().map(Value::String).collect();
            if !merged.is_empty() {
                out.push(Value::Object(merged.into_iter().collect()));
            }
            Value::Array(out)
        }
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

/// The keys of `lines` of the text `/clusters` (`cluster::host::stat`, value dropped).
fn cluster_keys(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.rsplit_once("::").map(|(k, _)| k.to_string()))
        .collect()
}

struct Setup {
    admin_log: std::path::PathBuf,
    http: u16,
    tls: u16,
    backend: u16,
    dead: u16,
    ca: Ca,
}

fn config(s: &Setup) -> Result<Value> {
    let leaf =
        s.ca.leaf("spiffe://cluster.local/ns/default/sa/web", &["web.example"])?;
    let mut named = json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}});
    named["name"] = json!("to-backend");
    let mut tls = http_listener("tls", s.tls, vec![named.clone()]);
    tls["filter_chains"][0]["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_certificates": [{
                    "certificate_chain": {"inline_string": leaf.cert_pem},
                    "private_key": {"inline_string": leaf.key_pem},
                }],
                "validation_context": {"trusted_ca": {"inline_string": s.ca.pem()}},
            },
        },
    });
    let doc = Bootstrap::new()
        .listener(http_listener("web", s.http, vec![named]))
        .listener(tls)
        .cluster(static_cluster("backend", &[s.backend], Upstream::Http1))
        .cluster(static_cluster("dead", &[s.dead], Upstream::Http1))
        .render();
    let mut v: Value = serde_json::from_str(&doc)?;
    v["node"] =
        json!({"id": "sidecar~127.0.0.1~web.default~default.svc.cluster.local", "cluster": "web"});
    // Admin requests are logged (Envoy's harness replaces `admin` with its own).
    v["admin"] = json!({"access_log": [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": s.admin_log.to_string_lossy(),
            "log_format": {"text_format_source": {"inline_string": "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%\n"}},
        },
    }]});
    Ok(v)
}

/// Everything asked of one proxy's admin port, by a label.
fn survey(port: u16, http: u16) -> Result<BTreeMap<&'static str, Answer>> {
    for _ in 0..3 {
        let url = format!("http://127.0.0.1:{http}/bytes/10");
        curl(&["-o", "/dev/null", &url])?;
    }
    let mut out = BTreeMap::new();
    let asks: &[(&'static str, &str, &str)] = &[
        ("server_info", "GET", "/server_info"),
        ("clusters", "GET", "/clusters"),
        ("clusters_json", "GET", "/clusters?format=json"),
        ("listeners", "GET", "/listeners"),
        ("listeners_json", "GET", "/listeners?format=json"),
        ("config_dump", "GET", "/config_dump"),
        ("config_dump_eds", "GET", "/config_dump?include_eds"),
        (
            "listener_names",
            "GET",
            "/config_dump?resource=static_listeners&mask=listener.name",
        ),
        (
            "route_names",
            "GET",
            "/config_dump?resource=static_route_configs&mask=route_config.name",
        ),
        (
            "named_cluster",
            "GET",
            "/config_dump?resource=static_clusters&name_regex=back.*&mask=cluster.name",
        ),
        (
            "no_match",
            "GET",
            "/config_dump?resource=static_clusters&name_regex=back",
        ),
        ("mask_only", "GET", "/config_dump?mask=static_clusters"),
        ("bad_resource", "GET", "/config_dump?resource=nope"),
        ("stats", "GET", "/stats"),
        (
            "stats_json",
            "GET",
            "/stats?format=json&filter=%5Ehttp%5C.web%5C.",
        ),
        ("stats_bad", "GET", "/stats?filter=(bad"),
        (
            "stats_used",
            "GET",
            "/stats?usedonly&filter=downstream_rq_2xx",
        ),
        ("prometheus", "GET", "/stats/prometheus"),
        ("certs", "GET", "/certs"),
        ("memory", "GET", "/memory"),
        ("logging_get", "GET", "/logging"),
        ("logging", "POST", "/logging"),
        ("logging_set", "POST", "/logging?paths=http:debug"),
        ("logging_bad", "POST", "/logging?level=loud"),
        ("logging_unknown", "POST", "/logging?paths=nope:debug"),
        ("logging_all", "POST", "/logging?level=warning"),
        ("hot_restart", "GET", "/hot_restart_version"),
        ("ready", "GET", "/ready"),
        ("hc_fail", "POST", "/healthcheck/fail"),
        ("ready_failed", "GET", "/ready"),
        ("hc_ok", "POST", "/healthcheck/ok"),
        ("ready_again", "GET", "/ready"),
        ("reopen", "POST", "/reopen_logs"),
        ("quit_get", "GET", "/quitquitquit"),
    ];
    for (label, method, path) in asks {
        out.insert(*label, admin(port, method, path)?);
    }
    Ok(out)
}

/// Checks that hold for Ferry on its own.
fn check_ferry(a: &BTreeMap<&'static str, Answer>, s: &Setup) -> Result<()> {
    let info = a["server_info"].json();
    assert_eq!(info["state"], "LIVE");
    assert!(info["command_line_options"]["concurrency"].is_number());
    assert_eq!(
        info["node"]["id"],
        "sidecar~127.0.0.1~web.default~default.svc.cluster.local"
    );
    let clusters = &a["clusters"].body;
    let host = format!("backend::127.0.0.1:{}", s.backend);
    assert!(
        clusters.contains(&format!("{host}::rq_total::3")),
        "{clusters}"
    );
    assert!(
        clusters.contains(&format!("{host}::rq_success::3")),
        "{clusters}"
    );
    assert!(clusters.contains(&format!("{host}::health_flags::healthy")));
    assert!(clusters.contains("dead::default_priority::max_retries::3"));
    assert_eq!(
        a["listeners"].body,
        format!("web::127.0.0.1:{}\ntls::127.0.0.1:{}\n", s.http, s.tls)
    );
    assert_eq!(
        a["listener_names"].json()["configs"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(a["bad_resource"].status, 404);
    assert_eq!(a["stats_bad"].status, 400);
    let stats = a["stats_json"].json();
    let names: Vec<&str> = stats["stats"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("http.web.")),
        "{names:?}"
    );
    assert!(
        a["stats_used"]
            .body
            .contains("http.web.downstream_rq_2xx: 3")
    );
    let certs = a["certs"].json();
    let chain = &certs["certificates"][0]["cert_chain"][0];
    assert_eq!(chain["subject_alt_names"][0]["dns"], "web.example");
    assert_eq!(
        chain["subject_alt_names"][1]["uri"],
        "spiffe://cluster.local/ns/default/sa/web"
    );
    assert_eq!(a["logging_get"].status, 405);
    assert!(a["logging_set"].body.contains("  http: debug\n"));
    assert_eq!(a["logging_bad"].status, 400);
    assert_eq!(a["ready_failed"].status, 503);
    assert_eq!(a["ready_failed"].body, "DRAINING\n");
    assert_eq!(a["ready_again"].body, "LIVE\n");
    assert_eq!(a["quit_get"].status, 405);
    Ok(())
}

/// Envoy's answer and Ferry's agree in status, content type and shape.
fn compare(
    envoy: &BTreeMap<&'static str, Answer>,
    ferry: &BTreeMap<&'static str, Answer>,
    s: &Setup,
) -> Result<()> {
    for (label, e) in envoy {
        let f = &ferry[label];
        assert_eq!(
            f.status, e.status,
            "{label}: status (Ferry, Envoy)\n{}\n{}",
            f.body, e.body
        );
        // Ferry names the Prometheus text format's version in the content type
        // (`text/plain; version=0.0.4`), which scrapers prefer; Envoy does not.
        if *label != "prometheus" {
            assert_eq!(
                f.content_type, e.content_type,
                "{label}: content type (Ferry, Envoy)"
            );
        }
    }
    let json_same_shape = [
        "listeners_json",
        "listener_names",
        "route_names",
        "named_cluster",
        "no_match",
        "memory",
        "stats_json",
        "certs",
    ];
    // Ferry keeps no histograms (latency lives in Istio's Prometheus
    // metrics): Envoy's `histograms` entry of `/stats?format=json` is left out.
    let without_histograms = |mut v: Value| {
        if let Some(a) = v["stats"].as_array_mut() {
            a.retain(|e| e.get("histograms").is_none());
        }
        v
    };
    for label in json_same_shape {
        assert_eq!(
            shape(&without_histograms(ferry[label].json())),
            shape(&without_histograms(envoy[label].json())),
            "{label}: shape (Ferry, Envoy)\n{}\n{}",
            ferry[label].body,
            envoy[label].body
        );
    }
    // The same resources, masked to their names (in any order: Envoy's is its
    // hash maps').
    let sorted = |mut v: Value| {
        for k in ["configs", "listener_statuses"] {
            if let Some(a) = v[k].as_array_mut() {
                a.sort_by_key(|e| e.to_string());
            }
        }
        v
    };
    for label in [
        "listener_names",
        "route_names",
        "named_cluster",
        "listeners_json",
    ] {
        assert_eq!(
            sorted(ferry[label].json()),
            sorted(envoy[label].json()),
            "{label}"
        );
    }
    // The same certificate, read the same way.
    assert_eq!(ferry["certs"].json(), envoy["certs"].json(), "certs");
    // /server_info: the same keys, the same command-line option keys and types, and
    // the node's fields a subset of Envoy's.
    let (fi, ei) = (ferry["server_info"].json(), envoy["server_info"].json());
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(keys(&fi), keys(&ei), "server_info keys");
    assert_eq!(
        shape(&fi["command_line_options"]),
        shape(&ei["command_line_options"]),
        "command_line_options"
    );
    assert!(keys(&fi["node"]).is_subset(&keys(&ei["node"])), "node keys");
    // /clusters: the same lines, values aside.
    assert_eq!(
        cluster_keys(&ferry["clusters"].body),
        cluster_keys(&envoy["clusters"].body),
        "/clusters lines"
    );
    let host = format!("backend::127.0.0.1:{}", s.backend);
    for stat in ["rq_total", "rq_success", "cx_total"] {
        let line = |body: &str| {
            body.lines()
                .find(|l| l.starts_with(&format!("{host}::{stat}::")))
                .map(str::to_string)
        };
        assert_eq!(
            line(&ferry["clusters"].body),
            line(&envoy["clusters"].body),
            "{stat}"
        );
    }
    assert_eq!(
        shape(&ferry["clusters_json"].json()),
        shape(&envoy["clusters_json"].json()),
        "/clusters?format=json"
    );
    // /config_dump: the same sections in the same order, each with the same fields,
    // and the same shape of what the resource lists hold.
    for label in ["config_dump", "config_dump_eds", "mask_only"] {
        let sections = |v: &Value| -> Vec<(String, BTreeSet<String>)> {
            v["configs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| (c["@type"].as_str().unwrap_or("").to_string(), keys(c)))
                .collect()
        };
        assert_eq!(
            sections(&ferry[label].json()),
            sections(&envoy[label].json()),
            "{label} sections"
        );
    }
    let element_keys = |v: &Value, section: &str, field: &str| -> BTreeSet<String> {
        v["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(section)))
            .flat_map(|c| c[field].as_array().cloned().unwrap_or_default())
            .flat_map(|e| keys(&e))
            .collect()
    };
    for (section, field) in [
        ("ClustersConfigDump", "static_clusters"),
        ("ListenersConfigDump", "static_listeners"),
        ("RoutesConfigDump", "static_route_configs"),
        ("EndpointsConfigDump", "static_endpoint_configs"),
    ] {
        assert_eq!(
            element_keys(&ferry["config_dump_eds"].json(), section, field),
            element_keys(&envoy["config_dump_eds"].json(), section, field),
            "{section}.{field}"
        );
    }
    let first_endpoint = |v: &Value| {
        v["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| {
                c["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("EndpointsConfigDump"))
            })
            .map(|c| shape(&c["static_endpoint_configs"][0]))
    };
    assert_eq!(
        first_endpoint(&ferry["config_dump_eds"].json()),
        first_endpoint(&envoy["config_dump_eds"].json()),
        "static endpoint config"
    );
    // Counters both keep for the same requests.
    let value = |a: &Answer, name: &str| {
        a.json()["stats"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .map(|s| s["value"].clone())
    };
    for name in ["http.web.downstream_rq_2xx", "http.web.downstream_rq_total"] {
        assert_eq!(
            value(&ferry["stats_json"], name),
            value(&envoy["stats_json"], name),
            "{name}"
        );
    }
    // /logging lists the loggers Ferry maps, each as Envoy prints them.
    for l in ["admin", "config", "http", "router", "upstream", "rbac"] {
        assert!(envoy["logging"].body.contains(&format!("  {l}: ")));
        assert!(ferry["logging"].body.contains(&format!("  {l}: ")));
    }
    for label in ["ready", "ready_failed", "ready_again", "hot_restart"] {
        assert_eq!(ferry[label].body, envoy[label].body, "{label}");
    }
    Ok(())
}

#[test]
fn admin_endpoints_have_envoys_shapes() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let dir = TempDir::new("admin-log")?;
    let s = Setup {
        admin_log: dir.path().join("admin.log"),
        http: free_port(),
        tls: free_port(),
        backend: app.port,
        dead: free_port(),
        ca: Ca::new("admin-test")?,
    };
    let cfg = config(&s)?;
    let mut ferry = Ferry::start(&serde_json::to_string(&cfg)?)?;
    let ferry_answers = survey(ferry.admin_port(), s.http)?;
    check_ferry(&ferry_answers, &s)?;
    let quit = admin(ferry.admin_port(), "POST", "/quitquitquit")?;
    assert_eq!((quit.status, quit.body.as_str()), (200, "OK\n"));
    let st = ferry.wait_exit(Duration::from_secs(15))?;
    if !st.success() {
        bail!("ferry exited with {st} after /quitquitquit");
    }
    // The bootstrap's admin access log has every admin request (flushed at exit).
    let admin_log = std::fs::read_to_string(&s.admin_log)?;
    assert!(admin_log.contains("GET /server_info 200\n"), "{admin_log}");
    assert!(
        admin_log.contains("POST /logging?level=loud 400\n"),
        "{admin_log}"
    );

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let envoy = Envoy::start(&bin, &cfg, s.http).context("starting Envoy")?;
    let envoy_answers = survey(envoy.admin(), s.http)?;
    compare(&envoy_answers, &ferry_answers, &s)?;
    drop(envoy);
    Ok(())
}

/// Polls until `port` refuses connections (a stopped listener), up to 10 s.
fn refuses(port: u16) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if !ferry_tests::proxy::accepts(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One request through a listener: its status (0: no answer).
fn status_via(port: u16) -> u16 {
    let url = format!("http://127.0.0.1:{port}/status/200");
    curl(&["-o", "/dev/null", "-w", "%{http_code}", &url])
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).parse().ok())
        .unwrap_or(0)
}

/// Whether a response through `port` tells the client to close its connection
/// (`connection: close`: the connection manager drains it).
fn closes_after_response(port: u16) -> Result<bool> {
    let url = format!("http://127.0.0.1:{port}/status/200");
    let out = curl(&["-s", "-o", "/dev/null", "-D", "-", &url])?;
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    ensure!(
        head.starts_with("http/1.1 200"),
        "no answer through {port}: {head}"
    );
    Ok(head.contains("\nconnection: close"))
}

/// `POST /drain_listeners` on one proxy (see the test): `graceful` with a drain time of
/// two seconds given on the command line, and the `immediate` drain strategy.
fn drain_sequence(
    admin_port: u16,
    inbound: u16,
    outbound: u16,
    graceful: bool,
    ferry: bool,
) -> Result<()> {
    if graceful {
        let a = admin(admin_port, "POST", "/drain_listeners?inboundonly&graceful")?;
        assert_eq!((a.status, a.body.as_str()), (200, "OK\n"));
        // The drain time has begun: the inbound listener still takes connections,
        // and each of its responses closes its connection; the outbound's do not.
        assert!(
            closes_after_response(inbound)?,
            "inbound during the drain time"
        );
        assert!(
            !closes_after_response(outbound)?,
            "outbound during the drain time"
        );
        assert!(
            refuses(inbound),
            "inbound listener still open after the drain time"
        );
        assert_eq!(status_via(outbound), 200, "outbound after an inbound drain");
        return Ok(());
    }
    // `skip_exit` (Envoy: connections asked to close, the listeners left open) is
    // refused by Ferry, whose drain stops both.
    let a = admin(admin_port, "POST", "/drain_listeners?skip_exit")?;
    if ferry {
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(a.body.contains("skip_exit"), "{}", a.body);
    } else {
        assert_eq!((a.status, a.body.as_str()), (200, "OK\n"));
    }
    assert_eq!(status_via(inbound), 200, "inbound after skip_exit");
    assert_eq!(status_via(outbound), 200, "outbound after skip_exit");
    let a = admin(admin_port, "POST", "/drain_listeners?inboundonly")?;
    assert_eq!((a.status, a.body.as_str()), (200, "OK\n"));
    assert!(refuses(inbound), "inbound listener still open");
    assert_eq!(status_via(outbound), 200, "outbound after an inbound drain");
    let a = admin(admin_port, "POST", "/drain_listeners")?;
    assert_eq!(a.status, 200);
    assert!(refuses(outbound), "outbound listener still open");
    Ok(())
}

/// `/drain_listeners` as Envoy: `inboundonly` closes the listeners whose
/// `traffic_direction` is INBOUND and leaves the others serving, `graceful` keeps them
/// accepting for the drain time first while their responses close their connections
/// (Envoy's `skip_exit` is refused by Ferry); checked on
/// Ferry and on Envoy 1.40 with the same bootstrap.
#[test]
fn drain_listeners_stops_inbound_only_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::http("backend", &[])?;
    let config = |inbound: u16, outbound: u16| -> Result<Value> {
        let route = json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}});
        let mut i = http_listener("inbound", inbound, vec![route.clone()]);
        i["traffic_direction"] = json!("INBOUND");
        let mut o = http_listener("outbound", outbound, vec![route]);
        o["traffic_direction"] = json!("OUTBOUND");
        let doc = Bootstrap::new()
            .listener(i)
            .listener(o)
            .cluster(static_cluster("backend", &[app.port], Upstream::Http1))
            .render();
        Ok(serde_json::from_str(&doc)?)
    };
    let envoy_bin = envoy::bin()?;
    for graceful in [false, true] {
        let (inbound, outbound) = (free_port(), free_port());
        let cfg = config(inbound, outbound)?;
        let ferry = Ferry::start_with(&serde_json::to_string(&cfg)?, &["--drain-timeout", "2s"])?;
        drain_sequence(ferry.admin_port(), inbound, outbound, graceful, true)
            .with_context(|| format!("Ferry, graceful {graceful}"))?;
        drop(ferry);
        let Some(bin) = &envoy_bin else { continue };
        let (inbound, outbound) = (free_port(), free_port());
        let cfg = config(inbound, outbound)?;
        let envoy = Envoy::start_with(
            bin,
            &cfg,
            outbound,
            &["--drain-time-s", "2", "--drain-strategy", "immediate"],
        )?;
        drain_sequence(envoy.admin(), inbound, outbound, graceful, false)
            .with_context(|| format!("Envoy, graceful {graceful}"))?;
        drop(envoy);
    }
    Ok(())
}
