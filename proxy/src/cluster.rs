//! The cluster manager: per-cluster endpoint choice and per-endpoint upstream
//! connection pools (HTTP/1.1 keep-alive reuse, one multiplexed HTTP/2
//! connection).
//!
//! The keep-alive race (a pooled connection the server closed while it sat
//! idle) is absorbed here, once and boundedly: a request that a reused
//! connection gives back unsent (hyper hands it back when the connection was
//! found closed before a byte was written), or a bodiless idempotent request
//! whose reused connection ended in a clean close (FIN) before any response
//! byte, is sent once more on a freshly opened connection, never on another
//! pooled one. Anything else (a reset after the request was read, a failure on
//! a fresh connection, a second failure) is the router's to decide under the
//! route's retry policy, so without one a request reaches a backend at most
//! twice.
//!
//! Each cluster also owns its circuit breakers ([`Breakers`]) and outlier
//! detector; both survive endpoint-only updates, as do the pools, so that
//! in-flight counts and ejections are not forgotten when EDS changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ferry_model::cluster::{EndpointHealth, HostAddr, PipeAddr, Thresholds};
use ferry_model::health_check::EndpointCheck;
use ferry_model::tls::UpstreamTls;
use ferry_model::{Cluster, ClusterKind, Snapshot};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::health_check::{HealthChecker, HostHealth, Target};
use crate::http::body::UpstreamBody;
use crate::internal_listener::InternalListeners;
use crate::lb::{Balancer, HostMeta, LbHost};
use crate::outlier::{Detector, HostOutlier, Outcome};
use crate::stats::{ClusterStats, GaugeGuard, Stats};
use crate::tls::{ClientCache, TlsContexts, UpstreamIo};
use crate::upstream_h1;

/// Why an upstream request failed, with what Envoy reports for it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
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
    /// The TLS handshake with the endpoint failed (untrusted certificate,
    /// unexpected SAN, secrets missing): never sent in clear instead.
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: {0}"
    )]
    Tls(String),
    /// A circuit breaker is open (max requests, pending requests or connections).
    #[error("upstream connect error or disconnect/reset before headers. reset reason: overflow")]
    Overflow,
    /// The response could not be parsed, or its framing is refused (both
    /// lengths, another transfer coding): 502, and the connection is not
    /// used again.
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: protocol error"
    )]
    Protocol(String),
}

