//! The HTTP connection manager: a hyper server connection per downstream
//! connection (HTTP/1.x or HTTP/2), routing each request through the route
//! table of the chain, and the router's upstream call.
//!
//! Errors become responses in exactly one place, [`local_reply`], with
//! Envoy's status codes, bodies and response flags.

pub mod body;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ferry_filters::http::{headers, router};
use ferry_model::{
    ChainKind, FilterChain, HttpConnectionManager, PathMatch, Route, RouteAction, RouteSource,
};
use http::header::{HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::drain::Drain;
use crate::run::Runtime;
use crate::stats::HttpStats;
use body::{ResponseBody, UpstreamBody};

/// What every request on one downstream connection shares.
pub struct ConnCtx {
    pub rt: Arc<Runtime>,
    pub chain: Arc<FilterChain>,
    pub peer: SocketAddr,
    pub original_dst: SocketAddr,
    pub stats: HttpStats,
    /// Set once the connection drains: HTTP/1 responses then carry
    /// `Connection: close`.
    pub closing: std::sync::atomic::AtomicBool,
}

impl ConnCtx {
    fn hcm(&self) -> Option<&HttpConnectionManager> {
        match &self.chain.kind {
            ChainKind::Http(h) => Some(h),
            ChainKind::Tcp(_) => None,
        }
    }
}

/// Serves one downstream connection until it closes or its drain completes.
///
/// Drain (process shutdown or a replaced listener) never cuts a request:
/// HTTP/2 gets GOAWAY and finishes its streams; HTTP/1 answers the next
/// requests with `Connection: close` and, if the client stays idle, is closed
/// at the drain deadline.
pub async fn serve<S>(io: S, ctx: Arc<ConnCtx>, http2: bool, drain: &Drain)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    ctx.stats.downstream_cx_total.inc();
    let _active = ctx.stats.downstream_cx_active.inc();
    let deadline = ctx.rt.drain_timeout;
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    let io = TokioIo::new(io);
    if http2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(deadline, conn).await;
            }
        }
    } else {
        let conn = http1::Builder::new()
            .preserve_header_case(true)
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = drain.signaled() => {}
        }
        ctx.closing
            .store(true, std::sync::atomic::Ordering::Release);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = tokio::time::sleep(deadline) => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(deadline, conn).await;
            }
        }
    }
}

/// A locally generated response and the reason for it.
struct LocalReply {
    status: StatusCode,
    body: Option<String>,
}

fn local_reply(r: LocalReply) -> Response<ResponseBody> {
    let mut resp = match r.body {
        Some(b) => {
            let mut resp = Response::new(body::full(b));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            resp
        }
        None => Response::new(body::empty()),
    };
    *resp.status_mut() = r.status;
    resp
}

