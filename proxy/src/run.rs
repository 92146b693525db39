//! Runtime wiring: load the configuration, bind every listener, serve admin
//! and readiness, then run until SIGTERM/SIGINT or `/quitquitquit` and drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use ferry_model::Snapshot;
use tokio::sync::Notify;

use crate::cluster::ClusterManager;
use crate::drain::Drain;
use crate::stats::{Counter, HttpStats, Stats, TcpStats};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Overrides the bootstrap's admin address.
    pub admin_addr: Option<SocketAddr>,
    /// Where `/healthz/ready` is served; `None` disables it.
    pub ready_addr: Option<SocketAddr>,
    /// Where `/stats/prometheus` is served besides the admin port (Istio's
    /// 15090); `None` disables it.
    pub prometheus_addr: Option<SocketAddr>,
    pub drain_timeout: Duration,
    /// How a drain sequence (`drain_listeners?graceful`) closes HTTP
    /// connections (Envoy's `--drain-strategy`).
    pub drain_strategy: crate::drain::Strategy,
    pub access_log: bool,
    /// The operator's cap on protocol detection for listeners that set no
    /// limit (`listener_filters_timeout: 0s`); `None`: they wait as Envoy's.
    pub detection_timeout: Option<Duration>,
    /// The node identity's flags (the environment is read too).
    pub node: ferry_xds::node::NodeOverrides,
    /// Workload certificates from the mesh CA (istio-agent's job); `None`:
    /// the configuration's secrets come from the xDS server or the file.
    pub agent: Option<AgentSettings>,
    /// The agent's status server (15020); `None` disables it.
    pub status: Option<StatusSettings>,
    /// Shutdown as istio-agent's `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`: after
    /// SIGTERM, drain for `minimum_drain_duration`, then exit as soon as no
    /// connection is open (checked every second), however long that takes.
    pub exit_on_zero_active_connections: bool,
    /// istio-agent's `MINIMUM_DRAIN_DURATION` (5 s by default).
    pub minimum_drain_duration: Duration,
    /// The agent's DNS proxy (`ISTIO_META_DNS_CAPTURE`); `None`: off.
    pub dns: Option<crate::dns::DnsOptions>,
    /// Termination drains the inbound listeners only (a sidecar, as
    /// istio-agent asks Envoy: `drain_listeners?inboundonly`); outbound
    /// ones keep serving the app until the process exits.
    pub drain_inbound_only: bool,
}

/// The status server's address and what the injector passed to it.
#[derive(Debug, Clone)]
pub struct StatusSettings {
    pub addr: SocketAddr,
    /// The pod's IP (`INSTANCE_IP`), where application probes are sent.
    pub pod_ip: Option<std::net::IpAddr>,
    /// `ISTIO_KUBE_APP_PROBERS`.
    pub app_probers: Option<String>,
    /// `ISTIO_PROMETHEUS_ANNOTATIONS`.
    pub prometheus_annotations: Option<String>,
}

/// How the in-process agent reaches the CA.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `host:port` of the CA (istio-agent's `CA_ADDR`).
    pub ca_addr: String,
    /// Speak TLS to the CA, trusting this root (PEM file).
    pub ca_root_cert: Option<PathBuf>,
    /// A bearer token file sent to the CA (the pod's service account token).
    pub token_file: Option<PathBuf>,
    pub trust_domain: String,
    pub cert_ttl: Duration,
}