impl UpstreamError {
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`, in Envoy's words (spaces as
    /// `_`): why the connection could not be made.
    pub fn transport_failure_reason(&self) -> Option<String> {
        let reason = match self {
            UpstreamError::ConnectFailure(io) => {
                let text = io.to_string();
                // std adds " (os error N)" to the system's message.
                let text = text.split(" (os error").next().unwrap_or(&text);
                format!("delayed connect error: {text}")
            }
            UpstreamError::Tls(t) => format!("TLS error: {t}"),
            _ => return None,
        };
        Some(reason.replace(' ', "_"))
    }

    /// Envoy's response flag for the access log.
    pub fn response_flag(&self) -> &'static str {
        match self {
            UpstreamError::NoHealthyUpstream => "UH",
            UpstreamError::ConnectFailure(_)
            | UpstreamError::ConnectTimeout
            | UpstreamError::Tls(_) => "UF",
            UpstreamError::Reset(_) => "UC",
            UpstreamError::Overflow => "UO",
            UpstreamError::Protocol(_) => "UPE",
        }
    }
}

/// The runtime side of every cluster in a snapshot.
#[derive(Default)]
pub struct ClusterManager {
    clusters: ClusterMap,
    /// The [`Snapshot::serial`] this was built for.
    serial: u64,
}

/// Clusters by name, in shards that successive managers share: carrying
/// the map over to the next snapshot copies one pointer per shard, and a
/// change to one cluster copies only its shard (about 32 clusters), so an
/// update of one cluster among 10,000 neither copies nor frees the others.
type ClusterMap = ferry_model::ShardedMap<Arc<ClusterRt>>;

impl ClusterManager {
    /// Builds the runtime for `snapshot`. Unchanged clusters are kept as they
    /// are; a cluster whose endpoints alone changed keeps the pools (and so
    /// the connections) of the endpoints still there. When the snapshot
    /// says which clusters changed since the one `previous` was built for,
    /// only those are looked at.
    pub fn build(
        snapshot: &Snapshot,
        previous: Option<&ClusterManager>,
        stats: &Stats,
        tls: &Arc<TlsContexts>,
        internal: &Arc<InternalListeners>,
    ) -> Self {
        let serial = snapshot.serial;
        if let (Some(p), Some(changes)) = (previous, &snapshot.cluster_changes)
            && p.serial != 0
            && p.serial == changes.after
        {
            let mut clusters = p.clusters.clone();
            for name in &changes.names {
                match snapshot.clusters.get(name) {
                    Some(cfg) => {
                        let rt = cluster_rt(cfg, p.clusters.get(name), stats, tls, internal);
                        clusters.insert(name.clone(), rt);
                    }
                    None => {
                        clusters.remove(name);
                    }
                }
            }
            return Self { clusters, serial };
        }
        let mut clusters = ClusterMap::with_capacity(snapshot.clusters.len());
        for (name, cfg) in &snapshot.clusters {
            let prev = previous.and_then(|p| p.clusters.get(name));
            let rt = cluster_rt(cfg, prev, stats, tls, internal);
            clusters.insert(name.clone(), rt);
        }
        Self { clusters, serial }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ClusterRt>> {
        self.clusters.get(name)
    }

    /// Every cluster (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ClusterRt>> {
        self.clusters.values()
    }
}

/// The runtime of cluster `cfg`: `prev` itself when the configuration is
/// the same, a new one keeping `prev`'s pools, breakers and detector when
/// only the endpoints differ, else a new one.
fn cluster_rt(
    cfg: &Arc<Cluster>,
    prev: Option<&Arc<ClusterRt>>,
    stats: &Stats,
    tls: &Arc<TlsContexts>,
    internal: &Arc<InternalListeners>,
) -> Arc<ClusterRt> {
    match prev {
        Some(p) if Arc::ptr_eq(&p.cfg, cfg) || format!("{:?}", p.cfg) == format!("{cfg:?}") => {
            p.clone()
        }
        Some(p) if same_except_endpoints(&p.cfg, cfg) => {
            let rt = Arc::new(ClusterRt::new(cfg.clone(), stats, Some(p), tls, internal));
            rt.watch_removed_hosts();
            rt
        }
        _ => {
            let rt = Arc::new(ClusterRt::new(cfg.clone(), stats, None, tls, internal));
            rt.watch_removed_hosts();
            rt.start_dns();
            rt
        }
    }
}

/// The TLS settings of an endpoint with this `envoy.transport_socket_match`
/// metadata (`None`: plaintext): the first transport socket match whose
/// criteria it carries decides, else the cluster's own transport socket.
fn tls_for<'a>(c: &'a Cluster, metadata: &[(String, String)]) -> Option<&'a UpstreamTls> {
    transport_for(c, metadata).0
}

/// [`tls_for`], and whether the chosen socket is `internal_upstream`
/// passing the endpoint's original_dst metadata.
fn transport_for<'a>(
    c: &'a Cluster,
    metadata: &[(String, String)],
) -> (Option<&'a UpstreamTls>, bool) {
    c.transport_socket_matches
        .iter()
        .find(|m| m.criteria.iter().all(|kv| metadata.contains(kv)))
        .map_or((c.tls.as_deref(), c.internal_upstream), |m| {
            (m.tls.as_ref(), m.internal_upstream)
        })
}

/// Whether two transports are the same (pools never mix TLS and
/// plaintext, nor two TLS settings).
fn same_transport(a: Option<&UpstreamTls>, b: Option<&UpstreamTls>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => format!("{a:?}") == format!("{b:?}"),
        _ => false,
    }
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
    /// Breakers and outlier detector, shared with the endpoint pools.
    pub shared: Arc<ClusterShared>,
    /// The balancer over the pools of the fixed (STATIC, EDS) or resolved
    /// (STRICT_DNS) endpoints; a DNS refresh swaps it.
    balancer: ArcSwap<Balancer<Arc<EndpointPool>>>,
    /// Pools created on demand for original destinations (ORIGINAL_DST).
    dynamic: Mutex<HashMap<SocketAddr, Arc<EndpointPool>>>,
    /// The endpoints of the balancer with their weights and priorities,
    /// for the admin pages.
    hosts: ArcSwap<Vec<(Arc<EndpointPool>, HostMeta)>>,
    /// The live secrets and TLS configurations.
    tls: Arc<TlsContexts>,
    /// The internal listeners internal endpoints connect to.
    internal: Arc<InternalListeners>,
    /// The endpoint pools' settings: the cluster's own transport first,
    /// then one per `transport_socket_matches` entry.
    pool_settings: Vec<Arc<PoolSettings>>,
    /// `true` once a STRICT_DNS cluster's first resolution round is over
    /// (always `true` for other kinds): Envoy warms such a cluster before
    /// it serves, so its first requests wait for it instead of failing.
    resolved: tokio::sync::watch::Sender<bool>,
}

impl ClusterRt {
    /// Waits until the cluster has finished warming: for STRICT_DNS, its
    /// first resolution round (bounded by the resolver's own timeout, and
    /// at most 5 s here). Immediate for every other kind.
    pub async fn warmed(&self) {
        let checker = self
            .shared
            .health
            .as_ref()
            .filter(|_| !matches!(self.cfg.kind, ClusterKind::Eds { .. }));
        if *self.resolved.borrow() && checker.is_none() {
            return;
        }
        let mut rx = self.resolved.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = rx.wait_for(|r| *r).await;
            // Envoy warms a health-checked cluster until each of its hosts
            // had a first check.
            if let Some(c) = checker {
                c.warmed().await;
            }
        })
        .await;
    }

    /// A host discovery removed, kept while its checks passed, failed one:
    /// it leaves the cluster now (Envoy's `PENDING_DYNAMIC_REMOVAL`).
    fn watch_removed_hosts(self: &Arc<Self>) {
        let Some(checker) = &self.shared.health else {
            return;
        };
        let weak = Arc::downgrade(self);
        checker.on_removed_host_failed(Arc::new(move || {
            let Some(rt) = weak.upgrade() else { return };
            let hosts: Vec<_> = rt
                .hosts
                .load()
                .iter()
                .filter(|(p, _)| !(p.health.pending_removal() && p.health.failed()))
                .cloned()
                .collect();
            rt.install(hosts);
        }));
    }

    /// Starts DNS refresh for a STRICT_DNS cluster; it stops with the cluster.
    fn start_dns(self: &Arc<Self>) {
        let ClusterKind::StrictDns(hosts) = &self.cfg.kind else {
            return;
        };
        let hosts = hosts.clone();
        let dns = self.cfg.dns;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let mut addrs = Vec::new();
                for h in &hosts {
                    match tokio::net::lookup_host((h.host.as_str(), h.port)).await {
                        // `dns_lookup_family` chooses among the name's addresses.
                        Ok(it) => addrs.extend(
                            dns.lookup_family
                                .select(&it.collect::<Vec<_>>())
                                .into_iter()
                                .map(|a| (a, h.host.as_str(), &h.health_check)),
                        ),
                        Err(e) => {
                            tracing::warn!(dns.host = %h.host, error = %e, "DNS resolution failed")
                        }
                    }
                }
                let Some(c) = weak.upgrade() else { return };
                if !addrs.is_empty() || c.balancer.load().hosts().is_empty() {
                    let old = c.balancer.load_full();
                    let pools: Vec<_> = addrs
                        .iter()
                        .map(|(a, name, check)| {
                            let pool = old
                                .hosts()
                                .iter()
                                .find(|p| p.address == HostAddr::Ip(*a))
                                .cloned()
                                .unwrap_or_else(|| {
                                    let mut p =
                                        EndpointPool::new(HostAddr::Ip(*a), c.settings_for(&[]));
                                    p.set_hostname(Some(Arc::from(*name)));
                                    p.set_health_check(&c.cfg, (*check).clone());
                                    Arc::new(p)
                                });
                            (pool, HostMeta::default())
                        })
                        .collect();
                    c.install(pools);
                }
                c.resolved.send_replace(true);
                drop(c);
                tokio::time::sleep(dns.refresh_rate).await;
            }
        });
    }

    fn new(
        cfg: Arc<Cluster>,
        stats: &Stats,
        previous: Option<&ClusterRt>,
        tls: &Arc<TlsContexts>,
        internal: &Arc<InternalListeners>,
    ) -> Self {
        let cstats = ClusterStats::new(stats, &cfg.name);
        let shared = match previous {
            Some(p) => p.shared.clone(),
            None => ClusterShared::new(&cfg, stats, &cstats, tls),
        };
        let empty = Balancer::new(cfg.lb_policy, &cfg.lb, Vec::new());
        let mut rt = Self {
            stats: cstats,
            shared,
            balancer: ArcSwap::from_pointee(empty),
            dynamic: Mutex::new(HashMap::new()),
            hosts: ArcSwap::from_pointee(Vec::new()),
            tls: tls.clone(),
            internal: internal.clone(),
            pool_settings: Vec::new(),
            resolved: tokio::sync::watch::Sender::new(!matches!(
                cfg.kind,
                ClusterKind::StrictDns(_)
            )),
            cfg,
        };
        rt.pool_settings = std::iter::once((rt.cfg.tls.as_deref(), rt.cfg.internal_upstream))
            .chain(
                rt.cfg
                    .transport_socket_matches
                    .iter()
                    .map(|m| (m.tls.as_ref(), m.internal_upstream)),
            )
            .map(|(tls, internal)| Arc::new(PoolSettings::new(&rt, tls, internal)))
            .collect();
        if let ClusterKind::Static(eps) = &rt.cfg.kind {
            let prev = previous.map(|p| p.balancer.load_full());
            // An endpoint update keeps the pools of the addresses that stay:
            // found by address, and their transport compared once per
            // (old settings, new settings) pair, not once per endpoint.
            let by_addr: HashMap<&HostAddr, &Arc<EndpointPool>> = prev
                .as_ref()
                .map(|b| b.hosts().iter().map(|p| (&p.address, p)).collect())
                .unwrap_or_default();
            let mut same: Vec<(*const PoolSettings, *const PoolSettings, bool)> = Vec::new();
            let mut hosts = Vec::with_capacity(eps.len());
            for e in eps.iter() {
                let settings = rt.settings_for(e.transport_socket_match());
                let kept = by_addr.get(&e.address).map(|p| Arc::clone(p));
                let passthrough = if settings.internal_upstream {
                    e.original_dst()
                } else {
                    Default::default()
                };
                let pool = kept
                    .filter(|p| {
                        let key = (Arc::as_ptr(&p.settings), Arc::as_ptr(&settings));
                        let same_tls = match same.iter().find(|(o, n, _)| (*o, *n) == key) {
                            Some((_, _, v)) => *v,
                            None => {
                                let v = same_transport(p.tls(), settings.tls.as_deref())
                                    && p.settings.internal_upstream == settings.internal_upstream;
                                same.push((key.0, key.1, v));
                                v
                            }
                        };
                        same_tls
                            && p.hostname() == e.hostname()
                            && p.health_check() == e.health_check()
                            && p.passthrough() == passthrough
                    })
                    .unwrap_or_else(|| {
                        let mut p = EndpointPool::new(e.address.clone(), settings.clone());
                        p.set_hostname(e.hostname().cloned());
                        p.set_health_check(&rt.cfg, e.health_check().clone());
                        p.set_passthrough(passthrough);
                        Arc::new(p)
                    });
                // Back in discovery: no longer pending removal.
                pool.health.set_pending_removal(false);
                let meta = HostMeta {
                    weight: e.weight.max(1),
                    priority: e.priority,
                    locality: e.locality,
                    locality_weight: e.locality_weight,
                    degraded: e.health == EndpointHealth::Degraded,
                    unhealthy: e.health == EndpointHealth::Unhealthy,
                };
                hosts.push((pool, meta));
            }
            // Envoy: with active health checks, a host discovery removed
            // stays while its checks pass (unless
            // `ignore_health_on_host_removal`), pending removal.
            if rt.cfg.health_check.is_some()
                && !rt.cfg.ignore_health_on_host_removal
                && let Some(p) = previous
            {
                for (pool, meta) in p.hosts.load().iter() {
                    let gone = !hosts.iter().any(|(h, _)| h.address == pool.address);
                    if gone && pool.health.is_checked() && !pool.health.failed() {
                        pool.health.set_pending_removal(true);
                        hosts.push((pool.clone(), *meta));
                    }
                }
            }
            rt.install(hosts);
        }
        rt
    }

    /// The pool settings for an endpoint with this metadata: those of the
    /// first `transport_socket_matches` entry it matches, else the
    /// cluster's own.
    fn settings_for(&self, metadata: &[(String, String)]) -> Arc<PoolSettings> {
        let i = self
            .cfg
            .transport_socket_matches
            .iter()
            .position(|m| m.criteria.iter().all(|kv| metadata.contains(kv)))
            .map_or(0, |i| i + 1);
        self.pool_settings[i].clone()
    }

    /// Installs a new endpoint set: a new balancer, and the outlier detector
    /// watching exactly these endpoints.
    fn install(&self, hosts: Vec<(Arc<EndpointPool>, HostMeta)>) {
        if let Some(d) = &self.shared.detector {
            let watched: Vec<Arc<HostOutlier>> = hosts
                .iter()
                .filter_map(|(p, _)| p.outlier.clone())
                .collect();
            d.set_hosts(&watched);
        }
        if let Some(checker) = &self.shared.health {
            let criteria = checker.config().transport_socket_match_criteria.as_ref();
            let targets = hosts
                .iter()
                .map(|(p, _)| Target {
                    health: p.health.clone(),
                    outlier: p.outlier.clone(),
                    address: p.health_check().target(&p.address),
                    authority: p
                        .health_check()
                        .hostname
                        .as_deref()
                        .unwrap_or(&self.cfg.name)
                        .to_string(),
                    tls: match criteria {
                        Some(c) => tls_for(&self.cfg, c).cloned(),
                        None => p.tls().cloned(),
                    },
                    hostname: p.hostname().cloned(),
                    bind_source: self.cfg.bind_source,
                })
                .collect();
            checker.sync(targets);
        }
        self.hosts.store(Arc::new(hosts.clone()));
        let b = Balancer::new(self.cfg.lb_policy, &self.cfg.lb, hosts);
        self.balancer.store(Arc::new(b));
    }

    /// Every endpoint of the cluster (balanced ones with their weight and
    /// priority, and the original destinations in use), for `/clusters`.
    pub fn endpoints(&self) -> Vec<(Arc<EndpointPool>, HostMeta)> {
        let mut out = Vec::clone(&self.hosts.load());
        let dynamic = self.dynamic.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(dynamic.values().map(|p| (p.clone(), HostMeta::default())));
        out
    }

    /// All clusters' names are listed in name order by the admin pages.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Chooses the endpoint for a request or connection. `original_dst` is the
    /// downstream connection's original destination (for ORIGINAL_DST).
    pub fn pick(&self, original_dst: Option<SocketAddr>) -> Option<Arc<EndpointPool>> {
        self.pick_hashed(original_dst, None)
    }

    /// The endpoint of a retry: the request's hash as for the first attempt,
    /// skipping the endpoints in `avoid` (the previous-hosts predicate) while
    /// others are left.
    pub fn pick_retry(
        &self,
        original_dst: Option<SocketAddr>,
        hash: Option<u64>,
        avoid: &[HostAddr],
    ) -> Option<Arc<EndpointPool>> {
        match &self.cfg.kind {
            ClusterKind::Static(_) | ClusterKind::StrictDns(_) if !avoid.is_empty() => self
                .balancer
                .load()
                .pick_except(hash, &|p: &Arc<EndpointPool>| avoid.contains(&p.address))
                .cloned(),
            _ => self.pick_hashed(original_dst, hash),
        }
    }

    /// [`ClusterRt::pick`] with the request's hash (ring hash, maglev).
    pub fn pick_hashed(
        &self,
        original_dst: Option<SocketAddr>,
        hash: Option<u64>,
    ) -> Option<Arc<EndpointPool>> {
        match &self.cfg.kind {
            ClusterKind::Static(_) | ClusterKind::StrictDns(_) => {
                self.balancer.load().pick(hash).cloned()
            }
            ClusterKind::OriginalDst => {
                let mut dst = original_dst?;
                // `upstream_port_override` (Istio's HBONE port 15008).
                if let Some(port) = self.cfg.lb.original_dst.port_override {
                    dst.set_port(port);
                }
                let mut m = self.dynamic.lock().unwrap_or_else(|p| p.into_inner());
                if m.len() > 1024 {
                    // Forget pools nobody holds any more (Envoy's cleanup_interval).
                    m.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_empty());
                }
                Some(
                    m.entry(dst)
                        .or_insert_with(|| {
                            Arc::new(EndpointPool::new(HostAddr::Ip(dst), self.settings_for(&[])))
                        })
                        .clone(),
                )
            }
            // An EDS cluster whose assignment never arrived has no endpoints.
            ClusterKind::BlackHole | ClusterKind::Eds { .. } => None,
        }
    }
}

/// What a cluster's pools share across endpoint updates.
pub struct ClusterShared {
    pub breakers: Breakers,
    pub detector: Option<Arc<Detector>>,
    /// The active health checker (`health_checks`).
    pub health: Option<Arc<HealthChecker>>,
    pub max_requests_per_connection: Option<u32>,
    /// HTTP/2 streams allowed at once on an endpoint's connection.
    pub max_concurrent_streams: Option<u32>,
    /// The case HTTP/1 request header names are written in.
    pub header_case: ferry_model::http_protocol::HeaderCase,
}

impl ClusterShared {
    fn new(
        cfg: &Cluster,
        stats: &Stats,
        counters: &ClusterStats,
        tls: &Arc<TlsContexts>,
    ) -> Arc<Self> {
        let detector = cfg.outlier_detection.as_ref().map(|o| {
            let d = Detector::new((**o).clone(), stats, &cfg.name);
            d.start();
            d
        });
        let health = cfg.health_check.as_ref().map(|h| {
            HealthChecker::new(
                (**h).clone(),
                stats,
                &cfg.name,
                counters.upstream_cx_total().counter(),
                tls.clone(),
                detector.clone(),
            )
        });
        Arc::new(Self {
            breakers: Breakers::new(cfg.circuit_breakers.default, stats, &cfg.name, counters),
            detector,
            health,
            max_requests_per_connection: cfg.max_requests_per_connection,
            max_concurrent_streams: cfg.max_concurrent_streams,
            header_case: cfg.header_case,
        })
    }

    fn report(&self, host: &HostOutlier, outcome: Outcome) {
        if let Some(d) = &self.detector {
            d.report(host, outcome);
        }
    }
}

/// A cluster's circuit breakers for the DEFAULT routing priority (Envoy's
/// `circuit_breakers.thresholds`): counts of what is open or in flight, each
/// checked against its threshold before it grows.
pub struct Breakers {
    pub thresholds: Thresholds,
    requests: Arc<AtomicU32>,
    pending: Arc<AtomicU32>,
    connections: Arc<AtomicU32>,
    retries: Arc<AtomicU32>,
    /// The cluster's counters, where the overflows are counted.
    pub stats: ClusterStats,
    /// Signalled when a connection closes or goes back to the pool, for
    /// requests waiting under `max_connections`.
    pub(crate) freed: tokio::sync::Notify,
}

/// A held slot of one breaker (and of the endpoint's own connection limit,
/// for a connection under `per_host_thresholds`); released on drop.
pub struct Slot(Arc<AtomicU32>, Option<Box<Slot>>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn acquire(count: &Arc<AtomicU32>, max: u32) -> Option<Slot> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(count.clone(), None))
}

impl Breakers {
    fn new(thresholds: Thresholds, stats: &Stats, cluster: &str, counters: &ClusterStats) -> Self {
        let b = Self {
            thresholds,
            requests: Arc::default(),
            pending: Arc::default(),
            connections: Arc::default(),
            retries: Arc::default(),
            stats: counters.clone(),
            freed: tokio::sync::Notify::new(),
        };
        if thresholds.track_remaining {
            // Envoy's `circuit_breakers.default.remaining_*` gauges: what
            // each threshold still lets through.
            for (name, count, max) in [
                ("remaining_cx", &b.connections, thresholds.max_connections),
                (
                    "remaining_pending",
                    &b.pending,
                    thresholds.max_pending_requests,
                ),
                ("remaining_rq", &b.requests, thresholds.max_requests),
                ("remaining_retries", &b.retries, thresholds.max_retries),
            ] {
                let count = count.clone();
                stats.gauge_fn(
                    &format!("cluster.{cluster}.circuit_breakers.default.{name}"),
                    Arc::new(move || u64::from(max.saturating_sub(count.load(Ordering::Relaxed)))),
                );
            }
        }
        b
    }

    /// A request slot (`max_requests`); overflow counts as Envoy counts it.
    pub fn request(&self) -> Result<Slot, UpstreamError> {
        acquire(&self.requests, self.thresholds.max_requests).ok_or_else(|| {
            self.stats.upstream_rq_active_overflow().inc();
            UpstreamError::Overflow
        })
    }

    /// A retry slot (`max_retries`, or the retry budget when one is set):
    /// `None` means the retry must not be made.
    pub fn retry(&self) -> Option<Slot> {
        let max = match &self.thresholds.retry_budget {
            Some(budget) => budget.allowed(
                self.requests
                    .load(Ordering::Relaxed)
                    .saturating_add(self.pending.load(Ordering::Relaxed)),
            ),
            None => self.thresholds.max_retries,
        };
        let s = acquire(&self.retries, max);
        if s.is_none() {
            self.stats.upstream_rq_retry_overflow().inc();
        }
        s
    }

    /// A connection slot under `max_connections`, and under the endpoint's
    /// `per_host_thresholds` limit when it has one.
    fn connection(&self, host: Option<&(Arc<AtomicU32>, u32)>) -> Option<Slot> {
        let host_slot = match host {
            Some((count, max)) => Some(acquire(count, *max)?),
            None => None,
        };
        let mut slot = acquire(&self.connections, self.thresholds.max_connections)?;
        slot.1 = host_slot.map(Box::new);
        Some(slot)
    }

    fn pending(&self) -> Result<Slot, UpstreamError> {
        acquire(&self.pending, self.thresholds.max_pending_requests).ok_or_else(|| {
            self.stats.upstream_rq_pending_overflow().inc();
            UpstreamError::Overflow
        })
    }

    pub fn active_requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Connects to a Unix socket endpoint: a file path, or (`@name`) a name in
/// Linux's abstract namespace, as Envoy reads a `pipe` address.
pub(crate) async fn connect_pipe(p: &PipeAddr) -> std::io::Result<tokio::net::UnixStream> {
    match p.abstract_name() {
        None => tokio::net::UnixStream::connect(&*p.0).await,
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            // The standard library connects abstract sockets only
            // blockingly; a local connect does not wait on a peer's accept.
            let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        }
    }
}

/// `SO_KEEPALIVE` with `tcp_keepalive` settings (the system's where
/// unset), as Envoy sets them on upstream and accepted sockets.
pub(crate) fn keepalive(tcp: &TcpStream, k: &ferry_model::cluster::TcpKeepalive) {
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        ka = ka.with_time(t);
    }
    if let Some(i) = k.interval {
        ka = ka.with_interval(i);
    }
    if let Some(p) = k.probes {
        ka = ka.with_retries(p);
    }
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "upstream TCP keepalive not set");
    }
}

impl LbHost for Arc<EndpointPool> {
    fn id(&self) -> String {
        self.address.to_string()
    }
    fn available(&self) -> bool {
        !self.ejected() && !self.health.failed()
    }
    fn degraded(&self) -> bool {
        self.health.degraded()
    }
    fn excluded(&self) -> bool {
        self.health.excluded()
    }
    fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    fn latency_cost(&self) -> f64 {
        self.conns_if_used()
            .map_or(0.0, |c| c.ewma.cost(Instant::now()))
    }
    fn age(&self) -> Option<Duration> {
        Some(self.created.elapsed())
    }
}

/// Peak-sensitive exponentially weighted moving average of response latency
/// (Finagle's and linkerd's PeakEWMA): a slower sample replaces the estimate
/// at once, faster ones pull it down over `DECAY`.
#[derive(Default)]
pub struct PeakEwma {
    state: Mutex<Option<(f64, Instant)>>,
}

const DECAY: Duration = Duration::from_secs(10);

impl PeakEwma {
    fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let next = match *s {
            Some((cost, at)) if rtt <= cost => {
                let w = (-(now.saturating_duration_since(at).as_secs_f64()) / DECAY.as_secs_f64())
                    .exp();
                cost * w + rtt * (1.0 - w)
            }
            _ => rtt,
        };
        *s = Some((next, now));
    }

    fn cost(&self, now: Instant) -> f64 {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *s {
            // Decay towards zero while idle, so a once-slow endpoint is tried again.
            Some((cost, at)) => {
                cost * (-(now.saturating_duration_since(at).as_secs_f64()) / DECAY.as_secs_f64())
                    .exp()
            }
            None => 0.0,
        }
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

/// Whether the connection ended with a clean close (the server's FIN) before
/// any response byte: what a server closing an idle keep-alive connection
/// looks like, as opposed to a reset after it read the request.
fn closed_cleanly_before_response(e: &hyper::Error) -> bool {
    // The kernel tells the two resets apart: one arriving after the
    // server's FIN (our side in CLOSE_WAIT: the server had closed before
    // our request reached it, and its kernel refused the bytes) surfaces as
    // EPIPE; one on an open connection (the server read the request, then
    // reset) as ECONNRESET, which stays the retry policy's call.
    use std::error::Error as _;
    e.is_incomplete_message()
        || e.source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// How far an HTTP/1.1 connection has come: the requests it carried
/// (`max_requests_per_connection`) and when it was opened
/// (`max_connection_duration`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Use {
    requests: u32,
    opened: Instant,
}

impl Use {
    fn new() -> Self {
        Self {
            requests: 0,
            opened: Instant::now(),
        }
    }
}

impl std::ops::Add<u32> for Use {
    type Output = Use;

    /// The same connection, `n` requests further.
    fn add(self, n: u32) -> Use {
        Use {
            requests: self.requests.saturating_add(n),
            opened: self.opened,
        }
    }
}

/// One endpoint's own counters, as Envoy keeps them per host (the admin
/// `/clusters` page shows them).
#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_total: AtomicU64,
    pub cx_connect_fail: AtomicU64,
    pub cx_active: AtomicU64,
    pub rq_total: AtomicU64,
    /// Requests answered without a 5xx.
    pub rq_success: AtomicU64,
    /// Requests that failed or got a 5xx.
    pub rq_error: AtomicU64,
    pub rq_timeout: AtomicU64,
}

/// Counts a connection active on its host and its cluster
/// (`upstream_cx_active`) until it closes.
pub(crate) struct ActiveCx {
    host: Arc<HostStats>,
    _cluster: GaugeGuard,
}

impl ActiveCx {
    fn new(stats: &Arc<HostStats>, cluster: &ClusterStats) -> Self {
        stats.cx_active.fetch_add(1, Ordering::Relaxed);
        Self {
            host: stats.clone(),
            _cluster: cluster.upstream_cx_active().up(),
        }
    }
}

impl Drop for ActiveCx {
    fn drop(&mut self) {
        self.host.cx_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A `tcp_proxy` connection as Envoy's TCP pool keeps it: an active
/// connection and an active request of its cluster and host until it ends.
pub struct TcpAttached {
    _cx: ActiveCx,
    _rq: GaugeGuard,
    _host_rq: HostActive,
}

/// An HTTP/1.1 connection given to a request.
struct H1Conn {
    sender: http1::SendRequest<UpstreamBody>,
    /// The connection's number in its pool.
    id: u64,
    used: Use,
    /// It was pooled (it may have been closed by the server meanwhile).
    reused: bool,
    local: Option<SocketAddr>,
}

/// A stream's place on an HTTP/2 connection, and the connection's parts
/// the stream needs.
struct H2Taken {
    sender: H2Sender,
    streams: Arc<AtomicU32>,
    ended: Arc<tokio::sync::Notify>,
    slot: Slot,
}

/// An endpoint's HTTP/2 connection and its local address.
type H2Sender = (http2::SendRequest<UpstreamBody>, Option<SocketAddr>);

/// Where a pool tells the router the local address of the connection an
/// attempt got (`%UPSTREAM_LOCAL_ADDRESS%`), put in the request's
/// extensions by the router when it keeps an access log.
#[derive(Debug, Clone, Default)]
pub struct LocalAddrSlot(pub Arc<Mutex<Option<SocketAddr>>>);

impl LocalAddrSlot {
    fn report<B>(req: &Request<B>, local: Option<SocketAddr>) {
        if let (Some(slot), Some(local)) = (req.extensions().get::<LocalAddrSlot>(), local) {
            *slot.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(local);
        }
    }

    pub fn get(&self) -> Option<SocketAddr> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Connections to one endpoint address.
///
/// A cluster holds one per endpoint, and a mesh's clusters can hold a
/// hundred thousand endpoints, most of which a sidecar never calls: so what
/// every endpoint of a cluster has in common lives once in [`PoolSettings`],
/// and the connection state is only allocated when the endpoint is first
/// used ([`Conns`]). `pool_sizes_stay_small` holds the line.
pub struct EndpointPool {
    pub address: HostAddr,
    settings: Arc<PoolSettings>,
    conns: std::sync::OnceLock<Box<Conns>>,
    /// The endpoint's outlier detection state, when its cluster has a
    /// detector.
    outlier: Option<Arc<HostOutlier>>,
    /// Active health state, shared with the endpoint's health check session
    /// (endpoints that are not checked share one, never failed).
    pub health: Arc<HostHealth>,
    /// Requests in flight to this endpoint (least request).
    active: AtomicU64,
    /// When the endpoint joined the cluster (slow start).
    created: Instant,
    /// What few endpoints have (`None`: none of it).
    extras: Option<Box<PoolExtras>>,
}

/// The parts of an endpoint's pool that most endpoints lack, boxed
/// together so that a pool without them stays small.
#[derive(Clone, Default)]
struct PoolExtras {
    /// The DNS name the address came from (STRICT_DNS, EDS `hostname`),
    /// for `auto_host_rewrite` and SNI.
    hostname: Option<Arc<str>>,
    /// `health_check_config`: where the endpoint is checked (`None`: the
    /// default, its own address).
    health_check: Option<EndpointCheck>,
    /// The endpoint's connections under `per_host_thresholds`, shared with
    /// its per-name pools (the limit is in the settings).
    host_connections: Option<Arc<AtomicU32>>,
    /// The original_dst metadata an `internal_upstream` transport passes
    /// to the internal listener (the default: none).
    passthrough: ferry_model::cluster::OriginalDstMeta,
}

/// The filter state a request shares with its upstream connection, put on
/// the upstream request by the router: a request to an internal listener
/// goes on a connection carrying exactly these objects.
#[derive(Clone)]
pub struct SharedFilterState(pub Arc<ferry_model::filter_state::FilterState>);

/// What the pools of a cluster's endpoints share: the cluster's connection
/// settings and the transport their endpoints' metadata selected.
pub struct PoolSettings {
    /// The cluster's TLS settings for these endpoints (`None`: plaintext).
    /// Boxed: most clusters of a plaintext mesh have none, and a cluster
    /// holds one settings block per transport.
    tls: Option<Box<UpstreamTls>>,
    /// The internal listeners (for an internal address).
    internal: Arc<InternalListeners>,
    /// The transport is `internal_upstream`: endpoints pass their
    /// original_dst metadata to the internal listener.
    internal_upstream: bool,
    /// The live secrets, and the client configurations built from them.
    contexts: Arc<TlsContexts>,
    /// The ALPN offered when the TLS context names none: Envoy's HTTP/2
    /// pool offers h2, its HTTP/1 pool http/1.1.
    default_alpn: &'static [&'static str],
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    bind_source: Option<std::net::IpAddr>,
    stats: ClusterStats,
    shared: Arc<ClusterShared>,
    /// The cluster's `auto_sni` / `auto_san_validation` (TLS pools only).
    auto_sni: Option<ferry_model::cluster::AutoSni>,
    /// `upstream_connection_options.tcp_keepalive`.
    tcp_keepalive: Option<ferry_model::cluster::TcpKeepalive>,
    /// `max_connection_duration`: connections this old take no new request.
    max_connection_duration: Option<Duration>,
    /// `per_host_thresholds.max_connections`.
    per_host_max_connections: Option<u32>,
    /// The health state of the endpoints that are not actively checked:
    /// one for all, never failed (only a check session fails a host).
    unchecked: Arc<HostHealth>,
}

impl PoolSettings {
    fn new(cluster: &ClusterRt, tls: Option<&UpstreamTls>, internal_upstream: bool) -> Self {
        let cfg = &cluster.cfg;
        Self {
            tls: tls.cloned().map(Box::new),
            internal: cluster.internal.clone(),
            internal_upstream,
            contexts: cluster.tls.clone(),
            default_alpn: match cfg.protocol {
                ferry_model::UpstreamProtocol::Http2 => &["h2"],
                ferry_model::UpstreamProtocol::Http1 => &["http/1.1"],
                ferry_model::UpstreamProtocol::UseDownstream => &[],
            },
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            bind_source: cfg.bind_source,
            stats: cluster.stats.clone(),
            shared: cluster.shared.clone(),
            auto_sni: cfg.auto_sni.enabled().then(|| cfg.auto_sni.clone()),
            tcp_keepalive: cfg.tcp_keepalive,
            max_connection_duration: cfg.max_connection_duration,
            per_host_max_connections: cfg.circuit_breakers.per_host_max_connections,
            unchecked: Arc::default(),
        }
    }
}

/// An endpoint's connections and what it learns from using them, allocated
/// on its first connection or request.
#[derive(Default)]
struct Conns {
    /// The endpoint's own counters (shared with its per-name and per-state
    /// pools).
    host_stats: Arc<HostStats>,
    client_configs: ClientCache,
    idle: crate::upstream_h1::IdleConns,
    /// The HTTP/2 connections: a new one opens when every one has as many
    /// streams open as it may carry, as Envoy's pool does.
    h2: Mutex<Vec<H2Conn>>,
    h2_connecting: tokio::sync::Mutex<()>,
    ewma: PeakEwma,
    /// Connections per request host name, when names come from requests
    /// (each its own SNI, so its own connections, as Envoy pools by
    /// transport socket options).
    by_name: Mutex<HashMap<Arc<str>, Arc<EndpointPool>>>,
    /// Connections to an internal listener per filter state they carry
    /// (as Envoy pools by the objects shared with upstream).
    by_state: Mutex<HashMap<String, Arc<EndpointPool>>>,
    /// The filter state this pool's connections carry to the internal
    /// listener (a pool of requests that share these objects upstream).
    carried: Option<Arc<ferry_model::filter_state::FilterState>>,
}

/// One HTTP/2 connection of an endpoint.
struct H2Conn {
    sender: H2Sender,
    opened: Instant,
    /// Streams open on it, each held by an [`H2Stream`].
    streams: Arc<AtomicU32>,
    /// Told when its last open stream ends (the connection's task times
    /// `idle_timeout` from then).
    ended: Arc<tokio::sync::Notify>,
    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS`, as the connection's
    /// task last read it (hyper's 100 until the peer's settings arrive).
    peer_max: Arc<AtomicU32>,
}

