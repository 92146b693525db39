//! Istio mTLS as istiod lays it out: pods given a sidecar (namespace
//! `istio-injection: enabled`, or the pod's `sidecar.istio.io/inject`)
//! have endpoints marked `tlsMode: istio`; outbound clusters without a
//! DestinationRule TLS setting get auto-mTLS `transport_socket_matches`;
//! the inbound listener's chains follow PeerAuthentication (PERMISSIVE:
//! mTLS and plaintext, STRICT: mTLS only, DISABLE: plaintext), port-level
//! settings first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, UpstreamTlsContext, common_tls_context::ValidationContextType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use ferry_pilot::istio::source::load_dir;
use ferry_pilot::istio::translate::{Mesh, MeshOptions, Proxy, ProxyConfig};
use ferry_pilot::istio::validate::validate;
use prost::Message;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mtls")
}

fn mesh() -> anyhow::Result<Mesh> {
    let snap = load_dir(&fixtures())?;
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    // Only the deliberately unprefixed port `stream` (protocol sniffed).
    let findings: Vec<String> = validate(&snap)
        .iter()
        .map(|f| format!("{} {}", f.code.id(), f.field))
        .collect();
    assert_eq!(findings, ["IST0118 spec.ports[2]"]);
    Ok(Mesh::new(&snap, MeshOptions::default()))
}

/// A sidecar of pod `pod` in `ns`, identity completed from its Pod.
fn sidecar(mesh: &Mesh, pod: &str, ns: &str, ip: &str) -> ProxyConfig {
    let mut p = Proxy {
        id: format!("sidecar~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
        namespace: ns.into(),
        ips: vec![ip.into()],
        pod_name: Some(pod.into()),
        labels: BTreeMap::new(),
        ..Default::default()
    };
    mesh.complete_proxy(&mut p);
    mesh.proxy_config(&p)
}

fn cluster<'a>(cfg: &'a ProxyConfig, name: &str) -> &'a Cluster {
    cfg.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn upstream_tls(c: &Cluster, match_name: &str) -> UpstreamTlsContext {
    let m = c
        .transport_socket_matches
        .iter()
        .find(|m| m.name == match_name)
        .unwrap_or_else(|| panic!("{}: no match {match_name}", c.name));
    let Some(ConfigType::TypedConfig(any)) = m
        .transport_socket
        .as_ref()
        .and_then(|t| t.config_type.clone())
    else {
        panic!("no typed config")
    };
    UpstreamTlsContext::decode(&*any.value).expect("decode")
}

