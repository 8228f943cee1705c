//! The waypoint's access log: one JSON line per request on stdout (where container runtimes
//! collect it).
//!
//! The request path only serializes a line and queues it; a dedicated thread writes whatever
//! has queued up in one `write`, so under load many lines share a syscall and a slow stdout never
//! blocks a request. The queue is bounded: when it is full the line is dropped and counted,
//! never the request.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use serde::Serialize;

/// Lines that may wait for the writer; about 10 MB at worst.
const QUEUE: usize = 16 * 1024;

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

pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    pub dropped: AtomicU64,
}

impl Default for AccessLog {
    fn default() -> Self {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        std::thread::Builder::new()
            .name("zmesh-accesslog".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let mut batch = Vec::with_capacity(64 * 1024);
                while let Ok(first) = rx.recv() {
                    batch.extend_from_slice(&first);
                    while let Ok(more) = rx.try_recv() {
                        batch.extend_from_slice(&more);
                        if batch.len() >= 64 * 1024 {
                            break;
                        }
                    }
                    let mut out = stdout.lock();
                    let _ = out.write_all(&batch).and_then(|()| out.flush());
                    batch.clear();
                }
            })
            .expect("spawning the access-log thread");
        AccessLog {
            tx,
            dropped: AtomicU64::new(0),
        }
    }
}

impl AccessLog {
    pub fn write(&self, line: &Line<'_>) {
        let Ok(mut bytes) = serde_json::to_vec(line) else {
            return;
        };
        bytes.push(b'\n');
        match self.tx.try_send(bytes) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
