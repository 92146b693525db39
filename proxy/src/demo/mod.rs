//! `ferry demo`: a self-contained local run of the sidecar on the built-in
//! configuration. It starts a small HTTP backend and a TCP echo server,
//! proxies HTTP/1.1, HTTP/2 (h2c) and TCP traffic to them through Ferry,
//! shows what the backend received (the headers Ferry added) and Ferry's own
//! counters, then drains and exits, or keeps serving with `--serve`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::run::{RunOptions, run};

const BOOTSTRAP: &str = include_str!("bootstrap.yaml");

/// The ports the built-in configuration names, each once: the HTTP and
/// TCP listeners, the HTTP backend, the echo server and the admin.
pub const HTTP_PORT: u16 = 10000;
pub const TCP_PORT: u16 = 10001;
pub const BACKEND_HTTP: u16 = 10080;
pub const BACKEND_TCP: u16 = 10081;
pub const ADMIN_PORT: u16 = 9901;

/// The built-in configuration with its ports (`port_value: N`) replaced:
/// `(port in the file, port to use)`.
pub fn bootstrap(ports: &[(u16, u16)]) -> String {
    ports
        .iter()
        .fold(BOOTSTRAP.to_string(), |text, (from, to)| {
            text.replace(
                &format!("port_value: {from}}}"),
                &format!("port_value: {to}}}"),
            )
        })
}

async fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port())
}

/// The demo backend: answers with what it received, so the output shows
/// what crossed the proxy.
async fn backend(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut text = format!(
        "backend saw: {} {} {:?}\n",
        req.method(),
        req.uri(),
        req.version()
    );
    for (k, v) in req.headers() {
        text.push_str(&format!("  {k}: {}\n", v.to_str().unwrap_or("<binary>")));
    }
    Ok(Response::new(Full::new(Bytes::from(text))))
}

async fn serve_backend(l: TcpListener) {
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), hyper::service::service_fn(backend))
                .await;
        });
    }
}

async fn serve_echo(l: TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn get(addr: SocketAddr, path: &str, h2: bool) -> anyhow::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let req = Request::get(format!("http://demo.local{path}"))
        .header("host", "demo.local")
        .body(Empty::<Bytes>::new())?;
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.uri = path.parse()?;
        send.send_request(Request::from_parts(parts, body)).await?
    };
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(format!("{status}\n{}", String::from_utf8_lossy(&body)))
}

async fn tcp_echo(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"ping over TCP\n").await?;
    s.shutdown().await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

pub async fn demo(serve: bool) -> anyhow::Result<()> {
    let backend_l = TcpListener::bind("127.0.0.1:0").await?;
    let echo_l = TcpListener::bind("127.0.0.1:0").await?;
    let (http_port, tcp_port, admin_port) =
        (free_port().await?, free_port().await?, free_port().await?);
    let text = bootstrap(&[
        (HTTP_PORT, http_port),
        (TCP_PORT, tcp_port),
        (ADMIN_PORT, admin_port),
        (BACKEND_HTTP, backend_l.local_addr()?.port()),
        (BACKEND_TCP, echo_l.local_addr()?.port()),
    ]);
    tokio::spawn(serve_backend(backend_l));
    tokio::spawn(serve_echo(echo_l));
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bootstrap.yaml");
    std::fs::write(&config, &text)?;

    let proxy = tokio::spawn(run(RunOptions {
        config: config.clone(),
        admin_addr: None,
        ready_addr: None,
        prometheus_addr: None,
        drain_timeout: Duration::from_secs(2),
        drain_strategy: Default::default(),
        access_log: false,
        detection_timeout: None,
        node: Default::default(),
        agent: None,
        status: None,
        exit_on_zero_active_connections: false,
        minimum_drain_duration: Duration::ZERO,
        dns: None,
        drain_inbound_only: false,
    }));
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let http: SocketAddr = ([127, 0, 0, 1], http_port).into();
    let tcp: SocketAddr = ([127, 0, 0, 1], tcp_port).into();
    let mut ready = false;
    for _ in 0..100 {
        if get(admin, "/ready", false)
            .await
            .is_ok_and(|r| r.starts_with("200"))
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(ready, "ferry did not become ready");

    let out = |title: &str, body: &str| {
        let mut s = format!("== {title}\n");
        for line in body.lines() {
            s.push_str("   ");
            s.push_str(line);
            s.push('\n');
        }
        s
    };
    let mut report = format!("ferry demo: config {}\n", config.display());
    report += &out(
        &format!("HTTP/1.1 GET http://{http}/hello"),
        &get(http, "/hello", false)
            .await
            .context("HTTP/1.1 request")?,
    );
    report += &out(
        &format!("HTTP/2 (h2c) GET http://{http}/hello"),
        &get(http, "/hello", true).await.context("HTTP/2 request")?,
    );
    report += &out(
        &format!("HTTP/1.1 GET http://{http}/ferry (direct response)"),
        &get(http, "/ferry", false).await?,
    );
    report += &out(
        &format!("TCP echo via {tcp}"),
        &tcp_echo(tcp).await.context("TCP echo")?,
    );
    let stats = get(admin, "/stats", false).await?;
    let counters: String = stats
        .lines()
        .filter(|l| {
            (l.starts_with("http.demo.") || l.starts_with("cluster.") || l.starts_with("tcp."))
                && !l.ends_with(": 0")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    report += &out(&format!("ferry counters (http://{admin}/stats)"), &counters);
    use std::io::Write;
    let _ = std::io::stdout().write_all(report.as_bytes());
    if serve {
        let _ = writeln!(
            std::io::stdout(),
            "serving: curl http://{http}/  ·  admin http://{admin}/stats  ·  Ctrl-C to stop"
        );
    } else {
        crate::admin::request_quit(admin).await;
    }
    proxy.await.context("proxy task")??;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file names each of its ports once, as `port_value: N}`, so that
    /// `ferry demo` moves every one of them and nothing else.
    #[test]
    fn every_port_of_the_file_is_replaced() {
        let ports = [HTTP_PORT, TCP_PORT, BACKEND_HTTP, BACKEND_TCP, ADMIN_PORT];
        for p in ports {
            assert_eq!(
                BOOTSTRAP.matches(&format!("port_value: {p}}}")).count(),
                1,
                "port {p}"
            );
        }
        let moved: Vec<(u16, u16)> = ports.iter().map(|&p| (p, p + 30000)).collect();
        let text = bootstrap(&moved);
        for (from, to) in moved {
            assert!(
                !text.contains(&format!("port_value: {from}}}")),
                "{from} left"
            );
            assert!(
                text.contains(&format!("port_value: {to}}}")),
                "{to} missing"
            );
        }
        // Both parse as bootstraps.
        for t in [BOOTSTRAP, text.as_str()] {
            ferry_xds::bootstrap::parse_bootstrap("demo", t).expect("a valid bootstrap");
        }
    }
}
