//! The debug HTTP endpoint of the ADS server, in the spirit of istiod's
//! `/debug/syncz` and `istioctl proxy-status`: `GET /debug/syncz` returns
//! every stream's [`ProxyStatus`](super::ProxyStatus) as JSON and
//! `GET /debug/cache` the cached type versions and resource versions.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;

use super::{Server, XdsError};

#[derive(Serialize)]
struct CachedType {
    version: String,
    resources: BTreeMap<String, String>,
}

/// Serves the status endpoint on `listener` until `shutdown` completes.
pub async fn serve_status(
    server: Server,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), XdsError> {
    let addr = listener.local_addr().map_err(XdsError::Status)?;
    tracing::info!(status.addr = %addr, "xDS status endpoint listening (/debug/syncz)");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: keep serving.
                    tracing::warn!(status.error = %e, "status endpoint accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(route(&server, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(src.addr = %peer, status.error = %e, "status connection failed");
            }
        });
    }
}

fn route(server: &Server, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let body = match req.uri().path() {
        "/debug/syncz" => serde_json::to_vec_pretty(&server.status()),
        "/debug/cache" => {
            let cache = server.cache();
            let types: BTreeMap<String, CachedType> = cache
                .type_urls()
                .into_iter()
                .map(|url| {
                    let snap = cache.snapshot(&url);
                    let resources = snap
                        .resources
                        .iter()
                        .map(|(n, r)| (n.to_string(), r.version.to_string()))
                        .collect();
                    (
                        url,
                        CachedType {
                            version: snap.version,
                            resources,
                        },
                    )
                })
                .collect();
            serde_json::to_vec_pretty(&types)
        }
        _ => return text(StatusCode::NOT_FOUND, "try /debug/syncz or /debug/cache\n"),
    };
    match body {
        Ok(body) => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}
