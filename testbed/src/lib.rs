//! Builder DSL for zmesh tier (c) tests: real "nodes" and "pods" made of
//! Linux network namespaces joined by veth pairs and bridges, plus helpers to
//! run code or processes inside them and to capture the frames they exchange.
//!
//! Everything is guard-based so a failing (panicking) test never leaves
//! namespaces or processes behind: [`Netns`] deletes its namespace and kills
//! the processes it spawned on drop, [`Child`] kills and reaps its process,
//! and [`PacketCapture`] stops its reader thread.
//!
//! ```no_run
//! use zmesh_testbed::{link_veth, Netns, PacketCapture};
//! # fn main() -> anyhow::Result<()> {
//! let a = Netns::new("demo")?;
//! let b = Netns::new("demo")?;
//! link_veth(&a, "veth-a", "10.213.1.1/24", &b, "veth-b", "10.213.1.2/24")?;
//! let cap = PacketCapture::start(&b, "veth-b")?;
//! let listener = b.listen_tcp("10.213.1.2:0")?;
//! let stream = a.connect_tcp(listener.local_addr()?)?;
//! # drop(stream);
//! let frames = cap.stop()?;
//! # let _ = frames;
//! # Ok(())
//! # }
//! ```
//!
//! All of it needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN); tests call
//! [`require_root`] first, so without root they fail with a clear message
//! instead of passing having tested nothing (tests/README.md).

#![forbid(unsafe_code)]

mod capture;
mod data;
mod frame;
pub mod kubeapi;
mod link;
pub mod link_order;
pub mod mesh;
mod netns;
pub mod networks;
mod process;
pub mod shelf;
pub mod three;

pub use capture::PacketCapture;
pub use data::{random_bytes, seeded_bytes, sha256};
pub use frame::{Frame, IPPROTO_TCP, IPPROTO_UDP};
pub use link::{attach_to_bridge, link_veth};
pub use netns::{sweep_stale, Netns};
pub use process::Child;

/// Runs `cmd` to completion and returns its stdout; panics with its stderr if it failed.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the current process runs with effective uid 0.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fails the calling test, with a message saying why, unless it runs as root. A namespace
/// test that returned early without root would pass having checked nothing, so the tier (c)
/// rule is to fail instead (tests/README.md); CI runs them as root.
#[track_caller]
pub fn require_root() {
    assert!(
        is_root(),
        "this test builds network namespaces and installs capture rules, which needs root \
         (CAP_NET_ADMIN + CAP_SYS_ADMIN): run it as root, as CI does"
    );
}

/// Longest interface name Linux accepts (IFNAMSIZ minus the NUL byte).
pub const MAX_IFNAME_LEN: usize = 15;

/// Rejects interface names the kernel would refuse, with a readable error
/// instead of iproute2's terse "not a valid ifname".
pub(crate) fn check_ifname(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty() && name.len() <= MAX_IFNAME_LEN,
        "interface name {name:?} must be 1..={MAX_IFNAME_LEN} bytes"
    );
    anyhow::ensure!(
        !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()),
        "interface name {name:?} contains '/', ':' or whitespace"
    );
    Ok(())
}
