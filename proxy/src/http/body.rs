//! Body types of the proxy: what goes upstream (the downstream body, streamed
//! or kept for replay, telling the router when it ended) and what goes
//! downstream (the upstream body under the route's deadline, or a local
//! reply).
//!
//! A request that may be retried or mirrored carries a *replay* body: the
//! first attempt streams the downstream body as it arrives while a bounded
//! copy ([`REPLAY_LIMIT`]) is kept, so a retry (or the shadow request) can
//! send it again. A body larger than the bound streams on unharmed but can no
//! longer be replayed, so that request is neither retried nor mirrored.
//!
//! A filter that read the start of the body before routing (ext_authz's
//! `with_request_body`) leaves it as a [`BufferedPrefix`] in the request's
//! extensions; both kinds of upstream body send it ahead of the rest.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use tokio::sync::{Notify, watch};

use super::stream_timers::RequestProgress;

/// The most request body kept for retries and mirroring when the route sets
/// no `request_body_buffer_limit` (Envoy bounds it by the connection's
/// buffer limit).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Why an upstream request body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("downstream body: {0}")]
    Downstream(#[source] hyper::Error),
    #[error("the request body was not kept and cannot be sent again")]
    NotReplayable,
}

/// The downstream request body on its way upstream. It signals its end, since
/// Envoy's route timeout starts once the whole request has been received.
pub struct UpstreamBody {
    kind: Kind,
    end: Option<Arc<Notify>>,
    /// The connection manager's view of the request's arrival (its
    /// `request_timeout` and `stream_idle_timeout`).
    progress: Option<Arc<RequestProgress>>,
    /// Counts what the downstream sent (streamed bodies; a replayed body
    /// counts in its shared state).
    count: Option<Arc<BodyCount>>,
}

/// What the downstream sent of a request body, for the access log
/// (`%BYTES_RECEIVED%`, `%REQUEST_DURATION%`).
#[derive(Debug, Default)]
pub struct BodyCount {
    pub bytes: std::sync::atomic::AtomicU64,
    /// When its last byte arrived.
    pub complete: std::sync::OnceLock<std::time::Instant>,
}

