//! Envoy's TLS transport socket protos (`envoy.extensions.transport_sockets.tls.v3`:
//! `DownstreamTlsContext`, `UpstreamTlsContext`, `CommonTlsContext`,
//! `CertificateValidationContext`, `TlsCertificate`, SDS `Secret`) →
//! `ferry_model::tls`.
//!
//! Every message is destructured field by field (no `..`), so each field is
//! visibly applied, refused when set, or accepted as a documented tuning
//! knob with a warning; a new field in the protos fails the build until it
//! is classified. What would weaken peer verification if ignored (a
//! certificate provider, an unknown validator, trust-chain or SCT rules)
//! is refused by name; contexts Envoy refuses as insecure (SAN matching or
//! CRLs without a trusted CA) are refused with Envoy's reason.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher_pb;
use ferry_model as m;
use prost::Message;

use super::core_types::{data_source, transport_socket_typed};
use super::coverage::fields;
use super::matcher::string_matcher;
use super::{ConvertError, Ctx, Typed};

const SPIFFE_VALIDATOR_TYPE: &str =
    "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

fields!(pub(super) static COMMON_TLS_CONTEXT = "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext" {
    "tls_params": applied,
    "tls_certificates": applied "PEM chain and key",
    "tls_certificate_sds_secret_configs": applied,
    "tls_certificate_provider_instance": refused "certificate providers are not supported (use SDS or inline certificates)",
    "custom_tls_certificate_selector": refused "custom certificate selectors are not supported",
    "tls_certificate_certificate_provider": refused "certificate providers are not supported (use SDS or inline certificates)",
    "tls_certificate_certificate_provider_instance": refused "certificate providers are not supported (use SDS or inline certificates)",
    "validation_context": applied "contexts Envoy refuses as insecure (SAN matching or CRLs without a trusted CA) are refused with Envoy's reason",
    "validation_context_sds_secret_config": applied,
    "combined_validation_context": applied,
    "validation_context_certificate_provider": refused "certificate providers are not supported (use trusted_ca or SDS)",
    "validation_context_certificate_provider_instance": refused "certificate providers are not supported (use trusted_ca or SDS)",
    "alpn_protocols": applied,
    "custom_handshaker": refused "custom handshakers are not supported",
    "key_log": refused "TLS key logging is not supported",
});

fields!(pub(super) static COMBINED_VALIDATION_CONTEXT = "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext" {
    "default_validation_context": applied "merged with the SDS secret when it arrives, as Envoy merges them",
    "validation_context_sds_secret_config": applied,
    "validation_context_certificate_provider": refused "certificate providers are not supported (use trusted_ca or SDS)",
    "validation_context_certificate_provider_instance": refused "certificate providers are not supported (use trusted_ca or SDS)",
});

fields!(pub(super) static SDS_SECRET_CONFIG = "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig" {
    "name": applied "required",
    "sds_config": applied "a gRPC api_config_source on istio-agent's sds-grpc cluster: fetched from the agent's SDS socket by its own name (or served by the in-process certificate agent with --ca-addr); any other source: over the ADS stream",
});

fields!(pub(super) static TLS_PARAMETERS = "envoy.extensions.transport_sockets.tls.v3.TlsParameters" {
    "tls_minimum_protocol_version": applied "a minimum below TLS 1.2 is TLS 1.2 (nothing older is spoken)",
    "tls_maximum_protocol_version": applied "TLS 1.2 or 1.3; TLS 1.0 and 1.1 are refused",
    "cipher_suites": applied "ECDHE with AES-GCM or ChaCha20-Poly1305; other known suites are not offered (with a warning), unknown names are refused",
    "ecdh_curves": applied "X25519, P-256, P-384; other known curves are not offered (with a warning), unknown names are refused",
    "signature_algorithms": refused "restricting signature algorithms is not supported",
    "compliance_policies": refused "compliance policies (FIPS) are not supported",
});

fields!(pub(super) static VALIDATION_CONTEXT = "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext" {
    "trusted_ca": applied "ignored with a warning when the SPIFFE validator is configured, as Envoy",
    "ca_certificate_provider_instance": refused "certificate providers are not supported (use trusted_ca or SDS)",
    "system_root_certs": applied,
    "watched_directory": refused "reloading the trust material from a watched directory is not supported (rotate it over SDS)",
    "verify_certificate_spki": applied,
    "verify_certificate_hash": applied,
    "match_typed_subject_alt_names": applied "DNS, URI, EMAIL and IP_ADDRESS; OTHER_NAME is refused",
    "match_subject_alt_names": applied "deprecated; ignored with a warning when typed matchers are set, as Envoy",
    "require_signed_certificate_timestamp": refused "signed certificate timestamps are not checked",
    "crl": applied "revoked peers are refused; connections of a peer revoked by a newer CRL are closed",
    "allow_expired_certificate": refused "expired peer certificates are always refused",
    "trust_chain_verification": applied "VERIFY_TRUST_CHAIN; ACCEPT_UNTRUSTED is refused",
    "custom_validator_config": applied "envoy.tls.cert_validator.spiffe; other validators are refused",
    "only_verify_leaf_cert_crl": applied,
    "max_verify_depth": applied,
    "suppress_client_ca_list": applied,
});

