//! ferry-pilot in ambient mode (`PILOT_ENABLE_AMBIENT=true`, as istiod is
//! switched) feeding sidecars in the netns bed: an HBONE-native pod (an
//! [`HboneServer`] on its IP's port 15008, standing for ztunnel; labelled
//! `istio.io/dataplane-mode: ambient`) behind the Service `echo`, and two
//! client pods with capture rules, one with a Ferry sidecar and one with
//! Envoy 1.40. Both reach the pod only through what ferry-pilot sent: the
//! EDS endpoint is an internal address to `connect_originate`, which
//! tunnels over mutual TLS 1.3 / HTTP/2 CONNECT to `podIP:15008` with
//! `:authority` the pod's `ip:target port`. The HBONE server's certificate
//! comes from the mesh CA ferry-pilot issues from, so each side checks the
//! other as in a real mesh; the server reports the caller's SPIFFE identity
//! (the workload certificate the sidecar got from ferry-pilot). Envoy must
//! have ACKed everything (no rejected update in its stats).
//!
//! The HBONE pods sit on another node than their callers (a segment of its
//! own, routed), as in ztunnel's network-namespace tests, which these
//! mirror: captured client and server across two nodes, a service's calls
//! spread over its HBONE pods, an authority IP that is not the pod's and a
//! peer of another trust domain refused, an AuthorizationPolicy on the
//! HBONE peer's identity, CONNECTs aimed at the proxy's own ports or at
//! loopback answered with nothing (`malicious_calls_inpod`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::hbone::{End, Expect, HboneCall, HboneServer, HboneTunnel, Outcome};
use ferry_tests::istio::{App, IstioMesh, PilotSetup, Proxy, Workload, pod_yaml, service_yaml};
use ferry_tests::pki::Ca;

const ECHO_VIP: &str = "10.96.2.20";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

fn workload(name: &'static str, app: &'static str, injected: bool) -> Workload {
    Workload {
        name,
        namespace: "default",
        app,
        version: "v1",
        service_account: name,
        injected,
        runs: App::None,
    }
}

fn workloads() -> Vec<Workload> {
    vec![
        workload("echo", "echo", false),
        workload("sleep-ferry", "sleep-ferry", true),
        workload("sleep-envoy", "sleep-envoy", true),
    ]
}

fn objects(ips: &[(&str, Ipv4Addr)]) -> String {
    objects_with(ips, "echo", "istio.io/dataplane-mode: ambient", ECHO_VIP)
}

/// The pod `server` (with the extra `label`) behind a Service of its name
/// at `vip`, and the two client pods.
fn objects_with(ips: &[(&str, Ipv4Addr)], server: &str, label: &str, vip: &str) -> String {
    let ip = ips
        .iter()
        .find(|(n, _)| *n == server)
        .map(|(_, ip)| ip.to_string())
        .unwrap_or_default();
    let mut out = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {server}, namespace: default, \
         labels: {{app: {server}, version: v1, {label}}}}}\n\
         spec: {{serviceAccountName: {server}, containers: [{{name: app, image: app}}]}}\n\
         status: {{podIP: {ip}}}\n---\n"
    );
    out.push_str(&service_yaml(
        server,
        "default",
        vip,
        &[("tcp", SERVICE_PORT, TARGET_PORT)],
    ));
    for name in ["sleep-ferry", "sleep-envoy"] {
        out.push_str(&pod_yaml(ips, name, "default", name, name));
    }
    out
}

/// One TCP exchange from inside `pod` to the service (captured by its
/// sidecar): `line` sent, the sending side closed, everything read.
fn exchange(m: &IstioMesh, pod: &str, line: &str) -> Result<String> {
    let vip: Ipv4Addr = ECHO_VIP.parse()?;
    m.pod(pod).enter(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((vip, SERVICE_PORT)),
            Duration::from_secs(3),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(line.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut got = String::new();
        s.read_to_string(&mut got)?;
        Ok(got)
    })?
}

/// A mesh root whose certificate and key ferry-pilot is given, so the
/// test's own HBONE parties hold certificates of the same mesh.
fn mesh_ca() -> Result<(Ca, ferry_tests::proxy::TempDir, PathBuf, PathBuf)> {
    let ca = Ca::new("mesh root")?;
    let dir = ferry_tests::proxy::TempDir::new("ambient-ca")?;
    let (cert, key) = (
        dir.path().join("ca-cert.pem"),
        dir.path().join("ca-key.pem"),
    );
    std::fs::write(&cert, ca.pem())?;
    std::fs::write(&key, ca.key_pem())?;
    Ok((ca, dir, cert, key))
}

