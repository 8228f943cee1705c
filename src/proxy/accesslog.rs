//! One structured access-log line per connection: who talked to whom, under which identities,
//! how many bytes each way, how long, and how it ended. The subscriber set up in `main` renders
//! it as text or JSON.

use std::net::SocketAddr;
use std::time::Instant;

use crate::copy::Transfer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    InboundPlaintext,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// The facts of one connection, filled in as they become known.
#[derive(Debug)]
pub struct ConnLog {
    pub direction: Direction,
    pub start: Instant,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_service: Option<String>,
    /// How traffic left this node: "hbone 10.0.0.2:15008", "direct", "passthrough", "app".
    pub path: String,
    pub transfer: Transfer,
}

impl ConnLog {
    pub fn new(direction: Direction, src: SocketAddr, dst: SocketAddr) -> Self {
        ConnLog {
            direction,
            start: Instant::now(),
            src,
            dst,
            src_identity: None,
            dst_identity: None,
            dst_workload: None,
            dst_service: None,
            path: String::new(),
            transfer: Transfer::default(),
        }
    }

    /// Emits the line. `error` is None for a connection that completed.
    pub fn emit(&self, enabled: bool, error: Option<&dyn std::fmt::Display>) {
        if !enabled {
            return;
        }
        let result = match (error, self.transfer.reset) {
            (Some(_), _) => "error",
            (None, true) => "reset",
            (None, false) => "ok",
        };
        let na = "-";
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            src.addr = %self.src,
            dst.addr = %self.dst,
            src.identity = self.src_identity.as_deref().unwrap_or(na),
            dst.identity = self.dst_identity.as_deref().unwrap_or(na),
            dst.workload = self.dst_workload.as_deref().unwrap_or(na),
            dst.service = self.dst_service.as_deref().unwrap_or(na),
            path = %self.path,
            bytes_sent = self.transfer.sent,
            bytes_received = self.transfer.received,
            duration_ms = self.start.elapsed().as_millis() as u64,
            result,
            error = error.map(|e| e.to_string()).as_deref().unwrap_or(na),
            "connection complete"
        );
    }
}
