//! The spans of one request, as Envoy's connection manager and router make
//! them: the sampling decision written into `x-request-id`, the caller's
//! trace context read, the request's span named (`ingress`, `egress
//! <host>`, Zipkin's host, or the route's decorator) and, with upstream
//! spans, one `router <cluster> egress` span per attempt; the context of the
//! innermost span goes upstream. Tags are Envoy's, in Envoy's order.

use std::sync::Arc;
use std::time::SystemTime;

use ferry_model::stream_info::StreamInfo;
use ferry_model::tracing::{
    Provider, Reason, RequestTraceHints, TagValue, Tracing, mark_request_id,
};
use http::{HeaderMap, HeaderValue, Request};

use super::ConnCtx;
use crate::trace::{Kind, Span, Tracer};

const DECORATOR: &str = "x-envoy-decorator-operation";

/// What the request span's tags need of the request, read when it arrived
/// (left empty for a span that is not sampled: it is never sent).
#[derive(Default)]
struct RequestTags {
    request_id: Option<String>,
    url: String,
    method: String,
    downstream_cluster: String,
    user_agent: String,
    client_trace_id: Option<String>,
    /// Each custom tag and its value (none: the tag is left out).
    custom: Vec<(String, Option<String>)>,
}

/// The tracing state of one request.
pub(super) struct RequestTrace {
    cfg: Arc<Tracing>,
    tracer: Arc<Tracer>,
    span: Span,
    tags: RequestTags,
    /// The open span of the current upstream attempt.
    attempt: Option<Span>,
    /// The decorated operation to send back (ingress, with propagation).
    respond_operation: Option<String>,
    traced: bool,
}

/// Takes Envoy's sampling decision for a request of a connection manager
/// with `tracing` (updating its `x-request-id` and the decision counters)
/// and starts its span; `None` when there is no tracer to report to.
/// `path`'s first `max` bytes (fewer at a character boundary).
fn cut_path(path: &str, max: usize) -> &str {
    let mut cut = max.min(path.len());
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    &path[..cut]
}

pub(super) fn start<B>(
    ctx: &ConnCtx,
    cfg: &Arc<Tracing>,
    route: Option<&ferry_model::Route>,
    req: &mut Request<B>,
    start: SystemTime,
) -> Option<RequestTrace> {
    let h = req.headers();
    let request_id = h.get("x-request-id").and_then(|v| v.to_str().ok());
    let hints = RequestTraceHints {
        request_id,
        client_trace_id: h.contains_key("x-client-trace-id"),
        // The connection manager removed it from external requests.
        force_trace: h.contains_key("x-envoy-force-trace"),
    };
    let reason = cfg.decide(&hints);
    let stats = &ctx.stats.tracing;
    match reason {
        Some(Reason::Sampling) => stats.random_sampling.inc(),
        Some(Reason::ServiceForced) => stats.service_forced.inc(),
        Some(Reason::ClientForced) => stats.client_enabled.inc(),
        Some(Reason::NotTraceable) | None => stats.not_traceable.inc(),
    }
    if let (Some(r), Some(id)) = (reason, request_id)
        && let Some(marked) = mark_request_id(id, r)
        && let Ok(v) = HeaderValue::from_str(&marked)
    {
        req.headers_mut().insert("x-request-id", v);
    }
    let traced = reason.is_some_and(Reason::traced);
    let tracer = ctx.rt.tracers.get(&ctx.rt, cfg)?;
    let h = req.headers();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| h.get(http::header::HOST).and_then(|v| v.to_str().ok()))
        .unwrap_or_default();
    // The operation: the route's decorator, else (ingress) the calling
    // proxy's, else Envoy's default for the tracer.
    let decorator = route.and_then(|r| r.decorator.as_ref());
    let incoming = (!cfg.egress)
        .then(|| h.get(DECORATOR).and_then(|v| v.to_str().ok()))
        .flatten()
        .filter(|o| !o.is_empty())
        .map(str::to_string);
    let parent = tracer.extract(h);
    // The caller's decision stands when it sent one (as `Tracer::start`
    // takes it): an unsampled span is never sent, so nothing is spent on
    // its name and tags.
    let sampled = parent.as_ref().and_then(|p| p.sampled).unwrap_or(traced);
    let name = match (&incoming, decorator) {
        _ if !sampled => String::new(),
        (Some(op), _) => op.clone(),
        (None, Some(d)) if !d.operation.is_empty() => d.operation.clone(),
        _ => match (&*tracer.provider, cfg.egress) {
            (Provider::Zipkin(_), _) => authority.to_string(),
            (Provider::OpenTelemetry(_), true) => format!("egress {authority}"),
            (Provider::OpenTelemetry(_), false) => "ingress".to_string(),
        },
    };
    let kind = if cfg.egress {
        Kind::Client
    } else {
        Kind::Server
    };
    let span = tracer.start(parent.as_ref(), traced, name, kind, start);
    let tags = if sampled {
        request_tags(ctx, cfg, req, authority)
    } else {
        RequestTags::default()
    };
    // The operation travels on (egress), or comes back (ingress), unless
    // the decorator says not to propagate it.
    let mut respond_operation = None;
    match decorator {
        Some(d) if d.propagate && !d.operation.is_empty() && cfg.egress => {
            if let Ok(v) = HeaderValue::from_str(&d.operation) {
                req.headers_mut().insert(DECORATOR, v);
            }
        }
        Some(d) if d.propagate && !d.operation.is_empty() && incoming.is_none() => {
            respond_operation = Some(d.operation.clone());
        }
        _ => {}
    }
    if !cfg.egress {
        req.headers_mut().remove(DECORATOR);
    }
    Some(RequestTrace {
        cfg: cfg.clone(),
        tracer,
        span,
        tags,
        attempt: None,
        respond_operation,
        traced,
    })
}

