//! Finding a running pod's network namespace, for pods the agent did not see through a CNI ADD
//! (the namespace was labelled later, or the agent restarted). As istio-cni does, the pod is
//! found by its UID first: kubelet puts every process of a pod in a cgroup named after the pod's
//! UID (`pod<uid>` with the cgroupfs driver, `...-pod<uid with _>.slice` with systemd's), so
//! the candidates are the network namespaces of the processes in that cgroup, read from
//! `/proc/<pid>/cgroup`. The pod's IP is then confirmed inside the candidate. An IP alone is
//! never enough: any process that can make a network namespace can put a meshed pod's IP on its
//! own interfaces, and must not be captured (and served) under that pod's identity. When a
//! runtime bind-mounted the same netns in `/var/run/netns`, that path is the one remembered (it
//! outlives any one process of the pod).
//!
//! Each candidate is opened with [`crate::nsfd::open_netns`] (never blocking, never anything but
//! a network namespace) and entered from one dedicated `std::thread` that exits when the scan is
//! done, so no thread of the runtime is ever left inside a pod's netns.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read as _};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::nsfd::open_netns;

/// Where `ip netns` and the container runtimes (containerd, CRI-O) bind-mount pod namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Longest `/proc/<pid>/cgroup` read: a few lines of paths (one per v1 hierarchy) in practice;
/// the bound keeps a scan's cost per process fixed.
const MAX_CGROUP_FILE: u64 = 16 * 1024;

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
    #[error("the pod's processes are in {count} network namespaces that hold its IPs ({paths}); refusing to guess")]
    Ambiguous { count: usize, paths: String },
}

/// Whether a `/proc/<pid>/cgroup` text places the process in the cgroup kubelet made for the pod
/// `uid`: a path component `pod<uid>` (cgroupfs driver) or one ending in `-pod<uid>.slice` with
/// the UID's dashes as underscores (systemd driver). Whole components only: the UID `1` is not
/// in `pod12`.
pub fn in_pod_cgroup(cgroup: &str, uid: &str) -> bool {
    if uid.is_empty() || uid.contains(['/', '\n']) {
        return false;
    }
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
    cgroup.lines().any(|line| {
        // hierarchy-ID:controllers:path
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/')
            .any(|c| c == cgroupfs || c.ends_with(&systemd))
    })
}

