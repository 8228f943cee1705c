//! Tier (c): client-only access (`zmesh-node connect`, docs/capture.md "Client-only access")
//! with real binaries in network namespaces. Node B is a mesh node (capture rules, `run`, as
//! root) with a Postgres-like app behind a service. The "laptop" namespace has NO capture rules
//! and runs `zmesh-node connect` as the unprivileged user nobody (uid 65534) with a static
//! certificate from the mesh CA (`ca csr` as nobody, `ca sign` by the CA). An agentless "VM"
//! reaches the service through the laptop's LAN listener (forwarding proxy), and an "outsider"
//! on another LAN is refused without anything being dialed.
//!
//!   VM 10.167.6.2 ── 10.167.6.1 ┐
//!                               laptop 10.167.5.1 ── 10.167.5.2 node B (app :8080)
//!   outsider 10.167.7.2 ── 10.167.7.1 ┘

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zmesh_testbed::mesh::install_rules;
use zmesh_testbed::{is_root, link_veth, run_ok, seeded_bytes, sha256, Child, Netns};

const LAPTOP_IP: &str = "10.167.5.1";
const B_IP: &str = "10.167.5.2";
const LAPTOP_VM_SIDE: &str = "10.167.6.1";
const VM_IP: &str = "10.167.6.2";
const LAPTOP_OUTSIDE_SIDE: &str = "10.167.7.1";
const OUTSIDER_IP: &str = "10.167.7.2";
const APP_PORT: u16 = 8080;
const PG_VIP: &str = "10.167.99.10";
const PG_HOST: &str = "postgres.data.svc.cluster.local";
/// The local port map the test passes on the command line.
const LOCAL_FORWARD: &str = "127.0.0.1:15432";
/// The LAN port map in the file (every address of the laptop).
const LAN_FORWARD_PORT: u16 = 15433;
const SOCKS_PORT: u16 = 1080;
const NOBODY: u32 = 65534;
const LAPTOP_ID: &str = "spiffe://cluster.local/ns/dev/sa/alice";
/// The laptop's handshake deadline: the SOCKS5 negotiation must finish within it.
const DEADLINE: Duration = Duration::from_secs(2);
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn require_root() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root (CI runs as root)"
    );
}

fn model() -> String {
    format!(
        "workloads:
  - uid: laptop-1
    name: alice-laptop
    namespace: dev
    service_account: alice
    addresses: [{LAPTOP_IP}]
    node: laptop
  - uid: db-1
    name: postgres
    namespace: data
    service_account: postgres
    addresses: [{B_IP}]
    node: node-b
    services: {{ data/{PG_HOST}: {{}} }}
services:
  - name: postgres
    namespace: data
    hostname: {PG_HOST}
    vips: [{PG_VIP}]
    ports: {{ 5432: {APP_PORT} }}
"
    )
}

struct Fixture {
    // Drop order: processes, then namespaces, then files, then the turn.
    laptop: Child,
    node_b: Child,
    _control_plane: Option<Child>,
    apps: mpsc::Receiver<(std::net::SocketAddr, [u8; 32])>,
    lap: Netns,
    _b: Netns,
    vm: Netns,
    outsider: Netns,
    _dir: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_zmesh-node")
}

