//! Tier (c): the waypoint with real processes in network namespaces. Three node namespaces on
//! one bridge: node 1 runs zmesh-node with pod A (capture rules installed), node 2 runs
//! zmesh-waypoint, node 3 runs zmesh-node with v1 and v2 of service S (inbound capture on the
//! app port). Pod A's app dials S's VIP like any address; the capture rules, node 1's tunnel, the
//! waypoint and node 3's tunnel do the rest.
//!
//! The attack test (issue #11 findings 5 and 6) sends, from pod A, requests meant to slip past
//! the waypoint's L7 policy: a Host or HTTP/2 `:authority` naming a pod IP, pod A's own IP or
//! another service; every spelling of `/admin` a backend might decode; a client that speaks
//! only after the sniff timeout, and one that is not HTTP. It counts what the backends receive.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::http_app::{app_logged, get, ChannelBody, RequestLog};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use zmesh::waypoint::jwt;
use zmesh_testbed::three::{ThreeNodes, N1_IP as A, N3_IP as V1, N3_IP2 as V2, WAYPOINT_IP as WP};
use zmesh_testbed::{is_root, Netns};

const NODE: &str = env!("CARGO_BIN_EXE_zmesh-node");
const WAYPOINT: &str = env!("CARGO_BIN_EXE_zmesh-waypoint");
const S_VIP: &str = "10.96.18.1";
const SECURE_VIP: &str = "10.96.18.4";
const DEAD_VIP: &str = "10.96.18.5";
/// Declares HTTP on port 80 (no sniffing); v1 backs it; it denies `/admin*`.
const WEB_VIP: &str = "10.96.18.6";

struct Topology {
    nodes: ThreeNodes,
    jwt_key: Vec<u8>,
}

fn config(node: &str, bind: &str, jwks: &str, extra: &str) -> String {
    format!(
        r#"node:
  name: {node}
  bind: {bind}
  access_log: json
  certificates: {{ file_ca: {{ dir: CA_DIR }} }}
{extra}workloads:
  - {{ uid: a, name: pod-a, namespace: shop, service_account: client, addresses: [{A}], node: n1 }}
  - {{ uid: wp, name: waypoint, namespace: shop, service_account: waypoint, addresses: [{WP}], node: n2 }}
  - {{ uid: v1, name: s-v1, namespace: shop, service_account: s, addresses: [{V1}], node: n3, services: {{ shop/s: {{}}, shop/s-v1: {{}}, shop/secure: {{}}, shop/web: {{}} }} }}
  - {{ uid: v2, name: s-v2, namespace: shop, service_account: s, addresses: [{V2}], node: n3, services: {{ shop/s: {{}}, shop/s-v2: {{}} }} }}
  - {{ uid: sick, name: sick, namespace: shop, service_account: s, addresses: [10.218.0.99], node: n3, status: unhealthy, services: {{ shop/dead: {{}} }} }}
services:
  - {{ name: s, namespace: shop, hostname: s, vips: [{S_VIP}], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: s-v1, namespace: shop, hostname: s-v1, vips: [10.96.18.2], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: s-v2, namespace: shop, hostname: s-v2, vips: [10.96.18.3], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: secure, namespace: shop, hostname: secure, vips: [{SECURE_VIP}], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: dead, namespace: shop, hostname: dead, vips: [{DEAD_VIP}], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: web, namespace: shop, hostname: web, vips: [{WEB_VIP}], ports: {{ 80: 8080 }}, app_protocols: {{ 80: http }}, waypoint: wp }}
policies:
  - name: only-waypoint
    namespace: shop
    scope: {{ workload_selector: {{ workloads: [s-v1, s-v2] }} }}
    action: allow
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/shop/sa/waypoint"]
routes:
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
        timeout: 1s
      - matches: [{{ path: {{ exact: /flaky }} }}]
        fault: {{ abort: {{ percent: 50, status: 503 }} }}
        backends: [{{ service: shop/s-v1 }}]
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
request_authentication:
  - name: secure-jwt
    service: shop/secure
    issuer: https://issuer.test
    jwks: '{jwks}'
    required: true
"#
    )
}

fn start() -> Topology {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root"
    );
    let jwt_key = jwt::new_es256_key();
    let jwks = serde_json::json!({"keys": [jwt::es256_jwk(&jwt_key, "k1")]}).to_string();
    let nodes = ThreeNodes::start(
        Path::new(NODE),
        Path::new(WAYPOINT),
        [
            config("n1", "0.0.0.0", &jwks, ""),
            config("n2", WP, &jwks, "waypoint: { workload: wp }\n"),
            config("n3", "0.0.0.0", &jwks, ""),
        ],
    )
    .unwrap();
    Topology { nodes, jwt_key }
}

