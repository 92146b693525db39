//! An endpoint's idle HTTP/1.1 connections, and the task that drives each
//! upstream HTTP/1.1 connection through its life.
//!
//! While a connection carries requests, hyper's client codec drives it; the
//! codec's read and write buffers (8 KiB each) and its request channel (a
//! 10 KiB block) last as long as the codec. A connection that has waited in
//! its endpoint's pool for [`PARK_AFTER`] is *parked*: its task takes the
//! codec apart and keeps only the socket, watched for the server's close. The
//! pool hands a parked connection out as it does a live one, and a new codec
//! is made on the socket then, which costs no I/O. A sidecar keeps pooled
//! connections to every endpoint it talked to; parked, each holds its socket,
//! a task of a few hundred bytes (`a_parked_connection_keeps_a_small_task`)
//! and its pool entry: under 1 KiB instead of about 36 KiB.
//!
//! A connection opened for an upgrade (WebSocket, CONNECT) keeps its codec
//! for life: hyper hands the upgraded socket over only from a codec that
//! never parks.

use crate::cluster::{ActiveCx, ClusterShared, EndpointPool, Slot, Use};
use crate::http::body::UpstreamBody;
use crate::tls::UpstreamIo;
use futures_util::task::AtomicWaker;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

/// How long a connection waits in the pool before it is parked: long enough
/// that a connection in steady use never parks (its task looks once per
/// period), short enough that idle ones soon hold only their socket.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// Bound on idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 256;

/// A connection's codec on hyper's side.
pub(crate) type Codec = http1::Connection<TokioIo<UpstreamIo>, UpstreamBody>;

/// A connection as the pool hands it out.
pub(crate) enum Checkout {
    /// Its codec still runs: requests go to this sender.
    Live(http1::SendRequest<UpstreamBody>),
    /// Parked: a codec is to be made on the socket.
    Parked(Parked),
}

/// A connection out of the pool, and what the pool knew of it.
pub(crate) struct Lease {
    pub conn: Checkout,
    pub id: u64,
    pub used: Use,
    /// The connection's local address (`%UPSTREAM_LOCAL_ADDRESS%`).
    pub local: Option<SocketAddr>,
}

/// What a connection holds while it is open, live or parked: its breaker
/// slot and its place in `upstream_cx_active`. Let go when it closes:
/// counted in `upstream_cx_destroy`, and requests waiting for a connection
/// are woken.
pub(crate) struct Held {
    slot: Option<Slot>,
    _active: ActiveCx,
    shared: Arc<ClusterShared>,
}

impl Held {
    pub fn new(slot: Slot, active: ActiveCx, shared: Arc<ClusterShared>) -> Self {
        Self {
            slot: Some(slot),
            _active: active,
            shared,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.breakers.stats.upstream_cx_destroy().inc();
        // Released before waking, or the woken would still find it taken.
        drop(self.slot.take());
        self.shared.breakers.freed.notify_waiters();
    }
}

/// A parked connection: its socket, and what it holds while it is open.
pub(crate) struct Parked {
    pub io: UpstreamIo,
    pub held: Held,
}

/// An endpoint's idle HTTP/1.1 connections, most recently used last.
#[derive(Default)]
pub(crate) struct IdleConns(Mutex<Vec<Idle>>);

struct Idle {
    conn: IdleConn,
    meta: Meta,
}

/// What the pool knows of an idle connection.
#[derive(Clone, Copy)]
struct Meta {
    id: u64,
    local: Option<SocketAddr>,
    since: Instant,
    used: Use,
}

enum IdleConn {
    Live(http1::SendRequest<UpstreamBody>),
    Parked(ParkedEntry),
}

/// Where a parked connection waits: shared by the pool's entry and by the
/// connection's task, which watches the socket.
#[derive(Default)]
struct ParkedSlot {
    parked: Mutex<Option<Parked>>,
    watcher: AtomicWaker,
}

impl ParkedSlot {
    /// Takes the connection out; its watching task is woken and ends.
    fn take(&self) -> Option<Parked> {
        let p = self.parked.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.watcher.wake();
        p
    }

    /// Ready once the connection was taken out (`false`) or closed (`true`):
    /// anything the server sends to a parked connection (its close, or
    /// bytes no request asked for) ends it, as hyper ends an idle one.
    fn poll_watch(&self, cx: &mut Context<'_>) -> Poll<bool> {
        self.watcher.register(cx.waker());
        let mut slot = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = slot.as_mut() else {
            return Poll::Ready(false);
        };
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        match std::pin::Pin::new(&mut p.io).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => {
                // Dropped under the lock: a checkout never sees it again.
                *slot = None;
                Poll::Ready(true)
            }
        }
    }
}