/// The request span's tags, read from the request as it arrived.
fn request_tags<B>(ctx: &ConnCtx, cfg: &Tracing, req: &Request<B>, authority: &str) -> RequestTags {
    let h = req.headers();
    let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let path = header("x-envoy-original-path").unwrap_or_else(|| {
        req.uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string()
    });
    // Envoy's `http.url`: the request's `x-forwarded-proto` as the connection
    // manager settled it (kept when a client sent one, else the connection's
    // own scheme), the authority, and the path cut at `max_path_tag_length`.
    let scheme = header("x-forwarded-proto")
        .unwrap_or_else(|| if ctx.tls.is_some() { "https" } else { "http" }.to_string());
    let url = format!(
        "{scheme}://{authority}{}",
        cut_path(&path, cfg.max_path_tag_length)
    );
    // Metadata tags are resolved once the filters ran (`metadata`).
    let custom = cfg
        .custom_tags
        .iter()
        .map(|t| {
            let v = match &t.value {
                TagValue::Literal(v) => Some(v.clone()),
                TagValue::RequestHeader { name, default } => h
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| default.clone()),
                TagValue::RequestMetadata { default, .. } => default.clone(),
            };
            (t.tag.clone(), v)
        })
        .collect();
    RequestTags {
        request_id: header("x-request-id"),
        url,
        method: req.method().as_str().to_string(),
        downstream_cluster: header("x-envoy-downstream-service-cluster")
            .unwrap_or_else(|| "-".into()),
        user_agent: header("user-agent").unwrap_or_else(|| "-".into()),
        client_trace_id: header("x-client-trace-id"),
        custom,
    }
}

impl RequestTrace {
    /// Whether the request is sampled (`traceable_filter`).
    pub fn sampled(&self) -> bool {
        self.span.sampled || self.traced
    }

    pub fn trace_id(&self) -> String {
        crate::trace::hex(&self.span.trace_id)
    }

