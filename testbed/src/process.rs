//! [`Child`]: a guard around a long-lived process started inside a
//! namespace (a zmesh node, an echo server, ...). Its output goes to a log
//! file so a failing test can print what the process said, and dropping the
//! guard kills and reaps it so no test leaks processes.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

/// Makes log file names unique within the test binary.
static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The process state shared between a [`Child`] and the `Netns` that
/// spawned it, so whichever is dropped first can kill it exactly once.
#[derive(Debug)]
pub(crate) struct Proc {
    child: std::process::Child,
    /// Set once reaped; after that the pid may be reused, so it must never
    /// be signalled again.
    status: Option<ExitStatus>,
}

impl Proc {
    /// SIGKILLs the process group (unless already reaped) and reaps the
    /// leader. Never fails: it runs from Drop.
    pub(crate) fn terminate(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // The group, not just the pid: the command may be a shell
                // that forked helpers. ESRCH only means it is already gone.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            self.status = self.child.wait().ok();
        }
        self.status
    }

    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }
}

/// A process running inside a namespace; see `Netns::spawn`.
///
/// Dropping it kills the process group and waits for it. The log file is
/// removed on drop unless the thread is panicking, so a failed test leaves
/// the log behind for inspection.
#[derive(Debug)]
pub struct Child {
    proc: Arc<Mutex<Proc>>,
    pid: u32,
    log_path: PathBuf,
}

impl Child {
    pub(crate) fn spawn(mut command: Command, ns_name: &str, cmd: &str) -> Result<Child> {
        let dir = std::env::temp_dir().join("zmesh-testbed");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let base = Path::new(cmd)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "cmd".to_owned());
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log_path = dir.join(format!("{ns_name}-{n}-{base}.log"));
        let stdout = File::create(&log_path)
            .with_context(|| format!("creating log {}", log_path.display()))?;
        // One shared file offset for both streams keeps their lines in order.
        let stderr = stdout.try_clone()?;
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Own process group so the guard can kill everything it forks
            // without touching the test binary's group.
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        Ok(Child {
            pid: child.id(),
            proc: Arc::new(Mutex::new(Proc {
                child,
                status: None,
            })),
            log_path,
        })
    }

    pub(crate) fn weak(&self) -> Weak<Mutex<Proc>> {
        Arc::downgrade(&self.proc)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Proc> {
        self.proc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process id (also its process-group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// File receiving the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far (lossy UTF-8; empty if the
    /// log cannot be read, since this is used in failure paths).
    pub fn read_log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        Ok(self.lock().try_wait()?)
    }

    /// Kills the process group now and returns the leader's exit status.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.lock()
            .terminate()
            .context("waiting for killed process")
    }

    /// Waits until the log contains `needle` (e.g. a "listening" line).
    /// Fails early if the process exits first, and on timeout; both errors
    /// include the log so the test output shows why.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.read_log();
            if log.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!("process exited ({status}) before logging {needle:?}; log:\n{log}");
            }
            if Instant::now() >= deadline {
                bail!("{needle:?} not logged within {timeout:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.lock().terminate();
        if !std::thread::panicking() {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}