fn chown_nobody(p: &Path) {
    std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// One fixture at a time: each is four namespaces and three processes on a small CI box, and
/// the hostile test counts every close the laptop sees, so no other test's sockets may share its
/// moment (a run in parallel once saw one slow client closed from the test process's side).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Fixture {
    fn start() -> Fixture {
        Fixture::start_with(false)
    }

    /// `from_control_plane`: the laptop's file has no workloads and no certificate: the model
    /// comes over xDS and the certificate over a CSR from `zmesh-node ca serve --xds` (in B's
    /// namespace), both authenticated by the laptop's bootstrap token.
    fn start_with(from_control_plane: bool) -> Fixture {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let b = Netns::new("zkB").unwrap();
        let lap = Netns::new("zkL").unwrap();
        let vm = Netns::new("zkV").unwrap();
        let outsider = Netns::new("zkX").unwrap();
        link_veth(
            &lap,
            "zk-l",
            &format!("{LAPTOP_IP}/24"),
            &b,
            "zk-b",
            &format!("{B_IP}/24"),
        )
        .unwrap();
        link_veth(
            &lap,
            "zk-lv",
            &format!("{LAPTOP_VM_SIDE}/24"),
            &vm,
            "zk-v",
            &format!("{VM_IP}/24"),
        )
        .unwrap();
        link_veth(
            &lap,
            "zk-lx",
            &format!("{LAPTOP_OUTSIDE_SIDE}/24"),
            &outsider,
            "zk-x",
            &format!("{OUTSIDER_IP}/24"),
        )
        .unwrap();

        let dir = tempfile::tempdir().unwrap();
        // nobody must reach its own files below the temp dir (the CA dir stays root's, 0700).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let ca = dir.path().join("ca");
        run_ok(
            std::process::Command::new(bin())
                .args(["ca", "init", "--dir"])
                .arg(&ca),
        );
        std::fs::set_permissions(&ca, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();

        // The laptop's key is made by the laptop's user and never leaves its directory.
        let home = dir.path().join("laptop");
        std::fs::create_dir(&home).unwrap();
        chown_nobody(&home);
        let (key, csr, cert, roots) = (
            home.join("key.pem"),
            home.join("alice.csr"),
            home.join("cert-chain.pem"),
            home.join("root-cert.pem"),
        );
        run_ok(
            std::process::Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    bin(),
                    "ca",
                    "csr",
                ])
                .args(["--identity", "dev/alice", "--key-out"])
                .arg(&key)
                .arg("--csr-out")
                .arg(&csr),
        );
        let signed = run_ok(
            std::process::Command::new(bin())
                .args(["ca", "sign", "--identity", "dev/alice", "--dir"])
                .arg(&ca)
                .arg("--csr")
                .arg(&csr)
                .arg("--out")
                .arg(&cert),
        );
        assert!(signed.contains(LAPTOP_ID), "{signed}");
        std::fs::copy(ca.join("root-cert.pem"), &roots).unwrap();
        for f in [&cert, &roots] {
            chown_nobody(f);
        }
        let mode = std::fs::metadata(&key).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600,
            "the key is private to its user"
        );

        let b_cfg = dir.path().join("node-b.yaml");
        std::fs::write(
            &b_cfg,
            format!(
                "node:
  name: node-b
  access_log: json
  certificates:
    file_ca: {{ dir: {}, ttl: 1h }}
{}",
                ca.display(),
                model()
            ),
        )
        .unwrap();
        let (control_plane, certificates) = if from_control_plane {
            let mesh = dir.path().join("mesh.yaml");
            std::fs::write(
                &mesh,
                format!(
                    "node:\n  name: control-plane\n  certificates:\n    file_ca: {{ dir: {} }}\n{}",
                    ca.display(),
                    model()
                ),
            )
            .unwrap();
            let token = run_ok(
                std::process::Command::new(bin())
                    .args(["ca", "token", "--node", "laptop", "--dir"])
                    .arg(&ca),
            );
            let token_file = home.join("laptop.token");
            std::fs::write(&token_file, token.trim()).unwrap();
            std::fs::set_permissions(
                &token_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            chown_nobody(&token_file);
            let cp = b
                .spawn_control_plane(
                    bin(),
                    &ca,
                    &mesh,
                    &format!("{B_IP}:15012"),
                    &[],
                    START_TIMEOUT,
                )
                .unwrap();
            (
                Some(cp),
                format!(
                    "  control_plane:
    address: https://{B_IP}:15012
    root_cert: {roots}
    server_name: zmesh-ca
    token_file: {token}
  certificates:
    ca_client: {{ ttl: 1h }}
",
                    roots = roots.display(),
                    token = token_file.display()
                ),
            )
        } else {
            (
                None,
                format!(
                    "  certificates:
    static:
      roots: {roots}
      identities:
        - {{ cert: {cert}, key: {key} }}
{model}",
                    roots = roots.display(),
                    cert = cert.display(),
                    key = key.display(),
                    model = model(),
                ),
            )
        };
        let lap_cfg = home.join("laptop.yaml");
        std::fs::write(
            &lap_cfg,
            format!(
                "node:
  name: laptop
  access_log: json
  handshake_timeout: 2s
{certificates}connect:
  workload: laptop-1
  forward:
    - {{ listen: 0.0.0.0:{LAN_FORWARD_PORT}, to: postgres.data:5432 }}
  socks5: 0.0.0.0:{SOCKS_PORT}
  allow_from: [127.0.0.0/8]
",
            ),
        )
        .unwrap();
        chown_nobody(&lap_cfg);

        // The app behind the service: an HTTP answer for curl, else read all, answer 1 MiB.
        let listener = b.listen_tcp(format!("{B_IP}:{APP_PORT}")).unwrap();
        let (tx, apps) = mpsc::channel();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let tx = tx.clone();
                std::thread::spawn(move || app(&mut s, &tx));
            }
        });

        install_rules(&b, vec![APP_PORT]).unwrap();
        let b_cfg = b_cfg.to_str().unwrap().to_string();
        let node_b = b
            .spawn(
                bin(),
                &["run", "--config", &b_cfg],
                &[("ZMESH_LOG", "info")],
            )
            .unwrap();
        node_b
            .wait_for_log("zmesh node ready", START_TIMEOUT)
            .unwrap();

        let lap_cfg = lap_cfg.to_str().unwrap().to_string();
        let forward = format!("{LOCAL_FORWARD}={PG_HOST}:5432");
        let vm_net = "10.167.6.0/24".to_string();
        let laptop = lap
            .spawn(
                "setpriv",
                &[
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    bin(),
                    "connect",
                    "--config",
                    &lap_cfg,
                    "--forward",
                    &forward,
                    "--allow-from",
                    &vm_net,
                ],
                &[("ZMESH_LOG", "info")],
            )
            .unwrap();
        laptop
            .wait_for_log("zmesh connect ready", START_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}: {}", laptop.read_log()));
        Fixture {
            laptop,
            node_b,
            _control_plane: control_plane,
            apps,
            lap,
            _b: b,
            vm,
            outsider,
            _dir: dir,
            _turn: turn,
        }
    }

    fn b_access_lines(&self) -> Vec<String> {
        self.node_b
            .read_log()
            .lines()
            .filter(|l| l.contains("connection complete"))
            .map(str::to_string)
            .collect()
    }

    /// Waits until B's access log has `n` lines.
    fn wait_b_lines(&self, n: usize) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.b_access_lines();
            if lines.len() >= n || Instant::now() > end {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.laptop.pid()))
            .unwrap()
            .count()
    }

    fn rejected(&self, listener: &str, reason: &str) -> f64 {
        let text = self.lap.http_get("127.0.0.1:15020", "/metrics");
        let key = format!("zmesh_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

fn app(s: &mut TcpStream, tx: &mpsc::Sender<(std::net::SocketAddr, [u8; 32])>) {
    let peer = s.peer_addr().unwrap();
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).is_err() {
        return;
    }
    if &head == b"GET " {
        let mut req = head.to_vec();
        let mut byte = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") && s.read_exact(&mut byte).is_ok() {
            req.push(byte[0]);
        }
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 13\r\n\r\nhello-from-b\n");
        return;
    }
    let mut got = head.to_vec();
    let _ = s.read_to_end(&mut got);
    let _ = s.write_all(&seeded_bytes(77, 1 << 20));
    let _ = s.shutdown(Shutdown::Write);
    let _ = tx.send((peer, sha256(&got)));
}