#[test]
fn injected_endpoints_get_auto_mtls() -> anyhow::Result<()> {
    let mesh = mesh()?;
    let cfg = sidecar(&mesh, "ledger-1", "bank", "10.1.2.10");
    let ledger = cluster(&cfg, "outbound|8080||ledger.bank.svc.cluster.local");
    let names: Vec<&str> = ledger
        .transport_socket_matches
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(names, ["tlsMode-istio", "tlsMode-disabled"]);
    let istio = &ledger.transport_socket_matches[0];
    assert_eq!(
        istio
            .r#match
            .as_ref()
            .and_then(|m| m.fields.get("tlsMode"))
            .and_then(|v| match &v.kind {
                Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) =>
                    Some(s.as_str()),
                _ => None,
            }),
        Some("istio")
    );
    let ctx = upstream_tls(ledger, "tlsMode-istio");
    assert_eq!(ctx.sni, "outbound_.8080_._.ledger.bank.svc.cluster.local");
    let common = ctx.common_tls_context.expect("common");
    // A plain Envoy node cannot speak the TCP metadata exchange, so it
    // does not offer its protocol (Ferry and Istio's proxy do: see
    // `metadata_exchange_only_where_it_is_spoken`).
    assert_eq!(common.alpn_protocols, ["istio"]);
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
    let Some(ValidationContextType::CombinedValidationContext(v)) = common.validation_context_type
    else {
        panic!("no combined validation context")
    };
    assert_eq!(
        v.validation_context_sds_secret_config
            .map(|s| s.name)
            .as_deref(),
        Some("ROOTCA")
    );
    let sans: Vec<String> = v
        .default_validation_context
        .expect("validation")
        .match_typed_subject_alt_names
        .into_iter()
        .filter_map(|m| match m.matcher?.match_pattern? {
            MatchPattern::Exact(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(sans, ["spiffe://cluster.local/ns/bank/sa/ledger"]);
    // The subset's SNI names it.
    let v1 = cluster(&cfg, "outbound|8080|v1|ledger.bank.svc.cluster.local");
    assert_eq!(
        upstream_tls(v1, "tlsMode-istio").sni,
        "outbound_.8080_.v1_.ledger.bank.svc.cluster.local"
    );
    // v2 opted out of injection: nothing in that subset can take mTLS.
    let v2 = cluster(&cfg, "outbound|8080|v2|ledger.bank.svc.cluster.local");
    assert!(v2.transport_socket_matches.is_empty());

    // Endpoint metadata: ledger-1 (injected by its namespace) is marked,
    // ledger-2 (inject: "false") is not.
    let cla = cfg
        .endpoints
        .iter()
        .find(|e| e.cluster_name == "outbound|8080||ledger.bank.svc.cluster.local")
        .expect("endpoints");
    let marked: Vec<(String, bool)> = cla.endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| {
            let ip = match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => {
                    match ep.address.as_ref().and_then(|a| a.address.clone()) {
                        Some(address::Address::SocketAddress(s)) => s.address,
                        _ => String::new(),
                    }
                }
                _ => String::new(),
            };
            let tls = e.metadata.as_ref().is_some_and(|m| {
                m.filter_metadata
                    .contains_key("envoy.transport_socket_match")
            });
            (ip, tls)
        })
        .collect();
    assert_eq!(
        marked,
        [
            ("10.1.2.10".to_string(), true),
            ("10.1.2.11".to_string(), false)
        ]
    );

    // A DestinationRule TLS setting replaces auto mTLS.
    let vault = cluster(&cfg, "outbound|8200||vault.bank.svc.cluster.local");
    assert!(vault.transport_socket_matches.is_empty());
    assert!(vault.transport_socket.is_some());
    // A namespace with mTLS disabled gets none, though its pod is injected.
    let mainframe = cluster(&cfg, "outbound|8080||mainframe.legacy.svc.cluster.local");
    assert!(mainframe.transport_socket_matches.is_empty());
    Ok(())
}

/// (port, transport protocol, ALPN, has TLS) of each port chain.
fn inbound_chains(l: &Listener, port: u32) -> Vec<(String, Vec<String>, bool)> {
    l.filter_chains
        .iter()
        .filter(|c| {
            c.filter_chain_match
                .as_ref()
                .and_then(|m| m.destination_port)
                .is_some_and(|p| p.value == port)
        })
        .map(|c| {
            let m = c.filter_chain_match.clone().unwrap_or_default();
            (
                m.transport_protocol,
                m.application_protocols,
                c.transport_socket.is_some(),
            )
        })
        .collect()
}

