//! TLS settings of filter chains (termination) and clusters (origination) as
//! Envoy's `DownstreamTlsContext` / `UpstreamTlsContext` carry them:
//! certificates and validation contexts by SDS name (as istiod sends them) or
//! inline, ALPN, client certificate requirement, and SAN matchers; and the
//! secrets themselves (SDS `Secret`s or inline data), as validated PEM.

use std::sync::Arc;

use crate::route::StringMatcher;

/// Where a certificate or a validation context comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// An SDS secret by name (`default`, `ROOTCA`, `file-cert:…`), looked up
    /// in the snapshot's secrets (static ones from the bootstrap or ones
    /// delivered over ADS).
    Sds(String),
    /// An SDS secret by name fetched from istio-agent's SDS server (an
    /// `sds_config` on its `sds-grpc` cluster), not from the ADS stream.
    AgentSds(String),
    /// Inline or file data given in the configuration itself.
    Inline(Arc<Secret>),
}

impl SecretSource {
    /// The SDS name, if the data comes by name.
    pub fn sds_name(&self) -> Option<&str> {
        match self {
            SecretSource::Sds(n) | SecretSource::AgentSds(n) => Some(n),
            SecretSource::Inline(_) => None,
        }
    }

    /// The name, if istio-agent's SDS server holds the secret.
    pub fn agent_sds_name(&self) -> Option<&str> {
        match self {
            SecretSource::AgentSds(n) => Some(n),
            _ => None,
        }
    }
}

/// One secret: a certificate with its key, or what peers are checked against.
#[derive(Debug, Clone)]
pub enum Secret {
    Certificate(TlsCertificate),
    Validation(ValidationContext),
}

/// A certificate chain (leaf first) and its private key, both PEM, checked
/// to parse when the secret was converted.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsCertificate {
    pub cert_chain_pem: Vec<u8>,
    pub private_key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsCertificate {
    // The private key never goes to a log; a digest of both still tells two
    // certificates apart (configurations are compared by their Debug form).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.cert_chain_pem.hash(&mut h);
        self.private_key_pem.hash(&mut h);
        f.debug_struct("TlsCertificate")
            .field("cert_chain_pem.len", &self.cert_chain_pem.len())
            .field("digest", &format_args!("{:016x}", h.finish()))
            .finish_non_exhaustive()
    }
}

/// Which kind of subject alternative name a matcher looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    Dns,
    Uri,
    Email,
    IpAddress,
}

/// One accepted peer SAN: of a given type (`match_typed_subject_alt_names`)
/// or of any type (the deprecated untyped `match_subject_alt_names`).
#[derive(Debug, Clone)]
pub struct SanMatcher {
    pub san_type: Option<SanType>,
    pub matcher: StringMatcher,
}

/// How a peer's certificate is checked: Envoy's `CertificateValidationContext`.
///
/// The chain is verified against `trusted_ca_pem` (or the system's roots,
/// or per-trust-domain SPIFFE bundles), then the leaf must satisfy the SAN
/// matchers and the pins. Envoy refuses SAN matching or CRLs without a
/// trust source; [`ValidationContext::insecure`] says when that applies.
#[derive(Debug, Clone, Default)]
pub struct ValidationContext {
    /// PEM certificates of the trusted CAs (and CRLs in the same bundle, as
    /// OpenSSL reads them); empty: no CA configured.
    pub trusted_ca_pem: Vec<u8>,
    pub match_subject_alt_names: Vec<SanMatcher>,
    /// `verify_certificate_hash`: SHA-256 digests of accepted leaf
    /// certificates (DER).
    pub certificate_hashes: Vec<[u8; 32]>,
    /// `verify_certificate_spki`: SHA-256 digests of accepted leaves'
    /// SubjectPublicKeyInfo.
    pub spki_hashes: Vec<[u8; 32]>,
    /// `crl`: PEM certificate revocation lists.
    pub crl_pem: Vec<u8>,
    /// `only_verify_leaf_cert_crl`: revocation is checked for the leaf only
    /// (else for every certificate of the chain).
    pub only_verify_leaf_cert_crl: bool,
    /// `max_verify_depth`: the most certificates above the leaf (trust
    /// anchor included) a verified chain may have.
    pub max_verify_depth: Option<u32>,
    /// `system_root_certs`: the operating system's roots, used when no
    /// `trusted_ca` is given.
    pub system_root_certs: bool,
    /// `custom_validator_config` of `envoy.tls.cert_validator.spiffe`: the
    /// peer's trust domain (from its SPIFFE URI SAN) selects the bundle its
    /// chain is verified against.
    pub spiffe: Option<SpiffeValidator>,
    /// `suppress_client_ca_list`: a server sends no CA names when it asks
    /// for a client certificate.
    pub suppress_client_ca_list: bool,
}

