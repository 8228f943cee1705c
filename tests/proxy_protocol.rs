//! Tier (b): PROXY protocol v2 in process (docs/hbone.md "PROXY protocol", docs/waypoint.md
//! "Behind a node tunnel").
//!
//! - A workload with `application_tunnel: {protocol: PROXY}`: client → node A → HBONE → node B
//!   → the app at its tunnel port reads a PROXY v2 header (client address, CONNECT target,
//!   TLV 0xD0 = the client's identity) and then exactly the client's bytes. A workload without
//!   it still gets plain bytes.
//! - The sandwich: client → node A → HBONE → node W (the waypoint's workload has a PROXY tunnel
//!   to port 15088) → PROXY v2 → zmesh-waypoint's PROXY listener → HBONE → node B → app. The
//!   waypoint authorizes by the identity in the header; hostile headers sent straight to its
//!   listener are refused, counted, and never dialed upstream.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zmesh::config::Config;
use zmesh::hbone::proxy_protocol::{self, Header, Tlv, MAX_DECLARED_LEN, SIGNATURE};
use zmesh::identity::CertManager;
use zmesh::waypoint::server::{self as wpserver, Waypoint};

/// The app port a PROXY tunnel workload is dialed at in the first test.
const TUNNEL_PORT: u16 = 9088;
/// Istio's port for a waypoint's PROXY listener.
const SANDWICH_PORT: u16 = 15088;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_tunnel_workload_reads_the_header_then_exactly_the_bytes() {
    let net = 178;
    let mut mesh = Mesh::new(net);
    let w = |uid: &str, host: u8, node: &str, extra: &str| {
        format!(
            "  - {{ uid: {uid}, name: {uid}, namespace: default, service_account: {uid}, addresses: [{}], node: {node}{extra} }}\n",
            ip(net, host)
        )
    };
    let model = format!(
        "workloads:\n{}{}{}",
        w("client", 2, "node-a", ""),
        w(
            "tunneled",
            3,
            "node-b",
            &format!(", application_tunnel: {{ protocol: PROXY, port: {TUNNEL_PORT} }}")
        ),
        w("plain", 4, "node-c", ""),
    );
    let a = mesh.node("node-a", 2, &model).await;
    mesh.node("node-b", 3, &model).await;
    mesh.node("node-c", 4, &model).await;
    let tunnel_app = TcpListener::bind(SocketAddr::new(ip(net, 3), TUNNEL_PORT))
        .await
        .unwrap();
    let plain_app = TcpListener::bind(SocketAddr::new(ip(net, 4), 8080))
        .await
        .unwrap();

    // The client asks for tunneled:8080; the app is dialed at its tunnel port instead.
    let target = SocketAddr::new(ip(net, 3), 8080);
    let entry = capture_to(a.clone(), ip(net, 2), target).await;
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    let client_addr = c.local_addr().unwrap();
    let payload = b"first bytes of the client, after the header".to_vec();
    let sent = payload.clone();
    let app = tokio::spawn(async move {
        let (mut s, peer) = tunnel_app.accept().await.unwrap();
        let header = proxy_protocol::read_header(&mut s).await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        s.write_all(b"reply").await.unwrap();
        s.shutdown().await.unwrap();
        (peer, header, rest)
    });
    let reply = exchange(&mut c, &sent).await;
    let (peer, header, rest) = app.await.unwrap();
    assert_eq!(reply, b"reply");
    assert_eq!(peer.ip(), ip(net, 2), "dialed from the client's address");
    // The source is the client as the tunnel arrived (as ztunnel writes it): the client
    // workload's address, with the port of node A's HBONE connection.
    let (src, dst) = header.addresses.expect("a PROXY header has addresses");
    assert_eq!(src.ip(), ip(net, 2));
    assert_ne!(src.port(), 0);
    assert_ne!(src.port(), client_addr.port(), "not the app's own socket");
    assert_eq!(
        header,
        Header::proxy(src, target).with_identity(id("client")),
        "the header names the client, the CONNECT target and the verified identity"
    );
    assert_eq!(dst, target);
    assert_eq!(
        rest, payload,
        "exactly the client's bytes follow the header"
    );

    // Opt-in: a workload without the tunnel gets the bytes alone.
    let entry = capture_to(a, ip(net, 2), SocketAddr::new(ip(net, 4), 8080)).await;
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    let app = tokio::spawn(async move {
        let (mut s, _) = plain_app.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    exchange(&mut c, b"no header here").await;
    assert_eq!(app.await.unwrap(), b"no header here");
}

/// The sandwich: node W runs in front of the waypoint, whose workload asks for a PROXY tunnel
/// to the waypoint's PROXY listener.
struct Sandwich {
    _mesh: Mesh,
    wp: Arc<Waypoint>,
    /// Capture entries on node A for `good` and `bad`, both to the service VIP.
    good: SocketAddr,
    bad: SocketAddr,
    /// The waypoint's PROXY listener.
    listener: SocketAddr,
    vip: SocketAddr,
    /// Connections the backend app accepted (every one is a dial through the waypoint).
    dials: Arc<AtomicUsize>,
}

async fn sandwich(net: u8) -> Sandwich {
    let mut mesh = Mesh::new(net);
    let vip = SocketAddr::new(format!("127.{net}.1.1").parse().unwrap(), 80);
    let w = |uid: &str, host: u8, node: &str, extra: &str| {
        format!(
            "  - {{ uid: {uid}, name: {uid}, namespace: shop, service_account: {uid}, addresses: [{}], node: {node}{extra} }}\n",
            ip(net, host)
        )
    };
    let mut model = String::from("workloads:\n");
    model += &w("good", 2, "node-a", "");
    model += &w("bad", 7, "node-a", "");
    model += &w(
        "wp",
        5,
        "node-w",
        &format!(", application_tunnel: {{ protocol: PROXY, port: {SANDWICH_PORT} }}"),
    );
    model += &w("v1", 3, "node-b", ", services: { shop/s: {} }");
    model += &format!(
        "services:\n  - {{ name: s, namespace: shop, hostname: s, vips: [{}], ports: {{ 80: 8080 }}, waypoint: wp }}\n",
        vip.ip()
    );
    // Judged at the waypoint, by the identity the header carries.
    let wp_policy = "policies:\n  - name: only-good\n    namespace: shop\n    scope: { workload_selector: { workloads: [wp] } }\n    action: allow\n    rules:\n      - clauses:\n          - matches:\n              - principals: [\"cluster.local/ns/shop/sa/good\"]\n";
    let a = mesh.node("node-a", 2, &model).await;
    mesh.node("node-w", 5, &model).await;
    mesh.node("node-b", 3, &model).await;
    // The waypoint shares node W's address (node W owns HBONE there); its readiness port
    // moves aside.
    let text = node_yaml_with(
        net,
        "node-w",
        5,
        &mesh.ca_dir,
        "  handshake_timeout: 1s\n  ports: { readiness: 15121 }\n",
        &format!(
            "waypoint: {{ workload: wp, proxy_protocol_port: {SANDWICH_PORT} }}\n{model}{wp_policy}"
        ),
    );
    let cfg = Config::parse(&text, "waypoint").unwrap();
    let (source, trust) =
        zmesh::proxy::load_certificates(&cfg, Arc::new(zmesh::identity::SystemClock)).unwrap();
    let certs = Arc::new(CertManager::with_trust(source, trust).unwrap());
    let wp = Waypoint::new(cfg, certs).unwrap();
    wpserver::start(wp.clone()).await.unwrap();
    let dials = Arc::new(AtomicUsize::new(0));
    counting_http_app(
        TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
            .await
            .unwrap(),
        dials.clone(),
    );
    Sandwich {
        good: capture_to(a.clone(), ip(net, 2), vip).await,
        bad: capture_to(a, ip(net, 7), vip).await,
        listener: SocketAddr::new(ip(net, 5), SANDWICH_PORT),
        vip,
        dials,
        wp,
        _mesh: mesh,
    }
}

/// An HTTP/1.1 app that counts the connections it accepts and answers each request `v1`.
fn counting_http_app(l: TcpListener, dials: Arc<AtomicUsize>) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            dials.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nv1",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: s\r\nconnection: close\r\n\r\n";

/// Sends GET over `c` and returns what came back before the end (or the reset).
async fn get_over(c: &mut TcpStream) -> Result<Vec<u8>, std::io::Error> {
    c.write_all(GET).await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .expect("an answer or an end within 10 s")?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_behind_a_node_authorizes_by_the_identity_in_the_header() {
    let net = 183;
    let s = sandwich(net).await;

    let mut c = connect_from(ip(net, 2), s.good).await.unwrap();
    let got = get_over(&mut c).await.unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("v1"),
        "the allowed identity reaches the app through node W and the waypoint: {text}"
    );
    assert_eq!(s.dials.load(Ordering::SeqCst), 1);

    // `bad` passes node A and node W (neither has a policy) but not the waypoint's.
    // The denial is decided at admission, before the client writes: on loopback the reset
    // can reach the client before its connect call returns, which is the same outcome.
    let answer = match connect_from(ip(net, 7), s.bad).await {
        Ok(mut c) => get_over(&mut c).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(got) => assert!(got.is_empty(), "denied, yet answered: {got:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    wait_until("the denial is counted", Duration::from_secs(5), || {
        s.wp.rejections.count("proxy", "denied_by_policy") == 1
    })
    .await;
    assert_eq!(
        s.dials.load(Ordering::SeqCst),
        1,
        "nothing of `bad` was dialed"
    );
}

/// Opens a connection to the waypoint's PROXY listener from the `good` client's address,
/// sends `bytes` then a GET, and expects the connection reset or closed with nothing back.
async fn assert_refused_header(s: &Sandwich, net: u8, what: &str, bytes: &[u8]) {
    let mut c = connect_from(ip(net, 2), s.listener).await.unwrap();
    // The write may itself meet the reset.
    let _ = c.write_all(bytes).await;
    let _ = c.write_all(GET).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after 10 s"));
    if let Err(e) = read {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{what}: {e}");
    }
    assert!(got.is_empty(), "{what}: answered {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_at_the_waypoint_listener_are_refused_and_never_dialed() {
    let net = 193;
    let s = sandwich(net).await;
    let shop = |sa: &str| zmesh::identity::SpiffeId::new("cluster.local", "shop", sa).unwrap();
    let good_id = shop("good");
    let client = SocketAddr::new(ip(net, 2), 40000);
    let header = |h: Header| h.encode().unwrap();
    let mut over = SIGNATURE.to_vec();
    over.extend_from_slice(&[0x21, 0x11]);
    over.extend_from_slice(&((MAX_DECLARED_LEN + 1) as u16).to_be_bytes());
    let mut bad_identity = header(Header::proxy(client, s.vip));
    let tlv = b"spiffe://cluster.local/ns/shop/sa/GOOD";
    bad_identity.push(0xD0);
    bad_identity.extend_from_slice(&(tlv.len() as u16).to_be_bytes());
    bad_identity.extend_from_slice(tlv);
    let len = (bad_identity.len() - 16) as u16;
    bad_identity[14..16].copy_from_slice(&len.to_be_bytes());
    let mut overrun = header(Header::proxy(client, s.vip));
    overrun.extend_from_slice(&[0x02, 0x00, 0x40]);
    let len = (overrun.len() - 16) as u16;
    overrun[14..16].copy_from_slice(&len.to_be_bytes());
    let mut extra_tlvs = Header::proxy(client, s.vip);
    extra_tlvs.tlvs.push(Tlv {
        kind: 0x02,
        value: b"s".to_vec(),
    });
    let cases: Vec<(&str, Vec<u8>, &'static str)> = vec![
        ("no header at all", Vec::new(), "proxy_header_signature"),
        (
            "v1 text header",
            b"PROXY TCP4 127.0.0.1 127.0.0.2 1 2\r\n".to_vec(),
            "proxy_header_signature",
        ),
        ("declared over the limit", over, "proxy_header_too_long"),
        (
            "TLV overrunning the header",
            overrun,
            "proxy_header_malformed",
        ),
        (
            "identity that is no canonical SPIFFE ID",
            bad_identity,
            "proxy_header_identity",
        ),
        (
            "no identity",
            header(extra_tlvs),
            "proxy_header_no_identity",
        ),
        ("LOCAL", header(Header::local()), "proxy_header_local"),
        (
            "identity policy denies",
            header(Header::proxy(client, s.vip).with_identity(shop("bad"))),
            "denied_by_policy",
        ),
        (
            "the waypoint's own address",
            header(Header::proxy(client, s.listener).with_identity(good_id.clone())),
            "self_target",
        ),
        (
            "an address nobody has",
            header(
                Header::proxy(client, SocketAddr::new(ip(net, 99), 80))
                    .with_identity(good_id.clone()),
            ),
            "authority_unknown",
        ),
    ];
    for (what, bytes, code) in &cases {
        let before = s.wp.rejections.count("proxy", code);
        assert_refused_header(&s, net, what, bytes).await;
        wait_until(
            &format!("{what} counted as {code}"),
            Duration::from_secs(5),
            || s.wp.rejections.count("proxy", code) == before + 1,
        )
        .await;
    }

    // Slowloris: half a header, then nothing; cut at the deadline (1 s here), counted.
    let good = header(Header::proxy(client, s.vip).with_identity(good_id.clone()));
    let mut c = connect_from(ip(net, 2), s.listener).await.unwrap();
    c.write_all(&good[..20]).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
        .await
        .expect("cut within the header deadline");
    assert!(got.is_empty() && read.map_or(true, |n| n == 0));
    assert_eq!(s.wp.rejections.count("proxy", "proxy_header_timeout"), 1);

    assert_eq!(
        s.dials.load(Ordering::SeqCst),
        0,
        "no refused connection reached the upstream"
    );

    // The same listener serves a well-formed header with an allowed identity.
    let mut c = connect_from(ip(net, 2), s.listener).await.unwrap();
    c.write_all(&good).await.unwrap();
    let got = get_over(&mut c).await.unwrap();
    assert!(
        String::from_utf8_lossy(&got).ends_with("v1"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(s.dials.load(Ordering::SeqCst), 1);
}