impl H2Conn {
    /// Takes a stream slot if the connection has room under the peer's
    /// limit and the cluster's own `max_concurrent_streams`.
    fn take_stream(&self, configured: Option<u32>) -> Option<Slot> {
        let cap = self
            .peer_max
            .load(Ordering::Relaxed)
            .min(configured.unwrap_or(u32::MAX));
        acquire(&self.streams, cap)
    }
}

/// A stream open on an upstream HTTP/2 connection, counted against the
/// connection's capacity until dropped. It travels in the response's
/// extensions; the router moves it into the response body and a tunnel
/// into its connection, so it lasts as long as the stream. Dropping it
/// wakes requests waiting for room.
#[derive(Clone)]
pub struct H2Stream {
    _slot: Arc<StreamSlot>,
}

struct StreamSlot {
    slot: Option<Slot>,
    shared: Arc<ClusterShared>,
    /// The cluster's `upstream_rq_active`, for as long as the stream lives.
    _active: GaugeGuard,
    /// Told when the connection's last open stream ends, for its
    /// `idle_timeout`.
    ended: Arc<tokio::sync::Notify>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        // Release before waking, or the woken would still find it taken.
        let streams = self.slot.as_ref().map(|s| s.0.clone());
        drop(self.slot.take());
        self.shared.breakers.freed.notify_waiters();
        // The connection's idle time starts when its last stream ends
        // (whichever of two ending at once reads zero tells it).
        if streams.is_some_and(|n| n.load(Ordering::Acquire) == 0) {
            self.ended.notify_one();
        }
    }
}

