//! The mesh's certificate authority (citadel's job in istiod): a root key
//! and certificate, loaded from files or generated at start-up, that signs
//! workload certificates for SPIFFE identities
//! (`spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`), and the gRPC
//! service `istio.v1.auth.IstioCertificateService` that sidecar agents send
//! their certificate signing requests to.
//!
//! The CA never trusts the identity a CSR asks for: the caller is
//! authenticated first, and the request is refused unless every name it
//! asks for is the caller's own identity. Two ways to know the caller:
//! - a client certificate with a SPIFFE URI (renewal over mutual TLS, as
//!   istiod's client-certificate authenticator), and
//! - the caller's source address, which must be the IP of a known pod: its
//!   namespace and service account give the identity. This replaces
//!   istiod's Kubernetes token review in the local mesh, where pods are
//!   network namespaces whose addresses cannot be spoofed past the bridge.
//!
//! Leaf certificates carry only the URI SAN and an empty subject, as
//! istiod's, with both TLS server and client usages.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_envoy_json::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Longest lifetime a workload certificate may get (istiod's
/// `MAX_WORKLOAD_CERT_TTL` default).
pub const MAX_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime when the request names none (istiod's `DEFAULT_WORKLOAD_CERT_TTL`).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a generated root (istiod's self-signed root: ten years).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clock skew tolerated between the CA and the peers checking its certificates.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA {what}: {reason}")]
    Load { what: String, reason: String },
    #[error("certificate signing request: {0}")]
    Csr(String),
    #[error("certificate signing request: {0}")]
    Identity(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The root of trust and its signing key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    trust_domain: String,
    default_ttl: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn offset(now: time::OffsetDateTime, by: Duration, later: bool) -> time::OffsetDateTime {
    let by = time::Duration::try_from(by).unwrap_or(time::Duration::ZERO);
    if later { now + by } else { now - by }
}

impl Ca {
    /// A new self-signed root for `trust_domain` (subject `O=<trust domain>`,
    /// as istiod's), with a fresh ECDSA P-256 key.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let load = |reason: rcgen::Error| CaError::Load {
            what: "root".into(),
            reason: reason.to_string(),
        };
        let key = KeyPair::generate().map_err(load)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = offset(now, BACKDATE, false);
        params.not_after = offset(now, ROOT_TTL, true);
        let cert = params.self_signed(&key).map_err(load)?;
        Ok(Self {
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            trust_domain: trust_domain.to_string(),
            default_ttl: DEFAULT_CERT_TTL,
        })
    }

    /// The root from PEM files' contents (istiod's `cacerts` plug-in
    /// certificate: `ca-cert.pem` and `ca-key.pem`).
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Load {
            what: "key".into(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Load {
            what: "certificate".into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            issuer,
            root_pem: cert_pem.to_string(),
            trust_domain: trust_domain.to_string(),
            default_ttl: DEFAULT_CERT_TTL,
        })
    }

    /// Lifetime of certificates whose request names none.
    pub fn with_default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl.min(MAX_CERT_TTL);
        self
    }

    /// Lifetime of certificates whose request names none.
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The SPIFFE identity of a service account.
    pub fn identity(&self, namespace: &str, service_account: &str) -> String {
        let sa = if service_account.is_empty() {
            "default"
        } else {
            service_account
        };
        format!("spiffe://{}/ns/{namespace}/sa/{sa}", self.trust_domain)
    }

    /// A leaf for `identity`: the URI SAN only, an empty subject, server
    /// and client usage, `ttl` (else the default) capped at the maximum.
    fn leaf_params(
        &self,
        identity: &str,
        ttl: Option<Duration>,
    ) -> Result<CertificateParams, CaError> {
        let uri = rcgen::string::Ia5String::try_from(identity.to_string())
            .map_err(|e| CaError::Identity(format!("{identity:?}: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(self.default_ttl)
            .min(MAX_CERT_TTL);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = offset(now, BACKDATE, false);
        params.not_after = offset(now, ttl, true);
        Ok(params)
    }

    /// A key and a certificate for `identity`, made here: for proxies that
    /// take their workload certificate over SDS from the control plane
    /// instead of sending a CSR. Returns (leaf PEM, key PEM).
    pub fn issue(
        &self,
        identity: &str,
        ttl: Option<Duration>,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let cert = self
            .leaf_params(identity, ttl)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A serving certificate for `dns_names` (the injection webhook's, as
    /// istiod signs its own with its CA): DNS SANs, server usage, `ttl`
    /// capped at the maximum. Returns (leaf PEM, key PEM).
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::new(dns_names.to_vec())
            .map_err(|e| CaError::Identity(format!("{dns_names:?}: {e}")))?;
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, first.as_str());
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = offset(now, BACKDATE, false);
        params.not_after = offset(now, ttl.min(MAX_CERT_TTL), true);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs `csr_pem` for `identity` (the authenticated caller): the CSR's
    /// signature must verify and every name it asks for must be `identity`.
    /// Returns the chain, leaf first and root last.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &str,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                other => format!("{other:?}"),
            };
            if asked != identity {
                return Err(CaError::Identity(format!(
                    "asks for {asked:?}, but the caller is {identity:?}"
                )));
            }
        }
        let params = self.leaf_params(identity, ttl)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(vec![cert.pem(), self.root_pem.clone()])
    }
}

/// Finds the identity of the pod at an address.
pub type IdentityByIp = Arc<dyn Fn(IpAddr) -> Option<String> + Send + Sync>;

