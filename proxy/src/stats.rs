//! Counters with Envoy's names (`cluster.<name>.upstream_rq_total`,
//! `http.<stat_prefix>.downstream_rq_2xx`, …), registered when a snapshot is
//! applied so the hot path only does an atomic add.
//!
//! A cluster's own counters and gauges (the two dozen every cluster has,
//! [`ClusterStat`]) live in one block per cluster, found by its `cluster.<name>.` prefix,
//! rather than one map entry and one allocation per counter: with ten
//! thousand clusters that is one entry instead of twenty-seven each, as
//! Envoy's stat blocks keep a cluster's stats together. A name of the block
//! looked up whole (`counter("cluster.a.upstream_rq_total")`) is the
//! block's cell, so every name still spells one statistic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where a counter keeps its value: its own cell, or one of a cluster's
/// block (two words; gauges, whose guards every connection holds, stay
/// one).
#[derive(Clone, Debug)]
enum Cell {
    Own(Arc<AtomicU64>),
    InCluster(Arc<ClusterBlock>, ClusterStat),
}

impl Default for Cell {
    fn default() -> Self {
        Cell::Own(Arc::default())
    }
}

impl Cell {
    #[inline]
    fn atomic(&self) -> &AtomicU64 {
        match self {
            Cell::Own(a) => a,
            Cell::InCluster(b, s) => b.cell(*s),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Counter(Cell);

impl Counter {
    pub fn inc(&self) {
        self.0.atomic().fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.atomic().fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.atomic().load(Ordering::Relaxed)
    }
}

/// A gauge that can go up and down (active connections and requests). One
/// pointer, as its guards are held by every connection and stream.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn inc(&self) -> GaugeGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(self.clone())
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A gauge whose value is computed when read (e.g. a breaker's remaining
/// capacity).
pub type GaugeFn = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Whether a statistic of a block is a counter or a gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// Declares the statistics of a cluster's block: the enum naming them, their
/// names and kinds (in name order, so that a block lists its names sorted),
/// and an accessor on [`ClusterStats`] per statistic.
macro_rules! cluster_stats {
    ($($variant:ident $method:ident $kind:ident $name:literal;)*) => {
        /// A statistic of a cluster's block (`cluster.<name>.<suffix>`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum ClusterStat {
            $($variant,)*
        }

        /// The suffix and kind of each [`ClusterStat`], in its order.
        const CLUSTER_STATS: &[(&str, Kind)] = &[$(($name, Kind::$kind),)*];

        impl ClusterStat {
            const ALL: &[ClusterStat] = &[$(ClusterStat::$variant,)*];
        }

        impl ClusterStats {
            $(
                #[doc = concat!("`cluster.<name>.", $name, "`.")]
                #[inline]
                pub fn $method(&self) -> StatAt<'_> {
                    self.at(ClusterStat::$variant)
                }
            )*
        }
    };
}

cluster_stats! {
    SslConnectionError ssl_connection_error Counter "ssl.connection_error";
    SslHandshake ssl_handshake Counter "ssl.handshake";
    UpstreamCxActive upstream_cx_active Gauge "upstream_cx_active";
    UpstreamCxConnectFail upstream_cx_connect_fail Counter "upstream_cx_connect_fail";
    UpstreamCxConnectTimeout upstream_cx_connect_timeout Counter "upstream_cx_connect_timeout";
    UpstreamCxDestroy upstream_cx_destroy Counter "upstream_cx_destroy";
    UpstreamCxHttp1Total upstream_cx_http1_total Counter "upstream_cx_http1_total";
    UpstreamCxHttp2Total upstream_cx_http2_total Counter "upstream_cx_http2_total";
    UpstreamCxIdleTimeout upstream_cx_idle_timeout Counter "upstream_cx_idle_timeout";
    UpstreamCxOverflow upstream_cx_overflow Counter "upstream_cx_overflow";
    UpstreamCxTotal upstream_cx_total Counter "upstream_cx_total";
    UpstreamRq1xx upstream_rq_1xx Counter "upstream_rq_1xx";
    UpstreamRq2xx upstream_rq_2xx Counter "upstream_rq_2xx";
    UpstreamRq3xx upstream_rq_3xx Counter "upstream_rq_3xx";
    UpstreamRq4xx upstream_rq_4xx Counter "upstream_rq_4xx";
    UpstreamRq5xx upstream_rq_5xx Counter "upstream_rq_5xx";
    UpstreamRqActive upstream_rq_active Gauge "upstream_rq_active";
    // `max_requests` overflow (Envoy 1.40's name).
    UpstreamRqActiveOverflow upstream_rq_active_overflow Counter "upstream_rq_active_overflow";
    UpstreamRqPendingOverflow upstream_rq_pending_overflow Counter "upstream_rq_pending_overflow";
    UpstreamRqPendingTotal upstream_rq_pending_total Counter "upstream_rq_pending_total";
    UpstreamRqPerTryTimeout upstream_rq_per_try_timeout Counter "upstream_rq_per_try_timeout";
    UpstreamRqRetry upstream_rq_retry Counter "upstream_rq_retry";
    UpstreamRqRetryLimitExceeded upstream_rq_retry_limit_exceeded Counter "upstream_rq_retry_limit_exceeded";
    UpstreamRqRetryOverflow upstream_rq_retry_overflow Counter "upstream_rq_retry_overflow";
    UpstreamRqRetryStaleConnection upstream_rq_retry_stale_connection Counter "upstream_rq_retry_stale_connection";
    UpstreamRqRetrySuccess upstream_rq_retry_success Counter "upstream_rq_retry_success";
    UpstreamRqTimeout upstream_rq_timeout Counter "upstream_rq_timeout";
    UpstreamRqTotal upstream_rq_total Counter "upstream_rq_total";
}

const CLUSTER_STAT_COUNT: usize = CLUSTER_STATS.len();
// The registered mask has a bit per statistic.
const _: () = assert!(CLUSTER_STAT_COUNT <= 64);

/// How many statistics of a block are of `kind`.
const fn count_of(kind: Kind) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < CLUSTER_STATS.len() {
        if CLUSTER_STATS[i].1 as u8 == kind as u8 {
            n += 1;
        }
        i += 1;
    }
    n
}

/// Each statistic's place among those of its kind.
const SLOTS: [u8; CLUSTER_STAT_COUNT] = {
    let mut slots = [0u8; CLUSTER_STAT_COUNT];
    let (mut counters, mut gauges) = (0, 0);
    let mut i = 0;
    while i < CLUSTER_STAT_COUNT {
        if CLUSTER_STATS[i].1 as u8 == Kind::Counter as u8 {
            slots[i] = counters;
            counters += 1;
        } else {
            slots[i] = gauges;
            gauges += 1;
        }
        i += 1;
    }
    slots
};

const CLUSTER_COUNTERS: usize = count_of(Kind::Counter);
const CLUSTER_GAUGES: usize = count_of(Kind::Gauge);

/// The statistics a cluster has from the moment it exists (the others, the
/// retry counters, appear on first use, as Envoy's do).
const ALWAYS: &[ClusterStat] = {
    use ClusterStat::*;
    &[
        SslConnectionError,
        SslHandshake,
        UpstreamCxActive,
        UpstreamCxConnectFail,
        UpstreamCxConnectTimeout,
        UpstreamCxDestroy,
        UpstreamCxHttp1Total,
        UpstreamCxHttp2Total,
        UpstreamCxOverflow,
        UpstreamCxTotal,
        UpstreamRq1xx,
        UpstreamRq2xx,
        UpstreamRq3xx,
        UpstreamRq4xx,
        UpstreamRq5xx,
        UpstreamRqActive,
        UpstreamRqActiveOverflow,
        UpstreamRqPendingOverflow,
        UpstreamRqPendingTotal,
        UpstreamRqRetryOverflow,
        UpstreamRqRetryStaleConnection,
        UpstreamRqTimeout,
        UpstreamRqTotal,
    ]
};

impl ClusterStat {
    fn bit(self) -> u64 {
        1 << (self as u8)
    }

