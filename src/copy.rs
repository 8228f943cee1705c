//! Moving bytes: a byte stream ↔ HTTP/2 stream (HBONE both ends) and stream ↔ stream (plain
//! paths). Generic over tokio's `AsyncRead + AsyncWrite` so benchmarks can drive it in memory.
//!
//! Invariants (docs/reliability.md): every byte read from one side is written to the other or the
//! application sees a reset; EOF maps to END_STREAM (and END_STREAM to a TCP FIN), so half-close
//! works both ways; a reset on either side becomes a reset on the other. A peer's EOF or reset is
//! a normal way for a connection to end, reported in the result, not logged as an error.

use std::future::{poll_fn, Future};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;

/// Smallest read buffer, and the size up to which a read counts as "small". Small reads release
/// their buffer, so an idle connection holds no buffer at all (the RSS-per-idle-connection budget).
pub const MIN_BUF: usize = 16 * 1024;
/// Largest read buffer. Bulk reads grow the buffer to this: fewer syscalls, fewer and larger
/// HTTP/2 DATA frames and TLS flushes. 256 KiB measured best (issue #3 note).
pub const MAX_BUF: usize = 256 * 1024;

/// A byte stream the relays can split into borrowed halves, with a way to wait for readability
/// before a read buffer is allocated.
pub trait Relayable: Send {
    type Read<'a>: AsyncRead + WaitReadable + Unpin + Send
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

/// Waits until a read would not block.
pub trait WaitReadable {
    fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl Relayable for TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

impl WaitReadable for tokio::net::tcp::ReadHalf<'_> {
    fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.readable()
    }
}

/// In-memory pipes (benchmarks, tests) have no readiness to wait on; they read eagerly.
impl Relayable for DuplexStream {
    type Read<'a> = tokio::io::ReadHalf<&'a mut DuplexStream>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut DuplexStream>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }
}

impl WaitReadable for tokio::io::ReadHalf<&mut DuplexStream> {
    fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// A read buffer that is only allocated when data is ready, grows while reads fill it and shrinks
/// (and is released) when they don't.
struct AdaptiveBuf {
    buf: BytesMut,
    size: usize,
}

impl AdaptiveBuf {
    fn new() -> Self {
        AdaptiveBuf {
            buf: BytesMut::new(),
            size: MIN_BUF,
        }
    }

    /// Reads once from `r`; returns the bytes read (empty at EOF).
    async fn read_from<R: AsyncRead + WaitReadable + Unpin>(
        &mut self,
        r: &mut R,
    ) -> io::Result<Bytes> {
        if self.buf.capacity() == 0 {
            // Idle: hold no memory until the socket has something for us.
            r.wait_readable().await?;
        }
        // Reclaims the previous allocation once the last chunk sent from it was dropped.
        self.buf.reserve(self.size);
        let room = self.buf.capacity() - self.buf.len();
        let n = r.read_buf(&mut self.buf).await?;
        let data = self.buf.split().freeze();
        if n >= room {
            self.size = (self.size * 2).min(MAX_BUF);
        } else if n < self.size / 4 {
            self.size = (self.size / 2).max(MIN_BUF);
        }
        if n < MIN_BUF {
            // A small message: do not pin a buffer between messages.
            self.buf = BytesMut::new();
        }
        Ok(data)
    }
}

/// Bytes moved each way and how the connection ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes read from the local side and sent on (to the tunnel / the other socket).
    pub sent: u64,
    /// Bytes received from the tunnel / the other socket and written to the local side.
    pub received: u64,
    /// Whether the connection ended with a reset instead of a clean close both ways. The caller
    /// must then reset its sockets (`reset_on_drop`) so the application learns of it.
    pub reset: bool,
}

