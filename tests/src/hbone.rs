//! A small HBONE server for the tests, speaking the server side of
//! ztunnel's protocol: mutual TLS 1.3 (client certificate required, chained
//! to the mesh CA), ALPN `h2`, HTTP/2 `CONNECT` with `:authority` the
//! target `ip:port`. As ztunnel, it answers 400 to another method, an
//! authority that does not parse, or one whose IP is not the address the
//! connection came to; otherwise 200, then a greeting line naming the
//! authority and the caller's SPIFFE identity, then an echo of the stream's
//! bytes, ending its side when the caller ends its own (half-close).
//! [`HboneCall`] is the client side, as ztunnel calls a pod's 15008.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

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

/// How a CONNECT stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// END_STREAM after the bytes.
    Clean,
    /// RST_STREAM or the connection failed.
    Reset,
}

/// What an HBONE caller observes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The TLS handshake or the HTTP/2 set-up failed: nothing was asked.
    Refused,
    /// The CONNECT's status, the bytes that came back on the stream and how
    /// it ended.
    Answered {
        status: u16,
        echoed: String,
        end: End,
    },
}

/// One HBONE call: mutual TLS 1.3 with ALPN h2 (client certificate
/// `client`, if any) to `to`, a CONNECT to `authority`, `payload` sent and
/// the stream's sending side ended, everything read until the stream ends.
/// Sockets are made in the network namespace of the calling thread.
pub struct HboneCall<'a> {
    /// The roots the server's certificate must chain to.
    pub ca_pem: &'a str,
    pub client: Option<&'a Leaf>,
    /// The source address to bind, if not the route's.
    pub from: Option<IpAddr>,
    pub to: SocketAddr,
    /// What the server's certificate must name.
    pub server: Expect<'a>,
    pub authority: &'a str,
    pub payload: &'a str,
    /// End the sending side only once the first bytes came back, rather
    /// than together with the payload (Envoy's listener filters on an
    /// internal listener see an end that comes with the first bytes before
    /// the bytes, and then detect nothing).
    pub end_after_reply: bool,
}

impl HboneCall<'_> {
    /// Runs the call on a runtime of its own; a call that takes more than
    /// ten seconds is an error.
    pub fn run(&self) -> Result<Outcome> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), self.call())
                .await
                .context("the HBONE call hung")?
        })
    }

    /// TLS, HTTP/2 and the CONNECT, answered 200: the connection's
    /// handle, the stream's sending side and its body.
    /// Opens the call's CONNECT (its payload unsent) and holds the tunnel:
    /// the status answered must be 200. Its socket is made in the network
    /// namespace of the calling thread.
    pub fn tunnel(&self) -> Result<HboneTunnel> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (send, stream, body) = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), self.open())
                .await
                .context("opening the tunnel hung")?
        })?;
        Ok(HboneTunnel {
            rt,
            send,
            stream,
            body,
        })
    }

    async fn open(
        &self,
    ) -> Result<(
        h2::client::SendRequest<bytes::Bytes>,
        h2::SendStream<bytes::Bytes>,
        h2::RecvStream,
    )> {
        let (send, resp, stream) = match self.request().await? {
            Ok(r) => r,
            Err(o) => anyhow::bail!("the CONNECT failed: {o:?}"),
        };
        let resp = resp.await?;
        anyhow::ensure!(resp.status() == 200, "CONNECT answered {}", resp.status());
        Ok((send, stream, resp.into_body()))
    }

    /// Connects and sends the CONNECT: the connection's handle, the
    /// response to come and the stream, or what the caller saw instead.
    #[allow(clippy::type_complexity)]
    async fn request(
        &self,
    ) -> Result<
        std::result::Result<
            (
                h2::client::SendRequest<bytes::Bytes>,
                h2::client::ResponseFuture,
                h2::SendStream<bytes::Bytes>,
            ),
            Outcome,
        >,
    > {
        let mut cfg = client_config(self.ca_pem, self.client)?;
        let name = match self.server {
            Expect::Dns(name) => name,
            Expect::Spiffe(id) => {
                let inner = cfg.crypto_provider().clone();
                let roots = roots(self.ca_pem)?;
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.into(),
                    inner,
                )
                .build()?;
                cfg.dangerous()
                    .set_certificate_verifier(Arc::new(SpiffeVerifier {
                        webpki,
                        id: id.to_string(),
                    }));
                // Not checked: the verifier looks at the URI SAN instead.
                "hbone.invalid"
            }
        };
        let sock = match self.to {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if let Some(ip) = self.from {
            sock.bind(SocketAddr::from((ip, 0)))?;
        }
        let tcp = sock.connect(self.to).await?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let Ok(tls) = connector
            .connect(ServerName::try_from(name)?.to_owned(), tcp)
            .await
        else {
            return Ok(Err(Outcome::Refused));
        };
        // TLS 1.3: a refused client certificate shows on the first read,
        // which the HTTP/2 handshake does (the server's SETTINGS).
        let Ok((send, conn)) = h2::client::handshake(tls).await else {
            return Ok(Err(Outcome::Refused));
        };
        // Driven in the background for as long as the runtime runs.
        tokio::spawn(conn);
        let Ok(mut send) = send.ready().await else {
            return Ok(Err(Outcome::Refused));
        };
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(self.authority)
            .body(())?;
        let Ok((resp, stream)) = send.send_request(req, false) else {
            return Ok(Err(Outcome::Refused));
        };
        Ok(Ok((send, resp, stream)))
    }

    async fn call(&self) -> Result<Outcome> {
        let (send, resp, mut stream) = match self.request().await? {
            Ok(r) => r,
            Err(o) => return Ok(o),
        };
        let resp = match resp.await {
            Ok(r) => r,
            Err(e) if e.is_io() || e.is_go_away() => return Ok(Outcome::Refused),
            Err(_) => {
                return Ok(Outcome::Answered {
                    status: 0,
                    echoed: String::new(),
                    end: End::Reset,
                });
            }
        };
        let status = resp.status().as_u16();
        let mut ending = false;
        if status == 200 {
            stream.reserve_capacity(self.payload.len());
            // The far end may already be gone; what comes back says so.
            let end = !self.end_after_reply;
            let _ = stream.send_data(bytes::Bytes::from(self.payload.to_string()), end);
            ending = self.end_after_reply;
        }
        let mut body = resp.into_body();
        let mut echoed = Vec::new();
        let end = loop {
            match body.data().await {
                None => break End::Clean,
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    echoed.extend_from_slice(&chunk);
                    if std::mem::take(&mut ending) {
                        let _ = stream.send_data(bytes::Bytes::new(), true);
                    }
                }
                Some(Err(_)) => break End::Reset,
            }
        };
        drop(send);
        Ok(Outcome::Answered {
            status,
            echoed: String::from_utf8_lossy(&echoed).into_owned(),
            end,
        })
    }
}

