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
    // A PROXY tunnel port believes the header a connection starts with; plaintext could start
    // with a forged one (any identity), so nothing but the node's own header may reach it
    // (docs/hbone.md "PROXY protocol"). Without a tunnel port, every port takes headers.
    if takes_proxy_headers(&w, dst) {
        reset_on_drop(&tcp);
        crate::reject!(node.rejections, "plaintext", "proxy_tunnel_port", src = %peer, %dst, "plaintext connection to a PROXY application tunnel port refused (reset): it could carry a forged header");
        log.emit(
            enabled,
            Some(&format_args!(
                "{dst} takes PROXY headers only from the node's HBONE inbound (reset)"
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

/// Whether `dst` on `w` is a PROXY application tunnel port: the tunnel's port, or every port
/// when the tunnel names none.
fn takes_proxy_headers(w: &crate::model::Workload, dst: SocketAddr) -> bool {
    w.proxy_tunnel
        .is_some_and(|t| t.port.is_none_or(|p| p == dst.port()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, WorkloadConfig};

    #[test]
    fn plaintext_never_reaches_a_proxy_tunnel_port() {
        let text = "node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }\nworkloads:\n  - { uid: a, name: a, namespace: ns, addresses: [10.0.0.1], node: n }\n";
        let mut cfg = Config::parse(text, "t").unwrap();
        let plain: WorkloadConfig = cfg.workloads[0].clone();
        let tunnel = |t: &str| {
            let mut w = plain.clone();
            w.application_tunnel = serde_yaml::from_str(t).unwrap();
            w
        };
        cfg.workloads = vec![
            plain.clone(),
            tunnel("{ protocol: PROXY, port: 15088 }"),
            tunnel("{ protocol: PROXY }"),
            tunnel("{ protocol: NONE, port: 15088 }"),
        ];
        for (i, w) in cfg.workloads.iter_mut().enumerate() {
            w.uid = format!("w{i}").as_str().into();
            w.addresses = vec![format!("10.0.0.{}", i + 1).parse().unwrap()];
        }
        let model = crate::model::Model::from_config(&cfg);
        let at = |i: usize, port: u16| {
            let w = &model.workloads()[i];
            takes_proxy_headers(w, SocketAddr::new(w.addresses[0], port))
        };
        assert!(!at(0, 15088), "no tunnel: plaintext as before");
        assert!(at(1, 15088), "the tunnel port is refused");
        assert!(
            !at(1, 8080),
            "other ports of a tunnel-port workload are not"
        );
        assert!(
            at(2, 8080) && at(2, 15088),
            "no tunnel port: every port takes headers"
        );
        assert!(!at(3, 15088), "protocol NONE is no tunnel");
    }
}