#[test]
fn ferry_and_envoy_sidecars_reach_an_ambient_pod_through_connect_originate() -> Result<()> {
    let (ca, _dir, cert, key) = mesh_ca()?;
    let proxy_of = |w: &Workload| {
        if w.name == "sleep-envoy" {
            Proxy::Envoy
        } else {
            Proxy::Ferry
        }
    };
    let setup = PilotSetup {
        env: vec![("PILOT_ENABLE_AMBIENT", "true")],
        ca: Some((cert, key)),
        // The ambient pod on another node than its callers.
        nodes: vec![("echo", 1)],
        ..Default::default()
    };
    let Some(m) =
        IstioMesh::start_with(Proxy::Ferry, proxy_of, &workloads(), objects, "24h", setup)?
    else {
        return Ok(());
    };
    let echo = m.pod("echo");
    ensure!(echo.node() != m.pod("sleep-ferry").node(), "two nodes");
    let echo_ip = echo.ip();
    let leaf = ca.leaf("spiffe://cluster.local/ns/default/sa/echo", &[])?;
    let server =
        echo.enter(|| HboneServer::start(SocketAddr::from((echo_ip, 15008)), &ca.pem(), &leaf))??;

    let authority = format!("{echo_ip}:{TARGET_PORT}");
    for (n, client) in ["sleep-ferry", "sleep-envoy"].into_iter().enumerate() {
        let identity = format!("spiffe://cluster.local/ns/default/sa/{client}");
        let line = format!("ping from {client}\nand more\n");
        // The sidecar may still be taking its configuration.
        let got = m.until(
            &format!("{client} reaches the ambient pod"),
            Duration::from_secs(20),
            || Ok(exchange(&m, client, &line).unwrap_or_else(|e| format!("error: {e:#}"))),
            |got| got.starts_with("hbone "),
        )?;
        assert_eq!(
            got,
            format!("hbone {authority} from {identity}\n{line}"),
            "{client}: tunnelled to the pod's target port as its own identity, echoed to the end"
        );
        let seen = server.seen();
        let last = seen.last().context("the HBONE server saw nothing")?;
        assert_eq!(
            (last.authority.as_str(), last.peer.as_str(), last.status),
            (authority.as_str(), identity.as_str(), 200),
            "{client}: {seen:?}"
        );
        // One TLS connection per client sidecar (pooled for the pod).
        assert!(
            seen.iter()
                .filter(|s| s.peer == identity)
                .all(|s| s.connection == last.connection),
            "{client}: {seen:?}"
        );
        assert_eq!(
            seen.iter().map(|s| s.connection).max(),
            Some(n as u64 + 1),
            "{seen:?}"
        );
    }
    // Envoy took everything it was sent.
    let stats = m
        .pod("sleep-envoy")
        .http_get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 15000)),
            "localhost",
            "/stats",
            &[],
        )
        .context("Envoy's stats")?
        .body;
    let rejected: Vec<&str> = stats
        .lines()
        .filter(|l| l.contains("update_rejected") && !l.ends_with(": 0"))
        .collect();
    ensure!(rejected.is_empty(), "Envoy rejected: {rejected:?}");
    ensure!(
        stats.contains("cluster.connect_originate;.upstream_cx_total: 1"),
        "Envoy's HBONE connection is counted under istiod's alt_stat_name"
    );
    Ok(())
}

