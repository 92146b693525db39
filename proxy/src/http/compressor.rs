//! The compressor filter (`envoy.filters.http.compressor`) on the data path:
//! on the request it keeps the client's `accept-encoding` (removing it when
//! configured); on the response the chain's compressors run in Envoy's
//! encode order (last filter first), one of them may compress, and the body
//! is compressed chunk by chunk as it streams, never held whole. Counters
//! are Envoy's, under
//! `http.<stat_prefix>.compressor.<library name>.<library>.[response.]`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use ferry_filters::http::compressor::{self as engine, Encoder, HeaderStat, Skip};
use ferry_model::HttpConnectionManager;
use ferry_model::compressor::Compressor;
use http::{HeaderMap, Request, header};
use http_body::{Body, Frame, SizeHint};

use super::body::ResponseBodyError;
use crate::stats::{Counter, Stats};

/// One compressor filter a request passed, with what the client accepts.
#[derive(Clone)]
struct Run {
    cfg: Arc<Compressor>,
    accept: Option<String>,
}

/// The compressors a request passed, in filter order; carried to the
/// response as an extension.
#[derive(Clone, Default)]
pub struct Plan(Vec<Run>);

impl Plan {
    /// The compressor's request side: keep `accept-encoding`, remove it
    /// when configured (so the upstream does not compress first).
    pub fn decode<B>(&mut self, cfg: &Arc<Compressor>, req: &mut Request<B>) {
        let accept = req
            .headers()
            .get(header::ACCEPT_ENCODING)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if cfg.enabled && cfg.remove_accept_encoding_header {
            req.headers_mut().remove(header::ACCEPT_ENCODING);
        }
        self.0.push(Run {
            cfg: cfg.clone(),
            accept,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Envoy's counters of one compressor filter.
struct FilterStats {
    prefix: String,
}

impl FilterStats {
    fn new(hcm: &HttpConnectionManager, c: &Compressor) -> Self {
        let direction = if c.response_stats { "response." } else { "" };
        Self {
            prefix: format!(
                "http.{}.compressor.{}.{}.{direction}",
                hcm.stat_prefix,
                c.library_name,
                c.library.stats_prefix()
            ),
        }
    }

    fn counter(&self, stats: &Stats, name: &str) -> Counter {
        stats.counter(&format!("{}{name}", self.prefix))
    }
}

/// Runs the response side of the compressors of `plan` over the response
/// head; `Some` with the encoder when one of them compresses.
pub fn encode(
    stats: &Stats,
    hcm: &HttpConnectionManager,
    plan: &Plan,
    status: u16,
    headers: &mut HeaderMap,
    end_stream: bool,
) -> Option<Active> {
    let chain: Vec<&Compressor> = plan.0.iter().map(|r| r.cfg.as_ref()).collect();
    // One decision per response, shared by every compressor (Envoy caches
    // it in the stream's filter state).
    let mut decision: Option<engine::Decision> = None;
    let mut active = None;
    for run in plan.0.iter().rev() {
        let c = run.cfg.as_ref();
        let fs = FilterStats::new(hcm, c);
        let compressible = engine::compressible(c, status, headers);
        match compressible {
            Err(Skip::ContentLengthTooSmall) => fs.counter(stats, "content_length_too_small").inc(),
            Err(Skip::Etag) => fs.counter(stats, "not_compressed_etag").inc(),
            _ => {}
        }
        let chosen = compressible.is_ok()
            && match &run.accept {
                None => {
                    fs.counter(stats, "no_accept_header").inc();
                    false
                }
                Some(accept) => {
                    let d = decision
                        .get_or_insert_with(|| engine::choose_encoding(accept, &chain, headers));
                    let mine = d.encoding.eq_ignore_ascii_case(c.library.encoding());
                    match d.stat {
                        HeaderStat::ValidCompressor if mine => {
                            fs.counter(stats, "header_compressor_used").inc();
                            if c.library.encoding() == "gzip" {
                                fs.counter(stats, "header_gzip").inc();
                            }
                        }
                        HeaderStat::ValidCompressor => {
                            fs.counter(stats, "header_compressor_overshadowed").inc()
                        }
                        HeaderStat::Identity => fs.counter(stats, "header_identity").inc(),
                        HeaderStat::Wildcard => fs.counter(stats, "header_wildcard").inc(),
                        HeaderStat::NotValid => fs.counter(stats, "header_not_valid").inc(),
                    }
                    mine
                }
            };
        if !end_stream && chosen && engine::transfer_encoding_allows(headers) {
            match Encoder::new(&c.library) {
                Ok(enc) => {
                    engine::compress_headers(c, headers);
                    fs.counter(stats, "compressed").inc();
                    active = Some(Active {
                        enc,
                        uncompressed: fs.counter(stats, "total_uncompressed_bytes"),
                        compressed: fs.counter(stats, "total_compressed_bytes"),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "compressor unavailable; response sent as is");
                    fs.counter(stats, "not_compressed").inc();
                }
            }
        } else {
            fs.counter(stats, "not_compressed").inc();
        }
        // Even when the client's encodings leave it uncompressed, a cache
        // in front must know the answer varies with them.
        if compressible.is_ok() {
            engine::insert_vary(headers);
        }
    }
    active
}

/// The encoder of a response being compressed, with its byte counters.
pub struct Active {
    enc: Encoder,
    uncompressed: Counter,
    compressed: Counter,
}

/// The response body downstream: passed through, or compressed as it
/// streams (each chunk flushed; trailers follow the encoder's last bytes).
pub struct CompressBody<B> {
    inner: B,
    active: Option<Active>,
    /// Trailers held while the encoder's last bytes go out.
    trailers: Option<HeaderMap>,
    finished: bool,
}

impl<B> CompressBody<B> {
    pub fn new(inner: B, active: Option<Active>) -> Self {
        Self {
            inner,
            active,
            trailers: None,
            finished: false,
        }
    }
}

/// The body's error: the inner body's, or the encoder's.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Body for CompressBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(active) = this.active.as_mut() else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(f))) => Some(f),
                Poll::Ready(None) => None,
            };
            let (out, trailers) = match frame {
                Some(f) => match f.into_data() {
                    Ok(data) => {
                        active.uncompressed.add(data.len() as u64);
                        let out = active.enc.chunk(&data);
                        match out {
                            // Nothing to send yet: read on.
                            Ok(o) if o.is_empty() => continue,
                            o => (o, None),
                        }
                    }
                    Err(f) => match f.into_trailers() {
                        Ok(t) => {
                            this.finished = true;
                            (active.enc.finish(), Some(t))
                        }
                        Err(_) => continue,
                    },
                },
                None => {
                    this.finished = true;
                    (active.enc.finish(), None)
                }
            };
            let out = match out {
                Ok(o) => o,
                Err(e) => return Poll::Ready(Some(Err(Box::new(ResponseBodyError::Compress(e))))),
            };
            active.compressed.add(out.len() as u64);
            this.trailers = trailers;
            if out.is_empty() {
                if let Some(t) = this.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                return Poll::Ready(None);
            }
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.active {
            None => self.inner.is_end_stream(),
            Some(_) => self.finished && self.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.active {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}
