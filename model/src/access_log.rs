//! Access logs as Envoy configures them (`envoy.config.accesslog.v3`): where
//! an entry goes (`envoy.access_loggers.file`, `stdout`, `stderr`), in which
//! format (text or JSON substitution formats, Envoy's default line when none
//! is given), and which streams are logged (the access log filters).
//!
//! Pure configuration and decisions: rendering an entry and evaluating a
//! filter read a finished [`StreamInfo`]; writing it is the proxy's job.

use std::sync::Arc;

use crate::format::{HeaderNeeds, LogTemplate};
use crate::route::{Fraction, HeaderMatcher, Pseudo};
use crate::stream_info::StreamInfo;

/// Envoy's default access log format (`%START_TIME%` in UTC, the request
/// line, code, flags, sizes, duration, upstream service time, client
/// headers and the upstream host).
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// One configured access log.
#[derive(Debug)]
pub struct AccessLog {
    /// The extension's name as configured (e.g. `envoy.access_loggers.file`).
    pub name: String,
    pub filter: Option<Filter>,
    pub sink: Sink,
    pub format: LogFormat,
}

/// Where entries are written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sink {
    /// `envoy.access_loggers.file`: appended to this path.
    File(String),
    /// `envoy.access_loggers.stdout`, or the file logger's `/dev/stdout`
    /// (Istio's default), which Envoy writes to its own descriptor.
    Stdout,
    /// `envoy.access_loggers.stderr`, or the file logger's `/dev/stderr`.
    Stderr,
}

/// How an entry is rendered.
#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    Text {
        template: LogTemplate,
        omit_empty: bool,
    },
    Json {
        fields: Arc<JsonFormat>,
        omit_empty: bool,
    },
}

/// A JSON format: an object whose values are templates, numbers, booleans,
/// lists or nested objects (keys in the order Envoy writes them: sorted).
#[derive(Debug, Clone, PartialEq)]
pub enum JsonFormat {
    Object(Vec<(String, JsonFormat)>),
    List(Vec<JsonFormat>),
    Template(LogTemplate),
    Number(f64),
    Bool(bool),
    Null,
}

impl LogFormat {
    /// Envoy's default format.
    pub fn default_text() -> Self {
        LogFormat::Text {
            // The constant parses: every command in it is supported.
            template: LogTemplate::parse(DEFAULT_FORMAT).unwrap_or_default(),
            omit_empty: false,
        }
    }

    /// The entry for one stream, newline-terminated for JSON (a text
    /// format carries its own line end, as in Envoy).
    pub fn render(&self, info: &StreamInfo) -> String {
        let mut out = String::with_capacity(256);
        self.render_into(info, &mut out);
        out
    }

    /// [`render`](Self::render), appended to `out` (a buffer reused from
    /// entry to entry).
    pub fn render_into(&self, info: &StreamInfo, out: &mut String) {
        match self {
            LogFormat::Text {
                template,
                omit_empty,
            } => template.write_text(info, *omit_empty, out),
            LogFormat::Json { fields, omit_empty } => {
                let v = fields.render(info, *omit_empty);
                use std::fmt::Write as _;
                let _ = write!(out, "{v}");
                out.push('\n');
            }
        }
    }

    /// The headers this format reads.
    pub fn needs(&self, needs: &mut HeaderNeeds) {
        match self {
            LogFormat::Text { template, .. } => template.needs(needs),
            LogFormat::Json { fields, .. } => fields.needs(needs),
        }
    }
}

impl JsonFormat {
    fn render(&self, info: &StreamInfo, omit_empty: bool) -> serde_json::Value {
        use serde_json::Value as V;
        match self {
            JsonFormat::Object(fields) => {
                let mut map = serde_json::Map::new();
                for (k, f) in fields {
                    let v = f.render(info, omit_empty);
                    let empty = match &v {
                        V::Null => true,
                        V::String(s) => s.is_empty(),
                        _ => false,
                    };
                    if omit_empty && empty {
                        continue;
                    }
                    map.insert(k.clone(), v);
                }
                V::Object(map)
            }
            JsonFormat::List(items) => {
                V::Array(items.iter().map(|i| i.render(info, omit_empty)).collect())
            }
            JsonFormat::Template(t) => t.json_value(info),
            JsonFormat::Number(n) => crate::format::json_number(*n),
            JsonFormat::Bool(b) => V::Bool(*b),
            JsonFormat::Null => V::Null,
        }
    }

