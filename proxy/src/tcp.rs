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

/// Proxies one downstream connection (from `peer`, with SNI `server_name`
/// or "") and writes its access log entry when it ends.
#[allow(clippy::too_many_arguments)] // the connection's whole context, once
pub async fn proxy<S>(
    rt: &Arc<Runtime>,
    tp: &TcpProxy,
    stats: &TcpStats,
    istio: Option<Arc<crate::metrics::TcpSeries>>,
    mut down: S,
    original_dst: std::net::SocketAddr,
    drain: &crate::drain::Drain,
    peer: std::net::SocketAddr,
    server_name: &str,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stats.downstream_cx_total.inc();
    let mut log = ConnectionLog::start(rt, &tp.access_logs, peer, original_dst, server_name);
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
    let hash = tp
        .hash_source_ip
        .then(|| crate::lb::hash_bytes(crate::lb::ip_text(peer.ip()).as_bytes()));
    // `max_connect_attempts`: a failed connect moves on to another host
    // while there is one, as Envoy's TCP proxy does.
    let mut tried = Vec::new();
    let (pool, up) = loop {
        let picked = if tried.is_empty() {
            cluster.pick_hashed(Some(original_dst), hash)
        } else {
            cluster.pick_retry(Some(original_dst), hash, &tried)
        };
        let Some(pool) = picked else {
            stats.downstream_cx_no_route.inc();
            log.flag("UH");
            return;
        };
        match pool.connect().await {
            Ok(s) => {
                pool.report_connect(true);
                break (pool, s);
            }
            Err(e) => {
                pool.report_connect(false);
                tracing::debug!(upstream.host = %pool.address, error = %e, "tcp upstream connect failed");
                tried.push(pool.address);
                if tried.len() < tp.max_connect_attempts as usize {
                    continue;
                }
                log.upstream(pool.address, None);
                // Envoy's TCP proxy reports its connect attempts spent, too.
                log.flag("UF");
                log.flag("URX");
                log.failure_reason(e.transport_failure_reason());
                return;
            }
        }
    };
    log.upstream(pool.address, up.local_addr());
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
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
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
