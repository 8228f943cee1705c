//! Tier (c) tests for in-pod capture: a "node" namespace with a bridge, and a "pod" namespace
//! attached to it by a veth pair, as a CNI would wire them. The library installs the rules from a
//! thread that entered the pod namespace, exactly as the redirect agent does, and real sockets in
//! both namespaces check each rule of docs/capture.md's block: outbound and inbound capture, the
//! tunnel-mark, probe-source and own-IP exceptions, the inbound-capture bypass and source-IP
//! preservation. Per backend, another test checks that install is idempotent and uninstall restores
//! the namespace exactly. Like `host_netns.rs` these need root; without it they fail saying so.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use zmesh_redirect::{install_pod, uninstall_pod, Backend, PodOptions};

/// Only reached when a connection is wrongly dropped; a working path answers in milliseconds.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const TUNNEL_MARK: u32 = 1337;
const GATEWAY: &str = "10.214.0.1";
const POD_IP: &str = "10.214.0.2";
const PROBE_SOURCE: &str = "169.254.7.127";

/// Fails the test unless it runs as root: a namespace test that skipped would pass having
/// checked nothing (tests/README.md: tier (c) fails without root; CI runs as root).
#[track_caller]
fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "network-namespace tests need root (CAP_NET_ADMIN + CAP_SYS_ADMIN): run as root, as CI does"
    );
}

/// A throwaway named netns, deleted on drop even when the test panics. The pid in the name keeps
/// concurrent runs (and `host_netns.rs`, which uses another prefix) apart.
struct Ns(String);

impl Ns {
    fn create(role: &str) -> Ns {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let ns = Ns(format!("zp-{role}-{}-{seq}", std::process::id()));
        sh("ip", &["netns", "add", &ns.0]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a tool inside the namespace and returns its stdout; panics with its stderr on failure.
    fn exec(&self, argv: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.0];
        args.extend_from_slice(argv);
        sh("ip", &args)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut argv = vec!["ip"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// Runs `f` on a thread that entered this namespace: what the agent does before `install_pod`.
    /// Sockets created there stay in this namespace when used from other threads.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let fd = File::open(&path).expect("open netns");
                    setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("thread inside the netns panicked")
        })
    }

    fn install(&self, options: &PodOptions, backend: Backend) {
        self.within(|| install_pod(options, backend))
            .unwrap_or_else(|e| panic!("install_pod in {}: {e}", self.0));
    }

    fn uninstall(&self, options: &PodOptions, backend: Backend) {
        self.within(|| uninstall_pod(options, backend))
            .unwrap_or_else(|e| panic!("uninstall_pod in {}: {e}", self.0));
    }

    /// Answers every connection to `port` with `label peer-ip original-dst`, where original-dst is
    /// what SO_ORIGINAL_DST reports ("-" when there is no NAT entry to ask).
    fn listen(&self, port: u16, label: &'static str) {
        let listener = self
            .within(|| TcpListener::bind(("0.0.0.0", port)))
            .unwrap_or_else(|e| panic!("bind :{port} in {}: {e}", self.0));
        // Detached: it blocks in accept until the test process exits, which is harmless.
        thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let peer = conn.peer_addr().map(|a| a.ip().to_string());
                let original = SockRef::from(&conn)
                    .original_dst()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .map_or_else(|| "-".to_owned(), |a| a.to_string());
                let _ = writeln!(conn, "{label} {} {original}", peer.unwrap_or_default());
            }
        });
    }

    /// Connects from this namespace, optionally with the tunnel's mark or from a given source
    /// address (transparent, as the tunnel's source-preserving dials are), and returns the reply.
    fn dial(&self, to: &str, mark: Option<u32>, from: Option<&str>) -> String {
        let to: SocketAddr = to.parse().expect("address");
        let socket = self
            .within(|| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                if let Some(mark) = mark {
                    s.set_mark(mark)?;
                }
                if let Some(ip) = from {
                    s.set_ip_transparent(true)?;
                    let src: SocketAddr = format!("{ip}:0").parse().expect("address");
                    s.bind(&src.into())?;
                }
                Ok::<_, std::io::Error>(s)
            })
            .unwrap_or_else(|e| panic!("socket in {}: {e}", self.0));
        socket
            .connect_timeout(&SockAddr::from(to), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {to} from {}: {e}", self.0));
        let mut stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("read reply");
        reply.trim_end().to_owned()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}