/// Marks a request as a `tcp_proxy` tunnel's CONNECT, and notes whether
/// its stream was given a connection (then it is a request of the cluster
/// and the endpoint, as Envoy's HTTP pool counts it, whatever the answer).
#[derive(Clone, Default)]
struct TunnelStream(Arc<AtomicBool>);

/// An open tunnel's stream or `tcp_proxy` connection, active on its
/// endpoint for as long as it lives (the endpoint's `rq_active`, and its
/// load for least request), as Envoy's pools count it until it ends.
pub struct HostActive(Arc<EndpointPool>);

impl HostActive {
    fn new(pool: &Arc<EndpointPool>) -> Self {
        pool.active.fetch_add(1, Ordering::Relaxed);
        Self(pool.clone())
    }
}

impl Drop for HostActive {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request in flight on an endpoint while it lives.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bound on the per-name pools of an endpoint (`auto_sni`) before unused
/// ones are forgotten.
const MAX_NAMED_POOLS: usize = 64;

impl EndpointPool {
    fn new(address: HostAddr, settings: Arc<PoolSettings>) -> Self {
        let host_connections = settings.per_host_max_connections.map(|_| Arc::default());
        let settings_health = settings.unchecked.clone();
        let outlier = settings.shared.detector.is_some().then(Arc::default);
        let mut pool = Self {
            address,
            settings,
            conns: std::sync::OnceLock::new(),
            outlier,
            // Checked only once its `health_check_config` is known
            // (original destinations never are).
            health: settings_health,
            active: AtomicU64::new(0),
            created: Instant::now(),
            extras: None,
        };
        if host_connections.is_some() {
            pool.extras_mut().host_connections = host_connections;
        }
        pool
    }

    /// The extras, allocated to be set.
    fn extras_mut(&mut self) -> &mut PoolExtras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// The DNS name the address came from (STRICT_DNS, EDS `hostname`),
    /// for `auto_host_rewrite`.
    pub fn hostname(&self) -> Option<&Arc<str>> {
        self.extras.as_ref()?.hostname.as_ref()
    }

    fn set_hostname(&mut self, name: Option<Arc<str>>) {
        if name.is_some() || self.extras.is_some() {
            self.extras_mut().hostname = name;
        }
    }

    fn set_passthrough(&mut self, meta: ferry_model::cluster::OriginalDstMeta) {
        if meta != Default::default() || self.extras.is_some() {
            self.extras_mut().passthrough = meta;
        }
    }

    /// Sets the endpoint's `health_check_config`: checked unless it
    /// disables active health checks.
    fn set_health_check(&mut self, cfg: &Cluster, check: EndpointCheck) {
        if cfg.health_check.is_some() && !check.disabled {
            self.health = Arc::new(HostHealth::new(true));
        }
        let check = (check != EndpointCheck::default()).then_some(check);
        if check.is_some() || self.extras.is_some() {
            self.extras_mut().health_check = check;
        }
    }

    /// The endpoint's connection state, allocated on first use.
    fn conns(&self) -> &Conns {
        self.conns.get_or_init(Box::default)
    }

    /// The filter state this pool's connections carry (a per-state pool of
    /// an internal endpoint).
    fn carried(&self) -> Option<Arc<ferry_model::filter_state::FilterState>> {
        self.conns_if_used().and_then(|c| c.carried.clone())
    }

    /// The endpoint's idle HTTP/1.1 connections, if it was ever used.
    pub(crate) fn h1_idle(&self) -> Option<&crate::upstream_h1::IdleConns> {
        self.conns_if_used().map(|c| &c.idle)
    }

    /// The connection state if the endpoint was ever used.
    fn conns_if_used(&self) -> Option<&Conns> {
        self.conns.get().map(|c| &**c)
    }

    /// The original_dst metadata passed to an internal listener.
    fn passthrough(&self) -> ferry_model::cluster::OriginalDstMeta {
        self.extras
            .as_ref()
            .map(|e| e.passthrough)
            .unwrap_or_default()
    }

    /// The endpoint's `health_check_config`.
    pub fn health_check(&self) -> &EndpointCheck {
        self.extras
            .as_ref()
            .and_then(|e| e.health_check.as_ref())
            .unwrap_or(EndpointCheck::unset())
    }

    /// The endpoint's counters, for updating: allocated on first use, with
    /// its connection state.
    fn counters(&self) -> &Arc<HostStats> {
        &self.conns().host_stats
    }

    /// The endpoint's counters, for reading: all zero while it was never
    /// used.
    pub fn host_stats(&self) -> &HostStats {
        static UNUSED: HostStats = HostStats {
            cx_total: AtomicU64::new(0),
            cx_connect_fail: AtomicU64::new(0),
            cx_active: AtomicU64::new(0),
            rq_total: AtomicU64::new(0),
            rq_success: AtomicU64::new(0),
            rq_error: AtomicU64::new(0),
            rq_timeout: AtomicU64::new(0),
        };
        self.conns_if_used().map_or(&UNUSED, |c| &c.host_stats)
    }

    /// The endpoint's transport settings (`None`: plaintext).
    fn tls(&self) -> Option<&UpstreamTls> {
        self.settings.tls.as_deref()
    }

    /// The endpoint's connection count and `per_host_thresholds` limit.
    fn host_limit(&self) -> Option<(Arc<AtomicU32>, u32)> {
        Some((
            self.extras.as_ref()?.host_connections.clone()?,
            self.settings.per_host_max_connections?,
        ))
    }

    /// Requests in flight to this endpoint.
    pub fn active_requests(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// The pool of connections for `name`, the request's host: this
    /// endpoint's settings with the name as SNI and/or as the DNS SAN the
    /// server must present. Shares the endpoint's breakers and outlier
    /// state; only the connections are its own.
    fn for_name(&self, name: &str) -> Option<Arc<EndpointPool>> {
        let auto = self.settings.auto_sni.as_ref()?;
        let tls = self.tls()?;
        let mut pools = self
            .conns()
            .by_name
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pools.get(name) {
            return Some(p.clone());
        }
        if pools.len() >= MAX_NAMED_POOLS {
            // Forget names whose connections are all gone.
            pools.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_empty() || p.has_live_h2());
        }
        let mut named_tls = tls.clone();
        if auto.sni {
            named_tls.sni = Some(name.to_string());
            named_tls.auto_host_sni = false;
        }
        if auto.san_validation {
            named_tls.auto_sni_san_validation = true;
            // The name validated is the SNI sent.
            named_tls.sni = Some(name.to_string());
            named_tls.auto_host_sni = false;
        }
        let s = &self.settings;
        let settings = Arc::new(PoolSettings {
            tls: Some(Box::new(named_tls)),
            internal: s.internal.clone(),
            internal_upstream: s.internal_upstream,
            contexts: s.contexts.clone(),
            default_alpn: s.default_alpn,
            connect_timeout: s.connect_timeout,
            idle_timeout: s.idle_timeout,
            bind_source: s.bind_source,
            stats: s.stats.clone(),
            shared: s.shared.clone(),
            auto_sni: None,
            tcp_keepalive: s.tcp_keepalive,
            max_connection_duration: s.max_connection_duration,
            per_host_max_connections: s.per_host_max_connections,
            unchecked: s.unchecked.clone(),
        });
        let pool = Arc::new(EndpointPool {
            address: self.address.clone(),
            settings,
            conns: std::sync::OnceLock::from(Box::new(Conns {
                host_stats: self.counters().clone(),
                ..Conns::default()
            })),
            outlier: self.outlier.clone(),
            health: self.health.clone(),
            active: AtomicU64::new(0),
            created: self.created,
            extras: self.extras.clone(),
        });
        pools.insert(Arc::from(name), pool.clone());
        Some(pool)
    }

    /// The pool of this internal endpoint's connections that carry the
    /// filter state `req` shares upstream; `None`: the request shares none,
    /// or the endpoint is no internal listener (a socket carries no state).
    fn for_state(&self, req: &Request<UpstreamBody>) -> Option<Arc<EndpointPool>> {
        if !matches!(self.address, HostAddr::Internal(_)) || self.carried().is_some() {
            return None;
        }
        let state = req.extensions().get::<SharedFilterState>()?.0.clone();
        let key = state.identity();
        let mut pools = self
            .conns()
            .by_state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pools.get(&key) {
            return Some(p.clone());
        }
        if pools.len() >= MAX_NAMED_POOLS {
            // Forget states whose connections are all gone.
            pools.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_empty() || p.has_live_h2());
        }
        let pool = Arc::new(EndpointPool {
            address: self.address.clone(),
            settings: self.settings.clone(),
            conns: std::sync::OnceLock::from(Box::new(Conns {
                host_stats: self.counters().clone(),
                carried: Some(state),
                ..Conns::default()
            })),
            outlier: self.outlier.clone(),
            health: self.health.clone(),
            active: AtomicU64::new(0),
            created: self.created,
            extras: self.extras.clone(),
        });
        pools.insert(key, pool.clone());
        Some(pool)
    }