    fn needs(&self, needs: &mut HeaderNeeds) {
        match self {
            JsonFormat::Object(fields) => fields.iter().for_each(|(_, f)| f.needs(needs)),
            JsonFormat::List(items) => items.iter().for_each(|f| f.needs(needs)),
            JsonFormat::Template(t) => t.needs(needs),
            _ => {}
        }
    }
}

/// `ComparisonFilter.op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ge,
    Le,
    Ne,
}

impl Op {
    fn holds(self, value: u64, reference: u64) -> bool {
        match self {
            Op::Eq => value == reference,
            Op::Ge => value >= reference,
            Op::Le => value <= reference,
            Op::Ne => value != reference,
        }
    }
}

/// An access log filter (`AccessLogFilter`): which streams are logged.
#[derive(Debug)]
pub enum Filter {
    /// The response code (0 without a response) compared with a value
    /// (the runtime key's default: Ferry has no runtime layer).
    StatusCode(Op, u64),
    /// The duration in milliseconds compared with a value.
    Duration(Op, u64),
    NotHealthCheck,
    /// The request was sampled for tracing.
    Traceable,
    /// A fraction of the streams; without independent randomness the
    /// request id decides, so every proxy of a request logs it or none.
    Runtime {
        fraction: Fraction,
        independent: bool,
    },
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Header(HeaderMatcher),
    /// Any of these response flags is set (any flag at all when empty).
    ResponseFlag(Vec<String>),
    /// The gRPC status is one of these (not one of them with `exclude`).
    GrpcStatus {
        statuses: Vec<u32>,
        exclude: bool,
    },
    /// The entry's type is one of these (`AccessLogType` numbers).
    LogType {
        types: Vec<i32>,
        exclude: bool,
    },
}

impl Filter {
    /// Whether the stream is logged; `roll` is a uniform random number for
    /// the runtime filter's independent randomness.
    pub fn evaluate(&self, info: &StreamInfo, roll: u64) -> bool {
        match self {
            Filter::StatusCode(op, v) => op.holds(u64::from(info.response_code.unwrap_or(0)), *v),
            Filter::Duration(op, v) => {
                op.holds(info.duration.map_or(0, |d| d.as_millis() as u64), *v)
            }
            Filter::NotHealthCheck => !info.health_check,
            Filter::Traceable => info.traceable,
            Filter::Runtime {
                fraction,
                independent,
            } => {
                let value = if *independent {
                    roll
                } else {
                    info.request
                        .headers
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .and_then(request_id_value)
                        .unwrap_or(roll)
                };
                fraction.hits(value)
            }
            Filter::And(fs) => fs.iter().all(|f| f.evaluate(info, roll)),
            Filter::Or(fs) => fs.iter().any(|f| f.evaluate(info, roll)),
            Filter::Header(m) => {
                let pseudo = Pseudo {
                    method: &info.request.method,
                    path: &info.request.path,
                    authority: &info.request.authority,
                    scheme: info.request.scheme,
                };
                m.matches_request(&info.request.headers, Some(&pseudo))
            }
            Filter::ResponseFlag(flags) if flags.is_empty() => !info.response_flags.is_empty(),
            Filter::ResponseFlag(flags) => flags.iter().any(|f| info.has_flag(f)),
            Filter::GrpcStatus { statuses, exclude } => {
                // As Envoy: no gRPC status at all counts as UNKNOWN (2)
                // when the response was not gRPC-shaped.
                let status = info.grpc_status().unwrap_or(2);
                statuses.contains(&status) != *exclude
            }
            Filter::LogType { types, exclude } => {
                types.contains(&info.log_type.number()) != *exclude
            }
        }
    }

