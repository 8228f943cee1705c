//! Tier (c): two networks that cannot route to each other, joined only by their east-west
//! gateways (testbed/src/networks.rs), with real `zmesh-node` processes and capture rules:
//! double HBONE end to end (docs/model.md "Networks", docs/hbone.md "Double HBONE").

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zmesh_testbed::mesh::connect_uncaptured;
use zmesh_testbed::networks::{
    shared_config, TwoNetworks, A2_IP, APP_PORT, B1_IP, GA_BRIDGE, GA_LAN, GA_LINK_IF, GB_BRIDGE,
    GB_LAN, LAPTOP_IP,
};
use zmesh_testbed::{is_root, run_ok, seeded_bytes, sha256, PacketCapture, IPPROTO_TCP};

const UP: &[u8] = b"CROSS-NETWORK-MARKER-UP-5e1d";

fn require_root() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root (CI runs as root)"
    );
}

fn node_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_zmesh-node"))
}

/// An app that answers every connection with `name`, then echoes until EOF; counts accepts.
fn named_echo(l: TcpListener, name: &'static str) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = s.write_all(name.as_bytes());
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    accepted
}

/// Connects (captured) from `ns` to `addr`, reads the app's name, echoes `msg` once.
fn ask(ns: &zmesh_testbed::Netns, addr: &str, msg: &[u8]) -> std::io::Result<String> {
    let mut c = ns
        .connect_tcp(addr)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut name = [0u8; 2];
    c.read_exact(&mut name)?;
    c.write_all(msg)?;
    let mut back = vec![0; msg.len()];
    c.read_exact(&mut back)?;
    assert_eq!(back, msg);
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// Lines of `node`'s log containing `needle`, waiting up to 5 s for the first.
fn log_lines(node: &zmesh_testbed::Child, needle: &str) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<String> = node
            .read_log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect();
        if !lines.is_empty() || Instant::now() > end {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Only A1's identity may reach B1's app; only A1's identity may use network-b's gateway.
const POLICIES: &str = r#"policies:
  - name: db-b-from-frontend
    namespace: data
    scope: { workload_selector: { workloads: [db-b] } }
    action: allow
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/shop/sa/frontend"]
  - name: gateway-b-callers
    namespace: istio-system
    scope: { workload_selector: { workloads: [eastwest-b] } }
    action: allow
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/shop/sa/frontend"]
"#;

#[test]
fn a_pod_reaches_another_networks_service_only_through_the_gateway_with_its_own_identity() {
    require_root();
    let t = TwoNetworks::start(node_bin(), POLICIES).unwrap();
    let b1_accepts = named_echo(
        t.b1.listen_tcp(format!("{B1_IP}:{APP_PORT}")).unwrap(),
        "B1",
    );
    let _a2_accepts = named_echo(
        t.a2.listen_tcp(format!("{A2_IP}:{APP_PORT}")).unwrap(),
        "A2",
    );

    // The networks do not route to each other: B1 is unreachable from A1 except by the mesh.
    let direct = connect_uncaptured(&t.a1, format!("{B1_IP}:{APP_PORT}").parse().unwrap());
    assert!(direct.is_err(), "A1 reached B1 without the gateways");

    let link = PacketCapture::start(&t.ga, GA_LINK_IF).unwrap();
    let behind_gateway = PacketCapture::start(&t.gb, GB_BRIDGE).unwrap();
    let mut up = UP.to_vec();
    up.extend(seeded_bytes(71, 4 << 20));
    let want = sha256(&up);
    // only-b (10.96.207.2:5432) has its endpoints only on network-b. Its app names itself,
    // then echoes: A1's 4 MiB cross both networks twice, once each way.
    let mut c = t.a1.connect_tcp("10.96.207.2:5432").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut name = [0u8; 2];
    c.read_exact(&mut name).unwrap();
    assert_eq!(&name, b"B1");
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&up).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), UP.len() + (4 << 20), "no byte lost or added");
    assert_eq!(
        sha256(&got),
        want,
        "A1's bytes came back exactly through both networks"
    );
    let frames = link.stop().unwrap();
    let relayed = behind_gateway.stop().unwrap();

    for (what, frames) in [
        ("inter-network link", &frames),
        ("network-b behind GB", &relayed),
    ] {
        let tcp: Vec<_> = frames
            .iter()
            .filter(|f| f.proto == Some(IPPROTO_TCP))
            .collect();
        assert!(
            tcp.len() > 100,
            "{what}: capture saw the transfer ({} TCP frames)",
            tcp.len()
        );
        for f in &tcp {
            let (s, d) = f.tcp_ports().unwrap();
            assert!(s == 15008 || d == 15008, "{what}: non-HBONE TCP {s} -> {d}");
        }
        for f in frames.iter() {
            assert!(!f.contains(UP), "{what}: plaintext marker on the wire");
        }
    }

    // B1 judged and logged A1's identity (its policy admits no other), seen from the gateway.
    let b1_log = log_lines(&t.b1_node, "connection complete").join("\n");
    assert!(
        b1_log.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\"")
            && b1_log.contains(&format!("\"src.addr\":\"{GB_LAN}:")),
        "B1's access log: {b1_log}"
    );
    let a1_log = log_lines(&t.a1_node, "double hbone via").join("\n");
    assert!(
        a1_log.contains("only-b.data.svc.cluster.local:5432")
            && a1_log.contains("\"dst.workload\":\"db-b\""),
        "A1's access log: {a1_log}"
    );
    // The gateway relayed it by service name, and never held the inner session's plaintext.
    let gb_log = log_lines(&t.gb_node, "gateway relay").join("\n");
    assert!(
        gb_log.contains("gateway relay only-b.data.svc.cluster.local:5432 to 10.207.2.11:15008")
            && gb_log.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\""),
        "GB's access log: {gb_log}"
    );
    let gb_all = t.gb_node.read_log();
    assert!(
        !gb_all.contains("CROSS-NETWORK-MARKER"),
        "GB logged payload"
    );

    // Another identity (A2's db) is refused at network-b's gateway, and B1 is never reached.
    let before = b1_accepts.load(Ordering::SeqCst);
    let refused = ask(&t.a2, "10.96.207.2:5432", b"x");
    assert!(
        refused.is_err(),
        "db-a got through network-b's gateway: {refused:?}"
    );
    let denied = log_lines(&t.gb_node, "denied_by_policy").join("\n");
    assert!(
        denied.contains("cluster.local/ns/data/sa/db"),
        "GB logs the refusal: {denied}"
    );
    assert_eq!(
        b1_accepts.load(Ordering::SeqCst),
        before,
        "B1's app was dialed"
    );

    // The other way: B1 reaches web, whose endpoint is on network-a, through GA.
    assert_eq!(ask(&t.b1, "10.96.207.3:80", b"from-b1").unwrap(), "A2");
    let a2_log = log_lines(
        &t.a2_node,
        "\"src.identity\":\"spiffe://cluster.local/ns/data/sa/db-b\"",
    )
    .join("\n");
    assert!(
        a2_log.contains("\"direction\":\"inbound\"") && a2_log.contains("connection complete"),
        "A2's access log: {a2_log}"
    );
}

