//! Tier (b): gRPC↔JSON transcoding at the waypoint, in process. A client app speaks HTTP/1.1
//! JSON to a service whose backend is a real tonic gRPC server (the testbed's `Shelves`):
//! client → node A → HBONE → zmesh-waypoint (transcodes) → HBONE (HTTP/2, gRPC) → node B →
//! tonic. Also: plain gRPC to the same service through the waypoint is untouched, paths no
//! binding matches are routed as usual, hostile bodies get 400/413, policies on gRPC method
//! paths hold for transcoded calls, and a reload with a broken
//! descriptor set keeps the old config.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::http_app::{app_logged, RequestLog};
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use zmesh::config::Config;
use zmesh::identity::CertManager;
use zmesh::waypoint::server::{self as wpserver, Waypoint};
use zmesh_testbed::shelf::{self, pb};

struct Setup {
    net: u8,
    /// `html` (an HTTP/2 server that is not gRPC) and `shelf-tiny` (a 64-byte response cap).
    html: SocketAddr,
    shelf_tiny: SocketAddr,
    /// `shelf-guard`: a DENY on the gRPC path of GetShelf, an ALLOW of `/v1/*` plus the gRPC
    /// paths of GetShelf and ListBooks (not Echo).
    shelf_guard: SocketAddr,
    _mesh: Mesh,
    _dir: tempfile::TempDir,
    wp: Arc<Waypoint>,
    /// Capture entries on node A: `shelf` (ndjson streaming), `shelf-array` (array streaming).
    shelf: SocketAddr,
    shelf_array: SocketAddr,
    /// The waypoint's config text, for reloads.
    text: String,
    log: RequestLog,
}

