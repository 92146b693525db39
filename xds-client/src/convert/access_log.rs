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
use super::matcher::header_matcher;
use super::{ConvertError, Ctx, Typed};

const FILE_TYPE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// The access logs of a connection manager, refusing the options that log
/// more often than once per request.
#[allow(deprecated)]
pub(super) fn http_connection_manager(
    ctx: &Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
) -> Result<Arc<ma::AccessLogs>, ConvertError> {
    let options = h.access_log_options.as_ref();
    if h.access_log_flush_interval.is_some()
        || h.flush_access_log_on_new_request
        || options.is_some_and(|o| {
            o.access_log_flush_interval.is_some()
                || o.flush_access_log_on_new_request
                || o.flush_log_on_tunnel_successfully_established
        })
    {
        return Err(ctx.err(
            format!("{field}.access_log_options"),
            "periodic and early access log entries are not supported (one entry per request, at its end)",
        ));
    }
    access_logs(ctx, &format!("{field}.access_log"), &h.access_log)
}

/// The access logs of a TCP proxy, refusing the options that log more often
/// than once per connection.
#[allow(deprecated)]
pub(super) fn tcp_proxy(
    ctx: &Ctx<'_>,
    field: &str,
    tp: &tcp_pb::TcpProxy,
) -> Result<Arc<ma::AccessLogs>, ConvertError> {
    let options = tp.access_log_options.as_ref();
    if tp.access_log_flush_interval.is_some()
        || tp.flush_access_log_on_connected
        || options.is_some_and(|o| {
            o.access_log_flush_interval.is_some()
                || o.flush_access_log_on_connected
                || o.flush_access_log_on_start
        })
    {
        return Err(ctx.err(
            format!("{field}.access_log_options"),
            "periodic and early access log entries are not supported (one entry per connection, at its end)",
        ));
    }
    access_logs(ctx, &format!("{field}.access_log"), &tp.access_log)
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

// Envoy 1.40 still accepts the deprecated format fields (with a warning).
#[allow(deprecated)]
fn access_log(
    ctx: &Ctx<'_>,
    field: &str,
    l: &pb::AccessLog,
) -> Result<ma::AccessLog, ConvertError> {
    let Some(pb::access_log::ConfigType::TypedConfig(any)) = &l.config_type else {
        return Err(ctx.err(
            field,
            format!("access log {:?} has no typed_config", l.name),
        ));
    };
    let tf = format!("{field}.typed_config");
    let typed = Typed::from_any(any).map_err(|e| ctx.err(&tf, e))?;
    let (sink, format) = match typed.type_name() {
        FILE_TYPE => {
            let f: file_pb::FileAccessLog = typed.decode().map_err(|e| ctx.err(&tf, e))?;
            if f.path.is_empty() {
                return Err(ctx.err(format!("{tf}.path"), "a path is required"));
            }
            // As Envoy, `/dev/stdout` and `/dev/stderr` are the process's own
            // descriptors (reopening them by path fails for a proxy running
            // as another user than its output's owner).
            let sink = match f.path.as_str() {
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
                    .open(&f.path)
            {
                return Err(ctx.err(
                    format!("{tf}.path"),
                    format!("cannot open access log {:?}: {e}", f.path),
                ));
            }
            use file_pb::file_access_log::AccessLogFormat as F;
            let format = match &f.access_log_format {
                None => ma::LogFormat::default_text(),
                Some(F::Format(s)) if s.is_empty() => ma::LogFormat::default_text(),
                Some(F::Format(s)) => text(ctx, &format!("{tf}.format"), s, false)?,
                Some(F::JsonFormat(s)) => json(ctx, &format!("{tf}.json_format"), s, false)?,
                Some(F::TypedJsonFormat(s)) => {
                    json(ctx, &format!("{tf}.typed_json_format"), s, false)?
                }
                Some(F::LogFormat(s)) => substitution(ctx, &format!("{tf}.log_format"), s)?,
            };
            (sink.unwrap_or(ma::Sink::File(f.path)), format)
        }
        STDOUT_TYPE => {
            let s: stream_pb::StdoutAccessLog = typed.decode().map_err(|e| ctx.err(&tf, e))?;
            let format = match &s.access_log_format {
                None => ma::LogFormat::default_text(),
                Some(stream_pb::stdout_access_log::AccessLogFormat::LogFormat(f)) => {
                    substitution(ctx, &format!("{tf}.log_format"), f)?
                }
            };
            (ma::Sink::Stdout, format)
        }
        STDERR_TYPE => {
            let s: stream_pb::StderrAccessLog = typed.decode().map_err(|e| ctx.err(&tf, e))?;
            let format = match &s.access_log_format {
                None => ma::LogFormat::default_text(),
                Some(stream_pb::stderr_access_log::AccessLogFormat::LogFormat(f)) => {
                    substitution(ctx, &format!("{tf}.log_format"), f)?
                }
            };
            (ma::Sink::Stderr, format)
        }
        t => {
            return Err(ctx.err(
                &tf,
                format!(
                    "unsupported access logger {:?} ({t}); Ferry writes envoy.access_loggers.file, stdout and stderr",
                    l.name
                ),
            ));
        }
    };
    let filter = match &l.filter {
        Some(f) => Some(filter(ctx, &format!("{field}.filter"), f)?),
        None => None,
    };
    Ok(ma::AccessLog {
        name: l.name.clone(),
        filter,
        sink,
        format,
    })
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
    if let Some(f) = s.formatters.first() {
        return Err(ctx.err(
            format!("{field}.formatters[0]"),
            format!("formatter extension {:?} is not supported", f.name),
        ));
    }
    match &s.format {
        Some(F::TextFormat(t)) => {
            text(ctx, &format!("{field}.text_format"), t, s.omit_empty_values)
        }
        Some(F::TextFormatSource(d)) => {
            let f = format!("{field}.text_format_source");
            let bytes = data_source(ctx, &f, Some(d))?;
            let t = String::from_utf8(bytes).map_err(|_| ctx.err(&f, "the format is not UTF-8"))?;
            text(ctx, &f, &t, s.omit_empty_values)
        }
        Some(F::JsonFormat(j)) => {
            json(ctx, &format!("{field}.json_format"), j, s.omit_empty_values)
        }
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
        return Err(ctx.err(format!("{field}.comparison"), "a comparison is required"));
    };
    let op = match pb::comparison_filter::Op::try_from(c.op) {
        Ok(pb::comparison_filter::Op::Eq) => ma::Op::Eq,
        Ok(pb::comparison_filter::Op::Ge) => ma::Op::Ge,
        Ok(pb::comparison_filter::Op::Le) => ma::Op::Le,
        Ok(pb::comparison_filter::Op::Ne) => ma::Op::Ne,
        Err(_) => {
            return Err(ctx.err(
                format!("{field}.comparison.op"),
                format!("unknown operator {}", c.op),
            ));
        }
    };
    // The runtime key's default value: Ferry has no runtime layer, which is
    // what Envoy reads when no runtime overrides the key.
    let Some(v) = &c.value else {
        return Err(ctx.err(format!("{field}.comparison.value"), "a value is required"));
    };
    Ok((op, u64::from(v.default_value)))
}

fn filter(ctx: &Ctx<'_>, field: &str, f: &pb::AccessLogFilter) -> Result<ma::Filter, ConvertError> {
    use pb::access_log_filter::FilterSpecifier as S;
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
    Ok(match &f.filter_specifier {
        None => return Err(ctx.err(field, "a filter is required")),
        Some(S::StatusCodeFilter(s)) => {
            let (op, v) = comparison(ctx, &format!("{field}.status_code_filter"), &s.comparison)?;
            ma::Filter::StatusCode(op, v)
        }
        Some(S::DurationFilter(s)) => {
            let (op, v) = comparison(ctx, &format!("{field}.duration_filter"), &s.comparison)?;
            ma::Filter::Duration(op, v)
        }
        Some(S::NotHealthCheckFilter(_)) => ma::Filter::NotHealthCheck,
        Some(S::TraceableFilter(_)) => ma::Filter::Traceable,
        Some(S::RuntimeFilter(r)) => {
            if r.runtime_key.is_empty() {
                return Err(ctx.err(
                    format!("{field}.runtime_filter.runtime_key"),
                    "a runtime key is required",
                ));
            }
            ma::Filter::Runtime {
                fraction: fraction(&r.percent_sampled),
                independent: r.use_independent_randomness,
            }
        }
        Some(S::AndFilter(a)) => ma::Filter::And(list("and_filter", &a.filters)?),
        Some(S::OrFilter(o)) => ma::Filter::Or(list("or_filter", &o.filters)?),
        Some(S::HeaderFilter(h)) => {
            let Some(m) = &h.header else {
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
        Some(S::ResponseFlagFilter(r)) => {
            for (i, flag) in r.flags.iter().enumerate() {
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
            ma::Filter::ResponseFlag(r.flags.clone())
        }
        Some(S::GrpcStatusFilter(g)) => {
            let mut statuses = Vec::with_capacity(g.statuses.len());
            for (i, s) in g.statuses.iter().enumerate() {
                let s = u32::try_from(*s).ok().filter(|s| *s <= 16).ok_or_else(|| {
                    ctx.err(
                        format!("{field}.grpc_status_filter.statuses[{i}]"),
                        format!("unknown gRPC status {s}"),
                    )
                })?;
                statuses.push(s);
            }
            ma::Filter::GrpcStatus {
                statuses,
                exclude: g.exclude,
            }
        }
        Some(S::LogTypeFilter(l)) => ma::Filter::LogType {
            types: l.types.clone(),
            exclude: l.exclude,
        },
        Some(S::MetadataFilter(_)) => {
            return Err(ctx.err(
                format!("{field}.metadata_filter"),
                "metadata access log filters are not supported",
            ));
        }
        Some(S::ExtensionFilter(e)) => {
            return Err(ctx.err(
                format!("{field}.extension_filter"),
                format!(
                    "access log filter extension {:?} (e.g. CEL) is not supported",
                    e.name
                ),
            ));
        }
    })
}
