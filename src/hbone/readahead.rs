//! A read-ahead buffer beneath TLS.
//!
//! rustls asks its transport for at most 4 KiB more than it holds, so a 16 KiB TLS record costs
//! four or five `read` syscalls (and as many decrypt attempts) when it reads the socket directly.
//! [`ReadAhead`] answers those small reads from one large read of the socket: one syscall for
//! several records, at the price of one memory copy. The buffer is kept between reads only while
//! they fill it (bulk data); a connection waiting on its peer holds none.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read: about four full TLS records.
pub const READ_AHEAD: usize = 64 * 1024;

/// Passes writes through and serves reads from one large read of `io` at a time.
pub struct ReadAhead<T> {
    io: T,
    buf: BytesMut,
    /// Size of the last read from `io`: a full one means bulk data is flowing and the buffer is
    /// worth keeping between reads.
    last_fill: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> ReadAhead<T> {
        ReadAhead {
            io,
            buf: BytesMut::new(),
            last_fill: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Bytes of buffer currently allocated (0 when idle).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }

    fn bulk(&self) -> bool {
        self.last_fill >= READ_AHEAD / 2
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if out.remaining() >= READ_AHEAD {
                // The caller's buffer is as large as ours: read into it, no copy.
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buf.reserve(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Pending => {
                    // Waiting for the peer: hold no memory meanwhile.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n)) => this.last_fill = n,
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && !this.bulk() {
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reach the transport.
    struct Counting<T> {
        io: T,
        reads: Arc<AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let r = Pin::new(&mut self.io).poll_read(cx, buf);
            if r.is_ready() {
                self.reads.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_from_few_transport_reads() {
        let data = pattern(4 << 20);
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let reads = Arc::new(AtomicUsize::new(0));
        let mut ra = ReadAhead::new(Counting {
            io: r,
            reads: reads.clone(),
        });
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
            })
        };
        // Reads the size rustls asks for, plus odd sizes so copies straddle the buffer's end.
        let mut got = Vec::with_capacity(data.len());
        let mut sizes = [4096usize, 4096, 1, 4096, 333, 4096].into_iter().cycle();
        let mut chunk = vec![0u8; 4096];
        loop {
            let want = sizes.next().unwrap();
            let n = ra.read(&mut chunk[..want]).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data, "every byte, in order");
        let transport_reads = reads.load(Ordering::Relaxed);
        // Reading the transport directly in 4 KiB (or smaller) pieces would take over 1,000 reads.
        assert!(
            transport_reads <= data.len() / READ_AHEAD * 2 + 2,
            "{transport_reads} reads of the transport for {} bytes",
            data.len()
        );
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut ra = ReadAhead::new(r);
        w.write_all(b"hello").await.unwrap();
        let mut chunk = [0u8; 4096];
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 5);
        assert_eq!(ra.held(), 0, "a small message leaves no buffer behind");
        // Nothing to read: the read waits, holding nothing.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), async {
            ra.read(&mut chunk).await
        })
        .await;
        assert!(pending.is_err());
        assert_eq!(ra.held(), 0, "waiting for the peer holds no buffer");

        // Bulk keeps the buffer while data flows and gives it back once a small read drains it.
        let big = pattern(READ_AHEAD);
        w.write_all(&big).await.unwrap();
        let n = ra.read(&mut chunk).await.unwrap();
        assert_eq!(&chunk[..n], &big[..n]);
        assert!(ra.held() >= READ_AHEAD - n);
        let mut rest = vec![0u8; READ_AHEAD - n];
        ra.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, big[n..]);
        w.write_all(b"tail").await.unwrap();
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 4);
        assert_eq!(ra.held(), 0);
    }

    #[tokio::test]
    async fn eof_and_errors_pass_through() {
        let (w, r) = tokio::io::duplex(64);
        drop(w);
        let mut ra = ReadAhead::new(r);
        let mut chunk = [0u8; 16];
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 0, "EOF is EOF");
        assert_eq!(ra.held(), 0);
    }
}
