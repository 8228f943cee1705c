//! Network-namespace plumbing for in-pod mode (docs/capture.md "Mode 1"): the node tunnel gets a
//! pod's netns as a file descriptor and must create that pod's listeners and upstream sockets
//! INSIDE it, so traffic leaves with the pod's own IP.
//!
//! Namespace membership is per thread, and a socket keeps the namespace it was created in. So a
//! dedicated thread per pod enters the namespace once (setns) and creates sockets on request;
//! the sockets are then used from the async runtime like any other. The thread never leaves the
//! namespace and exits when the pod's handle is dropped.
//!
//! Async code uses [`PodNetns::open`] and [`PodNetns::run_async`], which await the pod's thread;
//! [`PodNetns::new`] and [`PodNetns::run`] block the caller and are for plain threads and tests
//! only (on a runtime worker they would stall every task on it; issue 11, finding 10).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;

use nix::sched::{setns, CloneFlags};
use nix::sys::stat::fstat;
use zmesh_redirect::nsfd::check_netns;

type Job = Box<dyn FnOnce() + Send>;

/// A pod's network namespace: its fd, its identity (device + inode) and a socket-making thread.
pub struct PodNetns {
    fd: Arc<OwnedFd>,
    id: (u64, u64),
    jobs: mpsc::Sender<Job>,
}

impl PodNetns {
    /// Takes ownership of a netns fd (from ZDS) and starts its socket thread, awaiting (not
    /// blocking on) the thread's setns. An fd that is not a network namespace (a FIFO, socket,
    /// regular file, another namespace type) is refused first, without blocking.
    pub async fn open(fd: OwnedFd, name: &str) -> io::Result<PodNetns> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let netns = Self::start(fd, name, move |entered| {
            let _ = ready_tx.send(entered);
        })?;
        ready_rx
            .await
            .map_err(|_| io::Error::other("netns thread died before entering the namespace"))??;
        Ok(netns)
    }

    /// [`open`](Self::open) for callers that are not async: blocks until the thread has entered
    /// the namespace. Never call it from an async task.
    pub fn new(fd: OwnedFd, name: &str) -> io::Result<PodNetns> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let netns = Self::start(fd, name, move |entered| {
            let _ = ready_tx.send(entered);
        })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread died before entering the namespace"))??;
        Ok(netns)
    }

    /// Checks the fd and spawns the pod's thread; `ready` gets the outcome of its setns.
    fn start(
        fd: OwnedFd,
        name: &str,
        ready: impl FnOnce(io::Result<()>) + Send + 'static,
    ) -> io::Result<PodNetns> {
        check_netns(fd.as_fd()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the fd for {name} is refused: {e}"),
            )
        })?;
        let st = fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
        let fd = Arc::new(fd);
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_fd = fd.clone();
        std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                let entered =
                    setns(thread_fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                let ok = entered.is_ok();
                ready(entered);
                if ok {
                    // Runs until every sender (the PodNetns) is gone.
                    for job in rx {
                        job();
                    }
                }
            })?;
        Ok(PodNetns {
            fd,
            id: (st.st_dev, st.st_ino),
            jobs: tx,
        })
    }

    /// Device and inode of the namespace: two fds for one pod netns compare equal (a repeated
    /// ZDS `add` for the same namespace is a no-op; a different one replaces the proxy).
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Runs `f` inside the namespace (on the pod's thread) and blocks until it returns. For plain
    /// threads and tests: async callers use [`run_async`](Self::run_async).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("netns job was dropped"))?
    }

    /// `run` for async callers: the job runs on the pod's thread while the caller awaits.
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("netns job was dropped"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    /// A FIFO, a socket and a regular file are refused at once: none reaches setns, and nothing
    /// waits on the FIFO (no writer will ever come).
    #[tokio::test]
    async fn non_netns_fds_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("zmesh-podnetns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        // Read-only and non-blocking: a FIFO without a writer, as a hostile agent would pass it.
        let fifo_fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap()
            .into();
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let file: OwnedFd = std::fs::File::open("/proc/self/stat").unwrap().into();
        for (what, fd, expected) in [
            ("FIFO", fifo_fd, "FIFO"),
            ("socket", OwnedFd::from(sock), "socket"),
            ("regular file", file, "outside nsfs"),
        ] {
            let err =
                tokio::time::timeout(std::time::Duration::from_secs(5), PodNetns::open(fd, what))
                    .await
                    .expect("refusing must not block")
                    .err()
                    .unwrap_or_else(|| panic!("{what} accepted as a netns"));
            assert!(err.to_string().contains(expected), "{what}: {err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
