//! Istio's TCP metadata exchange (`istio.metadata_exchange`,
//! `envoy.tcp.metadataexchange.config.MetadataExchange`): on a TLS
//! connection whose negotiated ALPN is the filter's protocol
//! (`istio-peer-exchange`), each side sends one frame before any
//! application byte, and reads the other's off the front of what it
//! receives, so Istio's TCP metrics can name the peer's workload. Ferry
//! speaks it on inbound chains that carry the filter (the downstream side)
//! and on upstream connections of clusters that carry it as an upstream
//! network filter (the upstream side).
//!
//! The frame, as Istio's proxy writes it: a 4-byte magic `0x3D230467` and a
//! 4-byte length, both big-endian, then that many bytes of a
//! `google.protobuf.Any` whose `type_url` is the `Struct` type and whose
//! value is a `Struct` with two fields: `x-envoy-peer-metadata` (the node's
//! metadata: `NAMESPACE`, `WORKLOAD_NAME`, `LABELS`, … as the HTTP
//! exchange carries it) and `x-envoy-peer-metadata-id` (the node id). A
//! peer whose first bytes do not start with the magic does not speak it:
//! those bytes are application data and are passed on unchanged, as
//! Istio's filter leaves them in the buffer.
//!
//! Both sides write their frame as soon as the connection is up: Istio's
//! filter writes its own at its first read or write, and reading ours is
//! such a read, so neither side ever waits on the other.

use std::time::Duration;

use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use http::HeaderValue;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::{LocalNode, PEER_METADATA, PEER_METADATA_ID};
use crate::tls::Rewind;

/// The frame's magic number (`MetadataExchangeInitialHeader::magic_number`).
pub const MAGIC: u32 = 0x3D23_0467;
/// The `type_url` of the frame's `Any`.
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";
/// The largest frame body taken; a node's metadata is a few hundred bytes.
const MAX_FRAME: usize = 64 * 1024;
/// How long the peer's frame may take once the connection is up.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A peer's exchanged metadata in the form the HTTP exchange gives it: its
/// node id and the base64 of its metadata `Struct` (what
/// [`crate::metrics::ConnMetrics::label_set`] reads).
pub type Peer = (HeaderValue, HeaderValue);

/// This node's frame.
pub fn frame(local: &LocalNode) -> Vec<u8> {
    use base64::Engine as _;
    let meta = base64::engine::general_purpose::STANDARD
        .decode(local.exchange.as_bytes())
        .ok()
        .and_then(|b| Struct::decode(b.as_slice()).ok())
        .unwrap_or_default();
    let mut data = Struct::default();
    data.fields.insert(
        PEER_METADATA.into(),
        Value {
            kind: Some(Kind::StructValue(meta)),
        },
    );
    if let Ok(id) = local.exchange_id.to_str()
        && !id.is_empty()
    {
        data.fields.insert(
            PEER_METADATA_ID.into(),
            Value {
                kind: Some(Kind::StringValue(id.to_string())),
            },
        );
    }
    let any = Any {
        type_url: STRUCT_TYPE_URL.into(),
        value: data.encode_to_vec(),
    }
    .encode_to_vec();
    let mut out = Vec::with_capacity(8 + any.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&u32::try_from(any.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&any);
    out
}

/// The peer of a frame's body (the `Any`); `None` when it is not one.
pub fn parse_body(body: &[u8]) -> Option<Peer> {
    use base64::Engine as _;
    let any = Any::decode(body).ok()?;
    if any.type_url != STRUCT_TYPE_URL {
        return None;
    }
    let data = Struct::decode(any.value.as_slice()).ok()?;
    let meta = match data.fields.get(PEER_METADATA).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(s)) => s.encode_to_vec(),
        _ => return None,
    };
    let id = match data
        .fields
        .get(PEER_METADATA_ID)
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(s)) => HeaderValue::from_str(s).ok()?,
        _ => HeaderValue::from_static(""),
    };
    let meta =
        HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(meta)).ok()?;
    Some((id, meta))
}

