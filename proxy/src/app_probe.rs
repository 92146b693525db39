//! The application's own health probes, which the injector rewrote to
//! `/app-health/<container>/livez|readyz|startupz` on the status port and
//! passed here in `ISTIO_KUBE_APP_PROBERS` (istio-agent's job): the kubelet
//! cannot reach the app through a sidecar that requires mTLS, so the agent
//! probes the app from inside the pod and answers for it. As the agent
//! does, a probe leaves from 127.0.0.6 (which the capture rules let through
//! to the app, never back into the proxy) towards the pod's IP: an HTTP GET
//! (the app's status passed on, a redirect to another host or a 3xx
//! answered 200, at most 10 KiB of its body), a TCP connect, or a gRPC
//! `grpc.health.v1.Health/Check` (200 only for `SERVING`); a failure to
//! connect, a timeout (`timeoutSeconds`) or a bad answer is a 500.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};

/// The agent's limit on the app's answer body passed back to the kubelet.
const MAX_BODY: usize = 10 * 1024;
/// Redirects the agent's HTTP client follows on the same host.
const MAX_REDIRECTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum ProbeConfigError {
    #[error("ISTIO_KUBE_APP_PROBERS: {0}")]
    Json(#[from] serde_json::Error),
    #[error("ISTIO_KUBE_APP_PROBERS: {path:?}: {message}")]
    Invalid { path: String, message: String },
}

/// A port as Kubernetes writes it: a number, or a name the injector should
/// have resolved (the agent refuses those).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: String,
    pub port: IntOrString,
    #[serde(default)]
    pub scheme: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TcpSocketAction {
    pub port: IntOrString,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Grpc {
    pub port: i64,
    #[serde(default)]
    pub service: Option<String>,
}

/// One entry of `ISTIO_KUBE_APP_PROBERS` (Kubernetes' probe handler and
/// its timeout).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Prober {
    #[serde(default)]
    pub http_get: Option<HttpGet>,
    #[serde(default)]
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default)]
    pub grpc: Option<Grpc>,
    #[serde(default)]
    pub timeout_seconds: i64,
}

/// What a checked prober does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Http {
        https: bool,
        port: u16,
        path: String,
    },
    Tcp {
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

#[derive(Debug, Clone)]
struct Probe {
    check: Check,
    /// `None`: no limit (a zero `timeoutSeconds`, as the agent's HTTP client).
    timeout: Option<Duration>,
}

/// The probes by their path on the status port.
#[derive(Debug)]
pub struct AppProbes {
    probes: HashMap<String, Probe>,
    /// Where the app is probed: the pod's IP (the kubelet's target too).
    destination: IpAddr,
    /// The status port, replaced by the app's in a forwarded `Host`.
    status_port: u16,
}

impl Default for AppProbes {
    fn default() -> Self {
        Self {
            probes: HashMap::new(),
            destination: IpAddr::V4(Ipv4Addr::LOCALHOST),
            status_port: 15020,
        }
    }
}

fn is_prober_path(path: &str) -> bool {
    let mut parts = path.strip_prefix('/').unwrap_or("").split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("app-health" | "app-lifecycle"), Some(c), Some("livez" | "readyz" | "startupz" | "prestopz" | "poststartz"), None)
            if !c.is_empty()
    )
}

fn port_of(path: &str, p: &IntOrString) -> Result<u16, ProbeConfigError> {
    let invalid = |message: String| ProbeConfigError::Invalid {
        path: path.to_string(),
        message,
    };
    match p {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| invalid(format!("port {n} is not 1-65535"))),
        IntOrString::String(s) => Err(invalid(format!(
            "the port must be a number, not {s:?} (named ports are resolved by the injector)"
        ))),
    }
}

