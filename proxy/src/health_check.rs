//! Active health checking (a cluster's `health_checks`), as Envoy does it:
//! one session task per endpoint, off the data path, checks it every
//! interval over its own connection (HTTP/1.1 or HTTP/2 request, TCP
//! payloads, or `grpc.health.v1.Health/Check`) and moves it between healthy
//! and unhealthy with Envoy's thresholds: a host starts failed until its
//! first passing check (one is enough then), a definitive failure (an
//! unexpected HTTP status, a gRPC NOT_SERVING) fails it at once, network
//! failures, timeouts and retriable statuses only after
//! `unhealthy_threshold` in a row. Balancers read one atomic flag per host
//! ([`HostHealth::failed`]). Sessions stop when their host leaves the
//! cluster or the cluster goes away (the checker aborts them on drop).
//!
//! `x-envoy-immediate-health-check-fail` (an Envoy upstream draining) fails
//! a checked host at once: on a check's answer, and on a routed response
//! (a passive failure, [`HostHealth::immediate_fail`]), which also counts
//! `health_check.passive_failure`; the host is flagged
//! `excluded_via_immediate_hc_fail` until a check's answer comes without
//! the header.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Buf, Bytes};
use ferry_model::cluster::HostAddr;
use ferry_model::health_check::{Checker, GrpcCheck, HealthCheck, HttpCheck, TcpCheck, in_ranges};
use ferry_model::tls::UpstreamTls;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::outlier::{Detector, HostOutlier};
use crate::stats::{Counter, Stats};
use crate::tls::{ClientCache, TlsContexts, UpstreamIo};

/// One endpoint's active health state (Envoy's `FAILED_ACTIVE_HC`,
/// `DEGRADED_ACTIVE_HC`, `ACTIVE_HC_TIMEOUT` and `PENDING_DYNAMIC_REMOVAL`
/// flags), shared by the endpoint's pools and its session.
#[derive(Debug, Default)]
pub struct HostHealth {
    /// The cluster checks this host (it has health checks and the endpoint
    /// does not disable them).
    checked: bool,
    failed: AtomicBool,
    degraded: AtomicBool,
    timeout: AtomicBool,
    pending_removal: AtomicBool,
    /// `EXCLUDED_VIA_IMMEDIATE_HC_FAIL`.
    excluded: AtomicBool,
    /// A passive failure the session has not seen yet: its run of passes
    /// starts again.
    passive_pending: AtomicBool,
    /// The checker's `failure` and `passive_failure` counters, once a
    /// session runs for the host.
    passive_counters: std::sync::OnceLock<(Counter, Counter)>,
}

/// The header by which an upstream asks to be failed at once.
pub const IMMEDIATE_FAIL_HEADER: &str = "x-envoy-immediate-health-check-fail";

impl HostHealth {
    /// A host new to the cluster: failed until its first check passes when
    /// it is checked at all.
    pub fn new(checked: bool) -> Self {
        Self {
            checked,
            failed: AtomicBool::new(checked),
            ..Self::default()
        }
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn is_checked(&self) -> bool {
        self.checked
    }

    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    pub fn timed_out(&self) -> bool {
        self.timeout.load(Ordering::Relaxed)
    }

    /// Discovery removed the host; it stays while its checks pass.
    pub fn pending_removal(&self) -> bool {
        self.pending_removal.load(Ordering::Relaxed)
    }

    /// `EXCLUDED_VIA_IMMEDIATE_HC_FAIL`.
    pub fn excluded(&self) -> bool {
        self.excluded.load(Ordering::Relaxed)
    }

    /// A routed response carried `x-envoy-immediate-health-check-fail`:
    /// as Envoy's passive `setUnhealthy`, a checked host fails at once and
    /// is excluded; its next passes count from zero.
    pub fn immediate_fail(&self) {
        if !self.checked {
            return;
        }
        self.excluded.store(true, Ordering::Relaxed);
        self.passive_pending.store(true, Ordering::Relaxed);
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::info!("upstream asked for an immediate health check failure: host unhealthy");
        }
        if let Some((failure, passive)) = self.passive_counters.get() {
            failure.inc();
            passive.inc();
        }
    }

    pub fn set_pending_removal(&self, v: bool) {
        self.pending_removal.store(v, Ordering::Relaxed);
    }

    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }
}

