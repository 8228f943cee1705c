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
pub mod agent;
pub mod cni;
pub mod cni_install;
pub mod health;
pub mod nsfd;
mod sys;

/// The log filter every zmesh binary starts with: `ZMESH_LOG`, else `RUST_LOG` (what ztunnel and
/// most Rust tools read), else `info`. tracing's `EnvFilter` syntax.
pub fn log_filter() -> String {
    ["ZMESH_LOG", "RUST_LOG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| "info".to_string())
}
