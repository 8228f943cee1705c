//! The small HTTP/1 server behind every operator endpoint: the node's readiness (:15021),
//! metrics (:15020) and admin (127.0.0.1:15000), and the waypoint's readiness and metrics.
//!
//! None of them is on the data path, but :15020 and :15021 listen on the node's address, where
//! anything that reaches the node can connect. Without limits a client that opens connections
//! and sends a request line one byte at a time (or never) holds a task, a socket and a buffer
//! each, for ever, and kubelet's probes then wait behind it. Two limits bound that: a deadline
//! for each request's headers, and a cap on open connections, past which a new connection is
//! closed at once. The limits are plain values so tests can shrink them.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long a client may take to send a request's headers, counted from when the server starts
/// waiting for them (the connection's start, or the end of the previous response). A probe or a
/// scrape sends its few hundred bytes at once; 10 s is generous for a slow network and still
/// frees a slowloris slot quickly.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Open connections per server. Kubelet probes one at a time, Prometheus scrapes over one or two
/// connections, an operator's curl adds one: 32 leaves ample room for them and bounds what a
/// flood of idle connections can hold (32 sockets and small buffers per server).
pub const MAX_CONNECTIONS: usize = 32;

/// Read buffer per connection. Operator requests are a request line and a few headers; hyper's
/// default (about 400 KiB) would let each capped connection hold far more than they need.
/// hyper's minimum is 8 KiB.
const MAX_BUF_BYTES: usize = 16 * 1024;

/// The limits of one operator server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves HTTP/1 on `listener` with `handler` until `stop` completes, within `limits`.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    stop: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let accept_warnings = crate::rejections::LogLimiter::default();
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    crate::rejections::accept_failed(&accept_warnings, "operator endpoint", &e).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        // Over the cap: closed at once, before a byte is read, so the excess costs nothing.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = handler(req);
                async move { Ok::<_, Infallible>(resp.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_BUF_BYTES)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
            // The slot frees only once the socket is closed.
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::{timeout, Instant};

    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        max_connections: 3,
    };

    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = |req: Request<Incoming>| async move {
            Response::new(Full::new(Bytes::from(format!("{}\n", req.uri().path()))))
        };
        tokio::spawn(serve(listener, LIMITS, handler, std::future::pending()));
        addr
    }

    /// A keep-alive client: answers come back on the same connection.
    async fn client(
        addr: SocketAddr,
    ) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    async fn get(
        c: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
        path: &str,
    ) -> String {
        let req = Request::get(path)
            .header("host", "x")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Reads until the server closes; EOF and a reset both count as closed.
    async fn closed(s: &mut TcpStream) {
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // hyper may answer a timed-out request with a status line before closing.
                Ok(_) => continue,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_request_line_is_closed_at_the_header_deadline() {
        let addr = server().await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz/re").await.unwrap();
        let sent = Instant::now();
        // Still open just before the deadline...
        let early = LIMITS.header_read_timeout - Duration::from_millis(100);
        assert!(timeout(early, closed(&mut slow)).await.is_err());
        // ...and closed at it.
        timeout(Duration::from_millis(200), closed(&mut slow))
            .await
            .expect("closed at the header deadline");
        let took = sent.elapsed();
        assert!(
            took >= LIMITS.header_read_timeout
                && took <= LIMITS.header_read_timeout + Duration::from_millis(100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_cap_a_connection_is_closed_at_once_and_slots_free_when_slow_clients_go() {
        let addr = server().await;
        // One well-behaved keep-alive client and two slowloris ones fill the three slots.
        let mut good = client(addr).await;
        assert_eq!(get(&mut good, "/one").await, "/one\n");
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz/re").await.unwrap();
            slow.push(s);
        }
        // The fourth is closed before it can send anything; no virtual time passes.
        let before = Instant::now();
        let mut extra = TcpStream::connect(addr).await.unwrap();
        timeout(Duration::from_secs(1), closed(&mut extra))
            .await
            .expect("the connection past the cap is closed at once");
        assert_eq!(before.elapsed(), Duration::ZERO);
        // The connection already in still gets answers.
        assert_eq!(get(&mut good, "/two").await, "/two\n");
        // The slow clients are cut at their header deadline, which frees their slots.
        for mut s in slow {
            timeout(LIMITS.header_read_timeout * 2, closed(&mut s))
                .await
                .expect("slow client closed at its deadline");
        }
        let mut next = client(addr).await;
        assert_eq!(get(&mut next, "/three").await, "/three\n");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_closed_at_the_deadline_too() {
        let addr = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 128];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let answered = Instant::now();
        timeout(LIMITS.header_read_timeout * 2, closed(&mut c))
            .await
            .expect("an idle connection does not hold its slot for ever");
        assert!(answered.elapsed() <= LIMITS.header_read_timeout + Duration::from_millis(100));
    }
}
