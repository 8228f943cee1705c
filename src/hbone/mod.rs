//! HBONE: HTTP/2 CONNECT over mutual TLS, wire-compatible with Istio's ztunnel (docs/hbone.md).
//!
//! `connect` holds the pure request building and validation, tested with vectors; `client` is the
//! pooled dialer and `server` the :15008 acceptor; `proxy_protocol` the PROXY v2 header written
//! to (and read by) workloads that ask for an application tunnel. h2 does the framing and rustls
//! the TLS; this module only decides what goes in them.

pub mod client;
pub mod connect;
pub mod goaway;
pub mod io;
pub mod proxy_protocol;
pub mod readahead;
pub mod server;

use std::time::Duration;

/// Per-stream receive window. 4 MiB lets one stream fill a ~10 Gbit/s, 3 ms path without
/// stalling on WINDOW_UPDATE round trips (ztunnel uses the same value).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection window: room for several busy streams at once before the connection itself blocks.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Large frames amortize per-frame overhead on bulk transfers; the peer still chooses its own.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Encrypted bytes rustls may hold unsent per connection (its default is 64 KiB). A 256 KiB
/// read from an application becomes one vectored write of about sixteen TLS records instead of
/// four writes of four: node A's CPU per byte fell 5-8% in the same-run bench (issue #15).
/// Bounded, so a peer that stops reading still backs the sender up through h2's flow control.
pub const TLS_SEND_BUFFER: usize = 256 * 1024;
/// Streams the server advertises per connection.
pub const SERVER_MAX_STREAMS: u32 = 200;
/// Streams the client opens per connection at most, even if the peer allows more.
pub const CLIENT_MAX_STREAMS: usize = 100;
/// Header list limits bound HPACK and CONTINUATION floods (reliability #5, #6).
pub const CLIENT_MAX_HEADER_LIST: u32 = 16 * 1024;
pub const SERVER_MAX_HEADER_LIST: u32 = 64 * 1024;
/// HTTP/2 PING keepalive defaults: a dead peer is detected within interval + timeout
/// (reliability #25). `node.ping_interval` / `node.ping_timeout` override them (docs/hbone.md).
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

/// When a connection PINGs its peer and how long it waits for the answer, on both ends of
/// every HBONE connection (the pool's and the server's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time between one answered PING and the next.
    pub interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Keepalive {
        Keepalive {
            interval: PING_INTERVAL,
            timeout: PING_TIMEOUT,
        }
    }
}

/// Keeps a connection alive with PINGs and returns when the peer stops answering one within
/// `ka.timeout` (or the connection fails): a black-holed peer is noticed at most
/// `ka.interval + ka.timeout` after it went silent.
pub async fn keepalive(mut pinger: h2::PingPong, ka: Keepalive) -> h2::Error {
    loop {
        tokio::time::sleep(ka.interval).await;
        match tokio::time::timeout(ka.timeout, pinger.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return e,
            // h2 has no error for "no PONG"; the caller logs and counts it as a keepalive
            // failure, the reason code only fills the type.
            Err(_) => return h2::Error::from(h2::Reason::PROTOCOL_ERROR),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    use tokio::time::Instant;

    /// HTTP/2 frame type and flag of a PING that is not an answer (RFC 9113 section 6.7).
    const PING: u8 = 0x6;
    const ACK: u8 = 0x1;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// PINGs (not PING ACKs) in a client's byte stream: the preface, then frame headers.
    fn pings(wire: &[u8]) -> usize {
        let mut rest = wire.strip_prefix(PREFACE).expect("client preface");
        let mut n = 0;
        while rest.len() >= 9 {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            if rest[3] == PING && rest[4] & ACK == 0 {
                n += 1;
            }
            rest = &rest[(9 + len).min(rest.len())..];
        }
        n
    }

    /// An h2 client whose peer reads every byte and never writes one (a node whose replies
    /// are black-holed): returns the client's PING handle and what the peer has read so far.
    async fn client_of_a_silent_peer() -> (h2::PingPong, Arc<Mutex<Vec<u8>>>) {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let wire = Arc::new(Mutex::new(Vec::new()));
        let seen = wire.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = theirs.read(&mut buf).await {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let (send, mut conn) = h2::client::handshake(ours).await.unwrap();
        let pinger = conn.ping_pong().expect("first ping_pong");
        tokio::spawn(async move {
            let _send = send;
            let _ = conn.await;
        });
        (pinger, wire)
    }

    /// Reliability #25 with paused time: against a peer that never answers, the default
    /// keepalive sends its first PING at 10 s and gives up on it at 10 s + 20 s, not earlier
    /// and not later, having sent exactly that one PING.
    #[tokio::test(start_paused = true)]
    async fn the_default_keepalive_gives_up_on_a_silent_peer_at_ten_plus_twenty_seconds() {
        let (pinger, wire) = client_of_a_silent_peer().await;
        let start = Instant::now();
        let ka = tokio::spawn(keepalive(pinger, Keepalive::default()));
        tokio::time::sleep(Duration::from_millis(9_999)).await;
        assert_eq!(
            pings(&wire.lock().unwrap()),
            0,
            "no PING before the interval"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(pings(&wire.lock().unwrap()), 1, "the PING goes out at 10 s");
        let err = ka.await.unwrap();
        assert_eq!(start.elapsed(), PING_INTERVAL + PING_TIMEOUT);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(err.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{err}");
        assert_eq!(pings(&wire.lock().unwrap()), 1, "one unanswered PING");
    }

    /// A configured keepalive (`node.ping_interval: 1s`, `node.ping_timeout: 2s`) gives up at
    /// 3 s.
    #[tokio::test(start_paused = true)]
    async fn a_configured_keepalive_gives_up_at_its_own_interval_plus_timeout() {
        let (pinger, _wire) = client_of_a_silent_peer().await;
        let start = Instant::now();
        let ka = Keepalive {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        };
        keepalive(pinger, ka).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    /// A peer that answers PINGs (h2's server does so by itself) keeps the connection: ten
    /// minutes of keepalive never give up.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_pings_is_kept() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(theirs).await.unwrap();
            while server.accept().await.is_some() {}
        });
        let (send, mut conn) = h2::client::handshake(ours).await.unwrap();
        let pinger = conn.ping_pong().unwrap();
        tokio::spawn(async move {
            let _send = send;
            let _ = conn.await;
        });
        let kept = tokio::time::timeout(
            Duration::from_secs(600),
            keepalive(pinger, Keepalive::default()),
        )
        .await;
        if let Ok(e) = kept {
            panic!("gave up on a live peer: {e}");
        }
    }
}
