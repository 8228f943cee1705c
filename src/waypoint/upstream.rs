//! The waypoint's upstream side: a request's backend and endpoint (anew per try), retries,
//! timeouts and circuit breaking, and the upstream HTTP connections, each inside a pooled
//! HBONE stream that carries the waypoint's own identity, kept alive per endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;

use super::config::{Backend, RetryOn, RouteRule};
use super::flow::Downstream;
use super::request::{local, Body, BoxError, CountedRequest, Handled, Outcome};
use super::server::Waypoint;
use super::state::WpState;
use crate::hbone::client::PoolKey;
use crate::hbone::connect::{build_connect, ConnectHeaders};
use crate::hbone::io::H2Io;
use crate::identity::SpiffeId;
use crate::model::{Route, Service, Workload};

/// Request bodies up to this size are buffered when the route retries (a retry must resend
/// them); larger ones are streamed and not retried.
const MAX_RETRY_BODY: usize = 1024 * 1024;
/// Idle upstream HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// Weighted choice among a rule's backends.
fn pick_backend<'a>(backends: &'a [Backend], rng: &mut impl Rng) -> Option<&'a Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = rng.gen_range(0..total);
    for b in backends {
        if n < u64::from(b.weight) {
            return Some(b);
        }
        n -= u64::from(b.weight);
    }
    None
}

/// Why an upstream attempt failed.
enum AttemptError {
    /// A circuit breaker refused the request (which limit).
    Overflow(&'static str),
    NoEndpoint(String),
    Connect(String),
    Reset(String),
    /// The per-try timeout expired.
    Timeout(Duration),
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    wp: &Arc<Waypoint>,
    state: &WpState,
    down: &Downstream,
    req: Request<Body>,
    rule: Option<&RouteRule>,
    service: Option<&Arc<Service>>,
    out: &mut Outcome,
    req_bytes: &Arc<AtomicU64>,
) -> Handled {
    let me = wp.me(state);
    let retries = rule.and_then(|r| r.retries.clone());
    let timeout = rule.and_then(|r| r.timeout);
    let h2 = req.version() == http::Version::HTTP_2;
    let (parts, body) = req.into_parts();
    // Only a buffered body can be sent twice; without retries the body streams through.
    let mut once: Option<Body> = None;
    let buffered: Option<Bytes> = match &retries {
        Some(_) => match collect_limited(body, MAX_RETRY_BODY).await {
            Some(b) => {
                req_bytes.store(b.len() as u64, Ordering::Relaxed);
                Some(b)
            }
            None => {
                return Err(local(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large to retry\n",
                ))
            }
        },
        None => {
            once = Some(
                CountedRequest {
                    inner: body,
                    bytes: req_bytes.clone(),
                }
                .boxed(),
            );
            None
        }
    };
    let attempts = 1 + retries.as_ref().map_or(0, |r| r.attempts);
    let per_try = retries.as_ref().and_then(|r| r.per_try_timeout);
    let retry_on = |r: &Result<Response<Incoming>, AttemptError>| {
        let on = |x| retries.as_ref().is_some_and(|rc| rc.on.contains(&x));
        match r {
            Ok(resp) => resp.status().is_server_error() && on(RetryOn::FiveXx),
            Err(AttemptError::Connect(_)) | Err(AttemptError::NoEndpoint(_)) => {
                on(RetryOn::ConnectFailure)
            }
            Err(AttemptError::Reset(_)) => on(RetryOn::Reset),
            // As Envoy: a try that timed out is retried like a 5xx or a reset.
            Err(AttemptError::Timeout(_)) => on(RetryOn::FiveXx) || on(RetryOn::Reset),
            // Retrying into an open circuit breaker would defeat it.
            Err(AttemptError::Overflow(_)) => false,
        }
    };
    let run = async {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let body = match &buffered {
                Some(b) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
                None => once.take().unwrap_or_else(|| {
                    Full::new(Bytes::new())
                        .map_err(|never| match never {})
                        .boxed()
                }),
            };
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            let one = attempt_once(wp, state, &me, down, req, rule, service, h2, out);
            let r = match per_try {
                Some(t) => tokio::time::timeout(t, one)
                    .await
                    .unwrap_or(Err(AttemptError::Timeout(t))),
                None => one.await,
            };
            if attempt < attempts && retry_on(&r) {
                out.retries += 1;
                continue;
            }
            return r;
        }
    };
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, run).await {
            Ok(r) => r,
            Err(_) => {
                out.flags = "UT";
                return Err(local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout\n",
                ));
            }
        },
        None => run.await,
    };
    match result {
        Ok(resp) => Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed())),
        Err(e) => {
            let (flag, status, body, detail) = e.answer();
            out.flags = flag;
            out.detail = detail;
            Err(local(status, body))
        }
    }
}

