//! `ferry-tls`: rustls configurations built from the model's TLS settings
//! and secrets, shared by the data plane (termination and origination) and
//! the xDS client (TLS to the management server).
//!
//! One crypto provider for the whole process (ring), installed explicitly.
//! Peers are checked as Envoy checks them: the chain against the trusted CAs
//! of the validation context, then the subject alternative names against its
//! matchers (Istio's SPIFFE URI SANs; never the host name, which Envoy does
//! not check either unless told to). PEM is parsed once when a secret is
//! converted ([`check_certificate`], [`check_validation`]), so a bad secret
//! is refused with the field at fault before any connection needs it.

pub mod inspect;
mod verify;
pub mod workload;

pub use verify::{PeerCheck, check_validation};

use std::sync::Arc;

use ferry_model::tls::{
    CommonTls, DownstreamTls, SanType, Secret, SecretSource, TlsCertificate, TlsVersion,
    UpstreamTls, ValidationContext,
};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub use rustls;

/// Why a TLS configuration could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("secret {0:?} has not been received")]
    MissingSecret(String),
    #[error("secret {0:?} is not a {1}")]
    WrongSecretKind(String, &'static str),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Rustls(String),
}

fn invalid(field: &'static str, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        field,
        message: message.into(),
    }
}

/// The process-wide crypto provider (ring, with Envoy's order of cipher
/// suites). Installing it as the default keeps any library that asks rustls
/// for "the" provider on the same one.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return p.clone();
    }
    // Losing a race against another installer is fine: both install the same.
    let _ = envoy_ordered().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(envoy_ordered()))
}

/// ring with the cipher suites in the order an Envoy client (BoringSSL, on a
/// CPU with AES instructions) offers them: TLS 1.3 AES-128-GCM, AES-256-GCM,
/// ChaCha20-Poly1305, then Envoy's default TLS 1.2 list (AES-128-GCM and
/// ChaCha20 before AES-256-GCM, ECDSA before RSA). rustls's own order puts
/// AES-256-GCM with SHA-384 first: a server following the client's order (as
/// Envoy's does in TLS 1.3) then negotiated another suite with Ferry than with
/// Envoy, dearer in every handshake and record.
pub fn envoy_ordered() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    p
}

/// Certificates of a PEM bundle, in order; at least one.
pub fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| format!("certificate {i} is not valid X.509: {e}"))?;
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn parse_private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no usable PEM private key: {e}"))
}

/// Checks a certificate secret: the chain parses, the key parses, is of a
/// kind the provider signs with, and belongs to the leaf certificate.
pub fn check_certificate(c: &TlsCertificate) -> Result<(), TlsError> {
    certified_key(c).map(|_| ())
}

fn certified_key(c: &TlsCertificate) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let chain =
        parse_certificates(&c.cert_chain_pem).map_err(|m| invalid("certificate_chain", m))?;
    let key = parse_private_key(&c.private_key_pem).map_err(|m| invalid("private_key", m))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid("private_key", format!("unsupported private key: {e}")))?;
    let ck = rustls::sign::CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        invalid(
            "private_key",
            format!("does not belong to the certificate: {e}"),
        )
    })?;
    Ok(Arc::new(ck))
}

/// Looks secrets up by SDS name (the snapshot's secrets).
pub trait Secrets {
    fn secret(&self, name: &str) -> Option<Arc<Secret>>;
}

impl<S: std::hash::BuildHasher> Secrets for std::collections::HashMap<String, Arc<Secret>, S> {
    fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.get(name).cloned()
    }
}

fn resolve(src: &SecretSource, secrets: &dyn Secrets) -> Result<Arc<Secret>, TlsError> {
    match src {
        SecretSource::Inline(s) => Ok(s.clone()),
        SecretSource::Sds(name) | SecretSource::AgentSds(name) => secrets
            .secret(name)
            .ok_or_else(|| TlsError::MissingSecret(name.clone())),
    }
}

fn source_name(src: &SecretSource) -> String {
    src.sds_name().unwrap_or("inline").to_string()
}

/// The first certificate of a context (Envoy serves one per key type; one
/// is what Istio sends).
fn certificate(
    common: &CommonTls,
    secrets: &dyn Secrets,
) -> Result<Option<Arc<rustls::sign::CertifiedKey>>, TlsError> {
    let Some(src) = common.certificates.first() else {
        return Ok(None);
    };
    match &*resolve(src, secrets)? {
        Secret::Certificate(c) => certified_key(c).map(Some),
        Secret::Validation(_) => Err(TlsError::WrongSecretKind(
            source_name(src),
            "tls_certificate",
        )),
    }
}

