//! Outbound capture (:15001): connections REDIRECTed from local applications. The original
//! destination (SO_ORIGINAL_DST) goes through destination selection; mesh destinations are
//! tunneled over HBONE with the source workload's certificate, others are relayed as plain TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{accept_loop, ConnLog, Direction, Node, Scope};
use crate::copy::{reset_on_drop, tcp_to_h2, tcp_to_tcp};
use crate::hbone::client::PoolKey;
use crate::hbone::connect::{build_connect, build_connect_host, new_trace_ids, ConnectHeaders};
use crate::model::{Route, Workload};
use crate::socket::{dial_in, original_dst, DialOptions};

pub(super) async fn serve(
    node: Arc<Node>,
    scope: Arc<Scope>,
    listener: tokio::net::TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let own = listener.local_addr().ok();
    let counted = node.clone();
    accept_loop(
        listener,
        shutdown,
        &scope.clone(),
        "outbound",
        &counted.rejections,
        move |tcp, peer| {
        let node = node.clone();
        let scope = scope.clone();
        async move {
            match original_dst(&tcp) {
                // A connection made straight to the listener was not captured: proxying it to
                // itself would loop forever.
                Ok(dst) if Some(dst) == own || dst.port() == node.cfg.node.ports.outbound && node.model().local_workload(dst.ip()).is_some() => {
                    let log = ConnLog::new(Direction::Outbound, peer, dst, &node.metrics);
                    reset_on_drop(&tcp);
                    crate::reject!(node.rejections, "outbound", "self_target", src = %peer, %dst, "connection to the outbound port itself was not captured traffic; refused");
                    log.emit(node.access_log_enabled(), Some(&"connection to the outbound port itself was not captured traffic; refused"));
                }
                Ok(dst) => proxy_in(node, scope, tcp, peer, dst).await,
                Err(e) => {
                    reset_on_drop(&tcp);
                    crate::reject!(node.rejections, "outbound", "no_original_destination", src = %peer, error = %e, "outbound connection has no original destination (not REDIRECTed?); refused");
                }
            }
        }
    })
    .await
}

/// Proxies one captured connection from `peer` to its original destination `dst` (host mode:
/// the node's own pool and namespace).
pub async fn proxy(node: Arc<Node>, tcp: TcpStream, peer: SocketAddr, dst: SocketAddr) {
    let (_keep, kill) = tokio::sync::watch::channel(false);
    let scope = node.host_scope(kill);
    proxy_in(node, scope, tcp, peer, dst).await
}

async fn proxy_in(
    node: Arc<Node>,
    scope: Arc<Scope>,
    tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) {
    let log = ConnLog::new(Direction::Outbound, peer, dst, &node.metrics);
    let enabled = node.access_log_enabled();
    // In-pod, the listener belongs to exactly one pod: that pod is the source, once the model
    // knows it. Until then nothing leaves the pod: not tunneled (no identity), never plaintext.
    let source = match scope.bound_workload() {
        Ok(Some(w)) => Some(w),
        Ok(None) => node.source_workload(peer.ip()),
        Err(pod) => {
            reset_on_drop(&tcp);
            let reason = pod.unknown_reason();
            crate::reject!(node.rejections, "outbound", "pod_workload_unknown", src = %peer, %dst, reason, "outbound connection refused (reset)");
            log.emit(enabled, Some(&format_args!("{reason} (reset)")));
            return;
        }
    };
    let Some(source) = source else {
        reset_on_drop(&tcp);
        log.emit(
            enabled,
            Some(&format_args!(
                "no local workload has address {}; is it in the config with node: {}?",
                peer.ip(),
                node.cfg.node.name
            )),
        );
        return;
    };
    proxy_from(node, scope, tcp, peer, source, dst, log).await
}

