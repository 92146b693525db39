//! The workload side of certificate issuance (istio-agent's job): a fresh
//! key and a certificate signing request for the workload's SPIFFE
//! identity, and reading back when an issued certificate expires.

use std::time::{Duration, SystemTime};

use crate::{TlsError, invalid};

/// A new ECDSA P-256 key (PEM, PKCS#8) and a CSR (PEM) asking for
/// `identity` as the only URI SAN, with an empty subject as istio-agent's.
pub fn key_and_csr(identity: &str) -> Result<(String, String), TlsError> {
    let key = rcgen::KeyPair::generate().map_err(|e| invalid("key", e.to_string()))?;
    let uri = rcgen::string::Ia5String::try_from(identity.to_string())
        .map_err(|e| invalid("identity", format!("{identity:?}: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| invalid("csr", e.to_string()))?;
    Ok((key.serialize_pem(), csr))
}

/// Validity of the first certificate of a PEM chain: (not before, not after).
pub fn validity(chain_pem: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    Some((
        at(cert.validity().not_before)?,
        at(cert.validity().not_after)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_asks_for_the_identity_and_a_signed_leaf_reads_back() {
        let id = "spiffe://cluster.local/ns/default/sa/sleep";
        let (key_pem, csr_pem) = key_and_csr(id).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
        assert_eq!(csr.params.subject_alt_names.len(), 1);
        match &csr.params.subject_alt_names[0] {
            rcgen::SanType::URI(u) => assert_eq!(u.as_str(), id),
            other => panic!("{other:?}"),
        }
        // Signed by some CA, the leaf tells its lifetime.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = csr.signed_by(&issuer).unwrap();
        let (from, to) = validity(leaf.pem().as_bytes()).unwrap();
        assert!(to > from);
        assert_eq!(crate::spiffe_id(leaf.der()).as_deref(), Some(id));
        assert!(validity(b"junk").is_none());
    }
}
