//! Istio's Telemetry resource (`telemetry.istio.io`): which providers record
//! a workload's traces and access logs, with what sampling and tags, for the
//! mesh (root namespace), a namespace, or the workloads a selector picks.
//!
//! Every field of the API is read, so that the parts translation does not
//! implement (policy attachment by `targetRef`, metrics overrides, CEL log
//! filters) are refused by validation instead of silently ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::security::WorkloadSelector;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Telemetry {
    pub selector: Option<WorkloadSelector>,
    /// Policy attachment to a Gateway API resource: refused.
    pub target_ref: Option<serde_json::Value>,
    pub target_refs: Vec<serde_json::Value>,
    pub tracing: Vec<Tracing>,
    pub metrics: Vec<Metrics>,
    pub access_logging: Vec<AccessLogging>,
}

/// `ProviderRef`: a provider of `meshConfig.extensionProviders` by name.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProviderRef {
    pub name: String,
}

/// Which side of a workload's traffic a setting applies to.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    #[default]
    ClientAndServer,
    /// Outbound (and gateway) traffic.
    Client,
    /// Inbound traffic.
    Server,
}

impl WorkloadMode {
    /// Whether a setting for `self` covers traffic of `mode`.
    pub fn covers(self, mode: WorkloadMode) -> bool {
        self == WorkloadMode::ClientAndServer || self == mode
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TracingSelector {
    pub mode: WorkloadMode,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Tracing {
    #[serde(rename = "match")]
    pub match_: Option<TracingSelector>,
    pub providers: Vec<ProviderRef>,
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: Option<BTreeMap<String, CustomTag>>,
    pub use_request_id_for_trace_sampling: Option<bool>,
    pub enable_istio_tags: Option<bool>,
    pub disable_context_propagation: Option<bool>,
}

/// `Tracing.CustomTag`: exactly one of its kinds.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CustomTag {
    pub literal: Option<Literal>,
    pub environment: Option<Environment>,
    pub header: Option<RequestHeader>,
    pub formatter: Option<Formatter>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Literal {
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Environment {
    pub name: String,
    pub default_value: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestHeader {
    pub name: String,
    pub default_value: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Formatter {
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Metrics {
    pub providers: Vec<ProviderRef>,
    /// Per-metric changes (disable, tag overrides): refused.
    pub overrides: Vec<serde_json::Value>,
    pub reporting_interval: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LogSelector {
    pub mode: WorkloadMode,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AccessLogging {
    #[serde(rename = "match")]
    pub match_: Option<LogSelector>,
    pub providers: Vec<ProviderRef>,
    pub disabled: Option<bool>,
    /// A CEL expression: refused (Ferry has no CEL).
    pub filter: Option<LogFilter>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LogFilter {
    pub expression: String,
}