    /// The request headers this filter reads.
    pub fn needs(&self, needs: &mut HeaderNeeds) {
        match self {
            Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|f| f.needs(needs)),
            Filter::Header(m) => {
                if let crate::route::HeaderKey::Name(n) = &m.name {
                    needs.add_request(n);
                }
            }
            Filter::Runtime {
                independent: false, ..
            } => needs.add_request(&http::HeaderName::from_static("x-request-id")),
            Filter::GrpcStatus { .. } => {
                let status = http::HeaderName::from_static("grpc-status");
                needs.merge(&HeaderNeeds {
                    request: Vec::new(),
                    response: vec![status.clone()],
                    trailers: vec![status],
                });
            }
            _ => {}
        }
    }
}

/// The number Envoy's UUID request id extension derives from a request id
/// for stable sampling: its first eight hex digits.
pub fn request_id_value(id: &str) -> Option<u64> {
    let head = id.get(..8)?;
    u64::from_str_radix(head, 16).ok()
}

impl AccessLog {
    /// Whether this stream is logged here.
    pub fn accepts(&self, info: &StreamInfo, roll: u64) -> bool {
        self.filter.as_ref().is_none_or(|f| f.evaluate(info, roll))
    }
}

/// The access logs of one connection manager or TCP proxy, with the
/// headers they read.
#[derive(Debug, Default)]
pub struct AccessLogs {
    pub logs: Vec<AccessLog>,
    pub needs: HeaderNeeds,
}

impl AccessLogs {
    pub fn new(logs: Vec<AccessLog>) -> Self {
        let mut needs = HeaderNeeds::default();
        for l in &logs {
            l.format.needs(&mut needs);
            if let Some(f) = &l.filter {
                f.needs(&mut needs);
            }
        }
        Self { logs, needs }
    }

    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream_info::{LogType, StreamInfo};
    use std::time::{Duration, UNIX_EPOCH};

    fn info() -> StreamInfo {
        let mut i = StreamInfo::new(
            LogType::DownstreamEnd,
            UNIX_EPOCH + Duration::from_millis(1_614_834_367_089),
        );
        i.duration = Some(Duration::from_millis(12));
        i.first_upstream_rx = Some(Duration::from_millis(3));
        i.bytes_received = 6;
        i.bytes_sent = 449;
        i.protocol = Some("HTTP/1.1");
        i.response_code = Some(200);
        i.response_code_details = Some("via_upstream".into());
        i.upstream_host = Some(crate::cluster::HostAddr::Ip(
            "127.0.0.1:8081".parse().unwrap(),
        ));
        i.upstream_cluster = Some("backend".into());
        i.upstream_local = Some("127.0.0.1:40000".parse().unwrap());
        i.downstream_local = Some("127.0.0.1:8080".parse().unwrap());
        i.downstream_remote = Some("127.0.0.1:50000".parse().unwrap());
        i.request.method = "GET".into();
        i.request.path = "/a?b=c".into();
        i.request.authority = "example.com".into();
        i.request.scheme = "http";
        i.request
            .headers
            .insert("user-agent", "curl/8".parse().unwrap());
        i.request.headers.insert(
            "x-request-id",
            "cded7241-e53b-4193-8ae0-bb4c1847694c".parse().unwrap(),
        );
        i.response_headers
            .insert("x-envoy-upstream-service-time", "1".parse().unwrap());
        i
    }

    #[test]
    fn default_format_line() {
        let line = LogFormat::default_text().render(&info());
        assert_eq!(
            line,
            "[2021-03-04T05:06:07.089Z] \"GET /a?b=c HTTP/1.1\" 200 - 6 449 12 1 \"-\" \"curl/8\" \"cded7241-e53b-4193-8ae0-bb4c1847694c\" \"example.com\" \"127.0.0.1:8081\"\n"
        );
    }

