//! The allocator the shipped binaries use (issue #15; figures in benches/RESULTS.md).
//!
//! jemalloc by default. Measured on the two-node bench against glibc's malloc in the same run:
//! about 1.24× the throughput and 0.77× the node CPU per byte, because the data path's buffers
//! (256 KiB reads, 16 KiB TLS records) churn through glibc's heap trimming and mmap threshold
//! and come back as page faults, where jemalloc keeps them in its arenas and gives idle pages
//! back on a timer (its background thread; the decay times are set in `.cargo/config.toml`).
//! glibc kept every page after a load; mimalloc measured slower than jemalloc and larger at
//! idle. The price is about 1.3 MiB at idle (a node alone: 12.7 against 11.4 MiB). The library
//! itself (tests, benches, fuzz targets) keeps the system allocator.
//!
//! jemalloc also keeps a cache of freed objects in every thread, which only shrinks as that
//! thread allocates again; a worker that goes quiet after a load holds its cache for as long as
//! it sleeps. The runtimes' workers therefore flush theirs when they park after having worked
//! ([`ParkState`], [`nudge_pending`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Declares the binaries' global allocator; each `src/bin` calls it once at the top level, and
/// `declare_allocator()` first thing in `main`, so `/debug/memory` reports the right one.
#[macro_export]
macro_rules! binary_allocator {
    () => {
        #[cfg(feature = "jemalloc")]
        #[global_allocator]
        static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
        #[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
        #[global_allocator]
        static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

        /// Records the allocator declared above ([`zmesh::alloc::declare`]).
        fn declare_allocator() {
            $crate::alloc::declare(if cfg!(feature = "jemalloc") {
                $crate::alloc::Allocator::Jemalloc
            } else if cfg!(feature = "mimalloc") {
                $crate::alloc::Allocator::Mimalloc
            } else {
                $crate::alloc::Allocator::System
            });
        }
    };
}

/// What serves this process's allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocator {
    /// The C library's malloc (glibc on the supported images).
    System,
    Jemalloc,
    Mimalloc,
}

static DECLARED: OnceLock<Allocator> = OnceLock::new();

/// Records the binary's allocator, once, at start ([`binary_allocator!`]).
pub fn declare(allocator: Allocator) {
    let _ = DECLARED.set(allocator);
}

/// The allocator serving this process: what the binary declared, else the system's (the
/// library's tests and benches).
pub fn in_use() -> Allocator {
    DECLARED.get().copied().unwrap_or(Allocator::System)
}

/// Minimum time between two trims of one worker's cache. Under load a worker parks thousands of
/// times a second, and `thread.idle` also purges the arena's unused pages, which the next
/// allocations would fault back in; once a second costs nothing measurable (benches/RESULTS.md,
/// "thread caches").
pub const TRIM_GAP: Duration = Duration::from_secs(1);

/// Bytes a worker frees before its cache counts as worth flushing. Freed objects are what fills
/// the cache, so a worker that freed less than this since its last trim holds at most this much
/// extra; a quiet node's workers, waking for timers, never reach it and are never nudged.
pub const BUSY_FREED: u64 = 256 << 10;

/// Giving cached memory back after a load. jemalloc keeps a cache of freed objects per thread
/// and shrinks it only as that thread allocates again, so a data-plane worker that goes quiet
/// after 10,000 connections close keeps megabytes of them for as long as it sleeps (about
/// 4 MiB on node A in the system bench: benches/RESULTS.md, "thread caches"). Each worker flushes its
/// cache (`thread.idle`) when it parks having freed [`BUSY_FREED`] since its last flush, at most
/// every [`TRIM_GAP`]; one that parks within the gap is marked pending, and [`nudge_pending`]
/// wakes the workers, because a parked tokio worker cannot be reached otherwise.
#[derive(Debug, Default)]
pub struct ParkState {
    last_trim: Option<Instant>,
    /// The thread's freed-bytes counter at its last trim.
    freed_at_trim: u64,
    pending: bool,
}

/// What a worker does as it parks ([`ParkState::on_park`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// Nothing worth giving back: the worker freed little since its last trim.
    Keep,
    /// Flush the cache now.
    Trim,
    /// Busy, but trimmed less than [`TRIM_GAP`] ago: the worker now waits for a nudge.
    BecamePending,
    /// Still pending from an earlier park.
    StillPending,
}