fields!(pub(super) static SAN_MATCHER = "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher" {
    "san_type": applied "DNS, URI, EMAIL and IP_ADDRESS; OTHER_NAME is refused",
    "matcher": applied,
    "oid": inert "read only for OTHER_NAME, which is refused",
});

fields!(pub(super) static SPIFFE_VALIDATOR = "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig" {
    "trust_domains": applied,
    "trust_bundles": applied "a SPIFFE bundle map; it wins over trust_domains, as in Envoy",
});

fields!(pub(super) static SPIFFE_TRUST_DOMAIN = "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig.TrustDomain" {
    "name": applied "a trust domain name, without spiffe://",
    "trust_bundle": applied "required",
    "workload_trust_domain": refused "trust domain selection by filter state is not supported",
});

fields!(pub(super) static TLS_CERTIFICATE = "envoy.extensions.transport_sockets.tls.v3.TlsCertificate" {
    "certificate_chain": applied,
    "private_key": applied,
    "pkcs12": refused "PKCS#12 is not supported (use PEM certificate_chain and private_key)",
    "watched_directory": warned "certificates are read once, when the configuration is loaded (rotate them over SDS)",
    "private_key_provider": refused "private key providers are not supported",
    "password": refused "encrypted private keys are not supported",
    "ocsp_staple": refused "OCSP stapling is not supported",
    "signed_certificate_timestamp": refused "signed certificate timestamps are not supported",
    "tls_params": refused "per-certificate TLS parameters are not supported",
});

fields!(pub(super) static SECRET = "envoy.extensions.transport_sockets.tls.v3.Secret" {
    "name": applied "the SDS resource name",
    "tls_certificate": applied,
    "session_ticket_keys": refused "session ticket keys are not supported (keys are generated in process)",
    "validation_context": applied,
    "generic_secret": refused "generic secrets are not supported",
});

fields!(pub(super) static DOWNSTREAM_TLS_CONTEXT = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext" {
    "common_tls_context": applied,
    "require_client_certificate": applied,
    "require_sni": applied,
    "session_ticket_keys": refused "configured session ticket keys are not supported (keys are generated in process)",
    "session_ticket_keys_sds_secret_config": refused "configured session ticket keys are not supported (keys are generated in process)",
    "disable_stateless_session_resumption": applied,
    "disable_stateful_session_resumption": applied,
    "session_timeout": warned "sessions live as long as the TLS library keeps them",
    "ocsp_staple_policy": applied "LENIENT_STAPLING (no staple is ever sent); the others are refused",
    "full_scan_certs_on_sni_mismatch": inert "one certificate per context: there is nothing to scan",
    "prefer_client_ciphers": applied "TLS 1.2 takes the client's order instead of the server's; TLS 1.3 always takes the client's, as in Envoy",
});

fields!(pub(super) static UPSTREAM_TLS_CONTEXT = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" {
    "common_tls_context": applied,
    "sni": applied,
    "auto_host_sni": applied,
    "auto_sni_san_validation": applied "needs a trusted CA, as in Envoy",
    "allow_renegotiation": refused "TLS renegotiation is not supported",
    "max_session_keys": applied,
    "enforce_rsa_key_usage": applied,
});

