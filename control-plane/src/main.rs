//! The `ferry-pilot` binary: serves Envoy v3 configuration over ADS.
//! `replay` serves what an Envoy `/config_dump` shows (a real control
//! plane's output, re-served); `serve-static` serves the static listeners and
//! clusters of an Envoy bootstrap over xDS; `demo` runs bookinfo on a local
//! mesh ([`demo`]) and `apply` changes a watched configuration directory.

mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_pilot::replay::{self, ReplayOptions, Resources};
use ferry_pilot::xds::{self, Cache, Server};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "ferry-pilot",
    version,
    about = "Ferry's control plane: an Envoy v3 ADS server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (`info`, `debug`, `ferry_pilot=debug`, …); RUST_LOG wins.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serves every listener, cluster, route configuration, endpoint
    /// assignment and secret of an Envoy `/config_dump` over ADS. SIGHUP
    /// reads the dump again and pushes the types that changed.
    Replay {
        /// The dump (`envoy.admin.v3.ConfigDump` JSON, e.g. from
        /// `/config_dump?include_eds`).
        #[arg(long)]
        dump: PathBuf,
        /// Leave out the dump's static resources (its bootstrap's).
        #[arg(long)]
        dynamic_only: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Serves Istio configuration (a directory of YAML, watched for
    /// changes) over ADS: each proxy gets what istiod would send it.
    Serve {
        /// Directory of Kubernetes and Istio YAML.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        mesh: MeshArgs,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Serves Istio configuration read from the Kubernetes API (in-cluster
    /// service account or `KUBECONFIG`), watched for changes.
    #[cfg(feature = "kube")]
    ServeKube {
        #[command(flatten)]
        mesh: MeshArgs,
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        webhook: WebhookArgs,
    },
    /// Adds the sidecar and the init container to every workload of a
    /// Kubernetes YAML file, like `istioctl kube-inject`; prints the result.
    Inject {
        /// The YAML file (`-` for standard input).
        #[arg(short, long)]
        filename: PathBuf,
        #[command(flatten)]
        inject: InjectArgs,
    },
    /// What a request would get from a pod's proxy, and why, from the
    /// configuration ferry-pilot would send it: listener, filter chain,
    /// virtual host, route (and why earlier ones did not match), weighted
    /// choice, cluster, endpoints, retry and timeout policy, RBAC and JWT
    /// verdicts. Prints the same JSON as the proxy's `/explain`.
    Explain(ExplainArgs),
    /// Validates a directory of Istio configuration like `istioctl analyze`;
    /// exits non-zero on errors.
    Analyze {
        /// Directory (or file) of Kubernetes and Istio YAML.
        dir: PathBuf,
        /// Also check what depends on the mesh configuration (the
        /// extension providers of CUSTOM AuthorizationPolicies).
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Runs bookinfo on a local mesh (network-namespace pods, no
    /// Kubernetes): ferry-pilot, a `ferry sidecar` per workload with STRICT
    /// mTLS, `ferry gateway`; walks Istio's first steps, then serves until
    /// Ctrl-C and removes everything it created. Needs root, `ip`,
    /// `iptables` and `python3`.
    Demo {
        /// Run this directory of Kubernetes and Istio YAML instead of the
        /// built-in bookinfo (checked first as `analyze` does).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Host port (on 127.0.0.1) forwarded to the ingress gateway; a free
        /// one when taken, any free one with 0.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Where the demo keeps its configuration directory, bootstraps and
        /// logs (removed when it stops).
        #[arg(long, default_value = demo::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Applies the objects of a YAML file to a watched configuration
    /// directory, like `kubectl apply`: each replaces the object of the
    /// same kind, namespace and name; checked first, nothing written on an
    /// error.
    Apply {
        /// The YAML file (`-` for standard input).
        #[arg(short, long)]
        filename: PathBuf,
        /// The directory `ferry-pilot serve --config` watches (by default
        /// the running demo's).
        #[arg(long, default_value = "/run/ferry-demo/config")]
        config: PathBuf,
    },
    /// Serves the static listeners, clusters and secrets of an Envoy
    /// bootstrap over ADS (SIGHUP reads it again, as `replay`).
    ServeStatic {
        /// Envoy v3 bootstrap (YAML or JSON).
        #[arg(long)]
        bootstrap: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

/// What injection puts into pods (`inject`, and the webhook of
/// `serve-kube`).
#[derive(Args, Debug, Clone)]
struct InjectArgs {
    /// The sidecar image (`ferry`).
    #[arg(long, default_value = "ferry-proxy:latest")]
    proxy_image: String,
    /// The init container image (`ferry iptables`).
    #[arg(long, default_value = "ferry-init:latest")]
    init_image: String,
    /// `host:port` of the control plane's xDS and CA port.
    #[arg(long, default_value = "ferry-pilot.istio-system.svc:15010")]
    discovery_address: String,
    /// The mesh default of `holdApplicationUntilProxyStarts` (a pod's
    /// `proxy.istio.io/config` wins).
    #[arg(long)]
    hold_application_until_proxy_starts: bool,
    /// Inject native sidecar containers (a pod's
    /// `sidecar.istio.io/nativeSidecar` wins).
    #[arg(long)]
    native_sidecars: bool,
}

impl InjectArgs {
    fn options(&self) -> ferry_pilot::inject::InjectOptions {
        ferry_pilot::inject::InjectOptions {
            proxy_image: self.proxy_image.clone(),
            init_image: self.init_image.clone(),
            discovery_address: self.discovery_address.clone(),
            hold_application_until_proxy_starts: self.hold_application_until_proxy_starts,
            native_sidecars: self.native_sidecars,
        }
    }
}

/// The sidecar injection webhook (`AdmissionReview` v1 over HTTPS).
#[cfg(feature = "kube")]
#[derive(Args, Debug)]
struct WebhookArgs {
    /// Serve the injection webhook (`POST /inject`) here, over HTTPS
    /// (istiod's port is 15017); off when absent.
    #[arg(long)]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's certificate chain (PEM); without it the mesh CA makes
    /// one for --webhook-dns-name, renewed at half its lifetime, and its
    /// root (--ca-root-out) is the webhook configuration's caBundle.
    #[arg(long, requires = "webhook_key")]
    webhook_cert: Option<PathBuf>,
    /// The private key (PEM) of --webhook-cert.
    #[arg(long, requires = "webhook_cert")]
    webhook_key: Option<PathBuf>,
    /// DNS name of the certificate the CA makes (repeatable): the
    /// Service the API server calls.
    #[arg(long, default_values_t = ["ferry-pilot.istio-system.svc".to_string()])]
    webhook_dns_name: Vec<String>,
    /// The MutatingWebhookConfiguration whose webhooks' caBundle is kept at
    /// the mesh CA's root (istiod keeps `istio-sidecar-injector`'s); not
    /// with --webhook-cert.
    #[arg(long, conflicts_with = "webhook_cert")]
    webhook_config: Option<String>,
    #[command(flatten)]
    inject: InjectArgs,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    /// Directory of Kubernetes and Istio YAML (as `serve --config`).
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    mesh: MeshArgs,
    /// The pod whose proxy answers: NAME or NAME.NAMESPACE.
    #[arg(long, required_unless_present = "label")]
    pod: Option<String>,
    /// The pod's namespace (when --pod does not name it).
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// A workload label KEY=VALUE (repeatable): the workload of a pod with
    /// these labels, when no --pod is given.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    label: Vec<String>,
    /// The pod runs an ingress gateway (a `router` node), not a sidecar.
    #[arg(long)]
    gateway: bool,
    /// The request's method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// The request's authority (Host); `ip:port` also names the destination.
    #[arg(long)]
    authority: Option<String>,
    #[arg(long, default_value = "/")]
    path: String,
    /// A request header NAME:VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    header: Vec<String>,
    /// The client's address, ip:port.
    #[arg(long)]
    source: Option<String>,
    /// The address the client connects to, ip:port (before any redirect).
    #[arg(long)]
    destination: Option<String>,
    /// Explain from this listener instead of by destination.
    #[arg(long)]
    listener: Option<String>,
    /// The connection is TLS with this SNI.
    #[arg(long)]
    sni: Option<String>,
    /// The client certificate's URI SAN (a SPIFFE identity): the
    /// connection is mutual TLS.
    #[arg(long)]
    principal: Option<String>,
    /// TLS ALPN protocols the client offers, comma-separated.
    #[arg(long)]
    alpn: Option<String>,
    /// Whether the connection is TLS (implied by --sni and --principal).
    #[arg(long)]
    tls: Option<bool>,
    /// `http/1.0`, `http/1.1` or `h2c`: what the HTTP inspector sees.
    #[arg(long)]
    protocol: Option<String>,
}

impl ExplainArgs {
    /// The request as `/explain`'s query parameters.
    fn query(&self) -> Vec<(String, String)> {
        let mut q = vec![
            ("method".to_string(), self.method.clone()),
            ("path".to_string(), self.path.clone()),
        ];
        let mut opt = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                q.push((k.to_string(), v.clone()));
            }
        };
        opt("authority", &self.authority);
        opt("source", &self.source);
        opt("destination", &self.destination);
        opt("listener", &self.listener);
        opt("sni", &self.sni);
        opt("principal", &self.principal);
        opt("alpn", &self.alpn);
        opt("protocol", &self.protocol);
        opt("tls", &self.tls.map(|t| t.to_string()));
        q.extend(
            self.header
                .iter()
                .map(|h| ("header".to_string(), h.clone())),
        );
        q
    }
}

/// `ferry-pilot explain`: prints the explanation as JSON.
fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    use ferry_pilot::explain::{Subject, explain, proxy_for};
    use ferry_pilot::istio::source::load_dir;
    use ferry_pilot::istio::translate::Mesh;
    let snapshot = load_dir(&args.config).with_context(|| format!("{}", args.config.display()))?;
    let mesh = Mesh::new(&snapshot, args.mesh.options()?);
    let (pod, namespace) = match args.pod.as_deref().map(|p| p.split_once('.')) {
        Some(Some((pod, ns))) => (Some(pod.to_string()), ns.to_string()),
        Some(None) => (args.pod.clone(), args.namespace.clone()),
        None => (None, args.namespace.clone()),
    };
    let mut labels = std::collections::BTreeMap::new();
    for l in &args.label {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label: expected KEY=VALUE, got {l:?}"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let subject = Subject {
        pod,
        namespace,
        labels,
        gateway: args.gateway,
    };
    let proxy = proxy_for(&mesh, &subject)?;
    let who = match &subject.pod {
        Some(p) => format!("pod {p}.{}", subject.namespace),
        None => format!(
            "the workload labelled {:?} in {}",
            subject.label_text(),
            subject.namespace
        ),
    };
    if subject.pod.is_some() && proxy.ips.is_empty() {
        anyhow::bail!("no {who} in {}", args.config.display());
    }
    let config = mesh.proxy_config(&proxy);
    let answer = explain(&config, &who, &args.query())?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(&answer)?)?;
    Ok(())
}

#[derive(Args, Debug)]
struct MeshArgs {
    /// istiod's mesh configuration (the `mesh` YAML of the `istio`
    /// ConfigMap): trustDomain, trustDomainAliases, rootNamespace,
    /// outboundTrafficPolicy, the extensionProviders of CUSTOM
    /// AuthorizationPolicies and of the Telemetry API, defaultProviders,
    /// enableTracing, defaultConfig.tracing and the access log settings.
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// Ambient mode, as istiod's PILOT_ENABLE_AMBIENT: every sidecar and
    /// gateway gets `connect_originate` (listener and cluster), endpoints
    /// of pods labelled `istio.io/dataplane-mode: ambient` or
    /// `networking.istio.io/tunnel: http` are reached over HBONE, and
    /// sidecars whose node says ENABLE_HBONE accept HBONE on 15008.
    #[arg(long, env = "PILOT_ENABLE_AMBIENT")]
    ambient: bool,
    /// With --ambient, HBONE even to endpoints that take Istio mTLS, as
    /// istiod's PILOT_PREFER_SENDING_HBONE.
    #[arg(long, env = "PILOT_PREFER_SENDING_HBONE")]
    prefer_sending_hbone: bool,
}

impl MeshArgs {
    fn options(&self) -> anyhow::Result<ferry_pilot::istio::translate::MeshOptions> {
        let mut options = self.mesh_options()?;
        options.ambient = self.ambient;
        options.prefer_hbone_send = self.ambient && self.prefer_sending_hbone;
        Ok(options)
    }

    fn mesh_options(&self) -> anyhow::Result<ferry_pilot::istio::translate::MeshOptions> {
        use ferry_pilot::istio::translate::MeshOptions;
        use ferry_pilot::istio::types::mesh::MeshConfig;
        let Some(path) = &self.mesh_config else {
            return Ok(MeshOptions::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--mesh-config {}", path.display()))?;
        let cfg: MeshConfig = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("--mesh-config {}", path.display()))?;
        let options = MeshOptions::from_mesh_config(&cfg);
        let problems = options.telemetry_problems();
        if !problems.is_empty() {
            anyhow::bail!("--mesh-config {}:\n{}", path.display(), problems.join("\n"));
        }
        Ok(options)
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address of the plaintext ADS (gRPC) server.
    #[arg(long, default_value = "127.0.0.1:15010")]
    listen: SocketAddr,
    /// Address of the HTTP status endpoint (`/debug/syncz`, `/debug/cache`).
    #[arg(long)]
    status_addr: Option<SocketAddr>,
    /// Serve ADS over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// The mesh CA's root certificate (PEM, istiod's `ca-cert.pem`); a
    /// self-signed root is generated when absent.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Write the CA's root certificate (PEM) here, for clients that must
    /// trust it.
    #[arg(long)]
    ca_root_out: Option<PathBuf>,
    /// Lifetime of workload certificates whose request names none, in
    /// seconds (istiod's DEFAULT_WORKLOAD_CERT_TTL: 24h).
    #[arg(long, default_value_t = 86_400)]
    cert_ttl_secs: u64,
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reads the resources `replay` and `serve-static` serve, again at each
/// SIGHUP.
type Loader = Box<dyn Fn() -> anyhow::Result<Resources> + Send>;

async fn serve(load: Loader, args: ServeArgs) -> anyhow::Result<()> {
    let cache = Cache::new();
    let resources = load()?;
    resources.load_into(&cache);
    log_loaded(&resources);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let cache = cache.clone();
        tokio::spawn(async move {
            let mut current = resources;
            while hup.recv().await.is_some() {
                // Only the types whose resources changed get a new version,
                // so an endpoint-only change is an EDS-only push.
                match load() {
                    Ok(next) => {
                        for ((url, old), (_, new)) in
                            current.by_type().into_iter().zip(next.by_type())
                        {
                            if old != new {
                                let version = cache.set(url, new.iter().cloned());
                                tracing::info!(xds.type_url = url, xds.version = %version, "reloaded");
                            }
                        }
                        log_loaded(&next);
                        current = next;
                    }
                    Err(e) => {
                        tracing::error!(error = %error_chain(&e), "reload failed: keeping what is served")
                    }
                }
            }
        });
    }
    serve_with(Server::new(cache), args).await
}

fn log_loaded(resources: &Resources) {
    tracing::info!(
        replay.listeners = resources.listeners.len(),
        replay.clusters = resources.clusters.len(),
        replay.routes = resources.routes.len(),
        replay.endpoints = resources.endpoints.len(),
        replay.secrets = resources.secrets.len(),
        "resources loaded"
    );
}

/// The certificate service of the mesh: the CA's root from files or
/// generated, callers known by their pod's address in `pilot`'s registry.
fn ca_service(
    args: &ServeArgs,
    pilot: &Arc<ferry_pilot::pilot::Pilot>,
    trust_domain: &str,
) -> anyhow::Result<(ferry_pilot::ca::CaService, Arc<ferry_pilot::ca::Ca>)> {
    use ferry_pilot::ca::{Ca, CaService};
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))
            };
            Ca::from_pem(&read(cert)?, &read(key)?, trust_domain)
                .with_context(|| format!("--ca-cert {}", cert.display()))?
        }
        _ => Ca::generate(trust_domain)?,
    }
    .with_default_ttl(std::time::Duration::from_secs(args.cert_ttl_secs));
    if let Some(out) = &args.ca_root_out {
        std::fs::write(out, ca.root_pem())
            .with_context(|| format!("--ca-root-out {}", out.display()))?;
    }
    tracing::info!(ca.trust_domain = %trust_domain, ca.generated = args.ca_cert.is_none(), "certificate authority ready");
    let ca = Arc::new(ca);
    pilot.set_ca(ca.clone());
    let pilot = pilot.clone();
    let by_ip = {
        let ca = ca.clone();
        Arc::new(move |ip| pilot.workload_at(ip).map(|(ns, sa)| ca.identity(&ns, &sa)))
    };
    Ok((CaService::new(ca.clone(), by_ip), ca))
}

