//! Tier (b): the operator endpoints of real nodes and waypoints in this process (issue 11,
//! finding 12). The node's readiness (:15021), metrics (:15020) and admin, and the waypoint's
//! readiness server, each close a connection past their cap at once while the connections
//! already in keep getting answers, and a client that sends half a request line is cut at the
//! header deadline. The waypoint's readiness reflects its state: 500 naming what is pending
//! until its HBONE listener serves with a valid certificate, 200 then, 500 again once its
//! certificate has expired; a CA down at start leaves it running and not ready until it answers.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use zmesh::config::Config;
use zmesh::identity::{CertManager, CertSource, FileCa, ManualClock, Trust};
use zmesh::proxy::operator::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
use zmesh::waypoint::server::{self as wpserver, Waypoint};

/// Bounds a wait that a working server ends in milliseconds.
const GUARD: Duration = Duration::from_secs(5);

type Client = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn client(addr: SocketAddr) -> Client {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// One GET on a keep-alive connection: the status and body.
async fn get(c: &mut Client, path: &str) -> (u16, String) {
    c.ready().await.unwrap();
    let req = http::Request::get(path)
        .header("host", "x")
        .body(Empty::new())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Reads until the server closes (EOF or reset); anything it says first is ignored.
async fn closed(s: &mut TcpStream) {
    let mut buf = [0u8; 512];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Fills `addr`'s connection cap with answered keep-alive connections, checks that one more is
/// closed at once while those in keep getting answers, then that a new one is served once they
/// have gone.
async fn check_cap(addr: SocketAddr, path: &str, what: &str) {
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut c = client(addr).await;
        get(&mut c, path).await;
        held.push(c);
    }
    let mut extra = TcpStream::connect(addr).await.unwrap();
    timeout(GUARD, closed(&mut extra))
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: a connection past the cap of {MAX_CONNECTIONS} is closed at once")
        });
    let (status, _) = get(&mut held[0], path).await;
    assert_ne!(status, 0, "{what}: a connection already in is answered");
    let (first, _) = get(&mut held[MAX_CONNECTIONS - 1], path).await;
    assert_eq!(status, first);
    drop(held);
    // The server notices the closes asynchronously: a new client is served once it has.
    let end = Instant::now() + GUARD;
    loop {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let attempt = async {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                    .await
                    .ok()?;
            tokio::spawn(conn);
            send.ready().await.ok()?;
            let req = http::Request::get(path)
                .header("host", "x")
                .body(Empty::new())
                .unwrap();
            send.send_request(req)
                .await
                .ok()
                .map(|r| r.status().as_u16())
        };
        if let Some(s) = attempt.await {
            assert_eq!(s, status, "{what}");
            break;
        }
        assert!(
            Instant::now() < end,
            "{what}: slots are freed when clients go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The waypoint's part of a config: its own workload `wp` at .5, served by node-w.
fn waypoint_config(net: u8, mesh: &Mesh) -> Config {
    let model = format!(
        "waypoint: {{ workload: wp }}\nworkloads:\n  - {{ uid: wp, name: wp, namespace: shop, service_account: waypoint, addresses: [{}], node: node-w }}\n",
        ip(net, 5)
    );
    Config::parse(
        &node_yaml(net, "node-w", 5, &mesh.ca_dir, &model),
        "waypoint",
    )
    .unwrap()
}

/// Certificates from the mesh's CA, valid for an hour, judged by `clock`.
fn certs_on(mesh: &Mesh, clock: Arc<ManualClock>) -> Arc<CertManager> {
    let ca = FileCa::load(&mesh.ca_dir).unwrap();
    let roots = ca.roots().to_vec();
    let trust = Trust::new(&roots, Vec::new(), zmesh::tls::provider(), clock).unwrap();
    let source = CertSource::file_ca(ca, Duration::from_secs(3600));
    Arc::new(CertManager::with_trust(source, trust).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operator_server_closes_connections_past_its_cap_and_keeps_answering() {
    let net = 201;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    mesh.node("node-a", 2, &w).await;
    let bound = mesh.nodes[0].bound;
    check_cap(bound.readiness, "/healthz/ready", "node readiness").await;
    check_cap(bound.metrics, "/metrics", "node metrics").await;
    check_cap(bound.admin, "/logging", "node admin").await;

    let cfg = waypoint_config(net, &mesh);
    let certs = certs_on(&mesh, ManualClock::new());
    let wp = Waypoint::new(cfg, certs).unwrap();
    let (_, admin) = wpserver::start(wp).await.unwrap();
    check_cap(admin, "/healthz/ready", "waypoint readiness").await;
}

#[tokio::test(start_paused = true)]
async fn half_a_request_line_is_cut_at_the_header_deadline_by_node_and_waypoint() {
    let net = 202;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    mesh.node("node-a", 2, &w).await;
    let readiness = mesh.nodes[0].bound.readiness;
    let cfg = waypoint_config(net, &mesh);
    let wp = Waypoint::new(cfg, certs_on(&mesh, ManualClock::new())).unwrap();
    let (_, wp_admin) = wpserver::start(wp).await.unwrap();
    // (The node's admin and metrics run on the control runtime, in real time: the same server
    // code, whose deadline `proxy::operator`'s own tests cover with paused time.)
    for (addr, what) in [
        (readiness, "node readiness"),
        (wp_admin, "waypoint readiness"),
    ] {
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz/rea").await.unwrap();
        let sent = Instant::now();
        let early = HEADER_READ_TIMEOUT - Duration::from_millis(100);
        assert!(
            timeout(early, closed(&mut slow)).await.is_err(),
            "{what}: open before the deadline"
        );
        timeout(Duration::from_millis(200), closed(&mut slow))
            .await
            .unwrap_or_else(|_| panic!("{what}: closed at the header deadline"));
        assert!(sent.elapsed() <= HEADER_READ_TIMEOUT + Duration::from_millis(100));
        // A normal request still works afterwards.
        let mut c = client(addr).await;
        assert_eq!(get(&mut c, "/healthz/ready").await.0, 200, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_readiness_is_500_naming_what_is_pending_and_200_only_when_serving() {
    let net = 203;
    let mesh = Mesh::new(net);
    let clock = ManualClock::new();
    let wp = Waypoint::new(waypoint_config(net, &mesh), certs_on(&mesh, clock.clone())).unwrap();

    // Readiness up, HBONE not yet serving: 500, and it says why.
    let early = TcpListener::bind(SocketAddr::new(ip(net, 5), 0))
        .await
        .unwrap();
    let early_addr = early.local_addr().unwrap();
    tokio::spawn(wpserver::serve_admin(
        wp.clone(),
        early,
        Arc::new(AtomicBool::new(false)),
    ));
    let (status, body) = get(&mut client(early_addr).await, "/healthz/ready").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("the HBONE listener"), "{body}");
    assert!(!body.contains("certificate"), "{body}");

    // Started: HBONE serves and the certificate is valid.
    let (_, admin) = wpserver::start(wp.clone()).await.unwrap();
    let (status, body) = get(&mut client(admin).await, "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // The certificate expires with no renewal (none runs here, as when the CA is unreachable;
    // nothing connects to HBONE either, which would fetch a new one): 500.
    clock.advance(Duration::from_secs(2 * 3600));
    let (status, body) = get(&mut client(admin).await, "/healthz/ready").await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("a valid certificate for spiffe://cluster.local/ns/shop/sa/waypoint"),
        "{body}"
    );
    assert!(!body.contains("HBONE"), "{body}");
}

/// The mesh's file CA behind a switch: while `down`, every issuance fails as an unreachable CA's.
struct SwitchedCa {
    inner: FileCa,
    down: AtomicBool,
}

impl zmesh::identity::Authority for SwitchedCa {
    fn issue(
        &self,
        id: &zmesh::identity::SpiffeId,
        ttl: Duration,
        now: std::time::SystemTime,
    ) -> Result<zmesh::identity::Issued, zmesh::identity::CaError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(zmesh::identity::CaError::Issue {
                identity: id.to_string(),
                detail: "CA unreachable".into(),
            });
        }
        self.inner.issue_at(id, ttl, now)
    }
}

/// A waypoint whose CA is down at start still starts (listeners bound), is not ready and says
/// it waits for its certificate; once the CA answers, it fetches one by itself (no connection
/// needed) and turns ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_is_not_ready_until_its_certificate_is_issued() {
    let net = 97;
    let mesh = Mesh::new(net);
    let ca = FileCa::load(&mesh.ca_dir).unwrap();
    let roots = ca.roots().to_vec();
    let switched = Arc::new(SwitchedCa {
        inner: ca,
        down: AtomicBool::new(true),
    });
    let trust = Trust::new(
        &roots,
        Vec::new(),
        zmesh::tls::provider(),
        Arc::new(zmesh::identity::SystemClock),
    )
    .unwrap();
    let source = CertSource::Ca {
        ca: switched.clone(),
        ttl: Duration::from_secs(3600),
    };
    let certs = Arc::new(CertManager::with_trust(source, trust).unwrap());
    let wp = Waypoint::new(waypoint_config(net, &mesh), certs)
        .expect("a CA that is down at start does not stop the waypoint");
    let (_, admin) = wpserver::start(wp.clone()).await.unwrap();
    let (status, body) = get(&mut client(admin).await, "/healthz/ready").await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("not ready; waiting for: a valid certificate for spiffe://cluster.local/ns/shop/sa/waypoint"),
        "{body}"
    );
    assert!(!body.contains("HBONE"), "listeners are bound: {body}");

    switched
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&mut client(admin).await, "/healthz/ready").await;
        if status == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(Instant::now() < end, "still not ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A static certificate source that lacks the waypoint's identity can never serve it: start
/// fails, naming the identity.
#[tokio::test]
async fn waypoint_without_a_static_certificate_for_itself_fails_to_start() {
    let net = 98;
    let mesh = Mesh::new(net);
    let ca = FileCa::load(&mesh.ca_dir).unwrap();
    let roots = ca.roots().to_vec();
    let trust = Trust::new(
        &roots,
        Vec::new(),
        zmesh::tls::provider(),
        Arc::new(zmesh::identity::SystemClock),
    )
    .unwrap();
    let certs = Arc::new(CertManager::with_trust(CertSource::Static(Vec::new()), trust).unwrap());
    let e = Waypoint::new(waypoint_config(net, &mesh), certs)
        .err()
        .expect("no certificate for the waypoint's identity")
        .to_string();
    assert!(
        e.contains("spiffe://cluster.local/ns/shop/sa/waypoint"),
        "{e}"
    );
}