#[test]
fn inbound_chains_follow_peer_authentication() -> anyhow::Result<()> {
    let mesh = mesh()?;
    let cfg = sidecar(&mesh, "ledger-1", "bank", "10.1.2.10");
    let inbound = cfg
        .listeners
        .iter()
        .find(|l| l.name == "virtualInbound")
        .expect("virtualInbound");
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // STRICT (the workload's PeerAuthentication): mTLS only.
    assert_eq!(
        inbound_chains(inbound, 8080),
        [(
            "tls".to_string(),
            s(&[
                "istio-peer-exchange",
                "istio",
                "istio-http/1.0",
                "istio-http/1.1",
                "istio-h2"
            ]),
            true
        )]
    );
    assert_eq!(
        inbound_chains(inbound, 7000),
        [(
            "tls".to_string(),
            s(&["istio-peer-exchange", "istio"]),
            true
        )]
    );
    // PERMISSIVE on port 7100 (port-level): mTLS and plaintext, sniffed.
    assert_eq!(
        inbound_chains(inbound, 7100),
        [
            (
                "tls".to_string(),
                s(&["istio-http/1.0", "istio-http/1.1", "istio-h2"]),
                true
            ),
            (
                "tls".to_string(),
                s(&["istio-peer-exchange", "istio"]),
                true
            ),
            ("raw_buffer".to_string(), s(&["http/1.1", "h2c"]), false),
            ("raw_buffer".to_string(), Vec::new(), false),
        ]
    );
    let chain = inbound
        .filter_chains
        .iter()
        .find(|c| c.transport_socket.is_some())
        .expect("tls chain");
    let Some(ConfigType::TypedConfig(any)) = chain
        .transport_socket
        .as_ref()
        .and_then(|t| t.config_type.clone())
    else {
        panic!("typed config")
    };
    let ctx = DownstreamTlsContext::decode(&*any.value)?;
    assert_eq!(ctx.require_client_certificate.map(|b| b.value), Some(true));

    // vault: no PeerAuthentication of its own, none for bank: PERMISSIVE.
    let cfg = sidecar(&mesh, "vault-1", "bank", "10.1.2.30");
    let inbound = cfg
        .listeners
        .iter()
        .find(|l| l.name == "virtualInbound")
        .expect("virtualInbound");
    let chains = inbound_chains(inbound, 8200);
    assert_eq!(chains.len(), 2, "{chains:?}");
    assert_eq!((chains[0].0.as_str(), chains[0].2), ("tls", true));
    assert_eq!((chains[1].0.as_str(), chains[1].2), ("raw_buffer", false));

    // mainframe: its namespace disables mTLS: plaintext only.
    let cfg = sidecar(&mesh, "mainframe-1", "legacy", "10.1.2.20");
    let inbound = cfg
        .listeners
        .iter()
        .find(|l| l.name == "virtualInbound")
        .expect("virtualInbound");
    assert_eq!(
        inbound_chains(inbound, 8080),
        [(String::new(), Vec::new(), false)]
    );
    Ok(())
}

/// (transport protocol, ALPN, has TLS) of the chains without a port: the
/// pass-through to undeclared ports.
fn catch_all(cfg: &ProxyConfig) -> Vec<(String, Vec<String>, bool)> {
    let l = cfg
        .listeners
        .iter()
        .find(|l| l.name == "virtualInbound")
        .expect("virtualInbound");
    l.filter_chains
        .iter()
        .filter(|c| {
            c.filter_chain_match
                .as_ref()
                .is_none_or(|m| m.destination_port.is_none())
        })
        .map(|c| {
            let m = c.filter_chain_match.clone().unwrap_or_default();
            (
                m.transport_protocol,
                m.application_protocols,
                c.transport_socket.is_some(),
            )
        })
        .collect()
}

#[test]
fn pass_through_chains_follow_the_workload_mode() -> anyhow::Result<()> {
    let mesh = mesh()?;
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // ledger is STRICT: mTLS only (and no plaintext way in at all).
    let strict = catch_all(&sidecar(&mesh, "ledger-1", "bank", "10.1.2.10"));
    assert_eq!(
        strict,
        [
            (
                "tls".to_string(),
                s(&["istio-http/1.0", "istio-http/1.1", "istio-h2"]),
                true
            ),
            (
                "tls".to_string(),
                s(&["istio-peer-exchange", "istio"]),
                true
            ),
        ]
    );
    // vault is PERMISSIVE: both, the plaintext ones saying so.
    let permissive = catch_all(&sidecar(&mesh, "vault-1", "bank", "10.1.2.30"));
    assert_eq!(permissive.len(), 4, "{permissive:?}");
    assert_eq!(
        permissive[2..],
        [
            ("raw_buffer".to_string(), s(&["http/1.1", "h2c"]), false),
            ("raw_buffer".to_string(), Vec::new(), false),
        ]
    );
    // mainframe's namespace disables mTLS: plaintext as before.
    let disabled = catch_all(&sidecar(&mesh, "mainframe-1", "legacy", "10.1.2.20"));
    assert_eq!(
        disabled,
        [
            (String::new(), s(&["http/1.1", "h2c"]), false),
            (String::new(), Vec::new(), false),
        ]
    );
    Ok(())
}

