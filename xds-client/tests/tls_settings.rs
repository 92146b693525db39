//! TLS settings and secrets: static secrets in the bootstrap, inline and
//! file data, PEM checked with the field named, SDS names followed by the
//! store with warming, and the ADS cluster's own TLS.

use std::time::Duration;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use envoy_types::pb::google::protobuf::Any;
use ferry_model::tls::{Secret, SecretSource};
use ferry_xds::Warnings;
use ferry_xds::bootstrap::parse_bootstrap;
use ferry_xds::store::{self, Parsed, Store};
use prost::{Message, Name};

fn pem_pair() -> (String, String, String) {
    issue().unwrap_or_else(|e| panic!("test certificates: {e}"))
}

fn issue() -> Result<(String, String, String), rcgen::Error> {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate()?)?;
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new())?;
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/default/sa/a".try_into()?,
    )];
    let key = rcgen::KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), issuer.pem()))
}

fn indent(pem: &str, n: usize) -> String {
    pem.lines()
        .map(|l| format!("{}{l}", " ".repeat(n)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn bootstrap(cert: &str, key: &str, ca: &str, secret_name: &str) -> String {
    format!(
        r#"
static_resources:
  secrets:
  - name: server-cert
    tls_certificate:
      certificate_chain:
        inline_string: |
{cert}
      private_key:
        inline_string: |
{key}
  - name: mesh-ca
    validation_context:
      trusted_ca:
        inline_string: |
{ca}
  listeners:
  - name: tls
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8443}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificate_sds_secret_configs: [{{name: {secret_name}}}]
            validation_context_sds_secret_config: {{name: mesh-ca}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tls
          cluster: app
  clusters:
  - name: app
    type: STATIC
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}}}}}]}}]
"#,
        cert = indent(cert, 10),
        key = indent(key, 10),
        ca = indent(ca, 10),
    )
}

#[test]
fn static_secrets_are_converted_and_referenced() {
    let (cert, key, ca) = pem_pair();
    let b = parse_bootstrap("b.yaml", &bootstrap(&cert, &key, &ca, "server-cert")).unwrap();
    let s = &b.snapshot;
    assert!(matches!(
        s.secrets.get("server-cert").map(|s| &**s),
        Some(Secret::Certificate(_))
    ));
    assert!(matches!(
        s.secrets.get("mesh-ca").map(|s| &**s),
        Some(Secret::Validation(v)) if v.trusted_ca_pem == ca.as_bytes()
    ));
    let tls = s.listeners[0].filter_chains[0].tls.as_ref().unwrap();
    assert!(tls.require_client_certificate);
    assert_eq!(tls.common.alpn, ["h2", "http/1.1"]);
    assert!(matches!(&tls.common.validation, Some(SecretSource::Sds(n)) if n == "mesh-ca"));

    // A name that is no static secret, without xDS to deliver it.
    let e = parse_bootstrap("b.yaml", &bootstrap(&cert, &key, &ca, "missing"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("secret \"missing\": unknown static secret"),
        "{e}"
    );

    // A key that is not the certificate's: refused with the field named.
    let (_, other_key, _) = pem_pair();
    let e = parse_bootstrap("b.yaml", &bootstrap(&cert, &other_key, &ca, "server-cert"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("secret \"server-cert\": tls_certificate.private_key: does not belong"),
        "{e}"
    );
}

fn secret_any(s: &tls_pb::Secret) -> Any {
    Any {
        type_url: format!("type.googleapis.com/{}", tls_pb::Secret::full_name()),
        value: s.encode_to_vec(),
    }
}

fn inline(s: &str) -> Option<envoy_types::pb::envoy::config::core::v3::DataSource> {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
    Some(DataSource {
        specifier: Some(Specifier::InlineString(s.to_string())),
        ..Default::default()
    })
}

#[test]
fn sds_secrets_convert_or_name_the_broken_field() {
    let (cert, key, _) = pem_pair();
    let mut w = Warnings::default();
    let good = tls_pb::Secret {
        name: "default".into(),
        r#type: Some(tls_pb::secret::Type::TlsCertificate(
            tls_pb::TlsCertificate {
                certificate_chain: inline(&cert),
                private_key: inline(&key),
                ..Default::default()
            },
        )),
    };
    let (name, parsed) = store::parse(store::SECRET, &secret_any(&good), &mut w).unwrap();
    assert_eq!(name, "default");
    assert!(matches!(parsed, Parsed::Secret(s) if matches!(&*s, Secret::Certificate(_))));

    let bad_ca = tls_pb::Secret {
        name: "ROOTCA".into(),
        r#type: Some(tls_pb::secret::Type::ValidationContext(
            tls_pb::CertificateValidationContext {
                trusted_ca: inline(
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                ),
                ..Default::default()
            },
        )),
    };
    let (name, e) = store::parse(store::SECRET, &secret_any(&bad_ca), &mut w).unwrap_err();
    assert_eq!(name.as_deref(), Some("ROOTCA"));
    assert_eq!(e.resource, "secret \"ROOTCA\"");
    assert_eq!(e.field, "validation_context.trusted_ca");

    let redacted = tls_pb::Secret {
        name: "default".into(),
        r#type: Some(tls_pb::secret::Type::TlsCertificate(
            tls_pb::TlsCertificate {
                certificate_chain: inline(&cert),
                private_key: inline("[redacted]"),
                ..Default::default()
            },
        )),
    };
    let (_, e) = store::parse(store::SECRET, &secret_any(&redacted), &mut w).unwrap_err();
    assert_eq!(e.field, "tls_certificate.private_key");
}

