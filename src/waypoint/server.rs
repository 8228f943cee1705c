//! The waypoint's data path (docs/waypoint.md "Data path").
//!
//! HBONE in on :15008, exactly like a node's inbound (the same TLS, deadline and HTTP/2
//! settings) but with the waypoint's own certificate. Each CONNECT is judged by L4 policy, then
//! its bytes are sniffed: HTTP/1.1 or HTTP/2 go to hyper (keep-alive, so one client connection
//! carries many requests), anything else is relayed as TCP to an endpoint once the TCP reading of
//! the target's HTTP policies admits it (l7's module docs). Every HTTP request is path-normalized,
//! routed, authenticated (JWT), authorized (L7 policy), faulted, rewritten, and sent to an
//! endpoint chosen per request over a pooled HBONE tunnel that carries the WAYPOINT's identity,
//! with `:authority = endpointIP:targetPort`. Upstream HTTP connections are kept alive and
//! reused per endpoint.
//!
//! Which policies judge a request is fixed by the CONNECT's `:authority` (the original
//! destination), never by the Host header or HTTP/2 `:authority` inside the stream: see
//! `Target` and `check_host`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, HOST, LOCATION};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use rustls::ServerConfig;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::config::{Backend, HeaderOps, PathMatch, RetryOn, RouteConfig, RouteRule};
use super::jwt::{Jwks, Validator};
use super::l7::{authorize, authorize_tcp, normalize_path, select_rule, RequestView, TcpView};
use super::metrics::{Metrics, RequestLabels};
use super::resilience::Resilience;
use crate::config::Config;
use crate::hbone::client::{Pool, PoolKey};
use crate::hbone::connect::{build_connect, parse_connect, ConnectHeaders};
use crate::hbone::io::H2Io;
use crate::hbone::server;
use crate::identity::{CertManager, SpiffeId};
use crate::model::{Model, Route, Service, Workload};
use crate::policy::PolicySet;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// How long to wait for a client's first bytes before treating the stream as opaque TCP
/// (server-first protocols send nothing). Istio's protocol-detection timeout is the same order.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(100);
/// Request bodies up to this size are buffered when the route retries (a retry must resend
/// them); larger ones are streamed and not retried.
const MAX_RETRY_BODY: usize = 1024 * 1024;
/// Request header block limit: larger gets 431 (reliability #5's spirit at L7).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Idle upstream HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// One RequestAuthentication: required?, the validator, claim → header copies.
/// The claim → header copies are parsed into header names once, at load.
type JwtRule = (bool, Validator, Vec<(String, HeaderName)>);

/// The live model and the L7 configuration derived from it.
pub struct WpState {
    pub model: Arc<Model>,
    pub l4: Arc<PolicySet>,
    routes: HashMap<String, Vec<RouteConfig>>,
    /// `namespace/hostname` of each of the model's services, in the model's order: built once,
    /// not per request.
    service_keys: Vec<String>,
    http_policies: Vec<super::config::HttpPolicyConfig>,
    auth: HashMap<String, Vec<JwtRule>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("config has no `waypoint: {{workload: <uid>}}` section")]
    NoWaypointSection,
    #[error("waypoint workload {0:?} is not in the model")]
    UnknownWorkload(String),
    #[error("request_authentication {name}: {detail}")]
    Jwks { name: String, detail: String },
    #[error("certificates: {0}")]
    Certs(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl WpState {
    pub fn from_config(cfg: &Config) -> Result<WpState, WaypointError> {
        let mut routes: HashMap<String, Vec<RouteConfig>> = HashMap::new();
        for r in &cfg.routes {
            routes.entry(r.service.clone()).or_default().push(r.clone());
        }
        let mut auth: HashMap<String, Vec<_>> = HashMap::new();
        for a in &cfg.request_authentication {
            let text = match (&a.jwks, &a.jwks_file) {
                (Some(j), _) => j.clone(),
                (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| WaypointError::Jwks {
                    name: a.name.clone(),
                    detail: format!("{}: {e}", f.display()),
                })?,
                (None, None) => String::new(),
            };
            let jwks = Jwks::parse(&text).map_err(|detail| WaypointError::Jwks {
                name: a.name.clone(),
                detail,
            })?;
            auth.entry(a.service.clone()).or_default().push((
                a.required,
                Validator {
                    issuer: a.issuer.clone(),
                    audiences: a.audiences.clone(),
                    jwks,
                },
                // A name that is no valid header cannot be set; it is left out here as it
                // was left out per request before.
                a.claims_to_headers
                    .iter()
                    .filter_map(|(c, h)| Some((c.clone(), HeaderName::try_from(h.as_str()).ok()?)))
                    .collect(),
            ));
        }
        let model = Arc::new(Model::from_config(cfg));
        let service_keys = model.services().iter().map(|s| s.key()).collect();
        Ok(WpState {
            model,
            l4: Arc::new(cfg.policy_set()),
            routes,
            service_keys,
            http_policies: cfg.http_policies.clone(),
            auth,
        })
    }
}

/// A running waypoint's shared state.
pub struct Waypoint {
    pub cfg: Config,
    uid: String,
    pub certs: Arc<CertManager>,
    pub pool: Arc<Pool>,
    state: watch::Sender<Arc<WpState>>,
    server_config: Mutex<Option<(String, u64, Arc<ServerConfig>)>>,
    upstreams: Upstreams,
    resilience: Resilience,
    pub metrics: Metrics,
    access_log: super::accesslog::AccessLog,
    /// What the HBONE listener refused, by reason, and the limiter for its warnings.
    pub rejections: crate::rejections::Rejections,
    /// Flips to true on drain: the listener stops accepting and connections get GOAWAY.
    pub(super) stopping: watch::Sender<bool>,
    /// HBONE connections in flight: what a drain waits for.
    pub(super) active: Arc<AtomicUsize>,
}

impl Waypoint {
    pub fn new(cfg: Config, certs: Arc<CertManager>) -> Result<Arc<Waypoint>, WaypointError> {
        let uid = cfg
            .waypoint
            .as_ref()
            .ok_or(WaypointError::NoWaypointSection)?
            .workload
            .clone();
        let state = WpState::from_config(&cfg)?;
        let me = state
            .model
            .workload_by_uid(&uid)
            .ok_or_else(|| WaypointError::UnknownWorkload(uid.clone()))?
            .clone();
        // A CA that cannot issue yet (unreachable at start) must not keep the waypoint from
        // starting: it starts NOT READY, and `start` keeps asking until it has one. A static
        // source without this identity can never serve it: that is a config error.
        match certs.fetch(&me.identity) {
            Ok(_) => {}
            Err(e @ crate::identity::CertManagerError::NoStaticCert(_)) => {
                return Err(WaypointError::Certs(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(identity = %me.identity, error = %e, "no certificate yet; the waypoint starts not ready and keeps asking the CA");
            }
        }
        let pool = Pool::new(
            certs.clone(),
            None,
            None,
            cfg.node.connect_timeout,
            cfg.node.keepalive(),
        );
        let access_log = super::accesslog::AccessLog::new(cfg.node.access_log);
        Ok(Arc::new(Waypoint {
            cfg,
            uid,
            certs,
            pool,
            state: watch::Sender::new(Arc::new(state)),
            server_config: Mutex::new(None),
            upstreams: Upstreams::default(),
            resilience: Resilience::default(),
            access_log,
            metrics: Metrics::default(),
            rejections: Default::default(),
            stopping: watch::Sender::new(false),
            active: Arc::new(AtomicUsize::new(0)),
        }))
    }

    /// Drains: stops accepting, sends GOAWAY on every HBONE connection so clients move new
    /// streams elsewhere, and waits until the connections in flight end or `deadline` passes.
    /// Returns how many were still open at the deadline (they end with the process).
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.stopping.send_replace(true);
        crate::proxy::wait_idle(&self.active, deadline).await
    }

    /// The Prometheus text of the waypoint: Istio's request families plus what its HBONE
    /// listener refused.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode(&[
            (
                "zmesh_rejected_total",
                "counter",
                "HBONE connections and streams refused by the waypoint, by reason",
                self.rejections.series(),
            ),
            (
                "zmesh_access_log_dropped_total",
                "counter",
                "Access-log lines dropped because the log output did not keep up",
                vec![(String::new(), self.access_log.dropped() as f64)],
            ),
        ])
    }

    pub fn state(&self) -> Arc<WpState> {
        self.state.borrow().clone()
    }

    /// Swaps in a new config's model, policies and routes (config reload).
    pub fn reload(&self, cfg: &Config) -> Result<(), WaypointError> {
        let state = WpState::from_config(cfg)?;
        if state.model.workload_by_uid(&self.uid).is_none() {
            return Err(WaypointError::UnknownWorkload(self.uid.clone()));
        }
        // Certificate material as the node reloads it: roots and CRLs apply to new handshakes
        // and re-check live connections (a revoked client is cut).
        let clock = self.certs.trust().clock().clone();
        let (source, trust) = crate::proxy::load_certificates(cfg, clock)
            .map_err(|e| WaypointError::Certs(e.to_string()))?;
        self.certs
            .replace(source, trust)
            .map_err(|e| WaypointError::Certs(e.to_string()))?;
        self.state.send_replace(Arc::new(state));
        Ok(())
    }

    /// This waypoint's own workload.
    pub(super) fn me(&self, state: &WpState) -> Arc<Workload> {
        state
            .model
            .workload_by_uid(&self.uid)
            .expect("checked at start and on reload")
            .clone()
    }

    async fn server_config(&self, me: &Workload) -> Result<Arc<ServerConfig>, String> {
        let cert = (self.certs.fetch_async(&me.identity).await).map_err(|e| e.to_string())?;
        let trust = self.certs.trust();
        let mut cached = self.server_config.lock().expect("poisoned");
        // Keyed by serial AND trust generation: a new CRL or root must reach new handshakes.
        if let Some((serial, generation, cfg)) = &*cached {
            if *serial == cert.serial && *generation == trust.generation {
                return Ok(cfg.clone());
            }
        }
        let cfg = Arc::new(crate::tls::server_config(&cert, &trust).map_err(|e| e.to_string())?);
        *cached = Some((cert.serial.clone(), trust.generation, cfg.clone()));
        Ok(cfg)
    }
}

