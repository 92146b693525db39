//! The `ferry` binary: `sidecar` and `gateway` run the proxy on an Envoy v3
//! bootstrap; `iptables` is the pod's init step.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ferry_proxy::iptables::IptablesArgs;
use ferry_proxy::run::{RunOptions, run};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "A native data plane for Istio-style service meshes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the sidecar proxy of a pod.
    Sidecar(ProxyArgs),
    /// Runs an ingress or egress gateway (the same engine, no capture).
    Gateway(ProxyArgs),
    /// Programs the pod's iptables so its TCP traffic goes through the sidecar.
    Iptables(IptablesArgs),
    /// Waits until the sidecar is ready (`pilot-agent wait`: the injected
    /// `postStart` hook that holds the app until the proxy has started).
    Wait(WaitArgs),
    /// Sends a request to the sidecar's status or admin port
    /// (`pilot-agent request`, e.g. `request POST drain` in `preStop`).
    Request(RequestArgs),
    /// Runs a local demo: the sidecar on its built-in configuration in front
    /// of a small HTTP backend and TCP echo, with traffic and counters shown.
    Demo {
        /// Keep serving after the demo traffic (Ctrl-C stops).
        #[arg(long)]
        serve: bool,
    },
}

#[derive(Args, Debug)]
struct ProxyArgs {
    /// Envoy v3 bootstrap file (YAML or JSON).
    #[arg(short, long, env = "FERRY_CONFIG")]
    config: PathBuf,
    /// Worker threads (Envoy's --concurrency); default: one per CPU.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Admin address; default: the bootstrap's `admin.address`, else 127.0.0.1:15000.
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Readiness endpoint (`/healthz/ready`) address, or `off`.
    #[arg(long, default_value = "0.0.0.0:15021")]
    ready_addr: String,
    /// Prometheus endpoint (`/stats/prometheus`, Istio's port) address, or `off`.
    #[arg(long, default_value = "0.0.0.0:15090")]
    prometheus_addr: String,
    /// How long in-flight requests may finish after SIGTERM (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// How a drain sequence (`POST /drain_listeners?graceful`) closes HTTP
    /// connections, as Envoy's `--drain-strategy`: `immediate` (each
    /// response closes its connection; what istio-agent asks of Envoy, the
    /// default) or `gradual` (with a chance growing over the drain time;
    /// Envoy's own default).
    #[arg(long, default_value = "immediate", value_parser = parse_drain_strategy)]
    drain_strategy: ferry_proxy::drain::Strategy,
    /// Caps protocol detection on listeners that set no limit
    /// (`listener_filters_timeout: 0s`, istiod's setting): a client silent
    /// this long (a server-first protocol) goes on with nothing detected.
    /// Unset: such listeners wait for the client, as Envoy's do.
    #[arg(long, value_parser = parse_duration)]
    protocol_detection_timeout: Option<Duration>,
    /// Log every request (one line each) at info level on target `access`.
    #[arg(long)]
    access_log: bool,
    /// Node id sent to the xDS server (default: the bootstrap's, else
    /// `sidecar~$INSTANCE_IP~$POD_NAME.$POD_NAMESPACE~$POD_NAMESPACE.svc.cluster.local`).
    #[arg(long)]
    node_id: Option<String>,
    /// Node cluster sent to the xDS server.
    #[arg(long)]
    node_cluster: Option<String>,
    /// Node metadata `KEY=VALUE` (repeatable); `ISTIO_META_KEY` variables add to it too.
    #[arg(long = "node-meta", value_parser = parse_kv)]
    node_meta: Vec<(String, String)>,
    /// Log filter (`info`, `debug`, `ferry_proxy=debug`, …); RUST_LOG wins.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// The mesh CA (`host:port`, istiod's 15012 or ferry-pilot's ADS port):
    /// when set, the workload certificate (`default`) and root (`ROOTCA`)
    /// come from it, renewed at half their lifetime, as istio-agent does.
    #[arg(long, env = "CA_ADDR")]
    ca_addr: Option<String>,
    /// Speak TLS to the CA, trusting this root certificate (PEM).
    #[arg(long, env = "FERRY_CA_ROOT_CERT")]
    ca_root_cert: Option<PathBuf>,
    /// A token file sent to the CA as `authorization: Bearer` (istiod checks
    /// the pod's service account token).
    #[arg(long)]
    ca_token_file: Option<PathBuf>,
    /// Trust domain of the workload's SPIFFE identity.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime asked for the workload certificate.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// The agent's status server (`/healthz/ready`, `/app-health/…`, merged
    /// `/stats/prometheus`, `/quitquitquit`, `/drain`), or `off`.
    #[arg(long, default_value = "0.0.0.0:15020")]
    status_addr: String,
    /// The application's rewritten probes (JSON, written by the injector).
    #[arg(long, env = "ISTIO_KUBE_APP_PROBERS", hide_env_values = true)]
    app_probers: Option<String>,
    /// The application's Prometheus annotations (JSON, written by the injector).
    #[arg(long, env = "ISTIO_PROMETHEUS_ANNOTATIONS", hide_env_values = true)]
    prometheus_annotations: Option<String>,
    /// At SIGTERM, drain then exit once no connection is open, without a deadline.
    #[arg(long, env = "EXIT_ON_ZERO_ACTIVE_CONNECTIONS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = ferry_proxy::iptables::parse_go_bool)]
    exit_on_zero_active_connections: bool,
    /// The agent's DNS proxy on --dns-addr (UDP and TCP), answering from the
    /// control plane's name table and forwarding the rest to the resolvers
    /// of --resolv-conf (istio-agent's `ISTIO_META_DNS_CAPTURE`).
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = ferry_proxy::iptables::parse_go_bool)]
    dns_capture: bool,
    /// Where the DNS proxy listens.
    #[arg(long, default_value = "127.0.0.1:15053")]
    dns_addr: SocketAddr,
    /// The pod's resolver configuration (upstream servers and search domains).
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// The proxy's DNS domain (default `$POD_NAMESPACE.svc.cluster.local`).
    #[arg(long)]
    domain: Option<String>,
    /// The drain period before active connections are checked (with
    /// --exit-on-zero-active-connections).
    #[arg(long, env = "MINIMUM_DRAIN_DURATION", default_value = "5s", value_parser = parse_duration)]
    minimum_drain_duration: Duration,
}

