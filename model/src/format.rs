//! Envoy's substitution format strings (`%REQ(x-foo)%`,
//! `%DOWNSTREAM_REMOTE_ADDRESS%`, `%START_TIME%`, `%%`), compiled once per
//! snapshot into literal pieces and commands, then rendered per request: in
//! header values ([`HeaderFormat`], read from a [`FormatContext`]) and in
//! access log lines ([`LogTemplate`], read from a finished request's
//! [`StreamInfo`]).
//!
//! Only the commands Ferry can answer are accepted; any other is a
//! configuration error naming it, so a value is never silently sent or
//! logged with a raw `%COMMAND%` in it.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName};

use crate::route::HeaderKey;
use crate::stream_info::{INTERNAL_CLIENT_ADDRESS, INTERNAL_CLIENT_TEXT, StreamInfo};

/// A compiled header value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderFormat {
    pieces: Vec<Piece>,
}

/// A compiled access log format string (text, or one value of a JSON
/// format).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogTemplate {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Command {
        command: Command,
        max_len: Option<usize>,
    },
}

/// Where a format string is used: header values know the request and the
/// connection; access log lines the whole finished stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Header,
    AccessLog,
    /// A filter state value (`set_filter_state`): the request's headers,
    /// pseudo-headers included, and the downstream TLS names.
    Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    DownstreamRemote {
        port: bool,
    },
    DownstreamRemotePort,
    DownstreamLocal {
        port: bool,
    },
    DownstreamLocalPort,
    UpstreamRemote {
        port: bool,
    },
    Hostname,
    Protocol,
    /// `%REQ(name)%` or `%REQ(name?alternative)%`.
    Req(HeaderKey, Option<HeaderKey>),
    StartTime(Vec<TimePiece>),
    /// `%DOWNSTREAM_PEER_URI_SAN%`, `%DOWNSTREAM_LOCAL_URI_SAN%` (filter
    /// state values only).
    UriSan {
        peer: bool,
    },
    /// `%FILTER_STATE(KEY:PLAIN)%`, `%FILTER_STATE(KEY:TYPED)%` (the
    /// default): an object of the stream's (or connection's) filter state.
    FilterState {
        key: String,
        plain: bool,
    },
    /// The commands only an access log can answer.
    Log(LogCommand),
}

/// Commands of access log formats only (they read the finished stream).
#[derive(Debug, Clone, PartialEq, Eq)]
enum LogCommand {
    Resp(HeaderName, Option<HeaderName>),
    Trailer(HeaderName, Option<HeaderName>),
    EmitTime(Vec<TimePiece>),
    Duration,
    RequestDuration,
    ResponseDuration,
    ResponseTxDuration,
    BytesReceived,
    BytesSent,
    UpstreamProtocol,
    ResponseCode,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    ResponseFlags,
    ResponseFlagsLong,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocal {
        port: bool,
    },
    UpstreamLocalPort,
    UpstreamRemotePort,
    UpstreamTransportFailureReason,
    UpstreamAttemptCount,
    DownstreamDirectRemote {
        port: bool,
    },
    DownstreamDirectRemotePort,
    RequestedServerName,
    RouteName,
    LocalReplyBody,
    AccessLogType,
    ConnectionId,
    GrpcStatus(GrpcStatusFormat),
    TraceId,
    /// `%ENVIRONMENT(VAR)%`, read when the format is compiled (as Envoy does).
    Environment(Option<String>),
}

/// How `%GRPC_STATUS(…)%` prints a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrpcStatusFormat {
    CamelString,
    SnakeString,
    Number,
}

/// One element of a `%START_TIME(...)%` format (a strftime subset).
#[derive(Debug, Clone, PartialEq, Eq)]
enum TimePiece {
    Literal(String),
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    /// `%s`: seconds since the epoch.
    Epoch,
    /// `%f` digits of the fraction of a second (`%3f`, `%E3S` is seconds
    /// followed by `.` and three digits).
    Fraction(usize),
    SecondsWithFraction(usize),
    /// `%y`.
    ShortYear,
    /// `%e`: the day, space-padded.
    DaySpace,
    /// `%j`: the day of the year, 001–366.
    DayOfYear,
    /// `%a`, `%A`.
    Weekday {
        long: bool,
    },
    /// `%b` (`%h`), `%B`.
    MonthName {
        long: bool,
    },
    /// `%I`: the hour on a 12-hour clock.
    Hour12,
    /// `%p`: `AM` or `PM`.
    AmPm,
}

/// What a format string can refer to for one request.
#[derive(Debug, Clone, Copy)]
pub struct FormatContext<'a> {
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    /// The internal listener's own address when it is the local address
    /// (see [`StreamInfo::downstream_local_internal`]).
    pub downstream_local_internal: Option<&'a crate::cluster::InternalAddr>,
    /// The endpoint that answered (known on the response side only).
    pub upstream_remote: Option<SocketAddr>,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    pub hostname: &'a str,
    pub start_time: SystemTime,
}

/// The value of one command for one stream: a string, a number (JSON
/// formats keep numbers numbers), or nothing (`-` in text, `null` in JSON).
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Str(Cow<'a, str>),
    Num(f64),
    Absent,
}

/// The headers the access log formats and filters of a connection manager
/// read, so that only those are kept of each request and response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderNeeds {
    pub request: Vec<HeaderName>,
    pub response: Vec<HeaderName>,
    pub trailers: Vec<HeaderName>,
}

impl HeaderNeeds {
    fn add(list: &mut Vec<HeaderName>, name: &HeaderName) {
        if !list.contains(name) {
            list.push(name.clone());
        }
    }

    pub fn add_request(&mut self, name: &HeaderName) {
        Self::add(&mut self.request, name);
    }

    pub fn merge(&mut self, other: &HeaderNeeds) {
        for n in &other.request {
            Self::add(&mut self.request, n);
        }
        for n in &other.response {
            Self::add(&mut self.response, n);
        }
        for n in &other.trailers {
            Self::add(&mut self.trailers, n);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty() && self.trailers.is_empty()
    }
}

fn parse_pieces(s: &str, scope: Scope) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let pos = s.len() - rest.len() + i;
        let (command, max_len, consumed) = parse_command(after, scope)
            .map_err(|e| format!("invalid format {s:?}: {e} at position {pos}"))?;
        if !lit.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(&mut lit)));
        }
        pieces.push(Piece::Command { command, max_len });
        rest = &after[consumed..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        pieces.push(Piece::Literal(lit));
    }
    Ok(pieces)
}

fn truncate(v: &mut String, max_len: Option<usize>) {
    if let Some(max) = max_len
        && v.len() > max
    {
        let mut cut = max;
        while !v.is_char_boundary(cut) {
            cut -= 1;
        }
        v.truncate(cut);
    }
}

impl HeaderFormat {
    /// A value without commands.
    pub fn literal(s: &str) -> Self {
        HeaderFormat {
            pieces: vec![Piece::Literal(s.to_string())],
        }
    }

