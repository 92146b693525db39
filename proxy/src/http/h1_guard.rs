//! The HTTP/1 request guard: every byte a client sends on an HTTP/1
//! connection passes through [`H1Guard`] before hyper parses it, so that
//! request framing (RFC 9112 §6), the head size and count limits, the
//! method, the request target, the version and `request_headers_timeout`
//! are decided here, as Envoy decides them, before routing and before any
//! filter sees the request.
//!
//! hyper's parser alone is laxer than Envoy in ways that matter at a
//! security boundary: it serves a request carrying both `Content-Length`
//! and `Transfer-Encoding` (the transfer coding wins and the length is
//! dropped), takes duplicate identical lengths, accepts `Transfer-Encoding:
//! identity, chunked`, custom methods and any request target, and without
//! a timer never times out a slow head. The guard holds each request head
//! until it is complete, checks it (with the same `httparse` parser hyper
//! uses, so the two agree on where a head ends), and releases to hyper
//! either the head (a [`Verdict`] says it passed) or, for a refused one, a
//! fixed placeholder head whose [`Verdict`] carries the refusal: `handle`
//! then answers it in order behind any pipelined request, with
//! `Connection: close`, and the guard releases nothing more. The refused
//! bytes never reach hyper, a filter or a backend.
//!
//! Bodies pass through untouched but are followed (length, or chunk by
//! chunk exactly as hyper's chunked decoder reads them) so the guard knows
//! where the next head starts. After a request that asks for an upgrade
//! (`Upgrade`, `CONNECT`), the bytes that follow are held until `handle`
//! says whether the upgrade happened: then they pass untouched (a tunnel),
//! or are read as the next request.
//!
//! Obs-fold is refused (400), as hyper refuses it; Envoy accepts it and
//! joins the lines, so Ferry is stricter there. Bare LF line endings are
//! accepted, as Envoy and hyper accept them.
//!
//! Upstream responses get the same framing rules ([`response_framing`]):
//! a backend answering with both lengths, several lengths or another
//! transfer coding is a protocol error (502), and its connection is never
//! pooled again, so it cannot answer the next request with what it
//! smuggled into this one.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use ferry_model::http_protocol::{DownstreamProtocol, KNOWN_METHODS};

/// What hyper is given in place of a refused head: a request it accepts,
/// which `handle` answers with the refusal its verdict carries.
const PLACEHOLDER: &[u8] = b"GET / HTTP/1.1\r\nhost: refused.invalid\r\n\r\n";

/// The bytes Envoy's known methods start with.
const METHOD_FIRST_BYTES: &[u8] = b"ABCDGHLMNOPRSTU";

/// An RFC 9110 token character (methods, header names).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Chunk extension bytes hyper accepts on one chunk-size line.
const CHUNK_EXTENSIONS_LIMIT: u64 = 16 * 1024;

/// Why a request was refused before hyper saw it, and what to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    /// The body of the local reply (Envoy's).
    pub body: &'static str,
    /// What is logged.
    pub reason: &'static str,
}

impl Refusal {
    const fn new(status: StatusCode, body: &'static str, reason: &'static str) -> Self {
        Self {
            status,
            body,
            reason,
        }
    }

    fn bad_request(reason: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", reason)
    }

    fn too_large(reason: &'static str) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Request Header Fields Too Large",
            reason,
        )
    }

    /// The head did not arrive within `request_headers_timeout`.
    pub fn is_header_timeout(&self) -> bool {
        self.status == StatusCode::REQUEST_TIMEOUT
    }
}

/// The guard's decision about one head released to hyper, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass {
        /// The request asks for an upgrade (or is a CONNECT): `handle` must
        /// tell the guard whether it happened ([`H1Shared::upgrade_done`]).
        upgrade: bool,
    },
    Refuse(Refusal),
}

/// What the guard and the connection manager of one connection share.
#[derive(Debug, Default)]
pub struct H1Shared {
    verdicts: Mutex<VecDeque<Verdict>>,
    upgrade: Mutex<UpgradeSignal>,
    /// A request body's chunked framing broke (hyper fails its body too).
    body_error: AtomicBool,
    /// hyper last asked for bytes and the guard had none, every byte it
    /// released so far being whole requests: hyper is between requests.
    between: AtomicBool,
    /// The connection is being parked: shutting the guard down flushes it
    /// and leaves the socket open ([`H1Guard::park`]).
    parking: AtomicBool,
}

#[derive(Debug, Default)]
struct UpgradeSignal {
    outcome: Option<bool>,
    waker: Option<Waker>,
}

