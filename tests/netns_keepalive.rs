//! Tier (c), reliability #25: a peer node that dies mid-stream. Two real `zmesh-node`
//! processes in network namespaces (testbed `HostMesh`), with the HBONE keepalive shortened to
//! `node.ping_interval: 1s` + `node.ping_timeout: 2s` (defaults 10 s + 20 s, proven with paused
//! time in `src/hbone/mod.rs`). Node B is black-holed with iptables DROP while a tunnel is open;
//! both applications must see a reset within interval + timeout, and node A's pool must not
//! reuse the dead connection once B is reachable again.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use zmesh_testbed::mesh::{node_config, HostMesh, APP_PORT, B_IP};
use zmesh_testbed::{is_root, Netns};

const PING_INTERVAL: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Scheduling and log slack on a loaded CI machine, on top of interval + timeout.
const MARGIN: Duration = Duration::from_secs(2);
/// The iptables comment of the rule that counts SYNs to :15008 at node B.
const SYN_COUNTER: &str = "zmesh-ka-syn";

fn require_root() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root (CI runs as root)"
    );
}

/// The two-node config of the testbed's `HostMesh`, with the shortened keepalive.
fn config(name: &str, ca: &Path) -> String {
    node_config(
        name,
        ca,
        &format!(
            "  access_log: off\n  ping_interval: {}ms\n  ping_timeout: {}ms\n",
            PING_INTERVAL.as_millis(),
            PING_TIMEOUT.as_millis()
        ),
    )
}

fn iptables(ns: &Netns, args: &[&str]) {
    let mut cmd = vec!["iptables", "-w"];
    cmd.extend_from_slice(args);
    ns.exec(&cmd)
        .unwrap_or_else(|e| panic!("iptables {args:?} in {}: {e:#}", ns.name()));
}

/// SYNs node B has received on :15008: one per HBONE connection dialed to it.
fn hbone_dials(b: &Netns) -> u64 {
    let out = b.exec(&["iptables", "-w", "-nvxL", "INPUT"]).unwrap();
    out.lines()
        .find(|l| l.contains(SYN_COUNTER))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {SYN_COUNTER} counter in:\n{out}"))
}

/// Established TCP connections from node A's namespace to :15008.
fn established_hbone(a: &Netns) -> usize {
    a.exec(&["ss", "-Htn", "state", "established", "( dport = :15008 )"])
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `istio_tcp_sockets_open` summed over its series at node A: proxied connections whose relay
/// task is still running.
fn sockets_open(a: &Netns) -> i64 {
    a.http_get("127.0.0.1:15020", "/metrics")
        .lines()
        .filter(|l| l.starts_with("istio_tcp_sockets_open{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// App A opens a captured connection to app B and exchanges `msg` both ways; both ends stay
/// open.
fn open_tunnel(
    mesh: &HostMesh,
    app_b: &std::net::TcpListener,
    msg: &[u8],
) -> (TcpStream, TcpStream) {
    let mut a = mesh.a.connect_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    a.write_all(msg).unwrap();
    let (mut b, _) = app_b.accept().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; msg.len()];
    b.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
    b.write_all(msg).unwrap();
    a.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
    (a, b)
}

/// Reads until the connection ends: how it ended, and when.
fn read_end(mut s: TcpStream, from: Instant) -> (std::io::Result<usize>, Duration) {
    let mut buf = [0u8; 64];
    let r = s.read(&mut buf);
    (r, from.elapsed())
}

#[test]
fn a_black_holed_peer_resets_the_tunnel_and_leaves_the_pool() {
    require_root();
    let bin = Path::new(env!("CARGO_BIN_EXE_zmesh-node"));
    let mesh = HostMesh::start_configured(bin, config).unwrap();
    let app_b = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    // A rule without a target only counts: SYNs to B's HBONE port, i.e. dials of node A's pool.
    iptables(
        &mesh.b,
        &[
            "-I",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "15008",
            "--syn",
            "-m",
            "comment",
            "--comment",
            SYN_COUNTER,
        ],
    );

    // Warm up: the pool holds one connection to B, and no tunnel is open.
    let (a0, b0) = open_tunnel(&mesh, &app_b, b"warm-up");
    drop((a0, b0));
    assert_eq!(hbone_dials(&mesh.b), 1);
    wait_for(
        "node A's relays of the warm-up to end",
        Duration::from_secs(5),
        || sockets_open(&mesh.a) == 0,
    );
    let pid_a = mesh.node_a.pid();
    let fds0 = open_fds(pid_a);

    // A tunnel over the pooled connection, mid-stream when B goes dark.
    let (a1, b1) = open_tunnel(&mesh, &app_b, b"before the drop");
    assert_eq!(
        hbone_dials(&mesh.b),
        1,
        "the second tunnel reused the connection"
    );
    let dropped = Instant::now();
    iptables(
        &mesh.b,
        &["-I", "INPUT", "-p", "tcp", "--dport", "15008", "-j", "DROP"],
    );
    iptables(
        &mesh.b,
        &[
            "-I", "OUTPUT", "-p", "tcp", "--sport", "15008", "-j", "DROP",
        ],
    );
    let (ended_a, ended_b) = std::thread::scope(|s| {
        let b = s.spawn(|| read_end(b1, dropped));
        (read_end(a1, dropped), b.join().unwrap())
    });
    let bound = PING_INTERVAL + PING_TIMEOUT + MARGIN;
    for (who, (r, at)) in [("app A", ended_a), ("app B", ended_b)] {
        match r {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{who} saw {e} ({:?}) after {at:?}, not a reset", e.kind()),
            Ok(0) => panic!("{who} saw a clean EOF after {at:?}: a dead peer must be a reset"),
            Ok(n) => panic!("{who} read {n} bytes from a black hole"),
        }
        // No PING sent after the DROP can be answered, so nothing ends before the timeout.
        assert!(
            at >= PING_TIMEOUT && at <= bound,
            "{who} saw the reset after {at:?}, outside [{PING_TIMEOUT:?}, {bound:?}]"
        );
        eprintln!("{who}: reset {at:?} after the DROP");
    }
    assert!(
        mesh.node_a
            .read_log()
            .contains("HBONE peer stopped answering PINGs"),
        "node A's keepalive, not something else, ended the connection:\n{}",
        mesh.node_a.read_log()
    );

    // B comes back: the next tunnel dials a NEW HBONE connection, and only it is established.
    iptables(
        &mesh.b,
        &[
            "-D", "OUTPUT", "-p", "tcp", "--sport", "15008", "-j", "DROP",
        ],
    );
    iptables(
        &mesh.b,
        &["-D", "INPUT", "-p", "tcp", "--dport", "15008", "-j", "DROP"],
    );
    let (a2, b2) = open_tunnel(&mesh, &app_b, b"after the drop");
    assert_eq!(hbone_dials(&mesh.b), 2, "the pool dialed a new connection");
    assert_eq!(
        established_hbone(&mesh.a),
        1,
        "the dead connection is closed"
    );
    drop((a2, b2));

    // Nothing leaked: every relay ended, and node A holds as many descriptors as before the
    // tunnel (one pooled connection then, one now).
    wait_for("node A's relays to end", Duration::from_secs(5), || {
        sockets_open(&mesh.a) == 0
    });
    wait_for(
        "node A's descriptors to return",
        Duration::from_secs(5),
        || open_fds(pid_a) <= fds0,
    );
}
