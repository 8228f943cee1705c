//! The node's Prometheus metrics (served on :15020 `/metrics` and `/stats/prometheus`).
//!
//! TCP metrics are ztunnel's: the same four families (`istio_tcp_connections_opened_total`,
//! `_closed_total`, `istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total`) with the same
//! labels in the same order, so Kiali and the Grafana dashboards built for ztunnel read zmesh
//! unchanged (docs/telemetry.md "Metrics"). `reporter` is `source` on the sending node and
//! `destination` on the receiving one; what is not known reads `unknown`, as in ztunnel.
//! Two families are zmesh's own: `istio_tcp_connections_failed_total` (a connection that never
//! reached its far side; ztunnel has no such family) and the gauge `istio_tcp_sockets_open`
//! (connections open now). A connection counts as opened when its far side is reached (tunnel
//! or app dialed), and as closed, with its bytes, when it ends. Labels are built once per
//! connection and interned; the series of a workload that leaves the node are removed on
//! reload, so cardinality follows the model instead of growing for ever.

use std::collections::HashSet;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::{Service, Workload};

/// Istio's standard TCP labels, in the order ztunnel encodes them (its `CommonTrafficLabels`,
/// src/proxy/metrics.rs). ztunnel adds four locality labels (`source_region`, ...) in newer
/// releases; zmesh leaves them out (docs/telemetry.md "Metrics").
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub peers: PeerLabels,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let rest = [
            ("request_protocol", self.request_protocol),
            ("response_flags", self.response_flags),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
        ];
        self.peers.encode_between(encoder, self.reporter, &rest)
    }
}

/// The 19 labels naming both sides and the destination service, in ztunnel's order: shared by
/// the node's TCP labels and the waypoint's request labels, so a workload reads the same in both.
/// (Encoded by hand: the derive's `flatten` only works for a last field, and these sit between
/// `reporter` and the per-report labels.)
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PeerLabels {
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
}

impl PeerLabels {
    /// Encodes `reporter`, these labels, then `rest`, in that order.
    pub fn encode_between(
        &self,
        mut encoder: LabelSetEncoder,
        reporter: &str,
        rest: &[(&str, &str)],
    ) -> Result<(), std::fmt::Error> {
        let peers = [
            ("source_workload", &self.source_workload),
            ("source_canonical_service", &self.source_canonical_service),
            ("source_canonical_revision", &self.source_canonical_revision),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &self.source_app),
            ("source_version", &self.source_version),
            ("source_cluster", &self.source_cluster),
            ("destination_service", &self.destination_service),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_service_name", &self.destination_service_name),
            ("destination_workload", &self.destination_workload),
            (
                "destination_canonical_service",
                &self.destination_canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination_canonical_revision,
            ),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_cluster", &self.destination_cluster),
        ];
        ("reporter", reporter).encode(encoder.encode_label())?;
        for (k, v) in peers {
            (k, v.as_str()).encode(encoder.encode_label())?;
        }
        for &(k, v) in rest {
            (k, v).encode(encoder.encode_label())?;
        }
        Ok(())
    }

    /// From `src` (or, when it is not known, the principal it was seen with) to `dst` of `svc`.
    pub fn new(
        src: Option<&Workload>,
        src_principal: Option<&str>,
        dst: Option<&Workload>,
        svc: Option<&Service>,
    ) -> PeerLabels {
        let s = Peer::of(src, src_principal);
        let d = Peer::of(dst, None);
        let svc_field = |f: fn(&Service) -> &String| service_label(svc, f);
        PeerLabels {
            source_workload: s.workload,
            source_canonical_service: s.canonical_service,
            source_canonical_revision: s.canonical_revision,
            source_workload_namespace: s.namespace,
            source_principal: s.principal,
            source_app: s.app,
            source_version: s.version,
            source_cluster: s.cluster,
            destination_service: svc_field(|s| &s.hostname),
            destination_service_namespace: svc_field(|s| &s.namespace),
            destination_service_name: svc_field(|s| &s.name),
            destination_workload: d.workload,
            destination_canonical_service: d.canonical_service,
            destination_canonical_revision: d.canonical_revision,
            destination_workload_namespace: d.namespace,
            destination_principal: d.principal,
            destination_app: d.app,
            destination_version: d.version,
            destination_cluster: d.cluster,
        }
    }
}

