//! TLS in the data plane, with secrets delivered over SDS by a management
//! server in this process (ferry-pilot's ADS server), as istiod and
//! istio-agent deliver `default` and `ROOTCA`:
//!
//! - a listener whose secrets have not arrived warms (is not bound), then
//!   serves once they do;
//! - mTLS Ferry → Ferry: the client sidecar originates TLS chosen by the
//!   endpoint's `tlsMode: istio` metadata (auto-mTLS), the server sidecar
//!   terminates it and checks the client's SPIFFE SAN;
//! - clients with an untrusted CA, the wrong SAN or no certificate are
//!   refused, and counted;
//! - a new version of the server's certificate applies to new connections
//!   while an established one keeps working;
//! - a bad secret is NACKed naming the secret and the field, and the last
//!   good certificate keeps serving;
//! - ADS itself over mutual TLS, with file-based certificates as
//!   istio-agent's bootstrap gives them;
//! - real Envoy 1.40 on the same SDS secrets: an Envoy client sidecar to a
//!   Ferry server sidecar and a Ferry client to an Envoy server, and the
//!   same refusals and ALPN answers from both servers;
//! - the cipher suite each proxy picks for a client's offer, and the suites
//!   it offers upstream, against Envoy's.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use ferry_envoy_json::Descriptors;
use ferry_pilot::xds::{CLUSTER, Cache, LISTENER, SECRET, Server, ServerTls, to_any};
use ferry_tests::pki::{Ca, Leaf, TlsClient, client_config, try_get};
use ferry_tests::proxy::{Ferry, TempDir, accepts, free_port, http_request, local, tcp_proxy};
use serde_json::{Value, json};

const SERVER_NODE: &str = "sidecar~127.0.0.1~server-1.default~default.svc.cluster.local";
const CLIENT_NODE: &str = "sidecar~127.0.0.1~client-1.default~default.svc.cluster.local";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_DNS: &str = "server.default.svc.cluster.local";
/// Generous: two cores shared with Envoy and other suites.
const TIMEOUT: Duration = Duration::from_secs(30);

fn any<M: prost::Message + prost::Name + Default>(d: &Descriptors, value: Value) -> Any {
    let full = M::full_name();
    to_any(
        &d.from_json::<M>(&full, value)
            .unwrap_or_else(|e| panic!("{full}: {e}")),
    )
}

fn sds(name: &str) -> Value {
    json!({"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}})
}

fn cert_secret(d: &Descriptors, name: &str, leaf: &Leaf) -> (String, Any) {
    (
        name.to_string(),
        any::<Secret>(
            d,
            json!({"name": name, "tls_certificate": {
                "certificate_chain": {"inline_string": leaf.cert_pem},
                "private_key": {"inline_string": leaf.key_pem}}}),
        ),
    )
}

fn root_secret(d: &Descriptors, ca: &Ca) -> (String, Any) {
    (
        "ROOTCA".to_string(),
        any::<Secret>(
            d,
            json!({"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": ca.pem()}}}),
        ),
    )
}

/// Istio's `CommonTlsContext`: `default` and `ROOTCA` by SDS, the peer's
/// SPIFFE identity checked.
fn common_tls(peer_san: Value, alpn: &[&str]) -> Value {
    json!({
        "alpn_protocols": alpn,
        "tls_certificate_sds_secret_configs": [sds("default")],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": peer_san}]},
            "validation_context_sds_secret_config": sds("ROOTCA")
        }
    })
}

fn hcm(stat_prefix: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "5s"}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
        }
    })
}

/// Istio's inbound connection manager: the client's identity forwarded to
/// the app in `x-forwarded-client-cert`.
fn inbound_hcm() -> Value {
    let mut h = hcm("inbound", "app");
    h["typed_config"]["forward_client_cert_details"] = json!("APPEND_FORWARD");
    h["typed_config"]["set_current_client_cert_details"] =
        json!({"subject": true, "uri": true, "dns": true});
    h
}

/// The server sidecar's inbound listener: TLS chosen by the TLS inspector,
/// mTLS required, the client's SPIFFE identity checked, then HTTP to the
/// app; plaintext beside it (PERMISSIVE).
fn inbound_listener(d: &Descriptors, port: u16) -> (String, Any) {
    let v = json!({
        "name": "inbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
        "filter_chains": [{
            "filter_chain_match": {"transport_protocol": "tls"},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": common_tls(json!({"prefix": CLIENT_ID}), &["h2", "http/1.1"])
            }},
            "filters": [inbound_hcm()]
        }, {
            // Istio's PERMISSIVE mode: plaintext on the same port.
            "filter_chain_match": {"transport_protocol": "raw_buffer"},
            "filters": [hcm("inbound-plaintext", "app")]
        }]
    });
    ("inbound".into(), any::<Listener>(d, v))
}

/// The server sidecar's TCP inbound listener: mTLS, then TCP proxy.
fn inbound_tcp_listener(d: &Descriptors, port: u16) -> (String, Any) {
    let v = json!({
        "name": "inbound-tcp",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": common_tls(json!({"prefix": CLIENT_ID}), &["istio-peer-exchange", "h2", "http/1.1"])
            }},
            "filters": [tcp_proxy("inbound-tcp", "echo")]
        }]
    });
    ("inbound-tcp".into(), any::<Listener>(d, v))
}

/// The client sidecar's TCP path: a plaintext listener proxying to a
/// cluster that originates mTLS with Istio's TCP ALPN.
fn outbound_tcp(d: &Descriptors, port: u16, target: u16) -> ((String, Any), (String, Any)) {
    let l = json!({
        "name": "outbound-tcp",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [tcp_proxy("outbound-tcp", "server-tcp")]}]
    });
    let c = json!({
        "name": "server-tcp", "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "server-tcp", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": target}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls(json!({"exact": SERVER_ID}), &["istio-peer-exchange", "istio"])
        }}
    });
    (
        ("outbound-tcp".into(), any::<Listener>(d, l)),
        ("server-tcp".into(), any::<Cluster>(d, c)),
    )
}