/// The validation context in effect for a TLS context: the inline one, or
/// the SDS secret merged into the combined context's default. `None`: the
/// peer is not validated.
pub fn effective_validation(
    common: &CommonTls,
    secrets: &dyn Secrets,
) -> Result<Option<ValidationContext>, TlsError> {
    let Some(src) = &common.validation else {
        return Ok(common.default_validation.as_deref().cloned());
    };
    let secret = resolve(src, secrets)?;
    let dynamic = match &*secret {
        Secret::Validation(v) => v,
        Secret::Certificate(_) => {
            return Err(TlsError::WrongSecretKind(
                source_name(src),
                "validation_context",
            ));
        }
    };
    Ok(Some(match &common.default_validation {
        Some(default) => default.merged_with(dynamic),
        None => dynamic.clone(),
    }))
}

/// The subject alternative names of a certificate with their types: DNS
/// names, URIs (SPIFFE identities), e-mail addresses and IP addresses.
pub fn subject_alt_names(cert: &[u8]) -> Vec<(SanType, String)> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(s) => Some((SanType::Dns, (*s).to_string())),
            GeneralName::URI(s) => Some((SanType::Uri, (*s).to_string())),
            GeneralName::RFC822Name(s) => Some((SanType::Email, (*s).to_string())),
            GeneralName::IPAddress(b) => {
                let ip = match b.len() {
                    4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                    16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                    _ => None,
                }?;
                Some((SanType::IpAddress, ip.to_string()))
            }
            _ => None,
        })
        .collect()
}

/// The peer's SPIFFE identity (its first `spiffe://` URI SAN), if any.
pub fn spiffe_id(cert: &[u8]) -> Option<String> {
    subject_alt_names(cert)
        .into_iter()
        .find(|(t, s)| *t == SanType::Uri && s.starts_with("spiffe://"))
        .map(|(_, s)| s)
}

/// SHA-256 over a server certificate (`local`, DER) and the certificate
/// chain a client presented to it, each length-prefixed: equal for two
/// connections exactly when both saw the same pair.
pub fn chain_digest(local: Option<&[u8]>, peer: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for der in local.into_iter().chain(peer.iter().map(|c| c.as_ref())) {
        ctx.update(&(der.len() as u64).to_be_bytes());
        ctx.update(der);
    }
    // The separator between the server certificate and the chain.
    ctx.update(&[u8::from(local.is_some())]);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// What `x-forwarded-client-cert` tells about one mTLS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCertInfo {
    /// URI SANs of our own certificate (`By=`).
    pub by: Vec<String>,
    /// SHA-256 of the client's leaf certificate, lower-case hex (`Hash=`).
    pub hash: String,
    /// The client's subject, RFC 2253 (`Subject="…"`).
    pub subject: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
}

impl ClientCertInfo {
    /// From our certificate chain's leaf and the client's leaf (DER).
    pub fn new(local: Option<&[u8]>, peer: &[u8]) -> Self {
        let sans_of = |der: &[u8], t: SanType| -> Vec<String> {
            subject_alt_names(der)
                .into_iter()
                .filter(|(k, _)| *k == t)
                .map(|(_, v)| v)
                .collect()
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, peer);
        let hash = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let subject = x509_parser::parse_x509_certificate(peer)
            .map(|(_, c)| rfc2253(c.subject()))
            .unwrap_or_default();
        ClientCertInfo {
            by: local.map(|l| sans_of(l, SanType::Uri)).unwrap_or_default(),
            hash,
            subject,
            uris: sans_of(peer, SanType::Uri),
            dns: sans_of(peer, SanType::Dns),
        }
    }

    /// The header element, fields in Envoy's order: By, Hash, Subject,
    /// URI, DNS.
    pub fn element(&self, subject: bool, uri: bool, dns: bool) -> String {
        let mut parts: Vec<String> = self.by.iter().map(|b| format!("By={b}")).collect();
        parts.push(format!("Hash={}", self.hash));
        if subject {
            parts.push(format!("Subject=\"{}\"", self.subject.replace('"', "\\\"")));
        }
        if uri {
            parts.extend(self.uris.iter().map(|u| format!("URI={u}")));
        }
        if dns {
            parts.extend(self.dns.iter().map(|d| format!("DNS={d}")));
        }
        parts.join(";")
    }
}

