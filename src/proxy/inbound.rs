//! HBONE inbound (:15008): mTLS + HTTP/2 CONNECT from other nodes' tunnels (and waypoints).
//!
//! The server certificate is the DESTINATION workload's, chosen by the address the client dialed
//! (each workload has its own IP). The TLS handshake plus the HTTP/2 preface must finish within
//! the handshake deadline. Each CONNECT stream is validated, then the local app is dialed from
//! the client's IP (IP_TRANSPARENT) so the app sees who really called it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{
    accept_loop, denial_reason, dial_app, enforce, inbound_connection, settle, ConnLog, Direction,
    Node, Scope,
};
use crate::copy::{reset_on_drop, tcp_to_h2};
use crate::hbone::connect::parse_connect;
use crate::hbone::{keepalive, server};
use crate::identity::{unix_time, SpiffeId, Usage};
use crate::model::Workload;

pub(super) async fn serve(
    node: Arc<Node>,
    scope: Arc<Scope>,
    listener: tokio::net::TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let stopping = shutdown.clone();
    accept_loop(
        listener,
        shutdown,
        &scope.clone(),
        "HBONE",
        move |tcp, peer| {
            let node = node.clone();
            let scope = scope.clone();
            let stopping = stopping.clone();
            async move {
                let dst = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
                if let Err(reason) = connection(node, scope, stopping, tcp, peer).await {
                    tracing::warn!(src = %peer, dst, reason = %reason, "HBONE connection rejected");
                }
            }
        },
    )
    .await
}

async fn connection(
    node: Arc<Node>,
    scope: Arc<Scope>,
    mut stopping: watch::Receiver<bool>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(), String> {
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let model = node.model();
    // In-pod, this listener belongs to exactly one pod; in host mode, the dialed IP says which.
    let found = match &scope.workload {
        Some(w) => Some(w.clone()),
        None => model.local_workload(local.ip()).cloned(),
    };
    let workload = found.ok_or_else(|| {
        format!(
            "{} is not the address of a workload on this node",
            local.ip()
        )
    })?;
    let cert = node
        .certs
        .fetch_async(&workload.identity)
        .await
        .map_err(|e| format!("no certificate for {}: {e}", workload.identity))?;
    let cfg = node.server_config(&cert).map_err(|e| e.to_string())?;
    // Subscribed before the handshake, so a CRL reload during it is not missed.
    let mut trust_changes = node.certs.subscribe_trust();
    trust_changes.borrow_and_update();
    let server::Accepted {
        client,
        chain,
        mut h2,
    } = server::accept(tcp, cfg, node.cfg.node.handshake_timeout).await?;
    let verified_at = unix_time(node.certs.now());
    tracing::debug!(src = %peer, identity = %client, "HBONE connection established");
    let pinger = h2.ping_pong();
    let ka = async {
        match pinger {
            Some(p) => keepalive(p).await,
            None => std::future::pending().await,
        }
    };
    let accept = async {
        let mut goaway_sent = false;
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
            };
            let Some(next) = next else { break };
            match next {
                Ok((req, respond)) => {
                    tokio::spawn(stream(
                        node.clone(),
                        scope.clone(),
                        workload.clone(),
                        client.clone(),
                        peer,
                        req,
                        respond,
                    ));
                }
                Err(e) => return Err(format!("HTTP/2 error: {e}")),
            }
        }
        Ok(())
    };
    // A CRL reload that revokes the client's chain ends the whole connection (every stream).
    // The chain is re-checked at its handshake time: expiring since then does not cut it.
    let revoked = async {
        while trust_changes.changed().await.is_ok() {
            let trust = trust_changes.borrow_and_update().clone();
            if let Some((leaf, rest)) = chain.split_first() {
                if let Err(e) = trust.verify_chain(leaf, rest, verified_at, Usage::Client) {
                    return e;
                }
            }
        }
        std::future::pending().await
    };
    tokio::select! {
        r = accept => r,
        e = ka => Err(format!("peer stopped answering PINGs: {e}")),
        e = revoked => {
            node.stats.revoked_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(format!("closing: client {client} is no longer trusted ({e})"))
        }
    }
}

async fn stream(
    node: Arc<Node>,
    scope: Arc<Scope>,
    workload: Arc<Workload>,
    client: SpiffeId,
    peer: SocketAddr,
    req: Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let enabled = node.access_log_enabled();
    let dst = match parse_connect(&req) {
        Ok(d) => d,
        Err(e) => {
            server::refuse(respond, e.status());
            let mut log = ConnLog::new(
                Direction::Inbound,
                peer,
                SocketAddr::new(workload.addresses[0], 0),
                &node.metrics,
            );
            log.src_identity = Some(client.to_string());
            log.emit(enabled, Some(&format_args!("bad CONNECT: {e}")));
            return;
        }
    };
    let mut log = ConnLog::new(Direction::Inbound, peer, dst, &node.metrics);
    log.src_identity = Some(client.to_string());
    log.dst_identity = Some(workload.identity.to_string());
    log.dst_workload = Some(workload.name.clone());
    log.dst_wl = Some(workload.clone());
    let model = node.model();
    log.src_wl = model.workload_by_ip(peer.ip()).cloned();
    log.mtls = true;
    log.path = format!("app {dst}");
    match model.local_workload(dst.ip()) {
        None => {
            server::refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
            log.emit(
                enabled,
                Some(&format_args!(
                    "{} is not a workload on this node (503)",
                    dst.ip()
                )),
            );
            return;
        }
        Some(w) if w.uid != workload.uid => {
            server::refuse(respond, StatusCode::BAD_REQUEST);
            log.emit(
                enabled,
                Some(&format_args!(
                    "authority {dst} belongs to {}, not to {} which owns this listener (400)",
                    w.name, workload.name
                )),
            );
            return;
        }
        Some(_) => {}
    }
    // Policy is judged at the destination with the real target port (model.md).
    let who = || inbound_connection(Some(&client), peer, dst, &workload);
    let mut changes = node.subscribe_state();
    changes.borrow_and_update();
    let decision = node.authorize(&who());
    if !decision.allowed {
        server::refuse(respond, StatusCode::UNAUTHORIZED);
        let reason = denial_reason(&decision);
        tracing::info!(src = %peer, %dst, identity = %client, reason, "connection denied by authorization policy");
        log.emit(enabled, Some(&format_args!("{reason} (401)")));
        return;
    }
    // Not kept across the relay's awaits: an idle connection carries as little as possible.
    drop(decision);
    // The app sees the calling workload's address; bytes the client sent before our 200 wait in
    // h2's window and reach nobody until the dial succeeded (reliability #11).
    let mut app = match dial_app(&node, &scope, dst, peer).await {
        Ok(a) => a,
        Err(e) => {
            server::refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
            log.emit(enabled, Some(&format_args!("{e} (503)")));
            return;
        }
    };
    let send = match server::respond_ok(respond) {
        Ok(s) => s,
        Err(e) => {
            log.emit(
                enabled,
                Some(&format_args!("client went away before the 200: {e}")),
            );
            return;
        }
    };
    log.opened();
    let outcome = {
        let relay = std::pin::pin!(tcp_to_h2(&mut app, send, req.into_body()));
        enforce(&node, who, changes, relay).await
    };
    if outcome.is_err() {
        // Dropping the relay reset the client's stream; reset the app's side too.
        reset_on_drop(&app);
    }
    settle(log, enabled, outcome, Some(&client));
}
