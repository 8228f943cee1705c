//! Access-log output that never blocks the data path, shared by the node and the waypoint.
//!
//! A request or connection only formats its line and queues it; a dedicated thread writes
//! whatever has queued up in one `write`, so under load many lines share a syscall, and a slow
//! or stalled sink (a full pipe nobody reads, a stopped log collector) never holds up an async
//! worker. The queue is bounded: when it is full the line is dropped and counted, never the
//! traffic. The count is exported as `zmesh_access_log_dropped_total`.
//!
//! The waypoint writes its JSON lines through a `LineWriter` on stdout. The node's lines are
//! tracing events (target `access`) rendered by the subscriber `main` installs; `NodeLogWriter`
//! is that subscriber's writer: it queues access lines on stderr's `LineWriter` and writes the
//! rare diagnostic lines directly, so they are never lost at exit.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines that may wait for the writer: at ~500 bytes a line, about 8 MB at worst.
pub const QUEUE: usize = 16 * 1024;
/// The writer stops gathering queued lines into one write at this size, so a burst does not
/// grow one buffer without bound.
const BATCH: usize = 64 * 1024;
/// How long the node waits at exit for its queued access lines to be written.
const EXIT_FLUSH: Duration = Duration::from_secs(2);
/// The tracing target of the node's per-connection lines (`proxy::ConnLog::emit`).
pub const ACCESS_TARGET: &str = "access";

/// A bounded queue of lines in front of a writer thread.
pub struct LineWriter {
    /// Not behind a lock: every worker queues lines concurrently.
    tx: SyncSender<Vec<u8>>,
    /// Set by `close`: later lines are dropped (and counted).
    closed: AtomicBool,
    /// Disconnects when the writer thread has written everything and exited.
    finished: Mutex<Option<Receiver<()>>>,
    dropped: AtomicU64,
}

