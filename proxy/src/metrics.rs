//! Istio's standard metrics (`istio_requests_total`, the request duration
//! and size histograms, the `istio_tcp_*` counters) for chains that carry
//! the `istio.stats` filter, and the Prometheus text exposition (format
//! 0.0.4) of those and of the Envoy-style counters of [`crate::stats`].
//!
//! The hot path stays cheap: a connection resolves its peer once, a label
//! set (everything but the response code and flags) is rendered and interned
//! once per connection and destination, and a request then only finds its
//! series in a sharded map under a read lock and does a few atomic adds.
//! Rendering happens on scrape, on the admin runtime's time.
//!
//! Istio's metadata exchange travels in `x-envoy-peer-metadata-id` (the
//! node id) and `x-envoy-peer-metadata` (base64 of a protobuf
//! `google.protobuf.Struct` of the node metadata: `NAMESPACE`,
//! `WORKLOAD_NAME`, `LABELS`, `CLUSTER_ID`, `SERVICE_ACCOUNT`), as
//! istio-proxy sends them: outbound requests carry the client's, inbound
//! responses the server's, and the receiving side removes them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use ferry_model::Reporter;
use http::{HeaderMap, HeaderValue};
use prost::Message as _;

use crate::stats::Stats;

pub const PEER_METADATA: &str = "x-envoy-peer-metadata";
pub const PEER_METADATA_ID: &str = "x-envoy-peer-metadata-id";

/// Istio's default buckets of `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets of the request and response size histograms.
pub const BYTES_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

const UNKNOWN: &str = "unknown";

/// What a workload tells about itself (its own node metadata, or a peer's
/// from the metadata exchange and its certificate). Empty fields render as
/// `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
    /// The service account, when the metadata names it (the principal is
    /// derived from it where no certificate says better).
    pub service_account: String,
}

fn text_field(s: &Struct, key: &str) -> String {
    match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(v)) => v.clone(),
        _ => String::new(),
    }
}

impl Workload {
    /// From node metadata as istio-agent writes it. `principal` comes from
    /// the certificate identity when known, else from the service account.
    pub fn from_metadata(meta: &Struct, node_id: &str, trust_domain: &str) -> Self {
        let labels = match meta.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(s)) => s.clone(),
            _ => Struct::default(),
        };
        let label = |k: &str| text_field(&labels, k);
        let first = |keys: &[&str]| {
            keys.iter()
                .map(|k| label(k))
                .find(|v| !v.is_empty())
                .unwrap_or_default()
        };
        let namespace = text_field(meta, "NAMESPACE");
        let mut workload = text_field(meta, "WORKLOAD_NAME");
        if workload.is_empty() {
            // `sidecar~IP~POD.NS~…`: the pod name stands in for its owner.
            workload = node_id
                .split('~')
                .nth(2)
                .and_then(|p| p.split('.').next())
                .unwrap_or_default()
                .to_string();
        }
        let app = first(&["app", "app.kubernetes.io/name"]);
        let version = first(&["version", "app.kubernetes.io/version"]);
        let mut canonical_service = first(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]);
        if canonical_service.is_empty() {
            canonical_service = workload.clone();
        }
        let mut canonical_revision = first(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]);
        if canonical_revision.is_empty() {
            canonical_revision = "latest".into();
        }
        let service_account = text_field(meta, "SERVICE_ACCOUNT");
        let principal = if namespace.is_empty() || service_account.is_empty() {
            String::new()
        } else {
            crate::agent::identity(trust_domain, &namespace, &service_account)
        };
        Self {
            workload,
            namespace,
            principal,
            app,
            version,
            canonical_service,
            canonical_revision,
            cluster: text_field(meta, "CLUSTER_ID"),
            service_account,
        }
    }

    /// A peer known only by its SPIFFE id (`spiffe://td/ns/NS/sa/SA`).
    pub fn from_identity(id: &str) -> Self {
        let mut w = Self {
            principal: id.to_string(),
            ..Self::default()
        };
        if let Some(path) = id.strip_prefix("spiffe://").and_then(|r| r.split_once('/')) {
            let mut parts = path.1.split('/');
            while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                match k {
                    "ns" => w.namespace = v.to_string(),
                    "sa" => w.service_account = v.to_string(),
                    _ => {}
                }
            }
        }
        w
    }

    /// The metadata exchange's value: base64 of a `google.protobuf.Struct`.
    pub fn encode_exchange(&self) -> String {
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_string())),
        };
        let mut labels = Struct::default();
        for (k, v) in [
            ("app", &self.app),
            ("version", &self.version),
            ("service.istio.io/canonical-name", &self.canonical_service),
            (
                "service.istio.io/canonical-revision",
                &self.canonical_revision,
            ),
        ] {
            if !v.is_empty() {
                labels.fields.insert(k.into(), s(v));
            }
        }
        let mut meta = Struct::default();
        for (k, v) in [
            ("NAMESPACE", &self.namespace),
            ("WORKLOAD_NAME", &self.workload),
            ("CLUSTER_ID", &self.cluster),
            ("SERVICE_ACCOUNT", &self.service_account),
        ] {
            if !v.is_empty() {
                meta.fields.insert(k.into(), s(v));
            }
        }
        meta.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        base64::engine::general_purpose::STANDARD.encode(meta.encode_to_vec())
    }

    /// Reads a peer's `x-envoy-peer-metadata`; `None` when it is not base64
    /// of a protobuf `Struct`.
    pub fn decode_exchange(value: &[u8], trust_domain: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value)
            .ok()?;
        let meta = Struct::decode(bytes.as_slice()).ok()?;
        Some(Self::from_metadata(&meta, "", trust_domain))
    }

    /// Fills what `other` knows and `self` does not.
    fn or(mut self, other: &Workload) -> Self {
        let fill = |a: &mut String, b: &String| {
            if a.is_empty() {
                a.clone_from(b);
            }
        };
        fill(&mut self.workload, &other.workload);
        fill(&mut self.namespace, &other.namespace);
        fill(&mut self.principal, &other.principal);
        fill(&mut self.app, &other.app);
        fill(&mut self.version, &other.version);
        fill(&mut self.canonical_service, &other.canonical_service);
        fill(&mut self.canonical_revision, &other.canonical_revision);
        fill(&mut self.cluster, &other.cluster);
        fill(&mut self.service_account, &other.service_account);
        self
    }
}