/// Translates `snapshot` (the first listing of `source`), follows the
/// source's changes and serves each proxy's configuration over ADS, with
/// the mesh CA (CSRs, and certificates over SDS for proxies without an
/// agent).
/// `with_ca` starts what else needs the mesh CA (the webhook's certificate).
async fn serve_pilot(
    snapshot: &ferry_pilot::istio::source::Snapshot,
    source: Arc<dyn ferry_pilot::istio::source::Source>,
    options: ferry_pilot::istio::translate::MeshOptions,
    args: ServeArgs,
    with_ca: impl FnOnce(Arc<ferry_pilot::ca::Ca>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let trust_domain = options.trust_domain.clone();
    let pilot = Arc::new(ferry_pilot::pilot::Pilot::new(snapshot, options)?);
    tracing::info!(config.resources = snapshot.resources.len(), config.source = %source.describe(), "configuration loaded");
    tokio::spawn(
        pilot
            .clone()
            .follow(source, std::time::Duration::from_millis(100)),
    );
    let (ca, root) = ca_service(&args, &pilot, &trust_domain)?;
    with_ca(root)?;
    let resolver = {
        let pilot = pilot.clone();
        Arc::new(
            move |node: &envoy_types::pb::envoy::config::core::v3::Node,
                  peer: Option<std::net::SocketAddr>| {
                pilot.cache_for_peer(node, peer.map(|p| p.ip()))
            },
        )
    };
    // Certificates served over SDS are renewed at half their lifetime.
    {
        let pilot = pilot.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                pilot.renew_certificates();
            }
        });
    }
    let server = Server::per_node(Cache::new(), resolver);
    server.set_ca(ca);
    serve_with(server, args).await
}

