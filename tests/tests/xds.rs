//! Ferry under a management server: the configuration a real istiod sent
//! (a captured Istio 1.18 sidecar dump, replayed by `ferry-pilot replay`)
//! over ADS, state of the world and delta, inside a pod with real capture
//! rules. Zero NACKs, `/config_dump` lists what was served, and requests
//! take the routes and clusters the dump says.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, Mesh, Pod, Proc, ferry_bin, workspace_bin};
use ferry_tests::proxy::apps_dir;
use serde_json::{Value, json};

const DUMP: &str = "../../shared/istio-config-dumps/istio-1.18.2-sidecar-hotelreservation-geo.json";
const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";
const RATINGS: &str = "outbound|9080||ratings.default.svc.cluster.local";

fn section<'a>(dump: &'a Value, ty: &str) -> &'a Value {
    dump["configs"]
        .as_array()
        .and_then(|c| {
            c.iter().find(|c| {
                c["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with(&format!(".{ty}")))
            })
        })
        .unwrap_or(&Value::Null)
}

fn names(v: &Value, key: &str, pointer: &str) -> BTreeSet<String> {
    v[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            e.pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

/// The dump with the `reviews` endpoints moved to the app of the test pod
/// (plaintext, on loopback), so a request can really arrive; and with the
/// workload certificate whose key the dump redacts (`[redacted]`, which no
/// proxy could load) replaced by a freshly issued one, as istio-agent would
/// have sent it.
fn dump_for_test(original: &Value) -> Value {
    let mut dump = original.clone();
    let ca = ferry_tests::pki::Ca::new("cluster.local").expect("test CA");
    let leaf = ca
        .leaf("spiffe://cluster.local/ns/default/sa/default", &[])
        .expect("workload certificate");
    if let Some(configs) = dump["configs"].as_array_mut() {
        for c in configs {
            for s in c
                .get_mut("dynamic_active_secrets")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let secret = &mut s["secret"];
                if secret.get("tls_certificate").is_some() {
                    secret["tls_certificate"] = json!({
                        "certificate_chain": {"inline_string": leaf.cert_pem},
                        "private_key": {"inline_string": leaf.key_pem}});
                } else if secret.get("validation_context").is_some() {
                    secret["validation_context"] =
                        json!({"trusted_ca": {"inline_string": ca.pem()}});
                }
            }
            // The listener Envoy rejected is not part of what it ran.
            if let Some(ls) = c.get_mut("dynamic_listeners").and_then(Value::as_array_mut) {
                ls.retain(|l| l.get("active_state").is_some());
            }
            for e in c
                .get_mut("dynamic_endpoint_configs")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if e["endpoint_config"]["cluster_name"] == REVIEWS {
                    e["endpoint_config"]["endpoints"] = json!([{"lb_endpoints": [{"endpoint": {"address":
                        {"socket_address": {"address": "127.0.0.1", "port_value": 9080}}}}]}]);
                }
                // The ratings pod of the dump is not here: its endpoint (still
                // labelled for Istio mTLS) moves to a closed loopback port, so
                // no connection ever leaves the pod.
                if e["endpoint_config"]["cluster_name"] == RATINGS {
                    e["endpoint_config"]["endpoints"] = json!([{"lb_endpoints": [{
                        "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9079}}},
                        "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
                    }]}]);
                }
            }
        }
    }
    dump
}

fn bootstrap(delta: bool) -> String {
    let api = if delta { "DELTA_GRPC" } else { "GRPC" };
    format!(
        r#"node:
  id: sidecar~10.77.0.2~geo-6d8f9c.hotel-res~hotel-res.svc.cluster.local
  cluster: geo.hotel-res
  metadata: {{NAMESPACE: hotel-res, ISTIO_VERSION: 1.18.2}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15010}}}}}}
"#
    )
}

struct Setup {
    pod: Pod,
    _mesh: Mesh,
    sidecar: Proc,
    _pilot: Proc,
    _app: Proc,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    fn curl(&self, args: &[&str]) -> Result<String> {
        Ok(self
            .pod
            .cmd("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args)
            .run()?)
    }

    fn stat(&self, name: &str) -> u64 {
        self.curl(&["http://127.0.0.1:15000/stats"])
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix(&format!("{name}: "))
                        .and_then(|v| v.parse().ok())
                })
            })
            .unwrap_or(0)
    }
}

