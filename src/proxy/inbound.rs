//! HBONE inbound (:15008): mTLS + HTTP/2 CONNECT from other nodes' tunnels (and waypoints).
//!
//! The server certificate is the DESTINATION workload's, chosen by the address the client dialed
//! (each workload has its own IP). The TLS handshake plus the HTTP/2 preface must finish within
//! the handshake deadline. Each CONNECT stream is validated, then the local app is dialed from
//! the client's IP (IP_TRANSPARENT) so the app sees who really called it.
//!
//! A workload with a PROXY application tunnel (docs/hbone.md "PROXY protocol") is dialed at
//! its tunnel port instead, and first reads a PROXY v2 header naming the client, the CONNECT
//! target and the client's verified identity: `AppTunnel`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{
    accept_loop, answer_and_relay, denial_reason, dial_app, dial_far_side, inbound_connection,
    ConnLog, Direction, Node, Scope,
};
use crate::copy::reset_on_drop;
use crate::hbone::connect::{parse_connect_target, Target};
use crate::hbone::proxy_protocol::{EncodeError, Header};
use crate::hbone::server;
use crate::identity::SpiffeId;
use crate::model::Workload;

pub(super) async fn serve(
    node: Arc<Node>,
    scope: Arc<Scope>,
    listener: tokio::net::TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let stopping = shutdown.clone();
    let counted = node.clone();
    accept_loop(
        listener,
        shutdown,
        &scope.clone(),
        "HBONE",
        &counted.rejections,
        move |tcp, peer| {
            let node = node.clone();
            let scope = scope.clone();
            let stopping = stopping.clone();
            async move {
                let dst = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
                if let Err(e) = connection(node.clone(), scope, stopping, tcp, peer).await {
                    crate::reject!(node.rejections, "hbone", e.code(), src = %peer, dst, reason = %e, "HBONE connection rejected");
                }
            }
        },
    )
    .await
}

/// Why an HBONE connection ended before or instead of serving its streams.
#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error("accepted socket has no local address: {0}")]
    Socket(std::io::Error),
    #[error("{0} is not the address of a workload on this node")]
    NotLocal(std::net::IpAddr),
    /// The pod's workload is not in the model. The socket rides along, already set to reset,
    /// so the caller counts the rejection before the peer sees the reset.
    #[error("{0}")]
    PodUnknown(String, TcpStream),
    #[error("no certificate for {identity}: {reason}")]
    NoCertificate { identity: SpiffeId, reason: String },
    #[error(transparent)]
    Serve(#[from] server::ServeError),
}

impl InboundError {
    fn code(&self) -> &'static str {
        match self {
            InboundError::Socket(_) => "socket",
            InboundError::NotLocal(_) => "not_a_local_workload",
            InboundError::PodUnknown(..) => "pod_workload_unknown",
            InboundError::NoCertificate { .. } => "no_server_certificate",
            InboundError::Serve(e) => e.code(),
        }
    }
}

