//! HBONE: HTTP/2 CONNECT over mutual TLS, wire-compatible with Istio's ztunnel (docs/hbone.md).
//!
//! `connect` holds the pure request building and validation, tested with vectors; `client` is the
//! pooled dialer and `server` the :15008 acceptor; `proxy_protocol` the PROXY v2 header written
//! to (and read by) workloads that ask for an application tunnel. h2 does the framing and rustls
//! the TLS; this module only decides what goes in them.

pub mod client;
pub mod connect;
pub mod io;
pub mod proxy_protocol;
pub mod server;

use std::time::Duration;

/// Per-stream receive window. 4 MiB lets one stream fill a ~10 Gbit/s, 3 ms path without
/// stalling on WINDOW_UPDATE round trips (ztunnel uses the same value).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection window: room for several busy streams at once before the connection itself blocks.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Large frames amortize per-frame overhead on bulk transfers; the peer still chooses its own.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams the server advertises per connection.
pub const SERVER_MAX_STREAMS: u32 = 200;
/// Streams the client opens per connection at most, even if the peer allows more.
pub const CLIENT_MAX_STREAMS: usize = 100;
/// Header list limits bound HPACK and CONTINUATION floods (reliability #5, #6).
pub const CLIENT_MAX_HEADER_LIST: u32 = 16 * 1024;
pub const SERVER_MAX_HEADER_LIST: u32 = 64 * 1024;
/// HTTP/2 PING keepalive: a dead peer is detected within interval + timeout (reliability #25).
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Budget for TCP connect of an HBONE or upstream dial.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake + HTTP/2 preface deadline on :15008 (slowloris, reliability #28).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pooled connections with no streams are closed after this long.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Maximum pending local resets before h2 sends GOAWAY (rapid reset, reliability #7).
pub const MAX_PENDING_RESETS: usize = 100;
/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Keeps a connection alive with PINGs and reports when the peer stops answering.
pub async fn keepalive(mut pinger: h2::PingPong) -> h2::Error {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, pinger.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return e,
            Err(_) => return h2::Error::from(h2::Reason::PROTOCOL_ERROR),
        }
    }
}
