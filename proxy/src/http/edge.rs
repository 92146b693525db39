//! The connection manager's admission of every request, HTTP/1 and HTTP/2
//! alike, before routing and before any filter sees it: the HTTP/1 guard's
//! verdict on the request's head ([`super::h1_guard`]),
//! `headers_with_underscores_action`, the HTTP/2 header count and
//! `disallow_obs_text`, and the Host of an HTTP/1.0 request
//! (`default_host_for_http_10`). A refused HTTP/1 request is answered and
//! its connection closed; a refused HTTP/2 stream is reset, as Envoy does.

use http::header::HOST;
use http::{HeaderName, HeaderValue, Request, StatusCode, Version};
use hyper::body::Incoming;

use ferry_model::HttpConnectionManager;
use ferry_model::http_protocol::UnderscoresAction;

use super::ConnCtx;
use super::h1_guard::Verdict;

/// What was learnt of an admitted request.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    /// It asks for an upgrade: the HTTP/1 guard waits to hear whether it
    /// happened.
    pub upgrade: bool,
}

/// Why a request goes no further.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Answer with this status and body, then close the connection.
    Reply {
        status: StatusCode,
        body: &'static str,
    },
    /// Reset the HTTP/2 stream.
    Reset,
}

/// The error a refused HTTP/2 stream is reset with.
#[derive(Debug, thiserror::Error)]
#[error("request refused at the edge: stream reset")]
pub struct StreamReset;

pub(crate) fn admit(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    req: &mut Request<Incoming>,
) -> Result<Admitted, Refused> {
    let p = &hcm.protocol;
    let h2 = req.version() == Version::HTTP_2;
    let mut admitted = Admitted::default();
    if !h2 {
        match ctx.h1.next_verdict() {
            Some(Verdict::Pass { upgrade }) => admitted.upgrade = upgrade,
            Some(Verdict::Refuse(r)) => {
                if r.is_header_timeout() {
                    ctx.stats.downstream_rq_header_timeout.inc();
                } else {
                    ctx.stats.downstream_cx_protocol_error.inc();
                }
                tracing::debug!(src.addr = %ctx.peer, reason = r.reason, status = r.status.as_u16(), "HTTP/1 request refused");
                return Err(Refused::Reply {
                    status: r.status,
                    body: r.body,
                });
            }
            None => {
                // hyper parsed a head the guard did not release: refused,
                // whatever it is.
                ctx.stats.downstream_cx_protocol_error.inc();
                tracing::warn!(src.addr = %ctx.peer, "HTTP/1 request without a verdict; refused");
                return Err(Refused::Reply {
                    status: StatusCode::BAD_REQUEST,
                    body: "Bad Request",
                });
            }
        }
    }
    let codec = if h2 { "http2" } else { "http1" };
    if p.headers_with_underscores != UnderscoresAction::Allow {
        let names: Vec<HeaderName> = req
            .headers()
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .cloned()
            .collect();
        if !names.is_empty() {
            if p.headers_with_underscores == UnderscoresAction::RejectRequest {
                ctx.rt
                    .stats
                    .counter(&format!(
                        "{codec}.requests_rejected_with_underscores_in_headers"
                    ))
                    .inc();
                return Err(if h2 {
                    Refused::Reset
                } else {
                    Refused::Reply {
                        status: StatusCode::BAD_REQUEST,
                        body: "Bad Request",
                    }
                });
            }
            let dropped = ctx
                .rt
                .stats
                .counter(&format!("{codec}.dropped_headers_with_underscores"));
            for n in names {
                let count = req.headers().get_all(&n).iter().count();
                dropped.add(count as u64);
                req.headers_mut().remove(&n);
            }
        }
    }
    if h2 {
        // The h2 codec bounds the header list's size but not its count; as
        // Envoy, the pseudo-headers count too.
        let count = req.headers().len() + pseudo_headers(req);
        if count > p.max_headers_count as usize {
            ctx.rt.stats.counter("http2.header_overflow").inc();
            return Err(Refused::Reset);
        }
        if p.http2.disallow_obs_text
            && req
                .headers()
                .values()
                .any(|v| v.as_bytes().iter().any(|b| *b >= 0x80))
        {
            ctx.rt.stats.counter("http2.rx_messaging_error").inc();
            return Err(Refused::Reset);
        }
    }
    if req.version() == Version::HTTP_10
        && !req.headers().contains_key(HOST)
        && req.uri().authority().is_none()
        && !p.http1.default_host_for_http_10.is_empty()
        && let Ok(v) = HeaderValue::from_str(&p.http1.default_host_for_http_10)
    {
        req.headers_mut().insert(HOST, v);
    }
    Ok(admitted)
}

/// The pseudo-headers an HTTP/2 request carried (`:method`, `:scheme`,
/// `:path`, `:authority`, and `:protocol` for an extended CONNECT).
fn pseudo_headers(req: &Request<Incoming>) -> usize {
    let u = req.uri();
    1 + usize::from(u.scheme().is_some())
        + usize::from(u.path_and_query().is_some_and(|p| !p.as_str().is_empty()))
        + usize::from(u.authority().is_some())
}