impl H1Shared {
    /// The verdict of the next request hyper hands over. `None` would mean
    /// hyper parsed a head the guard did not release: never expected, and
    /// answered as a refusal by the caller.
    pub fn next_verdict(&self) -> Option<Verdict> {
        self.verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Whether the upgrade a request asked for happened (a 101, or a 2xx to
    /// a CONNECT): the bytes after it are a tunnel, or the next request.
    pub fn upgrade_done(&self, upgraded: bool) {
        let mut s = self.upgrade.lock().unwrap_or_else(|p| p.into_inner());
        s.outcome = Some(upgraded);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    /// Whether a request body's framing broke since the last call.
    pub fn take_body_error(&self) -> bool {
        self.body_error.swap(false, Ordering::AcqRel)
    }

    /// hyper waits for the next request: it asked the guard for bytes and
    /// got none, every head the guard released is a whole request whose
    /// body was read, and hyper handed every one of them on.
    pub fn between_requests(&self) -> bool {
        self.between.load(Ordering::Acquire)
            && self
                .verdicts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }

    /// While set, shutting the guard down only flushes it.
    pub fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Release);
    }

    fn push(&self, v: Vec<Verdict>) {
        if !v.is_empty() {
            self.verdicts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(v);
        }
    }

    fn take_upgrade(&self, cx: &mut Context<'_>) -> Option<bool> {
        let mut s = self.upgrade.lock().unwrap_or_else(|p| p.into_inner());
        let out = s.outcome.take();
        if out.is_none() {
            s.waker = Some(cx.waker().clone());
        }
        out
    }
}

/// The limits the guard enforces, from the connection manager.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub allow_chunked_length: bool,
    pub allow_custom_methods: bool,
    pub accept_http_10: bool,
    /// Runtime `envoy.reloadable_features.http_reject_path_with_fragment`:
    /// a target with `#` is refused (true) or let through, the codec then
    /// dropping the fragment from the path as Envoy strips it (false).
    pub reject_fragment: bool,
}