    /// Compiles `s`; the error says what is wrong and where.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(HeaderFormat {
            pieces: parse_pieces(s, Scope::Header)?,
        })
    }

    /// The value when it has no commands.
    pub fn as_literal(&self) -> Option<String> {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Literal(l) => Some(l.as_str()),
                Piece::Command { .. } => None,
            })
            .collect()
    }

    /// The value for one request; a command with nothing to say renders
    /// empty (Envoy omits empty values in headers rather than writing `-`).
    pub fn render(&self, ctx: &FormatContext<'_>, request: &HeaderMap) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => out.push_str(l),
                Piece::Command { command, max_len } => {
                    let mut v = render_command(command, ctx, request);
                    truncate(&mut v, *max_len);
                    out.push_str(&v);
                }
            }
        }
        out
    }
}

fn render_command(c: &Command, ctx: &FormatContext<'_>, request: &HeaderMap) -> String {
    let addr = |a: Option<SocketAddr>, port: bool| match a {
        Some(a) if port => a.to_string(),
        Some(a) => a.ip().to_string(),
        None => String::new(),
    };
    let header = |k: &HeaderKey| match k {
        HeaderKey::Name(n) => request.get(n),
        _ => None,
    };
    match c {
        // The client end of an internal connection: Envoy's placeholder.
        Command::DownstreamRemote { .. }
            if ctx.downstream_remote == Some(INTERNAL_CLIENT_ADDRESS) =>
        {
            INTERNAL_CLIENT_TEXT.to_string()
        }
        Command::DownstreamRemotePort if ctx.downstream_remote == Some(INTERNAL_CLIENT_ADDRESS) => {
            String::new()
        }
        Command::DownstreamRemote { port } => addr(ctx.downstream_remote, *port),
        Command::DownstreamRemotePort => ctx
            .downstream_remote
            .map(|a| a.port().to_string())
            .unwrap_or_default(),
        // An internal listener's own address: Envoy prints it whole, with
        // or without port, and no port.
        Command::DownstreamLocal { .. } if ctx.downstream_local_internal.is_some() => ctx
            .downstream_local_internal
            .map(ToString::to_string)
            .unwrap_or_default(),
        Command::DownstreamLocalPort if ctx.downstream_local_internal.is_some() => String::new(),
        Command::DownstreamLocal { port } => addr(ctx.downstream_local, *port),
        Command::DownstreamLocalPort => ctx
            .downstream_local
            .map(|a| a.port().to_string())
            .unwrap_or_default(),
        Command::UpstreamRemote { port } => addr(ctx.upstream_remote, *port),
        Command::Hostname => ctx.hostname.to_string(),
        Command::Protocol => ctx.protocol.to_string(),
        Command::Req(name, alt) => header(name)
            .or_else(|| alt.as_ref().and_then(header))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        Command::StartTime(fmt) => render_time(fmt, ctx.start_time),
        // Refused by the header scope's parser.
        Command::Log(_) | Command::UriSan { .. } | Command::FilterState { .. } => String::new(),
    }
}

/// A compiled filter state value (`set_filter_state`'s `format_string`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValueFormat {
    pieces: Vec<Piece>,
}

/// What a filter state value can read of one request.
#[derive(Debug, Clone, Copy)]
pub struct ValueContext<'a> {
    pub format: &'a FormatContext<'a>,
    pub pseudo: &'a crate::route::Pseudo<'a>,
    /// The URI SANs of the client's certificate and of ours (empty without
    /// TLS or a certificate).
    pub peer_uri_sans: &'a [String],
    pub local_uri_sans: &'a [String],
    /// The filter state the value is set in, as it is so far.
    pub filter_state: Option<&'a crate::filter_state::FilterState>,
}

impl ValueFormat {
    /// Compiles `s`; the error says what is wrong and where.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(ValueFormat {
            pieces: parse_pieces(s, Scope::Value)?,
        })
    }

    /// The value for one request. As in Envoy's text formatter, a command
    /// with nothing to say renders `-`.
    pub fn render(&self, ctx: &ValueContext<'_>, request: &HeaderMap) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => out.push_str(l),
                Piece::Command { command, max_len } => {
                    let mut v = match command {
                        Command::Req(a, b) => {
                            let read = |k: &HeaderKey| -> Option<String> {
                                let v = match k {
                                    HeaderKey::Name(n) => {
                                        request.get(n).and_then(|v| v.to_str().ok())
                                    }
                                    HeaderKey::Method => Some(ctx.pseudo.method),
                                    HeaderKey::Path => Some(ctx.pseudo.path),
                                    HeaderKey::Authority => Some(ctx.pseudo.authority),
                                    HeaderKey::Scheme => Some(ctx.pseudo.scheme),
                                };
                                v.filter(|v| !v.is_empty()).map(str::to_string)
                            };
                            read(a).or_else(|| b.as_ref().and_then(read))
                        }
                        Command::UriSan { peer } => {
                            let sans = if *peer {
                                ctx.peer_uri_sans
                            } else {
                                ctx.local_uri_sans
                            };
                            (!sans.is_empty()).then(|| sans.join(","))
                        }
                        Command::FilterState { key, plain } => ctx
                            .filter_state
                            .and_then(|s| s.get(key))
                            .and_then(|o| filter_state_text(o, *plain)),
                        other => Some(render_command(other, ctx.format, request))
                            .filter(|v| !v.is_empty()),
                    }
                    .unwrap_or_else(|| "-".to_string());
                    truncate(&mut v, *max_len);
                    out.push_str(&v);
                }
            }
        }
        out
    }
}

impl LogTemplate {
    /// Compiles an access log format string; unknown commands are errors
    /// naming them.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(LogTemplate {
            pieces: parse_pieces(s, Scope::AccessLog)?,
        })
    }

    /// Whether the template is nothing but one command (its JSON value then
    /// keeps the command's type).
    fn single_command(&self) -> Option<(&Command, Option<usize>)> {
        match self.pieces.as_slice() {
            [Piece::Command { command, max_len }] => Some((command, *max_len)),
            _ => None,
        }
    }

    /// Writes the text form: an absent value is `-`, or nothing with
    /// `omit_empty_values`.
    pub fn write_text(&self, info: &StreamInfo, omit_empty: bool, out: &mut String) {
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => out.push_str(l),
                Piece::Command {
                    command: Command::StartTime(fmt),
                    max_len: None,
                } => render_time_into(fmt, info.start_time, out),
                Piece::Command { command, max_len } => match log_value(command, info) {
                    Value::Absent => {
                        if !omit_empty {
                            out.push('-');
                        }
                    }
                    // Appended in place: no string of its own per value.
                    v => {
                        let at = out.len();
                        push_value_text(v, out);
                        if let Some(max) = max_len
                            && out.len() - at > *max
                        {
                            let mut cut = at + max;
                            while !out.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            out.truncate(cut);
                        }
                    }
                },
            }
        }
    }

    /// The JSON value: a lone command keeps its type (a number, a string,
    /// `null` when absent); anything else is the text form.
    pub fn json_value(&self, info: &StreamInfo) -> serde_json::Value {
        if let Some((command, max_len)) = self.single_command() {
            // A typed object is its JSON value, not that value's text.
            if let Command::FilterState { key, plain: false } = command {
                return match info.filter_state.as_deref().and_then(|s| s.get(key)) {
                    Some(crate::filter_state::Object::String { value, .. }) => {
                        serde_json::Value::String(value.clone())
                    }
                    _ => serde_json::Value::Null,
                };
            }
            return match log_value(command, info) {
                Value::Absent => serde_json::Value::Null,
                Value::Num(n) if max_len.is_none() => json_number(n),
                v => {
                    let mut s = value_text(v);
                    truncate(&mut s, max_len);
                    serde_json::Value::String(s)
                }
            };
        }
        let mut out = String::new();
        self.write_text(info, false, &mut out);
        serde_json::Value::String(out)
    }

    /// Adds the headers this template reads to `needs`.
    pub fn needs(&self, needs: &mut HeaderNeeds) {
        for p in &self.pieces {
            let Piece::Command { command, .. } = p else {
                continue;
            };
            match command {
                Command::Req(a, b) => {
                    for k in [Some(a), b.as_ref()].into_iter().flatten() {
                        if let HeaderKey::Name(n) = k {
                            HeaderNeeds::add(&mut needs.request, n);
                        }
                    }
                }
                Command::Log(LogCommand::Resp(a, b)) => {
                    for n in [Some(a), b.as_ref()].into_iter().flatten() {
                        HeaderNeeds::add(&mut needs.response, n);
                    }
                }
                Command::Log(LogCommand::Trailer(a, b)) => {
                    for n in [Some(a), b.as_ref()].into_iter().flatten() {
                        HeaderNeeds::add(&mut needs.trailers, n);
                    }
                }
                Command::Log(LogCommand::GrpcStatus(_)) => {
                    let status = HeaderName::from_static("grpc-status");
                    HeaderNeeds::add(&mut needs.response, &status);
                    HeaderNeeds::add(&mut needs.trailers, &status);
                }
                _ => {}
            }
        }
    }
}

