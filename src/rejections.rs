//! What the listeners refused, counted by reason, and the warnings about it rate-limited
//! (docs/reliability.md #41).
//!
//! A flood of bad handshakes or malformed streams is an attack, or a broken peer, and must not
//! fill the disk with log lines: the first few rejections of each kind in each window are
//! logged, the rest only counted, and the next logged line says how many were left out. The counters are exported
//! on :15020 as `zmesh_rejected_total{listener,reason}`, so the flood stays visible.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Warnings logged per window before the rest are only counted. Enough to see what kind of
/// trouble it is; a flood past it shows in the counters instead.
pub const LOG_BURST: u32 = 10;
/// The window over which `LOG_BURST` applies: at worst one line a second on average.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Lets `burst` events through per `window` and counts the others.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

/// One limiter's state: the current window and what it held back.
#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    used: u32,
    /// Suppressed since the last line that was let through.
    suppressed: u64,
    suppressed_total: u64,
}

impl Window {
    fn allow(&mut self, burst: u32, window: Duration) -> Option<u64> {
        let now = Instant::now();
        let expired = match self.start {
            Some(s) => now.duration_since(s) >= window,
            None => true,
        };
        if expired {
            self.start = Some(now);
            self.used = 0;
        }
        if self.used < burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            self.suppressed_total += 1;
            None
        }
    }
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            burst,
            window,
            state: Mutex::default(),
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were suppressed since the
    /// last one that was; `None` when it must only be counted.
    pub fn allow(&self) -> Option<u64> {
        self.state
            .lock()
            .expect("log limiter poisoned")
            .allow(self.burst, self.window)
    }

    /// Every event ever suppressed.
    pub fn suppressed_total(&self) -> u64 {
        self.state
            .lock()
            .expect("log limiter poisoned")
            .suppressed_total
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(LOG_BURST, LOG_WINDOW)
    }
}

/// The pause after a failed accept (out of descriptors, reliability #29): long enough not to
/// spin, far below any client's connect timeout.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// What every accept loop does when `accept` fails: warn (a burst per window, then only count:
/// out of descriptors this fires every pause) and back off before the next try.
pub async fn accept_failed(warnings: &LogLimiter, listener: &str, e: &std::io::Error) {
    if let Some(suppressed) = warnings.allow() {
        tracing::warn!(listener, error = %e, suppressed, "accept failed; retrying");
    }
    tokio::time::sleep(ACCEPT_RETRY).await;
}

/// [`accept_failed`] for the data-plane listeners: also counted, as
/// `zmesh_rejected_total{listener, reason="accept_failed"}`, and warned about through the same
/// per-kind limiter as every other rejection.
pub async fn accept_failed_counted(
    rejections: &Rejections,
    listener: &'static str,
    e: &std::io::Error,
) {
    if let Some(suppressed) = rejections.record(listener, "accept_failed") {
        tracing::warn!(listener, error = %e, suppressed, "accept failed; retrying");
    }
    tokio::time::sleep(ACCEPT_RETRY).await;
}

/// Rejection counters keyed by (listener, reason), plus the limiter for their warnings.
/// Each (listener, reason) has its own limiter, so a cheap flood of one kind (TLS garbage) cannot
/// silence the warnings of another (a revoked peer, a self-target).
#[derive(Debug, Default)]
pub struct Rejections {
    /// The count and the log window of each kind, under one lock.
    counts: Mutex<BTreeMap<Key, (u64, Window)>>,
}

/// (listener, reason), both fixed strings: the metric labels.
type Key = (&'static str, &'static str);

impl Rejections {
    /// Counts one rejection; returns whether it may be logged (and how many were suppressed
    /// before it), as `LogLimiter::allow`.
    pub fn record(&self, listener: &'static str, reason: &'static str) -> Option<u64> {
        let mut counts = self.counts.lock().expect("rejection counters poisoned");
        let (n, window) = counts.entry((listener, reason)).or_default();
        *n += 1;
        window.allow(LOG_BURST, LOG_WINDOW)
    }

    /// Warnings left out by the limiters, all reasons together.
    pub fn suppressed_total(&self) -> u64 {
        self.counts
            .lock()
            .expect("rejection counters poisoned")
            .values()
            .map(|(_, w)| w.suppressed_total)
            .sum()
    }

    pub fn count(&self, listener: &'static str, reason: &'static str) -> u64 {
        self.counts
            .lock()
            .expect("rejection counters poisoned")
            .get(&(listener, reason))
            .map_or(0, |(n, _)| *n)
    }

    /// Prometheus series: `{listener="..",reason=".."}` and the count.
    pub fn series(&self) -> Vec<(String, f64)> {
        self.counts
            .lock()
            .expect("rejection counters poisoned")
            .iter()
            .map(|((l, r), (n, _))| (format!("{{listener=\"{l}\",reason=\"{r}\"}}"), *n as f64))
            .collect()
    }
}

/// Logs a rejection at WARN unless the limiter holds it back; the line carries how many were
/// suppressed before it. Use through `reject!`.
///
/// `reject!(info: ...)` logs at INFO instead: for refusals that are policy working as meant
/// (a denied CONNECT), which a flood must not turn into unbounded synchronous log writes either.
#[macro_export]
macro_rules! reject {
    (info: $rejections:expr, $listener:expr, $reason:expr, $($field:tt)+) => {{
        if let Some(suppressed) = $rejections.record($listener, $reason) {
            tracing::info!(listener = $listener, reason_code = $reason, suppressed, $($field)+);
        }
    }};
    ($rejections:expr, $listener:expr, $reason:expr, $($field:tt)+) => {{
        if let Some(suppressed) = $rejections.record($listener, $reason) {
            tracing::warn!(listener = $listener, reason_code = $reason, suppressed, $($field)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_logged_a_burst_per_window_and_counted_in_full() {
        let r = Rejections::default();
        let logged = (0..10_000)
            .filter(|_| r.record("hbone", "tls_handshake").is_some())
            .count();
        assert_eq!(logged, LOG_BURST as usize);
        assert_eq!(r.count("hbone", "tls_handshake"), 10_000);
        assert_eq!(r.suppressed_total(), 10_000 - u64::from(LOG_BURST));
        // The flood of one kind does not silence another.
        assert_eq!(r.record("hbone", "bad_connect"), Some(0));
        // Within the window nothing more of the flooding kind gets through.
        tokio::time::advance(LOG_WINDOW - Duration::from_millis(1)).await;
        assert_eq!(r.record("hbone", "tls_handshake"), None);
        // The next window lets a line through, carrying what was left out.
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            r.record("hbone", "tls_handshake"),
            Some(10_000 - u64::from(LOG_BURST) + 1)
        );
        assert_eq!(r.record("hbone", "bad_connect"), Some(0));
        assert_eq!(
            r.series(),
            vec![
                (
                    "{listener=\"hbone\",reason=\"bad_connect\"}".to_string(),
                    2.0
                ),
                (
                    "{listener=\"hbone\",reason=\"tls_handshake\"}".to_string(),
                    10_002.0
                ),
            ]
        );
    }
}
