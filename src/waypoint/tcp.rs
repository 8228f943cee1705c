//! Opaque TCP through the waypoint: the TCP reading of the target's HTTP policies, then one
//! endpoint for the whole connection over an HBONE stream, resets passed on as resets.

use std::sync::Arc;

use super::accesslog::Exchange;
use super::flow::{Downstream, DownstreamIo, Rewind};
use super::server::Waypoint;
use crate::model::{Route, Service};

/// Opaque TCP through the waypoint: one endpoint for the whole connection, after the TCP
/// reading of the target's HTTP policies (l7's module docs). A denied flow is reset (dropping
/// the stream without END_STREAM sends RST_STREAM, which the client's node turns into a TCP
/// reset) before anything is dialed, and access-logged.
pub(super) async fn relay_tcp<IO: DownstreamIo>(
    wp: Arc<Waypoint>,
    down: Downstream,
    mut io: Rewind<IO>,
) {
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
    let state = wp.state();
    let src_wl = state.model.workload_by_ip(down.peer.ip());
    wp.access_log.record(
        down,
        src_wl.map(|w| &**w),
        &Exchange::tcp_denial(svc.map(|s| &**s), detail),
    );
}