/// Accepts HBONE connections until the waypoint drains. Accept errors (file-descriptor
/// exhaustion) are logged and retried after a pause (reliability #29).
pub async fn serve(wp: Arc<Waypoint>, listener: TcpListener) {
    let mut stopping = wp.stopping.subscribe();
    let accept_warnings = crate::rejections::LogLimiter::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopping.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                crate::socket::tune(&tcp);
                let wp = wp.clone();
                let active = crate::proxy::ActiveGuard::new(wp.active.clone());
                tokio::spawn(async move {
                    let _active = active;
                    let dst = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    if let Err(e) = connection(wp.clone(), tcp, peer).await {
                        crate::reject!(wp.rejections, "hbone", e.code(), src = %peer, dst, reason = %e, "waypoint HBONE connection ended");
                    }
                });
            }
            Err(e) => {
                crate::rejections::accept_failed(&accept_warnings, "waypoint HBONE", &e).await
            }
        }
    }
}

/// Why a waypoint HBONE connection ended before or instead of serving its streams.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("no server certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
}

impl ConnError {
    fn code(&self) -> &'static str {
        match self {
            ConnError::Certificate(_) => "no_server_certificate",
            ConnError::Serve(e) => e.code(),
        }
    }
}

/// The node's HBONE server (`hbone::server`), with the waypoint's certificate and handler: the
/// same handshake deadline, drain, keepalive, CRL re-checks and rapid-reset guard.
async fn connection(wp: Arc<Waypoint>, tcp: TcpStream, peer: SocketAddr) -> Result<(), ConnError> {
    let me = wp.me(&wp.state());
    let cfg = wp
        .server_config(&me)
        .await
        .map_err(ConnError::Certificate)?;
    server::serve(
        tcp,
        cfg,
        wp.cfg.node.handshake_timeout,
        wp.cfg.node.keepalive(),
        &wp.certs,
        wp.stopping.subscribe(),
        |client, s| stream(wp.clone(), client, peer, s),
    )
    .await?;
    Ok(())
}

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

/// Why a flow is refused before anything is sent on: the same checks whether it came as a
/// CONNECT or behind a PROXY header.
pub(super) enum Refusal {
    /// The waypoint's own address: relaying to it would send the stream back into this
    /// listener, again and again (docs/reliability.md #38).
    SelfTarget,
    /// No service or workload of the model has this address.
    Unknown,
    /// L4 policy denied it (the deciding policy, if one decided).
    Denied(Option<String>),
}

impl Refusal {
    pub(super) fn code(&self) -> &'static str {
        match self {
            Refusal::SelfTarget => "self_target",
            Refusal::Unknown => "authority_unknown",
            Refusal::Denied(_) => "denied_by_policy",
        }
    }
}

