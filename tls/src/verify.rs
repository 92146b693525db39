//! How a peer's certificate is checked, as Envoy's certificate validators
//! check it: the compiled form of a `CertificateValidationContext`
//! ([`PeerCheck`]) and the rustls verifiers (server and client side) that
//! apply it.
//!
//! Envoy's default validator verifies the chain against the trusted CAs
//! (a partial chain is fine: any configured certificate is an anchor), with
//! CRLs when given (the leaf only, or the whole chain), then requires the
//! SAN matchers and the certificate/SPKI pins to accept the leaf. Without a
//! trust source only pins can validate a peer (SANs alone are refused as
//! insecure when the context is built). The SPIFFE validator
//! (`envoy.tls.cert_validator.spiffe`) picks the trust bundle by the trust
//! domain of the leaf's SPIFFE URI, refuses CA leaves, and applies URI SAN
//! matchers only. Host names are never checked, unless
//! `auto_sni_san_validation` asks for the SNI as a DNS SAN.
//!
//! Chains are verified with webpki directly (not rustls' own verifiers),
//! so that no host name check is imposed and the verified path is seen
//! (for `max_verify_depth`).

use std::collections::HashMap;
use std::sync::Arc;

use ferry_model::tls::{SanMatcher, SanType, ValidationContext};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use webpki::{
    EndEntityCert, KeyUsage, OwnedCertRevocationList, RevocationCheckDepth, RevocationOptions,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::{TlsError, invalid, parse_certificates};

/// Trust anchors and the CRLs that go with them.
#[derive(Debug)]
struct Anchors {
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
    subjects: Vec<DistinguishedName>,
    crls: Vec<webpki::CertRevocationList<'static>>,
    /// Revocation is checked for the leaf only.
    leaf_only_crl: bool,
}

impl Anchors {
    /// From PEM certificates and CRLs (a CA bundle may carry CRLs, as
    /// OpenSSL reads them), plus extra CRLs.
    fn from_pem(
        field: &'static str,
        pem: &[u8],
        extra_crls: &[u8],
        leaf_only_crl: bool,
    ) -> Result<Anchors, TlsError> {
        let certs = parse_certificates(pem).map_err(|m| invalid(field, m))?;
        let mut out = Anchors::from_certs(field, certs)?;
        out.crls = crls(field, pem)?;
        out.crls.extend(crls("crl", extra_crls)?);
        out.leaf_only_crl = leaf_only_crl;
        Ok(out)
    }

    fn from_certs(
        field: &'static str,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<Anchors, TlsError> {
        let mut anchors = Vec::with_capacity(certs.len());
        let mut subjects = Vec::with_capacity(certs.len());
        for (i, c) in certs.iter().enumerate() {
            let anchor = webpki::anchor_from_trusted_cert(c)
                .map_err(|e| invalid(field, format!("certificate {i} is not a usable CA: {e}")))?
                .to_owned();
            // The CertificateRequest lists whole Names (a SEQUENCE), as rustls'
            // root store does; the anchor holds the Name's contents.
            subjects.push(DistinguishedName::in_sequence(anchor.subject.as_ref()));
            anchors.push(anchor);
        }
        Ok(Anchors {
            anchors,
            subjects,
            crls: Vec::new(),
            leaf_only_crl: false,
        })
    }

    fn revocation<'a>(
        &'a self,
        refs: &'a [&'a webpki::CertRevocationList<'a>],
    ) -> Option<RevocationOptions<'a>> {
        let builder = RevocationOptionsBuilder::new(refs).ok()?;
        Some(
            builder
                .with_depth(if self.leaf_only_crl {
                    RevocationCheckDepth::EndEntity
                } else {
                    RevocationCheckDepth::Chain
                })
                // OpenSSL's CRL check fails when no CRL covers a certificate,
                // and refuses an expired CRL.
                .with_status_policy(UnknownStatusPolicy::Deny)
                .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
                .build(),
        )
    }
}

/// The CRLs of a PEM bundle (certificates in it are skipped).
fn crls(
    field: &'static str,
    pem: &[u8],
) -> Result<Vec<webpki::CertRevocationList<'static>>, TlsError> {
    let mut out = Vec::new();
    for (i, der) in CertificateRevocationListDer::pem_slice_iter(pem).enumerate() {
        let der = der.map_err(|e| invalid(field, format!("invalid PEM: {e}")))?;
        let crl = OwnedCertRevocationList::from_der(der.as_ref())
            .map_err(|e| invalid(field, format!("CRL {i} is not valid: {e}")))?;
        out.push(webpki::CertRevocationList::Owned(crl));
    }
    Ok(out)
}

