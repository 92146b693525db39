//! HBONE, the server side: a sidecar fed the exact shapes istiod sends a
//! pod with `ENABLE_HBONE` (the `connect_terminate` listener — mutual TLS
//! 1.3 with ALPN h2 and a trust-domain SAN prefix, an HTTP/2 connection
//! manager terminating CONNECT on a `connect_matcher` route to
//! `main_internal`, `set_filter_state` handing the authority, the caller's
//! address and its SPIFFE identity to the upstream connection; the
//! `main_internal` internal cluster and listener, whose `original_dst`
//! filter takes the destination and source from that filter state, whose
//! inbound chain is limited to the pod's own IP and guarded by RBAC on the
//! peer principal in filter state) in front of a plain TCP echo app. An
//! HBONE client written here (h2 CONNECT over mTLS, as ztunnel calls a pod)
//! reaches the app, is refused a chain for an IP that is not the pod's, is
//! refused at TLS with a certificate of another trust domain or none, and is
//! allowed or denied by identity. Envoy 1.40 given the same bootstrap must
//! give the same outcomes. Last, a calling sidecar with istiod's client
//! shapes (`connect_originate`) reaches the app through the pod's sidecar,
//! in every pairing of Ferry and Envoy.
//!
//! Envoy comes from `ferry_tests::envoy`; without it only Ferry's half runs
//! (with a note), except under `CI=true`, where a missing Envoy fails.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::hbone::{End, Expect, HboneCall, HboneTunnel, Outcome};
use ferry_tests::istiod_hbone::{
    connect_originate_cluster, connect_originate_listener, internal_listener_extension,
    service_cluster,
};
use ferry_tests::pki::Ca;
use ferry_tests::proxy::{Bootstrap, Ferry, RunLock, TempDir, free_port, local, tcp_proxy};
use serde_json::{Value, json};

/// The pod's own IP (the app listens there; `main_internal`'s chain is
/// limited to it).
const POD_IP: [u8; 4] = [127, 0, 15, 1];
/// Another IP, not the pod's.
const OTHER_IP: [u8; 4] = [127, 0, 15, 9];
/// Where the HBONE client connects from: the inner chain's RBAC requires
/// this downstream address, which only the filter state carries there.
const CALLER_IP: [u8; 4] = [127, 0, 16, 7];
const POD_ID: &str = "spiffe://cluster.local/ns/default/sa/echo";
/// The identity the AuthorizationPolicy allows.
const ALLOWED_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
/// One of the mesh it does not.
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/other";
/// Of another trust domain (signed by the same root).
const FOREIGN_ID: &str = "spiffe://evil.example/ns/default/sa/sleep";
/// The server certificate's DNS name the client checks.
const POD_DNS: &str = "echo.default";

fn file(dir: &Path, f: &str) -> Value {
    json!({"filename": dir.join(f).display().to_string()})
}