/// Sends 4 MiB and its end, reads the app's 1 MiB answer; asserts both exact.
fn exchange(f: &Fixture, mut c: TcpStream, seed: u64) {
    let up = seeded_bytes(seed, 4 << 20);
    let mut w = c.try_clone().unwrap();
    let sent = up.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut down = Vec::new();
    c.read_to_end(&mut down).unwrap();
    writer.join().unwrap();
    assert_eq!(
        sha256(&down),
        sha256(&seeded_bytes(77, 1 << 20)),
        "the app's answer arrived exactly ({} bytes)",
        down.len()
    );
    let (peer, got) = f.apps.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        got,
        sha256(&up),
        "the app received the client's bytes exactly"
    );
    assert_eq!(
        peer.ip().to_string(),
        LAPTOP_IP,
        "B's node dialed the app from the laptop's address"
    );
}

/// A SOCKS5 CONNECT: greeting, then `request`; returns the method reply and the request reply
/// (empty when the listener closed first).
fn socks5(c: &mut TcpStream, request: &[u8]) -> ([u8; 2], Vec<u8>) {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[5, 1, 0]).unwrap();
    let mut method = [0u8; 2];
    c.read_exact(&mut method).unwrap();
    c.write_all(request).unwrap();
    let mut reply = vec![0u8; 10];
    let mut have = 0;
    while have < 10 {
        match c.read(&mut reply[have..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
    }
    reply.truncate(have);
    (method, reply)
}

fn domain_request(host: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, 1, 0, 3, host.len() as u8];
    r.extend(host.as_bytes());
    r.extend(port.to_be_bytes());
    r
}

