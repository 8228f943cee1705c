//! Shared fixtures of `agent.rs` and `cni.rs`: the agent binary as a child process, a fake node
//! tunnel built on the crate's own `ZdsClient` (interop with istio's encoding is `zds.rs`'s job),
//! throwaway pod namespaces, and temp directories. Everything is torn down on drop, also when a
//! test panics, so a failed run leaves no netns or agent behind.
#![allow(dead_code)] // each test binary uses its own subset

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use zmesh_redirect::agent::{self, Request};
use zmesh_redirect::zds::{ZdsClient, ZdsEvent};

/// Upper bound on anything a test waits for; the happy path takes milliseconds.
pub const GUARD: Duration = Duration::from_secs(15);
pub const BIN: &str = env!("CARGO_BIN_EXE_zmesh-redirect");

/// Fails the test unless it runs as root: a namespace test that skipped would pass having
/// checked nothing (tests/README.md: tier (c) fails without root; CI runs as root).
#[track_caller]
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test creates network namespaces and installs capture rules, which needs root \
         (CAP_NET_ADMIN + CAP_SYS_ADMIN): run it as root, as CI does"
    );
}

fn unique(prefix: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique(&format!("zmesh-agent-{name}")));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A named netns (`ip netns add`), deleted on drop even when the test panics.
pub struct Ns(pub String);

impl Ns {
    pub fn create(role: &str) -> Ns {
        let ns = Ns(unique(&format!("za-{role}")));
        let out = Command::new("ip")
            .args(["netns", "add", &ns.0])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add: {out:?}");
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }

    /// (st_dev, st_ino) of the namespace: how the tunnel tells netns apart.
    pub fn id(&self) -> (u64, u64) {
        let meta = std::fs::metadata(self.path()).unwrap();
        (meta.dev(), meta.ino())
    }

    pub fn iptables_save(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables-save"])
            .output()
            .unwrap();
        assert!(out.status.success(), "iptables-save: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The agent binary running in the background with sockets in its own temp dir.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
    pub zds: PathBuf,
    pub admin: PathBuf,
    _dir: TempDir,
}

impl Agent {
    pub fn start(name: &str) -> Agent {
        Agent::spawn(name, Command::new(BIN))
    }

    /// The agent with its open-file limit set to `nofile` (through `prlimit`, which execs it, so
    /// the child is still the agent itself): exhaustion comes quickly and shows.
    pub fn start_with_nofile(name: &str, nofile: u64) -> Agent {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(BIN);
        Agent::spawn(name, command)
    }

    fn spawn(name: &str, mut command: Command) -> Agent {
        let dir = TempDir::new(name);
        let (zds, admin) = (dir.join("ztunnel.sock"), dir.join("redirect.sock"));
        let log = File::create(dir.join("agent.log")).unwrap();
        let child = command
            .arg("agent")
            .arg("--zds-socket")
            .arg(&zds)
            .arg("--admin-socket")
            .arg(&admin)
            // Many agents run at once in the root namespace: no shared probe ports.
            .args(["--health-addr", "off", "--metrics-addr", "off"])
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent");
        let agent = Agent {
            child: Some(child),
            log: dir.join("agent.log"),
            zds,
            admin,
            _dir: dir,
        };
        wait_until("the agent's admin socket", || agent.admin.exists());
        agent
    }

    /// The agent's log file (stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent stopped").id()
    }

    /// Open fds of the agent process, counted in /proc.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("the agent is running")
            .count()
    }

    /// The agent's fd count once it has stopped changing (two equal samples 50 ms apart).
    pub fn settled_fd_count(&self) -> usize {
        let mut last = self.fd_count();
        loop {
            thread::sleep(Duration::from_millis(50));
            let now = self.fd_count();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// Waits until the agent's fd count is back to `baseline`, or fails naming both counts.
    pub fn wait_for_fd_count(&self, baseline: usize, what: &str) {
        let deadline = Instant::now() + GUARD;
        loop {
            let now = self.fd_count();
            if now == baseline {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the agent holds {now} fds, baseline {baseline}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `list` until `n` tunnels are connected (and so have received their snapshot).
    pub fn wait_for_tunnels(&self, n: usize) {
        wait_until(&format!("{n} connected tunnel(s)"), || {
            agent::request(&self.admin, &Request::List)
                .map(|r| r.tunnels == Some(n))
                .unwrap_or(false)
        });
    }

    pub fn list(&self) -> Vec<String> {
        agent::request(&self.admin, &Request::List)
            .unwrap()
            .uids
            .unwrap_or_default()
    }

    /// SIGTERM, then the exit status: a clean stop exits 0 and removes the admin socket.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + GUARD;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the agent ignored SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The agent's log is only worth reading when something went wrong.
        if thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- agent log ---\n{log}--- end of agent log ---");
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// What the fake tunnel saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Add {
        uid: String,
        name: String,
        namespace: String,
        service_account: String,
        /// (st_dev, st_ino) of the received netns fd.
        netns: (u64, u64),
    },
    Keep(String),
    Del(String),
    SnapshotSent,
}

/// A node tunnel on its own thread and runtime: acks every request, adds with `add_error` when set.
pub struct FakeTunnel {
    pub events: mpsc::Receiver<Seen>,
    pub add_error: Arc<Mutex<Option<String>>>,
}

impl FakeTunnel {
    pub fn connect(zds: &Path, add_error: Option<&str>) -> FakeTunnel {
        let (tx, events) = mpsc::channel();
        let add_error = Arc::new(Mutex::new(add_error.map(str::to_owned)));
        let (path, error) = (zds.to_owned(), add_error.clone());
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut client = ZdsClient::connect(&path).await.expect("connect to ZDS");
                // Ends when the agent closes the connection (it stopped) or the test is over.
                while let Ok(Some(event)) = client.next_event().await {
                    let (seen, ack) = match event {
                        ZdsEvent::Add { uid, info, netns } => {
                            let meta = File::from(netns).metadata().unwrap();
                            let ack = error.lock().unwrap().clone().map_or(Ok(()), Err);
                            let seen = Seen::Add {
                                uid,
                                name: info.name,
                                namespace: info.namespace,
                                service_account: info.service_account,
                                netns: (meta.dev(), meta.ino()),
                            };
                            (seen, ack)
                        }
                        ZdsEvent::Keep { uid } => (Seen::Keep(uid), Ok(())),
                        ZdsEvent::Del { uid } => (Seen::Del(uid), Ok(())),
                        ZdsEvent::SnapshotSent => (Seen::SnapshotSent, Ok(())),
                    };
                    let _ = tx.send(seen);
                    if client.ack(ack).await.is_err() {
                        break;
                    }
                }
            });
        });
        FakeTunnel { events, add_error }
    }

    pub fn next(&self) -> Seen {
        self.events
            .recv_timeout(GUARD)
            .expect("the tunnel received nothing in time")
    }
}

/// Runs the binary with `args`, extra environment and `stdin`.
pub fn run_bin(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A plugin that exits before reading (VERSION) closes the pipe; that is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

/// [`run_bin`], failing the test if the binary has not exited within `limit` (it is killed).
pub fn run_bin_within(limit: Duration, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still running after {limit:?}; stderr: {}",
                text(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
