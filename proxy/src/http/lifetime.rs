//! How long a downstream HTTP connection lives, as Envoy's connection
//! manager decides it: `common_http_protocol_options.idle_timeout` (no
//! stream for that long closes it), `max_connection_duration` (with its
//! jitter) and `max_requests_per_connection` (each starts a drain), and the
//! streams the connection carries, counted from a request's arrival to its
//! response's last byte (or the client's reset, counted as Envoy's
//! `downstream_rq_rx_reset`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use crate::stats::Counter;

/// The streams of one connection and the drains they ask for.
#[derive(Debug)]
pub struct Lifetime {
    active: AtomicUsize,
    requests: AtomicU32,
    drain_asked: AtomicBool,
    /// When the connection started: `last_end` counts from it.
    born: tokio::time::Instant,
    /// When the last stream ended, in nanoseconds after `born` (0: none has).
    last_end: AtomicU64,
    /// Notified when no stream is left.
    idle: Notify,
    /// Notified when a drain is asked for.
    asked: Notify,
}

impl Default for Lifetime {
    fn default() -> Self {
        Self {
            active: AtomicUsize::new(0),
            requests: AtomicU32::new(0),
            drain_asked: AtomicBool::new(false),
            born: tokio::time::Instant::now(),
            last_end: AtomicU64::new(0),
            idle: Notify::new(),
            asked: Notify::new(),
        }
    }
}

impl Lifetime {
    /// A request arrived; its stream lasts as long as the returned guard.
    /// Also returns how many requests the connection has carried, this one
    /// included.
    pub fn stream_started(self: &Arc<Self>, rx_reset: Counter) -> (StreamGuard, u32) {
        self.active.fetch_add(1, Ordering::AcqRel);
        let n = self
            .requests
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let guard = StreamGuard {
            life: self.clone(),
            rx_reset,
            completed: false,
        };
        (guard, n)
    }

    /// A terminated CONNECT's tunnel, which outlives its response: the
    /// connection is not idle while the returned guard lives.
    pub fn tunnel(self: &Arc<Self>) -> TunnelGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        TunnelGuard { life: self.clone() }
    }

    /// `max_requests_per_connection` was reached: the connection drains.
    pub fn ask_drain(&self) {
        self.drain_asked.store(true, Ordering::Release);
        self.asked.notify_waiters();
    }

    /// Resolves once a drain was asked for.
    pub async fn drain_asked(&self) {
        loop {
            let asked = self.asked.notified();
            if self.drain_asked.load(Ordering::Acquire) {
                return;
            }
            asked.await;
        }
    }

    /// A stream ended.
    fn stream_ended(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let after = self.born.elapsed().as_nanos();
            self.last_end.store(
                u64::try_from(after).unwrap_or(u64::MAX).max(1),
                Ordering::Release,
            );
            self.idle.notify_waiters();
        }
    }

    /// When the last stream ended, if one has.
    fn last_end(&self) -> Option<tokio::time::Instant> {
        match self.last_end.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.born + Duration::from_nanos(n)),
        }
    }

    /// Resolves once the connection has carried no stream for `idle`
    /// (never for `None`).
    ///
    /// One timer, looked at when it fires and set again from when the last
    /// stream ended, rather than a timer started again at every stream's
    /// end and a wake-up at every stream's start and end: a keep-alive
    /// connection's requests cost the idle timer nothing.
    ///
    /// (Both are `idle_from`'s own future, not wrapped in another: every
    /// connection keeps one while it lives.)
    pub fn idle_for(&self, idle: Option<Duration>) -> impl Future<Output = ()> + Send + '_ {
        self.idle_from(idle, false)
    }

    /// The same, counted from the last stream's end when one has ended:
    /// a watcher made again (a parked connection's) counts from the same
    /// moment as the one before it.
    pub fn idle_since_last_stream(
        &self,
        idle: Option<Duration>,
    ) -> impl Future<Output = ()> + Send + '_ {
        self.idle_from(idle, true)
    }

    async fn idle_from(&self, idle: Option<Duration>, since_last_stream: bool) {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        if idle.is_zero() {
            loop {
                let ended = self.idle.notified();
                if self.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                ended.await;
            }
        }
        let from = match self.last_end() {
            Some(end) if since_last_stream => end,
            _ => tokio::time::Instant::now(),
        };
        let mut at = from + idle;
        loop {
            tokio::time::sleep_until(at).await;
            let now = tokio::time::Instant::now();
            if self.active.load(Ordering::Acquire) > 0 {
                // Looked at again in `idle`, or from the stream's end then.
                at = now + idle;
                continue;
            }
            match self.last_end() {
                Some(end) if end + idle > now => at = end + idle,
                _ => return,
            }
        }
    }
}