impl BodyCount {
    fn data(count: &Option<Arc<BodyCount>>, n: usize) {
        if let Some(c) = count {
            c.bytes
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn done(count: &Option<Arc<BodyCount>>) {
        if let Some(c) = count {
            let _ = c.complete.set(std::time::Instant::now());
        }
    }
}

/// The start of a request body a filter read before routing: sent upstream
/// ahead of what is still to come.
#[derive(Debug, Clone, Default)]
pub struct BufferedPrefix {
    pub chunks: Vec<Bytes>,
    pub trailers: Option<HeaderMap>,
    /// The whole body was read: nothing more comes from the downstream.
    pub ended: bool,
}

impl BufferedPrefix {
    fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    /// The size hint of the prefix followed by `rest`.
    fn hint(&self, rest: &Incoming) -> SizeHint {
        let n = self.len() as u64;
        if self.ended {
            return SizeHint::with_exact(n);
        }
        let r = rest.size_hint();
        let mut h = SizeHint::new();
        h.set_lower(r.lower().saturating_add(n));
        if let Some(u) = r.upper() {
            h.set_upper(u.saturating_add(n));
        }
        h
    }
}

enum Kind {
    Empty,
    Streamed(Incoming),
    /// A buffered start, then the downstream's rest (none once it ended).
    /// Boxed: few requests have one, and every request body is room in
    /// each slot of an upstream HTTP/1 connection's request channel (hyper
    /// keeps 32 per block, one or two blocks per connection): 192 bytes
    /// inline made a block 14.9 KiB, 10.5 boxed.
    Prefixed(Box<Prefixed>),
    Replay {
        shared: Arc<Mutex<ReplayState>>,
        /// Index of the next data chunk this copy sends.
        pos: usize,
        trailers_sent: bool,
        hint: SizeHint,
    },
    Full(Option<Bytes>),
}

/// A buffered start of a body, then the downstream's rest.
struct Prefixed {
    chunks: std::collections::VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
    hint: SizeHint,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, prefix: Option<BufferedPrefix>, end: Option<Arc<Notify>>) -> Self {
        let kind = match prefix {
            None => Kind::Streamed(inner),
            Some(p) => Kind::Prefixed(Box::new(Prefixed {
                hint: p.hint(&inner),
                rest: (!p.ended).then_some(inner),
                chunks: p.chunks.into(),
                trailers: p.trailers,
            })),
        };
        let body = Self {
            kind,
            end,
            count: None,
            progress: RequestProgress::current(),
        };
        if body.is_end_stream() {
            body.signal_end();
        }
        body
    }

    pub fn empty() -> Self {
        Self {
            kind: Kind::Empty,
            end: None,
            count: None,
            progress: None,
        }
    }

    /// Counts the downstream bytes this body carries.
    pub fn counted(mut self, count: Option<Arc<BodyCount>>) -> Self {
        if self.is_end_stream() {
            BodyCount::done(&count);
        }
        self.count = count;
        self
    }

    /// A body of bytes already at hand (a mirrored request's).
    pub fn full(b: Bytes) -> Self {
        Self {
            kind: Kind::Full((!b.is_empty()).then_some(b)),
            end: None,
            count: None,
            progress: None,
        }
    }

    fn signal_end(&self) {
        if let Some(n) = &self.end {
            n.notify_one();
        }
        if let Some(p) = &self.progress {
            p.ended();
        }
    }
}

/// The shared record of a downstream body that may be sent more than once.
struct ReplayState {
    incoming: Option<Incoming>,
    chunks: Vec<Bytes>,
    /// Chunks read but no longer kept (the bound was passed).
    dropped: usize,
    kept_bytes: usize,
    overflow: bool,
    failed: bool,
    complete: bool,
    trailers: Option<HeaderMap>,
    end: Option<Arc<Notify>>,
    progress: Option<Arc<RequestProgress>>,
    done_tx: watch::Sender<bool>,
    /// The most bytes kept.
    limit: usize,
    count: Option<Arc<BodyCount>>,
    /// Bytes a filter read before routing (counted once `count` is set).
    prefix_bytes: usize,
}

impl ReplayState {
    fn finish(&mut self) {
        BodyCount::done(&self.count);
        self.complete = true;
        self.incoming = None;
        if let Some(n) = self.end.take() {
            n.notify_one();
        }
        if let Some(p) = self.progress.take() {
            p.ended();
        }
        self.done_tx.send_replace(true);
    }
}

/// A downstream body kept for retries and mirrors; hands out one body per
/// attempt.
#[derive(Clone)]
pub struct Replay {
    shared: Arc<Mutex<ReplayState>>,
    done: watch::Receiver<bool>,
    hint: SizeHint,
}

impl Replay {
    /// Wraps the downstream body, keeping up to `limit` bytes of it; `end`
    /// is notified once it was received whole.
    pub fn new(
        inner: Incoming,
        prefix: Option<BufferedPrefix>,
        end: Option<Arc<Notify>>,
        limit: usize,
    ) -> Self {
        let prefix = prefix.unwrap_or_default();
        let hint = prefix.hint(&inner);
        let (done_tx, done) = watch::channel(false);
        // A buffered start is kept whatever its size: it is in memory already.
        let kept_bytes = prefix.len();
        let mut state = ReplayState {
            incoming: (!prefix.ended).then_some(inner),
            chunks: prefix.chunks,
            dropped: 0,
            kept_bytes,
            prefix_bytes: kept_bytes,
            overflow: false,
            failed: false,
            complete: false,
            trailers: prefix.trailers,
            end,
            progress: RequestProgress::current(),
            done_tx,
            limit,
            count: None,
        };
        if state.incoming.as_ref().is_none_or(|b| b.is_end_stream()) {
            state.finish();
        }
        Self {
            shared: Arc::new(Mutex::new(state)),
            done,
            hint,
        }
    }