    fn suffix(self) -> &'static str {
        CLUSTER_STATS[self as usize].0
    }

    fn kind(self) -> Kind {
        CLUSTER_STATS[self as usize].1
    }

    /// Its place among the block's statistics of its kind.
    #[inline]
    fn slot(self) -> usize {
        SLOTS[self as usize] as usize
    }
}

/// The statistics of one cluster, allocated together: the counters in
/// place, the gauges each in its own cell (so that a gauge's guard, held
/// by every connection, stays one pointer).
#[derive(Debug)]
struct ClusterBlock {
    /// Which statistics exist (are listed): bit `1 << stat`.
    registered: AtomicU64,
    counters: [AtomicU64; CLUSTER_COUNTERS],
    gauges: [Gauge; CLUSTER_GAUGES],
}

impl Default for ClusterBlock {
    fn default() -> Self {
        Self {
            registered: AtomicU64::new(0),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            gauges: std::array::from_fn(|_| Gauge::default()),
        }
    }
}

impl ClusterBlock {
    /// The value of statistic `s` (its slot is below its array's length by
    /// construction).
    #[inline]
    fn cell(&self, s: ClusterStat) -> &AtomicU64 {
        match s.kind() {
            Kind::Counter => &self.counters[s.slot()],
            Kind::Gauge => &self.gauges[s.slot()].0,
        }
    }