/// Starts the v1 and v2 apps in node 3 (listeners made inside its namespace); returns the log
/// of every request they receive.
fn start_apps(n3: &Netns) -> RequestLog {
    let log = RequestLog::default();
    for (v, ip) in [("v1", V1), ("v2", V2)] {
        let l = n3.listen_tcp(format!("{ip}:8080")).unwrap();
        l.set_nonblocking(true).unwrap();
        tokio::spawn(app_logged(
            v,
            tokio::net::TcpListener::from_std(l).unwrap(),
            log.clone(),
        ));
    }
    log
}

/// A keep-alive HTTP/1.1 connection from pod A's app to `vip:80` (captured on node 1).
async fn h1(t: &Topology, vip: &str) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = t.nodes.n1.connect_tcp(format!("{vip}:80")).unwrap();
    s.set_nonblocking(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(
        tokio::net::TcpStream::from_std(s).unwrap(),
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_between_three_nodes() {
    let t = start();
    start_apps(&t.nodes.n3);
    let mut c = h1(&t, S_VIP).await;

    // 80/20 split by weight over 1,000 requests on one connection (±5%).
    let mut v1 = 0;
    for _ in 0..1000 {
        let (st, h, _) = get(&mut c, "s", "/", &[]).await;
        assert_eq!(st, StatusCode::OK);
        v1 += usize::from(h["x-version"] == "v1");
    }
    assert!((750..=850).contains(&v1), "v1 got {v1} of 1000");
    // /v2/* only to v2.
    for _ in 0..50 {
        assert_eq!(get(&mut c, "s", "/v2/x", &[]).await.1["x-version"], "v2");
    }
    // L7 deny 403, allowed path served.
    assert_eq!(
        get(&mut c, "s", "/admin", &[]).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(get(&mut c, "s", "/ok", &[]).await.0, StatusCode::OK);
    // A retry turns the injected 503 into 200.
    for id in 0..10 {
        assert_eq!(
            get(&mut c, "s", &format!("/fail-once/{id}"), &[]).await.0,
            StatusCode::OK
        );
    }
    // The 1 s timeout answers 504 within ±10%.
    let start = Instant::now();
    assert_eq!(
        get(&mut c, "s", "/slow", &[]).await.0,
        StatusCode::GATEWAY_TIMEOUT
    );
    let took = start.elapsed();
    assert!(
        (Duration::from_millis(900)..=Duration::from_millis(1100)).contains(&took),
        "{took:?}"
    );
    // 50% aborts, ±7%, over 1,000 requests.
    let mut aborted = 0;
    for _ in 0..1000 {
        aborted +=
            usize::from(get(&mut c, "s", "/flaky", &[]).await.0 == StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!((430..=570).contains(&aborted), "{aborted} of 1000 aborted");

    // JWT: missing and bad tokens 401, a valid one 200.
    let mut sec = h1(&t, SECURE_VIP).await;
    assert_eq!(
        get(&mut sec, "secure", "/", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims =
        serde_json::json!({"iss": "https://issuer.test", "sub": "alice", "exp": now + 600});
    let forged = format!(
        "Bearer {}",
        jwt::sign_es256(&jwt::new_es256_key(), "k1", &claims)
    );
    let good = format!("Bearer {}", jwt::sign_es256(&t.jwt_key, "k1", &claims));
    assert_eq!(
        get(&mut sec, "secure", "/", &[("authorization", &forged)])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&mut sec, "secure", "/", &[("authorization", &good)])
            .await
            .0,
        StatusCode::OK
    );

    // Node 3 admits only the waypoint's identity, so pod A calling v1 directly is refused: the
    // source pod's traffic never reaches S except through the waypoint.
    let refused: std::io::Result<usize> = match t.nodes.n1.connect_tcp(format!("{V1}:8080")) {
        // The reset can come before connect returns.
        Err(e) => Err(e
            .downcast::<std::io::Error>()
            .unwrap_or_else(|e| std::io::Error::other(e.to_string()))),
        Ok(mut s) => (|| {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.1\r\nhost: v1\r\n\r\n")?;
            let mut buf = [0u8; 32];
            s.read(&mut buf)
        })(),
    };
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{refused:?}"
    );

    // No healthy endpoint: 503.
    let mut dead = h1(&t, DEAD_VIP).await;
    assert_eq!(
        get(&mut dead, "dead", "/", &[]).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A host the mesh does not know is judged as the CONNECT target; one naming another
    // service is misdirected.
    assert_eq!(
        get(&mut c, "unknown.example", "/admin", &[]).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(&mut c, "s-v2", "/", &[]).await.0,
        StatusCode::MISDIRECTED_REQUEST
    );

    // Malformed request: 400 and close. Oversize headers: 431. Others unaffected.
    for (raw, want) in [
        (
            "GET / HTTP/1.1\r\nno colon here\r\n\r\n".to_string(),
            "HTTP/1.1 400",
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nhost: s\r\nx-big: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            ),
            "HTTP/1.1 431",
        ),
    ] {
        use std::io::{Read, Write};
        let mut s = t.nodes.n1.connect_tcp(format!("{S_VIP}:80")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(raw.as_bytes());
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(want), "{want}: {got}");
    }
    assert_eq!(get(&mut c, "s", "/", &[]).await.0, StatusCode::OK);

    // gRPC unary and streaming, trailers intact.
    let s = t.nodes.n1.connect_tcp(format!("{S_VIP}:80")).unwrap();
    s.set_nonblocking(true).unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, ChannelBody>(TokioIo::new(tokio::net::TcpStream::from_std(s).unwrap()))
        .await
        .unwrap();
    tokio::spawn(conn);
    for frames in [1usize, 10] {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = Request::post("http://s/echo.Echo/Say")
            .header("content-type", "application/grpc")
            .body(ChannelBody(rx))
            .unwrap();
        send.ready().await.unwrap();
        let resp = send.send_request(req);
        tokio::spawn(async move {
            for i in 0..frames {
                tx.send(Frame::data(Bytes::from(format!("m{i};"))))
                    .await
                    .unwrap();
            }
        });
        let collected = resp.await.unwrap().into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        let want: String = (0..frames).map(|i| format!("m{i};")).collect();
        assert_eq!(collected.to_bytes(), Bytes::from(want));
    }

    // Live reload of the waypoint: a new L7 policy applied by SIGHUP takes effect at once.
    let cfg = t.nodes.dir.path().join("n2.yaml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("paths: [\"/admin*\"]", "paths: [\"/admin*\", \"/ok\"]");
    std::fs::write(&cfg, text).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.nodes.waypoint.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    t.nodes
        .waypoint
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .unwrap();
    assert_eq!(get(&mut c, "s", "/ok", &[]).await.0, StatusCode::FORBIDDEN);

    // The waypoint wrote one JSON access-log line per request and counts them.
    let log = t.nodes.waypoint.read_log();
    assert!(
        log.contains("\"response_code\":403") && log.contains("\"response_flags\":\"RBAC\""),
        "{log}"
    );
    // With the keys of every zmesh JSON line and the node's (ztunnel's) names for the two sides
    // (docs/telemetry.md "Access log (waypoint)").
    let ok = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "access" && v["response_code"] == 200)
        .unwrap_or_else(|| panic!("no access line of a 200: {log}"));
    for (k, want) in [
        ("level", "INFO"),
        ("message", "request complete"),
        ("src.workload", "pod-a"),
        ("src.namespace", "shop"),
        ("src.identity", "spiffe://cluster.local/ns/shop/sa/client"),
        ("dst.namespace", "shop"),
        ("dst.identity", "spiffe://cluster.local/ns/shop/sa/s"),
    ] {
        assert_eq!(ok[k], want, "{k}: {ok}");
    }
    assert!(
        ok["src.addr"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{A}:")),
        "{ok}"
    );
    assert!(
        ok["dst.workload"].as_str().unwrap().starts_with("s-v"),
        "{ok}"
    );
    assert!(
        ok["dst.service"].is_string() && ok["timestamp"].is_string(),
        "{ok}"
    );
    let duration = ok["duration"].as_str().unwrap();
    assert!(
        duration.strip_suffix("ms").unwrap().parse::<u64>().is_ok(),
        "{ok}"
    );
    assert!(
        ok["bytes_sent"].is_u64() && ok["bytes_recv"].as_u64() > Some(0),
        "{ok}"
    );
}

/// A prior-knowledge HTTP/2 connection from pod A's app to `vip:80`.
async fn h2c(t: &Topology, vip: &str) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = t.nodes.n1.connect_tcp(format!("{vip}:80")).unwrap();
    s.set_nonblocking(true).unwrap();
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tokio::net::TcpStream::from_std(s).unwrap()))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// One HTTP/2 GET with `authority` as `:authority`.
async fn get2(
    c: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: &str,
    path: &str,
) -> StatusCode {
    c.ready().await.unwrap();
    let req = Request::get(format!("http://{authority}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

/// From pod A to `vip:80`: waits `after`, sends `data`, and expects a reset with no byte back.
/// The reset may surface at connect, on the write or on the read.
fn assert_reset(t: &Topology, vip: &str, after: Duration, data: &[u8]) {
    use std::io::{Read, Write};
    let is_reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
    let mut s = match t.nodes.n1.connect_tcp(format!("{vip}:80")) {
        Ok(s) => s,
        Err(e) => {
            let e = e.downcast::<std::io::Error>().expect("an I/O error");
            return assert!(is_reset(&e), "{vip}: {e}");
        }
    };
    std::thread::sleep(after);
    if let Err(e) = s.write_all(data) {
        return assert!(is_reset(&e), "{vip}: {e}");
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) => assert!(is_reset(&e), "{vip}: {e}"),
        Ok(n) => panic!(
            "{vip}: ended with {n} bytes instead of a reset: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// Issue #11 findings 5 and 6 against real processes: Host / `:authority` bypasses, path
/// spellings and the slow-client sniff bypass are all refused, and the backends see none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_on_the_waypoint_are_refused_and_never_reach_the_backend() {
    let t = start();
    let log = start_apps(&t.nodes.n3);
    let (deny, wrong) = (StatusCode::FORBIDDEN, StatusCode::MISDIRECTED_REQUEST);

    // Host bypass: a backend's pod IP (with and without port), pod A's own IP, another service,
    // garbage; over HTTP/1.1 and HTTP/2 (`:authority`), to a sniffed and a declared-HTTP port.
    for (vip, name, backend_ips, others) in [
        (S_VIP, "s", vec![V1, V2], vec![A, WP, "s-v2", "10.96.18.3"]),
        (WEB_VIP, "web", vec![V1], vec![A, WP, V2, "s", S_VIP]),
    ] {
        let mut c1 = h1(&t, vip).await;
        let mut c2 = h2c(&t, vip).await;
        // The backends' pod IPs first: the bypass that was confirmed live.
        let mut judged: Vec<String> = Vec::new();
        for ip in backend_ips {
            judged.push(ip.into());
            judged.push(format!("{ip}:8080"));
        }
        judged.extend([name.into(), vip.into(), "garbage.invalid".into()]);
        for host in &judged {
            assert_eq!(
                get(&mut c1, host, "/admin", &[]).await.0,
                deny,
                "{vip} Host {host}"
            );
            assert_eq!(
                get2(&mut c2, host, "/admin").await,
                deny,
                "{vip} :authority {host}"
            );
        }
        for host in others {
            assert_eq!(
                get(&mut c1, host, "/admin", &[]).await.0,
                wrong,
                "{vip} Host {host}"
            );
            assert_eq!(
                get2(&mut c2, host, "/admin").await,
                wrong,
                "{vip} :authority {host}"
            );
        }
        // Path spellings of /admin.
        for p in [
            "//admin",
            "///admin",
            "/./admin",
            "/x/../admin",
            "/%61dmin",
            "/%2e/admin",
            "/%2E%2E/admin",
            "/admin/",
        ] {
            assert_eq!(
                get(&mut c1, name, p, &[]).await.0,
                deny,
                "{vip} HTTP/1.1 {p}"
            );
            assert_eq!(get2(&mut c2, name, p).await, deny, "{vip} HTTP/2 {p}");
        }
        for p in ["/ok/..%2Fadmin", "/ok/..%2fadmin", "/%5Cadmin"] {
            let bad = StatusCode::BAD_REQUEST;
            assert_eq!(
                get(&mut c1, name, p, &[]).await.0,
                bad,
                "{vip} HTTP/1.1 {p}"
            );
            assert_eq!(get2(&mut c2, name, p).await, bad, "{vip} HTTP/2 {p}");
        }
    }

    // The sniffer bypass: a client that waits past the sniff timeout before `GET /admin`, and
    // one that is not HTTP, to the sniffed port of a service with an HTTP DENY.
    let slow = b"GET /admin HTTP/1.1\r\nhost: s\r\n\r\n";
    assert_reset(&t, S_VIP, Duration::from_millis(500), slow);
    assert_reset(&t, S_VIP, Duration::ZERO, b"\x16\x03\x01\x00\x05hello");

    let leaked: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.to_ascii_lowercase().contains("admin"))
        .cloned()
        .collect();
    assert_eq!(
        leaked,
        Vec::<String>::new(),
        "requests that reached a backend"
    );
    // The log does record what gets through: an allowed request, with its normalized path.
    let mut c = h1(&t, S_VIP).await;
    let (st, _, body) = get(&mut c, "s", "/x/..//ok/%7Eu", &[]).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(log.lock().unwrap().contains(&"GET /ok/~u".to_string()));

    // Each refusal is in the waypoint's access log, the reset TCP flows included.
    let wp_log = t.nodes.waypoint.read_log();
    for needle in [
        "\"response_code\":421",
        "\"response_code\":400",
        "\"protocol\":\"tcp\",\"response_code\":0,\"grpc_status\":\"-\",\"response_flags\":\"RBAC\"",
    ] {
        assert!(wp_log.contains(needle), "{needle} not in {wp_log}");
    }
}
