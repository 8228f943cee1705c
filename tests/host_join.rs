//! Tier (c): host packaging. `zmesh-node join` writes a config that loads and a systemd unit that
//! passes `systemd-analyze verify`; the unit's ExecStartPre installs the capture rules and
//! `zmesh-node leave` removes them and every file join wrote, in a scratch namespace. Between the
//! two, the unit fails closed: stopping or killing the tunnel leaves the rules in place, so a
//! captured connection is refused instead of reaching its destination in plaintext.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use zmesh_testbed::{link_veth, require_root, Netns};

const NODE: &str = env!("CARGO_BIN_EXE_zmesh-node");
/// A refused or delivered connect answers in microseconds on a veth; this only bounds a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn redirect_bin() -> PathBuf {
    // Built by the workspace build (scripts/test.sh) next to zmesh-node.
    let p = Path::new(NODE).with_file_name("zmesh-redirect");
    assert!(
        p.exists(),
        "{} is built by `cargo build --workspace`",
        p.display()
    );
    p
}

fn rules(ns: &Netns) -> String {
    let v4 = ns.exec(&["iptables-save"]).unwrap();
    let nft = ns.exec(&["nft", "list", "ruleset"]).unwrap_or_default();
    format!("{v4}{nft}")
}

/// What `join` wrote: the config dir and the unit file (inside `dir`).
struct Joined {
    etc: PathBuf,
    unit: PathBuf,
}

impl Joined {
    fn unit_text(&self) -> String {
        std::fs::read_to_string(&self.unit).unwrap()
    }

    /// The commands of every `Key=` line of the unit whose key starts with `prefix`.
    fn commands(&self, prefix: &str) -> Vec<Vec<String>> {
        self.unit_text()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.split_once('='))
            .map(|(_, cmd)| cmd.split_whitespace().map(str::to_string).collect())
            .collect()
    }
}

/// `zmesh-node join --no-systemctl` inside `ns`, with a fresh file CA under `dir`.
fn join(ns: &Netns, dir: &Path, address: &str) -> Joined {
    let ca = dir.join("ca");
    let out = std::process::Command::new(NODE)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (etc, units) = (dir.join("etc"), dir.join("units"));
    let redirect = redirect_bin();
    let out = ns
        .exec(&[
            NODE,
            "join",
            "--identity",
            "shop/db",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--address",
            address,
            "--name",
            "vm-test",
            "--inbound-ports",
            "5432",
            "--config-dir",
            etc.to_str().unwrap(),
            "--unit-dir",
            units.to_str().unwrap(),
            "--redirect-bin",
            redirect.to_str().unwrap(),
            "--no-systemctl",
        ])
        .unwrap();
    assert!(out.contains("node.yaml"), "{out}");
    Joined {
        etc,
        unit: units.join("zmesh-node.service"),
    }
}

fn leave(ns: &Netns, joined: &Joined) {
    let out = ns
        .exec(&[
            NODE,
            "leave",
            "--config-dir",
            joined.etc.to_str().unwrap(),
            "--redirect-bin",
            redirect_bin().to_str().unwrap(),
            "--no-systemctl",
        ])
        .unwrap();
    assert!(out.contains("zmesh-node.service"), "{out}");
}

/// Runs each command inside `ns`, as systemd would run those unit lines.
fn run_all(ns: &Netns, cmds: &[Vec<String>]) {
    for cmd in cmds {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        ns.exec(&args).unwrap();
    }
}

#[test]
fn join_then_leave_leaves_no_rules_and_no_files_behind() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("zjn").unwrap();
    let before = rules(&ns);
    assert!(!before.contains("ZMESH"), "{before}");

    let joined = join(&ns, dir.path(), "10.219.0.5");
    let check = std::process::Command::new(NODE)
        .arg("check-config")
        .arg(joined.etc.join("node.yaml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&joined.unit)
        .output()
        .expect("systemd-analyze is installed (scripts/setup.sh)");
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // What systemd would run before starting the tunnel: the capture rules go in.
    let pre = joined.commands("ExecStartPre=");
    assert_eq!(pre.len(), 1, "{}", joined.unit_text());
    run_all(&ns, &pre);
    assert!(
        rules(&ns).contains("ZMESH"),
        "ExecStartPre installed the capture rules"
    );

    leave(&ns, &joined);
    let after = rules(&ns);
    assert!(!after.contains("ZMESH"), "rules left behind: {after}");
    assert!(
        !joined.unit.exists() && !joined.etc.exists(),
        "files left behind"
    );
}

/// Connects from inside `ns` and reports the outcome as the app would see it.
fn app_connect(ns: &Netns, dst: SocketAddr) -> std::io::Result<TcpStream> {
    ns.run(move || TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT))
}

/// Whether a connection reached the destination's listener (it is non-blocking).
fn delivered(listener: &std::net::TcpListener) -> bool {
    match listener.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("accept: {e}"),
    }
}

#[test]
fn a_crashed_tunnel_keeps_the_rules_so_captured_traffic_is_refused_not_sent() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // The host (a VM) and a destination outside it, one veth apart: the host's outbound
    // connections leave by a real interface, as the capture rules expect.
    let host = Netns::new("zfc").unwrap();
    let remote = Netns::new("zfr").unwrap();
    link_veth(
        &host,
        "zfc0",
        "10.219.1.5/24",
        &remote,
        "zfr0",
        "10.219.1.9/24",
    )
    .unwrap();
    let dst: SocketAddr = "10.219.1.9:7777".parse().unwrap();
    let listener = remote.listen_tcp(dst).unwrap();
    listener.set_nonblocking(true).unwrap();
    // Control: without capture the connection reaches the destination (a connect that returned
    // is already in the listener's accept queue).
    app_connect(&host, dst).unwrap();
    assert!(delivered(&listener), "the control connection arrives");

    let joined = join(&host, dir.path(), "10.219.1.5");
    // The unit's stop side touches no rule (also checked on the rendered text in src/host.rs).
    let unit = joined.unit_text();
    assert!(
        !unit
            .lines()
            .any(|l| l.starts_with("Exec") && l.contains("uninstall")),
        "{unit}"
    );
    run_all(&host, &joined.commands("ExecStartPre="));
    let start = &joined.commands("ExecStart=")[0];
    let args: Vec<&str> = start[1..].iter().map(String::as_str).collect();
    let node = host.spawn(&start[0], &args, &[]).unwrap();
    node.wait_for_log("zmesh node ready", Duration::from_secs(30))
        .unwrap();

    // A crash (SIGKILL), then everything systemd runs once the main process is gone.
    node.kill().unwrap();
    run_all(&host, &joined.commands("ExecStop"));

    let now = rules(&host);
    assert!(
        now.contains("ZMESH"),
        "the rules must survive a stop or crash: {now}"
    );
    let r = app_connect(&host, dst);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "while the tunnel is down a captured connection is refused (redirected to the dead :15001), got {r:?}"
    );
    assert!(
        !delivered(&listener),
        "a connection reached its destination in plaintext while the tunnel was down"
    );

    // Only `leave` removes the rules; then traffic flows uncaptured again.
    leave(&host, &joined);
    let after = rules(&host);
    assert!(!after.contains("ZMESH"), "rules left behind: {after}");
    app_connect(&host, dst).unwrap();
    assert!(delivered(&listener), "after leave the connection arrives");
}
