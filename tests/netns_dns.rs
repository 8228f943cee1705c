//! Tier (c): the DNS proxy in in-pod mode. A node netns with a bridge; pod A (the client, with
//! the in-pod capture rules and DNS capture on), pod B (the app behind two services) and a
//! fake upstream resolver in its own netns. Pod A's DNS to port 53 is redirected to the proxy
//! at 127.0.0.1:15053 inside pod A; what the mesh knows is answered there, the rest goes to the
//! fake resolver from pod A's namespace, marked so the capture rules let it out.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use zmesh_redirect::zds::{WorkloadInfo, ZdsServer};
use zmesh_redirect::{install_pod, Backend, PodOptions};
use zmesh_testbed::{attach_to_bridge, is_root, seeded_bytes, sha256, Netns};

const POD_A: &str = "10.237.0.2";
const POD_B: &str = "10.237.0.3";
const RESOLVER: &str = "10.237.0.4";
const DB_VIP: &str = "10.96.37.10";
/// What the fake resolver answers for every A query it gets.
const EXTERNAL_IP: &str = "203.0.113.7";

fn config(ca: &Path, zds: &Path) -> String {
    format!(
        "node:
  name: node-1
  mode: in_pod
  zds_socket: {zds}
  certificates:
    file_ca: {{ dir: {ca} }}
  dns:
    enabled: true
    upstreams: ['{RESOLVER}:53']
workloads:
  - {{ uid: pod-a, name: client, namespace: shop, service_account: frontend, addresses: [{POD_A}], node: node-1 }}
  - {{ uid: pod-b, name: server, namespace: shop, service_account: backend, addresses: [{POD_B}], node: node-1,
      services: {{ shop/db.shop.svc.cluster.local: {{ 5432: 8080 }}, shop/payments.example.com: {{ 443: 8443 }} }} }}
services:
  - {{ name: db, namespace: shop, hostname: db.shop.svc.cluster.local, vips: [{DB_VIP}], ports: {{ 5432: 8080 }} }}
  - {{ name: payments, namespace: shop, hostname: payments.example.com, ports: {{ 443: 8443 }} }}
",
        zds = zds.display(),
        ca = ca.display()
    )
}

/// What the fake resolver was asked: (transport, name, type).
type Seen = Arc<Mutex<Vec<(&'static str, String, RecordType)>>>;

/// The fake upstream: an A query gets EXTERNAL_IP, a TXT query a fixed string; over UDP, a
/// name starting with `big.` gets an empty answer with TC set, so the proxy must ask over TCP.
fn fake_resolver(ns: &Netns, ip: &str) -> Seen {
    let seen: Seen = Arc::default();
    let addr: SocketAddr = format!("{ip}:53").parse().unwrap();
    let udp = ns.run(|| UdpSocket::bind(addr)).unwrap();
    let tcp = ns.listen_tcp(addr).unwrap();
    let answer = |q: &Message, truncate: bool| {
        let mut a = Message::new();
        a.set_id(q.id())
            .set_message_type(MessageType::Response)
            .set_recursion_available(true)
            .add_queries(q.queries().iter().cloned());
        let query = &q.queries()[0];
        if truncate {
            a.set_truncated(true);
        } else {
            let rdata = match query.query_type() {
                RecordType::A => Some(RData::A(
                    EXTERNAL_IP.parse::<std::net::Ipv4Addr>().map(A).unwrap(),
                )),
                RecordType::TXT => Some(RData::TXT(TXT::new(vec!["zmesh-upstream".into()]))),
                _ => None,
            };
            if let Some(r) = rdata {
                a.add_answer(Record::from_rdata(query.name().clone(), 60, r));
            }
        }
        a.to_vec().unwrap()
    };
    let record = |seen: &Seen, proto, q: &Message| {
        let query = &q.queries()[0];
        seen.lock()
            .unwrap()
            .push((proto, query.name().to_ascii(), query.query_type()));
    };
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            record(&s, "udp", &q);
            let big = q.queries()[0].name().to_ascii().starts_with("big.");
            let _ = udp.send_to(&answer(&q, big), from);
        }
    });
    let s = seen.clone();
    std::thread::spawn(move || {
        while let Ok((mut c, _)) = tcp.accept() {
            let mut len = [0u8; 2];
            if c.read_exact(&mut len).is_err() {
                continue;
            }
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if c.read_exact(&mut buf).is_err() {
                continue;
            }
            let Ok(q) = Message::from_vec(&buf) else {
                continue;
            };
            record(&s, "tcp", &q);
            let a = answer(&q, false);
            let _ = c.write_all(&(a.len() as u16).to_be_bytes());
            let _ = c.write_all(&a);
        }
    });
    seen
}

