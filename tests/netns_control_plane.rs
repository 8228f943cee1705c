//! Tier (c): two host-mode nodes in network namespaces whose files hold NO workloads, services
//! or policies and no CA key. Everything comes from a standalone control plane process
//! (`zmesh-node ca serve --xds`, in node B's namespace): the mesh over xDS, each node's
//! certificates over CSR, both authenticated by the node's bootstrap token. Traffic flows as
//! HBONE; the control plane is killed and traffic goes on, over new connections and a new HBONE
//! connection to a node not dialed before; it returns with a changed policy that takes effect.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zmesh_testbed::mesh::{HostMesh, APP_PORT, A_IP, B_IP};
use zmesh_testbed::{is_root, Child, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_zmesh-node");
const CP_PORT: u16 = 15012;
const WAIT: Duration = Duration::from_secs(30);

fn node_config(name: &str, ca: &Path) -> String {
    let dir = ca.parent().unwrap();
    format!(
        "node:
  name: {name}
  access_log: json
  control_plane:
    address: https://{B_IP}:{CP_PORT}
    root_cert: {root}
    server_name: zmesh-ca
    token_file: {token}
  certificates:
    ca_client: {{ ttl: 1h }}
",
        root = ca.join("root-cert.pem").display(),
        token = dir.join(format!("{name}.token")).display(),
    )
}

/// The control plane's mesh model: the nodes' workloads and the policies. Only the control plane
/// reads it (and only it holds the CA).
fn mesh_file(ca: &Path, policies: &str) -> String {
    format!(
        "node:
  name: control-plane
  certificates:
    file_ca: {{ dir: {ca} }}
workloads:
  - {{ uid: vm-a, name: app-a, namespace: shop, service_account: frontend, addresses: [{A_IP}], node: node-a }}
  - {{ uid: vm-b, name: app-b, namespace: shop, service_account: backend, addresses: [{B_IP}], node: node-b }}
{policies}",
        ca = ca.display()
    )
}

const DENY_FRONTEND: &str = "policies:
  - name: deny-frontend
    namespace: shop
    action: deny
    rules:
      - clauses:
          - matches:
              - principals: [\"cluster.local/ns/shop/sa/frontend\"]
";

fn wait_ready(ns: &Netns, node: &Child) {
    let end = Instant::now() + WAIT;
    loop {
        let r = ns.http_get("127.0.0.1:15021", "/healthz/ready");
        if r.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(Instant::now() < end, "not ready: {r}\n{}", node.read_log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn control_plane(mesh: &HostMesh, mesh_path: &Path) -> Child {
    let ca = mesh.ca_dir();
    mesh.b
        .spawn_control_plane(BIN, &ca, mesh_path, &format!("{B_IP}:{CP_PORT}"), &[], WAIT)
        .unwrap()
}

/// One request/response from A's app to B's app, through the capture rules and both tunnels.
fn exchange(mesh: &HostMesh, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    exchange_from(&mesh.a, B_IP, msg)
}

/// One request/response from an app in `from` to the app at `to`, on a new TCP connection.
fn exchange_from(from: &Netns, to: &str, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = from
        .connect_tcp(format!("{to}:{APP_PORT}"))
        .map_err(std::io::Error::other)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(msg)?;
    c.shutdown(Shutdown::Write)?;
    let mut got = Vec::new();
    c.read_to_end(&mut got)?;
    Ok(got)
}

fn echo(ns: &Netns, ip: &str) -> std::thread::JoinHandle<()> {
    ns.spawn_echo(&format!("{ip}:{APP_PORT}")).unwrap()
}

/// A node's pooled outbound HBONE connections (`zmesh_hbone_pool_connections`).
fn pool_connections(ns: &Netns) -> f64 {
    let m = ns.http_get("127.0.0.1:15020", "/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix("zmesh_hbone_pool_connections "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pool gauge in {m}"))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn nodes_with_empty_files_get_everything_from_the_control_plane_and_survive_its_absence() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root (CI runs as root)"
    );
    let mesh = HostMesh::start_configured(Path::new(BIN), node_config).unwrap();
    let ca = mesh.ca_dir();
    // Each node's bootstrap credential, written where its config reads it.
    for node in ["node-a", "node-b"] {
        let out = std::process::Command::new(BIN)
            .args(["ca", "token", "--dir", ca.to_str().unwrap(), "--node", node])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap();
        std::fs::write(mesh.dir.path().join(format!("{node}.token")), token.trim()).unwrap();
    }
    // The nodes hold no CA key and their files list no workload.
    for node in ["node-a", "node-b"] {
        let text = std::fs::read_to_string(mesh.config_path(node)).unwrap();
        assert!(
            !text.contains("workloads") && !text.contains("file_ca"),
            "{text}"
        );
    }
    let mesh_path = mesh.dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh_file(&ca, "")).unwrap();
    let _app = echo(&mesh.b, B_IP);
    // An app on A too, which nothing dials until the control plane is gone.
    let _app_a = echo(&mesh.a, A_IP);

    let cp = control_plane(&mesh, &mesh_path);
    wait_ready(&mesh.a, &mesh.node_a);
    wait_ready(&mesh.b, &mesh.node_b);
    assert_eq!(exchange(&mesh, b"over xDS").unwrap(), b"over xDS");
    // B saw A's identity, from a certificate A got over CSR. (The access-log line is written by
    // B's log thread once B closes its side, which may be a moment after the app got its reply.)
    mesh.node_b
        .wait_for_log(
            "\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\"",
            WAIT,
        )
        .unwrap();
    // Of all the files the nodes read, none is the CA key; keys never touched the disk.
    let keyish: Vec<_> = files_under(mesh.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with(&ca))
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("PRIVATE KEY")))
        .collect();
    assert!(
        keyish.is_empty(),
        "private keys outside the CA dir: {keyish:?}"
    );

    // So far only A has dialed: A holds one pooled HBONE connection (to B), B none.
    assert_eq!(pool_connections(&mesh.a), 1.0);
    assert_eq!(pool_connections(&mesh.b), 0.0);

    // The control plane goes away, and both nodes have seen it gone (a reconnect failed since;
    // the nodes also logged failures while they started before it): the traffic below runs
    // while it is absent, not before the nodes noticed.
    const UNREACHABLE: &str = "cannot reach the xDS control plane; serving what is known";
    let failed_before =
        [&mesh.node_a, &mesh.node_b].map(|n| n.read_log().matches(UNREACHABLE).count());
    cp.kill().unwrap();
    for ((ns, node), before) in [(&mesh.a, &mesh.node_a), (&mesh.b, &mesh.node_b)]
        .into_iter()
        .zip(failed_before)
    {
        let end = Instant::now() + WAIT;
        while node.read_log().matches(UNREACHABLE).count() <= before {
            assert!(
                Instant::now() < end,
                "no failed reconnect: {}",
                node.read_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ns
            .http_get("127.0.0.1:15021", "/healthz/ready")
            .starts_with("HTTP/1.1 200"));
    }
    // Existing knowledge keeps NEW connections flowing: new TCP connections and new HBONE
    // streams from A (over A's pooled connection to B)...
    for i in 0..3 {
        let msg = format!("without a control plane {i}");
        assert_eq!(exchange(&mesh, msg.as_bytes()).unwrap(), msg.as_bytes());
    }
    // ...and a NEW HBONE connection, which a pooled one cannot stand in for: B has never dialed
    // A, so B's app reaching A's takes a fresh TCP + TLS handshake both ways, each node proving
    // its identity with the certificate it got before the control plane went, and B resolving
    // A's address from the model xDS gave it.
    let msg = b"B to A, first dial, no control plane";
    assert_eq!(exchange_from(&mesh.b, A_IP, msg).unwrap(), msg);
    assert_eq!(pool_connections(&mesh.b), 1.0, "B dialed A afresh");
    mesh.node_a
        .wait_for_log(
            "\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/backend\"",
            WAIT,
        )
        .unwrap();
    assert!(
        cp.try_wait().unwrap().is_some(),
        "the control plane is still gone"
    );

    // It comes back with a DENY for A's identity: B enforces it once it has resynced.
    std::fs::write(&mesh_path, mesh_file(&ca, DENY_FRONTEND)).unwrap();
    let _cp = control_plane(&mesh, &mesh_path);
    let end = Instant::now() + WAIT;
    loop {
        match exchange(&mesh, b"denied?") {
            Ok(got) if got == b"denied?" => {
                assert!(
                    Instant::now() < end,
                    "the DENY never took effect: {}",
                    mesh.node_b.read_log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            // Refused: a reset or an empty answer, never the app's bytes.
            Ok(got) => {
                assert!(got.is_empty(), "partial answer {got:?}");
                break;
            }
            Err(_) => break,
        }
    }
    let dump = mesh.b.http_get("127.0.0.1:15000", "/config_dump");
    assert!(dump.contains("shop/deny-frontend"), "{dump}");
}
