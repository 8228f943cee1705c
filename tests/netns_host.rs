//! Tier (c): two host-mode nodes in network namespaces joined by a veth pair, with the real
//! capture rules and real `zmesh-node` processes. The apps know nothing of the mesh: A's app dials
//! B's ordinary IP:port and the rules do the rest.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown};
use std::path::Path;

use common::memory_value;
use zmesh_testbed::mesh::{connect_uncaptured, HostMesh, APP_PORT, A_IP, B_IF, B_IP};
use zmesh_testbed::{is_root, seeded_bytes, sha256, PacketCapture, IPPROTO_TCP};

const MARKER_UP: &[u8] = b"PLAINTEXT-MARKER-FROM-A-7c1f";
const MARKER_DOWN: &[u8] = b"PLAINTEXT-MARKER-FROM-B-93ad";

fn require_root() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root (CI runs as root)"
    );
}

#[test]
fn host_mode_traffic_is_hbone_only_exact_and_keeps_the_source_ip() {
    require_root();
    let mesh = HostMesh::start(Path::new(env!("CARGO_BIN_EXE_zmesh-node")), "json").unwrap();
    let listener = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();

    let mut up = MARKER_UP.to_vec();
    up.extend(seeded_bytes(31, 8 << 20));
    let mut down = MARKER_DOWN.to_vec();
    down.extend(seeded_bytes(32, 8 << 20));
    let (want_up, want_down) = (sha256(&up), sha256(&down));

    let capture = PacketCapture::start(&mesh.b, B_IF).unwrap();
    let reply = down.clone();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&reply).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        (peer, got)
    });

    let mut c = mesh.a.connect_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&up).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    let (peer, server_got) = server.join().unwrap();
    let frames = capture.stop().unwrap();

    assert_eq!(
        sha256(&server_got),
        want_up,
        "B's app received A's bytes exactly"
    );
    assert_eq!(
        sha256(&got),
        want_down,
        "A's app received B's reply exactly"
    );
    assert_eq!(
        peer.ip(),
        A_IP.parse::<IpAddr>().unwrap(),
        "B's app sees A's real IP"
    );

    let tcp: Vec<_> = frames
        .iter()
        .filter(|f| f.proto == Some(IPPROTO_TCP))
        .collect();
    assert!(
        tcp.len() > 100,
        "capture saw the transfer ({} TCP frames)",
        tcp.len()
    );
    for f in &tcp {
        let (s, d) = f.tcp_ports().unwrap();
        assert!(
            s == 15008 || d == 15008,
            "non-HBONE TCP on the wire: {s} -> {d}"
        );
    }
    for f in &frames {
        assert!(
            !f.contains(MARKER_UP) && !f.contains(MARKER_DOWN),
            "plaintext marker on the wire"
        );
    }

    let a_log = HostMesh::access_log(&mesh.node_a).join("\n");
    let b_log = HostMesh::access_log(&mesh.node_b).join("\n");
    assert!(
        a_log.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\"")
            && a_log.contains("\"dst.identity\":\"spiffe://cluster.local/ns/shop/sa/backend\"")
            && a_log.contains(&format!("\"bytes_sent\":{}", (8 << 20) + MARKER_UP.len())),
        "node A access log: {a_log}"
    );
    assert!(
        b_log.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\"")
            && b_log.contains(&format!("\"bytes_sent\":{}", (8 << 20) + MARKER_UP.len())),
        "node B access log: {b_log}"
    );
}

#[test]
fn plaintext_to_a_captured_app_port_goes_through_inbound_capture() {
    require_root();
    let mesh = HostMesh::start(Path::new(env!("CARGO_BIN_EXE_zmesh-node")), "json").unwrap();
    let listener = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    // A client with no tunnel: connect from B's peer namespace with the tunnel's mark, which
    // A's capture rules skip, so the bytes leave A as plaintext like a non-mesh client's.
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        (peer, got)
    });
    let mut c = connect_uncaptured(&mesh.a, format!("{B_IP}:{APP_PORT}").parse().unwrap()).unwrap();
    c.write_all(b"hello from outside the mesh").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (peer, got) = server.join().unwrap();
    assert_eq!(got, b"hello from outside the mesh");
    assert_eq!(peer.ip(), A_IP.parse::<IpAddr>().unwrap());
    // It went through B's :15006 (inbound plaintext), which logged it.
    let mut b_log = String::new();
    for _ in 0..50 {
        b_log = HostMesh::access_log(&mesh.node_b).join("\n");
        if b_log.contains("\"path\":\"plaintext app") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // ztunnel's direction for it is `inbound`; zmesh's `path` says it came in plaintext.
    assert!(
        b_log.contains("\"direction\":\"inbound\"")
            && b_log.contains(&format!("\"path\":\"plaintext app {B_IP}:{APP_PORT}\"")),
        "node B log: {b_log}"
    );
}