/// This proxy's side of every metric, and its metadata exchange headers.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub workload: Workload,
    pub trust_domain: String,
    pub exchange_id: HeaderValue,
    pub exchange: HeaderValue,
}

impl LocalNode {
    pub fn new(workload: Workload, node_id: &str, trust_domain: &str) -> Self {
        let exchange = HeaderValue::from_str(&workload.encode_exchange())
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Self {
            workload,
            trust_domain: trust_domain.to_string(),
            exchange_id: HeaderValue::from_str(node_id)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            exchange,
        }
    }

    /// Adds this node's metadata exchange headers.
    pub fn announce(&self, headers: &mut HeaderMap) {
        headers.insert(PEER_METADATA_ID, self.exchange_id.clone());
        headers.insert(PEER_METADATA, self.exchange.clone());
    }
}

/// Removes a peer's metadata exchange headers; returns its id and metadata.
pub fn take_peer(headers: &mut HeaderMap) -> Option<(HeaderValue, HeaderValue)> {
    let id = headers.remove(PEER_METADATA_ID);
    let meta = headers.remove(PEER_METADATA)?;
    Some((id.unwrap_or_else(|| HeaderValue::from_static("")), meta))
}

/// Everything of an HTTP request's labels that does not change per
/// response: who called whom, over what.
#[derive(Debug, Clone)]
pub struct HttpLabels<'a> {
    pub reporter: Reporter,
    pub source: &'a Workload,
    pub destination: &'a Workload,
    /// The service's host name (`reviews.default.svc.cluster.local`).
    pub destination_service: &'a str,
    pub request_protocol: &'a str,
    /// `mutual_tls`, `none` or `unknown`.
    pub security_policy: &'a str,
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { UNKNOWN } else { s }
}

/// Escapes a label value for the text format.
fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn push_label(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(key);
    out.push_str("=\"");
    escape_into(out, or_unknown(value));
    out.push('"');
}

fn push_workload(out: &mut String, side: &str, w: &Workload) {
    for (k, v) in [
        ("workload", &w.workload),
        ("workload_namespace", &w.namespace),
        ("principal", &w.principal),
        ("app", &w.app),
        ("version", &w.version),
        ("canonical_service", &w.canonical_service),
        ("canonical_revision", &w.canonical_revision),
        ("cluster", &w.cluster),
    ] {
        push_label(out, &format!("{side}_{k}"), v);
    }
}