/// Where the chain's trust comes from.
#[derive(Debug)]
enum Trust {
    /// No trust source: the chain is not verified.
    Unverified,
    Anchors(Anchors),
    /// SPIFFE trust bundles by trust domain.
    Spiffe(HashMap<String, Anchors>),
}

/// A validation context compiled for handshakes.
#[derive(Debug)]
pub struct PeerCheck {
    trust: Trust,
    sans: Vec<SanMatcher>,
    certificate_hashes: Vec<[u8; 32]>,
    spki_hashes: Vec<[u8; 32]>,
    max_depth: Option<u32>,
    /// Whether a peer certificate is required whenever the peer is asked
    /// for one (Envoy: SAN matchers, pins or the SPIFFE validator).
    mandatory: bool,
    /// No CA names in the CertificateRequest.
    suppress_ca_list: bool,
    provider: Arc<CryptoProvider>,
}

/// What the system's root store holds, loaded once.
fn system_roots() -> Result<Vec<CertificateDer<'static>>, TlsError> {
    static ROOTS: std::sync::OnceLock<Result<Vec<CertificateDer<'static>>, String>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "the system has no root certificates".into());
                return Err(why);
            }
            Ok(found.certs)
        })
        .clone()
        .map_err(|m| invalid("system_root_certs", m))
}

impl PeerCheck {
    /// Compiles a validation context; refuses what Envoy refuses (SANs or
    /// CRLs without a trust source) and what the SPIFFE validator would
    /// silently skip.
    pub fn new(
        v: &ValidationContext,
        provider: Arc<CryptoProvider>,
    ) -> Result<PeerCheck, TlsError> {
        if let Some((field, reason)) = v.insecure() {
            return Err(invalid(field, reason));
        }
        let trust = if let Some(spiffe) = &v.spiffe {
            if !v.certificate_hashes.is_empty() || !v.spki_hashes.is_empty() {
                return Err(invalid(
                    "custom_validator_config",
                    "the SPIFFE validator does not apply verify_certificate_hash or verify_certificate_spki",
                ));
            }
            if !v.crl_pem.is_empty() {
                return Err(invalid(
                    "custom_validator_config",
                    "the SPIFFE validator does not apply crl (put CRLs in the trust bundles)",
                ));
            }
            let mut domains = HashMap::with_capacity(spiffe.trust_domains.len());
            for (name, pem) in &spiffe.trust_domains {
                let anchors = Anchors::from_pem("trust_bundle", pem, &[], false)?;
                if domains.insert(name.clone(), anchors).is_some() {
                    return Err(invalid(
                        "trust_domains",
                        format!("multiple trust bundles are given for trust domain {name:?}"),
                    ));
                }
            }
            Trust::Spiffe(domains)
        } else if !v.trusted_ca_pem.is_empty() {
            Trust::Anchors(Anchors::from_pem(
                "trusted_ca",
                &v.trusted_ca_pem,
                &v.crl_pem,
                v.only_verify_leaf_cert_crl,
            )?)
        } else if v.system_root_certs {
            let mut anchors = Anchors::from_certs("system_root_certs", system_roots()?)?;
            anchors.crls = crls("crl", &v.crl_pem)?;
            anchors.leaf_only_crl = v.only_verify_leaf_cert_crl;
            Trust::Anchors(anchors)
        } else {
            Trust::Unverified
        };
        // Typed matchers win over the deprecated untyped ones, as in Envoy.
        let typed = v
            .match_subject_alt_names
            .iter()
            .any(|m| m.san_type.is_some());
        let mut sans: Vec<SanMatcher> = v
            .match_subject_alt_names
            .iter()
            .filter(|m| !typed || m.san_type.is_some())
            .cloned()
            .collect();
        if matches!(trust, Trust::Spiffe(_)) {
            // The SPIFFE validator only looks at URI SANs.
            sans.retain(|m| m.san_type.is_none_or(|t| t == SanType::Uri));
            for m in &mut sans {
                m.san_type = Some(SanType::Uri);
            }
        }
        let mandatory = matches!(trust, Trust::Spiffe(_))
            || !sans.is_empty()
            || !v.certificate_hashes.is_empty()
            || !v.spki_hashes.is_empty();
        Ok(PeerCheck {
            trust,
            sans,
            certificate_hashes: v.certificate_hashes.clone(),
            spki_hashes: v.spki_hashes.clone(),
            max_depth: v.max_verify_depth,
            mandatory,
            suppress_ca_list: v.suppress_client_ca_list,
            provider,
        })
    }