    /// Counts the downstream bytes read into the replay.
    pub fn counted(self, count: Option<Arc<BodyCount>>) -> Self {
        {
            let mut s = self.state();
            BodyCount::data(&count, s.prefix_bytes);
            if s.complete {
                BodyCount::done(&count);
            }
            s.count = count;
        }
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether another attempt can still be sent the whole body.
    pub fn replayable(&self) -> bool {
        let s = self.state();
        !s.overflow && !s.failed
    }

    /// A body for one attempt, from the first byte.
    pub fn body(&self) -> UpstreamBody {
        UpstreamBody {
            kind: Kind::Replay {
                shared: self.shared.clone(),
                pos: 0,
                trailers_sent: false,
                hint: self.hint,
            },
            end: None,
            count: None,
            progress: None,
        }
    }

    /// A handle that does not keep the body alive: a mirror waits through it
    /// for the body to complete without delaying its release.
    pub fn watcher(&self) -> ReplayWatcher {
        ReplayWatcher {
            shared: Arc::downgrade(&self.shared),
            done: self.done.clone(),
        }
    }
}

pub struct ReplayWatcher {
    shared: Weak<Mutex<ReplayState>>,
    done: watch::Receiver<bool>,
}

impl ReplayWatcher {
    /// The whole body once it was received and kept; `None` if it was too
    /// large, failed, or the request ended first.
    pub async fn complete(mut self, within: Duration) -> Option<Bytes> {
        let wait = self.done.wait_for(|done| *done);
        match tokio::time::timeout(within, wait).await {
            Ok(Ok(_)) => {}
            _ => return None,
        }
        let shared = self.shared.upgrade()?;
        let s = shared.lock().unwrap_or_else(|p| p.into_inner());
        if s.overflow || s.failed || !s.complete {
            return None;
        }
        let mut out = bytes::BytesMut::with_capacity(s.kept_bytes);
        for c in &s.chunks {
            out.extend_from_slice(c);
        }
        Some(out.freeze())
    }
}

fn poll_replay(
    shared: &Mutex<ReplayState>,
    pos: &mut usize,
    trailers_sent: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
    if *pos < s.dropped {
        return Poll::Ready(Some(Err(BodyError::NotReplayable)));
    }
    if let Some(chunk) = s.chunks.get(*pos - s.dropped) {
        *pos += 1;
        return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
    }
    if s.complete {
        if !*trailers_sent && let Some(t) = &s.trailers {
            *trailers_sent = true;
            return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
        }
        return Poll::Ready(None);
    }
    let Some(incoming) = s.incoming.as_mut() else {
        return Poll::Ready(Some(Err(BodyError::NotReplayable)));
    };
    match Pin::new(incoming).poll_frame(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(None) => {
            s.finish();
            Poll::Ready(None)
        }
        Poll::Ready(Some(Err(e))) => {
            s.failed = true;
            s.incoming = None;
            Poll::Ready(Some(Err(BodyError::Downstream(e))))
        }
        Poll::Ready(Some(Ok(frame))) => {
            if let Some(p) = &s.progress {
                p.active();
            }
            let frame = match frame.into_data() {
                Ok(data) => {
                    BodyCount::data(&s.count, data.len());
                    *pos += 1;
                    if !s.overflow && s.kept_bytes + data.len() <= s.limit {
                        s.kept_bytes += data.len();
                        s.chunks.push(data.clone());
                    } else {
                        // Past the bound: stop keeping (and free) the copy.
                        s.overflow = true;
                        s.dropped += s.chunks.len() + 1;
                        s.chunks = Vec::new();
                        s.kept_bytes = 0;
                    }
                    Frame::data(data)
                }
                Err(frame) => {
                    if let Some(t) = frame.trailers_ref() {
                        s.trailers = Some(t.clone());
                        *trailers_sent = true;
                    }
                    frame
                }
            };
            if s.incoming.as_ref().is_some_and(|b| b.is_end_stream()) {
                s.finish();
            }
            Poll::Ready(Some(Ok(frame)))
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Replay {
                shared,
                pos,
                trailers_sent,
                ..
            } => poll_replay(shared, pos, trailers_sent, cx),
            Kind::Prefixed(p) => {
                let Prefixed {
                    chunks,
                    trailers,
                    rest,
                    ..
                } = &mut **p;
                let frame = match chunks.pop_front() {
                    Some(c) => {
                        BodyCount::data(&this.count, c.len());
                        Frame::data(c)
                    }
                    None => match trailers.take() {
                        Some(t) => Frame::trailers(t),
                        None => {
                            // The start was sent: the rest streams on.
                            this.kind = match rest.take() {
                                Some(r) => Kind::Streamed(r),
                                None => Kind::Empty,
                            };
                            if matches!(this.kind, Kind::Empty) {
                                this.signal_end();
                                this.end = None;
                                BodyCount::done(&this.count);
                                return Poll::Ready(None);
                            }
                            return Pin::new(this).poll_frame(cx);
                        }
                    },
                };
                if this.is_end_stream() {
                    this.signal_end();
                    this.end = None;
                    BodyCount::done(&this.count);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Kind::Streamed(inner) => {
                let res = Pin::new(inner).poll_frame(cx);
                if let (Poll::Ready(Some(Ok(_))), Some(p)) = (&res, &this.progress) {
                    p.active();
                }
                if let Poll::Ready(Some(Ok(f))) = &res
                    && let Some(d) = f.data_ref()
                {
                    BodyCount::data(&this.count, d.len());
                }
                let ended = match &res {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => this.is_end_stream(),
                    _ => false,
                };
                if ended {
                    this.signal_end();
                    this.end = None;
                    BodyCount::done(&this.count);
                }
                res.map_err(BodyError::Downstream)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Streamed(b) => b.is_end_stream(),
            Kind::Prefixed(p) => {
                let Prefixed {
                    chunks,
                    trailers,
                    rest,
                    ..
                } = &**p;
                chunks.is_empty()
                    && trailers.is_none()
                    && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
            Kind::Replay {
                shared,
                pos,
                trailers_sent,
                ..
            } => {
                let s = shared.lock().unwrap_or_else(|p| p.into_inner());
                s.complete
                    && *pos >= s.dropped + s.chunks.len()
                    && (*trailers_sent || s.trailers.is_none())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Streamed(b) => b.size_hint(),
            Kind::Prefixed(p) => p.hint,
            Kind::Replay { hint, .. } => *hint,
        }
    }
}

/// The upstream response body on its way downstream. The route timeout
/// covers the whole response, as in Envoy: a body still arriving at the
/// deadline is cut (the downstream stream is reset).
pub struct DeadlineBody {
    inner: Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The stream idle timeout, restarted by every frame.
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// The upstream HTTP/2 stream's place on its connection, held until
    /// the body is done with.
    _stream: Option<crate::cluster::H2Stream>,
}

/// The response ran out of the route timeout while its body was streaming.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error("upstream response: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("upstream request timeout while streaming the response")]
    Timeout,
    #[error("stream idle timeout while streaming the response")]
    Idle,
    #[error("compressing the response: {0}")]
    Compress(#[source] std::io::Error),
}

impl DeadlineBody {
    pub fn new(
        inner: Incoming,
        deadline: Option<tokio::time::Instant>,
        idle: Option<Duration>,
        stream: Option<crate::cluster::H2Stream>,
    ) -> Self {
        Self {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle: idle.map(|t| (t, Box::pin(tokio::time::sleep(t)))),
            _stream: stream,
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_frame(cx) {
            if let Some((t, sleep)) = self.idle.as_mut() {
                sleep.as_mut().reset(tokio::time::Instant::now() + *t);
            }
            return Poll::Ready(r.map(|f| f.map_err(ResponseBodyError::Upstream)));
        }
        if let Some((_, sleep)) = self.idle.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            self.idle = None;
            return Poll::Ready(Some(Err(ResponseBodyError::Idle)));
        }
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            self.deadline = None;
            return Poll::Ready(Some(Err(ResponseBodyError::Timeout)));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body for the downstream: streamed from upstream or generated.
pub type ResponseBody = Either<DeadlineBody, Either<Full<Bytes>, Empty<Bytes>>>;

pub fn full(body: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Either::Left(Full::new(body.into())))
}

pub fn empty() -> ResponseBody {
    Either::Right(Either::Right(Empty::new()))
}

#[cfg(test)]
mod tests {
    /// A request's body is room in every slot of an upstream HTTP/1
    /// connection's request channel (hyper's dispatch: 32 slots a block),
    /// for the connection's life. Upper bound, debug and release.
    #[test]
    fn an_upstream_body_is_small() {
        let size = std::mem::size_of::<super::UpstreamBody>();
        assert!(size <= 96, "UpstreamBody: {size} bytes, more than 96");
    }
}