/// A TCP echo server.
fn echo() -> Result<u16> {
    let l = StdListener::bind(("127.0.0.1", 0))?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut w) = conn.try_clone() else { return };
                let mut r = conn;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    Ok(port)
}

fn static_cluster(d: &Descriptors, name: &str, port: u16) -> (String, Any) {
    let v = json!({
        "name": name, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
    });
    (name.into(), any::<Cluster>(d, v))
}

/// The client sidecar's cluster to the server, shaped as istiod's auto-mTLS
/// makes it: TLS for endpoints labelled `tlsMode: istio`, plaintext for the
/// others; HTTP/2 upstream (so h2 is offered by ALPN).
fn outbound_cluster(d: &Descriptors, port: u16) -> (String, Any) {
    let v = json!({
        "name": "server", "type": "STATIC", "connect_timeout": "2s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "server", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
            "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
        }]}]},
        "transport_socket_matches": [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
             "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "outbound_.80_._.server.default.svc.cluster.local",
                "common_tls_context": common_tls(json!({"exact": SERVER_ID}), &[])
             }}},
            {"name": "tlsMode-disabled", "match": {},
             "transport_socket": {"name": "envoy.transport_sockets.raw_buffer",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}
        ]
    });
    ("server".into(), any::<Cluster>(d, v))
}

fn outbound_listener(d: &Descriptors, port: u16) -> (String, Any) {
    let v = json!({
        "name": "outbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [hcm("outbound", "server")]}]
    });
    ("outbound".into(), any::<Listener>(d, v))
}

fn ads_bootstrap(node: &str, xds_port: u16, xds_tls: Option<Value>) -> String {
    ads_bootstrap_api(node, xds_port, xds_tls, "GRPC")
}

fn ads_bootstrap_api(node: &str, xds_port: u16, xds_tls: Option<Value>, api: &str) -> String {
    let mut cluster = json!({
        "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]}
    });
    if let Some(tls) = xds_tls {
        cluster["transport_socket"] =
            json!({"name": "envoy.transport_sockets.tls", "typed_config": tls});
    }
    json!({
        "node": {"id": node, "cluster": "test"},
        "dynamic_resources": {
            "ads_config": {"api_type": api, "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {"clusters": [cluster]}
    })
    .to_string()
}

/// A management server in this process.
struct Plane {
    _rt: tokio::runtime::Runtime,
    server: Server,
    port: u16,
}

fn plane(cache: Cache, tls: Option<ServerTls>) -> Result<Plane> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let std_listener = StdListener::bind(("127.0.0.1", 0))?;
    std_listener.set_nonblocking(true)?;
    let port = std_listener.local_addr()?.port();
    let server = Server::new(cache);
    let s = server.clone();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        let r = match tls {
            Some(tls) => s.serve_tls(l, &tls, std::future::pending()).await,
            None => s.serve(l, std::future::pending()).await,
        };
        if let Err(e) = r {
            eprintln!("ADS server failed: {e}");
        }
    });
    Ok(Plane {
        _rt: rt,
        server,
        port,
    })
}

impl Plane {
    fn wait_ack(&self, node: &str, type_url: &str, version: &str) -> Result<()> {
        self._rt
            .block_on(self.server.wait_ack(node, type_url, version, TIMEOUT))
            .map_err(anyhow::Error::from)
    }
}