impl HttpLabels<'_> {
    /// The rendered labels, in Istio's order, without braces.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(768);
        push_label(&mut out, "reporter", self.reporter.as_str());
        push_workload(&mut out, "source", self.source);
        push_workload(&mut out, "destination", self.destination);
        let svc = self.destination_service;
        // `name.namespace.svc…`: the short name and namespace of the host.
        let mut parts = svc.split('.');
        let (name, ns) = match (parts.next(), parts.next()) {
            (Some(n), Some(ns)) if !svc.is_empty() => (n, ns),
            (Some(n), None) => (n, self.destination.namespace.as_str()),
            _ => ("", ""),
        };
        push_label(&mut out, "destination_service", svc);
        push_label(&mut out, "destination_service_name", name);
        push_label(&mut out, "destination_service_namespace", ns);
        push_label(&mut out, "request_protocol", self.request_protocol);
        push_label(&mut out, "connection_security_policy", self.security_policy);
        out
    }
}

/// An interned label set: one per distinct rendering, kept for the
/// process's life (label sets are bounded by the mesh's workloads).
#[derive(Debug)]
pub struct LabelSet {
    id: u32,
    rendered: String,
}

/// A histogram with fixed bucket bounds (counts per bucket, cumulated on
/// scrape).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    /// In thousandths of the unit (microseconds for durations in ms).
    sum_milli: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_milli: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_milli
            .fetch_add((v * 1000.0) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format_float(*b),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cum}");
        }
        let sum = self.sum_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", format_float(sum));
        let _ = writeln!(out, "{name}_count{{{labels}}} {cum}");
    }
}

fn format_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// One HTTP series: a label set plus response code, gRPC status and flags.
#[derive(Debug)]
pub struct HttpSeries {
    requests: AtomicU64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Debug)]
