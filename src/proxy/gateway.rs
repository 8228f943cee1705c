//! East-west gateway mode (`node.east_west_gateway`, docs/model.md "Networks"): the outer
//! tunnel of double HBONE ends here. A CONNECT for `hostname:port` from another network is
//! authorized by the caller's identity and this gateway workload's policies, an endpoint of
//! that service on this network is picked (as outbound picks: health, locality, capacity), and
//! the stream's bytes, which are the inner mTLS session, go to that endpoint's node on its
//! HBONE port untouched. The gateway holds no key of the inner session, so it never sees the
//! inner identities' plaintext.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;

use super::{answer_and_relay, denial_reason, inbound_connection, ConnLog, Direction, Node, Scope};
use crate::hbone::server;
use crate::identity::SpiffeId;
use crate::model::{SelectError, Workload};
use crate::socket::{dial_in, DialOptions};

/// One CONNECT for `host:port` on the gateway workload's listener.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay(
    node: Arc<Node>,
    scope: Arc<Scope>,
    gateway: Arc<Workload>,
    client: SpiffeId,
    (peer, local): (SocketAddr, SocketAddr),
    host: String,
    port: u16,
    s: server::Stream,
) {
    let server::Stream {
        req,
        mut respond,
        guard,
    } = s;
    let enabled = node.access_log_enabled();
    let mut log = ConnLog::new(Direction::Inbound, peer, local, &node.metrics);
    log.src_identity = Some(client.to_string());
    log.mtls = true;
    let refuse = |respond, status: StatusCode, code: &'static str, why: String, log: ConnLog| {
        server::refuse(respond, status);
        crate::reject!(node.rejections, "gateway", code, src = %peer, identity = %client, target = %format_args!("{host}:{port}"), reason = %why, "east-west gateway refused a CONNECT");
        log.emit(enabled, Some(&format_args!("{why} ({})", status.as_u16())));
    };
    let Some(gw) = node.cfg.node.east_west_gateway.as_ref() else {
        return refuse(
            respond,
            StatusCode::BAD_REQUEST,
            "not_a_gateway",
            format!("{host}:{port}: this node is not an east-west gateway"),
            log,
        );
    };
    // The caller is judged as a client of the gateway workload, at the service port.
    let at = SocketAddr::new(local.ip(), port);
    let who = || inbound_connection(Some(&client), peer, at, &gateway);
    let mut changes = node.subscribe_state();
    changes.borrow_and_update();
    let decision = node.authorize(&who());
    if !decision.allowed {
        log.denied = true;
        let reason = denial_reason(&decision).to_string();
        return refuse(
            respond,
            StatusCode::UNAUTHORIZED,
            "denied_by_policy",
            reason,
            log,
        );
    }
    drop(decision);
    let model = node.model();
    // What may cross is decided before any endpoint is looked at, so an unexposed service
    // answers the same whatever the state of its endpoints.
    match model.service_by_host(&host) {
        Some(svc) if !gw.exposes(&svc.namespace, &svc.hostname) => {
            let why = format!("service {} is not exposed by this gateway", svc.key());
            return refuse(respond, StatusCode::BAD_REQUEST, "not_exposed", why, log);
        }
        // Its L7 policy lives in the waypoint, which a relay to the endpoint would skip.
        Some(svc) if svc.waypoint.is_some() => {
            let why = format!(
                "service {} is fronted by a waypoint; not relayed across networks",
                svc.key()
            );
            return refuse(
                respond,
                StatusCode::BAD_REQUEST,
                "waypoint_service",
                why,
                log,
            );
        }
        _ => {}
    }
    let picked = model.gateway_target(&gateway, &host, port, &mut rand::thread_rng());
    let (svc, endpoint, hbone) = match picked {
        Ok(p) => p,
        Err(e @ SelectError::NoHealthyEndpoint { .. }) => {
            return refuse(
                respond,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_endpoint",
                e.to_string(),
                log,
            )
        }
        Err(e) => {
            return refuse(
                respond,
                StatusCode::BAD_REQUEST,
                "unknown_target",
                e.to_string(),
                log,
            )
        }
    };
    // Never picked by `gateway_target`; kept so that no future change makes it dial itself.
    if model.local_workload(hbone.ip()).is_some() {
        return refuse(
            respond,
            StatusCode::BAD_REQUEST,
            "self_target",
            format!("endpoint {hbone} is this gateway's own address; never dialed"),
            log,
        );
    }
    log.dst = hbone;
    log.dst_workload = Some(endpoint.name.clone());
    log.dst_identity = Some(endpoint.identity.to_string());
    log.dst_service = Some(svc.hostname.clone());
    log.dst_wl = Some(endpoint.clone());
    log.svc = Some(svc.clone());
    log.path = format!("gateway relay {host}:{port} to {hbone}");
    let opts = DialOptions {
        mark: node.mark(),
        source: None,
        transparent: false,
    };
    let dial = Box::pin(dial_in(scope.dial_netns(), hbone, opts));
    let mut up = match guard.dial(&mut respond, dial).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            server::refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
            log.emit(enabled, Some(&format_args!("{e} (503)")));
            return;
        }
        Err(server::Abandoned) => {
            log.emit(
                enabled,
                Some(&"client reset the stream before the endpoint was reached; dial abandoned"),
            );
            return;
        }
    };
    let body = req.into_body();
    answer_and_relay(
        &node, &guard, respond, body, &mut up, log, who, changes, &client,
    )
    .await;
}

