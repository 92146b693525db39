//! TLS in the data path: termination for filter chains with a
//! `DownstreamTlsContext` and origination for endpoints whose transport is
//! TLS, with configurations built from the live secrets.
//!
//! Secrets are looked up when a handshake starts, never baked into a
//! listener or a pool: a rotated secret (a new SDS version) is picked up by
//! the next connection while established ones keep the session they have.
//! Built rustls configurations are cached per filter chain (server) or per
//! endpoint pool (client) and dropped whenever the set of secrets changes.
//!
//! ALPN is negotiated as Envoy's BoringSSL does it: the server's preference
//! among what the client offers, and no ALPN at all (rather than a
//! handshake failure) when nothing overlaps, so Istio's `istio-peer-exchange`
//! or `istio-h2` clients are served by chains that list only `h2`.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_model::FilterChain;
use ferry_model::tls::{Secret, UpstreamTls};
use ferry_tls::TlsError;
use ferry_tls::rustls::pki_types::CertificateDer;
use ferry_tls::rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls_server_stream::TlsServerStream;

/// How long a TLS handshake may take unless the filter chain's
/// `transport_socket_connect_timeout` says (Envoy has no default; a bound
/// keeps silent clients from holding a connection slot forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Secrets = HashMap<String, Arc<Secret>>;

/// A chain's server configurations: with its ALPN and without it (for
/// clients whose protocols the chain does not list), each taking the
/// client's order of cipher suites and the server's (a TLS 1.2 handshake,
/// [`ferry_tls::server_order`]). Indexed by [`ServerEntry::index`].
struct ServerEntry {
    _chain: Arc<FilterChain>,
    generation: u64,
    configs: [Arc<ServerConfig>; 4],
    /// The leaf of the chain's own certificate (DER), for XFCC's `By=`.
    local_leaf: Option<Arc<[u8]>>,
}

impl ServerEntry {
    fn index(bare: bool, server_order: bool) -> usize {
        usize::from(bare) * 2 + usize::from(server_order)
    }
}

/// A client's certificate chain and what is read from it, kept once for
/// all the open connections that presented the same chain to the same
/// server certificate: the connections of one client workload share one
/// copy, and its names are parsed once.
#[derive(Debug)]
pub struct Peer {
    /// Leaf first, as presented (the revocation re-check needs it whole).
    pub certs: Vec<CertificateDer<'static>>,
    /// What XFCC, RBAC and ext_authz read of it.
    pub client_cert: Arc<ferry_tls::ClientCertInfo>,
    /// Its SPIFFE identity (Istio's metrics name the peer by it).
    pub identity: Option<Arc<str>>,
}

/// The peers of open connections, by [`ferry_tls::chain_digest`]; an
/// entry lives while a connection holds it.
#[derive(Default)]
struct Peers {
    by_digest: HashMap<[u8; 32], Weak<Peer>>,
    /// The size at which the entries of closed connections are next swept.
    sweep_at: usize,
}

/// The live secrets and the configurations built from them.
#[derive(Default)]
pub struct TlsContexts {
    secrets: ArcSwap<Secrets>,
    /// Bumped whenever any secret changes; cached configurations of an older
    /// generation are rebuilt.
    generation: AtomicU64,
    /// By filter chain (the entry keeps the chain alive, so its address is
    /// never reused while cached).
    servers: Mutex<HashMap<usize, ServerEntry>>,
    /// Unusable configurations already reported in this generation (by
    /// chain or pool), so an insecure or broken context is logged once,
    /// not once per connection.
    reported: Mutex<std::collections::HashSet<(usize, u64)>>,
    peers: Mutex<Peers>,
}