/// istiod's `connect_terminate` (listener_waypoint.go
/// `buildConnectTerminateListener`), with the workload certificate and
/// root as files instead of SDS and stock Envoy's `envoy.string` factory
/// (as istiod writes it for proxies before 1.29.2).
fn connect_terminate(dir: &Path, port: u16) -> Value {
    let value = |key: &str, fmt: &str, factory: Option<&str>| {
        let mut v = json!({
            "object_key": key,
            "format_string": {"text_format_source": {"inline_string": fmt}},
            "shared_with_upstream": "ONCE",
        });
        if let Some(f) = factory {
            v["factory_key"] = json!(f);
        }
        v
    };
    json!({
        "name": "connect_terminate",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "connection_balance_config": {"exact_balance": {}},
        "filter_chains": [{
            "name": "default",
            "transport_socket": {"name": "tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{"certificate_chain": file(dir, "pod.pem"), "private_key": file(dir, "pod.key")}],
                    "validation_context": {
                        "trusted_ca": file(dir, "root.pem"),
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}],
                    },
                },
            }},
            "filters": [{"name": "connect_terminate", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "connect_terminate",
                "http2_protocol_options": {"allow_connect": true, "max_concurrent_streams": 100},
                "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                "stream_idle_timeout": "0s",
                "use_remote_address": false,
                "route_config": {"name": "default", "virtual_hosts": [{"name": "default", "domains": ["*"],
                    "routes": [{"name": "default", "match": {"connect_matcher": {}}, "route": {
                        "cluster": "main_internal",
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                    }}]}]},
                "http_filters": [
                    {"name": "connect_authority", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
                        "on_request_headers": [
                            value("envoy.filters.listener.original_dst.local_ip", "%REQ(:AUTHORITY)%", None),
                            value("io.istio.connect_authority", "%REQ(:AUTHORITY)%", Some("envoy.string")),
                            value("envoy.filters.listener.original_dst.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%", None),
                            value("io.istio.peer_principal", "%DOWNSTREAM_PEER_URI_SAN%", Some("envoy.string")),
                            value("io.istio.local_principal", "%DOWNSTREAM_LOCAL_URI_SAN%", Some("envoy.string")),
                        ],
                    }},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                ],
            }}],
        }],
    })
}

/// istiod's `main_internal` cluster (cluster_waypoint.go).
fn main_internal_cluster() -> Value {
    json!({
        "name": "main_internal",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "main_internal", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "main_internal"}}}}]}]},
        "transport_socket": {"name": "internal_upstream", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            "transport_socket": {"name": "raw_buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}},
        }},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "300s"},
            "use_downstream_protocol_config": {},
        }},
    })
}

/// istiod's `main_internal` listener: the pod's inbound chain for the app
/// port, limited to the pod's IP, with the AuthorizationPolicy as network
/// RBAC on the principal in filter state (and, here, on the downstream
/// address the filter state restores).
fn main_internal_listener(app_port: u16) -> Value {
    let pod = std::net::Ipv4Addr::from(POD_IP).to_string();
    let caller = std::net::Ipv4Addr::from(CALLER_IP).to_string();
    let cluster = format!("inbound|{app_port}||");
    json!({
        "name": "main_internal",
        "internal_listener": {},
        "traffic_direction": "INBOUND",
        "continue_on_listener_filters_timeout": true,
        "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
        "filter_chains": [{
            "name": cluster,
            "filter_chain_match": {"destination_port": app_port,
                "prefix_ranges": [{"address_prefix": pod, "prefix_len": 32}]},
            "filters": [
                {"name": "envoy.filters.network.rbac", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
                    "stat_prefix": "tcp.",
                    "rules": {"policies": {"ns[default]-policy[allow-sleep]-rule[0]": {
                        "permissions": [{"and_rules": {"rules": [{"any": true}]}}],
                        "principals": [{"and_ids": {"ids": [
                            {"or_ids": {"ids": [{"filter_state": {
                                "key": "io.istio.peer_principal",
                                "string_match": {"exact": ALLOWED_ID}}}]}},
                            {"remote_ip": {"address_prefix": caller, "prefix_len": 32}},
                        ]}}],
                    }}},
                }},
                {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": cluster, "cluster": cluster}},
            ],
        }],
    })
}