fn common_tls(
    ctx: &mut Ctx<'_>,
    field: &str,
    c: Option<&tls_pb::CommonTlsContext>,
) -> Result<m::tls::CommonTls, ConvertError> {
    use tls_pb::common_tls_context::ValidationContextType as V;
    let mut out = m::tls::CommonTls::default();
    let Some(c) = c else { return Ok(out) };
    #[allow(deprecated)]
    let tls_pb::CommonTlsContext {
        tls_params,
        tls_certificates,
        tls_certificate_sds_secret_configs,
        tls_certificate_provider_instance,
        custom_tls_certificate_selector,
        tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance,
        alpn_protocols,
        custom_handshaker,
        key_log,
        validation_context_type,
    } = c;
    out.alpn = alpn_protocols.clone();
    if let Some(p) = tls_params {
        tls_parameters(ctx, &format!("{field}.tls_params"), p, &mut out)?;
    }
    for (i, s) in tls_certificate_sds_secret_configs.iter().enumerate() {
        out.certificates.push(sds_source(
            ctx,
            &format!("{field}.tls_certificate_sds_secret_configs[{i}]"),
            s,
        )?);
    }
    for (i, t) in tls_certificates.iter().enumerate() {
        let cert = tls_certificate(ctx, &format!("{field}.tls_certificates[{i}]"), t)?;
        out.certificates.push(m::tls::SecretSource::Inline(Arc::new(
            m::tls::Secret::Certificate(cert),
        )));
    }
    let cov = &COMMON_TLS_CONTEXT;
    ctx.refuse(
        cov,
        field,
        "tls_certificate_provider_instance",
        tls_certificate_provider_instance.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "tls_certificate_certificate_provider",
        tls_certificate_certificate_provider.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "tls_certificate_certificate_provider_instance",
        tls_certificate_certificate_provider_instance.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "custom_tls_certificate_selector",
        custom_tls_certificate_selector.is_some(),
    )?;
    ctx.refuse(cov, field, "custom_handshaker", custom_handshaker.is_some())?;
    ctx.refuse(cov, field, "key_log", key_log.is_some())?;
    out.validation = match validation_context_type {
        None => None,
        Some(V::ValidationContext(v)) => {
            let f = format!("{field}.validation_context");
            let vc = validation_context(ctx, &f, v)?;
            usable(ctx, &f, &vc)?;
            Some(m::tls::SecretSource::Inline(Arc::new(
                m::tls::Secret::Validation(vc),
            )))
        }
        Some(V::ValidationContextSdsSecretConfig(s)) => Some(sds_source(
            ctx,
            &format!("{field}.validation_context_sds_secret_config"),
            s,
        )?),
        Some(V::CombinedValidationContext(cv)) => {
            let f = format!("{field}.combined_validation_context");
            #[allow(deprecated)]
            let tls_pb::common_tls_context::CombinedCertificateValidationContext {
                default_validation_context,
                validation_context_sds_secret_config,
                validation_context_certificate_provider,
                validation_context_certificate_provider_instance,
            } = cv;
            let ccov = &COMBINED_VALIDATION_CONTEXT;
            ctx.refuse(
                ccov,
                &f,
                "validation_context_certificate_provider",
                validation_context_certificate_provider.is_some(),
            )?;
            ctx.refuse(
                ccov,
                &f,
                "validation_context_certificate_provider_instance",
                validation_context_certificate_provider_instance.is_some(),
            )?;
            let default = validation_context(
                ctx,
                &format!("{f}.default_validation_context"),
                &default_validation_context.clone().unwrap_or_default(),
            )?;
            match validation_context_sds_secret_config {
                // The SDS secret completes the default when handshakes are
                // configured; the merged context is checked then.
                Some(s) => {
                    out.default_validation = Some(Arc::new(default));
                    Some(sds_source(
                        ctx,
                        &format!("{f}.validation_context_sds_secret_config"),
                        s,
                    )?)
                }
                None => {
                    usable(ctx, &format!("{f}.default_validation_context"), &default)?;
                    Some(m::tls::SecretSource::Inline(Arc::new(
                        m::tls::Secret::Validation(default),
                    )))
                }
            }
        }
        #[allow(deprecated)]
        Some(V::ValidationContextCertificateProvider(_)) => {
            return Err(ctx.refused(cov, field, "validation_context_certificate_provider"));
        }
        #[allow(deprecated)]
        Some(V::ValidationContextCertificateProviderInstance(_)) => {
            return Err(ctx.refused(
                cov,
                field,
                "validation_context_certificate_provider_instance",
            ));
        }
    };
    Ok(out)
}

/// An SDS secret by name: from istio-agent's SDS server when `sds_config`
/// is a gRPC `api_config_source` on its `sds-grpc` cluster, else over the
/// ADS stream (istiod's `ads: {}`, and the default).
fn sds_source(
    ctx: &Ctx<'_>,
    field: &str,
    s: &tls_pb::SdsSecretConfig,
) -> Result<m::tls::SecretSource, ConvertError> {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    let tls_pb::SdsSecretConfig { name, sds_config } = s;
    if name.is_empty() {
        return Err(ctx.err(format!("{field}.name"), "an SDS secret needs a name"));
    }
    let agent = match sds_config
        .as_ref()
        .and_then(|c| c.config_source_specifier.as_ref())
    {
        Some(ConfigSourceSpecifier::ApiConfigSource(a)) => a.grpc_services.iter().any(|g| {
            matches!(&g.target_specifier, Some(TargetSpecifier::EnvoyGrpc(e))
                if e.cluster_name == crate::bootstrap::AGENT_SDS_CLUSTER)
        }),
        _ => false,
    };
    Ok(if agent {
        m::tls::SecretSource::AgentSds(name.clone())
    } else {
        m::tls::SecretSource::Sds(name.clone())
    })
}

/// Refuses a context Envoy would refuse, or whose checks Ferry could not
/// apply (resolved against no secrets: only complete inline contexts).
fn usable(ctx: &Ctx<'_>, field: &str, v: &m::tls::ValidationContext) -> Result<(), ConvertError> {
    ferry_tls::PeerCheck::new(v, ferry_tls::provider())
        .map(|_| ())
        .map_err(|e| tls_error(ctx, field, e))
}