/// One stream in flight. Dropped before [`StreamGuard::complete`] (or
/// before its response body ended), the client went away mid-stream.
#[derive(Debug)]
pub struct StreamGuard {
    life: Arc<Lifetime>,
    rx_reset: Counter,
    completed: bool,
}

impl StreamGuard {
    fn complete(&mut self) {
        self.completed = true;
    }

    /// The stream ends at the server's word (a refusal), not the client's.
    pub fn end(mut self) {
        self.complete();
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.completed {
            self.rx_reset.inc();
        }
        self.life.stream_ended();
    }
}

/// A tunnel in flight (see [`Lifetime::tunnel`]).
#[derive(Debug)]
pub struct TunnelGuard {
    life: Arc<Lifetime>,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.life.stream_ended();
    }
}

/// A response body that ends its stream when it ends (or is dropped).
pub struct Tracked<B> {
    inner: B,
    stream: Option<StreamGuard>,
}

impl<B: Body> Tracked<B> {
    pub fn new(inner: B, mut stream: StreamGuard) -> Self {
        // hyper never polls a body that is already done (a local reply
        // without a body, a HEAD response).
        if inner.is_end_stream() {
            stream.complete();
        }
        Self {
            inner,
            stream: Some(stream),
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        // The stream's guard counts the reset unless the body was done.
        drop(self.stream.take());
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let done = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if done && let Some(mut s) = this.stream.take() {
            s.complete();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_stream() {
        let life = Arc::new(Lifetime::default());
        let start = tokio::time::Instant::now();
        let (guard, n) = life.stream_started(Counter::default());
        assert_eq!(n, 1);
        let l = life.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(guard);
            drop(l);
        });
        life.idle_for(Some(Duration::from_secs(10))).await;
        assert_eq!(start.elapsed(), Duration::from_secs(40));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_of_many_streams() {
        let life = Arc::new(Lifetime::default());
        let start = tokio::time::Instant::now();
        let l = life.clone();
        tokio::spawn(async move {
            // Short requests every 3 s for 25 s, then a tunnel open 12 s.
            for _ in 0..9 {
                let (g, _) = l.stream_started(Counter::default());
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(g);
                tokio::time::sleep(Duration::from_millis(2900)).await;
            }
            let t = l.tunnel();
            tokio::time::sleep(Duration::from_secs(12)).await;
            drop(t);
        });
        life.idle_for(Some(Duration::from_secs(5))).await;
        // The tunnel closed at 27 + 12 = 39 s.
        assert_eq!(start.elapsed(), Duration::from_secs(44));
        // No stream at all: idle from the start.
        let fresh = Lifetime::default();
        let start = tokio::time::Instant::now();
        fresh.idle_for(Some(Duration::from_secs(5))).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Zero: as soon as no stream is left.
        let (g, _) = life.stream_started(Counter::default());
        let l = life.clone();
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(g);
            drop(l);
        });
        life.idle_for(Some(Duration::ZERO)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    /// A watcher made again after the last stream ended (a parked
    /// connection's) counts from that end; `idle_for` counts from its own
    /// start.
    #[tokio::test(start_paused = true)]
    async fn a_watcher_made_again_counts_from_the_last_stream() {
        let life = Arc::new(Lifetime::default());
        let (g, _) = life.stream_started(Counter::default());
        drop(g);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let start = tokio::time::Instant::now();
        life.idle_since_last_stream(Some(Duration::from_secs(5)))
            .await;
        // (The timer wheel rounds up to its next millisecond.)
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took <= Duration::from_millis(2001),
            "{took:?}"
        );
        let start = tokio::time::Instant::now();
        life.idle_for(Some(Duration::from_secs(5))).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Without a stream yet, both count from their start.
        let fresh = Lifetime::default();
        let start = tokio::time::Instant::now();
        fresh
            .idle_since_last_stream(Some(Duration::from_secs(5)))
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn resets_are_streams_dropped_unfinished() {
        let life = Arc::new(Lifetime::default());
        let resets = Counter::default();
        let (guard, _) = life.stream_started(resets.clone());
        drop(guard);
        assert_eq!(resets.get(), 1);
        let (guard, n) = life.stream_started(resets.clone());
        assert_eq!(n, 2);
        let body = Tracked::new(http_body_util::Full::new(Bytes::from_static(b"x")), guard);
        let collected = http_body_util::BodyExt::collect(body).await;
        assert!(collected.is_ok());
        assert_eq!(resets.get(), 1, "a body read to its end is no reset");
        assert_eq!(life.active.load(Ordering::Acquire), 0);
    }
}
