//! `/explain` (beyond Envoy): the admin page that says, from the live configuration, what a
//! request would get and why. One bootstrap (an HTTP listener with two virtual hosts, header
//! and method matches, a retry policy, weighted clusters, an RBAC filter with shadow rules,
//! and a TCP listener whose filter chains match by destination port and source prefix) runs
//! in Ferry with three echo backends. Each request of a set is explained, then sent for
//! real: the explained outcome (the backend's name, or the status of a local answer) must
//! be what the request gets from Ferry, and from Envoy 1.40 on the same bootstrap; the
//! explanations' reasons (the first failing condition of each earlier route, the step at
//! which each other filter chain lost) are checked word for word on a few cases.
//!
//! Without Envoy, Ferry's half still runs, except under `CI=true`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::pki::{ISTIO_DEMO_JWKS, ISTIO_DEMO_JWT};
use ferry_tests::proxy::{App, Bootstrap, Ferry, RunLock, free_port, static_cluster};
use ferry_tests::proxy::{Upstream, curl, listener, tcp_proxy};
use serde_json::{Value, json};

/// A GET to an admin port: status and body.
fn admin_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no response head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, body.to_string()))
}

/// Percent-encoding of a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One request of the set.
struct Case {
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

impl Case {
    fn query(&self, port: u16) -> String {
        let mut q = format!(
            "/explain?destination=127.0.0.1:{port}&method={}&authority={}&path={}",
            self.method,
            enc(self.host),
            enc(self.path)
        );
        for (k, v) in self.headers {
            q.push_str(&format!("&header={}", enc(&format!("{k}:{v}"))));
        }
        q
    }