pub struct TcpSeries {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct HttpKey {
    set: u32,
    code: u16,
    /// `u16::MAX`: not gRPC.
    grpc: u16,
    flags: &'static str,
}

const SHARDS: usize = 16;

/// How many label sets are interned before new services are reported as
/// `unknown`.
pub const MAX_LABEL_SETS: usize = 4096;

/// How many label sets one connection remembers.
const CONN_SETS: usize = 32;

type Shard<K, V> = RwLock<HashMap<K, (Arc<LabelSet>, Arc<V>)>>;
type TcpMap = Mutex<HashMap<u32, (Arc<LabelSet>, Arc<TcpSeries>)>>;
/// Families by name: their type and their series (labels, value).
type Families = BTreeMap<String, (&'static str, Vec<(String, u64)>)>;

/// What one request reports.
#[derive(Debug, Clone, Copy)]
pub struct RequestOutcome {
    pub status: u16,
    pub grpc_status: Option<u16>,
    pub flags: &'static str,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// The Istio metrics of the process.
#[derive(Debug)]
pub struct IstioMetrics {
    pub local: LocalNode,
    interned: Mutex<HashMap<String, Arc<LabelSet>>>,
    http: Vec<Shard<HttpKey, HttpSeries>>,
    tcp: TcpMap,
    hasher: std::collections::hash_map::RandomState,
}

impl IstioMetrics {
    pub fn new(local: LocalNode) -> Self {
        Self {
            local,
            interned: Mutex::new(HashMap::new()),
            http: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            tcp: Mutex::new(HashMap::new()),
            hasher: Default::default(),
        }
    }

    /// The interned label set of `labels`. Past [`MAX_LABEL_SETS`], new
    /// sets lose their service (which the `Host` header fallback lets any
    /// client choose), so memory stays bounded.
    pub fn intern(&self, labels: &HttpLabels<'_>) -> Arc<LabelSet> {
        let mut rendered = labels.render();
        let mut m = self.interned.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_LABEL_SETS && !m.contains_key(&rendered) {
            rendered = HttpLabels {
                destination_service: "",
                ..labels.clone()
            }
            .render();
        }
        let next = u32::try_from(m.len()).unwrap_or(u32::MAX);
        m.entry(rendered)
            .or_insert_with_key(|r| {
                Arc::new(LabelSet {
                    id: next,
                    rendered: r.clone(),
                })
            })
            .clone()
    }

    /// Counts one request on `set`.
    pub fn record_request(&self, set: &Arc<LabelSet>, o: &RequestOutcome) {
        let key = HttpKey {
            set: set.id,
            code: o.status,
            grpc: o.grpc_status.unwrap_or(u16::MAX),
            flags: o.flags,
        };
        let hash = self.hasher.hash_one(key);
        let Some(shard) = self.http.get(hash as usize % SHARDS) else {
            return;
        };
        let found = shard
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map(|(_, s)| s.clone());
        let series = match found {
            Some(s) => s,
            None => shard
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_insert_with(|| {
                    (
                        set.clone(),
                        Arc::new(HttpSeries {
                            requests: AtomicU64::new(0),
                            duration: Histogram::new(DURATION_BUCKETS_MS),
                            request_bytes: Histogram::new(BYTES_BUCKETS),
                            response_bytes: Histogram::new(BYTES_BUCKETS),
                        }),
                    )
                })
                .1
                .clone(),
        };
        series.requests.fetch_add(1, Ordering::Relaxed);
        series.duration.observe(o.duration.as_secs_f64() * 1000.0);
        series.request_bytes.observe(o.request_bytes as f64);
        series.response_bytes.observe(o.response_bytes as f64);
    }

    /// The TCP counters of `set` (looked up once per connection).
    pub fn tcp_series(&self, set: &Arc<LabelSet>) -> Arc<TcpSeries> {
        let mut m = self.tcp.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(set.id)
            .or_insert_with(|| {
                (
                    set.clone(),
                    Arc::new(TcpSeries {
                        opened: AtomicU64::new(0),
                        closed: AtomicU64::new(0),
                        sent: AtomicU64::new(0),
                        received: AtomicU64::new(0),
                    }),
                )
            })
            .1
            .clone()
    }

    /// Istio's families in the text format.
    pub fn render(&self, out: &mut String) {
        let mut http: Vec<(String, Arc<HttpSeries>)> = Vec::new();
        for shard in &self.http {
            for (k, (set, s)) in shard.read().unwrap_or_else(|p| p.into_inner()).iter() {
                let mut labels = set.rendered.clone();
                push_label(&mut labels, "response_code", &k.code.to_string());
                let grpc = if k.grpc == u16::MAX {
                    String::new()
                } else {
                    k.grpc.to_string()
                };
                push_label(&mut labels, "grpc_response_status", &grpc);
                push_label(
                    &mut labels,
                    "response_flags",
                    if k.flags.is_empty() { "-" } else { k.flags },
                );
                http.push((labels, s.clone()));
            }
        }
        http.sort_by(|a, b| a.0.cmp(&b.0));
        if !http.is_empty() {
            out.push_str("# TYPE istio_requests_total counter\n");
            for (l, s) in &http {
                let _ = writeln!(
                    out,
                    "istio_requests_total{{{l}}} {}",
                    s.requests.load(Ordering::Relaxed)
                );
            }
            for (name, pick) in [
                (
                    "istio_request_duration_milliseconds",
                    (|s: &HttpSeries| &s.duration) as fn(&HttpSeries) -> &Histogram,
                ),
                ("istio_request_bytes", |s: &HttpSeries| &s.request_bytes),
                ("istio_response_bytes", |s: &HttpSeries| &s.response_bytes),
            ] {
                let _ = writeln!(out, "# TYPE {name} histogram");
                for (l, s) in &http {
                    pick(s).render(out, name, l);
                }
            }
        }
        let mut tcp: Vec<(String, Arc<TcpSeries>)> = self
            .tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(set, s)| {
                let mut l = set.rendered.clone();
                push_label(&mut l, "response_flags", "-");
                (l, s.clone())
            })
            .collect();
        tcp.sort_by(|a, b| a.0.cmp(&b.0));
        if !tcp.is_empty() {
            for (name, pick) in [
                (
                    "istio_tcp_connections_opened_total",
                    (|s: &TcpSeries| &s.opened) as fn(&TcpSeries) -> &AtomicU64,
                ),
                ("istio_tcp_connections_closed_total", |s: &TcpSeries| {
                    &s.closed
                }),
                ("istio_tcp_sent_bytes_total", |s: &TcpSeries| &s.sent),
                ("istio_tcp_received_bytes_total", |s: &TcpSeries| {
                    &s.received
                }),
            ] {
                let _ = writeln!(out, "# TYPE {name} counter");
                for (l, s) in &tcp {
                    let _ = writeln!(out, "{name}{{{l}}} {}", pick(s).load(Ordering::Relaxed));
                }
            }
        }
    }
}

/// A request whose metrics wait for the end of its response body.
#[derive(Debug)]
pub struct Pending {
    metrics: Arc<IstioMetrics>,
    set: Arc<LabelSet>,
    outcome: RequestOutcome,
    start: std::time::Instant,
    /// Read `grpc-status` from the trailers too.
    grpc: bool,
}

impl Pending {
    pub fn new(
        metrics: Arc<IstioMetrics>,
        set: Arc<LabelSet>,
        outcome: RequestOutcome,
        start: std::time::Instant,
        grpc: bool,
    ) -> Self {
        Self {
            metrics,
            set,
            outcome,
            start,
            grpc,
        }
    }
}

/// A response body that counts what it sends and reports its request when
/// it is dropped: finished, or cut because the client went away (Istio
/// reports those too).
#[derive(Debug)]
pub struct Metered<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, pending: Option<Pending>) -> Self {
        Self { inner, pending }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some(mut p) = self.pending.take() {
            p.outcome.duration = p.start.elapsed();
            p.metrics.record_request(&p.set, &p.outcome);
        }
    }
}