/// Where and how a session reaches its host.
pub struct Target {
    pub health: Arc<HostHealth>,
    /// The host's outlier state (`None` without a detector).
    pub outlier: Option<Arc<HostOutlier>>,
    /// The checked address (`health_check_config` port or address applied).
    pub address: HostAddr,
    /// The `Host` / `:authority` of HTTP and gRPC checks.
    pub authority: String,
    /// The transport of check connections (`None`: plaintext).
    pub tls: Option<UpstreamTls>,
    /// The endpoint's name, for SNI (`auto_host_sni`).
    pub hostname: Option<Arc<str>>,
    pub bind_source: Option<IpAddr>,
}

/// `cluster.<name>.health_check.*` counters.
#[derive(Clone)]
struct CheckStats {
    attempt: Counter,
    success: Counter,
    failure: Counter,
    network_failure: Counter,
    passive_failure: Counter,
    verify_cluster: Counter,
}

struct Session {
    health: Arc<HostHealth>,
    task: tokio::task::AbortHandle,
}

type Sessions = Mutex<HashMap<usize, Session>>;

/// A cluster's health checker: its configuration and one session per
/// checked host.
pub struct HealthChecker {
    cfg: Arc<HealthCheck>,
    stats: CheckStats,
    /// The cluster's `upstream_cx_total`: until it moves, hosts are checked
    /// at `no_traffic_interval`.
    traffic: Counter,
    contexts: Arc<TlsContexts>,
    detector: Option<Arc<Detector>>,
    sessions: Arc<Sessions>,
    /// `true` once every host of the first endpoint set had its first
    /// result (Envoy warms the cluster until then).
    warm: tokio::sync::watch::Sender<bool>,
    first_round: Mutex<Option<HashSet<usize>>>,
    /// Called when a host pending removal fails: the cluster drops it.
    on_removed_host_failed: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for s in sessions.values() {
            s.task.abort();
        }
    }
}

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success {
        degraded: bool,
    },
    /// `network`: connect failure, reset or close (counts towards the
    /// threshold); `retriable`: a retriable HTTP status (also counts).
    Failure {
        network: bool,
        retriable: bool,
    },
    Timeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    Unchanged,
    Changed,
    ChangePending,
}

impl HealthChecker {
    pub fn new(
        cfg: HealthCheck,
        stats: &Stats,
        cluster: &str,
        traffic: Counter,
        contexts: Arc<TlsContexts>,
        detector: Option<Arc<Detector>>,
    ) -> Arc<Self> {
        let c = |n: &str| stats.counter(&format!("cluster.{cluster}.health_check.{n}"));
        let sessions: Arc<Sessions> = Arc::default();
        let gauge = |name: &str, f: fn(&HostHealth) -> bool| {
            let weak = Arc::downgrade(&sessions);
            stats.gauge_fn(
                &format!("cluster.{cluster}.health_check.{name}"),
                Arc::new(move || {
                    weak.upgrade().map_or(0, |s| {
                        let s = s.lock().unwrap_or_else(|p| p.into_inner());
                        s.values().filter(|x| f(&x.health)).count() as u64
                    })
                }),
            );
        };
        gauge("healthy", |h| !h.failed());
        gauge("degraded", |h| h.degraded());
        Arc::new(Self {
            cfg: Arc::new(cfg),
            stats: CheckStats {
                attempt: c("attempt"),
                success: c("success"),
                failure: c("failure"),
                network_failure: c("network_failure"),
                passive_failure: c("passive_failure"),
                verify_cluster: c("verify_cluster"),
            },
            traffic,
            contexts,
            detector,
            sessions,
            warm: tokio::sync::watch::Sender::new(false),
            first_round: Mutex::new(None),
            on_removed_host_failed: Mutex::new(None),
        })
    }

