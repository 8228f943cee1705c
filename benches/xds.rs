//! Control-plane benchmark: a node fed over xDS by a fake istiod (tests/common/istiod.rs, a real
//! tonic server over TLS) with 10,000 workloads, 1,000 services and 1,000 policies, side by side
//! in one run with the same mesh given as a config file (the baseline):
//! - initial sync: push of everything → both ACKs;
//! - push → enforcement: one changed policy → the node's new state is published (open
//!   connections re-judge on that signal) vs the file reload of the same change; and a DENY →
//!   an open HBONE connection cut at the destination node, vs the same DENY by file reload;
//! - resident memory of a real `zmesh-node` process holding the mesh, fed over xDS vs from file.
//!
//! `cargo bench --bench xds` (needs root: the node marks its sockets). Prints a markdown table and
//! writes it to benches/RESULTS-control-plane.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::istiod::*;
use zmesh::config::Config;
use zmesh::proxy::{self, Node};
use zmesh_proto::envoy::service::discovery::v3::Resource;
use zmesh_proto::istio::security as sec;
use zmesh_proto::istio::workload as wl;
use zmesh_proto::type_url::{ADDRESS, AUTHORIZATION};

const WORKLOADS: usize = 10_000;
const SERVICES: usize = 1_000;
const POLICIES: usize = 1_000;
const NAMESPACES: usize = 100;
const NODES: usize = 100;
const PUSHES: usize = 20;

fn ip(i: usize) -> [u8; 4] {
    [
        10,
        50 + (i / 65536) as u8,
        ((i / 256) % 256) as u8,
        (i % 256) as u8,
    ]
}

fn svc_host(s: usize) -> (String, String) {
    let ns = format!("ns{}", s % NAMESPACES);
    (ns.clone(), format!("svc{s}.{ns}.svc.cluster.local"))
}

/// The mesh as istiod would push it.
fn resources() -> (Vec<Resource>, Vec<Resource>) {
    let mut addresses = Vec::with_capacity(WORKLOADS + SERVICES);
    for i in 0..WORKLOADS {
        let s = i % SERVICES;
        let (sns, host) = svc_host(s);
        let mut w = wl::Workload {
            uid: format!("w{i}"),
            name: format!("w{i}"),
            namespace: sns.clone(),
            addresses: vec![ip(i).to_vec()],
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            service_account: format!("sa{}", i % 50),
            node: format!("node-{}", i % NODES),
            canonical_name: format!("app{s}"),
            ..Default::default()
        };
        w.services.insert(
            format!("{sns}/{host}"),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 8080,
                }],
            },
        );
        addresses.push(address_resource(&w, "1"));
    }
    for s in 0..SERVICES {
        let (ns, host) = svc_host(s);
        let svc = wl::Service {
            name: format!("svc{s}"),
            namespace: ns,
            hostname: host,
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, (s / 256) as u8, (s % 256) as u8],
            }],
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 8080,
            }],
            ..Default::default()
        };
        addresses.push(service_resource(&svc, "1"));
    }
    let policies = (0..POLICIES)
        .map(|p| policy_resource(&policy(p, 0), "1"))
        .collect();
    (addresses, policies)
}

fn policy(p: usize, generation: usize) -> sec::Authorization {
    let action = if p.is_multiple_of(2) {
        sec::Action::Allow
    } else {
        sec::Action::Deny
    };
    let mut a = principal_policy(
        &format!("p{p}"),
        action,
        &format!(
            "cluster.local/ns/ns{}/sa/sa{}",
            p % NAMESPACES,
            (p + generation) % 50
        ),
    );
    a.namespace = format!("ns{}", p % NAMESPACES);
    a
}