impl WpState {
    /// The checks every flow passes before it is answered: a target the waypoint may relay
    /// to, and L4 authorization with the waypoint as the destination workload.
    pub(super) fn admit(
        &self,
        me: &Workload,
        client: &SpiffeId,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Result<(), Refusal> {
        if me.addresses.contains(&dst.ip()) {
            return Err(Refusal::SelfTarget);
        }
        if self.model.service_by_vip(dst.ip()).is_none()
            && self.model.workload_by_ip(dst.ip()).is_none()
        {
            return Err(Refusal::Unknown);
        }
        let decision = self.l4.evaluate(&crate::proxy::inbound_connection(
            Some(client),
            peer,
            dst,
            me,
        ));
        if !decision.allowed {
            return Err(Refusal::Denied(decision.decided_by.map(|p| p.to_string())));
        }
        Ok(())
    }
}

async fn stream(wp: Arc<Waypoint>, client: SpiffeId, peer: SocketAddr, s: server::Stream) {
    let server::Stream {
        req,
        respond,
        guard,
    } = s;
    let dst = match parse_connect(&req) {
        Ok(d) => d,
        Err(e) => {
            crate::reject!(wp.rejections, "hbone", e.code(), src = %peer, identity = %client, reason = %e, "bad CONNECT (400)");
            return server::refuse(respond, e.status());
        }
    };
    let state = wp.state();
    let me = wp.me(&state);
    match state.admit(&me, &client, peer, dst) {
        Ok(()) => {}
        Err(r @ Refusal::SelfTarget) => {
            crate::reject!(wp.rejections, "hbone", r.code(), src = %peer, identity = %client, %dst, "CONNECT to the waypoint's own address refused (400)");
            return server::refuse(respond, StatusCode::BAD_REQUEST);
        }
        Err(r @ Refusal::Unknown) => {
            crate::reject!(wp.rejections, "hbone", r.code(), src = %peer, identity = %client, %dst, "CONNECT to an address that is no known service or workload (400)");
            return server::refuse(respond, StatusCode::BAD_REQUEST);
        }
        Err(ref r @ Refusal::Denied(ref policy)) => {
            crate::reject!(info: wp.rejections, "hbone", r.code(), src = %peer, %dst, identity = %client, policy = ?policy, "CONNECT denied by L4 policy (401)");
            return server::refuse(respond, StatusCode::UNAUTHORIZED);
        }
    }
    let Ok(send) = server::respond_ok(respond) else {
        return;
    };
    let io = H2Io::new(send, req.into_body());
    let down = Downstream {
        client,
        peer,
        dst,
        guard,
    };
    carry(wp, &state, down, io).await
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

async fn serve_http<IO: DownstreamIo>(wp: Arc<Waypoint>, down: Downstream, io: Rewind<IO>) {
    // Set once a response was produced: a stream reset before any answer counts against the
    // connection's reset budget.
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (down_guard, answered_in) = (down.guard.clone(), answered.clone());
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (wp, down, answered) = (wp.clone(), down.clone(), answered_in.clone());
        async move {
            let resp = handle(wp, down, req).await;
            answered.store(true, Ordering::Relaxed);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "downstream HTTP connection ended");
        // Reset before any answer: each such stream may have cost an upstream open
        // (rapid reset through the waypoint), so it counts against the connection's budget.
        if !answered.load(Ordering::Relaxed) {
            down_guard.tunnel_ended(0, true);
        }
    }
}

/// Opaque TCP through the waypoint: one endpoint for the whole connection, after the TCP
/// reading of the target's HTTP policies (l7's module docs). A denied flow is reset (dropping
/// the stream without END_STREAM sends RST_STREAM, which the client's node turns into a TCP
/// reset) before anything is dialed, and access-logged.
async fn relay_tcp<IO: DownstreamIo>(wp: Arc<Waypoint>, down: Downstream, mut io: Rewind<IO>) {
    let guard = down.guard.clone();
    let state = wp.state();
    let target = state.target(down.dst);
    if let Err(detail) = state.judge_tcp(&target, &down) {
        tracing::info!(src = %down.peer, dst = %down.dst, identity = %down.client, detail, "TCP flow denied by the service's L7 policies; stream reset");
        log_tcp_denial(&wp, &down, target.services.first(), &detail);
        drop(io);
        return;
    }
    let me = wp.me(&state);
    let route = match state.model.select(&me, down.dst, &mut rand::thread_rng()) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(dst = %down.dst, error = %e, "no endpoint for TCP through the waypoint");
            return;
        }
    };
    let Route::Hbone {
        hbone_addr,
        authority,
        expected,
        ..
    } = route
    else {
        tracing::info!(dst = %down.dst, "TCP through the waypoint to a non-HBONE destination is not supported");
        return;
    };
    // Under the connection's in-flight cap, like the node's app dial (rapid reset).
    let opened = guard
        .limit(wp.open_tunnel(&me, hbone_addr, authority, expected, down.peer, None))
        .await;
    match opened {
        Ok((mut up, _stream)) => {
            let copied = tokio::io::copy_bidirectional(&mut io, &mut up).await;
            // What went back to the client: the client controls what it sends, not that.
            let to_client = io.inner.written();
            if let Err(e) = copied {
                // A reset on either side is passed on as a reset, never as a clean end that
                // would read as a complete exchange (docs/reliability.md, preamble).
                tracing::debug!(dst = %down.dst, error = %e, "TCP relay through the waypoint ended with a reset");
                io.inner.reset();
                up.reset();
                guard.tunnel_ended(to_client, true);
            } else {
                guard.tunnel_ended(to_client, false);
            }
        }
        Err(e) => tracing::info!(dst = %down.dst, error = %e, "upstream tunnel failed"),
    }
}

/// The access-log line of a TCP flow refused by policy: protocol `tcp`, no status (the stream
/// was reset), flag `RBAC`.
fn log_tcp_denial(wp: &Waypoint, down: &Downstream, svc: Option<&Arc<Service>>, detail: &str) {
    use super::accesslog::{Line, LEVEL, MESSAGE, TARGET};
    let (trace, span) = crate::hbone::connect::new_trace_ids();
    let state = wp.state();
    let src_wl = state.model.workload_by_ip(down.peer.ip());
    wp.access_log.write(&Line {
        timestamp: humantime_now(),
        level: LEVEL,
        target: TARGET,
        message: MESSAGE,
        src_addr: down.peer.to_string(),
        src_workload: src_wl.map(|w| w.name.as_str()),
        src_namespace: &down.client.namespace,
        src_identity: &down.client.to_string(),
        dst_addr: down.dst.to_string(),
        dst_service: svc.map(|s| s.hostname.as_str()),
        dst_workload: None,
        dst_namespace: None,
        dst_identity: None,
        method: "-",
        path: "-",
        protocol: "tcp",
        response_code: 0,
        grpc_status: "-",
        response_flags: "RBAC",
        detail,
        duration: "0ms".into(),
        bytes_sent: 0,
        bytes_recv: 0,
        retries: 0,
        trace_id: format!("{trace:032x}"),
        span_id: format!("{span:016x}"),
    });
}