    /// How many hosts have a running session.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn config(&self) -> &HealthCheck {
        &self.cfg
    }

    /// Sets what runs when a host pending removal fails its check.
    pub fn on_removed_host_failed(&self, f: Arc<dyn Fn() + Send + Sync>) {
        *self
            .on_removed_host_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Waits until every host of the first endpoint set had a first result
    /// (bounded by the caller).
    pub async fn warmed(&self) {
        let mut rx = self.warm.subscribe();
        let _ = rx.wait_for(|w| *w).await;
    }

    /// The endpoint set changed: sessions start for new checked hosts and
    /// stop for hosts that left.
    pub fn sync(self: &Arc<Self>, targets: Vec<Target>) {
        let keep: HashSet<usize> = targets.iter().map(|t| t.health.key()).collect();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|k, s| {
            let kept = keep.contains(k);
            if !kept {
                s.task.abort();
            }
            kept
        });
        {
            let mut first = self.first_round.lock().unwrap_or_else(|p| p.into_inner());
            match first.as_mut() {
                None if !targets.is_empty() => {
                    *first = Some(
                        targets
                            .iter()
                            .filter(|t| t.health.checked)
                            .map(|t| t.health.key())
                            .collect(),
                    );
                }
                Some(waiting) => waiting.retain(|k| keep.contains(k)),
                None => {}
            }
            if first.as_ref().is_some_and(HashSet::is_empty) {
                self.warm.send_replace(true);
            }
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for t in targets {
            let key = t.health.key();
            if !t.health.checked || sessions.contains_key(&key) {
                continue;
            }
            let health = t.health.clone();
            let _ = health.passive_counters.set((
                self.stats.failure.clone(),
                self.stats.passive_failure.clone(),
            ));
            let task = tokio::spawn(run(Arc::downgrade(self), self.clone_parts(), t));
            sessions.insert(
                key,
                Session {
                    health,
                    task: task.abort_handle(),
                },
            );
        }
    }

    fn clone_parts(&self) -> Parts {
        Parts {
            cfg: self.cfg.clone(),
            stats: self.stats.clone(),
            traffic: self.traffic.clone(),
            contexts: self.contexts.clone(),
            detector: self.detector.clone(),
        }
    }

    fn first_result(&self, health: &Arc<HostHealth>) {
        let mut first = self.first_round.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waiting) = first.as_mut() {
            waiting.remove(&health.key());
            if waiting.is_empty() {
                self.warm.send_replace(true);
            }
        }
    }
}

/// What a session needs of its checker, without holding it (a session
/// must not keep its cluster alive).
struct Parts {
    cfg: Arc<HealthCheck>,
    stats: CheckStats,
    traffic: Counter,
    contexts: Arc<TlsContexts>,
    detector: Option<Arc<Detector>>,
}

/// A session's open connection, kept between checks with
/// `reuse_connection`.
enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
    Tcp(Box<UpstreamIo>, Vec<u8>),
}

/// The counters of consecutive results one session keeps.
#[derive(Default)]
struct Counts {
    first: bool,
    healthy: u32,
    unhealthy: u32,
}

async fn run(checker: Weak<HealthChecker>, p: Parts, t: Target) {
    let cfg = p.cfg.clone();
    if !cfg.initial_jitter.is_zero() {
        tokio::time::sleep(jitter(cfg.initial_jitter)).await;
    }
    let cache = ClientCache::default();
    let mut conn: Option<Conn> = None;
    let mut counts = Counts {
        first: true,
        ..Counts::default()
    };
    loop {
        p.stats.attempt.inc();
        let outcome =
            match tokio::time::timeout(cfg.timeout, check(&p, &t, &cache, &mut conn)).await {
                Ok(o) => o,
                Err(_) => {
                    conn = None;
                    Outcome::Timeout
                }
            };
        if !cfg.reuse_connection {
            conn = None;
        }
        let first = counts.first;
        let (healthy_result, transition) = apply(&p, &t, &mut counts, outcome);
        tracing::debug!(
            upstream.host = %t.address,
            health_check.outcome = ?outcome,
            health_check.failed = t.health.failed(),
            "health check"
        );
        let Some(c) = checker.upgrade() else { return };
        if first {
            c.first_result(&t.health);
        }
        if transition == Transition::Changed && t.health.failed() && t.health.pending_removal() {
            let cb = c
                .on_removed_host_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            drop(c);
            if let Some(cb) = cb {
                cb();
            }
            return;
        }
        drop(c);
        tokio::time::sleep(interval(&p, healthy_result, transition)).await;
    }
}