    /// Checks a peer's chain. `usage` is the extended key usage the leaf
    /// must allow (when it lists any); `sni_san` replaces the SAN matchers
    /// with one exact DNS name (`auto_sni_san_validation`).
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
        sni_san: Option<&str>,
    ) -> Result<(), rustls::Error> {
        match &self.trust {
            Trust::Unverified => {}
            Trust::Anchors(a) => self.chain(a, end_entity, intermediates, now, usage)?,
            Trust::Spiffe(domains) => {
                spiffe_precheck(end_entity)?;
                let domain =
                    spiffe_trust_domain(end_entity).ok_or(rustls::Error::InvalidCertificate(
                        CertificateError::ApplicationVerificationFailure,
                    ))?;
                let anchors = domains
                    .get(&domain)
                    .ok_or(rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer,
                    ))?;
                self.chain(anchors, end_entity, intermediates, now, usage)?;
            }
        }
        match sni_san {
            Some(name) => check_sni_san(name, end_entity)?,
            None => check_sans(&self.sans, end_entity)?,
        }
        self.check_pins(end_entity)
    }

    fn chain(
        &self,
        anchors: &Anchors,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<(), rustls::Error> {
        let cert = EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let refs: Vec<&webpki::CertRevocationList<'_>> = anchors.crls.iter().collect();
        let revocation = anchors.revocation(&refs);
        let max_depth = self.max_depth;
        let depth_check = move |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
            // Envoy's depth counts the certificates above the leaf, the
            // trust anchor included.
            match max_depth {
                Some(max) if path.intermediate_certificates().count() + 1 > max as usize => {
                    Err(webpki::Error::MaximumPathDepthExceeded)
                }
                _ => Ok(()),
            }
        };
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors.anchors,
            intermediates,
            now,
            usage,
            revocation,
            Some(&depth_check),
        )
        .map(|_| ())
        .map_err(pki_error)
    }

    /// Whether a peer chain accepted earlier is now revoked: its chain
    /// checked again at the time of its handshake (`at`, so expiry since
    /// then and root rotations do not count), only a revocation answering
    /// yes.
    pub fn revoked(&self, chain: &[CertificateDer<'_>], at: UnixTime, client: bool) -> bool {
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        let usage = if client {
            KeyUsage::client_auth()
        } else {
            KeyUsage::server_auth()
        };
        matches!(
            self.check(leaf, rest, at, usage, None),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        )
    }

    fn check_pins(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.certificate_hashes.is_empty() && self.spki_hashes.is_empty() {
            return Ok(());
        }
        let hash_ok = !self.certificate_hashes.is_empty() && {
            let d = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
            self.certificate_hashes.iter().any(|h| h[..] == *d.as_ref())
        };
        let spki_ok = !self.spki_hashes.is_empty()
            && spki_digest(end_entity)
                .is_some_and(|d| self.spki_hashes.iter().any(|h| h[..] == d[..]));
        if hash_ok || spki_ok {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn ca_subjects(&self) -> Vec<DistinguishedName> {
        if self.suppress_ca_list {
            return Vec::new();
        }
        match &self.trust {
            Trust::Unverified => Vec::new(),
            Trust::Anchors(a) => a.subjects.clone(),
            Trust::Spiffe(d) => {
                let mut all: Vec<DistinguishedName> = d
                    .values()
                    .flat_map(|a| a.subjects.iter().cloned())
                    .collect();
                all.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
                all.dedup_by(|a, b| a.as_ref() == b.as_ref());
                all
            }
        }
    }
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo (DER).
pub(crate) fn spki_digest(cert: &[u8]) -> Option<[u8; 32]> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        parsed.tbs_certificate.subject_pki.raw,
    );
    d.as_ref().try_into().ok()
}

/// X509-SVID leaf rules: not a CA, may not sign certificates or CRLs. As
/// with Envoy (BoringSSL reads a missing key usage extension as "every
/// usage"), a leaf without a key usage extension is refused too.
fn spiffe_precheck(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let bad =
        || rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|_| bad())?;
    if parsed.is_ca() {
        return Err(bad());
    }
    match parsed.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() && !ku.value.crl_sign() => Ok(()),
        _ => Err(bad()),
    }
}

