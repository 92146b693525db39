//! The istio.io authorization tasks end to end, through Envoy sidecars and
//! through Ferry sidecars: pods with capture rules and mTLS identities from
//! ferry-pilot's CA, the tasks' AuthorizationPolicy files applied as they
//! are (`../shared/istio-samples/istio.io-tasks/security/`), and the
//! results the docs expect (`expectations.yaml`) checked step by step:
//! - authz-http on bookinfo: allow-nothing, then viewers by method and by
//!   the callers' SPIFFE principals, workload by workload;
//! - authz-deny: DENY by method, with a header exception, DENY before ALLOW;
//! - authz-tcp: ALLOW by port, and the HTTP-only-field rules on TCP;
//! - authz-jwt: RequestAuthentication (an invalid token refused with 401,
//!   no token let through), then `requestPrincipals` and a `groups` claim
//!   required, with Istio's demo tokens (`../shared/istio-samples/jwt/`).
//!   The task's `jwksUri` points at GitHub and the tests run offline: its
//!   JWKS (`jwks.json`) is served by `python3 -m http.server` inside the
//!   istiod pod and the task's RequestAuthentication is applied with only
//!   `jwksUri` rewritten to that local URL; ferry-pilot fetches and inlines
//!   it as istiod does.
//!
//! A step counts once every check of it gives the expected result in the
//! same round, twice in a row (a configuration needs a moment to reach the
//! sidecars, and a result that was already right before must stay right).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_tests::istio::{
    App, IstioMesh, Proxy, Step, Workload, http, http_with, pod_yaml, run_steps, service_yaml, tcp,
};

fn tasks() -> Result<PathBuf> {
    ferry_tests::istio_material("istio-samples/istio.io-tasks/security/authz-http")?;
    ferry_tests::istio_material("istio-samples/istio.io-tasks/security")
}

/// Service name → cluster IP, as the objects declare them.
const VIPS: &[(&str, &str)] = &[
    ("productpage", "10.96.2.10"),
    ("details", "10.96.2.20"),
    ("reviews", "10.96.2.30"),
    ("ratings", "10.96.2.40"),
    ("httpbin", "10.96.3.10"),
    ("tcp-echo", "10.96.3.20"),
];

fn vip(host: &str) -> &'static str {
    VIPS.iter()
        .find(|(h, _)| *h == host)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no VIP for {host}"))
}

fn workload(
    name: &'static str,
    namespace: &'static str,
    app: &'static str,
    sa: &'static str,
    runs: App,
) -> Workload {
    Workload {
        name,
        namespace,
        app,
        version: "v1",
        service_account: sa,
        injected: true,
        runs,
    }
}

// ------------------------------------------------------------------ bookinfo

fn bookinfo_workloads() -> Vec<Workload> {
    vec![
        workload(
            "productpage",
            "default",
            "productpage",
            "bookinfo-productpage",
            App::Http(9080),
        ),
        workload(
            "details",
            "default",
            "details",
            "bookinfo-details",
            App::Http(9080),
        ),
        workload(
            "reviews",
            "default",
            "reviews",
            "bookinfo-reviews",
            App::Http(9080),
        ),
        workload(
            "ratings",
            "default",
            "ratings",
            "bookinfo-ratings",
            App::Http(9080),
        ),
        workload("sleep", "default", "sleep", "sleep", App::None),
    ]
}

fn bookinfo_objects(ips: &[(&str, Ipv4Addr)]) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio-injection: enabled}}\n---\n",
    );
    for w in bookinfo_workloads() {
        if w.name != "sleep" {
            out.push_str(&service_yaml(
                w.name,
                "default",
                vip(w.name),
                &[("http", 9080, 9080)],
            ));
        }
        out.push_str(&pod_yaml(ips, w.name, "default", w.app, w.service_account));
    }
    out
}

