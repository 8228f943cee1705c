//! Inbound plaintext (:15006): connections from clients outside the mesh to a local workload,
//! REDIRECTed by the capture rules. Allowed or refused by `node.inbound_plaintext`; allowed
//! connections reach the app with the client's own source address.

use std::sync::Arc;

use tokio::sync::watch;

use super::{accept_loop, ConnLog, Direction, Node};
use crate::copy::{reset_on_drop, tcp_to_tcp};
use crate::socket::{dial, original_dst, DialOptions};

pub(super) async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, shutdown, "inbound plaintext", move |mut tcp, peer| {
        let node = node.clone();
        async move {
            let enabled = node.access_log_enabled();
            let dst = match original_dst(&tcp) {
                Ok(d) => d,
                Err(e) => {
                    reset_on_drop(&tcp);
                    tracing::warn!(src = %peer, error = %e, "plaintext inbound connection has no original destination; refused");
                    return;
                }
            };
            let mut log = ConnLog::new(Direction::InboundPlaintext, peer, dst);
            log.path = format!("app {dst}");
            if !node.inbound_plaintext_allowed() {
                reset_on_drop(&tcp);
                log.emit(enabled, Some(&"plaintext inbound is refused by node.inbound_plaintext: deny"));
                return;
            }
            let model = node.model();
            let Some(w) = model.local_workload(dst.ip()) else {
                reset_on_drop(&tcp);
                log.emit(enabled, Some(&format_args!("{} is not a workload on this node", dst.ip())));
                return;
            };
            log.dst_identity = Some(w.identity.to_string());
            log.dst_workload = Some(w.name.clone());
            let opts = DialOptions { mark: node.mark(), source: Some(peer.ip()), transparent: true };
            match dial(dst, opts).await {
                Ok(mut app) => {
                    log.transfer = tcp_to_tcp(&mut tcp, &mut app).await;
                    log.emit(enabled, None);
                }
                Err(e) => {
                    reset_on_drop(&tcp);
                    log.emit(enabled, Some(&e));
                }
            }
        }
    })
    .await
}