/// An HTTP/1.1 app answering every request with 200 and the request head
/// it received as the body (keep-alive).
fn app() -> Result<u16> {
    let l = StdListener::bind(("127.0.0.1", 0))?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut w) = conn.try_clone() else { return };
                let mut r = BufReader::new(conn);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let body = format!("app saw:\n{head}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

fn get_plain(port: u16) -> Result<(u16, String)> {
    http_request(local(port), "GET", "/")
}

#[test]
fn mtls_between_sidecars_with_sds_rotation_and_refusals() -> Result<()> {
    sidecars("GRPC")
}

#[test]
fn mtls_between_sidecars_with_sds_over_delta() -> Result<()> {
    sidecars("DELTA_GRPC")
}

fn sidecars(api: &str) -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let ca = Ca::new("mesh")?;
    let server_leaf = ca.leaf(SERVER_ID, &[SERVER_DNS])?;
    let client_leaf = ca.leaf(CLIENT_ID, &[])?;
    let app_port = app()?;
    let echo_port = echo()?;
    let (inbound, outbound) = (free_port(), free_port());
    let (inbound_tcp, outbound_tcp_port) = (free_port(), free_port());

    // The server sidecar: listeners and clusters first, secrets later.
    let server_cache = Cache::new();
    server_cache.set(
        CLUSTER,
        [
            static_cluster(&d, "app", app_port),
            static_cluster(&d, "echo", echo_port),
        ],
    );
    let lds = server_cache.set(
        LISTENER,
        [
            inbound_listener(&d, inbound),
            inbound_tcp_listener(&d, inbound_tcp),
        ],
    );
    let server_plane = plane(server_cache.clone(), None)?;
    let server = Ferry::spawn(
        &ads_bootstrap_api(SERVER_NODE, server_plane.port, None, api),
        &[],
    )?;
    server_plane.wait_ack(SERVER_NODE, LISTENER, &lds)?;
    // Warming: the listener waits for `default` and `ROOTCA`.
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !accepts(inbound),
        "the TLS listener must warm until its secrets arrive"
    );
    let sds_v1 = server_cache.set(
        SECRET,
        [
            cert_secret(&d, "default", &server_leaf),
            root_secret(&d, &ca),
        ],
    );
    server_plane.wait_ack(SERVER_NODE, SECRET, &sds_v1)?;
    wait_until("the inbound listener", || accepts(inbound))?;
    // /config_dump lists the secrets, never their keys.
    let (_, dump) = http_request(local(server.admin_port()), "GET", "/config_dump")?;
    ensure!(
        dump.contains("dynamic_active_secrets") && dump.contains("\"ROOTCA\""),
        "{dump}"
    );
    ensure!(
        dump.contains("W3JlZGFjdGVkXQ=="),
        "the key must show as [redacted]"
    );
    ensure!(
        !dump.contains("PRIVATE KEY"),
        "a private key leaked into /config_dump"
    );

    // The client sidecar.
    let client_cache = Cache::new();
    let (tcp_listener, tcp_cluster) = outbound_tcp(&d, outbound_tcp_port, inbound_tcp);
    client_cache.set(CLUSTER, [outbound_cluster(&d, inbound), tcp_cluster]);
    client_cache.set(LISTENER, [outbound_listener(&d, outbound), tcp_listener]);
    client_cache.set(
        SECRET,
        [
            cert_secret(&d, "default", &client_leaf),
            root_secret(&d, &ca),
        ],
    );
    let client_plane = plane(client_cache, None)?;
    let client = Ferry::spawn(
        &ads_bootstrap_api(CLIENT_NODE, client_plane.port, None, api),
        &[],
    )?;
    wait_until("the outbound listener", || accepts(outbound))?;
    wait_until("the outbound TCP listener", || accepts(outbound_tcp_port))?;

    // TCP over mTLS: bytes echoed through both sidecars.
    {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(local(outbound_tcp_port))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"ping over mtls\n")?;
        let mut buf = [0u8; 15];
        c.read_exact(&mut buf)?;
        ensure!(
            &buf == b"ping over mtls\n",
            "{:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    ensure!(client.stat("cluster.server-tcp.ssl.handshake") >= 1);
    ensure!(server.stat("listener.inbound-tcp.ssl.handshake") >= 1);

    // Ferry → Ferry over mTLS (HTTP/2 by ALPN inside).
    let (status, body) = get_plain(outbound)?;
    ensure!(status == 200, "through both sidecars: {status} {body}");
    ensure!(body.contains("app saw:"), "{body}");
    ensure!(client.stat("cluster.server.ssl.handshake") >= 1);
    ensure!(server.stat("listener.inbound.ssl.handshake") >= 1);
    ensure!(client.stat("cluster.server.ssl.connection_error") == 0);

    // PERMISSIVE: plaintext on the same port reaches the plaintext chain.
    let (status, body) = get_plain(inbound)?;
    ensure!(status == 200, "plaintext beside mTLS: {status} {body}");
    ensure!(body.contains("x-forwarded-proto: http\r\n"), "{body}");

    let addr: SocketAddr = local(inbound);
    let errors = || server.stat("listener.inbound.ssl.connection_error");
    let before = errors();

    // Refused: a certificate from another CA (with the right identity).
    let rogue_ca = Ca::new("rogue")?;
    let rogue = rogue_ca.leaf(CLIENT_ID, &[])?;
    let r = try_get(
        addr,
        client_config(&ca.pem(), Some(&rogue), &["http/1.1"])?,
        SERVER_DNS,
    );
    ensure!(r.is_err(), "untrusted client CA accepted: {r:?}");
    // Refused: trusted CA, but an identity the listener does not accept.
    let intruder = ca.leaf("spiffe://cluster.local/ns/default/sa/intruder", &[])?;
    let r = try_get(
        addr,
        client_config(&ca.pem(), Some(&intruder), &["http/1.1"])?,
        SERVER_DNS,
    );
    ensure!(r.is_err(), "wrong client SAN accepted: {r:?}");
    // Refused: no client certificate at all.
    let r = try_get(
        addr,
        client_config(&ca.pem(), None, &["http/1.1"])?,
        SERVER_DNS,
    );
    ensure!(r.is_err(), "missing client certificate accepted: {r:?}");
    wait_until("three handshake failures counted", || {
        errors() >= before + 3
    })?;

    // The right client, with Istio's ALPN: accepted, no ALPN negotiated
    // (the chain lists h2 and http/1.1 only), served as HTTP/1.1.
    let good = client_config(&ca.pem(), Some(&client_leaf), &["istio-http/1.1", "istio"])?;
    let mut kept = TlsClient::connect(addr, good.clone(), SERVER_DNS)?;
    ensure!(kept.alpn().is_none(), "ALPN {:?}", kept.alpn());
    let (status, body) = kept.get("/first")?;
    ensure!(status == 200, "{status} {body}");
    ensure!(
        body.contains("x-forwarded-proto: https"),
        "TLS downstream must say https: {body}"
    );
    ensure!(kept.server_cert().as_deref() == Some(&server_leaf.der[..]));
    let h2 = TlsClient::connect(
        addr,
        client_config(&ca.pem(), Some(&client_leaf), &["h2", "http/1.1"])?,
        SERVER_DNS,
    )?;
    ensure!(h2.alpn().as_deref() == Some("h2"), "ALPN {:?}", h2.alpn());
    drop(h2);

    // Rotation: a new server certificate for new connections; the kept
    // connection still works.
    let rotated = ca.leaf(SERVER_ID, &[SERVER_DNS])?;
    let sds_v2 = server_cache.set(
        SECRET,
        [cert_secret(&d, "default", &rotated), root_secret(&d, &ca)],
    );
    server_plane.wait_ack(SERVER_NODE, SECRET, &sds_v2)?;
    // The ACK may precede the data path's switch by a moment: poll.
    wait_until("a new connection to see the rotated certificate", || {
        TlsClient::connect(addr, good.clone(), SERVER_DNS)
            .is_ok_and(|c| c.server_cert().as_deref() == Some(&rotated.der[..]))
    })?;
    let mut fresh = TlsClient::connect(addr, good.clone(), SERVER_DNS)?;
    ensure!(fresh.server_cert().as_deref() == Some(&rotated.der[..]));
    ensure!(fresh.get("/fresh")?.0 == 200);
    let (status, _) = kept.get("/again")?;
    ensure!(
        status == 200,
        "the established connection must survive rotation"
    );
    ensure!(kept.server_cert().as_deref() == Some(&server_leaf.der[..]));
    ensure!(get_plain(outbound)?.0 == 200, "sidecar path after rotation");

    // A bad secret: NACKed with the secret and the field named; the last
    // good certificate keeps serving.
    let bad = Leaf {
        cert_pem: "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
            .into(),
        ..rotated.clone()
    };
    server_cache.set(
        SECRET,
        [cert_secret(&d, "default", &bad), root_secret(&d, &ca)],
    );
    let nack =
        server_plane
            ._rt
            .block_on(server_plane.server.wait_nack(SERVER_NODE, SECRET, TIMEOUT))?;
    ensure!(
        nack.message.contains("secret \"default\"")
            && nack.message.contains("tls_certificate.certificate_chain"),
        "NACK must name the secret and field: {}",
        nack.message
    );
    let mut after = TlsClient::connect(addr, good, SERVER_DNS)?;
    ensure!(after.server_cert().as_deref() == Some(&rotated.der[..]));
    ensure!(after.get("/after-nack")?.0 == 200);
    ensure!(kept.get("/still")?.0 == 200);
    drop(client);
    Ok(())
}

