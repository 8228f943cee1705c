//! The HBONE server, shared by every HBONE listener (the node's :15008 and the waypoint's):
//! the handshake with its deadline, HTTP/2 settings, serving one connection's CONNECT streams
//! under its limits (drain, keepalive, CRL re-checks, the rapid-reset guard), and the CONNECT
//! responses. What a stream means (which workload, which policy, what to dial) is the
//! caller's: `proxy::inbound` for the node, `waypoint::server` for the waypoint.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::server::{Connection, SendResponse};
use h2::{Reason, RecvStream};
use http::{Request, Response, StatusCode};
use rustls_pki_types::UnixTime;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::identity::{peer_identity, unix_time, CertManager, SpiffeId, Trust, Usage};

use super::goaway::{Flood, GoAwaySeen, GoAwayTap};
use super::readahead::ReadAhead;

use super::{
    keepalive, Keepalive, ALPN_H2, CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_PENDING_RESETS,
    SERVER_MAX_HEADER_LIST, SERVER_MAX_STREAMS, STREAM_WINDOW, TLS_SEND_BUFFER,
};

/// Local stream errors tolerated before the connection is torn down with ENHANCE_YOUR_CALM
/// (reliability #8: invalid-frame floods must not grow memory).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// An authenticated HBONE connection, ready to accept CONNECT streams.
pub struct Accepted<IO> {
    /// The client's SPIFFE identity (its certificate's single URI SAN).
    pub client: SpiffeId,
    /// The client's chain, kept to re-check it when CRLs change.
    pub chain: Vec<CertificateDer<'static>>,
    /// h2 over TLS, through a tap that notes the GOAWAY h2 sends (which limit closed it).
    pub h2: Connection<GoAwayTap<TlsStream<ReadAhead<IO>>>, Bytes>,
    pub goaway: GoAwaySeen,
}

/// Why a client did not get as far as its first stream.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client did not negotiate ALPN h2")]
    Alpn,
    #[error("client presented no certificate")]
    NoCertificate,
    #[error("client certificate has no SPIFFE identity")]
    NoIdentity,
    #[error("HTTP/2 preface failed: {0}")]
    Preface(h2::Error),
    #[error("TLS + HTTP/2 handshake not done within {0:?}")]
    Timeout(Duration),
}

impl HandshakeError {
    /// The metric label for this reason (`zmesh_rejected_total{reason}`).
    pub fn code(&self) -> &'static str {
        match self {
            HandshakeError::Tls(e) => tls_code(e),
            HandshakeError::Alpn => "alpn",
            HandshakeError::NoCertificate | HandshakeError::NoIdentity => "client_identity",
            HandshakeError::Preface(_) => "http2_preface",
            HandshakeError::Timeout(_) => "handshake_timeout",
        }
    }
}

/// The reason label of a failed TLS handshake. The refusals an operator acts on differently
/// are named (reliability #14, #18, #19): a client certificate outside its validity (a clock or
/// a rotation problem), no client certificate, a TLS version below 1.3, an ALPN list without
/// h2. Everything else (untrusted chain, garbage, a reset) is `tls_handshake`; the log line
/// carries rustls' own words for it.
fn tls_code(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E, PeerIncompatible as P};
    // tokio-rustls hands rustls' error through as the io::Error's inner error.
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => "peer_cert_expired",
        Some(E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => {
            "peer_cert_not_yet_valid"
        }
        Some(E::NoCertificatesPresented) => "client_identity",
        Some(E::NoApplicationProtocol) => "alpn",
        Some(E::PeerIncompatible(
            P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::SupportedVersionsExtensionRequired
            | P::ServerDoesNotSupportTls12Or13,
        )) => "tls_version",
        _ => "tls_handshake",
    }
}

