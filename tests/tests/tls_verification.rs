//! Peer certificate verification proven equal to Envoy's, with the peers an
//! attacker would bring: every validation shape istiod and istio-agent emit
//! (inline CA and SANs, the combined context completed by an SDS `ROOTCA`,
//! the SPIFFE validator inline and by SDS) and the other verification
//! settings (SPKI and certificate pins, CRLs), each run through the same
//! static bootstrap on Ferry and on Envoy 1.40. Clients present a good mesh
//! certificate, a self-signed forgery of the same SPIFFE identity, one from
//! an unrelated CA, one of another trust domain, an expired one, a revoked
//! one, or none; each verdict (the byte echoed through a TCP proxy, or the
//! connection refused) must be Envoy's, and the forgeries must fail
//! everywhere. Upstream, a server with a forged certificate is refused by
//! both. Configurations Envoy refuses as insecure (SAN matching without a
//! trusted CA) stop Ferry at start-up too.
//!
//! Envoy comes from `ferry_tests::envoy`; without it a test is skipped with a
//! note, except under `CI=true`, where a missing Envoy fails the test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::pki::{Ca, Leaf, client_config};
use ferry_tests::proxy::{App, Ferry, TempDir, free_port, local};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};

const ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_DNS: &str = "server.test";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// The certificates of one run.
struct Pki {
    mesh: Ca,
    foreign: Ca,
    server: Leaf,
    clients: Vec<(&'static str, Option<Leaf>)>,
    revoked_crl: String,
}

fn pki() -> Result<Pki> {
    let mesh = Ca::new("cluster.local")?;
    let other = Ca::new("unrelated")?;
    let foreign = Ca::new("foreign.org")?;
    let server = mesh.leaf(SERVER_ID, &[SERVER_DNS])?;
    let revoked = mesh.leaf(ID, &[])?;
    let revoked_crl = mesh.crl(&[&revoked])?;
    let now = time::OffsetDateTime::now_utc();
    let clients = vec![
        ("good", Some(mesh.leaf(ID, &[])?)),
        ("self-signed forgery", Some(Leaf::self_signed(ID, &[])?)),
        ("unrelated CA", Some(other.leaf(ID, &[])?)),
        (
            "other trust domain, mesh CA",
            Some(mesh.leaf("spiffe://evil.org/ns/default/sa/client", &[])?),
        ),
        (
            "foreign.org, its own CA",
            Some(foreign.leaf("spiffe://foreign.org/ns/default/sa/client", &[])?),
        ),
        (
            "expired",
            Some(mesh.leaf_with(ID, &[], |p| {
                p.not_before = now - time::Duration::days(10);
                p.not_after = now - time::Duration::days(1);
            })?),
        ),
        ("revoked", Some(revoked)),
        ("no certificate", None),
    ];
    Ok(Pki {
        mesh,
        foreign,
        server,
        clients,
        revoked_crl,
    })
}

fn inline(pem: &str) -> Value {
    json!({"inline_string": pem})
}

fn uri_prefix(prefix: &str) -> Value {
    json!([{"san_type": "URI", "matcher": {"prefix": prefix}}])
}

fn spiffe_validator(p: &Pki) -> Value {
    json!({
        "name": "envoy.tls.cert_validator.spiffe",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig",
            "trust_domains": [
                {"name": "cluster.local", "trust_bundle": inline(&p.mesh.pem())},
                {"name": "foreign.org", "trust_bundle": inline(&p.foreign.pem())},
            ],
        },
    })
}

/// One validation shape: the `common_tls_context` fields that say how the
/// client is checked, and the static secrets they name.
struct Shape {
    name: &'static str,
    validation: Value,
    secrets: Vec<Value>,
}

