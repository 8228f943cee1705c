//! The waypoint's HBONE listener: the accept loop, the node's HBONE server with the
//! waypoint's certificate, and the admission of each CONNECT (a target the waypoint may relay
//! to, L4 policy) before its bytes are carried (`flow`). The sandwich's PROXY listener
//! (`sandwich`) admits its flows with the same `admit`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};

use super::flow::{carry, Downstream};
use super::server::Waypoint;
use super::state::WpState;
use crate::hbone::connect::parse_connect;
use crate::hbone::io::H2Io;
use crate::hbone::server;
use crate::identity::SpiffeId;
use crate::model::Workload;

/// Accepts HBONE connections until the waypoint drains. Accept errors (file-descriptor
/// exhaustion) are logged and retried after a pause (reliability #29).
pub async fn serve(wp: Arc<Waypoint>, listener: TcpListener) {
    accept_each(wp, listener, "waypoint HBONE", |wp, tcp, peer| async move {
        let dst = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
        if let Err(e) = connection(wp.clone(), tcp, peer).await {
            crate::reject!(wp.rejections, "hbone", e.code(), src = %peer, dst, reason = %e, "waypoint HBONE connection ended");
        }
    })
    .await
}

/// The waypoint's accept loop, for each of its listeners (`what` names it in logs): until the
/// waypoint drains, every accepted connection runs `handle` in its own task and counts as a
/// connection in flight for the drain. Accept errors are logged, rate-limited, and retried
/// after a pause.
pub(super) async fn accept_each<F, Fut>(
    wp: Arc<Waypoint>,
    listener: TcpListener,
    what: &'static str,
    handle: F,
) where
    F: Fn(Arc<Waypoint>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
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
                let active = crate::proxy::ActiveGuard::new(wp.active.clone());
                let flow = handle(wp.clone(), tcp, peer);
                tokio::spawn(async move {
                    let _active = active;
                    flow.await
                });
            }
            Err(e) => crate::rejections::accept_failed(&accept_warnings, what, &e).await,
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
