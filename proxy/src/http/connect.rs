//! CONNECT termination in the connection manager (a route with
//! `upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]`, HTTP/2
//! CONNECT as HBONE speaks it): a TCP connection to the routed cluster is
//! opened, the request answered 200 once it is up (503 when it cannot be),
//! and the stream's bytes are then copied both ways, each side's end passed
//! on as the other's half-close (but an HTTP/1 downstream's end closes the
//! tunnel, as in Envoy). An internal-address cluster gets the
//! filter state the request shares with upstream. Also
//! `envoy.filters.http.set_filter_state`, which fills that state.

use std::sync::Arc;

use ferry_model::filter_state::{self as fs, FilterState, SetFilterState};
use ferry_model::format::{FormatContext, ValueContext};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{ConnCtx, LocalReply, Routed, body, local_reply};
use crate::cluster::EndpointPool;

/// `set_filter_state`'s `on_request_headers`: each value rendered from the
/// request and stored in the request's filter state (which starts as the
/// connection's).
pub(super) fn set_filter_state(
    ctx: &ConnCtx,
    cfg: &SetFilterState,
    req: &mut Request<Incoming>,
    fctx: &FormatContext<'_>,
) {
    let mut state = req
        .extensions_mut()
        .remove::<FilterState>()
        .or_else(|| ctx.filter_state.as_deref().cloned())
        .unwrap_or_default();
    let peer_cert = ctx.tls.as_ref().and_then(|t| t.client_cert.as_deref());
    let peer_uri_sans = peer_cert.map_or(&[][..], |c| &c.uris[..]);
    let local_uri_sans = peer_cert.map_or(&[][..], |c| &c.by[..]);
    let pseudo = super::pseudo_of(req);
    let headers = req.headers();
    fs::apply(&cfg.on_request_headers, &mut state, |format, so_far| {
        let vctx = ValueContext {
            format: fctx,
            pseudo: &pseudo,
            peer_uri_sans,
            local_uri_sans,
            filter_state: Some(so_far),
        };
        format.render(&vctx, headers)
    });
    req.extensions_mut().insert(state);
}

/// Whether `req` is a CONNECT that `route` terminates here.
pub(super) fn terminates(req: &Request<Incoming>, route: &ferry_model::Route) -> bool {
    route.connect_terminate && req.method() == http::Method::CONNECT
}

/// Terminates the CONNECT `req` on a connection to `pool`'s endpoint.
pub(super) async fn terminate(
    ctx: &ConnCtx,
    pool: Arc<EndpointPool>,
    mut req: Request<Incoming>,
) -> Routed {
    let shared = req
        .extensions()
        .get::<FilterState>()
        .or(ctx.filter_state.as_deref())
        .and_then(FilterState::for_upstream)
        .map(Arc::new);
    let upstream = Some(pool.address.clone());
    let internal = matches!(pool.address, ferry_model::cluster::HostAddr::Internal(_));
    let up = match pool.connect_carrying(shared).await {
        Ok(up) => {
            pool.report_connect(true);
            up
        }
        Err(e) => {
            pool.report_connect(false);
            tracing::debug!(upstream.host = %pool.address, error = %e, "CONNECT upstream connect failed");
            let mut body = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure".to_string();
            // An internal connection has no transport to fail (Envoy names none).
            if let Some(reason) = e.transport_failure_reason().filter(|_| !internal) {
                body.push_str(&format!(", transport failure reason: {reason}"));
            }
            let r = LocalReply {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: Some(body),
            };
            return (local_reply(r), "UF", upstream);
        }
    };
    // Envoy's HTTP/1 codec knows no half-close: the downstream's end closes
    // its connection, and the tunnel with it. HTTP/2 ends a stream's
    // direction with END_STREAM, passed on as the upstream's half-close.
    let http1 = req.version() < http::Version::HTTP_2;
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The HTTP/2 stream's tasks, to reset it (none over HTTP/1).
    let stream = super::h2_exec::StreamTasks::current();
    // The tunnel outlives the response: it counts as a stream of the
    // connection until its bytes are done.
    let tunnel = ctx.life.tunnel();
    tokio::spawn(async move {
        let _tunnel = tunnel;
        let Ok(down) = on_upgrade.await else {
            tracing::debug!("CONNECT stream ended before it was upgraded");
            return;
        };
        let mut down = EndCloses {
            io: TokioIo::new(down),
            closes: http1,
        };
        // The internal connection's full close, while the caller's side is
        // still open, resets the stream (Envoy's upstream close event);
        // its half-close ends it with END_STREAM.
        let mut up = crate::internal_pipe::ResetOnClose(up);
        match crate::tcp::copy_bidirectional(&mut down, &mut up).await {
            Ok((rx, tx)) => {
                tracing::trace!(bytes.received = rx, bytes.sent = tx, "CONNECT tunnel done")
            }
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT tunnel ended");
                // A failed tunnel resets its stream, as Envoy's upstream
                // close event does, rather than ending it: its sending
                // side is stopped before END_STREAM, then dropped.
                if let Some(stream) = &stream
                    && stream.stop_upgraded().await
                {
                    tracing::debug!("CONNECT stream reset");
                }
            }
        }
    });
    (Response::new(body::empty()), "", upstream)
}

/// A tunnel's downstream whose end, when `closes`, is an error rather than
/// a half-close: the copy stops and both sides are closed.
struct EndCloses<T> {
    io: T,
    closes: bool,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for EndCloses<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let closes = self.closes;
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) if closes && buf.filled().len() == before => {
                std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the HTTP/1 downstream closed its connection",
                )))
            }
            other => other,
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for EndCloses<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
