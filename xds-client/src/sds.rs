//! SDS from a secret server of its own (`envoy.service.secret.v3.SecretDiscoveryService`),
//! as Envoy fetches the secrets an `sds_config` names by `api_config_source`
//! (`api_type: GRPC`) on a static cluster: istio-agent's `sds-grpc`, a Unix
//! socket on which the agent serves the workload certificate `default`, the
//! root `ROOTCA`, and any other secret a configuration names on it
//! (`file-cert:…`/`file-root:…`, a gateway's `kubernetes://…`): the ADS
//! client asks [`AgentSds::want`] for each such name it meets.
//!
//! One state-of-the-world stream per secret name, as Envoy opens one
//! subscription per secret; each response is converted, ACKed (or NACKed
//! with the conversion's error, keeping the last good secret) and published
//! on a `watch` of [`LocalSecrets`], which the ADS client merges into every
//! snapshot: a pushed secret (a rotation) reaches new handshakes. A broken
//! stream reconnects with backoff while the last secrets serve on.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::ads::{LocalSecrets, StreamError, XdsTarget};
use crate::convert::Warnings;
use crate::store::SECRET;

/// Where the secrets come from and who asks.
#[derive(Debug, Clone)]
pub struct SdsSource {
    /// The cluster's name, for logs.
    pub cluster: String,
    pub target: XdsTarget,
    pub node: Node,
}

/// The secrets of istio-agent's `sds-grpc` cluster: fetched from its SDS
/// server, one stream per name; or, when the process does the agent's job
/// itself (no server), the file-mounted ones read from their files.
#[derive(Debug)]
pub struct AgentSds {
    source: Option<SdsSource>,
    tx: Arc<watch::Sender<LocalSecrets>>,
    /// The names a stream (or a file watch) runs for, and how to stop it.
    started: std::sync::Mutex<std::collections::HashMap<String, tokio::task::AbortHandle>>,
    /// Names fetched from the start and kept (the workload certificate and
    /// root), whether or not the configuration names them yet.
    pinned: Vec<String>,
}

impl AgentSds {
    /// Starts one stream per name; the receiver holds every secret received
    /// so far.
    pub fn start(source: SdsSource, names: &[&str]) -> (Arc<Self>, watch::Receiver<LocalSecrets>) {
        let (tx, rx) = watch::channel(LocalSecrets::new());
        let me = Arc::new(Self {
            source: Some(source),
            tx: Arc::new(tx),
            started: Default::default(),
            pinned: names.iter().map(|n| n.to_string()).collect(),
        });
        me.want(names.iter().copied());
        (me, rx)
    }

    /// The agent's secrets when the process is the agent: the workload
    /// certificate and root are published on the returned sender by whoever
    /// issues them; file-mounted names are read from their files as the
    /// configuration names them; other names on `sds-grpc` have no source.
    pub fn local() -> (Arc<Self>, watch::Receiver<LocalSecrets>) {
        let (tx, rx) = watch::channel(LocalSecrets::new());
        let me = Arc::new(Self {
            source: None,
            tx: Arc::new(tx),
            started: Default::default(),
            pinned: Vec::new(),
        });
        (me, rx)
    }

    /// Whether the secret `name` on the agent's cluster comes from here:
    /// every name when there is an SDS server; without one, the workload
    /// certificate, the root and the file-mounted names. Any other (a
    /// gateway's `kubernetes://…`) is asked of the ADS server, which serves
    /// them to a proxy whose agent runs in-process, as istiod does.
    pub fn serves(&self, name: &str) -> bool {
        self.source.is_some()
            || name == "default"
            || name == "ROOTCA"
            || crate::file_secrets::is_file_secret(name)
    }

    /// Where the secrets are published.
    pub fn sender(&self) -> Arc<watch::Sender<LocalSecrets>> {
        self.tx.clone()
    }

    /// Takes `names`, every name the configuration needs from here now:
    /// starts a stream (or a file watch) for each that has none yet, and
    /// stops those of names no longer needed and forgets their secrets, as
    /// Envoy ends a secret's subscription once nothing references it (the
    /// pinned names excepted).
    pub fn want<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let wanted: std::collections::HashSet<&str> = names.into_iter().collect();
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        let unused: Vec<String> = started
            .keys()
            .filter(|n| !wanted.contains(n.as_str()) && !self.pinned.contains(n))
            .cloned()
            .collect();
        for name in unused {
            if let Some(task) = started.remove(&name) {
                task.abort();
            }
            tracing::info!(sds.secret = %name, "secret no longer referenced: its subscription ends");
            self.tx.send_if_modified(|m| m.remove(&name).is_some());
        }
        for name in wanted {
            if started.contains_key(name) {
                continue;
            }
            let task = match &self.source {
                Some(source) => {
                    tracing::info!(sds.cluster = %source.cluster, sds.secret = %name, "fetching a secret from the SDS server");
                    spawn_stream(source.clone(), self.tx.clone(), name.to_string())
                }
                None if crate::file_secrets::is_file_secret(name) => {
                    crate::file_secrets::spawn_watch(name.to_string(), self.tx.clone())
                }
                // The workload certificate and root are published by the
                // agent; other names are not asked here (`serves`).
                None => continue,
            };
            started.insert(name.to_string(), task);
        }
    }
}