impl Limits {
    pub fn of(p: &DownstreamProtocol) -> Self {
        Self {
            max_head_bytes: p.max_request_headers_bytes as usize,
            max_headers: p.max_headers_count as usize,
            allow_chunked_length: p.http1.allow_chunked_length,
            allow_custom_methods: p.http1.allow_custom_methods,
            accept_http_10: p.http1.accept_http_10,
            reject_fragment: ferry_xds::runtime::current().reject_path_with_fragment(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

#[derive(Debug, Clone, Copy)]
struct Chunked {
    state: ChunkState,
    size: u64,
    extension: u64,
    trailer_bytes: usize,
    trailers: usize,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Reading a head (`Framer::head`).
    Head,
    /// A body of known length: bytes left.
    Length(u64),
    Chunked(Chunked),
    /// After an upgrade request: bytes wait for `handle`'s word.
    Held,
    /// Upgraded: everything passes.
    Tunnel,
    /// A request was refused, or a body could not be followed: nothing
    /// more is released.
    Closed,
}

/// The guard's byte-level state machine, without I/O.
pub(crate) struct Framer {
    limits: Limits,
    phase: Phase,
    head: Vec<u8>,
    at_line_start: bool,
    /// The message being read asked for an upgrade: once its body is
    /// read, the bytes after it are held.
    upgrade_pending: bool,
    /// A body's framing broke (reported once).
    body_failed: bool,
}

impl Framer {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            phase: Phase::Head,
            head: Vec::new(),
            at_line_start: false,
            upgrade_pending: false,
            body_failed: false,
        }
    }

    /// The current message was read whole.
    fn message_done(&mut self) {
        self.phase = if std::mem::take(&mut self.upgrade_pending) {
            Phase::Held
        } else {
            Phase::Head
        };
    }

    /// A head has begun and not ended (`request_headers_timeout` runs).
    pub(crate) fn head_in_progress(&self) -> bool {
        matches!(self.phase, Phase::Head) && !self.head.is_empty()
    }

    fn closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Between messages: no head begun, no body left to follow.
    fn at_rest(&self) -> bool {
        matches!(self.phase, Phase::Head) && self.head.is_empty()
    }

    fn take_body_failed(&mut self) -> bool {
        std::mem::take(&mut self.body_failed)
    }

    /// Reads `input` (which the caller keeps): head bytes are taken into the
    /// pending head (nothing released until it is complete), a completed
    /// head is appended to `out` with its verdict, body bytes are counted
    /// and appended. Returns how much of `input` was consumed; less than
    /// all only while held after an upgrade request.
    pub(crate) fn feed(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
        verdicts: &mut Vec<Verdict>,
    ) -> usize {
        let mut i = 0;
        while i < input.len() {
            match self.phase {
                Phase::Head => i += self.feed_head(&input[i..], out, verdicts),
                Phase::Length(_) | Phase::Chunked(_) => {
                    let n = self.body(&input[i..]);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                }
                Phase::Tunnel => {
                    out.extend_from_slice(&input[i..]);
                    i = input.len();
                }
                Phase::Closed => i = input.len(),
                Phase::Held => break,
            }
        }
        i
    }

    /// How many bytes of `input` belong to the current body; the phase
    /// moves on past its end.
    fn body(&mut self, input: &[u8]) -> usize {
        match &mut self.phase {
            Phase::Length(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *left -= n as u64;
                if *left == 0 {
                    self.message_done();
                }
                n
            }
            Phase::Chunked(c) => {
                let mut i = 0;
                while i < input.len() {
                    if c.state == ChunkState::Body {
                        let n = usize::try_from(c.size)
                            .unwrap_or(usize::MAX)
                            .min(input.len() - i);
                        c.size -= n as u64;
                        i += n;
                        if c.size == 0 {
                            c.state = ChunkState::BodyCr;
                        }
                        continue;
                    }
                    let b = input[i];
                    i += 1;
                    match chunk_step(c, b, &self.limits) {
                        Ok(true) => {
                            self.message_done();
                            return i;
                        }
                        Ok(false) => {}
                        Err(()) => {
                            // hyper's decoder fails on the same byte and
                            // answers the request; nothing after it is read.
                            self.phase = Phase::Closed;
                            self.body_failed = true;
                            return i;
                        }
                    }
                }
                i
            }
            _ => 0,
        }
    }

    fn feed_head(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
        verdicts: &mut Vec<Verdict>,
    ) -> usize {
        // Empty lines before a request line are skipped, as httparse does.
        let start = if self.head.is_empty() {
            match input.iter().position(|&b| b != b'\r' && b != b'\n') {
                Some(n) => n,
                None => return input.len(),
            }
        } else {
            0
        };
        let rest = &input[start..];
        // One pass finds where the head ends or the first byte that can
        // never belong to a valid head (refused as it arrives, as Envoy's
        // parser does, not when a head that may never end is complete: a
        // control character anywhere, a first byte no method starts with).
        // The bytes are then taken at once: this runs on every request.
        let mut at_line_start = self.at_line_start;
        let mut stop = None;
        for (k, &b) in rest.iter().enumerate() {
            let control = (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0x7f;
            let first = k == 0
                && self.head.is_empty()
                && !(if self.limits.allow_custom_methods {
                    is_token(b)
                } else {
                    METHOD_FIRST_BYTES.contains(&b)
                });
            if control || first {
                stop = Some((k, false));
                break;
            }
            match b {
                b'\n' if at_line_start => {
                    stop = Some((k, true));
                    break;
                }
                b'\n' => at_line_start = true,
                // The CR of an empty line keeps it empty.
                b'\r' => {}
                _ => at_line_start = false,
            }
        }
        let taken = stop.map_or(rest.len(), |(k, _)| k + 1);
        // The byte that takes the head past its limit is refused first,
        // before what it is is looked at.
        let room = self.limits.max_head_bytes.saturating_sub(self.head.len());
        if taken > room {
            self.refuse(
                Refusal::too_large("headers size exceeds limit"),
                out,
                verdicts,
            );
            return start + room + 1;
        }
        self.head.extend_from_slice(&rest[..taken]);
        match stop {
            Some((_, false)) => {
                self.refuse(Refusal::bad_request("invalid request head"), out, verdicts);
            }
            Some((_, true)) => self.complete_head(out, verdicts),
            None => self.at_line_start = at_line_start,
        }
        start + taken
    }

    fn refuse(&mut self, r: Refusal, out: &mut BytesMut, verdicts: &mut Vec<Verdict>) {
        self.head.clear();
        self.at_line_start = false;
        out.extend_from_slice(PLACEHOLDER);
        verdicts.push(Verdict::Refuse(r));
        self.phase = Phase::Closed;
    }

    /// `request_headers_timeout` ran out with a head incomplete.
    pub(crate) fn header_timeout(&mut self, out: &mut BytesMut, verdicts: &mut Vec<Verdict>) {
        let r = Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "request header timeout",
            "request headers timeout",
        );
        self.refuse(r, out, verdicts);
    }

    /// The bytes held after an upgrade request: a tunnel, or more requests.
    pub(crate) fn upgrade_outcome(&mut self, upgraded: bool) {
        if matches!(self.phase, Phase::Held) {
            self.phase = if upgraded { Phase::Tunnel } else { Phase::Head };
        }
    }

    fn complete_head(&mut self, out: &mut BytesMut, verdicts: &mut Vec<Verdict>) {
        let head = std::mem::take(&mut self.head);
        self.at_line_start = false;
        match check_head(&head, &self.limits) {
            Ok((body, upgrade, drop_length)) => {
                match drop_length {
                    None => out.extend_from_slice(&head),
                    Some(lines) => out.extend_from_slice(&without_lines(&head, &lines)),
                }
                verdicts.push(Verdict::Pass { upgrade });
                self.upgrade_pending = upgrade;
                match body {
                    Phase::Length(0) => self.message_done(),
                    b => self.phase = b,
                }
            }
            Err(r) => self.refuse(r, out, verdicts),
        }
        // A small head's allocation is kept for the next one.
        if head.capacity() <= 4096 {
            self.head = head;
            self.head.clear();
        }
    }
}

/// One byte of chunked framing, as hyper's decoder reads it: `Ok(true)` at
/// the end of the body, `Err` where hyper fails.
fn chunk_step(c: &mut Chunked, b: u8, limits: &Limits) -> Result<bool, ()> {
    use ChunkState as S;
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    c.state = match (c.state, b) {
        (S::Start, b) => {
            let d = hex(b).ok_or(())?;
            c.size = u64::from(d);
            c.extension = 0;
            S::Size
        }
        (S::Size, b) if hex(b).is_some() => {
            let d = hex(b).ok_or(())?;
            c.size = c
                .size
                .checked_mul(16)
                .and_then(|s| s.checked_add(u64::from(d)))
                .ok_or(())?;
            S::Size
        }
        (S::Size | S::SizeLws, b'\t' | b' ') => S::SizeLws,
        (S::Size | S::SizeLws, b';') => S::Extension,
        (S::Size | S::SizeLws | S::Extension, b'\r') => S::SizeLf,
        (S::Extension, b'\n') => return Err(()),
        (S::Extension, _) => {
            c.extension += 1;
            if c.extension >= CHUNK_EXTENSIONS_LIMIT {
                return Err(());
            }
            S::Extension
        }
        (S::SizeLf, b'\n') if c.size == 0 => S::EndCr,
        (S::SizeLf, b'\n') => S::Body,
        (S::BodyCr, b'\r') => S::BodyLf,
        (S::BodyLf, b'\n') => S::Start,
        (S::EndCr, b'\r') => S::EndLf,
        (S::EndCr | S::Trailer, b) => {
            c.trailer_bytes += 1;
            // hyper bounds trailers by the head limits; the guard follows
            // a little further so that hyper, not the guard, fails first.
            if c.trailer_bytes > limits.max_head_bytes.saturating_mul(2) {
                return Err(());
            }
            if b == b'\r' { S::TrailerLf } else { S::Trailer }
        }
        (S::TrailerLf, b'\n') => {
            c.trailers += 1;
            if c.trailers > limits.max_headers.saturating_mul(2) {
                return Err(());
            }
            S::EndCr
        }
        (S::EndLf, b'\n') => return Ok(true),
        _ => return Err(()),
    };
    Ok(false)
}

/// `head` without the lines that start at the given offsets.
fn without_lines(head: &[u8], starts: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    let mut i = 0;
    while i < head.len() {
        let end = head[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(head.len(), |p| i + p + 1);
        if !starts.contains(&i) {
            out.extend_from_slice(&head[i..end]);
        }
        i = end;
    }
    out
}

/// Envoy's request-target check (its parser's, matching http-parser's),
/// plus its refusal of fragments unless the runtime turns it off.
fn target_valid(t: &[u8], connect: bool, reject_fragment: bool) -> bool {
    let path_char = |c: &u8| *c == b'\t' || *c == 0x0c || (b'!'..=b'~').contains(c);
    let Some(&first) = t.first() else {
        return false;
    };
    if reject_fragment && t.contains(&b'#') {
        return false;
    }
    if first == b'/' || first == b'*' {
        return t[1..].iter().all(path_char);
    }
    let mut rest = t;
    if !connect {
        if !first.is_ascii_alphabetic() {
            return false;
        }
        let end = rest
            .iter()
            .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')))
            .unwrap_or(rest.len());
        rest = &rest[end..];
        let Some(after) = rest.strip_prefix(b"://") else {
            return false;
        };
        rest = after;
    }
    let split = rest
        .iter()
        .position(|c| *c == b'/' || *c == b'?')
        .unwrap_or(rest.len());
    let (host, path) = rest.split_at(split);
    let host_char = |c: &u8| c.is_ascii_alphanumeric() || b"!$%&'()*+,-.:;=@[]_~".contains(c);
    host.iter().all(host_char) && !host.windows(2).any(|w| w == b"@@") && path.iter().all(path_char)
}

/// Header slots parsed without allocating.
const STACK_HEADERS: usize = 128;

/// A `Content-Length` value Envoy takes: digits only, fitting in a u64.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Checks a complete head (its last line empty). On a pass: the body's
/// framing, whether the request asks for an upgrade, and the offsets of
/// `Content-Length` lines to drop (`allow_chunked_length`).
fn check_head(head: &[u8], limits: &Limits) -> Result<(Phase, bool, Option<Vec<usize>>), Refusal> {
    // Envoy's default count fits on the stack; larger limits take the heap.
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [httparse::Header<'_>] = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap.resize(limits.max_headers, httparse::EMPTY_HEADER);
        &mut heap
    };
    let mut req = httparse::Request::new(slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::too_large("too many headers"));
        }
        _ => return Err(Refusal::bad_request("malformed request head")),
    }
    let method = req.method.unwrap_or_default();
    let known = KNOWN_METHODS.binary_search(&method).is_ok();
    if !known && !limits.allow_custom_methods {
        return Err(Refusal::bad_request("unknown method"));
    }
    let connect = method == "CONNECT";
    if !target_valid(
        req.path.unwrap_or_default().as_bytes(),
        connect,
        limits.reject_fragment,
    ) {
        return Err(Refusal::bad_request("invalid request target"));
    }
    let http10 = req.version == Some(0);
    let (mut lengths, mut codings) = (Vec::new(), Vec::new());
    let (mut host, mut upgrade) = (false, connect);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths.push(h);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.push(h);
        } else if h.name.eq_ignore_ascii_case("host") {
            host = true;
        } else if h.name.eq_ignore_ascii_case("upgrade") && !http10 {
            upgrade = true;
        }
    }
    if lengths.len() > 1 {
        return Err(Refusal::bad_request("multiple content-length headers"));
    }
    let length = match lengths.first() {
        None => None,
        Some(h) => {
            Some(parse_length(h.value).ok_or(Refusal::bad_request("invalid content-length"))?)
        }
    };
    let chunked = codings.len() == 1
        && codings[0]
            .value
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
    let mut drop_length = None;
    if !codings.is_empty() && length.is_some() {
        if chunked && limits.allow_chunked_length {
            // The length goes; the transfer coding frames the body.
            let offsets = lengths
                .iter()
                .map(|h| h.name.as_ptr() as usize - head.as_ptr() as usize)
                .collect();
            drop_length = Some(offsets);
        } else {
            return Err(Refusal::bad_request(
                "both content-length and transfer-encoding",
            ));
        }
    }
    if !codings.is_empty() && !chunked {
        return Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "Not Implemented",
            "unsupported transfer encoding",
        ));
    }
    if http10 && !limits.accept_http_10 {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            "Upgrade Required",
            "HTTP/1.0 not accepted",
        ));
    }
    if http10 && chunked {
        // hyper refuses a transfer coding in HTTP/1.0 (Envoy accepts it).
        return Err(Refusal::bad_request("transfer-encoding in HTTP/1.0"));
    }
    if !http10 && !host {
        return Err(Refusal::bad_request("missing host header"));
    }
    let body = if chunked {
        Phase::Chunked(Chunked {
            state: ChunkState::Start,
            size: 0,
            extension: 0,
            trailer_bytes: 0,
            trailers: 0,
        })
    } else {
        Phase::Length(length.unwrap_or(0))
    };
    Ok((body, upgrade, drop_length))
}