/// What the front of a connection held.
#[derive(Debug)]
pub enum Front {
    /// The peer's frame, taken off the stream.
    Peer(Peer),
    /// No frame: these bytes (possibly none) are the peer's data and go on.
    Data(Vec<u8>),
}

/// Reads the peer's frame off the front of `s`: never more than the frame,
/// so whatever follows stays in the stream. A peer that sends something
/// else, closes, fails or takes longer than `timeout` gets its bytes back
/// as data.
pub async fn read_front<S: AsyncRead + Unpin>(s: &mut S, timeout: Duration) -> Front {
    let mut buf = Vec::new();
    let read = async {
        let mut head = [0u8; 8];
        let mut got = 0;
        while got < head.len() {
            match s.read(&mut head[got..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    buf.extend_from_slice(&head[got..got + n]);
                    got += n;
                    if !MAGIC.to_be_bytes().starts_with(&buf[..got.min(4)]) {
                        return false;
                    }
                }
            }
        }
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if len > MAX_FRAME {
            return false;
        }
        let mut body = vec![0u8; len];
        let mut at = 0;
        while at < len {
            match s.read(&mut body[at..]).await {
                Ok(0) | Err(_) => {
                    buf.extend_from_slice(&body[..at]);
                    return false;
                }
                Ok(n) => at += n,
            }
        }
        buf.extend_from_slice(&body);
        true
    };
    let whole = tokio::time::timeout(timeout, read).await.unwrap_or(false);
    if whole && let Some(peer) = parse_body(&buf[8..]) {
        return Front::Peer(peer);
    }
    if whole {
        tracing::debug!("istio-peer-exchange: the peer's frame is no metadata; passed on");
        // Istio's filter drops the header of a frame it cannot parse and
        // leaves the body.
        buf.drain(..8);
    }
    Front::Data(buf)
}