#[derive(Args, Debug)]
struct WaitArgs {
    /// The readiness URL polled.
    #[arg(long, default_value = "http://localhost:15020/healthz/ready")]
    url: String,
    /// How long to wait before failing.
    #[arg(
        long = "timeoutSeconds",
        alias = "timeout-seconds",
        default_value_t = 60
    )]
    timeout_seconds: u64,
    /// How long to wait between attempts.
    #[arg(long = "periodMillis", alias = "period-millis", default_value_t = 500)]
    period_millis: u64,
    /// The limit on each attempt.
    #[arg(
        long = "requestTimeoutMillis",
        alias = "request-timeout-millis",
        default_value_t = 500
    )]
    request_timeout_millis: u64,
}

#[derive(Args, Debug)]
struct RequestArgs {
    /// The local port asked (the status port in Istio's injected hooks).
    #[arg(long = "debug-port", default_value_t = 15000)]
    debug_port: u16,
    /// The HTTP method (GET, POST).
    method: String,
    /// The path, with or without a leading `/` (e.g. `drain`, `quitquitquit`).
    path: String,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// `5s`, `250ms`, `24h`, `1h30m` (Go's and Istio's forms, which humantime
/// reads).
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e} (use e.g. 5s, 250ms)"))
}

fn init_logging(level: &str) {
    use tracing_subscriber::prelude::*;
    let directive = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| level.to_string());
    // The filter is reloadable: admin `POST /logging` changes it at run time.
    tracing_subscriber::registry()
        .with(ferry_proxy::admin::logging::layer(&directive))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .init();
}

fn parse_drain_strategy(s: &str) -> Result<ferry_proxy::drain::Strategy, String> {
    match s {
        "immediate" => Ok(ferry_proxy::drain::Strategy::Immediate),
        "gradual" => Ok(ferry_proxy::drain::Strategy::Gradual),
        other => Err(format!("{other:?}: expected `immediate` or `gradual`")),
    }
}

fn proxy(args: ProxyArgs, proxy_type: &str) -> anyhow::Result<()> {
    // (`proxy_type` also decides what termination drains.)
    init_logging(&args.log_level);
    let addr_or_off = |flag: &str, v: &str| match v {
        "off" | "" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("--{flag}: {a:?} is not an address or `off`")),
    };
    let ready_addr = addr_or_off("ready-addr", &args.ready_addr)?;
    let status_addr = addr_or_off("status-addr", &args.status_addr)?;
    // The pod's IP, where application probes go (the downward API's
    // INSTANCE_IP, as the agent's).
    let pod_ip = std::env::var("INSTANCE_IP")
        .ok()
        .and_then(|ip| ip.trim().parse().ok());
    let prometheus_addr = addr_or_off("prometheus-addr", &args.prometheus_addr)?;
    let threads = args
        .concurrency
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(RunOptions {
        config: args.config,
        admin_addr: args.admin_addr,
        ready_addr,
        prometheus_addr,
        drain_timeout: args.drain_timeout,
        drain_strategy: args.drain_strategy,
        access_log: args.access_log,
        detection_timeout: args.protocol_detection_timeout,
        node: ferry_xds::node::NodeOverrides {
            id: args.node_id,
            cluster: args.node_cluster,
            metadata: args.node_meta,
            proxy_type: proxy_type.to_string(),
        },
        agent: args.ca_addr.map(|ca_addr| ferry_proxy::run::AgentSettings {
            ca_addr,
            ca_root_cert: args.ca_root_cert,
            token_file: args.ca_token_file,
            trust_domain: args.trust_domain,
            cert_ttl: args.cert_ttl,
        }),
        status: status_addr.map(|addr| ferry_proxy::run::StatusSettings {
            addr,
            pod_ip,
            app_probers: args.app_probers,
            prometheus_annotations: args.prometheus_annotations,
        }),
        exit_on_zero_active_connections: args.exit_on_zero_active_connections,
        minimum_drain_duration: args.minimum_drain_duration,
        drain_inbound_only: proxy_type == "sidecar",
        // A gateway has no application to capture DNS for (istio-agent
        // too runs the DNS proxy for sidecars only).
        dns: (args.dns_capture && proxy_type == "sidecar").then(|| {
            let namespace = std::env::var("POD_NAMESPACE").unwrap_or_default();
            ferry_proxy::dns::DnsOptions {
                addr: args.dns_addr,
                resolv_conf: args.resolv_conf,
                domain: args
                    .domain
                    .unwrap_or_else(|| format!("{namespace}.svc.cluster.local")),
                namespace,
            }
        }),
    }))
}