    /// The request's dynamic metadata after the filters: the values of the
    /// metadata tags (Envoy's RBAC filter keeps its shadow verdict there).
    pub fn metadata(&mut self, rbac: Option<&super::filters::RbacMetadata>) {
        for (tag, value) in self.tags.custom.iter_mut() {
            let Some(TagValue::RequestMetadata { filter, path, .. }) = self
                .cfg
                .custom_tags
                .iter()
                .find(|t| &t.tag == tag)
                .map(|t| &t.value)
            else {
                continue;
            };
            let found = match (filter.as_str(), path.as_slice(), rbac) {
                ("envoy.filters.http.rbac", [key], Some(md)) => {
                    md.0.iter()
                        .rev()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.clone())
                }
                _ => None,
            };
            if found.is_some() {
                *value = found;
            }
        }
    }

    /// An upstream attempt starts: its span opens (with upstream spans) and
    /// the innermost span's context goes with the request.
    pub fn attempt(&mut self, headers: &mut HeaderMap, cluster: &str) {
        if self.cfg.upstream_spans {
            let child = self.tracer.child(
                &self.span,
                format!("router {cluster} egress"),
                SystemTime::now(),
            );
            self.tracer.inject(&child, headers);
            self.attempt = Some(child);
        } else {
            self.tracer.inject(&self.span, headers);
        }
    }

    /// The current attempt ended: its span is finished with what the
    /// upstream said (`status`, 0 without an answer) and sent.
    pub fn attempt_ended(
        &mut self,
        status: u16,
        flags: &str,
        protocol: &str,
        address: &ferry_model::cluster::HostAddr,
        cluster: &str,
    ) {
        let Some(mut s) = self.attempt.take() else {
            return;
        };
        if !s.sampled {
            // Never sent: not worth its tags.
            return;
        }
        s.end = SystemTime::now();
        s.tag("http.protocol", protocol);
        s.tag("upstream_address", address.to_string());
        s.tag("peer.address", address.to_string());
        s.tag("component", "proxy");
        s.tag("upstream_cluster", cluster);
        s.tag("upstream_cluster.name", cluster);
        if status != 0 {
            s.tag("http.status_code", status.to_string());
        }
        s.tag("response_flags", if flags.is_empty() { "-" } else { flags });
        if status == 0 || status >= 500 {
            s.tag("error", "true");
        }
        // Envoy's upstream spans carry the connection manager's custom tags.
        for (k, v) in &self.tags.custom {
            if let Some(v) = v {
                s.tag(k, v.clone());
            }
        }
        self.tracer.finish(s);
    }

    /// The response goes downstream: an ingress span's decorated operation
    /// goes with it; an egress span takes the one the upstream sent back.
    pub fn response(&mut self, headers: &mut HeaderMap) {
        if self.cfg.egress {
            if let Some(op) = headers
                .remove(DECORATOR)
                .and_then(|v| v.to_str().ok().map(str::to_string))
                .filter(|o| !o.is_empty())
            {
                self.span.name = op;
            }
        } else if let Some(op) = &self.respond_operation
            && let Ok(v) = HeaderValue::from_str(op)
        {
            headers.insert(DECORATOR, v);
        }
    }

    /// The request is done: its span is finished with Envoy's tags and sent.
    pub fn finish(mut self, info: &StreamInfo) {
        if let Some(s) = self.attempt.take() {
            // An attempt the request outlived (a reset, a timeout).
            let mut s = s;
            s.end = SystemTime::now();
            s.tag("error", "true");
            self.tracer.finish(s);
        }
        if !self.span.sampled {
            // Never sent: not worth its tags.
            return;
        }
        let t = self.tags;
        let s = &mut self.span;
        s.end = SystemTime::now();
        if let Some(id) = &t.request_id {
            s.tag("guid:x-request-id", id.clone());
        }
        s.tag("http.url", t.url);
        s.tag("http.method", t.method);
        s.tag("downstream_cluster", t.downstream_cluster);
        s.tag("user_agent", t.user_agent);
        s.tag("http.protocol", info.protocol.unwrap_or("-"));
        if let Some(a) = info.downstream_remote {
            s.tag("peer.address", a.ip().to_string());
        }
        if let Some(c) = t.client_trace_id {
            s.tag("guid:x-client-trace-id", c);
        }
        s.tag("request_size", info.bytes_received.to_string());
        s.tag("response_size", info.bytes_sent.to_string());
        s.tag("component", "proxy");
        if let Some(c) = &info.upstream_cluster {
            s.tag("upstream_cluster", c.clone());
            s.tag("upstream_cluster.name", c.clone());
        }
        let code = info.response_code.unwrap_or(0);
        if code != 0 {
            s.tag("http.status_code", code.to_string());
        }
        s.tag(
            "response_flags",
            if info.response_flags.is_empty() {
                "-".to_string()
            } else {
                info.response_flags.clone()
            },
        );
        if code == 0 || code >= 500 {
            s.tag("error", "true");
        }
        for (k, v) in t.custom {
            if let Some(v) = v {
                s.tag(&k, v);
            }
        }
        self.tracer.finish(self.span);
    }
}

#[cfg(test)]
mod tests {
    use super::cut_path;

    #[test]
    fn only_the_path_is_cut_and_never_inside_a_character() {
        assert_eq!(cut_path("/abcdef", 4), "/abc");
        assert_eq!(cut_path("/ab", 256), "/ab");
        // "é" is two bytes: a cut through it keeps the byte before.
        assert_eq!(cut_path("/é", 2), "/");
    }
}
