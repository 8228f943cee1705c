//! Tier (c), issue #4's topology: two nodes, each a netns with a bridge and two pods, joined by a
//! veth link. Each node runs the redirect agent and zmesh-node in in-pod mode; pods are enrolled
//! through the CNI plugin entry point, as kubelet would. Applications talk by pod IP.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zmesh_testbed::{
    attach_to_bridge, is_root, link_veth, seeded_bytes, sha256, Child, Netns, PacketCapture,
    IPPROTO_TCP,
};

const MARKER: &[u8] = b"IN-POD-PLAINTEXT-MARKER-5e1b";

struct Pod {
    ns: Netns,
    uid: &'static str,
    name: &'static str,
    sa: &'static str,
    ip: &'static str,
}

struct NodeEnv {
    ns: Netns,
    admin: PathBuf,
    // Drop order: processes before their namespaces (fields drop in order).
    zmesh: Child,
    _agent: Child,
}

fn redirect_bin() -> PathBuf {
    zmesh_testbed::mesh::redirect_bin(Path::new(env!("CARGO_BIN_EXE_zmesh-node")))
}

fn workloads() -> &'static str {
    "workloads:
  - { uid: pod-a1, name: a1, namespace: shop, service_account: frontend, addresses: [10.217.1.2], node: node-1 }
  - { uid: pod-a2, name: a2, namespace: shop, service_account: cart, addresses: [10.217.1.3], node: node-1 }
  - { uid: pod-b1, name: b1, namespace: shop, service_account: backend, addresses: [10.217.2.2], node: node-2 }
  - { uid: pod-b2, name: b2, namespace: shop, service_account: db, addresses: [10.217.2.3], node: node-2 }
"
}

fn start_node(ns: Netns, name: &str, dir: &Path, ca: &Path) -> NodeEnv {
    let zds = dir.join(format!("{name}-zds.sock"));
    let admin = dir.join(format!("{name}-admin.sock"));
    let agent = zmesh_testbed::mesh::start_agent(
        &ns,
        Path::new(env!("CARGO_BIN_EXE_zmesh-node")),
        &zds,
        &admin,
    )
    .unwrap();
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "node:\n  name: {name}\n  mode: in_pod\n  zds_socket: {}\n  access_log: json\n  certificates:\n    file_ca: {{ dir: {} }}\n{}",
            zds.display(),
            ca.display(),
            workloads()
        ),
    )
    .unwrap();
    let zmesh = ns
        .spawn(
            env!("CARGO_BIN_EXE_zmesh-node"),
            &["run", "--config", cfg.to_str().unwrap()],
            &[("ZMESH_LOG", "info")],
        )
        .unwrap();
    zmesh
        .wait_for_log("ZDS snapshot complete", Duration::from_secs(10))
        .unwrap();
    NodeEnv {
        ns,
        admin,
        zmesh,
        _agent: agent,
    }
}

/// Runs the plugin as kubelet's runtime would, inside the node's netns.
fn cni(node: &NodeEnv, command: &str, pod: &Pod) -> std::process::Output {
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"zmesh-redirect","admin_socket":"{}","prevResult":{{"cniVersion":"1.0.0","ips":[{{"address":"{}/24"}}]}}}}"#,
        node.admin.display(),
        pod.ip
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", node.ns.name()])
        .arg(redirect_bin())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("ctr-{}", pod.uid))
        .env("CNI_NETNS", pod.ns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "K8S_POD_NAME={};K8S_POD_NAMESPACE=shop;K8S_POD_UID={};K8S_POD_SERVICE_ACCOUNT={}",
                pod.name, pod.uid, pod.sa
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Node 1 logged a2's side of an HBONE stream from a1: the same-node path crossed the tunnel.
fn same_node_inbound(log: &str) -> bool {
    log.lines().any(|l| {
        l.contains("\"direction\":\"inbound\"")
            && l.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\"")
            && l.contains("\"dst.identity\":\"spiffe://cluster.local/ns/shop/sa/cart\"")
    })
}

