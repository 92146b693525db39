//! The admin server (loopback, 15000 by default: `/ready`, `/config_dump`,
//! `/stats`, `/quitquitquit`) and the readiness server (`/healthz/ready` on
//! 15021) and Istio's Prometheus port (`/stats/prometheus` on 15090), as
//! Envoy and istio-agent serve them.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::run::Runtime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Readiness,
    /// Only `/stats/prometheus` (Istio's 15090, scraped from outside the pod).
    Prometheus,
}

pub async fn serve(rt: Arc<Runtime>, tcp: TcpListener, role: Role) {
    loop {
        let Ok((stream, _)) = tcp.accept().await else {
            continue;
        };
        let rt = rt.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let rt = rt.clone();
                async move { Ok::<_, Infallible>(respond(&rt, role, req)) }
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
        http::HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    r
}

fn respond(rt: &Runtime, role: Role, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    // The admin's `/ready` is Envoy's server state; the readiness port
    // answers as the agent, which also waits for the DNS name table.
    let ready = || {
        let ok = match role {
            Role::Admin => rt.is_live(),
            _ => rt.is_ready(),
        };
        if ok {
            text(StatusCode::OK, "LIVE\n")
        } else if rt.inbound.is_draining() {
            text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n")
        }
    };
    match (role, req.method(), path) {
        (Role::Admin | Role::Prometheus, _, "/stats/prometheus") => {
            let mut r = text(
                StatusCode::OK,
                crate::metrics::render_prometheus(&rt.stats, Some(&rt.istio)),
            );
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (Role::Readiness, _, "/healthz/ready") => ready(),
        (Role::Readiness | Role::Prometheus, _, _) => text(StatusCode::NOT_FOUND, "not found\n"),
        (Role::Admin, _, "/ready") => ready(),
        (Role::Admin, _, "/config_dump") => match rt.config_dump() {
            Ok(v) => {
                let mut r = text(
                    StatusCode::OK,
                    serde_json::to_vec_pretty(&v).unwrap_or_default(),
                );
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        (Role::Admin, _, "/stats") => {
            let mut body = rt.stats.render_text();
            if let Some(x) = &rt.xds {
                use std::sync::atomic::Ordering::Relaxed;
                for (name, v) in [
                    ("xds.update_success", x.updates.load(Relaxed)),
                    ("xds.ack", x.acks.load(Relaxed)),
                    ("xds.update_rejected", x.nacks.load(Relaxed)),
                    ("xds.reconnect", x.reconnects.load(Relaxed)),
                    ("xds.warning", x.warnings.load(Relaxed)),
                ] {
                    body.push_str(&format!("{name}: {v}\n"));
                }
            }
            text(StatusCode::OK, body)
        }
        (Role::Admin, &Method::POST, "/quitquitquit") => {
            rt.quit();
            text(StatusCode::OK, "OK\n")
        }
        (Role::Admin, &Method::POST, "/drain_listeners") => {
            // `?inboundonly`: only the inbound listeners, as Envoy.
            let inbound_only = req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|kv| kv.split('=').next() == Some("inboundonly"))
            });
            if inbound_only {
                rt.inbound.start();
            } else {
                rt.drain.start();
            }
            text(StatusCode::OK, "OK\n")
        }
        (Role::Admin, _, "/quitquitquit" | "/drain_listeners") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "This endpoint requires POST\n",
        ),
        (Role::Admin, _, _) => text(
            StatusCode::NOT_FOUND,
            "admin commands: /ready /config_dump /stats /stats/prometheus /quitquitquit (POST) /drain_listeners (POST)\n",
        ),
    }
}

/// Sends `POST /quitquitquit` to an admin address (used by `ferry demo`).
pub async fn request_quit(admin: std::net::SocketAddr) {
    use tokio::io::AsyncWriteExt;
    if let Ok(mut s) = tokio::net::TcpStream::connect(admin).await {
        let req = format!(
            "POST /quitquitquit HTTP/1.1\r\nhost: {admin}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let _ = s.write_all(req.as_bytes()).await;
        let mut buf = [0u8; 256];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
    }
}