/// The outbound path after the source is known: destination selection (`Model::select`),
/// then the HBONE tunnel with `source`'s certificate (pooled per source identity, destination
/// and `peer`'s IP), or the plain relay the route asks for; one access-log line and the metrics
/// in `log`. `peer` is the client as the tunnel presents it (the CONNECT's `forwarded` header,
/// and the address the tunnel's socket binds when it is one of this host's). Captured traffic
/// enters through `proxy_in`; client-only access (`connect`) calls it with its configured
/// workload, and its own `log` (the real client as `src`, an `on_open` for SOCKS5 replies).
pub async fn proxy_from(
    node: Arc<Node>,
    scope: Arc<Scope>,
    tcp: TcpStream,
    peer: SocketAddr,
    source: Arc<Workload>,
    dst: SocketAddr,
    mut log: ConnLog,
) {
    let enabled = node.access_log_enabled();
    log.src_identity = Some(source.identity.to_string());
    log.src_wl = Some(source.clone());
    // Everything up to the tunnel happens inside this block, so that none of its locals (the
    // route, the pool key, the requests) stays in the task's state for the connection's life:
    // the task is sized by the relay alone (RSS per open connection).
    let (tunnel, log) = {
        let model = node.model();
        let route = match model.select(&source, dst, &mut rand::thread_rng()) {
            Ok(r) => r,
            Err(e) => {
                reset_on_drop(&tcp);
                log.emit(enabled, Some(&e));
                return;
            }
        };
        match route {
            Route::Hbone {
                hbone_addr,
                authority,
                expected,
                destination,
                service,
            } => {
                log.dst_identity = Some(destination.identity.to_string());
                log.set_destination(&destination, service.as_ref());
                log.mtls = true;
                // ztunnel's fields: the tunnel's address at L4, the target inside it apart.
                log.dst = hbone_addr;
                log.hbone_addr = Some(authority);
                log.path = format!("hbone {hbone_addr} authority {authority}");
                let (trace_id, span_id) = new_trace_ids();
                let req = build_connect(
                    authority,
                    &ConnectHeaders {
                        source: &source,
                        client_addr: peer,
                        service_host: service.as_ref().map(|s| s.hostname.as_str()),
                        trace_id,
                        span_id,
                    },
                );
                let key = PoolKey {
                    source: source.identity.clone(),
                    expected,
                    dst: hbone_addr,
                    source_ip: Some(peer.ip()),
                };
                // Boxed: the connect future is large and would otherwise stay part of this
                // task's state for the connection's whole life (RSS per idle connection).
                (Box::pin(scope.pool.connect(&key, req)).await, log)
            }
            Route::Gateway {
                gateway,
                gateway_identity,
                authority,
                expected,
                network,
                destination,
                service,
            } => {
                log.dst_identity = Some(destination.identity.to_string());
                log.set_destination(&destination, Some(&service));
                log.mtls = true;
                log.dst = gateway;
                log.path = format!("double hbone via {gateway} ({network}) authority {authority}");
                let (trace_id, span_id) = new_trace_ids();
                let headers = ConnectHeaders {
                    source: &source,
                    client_addr: peer,
                    service_host: Some(service.hostname.as_str()),
                    trace_id,
                    span_id,
                };
                let (host, port) = (service.hostname.as_str(), dst.port());
                let reqs = build_connect_host(host, port, &headers, None).and_then(|outer| {
                    let inner = build_connect_host(host, port, &headers, Some(&source.network))?;
                    Ok((outer, inner))
                });
                let (outer, inner) = match reqs {
                    Ok(r) => r,
                    Err(e) => {
                        reset_on_drop(&tcp);
                        log.emit(
                            enabled,
                            Some(&format_args!("service {}: {e}", service.key())),
                        );
                        return;
                    }
                };
                let key = PoolKey {
                    source: source.identity.clone(),
                    expected: vec![gateway_identity],
                    dst: gateway,
                    source_ip: Some(peer.ip()),
                };
                let tunnel =
                    Box::pin(scope.pool.connect_double(&key, outer, expected, inner)).await;
                (tunnel, log)
            }
            Route::Direct {
                addr,
                destination,
                service,
            } => {
                log.set_destination(&destination, service.as_ref());
                log.path = format!("direct {addr}");
                // The plain-TCP relays are boxed so that every connection's task is sized by the
                // HBONE path, the mesh's common one (RSS per open connection).
                return Box::pin(relay(&node, &scope, tcp, addr, log)).await;
            }
            Route::Passthrough { addr } => {
                log.path = format!("passthrough {addr}");
                return Box::pin(relay(&node, &scope, tcp, addr, log)).await;
            }
        }
    };
    carry(tcp, tunnel, log, enabled).await;
}

/// Carries the application's connection over an HBONE tunnel once it is open; a tunnel that
/// could not be opened resets the application, never falls back to plaintext.
async fn carry(
    mut tcp: TcpStream,
    tunnel: Result<crate::hbone::client::Tunnel, crate::hbone::client::HboneError>,
    mut log: ConnLog,
    enabled: bool,
) {
    match tunnel {
        Ok(tunnel) => {
            let _guard = tunnel.guard;
            log.opened();
            log.transfer = tcp_to_h2(&mut tcp, tunnel.send, tunnel.recv).await;
            log.emit(enabled, None);
        }
        Err(e) => {
            reset_on_drop(&tcp);
            log.emit(enabled, Some(&e));
        }
    }
}

async fn relay(node: &Node, scope: &Scope, mut tcp: TcpStream, addr: SocketAddr, mut log: ConnLog) {
    let opts = DialOptions {
        mark: node.mark(),
        source: None,
        transparent: false,
    };
    match Box::pin(dial_in(scope.dial_netns(), addr, opts)).await {
        Ok(mut up) => {
            log.opened();
            log.transfer = tcp_to_tcp(&mut tcp, &mut up).await;
            log.emit(node.access_log_enabled(), None);
        }
        Err(e) => {
            reset_on_drop(&tcp);
            log.emit(node.access_log_enabled(), Some(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns, read from its type: nothing is called.
    fn returned_size<F, A, B, C, D, R>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every open outbound connection holds one `proxy` task for its whole life. With the
    /// route, pool key and requests in scope across the relay, and the plain-TCP relays inline,
    /// it was 4.9 KB (debug); 3.6 KB now. The bound leaves room for compiler and dependency
    /// updates and still catches that.
    #[test]
    fn an_outbound_connections_task_stays_small() {
        let size = returned_size(&super::proxy);
        assert!(size <= 4608, "outbound::proxy's future is {size} bytes");
    }
}
