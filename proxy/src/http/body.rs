//! Body types of the proxy: what goes upstream (the downstream body, streamed,
//! telling the router when it ended) and what goes downstream (the upstream
//! body, or a local reply).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use tokio::sync::Notify;

/// The downstream request body on its way upstream. It signals its end, since
/// Envoy's route timeout starts once the whole request has been received.
pub struct UpstreamBody {
    inner: Option<Incoming>,
    end: Option<Arc<Notify>>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, end: Option<Arc<Notify>>) -> Self {
        let body = Self {
            inner: Some(inner),
            end,
        };
        if body.is_end_stream() {
            body.signal_end();
        }
        body
    }

    pub fn empty() -> Self {
        Self {
            inner: None,
            end: None,
        }
    }

    fn signal_end(&self) {
        if let Some(n) = &self.end {
            n.notify_one();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let res = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = res {
            self.signal_end();
            if let Some(n) = self.end.take() {
                drop(n);
            }
        } else if let Poll::Ready(Some(Ok(_))) = &res
            && self.is_end_stream()
        {
            self.signal_end();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// A response body for the downstream: streamed from upstream or generated.
pub type ResponseBody = Either<Incoming, Either<Full<Bytes>, Empty<Bytes>>>;

pub fn full(body: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Either::Left(Full::new(body.into())))
}

pub fn empty() -> ResponseBody {
    Either::Right(Either::Right(Empty::new()))
}