fn shapes(p: &Pki) -> Vec<Shape> {
    let root = |vc: Value| json!({"name": "ROOTCA", "validation_context": vc});
    let combined = json!({"combined_validation_context": {
        "default_validation_context": {"match_typed_subject_alt_names": uri_prefix("spiffe://cluster.local/")},
        "validation_context_sds_secret_config": {"name": "ROOTCA"},
    }});
    let good = p.clients[0].1.as_ref().map(|l| l.spki_sha256_base64());
    vec![
        Shape {
            name: "inline CA and SANs",
            validation: json!({"validation_context": {
                "trusted_ca": inline(&p.mesh.pem()),
                "match_typed_subject_alt_names": uri_prefix("spiffe://cluster.local/"),
            }}),
            secrets: vec![],
        },
        Shape {
            name: "combined, SDS ROOTCA (istiod)",
            validation: combined.clone(),
            secrets: vec![root(json!({"trusted_ca": inline(&p.mesh.pem())}))],
        },
        Shape {
            name: "SDS ROOTCA only",
            validation: json!({"validation_context_sds_secret_config": {"name": "ROOTCA"}}),
            secrets: vec![root(json!({"trusted_ca": inline(&p.mesh.pem())}))],
        },
        Shape {
            name: "SPIFFE validator inline",
            validation: json!({"validation_context": {
                "custom_validator_config": spiffe_validator(p),
                "match_typed_subject_alt_names": uri_prefix("spiffe://"),
            }}),
            secrets: vec![],
        },
        Shape {
            name: "combined, SDS ROOTCA with the SPIFFE validator (istio-agent)",
            validation: combined,
            secrets: vec![root(
                json!({"custom_validator_config": spiffe_validator(p)}),
            )],
        },
        Shape {
            name: "CA and SPKI pin",
            validation: json!({"validation_context": {
                "trusted_ca": inline(&p.mesh.pem()),
                "verify_certificate_spki": [good],
            }}),
            secrets: vec![],
        },
        Shape {
            name: "certificate hash pin, no CA",
            validation: json!({"validation_context": {
                "verify_certificate_hash": [p.clients[0].1.as_ref().map(Leaf::sha256_hex)],
            }}),
            secrets: vec![],
        },
        Shape {
            name: "CA and CRL (leaf only)",
            validation: json!({"validation_context": {
                "trusted_ca": inline(&p.mesh.pem()),
                "crl": inline(&p.revoked_crl),
                "only_verify_leaf_cert_crl": true,
            }}),
            secrets: vec![],
        },
    ]
}

/// A TLS-terminating TCP proxy on `port` in front of `echo`.
fn downstream_bootstrap(p: &Pki, shape: &Shape, port: u16, echo: u16) -> Value {
    let mut common = json!({
        "tls_certificates": [{
            "certificate_chain": inline(&p.server.cert_pem),
            "private_key": inline(&p.server.key_pem),
        }],
    });
    for (k, v) in shape.validation.as_object().into_iter().flatten() {
        common[k] = v.clone();
    }
    json!({
        "static_resources": {
            "secrets": shape.secrets,
            "listeners": [{
                "name": "mtls",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "require_client_certificate": true,
                            "common_tls_context": common,
                        },
                    },
                    "filters": [{
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "mtls",
                            "cluster": "echo",
                        },
                    }],
                }],
            }],
            "clusters": [static_cluster("echo", echo, None)],
        },
    })
}

fn static_cluster(name: &str, port: u16, transport_socket: Option<Value>) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        ]}]},
    });
    if let Some(ts) = transport_socket {
        c["transport_socket"] = ts;
    }
    c
}

/// Whether a client presenting `leaf` gets a byte echoed through the proxy
/// on `port` (the server's certificate is checked against the mesh CA).
fn echoed(p: &Pki, port: u16, leaf: Option<&Leaf>) -> bool {
    let attempt = || -> Result<()> {
        let config = client_config(&p.mesh.pem(), leaf, &[])?;
        let tcp = TcpStream::connect_timeout(&local(port), Duration::from_secs(3))?;
        tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
        let conn = rustls::ClientConnection::new(config, ServerName::try_from(SERVER_DNS)?)?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        s.write_all(b"ping\n")?;
        s.flush()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        ensure!(&buf == b"ping\n", "echoed {buf:?}");
        Ok(())
    };
    attempt().is_ok()
}

/// The verdicts of every client, in order, through a proxy on `port`.
fn verdicts(p: &Pki, port: u16) -> Vec<bool> {
    p.clients
        .iter()
        .map(|(_, leaf)| echoed(p, port, leaf.as_ref()))
        .collect()
}

fn start_ferry(config: &Value) -> Result<Ferry> {
    Ferry::start(&serde_json::to_string_pretty(config)?)
}

