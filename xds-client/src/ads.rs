//! The ADS client: one gRPC stream to the management server carrying CDS,
//! EDS, LDS, RDS (and SDS) in either the state-of-the-world or the delta
//! (incremental) protocol, ACK/NACK with per-resource `error_detail`,
//! subscriptions that follow references (RDS names from listeners, EDS names
//! from clusters), reconnection with jittered backoff, and publication of
//! each complete, valid snapshot on a `watch` channel.
//!
//! A response is applied all or nothing: one invalid resource NACKs the
//! whole response and the last good configuration keeps serving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use ferry_model::Snapshot;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::convert::Warnings;
use crate::store::{self, CLUSTER, ENDPOINT, LISTENER, Parsed, ROUTE, SECRET, Store};

/// Where the management server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdsTarget {
    Tcp(String),
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AdsConfig {
    pub target: XdsTarget,
    pub delta: bool,
    pub node: Node,
    pub initial_fetch_timeout: Duration,
    /// TLS to the management server (the ADS cluster's transport socket).
    pub tls: Option<ferry_model::tls::UpstreamTls>,
    /// The bootstrap's static secrets, which the TLS settings may name.
    pub secrets: HashMap<String, Arc<ferry_model::tls::Secret>>,
    /// Secrets the process provides itself (the agent's workload
    /// certificate `default` and root `ROOTCA`, as istio-agent's SDS server
    /// does): never asked of the server, and a change republishes.
    pub local_secrets: Option<watch::Receiver<LocalSecrets>>,
    /// istio-agent's SDS server, when secrets come from it: names the
    /// configuration fetches on its `sds-grpc` cluster are asked of it, not
    /// of the ADS server.
    pub agent_sds: Option<Arc<crate::sds::AgentSds>>,
    /// Where Istio's name table (NDS) goes, for the DNS proxy: when set,
    /// the client subscribes to it as istio-agent does.
    pub name_table: Option<watch::Sender<Option<Arc<NameTable>>>>,
}

pub use ferry_envoy_json::istio_nds::{NAME_TABLE_TYPE, NameInfo, NameTable};

/// Secrets by SDS name.
pub type LocalSecrets = HashMap<String, Arc<ferry_model::tls::Secret>>;

/// A rejected update, as `/config_dump` reports it.
#[derive(Debug, Clone)]
pub struct Nack {
    pub type_url: String,
    pub version: String,
    pub nonce: String,
    pub error: String,
    pub at: SystemTime,
}

/// What the client shares with the admin endpoints.
#[derive(Default)]
pub struct XdsState {
    pub updates: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub reconnects: AtomicU64,
    pub warnings: AtomicU64,
    pub store: Mutex<Store>,
    pub last_nack: Mutex<HashMap<String, Nack>>,
    /// The accepted version of each type (SotW `version_info`, or the delta
    /// system version).
    pub versions: Mutex<HashMap<String, String>>,
}

impl XdsState {
    fn lock_store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("cannot connect to the xDS server: {0}")]
    Connect(String),
    #[error("xDS stream failed: {0}")]
    Stream(#[from] tonic::Status),
    #[error("xDS stream closed by the server")]
    Closed,
}

/// The order Envoy subscribes in: clusters (and their endpoints) before
/// listeners (and their routes), so a listener never points at nothing;
/// secrets as the TLS contexts of either name them.
const ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// Runs the client forever, publishing snapshots on `publish`. `base` holds
/// the bootstrap's static resources, which every snapshot includes.
pub async fn run(
    config: AdsConfig,
    base: Arc<Snapshot>,
    state: Arc<XdsState>,
    publish: watch::Sender<Option<Arc<Snapshot>>>,
) {
    let mut failures: u32 = 0;
    let mut client = Client {
        config,
        bootstrap: base.clone(),
        base,
        state,
        publish,
        published: 0,
        nds_version: String::new(),
    };
    client.merge_local_secrets();
    loop {
        let started = Instant::now();
        let result = if client.config.delta {
            client.delta().await
        } else {
            client.sotw().await
        };
        if let Err(e) = result {
            tracing::warn!(xds.target = ?client.config.target, error = %e, "xDS stream ended");
        }
        client.state.reconnects.fetch_add(1, Ordering::Relaxed);
        failures = if started.elapsed() > Duration::from_secs(30) {
            0
        } else {
            failures.saturating_add(1)
        };
        let base_ms = 250u64.saturating_mul(1 << failures.min(7)).min(30_000);
        let jitter = rand::random_range(0.5..1.5);
        tokio::time::sleep(Duration::from_millis((base_ms as f64 * jitter) as u64)).await;
    }
}

