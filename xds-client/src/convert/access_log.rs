//! `envoy.config.accesslog.v3.AccessLog` (on connection managers, TCP
//! proxies and listeners) → `ferry_model::access_log`.
//!
//! The loggers Ferry writes — `envoy.access_loggers.file`, `stdout` and
//! `stderr` — with every format Envoy accepts for them (the deprecated
//! `format`/`json_format`/`typed_json_format` fields of `FileAccessLog`
//! included, and Envoy's default line when none is given), and the filters
//! that decide what is logged. gRPC, OpenTelemetry and Wasm loggers, formatter
//! extensions, metadata and extension (CEL) filters, and unknown command
//! operators are refused with an error naming them: a log that silently
//! records less than configured is worse than none.

use std::sync::Arc;

use envoy_types::pb::envoy::config::accesslog::v3 as pb;
use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3 as file_pb;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3 as stream_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_pb;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use ferry_model::access_log as ma;
use ferry_model::format::LogTemplate;

use super::core_types::{data_source, fraction};
use super::coverage::{fields, path};
use super::matcher::header_matcher;
use super::{ConvertError, Ctx, Typed};

fields!(pub(super) static ACCESS_LOG = "envoy.config.accesslog.v3.AccessLog" {
    "name": applied,
    "filter": applied,
    "typed_config": applied "envoy.access_loggers.file, stdout and stderr; other loggers are refused",
});

fields!(pub(super) static FILE_ACCESS_LOG = "envoy.extensions.access_loggers.file.v3.FileAccessLog" {
    "path": applied "/dev/stdout and /dev/stderr are the process's own; other files are opened when the configuration loads, and one that cannot be is refused",
    "format": applied "deprecated, accepted as Envoy accepts it",
    "json_format": applied "deprecated, accepted as Envoy accepts it",
    "typed_json_format": applied "deprecated, accepted as Envoy accepts it",
    "log_format": applied,
});

fields!(pub(super) static STDOUT_ACCESS_LOG = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog" {
    "log_format": applied,
});

fields!(pub(super) static STDERR_ACCESS_LOG = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog" {
    "log_format": applied,
});

fields!(pub(super) static SUBSTITUTION_FORMAT_STRING = "envoy.config.core.v3.SubstitutionFormatString" {
    "text_format": applied "deprecated, accepted as Envoy accepts it; unknown command operators are refused",
    "json_format": applied "unknown command operators are refused",
    "text_format_source": applied "unknown command operators are refused",
    "omit_empty_values": applied,
    "content_type": inert "Envoy reads it for local replies only",
    "formatters": refused "formatter extensions are not supported",
    "json_format_options": applied,
});

fields!(pub(super) static JSON_FORMAT_OPTIONS = "envoy.config.core.v3.JsonFormatOptions" {
    "sort_properties": inert "Envoy always writes the keys sorted (the option is deprecated and has no effect); so does Ferry",
});

fields!(pub(super) static RUNTIME_UINT32 = "envoy.config.core.v3.RuntimeUInt32" ("access log comparison") {
    "default_value": applied,
    "runtime_key": inert "there is no runtime layer: default_value decides, as in Envoy when no runtime overrides the key",
});

fields!(pub(super) static ACCESS_LOG_FILTER = "envoy.config.accesslog.v3.AccessLogFilter" {
    "status_code_filter": applied,
    "duration_filter": applied,
    "not_health_check_filter": applied,
    "traceable_filter": applied,
    "runtime_filter": applied,
    "and_filter": applied,
    "or_filter": applied,
    "header_filter": applied,
    "response_flag_filter": applied,
    "grpc_status_filter": applied,
    "metadata_filter": refused "metadata access log filters are not supported",
    "log_type_filter": applied,
    "extension_filter": refused "access log filter extensions (e.g. CEL) are not supported",
});

fields!(pub(super) static COMPARISON_FILTER = "envoy.config.accesslog.v3.ComparisonFilter" {
    "op": applied,
    "value": applied "required; its default_value (Ferry has no runtime layer, which is what Envoy reads when no runtime overrides the key)",
});