/// The trust domain of a certificate's first URI SAN, when it is a SPIFFE
/// id with a path (`spiffe://domain/...`).
fn spiffe_trust_domain(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, uri) = crate::subject_alt_names(cert)
        .into_iter()
        .find(|(t, _)| *t == SanType::Uri)?;
    let rest = uri.strip_prefix("spiffe://")?;
    let slash = rest.find('/')?;
    Some(rest[..slash].to_string())
}

/// Whether the certificate carries a SAN one of the matchers accepts (a
/// typed matcher only looks at SANs of its type).
pub(crate) fn check_sans(
    sans: &[SanMatcher],
    cert: &CertificateDer<'_>,
) -> Result<(), rustls::Error> {
    if sans.is_empty() {
        return Ok(());
    }
    let names = crate::subject_alt_names(cert);
    let accepted = names.iter().any(|(t, n)| {
        sans.iter()
            .any(|m| m.san_type.is_none_or(|want| want == *t) && m.matcher.matches(n, false))
    });
    if accepted {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// `auto_sni_san_validation`: a DNS SAN equal to the SNI sent (a wildcard
/// SAN covers one label, as Envoy's DNS matching does).
fn check_sni_san(sni: &str, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let sni = sni.to_ascii_lowercase();
    let ok = crate::subject_alt_names(cert).iter().any(|(t, n)| {
        *t == SanType::Dns && {
            let n = n.to_ascii_lowercase();
            n == sni
                || n.strip_prefix("*.").is_some_and(|suffix| {
                    sni.split_once('.')
                        .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix)
                })
        }
    });
    if ok {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ))
    }
}

/// A webpki failure as the rustls error (and so the TLS alert) it means.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let c = match e {
        E::BadDer | E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::CertExpired { .. } | E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertRevoked => CertificateError::Revoked,
        E::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        E::CrlExpired { .. } => CertificateError::ExpiredRevocationList,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        _ => CertificateError::ApplicationVerificationFailure,
    };
    rustls::Error::InvalidCertificate(c)
}

/// Checks a server's certificate (origination).
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub check: PeerCheck,
    /// `auto_sni_san_validation`: the server must be valid for the SNI.
    pub sni_san: bool,
    /// `enforce_rsa_key_usage`.
    pub rsa_key_usage: bool,
}

/// An RSA leaf whose key usage excludes digital signatures cannot sign an
/// ECDHE handshake (the only key exchanges spoken here), as BoringSSL's
/// enforcement refuses it.
fn rsa_key_usage(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Ok(());
    };
    let rsa = parsed.tbs_certificate.subject_pki.algorithm.algorithm
        == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION;
    match parsed.key_usage() {
        Ok(Some(ku)) if rsa && !ku.value.digital_signature() => Err(
            rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose),
        ),
        _ => Ok(()),
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let sni = match (self.sni_san, server_name) {
            (true, ServerName::DnsName(n)) => Some(n.as_ref()),
            _ => None,
        };
        self.check
            .check(end_entity, intermediates, now, KeyUsage::server_auth(), sni)?;
        if self.rsa_key_usage {
            rsa_key_usage(end_entity)?;
        }
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
            &self.check.provider.signature_verification_algorithms,
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
            &self.check.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.check
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks a client's certificate (termination).
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub check: PeerCheck,
    /// `require_client_certificate`.
    pub required: bool,
    subjects: Vec<DistinguishedName>,
}