/// Makes the kernel answer with RST instead of FIN when the socket is dropped, so an application
/// learns its bytes may not have arrived.
pub fn reset_on_drop(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Relays between a byte stream and an HTTP/2 stream until both directions are closed.
pub async fn stream_to_h2<S: Relayable>(
    io: &mut S,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> Transfer {
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut rd, mut wr) = io.halves();

    let upstream = async {
        let mut buf = AdaptiveBuf::new();
        loop {
            let mut data = buf.read_from(&mut rd).await.map_err(Failure::Io)?;
            if data.is_empty() {
                send.send_data(Bytes::new(), true).map_err(Failure::H2)?;
                return Ok(());
            }
            sent.fetch_add(data.len() as u64, Relaxed);
            // Ask for window only for bytes we hold: a stream that reserved capacity while idle
            // would starve its siblings of the shared connection window.
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => return Err(Failure::H2(e)),
                    None => return Err(Failure::StreamGone),
                };
                let chunk = data.split_to(cap.min(data.len()));
                send.send_data(chunk, false).map_err(Failure::H2)?;
            }
        }
    };

    let downstream = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(Failure::H2)?;
            let n = chunk.len();
            wr.write_all(&chunk).await.map_err(Failure::Io)?;
            received.fetch_add(n as u64, Relaxed);
            // Re-open the window only once the bytes are in the socket: backpressure end to end.
            let _ = recv.flow_control().release_capacity(n);
        }
        wr.shutdown().await.map_err(Failure::Io)?;
        Ok(())
    };

    // On failure the h2 handles are dropped with the futures, and h2 answers an open stream
    // whose handles are gone with RST_STREAM(CANCEL).
    let reset = finish(run_both(upstream, downstream).await);
    Transfer {
        sent: sent.load(Relaxed),
        received: received.load(Relaxed),
        reset,
    }
}

/// Relays between two byte streams, with half-close and reset propagation.
pub async fn stream_to_stream<A: Relayable, B: Relayable>(a: &mut A, b: &mut B) -> Transfer {
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut ar, mut aw) = a.halves();
    let (mut br, mut bw) = b.halves();
    let up = copy_half(&mut ar, &mut bw, &sent);
    let down = copy_half(&mut br, &mut aw, &received);
    let reset = finish(run_both(up, down).await);
    Transfer {
        sent: sent.load(Relaxed),
        received: received.load(Relaxed),
        reset,
    }
}

/// TCP ↔ HTTP/2, resetting the socket when the stream failed.
pub async fn tcp_to_h2(tcp: &mut TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Transfer {
    let t = stream_to_h2(tcp, send, recv).await;
    if t.reset {
        reset_on_drop(tcp);
    }
    t
}

/// TCP ↔ TCP, resetting both sockets when either side failed.
pub async fn tcp_to_tcp(a: &mut TcpStream, b: &mut TcpStream) -> Transfer {
    let t = stream_to_stream(a, b).await;
    if t.reset {
        reset_on_drop(a);
        reset_on_drop(b);
    }
    t
}

async fn copy_half<R, W>(r: &mut R, w: &mut W, count: &AtomicU64) -> Result<(), Failure>
where
    R: AsyncRead + WaitReadable + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = AdaptiveBuf::new();
    loop {
        let data = buf.read_from(r).await.map_err(Failure::Io)?;
        if data.is_empty() {
            w.shutdown().await.map_err(Failure::Io)?;
            return Ok(());
        }
        w.write_all(&data).await.map_err(Failure::Io)?;
        count.fetch_add(data.len() as u64, Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("socket error: {0}")]
    Io(std::io::Error),
    #[error("HTTP/2 stream error: {0}")]
    H2(h2::Error),
    #[error("HTTP/2 stream closed by the peer")]
    StreamGone,
}

fn finish(outcome: Result<(), Failure>) -> bool {
    match outcome {
        Ok(()) => false,
        Err(f) => {
            tracing::debug!(reason = %f, "relay ended abnormally; resetting both sides");
            true
        }
    }
}

/// Drives both directions; the first failure ends both (the caller then resets).
async fn run_both(
    a: impl std::future::Future<Output = Result<(), Failure>>,
    b: impl std::future::Future<Output = Result<(), Failure>>,
) -> Result<(), Failure> {
    tokio::pin!(a, b);
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        tokio::select! {
            r = &mut a, if !a_done => { r?; a_done = true; }
            r = &mut b, if !b_done => { r?; b_done = true; }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn stream_to_stream_counts_and_half_closes() {
        let (mut app_a, mut proxy_a) = duplex(1024);
        let (mut proxy_b, mut app_b) = duplex(1024);
        let relay = tokio::spawn(async move { stream_to_stream(&mut proxy_a, &mut proxy_b).await });
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sender = {
            let data = data.clone();
            tokio::spawn(async move {
                app_a.write_all(&data).await.unwrap();
                app_a.shutdown().await.unwrap();
                let mut back = Vec::new();
                app_a.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        app_b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        // The other direction still works after the first one closed.
        app_b.write_all(b"reply").await.unwrap();
        app_b.shutdown().await.unwrap();
        drop(app_b);
        assert_eq!(sender.await.unwrap(), b"reply");
        let t = relay.await.unwrap();
        assert_eq!(
            t,
            Transfer {
                sent: 100_000,
                received: 5,
                reset: false
            }
        );
    }
}