/// TLS (client certificate required, ALPN h2) plus the HTTP/2 preface, all within `deadline`:
/// a client that stalls anywhere in between (slowloris, reliability #28) is dropped at the
/// deadline and its socket closed.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    cfg: Arc<ServerConfig>,
    deadline: Duration,
) -> Result<Accepted<IO>, HandshakeError> {
    let handshake = async {
        let mut tls = TlsAcceptor::from(cfg)
            .accept(ReadAhead::new(io))
            .await
            .map_err(HandshakeError::Tls)?;
        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(ALPN_H2) {
            return Err(HandshakeError::Alpn);
        }
        let chain = conn
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let client = chain
            .first()
            .ok_or(HandshakeError::NoCertificate)
            .and_then(|c| peer_identity(c).map_err(|_| HandshakeError::NoIdentity))?;
        let (tls, goaway) = GoAwayTap::new(tls);
        let h2 = handshake(tls).await.map_err(HandshakeError::Preface)?;
        Ok(Accepted {
            client,
            chain,
            h2,
            goaway,
        })
    };
    tokio::time::timeout(deadline, handshake)
        .await
        .map_err(|_| HandshakeError::Timeout(deadline))?
}

/// Runs the HTTP/2 server handshake (reads the client preface) with HBONE's settings.
pub async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
) -> Result<Connection<T, Bytes>, h2::Error> {
    h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(SERVER_MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        // Lets an extended CONNECT (`:protocol`) reach `connect::parse_connect`, which answers
        // it with 400 as reliability #1 asks; without it h2 resets the stream itself.
        .enable_connect_protocol()
        .handshake(io)
        .await
}

/// In-flight upstream dials one HBONE connection may have at once (reliability #7). A client
/// pool opens at most 100 streams per connection and a dial to a local app takes well under a
/// millisecond, so a burst of legitimate streams only queues briefly; a rapid-reset flood can
/// never have more than this many dials going.
pub const MAX_INFLIGHT_DIALS: usize = 32;
/// Streams a client may reset before their tunnel carried a byte back to it (while dialing,
/// right after the 200, or after sending a few bytes itself) before the connection is closed
/// with GOAWAY ENHANCE_YOUR_CALM. Each such stream may
/// have cost a dial, so this bounds what one connection can make the node dial for nothing.
pub const EARLY_RESET_BUDGET: u32 = 100;
/// The budget refills one stream per second: a long-lived pooled connection whose apps now and
/// then abandon a connection while it is being set up never runs out.
pub const EARLY_RESET_REFILL: Duration = Duration::from_secs(1);

/// How a served connection is kept in line: the drain signal and the trust to re-check the
/// client's chain against (CRL changes).
struct ServeOptions {
    /// Flips to true when the server drains: GOAWAY, streams in flight finish.
    stopping: watch::Receiver<bool>,
    /// Subscribed before the handshake, so a CRL change during it is not missed.
    trust: watch::Receiver<Arc<Trust>>,
    /// When the chain was verified: re-checks use this time, so expiry since then does not cut
    /// a connection but revocation does.
    verified_at: UnixTime,
    /// PING interval and answer timeout (`node.ping_interval`, `node.ping_timeout`).
    keepalive: Keepalive,
}

/// Why a served connection ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("HTTP/2 error: {0}")]
    H2(h2::Error),
    #[error("peer stopped answering PINGs: {0}")]
    Keepalive(h2::Error),
    #[error("closing: client {client} is no longer trusted ({reason})")]
    Revoked { client: SpiffeId, reason: String },
    #[error("closed with GOAWAY ENHANCE_YOUR_CALM: {0} streams were reset before their tunnel carried a byte")]
    RapidReset(u32),
    /// One of h2's own abuse limits, named by the debug data of the GOAWAY h2 sent.
    #[error("closed with GOAWAY ENHANCE_YOUR_CALM: {flood} ({source})")]
    Flood { flood: Flood, source: h2::Error },
}

