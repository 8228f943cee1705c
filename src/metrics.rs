//! The node's Prometheus metrics (served on :15020 `/metrics` and `/stats/prometheus`).
//!
//! TCP metrics carry Istio's standard labels so existing dashboards work: `reporter` is
//! `source` on the sending node and `destination` on the receiving one; values that are not
//! known read `unknown`. A connection counts as opened when its far side is reached (tunnel or
//! app dialed), and as closed, with its bytes, when it ends; one that never got that far counts
//! as failed. The series of a workload that leaves the node are removed on reload, so
//! cardinality follows the model instead of growing for ever.

use std::collections::HashSet;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::model::{Service, Workload};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

impl TcpLabels {
    /// Labels from what the proxy knows of a connection; `src_principal` is used when the source
    /// workload itself is not known (a peer node's workload seen only by its certificate).
    pub fn new(
        reporter: &'static str,
        src: Option<&Workload>,
        src_principal: Option<&str>,
        dst: Option<&Workload>,
        svc: Option<&Service>,
        mtls: bool,
    ) -> TcpLabels {
        let s = |f: fn(&Workload) -> String, w: Option<&Workload>| w.map_or(UNKNOWN.into(), f);
        TcpLabels {
            reporter,
            source_workload: s(|w| w.name.clone(), src),
            source_workload_namespace: s(|w| w.namespace.clone(), src),
            source_principal: src
                .map(|w| w.identity.to_string())
                .or(src_principal.map(str::to_string))
                .unwrap_or_else(|| UNKNOWN.into()),
            source_canonical_service: s(|w| w.canonical_name.clone(), src),
            source_canonical_revision: s(|w| w.canonical_revision.clone(), src),
            destination_workload: s(|w| w.name.clone(), dst),
            destination_workload_namespace: s(|w| w.namespace.clone(), dst),
            destination_principal: s(|w| w.identity.to_string(), dst),
            destination_service: svc.map_or(UNKNOWN.into(), |s| s.hostname.clone()),
            destination_service_name: svc.map_or(UNKNOWN.into(), |s| s.name.clone()),
            destination_service_namespace: svc.map_or(UNKNOWN.into(), |s| s.namespace.clone()),
            destination_canonical_service: s(|w| w.canonical_name.clone(), dst),
            destination_canonical_revision: s(|w| w.canonical_revision.clone(), dst),
            response_flags: "-",
            connection_security_policy: if mtls { "mutual_tls" } else { "none" },
        }
    }
}

pub struct NodeMetrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    /// Every label set in use, interned: an open connection holds one `Arc` to its labels
    /// rather than its own copy of sixteen strings, and a departed workload's series can be
    /// found and removed.
    seen: Mutex<HashSet<Arc<TcpLabels>>>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let family = Family::<TcpLabels, Counter>::default;
        let (opened, closed, failed, sent, received) =
            (family(), family(), family(), family(), family());
        // prometheus-client appends `_total` to counter names.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that failed before reaching their destination",
            failed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent towards the destination",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the destination",
            received.clone(),
        );
        NodeMetrics {
            registry,
            opened,
            closed,
            failed,
            sent,
            received,
            seen: Mutex::new(HashSet::new()),
        }
    }
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeMetrics")
    }
}

impl NodeMetrics {
    /// The shared copy of `l`.
    fn intern(&self, l: TcpLabels) -> Arc<TcpLabels> {
        let mut seen = self.seen.lock().expect("poisoned");
        if let Some(existing) = seen.get(&l) {
            return existing.clone();
        }
        let l = Arc::new(l);
        seen.insert(l.clone());
        l
    }

    /// Counts an opened connection; returns its labels for `closed`.
    pub fn opened(&self, l: TcpLabels) -> Arc<TcpLabels> {
        let l = self.intern(l);
        self.opened.get_or_create(&l).inc();
        l
    }

    /// A connection that was opened has ended, having moved these bytes.
    pub fn closed(&self, l: &TcpLabels, sent: u64, received: u64) {
        self.closed.get_or_create(l).inc();
        self.sent.get_or_create(l).inc_by(sent);
        self.received.get_or_create(l).inc_by(received);
    }

    pub fn failed(&self, l: TcpLabels) {
        let l = self.intern(l);
        self.failed.get_or_create(&l).inc();
    }

    /// Removes the series of workloads (by name and namespace) that are no longer in the model.
    pub fn forget(&self, gone: &dyn Fn(&str, &str) -> bool) {
        let mut seen = self.seen.lock().expect("poisoned");
        seen.retain(|l| {
            let drop = gone(&l.source_workload, &l.source_workload_namespace)
                || gone(&l.destination_workload, &l.destination_workload_namespace);
            if drop {
                for f in [
                    &self.opened,
                    &self.closed,
                    &self.failed,
                    &self.sent,
                    &self.received,
                ] {
                    f.remove(l);
                }
            }
            !drop
        });
    }

    /// The text exposition: the registry, then `extra` (gauges and counters kept elsewhere).
    pub fn encode(&self, extra: &[Extra<'_>]) -> String {
        encode_text(&self.registry, extra)
    }
}

/// The text exposition of `registry` followed by `extra`: what the node's :15020 and the
/// waypoint's metrics endpoint serve.
pub fn encode_text(registry: &Registry, extra: &[Extra<'_>]) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode_registry(&mut out, registry)
        .expect("writing to a String cannot fail");
    for (name, kind, help, samples) in extra {
        let _ = writeln!(out, "# HELP {name} {help}.");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    }
    out.push_str("# EOF\n");
    out
}

/// A metric kept outside the registry: name, type (`counter`/`gauge`), help, and samples as
/// (`{label="value",...}` or empty, value).
pub type Extra<'a> = (&'a str, &'a str, &'a str, Vec<(String, f64)>);

/// `n` as a Prometheus sample value.
pub fn count(n: &std::sync::atomic::AtomicU64) -> f64 {
    n.load(Ordering::Relaxed) as f64
}

/// User plus system CPU seconds of this process (`/proc/self/stat`).
pub fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks as f64 / hz
}

/// Resident set size in bytes (`/proc/self/statm`, pages times the page size).
pub fn process_rss_bytes() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as f64;
    pages * page
}

/// Open file descriptors (entries of `/proc/self/fd`).
pub fn process_open_fds() -> f64 {
    std::fs::read_dir("/proc/self/fd").map_or(0.0, |d| d.count() as f64)
}
