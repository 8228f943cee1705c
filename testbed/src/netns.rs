//! The [`Netns`] guard: one named Linux network namespace per simulated node
//! or pod, with ways to run Rust code, shell commands and long-lived
//! processes inside it. Dropping the guard kills what it spawned and deletes
//! the namespace, also while a panicking test unwinds.

use std::fs::File;
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::process::{Child, Proc};

/// Where `ip netns add` bind-mounts namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// How long [`Netns::connect_tcp`] waits for a handshake; long enough for a
/// loaded CI box, short enough that a black-holed SYN fails the test quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Process-wide counter that makes namespace names unique within one test
/// binary (the pid makes them unique across concurrently running binaries).
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Serializes `ip netns add`: the first add in a fresh boot mounts and
/// re-shares /run/netns, and concurrent first adds from parallel tests can
/// race on that mount.
static ADD_LOCK: Mutex<()> = Mutex::new(());

/// A network namespace owned by the test. See the crate docs for an example.
///
/// Dropping it kills every process started with [`Netns::spawn`] that is
/// still running and then runs `ip netns delete`. Sockets created inside the
/// namespace keep the (now unnamed) namespace alive until they are closed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    /// Weak so a [`Child`] guard dropped first reaps its process itself; the
    /// namespace only kills the ones still alive when it goes away.
    procs: Mutex<Vec<Weak<Mutex<Proc>>>>,
}

