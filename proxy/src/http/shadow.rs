//! Request mirroring (`request_mirror_policies`): a fire-and-forget copy of
//! the request to the mirror cluster, with `-shadow` appended to the host as
//! Envoy does (`host-shadow:port`). The shadow never delays or fails the
//! main request: it runs on its own task, waits for the downstream body to
//! have been received whole (only bodies within the replay bound are
//! mirrored; a larger one cancels the shadow), and its answer is discarded.

use std::time::Duration;

use ferry_model::MirrorPolicy;
use http::header::HOST;
use http::{HeaderValue, Request, Uri, Version};
use http_body_util::BodyExt;

use super::ConnCtx;
use super::body::{ReplayWatcher, UpstreamBody};

pub fn spawn(
    ctx: &ConnCtx,
    policy: &MirrorPolicy,
    head: &http::request::Parts,
    authority: &str,
    path: &str,
    body: ReplayWatcher,
    timeout: Duration,
) {
    let clusters = ctx.rt.clusters.load();
    let Some(crt) = clusters.get(&policy.cluster).cloned() else {
        tracing::debug!(cluster = %policy.cluster, "mirror cluster not found");
        return;
    };
    let Some(pool) = crt.pick(Some(ctx.original_dst)) else {
        return;
    };
    let use_h2 = match crt.cfg.protocol {
        ferry_model::UpstreamProtocol::Http2 => true,
        ferry_model::UpstreamProtocol::Http1 => false,
        ferry_model::UpstreamProtocol::UseDownstream => head.version == Version::HTTP_2,
    };
    let host = policy.host(authority);
    let mut headers = head.headers.clone();
    let uri = if use_h2 {
        headers.remove(HOST);
        format!("http://{host}{path}").parse::<Uri>()
    } else {
        if let Ok(v) = HeaderValue::from_str(&host) {
            headers.insert(HOST, v);
        }
        path.parse::<Uri>()
    };
    let Ok(uri) = uri else { return };
    let method = head.method.clone();
    let extensions = head.extensions.clone();
    tokio::spawn(async move {
        let Some(bytes) = body.complete(timeout).await else {
            tracing::debug!(cluster = %crt.cfg.name, "request body not mirrored: not kept whole");
            return;
        };
        let mut req = Request::new(UpstreamBody::full(bytes));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = if use_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = headers;
        *req.extensions_mut() = extensions;
        crt.stats.upstream_rq_total().inc();
        let send = async {
            let resp = pool.send(use_h2, req).await;
            match resp {
                Ok(resp) => {
                    crt.stats.status(resp.status().as_u16());
                    // Read the answer so the connection can be reused.
                    let _ = resp.into_body().collect().await;
                }
                Err(e) => tracing::debug!(error = %e, "shadow request failed"),
            }
        };
        if tokio::time::timeout(timeout, send).await.is_err() {
            crt.stats.upstream_rq_timeout().inc();
        }
    });
}

#[cfg(test)]
mod tests {
    use ferry_model::{Fraction, MirrorPolicy};

    #[test]
    fn shadow_suffix_goes_before_the_port() {
        let mut p = MirrorPolicy {
            cluster: "c".into(),
            fraction: Fraction::ALL,
            host_rewrite: None,
            host_suffix: true,
        };
        assert_eq!(p.host("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(p.host("reviews"), "reviews-shadow");
        assert_eq!(p.host("[::1]:80"), "[::1]-shadow:80");
        p.host_rewrite = Some("mirror.example:81".into());
        assert_eq!(p.host("reviews:9080"), "mirror.example-shadow:81");
        p.host_suffix = false;
        assert_eq!(p.host("reviews:9080"), "mirror.example:81");
    }
}