async fn setup(net: u8) -> Setup {
    let mut mesh = Mesh::new(net);
    let dir = tempfile::tempdir().unwrap();
    let fds = dir.path().join("shelf.pb");
    std::fs::write(&fds, shelf::DESCRIPTOR_SET).unwrap();
    let vip = |n: u8| format!("127.{net}.1.{n}");
    let model = format!(
        r#"workloads:
  - {{ uid: client, name: client, namespace: shop, service_account: client, addresses: [{c}], node: node-a }}
  - {{ uid: wp, name: wp, namespace: shop, service_account: waypoint, addresses: [{w}], node: node-w }}
  - {{ uid: grpc, name: grpc, namespace: shop, service_account: shelf, addresses: [{g}], node: node-b, services: {{ shop/shelf: {{}}, shop/shelf-array: {{}}, shop/shelf-tiny: {{}}, shop/shelf-guard: {{}} }} }}
  - {{ uid: web, name: web, namespace: shop, service_account: web, addresses: [{h}], node: node-c, services: {{ shop/web: {{}}, shop/html: {{}} }} }}
services:
  - {{ name: shelf, namespace: shop, hostname: shelf, vips: [{v1}], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: shelf-array, namespace: shop, hostname: shelf-array, vips: [{v2}], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: web, namespace: shop, hostname: web, vips: [{v3}], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: html, namespace: shop, hostname: html, vips: [{v4}], ports: {{ 80: 8081 }}, waypoint: wp }}
  - {{ name: shelf-tiny, namespace: shop, hostname: shelf-tiny, vips: [{v5}], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: shelf-guard, namespace: shop, hostname: shelf-guard, vips: [{v6}], ports: {{ 80: 8080 }}, waypoint: wp }}
"#,
        c = ip(net, 2),
        w = ip(net, 5),
        g = ip(net, 3),
        h = ip(net, 4),
        v1 = vip(1),
        v2 = vip(2),
        v3 = vip(3),
        v4 = vip(4),
        v5 = vip(5),
        v6 = vip(6),
    );
    let routes = format!(
        r#"routes:
  - name: shelf
    service: shop/shelf
    grpc_transcoding:
      descriptor_set: {fds}
      services: [zmesh.test.shelf.Shelves]
      max_request_bytes: 4096
    rules:
      - timeout: 5s
      - matches: [{{ path: {{ prefix: /static }} }}]
        backends: [{{ service: shop/web }}]
  - name: shelf-array
    service: shop/shelf-array
    grpc_transcoding:
      descriptor_set: {fds}
      services: [zmesh.test.shelf.Shelves]
      streaming: array
      print: {{ use_proto_field_names: true, emit_defaults: true }}
  - name: html
    service: shop/html
    grpc_transcoding: {{ descriptor_set: {fds}, services: [zmesh.test.shelf.Shelves] }}
  - name: shelf-tiny
    service: shop/shelf-tiny
    grpc_transcoding: {{ descriptor_set: {fds}, services: [zmesh.test.shelf.Shelves], max_response_message_bytes: 64 }}
  - name: shelf-guard
    service: shop/shelf-guard
    grpc_transcoding: {{ descriptor_set: {fds}, services: [zmesh.test.shelf.Shelves] }}
http_policies:
  # Policies written on gRPC method paths hold for transcoded calls too; an ALLOW must let
  # both the REST view and the gRPC view through.
  - name: deny-getshelf
    namespace: shop
    service: shop/shelf-guard
    action: deny
    rules: [{{ to: [{{ paths: ["/zmesh.test.shelf.Shelves/GetShelf"] }}] }}]
  - name: allow-rest-and-some-grpc
    namespace: shop
    service: shop/shelf-guard
    action: allow
    rules: [{{ to: [{{ paths: ["/v1/*", "/zmesh.test.shelf.Shelves/GetShelf", "/zmesh.test.shelf.Shelves/ListBooks"] }}] }}]
"#,
        fds = fds.display()
    );
    let a = mesh.node("node-a", 2, &model).await;
    mesh.node("node-b", 3, &model).await;
    mesh.node("node-c", 4, &model).await;
    let text = node_yaml(
        net,
        "node-w",
        5,
        &mesh.ca_dir,
        &format!("waypoint: {{ workload: wp }}\n{model}{routes}"),
    );
    let mut cfg = Config::parse(&text, "waypoint").unwrap();
    cfg.node.access_log = zmesh::config::AccessLogFormat::Off;
    let (source, trust) =
        zmesh::proxy::load_certificates(&cfg, Arc::new(zmesh::identity::SystemClock)).unwrap();
    let certs = Arc::new(CertManager::with_trust(source, trust).unwrap());
    let wp = Waypoint::new(cfg, certs).unwrap();
    wpserver::start(wp.clone()).await.unwrap();
    let grpc = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    tokio::spawn(shelf::serve(grpc));
    let log = RequestLog::default();
    let web = TcpListener::bind(SocketAddr::new(ip(net, 4), 8080))
        .await
        .unwrap();
    tokio::spawn(app_logged("web", web, log.clone()));
    // An HTTP/2 server that is not gRPC: a web page for every request.
    let html = TcpListener::bind(SocketAddr::new(ip(net, 4), 8081))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = html.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let mut r =
                        http::Response::new(Full::new(Bytes::from_static(b"<html></html>")));
                    r.headers_mut()
                        .insert("content-type", "text/html".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    let entry = |addr: String| capture_to(a.clone(), ip(net, 2), addr.parse().unwrap());
    Setup {
        net,
        shelf: entry(format!("{}:80", vip(1))).await,
        shelf_array: entry(format!("{}:80", vip(2))).await,
        html: entry(format!("{}:80", vip(4))).await,
        shelf_tiny: entry(format!("{}:80", vip(5))).await,
        shelf_guard: entry(format!("{}:80", vip(6))).await,
        _mesh: mesh,
        _dir: dir,
        wp,
        text,
        log,
    }
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1(net: u8, entry: SocketAddr) -> H1 {
    let tcp = connect_from(ip(net, 2), entry).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A request whose answer must fail: `Ok` only if a complete response arrived.
async fn call_cut(c: &mut H1, path: &str) -> Result<(StatusCode, String), String> {
    c.ready().await.unwrap();
    let req = Request::get(path)
        .header("host", "api.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// One JSON request; the body as text (an error if the response was cut off).
async fn call(
    c: &mut H1,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, http::HeaderMap, Result<String, String>) {
    c.ready().await.unwrap();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "api.example")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .map_err(|e| e.to_string());
    (parts.status, parts.headers, body)
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_calls_become_grpc_calls_and_answers_become_json() {
    let s = setup(137).await;
    let mut c = h1(s.net, s.shelf).await;

    // Unary with a path-template field; int64 printed as a string, enums by name.
    let (st, h, body) = call(&mut c, Method::GET, "/v1/shelves/42", "").await;
    assert_eq!(st, StatusCode::OK, "{body:?}");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(
        parse(&body.unwrap()),
        json!({"id": "42", "theme": "shelf-42", "genre": "FICTION"})
    );
    // Query parameters: repeated, nested, enum by name, int64.
    let (st, _, body) = call(
        &mut c,
        Method::GET,
        "/v1/shelves/s1/books?authors=ann&authors=bob%20b&filter.minPages=300&filter.genre=SCIENCE",
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        parse(&body.unwrap()),
        json!({"books": [
            {"name": "shelves/s1/books/0", "author": "ann", "pages": "300", "genre": "SCIENCE"},
            {"name": "shelves/s1/books/1", "author": "bob b", "pages": "300", "genre": "SCIENCE"},
        ]})
    );
    // An additional binding of the same method.
    let (st, _, body) = call(&mut c, Method::GET, "/v1/books?pageSize=1", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(parse(&body.unwrap())["books"][0]["author"], "anon");
    // body: "shelf" and body: "*".
    let (st, _, body) = call(
        &mut c,
        Method::POST,
        "/v1/shelves",
        r#"{"theme":"sea","genre":"SCIENCE"}"#,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        parse(&body.unwrap()),
        json!({"id": "1", "theme": "sea", "genre": "SCIENCE"})
    );
    let echo = json!({"text": "hi", "count": 3, "filter": {"minPages": "9000000000"}, "numbers": ["1", "2"]});
    let (st, _, body) = call(&mut c, Method::POST, "/v1/echo", &echo.to_string()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(parse(&body.unwrap()), echo);

    // gRPC errors (tonic sends them trailers-only) map to HTTP as Google's mapping does.
    let (st, _, body) = call(&mut c, Method::GET, "/v1/shelves/1000", "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(
        parse(&body.unwrap()),
        json!({"code": 5, "message": "shelf 1000 not found"})
    );
    let (st, _, body) = call(&mut c, Method::GET, "/v1/shelves/0", "").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(parse(&body.unwrap())["code"], 3);

    // Server streaming, newline-delimited JSON, streamed as the messages come.
    let (st, h, body) = call(
        &mut c,
        Method::GET,
        "/v1/shelves/s2/books:stream?pageSize=3",
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-type"], "application/x-ndjson");
    let body = body.unwrap();
    let lines: Vec<Value> = body.lines().map(parse).collect();
    assert_eq!(lines.len(), 3, "{body}");
    assert_eq!(lines[2]["name"], "shelves/s2/books/2");
    // No messages: an empty ndjson body.
    let (st, _, body) = call(&mut c, Method::GET, "/v1/shelves/s2/books:stream", "").await;
    assert_eq!((st, body.unwrap().as_str()), (StatusCode::OK, ""));
    // A failure mid-stream: the lines so far, an error line, then the response is cut off
    // (no final chunk): never a complete-looking 200.
    let mut fresh = h1(s.net, s.shelf).await;
    let got = call_cut(
        &mut fresh,
        &format!(
            "/v1/shelves/s2/books:stream?pageSize=5&filter.minPages={}",
            shelf::FAIL_MID_STREAM
        ),
    )
    .await;
    assert!(
        got.is_err(),
        "a failed stream must not end cleanly: {got:?}"
    );

    // The same service with streaming: array and proto field names, defaults printed.
    let mut arr = h1(s.net, s.shelf_array).await;
    let (st, h, body) = call(
        &mut arr,
        Method::GET,
        "/v1/shelves/s3/books:stream?pageSize=2",
        "",
    )
    .await;
    assert_eq!(
        (st, &h["content-type"]),
        (
            StatusCode::OK,
            &"application/json".parse::<http::HeaderValue>().unwrap()
        )
    );
    let v = parse(&body.unwrap());
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(
        v[1],
        json!({"name": "shelves/s3/books/1", "author": "anon", "pages": "0", "genre": "GENRE_UNSPECIFIED"})
    );
    let (st, _, body) = call(&mut arr, Method::GET, "/v1/shelves/s3/books:stream", "").await;
    assert_eq!((st, body.unwrap().as_str()), (StatusCode::OK, "[]"));
    let mut arr2 = h1(s.net, s.shelf_array).await;
    let got = call_cut(
        &mut arr2,
        &format!(
            "/v1/shelves/s3/books:stream?pageSize=5&filter.min_pages={}",
            shelf::FAIL_MID_STREAM
        ),
    )
    .await;
    assert!(
        got.is_err(),
        "a failed array must be left unterminated and cut: {got:?}"
    );

    // Paths no binding matches are routed as usual (here to a plain HTTP app).
    let (st, _, body) = call(&mut c, Method::GET, "/static/logo.png", "").await;
    assert_eq!(
        (st, body.unwrap().as_str()),
        (StatusCode::OK, "web /static/logo.png\n")
    );
    assert!(s
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l == "GET /static/logo.png"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_is_refused_with_the_field_named_and_plain_grpc_passes_untouched() {
    let s = setup(138).await;
    let mut c = h1(s.net, s.shelf).await;
    // (body, status, text the message must hold)
    let cases: &[(&str, StatusCode, &str)] = &[
        (r#"{"count":"many"}"#, StatusCode::BAD_REQUEST, "\"count\""),
        (
            r#"{"filter":{"minPages":true}}"#,
            StatusCode::BAD_REQUEST,
            "\"filter.minPages\"",
        ),
        (
            r#"{"text":"x","colour":"red"}"#,
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (r#"{"text":"#, StatusCode::BAD_REQUEST, "invalid JSON body"),
        ("\"\u{0}\"", StatusCode::BAD_REQUEST, "invalid JSON body"),
    ];
    for (body, status, want) in cases {
        let (st, _, got) = call(&mut c, Method::POST, "/v1/echo", body).await;
        let got = got.unwrap();
        assert_eq!(st, *status, "{body}: {got}");
        let v = parse(&got);
        assert!(
            v["message"].as_str().unwrap().contains(want),
            "{body}: {got}"
        );
    }
    // Invalid UTF-8, deep nesting, an oversized body (the route caps at 4096 bytes).
    let bad_utf8 = Request::post("/v1/echo")
        .header("host", "api.example")
        .body(Full::new(Bytes::from_static(b"{\"text\":\"\xff\xfe\"}")))
        .unwrap();
    c.ready().await.unwrap();
    assert_eq!(
        c.send_request(bad_utf8).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let deep = format!("{}{}", "{\"filter\":".repeat(300), "}".repeat(300));
    assert_eq!(
        call(&mut c, Method::POST, "/v1/echo", &deep).await.0,
        StatusCode::BAD_REQUEST
    );
    let big = json!({"text": "x".repeat(5000)}).to_string();
    let mut c2 = h1(s.net, s.shelf).await;
    assert_eq!(
        call(&mut c2, Method::POST, "/v1/echo", &big).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // Query and path values of the wrong type.
    let mut c = h1(s.net, s.shelf).await;
    let (st, _, got) = call(&mut c, Method::GET, "/v1/books?pageSize=lots", "").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(got.unwrap().contains("pageSize"));
    let (st, _, got) = call(&mut c, Method::GET, "/v1/shelves/abc", "").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(got.unwrap().contains("shelf_id"));
    // Every refusal is counted.
    assert!(s.wp.rejections.count("grpc_transcoding", "invalid_json") >= 5);
    assert_eq!(
        s.wp.rejections.count("grpc_transcoding", "body_too_large"),
        1
    );
    assert_eq!(s.wp.rejections.count("grpc_transcoding", "bad_query"), 1);

    // Plain gRPC to the same service through the waypoint is not transcoded.
    let (entry, net) = (s.shelf, s.net);
    let channel = tonic::transport::Endpoint::from_static("http://shelf")
        .connect_with_connector(tower::service_fn(move |_| async move {
            connect_from(ip(net, 2), entry).await.map(TokioIo::new)
        }))
        .await
        .unwrap();
    let mut client = pb::shelves_client::ShelvesClient::new(channel);
    let got = client
        .get_shelf(pb::GetShelfRequest { shelf_id: 7 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.theme, "shelf-7");
    let err = client
        .get_shelf(pb::GetShelfRequest { shelf_id: 1001 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // A reload whose descriptor set is broken is refused, naming the route and the file;
    // the old config keeps transcoding.
    let broken = s._dir.path().join("broken.pb");
    std::fs::write(&broken, b"\xff\xff\xff").unwrap();
    let bad = s.text.replacen(
        &s._dir.path().join("shelf.pb").display().to_string(),
        &broken.display().to_string(),
        1,
    );
    let e =
        s.wp.reload(&Config::parse(&bad, "waypoint").unwrap())
            .unwrap_err()
            .to_string();
    assert!(e.contains("routes shelf") && e.contains("broken.pb"), "{e}");
    let unknown = s.text.replacen(
        "services: [zmesh.test.shelf.Shelves]",
        "services: [zmesh.test.shelf.Gone]",
        1,
    );
    let e =
        s.wp.reload(&Config::parse(&unknown, "waypoint").unwrap())
            .unwrap_err()
            .to_string();
    assert!(e.contains("zmesh.test.shelf.Gone"), "{e}");
    let (st, _, _) = call(&mut c, Method::GET, "/v1/shelves/5", "").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_grpc_or_too_large_are_502() {
    let s = setup(139).await;
    // A backend that answers HTTP/2 but not gRPC.
    let mut c = h1(s.net, s.html).await;
    let (st, _, body) = call(&mut c, Method::GET, "/v1/shelves/1", "").await;
    let body = body.unwrap();
    assert_eq!(st, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("did not answer gRPC"), "{body}");
    assert!(body.contains("text/html"), "{body}");
    // A response message over max_response_message_bytes (64): refused from its prefix.
    let mut c = h1(s.net, s.shelf_tiny).await;
    let (st, _, body) = call(&mut c, Method::GET, "/v1/shelves/1", "").await;
    assert_eq!(st, StatusCode::OK, "small answers pass: {body:?}");
    let (st, _, body) = call(&mut c, Method::GET, "/v1/books?pageSize=20", "").await;
    let body = body.unwrap();
    assert_eq!(st, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains("exceeds max_response_message_bytes (64)"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_on_grpc_method_paths_hold_for_transcoded_calls() {
    let s = setup(141).await;
    let mut c = h1(s.net, s.shelf_guard).await;
    // Both views allowed: REST `/v1/*` and gRPC ListBooks.
    let (st, _, body) = call(&mut c, Method::GET, "/v1/books?pageSize=1", "").await;
    assert_eq!(st, StatusCode::OK, "{body:?}");
    // The REST path is allowed, but the DENY on `/zmesh.test.shelf.Shelves/GetShelf` stops it.
    let (st, _, body) = call(&mut c, Method::GET, "/v1/shelves/1", "").await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body:?}");
    assert!(body.unwrap().contains("RBAC"));
    // The REST path is allowed, but no ALLOW rule names the gRPC path of Echo.
    let (st, _, body) = call(&mut c, Method::POST, "/v1/echo", r#"{"text":"hi"}"#).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body:?}");
    // A request straight to the gRPC method path meets the same DENY.
    let (st, _, _) = call(
        &mut c,
        Method::POST,
        "/zmesh.test.shelf.Shelves/GetShelf",
        "",
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}