fields!(pub(super) static STATUS_CODE_FILTER = "envoy.config.accesslog.v3.StatusCodeFilter" {
    "comparison": applied "required",
});

fields!(pub(super) static DURATION_FILTER = "envoy.config.accesslog.v3.DurationFilter" {
    "comparison": applied "required",
});

fields!(pub(super) static RUNTIME_FILTER = "envoy.config.accesslog.v3.RuntimeFilter" {
    "runtime_key": applied "required; no runtime overrides it, so percent_sampled decides",
    "percent_sampled": applied,
    "use_independent_randomness": applied,
});

fields!(pub(super) static AND_FILTER = "envoy.config.accesslog.v3.AndFilter" {
    "filters": applied "at least two",
});

fields!(pub(super) static OR_FILTER = "envoy.config.accesslog.v3.OrFilter" {
    "filters": applied "at least two",
});

fields!(pub(super) static HEADER_FILTER = "envoy.config.accesslog.v3.HeaderFilter" {
    "header": applied "required",
});

fields!(pub(super) static RESPONSE_FLAG_FILTER = "envoy.config.accesslog.v3.ResponseFlagFilter" {
    "flags": applied "unknown flags are refused",
});

fields!(pub(super) static GRPC_STATUS_FILTER = "envoy.config.accesslog.v3.GrpcStatusFilter" {
    "statuses": applied "unknown statuses are refused",
    "exclude": applied,
});

fields!(pub(super) static LOG_TYPE_FILTER = "envoy.config.accesslog.v3.LogTypeFilter" {
    "types": applied,
    "exclude": applied,
});

fields!(pub(super) static HCM_ACCESS_LOG_OPTIONS = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.HcmAccessLogOptions" {
    "access_log_flush_interval": refused "periodic access log entries are not supported (one entry per request, at its end)",
    "flush_access_log_on_new_request": refused "early access log entries are not supported (one entry per request, at its end)",
    "flush_log_on_tunnel_successfully_established": refused "early access log entries are not supported (one entry per request, at its end)",
});

fields!(pub(super) static TCP_ACCESS_LOG_OPTIONS = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.TcpAccessLogOptions" {
    "access_log_flush_interval": refused "periodic access log entries are not supported (one entry per connection, at its end)",
    "flush_access_log_on_connected": refused "early access log entries are not supported (one entry per connection, at its end)",
    "flush_access_log_on_start": refused "early access log entries are not supported (one entry per connection, at its end)",
});

const FILE_TYPE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// The access logs of a connection manager, refusing the options that log
/// more often than once per request (the deprecated top-level forms are
/// refused by the connection manager's own list).
pub(super) fn http_connection_manager(
    ctx: &Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
) -> Result<Arc<ma::AccessLogs>, ConvertError> {
    if let Some(o) = &h.access_log_options {
        let cov = &HCM_ACCESS_LOG_OPTIONS;
        let at = path(field, "access_log_options");
        let hcm_pb::http_connection_manager::HcmAccessLogOptions {
            access_log_flush_interval,
            flush_access_log_on_new_request,
            flush_log_on_tunnel_successfully_established,
        } = o;
        ctx.refuse(
            cov,
            &at,
            "access_log_flush_interval",
            access_log_flush_interval.is_some(),
        )?;
        ctx.refuse(
            cov,
            &at,
            "flush_access_log_on_new_request",
            *flush_access_log_on_new_request,
        )?;
        ctx.refuse(
            cov,
            &at,
            "flush_log_on_tunnel_successfully_established",
            *flush_log_on_tunnel_successfully_established,
        )?;
    }
    access_logs(ctx, &path(field, "access_log"), &h.access_log)
}

