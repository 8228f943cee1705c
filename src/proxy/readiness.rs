//! Readiness (:15021 `GET /healthz/ready`): 200 once the node's certificates are issued and its
//! listeners bound, 503-style 500 with what is pending otherwise (what kubelet probes). The same
//! small server answers `/metrics` and `/stats/prometheus` on :15020.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
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
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "readiness accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let node = node.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = respond(&node, &req, metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
