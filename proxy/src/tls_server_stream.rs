//! The server side of a downstream TLS connection, on rustls' unbuffered
//! API: the stream owns its buffers and holds them only while bytes are in
//! flight. rustls' buffered connection keeps a 4 KiB read buffer for the
//! connection's whole life; here an idle connection (a parked keep-alive,
//! a quiet tunnel) keeps no TLS buffer at all, which is most of what an
//! idle mTLS connection costs.
//!
//! - Reading: ciphertext goes into `rx` (sized for the record being read),
//!   rustls decrypts it, the plaintext waits in `plain` until it is read.
//! - Writing: plaintext is encrypted into `tx` and written from there, in
//!   order with the handshake messages rustls emits (tickets, a key
//!   update's answer). A write is accepted once encrypted; a backlog of
//!   [`BACKLOG`] bytes holds further writes back until the socket takes it.
//! - A read that waits on the socket gives back every empty buffer.
//!
//! As tokio-rustls: a peer that closes without `close_notify` is an
//! `UnexpectedEof` error, `poll_shutdown` sends `close_notify`, and a
//! failed record or handshake sends its alert before the error is
//! returned.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use ferry_tls::rustls;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The first read's room: a ClientHello, a request's records.
const READ_SIZE: usize = 4 * 1024;
/// The largest TLS record on the wire (TLS 1.2 allows 2 KiB of expansion
/// over the 16 KiB of plaintext); rustls refuses longer ones.
const MAX_RECORD: usize = 5 + 16 * 1024 + 2048;
/// The longest handshake message rustls joins from several records.
const MAX_HANDSHAKE: usize = 0xffff;
/// Plaintext taken per write: a record's worth of payload, four times.
const WRITE_CHUNK: usize = 64 * 1024;
/// Encrypted bytes queued for the socket beyond which writes wait.
const BACKLOG: usize = 64 * 1024;

/// An established server-side TLS connection over TCP.
pub struct TlsServerStream {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet processed.
    rx: BytesMut,
    /// Plaintext decrypted and not yet read.
    plain: BytesMut,
    /// Encrypted bytes not yet written.
    tx: BytesMut,
    /// The client's server name (SNI), as its ClientHello gave it.
    server_name: Option<Box<str>>,
    /// The peer sent `close_notify`: reads give EOF once `plain` is read.
    peer_closed: bool,
    /// The socket gave EOF.
    read_eof: bool,
    /// `close_notify` is queued: nothing more is written.
    close_sent: bool,
    /// rustls returned an error (its alert is queued): it is not run again.
    failed: bool,
}