/// Applies one result to the host (Envoy's `handleSuccess` and
/// `setUnhealthy`); returns whether the check passed and the transition.
fn apply(p: &Parts, t: &Target, counts: &mut Counts, outcome: Outcome) -> (bool, Transition) {
    let h = &t.health;
    let cfg = &p.cfg;
    if h.passive_pending.swap(false, Ordering::Relaxed) {
        // A passive failure came between checks, as Envoy's setUnhealthy.
        counts.healthy = 0;
        counts.first = false;
    }
    match outcome {
        Outcome::Success { degraded } => {
            counts.unhealthy = 0;
            let mut transition = Transition::Unchanged;
            if h.failed() {
                counts.healthy += 1;
                // A host's very first check needs one pass only.
                if counts.first || counts.healthy >= cfg.healthy_threshold {
                    h.timeout.store(false, Ordering::Relaxed);
                    // Passing again: no longer excluded.
                    h.excluded.store(false, Ordering::Relaxed);
                    h.failed.store(false, Ordering::Relaxed);
                    transition = Transition::Changed;
                    tracing::info!(upstream.host = %t.address, "health check passed: host healthy");
                } else {
                    transition = Transition::ChangePending;
                }
            }
            if degraded != h.degraded() {
                h.degraded.store(degraded, Ordering::Relaxed);
                if transition == Transition::Unchanged {
                    transition = Transition::Changed;
                }
            }
            p.stats.success.inc();
            counts.first = false;
            if let (Some(d), Some(o)) = (&p.detector, &t.outlier) {
                d.health_check_passed(o);
            }
            (true, transition)
        }
        Outcome::Failure { .. } | Outcome::Timeout => {
            let (network, retriable) = match outcome {
                Outcome::Failure { network, retriable } => (network, retriable),
                _ => (true, false),
            };
            counts.healthy = 0;
            let mut transition = Transition::Unchanged;
            if !h.failed() {
                counts.unhealthy += 1;
                if (!network && !retriable) || counts.unhealthy >= cfg.unhealthy_threshold {
                    h.failed.store(true, Ordering::Relaxed);
                    transition = Transition::Changed;
                    tracing::info!(upstream.host = %t.address, "health check failed: host unhealthy");
                } else {
                    transition = Transition::ChangePending;
                }
            }
            // Envoy: the timeout flag tells a failed host's last failure.
            h.timeout
                .store(outcome == Outcome::Timeout && h.failed(), Ordering::Relaxed);
            p.stats.failure.inc();
            if network {
                p.stats.network_failure.inc();
            }
            counts.first = false;
            (false, transition)
        }
    }
}

/// Envoy's next interval: by the check's result and transition once the
/// cluster has carried traffic, the no-traffic intervals before; plus
/// jitter.
fn interval(p: &Parts, healthy_result: bool, transition: Transition) -> Duration {
    let cfg = &p.cfg;
    let pending = transition == Transition::ChangePending;
    let base = if p.traffic.get() > 0 {
        match (healthy_result, pending) {
            (false, true) => cfg.unhealthy_edge_interval,
            (false, false) => cfg.unhealthy_interval,
            (true, true) => cfg.healthy_edge_interval,
            (true, false) => cfg.interval,
        }
    } else if healthy_result && !pending {
        cfg.no_traffic_healthy_interval
    } else {
        cfg.no_traffic_interval
    };
    let mut d = base;
    let percent = base.mul_f64(f64::from(cfg.interval_jitter_percent) / 100.0);
    if !percent.is_zero() {
        d += jitter(percent);
    }
    if !cfg.interval_jitter.is_zero() {
        d += jitter(cfg.interval_jitter);
    }
    d.max(Duration::from_millis(1))
}

/// A random duration below `max`.
fn jitter(max: Duration) -> Duration {
    max.mul_f64(rand::random::<f64>())
}

/// Runs one check on the session's connection (opening one if needed).
async fn check(p: &Parts, t: &Target, cache: &ClientCache, conn: &mut Option<Conn>) -> Outcome {
    let network = Outcome::Failure {
        network: true,
        retriable: false,
    };
    let r = match &p.cfg.checker {
        Checker::Http(h) => http_check(p, t, cache, conn, h).await,
        Checker::Grpc(g) => grpc_check(p, t, cache, conn, g).await,
        Checker::Tcp(c) => tcp_check(p, t, cache, conn, c).await,
    };
    match r {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(upstream.host = %t.address, error = %e, "health check connection failed");
            *conn = None;
            network
        }
    }
}