impl AppProbes {
    /// Parses `ISTIO_KUBE_APP_PROBERS` as the agent validates it: paths of
    /// the `/app-health/<container>/<kind>` shape, exactly one handler each,
    /// numeric ports.
    pub fn parse(
        json: &str,
        destination: IpAddr,
        status_port: u16,
    ) -> Result<Self, ProbeConfigError> {
        let raw: HashMap<String, Prober> = serde_json::from_str(json)?;
        let mut probes = HashMap::with_capacity(raw.len());
        for (path, p) in raw {
            let invalid = |message: &str| ProbeConfigError::Invalid {
                path: path.clone(),
                message: message.to_string(),
            };
            if !is_prober_path(&path) {
                return Err(invalid(
                    "must be /app-health/<container>/livez|readyz|startupz or /app-lifecycle/<container>/prestopz|poststartz",
                ));
            }
            let handlers = [
                p.http_get.is_some(),
                p.tcp_socket.is_some(),
                p.grpc.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if handlers != 1 {
                return Err(invalid(
                    "exactly one of httpGet, tcpSocket or grpc must be set",
                ));
            }
            let check = if let Some(h) = &p.http_get {
                let https = match h.scheme.as_deref().map(str::to_ascii_uppercase).as_deref() {
                    None | Some("HTTP") | Some("") => false,
                    Some("HTTPS") => true,
                    Some(other) => {
                        return Err(invalid(&format!("unknown scheme {other:?}")));
                    }
                };
                let path_ = if h.path.starts_with('/') {
                    h.path.clone()
                } else {
                    format!("/{}", h.path)
                };
                Check::Http {
                    https,
                    port: port_of(&path, &h.port)?,
                    path: path_,
                }
            } else if let Some(t) = &p.tcp_socket {
                Check::Tcp {
                    port: port_of(&path, &t.port)?,
                }
            } else if let Some(g) = &p.grpc {
                Check::Grpc {
                    port: port_of(&path, &IntOrString::Int(g.port))?,
                    service: g.service.clone().unwrap_or_default(),
                }
            } else {
                return Err(invalid("no handler"));
            };
            let timeout = u64::try_from(p.timeout_seconds)
                .ok()
                .filter(|s| *s > 0)
                .map(Duration::from_secs);
            probes.insert(path, Probe { check, timeout });
        }
        Ok(Self {
            probes,
            destination,
            status_port,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// Answers the kubelet's request for `path`: the status and body the
    /// agent would send.
    pub async fn answer(&self, path: &str, headers: &HeaderMap) -> (StatusCode, Bytes) {
        let Some(probe) = self.probes.get(path) else {
            return (
                StatusCode::BAD_REQUEST,
                Bytes::from(format!("app prober config does not exists for {path}")),
            );
        };
        let run = self.run(&probe.check, headers);
        let out = match probe.timeout {
            // The agent's clients bound the whole exchange (HTTP client
            // timeout, gRPC context, TCP dial timeout).
            Some(t) => tokio::time::timeout(t, run)
                .await
                .unwrap_or_else(|_| Err("timed out".into())),
            None => run.await,
        };
        match out {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(probe.path = %path, error = %e, "application probe failed");
                (StatusCode::INTERNAL_SERVER_ERROR, Bytes::new())
            }
        }
    }

    async fn run(&self, check: &Check, headers: &HeaderMap) -> Result<(StatusCode, Bytes), String> {
        match check {
            Check::Tcp { port } => {
                let s = connect(SocketAddr::new(self.destination, *port)).await?;
                drop(s);
                Ok((StatusCode::OK, Bytes::new()))
            }
            Check::Http { https, port, path } => self.http(*https, *port, path, headers).await,
            Check::Grpc { port, service } => {
                grpc_health(SocketAddr::new(self.destination, *port), service).await
            }
        }
    }

    async fn http(
        &self,
        https: bool,
        port: u16,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(StatusCode, Bytes), String> {
        let addr = SocketAddr::new(self.destination, port);
        // The kubelet's Host, with the status port replaced by the app's.
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| match h.rsplit_once(':') {
                Some((name, p)) if p.parse() == Ok(self.status_port) => format!("{name}:{port}"),
                _ => h.to_string(),
            })
            .unwrap_or_else(|| fmt_host(addr));
        let mut path = path.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::get(path.as_str())
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            for (k, v) in headers {
                if k != http::header::HOST && k != http::header::CONNECTION {
                    req.headers_mut().append(k.clone(), v.clone());
                }
            }
            req.headers_mut().insert(
                http::header::HOST,
                http::HeaderValue::from_str(&host).map_err(|e| e.to_string())?,
            );
            // No keep-alive towards the app, as the kubelet (and the agent
            // by default) does.
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            let tcp = connect(addr).await?;
            let resp = if https {
                let tls = tls_connect(tcp).await?;
                // HTTP/2 when the app offers it, as the agent's client
                // (ISTIO_ENABLE_HTTP2_PROBING) and the kubelet do.
                if tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice()) {
                    send_h2(TokioIo::new(tls), req, &host).await?
                } else {
                    send(TokioIo::new(tls), req).await?
                }
            } else {
                send(TokioIo::new(tcp), req).await?
            };
            let status = resp.status();
            if status.is_redirection() {
                // Followed only on the same host, as the agent's client
                // does; any other redirect counts as success.
                let same_host = resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| same_host_target(l, addr.ip()));
                match same_host {
                    Some(next) => {
                        path = next;
                        continue;
                    }
                    None => return Ok((StatusCode::OK, Bytes::new())),
                }
            }
            let body = Limited::new(resp.into_body(), usize::MAX)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body = body.slice(..body.len().min(MAX_BODY));
            return Ok((status, body));
        }
        Err(format!("stopped after {MAX_REDIRECTS} redirects"))
    }
}