async fn connection(
    node: Arc<Node>,
    scope: Arc<Scope>,
    stopping: watch::Receiver<bool>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(), InboundError> {
    let local = tcp.local_addr().map_err(InboundError::Socket)?;
    let model = node.model();
    // In-pod, this listener belongs to exactly one pod; in host mode, the dialed IP says which.
    let found = match scope.bound_workload() {
        Ok(Some(w)) => Some(w),
        Ok(None) => model.local_workload(local.ip()).cloned(),
        Err(pod) => {
            // No workload, so no certificate to present and no policy to judge by: the caller
            // gets a reset before any handshake (fail closed).
            reset_on_drop(&tcp);
            return Err(InboundError::PodUnknown(pod.unknown_reason(), tcp));
        }
    };
    let workload = found.ok_or(InboundError::NotLocal(local.ip()))?;
    let no_cert = |reason: String| InboundError::NoCertificate {
        identity: workload.identity.clone(),
        reason,
    };
    let cert = node
        .certs
        .fetch_async(&workload.identity)
        .await
        .map_err(|e| no_cert(e.to_string()))?;
    let cfg = node
        .server_config(&cert)
        .map_err(|e| no_cert(e.to_string()))?;
    let served = server::serve(
        tcp,
        cfg,
        node.cfg.node.handshake_timeout,
        node.cfg.node.keepalive(),
        &node.certs,
        stopping,
        |client, s| {
            stream(
                node.clone(),
                scope.clone(),
                workload.clone(),
                client,
                (peer, local),
                s,
            )
        },
    )
    .await;
    if let Err(server::ServeError::Connection(server::ConnectionError::Revoked { .. })) = &served {
        node.stats
            .revoked_closed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(served?)
}

/// Where a CONNECT's bytes go and what precedes them: the target itself, or (PROXY
/// application tunnel) the workload's tunnel port with a PROXY v2 header written first.
struct AppTunnel {
    /// The address dialed.
    dial: SocketAddr,
    /// The encoded PROXY header, when the workload asked for one.
    header: Option<Vec<u8>>,
}

impl AppTunnel {
    /// For a PROXY tunnel workload: the workload's own address (the one the client's tunnel
    /// reached) at the tunnel port, or at the CONNECT's port when the tunnel names none (as
    /// ztunnel); the header carries (client, CONNECT target) and the client's identity.
    fn for_connect(
        workload: &Workload,
        client: &SpiffeId,
        (peer, local): (SocketAddr, SocketAddr),
        dst: SocketAddr,
    ) -> Result<AppTunnel, EncodeError> {
        let Some(tunnel) = workload.proxy_tunnel else {
            return Ok(AppTunnel {
                dial: dst,
                header: None,
            });
        };
        let dial = SocketAddr::new(local.ip(), tunnel.port.unwrap_or(dst.port()));
        let header = Header::proxy(peer, dst)
            .with_identity(client.clone())
            .encode()?;
        Ok(AppTunnel {
            dial,
            header: Some(header),
        })
    }
}

/// Why a well-formed CONNECT to `dst` on the listener of `workload` is refused with 400 and
/// never dialed (docs/hbone.md): the metric reason and what the log says. 503 stays for a
/// local workload whose port refused.
fn refused_target(
    node: &Node,
    model: &crate::model::Model,
    workload: &Workload,
    dst: SocketAddr,
) -> Option<(&'static str, String)> {
    match model.local_workload(dst.ip()) {
        // Not an address this node serves (reliability #3).
        None => Some((
            "authority_not_local",
            format!("{} is not a workload on this node", dst.ip()),
        )),
        Some(w) if w.uid != workload.uid => Some((
            "authority_not_owned",
            format!(
                "authority {dst} belongs to {}, not to {} which owns this listener",
                w.name, workload.name
            ),
        )),
        // One of the node's own listeners: dialing it would make the node connect to itself,
        // and a CONNECT could then loop through 15006/15008 without end (reliability #38).
        Some(_) if node.is_own_listener(dst) => Some((
            "self_target",
            format!("{dst} is one of this node's own listeners; never dialed"),
        )),
        Some(_) => None,
    }
}

async fn stream(
    node: Arc<Node>,
    scope: Arc<Scope>,
    workload: Arc<Workload>,
    client: SpiffeId,
    (peer, local): (SocketAddr, SocketAddr),
    s: server::Stream,
) {
    let server::Stream {
        req,
        respond,
        guard,
    } = s;
    let enabled = node.access_log_enabled();
    let target = match parse_connect_target(&req) {
        Ok(Target::Addr(d)) => Ok(d),
        // Double HBONE: the inner CONNECT names the service (this listener's workload must
        // back it); on an east-west gateway, a service it does not back is relayed onward.
        Ok(Target::Host { host, port }) => {
            match node.model().service_target(&host, port, &workload) {
                Ok((_, target)) => Ok(SocketAddr::new(local.ip(), target)),
                // Only the gateway workload's own listener relays (its policies decide who
                // crosses); any other local workload refuses a service it does not back.
                Err(_)
                    if node
                        .cfg
                        .node
                        .east_west_gateway
                        .as_ref()
                        .is_some_and(|g| g.workload.0 == workload.uid) =>
                {
                    let s = server::Stream {
                        req,
                        respond,
                        guard,
                    };
                    let at = (peer, local);
                    // Boxed: inline, the gateway's relay (3.4 KB) sized every inbound stream's
                    // task (measured: 2 KiB of RSS per open connection on every node).
                    let relay =
                        super::gateway::relay(node, scope, workload, client, at, host, port, s);
                    return Box::pin(relay).await;
                }
                Err(e) => Err((e.to_string(), "bad_authority")),
            }
        }
        Err(e) => Err((e.to_string(), e.code())),
    };
    let dst = match target {
        Ok(d) => d,
        Err((e, code)) => {
            server::refuse(respond, StatusCode::BAD_REQUEST);
            crate::reject!(node.rejections, "hbone", code, src = %peer, identity = %client, reason = %e, "bad CONNECT (400)");
            let mut log = ConnLog::new(Direction::Inbound, peer, local, &node.metrics);
            log.src_identity = Some(client.to_string());
            log.mtls = true;
            log.emit(enabled, Some(&format_args!("bad CONNECT: {e}")));
            return;
        }
    };
    let tunnel = AppTunnel::for_connect(&workload, &client, (peer, local), dst);
    // ztunnel's fields: dst.addr is where the tunnel arrived, dst.hbone_addr its target.
    let mut log = ConnLog::new(Direction::Inbound, peer, local, &node.metrics);
    log.hbone_addr = Some(dst);
    log.src_identity = Some(client.to_string());
    log.dst_identity = Some(workload.identity.to_string());
    log.dst_workload = Some(workload.name.clone());
    log.dst_wl = Some(workload.clone());
    let model = node.model();
    log.src_wl = model.workload_by_ip(peer.ip()).cloned();
    log.mtls = true;
    let tunnel = match tunnel {
        Ok(t) => t,
        Err(e) => {
            server::refuse(respond, StatusCode::BAD_REQUEST);
            crate::reject!(node.rejections, "hbone", "proxy_header", src = %peer, identity = %client, %dst, reason = %e, "CONNECT refused: no PROXY header can carry it (400)");
            log.emit(enabled, Some(&format_args!("{e} (400)")));
            return;
        }
    };
    log.path = match tunnel.header {
        None => format!("app {dst}"),
        Some(_) => format!("app {} (PROXY)", tunnel.dial),
    };
    // A PROXY tunnel workload is told the CONNECT target in the header and decides what to do
    // with it (a sandwiched waypoint is asked for services it fronts), so the target need not
    // be its own address, as in ztunnel; the port dialed must still not be one of the node's.
    let refused = match tunnel.header {
        None => refused_target(&node, &model, &workload, dst),
        Some(_) if node.is_own_listener(tunnel.dial) => Some((
            "self_target",
            format!(
                "{} is one of this node's own listeners; never dialed",
                tunnel.dial
            ),
        )),
        Some(_) => None,
    };
    if let Some((code, why)) = refused {
        server::refuse(respond, StatusCode::BAD_REQUEST);
        crate::reject!(node.rejections, "hbone", code, src = %peer, identity = %client, %dst, reason = %why, "CONNECT refused (400)");
        log.emit(enabled, Some(&format_args!("{why} (400)")));
        return;
    }
    // Policy is judged at the destination with the real target port (docs/model.md): for a
    // PROXY tunnel, the port dialed, as ztunnel does.
    let who = || inbound_connection(Some(&client), peer, tunnel.dial, &workload);
    let mut changes = node.subscribe_state();
    changes.borrow_and_update();
    let decision = node.authorize(&who());
    if !decision.allowed {
        server::refuse(respond, StatusCode::UNAUTHORIZED);
        let reason = denial_reason(&decision);
        log.denied = true;
        crate::reject!(info: node.rejections, "hbone", "denied_by_policy", src = %peer, %dst, identity = %client, reason, "connection denied by authorization policy");
        log.emit(enabled, Some(&format_args!("{reason} (401)")));
        return;
    }
    // Not kept across the relay's awaits: an idle connection carries as little as possible.
    drop(decision);
    // The app sees the calling workload's address; bytes the client sent before our 200 wait in
    // h2's window and reach nobody until the dial succeeded (reliability #11). The dial runs
    // under the connection's cap and is dropped if the client resets first (reliability #7).
    let dial = dial_app(&node, &scope, tunnel.dial, peer);
    let Some((mut app, respond)) = dial_far_side(&guard, respond, dial, &log, enabled, "app").await
    else {
        return;
    };
    if let Err(e) = write_header(&mut app, tunnel.header.as_deref()).await {
        reset_on_drop(&app);
        server::refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
        log.emit(
            enabled,
            Some(&format_args!("writing the PROXY header: {e} (503)")),
        );
        return;
    }
    let body = req.into_body();
    answer_and_relay(
        &node, &guard, respond, body, &mut app, log, who, changes, &client,
    )
    .await;
}

/// Writes the PROXY header (if any) before anything of the client's: the app reads it first.
/// Bounded by the dial timeout, so an app that accepts and never reads cannot hold the stream.
async fn write_header(app: &mut TcpStream, header: Option<&[u8]>) -> std::io::Result<()> {
    let Some(h) = header else { return Ok(()) };
    tokio::time::timeout(crate::hbone::DIAL_TIMEOUT, app.write_all(h))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "app did not take the header")
        })?
}

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns, read from its type: nothing is called.
    fn returned_size<F, A, B, C, D, E, G, R>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every open inbound connection holds one `stream` task for its whole life, so its size is
    /// paid per connection. The east-west gateway's relay, inline, made it 5.2 KB (debug) and
    /// cost about 2 KiB of RSS per open connection (benches/RESULTS.md); boxed, it is 3.8 KB.
    /// The bound leaves room for compiler and dependency updates and still catches that.
    #[test]
    fn an_inbound_streams_task_stays_small() {
        let size = returned_size(&super::stream);
        assert!(size <= 4608, "inbound::stream's future is {size} bytes");
    }
}