fn read_cgroup(path: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(MAX_CGROUP_FILE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The network namespaces of the pod `uid`'s processes (see the module docs), one path per
/// distinct netns: its bind mount in `run_dir` when there is one, else a `/proc/<pid>/ns/net`.
/// Skips `own` (the agent's netns: the node's, which a host-network pod shares and which is
/// never captured).
pub fn candidates(
    run_dir: &Path,
    proc_dir: &Path,
    own: Option<(u64, u64)>,
    uid: &str,
) -> Result<Vec<PathBuf>, ScanError> {
    let procs = std::fs::read_dir(proc_dir).map_err(|source| ScanError::List {
        dir: proc_dir.to_owned(),
        source,
    })?;
    let mut pids: Vec<u32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    // netns id -> the path to remember, in the order first seen.
    let mut found: Vec<((u64, u64), PathBuf)> = Vec::new();
    for pid in pids {
        let dir = proc_dir.join(pid.to_string());
        // A process that exited meanwhile is just not a candidate.
        let Some(cgroup) = read_cgroup(&dir.join("cgroup")) else {
            continue;
        };
        if !in_pod_cgroup(&cgroup, uid) {
            continue;
        }
        let path = dir.join("ns/net");
        // stat follows the /proc magic link to the nsfs inode.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let id = (meta.dev(), meta.ino());
        if Some(id) != own && !found.iter().any(|(seen, _)| *seen == id) {
            found.push((id, path));
        }
    }
    if found.is_empty() {
        return Ok(Vec::new());
    }
    match std::fs::read_dir(run_dir) {
        Ok(entries) => {
            let mut mounts: HashMap<(u64, u64), PathBuf> = HashMap::new();
            for e in entries.flatten() {
                if let Ok(meta) = std::fs::metadata(e.path()) {
                    let best = mounts.entry((meta.dev(), meta.ino())).or_insert(e.path());
                    if e.path() < *best {
                        *best = e.path();
                    }
                }
            }
            for (id, path) in &mut found {
                if let Some(mount) = mounts.remove(id) {
                    *path = mount;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ScanError::List {
                dir: run_dir.to_owned(),
                source,
            })
        }
    }
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// The agent's own netns id, so scans skip it.
pub fn own_netns() -> Option<(u64, u64)> {
    std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The netns of pod `uid` (see the module docs): among its processes' namespaces
/// ([`candidates`]), the one whose interfaces hold one of `ips`. Listed and entered on one
/// dedicated thread, off the runtime. `Ok(None)` when none does (the pod has no network yet, or
/// its processes are gone); an error when more than one does.
pub async fn find(
    run_dir: PathBuf,
    proc_dir: PathBuf,
    own: Option<(u64, u64)>,
    uid: String,
    ips: Vec<IpAddr>,
) -> Result<Option<Found>, ScanError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-scan".into())
        .spawn(move || {
            let found = candidates(&run_dir, &proc_dir, own, &uid).and_then(|c| scan(c, &ips));
            let _ = tx.send(found);
        })
        .map_err(ScanError::Thread)?;
    rx.await.map_err(|_| ScanError::Panicked)?
}

fn scan(candidates: Vec<PathBuf>, ips: &[IpAddr]) -> Result<Option<Found>, ScanError> {
    let mut holding = Vec::new();
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
            holding.push(Found { path, netns });
        }
    }
    match holding.len() {
        0 => Ok(None),
        1 => Ok(holding.pop()),
        count => Err(ScanError::Ambiguous {
            count,
            paths: holding
                .iter()
                .map(|f| f.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kubelet's two cgroup namings, as `/proc/<pid>/cgroup` shows them (v1 and v2 lines).
    #[test]
    fn a_process_belongs_to_the_pod_whose_uid_names_its_cgroup() {
        let uid = "6f2c1c3e-8d1a-4b7e-9f00-0a1b2c3d4e5f";
        let cgroupfs = format!("12:pids:/kubepods/besteffort/pod{uid}/0123abcd\n0::/\n");
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-0123.scope\n",
            uid.replace('-', "_")
        );
        assert!(in_pod_cgroup(&cgroupfs, uid));
        assert!(in_pod_cgroup(&systemd, uid));
        for (text, why) in [
            ("0::/\n".to_string(), "the root cgroup"),
            (format!("0::/kubepods/pod{uid}x/c\n"), "a longer component"),
            (
                format!("0::/kubepods/xpod{uid}/c\n"),
                "a prefixed component",
            ),
            (format!("0::/kubepods/pod{uid}"), "fine, no newline"),
        ] {
            assert_eq!(
                in_pod_cgroup(&text, uid),
                why == "fine, no newline",
                "{why}: {text}"
            );
        }
        assert!(
            !in_pod_cgroup("0::/kubepods/pod/c\n", ""),
            "an empty uid names no pod"
        );
        assert!(
            !in_pod_cgroup("0::/kubepods/pod1/c\n", "1/../x"),
            "a uid with a slash"
        );
        assert!(!in_pod_cgroup(
            &format!("0::/kubepods/pod{uid}2/c\n"),
            &uid[..35]
        ));
    }

    /// Only the processes in the pod's cgroup are candidates; here, this test process's cgroup
    /// names no pod, so nothing on the machine is (the agent's own netns never is).
    #[test]
    fn processes_outside_the_pods_cgroup_are_not_candidates() {
        let list = candidates(
            Path::new("/nonexistent-netns-dir"),
            Path::new("/proc"),
            None,
            "no-such-pod-uid",
        )
        .unwrap();
        assert!(list.is_empty(), "{list:?}");
    }

    #[test]
    fn an_unreadable_proc_dir_is_a_clear_error() {
        let err = candidates(
            Path::new("/nonexistent"),
            Path::new("/nonexistent-proc"),
            None,
            "u",
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent-proc"), "{err}");
    }
}