fn write(dir: &TempDir, name: &str, text: &str) -> Result<String> {
    let p = dir.path().join(name);
    std::fs::write(&p, text).with_context(|| p.display().to_string())?;
    Ok(p.display().to_string())
}

/// istio-agent's bootstrap shape for ADS over mTLS: certificate, key and
/// root from files, istiod's SPIFFE identity checked.
fn xds_tls_context(dir: &TempDir, ca: &Ca, leaf: &Leaf, expect: &str) -> Result<Value> {
    Ok(json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "istiod.istio-system.svc",
        "common_tls_context": {
            "tls_certificates": [{
                "certificate_chain": {"filename": write(dir, "cert-chain.pem", &leaf.cert_pem)?},
                "private_key": {"filename": write(dir, "key.pem", &leaf.key_pem)?}
            }],
            "validation_context": {
                "trusted_ca": {"filename": write(dir, "root-cert.pem", &ca.pem())?},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": expect}}]
            }
        }
    }))
}

#[test]
fn ads_over_mutual_tls() -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let ca = Ca::new("mesh")?;
    let istiod_id = "spiffe://cluster.local/ns/istio-system/sa/istiod";
    let istiod = ca.leaf(istiod_id, &["istiod.istio-system.svc"])?;
    let workload = ca.leaf(CLIENT_ID, &[])?;
    let app_port = app()?;
    let outbound = free_port();
    let cache = Cache::new();
    cache.set(CLUSTER, [static_cluster(&d, "server", app_port)]);
    let lds = cache.set(LISTENER, [outbound_listener(&d, outbound)]);
    let tls = ServerTls {
        cert_pem: istiod.cert_pem.clone().into_bytes(),
        key_pem: istiod.key_pem.clone().into_bytes(),
        client_ca_pem: Some(ca.pem().into_bytes()),
    };
    let p = plane(cache, Some(tls))?;

    // The right identity: configured over TLS.
    let dir = TempDir::new("xds-tls")?;
    let ferry = Ferry::start(&ads_bootstrap(
        CLIENT_NODE,
        p.port,
        Some(xds_tls_context(&dir, &ca, &workload, istiod_id)?),
    ))?;
    p.wait_ack(CLIENT_NODE, LISTENER, &lds)?;
    wait_until("the listener", || accepts(outbound))?;
    let (status, body) = get_plain(outbound)?;
    ensure!(status == 200, "{status} {body}");
    drop(ferry);

    // A server that is not the expected identity: never configured.
    let other_node = "sidecar~127.0.0.1~other.default~default.svc.cluster.local";
    let dir2 = TempDir::new("xds-tls-wrong")?;
    let wrong = Ferry::spawn(
        &ads_bootstrap(
            other_node,
            p.port,
            Some(xds_tls_context(
                &dir2,
                &ca,
                &workload,
                "spiffe://cluster.local/ns/istio-system/sa/not-istiod",
            )?),
        ),
        &[],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    wait_until("the wrong client's admin", || accepts(wrong.admin_port()))?;
    ensure!(
        http_request(local(wrong.admin_port()), "GET", "/ready")?.0 != 200,
        "ferry must not be ready from an unverified server"
    );
    ensure!(
        !p.server.status().iter().any(|s| s.node_id == other_node),
        "no ADS stream may open when the server's identity is wrong"
    );
    ensure!(
        wrong.log().contains("xDS stream ended"),
        "the failure is logged: {}",
        wrong.log()
    );
    Ok(())
}

fn envoy_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_ENVOY").map(PathBuf::from)
        && path.is_file()
    {
        return Ok(path);
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-envoy.sh");
    let out = Command::new("bash").arg(&script).output()?;
    ensure!(
        out.status.success(),
        "install-envoy.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A running Envoy on an ADS bootstrap, killed on drop (its log printed,
/// which the harness shows for failed tests).
struct Envoy {
    child: Child,
    admin: u16,
    dir: TempDir,
}

impl Envoy {
    fn start(bootstrap: &str) -> Result<Envoy> {
        let dir = TempDir::new("envoy-tls")?;
        let admin = free_port();
        let mut cfg: Value = serde_json::from_str(bootstrap)?;
        cfg["admin"] =
            json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}});
        let path = dir.path().join("envoy.json");
        std::fs::write(&path, cfg.to_string())?;
        let child = Command::new(envoy_bin()?)
            .arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("envoy.log"))?)
            .spawn()
            .context("spawning envoy")?;
        Ok(Envoy { child, admin, dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    fn stat(&self, name: &str) -> u64 {
        let Ok((_, body)) = http_request(local(self.admin), "GET", "/stats") else {
            return 0;
        };
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("--- envoy (admin {}) ---\n{}", self.admin, self.log());
    }
}

/// A server sidecar's resources: the mTLS inbound listener on `port` in
/// front of the app, and its SDS secrets.
fn server_resources(d: &Descriptors, ca: &Ca, leaf: &Leaf, port: u16, app: u16) -> Cache {
    let cache = Cache::new();
    cache.set(CLUSTER, [static_cluster(d, "app", app)]);
    cache.set(LISTENER, [inbound_listener(d, port)]);
    cache.set(
        SECRET,
        [cert_secret(d, "default", leaf), root_secret(d, ca)],
    );
    cache
}

/// A client sidecar's resources: the plaintext outbound listener on `port`
/// and the auto-mTLS cluster to the server sidecar on `target`.
fn client_resources(d: &Descriptors, ca: &Ca, leaf: &Leaf, port: u16, target: u16) -> Cache {
    let cache = Cache::new();
    cache.set(CLUSTER, [outbound_cluster(d, target)]);
    cache.set(LISTENER, [outbound_listener(d, port)]);
    cache.set(
        SECRET,
        [cert_secret(d, "default", leaf), root_secret(d, ca)],
    );
    cache
}

/// What a client sees of a TLS server sidecar.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    through_other_sidecar: u16,
    untrusted_ca_refused: bool,
    wrong_san_refused: bool,
    no_certificate_refused: bool,
    istio_alpn: Option<String>,
    istio_alpn_status: u16,
    https_forwarded: bool,
    /// `x-forwarded-client-cert` as the app saw it, for a client that sent
    /// one of its own.
    xfcc: Option<String>,
    /// The same through the other kind of client sidecar.
    xfcc_via_sidecar: Option<String>,
    h2_alpn: Option<String>,
}