/// Asks `name` over UDP from inside `pod`, to the resolver's address: the capture rule sends
/// it to the pod's DNS proxy. Returns the response.
fn ask(pod: &Netns, name: &str, t: RecordType) -> Message {
    ask_at(pod, RESOLVER, name, t)
}

/// `ask`, addressed to the resolver at `resolver`:53.
fn ask_at(pod: &Netns, resolver: &str, name: &str, t: RecordType) -> Message {
    let to: SocketAddr = format!("{resolver}:53").parse().unwrap();
    let mut q = Message::new();
    q.set_id(0x5a5a)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    let bytes = q.to_vec().unwrap();
    let reply = pod.run(move || -> std::io::Result<Vec<u8>> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.send_to(&bytes, to)?;
        let mut buf = vec![0u8; 4096];
        let (n, from) = s.recv_from(&mut buf)?;
        // The redirect is undone on the way back: the answer comes from where we asked.
        assert_eq!(from, to);
        buf.truncate(n);
        Ok(buf)
    });
    let reply = reply.unwrap_or_else(|e| panic!("no DNS answer for {name}: {e}"));
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.id(), 0x5a5a);
    m
}

fn a_records(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

/// Sends 256 KiB from pod A to `to` and checks pod B's app got them exactly, from pod A.
fn round_trip(pod_a: &Netns, pod_b: &Netns, to: SocketAddr, app_port: u16, seed: u64) {
    let app = pod_b.listen_tcp(format!("{POD_B}:{app_port}")).unwrap();
    let data = seeded_bytes(seed, 256 << 10);
    let want = sha256(&data);
    let server = std::thread::spawn(move || {
        let (mut s, peer) = app.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(b"done").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        (peer, got)
    });
    let mut c = pod_a.connect_tcp(to).unwrap();
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"done", "to {to}");
    let (peer, got) = server.join().unwrap();
    assert_eq!(sha256(&got), want, "bytes to {to} arrived exactly");
    assert_eq!(peer.ip(), POD_A.parse::<IpAddr>().unwrap());
}

fn metric(node: &Netns, line_prefix: &str) -> f64 {
    let text = node.http_get("127.0.0.1:15020", "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in {text}"))
}

