//! Distributed tracing as Envoy does it: the sampling decision kept in
//! `x-request-id`, trace context read from and written to requests (W3C
//! `traceparent`/`tracestate` for `envoy.tracers.opentelemetry`, B3 — the
//! `x-b3-*` headers or a single `b3` — for `envoy.tracers.zipkin`), one
//! span per request and, with `spawn_upstream_span`, one per upstream
//! attempt, with Envoy's names and tags.
//!
//! Finished spans are handed to their tracer's exporter through a bounded
//! queue (`try_send`: a full queue drops the span and counts it), and the
//! exporter — a task of its own — sends them in batches through the
//! collector's cluster, flushing as Envoy does (`min_flush_spans`, 5 by
//! default, or every `flush_interval_ms`, 5 s, both read from the
//! bootstrap's static runtime layer like Envoy's). A slow or dead collector
//! only fills the queue: requests never wait for it.

pub mod opentelemetry;
pub mod zipkin;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use ferry_model::tracing::{Provider, Tracing};
use http::{HeaderMap, HeaderValue};
use tokio::sync::mpsc;

use crate::run::Runtime;
use crate::stats::Counter;

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    push_hex(&mut s, b);
    s
}

/// Appends `b` in lower-case hex (ids are written on every traced request:
/// no formatting machinery).
pub fn push_hex(s: &mut String, b: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// A non-zero random id.
fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::random();
        if id.iter().any(|b| *b != 0) {
            return id;
        }
    }
}

/// A span's kind: the proxy answering (ingress) or calling (egress, and
/// upstream attempts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

/// The trace a request arrived in.
#[derive(Debug, Clone, Default)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// B3's parent of the incoming span (shared Zipkin spans keep it).
    pub parent_id: Option<SpanId>,
    /// The caller's sampling decision, when it sent one.
    pub sampled: Option<bool>,
    /// W3C `tracestate`.
    pub tracestate: Option<String>,
    /// It came as a single `b3` header (and goes on as one).
    pub b3_single: bool,
}

/// One span, open or finished.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub tags: Vec<(String, String)>,
    pub sampled: bool,
    /// The parent came from another process (OTLP's `is_remote`).
    pub remote_parent: bool,
    /// A Zipkin server span sharing the client's id.
    pub shared: bool,
    /// What goes on with the requests this span makes.
    pub tracestate: Option<String>,
    pub b3_single: bool,
}

impl Span {
    pub fn tag(&mut self, k: &str, v: impl Into<String>) {
        self.tags.push((k.to_string(), v.into()));
    }

    pub fn tag_value(&self, k: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(t, _)| t == k)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the span failed: Envoy's `error` tag, a 5xx, or a 4xx answer
    /// to a client span (OpenTelemetry's conventions).
    pub fn is_error(&self) -> bool {
        if self.tag_value("error") == Some("true") {
            return true;
        }
        let code: u16 = self
            .tag_value("http.status_code")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        code >= 500 || (self.kind == Kind::Client && code >= 400)
    }
}

/// The counters of one tracer (Envoy's names).
#[derive(Clone, Debug)]
struct TracerStats {
    spans_sent: Counter,
    timer_flushed: Counter,
    reports_sent: Counter,
    reports_failed: Counter,
    spans_dropped: Counter,
}

/// A tracer: how its context travels and where its spans go.
pub struct Tracer {
    pub provider: Arc<Provider>,
    tx: mpsc::Sender<Span>,
    stats: TracerStats,
    /// `node_id` and `zone` tags.
    pub node_id: String,
    pub zone: String,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tracer({})", self.provider.name())
    }
}

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

impl Tracer {
    /// The caller's trace context, in this tracer's propagation format.
    pub fn extract(&self, h: &HeaderMap) -> Option<Parent> {
        match &*self.provider {
            Provider::OpenTelemetry(_) => w3c_extract(h),
            Provider::Zipkin(z) => {
                b3_extract(h).or_else(|| z.w3c.then(|| w3c_extract(h)).flatten())
            }
        }
    }

    /// Writes `span`'s context into an outgoing request.
    pub fn inject(&self, span: &Span, h: &mut HeaderMap) {
        match &*self.provider {
            Provider::OpenTelemetry(_) => {
                w3c_inject(span, h);
            }
            Provider::Zipkin(z) => {
                b3_inject(span, z.trace_id_128bit, h);
                if z.w3c {
                    w3c_inject(span, h);
                }
            }
        }
    }