fn xfcc_of(body: &str) -> Option<String> {
    body.lines()
        .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
        .map(|v| v.trim().to_string())
}

fn observe(
    ca: &Ca,
    client_leaf: &Leaf,
    server_port: u16,
    other_client_port: u16,
) -> Result<Observed> {
    let addr = local(server_port);
    let rogue = Ca::new("rogue")?.leaf(CLIENT_ID, &[])?;
    let intruder = ca.leaf("spiffe://cluster.local/ns/default/sa/intruder", &[])?;
    let refused = |leaf: Option<&Leaf>| -> Result<bool> {
        Ok(try_get(
            addr,
            client_config(&ca.pem(), leaf, &["http/1.1"])?,
            SERVER_DNS,
        )
        .is_err())
    };
    let mut istio = TlsClient::connect(
        addr,
        client_config(
            &ca.pem(),
            Some(client_leaf),
            &["istio-peer-exchange", "istio"],
        )?,
        SERVER_DNS,
    )?;
    let (istio_alpn_status, body) =
        istio.get_with("/", &[("x-forwarded-client-cert", "By=spiffe://spoofed")])?;
    let h2 = TlsClient::connect(
        addr,
        client_config(&ca.pem(), Some(client_leaf), &["h2", "http/1.1"])?,
        SERVER_DNS,
    )?;
    let (through_other_sidecar, via_sidecar) = get_plain(other_client_port)?;
    Ok(Observed {
        through_other_sidecar,
        xfcc: xfcc_of(&body),
        xfcc_via_sidecar: xfcc_of(&via_sidecar),
        untrusted_ca_refused: refused(Some(&rogue))?,
        wrong_san_refused: refused(Some(&intruder))?,
        no_certificate_refused: refused(None)?,
        istio_alpn: istio.alpn(),
        istio_alpn_status,
        https_forwarded: body.contains("x-forwarded-proto: https"),
        h2_alpn: h2.alpn(),
    })
}

#[test]
fn mtls_interoperates_with_envoy() -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let ca = Ca::new("mesh")?;
    let server_leaf = ca.leaf(SERVER_ID, &[SERVER_DNS])?;
    let client_leaf = ca.leaf(CLIENT_ID, &[])?;
    let app_port = app()?;
    let (ferry_in, envoy_in, ferry_out, envoy_out) =
        (free_port(), free_port(), free_port(), free_port());

    // Envoy client → Ferry server; Ferry client → Envoy server.
    let p_ferry_server = plane(
        server_resources(&d, &ca, &server_leaf, ferry_in, app_port),
        None,
    )?;
    let p_envoy_server = plane(
        server_resources(&d, &ca, &server_leaf, envoy_in, app_port),
        None,
    )?;
    let p_ferry_client = plane(
        client_resources(&d, &ca, &client_leaf, ferry_out, envoy_in),
        None,
    )?;
    let p_envoy_client = plane(
        client_resources(&d, &ca, &client_leaf, envoy_out, ferry_in),
        None,
    )?;
    let _ferry_server = Ferry::spawn(&ads_bootstrap(SERVER_NODE, p_ferry_server.port, None), &[])?;
    let envoy_server = Envoy::start(&ads_bootstrap(SERVER_NODE, p_envoy_server.port, None))?;
    let _ferry_client = Ferry::spawn(&ads_bootstrap(CLIENT_NODE, p_ferry_client.port, None), &[])?;
    let envoy_client = Envoy::start(&ads_bootstrap(CLIENT_NODE, p_envoy_client.port, None))?;
    for (what, port) in [
        ("Ferry's inbound", ferry_in),
        ("Envoy's inbound", envoy_in),
        ("Ferry's outbound", ferry_out),
        ("Envoy's outbound", envoy_out),
    ] {
        wait_until(what, || accepts(port))?;
    }
    // Envoy may bind before its clusters finished warming: wait for a
    // first success through each pair.
    wait_until("Envoy client → Ferry server", || {
        get_plain(envoy_out).is_ok_and(|r| r.0 == 200)
    })?;
    wait_until("Ferry client → Envoy server", || {
        get_plain(ferry_out).is_ok_and(|r| r.0 == 200)
    })?;

    let ferry = observe(&ca, &client_leaf, ferry_in, envoy_out)?;
    let envoy = observe(&ca, &client_leaf, envoy_in, ferry_out)?;
    let hash = |l: &Leaf| -> String {
        ring::digest::digest(&ring::digest::SHA256, &l.der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let element = format!(
        "By={SERVER_ID};Hash={};Subject=\"CN=rcgen self signed cert\";URI={CLIENT_ID}",
        hash(&client_leaf)
    );
    assert_eq!(
        ferry,
        Observed {
            through_other_sidecar: 200,
            xfcc: Some(format!("By=spiffe://spoofed,{element}")),
            xfcc_via_sidecar: Some(element.clone()),
            untrusted_ca_refused: true,
            wrong_san_refused: true,
            no_certificate_refused: true,
            istio_alpn: None,
            istio_alpn_status: 200,
            https_forwarded: true,
            h2_alpn: Some("h2".into()),
        }
    );
    assert_eq!(ferry, envoy, "Ferry and Envoy as TLS servers differ");
    ensure!(
        envoy_client.stat("cluster.server.ssl.handshake") >= 1,
        "Envoy's client must have used TLS to Ferry"
    );
    ensure!(
        envoy_server.stat(&format!("listener.127.0.0.1_{envoy_in}.ssl.handshake")) >= 1,
        "Envoy's server must have terminated TLS"
    );
    Ok(())
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ferry_pilot_serves_ads_over_tls_from_the_command_line() -> Result<()> {
    let ca = Ca::new("mesh")?;
    let istiod_id = "spiffe://cluster.local/ns/istio-system/sa/istiod";
    let istiod = ca.leaf(istiod_id, &["istiod.istio-system.svc"])?;
    let workload = ca.leaf(CLIENT_ID, &[])?;
    let app_port = app()?;
    let (xds_port, outbound) = (free_port(), free_port());
    let dir = TempDir::new("pilot-tls")?;
    // What ferry-pilot serves: a listener and the cluster it routes to.
    let served = json!({"static_resources": {
        "listeners": [{
            "name": "outbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": outbound}},
            "filter_chains": [{"filters": [hcm("outbound", "app")]}]
        }],
        "clusters": [{
            "name": "app", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": app_port}}}}]}]}
        }]
    }});
    let pilot = Command::new(ferry_tests::netns::workspace_bin(
        "ferry-pilot",
        "ferry-pilot",
    ))
    .arg("serve-static")
    .args([
        "--bootstrap",
        &write(&dir, "served.json", &served.to_string())?,
    ])
    .args(["--listen", &local(xds_port).to_string()])
    .args(["--tls-cert", &write(&dir, "istiod.pem", &istiod.cert_pem)?])
    .args([
        "--tls-key",
        &write(&dir, "istiod-key.pem", &istiod.key_pem)?,
    ])
    .args(["--tls-client-ca", &write(&dir, "ca.pem", &ca.pem())?])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .context("ferry-pilot (cargo build -p ferry-pilot)")?;
    let _pilot = Killed(pilot);
    wait_until("ferry-pilot to listen", || accepts(xds_port))?;

    // A plaintext client is not served (TLS only on that port).
    let plain = Ferry::spawn(
        &ads_bootstrap(
            "sidecar~127.0.0.1~plain.default~default.svc.cluster.local",
            xds_port,
            None,
        ),
        &[],
    )?;

    let ferry = Ferry::start(&ads_bootstrap(
        CLIENT_NODE,
        xds_port,
        Some(xds_tls_context(&dir, &ca, &workload, istiod_id)?),
    ))?;
    wait_until("the served listener", || accepts(outbound))?;
    let (status, body) = get_plain(outbound)?;
    ensure!(status == 200, "{status} {body}");
    wait_until("the plaintext client's admin", || {
        accepts(plain.admin_port())
    })?;
    ensure!(
        http_request(local(plain.admin_port()), "GET", "/ready")?.0 != 200,
        "a plaintext xDS client must not get configuration from the TLS port"
    );
    drop(ferry);
    Ok(())
}