/// A JSON number as Envoy writes it: whole numbers without a fraction.
pub fn json_number(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

/// Appends [`value_text`] of `v` to `out`.
fn push_value_text(v: Value<'_>, out: &mut String) {
    use std::fmt::Write as _;
    match v {
        Value::Str(s) => out.push_str(&s),
        Value::Num(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
            let _ = write!(out, "{}", n as i64);
        }
        Value::Num(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Absent => {}
    }
}

fn value_text(v: Value<'_>) -> String {
    match v {
        Value::Str(s) => s.into_owned(),
        Value::Num(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => (n as i64).to_string(),
        Value::Num(n) => n.to_string(),
        Value::Absent => String::new(),
    }
}

fn millis(d: Option<std::time::Duration>) -> Value<'static> {
    d.map_or(Value::Absent, |d| Value::Num(d.as_millis() as f64))
}

fn log_value<'a>(c: &'a Command, info: &'a StreamInfo) -> Value<'a> {
    let addr = |a: Option<SocketAddr>, port: bool| match a {
        Some(a) if port => Value::Str(Cow::Owned(a.to_string())),
        Some(a) => Value::Str(Cow::Owned(a.ip().to_string())),
        None => Value::Absent,
    };
    let port = |a: Option<SocketAddr>| a.map_or(Value::Absent, |a| Value::Num(f64::from(a.port())));
    // A Unix socket host is written as its path, with or without `port`.
    let host = |h: Option<&crate::cluster::HostAddr>, port: bool| match h {
        Some(crate::cluster::HostAddr::Ip(a)) => addr(Some(*a), port),
        Some(p) => Value::Str(Cow::Owned(p.to_string())),
        None => Value::Absent,
    };
    let text = |s: Option<&'a str>| match s {
        Some(s) if !s.is_empty() => Value::Str(Cow::Borrowed(s)),
        _ => Value::Absent,
    };
    let header = |h: &'a HeaderMap, a: &HeaderName, b: &Option<HeaderName>| {
        h.get(a)
            .or_else(|| b.as_ref().and_then(|b| h.get(b)))
            .map_or(Value::Absent, |v| {
                Value::Str(String::from_utf8_lossy(v.as_bytes()))
            })
    };
    let req = |k: &HeaderKey| {
        match k {
            HeaderKey::Name(n) => info
                .request
                .headers
                .get(n)
                .map(|v| Value::Str(String::from_utf8_lossy(v.as_bytes()))),
            HeaderKey::Method => Some(text(Some(&info.request.method))),
            HeaderKey::Path => Some(text(Some(&info.request.path))),
            HeaderKey::Authority => Some(text(Some(&info.request.authority))),
            HeaderKey::Scheme => Some(text(Some(info.request.scheme))),
        }
        .filter(|v| *v != Value::Absent)
    };
    let internal = |a: Option<SocketAddr>| a == Some(INTERNAL_CLIENT_ADDRESS);
    match c {
        // The client end of an internal connection: Envoy's placeholder,
        // which has no port.
        Command::DownstreamRemote { .. } if internal(info.downstream_remote) => {
            Value::Str(Cow::Borrowed(INTERNAL_CLIENT_TEXT))
        }
        Command::DownstreamRemotePort if internal(info.downstream_remote) => {
            Value::Str(Cow::Borrowed(""))
        }
        Command::DownstreamRemote { port: p } => addr(info.downstream_remote, *p),
        Command::DownstreamRemotePort => port(info.downstream_remote),
        // An internal listener's own address, which has no port.
        Command::DownstreamLocal { .. } if info.downstream_local_internal.is_some() => info
            .downstream_local_internal
            .as_ref()
            .map_or(Value::Absent, |a| Value::Str(Cow::Owned(a.to_string()))),
        Command::DownstreamLocalPort if info.downstream_local_internal.is_some() => {
            Value::Str(Cow::Borrowed(""))
        }
        Command::DownstreamLocal { port: p } => addr(info.downstream_local, *p),
        Command::DownstreamLocalPort => port(info.downstream_local),
        // The address of the upstream connection: none without one (the
        // host chosen is `%UPSTREAM_HOST%`).
        Command::UpstreamRemote { port: p } => host(
            info.upstream_host
                .as_ref()
                .filter(|_| info.upstream_local.is_some()),
            *p,
        ),
        Command::Hostname => text(Some(info.hostname)),
        Command::Protocol => text(info.protocol),
        Command::Req(a, b) => req(a)
            .or_else(|| b.as_ref().and_then(req))
            .unwrap_or(Value::Absent),
        Command::StartTime(fmt) => Value::Str(Cow::Owned(render_time(fmt, info.start_time))),
        // Parsed in filter state values only.
        Command::UriSan { .. } => Value::Absent,
        Command::FilterState { key, plain } => info
            .filter_state
            .as_deref()
            .and_then(|s| s.get(key))
            .and_then(|o| filter_state_text(o, *plain))
            .map_or(Value::Absent, |v| Value::Str(Cow::Owned(v))),
        Command::Log(l) => match l {
            LogCommand::Resp(a, b) => header(&info.response_headers, a, b),
            LogCommand::Trailer(a, b) => header(&info.response_trailers, a, b),
            LogCommand::EmitTime(fmt) => Value::Str(Cow::Owned(render_time(
                fmt,
                info.start_time + info.duration.unwrap_or_default(),
            ))),
            LogCommand::Duration => millis(info.duration),
            LogCommand::RequestDuration => millis(info.request_complete),
            LogCommand::ResponseDuration => millis(info.first_upstream_rx),
            LogCommand::ResponseTxDuration => match (info.duration, info.first_upstream_rx) {
                (Some(d), Some(f)) => millis(Some(d.saturating_sub(f))),
                _ => Value::Absent,
            },
            LogCommand::BytesReceived => Value::Num(info.bytes_received as f64),
            LogCommand::BytesSent => Value::Num(info.bytes_sent as f64),
            LogCommand::UpstreamProtocol => text(info.upstream_protocol),
            LogCommand::ResponseCode => Value::Num(f64::from(info.response_code.unwrap_or(0))),
            LogCommand::ResponseCodeDetails => text(info.response_code_details.as_deref()),
            LogCommand::ConnectionTerminationDetails => {
                text(info.connection_termination_details.as_deref())
            }
            LogCommand::ResponseFlags if info.response_flags.is_empty() => {
                Value::Str(Cow::Borrowed("-"))
            }
            LogCommand::ResponseFlags => Value::Str(Cow::Borrowed(&info.response_flags)),
            LogCommand::ResponseFlagsLong if info.response_flags.is_empty() => {
                Value::Str(Cow::Borrowed("-"))
            }
            LogCommand::ResponseFlagsLong => Value::Str(Cow::Owned(
                crate::stream_info::long_flags(&info.response_flags),
            )),
            LogCommand::UpstreamHost => host(info.upstream_host.as_ref(), true),
            LogCommand::UpstreamCluster => text(info.upstream_cluster.as_deref()),
            LogCommand::UpstreamLocal { .. } if internal(info.upstream_local) => {
                Value::Str(Cow::Borrowed(INTERNAL_CLIENT_TEXT))
            }
            LogCommand::UpstreamLocalPort if internal(info.upstream_local) => {
                Value::Str(Cow::Borrowed(""))
            }
            LogCommand::UpstreamLocal { port: p } => addr(info.upstream_local, *p),
            LogCommand::UpstreamLocalPort => port(info.upstream_local),
            LogCommand::UpstreamRemotePort => port(
                info.upstream_host
                    .as_ref()
                    .and_then(|h| h.ip())
                    .filter(|_| info.upstream_local.is_some()),
            ),
            LogCommand::UpstreamTransportFailureReason => {
                text(info.upstream_transport_failure_reason.as_deref())
            }
            LogCommand::UpstreamAttemptCount => info
                .attempt_count
                .map_or(Value::Absent, |n| Value::Num(f64::from(n))),
            LogCommand::DownstreamDirectRemote { port: p } => {
                addr(info.downstream_direct_remote, *p)
            }
            LogCommand::DownstreamDirectRemotePort => port(info.downstream_direct_remote),
            LogCommand::RequestedServerName => text(info.requested_server_name.as_deref()),
            LogCommand::RouteName => text(info.route_name.as_deref()),
            LogCommand::LocalReplyBody => text(info.local_reply_body.as_deref()),
            LogCommand::AccessLogType => Value::Str(Cow::Borrowed(info.log_type.as_str())),
            LogCommand::ConnectionId => Value::Num(info.connection_id as f64),
            LogCommand::GrpcStatus(f) => match info.grpc_status() {
                None => Value::Absent,
                Some(n) => match f {
                    GrpcStatusFormat::Number => Value::Num(f64::from(n)),
                    GrpcStatusFormat::CamelString => {
                        Value::Str(Cow::Borrowed(grpc_status_name(n).0))
                    }
                    GrpcStatusFormat::SnakeString => {
                        Value::Str(Cow::Borrowed(grpc_status_name(n).1))
                    }
                },
            },
            LogCommand::TraceId => text(info.trace_id.as_deref()),
            LogCommand::Environment(v) => text(v.as_deref()),
        },
    }
}