/// ztunnel's `service_loadbalancing`: a Service whose two pods are
/// HBONE-native, on another node than the callers. Each client sidecar
/// spreads its calls over both (one pooled HBONE connection per pod), every
/// call tunnelled to the chosen pod's own `ip:target port`.
#[test]
fn ferry_and_envoy_sidecars_spread_calls_over_a_services_hbone_pods() -> Result<()> {
    let (ca, _dir, cert, key) = mesh_ca()?;
    let proxy_of = |w: &Workload| {
        if w.name == "sleep-envoy" {
            Proxy::Envoy
        } else {
            Proxy::Ferry
        }
    };
    let mut workloads = workloads();
    workloads.retain(|w| w.name != "echo");
    workloads.push(workload("echo-a", "echo", false));
    workloads.push(workload("echo-b", "echo", false));
    let objects = |ips: &[(&str, Ipv4Addr)]| {
        let mut out = String::new();
        for name in ["echo-a", "echo-b"] {
            let ip = ips
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, ip)| ip.to_string())
                .unwrap_or_default();
            out.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, \
                 labels: {{app: echo, version: v1, istio.io/dataplane-mode: ambient}}}}\n\
                 spec: {{serviceAccountName: echo, containers: [{{name: app, image: app}}]}}\n\
                 status: {{podIP: {ip}}}\n---\n"
            ));
        }
        out.push_str(&service_yaml(
            "echo",
            "default",
            ECHO_VIP,
            &[("tcp", SERVICE_PORT, TARGET_PORT)],
        ));
        for name in ["sleep-ferry", "sleep-envoy"] {
            out.push_str(&pod_yaml(ips, name, "default", name, name));
        }
        out
    };
    let setup = PilotSetup {
        env: vec![("PILOT_ENABLE_AMBIENT", "true")],
        ca: Some((cert, key)),
        nodes: vec![("echo-a", 1), ("echo-b", 1)],
        ..Default::default()
    };
    let Some(m) = IstioMesh::start_with(Proxy::Ferry, proxy_of, &workloads, objects, "24h", setup)?
    else {
        return Ok(());
    };
    let leaf = ca.leaf("spiffe://cluster.local/ns/default/sa/echo", &[])?;
    let mut servers = Vec::new();
    for name in ["echo-a", "echo-b"] {
        let pod = m.pod(name);
        let ip = pod.ip();
        servers.push(
            pod.enter(|| HboneServer::start(SocketAddr::from((ip, 15008)), &ca.pem(), &leaf))??,
        );
    }
    let pods: Vec<Ipv4Addr> = ["echo-a", "echo-b"].map(|n| m.pod(n).ip()).to_vec();
    const CALLS: usize = 16;
    for client in ["sleep-ferry", "sleep-envoy"] {
        let identity = format!("spiffe://cluster.local/ns/default/sa/{client}");
        // Until the sidecar has both endpoints.
        m.until(
            &format!("{client} reaches the service"),
            Duration::from_secs(20),
            || Ok(exchange(&m, client, "x\n").unwrap_or_else(|e| format!("error: {e:#}"))),
            |got| got.starts_with("hbone "),
        )?;
        let mut reached = Vec::new();
        for n in 0..CALLS {
            let line = format!("call {n} from {client}\n");
            let got = exchange(&m, client, &line)?;
            let pod = pods
                .iter()
                .find(|ip| got == format!("hbone {ip}:{TARGET_PORT} from {identity}\n{line}"))
                .with_context(|| format!("{client}: {got:?}"))?;
            reached.push(*pod);
        }
        for ip in &pods {
            ensure!(
                reached.contains(ip),
                "{client}: {ip} never reached in {CALLS} calls: {reached:?}"
            );
        }
        // Each pod saw this client's calls on one connection of its own.
        for (server, ip) in servers.iter().zip(&pods) {
            let seen: Vec<_> = server
                .seen()
                .into_iter()
                .filter(|s| s.peer == identity && s.authority != format!("{ip}:{TARGET_PORT}"))
                .collect();
            ensure!(
                seen.is_empty(),
                "{client} at {ip}: wrong authority {seen:?}"
            );
            let conns: std::collections::BTreeSet<u64> = server
                .seen()
                .into_iter()
                .filter(|s| s.peer == identity)
                .map(|s| s.connection)
                .collect();
            ensure!(conns.len() == 1, "{client} at {ip}: connections {conns:?}");
        }
    }
    Ok(())
}

const WEB_VIP: &str = "10.96.2.30";

fn server_workloads() -> Vec<Workload> {
    vec![
        Workload {
            runs: App::TcpPrefix(vec![TARGET_PORT], "web"),
            ..workload("web", "web", true)
        },
        workload("sleep-ferry", "sleep-ferry", true),
        workload("sleep-envoy", "sleep-envoy", true),
        // An uncaptured pod calling 15008 itself, as ztunnel does.
        workload("ztunnel", "ztunnel", false),
    ]
}