    fn gauge(&self, s: ClusterStat) -> &Gauge {
        &self.gauges[s.slot()]
    }

    #[inline]
    fn register(&self, s: ClusterStat) {
        if self.registered.load(Ordering::Relaxed) & s.bit() == 0 {
            self.registered.fetch_or(s.bit(), Ordering::Relaxed);
        }
    }

    fn is_registered(&self, s: ClusterStat) -> bool {
        self.registered.load(Ordering::Relaxed) & s.bit() != 0
    }
}

/// A statistic of a cluster's block, as its accessors on [`ClusterStats`]
/// hand it out: no reference count is taken for an increment.
#[derive(Clone, Copy)]
pub struct StatAt<'a> {
    block: &'a Arc<ClusterBlock>,
    stat: ClusterStat,
}

impl StatAt<'_> {
    #[inline]
    pub fn inc(self) {
        self.add(1);
    }

    #[inline]
    pub fn add(self, n: u64) {
        self.block.register(self.stat);
        self.block.cell(self.stat).fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(self) -> u64 {
        self.block.cell(self.stat).load(Ordering::Relaxed)
    }

    /// A counter handle that keeps the block alive.
    pub fn counter(self) -> Counter {
        self.block.register(self.stat);
        Counter(Cell::InCluster(self.block.clone(), self.stat))
    }

    /// Counts one up (a gauge) until the guard drops.
    pub fn up(self) -> GaugeGuard {
        self.block.register(self.stat);
        self.block.gauge(self.stat).inc()
    }
}

/// A cluster's counters and gauges: a handle on its block.
#[derive(Clone, Debug)]
pub struct ClusterStats(Arc<ClusterBlock>);

impl ClusterStats {
    pub fn new(stats: &Stats, cluster: &str) -> Self {
        let block = stats.cluster_block(&format!("cluster.{cluster}."));
        for s in ALWAYS {
            block.register(*s);
        }
        Self(block)
    }

    #[inline]
    pub fn at(&self, stat: ClusterStat) -> StatAt<'_> {
        StatAt {
            block: &self.0,
            stat,
        }
    }

    pub fn status(&self, status: u16) {
        use ClusterStat::*;
        let class = match status / 100 {
            1 => UpstreamRq1xx,
            2 => UpstreamRq2xx,
            3 => UpstreamRq3xx,
            4 => UpstreamRq4xx,
            5 => UpstreamRq5xx,
            _ => return,
        };
        self.at(class).inc();
    }
}