/// Envoy's SPIFFE certificate validator: a trust bundle per trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpiffeValidator {
    /// Trust domain name (no `spiffe://`) and its PEM bundle (CAs and CRLs).
    pub trust_domains: Vec<(String, Vec<u8>)>,
}

impl ValidationContext {
    /// Whether the chain is verified at all (a CA, the system's roots or a
    /// SPIFFE validator).
    pub fn has_trust_source(&self) -> bool {
        !self.trusted_ca_pem.is_empty() || self.system_root_certs || self.spiffe.is_some()
    }

    /// Envoy's refusal of contexts that would check names or revocation of
    /// a chain nobody verified: `Some((field, reason))` when this context
    /// must not be used.
    pub fn insecure(&self) -> Option<(&'static str, &'static str)> {
        if self.has_trust_source() {
            return None;
        }
        if !self.crl_pem.is_empty() {
            return Some(("crl", "a CRL cannot be checked without trusted CA"));
        }
        if !self.match_subject_alt_names.is_empty() {
            return Some((
                "match_subject_alt_names",
                "SAN-based verification of peer certificates without trusted CA is insecure and not allowed",
            ));
        }
        None
    }

    /// Whether a peer certificate is checked at all (Envoy then requests
    /// one from clients and verifies servers' ones).
    pub fn verifies(&self) -> bool {
        self.has_trust_source()
            || !self.match_subject_alt_names.is_empty()
            || !self.certificate_hashes.is_empty()
            || !self.spki_hashes.is_empty()
    }

    /// This (default) context completed by a dynamic one, as Envoy merges a
    /// combined validation context's default with its SDS secret (protobuf
    /// `MergeFrom`: lists are joined, fields set in the secret win).
    pub fn merged_with(&self, dynamic: &ValidationContext) -> ValidationContext {
        fn join<T: Clone>(a: &[T], b: &[T]) -> Vec<T> {
            a.iter().chain(b).cloned().collect()
        }
        fn pick(a: &[u8], b: &[u8]) -> Vec<u8> {
            if b.is_empty() { a.to_vec() } else { b.to_vec() }
        }
        ValidationContext {
            trusted_ca_pem: pick(&self.trusted_ca_pem, &dynamic.trusted_ca_pem),
            match_subject_alt_names: join(
                &self.match_subject_alt_names,
                &dynamic.match_subject_alt_names,
            ),
            certificate_hashes: join(&self.certificate_hashes, &dynamic.certificate_hashes),
            spki_hashes: join(&self.spki_hashes, &dynamic.spki_hashes),
            crl_pem: pick(&self.crl_pem, &dynamic.crl_pem),
            only_verify_leaf_cert_crl: self.only_verify_leaf_cert_crl
                || dynamic.only_verify_leaf_cert_crl,
            max_verify_depth: dynamic.max_verify_depth.or(self.max_verify_depth),
            system_root_certs: self.system_root_certs || dynamic.system_root_certs,
            spiffe: dynamic.spiffe.clone().or_else(|| self.spiffe.clone()),
            suppress_client_ca_list: self.suppress_client_ca_list
                || dynamic.suppress_client_ca_list,
        }
    }
}