/// The server pod carries `networking.istio.io/tunnel: http` (the injector
/// labels ENABLE_HBONE sidecars so), so callers tunnel to it.
fn server_objects(ips: &[(&str, Ipv4Addr)]) -> String {
    objects_with(ips, "web", "networking.istio.io/tunnel: http", WEB_VIP)
}

/// A sidecar whose node says `ENABLE_HBONE` serves istiod's
/// `connect_terminate` and `main_internal` from ferry-pilot: a Ferry
/// sidecar and an Envoy sidecar reach its app over HBONE, and an
/// AuthorizationPolicy on it matches callers by the identity HBONE carried
/// (RBAC on the filter state `io.istio.peer_principal`). The server's
/// sidecar is `server`: Envoy 1.40 or Ferry, fed the same, and the outcomes
/// asserted are Envoy's.
///
/// The server is on another node than its callers (ztunnel's
/// `cross_node_captured`: captured client, captured server, a router
/// between). A caller speaking HBONE itself (as ztunnel) with a certificate
/// of the mesh reaches the app; with an authority whose IP is not the
/// pod's it finds no chain (ztunnel's `hbone_ip_mismatch`: ferry-pilot's
/// `main_internal` sniffs, so the CONNECT is answered 200 before the chain
/// is chosen, then ends with nothing from the app); with a
/// certificate of another trust domain it is refused at TLS (ztunnel's
/// `trust_domain_mismatch_rejected`).
fn enable_hbone_server(server: Proxy) -> Result<()> {
    let (ca, _dir, cert, key) = mesh_ca()?;
    let proxy_of = |w: &Workload| match w.name {
        "sleep-ferry" => Proxy::Ferry,
        "web" => server,
        _ => Proxy::Envoy,
    };
    let setup = PilotSetup {
        env: vec![("PILOT_ENABLE_AMBIENT", "true")],
        enable_hbone: vec!["web"],
        ca: Some((cert, key)),
        nodes: vec![("web", 1)],
        ..Default::default()
    };
    let Some(m) = IstioMesh::start_with(
        Proxy::Envoy,
        proxy_of,
        &server_workloads(),
        server_objects,
        "24h",
        setup,
    )?
    else {
        return Ok(());
    };
    let web = m.pod("web");
    let reach = |client: &str| -> Result<String> {
        m.until(
            &format!("{client} reaches web over HBONE"),
            Duration::from_secs(20),
            || ferry_tests::istio::tcp_exchange(m.pod(client), WEB_VIP, SERVICE_PORT, client),
            |got| !got.is_empty(),
        )
    };
    ensure!(web.node() != m.pod("sleep-ferry").node(), "two nodes");
    for client in ["sleep-ferry", "sleep-envoy"] {
        assert_eq!(reach(client)?, format!("web {client}"), "{client}");
    }

    // HBONE straight to the pod's 15008, as ztunnel calls it.
    let web_ip = web.ip();
    let web_id = "spiffe://cluster.local/ns/default/sa/web";
    let ztunnel = m.pod("ztunnel");
    let call_with = |id: &str, authority: &str, payload: &str, end_after_reply: bool| {
        let leaf = ca.leaf(id, &[])?;
        ztunnel.enter(|| {
            HboneCall {
                ca_pem: &ca.pem(),
                client: Some(&leaf),
                from: None,
                to: SocketAddr::from((web_ip, 15008)),
                server: Expect::Spiffe(web_id),
                authority,
                payload,
                end_after_reply,
            }
            .run()
        })?
    };
    let call = |id: &str, ip: Ipv4Addr, end_after_reply: bool| -> Result<Outcome> {
        call_with(
            id,
            &format!("{ip}:{TARGET_PORT}"),
            "ztunnel\n",
            end_after_reply,
        )
    };
    let mesh_id = "spiffe://cluster.local/ns/default/sa/ztunnel";
    let reaches_app = |when: &str| -> Result<()> {
        assert_eq!(
            call(mesh_id, web_ip, true)?,
            Outcome::Answered {
                status: 200,
                echoed: "web ztunnel\nbye\n".into(),
                end: End::Clean
            },
            "a caller of the mesh reaches the app {when}"
        );
        Ok(())
    };
    reaches_app("")?;
    assert_eq!(
        call(mesh_id, m.pod("sleep-ferry").ip(), false)?,
        Outcome::Answered {
            status: 200,
            echoed: String::new(),
            end: End::Clean
        },
        "an authority IP that is not the pod's finds no chain on main_internal: the app \
         is never reached"
    );
    assert_eq!(
        call("spiffe://evil.example/ns/default/sa/ztunnel", web_ip, true)?,
        Outcome::Refused,
        "another trust domain is refused at TLS"
    );
    // ztunnel's `malicious_calls_inpod`: a caller of the mesh aiming its
    // CONNECT at the proxy's own ports (the capture ports 15001 and 15006,
    // 15008 itself, the admin port) or at loopback gets nothing back: the
    // capture ports hold blackhole chains, 15008 wants TLS, the admin
    // listens on loopback only, and loopback is not among main_internal's
    // prefix ranges. The app is reached again afterwards: no loop ate the
    // proxy.
    let probe = "GET /stats HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n";
    for authority in [
        format!("{web_ip}:15001"),
        format!("{web_ip}:15006"),
        format!("{web_ip}:15008"),
        format!("{web_ip}:15000"),
        "127.0.0.1:15000".to_string(),
        format!("127.0.0.1:{TARGET_PORT}"),
    ] {
        // The tunnel itself is set up (the caller is of the mesh); nothing
        // comes back through it.
        let got = call_with(mesh_id, &authority, probe, false)?;
        ensure!(
            matches!(&got, Outcome::Answered { echoed, .. } if echoed.is_empty()),
            "a CONNECT to {authority}: {got:?}\n{}",
            m.diagnostics()
        );
    }
    reaches_app("after the malicious calls")?;
    // Envoy names the cluster's statistics after its alt_stat_name
    // (`main_internal;`), Ferry after its name.
    let (internal_cx, rejected) = match server {
        Proxy::Envoy => (
            "cluster.main_internal;.upstream_cx_total",
            "listener_manager.lds.update_rejected",
        ),
        Proxy::Ferry => (
            "cluster.main_internal.upstream_cx_total",
            "xds.update_rejected",
        ),
    };
    ensure!(
        web.sidecar_stat(internal_cx)? >= 2,
        "both calls came through connect_terminate and main_internal:\n{}",
        m.diagnostics()
    );
    ensure!(
        web.sidecar_stat(rejected)? == 0,
        "the server's sidecar took every resource:\n{}",
        m.diagnostics()
    );

    // Only sleep-envoy's identity is allowed: the policy reads the HBONE
    // peer from filter state inside main_internal.
    m.put(
        "allow-envoy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: allow-envoy, namespace: default}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  rules:\n\
         \x20 - from: [{source: {principals: [cluster.local/ns/default/sa/sleep-envoy]}}]\n",
    )?;
    m.until(
        "sleep-ferry is refused",
        Duration::from_secs(20),
        || ferry_tests::istio::tcp_exchange(m.pod("sleep-ferry"), WEB_VIP, SERVICE_PORT, "x"),
        String::is_empty,
    )?;
    assert_eq!(reach("sleep-envoy")?, "web sleep-envoy");
    ensure!(
        web.sidecar_stat("tcp.rbac.denied")? >= 1 || web.sidecar_stat("rbac.denied")? >= 1,
        "the refusal came from RBAC:\n{}",
        m.diagnostics()
    );
    Ok(())
}

