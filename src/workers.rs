//! How many data-plane worker threads to run (docs/conventions: the data plane is a multi-thread
//! runtime with a configurable worker count).
//!
//! A node tunnel or waypoint in a container with a CPU limit of 2 on a 64-CPU host must not start
//! 64 workers: the kernel's CFS quota would throttle them all in turn, and every extra worker only
//! adds wake-ups and cache misses. So an unset `worker_threads` (0) means the container's CPU limit,
//! read from cgroup v2 `cpu.max` ("<quota> <period>" or "max <period>"), else cgroup v1
//! `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 = no limit), rounded up, at least 1 and at most the
//! CPUs this process may run on. An explicit `worker_threads` always wins.
//!
//! The parsing is pure over the files' contents (unit-tested below); `detect` only reads them.

use std::fmt;
use std::path::Path;

/// Where the worker count came from, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerSource {
    /// `node.worker_threads` in the config.
    Config,
    /// The cgroup v2 CPU limit (`cpu.max`).
    CgroupV2,
    /// The cgroup v1 CFS quota (`cpu.cfs_quota_us` / `cpu.cfs_period_us`).
    CgroupV1,
    /// No CPU limit found: one worker per CPU this process may use.
    AvailableCpus,
}

impl fmt::Display for WorkerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerSource::Config => "config (node.worker_threads)",
            WorkerSource::CgroupV2 => "cgroup v2 cpu.max",
            WorkerSource::CgroupV1 => "cgroup v1 cpu.cfs_quota_us/cpu.cfs_period_us",
            WorkerSource::AvailableCpus => "available CPUs (no cgroup CPU limit)",
        })
    }
}

/// The chosen worker count, its source, and what was wrong with a limit file that was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workers {
    pub count: usize,
    pub source: WorkerSource,
    pub warnings: Vec<String>,
}

/// A CPU limit: `quota` microseconds of CPU time per `period` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    pub quota: u64,
    pub period: u64,
}

impl CpuLimit {
    /// Whole CPUs the limit allows, rounded up (1.5 CPUs → 2 workers), between 1 and `available`.
    pub fn workers(&self, available: usize) -> usize {
        let cpus = self.quota.div_ceil(self.period);
        usize::try_from(cpus)
            .unwrap_or(usize::MAX)
            .clamp(1, available.max(1))
    }
}

/// Parses cgroup v2 `cpu.max`: `Ok(None)` for no limit ("max ..."), the limit otherwise.
pub fn parse_cpu_max(text: &str) -> Result<Option<CpuLimit>, String> {
    let mut fields = text.split_whitespace();
    let (Some(quota), period, None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(format!(
            "cpu.max {text:?}: expected \"<quota|max> [period]\""
        ));
    };
    // The kernel's default period is 100 ms when only the quota is written.
    let period = match period {
        Some(p) => parse_positive("cpu.max period", p)?,
        None => 100_000,
    };
    if quota == "max" {
        return Ok(None);
    }
    let quota = parse_positive("cpu.max quota", quota)?;
    Ok(Some(CpuLimit { quota, period }))
}

/// Parses cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`: `Ok(None)` for no limit (-1).
pub fn parse_cfs(quota: &str, period: &str) -> Result<Option<CpuLimit>, String> {
    let quota = quota.trim();
    if quota == "-1" {
        return Ok(None);
    }
    let quota = parse_positive("cpu.cfs_quota_us", quota)?;
    let period = parse_positive("cpu.cfs_period_us", period.trim())?;
    Ok(Some(CpuLimit { quota, period }))
}

fn parse_positive(what: &str, s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err(format!("{what} is 0")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{what} {s:?} is not a positive integer: {e}")),
    }
}

/// Chooses the worker count from the config value (0 = unset), the cgroup files' contents (None
/// where a file is missing), and the CPUs available. A limit file that cannot be parsed is
/// skipped with a warning, never fatal: the next source is used.
pub fn choose(
    configured: usize,
    cpu_max: Option<&str>,
    cfs: Option<(&str, &str)>,
    available: usize,
) -> Workers {
    let available = available.max(1);
    let mut warnings = Vec::new();
    if configured > 0 {
        return Workers {
            count: configured,
            source: WorkerSource::Config,
            warnings,
        };
    }
    // A cgroup v2 file that says "max" is an answer (no limit): v1 files are not consulted.
    let v2 = cpu_max.map(parse_cpu_max);
    match &v2 {
        Some(Ok(Some(limit))) => {
            return Workers {
                count: limit.workers(available),
                source: WorkerSource::CgroupV2,
                warnings,
            }
        }
        Some(Err(e)) => warnings.push(format!("ignoring the cgroup v2 CPU limit: {e}")),
        Some(Ok(None)) | None => {}
    }
    if !matches!(v2, Some(Ok(None))) {
        match cfs.map(|(q, p)| parse_cfs(q, p)) {
            Some(Ok(Some(limit))) => {
                return Workers {
                    count: limit.workers(available),
                    source: WorkerSource::CgroupV1,
                    warnings,
                }
            }
            Some(Err(e)) => warnings.push(format!("ignoring the cgroup v1 CPU quota: {e}")),
            Some(Ok(None)) | None => {}
        }
    }
    Workers {
        count: available,
        source: WorkerSource::AvailableCpus,
        warnings,
    }
}