/// `main_internal` as istiod builds it for a port whose protocol is
/// sniffed: the TLS and HTTP inspectors after `original_dst`, and chains
/// told apart by what the caller sends first. Here HTTP/1.1 takes the chain
/// to the app; anything else takes a chain whose RBAC denies everyone.
fn main_internal_sniffing(app_port: u16) -> Value {
    let pod = std::net::Ipv4Addr::from(POD_IP).to_string();
    let cluster = format!("inbound|{app_port}||");
    let filter = |name: &str, ty: &str| json!({"name": name, "typed_config": {"@type": format!("type.googleapis.com/{ty}")}});
    let tcp_proxy = json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": cluster, "cluster": cluster}});
    json!({
        "name": "main_internal",
        "internal_listener": {},
        "traffic_direction": "INBOUND",
        "continue_on_listener_filters_timeout": true,
        "listener_filters": [
            filter("envoy.filters.listener.original_dst", "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
            filter("envoy.filters.listener.tls_inspector", "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"),
            filter("envoy.filters.listener.http_inspector", "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"),
        ],
        "filter_chains": [
            {
                "name": "http",
                "filter_chain_match": {"destination_port": app_port,
                    "prefix_ranges": [{"address_prefix": pod, "prefix_len": 32}],
                    "application_protocols": ["http/1.1"]},
                "filters": [tcp_proxy],
            },
            {
                "name": "other",
                "filter_chain_match": {"destination_port": app_port,
                    "prefix_ranges": [{"address_prefix": pod, "prefix_len": 32}]},
                "filters": [
                    {"name": "envoy.filters.network.rbac", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
                        "stat_prefix": "tcp.", "rules": {}}},
                    tcp_proxy,
                ],
            },
        ],
    })
}

/// The whole pod-side configuration.
fn config(dir: &Path, hbone_port: u16, app_port: u16) -> Value {
    config_with(dir, hbone_port, main_internal_listener(app_port), app_port)
}

/// The pod-side configuration with this `main_internal` listener.
fn config_with(dir: &Path, hbone_port: u16, main_internal: Value, app_port: u16) -> Value {
    let pod = std::net::Ipv4Addr::from(POD_IP).to_string();
    let inbound = format!("inbound|{app_port}||");
    let doc = Bootstrap::new()
        .listener(connect_terminate(dir, hbone_port))
        .listener(main_internal)
        .cluster(main_internal_cluster())
        .cluster(json!({
            "name": inbound,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {"cluster_name": inbound, "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": pod, "port_value": app_port}}}}]}]},
        }))
        .render();
    let mut doc: Value = serde_json::from_str(&doc).unwrap_or(Value::Null);
    doc["bootstrap_extensions"] = internal_listener_extension();
    doc
}

/// A calling sidecar (istiod's client shapes): an outbound TCP listener on
/// `port` to the service whose one endpoint is the pod's app, reached
/// through `connect_originate` over HBONE to `hbone_port`, from the
/// caller's address, as `ALLOWED_ID` (`dir` holds its certificate).
fn client_config(dir: &Path, port: u16, hbone_port: u16, app_port: u16) -> Value {
    let service = "outbound|8080||echo.default.svc.cluster.local";
    let mut originate = connect_originate_cluster(dir, hbone_port);
    originate["upstream_bind_config"] = json!({"source_address": {
        "address": std::net::Ipv4Addr::from(CALLER_IP).to_string(), "port_value": 0}});
    let doc = Bootstrap::new()
        .listener(json!({
            "name": "outbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [tcp_proxy("outbound", service)]}],
        }))
        .listener(connect_originate_listener())
        .cluster(service_cluster(
            service,
            &[SocketAddr::from((POD_IP, app_port))],
        ))
        .cluster(originate)
        .render();
    let mut doc: Value = serde_json::from_str(&doc).unwrap_or(Value::Null);
    doc["bootstrap_extensions"] = internal_listener_extension();
    doc
}

/// A plain TCP echo app on the pod's IP: each connection's bytes back,
/// then its end (half-close both ways). A connection whose first bytes are
/// `end\n` is answered `ending\n` and ended at once (half-close), the
/// caller's bytes then read to their end; one whose first bytes are
/// `close\n` is answered `closing\n` and closed as soon as the caller
/// sends more, without reading it (the kernel resets the connection).
struct EchoApp {
    port: u16,
}

