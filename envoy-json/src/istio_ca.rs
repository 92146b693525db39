//! Istio's certificate service, `istio.v1.auth.IstioCertificateService`
//! (`security/v1alpha1/ca.proto` of Istio's API): a workload sends a CSR for
//! its SPIFFE identity and gets a certificate chain back. istiod serves it
//! on 15012 beside xDS, and so does ferry-pilot; the sidecar's agent is the
//! client. The messages are small enough to declare here rather than
//! generate, and both sides share them.

/// `IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// The PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; the CA may shorten it.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Istio's optional request metadata (e.g. `ImpersonatedIdentity`).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<envoy_types::pb::google::protobuf::Struct>,
}

/// `IstioCertificateResponse`: the leaf first, then intermediates, the
/// root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The gRPC service name.
pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
/// The one method's path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn field_numbers_follow_the_proto() {
        let req = IstioCertificateRequest {
            csr: "x".into(),
            validity_duration: 3600,
            metadata: None,
        };
        // Tag 1, wire type 2 (0x0a), then tag 3, varint (0x18).
        let bytes = req.encode_to_vec();
        assert_eq!(bytes[0], 0x0a);
        assert_eq!(bytes[3], 0x18);
        let resp = IstioCertificateResponse {
            cert_chain: vec!["a".into(), "b".into()],
        };
        let back = IstioCertificateResponse::decode(resp.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.cert_chain, ["a", "b"]);
    }
}