#[test]
fn a_service_prefers_its_own_network_and_fails_over_to_the_other_one() {
    require_root();
    let t = TwoNetworks::start(node_bin(), "").unwrap();
    named_echo(
        t.b1.listen_tcp(format!("{B1_IP}:{APP_PORT}")).unwrap(),
        "B1",
    );
    named_echo(
        t.a2.listen_tcp(format!("{A2_IP}:{APP_PORT}")).unwrap(),
        "A2",
    );
    // db has endpoints on both networks: A1 is always served on its own.
    for i in 0..10 {
        assert_eq!(
            ask(&t.a1, "10.96.207.1:80", format!("{i}").as_bytes()).unwrap(),
            "A2"
        );
    }
    // The local endpoint goes away: the remote one, through network-b's gateway.
    t.set_a2_health("a1", false).unwrap();
    for i in 0..5 {
        assert_eq!(
            ask(&t.a1, "10.96.207.1:80", format!("{i}").as_bytes()).unwrap(),
            "B1"
        );
    }
    assert!(!log_lines(&t.gb_node, "gateway relay db.data.svc.cluster.local:80").is_empty());
    // It comes back: traffic stays home again.
    t.set_a2_health("a1", true).unwrap();
    assert_eq!(ask(&t.a1, "10.96.207.1:80", b"back").unwrap(), "A2");
}

