//! The waypoint's access log: one JSON line per request on stdout (where container runtimes
//! collect it).
//!
//! The request path only serializes a line and queues it on the shared bounded writer
//! (`crate::accesslog`): a slow stdout never blocks a request; when the queue is full the line
//! is dropped and counted, never the request.

use serde::Serialize;

use crate::accesslog::LineWriter;

/// One request, as logged.
#[derive(Serialize)]
pub struct Line<'a> {
    pub time: String,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub response_code: u16,
    pub grpc_status: &'a str,
    pub response_flags: &'a str,
    pub detail: &'a str,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub retries: u32,
    pub source_principal: &'a str,
    pub source_address: String,
    pub original_destination: String,
    pub destination_service: &'a str,
    pub upstream_workload: &'a str,
    pub upstream_principal: &'a str,
    pub trace_id: String,
    pub span_id: String,
}

/// The waypoint's access log: JSON lines on stdout through the shared bounded writer.
pub struct AccessLog(LineWriter);

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog(LineWriter::spawn(
            "zmesh-accesslog",
            crate::accesslog::QUEUE,
            std::io::stdout(),
        ))
    }
}

impl AccessLog {
    pub fn write(&self, line: &Line<'_>) {
        let Ok(mut bytes) = serde_json::to_vec(line) else {
            return;
        };
        bytes.push(b'\n');
        self.0.write_line(bytes);
    }

    /// Lines dropped because stdout did not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.dropped()
    }
}