/// What processing is to do once rustls lets application data be sent.
enum Emit<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Where processing stopped.
enum Processed {
    /// Every whole record is processed; the handshake waits for more.
    Blocked,
    /// Every whole record is processed; application data may be sent (the
    /// emit was done).
    Traffic,
    /// Both sides sent `close_notify`.
    Closed,
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsServerStream {
    /// Completes the handshake of `conn` on `io`; `rx` holds what was
    /// read of the client's first flight.
    pub async fn handshake(
        io: TcpStream,
        conn: UnbufferedServerConnection,
        rx: BytesMut,
        server_name: Option<String>,
    ) -> io::Result<Box<Self>> {
        let mut s = Box::new(TlsServerStream {
            io,
            conn,
            rx,
            plain: BytesMut::new(),
            tx: BytesMut::new(),
            server_name: server_name.map(String::into_boxed_str),
            peer_closed: false,
            read_eof: false,
            close_sent: false,
            failed: false,
        });
        std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let processed = self.process(Emit::Nothing)?;
            ready!(self.poll_write_tx(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match processed {
                Processed::Blocked | Processed::Traffic => {}
                Processed::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            }
            if self.read_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            ready!(self.poll_read_tls(cx))?;
        }
    }

    /// The protocol ALPN chose, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The client's certificate chain, leaf first (mTLS).
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// The server name the client asked for.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Runs rustls over the whole records in `rx`: decrypted data goes to
    /// `plain`, handshake messages and alerts to `tx`, and `emit` is done
    /// once application data may be sent.
    fn process(&mut self, mut emit: Emit<'_>) -> io::Result<Processed> {
        if self.failed {
            return Err(invalid("the TLS connection failed"));
        }
        let Self {
            conn,
            rx,
            plain,
            tx,
            peer_closed,
            ..
        } = self;
        let mut consumed = 0;
        let result = loop {
            let status = conn.process_tls_records(&mut rx[consumed..]);
            let mut discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    consumed += discard;
                    break Err(e);
                }
            };
            let done = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    let mut failed = None;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                plain.extend_from_slice(record.payload);
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    if let Some(e) = failed {
                        consumed += discard;
                        break Err(e);
                    }
                    None
                }
                ConnectionState::PeerClosed => {
                    *peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    *peer_closed = true;
                    Some(Processed::Closed)
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    queue(tx, 1024, |out| encode.encode(out).map_err(encode_room))
                        .map_err(|()| invalid("a TLS handshake record was encoded twice"))?;
                    None
                }
                // What was encoded is in `tx`, which is written in order
                // before anything encoded later.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Processed::Blocked),
                ConnectionState::WriteTraffic(mut traffic) => {
                    match std::mem::replace(&mut emit, Emit::Nothing) {
                        Emit::Nothing => {}
                        Emit::Data(data) => {
                            queue(tx, sealed_len(data.len()), |out| {
                                traffic.encrypt(data, out).map_err(encrypt_room)
                            })
                            .map_err(|()| invalid("TLS encryption failed"))?;
                        }
                        Emit::CloseNotify => {
                            queue(tx, 64, |out| {
                                traffic.queue_close_notify(out).map_err(encrypt_room)
                            })
                            .map_err(|()| invalid("TLS close_notify failed"))?;
                        }
                    }
                    Some(Processed::Traffic)
                }
                // Early data is never accepted (no `max_early_data_size`).
                _ => break Ok(None),
            };
            consumed += discard;
            if let Some(done) = done {
                break Ok(Some(done));
            }
        };
        rx.advance(consumed);
        match result {
            Ok(Some(done)) => Ok(done),
            Ok(None) => Err(invalid("unexpected TLS connection state")),
            Err(e) => {
                self.failed = true;
                self.queue_alerts();
                self.rx = BytesMut::new();
                // The alert goes now if the socket takes it: the caller
                // may drop the stream on this error.
                if let Ok(n) = self.io.try_write(&self.tx) {
                    self.tx.advance(n);
                }
                Err(invalid(e))
            }
        }
    }

    /// Queues the alert rustls prepared for the error it just returned.
    /// While rustls has messages to send it hands them out before it looks
    /// at any record, so no buffer is given (the records left in `rx`
    /// would be processed again, and fail again).
    fn queue_alerts(&mut self) {
        while self.conn.wants_write() {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    let queued = queue(&mut self.tx, 1024, |out| {
                        encode.encode(out).map_err(encode_room)
                    });
                    if queued.is_err() {
                        return;
                    }
                }
                // Plaintext of a failed connection is not read.
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while traffic.next_record().is_some() {}
                }
                _ => return,
            }
        }
    }

    /// Writes `tx` to the socket; empty, it is given back.
    fn poll_write_tx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tx.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.tx))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads more ciphertext into `rx`: room for the rest of the record it
    /// ends in, at least [`READ_SIZE`].
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Whole records rustls keeps while it joins a handshake message
        // come first; then the record being read.
        let mut start = 0;
        let mut rest = 0;
        while let Some(h) = self.rx.get(start..start + 5) {
            let record = 5 + (usize::from(h[3]) << 8 | usize::from(h[4]));
            if record > MAX_RECORD {
                return Poll::Ready(Err(invalid("TLS record too long")));
            }
            if start + record > self.rx.len() {
                rest = start + record - self.rx.len();
                break;
            }
            start += record;
        }
        if self.rx.len() >= MAX_HANDSHAKE + MAX_RECORD {
            return Poll::Ready(Err(invalid("TLS handshake message too long")));
        }
        self.rx.reserve(rest.max(READ_SIZE));
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rx) {
            Poll::Pending => {
                self.release_idle();
                Poll::Pending
            }
            Poll::Ready(Ok(0)) => {
                self.read_eof = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    /// Gives back the buffers that hold nothing: the connection waits.
    fn release_idle(&mut self) {
        for buf in [&mut self.rx, &mut self.plain, &mut self.tx] {
            if buf.is_empty() && buf.capacity() > 0 {
                *buf = BytesMut::new();
            }
        }
    }
}

/// How much room an encoding needs (`Some`), or that it failed (`None`).
fn encode_room(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        EncodeError::AlreadyEncoded => None,
    }
}

