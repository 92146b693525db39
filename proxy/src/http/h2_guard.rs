//! The HTTP/2 frame guard: reads the frame headers of an HTTP/2
//! connection in both directions (never the payloads) to apply Envoy's
//! flood protections that the `h2` codec has no knob for, and to count
//! resets as Envoy does.
//!
//! - `max_consecutive_inbound_frames_with_empty_payload`: HEADERS,
//!   CONTINUATION and DATA frames with no payload and no END_STREAM, one
//!   after the other (`http2.inbound_empty_frames_flood`).
//! - `max_inbound_priority_frames_per_stream`: PRIORITY frames beyond the
//!   limit times (1 + streams answered) (`http2.inbound_priority_frames_flood`).
//! - `max_inbound_window_update_frames_per_data_frame_sent`: WINDOW_UPDATE
//!   frames beyond 5 + 2 × (streams answered + limit × DATA frames sent)
//!   (`http2.inbound_window_update_frames_flood`).
//! - `stream_reset_burst` / `stream_reset_rate`: RST_STREAM frames take a
//!   token from a bucket of that size refilled at that rate; an empty
//!   bucket closes the connection (rapid reset, CVE-2023-44487;
//!   `downstream_rq_too_many_premature_resets`).
//! - `max_outbound_control_frames`: PING and SETTINGS frames awaiting their
//!   acknowledgement (`http2.outbound_control_flood`). The codec already
//!   answers them one at a time and stops reading meanwhile, so this is a
//!   bound that should never be reached.
//!
//! A flood closes the connection (the read side fails, the codec gives
//! up). CONTINUATION floods, oversized header lists, streams reset before
//! they were accepted and resets the server has to send for a client's
//! errors are bounded by the codec itself (`max_header_list_size`,
//! `max_pending_accept_reset_streams`, `max_local_error_reset_streams`).
//!
//! With `http_reject_path_with_fragment` (Envoy's default) the guard also
//! decodes the request header blocks (HEADERS and CONTINUATION frames, with
//! an HPACK decoder of its own): a `:path` holding '#' is noted in
//! [`Fragments`], since the codec's `Uri` silently drops the fragment, and
//! the request is answered 400 as Envoy does.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use ferry_model::http_protocol::Http2Options;

use crate::stats::{Counter, Stats};

const PREFACE_LEN: usize = 24;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

/// The `:path`s (cut at '#') of requests whose path held a fragment, in
/// arrival order; the request of the same path takes its mark.
#[derive(Debug, Clone, Default)]
pub struct Fragments(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

/// On a request whose HTTP/2 `:path` held a fragment.
#[derive(Debug, Clone, Copy)]
pub struct PathFragment;

/// The most noted paths kept: requests the codec refused never take theirs.
const MAX_NOTED: usize = 64;

impl Fragments {
    fn note(&self, path: &str) {
        let cut = path.split('#').next().unwrap_or_default().to_string();
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_NOTED {
            q.pop_front();
        }
        q.push_back(cut);
    }

    /// Marks `req` with [`PathFragment`] when its path was noted.
    pub fn mark<B>(&self, req: &mut http::Request<B>) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.is_empty() {
            return;
        }
        let path = req.uri().path_and_query().map_or("", |p| p.as_str());
        if let Some(i) = q.iter().position(|p| p == path) {
            q.remove(i);
            drop(q);
            req.extensions_mut().insert(PathFragment);
        }
    }
}

/// HEADERS flags that shape its payload.
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;
const END_HEADERS: u8 = 0x4;

/// Decodes the inbound header blocks to find `:path`s with a fragment: the
/// frames are followed as they pass, HEADERS and CONTINUATION payloads
/// gathered into a block, and each complete block decoded with an HPACK
/// decoder of its own (every block, so its dynamic table stays in step with
/// the codec's). Only the decoder's table lives between requests, as small
/// as what the client indexes; the block buffers are given back after each
/// request.
struct FragmentWatch {
    fragments: Fragments,
    hpack: fluke_hpack::Decoder<'static>,
    /// Bytes of the preface still to pass.
    skip: usize,
    head: [u8; 9],
    have: usize,
    payload_left: usize,
    /// The current frame's kind and flags when it is a header block's.
    header_frame: Option<(u8, u8)>,
    /// The current header frame's payload as it arrives.
    payload: Vec<u8>,
    /// The header block being gathered (up to END_HEADERS).
    block: Vec<u8>,
    /// A block failed to decode: the codec refuses the connection; nothing
    /// more is decoded.
    broken: bool,
}

