//! Tier (c), issue #13: enrollment by label and agent restarts. The real `zmesh-redirect agent`
//! runs in a node netns beside the fake Kubernetes API (`zmesh_testbed::kubeapi`, on the node's
//! loopback, 127.82.0.1); pods are network namespaces holding their pod IP (10.231.x.x, and
//! 10.232.x.x for the restart topology). A fake tunnel (the crate's own ZDS client) records what
//! the agent hands over; the restart test runs the real `zmesh-node` instead and keeps traffic
//! flowing through the restart.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use zmesh_redirect::agent::{self, Request};
use zmesh_redirect::zds::{ZdsClient, ZdsEvent};
use zmesh_testbed::kubeapi::{pod, FakeKube, Fault};
use zmesh_testbed::{attach_to_bridge, require_root, Child, Netns};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const MODE: &str = "istio.io/dataplane-mode";
const GUARD: Duration = Duration::from_secs(20);
const NODE: &str = "node-1";

fn zmesh_node() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_zmesh-node"))
}

/// What the fake tunnel was handed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Add {
        uid: String,
        service_account: String,
        netns: (u64, u64),
    },
    Del(String),
    SnapshotSent,
}

/// A node tunnel that acks everything and reports what it saw.
struct Tunnel {
    events: mpsc::Receiver<Seen>,
}

impl Tunnel {
    fn connect(zds: &Path) -> Tunnel {
        let (tx, events) = mpsc::channel();
        let path = zds.to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(mut client) = ZdsClient::connect(&path).await else {
                    return;
                };
                while let Ok(Some(event)) = client.next_event().await {
                    let seen = match event {
                        ZdsEvent::Add { uid, info, netns } => {
                            let meta = std::fs::File::from(netns).metadata().unwrap();
                            Seen::Add {
                                uid,
                                service_account: info.service_account,
                                netns: (meta.dev(), meta.ino()),
                            }
                        }
                        ZdsEvent::Keep { uid } => Seen::Add {
                            uid,
                            service_account: String::new(),
                            netns: (0, 0),
                        },
                        ZdsEvent::Del { uid } => Seen::Del(uid),
                        ZdsEvent::SnapshotSent => Seen::SnapshotSent,
                    };
                    let _ = tx.send(seen);
                    if client.ack(Ok(())).await.is_err() {
                        break;
                    }
                }
            });
        });
        Tunnel { events }
    }

    fn next(&self, what: &str) -> Seen {
        self.events
            .recv_timeout(GUARD)
            .unwrap_or_else(|_| panic!("the tunnel got nothing while waiting for {what}"))
    }

    /// Nothing arrives within `d`.
    fn quiet(&self, d: Duration) -> Option<Seen> {
        self.events.recv_timeout(d).ok()
    }
}

/// A pod: its own netns with the pod IP on loopback (all the netns scan looks at).
struct PodNs {
    ns: Netns,
    ip: &'static str,
}

impl PodNs {
    fn new(ip: &'static str) -> PodNs {
        let ns = Netns::new("zenp").unwrap();
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .unwrap();
        PodNs { ns, ip }
    }

    fn id(&self) -> (u64, u64) {
        let m = std::fs::metadata(self.ns.path()).unwrap();
        (m.dev(), m.ino())
    }
}

impl PodNs {
    /// A process of pod `uid` living in this netns, in the cgroup kubelet would make for the pod:
    /// what live enrollment looks for (the netns of the pod's processes, confirmed by IP).
    fn process(&self, uid: &str) -> PodProcess {
        PodProcess::start(self.ns.path(), uid)
    }
}

/// A `sleep` in a pod's netns and in a cgroup named `pod<uid>` (kubelet's cgroupfs naming), under
/// a parent of this test's own; killed, and both cgroups removed, on drop.
struct PodProcess {
    child: KillOnDrop,
    parent: PathBuf,
}

