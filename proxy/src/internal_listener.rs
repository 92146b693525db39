//! Envoy's internal listeners (`Listener.internal_listener`,
//! `envoy.bootstrap.internal_listener`): listeners without a socket. A
//! cluster endpoint that is an `envoy_internal_address` naming one connects
//! in process: the two ends of an in-memory duplex stream, one returned to
//! the connecting pool, the other served by the listener's filter chains as
//! an accepted connection would be. `internal_upstream` hands the endpoint's
//! `envoy.filters.listener.original_dst` metadata over with it, which the
//! listener's `original_dst` filter reads (Istio's `connect_originate`).
//! A connection opened for a request carries the filter state the request
//! shares with upstream: the `original_dst` filter takes the destination
//! and source addresses from it, RBAC's `filter_state` principals read it
//! (Istio's `main_internal`, behind `connect_terminate`). With nothing to
//! restore a destination, the connection's local address is the listener's
//! own internal address (`envoy://listener/endpoint id`), as in Envoy: the
//! formats print it, and address matchers find no IP in it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use ferry_model::cluster::{InternalAddr, OriginalDstMeta};
use ferry_model::filter_state::{FilterState, ORIGINAL_DST_LOCAL, ORIGINAL_DST_REMOTE};
use ferry_model::{ChainKind, ConnectionInfo, HttpCodec, Listener};

use crate::detect::{self, Detected, Outcome};
use crate::internal_pipe::{PipeEnd, ResetOnClose};
use crate::run::Runtime;
use crate::tls::Rewind;

/// Buffered bytes each way of an internal connection (Envoy's
/// `buffer_size_kb` default, 64 KiB).
const BUFFER: usize = 64 * 1024;

/// The placeholder address of an internal connection's ends: Envoy names
/// them `envoy://…`, which is no socket address; the access log prints the
/// client end as Envoy does (`envoy://internal_client_address/`).
pub const UNSPECIFIED: SocketAddr = ferry_model::stream_info::INTERNAL_CLIENT_ADDRESS;

/// What reaches an internal listener with a connection.
pub struct InternalConn {
    /// The listener's end, with the bytes protocol detection read served
    /// again first.
    pub io: Rewind<PipeEnd>,
    /// The endpoint's original_dst metadata, when `internal_upstream`
    /// passes it through.
    pub meta: OriginalDstMeta,
    /// The filter state shared by the request that opened it.
    pub filter_state: Option<Arc<FilterState>>,
    /// The listener's own address, when it is the connection's local
    /// address (nothing restored a destination).
    pub local: Option<InternalAddr>,
}

/// Why an internal connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error("no internal listener named {0:?}")]
    NoListener(String),
    #[error("the proxy is shutting down")]
    Gone,
    #[error("no filter chain of internal listener {0:?} matches the connection")]
    NoFilterChain(String),
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

    /// Opens a connection to the internal listener `to` names; its end is
    /// served on a task of its own.
    pub fn connect(
        &self,
        to: &InternalAddr,
        meta: OriginalDstMeta,
        filter_state: Option<Arc<FilterState>>,
    ) -> Result<PipeEnd, InternalError> {
        let listener = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&*to.listener)
            .cloned()
            .ok_or_else(|| InternalError::NoListener(to.listener.to_string()))?;
        let rt = self
            .rt
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .upgrade()
            .ok_or(InternalError::Gone)?;
        let (dst, peer) = addresses(&listener, &meta, filter_state.as_deref());
        // Nothing restored a destination: the local address is the one
        // connected to (Envoy's `EnvoyInternalInstance`).
        let local = (dst == UNSPECIFIED).then(|| to.clone());
        tracing::trace!(listener.name = %listener.name, dst = %dst, "internal connection");
        let filters = &listener.listener_filters;
        if filters.tls_inspector_for(Some(dst)) || filters.http_inspector_for(Some(dst)) {
            // Inspectors wait for what the client sends first (Istio's
            // main_internal for sniffed ports): the connection is made at
            // once and its chain chosen when those bytes have come (read
            // only when some chain tells connections apart by them); one
            // that no chain matches then closes, as in Envoy.
            let needs = listener.detection_needs(Some(dst));
            let inspectors = (
                filters.tls_inspector_for(Some(dst)),
                filters.http_inspector_for(Some(dst)),
            );
            let (client, server) = crate::internal_pipe::pair(BUFFER);
            let guard = rt.drain.track();
            tokio::spawn(async move {
                let _guard = guard;
                let limit = listener.detection_timeout.or(rt.detection_timeout);
                let close_on_timeout = listener.close_on_detection_timeout;
                let (detected, io) = if needs.any() {
                    match read_detect(server, needs.tls, needs.http, limit, close_on_timeout).await
                    {
                        Some(found) => found,
                        None => return,
                    }
                } else {
                    (Detected::default(), Rewind::new(Vec::new(), server))
                };
                let info = detected.connection_info(&listener, dst, peer);
                let Some(registered) = register(
                    &rt,
                    &listener,
                    info,
                    (dst, local.as_ref()),
                    peer,
                    detected.server_name.as_deref(),
                ) else {
                    if !needs.any() {
                        // Envoy's inspectors read the client's first bytes
                        // before any chain is looked for: a connection no
                        // chain takes closes only once they came (the
                        // caller's end that came with them is then no
                        // close under an open stream).
                        let (tls, http) = inspectors;
                        let _ =
                            read_detect(io.into_inner(), tls, http, limit, close_on_timeout).await;
                    }
                    return;
                };
                let conn = InternalConn {
                    io,
                    meta,
                    filter_state,
                    local,
                };
                handle(rt, conn, registered, dst, peer).await;
            });
            return Ok(client);
        }
        // Nothing to detect: the listener filters and the chain are settled
        // before the connection counts as made, as Envoy's internal
        // listener does: a connection for which no chain matches fails to
        // connect (the caller sees a connect failure, not a connection
        // that closes).
        let info = ConnectionInfo {
            destination: Some(dst),
            source: Some(peer),
            server_name: None,
            transport_protocol: None,
            application_protocols: Vec::new(),
        };
        let Some(registered) = register(&rt, &listener, info, (dst, local.as_ref()), peer, None)
        else {
            return Err(InternalError::NoFilterChain(listener.name.clone()));
        };
        let (client, server) = crate::internal_pipe::pair(BUFFER);
        let guard = rt.drain.track();
        tokio::spawn(async move {
            let _guard = guard;
            let conn = InternalConn {
                io: Rewind::new(Vec::new(), server),
                meta,
                filter_state,
                local,
            };
            handle(rt, conn, registered, dst, peer).await;
        });
        Ok(client)
    }
}

