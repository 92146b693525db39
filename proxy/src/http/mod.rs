//! The HTTP connection manager: a hyper server connection per downstream
//! connection (HTTP/1.x or HTTP/2), routing each request through the route
//! table of the chain, and the router's upstream call.
//!
//! Errors become responses in exactly one place, [`local_reply`], with
//! Envoy's status codes, bodies and response flags.

pub mod body;
mod client;
mod compressor;
mod connect;
mod edge;
pub(crate) mod ext_authz;
mod fault;
mod filters;
mod observe;
mod request_id;
mod request_trace;

pub(crate) use client::local_address;
pub mod h1_guard;
pub mod h2_exec;
pub mod h2_guard;
pub mod lifetime;
pub(crate) mod on_wake;
mod shadow;
mod stream_timers;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_filters::http::{headers, retry, router};
use ferry_model::format::FormatContext;
use ferry_model::http_protocol::DownstreamProtocol;
use ferry_model::{
    ChainKind, FilterChain, HostRewrite, HttpConnectionManager, HttpFilterConfig, PathMatch, Route,
    RouteAction, RouteSource, WeightedCluster,
};
use http::header::{HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::cluster::{ClusterRt, EndpointPool, UpstreamError};
use crate::drain::Drain;
use crate::run::Runtime;
use crate::stats::HttpStats;
use body::{DeadlineBody, Replay, ResponseBody, UpstreamBody};

/// The TLS side of a downstream connection.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// The client presented a (verified) certificate.
    pub mtls: bool,
    /// The client's SPIFFE id, read only for chains that report Istio's
    /// metrics.
    pub identity: Option<Arc<str>>,
    pub client_cert: Option<Arc<ferry_tls::ClientCertInfo>>,
}

/// Applies the connection manager's `forward_client_cert_details` to
/// `x-forwarded-client-cert`, as Envoy does.
fn forward_client_cert(
    headers: &mut http::HeaderMap,
    hcm: &HttpConnectionManager,
    tls: Option<&PeerTls>,
) {
    use ferry_model::listener::ForwardClientCert as F;
    const XFCC: &str = "x-forwarded-client-cert";
    let mtls = tls.is_some_and(|t| t.mtls);
    match hcm.forward_client_cert {
        F::AlwaysForwardOnly => {}
        F::ForwardOnly if mtls => {}
        F::AppendForward | F::SanitizeSet if mtls => {
            let Some(info) = tls.and_then(|t| t.client_cert.as_ref()) else {
                headers.remove(XFCC);
                return;
            };
            let d = hcm.client_cert_details;
            let element = info.element(d.subject, d.uri, d.dns);
            let value = match (hcm.forward_client_cert, headers.get(XFCC)) {
                (F::AppendForward, Some(prev)) => {
                    format!("{},{element}", String::from_utf8_lossy(prev.as_bytes()))
                }
                _ => element,
            };
            headers.remove(XFCC);
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(XFCC, v);
            }
        }
        _ => {
            headers.remove(XFCC);
        }
    }
}

/// What every request on one downstream connection shares.
pub struct ConnCtx {
    pub rt: Arc<Runtime>,
    /// The chain the connection was accepted on (its connection-level
    /// settings); requests read theirs from [`ConnCtx::live`].
    pub chain: Arc<FilterChain>,
    pub peer: SocketAddr,
    pub original_dst: SocketAddr,
    /// An internal listener's own address, when it is the connection's
    /// local address (nothing restored a destination).
    pub local_internal: Option<ferry_model::cluster::InternalAddr>,
    /// The downstream connection is TLS (`x-forwarded-proto: https`):
    /// whether the client presented a certificate, and what
    /// `x-forwarded-client-cert` says about it.
    pub tls: Option<PeerTls>,
    pub stats: Arc<HttpStats>,
    /// Set once the connection drains: HTTP/1 responses then carry
    /// `Connection: close`.
    pub closing: std::sync::atomic::AtomicBool,
    /// Token buckets of the local rate limit configurations that are per
    /// connection, by the configuration's address.
    pub ratelimit_buckets: filters::ConnBuckets,
    /// SNI of the downstream connection ("" without one), for RBAC.
    pub server_name: String,
    /// The connection as RBAC policies see it, with its dynamic metadata:
    /// built on the first request an RBAC filter checks, then shared by
    /// the connection's other requests.
    pub rbac_view:
        std::sync::OnceLock<Box<(crate::rbac::Downstream, ferry_model::rbac::DynamicMetadata)>>,
    /// Istio's metrics of this connection, when its chain has `istio.stats`.
    /// (Boxed: most connections have none, and every connection holds this.)
    pub istio: Option<Box<crate::metrics::ConnMetrics>>,
    /// The connection among the live ones: an update that changes its chain
    /// hands the next requests to the chain a new connection would get.
    pub live: Arc<crate::filter_chain_update::LiveConn>,
    /// What the HTTP/1 request guard tells the connection manager.
    pub h1: Arc<h1_guard::H1Shared>,
    /// The connection's streams and the drains they ask for.
    pub life: Arc<lifetime::Lifetime>,
    /// The filter state an internal connection came with.
    pub filter_state: Option<Arc<ferry_model::filter_state::FilterState>>,
}

/// The connection manager of an HTTP chain.
fn hcm_of(chain: &FilterChain) -> Option<&HttpConnectionManager> {
    match &chain.kind {
        ChainKind::Http(h) => Some(h),
        ChainKind::Tcp(_) => None,
    }
}

impl ConnCtx {
    /// The connection as the RBAC policies see it, and its dynamic metadata.
    fn rbac_view(&self) -> &(crate::rbac::Downstream, ferry_model::rbac::DynamicMetadata) {
        self.rbac_view.get_or_init(|| {
            let d = crate::rbac::Downstream {
                peer: self.peer,
                local: self.original_dst,
                server_name: self.server_name.clone(),
                tls: self.tls.as_ref().map(|t| crate::rbac::DownstreamTls {
                    client_cert: t.client_cert.clone(),
                }),
                filter_state: self.filter_state.clone(),
            };
            let md = d.metadata();
            Box::new((d, md))
        })
    }
}

impl ConnCtx {
    /// The response being sent is the connection's last (HTTP/1
    /// `connection: close`), or is followed by GOAWAY (HTTP/2).
    fn close_after_response(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.life.ask_drain();
    }
}

/// Serves one downstream connection until it closes or its drain completes.
///
/// Drain (process shutdown, a changed filter chain, `max_connection_duration`,
/// `max_requests_per_connection`, `idle_timeout`) never cuts a request:
/// HTTP/2 gets GOAWAY and finishes its streams; HTTP/1 answers the next
/// requests with `Connection: close` and, if the client stays idle, is closed
/// at the drain deadline, or at once when the connection is told to close
/// (a network RBAC re-check denied it).
pub async fn serve<S>(io: S, ctx: Arc<ConnCtx>, http2: bool, drain: &Drain)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    ctx.stats.downstream_cx_total.inc();
    let _active = ctx.stats.downstream_cx_active.inc();
    // Connection-level settings come from the chain the connection was
    // accepted on; a chain updated in place changes how its requests are
    // handled, not the connection's codec.
    let p = hcm_of(&ctx.chain).map_or_else(
        || Arc::new(DownstreamProtocol::default()),
        |h| h.protocol.clone(),
    );
    let idle = hcm_of(&ctx.chain).and_then(|h| h.idle_timeout);
    let max_age = p
        .max_connection_duration
        .map(|d| tokio::time::Instant::now() + jittered(d, p.max_connection_duration_jitter));
    // Each codec's connection state is boxed on its own: the connection's
    // task holds the one it speaks, not room for the larger of the two.
    if http2 {
        Box::pin(serve_h2(io, &ctx, &p, drain, idle, max_age)).await;
    } else {
        let guard = h1_guard::H1Guard::new(
            io,
            h1_guard::Limits::of(&p),
            p.request_headers_timeout,
            ctx.h1.clone(),
        );
        Box::pin(serve_h1(guard, &ctx, &p, drain, idle, max_age)).await;
    }
}

/// (A function returning an `async` block, as [`serve_h1`].)
#[allow(clippy::manual_async_fn)] // on purpose, see serve_h1
fn serve_h2<'a, S>(
    io: S,
    ctx: &'a Arc<ConnCtx>,
    p: &'a Arc<DownstreamProtocol>,
    drain: &'a Drain,
    idle: Option<Duration>,
    max_age: Option<tokio::time::Instant>,
) -> impl Future<Output = ()> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let deadline = ctx.rt.drain_timeout;
        // `http_reject_path_with_fragment` (Envoy's default): the guard reads
        // the request header blocks for a `:path` with '#', which the codec
        // would strip; such a request is answered 400.
        let fragments = ferry_xds::runtime::current()
            .reject_path_with_fragment()
            .then(h2_guard::Fragments::default);
        let svc_ctx = ctx.clone();
        let svc_fragments = fragments.clone();
        let svc = service_fn(move |mut req| {
            let ctx = svc_ctx.clone();
            if let Some(f) = &svc_fragments {
                f.mark(&mut req);
            }
            async move { handle(ctx, req).await }
        });
        ctx.stats.downstream_cx_http2_total.inc();
        let counters = h2_guard::H2Counters::new(
            &ctx.rt.stats,
            ctx.stats.downstream_rq_too_many_premature_resets.clone(),
        );
        let io = TokioIo::new(
            h2_guard::H2Guard::new(io, p.http2.clone(), counters).watching_fragments(fragments),
        );
        // Streams run on the executor that can reset a terminated CONNECT's.
        // (The builder in a block of its own: it is not kept beside the
        // connection.)
        let conn = {
            let mut builder = http2::Builder::new(h2_exec::StreamExec);
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(p.http2.max_concurrent_streams)
                .initial_stream_window_size(p.http2.initial_stream_window_size)
                .initial_connection_window_size(p.http2.initial_connection_window_size)
                .max_header_list_size(p.max_request_headers_bytes)
                .header_table_size(p.http2.hpack_table_size)
                .max_local_error_reset_streams(Some(p.http2.max_outbound_control_frames as usize));
            if let Some(k) = p.http2.keepalive {
                builder
                    .keep_alive_interval(k.interval)
                    .keep_alive_timeout(k.timeout);
            }
            builder.serve_connection(io, svc)
        };
        tokio::pin!(conn);
        // Polled only when one of them was woken, not on each of the codec's
        // wake-ups (`on_wake`).
        let watch = on_wake::OnWake::new(watch_lifetime(ctx, drain, max_age, idle, || {
            ctx.life.drain_asked()
        }));
        tokio::select! {
            _ = conn.as_mut() => return,
            w = watch => match w {
                Watch::MaxAge => ctx.stats.downstream_cx_max_duration_reached.inc(),
                Watch::Idle => ctx.stats.downstream_cx_idle_timeout.inc(),
                Watch::Drain | Watch::DrainAsked => {}
            },
        }
        // The drain starts: GOAWAY is sent, the open streams finish.
        let drained_at = tokio::time::Instant::now();
        conn.as_mut().graceful_shutdown();
        tokio::select! {
            _ = conn.as_mut() => {}
            // As Envoy: closed `drain_timeout` after the GOAWAY once no
            // stream is left (the client need not acknowledge anything),
            // and in any case at the process's drain deadline.
            _ = async {
                tokio::time::sleep_until(drained_at + p.drain_timeout).await;
                ctx.life.idle_for(Some(Duration::ZERO)).await;
            } => ctx.stats.downstream_cx_drain_close.inc(),
            _ = tokio::time::sleep_until(drained_at + deadline) => {
                ctx.stats.downstream_cx_drain_close.inc();
            }
        }
    }
}