/// The `IstioCertificateService` gRPC service over a [`Ca`].
#[derive(Clone)]
pub struct CaService {
    ca: Arc<Ca>,
    by_ip: IdentityByIp,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService").field("ca", &self.ca).finish()
    }
}

impl CaService {
    pub fn new(ca: Arc<Ca>, by_ip: IdentityByIp) -> Self {
        Self { ca, by_ip }
    }

    /// Who is asking: the SPIFFE URI of its client certificate, else the
    /// identity of the pod its address belongs to.
    fn caller<T>(&self, req: &tonic::Request<T>) -> Result<String, tonic::Status> {
        if let Some(certs) = req.peer_certs()
            && let Some(leaf) = certs.first()
            && let Some(id) = spiffe_uri(leaf.as_ref())
        {
            return Ok(id);
        }
        let Some(addr) = req.remote_addr() else {
            return Err(tonic::Status::unauthenticated(
                "the caller has no address and no client certificate",
            ));
        };
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        (self.by_ip)(ip).ok_or_else(|| {
            tonic::Status::unauthenticated(format!(
                "no workload is known at {ip} and the caller sent no client certificate"
            ))
        })
    }

    pub fn create(
        &self,
        req: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let identity = self.caller(&req)?;
        let body = req.into_inner();
        let ttl = u64::try_from(body.validity_duration)
            .ok()
            .map(Duration::from_secs);
        match self.ca.sign(&body.csr, &identity, ttl) {
            Ok(cert_chain) => {
                tracing::info!(ca.identity = %identity, "certificate issued");
                Ok(tonic::Response::new(IstioCertificateResponse {
                    cert_chain,
                }))
            }
            Err(e) => {
                tracing::warn!(ca.identity = %identity, error = %e, "certificate refused");
                Err(match e {
                    CaError::Sign(_) | CaError::Load { .. } => {
                        tonic::Status::internal(e.to_string())
                    }
                    _ => tonic::Status::invalid_argument(e.to_string()),
                })
            }
        }
    }
}

/// The first `spiffe://` URI SAN of a DER certificate.
fn spiffe_uri(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    })
}

mod grpc {
    //! The service's gRPC plumbing, as tonic's generated servers do it.
    use std::convert::Infallible;
    use std::task::{Context, Poll};

    use ferry_envoy_json::istio_ca::{
        CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse, SERVICE,
    };
    use tonic::codegen::{Body, BoxFuture, StdError, http};

    use super::CaService;

    impl tonic::server::NamedService for CaService {
        const NAME: &'static str = SERVICE;
    }

    struct Create(CaService);

    impl tonic::server::UnaryService<IstioCertificateRequest> for Create {
        type Response = IstioCertificateResponse;
        type Future = BoxFuture<tonic::Response<IstioCertificateResponse>, tonic::Status>;
        fn call(&mut self, req: tonic::Request<IstioCertificateRequest>) -> Self::Future {
            let svc = self.0.clone();
            Box::pin(async move { svc.create(req) })
        }
    }

    impl<B> tonic::codegen::Service<http::Request<B>> for CaService
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            if req.uri().path() == CREATE_CERTIFICATE {
                let svc = Create(self.clone());
                return Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                    Ok(grpc.unary(svc, req).await)
                });
            }
            Box::pin(async move {
                Ok(tonic::Status::unimplemented(format!(
                    "{} is not a method of {SERVICE}",
                    req.uri().path()
                ))
                .into_http())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(identity: &str) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(Vec::<String>::new()).map(|mut p| {
            p.subject_alt_names = vec![SanType::URI(
                rcgen::string::Ia5String::try_from(identity.to_string()).unwrap(),
            )];
            p
        });
        let pem = params
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        (key, pem)
    }

    #[test]
    fn signs_the_callers_identity_only() {
        let ca = Ca::generate("cluster.local").unwrap();
        let id = ca.identity("default", "bookinfo-reviews");
        assert_eq!(id, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews");
        let (_, pem) = csr(&id);
        let chain = ca.sign(&pem, &id, Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.root_pem());
        let (_, der) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
        assert_eq!(spiffe_uri(&der.contents).as_deref(), Some(id.as_str()));
        // Lifetime as asked, not more.
        let leaf = der.parse_x509().unwrap();
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60);
        assert!(!leaf.is_ca());

        // Somebody else's identity is refused, naming both.
        let other = ca.identity("default", "bookinfo-ratings");
        let err = ca.sign(&pem, &other, None).unwrap_err().to_string();
        assert!(
            err.contains("bookinfo-reviews") && err.contains("bookinfo-ratings"),
            "{err}"
        );
        // Garbage is refused as a CSR.
        let err = ca.sign("not a csr", &id, None).unwrap_err().to_string();
        assert!(err.starts_with("certificate signing request"), "{err}");
    }

    #[test]
    fn a_loaded_root_signs_like_a_generated_one() {
        let generated = Ca::generate("example.org").unwrap();
        let key = generated.issuer.key().serialize_pem();
        let ca = Ca::from_pem(generated.root_pem(), &key, "example.org").unwrap();
        let id = ca.identity("ns1", "");
        assert_eq!(id, "spiffe://example.org/ns/ns1/sa/default");
        let (_, pem) = csr(&id);
        let chain = ca.sign(&pem, &id, None).unwrap();
        assert_eq!(chain[1], generated.root_pem());
        let err = Ca::from_pem("junk", &key, "x").unwrap_err().to_string();
        assert!(err.starts_with("CA certificate"), "{err}");
    }
}