/// Registers a connection with the chain `info` selects; `None` (counted
/// and logged as Envoy does) when no chain matches.
fn register(
    rt: &Arc<Runtime>,
    listener: &Arc<Listener>,
    info: ConnectionInfo,
    (dst, local): (SocketAddr, Option<&InternalAddr>),
    peer: SocketAddr,
    server_name: Option<&str>,
) -> Option<crate::filter_chain_update::Registered> {
    let registered = rt
        .conns
        .register(listener, info, rt.drain_for(&listener.name));
    if registered.is_none() {
        tracing::debug!(listener.name = %listener.name, dst = %dst, "no filter chain matched; refused");
        crate::access_log::connection::no_filter_chain(
            rt,
            listener,
            peer,
            (dst, local),
            server_name,
        );
        rt.stats
            .counter(&format!("listener.{}.no_filter_chain_match", listener.name))
            .inc();
    }
    registered
}

/// Reads the client's first bytes until the inspectors decide (what a
/// socket listener peeks at; an in-memory stream cannot be peeked, so the
/// bytes read are served again first). Out of time: nothing detected, or
/// `None` (close) when the listener says so; `None` too when the stream
/// fails.
async fn read_detect(
    mut io: PipeEnd,
    tls: bool,
    http: bool,
    limit: Option<Duration>,
    close_on_timeout: bool,
) -> Option<(Detected, Rewind<PipeEnd>)> {
    use tokio::io::AsyncReadExt;
    // No limit: a deadline no connection reaches (a year), as on sockets.
    let limit = limit.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = Vec::with_capacity(1024);
    let detected = loop {
        if buf.len() >= detect::MAX_PEEK {
            break Detected::default();
        }
        buf.reserve(1024.min(detect::MAX_PEEK - buf.len()));
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) if close_on_timeout => return None,
            Err(_) => break Detected::default(),
            Ok(Err(_)) => return None,
            Ok(Ok(0)) => break Detected::default(),
            Ok(Ok(_)) => {}
        }
        if let Outcome::Done(d) = detect::inspect(&buf, tls, http) {
            break d;
        }
    };
    Some((detected, Rewind::new(buf, io)))
}

/// The original destination and source of an internal connection: from
/// the shared filter state or else the passed metadata (the `original_dst`
/// listener filter, as Envoy's reads them on an internal listener).
fn addresses(
    listener: &Listener,
    meta: &OriginalDstMeta,
    state: Option<&FilterState>,
) -> (SocketAddr, SocketAddr) {
    if !listener.listener_filters.original_dst {
        return (UNSPECIFIED, UNSPECIFIED);
    }
    let dst = state
        .and_then(|s| s.address(ORIGINAL_DST_LOCAL))
        .or(meta.local)
        .unwrap_or(UNSPECIFIED);
    let peer = state
        .and_then(|s| s.address(ORIGINAL_DST_REMOTE))
        .unwrap_or(UNSPECIFIED);
    (dst, peer)
}

/// Serves one internal connection on the chain chosen for it: TCP or HTTP
/// as on a socket.
async fn handle(
    rt: Arc<Runtime>,
    conn: InternalConn,
    registered: crate::filter_chain_update::Registered,
    dst: SocketAddr,
    peer: SocketAddr,
) {
    let live = registered.live.clone();
    // The state the connection came with, and what the chain's
    // set_filter_state adds to it.
    let mut filter_state = None;
    let inherited = conn.filter_state;
    let (rbac, chain) = live.attach_rbac(|c| {
        filter_state = crate::network_set_filter_state::on_new_connection(
            c,
            inherited,
            peer,
            (dst, conn.local.as_ref()),
        );
        let downstream = crate::rbac::Downstream {
            peer,
            local: dst,
            server_name: String::new(),
            tls: None,
            filter_state: filter_state.clone(),
        };
        crate::rbac::ConnRbac::new(&c.rbac, rt.clone(), downstream)
    });
    let conn_meta = crate::tcp::ConnMeta {
        waypoint: conn.meta.waypoint,
        filter_state: filter_state.clone(),
        local_internal: conn.local.clone().map(Arc::new),
    };
    match &chain.kind {
        ChainKind::Tcp(tp) => {
            let stats = rt.tcp_stats(&tp.stat_prefix);
            // The caller's full close closes the connection to the
            // upstream, as Envoy's TCP proxy does, where its half-close
            // is passed on.
            let io = ResetOnClose(conn.io);
            let io = crate::rbac::guard(io, &rbac);
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
                conn_meta,
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
                &rt,
                &chain,
                io,
                http2,
                peer,
                (dst, conn.local),
                &live,
                filter_state,
            ))
            .await;
        }
    }
}