/// Waits beside a connection's codec for what ends or drains it, and for
/// what `asked` makes: a drain a response asked for (HTTP/2's; HTTP/1
/// gives [`std::future::pending`], which takes no room). (Made inside,
/// not passed in: a future passed in would have room twice, as the
/// argument and in the `select!`.)
///
/// Kept for the connection's life, so kept small: the timer of
/// `max_connection_duration`, which most connections do not have, is boxed
/// when there is one rather than room in every connection's future.
#[allow(clippy::manual_async_fn)] // the arguments kept once, as serve_h1
fn watch_lifetime<'a, A: Future<Output = ()> + Send + 'a>(
    ctx: &'a ConnCtx,
    drain: &'a Drain,
    max_age: Option<tokio::time::Instant>,
    idle: Option<Duration>,
    asked: impl FnOnce() -> A + Send + 'a,
) -> impl Future<Output = Watch> + Send + 'a {
    let max_age = max_age.map(|at| Box::pin(tokio::time::sleep_until(at)));
    async move {
        tokio::select! {
            _ = drain.signaled() => Watch::Drain,
            () = async move {
                match max_age {
                    Some(at) => at.await,
                    None => std::future::pending().await,
                }
            } => Watch::MaxAge,
            _ = asked() => Watch::DrainAsked,
            _ = ctx.life.idle_since_last_stream(idle) => Watch::Idle,
        }
    }
}

/// What ended a connection's wait beside its codec.
enum Watch {
    /// The listener or the process drains.
    Drain,
    /// A response was marked as the connection's last
    /// (`ConnCtx::close_after_response`; HTTP/2 then sends GOAWAY).
    DrainAsked,
    /// `max_connection_duration` passed.
    MaxAge,
    /// No stream for `idle_timeout`.
    Idle,
}

/// How an HTTP/1 connection's serving phase ended.
enum H1Step<S> {
    /// The connection is done (closed, failed, or drained).
    Done,
    /// Idle between requests: hyper's codec is gone, the guard waits alone.
    Parked(h1_guard::H1Guard<S>),
}

/// An HTTP/1 connection: served by hyper until it is idle, then parked,
/// and served again when the client sends. Each phase is a future boxed
/// apart and dropped when it ends, so a parked connection holds the guard
/// and its watchers, not the room the serving phase needs (1.2 KiB).
///
/// (A function returning an `async` block rather than an `async fn`: an
/// `async fn` keeps its arguments twice, as they came and as the locals they
/// are bound to, and the guard alone is 256 bytes.)
#[allow(clippy::manual_async_fn)] // on purpose, see above
fn serve_h1<'a, S>(
    mut guard: h1_guard::H1Guard<S>,
    ctx: &'a Arc<ConnCtx>,
    p: &'a Arc<DownstreamProtocol>,
    drain: &'a Drain,
    idle: Option<Duration>,
    max_age: Option<tokio::time::Instant>,
) -> impl Future<Output = ()> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        ctx.stats.downstream_cx_http1_total.inc();
        // A watcher that fired while the connection was parked.
        let mut fired = None;
        loop {
            let serving = Box::pin(h1_serving(guard, ctx, p, drain, (idle, max_age), fired));
            guard = match serving.await {
                H1Step::Done => return,
                H1Step::Parked(g) => g,
            };
            // The codec's buffers and the serving phase are freed.
            crate::heap::released();
            fired = match Box::pin(h1_parked(&mut guard, ctx, drain, idle, max_age)).await {
                Ok(fired) => fired,
                Err(()) => return,
            };
        }
    }
}

/// Waits, parked, for the client's next bytes (`Ok(None)`; a close too:
/// the next codec sees it) or for a watcher (`Ok(Some(_))`); `Err`: the
/// connection failed. Reads go through a stack buffer: no codec, no buffer.
#[allow(clippy::manual_async_fn)] // the arguments kept once, as serve_h1
fn h1_parked<'a, S>(
    guard: &'a mut h1_guard::H1Guard<S>,
    ctx: &'a ConnCtx,
    drain: &'a Drain,
    idle: Option<Duration>,
    max_age: Option<tokio::time::Instant>,
) -> impl Future<Output = Result<Option<Watch>, ()>> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let _parked = ctx.stats.downstream_cx_http1_parked.inc();
        // Without a codec beside them, the watchers are polled directly.
        let watch = watch_lifetime(ctx, drain, max_age, idle, std::future::pending);
        tokio::pin!(watch);
        tokio::select! {
            r = std::future::poll_fn(|cx| guard.poll_released(cx)) => r.map(|_| None).map_err(|_| ()),
            w = watch.as_mut() => Ok(Some(w)),
        }
    }
}

/// hyper's HTTP/1 codec on the guard until the connection ends, is
/// drained (a watcher fired: now, or while it was parked, `fired`), or is
/// idle between requests: then it is taken apart and the guard handed
/// back, unshut.
#[allow(clippy::manual_async_fn)] // the arguments kept once, as serve_h1
fn h1_serving<'a, S>(
    guard: h1_guard::H1Guard<S>,
    ctx: &'a Arc<ConnCtx>,
    p: &'a Arc<DownstreamProtocol>,
    drain: &'a Drain,
    (idle, max_age): (Option<Duration>, Option<tokio::time::Instant>),
    fired: Option<Watch>,
) -> impl Future<Output = H1Step<S>> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let deadline = ctx.rt.drain_timeout;
        // Each state's locals live in a block of their own, so the future's
        // room is that of its largest state, not of all of them.
        let (mut conn, w) = 'serve: {
            let mut conn = Box::pin(h1_codec(guard, ctx, p));
            if let Some(w) = fired {
                break 'serve (conn, w);
            }
            // Polled only when one of them was woken, not on each of the codec's
            // wake-ups (`on_wake`).
            // (A drain a response asks for is hyper's `Connection: close`.)
            let watch = on_wake::OnWake::new(watch_lifetime(
                ctx,
                drain,
                max_age,
                idle,
                std::future::pending,
            ));
            tokio::pin!(watch);
            {
                let park = on_wake::OnWake::new(park_when_idle(ctx));
                tokio::pin!(park);
                tokio::select! {
                    _ = conn.as_mut() => return H1Step::Done,
                    w = watch.as_mut() => break 'serve (conn, w),
                    () = park.as_mut() => {}
                }
            }
            // hyper is between requests: ended now it writes nothing more,
            // flushes, and hands the socket back unshut.
            ctx.h1.set_parking(true);
            conn.as_mut().graceful_shutdown();
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                w = watch.as_mut() => {
                    ctx.h1.set_parking(false);
                    break 'serve (conn, w);
                }
            };
            if ended.is_err() {
                return H1Step::Done;
            }
            // Taken apart at once: the rest of hyper's parts (the service)
            // is not kept beside the parked guard.
            let Some((io, unparsed)) = Pin::into_inner(conn)
                .into_parts()
                .map(|parts| (parts.io, parts.read_buf))
            else {
                return H1Step::Done;
            };
            let mut guard = io.into_inner();
            guard.park(unparsed);
            return H1Step::Parked(guard);
        };
        // How long a draining connection may stay idle before it is closed.
        let grace = match w {
            Watch::Drain | Watch::DrainAsked => deadline,
            Watch::MaxAge => {
                ctx.stats.downstream_cx_max_duration_reached.inc();
                p.drain_timeout
            }
            Watch::Idle => {
                // As Envoy: an idle timeout starts the connection manager's
                // drain, which for HTTP/1 closes `drain_timeout` later (a
                // request in between is answered with `Connection: close`).
                ctx.stats.downstream_cx_idle_timeout.inc();
                p.drain_timeout
            }
        };
        ctx.closing
            .store(true, std::sync::atomic::Ordering::Release);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = async {
                tokio::select! {
                    _ = tokio::time::sleep(grace) => {}
                    _ = drain.closing() => {}
                }
            } => {
                conn.as_mut().graceful_shutdown();
                if tokio::time::timeout(deadline, conn).await.is_err() {
                    ctx.stats.downstream_cx_drain_close.inc();
                }
            }
        }
        H1Step::Done
    }
}

/// A keep-alive connection with no request for this long is parked: its
/// HTTP/1 codec and the codec's buffers (16 KiB) are given back until the
/// client sends again. Long enough that a busy connection never parks (its
/// timer fires once per period), short enough that idle ones soon hold
/// only their socket and guard.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Resolves once the connection has carried no request for [`PARK_AFTER`]
/// and hyper waits for the next one.
async fn park_when_idle(ctx: &ConnCtx) {
    loop {
        // Waits at least the period each time: a head or body on its way
        // is looked at again a period later.
        ctx.life.idle_for(Some(PARK_AFTER)).await;
        if ctx.h1.between_requests() {
            return;
        }
    }
}

/// The connection manager as hyper's HTTP/1 service.
///
/// hyper's HTTP/1 dispatcher boxes room for one service future when the
/// connection starts and keeps it for the connection's life; boxed here,
/// that room is a pointer, and a request's state (several KiB) is
/// allocated only while the request is in flight.
struct H1Service(Arc<ConnCtx>);

