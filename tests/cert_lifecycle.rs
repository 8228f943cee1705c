//! Tier (b): certificates over time (reliability #28, #30). Rotation and expiry run on a stepped
//! clock shared by both nodes (it drives renewal, issuance and rustls' validity checks), so a
//! day of certificate life passes without sleeping. Root rotation and revocation edit files that
//! the nodes watch, as an operator would.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zmesh::identity::{
    Authority, CaError, CertManager, CertSource, Clock, FileCa, Issued, ManualClock, SpiffeId,
    Trust, ROOT_CERT_FILE,
};
use zmesh::proxy::Node;

const HOUR: Duration = Duration::from_secs(3600);
const TTL: Duration = Duration::from_secs(24 * 3600);
const LIMIT: Duration = Duration::from_secs(5);

/// A file CA that can be switched off.
struct FlakyCa {
    inner: FileCa,
    down: AtomicBool,
    attempts: AtomicUsize,
}

impl Authority for FlakyCa {
    fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Issued, CaError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(CaError::Issue {
                identity: id.to_string(),
                detail: "CA unreachable".into(),
            });
        }
        self.inner.issue_at(id, ttl, now)
    }
}

fn manager(
    ca: Arc<dyn Authority>,
    roots: &[rustls_pki_types::CertificateDer<'static>],
    clock: Arc<dyn Clock>,
) -> Arc<CertManager> {
    let trust = Trust::new(roots, Vec::new(), zmesh::tls::provider(), clock).unwrap();
    Arc::new(CertManager::with_trust(CertSource::Ca { ca, ttl: TTL }, trust).unwrap())
}

/// Node A (client) and node B (server, echo app) whose certificate managers share `clock`;
/// A's CA can be switched off. Returns the mesh, A, A's CA and the capture entry.
async fn clocked_pair(
    net: u8,
    clock: Arc<ManualClock>,
) -> (Mesh, Arc<Node>, Arc<FlakyCa>, SocketAddr) {
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let ca_dir = mesh.ca_dir.clone();
    let load = || FileCa::load(&ca_dir).unwrap();
    let roots = load().roots().to_vec();
    let flaky = Arc::new(FlakyCa {
        inner: load(),
        down: false.into(),
        attempts: 0.into(),
    });
    let a = mesh
        .node_with_certs(
            "node-a",
            2,
            &w,
            manager(flaky.clone(), &roots, clock.clone()),
        )
        .await;
    mesh.node_with_certs("node-b", 3, &w, manager(Arc::new(load()), &roots, clock))
        .await;
    let entry = echo_behind(net, &a).await;
    (mesh, a, flaky, entry)
}

/// An echo app on the server workload (.3:8080); returns where the client app connects.
async fn echo_behind(net: u8, a: &Arc<Node>) -> SocketAddr {
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    spawn_echo(app);
    capture_to(a.clone(), ip(net, 2), dst).await
}

async fn open(net: u8, entry: SocketAddr) -> TcpStream {
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    round_trip(&mut c, b"hello").await;
    c
}

fn client_serial(a: &Node) -> String {
    a.certs
        .cached()
        .into_iter()
        .find(|c| c.identity == id("client"))
        .expect("client certificate")
        .serial
        .clone()
}

/// Serials of the pooled connections that still take new streams.
fn live_serials(a: &Node) -> Vec<String> {
    a.pool
        .connection_serials()
        .into_iter()
        .filter(|(_, _, draining)| !draining)
        .map(|(_, s, _)| s)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_gives_new_tunnels_the_new_serial_and_drains_the_old_connection() {
    let net = 41;
    let clock = ManualClock::new();
    let (_mesh, a, _, entry) = clocked_pair(net, clock.clone()).await;
    let mut first = open(net, entry).await;
    let s1 = client_serial(&a);
    assert_eq!(live_serials(&a), vec![s1.clone()]);

    // Past half-life: the next connection renews, and is carried by a new pooled connection.
    clock.advance(13 * HOUR);
    let mut second = open(net, entry).await;
    let s2 = client_serial(&a);
    assert_ne!(s2, s1, "renewed at half-life");
    assert_eq!(
        live_serials(&a),
        vec![s2.clone()],
        "the old connection takes no new streams"
    );
    // The old connection drains: its open tunnel keeps working.
    round_trip(&mut first, b"old tunnel still open").await;
    round_trip(&mut second, b"new tunnel").await;

    // Past the first certificate's expiry the tunnel it authenticated is not cut.
    clock.advance(12 * HOUR);
    round_trip(&mut first, b"expired mid-connection, still open").await;
    let mut third = open(net, entry).await;
    round_trip(&mut third, b"and new tunnels work").await;
    assert!(!live_serials(&a).contains(&s1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ca_down_the_last_certificate_is_served_until_expiry() {
    let net = 42;
    let clock = ManualClock::new();
    let (_mesh, a, ca, entry) = clocked_pair(net, clock.clone()).await;
    let mut first = open(net, entry).await;
    let s1 = client_serial(&a);

    ca.down.store(true, Ordering::SeqCst);
    clock.advance(13 * HOUR);
    // Renewal fails; new tunnels still work on the current certificate.
    let mut second = open(net, entry).await;
    assert!(
        ca.attempts.load(Ordering::SeqCst) > 1,
        "renewal was attempted"
    );
    assert_eq!(client_serial(&a), s1);
    assert_eq!(live_serials(&a), vec![s1.clone()]);
    round_trip(&mut second, b"served on the current certificate").await;

    // After expiry nothing valid is left: new connections are refused, not sent with an
    // expired certificate; the tunnels already open are not cut.
    clock.advance(12 * HOUR);
    assert_refused(ip(net, 2), entry).await;
    // Readiness turns false and says why.
    assert_eq!(
        a.pending(),
        vec!["a valid certificate for spiffe://cluster.local/ns/default/sa/client".to_string()]
    );
    round_trip(&mut first, b"open tunnel survives its certificate's expiry").await;

    // The CA is back: after the backoff, a new certificate and working tunnels.
    ca.down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(300));
    let mut third = open(net, entry).await;
    round_trip(&mut third, b"renewed").await;
    assert!(a.pending().is_empty(), "ready again: {:?}", a.pending());
    assert_ne!(client_serial(&a), s1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_with_a_two_root_bundle() {
    let net = 43;
    let mut mesh = Mesh::new(net);
    let ca1 = mesh.ca_dir.clone();
    let ca2 = mesh.dir.path().join("ca2");
    FileCa::init(&ca2, "cluster.local").unwrap();
    let root1 = std::fs::read_to_string(ca1.join(ROOT_CERT_FILE)).unwrap();
    let root2 = std::fs::read_to_string(ca2.join(ROOT_CERT_FILE)).unwrap();
    // Node A still issues from root 1 and already trusts both.
    rewrite(&ca1.join(ROOT_CERT_FILE), &format!("{root1}{root2}"));
    let w = client_server_workloads(net, "server", &[]);
    let a = mesh.node("node-a", 2, &w).await;
    // Node B issues from root 2 and does not trust root 1 yet.
    let (b, _) = mesh
        .node_from_file("node-b", &node_yaml(net, "node-b", 3, &ca2, &w))
        .await;
    let entry = echo_behind(net, &a).await;
    assert_refused(ip(net, 2), entry).await;

    // Adding root 1 to B's bundle is picked up live: A (root 1) and B (root 2) now talk.
    let applied = b.stats.reloads_applied.load(Ordering::Acquire);
    rewrite(&ca2.join(ROOT_CERT_FILE), &format!("{root2}{root1}"));
    wait_until("B reloads its bundle", LIMIT, || {
        b.stats.reloads_applied.load(Ordering::Acquire) > applied
    })
    .await;
    assert_eq!(b.certs.trust().roots().len(), 2);
    let mut c = open(net, entry).await;
    round_trip(&mut c, b"across two roots").await;
}

/// Nodes A (client) and B (server) with an open tunnel; the node named `with_crl` watches an
/// empty CRL of the mesh CA at the returned path.
struct CrlSetup {
    _mesh: Mesh,
    a: Arc<Node>,
    b: Arc<Node>,
    ca: FileCa,
    crl: std::path::PathBuf,
    now: SystemTime,
    entry: SocketAddr,
    tunnel: TcpStream,
}

async fn crl_setup(net: u8, with_crl: &str) -> CrlSetup {
    let mut mesh = Mesh::new(net);
    let ca = FileCa::load(&mesh.ca_dir).unwrap();
    let crl = mesh.dir.path().join("crl.pem");
    let now = SystemTime::now();
    std::fs::write(&crl, ca.crl_pem(&[], now, HOUR).unwrap()).unwrap();
    let w = client_server_workloads(net, "server", &[]);
    let crl_line = format!("  crl: {}\n", crl.display());
    let start = |name: &'static str, host: u8| {
        let text = if name == with_crl {
            node_yaml_with(net, name, host, &mesh.ca_dir, &crl_line, &w)
        } else {
            node_yaml(net, name, host, &mesh.ca_dir, &w)
        };
        (name, text)
    };
    let (na, ta) = start("node-a", 2);
    let (nb, tb) = start("node-b", 3);
    let (a, _) = mesh.node_from_file(na, &ta).await;
    let (b, _) = mesh.node_from_file(nb, &tb).await;
    let entry = echo_behind(net, &a).await;
    let tunnel = open(net, entry).await;
    CrlSetup {
        _mesh: mesh,
        a,
        b,
        ca,
        crl,
        now,
        entry,
        tunnel,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_update_cuts_the_revoked_peers_live_tunnel() {
    let net = 44;
    let CrlSetup {
        a,
        b,
        ca,
        crl,
        now,
        entry,
        tunnel: mut c,
        // Bound, not `..`: an unbound field would be dropped here, and with it the mesh.
        _mesh,
    } = crl_setup(net, "node-b").await;

    // Revoking somebody else changes the CRL but cuts nothing.
    let applied = b.stats.reloads_applied.load(Ordering::Acquire);
    rewrite(&crl, &ca.crl_pem(&["0badc0de".into()], now, HOUR).unwrap());
    wait_until("the CRL reload", LIMIT, || {
        b.stats.reloads_applied.load(Ordering::Acquire) > applied
    })
    .await;
    round_trip(&mut c, b"not revoked").await;

    // Revoking the client's certificate cuts its open tunnel and refuses new ones.
    rewrite(&crl, &ca.crl_pem(&[client_serial(&a)], now, HOUR).unwrap());
    assert_cut(&mut c).await;
    // The count is taken when B's connection task has wound down, which can be just after the
    // app already saw the cut.
    wait_until("B counts the revoked connection", LIMIT, || {
        b.stats.revoked_closed.load(Ordering::Acquire) == 1
    })
    .await;
    assert_refused(ip(net, 2), entry).await;
    assert_eq!(b.stats.revoked_closed.load(Ordering::Acquire), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_closed_at_the_deadline_while_others_are_served() {
    let net = 45;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let a = mesh.node("node-a", 2, &w).await;
    let text = node_yaml_with(
        net,
        "node-b",
        3,
        &mesh.ca_dir,
        "  handshake_timeout: 1s\n",
        &w,
    );
    mesh.node_from_file("node-b", &text).await;
    let entry = echo_behind(net, &a).await;
    let hbone = SocketAddr::new(ip(net, 3), 15008);

    let start = tokio::time::Instant::now();
    // One client says nothing; another sends half a TLS record header and stalls.
    let mut silent = TcpStream::connect(hbone).await.unwrap();
    let mut partial = TcpStream::connect(hbone).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut c = open(net, entry).await;
    round_trip(&mut c, b"a normal client is served meanwhile").await;

    for s in [&mut silent, &mut partial] {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(LIMIT, s.read(&mut buf))
            .await
            .expect("closed by the deadline");
        assert!(matches!(r, Ok(0) | Err(_)), "closed, not answered: {r:?}");
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "not before the deadline"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_on_the_client_node_cuts_pooled_tunnels_to_a_revoked_server() {
    let net = 46;
    let CrlSetup {
        a,
        b,
        ca,
        crl,
        now,
        entry,
        tunnel: mut c,
        // Bound, not `..`: an unbound field would be dropped here, and with it the mesh.
        _mesh,
    } = crl_setup(net, "node-a").await;
    assert_eq!(a.pool.connections(), 1);

    let server_serial = b
        .certs
        .cached()
        .into_iter()
        .find(|c| c.identity == id("server"))
        .unwrap()
        .serial
        .clone();
    rewrite(&crl, &ca.crl_pem(&[server_serial], now, HOUR).unwrap());
    assert_cut(&mut c).await;
    wait_until("the pool forgets the connection", LIMIT, || {
        a.pool.connections() == 0
    })
    .await;
    assert_refused(ip(net, 2), entry).await;
}