    /// The name a request brings for `auto_sni`: the override header, else
    /// its authority, without the port.
    fn request_name(&self, req: &Request<UpstreamBody>) -> Option<String> {
        let auto = self.settings.auto_sni.as_ref()?;
        let raw = match &auto.header {
            Some(h) => req.headers().get(h.as_str())?.to_str().ok()?.to_string(),
            None => req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                })?,
        };
        let host = match raw.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
            None => raw
                .rsplit_once(':')
                .map_or(raw.as_str(), |(h, p)| {
                    if p.chars().all(|c| c.is_ascii_digit()) {
                        h
                    } else {
                        raw.as_str()
                    }
                })
                .to_string(),
        };
        (!host.is_empty()).then_some(host)
    }

    /// Whether outlier detection ejected this endpoint.
    pub fn ejected(&self) -> bool {
        self.outlier.as_ref().is_some_and(|o| o.ejected())
    }

    /// Reports a result that the pool did not see itself (a timeout in the
    /// router) to outlier detection.
    pub fn report_local_failure(&self) {
        self.counters().rq_timeout.fetch_add(1, Ordering::Relaxed);
        self.report(Outcome::LocalFailure);
    }

    /// A `tcp_proxy` connection asked of the endpoint: Envoy's TCP pool
    /// holds it as a pending request until its connection is up.
    pub fn tcp_pending(&self) {
        self.settings.stats.upstream_rq_pending_total().inc();
    }

    /// A `tcp_proxy` connection that is up: Envoy's TCP pool counts it as
    /// a request of the cluster and the endpoint, and the connection and
    /// request active (while what is returned lives).
    pub fn tcp_attached(self: &Arc<Self>) -> TcpAttached {
        self.settings.stats.upstream_rq_total().inc();
        self.counters().rq_total.fetch_add(1, Ordering::Relaxed);
        TcpAttached {
            _cx: ActiveCx::new(self.counters(), &self.settings.stats),
            _rq: self.settings.stats.upstream_rq_active().up(),
            _host_rq: HostActive::new(self),
        }
    }

    /// Reports a connection attempt made outside the HTTP pools (the TCP
    /// proxy) to outlier detection, as a local-origin result.
    pub fn report_connect(&self, ok: bool) {
        let outcome = if ok {
            Outcome::LocalSuccessFinal
        } else {
            Outcome::LocalFailure
        };
        self.report(outcome);
    }

    /// Tells outlier detection, if the cluster has it, about one result.
    fn report(&self, outcome: Outcome) {
        if let Some(o) = &self.outlier {
            self.settings.shared.report(o, outcome);
        }
    }

    /// Counts a request's outcome on the endpoint and tells its outlier
    /// detector and latency estimate. A tunnel's CONNECT (`tunnel`) counts
    /// as Envoy's TCP proxy counts it: one request of the endpoint once its
    /// stream had a connection, neither a success nor an error (those are
    /// the router's).
    fn record(
        &self,
        tunnel: Option<&TunnelStream>,
        start: Instant,
        r: &Result<Response<Incoming>, UpstreamError>,
    ) {
        let hs = self.counters();
        match tunnel {
            Some(t) => {
                if t.0.load(Ordering::Relaxed) {
                    hs.rq_total.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                hs.rq_total.fetch_add(1, Ordering::Relaxed);
                match &r {
                    Ok(resp) if resp.status().is_server_error() => {
                        hs.rq_error.fetch_add(1, Ordering::Relaxed)
                    }
                    Ok(_) => hs.rq_success.fetch_add(1, Ordering::Relaxed),
                    Err(_) => hs.rq_error.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
        match &r {
            Ok(resp) => {
                self.conns().ewma.observe(start.elapsed(), Instant::now());
                self.report(Outcome::LocalSuccess);
                self.report(Outcome::Status(resp.status().as_u16()));
            }
            Err(UpstreamError::Overflow) => {}
            Err(_) => self.report(Outcome::LocalFailure),
        }
    }

    fn is_empty(&self) -> bool {
        self.conns_if_used().is_none_or(|c| c.idle.is_empty())
    }

    /// Opens a connection to the endpoint within the connect timeout, TLS
    /// when the endpoint's transport says so (the handshake counts against
    /// the same timeout, as Envoy's connect timeout covers it).
    pub async fn connect(&self) -> Result<UpstreamIo, UpstreamError> {
        self.connect_carrying(None).await
    }

    /// [`Self::connect`], handing an internal listener the filter state
    /// the request shares with its upstream connection.
    pub async fn connect_carrying(
        &self,
        filter_state: Option<Arc<ferry_model::filter_state::FilterState>>,
    ) -> Result<UpstreamIo, UpstreamError> {
        self.settings.stats.upstream_cx_total().inc();
        self.counters().cx_total.fetch_add(1, Ordering::Relaxed);
        let tls = match self.tls() {
            None => None,
            Some(t) => match self.settings.contexts.client(
                t,
                self.settings.default_alpn,
                &self.conns().client_configs,
            ) {
                Ok(c) => Some((t, c)),
                Err(e) => {
                    self.settings.stats.upstream_cx_connect_fail().inc();
                    self.settings.stats.ssl_connection_error().inc();
                    // Per connection attempt (a missing secret fails every
                    // one): counted, logged at debug like handshake failures.
                    tracing::debug!(upstream.host = %self.address, error = %e, "upstream TLS settings unusable");
                    return Err(UpstreamError::Tls(e.to_string()));
                }
            },
        };
        let handshake = async {
            let addr = match &self.address {
                HostAddr::Ip(a) => *a,
                HostAddr::Internal(i) => {
                    if tls.is_some() {
                        return Err(UpstreamError::Tls(
                            "TLS to an internal listener is not supported".into(),
                        ));
                    }
                    return self
                        .settings
                        .internal
                        .connect(i, self.passthrough(), filter_state)
                        .map(UpstreamIo::Internal)
                        .map_err(|e| {
                            UpstreamError::ConnectFailure(std::io::Error::new(
                                std::io::ErrorKind::ConnectionRefused,
                                e,
                            ))
                        });
                }
                HostAddr::Pipe(p) => {
                    let unix = connect_pipe(p)
                        .await
                        .map_err(UpstreamError::ConnectFailure)?;
                    let Some((t, config)) = tls else {
                        return Ok(UpstreamIo::Unix(unix));
                    };
                    // No address to name the server by: without `sni` no
                    // name is sent (an IP literal never goes into SNI), as
                    // Envoy sends none; the peer check never reads it.
                    let name = ferry_tls::server_name(
                        t,
                        self.hostname().map(|h| &**h),
                        std::net::Ipv4Addr::LOCALHOST.into(),
                    );
                    return match tokio_rustls::TlsConnector::from(config)
                        .connect(name, unix)
                        .await
                    {
                        Ok(s) => {
                            self.settings.stats.ssl_handshake().inc();
                            Ok(UpstreamIo::UnixTls(Box::new(s)))
                        }
                        Err(e) => {
                            self.settings.stats.ssl_connection_error().inc();
                            tracing::debug!(upstream.host = %self.address, error = %e, "upstream TLS handshake failed");
                            Err(UpstreamError::Tls(e.to_string()))
                        }
                    };
                }
            };
            let tcp = async {
                let tcp = match self.settings.bind_source {
                    None => TcpStream::connect(addr).await,
                    Some(src) => {
                        let sock = if addr.is_ipv4() {
                            tokio::net::TcpSocket::new_v4()?
                        } else {
                            tokio::net::TcpSocket::new_v6()?
                        };
                        sock.bind(std::net::SocketAddr::new(src, 0))?;
                        sock.connect(addr).await
                    }
                }?;
                let _ = tcp.set_nodelay(true);
                if let Some(k) = &self.settings.tcp_keepalive {
                    keepalive(&tcp, k);
                }
                Ok::<_, std::io::Error>(tcp)
            }
            .await
            .map_err(UpstreamError::ConnectFailure)?;
            let Some((t, config)) = tls else {
                return Ok(UpstreamIo::Plain(tcp));
            };
            let name = ferry_tls::server_name(t, self.hostname().map(|h| &**h), addr.ip());
            match tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
            {
                Ok(s) => {
                    self.settings.stats.ssl_handshake().inc();
                    Ok(UpstreamIo::Tls(Box::new(s)))
                }
                Err(e) => {
                    self.settings.stats.ssl_connection_error().inc();
                    tracing::debug!(upstream.host = %self.address, error = %e, "upstream TLS handshake failed");
                    Err(UpstreamError::Tls(e.to_string()))
                }
            }
        };
        let r = tokio::time::timeout(self.settings.connect_timeout, handshake).await;
        if !matches!(r, Ok(Ok(_))) {
            self.counters()
                .cx_connect_fail
                .fetch_add(1, Ordering::Relaxed);
        }
        match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                self.settings.stats.upstream_cx_connect_fail().inc();
                Err(e)
            }
            Err(_) => {
                self.settings.stats.upstream_cx_connect_fail().inc();
                self.settings.stats.upstream_cx_connect_timeout().inc();
                Err(UpstreamError::ConnectTimeout)
            }
        }
    }

    /// A pooled HTTP/1.1 connection (unless `fresh`) or a new one within
    /// `max_connections`: at the limit the request waits, as a pending
    /// request, for a pooled connection to come back (not with `fresh`) or a
    /// connection to close. An `upgrade` request always gets a new
    /// connection, whose codec can hand an upgraded socket over.
    async fn new_or_pooled_h1(
        self: &Arc<Self>,
        fresh: bool,
        upgrade: bool,
    ) -> Result<H1Conn, UpstreamError> {
        let breakers = &self.settings.shared.breakers;
        let mut pending = None;
        loop {
            if !fresh
                && !upgrade
                && let Some(lease) = self.conns_if_used().and_then(|c| {
                    c.idle.checkout(|since, used| {
                        let expired = self
                            .settings
                            .idle_timeout
                            .is_some_and(|t| since.elapsed() >= t);
                        !expired && !self.too_old(used.opened)
                    })
                })
            {
                let sender = match lease.conn {
                    upstream_h1::Checkout::Live(sender) => sender,
                    upstream_h1::Checkout::Parked(parked) => {
                        self.start_h1(parked.io, parked.held, lease.id, false)
                            .await?
                    }
                };
                return Ok(H1Conn {
                    sender,
                    id: lease.id,
                    used: lease.used,
                    reused: true,
                    local: lease.local,
                });
            }
            let freed = breakers.freed.notified();
            if let Some(slot) = breakers.connection(self.host_limit().as_ref()) {
                // Boxed: a new connection's state (TCP, TLS and the codec's
                // handshake) would otherwise be room in every request's
                // future, though most requests take a pooled connection.
                return Box::pin(self.connect_h1(slot, upgrade)).await;
            }
            if pending.is_none() {
                // As Envoy: a full pending queue fails the request before a
                // connection is even asked for.
                pending = Some(breakers.pending()?);
                breakers.stats.upstream_cx_overflow().inc();
            }
            // Bounded wait: a missed wake-up only costs one more pass.
            let _ = tokio::time::timeout(Duration::from_millis(50), freed).await;
        }
    }

    async fn connect_h1(
        self: &Arc<Self>,
        slot: Slot,
        upgrade: bool,
    ) -> Result<H1Conn, UpstreamError> {
        self.settings.stats.upstream_cx_http1_total().inc();
        let io = self.connect_carrying(self.carried()).await?;
        let local = io.local_addr();
        let held = upstream_h1::Held::new(
            slot,
            ActiveCx::new(self.counters(), &self.settings.stats),
            self.settings.shared.clone(),
        );
        let id = upstream_h1::next_id();
        let sender = self.start_h1(io, held, id, upgrade).await?;
        Ok(H1Conn {
            sender,
            id,
            used: Use::new(),
            reused: false,
            local,
        })
    }

    /// hyper's HTTP/1.1 codec on a connection, new or parked, and the task
    /// driving it.
    async fn start_h1(
        self: &Arc<Self>,
        io: UpstreamIo,
        held: upstream_h1::Held,
        id: u64,
        upgrade: bool,
    ) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let mut builder = http1::Builder::new();
        crate::http::header_case(&mut builder, self.settings.shared.header_case);
        let (sender, codec) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(UpstreamError::Reset)?;
        if upgrade {
            tokio::spawn(upstream_h1::drive_upgradeable(codec, held));
        } else {
            tokio::spawn(upstream_h1::drive(
                Box::new(codec),
                held,
                Arc::downgrade(self),
                id,
                self.settings.idle_timeout,
            ));
        }
        Ok(sender)
    }

    /// Sends an HTTP/1.1 request on a pooled or new connection.
    pub async fn send_h1(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send(false, req).await
    }

    /// The pool a request goes to instead of this one: the endpoint's pool
    /// for the server name the request asks for, or the one carrying the
    /// filter state it shares upstream. One `await` on whichever pool it
    /// is keeps the request's future one send deep, not one per case.
    fn other_pool(&self, req: &Request<UpstreamBody>) -> Option<Arc<EndpointPool>> {
        self.request_name(req)
            .and_then(|n| self.for_name(&n))
            .or_else(|| self.for_state(req))
    }

    async fn send_h1_inner(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // At most one more attempt, on a fresh connection, for the keep-alive race.
        let mut fresh = false;
        let upgrade = req.method() == http::Method::CONNECT
            || req.headers().contains_key(http::header::UPGRADE);
        loop {
            let H1Conn {
                mut sender,
                id,
                used,
                reused,
                local,
            } = self.new_or_pooled_h1(fresh, upgrade).await?;
            LocalAddrSlot::report(&req, local);
            // A bodiless idempotent request may be sent again (RFC 9110 §9.2.2) when
            // the server's close crossed it on the wire: keep a copy of its head
            // while it rides a reused connection.
            let replay = if reused { replayable(&req) } else { None };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    if let Err(why) = crate::http::h1_guard::response_framing(resp.headers()) {
                        // Dropped unread, the response takes its connection
                        // with it: it is never pooled again.
                        tracing::debug!(upstream.host = %self.address, error = why, "upstream response framing refused");
                        return Err(UpstreamError::Protocol(why.to_string()));
                    }
                    self.release_when_idle(sender, id, used + 1, local);
                    return Ok(resp);
                }
                Err(mut e) => {
                    let back = e.take_message();
                    let e = e.into_error();
                    let again = match (reused, back, replay) {
                        // Not a byte was written: safe to send again, whatever the method.
                        (true, Some(back), _) => back,
                        // The server closed the idle connection as the request crossed
                        // it: a clean close before any answer. A reset (RST) means the
                        // server reacted to what it read; that is the retry policy's call.
                        (true, None, Some(again)) if closed_cleanly_before_response(&e) => again,
                        // An answer that could not be parsed: a bad gateway.
                        _ if e.is_parse() => return Err(UpstreamError::Protocol(e.to_string())),
                        _ => return Err(UpstreamError::Reset(e)),
                    };
                    tracing::debug!(
                        upstream.host = %self.address,
                        error = %e,
                        "reused connection closed by the server; sending once more on a new connection"
                    );
                    self.settings
                        .stats
                        .upstream_rq_retry_stale_connection()
                        .inc();
                    req = again;
                    fresh = true;
                }
            }
        }
    }

    /// Puts the connection back once its response has been read completely.
    fn release_when_idle(
        self: &Arc<Self>,
        mut sender: http1::SendRequest<UpstreamBody>,
        id: u64,
        used: Use,
        local: Option<SocketAddr>,
    ) {
        if self
            .settings
            .shared
            .max_requests_per_connection
            .is_some_and(|max| used.requests >= max)
            || self.too_old(used.opened)
        {
            // Dropping the sender closes the connection once the response is read.
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(pool) = pool.upgrade() else { return };
            pool.conns().idle.put(sender, id, used, local);
            pool.settings.shared.breakers.freed.notify_waiters();
        });
    }

    /// A stream slot on a live HTTP/2 connection with room for it, if
    /// there is one; connections closed or past `max_connection_duration`
    /// are let go on the way (their streams finish, then they close).
    fn h2_stream(&self) -> Option<H2Taken> {
        let mut conns = self
            .conns_if_used()?
            .h2
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.sender.0.is_closed() && !self.too_old(c.opened));
        let configured = self.settings.shared.max_concurrent_streams;
        conns.iter().find_map(|c| {
            let slot = c.take_stream(configured)?;
            Some(H2Taken {
                sender: c.sender.clone(),
                streams: c.streams.clone(),
                ended: c.ended.clone(),
                slot,
            })
        })
    }

    /// Whether the endpoint holds an HTTP/2 connection still open.
    fn has_live_h2(&self) -> bool {
        self.conns_if_used().is_some_and(|c| {
            c.h2.lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|c| !c.sender.0.is_closed())
        })
    }

    /// Lets go of the HTTP/2 connection whose streams `streams` counts if
    /// none is open: under the lock a new stream is taken under, so none
    /// can start on it after.
    fn forget_h2_if_idle(&self, streams: &Arc<AtomicU32>) -> bool {
        let Some(c) = self.conns_if_used() else {
            return false;
        };
        let mut conns = c.h2.lock().unwrap_or_else(|p| p.into_inner());
        if streams.load(Ordering::Acquire) != 0 {
            return false;
        }
        conns.retain(|c| !Arc::ptr_eq(&c.streams, streams));
        true
    }

    /// Lets go of the HTTP/2 connection whose streams `streams` counts.
    fn forget_h2(&self, streams: &Arc<AtomicU32>) {
        if let Some(c) = self.conns_if_used() {
            c.h2.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|c| !Arc::ptr_eq(&c.streams, streams));
        }
    }

    /// Opens one more HTTP/2 connection to the endpoint, under the
    /// cluster's `max_connections`.
    async fn open_h2(self: &Arc<Self>) -> Result<(), UpstreamError> {
        let Some(slot) = self
            .settings
            .shared
            .breakers
            .connection(self.host_limit().as_ref())
        else {
            return Err(UpstreamError::Overflow);
        };
        self.settings.stats.upstream_cx_http2_total().inc();
        let tcp = self.connect_carrying(self.carried()).await?;
        let local = tcp.local_addr();
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(None)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(UpstreamError::Reset)?;
        let active = ActiveCx::new(self.counters(), &self.settings.stats);
        let peer_max = Arc::new(AtomicU32::new(saturate(conn.current_max_send_streams())));
        let seen = peer_max.clone();
        let stats = self.settings.stats.clone();
        let streams: Arc<AtomicU32> = Arc::default();
        let ended = Arc::new(tokio::sync::Notify::new());
        let idle = self.settings.idle_timeout.map(|t| {
            let pool = Arc::downgrade(self);
            let (streams, ended) = (streams.clone(), ended.clone());
            // Polled only when its timer or a stream's end woke it.
            crate::http::on_wake::OnWake::new(async move {
                h2_idle(&pool, &streams, &ended, t).await;
            })
        });
        tokio::spawn(async move {
            let _active = active;
            let mut conn = std::pin::pin!(conn);
            // The peer's stream limit can change with any SETTINGS frame:
            // read it after every turn of the connection.
            let run = std::future::poll_fn(|cx| {
                let turn = conn.as_mut().poll(cx);
                seen.store(saturate(conn.current_max_send_streams()), Ordering::Relaxed);
                turn
            });
            match idle {
                None => {
                    let _ = run.await;
                }
                Some(idle) => {
                    tokio::pin!(run);
                    tokio::select! {
                        _ = run.as_mut() => {}
                        () = idle => {
                            // Out of the pool with no stream open: the
                            // connection sends GOAWAY and closes once the
                            // last sender is gone, as Envoy's does.
                            stats.upstream_cx_idle_timeout().inc();
                            let _ = run.await;
                        }
                    }
                }
            }
            stats.upstream_cx_destroy().inc();
            drop(slot);
        });
        self.conns()
            .h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(H2Conn {
                sender: (sender, local),
                opened: Instant::now(),
                streams,
                ended,
                peer_max,
            });
        Ok(())
    }

    /// Whether a connection opened at `opened` reached
    /// `max_connection_duration`.
    fn too_old(&self, opened: Instant) -> bool {
        self.settings
            .max_connection_duration
            .is_some_and(|max| opened.elapsed() >= max)
    }

    /// Opens a tunnel through the endpoint (`tcp_proxy.tunneling_config`):
    /// an HTTP/2 CONNECT stream to `authority` on the endpoint's shared
    /// HTTP/2 connection (one per endpoint, so per destination and
    /// identity), bytes both ways once it answers 2xx.
    pub async fn connect_tunnel(
        self: &Arc<Self>,
        authority: &str,
        headers: &[(String, String)],
    ) -> Result<UpstreamIo, UpstreamError> {
        let bad = |what: String| {
            UpstreamError::ConnectFailure(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                what,
            ))
        };
        let uri = http::Uri::builder()
            .authority(authority)
            .build()
            .map_err(|e| bad(format!("tunnel authority {authority:?}: {e}")))?;
        let mut req = Request::builder()
            .method(http::Method::CONNECT)
            .version(http::Version::HTTP_2)
            .uri(uri);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let mut req = req
            .body(UpstreamBody::empty())
            .map_err(|e| bad(format!("tunnel request: {e}")))?;
        // The carrying connection's local address, for the access log.
        let local = LocalAddrSlot::default();
        req.extensions_mut().insert(local.clone());
        req.extensions_mut().insert(TunnelStream::default());
        let open = async {
            let mut resp = self.send_h2(req).await?;
            if !resp.status().is_success() {
                return Err(UpstreamError::ConnectFailure(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("CONNECT answered {}", resp.status().as_u16()),
                )));
            }
            let stream = resp.extensions_mut().remove::<H2Stream>();
            let upgraded = hyper::upgrade::on(&mut resp)
                .await
                .map_err(UpstreamError::Reset)?;
            Ok(UpstreamIo::Tunnel(
                Box::new(crate::tls::TunnelIo {
                    io: TokioIo::new(upgraded),
                    _stream: stream,
                    _active: HostActive::new(self),
                }),
                local.get(),
            ))
        };
        match tokio::time::timeout(self.settings.connect_timeout, open).await {
            Ok(r) => r,
            Err(_) => {
                self.settings.stats.upstream_cx_connect_timeout().inc();
                Err(UpstreamError::ConnectTimeout)
            }
        }
    }

    /// Sends a request on an HTTP/2 stream or an HTTP/1.1 connection, under
    /// the cluster's request breaker, counted in flight while it runs.
    pub async fn send(
        self: &Arc<Self>,
        h2: bool,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let tunnel = if h2 {
            req.extensions().get::<TunnelStream>().cloned()
        } else {
            None
        };
        let other = self.other_pool(&req);
        let pool = other.as_ref().unwrap_or(self);
        let _slot = self.settings.shared.breakers.request()?;
        self.active.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.active);
        let start = Instant::now();
        // Awaited here, not through a wrapper taking the send as a value:
        // such a wrapper holds the send twice (as its argument and as what
        // it awaits), and this state is part of every request's.
        let r = if h2 {
            pool.send_h2_inner(req).await
        } else {
            pool.send_h1_inner(req).await
        };
        self.record(tunnel.as_ref(), start, &r);
        r
    }

    /// Sends a request on the endpoint's shared HTTP/2 connection.
    pub async fn send_h2(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send(true, req).await
    }

    async fn send_h2_inner(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // A connection found closed (GOAWAY, or gone) before the stream was
        // opened gets the request back unsent: it is sent once more, on
        // another connection.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let H2Taken {
                sender: (mut sender, local),
                streams,
                ended,
                slot,
            } = self.h2_stream_or_wait().await?;
            // The stream has its connection: Envoy's HTTP pool counts it
            // active from here until it ends, and a tunnel's CONNECT as a
            // request of the cluster (the router counts its own requests).
            let active = self.settings.stats.upstream_rq_active().up();
            if let Some(t) = req.extensions().get::<TunnelStream>()
                && !t.0.swap(true, Ordering::Relaxed)
            {
                self.settings.stats.upstream_rq_total().inc();
            }
            let stream = H2Stream {
                _slot: Arc::new(StreamSlot {
                    slot: Some(slot),
                    shared: self.settings.shared.clone(),
                    _active: active,
                    ended,
                }),
            };
            LocalAddrSlot::report(&req, local);
            if sender.ready().await.is_err() {
                self.forget_h2(&streams);
                if attempts < 2 {
                    continue;
                }
            }
            match sender.try_send_request(req).await {
                Ok(mut resp) => {
                    resp.extensions_mut().insert(stream);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if attempts < 2 => {
                        self.settings
                            .stats
                            .upstream_rq_retry_stale_connection()
                            .inc();
                        self.forget_h2(&streams);
                        req = back;
                    }
                    _ => return Err(UpstreamError::Reset(e.into_error())),
                },
            }
        }
    }

    /// A stream slot on one of the endpoint's HTTP/2 connections: on one
    /// with room, else on a new one, else (at `max_connections`, every
    /// connection full) waiting as a pending request for a stream to end.
    async fn h2_stream_or_wait(self: &Arc<Self>) -> Result<H2Taken, UpstreamError> {
        let breakers = &self.settings.shared.breakers;
        let mut pending = None;
        let mut queued = false;
        loop {
            let freed = breakers.freed.notified();
            if let Some(s) = self.h2_stream() {
                return Ok(s);
            }
            if !queued {
                // No connection with room: the stream waits for one (a new
                // connection or a stream's end), as Envoy's pending request.
                queued = true;
                self.settings.stats.upstream_rq_pending_total().inc();
            }
            {
                // One connection attempt at a time; the others wait and share it.
                let _connecting = self.conns().h2_connecting.lock().await;
                if let Some(s) = self.h2_stream() {
                    return Ok(s);
                }
                // Boxed, as `connect_h1` is in `new_or_pooled_h1`.
                match Box::pin(self.open_h2()).await {
                    Ok(()) => continue,
                    Err(UpstreamError::Overflow) if self.has_live_h2() => {}
                    Err(UpstreamError::Overflow) => {
                        breakers.stats.upstream_cx_overflow().inc();
                        return Err(UpstreamError::Overflow);
                    }
                    Err(e) => return Err(e),
                }
            }
            if pending.is_none() {
                breakers.stats.upstream_cx_overflow().inc();
                pending = Some(breakers.pending()?);
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), freed).await;
        }
    }
}

