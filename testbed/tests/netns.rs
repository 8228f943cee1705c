//! Tier (c) self-tests of the testbed: real namespaces, veth pairs, a
//! bridge, spawned processes and packet capture. They need root and fail
//! (never skip) without it.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use anyhow::Result;
use zmesh_testbed::{
    attach_to_bridge, link_veth, random_bytes, require_root, sha256, Netns, PacketCapture,
};

fn netns_exists(name: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn veth_tcp_marker_is_captured_and_namespaces_are_removed() -> Result<()> {
    require_root();
    let a = Netns::new("tb-veth")?;
    let b = Netns::new("tb-veth")?;
    let names = [a.name().to_owned(), b.name().to_owned()];
    assert!(names.iter().all(|n| netns_exists(n)));
    assert_eq!(
        b.path(),
        std::path::Path::new("/var/run/netns").join(&names[1])
    );

    link_veth(&a, "veth-a", "10.213.1.1/24", &b, "veth-b", "10.213.1.2/24")?;
    let cap = PacketCapture::start(&b, "veth-b")?;

    let listener = b.listen_tcp("10.213.1.2:0")?;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut conn, _) = listener.accept()?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)?;
        conn.write_all(b"ok")?;
        Ok(got)
    });

    let marker = b"ZMESH-TESTBED-MARKER-7f3a";
    let mut client = a.connect_tcp(("10.213.1.2", port))?;
    client.write_all(marker)?;
    client.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    client.read_to_end(&mut reply)?;
    assert_eq!(reply, b"ok");
    assert_eq!(server.join().expect("server thread")?, marker);

    let frames = cap.stop()?;
    let hit = frames
        .iter()
        .find(|f| f.contains(marker))
        .unwrap_or_else(|| panic!("marker not in {} captured frames", frames.len()));
    let (sport, dport) = hit.tcp_ports().expect("marker frame is TCP");
    assert_eq!(dport, port);
    assert_ne!(sport, port);
    assert_eq!(hit.src, Some("10.213.1.1".parse()?));
    assert_eq!(hit.dst, Some("10.213.1.2".parse()?));
    assert!(!hit.outgoing, "captured on the receiving side");
    assert_eq!(hit.payload, marker);
    // Both directions are visible: B's replies are outgoing frames.
    assert!(frames
        .iter()
        .any(|f| f.outgoing && f.tcp_ports() == Some((port, sport))));
    assert!(frames.iter().any(|f| f.is_tcp_syn()));

    drop(client);
    drop(a);
    drop(b);
    for n in &names {
        assert!(!netns_exists(n), "{n} still exists after drop");
    }
    Ok(())
}

#[test]
fn namespace_is_deleted_when_test_panics() -> Result<()> {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let ns = Netns::new("tb-panic").expect("netns");
        tx.send(ns.name().to_owned()).expect("send");
        panic!("simulated test failure");
    });
    assert!(result.is_err());
    let name = rx.recv()?;
    assert!(!netns_exists(&name), "{name} leaked after panic");
    Ok(())
}

