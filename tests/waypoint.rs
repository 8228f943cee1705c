//! Tier (b): the waypoint in process. Client app → node A (its service names a waypoint) →
//! HBONE → zmesh-waypoint → HBONE with the waypoint's identity → node B (v1) or node C (v2) →
//! HTTP apps. Every request is real HTTP over real loopback sockets.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::http_app::{app_logged, get, ChannelBody, RequestLog};
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use zmesh::config::Config;
use zmesh::identity::CertManager;
use zmesh::waypoint::jwt;
use zmesh::waypoint::server::{self as wpserver, Waypoint};

struct Setup {
    _mesh: Mesh,
    wp: Arc<Waypoint>,
    /// Capture entries on node A for: the service `s` (VIP:80), `secure`, `dead`, and v1's pod
    /// IP directly.
    s: SocketAddr,
    secure: SocketAddr,
    dead: SocketAddr,
    flappy: SocketAddr,
    tight: SocketAddr,
    raw: SocketAddr,
    banner: SocketAddr,
    v1_direct: SocketAddr,
    /// `web` declares HTTP on port 80 and denies `/admin*`; `bguard` (server-first, 9001) and
    /// `rawg` (declared TCP, echo on 9000) carry the same HTTP-only DENY.
    web: SocketAddr,
    bguard: SocketAddr,
    rawg: SocketAddr,
    /// The waypoint's HBONE listener, for CONNECTs sent to it directly.
    wp_hbone: SocketAddr,
    /// Every request the v1 and v2 apps received.
    log: RequestLog,
    /// Connections the server-first app accepted.
    banner_accepts: Arc<AtomicUsize>,
    jwt_key: Vec<u8>,
}