/// The cluster statistic `name` spells, when it is one of a block's:
/// (`cluster.<name>.` prefix, statistic).
fn cluster_stat_of(name: &str) -> Option<(&str, ClusterStat)> {
    if !name.starts_with("cluster.") {
        return None;
    }
    ClusterStat::ALL.iter().find_map(|s| {
        let prefix = name.strip_suffix(s.suffix())?;
        (prefix.len() > "cluster.".len() && prefix.ends_with('.')).then_some((prefix, *s))
    })
}

/// Statistics' names and values.
type Values = Vec<(String, u64)>;

#[derive(Default)]
pub struct Stats {
    counters: Mutex<BTreeMap<Box<str>, Counter>>,
    gauges: Mutex<BTreeMap<String, Gauge>>,
    computed: Mutex<BTreeMap<String, GaugeFn>>,
    /// The clusters' blocks by their `cluster.<name>.` prefix.
    clusters: Mutex<BTreeMap<Box<str>, Arc<ClusterBlock>>>,
}

impl AsRef<Stats> for Stats {
    fn as_ref(&self) -> &Stats {
        self
    }
}

impl Stats {
    /// The block of the cluster statistics under `prefix`, created on first
    /// use.
    fn cluster_block(&self, prefix: &str) -> Arc<ClusterBlock> {
        let mut m = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = m.get(prefix) {
            return b.clone();
        }
        let b = Arc::new(ClusterBlock::default());
        m.insert(prefix.into(), b.clone());
        b
    }

    /// The counter of that name, created on first use.
    pub fn counter(&self, name: &str) -> Counter {
        if let Some((prefix, s)) = cluster_stat_of(name).filter(|(_, s)| s.kind() == Kind::Counter)
        {
            let block = self.cluster_block(prefix);
            block.register(s);
            return Counter(Cell::InCluster(block, s));
        }
        let mut m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(name) {
            return c.clone();
        }
        m.entry(name.into()).or_default().clone()
    }

    pub fn gauge(&self, name: &str) -> Gauge {
        if let Some((prefix, s)) = cluster_stat_of(name).filter(|(_, s)| s.kind() == Kind::Gauge) {
            let block = self.cluster_block(prefix);
            block.register(s);
            return block.gauge(s).clone();
        }
        let mut m = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    /// A gauge read through `f` (the last one registered under the name).
    pub fn gauge_fn(&self, name: &str, f: GaugeFn) {
        let mut m = self.computed.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(name.to_string(), f);
    }

    fn computed(&self) -> Vec<(String, u64)> {
        self.computed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, f)| (k.clone(), f()))
            .collect()
    }

    /// The counters, then the gauges, each sorted by name.
    fn counters_and_gauges(&self) -> (Values, Values) {
        let mut counters: Vec<(String, u64)> = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.to_string(), v.get()))
            .collect();
        let mut gauges: Vec<(String, u64)> = self
            .gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.get()))
            .collect();
        let (whole_counters, whole_gauges) = (counters.len(), gauges.len());
        for (prefix, block) in self
            .clusters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for s in ClusterStat::ALL {
                if !block.is_registered(*s) {
                    continue;
                }
                let name = [&**prefix, s.suffix()].concat();
                let value = block.cell(*s).load(Ordering::Relaxed);
                match s.kind() {
                    Kind::Counter => counters.push((name, value)),
                    Kind::Gauge => gauges.push((name, value)),
                }
            }
        }
        // Each list is a few sorted runs (the whole names, then the blocks
        // in prefix order, each in suffix order), which a stable sort merges
        // in about linear time.
        if counters.len() > whole_counters {
            counters.sort();
        }
        if gauges.len() > whole_gauges {
            gauges.sort();
        }
        (counters, gauges)
    }

    /// All values, sorted by name (Envoy's `/stats` text form uses `name: value`).
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let (mut out, gauges) = self.counters_and_gauges();
        out.extend(gauges);
        out.extend(self.computed());
        out.sort();
        out
    }

    /// Every value with whether it is a gauge (for the Prometheus types):
    /// the counters by name, then the gauges by name, then the computed
    /// gauges by name.
    pub fn entries(&self) -> Vec<(String, u64, bool)> {
        let (counters, gauges) = self.counters_and_gauges();
        let mut out: Vec<(String, u64, bool)> = Vec::with_capacity(counters.len() + gauges.len());
        out.extend(counters.into_iter().map(|(k, v)| (k, v, false)));
        out.extend(gauges.into_iter().map(|(k, v)| (k, v, true)));
        out.extend(self.computed().into_iter().map(|(k, v)| (k, v, true)));
        out
    }

    pub fn render_text(&self) -> String {
        let mut s = String::new();
        for (k, v) in self.snapshot() {
            s.push_str(&k);
            s.push_str(": ");
            s.push_str(&v.to_string());
            s.push('\n');
        }
        s
    }
}

