//! Tier (c) tests: run the real `zmesh-redirect` binary inside throwaway network namespaces, for
//! both backends. One test per backend checks that install is idempotent, that reinstalling with
//! other options converges, and that uninstall restores the namespace exactly (host rules left
//! alone). Another sends real TCP through the rules between a "host" and a "remote" namespace joined
//! by a veth pair. These need root; without it they fail saying so.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const BIN: &str = env!("CARGO_BIN_EXE_zmesh-redirect");
/// Only reached when a connection is wrongly dropped; a working path answers in milliseconds.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const TUNNEL_MARK: u32 = 1337;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Fails the test unless it runs as root: a namespace test that skipped would pass having
/// checked nothing (tests/README.md: tier (c) fails without root; CI runs as root).
#[track_caller]
fn require_root() {
    assert!(
        is_root(),
        "network-namespace tests need root (CAP_NET_ADMIN + CAP_SYS_ADMIN): run as root, as CI does"
    );
}

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "`{what}` failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}

/// A named network namespace, deleted on drop (also when a test panics), so a failed run leaves
/// nothing behind. Names carry the pid so concurrent test runs cannot collide.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "zr-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        check(&format!("ip netns add {name}"), out);
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    fn run(&self, argv: &[&str]) -> String {
        let out = self.command(argv).output().expect("run ip netns exec");
        check(&argv.join(" "), out)
    }

    fn run_with_stdin(&self, argv: &[&str], input: &str) -> String {
        let mut child = self
            .command(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        check(&argv.join(" "), child.wait_with_output().unwrap())
    }

    /// `zmesh-redirect host ACTION ARGS...` inside the namespace.
    fn redirect(&self, action: &str, args: &[&str]) -> String {
        let mut argv = vec![BIN, "host", action];
        argv.extend_from_slice(args);
        self.run(&argv)
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets created there stay in it
    /// after the thread ends, so they can be used from the test thread.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open netns");
                setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    /// Serves `label peer-ip\n` to every connection on 0.0.0.0:`port` in this namespace.
    fn serve(&self, port: u16, label: &'static str) {
        let listener = self
            .enter(|| TcpListener::bind(("0.0.0.0", port)))
            .unwrap_or_else(|e| panic!("bind :{port} in {}: {e}", self.name));
        // Detached: it blocks in accept until the test process exits, which is harmless.
        thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let peer = conn
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ = writeln!(conn, "{label} {peer}");
            }
        });
    }

    /// Connects from this namespace and returns what the server said.
    fn ask(&self, to: &str, mark: Option<u32>, bind: Option<&str>) -> String {
        let to: SocketAddr = to.parse().unwrap();
        let socket = self.enter(|| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            if let Some(mark) = mark {
                s.set_mark(mark)?;
            }
            if let Some(ip) = bind {
                // As the tunnel does to preserve the client's source IP (docs/capture.md).
                s.set_ip_transparent(true)?;
                s.set_freebind(true)?;
                let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
                s.bind(&SockAddr::from(addr))?;
            }
            Ok::<_, std::io::Error>(s)
        });
        let socket = socket.unwrap_or_else(|e| panic!("socket in {}: {e}", self.name));
        socket
            .connect_timeout(&SockAddr::from(to), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {to} from {}: {e}", self.name));
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply.trim_end().to_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Rules a host already had: they must survive install and uninstall untouched, and our jumps
/// must be inserted ahead of them.
fn seed_host_rules(ns: &Netns) {
    for (table, chain) in [
        ("mangle", "PREROUTING"),
        ("mangle", "OUTPUT"),
        ("nat", "PREROUTING"),
        ("nat", "OUTPUT"),
        ("filter", "INPUT"),
    ] {
        ns.run(&[
            "iptables", "-t", table, "-A", chain, "-p", "udp", "--dport", "9", "-j", "ACCEPT",
        ]);
    }
    ns.run_with_stdin(
        &["nft", "-f", "-"],
        "table inet hostfw {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\tudp dport 9 accept\n\t}\n}\n",
    );
}

/// Everything install may touch. iptables-save's timestamps and counters are dropped so that only
/// the rules are compared; `ip route show table 100` fails while the table has never existed, so
/// only its output is kept (empty either way).
fn snapshot(ns: &Netns) -> String {
    let save: String = ns
        .run(&["iptables-save"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{}\n", &l[..i]),
            _ => format!("{l}\n"),
        })
        .collect();
    let nft = ns.run(&["nft", "-s", "list", "ruleset"]);
    let rules = ns.run(&["ip", "-4", "rule", "show"]);
    let table100 = ns
        .command(&["ip", "-4", "route", "show", "table", "100"])
        .output()
        .expect("run ip");
    format!(
        "## iptables-save\n{save}## nft\n{nft}\n## ip rule\n{rules}## table 100\n{}",
        String::from_utf8_lossy(&table100.stdout)
    )
}

fn assert_contains(haystack: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            haystack.contains(needle),
            "missing `{needle}` in:\n{haystack}"
        );
    }
}

