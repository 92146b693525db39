//! Listeners: binding, the accept loop under the drain signal, and the
//! per-connection path (original destination → hand-off to the listener for
//! that destination → protocol detection → filter chain → TCP or HTTP).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_model::listener::ForwardClientCert;
use ferry_model::{ChainKind, ConnectionInfo, HttpCodec, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::detect::{self, Detected, Outcome};
use crate::drain::{ConnGuard, Drain};
use crate::http::PeerTls;
use crate::run::Runtime;

/// How long detection waits for a client's first bytes when the listener
/// sets no timeout: short, so server-first protocols are not stalled.
pub const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_millis(10);

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

/// One listener's live state: its current configuration and the drain of
/// the generation of connections accepted under it.
pub struct ListenerSlot {
    config: ArcSwap<Listener>,
    generation: ArcSwap<Drain>,
}

struct Active {
    fingerprint: u64,
    addresses: Vec<SocketAddr>,
    slot: Arc<ListenerSlot>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Active {
    fn drop(&mut self) {
        // Closing the sockets stops accepting; connections already accepted
        // drain under their generation.
        for t in &self.tasks {
            t.abort();
        }
        self.slot.generation.load().start();
    }
}

/// The listeners that are bound, diffed by name against each new snapshot.
#[derive(Default)]
pub struct ListenerManager {
    active: HashMap<String, Active>,
    /// Set by `/drain_listeners`: these listeners stay closed, also when a
    /// later update brings them again (as Envoy's stopped listeners).
    stopped: Option<StopListeners>,
}

/// Which listeners `/drain_listeners` stops (Envoy's `StopListenersType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopListeners {
    All,
    /// Those whose `traffic_direction` is INBOUND (`?inboundonly`).
    InboundOnly,
}

impl StopListeners {
    fn covers(self, l: &Listener) -> bool {
        self == StopListeners::All || l.inbound
    }
}

impl ListenerManager {
    /// Brings the bound listeners in line with `listeners`: unchanged ones
    /// are not touched; a changed one keeps its sockets but accepts with the
    /// new configuration while its earlier connections drain; removed ones
    /// stop. Returns the listeners that could not be bound.
    pub fn reconcile(
        &mut self,
        rt: &Arc<Runtime>,
        listeners: &[Arc<Listener>],
    ) -> Vec<(String, std::io::Error)> {
        let mut errors = Vec::new();
        let wanted: HashMap<&str, &Arc<Listener>> = listeners
            .iter()
            .filter(|l| l.bind_to_port && !self.stopped.is_some_and(|s| s.covers(l)))
            .map(|l| (l.name.as_str(), l))
            .collect();
        self.active
            .retain(|name, _| wanted.contains_key(name.as_str()));
        for (name, l) in wanted {
            let addresses: Vec<SocketAddr> = l.addresses().collect();
            match self.active.get_mut(name) {
                Some(a) if a.fingerprint == l.fingerprint => a.slot.config.store(l.clone()),
                Some(a) if a.addresses == addresses => {
                    tracing::info!(listener.name = %name, "listener changed; draining its connections");
                    a.slot.config.store(l.clone());
                    let old = a.slot.generation.swap(Arc::new(rt.drain.child()));
                    old.start();
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

    /// `/drain_listeners`: closes these listeners' sockets now; the
    /// connections they accepted drain (HTTP/1 closes after the response
    /// in flight, HTTP/2 gets GOAWAY).
    pub fn stop(&mut self, which: StopListeners) {
        self.stopped = Some(match self.stopped {
            Some(StopListeners::All) => StopListeners::All,
            _ => which,
        });
        self.active.retain(|name, a| {
            let stop = which.covers(&a.slot.config.load());
            if stop {
                tracing::info!(listener.name = %name, "listener stopped by /drain_listeners");
            }
            !stop
        });
    }

    /// The first part of `/drain_listeners?graceful`: the connections of
    /// these listeners are asked to close while the listeners still accept
    /// (new connections are asked too).
    pub fn drain_connections(&self, which: StopListeners) {
        for a in self.active.values() {
            if which.covers(&a.slot.config.load()) {
                a.slot.generation.load().start();
            }
        }
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
            generation: ArcSwap::from_pointee(rt.drain.child()),
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

/// Accepts until the process drains or the listener is removed.
async fn accept_loop(rt: Arc<Runtime>, slot: Arc<ListenerSlot>, tcp: TcpListener) {
    let drained = rt.drain.clone();
    let signaled = drained.signaled();
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
                    let generation = slot.generation.load_full();
                    tokio::spawn(handle(rt.clone(), listener, generation, stream, peer, guard));
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
    generation: Arc<Drain>,
    stream: TcpStream,
    peer: SocketAddr,
    _guard: ConnGuard,
) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let redirected = accepted_on.use_original_dst || accepted_on.listener_filters.original_dst;
    let dst = if redirected {
        crate::orig_dst::original_dst(&stream, local).unwrap_or(local)
    } else {
        local
    };
    // Envoy's use_original_dst: the listener bound to the original destination
    // takes the connection over, with its own listener filters and chains.
    let listener = if accepted_on.use_original_dst && dst != local {
        let snap = rt.snapshot.load();
        snap.listener_for_original_dst(dst)
            .filter(|l| !Arc::ptr_eq(l, &accepted_on))
            .cloned()
            .unwrap_or(accepted_on)
    } else {
        accepted_on
    };
    let needs = listener.detection_needs(Some(dst));
    let timeout = listener.detection_timeout.unwrap_or(rt.detection_timeout);
    let detected = if needs.any() {
        match peek_detect(&stream, needs.tls, needs.http, timeout).await {
            Some(d) => d,
            None => return,
        }
    } else {
        Detected::default()
    };
    let info = ConnectionInfo {
        destination: Some(dst),
        source: Some(peer),
        server_name: detected.server_name.clone(),
        transport_protocol: listener
            .listener_filters
            .tls_inspector
            .then_some(if detected.tls { "tls" } else { "raw_buffer" }),
        application_protocols: detected.application_protocols.clone(),
    };
    let Some(chain) = listener.select_chain(&info).cloned() else {
        tracing::debug!(listener.name = %listener.name, dst = %dst, "no filter chain matched; closing");
        crate::access_log::connection::no_filter_chain(
            &rt,
            &listener,
            peer,
            dst,
            detected.server_name.as_deref(),
        );
        rt.stats
            .counter(&format!("listener.{}.no_filter_chain_match", listener.name))
            .inc();
        return;
    };
    if chain.tls.is_some() {
        let tls = match crate::tls::accept(&rt.tls, &chain, stream).await {
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
        // The identity is parsed only when trace logging is on.
        tracing::trace!(listener.name = %listener.name, peer.identity = ?crate::tls::peer_identity(&tls), "downstream TLS established");
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let mtls = tls.get_ref().1.peer_certificates().is_some();
        let server_name = detected
            .server_name
            .clone()
            .or_else(|| tls.get_ref().1.server_name().map(str::to_string))
            .unwrap_or_default();
        // The certificate's names are read only for the filters that need
        // them: x-forwarded-client-cert and RBAC principals.
        let client_cert = match &chain.kind {
            ChainKind::Http(h)
                if matches!(
                    h.forward_client_cert,
                    ForwardClientCert::AppendForward | ForwardClientCert::SanitizeSet
                ) || uses_rbac(&chain) =>
            {
                crate::tls::client_cert_info(&rt.tls, &chain, &tls)
            }
            ChainKind::Tcp(_) if uses_rbac(&chain) => {
                crate::tls::client_cert_info(&rt.tls, &chain, &tls)
            }
            _ => None,
        };
        let downstream = crate::rbac::Downstream {
            peer,
            local: dst,
            server_name: server_name.clone(),
            tls: Some(crate::rbac::DownstreamTls {
                client_cert: client_cert.clone(),
            }),
        };
        // Istio's metrics name the peer by its certificate.
        let identity = chain
            .istio_stats
            .is_some()
            .then(|| crate::tls::peer_identity(&tls))
            .flatten();
        let peer_tls = PeerTls {
            mtls,
            identity,
            client_cert,
        };
        match &chain.kind {
            ChainKind::Tcp(tp) => {
                let stats = rt.tcp_stats(&tp.stat_prefix);
                let istio = tcp_metrics(&rt, &chain, tp, Some(&peer_tls));
                let io = crate::rbac::guard(tls, &chain.rbac, rt.clone(), &downstream);
                crate::tcp::proxy(
                    &rt,
                    tp,
                    &stats,
                    istio,
                    io,
                    dst,
                    &generation,
                    peer,
                    &server_name,
                )
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
                        let Some((h2, io)) = crate::tls::sniff_h2(tls).await else {
                            return;
                        };
                        let io = crate::rbac::guard(io, &chain.rbac, rt.clone(), &downstream);
                        let conn = Conn {
                            peer,
                            dst,
                            tls: Some(peer_tls),
                            server_name,
                        };
                        serve_http(&rt, &chain, io, h2, conn, &generation).await;
                        return;
                    }
                };
                let io = crate::rbac::guard(tls, &chain.rbac, rt.clone(), &downstream);
                let conn = Conn {
                    peer,
                    dst,
                    tls: Some(peer_tls),
                    server_name,
                };
                serve_http(&rt, &chain, io, http2, conn, &generation).await;
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
    };
    match &chain.kind {
        ChainKind::Tcp(tp) => {
            let stats = rt.tcp_stats(&tp.stat_prefix);
            let istio = tcp_metrics(&rt, &chain, tp, None);
            let io = crate::rbac::guard(stream, &chain.rbac, rt.clone(), &downstream);
            crate::tcp::proxy(
                &rt,
                tp,
                &stats,
                istio,
                io,
                dst,
                &generation,
                peer,
                &server_name,
            )
            .await;
        }
        ChainKind::Http(hcm) => {
            let http2 = match hcm.codec {
                HttpCodec::Http1 => false,
                HttpCodec::Http2 => true,
                HttpCodec::Auto if needs.http => detected.http2(),
                // Nobody looked yet: the HTTP/2 preface decides.
                HttpCodec::Auto => {
                    match peek_detect(&stream, false, true, Duration::from_secs(15)).await {
                        Some(d) => d.http2(),
                        None => return,
                    }
                }
            };
            let io = crate::rbac::guard(stream, &chain.rbac, rt.clone(), &downstream);
            let conn = Conn {
                peer,
                dst,
                tls: None,
                server_name,
            };
            serve_http(&rt, &chain, io, http2, conn, &generation).await;
        }
    }
}

/// What the connection manager learns of its downstream connection.
struct Conn {
    peer: SocketAddr,
    dst: SocketAddr,
    tls: Option<PeerTls>,
    /// SNI, "" without one.
    server_name: String,
}

/// Whether a chain runs RBAC (network or HTTP), which reads the client
/// certificate's names.
fn uses_rbac(chain: &ferry_model::FilterChain) -> bool {
    !chain.rbac.is_empty()
        || matches!(&chain.kind, ChainKind::Http(h) if h.http_filters.iter().any(|f| {
            matches!(f.config, ferry_model::HttpFilterConfig::Rbac(_))
        }))
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
/// cluster name or its `istio.services` metadata (the metadata exchange of
/// TCP is not spoken).
fn tcp_metrics(
    rt: &Runtime,
    chain: &ferry_model::FilterChain,
    tp: &ferry_model::TcpProxy,
    tls: Option<&PeerTls>,
) -> Option<Arc<crate::metrics::TcpSeries>> {
    let m = conn_metrics(rt, chain, tls)?;
    let snapshot = rt.snapshot.load();
    let service = crate::metrics::service_of_cluster(&tp.cluster)
        .or_else(|| {
            snapshot
                .cluster(&tp.cluster)
                .and_then(|c| c.istio_service.as_deref())
        })
        .unwrap_or("");
    let set = m.label_set(service, None, "tcp");
    Some(rt.istio.tcp_series(&set))
}

/// Runs the HTTP connection manager of `chain` on a (plaintext or
/// decrypted) downstream connection.
async fn serve_http<S>(
    rt: &Arc<Runtime>,
    chain: &Arc<ferry_model::FilterChain>,
    io: S,
    http2: bool,
    conn: Conn,
    generation: &Drain,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ChainKind::Http(hcm) = &chain.kind else {
        return;
    };
    let istio = conn_metrics(rt, chain, conn.tls.as_ref());
    let ctx = Arc::new(crate::http::ConnCtx {
        istio,
        stats: rt.http_stats(&hcm.stat_prefix),
        rt: rt.clone(),
        chain: chain.clone(),
        peer: conn.peer,
        original_dst: conn.dst,
        tls: conn.tls,
        closing: std::sync::atomic::AtomicBool::new(false),
        ratelimit_buckets: Default::default(),
        server_name: conn.server_name,
        rbac_view: Default::default(),
    });
    crate::http::serve(io, ctx, http2, generation).await;
}

/// Peeks at the first bytes until the inspectors decide. Waits at most
/// `first_byte` for the client to speak (a server-first protocol never does),
/// and a bounded time more for a partial ClientHello or request line.
/// `None`: the connection failed.
async fn peek_detect(
    stream: &TcpStream,
    tls: bool,
    http: bool,
    first_byte: Duration,
) -> Option<Detected> {
    let mut buf = vec![0u8; 1024];
    let deadline = tokio::time::Instant::now() + first_byte;
    let mut rest_deadline = None;
    let mut seen = 0;
    loop {
        let until = rest_deadline.unwrap_or(deadline);
        let n = match tokio::time::timeout_at(until, stream.peek(&mut buf)).await {
            Err(_) => return Some(Detected::default()),
            Ok(Err(_)) => return None,
            Ok(Ok(0)) => return Some(Detected::default()),
            Ok(Ok(n)) => n,
        };
        match detect::inspect(&buf[..n], tls, http) {
            Outcome::Done(d) => return Some(d),
            Outcome::NeedMore => {
                let until = *rest_deadline.get_or_insert(
                    tokio::time::Instant::now() + first_byte.max(Duration::from_secs(1)),
                );
                if n == buf.len() && buf.len() < detect::MAX_PEEK {
                    buf.resize((buf.len() * 4).min(detect::MAX_PEEK), 0);
                } else if n == seen {
                    // Nothing new arrived; peek would return at once again.
                    if tokio::time::Instant::now() >= until {
                        return Some(Detected::default());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen = n;
            }
        }
    }
}