const ADS: &str = "
node: {id: n, cluster: c}
dynamic_resources:
  ads_config: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: xds-grpc}}]}
  lds_config: {ads: {}}
  cds_config: {ads: {}}
";

const XDS_CLUSTER: &str = "  clusters:
  - name: xds-grpc
    type: STATIC
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 15010}}}}]}]
";

#[test]
fn listeners_warm_until_their_sds_secrets_arrive() {
    let (cert, key, ca) = pem_pair();
    // The bootstrap's listener with its certificate by SDS over ADS, fed
    // to the store as a dynamic one.
    let with_ads = |name: &str| {
        let text = format!(
            "{}{}",
            ADS,
            bootstrap(&cert, &key, &ca, name).replace("  clusters:\n", XDS_CLUSTER)
        );
        parse_bootstrap("b.yaml", &text).unwrap()
    };
    let b = with_ads("default");
    let listener = b.snapshot.listeners[0].clone();
    let base = ferry_model::Snapshot {
        clusters: b.snapshot.clusters.clone(),
        secrets: b.snapshot.secrets.clone(),
        ..Default::default()
    };
    let mut st = Store::default();
    st.upsert(
        store::LISTENER,
        "tls".into(),
        "1".into(),
        Vec::new(),
        Parsed::Listener(listener),
    );
    assert_eq!(
        st.wanted_secrets(&base).into_iter().collect::<Vec<_>>(),
        ["default"],
        "static secrets are not asked for"
    );
    let a = st.assemble(&base, None, Duration::from_secs(15), "v".into());
    assert!(a.snapshot.listeners.is_empty(), "warming without `default`");
    assert_eq!(a.warming, ["listener \"tls\""]);
    let mut w = Warnings::default();
    let secret = tls_pb::Secret {
        name: "default".into(),
        r#type: Some(tls_pb::secret::Type::TlsCertificate(
            tls_pb::TlsCertificate {
                certificate_chain: inline(&cert),
                private_key: inline(&key),
                ..Default::default()
            },
        )),
    };
    let (name, parsed) = store::parse(store::SECRET, &secret_any(&secret), &mut w).unwrap();
    st.upsert(store::SECRET, name, "1".into(), Vec::new(), parsed);
    let a = st.assemble(&base, None, Duration::from_secs(15), "v".into());
    assert_eq!(a.snapshot.listeners.len(), 1);
    assert!(a.warming.is_empty());
    assert!(a.snapshot.secrets.contains_key("default"));
    assert!(a.snapshot.secrets.contains_key("mesh-ca"));

    // Timed out: active anyway (the handshake then fails), as Envoy does.
    let mut st2 = Store::default();
    let l2 = with_ads("never").snapshot.listeners[0].clone();
    st2.upsert(
        store::LISTENER,
        "tls".into(),
        "1".into(),
        Vec::new(),
        Parsed::Listener(l2),
    );
    let a = st2.assemble(&base, None, Duration::ZERO, "v".into());
    assert_eq!(a.snapshot.listeners.len(), 1);
}