async fn serve_istio(dir: PathBuf, mesh: MeshArgs, args: ServeArgs) -> anyhow::Result<()> {
    use ferry_pilot::istio::source::{DirectorySource, Source};
    let options = mesh.options()?;
    let source = Arc::new(DirectorySource::new(dir.clone()));
    // Watching starts before the first read: nothing written in between is
    // missed.
    let _poller = source.spawn_poller(std::time::Duration::from_millis(500));
    let snapshot = source
        .list()
        .with_context(|| format!("--config {}", dir.display()))?;
    serve_pilot(&snapshot, source, options, args, |_| Ok(())).await
}

#[cfg(feature = "kube")]
async fn serve_kube(mesh: MeshArgs, args: ServeArgs, webhook: WebhookArgs) -> anyhow::Result<()> {
    use ferry_pilot::istio::kube_source::KubeSource;
    use ferry_pilot::istio::source::Source;
    let options = mesh.options()?;
    let source = KubeSource::connect().await?;
    source.spawn_watchers();
    source.wait_synced().await;
    let snapshot = source.list()?;
    let labels = source.clone();
    let client = source.client();
    let start_webhook = move |ca: Arc<ferry_pilot::ca::Ca>| match webhook.webhook_addr {
        Some(addr) => {
            let labels: ferry_pilot::webhook::NamespaceLabels =
                Arc::new(move |ns: &str| labels.namespace_labels(ns));
            start_webhook(addr, &webhook, ca, labels, client)
        }
        None => Ok(()),
    };
    serve_pilot(&snapshot, source, options, args, start_webhook).await
}

