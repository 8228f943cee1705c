//! The HBONE client: dials `ip:15008` with the SOURCE workload's certificate and pools the
//! resulting HTTP/2 connections (spec/hbone.md "Connection pooling").
//!
//! Pool key = (source identity, expected destination identities, destination address, source
//! IP). A connection takes streams while it has free slots (min(100, peer's limit)); creation is
//! single-flight per key, so a burst of new connections to a cold destination waits for one
//! handshake instead of starting a hundred. Connections that got GOAWAY, failed, or were made with
//! a certificate that has since been replaced take no new streams.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Request, StatusCode};
use tokio_rustls::TlsConnector;

use super::{
    keepalive, ALPN_H2, CLIENT_MAX_HEADER_LIST, CLIENT_MAX_STREAMS, CONNECTION_WINDOW,
    MAX_FRAME_SIZE, POOL_IDLE_TIMEOUT, STREAM_WINDOW,
};
use crate::identity::{CertManager, SpiffeId};
use crate::netns::PodNetns;
use crate::socket::{dial_in, DialError, DialOptions};
use crate::tls;

/// How often the pool looks for idle connections to release.
const REAP_INTERVAL: Duration = Duration::from_secs(30);
/// Streams refused because a connection was going away are retried on another connection this
/// many times. No bytes were sent on a refused stream, so the retry is safe.
const STREAM_RETRIES: usize = 3;
/// Upper bound on waiting for the CONNECT response; the server's own upstream dial is bounded by
/// the 10 s dial timeout, so this only catches a peer that never answers.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub expected: Vec<SpiffeId>,
    pub dst: SocketAddr,
    pub source_ip: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("TLS handshake with {dst} failed: {source}")]
    Tls {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{dst} did not negotiate ALPN h2: refusing a non-HBONE peer")]
    NoAlpn { dst: SocketAddr },
    #[error("HTTP/2 with {dst} failed: {source}")]
    H2 {
        dst: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{dst} answered CONNECT {authority} with {status}")]
    Status {
        dst: SocketAddr,
        authority: String,
        status: StatusCode,
    },
    #[error("{dst} did not answer CONNECT within {RESPONSE_TIMEOUT:?}")]
    ResponseTimeout { dst: SocketAddr },
    #[error("no certificate for source identity {identity}: {detail}")]
    Cert { identity: String, detail: String },
}

/// One pooled HTTP/2 connection.
struct Conn {
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    /// Set when the connection failed, received GOAWAY, or must drain (rotated certificate).
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
    cert_serial: String,
    peer: SocketAddr,
}

impl Conn {
    fn limit(&self) -> usize {
        CLIENT_MAX_STREAMS.min(self.send.current_max_send_streams())
    }

    fn try_claim(&self) -> bool {
        let limit = self.limit();
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Holds a stream slot on a pooled connection; dropping it frees the slot.
pub struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("idle lock poisoned") = Instant::now();
        }
    }
}

/// An open HBONE stream after the 200.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub peer: SocketAddr,
    pub guard: StreamGuard,
}

#[derive(Default)]
struct KeyEntry {
    conns: Mutex<Vec<Arc<Conn>>>,
    dialing: tokio::sync::Mutex<()>,
}

impl KeyEntry {
    fn checkout(&self, serial: &str) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().expect("pool lock poisoned");
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        conns
            .iter()
            .find(|c| {
                if c.cert_serial != serial {
                    // Made with a certificate that has been replaced: drain, never reuse.
                    c.closed.store(true, Ordering::Release);
                    return false;
                }
                c.try_claim()
            })
            .cloned()
    }
}

pub struct Pool {
    certs: Arc<CertManager>,
    mark: Option<u32>,
    /// In-pod mode: dial from inside this pod's namespace, so HBONE leaves with the pod's IP.
    netns: Option<Arc<PodNetns>>,
    entries: Mutex<HashMap<PoolKey, Arc<KeyEntry>>>,
}