#[test]
fn static_bootstrap_secrets_terminate_and_originate_tls() -> Result<()> {
    let ca = Ca::new("mesh")?;
    let server_leaf = ca.leaf(SERVER_ID, &[SERVER_DNS])?;
    let client_leaf = ca.leaf(CLIENT_ID, &[])?;
    let app_port = app()?;
    let (tls_port, plain_port) = (free_port(), free_port());
    let inline = |s: &str| json!({"inline_string": s});
    // One Ferry, no xDS: a TLS listener on static secrets, and a plaintext
    // listener whose cluster originates mTLS to it with inline data.
    let bootstrap = json!({"static_resources": {
        "secrets": [
            {"name": "server-cert", "tls_certificate": {
                "certificate_chain": inline(&server_leaf.cert_pem),
                "private_key": inline(&server_leaf.key_pem)}},
            {"name": "mesh-ca", "validation_context": {"trusted_ca": inline(&ca.pem())}}
        ],
        "listeners": [
            {
                "name": "tls",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": tls_port}},
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true,
                        "common_tls_context": {
                            "tls_certificate_sds_secret_configs": [{"name": "server-cert"}],
                            "validation_context_sds_secret_config": {"name": "mesh-ca"}
                        }
                    }},
                    "filters": [hcm("tls", "app")]
                }]
            },
            {
                "name": "plain",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": plain_port}},
                "filter_chains": [{"filters": [hcm("plain", "to-tls")]}]
            }
        ],
        "clusters": [
            {
                "name": "app", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": app_port}}}}]}]}
            },
            {
                "name": "to-tls", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "to-tls", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": tls_port}}}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": {
                        "tls_certificates": [{"certificate_chain": inline(&client_leaf.cert_pem),
                                              "private_key": inline(&client_leaf.key_pem)}],
                        "validation_context": {
                            "trusted_ca": inline(&ca.pem()),
                            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": SERVER_ID}}]
                        }
                    }
                }}
            }
        ]
    }});
    let ferry = Ferry::start(&bootstrap.to_string())?;
    let (status, body) = get_plain(plain_port)?;
    ensure!(status == 200, "{status} {body}");
    // The first hop's x-forwarded-proto is kept, as Envoy keeps it.
    ensure!(body.contains("x-forwarded-proto: http\r\n"), "{body}");
    ensure!(ferry.stat("cluster.to-tls.ssl.handshake") >= 1);
    ensure!(ferry.stat("listener.tls.ssl.handshake") >= 1);
    // Idle past a second, the pooled TLS connection is parked (its HTTP/1.1
    // codec taken apart, the TLS stream kept); the next request takes it
    // again without a new handshake.
    let handshakes = ferry.stat("cluster.to-tls.ssl.handshake");
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = get_plain(plain_port)?;
    ensure!(status == 200, "on the parked connection: {status} {body}");
    ensure!(
        ferry.stat("cluster.to-tls.ssl.handshake") == handshakes,
        "a parked TLS connection was not used again"
    );
    ensure!(ferry.stat("cluster.to-tls.upstream_cx_total") == handshakes);
    // And refused without a client certificate.
    let r = try_get(
        local(tls_port),
        client_config(&ca.pem(), None, &[])?,
        SERVER_DNS,
    );
    ensure!(r.is_err(), "{r:?}");
    Ok(())
}

