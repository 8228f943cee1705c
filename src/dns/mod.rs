//! The node's DNS proxy (docs/capture.md "DNS proxy"), ztunnel's on port 15053: it answers the
//! names the mesh knows (service hostnames and their short forms under the client's search
//! domains) from the model, hands every other query to the client's upstream resolvers, and gives
//! services without an address one from `node.dns.vip_range` that the outbound path recognises.
//!
//! Seams: `resolve` decides what the mesh answers (pure), `vip` allocates addresses (pure),
//! `upstream` forwards over UDP and TCP, `server` runs one UDP socket and one TCP listener per
//! scope (the host, or each pod in in-pod mode). The wire format is hickory-proto's; nothing
//! here parses DNS by hand beyond reading a header's id and flags.

pub mod resolve;
pub mod server;
pub mod upstream;
pub mod vip;

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use server::{respond, serve, Clients, DnsListeners, Response, Server};

type Labels = Vec<(&'static str, &'static str)>;

/// Why a message was dropped without an answer (`zmesh_dns_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a DNS message hickory can parse: bad header, compression loop, name over 255 bytes.
    Malformed,
    /// A response sent to the proxy (reflection) rather than a query.
    NotAQuery,
    /// A UDP datagram longer than any query the proxy accepts.
    Oversized,
    /// `max_inflight` queries were already being forwarded.
    Overloaded,
    /// `max_tcp_connections` TCP clients were already connected.
    TcpLimit,
    /// A TCP client idle past `tcp_idle_timeout`.
    TcpIdle,
}

impl DropReason {
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotAQuery => "not_a_query",
            DropReason::Oversized => "oversized",
            DropReason::Overloaded => "overloaded",
            DropReason::TcpLimit => "tcp_limit",
            DropReason::TcpIdle => "tcp_idle",
        }
    }
}

/// The DNS proxy's metrics, with Istio's family names (`istio_dns_*`) plus zmesh's drop counter.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    requests: Family<Labels, Counter>,
    upstream_requests: Family<Labels, Counter>,
    upstream_failures: Family<Labels, Counter>,
    upstream_duration: Histogram,
    dropped: Family<Labels, Counter>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            // 1 ms to ~4 s: a cluster resolver answers in a few ms, the deadline is 2 s.
            upstream_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 13),
            ),
            dropped: Family::default(),
        }
    }
}

impl DnsMetrics {
    /// Adds the families to `registry` (prometheus-client appends `_total` to counters).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_dns_requests",
            "Total number of DNS requests",
            self.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream resolvers",
            self.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Total number of DNS requests an upstream resolver failed to answer",
            self.upstream_failures.clone(),
        );
        registry.register(
            "istio_dns_upstream_request_duration_seconds",
            "Time an upstream resolver took to answer",
            self.upstream_duration.clone(),
        );
        registry.register(
            "zmesh_dns_dropped",
            "DNS messages dropped without an answer, by reason (zmesh)",
            self.dropped.clone(),
        );
    }

    pub fn request(&self, query_type: &'static str, protocol: &'static str) {
        self.requests
            .get_or_create(&vec![
                ("request_query_type", query_type),
                ("request_protocol", protocol),
            ])
            .inc();
    }

    pub fn upstream_request(&self, protocol: &'static str) {
        self.upstream_requests
            .get_or_create(&vec![("request_protocol", protocol)])
            .inc();
    }

    /// `protocol` is `none` when there was no resolver to ask.
    pub fn upstream_failure(&self, protocol: &'static str) {
        self.upstream_failures
            .get_or_create(&vec![("request_protocol", protocol)])
            .inc();
    }

    pub fn upstream_duration(&self, d: Duration) {
        self.upstream_duration.observe(d.as_secs_f64());
    }

    pub fn dropped(&self, reason: DropReason) {
        self.dropped
            .get_or_create(&vec![("reason", reason.label())])
            .inc();
    }

    /// A family's total over the protocol labels (tests; reading creates the zero series).
    #[cfg(test)]
    fn sum(f: &Family<Labels, Counter>) -> u64 {
        let mut total = 0;
        for key in [
            vec![("request_protocol", "udp")],
            vec![("request_protocol", "tcp")],
            vec![("request_protocol", "none")],
        ] {
            total += f.get_or_create(&key).get();
        }
        total
    }

    #[cfg(test)]
    pub(crate) fn upstream_requests_total(&self) -> u64 {
        Self::sum(&self.upstream_requests)
    }

    #[cfg(test)]
    pub(crate) fn upstream_failures_total(&self) -> u64 {
        Self::sum(&self.upstream_failures)
    }

    #[cfg(test)]
    pub(crate) fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped
            .get_or_create(&vec![("reason", reason.label())])
            .get()
    }
}

/// The `request_query_type` label: the common types by name, everything else `other`, so a
/// client cannot grow the series count with 65,536 type numbers.
pub fn query_type_label(t: hickory_proto::rr::RecordType) -> &'static str {
    use hickory_proto::rr::RecordType as T;
    match t {
        T::A => "A",
        T::AAAA => "AAAA",
        T::CNAME => "CNAME",
        T::MX => "MX",
        T::NS => "NS",
        T::PTR => "PTR",
        T::SOA => "SOA",
        T::SRV => "SRV",
        T::TXT => "TXT",
        T::HTTPS => "HTTPS",
        T::SVCB => "SVCB",
        T::ANY => "ANY",
        _ => "other",
    }
}