#[test]
fn ads_cluster_tls_is_read() {
    let (cert, key, ca) = pem_pair();
    let dir = std::env::temp_dir().join(format!("ferry-xds-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (n, v) in [("cert.pem", &cert), ("key.pem", &key), ("root.pem", &ca)] {
        std::fs::write(dir.join(n), v).unwrap();
    }
    let p = |n: &str| dir.join(n).display().to_string();
    let text = format!(
        r#"
node: {{id: n, cluster: c}}
dynamic_resources:
  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}
  lds_config: {{ads: {{}}}}
  cds_config: {{ads: {{}}}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15012}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: istiod.istio-system.svc
        common_tls_context:
          tls_params: {{tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3}}
          tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
          validation_context:
            trusted_ca: {{filename: {root}}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "spiffe://cluster.local/ns/istio-system/sa/istiod"}}}}]
"#,
        cert = p("cert.pem"),
        key = p("key.pem"),
        root = p("root.pem"),
    );
    let b = parse_bootstrap("b.yaml", &text).unwrap();
    let ads = b.ads.unwrap();
    let tls = ads.tls.unwrap();
    assert_eq!(tls.sni.as_deref(), Some("istiod.istio-system.svc"));
    let Some(SecretSource::Inline(v)) = &tls.common.validation else {
        panic!("an inline validation context: {:?}", tls.common.validation);
    };
    let ferry_model::tls::Secret::Validation(v) = &**v else {
        panic!("a validation context");
    };
    assert_eq!(v.match_subject_alt_names.len(), 1);
    assert_eq!(
        v.match_subject_alt_names[0].san_type,
        Some(ferry_model::tls::SanType::Uri)
    );
    assert!(matches!(
        &tls.common.certificates[..],
        [SecretSource::Inline(_)]
    ));
    // Building the client configuration works from what was read.
    ferry_tls::client_config(&tls, &["h2"], &ads.secrets).unwrap();

    assert_eq!(
        tls.common.min_version,
        Some(ferry_model::tls::TlsVersion::V1_2)
    );
    assert_eq!(
        tls.common.max_version,
        Some(ferry_model::tls::TlsVersion::V1_3)
    );
    let old_tls = text.replace(
        "tls_maximum_protocol_version: TLSv1_3",
        "tls_maximum_protocol_version: TLSv1_1",
    );
    let e = parse_bootstrap("b.yaml", &old_tls).unwrap_err().to_string();
    assert!(
        e.contains("tls_params.tls_maximum_protocol_version: TLS 1.0 and 1.1 are not supported"),
        "{e}"
    );
    let other_name = text.replace("san_type: URI", "san_type: OTHER_NAME");
    let e = parse_bootstrap("b.yaml", &other_name)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "match_typed_subject_alt_names[0].san_type: SAN type OTHER_NAME is not supported"
        ),
        "{e}"
    );
    let missing = text.replace(&p("key.pem"), &p("nope.pem"));
    let e = parse_bootstrap("b.yaml", &missing).unwrap_err().to_string();
    assert!(e.contains("private_key.filename: cannot read"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A listener terminating TLS with `validation` as its inline validation
/// context (YAML flow mapping) and `extra` inside the DownstreamTlsContext,
/// and a cluster originating TLS with `upstream` inside its
/// UpstreamTlsContext.
fn tls_bootstrap(dir: &std::path::Path, validation: &str, extra: &str, upstream: &str) -> String {
    let p = |n: &str| dir.join(n).display().to_string();
    format!(
        r#"
static_resources:
  listeners:
  - name: tls
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8443}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          {extra}
          common_tls_context:
            tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
            validation_context: {validation}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: up
  clusters:
  - name: up
    type: STATIC
    load_assignment:
      cluster_name: up
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {upstream}
        common_tls_context:
          validation_context: {{trusted_ca: {{filename: {root}}}}}
"#,
        cert = p("cert.pem"),
        key = p("key.pem"),
        root = p("root.pem"),
    )
}

/// Each dangerous TLS field, set to a non-default value, is either applied
/// (seen in the model) or refused with its name; none is dropped.
#[test]
fn tls_validation_fields_are_applied_or_refused_by_name() {
    let (cert, key, ca) = pem_pair();
    let dir = std::env::temp_dir().join(format!("ferry-xds-tlsfields-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (n, v) in [("cert.pem", &cert), ("key.pem", &key), ("root.pem", &ca)] {
        std::fs::write(dir.join(n), v).unwrap();
    }
    let root = dir.join("root.pem").display().to_string();
    let ca_json = serde_json::to_string(&ca).unwrap();
    let san = r#"match_typed_subject_alt_names: [{san_type: URI, matcher: {prefix: "spiffe://cluster.local/"}}]"#;
    let refused: &[(&str, &str, &str, &str)] = &[
        // (validation context, downstream extra, upstream extra, expected error)
        (
            &format!("{{{san}}}"),
            "",
            "",
            "validation_context.match_subject_alt_names: SAN-based verification of peer certificates without trusted CA is insecure and not allowed",
        ),
        (
            "{crl: {inline_string: x}}",
            "",
            "",
            "validation_context.crl",
        ),
        (
            &format!(
                "{{trusted_ca: {{filename: {root}}}, ca_certificate_provider_instance: {{instance_name: x}}}}"
            ),
            "",
            "",
            "validation_context.ca_certificate_provider_instance: certificate providers are not supported",
        ),
        (
            &format!("{{trusted_ca: {{filename: {root}}}, allow_expired_certificate: true}}"),
            "",
            "",
            "validation_context.allow_expired_certificate",
        ),
        (
            &format!(
                "{{trusted_ca: {{filename: {root}}}, trust_chain_verification: ACCEPT_UNTRUSTED}}"
            ),
            "",
            "",
            "validation_context.trust_chain_verification",
        ),
        (
            &format!(
                "{{trusted_ca: {{filename: {root}}}, require_signed_certificate_timestamp: true}}"
            ),
            "",
            "",
            "validation_context.require_signed_certificate_timestamp",
        ),
        (
            &format!(
                "{{trusted_ca: {{filename: {root}}}, verify_certificate_spki: [bm90IGEgZGlnZXN0]}}"
            ),
            "",
            "",
            "validation_context.verify_certificate_spki[0]: \"bm90IGEgZGlnZXN0\" is not a SHA-256 digest",
        ),
        (
            &format!("{{trusted_ca: {{filename: {root}}}, verify_certificate_hash: [abcd]}}"),
            "",
            "",
            "validation_context.verify_certificate_hash[0]",
        ),
        (
            r#"{custom_validator_config: {name: envoy.tls.cert_validator.other, typed_config: {"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.TlsParameters}}}"#,
            "",
            "",
            "validation_context.custom_validator_config.typed_config: unsupported certificate validator",
        ),
        (
            &format!("{{trusted_ca: {{filename: {root}}}}}"),
            "ocsp_staple_policy: MUST_STAPLE",
            "",
            "ocsp_staple_policy",
        ),
        (
            &format!("{{trusted_ca: {{filename: {root}}}}}"),
            "session_ticket_keys: {keys: [{inline_string: x}]}",
            "",
            "session_ticket_keys",
        ),
        (
            &format!("{{trusted_ca: {{filename: {root}}}}}"),
            "",
            "allow_renegotiation: true",
            "allow_renegotiation: TLS renegotiation is not supported",
        ),
    ];
    for (validation, extra, upstream, want) in refused {
        let text = tls_bootstrap(&dir, validation, extra, upstream);
        let e = parse_bootstrap("b.yaml", &text)
            .err()
            .unwrap_or_else(|| panic!("accepted: {validation} {extra} {upstream}"))
            .to_string();
        assert!(
            e.contains(want),
            "{validation} {extra} {upstream}:\n{e}\nwanted: {want}"
        );
    }
    // Cipher suites and curves: applied, unknown names refused.
    let tls_params = |params: &str| {
        tls_bootstrap(&dir, &format!("{{trusted_ca: {{filename: {root}}}}}"), "", "")
            .replace(
                "          common_tls_context:\n            tls_certificates",
                &format!("          common_tls_context:\n            tls_params: {params}\n            tls_certificates"),
            )
    };
    let e = parse_bootstrap("b.yaml", &tls_params("{cipher_suites: [NOT-A-CIPHER]}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cipher_suites[0]: unknown cipher suite"), "{e}");
    let e = parse_bootstrap(
        "b.yaml",
        &tls_params("{signature_algorithms: [rsa_pss_rsae_sha256]}"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tls_params.signature_algorithms"), "{e}");
    let e = parse_bootstrap("b.yaml", &tls_params("{cipher_suites: [AES128-SHA]}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("none of the cipher suites is supported"), "{e}");
    let b = parse_bootstrap(
        "b.yaml",
        &tls_params("{cipher_suites: ['[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]', AES128-SHA], ecdh_curves: [P-256]}"),
    )
    .unwrap();
    let chain = &b.snapshot.listeners[0].filter_chains[0];
    let common = &chain.tls.as_ref().unwrap().common;
    assert_eq!(common.ecdh_curves, ["P-256"]);
    assert_eq!(common.cipher_suites.len(), 2);

    // Applied: SPIFFE validator bundles, pins, CRL settings, depth,
    // system roots; resumption, SNI and key usage settings.
    let spiffe = format!(
        r#"{{{san}, custom_validator_config: {{name: envoy.tls.cert_validator.spiffe, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig, trust_domains: [{{name: cluster.local, trust_bundle: {{inline_string: {ca_json}}}}}]}}}}, max_verify_depth: 3, suppress_client_ca_list: true}}"#
    );
    let b = parse_bootstrap(
        "b.yaml",
        &tls_bootstrap(
            &dir,
            &spiffe,
            "require_sni: true\n          disable_stateless_session_resumption: true",
            "auto_host_sni: true\n        auto_sni_san_validation: true\n        max_session_keys: 0",
        ),
    )
    .unwrap();
    let down = b.snapshot.listeners[0].filter_chains[0]
        .tls
        .clone()
        .unwrap();
    assert!(down.require_sni && !down.stateless_resumption && down.stateful_resumption);
    let Some(SecretSource::Inline(v)) = &down.common.validation else {
        panic!("inline validation");
    };
    let Secret::Validation(v) = &**v else {
        panic!("validation")
    };
    let td = &v.spiffe.as_ref().unwrap().trust_domains;
    assert_eq!(td.len(), 1);
    assert_eq!(td[0].0, "cluster.local");
    assert_eq!(v.max_verify_depth, Some(3));
    assert!(v.suppress_client_ca_list);
    let up = match &b.snapshot.clusters["up"].tls {
        Some(t) => t.clone(),
        None => panic!("cluster TLS"),
    };
    assert!(up.auto_host_sni && up.auto_sni_san_validation && up.max_session_keys == 0);
    assert!(up.enforce_rsa_key_usage);

    let hash = "AB:".repeat(31) + "AB";
    let pins = format!(
        "{{trusted_ca: {{filename: {root}}}, verify_certificate_hash: [\"{hash}\"], verify_certificate_spki: [q83vq83vq83vq83vq83vq83vq83vq83vq83vq83vq80=], crl: {{inline_string: \"\"}}, only_verify_leaf_cert_crl: true}}"
    );
    let b = parse_bootstrap("b.yaml", &tls_bootstrap(&dir, &pins, "", "")).unwrap();
    let Some(SecretSource::Inline(v)) = &b.snapshot.listeners[0].filter_chains[0]
        .tls
        .as_ref()
        .unwrap()
        .common
        .validation
    else {
        panic!("inline validation");
    };
    let Secret::Validation(v) = &**v else {
        panic!("validation")
    };
    assert_eq!(v.certificate_hashes, [[0xab; 32]]);
    assert_eq!(v.spki_hashes.len(), 1);
    assert!(v.only_verify_leaf_cert_crl);
    let _ = std::fs::remove_dir_all(&dir);
}
