//! The east-west gateway's control-plane passthrough (`node.east_west_gateway.control_plane`,
//! docs/model.md "Networks"): TCP on the gateway's port 15012 relayed, byte for byte, to one
//! configured control plane, so VMs and nodes of other networks reach istiod through the
//! gateway. The TLS inside ends at the control plane; this relays ciphertext only.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::socket::{dial_in, DialOptions};

/// Connections the control-plane passthrough holds at once; one more is reset at accept.
/// Each is a node's or VM's xDS or CA connection, so a gateway sees a few per caller.
pub(super) const MAX_PASSTHROUGH: usize = 1024;
/// Of those, at most this many from one source address (a NAT may hide many VMs behind one).
pub(super) const MAX_PASSTHROUGH_PER_SOURCE: usize = 64;
/// A caller must send its first bytes (a TLS ClientHello) within this; nothing is dialed
/// before, so a silent connection costs the control plane nothing.
const PASSTHROUGH_FIRST_BYTE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the control plane may take to accept before the caller is reset.
const PASSTHROUGH_DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// A passed-through connection with no byte either way for this long is reset. xDS clients
/// send HTTP/2 keepalive pings far more often (zmesh's every 30 s).
const PASSTHROUGH_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// Connections held per source address; an entry goes when its last connection does.
#[derive(Default)]
struct PerSource(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection's place in [`PerSource`], given back on drop.
struct SourceSlot(Arc<PerSource>, std::net::IpAddr);

impl PerSource {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), ip))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// The passthrough's bounds (the constants above; smaller in tests).
#[derive(Debug, Clone, Copy)]
pub(super) struct PassthroughLimits {
    pub max: usize,
    pub per_source: usize,
    pub first_byte: std::time::Duration,
    pub idle: std::time::Duration,
}

impl Default for PassthroughLimits {
    fn default() -> PassthroughLimits {
        PassthroughLimits {
            max: MAX_PASSTHROUGH,
            per_source: MAX_PASSTHROUGH_PER_SOURCE,
            first_byte: PASSTHROUGH_FIRST_BYTE,
            idle: PASSTHROUGH_IDLE,
        }
    }
}

/// `node.east_west_gateway.control_plane`: TCP on the gateway's port 15012 passed through, byte
/// for byte, to the configured control plane (Istio's "expose istiod" on an east-west gateway).
/// The TLS inside is between the caller and the control plane; the gateway holds no key of it.
/// The destination is fixed by the config, so a caller can reach nothing else through it.
/// Bounded (docs/reliability.md case 49): [`MAX_PASSTHROUGH`] connections at once and
/// [`MAX_PASSTHROUGH_PER_SOURCE`] per source address (more are reset at accept); nothing is
/// dialed until the caller's first byte, which must come within [`PASSTHROUGH_FIRST_BYTE`];
/// a connection idle both ways for [`PASSTHROUGH_IDLE`] is reset.
pub(super) async fn control_plane_passthrough(
    mark: Option<u32>,
    listener: tokio::net::TcpListener,
    target: SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
    limits: PassthroughLimits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max));
    let per_source = Arc::new(PerSource::default());
    loop {
        let (down, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "control-plane passthrough: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (Ok(slot), Some(source_slot)) = (
            slots.clone().try_acquire_owned(),
            per_source.take(peer.ip(), limits.per_source),
        ) else {
            crate::copy::reset_on_drop(&down);
            tracing::warn!(%peer, max = limits.max, per_source = limits.per_source, "control-plane passthrough full; connection reset");
            continue;
        };
        let opts = DialOptions {
            mark,
            source: None,
            transparent: false,
        };
        tokio::spawn(async move {
            let _slots = (slot, source_slot);
            pass_through(down, peer, target, opts, limits).await;
        });
    }
}

/// One passed-through connection: first byte, dial, then bytes both ways until both ends
/// close, one fails (both are reset) or nothing moves for `limits.idle` (both are reset).
async fn pass_through(
    mut down: tokio::net::TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    opts: DialOptions,
    limits: PassthroughLimits,
) {
    let mut probe = [0u8; 1];
    match tokio::time::timeout(limits.first_byte, down.peek(&mut probe)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => return,
        Err(_) => {
            crate::copy::reset_on_drop(&down);
            tracing::debug!(%peer, "control-plane passthrough: no first byte in time; reset");
            return;
        }
    }
    let dialed = tokio::time::timeout(
        PASSTHROUGH_DIAL_TIMEOUT,
        Box::pin(dial_in(None, target, opts)),
    )
    .await;
    let mut up = match dialed {
        Ok(Ok(up)) => up,
        Ok(Err(e)) => {
            crate::copy::reset_on_drop(&down);
            tracing::warn!(%peer, %target, error = %e, "control-plane passthrough: dial failed; caller reset");
            return;
        }
        Err(_) => {
            crate::copy::reset_on_drop(&down);
            tracing::warn!(%peer, %target, "control-plane passthrough: dial timed out; caller reset");
            return;
        }
    };
    crate::socket::tune(&down);
    let activity = std::sync::atomic::AtomicU64::new(0);
    let outcome = {
        let mut a = Counted(&mut down, &activity);
        let mut b = Counted(&mut up, &activity);
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        let mut seen = 0;
        loop {
            tokio::select! {
                r = &mut copy => break Some(r),
                _ = tokio::time::sleep(limits.idle) => {
                    let now = activity.load(std::sync::atomic::Ordering::Relaxed);
                    if now == seen {
                        break None;
                    }
                    seen = now;
                }
            }
        }
    };
    match outcome {
        Some(Ok((sent, received))) => {
            tracing::debug!(%peer, %target, sent, received, "control-plane passthrough closed");
        }
        failed => {
            // One side failed or went quiet: both see a reset, never a clean end that looks
            // complete.
            crate::copy::reset_on_drop(&down);
            crate::copy::reset_on_drop(&up);
            tracing::debug!(%peer, %target, idle = failed.is_none(), "control-plane passthrough reset");
        }
    }
}