    /// What the request really gets: the backend's name, or the status.
    fn send(&self, port: u16) -> Result<String> {
        let url = format!("http://127.0.0.1:{port}{}", self.path);
        let host = format!("host: {}", self.host);
        let mut args = vec!["-s", "-X", self.method, "-H", &host, "-w", "\n%{http_code}"];
        let hs: Vec<String> = self
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        for h in &hs {
            args.extend(["-H", h.as_str()]);
        }
        args.push(&url);
        let out = curl(&args)?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').context("no status from curl")?;
        if code == "200" {
            let v: Value = serde_json::from_str(body).with_context(|| body.to_string())?;
            Ok(format!("cluster {}", v["name"].as_str().unwrap_or("?")))
        } else {
            Ok(format!("status {code}"))
        }
    }
}

/// The explanation's prediction, in the terms of [`Case::send`].
fn predicted(e: &Value) -> String {
    let outcome = e["outcome"].as_str().unwrap_or_default();
    match outcome.strip_prefix("routed to ") {
        Some(c) => format!("cluster {c}"),
        None => format!("status {}", &outcome[..3.min(outcome.len())]),
    }
}

fn route(name: &str, m: Value, action: Value) -> Value {
    json!({"name": name, "match": m, "route": action})
}

/// The port of Istio-style outbound listeners (`0.0.0.0:PORT`, binding no port) that the
/// original-destination listener hands connections to.
const OUTBOUND_PORT: u16 = 9080;

fn config(web: u16, tcp: u16, ports: [u16; 3]) -> Result<Value> {
    let api_routes = vec![
        route(
            "admin",
            json!({"prefix": "/admin", "headers": [{"name": "x-admin", "present_match": true}]}),
            json!({"cluster": "admin"}),
        ),
        route(
            "create",
            json!({"path": "/items", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]}),
            json!({"cluster": "v2", "timeout": "3s", "retry_policy": {
                "retry_on": "5xx,connect-failure", "num_retries": 2, "per_try_timeout": "1s"}}),
        ),
        route(
            "v2-users",
            json!({"prefix": "/", "headers": [{"name": "x-user", "string_match": {"exact": "bob"}}]}),
            json!({"cluster": "v2"}),
        ),
        route(
            "rest",
            json!({"prefix": "/"}),
            json!({"weighted_clusters": {"clusters": [
                {"name": "v1", "weight": 3}, {"name": "v2", "weight": 1}]}}),
        ),
    ];
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "web",
            "codec_type": "AUTO",
            "route_config": {
                "name": "web_routes",
                "virtual_hosts": [
                    {"name": "api", "domains": ["api.example", "*.api.example"], "routes": api_routes},
                    {"name": "strict", "domains": ["strict.example"], "routes": [
                        route("only", json!({"prefix": "/only"}), json!({"cluster": "v1"}))]},
                    {"name": "other", "domains": ["*"], "routes": [
                        route("all", json!({"prefix": "/"}), json!({"cluster": "v1"}))]},
                ],
            },
            "http_filters": [
                {"name": "envoy.filters.http.jwt_authn", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                    "providers": {"demo": {"issuer": "testing@secure.istio.io",
                                           "local_jwks": {"inline_string": ISTIO_DEMO_JWKS}}},
                    "rules": [{"match": {"prefix": "/private"}, "requires": {"provider_name": "demo"}}],
                }},
                {"name": "envoy.filters.http.rbac", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                    "rules": {"action": "DENY", "policies": {"no-secret": {
                        "permissions": [{"url_path": {"path": {"prefix": "/secret"}}}],
                        "principals": [{"any": true}]}}},
                    "shadow_rules": {"action": "ALLOW", "policies": {"alice": {
                        "permissions": [{"any": true}],
                        "principals": [{"header": {"name": "x-user", "string_match": {"exact": "alice"}}}]}}},
                }},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
            ],
        },
    });
    let chains = vec![
        json!({"name": "port-9", "filter_chain_match": {"destination_port": 9},
               "filters": [tcp_proxy("p9", "v2")]}),
        json!({"name": "from-10", "filter_chain_match": {"source_prefix_ranges": [
                {"address_prefix": "10.0.0.0", "prefix_len": 8}]},
               "filters": [tcp_proxy("ten", "v2")]}),
        json!({"name": "local", "filters": [tcp_proxy("local", "v1")]}),
    ];
    // Istio's shape: a listener traffic is redirected to, which hands each connection
    // to the listener of its original destination.
    let mut virtual_outbound = listener(
        "virtualOutbound",
        free_port(),
        vec![json!({"name": "passthrough", "filters": [tcp_proxy("passthrough", "v1")]})],
    );
    virtual_outbound["use_original_dst"] = json!(true);
    let mut outbound = listener(
        "0.0.0.0_9080",
        OUTBOUND_PORT,
        vec![json!({"filters": [tcp_proxy("outbound", "v2")]})],
    );
    outbound["address"]["socket_address"]["address"] = json!("0.0.0.0");
    outbound["bind_to_port"] = json!(false);
    let doc = Bootstrap::new()
        .listener(listener("web", web, vec![json!({"filters": [hcm]})]))
        .listener(virtual_outbound)
        .listener(outbound)
        .listener(listener("tcp", tcp, chains))
        .cluster(static_cluster("v1", &[ports[0]], Upstream::Http1))
        .cluster(static_cluster("v2", &[ports[1]], Upstream::Http1))
        .cluster(static_cluster("admin", &[ports[2]], Upstream::Http1))
        .render();
    Ok(serde_json::from_str(&doc)?)
}

fn cases() -> Vec<Case> {
    let token: &'static str = Box::leak(format!("Bearer {ISTIO_DEMO_JWT}").into_boxed_str());
    let mut cases = vec![
        Case {
            method: "GET",
            host: "api.example",
            path: "/admin/x",
            headers: &[("x-admin", "1")],
        },
        Case {
            method: "POST",
            host: "v.api.example",
            path: "/items",
            headers: &[],
        },
        Case {
            method: "GET",
            host: "api.example",
            path: "/items",
            headers: &[("x-user", "bob")],
        },
        Case {
            method: "GET",
            host: "strict.example",
            path: "/only/here",
            headers: &[],
        },
        Case {
            method: "GET",
            host: "strict.example",
            path: "/elsewhere",
            headers: &[],
        },
        Case {
            method: "GET",
            host: "other.example",
            path: "/secret/x",
            headers: &[("x-user", "alice")],
        },
        Case {
            method: "GET",
            host: "other.example",
            path: "/public",
            headers: &[],
        },
        Case {
            method: "GET",
            host: "other.example",
            path: "/private",
            headers: &[],
        },
        Case {
            method: "GET",
            host: "other.example",
            path: "/private",
            headers: &[("authorization", "Bearer not-a-token")],
        },
    ];
    cases.push(Case {
        method: "GET",
        host: "other.example",
        path: "/private",
        headers: Box::leak(Box::new([("authorization", token)])),
    });
    cases
}

