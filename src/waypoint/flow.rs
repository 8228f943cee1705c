//! An admitted flow, however it arrived (an HBONE CONNECT stream, or a PROXY-protocol
//! connection behind a node tunnel): who sent it and where to (`Downstream`), the byte stream
//! (`DownstreamIo`), and the choice between HTTP and opaque TCP by the target port's declared
//! protocol, else by sniffing the first bytes (which `Rewind` then gives back).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::request::serve_http;
use super::server::Waypoint;
use super::state::WpState;
use super::tcp::relay_tcp;
use crate::hbone::io::H2Io;
use crate::hbone::server;
use crate::identity::SpiffeId;

/// How long to wait for a client's first bytes before treating the stream as opaque TCP
/// (server-first protocols send nothing). Istio's protocol-detection timeout is the same order.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(100);

/// Who sent a CONNECT (or a PROXY header, `sandwich`) and where to.
#[derive(Clone)]
pub(super) struct Downstream {
    pub(super) client: SpiffeId,
    pub(super) peer: SocketAddr,
    /// The HBONE connection's limits: upstream opens run under its dial cap.
    pub(super) guard: server::StreamGuard,
    /// The original destination (`:authority`): a service VIP:port or a workload IP:port.
    pub(super) dst: SocketAddr,
}

/// The downstream byte stream a flow arrived on: an HBONE stream, or a PROXY-protocol TCP
/// connection (`sandwich`). The TCP relay needs to know what went back to the client and how
/// to reset it.
pub(super) trait DownstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Bytes written toward the client so far.
    fn written(&self) -> u64;
    /// Ends the stream with a reset, never a clean close.
    fn reset(&mut self);
}

impl DownstreamIo for H2Io {
    fn written(&self) -> u64 {
        H2Io::written(self)
    }
    fn reset(&mut self) {
        H2Io::reset(self)
    }
}

/// Serves an admitted flow: HTTP or opaque TCP, by the target port's declared protocol, else
/// by sniffing its first bytes.
pub(super) async fn carry<IO: DownstreamIo>(
    wp: Arc<Waypoint>,
    state: &WpState,
    down: Downstream,
    mut io: IO,
) {
    let (dst, guard) = (down.dst, down.guard.clone());
    let declared = state
        .model
        .service_by_vip(dst.ip())
        .and_then(|s| s.app_protocols.get(&dst.port()).copied());
    match declared {
        Some(crate::config::AppProtocol::Tcp) => {
            return relay_tcp(wp, down, Rewind::new(Vec::new(), io)).await
        }
        Some(crate::config::AppProtocol::Http) => {
            return serve_http(wp, down, Rewind::new(Vec::new(), io)).await
        }
        None => {}
    }
    // Sniff: HTTP/1.x request line or the HTTP/2 preface, else opaque TCP.
    let mut first = vec![0u8; 16];
    let n = match tokio::time::timeout(SNIFF_TIMEOUT, io.read(&mut first)).await {
        Ok(Ok(n)) => n,
        Ok(Err(_)) => {
            // Reset before it sent anything: nothing was dialed, but it counts (rapid reset).
            guard.tunnel_ended(0, true);
            return;
        }
        Err(_) => 0,
    };
    first.truncate(n);
    let io = Rewind::new(first.clone(), io);
    if n > 0 && looks_like_http(&first) {
        serve_http(wp, down, io).await;
    } else {
        relay_tcp(wp, down, io).await;
    }
}

/// The sniffer and its replay, for the fuzz targets in `fuzz/`: not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Whether the first bytes of a stream are taken for HTTP/1.x or HTTP/2.
    pub fn looks_like_http(first: &[u8]) -> bool {
        super::looks_like_http(first)
    }

    /// The stream handed on after sniffing: `prefix` (the sniffed bytes), then `inner`.
    pub fn rewind<T>(prefix: Vec<u8>, inner: T) -> super::Rewind<T> {
        super::Rewind::new(prefix, inner)
    }
}

/// HTTP/1.x starts with a method token and a space; HTTP/2 prior knowledge with "PRI ".
fn looks_like_http(b: &[u8]) -> bool {
    let token_len = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    (3..=7).contains(&token_len) && b.get(token_len) == Some(&b' ')
}

/// Gives back the bytes read while sniffing, then reads from the stream.
pub struct Rewind<T> {
    prefix: Bytes,
    pub(super) inner: T,
}

impl<T> Rewind<T> {
    pub(super) fn new(prefix: Vec<u8>, inner: T) -> Self {
        Rewind {
            prefix: Bytes::from(prefix),
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sniffer_takes_request_lines_and_the_h2_preface_for_http_and_nothing_else() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0",
            b"OPTIONS * HTTP/1.1",
            b"PUT ",
        ] {
            assert!(looks_like_http(http), "{:?}", String::from_utf8_lossy(http));
        }
        for tcp in [
            &b"SSH-2.0-OpenSSH"[..],
            b"\x16\x03\x01\x02\x00",
            b"get / HTTP/1.1",
            b"GE / HTTP/1.1",
            b"CONNECTS x",
            b"GET",
            b"",
        ] {
            assert!(!looks_like_http(tcp), "{:?}", String::from_utf8_lossy(tcp));
        }
    }

    #[tokio::test]
    async fn the_sniffed_bytes_are_replayed_before_the_rest_of_the_stream() {
        let mut io = Rewind::new(b"GET / HT".to_vec(), &b"TP/1.1\r\n\r\n"[..]);
        let mut got = Vec::new();
        let mut small = [0u8; 3];
        loop {
            let n = io.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
    }
}