fn authz_http(proxy: Proxy, tasks: &Path) -> Result<()> {
    let Some(m) = IstioMesh::start(proxy, &bookinfo_workloads(), bookinfo_objects, "24h")? else {
        return Ok(());
    };
    let steps = [
        Step {
            apply: &["01-allow-nothing.yaml"],
            checks: vec![
                http("sleep", "productpage", 9080, "/productpage", 403),
                http("productpage", "details", 9080, "/details/0", 403),
            ],
        },
        Step {
            apply: &[
                "01-allow-nothing.yaml",
                "02-productpage-viewer.yaml",
                "03-bookinfo-gateway-viewer.yaml",
            ],
            checks: vec![
                http("sleep", "productpage", 9080, "/productpage", 200),
                http_with(
                    "sleep",
                    "productpage",
                    9080,
                    "/productpage",
                    &["-X", "POST"],
                    403,
                ),
                http("productpage", "details", 9080, "/details/0", 403),
                http("productpage", "reviews", 9080, "/reviews/0", 403),
            ],
        },
        Step {
            apply: &[
                "01-allow-nothing.yaml",
                "02-productpage-viewer.yaml",
                "03-bookinfo-gateway-viewer.yaml",
                "04-details-viewer.yaml",
                "05-reviews-viewer.yaml",
            ],
            checks: vec![
                http("productpage", "details", 9080, "/details/0", 200),
                http("productpage", "reviews", 9080, "/reviews/0", 200),
                // Only productpage's identity may call them.
                http("sleep", "details", 9080, "/details/0", 403),
                http("reviews", "ratings", 9080, "/ratings/0", 403),
            ],
        },
        Step {
            apply: &[
                "01-allow-nothing.yaml",
                "02-productpage-viewer.yaml",
                "03-bookinfo-gateway-viewer.yaml",
                "04-details-viewer.yaml",
                "05-reviews-viewer.yaml",
                "06-ratings-viewer.yaml",
            ],
            checks: vec![
                http("reviews", "ratings", 9080, "/ratings/0", 200),
                http("productpage", "ratings", 9080, "/ratings/0", 403),
                http_with(
                    "reviews",
                    "ratings",
                    9080,
                    "/ratings/0",
                    &["-X", "POST"],
                    403,
                ),
                http("sleep", "productpage", 9080, "/productpage", 200),
            ],
        },
    ];
    run_steps(&m, &tasks.join("authz-http"), "authz-http", &steps, VIPS)
}

// ----------------------------------------------------- httpbin and tcp-echo

fn foo_workloads() -> Vec<Workload> {
    vec![
        workload("httpbin", "foo", "httpbin", "httpbin", App::Http(80)),
        workload(
            "tcp-echo",
            "foo",
            "tcp-echo",
            "tcp-echo",
            App::TcpEcho(vec![9000, 9001, 9002]),
        ),
        workload("sleep", "foo", "sleep", "sleep", App::None),
    ]
}

fn foo_objects(ips: &[(&str, Ipv4Addr)]) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: foo, labels: {{istio-injection: enabled}}}}\n---\n{}{}{}{}{}",
        service_yaml("httpbin", "foo", vip("httpbin"), &[("http", 8000, 80)]),
        service_yaml(
            "tcp-echo",
            "foo",
            vip("tcp-echo"),
            &[("tcp", 9000, 9000), ("tcp-other", 9001, 9001)]
        ),
        pod_yaml(ips, "httpbin", "foo", "httpbin", "httpbin"),
        pod_yaml(ips, "tcp-echo", "foo", "tcp-echo", "tcp-echo"),
        pod_yaml(ips, "sleep", "foo", "sleep", "sleep"),
    )
}

fn authz_deny_and_tcp(proxy: Proxy, tasks: &Path) -> Result<()> {
    let Some(m) = IstioMesh::start(proxy, &foo_workloads(), foo_objects, "24h")? else {
        return Ok(());
    };
    const ADMIN: &[&str] = &["-H", "x-token: admin"];
    const GUEST: &[&str] = &["-H", "x-token: guest"];
    let deny = [
        Step {
            apply: &[],
            checks: vec![http("sleep", "httpbin", 8000, "/ip", 200)],
        },
        Step {
            apply: &["01-deny-method-get.yaml"],
            checks: vec![
                http("sleep", "httpbin", 8000, "/get", 403),
                http_with("sleep", "httpbin", 8000, "/post", &["-X", "POST"], 200),
            ],
        },
        Step {
            apply: &["02-deny-method-get-unless-admin-token.yaml"],
            checks: vec![
                http_with("sleep", "httpbin", 8000, "/get", ADMIN, 200),
                http_with("sleep", "httpbin", 8000, "/get", GUEST, 403),
            ],
        },
        Step {
            apply: &[
                "02-deny-method-get-unless-admin-token.yaml",
                "03-allow-path-ip.yaml",
            ],
            checks: vec![
                http_with("sleep", "httpbin", 8000, "/ip", GUEST, 403),
                http_with("sleep", "httpbin", 8000, "/ip", ADMIN, 200),
                http_with("sleep", "httpbin", 8000, "/get", ADMIN, 403),
            ],
        },
    ];
    run_steps(&m, &tasks.join("authz-deny"), "authz-deny", &deny, VIPS)?;
    let tcp_steps = [
        Step {
            apply: &[],
            checks: vec![
                tcp("sleep", "tcp-echo", 9000, true),
                tcp("sleep", "tcp-echo", 9001, true),
                tcp("sleep", "pod:tcp-echo", 9002, true),
            ],
        },
        Step {
            apply: &["01-allow-ports-9000-9001.yaml"],
            checks: vec![
                tcp("sleep", "tcp-echo", 9000, true),
                tcp("sleep", "tcp-echo", 9001, true),
                tcp("sleep", "pod:tcp-echo", 9002, false),
            ],
        },
        Step {
            apply: &["02-allow-with-http-only-field.yaml"],
            checks: vec![
                tcp("sleep", "tcp-echo", 9000, false),
                tcp("sleep", "tcp-echo", 9001, false),
            ],
        },
        Step {
            apply: &["03-deny-with-http-only-field.yaml"],
            checks: vec![
                tcp("sleep", "tcp-echo", 9000, false),
                tcp("sleep", "tcp-echo", 9001, false),
            ],
        },
        Step {
            apply: &["04-deny-with-http-only-field-and-port.yaml"],
            checks: vec![
                tcp("sleep", "tcp-echo", 9000, false),
                tcp("sleep", "tcp-echo", 9001, true),
            ],
        },
    ];
    run_steps(&m, &tasks.join("authz-tcp"), "authz-tcp", &tcp_steps, VIPS)
}