/// The access logs of a TCP proxy, refusing the options that log more often
/// than once per connection (the deprecated top-level forms are refused by
/// the TCP proxy's own list).
pub(super) fn tcp_proxy(
    ctx: &Ctx<'_>,
    field: &str,
    tp: &tcp_pb::TcpProxy,
) -> Result<Arc<ma::AccessLogs>, ConvertError> {
    if let Some(o) = &tp.access_log_options {
        let cov = &TCP_ACCESS_LOG_OPTIONS;
        let at = path(field, "access_log_options");
        let tcp_pb::tcp_proxy::TcpAccessLogOptions {
            access_log_flush_interval,
            flush_access_log_on_connected,
            flush_access_log_on_start,
        } = o;
        ctx.refuse(
            cov,
            &at,
            "access_log_flush_interval",
            access_log_flush_interval.is_some(),
        )?;
        ctx.refuse(
            cov,
            &at,
            "flush_access_log_on_connected",
            *flush_access_log_on_connected,
        )?;
        ctx.refuse(
            cov,
            &at,
            "flush_access_log_on_start",
            *flush_access_log_on_start,
        )?;
    }
    access_logs(ctx, &path(field, "access_log"), &tp.access_log)
}

/// The bootstrap's `admin.access_log` (and the deprecated
/// `access_log_path`, a file with Envoy's default format): one entry per
/// admin request.
#[allow(deprecated)]
pub fn admin_access_logs(
    admin: &envoy_types::pb::envoy::config::bootstrap::v3::Admin,
    warnings: &mut super::Warnings,
) -> Result<Arc<ma::AccessLogs>, ConvertError> {
    let ctx = Ctx {
        resource: "admin".into(),
        warnings,
        inbound: false,
        outbound: false,
    };
    let logs = access_logs(&ctx, "access_log", &admin.access_log)?;
    if admin.access_log_path.is_empty() {
        return Ok(logs);
    }
    let mut all = Arc::try_unwrap(logs).map(|l| l.logs).unwrap_or_default();
    all.push(ma::AccessLog {
        name: "access_log_path".into(),
        filter: None,
        sink: ma::Sink::File(admin.access_log_path.clone()),
        format: ma::LogFormat::default_text(),
    });
    Ok(Arc::new(ma::AccessLogs::new(all)))
}

/// The access logs of a connection manager, TCP proxy or listener
/// (`field` names the repeated field, e.g. `filters[0].access_log`).
pub(super) fn access_logs(
    ctx: &Ctx<'_>,
    field: &str,
    logs: &[pb::AccessLog],
) -> Result<Arc<ma::AccessLogs>, ConvertError> {
    let mut out = Vec::with_capacity(logs.len());
    for (i, l) in logs.iter().enumerate() {
        out.push(access_log(ctx, &format!("{field}[{i}]"), l)?);
    }
    Ok(Arc::new(ma::AccessLogs::new(out)))
}

fn access_log(
    ctx: &Ctx<'_>,
    field: &str,
    l: &pb::AccessLog,
) -> Result<ma::AccessLog, ConvertError> {
    let pb::AccessLog {
        name,
        filter: access_filter,
        config_type,
    } = l;
    let Some(pb::access_log::ConfigType::TypedConfig(any)) = config_type else {
        return Err(ctx.err(field, format!("access log {name:?} has no typed_config")));
    };
    let tf = path(field, "typed_config");
    let typed = Typed::from_any(any).map_err(|e| ctx.err(&tf, e))?;
    let (sink, format) = match typed.type_name() {
        FILE_TYPE => file(ctx, &tf, typed.decode().map_err(|e| ctx.err(&tf, e))?)?,
        STDOUT_TYPE => {
            let stream_pb::StdoutAccessLog { access_log_format } =
                typed.decode().map_err(|e| ctx.err(&tf, e))?;
            let format = match &access_log_format {
                None => ma::LogFormat::default_text(),
                Some(stream_pb::stdout_access_log::AccessLogFormat::LogFormat(f)) => {
                    substitution(ctx, &path(&tf, "log_format"), f)?
                }
            };
            (ma::Sink::Stdout, format)
        }
        STDERR_TYPE => {
            let stream_pb::StderrAccessLog { access_log_format } =
                typed.decode().map_err(|e| ctx.err(&tf, e))?;
            let format = match &access_log_format {
                None => ma::LogFormat::default_text(),
                Some(stream_pb::stderr_access_log::AccessLogFormat::LogFormat(f)) => {
                    substitution(ctx, &path(&tf, "log_format"), f)?
                }
            };
            (ma::Sink::Stderr, format)
        }
        t => {
            return Err(ctx.err(
                &tf,
                format!(
                    "unsupported access logger {name:?} ({t}); Ferry writes envoy.access_loggers.file, stdout and stderr"
                ),
            ));
        }
    };
    let filter = match access_filter {
        Some(f) => Some(filter(ctx, &path(field, "filter"), f)?),
        None => None,
    };
    Ok(ma::AccessLog {
        name: name.clone(),
        filter,
        sink,
        format,
    })
}