impl ConnectionError {
    /// The metric label for this reason.
    pub fn code(&self) -> &'static str {
        match self {
            ConnectionError::H2(_) => "http2_error",
            // h2's pending-accept reset limit counts with zmesh's own budget as `rapid_reset`.
            ConnectionError::Flood { flood, .. } => flood.code(),
            ConnectionError::Keepalive(_) => "keepalive_timeout",
            ConnectionError::Revoked { .. } => "revoked",
            ConnectionError::RapidReset(_) => "rapid_reset",
        }
    }
}

/// One CONNECT stream handed to the listener's handler.
pub struct Stream {
    pub req: Request<RecvStream>,
    pub respond: SendResponse<Bytes>,
    /// The connection's limits, which the handler's dial must go through.
    pub guard: StreamGuard,
}

/// The dial cap and reset budget shared by the streams of one connection.
struct ConnGuard {
    dials: Semaphore,
    budget: Mutex<Bucket>,
    /// Set once the budget ran out; the connection is then closing for ENHANCE_YOUR_CALM.
    tripped: AtomicBool,
    calm: Notify,
}

struct Bucket {
    tokens: u32,
    refilled: Instant,
    /// Every early reset so far, for the log line when the connection is closed.
    early_resets: u32,
}

/// A stream's handle on its connection's limits.
#[derive(Clone)]
pub struct StreamGuard(Arc<ConnGuard>);

/// The client reset the stream before its dial finished; nothing was (or will be) sent on.
#[derive(Debug, PartialEq, Eq)]
pub struct Abandoned;

impl StreamGuard {
    fn new() -> StreamGuard {
        StreamGuard(Arc::new(ConnGuard {
            dials: Semaphore::new(MAX_INFLIGHT_DIALS),
            budget: Mutex::new(Bucket {
                tokens: EARLY_RESET_BUDGET,
                refilled: Instant::now(),
                early_resets: 0,
            }),
            tripped: AtomicBool::new(false),
            calm: Notify::new(),
        }))
    }

    /// The limits of a connection that carries a single flow (the waypoint's PROXY-protocol
    /// connections): its own dial cap and reset budget.
    pub fn single() -> StreamGuard {
        StreamGuard::new()
    }

    /// Runs `dial` under the connection's in-flight cap, giving it up as soon as the client
    /// resets the stream (a rapid-reset flood stops costing dials the moment it resets).
    pub async fn dial<F: Future>(
        &self,
        respond: &mut SendResponse<Bytes>,
        dial: F,
    ) -> Result<F::Output, Abandoned> {
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        let capped = self.limit(dial);
        tokio::select! {
            biased;
            _ = reset => {
                self.early_reset();
                Err(Abandoned)
            }
            out = capped => Ok(out),
        }
    }

    /// Runs `work` (an upstream open that cannot watch the stream's reset itself) under the
    /// connection's in-flight cap.
    pub async fn limit<F: Future>(&self, work: F) -> F::Output {
        let _permit = self.0.dials.acquire().await.expect("never closed");
        work.await
    }

    /// Tells the guard how a tunnel ended: a reset before the far side sent a single byte back
    /// to the client counts against the connection's budget, like a reset during the dial.
    /// Only bytes toward the client count: a client can always send a byte before resetting.
    pub fn tunnel_ended(&self, bytes_to_client: u64, reset: bool) {
        if reset && bytes_to_client == 0 {
            self.early_reset();
        }
    }

    fn early_resets(&self) -> u32 {
        self.0
            .budget
            .lock()
            .expect("reset budget poisoned")
            .early_resets
    }

    fn tripped(&self) -> bool {
        self.0.tripped.load(Ordering::Relaxed)
    }

    fn early_reset(&self) {
        let g = &self.0;
        let mut b = g.budget.lock().expect("reset budget poisoned");
        b.early_resets = b.early_resets.saturating_add(1);
        let now = Instant::now();
        let earned = now.duration_since(b.refilled).as_nanos() / EARLY_RESET_REFILL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            b.tokens = b.tokens.saturating_add(earned).min(EARLY_RESET_BUDGET);
            b.refilled = now;
        }
        if b.tokens == 0 {
            g.tripped.store(true, Ordering::Relaxed);
            g.calm.notify_one();
        } else {
            b.tokens -= 1;
        }
    }
}

