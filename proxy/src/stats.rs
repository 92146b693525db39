//! Counters with Envoy's names (`cluster.<name>.upstream_rq_total`,
//! `http.<stat_prefix>.downstream_rq_2xx`, …), registered when a snapshot is
//! applied so the hot path only does an atomic add.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge that can go up and down (active connections and requests).
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

/// A counter's name: whole, or a shared prefix (a cluster's
/// `cluster.<name>.`) and a fixed suffix, so that the counters of ten
/// thousand clusters do not each hold a copy of their cluster's name. Names
/// compare as the strings they spell, whichever the form.
#[derive(Debug, Clone)]
enum StatName {
    Whole(Box<str>),
    Split(Arc<str>, &'static str),
}

impl StatName {
    fn parts(&self) -> (&str, &str) {
        match self {
            StatName::Whole(n) => (n, ""),
            StatName::Split(prefix, suffix) => (prefix, suffix),
        }
    }

    fn to_text(&self) -> String {
        let (a, b) = self.parts();
        let mut s = String::with_capacity(a.len() + b.len());
        s.push_str(a);
        s.push_str(b);
        s
    }
}

impl Ord for StatName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let ((a0, a1), (b0, b1)) = (self.parts(), other.parts());
        let (mut a, mut a_next) = (a0.as_bytes(), a1.as_bytes());
        let (mut b, mut b_next) = (b0.as_bytes(), b1.as_bytes());
        loop {
            if a.is_empty() {
                a = std::mem::take(&mut a_next);
            }
            if b.is_empty() {
                b = std::mem::take(&mut b_next);
            }
            match (a.is_empty(), b.is_empty()) {
                (true, true) => return Ordering::Equal,
                (true, false) => return Ordering::Less,
                (false, true) => return Ordering::Greater,
                (false, false) => {}
            }
            let n = a.len().min(b.len());
            match a[..n].cmp(&b[..n]) {
                Ordering::Equal => (a, b) = (&a[n..], &b[n..]),
                o => return o,
            }
        }
    }
}

impl PartialOrd for StatName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for StatName {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for StatName {}

#[derive(Default)]
pub struct Stats {
    counters: Mutex<BTreeMap<StatName, Counter>>,
    gauges: Mutex<BTreeMap<String, Gauge>>,
    computed: Mutex<BTreeMap<String, GaugeFn>>,
}

impl AsRef<Stats> for Stats {
    fn as_ref(&self) -> &Stats {
        self
    }
}

impl Stats {
    /// The counter of that name, created on first use.
    pub fn counter(&self, name: &str) -> Counter {
        let mut m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(StatName::Whole(name.into())).or_default().clone()
    }

    /// The counter named `prefix` then `suffix`, created on first use with
    /// the prefix shared rather than copied.
    pub fn counter_in(&self, prefix: &Arc<str>, suffix: &'static str) -> Counter {
        let mut m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(StatName::Split(prefix.clone(), suffix))
            .or_default()
            .clone()
    }

    pub fn gauge(&self, name: &str) -> Gauge {
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

    /// All values, sorted by name (Envoy's `/stats` text form uses `name: value`).
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.to_text(), v.get()))
            .collect();
        out.extend(
            self.gauges
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), v.get())),
        );
        out.extend(self.computed());
        out.sort();
        out
    }

    /// Every value with whether it is a gauge (for the Prometheus types).
    pub fn entries(&self) -> Vec<(String, u64, bool)> {
        let mut out: Vec<(String, u64, bool)> = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.to_text(), v.get(), false))
            .collect();
        out.extend(
            self.gauges
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), v.get(), true)),
        );
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

/// A cluster's counters.
#[derive(Clone, Debug)]
pub struct ClusterStats {
    pub upstream_cx_total: Counter,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_cx_connect_timeout: Counter,
    pub upstream_rq_total: Counter,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_by_class: [Counter; 5],
    /// Requests re-sent on a new connection because the pooled one had been
    /// closed by the server before any byte was written.
    pub upstream_rq_retry_stale_connection: Counter,
    pub upstream_cx_destroy: Counter,
    /// Connections opened by the HTTP pools, per protocol (counted when the
    /// pool starts one, as Envoy's pools count them).
    pub upstream_cx_http1_total: Counter,
    pub upstream_cx_http2_total: Counter,
    /// Envoy's pending requests: HTTP/2 streams (requests and `tcp_proxy`
    /// tunnels) that found no connection with room and waited for one, and
    /// `tcp_proxy` connections (each waits for its own connection).
    pub upstream_rq_pending_total: Counter,
    /// HTTP/2 streams open on the cluster's connections, from the moment a
    /// stream is given a connection until it ends, and `tcp_proxy`
    /// connections that are up.
    pub upstream_rq_active: Gauge,
    /// Connections open: the HTTP pools' and `tcp_proxy`'s.
    pub upstream_cx_active: Gauge,
    /// Upstream TLS handshakes done and failed (Envoy's `ssl.handshake`,
    /// `ssl.connection_error`).
    pub ssl_handshake: Counter,
    pub ssl_connection_error: Counter,
}

impl ClusterStats {
    pub fn new(stats: &Stats, cluster: &str) -> Self {
        let prefix: Arc<str> = Arc::from(format!("cluster.{cluster}."));
        let c = |n: &'static str| stats.counter_in(&prefix, n);
        Self {
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: c("upstream_cx_connect_timeout"),
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_by_class: [
                c("upstream_rq_1xx"),
                c("upstream_rq_2xx"),
                c("upstream_rq_3xx"),
                c("upstream_rq_4xx"),
                c("upstream_rq_5xx"),
            ],
            upstream_rq_retry_stale_connection: c("upstream_rq_retry_stale_connection"),
            upstream_cx_destroy: c("upstream_cx_destroy"),
            upstream_cx_http1_total: c("upstream_cx_http1_total"),
            upstream_cx_http2_total: c("upstream_cx_http2_total"),
            upstream_rq_pending_total: c("upstream_rq_pending_total"),
            upstream_rq_active: stats.gauge(&format!("{prefix}upstream_rq_active")),
            upstream_cx_active: stats.gauge(&format!("{prefix}upstream_cx_active")),
            ssl_handshake: c("ssl.handshake"),
            ssl_connection_error: c("ssl.connection_error"),
        }
    }

    pub fn status(&self, status: u16) {
        if let Some(c) = self
            .upstream_rq_by_class
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
    fn a_counter_under_a_shared_prefix_is_the_one_of_its_whole_name() {
        let s = Stats::default();
        let prefix: Arc<str> = Arc::from("cluster.b.");
        s.counter_in(&prefix, "upstream_rq_total").inc();
        s.counter("cluster.b.upstream_rq_total").inc();
        s.counter("cluster.a.upstream_rq_total").inc();
        s.counter("cluster.b.").inc();
        s.counter("cluster.b.upstream_rq_totals").inc();
        let c = ClusterStats::new(&s, "b");
        c.upstream_rq_total.inc();
        let names: Vec<(String, u64)> = s
            .snapshot()
            .into_iter()
            .filter(|(n, _)| n.ends_with(".") || n.contains("upstream_rq_total"))
            .collect();
        let want = [
            ("cluster.a.upstream_rq_total", 1),
            ("cluster.b.", 1),
            ("cluster.b.upstream_rq_total", 3),
            ("cluster.b.upstream_rq_totals", 1),
        ];
        assert_eq!(
            names,
            want.map(|(n, v)| (n.to_string(), v)).to_vec(),
            "one counter per spelled name, in the order of the names"
        );
    }
}