impl<B> http_body::Body for Metered<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let (std::task::Poll::Ready(Some(Ok(frame))), Some(p)) = (&polled, &mut this.pending) {
            if let Some(d) = frame.data_ref() {
                p.outcome.response_bytes += d.len() as u64;
            } else if p.grpc
                && let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
            {
                p.outcome.grpc_status = Some(status);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's view for the metrics: its peer (resolved once) and the
/// label sets it has used, by destination key, so a request on a known
/// destination takes no lock beyond the series map's read lock.
#[derive(Debug)]
pub struct ConnMetrics {
    pub metrics: Arc<IstioMetrics>,
    pub cfg: ferry_model::IstioStats,
    /// The downstream peer, as its certificate tells (inbound).
    pub peer: Workload,
    pub security_policy: &'static str,
    sets: Mutex<Vec<(String, HeaderValue, Arc<LabelSet>)>>,
}

impl ConnMetrics {
    pub fn new(
        metrics: Arc<IstioMetrics>,
        cfg: ferry_model::IstioStats,
        peer_identity: Option<&str>,
        mtls: bool,
    ) -> Self {
        let peer = peer_identity
            .map(Workload::from_identity)
            .unwrap_or_default();
        let security_policy = match cfg.reporter {
            // Only the server sees how the connection was secured.
            Reporter::Destination if mtls => "mutual_tls",
            Reporter::Destination => "none",
            Reporter::Source => UNKNOWN,
        };
        Self {
            metrics,
            cfg,
            peer,
            security_policy,
            sets: Mutex::new(Vec::new()),
        }
    }

    /// The label set for a destination (`service` host) and the peer's
    /// exchanged metadata, computed the first time this connection sees the
    /// pair.
    pub fn label_set(
        &self,
        service: &str,
        exchanged: Option<&(HeaderValue, HeaderValue)>,
        protocol: &str,
    ) -> Arc<LabelSet> {
        let id = exchanged.map(|(id, _)| id);
        let id_bytes: &[u8] = id.map_or(b"", |v| v.as_bytes());
        {
            let sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, _, s)) = sets
                .iter()
                .find(|(k, i, _)| k == service && i.as_bytes() == id_bytes)
            {
                return s.clone();
            }
        }
        let td = &self.metrics.local.trust_domain;
        let mut from_exchange = exchanged
            .and_then(|(_, m)| Workload::decode_exchange(m.as_bytes(), td))
            .unwrap_or_default();
        if self.cfg.reporter == Reporter::Destination {
            // A client's principal is what its certificate proves, never
            // what its headers claim.
            from_exchange.principal.clear();
        }
        // The certificate's identity wins over what the peer says of itself.
        let peer = self.peer.clone().or(&from_exchange);
        let local = &self.metrics.local.workload;
        let (source, destination) = match self.cfg.reporter {
            Reporter::Source => (local, &peer),
            Reporter::Destination => (&peer, local),
        };
        let set = self.metrics.intern(&HttpLabels {
            reporter: self.cfg.reporter,
            source,
            destination,
            destination_service: service,
            request_protocol: protocol,
            security_policy: self.security_policy,
        });
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        if sets.len() >= CONN_SETS {
            sets.clear();
        }
        sets.push((
            service.to_string(),
            id.cloned().unwrap_or_else(|| HeaderValue::from_static("")),
            set.clone(),
        ));
        set
    }
}

