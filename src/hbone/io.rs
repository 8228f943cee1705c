//! One HBONE stream as a byte stream (`AsyncRead + AsyncWrite`), so protocol code that expects
//! a socket (hyper, for the waypoint's HTTP) can run inside a CONNECT tunnel.
//!
//! Reads hand out DATA frames and give their bytes back to the peer's flow-control window as
//! they are consumed; writes wait for send capacity, so a slow reader pushes back on the writer
//! instead of buffering without bound. Shutdown sends END_STREAM (TCP's FIN); dropping the
//! stream without it resets the stream (h2 sends RST_STREAM CANCEL), which the other tunnel
//! end turns into a TCP reset.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    read_closed: bool,
    write_closed: bool,
    /// Bytes written to the stream so far (toward its peer).
    written: u64,
}

impl H2Io {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Io {
        H2Io {
            send,
            recv,
            pending: Bytes::new(),
            read_closed: false,
            write_closed: false,
            written: 0,
        }
    }

    /// Bytes written to the stream so far, toward its peer.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Resets the stream (RST_STREAM CANCEL): the peer learns the bytes may not all have
    /// arrived, where dropping after a clean shutdown would read as a complete exchange.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("checked is_io");
    }
    // A reset stream is what a TCP reset is to a socket.
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Returned to the window now: the bytes are ours, and `pending` is bounded
                    // by one frame.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => this.read_closed = true,
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.send.reserve_capacity(buf.len());
        match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                let n = n.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(to_io)?;
                this.written += n as u64;
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(to_io(e))),
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 queues frames on the connection; there is nothing to flush per stream.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client and server stream over an in-memory HTTP/2 connection.
    async fn pair() -> (H2Io, H2Io) {
        let (c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Io::new(send, req.into_body())
        });
        let (send, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let (resp, stream) = send.send_request(http::Request::new(()), false).unwrap();
        let srv = server.await.unwrap();
        let resp = resp.await.unwrap();
        (H2Io::new(stream, resp.into_body()), srv)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_larger_than_the_window_with_half_close() {
        let (mut a, mut b) = pair().await;
        // 1 MiB: far past the 64 KiB default stream window, so flow control must turn over.
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data, "EOF after END_STREAM, every byte in order");
        b.write_all(b"reply after half-close").await.unwrap();
        b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
    }

    #[tokio::test]
    async fn dropping_one_end_resets_the_other() {
        let (a, mut b) = pair().await;
        drop(a);
        let mut buf = [0u8; 8];
        let e = b.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }
}