/// A TLS client connection presenting `leaf`, with one line echoed.
struct TlsEcho(rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>);

impl TlsEcho {
    fn open(port: u16, ca: &Ca, leaf: &Leaf) -> Result<Self> {
        let config = client_config(&ca.pem(), Some(leaf), &["istio-peer-exchange"])?;
        let tcp = std::net::TcpStream::connect_timeout(&local(port), Duration::from_secs(3))?;
        tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
        let conn = rustls::ClientConnection::new(config, SERVER_DNS.try_into()?)?;
        let mut s = TlsEcho(rustls::StreamOwned::new(conn, tcp));
        ensure!(s.echo("hello")?, "the first line was not echoed");
        Ok(s)
    }

    /// Whether `word` comes back (false: the connection is closed).
    fn echo(&mut self, word: &str) -> Result<bool> {
        use std::io::Read;
        if writeln!(self.0, "{word}")
            .and_then(|_| self.0.flush())
            .is_err()
        {
            return Ok(false);
        }
        let mut buf = vec![0u8; word.len() + 1];
        Ok(self.0.read_exact(&mut buf).is_ok() && buf.starts_with(word.as_bytes()))
    }
}

/// A CRL delivered by SDS (a new `ROOTCA` version) closes the open
/// connections of the clients it revokes, and only those; new handshakes
/// of the revoked client fail.
#[test]
fn a_crl_by_sds_closes_revoked_clients_connections() -> Result<()> {
    let d = Descriptors::load().map_err(anyhow::Error::msg)?;
    let ca = Ca::new("mesh")?;
    let server_leaf = ca.leaf(SERVER_ID, &[SERVER_DNS])?;
    let kept = ca.leaf(CLIENT_ID, &[])?;
    let revoked = ca.leaf(CLIENT_ID, &[])?;
    let echo_port = echo()?;
    let port = free_port();
    let cache = Cache::new();
    cache.set(CLUSTER, [static_cluster(&d, "echo", echo_port)]);
    cache.set(LISTENER, [inbound_tcp_listener(&d, port)]);
    cache.set(
        SECRET,
        [
            cert_secret(&d, "default", &server_leaf),
            root_secret(&d, &ca),
        ],
    );
    let p = plane(cache.clone(), None)?;
    let ferry = Ferry::start(&ads_bootstrap(SERVER_NODE, p.port, None))?;
    wait_until("the TLS listener", || accepts(port))?;
    let mut a = TlsEcho::open(port, &ca, &kept)?;
    let mut b = TlsEcho::open(port, &ca, &revoked)?;

    let with_crl = (
        "ROOTCA".to_string(),
        any::<Secret>(
            &d,
            json!({"name": "ROOTCA", "validation_context": {
                "trusted_ca": {"inline_string": ca.pem()},
                "crl": {"inline_string": ca.crl(&[&revoked])?},
                "only_verify_leaf_cert_crl": true,
            }}),
        ),
    );
    cache.set(SECRET, [cert_secret(&d, "default", &server_leaf), with_crl]);
    wait_until("the revoked client's connection closed", || {
        ferry.stat("listener.inbound-tcp.ferry.tls_revoked_closed") == 1
    })?;
    ensure!(
        !b.echo("after")?,
        "the revoked client's connection is still open"
    );
    ensure!(a.echo("after")?, "the other client's connection was closed");
    ensure!(
        TlsEcho::open(port, &ca, &revoked).is_err(),
        "the revoked client completed a new handshake"
    );
    TlsEcho::open(port, &ca, &kept).context("a new connection of the other client")?;
    Ok(())
}

/// A TLS server that answers one HTTP/1.1 request per connection with the
/// cipher suite it negotiated, choosing by the client's order, and keeps
/// the suites each ClientHello offered, in order.
struct SuiteProbe {
    port: u16,
    offered: std::sync::Arc<std::sync::Mutex<Vec<Vec<rustls::CipherSuite>>>>,
}

#[derive(Debug)]
struct RecordOffer {
    key: std::sync::Arc<rustls::sign::CertifiedKey>,
    offered: std::sync::Arc<std::sync::Mutex<Vec<Vec<rustls::CipherSuite>>>>,
}

impl rustls::server::ResolvesServerCert for RecordOffer {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        self.offered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hello.cipher_suites().to_vec());
        Some(self.key.clone())
    }
}

/// ring with every suite it has, in rustls's order.
fn all_suites() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = rustls::crypto::ring::ALL_CIPHER_SUITES.to_vec();
    p
}

impl SuiteProbe {
    fn start(leaf: &Leaf) -> Result<SuiteProbe> {
        use rustls::pki_types::pem::PemObject;
        let provider = std::sync::Arc::new(all_suites());
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
        let key = rustls::sign::CertifiedKey::new(
            vec![rustls::pki_types::CertificateDer::from(leaf.der.clone())],
            provider.key_provider.load_private_key(key)?,
        );
        let offered = std::sync::Arc::default();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(std::sync::Arc::new(RecordOffer {
                key: std::sync::Arc::new(key),
                offered: std::sync::Arc::clone(&offered),
            }));
        config.ignore_client_order = false;
        let config = std::sync::Arc::new(config);
        let l = StdListener::bind(("127.0.0.1", 0))?;
        let port = l.local_addr()?.port();
        std::thread::spawn(move || {
            for tcp in l.incoming().flatten() {
                let config = config.clone();
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut s = rustls::StreamOwned::new(conn, tcp);
                    let mut r = BufReader::new(&mut s);
                    let mut line = String::new();
                    while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                        line.clear();
                    }
                    let suite = s
                        .conn
                        .negotiated_cipher_suite()
                        .map(|c| format!("{:?}", c.suite()))
                        .unwrap_or_default();
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{suite}",
                        suite.len()
                    );
                    let _ = s.flush();
                });
            }
        });
        Ok(SuiteProbe { port, offered })
    }

    /// The suites the last ClientHello offered that ring knows, in order.
    fn last_offer(&self) -> Vec<rustls::CipherSuite> {
        let known: Vec<_> = rustls::crypto::ring::ALL_CIPHER_SUITES
            .iter()
            .map(|s| s.suite())
            .collect();
        self.offered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map(|o| o.iter().filter(|s| known.contains(s)).copied().collect())
            .unwrap_or_default()
    }
}

