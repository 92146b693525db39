//! What the admin `/certs` page shows of a certificate: its serial number,
//! subject alternative names and validity.

use std::time::{Duration, SystemTime};

use crate::SanType;

/// One certificate's details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertDetails {
    /// Lower-case hex of whole bytes, as Envoy prints it.
    pub serial_number: String,
    pub subject_alt_names: Vec<(SanType, String)>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The details of a DER certificate (`None` when it does not parse).
pub fn details(der: &[u8]) -> Option<CertDetails> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    // As BoringSSL's BN_bn2hex: whole bytes, without leading zero bytes.
    let raw = cert.tbs_certificate.raw_serial();
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let serial: String = raw[first..].iter().map(|b| format!("{b:02x}")).collect();
    Some(CertDetails {
        serial_number: if serial.is_empty() {
            "0".into()
        } else {
            serial
        },
        subject_alt_names: crate::subject_alt_names(der),
        not_before: at(cert.validity().not_before)?,
        not_after: at(cert.validity().not_after)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_serial_sans_and_validity() {
        let mut params =
            rcgen::CertificateParams::new(vec!["a.example".to_string()]).expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x01, 0xab]));
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let d = details(cert.der()).expect("details");
        assert_eq!(d.serial_number, "01ab");
        assert_eq!(
            d.subject_alt_names,
            vec![(SanType::Dns, "a.example".into())]
        );
        assert!(d.not_after > d.not_before);
    }
}