/// An object as `%FILTER_STATE%` writes it in text. PLAIN is the object's
/// string form (an address `ip:port`, `[ip]:port` for IPv6, as Envoy's
/// `asString`); TYPED is the JSON of its protobuf form: a string object's
/// is a JSON string (quoted), an address object has none (absent).
fn filter_state_text(o: &crate::filter_state::Object, plain: bool) -> Option<String> {
    use crate::filter_state::Object;
    match (o, plain) {
        (o, true) => Some(o.as_string()),
        (Object::String { value, .. }, false) => {
            Some(serde_json::Value::from(value.as_str()).to_string())
        }
        (Object::Address(_), false) => None,
    }
}

/// gRPC status names: Envoy's camel case and the snake case of the spec.
fn grpc_status_name(n: u32) -> (&'static str, &'static str) {
    const NAMES: [(&str, &str); 17] = [
        ("OK", "OK"),
        ("Canceled", "CANCELLED"),
        ("Unknown", "UNKNOWN"),
        ("InvalidArgument", "INVALID_ARGUMENT"),
        ("DeadlineExceeded", "DEADLINE_EXCEEDED"),
        ("NotFound", "NOT_FOUND"),
        ("AlreadyExists", "ALREADY_EXISTS"),
        ("PermissionDenied", "PERMISSION_DENIED"),
        ("ResourceExhausted", "RESOURCE_EXHAUSTED"),
        ("FailedPrecondition", "FAILED_PRECONDITION"),
        ("Aborted", "ABORTED"),
        ("OutOfRange", "OUT_OF_RANGE"),
        ("Unimplemented", "UNIMPLEMENTED"),
        ("Internal", "INTERNAL"),
        ("Unavailable", "UNAVAILABLE"),
        ("DataLoss", "DATA_LOSS"),
        ("Unauthenticated", "UNAUTHENTICATED"),
    ];
    NAMES
        .get(n as usize)
        .copied()
        .unwrap_or(("InvalidCode", "INVALID_CODE"))
}