fn assert_lacks(haystack: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            !haystack.contains(needle),
            "unexpected `{needle}` in:\n{haystack}"
        );
    }
}

fn install_is_idempotent_and_uninstall_restores(backend: &str) {
    let ns = Netns::new();
    seed_host_rules(&ns);
    let before = snapshot(&ns);

    let deny = [
        "--backend",
        backend,
        "--inbound-ports",
        "8443",
        "--inbound-plaintext",
        "deny",
        "--tunnel-uid",
        "997",
        "--exclude-cidrs",
        "10.96.0.0/12",
    ];
    ns.redirect("install", &deny);
    let installed = snapshot(&ns);
    ns.redirect("install", &deny);
    assert_eq!(
        snapshot(&ns),
        installed,
        "a second install changed the ruleset"
    );

    assert_contains(
        &installed,
        &[
            "32764:\tfrom all fwmark 0x111/0xfff lookup 100",
            "local default dev lo",
        ],
    );
    let deny_rules = if backend == "iptables" {
        let nat_output = ns.run(&["iptables", "-t", "nat", "-S", "OUTPUT"]);
        assert_eq!(
            nat_output.lines().nth(1),
            Some("-A OUTPUT -j ZMESH_OUTPUT"),
            "jump must precede the host's own rules:\n{nat_output}"
        );
        let save = ns.run(&["iptables-save"]);
        assert_contains(
            &save,
            &[
                "-A PREROUTING -j ZMESH_PRERT",
                "-A INPUT -j ZMESH_INPUT",
                "-A ZMESH_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
                "-A ZMESH_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff",
                "-A ZMESH_OUTPUT -m owner --uid-owner 997 -j RETURN",
                "-A ZMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A ZMESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                "-A ZMESH_INPUT -p tcp -m tcp --dport 22 -j RETURN",
                "-A ZMESH_INPUT ! -i lo -p tcp -m tcp --dport 8443 -j DROP",
            ],
        );
        save
    } else {
        let table = ns.run(&["nft", "-s", "list", "table", "ip", "zmesh"]);
        assert_contains(
            &table,
            &[
                "type route hook output priority mangle; policy accept;",
                "type nat hook prerouting priority dstnat; policy accept;",
                "meta skuid 997 return",
                "ip daddr 10.96.0.0/12 return",
                "meta l4proto tcp redirect to :15001",
                "tcp dport 22 return",
                "iifname != \"lo\" tcp dport 8443 drop",
            ],
        );
        table
    };
    assert_lacks(&deny_rules, &["15006"]);

    // Changing options converges instead of accumulating: the drops and the uid exclusion go.
    ns.redirect(
        "install",
        &["--backend", backend, "--inbound-ports", "8080"],
    );
    let allow_rules = if backend == "iptables" {
        ns.run(&["iptables-save"])
    } else {
        ns.run(&["nft", "-s", "list", "table", "ip", "zmesh"])
    };
    assert_contains(&allow_rules, &["8080", "15006"]);
    assert_lacks(&allow_rules, &["8443", "997", "DROP", "drop"]);

    ns.redirect("uninstall", &["--backend", backend]);
    assert_eq!(
        snapshot(&ns),
        before,
        "uninstall did not restore the namespace"
    );
    ns.redirect("uninstall", &["--backend", backend]);
    assert_eq!(
        snapshot(&ns),
        before,
        "a second uninstall changed something"
    );
}

#[test]
fn iptables_install_is_idempotent_and_uninstall_restores() {
    require_root();
    install_is_idempotent_and_uninstall_restores("iptables");
}