/// `original_source: false` (ztunnel's `ENABLE_ORIG_SRC=false`): B's node dials its app from its
/// own address, so the app sees B's IP; the tunnel still carries A's identity and address to B's
/// node, which logs (and would authorize) by them, and the bytes arrive exactly.
#[test]
fn original_source_off_dials_the_app_from_the_node_and_keeps_the_identity() {
    require_root();
    let mesh =
        HostMesh::start_configured(Path::new(env!("CARGO_BIN_EXE_zmesh-node")), |name, ca| {
            zmesh_testbed::mesh::node_config(
                name,
                ca,
                "  access_log: json\n  original_source: false\n",
            )
        })
        .unwrap();
    let listener = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    let up = seeded_bytes(41, 1 << 20);
    let want = sha256(&up);
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(b"ok").unwrap();
        (peer, got)
    });
    let mut c = mesh.a.connect_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    c.write_all(&up).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    let (peer, got) = server.join().unwrap();
    assert_eq!(sha256(&got), want, "B's app received A's bytes exactly");
    assert_eq!(reply, b"ok");
    assert_eq!(
        peer.ip(),
        B_IP.parse::<IpAddr>().unwrap(),
        "with original_source off the app sees the node's own address"
    );
    let mut b_log = String::new();
    for _ in 0..50 {
        b_log = HostMesh::access_log(&mesh.node_b).join("\n");
        if !b_log.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        b_log.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\"")
            && b_log.contains(&format!("\"src.addr\":\"{A_IP}:")),
        "node B logs the caller's identity and address: {b_log}"
    );
}

/// An echo server on B's app port: every connection gets its bytes back until it closes.
fn spawn_echo_in_b(mesh: &HostMesh) {
    let listener = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
}

fn echo_once(c: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    c.write_all(msg)?;
    let mut got = vec![0; msg.len()];
    c.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(())
}

/// A read that must end in a reset (never a clean EOF that would look like a complete reply).
fn assert_reset(c: &mut std::net::TcpStream) {
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("ended with {n} bytes instead of a reset"),
    }
}

/// STRICT mTLS as a policy, applied with SIGHUP to a running node: the open plaintext
/// connection (via :15006) is reset and new ones refused, while HBONE traffic from the mesh
/// peer (which has an identity) keeps flowing, open and new.
#[test]
fn strict_mtls_policy_applied_by_sighup_resets_plaintext_and_keeps_hbone() {
    require_root();
    let mesh = HostMesh::start(Path::new(env!("CARGO_BIN_EXE_zmesh-node")), "json").unwrap();
    spawn_echo_in_b(&mesh);
    let app: std::net::SocketAddr = format!("{B_IP}:{APP_PORT}").parse().unwrap();
    let mut meshed = mesh.a.connect_tcp(app.to_string()).unwrap();
    echo_once(&mut meshed, b"over HBONE").unwrap();
    let mut plain = connect_uncaptured(&mesh.a, app).unwrap();
    echo_once(&mut plain, b"plaintext via 15006").unwrap();

    let path = mesh.config_path("node-b");
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    cfg += "policies:\n  - name: strict\n    namespace: shop\n    action: deny\n    rules:\n      - clauses:\n          - matches:\n              - not_principals: [\"*\"]\n";
    std::fs::write(&path, cfg).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mesh.node_b.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    mesh.node_b
        .wait_for_log("config reloaded", std::time::Duration::from_secs(10))
        .unwrap();

    assert_reset(&mut plain);
    echo_once(&mut meshed, b"HBONE still flows").unwrap();
    let mut fresh = mesh.a.connect_tcp(app.to_string()).unwrap();
    echo_once(&mut fresh, b"new HBONE connection").unwrap();
    let mut refused = connect_uncaptured(&mesh.a, app).unwrap();
    // The reset may already be reported by the write (then a read would see a plain EOF).
    match refused.write_all(b"plaintext again") {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(()) => assert_reset(&mut refused),
    }

    let log = mesh.node_b.read_log();
    assert!(log.contains("SIGHUP: reloading the config"), "{log}");
    assert!(
        log.contains("connection closed due to policy change")
            && log.contains("denied by policy shop/strict"),
        "node B log names the closing policy: {log}"
    );
}

