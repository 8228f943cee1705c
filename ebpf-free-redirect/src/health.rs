//! The agent's probe and metrics endpoints, on the ports istio-cni's node agent uses so the same
//! DaemonSet conventions apply: readiness (`GET /readyz`) and liveness (`GET /healthz`) on
//! `0.0.0.0:8000`, Prometheus text (`GET /metrics`) on `0.0.0.0:15014`. Anything else is 404.
//!
//! Ready means the agent can do its job: its ZDS socket (node tunnels connect there) and its
//! admin socket (the CNI plugin enrolls pods there) are both bound. Before that `/readyz` is 500
//! and says what it waits for. Liveness is 200 whenever the server answers at all: the agent is a
//! single-threaded loop, so a server that answers is a loop that runs.
//!
//! These endpoints observe the agent; they never gate it. A port that cannot be bound is logged
//! as an error and the agent still enrolls pods (a node whose CNI agent dies blocks every pod
//! start), while kubelet's probe of the missing port makes the problem visible.
//!
//! Connections are bounded like the tunnel's operator endpoints: a header deadline and a cap on
//! concurrent connections, past which a new connection is closed at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request as HttpRequest, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::agent::{Agent, Request};

/// istio-cni's readiness port (its DaemonSet probes `/readyz` on 8000).
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:8000";
/// istio-cni's monitoring port (its DaemonSet names 15014 `metrics`).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15014";
/// A client has this long to send its request head (a slow-loris cannot hold a slot longer).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Probes and a scraper need a handful; more at once is a misbehaving client.
const MAX_CONNECTIONS: usize = 16;

/// Requests the agent served, by kind and result (what `/metrics` reports).
#[derive(Debug, Default)]
pub struct Counters {
    add_ok: AtomicU64,
    add_error: AtomicU64,
    del_ok: AtomicU64,
    del_error: AtomicU64,
}

/// The kind of an admin request, taken before the request is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Del,
    List,
}

impl Op {
    pub fn of(request: &Request) -> Op {
        match request {
            Request::Add(_) => Op::Add,
            Request::Del { .. } => Op::Del,
            // A check, like a list, only reads.
            Request::List | Request::Check { .. } => Op::List,
        }
    }
}

impl Counters {
    /// Counts one served request (a `list` is not counted: it changes nothing).
    pub fn record(&self, op: Op, ok: bool) {
        let counter = match (op, ok) {
            (Op::Add, true) => &self.add_ok,
            (Op::Add, false) => &self.add_error,
            (Op::Del, true) => &self.del_ok,
            (Op::Del, false) => &self.del_error,
            (Op::List, _) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the endpoints read: the agent, once its sockets are bound.
#[derive(Default)]
pub struct Health {
    agent: OnceLock<Arc<Agent>>,
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `/readyz` and `/healthz`.
    Probes,
    /// `/metrics`.
    Metrics,
}

/// A point-in-time view of the agent for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub ready: bool,
    pub pods_enrolled: usize,
    pub tunnels_connected: usize,
    pub add_ok: u64,
    pub add_error: u64,
    pub del_ok: u64,
    pub del_error: u64,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    /// Called once the agent's ZDS and admin sockets are bound (`agent::run_with`).
    pub fn set_ready(&self, agent: Arc<Agent>) {
        let _ = self.agent.set(agent);
    }

    pub fn snapshot(&self) -> Snapshot {
        let Some(agent) = self.agent.get() else {
            return Snapshot::default();
        };
        let c = agent.counters();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            ready: true,
            pods_enrolled: agent.enrolled_pods(),
            tunnels_connected: agent.connected_tunnels(),
            add_ok: n(&c.add_ok),
            add_error: n(&c.add_error),
            del_ok: n(&c.del_ok),
            del_error: n(&c.del_error),
        }
    }
}

/// The status and body for `path` on a listener of `role`, given the agent's state.
pub fn respond(role: Role, path: &str, s: &Snapshot) -> (StatusCode, String) {
    match (role, path) {
        (Role::Probes, "/readyz") if s.ready => (StatusCode::OK, "ready\n".into()),
        (Role::Probes, "/readyz") => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "not ready; waiting for: the ZDS and admin sockets to be bound\n".into(),
        ),
        (Role::Probes, "/healthz") => (StatusCode::OK, "ok\n".into()),
        (Role::Metrics, "/metrics") => (StatusCode::OK, metrics_text(s)),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// The Prometheus text exposition of `s`.
pub fn metrics_text(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, series: &[(&str, u64)]| {
        out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (labels, v) in series {
            out += &format!("{name}{labels} {v}\n");
        }
    };
    family(
        "zmesh_redirect_ready",
        "gauge",
        "1 once the ZDS and admin sockets are bound",
        &[("", u64::from(s.ready))],
    );
    family(
        "zmesh_redirect_pods_enrolled",
        "gauge",
        "Pods whose capture rules this agent installed and has not removed",
        &[("", s.pods_enrolled as u64)],
    );
    family(
        "zmesh_redirect_tunnels_connected",
        "gauge",
        "Node tunnels connected over ZDS that acked their snapshot",
        &[("", s.tunnels_connected as u64)],
    );
    family(
        "zmesh_redirect_requests_total",
        "counter",
        "Enroll (add) and delete (del) requests served, by result",
        &[
            ("{op=\"add\",result=\"ok\"}", s.add_ok),
            ("{op=\"add\",result=\"error\"}", s.add_error),
            ("{op=\"del\",result=\"ok\"}", s.del_ok),
            ("{op=\"del\",result=\"error\"}", s.del_error),
        ],
    );
    out
}

/// An endpoint address flag: an address, or `off` (None) to disable the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointAddr(pub Option<SocketAddr>);

impl std::str::FromStr for EndpointAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_addr(s).map(EndpointAddr)
    }
}