/// Starts the agent for the node's identity and waits (a few seconds at
/// most) for its first certificate, so the first configuration finds it.
async fn start_agent(
    settings: &AgentSettings,
    ads: &ferry_xds::ads::AdsConfig,
) -> anyhow::Result<(
    Arc<ferry_xds::sds::AgentSds>,
    tokio::sync::watch::Receiver<ferry_xds::ads::LocalSecrets>,
)> {
    use ferry_model::tls::{CommonTls, Secret, SecretSource, UpstreamTls, ValidationContext};
    // The node metadata as the metrics read it: namespace, service
    // account, cluster id.
    let local = crate::metrics::Workload::from_metadata(
        &ads.node.metadata.clone().unwrap_or_default(),
        &ads.node.id,
        &settings.trust_domain,
    );
    if local.namespace.is_empty() {
        anyhow::bail!(
            "--ca-addr: the node has no namespace (set POD_NAMESPACE or --node-meta NAMESPACE=…)"
        );
    }
    let identity = crate::agent::identity(
        &settings.trust_domain,
        &local.namespace,
        &local.service_account,
    );
    let same_as_xds = ads.target == ferry_xds::ads::XdsTarget::Tcp(settings.ca_addr.clone());
    let tls = match &settings.ca_root_cert {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("--ca-root-cert {}", path.display()))?;
            let host = settings
                .ca_addr
                .rsplit_once(':')
                .map_or(settings.ca_addr.as_str(), |(h, _)| h)
                .to_string();
            Some(UpstreamTls {
                common: CommonTls {
                    validation: Some(SecretSource::Inline(Arc::new(Secret::Validation(
                        ValidationContext {
                            trusted_ca_pem: pem,
                            ..ValidationContext::default()
                        },
                    )))),
                    ..CommonTls::default()
                },
                sni: Some(host),
                ..UpstreamTls::default()
            })
        }
        None if same_as_xds => ads.tls.clone(),
        None => None,
    };
    let token = match &settings.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--ca-token-file {}", p.display()))?,
        ),
        None => None,
    };
    let ca = ferry_xds::ca::CaTarget {
        target: ferry_xds::ads::XdsTarget::Tcp(settings.ca_addr.clone()),
        tls,
        secrets: ads.secrets.clone(),
        token,
        cluster_id: Some(local.cluster).filter(|c| !c.is_empty()),
    };
    tracing::info!(agent.identity = %identity, agent.ca = %settings.ca_addr, "requesting the workload certificate");
    // The agent's secrets: the workload certificate and root it is issued,
    // and the file-mounted ones the configuration names on `sds-grpc`.
    let (sds, mut rx) = ferry_xds::sds::AgentSds::local();
    crate::agent::start(
        crate::agent::AgentOptions {
            ca,
            identity,
            ttl: settings.cert_ttl,
        },
        sds.sender(),
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| s.contains_key(crate::agent::WORKLOAD_SECRET)),
    )
    .await;
    Ok((sds, rx))
}

/// Everything connections share.
pub struct Runtime {
    pub snapshot: ArcSwap<Snapshot>,
    pub clusters: ArcSwap<ClusterManager>,
    /// The live secrets and the TLS configurations built from them.
    pub tls: Arc<crate::tls::TlsContexts>,
    pub stats: Stats,
    /// The process's drain signal (and the count of open connections).
    pub drain: Drain,
    /// The inbound listeners' drain, below the process's.
    pub inbound: Drain,
    /// Which listeners are inbound (`traffic_direction: INBOUND`).
    inbound_listeners: ArcSwap<std::collections::HashSet<String>>,
    drain_inbound_only: bool,
    pub access_log: bool,
    /// See [`RunOptions::detection_timeout`].
    pub detection_timeout: Option<Duration>,
    /// How long draining connections (a changed filter chain or listener,
    /// or shutdown) may finish.
    pub drain_timeout: Duration,
    /// See [`RunOptions::drain_strategy`].
    pub drain_strategy: crate::drain::Strategy,
    /// Shutdown waits for connections to end instead of a deadline.
    pub exit_on_zero_active_connections: bool,
    ready: AtomicBool,
    quit: Notify,
    /// Exit without draining (`/quitquitquit` on the status port, or a
    /// SIGTERM after `/drain`).
    skip_drain: AtomicBool,
    bootstrap: ferry_xds::Bootstrap,
    loaded_at: String,
    http_stats: Mutex<HashMap<String, Arc<HttpStats>>>,
    tcp_stats: Mutex<HashMap<String, TcpStats>>,
    listener_cx: Mutex<HashMap<String, Counter>>,
    pub(crate) listeners: Mutex<crate::listener::ListenerManager>,
    /// The internal listeners, which cluster endpoints connect to in process.
    pub internal: Arc<crate::internal_listener::InternalListeners>,
    /// The open connections and the chains they run on, which each update
    /// measures against the new listener versions.
    pub conns: Arc<crate::filter_chain_update::Connections>,
    /// The ADS client's state, when configuration comes from xDS.
    pub xds: Option<Arc<ferry_xds::ads::XdsState>>,
    /// Istio's standard metrics, for chains with the `istio.stats` filter.
    pub istio: Arc<crate::metrics::IstioMetrics>,
    /// The writers of the configured access logs.
    pub access_logs: crate::access_log::AccessLogManager,
    /// What the admin pages report of the process.
    pub admin: crate::admin::AdminState,
    /// The tracers of the live configuration and their exporters.
    pub tracers: crate::trace::Tracers,
    /// The DNS proxy, when DNS capture is on.
    pub dns: Option<Arc<crate::dns::DnsProxy>>,
}