impl PodProcess {
    fn start(netns: &Path, uid: &str) -> PodProcess {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // cgroup v2 at the root, else v1's pids hierarchy (any hierarchy shows in
        // /proc/<pid>/cgroup, which is what the agent reads).
        let root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/pids")
        };
        let parent = root.join(format!(
            "zmesh-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let cgroup = parent.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        let child = KillOnDrop(
            Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["sleep", "600"])
                .spawn()
                .unwrap(),
        );
        std::fs::write(cgroup.join("cgroup.procs"), child.0.id().to_string()).unwrap();
        PodProcess { child, parent }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        // A cgroup is removable once its last process has exited.
        for _ in 0..200 {
            let pods: Vec<PathBuf> = std::fs::read_dir(&self.parent)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            let _ = pods.iter().try_for_each(std::fs::remove_dir);
            if std::fs::remove_dir(&self.parent).is_ok() || !self.parent.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `iptables-save` of a netns without the counters and the timestamp comments, so two dumps of
/// the same ruleset compare equal.
fn rules(ns: &Netns) -> String {
    ns.exec(&["iptables-save"])
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => l[..i].to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn captured(ns: &Netns) -> bool {
    rules(ns).contains("-A ISTIO_OUTPUT")
}

/// A node netns running the fake API on its loopback and the agent in label mode.
struct Node {
    agent: Option<Child>,
    api: FakeKube,
    zds: PathBuf,
    admin: PathBuf,
    ns: Netns,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(api_addr: &str) -> Node {
        let ns = Netns::new("zenn").unwrap();
        let api = ns.run(|| FakeKube::start(api_addr)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut node = Node {
            agent: None,
            api,
            zds: dir.path().join("zds.sock"),
            admin: dir.path().join("admin.sock"),
            ns,
            _dir: dir,
        };
        node.start_agent();
        node
    }

    fn start_agent(&mut self) {
        let url = self.api.url();
        let agent = zmesh_testbed::mesh::start_agent_with(
            &self.ns,
            zmesh_node(),
            &self.zds,
            &self.admin,
            &["--kube-api", &url, "--node-name", NODE],
            &[("ZMESH_LOG", "info")],
            GUARD,
        )
        .unwrap();
        self.agent = Some(agent);
    }

    fn agent(&self) -> &Child {
        self.agent.as_ref().unwrap()
    }

    fn enrolled(&self) -> Vec<String> {
        agent::request(&self.admin, &Request::List)
            .unwrap()
            .uids
            .unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        self.agent().wait_for_log(needle, GUARD).unwrap();
    }
}

/// Runs the CNI plugin as the runtime would and returns (success, stdout, stderr).
fn cni(
    admin: &Path,
    command: &str,
    p: &PodNs,
    namespace: &str,
    name: &str,
    uid: &str,
) -> (bool, String, String) {
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"zmesh-redirect","admin_socket":"{}","prevResult":{{"cniVersion":"1.0.0","ips":[{{"address":"{}/24"}}]}}}}"#,
        admin.display(),
        p.ip
    );
    let mut child = Command::new(zmesh_testbed::mesh::redirect_bin(zmesh_node()))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("ctr-{uid}"))
        .env("CNI_NETNS", p.ns.path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAME={name};K8S_POD_NAMESPACE={namespace};K8S_POD_UID={uid}"),
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
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The pod as the API shows it while its sandbox is being created: pending, no IP yet (so the
/// agent's live enrollment leaves it to the CNI ADD).
fn pending(mut p: k8s_openapi::api::core::v1::Pod) -> k8s_openapi::api::core::v1::Pod {
    p.status = Some(k8s_openapi::api::core::v1::PodStatus {
        phase: Some("Pending".into()),
        ..Default::default()
    });
    p
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn cni_add_captures_only_ambient_pods() {
    require_root();
    let node = Node::start("127.82.0.1:0");
    let tunnel = Tunnel::connect(&node.zds);
    assert_eq!(tunnel.next("the snapshot"), Seen::SnapshotSent);
    node.api.put_namespace("shop", &[]);
    node.api.put_namespace("bank", &[AMBIENT]);
    node.api.put_namespace("kube-system", &[]);

    // Not labelled: ADD succeeds with the primary's result, nothing captured, tunnel untold.
    let web = PodNs::new("10.231.0.2");
    node.api
        .apply_pod(&pending(pod("shop", "web", "u-web", NODE, web.ip, &[])));
    let (ok, stdout, stderr) = cni(&node.admin, "ADD", &web, "shop", "web", "u-web");
    assert!(ok, "ADD of a plain pod: {stdout} {stderr}");
    assert!(
        stdout.contains("10.231.0.2/24"),
        "prevResult passes through: {stdout}"
    );
    assert!(!captured(&web.ns), "a pod outside the mesh was captured");
    let (ok, _, stderr) = cni(&node.admin, "CHECK", &web, "shop", "web", "u-web");
    assert!(ok, "CHECK of a pod that is rightly not enrolled: {stderr}");

    // The namespace is ambient: captured, and the tunnel gets the service account of the spec.
    let ledger = PodNs::new("10.231.0.3");
    node.api.apply_pod(&pending(pod(
        "bank",
        "ledger",
        "u-ledger",
        NODE,
        ledger.ip,
        &[],
    )));
    let (ok, stdout, stderr) = cni(&node.admin, "ADD", &ledger, "bank", "ledger", "u-ledger");
    assert!(ok, "ADD of an ambient pod: {stdout} {stderr}");
    assert!(captured(&ledger.ns), "the ambient pod is not captured");
    assert_eq!(
        tunnel.next("ledger's add"),
        Seen::Add {
            uid: "u-ledger".into(),
            service_account: "ledger-sa".into(),
            netns: ledger.id()
        }
    );

    // dataplane-mode=none opts a pod out of an ambient namespace.
    let batch = PodNs::new("10.231.0.4");
    node.api.apply_pod(&pending(pod(
        "bank",
        "batch",
        "u-batch",
        NODE,
        batch.ip,
        &[(MODE, "none")],
    )));
    let (ok, _, stderr) = cni(&node.admin, "ADD", &batch, "bank", "batch", "u-batch");
    assert!(ok, "{stderr}");
    assert!(!captured(&batch.ns), "dataplane-mode=none was captured");
    // A pod labelled ambient in a plain namespace is meshed.
    let solo = PodNs::new("10.231.0.5");
    node.api.apply_pod(&pending(pod(
        "shop",
        "solo",
        "u-solo",
        NODE,
        solo.ip,
        &[AMBIENT],
    )));
    let (ok, _, stderr) = cni(&node.admin, "ADD", &solo, "shop", "solo", "u-solo");
    assert!(ok, "{stderr}");
    assert!(captured(&solo.ns));
    assert!(matches!(tunnel.next("solo's add"), Seen::Add { uid, .. } if uid == "u-solo"));
    assert_eq!(
        tunnel.quiet(Duration::from_millis(300)),
        None,
        "nothing else reached the tunnel"
    );

    // The API fails: kube-system is still excluded before the API is asked; an ambient-namespace
    // pod the stores have not seen fails its ADD (fail closed) with a message saying why.
    node.api.set_fault(Some(Fault::Status(500)));
    let dns = PodNs::new("10.231.0.6");
    let (ok, _, stderr) = cni(&node.admin, "ADD", &dns, "kube-system", "coredns", "u-dns");
    assert!(ok, "kube-system must not wait on the API: {stderr}");
    assert!(!captured(&dns.ns));
    let late = PodNs::new("10.231.0.7");
    let (ok, stdout, _) = cni(&node.admin, "ADD", &late, "bank", "late", "u-late");
    assert!(!ok, "a maybe-meshed pod started while the API is down");
    assert!(
        stdout.contains("cannot tell whether it is meshed") && stdout.contains("pod bank/late"),
        "the CNI error names the cause: {stdout}"
    );
    assert!(!captured(&late.ns));
    node.api.set_fault(None);

    assert_eq!(
        node.enrolled(),
        vec!["u-ledger".to_owned(), "u-solo".to_owned()]
    );
}

#[test]
fn running_pods_follow_their_labels() {
    require_root();
    let node = Node::start("127.82.0.2:0");
    node.api.put_namespace("shop", &[]);
    // `a` is a named netns (a runtime's bind mount); `b` exists only as a process's netns
    // (found through /proc/<pid>/ns/net).
    let a = PodNs::new("10.231.1.2");
    let b_holder = Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && ip addr add 10.231.1.3/32 dev lo && exec sleep 600",
        ])
        .spawn()
        .unwrap();
    let b_holder = KillOnDrop(b_holder);
    let b_netns = PathBuf::from(format!("/proc/{}/ns/net", b_holder.0.id()));
    let _a_process = a.process("u-a");
    wait_until("b's address", || {
        Command::new("nsenter")
            .arg(format!("--net={}", b_netns.display()))
            .args(["ip", "-o", "addr"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("10.231.1.3"))
            .unwrap_or(false)
    });
    let b_id = {
        let m = std::fs::metadata(&b_netns).unwrap();
        (m.dev(), m.ino())
    };
    // A process of b in b's pod cgroup, as kubelet would have put it.
    let _b_process = PodProcess::start(&b_netns, "u-b");
    // An impostor: a netns holding the IP of pod c, whose own processes are not running here.
    // An IP alone must never be enough to be captured, and served, as pod c.
    let impostor = PodNs::new("10.231.1.5");
    let _impostor_process = impostor.process("u-impostor");
    let b_rules = || {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", b_netns.display()))
            .arg("iptables-save")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("-A ISTIO_OUTPUT")
    };
    node.api
        .apply_pod(&pod("shop", "a", "u-a", NODE, a.ip, &[]));
    node.api
        .apply_pod(&pod("shop", "b", "u-b", NODE, "10.231.1.3", &[]));
    node.api
        .apply_pod(&pod("shop", "c", "u-c", NODE, impostor.ip, &[]));
    // A meshed pod whose IP no netns holds: a clear error in the log, nothing else.
    node.api.apply_pod(&pod(
        "shop",
        "ghost",
        "u-ghost",
        NODE,
        "10.231.1.99",
        &[AMBIENT],
    ));
    // kube-system is excluded whatever its labels say.
    node.api.put_namespace("kube-system", &[AMBIENT]);
    let sys = PodNs::new("10.231.1.4");
    node.api.apply_pod(&pod(
        "kube-system",
        "dns",
        "u-dns",
        NODE,
        sys.ip,
        &[AMBIENT],
    ));
    let tunnel = Tunnel::connect(&node.zds);
    assert_eq!(tunnel.next("the snapshot"), Seen::SnapshotSent);
    node.wait_log("no network namespace on this node holds its IPs [10.231.1.99]");

    // Labelling the namespace enrolls both running pods.
    node.api.label_namespace("shop", AMBIENT.0, Some(AMBIENT.1));
    let mut adds = vec![tunnel.next("an add"), tunnel.next("another add")];
    adds.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        adds,
        vec![
            Seen::Add {
                uid: "u-a".into(),
                service_account: "a-sa".into(),
                netns: a.id()
            },
            Seen::Add {
                uid: "u-b".into(),
                service_account: "b-sa".into(),
                netns: b_id
            },
        ]
    );
    assert!(captured(&a.ns) && b_rules(), "rules in both pods");
    node.wait_log("no network namespace on this node holds its IPs [10.231.1.5]");
    assert!(
        !captured(&impostor.ns),
        "a netns was captured for holding c's IP"
    );
    assert_eq!(
        tunnel.quiet(Duration::from_millis(300)),
        None,
        "c reached the tunnel"
    );

    // a opts out: released (rules gone, del), b stays.
    node.api.label_pod("shop", "a", MODE, Some("none"));
    assert_eq!(tunnel.next("a's del"), Seen::Del("u-a".into()));
    assert!(!captured(&a.ns), "a's rules were left behind");
    assert!(b_rules());
    // The namespace loses its label: b is released too.
    node.api.label_namespace("shop", AMBIENT.0, None);
    assert_eq!(tunnel.next("b's del"), Seen::Del("u-b".into()));
    assert!(!b_rules(), "b's rules were left behind");
    // b labelled on its own: enrolled again; deleted in the API: deleted.
    node.api.label_pod("shop", "b", MODE, Some("ambient"));
    assert!(matches!(tunnel.next("b again"), Seen::Add { uid, .. } if uid == "u-b"));
    node.api.delete_pod("shop", "b");
    assert_eq!(tunnel.next("b's deletion"), Seen::Del("u-b".into()));
    assert!(node.enrolled().is_empty(), "{:?}", node.enrolled());
    assert!(!captured(&sys.ns), "a kube-system pod was captured");
    assert!(node.agent().try_wait().unwrap().is_none(), "the agent died");
}

#[test]
fn a_failing_api_unmeshes_nothing() {
    require_root();
    let node = Node::start("127.82.0.3:0");
    node.api.put_namespace("shop", &[AMBIENT]);
    let p = PodNs::new("10.231.2.2");
    let _process = p.process("u-web");
    node.api
        .apply_pod(&pod("shop", "web", "u-web", NODE, p.ip, &[]));
    wait_until("web enrolled live", || {
        node.enrolled() == vec!["u-web".to_owned()]
    });
    let tunnel = Tunnel::connect(&node.zds);
    // Enrolled before the tunnel connected: it is in the snapshot.
    assert!(matches!(tunnel.next("web's add"), Seen::Add { uid, .. } if uid == "u-web"));
    assert_eq!(tunnel.next("the snapshot's end"), Seen::SnapshotSent);
    let before = rules(&p.ns);

    for fault in [Fault::Status(500), Fault::Garbage] {
        node.api.set_fault(Some(fault.clone()));
        node.api.break_watches();
        node.wait_log("watching the Kubernetes API failed; retrying with backoff");
        assert_eq!(
            tunnel.quiet(Duration::from_secs(3)),
            None,
            "{fault:?}: the tunnel was told something while the API failed"
        );
        node.api.set_fault(None);
    }
    // 410 after compaction: a relist, nothing released.
    node.api.compact();
    assert_eq!(tunnel.quiet(Duration::from_secs(2)), None);
    assert_eq!(rules(&p.ns), before, "rules changed while the API failed");
    assert_eq!(node.enrolled(), vec!["u-web".to_owned()]);
}

/// The pod counts of the node's "ZDS snapshot complete" lines (it logs JSON), in order.
fn snapshots(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "ZDS snapshot complete")
        .filter_map(|v| v["pods"].as_u64())
        .collect()
}

/// A netns made under a name the test chose (to reuse a dead pod's path), deleted on drop.
struct ReusedNetns(String);

impl ReusedNetns {
    fn add(name: &str) -> ReusedNetns {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        ReusedNetns(name.to_owned())
    }