    #[test]
    fn istio_format_line() {
        let t = LogTemplate::parse("[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n").unwrap();
        let f = LogFormat::Text {
            template: t,
            omit_empty: false,
        };
        assert_eq!(
            f.render(&info()),
            "[2021-03-04T05:06:07.089Z] \"GET /a?b=c HTTP/1.1\" 200 - via_upstream - \"-\" 6 449 12 1 \"-\" \"curl/8\" \"cded7241-e53b-4193-8ae0-bb4c1847694c\" \"example.com\" \"127.0.0.1:8081\" backend 127.0.0.1:40000 127.0.0.1:8080 127.0.0.1:50000 - -\n"
        );
        let mut needs = HeaderNeeds::default();
        f.needs(&mut needs);
        let names: Vec<&str> = needs.request.iter().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-envoy-original-path",
                "x-forwarded-for",
                "user-agent",
                "x-request-id"
            ]
        );
        assert_eq!(needs.response[0].as_str(), "x-envoy-upstream-service-time");
    }

    #[test]
    fn json_types_and_omission() {
        let t = |s: &str| JsonFormat::Template(LogTemplate::parse(s).unwrap());
        let fields = JsonFormat::Object(vec![
            ("code".into(), t("%RESPONSE_CODE%")),
            ("mixed".into(), t("c=%RESPONSE_CODE% r=%ROUTE_NAME%")),
            ("n".into(), JsonFormat::Number(5.0)),
            ("none".into(), t("%REQ(x-none)%")),
            ("path".into(), t("%REQ(:PATH):2%")),
            ("st".into(), t("%START_TIME(%s)%")),
            (
                "nested".into(),
                JsonFormat::Object(vec![("p".into(), t("%PROTOCOL%"))]),
            ),
        ]);
        let fields = Arc::new(fields);
        let f = LogFormat::Json {
            fields: fields.clone(),
            omit_empty: false,
        };
        assert_eq!(
            f.render(&info()),
            "{\"code\":200,\"mixed\":\"c=200 r=-\",\"n\":5,\"nested\":{\"p\":\"HTTP/1.1\"},\"none\":null,\"path\":\"/a\",\"st\":\"1614834367\"}\n"
        );
        let f = LogFormat::Json {
            fields,
            omit_empty: true,
        };
        assert!(!f.render(&info()).contains("none"));
    }

    #[test]
    fn filters() {
        let i = info();
        assert!(Filter::StatusCode(Op::Ge, 200).evaluate(&i, 0));
        assert!(!Filter::StatusCode(Op::Ge, 400).evaluate(&i, 0));
        assert!(Filter::Duration(Op::Le, 12).evaluate(&i, 0));
        assert!(!Filter::ResponseFlag(vec![]).evaluate(&i, 0));
        let mut failed = info();
        failed.response_flags = "URX,UF".into();
        assert!(Filter::ResponseFlag(vec![]).evaluate(&failed, 0));
        assert!(Filter::ResponseFlag(vec!["UF".into()]).evaluate(&failed, 0));
        assert!(!Filter::ResponseFlag(vec!["NR".into()]).evaluate(&failed, 0));
        let both = Filter::And(vec![
            Filter::NotHealthCheck,
            Filter::StatusCode(Op::Eq, 200),
        ]);
        assert!(both.evaluate(&i, 0));
        failed.response_code = Some(503);
        assert!(!both.evaluate(&failed, 0));
        // The request id decides: 0xcded7241 % 100 = 61.
        let at = |n: u32, independent: bool| Filter::Runtime {
            fraction: Fraction {
                numerator: n,
                denominator: 100,
            },
            independent,
        };
        assert!(at(62, false).evaluate(&i, 99));
        assert!(!at(61, false).evaluate(&i, 0));
        assert!(at(1, true).evaluate(&i, 100));
        assert!(
            Filter::LogType {
                types: vec![6],
                exclude: false
            }
            .evaluate(&i, 0)
        );
        assert!(
            !Filter::GrpcStatus {
                statuses: vec![0],
                exclude: false
            }
            .evaluate(&i, 0)
        );
    }
}