const NOBODY: u32 = 65534;

/// A laptop on network-a with no capture rules and no root, holding only a certificate the
/// mesh CA signed for it, reaches a service whose endpoints are all on network-b: through a
/// port map and through SOCKS5 by name, across network-b's gateway, with its own identity.
#[test]
fn a_laptop_without_capture_reaches_another_network_through_the_gateway() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let t = TwoNetworks::start(node_bin(), "").unwrap();
    named_echo(
        t.b1.listen_tcp(format!("{B1_IP}:{APP_PORT}")).unwrap(),
        "B1",
    );
    let lap = zmesh_testbed::Netns::new("znL").unwrap();
    zmesh_testbed::attach_to_bridge(
        &t.ga,
        GA_BRIDGE,
        &lap,
        "eth0",
        &format!("{LAPTOP_IP}/24"),
        GA_LAN,
    )
    .unwrap();

    // The key is made by the laptop's (unprivileged) user; the CA only signs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("laptop");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let (key, csr, cert, roots) = (
        home.join("key.pem"),
        home.join("laptop.csr"),
        home.join("cert-chain.pem"),
        home.join("root-cert.pem"),
    );
    let bin = node_bin().to_str().unwrap();
    run_ok(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin])
            .args(["ca", "csr", "--identity", "shop/laptop", "--key-out"])
            .arg(&key)
            .arg("--csr-out")
            .arg(&csr),
    );
    let ca = t.dir.path().join("ca");
    run_ok(
        std::process::Command::new(bin)
            .args(["ca", "sign", "--identity", "shop/laptop", "--dir"])
            .arg(&ca)
            .arg("--csr")
            .arg(&csr)
            .arg("--out")
            .arg(&cert),
    );
    std::fs::copy(ca.join("root-cert.pem"), &roots).unwrap();
    let cfg = home.join("laptop.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node:\n  name: laptop\n  network: network-a\n  access_log: json\n  certificates:\n    static:\n      roots: {}\n      identities: [{{ cert: {}, key: {} }}]\n{}",
            roots.display(),
            cert.display(),
            key.display(),
            shared_config("connect:\n  workload: laptop\n")
        ),
    )
    .unwrap();
    for f in [&cert, &roots, &cfg] {
        std::os::unix::fs::chown(f, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let connect = lap
        .spawn(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                bin,
                "connect",
                "--config",
                cfg.to_str().unwrap(),
                "--forward",
                "127.0.0.1:15432=only-b.data.svc.cluster.local:5432",
                "--socks5",
                "127.0.0.1:1080",
            ],
            &[("ZMESH_LOG", "info")],
        )
        .unwrap();
    connect
        .wait_for_log("zmesh connect ready", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}: {}", connect.read_log()));

    // The port map.
    assert_eq!(ask(&lap, "127.0.0.1:15432", b"via-port-map").unwrap(), "B1");
    // SOCKS5 by name (resolved by the mesh model, never by DNS).
    let mut c = lap.connect_tcp("127.0.0.1:1080").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[5, 1, 0]).unwrap();
    let mut method = [0u8; 2];
    c.read_exact(&mut method).unwrap();
    assert_eq!(method, [5, 0]);
    let host = b"only-b.data.svc.cluster.local";
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host);
    req.extend_from_slice(&5432u16.to_be_bytes());
    c.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(
        reply[1], 0,
        "SOCKS5 success only once the tunnel is up: {reply:?}"
    );
    let mut name = [0u8; 2];
    c.read_exact(&mut name).unwrap();
    assert_eq!(&name, b"B1");
    c.write_all(b"via-socks5").unwrap();
    let mut back = [0u8; 10];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"via-socks5");

    let b1 = log_lines(&t.b1_node, "sa/laptop").join("\n");
    assert!(
        b1.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/laptop\""),
        "B1 sees the laptop's identity: {b1}"
    );
    let gb = log_lines(&t.gb_node, "sa/laptop").join("\n");
    assert!(
        gb.contains("gateway relay only-b.data.svc.cluster.local:5432"),
        "{gb}"
    );
}