    fn captured(&self) -> bool {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables-save"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("-A ISTIO_OUTPUT")
    }
}

impl Drop for ReusedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

/// Kills its process (and reaps it) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_restart_without_api_restores_pods_from_its_state_file() {
    require_root();
    let node = Netns::new("zens").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (zds, admin) = (dir.path().join("zds.sock"), dir.path().join("admin.sock"));
    let start = || {
        // A killed agent leaves its admin socket behind; readiness is the new one appearing.
        let _ = std::fs::remove_file(&admin);
        zmesh_testbed::mesh::start_agent_with(&node, zmesh_node(), &zds, &admin, &[], &[], GUARD)
            .unwrap()
    };
    let agent = start();
    let tunnel = Tunnel::connect(&zds);
    assert_eq!(tunnel.next("the snapshot"), Seen::SnapshotSent);
    let (a, b, c, d) = (
        PodNs::new("10.231.3.2"),
        PodNs::new("10.231.3.3"),
        PodNs::new("10.231.3.4"),
        PodNs::new("10.231.3.5"),
    );
    for (p, uid) in [(&a, "u-a"), (&b, "u-b"), (&c, "u-c"), (&d, "u-d")] {
        let (ok, _, stderr) = cni(&admin, "ADD", p, "shop", uid, uid);
        assert!(ok, "without the API every pod is enrolled: {stderr}");
        assert!(matches!(tunnel.next("an add"), Seen::Add { uid: u, .. } if u == uid));
    }
    let state = std::fs::read_to_string(dir.path().join("admin.pods.json")).unwrap();
    assert!(state.contains("u-a") && state.contains("u-c"), "{state}");
    let rules_before = (rules(&a.ns), rules(&b.ns));

