//! Configuration updates over xDS while traffic flows: a management server
//! in this process (ferry-pilot's ADS server) pushes changes to a running
//! Ferry. Good updates apply without failing a request or resetting a
//! connection of an unchanged listener; bad ones are NACKed with a reason
//! naming the resource and field while the last good configuration serves.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use ferry_envoy_json::Descriptors;
use ferry_pilot::xds::{CLUSTER, Cache, ENDPOINT, LISTENER, ROUTE, Server, to_any};
use ferry_tests::netns::workspace_bin;
use ferry_tests::proxy::{Ferry, free_port};
use serde_json::{Value, json};

const NODE: &str = "sidecar~127.0.0.1~updates.test~test.svc.cluster.local";

fn listener(d: &Descriptors, name: &str, port: u16, stat_prefix: &str) -> Any {
    let v = json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": stat_prefix,
                "rds": {"route_config_name": format!("{name}-routes"), "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        }]}]
    });
    to_any(
        &d.from_json::<Listener>("envoy.config.listener.v3.Listener", v)
            .expect("listener"),
    )
}

fn routes(d: &Descriptors, name: &str, cluster: &str, header: &str) -> Any {
    let v = json!({
        "name": name,
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"},
            "route": {"cluster": cluster, "timeout": "5s"},
            "request_headers_to_add": [{"header": {"key": "x-config", "value": header}}]
        }]}]
    });
    to_any(
        &d.from_json::<RouteConfiguration>("envoy.config.route.v3.RouteConfiguration", v)
            .expect("routes"),
    )
}

fn cluster(d: &Descriptors, name: &str, connect_ms: u64) -> Any {
    let v = json!({
        "name": name, "type": "EDS", "connect_timeout": format!("{}s", connect_ms as f64 / 1000.0),
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
    });
    to_any(
        &d.from_json::<Cluster>("envoy.config.cluster.v3.Cluster", v)
            .expect("cluster"),
    )
}

fn endpoints(d: &Descriptors, name: &str, ports: &[u16]) -> Any {
    let eps: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    let v = json!({"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]});
    to_any(
        &d.from_json::<ClusterLoadAssignment>("envoy.config.endpoint.v3.ClusterLoadAssignment", v)
            .expect("cla"),
    )
}

fn bootstrap(xds_port: u16, admin_port: u16, delta: bool) -> String {
    let api = if delta { "DELTA_GRPC" } else { "GRPC" };
    format!(
        r#"node: {{id: "{NODE}", cluster: updates}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
dynamic_resources:
  ads_config: {{api_type: {api}, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}}}]}}]
"#
    )
}

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backend(port: u16) -> Result<Backend> {
    let child = Command::new(workspace_bin("bench-backend", "ferry-benches"))
        .args([
            "--mode",
            "http",
            "--threads",
            "1",
            "--addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("bench-backend (cargo build -p ferry-benches)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "bench-backend did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Backend(child))
}

struct Plane {
    rt: tokio::runtime::Runtime,
    server: Server,
    port: u16,
}

fn plane(cache: Cache) -> Result<Plane> {
    plane_on(cache, 0)
}

/// A management server on `port` (0: any free port).
fn plane_on(cache: Cache, port: u16) -> Result<Plane> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let std_listener = StdListener::bind(("127.0.0.1", port))?;
    std_listener.set_nonblocking(true)?;
    let port = std_listener.local_addr()?.port();
    let server = Server::new(cache);
    let s = server.clone();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        let _ = s.serve(l, std::future::pending()).await;
    });
    Ok(Plane { rt, server, port })
}

fn get(port: u16) -> Result<(u16, String)> {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, text))
}