type HandleFuture =
    Pin<Box<dyn Future<Output = Result<Response<Downstream>, edge::StreamReset>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for H1Service {
    type Response = Response<Downstream>;
    type Error = edge::StreamReset;
    type Future = HandleFuture;

    fn call(&self, req: Request<Incoming>) -> HandleFuture {
        Box::pin(handle(self.0.clone(), req))
    }
}

/// hyper's HTTP/1 server on the guarded connection.
fn h1_codec<S>(
    guard: h1_guard::H1Guard<S>,
    ctx: &Arc<ConnCtx>,
    p: &DownstreamProtocol,
) -> hyper::server::conn::http1::UpgradeableConnection<TokioIo<h1_guard::H1Guard<S>>, H1Service>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = H1Service(ctx.clone());
    let head_limit = p.max_request_headers_bytes as usize;
    let mut builder = http1::Builder::new();
    header_case_server(&mut builder, p.http1.header_case);
    builder
        // The guard enforces the head limits; hyper's are set to the same
        // values so that it never refuses what the guard passed.
        .max_headers(p.max_headers_count as usize)
        .max_header_size(head_limit)
        .max_buf_size((head_limit + 8192).max(HYPER_MAX_BUF))
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(guard), svc)
        .with_upgrades()
}

/// `header_key_format` on an HTTP/1 codec builder (hyper's server and client
/// builders have the same setters): lower case unless told otherwise, as
/// Envoy writes header names. Keeping the original case costs a map of the
/// names per message, so it is only kept when asked for.
macro_rules! apply_header_case {
    ($builder:expr, $case:expr) => {
        match $case {
            ferry_model::http_protocol::HeaderCase::Lower => {}
            ferry_model::http_protocol::HeaderCase::Preserve => {
                $builder.preserve_header_case(true);
            }
            ferry_model::http_protocol::HeaderCase::ProperCase => {
                $builder.title_case_headers(true);
            }
        }
    };
}

/// `header_key_format` on a connection manager.
fn header_case_server(b: &mut http1::Builder, case: ferry_model::http_protocol::HeaderCase) {
    apply_header_case!(b, case);
}

/// `header_key_format` on a cluster's HTTP/1 connections.
pub(crate) fn header_case(
    b: &mut hyper::client::conn::http1::Builder,
    case: ferry_model::http_protocol::HeaderCase,
) {
    apply_header_case!(b, case);
}

/// hyper's default HTTP/1 buffer bound (~400 KiB).
const HYPER_MAX_BUF: usize = 8192 + 4096 * 100;

/// `max_connection_duration` extended by a random share of up to `jitter`
/// hundredths of a percent.
fn jittered(d: Duration, jitter: u32) -> Duration {
    if jitter == 0 {
        return d;
    }
    let share = f64::from(jitter) / 10_000.0 * rand::random::<f64>();
    d + d.mul_f64(share)
}

/// A locally generated response and the reason for it.
struct LocalReply {
    status: StatusCode,
    body: Option<String>,
}

/// Marks a response Ferry generated itself (Envoy's local reply) with its
/// body text, so that a gRPC request gets it in gRPC's shape; `grpc_status`
/// overrides the status derived from the HTTP one.
#[derive(Debug, Clone)]
pub(crate) struct LocalBody {
    pub text: Option<String>,
    pub grpc_status: Option<u32>,
}

fn local_reply(r: LocalReply) -> Response<ResponseBody> {
    let marker = LocalBody {
        text: r.body.clone(),
        grpc_status: None,
    };
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
    resp.extensions_mut().insert(marker);
    resp
}

