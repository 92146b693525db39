//! One request as its access logs and traces see it: the connection manager
//! opens an [`Observer`] when the request arrives, the router tells it what
//! it learns (route, cluster, upstream attempts and connections, failures),
//! and the response body it wraps ([`ObservedBody`]) completes the record
//! when the last byte was sent — or when the client went away first (`DC`)
//! — then hands it to the access logs and finishes the request's span
//! ([`super::request_trace`]). Nothing is recorded for connection managers
//! without access logs or tracing.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use ferry_model::access_log::AccessLogs;
use ferry_model::stream_info::{LogType, StreamInfo};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};

use super::body::BodyCount;
use super::request_trace::RequestTrace;
use super::{ConnCtx, LocalBody};
use crate::cluster::{LocalAddrSlot, UpstreamError};
use crate::run::Runtime;

/// `%RESPONSE_CODE_DETAILS%` of a response whose maker knows them better
/// than its response flags tell (kept in the response's extensions).
#[derive(Debug, Clone)]
pub(crate) struct Details(pub Cow<'static, str>);

/// The record of a request being served.
struct Record {
    info: StreamInfo,
    logs: Arc<AccessLogs>,
    rt: Arc<Runtime>,
    start: Instant,
    body: Arc<BodyCount>,
    /// The pools report the upstream connection's local address here.
    local_addr: LocalAddrSlot,
    /// The request's spans, when its connection manager traces.
    trace: Option<RequestTrace>,
}

impl Record {
    fn capture(&self, from: &HeaderMap, names: &[http::HeaderName], into: &mut HeaderMap) {
        for n in names {
            for v in from.get_all(n) {
                into.append(n.clone(), v.clone());
            }
        }
    }

    /// Completes the record and writes it to the logs.
    fn finish(mut self, downstream_done: bool) {
        let now = Instant::now();
        let i = &mut self.info;
        i.duration = Some(now - self.start);
        i.bytes_received = self.body.bytes.load(std::sync::atomic::Ordering::Relaxed);
        i.request_complete = self.body.complete.get().map(|t| *t - self.start);
        if !downstream_done {
            // The client went away before the response was sent whole.
            i.add_flag("DC");
            if i.response_code.is_none() {
                i.response_code_details = Some("downstream_remote_disconnect".into());
            }
        }
        if let Some(t) = self.trace.take() {
            t.finish(&self.info);
        }
        if !self.logs.is_empty() {
            self.rt.access_logs.log(&self.logs, &self.info);
        }
    }
}

/// Replaces `s` with `v`, in its allocation when it is large enough.
fn set(s: &mut String, v: &str) {
    if s != v {
        s.clear();
        s.push_str(v);
    }
}

/// What the connection manager knows of a request for its access logs
/// (nothing, when it has none).
pub(crate) struct Observer(Option<Box<Record>>);

impl Observer {
    /// Starts the record of a request that just arrived.
    pub fn start<B>(ctx: &ConnCtx, req: &Request<B>, start: Instant, started: SystemTime) -> Self {
        // The chain the request runs on (an update may have replaced the
        // connection's).
        let chain = ctx.live.chain();
        let Some(hcm) = super::hcm_of(&chain) else {
            return Observer(None);
        };
        if hcm.access_logs.is_empty() && hcm.tracing.is_none() {
            return Observer(None);
        }
        let mut info = StreamInfo::new(LogType::DownstreamEnd, started);
        info.protocol = Some(super::protocol_name(req.version()));
        info.downstream_local = Some(ctx.original_dst);
        info.downstream_local_internal = ctx.local_internal.clone();
        info.downstream_remote = Some(ctx.peer);
        info.downstream_direct_remote = Some(ctx.peer);
        info.requested_server_name = Some(ctx.server_name.clone()).filter(|s| !s.is_empty());
        info.hostname = super::hostname();
        info.filter_state = ctx.filter_state.clone();
        let mut rec = Record {
            info,
            logs: hcm.access_logs.clone(),
            rt: ctx.rt.clone(),
            start,
            body: Arc::default(),
            local_addr: LocalAddrSlot::default(),
            trace: None,
        };
        rec.info.request.scheme = if ctx.tls.is_some() { "https" } else { "http" };
        let mut obs = Observer(Some(Box::new(rec)));
        obs.request(req);
        obs
    }

    /// The request head as it is now: called when the connection manager
    /// has settled the client (`x-forwarded-for`, the request id) and again
    /// when the router has its final headers.
    pub fn request<B>(&mut self, req: &Request<B>) {
        let Some(rec) = self.0.as_mut() else {
            return;
        };
        // Called more than once per request: the strings are reused.
        set(&mut rec.info.request.method, req.method().as_str());
        set(
            &mut rec.info.request.path,
            req.uri().path_and_query().map_or("/", |p| p.as_str()),
        );
        set(
            &mut rec.info.request.authority,
            req.uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| {
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .unwrap_or_default(),
        );
        if let Some(c) = req
            .extensions()
            .get::<ferry_filters::http::forwarded::ClientAddress>()
        {
            rec.info.downstream_remote = Some(c.remote);
        }
        // The request's filter state, once its set_filter_state filters ran.
        if let Some(state) = req
            .extensions()
            .get::<ferry_model::filter_state::FilterState>()
            .filter(|s| rec.info.filter_state.as_deref() != Some(*s))
        {
            rec.info.filter_state = Some(Arc::new(state.clone()));
        }
        let mut headers = std::mem::take(&mut rec.info.request.headers);
        headers.clear();
        rec.capture(req.headers(), &rec.logs.needs.request, &mut headers);
        rec.info.request.headers = headers;
    }

    /// The request head the router sends upstream (its final headers and
    /// path).
    pub fn upstream_request(&mut self, parts: &http::request::Parts, path: &str) {
        let Some(rec) = self.0.as_mut() else {
            return;
        };
        set(&mut rec.info.request.path, path);
        let mut headers = std::mem::take(&mut rec.info.request.headers);
        headers.clear();
        rec.capture(&parts.headers, &rec.logs.needs.request, &mut headers);
        rec.info.request.headers = headers;
    }

    pub fn route(&mut self, route: &ferry_model::Route) {
        if let Some(rec) = self.0.as_mut() {
            rec.info.route_name = Some(route.name.clone()).filter(|n| !n.is_empty());
        }
    }

    /// The connection manager traces: takes the sampling decision (the
    /// request id changes with it) and starts the request's span, once the
    /// route (and its decorator) is known.
    pub fn trace<B>(
        &mut self,
        ctx: &ConnCtx,
        route: Option<&ferry_model::Route>,
        req: &mut Request<B>,
    ) {
        let chain = ctx.live.chain();
        let (Some(rec), Some(cfg)) = (
            self.0.as_mut(),
            super::hcm_of(&chain).and_then(|h| h.tracing.as_ref()),
        ) else {
            return;
        };
        rec.trace = super::request_trace::start(ctx, cfg, route, req, rec.info.start_time);
        if let Some(t) = &rec.trace {
            rec.info.traceable = t.sampled();
            rec.info.trace_id = Some(t.trace_id());
        }
        self.request(req);
    }

    /// The filters ran: what they left in the request's dynamic metadata
    /// (for the spans' metadata tags).
    pub fn after_filters<B>(&mut self, req: &Request<B>) {
        if let Some(t) = self.0.as_mut().and_then(|r| r.trace.as_mut()) {
            t.metadata(req.extensions().get::<super::filters::RbacMetadata>());
        }
    }

    pub fn cluster(&mut self, name: &str) {
        if let Some(rec) = self.0.as_mut() {
            rec.info.upstream_cluster = Some(name.to_string());
        }
    }

    /// The cluster of the chosen route, known (as in Envoy) once the route
    /// is, if the cluster exists.
    pub fn route_cluster(&mut self, ctx: &ConnCtx, name: &str) {
        if let Some(rec) = self.0.as_mut()
            && !name.is_empty()
            && ctx.rt.clusters.load().get(name).is_some()
        {
            rec.info.upstream_cluster = Some(name.to_string());
        }
    }

    /// The counter the request body reports to.
    pub fn body_count(&self) -> Option<Arc<BodyCount>> {
        self.0.as_ref().map(|r| r.body.clone())
    }

    /// The response of the last upstream attempt.
    pub fn upstream_response<B>(&mut self, resp: &Response<B>, attempts: u32) {
        let Some(rec) = self.0.as_mut() else {
            return;
        };
        rec.info.first_upstream_rx = Some(rec.start.elapsed());
        rec.info.attempt_count = Some(attempts);
        rec.info.upstream_protocol = Some(super::protocol_name(resp.version()));
        rec.info.upstream_local = rec.local_addr.get();
    }

    /// An upstream attempt starts: its pool is to report its connection,
    /// and the trace context goes with it.
    pub fn attempt<B>(&mut self, req: &mut Request<B>) {
        if let Some(rec) = self.0.as_mut() {
            req.extensions_mut().insert(rec.local_addr.clone());
            if let Some(t) = rec.trace.as_mut() {
                let cluster = rec.info.upstream_cluster.as_deref().unwrap_or("");
                t.attempt(req.headers_mut(), cluster);
            }
        }
    }

    /// An upstream attempt ended (with an answer, a failure or a timeout).
    pub(super) fn attempt_ended(
        &mut self,
        attempt: &super::Attempt,
        address: &ferry_model::cluster::HostAddr,
    ) {
        let Some(rec) = self.0.as_mut() else {
            return;
        };
        let Some(t) = rec.trace.as_mut() else {
            return;
        };
        let (status, flags, protocol) = match attempt {
            super::Attempt::Response(r)
            | super::Attempt::Exhausted(super::ExhaustedBy::Response(r)) => {
                (r.status().as_u16(), "", super::protocol_name(r.version()))
            }
            super::Attempt::Failed(Some(e))
            | super::Attempt::Exhausted(super::ExhaustedBy::Failure(Some(e))) => {
                (0, e.response_flag(), "-")
            }
            super::Attempt::PerTryTimeout
            | super::Attempt::GlobalTimeout(_)
            | super::Attempt::Exhausted(super::ExhaustedBy::Timeout) => (0, "UT", "-"),
            _ => (0, "UF", "-"),
        };
        let cluster = rec.info.upstream_cluster.clone().unwrap_or_default();
        t.attempt_ended(status, flags, protocol, address, &cluster);
    }

    /// The last upstream attempt failed.
    pub fn upstream_failure(&mut self, e: Option<&UpstreamError>, attempts: u32) {
        let Some(rec) = self.0.as_mut() else {
            return;
        };
        rec.info.attempt_count = Some(attempts);
        rec.info.upstream_local = rec.local_addr.get();
        rec.info.upstream_transport_failure_reason =
            e.and_then(UpstreamError::transport_failure_reason);
    }

    /// The response going downstream, before the body: its code, flags,
    /// details and the headers the logs read.
    pub fn response<B>(
        &mut self,
        resp: &mut Response<B>,
        flags: &str,
        upstream: Option<ferry_model::cluster::HostAddr>,
        grpc: bool,
    ) {
        let Some(rec) = self.0.as_mut() else {
            return;
        };
        if let Some(t) = rec.trace.as_mut() {
            t.response(resp.headers_mut());
        }
        let local = resp.extensions().get::<LocalBody>();
        let i = &mut rec.info;
        // A gRPC client gets a local reply as a trailers-only 200.
        i.response_code = Some(if local.is_some() && grpc {
            200
        } else {
            resp.status().as_u16()
        });
        for f in flags.split(',').filter(|f| !f.is_empty()) {
            i.add_flag(f);
        }
        i.upstream_host = upstream;
        i.local_reply_body = local.and_then(|l| l.text.clone());
        let explicit = resp.extensions().get::<Details>().map(|d| d.0.clone());
        i.response_code_details = Some(match explicit {
            Some(d) => d.into_owned(),
            None => details(
                flags,
                local.is_some(),
                i.upstream_transport_failure_reason.as_deref(),
            ),
        });
        let mut headers = HeaderMap::new();
        rec.capture(resp.headers(), &rec.logs.needs.response, &mut headers);
        rec.info.response_headers = headers;
    }

    /// Wraps the response body, which completes the record.
    pub fn body<B: Body>(mut self, inner: B) -> ObservedBody<B> {
        ObservedBody {
            // A body with nothing to send is never polled: it is sent whole.
            ended: inner.is_end_stream(),
            inner,
            rec: self.0.take(),
        }
    }
}

impl Drop for Observer {
    /// The request was abandoned before it had a response (the client went
    /// away): it is logged as Envoy logs it, code 0 and `DC`.
    fn drop(&mut self) {
        if let Some(rec) = self.0.take() {
            rec.finish(false);
        }
    }
}

/// The response body on its way downstream: counts the bytes sent, keeps the
/// trailers the logs read, and logs the request once done.
pub(crate) struct ObservedBody<B> {
    inner: B,
    rec: Option<Box<Record>>,
    ended: bool,
}

impl<B> ObservedBody<B> {
    fn done(&mut self) {
        if let Some(rec) = self.rec.take() {
            rec.finish(self.ended);
        }
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        self.done();
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(rec) = this.rec.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        rec.info.bytes_sent += d.len() as u64;
                    } else if let Some(t) = frame.trailers_ref()
                        && !rec.logs.needs.trailers.is_empty()
                    {
                        let mut kept = HeaderMap::new();
                        rec.capture(t, &rec.logs.needs.trailers, &mut kept);
                        rec.info.response_trailers = kept;
                    }
                }
                Poll::Ready(None) => this.ended = true,
                _ => {}
            }
            if !this.ended && this.inner.is_end_stream() {
                this.ended = true;
            }
        }
        if this.ended {
            this.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `%RESPONSE_CODE_DETAILS%` from what ended the request: the upstream's
/// answer, or the local reply and the response flag that caused it (the
/// last flag of the list is the final cause: `URX,UC` → a reset).
fn details(flags: &str, local: bool, transport: Option<&str>) -> String {
    if !local {
        return "via_upstream".into();
    }
    let last = flags.rsplit(',').next().unwrap_or("");
    match last {
        "NR" => "route_not_found".into(),
        "UH" => "no_healthy_upstream".into(),
        "UF" => match transport {
            Some(t) => {
                format!("upstream_reset_before_response_started{{remote_connection_failure|{t}}}")
            }
            None => "upstream_reset_before_response_started{connection_timeout}".into(),
        },
        "UC" => "upstream_reset_before_response_started{connection_termination}".into(),
        "UO" => "upstream_reset_before_response_started{overflow}".into(),
        "UT" => "response_timeout".into(),
        "SI" => "stream_idle_timeout".into(),
        "DT" => "max_duration_timeout".into(),
        "NC" => "cluster_not_found".into(),
        "FI" => "fault_filter_abort".into(),
        "RL" => "local_rate_limited".into(),
        _ => "direct_response".into(),
    }
}