/// Opens a check connection: TCP or Unix socket, TLS when the host's
/// transport says so.
async fn connect(
    p: &Parts,
    t: &Target,
    cache: &ClientCache,
    alpn: &'static [&'static str],
) -> std::io::Result<UpstreamIo> {
    let tls = match &t.tls {
        None => None,
        Some(u) => Some((
            u,
            p.contexts
                .client(u, alpn, cache)
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        )),
    };
    match &t.address {
        // Envoy's checkers open real connections; an internal listener
        // endpoint has no socket to check (the check fails, visibly).
        HostAddr::Internal(i) => Err(std::io::Error::other(format!(
            "health checks of internal listener endpoints ({}) are not supported",
            i.listener
        ))),
        HostAddr::Pipe(pipe) => {
            let unix = crate::cluster::connect_pipe(pipe).await?;
            let Some((u, config)) = tls else {
                return Ok(UpstreamIo::Unix(unix));
            };
            let name = ferry_tls::server_name(
                u,
                t.hostname.as_deref(),
                std::net::Ipv4Addr::LOCALHOST.into(),
            );
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(name, unix)
                .await?;
            Ok(UpstreamIo::UnixTls(Box::new(s)))
        }
        HostAddr::Ip(addr) => {
            let tcp = match t.bind_source {
                None => TcpStream::connect(addr).await?,
                Some(src) => {
                    let sock = if addr.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    sock.bind(std::net::SocketAddr::new(src, 0))?;
                    sock.connect(*addr).await?
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some((u, config)) = tls else {
                return Ok(UpstreamIo::Plain(tcp));
            };
            let name = ferry_tls::server_name(u, t.hostname.as_deref(), addr.ip());
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(UpstreamIo::Tls(Box::new(s)))
        }
    }
}

/// The HTTP/1.1 or HTTP/2 sender of the session, opened if needed.
async fn http_sender<'a>(
    p: &Parts,
    t: &Target,
    cache: &ClientCache,
    conn: &'a mut Option<Conn>,
    h2: bool,
) -> std::io::Result<&'a mut Conn> {
    let usable = match conn {
        Some(Conn::H1(s)) => !h2 && !s.is_closed(),
        Some(Conn::H2(s)) => h2 && !s.is_closed(),
        _ => false,
    };
    if !usable {
        *conn = None;
        let alpn: &'static [&'static str] = if h2 { &["h2"] } else { &["http/1.1"] };
        let io = TokioIo::new(connect(p, t, cache, alpn).await?);
        let c = if h2 {
            let (sender, driver) = http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(driver);
            Conn::H2(sender)
        } else {
            let (sender, driver) = http1::handshake(io).await.map_err(std::io::Error::other)?;
            tokio::spawn(driver);
            Conn::H1(sender)
        };
        *conn = Some(c);
    }
    conn.as_mut()
        .ok_or_else(|| std::io::Error::other("no connection"))
}

/// Sends `req` on the session's HTTP connection and reads the whole
/// response (its body and trailers).
async fn exchange(
    c: &mut Conn,
    req: Request<Full<Bytes>>,
) -> std::io::Result<(http::response::Parts, Bytes, Option<http::HeaderMap>)> {
    let resp = match c {
        Conn::H1(s) => {
            s.ready().await.map_err(std::io::Error::other)?;
            s.send_request(req).await
        }
        Conn::H2(s) => {
            s.ready().await.map_err(std::io::Error::other)?;
            s.send_request(req).await
        }
        Conn::Tcp(..) => return Err(std::io::Error::other("not an HTTP connection")),
    }
    .map_err(std::io::Error::other)?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.map_err(std::io::Error::other)?;
    let trailers = collected.trailers().cloned();
    Ok((parts, collected.to_bytes(), trailers))
}

/// The request head of a check: path, authority, Envoy's user agent, then
/// the configured removals and additions.
fn request(
    method: http::Method,
    h2: bool,
    tls: bool,
    authority: &str,
    path: &str,
) -> std::io::Result<http::request::Builder> {
    let uri = if h2 {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{authority}{path}")
    } else {
        path.to_string()
    };
    let mut b = Request::builder().method(method).uri(uri);
    if !h2 {
        b = b.header(http::header::HOST, authority);
    }
    Ok(b.header(http::header::USER_AGENT, "Envoy/HC"))
}

