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

use super::{
    answer_and_relay, denial_reason, dial_far_side, inbound_connection, ConnLog, Direction, Node,
    Scope,
};
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
        respond,
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
    log.dst_identity = Some(endpoint.identity.to_string());
    log.set_destination(&endpoint, Some(&svc));
    log.path = format!("gateway relay {host}:{port} to {hbone}");
    let opts = DialOptions {
        mark: node.mark(),
        source: None,
        transparent: false,
    };
    let dial = Box::pin(dial_in(scope.dial_netns(), hbone, opts));
    let Some((mut up, respond)) =
        dial_far_side(&guard, respond, dial, &log, enabled, "endpoint").await
    else {
        return;
    };
    let body = req.into_body();
    answer_and_relay(
        &node, &guard, respond, body, &mut up, log, who, changes, &client,
    )
    .await;
}
