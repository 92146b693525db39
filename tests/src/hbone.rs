//! A small HBONE server for the tests, speaking the server side of
//! ztunnel's protocol: mutual TLS 1.3 (client certificate required, chained
//! to the mesh CA), ALPN `h2`, HTTP/2 `CONNECT` with `:authority` the
//! target `ip:port`. As ztunnel, it answers 400 to another method, an
//! authority that does not parse, or one whose IP is not the address the
//! connection came to; otherwise 200, then a greeting line naming the
//! authority and the caller's SPIFFE identity, then an echo of the stream's
//! bytes, ending its side when the caller ends its own (half-close).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::pki::Leaf;

/// One CONNECT stream the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Which TLS connection carried it (numbered from 1 in accept order).
    pub connection: u64,
    pub authority: String,
    /// The caller's SPIFFE URI.
    pub peer: String,
    /// The status answered.
    pub status: u16,
}

/// A running HBONE server; stops when dropped.
pub struct HboneServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl HboneServer {
    /// Serves on `addr` with `leaf` as its certificate, trusting clients
    /// chained to `ca_pem`.
    pub fn start(addr: SocketAddr, ca_pem: &str, leaf: &Leaf) -> Result<HboneServer> {
        Self::start_with_streams(addr, ca_pem, leaf, 100)
    }

    /// [`HboneServer::start`], allowing `max_streams` CONNECT streams at a
    /// time on each connection (ztunnel's and istiod's 100 by default).
    pub fn start_with_streams(
        addr: SocketAddr,
        ca_pem: &str,
        leaf: &Leaf,
        max_streams: u32,
    ) -> Result<HboneServer> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()?;
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("HBONE server cannot bind {addr}"))?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        rt.spawn(async move {
            let count = Arc::new(AtomicU64::new(0));
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let log = log.clone();
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                tokio::spawn(async move {
                    let _ = serve(acceptor, tcp, n, log, max_streams).await;
                });
            }
        });
        Ok(HboneServer {
            addr,
            seen,
            rt: Some(rt),
        })
    }

    /// The streams seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for HboneServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    n: u64,
    log: Arc<Mutex<Vec<Seen>>>,
    max_streams: u32,
) -> Result<()> {
    let local = tcp.local_addr()?;
    let tls = acceptor.accept(tcp).await?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| spiffe_uri(c.as_ref()))
        .unwrap_or_default();
    let mut conn = h2::server::Builder::new()
        .max_concurrent_streams(max_streams)
        .handshake::<_, bytes::Bytes>(tls)
        .await?;
    while let Some(r) = conn.accept().await {
        let (req, mut respond) = r?;
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        // ztunnel: CONNECT only, to an ip:port on the address connected to.
        let status = match authority.parse::<SocketAddr>() {
            _ if req.method() != http::Method::CONNECT => 400,
            Ok(a) if a.ip() == local.ip() => 200,
            _ => 400,
        };
        if let Ok(mut v) = log.lock() {
            v.push(Seen {
                connection: n,
                authority: authority.clone(),
                peer: peer.clone(),
                status,
            });
        }
        let resp = http::Response::builder().status(status).body(())?;
        if status != 200 {
            respond.send_response(resp, true)?;
            continue;
        }
        let mut send = respond.send_response(resp, false)?;
        let mut body = req.into_body();
        let greeting = format!("hbone {authority} from {peer}\n");
        tokio::spawn(async move {
            let _ = send.send_data(bytes::Bytes::from(greeting), false);
            while let Some(chunk) = body.data().await {
                let Ok(chunk) = chunk else { return };
                let _ = body.flow_control().release_capacity(chunk.len());
                send.reserve_capacity(chunk.len());
                if send.send_data(chunk, false).is_err() {
                    return;
                }
            }
            // The caller ended its side: end ours (half-close, both ways).
            let _ = send.send_data(bytes::Bytes::new(), true);
        });
    }
    Ok(())
}

/// The `spiffe://` URI SAN of a certificate (a byte search: the URI is an
/// IA5String whose short length byte precedes it).
fn spiffe_uri(der: &[u8]) -> Option<String> {
    let at = der.windows(9).position(|w| w == b"spiffe://")?;
    let len = usize::from(*der.get(at.checked_sub(1)?)?);
    let bytes = der.get(at..at + len)?;
    String::from_utf8(bytes.to_vec()).ok()
}