/// A stream that counts the reads and writes that moved bytes, for the idle check.
struct Counted<'a>(
    &'a mut tokio::net::TcpStream,
    &'a std::sync::atomic::AtomicU64,
);

impl Counted<'_> {
    fn touch(&self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *self.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl tokio::io::AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.0).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// An echo server standing in for the control plane.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn passthrough(
        target: SocketAddr,
        limits: PassthroughLimits,
    ) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(control_plane_passthrough(None, l, target, rx, limits));
        (addr, tx)
    }

    fn limits(max: usize, per_source: usize) -> PassthroughLimits {
        PassthroughLimits {
            max,
            per_source,
            ..PassthroughLimits::default()
        }
    }

    /// Connects (the test then writes first, as a TLS client sends its ClientHello first).
    async fn caller(gw: SocketAddr) -> TcpStream {
        TcpStream::connect(gw).await.unwrap()
    }

    async fn round_trip(c: &mut TcpStream, msg: &[u8]) {
        c.write_all(msg).await.unwrap();
        let mut got = vec![0; msg.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }

    /// Expects a reset (never a clean end that could pass for an answer).
    async fn assert_reset(c: &mut TcpStream) {
        assert_reset_within(c, std::time::Duration::from_secs(10)).await;
    }

    async fn assert_reset_within(c: &mut TcpStream, limit: std::time::Duration) {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(limit, c.read(&mut buf))
            .await
            .expect("a reset, not a hang");
        match r {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("read {n} bytes instead of a reset"),
        }
    }

    #[tokio::test]
    async fn the_control_plane_passthrough_relays_exactly_and_holds_at_most_its_bound() {
        let (gw, stop) = passthrough(echo().await, limits(2, 2)).await;
        let mut a = caller(gw).await;
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        round_trip(&mut a, &big).await;
        let mut b = caller(gw).await;
        round_trip(&mut b, b"second").await;
        // Both slots held: a third caller is reset at once, holding nothing.
        let mut c = caller(gw).await;
        // (Reset at accept: the write may already fail.)
        let _ = c.write_all(b"\x16").await;
        assert_reset(&mut c).await;
        // A slot comes back when its connection ends.
        drop(a);
        let again = async {
            loop {
                let mut d = caller(gw).await;
                let _ = d.write_all(b"again").await;
                let mut got = [0u8; 5];
                match d.read_exact(&mut got).await {
                    Ok(_) => {
                        assert_eq!(&got, b"again");
                        break d;
                    }
                    // The slot is freed once the relay task has seen the close: try again.
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        };
        let mut d = tokio::time::timeout(std::time::Duration::from_secs(10), again)
            .await
            .expect("a slot comes back when its connection ends");
        round_trip(&mut d, b"and on").await;
        // Stopped, it accepts no more.
        stop.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while TcpStream::connect(gw).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the listener closes on stop");
    }

    #[tokio::test]
    async fn a_caller_is_reset_when_the_control_plane_cannot_be_reached() {
        let gone = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let (gw, _stop) = passthrough(gone, limits(4, 4)).await;
        for _ in 0..8 {
            let mut c = caller(gw).await;
            c.write_all(b"\x16").await.unwrap();
            assert_reset(&mut c).await;
        }
    }

    #[tokio::test]
    async fn one_source_cannot_take_every_slot() {
        let (gw, _stop) = passthrough(echo().await, limits(8, 2)).await;
        let mut held = Vec::new();
        for i in 0..2 {
            let mut c = caller(gw).await;
            round_trip(&mut c, format!("held {i}").as_bytes()).await;
            held.push(c);
        }
        // 127.0.0.1 holds its two: the third from it is reset though six slots are free.
        let mut c = caller(gw).await;
        let _ = c.write_all(b"\x16").await;
        assert_reset(&mut c).await;
        // Another source address still gets in.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut o = other.connect(gw).await.unwrap();
        round_trip(&mut o, b"from elsewhere").await;
    }

    #[tokio::test(start_paused = true)]
    async fn silent_and_idle_callers_are_reset_and_nothing_is_dialed_for_the_silent() {
        // The "control plane" counts the connections it accepts, and holds them silent.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = l.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s);
            }
        });
        let (gw, _stop) = passthrough(target, PassthroughLimits::default()).await;
        // Silent: reset at the first-byte deadline, the control plane never dialed.
        let mut silent = caller(gw).await;
        let start = tokio::time::Instant::now();
        assert_reset_within(&mut silent, PASSTHROUGH_FIRST_BYTE * 2).await;
        assert!(
            start.elapsed() >= PASSTHROUGH_FIRST_BYTE,
            "{:?}",
            start.elapsed()
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        // Talks once, then nothing either way: reset after the idle time.
        let mut quiet = caller(gw).await;
        quiet.write_all(b"\x16").await.unwrap();
        let start = tokio::time::Instant::now();
        assert_reset_within(&mut quiet, PASSTHROUGH_IDLE * 3).await;
        assert!(start.elapsed() >= PASSTHROUGH_IDLE, "{:?}", start.elapsed());
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