/// A local reply to a gRPC request, as Envoy sends it: a trailers-only
/// answer (HTTP 200, `application/grpc`) whose `grpc-status` comes from the
/// HTTP status and whose `grpc-message` is the body, percent-encoded.
fn grpc_local_reply(resp: &mut Response<ResponseBody>, local: LocalBody) {
    let LocalBody { text, grpc_status } = local;
    let code = grpc_status.unwrap_or(match resp.status().as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    });
    *resp.status_mut() = StatusCode::OK;
    *resp.body_mut() = body::empty();
    let h = resp.headers_mut();
    h.remove(http::header::CONTENT_LENGTH);
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Some(t) = text.filter(|t| !t.is_empty())
        && let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&t))
    {
        h.insert("grpc-message", v);
    }
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%` stays.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

/// The response body as it goes downstream: metered for Istio's metrics,
/// tracked as its stream's end.
type Downstream = lifetime::Tracked<
    crate::metrics::Metered<observe::ObservedBody<compressor::CompressBody<ResponseBody>>>,
>;

async fn handle(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
) -> Result<Response<Downstream>, edge::StreamReset> {
    let start = Instant::now();
    let stream_start = tokio::time::Instant::now();
    let stats = &ctx.stats;
    stats.downstream_rq_total.inc();
    let _active = stats.downstream_rq_active.inc();
    let (stream, served) = ctx
        .life
        .stream_started(stats.downstream_rq_rx_reset.clone());
    let version = req.version();
    if version == Version::HTTP_2 {
        stats.downstream_rq_http2_total.inc();
    } else {
        stats.downstream_rq_http1_total.inc();
    }
    // The edge decides first: nothing below sees a refused request.
    let mut upgrade = false;
    // The chain the request runs on (an update may have replaced the
    // connection's).
    let chain = ctx.live.chain();
    let admitted = match hcm_of(&chain) {
        Some(hcm) => edge::admit(&ctx, hcm, &mut req),
        None => Ok(edge::Admitted::default()),
    };
    let refused = match admitted {
        Ok(a) => {
            if a.upgrade {
                upgrade = true;
            }
            None
        }
        Err(edge::Refused::Reset) => {
            stream.end();
            return Err(edge::StreamReset);
        }
        Err(edge::Refused::Reply { status, body }) => Some((status, body)),
    };
    if let Some(max) = hcm_of(&chain).and_then(|h| h.protocol.max_requests_per_connection)
        && served >= max
    {
        if served == max {
            stats.downstream_cx_max_requests_reached.inc();
        }
        ctx.close_after_response();
    }
    // A drain sequence (`drain_listeners?graceful`) under way: this
    // response may close its connection, as Envoy's connection manager asks
    // its drain decision for each response.
    if !ctx.closing.load(std::sync::atomic::Ordering::Acquire) && ctx.live.drain.drain_close() {
        stats.downstream_cx_drain_close.inc();
        ctx.close_after_response();
    }
    let method = req.method().clone();
    let grpc = ferry_model::route::is_grpc(req.headers());
    // Before anything reads the path (routing, every filter, the upstream
    // request), as Envoy's connection manager does.
    let normalized = match refused {
        None => normalize_path(&ctx, &mut req, grpc),
        Some(_) => Normalized::Path(None),
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let host = authority(&req);
    let started = std::time::SystemTime::now();
    let mut obs = observe::Observer::start(&ctx, &req, start, started);
    // Istio's metadata exchange: the client's sidecar announces itself on
    // the request, the server's on the response; each side takes the
    // other's headers off before they reach the application.
    let mut exchanged = None;
    let mut request_bytes = 0;
    if let Some(m) = &ctx.istio {
        request_bytes = content_length(req.headers());
        match m.cfg.reporter {
            ferry_model::Reporter::Destination => {
                exchanged = crate::metrics::take_peer(req.headers_mut())
            }
            ferry_model::Reporter::Source => m.metrics.local.announce(req.headers_mut()),
        }
    }
    let mut cluster = String::new();
    let mut metered = None;
    // A local reply that ends the connection (the request was not read whole).
    let mut close = refused.is_some();
    let (original_path, (mut resp, flag, upstream)) = match (refused, normalized) {
        (Some((status, body)), _) => {
            let r = LocalReply {
                status,
                body: Some(body.into()),
            };
            (None, (local_reply(r), "DPE", None))
        }
        (None, Normalized::Answered(resp)) => (None, (resp, "", None)),
        (None, Normalized::Path(original)) => {
            let timeouts =
                hcm_of(&chain).map_or((None, None), |h| (h.request_timeout, h.stream_idle_timeout));
            let progress = stream_timers::RequestProgress::new();
            if http_body::Body::is_end_stream(req.body()) {
                progress.ended();
            }
            // Boxed: the routing state (several KiB) is then allocated once,
            // not moved through the scope and the `select!` below, nor held
            // in this future, which hyper boxes and moves per request too.
            let routing = stream_timers::PROGRESS.scope(
                progress.clone(),
                Box::pin(route_request(
                    &ctx,
                    req,
                    &host,
                    &path,
                    started,
                    &mut cluster,
                    &mut obs,
                )),
            );
            let arrival = stream_timers::arrival(&progress, stream_start, timeouts.0, timeouts.1);
            let routed = tokio::select! {
                routed = routing => routed,
                expired = arrival => {
                    close = true;
                    let (body, flag) = match expired {
                        stream_timers::Expired::Request => {
                            stats.downstream_rq_timeout.inc();
                            ("request timeout", "-")
                        }
                        stream_timers::Expired::Idle => {
                            stats.downstream_rq_idle_timeout.inc();
                            ("stream timeout", "SI")
                        }
                    };
                    let r = LocalReply {
                        status: StatusCode::REQUEST_TIMEOUT,
                        body: Some(body.into()),
                    };
                    (local_reply(r), flag, None)
                }
            };
            (original, routed)
        }
    };
    if upgrade {
        // The HTTP/1 guard holds what follows an upgrade request until now.
        let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (method == http::Method::CONNECT && resp.status().is_success());
        ctx.h1.upgrade_done(upgraded);
    }
    if ctx.h1.take_body_error() && resp.extensions().get::<LocalBody>().is_some() {
        // The request body's framing broke while it was forwarded (a bad
        // chunk): the client's error, answered as Envoy answers it.
        ctx.stats.downstream_cx_protocol_error.inc();
        close = true;
        resp = local_reply(LocalReply {
            status: StatusCode::BAD_REQUEST,
            body: Some("Bad Request".into()),
        });
    }
    if let Some(hcm) = hcm_of(&chain) {
        hcm.server_header.apply(resp.headers_mut());
    }
    // The compressors the request passed, in Envoy's encode order.
    let compressing = match (
        resp.extensions_mut().remove::<compressor::Plan>(),
        hcm_of(&chain),
    ) {
        // A tunnel (an upgrade or CONNECT) carries bytes, not a body to encode.
        (Some(plan), Some(hcm))
            if !plan.is_empty() && !upgrade && method != http::Method::CONNECT =>
        {
            let status = resp.status().as_u16();
            let end = http_body::Body::is_end_stream(resp.body());
            compressor::encode(&ctx.rt.stats, hcm, &plan, status, resp.headers_mut(), end)
        }
        _ => None,
    };
    obs.response(&mut resp, flag, upstream.clone(), grpc);
    if let Some(local) = resp.extensions_mut().remove::<LocalBody>()
        && grpc
    {
        grpc_local_reply(&mut resp, local);
    }
    stats.status(resp.status().as_u16());
    if let Some(m) = &ctx.istio {
        match m.cfg.reporter {
            ferry_model::Reporter::Source => {
                exchanged = crate::metrics::take_peer(resp.headers_mut())
            }
            ferry_model::Reporter::Destination => m.metrics.local.announce(resp.headers_mut()),
        }
        // The service: the cluster's name (outbound), the cluster's
        // `istio.services` metadata (inbound), else the Host header.
        let snapshot;
        let service = match crate::metrics::service_of_cluster(&cluster) {
            Some(s) => s,
            None => {
                snapshot = ctx.rt.snapshot.load();
                match snapshot
                    .cluster(&cluster)
                    .and_then(|c| c.istio_service.as_deref())
                {
                    Some(s) => s,
                    None if m.cfg.disable_host_header_fallback => "",
                    None => crate::metrics::host_without_port(&host),
                }
            }
        };
        let set = m.label_set(
            service,
            exchanged.as_ref(),
            if grpc { "grpc" } else { "http" },
        );
        let grpc_status = grpc
            .then(|| resp.headers().get("grpc-status"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        // Reported when the body is done: the duration runs to the last
        // byte, and the size is what was sent.
        metered = Some(crate::metrics::Pending::new(
            m.metrics.clone(),
            set,
            crate::metrics::RequestOutcome {
                status: resp.status().as_u16(),
                grpc_status,
                flags: flag,
                duration: std::time::Duration::ZERO,
                request_bytes,
                response_bytes: 0,
            },
            start,
            grpc,
        ));
    }
    // Answer in the client's HTTP version (an HTTP/1.0 client gets HTTP/1.0).
    *resp.version_mut() = version;
    if version != Version::HTTP_2
        && (close || ctx.closing.load(std::sync::atomic::Ordering::Acquire))
    {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if ctx.rt.access_log {
        tracing::info!(
            target: "access",
            method = %method,
            path = %path,
            // The path as the client sent it, when normalization changed it.
            path.original = original_path.as_deref().unwrap_or("-"),
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
    Ok(resp.map(|b| {
        lifetime::Tracked::new(
            crate::metrics::Metered::new(
                obs.body(compressor::CompressBody::new(b, compressing)),
                metered,
            ),
            stream,
        )
    }))
}

type Routed = (
    Response<ResponseBody>,
    &'static str,
    Option<ferry_model::cluster::HostAddr>,
);

/// A request after the connection manager's path normalization.
enum Normalized {
    /// Go on: the path the client sent when normalization changed it.
    Path(Option<String>),
    /// Answered here (400 or 307), as Envoy does before any filter.
    Answered(Response<ResponseBody>),
}

/// Whether an HTTP/1 request target is one Envoy's codec takes: a path
/// (`/…`), `*` for `OPTIONS`, an absolute URL, or CONNECT's authority.
/// Anything else (`GET admin`, `GET *`) is a 400 that closes the
/// connection there, where hyper would read an authority and route `/`.
fn is_http1_request_target(method: &http::Method, uri: &Uri) -> bool {
    if method == http::Method::CONNECT || uri.scheme().is_some() {
        return true;
    }
    match uri.path_and_query().map(|p| p.as_str()) {
        Some("*") => method == http::Method::OPTIONS,
        Some(p) => p.starts_with('/') && uri.authority().is_none(),
        None => false,
    }
}

/// Applies the connection manager's `normalize_path`, `merge_slashes` and
/// `path_with_escaped_slashes_action` to the request's URI, in place
/// (`ferry_filters::http::path_normalization` decides).
fn normalize_path(ctx: &ConnCtx, req: &mut Request<Incoming>, grpc: bool) -> Normalized {
    use ferry_filters::http::path_normalization::{self as pn, Verdict};
    let http1 = req.version() != Version::HTTP_2;
    // An HTTP/2 `:path` with a fragment while the runtime rejects them.
    if req.extensions().get::<h2_guard::PathFragment>().is_some() {
        tracing::debug!(path = %req.uri(), "HTTP/2 :path with a fragment refused");
        return Normalized::Answered(local_reply(LocalReply {
            status: StatusCode::BAD_REQUEST,
            body: None,
        }));
    }
    if http1 && !is_http1_request_target(req.method(), req.uri()) {
        let mut resp = local_reply(LocalReply {
            status: StatusCode::BAD_REQUEST,
            body: None,
        });
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        return Normalized::Answered(resp);
    }
    // The chain the request runs on (a draining connection's requests
    // follow the new one).
    let chain = ctx.live.chain();
    let (ChainKind::Http(hcm), Some(pq)) = (&chain.kind, req.uri().path_and_query()) else {
        return Normalized::Path(None);
    };
    let original = pq.as_str();
    let reject = |why: &dyn std::fmt::Display| {
        ctx.stats.downstream_rq_failed_path_normalization.inc();
        tracing::debug!(path = %original, reason = %why, "path normalization failed");
        let mut resp = local_reply(LocalReply {
            status: StatusCode::BAD_REQUEST,
            body: None,
        });
        // Envoy closes an HTTP/1 connection after this answer.
        if http1 {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        Normalized::Answered(resp)
    };
    let path = match pn::normalize(&hcm.path_normalization, original) {
        Verdict::Forward(std::borrow::Cow::Borrowed(_)) => return Normalized::Path(None),
        Verdict::Forward(std::borrow::Cow::Owned(p)) => p,
        Verdict::Reject(why) => return reject(&why),
        // A gRPC client cannot follow a redirect: Envoy answers 400.
        Verdict::Redirect(_) if grpc => return reject(&"redirect for a gRPC request"),
        Verdict::Redirect(location) => {
            ctx.stats
                .downstream_rq_redirected_with_normalized_path
                .inc();
            let mut resp = local_reply(LocalReply {
                status: StatusCode::TEMPORARY_REDIRECT,
                body: None,
            });
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    resp.headers_mut().insert(LOCATION, v);
                }
                Err(_) => return reject(&"redirect location is not a header value"),
            }
            return Normalized::Answered(resp);
        }
    };
    let mut parts = req.uri().clone().into_parts();
    let original = original.to_string();
    match path.parse::<http::uri::PathAndQuery>() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return reject(&"normalized path is not a URI path"),
    }
    match Uri::from_parts(parts) {
        Ok(uri) => {
            *req.uri_mut() = uri;
            Normalized::Path(Some(original))
        }
        Err(_) => reject(&"normalized path is not a URI path"),
    }
}

/// A message's declared body size (0 when streamed without a length).
fn content_length(h: &http::HeaderMap) -> u64 {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn route_request(
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
    host: &str,
    path: &str,
    started: std::time::SystemTime,
    picked: &mut String,
    obs: &mut observe::Observer,
) -> Routed {
    // The chain the request runs on: the connection's, or the one an update
    // handed its requests to.
    let chain = ctx.live.chain();
    let ChainKind::Http(hcm) = &chain.kind else {
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
    // Who the client is, and what it may ask of the router, is settled before
    // routing and before any filter sees the request, as in Envoy.
    let client = match client::apply(ctx, hcm, routes.as_deref(), &mut req) {
        Ok(c) => c,
        Err(status) => {
            let r = LocalReply {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
                body: None,
            };
            return (local_reply(r), "", None);
        }
    };
    request_id::apply(hcm, &mut req);
    obs.request(&req);
    let pseudo = ferry_model::Pseudo {
        method: req.method().as_str(),
        path,
        authority: host,
        scheme: "http",
    };
    // `require_tls`: Envoy's SSL redirect route stands in for the routes.
    let connection_scheme = if ctx.tls.is_some() { "https" } else { "http" };
    let https_redirect = routes
        .as_ref()
        .is_some_and(|rc| rc.requires_https(host, req.headers(), connection_scheme));
    let route = if https_redirect {
        None
    } else {
        routes
            .as_ref()
            .and_then(|rc| rc.find_route_for(&pseudo, req.headers(), rand::random()))
    };
    if let Some(r) = route {
        obs.route(r);
    }
    obs.trace(ctx, route, &mut req);
    // `upgrade_configs`: an upgrade type neither the route nor (when the
    // route says nothing of it) the connection manager allows is refused
    // before any filter runs, as Envoy's connection manager does.
    // A CONNECT is an upgrade of type CONNECT, as Envoy's connection
    // manager sees it.
    let is_connect = req.method() == http::Method::CONNECT;
    if is_connect || headers::is_upgrade(req.headers()) {
        let kind = if is_connect {
            "connect"
        } else {
            req.headers()
                .get(http::header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let by_hcm = hcm.allows_upgrade(kind);
        if !route.map_or(by_hcm, |r| r.allows_upgrade(kind, by_hcm)) {
            let r = LocalReply {
                status: StatusCode::FORBIDDEN,
                body: None,
            };
            return (local_reply(r), "", None);
        }
    }
    let fctx = FormatContext {
        downstream_remote: Some(client.remote),
        downstream_local: Some(ctx.original_dst),
        downstream_local_internal: ctx.local_internal.as_ref(),
        upstream_remote: None,
        protocol: protocol_name(req.version()),
        hostname: hostname(),
        start_time: started,
    };
    // Weighted clusters are picked once, before the filters, so the fault
    // filter's `upstream_cluster` sees the cluster the router will use, and
    // the filters the picked cluster's overrides.
    let mut chosen = Chosen::of(route, req.headers());
    obs.route_cluster(ctx, &chosen.cluster);
    // The HTTP filters before the router run whether a route matched or not
    // (a request without a route still takes a rate limit token, as in
    // Envoy); the router then answers 404. A filter may have the route
    // chosen again (`clear_route_cache`), except over an https redirect.
    let again = Reroute {
        routes: routes.as_deref().filter(|_| !https_redirect),
        host,
        path,
    };
    let filtered = run_filters(ctx, hcm, &again, &mut chosen, &mut req, &fctx).await;
    obs.after_filters(&req);
    let Chosen {
        route,
        entry,
        cluster: name,
    } = chosen;
    *picked = name;
    let cluster: &str = picked;
    // A filter may have had the route chosen again.
    if let Some(r) = route {
        obs.route(r);
    }
    obs.route_cluster(ctx, cluster);
    let (delayed, on_response) = match filtered {
        Ok(passed) => passed,
        Err((mut resp, flag, upstream)) => {
            // A filter's own answer carries the route's response headers (and the
            // picked cluster's), as Envoy's local replies do once a route is chosen.
            if let Some(route) = route {
                if let Some(e) = entry {
                    e.response_headers
                        .apply(resp.headers_mut(), &fctx, Some(req.headers()));
                }
                route
                    .response_headers
                    .apply(resp.headers_mut(), &fctx, Some(req.headers()));
            }
            return (resp, flag, upstream);
        }
    };
    if https_redirect {
        // Envoy's SSL redirector: the same host and path, over https.
        let mut resp = local_reply(LocalReply {
            status: StatusCode::MOVED_PERMANENTLY,
            body: None,
        });
        if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{path}")) {
            resp.headers_mut().insert(LOCATION, v);
        }
        on_response.attach(&mut resp);
        return (resp, "", None);
    }
    let Some(route) = route else {
        ctx.stats.no_route.inc();
        let mut resp = local_reply(LocalReply {
            status: StatusCode::NOT_FOUND,
            body: None,
        });
        on_response.attach(&mut resp);
        return (resp, "NR", None);
    };
    let (mut resp, flag, upstream) = match &route.action {
        RouteAction::DirectResponse { status, body } => {
            let r = LocalReply {
                status: *status,
                body: body.clone(),
            };
            (local_reply(r), if delayed { "DI" } else { "" }, None)
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
        RouteAction::Route { .. } => {
            // The route's response headers read the request as it arrived.
            let entry_response = entry.map(|e| &e.response_headers);
            let request_headers = (!route.response_headers.is_empty()
                || entry_response.is_some_and(|h| !h.is_empty()))
            .then(|| req.headers().clone());
            let routed = forward(
                ctx, hcm, route, entry, cluster, delayed, req, host, &fctx, obs,
            )
            .await;
            let (mut resp, flag, upstream) = routed;
            let fctx = FormatContext {
                upstream_remote: upstream.as_ref().and_then(|h| h.ip()),
                ..fctx
            };
            if let Some(rh) = &request_headers {
                // The picked cluster's mutations first, then the route's.
                if let Some(h) = entry_response {
                    h.apply(resp.headers_mut(), &fctx, Some(rh));
                }
                route
                    .response_headers
                    .apply(resp.headers_mut(), &fctx, Some(rh));
            }
            on_response.attach(&mut resp);
            return (resp, flag, upstream);
        }
    };
    if !route.response_headers.is_empty() {
        route
            .response_headers
            .apply(resp.headers_mut(), &fctx, Some(req.headers()));
    }
    on_response.attach(&mut resp);
    (resp, flag, upstream)
}

/// Runs the HTTP filters before the router, in configuration order: `Ok`
/// with whether a delay was injected and what the passed filters add to the
/// response, or `Err` with a filter's own answer, which goes back through
/// the filters before it (CORS headers on a rate-limited answer, as in
/// Envoy).
async fn run_filters<'r>(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    again: &Reroute<'r, '_>,
    chosen: &mut Chosen<'r>,
    req: &mut Request<Incoming>,
    fctx: &FormatContext<'_>,
) -> Result<(bool, filters::ResponseHooks), Routed> {
    let mut delayed = false;
    let mut on_response = filters::ResponseHooks::default();
    // The request's own dynamic metadata, once a filter adds to the
    // connection's.
    let mut request_metadata = None;
    for f in &hcm.http_filters {
        let per_route = filters::PerRoute {
            route: chosen.route,
            entry: chosen.entry,
        };
        let (route, cluster) = (chosen.route, chosen.cluster.as_str());
        match &f.config {
            HttpFilterConfig::Fault(cfg) => {
                let cfg = per_route.fault(&f.name).unwrap_or(cfg);
                let pseudo = pseudo_of(req);
                let applied = fault::apply(ctx, hcm, cfg, req.headers(), &pseudo, cluster).await;
                let (mut resp, flag) = match applied {
                    fault::Applied::None => continue,
                    fault::Applied::Delayed => {
                        delayed = true;
                        continue;
                    }
                    fault::Applied::Aborted(resp) => (resp, if delayed { "DI,FI" } else { "FI" }),
                    fault::Applied::DelayedAborted(resp) => (resp, "DI,FI"),
                };
                on_response.attach(&mut resp);
                return Err((resp, flag, None));
            }
            HttpFilterConfig::Cors => {
                // Without a route there is no policy: nothing to do.
                let policies = per_route.cors(&f.name);
                if let Some(mut resp) = filters::cors(ctx, hcm, &policies, req, &mut on_response) {
                    // Back through the filters before it (none of its own
                    // simple-request headers are pending).
                    on_response.attach(&mut resp);
                    return Err((resp, "", None));
                }
            }
            HttpFilterConfig::LocalRateLimit(cfg) => {
                let cfg = per_route.ratelimit(&f.name).unwrap_or(cfg);
                if let Some(mut resp) =
                    filters::local_ratelimit(ctx, cfg, route, cluster, req, fctx, &mut on_response)
                {
                    on_response.attach(&mut resp);
                    return Err((resp, "RL", None));
                }
            }
            HttpFilterConfig::Rbac(cfg) => {
                if let Some(mut resp) = filters::rbac(
                    ctx,
                    hcm,
                    cfg,
                    per_route,
                    &f.name,
                    req,
                    request_metadata.as_ref(),
                ) {
                    on_response.attach(&mut resp);
                    return Err((resp, "", None));
                }
            }
            // Reported once the response is known (`handle`).
            HttpFilterConfig::IstioStats(_) => {}
            HttpFilterConfig::ExtAuthz(cfg) => {
                // Boxed: the check's state (~11 KiB) would otherwise be room
                // in every request's future, moved with it on each await.
                let checked = Box::pin(ext_authz::run(
                    ctx,
                    hcm,
                    cfg,
                    per_route,
                    &f.name,
                    cluster,
                    req,
                    request_metadata.take(),
                    fctx,
                    &mut on_response,
                ))
                .await;
                match checked {
                    Ok(passed) => {
                        request_metadata = passed.metadata;
                        if passed.reroute {
                            again.choose(chosen, req);
                        }
                    }
                    Err(resp) => {
                        let mut resp = *resp;
                        on_response.apply(resp.headers_mut());
                        return Err((resp, "UAEX", None));
                    }
                }
            }
            HttpFilterConfig::Compressor(cfg) => {
                if !per_route.compressor_disabled(&f.name) {
                    on_response.compressors.decode(cfg, req);
                }
            }
            HttpFilterConfig::SetFilterState(cfg) => connect::set_filter_state(ctx, cfg, req, fctx),
            HttpFilterConfig::JwtAuthn(cfg) => {
                match filters::jwt_authn(
                    ctx,
                    hcm,
                    cfg,
                    per_route,
                    &f.name,
                    req,
                    request_metadata.take(),
                ) {
                    Ok(passed) => {
                        request_metadata = passed.metadata;
                        if passed.reroute {
                            again.choose(chosen, req);
                        }
                    }
                    Err(resp) => {
                        let mut resp = *resp;
                        on_response.attach(&mut resp);
                        return Err((resp, "", None));
                    }
                }
            }
        }
    }
    Ok((delayed, on_response))
}

/// The route a request runs on, its picked weighted cluster and the name
/// of the cluster it goes to.
struct Chosen<'r> {
    route: Option<&'r Route>,
    entry: Option<&'r WeightedCluster>,
    cluster: String,
}

impl<'r> Chosen<'r> {
    /// Weighted clusters are picked once, with the route.
    fn of(route: Option<&'r Route>, headers: &http::HeaderMap) -> Self {
        let (cluster, entry) = match route.map(|r| &r.action) {
            Some(RouteAction::Route { cluster, .. }) => cluster.pick_entry(rand::random(), headers),
            _ => (String::new(), None),
        };
        Chosen {
            route,
            entry,
            cluster,
        }
    }
}

/// What choosing the route again needs: the route table (`None`: the
/// route stands) and the host and path it was chosen by.
struct Reroute<'r, 'a> {
    routes: Option<&'r ferry_model::RouteConfig>,
    host: &'a str,
    path: &'a str,
}

impl<'r> Reroute<'r, '_> {
    /// Chooses the route again for the request as it is now (Envoy's
    /// cleared route cache); the same route keeps its picked cluster.
    fn choose(&self, chosen: &mut Chosen<'r>, req: &Request<Incoming>) {
        let Some(rc) = self.routes else { return };
        let pseudo = ferry_model::Pseudo {
            method: req.method().as_str(),
            path: self.path,
            authority: self.host,
            scheme: "http",
        };
        let route = rc.find_route_for(&pseudo, req.headers(), rand::random());
        let same = match (route, chosen.route) {
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            *chosen = Chosen::of(route, req.headers());
        }
    }
}

/// The pseudo-headers of a request, for the matchers that read them.
pub(crate) fn pseudo_of(req: &Request<Incoming>) -> ferry_model::Pseudo<'_> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or_default();
    ferry_model::Pseudo {
        method: req.method().as_str(),
        path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
        authority,
        scheme: "http",
    }
}

/// `%PROTOCOL%`.
fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// `%HOSTNAME%`: the machine's host name, read once.
pub(crate) fn hostname() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_default()
    })
}

#[allow(clippy::too_many_arguments)] // the request's whole context, once
async fn forward(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    route: &Route,
    entry: Option<&WeightedCluster>,
    name: &str,
    delayed: bool,
    mut req: Request<Incoming>,
    host: &str,
    fctx: &FormatContext<'_>,
    obs: &mut observe::Observer,
) -> Routed {
    let RouteAction::Route {
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        timeout,
        retry_policy,
        mirrors,
        idle_timeout,
        max_stream_duration,
        attempt_count,
        cluster_not_found,
        append_x_forwarded_host,
        grpc_timeouts,
        ..
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
    let clusters = ctx.rt.clusters.load();
    let Some(crt) = clusters.get(name) else {
        let r = LocalReply {
            status: *cluster_not_found,
            body: None,
        };
        return (local_reply(r), "NC", None);
    };
    obs.cluster(name);
    let held = crt.clone();
    drop(clusters);
    let crt = &*held;
    crt.warmed().await;
    let lb_hash = crate::lb::request_hash(
        &route.hash_policy,
        req.headers(),
        req.uri(),
        ctx.peer,
        ctx.original_dst,
        req.extensions()
            .get::<ferry_model::filter_state::FilterState>()
            .or(ctx.filter_state.as_deref()),
    );
    let Some(pool) = crt.pick_hashed(Some(ctx.original_dst), lb_hash.hash) else {
        let r = LocalReply {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: Some("no healthy upstream".into()),
        };
        return (local_reply(r), "UH", None);
    };
    if connect::terminates(&req, route) {
        return connect::terminate(ctx, pool, req).await;
    }
    let upgrade = headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let downstream_version = req.version();
    let (mut parts, body) = req.into_parts();
    // What a filter read of the body before routing goes first.
    let prefix = parts.extensions.remove::<body::BufferedPrefix>();

    if !parts.headers.contains_key(HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        parts.headers.insert(HOST, v);
    }
    let scheme = if ctx.tls.is_some() { "https" } else { "http" };
    // The request id was settled by the connection manager (`request_id`).
    headers::prepare_request(&mut parts.headers, scheme, hcm.generate_request_id);
    // An internal client's `x-envoy-*` timeout and retry headers (the
    // connection manager removed any other's).
    let overrides = router::header_overrides(&mut parts.headers, retry_policy.as_deref());
    // A gRPC request's `grpc-timeout`, as the route reads it (the
    // `x-envoy-upstream-rq-timeout-ms` of an internal client still wins).
    let grpc = ferry_model::route::is_grpc(&parts.headers);
    let grpc_header = ferry_model::route::grpc_timeout(&parts.headers);
    let route_timeout = match grpc_timeouts.route_timeout {
        Some(g) if grpc => g.apply(grpc_header),
        _ => *timeout,
    };
    let max_stream_duration = &match grpc_timeouts.stream_duration {
        Some(g) if grpc && grpc_header.is_some() => g.apply(grpc_header),
        _ => *max_stream_duration,
    };
    let timeout = &overrides.timeout.unwrap_or(route_timeout);
    forward_client_cert(&mut parts.headers, hcm, ctx.tls.as_ref());
    // The picked cluster's mutations and Host first, then the route's.
    if let Some(e) = entry {
        e.request_headers.apply(&mut parts.headers, fctx, None);
    }
    route.request_headers.apply(&mut parts.headers, fctx, None);
    let original_path = parts.uri.path().to_string();
    let entry_host = entry.and_then(|e| e.host_rewrite.clone());
    let new_host = match host_rewrite {
        Some(HostRewrite::Literal(h)) => Some(h.clone()),
        Some(HostRewrite::Header(name)) => parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        Some(HostRewrite::PathRegex(r)) => Some(r.apply(&original_path)),
        Some(HostRewrite::Auto) => pool.hostname().map(|h| h.to_string()),
        Some(HostRewrite::Format(f)) => Some(f.render(fctx, &parts.headers)),
        None => None,
    }
    .filter(|h| !h.is_empty())
    .or(entry_host);
    if let Some(h) = new_host.filter(|h| !h.is_empty())
        && let Ok(v) = HeaderValue::from_str(&h)
    {
        // Envoy keeps the Host it replaced, whatever the kind of rewrite.
        if let Some(original) = parts.headers.insert(HOST, v) {
            if *append_x_forwarded_host {
                router::append_forwarded_host(&mut parts.headers, &original);
            }
            parts.headers.insert(ORIGINAL_HOST, original);
        }
    }
    let mut path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let before_rewrite = path.clone();
    let rewritten = if let (Some(repl), PathMatch::Prefix(matched)) =
        (prefix_rewrite, &route.route_match.path)
    {
        path = router::rewrite_prefix(&path, matched, repl);
        true
    } else if let Some(r) = regex_rewrite {
        let query = parts.uri.query();
        path = r.apply(&original_path);
        if let Some(q) = query {
            path.push('?');
            path.push_str(q);
        }
        true
    } else {
        false
    };
    // Envoy keeps the path a route rewrote (the normalized one: the
    // connection manager's normalization is no rewrite and keeps nothing),
    // unless the router suppresses its headers.
    if rewritten
        && !hcm.suppress_envoy_headers
        && let Ok(v) = HeaderValue::from_str(&before_rewrite)
    {
        parts.headers.insert(ORIGINAL_PATH, v);
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

    // Retries and mirrors need the body again: keep a bounded copy.
    let stream_start = tokio::time::Instant::now();
    // A route without an idle timeout of its own takes the connection
    // manager's `stream_idle_timeout`; zero disables it.
    let idle_timeout = &match idle_timeout {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(*d),
        None => hcm.stream_idle_timeout,
    };
    // Likewise `max_stream_duration`.
    let max_stream_duration = &max_stream_duration.or(hcm.protocol.max_stream_duration);
    let timed = timeout.is_some() || idle_timeout.is_some() || max_stream_duration.is_some();
    let end = timed.then(|| Arc::new(Notify::new()));
    let policy = overrides.retry.as_ref().or(retry_policy.as_deref());
    // `retriable_request_headers`: a request matching none is never retried.
    let policy = policy.filter(|p| {
        let pseudo = ferry_model::Pseudo {
            method: parts.method.as_str(),
            path: &path,
            authority: &upstream_authority,
            scheme,
        };
        p.request_retriable(&parts.headers, &pseudo)
    });
    let replay_limit = route
        .request_body_buffer_limit
        .or(ctx.chain.request_buffer_limit.map(u64::from))
        .map_or(body::REPLAY_LIMIT, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        });
    // When the request was received whole (`x-envoy-upstream-service-time`
    // counts from there), and its size for the access log.
    let received = Some(obs.body_count().unwrap_or_default());
    let (replay, mut first_body) = if !upgrade && (policy.is_some() || !mirrors.is_empty()) {
        (
            Some(Replay::new(body, prefix, end.clone(), replay_limit).counted(received.clone())),
            None,
        )
    } else {
        (None, Some((body, prefix)))
    };
    obs.upstream_request(&parts, &path);
    if let Some(r) = &replay {
        for m in mirrors {
            if m.fraction.hits(rand::random()) {
                shadow::spawn(
                    ctx,
                    m,
                    &parts,
                    &upstream_authority,
                    &path,
                    r.watcher(),
                    timeout.unwrap_or(DEFAULT_SHADOW_TIMEOUT),
                );
            }
        }
    }

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

    let deadline = std::sync::OnceLock::new();
    let global = request_timers(
        end.as_deref(),
        RouteTimers {
            start: stream_start,
            timeout: *timeout,
            idle: *idle_timeout,
            max_duration: *max_stream_duration,
        },
        &deadline,
    );
    tokio::pin!(global);

    let max_retries = policy.map_or(0, |p| p.num_retries);
    let mut retries = 0u32;
    let mut retry_slot = None;
    let mut retry_overflow = false;
    let mut retry_limit_exceeded = false;
    // A per-try timeout as long as the route's is no per-try timeout.
    let per_try = overrides
        .per_try_timeout
        .or(policy.and_then(|p| p.per_try_timeout))
        .filter(|t| timeout.is_none_or(|g| *t < g));
    let mut tried: Vec<ferry_model::cluster::HostAddr> = Vec::new();
    let mut pool = pool;
    let mut parts = Some(parts);
    let (result, address) = loop {
        let body = match (&replay, first_body.take()) {
            (Some(r), _) => r.body(),
            (None, Some((b, prefix))) => {
                UpstreamBody::new(b, prefix, end.clone()).counted(received.clone())
            }
            (None, None) => UpstreamBody::empty(),
        };
        // The last possible attempt takes the head itself; earlier ones a copy.
        let last = replay.is_none() || retries >= max_retries;
        let upstream_req = match (&parts, last) {
            (Some(p), false) => copy_request(p, body),
            _ => match parts.take() {
                Some(p) => Request::from_parts(p, body),
                None => break (Attempt::Failed(None), pool.address.clone()),
            },
        };
        let mut upstream_req = upstream_req;
        // As Envoy's router: the first attempt announces the whole timeout,
        // a retry what is left of it.
        let elapsed = if retries == 0 {
            Duration::ZERO
        } else {
            stream_start.elapsed()
        };
        if !hcm.suppress_envoy_headers
            && let Some(ms) = router::expected_timeout(*timeout, per_try, elapsed)
        {
            upstream_req
                .headers_mut()
                .insert(EXPECTED_TIMEOUT, HeaderValue::from(ms));
        }
        if attempt_count.request {
            upstream_req
                .headers_mut()
                .insert(ATTEMPT_COUNT, HeaderValue::from(retries + 1));
        }
        // The filter state the request shares upstream goes with it to an
        // internal listener (the request's, which starts as the connection's).
        if matches!(pool.address, ferry_model::cluster::HostAddr::Internal(_))
            && let Some(shared) = upstream_req
                .extensions()
                .get::<ferry_model::filter_state::FilterState>()
                .or(parts.as_ref().and_then(|p| p.extensions.get()))
                .or(ctx.filter_state.as_deref())
                .and_then(ferry_model::filter_state::FilterState::for_upstream)
        {
            upstream_req
                .extensions_mut()
                .insert(crate::cluster::SharedFilterState(Arc::new(shared)));
        }
        obs.attempt(&mut upstream_req);
        crt.stats.upstream_rq_total().inc();
        let address = pool.address.clone();
        tried.push(address.clone());
        // The per-try timeout covers one attempt up to its response headers,
        // from the attempt's start (Envoy starts it once the request was sent
        // whole: the same for the buffered bodies that can be retried).
        let per_try_end = per_try.map(|t| tokio::time::Instant::now() + t);
        // One `select!` over the send itself: wrapping it in futures of its
        // own would hold it once per wrapper in the request's state, and
        // that state is moved on every `await` above this one. A response
        // that came wins over a timer; the route's timeout over the try's.
        let attempt = tokio::select! {
            biased;
            r = pool.send(use_h2, upstream_req) => Attempt::from(r),
            kind = &mut global => Attempt::GlobalTimeout(kind),
            () = sleep_until(per_try_end) => Attempt::PerTryTimeout,
        };
        obs.attempt_ended(&attempt, &address);
        // An upstream asking to be failed (an Envoy draining): a checked
        // host fails at once, as Envoy's router tells its health checker.
        if let Attempt::Response(r) = &attempt
            && r.headers()
                .contains_key(crate::health_check::IMMEDIATE_FAIL_HEADER)
        {
            pool.health.immediate_fail();
        }
        let outcome = match &attempt {
            Attempt::GlobalTimeout(_) | Attempt::Exhausted(_) => break (attempt, address),
            Attempt::PerTryTimeout => {
                crt.stats.upstream_rq_per_try_timeout().inc();
                retry::Outcome::PerTryTimeout
            }
            Attempt::Failed(Some(e)) => upstream_outcome(e),
            Attempt::Failed(None) => break (attempt, address),
            Attempt::Response(r) => {
                retry::Outcome::from_response(r.status().as_u16(), r.headers(), policy)
            }
        };
        let decision = policy.map_or(retry::Decision::Done, |p| retry::decide(p, outcome));
        if decision == retry::Decision::Done {
            if retries > 0 && matches!(attempt, Attempt::Response(_)) {
                crt.stats.upstream_rq_retry_success().inc();
            }
            break (attempt, address);
        }
        let can_replay = replay.as_ref().is_some_and(Replay::replayable);
        if retries >= max_retries || !can_replay || parts.is_none() {
            if retries >= max_retries {
                crt.stats.upstream_rq_retry_limit_exceeded().inc();
                retry_limit_exceeded = true;
            }
            break (attempt.exhausted(), address);
        }
        // The cluster's `max_retries` circuit breaker caps retries in flight;
        // the slot is held until the retried attempt has its answer.
        match crt.shared.breakers.retry() {
            Some(slot) => retry_slot = Some(slot),
            None => {
                retry_overflow = true;
                break (attempt.exhausted(), address);
            }
        }
        drop(attempt);
        retries += 1;
        crt.stats.upstream_rq_retry().inc();
        if let (retry::Decision::RetryWithBackoff, Some(p)) = (decision, policy) {
            let wait = retry::backoff(p, retries, rand::random());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                kind = &mut global => break (Attempt::GlobalTimeout(kind), address),
            }
        }
        match policy.and_then(|p| retry_host(ctx, crt, p, lb_hash.hash, &tried)) {
            Some(next) => pool = next,
            None => {
                let r = LocalReply {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: Some("no healthy upstream".into()),
                };
                return (local_reply(r), "UH", Some(address));
            }
        }
    };
    let attempts = retries + 1;
    drop(retry_slot);
    let mut result = result;
    match &mut result {
        Attempt::Response(r) | Attempt::Exhausted(ExhaustedBy::Response(r)) => {
            obs.upstream_response(r, attempts);
            if !hcm.suppress_envoy_headers {
                // Envoy's time from the whole request received to the response.
                let now = std::time::Instant::now();
                let since = received
                    .as_ref()
                    .and_then(|c| c.complete.get().copied())
                    .unwrap_or(now);
                let ms = now.saturating_duration_since(since).as_millis() as u64;
                r.headers_mut()
                    .insert(UPSTREAM_SERVICE_TIME, HeaderValue::from(ms));
            }
        }
        Attempt::Failed(e) | Attempt::Exhausted(ExhaustedBy::Failure(e)) => {
            obs.upstream_failure(e.as_ref(), attempts)
        }
        _ => obs.upstream_failure(None, attempts),
    }
    let timers = Timers {
        deadline: deadline.get().copied(),
        idle: *idle_timeout,
    };
    let (mut resp, flag, upstream) = match result {
        Attempt::GlobalTimeout(Expired::Idle) => {
            let r = LocalReply {
                status: StatusCode::GATEWAY_TIMEOUT,
                body: Some("stream timeout".into()),
            };
            (local_reply(r), "SI", Some(address))
        }
        Attempt::GlobalTimeout(Expired::MaxDuration) => {
            let r = LocalReply {
                status: StatusCode::GATEWAY_TIMEOUT,
                body: Some("downstream duration timeout".into()),
            };
            (local_reply(r), "DT", Some(address))
        }
        Attempt::GlobalTimeout(Expired::Route)
        | Attempt::PerTryTimeout
        | Attempt::Exhausted(ExhaustedBy::Timeout) => {
            crt.stats.upstream_rq_timeout().inc();
            let r = LocalReply {
                status: StatusCode::GATEWAY_TIMEOUT,
                body: Some("upstream request timeout".into()),
            };
            let flag = retry_flags("UT", retry_overflow, retry_limit_exceeded);
            (local_reply(r), flag, Some(address))
        }
        Attempt::Failed(e) | Attempt::Exhausted(ExhaustedBy::Failure(e)) => {
            let (flag, body) = match &e {
                Some(e) => {
                    tracing::debug!(upstream.host = %address, error = %e, "upstream request failed");
                    (e.response_flag(), e.to_string())
                }
                None => ("UF", "upstream connect error".to_string()),
            };
            // A response that could not be taken is a bad gateway, as Envoy.
            let status = match &e {
                Some(UpstreamError::Protocol(_)) => StatusCode::BAD_GATEWAY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let r = LocalReply {
                status,
                body: Some(body),
            };
            let mut resp = local_reply(r);
            // As Envoy's router: a request refused by a circuit breaker tells the
            // client so (clients and Istio's retries key on it).
            if matches!(e, Some(UpstreamError::Overflow)) && !hcm.suppress_envoy_headers {
                resp.headers_mut()
                    .insert(OVERLOADED, HeaderValue::from_static("true"));
            }
            let flag = retry_flags(flag, retry_overflow, retry_limit_exceeded);
            (resp, flag, Some(address))
        }
        Attempt::Response(mut resp) => {
            // A generated hash cookie goes back with the response.
            lb_hash.apply(resp.headers_mut());
            respond(
                crt,
                resp,
                downstream_upgrade,
                timers,
                if delayed { "DI" } else { "-" },
                address,
            )
        }
        Attempt::Exhausted(ExhaustedBy::Response(resp)) => {
            let flag = if retry_overflow { "UO" } else { "URX" };
            respond(crt, resp, downstream_upgrade, timers, flag, address)
        }
    };
    if attempt_count.response {
        resp.headers_mut()
            .insert(ATTEMPT_COUNT, HeaderValue::from(attempts));
    }
    (resp, flag, upstream)
}

/// Envoy's response flags of a failed request after the retry policy had its
/// say, in the order Envoy 1.40 sets them: `UO` when the `max_retries`
/// breaker stopped a retry or `URX` when the retries ran out, then the
/// failure's own flag.
fn retry_flags(flag: &'static str, overflow: bool, limit_exceeded: bool) -> &'static str {
    match (flag, overflow, limit_exceeded) {
        ("UC", true, _) => "UO,UC",
        ("UF", true, _) => "UO,UF",
        ("UT", true, _) => "UO,UT",
        ("UC", false, true) => "URX,UC",
        ("UF", false, true) => "URX,UF",
        ("UT", false, true) => "URX,UT",
        (flag, _, _) => flag,
    }
}

/// The time the upstream has to answer, as Envoy tells it.
const EXPECTED_TIMEOUT: http::HeaderName =
    http::HeaderName::from_static("x-envoy-expected-rq-timeout-ms");

/// Where the router keeps the path a rewrite replaced.
const ORIGINAL_PATH: http::HeaderName = http::HeaderName::from_static("x-envoy-original-path");

/// Envoy's header on upstream answers: the upstream's time to answer.
const UPSTREAM_SERVICE_TIME: http::HeaderName =
    http::HeaderName::from_static("x-envoy-upstream-service-time");

/// Envoy's header on answers to requests a circuit breaker refused.
const OVERLOADED: http::HeaderName = http::HeaderName::from_static("x-envoy-overloaded");

/// Where the router keeps the Host a host rewrite replaced.
const ORIGINAL_HOST: http::HeaderName = http::HeaderName::from_static("x-envoy-original-host");

/// `x-envoy-attempt-count`: the attempt number upstream, the number of
/// attempts downstream (only when the virtual host asks for it).
const ATTEMPT_COUNT: http::HeaderName = http::HeaderName::from_static("x-envoy-attempt-count");

/// The route's timers of one request.
#[derive(Debug, Clone, Copy)]
struct RouteTimers {
    /// When the request arrived.
    start: tokio::time::Instant,
    timeout: Option<std::time::Duration>,
    idle: Option<std::time::Duration>,
    max_duration: Option<std::time::Duration>,
}

/// Resolves when the first of the request's timers runs out, as Envoy runs
/// them: the route timeout from the end of the downstream request (`end`)
/// until the response is complete, across every attempt; the idle timeout
/// from the end of the request until the response headers (the response
/// body then restarts it per frame); `max_stream_duration` from the
/// request's arrival. Once the request has ended, `deadline` receives the
/// instant by which the whole response must have been sent.
async fn request_timers(
    end: Option<&Notify>,
    t: RouteTimers,
    deadline: &std::sync::OnceLock<tokio::time::Instant>,
) -> Expired {
    let msd_at = t.max_duration.map(|d| t.start + d);
    let request_end = async {
        match end {
            Some(end) => end.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = request_end => {}
        _ = sleep_until(msd_at) => return Expired::MaxDuration,
    }
    let now = tokio::time::Instant::now();
    let route_at = t.timeout.map(|d| now + d);
    if let Some(at) = [route_at, msd_at].into_iter().flatten().min() {
        let _ = deadline.set(at);
    }
    let first = [
        (route_at, Expired::Route),
        (t.idle.map(|d| now + d), Expired::Idle),
        (msd_at, Expired::MaxDuration),
    ]
    .into_iter()
    .filter_map(|(at, kind)| Some((at?, kind)))
    .min_by_key(|(at, _)| *at);
    match first {
        Some((at, kind)) => {
            tokio::time::sleep_until(at).await;
            kind
        }
        None => std::future::pending().await,
    }
}

/// Which of the request's timers ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Route,
    Idle,
    MaxDuration,
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The timers still running while the response body streams.
#[derive(Debug, Clone, Copy)]
struct Timers {
    deadline: Option<tokio::time::Instant>,
    idle: Option<std::time::Duration>,
}

/// Shadow requests get the route timeout, or this when the route has none.
const DEFAULT_SHADOW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// How one upstream attempt ended.
enum Attempt {
    Response(Response<Incoming>),
    Failed(Option<UpstreamError>),
    PerTryTimeout,
    GlobalTimeout(Expired),
    /// A retriable outcome with no retry left (or a body that cannot be
    /// sent again): passed on as it is.
    Exhausted(ExhaustedBy),
}

enum ExhaustedBy {
    Response(Response<Incoming>),
    Failure(Option<UpstreamError>),
    Timeout,
}

impl From<Result<Response<Incoming>, UpstreamError>> for Attempt {
    fn from(r: Result<Response<Incoming>, UpstreamError>) -> Self {
        match r {
            Ok(resp) => Attempt::Response(resp),
            Err(e) => Attempt::Failed(Some(e)),
        }
    }
}

impl Attempt {
    fn exhausted(self) -> Self {
        match self {
            Attempt::Response(r) => Attempt::Exhausted(ExhaustedBy::Response(r)),
            Attempt::Failed(e) => Attempt::Exhausted(ExhaustedBy::Failure(e)),
            Attempt::PerTryTimeout => Attempt::Exhausted(ExhaustedBy::Timeout),
            other => other,
        }
    }
}

/// What a failed attempt counts as for `retry_on`.
fn upstream_outcome(e: &UpstreamError) -> retry::Outcome {
    match e {
        UpstreamError::ConnectFailure(_)
        | UpstreamError::ConnectTimeout
        | UpstreamError::Tls(_) => retry::Outcome::ConnectFailure,
        // hyper does not expose the HTTP/2 reset reason as a type of its own.
        UpstreamError::Reset(h) if format!("{h:?}").contains("REFUSED_STREAM") => {
            retry::Outcome::RefusedStream
        }
        _ => retry::Outcome::Reset,
    }
}

/// The endpoint of a retry: chosen with the request's hash like the first
/// attempt (a hashed request stays on its host); with the previous-hosts
/// predicate, endpoints already tried are passed over while others are
/// available, as Envoy's host reselection ends up doing.
fn retry_host(
    ctx: &ConnCtx,
    crt: &ClusterRt,
    policy: &ferry_model::RetryPolicy,
    hash: Option<u64>,
    tried: &[ferry_model::cluster::HostAddr],
) -> Option<Arc<EndpointPool>> {
    let avoid = if policy.previous_hosts && policy.host_selection_max_attempts > 0 {
        tried
    } else {
        &[]
    };
    crt.pick_retry(Some(ctx.original_dst), hash, avoid)
}

/// A copy of a request head with another body, for one more attempt.
fn copy_request(p: &http::request::Parts, body: UpstreamBody) -> Request<UpstreamBody> {
    let mut r = Request::new(body);
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    // Carries hyper's record of the original header case.
    *r.extensions_mut() = p.extensions.clone();
    r
}

/// Passes an upstream response downstream (and an accepted upgrade on).
fn respond(
    crt: &ClusterRt,
    mut resp: Response<Incoming>,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    timers: Timers,
    flag: &'static str,
    address: ferry_model::cluster::HostAddr,
) -> Routed {
    crt.stats.status(resp.status().as_u16());
    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(down)) = (upgraded, downstream_upgrade) {
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(d), Ok(u)) = tokio::join!(down, up) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
        });
    }
    headers::prepare_response(resp.headers_mut(), upgraded);
    // An upgraded connection outlives the request: no deadline on it.
    let (deadline, idle) = if upgraded {
        (None, None)
    } else {
        (timers.deadline, timers.idle)
    };
    let stream = resp.extensions_mut().remove::<crate::cluster::H2Stream>();
    (
        resp.map(|b| Either::Left(DeadlineBody::new(b, deadline, idle, stream))),
        flag,
        Some(address),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    /// A future is copied whole each time it is moved: into the future
    /// awaiting it, into a wrapper (`select!`, a task-local scope), into
    /// hyper's box. With the ext_authz check and new connections inline, and
    /// the send held once per wrapper, a request's futures were 19 KiB
    /// (`handle`), 17.6 KiB, 16 KiB and 5.9 KiB deep, and copying them was
    /// 40 % of the instructions per proxied HTTP/1.1 request (callgrind,
    /// `benches/README.md`). Upper bounds, for debug and release.
    #[test]
    fn request_future_sizes() {
        let sizes = [
            ("handle", crate::future_sizes::of2(handle), 2048),
            (
                "route_request",
                crate::future_sizes::of7(route_request),
                8192,
            ),
            ("run_filters", crate::future_sizes::of6(run_filters), 1024),
            ("forward", crate::future_sizes::of10(forward), 6656),
            (
                "EndpointPool::send",
                crate::future_sizes::of3(crate::cluster::EndpointPool::send),
                3584,
            ),
        ];
        crate::future_sizes::assert_within(&sizes);
    }

    /// What every HTTP connection holds, idle or not: its context is 280
    /// bytes (680 with Istio's metrics and the RBAC view inline, about 1 KiB
    /// with a copy of the connection manager's counters), and a parked
    /// connection holds its guard and its watchers in `serve_h1`'s future
    /// (1,728 bytes in release before its states were scoped apart and its
    /// arguments kept once). Upper bounds.
    #[test]
    fn connection_state_sizes() {
        use std::mem::size_of;
        let sizes = [
            ("ConnCtx", size_of::<ConnCtx>(), 320),
            (
                "H1Guard<TcpStream>",
                size_of::<h1_guard::H1Guard<tokio::net::TcpStream>>(),
                256,
            ),
            ("H1Shared", size_of::<h1_guard::H1Shared>(), 96),
            ("Lifetime", size_of::<lifetime::Lifetime>(), 128),
            (
                "serve_h1 (a plain connection's, kept for its life)",
                crate::future_sizes::of6(serve_h1::<crate::rbac::Guarded<tokio::net::TcpStream>>),
                512,
            ),
            (
                "h1_parked (kept while a connection is parked)",
                crate::future_sizes::of5(h1_parked::<crate::rbac::Guarded<tokio::net::TcpStream>>),
                768,
            ),
            (
                "h1_serving (kept while a connection is served)",
                crate::future_sizes::of6(h1_serving::<crate::rbac::Guarded<tokio::net::TcpStream>>),
                1536,
            ),
            (
                "serve_h2 (a plain connection's, kept for its life)",
                crate::future_sizes::of6(serve_h2::<crate::rbac::Guarded<tokio::net::TcpStream>>),
                2816,
            ),
        ];
        crate::future_sizes::assert_within(&sizes);
    }

    fn hcm_with(mode: ferry_model::listener::ForwardClientCert) -> HttpConnectionManager {
        HttpConnectionManager {
            stat_prefix: "t".into(),
            codec: ferry_model::HttpCodec::Auto,
            routes: ferry_model::RouteSource::Rds("r".into()),
            generate_request_id: false,
            idle_timeout: None,
            stream_idle_timeout: None,
            request_timeout: None,
            use_remote_address: false,
            forward_client_cert: mode,
            client_cert_details: ferry_model::listener::ClientCertDetails {
                subject: false,
                uri: true,
                dns: false,
            },
            http_filters: Vec::new(),
            client_trust: Default::default(),
            suppress_envoy_headers: false,
            access_logs: Default::default(),
            tracing: None,
            path_normalization: Default::default(),
            protocol: Default::default(),
            server_header: ferry_model::listener::ServerHeader::PassThrough,
            upgrades: Vec::new(),
        }
    }

    #[test]
    fn forward_client_cert_modes() {
        use ferry_model::listener::ForwardClientCert as F;
        const XFCC: &str = "x-forwarded-client-cert";
        let info = Arc::new(ferry_tls::ClientCertInfo {
            by: vec!["spiffe://td/ns/a/sa/server".into()],
            hash: "ab".into(),
            subject: String::new(),
            uris: vec!["spiffe://td/ns/a/sa/client".into()],
            dns: vec![],
        });
        let mtls = PeerTls {
            mtls: true,
            identity: None,
            client_cert: Some(info),
        };
        let plain_tls = PeerTls {
            mtls: false,
            identity: None,
            client_cert: None,
        };
        let run = |mode, tls: Option<&PeerTls>| {
            let mut h = http::HeaderMap::new();
            h.insert(XFCC, HeaderValue::from_static("By=x"));
            forward_client_cert(&mut h, &hcm_with(mode), tls);
            h.get(XFCC)
                .map(|v| v.to_str().unwrap_or_default().to_string())
        };
        let element = "By=spiffe://td/ns/a/sa/server;Hash=ab;URI=spiffe://td/ns/a/sa/client";
        assert_eq!(run(F::Sanitize, Some(&mtls)), None);
        assert_eq!(run(F::ForwardOnly, Some(&mtls)).as_deref(), Some("By=x"));
        assert_eq!(run(F::ForwardOnly, Some(&plain_tls)), None);
        assert_eq!(run(F::AlwaysForwardOnly, None).as_deref(), Some("By=x"));
        assert_eq!(
            run(F::AppendForward, Some(&mtls)),
            Some(format!("By=x,{element}"))
        );
        assert_eq!(run(F::AppendForward, None), None);
        assert_eq!(run(F::SanitizeSet, Some(&mtls)).as_deref(), Some(element));
        assert_eq!(run(F::SanitizeSet, Some(&plain_tls)), None);
    }

    fn timers(timeout: u64, idle: u64, max: u64) -> RouteTimers {
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        RouteTimers {
            start: Instant::now(),
            timeout: ms(timeout),
            idle: ms(idle),
            max_duration: ms(max),
        }
    }

    /// Runs the timers with the request ending after `request_ms`; returns
    /// what expired and when, and the response deadline.
    async fn run(t: RouteTimers, request_ms: u64) -> (Expired, u64, Option<u64>) {
        let start = Instant::now();
        let end = Arc::new(Notify::new());
        let notifier = end.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(request_ms)).await;
            notifier.notify_one();
        });
        let deadline = std::sync::OnceLock::new();
        let kind = request_timers(Some(&end), t, &deadline).await;
        let ms = |i: Instant| (i - start).as_millis() as u64;
        (kind, ms(Instant::now()), deadline.get().map(|d| ms(*d)))
    }

    #[tokio::test(start_paused = true)]
    async fn route_timeout_starts_when_the_request_ends() {
        assert_eq!(
            run(timers(300, 0, 0), 100).await,
            (Expired::Route, 400, Some(400))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_max_duration() {
        // The idle timer starts with the end of the request, too.
        assert_eq!(
            run(timers(300, 50, 0), 100).await,
            (Expired::Idle, 150, Some(400))
        );
        // The stream's duration counts from its arrival, even mid-request.
        assert_eq!(
            run(timers(300, 0, 80), 100).await,
            (Expired::MaxDuration, 80, None)
        );
        assert_eq!(
            run(timers(300, 0, 250), 100).await,
            (Expired::MaxDuration, 250, Some(250))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_timer_never_expires() {
        let t = run(timers(0, 0, 0), 10);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), t)
                .await
                .is_err()
        );
    }
}
