//! Tier (b): the node's :15008 and the waypoint's :15008 are one HBONE server
//! (`hbone::server`), so every guard holds on both. Each test runs the same attack against a
//! node (server workload at .3, app on :8080) and against a waypoint (at .5, in front of the
//! service `s` whose port 80 is opaque TCP to the app).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use http::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use zmesh::config::Config;
use zmesh::identity::{CertManager, FileCa, SpiffeId};
use zmesh::waypoint::server::{self as wpserver, Waypoint};

struct Both {
    mesh: Mesh,
    wp: Arc<Waypoint>,
    node: Arc<zmesh::proxy::Node>,
    /// Connections the node (directly, or behind the waypoint) made to the app.
    dials: Arc<AtomicUsize>,
    crl: std::path::PathBuf,
    wp_cfg: String,
}

/// One HBONE listener under test: where it is, who it is, a CONNECT it serves, and its own
/// address (which it must never dial).
struct Target {
    name: &'static str,
    addr: SocketAddr,
    server: SpiffeId,
    good: String,
    own: Vec<String>,
}

fn vip(net: u8) -> String {
    format!("127.{net}.1.1")
}

fn targets(net: u8) -> [Target; 2] {
    [
        Target {
            name: "node",
            addr: SocketAddr::new(ip(net, 3), 15008),
            server: id("server"),
            good: format!("{}:8080", ip(net, 3)),
            own: [15000, 15001, 15006, 15008, 15020, 15021]
                .iter()
                .map(|p| format!("{}:{p}", ip(net, 3)))
                .collect(),
        },
        Target {
            name: "waypoint",
            addr: SocketAddr::new(ip(net, 5), 15008),
            server: id("waypoint"),
            good: format!("{}:80", vip(net)),
            own: vec![
                format!("{}:15008", ip(net, 5)),
                format!("{}:8080", ip(net, 5)),
            ],
        },
    ]
}

async fn both(net: u8) -> Both {
    let mut mesh = Mesh::new(net);
    let model = format!(
        "workloads:
  - {{ uid: client, name: client, namespace: default, service_account: client, addresses: [{c}], node: node-a }}
  - {{ uid: server, name: server, namespace: default, service_account: server, addresses: [{s}], node: node-b, services: {{ default/s: {{}} }} }}
  - {{ uid: wp, name: wp, namespace: default, service_account: waypoint, addresses: [{w}], node: node-w }}
services:
  - {{ name: s, namespace: default, hostname: s, vips: [{v}], ports: {{ 80: 8080, 81: 9002, 82: 8080 }}, app_protocols: {{ 80: tcp, 81: tcp, 82: http }}, waypoint: wp }}
",
        c = ip(net, 2),
        s = ip(net, 3),
        w = ip(net, 5),
        v = vip(net)
    );
    let node = mesh.node("node-b", 3, &model).await;
    let ca = FileCa::load(&mesh.ca_dir).unwrap();
    let crl = mesh.dir.path().join("crl.pem");
    std::fs::write(
        &crl,
        ca.crl_pem(&[], SystemTime::now(), Duration::from_secs(3600))
            .unwrap(),
    )
    .unwrap();
    let wp_cfg = node_yaml_with(
        net,
        "node-w",
        5,
        &mesh.ca_dir,
        &format!("  crl: {}\n", crl.display()),
        &format!("waypoint: {{ workload: wp }}\n{model}"),
    );
    let cfg = Config::parse(&wp_cfg, "waypoint").unwrap();
    let (source, trust) =
        zmesh::proxy::load_certificates(&cfg, Arc::new(zmesh::identity::SystemClock)).unwrap();
    let certs = Arc::new(CertManager::with_trust(source, trust).unwrap());
    let wp = Waypoint::new(cfg, certs).unwrap();
    wpserver::start(wp.clone()).await.unwrap();
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dials = Arc::new(AtomicUsize::new(0));
    let counted = dials.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = app.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            // Hold it briefly, as a real app would, then close.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(s);
            });
        }
    });
    Both {
        mesh,
        wp,
        node,
        dials,
        crl,
        wp_cfg,
    }
}