/// A `FileAccessLog` at `tf`.
// Envoy 1.40 still accepts the deprecated format fields (with a warning).
#[allow(deprecated)]
fn file(
    ctx: &Ctx<'_>,
    tf: &str,
    f: file_pb::FileAccessLog,
) -> Result<(ma::Sink, ma::LogFormat), ConvertError> {
    let file_pb::FileAccessLog {
        path: file_path,
        access_log_format,
    } = f;
    if file_path.is_empty() {
        return Err(ctx.err(path(tf, "path"), "a path is required"));
    }
    // As Envoy, `/dev/stdout` and `/dev/stderr` are the process's own
    // descriptors (reopening them by path fails for a proxy running
    // as another user than its output's owner).
    let sink = match file_path.as_str() {
        "/dev/stdout" => Some(ma::Sink::Stdout),
        "/dev/stderr" => Some(ma::Sink::Stderr),
        _ => None,
    };
    // Other files are opened (created) when the configuration is
    // loaded, and one that cannot be is a configuration error.
    if sink.is_none()
        && let Err(e) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&file_path)
    {
        return Err(ctx.err(
            path(tf, "path"),
            format!("cannot open access log {file_path:?}: {e}"),
        ));
    }
    use file_pb::file_access_log::AccessLogFormat as F;
    let format = match &access_log_format {
        None => ma::LogFormat::default_text(),
        Some(F::Format(s)) if s.is_empty() => ma::LogFormat::default_text(),
        Some(F::Format(s)) => text(ctx, &path(tf, "format"), s, false)?,
        Some(F::JsonFormat(s)) => json(ctx, &path(tf, "json_format"), s, false)?,
        Some(F::TypedJsonFormat(s)) => json(ctx, &path(tf, "typed_json_format"), s, false)?,
        Some(F::LogFormat(s)) => substitution(ctx, &path(tf, "log_format"), s)?,
    };
    Ok((sink.unwrap_or(ma::Sink::File(file_path)), format))
}

/// A `SubstitutionFormatString` (`text_format` is deprecated, and
/// accepted as Envoy accepts it).
#[allow(deprecated)]
fn substitution(
    ctx: &Ctx<'_>,
    field: &str,
    s: &core_pb::SubstitutionFormatString,
) -> Result<ma::LogFormat, ConvertError> {
    use core_pb::substitution_format_string::Format as F;
    let core_pb::SubstitutionFormatString {
        omit_empty_values,
        content_type,
        formatters,
        json_format_options,
        format,
    } = s;
    // Read for local replies only.
    let _ = content_type;
    if let Some(core_pb::JsonFormatOptions { sort_properties }) = json_format_options {
        // Keys are written sorted either way, as Envoy writes them.
        let _ = sort_properties;
    }
    if let Some(f) = formatters.first() {
        let why = SUBSTITUTION_FORMAT_STRING
            .field("formatters")
            .map_or("not supported", |f| f.note);
        return Err(ctx.err(
            format!("{field}.formatters[0]"),
            format!("{why}: {:?}", f.name),
        ));
    }
    let omit = *omit_empty_values;
    match format {
        Some(F::TextFormat(t)) => text(ctx, &path(field, "text_format"), t, omit),
        Some(F::TextFormatSource(d)) => {
            let f = path(field, "text_format_source");
            let bytes = data_source(ctx, &f, Some(d))?;
            let t = String::from_utf8(bytes).map_err(|_| ctx.err(&f, "the format is not UTF-8"))?;
            text(ctx, &f, &t, omit)
        }
        Some(F::JsonFormat(j)) => json(ctx, &path(field, "json_format"), j, omit),
        None => Err(ctx.err(
            field,
            "a format (text_format_source or json_format) is required",
        )),
    }
}