/// A TLS protocol version (`tls_params`); only 1.2 and 1.3 are spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Debug, Clone, Default)]
pub struct CommonTls {
    /// `tls_params.tls_minimum_protocol_version`; `None`: Envoy's default
    /// (TLS 1.2).
    pub min_version: Option<TlsVersion>,
    /// `tls_params.tls_maximum_protocol_version`; `None`: Envoy's default
    /// (TLS 1.2 for clients, 1.3 for servers).
    pub max_version: Option<TlsVersion>,
    /// `tls_params.cipher_suites` (Envoy's names, TLS 1.2 suites); empty:
    /// the defaults.
    pub cipher_suites: Vec<String>,
    /// `tls_params.ecdh_curves`; empty: the defaults.
    pub ecdh_curves: Vec<String>,
    pub certificates: Vec<SecretSource>,
    /// Where the peer validation comes from: an inline context, or an SDS
    /// secret (possibly completed by [`CommonTls::default_validation`]).
    pub validation: Option<SecretSource>,
    /// The default context of a `combined_validation_context`, merged with
    /// the SDS secret when the handshake configuration is built.
    pub default_validation: Option<Arc<ValidationContext>>,
    pub alpn: Vec<String>,
}
impl CommonTls {
    /// Names of the SDS secrets this context needs.
    pub fn sds_names(&self) -> impl Iterator<Item = &str> {
        self.certificates
            .iter()
            .chain(self.validation.iter())
            .filter_map(SecretSource::sds_name)
    }

    /// Names of the SDS secrets this context needs from istio-agent.
    pub fn agent_sds_names(&self) -> impl Iterator<Item = &str> {
        self.certificates
            .iter()
            .chain(self.validation.iter())
            .filter_map(SecretSource::agent_sds_name)
    }
}

#[derive(Debug, Clone)]
pub struct DownstreamTls {
    pub common: CommonTls,
    pub require_client_certificate: bool,
    /// `require_sni`: a ClientHello without a server name is refused.
    pub require_sni: bool,
    /// Session resumption by tickets (`disable_stateless_session_resumption`
    /// false) and by session ids (`disable_stateful_session_resumption`
    /// false), as Envoy offers both by default.
    pub stateless_resumption: bool,
    pub stateful_resumption: bool,
    /// The filter chain's `transport_socket_connect_timeout`: how long the
    /// handshake may take (`None`: Ferry's bound of 10 s; Envoy has none).
    pub handshake_timeout: Option<std::time::Duration>,
    /// `prefer_client_ciphers`: a TLS 1.2 handshake takes the client's
    /// first suite instead of the server's (TLS 1.3 always takes the
    /// client's, as BoringSSL does).
    pub prefer_client_ciphers: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub common: CommonTls,
    pub sni: Option<String>,
    /// `auto_host_sni`: the SNI is the upstream host's hostname (a DNS
    /// cluster's name or the endpoint's `hostname`) when there is one.
    pub auto_host_sni: bool,
    /// `auto_sni_san_validation`: the server's certificate must carry the
    /// SNI sent as a DNS SAN, instead of the configured SAN matchers.
    pub auto_sni_san_validation: bool,
    /// `max_session_keys`: sessions kept for resumption (Envoy: 1 by
    /// default; 0 disables resumption).
    pub max_session_keys: usize,
    /// `enforce_rsa_key_usage` (Envoy's default: true): an RSA server
    /// certificate whose key usage excludes digital signatures is refused.
    pub enforce_rsa_key_usage: bool,
}

impl Default for DownstreamTls {
    /// Envoy's defaults: both kinds of session resumption offered.
    fn default() -> Self {
        DownstreamTls {
            common: CommonTls::default(),
            require_client_certificate: false,
            require_sni: false,
            stateless_resumption: true,
            stateful_resumption: true,
            handshake_timeout: None,
            prefer_client_ciphers: false,
        }
    }
}

impl Default for UpstreamTls {
    /// Envoy's defaults: one session kept for resumption, RSA key usage
    /// enforced.
    fn default() -> Self {
        UpstreamTls {
            common: CommonTls::default(),
            sni: None,
            auto_host_sni: false,
            auto_sni_san_validation: false,
            max_session_keys: 1,
            enforce_rsa_key_usage: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_of_equal_length_debug_apart_without_the_key() {
        let a = TlsCertificate {
            cert_chain_pem: b"CERT-A".to_vec(),
            private_key_pem: b"SECRET-KEY-1".to_vec(),
        };
        let b = TlsCertificate {
            cert_chain_pem: b"CERT-B".to_vec(),
            ..a.clone()
        };
        let (da, db) = (format!("{a:?}"), format!("{b:?}"));
        assert_ne!(da, db);
        assert!(!da.contains("SECRET"), "{da}");
    }
}
