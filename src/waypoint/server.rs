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
//! `state::Target` and `state::check_host`.
//!
//! This module is the running waypoint (`Waypoint`: new, reload, drain) and its listeners'
//! start-up and readiness. The data path lives beside it: `listener` (HBONE accept loop and
//! CONNECT admission), `flow` (what every admitted flow shares, the sniffer), `request` (L7
//! serving), `upstream` (backends, retries, upstream connections), `tcp` (the opaque relay),
//! `state` (`WpState`, built from config) and `accesslog` (the access line).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::HeaderValue;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::request::local;
use super::resilience::Resilience;
use super::upstream::Upstreams;
use crate::config::Config;
use crate::hbone::client::Pool;
use crate::identity::CertManager;
use crate::model::Workload;

// The paths the binary, the tests and the fuzz targets use: `waypoint::server::*`.
pub use super::flow::{fuzzing, Rewind};
pub use super::listener::serve;
pub use super::request::Body;
pub use super::state::WpState;

#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("config has no `waypoint: {{workload: <uid>}}` section")]
    NoWaypointSection,
    #[error("waypoint workload {0:?} is not in the model")]
    UnknownWorkload(String),
    #[error("request_authentication {name}: {detail}")]
    Jwks { name: String, detail: String },
    #[error("routes {route}: grpc_transcoding: {detail}")]
    Transcoding { route: String, detail: String },
    #[error("certificates: {0}")]
    Certs(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running waypoint's shared state.
pub struct Waypoint {
    pub cfg: Config,
    uid: String,
    pub certs: Arc<CertManager>,
    pub pool: Arc<Pool>,
    state: watch::Sender<Arc<WpState>>,
    server_config: Mutex<Option<(String, u64, Arc<ServerConfig>)>>,
    pub(super) upstreams: Upstreams,
    pub(super) resilience: Resilience,
    pub metrics: Metrics,
    pub(super) access_log: super::accesslog::AccessLog,
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

    pub(super) async fn server_config(&self, me: &Workload) -> Result<Arc<ServerConfig>, String> {
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