/// The whole body if it ends within `max` bytes; `None` if it is larger or fails.
// (Not `http_body_util::Limited`: over a boxed body its `Into<BoxError>` bound trips rustc's
// higher-ranked Send check on the async fns that await it.)
async fn collect_limited(mut body: Body, max: usize) -> Option<Bytes> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.ok()?.into_data() {
            if buf.len() + d.len() > max {
                return None;
            }
            buf.extend_from_slice(&d);
        }
    }
    Some(buf.freeze())
}

impl AttemptError {
    /// What the client gets when the last try failed this way: response flag (Envoy's), status,
    /// body, and the detail for the access log.
    fn answer(self) -> (&'static str, StatusCode, &'static str, String) {
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        match self {
            AttemptError::Overflow(limit) => (
                "UO",
                unavailable,
                "upstream overflow\n",
                format!("circuit breaker: {limit}"),
            ),
            AttemptError::NoEndpoint(m) => ("UH", unavailable, "no healthy upstream\n", m),
            AttemptError::Connect(m) => ("UF", unavailable, "upstream connect error\n", m),
            AttemptError::Reset(m) => ("UR", unavailable, "upstream reset\n", m),
            AttemptError::Timeout(t) => (
                "UT",
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout\n",
                format!("every try timed out after {t:?}"),
            ),
        }
    }
}

/// One try: pick a backend and an endpoint (anew for every try, so a retry can land on
/// another endpoint), then send over the upstream pool.
#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    wp: &Arc<Waypoint>,
    state: &WpState,
    me: &Workload,
    down: &Downstream,
    req: Request<Body>,
    rule: Option<&RouteRule>,
    service: Option<&Arc<Service>>,
    h2: bool,
    out: &mut Outcome,
) -> Result<Response<Incoming>, AttemptError> {
    let backend = rule.and_then(|r| pick_backend(&r.backends, &mut rand::thread_rng()));
    let (target, svc) = match (backend, service) {
        (Some(b), _) => {
            let svc = state
                .model
                .services()
                .iter()
                .find(|s| s.key() == b.service)
                .cloned()
                .ok_or_else(|| {
                    AttemptError::NoEndpoint(format!("backend {} is gone", b.service))
                })?;
            let vip = *svc.vips.first().or(svc.auto_vip.as_ref()).ok_or_else(|| {
                AttemptError::NoEndpoint(format!("backend {} has no VIP", b.service))
            })?;
            (
                SocketAddr::new(vip, b.port.unwrap_or(down.dst.port())),
                Some(svc),
            )
        }
        // No route backend: the CONNECT's original destination, whatever the Host said.
        (None, s) => (down.dst, s.cloned()),
    };
    let _admission = wp
        .resilience
        .admit(svc.as_deref())
        .await
        .map_err(|o| AttemptError::Overflow(o.0))?;
    let now = Instant::now();
    let ejected = |w: &Workload| {
        svc.as_ref()
            .is_some_and(|s| wp.resilience.is_ejected(s, w, now))
    };
    let route = state
        .model
        .select_excluding(me, target, &mut rand::thread_rng(), &ejected)
        .map_err(|e| AttemptError::NoEndpoint(e.to_string()))?;
    let Route::Hbone {
        hbone_addr,
        authority,
        expected,
        destination,
        ..
    } = route
    else {
        return Err(AttemptError::NoEndpoint(format!(
            "{target} is not an HBONE destination; the waypoint only forwards over HBONE"
        )));
    };
    out.endpoint = Some(destination.clone());
    out.service = svc.clone().or(out.service.take());
    let host = svc.as_ref().map(|s| s.hostname.clone());
    let result = wp
        .send_upstream(
            me,
            (hbone_addr, authority, expected),
            down,
            host.as_deref(),
            req,
            h2,
        )
        .await;
    if let Some(s) = &svc {
        let failed = match &result {
            Ok(r) => r.status().is_server_error(),
            Err(_) => true,
        };
        wp.resilience
            .record(s, &destination, failed, Instant::now());
    }
    result
}

