//! The cluster manager: per-cluster endpoint choice and per-endpoint upstream
//! connection pools (HTTP/1.1 keep-alive reuse, one multiplexed HTTP/2
//! connection).
//!
//! A request handed to a reused HTTP/1.1 connection that the server closed
//! while it sat idle comes back from hyper unsent; it is then sent again on
//! another connection. A bodiless idempotent request that was already written
//! when the server closed the reused connection is sent again too. This closes
//! the keep-alive race that otherwise shows up as sporadic 503s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ferry_model::{Cluster, ClusterKind, Snapshot};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::http::body::UpstreamBody;
use crate::stats::{ClusterStats, Stats};

/// Why an upstream request failed, with what Envoy reports for it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    )]
    ConnectFailure(#[source] std::io::Error),
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
    )]
    ConnectTimeout,
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    )]
    Reset(#[source] hyper::Error),
    /// The endpoint must be reached over TLS, which this data path does not
    /// originate yet: refusing beats sending plaintext where TLS was asked.
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: TLS origination not supported"
    )]
    TlsUnsupported,
}

impl UpstreamError {
    /// Envoy's response flag for the access log.
    pub fn response_flag(&self) -> &'static str {
        match self {
            UpstreamError::NoHealthyUpstream => "UH",
            UpstreamError::ConnectFailure(_)
            | UpstreamError::ConnectTimeout
            | UpstreamError::TlsUnsupported => "UF",
            UpstreamError::Reset(_) => "UC",
        }
    }
}

/// The runtime side of every cluster in a snapshot.
#[derive(Default)]
pub struct ClusterManager {
    clusters: HashMap<String, Arc<ClusterRt>>,
}

impl ClusterManager {
    /// Builds the runtime for `snapshot`. Unchanged clusters are kept as they
    /// are; a cluster whose endpoints alone changed keeps the pools (and so
    /// the connections) of the endpoints still there.
    pub fn build(snapshot: &Snapshot, previous: Option<&ClusterManager>, stats: &Stats) -> Self {
        let mut clusters = HashMap::with_capacity(snapshot.clusters.len());
        for (name, cfg) in &snapshot.clusters {
            let prev = previous.and_then(|p| p.clusters.get(name));
            let rt = match prev {
                Some(p)
                    if Arc::ptr_eq(&p.cfg, cfg) || format!("{:?}", p.cfg) == format!("{cfg:?}") =>
                {
                    p.clone()
                }
                Some(p) if same_except_endpoints(&p.cfg, cfg) => {
                    Arc::new(ClusterRt::new(cfg.clone(), stats, Some(p)))
                }
                _ => {
                    let rt = Arc::new(ClusterRt::new(cfg.clone(), stats, None));
                    rt.start_dns();
                    rt
                }
            };
            clusters.insert(name.clone(), rt);
        }
        Self { clusters }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ClusterRt>> {
        self.clusters.get(name)
    }
}

/// Whether an endpoint with this `envoy.transport_socket_match` metadata is
/// reached over TLS: the first transport socket match whose criteria it
/// carries decides, else the cluster's own transport socket.
fn uses_tls(c: &Cluster, metadata: &[(String, String)]) -> bool {
    c.transport_socket_matches
        .iter()
        .find(|m| m.criteria.iter().all(|kv| metadata.contains(kv)))
        .map_or(c.tls.is_some(), |m| m.tls.is_some())
}

/// Whether two cluster configurations differ at most in their endpoints.
fn same_except_endpoints(a: &Cluster, b: &Cluster) -> bool {
    let is_fixed = |c: &Cluster| {
        matches!(
            c.kind,
            ClusterKind::Static(_) | ClusterKind::BlackHole | ClusterKind::Eds { .. }
        )
    };
    if !is_fixed(a) || !is_fixed(b) {
        return false;
    }
    let strip = |c: &Cluster| {
        let mut c = c.clone();
        c.kind = ClusterKind::BlackHole;
        format!("{c:?}")
    };
    strip(a) == strip(b)
}

pub struct ClusterRt {
    pub cfg: Arc<Cluster>,
    pub stats: ClusterStats,
    rr: AtomicUsize,
    /// Pools of the fixed endpoints (STATIC), in endpoint order.
    fixed: Vec<Arc<EndpointPool>>,
    /// Pools of resolved addresses (STRICT_DNS).
    resolved: ArcSwap<Vec<Arc<EndpointPool>>>,
    /// Pools created on demand for original destinations (ORIGINAL_DST).
    dynamic: Mutex<HashMap<SocketAddr, Arc<EndpointPool>>>,
}

impl ClusterRt {
    /// Starts DNS refresh for a STRICT_DNS cluster; it stops with the cluster.
    fn start_dns(self: &Arc<Self>) {
        let ClusterKind::StrictDns(hosts) = &self.cfg.kind else {
            return;
        };
        let hosts = hosts.clone();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let mut addrs = Vec::new();
                for h in &hosts {
                    match tokio::net::lookup_host((h.host.as_str(), h.port)).await {
                        Ok(it) => addrs.extend(it),
                        Err(e) => {
                            tracing::warn!(dns.host = %h.host, error = %e, "DNS resolution failed")
                        }
                    }
                }
                let Some(c) = weak.upgrade() else { return };
                if !addrs.is_empty() || c.resolved.load().is_empty() {
                    let old = c.resolved.load_full();
                    let pools = addrs
                        .iter()
                        .map(|a| {
                            old.iter()
                                .find(|p| p.address == *a)
                                .cloned()
                                .unwrap_or_else(|| Arc::new(EndpointPool::new(*a, &c)))
                        })
                        .collect();
                    c.resolved.store(Arc::new(pools));
                }
                drop(c);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }

    fn new(cfg: Arc<Cluster>, stats: &Stats, previous: Option<&ClusterRt>) -> Self {
        let mut rt = Self {
            stats: ClusterStats::new(stats, &cfg.name),
            rr: AtomicUsize::new(0),
            fixed: Vec::new(),
            resolved: ArcSwap::from_pointee(Vec::new()),
            dynamic: Mutex::new(HashMap::new()),
            cfg,
        };
        if let ClusterKind::Static(eps) = &rt.cfg.kind {
            // Weights become repetitions so round robin honours them.
            let mut fixed = Vec::new();
            for e in eps {
                let kept =
                    previous.and_then(|p| p.fixed.iter().find(|x| x.address == e.address).cloned());
                let pool = kept
                    .filter(|p| p.tls == uses_tls(&rt.cfg, &e.transport_socket_match))
                    .unwrap_or_else(|| {
                        Arc::new(EndpointPool::with_metadata(
                            e.address,
                            &rt,
                            &e.transport_socket_match,
                        ))
                    });
                for _ in 0..e.weight.clamp(1, 128) {
                    fixed.push(pool.clone());
                }
            }
            rt.fixed = fixed;
        }
        rt
    }

    /// Chooses the endpoint for a request or connection. `original_dst` is the
    /// downstream connection's original destination (for ORIGINAL_DST).
    pub fn pick(&self, original_dst: Option<SocketAddr>) -> Option<Arc<EndpointPool>> {
        match &self.cfg.kind {
            ClusterKind::Static(_) => self.round_robin(&self.fixed),
            ClusterKind::StrictDns(_) => self.round_robin(&self.resolved.load()),
            ClusterKind::OriginalDst => {
                let dst = original_dst?;
                let mut m = self.dynamic.lock().unwrap_or_else(|p| p.into_inner());
                if m.len() > 1024 {
                    // Forget pools nobody holds any more (Envoy's cleanup_interval).
                    m.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_empty());
                }
                Some(
                    m.entry(dst)
                        .or_insert_with(|| Arc::new(EndpointPool::new(dst, self)))
                        .clone(),
                )
            }
            // An EDS cluster whose assignment never arrived has no endpoints.
            ClusterKind::BlackHole | ClusterKind::Eds { .. } => None,
        }
    }

    fn round_robin(&self, pools: &[Arc<EndpointPool>]) -> Option<Arc<EndpointPool>> {
        if pools.is_empty() {
            return None;
        }
        let i = self.rr.fetch_add(1, Ordering::Relaxed) % pools.len();
        pools.get(i).cloned()
    }
}

/// A copy of a request that can be sent again as it is: an idempotent method
/// and no body (a streamed body cannot be read twice).
fn replayable(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    use http_body::Body as _;
    if !req.method().is_idempotent() || !req.body().is_end_stream() {
        return None;
    }
    let mut again = Request::new(UpstreamBody::empty());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    // Carries hyper's record of the original header case.
    *again.extensions_mut() = req.extensions().clone();
    Some(again)
}

/// Whether the connection went away before a response arrived: closed, reset
/// or broken. A reused connection failing this way was closed by the server
/// in the keep-alive race, not by the request.
fn closed_before_response(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    e.is_incomplete_message()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted))
}

struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// Connections to one endpoint address.
pub struct EndpointPool {
    pub address: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    bind_source: Option<std::net::IpAddr>,
    /// The cluster's transport for this endpoint is TLS.
    tls: bool,
    stats: ClusterStats,
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    h2_connecting: tokio::sync::Mutex<()>,
}

/// Bound on idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 256;