#[test]
fn exec_sysctl_spawn_and_process_cleanup() -> Result<()> {
    require_root();
    let ns = Netns::new("tb-exec")?;
    assert!(ns.exec(&["ip", "link", "show", "lo"])?.contains("UP"));
    let err = ns.exec(&["ls", "/nonexistent-zmesh"]).unwrap_err();
    assert!(format!("{err:#}").contains("No such file"), "{err:#}");

    // Flip the value both ways and check the host's never changes, proving
    // the write lands in the namespace only.
    let host_fwd = || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward");
    let host_before = host_fwd()?;
    for v in ["1", "0"] {
        ns.sysctl("net.ipv4.ip_forward", v)?;
        assert_eq!(ns.exec(&["sysctl", "-n", "net.ipv4.ip_forward"])?.trim(), v);
        assert_eq!(host_fwd()?, host_before);
    }

    let child = ns.spawn(
        "sh",
        &[
            "-c",
            "echo hello $TB_VAR; ip -o link show lo; echo err >&2; exec sleep 600",
        ],
        &[("TB_VAR", "world")],
    )?;
    child.wait_for_log("err", Duration::from_secs(10))?;
    let log = child.read_log();
    assert!(log.contains("hello world"), "{log}");
    assert!(log.contains("lo:"), "{log}");
    assert!(child.log_path().exists());
    assert_eq!(child.try_wait()?, None);

    // A child still alive when its namespace goes away is killed by it.
    let pid = child.pid();
    drop(ns);
    assert!(child.try_wait()?.is_some(), "sleep survived netns drop");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    let log_path = child.log_path().to_owned();
    drop(child);
    assert!(!log_path.exists(), "log kept after a passing test");

    // A failing process reports its log.
    let ns = Netns::new("tb-exec")?;
    let quitter = ns.spawn("sh", &["-c", "echo bye; exit 3"], &[])?;
    let err = quitter
        .wait_for_log("never", Duration::from_secs(10))
        .unwrap_err();
    assert!(format!("{err:#}").contains("bye"), "{err:#}");
    Ok(())
}

#[test]
fn bridge_connects_pods_through_node() -> Result<()> {
    require_root();
    let node = Netns::new("tb-node")?;
    let p1 = Netns::new("tb-pod")?;
    let p2 = Netns::new("tb-pod")?;
    node.add_bridge("zbr0", "10.213.2.1/24")?;
    let port1 = attach_to_bridge(&node, "zbr0", &p1, "eth0", "10.213.2.2/24", "10.213.2.1")?;
    attach_to_bridge(&node, "zbr0", &p2, "eth0", "10.213.2.3/24", "10.213.2.1")?;
    assert!(p1
        .ip(&["route", "show", "default"])?
        .contains("via 10.213.2.1"));

    let cap = PacketCapture::start(&node, &port1)?;
    let listener = p2.listen_tcp("10.213.2.3:0")?;
    let port = listener.local_addr()?.port();
    let body = random_bytes(256 * 1024);
    let digest = sha256(&body);
    let server = std::thread::spawn(move || -> std::io::Result<[u8; 32]> {
        let (mut conn, _) = listener.accept()?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)?;
        Ok(sha256(&got))
    });
    let mut client = p1.connect_tcp(("10.213.2.3", port))?;
    client.write_all(&body)?;
    drop(client);
    assert_eq!(server.join().expect("server")?, digest);

    // Pods reach the node's bridge address (their gateway) too.
    let node_listener = node.listen_tcp("10.213.2.1:0")?;
    p1.connect_tcp(node_listener.local_addr()?)?;

    let frames = cap.stop()?;
    assert!(frames
        .iter()
        .any(|f| f.tcp_ports().is_some_and(|(_, d)| d == port)));
    Ok(())
}

#[test]
fn capture_rejects_missing_interface_and_bad_names() -> Result<()> {
    require_root();
    let ns = Netns::new("tb-bad")?;
    assert!(PacketCapture::start(&ns, "nope0").is_err());
    let other = Netns::new("tb-bad")?;
    let err = link_veth(
        &ns,
        "this-name-is-too-long",
        "10.213.3.1/24",
        &other,
        "x",
        "10.213.3.2/24",
    )
    .unwrap_err();
    assert!(err.to_string().contains("1..=15"), "{err}");
    assert!(Netns::new("bad prefix").is_err());
    Ok(())
}

#[test]
fn sweep_stale_deletes_only_dead_owners() -> Result<()> {
    require_root();
    // Above any pid_max, so this "owner" can never be alive.
    let stale = "tb-sweep-3999999999-0";
    let status = std::process::Command::new("ip")
        .args(["netns", "add", stale])
        .status()?;
    assert!(status.success());
    let live = Netns::new("tb-sweep")?;
    assert_eq!(zmesh_testbed::sweep_stale("tb-sweep")?, 1);
    assert!(!netns_exists(stale));
    assert!(netns_exists(live.name()));
    Ok(())
}
