//! HTTP apps for the waypoint tests (tiers b and c): versioned backends with failure,
//! slowness and gRPC-echo behaviours.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A response body fed by a channel: lets the gRPC app stream and end with trailers.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: String) -> Response<AppBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r
}

/// The app behind each version: answers with its version, the path it got and the trace
/// context; `/fail-once/<id>` fails the first time; `/slow` takes 2 s; `/flap` always fails on v2; gRPC requests are echoed
/// frame by frame and end with `grpc-status: 0` in trailers.
pub async fn app(version: &'static str, listener: TcpListener) {
    app_logged(version, listener, Arc::default()).await
}

/// Every request an app received, as `METHOD path?query` (what the proxy forwarded, exactly).
pub type RequestLog = Arc<Mutex<Vec<String>>>;

/// `app`, recording each request it receives in `log` (attack tests count what got through).
pub async fn app_logged(version: &'static str, listener: TcpListener, log: RequestLog) {
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (seen, log) = (seen.clone(), log.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                log.lock().unwrap().push(format!(
                    "{} {}",
                    req.method(),
                    req.uri().path_and_query().map_or("", |p| p.as_str())
                ));
                async move {
                    let path = req.uri().path().to_string();
                    if req
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v == "application/grpc")
                    {
                        let (tx, rx) = tokio::sync::mpsc::channel(16);
                        let mut body = req.into_body();
                        tokio::spawn(async move {
                            while let Some(Ok(f)) = body.frame().await {
                                if let Ok(d) = f.into_data() {
                                    let _ = tx.send(Frame::data(d)).await;
                                }
                            }
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", "0".parse().unwrap());
                            t.insert("x-served-by", version.parse().unwrap());
                            let _ = tx.send(Frame::trailers(t)).await;
                        });
                        let mut r = Response::new(ChannelBody(rx).boxed());
                        r.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        return Ok::<_, Infallible>(r);
                    }
                    if let Some(id) = path.strip_prefix("/fail-once/") {
                        let n = {
                            let mut s = seen.lock().unwrap();
                            let n = s.entry(id.to_string()).or_insert(0);
                            *n += 1;
                            *n
                        };
                        if n == 1 {
                            return Ok(text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "first try fails\n".into(),
                            ));
                        }
                    }
                    if path == "/flap" && version == "v2" {
                        return Ok(text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "v2 is broken\n".into(),
                        ));
                    }
                    if path == "/slow" {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    let trace = req
                        .headers()
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    let mut r = text(StatusCode::OK, format!("{version} {path}\n"));
                    r.headers_mut()
                        .insert("x-version", version.parse().unwrap());
                    r.headers_mut()
                        .insert("x-got-traceparent", trace.parse().unwrap());
                    if let Some(sub) = req.headers().get("x-jwt-sub") {
                        r.headers_mut().insert("x-got-sub", sub.clone());
                    }
                    Ok(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// One GET on a keep-alive HTTP/1.1 connection: status, headers and body.
pub async fn get(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, String) {
    c.ready().await.unwrap();
    let mut req = Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}