// ------------------------------------------------------------------ authz-jwt

/// Where the JWKS server in the istiod pod listens.
const JWKS_PORT: u16 = 18080;

fn authz_jwt(proxy: Proxy, tasks: &Path) -> Result<()> {
    let samples = tasks.join("../../jwt");
    let tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(samples.join("tokens.json"))?)?;
    // The checks take `'static` arguments; a test process leaks these few.
    let bearer = |name: &str| -> Result<&'static [&'static str]> {
        let tok = tokens[name]
            .as_str()
            .with_context(|| format!("tokens.json has no {name}"))?;
        let header: &'static str =
            Box::leak(format!("Authorization: Bearer {tok}").into_boxed_str());
        Ok(Box::leak(vec!["-H", header].into_boxed_slice()))
    };
    let (demo, groups) = (bearer("demo.jwt")?, bearer("groups-scope.jwt")?);
    const INVALID: &[&str] = &["-H", "Authorization: Bearer invalidToken"];
    let Some(m) = IstioMesh::start(proxy, &foo_workloads(), foo_objects, "24h")? else {
        return Ok(());
    };
    // The task's files, the RequestAuthentication pointing at the pod's JWKS server.
    let dir = std::env::temp_dir().join(format!(
        "ferry-authz-jwt-{}-{}",
        std::process::id(),
        m.istiod.ns_name()
    ));
    let web = dir.join("web");
    std::fs::create_dir_all(&web)?;
    std::fs::copy(samples.join("jwks.json"), web.join("jwks.json"))?;
    let task = tasks.join("authz-jwt");
    for f in ["02-require-jwt.yaml", "03-require-jwt-group-claim.yaml"] {
        std::fs::copy(task.join(f), dir.join(f))?;
    }
    let ra = std::fs::read_to_string(task.join("01-request-authentication.yaml"))?;
    let uri = ra
        .lines()
        .find_map(|l| l.trim().strip_prefix("jwksUri:"))
        .context("the task's RequestAuthentication has a jwksUri")?
        .trim()
        .to_string();
    let local = format!("\"http://127.0.0.1:{JWKS_PORT}/jwks.json\"");
    std::fs::write(
        dir.join("01-request-authentication.yaml"),
        ra.replace(&uri, &local),
    )?;
    let _jwks = m
        .istiod
        .cmd("python3")
        .args([
            "-m",
            "http.server",
            &JWKS_PORT.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&web)
        .label("jwks")
        .spawn()?;
    m.istiod.wait_port(JWKS_PORT, Duration::from_secs(20))?;
    let steps = [
        Step {
            apply: &["01-request-authentication.yaml"],
            checks: vec![
                http_with("sleep", "httpbin", 8000, "/headers", INVALID, 401),
                http("sleep", "httpbin", 8000, "/headers", 200),
            ],
        },
        Step {
            apply: &["01-request-authentication.yaml", "02-require-jwt.yaml"],
            checks: vec![
                http_with("sleep", "httpbin", 8000, "/headers", demo, 200),
                http("sleep", "httpbin", 8000, "/headers", 403),
            ],
        },
        Step {
            apply: &[
                "01-request-authentication.yaml",
                "03-require-jwt-group-claim.yaml",
            ],
            checks: vec![
                http_with("sleep", "httpbin", 8000, "/headers", groups, 200),
                http_with("sleep", "httpbin", 8000, "/headers", demo, 403),
            ],
        },
    ];
    let result = run_steps(&m, &dir, "authz-jwt", &steps, VIPS);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn authz_jwt_through_envoy() -> Result<()> {
    let t = tasks()?;
    authz_jwt(Proxy::Envoy, &t)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn authz_jwt_through_ferry() -> Result<()> {
    let t = tasks()?;
    authz_jwt(Proxy::Ferry, &t)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn authz_http_bookinfo_through_envoy() -> Result<()> {
    let t = tasks()?;
    authz_http(Proxy::Envoy, &t)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn authz_http_bookinfo_through_ferry() -> Result<()> {
    let t = tasks()?;
    authz_http(Proxy::Ferry, &t)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn authz_deny_and_tcp_through_envoy() -> Result<()> {
    let t = tasks()?;
    authz_deny_and_tcp(Proxy::Envoy, &t)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn authz_deny_and_tcp_through_ferry() -> Result<()> {
    let t = tasks()?;
    authz_deny_and_tcp(Proxy::Ferry, &t)
}