fn tls_parameters(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &tls_pb::TlsParameters,
    out: &mut m::tls::CommonTls,
) -> Result<(), ConvertError> {
    use tls_pb::tls_parameters::TlsProtocol as P;
    let tls_pb::TlsParameters {
        tls_minimum_protocol_version,
        tls_maximum_protocol_version,
        cipher_suites,
        ecdh_curves,
        signature_algorithms,
        compliance_policies,
    } = p;
    let version = |f: &str, v: i32, is_min: bool| match P::try_from(v) {
        Ok(P::TlsAuto) => Ok(None),
        // Below 1.2 nothing is spoken: a lower minimum is 1.2.
        Ok(P::TlSv10 | P::TlSv11) if is_min => Ok(Some(m::tls::TlsVersion::V1_2)),
        Ok(P::TlSv10 | P::TlSv11) => {
            Err(ctx.err(format!("{field}.{f}"), "TLS 1.0 and 1.1 are not supported"))
        }
        Ok(P::TlSv12) => Ok(Some(m::tls::TlsVersion::V1_2)),
        Ok(P::TlSv13) => Ok(Some(m::tls::TlsVersion::V1_3)),
        Err(_) => Err(ctx.err(format!("{field}.{f}"), format!("unknown TLS version {v}"))),
    };
    out.min_version = version(
        "tls_minimum_protocol_version",
        *tls_minimum_protocol_version,
        true,
    )?;
    out.max_version = version(
        "tls_maximum_protocol_version",
        *tls_maximum_protocol_version,
        false,
    )?;
    if let (Some(min), Some(max)) = (out.min_version, out.max_version)
        && min > max
    {
        return Err(ctx.err(field, "the minimum TLS version is above the maximum"));
    }
    let mut unsupported = Vec::new();
    let mut usable_suites = 0;
    for (i, entry) in cipher_suites.iter().enumerate() {
        for name in ferry_tls::cipher_names(entry) {
            match ferry_tls::cipher_suite(name) {
                ferry_tls::Named::Supported(_) => usable_suites += 1,
                ferry_tls::Named::NotOffered => unsupported.push(name.to_string()),
                ferry_tls::Named::Unknown => {
                    return Err(ctx.err(
                        format!("{field}.cipher_suites[{i}]"),
                        format!("unknown cipher suite {name:?}"),
                    ));
                }
            }
        }
    }
    if !cipher_suites.is_empty() && usable_suites == 0 {
        return Err(ctx.err(
            format!("{field}.cipher_suites"),
            format!(
                "none of the cipher suites is supported (only ECDHE with AES-GCM or ChaCha20-Poly1305): {}",
                unsupported.join(", ")
            ),
        ));
    }
    if !unsupported.is_empty() {
        ctx.warn(
            &format!("{field}.cipher_suites"),
            format!(
                "not offered (no CBC, PSK or static-RSA suites): {}",
                unsupported.join(", ")
            ),
        );
    }
    out.cipher_suites = cipher_suites.clone();
    let mut curves_ok = 0;
    for (i, name) in ecdh_curves.iter().enumerate() {
        match ferry_tls::ecdh_curve(name) {
            ferry_tls::Named::Supported(_) => curves_ok += 1,
            ferry_tls::Named::NotOffered => ctx.warn(
                &format!("{field}.ecdh_curves[{i}]"),
                format!("curve {name:?} is not offered"),
            ),
            ferry_tls::Named::Unknown => {
                return Err(ctx.err(
                    format!("{field}.ecdh_curves[{i}]"),
                    format!("unknown curve {name:?}"),
                ));
            }
        }
    }
    if !ecdh_curves.is_empty() && curves_ok == 0 {
        return Err(ctx.err(
            format!("{field}.ecdh_curves"),
            "none of the curves is supported (X25519, P-256, P-384)",
        ));
    }
    out.ecdh_curves = ecdh_curves.clone();
    let cov = &TLS_PARAMETERS;
    ctx.refuse(
        cov,
        field,
        "signature_algorithms",
        !signature_algorithms.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "compliance_policies",
        !compliance_policies.is_empty(),
    )?;
    Ok(())
}

/// A SAN matcher as received: its type (`None`: the deprecated untyped
/// form, any type) and string matcher.
type RawSan = (Option<i32>, matcher_pb::StringMatcher);

fn san_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    (san_type, matcher): &RawSan,
) -> Result<m::tls::SanMatcher, ConvertError> {
    use tls_pb::subject_alt_name_matcher::SanType as T;
    let san_type = match san_type.map(T::try_from) {
        None => None,
        Some(Ok(T::Dns)) => Some(m::tls::SanType::Dns),
        Some(Ok(T::Uri)) => Some(m::tls::SanType::Uri),
        Some(Ok(T::Email)) => Some(m::tls::SanType::Email),
        Some(Ok(T::IpAddress)) => Some(m::tls::SanType::IpAddress),
        Some(Ok(other)) => {
            return Err(ctx.err(
                format!("{field}.san_type"),
                format!("SAN type {} is not supported", other.as_str_name()),
            ));
        }
        Some(Err(_)) => {
            return Err(ctx.err(format!("{field}.san_type"), "unknown SAN type"));
        }
    };
    Ok(m::tls::SanMatcher {
        san_type,
        matcher: string_matcher(ctx, &format!("{field}.matcher"), matcher)?,
    })
}

/// SHA-256 pins: hex (optionally colon-separated) for certificates,
/// base64 for SPKIs, as Envoy reads them.
fn pins(
    ctx: &Ctx<'_>,
    field: &str,
    values: &[String],
    decode: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<Vec<[u8; 32]>, ConvertError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            decode(v)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    ctx.err(
                        format!("{field}[{i}]"),
                        format!("{v:?} is not a SHA-256 digest"),
                    )
                })
        })
        .collect()
}

