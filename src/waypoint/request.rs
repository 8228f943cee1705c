//! HTTP through the waypoint (L7): hyper serves the downstream connection (keep-alive, so one
//! client connection carries many requests); every request is path-normalized, checked against
//! the CONNECT target, authenticated (JWT), authorized (L7 policy), faulted, redirected or
//! rewritten, then forwarded (`upstream`). Each request is recorded (metrics and its access
//! line) when its response body ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, HOST, LOCATION};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde_json::{Map, Value};

use super::accesslog::Exchange;
use super::config::{HeaderOps, PathMatch, RouteConfig, RouteRule};
use super::flow::{Downstream, DownstreamIo, Rewind};
use super::l7::{authorize, normalize_path, select_rule, RequestView};
use super::metrics::RequestLabels;
use super::server::Waypoint;
use super::state::{check_host, primary_service, WpState};
use super::transcode::{
    grpc_request, json_answer, local_json, Matched, Rejected, Transcoder,
    REJECTIONS as TRANSCODE_REJECTIONS,
};
use super::upstream::forward;
use crate::model::{Service, Workload};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Request header block limit: larger gets 431 (reliability #5's spirit at L7).
const MAX_HEADER_BYTES: usize = 64 * 1024;

pub(super) async fn serve_http<IO: DownstreamIo>(
    wp: Arc<Waypoint>,
    down: Downstream,
    io: Rewind<IO>,
) {
    // Set once a response was produced: a stream reset before any answer counts against the
    // connection's reset budget.
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (down_guard, answered_in) = (down.guard.clone(), answered.clone());
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (wp, down, answered) = (wp.clone(), down.clone(), answered_in.clone());
        async move {
            let resp = handle(wp, down, req).await;
            answered.store(true, Ordering::Relaxed);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "downstream HTTP connection ended");
        // Reset before any answer: each such stream may have cost an upstream open
        // (rapid reset through the waypoint), so it counts against the connection's budget.
        if !answered.load(Ordering::Relaxed) {
            down_guard.tunnel_ended(0, true);
        }
    }
}

/// Everything known about one request while it is handled, for the access log and metrics.
pub(super) struct Outcome {
    pub(super) service: Option<Arc<Service>>,
    pub(super) endpoint: Option<Arc<Workload>>,
    pub(super) flags: &'static str,
    pub(super) detail: String,
    trace: (u128, u64),
    pub(super) retries: u32,
}

pub(super) fn local(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    r
}

/// The W3C trace context for the next hop: the caller's trace id (or a new one) with a new
/// span id for this hop.
fn next_trace(req: &Request<Incoming>) -> (u128, u64, String) {
    let (new_trace, span) = crate::hbone::connect::new_trace_ids();
    let parsed = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let p: Vec<&str> = v.split('-').collect();
            (p.len() == 4 && p[0] == "00" && p[1].len() == 32)
                .then(|| Some((u128::from_str_radix(p[1], 16).ok()?, p[3].to_string())))
                .flatten()
        });
    let (trace, flags) = parsed.unwrap_or((new_trace, "01".to_string()));
    (trace, span, format!("00-{trace:032x}-{span:016x}-{flags}"))
}

async fn handle(wp: Arc<Waypoint>, down: Downstream, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let state = wp.state();
    let (trace, span, traceparent) = next_trace(&req);
    let mut out = Outcome {
        service: None,
        endpoint: None,
        flags: "-",
        detail: String::new(),
        trace: (trace, span),
        retries: 0,
    };
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let method = req.method().to_string();
    // As the client sent it: the access log shows what arrived, routing sees it normalized.
    let path = req.uri().path().to_string();
    let req_bytes = Arc::new(AtomicU64::new(0));
    let resp = route_request(&wp, &state, &down, req, &traceparent, &mut out, &req_bytes).await;
    let resp = resp.unwrap_or_else(|r| r);
    // Recorded when the response body ends (or is dropped): bytes, duration and a gRPC status
    // sent in trailers are only known then.
    let finish = Finish {
        wp: wp.clone(),
        down,
        out,
        method,
        path,
        grpc,
        status: resp.status(),
        grpc_status: resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        start,
        req_bytes,
    };
    resp.map(|body| {
        Counted {
            inner: body,
            bytes: 0,
            on_end: Some(finish),
        }
        .boxed()
    })
}