/// Upstream HTTP connections, each inside its own pooled HBONE stream, kept alive per endpoint.
#[derive(Default)]
pub(super) struct Upstreams {
    h1: Mutex<HashMap<SocketAddr, Vec<hyper::client::conn::http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<SocketAddr, hyper::client::conn::http2::SendRequest<Body>>>,
}

type HboneTarget = (SocketAddr, SocketAddr, Vec<SpiffeId>);

impl Waypoint {
    /// A new HBONE stream to `authority` via `hbone_addr`, under the waypoint's identity.
    pub(super) async fn open_tunnel(
        &self,
        me: &Workload,
        hbone_addr: SocketAddr,
        authority: SocketAddr,
        expected: Vec<SpiffeId>,
        client_addr: SocketAddr,
        service_host: Option<&str>,
    ) -> Result<(H2Io, crate::hbone::client::StreamGuard), String> {
        let (trace_id, span_id) = crate::hbone::connect::new_trace_ids();
        let req = build_connect(
            authority,
            &ConnectHeaders {
                source: me,
                client_addr,
                service_host,
                trace_id,
                span_id,
            },
        );
        let key = PoolKey {
            source: me.identity.clone(),
            expected,
            dst: hbone_addr,
            source_ip: None,
        };
        let t = self
            .pool
            .connect(&key, req)
            .await
            .map_err(|e| e.to_string())?;
        Ok((H2Io::new(t.send, t.recv), t.guard))
    }

    /// A new upstream HTTP connection inside a new HBONE stream: `handshake` is hyper's HTTP/1
    /// or HTTP/2 client handshake; the connection is driven by its own task, which holds the
    /// stream's pool slot for as long as the connection lives.
    async fn dial_http<S, C, E, F>(
        &self,
        me: &Workload,
        (hbone_addr, authority, expected): HboneTarget,
        down: &Downstream,
        service_host: Option<&str>,
        handshake: impl FnOnce(TokioIo<H2Io>) -> F,
    ) -> Result<S, AttemptError>
    where
        F: std::future::Future<Output = Result<(S, C), E>>,
        C: std::future::Future + Send + 'static,
        E: std::fmt::Display,
    {
        // Under the downstream connection's dial cap, like every upstream open (rapid reset).
        let (io, guard) = down
            .guard
            .limit(self.open_tunnel(me, hbone_addr, authority, expected, down.peer, service_host))
            .await
            .map_err(AttemptError::Connect)?;
        let (sender, conn) = handshake(TokioIo::new(io))
            .await
            .map_err(|e| AttemptError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _stream = guard;
            conn.await;
        });
        Ok(sender)
    }

    async fn send_upstream(
        &self,
        me: &Workload,
        target: HboneTarget,
        down: &Downstream,
        service_host: Option<&str>,
        req: Request<Body>,
        h2: bool,
    ) -> Result<Response<Incoming>, AttemptError> {
        let authority = target.1;
        let reset = |e: hyper::Error| AttemptError::Reset(e.to_string());
        if h2 {
            let existing = {
                let map = self.upstreams.h2.lock().expect("poisoned");
                map.get(&authority).filter(|s| !s.is_closed()).cloned()
            };
            let mut sender = match existing {
                Some(s) => s,
                None => {
                    let s = self
                        .dial_http(me, target, down, service_host, |io| {
                            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                                .handshake(io)
                        })
                        .await?;
                    self.upstreams
                        .h2
                        .lock()
                        .expect("poisoned")
                        .insert(authority, s.clone());
                    s
                }
            };
            sender.ready().await.map_err(reset)?;
            return sender.send_request(req).await.map_err(reset);
        }
        let idle = {
            let mut map = self.upstreams.h1.lock().expect("poisoned");
            let list = map.entry(authority).or_default();
            list.retain(|s| !s.is_closed());
            list.iter()
                .position(|s| s.is_ready())
                .map(|i| list.swap_remove(i))
        };
        let mut sender = match idle {
            Some(s) => s,
            None => {
                self.dial_http(me, target, down, service_host, |io| {
                    hyper::client::conn::http1::handshake(io)
                })
                .await?
            }
        };
        let response = sender.send_request(req);
        // Back in the pool at once: it turns ready again when this exchange is over.
        {
            let mut map = self.upstreams.h1.lock().expect("poisoned");
            let list = map.entry(authority).or_default();
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push(sender);
            }
        }
        response.await.map_err(reset)
    }
}
