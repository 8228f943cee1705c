//! Istio's standard request metrics as the waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes` and
//! `istio_response_bytes`, with Istio's label names so existing dashboards work unchanged. The
//! peer labels are the node's TCP labels (`crate::metrics::TcpLabels`), built the same way, so a
//! workload reads the same in both.

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::PeerLabels;
use crate::model::{Service, Workload};

/// Istio's default duration buckets, in milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub peers: PeerLabels,
    pub request_protocol: &'static str,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let rest = [
            ("request_protocol", self.request_protocol),
            ("response_code", self.response_code.as_str()),
            ("grpc_response_status", self.grpc_response_status.as_str()),
            ("response_flags", self.response_flags),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
        ];
        self.peers.encode_between(encoder, self.reporter, &rest)
    }
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
        let mut peers = PeerLabels::new(src, Some(src_principal), dst, svc);
        // The waypoint knows the caller by its certificate: that is the principal.
        peers.source_principal = src_principal.to_string();
        RequestLabels {
            reporter: "waypoint",
            peers,
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
