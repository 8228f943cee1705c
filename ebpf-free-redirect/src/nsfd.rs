//! Is this descriptor a network namespace? Asked of every netns that crosses a trust boundary: a
//! path the agent is told to open (CNI_NETNS, `pod add --netns`) and an fd the tunnel receives in a
//! ZDS `add`. The answer never blocks: a FIFO, socket, device or regular file is refused from its
//! `fstat`, before anything could wait on it, and only files on nsfs get the `NS_GET_NSTYPE` ioctl.
//!
//! Opening a path uses O_NONBLOCK, because `open(2)` of a FIFO without it waits for a writer
//! forever (issue 11, finding 10), and that wait would pin a runtime worker.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::libc;
use nix::sys::stat::{fstat, SFlag};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

use crate::sys;

/// Why a descriptor is not a usable network namespace; the message is meant for an operator.
#[derive(Debug, thiserror::Error)]
pub enum NotANetns {
    #[error("it is a {kind}, not a network namespace file")]
    WrongFileType { kind: &'static str },
    #[error("it is a regular file outside nsfs, not a network namespace (expected a path like /var/run/netns/NAME or /proc/PID/ns/net)")]
    NotNsfs,
    #[error("it is a {kind} namespace, not a network namespace")]
    OtherNamespace { kind: &'static str },
    #[error("cannot inspect it: {0}")]
    Inspect(#[source] io::Error),
}

/// Checks that `fd` refers to a network namespace: `fstat` (a regular file), `fstatfs` (on nsfs),
/// then `NS_GET_NSTYPE` == CLONE_NEWNET. None of these calls can block.
pub fn check_netns(fd: BorrowedFd<'_>) -> Result<(), NotANetns> {
    let st = fstat(fd.as_raw_fd()).map_err(|e| NotANetns::Inspect(e.into()))?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFREG {
        return Err(NotANetns::WrongFileType {
            kind: file_kind(kind),
        });
    }
    let fs = fstatfs(fd).map_err(|e| NotANetns::Inspect(e.into()))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(NotANetns::NotNsfs);
    }
    match sys::namespace_type(fd).map_err(NotANetns::Inspect)? {
        libc::CLONE_NEWNET => Ok(()),
        other => Err(NotANetns::OtherNamespace {
            kind: namespace_kind(other),
        }),
    }
}

/// Why a netns path could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenNetnsError {
    #[error("cannot open it: {0}")]
    Open(#[source] io::Error),
    #[error(transparent)]
    NotANetns(#[from] NotANetns),
}

/// Opens a netns path without ever blocking (O_RDONLY | O_NONBLOCK | O_CLOEXEC) and checks the
/// result with [`check_netns`]. Symlinks are followed: `/proc/PID/ns/net` is one.
pub fn open_netns(path: &Path) -> Result<File, OpenNetnsError> {
    let file = OpenOptions::new()
        .read(true)
        // std adds O_CLOEXEC itself.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(OpenNetnsError::Open)?;
    check_netns(file.as_fd())?;
    Ok(file)
}

fn file_kind(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symbolic link",
        _ => "file of unknown type",
    }
}

fn namespace_kind(nstype: i32) -> &'static str {
    match nstype {
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWUTS => "UTS",
        libc::CLONE_NEWIPC => "IPC",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWPID => "PID",
        libc::CLONE_NEWCGROUP => "cgroup",
        libc::CLONE_NEWTIME => "time",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn check_path(path: &str) -> Result<(), NotANetns> {
        let file = File::open(path).unwrap();
        check_netns(file.as_fd())
    }

    #[test]
    fn own_netns_passes_and_other_files_are_named() {
        check_path("/proc/self/ns/net").unwrap();
        assert!(matches!(
            check_path("/proc/self/ns/uts"),
            Err(NotANetns::OtherNamespace { kind: "UTS" })
        ));
        assert!(matches!(
            check_path("/proc/self/stat"),
            Err(NotANetns::NotNsfs)
        ));
        assert!(matches!(
            check_path("/"),
            Err(NotANetns::WrongFileType { kind: "directory" })
        ));
        let (a, _b): (OwnedFd, OwnedFd) = std::os::unix::net::UnixStream::pair()
            .map(|(a, b)| (a.into(), b.into()))
            .unwrap();
        let err = check_netns(a.as_fd()).unwrap_err();
        assert!(err.to_string().contains("socket"), "{err}");
    }

    #[test]
    fn fifo_path_fails_fast_instead_of_waiting_for_a_writer() {
        let dir = std::env::temp_dir().join(format!("zmesh-nsfd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("netns");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR).unwrap();
        // A plain File::open here would never return: no writer will ever come.
        let err = open_netns(&fifo).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