fn hex_digest(s: &str) -> Option<Vec<u8>> {
    let s: String = if s.len() == 95 {
        s.chars().filter(|c| *c != ':').collect()
    } else {
        s.to_string()
    };
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn base64_digest(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

fn validation_context(
    ctx: &mut Ctx<'_>,
    field: &str,
    v: &tls_pb::CertificateValidationContext,
) -> Result<m::tls::ValidationContext, ConvertError> {
    use tls_pb::certificate_validation_context::TrustChainVerification;
    #[allow(deprecated)]
    let tls_pb::CertificateValidationContext {
        trusted_ca,
        ca_certificate_provider_instance,
        system_root_certs,
        watched_directory,
        verify_certificate_spki,
        verify_certificate_hash,
        match_typed_subject_alt_names,
        match_subject_alt_names,
        require_signed_certificate_timestamp,
        crl,
        allow_expired_certificate,
        trust_chain_verification,
        custom_validator_config,
        only_verify_leaf_cert_crl,
        max_verify_depth,
        suppress_client_ca_list,
    } = v;
    let mut out = m::tls::ValidationContext {
        trusted_ca_pem: data_source(ctx, &format!("{field}.trusted_ca"), trusted_ca.as_ref())?,
        crl_pem: data_source(ctx, &format!("{field}.crl"), crl.as_ref())?,
        only_verify_leaf_cert_crl: *only_verify_leaf_cert_crl,
        max_verify_depth: max_verify_depth.as_ref().map(|d| d.value),
        system_root_certs: system_root_certs.is_some(),
        certificate_hashes: pins(
            ctx,
            &format!("{field}.verify_certificate_hash"),
            verify_certificate_hash,
            hex_digest,
        )?,
        spki_hashes: pins(
            ctx,
            &format!("{field}.verify_certificate_spki"),
            verify_certificate_spki,
            base64_digest,
        )?,
        ..Default::default()
    };
    let cov = &VALIDATION_CONTEXT;
    ctx.refuse(
        cov,
        field,
        "ca_certificate_provider_instance",
        ca_certificate_provider_instance.is_some(),
    )?;
    ctx.refuse(cov, field, "watched_directory", watched_directory.is_some())?;
    ctx.refuse(
        cov,
        field,
        "require_signed_certificate_timestamp",
        require_signed_certificate_timestamp
            .as_ref()
            .is_some_and(|b| b.value),
    )?;
    ctx.refuse(
        cov,
        field,
        "allow_expired_certificate",
        *allow_expired_certificate,
    )?;
    match TrustChainVerification::try_from(*trust_chain_verification) {
        Ok(TrustChainVerification::VerifyTrustChain) => {}
        _ => {
            return Err(ctx.err(
                format!("{field}.trust_chain_verification"),
                "only VERIFY_TRUST_CHAIN is supported (untrusted peers are always refused)",
            ));
        }
    }
    out.suppress_client_ca_list = *suppress_client_ca_list;
    // Typed matchers win; the deprecated untyped ones then do not apply
    // (Envoy warns the same way).
    let mut raw: Vec<RawSan> = match_typed_subject_alt_names
        .iter()
        .map(|t| {
            let tls_pb::SubjectAltNameMatcher {
                san_type,
                matcher,
                oid,
            } = t;
            let _ = oid; // only meaningful for OTHER_NAME, which is refused
            (Some(*san_type), matcher.clone().unwrap_or_default())
        })
        .collect();
    if raw.is_empty() {
        raw = match_subject_alt_names
            .iter()
            .map(|m| (None, m.clone()))
            .collect();
    } else if !match_subject_alt_names.is_empty() {
        ctx.warn(
            &format!("{field}.match_subject_alt_names"),
            "ignored: match_typed_subject_alt_names is also set".into(),
        );
    }
    for (i, san) in raw.iter().enumerate() {
        let f = if san.0.is_some() {
            format!("{field}.match_typed_subject_alt_names[{i}]")
        } else {
            format!("{field}.match_subject_alt_names[{i}]")
        };
        out.match_subject_alt_names.push(san_matcher(ctx, &f, san)?);
    }
    if let Some(cv) = custom_validator_config {
        out.spiffe = Some(custom_validator(
            ctx,
            &format!("{field}.custom_validator_config"),
            cv,
        )?);
        if !out.trusted_ca_pem.is_empty() {
            ctx.warn(
                &format!("{field}.trusted_ca"),
                "not used: the SPIFFE validator verifies against its trust bundles".into(),
            );
            out.trusted_ca_pem.clear();
        }
    }
    ferry_tls::check_validation(&out).map_err(|e| tls_error(ctx, field, e))?;
    Ok(out)
}

/// `custom_validator_config`: Envoy's SPIFFE validator is implemented; any
/// other validator is refused.
fn custom_validator(
    ctx: &Ctx<'_>,
    field: &str,
    cv: &core_pb::TypedExtensionConfig,
) -> Result<m::tls::SpiffeValidator, ConvertError> {
    let core_pb::TypedExtensionConfig { name, typed_config } = cv;
    let typed = typed_config
        .as_ref()
        .map(Typed::from_any)
        .transpose()
        .map_err(|e| ctx.err(format!("{field}.typed_config"), e))?
        .ok_or_else(|| ctx.err(format!("{field}.typed_config"), "missing"))?;
    if typed.type_name() != SPIFFE_VALIDATOR_TYPE {
        return Err(ctx.err(
            format!("{field}.typed_config"),
            format!(
                "unsupported certificate validator {name:?} ({}); only envoy.tls.cert_validator.spiffe is",
                typed.type_name()
            ),
        ));
    }
    let cfg: tls_pb::SpiffeCertValidatorConfig = typed
        .decode()
        .map_err(|e| ctx.err(format!("{field}.typed_config"), e))?;
    let tls_pb::SpiffeCertValidatorConfig {
        trust_domains,
        trust_bundles,
    } = &cfg;
    let mut out = m::tls::SpiffeValidator::default();
    if let Some(tb) = trust_bundles {
        // A SPIFFE trust bundle map wins over `trust_domains`, as in Envoy.
        let bytes = data_source(
            ctx,
            &format!("{field}.typed_config.trust_bundles"),
            Some(tb),
        )?;
        out.trust_domains = spiffe_bundle_map(&bytes)
            .map_err(|e| ctx.err(format!("{field}.typed_config.trust_bundles"), e))?;
        return Ok(out);
    }
    for (i, d) in trust_domains.iter().enumerate() {
        let f = format!("{field}.typed_config.trust_domains[{i}]");
        let tls_pb::spiffe_cert_validator_config::TrustDomain {
            name,
            trust_bundle,
            workload_trust_domain,
        } = d;
        ctx.refuse(
            &SPIFFE_TRUST_DOMAIN,
            &f,
            "workload_trust_domain",
            !workload_trust_domain.is_empty(),
        )?;
        if name.is_empty() || name.starts_with("spiffe://") {
            return Err(ctx.err(
                format!("{f}.name"),
                "a trust domain name, without spiffe://",
            ));
        }
        let pem = data_source(ctx, &format!("{f}.trust_bundle"), trust_bundle.as_ref())?;
        if pem.is_empty() {
            return Err(ctx.err(
                format!("{f}.trust_bundle"),
                format!("failed to load trusted CA certificate for {name}"),
            ));
        }
        if out.trust_domains.iter().any(|(n, _)| n == name) {
            return Err(ctx.err(
                format!("{f}.name"),
                format!("multiple trust bundles are given for one trust domain for {name}"),
            ));
        }
        out.trust_domains.push((name.clone(), pem));
    }
    Ok(out)
}

/// A SPIFFE trust bundle map (`{"trust_domains": {"td": {"keys": [{"use":
/// "x509-svid", "x5c": ["base64 DER"]}]}}}`) as PEM bundles per domain.
fn spiffe_bundle_map(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    use base64::Engine;
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a SPIFFE bundle map: {e}"))?;
    let domains = v
        .get("trust_domains")
        .and_then(|d| d.as_object())
        .ok_or("not a SPIFFE bundle map: no trust_domains object")?;
    let mut out = Vec::new();
    for (name, bundle) in domains {
        let mut pem = String::new();
        for key in bundle
            .get("keys")
            .and_then(|k| k.as_array())
            .into_iter()
            .flatten()
        {
            if key.get("use").and_then(|u| u.as_str()) != Some("x509-svid") {
                continue;
            }
            for der in key
                .get("x5c")
                .and_then(|x| x.as_array())
                .into_iter()
                .flatten()
            {
                let der = der
                    .as_str()
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .ok_or_else(|| format!("{name}: an x5c entry is not base64"))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(der);
                pem.push_str("-----BEGIN CERTIFICATE-----\n");
                for chunk in b64.as_bytes().chunks(64) {
                    pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
                    pem.push('\n');
                }
                pem.push_str("-----END CERTIFICATE-----\n");
            }
        }
        if pem.is_empty() {
            return Err(format!("{name}: no x509-svid key"));
        }
        out.push((name.clone(), pem.into_bytes()));
    }
    Ok(out)
}

fn tls_certificate(
    ctx: &mut Ctx<'_>,
    field: &str,
    t: &tls_pb::TlsCertificate,
) -> Result<m::tls::TlsCertificate, ConvertError> {
    let tls_pb::TlsCertificate {
        certificate_chain,
        private_key,
        pkcs12,
        watched_directory,
        private_key_provider,
        password,
        ocsp_staple,
        signed_certificate_timestamp,
        tls_params,
    } = t;
    let cov = &TLS_CERTIFICATE;
    ctx.refuse(cov, field, "pkcs12", pkcs12.is_some())?;
    ctx.refuse(cov, field, "password", password.is_some())?;
    ctx.refuse(
        cov,
        field,
        "private_key_provider",
        private_key_provider.is_some(),
    )?;
    ctx.refuse(cov, field, "ocsp_staple", ocsp_staple.is_some())?;
    ctx.refuse(
        cov,
        field,
        "signed_certificate_timestamp",
        !signed_certificate_timestamp.is_empty(),
    )?;
    ctx.refuse(cov, field, "tls_params", tls_params.is_some())?;
    ctx.knob(cov, field, "watched_directory", watched_directory.is_some());
    let cert = m::tls::TlsCertificate {
        cert_chain_pem: data_source(
            ctx,
            &format!("{field}.certificate_chain"),
            certificate_chain.as_ref(),
        )?,
        private_key_pem: data_source(ctx, &format!("{field}.private_key"), private_key.as_ref())?,
    };
    ferry_tls::check_certificate(&cert).map_err(|e| tls_error(ctx, field, e))?;
    Ok(cert)
}

fn tls_error(ctx: &Ctx<'_>, field: &str, e: ferry_tls::TlsError) -> ConvertError {
    match e {
        ferry_tls::TlsError::Invalid { field: f, message } => {
            ctx.err(format!("{field}.{f}"), message)
        }
        other => ctx.err(field, other.to_string()),
    }
}

/// An SDS `Secret`: a TLS certificate (chain and key) or a validation
/// context (trusted CAs, SAN matchers, pins, CRLs, SPIFFE bundles).
pub fn secret(
    pb: &tls_pb::Secret,
    warnings: &mut super::Warnings,
) -> Result<m::tls::Secret, ConvertError> {
    use tls_pb::secret::Type as T;
    let mut ctx = Ctx {
        resource: format!("secret {:?}", pb.name),
        warnings,
        inbound: false,
        outbound: false,
    };
    let tls_pb::Secret { name: _, r#type } = pb;
    match r#type {
        Some(T::TlsCertificate(t)) => Ok(m::tls::Secret::Certificate(tls_certificate(
            &mut ctx,
            "tls_certificate",
            t,
        )?)),
        Some(T::ValidationContext(v)) => Ok(m::tls::Secret::Validation(validation_context(
            &mut ctx,
            "validation_context",
            v,
        )?)),
        Some(T::SessionTicketKeys(_)) => Err(ctx.refused(&SECRET, "", "session_ticket_keys")),
        Some(T::GenericSecret(_)) => Err(ctx.refused(&SECRET, "", "generic_secret")),
        None => Err(ctx.err("type", "the secret carries nothing")),
    }
}

/// The TLS context of a transport socket, decoded as `M` (`want` names its
/// type); `None` for a raw (plaintext) socket.
fn tls_context<M: Message + Default>(
    ctx: &Ctx<'_>,
    field: &str,
    ts: &core_pb::TransportSocket,
    want: &str,
    who: &str,
) -> Result<Option<M>, ConvertError> {
    let Some(typed) = transport_socket_typed(ctx, field, ts)? else {
        return Ok(None);
    };
    if typed.type_name() != format!("envoy.extensions.transport_sockets.tls.v3.{want}") {
        return Err(ctx.err(
            format!("{field}.typed_config"),
            format!("{who} needs a {want}"),
        ));
    }
    typed
        .decode()
        .map(Some)
        .map_err(|e| ctx.err(format!("{field}.typed_config"), e))
}

pub(super) fn downstream_tls(
    ctx: &mut Ctx<'_>,
    field: &str,
    ts: &core_pb::TransportSocket,
) -> Result<Option<m::tls::DownstreamTls>, ConvertError> {
    use tls_pb::downstream_tls_context::{OcspStaplePolicy, SessionTicketKeysType as K};
    let Some(d) = tls_context::<tls_pb::DownstreamTlsContext>(
        ctx,
        field,
        ts,
        "DownstreamTlsContext",
        "a listener",
    )?
    else {
        return Ok(None);
    };
    let f = format!("{field}.typed_config");
    let cov = &DOWNSTREAM_TLS_CONTEXT;
    let tls_pb::DownstreamTlsContext {
        common_tls_context,
        require_client_certificate,
        require_sni,
        disable_stateful_session_resumption,
        session_timeout,
        ocsp_staple_policy,
        full_scan_certs_on_sni_mismatch,
        prefer_client_ciphers,
        session_ticket_keys_type,
    } = &d;
    let common = common_tls(
        ctx,
        &format!("{f}.common_tls_context"),
        common_tls_context.as_ref(),
    )?;
    let stateless_resumption = match session_ticket_keys_type {
        None => true,
        Some(K::DisableStatelessSessionResumption(disabled)) => !disabled,
        Some(K::SessionTicketKeys(_)) => {
            return Err(ctx.refused(cov, &f, "session_ticket_keys"));
        }
        Some(K::SessionTicketKeysSdsSecretConfig(_)) => {
            return Err(ctx.refused(cov, &f, "session_ticket_keys_sds_secret_config"));
        }
    };
    ctx.knob(cov, &f, "session_timeout", session_timeout.is_some());
    match OcspStaplePolicy::try_from(*ocsp_staple_policy) {
        Ok(OcspStaplePolicy::LenientStapling) => {}
        _ => {
            return Err(ctx.err(
                format!("{f}.ocsp_staple_policy"),
                "OCSP stapling is not supported (only LENIENT_STAPLING, without staples)",
            ));
        }
    }
    // One certificate per context: nothing to scan on an SNI mismatch.
    let _ = full_scan_certs_on_sni_mismatch;
    Ok(Some(m::tls::DownstreamTls {
        common,
        require_client_certificate: require_client_certificate.as_ref().is_some_and(|v| v.value),
        require_sni: require_sni.as_ref().is_some_and(|v| v.value),
        stateless_resumption,
        stateful_resumption: !disable_stateful_session_resumption,
        handshake_timeout: None,
        prefer_client_ciphers: *prefer_client_ciphers,
    }))
}

fields!(pub(super) static INTERNAL_UPSTREAM = "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport" {
    "passthrough_metadata": applied "host metadata envoy.filters.listener.original_dst reaches the internal listener (its original_dst filter reads it); other host or cluster metadata (Istio's `istio`) only feeds telemetry and is not passed; route and request metadata are refused",
    "transport_socket": applied "raw_buffer only (TLS inside the internal connection is refused)",
});

/// An upstream transport socket: TLS (or plaintext), and whether it is
/// `internal_upstream` passing the endpoint's original_dst metadata.
pub(super) fn upstream_transport(
    ctx: &mut Ctx<'_>,
    field: &str,
    ts: &core_pb::TransportSocket,
) -> Result<(Option<m::tls::UpstreamTls>, bool), ConvertError> {
    const INTERNAL: &str =
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport";
    let any = match &ts.config_type {
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any)) => any,
        None => return Ok((upstream_tls(ctx, field, ts)?, false)),
    };
    let typed = Typed::from_any(any).map_err(|e| ctx.err(format!("{field}.typed_config"), e))?;
    if typed.type_name() != INTERNAL {
        return Ok((upstream_tls(ctx, field, ts)?, false));
    }
    use super::coverage::path;
    use envoy_types::pb::envoy::extensions::transport_sockets::internal_upstream::v3 as iu_pb;
    use envoy_types::pb::envoy::r#type::metadata::v3::metadata_kind::Kind;
    let f = format!("{field}.typed_config");
    let iu: iu_pb::InternalUpstreamTransport = typed.decode().map_err(|e| ctx.err(&f, e))?;
    let iu_pb::InternalUpstreamTransport {
        passthrough_metadata,
        transport_socket,
    } = &iu;
    let mut original_dst = false;
    for (i, p) in passthrough_metadata.iter().enumerate() {
        let pf = format!("{f}.passthrough_metadata[{i}]");
        let iu_pb::internal_upstream_transport::MetadataValueSource { kind, name } = p;
        match kind.as_ref().and_then(|k| k.kind.as_ref()) {
            Some(Kind::Host(_)) if name == "envoy.filters.listener.original_dst" => {
                original_dst = true;
            }
            Some(Kind::Host(_) | Kind::Cluster(_)) => {
                ctx.warn(
                    &pf,
                    format!("metadata {name:?} is not passed to the internal listener (it only feeds telemetry there)"),
                );
            }
            Some(Kind::Route(_) | Kind::Request(_)) => {
                return Err(ctx.err(
                    path(&pf, "kind"),
                    "route and request metadata are not passed to internal listeners",
                ));
            }
            None => return Err(ctx.err(path(&pf, "kind"), "a metadata kind is required")),
        }
    }
    if let Some(inner) = transport_socket
        && upstream_tls(ctx, &path(&f, "transport_socket"), inner)?.is_some()
    {
        return Err(ctx.err(
            path(&f, "transport_socket"),
            "TLS inside an internal upstream connection is not supported (raw_buffer only)",
        ));
    }
    Ok((None, original_dst))
}