#[test]
fn client_certificates_are_verified_as_envoy_verifies_them() -> Result<()> {
    let envoy_bin = envoy::bin()?;
    let p = pki()?;
    let echo = App::mode("tcp")?;
    let mut report = String::new();
    for shape in shapes(&p) {
        let port = free_port();
        let config = downstream_bootstrap(&p, &shape, port, echo.port);
        let ferry = start_ferry(&config).with_context(|| shape.name)?;
        let ferry_says = verdicts(&p, port);
        drop(ferry);
        let envoy_says = match &envoy_bin {
            Some(bin) => {
                let e = Envoy::start(bin, &config, port).with_context(|| shape.name)?;
                let v = verdicts(&p, port);
                if std::env::var_os("FERRY_ENVOY_LOG_LEVEL").is_some() {
                    eprintln!("--- envoy, {} ---\n{}", shape.name, e.log());
                }
                drop(e);
                Some(v)
            }
            None => None,
        };
        for (i, (client, _)) in p.clients.iter().enumerate() {
            report.push_str(&format!(
                "{:<64} {:<30} ferry={:<5} envoy={}\n",
                shape.name,
                client,
                ferry_says[i],
                envoy_says
                    .as_ref()
                    .map_or("-".to_string(), |v| v[i].to_string())
            ));
        }
        // Whatever the shape, a forgery, a stranger's certificate, an
        // expired one or none never gets in; the good one (pinned where
        // pins are set) always does.
        let by_name = |n: &str| {
            p.clients
                .iter()
                .position(|(c, _)| *c == n)
                .map(|i| ferry_says[i])
        };
        ensure!(
            by_name("good") == Some(true),
            "{}: good refused\n{report}",
            shape.name
        );
        for bad in [
            "self-signed forgery",
            "unrelated CA",
            "expired",
            "no certificate",
        ] {
            ensure!(
                by_name(bad) == Some(false),
                "{}: {bad} accepted\n{report}",
                shape.name
            );
        }
        if let Some(e) = &envoy_says {
            ensure!(
                e == &ferry_says,
                "{}: Ferry and Envoy disagree\n{report}",
                shape.name
            );
        }
    }
    eprintln!("{report}");
    // The shapes that tell the policies apart did: the SPIFFE validator
    // took foreign.org from its own bundle, the CRL refused the revoked
    // leaf, the pins refused an unpinned mesh certificate.
    for (shape, client, want) in [
        ("SPIFFE validator inline", "foreign.org, its own CA", true),
        (
            "SPIFFE validator inline",
            "other trust domain, mesh CA",
            false,
        ),
        ("inline CA and SANs", "other trust domain, mesh CA", false),
        ("SDS ROOTCA only", "other trust domain, mesh CA", true),
        ("CA and CRL (leaf only)", "revoked", false),
        ("inline CA and SANs", "revoked", true),
        ("CA and SPKI pin", "revoked", false),
    ] {
        let line = report
            .lines()
            .find(|l| l.starts_with(shape) && l[64..].trim_start().starts_with(client))
            .with_context(|| format!("{shape} / {client}"))?;
        ensure!(
            line.contains(&format!("ferry={want:<5}")),
            "{shape} / {client}: expected {want}\n{report}"
        );
    }
    Ok(())
}

/// Runs Envoy's `--mode validate` on a bootstrap: its error text, or `None`
/// when Envoy accepts it.
fn envoy_refusal(bin: &std::path::Path, config: &Value) -> Result<Option<String>> {
    let dir = TempDir::new("envoy-validate")?;
    let path = dir.path().join("envoy.json");
    std::fs::write(&path, serde_json::to_string(config)?)?;
    let out = Command::new(bin)
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()?;
    Ok((!out.status.success()).then(|| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }))
}

/// Ferry's exit status and log on a bootstrap it must refuse.
fn ferry_refusal(config: &Value) -> Result<(Option<i32>, String)> {
    let mut f = Ferry::spawn(&serde_json::to_string_pretty(config)?, &[])?;
    let st = f.wait_exit(Duration::from_secs(10))?;
    Ok((st.code(), f.log()))
}