/// The host a request names, lower-cased, without port or trailing dot: Host, else the URI
/// authority (HTTP/2's `:authority`, or an HTTP/1.1 absolute-form target), else "".
fn request_host<B>(req: &Request<B>) -> String {
    let raw = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let host = match raw.parse::<SocketAddr>() {
        Ok(a) => a.ip().to_string(),
        Err(_) => raw
            .rsplit_once(':')
            .filter(|(h, p)| p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':'))
            .map_or(raw.as_str(), |(h, _)| h)
            .trim_matches(|c| c == '[' || c == ']')
            .to_string(),
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The request's path normalized (l7's module docs), with the query string unchanged.
fn normalized_uri(uri: &Uri) -> Result<(Uri, String), String> {
    let path = normalize_path(uri.path()).map_err(|e| e.to_string())?;
    // Most paths are already normal: keep the URI as it came, no rebuild per request.
    if path == uri.path() {
        return Ok((uri.clone(), path));
    }
    let mut parts = uri.clone().into_parts();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    parts.path_and_query = Some(pq.parse().map_err(|e| format!("{pq:?}: {e}"))?);
    let uri = Uri::from_parts(parts).map_err(|e| e.to_string())?;
    Ok((uri, path))
}

pub(super) type Handled = Result<Response<Body>, Response<Body>>;

