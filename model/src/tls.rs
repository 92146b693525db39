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
    /// Inline or file data given in the configuration itself.
    Inline(Arc<Secret>),
}

impl SecretSource {
    /// The SDS name, if the data comes by name.
    pub fn sds_name(&self) -> Option<&str> {
        match self {
            SecretSource::Sds(n) => Some(n),
            SecretSource::Inline(_) => None,
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

/// Trusted CAs (PEM) and the peer SANs accepted.
#[derive(Debug, Clone, Default)]
pub struct ValidationContext {
    /// PEM certificates of the trusted CAs; empty: the peer's certificate is
    /// not verified (Envoy's behaviour without `trusted_ca`).
    pub trusted_ca_pem: Vec<u8>,
    pub match_subject_alt_names: Vec<SanMatcher>,
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
    pub certificates: Vec<SecretSource>,
    pub validation: Option<SecretSource>,
    pub alpn: Vec<String>,
    /// Peer SANs accepted (empty: any peer the CA vouches for), from the
    /// inline or combined default validation context; a validation context
    /// delivered by SDS adds its own.
    pub match_subject_alt_names: Vec<SanMatcher>,
}

impl CommonTls {
    /// Names of the SDS secrets this context needs.
    pub fn sds_names(&self) -> impl Iterator<Item = &str> {
        self.certificates
            .iter()
            .chain(self.validation.iter())
            .filter_map(SecretSource::sds_name)
    }
}

#[derive(Debug, Clone, Default)]
pub struct DownstreamTls {
    pub common: CommonTls,
    pub require_client_certificate: bool,
}

#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    pub common: CommonTls,
    pub sni: Option<String>,
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