/// The network RBAC filter counts through the runtime's statistics.
impl AsRef<crate::stats::Stats> for Runtime {
    fn as_ref(&self) -> &crate::stats::Stats {
        &self.stats
    }
}

impl Runtime {
    /// Ready once the first configuration is applied and, with DNS
    /// capture, the first name table has arrived (istio-agent's check), and
    /// not draining.
    pub fn is_ready(&self) -> bool {
        self.is_live() && self.dns.as_ref().is_none_or(|d| d.is_ready())
    }

    /// Envoy's server state: the first configuration applied, not draining.
    pub fn is_live(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.inbound.is_stopped()
            && !self.inbound.sequence_started()
    }

    /// Whether the listener named so is an inbound one.
    pub fn is_inbound(&self, listener: &str) -> bool {
        self.inbound_listeners.load().contains(listener)
    }

    /// The drain signal a listener's accept loop and connections follow.
    pub fn drain_for(&self, listener: &str) -> &Drain {
        if self.is_inbound(listener) {
            &self.inbound
        } else {
            &self.drain
        }
    }

    /// What termination drains: the inbound listeners of a sidecar, every
    /// listener of a gateway or of a configuration that marks no listener
    /// inbound (nothing would drain otherwise).
    pub fn termination_drain(&self) -> &Drain {
        if self.drain_inbound_only && !self.inbound_listeners.load().is_empty() {
            &self.inbound
        } else {
            &self.drain
        }
    }

    /// Asks the process to drain and exit (admin `/quitquitquit`).
    pub fn quit(&self) {
        self.quit.notify_one();
    }

    /// The bootstrap the process started with.
    pub fn bootstrap(&self) -> &ferry_xds::Bootstrap {
        &self.bootstrap
    }

    /// Exits without a drain period (the agent's `/quitquitquit`: the
    /// app is done, nothing is left to wait for).
    pub fn quit_now(&self) {
        self.skip_drain.store(true, Ordering::Release);
        self.quit.notify_one();
    }

    /// Starts draining now and makes the coming SIGTERM exit at once (the
    /// agent's `/drain`, which native sidecars call before termination).
    pub fn drain_now(&self) {
        self.termination_drain().start();
        self.skip_drain.store(true, Ordering::Release);
    }

    /// The names of the inbound listeners, read from the protos as
    /// received (only their `traffic_direction`).
    fn find_inbound_listeners(&self) -> std::collections::HashSet<String> {
        #[derive(Clone, PartialEq, prost::Message)]
        struct Direction {
            #[prost(string, tag = "1")]
            name: String,
            #[prost(int32, tag = "16")]
            traffic_direction: i32,
        }
        const INBOUND: i32 = 1;
        let mut out = std::collections::HashSet::new();
        if let Some(sr) = &self.bootstrap.proto.static_resources {
            for l in &sr.listeners {
                if l.traffic_direction == INBOUND {
                    out.insert(l.name.clone());
                }
            }
        }
        if let Some(xds) = &self.xds {
            let store = xds.store.lock().unwrap_or_else(|p| p.into_inner());
            for (name, entry) in store.of(ferry_xds::store::LISTENER) {
                if <Direction as prost::Message>::decode(entry.raw.as_slice())
                    .is_ok_and(|d| d.traffic_direction == INBOUND)
                {
                    out.insert(name.clone());
                }
            }
        }
        out
    }

    /// The DNS proxy's name table as JSON (`/debug/ndsz`), when it has one.
    pub fn name_table_json(&self) -> Option<String> {
        self.dns.as_ref()?.table_json()
    }