impl EchoApp {
    fn start() -> Result<EchoApp> {
        let listener = std::net::TcpListener::bind(SocketAddr::from((POD_IP, 0)))?;
        let port = listener.local_addr()?.port();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let Ok(mut r) = s.try_clone() else { return };
                    let mut first = [0u8; 1024];
                    let n = r.read(&mut first).unwrap_or(0);
                    match &first[..n] {
                        b"end\n" => {
                            let _ = s.write_all(b"ending\n");
                            let _ = s.shutdown(std::net::Shutdown::Write);
                            let _ = std::io::copy(&mut r, &mut std::io::sink());
                        }
                        b"close\n" => {
                            let _ = s.write_all(b"closing\n");
                            // Closed with the caller's next bytes unread.
                            let _ = s.peek(&mut first);
                        }
                        echo => {
                            if s.write_all(echo).is_ok() && n > 0 {
                                let _ = std::io::copy(&mut r, &mut s);
                            }
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        }
                    }
                });
            }
        });
        Ok(EchoApp { port })
    }
}

/// The mesh of one test: its root, the pod's certificate, the app.
struct Pod {
    dir: TempDir,
    ca: Ca,
    app: EchoApp,
}

impl Pod {
    fn new() -> Result<Pod> {
        let dir = TempDir::new("hbone-server")?;
        let ca = Ca::new("mesh root")?;
        let pod = ca.leaf(POD_ID, &[POD_DNS])?;
        std::fs::write(dir.path().join("pod.pem"), &pod.cert_pem)?;
        std::fs::write(dir.path().join("pod.key"), &pod.key_pem)?;
        std::fs::write(dir.path().join("root.pem"), ca.pem())?;
        Ok(Pod {
            dir,
            ca,
            app: EchoApp::start()?,
        })
    }

    /// Calls the proxy on `hbone_port` as `client` (a SPIFFE identity of
    /// this mesh's root, or no certificate).
    fn call(
        &self,
        client: Option<&str>,
        hbone_port: u16,
        target_ip: [u8; 4],
        payload: &str,
    ) -> Result<Outcome> {
        let leaf = client.map(|id| self.ca.leaf(id, &[])).transpose()?;
        let authority = SocketAddr::from((target_ip, self.app.port)).to_string();
        HboneCall {
            ca_pem: &self.ca.pem(),
            client: leaf.as_ref(),
            from: Some(CALLER_IP.into()),
            to: SocketAddr::from((POD_IP, hbone_port)),
            server: Expect::Dns(POD_DNS),
            authority: &authority,
            payload,
            end_after_reply: false,
        }
        .run()
    }

    /// A CONNECT held open to the app as the allowed caller.
    fn tunnel(&self, hbone_port: u16) -> Result<HboneTunnel> {
        let leaf = self.ca.leaf(ALLOWED_ID, &[])?;
        let authority = SocketAddr::from((POD_IP, self.app.port)).to_string();
        HboneCall {
            ca_pem: &self.ca.pem(),
            client: Some(&leaf),
            from: Some(CALLER_IP.into()),
            to: SocketAddr::from((POD_IP, hbone_port)),
            server: Expect::Dns(POD_DNS),
            authority: &authority,
            payload: "",
            end_after_reply: false,
        }
        .tunnel()
    }

    /// The outcome of `call` through Ferry, and through Envoy when it is
    /// available.
    fn through_both<T>(&self, call: impl Fn(&Pod, u16) -> Result<T>) -> Result<(T, Option<T>)> {
        self.through_both_with(main_internal_listener, call)
    }

    /// [`Pod::through_both`] with the `main_internal` listener `inner`
    /// builds for the app's port.
    fn through_both_with<T>(
        &self,
        inner: impl Fn(u16) -> Value,
        call: impl Fn(&Pod, u16) -> Result<T>,
    ) -> Result<(T, Option<T>)> {
        let port = free_port();
        let cfg = config_with(self.dir.path(), port, inner(self.app.port), self.app.port);
        let ferry = Ferry::start(&cfg.to_string())?;
        let f = call(self, port).with_context(|| format!("through ferry:\n{}", ferry.log()))?;
        drop(ferry);
        let Some(bin) = envoy::bin()? else {
            return Ok((f, None));
        };
        let port = free_port();
        let cfg = config_with(self.dir.path(), port, inner(self.app.port), self.app.port);
        let e = Envoy::start(&bin, &cfg, port)?;
        let o = call(self, port).with_context(|| format!("through envoy:\n{}", e.log()))?;
        Ok((f, Some(o)))
    }
}

