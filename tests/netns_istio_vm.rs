//! Tier (c): a VM joins the mesh from the files Istio's VM tooling writes for a WorkloadGroup
//! (`zmesh-node join --istio-vm-dir`), against the control plane of the tests (`zmesh-node ca
//! serve --xds`, standing in for istiod). Node B is the VM: its config is exactly what `join`
//! wrote, with no workload in it. The control plane auto-registers the VM into its group once
//! the VM's xDS stream opens, so node A's app reaches the VM's app by the group's service name
//! (its VIP) over HBONE; when the VM goes and leaves, node A forgets it and nothing of `join`
//! is left on the VM. The control plane runs beside node A; the VM reaches it directly, or
//! through node A as an east-west gateway (`east_west_gateway.control_plane`: its port 15012
//! passed through to the control plane, which then listens on A's loopback only).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::time::{Duration, Instant};

use zmesh_testbed::mesh::{HostMesh, APP_PORT, A_IP, B_IP};
use zmesh_testbed::{is_root, run_ok, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_zmesh-node");
/// The control plane's own port; the gateway's passthrough is on 15012.
const CP_PORT: u16 = 15013;
const GATEWAY_PORT: u16 = 15012;
const WAIT: Duration = Duration::from_secs(30);
/// istiod's name as the VM's files give it; `hosts` maps it to the control plane's address.
const ISTIOD: &str = "istiod.istio-system.svc";
/// The group's service VIP: unused, inside the namespaces' /24 so A routes (and captures) it.
const VIP_SUFFIX: &str = "99";
const SERVICE_PORT: u16 = 80;

fn vip() -> String {
    let (net, _) = A_IP.rsplit_once('.').unwrap();
    format!("{net}.{VIP_SUFFIX}")
}

/// Where the control plane listens, and where the VM's files say istiod is.
struct Layout {
    /// The control plane's listen address (node A dials it here).
    cp: String,
    /// `discoveryAddress`'s port; `hosts` maps istiod's name to A's address.
    vm_port: u16,
    /// Node A's `east_west_gateway`, if it is one.
    gateway: &'static str,
}

fn layout(via_gateway: bool) -> Layout {
    if via_gateway {
        Layout {
            cp: format!("127.0.0.1:{CP_PORT}"),
            vm_port: GATEWAY_PORT,
            gateway:
                "  east_west_gateway: { workload: app-a, control_plane: \"127.0.0.1:15013\" }\n",
        }
    } else {
        Layout {
            cp: format!("{A_IP}:{CP_PORT}"),
            vm_port: CP_PORT,
            gateway: "",
        }
    }
}

/// Node A: an ordinary node whose file names only its control plane (as in netns_control_plane).
fn node_a_config(ca: &Path, l: &Layout) -> String {
    let dir = ca.parent().unwrap();
    format!(
        "node:
  name: node-a
  access_log: json
{gateway}  control_plane:
    address: https://{cp}
    root_cert: {root}
    server_name: {ISTIOD}
    token_file: {token}
  certificates:
    ca_client: {{ ttl: 1h }}
",
        gateway = l.gateway,
        cp = l.cp,
        root = ca.join("root-cert.pem").display(),
        token = dir.join("node-a.token").display(),
    )
}

/// The control plane's model: A's workload, the `billing` group (whose VMs serve the billing
/// service, and which admits node `node-b` only), and the service.
fn mesh_file(ca: &Path) -> String {
    format!(
        "node:
  name: control-plane
  certificates:
    file_ca: {{ dir: {ca} }}
workloads:
  - {{ uid: app-a, name: app-a, namespace: shop, service_account: frontend, addresses: [{A_IP}], node: node-a }}
services:
  - {{ name: billing, namespace: finance, hostname: billing.finance.svc.cluster.local, vips: [{vip}], ports: {{ {SERVICE_PORT}: {APP_PORT} }} }}
workload_groups:
  - name: billing
    namespace: finance
    service_account: billing-sa
    services: {{ \"finance/billing.finance.svc.cluster.local\": {{ {SERVICE_PORT}: {APP_PORT} }} }}
    nodes: [node-b]
",
        ca = ca.display(),
        vip = vip(),
    )
}

/// A node's bootstrap token from the control plane's CA dir.
fn token(ca: &Path, node: &str) -> String {
    let out = run_ok(std::process::Command::new(BIN).args([
        "ca",
        "token",
        "--dir",
        ca.to_str().unwrap(),
        "--node",
        node,
    ]));
    out.trim().to_string()
}

/// What `istioctl x workload entry configure` writes for a VM of group `billing` in `finance`,
/// with node B's token as the VM's `istio-token`.
fn istio_vm_files(vm: &Path, ca: &Path, port: u16) {
    std::fs::create_dir_all(vm).unwrap();
    let files = [
        (
            "cluster.env",
            "CANONICAL_REVISION='latest'\nCANONICAL_SERVICE='billing'\nISTIO_INBOUND_PORTS='*'\n\
ISTIO_METAJSON_LABELS='{\"app\":\"billing\"}'\nISTIO_META_AUTO_REGISTER_GROUP='billing'\n\
ISTIO_META_CLUSTER_ID='Kubernetes'\nISTIO_META_MESH_ID='mesh1'\nISTIO_META_NETWORK=''\n\
ISTIO_NAMESPACE='finance'\nPOD_NAMESPACE='finance'\nSERVICE_ACCOUNT='billing-sa'\nTRUST_DOMAIN='cluster.local'\n"
                .to_string(),
        ),
        (
            "mesh.yaml",
            format!("defaultConfig:\n  discoveryAddress: {ISTIOD}:{port}\n  meshId: mesh1\n"),
        ),
        ("hosts", format!("{A_IP} {ISTIOD}\n")),
        (
            "root-cert.pem",
            std::fs::read_to_string(ca.join("root-cert.pem")).unwrap(),
        ),
        ("istio-token", token(ca, "node-b")),
    ];
    for (name, body) in files {
        std::fs::write(vm.join(name), body).unwrap();
    }
}

fn wait_ready(ns: &Netns, what: &str, log: impl Fn() -> String) {
    let end = Instant::now() + WAIT;
    loop {
        let r = ns.http_get("127.0.0.1:15021", "/healthz/ready");
        if r.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(Instant::now() < end, "{what} not ready: {r}\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn echo(ns: &Netns, ip: &str) -> std::thread::JoinHandle<()> {
    ns.spawn_echo(&format!("{ip}:{APP_PORT}")).unwrap()
}

/// One request/response from A's app to the billing service's VIP.
fn call_billing(a: &Netns, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = a
        .connect_tcp(format!("{}:{SERVICE_PORT}", vip()))
        .map_err(std::io::Error::other)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(msg)?;
    c.shutdown(Shutdown::Write)?;
    let mut got = Vec::new();
    c.read_to_end(&mut got)?;
    Ok(got)
}

const VM_UID: &str = "finance/billing/node-b";

#[test]
fn a_vm_joined_from_istios_files_is_auto_registered_and_forgotten_when_it_leaves() {
    vm_joins_and_leaves(false);
}

#[test]
fn a_vm_reaches_the_control_plane_through_the_east_west_gateway() {
    vm_joins_and_leaves(true);
}

fn vm_joins_and_leaves(via_gateway: bool) {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root (CI runs as root)"
    );
    let l = layout(via_gateway);
    // Node B's config is what `join --istio-vm-dir` writes, made here from the VM's files.
    let mesh = HostMesh::start_configured(Path::new(BIN), |name, ca| {
        let dir = ca.parent().unwrap();
        if name == "node-a" {
            std::fs::write(dir.join("node-a.token"), token(ca, "node-a")).unwrap();
            return node_a_config(ca, &l);
        }
        let vm = dir.join("istio-vm");
        istio_vm_files(&vm, ca, l.vm_port);
        let etc = dir.join("vm-etc");
        let out = run_ok(std::process::Command::new(BIN).args([
            "join",
            "--istio-vm-dir",
            vm.to_str().unwrap(),
            "--name",
            "node-b",
            "--address",
            B_IP,
            "--config-dir",
            etc.to_str().unwrap(),
            "--unit-dir",
            dir.join("vm-units").to_str().unwrap(),
            "--no-systemctl",
        ]));
        assert!(out.contains("node.yaml"), "{out}");
        std::fs::read_to_string(etc.join("node.yaml")).unwrap()
    })
    .unwrap();
    let dir = mesh.dir.path();
    let ca = mesh.ca_dir();
    // The VM's config names istiod (dialed at the `hosts` address, checked by name), its
    // network and group metadata, and no workload; the token is copied private.
    let written = std::fs::read_to_string(dir.join("vm-etc/node.yaml")).unwrap();
    assert!(!written.contains("workloads"), "{written}");
    for want in [
        &format!("https://{A_IP}:{}", l.vm_port) as &str,
        &format!("server_name: \"{ISTIOD}\""),
        "\"AUTO_REGISTER_GROUP\":\"billing\"",
        &format!("instance_ip: \"{B_IP}\""),
        "pod_namespace: \"finance\"",
    ] {
        assert!(written.contains(want), "{want} not in {written}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("vm-etc/certs/istio-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the token is readable by others: {mode:o}");

    let mesh_path = dir.join("mesh.yaml");
    std::fs::write(&mesh_path, mesh_file(&ca)).unwrap();
    let _app = echo(&mesh.b, B_IP);
    let cp = mesh
        .a
        .spawn_control_plane(
            BIN,
            &ca,
            &mesh_path,
            &l.cp,
            &["--server-name", ISTIOD],
            WAIT,
        )
        .unwrap();
    wait_ready(&mesh.a, "node A", || mesh.node_a.read_log());
    wait_ready(&mesh.b, "the VM", || mesh.node_b.read_log());
    cp.wait_for_log("workload auto-registered", WAIT).unwrap();
    if via_gateway {
        // The control plane listens on A's loopback only, which B cannot route to: the VM's
        // registration above came in through A's passthrough.
        mesh.node_a
            .wait_for_log("east-west gateway passes the control plane through", WAIT)
            .unwrap();
        assert!(mesh.b.connect_tcp(format!("127.0.0.1:{CP_PORT}")).is_err());
    }

    // A learns the VM from the control plane and reaches it by the group's service.
    let end = Instant::now() + WAIT;
    while !mesh
        .a
        .http_get("127.0.0.1:15000", "/config_dump")
        .contains(VM_UID)
    {
        assert!(Instant::now() < end, "A never learned the VM");
        std::thread::sleep(Duration::from_millis(100));
    }
    let msg = b"to the VM by its service name";
    assert_eq!(call_billing(&mesh.a, msg).unwrap(), msg);
    // The VM served it as the group's identity, and saw A's.
    mesh.node_b
        .wait_for_log(
            "\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\"",
            WAIT,
        )
        .unwrap();
    mesh.node_a
        .wait_for_log(
            "\"dst.identity\":\"spiffe://cluster.local/ns/finance/sa/billing-sa\"",
            WAIT,
        )
        .unwrap();

    // The VM goes (its unit stops) and leaves: its registration ends with its stream, A
    // forgets it, and calls to the service get no answer from the app.
    mesh.node_b.kill().unwrap();
    cp.wait_for_log("auto-registered workload removed", WAIT)
        .unwrap();
    let end = Instant::now() + WAIT;
    while mesh
        .a
        .http_get("127.0.0.1:15000", "/config_dump")
        .contains(VM_UID)
    {
        assert!(Instant::now() < end, "A still lists the VM after it left");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Refused: a reset or an empty answer, never the app's bytes.
    if let Ok(got) = call_billing(&mesh.a, b"anyone?") {
        assert!(got.is_empty(), "an answer after leaving: {got:?}");
    }
    let redirect = Path::new(BIN).with_file_name("zmesh-redirect");
    let etc = dir.join("vm-etc");
    let out = mesh
        .b
        .exec(&[
            BIN,
            "leave",
            "--config-dir",
            etc.to_str().unwrap(),
            "--unit-dir",
            dir.join("vm-units").to_str().unwrap(),
            "--no-systemctl",
            "--redirect-bin",
            redirect.to_str().unwrap(),
        ])
        .unwrap();
    assert!(out.contains("istio-token"), "{out}");
    assert!(!etc.exists(), "leave left {:?}", std::fs::read_dir(&etc));
    assert!(!dir.join("vm-units/zmesh-node.service").exists());
}