impl TlsContexts {
    /// Takes the secrets of a new snapshot; a change of any of them (a new
    /// `Arc`) starts a new generation.
    pub fn update(&self, secrets: &Secrets) {
        let current = self.secrets.load();
        let same = current.len() == secrets.len()
            && secrets
                .iter()
                .all(|(k, v)| current.get(k).is_some_and(|c| Arc::ptr_eq(c, v)));
        if same {
            // Chains of replaced listeners may still be cached: drop them
            // too, they are cheap to build again.
            self.servers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            return;
        }
        self.secrets.store(Arc::new(secrets.clone()));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The live secrets.
    pub fn secrets(&self) -> Arc<Secrets> {
        self.secrets.load_full()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Logs a context that cannot be used (refused as insecure, or broken)
    /// once per generation; a secret that has not arrived yet is only
    /// waited for.
    fn report(&self, key: usize, context: &str, e: &TlsError) {
        if matches!(e, TlsError::MissingSecret(_)) {
            return;
        }
        let generation = self.generation();
        let mut seen = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|(_, g)| *g == generation);
        if seen.insert((key, generation)) {
            tracing::warn!(tls.context = %context, error = %e, "TLS context refused: connections using it fail until its configuration or secrets change");
        }
    }

    /// The server configuration of a TLS filter chain, for a client that
    /// offered `client_alpn`, and TLS 1.3 or not.
    pub fn server(
        &self,
        chain: &Arc<FilterChain>,
        client_alpn: &[Vec<u8>],
        client_offers_tls13: bool,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let Some(tls) = &chain.tls else {
            return Err(TlsError::Rustls(
                "the filter chain has no TLS context".into(),
            ));
        };
        let key = Arc::as_ptr(chain) as usize;
        let generation = self.generation();
        let server_order = ferry_tls::server_order(tls, client_offers_tls13);
        let pick = |e: &ServerEntry| {
            let overlap = e.configs[0]
                .alpn_protocols
                .iter()
                .any(|p| client_alpn.contains(p));
            let bare = !overlap && !client_alpn.is_empty();
            e.configs[ServerEntry::index(bare, server_order)].clone()
        };
        if let Some(e) = self
            .servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|e| e.generation == generation)
        {
            return Ok(pick(e));
        }
        let config = ferry_tls::server_config(tls, &**self.secrets.load())
            .inspect_err(|e| self.report(key, &chain.name, e))?;
        let variant = |bare: bool, server_order: bool| {
            let mut c = config.clone();
            if bare {
                c.alpn_protocols.clear();
            }
            c.ignore_client_order = server_order;
            Arc::new(c)
        };
        let entry = ServerEntry {
            _chain: chain.clone(),
            generation,
            configs: [
                variant(false, false),
                variant(false, true),
                variant(true, false),
                variant(true, true),
            ],
            local_leaf: ferry_tls::local_certificate(&tls.common, &**self.secrets.load())
                .map(Arc::from),
        };
        let chosen = pick(&entry);
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, entry);
        Ok(chosen)
    }

    /// The leaf of a TLS chain's own certificate, as its cached server
    /// configuration has it.
    fn local_leaf(&self, chain: &Arc<FilterChain>) -> Option<Arc<[u8]>> {
        let tls = chain.tls.as_ref()?;
        let cached = self
            .servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(Arc::as_ptr(chain) as usize))
            .filter(|e| e.generation == self.generation())
            .map(|e| e.local_leaf.clone());
        cached.unwrap_or_else(|| {
            ferry_tls::local_certificate(&tls.common, &**self.secrets.load()).map(Arc::from)
        })
    }

    /// The peer of an mTLS connection on `chain` whose client presented
    /// `certs` (`None` without a certificate): the one already held by
    /// open connections for the same chain and server certificate, else a
    /// new one.
    pub fn peer(
        &self,
        chain: &Arc<FilterChain>,
        certs: &[CertificateDer<'_>],
    ) -> Option<Arc<Peer>> {
        let leaf = certs.first()?;
        let local = self.local_leaf(chain);
        let digest = ferry_tls::chain_digest(local.as_deref(), certs);
        let held = |peers: &Peers| peers.by_digest.get(&digest).and_then(Weak::upgrade);
        if let Some(p) = held(&self.peers.lock().unwrap_or_else(|p| p.into_inner())) {
            return Some(p);
        }
        // Parsed outside the lock: handshakes of other chains go on.
        let peer = Arc::new(Peer {
            certs: certs.iter().map(|c| c.clone().into_owned()).collect(),
            client_cert: Arc::new(ferry_tls::ClientCertInfo::new(local.as_deref(), leaf)),
            identity: ferry_tls::spiffe_id(leaf).map(Arc::from),
        });
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        // Another handshake with the same chain may have got there first.
        if let Some(p) = held(&peers) {
            return Some(p);
        }
        if peers.by_digest.len() >= peers.sweep_at {
            peers.by_digest.retain(|_, w| w.strong_count() > 0);
            peers.sweep_at = (peers.by_digest.len() * 2).max(64);
        }
        peers.by_digest.insert(digest, Arc::downgrade(&peer));
        Some(peer)
    }

    /// A client configuration for `tls`, cached in `cache` (the endpoint
    /// pool's) per ALPN default until the secrets change.
    pub fn client(
        &self,
        tls: &UpstreamTls,
        default_alpn: &'static [&'static str],
        cache: &ClientCache,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let generation = self.generation();
        let key = default_alpn.first().copied().unwrap_or("");
        let mut cached = cache.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, c)) = cached.get(key)
            && *g == generation
        {
            return Ok(c.clone());
        }
        let config = Arc::new(
            ferry_tls::client_config(tls, default_alpn, &**self.secrets.load())
                .inspect_err(|e| self.report(cache as *const _ as usize, "upstream", e))?,
        );
        cached.insert(key, (generation, config.clone()));
        Ok(config)
    }
}