/// The value of a label zmesh does not know (ztunnel's default for every peer label).
pub const UNKNOWN: &str = "unknown";

/// `response_flags` values, as ztunnel writes them.
pub mod flags {
    /// Nothing to report.
    pub const NONE: &str = "-";
    /// Refused by an authorization policy.
    pub const DENY: &str = "DENY";
    /// The far side could not be reached (or the connection was refused before it was).
    pub const CONNECT: &str = "CONNECT";
}

/// The labels that describe one side of a connection (node and waypoint alike).
pub struct Peer {
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub namespace: String,
    pub principal: String,
    /// ztunnel reports the canonical service and revision again as app and version (the
    /// `app`/`version` pod labels are what canonical names are derived from).
    pub app: String,
    pub version: String,
    pub cluster: String,
}

impl Peer {
    /// The labels of workload `w`, `unknown` where it is not known; `principal` stands in for
    /// the identity of an unknown workload (seen only by its certificate).
    pub fn of(w: Option<&Workload>, principal: Option<&str>) -> Peer {
        let u = || UNKNOWN.to_string();
        let principal = w
            .map(|w| w.identity.to_string())
            .or(principal.map(str::to_string))
            .unwrap_or_else(u);
        match w {
            None => Peer {
                workload: u(),
                canonical_service: u(),
                canonical_revision: u(),
                namespace: u(),
                principal,
                app: u(),
                version: u(),
                cluster: u(),
            },
            Some(w) => Peer {
                workload: w.name.clone(),
                canonical_service: w.canonical_name.clone(),
                canonical_revision: w.canonical_revision.clone(),
                namespace: w.namespace.clone(),
                principal,
                app: w.canonical_name.clone(),
                version: w.canonical_revision.clone(),
                cluster: non_empty(&w.cluster),
            },
        }
    }
}

/// One field of the destination service, `unknown` without one.
pub fn service_label(svc: Option<&Service>, f: fn(&Service) -> &String) -> String {
    svc.map_or(UNKNOWN.into(), |s| f(s).clone())
}

fn non_empty(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.into()
    } else {
        s.into()
    }
}

impl TcpLabels {
    /// Labels from what the proxy knows of a connection; `src_principal` is used when the source
    /// workload itself is not known (a peer node's workload seen only by its certificate).
    /// `mtls` gives `connection_security_policy="mutual_tls"`; otherwise it is `unknown`, as in
    /// ztunnel (which has no `none`).
    pub fn new(
        reporter: &'static str,
        src: Option<&Workload>,
        src_principal: Option<&str>,
        dst: Option<&Workload>,
        svc: Option<&Service>,
        mtls: bool,
    ) -> TcpLabels {
        TcpLabels {
            reporter,
            peers: PeerLabels::new(src, src_principal, dst, svc),
            request_protocol: "tcp",
            response_flags: flags::NONE,
            connection_security_policy: if mtls { "mutual_tls" } else { UNKNOWN },
        }
    }

    /// The same labels with `response_flags` set.
    pub fn with_flags(mut self, response_flags: &'static str) -> TcpLabels {
        self.response_flags = response_flags;
        self
    }
}