/// Everything known about one request while it is handled, for the access log and metrics.
struct Outcome {
    service: Option<Arc<Service>>,
    endpoint: Option<Arc<Workload>>,
    flags: &'static str,
    detail: String,
    trace: (u128, u64),
    retries: u32,
}

fn local(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    r
}

/// The W3C trace context for the next hop: the caller's trace id (or a new one) with a new
/// span id for this hop.
fn next_trace(req: &Request<Incoming>) -> (u128, u64, String) {
    let (new_trace, span) = crate::hbone::connect::new_trace_ids();
    let parsed = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let p: Vec<&str> = v.split('-').collect();
            (p.len() == 4 && p[0] == "00" && p[1].len() == 32)
                .then(|| Some((u128::from_str_radix(p[1], 16).ok()?, p[3].to_string())))
                .flatten()
        });
    let (trace, flags) = parsed.unwrap_or((new_trace, "01".to_string()));
    (trace, span, format!("00-{trace:032x}-{span:016x}-{flags}"))
}

async fn handle(wp: Arc<Waypoint>, down: Downstream, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let state = wp.state();
    let (trace, span, traceparent) = next_trace(&req);
    let mut out = Outcome {
        service: None,
        endpoint: None,
        flags: "-",
        detail: String::new(),
        trace: (trace, span),
        retries: 0,
    };
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let method = req.method().to_string();
    // As the client sent it: the access log shows what arrived, routing sees it normalized.
    let path = req.uri().path().to_string();
    let req_bytes = Arc::new(AtomicU64::new(0));
    let resp = route_request(&wp, &state, &down, req, &traceparent, &mut out, &req_bytes).await;
    let resp = resp.unwrap_or_else(|r| r);
    // Recorded when the response body ends (or is dropped): bytes, duration and a gRPC status
    // sent in trailers are only known then.
    let finish = Finish {
        wp: wp.clone(),
        down,
        out,
        method,
        path,
        grpc,
        status: resp.status(),
        grpc_status: resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        start,
        req_bytes,
    };
    resp.map(|body| {
        Counted {
            inner: body,
            bytes: 0,
            on_end: Some(finish),
        }
        .boxed()
    })
}

/// The host a request names, lower-cased, without port or trailing dot: Host, else the URI
/// authority (HTTP/2's `:authority`, or an HTTP/1.1 absolute-form target), else "".
fn request_host<B>(req: &Request<B>) -> String {
    let raw = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let host = match raw.parse::<SocketAddr>() {
        Ok(a) => a.ip().to_string(),
        Err(_) => raw
            .rsplit_once(':')
            .filter(|(h, p)| p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':'))
            .map_or(raw.as_str(), |(h, _)| h)
            .trim_matches(|c| c == '[' || c == ']')
            .to_string(),
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// What a CONNECT's `:authority` (the original destination) addresses, and so which policies
/// judge everything sent through that stream. It is fixed by the CONNECT, never by anything the
/// client says inside the stream (a Host header, HTTP/2 `:authority`): those come from the
/// client, the CONNECT target is what the client's node captured and what the stream will be
/// forwarded to (Istio ambient waypoints select by original destination the same way).
struct Target {
    /// A service VIP: that service. A pod IP: every service the pod backs.
    services: Vec<Arc<Service>>,
    /// The services' `namespace/hostname` keys, in the same order.
    keys: Vec<String>,
    /// A pod IP: the pod.
    workload: Option<Arc<Workload>>,
    /// Namespaces whose service-less (namespace-wide) policies apply: the services' and, for a
    /// pod IP, the pod's.
    namespaces: Vec<String>,
}

impl WpState {
    fn target(&self, dst: SocketAddr) -> Target {
        let (services, keys, workload): (Vec<_>, Vec<_>, _) =
            match self.model.service_by_vip(dst.ip()) {
                Some(s) => (vec![s.clone()], vec![s.key()], None),
                None => match self.model.workload_by_ip(dst.ip()) {
                    Some(w) => {
                        // The pod's services in the model's order, by their prebuilt keys.
                        let (services, keys) = self
                            .model
                            .services()
                            .iter()
                            .zip(&self.service_keys)
                            .filter(|(_, k)| w.services.contains_key(*k))
                            .map(|(s, k)| (s.clone(), k.clone()))
                            .unzip();
                        (services, keys, Some(w.clone()))
                    }
                    // `stream` refuses a CONNECT to anything else (400); nothing to judge by.
                    None => (Vec::new(), Vec::new(), None),
                },
            };
        let mut namespaces: Vec<String> = services.iter().map(|s| s.namespace.clone()).collect();
        namespaces.extend(workload.iter().map(|w| w.namespace.clone()));
        namespaces.sort();
        namespaces.dedup();
        Target {
            services,
            keys,
            workload,
            namespaces,
        }
    }

    /// Every HTTP policy that applies to the target: those of its services and the
    /// namespace-wide ones of its namespaces.
    fn policies(&self, t: &Target) -> Vec<&super::config::HttpPolicyConfig> {
        self.http_policies
            .iter()
            .filter(|p| match &p.service {
                Some(key) => t.keys.contains(key),
                None => t.namespaces.contains(&p.namespace),
            })
            .collect()
    }

    /// Every JWT validator of the target's services.
    fn validators(&self, t: &Target) -> Vec<&JwtRule> {
        t.keys
            .iter()
            .filter_map(|k| self.auth.get(k))
            .flatten()
            .collect()
    }

    /// The TCP reading of the target's policies (l7's module docs): `Err` is why the flow is
    /// denied.
    fn judge_tcp(&self, t: &Target, down: &Downstream) -> Result<(), String> {
        if self.validators(t).iter().any(|(required, _, _)| *required) {
            return Err("a required JWT cannot be presented over TCP".into());
        }
        let view = TcpView {
            source: Some(&down.client),
            source_ip: down.peer.ip(),
            port: down.dst.port(),
        };
        let d = authorize_tcp(&self.policies(t), &view);
        if d.allowed {
            return Ok(());
        }
        Err(format!(
            "denied as TCP by {}",
            d.policy
                .as_deref()
                .unwrap_or("no matching L4-only ALLOW rule")
        ))
    }
}

/// Checks a request's host (Host, or HTTP/2 `:authority`) against the CONNECT target.
///
/// - Empty, or naming nothing the mesh knows (a public name, garbage): judged by the target's
///   policies like any other request to it.
/// - Naming the target (a service's hostname, `name.namespace[.svc]`, its short name in its
///   namespace, a VIP, the pod's IP, or an IP of one of the service's endpoints): `Ok`, with the
///   service it names, if any.
/// - Naming another service or another workload of the mesh: `Err`, answered **421
///   Misdirected Request**. Such a request can be neither judged by the named service's
///   policies (the stream goes to the CONNECT target, and a Host must not choose weaker
///   policies) nor served as if it were for the target without silently misrouting it.
fn check_host(model: &Model, host: &str, t: &Target) -> Result<Option<Arc<Service>>, String> {
    if host.is_empty() {
        return Ok(None);
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        if let Some(s) = t.services.iter().find(|s| s.vips.contains(&ip)) {
            return Ok(Some(s.clone()));
        }
        let is_target_pod = t.workload.iter().any(|w| w.addresses.contains(&ip))
            || t.services
                .iter()
                .any(|s| s.endpoints.iter().any(|w| w.addresses.contains(&ip)));
        if is_target_pod {
            return Ok(None);
        }
        if model.service_by_vip(ip).is_some() || model.workload_by_ip(ip).is_some() {
            return Err(format!(
                "host {ip} is another service or workload than the CONNECT target"
            ));
        }
        return Ok(None);
    }
    // A bare name is a service of the target's namespace, as cluster DNS resolves it.
    let named = model.service_by_host(host).or_else(|| {
        (!host.contains('.')).then_some(()).and_then(|()| {
            t.namespaces
                .iter()
                .find_map(|ns| model.service_by_host(&format!("{host}.{ns}")))
        })
    });
    match named {
        Some(s) if t.services.iter().any(|own| Arc::ptr_eq(own, s)) => Ok(Some(s.clone())),
        Some(s) => Err(format!(
            "host {host:?} names service {}, not the CONNECT target",
            s.key()
        )),
        None => Ok(None),
    }
}

/// The service whose routes, metrics and limits a request uses: the VIP's service; for a pod
/// IP, the one of the pod's services the host names, else its only service, else none.
fn primary_service(t: &Target, named: Option<Arc<Service>>) -> Option<Arc<Service>> {
    named.or_else(|| match t.services.as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    })
}