/// The same for an encryption.
fn encrypt_room(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

/// Room for `n` bytes of plaintext once sealed in records: each record of
/// at most 16 KiB adds its header, its content type and its tag (and, in
/// TLS 1.2, an explicit nonce).
fn sealed_len(n: usize) -> usize {
    n + (n / (16 * 1024) + 1) * 64
}

/// Appends what `encode` writes to `tx`: it is given room, and told how
/// much more it needs (`Err(Some(n))`) or that it failed (`Err(None)`).
fn queue(
    tx: &mut BytesMut,
    mut room: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), ()> {
    let start = tx.len();
    loop {
        tx.resize(start + room, 0);
        match encode(&mut tx[start..]) {
            Ok(n) => {
                tx.truncate(start + n);
                return Ok(());
            }
            Err(Some(need)) if need > room => room = need,
            Err(_) => {
                tx.truncate(start);
                return Err(());
            }
        }
    }
}

impl AsyncRead for TlsServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if let Processed::Closed = this.process(Emit::Nothing)? {
                continue;
            }
            if !this.plain.is_empty() || this.peer_closed {
                continue;
            }
            // What rustls wants sent (a key update's answer) goes now; a
            // full socket keeps it queued for the next write.
            if let Poll::Ready(Err(e)) = this.poll_write_tx(cx) {
                return Poll::Ready(Err(e));
            }
            if this.read_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            ready!(this.poll_read_tls(cx))?;
        }
    }
}