async fn route_request(
    wp: &Arc<Waypoint>,
    state: &WpState,
    down: &Downstream,
    mut req: Request<Incoming>,
    traceparent: &str,
    out: &mut Outcome,
    req_bytes: &Arc<AtomicU64>,
) -> Handled {
    // The path every decision below sees, and the backend gets.
    let path = match normalized_uri(req.uri()) {
        Ok((uri, path)) => {
            *req.uri_mut() = uri;
            path
        }
        Err(e) => {
            out.flags = "DPE";
            out.detail = format!("path refused: {e}");
            return Err(local(StatusCode::BAD_REQUEST, "bad request path\n"));
        }
    };
    let target = state.target(down.dst);
    let host = request_host(&req);
    let named = check_host(&state.model, &host, &target).map_err(|e| {
        out.flags = "NR";
        out.detail = e;
        local(
            StatusCode::MISDIRECTED_REQUEST,
            &format!("host {host:?} is not the destination this connection was opened to\n"),
        )
    })?;
    let service = primary_service(&target, named);
    out.service = service.clone();
    let key = service.as_ref().map(|s| s.key());
    // JWT: a bad token is always refused; a missing one only where a validator requires it.
    let mut claims: Option<Map<String, Value>> = None;
    let mut claim_headers = Vec::new();
    let validators = state.validators(&target);
    if !validators.is_empty() {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        match token {
            Some(t) => {
                let now = wp.certs.now();
                let mut last = String::new();
                for (_, v, to_headers) in &validators {
                    match v.validate(&t, now) {
                        Ok(c) => {
                            for (claim, header) in to_headers {
                                if let Some(Value::String(s)) = c.get(claim) {
                                    claim_headers.push((header.clone(), s.clone()));
                                }
                            }
                            claims = Some(c);
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                if claims.is_none() {
                    out.flags = "UAEX";
                    out.detail = format!("JWT rejected: {last}");
                    return Err(local(StatusCode::UNAUTHORIZED, "Jwt verification fails\n"));
                }
            }
            None if validators.iter().any(|(required, _, _)| *required) => {
                out.flags = "UAEX";
                out.detail = "JWT required and missing".into();
                return Err(local(StatusCode::UNAUTHORIZED, "Jwt is missing\n"));
            }
            None => {}
        }
    }
    let request_principal = claims.as_ref().map(|c| {
        format!(
            "{}/{}",
            c.get("iss").and_then(Value::as_str).unwrap_or(""),
            c.get("sub").and_then(Value::as_str).unwrap_or("")
        )
    });
    let query = req.uri().query().map(str::to_string);
    let method = req.method().to_string();
    let view = RequestView {
        method: &method,
        path: &path,
        query: query.as_deref(),
        headers: req.headers(),
        host: &host,
        port: down.dst.port(),
        source: Some(&down.client),
        source_ip: down.peer.ip(),
        claims: claims.as_ref(),
        request_principal: request_principal.as_deref(),
    };
    // L7 authorization: every policy of the CONNECT target's services and namespaces.
    let applicable = state.policies(&target);
    let d = authorize(&applicable, &view);
    if !d.allowed {
        out.flags = "RBAC";
        out.detail = format!(
            "denied by {}",
            d.policy.as_deref().unwrap_or("no matching ALLOW policy")
        );
        return Err(local(StatusCode::FORBIDDEN, "RBAC: access denied\n"));
    }
    // Routes are a service's: a pod IP target goes to that pod (its port is the pod's, not a
    // service port a route's backends could be addressed by).
    let routes: Vec<&RouteConfig> = key
        .as_ref()
        .filter(|_| target.workload.is_none())
        .and_then(|k| state.routes.get(k))
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let chosen = select_rule(&routes, &view);
    let rule = chosen.map(|(r, _)| r);
    let matched_path = chosen.and_then(|(_, p)| p);
    if let Some(f) = rule.and_then(|r| r.fault.as_ref()) {
        // Decided before any await: the thread-local RNG cannot be held across one.
        let hit = |pct: f64| rand::thread_rng().gen_bool((pct / 100.0).clamp(0.0, 1.0));
        if let Some(d) = &f.delay {
            if hit(d.percent) {
                tokio::time::sleep(d.fixed).await;
            }
        }
        if let Some(a) = &f.abort {
            if hit(a.percent) {
                out.flags = "FI";
                let status =
                    StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Err(local(status, "fault filter abort\n"));
            }
        }
    }
    if let Some(r) = rule.and_then(|r| r.redirect.as_ref()) {
        let location = format!(
            "{}://{}{}",
            r.scheme.as_deref().unwrap_or("http"),
            r.host
                .as_deref()
                .or(service
                    .as_ref()
                    .map(|s| s.hostname.as_str())
                    .filter(|_| host.is_empty()))
                .unwrap_or(&host),
            r.path.as_deref().unwrap_or(&path)
        );
        let mut resp = local(
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND),
            "",
        );
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(LOCATION, v);
        }
        return Ok(resp);
    }
    // Request edits, in order: rewrite, header ops, claims, trace context.
    if let Some(rw) = rule.and_then(|r| r.rewrite.as_ref()) {
        if let Some(new_path) = &rw.path {
            let rest = match matched_path {
                Some(PathMatch::Prefix(p)) => {
                    path.strip_prefix(p.trim_end_matches('/')).unwrap_or("")
                }
                _ => "",
            };
            let joined = format!("{}{}", new_path.trim_end_matches('/'), rest);
            let joined = if joined.is_empty() {
                "/".to_string()
            } else {
                joined
            };
            let pq = match &query {
                Some(q) => format!("{joined}?{q}"),
                None => joined,
            };
            if let Ok(u) = pq.parse::<Uri>() {
                *req.uri_mut() = u;
            }
        }
        if let Some(h) = &rw.host {
            if let Ok(v) = HeaderValue::from_str(h) {
                req.headers_mut().insert(HOST, v);
            }
        }
    }
    if let Some(r) = rule {
        apply_header_ops(req.headers_mut(), &r.request_headers);
    }
    // Claim headers carry what a validated token said: the client's own copies of them go
    // first, so a request without a token (or whose claim is missing or not a string) cannot
    // make the backend believe it was authenticated.
    for (_, _, to_headers) in &validators {
        for (_, header) in to_headers {
            req.headers_mut().remove(header);
        }
    }
    for (h, v) in claim_headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            req.headers_mut().insert(h, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(traceparent) {
        req.headers_mut().insert("traceparent", v);
    }
    let grpc_in = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    // gRPC↔JSON transcoding: a non-gRPC request that matches a binding of its service becomes a
    // gRPC call; any other request is routed unchanged.
    let transcoder = key.as_ref().and_then(|k| state.transcoders.get(k)).cloned();
    if let Some(t) = transcoder.filter(|_| !grpc_in) {
        if let Some(m) = t.find(req.method(), req.uri().path()) {
            // The backend sees a gRPC call, so a policy written on the gRPC method path
            // (`/pkg.Service/Method`, method POST) must hold too: both views must pass.
            let grpc_view = RequestView {
                method: "POST",
                path: m.grpc_path(),
                query: None,
                headers: req.headers(),
                host: &host,
                port: down.dst.port(),
                source: Some(&down.client),
                source_ip: down.peer.ip(),
                claims: claims.as_ref(),
                request_principal: request_principal.as_deref(),
            };
            let d = authorize(&applicable, &grpc_view);
            if !d.allowed {
                out.flags = "RBAC";
                out.detail = format!(
                    "denied by {} (as gRPC {})",
                    d.policy.as_deref().unwrap_or("no matching ALLOW policy"),
                    m.grpc_path()
                );
                return Err(local(StatusCode::FORBIDDEN, "RBAC: access denied\n"));
            }
            let call = Call {
                rule,
                service: service.as_ref(),
                host: &host,
            };
            let mut resp = transcoded(wp, state, down, req, (&t, &m), call, out, req_bytes).await?;
            if let Some(r) = rule {
                apply_header_ops(resp.headers_mut(), &r.response_headers);
            }
            return Ok(resp);
        }
    }
    let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
    let resp = forward(wp, state, down, req, rule, service.as_ref(), out, req_bytes).await?;
    let mut resp = resp;
    if let Some(r) = rule {
        apply_header_ops(resp.headers_mut(), &r.response_headers);
    }
    Ok(resp)
}

/// What a transcoded call is sent with: the route rule, the service, the client's host.
struct Call<'a> {
    rule: Option<&'a RouteRule>,
    service: Option<&'a Arc<Service>>,
    host: &'a str,
}

/// A request that matched a transcoding binding: its JSON body (capped) and its path and query
/// become the gRPC request message, sent through the same upstream path as any request
/// (retries, timeouts, limits, HBONE); the answer is turned back into JSON.
#[allow(clippy::too_many_arguments)]
async fn transcoded(
    wp: &Arc<Waypoint>,
    state: &WpState,
    down: &Downstream,
    req: Request<Incoming>,
    (t, m): (&Arc<Transcoder>, &Matched<'_>),
    call: Call<'_>,
    out: &mut Outcome,
    req_bytes: &Arc<AtomicU64>,
) -> Handled {
    let reject = |out: &mut Outcome, r: Rejected| {
        out.flags = "DPE";
        out.detail = format!("grpc_transcoding: {}", r.message);
        if let Some(suppressed) = wp.rejections.record(TRANSCODE_REJECTIONS, r.reason) {
            tracing::debug!(reason = r.reason, message = %r.message, suppressed, "transcoding refused a request");
        }
        local_json(r.status, &r.message)
    };
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, t.cfg.max_request_bytes as usize)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Err(reject(
                out,
                Rejected {
                    status: if too_large {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    },
                    reason: if too_large {
                        "body_too_large"
                    } else {
                        "body_read"
                    },
                    message: if too_large {
                        format!(
                            "request body exceeds max_request_bytes ({})",
                            t.cfg.max_request_bytes
                        )
                    } else {
                        format!("reading the request body failed: {e}")
                    },
                },
            ));
        }
    };
    req_bytes.store(body.len() as u64, Ordering::Relaxed);
    let msg = t
        .request_message(m, parts.uri.query(), &body)
        .map_err(|r| reject(out, r))?;
    let authority = call
        .service
        .map(|s| s.hostname.as_str())
        .filter(|h| !h.is_empty())
        .or(Some(call.host).filter(|h| !h.is_empty()))
        .unwrap_or("localhost");
    let greq = grpc_request(
        m,
        &msg,
        authority,
        parts.headers,
        call.rule.and_then(|r| r.timeout),
    )
    .map_err(|e| {
        out.flags = "DPE";
        out.detail = format!("grpc_transcoding: {e}");
        local_json(StatusCode::BAD_REQUEST, &e)
    })?;
    out.detail = format!("grpc_transcoding: {}", m.grpc_path());
    let resp = forward(
        wp,
        state,
        down,
        greq,
        call.rule,
        call.service,
        out,
        req_bytes,
    )
    .await?;
    json_answer(t, m, resp).await.map_err(|(status, e)| {
        out.flags = "UPE";
        out.detail = format!("grpc_transcoding: {}: {e}", m.grpc_path());
        local_json(status, &e)
    })
}