/// Commands Envoy knows that Ferry does not answer (yet): refused by name
/// with this reason rather than logged as a literal.
const UNSUPPORTED: &[&str] = &[
    "START_TIME_LOCAL",
    "EMIT_TIME_LOCAL",
    "REQUEST_TX_DURATION",
    "ROUNDTRIP_DURATION",
    "DOWNSTREAM_HANDSHAKE_DURATION",
    "COMMON_DURATION",
    "UPSTREAM_WIRE_BYTES_SENT",
    "UPSTREAM_WIRE_BYTES_RECEIVED",
    "UPSTREAM_HEADER_BYTES_SENT",
    "UPSTREAM_HEADER_BYTES_RECEIVED",
    "DOWNSTREAM_WIRE_BYTES_SENT",
    "DOWNSTREAM_WIRE_BYTES_RECEIVED",
    "DOWNSTREAM_HEADER_BYTES_SENT",
    "DOWNSTREAM_HEADER_BYTES_RECEIVED",
    "REQUEST_HEADERS_BYTES",
    "RESPONSE_HEADERS_BYTES",
    "RESPONSE_TRAILERS_BYTES",
    "UPSTREAM_HOST_NAME",
    "UPSTREAM_HOST_NAME_WITHOUT_PORT",
    "UPSTREAM_CONNECTION_ID",
    "UPSTREAM_CONNECTION_POOL_READY_DURATION",
    "VIRTUAL_CLUSTER_NAME",
    "DYNAMIC_METADATA",
    "CLUSTER_METADATA",
    "UPSTREAM_METADATA",
    "METADATA",
    "UPSTREAM_FILTER_STATE",
    "FILTER_CHAIN_NAME",
    "CEL",
    "UNIQUE_ID",
    "STREAM_ID",
    "QUERY_PARAM",
    "PATH",
    "CUSTOM_FLAGS",
    "DOWNSTREAM_PEER_URI_SAN",
    "DOWNSTREAM_PEER_DNS_SAN",
    "DOWNSTREAM_PEER_IP_SAN",
    "DOWNSTREAM_PEER_EMAIL_SAN",
    "DOWNSTREAM_PEER_OTHERNAME_SAN",
    "DOWNSTREAM_LOCAL_URI_SAN",
    "DOWNSTREAM_LOCAL_DNS_SAN",
    "DOWNSTREAM_LOCAL_IP_SAN",
    "DOWNSTREAM_LOCAL_EMAIL_SAN",
    "DOWNSTREAM_LOCAL_OTHERNAME_SAN",
    "DOWNSTREAM_PEER_SUBJECT",
    "DOWNSTREAM_LOCAL_SUBJECT",
    "DOWNSTREAM_PEER_ISSUER",
    "DOWNSTREAM_TLS_SESSION_ID",
    "DOWNSTREAM_TLS_CIPHER",
    "DOWNSTREAM_TLS_VERSION",
    "DOWNSTREAM_PEER_FINGERPRINT_256",
    "DOWNSTREAM_PEER_FINGERPRINT_1",
    "DOWNSTREAM_PEER_SERIAL",
    "DOWNSTREAM_PEER_CERT",
    "DOWNSTREAM_PEER_CERT_V_START",
    "DOWNSTREAM_PEER_CERT_V_END",
    "DOWNSTREAM_TRANSPORT_FAILURE_REASON",
    "DOWNSTREAM_LOCAL_ADDRESS_ENDPOINT_ID",
    "UPSTREAM_PEER_URI_SAN",
    "UPSTREAM_PEER_SUBJECT",
    "UPSTREAM_TLS_VERSION",
    "UPSTREAM_LOCAL_CLOSE_REASON",
    "UPSTREAM_DETECTED_CLOSE_TYPE",
    "DOWNSTREAM_DETECTED_CLOSE_TYPE",
    "REQ_WITHOUT_QUERY",
];

/// Parses `NAME(arg):N%` after the opening `%`; returns the command, its
/// length limit and the bytes consumed (including the closing `%`).
fn parse_command(s: &str, scope: Scope) -> Result<(Command, Option<usize>, usize), String> {
    let name_len = s
        .bytes()
        .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
        .count();
    if name_len == 0 {
        return Err("a '%' that starts no command (write '%%' for a literal '%')".into());
    }
    let name = &s[..name_len];
    let mut i = name_len;
    let mut arg = None;
    if s[i..].starts_with('(') {
        let close = s[i..]
            .find(')')
            .ok_or_else(|| format!("unterminated argument of %{name}%"))?;
        arg = Some(&s[i + 1..i + close]);
        i += close + 1;
    }
    let mut max_len = None;
    if let Some(r) = s[i..].strip_prefix(':') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("a length limit of %{name}% needs digits"));
        }
        max_len = Some(
            r[..digits]
                .parse()
                .map_err(|_| format!("length limit of %{name}% is too large"))?,
        );
        i += 1 + digits;
    }
    if !s[i..].starts_with('%') {
        return Err(format!("unterminated command %{name}"));
    }
    i += 1;
    let no_arg = |c: Command| match arg {
        None => Ok(c),
        Some(_) => Err(format!("%{name}% takes no argument")),
    };
    let log = |c: LogCommand| match (scope, arg) {
        (Scope::Header | Scope::Value, _) => Err(format!(
            "unsupported command %{name}% (Ferry answers it in access logs only)"
        )),
        (Scope::AccessLog, None) => Ok(Command::Log(c)),
        (Scope::AccessLog, Some(_)) => Err(format!("%{name}% takes no argument")),
    };
    let header_names = |what: &str| -> Result<(HeaderName, Option<HeaderName>), String> {
        let arg = arg.ok_or_else(|| format!("%{what}% needs a header name: %{what}(name)%"))?;
        let (main, alt) = match arg.split_once('?') {
            Some((m, a)) => (m, Some(a)),
            None => (arg, None),
        };
        let header = |h: &str| {
            HeaderName::from_bytes(h.trim().to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("{h:?} is not a header name"))
        };
        Ok((header(main)?, alt.map(header).transpose()?))
    };
    let command = match name {
        "DOWNSTREAM_REMOTE_ADDRESS" => no_arg(Command::DownstreamRemote { port: true })?,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_arg(Command::DownstreamRemote { port: false })?
        }
        "DOWNSTREAM_REMOTE_PORT" => no_arg(Command::DownstreamRemotePort)?,
        "DOWNSTREAM_LOCAL_ADDRESS" => no_arg(Command::DownstreamLocal { port: true })?,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => {
            no_arg(Command::DownstreamLocal { port: false })?
        }
        "DOWNSTREAM_LOCAL_PORT" => no_arg(Command::DownstreamLocalPort)?,
        "UPSTREAM_REMOTE_ADDRESS" => no_arg(Command::UpstreamRemote { port: true })?,
        "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => no_arg(Command::UpstreamRemote { port: false })?,
        "HOSTNAME" => no_arg(Command::Hostname)?,
        "PROTOCOL" => no_arg(Command::Protocol)?,
        "REQ" => {
            let arg = arg.ok_or("%REQ% needs a header name: %REQ(name)%")?;
            let (main, alt) = match arg.split_once('?') {
                Some((m, a)) => (m, Some(a)),
                None => (arg, None),
            };
            let header = |h: &str| {
                let key = HeaderKey::parse(h.trim())
                    .ok_or_else(|| format!("{h:?} is not a header name"))?;
                // Header values are rendered from the regular headers only.
                if scope == Scope::Header && !matches!(key, HeaderKey::Name(_)) {
                    return Err(format!(
                        "%REQ({h})% (a pseudo-header) is not supported in header values"
                    ));
                }
                Ok(key)
            };
            Command::Req(header(main)?, alt.map(header).transpose()?)
        }
        "DOWNSTREAM_PEER_URI_SAN" if scope == Scope::Value => {
            no_arg(Command::UriSan { peer: true })?
        }
        "DOWNSTREAM_LOCAL_URI_SAN" if scope == Scope::Value => {
            no_arg(Command::UriSan { peer: false })?
        }
        "FILTER_STATE" if scope == Scope::Header => {
            return Err(
                "unsupported command %FILTER_STATE% in header values (Ferry answers it in access logs and filter state values)"
                    .into(),
            );
        }
        "FILTER_STATE" => {
            let arg = arg.ok_or("%FILTER_STATE% needs a key: %FILTER_STATE(KEY:PLAIN)%")?;
            let mut parts = arg.splitn(3, ':');
            let key = parts.next().unwrap_or_default();
            if key.is_empty() {
                return Err("%FILTER_STATE%: the key cannot be empty".into());
            }
            let plain = match (parts.next(), parts.next()) {
                (None | Some(""), None) | (Some("TYPED"), None) => false,
                (Some("PLAIN"), None) => true,
                (Some("FIELD"), _) => {
                    return Err(format!(
                        "%FILTER_STATE({arg})%: FIELD is not supported (no filter state object Ferry keeps has fields)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "%FILTER_STATE({arg})%: the serialization is PLAIN, TYPED or FIELD"
                    ));
                }
            };
            Command::FilterState {
                key: key.to_string(),
                plain,
            }
        }
        "START_TIME" => Command::StartTime(parse_time_format(arg.unwrap_or(""))?),
        "RESP" | "TRAILER" if scope == Scope::AccessLog => {
            let (a, b) = header_names(name)?;
            if name == "RESP" {
                Command::Log(LogCommand::Resp(a, b))
            } else {
                Command::Log(LogCommand::Trailer(a, b))
            }
        }
        "EMIT_TIME" if scope == Scope::AccessLog => {
            Command::Log(LogCommand::EmitTime(parse_time_format(arg.unwrap_or(""))?))
        }
        "DURATION" => log(LogCommand::Duration)?,
        "REQUEST_DURATION" => log(LogCommand::RequestDuration)?,
        "RESPONSE_DURATION" => log(LogCommand::ResponseDuration)?,
        "RESPONSE_TX_DURATION" => log(LogCommand::ResponseTxDuration)?,
        "BYTES_RECEIVED" => log(LogCommand::BytesReceived)?,
        "BYTES_SENT" => log(LogCommand::BytesSent)?,
        "UPSTREAM_PROTOCOL" => log(LogCommand::UpstreamProtocol)?,
        "RESPONSE_CODE" => log(LogCommand::ResponseCode)?,
        "RESPONSE_CODE_DETAILS" => log(LogCommand::ResponseCodeDetails)?,
        "CONNECTION_TERMINATION_DETAILS" => log(LogCommand::ConnectionTerminationDetails)?,
        "RESPONSE_FLAGS" => log(LogCommand::ResponseFlags)?,
        "RESPONSE_FLAGS_LONG" => log(LogCommand::ResponseFlagsLong)?,
        "UPSTREAM_HOST" => log(LogCommand::UpstreamHost)?,
        // Ferry's cluster names are the configured ones: the raw name and
        // the observability name are the same.
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => log(LogCommand::UpstreamCluster)?,
        "UPSTREAM_LOCAL_ADDRESS" => log(LogCommand::UpstreamLocal { port: true })?,
        "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => log(LogCommand::UpstreamLocal { port: false })?,
        "UPSTREAM_LOCAL_PORT" => log(LogCommand::UpstreamLocalPort)?,
        "UPSTREAM_REMOTE_PORT" => log(LogCommand::UpstreamRemotePort)?,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => log(LogCommand::UpstreamTransportFailureReason)?,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => log(LogCommand::UpstreamAttemptCount)?,
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            log(LogCommand::DownstreamDirectRemote { port: true })?
        }
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            log(LogCommand::DownstreamDirectRemote { port: false })?
        }
        "DOWNSTREAM_DIRECT_REMOTE_PORT" => log(LogCommand::DownstreamDirectRemotePort)?,
        "REQUESTED_SERVER_NAME" => log(LogCommand::RequestedServerName)?,
        "ROUTE_NAME" => log(LogCommand::RouteName)?,
        "LOCAL_REPLY_BODY" => log(LogCommand::LocalReplyBody)?,
        "ACCESS_LOG_TYPE" => log(LogCommand::AccessLogType)?,
        "CONNECTION_ID" => log(LogCommand::ConnectionId)?,
        "TRACE_ID" => log(LogCommand::TraceId)?,
        "GRPC_STATUS_NUMBER" => log(LogCommand::GrpcStatus(GrpcStatusFormat::Number))?,
        "GRPC_STATUS" if scope == Scope::AccessLog => {
            let f = match arg.unwrap_or("CAMEL_STRING") {
                "" | "CAMEL_STRING" => GrpcStatusFormat::CamelString,
                "SNAKE_STRING" => GrpcStatusFormat::SnakeString,
                "NUMBER" => GrpcStatusFormat::Number,
                other => return Err(format!("%GRPC_STATUS({other})%: unknown format")),
            };
            Command::Log(LogCommand::GrpcStatus(f))
        }
        "ENVIRONMENT" if scope == Scope::AccessLog => {
            let var = arg.ok_or("%ENVIRONMENT% needs a variable name")?;
            Command::Log(LogCommand::Environment(std::env::var(var).ok()))
        }
        other if UNSUPPORTED.contains(&other) => {
            return Err(format!(
                "unsupported command %{other}% (not implemented by Ferry)"
            ));
        }
        other => return Err(format!("unsupported command %{other}%")),
    };
    Ok((command, max_len, i))
}