fn start(delta: bool, dump: &Value) -> Result<Option<Setup>> {
    if !netns::require_root() {
        return Ok(None);
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("geo")?;
    let dir = std::env::temp_dir().join(format!("ferry-xds-{}", pod.ns_name()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let dump_file = dir.join("dump.json");
    std::fs::write(&dump_file, serde_json::to_vec(&dump_for_test(dump))?)?;
    let config = dir.join("bootstrap.yaml");
    std::fs::write(&config, bootstrap(delta))?;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))?;

    let app = pod
        .cmd("python3")
        .arg("-u")
        .arg(apps_dir().join("echo.py"))
        .args(["http", "9080", "reviews"])
        .label("reviews")
        .spawn()?;
    let pilot = pod
        .cmd(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args([
            "replay",
            "--dynamic-only",
            "--listen",
            "127.0.0.1:15010",
            "--dump",
        ])
        .arg(&dump_file)
        .label("pilot")
        .spawn()?;
    pod.wait_port(9080, Duration::from_secs(15))?;
    if let Err(e) = pod.wait_port(15010, Duration::from_secs(30)) {
        bail!("{e}: ferry-pilot: {}", pilot.logs().stderr);
    }
    let out = pod.cmd(ferry_bin()).arg("iptables").output()?;
    ensure!(
        out.status.success(),
        "ferry iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sidecar = pod
        .cmd(ferry_bin())
        .args([
            "sidecar",
            "--concurrency",
            "1",
            "--log-level",
            "info,ferry_proxy=debug",
            "--config",
        ])
        .arg(&config)
        .as_uid(1337)
        .label("sidecar")
        .spawn()?;
    let s = Setup {
        pod,
        _mesh: mesh,
        sidecar,
        _pilot: pilot,
        _app: app,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let code = s.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:15021/healthz/ready",
        ]);
        if code.as_deref().is_ok_and(|c| c == "200") {
            break;
        }
        if Instant::now() > deadline {
            bail!("sidecar not ready: {}", s.sidecar.logs().stderr);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Some(s))
}

fn replayed_istio_dump(delta: bool) -> Result<()> {
    let text = std::fs::read_to_string(ferry_tests::istio_material(
        DUMP.trim_start_matches("../../shared/"),
    )?)?;
    let dump: Value = serde_json::from_str(&text)?;
    let Some(s) = start(delta, &dump)? else {
        return Ok(());
    };

    // Everything istiod sent that Envoy accepted is accepted: no NACK.
    assert_eq!(
        s.stat("xds.update_rejected"),
        0,
        "{}",
        s.sidecar.logs().stderr
    );
    assert!(s.stat("xds.ack") >= 4);

    let ours: Value =
        serde_json::from_str(&s.curl(&["http://127.0.0.1:15000/config_dump?include_eds"])?)?;
    let want_listeners: BTreeSet<String> =
        section(&dump, "ListenersConfigDump")["dynamic_listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l.get("active_state").is_some())
            .filter_map(|l| l["name"].as_str().map(str::to_string))
            .collect();
    let got_listeners = names(
        section(&ours, "ListenersConfigDump"),
        "dynamic_listeners",
        "/name",
    );
    assert_eq!(got_listeners, want_listeners);
    assert_eq!(want_listeners.len(), 140);
    let key = |ty: &str, list: &str, ptr: &str| {
        (
            names(section(&dump, ty), list, ptr),
            names(section(&ours, ty), list, ptr),
        )
    };
    let (want, got) = key(
        "ClustersConfigDump",
        "dynamic_active_clusters",
        "/cluster/name",
    );
    assert_eq!(got, want);
    let (want, got) = key(
        "RoutesConfigDump",
        "dynamic_route_configs",
        "/route_config/name",
    );
    assert_eq!(got, want);
    // Envoy's dump also lists the endpoints of STATIC and ORIGINAL_DST
    // clusters; EDS serves (and Ferry holds) those of the EDS clusters.
    let eds: BTreeSet<String> = section(&dump, "ClustersConfigDump")["dynamic_active_clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["cluster"]["type"] == "EDS")
        .filter_map(|c| {
            let service = c["cluster"]["eds_cluster_config"]["service_name"]
                .as_str()
                .filter(|s| !s.is_empty());
            service
                .or(c["cluster"]["name"].as_str())
                .map(str::to_string)
        })
        .collect();
    let (want, got) = key(
        "EndpointsConfigDump",
        "dynamic_endpoint_configs",
        "/endpoint_config/cluster_name",
    );
    assert_eq!(got, eds);
    assert!(got.is_subset(&want));
    assert_eq!(got.len(), 122);
    let versions =
        section(&ours, "ListenersConfigDump")["dynamic_listeners"][0]["active_state"].clone();
    assert!(
        versions["version_info"].is_string() && versions["last_updated"].is_string(),
        "{versions}"
    );

    // Routing as the dump says: port 9080 → listener 0.0.0.0_9080 → RDS "9080"
    // → virtual host by Host → the reviews cluster (moved to the local app).
    let target = format!("http://{}:9080/reviews/1", s.pod.mesh().gateway());
    let body = s.curl(&[
        "-H",
        "Host: reviews.default.svc.cluster.local:9080",
        &target,
    ])?;
    let v: Value = serde_json::from_str(&body)
        .with_context(|| format!("{body}\n{}", s.sidecar.logs().stderr))?;
    assert_eq!(v["name"], "reviews");
    assert_eq!(s.stat(&format!("cluster.{REVIEWS}.upstream_rq_total")), 1);
    // ratings: same listener and route table, another virtual host; its
    // endpoint wants Istio mTLS and refuses the connection.
    let code = s.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: ratings.default.svc.cluster.local:9080",
        &target,
    ])?;
    assert_eq!(code, "503");
    // The dump's route retries connect failures (twice): each attempt counts.
    let retries = s.stat(&format!("cluster.{RATINGS}.upstream_rq_retry"));
    assert_eq!(
        s.stat(&format!("cluster.{RATINGS}.upstream_rq_total")),
        1 + retries
    );
    assert_eq!(s.stat(&format!("cluster.{REVIEWS}.upstream_rq_total")), 1);
    Ok(())
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn istio_dump_over_state_of_the_world() -> Result<()> {
    replayed_istio_dump(false)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn istio_dump_over_delta() -> Result<()> {
    replayed_istio_dump(true)
}