fn same<T: PartialEq + std::fmt::Debug>(ferry: &T, envoy: &Option<T>) {
    if let Some(e) = envoy {
        assert_eq!(ferry, e, "Ferry and Envoy differ");
    }
}

#[test]
fn hbone_caller_reaches_the_app_through_connect_terminate() -> Result<()> {
    let _lock = RunLock::shared();
    let pod = Pod::new()?;
    let payload = "ping over hbone\nand more\n";
    let (ferry, envoy) =
        pod.through_both(|p, port| p.call(Some(ALLOWED_ID), port, POD_IP, payload))?;
    assert_eq!(
        ferry,
        Outcome::Answered {
            status: 200,
            echoed: payload.to_string(),
            end: End::Clean,
        },
        "200, the app's echo, then the end of the stream"
    );
    same(&ferry, &envoy);
    Ok(())
}

/// The app's end reaches the caller as Envoy passes it on, the caller's
/// side still open: the app's half-close (its reply, then the end of its
/// side) ends the CONNECT stream with END_STREAM, the caller's own end then
/// closing the tunnel; the app's close with the caller's bytes unread (a
/// reset) closes the internal connection fully, and the stream is reset
/// (RST_STREAM) rather than ended.
#[test]
fn the_apps_close_resets_the_stream_and_its_half_close_ends_it() -> Result<()> {
    let _lock = RunLock::shared();
    let pod = Pod::new()?;
    let (ferry, envoy) = pod.through_both(|p, port| {
        let mut half = p.tunnel(port)?;
        let half = (half.exchange("end\n")?, half.read_to_end()?, half.finish()?);
        let mut closed = p.tunnel(port)?;
        let reply = closed.exchange("close\n")?;
        closed.send("unread\n")?;
        Ok((half, (reply, closed.read_to_end()?)))
    })?;
    assert_eq!(
        ferry,
        (
            (
                "ending\n".to_string(),
                (String::new(), End::Clean),
                (String::new(), End::Clean)
            ),
            ("closing\n".to_string(), (String::new(), End::Reset)),
        )
    );
    same(&ferry, &envoy);
    Ok(())
}

/// A CONNECT to an IP that is not the pod's finds no chain on
/// `main_internal` (its chains are limited to the pod's IPs): the internal
/// connection fails to connect, the CONNECT is answered 503 (Envoy's
/// connect failure, where ztunnel answers 400) and the app is never reached.
#[test]
fn connect_to_an_ip_not_the_pods_finds_no_chain() -> Result<()> {
    let _lock = RunLock::shared();
    let pod = Pod::new()?;
    let (ferry, envoy) =
        pod.through_both(|p, port| p.call(Some(ALLOWED_ID), port, OTHER_IP, "ping\n"))?;
    assert_eq!(
        ferry,
        Outcome::Answered {
            status: 503,
            echoed: "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure".into(),
            end: End::Clean,
        }
    );
    same(&ferry, &envoy);
    Ok(())
}