impl FragmentWatch {
    fn new(fragments: Fragments) -> Self {
        Self {
            fragments,
            hpack: fluke_hpack::Decoder::new(),
            skip: PREFACE_LEN,
            head: [0; 9],
            have: 0,
            payload_left: 0,
            header_frame: None,
            payload: Vec::new(),
            block: Vec::new(),
            broken: false,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.broken {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                if self.header_frame.is_some() {
                    self.payload.extend_from_slice(&data[..n]);
                }
                self.payload_left -= n;
                data = &data[n..];
                if self.payload_left == 0 {
                    self.header_frame_done();
                }
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                self.have = 0;
                let h = self.head;
                self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.header_frame = matches!(h[3], HEADERS | CONTINUATION).then_some((h[3], h[4]));
                if self.payload_left == 0 {
                    self.header_frame_done();
                }
            }
        }
    }

    /// A header frame's payload is complete: its block fragment joins the
    /// block, which is decoded at END_HEADERS.
    fn header_frame_done(&mut self) {
        let Some((kind, flags)) = self.header_frame.take() else {
            return;
        };
        let payload = std::mem::take(&mut self.payload);
        let mut fragment = payload.as_slice();
        if kind == HEADERS {
            let pad = if flags & PADDED != 0 {
                let Some((&n, rest)) = fragment.split_first() else {
                    self.broken = true;
                    return;
                };
                fragment = rest;
                usize::from(n)
            } else {
                0
            };
            if flags & PRIORITY_FLAG != 0 {
                fragment = fragment.get(5..).unwrap_or_default();
            }
            let Some(end) = fragment.len().checked_sub(pad) else {
                self.broken = true;
                return;
            };
            fragment = &fragment[..end];
        }
        self.block.extend_from_slice(fragment);
        if flags & END_HEADERS != 0 {
            let block = std::mem::take(&mut self.block);
            let fragments = &self.fragments;
            let decoded = self.hpack.decode_with_cb(&block, |name, value| {
                if name.as_ref() == b":path" && value.contains(&b'#') {
                    fragments.note(&String::from_utf8_lossy(&value));
                }
            });
            if decoded.is_err() {
                // The codec refuses the block (COMPRESSION_ERROR) and with
                // it the connection.
                self.broken = true;
            }
        }
    }
}

/// The head of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHead {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Finds frame heads in one direction of the byte stream.
#[derive(Debug, Default)]
struct FrameScan {
    /// Bytes of the client preface still to pass.
    skip: usize,
    head: [u8; 9],
    have: usize,
    payload_left: u64,
}

impl FrameScan {
    fn scan(&mut self, mut data: &[u8], mut on_frame: impl FnMut(FrameHead)) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                self.have = 0;
                let h = &self.head;
                let head = FrameHead {
                    len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
                    kind: h[3],
                    flags: h[4],
                    stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                };
                self.payload_left = u64::from(head.len);
                on_frame(head);
            }
        }
    }
}

/// The guard's counters (Envoy's names).
#[derive(Clone, Debug)]
pub struct H2Counters {
    rx_reset: Counter,
    tx_reset: Counter,
    empty_flood: Counter,
    priority_flood: Counter,
    window_update_flood: Counter,
    control_flood: Counter,
    premature_resets: Counter,
}

impl H2Counters {
    pub fn new(stats: &Stats, premature_resets: Counter) -> Self {
        let c = |n: &str| stats.counter(&format!("http2.{n}"));
        Self {
            rx_reset: c("rx_reset"),
            tx_reset: c("tx_reset"),
            empty_flood: c("inbound_empty_frames_flood"),
            priority_flood: c("inbound_priority_frames_flood"),
            window_update_flood: c("inbound_window_update_frames_flood"),
            control_flood: c("outbound_control_flood"),
            premature_resets,
        }
    }
}