/// Parses an endpoint address flag: `off` disables the endpoint.
pub fn parse_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("{s:?} is not an address like 0.0.0.0:8000 (or \"off\"): {e}"))
}

/// Binds `addr` for `role` and serves it in the background; a bind failure is logged (see the
/// module note) and returns None.
pub async fn spawn(
    addr: SocketAddr,
    role: Role,
    health: Arc<Health>,
) -> Option<tokio::task::JoinHandle<()>> {
    match TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, ?role, "agent endpoint listening");
            Some(tokio::spawn(serve(listener, role, health)))
        }
        Err(e) => {
            tracing::error!(%addr, ?role, error = %e, "cannot listen for the agent's probe/metrics endpoint; the agent runs on, but kubelet's probes of it will fail");
            None
        }
    }
}

/// Serves `role`'s endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, role: Role, health: Arc<Health>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the agent's endpoint");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            drop(stream);
            continue;
        }
        let (health, open) = (health.clone(), open.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: HttpRequest<Incoming>| {
                let (status, body) = respond(role, req.uri().path(), &health.snapshot());
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(http_body_util::Full::new(Bytes::from(body)))
                    .expect("static response parts");
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_by_role_and_state() {
        let not_ready = Snapshot::default();
        let ready = Snapshot {
            ready: true,
            ..Snapshot::default()
        };
        // (role, path, state) → status, and a piece of the body
        for (role, path, s, status, says) in [
            (
                Role::Probes,
                "/readyz",
                &not_ready,
                500,
                "waiting for: the ZDS and admin sockets",
            ),
            (Role::Probes, "/readyz", &ready, 200, "ready"),
            (Role::Probes, "/healthz", &not_ready, 200, "ok"),
            (
                Role::Metrics,
                "/metrics",
                &not_ready,
                200,
                "zmesh_redirect_ready 0",
            ),
            (Role::Probes, "/metrics", &ready, 404, "not found"),
            (Role::Metrics, "/readyz", &ready, 404, "not found"),
            (Role::Probes, "/", &ready, 404, "not found"),
            (Role::Probes, "/readyz/../healthz", &ready, 404, "not found"),
        ] {
            let (got, body) = respond(role, path, s);
            assert_eq!(got.as_u16(), status, "{role:?} {path}");
            assert!(body.contains(says), "{role:?} {path}: {body}");
        }
    }

    #[test]
    fn metrics_text_is_prometheus_exposition() {
        let s = Snapshot {
            ready: true,
            pods_enrolled: 3,
            tunnels_connected: 1,
            add_ok: 4,
            add_error: 2,
            del_ok: 1,
            del_error: 0,
        };
        let text = metrics_text(&s);
        for line in [
            "# TYPE zmesh_redirect_pods_enrolled gauge",
            "zmesh_redirect_ready 1",
            "zmesh_redirect_pods_enrolled 3",
            "zmesh_redirect_tunnels_connected 1",
            "# TYPE zmesh_redirect_requests_total counter",
            "zmesh_redirect_requests_total{op=\"add\",result=\"ok\"} 4",
            "zmesh_redirect_requests_total{op=\"add\",result=\"error\"} 2",
            "zmesh_redirect_requests_total{op=\"del\",result=\"ok\"} 1",
            "zmesh_redirect_requests_total{op=\"del\",result=\"error\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Every sample line is `name{labels} value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<u64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn counters_count_by_op_and_result() {
        let c = Counters::default();
        c.record(Op::Add, true);
        c.record(Op::Add, false);
        c.record(Op::Add, false);
        c.record(Op::Del, true);
        c.record(Op::List, true);
        assert_eq!(c.add_ok.load(Ordering::Relaxed), 1);
        assert_eq!(c.add_error.load(Ordering::Relaxed), 2);
        assert_eq!(c.del_ok.load(Ordering::Relaxed), 1);
        assert_eq!(c.del_error.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn addresses_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_addr("0.0.0.0:8000").unwrap(),
            Some("0.0.0.0:8000".parse().unwrap())
        );
        assert_eq!(parse_addr("off").unwrap(), None);
        let e = parse_addr("8000").unwrap_err();
        assert!(e.contains("\"8000\" is not an address"), "{e}");
    }
}