/// The service host of an Istio cluster name (`outbound|9080|v1|reviews.default.svc.cluster.local`).
pub fn service_of_cluster(cluster: &str) -> Option<&str> {
    let mut parts = cluster.split('|');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("outbound" | "inbound"), Some(_), Some(_), Some(host)) if !host.is_empty() => {
            Some(host)
        }
        _ => None,
    }
}

/// The `Host` header without its port.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Envoy's tag extraction for the stat names Ferry has: the object's name
/// becomes a label, the rest the metric name.
fn envoy_family(name: &str) -> (String, Option<(&'static str, &str)>) {
    const SCOPES: &[(&str, &str, &str)] = &[
        ("cluster.", "envoy_cluster_", "envoy_cluster_name"),
        ("http.", "envoy_http_", "envoy_http_conn_manager_prefix"),
        ("tcp.", "envoy_tcp_", "envoy_tcp_prefix"),
        ("listener.", "envoy_listener_", "envoy_listener_address"),
    ];
    for (prefix, family, tag) in SCOPES {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        // The stat is the last segment, or the last two under a sub-scope
        // (`ssl.handshake`, `cors.origin_valid`): object names may hold dots.
        let Some((obj, last)) = rest.rsplit_once('.') else {
            continue;
        };
        let (obj, stat) = match obj.rsplit_once('.') {
            Some((o, "ssl" | "cors")) => (o, &rest[o.len() + 1..]),
            _ => (obj, last),
        };
        return (format!("{family}{}", sanitize(stat)), Some((*tag, obj)));
    }
    (format!("envoy_{}", sanitize(name)), None)
}

/// A metric name of `[a-zA-Z0-9_]`.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The whole `/stats/prometheus` body: Envoy-style counters and gauges,
/// then Istio's metrics.
pub fn render_prometheus(stats: &Stats, istio: Option<&IstioMetrics>) -> String {
    let mut families = Families::new();
    for (name, value, gauge) in stats.entries() {
        let (family, tag) = envoy_family(&name);
        let mut labels = String::new();
        if let Some((k, v)) = tag {
            push_label(&mut labels, k, v);
        }
        families
            .entry(family)
            .or_insert((if gauge { "gauge" } else { "counter" }, Vec::new()))
            .1
            .push((labels, value));
    }
    let mut out = String::with_capacity(families.len() * 96);
    for (family, (kind, series)) in &families {
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for (labels, v) in series {
            if labels.is_empty() {
                let _ = writeln!(out, "{family} {v}");
            } else {
                let _ = writeln!(out, "{family}{{{labels}}} {v}");
            }
        }
    }
    if let Some(m) = istio {
        m.render(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)], labels: &[(&str, &str)]) -> Struct {
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.into())),
        };
        let mut l = Struct::default();
        for (k, v) in labels {
            l.fields.insert((*k).into(), s(v));
        }
        let mut m = Struct::default();
        for (k, v) in pairs {
            m.fields.insert((*k).into(), s(v));
        }
        m.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(l)),
            },
        );
        m
    }

    fn local() -> Workload {
        Workload::from_metadata(
            &meta(
                &[("NAMESPACE", "shop"), ("SERVICE_ACCOUNT", "client")],
                &[("app", "client"), ("version", "v1")],
            ),
            "sidecar~10.0.0.1~client-7d9.shop~shop.svc.cluster.local",
            "cluster.local",
        )
    }

    #[test]
    fn local_labels_come_from_node_metadata() {
        let w = local();
        assert_eq!(w.workload, "client-7d9");
        assert_eq!(w.namespace, "shop");
        assert_eq!(w.principal, "spiffe://cluster.local/ns/shop/sa/client");
        assert_eq!(w.canonical_service, "client");
        assert_eq!(w.canonical_revision, "v1");
        assert_eq!(w.cluster, "");
        let p = Workload::from_identity("spiffe://td/ns/prod/sa/server");
        assert_eq!(
            (p.namespace.as_str(), p.service_account.as_str()),
            ("prod", "server")
        );
    }

    #[test]
    fn metadata_exchange_round_trips() {
        let w = local();
        let enc = w.encode_exchange();
        let back = Workload::decode_exchange(enc.as_bytes(), "cluster.local").unwrap();
        assert_eq!(back.workload, "client-7d9");
        assert_eq!(back.app, "client");
        assert_eq!(back.principal, w.principal);
        assert!(Workload::decode_exchange(b"%%%", "td").is_none());
        let mut h = HeaderMap::new();
        LocalNode::new(w, "sidecar~x", "cluster.local").announce(&mut h);
        let (id, _) = take_peer(&mut h).unwrap();
        assert_eq!(id, "sidecar~x");
        assert!(h.is_empty());
    }

    #[test]
    fn cluster_names_and_hosts() {
        assert_eq!(
            service_of_cluster("outbound|9080|v1|reviews.default.svc.cluster.local"),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(service_of_cluster("inbound|9080||"), None);
        assert_eq!(service_of_cluster("PassthroughCluster"), None);
        assert_eq!(host_without_port("server.ns:8080"), "server.ns");
        assert_eq!(host_without_port("server"), "server");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn exposition_has_types_labels_and_cumulative_buckets() {
        let stats = Stats::default();
        stats
            .counter("cluster.outbound|80||a.b.svc.cluster.local.upstream_rq_total")
            .add(3);
        stats.counter("cluster.x.ssl.handshake").inc();
        stats.counter("server.weird-name").inc();
        let _g = stats
            .gauge("http.inbound_0.0.0.0_80.downstream_cx_active")
            .inc();
        let m = IstioMetrics::new(LocalNode::new(local(), "id", "cluster.local"));
        let peer = Workload::from_identity("spiffe://cluster.local/ns/prod/sa/server");
        let set = m.intern(&HttpLabels {
            reporter: Reporter::Source,
            source: &m.local.workload.clone(),
            destination: &peer,
            destination_service: "server.prod.svc.cluster.local",
            request_protocol: "http",
            security_policy: "unknown",
        });
        for (code, ms) in [(200, 3), (200, 700), (404, 1)] {
            m.record_request(
                &set,
                &RequestOutcome {
                    status: code,
                    grpc_status: None,
                    flags: "",
                    duration: Duration::from_millis(ms),
                    request_bytes: 0,
                    response_bytes: 12,
                },
            );
        }
        let t = m.tcp_series(&set);
        t.opened.fetch_add(1, Ordering::Relaxed);
        let text = render_prometheus(&stats, Some(&m));
        assert!(text.contains("# TYPE envoy_cluster_upstream_rq_total counter\nenvoy_cluster_upstream_rq_total{envoy_cluster_name=\"outbound|80||a.b.svc.cluster.local\"} 3\n"), "{text}");
        assert!(text.contains("envoy_cluster_ssl_handshake{envoy_cluster_name=\"x\"} 1\n"));
        assert!(
            text.contains("# TYPE envoy_server_weird_name counter\nenvoy_server_weird_name 1\n")
        );
        assert!(text.contains("# TYPE envoy_http_downstream_cx_active gauge\nenvoy_http_downstream_cx_active{envoy_http_conn_manager_prefix=\"inbound_0.0.0.0_80\"} 1\n"));
        assert!(text.contains("# TYPE istio_requests_total counter\n"));
        let ok = "reporter=\"source\",source_workload=\"client-7d9\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"";
        assert!(text.contains(ok), "{text}");
        assert!(text.contains("destination_workload=\"unknown\",destination_workload_namespace=\"prod\",destination_principal=\"spiffe://cluster.local/ns/prod/sa/server\""));
        assert!(text.contains("destination_service=\"server.prod.svc.cluster.local\",destination_service_name=\"server\",destination_service_namespace=\"prod\",request_protocol=\"http\",connection_security_policy=\"unknown\",response_code=\"200\",grpc_response_status=\"unknown\",response_flags=\"-\"} 2\n"));
        assert!(text.contains(
            "response_code=\"404\",grpc_response_status=\"unknown\",response_flags=\"-\"} 1\n"
        ));
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram\n"));
        // 3 ms and 700 ms: cumulative counts at 5 and 1000, all three at +Inf.
        assert!(text.contains("response_flags=\"-\",le=\"5\"} 1\n"));
        assert!(text.contains("response_flags=\"-\",le=\"1000\"} 2\n"));
        assert!(text.contains("response_flags=\"-\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("response_flags=\"-\"} 703\n"), "{text}");
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"source\""));
        // Every sample line belongs to a family announced before it.
        let mut announced = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(
                    announced.insert(rest.split(' ').next().unwrap().to_string()),
                    "{line}"
                );
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| announced.contains(*b)))
                .unwrap_or(name);
            assert!(announced.contains(base), "{line}");
        }
    }

    #[test]
    fn a_claimed_identity_never_becomes_the_source_principal() {
        let m = Arc::new(IstioMetrics::new(LocalNode::new(
            local(),
            "id",
            "cluster.local",
        )));
        let inbound = ferry_model::IstioStats {
            reporter: Reporter::Destination,
            disable_host_header_fallback: false,
        };
        let claimed = LocalNode::new(local(), "sidecar~client", "cluster.local");
        let headers = (claimed.exchange_id.clone(), claimed.exchange.clone());
        let plain = ConnMetrics::new(m.clone(), inbound, None, false);
        let set = plain.label_set("svc.ns.svc.cluster.local", Some(&headers), "http");
        assert!(set.rendered.contains("source_workload=\"client-7d9\""));
        assert!(
            set.rendered.contains("source_principal=\"unknown\""),
            "{}",
            set.rendered
        );
        assert!(set.rendered.contains("connection_security_policy=\"none\""));
        let mtls = ConnMetrics::new(
            m,
            inbound,
            Some("spiffe://cluster.local/ns/shop/sa/other"),
            true,
        );
        let set = mtls.label_set("svc.ns.svc.cluster.local", Some(&headers), "http");
        assert!(
            set.rendered
                .contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/other\"")
        );
        assert!(
            set.rendered
                .contains("connection_security_policy=\"mutual_tls\"")
        );
        // The same destination and peer again: the same interned set.
        let again = mtls.label_set("svc.ns.svc.cluster.local", Some(&headers), "http");
        assert!(Arc::ptr_eq(&set, &again));
    }

    #[test]
    fn label_sets_are_bounded() {
        let m = IstioMetrics::new(LocalNode::new(local(), "id", "td"));
        let w = Workload::default();
        let mut ids = std::collections::HashSet::new();
        for i in 0..MAX_LABEL_SETS + 50 {
            let host = format!("h{i}.example");
            let set = m.intern(&HttpLabels {
                reporter: Reporter::Destination,
                source: &w,
                destination: &w,
                destination_service: &host,
                request_protocol: "http",
                security_policy: "none",
            });
            ids.insert(set.id);
        }
        assert_eq!(ids.len(), MAX_LABEL_SETS + 1);
    }

    #[tokio::test]
    async fn a_metered_body_reports_when_done_with_the_bytes_sent() {
        use http_body_util::BodyExt;
        let m = Arc::new(IstioMetrics::new(LocalNode::new(local(), "id", "td")));
        let w = Workload::default();
        let set = m.intern(&HttpLabels {
            reporter: Reporter::Destination,
            source: &w,
            destination: &w,
            destination_service: "",
            request_protocol: "grpc",
            security_policy: "none",
        });
        let outcome = RequestOutcome {
            status: 200,
            grpc_status: None,
            flags: "",
            duration: Duration::ZERO,
            request_bytes: 0,
            response_bytes: 0,
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from_static(
                b"hello",
            ))),
            Ok(http_body::Frame::data(bytes::Bytes::from_static(b" world"))),
            Ok(http_body::Frame::trailers(trailers)),
        ]));
        let pending = Pending::new(m.clone(), set, outcome, std::time::Instant::now(), true);
        let body = Metered::new(inner, Some(pending));
        let mut text = String::new();
        m.render(&mut text);
        assert!(text.is_empty(), "reported before the body ended: {text}");
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello world");
        m.render(&mut text);
        assert!(
            text.contains("grpc_response_status=\"14\",response_flags=\"-\"} 1\n"),
            "{text}"
        );
        // 11 bytes: in the 100 bucket, not the 10 one.
        assert!(text.contains("istio_response_bytes_bucket{") && text.contains("le=\"10\"} 0\n"));
        assert!(text.contains("le=\"100\"} 1\n"));
        assert!(text.contains("istio_response_bytes_sum{") && text.contains("} 11\n"));
    }

    #[test]
    fn histogram_bounds_are_inclusive() {
        let h = Histogram::new(BYTES_BUCKETS);
        h.observe(10.0);
        h.observe(11.0);
        let mut s = String::new();
        h.render(&mut s, "x", "a=\"b\"");
        assert!(s.contains("x_bucket{a=\"b\",le=\"10\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{a=\"b\",le=\"100\"} 2\n"));
        assert_eq!(h.count(), 2);
    }
}