#[test]
fn explain_says_what_a_request_gets_and_why() -> Result<()> {
    let _lock = RunLock::shared();
    let apps = [
        App::http("v1", &[])?,
        App::http("v2", &[])?,
        App::http("admin", &[])?,
    ];
    let (web, tcp) = (free_port(), free_port());
    let cfg = config(web, tcp, [apps[0].port, apps[1].port, apps[2].port])?;
    let ferry = Ferry::start(&serde_json::to_string(&cfg)?)?;
    let port = ferry.admin_port();
    let explain = |q: &str| -> Result<Value> {
        let (status, body) = admin_get(port, q)?;
        if status != 200 {
            bail!("{q}: {status} {body}");
        }
        serde_json::from_str(&body).with_context(|| body.clone())
    };

    // Every case: explained, then sent; the prediction is what Ferry does.
    let mut explained = Vec::new();
    let cases = cases();
    for c in &cases {
        let e = explain(&c.query(web))?;
        let got = c.send(web)?;
        assert_eq!(
            predicted(&e),
            got,
            "{} {}{}\n{e:#}",
            c.method,
            c.host,
            c.path
        );
        explained.push(e);
    }

    // The reasons, word for word.
    let e = &explained[1];
    assert_eq!(e["listener"]["name"], "web");
    assert_eq!(e["http"]["virtual_host"]["name"], "api");
    assert_eq!(e["http"]["virtual_host"]["matched_domain"], "*.api.example");
    assert_eq!(
        e["http"]["skipped_routes"],
        json!([{"index": 0, "name": "admin",
                "match": "prefix \"/admin\", header \"x-admin\" present",
                "reason": "path \"/items\" does not match prefix \"/admin\""}])
    );
    let r = &e["http"]["route"];
    assert_eq!(
        (r["index"].as_u64(), r["name"].as_str()),
        (Some(1), Some("create"))
    );
    assert_eq!(r["timeout"], "3s");
    assert_eq!(r["retry_policy"]["retry_on"], "5xx,connect-failure");
    assert_eq!(r["retry_policy"]["num_retries"], 2);
    assert_eq!(r["retry_policy"]["per_try_timeout"], "1s");
    let endpoints = &e["clusters"][0]["endpoints"];
    assert_eq!(
        endpoints[0]["address"],
        format!("127.0.0.1:{}", apps[1].port)
    );
    assert_eq!(endpoints[0]["health_flags"], "healthy");

    // GET /items: the POST-only route is skipped for its method.
    let e = &explained[2];
    assert_eq!(
        e["http"]["skipped_routes"][1]["reason"],
        "header \":method\" is \"GET\", wanted exact \"POST\""
    );
    assert_eq!(e["http"]["route"]["name"], "v2-users");

    // Weighted clusters are shares, not a draw.
    let e = explain(
        &Case {
            method: "GET",
            host: "api.example",
            path: "/",
            headers: &[],
        }
        .query(web),
    )?;
    assert_eq!(
        e["http"]["route"]["weighted_clusters"],
        json!([{"name": "v1", "weight": 3, "share": "75%"},
               {"name": "v2", "weight": 1, "share": "25%"}])
    );
    assert_eq!(e["outcome"], "routed to v1 | v2");

    // No route in the virtual host: 404.
    let e = &explained[4];
    assert_eq!(e["http"]["virtual_host"]["name"], "strict");
    assert_eq!(
        e["http"]["skipped_routes"][0]["reason"],
        "path \"/elsewhere\" does not match prefix \"/only\""
    );
    assert!(e["http"]["route"].is_null());
    assert_eq!(
        e["outcome"],
        "404 (NR): no route of the virtual host matches"
    );

    // RBAC: the enforced DENY policy and the shadow verdict.
    let e = &explained[5];
    let rbac = &e["http"]["http_filters"][1];
    assert_eq!(rbac["name"], "envoy.filters.http.rbac");
    assert_eq!(
        rbac["result"],
        json!({"enforced": {"allowed": false, "matched_policy": "no-secret"},
               "shadow": {"allowed": true, "matched_policy": "alice"}})
    );
    assert_eq!(e["http"]["http_filters"][0]["result"], "passes");

    // JWT: the rule's requirement, verified as the filter does.
    let jwt = |e: &Value| e["http"]["http_filters"][0]["result"].clone();
    assert_eq!(jwt(&explained[7]), "denied: Jwt is missing");
    assert_eq!(
        explained[7]["outcome"],
        "401 \"Jwt is missing\" from envoy.filters.http.jwt_authn"
    );
    assert_eq!(explained[7]["http"]["http_filters"][1]["reached"], false);
    assert!(
        jwt(&explained[8])
            .as_str()
            .is_some_and(|s| s.starts_with("denied: Jwt is not in the form")),
        "{}",
        explained[8]
    );
    assert_eq!(jwt(&explained[9]), "passes");
    assert_eq!(
        explained[9]["http"]["http_filters"][0]["verified_providers"],
        json!(["demo"])
    );

    // The TCP listener: the chain chosen, and the step at which each other lost.
    let e = explain(&format!("/explain?destination=127.0.0.1:{tcp}"))?;
    assert_eq!(e["filter_chain"]["name"], "local");
    assert_eq!(
        e["filter_chain"]["rejected"],
        json!([
            {"name": "port-9", "step": "destination_port", "wants": "9",
             "connection": tcp.to_string(), "reason": "does not match"},
            {"name": "from-10", "step": "source_prefix_ranges", "wants": "[10.0.0.0/8]",
             "connection": "127.0.0.1", "reason": "does not match"},
        ])
    );
    assert_eq!(e["tcp_proxy"]["cluster"], "v1");
    let via_tcp = curl(&["-s", &format!("http://127.0.0.1:{tcp}/")])?;
    let v: Value = serde_json::from_slice(&via_tcp.stdout)?;
    assert_eq!(v["name"], "v1");
    let e = explain(&format!(
        "/explain?destination=127.0.0.1:{tcp}&source=10.1.2.3:5555"
    ))?;
    assert_eq!(e["filter_chain"]["name"], "from-10");
    assert_eq!(
        e["filter_chain"]["rejected"][1],
        json!({"name": "local", "step": "source_prefix_ranges", "wants": null,
               "connection": "10.1.2.3", "reason": "leaves it open while another chain matches it"})
    );
    assert_eq!(e["clusters"][0]["name"], "v2");

    // A service address: redirected to the original-destination listener, handed over
    // to the listener of its port.
    let e = explain(&format!("/explain?destination=10.96.0.10:{OUTBOUND_PORT}"))?;
    assert_eq!(e["listener"]["name"], "0.0.0.0_9080");
    assert_eq!(e["listener"]["handed_over_by"], "virtualOutbound");
    assert_eq!(e["tcp_proxy"]["cluster"], "v2");
    let e = explain("/explain?destination=10.96.0.10:1")?;
    assert_eq!(e["listener"]["name"], "virtualOutbound");
    assert_eq!(e["filter_chain"]["name"], "passthrough");

    // Bad questions get clear answers.
    let (status, body) = admin_get(port, "/explain?path=/")?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("destination"), "{body}");
    let (status, body) = admin_get(port, "/explain?listener=nope")?;
    assert_eq!(
        (status, body.as_str()),
        (404, "no listener named \"nope\"\n")
    );
    let (status, _) = admin_get(port, "/explain?listener=web&header=novalue")?;
    assert_eq!(status, 400);
    drop(ferry);

    // Envoy, on the same bootstrap, does with every request what Ferry explained.
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let envoy = Envoy::start(&bin, &cfg, web).context("starting Envoy")?;
    for (c, e) in cases.iter().zip(&explained) {
        assert_eq!(
            predicted(e),
            c.send(web)?,
            "Envoy: {} {}{}",
            c.method,
            c.host,
            c.path
        );
    }
    let via_tcp = curl(&["-s", &format!("http://127.0.0.1:{tcp}/")])?;
    let v: Value = serde_json::from_slice(&via_tcp.stdout)?;
    assert_eq!(v["name"], "v1");
    drop(envoy);
    Ok(())
}
