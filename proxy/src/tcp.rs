//! `envoy.filters.network.tcp_proxy`: a bidirectional byte copy to an
//! endpoint of the cluster, passing half-close (FIN) through each way, closed
//! after the idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ferry_model::TcpProxy;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::access_log::connection::ConnectionLog;
use crate::run::Runtime;
use crate::stats::TcpStats;

/// What a connection carries beyond its addresses: an internal
/// connection's metadata, and the connection's filter state.
#[derive(Debug, Clone, Default)]
pub struct ConnMeta {
    /// `envoy.filters.listener.original_dst` / `waypoint`: where an
    /// ORIGINAL_DST cluster with that `metadata_key` connects instead.
    pub waypoint: Option<std::net::SocketAddr>,
    /// The connection's filter state (what it came with and what the
    /// chain's set_filter_state set): logged by `%FILTER_STATE%`, and its
    /// shared objects carried with the connection to an internal listener.
    pub filter_state: Option<Arc<ferry_model::filter_state::FilterState>>,
    /// An internal listener's own address, when it is the connection's
    /// local address (nothing restored a destination). Behind a pointer:
    /// the connection's task holds it for the connection's life.
    pub local_internal: Option<Arc<ferry_model::cluster::InternalAddr>>,
}

/// Proxies one downstream connection (from `peer`, with SNI `server_name`
/// or "") and writes its access log entry when it ends.
#[allow(clippy::too_many_arguments)] // the connection's whole context, once
pub async fn proxy<S>(
    rt: &Arc<Runtime>,
    tp: &TcpProxy,
    stats: &TcpStats,
    istio: Option<Box<IstioTcp>>,
    mut down: S,
    original_dst: std::net::SocketAddr,
    drain: &crate::drain::Drain,
    peer: std::net::SocketAddr,
    server_name: &str,
    meta: ConnMeta,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stats.downstream_cx_total.inc();
    let mut log = ConnectionLog::start(rt, &tp.access_logs, peer, original_dst, server_name);
    log.filter_state(meta.filter_state.clone());
    log.local_internal(meta.local_internal.as_deref().cloned());
    // What an internal upstream connection carries of the connection's
    // filter state (the objects it shares with upstream).
    let shared = meta
        .filter_state
        .as_deref()
        .and_then(ferry_model::filter_state::FilterState::for_upstream)
        .map(Arc::new);
    let clusters = rt.clusters.load();
    let name = match tp.total_weight() {
        0 => tp.cluster.as_str(),
        total => tp.pick_cluster(rand::random_range(0..total)),
    };
    let Some(cluster) = clusters.get(name).cloned() else {
        stats.downstream_cx_no_route.inc();
        log.flag("NC");
        return;
    };
    drop(clusters);
    log.cluster(name);
    cluster.warmed().await;
    // `hash_policy` source_ip: the same client reaches the same host
    // (ring hash, Maglev), as its HTTP requests would.
    // `original_dst_lb_config.metadata_key`: the waypoint named in the
    // connection's metadata carries it instead.
    let target = match meta.waypoint {
        Some(w) if cluster.cfg.lb.original_dst.waypoint_from_metadata => w,
        _ => original_dst,
    };
    let hash = tp
        .hash_source_ip
        .then(|| crate::lb::hash_bytes(crate::lb::ip_text(peer.ip()).as_bytes()));
    // `max_connect_attempts`: a failed connect moves on to another host
    // while there is one, as Envoy's TCP proxy does.
    let mut tried = Vec::new();
    let (pool, up, _active) = loop {
        let picked = if tried.is_empty() {
            cluster.pick_hashed(Some(target), hash)
        } else {
            cluster.pick_retry(Some(target), hash, &tried)
        };
        let Some(pool) = picked else {
            stats.downstream_cx_no_route.inc();
            log.flag("UH");
            return;
        };
        let connected = match &tp.tunneling {
            None => {
                pool.tcp_pending();
                pool.connect_carrying(shared.clone())
                    .await
                    .map(|s| (s, Some(pool.tcp_attached())))
            }
            Some(t) => {
                let authority = match &t.hostname {
                    // An internal listener's own address when nothing
                    // restored a destination, as Envoy renders it.
                    ferry_model::listener::TunnelHost::DownstreamLocalAddress => meta
                        .local_internal
                        .as_ref()
                        .map_or_else(|| original_dst.to_string(), ToString::to_string),
                    ferry_model::listener::TunnelHost::Literal(h) => h.clone(),
                };
                // Boxed: the tunnel's setup is large, and the connection's
                // task keeps the room its future needs for its whole life.
                // The tunnel's stream counts itself, as Envoy's HTTP pool
                // counts it.
                Box::pin(pool.connect_tunnel(&authority, &t.headers))
                    .await
                    .map(|s| (s, None))
            }
        };
        match connected {
            Ok((s, active)) => {
                pool.report_connect(true);
                break (pool, s, active);
            }
            Err(e) => {
                pool.report_connect(false);
                tracing::debug!(upstream.host = %pool.address, error = %e, "tcp upstream connect failed");
                tried.push(pool.address.clone());
                if tried.len() < tp.max_connect_attempts as usize {
                    continue;
                }
                log.upstream(pool.address.clone(), None);
                // Envoy's TCP proxy reports its connect attempts spent, too.
                log.flag("UF");
                log.flag("URX");
                log.failure_reason(e.transport_failure_reason());
                return;
            }
        }
    };
    log.upstream(pool.address.clone(), up.local_addr());
    // The cluster's metadata exchange, when the server took its protocol.
    let speak = cluster
        .cfg
        .metadata_exchange
        .as_deref()
        .is_some_and(|p| up.alpn() == Some(p.as_bytes()));
    let (up, upstream_peer) = if speak {
        Box::pin(crate::metadata_exchange::exchange(up, &rt.istio.local)).await
    } else {
        (crate::tls::Rewind::new(Vec::new(), up), None)
    };
    // An internal upstream's full close closes the downstream (a tunnel's
    // stream is reset), where its half-close is passed on.
    let up = crate::internal_pipe::ResetOnClose(up);
    let istio = istio.map(|m| m.series(upstream_peer.as_ref()));
    if let Some(m) = &istio {
        m.opened.fetch_add(1, Ordering::Relaxed);
    }
    // A draining connection gets the drain deadline to finish, then closes;
    // one told to close (a policy re-check denied it) closes at once. At
    // shutdown under EXIT_ON_ZERO_ACTIVE_CONNECTIONS there is no deadline:
    // the process waits for the connection to end.
    let lifetime = async {
        match tp.max_downstream_connection_duration {
            Some(max) => tokio::time::sleep(max).await,
            None => std::future::pending().await,
        }
    };
    let (rx, tx) = tokio::select! {
        r = copy(&mut down, up, tp.idle_timeout, stats) => r,
        // `max_downstream_connection_duration`: closed at this age, busy or not.
        _ = lifetime => {
            stats.max_downstream_connection_duration.inc();
            (0, 0)
        }
        _ = drain.closing() => (0, 0),
        _ = async {
            drain.signaled().await;
            if rt.exit_on_zero_active_connections && rt.inbound.is_draining() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(rt.drain_timeout).await;
        } => (0, 0),
    };
    stats.downstream_cx_rx_bytes_total.add(rx);
    stats.downstream_cx_tx_bytes_total.add(tx);
    log.bytes(rx, tx);
    if let Some(m) = &istio {
        // Istio's names are the proxy's view of the request direction:
        // received from the client, sent back to it.
        m.received.fetch_add(rx, Ordering::Relaxed);
        m.sent.fetch_add(tx, Ordering::Relaxed);
        m.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Istio's TCP metrics of one connection before its labels are settled:
/// the upstream side's metadata exchange may still name the peer.
pub struct IstioTcp {
    pub conn: crate::metrics::ConnMetrics,
    /// The destination service's host ("" when unknown).
    pub service: String,
    /// The downstream peer's exchanged metadata (inbound).
    pub peer: Option<crate::metadata_exchange::Peer>,
}

impl IstioTcp {
    /// The connection's series, the peer named by the downstream exchange
    /// or else by `upstream`'s.
    fn series(
        &self,
        upstream: Option<&crate::metadata_exchange::Peer>,
    ) -> Arc<crate::metrics::TcpSeries> {
        let set = self
            .conn
            .label_set(&self.service, self.peer.as_ref().or(upstream), "tcp");
        self.conn.metrics.tcp_series(&set)
    }
}

/// Copies both ways until both sides finished or the connection was idle
/// for `idle`. Returns (bytes from downstream, bytes to downstream).
async fn copy<S, U>(down: &mut S, up: U, idle: Option<Duration>, stats: &TcpStats) -> (u64, u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut down = Tracked {
        inner: down,
        activity: activity.clone(),
    };
    let mut up = Tracked {
        inner: up,
        activity: activity.clone(),
    };
    let copy = copy_bidirectional(&mut down, &mut up);
    match idle {
        None => copy.await.unwrap_or((0, 0)),
        Some(idle) => {
            tokio::pin!(copy);
            loop {
                let left = idle.saturating_sub(activity.since_last());
                tokio::select! {
                    r = copy.as_mut() => return r.unwrap_or((0, 0)),
                    _ = tokio::time::sleep(left) => {
                        if activity.since_last() >= idle {
                            stats.idle_timeout.inc();
                            return (0, 0);
                        }
                    }
                }
            }
        }
    }
}

/// Copies both ways, passing each side's end of stream on as a shutdown of
/// the other's write side, until both ends closed; the first error ends
/// both. What `tokio::io::copy_bidirectional` does, without its two 8 KiB
/// buffers held for the connection's life: each read lands in a buffer on
/// the stack and is written on at once, and only what the writer could not
/// take yet is kept on the heap until it is written. An idle proxied
/// connection holds no buffer.
pub(crate) async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Half::default();
    let mut b_to_a = Half::default();
    std::future::poll_fn(|cx| {
        let sent = a_to_b.poll_copy(cx, &mut *a, &mut *b)?;
        let received = b_to_a.poll_copy(cx, &mut *b, &mut *a)?;
        let sent = std::task::ready!(sent);
        let received = std::task::ready!(received);
        Poll::Ready(Ok((sent, received)))
    })
    .await
}

/// The most one read takes (tokio's copy buffer size).
const READ_CHUNK: usize = 8 * 1024;

/// One direction of a proxied connection.
#[derive(Default)]
struct Half {
    /// Read and not yet written: empty (no allocation) while the writer
    /// keeps up.
    unwritten: Vec<u8>,
    /// How much of `unwritten` was written since.
    written: usize,
    read_done: bool,
    need_flush: bool,
    shut_down: bool,
    amount: u64,
}

impl Half {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            // What the writer could not take before goes first.
            while self.written < self.unwritten.len() {
                let n = std::task::ready!(
                    Pin::new(&mut *w).poll_write(cx, &self.unwritten[self.written..])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.amount += n as u64;
            }
            if !self.unwritten.is_empty() {
                self.unwritten = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                if self.need_flush {
                    std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.need_flush = false;
                }
                if !self.shut_down {
                    std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(self.amount));
            }
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    // Nothing more to read for now: what was written goes out.
                    if self.need_flush {
                        std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(r) => r?,
            }
            let data = buf.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            self.need_flush = true;
            let mut off = 0;
            while off < data.len() {
                match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        off += n;
                        self.amount += n as u64;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The writer wakes this task when it can take more.
                        self.unwritten = data[off..].to_vec();
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// The time of the last byte seen either way.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn since_last(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Through writers that take 64 bytes at a time (so most writes are
    /// partial or pending), both directions arrive whole and in order, and
    /// each side's end of stream reaches the other.
    #[tokio::test]
    async fn copies_both_ways_under_back_pressure_and_passes_half_close() {
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let client = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        // Half-closed by the client, the server still answers.
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(client.await.unwrap(), b"bye");
        assert_eq!(copy.await.unwrap().unwrap(), (100_000, 3));
    }

    /// An idle proxied connection holds no copy buffer: a direction's state
    /// is a few words, and the whole copy is far from tokio's two 8 KiB
    /// buffers.
    #[test]
    fn copy_state_is_small() {
        assert!(std::mem::size_of::<Half>() <= 64);
        type S = tokio::io::DuplexStream;
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let (mut a, mut b) = tokio::io::duplex(1);
        let f = copy_bidirectional::<S, S>(&mut a, &mut b);
        assert!(size(&f) <= 256, "{}", size(&f));
    }
}