fn apply_header_ops(h: &mut http::HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        h.remove(name.as_str());
    }
    for (k, v) in &ops.set {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            h.insert(n, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            h.append(n, v);
        }
    }
}

/// What is needed to record a request once its response body has ended.
struct Finish {
    wp: Arc<Waypoint>,
    down: Downstream,
    out: Outcome,
    method: String,
    path: String,
    grpc: bool,
    status: StatusCode,
    /// From the response headers (a trailers-only gRPC answer); trailers may override it.
    grpc_status: Option<String>,
    start: Instant,
    req_bytes: Arc<AtomicU64>,
}

impl Finish {
    /// Metrics and the JSON access-log line for one request.
    fn record(self, resp_bytes: u64, trailer_grpc_status: Option<String>) {
        let Finish { wp, down, out, .. } = &self;
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let req_bytes = self.req_bytes.load(Ordering::Relaxed);
        let state = wp.state();
        let src_wl = state.model.workload_by_ip(down.peer.ip());
        let svc = out.service.as_ref();
        let ep = out.endpoint.as_ref();
        let grpc_status = trailer_grpc_status
            .or_else(|| self.grpc_status.clone())
            .unwrap_or_else(|| "-".into());
        let mut labels = RequestLabels::peers(
            src_wl.map(|w| &**w),
            &down.client.to_string(),
            ep.map(|w| &**w),
            svc.map(|s| &**s),
        );
        // A source known only by its certificate still has a namespace.
        if src_wl.is_none() {
            labels.peers.source_workload_namespace = down.client.namespace.clone();
        }
        labels.request_protocol = if self.grpc { "grpc" } else { "http" };
        labels.response_code = self.status.as_u16().to_string();
        labels.grpc_response_status = grpc_status;
        labels.response_flags = out.flags;
        let m = &wp.metrics;
        m.requests.get_or_create(&labels).inc();
        m.duration.get_or_create(&labels).observe(ms);
        m.request_bytes
            .get_or_create(&labels)
            .observe(req_bytes as f64);
        m.response_bytes
            .get_or_create(&labels)
            .observe(resp_bytes as f64);
        wp.access_log.record(
            down,
            src_wl.map(|w| &**w),
            &Exchange {
                service: svc.map(|s| &**s),
                endpoint: ep.map(|w| &**w),
                method: &self.method,
                path: &self.path,
                protocol: labels.request_protocol,
                response_code: self.status.as_u16(),
                grpc_status: &labels.grpc_response_status,
                flags: out.flags,
                detail: &out.detail,
                duration_ms: ms as u64,
                bytes_sent: req_bytes,
                bytes_recv: resp_bytes,
                retries: out.retries,
                trace: out.trace,
            },
        );
    }
}

