//! The agent's enrolled pods on disk, so a restarted agent rebuilds its pod set before any tunnel
//! gets a snapshot (docs/capture.md, "Agent restarts"). Without the Kubernetes API this file is the
//! only record of which pods are meshed; with it, the file still covers an API that is down when
//! the agent starts. It lives under a run directory (tmpfs: a node reboot, which also ends every
//! pod netns, clears it) and is replaced through a rename, so a crash mid-write leaves the old
//! file whole.
//!
//! An entry is trusted only while its netns path still names the same namespace (st_dev, st_ino):
//! a path reused by a later pod must never bring an old pod's identity back.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the file layout, checked on load: a file from an incompatible agent is ignored
/// (with a warning) rather than misread.
pub const STATE_VERSION: u32 = 1;

/// One enrolled pod, as the agent needs it to capture and hand it off again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub uid: String,
    pub netns: PathBuf,
    /// (st_dev, st_ino) of the netns when it was enrolled.
    pub netns_id: (u64, u64),
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub inbound_capture: bool,
    pub dns_capture: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFileContents {
    version: u32,
    pods: Vec<PodRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the agent state file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the agent state file {path} is not valid JSON ({source}); it is ignored: pods are rebuilt from the Kubernetes API, if configured")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the agent state file {path} has version {found}, this agent writes {STATE_VERSION}; it is ignored")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write the agent state file {path}: {source} (is its directory writable? a restarted agent would forget pods)")]
    Write { path: PathBuf, source: io::Error },
}

/// The state file at `path`.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded pods; an absent file is an empty set.
    pub fn load(&self) -> Result<Vec<PodRecord>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let contents: StateFileContents =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Decode {
                path: self.path.clone(),
                source,
            })?;
        if contents.version != STATE_VERSION {
            return Err(StateError::Version {
                path: self.path.clone(),
                found: contents.version,
            });
        }
        Ok(contents.pods)
    }

    /// Replaces the file with `pods` (sorted by uid, so equal sets write equal files): written to a
    /// temporary file beside it, synced, then renamed over it. Mode 0600: the file names pods and
    /// their netns, which is for root only like the agent's sockets.
    pub fn save(&self, pods: &[PodRecord]) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let mut pods = pods.to_vec();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        let json = serde_json::to_vec_pretty(&StateFileContents {
            version: STATE_VERSION,
            pods,
        })
        .map_err(|e| err(io::Error::other(e)))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let tmp = self.path.with_file_name(name);
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(err)?
        };
        file.write_all(&json).map_err(err)?;
        file.sync_all().map_err(err)?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(err)
    }
}

/// The state file used unless configured: beside the admin socket, named after it, so two agents
/// with different sockets (tests, or two agents on one host) never share a file.
pub fn default_path(admin_socket: &Path) -> PathBuf {
    let stem = admin_socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "redirect".to_owned());
    admin_socket.with_file_name(format!("{stem}.pods.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            netns: "/var/run/netns/x".into(),
            netns_id: (4, 4026532000),
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            inbound_capture: true,
            dns_capture: false,
        }
    }

    #[test]
    fn round_trip_sorted_and_absent_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("run/pods.json"));
        assert_eq!(file.load().unwrap(), vec![]);
        file.save(&[record("b"), record("a")]).unwrap();
        let loaded = file.load().unwrap();
        assert_eq!(loaded, vec![record("a"), record("b")]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("run"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("pods.json")]);
    }

    #[test]
    fn garbage_and_other_versions_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pods.json");
        let file = StateFile::new(&path);
        std::fs::write(&path, b"{not json").unwrap();
        let e = file.load().unwrap_err();
        assert!(matches!(e, StateError::Decode { .. }), "{e}");
        assert!(e.to_string().contains("pods.json"), "{e}");
        std::fs::write(&path, br#"{"version":99,"pods":[]}"#).unwrap();
        assert!(matches!(
            file.load().unwrap_err(),
            StateError::Version { found: 99, .. }
        ));
    }

    #[test]
    fn default_path_follows_the_admin_socket() {
        assert_eq!(
            default_path(Path::new("/var/run/zmesh/redirect.sock")),
            PathBuf::from("/var/run/zmesh/redirect.pods.json")
        );
        assert_eq!(
            default_path(Path::new("/tmp/t/node-1-admin.sock")),
            PathBuf::from("/tmp/t/node-1-admin.pods.json")
        );
    }
}
