//! The gRPC framing of the ADS and SDS streams, written here rather than left
//! to tonic's generated servers: each response is encoded into a buffer of
//! exactly its size, handed to HTTP/2 and freed once sent.
//!
//! tonic's encoder keeps one growing buffer per stream and splits every
//! response off its front, so the buffer holds on to the allocation of the
//! largest response the stream ever sent for as long as the stream lives:
//! about 1.2 MiB per connected proxy at 1,000 services, most of what a proxy
//! cost ferry-pilot (heaptrack, `benches/README.md`). Requests are still read
//! by tonic's decoder, with the limits the generated servers apply.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;
use http_body::Frame;
use tokio_stream::Stream;
use tonic::codec::Codec;
use tonic::{Request, Status, Streaming};

/// Serves one bidirectional stream: requests decoded by tonic into `open`,
/// whose responses are framed here.
pub(crate) fn serve<Req, Resp, S>(
    req: http::Request<tonic::body::Body>,
    max_request_bytes: usize,
    open: impl FnOnce(Request<Streaming<Req>>) -> S,
) -> http::Response<tonic::body::Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
    S: Stream<Item = Result<Resp, Status>> + Unpin + Send + 'static,
{
    // No compression is offered (as tonic's servers here): a compressed
    // request is refused as they refuse it.
    if let Some(enc) = req.headers().get("grpc-encoding")
        && enc != "identity"
    {
        let enc = String::from_utf8_lossy(enc.as_bytes()).into_owned();
        return Status::unimplemented(format!(
            "Content is compressed with `{enc}` which isn't supported"
        ))
        .into_http();
    }
    let req = req.map(|body| {
        let mut codec = tonic_prost::ProstCodec::<Resp, Req>::default();
        Streaming::new_request(codec.decoder(), body, None, Some(max_request_bytes))
    });
    let responses = open(Request::from_http(req));
    let mut res = http::Response::new(tonic::body::Body::new(Responses {
        stream: responses,
        done: false,
    }));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    res
}

/// The response body: one length-prefixed message per data frame, then the
/// trailers carrying the stream's status.
struct Responses<S> {
    stream: S,
    done: bool,
}

impl<S, M> http_body::Body for Responses<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: prost::Message,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match ready!(Pin::new(&mut self.stream).poll_next(cx)) {
            Some(Ok(msg)) => match message(&msg) {
                Ok(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(e) = status.add_header(&mut trailers) {
            tracing::warn!(xds.error = %e, "the stream's status could not be written as trailers");
            trailers.insert("grpc-status", HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// `msg` as one gRPC message: the uncompressed flag, its length, its bytes,
/// in one allocation of that size.
fn message<M: prost::Message>(msg: &M) -> Result<Bytes, Status> {
    let len = msg.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| {
        Status::resource_exhausted(format!("a response of {len} bytes exceeds gRPC's limit"))
    })?;
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    msg.encode_raw(&mut buf);
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    /// The next frame, which must be the trailers.
    async fn trailers<B>(body: &mut B) -> http::HeaderMap
    where
        B: http_body::Body + Unpin,
        B::Error: std::fmt::Debug,
    {
        let frame = body.frame().await.expect("a frame").expect("no error");
        frame.into_trailers().ok().expect("trailers")
    }

    #[tokio::test]
    async fn responses_are_framed_one_by_one_then_the_status() {
        let one = DiscoveryResponse {
            version_info: "v1".into(),
            nonce: "1".into(),
            ..Default::default()
        };
        let items = vec![Ok(one.clone()), Err(Status::aborted("gone, with ü"))];
        let mut body = Responses {
            stream: tokio_stream::iter(items),
            done: false,
        };
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first[0], 0, "not compressed");
        let len = u32::from_be_bytes(first[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, first.len() - 5);
        let back: DiscoveryResponse = prost::Message::decode(&first[5..]).unwrap();
        assert_eq!(back, one);
        let status = Status::from_header_map(&trailers(&mut body).await).unwrap();
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert_eq!(status.message(), "gone, with ü");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());

        // A stream that ends: status 0.
        let mut body = Responses {
            stream: tokio_stream::iter(Vec::<Result<DiscoveryResponse, Status>>::new()),
            done: false,
        };
        assert_eq!(trailers(&mut body).await["grpc-status"], "0");
    }
}
