//! The upstream of the load harness: as cheap as a server can be, so that what
//! the harness sees between "direct" and "through a proxy" is the proxy.
//!
//! Modes:
//! - `http`: HTTP/1.1 keep-alive and h2c (prior knowledge) on one port, every
//!   request answered `200 OK` with a small fixed body, the request body drained.
//! - `echo`: TCP, writes back whatever it reads (request/response benchmark).
//! - `sink`: TCP, reads and discards (throughput benchmark).

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Small enough to fit one segment with the headers, big enough not to be an
/// empty-body special case in any proxy. `load.py` checks for it (BACKEND_BODY) to
/// know a response came from here and not from the proxy.
const BODY: &[u8] = b"hello from the ferry bench backend\n";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Http,
    Echo,
    Sink,
}

#[derive(Debug, Parser)]
#[command(version, about = "Fixed-response upstream for the Ferry load harness")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    addr: SocketAddr,
    /// Runtime worker threads; 1 runs a single-threaded runtime, which is the
    /// cheapest when the backend shares a core with the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, value_enum, default_value_t = Mode::Http)]
    mode: Mode,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("building the tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    eprintln!(
        "bench-backend: {:?} on {} ({} thread(s))",
        args.mode,
        listener.local_addr()?,
        args.threads
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Running out of descriptors under a connection storm must not end the
            // benchmark's upstream; the load tool will report the failed connects.
            Err(err) => {
                eprintln!("bench-backend: accept: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // Without it small responses wait on delayed ACKs and latency measures Nagle.
        let _ = stream.set_nodelay(true);
        match args.mode {
            Mode::Http => tokio::spawn(serve_http(stream)),
            Mode::Echo => tokio::spawn(echo(stream)),
            Mode::Sink => tokio::spawn(sink(stream)),
        };
    }
}

async fn serve_http(stream: TcpStream) {
    let service = hyper::service::service_fn(respond);
    // The auto builder reads the first bytes: the h2 preface selects HTTP/2,
    // anything else HTTP/1.1 with keep-alive.
    let builder = auto::Builder::new(TokioExecutor::new());
    // Peers closing mid-connection is normal at the end of every load run.
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn respond(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Drained so a POST benchmark measures the proxy forwarding its body, and so
    // HTTP/1.1 keep-alive can reuse the connection.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

async fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn sink(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