/// What an HBONE client checks the server's certificate for.
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// A DNS name.
    Dns(&'a str),
    /// A SPIFFE identity (a URI SAN), as ztunnel checks a pod's.
    Spiffe(&'a str),
}

/// Verifies the chain as WebPKI does, then the URI SAN rather than a name.
#[derive(Debug)]
struct SpiffeVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    id: String,
}

impl rustls::client::danger::ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(ok) => Ok(ok),
            // The chain is good; only the name was not there.
            Err(rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            )) if spiffe_uri(end_entity.as_ref()).as_deref() == Some(self.id.as_str()) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Err(rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            )) => Err(rustls::Error::General(format!(
                "the server is not {}: {:?}",
                self.id,
                spiffe_uri(end_entity.as_ref())
            ))),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    Ok(roots)
}

/// An HBONE client's TLS: 1.3 only, ALPN h2, the server chained to
/// `ca_pem`, `client`'s certificate if any.
pub fn client_config(ca_pem: &str, client: Option<&Leaf>) -> Result<rustls::ClientConfig> {
    let roots = roots(ca_pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some(leaf) => {
            let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// An HBONE tunnel held open: one CONNECT stream on its own TLS connection,
/// driven line by line (for what happens to it while its server drains).
/// The socket is made in the network namespace of the thread that opens it.
pub struct HboneTunnel {
    rt: tokio::runtime::Runtime,
    send: h2::client::SendRequest<bytes::Bytes>,
    stream: h2::SendStream<bytes::Bytes>,
    body: h2::RecvStream,
}

impl HboneTunnel {
    /// Connects and asks CONNECT `authority`: the status answered must be 200.
    pub fn open(
        ca_pem: &str,
        client: &Leaf,
        to: SocketAddr,
        server: Expect<'_>,
        authority: &str,
    ) -> Result<HboneTunnel> {
        HboneCall {
            ca_pem,
            client: Some(client),
            from: None,
            to,
            server,
            authority,
            payload: "",
            end_after_reply: false,
        }
        .tunnel()
    }

    /// Sends `bytes` without ending the sending side.
    pub fn send(&mut self, bytes: &str) -> Result<()> {
        self.stream.reserve_capacity(bytes.len());
        self.stream
            .send_data(bytes::Bytes::from(bytes.to_string()), false)
            .context("sending on the tunnel")
    }

    /// Reads until the stream ends, the sending side left open: what came
    /// back and how the stream ended (END_STREAM or a reset).
    pub fn read_to_end(&mut self) -> Result<(String, End)> {
        let body = &mut self.body;
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), read_to_end(body))
                .await
                .context("the tunnel did not end")
        })
    }

    /// Sends `line` and reads until a newline comes back.
    pub fn exchange(&mut self, line: &str) -> Result<String> {
        self.send(line)?;
        let body = &mut self.body;
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), read_line(body))
                .await
                .context("no answer on the tunnel")?
        })
    }

    /// Whether a new CONNECT on this tunnel's connection is refused (the
    /// server sent GOAWAY): the request fails or is reset without an answer.
    pub fn new_stream_refused(&mut self, authority: &str) -> Result<bool> {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())?;
        let send = self.send.clone();
        self.rt.block_on(async move {
            let Ok(mut send) = send.ready().await else {
                return Ok(true);
            };
            let Ok((resp, _stream)) = send.send_request(req, false) else {
                return Ok(true);
            };
            match tokio::time::timeout(Duration::from_secs(10), resp).await {
                Err(_) => anyhow::bail!("a new stream after GOAWAY hung"),
                Ok(Err(_)) => Ok(true),
                Ok(Ok(r)) => Ok(r.status() != http::StatusCode::OK),
            }
        })
    }

    /// Ends the sending side and reads the rest: what came back and how the
    /// stream ended.
    pub fn finish(mut self) -> Result<(String, End)> {
        let _ = self.stream.send_data(bytes::Bytes::new(), true);
        let body = &mut self.body;
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), read_to_end(body))
                .await
                .context("the tunnel did not end")
        })
    }
}

async fn read_line(body: &mut h2::RecvStream) -> Result<String> {
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        match body.data().await {
            Some(chunk) => {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            None => anyhow::bail!("the tunnel ended: {:?}", String::from_utf8_lossy(&got)),
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

async fn read_to_end(body: &mut h2::RecvStream) -> (String, End) {
    let mut got = Vec::new();
    let end = loop {
        match body.data().await {
            None => break End::Clean,
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            Some(Err(_)) => break End::Reset,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), end)
}