/// Reads until EOF or reset; what arrived (for "closed, nothing answered").
fn drain(c: &mut TcpStream) -> Vec<u8> {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("still open after 10 s")
            }
            Err(_) => return out,
        }
    }
}

#[test]
fn laptop_reaches_a_service_unprivileged_through_a_port_map_and_socks5() {
    require_root();
    let f = Fixture::start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", f.laptop.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace()
            .skip(1)
            .all(|u| u == NOBODY.to_string()),
        "connect runs as nobody: {uid}"
    );
    assert!(
        !status
            .lines()
            .any(|l| l.starts_with("CapEff:") && !l.ends_with("0000000000000000")),
        "connect has no capabilities: {status}"
    );
    // No capture listeners: nothing on 15001/15006/15008.
    for port in [15001, 15006, 15008] {
        assert!(
            f.lap.connect_tcp(format!("127.0.0.1:{port}")).is_err(),
            "connect must not listen on {port}"
        );
    }

    // The port map from the command line, by service hostname.
    let c = f.lap.connect_tcp(LOCAL_FORWARD).unwrap();
    exchange(&f, c, 61);
    let lines = f.wait_b_lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(&format!("\"src.identity\":\"{LAPTOP_ID}\""))
            && lines[0].contains(&format!("\"bytes_sent\":{}", 4 << 20)),
        "node B logged the laptop's identity: {}",
        lines[0]
    );

    // SOCKS5 by hostname (resolved through the model), then the same exchange.
    let mut c = f
        .lap
        .connect_tcp(format!("127.0.0.1:{SOCKS_PORT}"))
        .unwrap();
    let (method, reply) = socks5(&mut c, &domain_request(PG_HOST, 5432));
    assert_eq!(method, [5, 0]);
    assert_eq!(reply[..2], [5, 0], "succeeded once the tunnel is up");
    exchange(&f, c, 62);
    // ... and by VIP (ATYP IPv4).
    let mut c = f
        .lap
        .connect_tcp(format!("127.0.0.1:{SOCKS_PORT}"))
        .unwrap();
    let mut req = vec![5, 1, 0, 1];
    req.extend(PG_VIP.parse::<std::net::Ipv4Addr>().unwrap().octets());
    req.extend(5432u16.to_be_bytes());
    let (_, reply) = socks5(&mut c, &req);
    assert_eq!(reply[..2], [5, 0]);
    exchange(&f, c, 63);

    // curl, when installed: the name goes to the proxy, never to DNS.
    if Path::new("/usr/bin/curl").exists() {
        let out = f
            .lap
            .exec(&[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--socks5-hostname",
                &format!("127.0.0.1:{SOCKS_PORT}"),
                &format!("http://{PG_HOST}:5432/"),
            ])
            .unwrap();
        assert_eq!(out, "hello-from-b\n");
    }
    let lines = f.wait_b_lines(4);
    assert!(lines.len() >= 4, "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| l.contains(&format!("\"src.identity\":\"{LAPTOP_ID}\""))));
    let own = f.laptop.read_log();
    // SIGTERM: stop accepting, drain (nothing is open), exit 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(f.laptop.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = f.laptop.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "connect did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}: {}", f.laptop.read_log());
    assert!(
        own.contains("\"direction\":\"outbound\"")
            && own.contains("\"path\":\"hbone 10.167.5.2:15008"),
        "the laptop's own access log: {own}"
    );
}

