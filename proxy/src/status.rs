//! The agent's status server (istio-agent's 15020, in-process): what the
//! kubelet, Prometheus and the app itself ask of the sidecar beside the
//! proxy's own ports.
//! - `/healthz/ready`: 200 once the first configuration is applied (the
//!   readiness 15021 answers the same), 503 before and while draining.
//! - `/app-health/<container>/livez|readyz|startupz` (and
//!   `/app-lifecycle/…`): the app's rewritten probes ([`crate::app_probe`]).
//! - `/stats/prometheus` and `/metrics`: the merged scrape
//!   ([`crate::metrics_merge`]).
//! - `POST /quitquitquit` (from the pod only): exit now, without draining,
//!   so a Job whose app has finished completes.
//! - `POST /drain` (from the pod only): start draining and skip the drain
//!   period at the coming SIGTERM (native sidecars' `preStop`).
//! - `/debug/ndsz` (from the pod only): the DNS name table.
//!
//! Requests from outside the pod to the POST endpoints get 403, as the
//! agent's `IsRequestFromLocalhost` check answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app_probe::AppProbes;
use crate::metrics_merge::MetricsMerge;
use crate::run::Runtime;

/// What the status server answers with.
pub struct Status {
    pub probes: AppProbes,
    pub metrics: MetricsMerge,
}

pub async fn serve(rt: Arc<Runtime>, status: Arc<Status>, tcp: TcpListener) {
    loop {
        let Ok((stream, peer)) = tcp.accept().await else {
            continue;
        };
        let (rt, status) = (rt.clone(), status.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (rt, status) = (rt.clone(), status.clone());
                async move { Ok::<_, Infallible>(respond(&rt, &status, peer, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The agent's `IsRequestFromLocalhost`: a loopback peer.
fn from_pod(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

async fn respond(
    rt: &Arc<Runtime>,
    status: &Status,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/healthz/ready" => {
            if rt.is_ready() {
                text(StatusCode::OK, "")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "")
            }
        }
        "/stats/prometheus" | "/metrics" => {
            let proxy = crate::metrics::render_prometheus(&rt.stats, Some(&rt.istio));
            let (format, body) = status.metrics.scrape(req.headers(), proxy).await;
            let mut r = text(StatusCode::OK, body);
            if let Ok(v) = http::HeaderValue::from_str(&format) {
                r.headers_mut().insert(http::header::CONTENT_TYPE, v);
            }
            r
        }
        "/quitquitquit" | "/drain" | "/debug/ndsz" if !from_pod(peer) => text(
            StatusCode::FORBIDDEN,
            "Only requests from localhost are allowed\n",
        ),
        "/quitquitquit" | "/drain" if req.method() != Method::POST => {
            text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n")
        }
        "/quitquitquit" => {
            tracing::info!("handling /quitquitquit, exiting");
            rt.quit_now();
            text(StatusCode::OK, "OK")
        }
        "/drain" => {
            tracing::info!("handling /drain, starting drain");
            rt.drain_now();
            text(StatusCode::OK, "OK")
        }
        "/debug/ndsz" => match rt.name_table_json() {
            Some(json) => {
                let mut r = text(StatusCode::OK, json);
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            None => text(StatusCode::NOT_FOUND, "{}"),
        },
        p if p.starts_with("/app-health/") || p.starts_with("/app-lifecycle/") => {
            let (code, body) = status.probes.answer(p, req.headers()).await;
            let mut r = Response::new(Full::new(body));
            *r.status_mut() = code;
            r
        }
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_may_quit() {
        assert!(from_pod("127.0.0.1:1".parse().unwrap()));
        assert!(from_pod("[::1]:1".parse().unwrap()));
        assert!(from_pod("[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(!from_pod("10.0.0.1:1".parse().unwrap()));
    }
}
