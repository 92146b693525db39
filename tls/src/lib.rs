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

pub mod workload;

use std::sync::Arc;

use ferry_model::tls::{
    CommonTls, DownstreamTls, SanMatcher, SanType, Secret, SecretSource, TlsCertificate,
    TlsVersion, UpstreamTls, ValidationContext,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

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

/// The process-wide crypto provider (ring). Installing it as the default
/// keeps any library that asks rustls for "the" provider on the same one.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return p.clone();
    }
    // Losing a race against another installer is fine: both install ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
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

/// Checks a validation context: its trusted CAs parse and are usable roots.
pub fn check_validation(v: &ValidationContext) -> Result<(), TlsError> {
    if v.trusted_ca_pem.is_empty() {
        return Ok(());
    }
    roots(&v.trusted_ca_pem).map(|_| ())
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

fn roots(pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let certs = parse_certificates(pem).map_err(|m| invalid("trusted_ca", m))?;
    let mut store = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        store
            .add(c)
            .map_err(|e| invalid("trusted_ca", format!("certificate {i}: {e}")))?;
    }
    Ok(Arc::new(store))
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
        SecretSource::Sds(name) => secrets
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

/// What a peer is checked against.
struct Validation {
    /// `None`: the chain is not verified (no trusted CA configured).
    roots: Option<Arc<RootCertStore>>,
    sans: Vec<SanMatcher>,
}

fn validation(common: &CommonTls, secrets: &dyn Secrets) -> Result<Validation, TlsError> {
    let mut sans = common.match_subject_alt_names.clone();
    let mut roots_pem: &[u8] = &[];
    let secret;
    if let Some(src) = &common.validation {
        secret = resolve(src, secrets)?;
        match &*secret {
            Secret::Validation(v) => {
                roots_pem = &v.trusted_ca_pem;
                sans.extend(v.match_subject_alt_names.iter().cloned());
            }
            Secret::Certificate(_) => {
                return Err(TlsError::WrongSecretKind(
                    source_name(src),
                    "validation_context",
                ));
            }
        }
    }
    Ok(Validation {
        roots: if roots_pem.is_empty() {
            None
        } else {
            Some(roots(roots_pem)?)
        },
        sans,
    })
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

/// Whether the certificate carries a SAN one of the matchers accepts (a
/// typed matcher only looks at SANs of its type).
fn check_sans(sans: &[SanMatcher], cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    if sans.is_empty() {
        return Ok(());
    }
    let names = subject_alt_names(cert);
    let accepted = names.iter().any(|(t, n)| {
        sans.iter()
            .any(|m| m.san_type.is_none_or(|want| want == *t) && m.matcher.matches(n, false))
    });
    if accepted {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// Verifies a server's certificate against the trusted CAs and SAN matchers.
#[derive(Debug)]
struct ServerVerifier {
    roots: Option<Arc<RootCertStore>>,
    sans: Vec<SanMatcher>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        check_sans(&self.sans, end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a client's certificate: the chain with webpki (when CAs are
/// configured), then the SAN matchers.
#[derive(Debug)]
struct ClientVerifier {
    /// `None`: no CA configured, any certificate is taken (its signature
    /// over the handshake is still checked).
    inner: Option<Arc<dyn ClientCertVerifier>>,
    sans: Vec<SanMatcher>,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        match &self.inner {
            Some(v) => v.root_hint_subjects(),
            None => &[],
        }
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(v) = &self.inner {
            v.verify_client_cert(end_entity, intermediates, now)?;
        }
        check_sans(&self.sans, end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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

/// The server side of a filter chain's `DownstreamTlsContext`.
pub fn server_config(
    tls: &DownstreamTls,
    secrets: &dyn Secrets,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let key = certificate(&tls.common, secrets)?
        .ok_or_else(|| invalid("tls_certificates", "a TLS server needs a certificate"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(&tls.common, TlsVersion::V1_3))
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let wants_peer = tls.require_client_certificate || tls.common.validation.is_some();
    let builder = if wants_peer {
        let v = validation(&tls.common, secrets)?;
        let inner = match &v.roots {
            Some(roots) => {
                let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                );
                let b = if tls.require_client_certificate {
                    b
                } else {
                    b.allow_unauthenticated()
                };
                Some(b.build().map_err(|e| TlsError::Rustls(e.to_string()))?)
            }
            None => None,
        };
        builder.with_client_cert_verifier(Arc::new(ClientVerifier {
            inner,
            sans: v.sans,
            mandatory: tls.require_client_certificate,
            provider: provider.clone(),
        }))
    } else {
        builder.with_no_client_auth()
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
    config.alpn_protocols = tls
        .common
        .alpn
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(config)
}

/// The client side of a cluster's `UpstreamTlsContext`. `default_alpn` is
/// offered when the context names none (Envoy's HTTP/2 pool offers `h2`).
pub fn client_config(
    tls: &UpstreamTls,
    default_alpn: &[&str],
    secrets: &dyn Secrets,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let v = validation(&tls.common, secrets)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(&tls.common, TlsVersion::V1_2))
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            roots: v.roots,
            sans: v.sans,
            provider: provider.clone(),
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
    // Envoy sends SNI only when configured.
    config.enable_sni = tls.sni.is_some();
    Ok(config)
}

/// The name a client connection presents: the configured SNI, else the
/// peer's address (which rustls never sends as SNI).
pub fn server_name(tls: &UpstreamTls, peer: std::net::IpAddr) -> ServerName<'static> {
    tls.sni
        .as_deref()
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
    use ferry_model::StringMatcher;
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
            match_subject_alt_names: vec![],
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
    fn sans_and_spiffe_id_are_read() {
        let (issuer, _) = ca();
        let c = leaf(&issuer, "spiffe://cluster.local/ns/default/sa/a");
        let der = parse_certificates(&c.cert_chain_pem).unwrap();
        assert_eq!(
            spiffe_id(&der[0]).as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/a")
        );
        let san = |t, m| SanMatcher {
            san_type: t,
            matcher: m,
        };
        let prefix = || StringMatcher::Prefix("spiffe://cluster.local/".into());
        assert!(check_sans(&[san(Some(SanType::Uri), prefix())], &der[0]).is_ok());
        assert!(check_sans(&[san(None, prefix())], &der[0]).is_ok());
        // The right string under another SAN type is not a match.
        assert!(check_sans(&[san(Some(SanType::Dns), prefix())], &der[0]).is_err());
        let other = StringMatcher::Exact("spiffe://cluster.local/ns/default/sa/b".into());
        assert!(check_sans(&[san(Some(SanType::Uri), other)], &der[0]).is_err());
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
                match_subject_alt_names: vec![],
                ..Default::default()
            },
            require_client_certificate: true,
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
                match_subject_alt_names: vec![],
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
            sni: None,
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
        assert!(!cc.enable_sni);
        // A certificate where a validation context is expected.
        let mut swapped = up;
        swapped.common.validation = Some(SecretSource::Sds("default".into()));
        assert_eq!(
            client_config(&swapped, &[], &secrets).unwrap_err(),
            TlsError::WrongSecretKind("default".into(), "validation_context")
        );
    }
}