/// Binds the webhook's address and serves it until the process stops.
#[cfg(feature = "kube")]
fn start_webhook(
    addr: SocketAddr,
    args: &WebhookArgs,
    ca: Arc<ferry_pilot::ca::Ca>,
    namespace_labels: ferry_pilot::webhook::NamespaceLabels,
    client: kube::Client,
) -> anyhow::Result<()> {
    use ferry_pilot::webhook::{Injector, ServingCert, serve, tls_config};
    if let Some(name) = &args.webhook_config {
        tokio::spawn(ferry_pilot::webhook::keep_ca_bundle(
            client.clone(),
            name.clone(),
            ca.root_pem().to_string(),
        ));
    }
    let cert = match (&args.webhook_cert, &args.webhook_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("{}", p.display()));
            ServingCert::given(&read(cert)?, &read(key)?)
                .with_context(|| format!("--webhook-cert {}", cert.display()))?
        }
        _ => ServingCert::from_ca(
            ca,
            args.webhook_dns_name.clone(),
            ferry_pilot::ca::MAX_CERT_TTL,
        )?,
    };
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("--webhook-addr {addr}"))?;
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let injector = Arc::new(
        Injector::new(args.inject.options(), namespace_labels).with_bootstrap_config_maps(client),
    );
    tracing::info!(webhook.addr = %addr, webhook.certificate = if args.webhook_cert.is_some() { "given" } else { "mesh CA" }, "injection webhook serving");
    tokio::spawn(serve(
        listener,
        tls_config(Arc::new(cert)),
        injector,
        shutdown_signal(),
    ));
    Ok(())
}

