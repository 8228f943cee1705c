//! Moving bytes: TCP ↔ HTTP/2 stream (HBONE both ends) and TCP ↔ TCP (plain paths).
//!
//! Invariants (reliability.md): every byte read from one side is written to the other or the
//! application sees a reset; EOF maps to END_STREAM (and END_STREAM to a TCP FIN), so half-close
//! works both ways; a reset on either side becomes a reset on the other. A peer's EOF or reset is
//! a normal way for a connection to end, reported in the result, not logged as an error.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Read size per syscall. 64 KiB is the largest TLS-friendly chunk that still fits in L2 and
/// matches the default Linux socket buffer growth; issue #3's benchmarks tune it.
pub const COPY_BUF: usize = 64 * 1024;

/// Bytes moved each way and how the connection ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes read from the local TCP side and sent on (to the tunnel / the other socket).
    pub sent: u64,
    /// Bytes received from the tunnel / the other socket and written to the local TCP side.
    pub received: u64,
    /// Whether the connection ended with a reset instead of a clean close both ways.
    pub reset: bool,
}

/// Makes the kernel answer with RST instead of FIN when the socket is dropped, so an application
/// learns its bytes may not have arrived.
pub fn reset_on_drop(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Relays between a TCP connection and an HTTP/2 stream until both directions are closed.
pub async fn tcp_to_h2(
    tcp: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> Transfer {
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut rd, mut wr) = tcp.split();

    let upstream = async {
        let mut buf = BytesMut::with_capacity(COPY_BUF);
        loop {
            // Ask for window first: reading more than h2 may send would just buffer it in h2.
            send.reserve_capacity(COPY_BUF);
            let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(Failure::H2(e)),
                None => return Err(Failure::StreamGone),
            };
            buf.reserve(cap.min(COPY_BUF));
            let n = {
                let mut limited = (&mut rd).take(cap as u64);
                limited.read_buf(&mut buf).await.map_err(Failure::Tcp)?
            };
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(Failure::H2)?;
                return Ok(());
            }
            sent.fetch_add(n as u64, Relaxed);
            send.send_data(buf.split().freeze(), false)
                .map_err(Failure::H2)?;
        }
    };

    let downstream = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(Failure::H2)?;
            let n = chunk.len();
            wr.write_all(&chunk).await.map_err(Failure::Tcp)?;
            received.fetch_add(n as u64, Relaxed);
            // Re-open the window only once the bytes are in the socket: backpressure end to end.
            let _ = recv.flow_control().release_capacity(n);
        }
        wr.shutdown().await.map_err(Failure::Tcp)?;
        Ok(())
    };

    let outcome = run_both(upstream, downstream).await;
    let reset = match outcome {
        Ok(()) => false,
        Err(ref f) => {
            tracing::debug!(reason = %f, "tunnel stream ended abnormally; resetting both sides");
            true
        }
    };
    if reset {
        reset_on_drop(tcp);
        // Only the upstream future owned `send`; after it is dropped we cannot reach it, but
        // dropping an open SendStream makes h2 send RST_STREAM(CANCEL) for us.
    }
    Transfer {
        sent: sent.load(Relaxed),
        received: received.load(Relaxed),
        reset,
    }
}

/// Relays between two TCP connections, with half-close and reset propagation.
pub async fn tcp_to_tcp(a: &mut TcpStream, b: &mut TcpStream) -> Transfer {
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let up = copy_half(&mut ar, &mut bw, &sent);
    let down = copy_half(&mut br, &mut aw, &received);
    let outcome = run_both(up, down).await;
    let reset = outcome.is_err();
    if reset {
        reset_on_drop(a);
        reset_on_drop(b);
    }
    Transfer {
        sent: sent.load(Relaxed),
        received: received.load(Relaxed),
        reset,
    }
}

async fn copy_half(
    r: &mut tokio::net::tcp::ReadHalf<'_>,
    w: &mut tokio::net::tcp::WriteHalf<'_>,
    count: &AtomicU64,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = r.read(&mut buf).await.map_err(Failure::Tcp)?;
        if n == 0 {
            w.shutdown().await.map_err(Failure::Tcp)?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(Failure::Tcp)?;
        count.fetch_add(n as u64, Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("socket error: {0}")]
    Tcp(std::io::Error),
    #[error("HTTP/2 stream error: {0}")]
    H2(h2::Error),
    #[error("HTTP/2 stream closed by the peer")]
    StreamGone,
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
