//! Network-namespace plumbing for in-pod mode (spec/capture.md "Mode 1"): the node tunnel gets a
//! pod's netns as a file descriptor and must create that pod's listeners and upstream sockets
//! INSIDE it, so traffic leaves with the pod's own IP.
//!
//! Namespace membership is per thread, and a socket keeps the namespace it was created in. So a
//! dedicated thread per pod enters the namespace once (setns) and creates sockets on request;
//! the sockets are then used from the async runtime like any other. The thread never leaves the
//! namespace and exits when the pod's handle is dropped.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;

use nix::sched::{setns, CloneFlags};
use nix::sys::stat::fstat;

type Job = Box<dyn FnOnce() + Send>;

/// A pod's network namespace: its fd, its identity (device + inode) and a socket-making thread.
pub struct PodNetns {
    fd: Arc<OwnedFd>,
    id: (u64, u64),
    jobs: mpsc::Sender<Job>,
}

impl PodNetns {
    /// Takes ownership of a netns fd (from ZDS) and starts its socket thread.
    pub fn new(fd: OwnedFd, name: &str) -> io::Result<PodNetns> {
        let st = fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
        let fd = Arc::new(fd);
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let thread_fd = fd.clone();
        std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                let entered =
                    setns(thread_fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    // Runs until every sender (the PodNetns) is gone.
                    for job in rx {
                        job();
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread died before entering the namespace"))??;
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

    /// Runs `f` inside the namespace (on the pod's thread) and returns its result.
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
