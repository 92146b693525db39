//! Per-stream sync status, the server's view of each connected proxy (like
//! `istioctl proxy-status`): node, and per type URL what was sent, what was
//! ACKed, the last NACK and its error. The registry wakes waiters on every
//! change so tests can wait for an ACK or a NACK instead of sleeping.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

/// The ADS variant a stream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `StreamAggregatedResources` (state of the world).
    Sotw,
    /// `DeltaAggregatedResources` (incremental).
    Delta,
}

/// Where a type stands on one stream, as `istioctl proxy-status` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncState {
    /// Subscribed, nothing sent yet.
    #[default]
    NotSent,
    /// The latest response is not answered yet.
    Stale,
    /// The latest response was ACKed.
    Synced,
    /// The latest response was NACKed.
    Nacked,
}

/// A rejected response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Nack {
    /// Nonce of the rejected response.
    pub nonce: String,
    /// The type version the rejected response carried.
    pub version: String,
    /// The version the client says it still runs (`version_info` of the
    /// NACK; always empty on delta streams, which do not carry one).
    pub client_version: String,
    /// `error_detail.code` (a gRPC status code).
    pub code: i32,
    /// `error_detail.message`, Envoy's reason.
    pub message: String,
}

/// One type URL on one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TypeStatus {
    pub state: SyncState,
    /// Wildcard subscription (explicit `*`, or the legacy empty one).
    pub wildcard: bool,
    /// Explicitly subscribed names.
    pub subscribed: Vec<String>,
    /// Version and nonce of the latest response.
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    /// Number of resources in the latest response.
    pub sent_resources: usize,
    pub responses: u64,
    /// Version of the latest ACKed response.
    pub acked_version: Option<String>,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<Nack>,
    /// Microseconds from the latest ACKed response's send to its ACK, as
    /// this server saw them.
    pub ack_latency_us: Option<u64>,
    #[serde(skip)]
    sent_at: Option<std::time::Instant>,
}

/// One ADS stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProxyStatus {
    pub stream_id: u64,
    /// `node.id` of the first request that carried a node.
    pub node_id: String,
    pub node_cluster: String,
    pub protocol: Protocol,
    pub peer: Option<String>,
    pub connected_unix_ms: u64,
    /// Keyed by type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

/// All open streams.
#[derive(Debug)]
pub(crate) struct Registry {
    streams: Mutex<BTreeMap<u64, ProxyStatus>>,
    changes: watch::Sender<u64>,
    next_id: AtomicU64,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self {
            streams: Mutex::new(BTreeMap::new()),
            changes: watch::Sender::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    /// Registers a new stream; it is removed when the handle drops.
    pub(crate) fn open(
        self: &Arc<Self>,
        protocol: Protocol,
        peer: Option<SocketAddr>,
    ) -> StreamHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connected_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.lock().insert(
            id,
            ProxyStatus {
                stream_id: id,
                node_id: String::new(),
                node_cluster: String::new(),
                protocol,
                peer: peer.map(|p| p.to_string()),
                connected_unix_ms,
                types: BTreeMap::new(),
            },
        );
        self.changes.send_modify(|g| *g += 1);
        StreamHandle {
            registry: self.clone(),
            id,
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<ProxyStatus> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(s) = self.lock().get_mut(&id) {
            f(s);
        }
        self.changes.send_modify(|g| *g += 1);
    }
}

/// A stream's entry in the registry; the stream records its events through it.
#[derive(Debug)]
pub(crate) struct StreamHandle {
    registry: Arc<Registry>,
    id: u64,
}

impl StreamHandle {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn set_node(&self, id: &str, cluster: &str) {
        self.registry.update(self.id, |s| {
            s.node_id = id.to_string();
            s.node_cluster = cluster.to_string();
        });
    }

    pub(crate) fn subscribed(&self, type_url: &str, wildcard: bool, names: Vec<String>) {
        self.registry.update(self.id, |s| {
            let t = s.types.entry(type_url.to_string()).or_default();
            t.wildcard = wildcard;
            t.subscribed = names;
        });
    }

    pub(crate) fn sent(&self, type_url: &str, version: &str, nonce: &str, resources: usize) {
        self.registry.update(self.id, |s| {
            let t = s.types.entry(type_url.to_string()).or_default();
            t.sent_version = Some(version.to_string());
            t.sent_nonce = Some(nonce.to_string());
            t.sent_resources = resources;
            t.responses += 1;
            t.state = SyncState::Stale;
            t.sent_at = Some(std::time::Instant::now());
        });
    }

    pub(crate) fn acked(&self, type_url: &str, version: &str, nonce: &str) {
        self.registry.update(self.id, |s| {
            let t = s.types.entry(type_url.to_string()).or_default();
            t.acked_version = Some(version.to_string());
            t.acks += 1;
            if t.sent_nonce.as_deref() == Some(nonce) {
                t.state = SyncState::Synced;
                if let Some(at) = t.sent_at.take() {
                    t.ack_latency_us =
                        Some(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
            }
        });
    }

    pub(crate) fn nacked(&self, type_url: &str, nack: Nack) {
        self.registry.update(self.id, |s| {
            let t = s.types.entry(type_url.to_string()).or_default();
            t.nacks += 1;
            if t.sent_nonce.as_deref() == Some(nack.nonce.as_str()) {
                t.state = SyncState::Nacked;
            }
            t.last_nack = Some(nack);
        });
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        self.registry.changes.send_modify(|g| *g += 1);
    }
}