fn dig(pod: &Netns, args: &[&str]) -> String {
    let mut all = vec![
        "dig",
        "@127.0.0.1",
        "-p",
        "15053",
        "+short",
        "+tries=1",
        "+time=3",
    ];
    all.extend_from_slice(args);
    pod.exec(&all).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_resolve_mesh_names_from_the_model_and_the_rest_upstream() {
    assert!(is_root(), "needs root to create network namespaces");
    let node = Netns::new("zdn").unwrap();
    node.add_bridge("zbr0", "10.237.0.1/24").unwrap();
    let pod_a = Netns::new("zda").unwrap();
    let pod_b = Netns::new("zdb").unwrap();
    let resolver = Netns::new("zdu").unwrap();
    for (ns, ip) in [(&pod_a, POD_A), (&pod_b, POD_B), (&resolver, RESOLVER)] {
        attach_to_bridge(&node, "zbr0", ns, "eth0", &format!("{ip}/24"), "10.237.0.1").unwrap();
    }
    pod_a
        .run(|| {
            let opts = PodOptions {
                dns_capture: true,
                ..PodOptions::default()
            };
            install_pod(&opts, Backend::Iptables)
        })
        .unwrap();
    pod_b
        .run(|| install_pod(&PodOptions::default(), Backend::Iptables))
        .unwrap();
    let seen = fake_resolver(&resolver, RESOLVER);

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    zmesh::identity::FileCa::init(&ca, "cluster.local").unwrap();
    let zds = dir.path().join("zds.sock");
    let agent = ZdsServer::bind(&zds).unwrap();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(&cfg, config(&ca, &zds)).unwrap();
    let zn = node
        .spawn(
            env!("CARGO_BIN_EXE_zmesh-node"),
            &["run", "--config", cfg.to_str().unwrap()],
            &[("ZMESH_LOG", "info")],
        )
        .unwrap();
    for _ in 0..200 {
        if agent.connected_tunnels() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(agent.connected_tunnels(), 1, "node: {}", zn.read_log());
    for (uid, name, sa, ns) in [
        ("pod-a", "client", "frontend", &pod_a),
        ("pod-b", "server", "backend", &pod_b),
    ] {
        let info = WorkloadInfo {
            name: name.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
        };
        let fd: std::os::fd::OwnedFd = std::fs::File::open(ns.path()).unwrap().into();
        agent.add_pod(uid, info, fd).await.unwrap();
    }

    // (1) A short name, as an application sends it: captured, answered from the model with
    // the service's VIP; then a connection to it goes through the tunnel to pod B's app.
    let a = ask(&pod_a, "db", RecordType::A);
    assert_eq!(a.response_code(), ResponseCode::NoError);
    assert_eq!(a_records(&a), [DB_VIP.parse::<IpAddr>().unwrap()]);
    // The FQDN a stub resolver sends after appending the first search domain: same answer.
    let a = ask(&pod_a, "db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(a_records(&a), [DB_VIP.parse::<IpAddr>().unwrap()]);
    round_trip(
        &pod_a,
        &pod_b,
        format!("{DB_VIP}:5432").parse().unwrap(),
        8080,
        1,
    );

    // (3) A service with no address: an auto-allocated VIP from 240.240.0.0/16, also under the
    // name the stub sends first, and a connection to it reaches the service's endpoint.
    let a = ask(&pod_a, "payments.example.com.", RecordType::A);
    let [vip] = a_records(&a)[..] else {
        panic!("one auto VIP: {a:?}")
    };
    assert!(
        vip.to_string().starts_with("240.240."),
        "auto VIP {vip} outside the default range"
    );
    let again = ask(
        &pod_a,
        "payments.example.com.shop.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(
        a_records(&again),
        [vip],
        "stable, and found under the search domain"
    );
    round_trip(&pod_a, &pod_b, SocketAddr::new(vip, 443), 8443, 2);

    // Mesh names never reached the upstream.
    assert!(
        seen.lock().unwrap().is_empty(),
        "mesh names leaked upstream: {:?}",
        seen.lock().unwrap()
    );

    // (2) An external name goes to the fake resolver in its own netns; a TC answer over UDP
    // makes the proxy ask again over TCP.
    let a = ask(&pod_a, "www.example.org.", RecordType::A);
    assert_eq!(a_records(&a), [EXTERNAL_IP.parse::<IpAddr>().unwrap()]);
    let a = ask(&pod_a, "big.example.org.", RecordType::A);
    assert_eq!(a_records(&a), [EXTERNAL_IP.parse::<IpAddr>().unwrap()]);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ("udp", "www.example.org.".to_string(), RecordType::A),
            ("udp", "big.example.org.".to_string(), RecordType::A),
            ("tcp", "big.example.org.".to_string(), RecordType::A),
        ]
    );
    assert_eq!(
        metric(
            &node,
            "istio_dns_upstream_requests_total{request_protocol=\"tcp\"}"
        ),
        1.0
    );

    // (4) dig against 15053 inside the pod, for each type the proxy serves: A and AAAA for a
    // mesh name (AAAA: NOERROR with no record, the service is IPv4 only), and a forwarded TXT.
    assert_eq!(dig(&pod_a, &["db", "A"]).trim(), DB_VIP);
    let aaaa = pod_a
        .exec(&[
            "dig",
            "@127.0.0.1",
            "-p",
            "15053",
            "+tries=1",
            "+time=3",
            "db",
            "AAAA",
        ])
        .unwrap();
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
        "{aaaa}"
    );
    assert_eq!(
        dig(&pod_a, &["payments.example.com", "A"]).trim(),
        vip.to_string()
    );
    assert_eq!(
        dig(&pod_a, &["www.example.org", "TXT"]).trim(),
        "\"zmesh-upstream\""
    );
    assert_eq!(
        dig(&pod_a, &["+tcp", "db.shop", "A"]).trim(),
        DB_VIP,
        "over TCP"
    );

    // Hostile input through the capture path: garbage to port 53 is dropped and counted, and
    // the proxy still answers.
    pod_a
        .run(|| -> std::io::Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for junk in [&b"\x00\x01garbage"[..], &[0xff; 40][..], &[0u8; 3][..]] {
                s.send_to(junk, format!("{RESOLVER}:53"))?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(
        a_records(&ask(&pod_a, "db", RecordType::A)),
        [DB_VIP.parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        metric(&node, "zmesh_dns_dropped_total{reason=\"malformed\"}"),
        3.0
    );
    assert!(
        metric(
            &node,
            "istio_dns_requests_total{request_query_type=\"A\",request_protocol=\"udp\"}"
        ) >= 8.0
    );
    drop(zn);
}

/// Host mode (a VM): `zmesh-redirect host install --dns-capture --dns-servers R` sends the VM's
/// DNS to R into the node's proxy on 127.0.0.1:15053; the proxy answers mesh names with the VM
/// workload's search domains and forwards the rest to the resolvers of its resolv.conf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vms_dns_is_captured_by_the_host_rules_and_answered_by_its_node() {
    assert!(is_root(), "needs root to create network namespaces");
    const VM: &str = "10.238.0.1";
    const VM_RESOLVER: &str = "10.238.0.2";
    let vm = Netns::new("zdv").unwrap();
    let resolver = Netns::new("zdr").unwrap();
    zmesh_testbed::link_veth(
        &vm,
        "eth0",
        &format!("{VM}/24"),
        &resolver,
        "eth0",
        &format!("{VM_RESOLVER}/24"),
    )
    .unwrap();
    let seen = fake_resolver(&resolver, VM_RESOLVER);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    zmesh::identity::FileCa::init(&ca, "cluster.local").unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("search example.internal\nnameserver {VM_RESOLVER}\noptions ndots:5\n"),
    )
    .unwrap();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node:
  name: vm-1
  certificates: {{ file_ca: {{ dir: {ca} }} }}
  dns: {{ enabled: true, resolv_conf: {resolv} }}
workloads:
  - {{ uid: vm-1, name: billing, namespace: data, service_account: billing, addresses: [{VM}], node: vm-1 }}
services:
  - {{ name: db, namespace: data, hostname: db.data.svc.cluster.local, vips: [10.96.38.10], ports: {{ 5432: 5432 }} }}
",
            ca = ca.display(),
            resolv = resolv.display()
        ),
    )
    .unwrap();
    let redirect = zmesh_testbed::mesh::redirect_bin(Path::new(env!("CARGO_BIN_EXE_zmesh-node")));
    let redirect = redirect.to_str().unwrap();
    vm.exec(&[
        redirect,
        "host",
        "install",
        "--dns-capture",
        "--dns-servers",
        VM_RESOLVER,
    ])
    .unwrap();
    let zn = vm
        .spawn(
            env!("CARGO_BIN_EXE_zmesh-node"),
            &["run", "--config", cfg.to_str().unwrap()],
            &[("ZMESH_LOG", "info")],
        )
        .unwrap();
    zn.wait_for_log("zmesh node ready", Duration::from_secs(20))
        .unwrap();

    // The VM's workload is in namespace data: `db` is db.data.svc.cluster.local.
    let a = ask_at(&vm, VM_RESOLVER, "db", RecordType::A);
    assert_eq!(a_records(&a), ["10.96.38.10".parse::<IpAddr>().unwrap()]);
    let a = ask_at(&vm, VM_RESOLVER, "www.example.org.", RecordType::A);
    assert_eq!(a_records(&a), [EXTERNAL_IP.parse::<IpAddr>().unwrap()]);
    // Captured over TCP too (dig +tcp to the resolver's address).
    let out = vm
        .exec(&[
            "dig",
            &format!("@{VM_RESOLVER}"),
            "+tcp",
            "+short",
            "+tries=1",
            "+time=3",
            "db.data",
            "A",
        ])
        .unwrap();
    assert_eq!(out.trim(), "10.96.38.10");
    assert_eq!(
        *seen.lock().unwrap(),
        [("udp", "www.example.org.".to_string(), RecordType::A)],
        "only the external name reached the resolver, once"
    );
    drop(zn);
    vm.exec(&[redirect, "host", "uninstall"]).unwrap();
}