/// Protocol detection on `main_internal` (istiod's shape for a sniffed
/// port): the tunnelled bytes choose the chain. An HTTP/1.1 request reaches
/// the app; other bytes land on the chain that denies; a CONNECT to another
/// IP is answered 200 (the internal connection is made before its first
/// bytes can choose a chain) and then ends, as in Envoy.
///
/// Envoy 1.40 agrees on the last two. On the first it does not: this
/// client ends its sending side together with its first bytes, and Envoy's
/// inspectors on the in-process connection then see the end before the
/// bytes, detect nothing and take the other chain (its trace shows the TLS
/// inspector starting and nothing detected). Ferry's inspectors read what
/// arrived before the end, as they would peek at a socket.
#[test]
fn inspectors_on_main_internal_choose_the_chain_by_the_first_bytes() -> Result<()> {
    let _lock = RunLock::shared();
    let pod = Pod::new()?;
    let http = "GET / HTTP/1.1\r\nHost: app\r\n\r\n";
    let (ferry, envoy) = pod.through_both_with(main_internal_sniffing, |p, port| {
        Ok((
            p.call(Some(ALLOWED_ID), port, POD_IP, http)?,
            p.call(Some(ALLOWED_ID), port, POD_IP, "raw bytes\n")?,
            p.call(Some(ALLOWED_ID), port, OTHER_IP, http)?,
        ))
    })?;
    let answered = |echoed: &str| Outcome::Answered {
        status: 200,
        echoed: echoed.to_string(),
        end: End::Clean,
    };
    assert_eq!(ferry.0, answered(http), "HTTP/1.1 takes the app's chain");
    assert_eq!(ferry.1, answered(""), "other bytes take the denying chain");
    assert_eq!(ferry.2, answered(""), "another IP finds no chain");
    same(
        &(ferry.1, ferry.2),
        &envoy.map(|(_, raw, other)| (raw, other)),
    );
    Ok(())
}

/// mTLS on 15008: a client certificate of another trust domain fails the
/// SAN prefix check, and none at all is refused.
#[test]
fn tls_refuses_foreign_trust_domain_and_missing_certificate() -> Result<()> {
    let _lock = RunLock::shared();
    let pod = Pod::new()?;
    for client in [Some(FOREIGN_ID), None] {
        let (ferry, envoy) = pod.through_both(|p, port| p.call(client, port, POD_IP, "ping\n"))?;
        assert_eq!(ferry, Outcome::Refused, "{client:?}");
        same(&ferry, &envoy);
    }
    Ok(())
}

/// The AuthorizationPolicy on `main_internal` reads the caller's identity
/// from the filter state `set_filter_state` put on the CONNECT and shared
/// with the internal connection (and the downstream address restored from
/// it): the allowed identity reaches the app, another of the mesh does not.
#[test]
fn rbac_on_the_peer_principal_carried_in_filter_state() -> Result<()> {
    let _lock = RunLock::shared();
    let pod = Pod::new()?;
    let payload = "who goes there\n";
    let (ferry, envoy) = pod.through_both(|p, port| {
        let allowed = p.call(Some(ALLOWED_ID), port, POD_IP, payload)?;
        let denied = p.call(Some(OTHER_ID), port, POD_IP, payload)?;
        Ok((allowed, denied))
    })?;
    let (allowed, denied) = &ferry;
    assert_eq!(
        allowed,
        &Outcome::Answered {
            status: 200,
            echoed: payload.to_string(),
            end: End::Clean,
        },
        "the allowed identity reaches the app"
    );
    // The inner connection is made, then closed by RBAC on the first
    // bytes: the stream ends with nothing from the app.
    assert_eq!(
        denied,
        &Outcome::Answered {
            status: 200,
            echoed: String::new(),
            end: End::Clean,
        },
        "another identity does not"
    );
    same(&ferry, &envoy);
    Ok(())
}

/// One sidecar of a pairing, kept running while held.
enum Sidecar {
    Ferry(Ferry),
    Envoy(Envoy),
}

impl Sidecar {
    fn start(envoy_bin: Option<&Path>, cfg: &Value, port: u16) -> Result<Sidecar> {
        Ok(match envoy_bin {
            None => Sidecar::Ferry(Ferry::start(&cfg.to_string())?),
            Some(bin) => Sidecar::Envoy(Envoy::start(bin, cfg, port)?),
        })
    }

    fn log(&self) -> String {
        match self {
            Sidecar::Ferry(f) => f.log(),
            Sidecar::Envoy(e) => e.log(),
        }
    }
}