#[test]
fn insecure_validation_contexts_are_refused_at_start_up_as_envoy_does() -> Result<()> {
    let envoy_bin = envoy::bin()?;
    let p = pki()?;
    let port = free_port();
    let sans_only = Shape {
        name: "SANs without a CA",
        validation: json!({"validation_context": {
            "match_typed_subject_alt_names": uri_prefix("spiffe://cluster.local/"),
        }}),
        secrets: vec![],
    };
    let crl_only = Shape {
        name: "CRL without a CA",
        validation: json!({"validation_context": {"crl": inline(&p.revoked_crl)}}),
        secrets: vec![],
    };
    for shape in [sans_only, crl_only] {
        let config = downstream_bootstrap(&p, &shape, port, 9);
        let (code, log) = ferry_refusal(&config)?;
        ensure!(
            code == Some(1),
            "{}: Ferry must exit 1, got {code:?}:\n{log}",
            shape.name
        );
        ensure!(
            log.contains("validation_context") && log.contains("without trusted CA"),
            "{}: the refusal names the field and the reason:\n{log}",
            shape.name
        );
        if let Some(bin) = &envoy_bin {
            let refusal = envoy_refusal(bin, &config)?;
            ensure!(
                refusal.is_some(),
                "{}: Envoy accepted what Ferry refused",
                shape.name
            );
        }
    }
    // Upstream: SAN matching without a CA is refused the same way.
    let upstream = json!({
        "static_resources": {
            "listeners": [tcp_listener(port, "origin")],
            "clusters": [static_cluster("origin", 9, Some(upstream_tls(json!({
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": SERVER_ID}}],
            }))))],
        },
    });
    let (code, log) = ferry_refusal(&upstream)?;
    ensure!(
        code == Some(1) && log.contains("without trusted CA is insecure"),
        "upstream SANs without a CA: {code:?}\n{log}"
    );
    if let Some(bin) = &envoy_bin {
        ensure!(
            envoy_refusal(bin, &upstream)?.is_some(),
            "Envoy accepted an upstream context with SANs and no CA"
        );
    }
    Ok(())
}

fn tcp_listener(port: u16, cluster: &str) -> Value {
    json!({
        "name": "plain",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "plain",
                "cluster": cluster,
            },
        }]}],
    })
}

fn upstream_tls(validation_context: Value) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": validation_context},
        },
    })
}

/// A TLS echo server presenting `leaf`, for as long as the returned
/// listener's thread runs (one connection at a time, each echoed until
/// closed).
fn tls_origin(leaf: &Leaf) -> Result<u16> {
    let chain =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?,
    );
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() || s.flush().is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// Whether a byte sent in plaintext to `port` comes back through the
/// proxy's TLS origination.
fn plain_echo(port: u16) -> bool {
    let attempt = || -> Result<()> {
        let mut s = TcpStream::connect_timeout(&local(port), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"ping\n")?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        if &buf != b"ping\n" {
            bail!("echoed {buf:?}");
        }
        Ok(())
    };
    attempt().is_ok()
}

#[test]
fn upstream_servers_are_verified_as_envoy_verifies_them() -> Result<()> {
    let envoy_bin = envoy::bin()?;
    let p = pki()?;
    let real = tls_origin(&p.server)?;
    let forged = tls_origin(&Leaf::self_signed(SERVER_ID, &[SERVER_DNS])?)?;
    let stranger = tls_origin(&Ca::new("unrelated")?.leaf(SERVER_ID, &[SERVER_DNS])?)?;
    let wrong_name = tls_origin(
        &p.mesh
            .leaf("spiffe://cluster.local/ns/default/sa/other", &[])?,
    )?;
    let vc = json!({
        "trusted_ca": inline(&p.mesh.pem()),
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": SERVER_ID}}],
    });
    for (origin, name, want) in [
        (real, "the real server", true),
        (forged, "a self-signed forgery", false),
        (stranger, "an unrelated CA", false),
        (wrong_name, "another identity", false),
    ] {
        let port = free_port();
        let config = json!({"static_resources": {
            "listeners": [tcp_listener(port, "origin")],
            "clusters": [static_cluster("origin", origin, Some(upstream_tls(vc.clone())))],
        }});
        let ferry = start_ferry(&config)?;
        let f = plain_echo(port);
        drop(ferry);
        ensure!(f == want, "Ferry to {name}: echoed={f}, expected {want}");
        if let Some(bin) = &envoy_bin {
            let e = Envoy::start(bin, &config, port)?;
            let got = plain_echo(port);
            drop(e);
            ensure!(
                got == want,
                "Envoy to {name}: echoed={got}, expected {want}"
            );
        }
    }
    Ok(())
}