fn parse_time_format(f: &str) -> Result<Vec<TimePiece>, String> {
    if f.is_empty() {
        // Envoy's default: ISO 8601 with milliseconds, in UTC.
        return Ok(vec![
            TimePiece::Year,
            TimePiece::Literal("-".into()),
            TimePiece::Month,
            TimePiece::Literal("-".into()),
            TimePiece::Day,
            TimePiece::Literal("T".into()),
            TimePiece::Hour,
            TimePiece::Literal(":".into()),
            TimePiece::Minute,
            TimePiece::Literal(":".into()),
            TimePiece::SecondsWithFraction(3),
            TimePiece::Literal("Z".into()),
        ]);
    }
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = f.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '%' {
            lit.push(c);
            continue;
        }
        let spec: String = match chars.peek() {
            Some((_, d)) if d.is_ascii_digit() || *d == 'E' => {
                let mut s = String::new();
                while let Some((_, d)) = chars.peek() {
                    s.push(*d);
                    let done = d.is_ascii_alphabetic() && *d != 'E';
                    chars.next();
                    if done {
                        break;
                    }
                }
                s
            }
            Some((_, d)) => {
                let d = *d;
                chars.next();
                d.to_string()
            }
            None => return Err(format!("START_TIME format {f:?} ends with '%'")),
        };
        use TimePiece as T;
        let lit_piece = |l: &str| T::Literal(l.to_string());
        let pieces = match spec.as_str() {
            "%" => {
                lit.push('%');
                continue;
            }
            // Start times are formatted in UTC, as Envoy does.
            "Z" => {
                lit.push_str("UTC");
                continue;
            }
            "z" => {
                lit.push_str("+0000");
                continue;
            }
            "Y" => vec![T::Year],
            "y" => vec![T::ShortYear],
            "m" => vec![T::Month],
            "d" => vec![T::Day],
            "e" => vec![T::DaySpace],
            "j" => vec![T::DayOfYear],
            "a" => vec![T::Weekday { long: false }],
            "A" => vec![T::Weekday { long: true }],
            "b" | "h" => vec![T::MonthName { long: false }],
            "B" => vec![T::MonthName { long: true }],
            "H" => vec![T::Hour],
            "I" => vec![T::Hour12],
            "p" => vec![T::AmPm],
            "M" => vec![T::Minute],
            "S" => vec![T::Second],
            "s" => vec![T::Epoch],
            "T" => vec![
                T::Hour,
                lit_piece(":"),
                T::Minute,
                lit_piece(":"),
                T::Second,
            ],
            "R" => vec![T::Hour, lit_piece(":"), T::Minute],
            "F" => vec![T::Year, lit_piece("-"), T::Month, lit_piece("-"), T::Day],
            "D" => vec![
                T::Month,
                lit_piece("/"),
                T::Day,
                lit_piece("/"),
                T::ShortYear,
            ],
            "f" => vec![T::Fraction(9)],
            "E3S" => vec![T::SecondsWithFraction(3)],
            "E6S" => vec![T::SecondsWithFraction(6)],
            "E9S" => vec![T::SecondsWithFraction(9)],
            s if s.len() == 2 && s.ends_with('f') => {
                let n = s[..1].parse::<usize>().unwrap_or(0);
                if n == 0 {
                    return Err(format!("unsupported START_TIME specifier %{s} in {f:?}"));
                }
                vec![T::Fraction(n)]
            }
            s => return Err(format!("unsupported START_TIME specifier %{s} in {f:?}")),
        };
        if !lit.is_empty() {
            out.push(TimePiece::Literal(std::mem::take(&mut lit)));
        }
        out.extend(pieces);
    }
    if !lit.is_empty() {
        out.push(TimePiece::Literal(lit));
    }
    Ok(out)
}