fn text(
    ctx: &Ctx<'_>,
    field: &str,
    s: &str,
    omit_empty: bool,
) -> Result<ma::LogFormat, ConvertError> {
    let template = LogTemplate::parse(s).map_err(|e| ctx.err(field, e))?;
    Ok(ma::LogFormat::Text {
        template,
        omit_empty,
    })
}

fn json(
    ctx: &Ctx<'_>,
    field: &str,
    s: &Struct,
    omit_empty: bool,
) -> Result<ma::LogFormat, ConvertError> {
    Ok(ma::LogFormat::Json {
        fields: Arc::new(json_struct(ctx, field, s)?),
        omit_empty,
    })
}

/// A JSON format object, its keys sorted as Envoy writes them.
fn json_struct(ctx: &Ctx<'_>, field: &str, s: &Struct) -> Result<ma::JsonFormat, ConvertError> {
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let v = &s.fields[k];
        out.push((k.clone(), json_value(ctx, &format!("{field}.{k}"), v)?));
    }
    Ok(ma::JsonFormat::Object(out))
}

fn json_value(ctx: &Ctx<'_>, field: &str, v: &Value) -> Result<ma::JsonFormat, ConvertError> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => ma::JsonFormat::Null,
        Some(Kind::NumberValue(n)) => ma::JsonFormat::Number(*n),
        Some(Kind::BoolValue(b)) => ma::JsonFormat::Bool(*b),
        Some(Kind::StringValue(s)) => {
            ma::JsonFormat::Template(LogTemplate::parse(s).map_err(|e| ctx.err(field, e))?)
        }
        Some(Kind::StructValue(s)) => json_struct(ctx, field, s)?,
        Some(Kind::ListValue(l)) => {
            let mut items = Vec::with_capacity(l.values.len());
            for (i, v) in l.values.iter().enumerate() {
                items.push(json_value(ctx, &format!("{field}[{i}]"), v)?);
            }
            ma::JsonFormat::List(items)
        }
    })
}

fn comparison(
    ctx: &Ctx<'_>,
    field: &str,
    c: &Option<pb::ComparisonFilter>,
) -> Result<(ma::Op, u64), ConvertError> {
    let Some(c) = c else {
        return Err(ctx.err(path(field, "comparison"), "a comparison is required"));
    };
    let pb::ComparisonFilter { op, value } = c;
    let op = match pb::comparison_filter::Op::try_from(*op) {
        Ok(pb::comparison_filter::Op::Eq) => ma::Op::Eq,
        Ok(pb::comparison_filter::Op::Ge) => ma::Op::Ge,
        Ok(pb::comparison_filter::Op::Le) => ma::Op::Le,
        Ok(pb::comparison_filter::Op::Ne) => ma::Op::Ne,
        Err(_) => {
            return Err(ctx.err(
                format!("{field}.comparison.op"),
                format!("unknown operator {op}"),
            ));
        }
    };
    let Some(core_pb::RuntimeUInt32 {
        default_value,
        runtime_key,
    }) = value
    else {
        return Err(ctx.err(format!("{field}.comparison.value"), "a value is required"));
    };
    // The runtime key's default value: Ferry has no runtime layer, which is
    // what Envoy reads when no runtime overrides the key.
    let _ = runtime_key;
    Ok((op, u64::from(*default_value)))
}

