//! Load generator for the mTLS handshake benchmark: every exchange is a new
//! TCP connection, a TLS handshake presenting a client certificate (Istio's
//! mutual TLS), one HTTP/1.1 request and its response, then an abortive close
//! (`SO_LINGER` 0, so no TIME_WAIT piles up on either side at thousands of
//! connections a second).
//!
//! With `--resume`, the client keeps the session tickets the server hands out
//! and offers them on the next connections (TLS 1.3 resumption), which is what
//! a sidecar reconnecting to the same peer does; without it every handshake is
//! a full one (certificate signatures and chain verification on both sides).
//!
//! Prints one JSON object on stdout, like `bench-tcp-client`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_benches::{parse_duration, percentile};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
#[command(about = "mTLS handshake client for the Ferry load harness")]
struct Args {
    /// The TLS listener (the server sidecar's inbound port).
    #[arg(long)]
    addr: SocketAddr,
    /// Trusted CA (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Client certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Client private key (PEM, PKCS#8).
    #[arg(long)]
    key: PathBuf,
    /// The name the server certificate is checked against (a DNS SAN).
    #[arg(long, default_value = "server.bench.local")]
    server_name: String,
    /// ALPN offered (repeatable).
    #[arg(long, default_values_t = vec!["http/1.1".to_string()])]
    alpn: Vec<String>,
    /// Connections in flight at once.
    #[arg(long, short = 'c', default_value_t = 10)]
    connections: usize,
    /// How long to run, e.g. `5s` or `500ms`.
    #[arg(long, short = 'd', default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Offer the server's session tickets again (TLS resumption).
    #[arg(long)]
    resume: bool,
}

#[derive(Default)]
struct Stats {
    handshakes: u64,
    resumed: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.connections == 0 {
        bail!("--connections must be positive");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(run(args))
}

fn config(args: &Args) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&args.ca).context("reading --ca")? {
        roots.add(ca.context("parsing --ca")?)?;
    }
    let chain = CertificateDer::pem_file_iter(&args.cert)
        .context("reading --cert")?
        .collect::<Result<Vec<_>, _>>()
        .context("parsing --cert")?;
    let key = PrivateKeyDer::from_pem_file(&args.key).context("reading --key")?;
    // The suites offered as a mesh sidecar offers them (Envoy's client order,
    // which Ferry's follows), so both proxies negotiate what a peer sidecar
    // would get: TLS 1.3 AES-128-GCM with SHA-256.
    let provider = Arc::new(ferry_tls::envoy_ordered());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = args.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.resumption = if args.resume {
        rustls::client::Resumption::in_memory_sessions(1024)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(config))
}

async fn run(args: Args) -> Result<()> {
    let config = config(&args)?;
    let name = ServerName::try_from(args.server_name.clone()).context("--server-name")?;
    // One exchange before the clock starts: a wrong certificate or address
    // is an error here, not a run of zero handshakes.
    let mut probe = Stats::default();
    exchange(args.addr, &config, &name, &mut probe)
        .await
        .with_context(|| format!("first exchange with {}", args.addr))?;

    let start = Instant::now();
    let deadline = start + args.duration;
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            let (config, name) = (config.clone(), name.clone());
            let addr = args.addr;
            tokio::spawn(async move {
                let mut stats = Stats::default();
                while Instant::now() < deadline {
                    if exchange(addr, &config, &name, &mut stats).await.is_err() {
                        stats.errors += 1;
                    }
                }
                stats
            })
        })
        .collect();
    let mut total = Stats::default();
    for t in tasks {
        let s = t.await.context("connection task panicked")?;
        total.handshakes += s.handshakes;
        total.resumed += s.resumed;
        total.errors += s.errors;
        total.latencies_us.extend(s.latencies_us);
    }
    let elapsed = start.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    let json_num = |v: Option<u32>| v.map_or_else(|| "null".to_owned(), |v| v.to_string());
    let line = format!(
        "{{\"mode\":\"handshake\",\"connections\":{c},\"resume\":{resume},\"duration_s\":{elapsed:.3},\
         \"requests\":{n},\"resumed\":{resumed},\"errors\":{err},\"rps\":{rps:.1},\
         \"p50_us\":{p50},\"p99_us\":{p99}}}",
        c = args.connections,
        resume = args.resume,
        n = total.handshakes,
        resumed = total.resumed,
        err = total.errors,
        rps = total.handshakes as f64 / elapsed,
        p50 = json_num(percentile(&total.latencies_us, 50.0)),
        p99 = json_num(percentile(&total.latencies_us, 99.0)),
    );
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

/// One connection: handshake, `GET /`, the whole response, abortive close.
async fn exchange(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &ServerName<'static>,
    stats: &mut Stats,
) -> Result<()> {
    let started = Instant::now();
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    // RST on close: the port is free again at once (a zero linger never
    // blocks the close).
    socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO))?;
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name.clone(), tcp)
        .await?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    read_response(&mut tls).await?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    drop(tls);
    stats.handshakes += 1;
    stats.resumed += u64::from(resumed);
    stats
        .latencies_us
        .push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
    Ok(())
}

/// Reads one `Content-Length` framed response and checks it is a 200.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected response: {}", head.lines().next().unwrap_or(""));
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .context("response without content-length")?;
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in the response body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}