fn render_time(fmt: &[TimePiece], t: SystemTime) -> String {
    let mut out = String::new();
    render_time_into(fmt, t, &mut out);
    out
}

/// Appends the time in `fmt` to `out` (written on every access log entry:
/// no intermediate strings).
fn render_time_into(fmt: &[TimePiece], t: SystemTime, out: &mut String) {
    use std::fmt::Write as _;
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    // The civil date in UTC; past year 9999 (beyond `time`'s range) the
    // clock is wrong anyway and the epoch is shown.
    let date = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .date();
    let (y, mo, day) = (date.year(), u8::from(date.month()), date.day());
    let tod = secs % 86_400;
    // The first `n` of the nine digits of the nanoseconds.
    let frac = |n: usize, out: &mut String| {
        let mut digits = [b'0'; 9];
        let mut v = nanos;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        for d in &digits[..n.min(9)] {
            out.push(char::from(*d));
        }
    };
    for p in fmt {
        match p {
            TimePiece::Literal(l) => out.push_str(l),
            TimePiece::Year => {
                let _ = write!(out, "{y:04}");
            }
            TimePiece::Month => {
                let _ = write!(out, "{mo:02}");
            }
            TimePiece::Day => {
                let _ = write!(out, "{day:02}");
            }
            TimePiece::Hour => {
                let _ = write!(out, "{:02}", tod / 3600);
            }
            TimePiece::Minute => {
                let _ = write!(out, "{:02}", tod / 60 % 60);
            }
            TimePiece::Second => {
                let _ = write!(out, "{:02}", tod % 60);
            }
            TimePiece::Epoch => {
                let _ = write!(out, "{secs}");
            }
            TimePiece::Fraction(n) => frac(*n, out),
            TimePiece::SecondsWithFraction(n) => {
                let _ = write!(out, "{:02}.", tod % 60);
                frac(*n, out);
            }
            TimePiece::ShortYear => {
                let _ = write!(out, "{:02}", y.rem_euclid(100));
            }
            TimePiece::DaySpace => {
                let _ = write!(out, "{day:>2}");
            }
            TimePiece::DayOfYear => {
                let _ = write!(out, "{:03}", date.ordinal());
            }
            TimePiece::Weekday { long } => {
                let name = WEEKDAYS[usize::from(date.weekday().number_days_from_sunday())];
                out.push_str(if *long { name } else { &name[..3] });
            }
            TimePiece::MonthName { long } => {
                let name = MONTHS[usize::from(mo).saturating_sub(1).min(11)];
                out.push_str(if *long { name } else { &name[..3] });
            }
            TimePiece::Hour12 => {
                let h = tod / 3600 % 12;
                let _ = write!(out, "{:02}", if h == 0 { 12 } else { h });
            }
            TimePiece::AmPm => out.push_str(if tod / 3600 < 12 { "AM" } else { "PM" }),
        }
    }
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ctx() -> FormatContext<'static> {
        FormatContext {
            downstream_remote: Some("10.0.0.1:5555".parse().unwrap()),
            downstream_local: Some("[::1]:80".parse().unwrap()),
            downstream_local_internal: None,
            upstream_remote: None,
            protocol: "HTTP/1.1",
            hostname: "node-a",
            // 2021-03-04T05:06:07.089Z
            start_time: UNIX_EPOCH + Duration::from_millis(1_614_834_367_089),
        }
    }

    fn render(s: &str) -> String {
        let mut h = HeaderMap::new();
        h.insert("x-a", "alpha".parse().unwrap());
        HeaderFormat::parse(s).unwrap().render(&ctx(), &h)
    }

    /// The client end of an internal connection prints as Envoy's
    /// placeholder, with no port; a local address is left as it is.
    /// An internal listener's own address, when it is the local address,
    /// prints whole with or without port, and its port empty, as Envoy's
    /// `envoy://listener/endpoint id`.
    #[test]
    fn internal_listener_address_prints_as_envoys() {
        let addr = crate::cluster::InternalAddr {
            listener: "hop".into(),
            endpoint_id: "hop-1".into(),
        };
        let mut c = ctx();
        c.downstream_local = Some(INTERNAL_CLIENT_ADDRESS);
        c.downstream_local_internal = Some(&addr);
        let f = HeaderFormat::parse(
            "%DOWNSTREAM_LOCAL_ADDRESS%|%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%|%DOWNSTREAM_LOCAL_PORT%",
        )
        .unwrap();
        assert_eq!(
            f.render(&c, &HeaderMap::new()),
            "envoy://hop/hop-1|envoy://hop/hop-1|"
        );
        let mut info = StreamInfo::new(crate::stream_info::LogType::TcpConnectionEnd, UNIX_EPOCH);
        info.downstream_local = Some(INTERNAL_CLIENT_ADDRESS);
        info.downstream_local_internal = Some(addr.clone());
        let log = LogTemplate::parse(
            "%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% [%DOWNSTREAM_LOCAL_PORT%]",
        )
        .unwrap();
        let mut out = String::new();
        log.write_text(&info, false, &mut out);
        assert_eq!(out, "envoy://hop/hop-1 envoy://hop/hop-1 []");
    }

    #[test]
    fn internal_client_address_prints_as_envoys_placeholder() {
        let mut c = ctx();
        c.downstream_remote = Some(INTERNAL_CLIENT_ADDRESS);
        let f = HeaderFormat::parse(
            "%DOWNSTREAM_REMOTE_ADDRESS%|%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%|%DOWNSTREAM_REMOTE_PORT%|%DOWNSTREAM_LOCAL_ADDRESS%",
        )
        .unwrap();
        assert_eq!(
            f.render(&c, &HeaderMap::new()),
            "envoy://internal_client_address/|envoy://internal_client_address/||[::1]:80"
        );
    }

    #[test]
    fn commands_and_literals() {
        assert_eq!(render("plain"), "plain");
        assert_eq!(render("100%%"), "100%");
        assert_eq!(
            render("%DOWNSTREAM_REMOTE_ADDRESS%|%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
            "10.0.0.1:5555|10.0.0.1"
        );
        assert_eq!(
            render("%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%"),
            "[::1]:80 ::1"
        );
        assert_eq!(render("%UPSTREAM_REMOTE_ADDRESS%"), "");
        assert_eq!(render("%HOSTNAME%/%PROTOCOL%"), "node-a/HTTP/1.1");
        assert_eq!(render("<%REQ(X-A)%><%REQ(x-b)%>"), "<alpha><>");
        assert_eq!(render("%REQ(x-b?x-a)%"), "alpha");
        assert_eq!(render("%REQ(x-a):3%"), "alp");
        assert_eq!(render("%START_TIME%"), "2021-03-04T05:06:07.089Z");
        assert_eq!(render("%START_TIME(%s)%"), "1614834367");
        assert_eq!(
            render("%START_TIME(%Y/%m/%d %H:%M:%S.%3f)%"),
            "2021/03/04 05:06:07.089"
        );
        assert_eq!(
            render("%START_TIME(%a %A %b %B %e %j %y %I%p %Z %z)%"),
            "Thu Thursday Mar March  4 063 21 05AM UTC +0000"
        );
        assert_eq!(
            render("%START_TIME(%F %T %R %D)%"),
            "2021-03-04 05:06:07 05:06 03/04/21"
        );
        assert_eq!(
            HeaderFormat::parse("a%%b").unwrap().as_literal().unwrap(),
            "a%b"
        );
        assert!(
            HeaderFormat::parse("%HOSTNAME%")
                .unwrap()
                .as_literal()
                .is_none()
        );
    }

    /// `%FILTER_STATE%` as Envoy writes it: PLAIN is the object's string
    /// (an address `ip:port`), TYPED (the default) its protobuf's JSON (a
    /// quoted string; an address has none), `:N` cuts it; a missing key is
    /// `-` in text and `null` in JSON.
    #[test]
    fn filter_state_objects() {
        use crate::filter_state::{FilterState, Object, Shared};
        let mut fs = FilterState::default();
        let addr: SocketAddr = "[fd00::7]:8080".parse().unwrap();
        fs.set("a", Object::Address(addr), false, Shared::None);
        fs.set(
            "s",
            Object::String {
                value: "he said \"hi\"".into(),
                hashable: false,
            },
            false,
            Shared::None,
        );
        let mut info = StreamInfo::new(crate::stream_info::LogType::TcpConnectionEnd, UNIX_EPOCH);
        info.filter_state = Some(std::sync::Arc::new(fs.clone()));
        let text = |f: &str| {
            let mut out = String::new();
            LogTemplate::parse(f)
                .unwrap()
                .write_text(&info, false, &mut out);
            out
        };
        assert_eq!(text("%FILTER_STATE(a:PLAIN)%"), "[fd00::7]:8080");
        assert_eq!(text("%FILTER_STATE(a:TYPED)%|%FILTER_STATE(a)%"), "-|-");
        assert_eq!(text("%FILTER_STATE(s:PLAIN)%"), "he said \"hi\"");
        assert_eq!(text("%FILTER_STATE(s)%"), r#""he said \"hi\"""#);
        assert_eq!(text("%FILTER_STATE(a:PLAIN):6%"), "[fd00:");
        assert_eq!(text("%FILTER_STATE(nope:PLAIN)%"), "-");
        let json = |f: &str| LogTemplate::parse(f).unwrap().json_value(&info);
        assert_eq!(
            json("%FILTER_STATE(s:TYPED)%"),
            serde_json::json!("he said \"hi\"")
        );
        assert_eq!(
            json("%FILTER_STATE(a:PLAIN)%"),
            serde_json::json!("[fd00::7]:8080")
        );
        assert_eq!(json("%FILTER_STATE(a)%"), serde_json::Value::Null);
        // In a filter state value: the state as set so far.
        let value = ValueFormat::parse("%FILTER_STATE(a:PLAIN)%/%FILTER_STATE(b:PLAIN)%").unwrap();
        let pseudo = crate::route::Pseudo {
            method: "",
            path: "",
            authority: "",
            scheme: "",
        };
        let vctx = ValueContext {
            format: &ctx(),
            pseudo: &pseudo,
            peer_uri_sans: &[],
            local_uri_sans: &[],
            filter_state: Some(&fs),
        };
        assert_eq!(value.render(&vctx, &HeaderMap::new()), "[fd00::7]:8080/-");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = HeaderFormat::parse("x-%NOPE%").unwrap_err();
        assert!(e.contains("unsupported command %NOPE%"), "{e}");
        assert!(HeaderFormat::parse("50%").is_err());
        assert!(HeaderFormat::parse("%REQ%").is_err());
        assert!(HeaderFormat::parse("%REQ(x-a%").is_err());
        assert!(HeaderFormat::parse("%HOSTNAME(x)%").is_err());
        assert!(HeaderFormat::parse("%START_TIME(%Q)%").is_err());
        // Access log commands are refused in header values, and unknown ones
        // everywhere, by name.
        let e = HeaderFormat::parse("%RESPONSE_CODE%").unwrap_err();
        assert!(
            e.contains("%RESPONSE_CODE%") && e.contains("access logs only"),
            "{e}"
        );
        assert!(HeaderFormat::parse("%REQ(:path)%").is_err());
        assert!(LogTemplate::parse("%RESPONSE_CODE% %REQ(:path)% %RESP(x)%").is_ok());
        let e = LogTemplate::parse("%UPSTREAM_FILTER_STATE(x)%").unwrap_err();
        assert!(
            e.contains("%UPSTREAM_FILTER_STATE%") && e.contains("not implemented"),
            "{e}"
        );
        for bad in [
            "%FILTER_STATE%",
            "%FILTER_STATE(:PLAIN)%",
            "%FILTER_STATE(k:RAW)%",
            "%FILTER_STATE(k:FIELD:f)%",
        ] {
            assert!(LogTemplate::parse(bad).is_err(), "{bad}");
        }
        let e = HeaderFormat::parse("%FILTER_STATE(k:PLAIN)%").unwrap_err();
        assert!(e.contains("header values"), "{e}");
        assert!(LogTemplate::parse("%GRPC_STATUS(BAD)%").is_err());
        assert!(LogTemplate::parse("%DURATION(x)%").is_err());
    }

    #[test]
    fn calendar() {
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        let f = parse_time_format("%Y-%m-%d %j %a %A %b %B %e %y %I%p %H:%M:%S").unwrap();
        // 2024-02-29 (a leap day, a Thursday) 13:04:05.
        assert_eq!(
            render_time(&f, at(19_782 * 86_400 + 13 * 3600 + 4 * 60 + 5)),
            "2024-02-29 060 Thu Thursday Feb February 29 24 01PM 13:04:05"
        );
        assert_eq!(
            render_time(&f, at(0)),
            "1970-01-01 001 Thu Thursday Jan January  1 70 12AM 00:00:00"
        );
        assert_eq!(
            render_time(&f, at(40_000 * 86_400)),
            "2079-07-08 189 Sat Saturday Jul July  8 79 12AM 00:00:00"
        );
    }
}