#[test]
fn nftables_install_is_idempotent_and_uninstall_restores() {
    require_root();
    install_is_idempotent_and_uninstall_restores("nftables");
}

const HOST_IP: &str = "10.250.0.1";
const REMOTE_IP: &str = "10.250.0.2";
/// A second remote address inside the excluded CIDR.
const EXCLUDED_REMOTE_IP: &str = "10.250.1.2";

/// A "host" namespace (where capture is installed) and a "remote" one, joined by a veth pair.
/// The addresses exist only inside these two namespaces.
fn host_and_remote() -> (Netns, Netns) {
    let host = Netns::new();
    let remote = Netns::new();
    host.run(&[
        "ip",
        "link",
        "add",
        "veth-h",
        "type",
        "veth",
        "peer",
        "name",
        "veth-r",
        "netns",
        &remote.name,
    ]);
    host.run(&["ip", "addr", "add", "10.250.0.1/24", "dev", "veth-h"]);
    host.run(&["ip", "link", "set", "veth-h", "up"]);
    host.run(&["ip", "route", "add", "10.250.1.0/24", "via", REMOTE_IP]);
    remote.run(&["ip", "addr", "add", "10.250.0.2/24", "dev", "veth-r"]);
    remote.run(&["ip", "addr", "add", "10.250.1.2/32", "dev", "veth-r"]);
    remote.run(&["ip", "link", "set", "veth-r", "up"]);
    (host, remote)
}

fn traffic_is_captured_as_specified(backend: &str) {
    let (host, remote) = host_and_remote();
    host.serve(15001, "outbound");
    host.serve(15006, "inbound");
    host.serve(8080, "app");
    host.serve(22, "host-ssh");
    remote.serve(80, "remote");
    remote.serve(22, "remote-ssh");
    let plain = |port| format!("{REMOTE_IP}:{port}");

    // Baseline: without capture every connection reaches its real destination.
    assert_eq!(
        host.ask(&plain(80), None, None),
        format!("remote {HOST_IP}")
    );

    host.redirect(
        "install",
        &[
            "--backend",
            backend,
            "--inbound-ports",
            "8080",
            "--exclude-cidrs",
            "10.250.1.0/24",
        ],
    );

    // Outbound: captured, except the tunnel's own marked sockets, SSH and excluded CIDRs.
    // REDIRECT rewrites only the destination, so the tunnel sees the host's own address as source.
    assert_eq!(
        host.ask(&plain(80), None, None),
        format!("outbound {HOST_IP}")
    );
    assert_eq!(
        host.ask(&plain(80), Some(TUNNEL_MARK), None),
        format!("remote {HOST_IP}")
    );
    assert_eq!(
        host.ask(&plain(22), None, None),
        format!("remote-ssh {HOST_IP}")
    );
    assert_eq!(
        host.ask(&format!("{EXCLUDED_REMOTE_IP}:80"), None, None),
        format!("remote {HOST_IP}")
    );

    // Inbound: the service port is captured, SSH is not.
    let to_host = |port| format!("{HOST_IP}:{port}");
    assert_eq!(
        remote.ask(&to_host(8080), None, None),
        format!("inbound {REMOTE_IP}")
    );
    assert_eq!(
        remote.ask(&to_host(22), None, None),
        format!("host-ssh {REMOTE_IP}")
    );

    // Source-IP preservation: the tunnel dials the app from the remote client's address. The app's
    // reply is addressed to the remote namespace; only the connmark + table 100 routing bring it
    // back to the tunnel's socket (without them the remote would reset the connection).
    assert_eq!(
        host.ask(&to_host(8080), Some(TUNNEL_MARK), Some(REMOTE_IP)),
        format!("app {REMOTE_IP}")
    );

    host.redirect("uninstall", &["--backend", backend]);
    assert_eq!(
        host.ask(&plain(80), None, None),
        format!("remote {HOST_IP}")
    );
    assert_eq!(
        remote.ask(&to_host(8080), None, None),
        format!("app {REMOTE_IP}")
    );
}

#[test]
fn iptables_traffic_is_captured_as_specified() {
    require_root();
    traffic_is_captured_as_specified("iptables");
}

#[test]
fn nftables_traffic_is_captured_as_specified() {
    require_root();
    traffic_is_captured_as_specified("nftables");
}