/// Which protection closed the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    EmptyFrames,
    Priority,
    WindowUpdate,
    Resets,
    Control,
}

/// The state of the protections of one connection, without I/O.
#[derive(Debug)]
struct Floods {
    limits: Http2Options,
    consecutive_empty: u32,
    priority: u64,
    window_updates: u64,
    /// Streams whose response headers were sent.
    answered: u64,
    last_answered: u32,
    data_sent: u64,
    control_pending: u64,
    reset_tokens: f64,
    refilled: Instant,
}

impl Floods {
    fn new(limits: Http2Options) -> Self {
        Self {
            reset_tokens: f64::from(limits.stream_reset_burst),
            limits,
            consecutive_empty: 0,
            priority: 0,
            window_updates: 0,
            answered: 0,
            last_answered: 0,
            data_sent: 0,
            control_pending: 0,
            refilled: Instant::now(),
        }
    }

    /// A frame from the client.
    fn inbound(&mut self, f: FrameHead, now: Instant, c: &H2Counters) -> Result<(), Flood> {
        match f.kind {
            DATA | HEADERS | CONTINUATION => {
                if f.len == 0 && (f.kind == CONTINUATION || f.flags & END_STREAM == 0) {
                    self.consecutive_empty += 1;
                    if self.consecutive_empty > self.limits.max_consecutive_empty_frames {
                        return Err(Flood::EmptyFrames);
                    }
                } else {
                    self.consecutive_empty = 0;
                }
            }
            PRIORITY => {
                self.priority += 1;
                let allowed =
                    u64::from(self.limits.max_priority_frames_per_stream) * (1 + self.answered);
                if self.priority > allowed {
                    return Err(Flood::Priority);
                }
            }
            WINDOW_UPDATE => {
                self.window_updates += 1;
                let allowed = 5 + 2
                    * (self.answered
                        + u64::from(self.limits.max_window_updates_per_data_frame)
                            * self.data_sent);
                if self.window_updates > allowed {
                    return Err(Flood::WindowUpdate);
                }
            }
            RST_STREAM => {
                c.rx_reset.inc();
                let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
                self.refilled = now;
                self.reset_tokens = (self.reset_tokens
                    + elapsed * f64::from(self.limits.stream_reset_rate))
                .min(f64::from(self.limits.stream_reset_burst));
                if self.reset_tokens < 1.0 {
                    return Err(Flood::Resets);
                }
                self.reset_tokens -= 1.0;
            }
            SETTINGS | PING if f.flags & ACK == 0 => {
                self.control_pending += 1;
                if self.control_pending > u64::from(self.limits.max_outbound_control_frames) {
                    return Err(Flood::Control);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A frame to the client.
    fn outbound(&mut self, f: FrameHead, c: &H2Counters) {
        match f.kind {
            DATA => self.data_sent += 1,
            HEADERS if f.stream > self.last_answered => {
                self.last_answered = f.stream;
                self.answered += 1;
            }
            RST_STREAM => c.tx_reset.inc(),
            SETTINGS | PING if f.flags & ACK != 0 => {
                self.control_pending = self.control_pending.saturating_sub(1);
            }
            _ => {}
        }
    }
}

/// An HTTP/2 downstream connection seen through the guard.
pub struct H2Guard<S> {
    inner: S,
    rx: FrameScan,
    tx: FrameScan,
    floods: Floods,
    counters: H2Counters,
    failed: Option<Flood>,
    fragments: Option<Box<FragmentWatch>>,
}

impl<S> H2Guard<S> {
    /// Notes `:path`s with a fragment in `fragments`, when given.
    pub fn watching_fragments(mut self, fragments: Option<Fragments>) -> Self {
        self.fragments = fragments.map(|f| Box::new(FragmentWatch::new(f)));
        self
    }

    pub fn new(inner: S, limits: Http2Options, counters: H2Counters) -> Self {
        Self {
            inner,
            rx: FrameScan {
                skip: PREFACE_LEN,
                ..FrameScan::default()
            },
            tx: FrameScan::default(),
            floods: Floods::new(limits),
            counters,
            failed: None,
            fragments: None,
        }
    }

    fn flood(&mut self, f: Flood) -> io::Error {
        let c = &self.counters;
        match f {
            Flood::EmptyFrames => c.empty_flood.inc(),
            Flood::Priority => c.priority_flood.inc(),
            Flood::WindowUpdate => c.window_update_flood.inc(),
            Flood::Control => c.control_flood.inc(),
            Flood::Resets => c.premature_resets.inc(),
        }
        self.failed = Some(f);
        tracing::debug!(flood = ?f, "HTTP/2 flood protection closes the connection");
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("HTTP/2 flood: {f:?}"),
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H2Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(f) = this.failed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("HTTP/2 flood: {f:?}"),
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let now = Instant::now();
        let mut flood = None;
        let (floods, counters) = (&mut this.floods, &this.counters);
        this.rx.scan(&buf.filled()[before..], |f| {
            if flood.is_none()
                && let Err(e) = floods.inbound(f, now, counters)
            {
                flood = Some(e);
            }
        });
        if let Some(f) = flood {
            // The frames that tipped it are not handed to the codec.
            buf.set_filled(before);
            return Poll::Ready(Err(this.flood(f)));
        }
        if let Some(w) = this.fragments.as_mut() {
            w.feed(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H2Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            let (floods, counters) = (&mut this.floods, &this.counters);
            this.tx.scan(&data[..n], |f| floods.outbound(f, counters));
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            let (floods, counters) = (&mut this.floods, &this.counters);
            let mut left = n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                this.tx.scan(&b[..take], |f| floods.outbound(f, counters));
                left -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn counters() -> H2Counters {
        H2Counters::new(&Stats::default(), Counter::default())
    }

    /// Runs inbound frames through fresh protections (all at `now`).
    fn inbound(limits: Http2Options, frames: &[Vec<u8>]) -> Result<(), Flood> {
        let mut scan = FrameScan {
            skip: PREFACE_LEN,
            ..FrameScan::default()
        };
        let mut floods = Floods::new(limits);
        let c = counters();
        let now = Instant::now();
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for f in frames {
            bytes.extend_from_slice(f);
        }
        let mut out = Ok(());
        // A byte at a time: heads split across reads are found all the same.
        for b in bytes.chunks(1) {
            scan.scan(b, |f| {
                if out.is_ok() {
                    out = floods.inbound(f, now, &c);
                }
            });
        }
        out
    }

    #[test]
    fn a_path_with_a_fragment_is_noted_for_its_request() {
        let fragments = Fragments::default();
        let mut w = FragmentWatch::new(fragments.clone());
        // :method GET, :scheme http, then :path and :authority as literals.
        let path = b"/a?q=1#frag";
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path);
        block.extend_from_slice(&[0x01, 1, b'x']);
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[]));
        bytes.extend(frame(HEADERS, 0x5, 1, &block));
        // Split anywhere: fed as the reads come.
        for chunk in bytes.chunks(7) {
            w.feed(chunk);
        }
        let mut other = http::Request::new(());
        *other.uri_mut() = http::Uri::from_static("/a");
        fragments.mark(&mut other);
        assert!(other.extensions().get::<PathFragment>().is_none());
        let mut req = http::Request::new(());
        *req.uri_mut() = http::Uri::from_static("/a?q=1");
        fragments.mark(&mut req);
        assert!(req.extensions().get::<PathFragment>().is_some());
    }

    #[test]
    fn padded_prioritised_and_continued_blocks_and_the_dynamic_table() {
        let fragments = Fragments::default();
        let mut w = FragmentWatch::new(fragments.clone());
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // Stream 1: :path "/b#x" indexed into the dynamic table (0x44:
        // literal with incremental indexing, name :path), in a padded,
        // prioritised HEADERS and a CONTINUATION.
        let path = b"/b#x";
        let mut block = vec![0x82, 0x86, 0x44, path.len() as u8];
        block.extend_from_slice(path);
        let mut first = vec![2u8]; // pad length
        first.extend_from_slice(&[0, 0, 0, 0, 16]); // dependency, weight
        first.extend_from_slice(&block[..3]);
        first.extend_from_slice(&[0, 0]); // padding
        bytes.extend(frame(HEADERS, PADDED | PRIORITY_FLAG, 1, &first));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &block[3..]));
        // Stream 3: the same path by its dynamic index (62).
        bytes.extend(frame(HEADERS, END_HEADERS, 3, &[0x82, 0x86, 0xbe]));
        for chunk in bytes.chunks(5) {
            w.feed(chunk);
        }
        for _ in 0..2 {
            let mut req = http::Request::new(());
            *req.uri_mut() = http::Uri::from_static("/b");
            fragments.mark(&mut req);
            assert!(req.extensions().get::<PathFragment>().is_some());
        }
        assert!(!w.broken);
    }

    #[test]
    fn empty_frames() {
        let empty = frame(DATA, 0, 1, b"");
        let l = Http2Options::default();
        assert_eq!(inbound(l.clone(), std::slice::from_ref(&empty)), Ok(()));
        assert_eq!(
            inbound(l.clone(), &[empty.clone(), empty.clone()]),
            Err(Flood::EmptyFrames)
        );
        // A frame with a payload, or END_STREAM, breaks the run.
        let full = frame(DATA, 0, 1, b"x");
        let end = frame(DATA, END_STREAM, 1, b"");
        assert_eq!(
            inbound(
                l.clone(),
                &[empty.clone(), full, empty.clone(), end, empty.clone()]
            ),
            Ok(())
        );
        let cont = frame(CONTINUATION, 0, 1, b"");
        assert_eq!(inbound(l, &[cont.clone(), cont]), Err(Flood::EmptyFrames));
    }

    #[test]
    fn priority_and_window_update_floods() {
        let l = Http2Options::default();
        let prio = frame(PRIORITY, 0, 3, &[0, 0, 0, 1, 16]);
        assert_eq!(inbound(l.clone(), &vec![prio.clone(); 100]), Ok(()));
        assert_eq!(inbound(l.clone(), &vec![prio; 101]), Err(Flood::Priority));
        let wu = frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]);
        assert_eq!(inbound(l.clone(), &vec![wu.clone(); 5]), Ok(()));
        assert_eq!(inbound(l, &vec![wu; 6]), Err(Flood::WindowUpdate));
    }