/// The suite a TLS server on `port` picks for a client offering `suites`,
/// in that order, over `version`.
fn suite_chosen(
    port: u16,
    ca: &Ca,
    version: &'static rustls::SupportedProtocolVersion,
    suites: &[rustls::SupportedCipherSuite],
) -> Result<rustls::CipherSuite> {
    use rustls::pki_types::pem::PemObject;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = suites.to_vec();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(
        ca.pem().as_bytes(),
    )?)?;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[version])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), SERVER_DNS.try_into()?)?;
    let mut tcp = std::net::TcpStream::connect_timeout(&local(port), Duration::from_secs(3))?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    conn.negotiated_cipher_suite()
        .map(|s| s.suite())
        .context("no suite negotiated")
}

/// Ferry picks and offers TLS cipher suites as Envoy does. As a server it
/// takes the client's first suite it speaks in TLS 1.3, and its own order in
/// TLS 1.2 unless `prefer_client_ciphers`; as a client it offers Envoy's
/// order (TLS 1.3 AES-128-GCM, AES-256-GCM, ChaCha20, then Envoy's default
/// TLS 1.2 list, and only the TLS 1.2 list where TLS 1.3 is not allowed,
/// Envoy's default for upstreams), so a server that follows the client's
/// order negotiates the same suite with either.
#[test]
fn cipher_suites_are_chosen_and_offered_in_envoys_order() -> Result<()> {
    use rustls::crypto::ring::cipher_suite as cs;
    use rustls::version::{TLS12, TLS13};
    let ca = Ca::new("mesh")?;
    let server_leaf = ca.leaf(SERVER_ID, &[SERVER_DNS])?;
    let app_port = app()?;
    let probe = SuiteProbe::start(&server_leaf)?;
    let inline = |s: &str| json!({"inline_string": s});
    let endpoint = |name: &str, port: u16| {
        json!({"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]})
    };
    let listener = |name: &str, port: u16, cluster: &str| {
        json!({
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [hcm(name, cluster)]}]
        })
    };
    let tls_listener = |name: &str, port: u16, prefer_client_ciphers: bool| {
        let mut l = listener(name, port, "app");
        l["filter_chains"][0]["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "prefer_client_ciphers": prefer_client_ciphers,
                "common_tls_context": {
                    "tls_certificates": [{"certificate_chain": inline(&server_leaf.cert_pem),
                                          "private_key": inline(&server_leaf.key_pem)}]
                }
            }
        });
        l
    };
    // An upstream TLS context to the probe; `max`: the highest version.
    let to_probe = |name: &str, max: Option<&str>| {
        let mut common = json!({"validation_context": {"trusted_ca": inline(&ca.pem())}});
        if let Some(max) = max {
            common["tls_params"] = json!({"tls_maximum_protocol_version": max});
        }
        json!({
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": endpoint(name, probe.port),
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": SERVER_DNS,
                "common_tls_context": common
            }}
        })
    };
    let bootstrap = |[tls, client_order, plain12, plain13]: [u16; 4]| {
        json!({"static_resources": {
            "listeners": [
                tls_listener("tls", tls, false),
                tls_listener("client_order", client_order, true),
                listener("plain12", plain12, "probe12"),
                listener("plain13", plain13, "probe13"),
            ],
            "clusters": [
                {"name": "app", "type": "STATIC", "connect_timeout": "1s", "load_assignment": endpoint("app", app_port)},
                to_probe("probe12", None),
                to_probe("probe13", Some("TLSv1_3")),
            ]
        }})
    };
    // Clients whose order is not Envoy's.
    let offers: [(
        &'static rustls::SupportedProtocolVersion,
        Vec<rustls::SupportedCipherSuite>,
    ); 6] = [
        (
            &TLS13,
            vec![
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_128_GCM_SHA256,
            ],
        ),
        (
            &TLS13,
            vec![
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
            ],
        ),
        (
            &TLS13,
            vec![cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384],
        ),
        (
            &TLS12,
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
        ),
        (
            &TLS12,
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
        ),
        (
            &TLS12,
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
        ),
    ];
    // What one proxy does: the suite each of its TLS listeners picks for
    // each offer, then for each upstream cluster the suite the probe took
    // and the offer it took it from.
    let observe = |[tls, client_order, plain12, plain13]: [u16; 4]| -> Result<Vec<String>> {
        wait_until("the TLS listeners", || {
            accepts(tls) && accepts(client_order)
        })?;
        let mut seen = Vec::new();
        for port in [tls, client_order] {
            for (version, suites) in &offers {
                let chosen = suite_chosen(port, &ca, version, suites)?;
                seen.push(format!("{chosen:?}"));
            }
        }
        for plain in [plain12, plain13] {
            let (status, body) = get_plain(plain)?;
            ensure!(status == 200, "{status} {body}");
            seen.push(body);
            seen.push(format!("{:?}", probe.last_offer()));
        }
        Ok(seen)
    };
    let ports = || [free_port(), free_port(), free_port(), free_port()];
    let at = ports();
    let ferry = Ferry::start(&bootstrap(at).to_string())?;
    let from_ferry = observe(at)?;
    drop(ferry);
    let at = ports();
    let envoy = Envoy::start(&bootstrap(at).to_string())?;
    let from_envoy = observe(at).with_context(|| envoy.log())?;
    ensure!(
        from_ferry == from_envoy,
        "Ferry: {from_ferry:#?}\nEnvoy: {from_envoy:#?}"
    );
    // And what they are: TLS 1.3 by the client's order; TLS 1.2 by the
    // server's (AES-128-GCM and ChaCha20 before AES-256-GCM), or by the
    // client's with `prefer_client_ciphers`; upstream, AES-128-GCM first.
    let expected = [
        "TLS13_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256",
        "TLS13_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256",
        "TLS13_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ];
    ensure!(from_ferry[..13] == expected, "{from_ferry:#?}");
    ensure!(
        from_ferry[14] == "TLS13_AES_128_GCM_SHA256",
        "{from_ferry:#?}"
    );
    Ok(())
}