fn filter(ctx: &Ctx<'_>, field: &str, f: &pb::AccessLogFilter) -> Result<ma::Filter, ConvertError> {
    use pb::access_log_filter::FilterSpecifier as S;
    let cov = &ACCESS_LOG_FILTER;
    let list = |name: &str, fs: &[pb::AccessLogFilter]| -> Result<Vec<ma::Filter>, ConvertError> {
        if fs.len() < 2 {
            return Err(ctx.err(
                format!("{field}.{name}.filters"),
                "at least two filters are required",
            ));
        }
        fs.iter()
            .enumerate()
            .map(|(i, f)| filter(ctx, &format!("{field}.{name}.filters[{i}]"), f))
            .collect()
    };
    let pb::AccessLogFilter { filter_specifier } = f;
    Ok(match filter_specifier {
        None => return Err(ctx.err(field, "a filter is required")),
        Some(S::StatusCodeFilter(pb::StatusCodeFilter { comparison: c })) => {
            let (op, v) = comparison(ctx, &path(field, "status_code_filter"), c)?;
            ma::Filter::StatusCode(op, v)
        }
        Some(S::DurationFilter(pb::DurationFilter { comparison: c })) => {
            let (op, v) = comparison(ctx, &path(field, "duration_filter"), c)?;
            ma::Filter::Duration(op, v)
        }
        Some(S::NotHealthCheckFilter(pb::NotHealthCheckFilter {})) => ma::Filter::NotHealthCheck,
        Some(S::TraceableFilter(pb::TraceableFilter {})) => ma::Filter::Traceable,
        Some(S::RuntimeFilter(pb::RuntimeFilter {
            runtime_key,
            percent_sampled,
            use_independent_randomness,
        })) => {
            if runtime_key.is_empty() {
                return Err(ctx.err(
                    format!("{field}.runtime_filter.runtime_key"),
                    "a runtime key is required",
                ));
            }
            ma::Filter::Runtime {
                fraction: fraction(percent_sampled),
                independent: *use_independent_randomness,
            }
        }
        Some(S::AndFilter(pb::AndFilter { filters })) => {
            ma::Filter::And(list("and_filter", filters)?)
        }
        Some(S::OrFilter(pb::OrFilter { filters })) => ma::Filter::Or(list("or_filter", filters)?),
        Some(S::HeaderFilter(pb::HeaderFilter { header })) => {
            let Some(m) = header else {
                return Err(ctx.err(
                    format!("{field}.header_filter.header"),
                    "a header matcher is required",
                ));
            };
            ma::Filter::Header(header_matcher(
                ctx,
                &format!("{field}.header_filter.header"),
                m,
            )?)
        }
        Some(S::ResponseFlagFilter(pb::ResponseFlagFilter { flags })) => {
            for (i, flag) in flags.iter().enumerate() {
                if !ferry_model::stream_info::RESPONSE_FLAGS
                    .iter()
                    .any(|(s, _)| s == flag)
                {
                    return Err(ctx.err(
                        format!("{field}.response_flag_filter.flags[{i}]"),
                        format!("unknown response flag {flag:?}"),
                    ));
                }
            }
            ma::Filter::ResponseFlag(flags.clone())
        }
        Some(S::GrpcStatusFilter(pb::GrpcStatusFilter { statuses, exclude })) => {
            let mut out = Vec::with_capacity(statuses.len());
            for (i, s) in statuses.iter().enumerate() {
                let s = u32::try_from(*s).ok().filter(|s| *s <= 16).ok_or_else(|| {
                    ctx.err(
                        format!("{field}.grpc_status_filter.statuses[{i}]"),
                        format!("unknown gRPC status {s}"),
                    )
                })?;
                out.push(s);
            }
            ma::Filter::GrpcStatus {
                statuses: out,
                exclude: *exclude,
            }
        }
        Some(S::LogTypeFilter(pb::LogTypeFilter { types, exclude })) => ma::Filter::LogType {
            types: types.clone(),
            exclude: *exclude,
        },
        Some(S::MetadataFilter(_)) => return Err(ctx.refused(cov, field, "metadata_filter")),
        Some(S::ExtensionFilter(_)) => return Err(ctx.refused(cov, field, "extension_filter")),
    })
}