#[test]
fn forwarding_proxy_serves_its_allow_list_and_refuses_others_without_dialing() {
    require_root();
    let f = Fixture::start();
    // The agentless VM, through the laptop's LAN address.
    let c =
        f.vm.connect_tcp(format!("{LAPTOP_VM_SIDE}:{LAN_FORWARD_PORT}"))
            .unwrap();
    exchange(&f, c, 71);
    let lines = f.wait_b_lines(1);
    assert_eq!(lines.len(), 1);
    let own = f.laptop.read_log();
    assert!(
        own.contains(&format!("\"src.addr\":\"{VM_IP}:")),
        "the laptop logs the VM as the client: {own}"
    );

    // The outsider: the port map and SOCKS5 reset at once, before any byte; nothing reaches B.
    // The reset can come before connect(2) returns: both are a refusal.
    match f
        .outsider
        .connect_tcp(format!("{LAPTOP_OUTSIDE_SIDE}:{LAN_FORWARD_PORT}"))
    {
        Ok(mut c) => {
            let _ = c.write_all(b"hello?");
            assert!(drain(&mut c).is_empty(), "refused without an answer");
        }
        Err(e) => assert!(format!("{e:#}").contains("reset"), "{e:#}"),
    }
    match f
        .outsider
        .connect_tcp(format!("{LAPTOP_OUTSIDE_SIDE}:{SOCKS_PORT}"))
    {
        Ok(mut c) => {
            let _ = c.write_all(&[5, 1, 0]);
            assert!(
                drain(&mut c).is_empty(),
                "an outsider gets no SOCKS5 byte, not even the method reply"
            );
        }
        Err(e) => assert!(format!("{e:#}").contains("reset"), "{e:#}"),
    }

    assert_eq!(f.rejected("connect", "not_allowed"), 1.0);
    assert_eq!(f.rejected("socks5", "not_allowed"), 1.0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        f.b_access_lines().len(),
        1,
        "refused sources never reach node B"
    );
    assert!(f.apps.try_recv().is_err(), "and never the app");
    let own = f.laptop.read_log();
    assert!(
        own.contains("source is not in connect.allow_from") && own.contains(OUTSIDER_IP),
        "the refusal is logged with its reason: {own}"
    );
}