/// The response body, counted; records the request when it ends or is dropped.
struct Counted {
    inner: Body,
    bytes: u64,
    on_end: Option<Finish>,
}

impl Counted {
    fn finish(&mut self, trailer_grpc_status: Option<String>) {
        if let Some(f) = self.on_end.take() {
            f.record(self.bytes, trailer_grpc_status);
        }
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    let status = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    this.finish(status);
                }
            }
            std::task::Poll::Ready(None) => this.finish(None),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// The request body, streamed through and counted.
pub(super) struct CountedRequest {
    pub(super) inner: Body,
    pub(super) bytes: Arc<AtomicU64>,
}

impl hyper::body::Body for CountedRequest {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_host_is_lowercased_without_port_or_trailing_dot() {
        let with_host = |h: &str| {
            let req = Request::get("/").header(HOST, h).body(()).unwrap();
            request_host(&req)
        };
        for (raw, want) in [
            ("A.Shop:80", "a.shop"),
            ("a.shop.", "a.shop"),
            ("10.0.0.1:8080", "10.0.0.1"),
            ("[::1]:8080", "::1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("", ""),
            ("host:notaport", "host:notaport"),
        ] {
            assert_eq!(with_host(raw), want, "{raw:?}");
        }
        // HTTP/2: no Host header, the `:authority` in the URI.
        let req = Request::get("http://B.Shop:80/x").body(()).unwrap();
        assert_eq!(request_host(&req), "b.shop");
        assert_eq!(request_host(&Request::get("/").body(()).unwrap()), "");
    }

    #[test]
    fn the_forwarded_uri_carries_the_normalized_path_and_the_same_query() {
        for (uri, want) in [
            ("/a/../b?x=%2F&y=..", "/b?x=%2F&y=.."),
            ("http://s//%61dmin?q", "http://s/admin?q"),
            ("/", "/"),
        ] {
            let (u, _) = normalized_uri(&uri.parse().unwrap()).unwrap();
            assert_eq!(u.to_string(), want, "{uri}");
        }
        assert!(normalized_uri(&"/a%2fb".parse().unwrap()).is_err());
    }
}