    /// A span for a request (`parent` its caller's context, `traced` the
    /// connection manager's decision).
    pub fn start(
        &self,
        parent: Option<&Parent>,
        traced: bool,
        name: String,
        kind: Kind,
        start: SystemTime,
    ) -> Span {
        let zipkin = match &*self.provider {
            Provider::Zipkin(z) => Some(z),
            Provider::OpenTelemetry(_) => None,
        };
        // The caller's decision stands when it sent one.
        let sampled = parent.and_then(|p| p.sampled).unwrap_or(traced);
        let trace_id = match (parent, zipkin) {
            (Some(p), _) => p.trace_id,
            (None, Some(z)) if !z.trace_id_128bit => {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&random_id::<8>());
                id
            }
            _ => random_id(),
        };
        let shared = kind == Kind::Server
            && parent.is_some()
            && zipkin.is_some_and(|z| z.shared_span_context);
        let (span_id, parent_id) = match parent {
            Some(p) if shared => (p.span_id, p.parent_id),
            Some(p) => (random_id(), Some(p.span_id)),
            None => (random_id(), None),
        };
        Span {
            trace_id,
            span_id,
            parent_id,
            name,
            kind,
            start,
            end: start,
            // An unsampled span is never sent: no tags.
            tags: if sampled {
                vec![
                    ("node_id".into(), self.node_id.clone()),
                    ("zone".into(), self.zone.clone()),
                ]
            } else {
                Vec::new()
            },
            sampled,
            remote_parent: parent.is_some(),
            shared,
            tracestate: parent.and_then(|p| p.tracestate.clone()),
            b3_single: parent.is_some_and(|p| p.b3_single),
        }
    }

    /// A child span (an upstream attempt) of `parent`.
    pub fn child(&self, parent: &Span, name: String, start: SystemTime) -> Span {
        Span {
            trace_id: parent.trace_id,
            span_id: random_id(),
            parent_id: Some(parent.span_id),
            name,
            kind: Kind::Client,
            start,
            end: start,
            tags: Vec::new(),
            sampled: parent.sampled,
            remote_parent: false,
            shared: false,
            tracestate: parent.tracestate.clone(),
            b3_single: parent.b3_single,
        }
    }

    /// Hands a finished span to the exporter (dropped, and counted, when
    /// its queue is full; not sent at all when unsampled).
    pub fn finish(&self, span: Span) {
        if !span.sampled {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.stats.spans_dropped.inc();
        }
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// W3C Trace Context: `traceparent: 00-<trace>-<span>-<flags>`.
fn w3c_extract(h: &HeaderMap) -> Option<Parent> {
    let tp = header(h, TRACEPARENT)?;
    let mut parts = tp.split('-');
    let version = parts.next()?;
    if version.len() != 2 || version == "ff" {
        return None;
    }
    let trace_id: TraceId = unhex(parts.next()?)?;
    let span_id: SpanId = unhex(parts.next()?)?;
    let flags: [u8; 1] = unhex(parts.next()?)?;
    if trace_id == [0; 16] || span_id == [0; 8] || (version == "00" && parts.next().is_some()) {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        parent_id: None,
        sampled: Some(flags[0] & 1 == 1),
        tracestate: header(h, TRACESTATE).map(str::to_string),
        b3_single: false,
    })
}

fn w3c_inject(span: &Span, h: &mut HeaderMap) {
    let mut v = String::with_capacity(55);
    v.push_str("00-");
    push_hex(&mut v, &span.trace_id);
    v.push('-');
    push_hex(&mut v, &span.span_id);
    v.push_str(if span.sampled { "-01" } else { "-00" });
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(TRACEPARENT, v);
    }
    // Envoy sends the tracestate it got, or an empty one.
    let state = span.tracestate.as_deref().unwrap_or("");
    if let Ok(v) = HeaderValue::from_str(state) {
        h.insert(TRACESTATE, v);
    }
}