/// A distinguished name as RFC 2253 writes it (last RDN first).
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.attr_type().to_id_string();
                    let key = match oid.as_str() {
                        "2.5.4.3" => "CN",
                        "2.5.4.6" => "C",
                        "2.5.4.7" => "L",
                        "2.5.4.8" => "ST",
                        "2.5.4.10" => "O",
                        "2.5.4.11" => "OU",
                        "2.5.4.9" => "STREET",
                        "0.9.2342.19200300.100.1.25" => "DC",
                        "0.9.2342.19200300.100.1.1" => "UID",
                        other => other,
                    }
                    .to_string();
                    let value = atv.as_str().unwrap_or_default();
                    format!("{key}={}", escape_dn_value(value))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The leaf certificate (DER) a context presents, if it resolves.
pub fn local_certificate(common: &CommonTls, secrets: &dyn Secrets) -> Option<Vec<u8>> {
    let src = common.certificates.first()?;
    match &*resolve(src, secrets).ok()? {
        Secret::Certificate(c) => parse_certificates(&c.cert_chain_pem)
            .ok()?
            .into_iter()
            .next()
            .map(|c| c.to_vec()),
        Secret::Validation(_) => None,
    }
}

/// The protocol versions a context allows: its `tls_params`, else Envoy's
/// defaults (minimum 1.2; maximum 1.3 for servers, 1.2 for clients).
fn versions(
    common: &CommonTls,
    default_max: TlsVersion,
) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let min = common.min_version.unwrap_or(TlsVersion::V1_2);
    let max = common.max_version.unwrap_or(default_max).max(min);
    let mut out = Vec::with_capacity(2);
    if max >= TlsVersion::V1_3 {
        out.push(&rustls::version::TLS13);
    }
    if min <= TlsVersion::V1_2 {
        out.push(&rustls::version::TLS12);
    }
    out
}

/// What an Envoy (BoringSSL) name of a cipher suite or curve means here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named<T> {
    /// Spoken by this provider.
    Supported(T),
    /// Known to BoringSSL, not offered here (CBC, PSK, static-RSA suites;
    /// P-521, post-quantum hybrids).
    NotOffered,
    /// Nobody's name: a configuration error.
    Unknown,
}

/// What an Envoy cipher suite name means here.
pub fn cipher_suite(name: &str) -> Named<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    Named::Supported(match name {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-RSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-ECDSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-RSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-ECDSA-CHACHA20-POLY1305" => cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        "ECDHE-RSA-CHACHA20-POLY1305" => cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        "ECDHE-ECDSA-AES128-SHA"
        | "ECDHE-RSA-AES128-SHA"
        | "ECDHE-ECDSA-AES256-SHA"
        | "ECDHE-RSA-AES256-SHA"
        | "ECDHE-PSK-AES128-CBC-SHA"
        | "ECDHE-PSK-AES256-CBC-SHA"
        | "ECDHE-PSK-CHACHA20-POLY1305"
        | "AES128-GCM-SHA256"
        | "AES256-GCM-SHA384"
        | "AES128-SHA"
        | "AES256-SHA"
        | "PSK-AES128-CBC-SHA"
        | "PSK-AES256-CBC-SHA"
        | "DES-CBC3-SHA" => return Named::NotOffered,
        _ => return Named::Unknown,
    })
}

/// What an Envoy ECDH curve name means here.
pub fn ecdh_curve(name: &str) -> Named<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::ring::kx_group;
    Named::Supported(match name {
        "X25519" => kx_group::X25519,
        "P-256" => kx_group::SECP256R1,
        "P-384" => kx_group::SECP384R1,
        "P-224" | "P-521" | "X25519Kyber768Draft00" | "X25519MLKEM768" => return Named::NotOffered,
        _ => return Named::Unknown,
    })
}