/// One plain HTTP/1.1 request to a local address; the status code and body.
fn local_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

/// `host:port` and path of an `http://` URL; `localhost` is 127.0.0.1.
fn split_url(url: &str) -> anyhow::Result<(std::net::SocketAddr, String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--url: only http:// URLs are supported: {url:?}"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "80"));
    let ip = if host == "localhost" {
        "127.0.0.1"
    } else {
        host.trim_matches(['[', ']'])
    };
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow::anyhow!("--url: bad port in {url:?}"))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| anyhow::anyhow!("--url: the host must be localhost or an IP: {url:?}"))?;
    Ok(((ip, port).into(), format!("/{path}"), authority.to_string()))
}

fn wait(args: WaitArgs) -> anyhow::Result<()> {
    init_logging("info");
    let (addr, path, host) = split_url(&args.url)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    let per_try = Duration::from_millis(args.request_timeout_millis.max(1));
    loop {
        let last = match local_request(addr, "GET", &path, &host, per_try) {
            Ok((200, _)) => {
                tracing::info!(url = %args.url, "the sidecar is ready");
                return Ok(());
            }
            Ok((code, _)) => format!("status {code}"),
            Err(e) => e.to_string(),
        };
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "timeout waiting for the sidecar to be ready after {}s ({}: {last})",
                args.timeout_seconds,
                args.url
            );
        }
        std::thread::sleep(Duration::from_millis(args.period_millis));
    }
}

fn request(args: RequestArgs) -> anyhow::Result<()> {
    let method = args.method.to_ascii_uppercase();
    let path = if args.path.starts_with('/') {
        args.path.clone()
    } else {
        format!("/{}", args.path)
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.debug_port));
    let (code, body) = local_request(
        addr,
        &method,
        &path,
        &format!("localhost:{}", args.debug_port),
        Duration::from_secs(10),
    )?;
    std::io::Write::write_all(&mut std::io::stdout(), body.as_bytes())?;
    if !(200..300).contains(&code) {
        anyhow::bail!("{method} {path}: status {code}");
    }
    Ok(())
}

fn demo(serve: bool) -> anyhow::Result<()> {
    init_logging("warn,access=info");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(ferry_proxy::demo::demo(serve))
}

/// mimalloc reads its options when it first allocates, which is before
/// `main`. A sidecar runs in every pod, so its heap should be committed as it
/// is used rather than a whole arena committed up front: the option is put
/// in the environment and the
/// process image is started again (same pid, same arguments) with them.
#[cfg(feature = "mimalloc")]
fn ensure_allocator_options() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .exec();
    // `exec` only returns when it failed: run with the defaults then.
    drop(err);
}

/// The command line, with the help of the flags whose defaults depend on
/// the command said for each: `ProxyArgs` is shared, but a gateway's node
/// is a `router`, not a `sidecar`.
fn parse_cli() -> Cli {
    let command = Cli::command().mut_subcommand("gateway", |c| {
        c.mut_arg("node_id", |a| {
            a.help(
                "Node id sent to the xDS server (default: the bootstrap's, else \
                 `router~$INSTANCE_IP~$POD_NAME.$POD_NAMESPACE~$POD_NAMESPACE.svc.cluster.local`)",
            )
        })
        .mut_arg("dns_capture", |a| {
            a.help("Ignored by gateways: the DNS proxy runs for sidecars only, as istio-agent's")
        })
    });
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}

/// An error and its causes on one line. Many errors name their cause in
/// their own message too (`cannot read F: No such file…`), so a cause
/// whose text is already there is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn main() -> ExitCode {
    #[cfg(feature = "mimalloc")]
    ensure_allocator_options();
    let cli = parse_cli();
    let result = match cli.command {
        Command::Sidecar(a) => proxy(a, "sidecar"),
        Command::Gateway(a) => proxy(a, "router"),
        Command::Iptables(a) => ferry_proxy::iptables::run(&a).map_err(anyhow::Error::from),
        Command::Wait(a) => wait(a),
        Command::Request(a) => request(a),
        Command::Demo { serve } => demo(serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