    #[test]
    fn rapid_reset_empties_the_bucket() {
        let l = Http2Options {
            stream_reset_burst: 10,
            stream_reset_rate: 1,
            ..Http2Options::default()
        };
        let rst = |id| frame(RST_STREAM, 0, id, &[0, 0, 0, 8]);
        let ten: Vec<_> = (0..10).map(|i| rst(2 * i + 1)).collect();
        assert_eq!(inbound(l.clone(), &ten), Ok(()));
        let eleven: Vec<_> = (0..11).map(|i| rst(2 * i + 1)).collect();
        assert_eq!(inbound(l.clone(), &eleven), Err(Flood::Resets));
        // The bucket refills at the rate.
        let mut floods = Floods::new(l);
        let c = counters();
        let t0 = Instant::now();
        let head = FrameHead {
            len: 4,
            kind: RST_STREAM,
            flags: 0,
            stream: 1,
        };
        for _ in 0..10 {
            floods.inbound(head, t0, &c).unwrap();
        }
        assert!(floods.inbound(head, t0, &c).is_err());
        assert!(
            floods
                .inbound(head, t0 + Duration::from_secs(2), &c)
                .is_ok()
        );
        assert_eq!(c.rx_reset.get(), 12);
    }

    #[test]
    fn control_frames_count_until_acknowledged() {
        let l = Http2Options {
            max_outbound_control_frames: 2,
            ..Http2Options::default()
        };
        let ping = frame(PING, 0, 0, &[0; 8]);
        assert_eq!(inbound(l.clone(), &vec![ping.clone(); 2]), Ok(()));
        assert_eq!(inbound(l.clone(), &vec![ping; 3]), Err(Flood::Control));
        let mut floods = Floods::new(l);
        let c = counters();
        let now = Instant::now();
        let ping = FrameHead {
            len: 8,
            kind: PING,
            flags: 0,
            stream: 0,
        };
        for _ in 0..10 {
            floods.inbound(ping, now, &c).unwrap();
            floods.outbound(FrameHead { flags: ACK, ..ping }, &c);
        }
    }
}
