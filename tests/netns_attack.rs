//! Tier (c) attack suite against real `zmesh-node` processes in network namespaces, with the
//! real capture rules (docs/reliability.md #7 and #38). The attacker sits in node A's namespace
//! and speaks to node B over the veth link, as a peer on the network would.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_flood_bounded, connect_req, hbone_over, reset_after_200, reset_flood, status};
use zmesh::identity::SpiffeId;
use zmesh_testbed::mesh::{connect_uncaptured, HostMesh, APP_PORT, B_IP};
use zmesh_testbed::{is_root, Netns};

fn require_root() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root (CI runs as root)"
    );
}

/// The node binary under attack: this build's, or another (`ZMESH_NODE_BIN`, e.g. the build
/// before a fix, to see the attack succeed there).
fn node_bin() -> std::path::PathBuf {
    std::env::var_os("ZMESH_NODE_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_zmesh-node").into())
}

fn sid(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

/// Open descriptors and resident memory (KiB) of a process.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (fds, rss)
}

/// An HBONE client in `ns` to node B's :15008, as app A's identity.
async fn hbone_from(
    ns: &Netns,
    mesh: &HostMesh,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let addr: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let tcp = connect_uncaptured(ns, addr).map_err(|e| format!("{e:#}"))?;
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    hbone_over(
        tcp,
        &mesh.dir.path().join("ca"),
        &sid("frontend"),
        &sid("backend"),
    )
    .await
}

/// A captured round trip from app A to app B through both tunnels: the mesh still works.
fn legit_round_trip(mesh: &HostMesh, listener: &std::net::TcpListener, msg: &[u8]) {
    let mut c = mesh.a.connect_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(msg).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, msg);
    s.write_all(b"ok").unwrap();
    drop(s);
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"ok");
}

/// Reliability #38: for seconds, a peer connects in plaintext to B's workload address at
/// :15006 itself and sends CONNECTs naming B's own listener ports. Every attempt is refused,
/// node B never dials itself: its descriptors and memory stay flat, and real traffic flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_dial_attacks_leave_the_node_flat_and_serving() {
    require_root();
    let mesh = HostMesh::start(&node_bin(), "json").unwrap();
    let listener = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    let pid = mesh.node_b.pid();
    legit_round_trip(&mesh, &listener, b"before");
    let (fds0, rss0) = fds_and_rss(pid);

    let plain: SocketAddr = format!("{B_IP}:15006").parse().unwrap();
    let mut send = hbone_from(&mesh.a, &mesh).await.unwrap();
    let start = Instant::now();
    let (mut plain_refused, mut connect_refused) = (0, 0);
    while start.elapsed() < Duration::from_secs(3) {
        // Plaintext to :15006 itself: the node must reset it, not dial :15006 again.
        let mut c = connect_uncaptured(&mesh.a, plain).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(b"loop?");
        let mut buf = [0u8; 8];
        match c.read(&mut buf) {
            Ok(0) | Err(_) => plain_refused += 1,
            Ok(n) => panic!("the node answered {n} bytes on its own :15006"),
        }
        // CONNECT to each of the node's own listeners: 400, never dialed.
        for port in [15000, 15001, 15006, 15008, 15020, 15021] {
            let authority = format!("{B_IP}:{port}");
            let got = status(&mut send, connect_req(&authority)).await;
            assert_eq!(got, Ok(http::StatusCode::BAD_REQUEST), "{authority}");
            connect_refused += 1;
        }
    }
    // Let anything in flight settle, then look at the node.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds1, rss1) = fds_and_rss(pid);
    eprintln!(
        "{plain_refused} plaintext and {connect_refused} CONNECT self-targets refused; \
         node B fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB"
    );
    assert!(plain_refused >= 50 && connect_refused >= 300);
    assert!(
        fds1 <= fds0 + 8,
        "node B's descriptors grew: {fds0} -> {fds1}"
    );
    assert!(
        rss1 <= rss0 + 8 * 1024,
        "node B's memory grew: {rss0} -> {rss1} KiB"
    );
    legit_round_trip(&mesh, &listener, b"after");
    let log = mesh.node_b.read_log();
    assert!(log.contains("self_target"), "the refusals are logged");
}

