//! Listeners: binding, the accept loop under the drain signal, and the
//! per-connection path (original destination → hand-off to the listener for
//! that destination → protocol detection → filter chain → TCP or HTTP).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_model::{ChainKind, HttpCodec, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::detect::{self, Detected, Outcome};
use crate::drain::ConnGuard;
use crate::filter_chain_update::{LiveConn, Registered};
use crate::http::PeerTls;
use crate::run::Runtime;

/// Binds a listener's socket (reusable address, large backlog).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// One bound listener's current configuration, read by its accept loops.
pub struct ListenerSlot {
    config: ArcSwap<Listener>,
}

struct Active {
    fingerprint: u64,
    addresses: Vec<SocketAddr>,
    slot: Arc<ListenerSlot>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Active {
    fn drop(&mut self) {
        // Closing the sockets stops accepting; what becomes of the
        // connections already accepted is the update's business
        // (`filter_chain_update`).
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The listeners that are bound, diffed by name against each new snapshot.
#[derive(Default)]
pub struct ListenerManager {
    active: HashMap<String, Active>,
}

impl ListenerManager {
    /// Brings the bound sockets in line with `listeners`: a listener keeps
    /// its sockets while its addresses stay (new connections get its new
    /// configuration), one moved to other addresses is bound again, removed
    /// ones stop accepting. Returns the listeners that could not be bound.
    /// The connections already open were measured against the new versions
    /// before ([`crate::filter_chain_update`]).
    pub fn reconcile(
        &mut self,
        rt: &Arc<Runtime>,
        listeners: &[Arc<Listener>],
    ) -> Vec<(String, std::io::Error)> {
        let mut errors = Vec::new();
        let wanted: HashMap<&str, &Arc<Listener>> = listeners
            .iter()
            .filter(|l| l.bind_to_port)
            .map(|l| (l.name.as_str(), l))
            .collect();
        self.active
            .retain(|name, _| wanted.contains_key(name.as_str()));
        for (name, l) in wanted {
            let addresses: Vec<SocketAddr> = l.addresses().collect();
            match self.active.get_mut(name) {
                Some(a) if a.fingerprint == l.fingerprint => a.slot.config.store(l.clone()),
                Some(a) if a.addresses == addresses => {
                    a.slot.config.store(l.clone());
                    a.fingerprint = l.fingerprint;
                }
                _ => {
                    // New, or moved to other addresses: (re)bind.
                    self.active.remove(name);
                    match Self::start(rt, l, &addresses) {
                        Ok(a) => {
                            self.active.insert(name.to_string(), a);
                        }
                        Err(e) => errors.push((name.to_string(), e)),
                    }
                }
            }
        }
        errors
    }

    fn start(
        rt: &Arc<Runtime>,
        l: &Arc<Listener>,
        addresses: &[SocketAddr],
    ) -> std::io::Result<Active> {
        let sockets = addresses
            .iter()
            .map(|a| bind(*a))
            .collect::<std::io::Result<Vec<_>>>()?;
        let slot = Arc::new(ListenerSlot {
            config: ArcSwap::new(l.clone()),
        });
        let tasks = sockets
            .into_iter()
            .map(|tcp| {
                tracing::info!(listener.name = %l.name, listener.address = ?tcp.local_addr().ok(), "listening");
                tokio::spawn(accept_loop(rt.clone(), slot.clone(), tcp))
            })
            .collect();
        Ok(Active {
            fingerprint: l.fingerprint,
            addresses: addresses.to_vec(),
            slot,
            tasks,
        })
    }
}

/// Accepts until the listener is stopped (a drain, or `drain_listeners`)
/// or removed.
async fn accept_loop(rt: Arc<Runtime>, slot: Arc<ListenerSlot>, tcp: TcpListener) {
    // An inbound listener stops with the inbound drain (a sidecar's
    // termination), any listener with the process's.
    let drained = rt.drain_for(&slot.config.load().name).clone();
    let signaled = drained.stopped();
    tokio::pin!(signaled);
    let Ok(local) = tcp.local_addr() else { return };
    let accepted = rt.listener_stats(local);
    loop {
        tokio::select! {
            biased;
            _ = &mut signaled => break,
            r = tcp.accept() => match r {
                Ok((stream, peer)) => {
                    accepted.inc();
                    let guard = rt.drain.track();
                    let listener = slot.config.load_full();
                    tokio::spawn(handle(rt.clone(), listener, stream, peer, guard));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(listener.address = %local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    tracing::debug!(listener.address = %local, "listener stopped accepting");
}

async fn handle(
    rt: Arc<Runtime>,
    accepted_on: Arc<Listener>,
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let redirected =
        accepted_on.use_original_dst || accepted_on.listener_filters.original_dst_for(local);
    let dst = if redirected {
        crate::orig_dst::original_dst(&stream, local).unwrap_or(local)
    } else {
        local
    };
    tracing::trace!(listener.name = %accepted_on.name, src.addr = %peer, local = %local, dst = %dst, "connection accepted");
    // Envoy's use_original_dst: the listener bound to the original destination
    // takes the connection over, with its own listener filters and chains.
    let listener = if accepted_on.use_original_dst && dst != local {
        let snap = rt.snapshot.load();
        let found = snap
            .listener_for_original_dst(dst)
            .filter(|l| !Arc::ptr_eq(l, &accepted_on))
            .cloned();
        tracing::debug!(
            listener.name = %accepted_on.name,
            dst = %dst,
            handed.to = ?found.as_ref().map(|l| &l.name),
            config.version = %snap.version,
            "original destination"
        );
        found.unwrap_or(accepted_on)
    } else {
        accepted_on
    };
    if let Some(k) = &listener.tcp_keepalive {
        crate::cluster::keepalive(&stream, k);
    }
    // What runs after detection (the TLS handshake, the proxied stream, the
    // connection manager) is boxed where it starts: the task spawned per
    // connection holds only what its connection uses, not room for the
    // largest of them (see the sizes asserted in the tests below).
    let needs = listener.detection_needs(Some(dst));
    // The listener's limit, as Envoy's `listener_filters_timeout`; a
    // listener without one (`0s`) waits for the client as Envoy does,
    // unless the operator capped that (`--protocol-detection-timeout`).
    // A short default would send a slow HTTP client to the TCP chain.
    let timeout = listener.detection_timeout.or(rt.detection_timeout);
    let detected = if needs.any() {
        match peek_detect(
            &stream,
            needs.tls,
            needs.http,
            timeout,
            listener.close_on_detection_timeout,
        )
        .await
        {
            Some(d) => d,
            None => return,
        }
    } else {
        Detected::default()
    };
    let info = detected.connection_info(&listener, dst, peer);
    // The connection joins the live ones with its chain: a later update
    // of the listener measures it against the new chain versions.
    let Some(registered) = rt
        .conns
        .register(&listener, info, rt.drain_for(&listener.name))
    else {
        tracing::debug!(listener.name = %listener.name, dst = %dst, "no filter chain matched; closing");
        crate::access_log::connection::no_filter_chain(
            &rt,
            &listener,
            peer,
            (dst, None),
            detected.server_name.as_deref(),
        );
        rt.stats
            .counter(&format!("listener.{}.no_filter_chain_match", listener.name))
            .inc();
        return;
    };
    let live = registered.live.clone();
    let chain = live.chain();
    if chain.tls.is_some() {
        let tls = match Box::pin(crate::tls::accept(&rt.tls, &chain, stream)).await {
            Ok(s) => {
                rt.stats
                    .counter(&format!("listener.{}.ssl.handshake", listener.name))
                    .inc();
                s
            }
            Err(e) => {
                // A failed handshake (untrusted or unexpected peer, no
                // certificate, secrets not there yet) closes this connection
                // only.
                rt.stats
                    .counter(&format!("listener.{}.ssl.connection_error", listener.name))
                    .inc();
                tracing::debug!(listener.name = %listener.name, chain = %chain.name, src.addr = %peer, error = %e, "downstream TLS handshake failed");
                return;
            }
        };
        let alpn = tls.alpn_protocol().map(<[u8]>::to_vec);
        let mtls = tls.peer_certificates().is_some();
        // The certificate's names are read for every mTLS connection (once
        // per distinct client chain): an update may give its chain RBAC on
        // principals (or XFCC) later, and the re-check needs them then.
        let peer_chain = tls
            .peer_certificates()
            .and_then(|certs| rt.tls.peer(&chain, certs));
        if let Some(p) = &peer_chain {
            live.set_peer(p.clone());
        }
        tracing::trace!(listener.name = %listener.name, peer.identity = ?peer_chain.as_ref().and_then(|p| p.identity.as_deref()), "downstream TLS established");
        let server_name = detected
            .server_name
            .clone()
            .or_else(|| tls.server_name().map(str::to_string))
            .unwrap_or_default();
        let client_cert = peer_chain.as_ref().map(|p| p.client_cert.clone());
        let downstream = crate::rbac::Downstream {
            peer,
            local: dst,
            server_name: server_name.clone(),
            tls: Some(crate::rbac::DownstreamTls {
                client_cert: client_cert.clone(),
            }),
            filter_state: None,
        };
        // The chain may have moved on during the handshake (an update that
        // changed only its network RBAC): its current RBAC applies.
        let mut filter_state = None;
        let (rbac, chain) = live.attach_rbac(|c| {
            filter_state =
                crate::network_set_filter_state::on_new_connection(c, None, peer, (dst, None));
            let downstream = crate::rbac::Downstream {
                filter_state: filter_state.clone(),
                ..downstream
            };
            crate::rbac::ConnRbac::new(&c.rbac, rt.clone(), downstream)
        });
        // Istio's metrics name the peer by its certificate.
        let identity = chain
            .istio_stats
            .is_some()
            .then(|| peer_chain.as_ref().and_then(|p| p.identity.clone()))
            .flatten();
        let peer_tls = PeerTls {
            mtls,
            identity,
            client_cert,
        };
        match &chain.kind {
            ChainKind::Tcp(tp) => {
                let stats = rt.tcp_stats(&tp.stat_prefix);
                // The chain's metadata exchange, when the client took its
                // protocol.
                let speak = chain
                    .metadata_exchange
                    .as_deref()
                    .is_some_and(|p| alpn.as_deref() == Some(p.as_bytes()));
                let (tls, exchanged) = if speak {
                    Box::pin(crate::metadata_exchange::exchange(tls, &rt.istio.local)).await
                } else {
                    (crate::tls::Rewind::new(Vec::new(), tls), None)
                };
                let istio = tcp_metrics(&rt, &chain, tp, Some(&peer_tls), exchanged);
                let io = crate::rbac::guard(tls, &rbac);
                let io = crate::network_ext_authz::gate(io, &rt, &chain.ext_authz, &rbac);
                Box::pin(crate::tcp::proxy(
                    &rt,
                    tp,
                    &stats,
                    istio,
                    io,
                    dst,
                    &live.drain,
                    peer,
                    &server_name,
                    crate::tcp::ConnMeta {
                        waypoint: None,
                        filter_state,
                        local_internal: None,
                    },
                ))
                .await;
            }
            ChainKind::Http(hcm) => {
                let http2 = match (hcm.codec, alpn.as_deref()) {
                    (HttpCodec::Http1, _) => false,
                    (HttpCodec::Http2, _) => true,
                    (HttpCodec::Auto, Some(b"h2")) => true,
                    (HttpCodec::Auto, Some(b"http/1.1" | b"http/1.0")) => false,
                    // No ALPN (or Istio's own): the HTTP/2 preface decides.
                    (HttpCodec::Auto, _) => {
                        let Some((h2, io)) = Box::pin(crate::tls::sniff_h2(tls)).await else {
                            return;
                        };
                        let io = crate::rbac::guard(io, &rbac);
                        let conn = Conn {
                            peer,
                            dst,
                            tls: Some(peer_tls),
                            server_name,
                            filter_state,
                            local_internal: None,
                        };
                        let serve = serve_http(rt.clone(), chain.clone(), io, h2, conn, live);
                        serve_apart(guard, registered, serve);
                        return;
                    }
                };
                let io = crate::rbac::guard(tls, &rbac);
                let conn = Conn {
                    peer,
                    dst,
                    tls: Some(peer_tls),
                    server_name,
                    filter_state,
                    local_internal: None,
                };
                let serve = serve_http(rt.clone(), chain.clone(), io, http2, conn, live);
                serve_apart(guard, registered, serve);
            }
        }
        return;
    }
    let server_name = detected.server_name.clone().unwrap_or_default();
    let downstream = crate::rbac::Downstream {
        peer,
        local: dst,
        server_name: server_name.clone(),
        tls: None,
        filter_state: None,
    };
    let mut filter_state = None;
    let (rbac, chain) = live.attach_rbac(|c| {
        filter_state =
            crate::network_set_filter_state::on_new_connection(c, None, peer, (dst, None));
        let downstream = crate::rbac::Downstream {
            filter_state: filter_state.clone(),
            ..downstream
        };
        crate::rbac::ConnRbac::new(&c.rbac, rt.clone(), downstream)
    });
    match &chain.kind {
        ChainKind::Tcp(tp) => {
            let stats = rt.tcp_stats(&tp.stat_prefix);
            let istio = tcp_metrics(&rt, &chain, tp, None, None);
            let io = crate::rbac::guard(stream, &rbac);
            let io = crate::network_ext_authz::gate(io, &rt, &chain.ext_authz, &rbac);
            Box::pin(crate::tcp::proxy(
                &rt,
                tp,
                &stats,
                istio,
                io,
                dst,
                &live.drain,
                peer,
                &server_name,
                crate::tcp::ConnMeta {
                    waypoint: None,
                    filter_state,
                    local_internal: None,
                },
            ))
            .await;
        }
        ChainKind::Http(hcm) => {
            let http2 = match hcm.codec {
                HttpCodec::Http1 => false,
                HttpCodec::Http2 => true,
                HttpCodec::Auto if needs.http => detected.http2(),
                // Nobody looked yet: the HTTP/2 preface decides, as soon as
                // the first bytes match it or not (so the connection
                // manager's timers see a slow request's first byte).
                HttpCodec::Auto => match peek_h2_preface(&stream, Duration::from_secs(15)).await {
                    Some(h2) => h2,
                    None => return,
                },
            };
            let io = crate::rbac::guard(stream, &rbac);
            let conn = Conn {
                peer,
                dst,
                tls: None,
                server_name,
                filter_state,
                local_internal: None,
            };
            let serve = serve_http(rt.clone(), chain.clone(), io, http2, conn, live);
            serve_apart(guard, registered, serve);
        }
    }
}

/// Serves an established connection in a task of its own, which holds only
/// what serving needs. The accepting task ends here, and with it the room
/// its future kept for the detection, the handshake and what they held:
/// about 1.3 KiB per connection, for the connection's whole life. The
/// connection stays registered (`registered`, for configuration updates)
/// and counted (`guard`, for the drain) until it is done.
fn serve_apart<F>(guard: ConnGuard, registered: Registered, serve: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        serve.await;
        drop(registered);
        drop(guard);
    });
}

/// What the connection manager learns of its downstream connection.
struct Conn {
    peer: SocketAddr,
    dst: SocketAddr,
    tls: Option<PeerTls>,
    /// SNI, "" without one.
    server_name: String,
    /// The filter state an internal connection came with.
    filter_state: Option<Arc<ferry_model::filter_state::FilterState>>,
    /// An internal listener's own address, when it is the local address.
    local_internal: Option<ferry_model::cluster::InternalAddr>,
}

/// Istio's metrics of a connection on `chain`, when it reports them.
fn conn_metrics(
    rt: &Runtime,
    chain: &ferry_model::FilterChain,
    tls: Option<&PeerTls>,
) -> Option<crate::metrics::ConnMetrics> {
    let cfg = chain.istio_stats?;
    Some(crate::metrics::ConnMetrics::new(
        rt.istio.clone(),
        cfg,
        tls.and_then(|t| t.identity.as_deref()),
        tls.is_some_and(|t| t.mtls),
    ))
}

/// The TCP counters of a proxied connection: the service comes from the
/// cluster name or its `istio.services` metadata, the peer from its
/// certificate and the TCP metadata exchange (`peer`, inbound; the
/// upstream's, outbound).
fn tcp_metrics(
    rt: &Runtime,
    chain: &ferry_model::FilterChain,
    tp: &ferry_model::TcpProxy,
    tls: Option<&PeerTls>,
    peer: Option<crate::metadata_exchange::Peer>,
) -> Option<Box<crate::tcp::IstioTcp>> {
    let m = conn_metrics(rt, chain, tls)?;
    let snapshot = rt.snapshot.load();
    let service = crate::metrics::service_of_cluster(&tp.cluster)
        .or_else(|| {
            snapshot
                .cluster(&tp.cluster)
                .and_then(|c| c.istio_service.as_deref())
        })
        .unwrap_or("")
        .to_string();
    Some(Box::new(crate::tcp::IstioTcp {
        conn: m,
        service,
        peer,
    }))
}

/// Runs the HTTP connection manager of `chain` on a (plaintext or
/// decrypted) downstream connection.
fn serve_http<S>(
    rt: Arc<Runtime>,
    chain: Arc<ferry_model::FilterChain>,
    io: S,
    http2: bool,
    conn: Conn,
    live: Arc<LiveConn>,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The context is made before the future: the future keeps only it.
    let ctx = connection_context(rt, chain, conn, &live);
    async move {
        if let Some(ctx) = ctx {
            crate::http::serve(io, ctx, http2, &live.drain).await;
        }
    }
}

/// The connection manager's context of a connection on `chain`, when it
/// is an HTTP chain.
fn connection_context(
    rt: Arc<Runtime>,
    chain: Arc<ferry_model::FilterChain>,
    conn: Conn,
    live: &Arc<LiveConn>,
) -> Option<Arc<crate::http::ConnCtx>> {
    let ChainKind::Http(hcm) = &chain.kind else {
        return None;
    };
    let istio = conn_metrics(&rt, &chain, conn.tls.as_ref()).map(Box::new);
    Some(Arc::new(crate::http::ConnCtx {
        istio,
        stats: rt.http_stats(&hcm.stat_prefix),
        rt,
        chain,
        peer: conn.peer,
        original_dst: conn.dst,
        tls: conn.tls,
        closing: std::sync::atomic::AtomicBool::new(false),
        ratelimit_buckets: Default::default(),
        server_name: conn.server_name,
        rbac_view: Default::default(),
        live: live.clone(),
        h1: Default::default(),
        life: Default::default(),
        filter_state: conn.filter_state,
        local_internal: conn.local_internal,
    }))
}

/// Runs the HTTP connection manager of `chain` on an internal listener's
/// in-process connection (no TLS, no SNI).
#[allow(clippy::too_many_arguments)] // the connection's whole context, once
pub(crate) async fn serve_internal_http<S>(
    rt: &Arc<Runtime>,
    chain: &Arc<ferry_model::FilterChain>,
    io: S,
    http2: bool,
    peer: SocketAddr,
    (dst, local_internal): (SocketAddr, Option<ferry_model::cluster::InternalAddr>),
    live: &Arc<LiveConn>,
    filter_state: Option<Arc<ferry_model::filter_state::FilterState>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Conn {
        peer,
        dst,
        tls: None,
        server_name: String::new(),
        filter_state,
        local_internal,
    };
    serve_http(rt.clone(), chain.clone(), io, http2, conn, live.clone()).await;
}

/// Peeks until the first bytes are the HTTP/2 preface or cannot be; `None`:
/// the connection failed. A client silent for `within` is served as
/// HTTP/1 (whose timers then apply).
async fn peek_h2_preface(stream: &TcpStream, within: Duration) -> Option<bool> {
    let mut buf = [0u8; 24];
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Some(false),
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => n,
        };
        if let Some(h2) = detect::h2_preface(&buf[..n]) {
            return Some(h2);
        }
        if n == seen {
            // Nothing new yet; peek would return at once again.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
    }
}

/// Peeks at the first bytes until the inspectors decide. Waits at most
/// `first_byte` for the client to speak (a server-first protocol never does),
/// and a bounded time more for a partial ClientHello or request line.
/// `None`: the connection failed.
async fn peek_detect(
    stream: &TcpStream,
    tls: bool,
    http: bool,
    limit: Option<Duration>,
    close_on_timeout: bool,
) -> Option<Detected> {
    // Out of time: go on with nothing detected, or close (None).
    let expired = || (!close_on_timeout).then(Detected::default);
    let mut buf = vec![0u8; 1024];
    // No limit: a deadline no connection reaches (a year). The limit is
    // the whole detection's, from the accept, as Envoy's.
    let limit = limit.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = 0;
    // While a partial message stalls, peeking again returns at once: poll
    // with a growing pause (bounded, so a slow sender costs few wake-ups).
    let mut pause = Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return expired(),
            Ok(Err(_)) => return None,
            Ok(Ok(0)) => return Some(Detected::default()),
            Ok(Ok(n)) => n,
        };
        match detect::inspect(&buf[..n], tls, http) {
            Outcome::Done(d) => return Some(d),
            Outcome::NeedMore => {
                if n == buf.len() && buf.len() < detect::MAX_PEEK {
                    buf.resize((buf.len() * 4).min(detect::MAX_PEEK), 0);
                } else if n == seen {
                    if tokio::time::Instant::now() >= deadline {
                        return expired();
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                } else {
                    pause = Duration::from_millis(1);
                }
                seen = n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Plain = crate::rbac::Guarded<TcpStream>;
    type Tls = crate::rbac::Guarded<Box<crate::tls_server_stream::TlsServerStream>>;
    type TlsTcp =
        crate::rbac::Guarded<crate::tls::Rewind<Box<crate::tls_server_stream::TlsServerStream>>>;

    /// A task is allocated with room for the largest state its future can
    /// reach, and kept until the future is done. The accepting task
    /// (`handle`) lives only until the connection is established: what
    /// serves it runs in a task of its own (`serve_apart`), whose future
    /// holds only what serving needs, for the connection's whole life.
    /// What each kind of connection needs beyond that is boxed where it
    /// starts (the codecs). A proxied TCP connection is still served by its
    /// accepting task: its own future is larger than the accepting one, so
    /// moving it would free little, and the accepting task's freed pages
    /// stayed resident (7.1 KiB per idle connection against 5.5). Upper
    /// bounds, for debug and release.
    #[test]
    fn per_connection_future_sizes() {
        let sizes = [
            ("handle", crate::future_sizes::of5(handle), 1360),
            (
                "serve_http (plain)",
                crate::future_sizes::of6(serve_http::<Plain>),
                256,
            ),
            (
                "serve_http (TLS)",
                crate::future_sizes::of6(serve_http::<Tls>),
                256,
            ),
            (
                "tcp::proxy (plain)",
                crate::future_sizes::of10(crate::tcp::proxy::<Plain>),
                2048,
            ),
            (
                "tcp::proxy (TLS)",
                crate::future_sizes::of10(crate::tcp::proxy::<TlsTcp>),
                2048,
            ),
            (
                "TLS stream, as passed on",
                std::mem::size_of::<Tls>(),
                std::mem::size_of::<Plain>(),
            ),
        ];
        crate::future_sizes::assert_within(&sizes);
    }
}
