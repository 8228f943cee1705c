//! Tier (c), issue #13: the CNI path as a kubelet's container runtime drives it. A private
//! containerd (Debian's 1.6, with runc) runs busybox containers with `ctr run --cni`, and ctr
//! executes the node's CNI chain from `/etc/cni/net.d` and `/opt/cni/bin` as it would for any
//! container: Debian's bridge + host-local give the address, then `zmesh-redirect`, chained last
//! by `zmesh-redirect cni install`, enrolls the container with the redirect agent, and zmesh-node
//! (in-pod mode, over ZDS) proxies it. Before the agent runs, the runtime refuses to start a
//! container (fail closed). Two meshed containers talk HTTP and only HBONE (port 15008) crosses
//! the bridge; each one's exit runs CNI DEL, which unenrolls it. After `cni uninstall` the
//! conflist is byte for byte what it was, and new containers start unmeshed and still talk
//! (plaintext on the bridge).
//!
//! What ctr passes to the plugins: `CNI_CONTAINERID` = `<ctr namespace>-<container id>`,
//! `CNI_NETNS` = `/proc/<task pid>/ns/net`, `CNI_IFNAME` = `eth0`, and `CNI_ARGS` =
//! `IgnoreUnknown=1` only. There are no `K8S_POD_*` args (ctr 1.6 has no option to add CNI args;
//! `--label` labels the container, not the CNI call), so the plugin names the pod by the
//! container id (its uid and name), in namespace `default` with service account `default`, and
//! the node finds the workload by that uid in its file config.
//!
//! Isolation: the node side (agent, zmesh-node, and ctr, hence the bridge and the containers'
//! host-side veths) lives in one network namespace standing in for the host, so no interface,
//! route or sysctl of the real host changes. Three things are machine-wide by nature: ctr reads
//! the compiled-in `/etc/cni/net.d` and `/opt/cni/bin`, which the test moves aside and puts back
//! on drop (also when it fails); runc's shims put their sockets in `/run/containerd/s`, removed
//! again when the test created it; and containerd's own directories, all pointed into the test's
//! temp dir by its config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zmesh_testbed::{is_root, Child, Netns, PacketCapture, IPPROTO_TCP};

/// Where Debian installs the reference plugins (`containernetworking-plugins`).
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The directories ctr 1.6 reads CNI configs and plugins from (compiled in, not configurable).
const CONF_DIR: &str = "/etc/cni/net.d";
const BIN_DIR: &str = "/opt/cni/bin";
/// Bridge the primary network creates, inside the node namespace.
const BRIDGE: &str = "zmcd0";
/// The primary network's subnet. host-local hands addresses out in order from `.2`, its state
/// lives in the test's temp dir, and the containers start one after another, so each one's
/// address is known in advance: the refused container takes `.2` (and gives it back), then the
/// meshed server `.3` and client `.4`, then the unmeshed server `.5` and client `.6`.
const SUBNET: &str = "10.251.13.0/24";
const SERVER_IP: &str = "10.251.13.3";
const CLIENT_IP: &str = "10.251.13.4";
const PLAIN_SERVER_IP: &str = "10.251.13.5";
const PLAIN_CLIENT_IP: &str = "10.251.13.6";
/// The server container's HTTP port.
const PORT: u16 = 8080;
/// ctr's namespace in the private containerd: the plugin sees `zmesh-<id>` as the container id.
const CTR_NS: &str = "zmesh";
/// The page the server serves; finding it in a captured frame means plaintext on the wire.
const MARKER: &str = "ZMESH-CONTAINERD-PLAINTEXT-MARKER-7c41";
/// Bound on any one container run or daemon start (a broken runtime fails, it does not hang).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A machine-wide directory moved aside for the test and put back on drop: the test's copy is
/// deleted, the original renamed back (or, when there was none, the directories the test
/// created are removed again). A rename keeps the original byte for byte, with its modes.
struct MovedAside {
    path: PathBuf,
    saved: PathBuf,
    existed: bool,
    /// Ancestors that did not exist before, deepest first.
    created: Vec<PathBuf>,
}

impl MovedAside {
    fn new(path: &str) -> MovedAside {
        let path = PathBuf::from(path);
        let saved = PathBuf::from(format!("{}.zmesh-test-saved", path.display()));
        assert!(
            !saved.exists(),
            "{} exists: an interrupted run of this test left the original {} there; restore it \
             (rm -rf {1} && mv {0} {1}) and rerun",
            saved.display(),
            path.display()
        );
        let existed = path.exists();
        let mut created = Vec::new();
        if existed {
            std::fs::rename(&path, &saved)
                .unwrap_or_else(|e| panic!("moving {} aside: {e}", path.display()));
        } else {
            let mut p = path.as_path();
            while !p.exists() {
                created.push(p.to_path_buf());
                p = p.parent().expect("/ exists");
            }
        }
        std::fs::create_dir_all(&path).unwrap();
        MovedAside {
            path,
            saved,
            existed,
            created,
        }
    }
}