/// The pool's hold on a parked connection: let go by the pool (expired,
/// evicted, the endpoint removed), it closes the connection.
struct ParkedEntry(Arc<ParkedSlot>);

impl Drop for ParkedEntry {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

impl IdleConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Idle connections, and how many of them are parked.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        let idle = self.lock();
        let parked = idle
            .iter()
            .filter(|e| matches!(e.conn, IdleConn::Parked(_)))
            .count();
        (idle.len(), parked)
    }

    /// The most recently used connection that is still open and that
    /// `usable` accepts (given when it went idle and its use so far); the
    /// others met on the way are let go.
    pub fn checkout(&self, usable: impl Fn(Instant, Use) -> bool) -> Option<Lease> {
        let mut idle = self.lock();
        while let Some(e) = idle.pop() {
            let m = e.meta;
            if !usable(m.since, m.used) {
                continue;
            }
            let conn = match e.conn {
                IdleConn::Live(s) if s.is_ready() => Checkout::Live(s),
                IdleConn::Live(_) => continue,
                IdleConn::Parked(ref p) => match p.0.take() {
                    Some(parked) => Checkout::Parked(parked),
                    None => continue,
                },
            };
            return Some(Lease {
                conn,
                id: m.id,
                used: m.used,
                local: m.local,
            });
        }
        None
    }

    /// Puts a connection whose codec is ready for a request back, unless
    /// the pool is full (the connection then closes).
    pub fn put(
        &self,
        sender: http1::SendRequest<UpstreamBody>,
        id: u64,
        used: Use,
        local: Option<SocketAddr>,
    ) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn: IdleConn::Live(sender),
                meta: Meta {
                    id,
                    local,
                    since: Instant::now(),
                    used,
                },
            });
        }
    }

    /// Takes live connection `id` out if it has waited `after`; otherwise
    /// how long until it will have (`None`: it is not waiting in the pool).
    fn take_idle(
        &self,
        id: u64,
        after: Duration,
    ) -> Result<(http1::SendRequest<UpstreamBody>, Meta), Option<Duration>> {
        let mut idle = self.lock();
        let Some(at) = idle
            .iter()
            .position(|e| e.meta.id == id && matches!(e.conn, IdleConn::Live(_)))
        else {
            return Err(None);
        };
        let waited = idle[at].meta.since.elapsed();
        if waited < after {
            return Err(Some(after - waited));
        }
        match idle.remove(at) {
            Idle {
                conn: IdleConn::Live(sender),
                meta,
            } => Ok((sender, meta)),
            Idle { .. } => Err(None),
        }
    }

    /// Puts a parked connection back where the oldest wait (it is one of
    /// them), unless the pool filled up meanwhile.
    fn put_parked(&self, e: Idle) -> bool {
        let mut idle = self.lock();
        if idle.len() >= MAX_IDLE {
            return false;
        }
        idle.insert(0, e);
        true
    }

    /// Forgets connection `id`, which closed while parked.
    fn forget(&self, id: u64) {
        self.lock().retain(|e| e.meta.id != id);
    }
}

/// A new connection's number, unique in the process.
pub(crate) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A connection's task: its codec until it closes or parks, then its parked
/// socket until it closes or the pool hands it out (a new task drives it
/// then). `held` is let go when the connection closes. A connection idle for
/// the cluster's `idle_timeout` is closed, as Envoy closes it.
pub(crate) async fn drive(
    codec: Box<Codec>,
    held: Held,
    pool: Weak<EndpointPool>,
    id: u64,
    idle_timeout: Option<Duration>,
) {
    // The codec and the serving state are boxed (the codec by the caller,
    // or it would be room in the task's first state): both are freed when
    // the connection parks, and its task keeps only what watching the
    // socket takes.
    let Some((io, meta)) = Box::pin(serve(codec, &held, &pool, id, idle_timeout)).await else {
        return;
    };
    let slot = Arc::new(ParkedSlot::default());
    *slot.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Parked { io, held });
    {
        let Some(p) = pool.upgrade() else { return };
        let Some(idle) = p.h1_idle() else { return };
        let entry = Idle {
            conn: IdleConn::Parked(ParkedEntry(slot.clone())),
            meta,
        };
        if !idle.put_parked(entry) {
            return;
        }
    }
    crate::heap::released();
    let expiry = async {
        match idle_timeout {
            Some(t) => tokio::time::sleep_until((meta.since + t).into()).await,
            None => std::future::pending().await,
        }
    };
    let closed = tokio::select! {
        closed = std::future::poll_fn(|cx| slot.poll_watch(cx)) => closed,
        () = expiry => match slot.take() {
            Some(parked) => {
                parked.held.shared.breakers.stats.upstream_cx_idle_timeout().inc();
                true
            }
            None => false,
        },
    };
    if closed
        && let Some(p) = pool.upgrade()
        && let Some(idle) = p.h1_idle()
    {
        idle.forget(id);
    }
}

