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

use std::sync::OnceLock;

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
