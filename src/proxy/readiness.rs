//! Readiness (:15021 `GET /healthz/ready`): 200 once the node's certificates are issued and its
//! listeners bound, 503-style 500 with what is pending otherwise (what kubelet probes). The same
//! small server answers `/metrics` and `/stats/prometheus` on :15020. Both run within the
//! operator endpoints' limits (`operator`: header deadline, connection cap).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::watch;

use super::Node;

type Body = http_body_util::Full<Bytes>;

fn respond(node: &Node, req: &Request<Incoming>, metrics: bool) -> Response<Body> {
    let (status, body) = match req.uri().path() {
        "/metrics" | "/stats/prometheus" if metrics => (StatusCode::OK, node.metrics_text()),
        "/healthz/ready" => match node.pending() {
            p if p.is_empty() => (StatusCode::OK, "ready\n".to_string()),
            p => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("not ready; waiting for: {}\n", p.join(", ")),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Body::new(Bytes::from(body)))
        .expect("static response")
}

/// Serves readiness, or (with `metrics`) the Prometheus endpoints, until shutdown.
pub(super) async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
    metrics: bool,
) {
    let handler = move |req: Request<Incoming>| {
        let resp = respond(&node, &req, metrics);
        async move { resp }
    };
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    super::operator::serve(listener, super::operator::Limits::default(), handler, stop).await;
}