fn count(dir: String) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn two_nodes_four_pods_enrolled_by_cni() {
    assert!(is_root(), "needs root to create network namespaces");
    let n1 = Netns::new("zc1").unwrap();
    let n2 = Netns::new("zc2").unwrap();
    link_veth(&n1, "zc-l1", "10.218.0.1/24", &n2, "zc-l2", "10.218.0.2/24").unwrap();
    n1.add_bridge("zbr", "10.217.1.1/24").unwrap();
    n2.add_bridge("zbr", "10.217.2.1/24").unwrap();
    for (ns, other_pods, via) in [
        (&n1, "10.217.2.0/24", "10.218.0.2"),
        (&n2, "10.217.1.0/24", "10.218.0.1"),
    ] {
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        ns.ip(&["route", "add", other_pods, "via", via]).unwrap();
    }
    let mk = |prefix: &str, uid, name, sa, ip| Pod {
        ns: Netns::new(prefix).unwrap(),
        uid,
        name,
        sa,
        ip,
    };
    let a1 = mk("zca1", "pod-a1", "a1", "frontend", "10.217.1.2");
    let a2 = mk("zca2", "pod-a2", "a2", "cart", "10.217.1.3");
    let b1 = mk("zcb1", "pod-b1", "b1", "backend", "10.217.2.2");
    let b2 = mk("zcb2", "pod-b2", "b2", "db", "10.217.2.3");
    for (node, gw, pods) in [
        (&n1, "10.217.1.1", [&a1, &a2]),
        (&n2, "10.217.2.1", [&b1, &b2]),
    ] {
        for p in pods {
            attach_to_bridge(node, "zbr", &p.ns, "eth0", &format!("{}/24", p.ip), gw).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    zmesh::identity::FileCa::init(&ca, "cluster.local").unwrap();
    let node1 = start_node(n1, "node-1", dir.path(), &ca);
    let node2 = start_node(n2, "node-2", dir.path(), &ca);
    let baseline_fds = count(format!("/proc/{}/fd", node2.zmesh.pid()));
    let baseline_threads = count(format!("/proc/{}/task", node2.zmesh.pid()));

    // Enrollment: ADD returns only once the rules are in and the tunnel acked.
    let b1_app = b1.ns.listen_tcp(format!("{}:8080", b1.ip)).unwrap();
    let mut add_to_first_byte = Duration::ZERO;
    for (node, pod) in [(&node1, &a1), (&node1, &a2), (&node2, &b1), (&node2, &b2)] {
        let t = Instant::now();
        let out = cni(node, "ADD", pod);
        assert!(
            out.status.success(),
            "CNI ADD {}: {}",
            pod.uid,
            String::from_utf8_lossy(&out.stdout)
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            result["ips"][0]["address"],
            format!("{}/24", pod.ip),
            "prevResult passes through"
        );
        if pod.uid == "pod-b1" {
            // ADD → the pod's first captured byte (b1 receives from a1, through both tunnels).
            let mut c = a1.ns.connect_tcp(format!("{}:8080", b1.ip)).unwrap();
            c.write_all(b"1").unwrap();
            let (mut s, _) = b1_app.accept().unwrap();
            let mut one = [0u8; 1];
            s.read_exact(&mut one).unwrap();
            add_to_first_byte = t.elapsed();
        }
    }
    eprintln!("CNI ADD to first captured byte: {add_to_first_byte:?}");

    // Cross-node: a1 → b1 by pod IP; the link between nodes carries only HBONE.
    let cap = PacketCapture::start(&node1.ns, "zc-l1").unwrap();
    let mut data = MARKER.to_vec();
    data.extend(seeded_bytes(11, 1 << 20));
    let want = sha256(&data);
    let server = std::thread::spawn(move || {
        let (mut s, peer) = b1_app.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(MARKER).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        (peer, got, b1_app)
    });
    let mut c = a1.ns.connect_tcp(format!("{}:8080", b1.ip)).unwrap();
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    let (peer, got, b1_app) = server.join().unwrap();
    let frames = cap.stop().unwrap();
    assert_eq!(sha256(&got), want);
    assert_eq!(reply, MARKER);
    assert_eq!(
        peer.ip(),
        a1.ip.parse::<IpAddr>().unwrap(),
        "b1 sees a1's pod IP"
    );
    let tcp: Vec<_> = frames
        .iter()
        .filter(|f| f.proto == Some(IPPROTO_TCP))
        .collect();
    assert!(tcp.len() > 20, "capture saw the transfer");
    for f in &tcp {
        let (s, d) = f.tcp_ports().unwrap();
        assert!(
            s == 15008 || d == 15008,
            "non-HBONE TCP between nodes: {s} -> {d}"
        );
    }
    assert!(
        frames.iter().all(|f| !f.contains(MARKER)),
        "plaintext on the inter-node link"
    );

    // Same node: a1 → a2 also goes through the tunnel (node 1 logs an inbound HBONE stream).
    let a2_app = a2.ns.listen_tcp(format!("{}:8080", a2.ip)).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, peer) = a2_app.accept().unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        peer
    });
    let mut c = a1.ns.connect_tcp(format!("{}:8080", a2.ip)).unwrap();
    c.write_all(b"hello").unwrap();
    assert_eq!(t.join().unwrap().ip(), a1.ip.parse::<IpAddr>().unwrap());
    drop(c);
    // Access-log lines are written when each side of the connection closes.
    let mut log1 = String::new();
    for _ in 0..100 {
        log1 = node1.zmesh.read_log();
        if log1.contains("\"dst.identity\":\"spiffe://cluster.local/ns/shop/sa/cart\"")
            && log1.contains("\"direction\":\"inbound\"")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        same_node_inbound(&log1),
        "same-node traffic did not cross the tunnel: {log1}"
    );

    // A pod dialing its own IP is not captured: the app sees a direct connection and no proxy
    // logs it.
    let own = a1.ns.listen_tcp(format!("{}:9090", a1.ip)).unwrap();
    let mut c = a1.ns.connect_tcp(format!("{}:9090", a1.ip)).unwrap();
    c.write_all(b"self").unwrap();
    let (_s, peer) = own.accept().unwrap();
    assert_eq!(peer.ip(), a1.ip.parse::<IpAddr>().unwrap());
    drop(c);
    // The kubelet-probe source reaches the app directly, around the tunnel.
    node1
        .ns
        .ip(&["addr", "add", "169.254.7.127/32", "dev", "zbr"])
        .unwrap();
    let probe = node1
        .ns
        .run(|| -> std::io::Result<std::net::TcpStream> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(
                &"169.254.7.127:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )?;
            s.connect(
                &format!("{}:9090", a1.ip)
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )?;
            Ok(s.into())
        })
        .unwrap();
    let (_p, peer) = own.accept().unwrap();
    assert_eq!(peer.ip(), "169.254.7.127".parse::<IpAddr>().unwrap());
    drop(probe);
    std::thread::sleep(Duration::from_millis(200));
    let log1 = node1.zmesh.read_log();
    assert!(
        !log1.contains(":9090"),
        "port 9090 traffic went through a proxy: {log1}"
    );

    // Deleting b1 mid-connection tears its proxy down within a second, and node 2 holds no
    // more descriptors or threads than before the pod arrived... once b2 is gone too.
    let mut long = a1.ns.connect_tcp(format!("{}:8080", b1.ip)).unwrap();
    long.write_all(b"x").unwrap();
    let (_held, _) = b1_app.accept().unwrap();
    let t = Instant::now();
    let out = cni(&node2, "DEL", &b1);
    assert!(out.status.success());
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = long.read(&mut [0u8; 1]);
    let took = t.elapsed();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "the connection outlived its pod: {r:?}"
    );
    assert!(took < Duration::from_secs(1), "teardown took {took:?}");
    let out = cni(&node2, "DEL", &b2);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut fds, mut threads) = (usize::MAX, usize::MAX);
    while Instant::now() < deadline {
        fds = count(format!("/proc/{}/fd", node2.zmesh.pid()));
        threads = count(format!("/proc/{}/task", node2.zmesh.pid()));
        if fds <= baseline_fds && threads <= baseline_threads {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fds <= baseline_fds,
        "node 2 fds: {baseline_fds} before the pods, {fds} after deleting them"
    );
    assert!(
        threads <= baseline_threads,
        "node 2 threads: {baseline_threads} before, {threads} after"
    );
    drop((node1, node2, a1, a2, b1, b2));
}