/// The names of a cipher list entry: Envoy (BoringSSL) accepts groups of
/// equally preferred suites, `[A|B]`.
pub fn cipher_names(entry: &str) -> impl Iterator<Item = &str> {
    entry
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split('|')
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

/// The process provider narrowed to a context's `tls_params`: TLS 1.2
/// suites and key exchange groups in the configured order (TLS 1.3 suites
/// are not configurable, as in Envoy).
fn provider_for(common: &CommonTls) -> Result<Arc<CryptoProvider>, TlsError> {
    let base = provider();
    if common.cipher_suites.is_empty() && common.ecdh_curves.is_empty() {
        return Ok(base);
    }
    let mut p = (*base).clone();
    if !common.cipher_suites.is_empty() {
        let mut suites: Vec<rustls::SupportedCipherSuite> = base
            .cipher_suites
            .iter()
            .filter(|s| s.tls13().is_some())
            .copied()
            .collect();
        for entry in &common.cipher_suites {
            for name in cipher_names(entry) {
                match cipher_suite(name) {
                    Named::Supported(s) if !suites.contains(&s) => suites.push(s),
                    Named::Supported(_) | Named::NotOffered => {}
                    Named::Unknown => {
                        return Err(invalid(
                            "cipher_suites",
                            format!("unknown cipher suite {name:?}"),
                        ));
                    }
                }
            }
        }
        p.cipher_suites = suites;
    }
    if !common.ecdh_curves.is_empty() {
        let mut groups = Vec::new();
        for name in &common.ecdh_curves {
            match ecdh_curve(name) {
                Named::Supported(g) => groups.push(g),
                Named::NotOffered => {}
                Named::Unknown => {
                    return Err(invalid("ecdh_curves", format!("unknown curve {name:?}")));
                }
            }
        }
        if groups.is_empty() {
            return Err(invalid("ecdh_curves", "none of the curves is supported"));
        }
        p.kx_groups = groups;
    }
    Ok(Arc::new(p))
}

/// The compiled peer check of a filter chain's TLS context with the live
/// secrets (`None`: the chain does not verify clients, or cannot be built).
pub fn downstream_peer_check(tls: &DownstreamTls, secrets: &dyn Secrets) -> Option<PeerCheck> {
    let v = effective_validation(&tls.common, secrets).ok()??;
    PeerCheck::new(&v, provider_for(&tls.common).ok()?).ok()
}

/// Whether a handshake of `tls` picks its cipher suite by the server's
/// order rather than the client's: as Envoy's server (BoringSSL) picks, a
/// TLS 1.2 handshake does unless `prefer_client_ciphers`, a TLS 1.3 one
/// never does. `client_offers_tls13`: the ClientHello's
/// `supported_versions` lists TLS 1.3.
pub fn server_order(tls: &DownstreamTls, client_offers_tls13: bool) -> bool {
    let tls13 = versions(&tls.common, TlsVersion::V1_3).contains(&&rustls::version::TLS13);
    let tls13_handshake = client_offers_tls13 && tls13;
    !(tls.prefer_client_ciphers || tls13_handshake)
}

/// The server side of a filter chain's `DownstreamTlsContext`.
pub fn server_config(
    tls: &DownstreamTls,
    secrets: &dyn Secrets,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider_for(&tls.common)?;
    let key = certificate(&tls.common, secrets)?
        .ok_or_else(|| invalid("tls_certificates", "a TLS server needs a certificate"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(&tls.common, TlsVersion::V1_3))
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let validation = effective_validation(&tls.common, secrets)?;
    // Envoy asks for a client certificate when it has something to check it
    // against, or when one is required.
    let builder = match validation {
        Some(v) if v.verifies() || tls.require_client_certificate => {
            let check = PeerCheck::new(&v, provider.clone())?;
            builder.with_client_cert_verifier(Arc::new(verify::ClientVerifier::new(
                check,
                tls.require_client_certificate,
            )))
        }
        None if tls.require_client_certificate => {
            let check = PeerCheck::new(&ValidationContext::default(), provider.clone())?;
            builder.with_client_cert_verifier(Arc::new(verify::ClientVerifier::new(check, true)))
        }
        _ => builder.with_no_client_auth(),
    };
    let resolver: Arc<dyn rustls::server::ResolvesServerCert> = if tls.require_sni {
        Arc::new(RequireSni(rustls::sign::SingleCertAndKey::from(key)))
    } else {
        Arc::new(rustls::sign::SingleCertAndKey::from(key))
    };
    let mut config = builder.with_cert_resolver(resolver);
    // The suite is the client's first that this server speaks, as Envoy picks
    // it in TLS 1.3 (`cipher_suites_are_chosen_and_offered_in_envoys_order`).
    // A TLS 1.2 handshake takes the server's order instead: rustls has one
    // rule for both versions, so the caller takes a copy with
    // `ignore_client_order` set where [`server_order`] says so. (Envoy's
    // groups of equal preference, `[A|B]`, leave the choice within a group
    // to the client; here a group is taken in its written order.)
    config.ignore_client_order = false;
    config.alpn_protocols = tls
        .common
        .alpn
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    if tls.stateless_resumption {
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Rustls(e.to_string()))?;
    }
    if !tls.stateful_resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    Ok(config)
}

/// `require_sni`: no certificate (so no handshake) for a ClientHello
/// without a server name.
#[derive(Debug)]
struct RequireSni(rustls::sign::SingleCertAndKey);

impl rustls::server::ResolvesServerCert for RequireSni {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        hello.server_name()?;
        self.0.resolve(hello)
    }
}