/// Starts one stream per name; the receiver holds every secret received so far.
pub fn start(source: SdsSource, names: &[&str]) -> watch::Receiver<LocalSecrets> {
    AgentSds::start(source, names).1
}

fn spawn_stream(
    source: SdsSource,
    tx: Arc<watch::Sender<LocalSecrets>>,
    name: String,
) -> tokio::task::AbortHandle {
    {
        tokio::spawn(async move {
            let mut failures: u32 = 0;
            loop {
                let started = std::time::Instant::now();
                if let Err(e) = stream(&source, &name, &tx).await {
                    tracing::warn!(sds.cluster = %source.cluster, sds.secret = %name, error = %e, "SDS stream ended");
                }
                failures = if started.elapsed() > Duration::from_secs(30) {
                    0
                } else {
                    failures.saturating_add(1)
                };
                // 100 ms doubling to 10 s, as the ADS client backs off.
                let backoff = Duration::from_millis(100u64.saturating_mul(1 << failures.min(7)))
                    .min(Duration::from_secs(10));
                tokio::time::sleep(backoff).await;
            }
        })
        .abort_handle()
    }
}

/// One stream for one secret until it breaks.
async fn stream(
    source: &SdsSource,
    name: &str,
    tx: &watch::Sender<LocalSecrets>,
) -> Result<(), StreamError> {
    let channel = crate::ads::channel(&source.target, None, &Default::default()).await?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (req_tx, req_rx) = mpsc::channel::<DiscoveryRequest>(8);
    let request = |version: String, nonce: String, error: Option<String>| DiscoveryRequest {
        version_info: version,
        node: Some(source.node.clone()),
        resource_names: vec![name.to_string()],
        type_url: SECRET.to_string(),
        response_nonce: nonce,
        error_detail: error.map(|message| Status {
            code: 3,
            message,
            details: vec![],
        }),
        ..Default::default()
    };
    // The first request names the secret; the version of what is held
    // survives a reconnect.
    let mut version = String::new();
    let _ = req_tx
        .send(request(String::new(), String::new(), None))
        .await;
    let mut responses = client
        .stream_secrets(ReceiverStream::new(req_rx))
        .await?
        .into_inner();
    while let Some(resp) = responses.message().await? {
        let outcome = apply(name, &resp.resources, tx);
        let error = match outcome {
            Ok(()) => {
                version = resp.version_info.clone();
                tracing::info!(sds.cluster = %source.cluster, sds.secret = %name, sds.version = %version, "secret received");
                None
            }
            Err(e) => {
                tracing::warn!(sds.cluster = %source.cluster, sds.secret = %name, error = %e, "secret rejected");
                Some(e)
            }
        };
        if req_tx
            .send(request(version.clone(), resp.nonce.clone(), error))
            .await
            .is_err()
        {
            break;
        }
    }
    Err(StreamError::Closed)
}

/// Converts the named secret of a response and publishes it.
fn apply(
    name: &str,
    resources: &[envoy_types::pb::google::protobuf::Any],
    tx: &watch::Sender<LocalSecrets>,
) -> Result<(), String> {
    let mut found = None;
    for any in resources {
        if any.type_url != SECRET {
            return Err(format!("unexpected resource type {:?}", any.type_url));
        }
        let s = tls_pb::Secret::decode(any.value.as_slice())
            .map_err(|e| format!("secret: cannot decode: {e}"))?;
        if s.name == name {
            found = Some(s);
        }
    }
    // A response without it keeps what is held (the server has nothing yet).
    let Some(s) = found else {
        return Ok(());
    };
    let mut warnings = Warnings::default();
    let model = crate::convert::secret(&s, &mut warnings).map_err(|e| e.to_string())?;
    for w in &warnings.0 {
        tracing::warn!(sds.secret = %name, warning = %w, "secret accepted with a warning");
    }
    tx.send_modify(|m| {
        m.insert(name.to_string(), Arc::new(model));
    });
    Ok(())
}