    // The agent dies hard; while it is down c's sandbox goes away, and d's path is reused by
    // another netns (a later pod's): neither may come back.
    agent.kill().unwrap();
    drop(agent);
    drop(c);
    let d_name = d.ns.name().to_owned();
    drop(d);
    let reused = ReusedNetns::add(&d_name);
    let agent = start();
    let tunnel = Tunnel::connect(&zds);
    let mut snapshot = vec![tunnel.next("snapshot add"), tunnel.next("snapshot add")];
    snapshot.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        snapshot,
        vec![
            Seen::Add {
                uid: "u-a".into(),
                service_account: "default".into(),
                netns: a.id()
            },
            Seen::Add {
                uid: "u-b".into(),
                service_account: "default".into(),
                netns: b.id()
            },
        ],
        "the restarted agent's snapshot holds the pods that still exist"
    );
    assert_eq!(tunnel.next("the end of the snapshot"), Seen::SnapshotSent);
    assert_eq!(
        (rules(&a.ns), rules(&b.ns)),
        rules_before,
        "re-installing over existing rules must change nothing"
    );
    let log = agent.read_log();
    assert!(
        log.contains("not restoring a pod: its netns is gone"),
        "{log}"
    );
    assert!(
        log.contains("not restoring a pod: its netns path now names another namespace"),
        "{log}"
    );
    assert!(!reused.captured(), "the reused path was captured");

    // A state file that is garbage: the agent starts, says so, and enrolls afresh.
    agent.kill().unwrap();
    drop(agent);
    std::fs::write(dir.path().join("admin.pods.json"), "{garbage").unwrap();
    let agent = start();
    agent
        .wait_for_log("is not valid JSON", Duration::from_secs(5))
        .unwrap();
}