impl Pool {
    pub fn new(
        certs: Arc<CertManager>,
        mark: Option<u32>,
        netns: Option<Arc<PodNetns>>,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            certs,
            mark,
            netns,
            entries: Mutex::new(HashMap::new()),
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    /// Number of open pooled connections (all keys).
    pub fn connections(&self) -> usize {
        self.entries
            .lock()
            .expect("pool lock poisoned")
            .values()
            .map(|e| e.conns.lock().expect("pool lock poisoned").len())
            .sum()
    }

    /// Opens a CONNECT stream for `req` over a pooled connection for `key`.
    pub async fn connect(&self, key: &PoolKey, req: Request<()>) -> Result<Tunnel, HboneError> {
        let entry = {
            let mut entries = self.entries.lock().expect("pool lock poisoned");
            // The key is cloned only when a destination is first seen, not for every stream.
            match entries.get(key) {
                Some(e) => e.clone(),
                None => entries.entry(key.clone()).or_default().clone(),
            }
        };
        let cert = self
            .certs
            .fetch(&key.source)
            .map_err(|e| HboneError::Cert {
                identity: key.source.to_string(),
                detail: e.to_string(),
            })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let conn = match entry.checkout(&cert.serial) {
                Some(c) => c,
                None => {
                    // Single flight: one dial per key at a time; waiters re-check afterwards.
                    let _dial = entry.dialing.lock().await;
                    match entry.checkout(&cert.serial) {
                        Some(c) => c,
                        None => {
                            let conn = self.dial(key, &cert).await?;
                            conn.active.fetch_add(1, Ordering::AcqRel);
                            entry
                                .conns
                                .lock()
                                .expect("pool lock poisoned")
                                .push(conn.clone());
                            conn
                        }
                    }
                }
            };
            let guard = StreamGuard(conn.clone());
            match open_stream(&conn, clone_request(&req)).await {
                Ok((send, resp)) => {
                    let resp = tokio::time::timeout(RESPONSE_TIMEOUT, resp)
                        .await
                        .map_err(|_| HboneError::ResponseTimeout { dst: key.dst })?
                        .map_err(|source| HboneError::H2 {
                            dst: key.dst,
                            source,
                        })?;
                    if resp.status() != StatusCode::OK {
                        return Err(HboneError::Status {
                            dst: key.dst,
                            authority: req.uri().to_string(),
                            status: resp.status(),
                        });
                    }
                    return Ok(Tunnel {
                        send,
                        recv: resp.into_body(),
                        peer: conn.peer,
                        guard,
                    });
                }
                Err(e) => {
                    conn.closed.store(true, Ordering::Release);
                    let retryable =
                        e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM);
                    if !retryable || attempt >= STREAM_RETRIES {
                        return Err(HboneError::H2 {
                            dst: key.dst,
                            source: e,
                        });
                    }
                    tracing::debug!(dst = %key.dst, error = %e, "pooled connection going away; retrying on a new one");
                }
            }
        }
    }

    async fn dial(
        &self,
        key: &PoolKey,
        cert: &crate::identity::WorkloadCert,
    ) -> Result<Arc<Conn>, HboneError> {
        let dst = key.dst;
        let tcp = dial_in(
            self.netns.as_deref(),
            dst,
            DialOptions {
                mark: self.mark,
                source: key.source_ip,
                transparent: false,
            },
        )
        .await?;
        let cfg = tls::client_config(
            cert,
            self.certs.roots(),
            self.certs.provider(),
            key.expected.clone(),
        )
        .map_err(|e| HboneError::Tls {
            dst,
            source: std::io::Error::other(e),
        })?;
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(tls::placeholder_server_name(), tcp)
            .await
            .map_err(|source| HboneError::Tls { dst, source })?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(HboneError::NoAlpn { dst });
        }
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(CLIENT_MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { dst, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let pinger = conn.ping_pong();
        let closed_task = closed.clone();
        tokio::spawn(async move {
            let ka = async {
                match pinger {
                    Some(p) => keepalive(p).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(%dst, error = %e, "HBONE connection closed");
                    }
                }
                e = ka => tracing::warn!(%dst, error = %e, "HBONE peer stopped answering PINGs; dropping the connection"),
            }
            closed_task.store(true, Ordering::Release);
        });
        tracing::debug!(%dst, source = %key.source, "new HBONE connection");
        Ok(Arc::new(Conn {
            send,
            active: AtomicUsize::new(0),
            closed,
            idle_since: Mutex::new(Instant::now()),
            cert_serial: cert.serial.clone(),
            peer: dst,
        }))
    }
}

/// `http::Request` is not `Clone` (its extensions may not be); a CONNECT has none to lose.
fn clone_request(req: &Request<()>) -> Request<()> {
    let mut out = Request::new(());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.headers_mut() = req.headers().clone();
    out
}

type OpenStream = (SendStream<Bytes>, h2::client::ResponseFuture);

async fn open_stream(conn: &Conn, req: Request<()>) -> Result<OpenStream, h2::Error> {
    let mut send = conn.send.clone().ready().await?;
    let (resp, stream) = send.send_request(req, false)?;
    Ok((stream, resp))
}

/// Releases connections idle for longer than the pool's idle timeout.
async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(REAP_INTERVAL).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut entries = pool.entries.lock().expect("pool lock poisoned");
        entries.retain(|_, e| {
            let mut conns = e.conns.lock().expect("pool lock poisoned");
            conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().expect("idle lock poisoned").elapsed()
                        >= POOL_IDLE_TIMEOUT;
                !(idle || c.closed.load(Ordering::Acquire))
            });
            !conns.is_empty() || Arc::strong_count(e) > 1
        });
    }
}
