//! Istio's standard request metrics as the waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes` and
//! `istio_response_bytes`, with Istio's label names so existing dashboards work unchanged. The
//! peer labels are the node's TCP labels (`crate::metrics::TcpLabels`), built the same way, so a
//! workload reads the same in both.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{service_label, Peer};
use crate::model::{Service, Workload};

/// Istio's default duration buckets, in milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
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
    pub request_protocol: &'static str,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl RequestLabels {
    /// The peer labels of a request from `src` (its certificate's identity `src_principal`) to
    /// endpoint `dst` of `svc`; the per-request labels start empty for the caller to fill.
    pub fn peers(
        src: Option<&Workload>,
        src_principal: &str,
        dst: Option<&Workload>,
        svc: Option<&Service>,
    ) -> RequestLabels {
        let mut s = Peer::of(src, Some(src_principal));
        // The waypoint knows the caller by its certificate: that is the principal.
        s.principal = src_principal.to_string();
        let d = Peer::of(dst, None);
        RequestLabels {
            reporter: "waypoint",
            source_workload: s.workload,
            source_canonical_service: s.canonical_service,
            source_canonical_revision: s.canonical_revision,
            source_workload_namespace: s.namespace,
            source_principal: s.principal,
            source_app: s.app,
            source_version: s.version,
            source_cluster: s.cluster,
            destination_service: service_label(svc, |s| &s.hostname),
            destination_service_namespace: service_label(svc, |s| &s.namespace),
            destination_service_name: service_label(svc, |s| &s.name),
            destination_workload: d.workload,
            destination_canonical_service: d.canonical_service,
            destination_canonical_revision: d.canonical_revision,
            destination_workload_namespace: d.namespace,
            destination_principal: d.principal,
            destination_app: d.app,
            destination_version: d.version,
            destination_cluster: d.cluster,
            request_protocol: "http",
            response_code: String::new(),
            grpc_response_status: String::new(),
            response_flags: crate::metrics::flags::NONE,
            connection_security_policy: "mutual_tls",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BUCKETS.into_iter())) as fn() -> Histogram,
        );
        let bytes = || {
            Family::<RequestLabels, Histogram>::new_with_constructor(
                (|| {
                    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                        1.0, 10.0, 10,
                    ))
                }) as fn() -> Histogram,
            )
        };
        let (request_bytes, response_bytes) = (bytes(), bytes());
        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "istio_requests",
            "Requests handled by the waypoint",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body size",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body size",
            response_bytes.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric, then `extra` (counters kept elsewhere).
    pub fn encode(&self, extra: &[crate::metrics::Extra<'_>]) -> String {
        crate::metrics::encode_text(&self.registry, extra)
    }
}