async fn connect(b: &Both, t: &Target) -> h2::client::SendRequest<bytes::Bytes> {
    hbone(&b.mesh.ca_dir, &id("client"), &t.server, t.addr)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", t.name))
}

/// Reliability #1 and #38 on both listeners: an extended CONNECT and a CONNECT to the
/// listener's own address get 400, nothing is dialed, and the connection still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_refuse_self_targets_and_extended_connect_with_400() {
    let net = 29;
    let b = both(net).await;
    for t in targets(net) {
        let mut send = connect(&b, &t).await;
        let before = b.dials.load(Ordering::SeqCst);
        for own in &t.own {
            assert_eq!(
                status(&mut send, connect_req(own)).await,
                Ok(StatusCode::BAD_REQUEST),
                "{}: {own}",
                t.name
            );
        }
        let mut ext = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://{}/", t.good))
            .body(())
            .unwrap();
        ext.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        assert_eq!(
            status(&mut send, ext).await,
            Ok(StatusCode::BAD_REQUEST),
            "{}",
            t.name
        );
        assert_eq!(b.dials.load(Ordering::SeqCst), before, "{}", t.name);
        assert_eq!(
            status(&mut send, connect_req(&t.good)).await,
            Ok(StatusCode::OK),
            "{}",
            t.name
        );
    }
    assert_eq!(b.node.rejections.count("hbone", "self_target"), 6);
    assert_eq!(b.wp.rejections.count("hbone", "self_target"), 2);
    let text = b.wp.metrics_text();
    assert!(
        text.contains("zmesh_rejected_total{listener=\"hbone\",reason=\"extended_connect\"} 1"),
        "{text}"
    );
    assert!(text.contains("zmesh_access_log_dropped_total 0"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}

/// Reliability #7 on both listeners: ten rapid-reset floods each, the dials they cause (the
/// waypoint's go on through the node to the app) stay under the bound and every connection
/// is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_bound_rapid_reset_floods() {
    let net = 30;
    let b = both(net).await;
    for t in targets(net) {
        for run in 0..10 {
            assert_flood_bounded(&format!("{} run {run}", t.name), &b.dials, async {
                reset_flood(connect(&b, &t).await, &t.good, 10_000).await
            })
            .await;
        }
        // Streams that send a byte (or, at the waypoint, a whole HTTP request) and reset after
        // their 200: each costs a dial, and zmesh's budget still closes the connection.
        let (target, first): (String, &'static [u8]) = match t.name {
            "node" => (t.good.clone(), b"x"),
            _ => (
                format!("{}:82", vip(net)),
                b"GET / HTTP/1.1\r\nhost: s\r\n\r\n",
            ),
        };
        let what = format!("{}: streams sending {first:?} then reset", t.name);
        assert_flood_bounded(&what, &b.dials, async {
            reset_after_sending(connect(&b, &t).await, &target, 2_000, first).await
        })
        .await;
        let mut send = connect(&b, &t).await;
        assert_eq!(
            status(&mut send, connect_req(&t.good)).await,
            Ok(StatusCode::OK),
            "{} serves after the floods",
            t.name
        );
    }
}