/// Sidecars talk HBONE to each other: a calling sidecar's outbound TCP
/// connection goes through `connect_originate` (HTTP/2 CONNECT over mTLS)
/// to the pod's sidecar, which terminates it on `connect_terminate` and
/// hands it to the app through `main_internal` (whose policy admits the
/// caller by the identity and address the filter state carries). Ferry to
/// Ferry, and, with Envoy 1.40, Ferry to Envoy, Envoy to Ferry and Envoy to
/// Envoy: the app's echo comes back whole each time, half-close passed on.
#[test]
fn sidecars_talk_hbone_to_each_other_ferry_and_envoy_alike() -> Result<()> {
    let _lock = RunLock::shared();
    let pod = Pod::new()?;
    let client = pod.ca.leaf(ALLOWED_ID, &[])?;
    std::fs::write(pod.dir.path().join("cert.pem"), &client.cert_pem)?;
    std::fs::write(pod.dir.path().join("key.pem"), &client.key_pem)?;
    let envoy = envoy::bin()?;
    let mut kinds: Vec<Option<&Path>> = vec![None];
    if let Some(bin) = envoy.as_deref() {
        kinds.push(Some(bin));
    }
    let name = |k: &Option<&Path>| if k.is_some() { "envoy" } else { "ferry" };
    for caller in &kinds {
        for callee in &kinds {
            let hbone_port = free_port();
            let server = Sidecar::start(
                *callee,
                &config(pod.dir.path(), hbone_port, pod.app.port),
                hbone_port,
            )?;
            let port = free_port();
            let client_cfg = client_config(pod.dir.path(), port, hbone_port, pod.app.port);
            let sidecar = Sidecar::start(*caller, &client_cfg, port)?;
            let payload = format!("{} to {}\nover hbone\n", name(caller), name(callee));
            let got = exchange(port, &payload).with_context(|| {
                format!("caller:\n{}\ncallee:\n{}", sidecar.log(), server.log())
            })?;
            assert_eq!(
                got,
                payload,
                "{} to {}: the app's echo, whole\ncaller:\n{}\ncallee:\n{}",
                name(caller),
                name(callee),
                sidecar.log(),
                server.log()
            );
        }
    }
    Ok(())
}