/// Why an upstream HTTP/1 response's framing is refused, as Envoy refuses
/// it: both `Content-Length` and `Transfer-Encoding`, more than one or a
/// malformed `Content-Length`, or a transfer coding other than `chunked`.
/// (hyper itself refuses different lengths and malformed heads.)
pub fn response_framing(headers: &http::HeaderMap) -> Result<(), &'static str> {
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let mut codings = headers.get_all(http::header::TRANSFER_ENCODING).iter();
    let (length, coding) = (lengths.next(), codings.next());
    if lengths.next().is_some() {
        return Err("multiple content-length headers");
    }
    if codings.next().is_some() {
        return Err("multiple transfer-encoding headers");
    }
    match (length, coding) {
        (Some(_), Some(_)) => Err("both content-length and transfer-encoding"),
        (Some(l), None) if parse_length(l.as_bytes()).is_none() => Err("invalid content-length"),
        (None, Some(c)) if !c.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => {
            Err("unsupported transfer encoding")
        }
        _ => Ok(()),
    }
}

/// An HTTP/1 downstream connection seen through the guard (the write side
/// passes untouched).
pub struct H1Guard<S> {
    inner: S,
    framer: Framer,
    shared: std::sync::Arc<H1Shared>,
    /// Read from the client and not yet taken by the framer.
    pending: BytesMut,
    /// Released to hyper and not yet copied out.
    out: BytesMut,
    header_timeout: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    eof: bool,
}