    pub fn config_dump(&self) -> Result<serde_json::Value, String> {
        let mut dump = ferry_xds::config_dump(&self.bootstrap.proto, &self.loaded_at)?;
        if let Some(xds) = &self.xds {
            ferry_xds::dump::add_dynamic(&mut dump, xds)?;
        }
        Ok(dump)
    }

    /// One connection manager's counters, shared by its connections.
    pub fn http_stats(&self, prefix: &str) -> Arc<HttpStats> {
        let mut m = self.http_stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get(prefix) {
            return s.clone();
        }
        m.entry(prefix.to_string())
            .or_insert_with(|| Arc::new(HttpStats::new(&self.stats, prefix)))
            .clone()
    }

    pub fn tcp_stats(&self, prefix: &str) -> TcpStats {
        let mut m = self.tcp_stats.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(prefix.to_string())
            .or_insert_with(|| TcpStats::new(&self.stats, prefix))
            .clone()
    }

    /// `listener.<ip>_<port>.downstream_cx_total`, Envoy's per-address counter.
    pub fn listener_stats(&self, addr: SocketAddr) -> Counter {
        let key = format!("{}_{}", addr.ip(), addr.port());
        let mut m = self.listener_cx.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key)
            .or_insert_with_key(|k| {
                self.stats
                    .counter(&format!("listener.{k}.downstream_cx_total"))
            })
            .clone()
    }

    /// Makes `snapshot` the live configuration: clusters first (keeping the
    /// pools of unchanged endpoints), then the snapshot itself together
    /// with what it does to the open connections (in-place filter-chain
    /// updates: only those on changed chains drain, see
    /// [`crate::filter_chain_update`]), then the bound sockets. Returns the
    /// listeners that could not be bound.
    pub fn apply(self: &Arc<Self>, snapshot: Arc<Snapshot>) -> Vec<(String, std::io::Error)> {
        // Secrets first: a rotated one reaches the next handshake of every
        // listener and cluster, while established connections keep theirs.
        self.tls.update(&snapshot.secrets);
        for (sink, e) in self
            .access_logs
            .prepare(crate::access_log::sinks_of(&snapshot).iter())
        {
            tracing::error!(access_log.sink = ?sink, error = %e, "access log cannot be opened");
        }
        let clusters = ClusterManager::build(
            &snapshot,
            Some(&self.clusters.load()),
            &self.stats,
            &self.tls,
            &self.internal,
        );
        self.clusters.store(Arc::new(clusters));
        self.tracers.update(self, &snapshot);
        // Published under the connections' lock: a connection registering
        // meanwhile sees either the old listeners and is measured below, or
        // the new ones.
        self.inbound_listeners
            .store(Arc::new(self.find_inbound_listeners()));
        let updating = self.conns.updating();
        self.internal.reconcile(&snapshot.listeners);
        self.snapshot.store(snapshot.clone());
        updating.update(&snapshot.listeners, &self.stats);
        // New CRLs (by SDS or in a new chain) close the connections of
        // clients they revoke.
        self.conns.close_revoked(&*self.tls.secrets(), &self.stats);
        let errors = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reconcile(self, &snapshot.listeners);
        tracing::info!(
            config.version = %snapshot.version,
            listeners = snapshot.listeners.len(),
            clusters = snapshot.clusters.len(),
            "configuration applied"
        );
        errors
    }
}

fn rfc3339_now() -> String {
    ferry_xds::dump::timestamp(SystemTime::now())
}