impl AsyncWrite for TlsServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.tx.len() >= BACKLOG {
            ready!(this.poll_write_tx(cx))?;
        }
        let n = data.len().min(WRITE_CHUNK);
        match this.process(Emit::Data(&data[..n]))? {
            Processed::Traffic => {}
            Processed::Blocked | Processed::Closed => {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
        }
        // Sent now if the socket takes it; else by the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_tx(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && !this.failed {
            this.process(Emit::Nothing)?;
        }
        ready!(this.poll_write_tx(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && !this.failed {
            this.close_sent = true;
            this.process(Emit::CloseNotify)?;
        }
        ready!(this.poll_write_tx(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server stream and a tokio-rustls client connected to it over
    /// loopback TCP, with `http/1.1` offered by both.
    async fn pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (
        Box<TlsServerStream>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ) {
        pair_with(version, false).await
    }

    /// The same, the client presenting a certificate (its chain: a leaf and
    /// the CA that issued it) when `mtls`.
    async fn pair_with(
        version: &'static rustls::SupportedProtocolVersion,
        mtls: bool,
    ) -> (
        Box<TlsServerStream>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ) {
        let (s, c) = connect(version, mtls, true, 0).await;
        (s.unwrap(), c.unwrap())
    }

    /// The handshake's outcome on both sides; the server trusts the
    /// client's CA only when `trusted`; the client's certificate has
    /// `names` DNS names beside its URI.
    async fn connect(
        version: &'static rustls::SupportedProtocolVersion,
        mtls: bool,
        trusted: bool,
        names: usize,
    ) -> (
        io::Result<Box<TlsServerStream>>,
        io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
    ) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/client".try_into().unwrap(),
        )];
        leaf.subject_alt_names.extend((0..names).map(|i| {
            rcgen::SanType::DnsName(
                format!("n{i:05}.a-rather-long-name.example.com")
                    .try_into()
                    .unwrap(),
            )
        }));
        let leaf = leaf.signed_by(&client_key, &*ca).unwrap();
        let client_chain = vec![leaf.der().clone(), ca.der().clone()];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["server.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der: CertificateDer<'static> = cert.der().clone();
        let builder = rustls::ServerConfig::builder_with_provider(ferry_tls::provider())
            .with_protocol_versions(&[version])
            .unwrap();
        let builder = if mtls {
            let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
            other
                .distinguished_name
                .push(rcgen::DnType::CommonName, "another CA");
            other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let other = CertifiedIssuer::self_signed(other, KeyPair::generate().unwrap()).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(if trusted { ca.der() } else { other.der() }.clone())
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                ferry_tls::provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut server = builder
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(ferry_tls::provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots);
        let mut client = if mtls {
            client
                .with_client_auth_cert(
                    client_chain,
                    PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
                )
                .unwrap()
        } else {
            client.with_no_client_auth()
        };
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("server.test").unwrap();
            let mut c = connector.connect(name, tcp).await?;
            if !trusted {
                // TLS 1.3 tells a refused client certificate after the
                // client's handshake is done.
                let _sent = c.read(&mut [0; 1]).await?;
            }
            Ok(c)
        });
        let (tcp, _) = l.accept().await.unwrap();
        let conn = UnbufferedServerConnection::new(Arc::new(server)).unwrap();
        let s = TlsServerStream::handshake(tcp, conn, BytesMut::new(), Some("server.test".into()))
            .await;
        (s, client.await.unwrap())
    }

    /// Four bytes from the client reach the server.
    async fn ping(s: &mut TlsServerStream, c: &mut tokio_rustls::client::TlsStream<TcpStream>) {
        c.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    fn versions() -> [&'static rustls::SupportedProtocolVersion; 2] {
        [&rustls::version::TLS13, &rustls::version::TLS12]
    }

    /// Bytes cross both ways whole and in order, small and across many
    /// records; the negotiated facts are there.
    #[tokio::test]
    async fn data_crosses_both_ways() {
        for version in versions() {
            let (mut s, mut c) = pair(version).await;
            assert_eq!(s.alpn_protocol(), Some(&b"http/1.1"[..]));
            assert_eq!(s.server_name(), Some("server.test"));
            assert!(s.peer_certificates().is_none());
            let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            for msg in [&b"x"[..], &b"GET / HTTP/1.1\r\n\r\n"[..], &big[..]] {
                let (w, r) = tokio::join!(c.write_all(msg), async {
                    let mut got = vec![0; msg.len()];
                    s.read_exact(&mut got).await.map(|_| got)
                });
                w.unwrap();
                assert_eq!(r.unwrap(), msg, "{version:?} client to server");
                let (w, r) = tokio::join!(
                    async {
                        s.write_all(msg).await?;
                        s.flush().await
                    },
                    async {
                        let mut got = vec![0; msg.len()];
                        c.read_exact(&mut got).await.map(|_| got)
                    }
                );
                w.unwrap();
                assert_eq!(r.unwrap(), msg, "{version:?} server to client");
            }
        }
    }

    /// A client's certificate chain is verified and kept; data crosses
    /// (the client's whole last flight may arrive in one read).
    #[tokio::test]
    async fn a_client_certificate_is_taken() {
        for version in versions() {
            let (mut s, mut c) = pair_with(version, true).await;
            let chain = s.peer_certificates().map(<[_]>::len);
            assert_eq!(chain, Some(2), "{version:?}");
            ping(&mut s, &mut c).await;
        }
    }

    /// A client certificate larger than a record (its handshake message
    /// joined from several) is taken.
    #[tokio::test]
    async fn a_certificate_over_several_records_is_taken() {
        for version in versions() {
            let (s, c) = connect(version, true, true, 600).await;
            let (mut s, mut c) = (s.unwrap(), c.unwrap());
            let leaf = s.peer_certificates().unwrap()[0].len();
            assert!(leaf > 20_000, "{leaf}");
            ping(&mut s, &mut c).await;
        }
    }

    /// A client certificate the server does not trust fails the
    /// handshake, and the client is told so by an alert.
    #[tokio::test]
    async fn an_untrusted_client_is_refused_with_an_alert() {
        for version in versions() {
            let (s, c) = connect(version, true, false, 0).await;
            let server = s.err().map(|e| e.kind());
            assert_eq!(server, Some(io::ErrorKind::InvalidData), "{version:?}");
            let client = c.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                client.contains("UnknownCA") || client.contains("unknown ca"),
                "{version:?}: {client}"
            );
        }
    }

    /// A connection waiting for its client holds no buffer.
    #[tokio::test]
    async fn a_waiting_connection_holds_no_buffer() {
        let (mut s, mut c) = pair(&rustls::version::TLS13).await;
        c.write_all(&[7; 40_000]).await.unwrap();
        let mut got = vec![0; 40_000];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(&[8; 40_000]).await.unwrap();
        s.flush().await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        let mut one = [0; 1];
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut one)).await;
        assert!(pending.is_err(), "nothing was sent");
        assert_eq!(
            (s.rx.capacity(), s.plain.capacity(), s.tx.capacity()),
            (0, 0, 0)
        );
        // And it reads again.
        c.write_all(b"again").await.unwrap();
        let mut five = [0; 5];
        s.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"again");
    }

    /// Either side's `close_notify` is the other's EOF; a peer gone
    /// without one is an `UnexpectedEof` error.
    #[tokio::test]
    async fn closes_are_told_apart() {
        for version in versions() {
            let (mut s, mut c) = pair(version).await;
            c.write_all(b"bye").await.unwrap();
            c.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"bye", "{version:?}");
            // The server may still write after the client's close_notify.
            s.write_all(b"late").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"late", "{version:?}");

            let (mut s, mut c) = pair(version).await;
            // The client takes its session tickets, then only its TCP
            // write side closes.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), c.read(&mut [0; 8]))
                .await;
            let (mut tcp, _) = c.into_inner();
            tcp.shutdown().await.unwrap();
            let err = s.read(&mut [0; 8]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{version:?}");
        }
    }

    /// A TLS 1.3 key update from the client is followed, and answered.
    #[tokio::test]
    async fn a_key_update_is_followed() {
        let (mut s, mut c) = pair(&rustls::version::TLS13).await;
        c.get_mut().1.refresh_traffic_keys().unwrap();
        c.write_all(b"after").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");
        s.write_all(b"reply").await.unwrap();
        s.flush().await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"reply");
    }

    /// Garbage where a record should be fails the read with an alert, not
    /// a panic.
    #[tokio::test]
    async fn a_corrupt_record_is_an_error() {
        // TLS 1.2: its alerts show their record type (TLS 1.3 hides it).
        let (mut s, c) = pair(&rustls::version::TLS12).await;
        let (mut tcp, _) = c.into_inner();
        tcp.write_all(&[23, 3, 3, 0, 20]).await.unwrap();
        tcp.write_all(&[0xab; 20]).await.unwrap();
        let err = s.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // rustls is not run again; the alert it prepared is written.
        let again = s.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::InvalidData);
        assert!(s.write_all(b"no").await.is_err());
        let _ = s.flush().await;
        let mut alert = [0; 2];
        tcp.read_exact(&mut alert).await.unwrap();
        assert_eq!(alert[0], 21, "an alert record");
    }
}