pub(super) fn upstream_tls(
    ctx: &mut Ctx<'_>,
    field: &str,
    ts: &core_pb::TransportSocket,
) -> Result<Option<m::tls::UpstreamTls>, ConvertError> {
    let Some(u) = tls_context::<tls_pb::UpstreamTlsContext>(
        ctx,
        field,
        ts,
        "UpstreamTlsContext",
        "a cluster",
    )?
    else {
        return Ok(None);
    };
    let f = format!("{field}.typed_config");
    #[allow(deprecated)]
    let tls_pb::UpstreamTlsContext {
        common_tls_context,
        sni,
        auto_host_sni,
        auto_sni_san_validation,
        allow_renegotiation,
        max_session_keys,
        enforce_rsa_key_usage,
    } = &u;
    let common = common_tls(
        ctx,
        &format!("{f}.common_tls_context"),
        common_tls_context.as_ref(),
    )?;
    if *auto_sni_san_validation {
        let inline_ca = match &common.validation {
            Some(m::tls::SecretSource::Inline(s)) => {
                matches!(&**s, m::tls::Secret::Validation(v) if v.has_trust_source())
            }
            // An SDS validation context is checked when it arrives.
            Some(m::tls::SecretSource::Sds(_) | m::tls::SecretSource::AgentSds(_)) => true,
            None => false,
        };
        if !inline_ca {
            return Err(ctx.err(
                format!("{f}.auto_sni_san_validation"),
                "'auto_sni_san_validation' was configured without configuring a trusted CA",
            ));
        }
    }
    ctx.refuse(
        &UPSTREAM_TLS_CONTEXT,
        &f,
        "allow_renegotiation",
        *allow_renegotiation,
    )?;
    Ok(Some(m::tls::UpstreamTls {
        common,
        sni: (!sni.is_empty()).then(|| sni.clone()),
        auto_host_sni: *auto_host_sni,
        auto_sni_san_validation: *auto_sni_san_validation,
        max_session_keys: max_session_keys.as_ref().map_or(1, |v| v.value as usize),
        enforce_rsa_key_usage: enforce_rsa_key_usage.as_ref().is_none_or(|b| b.value),
    }))
}
