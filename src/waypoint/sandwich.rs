//! The waypoint's opt-in PROXY-protocol listener, for the "sandwich" deployment
//! (docs/waypoint.md "Behind a node tunnel"): a node tunnel terminates HBONE in front of the
//! waypoint (the waypoint's workload has a PROXY application tunnel) and sends each flow here
//! as plain TCP that starts with a PROXY v2 header: the original client, the original
//! destination, and the client's verified SPIFFE identity in TLV 0xD0.
//!
//! From the header on, a flow is handled exactly as a CONNECT stream on :15008: the header's
//! identity and source address take the place of the client certificate and the tunnel's
//! peer, its destination the place of `:authority`, for policy, routing and telemetry alike.
//! A connection whose header is late, malformed, over-long, LOCAL or without an identity is
//! reset, counted in `zmesh_rejected_total{listener="proxy"}` and logged with the reason;
//! nothing of it is forwarded.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::flow::{carry, Downstream, DownstreamIo};
use super::listener::Refusal;
use super::server::Waypoint;
use crate::copy::reset_on_drop;
use crate::hbone::proxy_protocol::{read_header, Command, DecodeError};
use crate::hbone::server::StreamGuard;

/// Label of this listener in `zmesh_rejected_total`.
const LISTENER: &str = "proxy";

/// Accepts PROXY-protocol connections until the waypoint drains. Each counts as a connection
/// in flight for the drain, as an HBONE connection does.
pub async fn serve(wp: Arc<Waypoint>, listener: TcpListener) {
    super::listener::accept_each(wp, listener, "waypoint PROXY", connection).await
}

/// Why a connection on the PROXY listener was refused before anything was forwarded.
#[derive(Debug, thiserror::Error)]
enum HeaderError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("PROXY header has command LOCAL: it names no client, so there is nobody to authorize")]
    Local,
    #[error("PROXY header carries no identity TLV (0xD0); the waypoint authorizes by identity")]
    NoIdentity,
}

impl HeaderError {
    fn code(&self) -> &'static str {
        match self {
            HeaderError::Timeout(_) => "proxy_header_timeout",
            HeaderError::Decode(e) => e.code(),
            HeaderError::Local => "proxy_header_local",
            HeaderError::NoIdentity => "proxy_header_no_identity",
        }
    }
}

async fn connection(wp: Arc<Waypoint>, mut tcp: TcpStream, peer: SocketAddr) {
    // The header's deadline is the HBONE handshake's: both are what a client must send before
    // it is anyone (slowloris, reliability #28).
    let deadline = wp.cfg.node.handshake_timeout;
    let header = match tokio::time::timeout(deadline, read_header(&mut tcp)).await {
        Err(_) => Err(HeaderError::Timeout(deadline)),
        Ok(Err(e)) => Err(HeaderError::Decode(e)),
        Ok(Ok(h)) if h.command == Command::Local => Err(HeaderError::Local),
        Ok(Ok(h)) => match (h.addresses, h.identity) {
            (Some(addrs), Some(id)) => Ok((addrs, id)),
            _ => Err(HeaderError::NoIdentity),
        },
    };
    let ((src, dst), client) = match header {
        Ok(h) => h,
        Err(e) => {
            reset_on_drop(&tcp);
            crate::reject!(wp.rejections, LISTENER, e.code(), %peer, reason = %e, "PROXY connection refused; nothing forwarded");
            return;
        }
    };
    let state = wp.state();
    let me = wp.me(&state);
    // The same checks as a CONNECT on :15008; a refusal here has no status to send, so the
    // connection is reset.
    if let Err(r) = state.admit(&me, &client, src, dst) {
        reset_on_drop(&tcp);
        match &r {
            Refusal::Denied(policy) => {
                crate::reject!(info: wp.rejections, LISTENER, r.code(), %peer, %src, %dst, identity = %client, policy = ?policy, "PROXY connection denied by L4 policy; reset");
            }
            _ => {
                crate::reject!(wp.rejections, LISTENER, r.code(), %peer, %src, %dst, identity = %client, "PROXY connection to an address the waypoint does not relay to; reset");
            }
        }
        return;
    }
    let down = Downstream {
        client,
        peer: src,
        dst,
        // One flow per connection: its limits are its own.
        guard: StreamGuard::single(),
    };
    carry(wp, &state, down, Proxied { tcp, written: 0 }).await
}

/// A PROXY-protocol connection after its header, as a downstream byte stream.
struct Proxied {
    tcp: TcpStream,
    written: u64,
}

impl DownstreamIo for Proxied {
    fn written(&self) -> u64 {
        self.written
    }

    /// The kernel answers with RST when the socket is dropped: the client's node passes it on
    /// as a reset, never as a clean end.
    fn reset(&mut self) {
        reset_on_drop(&self.tcp);
    }
}

impl AsyncRead for Proxied {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Proxied {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = std::task::ready!(Pin::new(&mut this.tcp).poll_write(cx, buf))?;
        this.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