/// The same mesh as a config file.
fn mesh_yaml(node_settings: &str, generation: usize) -> String {
    let mut y = format!("node:\n{node_settings}workloads:\n");
    for i in 0..WORKLOADS {
        let s = i % SERVICES;
        let (sns, host) = svc_host(s);
        let [a, b, c, d] = ip(i);
        writeln!(
            y,
            "  - {{uid: w{i}, name: w{i}, namespace: {sns}, service_account: sa{}, addresses: [{a}.{b}.{c}.{d}], node: node-{}, canonical_name: app{s}, services: {{\"{sns}/{host}\": {{80: 8080}}}}}}",
            i % 50,
            i % NODES
        )
        .unwrap();
    }
    y += "services:\n";
    for s in 0..SERVICES {
        let (ns, host) = svc_host(s);
        writeln!(
            y,
            "  - {{name: svc{s}, namespace: {ns}, hostname: {host}, vips: [10.96.{}.{}], ports: {{80: 8080}}}}",
            s / 256,
            s % 256
        )
        .unwrap();
    }
    y += "policies:\n";
    for p in 0..POLICIES {
        let action = if p % 2 == 0 { "allow" } else { "deny" };
        writeln!(
            y,
            "  - {{name: p{p}, namespace: ns{}, action: {action}, rules: [{{clauses: [{{matches: [{{principals: [\"cluster.local/ns/ns{}/sa/sa{}\"]}}]}}]}}]}}",
            p % NAMESPACES,
            p % NAMESPACES,
            (p + generation) % 50
        )
        .unwrap();
    }
    y
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn synced(
    cp: &FakeIstiod,
    stream: usize,
    addresses: Vec<Resource>,
    policies: Vec<Resource>,
) -> Duration {
    cp.subscribed(stream, ADDRESS).await;
    cp.subscribed(stream, AUTHORIZATION).await;
    let t = Instant::now();
    let a = cp.push_to(stream, ADDRESS, addresses, vec![]);
    let p = cp.push_to(stream, AUTHORIZATION, policies, vec![]);
    assert!(cp.answer(&a).await.error_detail.is_none());
    assert!(cp.answer(&p).await.error_detail.is_none());
    t.elapsed()
}

fn settings(bind: &str, extra: &str) -> String {
    format!("  name: node-0\n  bind: {bind}\n  access_log: off\n{extra}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let mut out = format!(
        "## Control plane: 10,000 workloads, 1,000 services, 1,000 policies\n\n`cargo bench --bench xds` at {}, {}, {} CPUs. The file baseline is the same change made by editing the node's file: read, parse and validate the whole file, then apply.\n\n",
        run("git", &["rev-parse", "--short", "HEAD"]),
        run("date", &["-u", "+%Y-%m-%d"]),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let ca = tempfile::tempdir().unwrap();
    zmesh::identity::FileCa::init(ca.path(), "cluster.local").unwrap();
    let file_certs = format!(
        "  certificates:\n    file_ca: {{ dir: {} }}\n",
        ca.path().display()
    );

    // In-process: time to sync, push → enforcement, against the file reload of the same change.
    let cp = FakeIstiod::start().await;
    let text = format!("node:\n{}", settings("127.0.98.1", &cp.node_settings()));
    let node = Node::new(Config::parse(&text, "xds").unwrap()).unwrap();
    let _running = proxy::start(node.clone()).await.unwrap();
    let (addresses, policies) = resources();
    let wire: usize = addresses
        .iter()
        .chain(&policies)
        .map(zmesh_proto::prost::Message::encoded_len)
        .sum();
    let sync = synced(&cp, 1, addresses, policies).await;
    assert_eq!(node.model().workloads().len(), WORKLOADS);
    let mut xds = Vec::new();
    for g in 1..=PUSHES {
        let mut state = node.subscribe_state();
        state.borrow_and_update();
        let t = Instant::now();
        let n = cp.push_to(
            1,
            AUTHORIZATION,
            vec![policy_resource(&policy(1, g), &g.to_string())],
            vec![],
        );
        state.changed().await.unwrap();
        xds.push(t.elapsed());
        cp.answer(&n).await;
    }
    let file_node = Node::new(
        Config::parse(&mesh_yaml(&settings("127.0.98.2", &file_certs), 0), "file").unwrap(),
    )
    .unwrap();
    let mut file = Vec::new();
    for g in 1..=PUSHES {
        let text = mesh_yaml(&settings("127.0.98.2", &file_certs), g);
        let t = Instant::now();
        // What a file reload costs: parse and validate the whole file, build, publish.
        let cfg = Config::parse(&text, "file").unwrap();
        file_node.reload(cfg).unwrap();
        file.push(t.elapsed());
    }
    let (xds, file) = (median(xds), median(file));
    writeln!(
        out,
        "| measure | xDS | file (baseline) | ratio |\n|---|---|---|---|"
    )
    .unwrap();
    writeln!(
        out,
        "| initial sync (push → both ACKs), {} KiB on the wire | {:.1} ms | | |",
        wire / 1024,
        sync.as_secs_f64() * 1e3
    )
    .unwrap();
    writeln!(out, "| one policy changed → new state published (median of {PUSHES}) | {:.2} ms | {:.2} ms | {:.3} |", xds.as_secs_f64() * 1e3, file.as_secs_f64() * 1e3, xds.as_secs_f64() / file.as_secs_f64()).unwrap();

    // Enforcement: a DENY closes an open connection client → node A → HBONE → node B → app.
    let (cut_xds, cut_file) = enforcement().await;
    writeln!(out, "| DENY → open connection cut at the destination (median of {CUTS}) | {:.2} ms | {:.2} ms | {:.3} |", cut_xds.as_secs_f64() * 1e3, cut_file.as_secs_f64() * 1e3, cut_xds.as_secs_f64() / cut_file.as_secs_f64()).unwrap();

    // Memory: real processes holding the mesh.
    let bin = env!("CARGO_BIN_EXE_zmesh-node");
    let dir = tempfile::tempdir().unwrap();
    let spawn = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        Kill(
            Command::new(bin)
                .args(["run", "--config"])
                .arg(&path)
                .env("ZMESH_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let cp2 = FakeIstiod::start().await;
    let empty = spawn(
        "empty.yaml",
        format!("node:\n{}", settings("127.0.97.1", &file_certs)),
    );
    let x = spawn(
        "xds.yaml",
        format!("node:\n{}", settings("127.0.97.2", &cp2.node_settings())),
    );
    let (addresses, policies) = resources();
    synced(&cp2, 1, addresses, policies).await;
    let f = spawn(
        "file.yaml",
        mesh_yaml(&settings("127.0.97.3", &file_certs), 0),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (e, xr, fr) = (rss_kib(empty.0.id()), rss_kib(x.0.id()), rss_kib(f.0.id()));
    writeln!(
        out,
        "| node RSS holding the mesh (empty node: {:.1} MiB) | {:.1} MiB | {:.1} MiB | {:.3} |",
        e as f64 / 1024.0,
        xr as f64 / 1024.0,
        fr as f64 / 1024.0,
        xr as f64 / fr as f64
    )
    .unwrap();
    out += "\nztunnel publishes ~12 MB of memory per 1,000 requests/s of load (Istio performance docs); the RSS above is the mesh state alone, at rest.\n";
    println!("{out}");
    std::fs::write(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/RESULTS-control-plane.md"
        ),
        &out,
    )
    .unwrap();
    drop((empty, x, f));
    let _ = Arc::clone(&node);
}

const CUTS: usize = 10;

/// The client and server workloads of the enforcement runs, at 127.<net>.0.2 and .3.
fn pair(net: u8) -> Vec<Resource> {
    let w = |uid: &str, host: u8, node: &str| workload(uid, uid, common::ip(net, host), node);
    vec![
        address_resource(&w("client", 2, "node-a"), "1"),
        address_resource(&w("server", 3, "node-b"), "1"),
    ]
}

async fn open_conn(net: u8, a: Arc<Node>) -> tokio::net::TcpStream {
    let app = tokio::net::TcpListener::bind(std::net::SocketAddr::new(common::ip(net, 3), 0))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    common::spawn_echo(app);
    let entry = common::capture_to(a, common::ip(net, 2), dst).await;
    let mut c = common::connect_from(common::ip(net, 2), entry)
        .await
        .unwrap();
    common::round_trip(&mut c, b"open").await;
    c
}

/// Times from `change` to the open connection's reset.
async fn time_cut(c: &mut tokio::net::TcpStream, change: impl FnOnce()) -> Duration {
    use tokio::io::AsyncReadExt;
    let t = Instant::now();
    change();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
    assert!(matches!(r, Ok(Err(_)) | Ok(Ok(0))), "not cut: {r:?}");
    t.elapsed()
}

/// xDS: node B is fed by a fake istiod along with the 10,000-workload mesh; file: node B reloads
/// a file holding the same mesh plus the two workloads.
async fn enforcement() -> (Duration, Duration) {
    let deny = |g: usize| {
        let mut p = principal_policy(
            "deny-client",
            sec::Action::Deny,
            "cluster.local/ns/default/sa/client",
        );
        p.name = format!("deny-client-{g}");
        p
    };
    // xDS.
    let net = 91;
    let cp = FakeIstiod::start().await;
    let mut mesh = common::Mesh::new(net);
    let node = |name: &str, host: u8| {
        format!(
            "node:\n  name: {name}\n  bind: {}\n  access_log: off\n{}",
            common::ip(net, host),
            cp.node_settings()
        )
    };
    let a = Node::new(Config::parse(&node("node-a", 1), "a").unwrap()).unwrap();
    mesh.nodes.push(proxy::start(a.clone()).await.unwrap());
    let b = Node::new(Config::parse(&node("node-b", 3), "b").unwrap()).unwrap();
    mesh.nodes.push(proxy::start(b.clone()).await.unwrap());
    for stream in [1, 2] {
        let (mut addresses, policies) = resources();
        addresses.extend(pair(net));
        synced(&cp, stream, addresses, policies).await;
    }
    common::wait_until("ready", Duration::from_secs(20), || {
        a.is_ready() && b.is_ready()
    })
    .await;
    let mut xds = Vec::new();
    for g in 0..CUTS {
        let mut c = open_conn(net, a.clone()).await;
        let name = format!("default/deny-client-{g}");
        xds.push(
            time_cut(&mut c, || {
                for stream in [1, 2] {
                    cp.push_to(
                        stream,
                        AUTHORIZATION,
                        vec![policy_resource(&deny(g), "1")],
                        vec![],
                    );
                }
            })
            .await,
        );
        for stream in [1, 2] {
            let n = cp.push_to(stream, AUTHORIZATION, vec![], vec![name.clone()]);
            cp.answer(&n).await;
        }
    }
    drop(mesh);

    // File: the same mesh and the two workloads in node B's file; node A as before, by file.
    let net = 92;
    let mut mesh = common::Mesh::new(net);
    let pair_yaml = common::workloads_yaml(
        net,
        &[
            common::W {
                uid: "client",
                sa: "client",
                host: 2,
                node: "node-a",
            },
            common::W {
                uid: "server",
                sa: "server",
                host: 3,
                node: "node-b",
            },
        ],
    );
    let pair_yaml = pair_yaml.trim_start_matches("workloads:\n").to_string();
    let ca = mesh.ca_dir.clone();
    let file = |name: &str, host: u8, policy: Option<usize>| {
        let settings = format!(
            "  name: {name}\n  bind: {}\n  access_log: off\n  certificates:\n    file_ca: {{ dir: {} }}\n",
            common::ip(net, host),
            ca.display()
        );
        let mut y =
            mesh_yaml(&settings, 0).replace("workloads:\n", &format!("workloads:\n{pair_yaml}"));
        if let Some(g) = policy {
            y.push_str(&format!("  - {{name: deny-client-{g}, namespace: default, action: deny, rules: [{{clauses: [{{matches: [{{principals: [\"cluster.local/ns/default/sa/client\"]}}]}}]}}]}}\n"));
        }
        y
    };
    let a = Node::new(Config::parse(&file("node-a", 1, None), "a").unwrap()).unwrap();
    mesh.nodes.push(proxy::start(a.clone()).await.unwrap());
    let b = Node::new(Config::parse(&file("node-b", 3, None), "b").unwrap()).unwrap();
    mesh.nodes.push(proxy::start(b.clone()).await.unwrap());
    let mut by_file = Vec::new();
    for g in 0..CUTS {
        let mut c = open_conn(net, a.clone()).await;
        let text = file("node-b", 3, Some(g));
        by_file.push(
            time_cut(&mut c, || {
                // What the watcher does once it has seen the change: read, parse, apply.
                b.reload(Config::parse(&text, "b").unwrap()).unwrap();
            })
            .await,
        );
        b.reload(Config::parse(&file("node-b", 3, None), "b").unwrap())
            .unwrap();
    }
    (median(xds), median(by_file))
}
