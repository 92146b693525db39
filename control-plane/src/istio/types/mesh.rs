//! The parts of Istio's MeshConfig (`meshConfig` in the istiod install)
//! that translation reads beyond [`crate::istio::translate::MeshOptions`]'
//! scalars: the extension providers that AuthorizationPolicies with the
//! CUSTOM action name (`envoyExtAuthzHttp`, `envoyExtAuthzGrpc`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Duration;

/// `meshConfig.extensionProviders[]`. Provider kinds other than the
/// external authorizers are accepted and ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtensionProvider {
    pub name: String,
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpc>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ExtAuthzHttp {
    /// `namespace/host` or a bare host name of a service in the registry.
    pub service: String,
    pub port: u32,
    pub timeout: Option<Duration>,
    pub path_prefix: String,
    pub fail_open: bool,
    pub status_on_error: String,
    pub include_request_headers_in_check: Vec<String>,
    /// Superseded by `includeRequestHeadersInCheck` when both are set.
    pub include_headers_in_check: Vec<String>,
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    pub include_request_body_in_check: Option<RequestBody>,
    pub headers_to_upstream_on_allow: Vec<String>,
    pub headers_to_downstream_on_deny: Vec<String>,
    pub headers_to_downstream_on_allow: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ExtAuthzGrpc {
    pub service: String,
    pub port: u32,
    pub timeout: Option<Duration>,
    pub fail_open: bool,
    pub status_on_error: String,
    pub include_request_body_in_check: Option<RequestBody>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestBody {
    pub max_request_bytes: u32,
    pub allow_partial_message: bool,
    pub pack_as_bytes: bool,
}

/// The `mesh` document of istiod's configuration (the `istio` ConfigMap),
/// the fields translation uses; the others are accepted and ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfig {
    pub trust_domain: Option<String>,
    pub trust_domain_aliases: Vec<String>,
    pub root_namespace: Option<String>,
    pub outbound_traffic_policy: Option<MeshOutboundTrafficPolicy>,
    pub extension_providers: Vec<ExtensionProvider>,
    /// `pathNormalization`: what every HTTP connection manager does to
    /// request paths.
    pub path_normalization: Option<ProxyPathNormalization>,
}

/// `meshConfig.pathNormalization`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProxyPathNormalization {
    pub normalization: PathNormalization,
}

/// `meshConfig.pathNormalization.normalization`, istiod's levels.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// BASE.
    #[default]
    Default,
    /// `normalize_path: false`.
    None,
    /// RFC 3986 normalization, backslashes as slashes.
    Base,
    /// BASE and `merge_slashes`.
    MergeSlashes,
    /// MERGE_SLASHES and `%2F`/`%5C` unescaped (`UNESCAPE_AND_FORWARD`).
    DecodeAndMergeSlashes,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshOutboundTrafficPolicy {
    pub mode: Option<super::networking::OutboundMode>,
}
