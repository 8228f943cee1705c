//! One structured access-log line per connection: who talked to whom, under which identities,
//! how many bytes each way, how long, and how it ended. The subscriber set up in `main` renders
//! it as text or JSON and hands it to `crate::accesslog::NodeLogWriter`, which queues it for the
//! writer thread: `emit` never waits for stderr, and a line that does not fit the queue is
//! dropped and counted (`zmesh_access_log_dropped_total`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::copy::Transfer;
use crate::metrics::{NodeMetrics, TcpLabels};
use crate::model::{Service, Workload};

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
    /// For the metrics' labels: the workloads and service, as far as they are known.
    pub src_wl: Option<Arc<Workload>>,
    pub dst_wl: Option<Arc<Workload>>,
    pub svc: Option<Arc<Service>>,
    /// Whether the far side is reached over mTLS (HBONE).
    pub mtls: bool,
    metrics: Arc<NodeMetrics>,
    /// Set once the connection reached its far side: it is then counted as opened.
    opened_as: Option<Arc<TcpLabels>>,
}

impl ConnLog {
    pub fn new(
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        metrics: &Arc<NodeMetrics>,
    ) -> Self {
        ConnLog {
            src_wl: None,
            dst_wl: None,
            svc: None,
            mtls: false,
            metrics: metrics.clone(),
            opened_as: None,
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

    fn labels(&self) -> TcpLabels {
        let reporter = match self.direction {
            Direction::Outbound => "source",
            Direction::Inbound | Direction::InboundPlaintext => "destination",
        };
        TcpLabels::new(
            reporter,
            self.src_wl.as_deref(),
            self.src_identity.as_deref(),
            self.dst_wl.as_deref(),
            self.svc.as_deref(),
            self.mtls,
        )
    }

    /// The connection reached its far side (tunnel up, or app dialed): count it as opened.
    pub fn opened(&mut self) {
        self.opened_as = Some(self.metrics.opened(self.labels()));
    }

    /// Emits the line (when access logging is on) and settles the metrics: an opened connection
    /// is closed with its bytes, any other one failed. `error` is None for a completed one.
    pub fn emit(&self, enabled: bool, error: Option<&dyn std::fmt::Display>) {
        // Istio's meaning: "sent" is response bytes (towards the client), "received" request
        // bytes. `transfer` counts from the side the relay was given first: the client socket
        // for outbound and plaintext inbound, the app socket for HBONE inbound.
        let (request, response) = match self.direction {
            Direction::Outbound | Direction::InboundPlaintext => {
                (self.transfer.sent, self.transfer.received)
            }
            Direction::Inbound => (self.transfer.received, self.transfer.sent),
        };
        match &self.opened_as {
            Some(l) => self.metrics.closed(l, response, request),
            None => self.metrics.failed(self.labels()),
        }
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
            target: crate::accesslog::ACCESS_TARGET,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accesslog::tests::{returns_promptly, StalledSink};
    use crate::accesslog::{LineWriter, NodeLogWriter};

    /// Issue #11 finding 10: the node's connection log with its output stalled (stderr a pipe
    /// nobody reads). `emit` still returns at once for every connection: the first line sits
    /// in the stuck write, 16 wait in the queue, the other 483 are dropped and counted.
    #[test]
    fn emit_never_waits_for_a_stalled_log_output() {
        let sink = StalledSink::default();
        let lines: &'static LineWriter = Box::leak(Box::new(LineWriter::spawn(
            "test-node-log",
            16,
            sink.clone(),
        )));
        let subscriber = Arc::new(
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_writer(NodeLogWriter::to(lines))
                .finish(),
        );
        let metrics = Arc::new(NodeMetrics::default());
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let first = ConnLog::new(Direction::Outbound, src, dst, &metrics);
        tracing::subscriber::with_default(subscriber.clone(), || first.emit(true, None));
        sink.wait_stuck();
        returns_promptly(move || {
            tracing::subscriber::with_default(subscriber, || {
                for _ in 0..499 {
                    ConnLog::new(Direction::Outbound, src, dst, &metrics).emit(true, None);
                }
            });
        });
        assert_eq!(lines.dropped(), 499 - 16);
        sink.release();
        assert!(lines.close(std::time::Duration::from_secs(10)));
        assert_eq!(sink.lines(), 17);
        let written = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        assert!(
            written.contains("\"dst.addr\":\"10.0.0.2:8080\""),
            "{written}"
        );
    }
}