fn fmt_host(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
    }
}

/// The path of a redirect that stays on the probed host (a relative
/// location, or an absolute one naming the pod's IP).
fn same_host_target(location: &str, ip: IpAddr) -> Option<String> {
    if location.starts_with('/') {
        return Some(location.to_string());
    }
    let uri: http::Uri = location.parse().ok()?;
    let host = uri.host()?.trim_matches(['[', ']']);
    let same = host.parse::<IpAddr>().ok() == Some(ip);
    same.then(|| {
        uri.path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string())
    })
}

/// The agent's probe source: 127.0.0.6 (::6), which the capture rules send
/// straight to the app.
fn source_for(dst: IpAddr) -> SocketAddr {
    match dst {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)), 0),
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    // Without 127.0.0.6 (no such address: a host without the pod's
    // loopback setup) the kernel picks the source.
    let _ = sock.bind(source_for(addr.ip()));
    sock.connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))
}

async fn send<T>(
    io: TokioIo<T>,
    req: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// The request over HTTP/2: the authority in the URI, no connection
/// headers (HTTP/2 has none).
async fn send_h2<T>(
    io: TokioIo<T>,
    req: Request<Empty<Bytes>>,
    host: &str,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = format!("https://{host}{path}")
        .parse()
        .map_err(|e| format!("probe URI: {e}"))?;
    parts.headers.remove(http::header::HOST);
    parts.headers.remove(http::header::CONNECTION);
    parts.version = http::Version::HTTP_2;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| e.to_string())
}