/// The client side of a cluster's `UpstreamTlsContext`. `default_alpn` is
/// offered when the context names none (Envoy's HTTP/2 pool offers `h2`).
pub fn client_config(
    tls: &UpstreamTls,
    default_alpn: &[&str],
    secrets: &dyn Secrets,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider_for(&tls.common)?;
    let validation = effective_validation(&tls.common, secrets)?.unwrap_or_default();
    if tls.auto_sni_san_validation && !validation.has_trust_source() {
        return Err(invalid(
            "auto_sni_san_validation",
            "'auto_sni_san_validation' was configured without configuring a trusted CA",
        ));
    }
    let check = PeerCheck::new(&validation, provider.clone())?;
    let versions = versions(&tls.common, TlsVersion::V1_2);
    // Without TLS 1.3 its suites are not offered either (rustls would list
    // them in the ClientHello all the same; Envoy's client does not).
    let offered = if versions.contains(&&rustls::version::TLS13) {
        provider.clone()
    } else {
        let mut p = (*provider).clone();
        p.cipher_suites.retain(|s| s.tls13().is_none());
        Arc::new(p)
    };
    let builder = rustls::ClientConfig::builder_with_provider(offered)
        .with_protocol_versions(&versions)
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verify::ServerVerifier {
            check,
            sni_san: tls.auto_sni_san_validation,
            rsa_key_usage: tls.enforce_rsa_key_usage,
        }));
    let mut config = match certificate(&tls.common, secrets)? {
        Some(key) => {
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = if tls.common.alpn.is_empty() {
        default_alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
    } else {
        tls.common
            .alpn
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect()
    };
    // SNI goes out whenever the name is a DNS name ([`server_name`]); an
    // address is never sent, so a context without one sends none, as Envoy.
    config.enable_sni = true;
    config.resumption = if tls.max_session_keys == 0 {
        rustls::client::Resumption::disabled()
    } else {
        rustls::client::Resumption::in_memory_sessions(tls.max_session_keys)
    };
    Ok(config)
}

/// The name a client connection presents: the upstream host's name with
/// `auto_host_sni`, else the configured SNI, else the peer's address (which
/// rustls never sends as SNI).
pub fn server_name(
    tls: &UpstreamTls,
    hostname: Option<&str>,
    peer: std::net::IpAddr,
) -> ServerName<'static> {
    let auto = hostname.filter(|_| tls.auto_host_sni);
    auto.or(tls.sni.as_deref())
        .and_then(|s| ServerName::try_from(s.to_string()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(peer.into()))
}

/// Every SDS name a set of TLS contexts needs.
pub fn sds_names<'a>(contexts: impl IntoIterator<Item = &'a CommonTls>) -> Vec<String> {
    contexts
        .into_iter()
        .flat_map(|c| c.sds_names())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ca() -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let pem = issuer.pem();
        (issuer, pem)
    }

    fn leaf(issuer: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, uri: &str) -> TlsCertificate {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &**issuer).unwrap();
        TlsCertificate {
            cert_chain_pem: cert.pem().into_bytes(),
            private_key_pem: key.serialize_pem().into_bytes(),
        }
    }

    #[test]
    fn certificate_checks_name_the_field() {
        let (issuer, _) = ca();
        let good = leaf(&issuer, "spiffe://cluster.local/ns/default/sa/a");
        check_certificate(&good).unwrap();
        let bad_chain = TlsCertificate {
            cert_chain_pem: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                .to_vec(),
            ..good.clone()
        };
        let e = check_certificate(&bad_chain).unwrap_err();
        assert!(
            matches!(
                &e,
                TlsError::Invalid {
                    field: "certificate_chain",
                    ..
                }
            ),
            "{e}"
        );
        let other = leaf(&issuer, "spiffe://cluster.local/ns/default/sa/b");
        let mismatched = TlsCertificate {
            private_key_pem: other.private_key_pem,
            ..good.clone()
        };
        let e = check_certificate(&mismatched).unwrap_err();
        assert!(
            matches!(
                &e,
                TlsError::Invalid {
                    field: "private_key",
                    ..
                }
            ),
            "{e}"
        );
        let e = check_validation(&ValidationContext {
            trusted_ca_pem: b"not pem".to_vec(),
            ..ValidationContext::default()
        })
        .unwrap_err();
        assert!(
            matches!(
                &e,
                TlsError::Invalid {
                    field: "trusted_ca",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn spiffe_id_is_read() {
        let (issuer, _) = ca();
        let c = leaf(&issuer, "spiffe://cluster.local/ns/default/sa/a");
        let der = parse_certificates(&c.cert_chain_pem).unwrap();
        assert_eq!(
            spiffe_id(&der[0]).as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/a")
        );
    }

    #[test]
    fn client_cert_element_is_envoys() {
        let (issuer, _) = ca();
        let server = leaf(&issuer, "spiffe://cluster.local/ns/default/sa/server");
        let client = leaf(&issuer, "spiffe://cluster.local/ns/default/sa/client");
        let s = parse_certificates(&server.cert_chain_pem).unwrap();
        let c = parse_certificates(&client.cert_chain_pem).unwrap();
        let info = ClientCertInfo::new(Some(&s[0]), &c[0]);
        assert_eq!(info.hash.len(), 64);
        let e = info.element(true, true, true);
        assert_eq!(
            e,
            format!(
                "By=spiffe://cluster.local/ns/default/sa/server;Hash={};Subject=\"CN=rcgen self signed cert\";URI=spiffe://cluster.local/ns/default/sa/client",
                info.hash
            )
        );
        assert_eq!(escape_dn_value("a,b"), "a\\,b");
    }

    #[test]
    fn configs_resolve_sds_secrets() {
        let (issuer, ca_pem) = ca();
        let mut secrets: HashMap<String, Arc<Secret>> = HashMap::new();
        let tls = DownstreamTls {
            common: CommonTls {
                certificates: vec![SecretSource::Sds("default".into())],
                validation: Some(SecretSource::Sds("ROOTCA".into())),
                alpn: vec!["h2".into(), "http/1.1".into()],
                ..Default::default()
            },
            require_client_certificate: true,
            ..DownstreamTls::default()
        };
        assert_eq!(
            server_config(&tls, &secrets).unwrap_err(),
            TlsError::MissingSecret("default".into())
        );
        secrets.insert(
            "default".into(),
            Arc::new(Secret::Certificate(leaf(&issuer, "spiffe://x/ns/a/sa/b"))),
        );
        secrets.insert(
            "ROOTCA".into(),
            Arc::new(Secret::Validation(ValidationContext {
                trusted_ca_pem: ca_pem.into_bytes(),
                ..ValidationContext::default()
            })),
        );
        let sc = server_config(&tls, &secrets).unwrap();
        assert_eq!(
            sc.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // Envoy's defaults: servers up to 1.3, clients 1.2 only.
        use rustls::ProtocolVersion as V;
        let spoken =
            |c: &CommonTls, max| -> Vec<V> { versions(c, max).iter().map(|v| v.version).collect() };
        assert_eq!(
            spoken(&tls.common, TlsVersion::V1_3),
            [V::TLSv1_3, V::TLSv1_2]
        );
        assert_eq!(spoken(&tls.common, TlsVersion::V1_2), [V::TLSv1_2]);
        let up = UpstreamTls {
            common: tls.common.clone(),
            ..UpstreamTls::default()
        };
        let mut up_no_alpn = up.clone();
        up_no_alpn.common.alpn.clear();
        let cc = client_config(&up_no_alpn, &["h2"], &secrets).unwrap();
        assert_eq!(cc.alpn_protocols, vec![b"h2".to_vec()]);
        let mut up13 = up_no_alpn.clone();
        up13.common.max_version = Some(TlsVersion::V1_3);
        up13.common.min_version = Some(TlsVersion::V1_3);
        assert_eq!(spoken(&up13.common, TlsVersion::V1_2), [V::TLSv1_3]);
        client_config(&up13, &[], &secrets).unwrap();
        assert!(
            cc.enable_sni,
            "SNI goes out for DNS names only (see server_name)"
        );
        // A certificate where a validation context is expected.
        let mut swapped = up;
        swapped.common.validation = Some(SecretSource::Sds("default".into()));
        assert_eq!(
            client_config(&swapped, &[], &secrets).unwrap_err(),
            TlsError::WrongSecretKind("default".into(), "validation_context")
        );
    }
}