/// Speaks the exchange on a connection whose ALPN selected it: writes this
/// node's frame, reads the peer's. The stream comes back with any bytes
/// that were not a frame in front of it.
pub async fn exchange<S>(mut s: S, local: &LocalNode) -> (Rewind<S>, Option<Peer>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ours = frame(local);
    if let Err(e) = async {
        s.write_all(&ours).await?;
        s.flush().await
    }
    .await
    {
        tracing::debug!(error = %e, "istio-peer-exchange: writing this node's frame failed");
        return (Rewind::new(Vec::new(), s), None);
    }
    match read_front(&mut s, READ_TIMEOUT).await {
        Front::Peer(p) => (Rewind::new(Vec::new(), s), Some(p)),
        Front::Data(d) => (Rewind::new(d, s), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Workload;

    fn node() -> LocalNode {
        let w = Workload {
            workload: "echo-v2".into(),
            namespace: "shop".into(),
            app: "echo".into(),
            version: "v2".into(),
            ..Default::default()
        };
        LocalNode::new(
            w,
            "sidecar~10.0.0.9~echo-v2-1.shop~shop.svc.cluster.local",
            "td",
        )
    }

    /// The bytes as Istio's protocol lays them out, decoded with nothing of
    /// this module: magic, big-endian length, an `Any` of a `Struct`.
    #[test]
    fn frame_is_istios_layout() {
        let f = frame(&node());
        assert_eq!(&f[..4], &[0x3D, 0x23, 0x04, 0x67]);
        let len = u32::from_be_bytes([f[4], f[5], f[6], f[7]]) as usize;
        assert_eq!(len, f.len() - 8);
        let any = Any::decode(&f[8..]).unwrap();
        assert_eq!(any.type_url, "type.googleapis.com/google.protobuf.Struct");
        let data = Struct::decode(any.value.as_slice()).unwrap();
        let Some(Kind::StringValue(id)) = data.fields["x-envoy-peer-metadata-id"].kind.clone()
        else {
            panic!("no id: {data:?}");
        };
        assert_eq!(id, "sidecar~10.0.0.9~echo-v2-1.shop~shop.svc.cluster.local");
        let Some(Kind::StructValue(meta)) = data.fields["x-envoy-peer-metadata"].kind.clone()
        else {
            panic!("no metadata: {data:?}");
        };
        let text = |s: &Struct, k: &str| match s.fields.get(k).and_then(|v| v.kind.clone()) {
            Some(Kind::StringValue(v)) => v,
            other => format!("{other:?}"),
        };
        assert_eq!(text(&meta, "NAMESPACE"), "shop");
        assert_eq!(text(&meta, "WORKLOAD_NAME"), "echo-v2");
        let Some(Kind::StructValue(labels)) = meta.fields["LABELS"].kind.clone() else {
            panic!("no labels: {meta:?}");
        };
        assert_eq!(text(&labels, "app"), "echo");
        assert_eq!(text(&labels, "version"), "v2");
    }

    #[tokio::test]
    async fn a_frame_is_taken_and_what_follows_stays() {
        let mut bytes = frame(&node());
        bytes.extend_from_slice(b"hello");
        let mut s = bytes.as_slice();
        let Front::Peer((id, meta)) = read_front(&mut s, READ_TIMEOUT).await else {
            panic!("no peer");
        };
        assert!(id.to_str().unwrap().starts_with("sidecar~10.0.0.9"));
        let w = Workload::decode_exchange(meta.as_bytes(), "td").unwrap();
        assert_eq!((w.workload.as_str(), w.app.as_str()), ("echo-v2", "echo"));
        assert_eq!(s, b"hello");
    }

    #[tokio::test]
    async fn other_bytes_are_data_and_come_back() {
        // Not the magic: what was read comes back, the rest stays.
        let text = b"GET / HTTP/1.1\r\n";
        let mut s: &[u8] = text;
        let Front::Data(mut d) = read_front(&mut s, READ_TIMEOUT).await else {
            panic!("took a frame");
        };
        assert!(!d.is_empty() && d.len() <= 8);
        d.extend_from_slice(s);
        assert_eq!(d, text);
        // A short stream that ends inside the header.
        let mut s: &[u8] = &[0x3D, 0x23];
        let Front::Data(d) = read_front(&mut s, READ_TIMEOUT).await else {
            panic!("took a frame");
        };
        assert_eq!(d, [0x3D, 0x23]);
        // The magic with a body that is no metadata: the body is data.
        let mut junk = MAGIC.to_be_bytes().to_vec();
        junk.extend_from_slice(&3u32.to_be_bytes());
        junk.extend_from_slice(b"abc");
        let mut s = junk.as_slice();
        let Front::Data(d) = read_front(&mut s, READ_TIMEOUT).await else {
            panic!("took a frame");
        };
        assert_eq!(d, b"abc");
        // An announced length beyond the bound is not read.
        let mut big = MAGIC.to_be_bytes().to_vec();
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut s = big.as_slice();
        assert!(matches!(
            read_front(&mut s, READ_TIMEOUT).await,
            Front::Data(d) if d.len() == 8
        ));
    }

    #[tokio::test]
    async fn both_sides_exchange_over_a_pipe() {
        let (a, b) = tokio::io::duplex(4096);
        let server_node = node();
        let client_node = LocalNode::new(
            Workload {
                workload: "sleep".into(),
                namespace: "default".into(),
                ..Default::default()
            },
            "sidecar~10.0.0.1~sleep-1.default~default.svc.cluster.local",
            "td",
        );
        let (client, server) = tokio::join!(exchange(a, &client_node), exchange(b, &server_node));
        let (mut client, from_server) = client;
        let (mut server, from_client) = server;
        let w = |p: Option<Peer>| Workload::decode_exchange(p.unwrap().1.as_bytes(), "td").unwrap();
        assert_eq!(w(from_server).workload, "echo-v2");
        assert_eq!(w(from_client).workload, "sleep");
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }
}