/// The HTTP connection manager's counters for one `stat_prefix`.
#[derive(Clone, Debug)]
pub struct HttpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_rq_total: Counter,
    pub downstream_rq_active: Gauge,
    pub downstream_rq_http1_total: Counter,
    pub downstream_rq_http2_total: Counter,
    pub rq_by_class: [Counter; 5],
    pub no_route: Counter,
    /// Requests answered 400 by path normalization (Envoy's name).
    pub downstream_rq_failed_path_normalization: Counter,
    /// Requests answered 307 by `UNESCAPE_AND_REDIRECT`.
    pub downstream_rq_redirected_with_normalized_path: Counter,
    pub downstream_cx_http1_total: Counter,
    /// HTTP/1 keep-alive connections parked between requests, holding no
    /// codec (Ferry's own: Envoy keeps every connection's codec).
    pub downstream_cx_http1_parked: Gauge,
    pub downstream_cx_http2_total: Counter,
    /// Requests refused for their framing or head (a 4xx/5xx and a close).
    pub downstream_cx_protocol_error: Counter,
    /// `request_headers_timeout` ran out (408).
    pub downstream_rq_header_timeout: Counter,
    /// `request_timeout` ran out (408).
    pub downstream_rq_timeout: Counter,
    /// `stream_idle_timeout` ran out.
    pub downstream_rq_idle_timeout: Counter,
    /// The client reset a stream before its response was complete.
    pub downstream_rq_rx_reset: Counter,
    pub downstream_cx_idle_timeout: Counter,
    pub downstream_cx_max_duration_reached: Counter,
    pub downstream_cx_max_requests_reached: Counter,
    /// Connections closed because they were draining.
    pub downstream_cx_drain_close: Counter,
    /// HTTP/2 connections closed for too many streams reset by the client
    /// (`stream_reset_burst` / `stream_reset_rate`).
    pub downstream_rq_too_many_premature_resets: Counter,
    /// `tracing.*`: why requests were (not) traced.
    pub tracing: TracingStats,
}

/// The tracing decisions of a connection manager (Envoy's
/// `http.<prefix>.tracing.*`).
#[derive(Clone, Debug)]
pub struct TracingStats {
    pub client_enabled: Counter,
    pub health_check: Counter,
    pub not_traceable: Counter,
    pub random_sampling: Counter,
    pub service_forced: Counter,
}

