//! The in-memory connection of an internal listener: a duplex byte stream
//! whose two ends tell a half-close (an end's `shutdown`, END_STREAM on a
//! tunnel) from a full close (an end dropped while the other could still
//! send), which a bare in-memory duplex cannot: both read as the end of
//! the stream. Envoy's in-process connections make the difference (a
//! closed peer is a close event, not a read end), and what carries an
//! internal connection passes it on: a CONNECT stream whose internal
//! connection closes while the caller's side is still open is reset, where
//! a half-close ends it with END_STREAM. [`ResetOnClose`] gives that
//! difference to the copy loops, as an error after the end of stream; it
//! adds nothing to the stream it wraps (a proxied connection's task keeps
//! its size), asking the stream itself through [`ClosedUnder`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// One end of an internal connection.
pub struct PipeEnd {
    io: DuplexStream,
    state: Arc<Shared>,
    /// Which of the two ends this is (index into [`Shared`]'s flags).
    side: u8,
}

/// What the two ends know of each other.
#[derive(Default)]
struct Shared {
    /// Each end's full close (dropped).
    closed: [AtomicBool; 2],
    /// Each end's half-close (its sending side ended).
    ended: [AtomicBool; 2],
}

/// Makes an internal connection with `buffer` bytes each way: (client
/// end, listener's end).
pub fn pair(buffer: usize) -> (PipeEnd, PipeEnd) {
    let (a, b) = tokio::io::duplex(buffer);
    let state = Arc::new(Shared::default());
    (
        PipeEnd {
            io: a,
            state: state.clone(),
            side: 0,
        },
        PipeEnd {
            io: b,
            state,
            side: 1,
        },
    )
}

/// A stream that may be one end of an internal connection.
pub trait ClosedUnder {
    /// The other end closed fully while this end had not ended its
    /// sending side: a close, not a half-close (never, for any other
    /// stream).
    fn closed_under(&self) -> bool;
}

impl ClosedUnder for PipeEnd {
    fn closed_under(&self) -> bool {
        let me = usize::from(self.side);
        self.state.closed[1 - me].load(Ordering::Acquire)
            && !self.state.ended[me].load(Ordering::Acquire)
    }
}

impl Drop for PipeEnd {
    fn drop(&mut self) {
        // Before the duplex itself closes (fields drop after this), so an
        // end of stream the other end reads is known as a close by then.
        self.state.closed[usize::from(self.side)].store(true, Ordering::Release);
    }
}

impl AsyncRead for PipeEnd {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PipeEnd {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.state.ended[usize::from(self.side)].store(true, Ordering::Release);
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A stream whose end of stream, when it is an internal connection's end
/// whose other end closed fully rather than ended its sending side, reads
/// as a reset: the copy loop then stops and closes both sides (a tunnel's
/// stream is reset) instead of passing a half-close on. Other streams'
/// ends pass through.
pub struct ResetOnClose<T>(pub T);

impl<T: AsyncRead + ClosedUnder + Unpin> AsyncRead for ResetOnClose<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let this = &mut *self;
        match Pin::new(&mut this.0).poll_read(cx, buf) {
            Poll::Ready(Ok(()))
                if room && buf.filled().len() == before && this.0.closed_under() =>
            {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the internal connection was closed",
                )))
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ResetOnClose<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn watched(end: PipeEnd) -> ResetOnClose<PipeEnd> {
        ResetOnClose(end)
    }

    /// Not an internal connection: never closed under.
    struct Other(PipeEnd);

    impl ClosedUnder for Other {
        fn closed_under(&self) -> bool {
            false
        }
    }

    impl AsyncRead for Other {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    /// A half-close reads as the end of the stream, the other way still
    /// open; bytes sent before it come first.
    #[tokio::test]
    async fn half_close_is_an_end_of_stream() {
        let (client, mut server) = pair(64);
        let mut client = watched(client);
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
        client.write_all(b"more").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"more");
    }

    /// A full close while this end could still send reads as a reset,
    /// after the bytes sent before it.
    #[tokio::test]
    async fn full_close_is_a_reset() {
        let (client, mut server) = pair(64);
        let mut client = watched(client);
        server.write_all(b"last").await.unwrap();
        drop(server);
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"last");
        let e = client.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    /// Once this end ended its side, the other end's close is the end of a
    /// finished connection, not a reset.
    #[tokio::test]
    async fn close_after_this_end_ended_is_an_end() {
        let (client, server) = pair(64);
        let mut client = watched(client);
        client.shutdown().await.unwrap();
        drop(server);
        let mut buf = [0u8; 4];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }

    /// Other streams pass their end through.
    #[tokio::test]
    async fn other_streams_end_passes_through() {
        let (client, server) = pair(64);
        let mut client = ResetOnClose(Other(client));
        drop(server);
        let mut buf = [0u8; 4];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }
}
