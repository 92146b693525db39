//! TLS settings of filter chains (termination) and clusters (origination) as
//! Envoy's `DownstreamTlsContext` / `UpstreamTlsContext` carry them:
//! certificates and validation contexts by SDS name (as istiod sends them) or
//! inline, ALPN, client certificate requirement, and SAN matchers.

use crate::route::StringMatcher;

/// Where a certificate or a validation context comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An SDS secret by name (`default`, `ROOTCA`, `file-cert:…`).
    Sds(String),
    /// Inline or file data given in the configuration.
    Inline,
}

#[derive(Debug, Clone, Default)]
pub struct CommonTls {
    pub certificates: Vec<SecretSource>,
    pub validation: Option<SecretSource>,
    pub alpn: Vec<String>,
    /// Peer SANs accepted (empty: any peer the CA vouches for).
    pub match_subject_alt_names: Vec<StringMatcher>,
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