/// A proxy that speaks Istio's TCP metadata exchange (Ferry, Istio's own
/// proxy) gets it as istiod writes it: `istio.metadata_exchange` first on
/// the inbound mTLS chains carrying TCP (whose TLS offers
/// `istio-peer-exchange`), and as an upstream filter of the auto-mTLS
/// clusters offering that ALPN; a plain Envoy node gets neither the filters
/// (it would refuse the listener) nor the ALPN (a peer would speak the
/// exchange into its application's stream).
#[test]
fn metadata_exchange_only_where_it_is_spoken() -> anyhow::Result<()> {
    const MX_TYPE: &str = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange";
    let mesh = mesh()?;
    let config = |speaks: bool| {
        let mut p = Proxy {
            id: "sidecar~10.1.2.10~ledger-1.bank~bank.svc.cluster.local".into(),
            namespace: "bank".into(),
            ips: vec!["10.1.2.10".into()],
            pod_name: Some("ledger-1".into()),
            labels: BTreeMap::new(),
            ..Default::default()
        };
        mesh.complete_proxy(&mut p);
        p.istio_network_stats = speaks;
        mesh.proxy_config(&p)
    };
    for speaks in [true, false] {
        let cfg = config(speaks);
        let ledger = cluster(&cfg, "outbound|8080||ledger.bank.svc.cluster.local");
        let common = upstream_tls(ledger, "tlsMode-istio")
            .common_tls_context
            .expect("common");
        let filters: Vec<(&str, &str)> = ledger
            .filters
            .iter()
            .map(|f| {
                (
                    f.name.as_str(),
                    f.typed_config.as_ref().map_or("", |a| a.type_url.as_str()),
                )
            })
            .collect();
        let inbound = cfg
            .listeners
            .iter()
            .find(|l| l.name == "virtualInbound")
            .expect("virtualInbound");
        let tcp_tls = inbound
            .filter_chains
            .iter()
            .find(|c| {
                c.transport_socket.is_some()
                    && c.filter_chain_match
                        .as_ref()
                        .is_some_and(|m| m.destination_port.is_some_and(|p| p.value == 7000))
            })
            .expect("the TCP mTLS chain of port 7000");
        let first = tcp_tls.filters.first().map(|f| f.name.as_str());
        let Some(ConfigType::TypedConfig(any)) = tcp_tls
            .transport_socket
            .as_ref()
            .and_then(|t| t.config_type.clone())
        else {
            panic!("typed config")
        };
        let server_alpn = DownstreamTlsContext::decode(&*any.value)?
            .common_tls_context
            .expect("common")
            .alpn_protocols;
        if speaks {
            assert_eq!(common.alpn_protocols, ["istio-peer-exchange", "istio"]);
            assert_eq!(filters, [("istio.metadata_exchange", MX_TYPE)]);
            assert_eq!(first, Some("istio.metadata_exchange"));
            assert_eq!(server_alpn, ["istio-peer-exchange", "h2", "http/1.1"]);
        } else {
            assert_eq!(common.alpn_protocols, ["istio"]);
            assert!(filters.is_empty(), "{filters:?}");
            assert_ne!(first, Some("istio.metadata_exchange"));
            assert_eq!(server_alpn, ["h2", "http/1.1"]);
        }
    }
    Ok(())
}
