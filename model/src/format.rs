//! Envoy's substitution format strings in header values (`%REQ(x-foo)%`,
//! `%DOWNSTREAM_REMOTE_ADDRESS%`, `%START_TIME%`, `%%`), compiled once per
//! snapshot into literal pieces and commands, then rendered per request.
//!
//! Only the commands Ferry can answer are accepted; any other is a
//! configuration error, so a value is never silently sent with a raw
//! `%COMMAND%` in it.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName};

/// A compiled header value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderFormat {
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
    Req(HeaderName, Option<HeaderName>),
    StartTime(Vec<TimePiece>),
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
    /// The endpoint that answered (known on the response side only).
    pub upstream_remote: Option<SocketAddr>,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    pub hostname: &'a str,
    pub start_time: SystemTime,
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
            let (command, max_len, consumed) = parse_command(after)
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
        Ok(HeaderFormat { pieces })
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
                    if let Some(max) = max_len
                        && v.len() > *max
                    {
                        let mut cut = *max;
                        while !v.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        v.truncate(cut);
                    }
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
    match c {
        Command::DownstreamRemote { port } => addr(ctx.downstream_remote, *port),
        Command::DownstreamRemotePort => ctx
            .downstream_remote
            .map(|a| a.port().to_string())
            .unwrap_or_default(),
        Command::DownstreamLocal { port } => addr(ctx.downstream_local, *port),
        Command::DownstreamLocalPort => ctx
            .downstream_local
            .map(|a| a.port().to_string())
            .unwrap_or_default(),
        Command::UpstreamRemote { port } => addr(ctx.upstream_remote, *port),
        Command::Hostname => ctx.hostname.to_string(),
        Command::Protocol => ctx.protocol.to_string(),
        Command::Req(name, alt) => request
            .get(name)
            .or_else(|| alt.as_ref().and_then(|a| request.get(a)))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        Command::StartTime(fmt) => render_time(fmt, ctx.start_time),
    }
}

/// Parses `NAME(arg):N%` after the opening `%`; returns the command, its
/// length limit and the bytes consumed (including the closing `%`).
fn parse_command(s: &str) -> Result<(Command, Option<usize>, usize), String> {
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
                HeaderName::from_bytes(h.trim().to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("{h:?} is not a header name"))
            };
            Command::Req(header(main)?, alt.map(header).transpose()?)
        }
        "START_TIME" => Command::StartTime(parse_time_format(arg.unwrap_or(""))?),
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
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let days = (secs / 86_400) as i64;
    let (y, mo, day) = civil_from_days(days);
    let tod = secs % 86_400;
    let frac = |n: usize| {
        let s = format!("{nanos:09}");
        s[..n.min(9)].to_string()
    };
    let mut out = String::new();
    for p in fmt {
        match p {
            TimePiece::Literal(l) => out.push_str(l),
            TimePiece::Year => out.push_str(&format!("{y:04}")),
            TimePiece::Month => out.push_str(&format!("{mo:02}")),
            TimePiece::Day => out.push_str(&format!("{day:02}")),
            TimePiece::Hour => out.push_str(&format!("{:02}", tod / 3600)),
            TimePiece::Minute => out.push_str(&format!("{:02}", tod / 60 % 60)),
            TimePiece::Second => out.push_str(&format!("{:02}", tod % 60)),
            TimePiece::Epoch => out.push_str(&secs.to_string()),
            TimePiece::Fraction(n) => out.push_str(&frac(*n)),
            TimePiece::SecondsWithFraction(n) => {
                out.push_str(&format!("{:02}.{}", tod % 60, frac(*n)));
            }
            TimePiece::ShortYear => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            TimePiece::DaySpace => out.push_str(&format!("{day:>2}")),
            TimePiece::DayOfYear => {
                let jan1 = days_from_civil(y, 1, 1);
                out.push_str(&format!("{:03}", days - jan1 + 1));
            }
            TimePiece::Weekday { long } => {
                // 1970-01-01 was a Thursday.
                let wd = (days + 4).rem_euclid(7) as usize;
                let name = WEEKDAYS[wd];
                out.push_str(if *long { name } else { &name[..3] });
            }
            TimePiece::MonthName { long } => {
                let name = MONTHS[(mo as usize).saturating_sub(1).min(11)];
                out.push_str(if *long { name } else { &name[..3] });
            }
            TimePiece::Hour12 => {
                let h = tod / 3600 % 12;
                out.push_str(&format!("{:02}", if h == 0 { 12 } else { h }));
            }
            TimePiece::AmPm => out.push_str(if tod / 3600 < 12 { "AM" } else { "PM" }),
        }
    }
    out
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

/// (year, month, day) → days since 1970-01-01 (the inverse of
/// [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ctx() -> FormatContext<'static> {
        FormatContext {
            downstream_remote: Some("10.0.0.1:5555".parse().unwrap()),
            downstream_local: Some("[::1]:80".parse().unwrap()),
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

    #[test]
    fn errors_name_the_problem() {
        let e = HeaderFormat::parse("x-%NOPE%").unwrap_err();
        assert!(e.contains("unsupported command %NOPE%"), "{e}");
        assert!(HeaderFormat::parse("50%").is_err());
        assert!(HeaderFormat::parse("%REQ%").is_err());
        assert!(HeaderFormat::parse("%REQ(x-a%").is_err());
        assert!(HeaderFormat::parse("%HOSTNAME(x)%").is_err());
        assert!(HeaderFormat::parse("%START_TIME(%Q)%").is_err());
    }

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for d in [-1000, -1, 0, 59, 19_782, 40_000] {
            let (y, m, day) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, day), d);
        }
    }
}