impl EndpointPool {
    fn new(address: SocketAddr, cluster: &ClusterRt) -> Self {
        Self::with_metadata(address, cluster, &[])
    }

    fn with_metadata(
        address: SocketAddr,
        cluster: &ClusterRt,
        metadata: &[(String, String)],
    ) -> Self {
        Self {
            tls: uses_tls(&cluster.cfg, metadata),
            address,
            connect_timeout: cluster.cfg.connect_timeout,
            idle_timeout: cluster.cfg.idle_timeout,
            bind_source: cluster.cfg.bind_source,
            stats: cluster.stats.clone(),
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn is_empty(&self) -> bool {
        self.idle.lock().map(|v| v.is_empty()).unwrap_or(true)
    }

    /// Opens a TCP connection to the endpoint within the connect timeout.
    pub async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        if self.tls {
            self.stats.upstream_cx_connect_fail.inc();
            return Err(UpstreamError::TlsUnsupported);
        }
        self.stats.upstream_cx_total.inc();
        let connect = async {
            match self.bind_source {
                None => TcpStream::connect(self.address).await,
                Some(src) => {
                    let sock = if self.address.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    sock.bind(std::net::SocketAddr::new(src, 0))?;
                    sock.connect(self.address).await
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => {
                self.stats.upstream_cx_connect_fail.inc();
                Err(UpstreamError::ConnectFailure(e))
            }
            Err(_) => {
                self.stats.upstream_cx_connect_fail.inc();
                self.stats.upstream_cx_connect_timeout.inc();
                Err(UpstreamError::ConnectTimeout)
            }
        }
    }

    fn checkout_idle(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(entry) = idle.pop() {
            let expired = self
                .idle_timeout
                .is_some_and(|t| entry.since.elapsed() >= t);
            if !expired && entry.sender.is_ready() {
                return Some(entry.sender);
            }
        }
        None
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let tcp = self.connect().await?;
        let (sender, conn) = http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(UpstreamError::Reset)?;
        let destroyed = self.stats.upstream_cx_destroy.clone();
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
            destroyed.inc();
        });
        Ok(sender)
    }

    /// Sends an HTTP/1.1 request on a pooled or new connection.
    pub async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout_idle() {
                Some(s) => (s, true),
                None => (self.connect_h1().await?, false),
            };
            // The server may close a kept-alive connection while our request is
            // already on the wire (its keep-alive timeout fired as the request
            // arrived): hyper then reports the connection closed and keeps the
            // request. A bodiless idempotent request may be sent again (RFC 9110
            // §9.2.2), so keep a copy of its head while it uses a reused connection.
            let replay = if reused { replayable(&req) } else { None };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.release_when_idle(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Not a byte was written: safe to send again, whatever the method.
                    Some(back) if reused => {
                        self.stats.upstream_rq_retry_stale_connection.inc();
                        req = back;
                    }
                    _ => {
                        let e = e.into_error();
                        match replay {
                            Some(again) if closed_before_response(&e) => {
                                self.stats.upstream_rq_retry_stale_connection.inc();
                                req = again;
                            }
                            _ => return Err(UpstreamError::Reset(e)),
                        }
                    }
                },
            }
        }
    }

    /// Puts the connection back once its response has been read completely.
    fn release_when_idle(self: &Arc<Self>, mut sender: http1::SendRequest<UpstreamBody>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(pool) = pool.upgrade() else { return };
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        });
    }

    async fn h2_sender(&self) -> Result<http2::SendRequest<UpstreamBody>, UpstreamError> {
        if let Some(s) = self.live_h2() {
            return Ok(s);
        }
        // One connection attempt at a time; the others wait and share it.
        let _guard = self.h2_connecting.lock().await;
        if let Some(s) = self.live_h2() {
            return Ok(s);
        }
        let tcp = self.connect().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(None)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(UpstreamError::Reset)?;
        let destroyed = self.stats.upstream_cx_destroy.clone();
        tokio::spawn(async move {
            let _ = conn.await;
            destroyed.inc();
        });
        *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    fn live_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let mut slot = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                *slot = None;
                None
            }
            None => None,
        }
    }

    /// Sends a request on the endpoint's shared HTTP/2 connection.
    pub async fn send_h2(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut sender = self.h2_sender().await?;
            if sender.ready().await.is_err() {
                self.h2.lock().unwrap_or_else(|p| p.into_inner()).take();
                if attempts < 3 {
                    continue;
                }
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(back) if attempts < 3 => {
                        self.stats.upstream_rq_retry_stale_connection.inc();
                        self.h2.lock().unwrap_or_else(|p| p.into_inner()).take();
                        req = back;
                    }
                    _ => return Err(UpstreamError::Reset(e.into_error())),
                },
            }
        }
    }
}