/// Reliability #7 against the real binary: ten HEADERS+RST_STREAM floods of 10,000 streams, each
/// on its own connection, then the slow form (reset after each 200). Node B's dials to the app stay under zmesh's bound every time, and the
/// node serves real traffic afterwards with its descriptors back to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_floods_against_the_real_node_are_bounded() {
    require_root();
    let mesh = HostMesh::start(&node_bin(), "json").unwrap();
    let listener = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    let pid = mesh.node_b.pid();
    legit_round_trip(&mesh, &listener, b"before");
    let (fds0, _) = fds_and_rss(pid);

    // Count every connection node B makes to the app, and close it.
    let dials = Arc::new(AtomicUsize::new(0));
    let counter = listener.try_clone().unwrap();
    counter.set_nonblocking(true).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counting = {
        let (dials, stop) = (dials.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match counter.accept() {
                    Ok(_) => {
                        dials.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    };
    let target = format!("{B_IP}:{APP_PORT}");
    for run in 0..10 {
        assert_flood_bounded(&format!("run {run}"), &dials, async {
            reset_flood(hbone_from(&mesh.a, &mesh).await.unwrap(), &target, 10_000).await
        })
        .await;
    }
    // The slow form: each stream reset right after its 200, so each cost a dial; zmesh's
    // budget closes the connection with ENHANCE_YOUR_CALM.
    assert_flood_bounded("slow form", &dials, async {
        reset_after_200(hbone_from(&mesh.a, &mesh).await.unwrap(), &target, 1_000).await
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    counting.join().unwrap();
    // The clone shares the listener's file status: make it blocking again for the round trip.
    listener.set_nonblocking(false).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds1, _) = fds_and_rss(pid);
    assert!(
        fds1 <= fds0 + 8,
        "node B's descriptors grew: {fds0} -> {fds1}"
    );
    legit_round_trip(&mesh, &listener, b"after");
}

/// Reliability #29: node B runs out of descriptors (its RLIMIT_NOFILE lowered to just above what
/// it holds, with `prlimit`, while it runs) under a pile of idle connections to :15008 from a
/// peer. Accepting fails, and is counted as `zmesh_rejected_total{reason="accept_failed"}`; the
/// loop backs off instead of ending or spinning. When the peer lets go, B accepts again and
/// carries real traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_counted_and_the_node_recovers() {
    require_root();
    let mesh = HostMesh::start(&node_bin(), "json").unwrap();
    let listener = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    let pid = mesh.node_b.pid();
    legit_round_trip(&mesh, &listener, b"before");
    let (fds0, _) = fds_and_rss(pid);
    let limit = fds0 + 16;
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "prlimit: {out:?}");

    // Idle TCP connections to :15008 (no TLS): each holds a descriptor of B's until the
    // handshake deadline. Twice the headroom, so accepts must fail.
    let hbone: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let held: Vec<_> = (0..32)
        .map(|_| connect_uncaptured(&mesh.a, hbone).unwrap())
        .collect();
    let metrics: SocketAddr = format!("{B_IP}:15020").parse().unwrap();
    let failed = |text: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("zmesh_rejected_total{")
                    && l.contains("reason=\"accept_failed\"")
                    && l.contains("listener=\"HBONE\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let scrape = || -> String {
        // The metrics listener needs a descriptor too: retry until one is free.
        for _ in 0..100 {
            if let Ok(mut c) = connect_uncaptured(&mesh.a, metrics) {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ =
                    c.write_all(b"GET /metrics HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n");
                let mut text = String::new();
                if c.read_to_string(&mut text).is_ok() && text.contains("zmesh_") {
                    return text;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node B's metrics never answered");
    };
    // B takes descriptors until none is left, then its accepts fail (and back off).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds_and_rss(pid).0 + 1 < limit {
        assert!(
            Instant::now() < deadline,
            "B never ran out: {} of {limit} descriptors",
            fds_and_rss(pid).0
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A few of its 50 ms accept back-offs.
    std::thread::sleep(Duration::from_millis(300));
    drop(held);
    // B's handshakes of the dropped peers end (EOF); its descriptors come back, and so do its
    // accepts. The failures it saw meanwhile were counted.
    let mut text = scrape();
    while failed(&text) == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        text = scrape();
    }
    assert!(failed(&text) > 0.0, "no accept failure was counted: {text}");
    legit_round_trip(&mesh, &listener, b"after");
    let log = mesh.node_b.read_log();
    assert!(
        log.contains("accept failed; retrying"),
        "the failure is logged"
    );
    assert!(
        mesh.node_b.try_wait().unwrap().is_none(),
        "node B died of running out of descriptors"
    );
}