fn authority(req: &Request<Incoming>) -> String {
    if let Some(a) = req.uri().authority() {
        return a.as_str().to_string();
    }
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn handle(ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Response<ResponseBody> {
    let start = Instant::now();
    let stats = &ctx.stats;
    stats.downstream_rq_total.inc();
    let _active = stats.downstream_rq_active.inc();
    let version = req.version();
    if version == Version::HTTP_2 {
        stats.downstream_rq_http2_total.inc();
    } else {
        stats.downstream_rq_http1_total.inc();
    }
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let host = authority(&req);
    let (mut resp, flag, upstream) = route_request(&ctx, req, &host, &path).await;
    stats.status(resp.status().as_u16());
    // Answer in the client's HTTP version (an HTTP/1.0 client gets HTTP/1.0).
    *resp.version_mut() = version;
    if version != Version::HTTP_2 && ctx.closing.load(std::sync::atomic::Ordering::Acquire) {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if ctx.rt.access_log {
        tracing::info!(
            target: "access",
            method = %method,
            path = %path,
            protocol = ?version,
            status = resp.status().as_u16(),
            response_flags = flag,
            duration_ms = start.elapsed().as_millis() as u64,
            authority = %host,
            upstream.host = upstream.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            downstream.remote = %ctx.peer,
            route.chain = %ctx.chain.name,
        );
    }
    resp
}

type Routed = (Response<ResponseBody>, &'static str, Option<SocketAddr>);

async fn route_request(ctx: &ConnCtx, req: Request<Incoming>, host: &str, path: &str) -> Routed {
    let Some(hcm) = ctx.hcm() else {
        return (
            local_reply(LocalReply {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: None,
            }),
            "",
            None,
        );
    };
    // RDS tables are looked up per request, so a route update reaches
    // keep-alive and HTTP/2 connections opened before it.
    let routes = match &hcm.routes {
        RouteSource::Inline(rc) => Some(rc.clone()),
        RouteSource::Rds(name) => ctx.rt.snapshot.load().routes.get(name).cloned(),
    };
    let Some(route) = routes
        .as_ref()
        .and_then(|rc| rc.find_route(host, path, req.headers()))
    else {
        ctx.stats.no_route.inc();
        return (
            local_reply(LocalReply {
                status: StatusCode::NOT_FOUND,
                body: None,
            }),
            "NR",
            None,
        );
    };
    match &route.action {
        RouteAction::DirectResponse { status, body } => {
            let r = LocalReply {
                status: *status,
                body: body.clone(),
            };
            (local_reply(r), "", None)
        }
        RouteAction::Redirect {
            status,
            scheme,
            host: to_host,
            port,
            path: to_path,
            prefix_rewrite,
            strip_query,
        } => {
            let matched = match &route.route_match.path {
                PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.as_str(),
                _ => "",
            };
            let spec = router::Redirect {
                scheme: scheme.as_deref(),
                host: to_host.as_deref(),
                port: *port,
                path: to_path.as_deref(),
                prefix_rewrite: prefix_rewrite.as_deref().map(|r| (matched, r)),
                strip_query: *strip_query,
            };
            let location = router::redirect_location("http", host, req.uri(), &spec);
            let mut resp = local_reply(LocalReply {
                status: *status,
                body: None,
            });
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(LOCATION, v);
            }
            (resp, "", None)
        }
        RouteAction::Route { .. } => forward(ctx, hcm, route, req, host).await,
    }
}

async fn forward(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    route: &Route,
    mut req: Request<Incoming>,
    host: &str,
) -> Routed {
    let RouteAction::Route {
        cluster,
        prefix_rewrite,
        host_rewrite,
        timeout,
    } = &route.action
    else {
        return (
            local_reply(LocalReply {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: None,
            }),
            "",
            None,
        );
    };
    let name = cluster.pick(rand::random());
    let clusters = ctx.rt.clusters.load();
    let Some(crt) = clusters.get(name) else {
        let r = LocalReply {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: None,
        };
        return (local_reply(r), "NC", None);
    };
    let Some(pool) = crt.pick(Some(ctx.original_dst)) else {
        let r = LocalReply {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: Some("no healthy upstream".into()),
        };
        return (local_reply(r), "UH", None);
    };
    let upgrade = headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let downstream_version = req.version();
    let (mut parts, body) = req.into_parts();

    if let Some(h) = host_rewrite {
        if let Ok(v) = HeaderValue::from_str(h) {
            parts.headers.insert(HOST, v);
        }
    } else if !parts.headers.contains_key(HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        parts.headers.insert(HOST, v);
    }
    headers::prepare_request(&mut parts.headers, "http", hcm.generate_request_id);
    for name in &route.request_headers_to_remove {
        parts.headers.remove(name);
    }
    for (name, value, append) in &route.request_headers_to_add {
        if *append {
            parts.headers.append(name.clone(), value.clone());
        } else {
            parts.headers.insert(name.clone(), value.clone());
        }
    }
    let mut path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if let (Some(repl), PathMatch::Prefix(matched)) = (prefix_rewrite, &route.route_match.path) {
        path = router::rewrite_prefix(&path, matched, repl);
    }
    let use_h2 = !upgrade
        && match crt.cfg.protocol {
            ferry_model::UpstreamProtocol::Http2 => true,
            ferry_model::UpstreamProtocol::Http1 => false,
            ferry_model::UpstreamProtocol::UseDownstream => downstream_version == Version::HTTP_2,
        };
    let upstream_authority = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or(host)
        .to_string();
    let uri = if use_h2 {
        parts.headers.remove(HOST);
        format!("http://{upstream_authority}{path}").parse::<Uri>()
    } else {
        path.parse::<Uri>()
    };
    let Ok(uri) = uri else {
        let r = LocalReply {
            status: StatusCode::BAD_REQUEST,
            body: None,
        };
        return (local_reply(r), "", None);
    };
    parts.uri = uri;
    parts.version = if use_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let end = timeout.map(|_| Arc::new(Notify::new()));
    let upstream_req = Request::from_parts(parts, UpstreamBody::new(body, end.clone()));

    crt.stats.upstream_rq_total.inc();
    let address = pool.address;
    let send = async {
        if use_h2 {
            pool.send_h2(upstream_req).await
        } else {
            pool.send_h1(upstream_req).await
        }
    };
    let result = match (timeout, end) {
        (Some(t), Some(end)) => {
            let timer = async {
                end.notified().await;
                tokio::time::sleep(*t).await;
            };
            tokio::select! {
                r = send => Some(r),
                _ = timer => None,
            }
        }
        _ => Some(send.await),
    };
    match result {
        None => {
            crt.stats.upstream_rq_timeout.inc();
            let r = LocalReply {
                status: StatusCode::GATEWAY_TIMEOUT,
                body: Some("upstream request timeout".into()),
            };
            (local_reply(r), "UT", Some(address))
        }
        Some(Err(e)) => {
            tracing::debug!(upstream.host = %address, error = %e, "upstream request failed");
            let flag = e.response_flag();
            let r = LocalReply {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: Some(e.to_string()),
            };
            (local_reply(r), flag, Some(address))
        }
        Some(Ok(mut resp)) => {
            crt.stats.status(resp.status().as_u16());
            let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            if let (true, Some(down)) = (upgraded, downstream_upgrade) {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    let (Ok(d), Ok(u)) = tokio::join!(down, up) else {
                        return;
                    };
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u))
                            .await;
                });
            }
            headers::prepare_response(resp.headers_mut(), upgraded);
            (resp.map(Either::Left), "-", Some(address))
        }
    }
}