#[test]
fn agent_restart_under_load_keeps_pods_meshed() {
    require_root();
    let n = Netns::new("zenr").unwrap();
    n.add_bridge("zbr", "10.232.1.1/24").unwrap();
    let mk = |ip: &'static str| {
        let ns = Netns::new("zenq").unwrap();
        attach_to_bridge(&n, "zbr", &ns, "eth0", &format!("{ip}/24"), "10.232.1.1").unwrap();
        PodNs { ns, ip }
    };
    let (a, b) = (mk("10.232.1.2"), mk("10.232.1.3"));
    let _processes = [a.process("u-a"), b.process("u-b")];
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    zmesh::identity::FileCa::init(&ca, "cluster.local").unwrap();
    let (zds, admin) = (dir.path().join("zds.sock"), dir.path().join("admin.sock"));
    let api = n.run(|| FakeKube::start("127.82.0.5:0")).unwrap();
    api.put_namespace("shop", &[AMBIENT]);
    api.apply_pod(&pod("shop", "a", "u-a", NODE, a.ip, &[]));
    api.apply_pod(&pod("shop", "b", "u-b", NODE, b.ip, &[]));
    let url = api.url();
    let start_agent = || {
        // A killed agent leaves its admin socket behind; readiness is the new one appearing.
        let _ = std::fs::remove_file(&admin);
        zmesh_testbed::mesh::start_agent_with(
            &n,
            zmesh_node(),
            &zds,
            &admin,
            &["--kube-api", &url, "--node-name", NODE],
            &[("ZMESH_LOG", "info")],
            GUARD,
        )
        .unwrap()
    };
    let agent = start_agent();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node:\n  name: {NODE}\n  mode: in_pod\n  zds_socket: {}\n  access_log: json\n  certificates:\n    file_ca: {{ dir: {} }}\nworkloads:\n  - {{ uid: u-a, name: a, namespace: shop, service_account: a-sa, addresses: [{}], node: {NODE} }}\n  - {{ uid: u-b, name: b, namespace: shop, service_account: b-sa, addresses: [{}], node: {NODE} }}\n",
            zds.display(),
            ca.display(),
            a.ip,
            b.ip
        ),
    )
    .unwrap();
    let tunnel = n
        .spawn(
            zmesh_node().to_str().unwrap(),
            &["run", "--config", cfg.to_str().unwrap()],
            &[("ZMESH_LOG", "info")],
        )
        .unwrap();
    tunnel.wait_for_log("ZDS snapshot complete", GUARD).unwrap();
    // The pods already ran when the agent started: it found their netns and enrolled both
    // before the tunnel's first snapshot.
    let deadline = Instant::now() + GUARD;
    while snapshots(&tunnel.read_log()) != vec![2] {
        assert!(
            Instant::now() < deadline,
            "no snapshot with both pods; tunnel log:\n{}\nagent log:\n{}",
            tunnel.read_log(),
            agent.read_log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }

    // b echoes; a keeps opening connections to it, and one long connection streams throughout.
    let app = b.ns.listen_tcp(format!("{}:8080", b.ip)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for s in app.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let dest = format!("{}:8080", b.ip);
    let short = {
        let (stop, ok, failed, failures) =
            (stop.clone(), ok.clone(), failed.clone(), failures.clone());
        let a_path = a.ns.path().to_owned();
        let dest = dest.clone();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&a_path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = (|| -> std::io::Result<()> {
                    let mut c = std::net::TcpStream::connect_timeout(
                        &dest.parse().unwrap(),
                        Duration::from_secs(5),
                    )?;
                    c.set_read_timeout(Some(Duration::from_secs(5)))?;
                    c.write_all(&[7u8; 1024])?;
                    let mut back = [0u8; 1024];
                    c.read_exact(&mut back)?;
                    Ok(())
                })();
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.lock().unwrap().push(e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut long = a.ns.connect_tcp(dest.as_str()).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let long_bytes = Arc::new(AtomicU64::new(0));
    let long_thread = {
        let (stop, long_bytes) = (stop.clone(), long_bytes.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut back = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                long.write_all(&[9u8; 512])?;
                long.read_exact(&mut back)?;
                long_bytes.fetch_add(512, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let rules_before = (rules(&a.ns), rules(&b.ns));
    let snapshots_before = snapshots(&tunnel.read_log()).len();
    let ok_before = ok.load(Ordering::Relaxed);
    assert!(
        ok_before > 0,
        "no connection got through before the restart"
    );

    // Kill -9 and restart the agent while traffic flows.
    agent.kill().unwrap();
    drop(agent);
    std::thread::sleep(Duration::from_millis(300));
    let agent = start_agent();
    wait_until("the tunnel's new snapshot", || {
        snapshots(&tunnel.read_log()).len() > snapshots_before
    });
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    short.join().unwrap();
    long_thread
        .join()
        .unwrap()
        .expect("the long connection broke during the agent restart");

    let log = tunnel.read_log();
    assert_eq!(
        snapshots(&log),
        vec![2, 2],
        "the tunnel's snapshots, before and after the restart: {log}"
    );
    assert!(
        !log.contains("proxy torn down"),
        "the tunnel tore a pod down: {log}"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "connections failed during the restart: {:?}",
        failures.lock().unwrap()
    );
    assert!(
        ok.load(Ordering::Relaxed) > ok_before,
        "no connection completed after the restart"
    );
    assert!(long_bytes.load(Ordering::Relaxed) > 0);
    eprintln!(
        "through the restart: {} connections ok ({} before it), {} bytes echoed on the long one",
        ok.load(Ordering::Relaxed),
        ok_before,
        long_bytes.load(Ordering::Relaxed)
    );
    assert!(
        log.contains("\"direction\":\"inbound\""),
        "the traffic did not cross the tunnel: {log}"
    );
    assert_eq!(
        (rules(&a.ns), rules(&b.ns)),
        rules_before,
        "the rules changed across the restart"
    );
    assert!(
        agent.read_log().contains("restored=2"),
        "{}",
        agent.read_log()
    );
    drop((tunnel, agent, api));
}

/// Labels changed while the agent was down: the restarted agent releases the recorded pod the
/// API no longer meshes (rules gone), forgets the one deleted meanwhile, enrolls the one newly
/// meshed, and the first snapshot a tunnel gets already says so.
#[test]
fn a_restarted_agent_catches_up_with_labels_changed_while_it_was_down() {
    require_root();
    let mut node = Node::start("127.82.0.6:0");
    node.api.put_namespace("shop", &[AMBIENT]);
    node.api.put_namespace("bank", &[]);
    let (keep, drop_label, gone, new) = (
        PodNs::new("10.231.4.2"),
        PodNs::new("10.231.4.3"),
        PodNs::new("10.231.4.4"),
        PodNs::new("10.231.4.5"),
    );
    node.api
        .apply_pod(&pod("shop", "keep", "u-keep", NODE, keep.ip, &[]));
    node.api
        .apply_pod(&pod("shop", "drop", "u-drop", NODE, drop_label.ip, &[]));
    node.api
        .apply_pod(&pod("shop", "gone", "u-gone", NODE, gone.ip, &[]));
    node.api
        .apply_pod(&pod("bank", "new", "u-new", NODE, new.ip, &[]));
    let _processes = [
        keep.process("u-keep"),
        drop_label.process("u-drop"),
        gone.process("u-gone"),
        new.process("u-new"),
    ];
    wait_until("three pods enrolled", || node.enrolled().len() == 3);

    node.agent.take().unwrap().kill().unwrap();
    let _ = std::fs::remove_file(&node.admin);
    node.api.label_pod("shop", "drop", MODE, Some("none"));
    node.api.delete_pod("shop", "gone");
    node.api.label_pod("bank", "new", MODE, Some("ambient"));
    node.start_agent();

    let tunnel = Tunnel::connect(&node.zds);
    let mut snapshot = Vec::new();
    loop {
        match tunnel.next("the snapshot") {
            Seen::SnapshotSent => break,
            Seen::Add { uid, .. } => snapshot.push(uid),
            other => panic!("unexpected {other:?} in the snapshot"),
        }
    }
    snapshot.sort();
    assert_eq!(snapshot, vec!["u-keep".to_owned(), "u-new".to_owned()]);
    assert!(captured(&keep.ns) && captured(&new.ns));
    assert!(
        !captured(&drop_label.ns),
        "the opted-out pod kept its rules"
    );
    assert_eq!(
        node.enrolled(),
        vec!["u-keep".to_owned(), "u-new".to_owned()]
    );
}