impl HttpStats {
    pub fn new(stats: &Stats, prefix: &str) -> Self {
        let c = |n: &str| stats.counter(&format!("http.{prefix}.{n}"));
        Self {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: stats.gauge(&format!("http.{prefix}.downstream_cx_active")),
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_active: stats.gauge(&format!("http.{prefix}.downstream_rq_active")),
            downstream_rq_http1_total: c("downstream_rq_http1_total"),
            downstream_rq_http2_total: c("downstream_rq_http2_total"),
            rq_by_class: [
                c("downstream_rq_1xx"),
                c("downstream_rq_2xx"),
                c("downstream_rq_3xx"),
                c("downstream_rq_4xx"),
                c("downstream_rq_5xx"),
            ],
            no_route: c("no_route"),
            tracing: TracingStats {
                client_enabled: c("tracing.client_enabled"),
                health_check: c("tracing.health_check"),
                not_traceable: c("tracing.not_traceable"),
                random_sampling: c("tracing.random_sampling"),
                service_forced: c("tracing.service_forced"),
            },
            downstream_rq_failed_path_normalization: c("downstream_rq_failed_path_normalization"),
            downstream_rq_redirected_with_normalized_path: c(
                "downstream_rq_redirected_with_normalized_path",
            ),
            downstream_cx_http1_total: c("downstream_cx_http1_total"),
            downstream_cx_http1_parked: stats
                .gauge(&format!("http.{prefix}.downstream_cx_http1_parked")),
            downstream_cx_http2_total: c("downstream_cx_http2_total"),
            downstream_cx_protocol_error: c("downstream_cx_protocol_error"),
            downstream_rq_header_timeout: c("downstream_rq_header_timeout"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            downstream_rq_idle_timeout: c("downstream_rq_idle_timeout"),
            downstream_rq_rx_reset: c("downstream_rq_rx_reset"),
            downstream_cx_idle_timeout: c("downstream_cx_idle_timeout"),
            downstream_cx_max_duration_reached: c("downstream_cx_max_duration_reached"),
            downstream_cx_max_requests_reached: c("downstream_cx_max_requests_reached"),
            downstream_cx_drain_close: c("downstream_cx_drain_close"),
            downstream_rq_too_many_premature_resets: c("downstream_rq_too_many_premature_resets"),
        }
    }

    pub fn status(&self, status: u16) {
        if let Some(c) = self
            .rq_by_class
            .get(usize::from(status / 100).wrapping_sub(1))
        {
            c.inc();
        }
    }
}

/// A TCP proxy's counters (`tcp.<stat_prefix>.*`).
#[derive(Clone, Debug)]
pub struct TcpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub upstream_flush_total: Counter,
    pub idle_timeout: Counter,
    pub downstream_cx_no_route: Counter,
    /// Connections closed at `max_downstream_connection_duration`.
    pub max_downstream_connection_duration: Counter,
}