/// Where the cgroup files are on a Linux host (inside a container with its own cgroup namespace,
/// these are the container's).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Reads the cgroup files under `root` and chooses (see `choose`).
pub fn detect_in(root: &Path, configured: usize, available: usize) -> Workers {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    let cpu_max = read("cpu.max");
    let quota = read("cpu/cpu.cfs_quota_us");
    let period = read("cpu/cpu.cfs_period_us");
    let cfs = quota.as_deref().zip(period.as_deref());
    choose(configured, cpu_max.as_deref(), cfs, available)
}

/// The data-plane worker count for `configured` (`node.worker_threads`, 0 = unset), logged with
/// its source. Call after logging is set up.
pub fn detect(configured: usize) -> Workers {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let w = detect_in(Path::new(CGROUP_ROOT), configured, available);
    for warning in &w.warnings {
        tracing::warn!("worker threads: {warning}");
    }
    tracing::info!(workers = w.count, source = %w.source, available_cpus = available, "data-plane worker threads");
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_limits_become_whole_cpus() {
        use WorkerSource::*;
        // (config, cpu.max, available) → (workers, source)
        for (configured, cpu_max, available, want, source) in [
            (0, "max", 8, 8, AvailableCpus),
            (0, "max 100000\n", 8, 8, AvailableCpus),
            (0, "150000 100000\n", 8, 2, CgroupV2),
            (0, "100000 100000", 8, 1, CgroupV2),
            (0, "50000 100000", 8, 1, CgroupV2), // half a CPU still gets one worker
            (0, "200000", 8, 2, CgroupV2),       // period defaults to 100 ms
            (0, "6400000 100000", 4, 4, CgroupV2), // never more than the CPUs we have
            (3, "150000 100000", 8, 3, Config),  // the config wins
            (16, "max", 2, 16, Config),
        ] {
            let w = choose(configured, Some(cpu_max), None, available);
            assert_eq!(
                (w.count, w.source),
                (want, source),
                "{configured} {cpu_max:?}"
            );
            assert!(w.warnings.is_empty(), "{cpu_max:?}: {:?}", w.warnings);
        }
    }

    #[test]
    fn cgroup_v1_is_the_fallback() {
        let w = choose(0, None, Some(("250000\n", "100000\n")), 8);
        assert_eq!((w.count, w.source), (3, WorkerSource::CgroupV1));
        let w = choose(0, None, Some(("-1\n", "100000\n")), 8);
        assert_eq!((w.count, w.source), (8, WorkerSource::AvailableCpus));
        // v2 saying "no limit" is final: a leftover v1 file is not read.
        let w = choose(0, Some("max 100000"), Some(("100000", "100000")), 8);
        assert_eq!((w.count, w.source), (8, WorkerSource::AvailableCpus));
        let w = choose(0, None, None, 6);
        assert_eq!((w.count, w.source), (6, WorkerSource::AvailableCpus));
    }

    #[test]
    fn garbage_falls_back_with_a_warning_that_names_the_file() {
        for (cpu_max, cfs, want, source, says) in [
            (
                "lots",
                None,
                8,
                WorkerSource::AvailableCpus,
                "cpu.max quota \"lots\"",
            ),
            ("", None, 8, WorkerSource::AvailableCpus, "cpu.max \"\""),
            ("1 2 3", None, 8, WorkerSource::AvailableCpus, "expected"),
            (
                "0 100000",
                None,
                8,
                WorkerSource::AvailableCpus,
                "quota is 0",
            ),
            (
                "100000 0",
                None,
                8,
                WorkerSource::AvailableCpus,
                "period is 0",
            ),
            (
                "-5 100000",
                None,
                8,
                WorkerSource::AvailableCpus,
                "not a positive integer",
            ),
            (
                "oops",
                Some(("200000", "100000")),
                2,
                WorkerSource::CgroupV1,
                "cgroup v2",
            ),
        ] {
            let w = choose(0, Some(cpu_max), cfs, 8);
            assert_eq!((w.count, w.source), (want, source), "{cpu_max:?}");
            let warned = w.warnings.join("; ");
            assert!(warned.contains(says), "{cpu_max:?}: {warned}");
        }
        let w = choose(0, None, Some(("x", "100000")), 8);
        assert_eq!(w.count, 8);
        assert!(
            w.warnings[0].contains("cpu.cfs_quota_us \"x\""),
            "{:?}",
            w.warnings
        );
    }

    #[test]
    fn files_are_read_from_the_cgroup_root() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            detect_in(dir.path(), 0, 4).source,
            WorkerSource::AvailableCpus
        );
        std::fs::create_dir(dir.path().join("cpu")).unwrap();
        std::fs::write(dir.path().join("cpu/cpu.cfs_quota_us"), "300000\n").unwrap();
        std::fs::write(dir.path().join("cpu/cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(detect_in(dir.path(), 0, 8).count, 3);
        std::fs::write(dir.path().join("cpu.max"), "100000 100000\n").unwrap();
        let w = detect_in(dir.path(), 0, 8);
        assert_eq!((w.count, w.source), (1, WorkerSource::CgroupV2));
    }
}
