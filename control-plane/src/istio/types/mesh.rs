//! The parts of Istio's MeshConfig (`meshConfig` in the istiod install)
//! that translation reads beyond [`crate::istio::translate::MeshOptions`]'
//! scalars: the extension providers that AuthorizationPolicies with the
//! CUSTOM action name (`envoyExtAuthzHttp`, `envoyExtAuthzGrpc`), and the
//! access log settings (`accessLogFile`, `accessLogEncoding`,
//! `accessLogFormat`, `disableEnvoyListenerLog`), and what traces and access
//! logs the Telemetry API selects from (the tracer and file access log
//! providers, `defaultProviders`, `enableTracing`, `defaultConfig.tracing`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Duration;

/// `meshConfig.extensionProviders[]`: the external authorizers, the
/// tracers (`zipkin`, `opentelemetry`) and the file access log; the other
/// kinds are kept by name so that selecting one (from a Telemetry or
/// `defaultProviders`) is refused rather than ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtensionProvider {
    pub name: String,
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpc>,
    pub zipkin: Option<ZipkinProvider>,
    pub opentelemetry: Option<OpenTelemetryProvider>,
    pub envoy_file_access_log: Option<FileAccessLogProvider>,
    pub prometheus: Option<serde_json::Value>,
    pub datadog: Option<serde_json::Value>,
    pub lightstep: Option<serde_json::Value>,
    pub skywalking: Option<serde_json::Value>,
    pub stackdriver: Option<serde_json::Value>,
    pub opencensus: Option<serde_json::Value>,
    pub envoy_http_als: Option<serde_json::Value>,
    pub envoy_tcp_als: Option<serde_json::Value>,
    pub envoy_otel_als: Option<serde_json::Value>,
    pub sds: Option<serde_json::Value>,
}

impl ExtensionProvider {
    /// The provider's kind, as the mesh configuration names it.
    pub fn kind(&self) -> &'static str {
        let kinds: [(bool, &'static str); 15] = [
            (self.envoy_ext_authz_http.is_some(), "envoyExtAuthzHttp"),
            (self.envoy_ext_authz_grpc.is_some(), "envoyExtAuthzGrpc"),
            (self.zipkin.is_some(), "zipkin"),
            (self.opentelemetry.is_some(), "opentelemetry"),
            (self.envoy_file_access_log.is_some(), "envoyFileAccessLog"),
            (self.prometheus.is_some(), "prometheus"),
            (self.datadog.is_some(), "datadog"),
            (self.lightstep.is_some(), "lightstep"),
            (self.skywalking.is_some(), "skywalking"),
            (self.stackdriver.is_some(), "stackdriver"),
            (self.opencensus.is_some(), "opencensus"),
            (self.envoy_http_als.is_some(), "envoyHttpAls"),
            (self.envoy_tcp_als.is_some(), "envoyTcpAls"),
            (self.envoy_otel_als.is_some(), "envoyOtelAls"),
            (self.sds.is_some(), "sds"),
        ];
        kinds
            .into_iter()
            .find_map(|(set, k)| set.then_some(k))
            .unwrap_or("unknown")
    }
}

/// A header sent to a collector: a value, or one read from istiod's
/// environment (`envName`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpHeader {
    pub name: String,
    pub value: Option<String>,
    pub env_name: Option<String>,
}

/// `zipkin`: Zipkin v2 JSON spans to `service:port`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ZipkinProvider {
    pub service: String,
    pub port: u32,
    pub max_tag_length: u32,
    #[serde(rename = "enable64bitTraceId")]
    pub enable_64bit_trace_id: bool,
    pub path: String,
    /// `USE_B3` (default) or `USE_B3_WITH_W3C_PROPAGATION`.
    pub trace_context_option: String,
    pub timeout: Option<Duration>,
    pub headers: Vec<HttpHeader>,
}

/// `opentelemetry`: OTLP spans over gRPC, or HTTP when `http` is set.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OpenTelemetryProvider {
    pub service: String,
    pub port: u32,
    pub max_tag_length: u32,
    pub http: Option<OtlpHttp>,
    pub grpc: Option<OtlpGrpc>,
    /// Resource detectors and samplers: refused when selected.
    pub resource_detectors: Option<serde_json::Value>,
    pub dynatrace_sampler: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OtlpHttp {
    pub path: String,
    pub timeout: Option<Duration>,
    pub headers: Vec<HttpHeader>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OtlpGrpc {
    pub timeout: Option<Duration>,
    pub initial_metadata: Vec<HttpHeader>,
}

/// `envoyFileAccessLog`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FileAccessLogProvider {
    /// Empty: `/dev/stdout`.
    pub path: String,
    pub log_format: Option<LogFormat>,
    pub omit_empty_values: bool,
}

/// A text format, or a JSON object of formats (`labels`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LogFormat {
    pub text: Option<String>,
    pub labels: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `meshConfig.defaultProviders`: what applies where no Telemetry says
/// otherwise.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct DefaultProviders {
    pub tracing: Vec<String>,
    pub access_logging: Vec<String>,
    pub metrics: Vec<String>,
}

/// The tracing part of `meshConfig.defaultConfig` (the proxies' defaults).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyConfigDefaults {
    pub tracing: Option<ProxyTracing>,
}

/// `defaultConfig.tracing`: the sampling percentage, custom tags and path
/// tag length the connection managers get (the tracer itself is the
/// proxy's bootstrap's).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyTracing {
    pub sampling: f64,
    pub max_path_tag_length: u32,
    pub custom_tags: BTreeMap<String, super::telemetry::CustomTag>,
    pub enable_istio_tags: Option<bool>,
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
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfig {
    pub trust_domain: Option<String>,
    pub trust_domain_aliases: Vec<String>,
    pub root_namespace: Option<String>,
    pub outbound_traffic_policy: Option<MeshOutboundTrafficPolicy>,
    pub extension_providers: Vec<ExtensionProvider>,
    /// Where every proxy writes its access log ("" for none).
    pub access_log_file: String,
    /// `TEXT` (the default) or `JSON`.
    pub access_log_encoding: String,
    /// The format: text, or a JSON object of formats ("" for istiod's).
    pub access_log_format: String,
    pub disable_envoy_listener_log: bool,
    pub default_providers: DefaultProviders,
    /// The connection managers trace with the bootstrap's tracer when no
    /// Telemetry or default provider says otherwise (istiod's default: on).
    pub enable_tracing: Option<bool>,
    pub default_config: ProxyConfigDefaults,
    /// `pathNormalization`: what every HTTP connection manager does to
    /// request paths.
    pub path_normalization: Option<ProxyPathNormalization>,
    /// How long an idle HBONE connection stays open (`connect_originate`).
    pub hbone_idle_timeout: Option<super::Duration>,
    /// Connect timeout of the clusters istiod builds without a rule.
    pub connect_timeout: Option<super::Duration>,
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