/// A node with bridge `br0` (the pod's gateway, plus the kubelet probe SNAT address) and one pod
/// plugged into it by a veth pair.
fn node_and_pod() -> (Ns, Ns) {
    let node = Ns::create("node");
    let pod = Ns::create("pod");
    node.ip(&["link", "add", "br0", "type", "bridge"]);
    node.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", "br0"]);
    node.ip(&["addr", "add", &format!("{PROBE_SOURCE}/32"), "dev", "br0"]);
    node.ip(&["link", "set", "br0", "up"]);
    node.ip(&[
        "link", "add", "vethpod", "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
    ]);
    node.ip(&["link", "set", "vethpod", "master", "br0", "up"]);
    pod.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", GATEWAY]);
    (node, pod)
}

fn traffic_follows_the_spec(backend: Backend) {
    let (node, pod) = node_and_pod();
    pod.listen(15001, "outbound");
    pod.listen(15006, "inbound");
    pod.listen(8080, "app");
    node.listen(80, "node");
    let node_80 = format!("{GATEWAY}:80");
    let pod_8080 = format!("{POD_IP}:8080");
    assert!(pod
        .dial(&node_80, None, None)
        .starts_with("node 10.214.0.2"));

    let options = PodOptions::default();
    pod.install(&options, backend);

    // (1) Outbound lands on 15001, which learns the real destination from SO_ORIGINAL_DST.
    assert_eq!(
        pod.dial(&node_80, None, None),
        format!("outbound {POD_IP} {node_80}")
    );
    // (2) The tunnel's own (marked) sockets go out untouched.
    assert!(pod
        .dial(&node_80, Some(TUNNEL_MARK), None)
        .starts_with("node 10.214.0.2 "));
    // (3) Inbound plaintext lands on 15006, with the original destination intact.
    assert_eq!(
        node.dial(&pod_8080, None, None),
        format!("inbound {GATEWAY} {pod_8080}")
    );
    // (4) Kubelet probes (SNATed to 169.254.7.127) reach the app directly.
    assert!(node
        .dial(&pod_8080, None, Some(PROBE_SOURCE))
        .starts_with("app 169.254.7.127 "));
    // (5) The pod calling its own IP stays inside the pod.
    assert!(pod
        .dial(&pod_8080, None, None)
        .starts_with("app 10.214.0.2 "));
    // Source-IP preservation: the tunnel dials the app from the client's address; the reply is
    // addressed to the node, and only connmark + table 100 bring it back to the tunnel's socket.
    assert!(pod
        .dial(&pod_8080, Some(TUNNEL_MARK), Some(GATEWAY))
        .starts_with("app 10.214.0.1 "));

    // (3') The inbound-capture bypass: reinstalling converges, and inbound reaches the app.
    let bypass = PodOptions {
        inbound_capture: false,
        ..PodOptions::default()
    };
    pod.install(&bypass, backend);
    assert!(node
        .dial(&pod_8080, None, None)
        .starts_with("app 10.214.0.1 "));
    assert!(pod.dial(&node_80, None, None).starts_with("outbound "));

    pod.uninstall(&bypass, backend);
    assert!(pod
        .dial(&node_80, None, None)
        .starts_with("node 10.214.0.2 "));
}

#[test]
fn iptables_pod_traffic_follows_the_spec() {
    require_root();
    traffic_follows_the_spec(Backend::Iptables);
}

#[test]
fn nftables_pod_traffic_follows_the_spec() {
    require_root();
    traffic_follows_the_spec(Backend::Nftables);
}