impl ClientVerifier {
    pub fn new(check: PeerCheck, required: bool) -> Self {
        let subjects = check.ca_subjects();
        ClientVerifier {
            check,
            required,
            subjects,
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.required || self.check.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check.check(
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
            None,
        )?;
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
            &self.check.provider.signature_verification_algorithms,
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
            &self.check.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.check
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Parses and checks a validation context's PEM and pins without building
/// handshake state (used when a secret or a configuration is converted).
pub fn check_validation(v: &ValidationContext) -> Result<(), TlsError> {
    if !v.trusted_ca_pem.is_empty() {
        let certs = parse_certificates(&v.trusted_ca_pem).map_err(|m| invalid("trusted_ca", m))?;
        Anchors::from_certs("trusted_ca", certs)?;
        crls("trusted_ca", &v.trusted_ca_pem)?;
    }
    crls("crl", &v.crl_pem)?;
    if let Some(s) = &v.spiffe {
        for (name, pem) in &s.trust_domains {
            Anchors::from_pem("trust_bundle", pem, &[], false)
                .map_err(|e| invalid("trust_domains", format!("{name}: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::StringMatcher;
    use ferry_model::tls::SpiffeValidator;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
        IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
        SerialNumber,
    };
    use time::{Duration, OffsetDateTime};

    type Issuer = CertifiedIssuer<'static, KeyPair>;

    fn ca(name: &str) -> Issuer {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    fn intermediate(parent: &Issuer, name: &str) -> Issuer {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::signed_by(p, KeyPair::generate().unwrap(), &**parent).unwrap()
    }

    struct Leaf {
        der: CertificateDer<'static>,
    }

    fn leaf_with(issuer: &Issuer, uri: &str, edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        p.serial_number = Some(SerialNumber::from(rand_serial()));
        // As Istio's workload certificates.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        edit(&mut p);
        let cert = p
            .signed_by(&KeyPair::generate().unwrap(), &**issuer)
            .unwrap();
        Leaf {
            der: cert.der().clone(),
        }
    }

    fn leaf(issuer: &Issuer, uri: &str) -> Leaf {
        leaf_with(issuer, uri, |_| {})
    }

    fn rand_serial() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(1000);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn self_signed(uri: &str) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        Leaf {
            der: cert.der().clone(),
        }
    }

    fn uri_san(prefix: &str) -> SanMatcher {
        SanMatcher {
            san_type: Some(SanType::Uri),
            matcher: StringMatcher::Prefix(prefix.into()),
        }
    }

    fn ctx(ca: &Issuer) -> ValidationContext {
        ValidationContext {
            trusted_ca_pem: ca.pem().into_bytes(),
            ..ValidationContext::default()
        }
    }

    /// The client-side verdict (termination) on a chain.
    fn client_ok(v: &ValidationContext, chain: &[&CertificateDer<'static>]) -> bool {
        let check = PeerCheck::new(v, crate::provider()).unwrap();
        let verifier = ClientVerifier::new(check, true);
        let rest: Vec<CertificateDer<'static>> = chain[1..].iter().map(|c| (*c).clone()).collect();
        verifier
            .verify_client_cert(chain[0], &rest, UnixTime::now())
            .is_ok()
    }

    const ID: &str = "spiffe://cluster.local/ns/default/sa/client";

    #[test]
    fn sans_without_a_trust_source_are_refused_as_envoy_does() {
        let v = ValidationContext {
            match_subject_alt_names: vec![uri_san("spiffe://cluster.local/")],
            ..ValidationContext::default()
        };
        let e = PeerCheck::new(&v, crate::provider()).unwrap_err();
        assert!(
            e.to_string().contains("without trusted CA is insecure"),
            "{e}"
        );
        let crl_only = ValidationContext {
            crl_pem: b"x".to_vec(),
            ..ValidationContext::default()
        };
        assert!(PeerCheck::new(&crl_only, crate::provider()).is_err());
    }

    #[test]
    fn forged_and_foreign_chains_are_refused() {
        let mesh = ca("mesh");
        let other = ca("other");
        let mut v = ctx(&mesh);
        v.match_subject_alt_names = vec![uri_san("spiffe://cluster.local/")];
        assert!(client_ok(&v, &[&leaf(&mesh, ID).der]));
        assert!(
            !client_ok(&v, &[&self_signed(ID).der]),
            "self-signed forgery"
        );
        assert!(!client_ok(&v, &[&leaf(&other, ID).der]), "unrelated CA");
        assert!(
            !client_ok(&v, &[&leaf(&mesh, "spiffe://evil.local/ns/a/sa/b").der]),
            "SAN outside the matchers"
        );
    }

    #[test]
    fn expired_and_not_yet_valid_leaves_are_refused() {
        let mesh = ca("mesh");
        let v = ctx(&mesh);
        let expired = leaf_with(&mesh, ID, |p| {
            p.not_before = OffsetDateTime::now_utc() - Duration::days(10);
            p.not_after = OffsetDateTime::now_utc() - Duration::days(1);
        });
        let future = leaf_with(&mesh, ID, |p| {
            p.not_before = OffsetDateTime::now_utc() + Duration::days(1);
            p.not_after = OffsetDateTime::now_utc() + Duration::days(10);
        });
        assert!(!client_ok(&v, &[&expired.der]));
        assert!(!client_ok(&v, &[&future.der]));
    }

    #[test]
    fn pins_select_certificates_with_or_without_a_ca() {
        let mesh = ca("mesh");
        let pinned = leaf(&mesh, ID);
        let other = leaf(&mesh, ID);
        let hash: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, pinned.der.as_ref())
            .as_ref()
            .try_into()
            .unwrap();
        let spki = spki_digest(pinned.der.as_ref()).unwrap();
        for v in [
            ValidationContext {
                certificate_hashes: vec![hash],
                ..ctx(&mesh)
            },
            ValidationContext {
                spki_hashes: vec![spki],
                ..ctx(&mesh)
            },
            // Pins alone validate a peer (no chain check), as in Envoy.
            ValidationContext {
                spki_hashes: vec![spki],
                ..ValidationContext::default()
            },
        ] {
            assert!(client_ok(&v, &[&pinned.der]));
            assert!(!client_ok(&v, &[&other.der]));
        }
    }

    fn crl(issuer: &Issuer, revoked: &[&Leaf]) -> Vec<u8> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|l| {
                let (_, parsed) = x509_parser::parse_x509_certificate(l.der.as_ref()).unwrap();
                RevokedCertParams {
                    serial_number: SerialNumber::from_slice(parsed.raw_serial()),
                    revocation_time: now - Duration::hours(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect();
        let p = CertificateRevocationListParams {
            this_update: now - Duration::hours(2),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        p.signed_by(&**issuer).unwrap().pem().unwrap().into_bytes()
    }

    #[test]
    fn revoked_leaves_are_refused_and_a_missing_crl_fails_closed() {
        let root = ca("root");
        let inter = intermediate(&root, "intermediate");
        let good = leaf(&inter, ID);
        let bad = leaf(&inter, ID);
        let chain = |l: &Leaf| vec![l.der.clone(), inter.der().clone()];
        let mut v = ctx(&root);
        v.crl_pem = crl(&inter, &[&bad]);
        v.only_verify_leaf_cert_crl = true;
        let ok = |v: &ValidationContext, l: &Leaf| {
            let c = chain(l);
            client_ok(v, &c.iter().collect::<Vec<_>>())
        };
        assert!(ok(&v, &good));
        assert!(!ok(&v, &bad), "revoked");
        // The whole chain: the intermediate has no CRL from the root, which
        // OpenSSL treats as an unknown status (refused).
        v.only_verify_leaf_cert_crl = false;
        assert!(!ok(&v, &good));
        v.crl_pem.extend(crl(&root, &[]));
        assert!(ok(&v, &good));
        assert!(!ok(&v, &bad));
    }

    #[test]
    fn a_new_crl_revokes_an_accepted_peer_and_nothing_else() {
        let root = ca("root");
        let good = leaf(&root, ID);
        let bad = leaf(&root, ID);
        let before = PeerCheck::new(&ctx(&root), crate::provider()).unwrap();
        let now = UnixTime::now();
        assert!(!before.revoked(std::slice::from_ref(&bad.der), now, true));
        let mut v = ctx(&root);
        v.crl_pem = crl(&root, &[&bad]);
        v.only_verify_leaf_cert_crl = true;
        let after = PeerCheck::new(&v, crate::provider()).unwrap();
        assert!(after.revoked(std::slice::from_ref(&bad.der), now, true));
        assert!(!after.revoked(std::slice::from_ref(&good.der), now, true));
        // A peer the new roots do not know is not "revoked" (root rotation).
        let other = ca("other");
        let rotated = PeerCheck::new(&ctx(&other), crate::provider()).unwrap();
        assert!(!rotated.revoked(std::slice::from_ref(&good.der), now, true));
    }

    #[test]
    fn max_verify_depth_counts_the_certificates_above_the_leaf() {
        let root = ca("root");
        let inter = intermediate(&root, "intermediate");
        let l = leaf(&inter, ID);
        let mut v = ctx(&root);
        let chain = [&l.der, inter.der()];
        assert!(client_ok(&v, &chain));
        v.max_verify_depth = Some(2);
        assert!(client_ok(&v, &chain));
        v.max_verify_depth = Some(1);
        assert!(!client_ok(&v, &chain));
        let direct = leaf(&root, ID);
        assert!(client_ok(&v, &[&direct.der]));
    }

    #[test]
    fn spiffe_validator_picks_the_bundle_by_trust_domain() {
        let local = ca("cluster.local");
        let foreign = ca("foreign");
        let v = ValidationContext {
            spiffe: Some(SpiffeValidator {
                trust_domains: vec![
                    ("cluster.local".into(), local.pem().into_bytes()),
                    ("foreign.org".into(), foreign.pem().into_bytes()),
                ],
            }),
            match_subject_alt_names: vec![SanMatcher {
                san_type: None,
                matcher: StringMatcher::Prefix("spiffe://".into()),
            }],
            ..ValidationContext::default()
        };
        assert!(client_ok(&v, &[&leaf(&local, ID).der]));
        assert!(client_ok(
            &v,
            &[&leaf(&foreign, "spiffe://foreign.org/ns/a/sa/b").der]
        ));
        // Each domain only trusts its own bundle.
        assert!(!client_ok(&v, &[&leaf(&foreign, ID).der]));
        assert!(!client_ok(
            &v,
            &[&leaf(&local, "spiffe://unknown.org/ns/a/sa/b").der]
        ));
        assert!(!client_ok(&v, &[&self_signed(ID).der]));
        // An SVID is never a CA.
        let ca_leaf = leaf_with(&local, ID, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        });
        assert!(!client_ok(&v, &[&ca_leaf.der]));
        let no_key_usage = leaf_with(&local, ID, |p| p.key_usages.clear());
        assert!(!client_ok(&v, &[&no_key_usage.der]));
        let cert_signer = leaf_with(&local, ID, |p| {
            p.key_usages.push(KeyUsagePurpose::KeyCertSign);
        });
        assert!(!client_ok(&v, &[&cert_signer.der]));
        // Pins are not applied by the SPIFFE validator: refused.
        let pinned = ValidationContext {
            spki_hashes: vec![[0; 32]],
            ..v.clone()
        };
        assert!(PeerCheck::new(&pinned, crate::provider()).is_err());
    }

    #[test]
    fn combined_contexts_merge_as_envoy() {
        let mesh = ca("mesh");
        let default = ValidationContext {
            match_subject_alt_names: vec![uri_san("spiffe://cluster.local/ns/default/")],
            ..ValidationContext::default()
        };
        let merged = default.merged_with(&ctx(&mesh));
        assert!(client_ok(&merged, &[&leaf(&mesh, ID).der]));
        assert!(!client_ok(
            &merged,
            &[&leaf(&mesh, "spiffe://cluster.local/ns/other/sa/x").der]
        ));
        assert!(!client_ok(&merged, &[&self_signed(ID).der]));
        // A secret without a CA leaves the default's SANs unverifiable.
        let empty = default.merged_with(&ValidationContext::default());
        assert!(PeerCheck::new(&empty, crate::provider()).is_err());
    }

    #[test]
    fn auto_sni_san_validation_wants_the_sni_as_a_dns_san() {
        let mesh = ca("mesh");
        let mut p = CertificateParams::new(vec!["api.example.com".to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        let cert = p.signed_by(&KeyPair::generate().unwrap(), &*mesh).unwrap();
        let check = PeerCheck::new(&ctx(&mesh), crate::provider()).unwrap();
        let v = ServerVerifier {
            check,
            sni_san: true,
            rsa_key_usage: true,
        };
        let name = |n: &str| ServerName::try_from(n.to_string()).unwrap();
        let verify = |n: &str| {
            v.verify_server_cert(cert.der(), &[], &name(n), &[], UnixTime::now())
                .is_ok()
        };
        assert!(verify("api.example.com"));
        assert!(!verify("www.example.com"));
    }
}
