//! ZDS, the netns hand-off protocol between the redirect agent and the node tunnel, wire-compatible
//! with istio-cni and ztunnel (`docs/capture.md`, "The netns hand-off protocol"). The agent
//! owns the capture rules inside each pod netns and hands the netns itself (as an fd over
//! SCM_RIGHTS) to whichever tunnel is connected, so the tunnel can bind its in-pod listeners there.
//! Keeping the exact istio schema and sequencing lets either side be swapped for the istio one: our
//! agent can feed a stock ztunnel, and istio-cni can feed our node tunnel.
//!
//! - [`proto`]: the messages, hand-written prost derives whose field numbers are the wire contract.
//! - [`wire`]: one message per SOCK_SEQPACKET datagram, fds as SCM_RIGHTS, truncation rejected.
//! - [`server`]: the agent side (listens, caches pods, replays the snapshot on every connection).
//! - [`client`]: the tunnel side (connects, says hello, yields events and acks them).
//!
//! Received fds are taken over by `crate::sys` (the crate's only `unsafe`), which owns every fd
//! the kernel installed, even for a truncated datagram; neither side ever opens a received fd, so
//! a FIFO passed as a netns cannot block it (`crate::nsfd` checks the type without blocking).

pub mod client;
pub mod proto;
pub mod server;
pub mod wire;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use client::{Backoff, ZdsClient, ZdsEvent};
pub use proto::WorkloadInfo;
pub use server::{Delivery, ZdsServer};

/// Default socket path shared by istio-cni and ztunnel; both sides must agree on it.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";

/// Everything that can go wrong on either side of a ZDS connection.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("cannot listen on ZDS socket {path}: {source} (does the directory exist, and is it writable by the agent?)")]
    Bind { path: PathBuf, source: io::Error },
    #[error("refusing to replace {path}: it exists and is not a unix socket (check the configured ZDS socket path)")]
    NotASocket { path: PathBuf },
    #[error("cannot connect to ZDS socket {path}: {source} (is the redirect agent running, and is the socket directory shared with the node tunnel?)")]
    Connect { path: PathBuf, source: io::Error },
    #[error("ZDS socket I/O failed while trying to {op}: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("ZDS datagram truncated ({bytes} bytes read, data truncated: {data}, fds truncated: {control}); a message must fit in {max} bytes: is the peer speaking ZDS?", max = wire::MAX_DATAGRAM)]
    Truncated {
        bytes: usize,
        data: bool,
        control: bool,
    },
    #[error("ZDS message too large to send ({len} bytes, peer reads at most {max}); are the workload names valid Kubernetes names?", max = wire::MAX_DATAGRAM)]
    TooLarge { len: usize },
    #[error("malformed ZDS {what}: {source}")]
    Decode {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("ZDS protocol violation: {0}")]
    Protocol(String),
    /// The tunnel acked with a non-empty error; `error` is its text, verbatim.
    #[error("node tunnel rejected {request} of pod {uid}: {error}")]
    Rejected {
        request: &'static str,
        uid: String,
        error: String,
    },
    #[error("node tunnel did not ack {request} of pod {uid} within {timeout:?}; it is considered wedged and disconnected")]
    AckTimeout {
        request: &'static str,
        uid: String,
        timeout: Duration,
    },
    #[error("node tunnel disconnected before acking {request} of pod {uid}; the pod stays cached for the next tunnel")]
    TunnelGone { request: &'static str, uid: String },
    #[error("ZDS peer closed the connection")]
    Closed,
}

impl ZdsError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> ZdsError {
        move |source| ZdsError::Io { op, source }
    }
}
