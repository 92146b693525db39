//! Envoy's internal listeners (`Listener.internal_listener`,
//! `envoy.bootstrap.internal_listener`): listeners without a socket. A
//! cluster endpoint that is an `envoy_internal_address` naming one connects
//! in process: the two ends of an in-memory duplex stream, one returned to
//! the connecting pool, the other served by the listener's filter chains as
//! an accepted connection would be. `internal_upstream` hands the endpoint's
//! `envoy.filters.listener.original_dst` metadata over with it, which the
//! listener's `original_dst` filter reads (Istio's `connect_originate`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock, Weak};

use ferry_model::cluster::OriginalDstMeta;
use ferry_model::{ChainKind, ConnectionInfo, HttpCodec, Listener};
use tokio::io::DuplexStream;

use crate::run::Runtime;

/// Buffered bytes each way of an internal connection (Envoy's
/// `buffer_size_kb` default, 64 KiB).
const BUFFER: usize = 64 * 1024;

/// The placeholder address of an internal connection's ends: Envoy names
/// them `envoy://…`, which is no socket address.
pub const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// What reaches an internal listener with a connection.
pub struct InternalConn {
    pub io: DuplexStream,
    /// The endpoint's original_dst metadata, when `internal_upstream`
    /// passes it through.
    pub meta: OriginalDstMeta,
}

/// Why an internal connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error("no internal listener named {0:?}")]
    NoListener(String),
    #[error("the proxy is shutting down")]
    Gone,
}

/// The internal listeners of the live configuration by name, shared with
/// the cluster pools that connect to them.
#[derive(Default)]
pub struct InternalListeners {
    live: RwLock<HashMap<String, Arc<Listener>>>,
    rt: RwLock<Weak<Runtime>>,
}

impl InternalListeners {
    /// Ties the registry to its runtime (which owns it).
    pub fn attach(&self, rt: &Arc<Runtime>) {
        *self.rt.write().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(rt);
    }

    /// Installs the internal listeners of a new snapshot: new connections
    /// get the new versions; connections already open keep theirs.
    pub fn reconcile(&self, listeners: &[Arc<Listener>]) {
        let map = listeners
            .iter()
            .filter(|l| l.internal)
            .map(|l| (l.name.clone(), l.clone()))
            .collect();
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// Opens a connection to the internal listener `name`; its end is
    /// served on a task of its own.
    pub fn connect(
        &self,
        name: &str,
        meta: OriginalDstMeta,
    ) -> Result<DuplexStream, InternalError> {
        let listener = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| InternalError::NoListener(name.to_string()))?;
        let rt = self
            .rt
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .upgrade()
            .ok_or(InternalError::Gone)?;
        let (client, server) = tokio::io::duplex(BUFFER);
        let guard = rt.drain.track();
        tokio::spawn(async move {
            let _guard = guard;
            handle(rt, listener, InternalConn { io: server, meta }).await;
        });
        Ok(client)
    }
}

/// Serves one internal connection: the original destination from the
/// passed metadata (the `original_dst` listener filter), the filter chain
/// for it, then TCP or HTTP as on a socket.
async fn handle(rt: Arc<Runtime>, listener: Arc<Listener>, conn: InternalConn) {
    let dst = if listener.listener_filters.original_dst {
        conn.meta.local.unwrap_or(UNSPECIFIED)
    } else {
        UNSPECIFIED
    };
    let peer = UNSPECIFIED;
    tracing::trace!(listener.name = %listener.name, dst = %dst, "internal connection");
    let info = ConnectionInfo {
        destination: Some(dst),
        source: Some(peer),
        server_name: None,
        transport_protocol: None,
        application_protocols: Vec::new(),
    };
    let Some(registered) = rt
        .conns
        .register(&listener, info, rt.drain_for(&listener.name))
    else {
        tracing::debug!(listener.name = %listener.name, dst = %dst, "no filter chain matched; closing");
        crate::access_log::connection::no_filter_chain(&rt, &listener, peer, dst, None);
        rt.stats
            .counter(&format!("listener.{}.no_filter_chain_match", listener.name))
            .inc();
        return;
    };
    let live = registered.live.clone();
    let downstream = crate::rbac::Downstream {
        peer,
        local: dst,
        server_name: String::new(),
        tls: None,
    };
    let (rbac, chain) =
        live.attach_rbac(|c| crate::rbac::ConnRbac::new(&c.rbac, rt.clone(), downstream));
    let conn_meta = crate::tcp::ConnMeta {
        waypoint: conn.meta.waypoint,
    };
    match &chain.kind {
        ChainKind::Tcp(tp) => {
            let stats = rt.tcp_stats(&tp.stat_prefix);
            let io = crate::rbac::guard(conn.io, &rbac);
            let io = crate::network_ext_authz::gate(io, &rt, &chain.ext_authz, &rbac);
            Box::pin(crate::tcp::proxy(
                &rt,
                tp,
                &stats,
                None,
                io,
                dst,
                &live.drain,
                peer,
                "",
                &conn_meta,
            ))
            .await;
        }
        ChainKind::Http(hcm) => {
            let (http2, io) = match hcm.codec {
                HttpCodec::Http1 => (false, crate::tls::Rewind::new(Vec::new(), conn.io)),
                HttpCodec::Http2 => (true, crate::tls::Rewind::new(Vec::new(), conn.io)),
                HttpCodec::Auto => match Box::pin(crate::tls::sniff_h2(conn.io)).await {
                    Some(found) => found,
                    None => return,
                },
            };
            let io = crate::rbac::guard(io, &rbac);
            Box::pin(crate::listener::serve_internal_http(
                &rt, &chain, io, http2, peer, dst, &live,
            ))
            .await;
        }
    }
}