/// Everything install may touch, in both families. Counters and save timestamps are dropped.
fn ruleset(pod: &Ns) -> String {
    let mut out = String::new();
    for save in ["iptables-save", "ip6tables-save"] {
        out.push_str(&format!("## {save}\n"));
        for line in pod.exec(&[save]).lines().filter(|l| !l.starts_with('#')) {
            let line = match (line.starts_with(':'), line.rfind(" [")) {
                (true, Some(i)) => &line[..i],
                _ => line,
            };
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("## nft\n");
    out.push_str(&pod.exec(&["nft", "-s", "list", "ruleset"]));
    for family in ["-4", "-6"] {
        out.push_str(&format!("## ip {family} rule\n"));
        out.push_str(&pod.ip(&[family, "rule", "show"]));
        out.push_str(&format!("## ip {family} local routes\n"));
        // The kernel adds the interface's IPv6 link-local address (fe80::) on its own, some
        // time after the link comes up, so it may appear between two snapshots: not ours.
        let routes = pod.ip(&[family, "route", "show", "table", "all", "type", "local"]);
        for line in routes.lines().filter(|l| !l.starts_with("local fe80::")) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Rules the pod already had, in every table and chain we jump from. They must survive install
/// and uninstall. With iptables-nft they are also what makes an exact comparison possible: the
/// first rule in a table creates its nft base chains, which (like iptables-legacy's built-in
/// chains) nobody removes afterwards, and a pod with no rules at all would show them as a diff.
fn seed_pod_rules(pod: &Ns) {
    for tool in ["iptables", "ip6tables"] {
        for table in ["mangle", "nat", "raw"] {
            for chain in ["PREROUTING", "OUTPUT"] {
                pod.exec(&[
                    tool, "-t", table, "-A", chain, "-p", "udp", "--dport", "9", "-j", "ACCEPT",
                ]);
            }
        }
    }
}

fn install_is_idempotent_and_uninstall_restores(backend: Backend) {
    let (_node, pod) = node_and_pod();
    if backend == Backend::Iptables {
        seed_pod_rules(&pod);
    }
    let before = ruleset(&pod);
    // The widest option set: both families, DNS capture with its raw-table rules.
    let options = PodOptions {
        dns_capture: true,
        ipv6: true,
        ..PodOptions::default()
    };

    pod.install(&options, backend);
    let installed = ruleset(&pod);
    pod.install(&options, backend);
    assert_eq!(
        ruleset(&pod),
        installed,
        "a second install changed the ruleset"
    );
    let mut expected = vec![
        "32764:\tfrom all fwmark 0x111/0xfff lookup 100",
        "local default dev lo table 100",
    ];
    expected.extend(match backend {
        Backend::Iptables => [
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
            "-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
            "-A ISTIO_PRERT -p udp -m udp --sport 53 -m mark ! --mark 0x539/0xfff -j CT --zone 1",
        ],
        Backend::Nftables => [
            "table ip6 istio-zmesh {",
            "ip6 daddr != ::1 meta l4proto tcp meta mark & 0x00000fff != 0x00000539 redirect to :15001",
            "udp sport 53 meta mark & 0x00000fff != 0x00000539 ct zone set 1",
        ],
    });
    for needle in expected {
        assert!(
            installed.contains(needle),
            "missing `{needle}` in:\n{installed}"
        );
    }
    if backend == Backend::Iptables {
        // Our jumps come before the pod's own rules.
        let nat_output = pod.exec(&["iptables", "-t", "nat", "-S", "OUTPUT"]);
        assert_eq!(
            nat_output.lines().nth(1),
            Some("-A OUTPUT -j ISTIO_OUTPUT"),
            "{nat_output}"
        );
    }

    pod.uninstall(&options, backend);
    assert_eq!(
        ruleset(&pod),
        before,
        "uninstall did not restore the pod netns"
    );
    pod.uninstall(&options, backend);
    assert_eq!(
        ruleset(&pod),
        before,
        "a second uninstall changed something"
    );
}

#[test]
fn iptables_pod_install_is_idempotent_and_uninstall_restores() {
    require_root();
    install_is_idempotent_and_uninstall_restores(Backend::Iptables);
}

#[test]
fn nftables_pod_install_is_idempotent_and_uninstall_restores() {
    require_root();
    install_is_idempotent_and_uninstall_restores(Backend::Nftables);
}