/// Sends one raw HTTP/1.1 request to the node admin port inside `ns` (loopback there) and
/// returns the whole answer; the request should close the connection.
fn admin_request(ns: &zmesh_testbed::Netns, req: &str) -> String {
    let mut s = ns.connect_tcp("127.0.0.1:15000").unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The admin server answers on the node's loopback only: a client in the peer namespace cannot
/// reach it, while the node's own namespace can read `/config_dump` and change log levels.
#[test]
fn admin_is_loopback_only_and_changes_log_levels() {
    require_root();
    let mesh = HostMesh::start(Path::new(env!("CARGO_BIN_EXE_zmesh-node")), "json").unwrap();
    let from_a = connect_uncaptured(&mesh.a, format!("{B_IP}:15000").parse().unwrap());
    assert!(from_a.is_err(), "admin reachable from the peer namespace");
    let http = |req: &str| admin_request(&mesh.b, req);
    let dump = http("GET /config_dump HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert!(
        dump.starts_with("HTTP/1.1 200") && dump.contains("\"node-b\""),
        "{dump}"
    );
    assert!(!dump.contains("PRIVATE KEY"));
    // The binary names its own allocator (jemalloc) and does not report glibc's counters, which
    // would describe an allocator that serves almost nothing there; the kernel's lines follow.
    let mem = http("GET /debug/memory HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert!(mem.starts_with("HTTP/1.1 200"), "{mem}");
    let value = |key: &str| memory_value(&mem, key);
    assert!(value("RssAnon") > 0 && value("RssFile") > 0, "{mem}");
    if cfg!(feature = "jemalloc") {
        assert!(mem.contains("## allocator: jemalloc"), "{mem}");
        assert!(
            !mem.contains("in_use_bytes"),
            "glibc's counters reported: {mem}"
        );
    } else {
        assert!(value("in_use_bytes") > 0, "{mem}");
    }
    let set = http("POST /logging?level=debug HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    assert!(set.starts_with("HTTP/1.1 200"), "{set}");
    let get = http("GET /logging HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert!(get.ends_with("debug\n"), "{get}");
    let bad = http("POST /logging?level=not[a]filter HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
}

/// After a load, the data-plane workers give their allocator caches back (`zmesh::alloc`): both
/// nodes count trims on `/debug/memory` that the load caused (a baseline is read first) and,
/// once the load is over, no worker is left waiting for a nudge (one that stayed pending would
/// hold its cache and keep the nudger waking the node). The bytes through the tunnel are exact
/// while caches are flushed under them. The nodes are real processes, so the wait for their
/// nudges is a poll with a deadline.
#[test]
fn workers_give_their_allocator_caches_back_after_a_load() {
    require_root();
    let mesh = HostMesh::start(Path::new(env!("CARGO_BIN_EXE_zmesh-node")), "off").unwrap();
    spawn_echo_in_b(&mesh);
    let report = |ns: &zmesh_testbed::Netns| {
        admin_request(
            ns,
            "GET /debug/memory HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
    };
    if !cfg!(feature = "jemalloc") {
        // Without jemalloc there are no thread caches to flush, and nothing is reported.
        assert!(!report(&mesh.a).contains("thread_cache_trims"));
        return;
    }
    let before = [&mesh.a, &mesh.b].map(|ns| memory_value(&report(ns), "thread_cache_trims"));
    let app = format!("{B_IP}:{APP_PORT}");
    // Concurrent connections, each with several round trips of a few KiB: each node's workers
    // free many MiB, far more than the 256 KiB that makes a worker's cache worth flushing.
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let (mesh, app) = (&mesh, &app);
            s.spawn(move || {
                for i in 0..25u8 {
                    let mut c = mesh.a.connect_tcp(app.as_str()).unwrap();
                    for round in 0..4u8 {
                        let msg = vec![t ^ i ^ round; 4096 + usize::from(i) * 97];
                        echo_once(&mut c, &msg).unwrap();
                    }
                }
            });
        }
    });
    for ((name, ns), before) in [("A", &mesh.a), ("B", &mesh.b)].into_iter().zip(before) {
        // A nudge comes a second after a worker became pending; allow for a slow machine.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let mem = report(ns);
            let (trims, pending) = (
                memory_value(&mem, "thread_cache_trims"),
                memory_value(&mem, "workers_pending_trim"),
            );
            if trims > before && pending == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {name}: {trims} trims ({before} before the load), {pending} workers still pending: {mem}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}