/// Connections the control-plane passthrough holds at once; one more is reset at accept.
/// Each is a node's or VM's xDS or CA connection, so a gateway sees a few per caller.
pub(super) const MAX_PASSTHROUGH: usize = 1024;
/// How long the control plane may take to accept before the caller is reset.
const PASSTHROUGH_DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `node.east_west_gateway.control_plane`: TCP on the gateway's port 15012 passed through, byte
/// for byte, to the configured control plane (Istio's "expose istiod" on an east-west gateway).
/// The TLS inside is between the caller and the control plane; the gateway holds no key of it.
/// The destination is fixed by the config, so a caller can reach nothing else through it, and
/// at most [`MAX_PASSTHROUGH`] connections are held at once.
pub(super) async fn control_plane_passthrough(
    mark: Option<u32>,
    listener: tokio::net::TcpListener,
    target: SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
    max: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let (mut down, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "control-plane passthrough: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::copy::reset_on_drop(&down);
            tracing::warn!(%peer, max, "control-plane passthrough full; connection reset");
            continue;
        };
        let opts = DialOptions {
            mark,
            source: None,
            transparent: false,
        };
        tokio::spawn(async move {
            let _slot = slot;
            let dialed = tokio::time::timeout(
                PASSTHROUGH_DIAL_TIMEOUT,
                Box::pin(dial_in(None, target, opts)),
            )
            .await;
            let mut up = match dialed {
                Ok(Ok(up)) => up,
                Ok(Err(e)) => {
                    crate::copy::reset_on_drop(&down);
                    tracing::warn!(%peer, %target, error = %e, "control-plane passthrough: dial failed; caller reset");
                    return;
                }
                Err(_) => {
                    crate::copy::reset_on_drop(&down);
                    tracing::warn!(%peer, %target, "control-plane passthrough: dial timed out; caller reset");
                    return;
                }
            };
            crate::socket::tune(&down);
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((sent, received)) => {
                    tracing::debug!(%peer, %target, sent, received, "control-plane passthrough closed");
                }
                Err(e) => {
                    // One side failed: both see a reset, never a clean end that looks complete.
                    crate::copy::reset_on_drop(&down);
                    crate::copy::reset_on_drop(&up);
                    tracing::debug!(%peer, %target, error = %e, "control-plane passthrough reset");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// An echo server standing in for the control plane.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn passthrough(
        target: SocketAddr,
        max: usize,
    ) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(control_plane_passthrough(None, l, target, rx, max));
        (addr, tx)
    }

    async fn round_trip(c: &mut TcpStream, msg: &[u8]) {
        c.write_all(msg).await.unwrap();
        let mut got = vec![0; msg.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }

    /// Expects a reset (never a clean end that could pass for an answer).
    async fn assert_reset(c: &mut TcpStream) {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("a reset, not a hang");
        match r {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("read {n} bytes instead of a reset"),
        }
    }

    #[tokio::test]
    async fn the_control_plane_passthrough_relays_exactly_and_holds_at_most_its_bound() {
        let (gw, stop) = passthrough(echo().await, 2).await;
        let mut a = TcpStream::connect(gw).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        round_trip(&mut a, &big).await;
        let mut b = TcpStream::connect(gw).await.unwrap();
        round_trip(&mut b, b"second").await;
        // Both slots held: a third caller is reset at once, holding nothing.
        let mut c = TcpStream::connect(gw).await.unwrap();
        assert_reset(&mut c).await;
        // A slot comes back when its connection ends.
        drop(a);
        let mut d = loop {
            let mut d = TcpStream::connect(gw).await.unwrap();
            let _ = d.write_all(b"again").await;
            let mut got = [0u8; 5];
            match d.read_exact(&mut got).await {
                Ok(_) => {
                    assert_eq!(&got, b"again");
                    break d;
                }
                // The slot is freed once the relay task has seen the close: try again.
                Err(_) => tokio::task::yield_now().await,
            }
        };
        round_trip(&mut d, b"and on").await;
        // Stopped, it accepts no more.
        stop.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while TcpStream::connect(gw).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the listener closes on stop");
    }

    #[tokio::test]
    async fn a_caller_is_reset_when_the_control_plane_cannot_be_reached() {
        let gone = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let (gw, _stop) = passthrough(gone, 4).await;
        for _ in 0..8 {
            let mut c = TcpStream::connect(gw).await.unwrap();
            assert_reset(&mut c).await;
        }
    }
}