fn add_headers(
    headers: &mut http::HeaderMap,
    add: &[ferry_model::health_check::HeaderToAdd],
    remove: &[http::HeaderName],
) {
    for r in remove {
        headers.remove(r);
    }
    for a in add {
        if a.append {
            headers.append(a.name.clone(), a.value.clone());
        } else {
            headers.insert(a.name.clone(), a.value.clone());
        }
    }
}

async fn http_check(
    p: &Parts,
    t: &Target,
    cache: &ClientCache,
    conn: &mut Option<Conn>,
    h: &HttpCheck,
) -> std::io::Result<Outcome> {
    let authority = h.host.as_deref().unwrap_or(&t.authority);
    let mut req = request(
        h.method.clone(),
        h.http2,
        t.tls.is_some(),
        authority,
        &h.path,
    )?
    .body(Full::new(Bytes::new()))
    .map_err(std::io::Error::other)?;
    add_headers(req.headers_mut(), &h.headers_to_add, &h.headers_to_remove);
    let c = http_sender(p, t, cache, conn, h.http2).await?;
    let (parts, _, _) = exchange(c, req).await?;
    let closes = parts.version == http::Version::HTTP_10
        || parts
            .headers
            .get(http::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    if closes {
        *conn = None;
    }
    let status = parts.status.as_u16();
    if !in_ranges(&h.expected_statuses, status) {
        // As Envoy: only a failing answer with the header excludes the host.
        if parts.headers.contains_key(IMMEDIATE_FAIL_HEADER) {
            t.health.excluded.store(true, Ordering::Relaxed);
        }
        return Ok(Outcome::Failure {
            network: false,
            retriable: in_ranges(&h.retriable_statuses, status),
        });
    }
    let degraded = parts.headers.contains_key("x-envoy-degraded");
    if let Some(m) = &h.service_name_matcher {
        p.stats.verify_cluster.inc();
        let served = parts
            .headers
            .get("x-envoy-upstream-healthchecked-cluster")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !m.matches(served, false) {
            return Ok(Outcome::Failure {
                network: false,
                retriable: false,
            });
        }
    }
    Ok(Outcome::Success { degraded })
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

async fn grpc_check(
    p: &Parts,
    t: &Target,
    cache: &ClientCache,
    conn: &mut Option<Conn>,
    g: &GrpcCheck,
) -> std::io::Result<Outcome> {
    let authority = g.authority.as_deref().unwrap_or(&t.authority);
    let mut req = request(
        http::Method::POST,
        true,
        t.tls.is_some(),
        authority,
        "/grpc.health.v1.Health/Check",
    )?
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header(http::header::TE, "trailers")
    .body(Full::new(grpc_request(&g.service_name)))
    .map_err(std::io::Error::other)?;
    add_headers(req.headers_mut(), &g.metadata, &[]);
    let c = http_sender(p, t, cache, conn, true).await?;
    let (parts, body, trailers) = exchange(c, req).await?;
    let active = Outcome::Failure {
        network: false,
        retriable: false,
    };
    if parts.status != http::StatusCode::OK {
        return Ok(active);
    }
    // grpc-status in the trailers, or in the headers of a trailers-only answer.
    let grpc_status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if grpc_status != Some(0) {
        return Ok(active);
    }
    Ok(match grpc_serving_status(&body) {
        Some(SERVING) => Outcome::Success { degraded: false },
        _ => active,
    })
}

/// A framed `grpc.health.v1.HealthCheckRequest { service }`.
fn grpc_request(service: &str) -> Bytes {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(msg.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    Bytes::from(framed)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.first()?;
        b.advance(1);
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `status` of the first (uncompressed) `HealthCheckResponse` frame;
/// UNKNOWN (0) when the field is absent.
fn grpc_serving_status(body: &[u8]) -> Option<u64> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let mut status = 0;
    while !msg.is_empty() {
        let key = get_varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(&mut msg)?,
            (_, 0) => {
                get_varint(&mut msg)?;
            }
            (_, 1) => msg = msg.get(8..)?,
            (_, 2) => {
                let n = get_varint(&mut msg)? as usize;
                msg = msg.get(n..)?;
            }
            (_, 5) => msg = msg.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

/// Whether `expected` is found in `buf` block after block, in order
/// (Envoy's TCP matcher: other bytes may lie between them).
fn tcp_matches(expected: &[Vec<u8>], buf: &[u8]) -> bool {
    let mut start = 0;
    for seg in expected {
        if seg.is_empty() {
            continue;
        }
        let Some(found) = buf
            .get(start..)
            .and_then(|rest| rest.windows(seg.len()).position(|w| w == seg.as_slice()))
        else {
            return false;
        };
        start += found + seg.len();
    }
    true
}

async fn tcp_check(
    p: &Parts,
    t: &Target,
    cache: &ClientCache,
    conn: &mut Option<Conn>,
    c: &TcpCheck,
) -> std::io::Result<Outcome> {
    if !matches!(conn, Some(Conn::Tcp(..))) {
        let io = connect(p, t, cache, &[]).await?;
        // A connect-only check: the connection made is the answer, and it
        // is closed at once (as Envoy does).
        if c.receive.is_empty() && c.send.is_empty() {
            drop(io);
            return Ok(Outcome::Success { degraded: false });
        }
        *conn = Some(Conn::Tcp(Box::new(io), Vec::new()));
    }
    let Some(Conn::Tcp(io, buf)) = conn else {
        return Err(std::io::Error::other("no connection"));
    };
    if !c.send.is_empty() {
        io.write_all(&c.send).await?;
        io.flush().await?;
    }
    if c.receive.is_empty() {
        return Ok(Outcome::Success { degraded: false });
    }
    let mut chunk = [0u8; 4096];
    loop {
        if tcp_matches(&c.receive, buf) {
            buf.clear();
            return Ok(Outcome::Success { degraded: false });
        }
        // Bounded: a peer that never matches fails by the check's timeout.
        if buf.len() > 1 << 20 {
            buf.drain(..buf.len() / 2);
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(unhealthy: u32, healthy: u32) -> Parts {
        use ferry_model::health_check as hc;
        let s = |ms| Duration::from_millis(ms);
        Parts {
            cfg: Arc::new(hc::HealthCheck {
                timeout: s(1000),
                interval: s(100),
                initial_jitter: Duration::ZERO,
                interval_jitter: Duration::ZERO,
                interval_jitter_percent: 0,
                unhealthy_threshold: unhealthy,
                healthy_threshold: healthy,
                no_traffic_interval: s(60_000),
                no_traffic_healthy_interval: s(30_000),
                unhealthy_interval: s(200),
                unhealthy_edge_interval: s(300),
                healthy_edge_interval: s(400),
                reuse_connection: true,
                transport_socket_match_criteria: None,
                checker: hc::Checker::Tcp(hc::TcpCheck::default()),
            }),
            stats: CheckStats {
                attempt: Counter::default(),
                success: Counter::default(),
                failure: Counter::default(),
                network_failure: Counter::default(),
                passive_failure: Counter::default(),
                verify_cluster: Counter::default(),
            },
            traffic: Counter::default(),
            contexts: Arc::default(),
            detector: None,
        }
    }

    fn target() -> Target {
        Target {
            health: Arc::new(HostHealth::new(true)),
            outlier: Some(Arc::default()),
            address: HostAddr::Ip(([127, 0, 0, 1], 1).into()),
            authority: "c".into(),
            tls: None,
            hostname: None,
            bind_source: None,
        }
    }

    const PASS: Outcome = Outcome::Success { degraded: false };
    const NETWORK: Outcome = Outcome::Failure {
        network: true,
        retriable: false,
    };
    const ACTIVE: Outcome = Outcome::Failure {
        network: false,
        retriable: false,
    };
    const RETRIABLE: Outcome = Outcome::Failure {
        network: false,
        retriable: true,
    };

    #[test]
    fn an_immediate_failure_fails_and_excludes_until_healthy_again() {
        let p = parts(3, 2);
        let t = target();
        let h = &t.health;
        let mut c = Counts {
            first: true,
            ..Counts::default()
        };
        apply(&p, &t, &mut c, PASS);
        // A pass already counted before the failure does not count after it.
        c.healthy = 1;
        h.immediate_fail();
        assert!(h.failed() && h.excluded());
        assert_eq!(apply(&p, &t, &mut c, PASS).1, Transition::ChangePending);
        assert!(h.excluded(), "excluded until healthy");
        assert_eq!(apply(&p, &t, &mut c, PASS).1, Transition::Changed);
        assert!(!h.failed() && !h.excluded());
        // An unchecked host is left alone.
        let unchecked = HostHealth::new(false);
        unchecked.immediate_fail();
        assert!(!unchecked.failed() && !unchecked.excluded());
    }

    #[test]
    fn thresholds_and_flags_follow_envoy() {
        let p = parts(3, 2);
        let t = target();
        let h = &t.health;
        let mut c = Counts {
            first: true,
            ..Counts::default()
        };
        assert!(h.failed(), "a checked host starts failed");
        // The first pass is enough.
        assert_eq!(apply(&p, &t, &mut c, PASS), (true, Transition::Changed));
        assert!(!h.failed());
        // Network failures and retriable statuses count to 3.
        assert_eq!(apply(&p, &t, &mut c, NETWORK).1, Transition::ChangePending);
        assert_eq!(
            apply(&p, &t, &mut c, RETRIABLE).1,
            Transition::ChangePending
        );
        assert!(!h.failed());
        assert_eq!(
            apply(&p, &t, &mut c, Outcome::Timeout).1,
            Transition::Changed
        );
        assert!(h.failed() && h.timed_out(), "failed by a timeout");
        // Back: two passes in a row (a failure in between starts over).
        assert_eq!(apply(&p, &t, &mut c, PASS).1, Transition::ChangePending);
        assert_eq!(apply(&p, &t, &mut c, NETWORK).1, Transition::Unchanged);
        assert!(!h.timed_out(), "the last failure was not a timeout");
        assert_eq!(apply(&p, &t, &mut c, PASS).1, Transition::ChangePending);
        assert_eq!(apply(&p, &t, &mut c, PASS).1, Transition::Changed);
        assert!(!h.failed());
        // Any other failure fails the host at once; degraded passes mark it.
        assert_eq!(apply(&p, &t, &mut c, ACTIVE).1, Transition::Changed);
        assert!(h.failed());
        let first_fail = target();
        let mut c2 = Counts {
            first: true,
            ..Counts::default()
        };
        apply(&p, &first_fail, &mut c2, NETWORK);
        assert!(
            first_fail.health.failed(),
            "still failed after a failed first check"
        );
        apply(
            &p,
            &first_fail,
            &mut c2,
            Outcome::Success { degraded: true },
        );
        apply(
            &p,
            &first_fail,
            &mut c2,
            Outcome::Success { degraded: true },
        );
        assert!(!first_fail.health.failed() && first_fail.health.degraded());
        assert_eq!(p.stats.success.get(), 6);
        assert_eq!(p.stats.failure.get(), 6);
        assert_eq!(p.stats.network_failure.get(), 4);
    }

    #[test]
    fn intervals_follow_traffic_result_and_transition() {
        let p = parts(2, 2);
        let ms = |d: Duration| d.as_millis();
        // No connection yet: the no-traffic intervals.
        assert_eq!(ms(interval(&p, true, Transition::Unchanged)), 30_000);
        assert_eq!(ms(interval(&p, true, Transition::ChangePending)), 60_000);
        assert_eq!(ms(interval(&p, false, Transition::Unchanged)), 60_000);
        p.traffic.inc();
        assert_eq!(ms(interval(&p, true, Transition::Unchanged)), 100);
        assert_eq!(ms(interval(&p, true, Transition::ChangePending)), 400);
        assert_eq!(ms(interval(&p, false, Transition::Changed)), 200);
        assert_eq!(ms(interval(&p, false, Transition::ChangePending)), 300);
    }

    #[test]
    fn tcp_blocks_match_in_order() {
        let exp = vec![b"PO".to_vec(), b"NG".to_vec()];
        assert!(tcp_matches(&exp, b"xxPOyyNG"));
        assert!(!tcp_matches(&exp, b"NGPO"));
        assert!(!tcp_matches(&exp, b"PO"));
    }

    #[test]
    fn grpc_messages_round_trip() {
        let req = grpc_request("svc");
        assert_eq!(&req[..], b"\x00\x00\x00\x00\x05\x0a\x03svc");
        assert_eq!(
            grpc_serving_status(b"\x00\x00\x00\x00\x02\x08\x01"),
            Some(1)
        );
        assert_eq!(
            grpc_serving_status(b"\x00\x00\x00\x00\x02\x08\x02"),
            Some(2)
        );
        assert_eq!(grpc_serving_status(b"\x00\x00\x00\x00\x00"), Some(0));
        assert_eq!(grpc_serving_status(b"\x00\x00\x00"), None);
    }
}