impl Drop for MovedAside {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("removing the test's {}: {e}", self.path.display());
        }
        if self.existed {
            if let Err(e) = std::fs::rename(&self.saved, &self.path) {
                eprintln!(
                    "RESTORE FAILED: {} is still at {}: {e}",
                    self.path.display(),
                    self.saved.display()
                );
            }
        } else {
            for p in &self.created {
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

/// A containerd of the test's own: state, root, sockets, runc state and FIFOs all in `dir`.
/// Dropping it kills and deletes every task and container, stops the daemon, ends the shims it
/// started (found by its socket path on their command line) and removes `/run/containerd` when
/// the test created it.
struct Containerd {
    dir: PathBuf,
    address: PathBuf,
    rootfs: PathBuf,
    made_run_dir: bool,
    daemon: std::process::Child,
}

impl Containerd {
    fn start(dir: &Path, rootfs: &Path) -> Containerd {
        let d = dir.display();
        let config = dir.join("containerd.toml");
        // The CRI plugin (kubelet's gRPC API) is off: it would serve a streaming port and watch
        // the CNI dir itself. In 1.6 ctr, not the daemon, runs CNI for `ctr run --cni`.
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
            ),
        )
        .unwrap();
        let made_run_dir = !Path::new("/run/containerd").exists();
        // Not in the node namespace: `ip netns exec` remounts /sys, hiding the cgroup mounts runc
        // needs. Containers get their own network namespaces either way.
        let log = dir.join("containerd.log");
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("containerd.err")).unwrap())
            .spawn()
            .expect("starting containerd");
        let c = Containerd {
            dir: dir.to_path_buf(),
            address: dir.join("containerd.sock"),
            rootfs: rootfs.to_path_buf(),
            made_run_dir,
            daemon,
        };
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(c.dir.join("containerd.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn ctr_command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .args(["--namespace", CTR_NS]);
        cmd
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        self.ctr_command().args(args).output().unwrap()
    }

    /// IDs listed by `ctr <what> ls -q` (`task` or `container`).
    fn ids(&self, what: &str) -> Vec<String> {
        let out = self.ctr(&[what, "ls", "-q"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// `ctr run --rm --cni` in the node namespace, as a runtime creates a pod: the container runs
    /// `sh -c script` in the busybox rootfs and is removed (CNI DEL included) when it exits.
    fn run(&self, node: &Netns, id: &str, script: &str) -> Child {
        let d = &self.dir;
        let cgroup = format!("/zmesh-cd-{}-{id}", std::process::id());
        let address = self.address.to_str().unwrap();
        let runc_root = d.join("runc");
        let fifo = d.join("fifo");
        node.spawn(
            "ctr",
            &[
                "--address",
                address,
                "--namespace",
                CTR_NS,
                "run",
                "--rm",
                "--cni",
                "--runc-root",
                runc_root.to_str().unwrap(),
                "--fifo-dir",
                fifo.to_str().unwrap(),
                "--cgroup",
                &cgroup,
                "--rootfs",
                self.rootfs.to_str().unwrap(),
                id,
                "/bin/sh",
                "-c",
                script,
            ],
            &[],
        )
        .unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.ids("task") {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.ids("task").is_empty() && Instant::now() < deadline {
            for id in self.ids("task") {
                let _ = self.ctr(&["task", "delete", "--force", &id]);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for id in self.ids("container") {
            let _ = self.ctr(&["container", "delete", &id]);
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // Shims outlive their daemon by design; ours carry its socket path.
        let needle = self.address.to_string_lossy().into_owned();
        for pid in std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if self.made_run_dir {
            let _ = std::fs::remove_dir("/run/containerd/s");
            let _ = std::fs::remove_dir("/run/containerd");
        }
    }
}

/// A directory's entries with their contents (link targets for symlinks), or `None` when it
/// does not exist: what the test must leave as it found it.
fn listing(dir: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut out: Vec<(String, Vec<u8>)> = entries
        .flatten()
        .map(|e| {
            let p = e.path();
            let body = match std::fs::read_link(&p) {
                Ok(target) => target.into_os_string().into_encoded_bytes(),
                Err(_) => std::fs::read(&p).unwrap_or_default(),
            };
            (e.file_name().to_string_lossy().into_owned(), body)
        })
        .collect();
    out.sort();
    Some(out)
}

/// Waits for `child` (a `ctr run`) to exit; its exit status and everything it printed.
fn finish(child: &Child) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, child.read_log());
        }
        assert!(
            Instant::now() < deadline,
            "container did not finish in {STEP_TIMEOUT:?}: {}",
            child.read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The rootfs every container runs from: static busybox, its applets as symlinks, and the page.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(rootfs.join("www")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    std::fs::write(rootfs.join("www/index.html"), format!("{MARKER}\n")).unwrap();
    rootfs
}

/// `zmesh-redirect <args>`, which must succeed.
fn redirect(args: &[&str]) {
    let bin = zmesh_testbed::mesh::redirect_bin(Path::new(env!("CARGO_BIN_EXE_zmesh-node")));
    let out = Command::new(&bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "zmesh-redirect {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pod uids the agent holds (`zmesh-redirect pod list`).
fn enrolled(admin: &Path) -> String {
    let bin = zmesh_testbed::mesh::redirect_bin(Path::new(env!("CARGO_BIN_EXE_zmesh-node")));
    let out = Command::new(&bin)
        .args(["pod", "list", "--admin-socket"])
        .arg(admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node-side veth of the one container on the bridge so far. Captures sit on a bridge port,
/// not on the bridge: frames the bridge forwards from one port to another never pass the bridge
/// device itself (unless it is promiscuous).
fn only_port(node: &Netns) -> String {
    let links = node.ip(&["-o", "link", "show", "master", BRIDGE]).unwrap();
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1)?.split('@').next())
        .collect();
    assert_eq!(names.len(), 1, "one container on {BRIDGE}: {links}");
    names[0].to_string()
}

/// Waits until a server container printed its address (its first line), i.e. it is past CNI ADD
/// and running.
fn wait_for_address(server: &Child, ip: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !server.read_log().contains(&format!("inet {ip}/24")) {
        assert!(
            Instant::now() < deadline && server.try_wait().unwrap().is_none(),
            "the server did not come up at {ip}: {}",
            server.read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The HTTP client script: retries while the server's httpd comes up. (busybox's `wget`
/// crashes in a rootfs without glibc's NSS files, so the request goes through `nc`.)
fn client_script(server: &str) -> String {
    format!(
        "for i in $(seq 100); do \
           out=$(printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {server} {PORT}); \
           case \"$out\" in *' 200 OK'*) echo \"$out\"; exit 0;; esac; sleep 0.1; \
         done; exit 1"
    )
}

fn between(f: &zmesh_testbed::Frame, a: &str, b: &str) -> bool {
    let (a, b) = (a.parse().ok(), b.parse().ok());
    (f.src == a && f.dst == b) || (f.src == b && f.dst == a)
}

#[test]
fn containers_run_by_containerd_are_meshed_through_the_cni_chain() {
    assert!(
        is_root(),
        "tier (c) tests run containerd, build network namespaces and need root (CI runs as root)"
    );
    for (what, path) in [
        (
            "Debian's containernetworking-plugins",
            "/usr/lib/cni/bridge",
        ),
        ("containerd", "/usr/bin/containerd"),
        ("ctr (containerd)", "/usr/bin/ctr"),
        ("runc", "/usr/sbin/runc"),
        ("busybox-static", "/bin/busybox"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{what} missing ({path}): scripts/setup.sh installs it"
        );
    }
    let started = Instant::now();
    // Drop order (reverse of declaration): containers and daemons, then the node namespace,
    // then the machine's CNI dirs go back, then the temp dir.
    let dir = tempfile::tempdir().unwrap();
    let machine_before = [listing(CONF_DIR), listing(BIN_DIR)];
    let conf_dir = MovedAside::new(CONF_DIR);
    let bin_dir = MovedAside::new(BIN_DIR);
    for plugin in ["bridge", "host-local"] {
        std::os::unix::fs::symlink(
            Path::new(REFERENCE_PLUGINS).join(plugin),
            Path::new(BIN_DIR).join(plugin),
        )
        .unwrap();
    }
    // The node's primary network, as an operator writes it (key order, indentation and final
    // newline are the author's, which `cni uninstall` must keep).
    let conflist_path = Path::new(CONF_DIR).join("10-zmesh-containerd.conflist");
    let original = format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "zmesh-containerd-net",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{SUBNET}" }}]],
        "dataDir": "{}"
      }}
    }}
  ]
}}
"#,
        dir.path().join("ipam").display()
    );
    std::fs::write(&conflist_path, &original).unwrap();

    let node = Netns::new("zcd").unwrap();
    let rootfs = busybox_rootfs(dir.path());
    let containerd = Containerd::start(dir.path(), &rootfs);

    // Chain zmesh-redirect last into the primary network, pointed at the agent's socket.
    let zds = dir.path().join("zds.sock");
    let admin = dir.path().join("admin.sock");
    let entry = dir.path().join("plugin.json");
    std::fs::write(
        &entry,
        json!({"type": "zmesh-redirect", "admin_socket": admin.display().to_string()}).to_string(),
    )
    .unwrap();
    redirect(&[
        "cni",
        "install",
        "--conf-dir",
        CONF_DIR,
        "--bin-dir",
        BIN_DIR,
        "--plugin-config",
        entry.to_str().unwrap(),
    ]);
    let chained: Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist_path).unwrap()).unwrap();
    assert_eq!(chained["plugins"][1]["type"], "zmesh-redirect", "{chained}");
    assert!(Path::new(BIN_DIR).join("zmesh-redirect").exists());

    // Fail closed: with no agent to capture it, the runtime refuses to start the container.
    let refused = containerd.run(&node, "refused", "touch /refused-ran");
    let (status, log) = finish(&refused);
    assert!(!status.success(), "the container ran uncaptured: {log}");
    assert!(
        log.contains("cannot reach the redirect agent") && log.contains("admin.sock"),
        "ctr's error names the agent and its socket: {log}"
    );
    // ctr 1.6 leaves the created (never started) task behind when CNI setup fails; kubelet's
    // runtime would tear the sandbox down, as the test does here.
    let tasks = String::from_utf8_lossy(&containerd.ctr(&["task", "ls"]).stdout).into_owned();
    assert!(
        tasks
            .lines()
            .all(|l| !l.starts_with("refused") || l.contains("CREATED")),
        "the refused container's task went past CREATED: {tasks}"
    );
    let _ = containerd.ctr(&["task", "delete", "--force", "refused"]);
    let _ = containerd.ctr(&["container", "delete", "refused"]);
    assert!(
        !rootfs.join("refused-ran").exists(),
        "the refused container's command ran"
    );
    assert!(
        containerd.ids("container").is_empty(),
        "refused container left behind"
    );

    // The node: the redirect agent and zmesh-node in in-pod mode, the containers' workloads by
    // the uids the plugin derives from ctr's container ids and by host-local's addresses.
    let node_bin = Path::new(env!("CARGO_BIN_EXE_zmesh-node"));
    let agent = zmesh_testbed::mesh::start_agent(&node, node_bin, &zds, &admin).unwrap();
    let ca = dir.path().join("ca");
    zmesh::identity::FileCa::init(&ca, "cluster.local").unwrap();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node:
  name: node-1
  mode: in_pod
  zds_socket: {zds}
  access_log: json
  certificates:
    file_ca: {{ dir: {ca} }}
workloads:
  - {{ uid: {CTR_NS}-server, name: server, namespace: default, service_account: server, addresses: [{SERVER_IP}], node: node-1 }}
  - {{ uid: {CTR_NS}-client, name: client, namespace: default, service_account: client, addresses: [{CLIENT_IP}], node: node-1 }}
",
            zds = zds.display(),
            ca = ca.display()
        ),
    )
    .unwrap();
    let zmesh = node
        .spawn(
            env!("CARGO_BIN_EXE_zmesh-node"),
            &["run", "--config", cfg.to_str().unwrap()],
            &[("ZMESH_LOG", "info")],
        )
        .unwrap();
    zmesh
        .wait_for_log("ZDS snapshot complete", Duration::from_secs(10))
        .unwrap();

    // The server container: enrolled by its CNI ADD before its first instruction runs.
    let server = containerd.run(
        &node,
        "server",
        &format!("ip -4 addr show eth0; exec httpd -f -p {PORT} -h /www"),
    );
    wait_for_address(&server, SERVER_IP);
    assert!(
        enrolled(&admin).contains(&format!("{CTR_NS}-server")),
        "server enrolled under ctr's container id: {}",
        enrolled(&admin)
    );

    // The meshed client: HTTP to the server by pod IP; the server's side of the bridge carries
    // only HBONE between the two containers.
    let cap = PacketCapture::start(&node, &only_port(&node)).unwrap();
    let client = containerd.run(&node, "client", &client_script(SERVER_IP));
    let (status, log) = finish(&client);
    let frames = cap.stop().unwrap();
    assert!(status.success(), "client: {log}");
    assert!(log.contains(MARKER), "client got the page: {log}");
    let tcp: Vec<_> = frames
        .iter()
        .filter(|f| f.proto == Some(IPPROTO_TCP) && between(f, SERVER_IP, CLIENT_IP))
        .collect();
    assert!(
        tcp.len() > 5,
        "capture saw the exchange: {} frames",
        tcp.len()
    );
    for f in &tcp {
        let (s, d) = f.tcp_ports().unwrap();
        assert!(
            s == 15008 || d == 15008,
            "non-HBONE TCP between the containers: {s} -> {d}"
        );
    }
    assert!(
        frames.iter().all(|f| !f.contains(MARKER.as_bytes())),
        "plaintext page on the bridge"
    );
    // The server's tunnel saw the client's identity: mTLS between the two workloads.
    let deadline = Instant::now() + Duration::from_secs(5);
    let identity = "\"src.identity\":\"spiffe://cluster.local/ns/default/sa/client\"";
    while !zmesh.read_log().contains(identity) {
        assert!(
            Instant::now() < deadline,
            "no inbound HBONE from the client logged: {}",
            zmesh.read_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client's exit ran CNI DEL through the chain: the agent forgot it.
    let pods = enrolled(&admin);
    assert!(
        !pods.contains(&format!("{CTR_NS}-client")) && pods.contains(&format!("{CTR_NS}-server")),
        "after the client exited: {pods}"
    );

    // The server goes as a pod goes: killed, its CNI DEL (through the chain ctr loaded at its
    // start) unenrolls it.
    let out = containerd.ctr(&["task", "kill", "-s", "SIGKILL", "server"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = finish(&server);
    let pods = enrolled(&admin);
    assert!(
        !pods.contains(&format!("{CTR_NS}-server")),
        "after the server exited: {pods}"
    );
    assert!(containerd.ids("task").is_empty() && containerd.ids("container").is_empty());

    // Uninstall: the chain is the operator's again, byte for byte, and the binary is gone.
    redirect(&[
        "cni",
        "uninstall",
        "--conf-dir",
        CONF_DIR,
        "--bin-dir",
        BIN_DIR,
    ]);
    assert_eq!(
        std::fs::read_to_string(&conflist_path).unwrap(),
        original,
        "cni uninstall changed the operator's conflist"
    );
    assert!(!Path::new(BIN_DIR).join("zmesh-redirect").exists());

    // New containers start unmeshed and still talk: plaintext to the app port crosses the
    // bridge, and the agent never hears of them.
    let plain_server = containerd.run(
        &node,
        "plain-server",
        &format!("ip -4 addr show eth0; exec httpd -f -p {PORT} -h /www"),
    );
    wait_for_address(&plain_server, PLAIN_SERVER_IP);
    let cap = PacketCapture::start(&node, &only_port(&node)).unwrap();
    let plain = containerd.run(&node, "plain-client", &client_script(PLAIN_SERVER_IP));
    let (status, log) = finish(&plain);
    let frames = cap.stop().unwrap();
    assert!(status.success(), "unmeshed client: {log}");
    assert!(log.contains(MARKER), "unmeshed client got the page: {log}");
    assert!(
        frames.iter().any(|f| f.is_tcp_syn()
            && f.src == PLAIN_CLIENT_IP.parse().ok()
            && f.dst == PLAIN_SERVER_IP.parse().ok()
            && f.dst_port == Some(PORT)),
        "no plaintext SYN from {PLAIN_CLIENT_IP} to {PLAIN_SERVER_IP}:{PORT} on the bridge"
    );
    assert!(
        frames.iter().any(|f| f.contains(MARKER.as_bytes())),
        "the unmeshed page is plaintext on the bridge"
    );
    let pods = enrolled(&admin);
    assert!(
        !pods.contains("plain"),
        "an unmeshed container was enrolled: {pods}"
    );
    let out = containerd.ctr(&["task", "kill", "-s", "SIGKILL", "plain-server"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = finish(&plain_server);
    assert!(containerd.ids("task").is_empty() && containerd.ids("container").is_empty());

    // Everything the test put on the machine goes away with its guards.
    drop((zmesh, agent, containerd, node));
    drop((bin_dir, conf_dir));
    assert_eq!(
        [listing(CONF_DIR), listing(BIN_DIR)],
        machine_before,
        "the machine's CNI dirs are not as they were"
    );
    eprintln!("containerd CNI test took {:?}", started.elapsed());
}