impl LineWriter {
    /// Starts a writer thread named `name` that writes queued lines to `sink`; at most
    /// `capacity` lines wait, further ones are dropped and counted.
    pub fn spawn(name: &str, capacity: usize, mut sink: impl Write + Send + 'static) -> LineWriter {
        let (tx, rx) = sync_channel::<Vec<u8>>(capacity);
        let (finishing, finished) = sync_channel::<()>(0);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _finishing = finishing;
                let mut batch = Vec::with_capacity(BATCH);
                let mut open = true;
                while open {
                    let Ok(first) = rx.recv() else { break };
                    // An empty line is `close`'s end-of-stream mark.
                    open = !first.is_empty();
                    batch.extend_from_slice(&first);
                    while open && batch.len() < BATCH {
                        let Ok(more) = rx.try_recv() else { break };
                        open = !more.is_empty();
                        batch.extend_from_slice(&more);
                    }
                    // A failing sink (closed stderr) loses these lines; nothing on the data
                    // path can do better, and the next batch tries again.
                    let _ = sink.write_all(&batch).and_then(|()| sink.flush());
                    batch.clear();
                }
            })
            .expect("spawning the access-log thread");
        LineWriter {
            tx,
            closed: AtomicBool::new(false),
            finished: Mutex::new(Some(finished)),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues one line (with its newline). Returns false when it was dropped: the queue was
    /// full, or the writer is closed.
    pub fn write_line(&self, line: Vec<u8>) -> bool {
        let sent = !line.is_empty()
            && !self.closed.load(Ordering::Relaxed)
            && self.tx.try_send(line).is_ok();
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops taking lines and waits up to `wait` for the queued ones to be written (process
    /// exit, tests); a sink that stays stalled does not hold the caller longer. Returns whether
    /// everything was written. Blocks: call it off the async workers.
    pub fn close(&self, wait: Duration) -> bool {
        self.closed.store(true, Ordering::Relaxed);
        let Some(finished) = self.finished.lock().expect("access-log poisoned").take() else {
            return true;
        };
        let deadline = Instant::now() + wait;
        // The end mark queues behind the lines already waiting; a full queue means the sink
        // is slow, so retry until the deadline rather than block on it.
        loop {
            match self.tx.try_send(Vec::new()) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return true,
                Err(TrySendError::Full(_)) if Instant::now() >= deadline => return false,
                Err(TrySendError::Full(_)) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        finished.recv_timeout(left) == Err(RecvTimeoutError::Disconnected)
    }
}

/// The node's access-log queue on stderr (one per process, like stderr itself).
static NODE: OnceLock<LineWriter> = OnceLock::new();

/// The node's access log on stderr, started on first use.
pub fn node_stderr() -> &'static LineWriter {
    NODE.get_or_init(|| LineWriter::spawn("zmesh-accesslog", QUEUE, std::io::stderr()))
}

/// Access lines the node dropped because stderr did not keep up (0 while it was never used).
pub fn node_dropped() -> u64 {
    NODE.get().map_or(0, LineWriter::dropped)
}

/// Writes the node's queued access lines (for at most `EXIT_FLUSH`) and stops its writer
/// (process exit).
pub fn close_node() {
    if let Some(w) = NODE.get() {
        w.close(EXIT_FLUSH);
    }
}

/// The node's `tracing_subscriber` writer: access lines are queued, others written directly.
#[derive(Clone, Copy)]
pub struct NodeLogWriter {
    access: &'static LineWriter,
}

impl NodeLogWriter {
    /// Access lines to the node's stderr queue (`node_stderr`), counted in `node_dropped`.
    pub fn stderr() -> NodeLogWriter {
        NodeLogWriter {
            access: node_stderr(),
        }
    }

    /// Access lines to `lines` (tests use a stalled sink).
    pub fn to(lines: &'static LineWriter) -> NodeLogWriter {
        NodeLogWriter { access: lines }
    }
}

/// One event being rendered: buffered and queued whole when rendering ends, or written through.
pub enum EventWriter {
    Queued {
        line: Vec<u8>,
        to: &'static LineWriter,
    },
    Direct(std::io::Stderr),
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            EventWriter::Queued { line, .. } => {
                line.extend_from_slice(buf);
                Ok(buf.len())
            }
            EventWriter::Direct(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            EventWriter::Queued { .. } => Ok(()),
            EventWriter::Direct(e) => e.flush(),
        }
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if let EventWriter::Queued { line, to } = self {
            if !line.is_empty() {
                to.write_line(std::mem::take(line));
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NodeLogWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter::Direct(std::io::stderr())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        if meta.target() == ACCESS_TARGET {
            EventWriter::Queued {
                line: Vec::new(),
                to: self.access,
            }
        } else {
            EventWriter::Direct(std::io::stderr())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{mpsc, Arc};

    /// A sink that takes nothing until `release` is called: a pipe nobody reads.
    #[derive(Clone, Default)]
    pub(crate) struct StalledSink {
        released: Arc<(Mutex<bool>, std::sync::Condvar)>,
        entered: Arc<AtomicBool>,
        pub(crate) written: Arc<Mutex<Vec<u8>>>,
    }

    impl StalledSink {
        /// Waits (wall time, bounded) until the writer thread is stuck in this sink.
        pub(crate) fn wait_stuck(&self) {
            for _ in 0..10_000 {
                if self.entered.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            panic!("the writer thread never reached the sink");
        }

        pub(crate) fn release(&self) {
            *self.released.0.lock().unwrap() = true;
            self.released.1.notify_all();
        }

        pub(crate) fn lines(&self) -> usize {
            self.written
                .lock()
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count()
        }
    }

    impl Write for StalledSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.entered.store(true, Ordering::SeqCst);
            let (lock, cv) = &*self.released;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` on its own thread and fails the test if it does not return within 10 s of wall
    /// time (only a caller blocked on the stalled sink could take that long).
    pub(crate) fn returns_promptly(f: impl FnOnce() + Send + 'static) {
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the caller blocked on a stalled log sink");
    }

    /// Issue #11 finding 10: with the writer stuck in its sink, 1,000 more lines into a queue
    /// of 8 all return at once; the 991 that did not fit are dropped and counted, and once the
    /// sink moves again every line is either written or counted, none lost silently.
    #[test]
    fn a_stalled_sink_never_blocks_the_caller_and_drops_are_counted() {
        let sink = StalledSink::default();
        let writer: &'static LineWriter = Box::leak(Box::new(LineWriter::spawn(
            "test-accesslog",
            8,
            sink.clone(),
        )));
        assert!(writer.write_line(b"first\n".to_vec()));
        sink.wait_stuck();
        returns_promptly(move || {
            for i in 0..1000 {
                writer.write_line(format!("line {i}\n").into_bytes());
            }
        });
        let dropped = writer.dropped();
        assert_eq!(dropped, 1000 - 8);
        sink.release();
        assert!(writer.close(Duration::from_secs(10)));
        assert_eq!(sink.lines() as u64 + dropped, 1001, "written + dropped");
        assert!(!writer.write_line(b"late\n".to_vec()), "closed");
        assert_eq!(writer.dropped(), dropped + 1);
    }

    /// At exit, a sink that stays stalled holds `close` only for its wait, not for ever.
    #[test]
    fn close_gives_up_on_a_stalled_sink_at_its_deadline() {
        let sink = StalledSink::default();
        let writer = LineWriter::spawn("test-accesslog", 1, sink.clone());
        assert!(writer.write_line(b"in the stuck write\n".to_vec()));
        sink.wait_stuck();
        assert!(writer.write_line(b"queued\n".to_vec()));
        assert!(
            !writer.close(Duration::from_millis(50)),
            "not everything written"
        );
        assert!(!writer.write_line(b"after close\n".to_vec()));
        sink.release();
    }

    /// Only access lines are queued: a diagnostic event goes to stderr directly.
    #[test]
    fn only_access_events_are_queued() {
        let sink = StalledSink::default();
        let writer: &'static LineWriter = Box::leak(Box::new(LineWriter::spawn(
            "test-accesslog",
            8,
            sink.clone(),
        )));
        let make = NodeLogWriter::to(writer);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(make)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "access", conn = 1, "connection complete");
            tracing::info!(target: "zmesh::other", "not an access line");
        });
        sink.release();
        assert!(writer.close(Duration::from_secs(10)));
        let written = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        assert!(written.contains("connection complete") && written.contains("conn=1"));
        assert!(!written.contains("not an access line"), "{written}");
        assert_eq!(sink.lines(), 1);
    }
}