async fn setup(net: u8) -> Setup {
    let mut mesh = Mesh::new(net);
    let jwt_key = jwt::new_es256_key();
    let jwks = serde_json::json!({"keys": [jwt::es256_jwk(&jwt_key, "k1")]}).to_string();
    let vip = |n: u8| format!("127.{net}.1.{n}");
    let wl = |uid: &str, sa: &str, host: u8, node: &str, extra: &str| {
        format!(
            "  - {{ uid: {uid}, name: {uid}, namespace: shop, service_account: {sa}, addresses: [{}], node: {node}{extra} }}\n",
            ip(net, host)
        )
    };
    let mut model = String::from("workloads:\n");
    model += &wl("client", "client", 2, "node-a", "");
    model += &wl("wp", "waypoint", 5, "node-w", "");
    model += &wl(
        "v1",
        "s",
        3,
        "node-b",
        ", services: { shop/s: {}, shop/s-v1: {}, shop/secure: {}, shop/flappy: {}, shop/tight: {}, shop/raw: {}, shop/banner: {}, shop/web: {}, shop/bguard: {}, shop/rawg: {} }",
    );
    model += &wl(
        "v2",
        "s",
        4,
        "node-c",
        ", services: { shop/s: {}, shop/s-v2: {}, shop/flappy: {} }",
    );
    model += &wl(
        "sick",
        "s",
        6,
        "node-c",
        ", status: unhealthy, services: { shop/dead: {} }",
    );
    model += "services:\n";
    let outlier = ", traffic_policy: { outlier_detection: { consecutive_5xx: 3, base_ejection_time: 60s, max_ejection_percent: 50 } }";
    let tight = ", traffic_policy: { max_connections: 1, max_pending_requests: 0 }";
    for (name, n, extra) in [
        ("s", 1, ""),
        ("s-v1", 2, ""),
        ("s-v2", 3, ""),
        ("secure", 4, ""),
        ("dead", 5, ""),
        ("flappy", 6, outlier),
        ("tight", 7, tight),
        ("raw", 8, ""),
        ("banner", 9, ""),
        ("web", 10, ", app_protocols: { 80: http }"),
        ("bguard", 11, ""),
        ("rawg", 12, ", app_protocols: { 80: tcp }"),
    ] {
        model += &format!(
            "  - {{ name: {name}, namespace: shop, hostname: {name}, vips: [{}], ports: {{ 80: 8080 }}, waypoint: wp{extra} }}\n",
            vip(n)
        );
    }
    // `raw` declares TCP (an echo on 9000); `banner` declares nothing and its server speaks
    // first (9001): the sniff times out and the bytes are relayed as TCP.
    model = model
        .replace(
            "name: raw, namespace: shop, hostname: raw, vips: [127.",
            "name: raw, namespace: shop, hostname: raw, app_protocols: { 80: tcp }, vips: [127.",
        )
        .replace(
            &format!("vips: [{}], ports: {{ 80: 8080 }}", vip(8)),
            &format!("vips: [{}], ports: {{ 80: 9000 }}", vip(8)),
        )
        .replace(
            &format!("vips: [{}], ports: {{ 80: 8080 }}", vip(9)),
            &format!("vips: [{}], ports: {{ 80: 9001 }}", vip(9)),
        )
        .replace(
            &format!("vips: [{}], ports: {{ 80: 8080 }}", vip(11)),
            &format!("vips: [{}], ports: {{ 80: 9001 }}", vip(11)),
        )
        .replace(
            &format!("vips: [{}], ports: {{ 80: 8080 }}", vip(12)),
            &format!("vips: [{}], ports: {{ 80: 9000 }}", vip(12)),
        );
    // Only the waypoint may call the v1/v2 apps: proof that the destination sees ITS identity.
    let dst_policy = "policies:\n  - name: only-waypoint\n    namespace: shop\n    scope: { workload_selector: { workloads: [v1, v2] } }\n    action: allow\n    rules:\n      - clauses:\n          - matches:\n              - principals: [\"cluster.local/ns/shop/sa/waypoint\"]\n";
    let routes = format!(
        r#"routes:
  - name: s
    service: shop/s
    rules:
      - backends: [{{ service: shop/s-v1, weight: 80 }}, {{ service: shop/s-v2, weight: 20 }}]
      - matches: [{{ path: {{ prefix: /v2 }} }}]
        backends: [{{ service: shop/s-v2 }}]
      - matches: [{{ path: {{ prefix: /fail-once }} }}]
        backends: [{{ service: shop/s-v1 }}]
        retries: {{ attempts: 2, on: [5xx] }}
      - matches: [{{ path: {{ exact: /slow }} }}]
        backends: [{{ service: shop/s-v1 }}]
        timeout: 300ms
      - matches: [{{ path: {{ exact: /slow }}, headers: [{{ name: x-per-try, exact: "1" }}] }}]
        backends: [{{ service: shop/s-v1 }}]
        retries: {{ attempts: 2, per_try_timeout: 150ms, on: [5xx] }}
      - matches: [{{ path: {{ exact: /delayed }} }}]
        fault: {{ delay: {{ percent: 100, fixed: 200ms }} }}
        backends: [{{ service: shop/s-v1 }}]
      - matches: [{{ path: {{ exact: /flaky }} }}]
        fault: {{ abort: {{ percent: 50, status: 503 }} }}
        backends: [{{ service: shop/s-v1 }}]
      - matches: [{{ path: {{ prefix: /old }} }}]
        rewrite: {{ path: /new }}
        request_headers: {{ set: {{ x-rewritten: "yes" }} }}
        response_headers: {{ add: {{ x-via: waypoint }} }}
        backends: [{{ service: shop/s-v1 }}]
      - matches: [{{ path: {{ exact: /moved }} }}]
        redirect: {{ path: /elsewhere, status: 301 }}
http_policies:
  - name: deny-admin
    namespace: shop
    service: shop/s
    action: deny
    rules: [{{ to: [{{ paths: ["/admin*"] }}] }}]
  - name: deny-admin-web
    namespace: shop
    service: shop/web
    action: deny
    rules: [{{ to: [{{ paths: ["/admin*"] }}] }}]
  - name: deny-admin-bguard
    namespace: shop
    service: shop/bguard
    action: deny
    rules: [{{ to: [{{ paths: ["/admin*"] }}] }}]
  - name: deny-admin-rawg
    namespace: shop
    service: shop/rawg
    action: deny
    rules: [{{ to: [{{ paths: ["/admin*"] }}] }}]
request_authentication:
  - name: secure-jwt
    service: shop/secure
    issuer: https://issuer.test
    audiences: [shop]
    jwks: '{jwks}'
    required: true
    claims_to_headers: {{ sub: x-jwt-sub }}
"#
    );
    // Node B and C carry the destination policy; A and the waypoint share the model.
    let a = mesh.node("node-a", 2, &model).await;
    mesh.node("node-b", 3, &format!("{model}{dst_policy}"))
        .await;
    mesh.node("node-c", 4, &format!("{model}{dst_policy}"))
        .await;
    let text = node_yaml(
        net,
        "node-w",
        5,
        &mesh.ca_dir,
        &format!("waypoint: {{ workload: wp }}\n{model}{routes}"),
    );
    let mut cfg = Config::parse(&text, "waypoint").unwrap();
    // Thousands of requests: their access lines would bury the test results.
    cfg.node.access_log = zmesh::config::AccessLogFormat::Off;
    let (source, trust) =
        zmesh::proxy::load_certificates(&cfg, Arc::new(zmesh::identity::SystemClock)).unwrap();
    let certs = Arc::new(CertManager::with_trust(source, trust).unwrap());
    let wp = Waypoint::new(cfg, certs).unwrap();
    let (wp_hbone, _) = wpserver::start(wp.clone()).await.unwrap();
    spawn_echo(
        TcpListener::bind(SocketAddr::new(ip(net, 3), 9000))
            .await
            .unwrap(),
    );
    let banner = TcpListener::bind(SocketAddr::new(ip(net, 3), 9001))
        .await
        .unwrap();
    let banner_accepts = Arc::new(AtomicUsize::new(0));
    let accepts = banner_accepts.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = banner.accept().await {
            accepts.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                s.write_all(b"220 server speaks first\r\n").await.unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let log = RequestLog::default();
    for (v, host) in [("v1", 3), ("v2", 4)] {
        let l = TcpListener::bind(SocketAddr::new(ip(net, host), 8080))
            .await
            .unwrap();
        tokio::spawn(app_logged(v, l, log.clone()));
    }
    let entry = |addr: String| capture_to(a.clone(), ip(net, 2), addr.parse().unwrap());
    Setup {
        s: entry(format!("{}:80", vip(1))).await,
        secure: entry(format!("{}:80", vip(4))).await,
        dead: entry(format!("{}:80", vip(5))).await,
        flappy: entry(format!("{}:80", vip(6))).await,
        tight: entry(format!("{}:80", vip(7))).await,
        raw: entry(format!("{}:80", vip(8))).await,
        banner: entry(format!("{}:80", vip(9))).await,
        v1_direct: entry(format!("{}:8080", ip(net, 3))).await,
        web: entry(format!("{}:80", vip(10))).await,
        bguard: entry(format!("{}:80", vip(11))).await,
        rawg: entry(format!("{}:80", vip(12))).await,
        wp_hbone,
        log,
        banner_accepts,
        _mesh: mesh,
        wp,
        jwt_key,
    }
}

/// One keep-alive HTTP/1.1 connection from the client app.
async fn h1(net: u8, entry: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = connect_from(ip(net, 2), entry).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_weights_paths_and_policy_through_the_waypoint() {
    let net = 51;
    let s = setup(net).await;
    let mut c = h1(net, s.s).await;

    // 80/20 by weight, balanced per request on ONE keep-alive connection.
    let mut v1 = 0;
    for _ in 0..1000 {
        let (st, h, _) = get(&mut c, "s", "/", &[]).await;
        assert_eq!(st, StatusCode::OK);
        if h["x-version"] == "v1" {
            v1 += 1;
        }
    }
    assert!(
        (750..=850).contains(&v1),
        "v1 got {v1} of 1000 (want 800 ± 50)"
    );

    // A path rule sends /v2/* to v2 only.
    for _ in 0..50 {
        let (st, h, body) = get(&mut c, "s", "/v2/items", &[]).await;
        assert_eq!(
            (st, &h["x-version"]),
            (StatusCode::OK, &"v2".parse::<http::HeaderValue>().unwrap())
        );
        assert_eq!(body, "v2 /v2/items\n");
    }
    // L7 deny: 403 with a body; an allowed path on the same connection is still served.
    let (st, _, body) = get(&mut c, "s", "/admin/users", &[]).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied\n")
    );
    assert_eq!(get(&mut c, "s", "/", &[]).await.0, StatusCode::OK);
    // Rewrite, request and response header ops; redirect.
    let (st, h, body) = get(&mut c, "s", "/old/page", &[]).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "v1 /new/page\n"));
    assert_eq!(h["x-via"], "waypoint");
    let (st, h, _) = get(&mut c, "s", "/moved", &[]).await;
    assert_eq!(st, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(h["location"], "http://s/elsewhere");
    // A host the mesh does not know is a request to the CONNECT target, judged by its policies;
    // a host naming another service is misdirected (421). The connection goes on.
    assert_eq!(
        get(&mut c, "nope.example", "/", &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&mut c, "nope.example", "/admin", &[]).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(&mut c, "s-v2", "/", &[]).await.0,
        StatusCode::MISDIRECTED_REQUEST
    );
    // Trace context: the caller's trace id is kept, with a new span id for the hop.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (_, h, _) = get(&mut c, "s", "/", &[("traceparent", parent)]).await;
    let got = h["x-got-traceparent"].to_str().unwrap();
    assert!(
        got.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{got}"
    );
    assert!(!got.contains("b7ad6b7169203331"), "a new span id: {got}");

    // Metrics counted every request with Istio's labels.
    let m = s.wp.metrics_text();
    assert!(
        m.contains("istio_requests_total{reporter=\"waypoint\""),
        "{m}"
    );
    assert!(m.contains("response_code=\"403\""), "{m}");
    assert!(
        m.contains("destination_principal=\"spiffe://cluster.local/ns/shop/sa/s\""),
        "{m}"
    );
    // Every request series carries Istio's standard request labels: the node's TCP peer
    // labels (ztunnel's order) with Istio's request labels (docs/telemetry.md "Requests").
    let want: Vec<&str> = "reporter source_workload source_canonical_service \
        source_canonical_revision source_workload_namespace source_principal source_app \
        source_version source_cluster destination_service destination_service_namespace \
        destination_service_name destination_workload destination_canonical_service \
        destination_canonical_revision destination_workload_namespace destination_principal \
        destination_app destination_version destination_cluster request_protocol response_code \
        grpc_response_status response_flags connection_security_policy"
        .split_whitespace()
        .collect();
    let series: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    assert!(!series.is_empty(), "{m}");
    for l in series {
        let inner = &l[l.find('{').unwrap() + 1..l.rfind('}').unwrap()];
        // No label value here holds `",`: splitting on it separates the labels.
        let names: Vec<&str> = inner
            .split("\",")
            .map(|kv| kv.split('=').next().unwrap())
            .collect();
        assert_eq!(names, want, "{l}");
        assert!(
            l.contains("source_workload=\"client\""),
            "the workload's name: {l}"
        );
        assert!(l.contains("source_cluster=\"Kubernetes\""), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_timeouts_and_fault_injection() {
    let net = 52;
    let s = setup(net).await;
    let mut c = h1(net, s.s).await;
    // The app fails each id's first try; the retry turns it into 200.
    for id in 0..20 {
        let (st, _, body) = get(&mut c, "s", &format!("/fail-once/{id}"), &[]).await;
        assert_eq!(
            (st, body),
            (StatusCode::OK, format!("v1 /fail-once/{id}\n"))
        );
    }
    // The route's 300 ms timeout answers 504 (the app would take 2 s).
    let t = Instant::now();
    let (st, _, _) = get(&mut c, "s", "/slow", &[]).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // Per-try timeouts: three tries of 150 ms each, then 504.
    let t = Instant::now();
    assert_eq!(
        get(&mut c, "s", "/slow", &[("x-per-try", "1")]).await.0,
        StatusCode::GATEWAY_TIMEOUT
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // A 100% delay fault holds the request for its 200 ms, then serves it.
    let t = Instant::now();
    assert_eq!(get(&mut c, "s", "/delayed", &[]).await.0, StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    // 50% aborts.
    let mut aborted = 0;
    for _ in 0..1000 {
        let (st, _, _) = get(&mut c, "s", "/flaky", &[]).await;
        if st == StatusCode::SERVICE_UNAVAILABLE {
            aborted += 1;
        } else {
            assert_eq!(st, StatusCode::OK);
        }
    }
    assert!(
        (430..=570).contains(&aborted),
        "{aborted} of 1000 aborted (want 500 ± 70)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_identity_and_bad_input() {
    let net = 53;
    let s = setup(net).await;
    let mut c = h1(net, s.secure).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = jwt::sign_es256(
        &s.jwt_key,
        "k1",
        &serde_json::json!({"iss": "https://issuer.test", "sub": "alice", "aud": "shop", "exp": now + 600}),
    );
    let forged = jwt::sign_es256(
        &jwt::new_es256_key(),
        "k1",
        &serde_json::json!({"iss": "https://issuer.test", "sub": "mallory", "aud": "shop", "exp": now + 600}),
    );
    assert_eq!(
        get(&mut c, "secure", "/", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
    let bad = format!("Bearer {forged}");
    assert_eq!(
        get(&mut c, "secure", "/", &[("authorization", &bad)])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let ok = format!("Bearer {good}");
    let (st, h, _) = get(&mut c, "secure", "/", &[("authorization", &ok)]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        h["x-got-sub"], "alice",
        "claims reach the backend as headers"
    );
    // A client's own copy of a claim header never reaches the backend: with a valid token
    // that has no `sub`, the header the client sent is removed, not passed on.
    let no_sub = jwt::sign_es256(
        &s.jwt_key,
        "k1",
        &serde_json::json!({"iss": "https://issuer.test", "aud": "shop", "exp": now + 600}),
    );
    let no_sub = format!("Bearer {no_sub}");
    let (st, h, _) = get(
        &mut c,
        "secure",
        "/",
        &[("authorization", &no_sub), ("x-jwt-sub", "admin")],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        h.get("x-got-sub"),
        None,
        "a forged claim header got through"
    );

    // The destination nodes allow only the waypoint's identity: going straight to v1's pod IP
    // (no waypoint on the workload) is refused, so the waypoint path is the only one.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let refused = async {
        // The reset can surface at connect, on the write or on the read.
        let mut direct = connect_from(ip(net, 2), s.v1_direct).await?;
        direct
            .write_all(b"GET / HTTP/1.1\r\nhost: v1\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        direct.read(&mut buf).await
    };
    let r = tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .unwrap();
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client's own identity is refused by node B: {r:?}"
    );

    // No healthy endpoint: 503.
    let mut d = h1(net, s.dead).await;
    assert_eq!(
        get(&mut d, "dead", "/", &[]).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Malformed HTTP gets 400 and the connection closes; other clients are unaffected.
    let mut raw = connect_from(ip(net, 2), s.s).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Oversize headers get 431.
    let mut raw = connect_from(ip(net, 2), s.s).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nhost: s\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = raw.write_all(big.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let mut c2 = h1(net, s.s).await;
    assert_eq!(get(&mut c2, "s", "/", &[]).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_keep_trailers() {
    let net = 54;
    let s = setup(net).await;
    let tcp = connect_from(ip(net, 2), s.s).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, ChannelBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for frames in [1usize, 20] {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = Request::post("http://s/echo.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(ChannelBody(rx))
            .unwrap();
        send.ready().await.unwrap();
        let resp = send.send_request(req);
        let writer = tokio::spawn(async move {
            for i in 0..frames {
                tx.send(Frame::data(Bytes::from(format!("msg{i};"))))
                    .await
                    .unwrap();
            }
        });
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let collected = resp.into_body().collect().await.unwrap();
        writer.await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers arrive");
        assert_eq!(trailers["grpc-status"], "0");
        let want: String = (0..frames).map(|i| format!("msg{i};")).collect();
        assert_eq!(
            collected.to_bytes(),
            Bytes::from(want),
            "{frames} messages echoed"
        );
    }
    // Recorded with the status from the trailers, as gRPC, with the bytes actually streamed.
    // The two calls may have gone to different versions (80/20), so sum over label sets.
    let m = s.wp.metrics_text();
    let total = |prefix: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with(prefix) && l.contains("request_protocol=\"grpc\""))
            .map(|l| {
                assert!(l.contains("grpc_response_status=\"0\""), "{l}");
                l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
            })
            .sum()
    };
    assert_eq!(total("istio_requests_total{"), 2.0, "{m}");
    // "msg0;" (5 bytes) + 20 messages: 10 of 5 bytes and 10 of 6 = 5 + 110.
    assert_eq!(total("istio_response_bytes_sum{"), 115.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaking_and_outlier_ejection() {
    let net = 55;
    let s = setup(net).await;
    // v2 fails every /flap: after 3 consecutive 5xx it is ejected and only v1 answers.
    let mut c = h1(net, s.flappy).await;
    let mut failures = 0;
    for _ in 0..40 {
        if get(&mut c, "flappy", "/flap", &[]).await.0 != StatusCode::OK {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "exactly the 3 failures that ejected v2");
    for _ in 0..50 {
        let (st, h, _) = get(&mut c, "flappy", "/flap", &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h["x-version"], "v1");
    }

    // One connection's worth of capacity and no queue: a second concurrent request is refused
    // at once with 503 while the first is still being served.
    let mut first = h1(net, s.tight).await;
    let slow = tokio::spawn(async move { get(&mut first, "tight", "/slow", &[]).await.0 });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = h1(net, s.tight).await;
    let t = Instant::now();
    let (st, _, body) = get(&mut second, "tight", "/", &[]).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "upstream overflow\n")
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refused without waiting"
    );
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    // With the slot free again, requests pass.
    assert_eq!(get(&mut second, "tight", "/", &[]).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_by_declaration_and_by_sniffing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let net = 56;
    let s = setup(net).await;
    // Declared TCP: bytes that happen to look like HTTP are relayed untouched.
    let mut c = connect_from(ip(net, 2), s.raw).await.unwrap();
    let msg = b"GET / HTTP/1.1\r\nthis is not parsed\r\n\r\n";
    assert_eq!(exchange(&mut c, msg).await, msg);
    // Undeclared, server speaks first: after the sniff timeout the bytes flow as TCP.
    let mut c = connect_from(ip(net, 2), s.banner).await.unwrap();
    let mut banner = [0u8; 25];
    c.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"220 server speaks first\r\n");
    c.write_all(b"EHLO\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    c.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"EHLO\r\n");
}

/// An HTTP/2 (prior knowledge) connection from the client app to `entry`.
async fn h2c(net: u8, entry: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = connect_from(ip(net, 2), entry).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// One HTTP/2 GET with `authority` as `:authority` (and no Host header).
async fn get2(
    c: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> StatusCode {
    c.ready().await.unwrap();
    let mut req = Request::get(format!("http://{authority}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

/// A CONNECT sent straight to the waypoint by the client's identity (what a node sends when
/// a pod IP is the destination), as a byte stream.
async fn connect_direct(s: &Setup, target: SocketAddr) -> zmesh::hbone::io::H2Io {
    let client = zmesh::identity::SpiffeId::new("cluster.local", "shop", "client").unwrap();
    let wp = zmesh::identity::SpiffeId::new("cluster.local", "shop", "waypoint").unwrap();
    let mut send = hbone(&s._mesh.ca_dir, &client, &wp, s.wp_hbone)
        .await
        .unwrap();
    let (resp, stream) = send
        .send_request(connect_req(&target.to_string()), false)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "CONNECT {target}");
    zmesh::hbone::io::H2Io::new(stream, resp.into_body())
}

/// Requests that ended at the backend with a path the `/admin*` DENY was meant to stop.
fn admin_leaks(log: &RequestLog) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|l| {
            let path = l.split_once(' ').map_or("", |(_, p)| p);
            let path = path.split('?').next().unwrap_or("");
            zmesh::waypoint::l7::normalize_path(path).map_or(true, |p| p.starts_with("/admin"))
        })
        .cloned()
        .collect()
}

/// Finding 5 (Host bypass): every form of Host / `:authority`, over HTTP/1.1 and HTTP/2, to a
/// sniffed port, a declared-HTTP port and a pod IP. `GET /admin` without a JWT gets the CONNECT
/// target's answer (403 by its DENY, or 401 where a JWT is required) or 421 for a host that
/// names another service or workload, never 200; the backends see none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_forms_never_escape_the_targets_policies() {
    let net = 57;
    let s = setup(net).await;
    let vip = |n: u8| format!("127.{net}.1.{n}");
    let pod = |h: u8| ip(net, h).to_string();
    let (deny, jwt, wrong) = (
        StatusCode::FORBIDDEN,
        StatusCode::UNAUTHORIZED,
        StatusCode::MISDIRECTED_REQUEST,
    );
    // Hosts that name nothing of the mesh, or the target, or one of its endpoints.
    let neutral = |target: &str, vip: &str| -> Vec<String> {
        vec![
            pod(3), // a backend's pod IP: the live bypass of finding 5
            vip.to_string(),
            format!("{vip}:80"),
            target.to_string(),
            format!("{target}:80"),
            format!("{target}.shop"),
            format!("{target}.shop.svc"),
            format!("{}.SHOP.", target.to_uppercase()),
            format!("{}:8080", pod(3)),
            "evil.example".into(),
            "10.99.99.99".into(),
        ]
    };
    let others = |also: &[String]| -> Vec<String> {
        let mut v = vec![
            pod(2), // the caller's own address
            format!("{}:1234", pod(2)),
            pod(5), // the waypoint
            pod(6), // an unrelated workload
            "s-v2".into(),
            "s-v2.shop".into(),
            vip(3), // s-v2's VIP
        ];
        v.extend_from_slice(also);
        v
    };
    // (label, neutral hosts and their answer, misdirected hosts)
    let s_neutral = neutral("s", &vip(1));
    let web_neutral = neutral("web", &vip(10));
    let web_others = others(&["s".into(), vip(1), pod(4)]);
    let s_others = others(&["secure".into(), vip(4)]);

    // HTTP/1.1 and HTTP/2 through node A's capture, to the sniffed `s` and the declared `web`.
    for (entry, ok_hosts, bad_hosts) in [
        (s.s, &s_neutral, &s_others),
        (s.web, &web_neutral, &web_others),
    ] {
        let mut c1 = h1(net, entry).await;
        let mut c2 = h2c(net, entry).await;
        for host in ok_hosts.iter().chain([&"!!garbage!!".to_string()]) {
            assert_eq!(
                get(&mut c1, host, "/admin", &[]).await.0,
                deny,
                "HTTP/1.1 {host}"
            );
        }
        for host in ok_hosts {
            assert_eq!(
                get2(&mut c2, host, "/admin", &[]).await,
                deny,
                "HTTP/2 {host}"
            );
        }
        for host in bad_hosts {
            assert_eq!(
                get(&mut c1, host, "/admin", &[]).await.0,
                wrong,
                "HTTP/1.1 {host}"
            );
            assert_eq!(
                get2(&mut c2, host, "/admin", &[]).await,
                wrong,
                "HTTP/2 {host}"
            );
        }
        // No Host at all (HTTP/1.0 style) is the target too.
        c1.ready().await.unwrap();
        let resp = c1
            .send_request(
                Request::get("/admin")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), deny, "no Host");
        resp.into_body().collect().await.unwrap();
        // The target still serves what its policies allow.
        assert_eq!(
            get(&mut c1, "evil.example", "/", &[]).await.0,
            StatusCode::OK
        );
    }

    // A CONNECT to v1's pod IP is judged by every service v1 backs: `secure` requires a JWT.
    let pod_neutral: Vec<String> = [
        pod(3),
        format!("{}:8080", pod(3)),
        "s".into(),
        "secure".into(),
        vip(1),
        pod(4), // v2 backs `s` with v1
        "evil.example".into(),
    ]
    .into();
    let pod_others = others(&[]);
    let target: SocketAddr = format!("{}:8080", pod(3)).parse().unwrap();
    let (mut c1, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(
        connect_direct(&s, target).await,
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    let (mut c2, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(connect_direct(&s, target).await))
        .await
        .unwrap();
    tokio::spawn(conn);
    for host in &pod_neutral {
        assert_eq!(
            get(&mut c1, host, "/admin", &[]).await.0,
            jwt,
            "HTTP/1.1 {host}"
        );
        assert_eq!(
            get2(&mut c2, host, "/admin", &[]).await,
            jwt,
            "HTTP/2 {host}"
        );
    }
    for host in &pod_others {
        assert_eq!(
            get(&mut c1, host, "/admin", &[]).await.0,
            wrong,
            "HTTP/1.1 {host}"
        );
        assert_eq!(
            get2(&mut c2, host, "/admin", &[]).await,
            wrong,
            "HTTP/2 {host}"
        );
    }
    // With a valid token: `s`'s DENY still holds, and an allowed request reaches the pod that
    // was addressed (v1), whatever service the Host names.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = jwt::sign_es256(
        &s.jwt_key,
        "k1",
        &serde_json::json!({"iss": "https://issuer.test", "sub": "alice", "aud": "shop", "exp": now + 600}),
    );
    let auth = format!("Bearer {token}");
    let bearer = [("authorization", auth.as_str())];
    assert_eq!(get(&mut c1, "s", "/admin", &bearer).await.0, deny);
    assert_eq!(get2(&mut c2, &pod(3), "/admin", &bearer).await, deny);
    for _ in 0..20 {
        let (st, h, body) = get(&mut c1, "s", "/", &bearer).await;
        assert!(h.contains_key("x-version"), "{st} {body}");
        assert_eq!(
            (st, &h["x-version"]),
            (StatusCode::OK, &"v1".parse::<http::HeaderValue>().unwrap())
        );
    }

    assert_eq!(
        admin_leaks(&s.log),
        Vec::<String>::new(),
        "reached a backend"
    );
}

/// Finding 6: `DENY /admin*` holds for every spelling of the path over HTTP/1.1 and HTTP/2, on
/// sniffed and declared-HTTP ports; escaped slashes are refused (400); the backend receives the
/// normalized path with the query unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_before_policy_and_forwarding() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let net = 58;
    let s = setup(net).await;
    let denied = [
        "/admin",
        "//admin",
        "///admin",
        "/./admin",
        "/x/../admin",
        "/x/..//admin",
        "/%61dmin",
        "/%61%64%6D%69%6e",
        "/%2e/admin",
        "/%2E%2e/admin",
        "/ok/%2e%2e/admin",
        "/ok/../../admin",
        "/admin/",
        "/admin/./x",
        "/.//admin//x",
    ];
    let refused = [
        "/ok/..%2Fadmin",
        "/ok/..%2fadmin",
        "/%2Fadmin",
        "/ok%5C..%5Cadmin",
        "/ok/%zz",
    ];
    for (entry, host) in [(s.s, "s"), (s.web, "web")] {
        let mut c1 = h1(net, entry).await;
        let mut c2 = h2c(net, entry).await;
        for p in denied {
            assert_eq!(
                get(&mut c1, host, p, &[]).await.0,
                StatusCode::FORBIDDEN,
                "HTTP/1.1 {p}"
            );
            assert_eq!(
                get2(&mut c2, host, p, &[]).await,
                StatusCode::FORBIDDEN,
                "HTTP/2 {p}"
            );
        }
        for p in refused {
            assert_eq!(
                get(&mut c1, host, p, &[]).await.0,
                StatusCode::BAD_REQUEST,
                "HTTP/1.1 {p}"
            );
            assert_eq!(
                get2(&mut c2, host, p, &[]).await,
                StatusCode::BAD_REQUEST,
                "HTTP/2 {p}"
            );
        }
    }
    // The absolute form and the asterisk form, as raw HTTP/1.1.
    for (raw, want) in [
        (
            "GET http://s/%61dmin HTTP/1.1\r\nhost: s\r\n\r\n",
            "HTTP/1.1 403",
        ),
        (
            "GET http://s//admin?x=1 HTTP/1.1\r\nhost: s\r\n\r\n",
            "HTTP/1.1 403",
        ),
        ("OPTIONS * HTTP/1.1\r\nhost: s\r\n\r\n", "HTTP/1.1 400"),
    ] {
        let mut c = connect_from(ip(net, 2), s.s).await.unwrap();
        c.write_all(raw.as_bytes()).await.unwrap();
        let mut got = vec![0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&got), want, "{raw:?}");
    }
    // What was judged is what the backend gets: normalized path, query untouched.
    s.log.lock().unwrap().clear();
    let mut c1 = h1(net, s.s).await;
    let (st, _, body) = get(&mut c1, "s", "/x/../ok//%7Eu/./v%3f?a=%2F&b=..%2f", &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(body.ends_with(" /ok/~u/v%3F\n"), "{body}");
    let mut c2 = h2c(net, s.s).await;
    assert_eq!(
        get2(&mut c2, "s", "/%2e/ok//x/..?q=/../admin", &[]).await,
        StatusCode::OK
    );
    assert_eq!(
        *s.log.lock().unwrap(),
        vec![
            "GET /ok/~u/v%3F?a=%2F&b=..%2f".to_string(),
            "GET /ok/?q=/../admin".to_string()
        ]
    );
    assert_eq!(
        admin_leaks(&s.log),
        Vec::<String>::new(),
        "reached a backend"
    );
}

/// Connects from the client app to `entry`, waits `after`, writes `data` (when given), and
/// expects the connection to be reset with nothing received. The reset may surface at connect
/// (it can beat the connect's completion check), on the write or on the read.
async fn assert_reset(net: u8, entry: SocketAddr, after: Duration, data: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let reset = std::io::ErrorKind::ConnectionReset;
    let mut c = match connect_from(ip(net, 2), entry).await {
        Ok(c) => c,
        Err(e) => return assert_eq!(e.kind(), reset, "{e}"),
    };
    tokio::time::sleep(after).await;
    if !data.is_empty() {
        if let Err(e) = c.write_all(data).await {
            return assert_eq!(e.kind(), reset, "{e}");
        }
    }
    assert_cut(&mut c).await;
}

/// Finding 5 (sniffer bypass): traffic to a service with HTTP-only policies or a required JWT
/// that is relayed as TCP gets the TCP reading of those policies and is reset, never relayed:
/// a client that speaks after the sniff timeout, a non-HTTP client, a server-first protocol, a
/// declared-TCP port. A service without HTTP-only rules still relays TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_to_a_service_with_http_policies_is_never_relayed_unjudged() {
    use tokio::io::AsyncReadExt;
    let net = 59;
    let s = setup(net).await;
    let slow = b"GET /admin HTTP/1.1\r\nhost: s\r\n\r\n";
    // Slow clients: past the sniff timeout, then HTTP. `s` has a DENY on a path, `secure` a
    // required JWT.
    for entry in [s.s, s.secure] {
        assert_reset(net, entry, Duration::from_millis(500), slow).await;
    }
    // A client that is not HTTP at all (a TLS record header).
    assert_reset(net, s.s, Duration::ZERO, b"\x16\x03\x01\x00\x05hello").await;
    // Server-first, with a DENY on a path: no banner, and the server never sees a connection.
    assert_reset(net, s.bguard, Duration::ZERO, b"").await;
    // Declared TCP, with a DENY on a path: no echo.
    assert_reset(net, s.rawg, Duration::ZERO, b"GET /admin HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        s.banner_accepts.load(Ordering::SeqCst),
        0,
        "nothing dialed for a denied flow"
    );
    assert_eq!(
        admin_leaks(&s.log),
        Vec::<String>::new(),
        "reached a backend"
    );

    // Without HTTP-only rules TCP is still relayed: the unguarded server-first app and echo.
    let mut c = connect_from(ip(net, 2), s.banner).await.unwrap();
    let mut banner = [0u8; 25];
    c.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"220 server speaks first\r\n");
    assert_eq!(s.banner_accepts.load(Ordering::SeqCst), 1);
    let mut c = connect_from(ip(net, 2), s.raw).await.unwrap();
    assert_eq!(exchange(&mut c, b"plain bytes").await, b"plain bytes");
    // And a prompt HTTP client of the guarded service is judged per request as before.
    let mut c = h1(net, s.s).await;
    assert_eq!(get(&mut c, "s", "/", &[]).await.0, StatusCode::OK);
    assert_eq!(
        get(&mut c, "s", "/admin", &[]).await.0,
        StatusCode::FORBIDDEN
    );
}