#[test]
fn ferry_and_envoy_sidecars_call_an_enable_hbone_envoy_sidecar_over_hbone() -> Result<()> {
    enable_hbone_server(Proxy::Envoy)
}

#[test]
fn ferry_and_envoy_sidecars_call_an_enable_hbone_ferry_sidecar_over_hbone() -> Result<()> {
    enable_hbone_server(Proxy::Ferry)
}

/// ztunnel's `test_server_shutdown`, for a sidecar serving HBONE. istiod
/// gives `connect_terminate` no `traffic_direction`, so istio-agent's
/// inbound-only drain on termination leaves 15008 serving. A drain of every
/// listener (`POST /drain_listeners?graceful`, then without `graceful`)
/// stops it: a new connection to 15008 is refused, and the tunnel in flight
/// keeps working, then ends cleanly when its caller ends it, and a new
/// CONNECT on the open connection is still answered. `server` is Envoy
/// 1.40 or Ferry, fed the same.
fn hbone_server_drains(server: Proxy) -> Result<()> {
    let (ca, _dir, cert, key) = mesh_ca()?;
    let proxy_of = |w: &Workload| match w.name {
        "sleep-ferry" => Proxy::Ferry,
        "web" => server,
        _ => Proxy::Envoy,
    };
    let setup = PilotSetup {
        env: vec![("PILOT_ENABLE_AMBIENT", "true")],
        enable_hbone: vec!["web"],
        ca: Some((cert, key)),
        nodes: vec![("web", 1)],
        ..Default::default()
    };
    let Some(m) = IstioMesh::start_with(
        Proxy::Envoy,
        proxy_of,
        &server_workloads(),
        server_objects,
        "24h",
        setup,
    )?
    else {
        return Ok(());
    };
    let web = m.pod("web");
    let hbone = SocketAddr::from((web.ip(), 15008));
    let authority = format!("{}:{TARGET_PORT}", web.ip());
    let leaf = ca.leaf("spiffe://cluster.local/ns/default/sa/ztunnel", &[])?;
    let ztunnel = m.pod("ztunnel");
    let open = || {
        ztunnel.enter(|| {
            HboneTunnel::open(
                &ca.pem(),
                &leaf,
                hbone,
                Expect::Spiffe("spiffe://cluster.local/ns/default/sa/web"),
                &authority,
            )
        })?
    };
    // The sidecar may still be taking its configuration.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut tunnel = loop {
        match open() {
            Ok(t) => break t,
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(e.context(m.diagnostics()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(tunnel.exchange("one\n")?, "web one\n");

    let drain = |query: &str| -> Result<()> {
        let answer = web
            .cmd("curl")
            .args(["-sS", "-X", "POST"])
            .arg(format!("http://127.0.0.1:15000/drain_listeners{query}"))
            .timeout(Duration::from_secs(10))
            .run()?;
        ensure!(answer.trim() == "OK", "drain_listeners{query}: {answer}");
        Ok(())
    };
    let accepts = || -> Result<bool> {
        Ok(ztunnel.enter(|| TcpStream::connect_timeout(&hbone, Duration::from_secs(2)).is_ok())?)
    };
    // istiod gives connect_terminate no traffic_direction: the inbound-only
    // drain (istio-agent's on termination) stops virtualInbound, not 15008.
    drain("?inboundonly")?;
    m.until(
        "virtualInbound stops",
        Duration::from_secs(10),
        || Ok(web.cmd("ss").args(["-Hltn", "sport = :15006"]).run()?),
        |out| out.trim().is_empty(),
    )?;
    ensure!(accepts()?, "15008 after an inbound-only drain");
    assert_eq!(
        tunnel.exchange("two\n")?,
        "web two\n",
        "after the inbound drain"
    );
    assert!(
        !tunnel.new_stream_refused(&authority)?,
        "a new CONNECT on the connection after an inbound-only drain"
    );
    // Every listener drains: first gracefully (a drain sequence: with
    // istio-agent's `--drain-strategy immediate`, Ferry's default in
    // sidecar mode, each response from now on closes its connection), then
    // at once (the listeners stop; open connections are left be).
    drain("?graceful")?;
    drain("")?;
    // The listener stops: a new connection is refused.
    let refused = m.until(
        "15008 refuses new connections",
        Duration::from_secs(10),
        || {
            Ok(ztunnel
                .enter(|| TcpStream::connect_timeout(&hbone, Duration::from_secs(2)).is_err())?)
        },
        |refused| *refused,
    )?;
    assert!(refused);
    // The tunnel in flight carries on; its connection takes no new stream.
    assert_eq!(tunnel.exchange("two\n")?, "web two\n", "the open tunnel");
    // A new CONNECT on the drained connection is still answered: the drain
    // tells a connection on its next response (GOAWAY after it), as Envoy's
    // connection manager does.
    assert!(
        !tunnel.new_stream_refused(&authority)?,
        "a new CONNECT on the drained connection"
    );
    assert_eq!(
        tunnel.exchange("three\n")?,
        "web three\n",
        "the open tunnel"
    );
    assert_eq!(
        tunnel.finish()?,
        ("bye\n".to_string(), End::Clean),
        "the tunnel ends as its caller ends it"
    );
    Ok(())
}

#[test]
fn an_envoy_sidecar_serving_hbone_drains_with_its_tunnels_finishing() -> Result<()> {
    hbone_server_drains(Proxy::Envoy)
}

#[test]
fn a_ferry_sidecar_serving_hbone_drains_with_its_tunnels_finishing() -> Result<()> {
    hbone_server_drains(Proxy::Ferry)
}