/// Resolves once an HTTP/2 connection has had no stream open for `t`
/// (from its opening or its last stream's end), taken out of its pool.
async fn h2_idle(
    pool: &std::sync::Weak<EndpointPool>,
    streams: &Arc<AtomicU32>,
    ended: &tokio::sync::Notify,
    t: Duration,
) {
    loop {
        if streams.load(Ordering::Acquire) != 0 {
            ended.notified().await;
            continue;
        }
        tokio::select! {
            // A stream came and went: the idle time starts again.
            () = ended.notified() => continue,
            () = tokio::time::sleep(t) => {}
        }
        match pool.upgrade() {
            Some(p) if p.forget_h2_if_idle(streams) => return,
            Some(_) => {}
            // The endpoint is gone: its connections close with their senders.
            None => return std::future::pending().await,
        }
    }
}

/// A stream count as the pool keeps it.
fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint nobody called costs its pool and nothing more (its
    /// counters and connection state come with its first use, its outlier
    /// state only with a detector): a mesh with 100,000 endpoints holds this
    /// many of them.
    #[test]
    fn pool_sizes_stay_small() {
        let endpoint = std::mem::size_of::<Endpoint>();
        assert!(endpoint <= 72, "ferry_model::Endpoint is {endpoint} bytes");
        let pool = std::mem::size_of::<EndpointPool>();
        // With its `Arc`'s two counts, 128 bytes: one allocator size class
        // (it was 160, in the 192-byte class, before the rarely set parts
        // moved into `PoolExtras` and the host counters into `Conns`).
        assert!(pool <= 112, "EndpointPool is {pool} bytes");
        // One per cluster and transport: its TLS settings are boxed (it was
        // 392 bytes with them inline, TLS or not).
        let settings = std::mem::size_of::<PoolSettings>();
        assert!(settings <= 216, "PoolSettings is {settings} bytes");
        // Endpoints of one cluster share one settings block.
        let stats = Stats::default();
        let mut cfg = Arc::unwrap_or_clone(cluster(&[1, 2, 3]));
        cfg.outlier_detection = None;
        let rt = ClusterRt::new(
            Arc::new(cfg),
            &stats,
            None,
            &Arc::default(),
            &Arc::default(),
        );
        let hosts = rt.balancer.load().hosts().to_vec();
        assert_eq!(hosts.len(), 3);
        assert!(Arc::ptr_eq(&hosts[0].settings, &hosts[2].settings));
        for p in &hosts {
            assert!(p.conns.get().is_none() && p.extras.is_none());
            assert!(p.outlier.is_none(), "no detector, no outlier state");
            assert_eq!(p.host_stats().rq_total.load(Ordering::Relaxed), 0);
        }
    }

    use ferry_model::cluster::{LbConfig, OutlierDetection};
    use ferry_model::{Endpoint, LbPolicy, UpstreamProtocol};

    fn endpoint(port: u16) -> Endpoint {
        Endpoint::at(SocketAddr::from(([127, 0, 0, 1], port)).into())
    }

    fn cluster(ports: &[u16]) -> Arc<Cluster> {
        Arc::new(Cluster {
            name: "c".into(),
            kind: ClusterKind::Static(Arc::new(ports.iter().map(|p| endpoint(*p)).collect())),
            connect_timeout: Duration::from_secs(1),
            lb_policy: LbPolicy::RoundRobin,
            lb: LbConfig::default(),
            outlier_detection: Some(Box::new(OutlierDetection {
                consecutive_5xx: 2,
                max_ejection_percent: 100,
                ..OutlierDetection::default()
            })),
            circuit_breakers: ferry_model::cluster::CircuitBreakers {
                default: Thresholds {
                    max_requests: 2,
                    max_retries: 1,
                    ..Thresholds::default()
                },
                ..Default::default()
            },
            max_concurrent_streams: None,
            protocol: UpstreamProtocol::Http1,
            idle_timeout: None,
            max_requests_per_connection: None,
            header_case: Default::default(),
            bind_source: None,
            tls: None,
            transport_socket_matches: vec![],
            internal_upstream: false,
            istio_service: None,
            metadata_exchange: None,
            auto_sni: Default::default(),
            tcp_keepalive: None,
            max_connection_duration: None,
            dns: Default::default(),
            health_check: None,
            ignore_health_on_host_removal: false,
        })
    }

    #[tokio::test]
    async fn an_endpoint_update_rebuilds_only_the_clusters_named_as_changed() {
        use ferry_model::ClusterChanges;
        let stats = Stats::default();
        let (tls, internal) = (Arc::default(), Arc::default());
        let named = |name: &str, ports: &[u16]| {
            let mut c = (*cluster(ports)).clone();
            c.name = name.into();
            Arc::new(c)
        };
        let snap = |serial, clusters: &[&Arc<Cluster>], names: Option<(u64, &[&str])>| Snapshot {
            clusters: clusters
                .iter()
                .map(|c| (c.name.clone(), Arc::clone(c)))
                .collect(),
            serial,
            cluster_changes: names.map(|(after, n)| ClusterChanges {
                after,
                names: n.iter().map(|s| s.to_string()).collect(),
            }),
            ..Default::default()
        };
        let build = |s: &Snapshot, prev: Option<&ClusterManager>| {
            ClusterManager::build(s, prev, &stats, &tls, &internal)
        };
        let rt = |m: &ClusterManager, name: &str| m.get(name).cloned().expect("cluster");
        let (a, b, c) = (named("a", &[1]), named("b", &[2]), named("c", &[3]));
        let first = build(&snap(1, &[&a, &b, &c], None), None);
        // b's endpoints change. c's differ too, but the snapshot names b
        // alone (the store names every cluster that differs): c is not even
        // looked at.
        let (b2, c2) = (named("b", &[2, 4]), named("c", &[5]));
        let second = build(&snap(2, &[&a, &b2, &c2], Some((1, &["b"]))), Some(&first));
        assert!(Arc::ptr_eq(&rt(&first, "a"), &rt(&second, "a")));
        assert!(Arc::ptr_eq(&rt(&first, "c"), &rt(&second, "c")));
        let (old_b, new_b) = (rt(&first, "b"), rt(&second, "b"));
        assert!(Arc::ptr_eq(&new_b.cfg, &b2));
        // An endpoint-only change keeps the breakers, the detector and the
        // pool of the endpoint that stays.
        assert!(Arc::ptr_eq(&old_b.shared, &new_b.shared));
        let pool = |r: &ClusterRt, port: u16| {
            r.balancer
                .load()
                .hosts()
                .iter()
                .find(|p| p.address == HostAddr::Ip(SocketAddr::from(([127, 0, 0, 1], port))))
                .cloned()
                .expect("pool")
        };
        assert!(Arc::ptr_eq(&pool(&old_b, 2), &pool(&new_b, 2)));
        assert_eq!(new_b.balancer.load().hosts().len(), 2);
        // Changes counted from another snapshot than the one the manager
        // was built for: every cluster is compared, so c is rebuilt.
        let third = build(&snap(3, &[&a, &b2, &c2], Some((1, &[]))), Some(&second));
        assert!(Arc::ptr_eq(&rt(&third, "c").cfg, &c2));
        assert!(Arc::ptr_eq(&rt(&third, "b"), &new_b));
        // A cluster named as changed and absent is gone.
        let fourth = build(&snap(4, &[&a, &c2], Some((3, &["b"]))), Some(&third));
        assert!(fourth.get("b").is_none());
        assert_eq!(fourth.iter().count(), 2);
    }

    #[tokio::test]
    async fn a_change_to_one_cluster_among_many_copies_only_its_shard() {
        use ferry_model::ClusterChanges;
        let stats = Stats::default();
        let (tls, internal) = (Arc::default(), Arc::default());
        let base = cluster(&[1]);
        let named = |i: usize| {
            let mut c = (*base).clone();
            c.name = format!("c{i}");
            Arc::new(c)
        };
        let all: Vec<Arc<Cluster>> = (0..1000).map(named).collect();
        let mut snap = Snapshot {
            clusters: all.iter().map(|c| (c.name.clone(), c.clone())).collect(),
            serial: 1,
            ..Default::default()
        };
        let first = ClusterManager::build(&snap, None, &stats, &tls, &internal);
        snap.clusters.insert("c7".into(), cluster(&[2]));
        snap.serial = 2;
        snap.cluster_changes = Some(ClusterChanges {
            after: 1,
            names: vec!["c7".into()],
        });
        let second = ClusterManager::build(&snap, Some(&first), &stats, &tls, &internal);
        let (a, b) = (&first.clusters, &second.clusters);
        let copied: Vec<&String> = a.keys().filter(|n| !a.shares_shard_of(b, n)).collect();
        assert!(
            (1..=128).contains(&copied.len()) && copied.contains(&&"c7".to_string()),
            "only c7's shard is new: {copied:?}"
        );
        assert_eq!(second.iter().count(), 1000);
        assert!(!Arc::ptr_eq(
            first.get("c7").expect("c7"),
            second.get("c7").expect("c7")
        ));
        assert!(Arc::ptr_eq(
            first.get("c8").expect("c8"),
            second.get("c8").expect("c8")
        ));
    }

    /// A listener on a free loopback port, and its address.
    async fn local_listener() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        (listener, addr)
    }

    /// A local HTTP/1.1 server answering `/healthz` with the status held
    /// in the returned cell.
    async fn status_server() -> (SocketAddr, Arc<AtomicU32>) {
        let (listener, addr) = local_listener().await;
        let status = Arc::new(AtomicU32::new(200));
        let st = status.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let code = st.load(Ordering::SeqCst) as u16;
                        async move {
                            let mut r = Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                            *r.status_mut() =
                                http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        (addr, status)
    }

    fn http_check(unhealthy: u32, healthy: u32) -> ferry_model::health_check::HealthCheck {
        use ferry_model::health_check as hc;
        let every = Duration::from_millis(30);
        hc::HealthCheck {
            timeout: Duration::from_secs(1),
            interval: every,
            initial_jitter: Duration::ZERO,
            interval_jitter: Duration::ZERO,
            interval_jitter_percent: 0,
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
            no_traffic_interval: every,
            no_traffic_healthy_interval: every,
            unhealthy_interval: every,
            unhealthy_edge_interval: every,
            healthy_edge_interval: every,
            reuse_connection: true,
            transport_socket_match_criteria: None,
            checker: hc::Checker::Http(hc::HttpCheck {
                host: None,
                path: "/healthz".into(),
                method: http::Method::GET,
                headers_to_add: vec![],
                headers_to_remove: vec![],
                expected_statuses: vec![(200, 201)],
                retriable_statuses: vec![(503, 504)],
                http2: false,
                service_name_matcher: None,
            }),
        }
    }

    async fn wait_until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting: {what}");
    }

    /// A local HTTP/1.1 server answering 200 and counting its connections.
    async fn counting_server() -> (SocketAddr, Arc<AtomicU32>) {
        let (listener, addr) = local_listener().await;
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                            bytes::Bytes,
                        >::new(
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        (addr, count)
    }

    fn cluster_at(addr: SocketAddr, edit: impl FnOnce(&mut Cluster)) -> Arc<Cluster> {
        let mut c = Arc::unwrap_or_clone(cluster(&[addr.port()]));
        if let ClusterKind::Static(eps) = &mut c.kind {
            for e in Arc::make_mut(eps).iter_mut() {
                e.address = addr.into();
            }
        }
        edit(&mut c);
        Arc::new(c)
    }

    async fn get(pool: &Arc<EndpointPool>) -> u16 {
        let req = Request::builder()
            .uri("/")
            .header(http::header::HOST, "backend")
            .body(UpstreamBody::empty())
            .unwrap_or_else(|e| panic!("request: {e}"));
        let resp = pool
            .send_h1(req)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let status = resp.status().as_u16();
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        status
    }

    #[tokio::test]
    async fn active_health_checks_fail_recover_and_stop_with_their_host() {
        let (good, _) = status_server().await;
        let (bad, status) = status_server().await;
        let stats = Stats::default();
        let make = |addrs: &[SocketAddr], removal_ignored: bool| {
            let mut c = Arc::unwrap_or_clone(cluster(&[]));
            c.outlier_detection = None;
            c.kind = ClusterKind::Static(Arc::new(
                addrs
                    .iter()
                    .map(|a| Endpoint {
                        address: (*a).into(),
                        ..endpoint(0)
                    })
                    .collect(),
            ));
            c.health_check = Some(Box::new(http_check(2, 2)));
            c.ignore_health_on_host_removal = removal_ignored;
            Arc::new(c)
        };
        status.store(500, Ordering::SeqCst);
        let rt = Arc::new(ClusterRt::new(
            make(&[good, bad], false),
            &stats,
            None,
            &Arc::default(),
            &Arc::default(),
        ));
        rt.watch_removed_hosts();
        let pool = |a: SocketAddr| {
            rt.hosts
                .load()
                .iter()
                .find(|(p, _)| p.address == HostAddr::Ip(a))
                .map(|(p, _)| p.clone())
                .unwrap_or_else(|| panic!("no host {a}"))
        };
        let (g, b) = (pool(good), pool(bad));
        // Both start failed; one pass makes a host healthy at first.
        tokio::time::timeout(Duration::from_secs(2), rt.warmed())
            .await
            .unwrap_or_else(|_| panic!("not warmed"));
        assert!(!g.health.failed(), "the passing host is healthy");
        assert!(b.health.failed(), "a 500 fails the host at once");
        for _ in 0..20 {
            let p = rt.pick(None).unwrap_or_else(|| panic!("no pick"));
            assert_eq!(
                p.address,
                HostAddr::Ip(good),
                "only the healthy host is picked"
            );
        }
        // Recovery takes healthy_threshold (2) passes.
        status.store(200, Ordering::SeqCst);
        wait_until("recovery", || !b.health.failed()).await;
        // A retriable status fails only after unhealthy_threshold (2).
        let failures = stats.counter("cluster.c.health_check.failure");
        let before = failures.get();
        status.store(503, Ordering::SeqCst);
        wait_until("one failure", || failures.get() > before).await;
        let after_first = b.health.failed();
        wait_until("retriable failures fail the host", || b.health.failed()).await;
        assert!(failures.get() >= before + 2 || !after_first);
        assert!(stats.counter("cluster.c.health_check.attempt").get() > 0);
        assert!(stats.counter("cluster.c.health_check.success").get() > 0);
        // Discovery removes the healthy host: it stays, pending removal,
        // while it passes.
        let rt2 = Arc::new(ClusterRt::new(
            make(&[bad], false),
            &stats,
            Some(&rt),
            &Arc::default(),
            &Arc::default(),
        ));
        rt2.watch_removed_hosts();
        let kept: Vec<_> = rt2
            .hosts
            .load()
            .iter()
            .map(|(p, _)| p.address.clone())
            .collect();
        assert!(kept.contains(&HostAddr::Ip(good)), "{kept:?}");
        assert!(g.health.pending_removal());
        // The removed failing host's session stops: with
        // ignore_health_on_host_removal, removal is immediate.
        let sessions = |rt: &ClusterRt| {
            rt.shared
                .health
                .as_ref()
                .map(|h| h.session_count())
                .unwrap_or_default()
        };
        assert_eq!(sessions(&rt2), 2);
        let rt3 = ClusterRt::new(
            make(&[good], true),
            &stats,
            Some(&rt2),
            &Arc::default(),
            &Arc::default(),
        );
        assert_eq!(sessions(&rt3), 1, "the removed host's session stopped");
        assert!(!g.health.pending_removal(), "back in discovery");
        // The cluster gone, its sessions stop (no task holds it).
        let checker = Arc::downgrade(
            rt3.shared
                .health
                .as_ref()
                .unwrap_or_else(|| panic!("checker")),
        );
        drop((rt, rt2, rt3, g, b));
        wait_until("checker dropped", || checker.upgrade().is_none()).await;
    }

    /// The pool's idle HTTP/1.1 connections of `pool`, and how many are parked.
    /// A cluster of one endpoint at `addr` (its model edited by `edit`)
    /// and that endpoint's pool.
    fn one_endpoint(
        addr: SocketAddr,
        edit: impl FnOnce(&mut Cluster),
    ) -> (ClusterRt, Arc<EndpointPool>) {
        let rt = ClusterRt::new(
            cluster_at(addr, edit),
            &Stats::default(),
            None,
            &Arc::default(),
            &Arc::default(),
        );
        let pool = rt.pick(None).unwrap_or_else(|| panic!("no endpoint"));
        (rt, pool)
    }

    fn idle_counts(pool: &EndpointPool) -> (usize, usize) {
        pool.h1_idle().map(|i| i.counts()).unwrap_or_default()
    }

    #[tokio::test]
    async fn an_idle_upstream_connection_is_parked_and_used_again() {
        let (addr, count) = counting_server().await;
        let (_rt, pool) = one_endpoint(addr, |_| {});
        assert_eq!(get(&pool).await, 200);
        wait_until("the connection back in the pool", || {
            idle_counts(&pool) == (1, 0)
        })
        .await;
        tokio::time::sleep(upstream_h1::PARK_AFTER).await;
        wait_until("the connection parked", || idle_counts(&pool) == (1, 1)).await;
        // Handed out parked, it gets a codec again: the same connection.
        for _ in 0..3 {
            assert_eq!(get(&pool).await, 200);
            wait_until("the connection back in the pool", || {
                idle_counts(&pool) == (1, 0)
            })
            .await;
        }
        assert_eq!(count.load(Ordering::SeqCst), 1, "connections opened");
        assert_eq!(pool.host_stats().cx_active.load(Ordering::SeqCst), 1);
        // And parks again once idle.
        tokio::time::sleep(upstream_h1::PARK_AFTER).await;
        wait_until("parked again", || idle_counts(&pool) == (1, 1)).await;
        assert_eq!(get(&pool).await, 200);
        assert_eq!(count.load(Ordering::SeqCst), 1, "connections opened");
    }

    /// A local HTTP/1.1 server answering each request 200 with no body;
    /// with `close_after`, it closes each connection that long after its
    /// first answer. Counts the connections its clients closed.
    async fn raw_server(close_after: Option<Duration>) -> (SocketAddr, Arc<AtomicU32>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, addr) = local_listener().await;
        let closed = Arc::new(AtomicU32::new(0));
        let c = closed.clone();
        tokio::spawn(async move {
            while let Ok((mut io, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    let mut answered = false;
                    loop {
                        let n = match io.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                c.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => n,
                        };
                        head.extend_from_slice(&buf[..n]);
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            head.drain(..end + 4);
                            let _ = io
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            if let (false, Some(after)) = (answered, close_after) {
                                tokio::time::sleep(after).await;
                                return;
                            }
                            answered = true;
                        }
                    }
                });
            }
        });
        (addr, closed)
    }

    #[tokio::test]
    async fn a_parked_upstream_connection_closed_by_the_server_is_let_go() {
        let (addr, _) =
            raw_server(Some(upstream_h1::PARK_AFTER + Duration::from_millis(500))).await;
        let (rt, pool) = one_endpoint(addr, |_| {});
        assert_eq!(get(&pool).await, 200);
        tokio::time::sleep(upstream_h1::PARK_AFTER).await;
        wait_until("the connection parked", || idle_counts(&pool) == (1, 1)).await;
        wait_until("the closed connection forgotten", || {
            idle_counts(&pool) == (0, 0)
        })
        .await;
        assert_eq!(pool.host_stats().cx_active.load(Ordering::SeqCst), 0);
        assert_eq!(rt.shared.breakers.connections.load(Ordering::SeqCst), 0);
        assert_eq!(rt.stats.upstream_cx_destroy().get(), 1);
        // A new connection serves the next request.
        assert_eq!(get(&pool).await, 200);
    }

    /// As Envoy, a pooled connection idle for the cluster's `idle_timeout`
    /// is closed, whether it was still live or already parked.
    #[tokio::test]
    async fn an_upstream_connection_idle_for_its_idle_timeout_is_closed() {
        for timeout in [
            Duration::from_millis(300),
            upstream_h1::PARK_AFTER + Duration::from_millis(400),
        ] {
            let (addr, closed) = raw_server(None).await;
            let (rt, pool) = one_endpoint(addr, |c| c.idle_timeout = Some(timeout));
            assert_eq!(get(&pool).await, 200);
            tokio::time::sleep(timeout.saturating_sub(Duration::from_millis(150))).await;
            assert_eq!(
                closed.load(Ordering::SeqCst),
                0,
                "closed before {timeout:?}"
            );
            wait_until("the idle connection closed", || {
                closed.load(Ordering::SeqCst) == 1
            })
            .await;
            wait_until("the pool empty", || idle_counts(&pool) == (0, 0)).await;
            assert_eq!(rt.stats.upstream_cx_idle_timeout().get(), 1, "{timeout:?}");
            assert_eq!(pool.host_stats().cx_active.load(Ordering::SeqCst), 0);
        }
    }

    /// As Envoy, an HTTP/2 connection with no stream open for the
    /// cluster's `idle_timeout` is closed; a stream in between starts the
    /// idle time again.
    #[tokio::test]
    async fn an_upstream_h2_connection_idle_for_its_idle_timeout_is_closed() {
        let (listener, addr) = local_listener().await;
        let closed = Arc::new(AtomicU32::new(0));
        let c = closed.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                            bytes::Bytes,
                        >::new(
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        let timeout = Duration::from_millis(400);
        let (rt, pool) = one_endpoint(addr, |c| {
            c.protocol = ferry_model::UpstreamProtocol::Http2;
            c.idle_timeout = Some(timeout);
        });
        let get_h2 = || async {
            let req = Request::builder()
                .uri("http://backend/")
                .version(http::Version::HTTP_2)
                .body(UpstreamBody::empty())
                .unwrap_or_else(|e| panic!("request: {e}"));
            let resp = pool
                .send(true, req)
                .await
                .unwrap_or_else(|e| panic!("send: {e}"));
            let status = resp.status().as_u16();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            status
        };
        assert_eq!(get_h2().await, 200);
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert_eq!(get_h2().await, 200);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(closed.load(Ordering::SeqCst), 0, "closed while in use");
        wait_until("the idle connection closed", || {
            closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(rt.stats.upstream_cx_idle_timeout().get(), 1);
        assert_eq!(rt.stats.upstream_cx_http2_total().get(), 1);
        wait_until("the connection counted gone", || {
            pool.host_stats().cx_active.load(Ordering::SeqCst) == 0
        })
        .await;
        // The next request opens a new connection.
        assert_eq!(get_h2().await, 200);
        assert_eq!(rt.stats.upstream_cx_http2_total().get(), 2);
    }

    #[tokio::test]
    async fn max_connection_duration_recycles_upstream_connections() {
        let (addr, count) = counting_server().await;
        let stats = Stats::default();
        for (max, want) in [(None, 1), (Some(Duration::from_millis(100)), 2)] {
            count.store(0, Ordering::SeqCst);
            let cfg = cluster_at(addr, |c| c.max_connection_duration = max);
            let rt = ClusterRt::new(cfg, &stats, None, &Arc::default(), &Arc::default());
            let pool = rt.pick(None).unwrap_or_else(|| panic!("no endpoint"));
            assert_eq!(get(&pool).await, 200);
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert_eq!(get(&pool).await, 200);
            assert_eq!(
                count.load(Ordering::SeqCst),
                want,
                "max_connection_duration {max:?}"
            );
        }
    }

    #[tokio::test]
    async fn upstream_tcp_keepalive_is_set() {
        let (addr, _) = counting_server().await;
        let stats = Stats::default();
        let cfg = cluster_at(addr, |c| {
            c.tcp_keepalive = Some(ferry_model::cluster::TcpKeepalive {
                probes: Some(3),
                time: Some(Duration::from_secs(42)),
                interval: Some(Duration::from_secs(7)),
            })
        });
        let rt = ClusterRt::new(cfg, &stats, None, &Arc::default(), &Arc::default());
        let pool = rt.pick(None).unwrap_or_else(|| panic!("no endpoint"));
        let io = pool
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let UpstreamIo::Plain(tcp) = io else {
            panic!("plaintext expected")
        };
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap_or(false), "SO_KEEPALIVE");
        assert_eq!(
            sock.tcp_keepalive_time().ok(),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            sock.tcp_keepalive_interval().ok(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(sock.tcp_keepalive_retries().ok(), Some(3));
        // Without the option the socket keeps the system's default (off).
        let plain = ClusterRt::new(
            cluster_at(addr, |_| {}),
            &stats,
            None,
            &Arc::default(),
            &Arc::default(),
        );
        let io = plain
            .pick(None)
            .unwrap_or_else(|| panic!("no endpoint"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let UpstreamIo::Plain(tcp) = io else {
            panic!("plaintext expected")
        };
        assert!(!socket2::SockRef::from(&tcp).keepalive().unwrap_or(true));
    }

    #[test]
    fn track_remaining_reports_the_capacity_left() {
        let stats = Stats::default();
        let cfg = {
            let mut c = Arc::unwrap_or_clone(cluster(&[1]));
            c.circuit_breakers.default.track_remaining = true;
            Arc::new(c)
        };
        let rt = ClusterRt::new(cfg, &stats, None, &Arc::default(), &Arc::default());
        let gauge = |n: &str| {
            stats
                .snapshot()
                .into_iter()
                .find(|(k, _)| k == &format!("cluster.c.circuit_breakers.default.{n}"))
                .map(|(_, v)| v)
        };
        assert_eq!(gauge("remaining_rq"), Some(2));
        let held = rt.shared.breakers.request().ok();
        assert!(held.is_some());
        assert_eq!(gauge("remaining_rq"), Some(1));
        drop(held);
        assert_eq!(gauge("remaining_rq"), Some(2));
        assert_eq!(gauge("remaining_retries"), Some(1));
        assert_eq!(gauge("remaining_cx"), Some(1024));
        assert_eq!(gauge("remaining_pending"), Some(1024));
    }

    #[test]
    fn per_host_max_connections_caps_each_endpoint() {
        let stats = Stats::default();
        let cfg = {
            let mut c = Arc::unwrap_or_clone(cluster(&[1, 2]));
            c.circuit_breakers.per_host_max_connections = Some(1);
            Arc::new(c)
        };
        let rt = ClusterRt::new(cfg, &stats, None, &Arc::default(), &Arc::default());
        let hosts = rt.balancer.load_full();
        let (a, b) = (&hosts.hosts()[0], &hosts.hosts()[1]);
        let breakers = &rt.shared.breakers;
        let first = breakers.connection(a.host_limit().as_ref());
        assert!(first.is_some());
        assert!(
            breakers.connection(a.host_limit().as_ref()).is_none(),
            "the endpoint's one connection is taken"
        );
        assert!(
            breakers.connection(b.host_limit().as_ref()).is_some(),
            "another endpoint still connects"
        );
        drop(first);
        assert!(breakers.connection(a.host_limit().as_ref()).is_some());
    }

    #[test]
    fn breakers_cap_requests_and_retries_and_count_overflow() {
        let stats = Stats::default();
        let rt = ClusterRt::new(
            cluster(&[1]),
            &stats,
            None,
            &Arc::default(),
            &Arc::default(),
        );
        let b = &rt.shared.breakers;
        let first = b.request().ok();
        let second = b.request().ok();
        assert!(first.is_some() && second.is_some());
        assert!(matches!(b.request(), Err(UpstreamError::Overflow)));
        assert_eq!(b.stats.upstream_rq_active_overflow().get(), 1);
        drop(first);
        assert!(b.request().is_ok(), "a released slot is free again");
        let retry = b.retry();
        assert!(retry.is_some());
        assert!(b.retry().is_none());
        assert_eq!(b.stats.upstream_rq_retry_overflow().get(), 1);
        // Without track_remaining there are no remaining gauges.
        assert!(
            !stats
                .snapshot()
                .iter()
                .any(|(k, _)| k.contains("remaining_"))
        );
        assert_eq!(UpstreamError::Overflow.response_flag(), "UO");
    }

    #[test]
    fn endpoint_updates_keep_pools_breakers_and_ejections() {
        let stats = Stats::default();
        let old = ClusterRt::new(
            cluster(&[1, 2, 3]),
            &stats,
            None,
            &Arc::default(),
            &Arc::default(),
        );
        let victim = old.pick(None).unwrap_or_else(|| panic!("no endpoint"));
        for _ in 0..2 {
            victim.report(Outcome::Status(503));
        }
        assert!(victim.ejected());
        // Endpoint 3 leaves, 4 arrives: the same shared state, the same
        // pools for 1 and 2, and the ejection still holds.
        let new = ClusterRt::new(
            cluster(&[1, 2, 4]),
            &stats,
            Some(&old),
            &Arc::default(),
            &Arc::default(),
        );
        assert!(Arc::ptr_eq(&old.shared, &new.shared));
        let kept: Vec<HostAddr> = new
            .balancer
            .load()
            .hosts()
            .iter()
            .map(|p| p.address.clone())
            .collect();
        assert_eq!(kept.len(), 3);
        let picks: Vec<HostAddr> = (0..30)
            .filter_map(|_| new.pick(None))
            .map(|p| p.address.clone())
            .collect();
        assert!(
            !picks.contains(&victim.address),
            "the ejected endpoint is skipped"
        );
        assert!(picks.contains(&SocketAddr::from(([127, 0, 0, 1], 4)).into()));
    }
}