/// HTTPS probes skip certificate verification, as the kubelet's and the
/// agent's do, and offer HTTP/2.
async fn tls_connect(tcp: TcpStream) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    use ferry_tls::rustls;
    let mut config = rustls::ClientConfig::builder_with_provider(ferry_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let peer = tcp.peer_addr().map_err(|e| e.to_string())?.ip();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::IpAddress(peer.into()), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

#[derive(Debug)]
struct AcceptAny;

impl ferry_tls::rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &ferry_tls::rustls::pki_types::CertificateDer<'_>,
        _: &[ferry_tls::rustls::pki_types::CertificateDer<'_>],
        _: &ferry_tls::rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: ferry_tls::rustls::pki_types::UnixTime,
    ) -> Result<ferry_tls::rustls::client::danger::ServerCertVerified, ferry_tls::rustls::Error>
    {
        Ok(ferry_tls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &ferry_tls::rustls::pki_types::CertificateDer<'_>,
        _: &ferry_tls::rustls::DigitallySignedStruct,
    ) -> Result<ferry_tls::rustls::client::danger::HandshakeSignatureValid, ferry_tls::rustls::Error>
    {
        Ok(ferry_tls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &ferry_tls::rustls::pki_types::CertificateDer<'_>,
        _: &ferry_tls::rustls::DigitallySignedStruct,
    ) -> Result<ferry_tls::rustls::client::danger::HandshakeSignatureValid, ferry_tls::rustls::Error>
    {
        Ok(ferry_tls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<ferry_tls::rustls::SignatureScheme> {
        ferry_tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `grpc.health.v1.HealthCheckRequest { service }` in a gRPC frame.
fn health_request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(5 + msg.len());
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    Bytes::from(frame)
}

/// The `status` of a `HealthCheckResponse` message (field 1, varint).
fn health_status(msg: &[u8]) -> Option<u64> {
    let mut i = 0;
    let mut status = 0; // proto3 default: UNKNOWN
    while i < msg.len() {
        let (key, n) = varint(&msg[i..])?;
        i += n;
        match key & 7 {
            0 => {
                let (v, n) = varint(&msg[i..])?;
                i += n;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let (len, n) = varint(&msg[i..])?;
                i += n + usize::try_from(len).ok()?;
            }
            1 => i += 8,
            5 => i += 4,
            _ => return None,
        }
    }
    (i == msg.len()).then_some(status)
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// `grpc.health.v1.Health/Check` over h2c: 200 for `SERVING` (1), 500
/// for any other status, gRPC error or broken answer.
async fn grpc_health(addr: SocketAddr, service: &str) -> Result<(StatusCode, Bytes), String> {
    let tcp = connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        fmt_host(addr)
    ))
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header("te", "trailers")
    .body(Full::new(health_request(service)))
    .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let head_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let grpc_status = trailer_status.or(head_status);
    if grpc_status.as_deref() != Some("0") {
        return Err(format!("grpc-status {grpc_status:?}"));
    }
    let body = collected.to_bytes();
    if body.len() < 5 || body[0] != 0 {
        return Err("no health check response".into());
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let msg = body
        .get(5..5 + len)
        .ok_or("truncated health check response")?;
    match health_status(msg) {
        Some(1) => Ok((StatusCode::OK, Bytes::new())),
        Some(s) => Err(format!("health status {s}, not SERVING")),
        None => Err("undecodable health check response".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn probers_are_validated_as_the_agent_does() {
        let ok = r#"{"/app-health/app/readyz":{"httpGet":{"path":"ready","port":8080,"scheme":"HTTPS"},"timeoutSeconds":3},
                     "/app-health/app/livez":{"tcpSocket":{"port":8080}},
                     "/app-health/app/startupz":{"grpc":{"port":9090,"service":"s"},"timeoutSeconds":1}}"#;
        let p = AppProbes::parse(ok, LOCAL, 15020).unwrap();
        assert_eq!(
            p.probes["/app-health/app/readyz"].check,
            Check::Http {
                https: true,
                port: 8080,
                path: "/ready".into()
            }
        );
        assert_eq!(
            p.probes["/app-health/app/readyz"].timeout,
            Some(Duration::from_secs(3))
        );
        assert_eq!(p.probes["/app-health/app/livez"].timeout, None);
        for bad in [
            r#"{"/healthz/app":{"tcpSocket":{"port":1}}}"#,
            r#"{"/app-health/app/readyz":{"tcpSocket":{"port":"http"}}}"#,
            r#"{"/app-health/app/readyz":{"tcpSocket":{"port":1},"grpc":{"port":2}}}"#,
            r#"{"/app-health/app/readyz":{}}"#,
            r#"{"/app-health/app/other":{"tcpSocket":{"port":1}}}"#,
        ] {
            assert!(AppProbes::parse(bad, LOCAL, 15020).is_err(), "{bad}");
        }
    }

    #[test]
    fn redirects_stay_on_the_probed_host() {
        assert_eq!(same_host_target("/next", LOCAL).as_deref(), Some("/next"));
        assert_eq!(
            same_host_target("http://127.0.0.1:8080/a?b", LOCAL).as_deref(),
            Some("/a?b")
        );
        assert_eq!(same_host_target("http://example.com/", LOCAL), None);
    }

    #[test]
    fn health_messages() {
        assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &health_request("ab")[..],
            &[0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
        );
        assert_eq!(health_status(&[0x08, 0x01]), Some(1));
        assert_eq!(health_status(&[]), Some(0));
        assert_eq!(health_status(&[0x08, 0x02]), Some(2));
        assert_eq!(health_status(&[0x08]), None);
    }

    /// An HTTPS app offering h2 and HTTP/1.1: answers with the version it
    /// was asked in, and the Host (authority) it saw.
    async fn tls_app() -> u16 {
        use ferry_tls::rustls;
        use hyper_util::server::conn::auto;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(ferry_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let host = req
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .or_else(|| {
                                    req.headers()
                                        .get(http::header::HOST)
                                        .and_then(|h| h.to_str().ok())
                                        .map(str::to_string)
                                })
                                .unwrap_or_default();
                            let body = format!("{:?} {} {host}", req.version(), req.uri().path());
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        },
                    );
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn https_probes_speak_http2_when_the_app_offers_it() {
        let _ = ferry_tls::provider();
        let port = tls_app().await;
        let json = format!(
            r#"{{"/app-health/app/readyz":{{"httpGet":{{"path":"/ready","port":{port},"scheme":"HTTPS"}},"timeoutSeconds":5}}}}"#
        );
        let p = AppProbes::parse(&json, LOCAL, 15020).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, "10.0.0.1:15020".parse().unwrap());
        let (s, body) = p.answer("/app-health/app/readyz", &headers).await;
        assert_eq!(s, StatusCode::OK);
        // The kubelet's Host, with the status port replaced by the app's.
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            format!("HTTP/2.0 /ready 10.0.0.1:{port}")
        );
    }

    #[tokio::test]
    async fn unknown_paths_are_a_bad_request() {
        let p = AppProbes::parse("{}", LOCAL, 15020).unwrap();
        let (s, body) = p.answer("/app-health/x/readyz", &HeaderMap::new()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(
            &body[..],
            b"app prober config does not exists for /app-health/x/readyz"
        );
    }
}
