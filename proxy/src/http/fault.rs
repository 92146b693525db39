//! Runs the fault filter (`envoy.filters.http.fault`) of a connection
//! manager on one request: the decision comes from
//! `ferry_filters::http::fault`; here the delay is slept and the abort is
//! answered, with Envoy's counters (`http.<prefix>.fault.*`).

use ferry_filters::http::fault as decide;
use ferry_model::HttpConnectionManager;
use ferry_model::fault::FaultConfig;
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::ConnCtx;
use super::body::{self, ResponseBody};

pub enum Applied {
    None,
    Delayed,
    Aborted(Response<ResponseBody>),
    DelayedAborted(Response<ResponseBody>),
}

pub async fn apply(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    cfg: &FaultConfig,
    headers: &HeaderMap,
    pseudo: &ferry_model::Pseudo<'_>,
    cluster: &str,
) -> Applied {
    if (cfg.delay.is_none() && cfg.abort.is_none())
        || !decide::applies_to(cfg, headers, Some(pseudo), cluster)
    {
        return Applied::None;
    }
    let counter = |n: &str| {
        ctx.rt
            .stats
            .counter(&format!("http.{}.fault.{n}", hcm.stat_prefix))
    };
    // `max_active_faults` bounds the faults in progress (a delay is active
    // while it sleeps); beyond it the request goes through untouched.
    let active = ctx
        .rt
        .stats
        .gauge(&format!("http.{}.fault.active_faults", hcm.stat_prefix));
    let overflow = || {
        let full = cfg
            .max_active_faults
            .is_some_and(|max| active.get() >= u64::from(max));
        if full {
            counter("faults_overflow").inc();
        }
        full
    };
    let delayed = match decide::delay(cfg, headers, rand::random()) {
        Some(d) if !overflow() => {
            counter("delays_injected").inc();
            let _active = active.inc();
            tokio::time::sleep(d).await;
            true
        }
        _ => false,
    };
    // Envoy decides the abort after the delay, with its own roll.
    let abort = decide::abort(cfg, headers, rand::random()).filter(|_| !overflow());
    let Some(abort) = abort else {
        return if delayed {
            Applied::Delayed
        } else {
            Applied::None
        };
    };
    counter("aborts_injected").inc();
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let resp = abort_response(abort, grpc);
    if delayed {
        Applied::DelayedAborted(resp)
    } else {
        Applied::Aborted(resp)
    }
}

/// Envoy's local reply for an injected abort: the status with a plain-text
/// body, or for a gRPC abort of a gRPC request a trailers-only answer
/// carrying the `grpc-status` (a gRPC abort of any other request is, as in
/// Envoy, a plain 200 with the abort body).
fn abort_response(abort: decide::Abort, grpc_request: bool) -> Response<ResponseBody> {
    match abort {
        decide::Abort::Grpc(_) if !grpc_request => abort_response(decide::Abort::Http(200), false),
        decide::Abort::Http(status) => {
            let mut resp = Response::new(body::full(decide::ABORT_BODY));
            *resp.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            resp.extensions_mut().insert(super::LocalBody {
                text: Some(decide::ABORT_BODY.to_string()),
                grpc_status: None,
            });
            resp
        }
        decide::Abort::Grpc(code) => {
            let mut resp = Response::new(body::empty());
            let h = resp.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static(decide::ABORT_BODY));
            resp
        }
    }
}