/// The request's path normalized (l7's module docs), with the query string unchanged.
fn normalized_uri(uri: &Uri) -> Result<(Uri, String), String> {
    let path = normalize_path(uri.path()).map_err(|e| e.to_string())?;
    // Most paths are already normal: keep the URI as it came, no rebuild per request.
    if path == uri.path() {
        return Ok((uri.clone(), path));
    }
    let mut parts = uri.clone().into_parts();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    parts.path_and_query = Some(pq.parse().map_err(|e| format!("{pq:?}: {e}"))?);
    let uri = Uri::from_parts(parts).map_err(|e| e.to_string())?;
    Ok((uri, path))
}

type Handled = Result<Response<Body>, Response<Body>>;

async fn route_request(
    wp: &Arc<Waypoint>,
    state: &WpState,
    down: &Downstream,
    mut req: Request<Incoming>,
    traceparent: &str,
    out: &mut Outcome,
    req_bytes: &Arc<AtomicU64>,
) -> Handled {
    // The path every decision below sees, and the backend gets.
    let path = match normalized_uri(req.uri()) {
        Ok((uri, path)) => {
            *req.uri_mut() = uri;
            path
        }
        Err(e) => {
            out.flags = "DPE";
            out.detail = format!("path refused: {e}");
            return Err(local(StatusCode::BAD_REQUEST, "bad request path\n"));
        }
    };
    let target = state.target(down.dst);
    let host = request_host(&req);
    let named = check_host(&state.model, &host, &target).map_err(|e| {
        out.flags = "NR";
        out.detail = e;
        local(
            StatusCode::MISDIRECTED_REQUEST,
            &format!("host {host:?} is not the destination this connection was opened to\n"),
        )
    })?;
    let service = primary_service(&target, named);
    out.service = service.clone();
    let key = service.as_ref().map(|s| s.key());
    // JWT: a bad token is always refused; a missing one only where a validator requires it.
    let mut claims: Option<Map<String, Value>> = None;
    let mut claim_headers = Vec::new();
    let validators = state.validators(&target);
    if !validators.is_empty() {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        match token {
            Some(t) => {
                let now = wp.certs.now();
                let mut last = String::new();
                for (_, v, to_headers) in &validators {
                    match v.validate(&t, now) {
                        Ok(c) => {
                            for (claim, header) in to_headers {
                                if let Some(Value::String(s)) = c.get(claim) {
                                    claim_headers.push((header.clone(), s.clone()));
                                }
                            }
                            claims = Some(c);
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                if claims.is_none() {
                    out.flags = "UAEX";
                    out.detail = format!("JWT rejected: {last}");
                    return Err(local(StatusCode::UNAUTHORIZED, "Jwt verification fails\n"));
                }
            }
            None if validators.iter().any(|(required, _, _)| *required) => {
                out.flags = "UAEX";
                out.detail = "JWT required and missing".into();
                return Err(local(StatusCode::UNAUTHORIZED, "Jwt is missing\n"));
            }
            None => {}
        }
    }
    let request_principal = claims.as_ref().map(|c| {
        format!(
            "{}/{}",
            c.get("iss").and_then(Value::as_str).unwrap_or(""),
            c.get("sub").and_then(Value::as_str).unwrap_or("")
        )
    });
    let query = req.uri().query().map(str::to_string);
    let method = req.method().to_string();
    let view = RequestView {
        method: &method,
        path: &path,
        query: query.as_deref(),
        headers: req.headers(),
        host: &host,
        port: down.dst.port(),
        source: Some(&down.client),
        source_ip: down.peer.ip(),
        claims: claims.as_ref(),
        request_principal: request_principal.as_deref(),
    };
    // L7 authorization: every policy of the CONNECT target's services and namespaces.
    let applicable = state.policies(&target);
    let d = authorize(&applicable, &view);
    if !d.allowed {
        out.flags = "RBAC";
        out.detail = format!(
            "denied by {}",
            d.policy.as_deref().unwrap_or("no matching ALLOW policy")
        );
        return Err(local(StatusCode::FORBIDDEN, "RBAC: access denied\n"));
    }
    // Routes are a service's: a pod IP target goes to that pod (its port is the pod's, not a
    // service port a route's backends could be addressed by).
    let routes: Vec<&RouteConfig> = key
        .as_ref()
        .filter(|_| target.workload.is_none())
        .and_then(|k| state.routes.get(k))
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let chosen = select_rule(&routes, &view);
    let rule = chosen.map(|(r, _)| r);
    let matched_path = chosen.and_then(|(_, p)| p);
    if let Some(f) = rule.and_then(|r| r.fault.as_ref()) {
        // Decided before any await: the thread-local RNG cannot be held across one.
        let hit = |pct: f64| rand::thread_rng().gen_bool((pct / 100.0).clamp(0.0, 1.0));
        if let Some(d) = &f.delay {
            if hit(d.percent) {
                tokio::time::sleep(d.fixed).await;
            }
        }
        if let Some(a) = &f.abort {
            if hit(a.percent) {
                out.flags = "FI";
                let status =
                    StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Err(local(status, "fault filter abort\n"));
            }
        }
    }
    if let Some(r) = rule.and_then(|r| r.redirect.as_ref()) {
        let location = format!(
            "{}://{}{}",
            r.scheme.as_deref().unwrap_or("http"),
            r.host
                .as_deref()
                .or(service
                    .as_ref()
                    .map(|s| s.hostname.as_str())
                    .filter(|_| host.is_empty()))
                .unwrap_or(&host),
            r.path.as_deref().unwrap_or(&path)
        );
        let mut resp = local(
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND),
            "",
        );
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(LOCATION, v);
        }
        return Ok(resp);
    }
    // Request edits, in order: rewrite, header ops, claims, trace context.
    if let Some(rw) = rule.and_then(|r| r.rewrite.as_ref()) {
        if let Some(new_path) = &rw.path {
            let rest = match matched_path {
                Some(PathMatch::Prefix(p)) => {
                    path.strip_prefix(p.trim_end_matches('/')).unwrap_or("")
                }
                _ => "",
            };
            let joined = format!("{}{}", new_path.trim_end_matches('/'), rest);
            let joined = if joined.is_empty() {
                "/".to_string()
            } else {
                joined
            };
            let pq = match &query {
                Some(q) => format!("{joined}?{q}"),
                None => joined,
            };
            if let Ok(u) = pq.parse::<Uri>() {
                *req.uri_mut() = u;
            }
        }
        if let Some(h) = &rw.host {
            if let Ok(v) = HeaderValue::from_str(h) {
                req.headers_mut().insert(HOST, v);
            }
        }
    }
    if let Some(r) = rule {
        apply_header_ops(req.headers_mut(), &r.request_headers);
    }
    // Claim headers carry what a validated token said: the client's own copies of them go
    // first, so a request without a token (or whose claim is missing or not a string) cannot
    // make the backend believe it was authenticated.
    for (_, _, to_headers) in &validators {
        for (_, header) in to_headers {
            req.headers_mut().remove(header);
        }
    }
    for (h, v) in claim_headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            req.headers_mut().insert(h, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(traceparent) {
        req.headers_mut().insert("traceparent", v);
    }
    let resp = forward(wp, state, down, req, rule, service.as_ref(), out, req_bytes).await?;
    let mut resp = resp;
    if let Some(r) = rule {
        apply_header_ops(resp.headers_mut(), &r.response_headers);
    }
    Ok(resp)
}

fn apply_header_ops(h: &mut http::HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        h.remove(name.as_str());
    }
    for (k, v) in &ops.set {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            h.insert(n, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            h.append(n, v);
        }
    }
}

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
async fn forward(
    wp: &Arc<Waypoint>,
    state: &WpState,
    down: &Downstream,
    req: Request<Incoming>,
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
        Some(_) => match http_body_util::Limited::new(body, MAX_RETRY_BODY)
            .collect()
            .await
        {
            Ok(c) => {
                let b = c.to_bytes();
                req_bytes.store(b.len() as u64, Ordering::Relaxed);
                Some(b)
            }
            Err(_) => {
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
            let vip = *svc.vips.first().ok_or_else(|| {
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
struct Upstreams {
    h1: Mutex<HashMap<SocketAddr, Vec<hyper::client::conn::http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<SocketAddr, hyper::client::conn::http2::SendRequest<Body>>>,
}

type HboneTarget = (SocketAddr, SocketAddr, Vec<SpiffeId>);

impl Waypoint {
    /// A new HBONE stream to `authority` via `hbone_addr`, under the waypoint's identity.
    async fn open_tunnel(
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

/// What is needed to record a request once its response body has ended.
struct Finish {
    wp: Arc<Waypoint>,
    down: Downstream,
    out: Outcome,
    method: String,
    path: String,
    grpc: bool,
    status: StatusCode,
    /// From the response headers (a trailers-only gRPC answer); trailers may override it.
    grpc_status: Option<String>,
    start: Instant,
    req_bytes: Arc<AtomicU64>,
}

impl Finish {
    /// Metrics and the JSON access-log line for one request.
    fn record(self, resp_bytes: u64, trailer_grpc_status: Option<String>) {
        let Finish { wp, down, out, .. } = &self;
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let req_bytes = self.req_bytes.load(Ordering::Relaxed);
        let state = wp.state();
        let src_wl = state.model.workload_by_ip(down.peer.ip());
        let svc = out.service.as_ref();
        let ep = out.endpoint.as_ref();
        let grpc_status = trailer_grpc_status
            .or_else(|| self.grpc_status.clone())
            .unwrap_or_else(|| "-".into());
        let mut labels = RequestLabels::peers(
            src_wl.map(|w| &**w),
            &down.client.to_string(),
            ep.map(|w| &**w),
            svc.map(|s| &**s),
        );
        // A source known only by its certificate still has a namespace.
        if src_wl.is_none() {
            labels.peers.source_workload_namespace = down.client.namespace.clone();
        }
        labels.request_protocol = if self.grpc { "grpc" } else { "http" };
        labels.response_code = self.status.as_u16().to_string();
        labels.grpc_response_status = grpc_status;
        labels.response_flags = out.flags;
        let m = &wp.metrics;
        m.requests.get_or_create(&labels).inc();
        m.duration.get_or_create(&labels).observe(ms);
        m.request_bytes
            .get_or_create(&labels)
            .observe(req_bytes as f64);
        m.response_bytes
            .get_or_create(&labels)
            .observe(resp_bytes as f64);
        use super::accesslog::{Line, LEVEL, MESSAGE, TARGET};
        wp.access_log.write(&Line {
            timestamp: humantime_now(),
            level: LEVEL,
            target: TARGET,
            message: MESSAGE,
            src_addr: down.peer.to_string(),
            src_workload: src_wl.map(|w| w.name.as_str()),
            src_namespace: &down.client.namespace,
            src_identity: &labels.peers.source_principal,
            dst_addr: down.dst.to_string(),
            dst_service: svc.map(|s| s.hostname.as_str()),
            dst_workload: ep.map(|w| w.name.as_str()),
            dst_namespace: ep.map(|w| w.namespace.as_str()),
            dst_identity: ep.map(|w| w.identity.to_string()),
            method: &self.method,
            path: &self.path,
            protocol: labels.request_protocol,
            response_code: self.status.as_u16(),
            grpc_status: &labels.grpc_response_status,
            response_flags: out.flags,
            detail: &out.detail,
            duration: format!("{}ms", ms as u64),
            bytes_sent: req_bytes,
            bytes_recv: resp_bytes,
            retries: out.retries,
            trace_id: format!("{:032x}", out.trace.0),
            span_id: format!("{:016x}", out.trace.1),
        });
    }
}

/// The response body, counted; records the request when it ends or is dropped.
struct Counted {
    inner: Body,
    bytes: u64,
    on_end: Option<Finish>,
}

impl Counted {
    fn finish(&mut self, trailer_grpc_status: Option<String>) {
        if let Some(f) = self.on_end.take() {
            f.record(self.bytes, trailer_grpc_status);
        }
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    let status = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    this.finish(status);
                }
            }
            std::task::Poll::Ready(None) => this.finish(None),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// The request body, streamed through and counted.
struct CountedRequest {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl hyper::body::Body for CountedRequest {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        polled.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn humantime_now() -> String {
    let t = time::OffsetDateTime::now_utc();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Gives back the bytes read while sniffing, then reads from the stream.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(prefix: Vec<u8>, inner: T) -> Self {
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

/// What the waypoint still waits for before it takes traffic; empty when it is ready. The
/// config needs no check here: a `Waypoint` is only built from a valid one (its own workload
/// included), and a rejected reload keeps the last good one; nor has it an upstream dependency
/// of its own (no control plane: its model comes from the file), besides the CA behind its
/// certificate. What can be missing is its HBONE listener (not yet serving, or its accept loop
/// gone) and a valid certificate for its own identity (not yet issued because the CA was
/// unreachable at start, or expired while it is).
pub fn pending(wp: &Waypoint, hbone_listening: bool) -> Vec<String> {
    let mut pending = Vec::new();
    if !hbone_listening {
        let sandwich = wp.cfg.waypoint.as_ref().and_then(|w| w.proxy_protocol_port);
        pending.push(match sandwich {
            Some(_) => "the PROXY protocol listener".to_string(),
            None => "the HBONE listener".to_string(),
        });
    }
    let me = wp.me(&wp.state());
    let now = wp.certs.now();
    let valid = wp
        .certs
        .cached()
        .iter()
        .any(|c| c.identity == me.identity && c.not_before <= now && !c.is_expired(now));
    if !valid {
        pending.push(format!("a valid certificate for {}", me.identity));
    }
    pending
}

/// Serves `/healthz/ready` and `/metrics` (Prometheus text) on the readiness port, within the
/// operator endpoints' limits (header deadline, connection cap). Readiness is 200 only when
/// nothing is `pending`, else 500 naming what is (as the node's); `hbone_listening` is raised
/// while the HBONE accept loop runs.
pub async fn serve_admin(
    wp: Arc<Waypoint>,
    listener: TcpListener,
    hbone_listening: Arc<std::sync::atomic::AtomicBool>,
) {
    let handler = move |req: Request<Incoming>| {
        let resp = match req.uri().path() {
            "/healthz/ready" => match pending(&wp, hbone_listening.load(Ordering::Acquire)) {
                p if p.is_empty() => local(StatusCode::OK, "ready\n"),
                p => local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("not ready; waiting for: {}\n", p.join(", ")),
                ),
            },
            "/metrics" => {
                let mut r = local(StatusCode::OK, &wp.metrics_text());
                r.headers_mut().insert(
                    "content-type",
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            _ => local(StatusCode::NOT_FOUND, "not found\n"),
        };
        async move { resp }
    };
    crate::proxy::operator::serve(
        listener,
        crate::proxy::operator::Limits::default(),
        handler,
        std::future::pending(),
    )
    .await;
}

/// Raised while the HBONE accept loop runs; lowered when it ends, a panic included.
struct Listening(Arc<std::sync::atomic::AtomicBool>);

impl Listening {
    fn raise(flag: &Arc<std::sync::atomic::AtomicBool>) -> Listening {
        flag.store(true, Ordering::Release);
        Listening(flag.clone())
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Binds the waypoint's data listener and readiness listener and serves until the process
/// ends. The data listener is HBONE on `node.ports.hbone`, or, with
/// `waypoint.proxy_protocol_port` (the sandwich, `super::sandwich`), the PROXY listener on that
/// port instead: the node tunnel in front of the waypoint owns HBONE on the same address.
/// Returns the data listener's and the readiness listener's addresses.
pub async fn start(wp: Arc<Waypoint>) -> Result<(SocketAddr, SocketAddr), WaypointError> {
    let ip = wp.cfg.node.bind;
    let sandwich = wp.cfg.waypoint.as_ref().and_then(|w| w.proxy_protocol_port);
    let data_port = sandwich.map_or(wp.cfg.node.ports.hbone, |p| p.get());
    let data_addr = SocketAddr::new(ip, data_port);
    let admin_addr = SocketAddr::new(ip, wp.cfg.node.ports.readiness);
    let listen = |addr| {
        crate::socket::listen(addr, false).map_err(|source| WaypointError::Listen { addr, source })
    };
    let (data, admin) = (listen(data_addr)?, listen(admin_addr)?);
    let bound = (
        data.local_addr().expect("bound listener has an address"),
        admin.local_addr().expect("bound listener has an address"),
    );
    let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serving = Listening::raise(&listening);
    let data_wp = wp.clone();
    tokio::spawn(async move {
        let _serving = serving;
        match sandwich {
            Some(_) => {
                tracing::info!(addr = %bound.0, "PROXY protocol (sandwich) listener serving");
                super::sandwich::serve(data_wp, data).await
            }
            None => serve(data_wp, data).await,
        }
    });
    tokio::spawn(acquire_certificate(wp.clone()));
    tokio::spawn(serve_admin(wp, admin, listening));
    Ok(bound)
}

/// First and longest retry interval of `acquire_certificate`: quick enough that readiness
/// follows a CA coming back within a second or so, bounded so a CA that stays down is asked at
/// most every 10 s.
const CERT_RETRY_FIRST: Duration = Duration::from_millis(200);
const CERT_RETRY_MAX: Duration = Duration::from_secs(10);

/// Asks for the waypoint's own certificate until it has one (a CA that was down at start), so
/// readiness turns 200 without waiting for a first connection to ask. Renewal after that is
/// `CertManager::run_renewals`'s job.
async fn acquire_certificate(wp: Arc<Waypoint>) {
    let mut wait = CERT_RETRY_FIRST;
    loop {
        let me = wp.me(&wp.state());
        match wp.certs.fetch_async(&me.identity).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(identity = %me.identity, error = %e, retry_in = ?wait, "waypoint certificate not issued yet; not ready");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(CERT_RETRY_MAX);
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

    /// `a` (backed by v1 and v2) and `b` (v1) in `shop`, `c` in `other`, `lone` backs nothing;
    /// one DENY per service plus a namespace-wide one in `shop`.
    fn state() -> WpState {
        let deny = |name: &str, ns: &str, svc: &str| {
            let svc = if svc.is_empty() {
                String::new()
            } else {
                format!("service: {ns}/{svc}.{ns}.svc.cluster.local, ")
            };
            format!("  - {{ name: {name}, namespace: {ns}, {svc}action: deny, rules: [{{ to: [{{ paths: [/x] }}] }}] }}\n")
        };
        let mut text = String::from(
            r#"node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: client, name: client, namespace: shop, addresses: [10.0.0.1], node: n }
  - { uid: v1, name: v1, namespace: shop, addresses: [10.0.1.1], node: n, services: { shop/a.shop.svc.cluster.local: {}, shop/b.shop.svc.cluster.local: {} } }
  - { uid: v2, name: v2, namespace: shop, addresses: [10.0.1.2], node: n, services: { shop/a.shop.svc.cluster.local: {} } }
  - { uid: o, name: o, namespace: other, addresses: [10.0.2.1], node: n, services: { other/c.other.svc.cluster.local: {} } }
  - { uid: lone, name: lone, namespace: shop, addresses: [10.0.3.1], node: n }
services:
  - { name: a, namespace: shop, hostname: a.shop.svc.cluster.local, vips: [10.96.0.1], ports: { 80: 8080 } }
  - { name: b, namespace: shop, hostname: b.shop.svc.cluster.local, vips: [10.96.0.2], ports: { 80: 8080 } }
  - { name: c, namespace: other, hostname: c.other.svc.cluster.local, vips: [10.96.0.3], ports: { 80: 8080 } }
http_policies:
"#,
        );
        text += &deny("pa", "shop", "a");
        text += &deny("pb", "shop", "b");
        text += &deny("ns", "shop", "");
        text += &deny("pc", "other", "c");
        WpState::from_config(&Config::parse(&text, "t").unwrap()).unwrap()
    }

    fn names(t: &Target) -> Vec<&str> {
        t.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn the_connect_target_fixes_the_services_and_policies() {
        let st = state();
        // (CONNECT target, its services, the policies that judge it)
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("10.96.0.1:80", &["a"], &["pa", "ns"]),
            ("10.96.0.2:80", &["b"], &["pb", "ns"]),
            ("10.0.1.1:8080", &["a", "b"], &["pa", "pb", "ns"]),
            ("10.0.1.2:8080", &["a"], &["pa", "ns"]),
            ("10.0.3.1:8080", &[], &["ns"]),
            ("10.0.2.1:8080", &["c"], &["pc"]),
        ];
        for (dst, services, policies) in cases {
            let t = st.target(dst.parse().unwrap());
            assert_eq!(names(&t), *services, "{dst}");
            let got: Vec<&str> = st.policies(&t).iter().map(|p| p.name.as_str()).collect();
            assert_eq!(got, *policies, "{dst}");
        }
    }

    #[test]
    fn a_host_may_name_the_target_or_nothing_known_never_another_destination() {
        let st = state();
        let m = &st.model;
        let vip_a = st.target("10.96.0.1:80".parse().unwrap());
        let pod_v1 = st.target("10.0.1.1:8080".parse().unwrap());
        // (target, host, Ok(service named) or Err = misdirected)
        type Case<'a> = (&'a Target, &'a str, Result<Option<&'a str>, ()>);
        let cases: Vec<Case<'_>> = vec![
            (&vip_a, "", Ok(None)),
            (&vip_a, "a.shop.svc.cluster.local", Ok(Some("a"))),
            (&vip_a, "a.shop.svc", Ok(Some("a"))),
            (&vip_a, "a.shop", Ok(Some("a"))),
            (&vip_a, "a", Ok(Some("a"))),
            (&vip_a, "10.96.0.1", Ok(Some("a"))),
            (&vip_a, "10.0.1.1", Ok(None)),
            (&vip_a, "10.0.1.2", Ok(None)),
            (&vip_a, "evil.example", Ok(None)),
            (&vip_a, "10.9.9.9", Ok(None)),
            (&vip_a, "c", Ok(None)),
            (&vip_a, "10.0.0.1", Err(())),
            (&vip_a, "10.0.3.1", Err(())),
            (&vip_a, "10.0.2.1", Err(())),
            (&vip_a, "b", Err(())),
            (&vip_a, "b.shop", Err(())),
            (&vip_a, "10.96.0.2", Err(())),
            (&vip_a, "c.other", Err(())),
            (&pod_v1, "10.0.1.1", Ok(None)),
            (&pod_v1, "a", Ok(Some("a"))),
            (&pod_v1, "b.shop", Ok(Some("b"))),
            (&pod_v1, "10.96.0.2", Ok(Some("b"))),
            (&pod_v1, "", Ok(None)),
            (&pod_v1, "garbage", Ok(None)),
            (&pod_v1, "10.0.0.1", Err(())),
            (&pod_v1, "c.other", Err(())),
            (&pod_v1, "10.96.0.3", Err(())),
        ];
        for (t, host, want) in cases {
            let got = check_host(m, host, t);
            let got = got
                .as_ref()
                .map(|s| s.as_ref().map(|s| s.name.as_str()))
                .map_err(|_| ());
            assert_eq!(got, want, "{host:?} to {:?}", names(t));
        }
    }

    #[test]
    fn request_host_is_lowercased_without_port_or_trailing_dot() {
        let with_host = |h: &str| {
            let req = Request::get("/").header(HOST, h).body(()).unwrap();
            request_host(&req)
        };
        for (raw, want) in [
            ("A.Shop:80", "a.shop"),
            ("a.shop.", "a.shop"),
            ("10.0.0.1:8080", "10.0.0.1"),
            ("[::1]:8080", "::1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("", ""),
            ("host:notaport", "host:notaport"),
        ] {
            assert_eq!(with_host(raw), want, "{raw:?}");
        }
        // HTTP/2: no Host header, the `:authority` in the URI.
        let req = Request::get("http://B.Shop:80/x").body(()).unwrap();
        assert_eq!(request_host(&req), "b.shop");
        assert_eq!(request_host(&Request::get("/").body(()).unwrap()), "");
    }

    #[test]
    fn the_forwarded_uri_carries_the_normalized_path_and_the_same_query() {
        for (uri, want) in [
            ("/a/../b?x=%2F&y=..", "/b?x=%2F&y=.."),
            ("http://s//%61dmin?q", "http://s/admin?q"),
            ("/", "/"),
        ] {
            let (u, _) = normalized_uri(&uri.parse().unwrap()).unwrap();
            assert_eq!(u.to_string(), want, "{uri}");
        }
        assert!(normalized_uri(&"/a%2fb".parse().unwrap()).is_err());
    }
}