/// Buffers larger than this are given back once empty: an idle
/// connection keeps little memory.
const KEEP_CAPACITY: usize = 8 * 1024;

impl<S> H1Guard<S> {
    pub fn new(
        inner: S,
        limits: Limits,
        header_timeout: Option<Duration>,
        shared: std::sync::Arc<H1Shared>,
    ) -> Self {
        Self {
            inner,
            framer: Framer::new(limits),
            shared,
            pending: BytesMut::new(),
            out: BytesMut::new(),
            header_timeout,
            timer: None,
            eof: false,
        }
    }

    fn report_body_error(&mut self) {
        if self.framer.take_body_failed() {
            self.shared.body_error.store(true, Ordering::Release);
        }
    }

    /// Feeds what is pending to the framer; arms or disarms the head timer.
    fn advance(&mut self) {
        let mut verdicts = Vec::new();
        let n = self
            .framer
            .feed(&self.pending, &mut self.out, &mut verdicts);
        self.pending.advance(n);
        self.shared.push(verdicts);
        self.report_body_error();
        if self.pending.is_empty() && self.pending.capacity() > KEEP_CAPACITY {
            self.pending = BytesMut::new();
        }
        match (self.framer.head_in_progress(), self.header_timeout) {
            (true, Some(t)) if self.timer.is_none() => {
                self.timer = Some(Box::pin(tokio::time::sleep(t)));
            }
            (false, _) => self.timer = None,
            _ => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = this.poll_guarded(cx, buf);
        let between = r.is_pending() && this.pending.is_empty() && this.framer.at_rest();
        this.shared.between.store(between, Ordering::Release);
        r
    }
}

impl<S: AsyncRead + Unpin> H1Guard<S> {
    fn poll_guarded(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                if this.out.is_empty() && this.out.capacity() > KEEP_CAPACITY {
                    this.out = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if matches!(this.framer.phase, Phase::Held) {
                match this.shared.take_upgrade(cx) {
                    Some(upgraded) => this.framer.upgrade_outcome(upgraded),
                    None => return Poll::Pending,
                }
            }
            if !this.pending.is_empty() {
                this.advance();
                if !this.out.is_empty() || !this.pending.is_empty() {
                    continue;
                }
            }
            // After a refusal hyper answers the placeholder and closes; the
            // client's further bytes are never read.
            if this.framer.closed() {
                return Poll::Pending;
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if let Some(t) = this.timer.as_mut()
                && t.as_mut().poll(cx).is_ready()
            {
                this.timer = None;
                let mut verdicts = Vec::new();
                this.framer.header_timeout(&mut this.out, &mut verdicts);
                this.shared.push(verdicts);
                continue;
            }
            // Bodies and tunnels are read straight into hyper's buffer; what
            // lies past a body's end is kept for the framer.
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let after = buf.filled().len();
            if after == before {
                this.eof = true;
                continue;
            }
            match this.framer.phase {
                Phase::Tunnel => return Poll::Ready(Ok(())),
                Phase::Length(_) | Phase::Chunked(_) => {
                    let n = this.framer.body(&buf.filled()[before..after]);
                    this.report_body_error();
                    if before + n < after {
                        this.pending
                            .extend_from_slice(&buf.filled()[before + n..after]);
                        buf.set_filled(before + n);
                    }
                    if n > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                _ => {
                    this.pending.extend_from_slice(&buf.filled()[before..after]);
                    buf.set_filled(before);
                }
            }
        }
    }
}

/// A keep-alive connection between requests is parked: the HTTP/1 codec
/// (its 8 KiB read and write buffers) is dropped and the guard alone waits
/// for the next bytes, holding no buffer.
impl<S: AsyncRead + Unpin> H1Guard<S> {
    /// Takes the guard back from a codec that ended between requests:
    /// `unparsed` (bytes the codec read and did not parse, already seen by
    /// the framer) is released again first, and empty buffers are given
    /// back.
    pub fn park(&mut self, unparsed: bytes::Bytes) {
        self.shared.set_parking(false);
        self.unread(&unparsed);
        if self.out.is_empty() {
            self.out = BytesMut::new();
        }
        if self.pending.is_empty() {
            self.pending = BytesMut::new();
        }
        if self.framer.at_rest() {
            self.framer.head = Vec::new();
        }
        let mut verdicts = self
            .shared
            .verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if verdicts.is_empty() {
            *verdicts = VecDeque::new();
        }
    }

    /// Resolves once the guard has bytes for a codec (true), or the client
    /// closed (false). The read goes through a buffer on the stack, so a
    /// parked connection keeps none; what it read is released again first.
    pub fn poll_released(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.out.is_empty() {
            return Poll::Ready(Ok(true));
        }
        let mut stack = [0u8; 2048];
        let mut buf = ReadBuf::new(&mut stack);
        std::task::ready!(self.poll_guarded(cx, &mut buf))?;
        if buf.filled().is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.unread(buf.filled());
        Poll::Ready(Ok(true))
    }

    /// Puts released bytes back in front of what is still to be released.
    fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut out = BytesMut::with_capacity(bytes.len() + self.out.len());
        out.extend_from_slice(bytes);
        out.extend_from_slice(&self.out);
        self.out = out;
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shared.parking.load(Ordering::Acquire) {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_head_bytes: 2048,
            max_headers: 10,
            allow_chunked_length: false,
            allow_custom_methods: false,
            accept_http_10: false,
            reject_fragment: true,
        }
    }

    /// Feeds `input` in pieces of `step` bytes; returns what hyper would
    /// read and the verdicts.
    fn run_with(l: Limits, input: &[u8], step: usize) -> (Vec<u8>, Vec<Verdict>) {
        let mut f = Framer::new(l);
        let mut out = BytesMut::new();
        let mut verdicts = Vec::new();
        let mut pending = Vec::new();
        for piece in input.chunks(step.max(1)) {
            pending.extend_from_slice(piece);
            let n = f.feed(&pending, &mut out, &mut verdicts);
            pending.drain(..n);
        }
        (out.to_vec(), verdicts)
    }

    fn run(input: &[u8]) -> (Vec<u8>, Vec<Verdict>) {
        let whole = run_with(limits(), input, input.len());
        // Byte by byte, the outcome is the same.
        assert_eq!(run_with(limits(), input, 1), whole, "byte by byte");
        whole
    }

    fn status(input: &[u8]) -> Option<u16> {
        match run(input).1.first() {
            Some(Verdict::Refuse(r)) => Some(r.status.as_u16()),
            Some(Verdict::Pass { .. }) => None,
            None => Some(0),
        }
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n";

    #[test]
    fn well_formed_requests_pass_untouched() {
        let mut two = GET.to_vec();
        two.extend_from_slice(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc");
        two.extend_from_slice(
            b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked \r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n",
        );
        two.extend_from_slice(GET);
        let (out, v) = run(&two);
        assert_eq!(out, two);
        assert_eq!(v, vec![Verdict::Pass { upgrade: false }; 4]);
        // Empty lines before a request line are skipped; bare LF is fine.
        let (out, v) = run(b"\r\n\nGET / HTTP/1.1\nHost: h\n\n");
        assert_eq!(out, b"GET / HTTP/1.1\nHost: h\n\n");
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn framing_is_refused_as_envoy_refuses_it() {
        let cases: &[(&[u8], u16)] = &[
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\na", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\na", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nContent-Length: 1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: h\rX: b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            (b"GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            (b"get / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            (b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            (b"GET / HTTP/1.0\r\n\r\n", 426),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 400),
            // Refused before the head is complete.
            (b"\x16\x03\x01\x00", 400),
            (b"GET /a\x00", 400),
            (b"ZZZ", 400),
        ];
        for (input, want) in cases {
            assert_eq!(
                status(input),
                Some(*want),
                "{}",
                String::from_utf8_lossy(input)
            );
            // Nothing of a refused request reaches hyper but the placeholder.
            assert_eq!(
                run(input).0,
                PLACEHOLDER,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_refusal_stops_everything_after_it() {
        let mut input = GET.to_vec();
        input.extend_from_slice(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        input.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n");
        let (out, v) = run(&input);
        let mut want = GET.to_vec();
        want.extend_from_slice(PLACEHOLDER);
        assert_eq!(out, want);
        assert_eq!(v.len(), 2);
        assert!(matches!(v[1], Verdict::Refuse(r) if r.status == 400));
    }

    #[test]
    fn head_limits() {
        let big = |n: usize| {
            let mut h = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
            h.extend(std::iter::repeat_n(b'a', n));
            h.extend_from_slice(b"\r\n\r\n");
            h
        };
        // Envoy counts the raw head, request line to the empty line: 2048
        // bytes pass, 2049 do not.
        assert_eq!(big(2012).len(), 2048);
        assert_eq!(status(&big(2012)), None);
        assert_eq!(status(&big(2013)), Some(431));
        let many = |n: usize| {
            let mut h = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
            for i in 0..n {
                h.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            h.extend_from_slice(b"\r\n");
            h
        };
        assert_eq!(status(&many(9)), None);
        assert_eq!(status(&many(10)), Some(431));
    }

    #[test]
    fn upstream_response_framing() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                );
            }
            response_framing(&m)
        };
        assert!(h(&[("content-length", "2")]).is_ok());
        assert!(h(&[("transfer-encoding", "Chunked")]).is_ok());
        assert!(h(&[]).is_ok());
        assert!(h(&[("content-length", "2"), ("transfer-encoding", "chunked")]).is_err());
        assert!(h(&[("content-length", "2"), ("content-length", "2")]).is_err());
        assert!(h(&[("content-length", "2, 2")]).is_err());
        assert!(h(&[("content-length", "+2")]).is_err());
        assert!(h(&[("transfer-encoding", "gzip")]).is_err());
        assert!(h(&[("transfer-encoding", "chunked, identity")]).is_err());
    }

    #[test]
    fn allow_chunked_length_drops_the_length() {
        let l = Limits {
            allow_chunked_length: true,
            ..limits()
        };
        let input = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n";
        let (out, v) = run_with(l, input, 3);
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"
        );
        assert_eq!(v, vec![Verdict::Pass { upgrade: false }]);
    }

    #[test]
    fn http_10_and_custom_methods_when_allowed() {
        let l = Limits {
            accept_http_10: true,
            allow_custom_methods: true,
            ..limits()
        };
        for input in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            assert_eq!(
                run_with(l.clone(), input, 1).1,
                vec![Verdict::Pass { upgrade: false }]
            );
        }
    }

    #[test]
    fn a_bad_chunk_closes_the_framing_where_hyper_fails() {
        let input = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
        let (out, v) = run(input);
        // The head and the byte hyper fails on; nothing after.
        let head_len = input.len() - b"z\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n".len();
        assert_eq!(out, &input[..head_len]);
        assert_eq!(v.len(), 1);
        for bad in [
            &b"3\r\nabcX\r\n"[..],
            b"3\nabc\n",
            b"-3\r\n",
            b"3;a\nb\r\n",
            b"fffffffffffffffff1\r\n",
        ] {
            let mut input =
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(bad);
            input.extend_from_slice(GET);
            let (_, v) = run(&input);
            assert_eq!(v.len(), 1, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn upgrades_hold_what_follows_until_decided() {
        let head =
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let mut input = head.to_vec();
        input.extend_from_slice(b"\x81\x05hello");
        let mut f = Framer::new(limits());
        let mut out = BytesMut::new();
        let mut v = Vec::new();
        let n = f.feed(&input, &mut out, &mut v);
        assert_eq!(n, head.len());
        assert_eq!(v, vec![Verdict::Pass { upgrade: true }]);
        f.upgrade_outcome(true);
        let m = f.feed(&input[n..], &mut out, &mut v);
        assert_eq!(m, input.len() - n);
        assert_eq!(out.to_vec(), input);
        // Refused: the next bytes are a request again.
        let mut f = Framer::new(limits());
        let mut out = BytesMut::new();
        let mut input = head.to_vec();
        input.extend_from_slice(GET);
        let n = f.feed(&input, &mut out, &mut v);
        f.upgrade_outcome(false);
        f.feed(&input[n..], &mut out, &mut v);
        assert_eq!(out.to_vec(), input);
    }

    /// A client that sends a head a byte at a time, slower than the
    /// timeout: the guard answers with the placeholder and a 408 verdict.
    #[tokio::test(start_paused = true)]
    async fn slow_heads_time_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1024);
        let shared = std::sync::Arc::new(H1Shared::default());
        let mut guard = H1Guard::new(
            server,
            limits(),
            Some(Duration::from_secs(5)),
            shared.clone(),
        );
        let writer = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nHost: h\r\n" {
                if client.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let start = tokio::time::Instant::now();
        let mut got = vec![0u8; PLACEHOLDER.len()];
        guard.read_exact(&mut got).await.unwrap();
        assert_eq!(got, PLACEHOLDER);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        match shared.next_verdict() {
            Some(Verdict::Refuse(r)) => assert!(r.is_header_timeout()),
            other => panic!("{other:?}"),
        }
        writer.abort();
    }

    /// A parked guard waits for a whole head, holding it on its own, and
    /// releases it, with what the codec had read and not parsed, first.
    #[tokio::test]
    async fn parked_guards_release_whole_heads_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1024);
        let shared = std::sync::Arc::new(H1Shared::default());
        let mut guard = H1Guard::new(server, limits(), None, shared.clone());
        client.write_all(GET).await.unwrap();
        let mut first = vec![0u8; GET.len()];
        guard.read_exact(&mut first).await.unwrap();
        assert_eq!(first, GET);
        // hyper asks for more: there is none, and the guard is at rest.
        let mut b = [0u8; 16];
        let waited = tokio::time::timeout(Duration::from_millis(20), guard.read(&mut b)).await;
        assert!(waited.is_err());
        assert!(!shared.between_requests(), "a verdict is still queued");
        assert!(shared.next_verdict().is_some());
        assert!(shared.between_requests());
        // Parked with the start of a pipelined request the codec had read.
        shared.set_parking(true);
        guard.park(bytes::Bytes::from_static(b"GET /a"));
        assert!(!shared.parking.load(Ordering::Acquire));
        assert_eq!(guard.pending.capacity(), 0);
        // The unparsed bytes are released at once, before the next read.
        let ready = std::future::poll_fn(|cx| guard.poll_released(cx)).await;
        assert!(ready.unwrap());
        let mut a = [0u8; 6];
        guard.read_exact(&mut a).await.unwrap();
        assert_eq!(&a, b"GET /a");
        // Parked again with nothing: a head written in two parts is
        // released only whole.
        guard.park(bytes::Bytes::new());
        client.write_all(b"GET /a HTTP/1.1\r\nHo").await.unwrap();
        let partial = tokio::time::timeout(
            Duration::from_millis(20),
            std::future::poll_fn(|cx| guard.poll_released(cx)),
        )
        .await;
        assert!(partial.is_err(), "half a head is held");
        assert!(!shared.between_requests(), "a head is on its way");
        client.write_all(b"st: h\r\n\r\n").await.unwrap();
        let ready = std::future::poll_fn(|cx| guard.poll_released(cx)).await;
        assert!(ready.unwrap());
        let mut head = vec![0u8; GET.len()];
        guard.read_exact(&mut head).await.unwrap();
        assert_eq!(head, GET);
        // The client closes while parked.
        guard.park(bytes::Bytes::new());
        drop(client);
        let ready = std::future::poll_fn(|cx| guard.poll_released(cx)).await;
        assert!(!ready.unwrap());
    }

    /// While parking, shutting the guard down leaves the connection open.
    #[tokio::test]
    async fn parking_does_not_shut_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1024);
        let shared = std::sync::Arc::new(H1Shared::default());
        let mut guard = H1Guard::new(server, limits(), None, shared.clone());
        shared.set_parking(true);
        guard.write_all(b"bye").await.unwrap();
        guard.shutdown().await.unwrap();
        guard.park(bytes::Bytes::new());
        guard.write_all(b" and hello").await.unwrap();
        guard.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye and hello");
    }

    /// An idle keep-alive connection is not timed out by the head timer,
    /// which starts with a request's first byte.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_not_header_timeouts() {
        use tokio::io::AsyncReadExt;
        let (_client, server) = tokio::io::duplex(1024);
        let shared = std::sync::Arc::new(H1Shared::default());
        let mut guard = H1Guard::new(server, limits(), Some(Duration::from_secs(5)), shared);
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(60), guard.read(&mut b)).await;
        assert!(r.is_err(), "still waiting");
    }
}