pub struct NodeMetrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    open: Family<TcpLabels, Gauge>,
    /// Every label set in use, interned: an open connection holds one `Arc` to its labels
    /// rather than its own copy of twenty-three strings, and a departed workload's series can
    /// be found and removed.
    seen: Mutex<HashSet<Arc<TcpLabels>>>,
    /// The DNS proxy's families (`istio_dns_*`), shared by every scope's DNS listener.
    pub dns: crate::dns::DnsMetrics,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let family = Family::<TcpLabels, Counter>::default;
        let (opened, closed, failed, sent, received) =
            (family(), family(), family(), family(), family());
        let open = Family::<TcpLabels, Gauge>::default();
        // The gauge is registered (and so encoded) first: `closed` lowers it last, so a scrape
        // that reads it after the close reads the counters after it too, and sees the bytes.
        // Encoded after them, a close landing mid-scrape read as gone with no bytes.
        registry.register(
            "istio_tcp_sockets_open",
            "Proxied TCP connections open now: opened and not yet closed (zmesh)",
            open.clone(),
        );
        // prometheus-client appends `_total` to counter names.
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            received.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that failed before reaching their destination (zmesh)",
            failed.clone(),
        );
        let dns = crate::dns::DnsMetrics::default();
        dns.register(&mut registry);
        NodeMetrics {
            registry,
            dns,
            opened,
            closed,
            failed,
            sent,
            received,
            open,
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
        self.open.get_or_create(&l).inc();
        l
    }

    /// A connection that was opened has ended, having moved these bytes.
    pub fn closed(&self, l: &TcpLabels, sent: u64, received: u64) {
        self.closed.get_or_create(l).inc();
        self.sent.get_or_create(l).inc_by(sent);
        self.received.get_or_create(l).inc_by(received);
        // Last: a scrape that sees the connection gone also sees its bytes and its close.
        self.open.get_or_create(l).dec();
    }

    /// A connection that never reached its far side (`l` carries why in `response_flags`).
    pub fn failed(&self, l: TcpLabels) {
        let l = self.intern(l);
        self.failed.get_or_create(&l).inc();
    }

    /// Removes the series of workloads (by name and namespace) that are no longer in the model.
    /// A label set with connections still open stays until a later reload finds it idle, so
    /// its gauge never goes below zero.
    pub fn forget(&self, gone: &dyn Fn(&str, &str) -> bool) {
        let mut seen = self.seen.lock().expect("poisoned");
        seen.retain(|l| {
            let departed = gone(&l.peers.source_workload, &l.peers.source_workload_namespace)
                || gone(
                    &l.peers.destination_workload,
                    &l.peers.destination_workload_namespace,
                );
            // Only a departed set is looked up: `get_or_create` would add a zero series.
            let drop = departed && self.open.get_or_create(l).get() <= 0;
            if drop {
                self.open.remove(l);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(m: &NodeMetrics, family: &str) -> Vec<String> {
        m.encode(&[])
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .map(str::to_string)
            .collect()
    }

    /// A workload that leaves while its connection is open keeps that label set until the
    /// connection closes (the gauge never goes below zero); the next reload then removes it.
    #[test]
    fn a_departed_workload_with_an_open_connection_is_forgotten_after_it_closes() {
        let m = NodeMetrics::default();
        let l = m.opened(TcpLabels::new(
            "source",
            None,
            Some("spiffe://td/ns/a/sa/b"),
            None,
            None,
            true,
        ));
        let gone = |name: &str, _: &str| name == UNKNOWN;
        m.forget(&gone);
        assert_eq!(lines_of(&m, "istio_tcp_sockets_open").len(), 1);
        assert!(lines_of(&m, "istio_tcp_sockets_open")[0].ends_with(" 1"));
        m.closed(&l, 10, 20);
        let open = lines_of(&m, "istio_tcp_sockets_open");
        assert!(open.len() == 1 && open[0].ends_with(" 0"), "{open:?}");
        m.forget(&gone);
        for family in [
            "istio_tcp_sockets_open",
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_sent_bytes_total",
        ] {
            assert!(lines_of(&m, family).is_empty(), "{family}");
        }
    }

    /// A scrape encodes the open gauge before the counters `closed` raises ahead of lowering
    /// it, so a scrape racing a close never shows the connection gone without its bytes.
    #[test]
    fn the_open_gauge_is_encoded_before_the_counters_a_close_raises() {
        let m = NodeMetrics::default();
        let l = m.opened(TcpLabels::new("source", None, None, None, None, true));
        m.closed(&l, 1, 2);
        let text = m.encode(&[]);
        let at = |family: &str| {
            text.find(&format!("\n{family}{{"))
                .unwrap_or_else(|| panic!("no {family} in {text}"))
        };
        let gauge = at("istio_tcp_sockets_open");
        for counter in [
            "istio_tcp_connections_closed_total",
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
        ] {
            assert!(gauge < at(counter), "{counter} is encoded first: {text}");
        }
    }

    /// Unknown peers read `unknown` in every peer label (never empty), the security policy
    /// without mTLS is `unknown` (ztunnel's), and flags are set per failure.
    #[test]
    fn unknown_peers_and_flags() {
        let l =
            TcpLabels::new("destination", None, None, None, None, false).with_flags(flags::DENY);
        assert_eq!(l.peers.source_principal, UNKNOWN);
        assert_eq!(l.peers.destination_cluster, UNKNOWN);
        assert_eq!(l.peers.destination_service_name, UNKNOWN);
        assert_eq!(l.connection_security_policy, UNKNOWN);
        assert_eq!((l.request_protocol, l.response_flags), ("tcp", "DENY"));
    }
}