/// Serves one authenticated connection to its end: each CONNECT stream goes to `handler` on its
/// own task, under the connection's limits. Shared by every HBONE listener (the node's :15008
/// and the waypoint's), so each guard here applies to all of them:
/// - PING keepalive (a peer that leaves a PING unanswered for `keepalive.timeout` is dropped);
/// - drain: GOAWAY when `stopping` flips, streams in flight finish;
/// - CRL changes: a chain that is now revoked ends the connection and every stream;
/// - rapid reset: at most `MAX_INFLIGHT_DIALS` dials at once, and past `EARLY_RESET_BUDGET`
///   streams reset before carrying a byte, GOAWAY ENHANCE_YOUR_CALM.
async fn serve_connection<IO, H, Fut>(
    accepted: Accepted<IO>,
    mut opts: ServeOptions,
    handler: H,
) -> Result<(), ConnectionError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Accepted {
        client,
        chain,
        mut h2,
        goaway,
    } = accepted;
    let guard = StreamGuard::new();
    let pinger = h2.ping_pong();
    let ka_config = opts.keepalive;
    let ka = async {
        match pinger {
            Some(p) => keepalive(p, ka_config).await,
            None => std::future::pending().await,
        }
    };
    let mut stopping = opts.stopping.clone();
    let accept = async {
        let mut goaway_sent = false;
        let mut calmed = false;
        loop {
            let next = tokio::select! {
                n = h2.accept() => n,
                // Draining: GOAWAY tells the client to open new streams elsewhere; streams in
                // flight finish, then the connection closes by itself.
                _ = stopping.wait_for(|s| *s), if !goaway_sent => {
                    h2.graceful_shutdown();
                    goaway_sent = true;
                    continue;
                }
                _ = guard.0.calm.notified(), if !calmed => {
                    h2.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    calmed = true;
                    continue;
                }
            };
            match next {
                None => break,
                // Past the budget the connection is closing; a stream still arriving gets nothing.
                Some(Ok(_)) if calmed => {}
                Some(Ok((req, respond))) => {
                    tokio::spawn(handler(Stream {
                        req,
                        respond,
                        guard: guard.clone(),
                    }));
                }
                Some(Err(e)) if calmed || guard.tripped() => {
                    tracing::debug!(error = %e, "connection closed after ENHANCE_YOUR_CALM");
                    break;
                }
                // The peer's reset or EOF is a normal close (conventions: errors), not a
                // rejection to count and warn about.
                Some(Err(e)) if peer_went_away(&e) => break,
                Some(Err(e)) => return Err(connection_error(e, &goaway)),
            }
        }
        if calmed || guard.tripped() {
            return Err(ConnectionError::RapidReset(guard.early_resets()));
        }
        Ok(())
    };
    let revoked = async {
        while opts.trust.changed().await.is_ok() {
            let trust = opts.trust.borrow_and_update().clone();
            if let Some((leaf, rest)) = chain.split_first() {
                if let Err(e) = trust.verify_chain(leaf, rest, opts.verified_at, Usage::Client) {
                    return e;
                }
            }
        }
        std::future::pending().await
    };
    tokio::select! {
        r = accept => r,
        e = ka => Err(ConnectionError::Keepalive(e)),
        e = revoked => Err(ConnectionError::Revoked { client: client.clone(), reason: e.to_string() }),
    }
}

/// Why an accepted HBONE connection ended other than cleanly: in its handshake, or while
/// serving its streams.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl ServeError {
    /// The metric label for this reason.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Handshake(e) => e.code(),
            ServeError::Connection(e) => e.code(),
        }
    }
}

