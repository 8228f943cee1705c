//! Finding a running pod's network namespace from its IP, for pods the agent did not see through
//! a CNI ADD (the namespace was labelled later, or the agent restarted): the candidates are the
//! runtime's bind mounts in `/var/run/netns` and every process's `/proc/<pid>/ns/net`, each
//! netns visited once (by its inode); the one whose interfaces hold one of the pod's IPs is the
//! pod's. This is how istio-cni finds pods too; the kubelet hands the netns path only to CNI.
//!
//! Each candidate is opened with [`crate::nsfd::open_netns`] (never blocking, never anything but
//! a network namespace) and entered from one dedicated `std::thread` that exits when the scan is
//! done, so no thread of the runtime is ever left inside a pod's netns.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::nsfd::open_netns;

/// Where `ip netns` and the container runtimes (containerd, CRI-O) bind-mount pod namespaces.
/// Scanned first: a bind mount outlives any one process of the pod, so it is the better path to
/// remember.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// A pod's netns, found.
#[derive(Debug)]
pub struct Found {
    /// `/var/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub path: PathBuf,
    pub netns: File,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot list {dir} to find pod network namespaces: {source}")]
    List { dir: PathBuf, source: io::Error },
    #[error("cannot start the thread that scans network namespaces: {0}")]
    Thread(io::Error),
    #[error("the thread scanning network namespaces panicked")]
    Panicked,
}

/// Every candidate netns path, bind mounts first, one path per distinct netns, skipping `own`
/// (the agent's netns: the node's, which holds no pod IP a meshed pod could have).
pub fn candidates(
    run_dir: &Path,
    proc_dir: &Path,
    own: Option<(u64, u64)>,
) -> Result<Vec<PathBuf>, ScanError> {
    let mut seen: HashSet<(u64, u64)> = own.into_iter().collect();
    let mut out = Vec::new();
    let mut add = |path: PathBuf| {
        // stat follows the /proc magic link to the nsfs inode; a process that exited meanwhile
        // (or a file that is not there any more) is just not a candidate.
        if let Ok(meta) = std::fs::metadata(&path) {
            if seen.insert((meta.dev(), meta.ino())) {
                out.push(path);
            }
        }
    };
    match std::fs::read_dir(run_dir) {
        Ok(entries) => {
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            names.into_iter().for_each(&mut add);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ScanError::List {
                dir: run_dir.to_owned(),
                source,
            })
        }
    }
    let procs = std::fs::read_dir(proc_dir).map_err(|source| ScanError::List {
        dir: proc_dir.to_owned(),
        source,
    })?;
    let mut pids: Vec<u32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        add(proc_dir.join(pid.to_string()).join("ns/net"));
    }
    Ok(out)
}

/// The agent's own netns id, so scans skip it.
pub fn own_netns() -> Option<(u64, u64)> {
    std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The netns among `candidates` whose interfaces hold one of `ips`, entered on a dedicated thread.
/// `Ok(None)` when none does (the pod has no network yet, or it lives on another node).
pub async fn find_by_ip(
    candidates: Vec<PathBuf>,
    ips: Vec<IpAddr>,
) -> Result<Option<Found>, ScanError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-scan".into())
        .spawn(move || {
            let _ = tx.send(scan(candidates, &ips));
        })
        .map_err(ScanError::Thread)?;
    rx.await.map_err(|_| ScanError::Panicked)
}

fn scan(candidates: Vec<PathBuf>, ips: &[IpAddr]) -> Option<Found> {
    for path in candidates {
        // Gone since it was listed, or not a netns after all: not the pod's.
        let Ok(netns) = open_netns(&path) else {
            continue;
        };
        if setns(&netns, CloneFlags::CLONE_NEWNET).is_err() {
            continue;
        }
        // getifaddrs asks the kernel over a netlink socket, created in this thread's netns.
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            continue;
        };
        let holds = addrs.filter_map(|a| a.address).any(|a| {
            let ip = if let Some(v4) = a.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = a.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                return false;
            };
            ips.contains(&ip)
        });
        if holds {
            return Some(Found { path, netns });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_without_a_run_dir_still_list_processes_and_skip_our_own() {
        let own = own_netns();
        let list =
            candidates(Path::new("/nonexistent-netns-dir"), Path::new("/proc"), own).unwrap();
        for p in &list {
            let m = std::fs::metadata(p).unwrap();
            assert_ne!(
                Some((m.dev(), m.ino())),
                own,
                "{} is our own netns",
                p.display()
            );
        }
        let ids: HashSet<_> = list
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino())))
            .collect();
        assert_eq!(ids.len(), list.len(), "one path per netns");
    }

    #[test]
    fn an_unreadable_proc_dir_is_a_clear_error() {
        let err = candidates(
            Path::new("/nonexistent"),
            Path::new("/nonexistent-proc"),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent-proc"), "{err}");
    }
}