/// Runs the proxy until it is told to stop, then drains.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // One crypto provider for every TLS configuration of the process.
    let _ = ferry_tls::provider();
    let bootstrap = ferry_xds::load_bootstrap(&opts.config)?;
    for w in &bootstrap.warnings.0 {
        tracing::warn!(config.warning = %w, "configuration accepted with a warning");
    }
    // Reading the configuration through the descriptor set allocates a few
    // megabytes that are garbage now: give them back before serving.
    release_free_memory();
    let base = Arc::new(Snapshot {
        version: bootstrap.snapshot.version.clone(),
        listeners: bootstrap.snapshot.listeners.clone(),
        clusters: bootstrap.snapshot.clusters.clone(),
        routes: bootstrap.snapshot.routes.clone(),
        secrets: bootstrap.snapshot.secrets.clone(),
        ..Default::default()
    });
    let admin_addr = opts
        .admin_addr
        .or(bootstrap.admin_address)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15000)));
    let admin_tcp = crate::listener::bind(admin_addr)
        .with_context(|| format!("admin: cannot bind {admin_addr}"))?;
    // istio-agent's bootstrap brings its own readiness (15021) and
    // Prometheus (15090) listeners: where the bootstrap binds a port, its
    // listener serves it and the built-in endpoint stands aside, as Envoy
    // has only the bootstrap's.
    let served_by_bootstrap = |which: &str, addr: Option<SocketAddr>| {
        let a = addr?;
        if let Some(l) = bootstrap.snapshot.listeners.iter().find(|l| {
            l.bind_to_port
                && !l.internal
                && std::iter::once(&l.address)
                    .chain(&l.additional_addresses)
                    .any(|b| b.port() == a.port())
        }) {
            tracing::info!(
                listener.name = %l.name,
                listener.address = %l.address,
                "the bootstrap's listener serves port {}: the built-in {which} endpoint is off",
                a.port()
            );
            return None;
        }
        Some(a)
    };
    let ready_addr = served_by_bootstrap("readiness", opts.ready_addr);
    let prometheus_addr = served_by_bootstrap("Prometheus", opts.prometheus_addr);
    let ready_tcp = match ready_addr {
        Some(a) => {
            Some(crate::listener::bind(a).with_context(|| format!("readiness: cannot bind {a}"))?)
        }
        None => None,
    };
    // The DNS proxy binds before anything serves: a port taken is a
    // start-up error, as for the agent.
    let dns = match &opts.dns {
        Some(d) => {
            let proxy = Arc::new(crate::dns::DnsProxy::new(d)?);
            for addr in proxy.listen_addresses(d.addr) {
                let (udp, tcp) = crate::dns::bind(addr)
                    .await
                    .with_context(|| format!("DNS proxy: cannot bind {addr}"))?;
                tokio::spawn(crate::dns::serve_udp(proxy.clone(), udp));
                tokio::spawn(crate::dns::serve_tcp(proxy.clone(), tcp));
                tracing::info!(dns.address = %addr, "DNS proxy listening");
            }
            Some(proxy)
        }
        None => None,
    };
    let mut ads = bootstrap.ads.clone();
    if let (Some(a), Some(proxy)) = (ads.as_mut(), &dns) {
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        a.name_table = Some(tx);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let t = rx.borrow_and_update().clone();
                if let Some(t) = t {
                    proxy.update(t);
                }
            }
        });
    } else if dns.is_some() {
        tracing::warn!(
            "DNS capture: the bootstrap has no ADS, so no name table arrives; every query is forwarded"
        );
    }
    if let Some(a) = ads.as_mut() {
        let env: Vec<(String, String)> = std::env::vars().collect();
        a.node = ferry_xds::node::build(Some(&a.node), &opts.node, &env);
        if let Some(agent) = &opts.agent {
            let (sds, secrets) = start_agent(agent, a).await?;
            a.local_secrets = Some(secrets);
            a.agent_sds = Some(sds);
        } else if let Some(target) = ferry_xds::bootstrap::agent_sds_target(&bootstrap.proto) {
            // Under istio-agent (no --ca-addr): the agent serves the
            // workload certificate and root on its SDS socket, as to Envoy.
            tracing::info!(sds.target = ?target, "workload secrets from the agent's SDS server");
            // Other names on its `sds-grpc` cluster are fetched as the
            // configuration names them.
            let (agent_sds, secrets) = ferry_xds::sds::AgentSds::start(
                ferry_xds::sds::SdsSource {
                    cluster: ferry_xds::bootstrap::AGENT_SDS_CLUSTER.into(),
                    target,
                    node: a.node.clone(),
                },
                &[crate::agent::WORKLOAD_SECRET, crate::agent::ROOT_SECRET],
            );
            a.local_secrets = Some(secrets);
            a.agent_sds = Some(agent_sds);
        }
    } else if opts.agent.is_some() {
        tracing::warn!("--ca-addr is ignored: the bootstrap has no ADS");
    }
    let xds = ads
        .as_ref()
        .map(|_| Arc::new(ferry_xds::ads::XdsState::default()));
    let stats = Stats::default();
    let istio = {
        let node = ads
            .as_ref()
            .map(|a| a.node.clone())
            .or_else(|| bootstrap.proto.node.clone())
            .unwrap_or_default();
        let trust_domain = opts
            .agent
            .as_ref()
            .map_or("cluster.local", |a| a.trust_domain.as_str());
        let meta = node.metadata.clone().unwrap_or_default();
        let local = crate::metrics::Workload::from_metadata(&meta, &node.id, trust_domain);
        Arc::new(crate::metrics::IstioMetrics::new(
            crate::metrics::LocalNode::new(local, &node.id, trust_domain),
        ))
    };
    let status = match &opts.status {
        Some(st) => {
            let port = st.addr.port();
            let dest = st
                .pod_ip
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            let probes = match &st.app_probers {
                Some(j) if !j.trim().is_empty() => {
                    crate::app_probe::AppProbes::parse(j, dest, port)?
                }
                _ => crate::app_probe::AppProbes::default(),
            };
            let metrics = crate::metrics_merge::MetricsMerge::parse(
                st.prometheus_annotations.as_deref(),
                port,
            )?;
            let tcp = crate::listener::bind(st.addr)
                .with_context(|| format!("status: cannot bind {}", st.addr))?;
            Some((Arc::new(crate::status::Status { probes, metrics }), tcp))
        }
        None => None,
    };
    let prometheus_tcp = match prometheus_addr {
        Some(a) => {
            Some(crate::listener::bind(a).with_context(|| format!("prometheus: cannot bind {a}"))?)
        }
        None => None,
    };
    let access_logs = crate::access_log::AccessLogManager::new(&stats);
    let admin = crate::admin::AdminState {
        started: std::time::Instant::now(),
        node: ads
            .as_ref()
            .map(|a| a.node.clone())
            .or_else(|| bootstrap.proto.node.clone())
            .unwrap_or_default(),
        concurrency: tokio::runtime::Handle::current().metrics().num_workers(),
        config_path: opts.config.display().to_string(),
        drain_timeout: opts.drain_timeout,
        health_check_failed: AtomicBool::new(false),
        drain_sequence: std::sync::atomic::AtomicU8::new(0),
        access_logs: bootstrap.admin_access_logs.clone(),
    };
    let drain = Drain::new();
    let rt = Arc::new(Runtime {
        access_logs,
        admin,
        tracers: Default::default(),
        snapshot: ArcSwap::from_pointee(Snapshot::default()),
        clusters: ArcSwap::from_pointee(ClusterManager::default()),
        tls: Arc::default(),
        stats,
        inbound: drain.child(),
        drain,
        inbound_listeners: ArcSwap::from_pointee(std::collections::HashSet::new()),
        drain_inbound_only: opts.drain_inbound_only,
        access_log: opts.access_log,
        detection_timeout: opts.detection_timeout,
        drain_timeout: opts.drain_timeout,
        drain_strategy: opts.drain_strategy,
        exit_on_zero_active_connections: opts.exit_on_zero_active_connections,
        ready: AtomicBool::new(false),
        quit: Notify::new(),
        skip_drain: AtomicBool::new(false),
        bootstrap,
        loaded_at: rfc3339_now(),
        http_stats: Mutex::new(HashMap::new()),
        tcp_stats: Mutex::new(HashMap::new()),
        listener_cx: Mutex::new(HashMap::new()),
        listeners: Mutex::new(crate::listener::ListenerManager::default()),
        internal: Arc::default(),
        conns: Arc::default(),
        xds: xds.clone(),
        istio,
        dns,
    });
    rt.internal.attach(&rt);
    match (ads, xds) {
        (Some(config), Some(state)) => {
            tracing::info!(xds.target = ?config.target, xds.delta = config.delta, "connecting to the xDS server");
            let (tx, mut rx) = tokio::sync::watch::channel(None);
            tokio::spawn(ferry_xds::ads::run(config, base, state, tx));
            let apply_rt = rt.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let snap = rx.borrow_and_update().clone();
                    if let Some(snap) = snap {
                        // A configuration that changed a few clusters
                        // frees little: the forced collection (which walks
                        // the whole heap) is for the large ones.
                        let small = snap
                            .cluster_changes
                            .as_ref()
                            .is_some_and(|c| c.names.len() < 100);
                        for (name, e) in apply_rt.apply(snap) {
                            tracing::error!(listener.name = %name, error = %e, "listener could not be started");
                        }
                        if !small {
                            release_free_memory();
                        }
                        if !apply_rt.ready.swap(true, Ordering::AcqRel) {
                            tracing::info!("first configuration from xDS applied; ready");
                            release_startup_pages();
                        }
                    }
                }
            });
        }
        _ => {
            // Parsing is over: its code pages go back before anything
            // listens, so the resident set a client first sees is the
            // serving one.
            release_startup_pages();
            // Static configuration: a listener that cannot bind fails start-up.
            if let Some((name, e)) = rt.apply(base).into_iter().next() {
                anyhow::bail!("listener {name:?}: {e}");
            }
            rt.ready.store(true, Ordering::Release);
        }
    }
    // Admin, readiness and metrics run on a runtime of their own.
    crate::admin::start(rt.clone(), admin_tcp, ready_tcp, prometheus_tcp)
        .context("starting the admin server")?;
    if let Some((status, tcp)) = status {
        tokio::spawn(crate::status::serve(rt.clone(), status, tcp));
    }
    tracing::info!(admin.address = %admin_addr, "ferry is running");
    tokio::spawn(reopen_logs_on_sigusr1(rt.clone()));

    wait_for_stop(&rt).await;
    if rt.skip_drain.load(Ordering::Acquire) {
        tracing::info!("exiting without a drain period");
        return Ok(());
    }
    if opts.exit_on_zero_active_connections {
        exit_on_zero_active_connections(&rt, opts.minimum_drain_duration).await;
        tracing::info!("exiting");
        return Ok(());
    }
    tracing::info!(
        drain.timeout_ms = opts.drain_timeout.as_millis() as u64,
        drain.inbound_only = opts.drain_inbound_only,
        "draining"
    );
    rt.termination_drain().start();
    let left = rt.drain.wait_idle(opts.drain_timeout).await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain deadline passed; closing remaining connections"
        );
    }
    // What the last requests logged reaches its files before the exit.
    let flush = rt.clone();
    let _ = tokio::task::spawn_blocking(move || flush.access_logs.flush()).await;
    tracing::info!("exiting");
    Ok(())
}