/// Drain on the waypoint, as on the node (tests/drain.rs): GOAWAY to open connections, so new
/// streams fail there, while a tunnel already open keeps carrying bytes; new connections are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_drains_with_goaway_like_the_node() {
    let net = 37;
    let b = both(net).await;
    let t = &targets(net)[1];
    let echo = TcpListener::bind(SocketAddr::new(ip(net, 3), 9000))
        .await
        .unwrap();
    spawn_echo(echo);
    let mut send = connect(&b, t).await;
    let (resp, mut up) = send.send_request(connect_req(&t.good), false).unwrap();
    let mut down = resp.await.unwrap().into_body();
    let wp = b.wp.clone();
    let drain = tokio::spawn(async move { wp.drain(Duration::from_secs(5)).await });
    // The GOAWAY reaches the client: a new stream on this connection is refused.
    wait_until("GOAWAY at the client", Duration::from_secs(5), || {
        send.clone()
            .send_request(connect_req(&t.good), false)
            .is_err()
    })
    .await;
    // The open tunnel still carries bytes (the app holds it 50 ms, so send at once).
    up.send_data(bytes::Bytes::from_static(b"x"), true).unwrap();
    let _ = down.data().await;
    drop(down);
    assert!(
        tokio::net::TcpStream::connect(t.addr).await.is_err()
            || hbone(&b.mesh.ca_dir, &id("client"), &t.server, t.addr)
                .await
                .is_err(),
        "a draining waypoint still accepts"
    );
    let left = drain.await.unwrap();
    assert_eq!(left, 0, "connections still open after the drain");
}

/// CRL re-checks on the waypoint, as on the node (tests/cert_lifecycle.rs): a reload with a CRL
/// that revokes the client's certificate cuts its live connection and refuses new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_cuts_a_connection_whose_client_is_revoked() {
    let net = 38;
    let b = both(net).await;
    let t = &targets(net)[1];
    let (cert, mgr) = b.mesh.cert(&id("client"));
    let tcp = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    let mut send = hbone_with(tcp, &cert, &mgr, &t.server).await.unwrap();
    assert_eq!(
        status(&mut send, connect_req(&t.good)).await,
        Ok(StatusCode::OK)
    );
    let ca = FileCa::load(&b.mesh.ca_dir).unwrap();
    std::fs::write(
        &b.crl,
        ca.crl_pem(
            std::slice::from_ref(&cert.serial),
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap(),
    )
    .unwrap();
    // What the waypoint binary does when its config or certificate files change.
    let cfg = Config::parse(&b.wp_cfg, "waypoint").unwrap();
    b.wp.reload(&cfg).unwrap();
    wait_until("the revoked client's connection is cut", CUT_WITHIN, || {
        send.clone()
            .send_request(connect_req(&t.good), false)
            .is_err()
    })
    .await;
    wait_until("the cut is counted", CUT_WITHIN, || {
        b.wp.rejections.count("hbone", "revoked") == 1
    })
    .await;
    // New handshakes see the new CRL too (the TLS config is not served from a stale cache).
    let tcp = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    let again = match hbone_with(tcp, &cert, &mgr, &t.server).await {
        // TLS 1.3: the server's verdict on the client arrives after the client's handshake.
        Ok(mut send) => status(&mut send, connect_req(&t.good)).await,
        Err(e) => Err(e),
    };
    assert!(
        again.is_err(),
        "a revoked client got a new connection: {again:?}"
    );
}

/// A reset is relayed as a reset through the waypoint's TCP path, as through the node: the app
/// behind the waypoint aborts its connection, and the client's stream ends with RST_STREAM, not
/// with a clean END_STREAM that would pass for a complete reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_behind_the_waypoint_reaches_the_client_as_a_reset() {
    use tokio::io::AsyncReadExt;
    let net = 39;
    let b = both(net).await;
    let t = &targets(net)[1];
    let aborting = TcpListener::bind(SocketAddr::new(ip(net, 3), 9002))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = aborting.accept().await {
            let mut buf = [0u8; 4];
            let _ = s.read_exact(&mut buf).await;
            // Linger 0: the close is an RST.
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let mut send = connect(&b, t).await;
    let (resp, mut up) = send
        .send_request(connect_req(&format!("{}:81", vip(net))), false)
        .unwrap();
    let mut down = resp.await.unwrap().into_body();
    up.send_data(bytes::Bytes::from_static(b"ping"), false)
        .unwrap();
    let end = tokio::time::timeout(CUT_WITHIN, async {
        loop {
            match down.data().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream ends");
    let e = end.expect("the stream ended cleanly: the app's reset was lost");
    assert!(e.is_reset(), "{e}");
}
