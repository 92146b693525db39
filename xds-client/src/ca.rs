//! The client of Istio's certificate service
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`): sends a CSR
//! and gets the chain back, over the same kind of gRPC channel as ADS. With
//! istiod the call carries the pod's Kubernetes token (`authorization:
//! Bearer …`) and its cluster id, as istio-agent sends them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_envoy_json::istio_ca::{
    CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse,
};

use crate::ads::{XdsTarget, channel};

/// Where the CA is and how to talk to it.
#[derive(Debug, Clone)]
pub struct CaTarget {
    pub target: XdsTarget,
    /// TLS to the CA (istiod's 15012), with the secrets it names.
    pub tls: Option<ferry_model::tls::UpstreamTls>,
    pub secrets: HashMap<String, Arc<ferry_model::tls::Secret>>,
    /// A bearer token (istiod authenticates pods by their service account
    /// token); none for a CA that knows callers by address.
    pub token: Option<String>,
    /// `ClusterID` metadata sent with the request (istiod's multi-cluster
    /// token review).
    pub cluster_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("{0}")]
    Connect(String),
    #[error("the CA refused the request: {0}")]
    Refused(String),
    #[error("the CA answered an empty certificate chain")]
    EmptyChain,
}

/// Asks the CA to sign `csr_pem` for `ttl`; the chain, leaf first, root last.
pub async fn create_certificate(
    ca: &CaTarget,
    csr_pem: &str,
    ttl: Duration,
) -> Result<Vec<String>, CaClientError> {
    let ch = tokio::time::timeout(
        Duration::from_secs(10),
        channel(&ca.target, ca.tls.as_ref(), &ca.secrets),
    )
    .await
    .map_err(|_| CaClientError::Connect("connecting to the CA timed out".into()))?
    .map_err(|e| CaClientError::Connect(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| CaClientError::Connect(e.to_string()))?;
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem.to_string(),
        validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        metadata: None,
    });
    req.set_timeout(Duration::from_secs(10));
    let meta = req.metadata_mut();
    if let Some(t) = &ca.token
        && let Ok(v) = format!("Bearer {}", t.trim()).parse()
    {
        meta.insert("authorization", v);
    }
    if let Some(c) = &ca.cluster_id
        && let Ok(v) = c.parse()
    {
        meta.insert("clusterid", v);
    }
    let resp: IstioCertificateResponse = grpc
        .unary(
            req,
            http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
            tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default(),
        )
        .await
        .map_err(|s| CaClientError::Refused(format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    if resp.cert_chain.is_empty() {
        return Err(CaClientError::EmptyChain);
    }
    Ok(resp.cert_chain)
}