/// One TCP exchange through a sidecar's outbound listener: `payload` sent,
/// the sending side closed, everything read until the far end closes.
fn exchange(port: u16, payload: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(payload.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut got = String::new();
    s.read_to_string(&mut got)?;
    Ok(got)
}

/// CONNECT termination is the connection manager's, not HTTP/2's: an
/// HTTP/1.1 CONNECT on a `connect_matcher` route with `connect_config` is
/// answered 200 and then carries the bytes to the app and back, in Ferry
/// as in Envoy; a CONNECT the connection manager does not allow is
/// refused with 403.
#[test]
fn http1_connect_is_terminated_too() -> Result<()> {
    let _lock = RunLock::shared();
    let pod = Pod::new()?;
    let target = SocketAddr::from((POD_IP, pod.app.port));
    let cfg = |port: u16, allow: bool| -> Value {
        let cluster = "app";
        let mut hcm = ferry_tests::proxy::http_connection_manager(
            "h1",
            vec![json!({"match": {"connect_matcher": {}}, "route": {
                "cluster": cluster,
                "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}, "enabled": allow}],
            }})],
        );
        hcm["typed_config"]["upgrade_configs"] = json!([]);
        let doc = Bootstrap::new()
            .listener(ferry_tests::proxy::listener(
                "h1",
                port,
                vec![json!({"filters": [hcm]})],
            ))
            .cluster(json!({
                "name": cluster,
                "type": "STATIC",
                "connect_timeout": "2s",
                "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": target.ip().to_string(), "port_value": target.port()}}}}]}]},
            }))
            .render();
        serde_json::from_str(&doc).unwrap_or(Value::Null)
    };
    // The status line's code, and what came back after the head.
    let call = |port: u16| -> Result<(String, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(local(port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let code = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        if code != "200" {
            return Ok((code, String::new()));
        }
        // No half-close: an HTTP/1 downstream's FIN ends the whole
        // connection in Envoy; the echo is read by its length.
        s.write_all(b"tunnelled\n")?;
        let mut rest = vec![0u8; "tunnelled\n".len()];
        s.read_exact(&mut rest)?;
        Ok((code, String::from_utf8_lossy(&rest).into_owned()))
    };
    for (allow, expected) in [
        (true, ("200".to_string(), "tunnelled\n".to_string())),
        (false, ("403".to_string(), String::new())),
    ] {
        let port = free_port();
        let ferry = Ferry::start(&cfg(port, allow).to_string())?;
        let got = call(port).with_context(|| ferry.log())?;
        assert_eq!(
            got,
            expected,
            "ferry, CONNECT allowed: {allow}\n{}",
            ferry.log()
        );
        drop(ferry);
        if let Some(bin) = envoy::bin()? {
            let port = free_port();
            let e = Envoy::start(&bin, &cfg(port, allow), port)?;
            let got = call(port).with_context(|| e.log())?;
            assert_eq!(
                got,
                expected,
                "envoy, CONNECT allowed: {allow}\n{}",
                e.log()
            );
        }
    }
    Ok(())
}

/// The end of an HTTP/1 CONNECT's downstream: Envoy's HTTP/1 codec knows
/// no half-close, so the client's FIN closes its connection and the tunnel
/// with it; the app's word after the client's end (`bye`) never comes
/// back. Ferry must do the same (an HTTP/2 CONNECT passes the end on as a
/// half-close instead: `hbone_caller_reaches_the_app_through_connect_terminate`).
#[test]
fn http1_connect_downstream_end_closes_the_tunnel() -> Result<()> {
    use std::io::{Read, Write};
    let _lock = RunLock::shared();
    // An app that echoes, then says `bye` once the client has ended.
    let listener = std::net::TcpListener::bind(SocketAddr::from((POD_IP, 0)))?;
    let target = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.write_all(b"bye\n");
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let cfg = |port: u16| -> Value {
        let mut hcm = ferry_tests::proxy::http_connection_manager(
            "h1",
            vec![json!({"match": {"connect_matcher": {}}, "route": {
                "cluster": "app",
                "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
            }})],
        );
        hcm["typed_config"]["upgrade_configs"] = json!([]);
        let doc = Bootstrap::new()
            .listener(ferry_tests::proxy::listener(
                "h1",
                port,
                vec![json!({"filters": [hcm]})],
            ))
            .cluster(json!({
                "name": "app",
                "type": "STATIC",
                "connect_timeout": "2s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": target.ip().to_string(), "port_value": target.port()}}}}]}]},
            }))
            .render();
        serde_json::from_str(&doc).unwrap_or(Value::Null)
    };
    // The head's status, the echo, then what came after the client's end.
    let call = |port: u16| -> Result<(String, String, String)> {
        let mut s = std::net::TcpStream::connect(local(port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let code = String::from_utf8_lossy(&head)
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        s.write_all(b"tunnelled\n")?;
        let mut echo = vec![0u8; "tunnelled\n".len()];
        s.read_exact(&mut echo)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        // A reset is an end too: what came before it counts.
        let _ = s.read_to_end(&mut rest);
        Ok((
            code,
            String::from_utf8_lossy(&echo).into_owned(),
            String::from_utf8_lossy(&rest).into_owned(),
        ))
    };
    let expected = ("200".to_string(), "tunnelled\n".to_string(), String::new());
    let port = free_port();
    let ferry = Ferry::start(&cfg(port).to_string())?;
    let got = call(port).with_context(|| ferry.log())?;
    assert_eq!(got, expected, "ferry\n{}", ferry.log());
    drop(ferry);
    if let Some(bin) = envoy::bin()? {
        let port = free_port();
        let e = Envoy::start(&bin, &cfg(port), port)?;
        let got = call(port).with_context(|| e.log())?;
        assert_eq!(got, expected, "envoy\n{}", e.log());
    }
    Ok(())
}
