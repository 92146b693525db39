//! Access log entries as istiod builds them: from meshConfig
//! (`accessLogFile`, `accessLogEncoding`, `accessLogFormat`) and from the
//! `envoyFileAccessLog` providers the Telemetry API selects. The formats are
//! istiod's: its default TEXT line, or its default JSON object, or the
//! configured format (TEXT gets a final newline; a JSON format that does not
//! parse falls back to the default, as istiod does). Where the entries go
//! (connection managers, TCP proxies, listeners with the `NR` filter) is
//! [`super::telemetry`]'s.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLog, AccessLogFilter, ResponseFlagFilter, access_log, access_log_filter,
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, JsonFormatOptions, SubstitutionFormatString, TypedExtensionConfig, data_source,
    substitution_format_string,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use super::util::any;
use crate::istio::types::mesh::FileAccessLogProvider;

/// istiod's default TEXT format (`EnvoyTextLogFormat`).
pub const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// istiod's default JSON format (`EnvoyJSONLogFormatIstio`).
pub const ISTIO_JSON_FORMAT: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
];

/// meshConfig's access log settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshAccessLog {
    /// `accessLogFile`: empty disables access logs.
    pub file: String,
    /// `accessLogEncoding: JSON` (else TEXT).
    pub json: bool,
    /// `accessLogFormat`: a text format, or a JSON object of formats.
    pub format: String,
    /// `disableEnvoyListenerLog`.
    pub disable_listener_log: bool,
}