/// Client configurations an endpoint pool built, by ALPN default.
#[derive(Default)]
pub struct ClientCache(Mutex<HashMap<&'static str, (u64, Arc<ClientConfig>)>>);

/// Terminates TLS on an accepted connection with the chain's context,
/// chosen once the ClientHello (and so the client's ALPN offer) is read.
///
/// The stream comes boxed: it is large (rustls' connection state), and the
/// connection's task and the futures it goes through then move a pointer,
/// not reserve room for the stream at each step.
pub async fn accept(
    contexts: &TlsContexts,
    chain: &Arc<FilterChain>,
    mut stream: TcpStream,
) -> Result<Box<TlsServerStream>, HandshakeError> {
    let handshake = async {
        let mut rx = bytes::BytesMut::new();
        let hello = loop {
            match crate::detect::inspect(&rx, true, false) {
                crate::detect::Outcome::Done(d) => break d,
                // Not a ClientHello rustls could take: it says why.
                crate::detect::Outcome::NeedMore if rx.len() >= crate::detect::MAX_PEEK => {
                    break crate::detect::Detected::default();
                }
                crate::detect::Outcome::NeedMore => {}
            }
            rx.reserve(4096);
            if stream.read_buf(&mut rx).await.map_err(HandshakeError::Io)? == 0 {
                return Err(HandshakeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
        };
        let offered: Vec<Vec<u8>> = hello
            .application_protocols
            .into_iter()
            .map(String::into_bytes)
            .collect();
        let config = contexts
            .server(chain, &offered, hello.offers_tls13)
            .map_err(HandshakeError::Config)?;
        let conn = ferry_tls::rustls::server::UnbufferedServerConnection::new(config)
            .map_err(|e| HandshakeError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        TlsServerStream::handshake(stream, conn, rx, hello.server_name)
            .await
            .map_err(HandshakeError::Io)
    };
    let limit = chain
        .tls
        .as_ref()
        .and_then(|t| t.handshake_timeout)
        .unwrap_or(HANDSHAKE_TIMEOUT);
    tokio::time::timeout(limit, handshake)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Io(io::Error),
    #[error("TLS configuration unusable: {0}")]
    Config(TlsError),
    #[error("TLS handshake timed out")]
    Timeout,
}

/// An upstream connection: plaintext or TLS, over TCP or a Unix socket
/// (a `pipe` endpoint).
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(tokio::net::UnixStream),
    UnixTls(Box<tokio_rustls::client::TlsStream<tokio::net::UnixStream>>),
    /// An in-process connection to an internal listener.
    Internal(crate::internal_pipe::PipeEnd),
    /// A CONNECT stream, and the local address of the connection carrying it.
    Tunnel(Box<TunnelIo>, Option<std::net::SocketAddr>),
}

/// An HTTP/2 CONNECT stream's bytes, holding the stream's place on its
/// connection while it lives.
pub struct TunnelIo {
    pub io: hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>,
    pub _stream: Option<crate::cluster::H2Stream>,
    pub _active: crate::cluster::HostActive,
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// An internal connection's full close, told from its half-close.
impl crate::internal_pipe::ClosedUnder for UpstreamIo {
    fn closed_under(&self) -> bool {
        match self {
            UpstreamIo::Internal(p) => p.closed_under(),
            _ => false,
        }
    }
}

impl<S: crate::internal_pipe::ClosedUnder> crate::internal_pipe::ClosedUnder for Rewind<S> {
    fn closed_under(&self) -> bool {
        self.inner.closed_under()
    }
}

/// Runs `$e` on whichever stream the connection is.
macro_rules! each_io {
    ($io:expr, $s:ident => $e:expr) => {
        match $io {
            UpstreamIo::Plain($s) => $e,
            UpstreamIo::Tls($s) => $e,
            UpstreamIo::Unix($s) => $e,
            UpstreamIo::UnixTls($s) => $e,
            UpstreamIo::Internal($s) => $e,
            UpstreamIo::Tunnel($s, _) => $e,
        }
    };
}

impl UpstreamIo {
    /// The local address of the connection (none over a Unix socket).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            UpstreamIo::Plain(s) => s.local_addr().ok(),
            UpstreamIo::Tls(s) => s.get_ref().0.local_addr().ok(),
            // The client end of an in-process connection.
            UpstreamIo::Internal(_) => Some(ferry_model::stream_info::INTERNAL_CLIENT_ADDRESS),
            // The pooled HTTP/2 connection's socket.
            UpstreamIo::Tunnel(_, local) => *local,
            UpstreamIo::Unix(_) | UpstreamIo::UnixTls(_) => None,
        }
    }

    /// The ALPN protocol the TLS handshake settled on.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            UpstreamIo::Plain(_)
            | UpstreamIo::Unix(_)
            | UpstreamIo::Internal(_)
            | UpstreamIo::Tunnel(..) => None,
            UpstreamIo::Tls(s) => s.get_ref().1.alpn_protocol(),
            UpstreamIo::UnixTls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        each_io!(self, s => s.is_write_vectored())
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// A stream whose first bytes were already read (to sniff the HTTP/2
/// preface inside TLS) and are served again before the rest.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, with `prefix` served before what it has still to give.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// The stream beneath, what was to be served again first dropped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes tell HTTP/2 (the full preface) from anything else.
/// `None`: the connection failed or closed first.
pub async fn sniff_h2<S: AsyncRead + Unpin>(mut inner: S) -> Option<(bool, Rewind<S>)> {
    use tokio::io::AsyncReadExt;
    let mut prefix = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; 24];
    loop {
        let want = H2_PREFACE.len() - prefix.len();
        let n = tokio::time::timeout(Duration::from_secs(15), inner.read(&mut buf[..want]))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        prefix.extend_from_slice(&buf[..n]);
        let is_h2 = H2_PREFACE.starts_with(&prefix);
        if !is_h2 || prefix.len() == H2_PREFACE.len() {
            return Some((
                is_h2,
                Rewind {
                    prefix,
                    pos: 0,
                    inner,
                },
            ));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
