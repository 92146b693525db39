//! Test certificates (rcgen, ring) shaped like Istio's: a mesh CA and
//! workload certificates whose identity is a SPIFFE URI SAN, plus a plain
//! HTTP/1.1-over-TLS client built on rustls for poking at TLS listeners
//! directly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate authority.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A workload certificate: chain (PEM), key (PEM) and the leaf's DER.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    /// The key's SubjectPublicKeyInfo (DER).
    pub spki: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?;
        Ok(Ca { issuer })
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key (PEM), for a control plane that issues from it.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A workload certificate for SPIFFE identity `uri` (and `dns` names).
    pub fn leaf(&self, uri: &str, dns: &[&str]) -> Result<Leaf> {
        self.leaf_with(uri, dns, |_| {})
    }

    /// [`Ca::leaf`] with its parameters edited (validity, key usage…).
    pub fn leaf_with(
        &self,
        uri: &str,
        dns: &[&str],
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> Result<Leaf> {
        let mut params = leaf_params(uri, dns)?;
        edit(&mut params);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        })
    }

    /// A PEM CRL of this CA revoking `revoked`, valid for a day.
    pub fn crl(&self, revoked: &[&Leaf]) -> Result<String> {
        let now = time::OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|l| {
                Ok(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&serial_of(&l.der)?),
                    revocation_time: now - time::Duration::hours(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::hours(2),
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn leaf_params(uri: &str, dns: &[&str]) -> Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into()?)];
    for d in dns {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName((*d).try_into()?));
    }
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    // As Istio's workload certificates (the SPIFFE validator refuses a leaf
    // without key usage).
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    Ok(params)
}

/// A certificate's serial number (DER: tbsCertificate's first INTEGER after
/// the optional version), read without an X.509 library.
fn serial_of(der: &[u8]) -> Result<Vec<u8>> {
    // SEQUENCE { SEQUENCE (tbs) { [0] version?, INTEGER serial, ... } ... }
    fn header(b: &[u8]) -> Result<(u8, usize, usize)> {
        let tag = *b.first().context("truncated DER")?;
        let first = *b.get(1).context("truncated DER")?;
        if first < 0x80 {
            return Ok((tag, 2, first as usize));
        }
        let n = (first & 0x7f) as usize;
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i).context("truncated DER")? as usize;
        }
        Ok((tag, 2 + n, len))
    }
    let (_, h, _) = header(der)?;
    let tbs = &der[h..];
    let (_, h, _) = header(tbs)?;
    let mut rest = &tbs[h..];
    let (tag, h, len) = header(rest)?;
    if tag == 0xa0 {
        rest = &rest[h + len..];
    }
    let (tag, h, len) = header(rest)?;
    ensure!(tag == 0x02, "no serial number in the certificate");
    Ok(rest[h..h + len].to_vec())
}