impl TcpStats {
    pub fn new(stats: &Stats, prefix: &str) -> Self {
        let c = |n: &str| stats.counter(&format!("tcp.{prefix}.{n}"));
        Self {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_rx_bytes_total: c("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: c("downstream_cx_tx_bytes_total"),
            upstream_flush_total: c("upstream_flush_total"),
            idle_timeout: c("idle_timeout"),
            downstream_cx_no_route: c("downstream_cx_no_route"),
            max_downstream_connection_duration: c("max_downstream_connection_duration"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_shared_by_name_and_rendered_sorted() {
        let s = Stats::default();
        let h = HttpStats::new(&s, "ingress");
        h.downstream_rq_total.inc();
        h.status(503);
        s.counter("http.ingress.downstream_rq_total").inc();
        let g = h.downstream_rq_active.inc();
        let text = s.render_text();
        assert!(
            text.contains("http.ingress.downstream_rq_total: 2\n"),
            "{text}"
        );
        assert!(text.contains("http.ingress.downstream_rq_5xx: 1\n"));
        assert!(text.contains("http.ingress.downstream_rq_active: 1\n"));
        drop(g);
        assert!(
            s.render_text()
                .contains("http.ingress.downstream_rq_active: 0\n")
        );
    }

    #[test]
    fn a_cluster_statistic_looked_up_by_name_is_the_one_of_its_block() {
        let s = Stats::default();
        s.counter("cluster.b.upstream_rq_total").inc();
        s.counter("cluster.a.upstream_rq_total").inc();
        s.counter("cluster.b.").inc();
        s.counter("cluster.b.upstream_rq_totals").inc();
        s.counter("cluster.upstream_rq_total").inc();
        let c = ClusterStats::new(&s, "b");
        c.upstream_rq_total().inc();
        c.upstream_rq_total().counter().inc();
        let names: Vec<(String, u64)> = s
            .snapshot()
            .into_iter()
            .filter(|(n, _)| n.ends_with('.') || n.contains("upstream_rq_total"))
            .collect();
        let want = [
            ("cluster.a.upstream_rq_total", 1),
            ("cluster.b.", 1),
            ("cluster.b.upstream_rq_total", 3),
            ("cluster.b.upstream_rq_totals", 1),
            ("cluster.upstream_rq_total", 1),
        ];
        assert_eq!(
            names,
            want.map(|(n, v)| (n.to_string(), v)).to_vec(),
            "one counter per spelled name, in the order of the names"
        );
    }

    #[test]
    fn a_cluster_lists_its_statistics_as_separate_counters_did() {
        let s = Stats::default();
        // Nested names ("a" and "a.b") and a name sorting between the two
        // blocks' prefixes.
        for name in ["a.b", "a", "a-x"] {
            let c = ClusterStats::new(&s, name);
            c.status(503);
            let _held = c.upstream_cx_active().up();
        }
        s.counter("cluster.a.health_check.attempt").inc();
        s.gauge("cluster.a.upstream_rq_active");
        let entries = s.entries();
        let counters: Vec<&str> = entries
            .iter()
            .filter(|e| !e.2)
            .map(|e| e.0.as_str())
            .collect();
        let gauges: Vec<&str> = entries
            .iter()
            .filter(|e| e.2)
            .map(|e| e.0.as_str())
            .collect();
        assert!(counters.is_sorted(), "{counters:?}");
        assert!(gauges.is_sorted(), "{gauges:?}");
        assert_eq!(
            counters.len(),
            3 * (ALWAYS.len() - 2) + 1,
            "every cluster's counters, and the health check's"
        );
        assert_eq!(gauges.len(), 6);
        assert!(counters.contains(&"cluster.a.health_check.attempt"));
        assert!(!counters.iter().any(|n| n.contains("retry_success")));
        let text = s.render_text();
        assert!(text.contains("cluster.a-x.upstream_rq_5xx: 1\n"), "{text}");
        assert!(
            text.contains("cluster.a.b.upstream_cx_active: 0\n"),
            "{text}"
        );
        // A retry counter appears on first use.
        ClusterStats::new(&s, "a").upstream_rq_retry_success().inc();
        assert!(
            s.render_text()
                .contains("cluster.a.upstream_rq_retry_success: 1\n")
        );
    }

    #[test]
    fn cluster_statistic_names_are_sorted_and_parse_back_alone() {
        let names: Vec<&str> = CLUSTER_STATS.iter().map(|(n, _)| *n).collect();
        assert!(names.is_sorted(), "{names:?}");
        for (i, s) in ClusterStat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            // No suffix ends another at a dot: a name parses one way only.
            for t in ClusterStat::ALL {
                assert!(
                    !s.suffix().ends_with(&format!(".{}", t.suffix())),
                    "{} and {}",
                    s.suffix(),
                    t.suffix()
                );
            }
            let name = format!("cluster.x.y.{}", s.suffix());
            assert_eq!(cluster_stat_of(&name), Some(("cluster.x.y.", *s)));
        }
        assert_eq!(cluster_stat_of("cluster.upstream_rq_total"), None);
        assert_eq!(cluster_stat_of("http.x.upstream_rq_total"), None);
    }

    #[test]
    fn a_clusters_statistics_take_one_block() {
        // One allocation of the cells per cluster (was one map entry and one
        // `Arc` per counter), and handles of one pointer.
        assert!(
            std::mem::size_of::<ClusterBlock>() <= 8 * (CLUSTER_STAT_COUNT + 1),
            "{}",
            std::mem::size_of::<ClusterBlock>()
        );
        assert_eq!(std::mem::size_of::<ClusterStats>(), 8);
        assert!(std::mem::size_of::<Counter>() <= 16);
        assert_eq!(std::mem::size_of::<GaugeGuard>(), 8);
        for s in ClusterStat::ALL {
            let n = match s.kind() {
                Kind::Counter => CLUSTER_COUNTERS,
                Kind::Gauge => CLUSTER_GAUGES,
            };
            assert!(s.slot() < n, "{s:?}");
        }
    }
}