/// An HTTPS origin presenting `leaf` that answers every request with the
/// SNI the client sent (`-` for none).
fn sni_origin(leaf: &Leaf) -> Result<u16> {
    let chain =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?,
    );
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                // One request per connection is enough here.
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let sni = s.conn.server_name().unwrap_or("-").to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{sni}",
                    sni.len()
                );
                let _ = s.write_all(answer.as_bytes());
                let _ = s.flush();
            });
        }
    });
    Ok(port)
}

fn http_route_listener(port: u16, cluster: &str) -> Value {
    json!({
        "name": "http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "http",
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            },
        }]}],
    })
}

/// A GET through the proxy on `port` with `host`: the status and body.
fn get_host(port: u16, host: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&local(port), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

/// `auto_sni` and `auto_san_validation` (the request's host as SNI and as
/// the DNS name the server must present) and `auto_host_sni` (a DNS
/// cluster's host name as SNI), through Ferry and Envoy alike.
#[test]
fn names_sent_and_checked_come_from_the_request_or_the_host_as_in_envoy() -> Result<()> {
    let envoy_bin = envoy::bin()?;
    let p = pki()?;
    let origin = sni_origin(&p.mesh.leaf(SERVER_ID, &["api.example.com", "localhost"])?)?;
    let tls = |extra: Value| {
        let mut ts = upstream_tls(json!({"trusted_ca": inline(&p.mesh.pem())}));
        for (k, v) in extra.as_object().into_iter().flatten() {
            ts["typed_config"][k] = v.clone();
        }
        ts
    };
    let auto_sni = {
        let mut c = static_cluster("origin", origin, Some(tls(json!({}))));
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "upstream_http_protocol_options": {"auto_sni": true, "auto_san_validation": true},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        });
        c
    };
    let host_sni = json!({
        "name": "origin",
        "type": "STRICT_DNS",
        "connect_timeout": "2s",
        "dns_lookup_family": "V4_ONLY",
        "load_assignment": {"cluster_name": "origin", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "localhost", "port_value": origin}}}}
        ]}]},
        "transport_socket": tls(json!({"auto_host_sni": true})),
    });
    // (host sent, status, SNI the origin saw) per request.
    type Expect<'a> = &'a [(&'a str, u16, &'a str)];
    let cases: [(&str, Value, Expect); 2] = [
        (
            "auto_sni",
            auto_sni,
            &[
                ("api.example.com", 200, "api.example.com"),
                ("api.example.com:8443", 200, "api.example.com"),
                // The server's certificate does not name it: refused.
                ("other.example.com", 503, ""),
            ],
        ),
        (
            "auto_host_sni",
            host_sni,
            &[("anything.test", 200, "localhost")],
        ),
    ];
    for (name, cluster, expect) in cases {
        let port = free_port();
        let config = json!({"static_resources": {
            "listeners": [http_route_listener(port, "origin")],
            "clusters": [cluster],
        }});
        let ferry = start_ferry(&config)?;
        let mut seen = Vec::new();
        for (host, _, _) in expect {
            seen.push(("ferry", *host, get_host(port, host)?));
        }
        drop(ferry);
        if let Some(bin) = &envoy_bin {
            let e = Envoy::start(bin, &config, port)?;
            for (host, _, _) in expect {
                seen.push(("envoy", *host, get_host(port, host)?));
            }
            drop(e);
        }
        for (proxy, host, (status, body)) in &seen {
            let (_, want_status, want_sni) =
                expect.iter().find(|(h, _, _)| h == host).context("case")?;
            ensure!(
                status == want_status && (*want_status != 200 || body == want_sni),
                "{name}: {proxy} with host {host}: {status} {body:?}, expected {want_status} {want_sni:?}\n{seen:?}"
            );
        }
    }
    Ok(())
}
