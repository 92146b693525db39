//! Load generator for the TCP proxy benchmark, the role wrk and h2load play for HTTP.
//!
//! `rr` (request/response): each connection sends `--size` bytes and waits for
//! them to come back from `bench-backend --mode echo`, so every exchange crosses
//! the proxy twice and its latency is the proxy's per-read forwarding cost.
//! `stream`: each connection writes `--size`-byte chunks as fast as it can into
//! `bench-backend --mode sink`, which measures bulk copy throughput.
//!
//! Prints one JSON object on stdout so the harness needs no output scraping.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use ferry_benches::{parse_duration, percentile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Rr,
    Stream,
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "TCP request/response and throughput client for the Ferry load harness"
)]
struct Args {
    /// Address of the echo/sink server, or of the proxy listener in front of it.
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, short = 'c', default_value_t = 50)]
    connections: usize,
    /// How long to run, e.g. `5s` or `500ms`.
    #[arg(long, short = 'd', default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Bytes per request (rr) or per write (stream).
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, value_enum, default_value_t = Mode::Rr)]
    mode: Mode,
    /// Runtime worker threads; 1 runs a single-threaded runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// What one connection did.
#[derive(Default)]
struct ConnStats {
    requests: u64,
    bytes: u64,
    errors: u64,
    /// Request/response round trips in microseconds (rr mode only).
    latencies_us: Vec<u32>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.connections == 0 || args.size == 0 {
        bail!("--connections and --size must be positive");
    }
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
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    // Connect everything before the clock starts, so connection setup through the
    // proxy is not averaged into the steady-state request rate.
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let stream = TcpStream::connect(args.addr)
            .await
            .with_context(|| format!("connecting to {}", args.addr))?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }

    let start = Instant::now();
    let deadline = start + args.duration;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|stream| match args.mode {
            Mode::Rr => tokio::spawn(request_response(stream, args.size, deadline)),
            Mode::Stream => tokio::spawn(stream_out(stream, args.size, deadline)),
        })
        .collect();

    let mut total = ConnStats::default();
    for task in tasks {
        let stats = task.await.context("connection task panicked")?;
        total.requests += stats.requests;
        total.bytes += stats.bytes;
        total.errors += stats.errors;
        total.latencies_us.extend(stats.latencies_us);
    }
    let elapsed = start.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();

    let p50 = percentile(&total.latencies_us, 50.0);
    let p99 = percentile(&total.latencies_us, 99.0);
    let max = total.latencies_us.last().copied();
    let json_num = |v: Option<u32>| v.map_or_else(|| "null".to_owned(), |v| v.to_string());
    let line = format!(
        "{{\"mode\":\"{mode}\",\"connections\":{conns},\"size\":{size},\"duration_s\":{elapsed:.3},\
         \"requests\":{req},\"errors\":{err},\"bytes\":{bytes},\"rps\":{rps:.1},\
         \"mib_per_s\":{mibs:.2},\"p50_us\":{p50},\"p99_us\":{p99},\"max_us\":{max}}}",
        mode = if args.mode == Mode::Rr {
            "rr"
        } else {
            "stream"
        },
        conns = args.connections,
        size = args.size,
        req = total.requests,
        err = total.errors,
        bytes = total.bytes,
        rps = total.requests as f64 / elapsed,
        mibs = total.bytes as f64 / elapsed / (1024.0 * 1024.0),
        p50 = json_num(p50),
        p99 = json_num(p99),
        max = json_num(max),
    );
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    if total.errors > 0 {
        bail!("{} connection(s) failed during the run", total.errors);
    }
    Ok(())
}

async fn request_response(mut stream: TcpStream, size: usize, deadline: Instant) -> ConnStats {
    let request = vec![b'x'; size];
    let mut reply = vec![0u8; size];
    let mut stats = ConnStats::default();
    while Instant::now() < deadline {
        let sent = Instant::now();
        if stream.write_all(&request).await.is_err() || stream.read_exact(&mut reply).await.is_err()
        {
            stats.errors += 1;
            break;
        }
        let micros = sent.elapsed().as_micros();
        stats
            .latencies_us
            .push(u32::try_from(micros).unwrap_or(u32::MAX));
        stats.requests += 1;
        stats.bytes += size as u64;
    }
    stats
}

async fn stream_out(mut stream: TcpStream, size: usize, deadline: Instant) -> ConnStats {
    let chunk = vec![b'x'; size];
    let mut stats = ConnStats::default();
    while Instant::now() < deadline {
        if stream.write_all(&chunk).await.is_err() {
            stats.errors += 1;
            break;
        }
        stats.requests += 1;
        stats.bytes += size as u64;
    }
    stats
}