/// SIGUSR1 reopens the access log files, as Envoy does (log rotation).
async fn reopen_logs_on_sigusr1(rt: Arc<Runtime>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        return;
    };
    while usr1.recv().await.is_some() {
        tracing::info!("SIGUSR1: reopening the access logs");
        let rt = rt.clone();
        let _ = tokio::task::spawn_blocking(move || rt.access_logs.reopen()).await;
    }
}

/// istio-agent's `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` termination: drain,
/// wait the minimum drain duration, then check the open connections every
/// second and exit once there are none. No deadline: what is still open
/// keeps working until the kubelet's grace period ends.
async fn exit_on_zero_active_connections(rt: &Runtime, minimum: Duration) {
    rt.termination_drain().start();
    tracing::info!(
        drain.minimum_ms = minimum.as_millis() as u64,
        "draining, then waiting for active connections to end"
    );
    tokio::time::sleep(minimum).await;
    loop {
        let n = rt.drain.live_connections();
        if n == 0 {
            tracing::info!("there are no more active connections");
            return;
        }
        tracing::info!(connections = n, "there are still active connections");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Start-up code (configuration parsing through the descriptor set, command
/// line handling) is never run again once the proxy serves: its pages of the
/// executable are handed back to the kernel, which faults in again whatever
/// the data path touches. Only clean, file-backed pages of our own binary
/// are concerned.
pub fn release_startup_pages() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let exe = exe.to_string_lossy().into_owned();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if perms.contains('w') || !line.ends_with(exe.as_str()) {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: the range is a read-only mapping of our executable taken
        // from /proc/self/maps; MADV_PAGEOUT only drops clean pages, which
        // fault back in from the file on the next access.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT);
        }
    }
}

/// Returns freed allocator pages to the OS (the binary's allocator is mimalloc).
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks the allocator's own free lists.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

async fn wait_for_stop(rt: &Runtime) {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = rt.quit.notified() => {}
            }
        }
        _ => rt.quit.notified().await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_shape() {
        let t = super::rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}