/// The whole life of one accepted HBONE connection: the handshake within `deadline`, then
/// `serve_connection` with each stream handed to `handler` with the client's identity. Trust is
/// subscribed before the handshake, so a CRL change during it still reaches the connection.
pub async fn serve<IO, H, Fut>(
    io: IO,
    cfg: Arc<ServerConfig>,
    deadline: Duration,
    keepalive: Keepalive,
    certs: &CertManager,
    stopping: watch::Receiver<bool>,
    handler: H,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(SpiffeId, Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut trust = certs.subscribe_trust();
    trust.borrow_and_update();
    let accepted = accept(io, cfg, deadline).await?;
    let opts = ServeOptions {
        stopping,
        trust,
        verified_at: unix_time(certs.now()),
        keepalive,
    };
    let client = accepted.client.clone();
    tracing::debug!(identity = %client, "HBONE connection established");
    serve_connection(accepted, opts, |s| handler(client.clone(), s)).await?;
    Ok(())
}

/// An ENHANCE_YOUR_CALM that h2 sent (not one the peer sent us) is one of h2's abuse limits:
/// which one, the GOAWAY's debug data says (h2's error does not carry it).
fn connection_error(e: h2::Error, sent: &GoAwaySeen) -> ConnectionError {
    if e.reason() == Some(Reason::ENHANCE_YOUR_CALM) && !e.is_remote() {
        let flood = sent.flood().unwrap_or(Flood::Unknown);
        return ConnectionError::Flood { flood, source: e };
    }
    ConnectionError::H2(e)
}

/// Whether an HTTP/2 error only says the peer closed or reset its TCP connection.
fn peer_went_away(e: &h2::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    e.get_io().is_some_and(|io| {
        matches!(
            io.kind(),
            ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
        )
    })
}

/// Answers a CONNECT with an error status; the response ends the stream (END_STREAM).
pub fn refuse(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .expect("status-only response");
    let _ = respond.send_response(resp, true);
}

/// Answers a CONNECT with 200 and returns the stream to send tunnel bytes on.
pub fn respond_ok(mut respond: SendResponse<Bytes>) -> Result<h2::SendStream<Bytes>, h2::Error> {
    let resp = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("status-only response");
    respond.send_response(resp, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CertManager, CertSource, FileCa};
    use tokio::io::duplex;

    fn certs(dir: &std::path::Path) -> CertManager {
        FileCa::init(dir, "cluster.local").unwrap();
        let ca = FileCa::load(dir).unwrap();
        let roots = ca.roots().to_vec();
        CertManager::new(
            CertSource::file_ca(ca, Duration::from_secs(3600)),
            &roots,
            crate::tls::provider(),
        )
        .unwrap()
    }

    /// A server config for `ns/server` and a client config for `ns/client`, from one CA.
    fn configs(dir: &std::path::Path) -> (Arc<ServerConfig>, rustls::ClientConfig, SpiffeId) {
        let m = certs(dir);
        let server_id = SpiffeId::new("cluster.local", "ns", "server").unwrap();
        let client_id = SpiffeId::new("cluster.local", "ns", "client").unwrap();
        let scfg =
            Arc::new(crate::tls::server_config(&m.fetch(&server_id).unwrap(), &m.trust()).unwrap());
        let ccfg =
            crate::tls::client_config(&m.fetch(&client_id).unwrap(), &m.trust(), vec![server_id])
                .unwrap();
        (scfg, ccfg, client_id)
    }

    /// The reset budget with paused time: EARLY_RESET_BUDGET resets pass, the next one asks
    /// for ENHANCE_YOUR_CALM; the budget refills one reset per EARLY_RESET_REFILL.
    #[tokio::test(start_paused = true)]
    async fn the_early_reset_budget_trips_after_its_size_and_refills_with_time() {
        let guard = StreamGuard::new();
        let calm = |g: &StreamGuard| {
            let n = g.0.calm.notified();
            tokio::pin!(n);
            n.as_mut().enable()
        };
        for _ in 0..EARLY_RESET_BUDGET {
            guard.tunnel_ended(0, true);
        }
        // A tunnel that carried bytes, or ended cleanly, costs nothing.
        guard.tunnel_ended(10, true);
        guard.tunnel_ended(0, false);
        assert!(!calm(&guard), "tripped within the budget");
        guard.tunnel_ended(0, true);
        assert!(
            calm(&guard),
            "one past the budget must ask for ENHANCE_YOUR_CALM"
        );
        // Three refill periods later, three more resets are tolerated, the fourth is not.
        tokio::time::advance(EARLY_RESET_REFILL * 3).await;
        for _ in 0..3 {
            guard.tunnel_ended(0, true);
        }
        assert!(!calm(&guard));
        guard.tunnel_ended(0, true);
        assert!(calm(&guard));
        assert_eq!(guard.early_resets(), EARLY_RESET_BUDGET + 5);
    }

    /// The in-flight cap: with MAX_INFLIGHT_DIALS dials pending, the next waits for a slot.
    #[tokio::test(start_paused = true)]
    async fn dials_beyond_the_in_flight_cap_wait_for_a_slot() {
        let guard = StreamGuard::new();
        let gate = Arc::new(tokio::sync::Notify::new());
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..MAX_INFLIGHT_DIALS + 5 {
            let (g, gate, started) = (guard.clone(), gate.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                g.limit(async {
                    started.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                })
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(started.load(Ordering::SeqCst), MAX_INFLIGHT_DIALS);
        gate.notify_waiters();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(started.load(Ordering::SeqCst), MAX_INFLIGHT_DIALS + 5);
        gate.notify_waiters();
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// reliability #28 with paused time: a client that never sends its ClientHello is dropped
    /// exactly at the deadline, and a well-behaved client connecting meanwhile is served.
    #[tokio::test(start_paused = true)]
    async fn slowloris_is_closed_at_the_deadline_while_a_normal_client_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let (scfg, ccfg, client_id) = configs(dir.path());
        let deadline = Duration::from_secs(10);
        let start = tokio::time::Instant::now();

        // The slowloris: its end of the pipe is held open and never written.
        let (_stalled_client, stalled_server) = duplex(64 * 1024);
        let slow = tokio::spawn(accept(stalled_server, scfg.clone(), deadline));

        let (good_client, good_server) = duplex(64 * 1024);
        let good = tokio::spawn(accept(good_server, scfg, deadline));
        let tls = tokio_rustls::TlsConnector::from(Arc::new(ccfg))
            .connect(crate::tls::placeholder_server_name(), good_client)
            .await
            .unwrap();
        let (_send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        let served = good.await.unwrap().expect("normal client served");
        assert_eq!(served.client, client_id);
        assert!(start.elapsed() < deadline, "served before the deadline");

        let err = match slow.await.unwrap() {
            Ok(_) => panic!("a client that never spoke was accepted"),
            Err(e) => e,
        };
        assert!(
            matches!(err, HandshakeError::Timeout(d) if d == deadline),
            "{err}"
        );
        assert_eq!(start.elapsed(), deadline, "closed exactly at the deadline");
    }

    /// A client that completes TLS but never sends the HTTP/2 preface is dropped too.
    #[tokio::test(start_paused = true)]
    async fn a_missing_http2_preface_hits_the_same_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (scfg, ccfg, _) = configs(dir.path());
        let deadline = Duration::from_secs(3);
        let start = tokio::time::Instant::now();
        let (c, s) = duplex(64 * 1024);
        let server = tokio::spawn(accept(s, scfg, deadline));
        let _tls = tokio_rustls::TlsConnector::from(Arc::new(ccfg))
            .connect(crate::tls::placeholder_server_name(), c)
            .await
            .unwrap();
        let err = match server.await.unwrap() {
            Ok(_) => panic!("accepted without an HTTP/2 preface"),
            Err(e) => e,
        };
        assert!(
            matches!(err, HandshakeError::Timeout(d) if d == deadline),
            "{err}"
        );
        assert_eq!(start.elapsed(), deadline);
    }
}