/// A B3 trace id: 32 or 16 hex digits (a 64-bit id fills the low half).
fn b3_trace_id(s: &str) -> Option<TraceId> {
    match s.len() {
        32 => unhex(s),
        16 => {
            let low: [u8; 8] = unhex(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// B3: the `x-b3-*` headers, or a single `b3: trace-span[-sampled[-parent]]`.
fn b3_extract(h: &HeaderMap) -> Option<Parent> {
    if let Some(single) = header(h, "b3") {
        let mut parts = single.split('-');
        let trace_id = b3_trace_id(parts.next()?)?;
        let span_id: SpanId = unhex(parts.next()?)?;
        let sampled = parts.next().and_then(b3_sampled);
        let parent_id = parts.next().and_then(unhex::<8>);
        return Some(Parent {
            trace_id,
            span_id,
            parent_id,
            sampled,
            tracestate: None,
            b3_single: true,
        });
    }
    let trace_id = b3_trace_id(header(h, "x-b3-traceid")?)?;
    let span_id: SpanId = unhex(header(h, "x-b3-spanid")?)?;
    let sampled = if header(h, "x-b3-flags") == Some("1") {
        Some(true)
    } else {
        header(h, "x-b3-sampled").and_then(b3_sampled)
    };
    Some(Parent {
        trace_id,
        span_id,
        parent_id: header(h, "x-b3-parentspanid").and_then(unhex::<8>),
        sampled,
        tracestate: None,
        b3_single: false,
    })
}

fn b3_inject(span: &Span, id_128: bool, h: &mut HeaderMap) {
    let trace = if id_128 || span.trace_id[..8] != [0; 8] {
        hex(&span.trace_id)
    } else {
        hex(&span.trace_id[8..])
    };
    let sampled = if span.sampled { "1" } else { "0" };
    for n in [
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    ] {
        h.remove(n);
    }
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    if span.b3_single {
        let mut v = format!("{trace}-{}-{sampled}", hex(&span.span_id));
        if let Some(p) = span.parent_id {
            v.push('-');
            v.push_str(&hex(&p));
        }
        set("b3", v);
        return;
    }
    set("x-b3-traceid", trace);
    set("x-b3-spanid", hex(&span.span_id));
    if let Some(p) = span.parent_id {
        set("x-b3-parentspanid", hex(&p));
    }
    set("x-b3-sampled", sampled.to_string());
}

/// When exporters flush (Envoy's runtime keys, read from the bootstrap's
/// static layers).
#[derive(Debug, Clone, Copy)]
struct Flush {
    interval: Duration,
    min_spans: usize,
}

fn flush_settings(rt: &Runtime, tracer: &str) -> Flush {
    let mut f = Flush {
        interval: Duration::from_millis(5000),
        min_spans: 5,
    };
    let layers = rt
        .bootstrap()
        .proto
        .layered_runtime
        .as_ref()
        .map(|l| l.layers.clone())
        .unwrap_or_default();
    for layer in layers {
        use envoy_types::pb::envoy::config::bootstrap::v3::runtime_layer::LayerSpecifier;
        let Some(LayerSpecifier::StaticLayer(s)) = layer.layer_specifier else {
            continue;
        };
        let json = ferry_xds::json::struct_to_json(&s);
        let get = |key: &str| -> Option<f64> {
            let flat = json.get(format!("tracing.{tracer}.{key}"));
            let nested = json
                .get("tracing")
                .and_then(|t| t.get(tracer))
                .and_then(|t| t.get(key));
            flat.or(nested).and_then(|v| v.as_f64())
        };
        if let Some(ms) = get("flush_interval_ms") {
            f.interval = Duration::from_millis(ms.max(1.0) as u64);
        }
        if let Some(n) = get("min_flush_spans") {
            f.min_spans = n.max(1.0) as usize;
        }
    }
    f
}

/// Every tracer of the live configuration, by the address of its provider
/// (the configuration owns them); tracers of equal providers are shared, so
/// a configuration update keeps their queues.
#[derive(Default)]
pub struct Tracers {
    by_provider: ArcSwap<HashMap<usize, Arc<Tracer>>>,
    /// Tracers by their provider's configuration, for sharing.
    by_content: Mutex<Vec<(Arc<Provider>, Arc<Tracer>)>>,
}

impl Tracers {
    /// The tracer of a connection manager's `tracing` (its provider, else
    /// the bootstrap's).
    pub fn get(&self, rt: &Runtime, t: &Tracing) -> Option<Arc<Tracer>> {
        let provider = t.provider.as_ref().or(rt.bootstrap().tracing.as_ref())?;
        let key = Arc::as_ptr(provider) as usize;
        if let Some(tr) = self.by_provider.load().get(&key) {
            return Some(tr.clone());
        }
        // A configuration being replaced: its provider was found by content.
        let shared = self.by_content.lock().unwrap_or_else(|p| p.into_inner());
        shared
            .iter()
            .find(|(p, _)| **p == **provider)
            .map(|(_, t)| t.clone())
    }

    /// Makes the tracers of `snapshot` (and of the bootstrap) ready.
    pub fn update(&self, rt: &Arc<Runtime>, snapshot: &ferry_model::Snapshot) {
        let mut providers: Vec<Arc<Provider>> = rt.bootstrap().tracing.iter().cloned().collect();
        for l in &snapshot.listeners {
            for c in l.filter_chains.iter().chain(l.default_chain.iter()) {
                if let ferry_model::ChainKind::Http(h) = &c.kind
                    && let Some(p) = h.tracing.as_ref().and_then(|t| t.provider.clone())
                {
                    providers.push(p);
                }
            }
        }
        let mut shared = self.by_content.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = HashMap::new();
        let mut kept = Vec::new();
        for p in providers {
            let tracer = match shared.iter().find(|(q, _)| **q == *p) {
                Some((_, t)) => t.clone(),
                None => Arc::new(start_tracer(rt, p.clone())),
            };
            if !kept
                .iter()
                .any(|(q, _): &(Arc<Provider>, Arc<Tracer>)| **q == *p)
            {
                kept.push((p.clone(), tracer.clone()));
            }
            map.insert(Arc::as_ptr(&p) as usize, tracer);
        }
        // Tracers no configuration names any more stop once their queue is
        // drained (their sender is dropped with them).
        *shared = kept;
        self.by_provider.store(Arc::new(map));
    }
}

fn start_tracer(rt: &Arc<Runtime>, provider: Arc<Provider>) -> Tracer {
    let (name, capacity) = match &*provider {
        Provider::OpenTelemetry(o) => ("opentelemetry", o.max_cache_size.max(1)),
        Provider::Zipkin(_) => ("zipkin", 1024),
    };
    let c = |n: &str| rt.stats.counter(&format!("tracing.{name}.{n}"));
    let stats = TracerStats {
        spans_sent: c("spans_sent"),
        timer_flushed: c("timer_flushed"),
        reports_sent: c("reports_sent"),
        reports_failed: c("reports_failed"),
        spans_dropped: c("spans_dropped"),
    };
    let (tx, rx) = mpsc::channel(capacity);
    let flush = flush_settings(rt, name);
    let node = &rt.admin.node;
    tokio::spawn(export(
        Arc::downgrade(rt),
        provider.clone(),
        rx,
        flush,
        stats.clone(),
    ));
    Tracer {
        provider,
        tx,
        stats,
        node_id: node.id.clone(),
        zone: node
            .locality
            .as_ref()
            .map(|l| l.zone.clone())
            .unwrap_or_default(),
    }
}

/// The exporter: batches spans and sends them, never blocking the data path.
async fn export(
    rt: Weak<Runtime>,
    provider: Arc<Provider>,
    mut rx: mpsc::Receiver<Span>,
    flush: Flush,
    stats: TracerStats,
) {
    let mut batch: Vec<Span> = Vec::new();
    let mut tick = tokio::time::interval(flush.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let timer = tokio::select! {
            s = rx.recv() => match s {
                Some(s) => {
                    batch.push(s);
                    false
                }
                None => break,
            },
            _ = tick.tick() => true,
        };
        if batch.is_empty() || (!timer && batch.len() < flush.min_spans) {
            continue;
        }
        if timer {
            stats.timer_flushed.inc();
        }
        let Some(rt) = rt.upgrade() else { return };
        let spans = std::mem::take(&mut batch);
        let n = spans.len() as u64;
        match send(&rt, &provider, spans).await {
            Ok(()) => {
                stats.reports_sent.inc();
                stats.spans_sent.add(n);
            }
            Err(e) => {
                stats.reports_failed.inc();
                tracing::debug!(tracer = provider.name(), error = %e, "spans could not be exported");
            }
        }
    }
    // The configuration let go of this tracer: what is left goes out.
    if let (Some(rt), false) = (rt.upgrade(), batch.is_empty()) {
        let _ = send(&rt, &provider, batch).await;
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("collector cluster {0:?} is unknown or has no healthy endpoint")]
    NoHost(String),
    #[error("collector request failed: {0}")]
    Upstream(#[from] crate::cluster::UpstreamError),
    #[error("collector answered {0}")]
    Status(String),
    #[error("collector timed out")]
    Timeout,
}

async fn send(rt: &Runtime, provider: &Provider, spans: Vec<Span>) -> Result<(), ExportError> {
    let local = crate::http::local_address();
    let (req, h2, timeout) = match provider {
        Provider::OpenTelemetry(o) => opentelemetry::request(o, &spans),
        Provider::Zipkin(z) => zipkin::request(z, &spans, &rt.admin.node.cluster, local),
    };
    let clusters = rt.clusters.load();
    let pool = clusters
        .get(provider.cluster())
        .and_then(|c| c.pick(None))
        .ok_or_else(|| ExportError::NoHost(provider.cluster().to_string()))?;
    drop(clusters);
    let call = async {
        let resp = if h2 {
            pool.send_h2(req).await?
        } else {
            pool.send_h1(req).await?
        };
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let trailers = http_body_util::BodyExt::collect(body)
            .await
            .ok()
            .and_then(|c| c.trailers().cloned());
        match provider {
            Provider::OpenTelemetry(o) => {
                opentelemetry::check(o, status, &parts.headers, trailers.as_ref())
            }
            Provider::Zipkin(_) if status.is_success() => Ok(()),
            Provider::Zipkin(_) => Err(ExportError::Status(status.to_string())),
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(ExportError::Timeout),
    }
}

/// A request to a collector: method POST, the path and authority, the
/// headers and the body.
pub(crate) fn post(
    authority: &str,
    path: &str,
    headers: &[(http::HeaderName, HeaderValue)],
    content_type: &'static str,
    body: Bytes,
    h2: bool,
) -> http::Request<crate::http::body::UpstreamBody> {
    let uri = if h2 {
        format!("http://{authority}{path}")
    } else {
        path.to_string()
    };
    let mut req = http::Request::new(crate::http::body::UpstreamBody::full(body.clone()));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri.parse().unwrap_or_default();
    *req.version_mut() = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let h = req.headers_mut();
    if !h2 && let Ok(v) = HeaderValue::from_str(authority) {
        h.insert(http::header::HOST, v);
    }
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    for (k, v) in headers {
        h.insert(k.clone(), v.clone());
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_round_trip() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        h.insert(TRACESTATE, "a=b".parse().unwrap());
        let p = w3c_extract(&h).unwrap();
        assert_eq!(hex(&p.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex(&p.span_id), "b7ad6b7169203331");
        assert_eq!(p.sampled, Some(true));
        let span = Span {
            trace_id: p.trace_id,
            span_id: [1; 8],
            parent_id: Some(p.span_id),
            name: String::new(),
            kind: Kind::Server,
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            tags: Vec::new(),
            sampled: false,
            remote_parent: true,
            shared: false,
            tracestate: p.tracestate.clone(),
            b3_single: false,
        };
        let mut out = HeaderMap::new();
        w3c_inject(&span, &mut out);
        assert_eq!(
            out[TRACEPARENT],
            "00-0af7651916cd43dd8448eb211c80319c-0101010101010101-00"
        );
        assert_eq!(out[TRACESTATE], "a=b");
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-xyz",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, bad.parse().unwrap());
            assert!(w3c_extract(&h).is_none(), "{bad}");
        }
    }

    #[test]
    fn b3_multi_and_single() {
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "463ac35c9f6413ad".parse().unwrap());
        h.insert("x-b3-spanid", "a2fb4a1d1a96d312".parse().unwrap());
        h.insert("x-b3-sampled", "0".parse().unwrap());
        let p = b3_extract(&h).unwrap();
        assert_eq!(hex(&p.trace_id), "0000000000000000463ac35c9f6413ad");
        assert_eq!(p.sampled, Some(false));
        let mut h = HeaderMap::new();
        h.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"
                .parse()
                .unwrap(),
        );
        let p = b3_extract(&h).unwrap();
        assert!(p.b3_single && p.sampled == Some(true));
        assert_eq!(hex(&p.parent_id.unwrap()), "05e3ac9a4f6e3b90");
        let span = Span {
            trace_id: p.trace_id,
            span_id: [2; 8],
            parent_id: Some(p.span_id),
            name: String::new(),
            kind: Kind::Client,
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            tags: Vec::new(),
            sampled: true,
            remote_parent: true,
            shared: false,
            tracestate: None,
            b3_single: true,
        };
        let mut out = HeaderMap::new();
        b3_inject(&span, true, &mut out);
        assert_eq!(
            out["b3"],
            "80f198ee56343ba864fe8b2a57d3eff7-0202020202020202-1-e457b5a2e4d86bd1"
        );
        let multi = Span {
            b3_single: false,
            ..span
        };
        let mut out = HeaderMap::new();
        b3_inject(&multi, true, &mut out);
        assert_eq!(out["x-b3-spanid"], "0202020202020202");
        assert_eq!(out["x-b3-parentspanid"], "e457b5a2e4d86bd1");
        assert_eq!(out["x-b3-sampled"], "1");
    }
}