fn analyze(dir: &std::path::Path, mesh: &MeshArgs) -> anyhow::Result<bool> {
    use ferry_pilot::istio::source::load_dir;
    use ferry_pilot::istio::validate::{Severity, validate, validate_mesh};
    let snapshot = load_dir(dir).with_context(|| format!("{}", dir.display()))?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut errors = 0;
    for e in &snapshot.errors {
        errors += 1;
        writeln!(out, "Error {e}")?;
    }
    let mut findings = validate(&snapshot);
    if mesh.mesh_config.is_some() {
        findings.extend(validate_mesh(&snapshot, &mesh.options()?));
    }
    for f in findings {
        if f.severity == Severity::Error {
            errors += 1;
        }
        writeln!(out, "{f}")?;
    }
    if errors == 0 {
        writeln!(
            out,
            "No validation issues found when analyzing {} ({} resources).",
            dir.display(),
            snapshot.resources.len()
        )?;
    }
    Ok(errors == 0)
}

async fn serve_with(server: Server, args: ServeArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = args.status_addr {
        let status = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--status-addr {addr}"))?;
        let mut stop = stop_rx.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let done = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = xds::http::serve_status(server, status, done).await {
                tracing::error!(status.error = %e, "status endpoint failed");
            }
        });
    }
    let signal = async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    };
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("{}", p.display()));
            let tls = xds::ServerTls {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
                client_ca_pem: args.tls_client_ca.as_ref().map(read).transpose()?,
            };
            server.serve_tls(listener, &tls, signal).await?;
        }
        _ => server.serve(listener, signal).await?,
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(&cli.log_level);
    let (load, args): (Loader, ServeArgs) = match cli.command {
        Command::Replay {
            dump,
            dynamic_only,
            serve,
        } => {
            let opts = ReplayOptions {
                include_static: !dynamic_only,
            };
            (
                Box::new(move || Ok(replay::load_config_dump(&dump, opts)?)),
                serve,
            )
        }
        Command::ServeStatic { bootstrap, serve } => (
            Box::new(move || Ok(replay::load_bootstrap(&bootstrap)?)),
            serve,
        ),
        Command::Serve {
            config,
            mesh,
            serve,
        } => {
            return tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(serve_istio(config, mesh, serve));
        }
        #[cfg(feature = "kube")]
        Command::ServeKube {
            mesh,
            serve,
            webhook,
        } => {
            return tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(serve_kube(mesh, serve, webhook));
        }
        Command::Inject { filename, inject } => {
            use std::io::Read;
            let text = if filename.as_os_str() == "-" {
                let mut t = String::new();
                std::io::stdin().read_to_string(&mut t)?;
                t
            } else {
                std::fs::read_to_string(&filename)
                    .with_context(|| format!("{}", filename.display()))?
            };
            let out = ferry_pilot::inject::inject(&text, &inject.options())
                .with_context(|| format!("{}", filename.display()))?;
            use std::io::Write;
            std::io::stdout().write_all(out.as_bytes())?;
            return Ok(());
        }
        Command::Demo {
            config,
            port,
            state_dir,
        } => {
            return demo::run(demo::DemoArgs {
                config,
                port,
                state_dir,
            });
        }
        Command::Apply { filename, config } => {
            use std::io::{Read, Write};
            if !config.is_dir() {
                anyhow::bail!(
                    "no configuration directory at {}: start `ferry-pilot demo` first, or give \
                     --config DIR (the directory `ferry-pilot serve --config` watches)",
                    config.display()
                );
            }
            let text = if filename.as_os_str() == "-" {
                let mut t = String::new();
                std::io::stdin().read_to_string(&mut t)?;
                t
            } else {
                std::fs::read_to_string(&filename)
                    .with_context(|| format!("{}", filename.display()))?
            };
            let applied = ferry_pilot::istio::apply::apply(&config, &text, &filename)?;
            let mut out = std::io::stdout().lock();
            for a in applied {
                writeln!(out, "{a}")?;
            }
            return Ok(());
        }
        Command::Explain(args) => return explain(&args),
        Command::Analyze { dir, mesh } => {
            if analyze(&dir, &mesh)? {
                return Ok(());
            }
            anyhow::bail!("{}: configuration has errors", dir.display());
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(load, args))
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
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-pilot: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