/// The task of a connection opened for an upgrade: its codec for life,
/// which hands an upgraded socket over.
pub(crate) async fn drive_upgradeable(codec: Codec, held: Held) {
    let _ = codec.with_upgrades().await;
    drop(held);
}

/// Drives the codec until the connection ends (`None`), or until it has
/// waited in the pool for [`PARK_AFTER`] and was taken out to be parked:
/// then its socket and what the pool knew of it.
async fn serve(
    mut codec: Box<Codec>,
    held: &Held,
    pool: &Weak<EndpointPool>,
    id: u64,
    idle_timeout: Option<Duration>,
) -> Option<(UpstreamIo, Meta)> {
    let after = idle_timeout.map_or(PARK_AFTER, |t| t.min(PARK_AFTER));
    let meta = {
        // Polled only when its timer fired, not on each of the codec's wake-ups.
        let taken = crate::http::on_wake::OnWake::new(wait_idle(pool, id, after));
        tokio::pin!(taken);
        let (sender, meta) = tokio::select! {
            r = std::future::poll_fn(|cx| codec.poll_without_shutdown(cx)) => {
                // The server closed, the connection failed, or the pool let
                // it go (too old, too many requests, the endpoint removed).
                if r.is_ok() {
                    shut(codec).await;
                }
                return None;
            }
            taken = taken.as_mut() => taken,
        };
        // The pool's sender was the only one: with it gone and no request
        // in flight, the codec ends at once, the socket unshut.
        drop(sender);
        meta
    };
    if idle_timeout.is_some_and(|t| meta.since.elapsed() >= t) {
        held.shared.breakers.stats.upstream_cx_idle_timeout().inc();
        if std::future::poll_fn(|cx| codec.poll_without_shutdown(cx))
            .await
            .is_ok()
        {
            shut(codec).await;
        }
        return None;
    }
    std::future::poll_fn(|cx| codec.poll_without_shutdown(cx))
        .await
        .ok()?;
    let parts = (*codec).into_parts();
    // Bytes no request asked for end the connection, as hyper ends it.
    if !parts.read_buf.is_empty() {
        return None;
    }
    Some((parts.io.into_inner(), meta))
}

/// Closes an ended codec's socket as hyper would have (TLS `close_notify`,
/// then FIN).
async fn shut(codec: Box<Codec>) {
    let mut io = (*codec).into_parts().io.into_inner();
    let _ = io.shutdown().await;
}

/// Resolves once connection `id` has waited in the pool for `after`, taken
/// out of it.
async fn wait_idle(
    pool: &Weak<EndpointPool>,
    id: u64,
    after: Duration,
) -> (http1::SendRequest<UpstreamBody>, Meta) {
    let mut wait = after;
    loop {
        tokio::time::sleep(wait).await;
        let Some(p) = pool.upgrade() else {
            // The endpoint is gone; its pool's drop ends the codec.
            return std::future::pending().await;
        };
        wait = match p.h1_idle().map(|idle| idle.take_idle(id, after)) {
            Some(Ok(taken)) => return taken,
            Some(Err(Some(left))) => left,
            _ => after,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parked connection keeps its task: the codec's state is boxed
    /// apart and freed when the connection parks, so the task holds only
    /// what watching the socket takes. Upper bounds (a debug build's futures
    /// are the larger).
    #[test]
    fn a_parked_connection_keeps_a_small_task() {
        let sizes = [
            (
                "drive (the task, live or parked)",
                crate::future_sizes::of5(drive),
                512,
            ),
            (
                "serve (boxed while the codec runs)",
                crate::future_sizes::of5(serve),
                1024,
            ),
        ];
        crate::future_sizes::assert_within(&sizes);
        assert!(std::mem::size_of::<Parked>() <= 96, "Parked");
    }
}