impl MeshAccessLog {
    /// The `envoy.access_loggers.file` entry istiod builds
    /// (`FileAccessLogFromMeshConfig`, with its `sort_properties: false`).
    #[allow(deprecated)]
    pub fn file_access_log(&self) -> AccessLog {
        let format = if self.json {
            let fields = serde_json::from_str::<serde_json::Value>(&self.format)
                .ok()
                .and_then(|v| match v {
                    serde_json::Value::Object(m) => Some(m),
                    _ => None,
                })
                .map(|m| {
                    m.into_iter()
                        .map(|(k, v)| (k, json_value(v)))
                        .collect::<HashMap<_, _>>()
                })
                .unwrap_or_else(|| {
                    ISTIO_JSON_FORMAT
                        .iter()
                        .map(|(k, v)| {
                            (
                                (*k).to_string(),
                                Value {
                                    kind: Some(Kind::StringValue((*v).to_string())),
                                },
                            )
                        })
                        .collect()
                });
            SubstitutionFormatString {
                format: Some(substitution_format_string::Format::JsonFormat(Struct {
                    fields,
                })),
                json_format_options: Some(JsonFormatOptions {
                    sort_properties: false,
                }),
                ..Default::default()
            }
        } else {
            let mut text = if self.format.is_empty() {
                ISTIO_TEXT_FORMAT.to_string()
            } else {
                self.format.clone()
            };
            // "Istio will insert a newline on all formats (if missing)."
            if !text.ends_with('\n') {
                text.push('\n');
            }
            SubstitutionFormatString {
                format: Some(substitution_format_string::Format::TextFormatSource(
                    DataSource {
                        specifier: Some(data_source::Specifier::InlineString(text)),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }
        };
        let file = FileAccessLog {
            path: self.file.clone(),
            access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(format)),
        };
        AccessLog {
            name: "envoy.access_loggers.file".into(),
            filter: None,
            config_type: Some(access_log::ConfigType::TypedConfig(any(&file))),
        }
    }
}

fn json_value(v: serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
            values: a.into_iter().map(json_value).collect(),
        }),
        J::Object(m) => Kind::StructValue(Struct {
            fields: m.into_iter().map(|(k, v)| (k, json_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// An `envoyFileAccessLog` provider's entry (istiod's
/// `fileAccessLogFromTelemetry`): its path (`/dev/stdout` when empty), its
/// text or JSON (`labels`) format or istiod's default one, and the
/// formatter extensions the format's operators need. The built-in `envoy`
/// provider without a format of its own takes the mesh's.
#[allow(deprecated)]
pub(super) fn from_provider(
    name: &str,
    p: &FileAccessLogProvider,
    mesh: &MeshAccessLog,
) -> AccessLog {
    let path = if p.path.is_empty() {
        "/dev/stdout".to_string()
    } else {
        p.path.clone()
    };
    if name == super::telemetry::BUILTIN_ENVOY && p.log_format.is_none() && !p.omit_empty_values {
        return MeshAccessLog {
            file: path,
            ..mesh.clone()
        }
        .file_access_log();
    }
    let labels = p.log_format.as_ref().and_then(|f| f.labels.as_ref());
    let mut format = match (p.log_format.as_ref().and_then(|f| f.text.as_ref()), labels) {
        (None, Some(labels)) => {
            let fields: HashMap<String, Value> = if labels.is_empty() {
                ISTIO_JSON_FORMAT
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), json_value(serde_json::json!(v))))
                    .collect()
            } else {
                labels
                    .iter()
                    .map(|(k, v)| (k.clone(), json_value(v.clone())))
                    .collect()
            };
            SubstitutionFormatString {
                format: Some(substitution_format_string::Format::JsonFormat(Struct {
                    fields,
                })),
                json_format_options: Some(JsonFormatOptions {
                    sort_properties: false,
                }),
                ..Default::default()
            }
        }
        (text, _) => {
            let mut text = text
                .filter(|t| !t.is_empty())
                .cloned()
                .unwrap_or_else(|| ISTIO_TEXT_FORMAT.to_string());
            if !text.ends_with('\n') {
                text.push('\n');
            }
            SubstitutionFormatString {
                format: Some(substitution_format_string::Format::TextFormatSource(
                    DataSource {
                        specifier: Some(data_source::Specifier::InlineString(text)),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }
        }
    };
    format.omit_empty_values = p.omit_empty_values;
    format.formatters = formatters(&format);
    let file = FileAccessLog {
        path,
        access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(format)),
    };
    AccessLog {
        name: "envoy.access_loggers.file".into(),
        filter: None,
        config_type: Some(access_log::ConfigType::TypedConfig(any(&file))),
    }
}

/// The formatter extensions istiod adds for the operators Envoy only has
/// as extensions (`%REQ_WITHOUT_QUERY`, `%METADATA`, `%CEL`).
fn formatters(f: &SubstitutionFormatString) -> Vec<TypedExtensionConfig> {
    use envoy_types::pb::envoy::extensions::formatter::cel::v3::Cel;
    use envoy_types::pb::envoy::extensions::formatter::metadata::v3::Metadata;
    use envoy_types::pb::envoy::extensions::formatter::req_without_query::v3::ReqWithoutQuery;
    let text = match &f.format {
        Some(substitution_format_string::Format::TextFormatSource(DataSource {
            specifier: Some(data_source::Specifier::InlineString(s)),
            ..
        })) => s.clone(),
        Some(substitution_format_string::Format::JsonFormat(s)) => format!("{s:?}"),
        _ => String::new(),
    };
    let mut out = Vec::new();
    if text.contains("%REQ_WITHOUT_QUERY") {
        out.push(TypedExtensionConfig {
            name: "envoy.formatter.req_without_query".into(),
            typed_config: Some(any(&ReqWithoutQuery {})),
        });
    }
    if text.contains("%METADATA") {
        out.push(TypedExtensionConfig {
            name: "envoy.formatter.metadata".into(),
            typed_config: Some(any(&Metadata {})),
        });
    }
    if text.contains("%CEL") {
        out.push(TypedExtensionConfig {
            name: "envoy.formatter.cel".into(),
            typed_config: Some(any(&Cel::default())),
        });
    }
    out
}

/// istiod's listener access log filter: only connections no filter chain
/// took (`NR`).
pub(super) fn listener_filter() -> AccessLogFilter {
    AccessLogFilter {
        filter_specifier: Some(access_log_filter::FilterSpecifier::ResponseFlagFilter(
            ResponseFlagFilter {
                flags: vec!["NR".into()],
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    #[allow(deprecated)]
    fn text_and_json_formats_as_istiod() {
        let text = MeshAccessLog {
            file: "/dev/stdout".into(),
            ..Default::default()
        };
        let al = text.file_access_log();
        let Some(access_log::ConfigType::TypedConfig(t)) = &al.config_type else {
            panic!("typed config");
        };
        let f = FileAccessLog::decode(t.value.as_slice()).expect("decode");
        assert_eq!(f.path, "/dev/stdout");
        let Some(file_access_log::AccessLogFormat::LogFormat(sfs)) = f.access_log_format else {
            panic!("log_format");
        };
        assert!(matches!(
            sfs.format,
            Some(substitution_format_string::Format::TextFormatSource(DataSource {
                specifier: Some(data_source::Specifier::InlineString(ref s)), ..
            })) if s == ISTIO_TEXT_FORMAT
        ));
        let custom = MeshAccessLog {
            file: "/tmp/x".into(),
            format: "%RESPONSE_CODE%".into(),
            ..Default::default()
        };
        let f = custom.file_access_log();
        let Some(access_log::ConfigType::TypedConfig(t)) = &f.config_type else {
            panic!("typed config");
        };
        let f = FileAccessLog::decode(t.value.as_slice()).expect("decode");
        let Some(file_access_log::AccessLogFormat::LogFormat(sfs)) = f.access_log_format else {
            panic!("log_format");
        };
        assert!(matches!(
            sfs.format,
            Some(substitution_format_string::Format::TextFormatSource(DataSource {
                specifier: Some(data_source::Specifier::InlineString(ref s)), ..
            })) if s == "%RESPONSE_CODE%\n"
        ));
        for (format, keys) in [
            ("", ISTIO_JSON_FORMAT.len()),
            ("not json", ISTIO_JSON_FORMAT.len()),
            (r#"{"code": "%RESPONSE_CODE%", "n": 1}"#, 2),
        ] {
            let json = MeshAccessLog {
                file: "/dev/stdout".into(),
                json: true,
                format: format.into(),
                ..Default::default()
            };
            let al = json.file_access_log();
            let Some(access_log::ConfigType::TypedConfig(t)) = &al.config_type else {
                panic!("typed config");
            };
            let f = FileAccessLog::decode(t.value.as_slice()).expect("decode");
            let Some(file_access_log::AccessLogFormat::LogFormat(sfs)) = f.access_log_format else {
                panic!("log_format");
            };
            let Some(substitution_format_string::Format::JsonFormat(s)) = sfs.format else {
                panic!("json_format");
            };
            assert_eq!(s.fields.len(), keys, "{format}");
            assert_eq!(
                sfs.json_format_options,
                Some(JsonFormatOptions {
                    sort_properties: false
                })
            );
        }
    }
}
