//! Traffic capture without eBPF: generates and installs the iptables/nftables rules that steer TCP
//! into the node tunnel (see `docs/capture.md`). Host mode, for VMs and developer machines,
//! captures in the host's own network namespace; in-pod mode will reuse the same rule model inside
//! each enrolled pod's namespace. [`rules`] is pure and golden-tested; [`apply`] only runs the tools.
// `unsafe` is denied crate-wide (workspace lints) and allowed only in [`sys`], the one module for
// socket and namespace syscalls (conventions, item 9).
#![deny(unsafe_code)]

pub mod apply;
pub mod rules;

pub use apply::{install, uninstall, ApplyError};
pub use rules::{Backend, HostOptions, HostRules, InboundPlaintext, OptionsError, TUNNEL_MARK};
pub mod zds;
pub use apply::{install_pod, uninstall_pod};
pub use rules::{Capture, Family, PodOptions, PodRules};
#[cfg(feature = "kube")]
pub mod agent;
#[cfg(feature = "kube")]
pub mod cni;
pub mod cni_install;
#[cfg(feature = "kube")]
pub mod enroll;
#[cfg(feature = "kube")]
pub mod health;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod netns_scan;
pub mod nsfd;
pub mod state;
mod sys;

pub mod logging;
pub use logging::log_filter;
pub use sys::{allocator_stats, AllocatorStats};
#[cfg(feature = "jemalloc")]
pub use sys::{jemalloc_thread_freed, jemalloc_thread_idle};

/// The commit this build was made from (`build.rs`: short SHA, or `unknown` without git).
pub const GIT_SHA: &str = env!("ZMESH_GIT_SHA");
/// The release version alone.
pub const VERSION_NUMBER: &str = env!("CARGO_PKG_VERSION");
/// What every zmesh binary's `--version` prints after its name: `0.1.0 (git abc1234)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("ZMESH_GIT_SHA"),
    ")"
);