impl Leaf {
    /// A self-signed certificate claiming `uri`: what a forger presents.
    pub fn self_signed(uri: &str, dns: &[&str]) -> Result<Leaf> {
        let params = leaf_params(uri, dns)?;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        })
    }

    /// SHA-256 of the public key, base64 (Envoy's `verify_certificate_spki`).
    pub fn spki_sha256_base64(&self) -> String {
        use base64::Engine;
        let d = ring::digest::digest(&ring::digest::SHA256, &self.spki);
        base64::engine::general_purpose::STANDARD.encode(d.as_ref())
    }

    /// SHA-256 of the certificate, hex (Envoy's `verify_certificate_hash`).
    pub fn sha256_hex(&self) -> String {
        ring::digest::digest(&ring::digest::SHA256, &self.der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client that trusts `ca_pem` and checks the server's DNS name
/// `server_name` (standard webpki verification, independent of Ferry's),
/// presenting `client` if given, offering `alpn`.
pub fn client_config(
    ca_pem: &str,
    client: Option<&Leaf>,
    alpn: &[&str],
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match client {
        Some(l) => {
            let chain = CertificateDer::pem_slice_iter(l.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// An established HTTP/1.1-over-TLS connection.
pub struct TlsClient {
    conn: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    /// Connects and completes the handshake (a server refusing the client's
    /// certificate under TLS 1.3 may only say so on the first read).
    pub fn connect(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<TlsClient> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let name = ServerName::try_from(server_name.to_string())?;
        let mut conn = rustls::ClientConnection::new(config, name)?;
        let mut tcp = tcp;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).context("TLS handshake")?;
        }
        Ok(TlsClient {
            conn: rustls::StreamOwned::new(conn, tcp),
        })
    }

    /// The server's leaf certificate (DER).
    pub fn server_cert(&self) -> Option<Vec<u8>> {
        self.conn
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<String> {
        self.conn
            .conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }

    /// One keep-alive `GET path`: (status, body).
    pub fn get(&mut self, path: &str) -> Result<(u16, String)> {
        self.get_with(path, &[])
    }

    /// One keep-alive `GET path` with extra headers: (status, body).
    pub fn get_with(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        write!(
            self.conn,
            "GET {path} HTTP/1.1\r\nhost: server.test\r\nuser-agent: tls-test\r\n{extra}\r\n"
        )?;
        self.conn.flush()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.conn.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed before a response");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line: {head}"))?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| anyhow!("no content-length: {head}"))?;
        while buf.len() < head_end + len {
            let n = self.conn.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed inside the body");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok((
            status,
            String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned(),
        ))
    }
}

/// Connects and sends one request: the error if the server refused us at
/// any step.
pub fn try_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Result<(u16, String)> {
    let mut c = TlsClient::connect(addr, config, server_name)?;
    c.get("/")
}

/// Istio's sample JWKS (security/tools/jwt/samples): one RSA key.
pub const ISTIO_DEMO_JWKS: &str = r#"{ "keys":[ {"e":"AQAB","kid":"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ","kty":"RSA","n":"xAE7eB6qugXyCAG3yhh7pkDkT65pHymX-P7KfIupjf59vsdo91bSP9C8H07pSAGQO1MV_xFj9VswgsCg4R6otmg5PV2He95lZdHtOcU5DXIg_pbhLdKXbi66GlVeK6ABZOUW3WYtnNHD-91gVuoeJT_DwtGGcp4ignkgXfkiEm4sw-4sfb4qdt5oLbyVpmW6x9cfa7vs2WTfURiCrBoUqgBo_-4WTiULmmHSGZHOjzwa8WtrtOQGsAFjIbno85jp6MnGGGZPYZbDAa_b3y5u-YpW7ypZrvD8BgtKVjgtQgZhLAGezMt0ua3DRrWnKqTZ0BJ_EyxOGuHJrLsn00fnMQ"}]}"#;

/// Istio's sample token `demo.jwt`, signed by [`ISTIO_DEMO_JWKS`]'s key: issuer and
/// subject `testing@secure.istio.io`, claim `foo: bar`, expires in 2118.
pub const ISTIO_DEMO_JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkRIRmJwb0lVcXJZOHQyenBBMnFYZkNtcjVWTzVaRXI0UnpIVV8tZW52dlEiLCJ0eXAiOiJKV1QifQ.eyJleHAiOjQ2ODU5ODk3MDAsImZvbyI6ImJhciIsImlhdCI6MTUzMjM4OTcwMCwiaXNzIjoidGVzdGluZ0BzZWN1cmUuaXN0aW8uaW8iLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.CfNnxWP2tcnR9q0vxyxweaF3ovQYHYZl82hAUsn21bwQd9zP7c-LS9qd_vpdLG4Tn1A15NxfCjp5f7QNBUo-KC9PJqYpgGbaXhaGx7bEdFWjcwv3nZzvc7M__ZpaCERdwU7igUmJqYGBYQ51vr2njU9ZimyKkfDe3axcyiBZde7G6dabliUosJvvKOPcKIWPccCgefSj_GNfwIip3-SsFdlR7BtbVUcqR-yv-XOxJ3Uc1MI0tz3uMiiZcyPV7sNCU4KRnemRIMHVOfuvHsU60_GhGbiSFzgPTAa9WTltbnarTbxudb_YEOx12JiwYToeX0DCPb43W1tzIBxgm8NxUg";