impl ParkState {
    /// The decision for one park at `now`, with `freed` the thread's bytes freed since it
    /// started; updates the state as if the decision was carried out.
    pub fn on_park(&mut self, now: Instant, freed: u64) -> Park {
        if freed.saturating_sub(self.freed_at_trim) < BUSY_FREED && !self.pending {
            return Park::Keep;
        }
        if self
            .last_trim
            .is_none_or(|t| now.saturating_duration_since(t) >= TRIM_GAP)
        {
            self.last_trim = Some(now);
            self.freed_at_trim = freed;
            self.pending = false;
            return Park::Trim;
        }
        if std::mem::replace(&mut self.pending, true) {
            Park::StillPending
        } else {
            Park::BecamePending
        }
    }
}

/// Workers waiting for a nudge to trim, trims done (for `/debug/memory`), and the nudger's wake-up.
static PENDING: AtomicUsize = AtomicUsize::new(0);
static TRIMS: AtomicU64 = AtomicU64::new(0);
static BECAME_PENDING: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// One worker's [`ParkState`]. A worker that exits while pending is no longer waited for.
#[derive(Default)]
struct Worker(ParkState);

impl Drop for Worker {
    fn drop(&mut self) {
        if self.0.pending {
            PENDING.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

thread_local! {
    static PARKING: std::cell::RefCell<Worker> = std::cell::RefCell::default();
}

/// Whether this binary's allocator keeps per-thread caches that [`on_worker_park`] can flush.
fn trims_thread_caches() -> bool {
    cfg!(feature = "jemalloc") && in_use() == Allocator::Jemalloc
}

/// Builds a multi-thread runtime of `workers` workers named `name`, all I/O and timers on,
/// whose workers give their allocator caches back after a load: where the allocator has thread
/// caches, it installs [`on_worker_park`] and spawns [`nudge_pending`] on `nudger`, or on the
/// runtime itself when there is none (its own timer then runs on a worker, which trims as it
/// parks, and its empty tasks reach the others).
pub fn trimming_runtime(
    name: &str,
    workers: usize,
    nudger: Option<&tokio::runtime::Handle>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(workers)
        .thread_name(name)
        .enable_all();
    let trims = trims_thread_caches();
    if trims {
        builder.on_thread_park(on_worker_park);
    }
    let rt = builder.build()?;
    if trims {
        let nudge = nudge_pending(rt.handle().clone(), workers);
        drop(nudger.unwrap_or(rt.handle()).spawn(nudge));
    }
    Ok(rt)
}

/// A runtime's `on_thread_park` hook, installed by [`trimming_runtime`] only where the
/// allocator has thread caches: applies [`ParkState`] to this worker.
fn on_worker_park() {
    let Some(freed) = thread_freed() else {
        return;
    };
    let decision = PARKING.with(|p| {
        let p = &mut p.borrow_mut().0;
        let was_pending = p.pending;
        let d = p.on_park(Instant::now(), freed);
        if d == Park::Trim && was_pending {
            PENDING.fetch_sub(1, Ordering::Relaxed);
        }
        d
    });
    match decision {
        Park::Trim => trim_this_thread(),
        Park::BecamePending => {
            PENDING.fetch_add(1, Ordering::Relaxed);
            BECAME_PENDING.notify_one();
        }
        Park::Keep | Park::StillPending => {}
    }
}

/// The calling thread's bytes freed since it started, where the allocator counts them.
fn thread_freed() -> Option<u64> {
    #[cfg(feature = "jemalloc")]
    return zmesh_redirect::jemalloc_thread_freed()
        .inspect_err(|e| tracing::debug!("jemalloc thread.deallocated failed: {e}"))
        .ok();
    #[cfg(not(feature = "jemalloc"))]
    None
}

/// Flushes the calling thread's allocator cache, where the allocator has one to flush.
fn trim_this_thread() {
    #[cfg(feature = "jemalloc")]
    match zmesh_redirect::jemalloc_thread_idle() {
        Ok(()) => {
            TRIMS.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!("jemalloc thread.idle failed: {e}"),
    }
}

/// Workers now waiting for a nudge.
pub fn pending_workers() -> usize {
    PENDING.load(Ordering::Relaxed)
}

/// Thread caches flushed since start.
pub fn trims() -> u64 {
    TRIMS.load(Ordering::Relaxed)
}

/// Nudges in a row that no trim follows before [`nudge_pending`] waits for the next worker to
/// become pending. tokio wakes the most recently parked worker first and cannot be told which one
/// to wake: with more workers than a nudge's wake-ups reach, a pending worker may trim only at
/// its next real wake-up, and this bounds the seconds spent trying.
pub const NUDGE_ROUNDS: u32 = 5;

/// Runs forever, on any runtime: sleeps until a worker becomes pending, then every
/// [`TRIM_GAP`] while one is, spawns one empty task per worker on `data`, so that parked
/// workers wake, park again and trim; it gives up after [`NUDGE_ROUNDS`] nudges without a trim.
/// A quiet node has no pending worker and is never woken for this.
pub async fn nudge_pending(data: tokio::runtime::Handle, workers: usize) {
    loop {
        BECAME_PENDING.notified().await;
        let (mut last, mut fruitless) = (trims(), 0);
        while pending_workers() > 0 && fruitless <= NUDGE_ROUNDS {
            tokio::time::sleep(TRIM_GAP).await;
            let now = trims();
            fruitless = if now == last { fruitless + 1 } else { 0 };
            last = now;
            for _ in 0..workers {
                drop(data.spawn(async {}));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_freed_little_keeps_its_cache_and_is_never_pending() {
        let t0 = Instant::now();
        let mut s = ParkState::default();
        for i in 1..100u64 {
            // Timer wake-ups over minutes, freeing a little each time: never busy enough.
            let at = t0 + Duration::from_secs(i * 60);
            assert_eq!(s.on_park(at, i * (BUSY_FREED / 100)), Park::Keep);
        }
        assert!(!s.pending);
        assert!(s.last_trim.is_none());
    }

    #[test]
    fn one_park_after_freeing_much_trims_however_long_the_worker_was_quiet() {
        // The pool dropping idle connections frees megabytes in a single wake-up.
        let t0 = Instant::now();
        let mut s = ParkState::default();
        assert_eq!(s.on_park(t0, 10), Park::Keep);
        assert_eq!(s.on_park(t0, 10 + BUSY_FREED), Park::Trim);
        assert_eq!(s.freed_at_trim, 10 + BUSY_FREED);
    }

    #[test]
    fn a_busy_worker_trims_at_most_once_per_gap_then_waits_for_a_nudge() {
        let t0 = Instant::now();
        let mut s = ParkState::default();
        assert_eq!(s.on_park(t0, BUSY_FREED), Park::Trim);
        // Busy again within the gap: pending, once, then still pending.
        let soon = t0 + TRIM_GAP / 2;
        assert_eq!(s.on_park(soon, 2 * BUSY_FREED), Park::BecamePending);
        assert_eq!(s.on_park(soon, 3 * BUSY_FREED), Park::StillPending);
        // The nudge's park, a gap after the last trim, trims even having freed nothing more.
        assert_eq!(s.on_park(t0 + TRIM_GAP, 3 * BUSY_FREED), Park::Trim);
        assert!(!s.pending);
        // And afterwards it is an ordinary worker again.
        assert_eq!(s.on_park(t0 + TRIM_GAP * 5, 3 * BUSY_FREED + 1), Park::Keep);
    }

    #[test]
    fn a_pending_worker_nudged_early_stays_pending() {
        let t0 = Instant::now();
        let mut s = ParkState::default();
        s.on_park(t0, BUSY_FREED);
        assert_eq!(s.on_park(t0, 2 * BUSY_FREED), Park::BecamePending);
        let early = t0 + TRIM_GAP - Duration::from_millis(1);
        assert_eq!(s.on_park(early, 2 * BUSY_FREED), Park::StillPending);
        assert_eq!(s.on_park(t0 + TRIM_GAP, 2 * BUSY_FREED), Park::Trim);
    }

    #[test]
    fn a_clock_that_goes_backwards_does_not_trim_early_or_panic() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut s = ParkState::default();
        s.on_park(t0, BUSY_FREED);
        let back = t0 - Duration::from_secs(5);
        assert_eq!(s.on_park(back, 2 * BUSY_FREED), Park::BecamePending);
    }

    #[test]
    fn a_counter_that_restarts_lower_does_not_underflow() {
        let t0 = Instant::now();
        let mut s = ParkState::default();
        s.on_park(t0, 5 * BUSY_FREED);
        assert_eq!(s.on_park(t0 + TRIM_GAP * 2, 1), Park::Keep);
    }
}
