//! Inbound plaintext (:15006): connections from clients outside the mesh to a local workload,
//! REDIRECTed by the capture rules. Allowed or refused by `node.inbound_plaintext`; allowed
//! connections reach the app with the client's own source address.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{
    accept_loop, denial_reason, dial_app, enforce, inbound_connection, settle, ConnLog, Direction,
    Node, Scope,
};
use crate::copy::{reset_on_drop, tcp_to_tcp};
use crate::socket::original_dst;

pub(super) async fn serve(
    node: Arc<Node>,
    scope: Arc<Scope>,
    listener: tokio::net::TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let counted = node.clone();
    accept_loop(
        listener,
        shutdown,
        &scope.clone(),
        "inbound plaintext",
        &counted.rejections,
        move |tcp, peer| connection(node.clone(), scope.clone(), tcp, peer),
    )
    .await
}

async fn connection(node: Arc<Node>, scope: Arc<Scope>, mut tcp: TcpStream, peer: SocketAddr) {
    let enabled = node.access_log_enabled();
    let dst = match original_dst(&tcp) {
        Ok(d) => d,
        Err(e) => {
            reset_on_drop(&tcp);
            crate::reject!(node.rejections, "plaintext", "no_original_destination", src = %peer, error = %e, "plaintext inbound connection has no original destination; refused");
            return;
        }
    };
    let mut log = ConnLog::new(Direction::InboundPlaintext, peer, dst, &node.metrics);
    log.path = format!("plaintext app {dst}");
    if !node.inbound_plaintext_allowed() {
        reset_on_drop(&tcp);
        log.emit(
            enabled,
            Some(&"plaintext inbound is refused by node.inbound_plaintext: deny"),
        );
        return;
    }
    let model = node.model();
    // In-pod, the listener's own pod is the destination; in host mode, find it by address.
    let workload = match scope.bound_workload() {
        Ok(Some(w)) => w.addresses.contains(&dst.ip()).then_some(w),
        Ok(None) => model.local_workload(dst.ip()).cloned(),
        Err(pod) => {
            // The model does not know this pod yet: nothing reaches it (fail closed).
            reset_on_drop(&tcp);
            let reason = pod.unknown_reason();
            crate::reject!(node.rejections, "plaintext", "pod_workload_unknown", src = %peer, %dst, reason, "plaintext inbound connection refused (reset)");
            log.emit(enabled, Some(&format_args!("{reason} (reset)")));
            return;
        }
    };
    let Some(w) = workload else {
        reset_on_drop(&tcp);
        log.emit(
            enabled,
            Some(&format_args!("{} is not a workload on this node", dst.ip())),
        );
        return;
    };
    // A client dialing a workload's address at one of the node's own ports (15006 itself, say)
    // would make the node dial itself, again and again (docs/reliability.md #38).
    if node.is_own_listener(dst) {
        reset_on_drop(&tcp);
        crate::reject!(node.rejections, "plaintext", "self_target", src = %peer, %dst, "plaintext connection to one of the node's own listener ports refused (reset)");
        log.emit(
            enabled,
            Some(&format_args!(
                "{dst} is one of this node's own listeners; never dialed (reset)"
            )),
        );
        return;
    }
    log.dst_identity = Some(w.identity.to_string());
    log.dst_workload = Some(w.name.clone());
    log.dst_wl = Some(w.clone());
    // No peer identity: principal, namespace and service-account matches never hold, so a
    // STRICT policy (DENY not_principals ["*"]) refuses this connection.
    let who = || inbound_connection(None, peer, dst, &w);
    let mut changes = node.subscribe_state();
    changes.borrow_and_update();
    let decision = node.authorize(&who());
    if !decision.allowed {
        reset_on_drop(&tcp);
        let reason = denial_reason(&decision);
        log.denied = true;
        crate::reject!(info: node.rejections, "plaintext", "denied_by_policy", src = %peer, %dst, reason, "plaintext connection denied by authorization policy");
        log.emit(enabled, Some(&format_args!("{reason} (reset)")));
        return;
    }
    // Not kept across the relay's awaits: an idle connection carries as little as possible.
    drop(decision);
    let mut app = match dial_app(&node, &scope, dst, peer).await {
        Ok(app) => app,
        Err(e) => {
            reset_on_drop(&tcp);
            log.emit(enabled, Some(&e));
            return;
        }
    };
    log.opened();
    let outcome = {
        let relay = std::pin::pin!(tcp_to_tcp(&mut tcp, &mut app));
        enforce(&node, who, changes, relay).await
    };
    if outcome.is_err() {
        reset_on_drop(&tcp);
        reset_on_drop(&app);
    }
    settle(log, enabled, outcome, None);
}
