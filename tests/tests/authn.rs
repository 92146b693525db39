//! The istio.io authentication-policy task (PeerAuthentication and the mTLS
//! matrix) end to end, through Envoy sidecars and through Ferry sidecars:
//! namespaces `foo` and `bar` with sidecars, `legacy` without, httpbin and
//! sleep in each; every client calls every httpbin after each of the
//! task's files (`../shared/istio-samples/istio.io-tasks/security/
//! authn-policy/`, applied as they are) and gets what `expectations.yaml`
//! says: 200, or a reset where STRICT meets plaintext. Auto mTLS is
//! checked too: the caller's identity reaches a sidecar'd httpbin in
//! `x-forwarded-client-cert`, and nothing of the kind reaches the legacy one.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use ferry_tests::istio::{
    App, Check, IstioMesh, Proxy, Step, Workload, curl, echo_header, http, pod_yaml, run_steps,
    service_yaml,
};

const NAMESPACES: [&str; 3] = ["foo", "bar", "legacy"];

const VIPS: &[(&str, &str)] = &[
    ("httpbin.foo", "10.96.4.10"),
    ("httpbin.bar", "10.96.4.20"),
    ("httpbin.legacy", "10.96.4.30"),
];

fn task_dir() -> Result<PathBuf> {
    ferry_tests::istio_material("istio-samples/istio.io-tasks/security/authn-policy")
}

fn workloads() -> Vec<Workload> {
    let mut out = Vec::new();
    for (ns, httpbin, sleep) in [
        ("foo", "httpbin-foo", "sleep-foo"),
        ("bar", "httpbin-bar", "sleep-bar"),
        ("legacy", "httpbin-legacy", "sleep-legacy"),
    ] {
        let injected = ns != "legacy";
        out.push(Workload {
            name: httpbin,
            namespace: ns,
            app: "httpbin",
            version: "v1",
            service_account: "httpbin",
            injected,
            runs: App::Http(80),
        });
        out.push(Workload {
            name: sleep,
            namespace: ns,
            app: "sleep",
            version: "v1",
            service_account: "sleep",
            injected,
            runs: App::None,
        });
    }
    out
}

fn objects(ips: &[(&str, Ipv4Addr)]) -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        let inject = if ns == "legacy" {
            ""
        } else {
            ", labels: {istio-injection: enabled}"
        };
        out.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}{inject}}}\n---\n"
        ));
        let vip = VIPS
            .iter()
            .find(|(h, _)| *h == format!("httpbin.{ns}"))
            .map_or("", |(_, v)| *v);
        out.push_str(&service_yaml("httpbin", ns, vip, &[("http", 8000, 80)]));
        out.push_str(&pod_yaml(
            ips,
            &format!("httpbin-{ns}"),
            ns,
            "httpbin",
            "httpbin",
        ));
        out.push_str(&pod_yaml(ips, &format!("sleep-{ns}"), ns, "sleep", "sleep"));
    }
    out
}

/// `GET /ip` from sleep in `from` to httpbin in `to`: through the Service
/// from a sidecar, to the pod itself from legacy (kube-proxy's choice).
fn call(from: &str, to: &str, status: u16) -> Check {
    let client = format!("sleep-{from}");
    if from == "legacy" {
        http(&client, &format!("pod:httpbin-{to}"), 80, "/ip", status)
    } else {
        http(&client, &format!("httpbin.{to}"), 8000, "/ip", status)
    }
}

/// The whole matrix: 200 everywhere but the `(from, to)` pairs reset.
fn matrix(reset: &[(&str, &str)]) -> Vec<Check> {
    let mut out = Vec::new();
    for from in NAMESPACES {
        for to in NAMESPACES {
            let status = if reset.contains(&(from, to)) { 0 } else { 200 };
            out.push(call(from, to, status));
        }
    }
    out
}

/// The caller identity the app saw in `x-forwarded-client-cert`, if any.
fn xfcc(m: &IstioMesh, from: &str, to: &str) -> Result<Option<String>> {
    let host = format!("httpbin.{to}");
    let vip = VIPS
        .iter()
        .find(|(h, _)| *h == host)
        .map(|(_, v)| *v)
        .context("vip")?;
    let resolve = format!("{host}:8000:{vip}");
    let (code, body) = curl(
        m.pod(&format!("sleep-{from}")),
        &format!("http://{host}:8000/headers"),
        &["--resolve", &resolve],
    )?;
    ensure!(code == 200, "sleep.{from} -> httpbin.{to}: {code} {body}");
    echo_header(&body, "x-forwarded-client-cert")
}

fn authn_policy(proxy: Proxy) -> Result<()> {
    let dir = task_dir()?;
    let Some(m) = IstioMesh::start(proxy, &workloads(), objects, "24h")? else {
        return Ok(());
    };
    run_steps(
        &m,
        &dir,
        "authn-policy",
        &[Step {
            apply: &[],
            checks: matrix(&[]),
        }],
        VIPS,
    )?;
    // Auto mTLS between sidecars, plaintext to the legacy workload.
    let id = xfcc(&m, "foo", "foo")?.unwrap_or_default();
    ensure!(
        id.contains("By=spiffe://cluster.local/ns/foo/sa/httpbin")
            && id.contains("URI=spiffe://cluster.local/ns/foo/sa/sleep"),
        "{proxy:?}: XFCC from sleep.foo to httpbin.foo is {id:?}"
    );
    let legacy = xfcc(&m, "foo", "legacy")?;
    ensure!(
        legacy.is_none(),
        "{proxy:?}: plaintext to legacy carried XFCC {legacy:?}"
    );

    let steps = [
        Step {
            apply: &["01-mesh-wide-strict.yaml"],
            checks: matrix(&[("legacy", "foo"), ("legacy", "bar")]),
        },
        Step {
            apply: &["02-namespace-foo-strict.yaml"],
            checks: matrix(&[("legacy", "foo")]),
        },
        Step {
            apply: &[
                "02-namespace-foo-strict.yaml",
                "03-workload-httpbin-bar-strict.yaml",
            ],
            checks: matrix(&[("legacy", "foo"), ("legacy", "bar")]),
        },
        Step {
            apply: &[
                "02-namespace-foo-strict.yaml",
                "04-workload-httpbin-bar-strict-port80-disable.yaml",
            ],
            checks: matrix(&[("legacy", "foo")]),
        },
        Step {
            apply: &[
                "02-namespace-foo-strict.yaml",
                "04-workload-httpbin-bar-strict-port80-disable.yaml",
                "05-overwrite-example-disable.yaml",
            ],
            checks: vec![call("legacy", "foo", 200)],
        },
    ];
    run_steps(&m, &dir, "authn-policy", &steps, VIPS)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn peer_authentication_matrix_through_envoy() -> Result<()> {
    authn_policy(Proxy::Envoy)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn peer_authentication_matrix_through_ferry() -> Result<()> {
    authn_policy(Proxy::Ferry)
}