fn socks5_reply(code: u8) -> Vec<u8> {
    vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

#[test]
fn hostile_socks5_clients_get_their_reply_or_the_deadline() {
    require_root();
    let f = Fixture::start();
    let socks = format!("127.0.0.1:{SOCKS_PORT}");
    // Warm the process up (one full connection), then take the fd baseline.
    let mut c = f.lap.connect_tcp(&socks).unwrap();
    let (_, reply) = socks5(&mut c, &domain_request(PG_HOST, 5432));
    assert_eq!(reply[..2], [5, 0]);
    exchange(&f, c, 81);
    std::thread::sleep(Duration::from_millis(300));
    let baseline = f.open_fds();

    // Slowloris: one byte of greeting, or a greeting and half a request, then silence.
    let start = Instant::now();
    let mut slow = Vec::new();
    for i in 0..20 {
        let mut c = f.lap.connect_tcp(&socks).unwrap();
        if i % 2 == 0 {
            c.write_all(&[5]).unwrap();
        } else {
            c.write_all(&[5, 1, 0, 5, 1, 0, 3, 30, b'p']).unwrap();
        }
        slow.push(c);
    }
    let held = Instant::now() + Duration::from_millis(1500);
    while f.open_fds() < baseline + 20 && Instant::now() < held {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(f.open_fds() >= baseline + 20, "the slow clients are held");
    for mut c in slow {
        let got = drain(&mut c);
        assert!(
            got.is_empty() || got == [5, 0],
            "no request reply for a slow client: {got:?}"
        );
    }
    let took = start.elapsed();
    assert!(
        took >= DEADLINE - Duration::from_millis(200) && took < DEADLINE * 4,
        "closed at the handshake deadline ({took:?})"
    );
    let end = Instant::now() + Duration::from_secs(5);
    while f.open_fds() > baseline && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        f.open_fds() <= baseline,
        "fds back to baseline {baseline}: {}",
        f.open_fds()
    );
    assert_eq!(f.rejected("socks5", "socks5_handshake_timeout"), 20.0);

    // Garbage greeting: no SOCKS5 answer, closed.
    let mut c = f.lap.connect_tcp(&socks).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    assert!(drain(&mut c).is_empty(), "garbage gets no answer");
    // No acceptable method.
    let mut c = f.lap.connect_tcp(&socks).unwrap();
    c.write_all(&[5, 1, 2]).unwrap();
    assert_eq!(drain(&mut c), [5, 0xff]);
    // BIND and UDP ASSOCIATE: command not supported.
    for cmd in [2u8, 3] {
        let mut c = f.lap.connect_tcp(&socks).unwrap();
        let (method, reply) = socks5(&mut c, &[5, cmd, 0, 1, 10, 167, 5, 2, 0, 80]);
        assert_eq!(method, [5, 0]);
        assert_eq!(reply, socks5_reply(0x07), "command {cmd}");
        assert!(drain(&mut c).is_empty());
    }
    // An unknown name is host unreachable, and is never looked up in DNS.
    let mut c = f.lap.connect_tcp(&socks).unwrap();
    let (_, reply) = socks5(&mut c, &domain_request("example.com", 80));
    assert_eq!(reply, socks5_reply(0x04));
    // A service port that does not exist: the outbound path fails, the reply says refused.
    let mut c = f.lap.connect_tcp(&socks).unwrap();
    let (_, reply) = socks5(&mut c, &domain_request(PG_HOST, 9999));
    assert_eq!(reply, socks5_reply(0x05));
    // Not an open relay: the admin port on this host's loopback, an IPv4-mapped form of it,
    // and an address the mesh does not know are not allowed by ruleset, never dialed.
    for req in [
        vec![5, 1, 0, 1, 127, 0, 0, 1, 0x3a, 0x98],
        vec![
            5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1, 0x3a, 0x98,
        ],
        vec![5, 1, 0, 1, 10, 167, 250, 1, 0, 80],
    ] {
        let mut c = f.lap.connect_tcp(&socks).unwrap();
        let (_, reply) = socks5(&mut c, &req);
        assert_eq!(reply, socks5_reply(0x02), "{req:?}");
    }
    assert_eq!(f.rejected("socks5", "forbidden_destination"), 3.0);
    assert_eq!(f.rejected("socks5", "socks5_unsupported_command"), 2.0);
    assert_eq!(f.rejected("socks5", "socks5_wrong_version"), 1.0);
    assert_eq!(f.rejected("socks5", "socks5_no_acceptable_method"), 1.0);
    assert_eq!(f.rejected("socks5", "socks5_unknown_host"), 1.0);
    // One line at B: the warm-up connection only.
    assert_eq!(f.wait_b_lines(1).len(), 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.b_access_lines().len(), 1, "{:?}", f.b_access_lines());
}

/// With `node.control_plane` and `certificates.ca_client`, connect still needs no privilege:
/// its xDS and CA clients dial without SO_MARK. The file names only `connect.workload`; the model
/// (the workload, the service) arrives over xDS and the certificate over a CSR, and the first
/// connection through the port map after that reaches the app with the laptop's identity.
#[test]
fn laptop_with_a_control_plane_gets_model_and_certificate_unprivileged() {
    require_root();
    let f = Fixture::start_with(true);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        // Until xDS has delivered the workload, connections are refused (fail closed).
        let reached = f.lap.connect_tcp(LOCAL_FORWARD).ok().and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            c.write_all(b"ping").ok()?;
            c.shutdown(Shutdown::Write).ok()?;
            let mut got = Vec::new();
            c.read_to_end(&mut got).ok()?;
            (got.len() == 1 << 20).then_some(())
        });
        if reached.is_some() {
            break;
        }
        assert!(
            Instant::now() < end,
            "never reached the app: {}",
            f.laptop.read_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (peer, _) = f.apps.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(peer.ip().to_string(), LAPTOP_IP);
    let c = f.lap.connect_tcp(LOCAL_FORWARD).unwrap();
    exchange(&f, c, 91);
    let lines = f.wait_b_lines(2);
    assert!(
        lines.len() >= 2
            && lines
                .iter()
                .all(|l| l.contains(&format!("\"src.identity\":\"{LAPTOP_ID}\""))),
        "{lines:?}"
    );
    assert!(
        !f.laptop.read_log().contains("SO_MARK"),
        "no socket asked for a mark"
    );
}