impl Netns {
    /// Creates namespace `<prefix>-<pid>-<n>` and brings its `lo` up.
    ///
    /// `prefix` should name the test (letters, digits, `-`, `_`) so leftovers
    /// are attributable; see [`sweep_stale`] for cleaning up after killed runs.
    pub fn new(prefix: &str) -> Result<Netns> {
        ensure!(
            !prefix.is_empty()
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "netns prefix {prefix:?} must be non-empty [A-Za-z0-9_-]"
        );
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        {
            let _serialized = ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_checked(Command::new("ip").args(["netns", "add", &name]))
                .with_context(|| format!("creating netns {name}"))?;
        }
        // Build the guard before any further setup so a failing step below
        // still deletes the namespace.
        let ns = Netns {
            path: Path::new(NETNS_DIR).join(&name),
            name,
            procs: Mutex::new(Vec::new()),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file (`/var/run/netns/NAME`), usable with
    /// `setns(2)` or `nsenter --net=`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that has joined this namespace and returns
    /// its result.
    ///
    /// Only the network namespace is switched, and only for that thread, so
    /// the rest of the test is unaffected. Sockets remember the namespace
    /// they were created in: anything `f` creates (listeners, streams, raw
    /// sockets) can be returned and used from any thread afterwards.
    ///
    /// # Panics
    /// If joining the namespace fails (which means the testbed is broken,
    /// not the code under test), or if `f` panics (the panic is propagated).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = &self.path;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                let file =
                    File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
                f()
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Binds a TCP listener inside the namespace (e.g. `"10.213.1.2:0"`).
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs + Send) -> Result<TcpListener> {
        self.run(move || TcpListener::bind(addr))
            .with_context(|| format!("listen_tcp in netns {}", self.name))
    }

    /// `GET path` over HTTP/1.1 to `addr` from inside this namespace: the whole response
    /// (status line, headers, body), or `error: ...` when it cannot be had (a readiness probe).
    pub fn http_get(&self, addr: &str, path: &str) -> String {
        use std::io::{Read, Write};
        self.run(|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .unwrap_or_else(|e| format!("error: {e}"))
    }

    /// Connects a TCP stream from inside the namespace, giving up after a few
    /// seconds so a dropped SYN fails the test instead of hanging it.
    pub fn connect_tcp(&self, addr: impl ToSocketAddrs + Send) -> Result<TcpStream> {
        self.run(move || -> io::Result<TcpStream> {
            let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no addresses");
            for a in addr.to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .with_context(|| format!("connect_tcp in netns {}", self.name))
    }

    /// Polls `addr` from inside the namespace until a TCP connect succeeds,
    /// e.g. to wait for a spawned server to start listening.
    pub fn wait_for_tcp(&self, addr: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.connect_tcp(addr) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("{addr} not accepting after {timeout:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Runs `ip netns exec NAME args...` to completion and returns stdout.
    /// A non-zero exit becomes an error carrying the command and its stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        ensure!(!args.is_empty(), "exec needs a command");
        run_checked(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }

    /// Runs `ip -n NAME args...` (iproute2 inside the namespace) and returns
    /// stdout, e.g. `ns.ip(&["route", "add", "default", "via", "10.213.1.1"])`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets a sysctl inside the namespace, e.g.
    /// `sysctl("net.ipv4.ip_forward", "1")`. Keys use dots like sysctl(8);
    /// a key containing `/` is taken as a path below /proc/sys verbatim (for
    /// interface names that contain dots).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let rel = if key.contains('/') {
            key.trim_start_matches('/').to_owned()
        } else {
            key.replace('.', "/")
        };
        let path = Path::new("/proc/sys").join(rel);
        // /proc/sys/net resolves against the opening thread's namespace, so
        // writing from a `run` thread changes this namespace only.
        self.run(|| std::fs::write(&path, value))
            .with_context(|| format!("sysctl {key}={value} in netns {}", self.name))
    }

    /// Starts `cmd args...` inside the namespace (via `ip netns exec`) with
    /// extra environment `envs`, stdout and stderr appended to one log file
    /// (see [`Child::log_path`]).
    ///
    /// The returned guard kills the process group and reaps it on drop; if
    /// the guard outlives this `Netns`, the namespace's drop kills it first.
    /// `cmd` is resolved through `PATH` by `ip`, so pass test binaries by
    /// absolute path (e.g. `env!("CARGO_BIN_EXE_...")`).
    /// An app on `addr` here that answers each connection, once its client has shut down its
    /// write side, with everything it sent (one thread per connection; lives with the test).
    pub fn spawn_echo(&self, addr: &str) -> Result<std::thread::JoinHandle<()>> {
        use std::io::{Read, Write};
        let l = self.listen_tcp(addr)?;
        Ok(std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf);
                    let _ = s.write_all(&buf);
                });
            }
        }))
    }

    /// Starts `zmesh-node ca serve --xds` (binary `bin`) here, on `listen`, with the CA in `ca`
    /// and the mesh file `mesh` plus any `extra` arguments, and waits until it listens.
    pub fn spawn_control_plane(
        &self,
        bin: &str,
        ca: &Path,
        mesh: &Path,
        listen: &str,
        extra: &[&str],
        timeout: std::time::Duration,
    ) -> Result<Child> {
        let (ca, mesh) = (ca.display().to_string(), mesh.display().to_string());
        let mut args = vec![
            "ca", "serve", "--xds", "--dir", &ca, "--mesh", &mesh, "--listen", listen,
        ];
        args.extend_from_slice(extra);
        let cp = self.spawn(bin, &args, &[("ZMESH_LOG", "info")])?;
        cp.wait_for_log("listening on", timeout)?;
        Ok(cp)
    }

    pub fn spawn(&self, cmd: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Child> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .envs(envs.iter().copied());
        let child = Child::spawn(command, &self.name, cmd)?;
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        procs.retain(|w| w.strong_count() > 0);
        procs.push(child.weak());
        Ok(child)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let procs = std::mem::take(self.procs.get_mut().unwrap_or_else(|e| e.into_inner()));
        for proc in procs.iter().filter_map(Weak::upgrade) {
            proc.lock().unwrap_or_else(|e| e.into_inner()).terminate();
        }
        // Best effort: Drop cannot fail, and a panic here during unwinding
        // would abort the test binary and hide the original failure.
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "delete", &self.name])) {
            eprintln!("zmesh-testbed: failed to delete netns {}: {e:#}", self.name);
        }
    }
}

/// Deletes namespaces named `<prefix>-<pid>-<n>` whose creating process no
/// longer exists, i.e. leftovers of test runs that were SIGKILLed before
/// their guards could drop. Returns how many were deleted.
pub fn sweep_stale(prefix: &str) -> Result<usize> {
    let list = run_checked(Command::new("ip").args(["netns", "list"]))?;
    let mut deleted = 0;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let mut parts = rest.split('-');
        let (Some(pid), Some(n), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || n.parse::<u64>().is_err() {
            continue;
        }
        if !Path::new("/proc").join(pid).exists() {
            run_checked(Command::new("ip").args(["netns", "delete", name]))?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Runs a command to completion; non-zero exit becomes an error that quotes
/// the command line and stderr, which is what a failing test log needs.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().map_err(|e| anyhow!("running {shown}: {e}"))?;
    if !status.success() {
        bail!(
            "{shown} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}