fn wrk(port: u16, seconds: u64) -> Result<Child> {
    Command::new("wrk")
        .args([
            "-t",
            "1",
            "-c",
            "8",
            "-d",
            &format!("{seconds}s"),
            "--latency",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("wrk (apt-get install wrk)")
}

/// wrk's summary: (requests, errors of any kind, non-2xx responses).
fn wrk_result(child: Child) -> Result<(u64, String)> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let requests = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    Ok((requests, text))
}

fn start_ferry(plane: &Plane, delta: bool) -> Result<(Ferry, u16)> {
    // The harness chooses the admin port (--admin-addr wins over the bootstrap's).
    let ferry = Ferry::spawn(
        &bootstrap(plane.port, free_port(), delta),
        &["--drain-timeout", "2s", "--concurrency", "1"],
    )?;
    let admin = ferry.admin_port();
    Ok((ferry, admin))
}

fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_err() {
        if Instant::now() > deadline {
            bail!("port {port} never listened");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn hot_swap(delta: bool) -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let (b1, b2) = (free_port(), free_port());
    let _backends = (backend(b1)?, backend(b2)?);
    let (changing, steady) = (free_port(), free_port());
    let cache = Cache::new();
    cache.set(
        LISTENER,
        [
            (
                "changing".to_string(),
                listener(&d, "changing", changing, "changing_v0"),
            ),
            (
                "steady".to_string(),
                listener(&d, "steady", steady, "steady"),
            ),
        ],
    );
    cache.set(
        ROUTE,
        [
            (
                "changing-routes".to_string(),
                routes(&d, "changing-routes", "backend", "0"),
            ),
            (
                "steady-routes".to_string(),
                routes(&d, "steady-routes", "backend", "steady"),
            ),
        ],
    );
    cache.set(
        CLUSTER,
        [("backend".to_string(), cluster(&d, "backend", 1000))],
    );
    cache.set(
        ENDPOINT,
        [("backend".to_string(), endpoints(&d, "backend", &[b1]))],
    );
    let plane = plane(cache)?;
    let (ferry, _admin) = start_ferry(&plane, delta)?;
    wait_listening(changing)?;
    wait_listening(steady)?;
    ensure!(
        get(changing)?.0 == 200,
        "no 200 before the pushes: {}",
        ferry.log()
    );

    let load_changing = wrk(changing, 8)?;
    let load_steady = wrk(steady, 8)?;
    std::thread::sleep(Duration::from_millis(500));
    let steady_key = format!("listener.127.0.0.1_{steady}.downstream_cx_total");
    let accepted_before = ferry.stat(&steady_key);
    let cache = plane.server.cache();
    for i in 1..=100u64 {
        match i % 4 {
            0 => {
                cache.apply(
                    ROUTE,
                    [(
                        "changing-routes".to_string(),
                        routes(&d, "changing-routes", "backend", &i.to_string()),
                    )],
                    [],
                );
            }
            1 => {
                cache.apply(
                    CLUSTER,
                    [("backend".to_string(), cluster(&d, "backend", 1000 + i))],
                    [],
                );
            }
            2 => {
                let eps: &[u16] = if i % 8 == 2 { &[b1, b2] } else { &[b2] };
                cache.apply(
                    ENDPOINT,
                    [("backend".to_string(), endpoints(&d, "backend", eps))],
                    [],
                );
            }
            _ => {
                // The `changing` listener is replaced; `steady` never is.
                let l = listener(&d, "changing", changing, &format!("changing_v{i}"));
                cache.apply(LISTENER, [("changing".to_string(), l)], []);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (n_changing, out_changing) = wrk_result(load_changing)?;
    let (n_steady, out_steady) = wrk_result(load_steady)?;
    for (name, n, out) in [
        ("changing", n_changing, &out_changing),
        ("steady", n_steady, &out_steady),
    ] {
        assert!(n > 500, "{name}: only {n} requests:\n{out}");
        assert!(
            !out.contains("Socket errors"),
            "{name} listener saw socket errors:\n{out}"
        );
        assert!(
            !out.contains("Non-2xx"),
            "{name} listener saw failed requests:\n{out}"
        );
    }
    // The steady listener's connections lived through every push: none was
    // opened again while the updates went on.
    let accepted = ferry.stat(&steady_key);
    assert!(accepted_before >= 8, "{accepted_before}");
    assert_eq!(
        accepted, accepted_before,
        "steady listener connections were re-established"
    );
    assert_eq!(ferry.stat("xds.update_rejected"), 0, "{}", ferry.log());
    // The listener really was replaced under load: its first and last
    // versions both served requests.
    assert!(ferry.stat("http.changing_v0.downstream_rq_total") > 0);
    assert!(
        ferry.stat("http.changing_v99.downstream_rq_total") > 0,
        "{}",
        ferry.log()
    );
    let (code, _) = get(changing)?;
    assert_eq!(code, 200);
    drop(plane);
    Ok(())
}

#[test]
fn hot_swap_under_load_sotw() -> Result<()> {
    hot_swap(false)
}

#[test]
fn hot_swap_under_load_delta() -> Result<()> {
    hot_swap(true)
}

/// Pushes `bad` for `type_url`, expects a NACK whose reason contains every
/// `needles`, and checks the previous configuration still answers.
fn expect_nack(
    plane: &Plane,
    ferry: &Ferry,
    port: u16,
    type_url: &str,
    bad: (String, Any),
    needles: &[&str],
) -> Result<()> {
    let before = ferry.stat("xds.update_rejected");
    plane.server.cache().apply(type_url, [bad], []);
    let nack = plane
        .rt
        .block_on(plane.server.wait_for(Duration::from_secs(10), |streams| {
            streams
                .iter()
                .filter_map(|s| s.types.get(type_url))
                .filter_map(|t| t.last_nack.clone())
                .find(|n| needles.iter().all(|x| n.message.contains(x)))
        }))
        .map_err(|e| {
            anyhow::anyhow!(
                "no NACK for {type_url} containing {needles:?}: {e}\n{}",
                ferry.log()
            )
        })?;
    assert_eq!(nack.code, 3, "INVALID_ARGUMENT");
    assert!(ferry.stat("xds.update_rejected") > before);
    let (code, head) = get(port)?;
    assert_eq!(
        code, 200,
        "the last good configuration must keep serving: {head}"
    );
    assert!(head.to_ascii_lowercase().contains("x-served-by") || code == 200);
    Ok(())
}

fn bad_updates(delta: bool) -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let b1 = free_port();
    let _backend = backend(b1)?;
    let port = free_port();
    let cache = Cache::new();
    cache.set(
        LISTENER,
        [("web".to_string(), listener(&d, "web", port, "web"))],
    );
    cache.set(
        ROUTE,
        [(
            "web-routes".to_string(),
            routes(&d, "web-routes", "backend", "good"),
        )],
    );
    cache.set(
        CLUSTER,
        [("backend".to_string(), cluster(&d, "backend", 1000))],
    );
    cache.set(
        ENDPOINT,
        [("backend".to_string(), endpoints(&d, "backend", &[b1]))],
    );
    let plane = plane(cache)?;
    let (ferry, admin) = start_ferry(&plane, delta)?;
    wait_listening(port)?;
    ensure!(get(port)?.0 == 200, "{}", ferry.log());

    // An invalid regex in a route.
    let v = json!({"name": "web-routes", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"safe_regex": {"regex": "/(unclosed"}}, "route": {"cluster": "backend"}}]}]});
    let rc: RouteConfiguration = d
        .from_json("envoy.config.route.v3.RouteConfiguration", v)
        .map_err(anyhow::Error::msg)?;
    expect_nack(
        &plane,
        &ferry,
        port,
        ROUTE,
        ("web-routes".into(), to_any(&rc)),
        &[
            "route_configuration \"web-routes\"",
            "routes[0].match.safe_regex.regex",
            "invalid regex",
        ],
    )?;

    // An unknown filter that is not optional.
    let v = json!({"name": "web", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.redis_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy", "stat_prefix": "r"}}]}]});
    let l: Listener = d
        .from_json("envoy.config.listener.v3.Listener", v)
        .map_err(anyhow::Error::msg)?;
    expect_nack(
        &plane,
        &ferry,
        port,
        LISTENER,
        ("web".into(), to_any(&l)),
        &[
            "listener \"web\"",
            "filter_chains[0].filters[0].typed_config",
            "unsupported network filter",
        ],
    )?;

    // A malformed resource: bytes that are no Cluster.
    let garbage = Any {
        type_url: CLUSTER.to_string(),
        value: vec![0xff, 0xff, 0xff, 0x0f, 0x01],
    };
    expect_nack(
        &plane,
        &ferry,
        port,
        CLUSTER,
        ("backend".into(), garbage),
        &["cannot decode"],
    )?;

    // A dangling reference the route table asks to validate.
    let v = json!({"name": "web-routes", "validate_clusters": true, "virtual_hosts": [{"name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nowhere"}}]}]});
    let rc: RouteConfiguration = d
        .from_json("envoy.config.route.v3.RouteConfiguration", v)
        .map_err(anyhow::Error::msg)?;
    expect_nack(
        &plane,
        &ferry,
        port,
        ROUTE,
        ("web-routes".into(), to_any(&rc)),
        &[
            "route_configuration \"web-routes\"",
            "unknown cluster \"nowhere\"",
        ],
    )?;

    // /config_dump reports the last rejection of each type.
    let dump = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{admin}/config_dump")])
        .output()?;
    let dump: Value = serde_json::from_slice(&dump.stdout)?;
    let listeners = dump["configs"]
        .as_array()
        .and_then(|c| {
            c.iter().find(|c| {
                c["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("ListenersConfigDump"))
            })
        })
        .cloned()
        .unwrap_or_default();
    let errors: Vec<&Value> = listeners["dynamic_listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l.get("error_state").is_some())
        .collect();
    assert_eq!(errors.len(), 1, "{listeners}");
    assert_eq!(errors[0]["name"], "web");
    assert!(
        errors[0]["error_state"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("redis_proxy"))
    );

    // A good update after all that is accepted and serves.
    plane.server.cache().apply(
        ROUTE,
        [(
            "web-routes".to_string(),
            routes(&d, "web-routes", "backend", "fixed"),
        )],
        [],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while ferry.stat("xds.ack") == 0 || get(port)?.0 != 200 {
        ensure!(Instant::now() < deadline, "{}", ferry.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn bad_updates_are_nacked_and_the_last_good_config_serves_sotw() -> Result<()> {
    bad_updates(false)
}

#[test]
fn bad_updates_are_nacked_and_the_last_good_config_serves_delta() -> Result<()> {
    bad_updates(true)
}

fn direct_routes(d: &Descriptors, name: &str, body: &str) -> Any {
    let v = json!({"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]});
    to_any(
        &d.from_json::<RouteConfiguration>("envoy.config.route.v3.RouteConfiguration", v)
            .expect("routes"),
    )
}

fn body(port: u16) -> String {
    Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The management server goes away and comes back: Ferry keeps serving the
/// last configuration meanwhile, reconnects with backoff, and resumes; over
/// delta it tells the server what it has, so unchanged resources are not
/// sent again.
fn reconnect(delta: bool) -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let port = free_port();
    let fill = |cache: &Cache, body: &str| {
        cache.set(
            LISTENER,
            [("web".to_string(), listener(&d, "web", port, "web"))],
        );
        cache.set(
            ROUTE,
            [(
                "web-routes".to_string(),
                direct_routes(&d, "web-routes", body),
            )],
        );
        cache.set(
            CLUSTER,
            [("backend".to_string(), cluster(&d, "backend", 1000))],
        );
        cache.set(
            ENDPOINT,
            [("backend".to_string(), endpoints(&d, "backend", &[9]))],
        );
    };
    let first = Cache::new();
    fill(&first, "before");
    let plane1 = plane(first)?;
    let xds_port = plane1.port;
    let (ferry, _) = start_ferry(&plane1, delta)?;
    wait_listening(port)?;
    assert_eq!(body(port), "before");

    drop(plane1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        body(port),
        "before",
        "the last configuration keeps serving without a server"
    );
    assert!(ferry.stat("xds.reconnect") >= 1);

    let second = Cache::new();
    fill(&second, "after");
    let plane2 = plane_on(second, xds_port)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while body(port) != "after" {
        ensure!(Instant::now() < deadline, "no resumption: {}", ferry.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = plane2.server.status();
    let cds = status
        .iter()
        .rev()
        .find_map(|s| s.types.get(CLUSTER).cloned())
        .context("no CDS status")?;
    if delta {
        // The cluster did not change: the resumed stream did not carry it.
        assert_eq!(cds.sent_resources, 0, "{cds:?}");
    } else {
        assert_eq!(cds.sent_resources, 1, "{cds:?}");
    }
    assert_eq!(ferry.stat("xds.update_rejected"), 0);
    Ok(())
}

#[test]
fn reconnects_and_resumes_sotw() -> Result<()> {
    reconnect(false)
}

#[test]
fn reconnects_and_resumes_delta() -> Result<()> {
    reconnect(true)
}

/// The xDS server on a Unix socket, as istio-agent serves it to Envoy.
#[test]
fn xds_over_a_unix_socket() -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let port = free_port();
    let cache = Cache::new();
    cache.set(
        LISTENER,
        [("web".to_string(), listener(&d, "web", port, "web"))],
    );
    cache.set(
        ROUTE,
        [(
            "web-routes".to_string(),
            direct_routes(&d, "web-routes", "over uds"),
        )],
    );
    let dir = std::env::temp_dir().join(format!("ferry-uds-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("XDS");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = Server::new(cache);
    let uds = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&sock)?
    };
    let svc = server.ads_service();
    rt.spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(uds);
        let _ = tonic::transport::Server::builder()
            .serve_with_incoming(svc, incoming)
            .await;
    });
    let config = format!(
        r#"node: {{id: "{NODE}", cluster: updates}}
dynamic_resources:
  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{}"}}}}}}}}]}}]
"#,
        sock.display()
    );
    let ferry = Ferry::spawn(&config, &["--concurrency", "1"])?;
    wait_listening(port)?;
    assert_eq!(body(port), "over uds", "{}", ferry.log());
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