struct Client {
    config: AdsConfig,
    /// The bootstrap's static resources.
    bootstrap: Arc<Snapshot>,
    /// Those plus the process's own secrets, which win over static ones.
    base: Arc<Snapshot>,
    state: Arc<XdsState>,
    publish: watch::Sender<Option<Arc<Snapshot>>>,
    published: u64,
    /// The accepted NDS version (SotW), sent again on reconnect.
    nds_version: String,
}

async fn connect(config: &AdsConfig) -> Result<tonic::transport::Channel, StreamError> {
    channel(&config.target, config.tls.as_ref(), &config.secrets).await
}

/// A gRPC channel to `target`, over TLS when `tls` is set (its secrets
/// looked up in `secrets`). The certificate service's client shares it.
pub(crate) async fn channel(
    target: &XdsTarget,
    tls: Option<&ferry_model::tls::UpstreamTls>,
    secrets: &HashMap<String, Arc<ferry_model::tls::Secret>>,
) -> Result<tonic::transport::Channel, StreamError> {
    let err = |e: tonic::transport::Error| StreamError::Connect(format!("{e:?}"));
    let tls = match tls {
        Some(t) => {
            // gRPC is HTTP/2: offer h2 unless the context names its ALPN.
            let cc = ferry_tls::client_config(t, &["h2"], secrets)
                .map_err(|e| StreamError::Connect(format!("TLS settings: {e}")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(cc)), t.clone()))
        }
        None => None,
    };
    match (target, tls) {
        (XdsTarget::Tcp(addr), None) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(err)?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(err)
        }
        (XdsTarget::Tcp(addr), Some((connector, t))) => {
            let addr = addr.clone();
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(err)?
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_| {
                    let (addr, connector, t) = (addr.clone(), connector.clone(), t.clone());
                    async move {
                        let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
                        tcp.set_nodelay(true)?;
                        // The target's host (a DNS cluster's name) for `auto_host_sni`.
                        let host = addr
                            .rsplit_once(':')
                            .map(|(h, _)| h.trim_matches(['[', ']']));
                        let host = host.filter(|h| h.parse::<std::net::IpAddr>().is_err());
                        let name = ferry_tls::server_name(&t, host, tcp.peer_addr()?.ip());
                        let s = connector.connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .map_err(err)
        }
        (XdsTarget::Unix(path), tls) => {
            let path = path.clone();
            let endpoint = tonic::transport::Endpoint::from_static("http://xds.local");
            match tls {
                None => endpoint
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
                    .map_err(err),
                Some((connector, t)) => endpoint
                    .connect_with_connector(tower::service_fn(move |_| {
                        let (path, connector, t) = (path.clone(), connector.clone(), t.clone());
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            let name = ferry_tls::server_name(
                                &t,
                                None,
                                std::net::Ipv4Addr::LOCALHOST.into(),
                            );
                            let s = connector.connect(name, s).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
                    .map_err(err),
            }
        }
    }
}

/// Per type, what the client has told the server.
#[derive(Default)]
struct Subscription {
    names: BTreeSet<String>,
    nonce: String,
    version: String,
}

/// The outcome of one response.
struct Applied {
    error: Option<String>,
}

impl Client {
    /// Validates and applies a set of resources of one type; on any error
    /// nothing is applied.
    fn apply(
        &mut self,
        type_url: &'static str,
        upserts: Vec<(
            Option<String>,
            String,
            envoy_types::pb::google::protobuf::Any,
        )>,
        removals: Vec<String>,
        full_state: bool,
        version: &str,
    ) -> Applied {
        let mut warnings = Warnings::default();
        let mut parsed = Vec::with_capacity(upserts.len());
        let mut errors = Vec::new();
        // Names of rejected resources: their previous version stays.
        let mut rejected = BTreeSet::new();
        // The resources are taken by value: their encoded form moves into
        // the store rather than being copied.
        for (name_hint, res_version, any) in upserts {
            // A resource sent again unchanged (state-of-the-world responses
            // repeat every resource of their type) keeps what it converted
            // to: no second conversion, and the snapshot shares it, so
            // nothing built from it is rebuilt. Route configurations are
            // checked again, as their validation depends on the clusters.
            if type_url != store::ROUTE
                && any.type_url == type_url
                && let Some(name) = name_hint
                    .clone()
                    .or_else(|| store::resource_name(&any.value))
            {
                let st = self.state.lock_store();
                if let Some(e) = st.get(type_url, &name)
                    && e.raw == any.value
                {
                    let p = e.parsed.clone();
                    drop(st);
                    parsed.push((name, res_version, any.value, p));
                    continue;
                }
            }
            match store::parse(type_url, &any, &mut warnings) {
                Ok((name, p)) => {
                    if let Some(hint) = &name_hint
                        && *hint != name
                    {
                        errors.push(format!("resource {hint:?}: its name is {name:?}"));
                        rejected.insert(hint.clone());
                        continue;
                    }
                    if let Parsed::Route(rc) = &p
                        && rc.validate_clusters
                    {
                        let st = self.state.lock_store();
                        if let Some(missing) = rc
                            .referenced_clusters()
                            .into_iter()
                            .find(|c| !st.has_cluster(c, &self.base.clusters))
                        {
                            errors.push(format!(
                                "route_configuration {name:?}: validate_clusters: unknown cluster {missing:?}"
                            ));
                            rejected.insert(name);
                            continue;
                        }
                    }
                    parsed.push((name, res_version, any.value, p));
                }
                Err((name, e)) => {
                    errors.push(e.to_string());
                    rejected.extend(name.or(name_hint));
                }
            }
        }
        // Extensions recognised but not implemented: one line per kind.
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for w in &warnings.0 {
            tracing::debug!(xds.type_url = type_url, config.warning = %w, "resource accepted with a warning");
            let kind = w.rsplit_once(": ").map_or(w.as_str(), |(_, k)| k);
            *kinds.entry(kind).or_default() += 1;
        }
        for (kind, n) in kinds {
            tracing::warn!(xds.type_url = type_url, count = n, "{kind}");
        }
        self.state
            .warnings
            .fetch_add(warnings.0.len() as u64, Ordering::Relaxed);
        {
            // Valid resources apply even when others in the same response
            // are rejected, as Envoy does; the rejected ones keep their
            // last good version.
            let mut st = self.state.lock_store();
            // What a full-state response leaves out is gone, unless some
            // resource could not even be named: then nothing is removed.
            let unnamed = errors.len() > rejected.len();
            if full_state && !unnamed {
                let mut names: BTreeSet<String> =
                    parsed.iter().map(|(n, _, _, _)| n.clone()).collect();
                names.extend(rejected.iter().cloned());
                st.retain(type_url, &names);
            }
            for name in &removals {
                st.remove(type_url, name);
            }
            for (name, v, raw, p) in parsed {
                st.upsert(type_url, name, v, raw, p);
            }
        }
        self.state.updates.fetch_add(1, Ordering::Relaxed);
        if !errors.is_empty() {
            return Applied {
                error: Some(errors.join("; ")),
            };
        }
        self.state
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(type_url.to_string(), version.to_string());
        Applied { error: None }
    }

    /// Assembles and publishes the snapshot; returns when warming resources
    /// must be looked at again.
    fn publish(&mut self) -> Option<Instant> {
        let previous = self.publish.borrow().clone();
        self.published += 1;
        let versions = self
            .state
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let label = ORDER
            .iter()
            .filter_map(|t| versions.get(*t).map(|v| format!("{}={v}", short(t))))
            .collect::<Vec<_>>()
            .join(",");
        let assembled = self.state.lock_store().assemble(
            &self.base,
            previous.as_deref(),
            self.config.initial_fetch_timeout,
            format!("xds:{label}"),
        );
        // Readiness waits for the first LDS and CDS answers and for warming.
        let have_lds_cds = versions.contains_key(LISTENER) && versions.contains_key(CLUSTER);
        if previous.is_none() && (!have_lds_cds || !assembled.warming.is_empty()) {
            return assembled.next_deadline;
        }
        if !assembled.warming.is_empty() {
            tracing::debug!(xds.warming = ?assembled.warming, "resources still warming");
        }
        self.publish
            .send_replace(Some(Arc::new(assembled.snapshot)));
        assembled.next_deadline
    }

    fn record_nack(&self, type_url: &str, version: &str, nonce: &str, error: &str) {
        tracing::warn!(xds.type_url = type_url, xds.version = version, error = %error, "rejecting xDS update (NACK)");
        self.state.nacks.fetch_add(1, Ordering::Relaxed);
        self.state
            .last_nack
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                type_url.to_string(),
                Nack {
                    type_url: type_url.to_string(),
                    version: version.to_string(),
                    nonce: nonce.to_string(),
                    error: error.to_string(),
                    at: SystemTime::now(),
                },
            );
    }

    /// Names to subscribe for the dependent types, from what is cached now.
    fn wanted(&self, type_url: &str) -> BTreeSet<String> {
        let st = self.state.lock_store();
        match type_url {
            ROUTE => st.wanted_routes(),
            ENDPOINT => st.wanted_endpoints(&self.base.clusters),
            SECRET => {
                let mut names = st.wanted_secrets(&self.base);
                if let Some(agent) = &self.config.agent_sds {
                    let mut from_agent = st.wanted_agent_secrets(&self.base);
                    from_agent.retain(|n| agent.serves(n));
                    agent.want(from_agent.iter().map(String::as_str));
                    names.retain(|n| !from_agent.contains(n));
                }
                names
            }
            _ => BTreeSet::new(),
        }
    }

    /// Rebuilds `base` from the bootstrap and the current local secrets.
    fn merge_local_secrets(&mut self) {
        let Some(rx) = self.config.local_secrets.as_mut() else {
            return;
        };
        let local = rx.borrow_and_update().clone();
        let b = &self.bootstrap;
        let mut secrets = b.secrets.clone();
        secrets.extend(local);
        self.base = Arc::new(Snapshot {
            version: b.version.clone(),
            listeners: b.listeners.clone(),
            clusters: b.clusters.clone(),
            routes: b.routes.clone(),
            secrets,
            ..Default::default()
        });
    }

    /// The next response; while waiting, warming resources whose initial
    /// fetch timeout passes are activated, and a change of the local
    /// secrets (a rotated certificate) is published.
    async fn next_message<T>(
        &mut self,
        stream: &mut tonic::Streaming<T>,
        deadline: &mut Option<Instant>,
    ) -> Result<T, StreamError> {
        loop {
            let local_changed = async {
                match self.config.local_secrets.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let sleep = async {
                match *deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = stream.message() => return m?.ok_or(StreamError::Closed),
                () = sleep => {
                    *deadline = self.publish();
                }
                changed = local_changed => {
                    if changed {
                        self.merge_local_secrets();
                        tracing::info!("local secrets changed");
                    } else {
                        // The provider is gone: keep the last secrets.
                        self.config.local_secrets = None;
                    }
                    *deadline = self.publish();
                }
            }
        }
    }

    // ------------------------------------------------------------ SotW

    async fn sotw(&mut self) -> Result<(), StreamError> {
        let channel = connect(&self.config).await?;
        let mut grpc = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
        let mut subs: HashMap<&'static str, Subscription> = HashMap::new();
        let versions = self
            .state
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut first = true;
        // Wildcard CDS and LDS; EDS and RDS once their names are known
        // (also right away on a reconnect, from what is cached).
        for t in ORDER {
            let names = self.wanted(t);
            if matches!(t, ENDPOINT | ROUTE | SECRET) && names.is_empty() {
                continue;
            }
            let sub = subs.entry(t).or_default();
            sub.names = names;
            sub.version = versions.get(t).cloned().unwrap_or_default();
            let _ = tx
                .send(DiscoveryRequest {
                    version_info: sub.version.clone(),
                    node: first.then(|| self.config.node.clone()),
                    resource_names: sub.names.iter().cloned().collect(),
                    type_url: t.to_string(),
                    ..Default::default()
                })
                .await;
            first = false;
        }
        if self.config.name_table.is_some() {
            let _ = tx
                .send(DiscoveryRequest {
                    version_info: self.nds_version.clone(),
                    type_url: NAME_TABLE_TYPE.to_string(),
                    ..Default::default()
                })
                .await;
        }
        let mut stream = grpc
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut deadline: Option<Instant> = None;
        loop {
            let resp = self.next_message(&mut stream, &mut deadline).await?;
            if resp.type_url == NAME_TABLE_TYPE && self.config.name_table.is_some() {
                let any = resp.resources.first();
                let error = self.take_name_table(any);
                if error.is_none() {
                    self.nds_version = resp.version_info.clone();
                }
                let _ = tx
                    .send(DiscoveryRequest {
                        version_info: self.nds_version.clone(),
                        type_url: NAME_TABLE_TYPE.to_string(),
                        response_nonce: resp.nonce.clone(),
                        error_detail: error.map(status),
                        ..Default::default()
                    })
                    .await;
                continue;
            }
            deadline = self.on_sotw(resp, &tx, &mut subs).await;
        }
    }

    /// Decodes and hands over a name table (none: an empty table); the
    /// error for a NACK otherwise.
    fn take_name_table(
        &mut self,
        any: Option<&envoy_types::pb::google::protobuf::Any>,
    ) -> Option<String> {
        use prost::Message;
        let table = match any {
            None => NameTable::default(),
            Some(a) if a.type_url != NAME_TABLE_TYPE => {
                return Some(format!("a {} resource in an NDS response", a.type_url));
            }
            Some(a) => match NameTable::decode(a.value.as_slice()) {
                Ok(t) => t,
                Err(e) => return Some(format!("name table: cannot decode: {e}")),
            },
        };
        tracing::debug!(dns.hosts = table.table.len(), "name table received");
        self.state.acks.fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = &self.config.name_table {
            tx.send_replace(Some(Arc::new(table)));
        }
        None
    }

    async fn on_sotw(
        &mut self,
        mut resp: DiscoveryResponse,
        tx: &mpsc::Sender<DiscoveryRequest>,
        subs: &mut HashMap<&'static str, Subscription>,
    ) -> Option<Instant> {
        let Some(type_url) = store::type_key(&resp.type_url) else {
            let _ = tx
                .send(DiscoveryRequest {
                    type_url: resp.type_url.clone(),
                    response_nonce: resp.nonce.clone(),
                    error_detail: Some(status(format!(
                        "unsupported resource type {}",
                        resp.type_url
                    ))),
                    ..Default::default()
                })
                .await;
            return None;
        };
        // LDS and CDS responses are the complete set; RDS and EDS name what
        // they carry.
        let full = matches!(type_url, LISTENER | CLUSTER);
        let upserts = std::mem::take(&mut resp.resources)
            .into_iter()
            .map(|a| (None, resp.version_info.clone(), a))
            .collect();
        let applied = self.apply(type_url, upserts, Vec::new(), full, &resp.version_info);
        let sub = subs.entry(type_url).or_default();
        sub.nonce = resp.nonce.clone();
        match applied.error {
            Some(error) => {
                self.record_nack(type_url, &resp.version_info, &resp.nonce, &error);
                let _ = tx
                    .send(DiscoveryRequest {
                        version_info: sub.version.clone(),
                        resource_names: sub.names.iter().cloned().collect(),
                        type_url: type_url.to_string(),
                        response_nonce: resp.nonce.clone(),
                        error_detail: Some(status(error)),
                        ..Default::default()
                    })
                    .await;
            }
            None => {
                sub.version = resp.version_info.clone();
                self.state.acks.fetch_add(1, Ordering::Relaxed);
                let _ = tx
                    .send(DiscoveryRequest {
                        version_info: sub.version.clone(),
                        resource_names: sub.names.iter().cloned().collect(),
                        type_url: type_url.to_string(),
                        response_nonce: resp.nonce.clone(),
                        ..Default::default()
                    })
                    .await;
            }
        }
        // Follow references (the valid part of a NACKed response applied
        // too): new RDS/EDS names after LDS/CDS.
        let dependent: &[&'static str] = match type_url {
            LISTENER => &[ROUTE, SECRET],
            CLUSTER => &[ENDPOINT, SECRET],
            _ => &[],
        };
        for &dep in dependent {
            let names = self.wanted(dep);
            let sub = subs.entry(dep).or_default();
            if names != sub.names {
                sub.names = names;
                let _ = tx
                    .send(DiscoveryRequest {
                        version_info: sub.version.clone(),
                        resource_names: sub.names.iter().cloned().collect(),
                        type_url: dep.to_string(),
                        response_nonce: sub.nonce.clone(),
                        ..Default::default()
                    })
                    .await;
            }
        }
        self.publish()
    }

    // ------------------------------------------------------------ delta

    async fn delta(&mut self) -> Result<(), StreamError> {
        let channel = connect(&self.config).await?;
        let mut grpc = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        let mut subs: HashMap<&'static str, BTreeSet<String>> = HashMap::new();
        let mut first = true;
        for t in ORDER {
            let names = self.wanted(t);
            if matches!(t, ENDPOINT | ROUTE | SECRET) && names.is_empty() {
                continue;
            }
            // Resume: tell the server which versions are cached already.
            let initial_resource_versions = self.state.lock_store().versions(t);
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    node: first.then(|| self.config.node.clone()),
                    type_url: t.to_string(),
                    resource_names_subscribe: names.iter().cloned().collect(),
                    initial_resource_versions,
                    ..Default::default()
                })
                .await;
            subs.insert(t, names);
            first = false;
        }
        if self.config.name_table.is_some() {
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    type_url: NAME_TABLE_TYPE.to_string(),
                    ..Default::default()
                })
                .await;
        }
        let mut stream = grpc
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut deadline: Option<Instant> = None;
        loop {
            let resp = self.next_message(&mut stream, &mut deadline).await?;
            if resp.type_url == NAME_TABLE_TYPE && self.config.name_table.is_some() {
                let any = resp.resources.iter().find_map(|r| r.resource.as_ref());
                let error = if any.is_none() && resp.removed_resources.is_empty() {
                    None
                } else {
                    self.take_name_table(any)
                };
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: NAME_TABLE_TYPE.to_string(),
                        response_nonce: resp.nonce.clone(),
                        error_detail: error.map(status),
                        ..Default::default()
                    })
                    .await;
                continue;
            }
            deadline = self.on_delta(resp, &tx, &mut subs).await;
        }
    }

    async fn on_delta(
        &mut self,
        mut resp: DeltaDiscoveryResponse,
        tx: &mpsc::Sender<DeltaDiscoveryRequest>,
        subs: &mut HashMap<&'static str, BTreeSet<String>>,
    ) -> Option<Instant> {
        let nack = |type_url: String, error: String| DeltaDiscoveryRequest {
            type_url,
            response_nonce: resp.nonce.clone(),
            error_detail: Some(status(error)),
            ..Default::default()
        };
        let Some(type_url) = store::type_key(&resp.type_url) else {
            let _ = tx
                .send(nack(
                    resp.type_url.clone(),
                    format!("unsupported resource type {}", resp.type_url),
                ))
                .await;
            return None;
        };
        let mut upserts = Vec::with_capacity(resp.resources.len());
        for r in std::mem::take(&mut resp.resources) {
            match r.resource {
                Some(any) => upserts.push((Some(r.name), r.version, any)),
                None => {
                    let _ = tx
                        .send(nack(
                            type_url.to_string(),
                            format!("resource {:?} has no body", r.name),
                        ))
                        .await;
                    return None;
                }
            }
        }
        let version = if resp.system_version_info.is_empty() {
            resp.nonce.clone()
        } else {
            resp.system_version_info.clone()
        };
        let applied = self.apply(
            type_url,
            upserts,
            resp.removed_resources.clone(),
            false,
            &version,
        );
        if let Some(error) = applied.error {
            self.record_nack(type_url, &version, &resp.nonce, &error);
            let _ = tx.send(nack(type_url.to_string(), error)).await;
        } else {
            self.state.acks.fetch_add(1, Ordering::Relaxed);
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    type_url: type_url.to_string(),
                    response_nonce: resp.nonce.clone(),
                    ..Default::default()
                })
                .await;
        }
        let dependent: &[&'static str] = match type_url {
            LISTENER => &[ROUTE, SECRET],
            CLUSTER => &[ENDPOINT, SECRET],
            _ => &[],
        };
        for &dep in dependent {
            let wanted = self.wanted(dep);
            let had = subs.entry(dep).or_default();
            let subscribe: Vec<String> = wanted.difference(had).cloned().collect();
            let unsubscribe: Vec<String> = had.difference(&wanted).cloned().collect();
            if !subscribe.is_empty() || !unsubscribe.is_empty() {
                {
                    let mut st = self.state.lock_store();
                    for n in &unsubscribe {
                        st.remove(dep, n);
                    }
                }
                *had = wanted;
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: dep.to_string(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    })
                    .await;
            }
        }
        self.publish()
    }
}

fn status(message: String) -> Status {
    // google.rpc.Code.INVALID_ARGUMENT
    Status {
        code: 3,
        message,
        details: Vec::new(),
    }
}

fn short(type_url: &str) -> &'static str {
    match type_url {
        LISTENER => "lds",
        ROUTE => "rds",
        CLUSTER => "cds",
        ENDPOINT => "eds",
        _ => "sds",
    }
}

/// Which kind of resource a parsed entry is (for dumps).
pub fn kind(p: &Parsed) -> &'static str {
    match p {
        Parsed::Listener(..) => "listener",
        Parsed::Route(..) => "route",
        Parsed::Cluster(..) => "cluster",
        Parsed::Endpoints(..) => "endpoints",
        Parsed::Secret(..) => "secret",
    }
}
