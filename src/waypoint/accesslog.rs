//! The waypoint's access log: one JSON line per request on stdout (where container runtimes
//! collect it).
//!
//! A line has the keys of every zmesh JSON log line (`timestamp`, `level`, `target`=`access`,
//! `message`) and names the two sides as the node's access log does (ztunnel's names:
//! `src.addr`, `src.workload`, `src.namespace`, `src.identity`, `dst.addr`, `dst.service`,
//! `dst.workload`, `dst.namespace`, `dst.identity`, `bytes_sent`, `bytes_recv`, `duration` as
//! `"12ms"`), then the request's own fields (method, path, status, flags, trace ids). A side
//! that is not known is left out, as in the node's log (docs/telemetry.md "Access log (waypoint)").
//!
//! The request path only serializes a line and queues it on the shared bounded writer
//! (`crate::accesslog`): a slow stdout never blocks a request; when the queue is full the line
//! is dropped and counted, never the request.

use serde::Serialize;

use crate::accesslog::LineWriter;

/// One request, as logged.
#[derive(Serialize)]
pub struct Line<'a> {
    pub timestamp: String,
    pub level: &'static str,
    pub target: &'static str,
    pub message: &'static str,
    #[serde(rename = "src.addr")]
    pub src_addr: String,
    #[serde(rename = "src.workload", skip_serializing_if = "Option::is_none")]
    pub src_workload: Option<&'a str>,
    #[serde(rename = "src.namespace")]
    pub src_namespace: &'a str,
    #[serde(rename = "src.identity")]
    pub src_identity: &'a str,
    #[serde(rename = "dst.addr")]
    pub dst_addr: String,
    #[serde(rename = "dst.service", skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<&'a str>,
    #[serde(rename = "dst.workload", skip_serializing_if = "Option::is_none")]
    pub dst_workload: Option<&'a str>,
    #[serde(rename = "dst.namespace", skip_serializing_if = "Option::is_none")]
    pub dst_namespace: Option<&'a str>,
    #[serde(rename = "dst.identity", skip_serializing_if = "Option::is_none")]
    pub dst_identity: Option<String>,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub response_code: u16,
    pub grpc_status: &'a str,
    pub response_flags: &'a str,
    pub detail: &'a str,
    /// Whole milliseconds with the unit, as ztunnel writes `duration`.
    pub duration: String,
    /// Request body bytes (towards the destination).
    pub bytes_sent: u64,
    /// Response body bytes (back to the client).
    pub bytes_recv: u64,
    pub retries: u32,
    pub trace_id: String,
    pub span_id: String,
}

/// The constant part of every waypoint access line.
pub const LEVEL: &str = "INFO";
pub const TARGET: &str = crate::accesslog::ACCESS_TARGET;
pub const MESSAGE: &str = "request complete";

/// The waypoint's access log: JSON lines on stdout through the shared bounded writer, or nothing
/// when `node.access_log` is `off` (the waypoint has one line format, so `text` and `json` both
/// give JSON).
pub struct AccessLog(Option<LineWriter>);

impl AccessLog {
    pub fn new(format: crate::config::AccessLogFormat) -> Self {
        AccessLog(match format {
            crate::config::AccessLogFormat::Off => None,
            crate::config::AccessLogFormat::Text | crate::config::AccessLogFormat::Json => {
                Some(LineWriter::spawn(
                    "zmesh-accesslog",
                    crate::accesslog::QUEUE,
                    std::io::stdout(),
                ))
            }
        })
    }

    pub fn write(&self, line: &Line<'_>) {
        let Some(writer) = &self.0 else {
            return;
        };
        let Ok(mut bytes) = serde_json::to_vec(line) else {
            return;
        };
        bytes.push(b'\n');
        writer.write_line(bytes);
    }

    /// Lines dropped because stdout did not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.as_ref().map_or(0, LineWriter::dropped)
    }
}
